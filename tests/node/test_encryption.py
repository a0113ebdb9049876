"""Ciphertext at rest, and the bytes on disk are exactly AES-XTS of what the pod wrote."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from csi.config import Config
from csi.host.linux import LinuxHost
from csi.journal import Names
from csi.keys import VolumeKey
from csi.params import VolumeSpec
from csi.volumes import PublishRequest, Volumes
from tests.node.conftest import Driver, SmallFs, sh

PATTERN_BLOCK = b"LUKS-EPHEMERAL-PLAINTEXT-PATTERN!" * 124  # 4092 bytes
PATTERN = (PATTERN_BLOCK + b"\n" * 4) * 2048  # 8 MiB, one 4 KiB block repeated
MARKER = b"marker-7f3a9c-this-must-never-reach-the-disk"
LUKS_MAGICS = (b"LUKS\xba\xbe", b"SKUL\xba\xbe")


def write_pattern(target: str) -> None:
    with open(os.path.join(target, "pattern.bin"), "wb") as f:
        f.write(PATTERN)
        f.flush()
        os.fsync(f.fileno())
    with open(os.path.join(target, "marker.txt"), "wb") as f:
        f.write(MARKER)
        os.fsync(f.fileno())
    os.sync()


def read_all(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_backing_file_holds_no_plaintext_and_no_luks_magic(driver: Driver) -> None:
    target = driver.publish("pod-enc", attributes={"size": "64Mi"})
    write_pattern(target)
    names = driver.names("pod-enc")
    disk = read_all(names.backing)
    assert len(disk) == 64 * 1024**2
    assert PATTERN_BLOCK[:64] not in disk
    assert MARKER not in disk
    for magic in LUKS_MAGICS:
        assert magic not in disk, "a detached-header backing file must look like random data"
    # the header lives on tmpfs, and is a real LUKS2 header
    assert read_all(names.header).startswith(b"LUKS\xba\xbe")
    table = sh("dmsetup", "table", names.mapping)
    assert " crypt aes-xts-plain64 " in table
    # reading back through the mapping gives the plaintext: the volume really is encrypted
    assert read_all(os.path.join(target, "marker.txt")) == MARKER
    driver.unpublish("pod-enc")


def test_disk_bytes_are_aes_xts_ciphertext_of_the_pattern(base: Path, data_fs: SmallFs) -> None:
    """In-process lifecycle with a known key: decrypt the file's blocks with `cryptography`."""
    state = Path("/run/lec-inproc")
    kubelet = base / "kubelet-inproc"
    kubelet.mkdir(exist_ok=True)
    config = Config(state_dir=str(state), data_dir=str(data_fs.mountpoint),
                    kubelet_root=str(kubelet), min_size=16 * 1024**2)  # fmt: skip
    passphrase = bytes(range(64))
    seen: list[VolumeKey] = []

    def known_key(size: int) -> VolumeKey:
        key = VolumeKey(bytearray(passphrase[:size]))
        seen.append(key)
        return key

    volumes = Volumes(config, LinuxHost(), key_source=known_key)
    target = str(kubelet / "pods" / "u1" / "volumes" / "kubernetes.io~csi" / "v" / "mount")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    spec = VolumeSpec(size=64 * 1024**2)
    volumes.publish(PublishRequest("inproc-vol", target, spec))
    try:
        assert seen and all(k.wiped for k in seen), "the key buffer must be zeroed after use"
        names = Names.of("inproc-vol", config.data_dir, config.state_dir)
        write_pattern(target)
        dump = sh("cryptsetup", "luksDump", "--dump-volume-key", "--batch-mode", "--key-file=-",
                  "--header", names.header, names.backing, input=passphrase)
        hex_key = "".join(re.findall(r"[0-9a-f]{2}(?=[ \n])", dump.split("MK dump:")[1]))
        volume_key = bytes.fromhex(hex_key)
        assert len(volume_key) == 64
        extents = sh("filefrag", "-v", "-b4096", os.path.join(target, "pattern.bin"))
        physical = [int(m) for m in re.findall(r"^\s*\d+:\s+\d+\.\.\s*\d+:\s+(\d+)\.\.",
                                               extents, re.M)]  # fmt: skip
        assert physical, extents
        disk = read_all(names.backing)
        checked = 0
        for block in physical[:4]:
            offset = block * 4096
            ciphertext = disk[offset : offset + 4096]
            assert ciphertext != PATTERN[:4096]
            # plain64 counts the IV in 512-byte sectors (no iv_large_sectors in the table)
            tweak = (block * 8).to_bytes(16, "little")
            decryptor = Cipher(algorithms.AES(volume_key), modes.XTS(tweak)).decryptor()
            assert decryptor.update(ciphertext) + decryptor.finalize() == PATTERN[:4096]
            checked += 1
        assert checked >= 1
    finally:
        volumes.unpublish("inproc-vol", target)
    assert not os.path.exists(Names.of("inproc-vol", config.data_dir, config.state_dir).backing)


@pytest.mark.parametrize("header", ["attached", "detached"])
def test_header_placement(driver: Driver, header: str) -> None:
    pod = f"pod-hdr-{header}"
    driver.publish(pod, attributes={"size": "32Mi", "header": header})
    names = driver.names(pod)
    starts_with_magic = read_all(names.backing)[:6] == b"LUKS\xba\xbe"
    assert starts_with_magic == (header == "attached")
    assert os.path.exists(names.header) == (header == "detached")
    driver.unpublish(pod)


def test_process_running_as_user_cannot_read_backing_file(driver: Driver) -> None:
    driver.publish("pod-perm", attributes={"size": "32Mi"})
    names = driver.names("pod-perm")
    assert os.stat(names.backing).st_mode & 0o077 == 0
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           "cat", names.backing], capture_output=True, check=False)  # fmt: skip
    assert proc.returncode != 0
    driver.unpublish("pod-perm")


def _forms(secret: bytes) -> list[bytes]:
    import base64

    return [secret, secret.hex().encode(), secret.hex().upper().encode(), base64.b64encode(secret)]


def test_known_key_never_reaches_journal_logs_or_errors(
    base: Path, data_fs: SmallFs, caplog: pytest.LogCaptureFixture
) -> None:
    """In-process lifecycle with a known key: search every place a leak could land."""
    import logging

    from csi.errors import DriverError

    state = Path("/run/lec-inproc-leak")
    kubelet = base / "kubelet-leak"
    kubelet.mkdir(exist_ok=True)
    config = Config(state_dir=str(state), data_dir=str(data_fs.mountpoint),
                    kubelet_root=str(kubelet), min_size=16 * 1024**2)  # fmt: skip
    passphrase = bytes(range(100, 164))

    class BrokenOpen(LinuxHost):
        """Real cryptsetup, pointed at a missing header: a real error message to inspect."""

        def crypt_open(
            self,
            device: str,
            name: str,
            key: VolumeKey,
            header: str | None,
            *,
            keyring: bool = True,
        ) -> None:
            super().crypt_open(device, name, key, "/run/lec-no-such-header", keyring=keyring)

    caplog.set_level(logging.DEBUG)
    target = str(kubelet / "pods" / "u2" / "volumes" / "kubernetes.io~csi" / "v" / "mount")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    known = lambda size: VolumeKey(bytearray(passphrase[:size]))  # noqa: E731
    ok = Volumes(config, LinuxHost(), key_source=known)
    ok.publish(PublishRequest("leak-ok", target, VolumeSpec(size=32 * 1024**2)))
    names = Names.of("leak-ok", config.data_dir, config.state_dir)
    dump = sh("cryptsetup", "luksDump", "--dump-volume-key", "--batch-mode", "--key-file=-",
              "--header", names.header, names.backing, input=passphrase)  # fmt: skip
    volume_key = bytes.fromhex("".join(re.findall(r"[0-9a-f]{2}(?=[ \n])",
                                                  dump.split("MK dump:")[1])))  # fmt: skip
    journal = b"".join(p.read_bytes() for p in (state / "volumes").glob("*.json"))
    assert journal, "the journal should hold a record while published"
    ok.unpublish("leak-ok", target)

    broken = Volumes(config, BrokenOpen(), key_source=known)
    with pytest.raises(DriverError) as err:
        broken.publish(PublishRequest("leak-err", target, VolumeSpec(size=32 * 1024**2)))
    message = str(err.value).encode()
    assert b"cryptsetup" in message  # a real failure message from the real tool
    logs = "\n".join(f"{r.getMessage()} {getattr(r, 'fields', '')} {r.exc_text or ''}"
                     for r in caplog.records).encode()  # fmt: skip
    for secret in (passphrase, volume_key):
        for form in _forms(secret):
            assert form not in journal
            assert form not in message
            assert form not in logs
    assert not (state / "volumes").exists() or not list((state / "volumes").glob("*.json"))
