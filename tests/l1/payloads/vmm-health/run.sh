#!/bin/sh
# The crx-vmm VM lane's template payload. Layout from crx_tests::l1::VmmLane::payload:
# bin/crx-vmm, bin/crx-probe, guest/vmlinux, guest/initramfs.cpio. For each vCPU count in
# VCPUS (default "1 2"): boot crx-vmm on L1's KVM, wait for the agent's health reply over
# hybrid vsock, ask it to power off, and check crx-vmm exits 0 and leaves no socket. One
# CRX-L1-RESULT {"check":"vmm-health",...} per boot; on failure, the tail of crx-vmm's log.
# Add --serial log to the crx-vmm line to get the guest console in that log.
rc=0
sock=/run/crx-vmm.sock
for vcpus in ${VCPUS:-1 2}; do
    rm -f "$sock"
    read -r t0 _ </proc/uptime
    ./bin/crx-vmm --kernel guest/vmlinux --initramfs guest/initramfs.cpio \
        --vcpus "$vcpus" --memory-mib 256 --vsock-uds "$sock" >/tmp/vmm.log 2>&1 &
    vmm=$!
    # crx-probe's elapsed_us is the figure; the 0.2 s poll only stops waiting for an agent
    # whose crx-vmm already died.
    ./bin/crx-probe health --uds "$sock" --timeout-ms 120000 >/tmp/health.json &
    probe=$!
    while kill -0 "$probe" 2>/dev/null; do
        kill -0 "$vmm" 2>/dev/null || { kill "$probe" 2>/dev/null; break; }
        sleep 0.2
    done
    wait "$probe"
    health_rc=$?
    read -r t1 _ </proc/uptime
    ./bin/crx-probe shutdown --uds "$sock" >/tmp/shutdown.json
    # Poll for crx-vmm's exit with a deadline, then kill it.
    i=0
    while kill -0 "$vmm" 2>/dev/null && [ "$i" -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
    if kill -0 "$vmm" 2>/dev/null; then
        kill -KILL "$vmm"
        echo "crx-vmm did not exit within 30 s of the shutdown request" >>/tmp/vmm.log
    fi
    wait "$vmm"
    vmm_rc=$?
    health=$(head -c 4096 /tmp/health.json)
    case "$health" in "{"*) ;; *) health=null ;; esac
    left=false
    [ -e "$sock" ] && left=true
    ok=false
    [ "$health_rc" = 0 ] && [ "$vmm_rc" = 0 ] && [ "$left" = false ] && ok=true
    [ "$ok" = true ] || rc=1
    ready_s=$(awk -v a="$t1" -v b="$t0" 'BEGIN { printf "%.2f", a - b }')
    echo "CRX-L1-RESULT {\"check\":\"vmm-health\",\"vcpus\":$vcpus,\"ok\":$ok,\"health\":$health,\"spawn_to_health_poll_s\":$ready_s,\"vmm_rc\":$vmm_rc,\"socket_left\":$left}"
    [ "$ok" = true ] || { echo "--- crx-vmm log (vcpus=$vcpus)"; tail -n 30 /tmp/vmm.log; }
done
exit $rc
