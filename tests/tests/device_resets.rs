//! Device resets as a guest's driver makes them, without guests: sessions of a raw
//! virtio-scsi frontend (control, event and one request queue) on a 2-LUN export read both
//! LUNs, then twice reset the device and set it up again in the order and with the
//! acknowledgements QEMU 10.0 uses when the Linux driver takes over from SeaBIOS
//! (`RawFrontend::reset_device_and_restart`: new kick eventfds that already hold 1, the new
//! call eventfds last and unacknowledged), and read both LUNs again. Issue #18's first-scan
//! hangs came right after that reset. A consumer boot reaches it about once a minute under
//! TCG; this reaches it about twice a second, so a run can repeat it thousands of times.
//!
//! The frontend waits like a driver sleeping on its interrupt (`strict_calls`): a request
//! must be answered and signalled within 30 s, so a lost kick and a lost call both fail.
//! Both modes have the same expectations; through the appliance VM, whose QEMU traces
//! `vvu_*`, each kick eventfd also has to raise its own vring's MSI-X vector once, and the
//! device must hold or drop no kick. `DEVICE_RESET_SESSIONS=N` (default 10) sessions;
//! `SESSION_MATRIX_TRACE=0` runs the appliance VM untraced (the trace checks are skipped).

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::{Duration, Instant};

use appliance_tests::appliance_vm::{self, ApplianceVmOptions, VvuSocket};
use appliance_tests::daemon::{scratch_dir, Appliance};
use appliance_tests::scsi_frontend::ScsiFrontend;
use appliance_tests::vm::Vm;

/// How long one command may take, answer and call included.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

const HOST_EXPORTS: &str = "\
exports:
  - name: scsi0
    type: scsi
    socket: @DIR@/scsi0.sock
    luns:
      - path: @DIR@/lun0.raw
        create: { size: 16M }
      - lun: 1
        path: @DIR@/lun1.qcow2
        format: qcow2
        create: { size: 16M }
";

const VM_EXPORTS: &str = "\
exports:
  - name: scsi0
    type: scsi
    vvu: 0000:00:10.0
    luns:
      - path: lun0.raw
        create: { size: 16M }
      - lun: 1
        path: lun1.qcow2
        format: qcow2
        create: { size: 16M }
";

/// READ(10) of LBA 0 on both LUNs, each answered GOOD with 512 bytes.
fn read_both_luns(scsi: &mut ScsiFrontend, session: u32, phase: u32) {
    for lun in [0, 1] {
        scsi.until_ready(lun);
        let data = scsi.good(lun, &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[], 512);
        assert_eq!(
            data.len(),
            512,
            "session {session}, phase {phase}, LUN {lun}"
        );
    }
}

/// Runs the sessions against `socket`; a failure panics with where it happened.
fn run_sessions(socket: &Path, sessions: u32) {
    for session in 1..=sessions {
        let mut scsi = ScsiFrontend::connect(socket, 1);
        scsi.fe.strict_calls = true;
        scsi.timeout = COMMAND_TIMEOUT;
        read_both_luns(&mut scsi, session, 0);
        for phase in 1..=2 {
            scsi.fe.reset_device_and_restart();
            read_both_luns(&mut scsi, session, phase);
        }
    }
}

#[test]
fn host_mode_device_resets() {
    let sessions = appliance_vm::repetitions("DEVICE_RESET_SESSIONS", 10);
    let mut appliance = Appliance::start(HOST_EXPORTS, &["scsi0.sock"]);
    let started = Instant::now();
    let socket = appliance.path("scsi0.sock");
    let result = std::panic::catch_unwind(|| run_sessions(&socket, sessions));
    let log = appliance.process.log();
    if let Err(panic) = result {
        eprintln!("daemon after the failure:\n{log}");
        std::panic::resume_unwind(panic);
    }
    assert!(
        appliance.process.try_wait().is_none(),
        "the daemon died:\n{log}"
    );
    assert!(!log.contains("panicked"), "the daemon panicked:\n{log}");
    eprintln!(
        "device resets: {sessions} sessions with 2 resets each in {:.1}s (host mode)",
        started.elapsed().as_secs_f64()
    );
}

#[test]
#[ignore = "full tier (tests/run.sh): boots the appliance VM"]
fn appliance_vm_device_resets() {
    let sessions = appliance_vm::repetitions("DEVICE_RESET_SESSIONS", 10);
    let traced = appliance_vm::tracing_enabled();
    let sockets = scratch_dir();
    let mut options = ApplianceVmOptions::new(VM_EXPORTS, vec![VvuSocket::at("scsi0.sock")], 1);
    if traced {
        options.trace = vec!["vvu_*".into()];
    }
    let mut vm = appliance_vm::start(sockets.path(), &options);
    let started = Instant::now();
    let socket = sockets.path().join("scsi0.sock");
    if let Err(panic) = std::panic::catch_unwind(|| run_sessions(&socket, sessions)) {
        eprintln!("{}", appliance_vm::failure_report(&mut vm));
        std::panic::resume_unwind(panic);
    }
    eprintln!(
        "device resets: {sessions} sessions with 2 resets each in {:.1}s (appliance VM)",
        started.elapsed().as_secs_f64()
    );
    assert!(
        appliance_vm::daemon_alive(&mut vm),
        "the daemon died:\n{}",
        appliance_vm::daemon_log(&mut vm)
    );
    if traced {
        check_device_trace(&vm, sessions);
    } else {
        eprintln!("device resets: untraced, the device's trace was not checked");
    }
}

/// The resets went through the device, each kick eventfd that was kicked raised its own
/// vring's vector (the driver maps vring i to MSI-X vector 3 + i): per session vring 2
/// once from the first set-up, where the frontend kicks it, and every vring once after each
/// reset, its new eventfd holding 1. No kick was held, dropped or refused remapping.
fn check_device_trace(vm: &Vm, sessions: u32) {
    let log = vm.qemu_log();
    let count = |what: &str| log.lines().filter(|l| l.contains(what)).count();
    let sessions = sessions as usize;
    assert_eq!(
        count("front-end request 34,"),
        2 * sessions,
        "RESET_DEVICE messages the device saw"
    );
    for (vring, per_session) in [(0, 2), (1, 2), (2, 3)] {
        let what = format!(
            "vring {vring}: first kick since wired, to MSI-X vector {}",
            3 + vring
        );
        assert_eq!(count(&what), per_session * sessions, "\"{what}\" lines");
    }
    assert_eq!(
        appliance_vm::kicks_not_sent(&log),
        "",
        "kicks the device did not deliver at once"
    );
}
