#!/bin/busybox sh
# /init of the tiny L2 guest the rig's smoke check boots inside L1: proves user space
# runs, says so on the serial console, and resets (QEMU runs with -no-reboot, so it exits).
/bin/busybox mount -t proc proc /proc
# Kernels whose built-in initramfs has no /dev/console start us without stdio.
if ! [ -e /dev/console ]; then
    /bin/busybox mount -t devtmpfs devtmpfs /dev
    exec </dev/console >/dev/console 2>&1
fi
read -r up _ </proc/uptime
echo "CRX-L2-USERSPACE {\"uptime_s\":$up}"
/bin/busybox reboot -f
