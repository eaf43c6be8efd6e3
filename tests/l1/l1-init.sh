#!/bin/busybox sh
# /init of the nested-KVM rig's L1 (copied into the L1 initramfs by run.sh).
# Gives the payload /dev/kvm, runs /payload/run.sh, reports its exit code on the console
# as `CRX-L1-EXIT <rc>` and powers off. Setup failures are reported as `CRX-L1-FAIL <why>`
# and power off without an exit line, so the host can tell them from a payload's failure.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

uptime_s() { read -r up _ </proc/uptime; echo "$up"; }

halt_l1() {
    poweroff -f
    # Only reached if poweroff failed: QEMU runs with -no-reboot, so a reboot ends it too.
    reboot -f
    echo o >/proc/sysrq-trigger
    while :; do sleep 60; done
}

setup_fail() {
    echo "CRX-L1-FAIL $*"
    halt_l1
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
hostname crx-l1
ip link set lo up 2>/dev/null
init_s=$(uptime_s)

grep -qw svm /proc/cpuinfo || setup_fail "the L1 CPU has no SVM flag (QEMU must run with -cpu max or -cpu EPYC,+svm,+npt)"

# The first four give /dev/kvm and are required. The rest (vhost, vsock, tun, veth) cost
# ~0.5 s of TCG time, so they load only when the payload holds a file named
# l1-extra-modules; their failure is reported but not fatal.
debug=0
grep -qw crx.l1debug /proc/cmdline && debug=1
extras=0
[ -e /payload/l1-extra-modules ] && extras=1
while read -r mod; do
    case "$mod" in
        irqbypass.ko | ccp.ko | kvm.ko | kvm-amd.ko) required=1 ;;
        *) required=0; [ "$extras" = 1 ] || continue ;;
    esac
    [ "$debug" = 1 ] && echo "CRX-L1-DEBUG insmod $mod at $(uptime_s)"
    if ! out=$(insmod "/lib/modules/crx/$mod" 2>&1); then
        [ "$required" = 1 ] && setup_fail "insmod $mod failed: $out"
        echo "CRX-L1-WARN insmod $mod failed: $out"
    fi
done </lib/modules/crx/load-order

[ -c /dev/kvm ] || setup_fail "kvm and kvm-amd loaded but /dev/kvm did not appear"
kvm_s=$(uptime_s)
echo "CRX-L1-READY {\"init_s\":$init_s,\"kvm_s\":$kvm_s,\"cpus\":$(grep -c ^processor /proc/cpuinfo)}"

export CRX_L1=1 HOME=/tmp TMPDIR=/tmp
cd /payload && ./run.sh
rc=$?
echo "CRX-L1-DONE {\"uptime_s\":$(uptime_s)}"
echo "CRX-L1-EXIT $rc"
halt_l1
