#!/usr/bin/env bash
# Builds the crx guest initramfs: an uncompressed newc cpio holding the static crx-agent
# as /init, the empty mount points it needs and /dev/console. Same inputs, same bytes.
#
# Usage: rootfs/build.sh AGENT_BINARY OUTPUT.cpio
# Environment: SOURCE_DATE_EPOCH (default 0) is the mtime of every entry.
set -euo pipefail
exec </dev/null

die() { printf '[rootfs] ERROR: %s\n' "$*" >&2; exit 1; }
log() { printf '[rootfs] %s\n' "$*" >&2; }

(($# == 2)) || die "usage: $0 AGENT_BINARY OUTPUT.cpio"
agent=$1
output=$2

[[ -f $agent && -r $agent ]] || die "agent binary '$agent' does not exist or is unreadable (build it: cargo build -p crx-agent --release --target x86_64-unknown-linux-musl)"
command -v readelf >/dev/null || die "readelf is missing (apt-get install -y binutils)"
readelf -h "$agent" >/dev/null 2>&1 || die "'$agent' is not an ELF binary"
# The initramfs has no libc or loader: a dynamically linked /init dies before main().
if readelf -lW "$agent" | grep -q 'Requesting program interpreter'; then
    die "'$agent' is dynamically linked; /init must be static (build for x86_64-unknown-linux-musl)"
fi
readelf -h "$agent" | grep -q 'Advanced Micro Devices X86-64' \
    || die "'$agent' is not an x86_64 binary"

if ! command -v cpio >/dev/null; then
    log "installing cpio"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends cpio >&2 \
        || die "cpio is missing and could not be installed (apt-get install -y cpio)"
fi
((EUID == 0)) || die "must run as root (creating the /dev/console node needs mknod)"

epoch=${SOURCE_DATE_EPOCH:-0}
stage=$(mktemp -d "${TMPDIR:-/tmp}/crx-rootfs.XXXXXX")
out_tmp=""
cleanup() { rm -rf "$stage"; [[ -z $out_tmp ]] || rm -f "$out_tmp"; }
trap cleanup EXIT

umask 022
install -m 0755 "$agent" "$stage/init"
# Debug info is useless in the guest and would be copied into guest RAM at every boot.
strip --strip-all "$stage/init"
# Mount points the agent uses (sysfs brings /sys/fs/cgroup with it).
mkdir -m 0755 "$stage/proc" "$stage/sys" "$stage/dev" "$stage/run"
mkdir -m 1777 "$stage/tmp"
# The kernel opens /dev/console for PID 1's stdin/stdout/stderr before /init runs, and
# devtmpfs is only auto-mounted for a disk root, not for an initramfs. Without this
# node PID 1 starts with fds 0-2 closed and its first open() would become "stderr".
mknod -m 0600 "$stage/dev/console" c 5 1

find "$stage" -exec touch -h -d "@$epoch" {} +

mkdir -p "$(dirname "$output")"
out_tmp=$(mktemp "$(dirname "$output")/.$(basename "$output").XXXXXX")
(cd "$stage" && find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort \
    | cpio --create --format=newc --reproducible --owner=0:0 --quiet) >"$out_tmp"
chmod 0644 "$out_tmp"
mv -f "$out_tmp" "$output"
out_tmp=""
log "wrote $output ($(stat -c %s "$output") bytes)"
