#!/bin/sh
# Runs as root (PID 1's child) inside the throwaway VM that tools/vmrun.py boots with virtme-ng.
#
#   sh REPO/tools/vm_guest.sh RESULT_DIR [CMD [ARGS...]]
#
# Without CMD, the command is RESULT_DIR/cmd.sh (written by vmrun.py: an argv on the kernel
# command line would hit its 2048-byte limit). Prepares the guest for loop + dm-crypt work,
# runs the command with cwd = the repository root, stdout+stderr to RESULT_DIR/output.log,
# and writes its exit status to RESULT_DIR/rc (last, atomically: its presence means "done").
# Guest-side notes go to RESULT_DIR/setup.log; timings (guest uptime) to RESULT_DIR/times.
set -u

RESULT_DIR=${1:?usage: vm_guest.sh RESULT_DIR [CMD [ARGS...]]}
shift
SELF_DIR=$(cd "$(dirname "$0")" && pwd -P)
REPO=$(dirname "$SELF_DIR")
SETUP_LOG=$RESULT_DIR/setup.log

note() { echo "vm_guest: $*" >> "$SETUP_LOG"; }
uptime_s() { cut -d' ' -f1 /proc/uptime; }
finish() {
    echo "$1" > "$RESULT_DIR/rc.tmp" && mv "$RESULT_DIR/rc.tmp" "$RESULT_DIR/rc"
    sync
    exit "$1"
}

: > "$SETUP_LOG"
# Settings from vmrun.py (VMRUN_SCRATCH: serial of the scratch disk, if any).
VMRUN_SCRATCH=
if [ -f "$RESULT_DIR/guest.env" ]; then
    . "$RESULT_DIR/guest.env"
fi
echo "boot_done $(uptime_s)" > "$RESULT_DIR/times"
note "kernel $(uname -r), uptime at start $(uptime_s) s"

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH
export HOME=${HOME:-/root}
export LANG=C.UTF-8

# /run must be a writable tmpfs: cryptsetup keeps its locks in /run/cryptsetup and the
# project puts detached LUKS headers and unix sockets there (sockets cannot live on 9p).
# virtme-ng already mounts one (its own overlays live under /run/tmp, so never remount it
# over them); only mount a fresh one if that is missing or read-only.
if ! grep -q '^[^ ]* /run tmpfs ' /proc/mounts || ! touch /run/.vm_guest_probe 2>/dev/null; then
    note "/run is not a writable tmpfs: mounting one"
    mount -t tmpfs -o mode=0755,nosuid,nodev run /run || note "mounting tmpfs on /run failed"
fi
rm -f /run/.vm_guest_probe
mkdir -p /run/cryptsetup /run/lock

# Scratch disk (vmrun.py --scratch: a sparse host file that vng attaches as a virtio-blk disk
# whose serial is the file's path, cut to 20 characters): a real ext4 on /tmp. The default
# /tmp is an overlay on tmpfs, and tmpfs in this kernel has no O_DIRECT, so
# `losetup --direct-io=on` on a file there fails with EINVAL; on ext4 it works, as on a real
# node. It hides the host's /tmp inside the guest.
# Made in the background while the modules load (both are slow under emulation).
# A repository that itself lives under /tmp (a CI clone, say) must stay visible once the
# scratch disk covers /tmp: keep the old /tmp (with vng's shared dirs under it) reachable,
# then bind the repository back at its own path.
keep_host_tmp() {
    case "$REPO" in /tmp/*) ;; *) return 0 ;; esac
    mkdir -p /run/vmrun-host-tmp && mount --rbind /tmp /run/vmrun-host-tmp
}
repo_back_into_tmp() {
    case "$REPO" in /tmp/*) ;; *) return 0 ;; esac
    mkdir -p "$REPO" && mount --rbind "/run/vmrun-host-tmp/${REPO#/tmp/}" "$REPO" \
        && note "repository $REPO bound back over the scratch /tmp"
}
setup_scratch() {
    if [ -n "$VMRUN_SCRATCH" ]; then
        dev=
        i=0
        while [ -z "$dev" ] && [ "$i" -lt 60 ]; do
            for b in /sys/block/vd* /sys/block/sd*; do
                if [ -e "$b/serial" ] && [ "$(cat "$b/serial")" = "$VMRUN_SCRATCH" ]; then
                    dev=/dev/${b##*/}
                fi
            done
            [ -n "$dev" ] || { i=$((i + 1)); sleep 0.5; }
        done
        note "scratch disk search done (${dev:-none}), uptime $(uptime_s) s"
        if [ -z "$dev" ]; then
            note "scratch disk $VMRUN_SCRATCH not found: /tmp stays on tmpfs (no O_DIRECT)"
        elif mkfs.ext4 -q -F -m 0 -E lazy_itable_init=1,lazy_journal_init=1,nodiscard "$dev" \
                >> "$SETUP_LOG" 2>&1 && keep_host_tmp && mount -o noatime "$dev" /tmp; then
            chmod 1777 /tmp
            note "scratch ext4 on $dev mounted on /tmp, uptime $(uptime_s) s"
            repo_back_into_tmp
        else
            note "could not make or mount the scratch ext4 on $dev"
        fi
    fi
}
setup_scratch &
scratch_pid=$!

# Kernel modules: the stock kernel ships them all as modules.
modprobe -a dm_mod dm_crypt dm_integrity loop >> "$SETUP_LOG" 2>&1 || note "modprobe -a failed"
modprobe nbd nbds_max=32 >> "$SETUP_LOG" 2>&1 || note "modprobe nbd failed"
for mod in dm_mod dm_crypt dm_integrity loop nbd; do
    [ -d "/sys/module/$mod" ] || note "module $mod is not loaded"
done

# udev: virtme-ng's init starts systemd-udevd (when the host has it), so libdevmapper's udev
# sync works and /dev/mapper/NAME is udev's symlink to ../dm-N. Without a udevd (no
# /run/udev/control) libdevmapper falls back to creating the block node itself. Neither case
# hangs, so nothing is forced here: pass --env DM_DISABLE_UDEV=1 to vmrun.py to test that mode.
if [ -S /run/udev/control ]; then note "udevd is running"; else note "no udevd"; fi
if [ ! -c /dev/mapper/control ]; then
    # devtmpfs normally creates it when dm_mod loads; dmsetup can create it otherwise.
    dmsetup mknodes >> "$SETUP_LOG" 2>&1 || note "dmsetup mknodes failed"
fi
[ -c /dev/mapper/control ] || note "no /dev/mapper/control after modprobe dm_mod"
note "modules loaded, uptime $(uptime_s) s"
[ -e /dev/loop-control ] || note "no /dev/loop-control"
wait "$scratch_pid"

export VMRUN_GUEST=1
cd "$REPO" || { note "cannot cd to $REPO"; finish 125; }
echo "cmd_start $(uptime_s)" >> "$RESULT_DIR/times"
if [ "$#" -gt 0 ]; then
    "$@" > "$RESULT_DIR/output.log" 2>&1 < /dev/null
else
    sh "$RESULT_DIR/cmd.sh" > "$RESULT_DIR/output.log" 2>&1 < /dev/null
fi
status=$?
echo "cmd_end $(uptime_s)" >> "$RESULT_DIR/times"
finish "$status"
