"""A real gRPC server on a unix socket, backed by the fake host, as kubelet sees it."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from csi.__main__ import build_server
from csi.config import Config
from csi.host.fake import FakeHost
from csi.journal import Names
from csi.keys import KeySource, random_key
from csi.proto import csi_pb2 as pb
from csi.proto import csi_pb2_grpc
from csi.server import Server
from csi.tools.kubelet import InlineVolume, Kubelet, Provisioner, PvcVolume
from csi.volumes import ReconcileReport, StepHook, Volumes


class SimulatedCrash(BaseException):
    """Raised by a crash hook. Not an ``Exception``: the lifecycle must not roll back (SIGKILL)."""


class CrashAfter:
    """An ``after_step`` hook that "kills the process" right after ``step`` completed."""

    def __init__(self, step: str) -> None:
        self.step = step
        self.fired = threading.Event()

    def __call__(self, done: str) -> None:
        if done == self.step:
            self.fired.set()
            raise SimulatedCrash(f"simulated crash after step {done}")


class Harness:
    def __init__(self, mode: str = "node", **overrides: Any) -> None:
        self.dir = tempfile.mkdtemp(prefix="lec-", dir="/tmp")
        self.config = Config(
            mode=mode,
            endpoint=f"unix://{self.dir}/csi.sock",
            node_id=overrides.pop("node_id", "node-1"),
            state_dir=os.path.join(self.dir, "state"),
            data_dir=os.path.join(self.dir, "data"),
            kubelet_root=os.path.join(self.dir, "kubelet"),
            min_size=16 * 1024**2,
            **overrides,
        )
        self.host = FakeHost()
        self.host.dirs.add(self.config.kubelet_root)
        self.key_source: KeySource = random_key
        self.after_step: StepHook | None = None
        self.server: Server | None = None
        self.kubelet: Kubelet | None = None
        self.last_report: ReconcileReport | None = None
        self.start()

    def reconfigure(self, **changes: Any) -> None:
        self.config = dataclasses.replace(self.config, **changes)
        self.restart()

    def start(self) -> None:
        self.volumes = Volumes(self.config, self.host, key_source=self.key_source,
                               after_step=self.after_step)
        self.last_report = self.volumes.reconcile()
        self.server = build_server(self.config, self.volumes)
        self.server.start()
        self.kubelet = Kubelet(self.config.endpoint, self.config.kubelet_root, timeout=30)
        self.kubelet.wait_ready(10)
        channel = self.kubelet.channel
        self.node = self.kubelet.node
        self.identity = self.kubelet.identity
        self.controller = csi_pb2_grpc.ControllerStub(channel)
        self.provisioner = Provisioner(channel, self.config.driver_name, timeout=30)

    def stop(self) -> None:
        if self.kubelet is not None:
            self.kubelet.close()
        if self.server is not None:
            self.server.stop(grace=1)
        self.server = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def publish(self, pod: str = "pod-a", name: str = "scratch", **kwargs: Any) -> Any:
        assert self.kubelet is not None
        return self.kubelet.publish(InlineVolume(pod, name, **kwargs))

    def unpublish(self, pod: str = "pod-a", name: str = "scratch") -> None:
        assert self.kubelet is not None
        self.kubelet.unpublish(pod, name)

    # provisioned volumes --------------------------------------------------------------------
    @property
    def k(self) -> Kubelet:
        assert self.kubelet is not None
        return self.kubelet

    def provision(self, name: str = "pvc-1", size: int = 64 * 1024**2, **kwargs: Any) -> PvcVolume:
        """CreateVolume on this node, as csi-provisioner does for a PVC."""
        return self.provisioner.create(name, self.config.node_id, size, **kwargs)

    def record(self, volume_id: str) -> Any:
        return self.volumes.journal.load(volume_id)

    def journal_files(self) -> list[str]:
        path = os.path.join(self.config.state_dir, "volumes")
        return sorted(os.listdir(path)) if os.path.isdir(path) else []

    def leftovers(self) -> list[str]:
        """Everything a torn-down volume could leave: fake kernel objects and journal files."""
        h = self.host
        return [*h.files, *h.loops, *h.mappings, *h.mounts, *h.luks, *h.exports, *h.nbds,
                *self.journal_files()]  # fmt: skip

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    # crash, reboot and request helpers ----------------------------------------------------
    def volume_id(self, pod: str = "pod-a", name: str = "scratch") -> str:
        return Kubelet.volume_id(pod, name)

    def target(self, pod: str = "pod-a", name: str = "scratch") -> str:
        return os.path.join(self.config.kubelet_root, "pods", pod, "volumes",
                            "kubernetes.io~csi", name, "mount")  # fmt: skip

    def names(self, pod: str = "pod-a", name: str = "scratch") -> Names:
        return Names.of(self.volume_id(pod, name), self.config.data_dir, self.config.state_dir)

    def publish_request(self, pod: str = "pod-a", name: str = "scratch", **kwargs: Any) -> Any:
        """The NodePublishVolumeRequest kubelet would send (its parent dir is created)."""
        assert self.kubelet is not None
        request = self.kubelet.publish_request(InlineVolume(pod, name, **kwargs))
        os.makedirs(os.path.dirname(request.target_path), exist_ok=True)
        return request

    def unpublish_request(self, pod: str = "pod-a", name: str = "scratch") -> Any:
        return pb.NodeUnpublishVolumeRequest(
            volume_id=self.volume_id(pod, name), target_path=self.target(pod, name)
        )

    def crash_after(self, step: str) -> CrashAfter:
        """Install a hook that crashes right after ``step``; restarts so it takes effect."""
        hook = CrashAfter(step)
        self.after_step = hook
        self.restart()
        return hook

    def kill(self) -> None:
        """Stop serving at once, as SIGKILL would: in-flight RPCs see UNAVAILABLE."""
        if self.server is not None:
            self.server.stop(grace=0)
            self.server = None
        if self.kubelet is not None:
            self.kubelet.close()
            self.kubelet = None

    def call_until_crash(
        self, method: Any, request: Any, hook: CrashAfter, wait: float = 10.0
    ) -> grpc.RpcError:
        """Start an RPC; once ``hook`` fired, kill the server; return the error the CO saw."""
        future = method.future(request, timeout=30)
        fired = hook.fired.wait(wait)
        self.kill()
        outcome = future.exception(timeout=wait)
        assert fired, f"step {hook.step} never ran; the RPC ended with {outcome!r}"
        assert isinstance(outcome, grpc.RpcError), f"the RPC did not fail: {outcome!r}"
        return outcome

    def recover(self) -> ReconcileReport:
        """Start again with no crash hook (start-up reconcile runs); return its report."""
        self.stop()
        self.after_step = None
        self.start()
        assert self.last_report is not None
        return self.last_report

    def lose_tmpfs(self) -> None:
        """What a reboot does to the state dir on tmpfs: journal and detached headers are gone."""
        shutil.rmtree(self.config.state_dir, ignore_errors=True)
        prefix = self.config.state_dir.rstrip("/") + "/"
        for path in [p for p in self.host.files if p.startswith(prefix)]:
            del self.host.files[path]
            self.host.luks.pop(path, None)
            self.host.luks_options.pop(path, None)


def code_of(error: BaseException) -> grpc.StatusCode:
    assert isinstance(error, grpc.RpcError), error
    code: grpc.StatusCode = error.code()
    return code


def fails(call: Callable[[], object], code: grpc.StatusCode) -> str:
    """Run ``call``, assert it fails with ``code``, return the error's details."""
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert code_of(err.value) == code, err.value.details()
    return str(err.value.details())
