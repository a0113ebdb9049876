"""Exposures over the fake host: what each one mounts, and that "exposed here?" is decided by
the mapping's device (the fake's model of the kernel's device numbers), not by a path."""

from __future__ import annotations

import pytest

from csi.errors import Internal
from csi.exposures import BindDevice, BindDirectory, MountFilesystem, Unrecorded
from csi.host.fake import FakeHost, FakeMount
from csi.journal import Names

NAMES = Names.of("csi-vol-1", "/data", "/state")
OTHER = Names.of("csi-vol-2", "/data", "/state")


def _opened(host: FakeHost, names: Names) -> None:
    host.mappings[names.mapping] = "/dev/loop0"
    host.filesystems[names.mapper_device] = "ext4"


@pytest.fixture
def host() -> FakeHost:
    host = FakeHost()
    _opened(host, NAMES)
    return host


def test_a_writable_filesystem_gets_nosuid_nodev_its_flags_and_its_root_fixed(
    host: FakeHost,
) -> None:
    exposure = MountFilesystem(host, "ext4", ("noatime", "rw"), readonly=False, group="2000")
    exposure.expose(NAMES, NAMES.mapper_device, "/kubelet/pods/a/vol")
    mount = host.mounts["/kubelet/pods/a/vol"]
    assert (mount.source, mount.options) == (NAMES.mapper_device, ["rw", "nosuid", "nodev",
                                                                   "noatime"])  # fmt: skip
    assert host.calls[-1] == "set_volume_root /kubelet/pods/a/vol"  # after the mount
    assert exposure.is_exposed(NAMES, "/kubelet/pods/a/vol")


def test_a_readonly_filesystem_is_mounted_ro_and_its_root_is_left_alone(host: FakeHost) -> None:
    MountFilesystem(host, "ext4", (), readonly=True, group="").expose(
        NAMES, NAMES.mapper_device, "/kubelet/pods/a/vol")
    assert host.mounts["/kubelet/pods/a/vol"].options == ["ro", "nosuid", "nodev"]
    assert not any(c.startswith("set_volume_root") for c in host.calls)


def test_another_volumes_mount_is_not_exposed_and_is_never_unmounted(host: FakeHost) -> None:
    _opened(host, OTHER)
    host.dirs.add("/kubelet/pods/a/vol")
    host.mounts["/kubelet/pods/a/vol"] = FakeMount(OTHER.mapper_device, "ext4", ["rw"])
    exposure = MountFilesystem(host, "ext4", (), readonly=False, group="")
    assert not exposure.is_exposed(NAMES, "/kubelet/pods/a/vol")
    assert exposure.unexpose(NAMES, "/kubelet/pods/a/vol") is False
    assert "/kubelet/pods/a/vol" in host.mounts
    assert not exposure.is_exposed(NAMES, "")  # no path: nothing is exposed


def test_a_bound_directory_shows_the_staged_filesystem(host: FakeHost) -> None:
    MountFilesystem(host, "ext4", (), readonly=False, group="").expose(
        NAMES, NAMES.mapper_device, "/kubelet/staging/v")
    bind = BindDirectory(host, ["ro", "nosuid", "nodev"])
    bind.expose(NAMES, "/kubelet/staging/v", "/kubelet/pods/a/vol")
    assert bind.is_exposed(NAMES, "/kubelet/pods/a/vol")
    assert bind.unexpose(NAMES, "/kubelet/pods/a/vol") is True
    assert "/kubelet/pods/a/vol" not in host.mounts
    assert "/kubelet/staging/v" in host.mounts  # only its own mount


def test_a_device_bind_is_recognised_by_its_device_and_released_after_the_mapping(
    host: FakeHost,
) -> None:
    bind = BindDevice(host, ["rw", "nosuid"])
    bind.expose(NAMES, NAMES.mapper_device, "/kubelet/pods/a/dev")
    assert bind.is_exposed(NAMES, "/kubelet/pods/a/dev")
    assert not bind.is_exposed(OTHER, "/kubelet/pods/a/dev")
    assert bind.stats(NAMES, "/kubelet/pods/a/dev") is None  # a device has no fs usage
    del host.mappings[NAMES.mapping]  # the mapping is gone: the device number says nothing now
    assert not bind.is_exposed(NAMES, "/kubelet/pods/a/dev")
    assert bind.unexpose(NAMES, "/kubelet/pods/a/dev") is True  # a recorded target's bind is ours
    bind.remove("/kubelet/pods/a/dev")
    assert "/kubelet/pods/a/dev" not in host.mounts and "/kubelet/pods/a/dev" not in host.files


def test_a_volume_without_record_can_be_found_and_unmounted_but_never_exposed(
    host: FakeHost,
) -> None:
    MountFilesystem(host, "ext4", (), readonly=False, group="").expose(
        NAMES, NAMES.mapper_device, "/kubelet/pods/a/vol")
    unknown = Unrecorded(host)
    assert unknown.is_exposed(NAMES, "/kubelet/pods/a/vol")
    assert unknown.unexpose(NAMES, "/kubelet/pods/a/vol") is True
    with pytest.raises(Internal):
        unknown.expose(NAMES, NAMES.mapper_device, "/kubelet/pods/a/vol")
