# syntax=docker/dockerfile:1
# luks-ephemeral-csi node plugin image.
#
#   docker build -t ghcr.io/luks-ephemeral-csi/luks-ephemeral-csi:0.1.0 .
#
# Stage 1 builds wheels (ours and its dependencies); stage 2 installs them next to the host
# tools the driver runs. Nothing from the source tree but the wheels reaches the runtime image.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
WORKDIR /src
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
COPY pyproject.toml README.md ./
COPY csi ./csi
# The package and every dependency as wheels, so the runtime stage installs offline.
RUN pip wheel --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="luks-ephemeral-csi" \
      org.opencontainers.image.description="CSI driver: per-pod scratch volumes encrypted with LUKS2 under a key that is never stored" \
      org.opencontainers.image.licenses="Apache-2.0"
# The tools the driver runs on the node (see csi/host/linux.py and csi/host/nbd.py):
#   cryptsetup-bin      cryptsetup (LUKS2 format/open/close)
#   dmsetup             dmsetup (open counts of mappings; removes cryptsetup's temporary ones)
#   mount               mount, umount, losetup
#   util-linux          blkid, wipefs, fallocate: for an admin inspecting devices in the pod
#   e2fsprogs           mkfs.ext4, resize2fs (online expansion)
#   xfsprogs            mkfs.xfs, xfs_growfs (online expansion)
#   qemu-utils          qemu-img (creates backing=qcow2 images), qemu-nbd (for an admin)
#   qemu-system-common  qemu-storage-daemon: the chart's qsd container serves the qcow2 images
#                       over NBD from this same image. Bookworm has no smaller package with it
#                       (it brings shared libraries, but no emulator or firmware).
#   nbd-client          nbd-client: connects the kernel's /dev/nbdN to qsd's unix socket
#   kmod                modprobe loop, dm_crypt, dm_integrity, nbd when they are not loaded yet
# DEBIAN_FRONTEND=noninteractive: nbd-client asks debconf questions on install.
# Versions are not pinned (hadolint DL3008): Debian drops superseded versions from the archive
# when a security update lands, so exact pins would break every rebuild; the release (bookworm)
# already fixes the major versions, and rebuilding picks up the security fixes.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        cryptsetup-bin \
        dmsetup \
        e2fsprogs \
        kmod \
        mount \
        nbd-client \
        qemu-system-common \
        qemu-utils \
        util-linux \
        xfsprogs \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/*
COPY --from=builder /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels /wheels/luks_ephemeral_csi-*.whl \
    && rm -rf /wheels
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# The driver runs as root, in a privileged container (see the Helm chart): it attaches loop
# and NBD devices, sets up dm-crypt mappings, formats and mounts filesystems and deletes backing
# files owned by root. Each of these needs CAP_SYS_ADMIN or root-owned device nodes; a non-root
# user could do none of it, so there is deliberately no USER line. (The chart runs the qsd
# container and the controller-mode driver from this image too, without any capability.)
ENTRYPOINT ["luks-ephemeral-csi"]
CMD ["node"]
