#!/bin/sh
# Payload of the rig's smoke check, run inside L1 (busybox sh) by l1-init.sh.
# Expects beside it: kvm-check (static), qemu/ (bundle-qemu.sh), l2/vmlinux (a PVH or
# bzImage kernel) and l2/initrd.cpio whose /init prints `CRX-L2-USERSPACE {...}`.
# Prints one CRX-L1-RESULT line per check; exits 0 only if both passed.
rc=0
# `CRX-L1-STEP NAME UPTIME` before each step, so a stall's console tail names the step;
# the step file is what L1's watchdog (l1-init.sh) measures progress by.
step() { # its own variable names: a payload's $up must survive it
    read -r crx_step_at _ </proc/uptime
    echo "CRX-L1-STEP $1 $crx_step_at"
    echo "$1 $crx_step_at" >"${CRX_L1_STEP_FILE:-/dev/null}"
}

step kvm-check
./kvm-check 1000 || rc=1

# L2: a Linux guest on L1's KVM, through QEMU microvm, to user space. cmos_init spends
# ~19 s probing an RTC microvm does not have; the crypto self-tests ~0.7 s.
l2_append="console=ttyS0 quiet panic=-1 reboot=t initcall_blacklist=cmos_init cryptomgr.notests"
step l2-qemu
read -r t0 _ </proc/uptime
{
    timeout "${L2_TIMEOUT:-180}" ./qemu/qemu-system-x86_64 -accel kvm -cpu host -M microvm \
        -smp 1 -m 256 -nodefaults -no-user-config -display none -serial stdio -no-reboot \
        -kernel l2/vmlinux -initrd l2/initrd.cpio -append "$l2_append" </dev/null 2>&1
    echo $? >/tmp/l2-qemu-rc
} | while IFS= read -r line; do
    case "$line" in
        *CRX-L2-USERSPACE*)
            read -r t _ </proc/uptime
            echo "$t" >/tmp/l2-marker-at
            echo "${line#*CRX-L2-USERSPACE }" >/tmp/l2-marker
            ;;
    esac
    echo "L2| $line"
done
read -r t1 _ </proc/uptime
qemu_rc=$(cat /tmp/l2-qemu-rc 2>/dev/null || echo -1)

if [ -s /tmp/l2-marker ]; then
    at=$(cat /tmp/l2-marker-at)
    l2_uptime=$(sed -n 's/.*"uptime_s":\([0-9.]*\).*/\1/p' /tmp/l2-marker)
    boot_s=$(awk -v a="$at" -v b="$t0" 'BEGIN { printf "%.2f", a - b }')
    total_s=$(awk -v a="$t1" -v b="$t0" 'BEGIN { printf "%.2f", a - b }')
    ok=true
    [ "$qemu_rc" = 0 ] || { ok=false; rc=1; }
    echo "CRX-L1-RESULT {\"check\":\"l2\",\"ok\":$ok,\"qemu_rc\":$qemu_rc,\"l2_to_userspace_s\":$boot_s,\"l2_kernel_uptime_at_init_s\":${l2_uptime:-null},\"l2_total_s\":$total_s}"
else
    echo "CRX-L1-RESULT {\"check\":\"l2\",\"ok\":false,\"qemu_rc\":$qemu_rc,\"error\":\"L2 never reached user space\"}"
    rc=1
fi
exit $rc
