//! The VM-less libblkio suite of `blk_e2e.rs` (every operation on 1 and 4 queues, 64
//! requests in flight per queue, out-of-range requests, the randomized differential
//! against qemu-storage-daemon), run unchanged against exports served from inside the
//! appliance VM. libblkio hands its rings and buffers over with ADD_MEM_REG in memfds whose
//! size is not a multiple of the region size, which the virtio-vhost-user device must map
//! as a host-mode backend does. Data is checked in the backing files inside the VM.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use appliance_tests::appliance_vm::{self, md5_of, ApplianceVmOptions, VvuSocket};
use appliance_tests::blk_suite::{self, Backing};
use appliance_tests::daemon::scratch_dir;
use appliance_tests::vm::Vm;

const MINUTE: Duration = Duration::from_secs(60);

const EXPORTS: &str = "\
exports:
  - name: vol0
    type: blk
    vvu: 0000:00:10.0
    path: vol0.raw
    create: { size: 64M }
    num_queues: 4
  - name: diff
    type: blk
    vvu: 0000:00:11.0
    path: diff.raw
";

/// A backing file inside the appliance VM, hashed there.
struct VmFile<'a> {
    vm: &'a mut Vm,
    path: &'static str,
}

impl Backing for VmFile<'_> {
    fn md5(&mut self, offset: u64, len: u64) -> String {
        assert!(offset.is_multiple_of(4096) && len.is_multiple_of(4096));
        let out = self.vm.run_ok(
            &format!(
                "dd if={} bs=4096 skip={} count={} 2>/dev/null | md5sum",
                self.path,
                offset / 4096,
                len / 4096
            ),
            MINUTE,
        );
        md5_of(&out)
    }
}

#[test]
#[ignore = "full tier (tests/run.sh): boots QEMU guests"]
fn the_blkio_suite_passes_against_exports_in_the_appliance_vm() {
    let sockets = scratch_dir();
    let config = sockets.path().join("config");
    std::fs::create_dir_all(&config).unwrap();
    std::fs::write(config.join("diff.raw"), blk_suite::differential_image()).unwrap();
    let options = ApplianceVmOptions::new(
        EXPORTS,
        vec![VvuSocket::at("vol0.sock"), VvuSocket::at("diff.sock")],
        2,
    );
    let mut vm = appliance_vm::start(sockets.path(), &options);
    let vol0 = sockets.path().join("vol0.sock");
    let diff = sockets.path().join("diff.sock");

    // libblkio has no timeouts: the suite runs on a thread so a hang fails the test.
    let (done, finished) = std::sync::mpsc::channel();
    let suite = std::thread::spawn(move || {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut backing = VmFile {
                vm: &mut vm,
                path: "/config/vol0.raw",
            };
            for queues in [1, 4] {
                blk_suite::all_operations(&vol0, queues, &mut backing);
                eprintln!("appliance VM: all operations on {queues} queue(s) passed");
            }
            blk_suite::queue_depth_64(&vol0, &mut backing);
            eprintln!("appliance VM: 64 in flight on 2 queues passed");
            blk_suite::out_of_range(&vol0);
            let mut backing = VmFile {
                vm: &mut vm,
                path: "/config/diff.raw",
            };
            blk_suite::differential(&diff, &mut backing);
            eprintln!("appliance VM: differential against qemu-storage-daemon passed");
        }));
        let alive = appliance_vm::daemon_alive(&mut vm);
        let log = appliance_vm::daemon_log(&mut vm);
        let _ = done.send(());
        (result, alive, log)
    });
    if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = finished.recv_timeout(30 * MINUTE) {
        panic!("the libblkio suite through the appliance VM did not finish within 30 minutes");
    }
    // Done, or the thread panicked outside the suite (reading the VM's state): join says.
    let (result, alive, log) = suite.join().unwrap();
    if let Err(panic) = result {
        eprintln!("appliance log:\n{log}");
        std::panic::resume_unwind(panic);
    }
    assert!(alive, "the daemon in the appliance VM died:\n{log}");
    assert!(!log.contains("panicked"), "{log}");
}
