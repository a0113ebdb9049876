"""An in-memory host for unit tests: files, loops, LUKS, mappings and mounts, with faults.

It models just enough of the kernel to catch lifecycle bugs: a mapping can only be opened with the
key it was formatted with (checked by hash), a busy mount refuses umount, and
``fail(step)`` makes the next call of that step raise, so every step can be made to fail or crash.

``FakeHost`` is the composition of one fake per protocol (``csi.host.fakes``), all over one
shared model of the node (``FakeState``): its attributes (``files``, ``mounts``,
``foreign_users``, ``other_namespaces``, ``temporary``, ``nonempty``, ``mkfs_eager``, ``faults``,
``direct_volumes``, ``file_holders``, ...) are that model, for tests to arrange and inspect.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from csi.host.fakes import (
    ATTACHED_OFFSET,
    STEPS,
    FakeDirectVolumes,
    FakeDmCrypt,
    FakeFile,
    FakeFiles,
    FakeFscrypt,
    FakeLoops,
    FakeMount,
    FakeMounts,
    FakeNbd,
)

__all__ = ["ATTACHED_OFFSET", "STEPS", "FakeFile", "FakeHost", "FakeMount"]


@dataclass
class FakeHost(
    FakeFiles, FakeMounts, FakeDmCrypt, FakeLoops, FakeNbd, FakeFscrypt, FakeDirectVolumes
):
    """Every protocol of ``NodeHost`` over one ``FakeState``."""

    # readiness ---------------------------------------------------------------------------
    def missing_requirements(self) -> list[str]:
        return list(self.missing)


if TYPE_CHECKING:  # mypy: each fake is its protocol, and FakeHost is all of them
    from csi.host import (
        Directories,
        DirectVolumes,
        DmCrypt,
        Files,
        Fscrypt,
        Loops,
        Mounts,
        Nbd,
        NodeHost,
    )

    def _conforms(
        files: FakeFiles, dmcrypt: FakeDmCrypt, loops: FakeLoops, nbd: FakeNbd,
        fscrypt: FakeFscrypt, kata: FakeDirectVolumes, host: FakeHost,
    ) -> None:
        as_files: Files = files
        as_dmcrypt: DmCrypt = dmcrypt
        as_loops: Loops = loops
        as_nbd: Nbd = nbd
        as_fscrypt: Fscrypt = fscrypt
        as_directories: Directories = fscrypt
        as_direct_volumes: DirectVolumes = kata
        as_mounts: Mounts = host  # FakeMounts alone lacks device_size (FakeDmCrypt's)
        as_node: NodeHost = host
        del as_files, as_dmcrypt, as_loops, as_nbd, as_fscrypt, as_directories, as_mounts
        del as_direct_volumes, as_node
