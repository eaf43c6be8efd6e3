# Shared steps of crx's top-level scripts: install what a fresh Debian 12 machine lacks,
# build the guest artifacts. Sourced, not run. Every step is safe to repeat.

CRX_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CRX_CACHE_DIR="${CRX_CACHE_DIR:-/var/cache/crx}"
MUSL_TARGET=x86_64-unknown-linux-musl
export CRX_ROOT CRX_CACHE_DIR

log() { printf '\033[1m[crx]\033[0m %s\n' "$*" >&2; }
die() { printf '[crx] error: %s\n' "$*" >&2; exit 1; }

need_root() {
    [ "$(id -u)" = 0 ] || die "run as root (crx needs /dev/kvm, mounts, network namespaces): sudo $0"
}

# Debian packages nothing else installs: the C toolchain Rust links with, QEMU for the
# QEMU backend, musl-tools for the static builds, busybox-static, fio and iperf3 for the
# device tests' and benchmarks' guests (tests/src/test_guest.rs). The kernel build, the initramfs
# builder and the nested-KVM rig install their own (kernel-config/build.sh,
# rootfs/build.sh, tests/l1/prepare.sh).
CRX_APT_PACKAGES=(build-essential qemu-system-x86 musl-tools busybox-static fio iperf3 libseccomp-dev)
# containerd (Debian 12: 1.6.20, task API v2) and runc for the shim's tests against a real
# containerd (tests/src/containerd.rs starts a private one; nothing is enabled system-wide).
CRX_APT_PACKAGES+=(containerd runc)
# containerd's CRI tests (tests/src/cri/): the bridge, host-local, portmap and loopback CNI plugins,
# iptables (portmap's DNAT for host ports), and protoc, which the k8s-cri crate runs at build time.
CRX_APT_PACKAGES+=(containernetworking-plugins iptables protobuf-compiler)

install_packages() {
    local missing=()
    for p in "${CRX_APT_PACKAGES[@]}" "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing Debian packages: ${missing[*]}"
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
    fi
    command -v cargo >/dev/null || die "cargo not found: install Rust with rustup first"
    if ! rustup target list --installed 2>/dev/null | grep -qx "$MUSL_TARGET"; then
        log "adding Rust target $MUSL_TARGET (static agent and VMM)"
        rustup target add "$MUSL_TARGET"
    fi
}

# Builds (or finds in the cache) the guest kernel; sets CRX_KERNEL_DIR.
build_kernel() {
    log "guest kernel (cached under $CRX_CACHE_DIR/kernel)"
    CRX_KERNEL_DIR="$("$CRX_ROOT/kernel-config/build.sh" | tail -n 1)"
    [ -f "$CRX_KERNEL_DIR/vmlinux" ] || die "kernel build did not produce $CRX_KERNEL_DIR/vmlinux"
    export CRX_KERNEL="$CRX_KERNEL_DIR/vmlinux" CRX_KERNEL_DIR
}

# Builds the static binaries and the guest initramfs; sets CRX_INITRAMFS and CRX_MUSL_BIN.
build_guest_and_tools() {
    log "building static crx-agent, crx-vmm, crx-probe ($MUSL_TARGET, release)"
    (cd "$CRX_ROOT" && cargo build --release --target "$MUSL_TARGET" \
        -p crx-agent -p crx-vmm -p crx-tests --bin crx-agent --bin crx-vmm --bin crx-probe)
    CRX_MUSL_BIN="$CRX_ROOT/target/$MUSL_TARGET/release"
    mkdir -p "$CRX_ROOT/target/guest"
    CRX_INITRAMFS="$CRX_ROOT/target/guest/initramfs.cpio"
    "$CRX_ROOT/rootfs/build.sh" "$CRX_MUSL_BIN/crx-agent" "$CRX_INITRAMFS" >&2
    export CRX_INITRAMFS CRX_MUSL_BIN
}

# Builds the containerd shim for this host (release); sets CRX_SHIM_DIR, where the
# containerd the tests start finds `containerd-shim-crx-v2`.
build_shim() {
    log "building containerd-shim-crx-v2 (release)"
    (cd "$CRX_ROOT" && cargo build --release -p containerd-shim-crx-v2 --bin containerd-shim-crx-v2)
    export CRX_SHIM_DIR="$CRX_ROOT/target/release"
}

# Everything both top-level scripts need before they run anything: root, packages, the
# guest kernel, the static binaries and the initramfs, with their paths exported.
prepare_everything() {
    need_root
    install_packages
    build_kernel
    build_guest_and_tools
    build_shim
    export CRX_BIN_CRX_VMM="$CRX_MUSL_BIN/crx-vmm" CRX_BIN_CRX_PROBE="$CRX_MUSL_BIN/crx-probe" \
           CRX_BIN_CRX_AGENT="$CRX_MUSL_BIN/crx-agent"
}
