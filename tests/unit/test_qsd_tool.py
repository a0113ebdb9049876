"""csi.tools.qsd starts a real qemu-storage-daemon as its own daemon and stops it again."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from csi.tools.qsd import QemuStorageDaemon, main

NO_QSD = shutil.which("qemu-storage-daemon") is None


@pytest.mark.skipif(NO_QSD, reason="no qemu-storage-daemon (Debian: qemu-system-common)")
def test_start_serves_qmp_then_stop_ends_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "qsd"
    assert main(["start", str(directory)]) == 0
    assert capsys.readouterr().out.strip() == str(directory / "qmp.sock")
    daemon = QemuStorageDaemon(directory)
    pid = daemon.pid()
    try:
        assert pid is not None and os.path.exists(f"/proc/{pid}")
        assert daemon.exports() == [] and daemon.nodes() == []
    finally:
        assert main(["stop", str(directory)]) == 0
    assert not os.path.exists(f"/proc/{pid}")
    assert not directory.exists()
