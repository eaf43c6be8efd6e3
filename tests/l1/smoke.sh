#!/usr/bin/env bash
# The rig's smoke check from the shell: L1 offers a working /dev/kvm (kvm-check) and runs
# a Linux L2 on it to user space through QEMU microvm. The L2 kernel is L1's own Debian
# kernel unless CRX_L2_KERNEL names another (e.g. the crx guest vmlinux).
#
#   smoke.sh [--timeout SECS] [--log FILE]     (other arguments pass to run.sh)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
kdir="${CRX_L1_KERNEL_DIR:-${CRX_CACHE_DIR:-/var/cache/crx}/l1/current}"
l2_kernel="${CRX_L2_KERNEL:-$kdir/vmlinux}"
[[ -f "$l2_kernel" ]] || { echo "crx-l1-smoke: no L2 kernel at $l2_kernel: run $here/prepare.sh" >&2; exit 125; }

tmp=$(mktemp -d "${TMPDIR:-/tmp}/crx-l1-smoke.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
p="$tmp/payload"
mkdir -p "$p/l2" "$tmp/l2root/bin" "$tmp/l2root/proc" "$tmp/l2root/dev"
cp "$here/payloads/kvm-smoke/run.sh" "$p/run.sh"
gcc -static -O2 -o "$p/kvm-check" "$here/kvm-check.c"
"$here/bundle-qemu.sh" "$p/qemu"
cp "$l2_kernel" "$p/l2/vmlinux"
cp /bin/busybox "$tmp/l2root/bin/busybox"
install -m 755 "$here/l2-init.sh" "$tmp/l2root/init"
(cd "$tmp/l2root" && find . | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) >"$p/l2/initrd.cpio"
"$here/run.sh" --payload "$p" --timeout 300 "$@"
