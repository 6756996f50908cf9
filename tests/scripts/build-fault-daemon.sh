#!/usr/bin/env bash
# Builds the daemon with the fault-injecting engine (appliance feature `fault-injection`) as
# target/debug/vhost-appliance-faults, for the tests that hold chosen operations of the real
# daemon (tests/tests/inflight.rs). The ordinary target/debug/vhost-appliance is rebuilt
# without the feature afterwards (cargo keeps both builds, so repeated runs are cheap).
set -euo pipefail
cd "$(dirname "$0")/../.."
target="${CARGO_TARGET_DIR:-target}"
cargo build -p appliance --features fault-injection --locked
cp "$target/debug/vhost-appliance" "$target/debug/vhost-appliance-faults"
cargo build -p appliance --locked
