"""A real gRPC server on a unix socket, backed by the fake host, as kubelet sees it."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from typing import Any

import grpc

from csi.__main__ import build_server
from csi.config import Config
from csi.host.fake import FakeHost
from csi.keys import KeySource, random_key
from csi.proto import csi_pb2_grpc
from csi.server import Server
from csi.tools.kubelet import InlineVolume, Kubelet
from csi.volumes import ReconcileReport, StepHook, Volumes


class Harness:
    def __init__(self, mode: str = "node", **overrides: Any) -> None:
        self.dir = tempfile.mkdtemp(prefix="lec-", dir="/tmp")
        self.config = Config(
            mode=mode,
            endpoint=f"unix://{self.dir}/csi.sock",
            node_id="node-1",
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

    def journal_files(self) -> list[str]:
        path = os.path.join(self.config.state_dir, "volumes")
        return sorted(os.listdir(path)) if os.path.isdir(path) else []

    def leftovers(self) -> list[str]:
        """Everything a torn-down volume could leave: fake kernel objects and journal files."""
        h = self.host
        return [*h.files, *h.loops, *h.mappings, *h.mounts, *h.luks, *self.journal_files()]

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def code_of(error: BaseException) -> grpc.StatusCode:
    assert isinstance(error, grpc.RpcError), error
    code: grpc.StatusCode = error.code()
    return code
