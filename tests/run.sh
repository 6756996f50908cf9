#!/usr/bin/env bash
# The test command: installs what the tests need, then runs formatting and lint gates and
# every test (unit, VM-less end-to-end against the real daemon binary, consumer VMs).
set -euo pipefail
cd "$(dirname "$0")/.."

bash tests/scripts/install-deps.sh
echo "== consumer VM image (cached by content hash)"
bash image-builder/build-image.sh consumer
echo "== bookworm root file systems for the packaging tests (cached by content hash; ~5 min when built)"
bash image-builder/build-rootfs.sh base
bash image-builder/build-rootfs.sh libvirt
echo "== QEMU with the virtio-vhost-user device (cached by content hash; ~4-5 min when built)"
bash qemu-device/build.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== shellcheck (warnings and errors)"
shellcheck --severity=warning .ci/run tests/run.sh tests/scripts/*.sh qemu-device/build.sh image-builder/*.sh packaging/*.sh \
    appliance/grafana/capture.sh
shellcheck --severity=warning --shell=sh image-builder/appliance/init image-builder/consumer/init
echo "== fuzz: every Rust target FUZZ_SECONDS (default 20), executions per target (tests/scripts/fuzz.sh)"
bash tests/scripts/fuzz.sh
echo "== layering: targets must not depend on vhost"
if cargo tree -p targets --edges normal --prefix none | grep -E '^vhost(-user-backend)? '; then
    echo "targets depends on vhost: the layering rule is broken" >&2
    exit 1
fi
echo "== build (the end-to-end tests run the daemon binary)"
echo "   and the daemon with the fault-injecting engine (tests/tests/inflight.rs)"
bash tests/scripts/build-fault-daemon.sh
cargo build --workspace --bins --locked
echo "== guest-side fuzzing of the QEMU device (ASan build cached by content hash, 3-5 min when built; regression traces; 60 s of vvu-fuzz)"
bash tests/scripts/qemu-fuzz.sh
echo "== tests (both tiers: \`cargo test\` alone runs only the fast one)"
cargo test --workspace --locked --no-fail-fast -- --include-ignored
