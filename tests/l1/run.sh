#!/usr/bin/env bash
# Boots the nested-KVM rig's L1 (Debian's kernel under QEMU TCG, which emulates AMD SVM),
# gives it /dev/kvm, runs a payload inside it and hands back the payload's exit code.
#
#   run.sh --payload DIR [--timeout SECS] [--smp N] [--mem MIB] [--log FILE] [--append ARGS]
#
# DIR must contain an executable run.sh; it becomes /payload in L1 and runs there as
# `cd /payload && ./run.sh` once /dev/kvm is ready. Lines it prints as
# `CRX-L1-RESULT <json>` are meant for the host (`grep '^CRX-L1-RESULT '`).
#
# The console is streamed to stdout (carriage returns dropped) and to the log file.
#
# Exit codes: the payload's own exit code when L1 reported it (`CRX-L1-EXIT <rc>`); else
#   120  L1 came up but could not offer /dev/kvm (a module failed to load, no SVM)
#   121  L1 ended without reporting an exit (kernel panic, QEMU died, L1 init failed)
#   122  the payload made no progress: L1's watchdog printed `CRX-L1-STALL` and its
#        report, then powered L1 off (tests/l1/l1-init.sh)
#   124  timed out (QEMU killed)
#   125  the host cannot run the rig (no qemu-system-x86_64, no cached L1 kernel, bad payload)
#     2  usage error
# The last line on stderr is `crx-l1: ...` saying which, in words.
#
# SIGUSR1 asks a running L1 for kernel diagnostics over its serial line (for a host that
# sees the console go silent: a hung L1 kernel): a serial break + SysRq `9` (console log
# level), `l` (backtrace of every CPU), `w` (blocked tasks), then QEMU's `info cpus`.
# Their output, if the kernel still answers, arrives on the console like any line.
#
# Environment: CRX_CACHE_DIR (default /var/cache/crx), CRX_L1_KERNEL_DIR (default
# $CRX_CACHE_DIR/l1/current, made by prepare.sh), CRX_L1_QEMU (default qemu-system-x86_64).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache_root="${CRX_CACHE_DIR:-/var/cache/crx}/l1"

say() { echo "crx-l1: $*" >&2; }
fail() { local code="$1"; shift; say "$*"; exit "$code"; }
usage() {
    sed -n '5,6p' "${BASH_SOURCE[0]}" | sed 's/^# *//' >&2
    exit 2
}

payload="" timeout_s=300 smp=2 mem=2048 log="" extra_append=""
while (($#)); do
    case "$1" in
        --payload) payload="${2:?}"; shift 2 ;;
        --timeout) timeout_s="${2:?}"; shift 2 ;;
        --smp) smp="${2:?}"; shift 2 ;;
        --mem) mem="${2:?}"; shift 2 ;;
        --log) log="${2:?}"; shift 2 ;;
        --append) extra_append="${2:?}"; shift 2 ;;
        -h | --help) usage ;;
        *) say "unknown argument: $1"; usage ;;
    esac
done
[[ -n "$payload" ]] || { say "--payload DIR is required"; usage; }
[[ "$timeout_s" =~ ^[0-9]+$ && "$timeout_s" -gt 0 ]] || fail 2 "--timeout wants whole seconds > 0, got '$timeout_s'"
[[ "$smp" =~ ^[0-9]+$ && "$smp" -gt 0 ]] || fail 2 "--smp wants a count > 0, got '$smp'"
[[ "$mem" =~ ^[0-9]+$ && "$mem" -ge 256 ]] || fail 2 "--mem wants MiB >= 256, got '$mem'"

qemu="${CRX_L1_QEMU:-qemu-system-x86_64}"
command -v "$qemu" >/dev/null || fail 125 "$qemu not found: install qemu-system-x86 (tests/l1/prepare.sh does)"
# L1 has no libc: its busybox must be the static one (Debian's busybox-static).
busybox=/bin/busybox
[[ -x "$busybox" && -z "$(readelf -lW "$busybox" 2>/dev/null | grep 'program interpreter' || true)" ]] \
    || fail 125 "$busybox is missing or not static: install busybox-static (tests/l1/prepare.sh does)"
for tool in cpio setpriv timeout readelf sha256sum stdbuf gcc; do
    command -v "$tool" >/dev/null || fail 125 "$tool not found: run tests/l1/prepare.sh"
done

kdir="${CRX_L1_KERNEL_DIR:-$cache_root/current}"
[[ -f "$kdir/vmlinuz" && -s "$kdir/load-order" ]] \
    || fail 125 "no cached L1 kernel in $kdir: run tests/l1/prepare.sh first"
# The PVH ELF boots without the bzImage's xz decompressor (seconds under TCG).
kernel="$kdir/vmlinuz"
[[ -f "$kdir/vmlinux" ]] && kernel="$kdir/vmlinux"
[[ -d "$payload" ]] || fail 125 "payload $payload is not a directory"
[[ -x "$payload/run.sh" ]] || fail 125 "payload $payload has no executable run.sh"

# A run killed outright (SIGKILL) cannot clean up; the next run removes what it left.
for stale in "${TMPDIR:-/tmp}"/crx-l1.*; do
    pid=${stale##*/crx-l1.}
    pid=${pid%%.*}
    [[ -d "$stale" && "$pid" =~ ^[0-9]+$ ]] && ! kill -0 "$pid" 2>/dev/null && rm -rf "$stale"
done
tmp=$(mktemp -d "${TMPDIR:-/tmp}/crx-l1.$$.XXXXXX")
qemu_pid=""
reader_pid=""
cleanup() {
    # QEMU first: once it is gone the console reader sees EOF and ends by itself.
    if [[ -n "$qemu_pid" ]]; then
        kill -TERM "$qemu_pid" 2>/dev/null || true
        wait "$qemu_pid" 2>/dev/null || true
    fi
    if [[ -n "$reader_pid" ]]; then
        wait "$reader_pid" 2>/dev/null || true
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'say "interrupted"; exit 130' INT
trap 'say "terminated"; exit 143' TERM HUP
sysrq_requested=0
trap 'sysrq_requested=1' USR1

# --- the L1 initramfs: a base archive (busybox, modules, /init) and the payload, as two
# newc archives back to back, which the kernel unpacks one after the other. The base only
# changes with the kernel dir, busybox, l1-init.sh or kvm-hold.c, so it is cached beside the kernel
# (making its ~400 applet links costs seconds on a loaded host).
build_base() {
    local root="$tmp/root" applet
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,run,mnt,lib/modules/crx}
    cp "$busybox" "$root/bin/busybox"
    for applet in $("$busybox" --list-full); do
        [[ -e "$root/$applet" ]] || ln -s /bin/busybox "$root/$applet"
    done
    cp "$kdir"/modules/*.ko "$root/lib/modules/crx/"
    cp "$kdir/load-order" "$root/lib/modules/crx/load-order"
    cp "$here/l1-init.sh" "$root/init"
    chmod 755 "$root/init"
    gcc -static -O2 -Wall -o "$root/bin/kvm-hold" "$here/kvm-hold.c" || return 1
    (cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) >"$1"
    rm -rf "$root"
}
base_key=$(cat "$here/l1-init.sh" "$here/kvm-hold.c" "$here/run.sh" "$busybox" "$kdir/load-order" "$kdir"/modules/*.ko | sha256sum | cut -c1-16)
base="$kdir/l1-base-$base_key.cpio"
if [[ ! -s "$base" ]]; then
    if build_base "$tmp/base.cpio" && mv "$tmp/base.cpio" "$base.$$" 2>/dev/null; then
        mv -f "$base.$$" "$base"
        # Older bases (previous l1-init.sh) are no longer used.
        find "$kdir" -maxdepth 1 -name 'l1-base-*.cpio' ! -name "l1-base-$base_key.cpio" -delete 2>/dev/null || true
    else
        # Read-only cache: build it for this run only.
        base="$tmp/base.cpio"
        [[ -s "$base" ]] || build_base "$base"
    fi
fi
cp "$base" "$tmp/l1.cpio"

proot="$tmp/payload-root"
mkdir -p "$proot"
# Hard links when the payload shares our file system: no copy of large payloads.
cp -al "$payload" "$proot/payload" 2>/dev/null || { rm -rf "$proot/payload"; cp -a "$payload" "$proot/payload"; }
(cd "$proot" && find payload | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) >>"$tmp/l1.cpio"
rm -rf "$proot"

# --- boot. `quiet` keeps the console for our markers and real errors; panic=-1 with
# -no-reboot turns a panic into QEMU's exit rather than a hang until the timeout.
# lpj: the secondary CPU's delay-loop calibration fails under TCG after ~0.25 s of trying;
# the TSC rate (TCG's TSC follows the host's) divided by HZ is what it would find.
append="console=ttyS0 quiet panic=-1 oops=panic mitigations=off tsc=reliable no_timer_check"
hz=$(sed -n 's/^CONFIG_HZ=//p' "$kdir/config" 2>/dev/null || true)
mhz=$(awk -F': *' '/^cpu MHz/ { print $2; exit }' /proc/cpuinfo)
if [[ "$hz" =~ ^[0-9]+$ && -n "$mhz" ]]; then
    append+=" lpj=$(awk -v m="$mhz" -v hz="$hz" 'BEGIN { printf "%d", m * 1000000 / hz }')"
fi
# sysrq_always_enabled: Debian's default mask refuses SysRq's dumps from the serial line.
append+=" sysrq_always_enabled rdinit=/init ${extra_append}"
# The log is also what we parse afterwards, so there always is one.
if [[ -n "$log" ]]; then
    mkdir -p "$(dirname "$log")"
    console_log=" (console: $log)"
else
    log="$tmp/console.log"
    console_log=""
fi
: >"$log"

mkfifo "$tmp/console" "$tmp/serial-in"
# QEMU's serial input, held open read-write here so QEMU never sees its end.
exec 3<>"$tmp/serial-in"
# Line-buffered: tr's default block buffering held the console back until QEMU ended,
# so neither the log nor the host saw a stalled L1's last lines while it stalled.
stdbuf -oL tr -d '\r' <"$tmp/console" | tee -a "$log" &
reader_pid=$!

start=$(date +%s%N)
# setpriv --pdeathsig: if this script is killed outright (SIGKILL), timeout and QEMU die
# with it instead of burning a core for the rest of the timeout.
setpriv --pdeathsig KILL \
    timeout --foreground --kill-after=5 "$timeout_s" \
    setpriv --pdeathsig KILL \
    "$qemu" -accel tcg,thread=multi -cpu max -M q35 -smp "$smp" -m "$mem" \
    -nodefaults -no-user-config -display none -monitor none -serial mon:stdio -no-reboot \
    -kernel "$kernel" -initrd "$tmp/l1.cpio" -append "$append" \
    <&3 >"$tmp/console" 2>&1 &
qemu_pid=$!

# `Ctrl-a b` is the mux's serial break; the key after a break is a SysRq command.
sysrq_dump() {
    say "asked for L1 kernel diagnostics (SysRq l, w over the serial line; QEMU info cpus)"
    local key
    for key in 9 l w; do
        printf '\001b' >&3
        sleep 0.5
        printf '%s' "$key" >&3
        sleep 2
    done
    # `Ctrl-a c` switches the mux to QEMU's monitor and back.
    printf '\001c' >&3
    sleep 0.5
    printf 'info cpus\n' >&3
    sleep 1
    printf '\001c' >&3
}
set +e
while :; do
    wait "$qemu_pid"
    qemu_rc=$?
    ((sysrq_requested)) || break
    # The signal cut the wait short; QEMU still runs.
    sysrq_requested=0
    sysrq_dump
done
set -e
qemu_pid=""
wait "$reader_pid" 2>/dev/null || true
reader_pid=""
wall_ms=$((($(date +%s%N) - start) / 1000000))

timed_out=0
((qemu_rc == 124 || qemu_rc == 137)) && timed_out=1
# The payload's own report wins, even if L1 then failed to power off in time.
exit_line=$(grep -a -m1 '^CRX-L1-EXIT ' "$log" || true)
if [[ -n "$exit_line" ]]; then
    rc=${exit_line#CRX-L1-EXIT }
    rc=${rc%% *}
    [[ "$rc" =~ ^[0-9]+$ ]] || fail 121 "L1 printed a malformed exit line: $exit_line"
    ((timed_out == 0)) || say "L1 did not power off after the payload ended; QEMU killed at the timeout"
    say "payload exited $rc after ${wall_ms} ms in L1"
    exit "$rc"
fi
stall=$(grep -a -m1 '^CRX-L1-STALL ' "$log" || true)
if [[ -n "$stall" ]]; then
    fail 122 "the payload stalled; L1's watchdog reported and powered off: ${stall#CRX-L1-STALL }${console_log}"
fi
if ((timed_out)); then
    fail 124 "L1 timed out after ${timeout_s} s; QEMU killed${console_log}"
fi
kvm_fail=$(grep -a -m1 '^CRX-L1-FAIL ' "$log" || true)
if [[ -n "$kvm_fail" ]]; then
    fail 120 "L1 could not offer /dev/kvm: ${kvm_fail#CRX-L1-FAIL }${console_log}"
fi
fail 121 "L1 ended (QEMU exit $qemu_rc) without reporting the payload's exit; last console lines:
$(tail -n 15 "$log")"
