"""`make bench`: the real driver on the real kernel, against baselines (see bench/run.py).

Modules, one job each: ``common`` (constants, output, the command runner, statistics),
``environment`` (what this machine is and has), ``processes`` (the node disk, the driver and
qemu-storage-daemon, the final sweep), ``kernel`` (what the kernel says about a mapping),
``flows`` (one timed publish + unpublish cycle, for the driver and every baseline),
``baselines`` (floor, handrun, conventional), ``phases`` (latency, concurrency, memory),
``footprint``, ``integrity``, ``summary`` (goals and notes) and ``cli`` (arguments, main).
"""
