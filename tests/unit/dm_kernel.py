"""A scripted device-mapper control for unit tests: answers the ioctls ``csi.host.dm`` makes
the way ``drivers/md/dm-ioctl.c`` does (header checks, name lookup, table status with targets
after ``data_start`` and ``next`` counted from the first spec, load into an inactive slot,
resume swapping it in), on tables held in a dict. The real kernel is the node tier's."""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

from csi.host import dm


@dataclass
class Device:
    targets: list[tuple[int, int, str]]  # (start, length, type)
    readonly: bool = False
    inactive: list[tuple[int, int, str]] | None = None
    inactive_readonly: bool = False


@dataclass
class DmKernel:
    devices: dict[str, Device] = field(default_factory=dict)
    calls: list[tuple[int, str, int]] = field(default_factory=list)  # (command, name, flags)
    fail: dict[tuple[int, str], int] = field(default_factory=dict)  # (command, name) -> errno

    def add(self, name: str, *kinds: str, sectors: int = 131072, readonly: bool = False) -> None:
        step = sectors // len(kinds)
        self.devices[name] = Device([(i * step, step, k) for i, k in enumerate(kinds)], readonly)

    def kinds(self, name: str) -> list[str]:
        return [t[2] for t in self.devices[name].targets]

    def __call__(self, fd: int, req: int, buffer: bytearray, mutate: bool) -> int:
        assert mutate and isinstance(buffer, bytearray)
        assert req >> 30 == 3 and (req >> 16) & 0x3FFF == dm.HEADER.size  # _IOWR, struct size
        assert (req >> 8) & 0xFF == 0xFD  # DM_IOCTL
        command = req & 0xFF
        fields = list(dm.HEADER.unpack_from(buffer, 0))
        assert fields[0] == 4, "interface major must be 4"
        assert fields[3] == len(buffer) and fields[4] == dm.HEADER.size, fields[3:5]
        name = fields[11].split(b"\0", 1)[0].decode()
        flags = fields[7]
        self.calls.append((command, name, flags))
        if (command, name) in self.fail:
            code = self.fail[(command, name)]
            raise OSError(code, f"{name}: {errno.errorcode[code]}")
        device = self.devices.get(name)
        if device is None:
            raise OSError(errno.ENXIO, "No such device or address")
        if command == dm.TABLE_STATUS_CMD:
            assert not flags & (1 << 4), "DM_STATUS_TABLE_FLAG: that would copy the key out"
            self._status(buffer, fields, device)
        elif command == dm.TABLE_LOAD_CMD:
            device.inactive = self._parse_load(buffer, fields)
            device.inactive_readonly = bool(flags & dm.READONLY_FLAG)
        elif command == dm.DEV_SUSPEND_CMD:
            assert not flags & (1 << 1), "only resume is scripted"
            if device.inactive is not None:
                device.targets, device.inactive = device.inactive, None
                device.readonly = device.inactive_readonly
        elif command == dm.TABLE_CLEAR_CMD:
            device.inactive = None
        else:
            raise OSError(errno.ENOTTY, f"command {command} not scripted")
        return 0

    def _status(self, buffer: bytearray, fields: list[object], device: Device) -> None:
        start = dm.HEADER.size
        offset, out_flags = 0, dm.ACTIVE_PRESENT_FLAG | (dm.READONLY_FLAG if device.readonly else 0)
        for sector, length, kind in device.targets:
            following = offset + dm.SPEC.size + 8  # an empty parameter string, aligned
            if start + following > len(buffer):
                out_flags |= dm.BUFFER_FULL_FLAG
                break
            dm.SPEC.pack_into(buffer, start + offset, sector, length, 0, following, kind.encode())
            offset = following
        fields[5], fields[7] = len(device.targets), out_flags
        dm.HEADER.pack_into(buffer, 0, *fields)

    def _parse_load(self, buffer: bytearray, fields: list[object]) -> list[tuple[int, int, str]]:
        count, offset, end = fields[5], fields[4], fields[3]
        assert isinstance(count, int) and isinstance(offset, int) and isinstance(end, int)
        if count == 0:
            raise OSError(errno.EINVAL, "no targets specified")
        targets = []
        for _ in range(count):
            sector, length, _status, following, kind = dm.SPEC.unpack_from(buffer, offset)
            params = buffer[offset + dm.SPEC.size:end]
            if b"\0" not in params:
                raise OSError(errno.EINVAL, "target parameters not NUL terminated")
            targets.append((sector, length, kind.split(b"\0", 1)[0].decode()))
            offset += following
        return targets
