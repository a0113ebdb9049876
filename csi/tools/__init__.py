"""Developer and admin tools that talk to the driver from outside."""
