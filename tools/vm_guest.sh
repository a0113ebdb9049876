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

# Kernel modules: the stock kernel ships them all as modules.
for mod in dm_mod dm_crypt dm_integrity loop; do
    modprobe "$mod" >> "$SETUP_LOG" 2>&1 || note "modprobe $mod failed"
done
modprobe nbd nbds_max=32 >> "$SETUP_LOG" 2>&1 || note "modprobe nbd failed"

# No udevd runs in the guest. libdevmapper notices that by itself (no /run/udev/control) and
# creates the /dev/mapper nodes directly, so cryptsetup does not hang; saying so explicitly
# keeps it that way even if a udev control socket ever shows up without a daemon behind it.
export DM_DISABLE_UDEV=1
if [ ! -c /dev/mapper/control ]; then
    # devtmpfs normally creates it when dm_mod loads; dmsetup can create it otherwise.
    dmsetup mknodes >> "$SETUP_LOG" 2>&1 || note "dmsetup mknodes failed"
fi
[ -c /dev/mapper/control ] || note "no /dev/mapper/control after modprobe dm_mod"
[ -e /dev/loop-control ] || note "no /dev/loop-control"
note "dm targets: $(dmsetup targets 2>/dev/null | awk '{print $1}' | tr '\n' ' ')"

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
