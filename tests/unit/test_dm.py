"""The device-mapper ioctl layer against the kernel's ABI (``include/uapi/linux/dm-ioctl.h``)
and a scripted control; the node tier runs the same calls on the real kernel."""

from __future__ import annotations

import errno

import pytest

from csi.host import dm
from tests.unit.dm_kernel import DmKernel


def test_layouts_and_request_numbers_are_the_kernels() -> None:
    assert dm.HEADER.size == 312 and dm.SPEC.size == 40  # sizeof(struct dm_ioctl), dm_target_spec
    # DM_DEV_SUSPEND, DM_TABLE_LOAD, DM_TABLE_CLEAR, DM_TABLE_STATUS as strace prints them
    assert [hex(dm.request(c)) for c in (6, 9, 10, 12)] == [
        "0xc138fd06", "0xc138fd09", "0xc138fd0a", "0xc138fd0c"]


def test_a_request_carries_version_sizes_and_the_name() -> None:
    buffer = dm.pack("luks-eph-abc", flags=dm.NOFLUSH_FLAG, size=1024)
    fields = dm.HEADER.unpack_from(buffer, 0)
    assert fields[:3] == (4, 0, 0)
    assert (fields[3], fields[4], fields[7]) == (1024, 312, dm.NOFLUSH_FLAG)
    assert fields[11].rstrip(b"\0") == b"luks-eph-abc" and fields[12].strip(b"\0") == b""


@pytest.mark.parametrize("name", ["", "x" * 128, "a\0b"])
def test_names_the_kernel_would_misread_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="not a device-mapper name"):
        dm.pack(name)


def test_the_error_table_is_one_target_with_an_empty_parameter_string() -> None:
    payload = dm.error_table(2048)
    start, length, status, _next, kind = dm.SPEC.unpack_from(payload, 0)
    assert (start, length, status, kind.rstrip(b"\0")) == (0, 2048, 0, b"error")
    assert payload[dm.SPEC.size:] == b"\0" * 8 and len(payload) % 8 == 0


def test_table_reads_types_lengths_and_read_only_never_parameters() -> None:
    kernel = DmKernel()
    kernel.add("m", "integrity", "crypt", sectors=4096, readonly=True)
    table = dm.DeviceMapper("/dev", kernel).table(-1, "m")
    assert table.kinds == ["integrity", "crypt"] and table.sectors == 4096 and table.readonly
    assert kernel.calls == [(dm.TABLE_STATUS_CMD, "m", 0)]  # no DM_STATUS_TABLE_FLAG: no key


def test_a_table_that_does_not_fit_is_asked_again_with_a_bigger_buffer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dm, "STATUS_BUFFER", dm.HEADER.size + 60)  # room for one target only
    kernel = DmKernel()
    kernel.add("m", "linear", "linear", "error", sectors=300)
    table = dm.DeviceMapper("/dev", kernel).table(-1, "m")
    assert table.kinds == ["linear", "linear", "error"] and table.sectors == 300
    assert len(kernel.calls) == 2


def test_no_such_device_is_enxio() -> None:
    with pytest.raises(OSError) as err:
        dm.DeviceMapper("/dev", DmKernel()).table(-1, "nope")
    assert err.value.errno == 6


def test_an_answer_that_ends_inside_a_target_is_an_os_error_the_wiper_handles() -> None:
    buffer = dm.pack("m", size=dm.HEADER.size + 10)
    fields = list(dm.HEADER.unpack_from(buffer, 0))
    fields[5], fields[7] = 1, dm.ACTIVE_PRESENT_FLAG
    dm.HEADER.pack_into(buffer, 0, *fields)
    with pytest.raises(ValueError, match="ends inside a target"):
        dm.parse_targets(buffer)

    def truncated(fd: int, req: int, answer: bytearray, mutate: bool) -> int:
        answer[: len(buffer)] = buffer
        return 0

    with pytest.raises(OSError, match="ends inside a target") as err:
        dm.DeviceMapper("/dev", truncated).table(-1, "m")
    assert err.value.errno == errno.EPROTO


def test_no_active_table_is_no_targets() -> None:
    buffer = dm.pack("m", size=512)
    assert dm.parse_targets(buffer).targets == ()
