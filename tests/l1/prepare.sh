#!/usr/bin/env bash
# Prepares the nested-KVM rig's L1: Debian 12's own kernel package, unpacked, with the few
# modules an L1 needs to offer /dev/kvm (and vhost-vsock, tun, veth) to its payload.
#
# Why an L1 at all: this host's /dev/kvm is PVM, which cannot run a stock guest's user
# space. QEMU TCG emulates AMD SVM with nested paging, so a Linux started under TCG gets a
# real (emulated-hardware) KVM. See README.md beside this file.
#
# Idempotent. Cached outside the repo in ${CRX_CACHE_DIR:-/var/cache/crx}/l1/<package>_<version>/,
# so a new kernel package version gets a new directory and an unchanged one costs nothing.
# Prints the cache directory on its last line of stdout.
#
# Environment:
#   CRX_CACHE_DIR        cache root (default /var/cache/crx)
#   CRX_L1_KERNEL_PKG    kernel image package to use (default: what linux-image-amd64 depends on)
set -euo pipefail

log() { echo "crx-l1-prepare: $*" >&2; }
die() { echo "crx-l1-prepare: error: $*" >&2; exit 1; }

cache_root="${CRX_CACHE_DIR:-/var/cache/crx}/l1"
# Bumped whenever what a cache directory holds changes, so old ones are rebuilt.
cache_layout=3

# Modules the L1 loads, in the order we ask for them; their dependencies are added from
# modules.dep ahead of each. irqbypass+ccp+kvm+kvm-amd give /dev/kvm (TCG emulates AMD
# SVM, never Intel VMX, so kvm-intel is useless here). vhost_vsock lets a QEMU inside L1
# use vhost-vsock-device; tun/tap/veth/vhost_net cost a few hundred KiB and let payloads
# build the pod network the shim would.
wanted_modules=(irqbypass ccp kvm kvm-amd vhost_iotlb vhost vsock
    vmw_vsock_virtio_transport_common vhost_vsock tun tap veth vhost_net)

# Host tools the rig uses, by Debian package. Installed only when missing.
need_packages() {
    local missing=() pkg
    for pkg in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
            missing+=("$pkg")
        fi
    done
    if ((${#missing[@]})); then
        log "installing ${missing[*]}"
        apt_ready
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2 \
            || die "apt-get install ${missing[*]} failed"
    fi
}

apt_updated=0
apt_ready() {
    if ((apt_updated == 0)); then
        log "apt-get update"
        apt-get update >&2 || die "apt-get update failed (no network to Debian's mirrors?)"
        apt_updated=1
    fi
}

# The kernel image package linux-image-amd64 points at, e.g. linux-image-6.1.0-56-amd64.
kernel_package() {
    if [[ -n "${CRX_L1_KERNEL_PKG:-}" ]]; then
        echo "$CRX_L1_KERNEL_PKG"
        return
    fi
    local pkg
    pkg=$(apt-cache depends linux-image-amd64 2>/dev/null \
        | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9].*-amd64$/ { print $2; exit }')
    if [[ -z "$pkg" ]]; then
        apt_ready
        pkg=$(apt-cache depends linux-image-amd64 2>/dev/null \
            | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9].*-amd64$/ { print $2; exit }')
    fi
    [[ -n "$pkg" ]] || die "apt-cache does not know linux-image-amd64; is this Debian 12 (bookworm)?"
    echo "$pkg"
}

candidate_version() {
    apt-cache policy "$1" 2>/dev/null | awk '$1 == "Candidate:" { print $2; exit }'
}

# Prints the load order (module file names relative to the modules tree) for the wanted
# modules, dependencies first, each once. modules.dep lists a module's full dependency
# closure with the deepest last, so loading the list backwards satisfies every symbol.
load_order() {
    local moddir="$1"
    shift
    awk -v wanted="$*" '
        function norm(s) { gsub("-", "_", s); return s }
        function base(p,   b) { b = p; sub(".*/", "", b); sub("\\.ko(\\.(xz|zst|gz))?$", "", b); return norm(b) }
        function emit(p) { if (!(p in done)) { done[p] = 1; print p } }
        {
            key = $1; sub(":$", "", key)
            path[base(key)] = key
            deps[key] = ""
            for (i = NF; i >= 2; i--) deps[key] = deps[key] " " $i
        }
        END {
            n = split(wanted, want, " ")
            for (w = 1; w <= n; w++) {
                name = norm(want[w])
                if (!(name in path)) { print "MISSING " want[w]; continue }
                p = path[name]
                m = split(deps[p], d, " ")
                for (j = 1; j <= m; j++) emit(d[j])
                emit(p)
            }
        }' "$moddir/modules.dep"
}

# The uncompressed ELF inside the bzImage. Debian's kernel has CONFIG_PVH, so QEMU boots
# this ELF straight through its PVH entry and L1 skips the xz decompressor, which costs
# seconds under TCG. Without it run.sh falls back to the bzImage.
extract_vmlinux() {
    local bz="$1" out="$2" off
    # sed, not head: it reads to the end, so grep never dies of SIGPIPE under pipefail.
    off=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$bz" | LC_ALL=C cut -d: -f1 | sed -n 1p)
    [[ -n "$off" ]] && tail -c +"$((off + 1))" "$bz" >"$out.xz"
    # --single-stream: whatever follows the compressed kernel in the bzImage is not ours.
    if [[ -n "$off" ]] && xz -dc --single-stream "$out.xz" >"$out.tmp" 2>/dev/null \
        && [[ "$(head -c4 "$out.tmp" | od -An -c | tr -d ' ')" == '177ELF' ]] \
        && readelf -n "$out.tmp" 2>/dev/null | grep -Eq '\(0x00000012\)|PHYS32_ENTRY'; then
        mv "$out.tmp" "$out"
        rm -f "$out.xz"
    else
        rm -f "$out.tmp" "$out.xz"
        log "no PVH vmlinux found inside $(basename "$bz"); L1 will boot the bzImage (slower)"
    fi
}

build_cache() {
    local pkg="$1" version="$2" dest="$3"
    work=$(mktemp -d "$cache_root/.build.XXXXXX")

    log "downloading $pkg $version"
    (cd "$work" && apt-get download "$pkg=$version" >&2 2>"$work/download.err") || {
        cat "$work/download.err" >&2
        die "apt-get download $pkg=$version failed"
    }
    local deb
    deb=$(ls "$work"/*.deb)
    log "unpacking $(basename "$deb")"
    dpkg -x "$deb" "$work/x"
    rm -f "$deb"

    local kver
    kver=$(ls "$work/x/lib/modules")
    [[ -n "$kver" && -d "$work/x/lib/modules/$kver" ]] || die "$pkg has no lib/modules/<version>"
    local vmlinuz="$work/x/boot/vmlinuz-$kver"
    [[ -f "$vmlinuz" ]] || die "$pkg has no boot/vmlinuz-$kver"

    # The package ships no modules.dep (the postinst runs depmod); make our own.
    depmod -b "$work/x" "$kver"

    local out="$work/out"
    mkdir -p "$out/modules"
    cp "$vmlinuz" "$out/vmlinuz"
    extract_vmlinux "$vmlinuz" "$out/vmlinux"
    cp "$work/x/boot/config-$kver" "$out/config"

    local rel name
    : >"$out/load-order"
    while read -r rel; do
        [[ "$rel" == MISSING* ]] && die "module ${rel#MISSING } is not in $pkg"
        name=$(basename "$rel")
        case "$name" in
            # busybox insmod reads only plain ELF modules.
            *.ko.xz) xz -dc "$work/x/lib/modules/$kver/$rel" >"$out/modules/${name%.xz}"; name=${name%.xz} ;;
            *.ko.zst) zstd -qdc "$work/x/lib/modules/$kver/$rel" >"$out/modules/${name%.zst}"; name=${name%.zst} ;;
            *.ko.gz) gzip -dc "$work/x/lib/modules/$kver/$rel" >"$out/modules/${name%.gz}"; name=${name%.gz} ;;
            *) cp "$work/x/lib/modules/$kver/$rel" "$out/modules/$name" ;;
        esac
        echo "$name" >>"$out/load-order"
    done < <(load_order "$work/x/lib/modules/$kver" "${wanted_modules[@]}")

    cat >"$out/info" <<EOF
layout=$cache_layout
package=$pkg
version=$version
kernel_release=$kver
modules=${wanted_modules[*]}
EOF
    mv "$out" "$dest"
    rm -rf "$work"
    work=""
    log "cached $pkg $version in $dest ($(du -sh "$dest" | cut -f1))"
}

# A failed build leaves no half-built directory behind.
work=""
trap '[[ -z "$work" ]] || rm -rf "$work"' EXIT

main() {
    [[ $EUID -eq 0 ]] || die "must run as root (apt-get install / download into $cache_root)"
    mkdir -p "$cache_root"
    # One preparer at a time; a second one waits and then finds the cache done.
    exec 9>"$cache_root/.lock"
    flock 9

    need_packages busybox-static qemu-system-x86 cpio kmod xz-utils util-linux coreutils binutils

    local pkg version dest
    pkg=$(kernel_package)
    version=$(candidate_version "$pkg")
    if [[ -z "$version" || "$version" == "(none)" ]]; then
        apt_ready
        version=$(candidate_version "$pkg")
    fi
    [[ -n "$version" && "$version" != "(none)" ]] || die "no installable version of $pkg"

    dest="$cache_root/${pkg}_${version}"
    if grep -qx "layout=$cache_layout" "$dest/info" 2>/dev/null && [[ -f "$dest/vmlinuz" && -s "$dest/load-order" ]]; then
        log "cached: $dest"
    else
        rm -rf "$dest"
        build_cache "$pkg" "$version" "$dest"
    fi
    # run.sh boots whatever "current" names.
    ln -sfn "$(basename "$dest")" "$cache_root/current.tmp"
    mv -T "$cache_root/current.tmp" "$cache_root/current"
    echo "$dest"
}

main "$@"
