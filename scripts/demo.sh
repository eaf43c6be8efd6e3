#!/usr/bin/env bash
# The main job: installs what is missing, builds the guest kernel (cached), the agent, the
# VMM and the shim, then starts a private containerd with crx's runtime handler, runs a
# pod with `crx` through CRI (a container that prints where it runs, an ExecSync), prints
# its output, and removes it, checking nothing is left. Safe to run again.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
prepare_everything
cd "$CRX_ROOT"
cargo run --quiet --release -p crx-tests --bin crx-demo
