//! Per-connection resources end with their connection: 1000 frontends connect in turn to
//! blk and scsi exports with 1 and 4 queues (libblkio for blk, the raw virtio-scsi frontend
//! for scsi; every 25th one a separate process killed mid-I/O), and the daemon's open fds,
//! threads and mapped memory, read from `/proc/PID`, come back to their baseline. The daemon
//! runs with RLIMIT_NOFILE 256 (soft 128, which it raises), so a leak of one fd per
//! connection would stop an export long before the end.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use appliance_tests::churn::{settled, short_session};
use appliance_tests::daemon::{usage, workspace_binary, Appliance};

const CONFIG: &str = "exports:
  - name: blk1
    type: blk
    socket: @DIR@/blk1.sock
    path: @DIR@/blk1.raw
    create: { size: 16M }
  - name: blk4
    type: blk
    socket: @DIR@/blk4.sock
    path: @DIR@/blk4.raw
    create: { size: 16M }
    num_queues: 4
  - name: scsi1
    type: scsi
    socket: @DIR@/scsi1.sock
    luns:
      - path: @DIR@/scsi1.raw
        create: { size: 16M }
  - name: scsi4
    type: scsi
    socket: @DIR@/scsi4.sock
    num_queues: 4
    luns:
      - path: @DIR@/scsi4-0.raw
        create: { size: 16M }
      - lun: 1
        path: @DIR@/scsi4-1.raw
        create: { size: 16M }
";

/// The exports: socket, kind, queues.
const EXPORTS: [(&str, &str, usize); 4] = [
    ("blk1.sock", "blk", 1),
    ("blk4.sock", "blk", 4),
    ("scsi1.sock", "scsi", 1),
    ("scsi4.sock", "scsi", 4),
];
const CONNECTIONS: usize = 1000;
const KILL_EVERY: usize = 25;
/// How long the daemon may take to release a connection's resources.
const SETTLE: Duration = Duration::from_secs(20);
/// Growth of the daemon's address space tolerated over the run (allocator arenas capped,
/// see the test): cached thread stacks settle, but one leaked 16 MiB guest memory mapping
/// per connection would be gigabytes.
const VM_SLACK_KIB: u64 = 32 << 10;

/// A frontend process killed with SIGKILL while its writes are in flight.
fn killed_session(socket: &Path, kind: &str, queues: usize) {
    let mut child = Command::new(workspace_binary("io-until-killed"))
        .arg(kind)
        .arg(socket)
        .arg(queues.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start io-until-killed");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(
        line.trim(),
        "running",
        "{kind} frontend did not start its I/O"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn a_thousand_connections_leave_nothing_behind() {
    let mut command = Command::new(appliance_tests::daemon::appliance_binary());
    // glibc gives threads up to 8 × cores malloc arenas of 64 MiB address space each, made
    // as threads come and go: without a cap the address space steps up by arenas, not by
    // leaks. Two arenas keep VmSize meaningful here.
    command.env("MALLOC_ARENA_MAX", "2");
    // SAFETY: setrlimit is async-signal-safe; nothing else runs in the child before exec.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 128,
                rlim_max: 256,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let appliance =
        Appliance::start_command(command, CONFIG, &EXPORTS.map(|(socket, _, _)| socket));
    let pid = appliance.process.pid();
    assert!(
        appliance
            .process
            .log()
            .lines()
            .any(|l| l.contains("open file limit raised")
                && l.contains("was=128")
                && l.contains("soft=256")
                && l.contains("hard=256")),
        "the daemon logs the open file limit it raised:\n{}",
        appliance.process.log()
    );

    // Warm up: one session per export, so that lazily created state exists.
    for (i, (socket, kind, queues)) in EXPORTS.into_iter().enumerate() {
        short_session(&appliance.path(socket), kind, queues, i);
    }
    std::thread::sleep(Duration::from_millis(500));
    let baseline = usage(pid);
    assert_eq!(
        baseline.memfd_maps, 0,
        "frontend memory still mapped: {baseline:?}"
    );
    eprintln!("baseline: {baseline:?}");

    let mut halfway = None;
    for n in 0..CONNECTIONS {
        let (socket, kind, queues) = EXPORTS[n % EXPORTS.len()];
        let socket = appliance.path(socket);
        if n % KILL_EVERY == KILL_EVERY - 1 {
            killed_session(&socket, kind, queues);
        } else {
            short_session(&socket, kind, queues, n);
        }
        assert!(
            usage(pid).fds < 240,
            "connection {n}: the daemon is close to its fd limit: {:?}",
            usage(pid)
        );
        if n == CONNECTIONS / 2 {
            halfway = Some(settled(pid, baseline, "500 connections", SETTLE));
        }
    }
    let end = settled(pid, baseline, "1000 connections", SETTLE);
    let halfway = halfway.unwrap();
    eprintln!("halfway: {halfway:?}, end: {end:?}");
    assert!(
        end.vm_kib <= halfway.vm_kib.max(baseline.vm_kib) + VM_SLACK_KIB,
        "address space grew: baseline {baseline:?}, halfway {halfway:?}, end {end:?}"
    );
    // Every export still serves.
    for (i, (socket, kind, queues)) in EXPORTS.into_iter().enumerate() {
        short_session(&appliance.path(socket), kind, queues, i);
    }
}
