//! Regression tests from the guest-side fuzzer of the virtio-vhost-user-pci device
//! (`appliance_tests::qfuzz`, `tests/scripts/qemu-fuzz.sh`), against QEMU built with
//! ASan+UBSan (`qemu-device/build.sh --asan`): every trace in `qemu-device/tests/regressions/`
//! once made QEMU crash; replayed, QEMU must survive it without a sanitizer report.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use appliance_tests::qfuzz::qtest::asan_qemu;
use appliance_tests::qfuzz::run::replay;
use appliance_tests::qfuzz::trace::Trace;

#[test]
#[ignore = "full tier (tests/run.sh): builds QEMU with ASan (cached) and runs it"]
fn regression_traces_replay_without_a_report() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../qemu-device/tests/regressions");
    let mut traces: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "qtest"))
        .collect();
    traces.sort();
    assert!(!traces.is_empty(), "no traces in {}", dir.display());
    let qemu = asan_qemu();
    for path in &traces {
        let trace = Trace::parse(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert!(!trace.actions.is_empty(), "{}: no actions", path.display());
        if let Err(f) = replay(&qemu, &trace) {
            panic!(
                "{}: {}: {}\n{}",
                path.display(),
                f.kind(),
                f.signature(),
                f.detail()
            );
        }
    }
}
