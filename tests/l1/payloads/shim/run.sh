#!/bin/sh
# The shim lane (issue 6), run inside the nested-KVM L1: Debian's containerd and ctr
# (bundled with their glibc: L1 has only busybox) drive our containerd-shim-crx-v2,
# which starts each pod with crx-vmm on L1's KVM. Cases, one CRX-L1-RESULT line each
# (the Rust test, tests/tests/shim_l1_lane.rs, asserts on them):
#   setup   containerd answers, the busybox image is imported (native snapshotter)
#   run     ctr run --rm ... sh -c 'echo hi; exit 3': prints hi, exits 3; wall time
#   exec    a detached container; ctr task exec in it: output and exit code
#   kill    ctr task kill -s TERM ends it; ctr task delete; ctr container delete
#   clean   afterwards: no crx-vmm, no shim, nothing under /run/crx, no mount there
# Payload layout: host/bin (containerd, ctr, containerd-shim-crx-v2), host/sysroot
# (their libraries at host paths), bin/crx-vmm, guest/vmlinux, guest/initramfs.cpio,
# image/busybox-oci.tar, and `image-ref` (the reference the tar is imported under).
export PATH=/payload/host/bin:/bin:/sbin:/usr/bin:/usr/sbin
rc=0
DIR=/tmp/ctrd
SOCK=$DIR/containerd.sock
NS=crx-l1
RT=io.containerd.crx.v2
IMG=$(cat image-ref)
CTR_TIMEOUT=300

# `CRX-L1-STEP NAME UPTIME` before each step, so a stall's console tail names the step;
# the step file is what L1's watchdog (l1-init.sh) measures progress by.
step() { # its own variable names: a payload's $up must survive it
    read -r crx_step_at _ </proc/uptime
    echo "CRX-L1-STEP $1 $crx_step_at"
    echo "$1 $crx_step_at" >"${CRX_L1_STEP_FILE:-/dev/null}"
}

esc() { tr -d '\r"\\' | tr '\n\t' '  ' | head -c 600 | sed 's/ *$//'; }
now() { cut -d' ' -f1 /proc/uptime; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
within() { # within SECONDS CONDITION...: polls CONDITION every 0.2 s; true once it holds
    limit=$(($1 * 5)); shift
    i=0
    until "$@"; do
        [ "$i" -ge "$limit" ] && return 1
        sleep 0.2; i=$((i + 1))
    done
}
ctr_() { timeout "$CTR_TIMEOUT" ctr -a "$SOCK" -n "$NS" "$@"; }
procs() { # procs PREFIX: pids whose comm starts with PREFIX
    for d in /proc/[0-9]*; do
        case "$(cat "$d/comm" 2>/dev/null)" in "$1"*) printf '%s ' "${d#/proc/}" ;; esac
    done
}
task_status() { ctr_ task ls 2>/dev/null | awk -v id="$1" '$1 == id { print $3 }'; }
is_status() { [ "$(task_status "$1")" = "$2" ]; }
crx_mounts() { awk '$2 ~ "^/run/crx(/|$)" { printf "%s ", $2 }' /proc/mounts; }
ctrd_log() { echo "--- containerd log (last $1 lines)"; tail -n "$1" "$DIR/containerd.log"; }

# --- the bundled glibc programs, the shim's config, containerd -------------------------
step sysroot
cp -a host/sysroot/. /
mkdir -p /etc/crx "$DIR" /run/crx
cat >/etc/crx/config.toml <<EOF
hypervisor = "crx-vmm"
kernel = "/payload/guest/vmlinux"
initramfs = "/payload/guest/initramfs.cpio"
crx_vmm = "/payload/bin/crx-vmm"
agent_timeout_secs = 300
log_level = "debug"
EOF
cat >"$DIR/config.toml" <<EOF
version = 2
root = "$DIR/root"
state = "/run/ctrd-state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.overlayfs"]

[grpc]
  address = "$SOCK"

[ttrpc]
  address = "$SOCK.ttrpc"

[debug]
  level = "debug"

[plugins."io.containerd.internal.v1.opt"]
  path = "$DIR/opt"
EOF
# No overlay module in L1: the native snapshotter copies layers and hands the shim a
# bind mount, which the shim binds into the pod share like any rootfs.
export CONTAINERD_SNAPSHOTTER=native
step containerd-start
echo "$DIR/containerd.log" >>"${CRX_L1_LOGS:-/dev/null}"
t0=$(now)
containerd --config "$DIR/config.toml" >"$DIR/containerd.log" 2>&1 &
ctrd=$!
ctrd_up() { kill -0 "$ctrd" 2>/dev/null || return 0; ctr_ version >/dev/null 2>&1; }
within 60 ctrd_up
up=false; kill -0 "$ctrd" 2>/dev/null && ctr_ version >/dev/null 2>&1 && up=true
ctrd_s=$(since "$t0")
imported=false import_out=""
if [ "$up" = true ]; then
    step image-import
    t0=$(now)
    import_out=$(ctr_ images import image/busybox-oci.tar 2>&1) &&
        ctr_ images ls -q 2>/dev/null | grep -qx "$IMG" && imported=true
    import_s=$(since "$t0")
fi
ok=false; [ "$up" = true ] && [ "$imported" = true ] && ok=true
echo "CRX-L1-RESULT {\"check\":\"setup\",\"ok\":$ok,\"containerd_up\":$up,\"containerd_s\":$ctrd_s,\"imported\":$imported,\"import_s\":${import_s:-null},\"import_out\":\"$(echo "$import_out" | esc)\"}"
if [ "$ok" != true ]; then
    ctrd_log 40
    exit 1
fi

# --- (a) ctr run --rm: output and exit code ---------------------------------------------
step ctr-run-rm
t0=$(now)
ctr_ run --rm --runtime "$RT" "$IMG" run-a sh -c 'echo hi; exit 3' >/tmp/a.out 2>/tmp/a.err
a_rc=$?
a_s=$(since "$t0")
out=$(esc </tmp/a.out)
ok=false; [ "$a_rc" = 3 ] && [ "$out" = hi ] && ok=true
ready=$(grep 'agent ready' "$DIR/containerd.log" | sed -n 's/.*ready_after=\([^ ]*\).*/\1/p' | head -n 1 | esc)
echo "CRX-L1-RESULT {\"check\":\"run\",\"ok\":$ok,\"rc\":$a_rc,\"stdout\":\"$out\",\"stderr\":\"$(esc </tmp/a.err)\",\"wall_s\":$a_s,\"agent_ready_after\":\"$ready\"}"
[ "$ok" = true ] || { rc=1; ctrd_log 60; }

# Where case (a)'s wall time went: the shim's own log lines (containerd copies them into
# its log), seconds after the shim's first line, e.g. "0.00 start;1.10 create;...".
timeline=$(grep -E '(INFO|DEBUG).* (start|create|starting the pod VM|agent ready|process started|process exited|pod VM stopped|shutdown: no task left)($| )' \
    "$DIR/containerd.log" | awk '
    { split($1, t, "T"); split(t[2], h, ":"); s = h[1] * 3600 + h[2] * 60 + h[3]
      if (!seen++) first = s
      msg = $0; sub(/^[^ ]+ +[A-Z]+ +/, "", msg); sub(/ [a-z_]+=.*$/, "", msg)
      printf "%.2f %s;", s - first, msg }' | esc)
echo "CRX-L1-RESULT {\"check\":\"run-timeline\",\"ok\":true,\"shim\":\"$timeline\"}"

# --- (b) a detached container, ctr task exec in it --------------------------------------
step ctr-run-detached
t0=$(now)
ctr_ run -d --runtime "$RT" "$IMG" run-b sh -c 'trap "exit 0" TERM; while :; do sleep 1; done' \
    >/tmp/b.out 2>&1
b_rc=$?
running=false; within 120 is_status run-b RUNNING && running=true
b_s=$(since "$t0")
# crx-vmm's own boot figures, from its log in the pod's run directory (gone at the end).
vmm_log=$(ls /run/crx/*/crx-vmm.log 2>/dev/null | head -n 1)
first_insn=$(sed -n 's/.*first_insn_us=\([0-9]*\).*/\1/p' "$vmm_log" 2>/dev/null | head -n 1)
ready_us=$(sed -n 's/.*ready_us=\([0-9]*\).*/\1/p' "$vmm_log" 2>/dev/null | head -n 1)
ready_b=$(grep 'agent ready' "$DIR/containerd.log" | sed -n 's/.*ready_after=\([^ ]*\).*/\1/p' | sed -n 2p | esc)
step ctr-exec
ctr_ task exec --exec-id e1 run-b sh -c 'echo from-exec $((6 * 7)); exit 5' >/tmp/e.out 2>/tmp/e.err
e_rc=$?
out=$(esc </tmp/e.out)
ok=false; [ "$b_rc" = 0 ] && [ "$running" = true ] && [ "$e_rc" = 5 ] && [ "$out" = "from-exec 42" ] && ok=true
echo "CRX-L1-RESULT {\"check\":\"exec\",\"ok\":$ok,\"run_rc\":$b_rc,\"run_out\":\"$(esc </tmp/b.out)\",\"running\":$running,\"start_s\":$b_s,\"first_insn_us\":${first_insn:-null},\"vmm_ready_us\":${ready_us:-null},\"agent_ready_after\":\"$ready_b\",\"exec_rc\":$e_rc,\"stdout\":\"$out\",\"stderr\":\"$(esc </tmp/e.err)\",\"vmm_pids\":\"$(procs crx-vmm)\"}"
[ "$ok" = true ] || { rc=1; ctrd_log 60; }

# --- (c) kill -s TERM, task delete, container delete -------------------------------------
step ctr-kill
t0=$(now)
k_out=$(ctr_ task kill -s TERM run-b 2>&1); k_rc=$?
stopped=false; within 120 is_status run-b STOPPED && stopped=true
k_s=$(since "$t0")
step ctr-delete
d_out=$(ctr_ task delete run-b 2>&1); d_rc=$?
c_out=$(ctr_ container delete run-b 2>&1); c_rc=$?
left_tasks=$(ctr_ task ls -q 2>&1 | esc); left_ctrs=$(ctr_ container ls -q 2>&1 | esc)
ok=false
[ "$k_rc" = 0 ] && [ "$stopped" = true ] && [ "$d_rc" = 0 ] && [ "$c_rc" = 0 ] &&
    [ -z "$left_tasks" ] && [ -z "$left_ctrs" ] && ok=true
echo "CRX-L1-RESULT {\"check\":\"kill\",\"ok\":$ok,\"kill_rc\":$k_rc,\"kill_out\":\"$(echo "$k_out" | esc)\",\"stopped\":$stopped,\"stop_s\":$k_s,\"delete_rc\":$d_rc,\"delete_out\":\"$(echo "$d_out" | esc)\",\"container_rm_rc\":$c_rc,\"container_rm_out\":\"$(echo "$c_out" | esc)\",\"tasks_left\":\"$left_tasks\",\"containers_left\":\"$left_ctrs\"}"
[ "$ok" = true ] || { rc=1; ctrd_log 60; }

# --- (d) nothing left behind ----------------------------------------------------------------
no_leftovers() {
    [ -z "$(procs crx-vmm)" ] && [ -z "$(procs containerd-shim)" ] &&
        [ -z "$(ls -A /run/crx 2>/dev/null)" ] && [ -z "$(crx_mounts)" ]
}
step leftovers
within 60 no_leftovers
vmm_left=$(procs crx-vmm); shim_left=$(procs containerd-shim)
run_left=$(ls -A /run/crx 2>/dev/null | esc); mounts_left=$(crx_mounts | esc)
ok=false; no_leftovers && ok=true
echo "CRX-L1-RESULT {\"check\":\"clean\",\"ok\":$ok,\"crx_vmm\":\"$vmm_left\",\"shims\":\"$shim_left\",\"run_crx\":\"$run_left\",\"mounts\":\"$mounts_left\"}"
[ "$ok" = true ] || { rc=1; ctrd_log 40; }

step done
kill "$ctrd" 2>/dev/null
within 10 eval '! kill -0 "$ctrd" 2>/dev/null'
exit $rc
