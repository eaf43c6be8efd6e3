#!/usr/bin/env bash
# Copies dynamically linked host binaries into DIR for the rig's L1, which has nothing
# but busybox: each BINARY to DIR/bin/<name>, and every shared library `ldd` names for
# them (the loader included) to DIR/sysroot/<its absolute host path>.
#
#   bundle-bin.sh DIR BINARY...
#
# In L1, `cp -a DIR/sysroot/. /` puts the libraries where the binaries look for them
# (/lib64/ld-linux-x86-64.so.2, /lib/x86_64-linux-gnu/...): they then run as they are,
# so a program that re-executes itself (/proc/self/exe) or starts another bundled one
# needs no wrapper. Static binaries are copied alone.
set -euo pipefail

die() { echo "crx-l1-bundle-bin: error: $*" >&2; exit 1; }
(($# >= 2)) || die "usage: $0 DIR BINARY..."
dest="$1"; shift
mkdir -p "$dest/bin" "$dest/sysroot"

copy_lib() { # copy_lib HOST_PATH: to DIR/sysroot/HOST_PATH, dereferenced
    local path="$1"
    [[ "$path" == /* ]] || die "ldd named a relative library path: $path"
    mkdir -p "$dest/sysroot$(dirname "$path")"
    cp -L "$path" "$dest/sysroot$path"
}

for bin in "$@"; do
    [[ -f "$bin" && -x "$bin" ]] || die "$bin is not an executable file"
    cp -L "$bin" "$dest/bin/$(basename "$bin")"
    # A static binary makes ldd print "not a dynamic executable" and fail.
    out=$(ldd "$bin" 2>&1) || { [[ "$out" == *"not a dynamic executable"* ]] && continue; die "ldd $bin: $out"; }
    while read -r line; do
        # "libfoo.so.1 => /lib/x86_64-linux-gnu/libfoo.so.1 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        case "$line" in
            *"=> not found"*) die "ldd: ${line%% *} not found for $bin" ;;
            *"=> /"*) path=${line#*=> }; copy_lib "${path%% (*}" ;;
            /*) copy_lib "${line%% (*}" ;;
        esac
    done <<<"$out"
done
