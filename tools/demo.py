"""`make demo`: run the driver, publish a real encrypted 1 GiB volume as kubelet would, and
show the evidence: ciphertext on disk, a dm-crypt mapping, and nothing left afterwards.

Needs root and a kernel with device-mapper; `make demo` boots a VM when this kernel lacks it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from csi.tools.driver import Driver, DriverFailed

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
SECRET = b"TOP-SECRET plaintext written by the pod: launch codes 0000\n"


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def run(*argv: str, show: bool = True, check: bool = True) -> str:
    if show:
        print(f"$ {' '.join(argv)}", flush=True)
    proc = subprocess.run(list(argv), capture_output=True, text=True, check=False, cwd=REPO)
    out = redact(proc.stdout + proc.stderr)
    if show and out.strip():
        print(out.rstrip(), flush=True)
    if check and proc.returncode != 0:
        raise SystemExit(f"demo: {argv[0]} failed with exit {proc.returncode}")
    return out


def redact(text: str) -> str:
    """Never print anything key-like, even from tools we only show."""
    return re.sub(r"(?<![0-9a-f-])[0-9a-f]{64,}", "<redacted>", text)


def main() -> int:
    base = Path(tempfile.mkdtemp(prefix="lec-demo-", dir="/tmp"))
    run_dir = Path(tempfile.mkdtemp(prefix="lec-demo-", dir="/run"))
    disk, data, kubelet = base / "node-disk.img", base / "data", base / "kubelet"
    endpoint = f"unix://{run_dir}/csi.sock"  # the one Driver below listens on
    common = ["--state-dir", str(run_dir / "state"), "--data-dir", str(data)]
    client = [PY, "-m", "csi.tools.kubelet", "--endpoint", endpoint, "--kubelet-root",
              str(kubelet)]  # fmt: skip
    pod = ["--pod-uid", "0b5c2f6e-demo-4d6b-9f1e-7c2a", "--volume", "scratch"]
    driver: Driver | None = None
    try:
        step("a node disk for backing files (an ext4 filesystem on a sparse image)")
        data.mkdir()
        run("truncate", "-s", "4G", str(disk))
        run("mkfs.ext4", "-q", "-F", str(disk))
        run("mount", "-o", "loop", str(disk), str(data))

        step("start the driver (node plugin) on a unix socket")
        driver = Driver(
            run_dir=run_dir, state_dir=run_dir / "state", data_dir=data, kubelet_root=kubelet,
            log_path=base / "driver.log", node_id="demo-node",
        )  # fmt: skip
        try:
            driver.start()
        except DriverFailed:
            print(driver.log())
            raise SystemExit("demo: driver did not start") from None
        run(*client, "probe")

        step("kubelet publishes a 1 GiB inline ephemeral volume for a pod")
        started = time.monotonic()
        out = run(*client, "publish", *pod, "--attr", "size=1Gi")
        print(f"(publish took {time.monotonic() - started:.1f} s)")
        target = Path(json.loads(out)["target_path"])
        run(PY, "-m", "csi", "volumes", *common)

        step("the pod writes a secret; the mapping is dm-crypt with AES-XTS")
        (target / "secret.txt").write_bytes(SECRET * 1000)
        os.sync()
        run("findmnt", "-no", "SOURCE,FSTYPE,OPTIONS", str(target))
        mapping = next(line.split()[0] for line in run("dmsetup", "ls", show=False).splitlines()
                       if line.startswith("luks-eph-"))  # fmt: skip
        run("dmsetup", "table", mapping)
        run("cryptsetup", "status", mapping)

        step("the backing file on the node's disk holds only ciphertext")
        backing = next(data.glob("*.img"))
        blob = backing.read_bytes()
        print(f"backing file {backing.name}: {len(blob) >> 20} MiB apparent, "
              f"{os.stat(backing).st_blocks * 512 >> 20} MiB allocated (sparse)")
        print(f"plaintext found in backing file: {'YES' if SECRET[:20] in blob else 'no'}")
        magic = b"LUKS\xba\xbe" in blob
        print(f"LUKS header magic in backing file: {'YES' if magic else 'no'} "
              "(the header is detached, on tmpfs)")  # fmt: skip
        print(f"read back through the mapping: {(target / 'secret.txt').read_bytes()[:24]!r}")
        run(*client, "stats", *pod)

        step("kubelet unpublishes: unmount, close (key wiped), detach, delete")
        run(*client, "unpublish", *pod)
        run(PY, "-m", "csi", "volumes", *common)
        mappings = [m for m in run("dmsetup", "ls", show=False).split() if m.startswith("luks")]
        loops = [x for x in run("losetup", "-a", show=False).splitlines() if str(data) in x]
        keys = [k for k in Path("/proc/keys").read_text().splitlines() if "cryptsetup" in k]
        print(f"crypt mappings left: {mappings or 'none'}")
        print(f"loop devices on the data dir left: {loops or 'none'}")
        print(f"files in the data dir: {sorted(p.name for p in data.iterdir()) or 'none'}")
        headers = sorted(os.listdir(run_dir / "state" / "headers"))
        print(f"detached headers left: {headers or 'none'}")
        print(f"cryptsetup keys in the kernel keyring: {keys or 'none'}")
        mounted = target.exists() and os.path.ismount(target)
        print(f"target still mounted: {'yes' if mounted else 'no'}")
        images = [p.name for p in data.glob("*.img")]
        ok = not (mappings or loops or keys or images or headers or mounted)
    finally:
        step("stop the driver (SIGTERM: in-flight RPCs finish, socket removed)")
        if driver is not None and driver.running():
            print(f"driver exited with {driver.stop(60)}; socket present: "
                  f"{driver.socket.exists()}")
        subprocess.run(["umount", str(data)], check=False)
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(run_dir, ignore_errors=True)
    print("\nDEMO OK: encrypted at rest, crypto-shredded on unpublish" if ok else "\nDEMO FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
