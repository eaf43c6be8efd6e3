#!/bin/sh
# The crx-vmm VM lane (issue 2), run inside the nested-KVM L1: real KVM, the crx guest
# kernel, the agent. One L1 boot covers four L2 boots:
#   health-1vcpu   boot -> Health over hybrid vsock -> Agent.Shutdown -> crx-vmm exits 0
#   connect-2vcpu  2 vCPUs; the agent's log stream (a guest-initiated connection to host
#                  port 1025) reaches <socket>_1025; the guest sees 2 CPUs
#   sigterm        SIGTERM to a running crx-vmm: exit 0, no socket, no process
#   sigkill        SIGKILL: the clean-up child removes the socket, no process remains
# Each prints one CRX-L1-RESULT line; the Rust test asserts on them.
rc=0
export PATH=/bin:/sbin:/usr/bin

# `CRX-L1-STEP NAME UPTIME` before each step, so a stall's console tail names the step;
# the step file is what L1's watchdog (l1-init.sh) measures progress by.
step() { # its own variable names: a payload's $up must survive it
    read -r crx_step_at _ </proc/uptime
    echo "CRX-L1-STEP $1 $crx_step_at"
    echo "$1 $crx_step_at" >"${CRX_L1_STEP_FILE:-/dev/null}"
}

vmm_procs() {
    # crx-vmm and its clean-up child, if any are left.
    n=0
    for d in /proc/[0-9]*; do
        case "$(cat "$d/comm" 2>/dev/null)" in crx-vmm*) n=$((n + 1)) ;; esac
    done
    echo "$n"
}

field() { # field NAME FILE: value of key=value field NAME in crx-vmm's log (first match)
    sed -n "s/.*$1=\([0-9]*\).*/\1/p" "$2" | head -n 1
}

start_vmm() { # start_vmm NAME VCPUS [extra crx-vmm args]
    name=$1; vcpus=$2; shift 2
    sock=/run/$name.sock
    step "vmm-start-$name"
    echo "/tmp/$name.log" >>"${CRX_L1_LOGS:-/dev/null}"
    rm -f "$sock"
    ./bin/crx-vmm --kernel guest/vmlinux --initramfs guest/initramfs.cpio \
        --vcpus "$vcpus" --memory-mib 256 --vsock-uds "$sock" "$@" >/tmp/$name.log 2>&1 &
    vmm=$!
}

wait_health() { # wait_health NAME -> health JSON in /tmp/NAME.health, rc of crx-probe
    step "health-$1"
    ./bin/crx-probe health --uds "$sock" --timeout-ms 120000 >/tmp/$1.health &
    probe=$!
    while kill -0 "$probe" 2>/dev/null; do
        # Stop waiting for an agent whose crx-vmm is already gone.
        kill -0 "$vmm" 2>/dev/null || { kill "$probe" 2>/dev/null; break; }
        sleep 0.1
    done
    wait "$probe"
}

within() { # within SECONDS CONDITION...: polls CONDITION every 0.1 s; true once it holds
    limit=$(($1 * 10)); shift
    i=0
    until "$@"; do
        [ "$i" -ge "$limit" ] && return 1
        sleep 0.1; i=$((i + 1))
    done
}

vmm_gone() { ! kill -0 "$vmm" 2>/dev/null; }
no_vmm_procs() { [ "$(vmm_procs)" = 0 ]; }
no_socket() { [ ! -e "$sock" ]; }

wait_exit() { # wait_exit SECONDS -> sets vmm_rc (137 + note if it had to be killed)
    step "exit-$name"
    if ! within "$1" vmm_gone; then
        kill -KILL "$vmm"
        echo "crx-vmm still running after $1 s" >>/tmp/$name.log
    fi
    wait "$vmm"
    vmm_rc=$?
}

report() { # report NAME OK EXTRA_JSON
    health=$(head -c 4096 /tmp/$1.health 2>/dev/null)
    case "$health" in "{"*) ;; *) health=null ;; esac
    first=$(field first_insn_us /tmp/$1.log); ready=$(field ready_us /tmp/$1.log); exits=$(field exits /tmp/$1.log)
    echo "CRX-L1-RESULT {\"check\":\"$1\",\"ok\":$2,\"vmm_rc\":$vmm_rc,\"health\":$health,\"first_insn_us\":${first:-null},\"ready_us\":${ready:-null},\"exits_to_ready\":${exits:-null},\"procs_left\":$(vmm_procs)$3}"
    if [ "$2" != true ]; then
        rc=1
        echo "--- crx-vmm log ($1)"; tail -n 40 /tmp/$1.log
    fi
}

# 1. boot -> health -> clean poweroff, 1 vCPU
start_vmm health-1vcpu 1
wait_health health-1vcpu; health_rc=$?
./bin/crx-probe shutdown --uds "$sock" >/tmp/shutdown.json 2>&1
wait_exit 30
ok=false; [ "$health_rc" = 0 ] && [ "$vmm_rc" = 0 ] && [ ! -e "$sock" ] && [ "$(vmm_procs)" = 0 ] && ok=true
report health-1vcpu $ok ",\"shutdown\":$(head -c 512 /tmp/shutdown.json)"

# 2. guest-initiated connection to host port 1025, 2 vCPUs
rm -f /run/connect-2vcpu.sock_1025
./bin/crx-probe listen --uds-port-path /run/connect-2vcpu.sock_1025 --timeout-ms 120000 >/tmp/listen.json 2>&1 &
listener=$!
start_vmm connect-2vcpu 2 --cmdline crx.log_port=1025
wait_health connect-2vcpu; health_rc=$?
wait "$listener"; listen_rc=$?
./bin/crx-probe shutdown --uds "$sock" >/dev/null 2>&1
wait_exit 30
listen=$(head -c 2048 /tmp/listen.json); case "$listen" in "{"*) ;; *) listen=null ;; esac
cpus=$(sed -n 's/.*"online_cpus":\([0-9]*\).*/\1/p' /tmp/connect-2vcpu.health)
ok=false; [ "$health_rc" = 0 ] && [ "$listen_rc" = 0 ] && [ "$cpus" = 2 ] && [ "$vmm_rc" = 0 ] && ok=true
report connect-2vcpu $ok ",\"listen\":$listen,\"online_cpus\":${cpus:-null}"

# 3. SIGTERM of a running crx-vmm
start_vmm sigterm 1
wait_health sigterm; health_rc=$?
kill -TERM "$vmm"
wait_exit 10
ok=false; [ "$health_rc" = 0 ] && [ "$vmm_rc" = 0 ] && [ ! -e "$sock" ] && [ "$(vmm_procs)" = 0 ] && ok=true
report sigterm $ok ",\"socket_left\":$([ -e "$sock" ] && echo true || echo false)"

# 4. SIGKILL of a running crx-vmm
start_vmm sigkill 1
wait_health sigkill; health_rc=$?
kill -KILL "$vmm"
wait "$vmm"; vmm_rc=$?
# The clean-up child may need a moment after SIGKILL.
gone=false; within 5 no_socket && within 5 no_vmm_procs && gone=true
ok=false; [ "$health_rc" = 0 ] && [ "$vmm_rc" = 137 ] && [ "$gone" = true ] && ok=true
report sigkill $ok ",\"socket_gone\":$gone"

exit $rc
