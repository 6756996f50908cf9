//! The virtio-vhost-user-pci device leaves the file descriptors a front-end sends as the
//! front-end made them.
//!
//! An eventfd sent by SCM_RIGHTS shares its open file description, O_NONBLOCK included,
//! with the front-end. QEMU's socket channel and chardev clear O_NONBLOCK on every fd they
//! receive, and the device used to set it again a moment later. A stock QEMU consumer with
//! KVM irqfds sends a vring's masked call notifier on each MSI-X mask and reads it on the
//! unmask right after (`vhost_virtqueue_pending`, with the BQL held): a read in that moment
//! would block for good and freeze the consumer VM. The device now has the chardev keep the
//! flags.
//!
//! The moment is microseconds long, so the test widens it: the patched QEMU (normal build,
//! `-accel qtest`, no guest) holds each read from the socket that carried fds for [`HOLD`]
//! (`x-recv-delay-ms`), and the front-end watches its own copy of the eventfd the whole time.
//! Without the fix (or with only the chardev's half of it), the first sample already found
//! O_NONBLOCK clear.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use appliance_tests::daemon::scratch_dir;
use appliance_tests::qfuzz::fuzzer::Fuzzer;
use appliance_tests::qfuzz::messages::{header, msg, req, VERSION};
use appliance_tests::qfuzz::trace::{Action, DeviceParams, FdKind, FdSpec};
use appliance_tests::rng::Rng;
use appliance_tests::vm::patched_qemu;

/// How long the device holds each read from its socket that carried fds.
const HOLD: Duration = Duration::from_millis(300);
/// The trace id of the eventfd the front-end sends.
const CALL_FD: u32 = 900;

#[test]
#[ignore = "full tier (tests/run.sh): builds the patched QEMU (cached) and runs it"]
fn a_frontends_eventfd_stays_non_blocking_while_the_device_takes_it() {
    let dir = scratch_dir();
    let params = DeviceParams {
        recv_delay_ms: HOLD.as_millis() as u32,
        ..DeviceParams::default()
    };
    let mut f = Fuzzer::start(patched_qemu(), params, dir.path(), Rng::new(18)).unwrap();
    assert!(
        f.fresh_session().unwrap(),
        "the device did not take the front-end's connection"
    );

    // SET_VRING_CALL of vring 1 with a new non-blocking eventfd, as QEMU sends a masked
    // notifier; then watch the front-end's copy while the device receives and holds it.
    let message = msg(req::SET_VRING_CALL, VERSION, &1u64.to_le_bytes());
    f.act(Action::Send {
        bytes: message,
        fds: vec![FdSpec {
            kind: FdKind::Eventfd,
            id: CALL_FD,
        }],
    })
    .unwrap();
    let ours =
        f.m.fe()
            .dup_fd(CALL_FD)
            .expect("the front-end keeps its eventfd");
    let watcher = std::thread::spawn(move || {
        let start = Instant::now();
        let mut samples = 0u64;
        while start.elapsed() < 3 * HOLD {
            // SAFETY: F_GETFL on a descriptor this thread owns; no memory is passed.
            let flags = unsafe { libc::fcntl(ours.as_raw_fd(), libc::F_GETFL) };
            assert!(flags >= 0, "F_GETFL failed");
            if flags & libc::O_NONBLOCK == 0 {
                return Err(format!(
                    "O_NONBLOCK of the front-end's eventfd was cleared {:?} after sending it \
                     ({samples} samples before)",
                    start.elapsed()
                ));
            }
            samples += 1;
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(samples)
    });

    // The device did take the message: the guest finds it on rxq.
    let mut delivered = false;
    for _ in 0..40 {
        f.act(Action::Settle).unwrap();
        if f.handle_rx()
            .unwrap()
            .iter()
            .any(|(_, m)| header(m).0 == req::SET_VRING_CALL)
        {
            delivered = true;
            break;
        }
    }
    let samples = watcher.join().unwrap().unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "O_NONBLOCK stayed set in {samples} samples over {:?}",
        3 * HOLD
    );
    assert!(delivered, "SET_VRING_CALL never reached the guest");
    if let Some(report) = f.m.stop() {
        panic!("QEMU: {}", report.detail());
    }
}
