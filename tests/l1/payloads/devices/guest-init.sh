#!/bin/busybox sh
# The L2 guest of the devices lane (crx_tests::test_guest prelude runs first: mounts,
# PATH, `result KEY VALUE`). It checks each pod device from the guest's side and talks
# to run.sh (in L1) through console lines: `CRX-GUEST <key> <value>` are results,
# `CRX-GUEST wait-<what>` asks L1 to act, and L1 answers by changing what the guest
# polls (a drive's size, a file in the share). Drives are found by serial, not order.

within() { # within SECONDS CONDITION...: polls every 0.2 s (CONDITION is re-run, its
    # arguments are not re-expanded: wrap anything with $(...) in a function)
    n=$(($1 * 5)); shift
    until "$@"; do
        [ "$n" -le 0 ] && return 1
        sleep 0.2; n=$((n - 1))
    done
}

slot_grown() { [ "$(cat /sys/block/$SLOT/size)" != 0 ]; }

disk() { # disk SERIAL -> vdX
    for d in /sys/block/vd*; do
        [ "$(cat "$d/serial" 2>/dev/null)" = "$1" ] && { basename "$d"; return; }
    done
}

RW=$(disk crx-rw); RO=$(disk crx-ro); SLOT=$(disk crx-slot)
result disks "rw=${RW:-none} ro=${RO:-none} slot=${SLOT:-none}"

# Read-only drive: the driver saw VIRTIO_BLK_F_RO, writes fail, data unchanged.
if [ -n "$RO" ]; then
    result ro-flag "$(cat /sys/block/$RO/ro)"
    if dd if=/dev/zero of=/dev/$RO bs=4096 count=1 oflag=direct conv=fsync 2>/tmp/ro.err; then
        result ro-write accepted
    else
        result ro-write refused
    fi
    result ro-content "$(dd if=/dev/$RO bs=16 count=1 2>/dev/null)"
fi

# virtio-fs: mount the tag, read what L1 wrote before boot, write for L1, then see a
# file L1 writes while we run.
if grep -q virtiofs /proc/filesystems && mkdir -p /mnt/share &&
    mount -t virtiofs crxshare /mnt/share 2>/tmp/fs.err; then
    result fs-mounted yes
    result fs-from-l1 "$(cat /mnt/share/from-l1 2>&1)"
    echo "written-by-guest" >/mnt/share/from-guest && sync
    result fs-wait-late ready
    echo "CRX-GUEST wait-fs-late"
    if within 60 [ -e /mnt/share/late-from-l1 ]; then
        result fs-late "$(cat /mnt/share/late-from-l1)"
    else
        result fs-late missing
    fi
else
    result fs-mounted "no: $(head -c 200 /tmp/fs.err 2>/dev/null)"
fi

# virtio-net: address inside the test netns's /24, TCP both ways with L1's nc.
if [ -e /sys/class/net/eth0 ]; then
    ip link set lo up
    ip addr add 10.0.2.15/24 dev eth0 && ip link set eth0 up
    result net-mtu "$(cat /sys/class/net/eth0/mtu)"
    result net-mac "$(cat /sys/class/net/eth0/address)"
    echo "CRX-GUEST wait-net-listener"
    # L1 listens on 10.0.2.1:5000, sends its line back; retry while it starts.
    got=""
    i=0
    while [ -z "$got" ] && [ "$i" -lt 30 ]; do
        got=$(echo "hello-from-guest" | timeout 10 nc 10.0.2.1 5000 2>/dev/null)
        [ -z "$got" ] && sleep 1
        i=$((i + 1))
    done
    result net-reply "${got:-none}"
else
    result net-device none
fi

# Empty slot: L1 attaches a backing through crx-vmm's API socket; the guest sees the
# capacity change (config interrupt) and reads the volume.
if [ -n "$SLOT" ]; then
    result slot-size-before "$(cat /sys/block/$SLOT/size)"
    echo "CRX-GUEST wait-attach"
    if within 60 slot_grown; then
        result slot-size-after "$(cat /sys/block/$SLOT/size)"
        result slot-data "$(dd if=/dev/$SLOT bs=16 count=1 2>/dev/null)"
    else
        result slot-size-after 0
    fi
fi

# Flushed writes must survive SIGKILL of crx-vmm: write, fsync (FLUSH), say so, wait.
if [ -n "$RW" ]; then
    i=0
    : >/tmp/pattern
    while [ "$i" -lt 256 ]; do echo "crx-flushed-block-data-$i" >>/tmp/pattern; i=$((i + 1)); done
    if dd if=/tmp/pattern of=/dev/$RW bs=4096 conv=fsync 2>/tmp/dd.err; then
        result flushed "$(md5sum </tmp/pattern | cut -d' ' -f1) $(wc -c </tmp/pattern)"
    else
        result flushed "failed: $(head -c 200 /tmp/dd.err)"
    fi
fi
echo "CRX-GUEST wait-kill"
sleep 600
