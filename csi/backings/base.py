"""The backing contract (see the package docstring for what each method promises)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from csi.errors import Busy, DriverError, InvalidArgument
from csi.host import FsStats, NodeHost
from csi.keys import KeySource

if TYPE_CHECKING:
    from csi.exposures import Exposure
    from csi.journal import Names
    from csi.params import VolumeSpec

StepTimer = Callable[[str], AbstractContextManager[None]]


@dataclass(frozen=True)
class Context:
    """What a backing gets from the node: the host (each backing uses only the protocols it
    needs), the key source, the step timer and the node's directories."""

    host: NodeHost
    key_source: KeySource
    step: StepTimer
    data_dir: str
    state_dir: str
    kata_root: str = ""  # where the Kata runtime reads direct-assigned volumes


@dataclass(frozen=True)
class Orphan:
    """An object of a backing that no record accounts for."""

    reason: str  # the metric label: loop_without_record, export_without_record, ...
    label: str  # what to call it in a message
    digest: str  # the volume digest its name carries


# what a forced key wipe achieved for one volume (``Wiped.outcome``)
WIPED = "wiped"  # its key was in this host's kernel and is gone now
NO_KEY = "no_key"  # no key of it on this host (nothing open, or wiped before)
INCOMPLETE = "incomplete"  # the key is removed but files still open keep per-file keys
IN_GUEST = "in_guest"  # the key lives in a Kata guest's memory, out of the host's reach
FAILED = "failed"  # the wipe raised; the key may still be there
COMPLETE_OUTCOMES = (WIPED, NO_KEY, IN_GUEST)


@dataclass(frozen=True)
class Wiped:
    outcome: str
    detail: str


class Backing(ABC):
    name: ClassVar[str]
    # words a volume id may carry for a shape that can never grow -> the reason, for people
    FIXED_REASONS: ClassVar[dict[str, str]] = {}
    # how its volumes may be handed to a Kata VM (the ``kata`` parameter's values)
    KATA_MODES: ClassVar[tuple[str, ...]] = ("off",)

    def __init__(self, context: Context) -> None:
        self.context = context

    # arithmetic: no node needed --------------------------------------------------------
    @classmethod
    @abstractmethod
    def disk_bytes(cls, spec: VolumeSpec) -> int:
        """The most the volume can take on the node's disk once every block is written."""

    @classmethod
    @abstractmethod
    def largest_fitting(cls, room: int, spec: VolumeSpec) -> int:
        """The biggest size whose ``disk_bytes`` fits in ``room`` (before rounding)."""

    @classmethod
    def fixed_reason(cls, spec: VolumeSpec) -> str:
        """A key of FIXED_REASONS if volumes of this shape can never grow, else ""."""
        return ""

    @classmethod
    def check_spec(cls, spec: VolumeSpec) -> None:
        """InvalidArgument naming why, for parameters that do not apply to this backing."""
        del spec

    @classmethod
    def check_growable(cls, spec: VolumeSpec) -> None:
        """INVALID_ARGUMENT, not FAILED_PRECONDITION: to kubelet and csi-resizer the latter
        means "retry once the volume is not in use", which would never help here."""
        if reason := cls.fixed_reason(spec):
            raise InvalidArgument(cls.FIXED_REASONS[reason])

    # on the node ---------------------------------------------------------------------
    @abstractmethod
    def unavailable(self) -> str | None: ...

    @abstractmethod
    def prepare(self, names: Names, spec: VolumeSpec, *, keyring: bool) -> str: ...

    @abstractmethod
    def find(self, names: Names) -> str | None: ...

    @abstractmethod
    def source(self, names: Names) -> str:
        """What an exposure takes of the prepared volume: a device, or a directory."""

    @abstractmethod
    def shown_at(self, names: Names, path: str) -> bool:
        """Whether the mount visible at ``path`` shows this volume (from the kernel)."""

    @abstractmethod
    def filesystem_exposure(self, spec: VolumeSpec, flags: tuple[str, ...], *,
                            readonly: bool) -> Exposure:  # fmt: skip
        """How a filesystem volume is exposed at its primary path (mounted, or bound)."""

    def details(self, names: Names) -> dict[str, str]:
        """What the journal keeps of the prepared volume besides its spec (never a secret)."""
        del names
        return {}

    def usage(self, names: Names, path: str) -> FsStats:
        """Filesystem usage of the volume exposed at ``path``."""
        del names
        return self.context.host.fs_stats(path)

    @abstractmethod
    def allocated(self, names: Names) -> int:
        """Bytes the volume takes on the node's disk now."""

    def filesystem_errors(self, names: Names) -> int:
        """Errors the volume's filesystem has recorded (0 where it keeps no count of its own)."""
        del names
        return 0

    def grow_filesystem(self, names: Names, spec: VolumeSpec, path: str) -> None:
        """After ``grow``: make the filesystem mounted at ``path`` use the new size (nothing
        where the backing's growth already did)."""
        del names, spec, path

    @abstractmethod
    def attached(self, names: Names) -> str | None: ...

    @abstractmethod
    def health(self, names: Names, spec: VolumeSpec) -> list[str]: ...

    @abstractmethod
    def grow(self, names: Names, spec: VolumeSpec, size: int) -> None: ...

    @abstractmethod
    def in_use(self, names: Names, ignore: str = "") -> list[str]:
        """What the kernel says holds the volume, in words, leaving out a mount at ``ignore``
        (the primary path the caller is about to unexpose)."""

    def check_releasable(self, names: Names, ignore: str = "") -> None:
        """Busy, naming the holders, unless ``release`` could go ahead now."""
        if uses := self.in_use(names, ignore):
            raise Busy(
                f"volume {names.volume_id} is still in use "
                f"({', '.join(uses)}); nothing was torn down, retry later"
            )

    def before_release(self, names: Names) -> None:
        """Anything that must happen before "in use" can even be asked (default: nothing)."""
        del names

    @abstractmethod
    def release(self, names: Names) -> bool: ...

    @abstractmethod
    def detach(self, names: Names) -> None:
        """Let go of any device this backing holds of the volume (nothing closed or deleted):
        for a volume no record names, after the backing that held it released it."""

    @abstractmethod
    def wipe_key(self, names: Names, spec: VolumeSpec) -> Wiped: ...

    def wipe_keys(self, volumes: list[tuple[Names, VolumeSpec]]) -> dict[str, Wiped]:
        """``wipe_key`` for many volumes, keyed by volume id; one failing never stops the
        others (a backing may do them all in one go)."""
        done = {}
        for names, spec in volumes:
            try:
                done[names.volume_id] = self.wipe_key(names, spec)
            except DriverError as exc:
                done[names.volume_id] = Wiped(FAILED, str(exc))
        return done

    def wipe_unrecorded(self, known: set[str]) -> dict[str, Wiped]:
        """Wipe the keys of its objects that no record names (digests not in ``known``),
        keyed by what to call each one; default: it has none that hold a key."""
        del known
        return {}

    @abstractmethod
    def orphans(self, known: set[str]) -> list[Orphan]: ...

    @abstractmethod
    def remove_orphan(self, orphan: Orphan) -> None: ...
