#!/usr/bin/env bash
# The main job: installs what is missing, builds the guest kernel (cached), the agent and
# the VMM, then boots a pod VM with the backend `hypervisor = "auto"` picks on this host,
# talks to its agent and powers it off, printing each step. Safe to run again.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
prepare_everything
cd "$CRX_ROOT"
cargo run --quiet --release -p crx-tests --bin crx-demo
