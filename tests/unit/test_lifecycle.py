"""The lifecycle: busy volumes, idempotent steps, key handling, concurrency and per-volume locks."""

from __future__ import annotations

import base64
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from csi.errors import Aborted, AlreadyExists, FailedPrecondition, Internal
from csi.host import LuksFormat
from csi.host.fake import FakeFile
from csi.journal import PUBLISHED, Record
from csi.keys import PASSPHRASE_BYTES, VolumeKey, random_key
from csi.params import VolumeSpec
from csi.volumes import PublishRequest, Volumes
from tests.unit.harness import Harness, code_of

MiB = 1024**2
SIZE = {"size": "64Mi"}
MUTATING = (
    "create_backing", "loop_attach", "luks_format", "crypt_open", "mkfs", "mount",
    "set_volume_root", "umount", "crypt_close", "loop_detach", "remove_file",
)  # fmt: skip


def count(calls: list[str], step: str) -> int:
    return sum(1 for c in calls if c.split(" ", 1)[0] == step)


def request_for(harness: Harness, pod: str = "pod-a") -> PublishRequest:
    return PublishRequest(
        volume_id=harness.volume_id(pod),
        target_path=harness.target(pod),
        spec=VolumeSpec(size=64 * MiB),
        pod={"name": pod, "namespace": "default"},
    )


class RecordingKeys:
    """A key source that hands out real random keys and remembers them (and their bytes)."""

    def __init__(self) -> None:
        self.keys: list[VolumeKey] = []
        self.secrets: list[bytes] = []

    def __call__(self, size: int) -> VolumeKey:
        key = random_key(size)
        self.keys.append(key)
        self.secrets.append(bytes(key.view))
        return key

    def forms(self) -> list[bytes]:
        """Every way a key could plausibly be written down: raw, hex, base64, repr."""
        out: list[bytes] = []
        for secret in self.secrets:
            out += [secret, secret.hex().encode(), base64.b64encode(secret),
                    repr(secret).encode()]  # fmt: skip
        return out


@pytest.fixture
def keys(harness: Harness) -> RecordingKeys:
    recorder = RecordingKeys()
    harness.key_source = recorder
    harness.restart()
    return recorder


# busy volumes ------------------------------------------------------------------------------
def test_busy_volume_stays_until_it_is_released(harness: Harness) -> None:
    request = harness.publish(attributes=SIZE)
    names = harness.names()
    target = request.target_path
    harness.host.busy.add(target)

    with pytest.raises(grpc.RpcError) as err:
        harness.unpublish()
    assert code_of(err.value) == grpc.StatusCode.FAILED_PRECONDITION
    assert "busy" in str(err.value.details())
    host = harness.host
    assert host.mount_source(target) == names.mapper_device
    assert names.mapping in host.mappings
    assert host.loop_find(names.backing) is not None
    assert names.backing in host.files
    assert names.header in host.files
    assert harness.journal_files() == [f"{names.digest}.json"]
    assert count(host.calls, "crypt_close") == 0  # never close a mapping that is mounted
    record = harness.volumes.journal.load(request.volume_id)
    assert record is not None and record.state == PUBLISHED

    host.busy.discard(target)
    harness.unpublish()
    assert harness.leftovers() == []
    assert target not in host.dirs


def test_mapping_mounted_elsewhere_is_not_closed(harness: Harness) -> None:
    """A bind mount of the mapping somewhere else keeps it open: FAILED_PRECONDITION."""
    harness.publish(attributes=SIZE)
    names = harness.names()
    elsewhere = os.path.join(harness.config.kubelet_root, "elsewhere")
    harness.host.dirs.add(elsewhere)
    harness.host.mount(names.mapper_device, elsewhere, "ext4", ["rw"])
    with pytest.raises(grpc.RpcError) as err:
        harness.unpublish()
    assert code_of(err.value) == grpc.StatusCode.FAILED_PRECONDITION
    assert elsewhere in str(err.value.details())
    assert names.mapping in harness.host.mappings
    assert harness.journal_files() == [f"{names.digest}.json"]
    harness.host.umount(elsewhere)
    harness.unpublish()
    assert harness.leftovers() == []


# idempotency -------------------------------------------------------------------------------
def test_publish_twice_does_nothing_the_second_time(harness: Harness) -> None:
    harness.publish(attributes=SIZE)
    first = list(harness.host.calls)
    for step in ("create_backing", "loop_attach", "luks_format", "crypt_open", "mkfs", "mount"):
        assert count(first, step) == 1, step
    harness.host.calls.clear()
    harness.publish(attributes=SIZE)
    assert [c for c in harness.host.calls if c.split(" ", 1)[0] in MUTATING] == []
    assert len(harness.host.mappings) == 1
    assert len(harness.host.loops) == 1
    assert len(harness.journal_files()) == 1


def test_publish_twice_directly(harness: Harness) -> None:
    request = request_for(harness)
    harness.volumes.publish(request)
    harness.host.calls.clear()
    harness.volumes.publish(request)
    assert count(harness.host.calls, "luks_format") == 0
    assert count(harness.host.calls, "mkfs") == 0
    assert count(harness.host.calls, "mount") == 0


def test_republish_with_other_parameters_is_already_exists(harness: Harness) -> None:
    harness.publish(attributes=SIZE)
    with pytest.raises(grpc.RpcError) as err:
        harness.publish(attributes={"size": "128Mi"})
    assert code_of(err.value) == grpc.StatusCode.ALREADY_EXISTS
    other = request_for(harness)
    other = PublishRequest(other.volume_id, harness.target("pod-z"), other.spec)
    with pytest.raises(AlreadyExists):
        harness.volumes.publish(other)
    harness.unpublish()
    assert harness.leftovers() == []


def test_republish_after_mount_vanished_remounts_without_format(harness: Harness) -> None:
    request = request_for(harness)
    harness.volumes.publish(request)
    names = harness.names()
    del harness.host.mounts[request.target_path]
    harness.host.calls.clear()

    harness.volumes.publish(request)
    calls = harness.host.calls
    assert count(calls, "luks_format") == 0
    assert count(calls, "crypt_open") == 0
    assert count(calls, "mkfs") == 0
    assert count(calls, "mount") == 1
    assert harness.host.mount_source(request.target_path) == names.mapper_device
    assert {"nosuid", "nodev", "rw"} <= set(harness.host.mounts[request.target_path].options)
    health = harness.volumes.stats(request.volume_id, request.target_path).health
    assert health.abnormal is False


def test_republish_after_mapping_vanished_is_failed_precondition(harness: Harness) -> None:
    harness.publish(attributes=SIZE)
    names = harness.names()
    del harness.host.mounts[harness.target()]
    del harness.host.mappings[names.mapping]
    harness.host.calls.clear()
    with pytest.raises(grpc.RpcError) as err:
        harness.publish(attributes=SIZE)
    assert code_of(err.value) == grpc.StatusCode.FAILED_PRECONDITION
    assert "lost its key" in str(err.value.details())
    assert count(harness.host.calls, "luks_format") == 0
    assert count(harness.host.calls, "mkfs") == 0
    assert harness.target() not in harness.host.mounts
    with pytest.raises(FailedPrecondition):
        harness.volumes.publish(request_for(harness))
    harness.unpublish()
    assert harness.leftovers() == []


def test_unpublish_twice_and_unpublish_unknown_are_ok(harness: Harness) -> None:
    harness.publish(attributes=SIZE)
    harness.unpublish()
    harness.unpublish()
    harness.unpublish(pod="never-published")
    assert harness.leftovers() == []
    assert count(harness.host.calls, "umount") == 1


def test_reserve_reuses_existing_backing_and_loop(harness: Harness) -> None:
    """create_backing and attach check "already done?" first."""
    names = harness.names()
    harness.host.files[names.backing] = FakeFile(64 * MiB, 0)
    harness.host.loops["/dev/loop9"] = names.backing
    harness.volumes.publish(request_for(harness))
    assert count(harness.host.calls, "create_backing") == 0
    assert count(harness.host.calls, "loop_attach") == 0
    assert list(harness.host.loops) == ["/dev/loop9"]
    assert harness.host.mappings[names.mapping] == "/dev/loop9"


# the key -----------------------------------------------------------------------------------
def test_format_and_open_get_the_same_key_which_is_wiped_after(
    harness: Harness, keys: RecordingKeys, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[str, VolumeKey, bytes]] = []
    host = harness.host
    real_format, real_open = host.luks_format, host.crypt_open

    def luks_format(device: str, key: VolumeKey, options: LuksFormat) -> None:
        seen.append(("format", key, bytes(key.view)))
        real_format(device, key, options)

    def crypt_open(
        device: str, name: str, key: VolumeKey, header: str | None, *, keyring: bool = True
    ) -> None:
        seen.append(("open", key, bytes(key.view)))
        real_open(device, name, key, header, keyring=keyring)

    monkeypatch.setattr(host, "luks_format", luks_format)
    monkeypatch.setattr(host, "crypt_open", crypt_open)

    harness.publish(attributes=SIZE)
    assert [s[0] for s in seen] == ["format", "open"]
    assert len(keys.keys) == 1
    key = keys.keys[0]
    assert seen[0][1] is key and seen[1][1] is key
    assert seen[0][2] == seen[1][2] == keys.secrets[0]
    assert len(keys.secrets[0]) == PASSPHRASE_BYTES
    assert any(keys.secrets[0])
    assert key.wiped
    with pytest.raises(ValueError):
        _ = key.view
    harness.unpublish()
    assert harness.leftovers() == []


def test_every_volume_gets_a_fresh_key(harness: Harness, keys: RecordingKeys) -> None:
    for pod in ("pod-a", "pod-b", "pod-c"):
        harness.publish(pod=pod, attributes=SIZE)
    assert len(keys.secrets) == 3
    assert len(set(keys.secrets)) == 3
    assert len(set(harness.host.luks.values())) == 3
    assert all(k.wiped for k in keys.keys)


@pytest.mark.parametrize("step", ["luks_format", "crypt_open"])
def test_key_is_wiped_when_format_or_open_fails(
    harness: Harness, keys: RecordingKeys, step: str
) -> None:
    harness.host.fail(step)
    with pytest.raises(grpc.RpcError) as err:
        harness.publish(attributes=SIZE)
    assert code_of(err.value) == grpc.StatusCode.INTERNAL
    assert len(keys.keys) == 1
    assert keys.keys[0].wiped
    assert harness.leftovers() == []


def test_key_is_wiped_when_open_raises_something_unexpected(
    harness: Harness, keys: RecordingKeys
) -> None:
    harness.host.fail("crypt_open", RuntimeError("kernel said no"))
    with pytest.raises(grpc.RpcError) as err:
        harness.publish(attributes=SIZE)
    assert code_of(err.value) == grpc.StatusCode.INTERNAL
    assert keys.keys[0].wiped
    assert harness.leftovers() == []


def _journal_snapshot(harness: Harness) -> bytes:
    directory = os.path.join(harness.config.state_dir, "volumes")
    data = b""
    for name in sorted(os.listdir(directory)):
        try:
            with open(os.path.join(directory, name), "rb") as f:
                data += name.encode() + b"\n" + f.read() + b"\n"
        except FileNotFoundError:  # replaced while we looked
            continue
    return data


def test_key_never_in_journal_calls_or_errors(harness: Harness, keys: RecordingKeys) -> None:
    snapshots: list[bytes] = []
    harness.after_step = lambda step: snapshots.append(_journal_snapshot(harness))
    harness.restart()

    harness.publish(attributes=SIZE)
    errors: list[str] = []
    for step in ("luks_format", "crypt_open", "mkfs", "mount", "set_volume_root"):
        harness.host.fail(step)
        with pytest.raises(grpc.RpcError) as err:
            harness.publish(pod=f"pod-{step.replace('_', '-')}", attributes=SIZE)
        errors.append(str(err.value.details()))
        errors.append(str(err.value))
    harness.host.fail("crypt_open", Internal("cannot open"))
    with pytest.raises(Internal) as direct:
        harness.volumes.publish(request_for(harness, pod="pod-direct"))
    errors.append(str(direct.value))
    harness.unpublish()

    assert len(keys.secrets) == 7
    assert len(snapshots) > 20
    assert any(PUBLISHED.encode() in s for s in snapshots)
    journal = b"".join(snapshots)
    calls = "\n".join(harness.host.calls)
    for form in keys.forms():
        assert form not in journal
        text = form.decode("latin-1")
        assert text not in calls
        for message in errors:
            assert text not in message
    assert all(k.wiped for k in keys.keys)
    assert harness.leftovers() == []


def test_key_is_not_in_argv_of_host_calls_even_partly(
    harness: Harness, keys: RecordingKeys
) -> None:
    harness.publish(attributes=SIZE)
    secret = keys.secrets[0]
    calls = "\n".join(harness.host.calls)
    for i in range(0, len(secret) - 8, 8):  # any 8-byte window, as hex
        assert secret[i : i + 8].hex() not in calls


# concurrency -------------------------------------------------------------------------------
def _run_all(jobs: list[Callable[[], None]]) -> list[BaseException | None]:
    barrier = threading.Barrier(len(jobs))

    def run(job: Callable[[], None]) -> BaseException | None:
        barrier.wait(10)
        try:
            job()
        except BaseException as exc:  # collected, asserted by the caller
            return exc
        return None

    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(run, jobs))


PODS = [f"pod-{i:02d}" for i in range(16)]


def _publish(harness: Harness, pod: str) -> Callable[[], None]:
    return lambda: harness.publish(pod=pod, attributes=SIZE)


def _unpublish(harness: Harness, pod: str) -> Callable[[], None]:
    return lambda: harness.unpublish(pod=pod)


def assert_sixteen_distinct_volumes(harness: Harness) -> None:
    host = harness.host
    assert len(set(host.mappings)) == 16
    assert len(set(host.mappings.values())) == 16  # each on its own loop device
    assert len(host.loops) == 16
    assert sorted(host.loops.values()) == sorted(harness.names(p).backing for p in PODS)
    assert len([p for p in host.files if p.endswith(".img")]) == 16
    assert sorted(host.mounts) == sorted(harness.target(p) for p in PODS)
    assert {m.source for m in host.mounts.values()} == {harness.names(p).mapper_device
                                                          for p in PODS}  # fmt: skip
    assert len(harness.journal_files()) == 16
    assert len(set(host.luks.values())) == 16  # sixteen different keys


class RecordWriteRace:
    """Makes one interleaving certain instead of likely: the first write of a *published*
    record pauses inside its fsync (a slow state dir) until another volume's publish has
    listed the journal; the second half of the publishes only starts once that write began."""

    def __init__(self, harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
        self.writing = threading.Event()
        self.listings = 0
        self.cond = threading.Condition()
        self.paused = False
        journal = harness.volumes.journal
        real_all, real_fsync = journal.all, os.fsync

        def all_records() -> list[Record]:
            records = real_all()
            with self.cond:
                self.listings += 1
                self.cond.notify_all()
            return records

        def fsync(fd: int) -> None:
            if self._first_published_tmp(fd):
                with self.cond:
                    seen = self.listings
                    self.writing.set()
                    self.cond.wait_for(lambda: self.listings > seen, timeout=5)
            real_fsync(fd)

        monkeypatch.setattr(journal, "all", all_records)
        monkeypatch.setattr(os, "fsync", fsync)

    def _first_published_tmp(self, fd: int) -> bool:
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
            if self.paused or ".tmp." not in path:
                return False
            with open(path, "rb") as f:
                published = b'"state": "published"' in f.read()
        except OSError:
            return False
        self.paused = self.paused or published
        return published

    def gated(self, job: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            assert self.writing.wait(5), "no published record was written"
            job()

        return run


def test_sixteen_concurrent_publishes(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    race = RecordWriteRace(harness, monkeypatch)
    jobs = [_publish(harness, p) for p in PODS[:8]]
    jobs += [race.gated(_publish(harness, p)) for p in PODS[8:]]
    assert _run_all(jobs) == [None] * 16
    assert_sixteen_distinct_volumes(harness)
    assert _run_all([_unpublish(harness, p) for p in PODS]) == [None] * 16
    assert harness.leftovers() == []


def test_sixteen_concurrent_publishes_with_kubelet_retries(harness: Harness) -> None:
    """All at once, retrying what failed as kubelet does: sixteen distinct volumes, then none.

    """
    errors = _run_all([_publish(harness, p) for p in PODS])
    for pod, error in zip(PODS, errors, strict=True):
        if error is not None:
            assert code_of(error) == grpc.StatusCode.INTERNAL, error
            harness.publish(pod=pod, attributes=SIZE)
    assert_sixteen_distinct_volumes(harness)
    for pod in PODS:
        record = harness.volumes.journal.load(harness.volume_id(pod))
        assert record is not None and record.state == PUBLISHED

    assert _run_all([_unpublish(harness, p) for p in PODS]) == [None] * 16
    assert harness.leftovers() == []


def test_publish_finishing_while_another_starts(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    volumes = harness.volumes
    real_fsync = os.fsync
    started: list[BaseException | None] = []

    def fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if not started and ".tmp." in path:
            with open(path, "rb") as f:
                if b'"state": "published"' in f.read():
                    started.append(None)  # pod-a writes its final record: pod-b arrives
                    other = threading.Thread(
                        target=lambda: volumes.publish(request_for(harness, pod="pod-b"))
                    )
                    other.start()
                    other.join(10)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    volumes.publish(request_for(harness, pod="pod-a"))
    assert started == [None]
    for pod in ("pod-a", "pod-b"):
        record = volumes.journal.load(harness.volume_id(pod))
        assert record is not None and record.state == PUBLISHED


@pytest.fixture
def volumes(harness: Harness) -> Iterator[Volumes]:
    yield harness.volumes


def test_a_held_volume_lock_does_not_block_other_volumes(
    harness: Harness, volumes: Volumes
) -> None:
    with volumes.locks.hold(harness.volume_id("pod-a")):
        harness.publish(pod="pod-b", attributes=SIZE)  # through gRPC: not blocked
        volumes.publish(request_for(harness, pod="pod-c"))  # and directly
        with pytest.raises(grpc.RpcError) as err:
            harness.publish(pod="pod-a", attributes=SIZE)
        assert code_of(err.value) == grpc.StatusCode.ABORTED
        with pytest.raises(grpc.RpcError) as err:
            harness.unpublish(pod="pod-a")
        assert code_of(err.value) == grpc.StatusCode.ABORTED
        with pytest.raises(Aborted):
            volumes.publish(request_for(harness, pod="pod-a"))
        assert harness.names("pod-a").mapping not in harness.host.mappings
    assert harness.names("pod-b").mapping in harness.host.mappings
    assert harness.names("pod-c").mapping in harness.host.mappings
    harness.publish(pod="pod-a", attributes=SIZE)  # released: works now
    for pod in ("pod-a", "pod-b", "pod-c"):
        harness.unpublish(pod=pod)
    assert harness.leftovers() == []


def test_lock_is_released_after_a_failed_publish(harness: Harness, volumes: Volumes) -> None:
    harness.host.fail("mkfs")
    with pytest.raises(Internal):
        volumes.publish(request_for(harness))
    volumes.publish(request_for(harness))  # no ABORTED: the lock was released
    volumes.unpublish(harness.volume_id(), harness.target())
    assert harness.leftovers() == []
