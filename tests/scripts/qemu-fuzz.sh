#!/usr/bin/env bash
# The fuzz step for the virtio-vhost-user QEMU device (issue 19), from the hostile appliance
# guest's side: takes QEMU built with ASan+UBSan from the cache (qemu-device/build.sh --asan;
# about 5 minutes when it has to be built), replays the regression traces in
# qemu-device/tests/regressions/, then fuzzes for VVU_FUZZ_SECONDS (default 60) with a random
# seed (VVU_FUZZ_SEED to repeat one) and prints how much it executed.
#
# Writes $VVU_FUZZ_OUT (default target/vvu-fuzz): summary.json, summary.tsv, and a trace
# (*.qtest, replayable with `vvu-fuzz replay`, shrinkable with `vvu-fuzz minimize`) plus
# QEMU's stderr for every distinct failure. Exits non-zero if a trace or the run failed, or
# if the run never got a session going (no message reached the guest, no oracle check).
set -euo pipefail
cd "$(dirname "$0")/../.."

out="${VVU_FUZZ_OUT:-target/vvu-fuzz}"
seconds="${VVU_FUZZ_SECONDS:-60}"
seed="${VVU_FUZZ_SEED:-$(od -An -N8 -tu8 /dev/urandom | tr -d ' ')}"
mkdir -p "$out"

echo "== QEMU with ASan+UBSan (cached by content hash; ~5 min when built)"
qemu="$(bash qemu-device/build.sh --asan | tail -n 1)"
echo "== vvu-fuzz"
cargo build --locked -q -p appliance-tests --bin vvu-fuzz
fuzz=target/debug/vvu-fuzz

shopt -s nullglob
traces=(qemu-device/tests/regressions/*.qtest)
if [ "${#traces[@]}" -gt 0 ]; then
    echo "== replaying ${#traces[@]} regression traces"
    "$fuzz" --qemu "$qemu" replay "${traces[@]}"
fi

echo "== fuzzing for ${seconds} s (seed ${seed})"
status=0
"$fuzz" --qemu "$qemu" run --seconds "$seconds" --seed "$seed" --out "$out" \
    --summary "$out/summary.json" >/dev/null || status=$?
cat "$out/summary.tsv"
exit "$status"
