"""In-memory fakes of the host protocols, one per protocol (``FakeFiles``, ``FakeMounts``,
``FakeDmCrypt``, ``FakeLoops``, ``FakeNbd``, ``FakeFscrypt`` with ``Directories``,
``FakeDirectVolumes``), each a mixin
over one shared ``FakeState`` (the kernel's objects depend on each other across protocols).
``csi.host.fake.FakeHost`` combines them into one ``NodeHost``.
"""

from csi.host.fakes.dmcrypt import FakeDmCrypt
from csi.host.fakes.files import FakeFiles
from csi.host.fakes.fscrypt import FAKE_BUSY_PID, FakeFscrypt
from csi.host.fakes.kata import FakeDirectVolumes
from csi.host.fakes.loops import FakeLoops
from csi.host.fakes.mounts import FakeMounts
from csi.host.fakes.nbd import FakeNbd
from csi.host.fakes.state import ATTACHED_OFFSET, STEPS, FakeFile, FakeMount, FakeState

__all__ = [
    "ATTACHED_OFFSET", "FAKE_BUSY_PID", "STEPS", "FakeDirectVolumes", "FakeDmCrypt", "FakeFile",
    "FakeFiles",
    "FakeFscrypt", "FakeLoops", "FakeMount", "FakeMounts", "FakeNbd", "FakeState",
]  # fmt: skip
