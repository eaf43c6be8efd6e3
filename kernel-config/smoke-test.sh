#!/usr/bin/env bash
# Smoke test of the crx guest kernel under QEMU TCG (microvm machine): boots vmlinux
# (PVH) and bzImage into a throwaway busybox initramfs that checks what crx needs
# (proc, cgroup2 controllers, freezer, namespaces, seccomp, filesystems, PTYs, virtio-mmio
# blk/net/rng probing, ext4, overlay, 2 vCPUs from the MP table) and ends with
# `reboot -f`, which must end QEMU. Prints QEMU start -> /init times.
#
# Usage: kernel-config/smoke-test.sh [KERNEL_DIR]
#   KERNEL_DIR holds vmlinux, bzImage and config (default: the cache dir printed by
#   kernel-config/build.sh, which builds the kernel if needed).
# Environment:
#   CRX_SMOKE_RUNS=N         timed boots per image (default 3; median reported)
#   CRX_SMOKE_COMPRESSION=1  also time gzip and lz4 initramfs against uncompressed
#   CRX_SMOKE_VERBOSE=1      drop `quiet` and print every console line
#   CRX_SMOKE_TIMEOUT=S      per-boot limit in seconds (default 120)
#   CRX_SMOKE_MACHINE=OPTS   QEMU -M value (default: microvm with PIT+PIC, see below)
set -euo pipefail
exec </dev/null

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
runs=${CRX_SMOKE_RUNS:-3}
boot_timeout=${CRX_SMOKE_TIMEOUT:-120}
verbose=${CRX_SMOKE_VERBOSE:-0}

die() { printf '[smoke] FAIL: %s\n' "$*" >&2; exit 1; }
log() { printf '[smoke] %s\n' "$*" >&2; }

# ---- prerequisites ----
qemu=$(command -v qemu-system-x86_64) \
    || die "qemu-system-x86_64 not found (apt-get install -y qemu-system-x86)"
for tool in cpio mkfs.ext4 gzip lz4; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install -y cpio e2fsprogs gzip lz4)"
done
if ! dpkg -s busybox-static >/dev/null 2>&1; then
    log "installing busybox-static for the test initramfs"
    DEBIAN_FRONTEND=noninteractive apt-get install -y busybox-static >&2 \
        || die "busybox-static is missing and could not be installed"
fi
busybox=/bin/busybox
readelf -lW "$busybox" | grep -q 'Requesting program interpreter' \
    && die "$busybox is not the static busybox (apt-get install -y busybox-static)"

kdir=${1:-}
if [[ -z $kdir ]]; then
    kdir=$("$here/build.sh" | tail -n 1)
fi
for f in vmlinux bzImage config; do
    [[ -f $kdir/$f ]] || die "$kdir/$f is missing (run kernel-config/build.sh)"
done

# ---- config checks that no boot would show ----
cfg="$kdir/config"
for want in CONFIG_PVH=y CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y CONFIG_VIRTIO_VSOCKETS=y \
    CONFIG_VIRTIO_FS=y CONFIG_SECCOMP_FILTER=y CONFIG_PANIC_ON_OOPS=y; do
    grep -qxF "$want" "$cfg" || die "kernel config lacks $want"
done
for unwanted in CONFIG_MODULES CONFIG_PCI CONFIG_ACPI CONFIG_SERIO_I8042 \
    CONFIG_PTP_1588_CLOCK_KVM CONFIG_FW_LOADER CONFIG_IO_URING; do
    grep -qE "^$unwanted=" "$cfg" && die "kernel config has $unwanted enabled; it must be off"
done
log "config checks passed ($cfg)"

work=$(mktemp -d "${TMPDIR:-/tmp}/crx-smoke.XXXXXX")
trap 'rm -rf "$work"' EXIT

# ---- throwaway initramfs ----
cat >"$work/init.sh" <<'EOF'
#!/bin/busybox sh
/bin/busybox echo "CRX-SMOKE init-running"
/bin/busybox --install -s /bin
export PATH=/bin
ok() { echo "CRX-CHECK ok $1"; }
bad() { echo "CRX-CHECK FAIL $1: $2"; }
check() { name=$1; shift; if "$@" >/tmp/out 2>&1; then ok "$name"; else bad "$name" "$(head -c 300 /tmp/out | tr '\n' ' ')"; fi; }

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
# PID 1 must start with stdin/stdout/stderr on /dev/console, whichever console it is.
for fd in 0 1 2; do
    [ "$(readlink /proc/1/fd/$fd)" = /dev/console ] || pid1_fds_bad="$pid1_fds_bad $fd"
done
if grep -qw console=ttynull /proc/cmdline; then
    # Silent boot: the console is ttynull, so report on the serial port directly.
    exec >/dev/ttyS0 2>&1
    echo "CRX-SMOKE init-running (late marker: console is ttynull)"
fi
echo "CRX-SMOKE consoles: $(cut -c1-8 /proc/consoles | tr -s ' \n' ' ')"
if [ -z "$pid1_fds_bad" ]; then ok pid1-console-fds; else bad pid1-console-fds "fds$pid1_fds_bad not on /dev/console"; fi
echo "CRX-SMOKE uptime $(cut -d' ' -f1 /proc/uptime)"
check proc test -r /proc/self/stat
check cgroup2-mount mount -t cgroup2 cgroup2 /sys/fs/cgroup
echo "CRX-SMOKE cgroup.controllers: $(cat /sys/fs/cgroup/cgroup.controllers)"
for c in cpu cpuset io memory pids; do
    check "controller-$c" grep -qw "$c" /sys/fs/cgroup/cgroup.controllers
done
check subtree-control sh -c 'echo "+cpu +cpuset +io +memory +pids" > /sys/fs/cgroup/cgroup.subtree_control'
mkdir /sys/fs/cgroup/t
check cpu-max test -f /sys/fs/cgroup/t/cpu.max
check memory-max test -f /sys/fs/cgroup/t/memory.max
check io-max test -f /sys/fs/cgroup/t/io.max
check freezer sh -c 'echo 1 > /sys/fs/cgroup/t/cgroup.freeze && grep -qx "frozen 1" /sys/fs/cgroup/t/cgroup.events'
for ns in uts ipc pid net user mnt cgroup; do
    check "ns-$ns" test -e /proc/self/ns/$ns
done
check unshare-all unshare -m -u -i -n -p -U -f true
check seccomp grep -q '^Seccomp:' /proc/self/status
check seccomp-filter grep -qw kill_process /proc/sys/kernel/seccomp/actions_avail
for fs in ext4 overlay tmpfs devtmpfs proc sysfs cgroup2 devpts fuse virtiofs; do
    check "fs-$fs" grep -qw "$fs" /proc/filesystems
done
mkdir -p /tmp/l /tmp/u /tmp/w /tmp/m && echo lower > /tmp/l/f
check overlay-mount sh -c 'mount -t overlay overlay -o lowerdir=/tmp/l,upperdir=/tmp/u,workdir=/tmp/w /tmp/m && echo upper > /tmp/m/f && test -f /tmp/u/f'
mkdir -p /dev/pts
check devpts sh -c 'mount -t devpts -o newinstance,ptmxmode=0666 devpts /dev/pts && test -c /dev/pts/ptmx'
check ipv6 test -e /proc/net/if_inet6
check unix test -e /proc/net/unix
check packet test -e /proc/net/packet
check vsock-dev test -c /dev/vsock
echo "CRX-SMOKE virtio devices: $(ls /sys/bus/virtio/devices | tr '\n' ' ')"
echo "CRX-SMOKE virtio drivers: $(ls /sys/bus/virtio/drivers | tr '\n' ' ')"
for d in /sys/bus/virtio/devices/*; do
    echo "CRX-SMOKE $(basename $d) id=$(cat $d/device) driver=$(basename $(readlink $d/driver) 2>/dev/null)"
done
check virtio-blk test -b /dev/vda
mkdir -p /mnt
check ext4-mount sh -c 'mount -t ext4 -o ro /dev/vda /mnt && grep -qx crx-disk /mnt/hello'
check virtio-net ip link show eth0
check virtio-rng grep -q virtio /sys/class/misc/hw_random/rng_current
echo "CRX-SMOKE cpus online: $(cat /sys/devices/system/cpu/online)"
check cpus-online grep -qx "$(cat /proc/cmdline | sed -n 's/.*crx.expect_cpus=\([^ ]*\).*/\1/p')" /sys/devices/system/cpu/online
echo "CRX-SMOKE done"
reboot -f
EOF

make_cpio() { # $1 = staging dir, $2 = output
    (cd "$1" && find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort \
        | cpio --create --format=newc --reproducible --owner=0:0 --quiet) >"$2"
}
stage="$work/stage"
mkdir -p "$stage/bin" "$stage/dev" "$stage/proc" "$stage/sys" "$stage/tmp"
install -m 0755 "$busybox" "$stage/bin/busybox"
install -m 0755 "$work/init.sh" "$stage/init"
mknod -m 0600 "$stage/dev/console" c 5 1
make_cpio "$stage" "$work/test.cpio"

mkdir -p "$work/disk"
echo crx-disk >"$work/disk/hello"
mkfs.ext4 -q -F -d "$work/disk" "$work/disk.img" 16M >&2

# ---- boot ----
# Under TCG there is no kvm-clock, so the guest needs the PIT (through the legacy PIC)
# to calibrate the TSC and the LAPIC timer; with pit=off it hangs after "tsc: Marking
# TSC unstable". acpi=off makes microvm list the virtio-mmio devices on the command line.
# rtc=on: without kvm-clock the kernel reads the wall clock from the CMOS RTC, and with
# rtc=off that read spins for ~1 s before giving up (whenever the TSC got calibrated).
# microvm has no keyboard controller: without `-device i8042` the guest's reboot=k write
# of 0xFE to port 0x64 is lost and QEMU only exits if a later reboot method happens to
# reset it (with bzImage it hangs).
machine=${CRX_SMOKE_MACHINE:-microvm,x-option-roms=off,pit=on,pic=on,rtc=on,isa-serial=on,acpi=off}
# $1 kernel, $2 initramfs, $3 vCPUs, $4 log file. Prints the ms from QEMU start to the
# first line /init writes; fails if QEMU does not exit by itself (reboot -f) in time.
boot() {
    local kernel=$1 initrd=$2 smp=$3 out=$4 console=${5:-console=ttyS0} quiet=quiet rc=0 start line now
    [[ $verbose == 1 ]] && quiet=""
    local cpus=0 cmdline
    ((smp == 1)) || cpus="0-$((smp - 1))"
    cmdline="$console reboot=k panic=-1 $quiet crx.expect_cpus=$cpus"
    start=$EPOCHREALTIME
    set +e
    timeout --kill-after=5 "$boot_timeout" "$qemu" \
        -M "$machine" \
        -accel tcg -cpu max -m 256 -smp "$smp" -nodefaults -no-user-config -display none \
        -device i8042 -serial stdio -no-reboot \
        -kernel "$kernel" -initrd "$initrd" -append "$cmdline" \
        -drive id=d0,file="$work/disk.img",format=raw,if=none,readonly=on \
        -device virtio-blk-device,drive=d0 \
        -netdev hubport,id=n0,hubid=0 -device virtio-net-device,netdev=n0 \
        -device virtio-rng-device </dev/null 2>&1 \
    | while IFS= read -r line; do
        now=$EPOCHREALTIME
        line=${line%$'\r'}
        printf '%s %s\n' "$(((${now//[.,]/} - ${start//[.,]/}) / 1000))" "$line"
        [[ $verbose == 1 ]] && printf '  %s\n' "$line" >&2
      done >"$out"
    rc=${PIPESTATUS[0]}
    set -e
    if ((rc == 124 || rc == 137)); then
        cp "$out" "${TMPDIR:-/tmp}/crx-smoke-failed.log"
        tail -n 30 "$out" >&2
        log "full console log: ${TMPDIR:-/tmp}/crx-smoke-failed.log"
        die "$(basename "$kernel") did not end QEMU within ${boot_timeout}s (hang, or reboot -f did not reach the VMM)"
    fi
    ((rc == 0)) || { tail -n 30 "$out" >&2; die "QEMU exited with status $rc booting $(basename "$kernel")"; }
    grep -q 'CRX-SMOKE init-running' "$out" || { tail -n 30 "$out" >&2; die "$(basename "$kernel") never ran /init"; }
    grep -q 'CRX-SMOKE done' "$out" || { tail -n 30 "$out" >&2; die "/init did not finish under $(basename "$kernel")"; }
    awk '/CRX-SMOKE init-running/ { print $1; exit }' "$out"
}

median() { sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }

failed=0
report_checks() { # $1 log
    local fails
    fails=$(grep -c 'CRX-CHECK FAIL' "$1" || true)
    grep -E 'CRX-SMOKE (uptime|consoles|cgroup|virtio|cpus|vda|virtio[0-9])' "$1" | cut -d' ' -f2- | sed 's/^/    /' >&2
    if ((fails)); then
        grep 'CRX-CHECK FAIL' "$1" | cut -d' ' -f2- | sed 's/^/    /' >&2
        failed=1
    else
        log "  all $(grep -c 'CRX-CHECK ok' "$1") guest checks passed"
    fi
}

declare -A results
for image in vmlinux bzImage; do
    log "booting $image (full checks, 1 vCPU)"
    ms=$(boot "$kdir/$image" "$work/test.cpio" 1 "$work/$image.log")
    report_checks "$work/$image.log"
    times=("$ms")
    for ((i = 1; i < runs; i++)); do
        times+=("$(boot "$kdir/$image" "$work/test.cpio" 1 "$work/$image.$i.log")")
    done
    results[$image]=$(printf '%s\n' "${times[@]}" | median)
    log "$image: QEMU start -> /init: ${times[*]} ms (median ${results[$image]} ms)"
done

log "booting vmlinux with 2 vCPUs (MP table, SMP bring-up)"
ms=$(boot "$kdir/vmlinux" "$work/test.cpio" 2 "$work/smp2.log")
report_checks "$work/smp2.log"
log "vmlinux -smp 2: QEMU start -> /init: $ms ms"

log "booting vmlinux with console=ttynull (the silent production setting)"
ms=$(boot "$kdir/vmlinux" "$work/test.cpio" 1 "$work/ttynull.log" console=ttynull)
report_checks "$work/ttynull.log"
# Nothing may reach the serial port before /init redirects there itself.
if grep -v 'CRX-' "$work/ttynull.log" | grep -v 'qemu-system-x86_64: warning' | grep -q .; then
    grep -v 'CRX-' "$work/ttynull.log" | head -n 5 >&2
    die "with console=ttynull the kernel still wrote to the serial port"
fi
log "vmlinux console=ttynull: QEMU start -> /init reporting on ttyS0: $ms ms"

if [[ ${CRX_SMOKE_COMPRESSION:-0} == 1 ]]; then
    # A payload the size of a static Rust agent (~8 MiB of real machine code) makes the
    # comparison meaningful; the busybox-only cpio is too small to show a difference.
    head -c 8M "$qemu" >"$stage/payload"
    make_cpio "$stage" "$work/big.cpio"
    gzip -9 -n -c "$work/big.cpio" >"$work/big.cpio.gz"
    lz4 -l -9 -q -c "$work/big.cpio" >"$work/big.cpio.lz4"
    for variant in big.cpio big.cpio.gz big.cpio.lz4; do
        case $variant in
            *.gz) grep -qx CONFIG_RD_GZIP=y "$cfg" || { log "skip $variant: no RD_GZIP"; continue; } ;;
            *.lz4) grep -qx CONFIG_RD_LZ4=y "$cfg" || { log "skip $variant: no RD_LZ4"; continue; } ;;
        esac
        times=()
        for ((i = 0; i < runs; i++)); do
            times+=("$(boot "$kdir/vmlinux" "$work/$variant" 1 "$work/$variant.$i.log")")
        done
        log "initramfs $variant ($(stat -c %s "$work/$variant") bytes): QEMU start -> /init: ${times[*]} ms (median $(printf '%s\n' "${times[@]}" | median) ms)"
    done
fi

((failed == 0)) || die "some guest checks failed (see above)"
log "PASS: vmlinux median ${results[vmlinux]} ms, bzImage median ${results[bzImage]} ms (QEMU TCG start -> /init)"
