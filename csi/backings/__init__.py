"""Backings: where a volume's bytes live and how they are prepared for a pod.

A backing is one module implementing ``Backing``; ``REGISTRY`` below lists them. Everything that
depends on the kind of backing asks the registry: the ``backing`` parameter's allowed values and
default (``csi.params``), the metric labels (``csi.metrics``), the chart schema's enum (checked by
a test), what a volume charges against the node's capacity, why a volume can never grow, and
the start-up sweep for orphans. Nothing outside the backing modules switches on a backing name.

Adding a backing: one module here with a class implementing ``Backing``, one line in
``REGISTRY``, the host protocol it needs (``csi.host``) with its fake, and its tests.

What each method promises:

* ``unavailable()``: why this node cannot make such volumes now (``None``: it can); asked before
  anything is reserved or made.
* ``disk_bytes(spec)`` / ``largest_fitting(room, spec)``: the most the volume can ever take on the
  node's disk, and its inverse (the biggest size whose charge fits in ``room``).
* ``fixed_reason(spec)``: a short word if volumes of this shape can never grow (it goes into the
  volume id, so the controller can refuse an expansion without asking the node), else "".
* ``prepare(names, spec, keyring=...)``: create, attach, format with a fresh key and open: each step
  only if not done yet, so a retry after a crash finishes the job; returns what the pod gets (a
  device path here; a directory for a directory backing).
* ``find(names)``: that same device if it is prepared now (after a restart), else ``None``.
* ``attached(names)``: the backing's own device (a loop or NBD device) if it has one now.
* ``health(names, spec)``: what is wrong with a prepared volume, in words ([] when healthy).
* ``in_use(names, ignore)`` / ``check_releasable``: who holds the volume, from the kernel (open
  counts, holders, every mount by device number), leaving out a mount at ``ignore`` (the primary
  path the lifecycle is about to unexpose): asked before anything is undone.
* ``before_release(names)``: what must happen first for "in use" to be answerable (qcow2: drop
  an NBD device whose export died, or unmount would hang).
* ``grow(names, spec, size)``: make the prepared volume ``size`` bytes, or raise InvalidArgument
  saying why it cannot; ``grow_filesystem`` then makes its mounted filesystem use it.
* ``release(names)``: close (wiping the key from the kernel), detach and delete; polite: refuses
  with Busy, changing nothing, while anything holds the volume. True if a backing file existed
  (its data is now crypto-shredded).
* ``wipe_key(names, spec)`` / ``wipe_keys`` / ``wipe_unrecorded(known)``: forced: the key leaves
  the kernel now, even while the volume is in use (the emergency shred); says what it achieved
  (``Wiped``: wiped, no_key, incomplete, in_guest). LUKS: the table becomes an error target, I/O
  fails with EIO; fscrypt: the key is removed for all users, files still open keep theirs.
* ``orphans(known)``: its objects that no record accounts for (digests not in ``known``), each
  removable with ``remove_orphan``, which refuses (Busy) while the object is in use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from csi.backings.base import Backing, Context, Orphan
from csi.backings.fscrypt import FscryptBacking
from csi.backings.loop import LoopBacking
from csi.backings.qcow2 import Qcow2Backing
from csi.backings.raw import RawFileBacking

# name -> class; the first is the default of the ``backing`` parameter
REGISTRY: dict[str, type[Backing]] = {
    LoopBacking.name: LoopBacking,
    Qcow2Backing.name: Qcow2Backing,
    FscryptBacking.name: FscryptBacking,
}
DEFAULT = next(iter(REGISTRY))

if TYPE_CHECKING:
    from csi.params import VolumeSpec

__all__ = ["DEFAULT", "REGISTRY", "Backing", "Context", "Orphan", "build", "fixed_reasons",
           "instance_name", "kind", "names"]  # fmt: skip


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def kind(name: str) -> type[Backing]:
    """The class of backing ``name`` (the parameter was validated against ``names()``)."""
    return REGISTRY[name]


def instance_name(spec: VolumeSpec) -> str:
    """Which of ``build``'s instances serves a volume: its backing's, or, for a disk a Kata VM
    formats itself (kata=guest), the raw file's."""
    return RawFileBacking.name if spec.kata == "guest" else spec.backing


def fixed_reasons() -> dict[str, str]:
    """Every word a volume id may carry for a shape that can never grow, with its reason."""
    reasons: dict[str, str] = {}
    for cls in REGISTRY.values():
        reasons.update(cls.FIXED_REASONS)
    return reasons


def build(context: Context) -> dict[str, Backing]:
    """One instance of every backing for this node, and of the raw Kata disk."""
    every = {name: cls(context) for name, cls in REGISTRY.items()}
    every[RawFileBacking.name] = RawFileBacking(context)
    return every
