#!/bin/sh
# Template of the QEMU side of the crx-vmm lane and its benchmark: the shim's QEMU backend
# (microvm, KVM, crx-vmm's vhost-user-vsock back end on the same hybrid-vsock socket)
# inside L1, booting the same guest as payloads/vmm-health. Layout: VmmLane::payload plus
# qemu/ (PayloadBuilder::qemu("qemu")). For each vCPU count in VCPUS (default "1 2"):
# spawn, wait for the agent's health reply, ask it to power off, check QEMU exits 0.
# One CRX-L1-RESULT {"check":"qemu-health",...} per boot.
rc=0
dir=/run/qemu-health
for vcpus in ${VCPUS:-1 2}; do
    rm -rf "$dir"
    mkdir -p "$dir"
    ./bin/crx-vmm vhost-user-vsock --socket "$dir/vhost.sock" --uds "$dir/agent.sock" \
        --guest-cid 3 >"$dir/backend.log" 2>&1 &
    backend=$!
    i=0
    while ! [ -S "$dir/vhost.sock" ] && kill -0 "$backend" 2>/dev/null && [ "$i" -lt 100 ]; do
        sleep 0.1
        i=$((i + 1))
    done
    if ! [ -S "$dir/vhost.sock" ]; then
        echo "CRX-L1-RESULT {\"check\":\"qemu-health\",\"vcpus\":$vcpus,\"ok\":false,\"error\":\"crx-vmm vhost-user-vsock did not create its socket\"}"
        echo "--- back end log"; tail -n 20 "$dir/backend.log"
        kill -KILL "$backend" 2>/dev/null
        wait "$backend"
        rc=1
        continue
    fi
    read -r t0 _ </proc/uptime
    ./qemu/qemu-system-x86_64 \
        -M microvm,acpi=off,x-option-roms=off,pit=off,pic=off,rtc=off,isa-serial=off,memory-backend=mem \
        -object memory-backend-memfd,id=mem,size=256M,share=on -m 256M -smp "$vcpus" \
        -nodefaults -no-user-config -display none -no-reboot \
        -accel kvm -cpu host,-arch-capabilities -serial none \
        -chardev socket,id=vsock,path="$dir/vhost.sock" -device vhost-user-vsock-device,chardev=vsock \
        -kernel guest/vmlinux -initrd guest/initramfs.cpio -append "reboot=k panic=-1 quiet" \
        >"$dir/qemu.log" 2>&1 &
    qemu=$!
    # crx-probe's elapsed_us is the figure; the 0.2 s poll only stops waiting for an agent
    # whose QEMU already died.
    ./bin/crx-probe health --uds "$dir/agent.sock" --timeout-ms 120000 >"$dir/health.json" &
    probe=$!
    while kill -0 "$probe" 2>/dev/null; do
        kill -0 "$qemu" 2>/dev/null || { kill "$probe" 2>/dev/null; break; }
        sleep 0.2
    done
    wait "$probe"
    health_rc=$?
    read -r t1 _ </proc/uptime
    ./bin/crx-probe shutdown --uds "$dir/agent.sock" >"$dir/shutdown.json"
    i=0
    while kill -0 "$qemu" 2>/dev/null && [ "$i" -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
    if kill -0 "$qemu" 2>/dev/null; then
        kill -KILL "$qemu"
        echo "QEMU did not exit within 30 s of the shutdown request" >>"$dir/qemu.log"
    fi
    wait "$qemu"
    qemu_rc=$?
    kill "$backend" 2>/dev/null
    wait "$backend"
    health=$(head -c 4096 "$dir/health.json")
    case "$health" in "{"*) ;; *) health=null ;; esac
    ok=false
    [ "$health_rc" = 0 ] && [ "$qemu_rc" = 0 ] && ok=true
    [ "$ok" = true ] || rc=1
    ready_s=$(awk -v a="$t1" -v b="$t0" 'BEGIN { printf "%.2f", a - b }')
    echo "CRX-L1-RESULT {\"check\":\"qemu-health\",\"vcpus\":$vcpus,\"ok\":$ok,\"health\":$health,\"spawn_to_health_poll_s\":$ready_s,\"qemu_rc\":$qemu_rc}"
    if [ "$ok" != true ]; then
        echo "--- QEMU log (vcpus=$vcpus)"; tail -n 20 "$dir/qemu.log"
        echo "--- back end log"; tail -n 20 "$dir/backend.log"
    fi
done
exit $rc
