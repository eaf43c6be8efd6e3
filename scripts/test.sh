#!/usr/bin/env bash
# Runs crx's whole test suite on a Debian 12 machine: installs what is missing, builds
# the guest kernel (cached), the static agent/VMM/tools and the initramfs, then runs
# every test — unit tests, device models, tiny KVM guests, real VMs under QEMU, and the
# crx-vmm VM lane inside a nested-KVM L1. Safe to run again; the kernel is rebuilt only
# when its config or source changes.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
need_root
install_packages
build_kernel
build_guest_and_tools

export CRX_INITRAMFS CRX_KERNEL
export CRX_BIN_CRX_VMM="$CRX_MUSL_BIN/crx-vmm" CRX_BIN_CRX_PROBE="$CRX_MUSL_BIN/crx-probe" \
       CRX_BIN_CRX_AGENT="$CRX_MUSL_BIN/crx-agent"

log "running the test suite"
cd "$CRX_ROOT"
# Two test threads: a TCG guest keeps one core busy, and this is a 2-core machine.
cargo test --workspace --no-fail-fast -- --test-threads=2
