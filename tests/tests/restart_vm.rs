//! A consumer guest keeps its data while the daemon crashes under it: fio randwrite at QD32
//! with crc32c verification runs on a virtio-blk and a virtio-scsi LUN of one daemon, which
//! is SIGKILLed and started again during the write phase: five times in host mode, three
//! times inside the appliance VM (where its init restarts it). QEMU reconnects
//! (`reconnect-ms`), hands the new daemon the inflight area it kept (through the
//! virtio-vhost-user device's BAR in appliance-VM mode), and the daemon re-runs the requests
//! that were in flight. fio must finish, its verify pass must be clean, and the guest's
//! kernel log must show no I/O error.
//!
//! In host mode the daemon is the fault-injecting build with every write delayed by
//! [`WRITE_DELAY_MS`] (a slow disk): a guest under TCG submits so slowly that a daemon
//! on tmpfs is idle most of the time, and a crash then found nothing in flight in one CI
//! run out of many. With the delay, every crash finds writes in flight.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use appliance_tests::appliance_vm::{self, ApplianceVmOptions, VvuSocket};
use appliance_tests::daemon::{fault_appliance_binary, scratch_dir, Appliance};
use appliance_tests::vm::{Vm, VmOptions};

const MINUTE: Duration = Duration::from_secs(60);
const KILLS: usize = 5;
/// Milliseconds the host-mode daemon holds each write before submitting it.
const WRITE_DELAY_MS: u32 = 10;

fn config(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "exports:
  - name: blk
    type: blk
    socket: {d}/blk.sock
    path: {d}/blk.raw
    create: {{ size: 160M }}
  - name: scsi
    type: scsi
    socket: {d}/scsi.sock
    luns:
      - path: {d}/scsi.raw
        create: {{ size: 160M }}
"
    )
}

fn start(dir: &Path) -> Appliance {
    let mut command = Command::new(fault_appliance_binary());
    command.env(
        "VHOST_APPLIANCE_FAULTS",
        format!("delay={WRITE_DELAY_MS}:write"),
    );
    let mut appliance = Appliance::start_command(command, &config(dir), &[]);
    for socket in ["blk.sock", "scsi.sock"] {
        appliance
            .process
            .wait_for_path(&dir.join(socket), Duration::from_secs(20));
    }
    appliance
}

/// The fio job of one disk: random 4 KiB writes at QD32 over `mib` MiB, each block written
/// once with a crc32c header, then read back and verified; in the background, its exit
/// status in /tmp/$NAME.rc.
fn fio_in_background(name: &str, dev: &str, mib: u32) -> String {
    format!(
        "(fio --name={name} --filename={dev} --ioengine=io_uring --iodepth=32 --direct=1 \
         --rw=randwrite --bs=4k --size={mib}M --verify=crc32c --verify_fatal=1 --do_verify=1 \
         --randrepeat=0 --minimal > /tmp/{name}.out 2>&1; echo $? > /tmp/{name}.rc) \
         </dev/null >/dev/null 2>&1 &"
    )
}

/// A consumer guest with a blk and a scsi device on `blk.sock` and `scsi.sock` in `dir`,
/// reconnecting every second, running the fio job of [`fio_in_background`] on both.
fn consumer_running_fio(dir: &Path, mib: u32) -> Vm {
    let chardev = |id: &str| {
        format!(
            "socket,id={id},path={},reconnect-ms=1000",
            dir.join(format!("{id}.sock")).display()
        )
    };
    let mut vm = Vm::boot(&VmOptions {
        extra_args: vec![
            "-chardev".into(),
            chardev("blk"),
            "-device".into(),
            "vhost-user-blk-pci,id=blk,chardev=blk,num-queues=1".into(),
            "-chardev".into(),
            chardev("scsi"),
            "-device".into(),
            "vhost-user-scsi-pci,id=scsi,chardev=scsi,num_queues=1".into(),
        ],
        ..VmOptions::default()
    });
    let blk = vm.wait_for_blk("blk", Duration::from_secs(60));
    let disks = vm.run_ok(
        "i=0; while ! ls -d /sys/bus/scsi/devices/*:0:0:0/block/* >/dev/null 2>&1 && [ $i -lt 300 ]; \
         do sleep 0.2; i=$((i+1)); done; basename $(ls -d /sys/bus/scsi/devices/*:0:0:0/block/*)",
        2 * MINUTE,
    );
    let scsi = disks.lines().last().unwrap().trim().to_string();
    vm.run_ok(
        &format!(
            "dmesg -c >/dev/null; {}\n{}",
            fio_in_background("blk", &format!("/dev/{blk}"), mib),
            fio_in_background("scsi", &format!("/dev/{scsi}"), mib)
        ),
        MINUTE,
    );
    vm
}

/// Recoveries in a daemon log that re-ran I/O requests: not those of virtio-scsi's event
/// queue (queue 1), which re-holds the event buffers the driver posted.
fn io_reruns(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("re-running requests in flight") && !l.contains("queue=1 "))
        .count()
}

/// Fails the test if fio already finished (before crash `kill`): too short a workload
/// tests nothing.
fn assert_fio_running(vm: &mut Vm, kill: usize) {
    let running = vm.run_ok("ls /tmp/*.rc 2>/dev/null | wc -l", MINUTE);
    assert_eq!(
        running.lines().last().unwrap().trim(),
        "0",
        "fio finished before crash {kill}: the workload is too short to test anything"
    );
}

/// Waits for both fio jobs and checks the outcome after `kills` crashes, of which
/// `reruns` found requests in flight.
fn assert_fio_clean(vm: &mut Vm, kills: usize, reruns: usize) {
    let finished = vm.run_ok(
        "i=0; while [ $(ls /tmp/*.rc 2>/dev/null | wc -l) -lt 2 ] && [ $i -lt 3000 ]; do sleep 0.2; i=$((i+1)); done; \
         echo blk=$(cat /tmp/blk.rc) scsi=$(cat /tmp/scsi.rc); cat /tmp/blk.out /tmp/scsi.out; \
         echo DMESG; dmesg",
        15 * MINUTE,
    );
    eprintln!("guest after {kills} crashes ({reruns} recoveries re-ran requests):\n{finished}");
    assert!(finished.contains("blk=0 scsi=0"), "fio failed:\n{finished}");
    let dmesg = finished
        .split("DMESG")
        .nth(1)
        .unwrap_or_default()
        .to_lowercase();
    for bad in [
        "error",
        "not a head",
        "broken",
        "critical",
        "abort",
        "timing out",
        "fail",
    ] {
        assert!(
            !dmesg.contains(bad),
            "guest kernel log has {bad:?}:\n{dmesg}"
        );
    }
    // Each restarted SCSI target reports its power-on reset (a unit attention, which the
    // initiator logs and retries), as a real one does.
    assert_eq!(
        dmesg.matches("power-on or device reset occurred").count(),
        kills,
        "{dmesg}"
    );
    assert!(
        reruns > 0,
        "no crash found a request in flight: the test did not exercise recovery"
    );
}

#[test]
#[ignore = "full tier (tests/run.sh): boots a QEMU guest"]
fn guest_fio_verify_survives_five_daemon_crashes_on_blk_and_scsi() {
    let data = scratch_dir();
    let dir = data.path();
    let mut daemon = start(dir);
    let mut vm = consumer_running_fio(dir, 128);
    let started = Instant::now();
    let mut reruns = 0;
    for kill in 1..=KILLS {
        // Let I/O flow (and requests pile up in flight) before each crash.
        std::thread::sleep(Duration::from_millis(1500));
        assert_fio_running(&mut vm, kill);
        daemon.process.signal(libc::SIGKILL).expect("SIGKILL");
        daemon.process.wait_exit(MINUTE);
        reruns += io_reruns(&daemon.process.log());
        for socket in ["blk.sock", "scsi.sock"] {
            std::fs::remove_file(dir.join(socket)).expect("remove a dead socket");
        }
        daemon = start(dir);
        // QEMU reconnects within reconnect-ms.
        daemon.process.wait_for_log("frontend connected", 2, MINUTE);
        eprintln!(
            "crash {kill}: daemon restarted and reconnected after {:.1}s",
            started.elapsed().as_secs_f64()
        );
    }
    // Recoveries of the last daemon happen after its connection.
    std::thread::sleep(Duration::from_secs(1));
    reruns += io_reruns(&daemon.process.log());
    assert_fio_clean(&mut vm, KILLS, reruns);
}

const APPLIANCE_EXPORTS: &str = "\
exports:
  - name: blk
    type: blk
    vvu: 0000:00:10.0
    path: blk.raw
    create: { size: 48M }
  - name: scsi
    type: scsi
    vvu: 0000:00:11.0
    luns:
      - path: scsi.raw
        create: { size: 48M }
";

/// Crashes of the daemon inside the appliance VM.
const APPLIANCE_KILLS: usize = 3;

#[test]
#[ignore = "full tier (tests/run.sh): boots an appliance VM and a consumer VM"]
fn guest_fio_verify_survives_daemon_crashes_inside_the_appliance_vm() {
    let sockets = scratch_dir();
    let options = ApplianceVmOptions::new(
        APPLIANCE_EXPORTS,
        vec![VvuSocket::at("blk.sock"), VvuSocket::at("scsi.sock")],
        2,
    );
    let mut appliance = appliance_vm::start(sockets.path(), &options);
    let mut vm = consumer_running_fio(sockets.path(), 32);
    let started = Instant::now();
    for kill in 1..=APPLIANCE_KILLS {
        std::thread::sleep(Duration::from_secs(3));
        assert_fio_running(&mut vm, kill);
        // SIGKILL; the appliance's init starts the daemon again, and both frontends
        // reconnect to the new one (two more "frontend connected" in the shared log).
        appliance.run_ok(
            &format!(
                "kill -9 $(cat /run/appliance.pid); \
                 i=0; while [ $(wc -l < /run/appliance.restarts 2>/dev/null || echo 0) -lt {kill} ] && [ $i -lt 300 ]; do sleep 0.2; i=$((i+1)); done; \
                 i=0; while [ $(grep -c 'frontend connected export=' /config/appliance.log) -lt {} ] && [ $i -lt 600 ]; do sleep 0.2; i=$((i+1)); done; \
                 grep -c 'frontend connected export=' /config/appliance.log",
                2 * (kill + 1)
            ),
            3 * MINUTE,
        );
        eprintln!(
            "appliance crash {kill}: daemon restarted by init and reconnected after {:.1}s",
            started.elapsed().as_secs_f64()
        );
    }
    let log = appliance.run_ok(
        "sleep 2; cat /run/appliance.restarts; echo RERUNS=$(grep 're-running requests in flight' /config/appliance.log | grep -vc 'queue=1 '); \
         grep -E 're-running|panicked|ERROR' /config/appliance.log | tail -20",
        MINUTE,
    );
    let reruns = log
        .lines()
        .find_map(|l| l.trim().strip_prefix("RERUNS=")?.parse::<usize>().ok())
        .unwrap_or(0);
    eprintln!("appliance log:\n{log}");
    assert!(!log.contains("panicked"), "{log}");
    assert_fio_clean(&mut vm, APPLIANCE_KILLS, reruns);
}
