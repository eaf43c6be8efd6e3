#!/usr/bin/env bash
# Copies this host's qemu-system-x86_64, the shared libraries it links (per ldd), its
# loader and the firmware the microvm machine needs into DIR, so a payload can run QEMU
# inside the rig's L1, which has nothing but busybox.
#
#   bundle-qemu.sh DIR
#
# Run it inside L1 as DIR/qemu-system-x86_64 (a wrapper that starts the copied binary
# through the copied loader with the copied libraries and firmware); arguments pass through.
set -euo pipefail

die() { echo "crx-l1-bundle-qemu: error: $*" >&2; exit 1; }
(($# == 1)) || die "usage: $0 DIR"
dest="$1"
qemu="${CRX_L1_QEMU:-qemu-system-x86_64}"
qemu_path=$(command -v "$qemu") || die "$qemu not found: apt-get install qemu-system-x86"
firmware_dir=/usr/share/qemu

mkdir -p "$dest/bin" "$dest/lib" "$dest/share"
cp -L "$qemu_path" "$dest/bin/qemu-system-x86_64"

loader=""
while read -r line; do
    # "libfoo.so.1 => /lib/x86_64-linux-gnu/libfoo.so.1 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
    path=""
    case "$line" in
        *"=> not found"*) die "ldd: ${line%% *} not found for $qemu_path" ;;
        *"=> /"*) path=${line#*=> }; path=${path%% (*} ;;
        /*) path=${line%% (*}; loader="$path" ;;
    esac
    [[ -n "$path" ]] && cp -L "$path" "$dest/lib/"
done < <(ldd "$qemu_path")
[[ -n "$loader" ]] || die "ldd named no dynamic loader for $qemu_path"

# microvm boots through qboot: upstream names it bios-microvm.bin, Debian's QEMU 7.2
# loads it as qboot.rom. The others serve -kernel on other machines; a few KiB each.
for fw in bios-microvm.bin qboot.rom linuxboot_dma.bin pvh.bin; do
    [[ -f "$firmware_dir/$fw" ]] || die "$firmware_dir/$fw missing: apt-get install qemu-system-data"
    cp -L "$firmware_dir/$fw" "$dest/share/"
done

cat >"$dest/qemu-system-x86_64" <<EOF
#!/bin/sh
# Runs the bundled QEMU through the bundled loader (L1 has no glibc of its own).
here=\$(cd "\$(dirname "\$0")" && pwd)
exec "\$here/lib/$(basename "$loader")" --library-path "\$here/lib" "\$here/bin/qemu-system-x86_64" -L "\$here/share" "\$@"
EOF
chmod 755 "$dest/qemu-system-x86_64"
