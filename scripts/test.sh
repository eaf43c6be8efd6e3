#!/usr/bin/env bash
# Runs crx's whole test suite on a Debian 12 machine: installs what is missing, builds
# the guest kernel (cached), the static agent/VMM/tools and the initramfs, then runs
# every test — unit tests, device models, tiny KVM guests, real VMs under QEMU, and the
# crx-vmm VM lane inside a nested-KVM L1. Safe to run again; the kernel is rebuilt only
# when its config or source changes.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
prepare_everything

log "running the test suite"
cd "$CRX_ROOT"
# Two test threads: a TCG guest keeps one core busy, and this is a 2-core machine.
cargo test --workspace --no-fail-fast -- --test-threads=2
