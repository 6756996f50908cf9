#!/usr/bin/env bash
# Builds the fuzz targets of fuzz/ (cargo-fuzz, libFuzzer, AddressSanitizer, debug
# assertions) and runs each for a bounded time from its seed corpus (fuzz/corpus/TARGET),
# printing the executions per target (libFuzzer's stat::number_of_executed_units) and
# writing a summary TSV. The fuzz crate's own fmt and clippy gates run first. Exits non-zero if any target crashed, leaked, hung (a single input
# running longer than FUZZ_TIMEOUT) or ran out of memory, with the reproducer's path.
#
#   tests/scripts/fuzz.sh [TARGET...]     (default: every target of fuzz/Cargo.toml)
#
# Environment:
#   FUZZ_SECONDS   run time per target, in seconds (default 20: 7 targets take ~2.5 min)
#   FUZZ_TIMEOUT   longest a single input may run, in seconds (default 30)
#   FUZZ_OUT       where logs, new corpus units, reproducers and summary.tsv go
#                  (default target/fuzz; the checked-in seeds are never written)
#   VHOST_APPLIANCE_CACHE   cache root (default /var/cache/vhost-appliance)
#
# Cached outside the checkout, so a fresh clone reuses them: cargo-fuzz (installed once
# with `cargo install --locked` into $cache/cargo-fuzz-VERSION, ~1 min on 2 cores) and the
# build directory $cache/fuzz-target-KEY, KEY hashing the toolchain and fuzz/Cargo.lock
# (older keys are removed). On 2 cores: a cold build (clippy and the ASan build) ~5 min, a
# warm one in a fresh clone (only the workspace crates rebuild) ~1-2 min; the runs 2.3 min.
# cargo fuzz needs nightly flags (-Zsanitizer); RUSTC_BOOTSTRAP=1 lets the stable toolchain
# take them.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo="$(pwd)"
log() { echo "fuzz: $*" >&2; }

. tests/scripts/debian.sh

CARGO_FUZZ_VERSION=0.13.2
cache="${VHOST_APPLIANCE_CACHE:-/var/cache/vhost-appliance}"
seconds="${FUZZ_SECONDS:-20}"
timeout="${FUZZ_TIMEOUT:-30}"
out="${FUZZ_OUT:-$repo/target/fuzz}"

# libFuzzer is compiled from C++ by libfuzzer-sys's build script.
ensure_debs build-essential

tool_root="$cache/cargo-fuzz-$CARGO_FUZZ_VERSION"
if [ ! -x "$tool_root/bin/cargo-fuzz" ]; then
    log "building cargo-fuzz $CARGO_FUZZ_VERSION (cargo install, once)"
    tmp="$(mktemp -d)"
    cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked --root "$tmp" -q
    $SUDO mkdir -p "$cache"
    $SUDO rm -rf "$tool_root"
    $SUDO mv "$tmp" "$tool_root"
    $SUDO chmod 0755 "$tool_root"
fi
export PATH="$tool_root/bin:$PATH"

key="$( (rustc -vV; cat fuzz/Cargo.lock) | sha256sum | cut -c1-16)"
export CARGO_TARGET_DIR="$cache/fuzz-target-$key"
for old in "$cache"/fuzz-target-*; do
    if [ -d "$old" ] && [ "$old" != "$CARGO_TARGET_DIR" ]; then
        log "removing the stale build directory $old"
        $SUDO rm -rf "$old"
    fi
done
$SUDO mkdir -p "$CARGO_TARGET_DIR"

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list --fuzz-dir fuzz)
fi

# The fuzz crate is not in the main workspace: its own format and lint gates.
log "cargo fmt --check and cargo clippy of fuzz/"
cargo fmt --manifest-path fuzz/Cargo.toml -- --check
cargo clippy --manifest-path fuzz/Cargo.toml --all-targets --locked -q -- -D warnings

log "building the targets into $CARGO_TARGET_DIR"
start=$SECONDS
RUSTC_BOOTSTRAP=1 cargo fuzz build --fuzz-dir fuzz --debug-assertions >&2 ||
    { log "build failed"; exit 1; }
log "built in $((SECONDS - start)) s"
bin_dir="$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release"

mkdir -p "$out"
summary="$out/summary.tsv"
printf 'target\tseconds\texecutions\texec_per_s\tseeds\tcorpus\tresult\treproducer\n' > "$summary"
failed=0
for t in "${targets[@]}"; do
    work="$out/corpus/$t"
    artifacts="$out/artifacts/$t"
    tlog="$out/$t.log"
    rm -rf "$work" "$artifacts"
    mkdir -p "$work" "$artifacts"
    seeds=$(find "fuzz/corpus/$t" -maxdepth 1 -type f | wc -l)
    log "$t: ${seconds} s from $seeds seeds"
    rc=0
    # New units go to the first corpus folder (out of the checkout); the seeds and the
    # inputs of bugs found before (fuzz/regressions/TARGET) are read only, and run first.
    inputs=("fuzz/corpus/$t")
    if [ -d "fuzz/regressions/$t" ]; then
        inputs+=("fuzz/regressions/$t")
    fi
    "$bin_dir/$t" -max_total_time="$seconds" -timeout="$timeout" -rss_limit_mb=2048 \
        -print_final_stats=1 -artifact_prefix="$artifacts/" \
        "$work" "${inputs[@]}" </dev/null >"$tlog" 2>&1 || rc=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$tlog" | tail -n 1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$tlog" | tail -n 1)
    units=$(find "$work" -maxdepth 1 -type f | wc -l)
    reproducer=$(find "$artifacts" -maxdepth 1 -type f | head -n 1)
    if [ "$rc" -eq 0 ] && [ -z "$reproducer" ]; then
        result=ok
    else
        result="failed (exit $rc)"
        failed=1
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$t" "$seconds" "${execs:-0}" "${rate:-0}" \
        "$seeds" "$((seeds + units))" "$result" "${reproducer:--}" >> "$summary"
    echo "fuzz: $t: ${execs:-0} executions (${rate:-0}/s), $result"
    if [ "$result" != ok ]; then
        echo "fuzz: $t: log $tlog; its end:"
        grep -v '^#[0-9]' "$tlog" | tail -n 40
        if [ -n "$reproducer" ]; then
            echo "fuzz: $t: reproducer $reproducer"
            echo "fuzz:   replay: RUSTC_BOOTSTRAP=1 CARGO_TARGET_DIR=$CARGO_TARGET_DIR cargo fuzz run --fuzz-dir fuzz -a $t $reproducer"
        fi
    fi
done
echo "fuzz: summary $summary"
cat "$summary"
exit "$failed"
