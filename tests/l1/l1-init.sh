#!/bin/busybox sh
# /init of the nested-KVM rig's L1 (copied into the L1 initramfs by run.sh).
# Gives the payload /dev/kvm, runs /payload/run.sh, reports its exit code on the console
# as `CRX-L1-EXIT <rc>` and powers off. Setup failures are reported as `CRX-L1-FAIL <why>`
# and power off without an exit line, so the host can tell them from a payload's failure.
#
# A watchdog runs beside it (see `watchdog` below): `CRX-L1-ALIVE` every crx.l1alive=SECS
# (30) and, when crx.l1stall=SECS is given (the lanes: 240) and no step was marked for that
# long, a `CRX-L1-STALL` report (tasks, kernel stacks, blocked tasks, the payload's logs)
# and power-off.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
# Payloads mark progress with `step NAME` (one line each, see tests/l1/README.md): the
# step goes to the console and, as "NAME UPTIME", to this file, which the watchdog reads.
export CRX_L1_STEP_FILE=/run/crx-l1-step
# Files (one path a line) whose tails the watchdog prints in a stall report.
export CRX_L1_LOGS=/run/crx-l1-logs

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

mark_step() { # mark_step NAME: what the payload's `step` does, for init's own steps
    read -r step_at _ </proc/uptime
    echo "$1 $step_at" >"$CRX_L1_STEP_FILE"
}

cmdline_arg() { # cmdline_arg NAME DEFAULT: the whole-seconds value of NAME= on the command line
    for kv in $(cat /proc/cmdline); do
        case "$kv" in "$1="*) v=${kv#*=}; case "$v" in '' | *[!0-9]*) ;; *) echo "$v"; return ;; esac ;; esac
    done
    echo "$2"
}

# --- watchdog. A stalled payload otherwise ends only at the host's timeout (15 min for a
# lane) with nothing saying where it hung. Everything here is shell builtins but `sleep`,
# so a loaded L1 pays next to nothing for it; the report itself may fork freely.
task_stat() { # task_stat DIR: sets comm, state, ppid of /proc/PID (or .../task/TID)
    { read -r st <"$1/stat"; } 2>/dev/null || return 1
    comm=${st#*(}; comm=${comm%)*}
    rest=${st##*) }; state=${rest%% *}; rest=${rest#* }; ppid=${rest%% *}
}

busy_tasks() { # sets busy: "comm/pid:state[:wchan]" of D and R tasks (threads too), at most 8
    busy="" n=0
    for d in /proc/[0-9]*/task/[0-9]*; do
        task_stat "$d" || continue
        case "$state" in D | R) ;; *) continue ;; esac
        tid=${d##*/}
        [ "$tid" = "$self" ] && continue
        w=""
        [ "$state" = D ] && { read -r w <"$d/wchan"; } 2>/dev/null
        busy="$busy $comm/$tid:$state${w:+:$w}"
        n=$((n + 1)); [ "$n" -ge 8 ] && break
    done
    busy=${busy# }
}

stall_report() { # everything that says where the payload hangs, then power off
    # idle_s: RTC seconds since the watchdog first saw this step (see watchdog).
    echo "CRX-L1-STALL {\"step\":\"$step\",\"step_at\":$at,\"uptime_s\":$up,\"idle_s\":$idle,\"limit_s\":$stall_after}"
    # Every task (threads too: a vCPU thread of crx-vmm is where a KVM hang shows) with
    # its state and wait channel; kernel stacks of user-space tasks and of any kernel
    # thread in D state.
    for d in /proc/[0-9]*/task/[0-9]*; do
        task_stat "$d" || continue
        tid=${d##*/}
        [ "$tid" = "$self" ] && continue
        w=$(cat "$d/wchan" 2>/dev/null)
        kthread=0
        { [ "$ppid" = 2 ] || [ "$tid" = 2 ]; } && kthread=1
        [ "$kthread" = 1 ] && [ "$state" != D ] && continue
        cmd=$(tr '\0' ' ' <"${d%/task/*}/cmdline" 2>/dev/null | head -c 160)
        pid=${d#/proc/}; pid=${pid%%/*}
        echo "CRX-L1-TASK tid=$tid pid=$pid ppid=$ppid state=$state comm=$comm wchan=${w:-0} cmd=$cmd"
        head -n 16 "$d/stack" 2>/dev/null | sed "s/^/CRX-L1-STACK $tid /"
    done
    while read -r log; do
        [ -f "$log" ] || continue
        echo "CRX-L1-LOG $log (last 25 lines)"
        tail -n 25 "$log" | tr -d '\r' | cut -c1-300 | sed 's/^/CRX-L1-LOG| /'
    done <"$CRX_L1_LOGS" 2>/dev/null
    # KVM's global counters twice, 2 s apart: rising exits mean a vCPU bouncing between
    # L1 and L2; frozen ones, a vCPU thread stuck in L1's kernel.
    [ -d /sys/kernel/debug/kvm ] || mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
    for pass in 1 2; do
        stats=""
        for f in /sys/kernel/debug/kvm/*; do
            [ -f "$f" ] || continue
            { read -r v <"$f"; } 2>/dev/null && [ "$v" != 0 ] && stats="$stats ${f##*/}=$v"
        done
        echo "CRX-L1-KVMSTAT $pass$stats"
        [ "$pass" = 1 ] && sleep 2
    done
    echo "CRX-L1-DMESG (last 120 lines before SysRq)"
    dmesg | tail -n 120 | sed 's/^/CRX-L1-DMESG| /'
    # SysRq w: blocked (D) tasks with stacks; l: a backtrace of every CPU (a CPU spinning
    # in the kernel). Read back from the ring: `quiet` keeps them off the console.
    dmesg -c >/dev/null
    echo w >/proc/sysrq-trigger
    echo l >/proc/sysrq-trigger
    sleep 2
    dmesg | head -n 400 | sed 's/^/CRX-L1-SYSRQ| /'
    echo "CRX-L1-STALL-END"
}

wall_s() { # sets wall: whole seconds of the RTC (QEMU's follows the host's clock), else uptime
    { read -r wall </sys/class/rtc/rtc0/since_epoch; } 2>/dev/null && return
    read -r wall _ </proc/uptime
    wall=${wall%%.*}
}

watchdog() {
    { read -r self _ </proc/self/stat; } 2>/dev/null
    # Idle time is measured on the RTC, not L1's uptime: under a loaded TCG host L1's
    # clock has been seen running 11x fast (a TSC calibrated while its vCPU was
    # descheduled), which would turn a 20 s step into a "stall" of 220 s.
    last_seen=""
    wall_s
    progress_at=$wall
    while :; do
        sleep "$alive_every"
        read -r up _ </proc/uptime
        read -r l1 l5 l15 _ </proc/loadavg
        busy_tasks
        echo "CRX-L1-ALIVE $up $l1 $l5 $l15 $busy"
        [ "$stall_after" -gt 0 ] || continue
        { read -r step at <"$CRX_L1_STEP_FILE"; } 2>/dev/null || continue
        wall_s
        if [ "$step $at" != "$last_seen" ]; then
            last_seen="$step $at" progress_at=$wall
        fi
        idle=$((wall - progress_at))
        if [ "$idle" -ge "$stall_after" ]; then
            stall_report
            halt_l1
        fi
    done
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

alive_every=$(cmdline_arg crx.l1alive 30)
stall_after=$(cmdline_arg crx.l1stall 0)
: >"$CRX_L1_LOGS"
mark_step l1-modules
watchdog &
watchdog_pid=$!

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
# One idle vCPU with a disabled APIC for the whole run, so L2 boots never make L1's KVM
# rewrite its own text (kvm-hold.c says why that can hang L1 under TCG).
if out=$(kvm-hold 2>&1); then
    echo "CRX-L1-KVM-HOLD ok"
else
    echo "CRX-L1-WARN kvm-hold failed (L2 boots will patch L1's KVM text): $out"
fi
kvm_s=$(uptime_s)
echo "CRX-L1-READY {\"init_s\":$init_s,\"kvm_s\":$kvm_s,\"cpus\":$(grep -c ^processor /proc/cpuinfo)}"

export CRX_L1=1 HOME=/tmp TMPDIR=/tmp
mark_step payload-start
cd /payload && ./run.sh
rc=$?
kill "$watchdog_pid" 2>/dev/null
echo "CRX-L1-DONE {\"uptime_s\":$(uptime_s)}"
echo "CRX-L1-EXIT $rc"
halt_l1
