//! `format: rbd` exports when things go wrong, on real one-node Ceph clusters
//! (`tests/src/ceph.rs`) with libblkio as the consumer:
//!
//! - failover: a second daemon on the same image waits for its exclusive lock while the
//!   first serves it (serving its other exports meanwhile), and takes over when the first
//!   is SIGKILLed; every write the first acknowledged reads back through the second, and
//!   the consumer goes on;
//! - the OSD stopped briefly (SIGSTOP): I/O stalls and resumes without an error; stopped
//!   past `io_timeout`, a request fails with an I/O error and the next ones succeed;
//! - the cluster gone (mon and OSD killed) past `io_timeout`: requests fail with an I/O
//!   error, the daemon logs why and keeps serving its other exports.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::{Duration, Instant};

use appliance_tests::blkio_frontend::Frontend;
use appliance_tests::ceph::{self, Cluster};
use appliance_tests::daemon::{scratch_dir, Appliance};
use appliance_tests::rng::Rng;
use blkio::ReqFlags;

const CHUNK: usize = 16 * 1024;

/// An rbd blk export named `vol` of image `rbd/IMAGE` on `socket`, plus `extra` YAML.
fn config(cluster: &Cluster, image: &str, socket: &Path, rbd_extra: &str, extra: &str) -> String {
    format!(
        "state_dir: @DIR@/state
exports:
  - name: vol
    type: blk
    socket: {socket}
    format: rbd
    rbd: {{ pool: rbd, image: {image}, conf: {conf}{rbd_extra} }}
    create: {{ size: 64M }}
{extra}",
        socket = socket.display(),
        conf = cluster.conf().display()
    )
}

/// Fills the frontend's buffer with write `i`'s pattern and writes it at chunk `i`.
fn submit_write(fe: &mut Frontend, i: u64) {
    Rng::new(0xfa11 + i).fill(fe.buf(0, CHUNK));
    let ptr = fe.ptr(0);
    fe.queues[0].write(i * CHUNK as u64, ptr, CHUNK, i as usize, ReqFlags::empty());
}

/// Reads chunk `i` and checks it holds write `i`'s pattern.
fn verify(fe: &mut Frontend, i: u64, what: &str) {
    assert_eq!(
        fe.read(0, i * CHUNK as u64, CHUNK, CHUNK),
        0,
        "{what}: read {i}"
    );
    let mut want = vec![0u8; CHUNK];
    Rng::new(0xfa11 + i).fill(&mut want);
    assert!(
        fe.buf(CHUNK, CHUNK) == &want[..],
        "{what}: chunk {i} differs"
    );
}

#[test]
#[ignore = "full tier (tests/run.sh): needs Ceph (ceph-mon, ceph-osd) from tests/scripts/install-deps.sh"]
fn rbd_failover_to_a_waiting_daemon_keeps_every_acknowledged_write() {
    let cluster = ceph::shared();
    // Both daemons serve the same socket path, as a consumer that reconnects expects.
    let shared = scratch_dir();
    let socket = shared.path().join("vol.sock");
    let local = "  - name: local
    type: blk
    socket: @DIR@/local.sock
    path: @DIR@/local.raw
    create: { size: 1M }
";
    let cfg = config(cluster, "failover", &socket, "", local);
    let mut first = Appliance::start(&cfg, &["local.sock"]);
    first
        .process
        .wait_for_path(&socket, Duration::from_secs(60));
    // The standby waits for the lock without holding up its other exports.
    let mut second = Appliance::start(&cfg, &["local.sock"]);
    let log =
        second
            .process
            .wait_for_log("waiting for it as a standby", 1, Duration::from_secs(60));
    assert!(
        log.contains("rbd image rbd/failover: another client holds its exclusive lock"),
        "{log}"
    );
    let mut standby_local = Frontend::connect(&second.path("local.sock"), 1);
    assert_eq!(standby_local.write(0, 0, 0, 4096), 0);
    drop(standby_local);

    let mut fe = Frontend::connect(&socket, 1);
    let victim = first.process.pid() as libc::pid_t;
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1000));
        // SAFETY: kill(2) on the first daemon's pid; no memory is involved.
        unsafe { libc::kill(victim, libc::SIGKILL) };
        Instant::now()
    });
    // Verified writes, one at a time, each to a chunk of its own, until the daemon dies.
    let mut acknowledged = Vec::new();
    for i in 0.. {
        assert!(i < 4096, "the first daemon was never killed");
        submit_write(&mut fe, i);
        match fe.try_wait_one(0, Duration::from_secs(5)) {
            Some((_, 0)) => acknowledged.push(i),
            Some((_, ret)) => panic!("write {i} failed with {ret} before the kill"),
            None => break,
        }
    }
    let killed = killer.join().unwrap();
    let status = first.process.wait_exit(Duration::from_secs(10));
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    assert!(
        acknowledged.len() >= 10,
        "only {} writes",
        acknowledged.len()
    );
    drop(fe);

    // The second daemon breaks the dead holder's lock once its watch expired (5 s in the
    // test cluster's ceph.conf), then serves.
    second
        .process
        .wait_for_path(&socket, Duration::from_secs(90));
    let took_over = killed.elapsed();
    second.process.wait_for_log(
        "took the exclusive lock over from the previous holder: serving",
        1,
        Duration::from_secs(5),
    );
    let mut fe = Frontend::connect(&socket, 1);
    for &i in &acknowledged {
        verify(&mut fe, i, "after failover");
    }
    // The consumer goes on.
    let next = acknowledged.len() as u64 + 1;
    for i in next..next + 20 {
        submit_write(&mut fe, i);
        assert_eq!(fe.wait(0, 1)[0].1, 0, "write {i} on the second daemon");
        verify(&mut fe, i, "on the second daemon");
    }
    eprintln!(
        "failover: {} acknowledged writes kept; the second daemon served {took_over:?} after the kill",
        acknowledged.len()
    );
}

/// `io_timeout: 8`: an OSD stopped for 3 s stalls a write, which then succeeds; stopped
/// for longer than the timeout, the write fails with an I/O error, and once the OSD is back
/// requests succeed again on the same export.
#[test]
#[ignore = "full tier (tests/run.sh): needs Ceph (ceph-mon, ceph-osd) from tests/scripts/install-deps.sh"]
fn rbd_osd_stopped_briefly_stalls_io_which_resumes_and_past_io_timeout_fails() {
    let cluster = Cluster::start();
    let dir = scratch_dir();
    let socket = dir.path().join("vol.sock");
    let mut appliance = Appliance::start(
        &config(&cluster, "stall", &socket, ", io_timeout: 8", ""),
        &[],
    );
    appliance
        .process
        .wait_for_path(&socket, Duration::from_secs(60));
    let mut fe = Frontend::connect(&socket, 1);
    submit_write(&mut fe, 0);
    assert_eq!(fe.wait(0, 1)[0].1, 0);

    // Within io_timeout: a stall, no error.
    cluster.signal("osd", libc::SIGSTOP);
    submit_write(&mut fe, 1);
    let stalled = fe.try_wait_one(0, Duration::from_secs(3));
    cluster.signal("osd", libc::SIGCONT);
    assert_eq!(stalled, None, "a write completed while the OSD was stopped");
    let done = fe
        .try_wait_one(0, Duration::from_secs(60))
        .expect("the stalled write completes once the OSD is back");
    assert_eq!(done.1, 0, "the stalled write succeeded");
    verify(&mut fe, 0, "after the stall");
    verify(&mut fe, 1, "after the stall");
    let log = appliance.process.log();
    assert!(!log.contains("rbd operation failed"), "{log}");

    // Past io_timeout: an I/O error; then the export serves again.
    cluster.signal("osd", libc::SIGSTOP);
    let start = Instant::now();
    submit_write(&mut fe, 2);
    let failed = fe.try_wait_one(0, Duration::from_secs(30));
    let waited = start.elapsed();
    cluster.signal("osd", libc::SIGCONT);
    assert_eq!(failed.map(|d| d.1), Some(-libc::EIO), "after {waited:?}");
    assert!(waited >= Duration::from_secs(7), "failed after {waited:?}");
    appliance.process.wait_for_log(
        "the cluster did not answer within io_timeout",
        1,
        Duration::from_secs(5),
    );
    submit_write(&mut fe, 3);
    let done = fe
        .try_wait_one(0, Duration::from_secs(60))
        .expect("a write after the OSD came back completes");
    assert_eq!(done.1, 0, "a write after the OSD came back");
    verify(&mut fe, 3, "after the timeout");
    appliance
        .process
        .wait_for_log("rbd operations succeed again", 1, Duration::from_secs(5));
}

#[test]
#[ignore = "full tier (tests/run.sh): needs Ceph (ceph-mon, ceph-osd) from tests/scripts/install-deps.sh"]
fn rbd_cluster_gone_past_io_timeout_fails_requests_and_the_daemon_serves_on() {
    let mut cluster = Cluster::start();
    let dir = scratch_dir();
    let socket = dir.path().join("vol.sock");
    let file_export = "  - name: local
    type: blk
    socket: @DIR@/local.sock
    path: @DIR@/local.raw
    create: { size: 4M }
";
    let mut appliance = Appliance::start(
        &config(&cluster, "gone", &socket, ", io_timeout: 5", file_export),
        &["local.sock"],
    );
    appliance
        .process
        .wait_for_path(&socket, Duration::from_secs(60));
    let mut fe = Frontend::connect(&socket, 1);
    submit_write(&mut fe, 0);
    assert_eq!(fe.wait(0, 1)[0].1, 0);

    cluster.kill();
    let start = Instant::now();
    submit_write(&mut fe, 1);
    let (_, ret) = fe
        .try_wait_one(0, Duration::from_secs(60))
        .expect("the write fails within io_timeout, not never");
    let failed_after = start.elapsed();
    assert_eq!(ret, -libc::EIO, "an I/O error to the consumer");
    assert!(
        failed_after >= Duration::from_secs(4),
        "failed after {failed_after:?}: before io_timeout"
    );
    assert_eq!(fe.read(0, 0, CHUNK, CHUNK), -libc::EIO);
    appliance.process.wait_for_log(
        "the cluster did not answer within io_timeout",
        1,
        Duration::from_secs(10),
    );
    // The daemon is alive and serves its other export.
    assert!(appliance.process.try_wait().is_none(), "the daemon died");
    let mut local = Frontend::connect(&appliance.path("local.sock"), 1);
    local.buf(0, 4096).fill(0x5a);
    assert_eq!(local.write(0, 0, 0, 4096), 0);
    assert_eq!(local.read(0, 0, 4096, 4096), 0);
    assert!(local.buf(4096, 4096).iter().all(|&b| b == 0x5a));
    drop(fe);
    drop(local);
    // It still stops on SIGTERM: the final flush and the image's close time out too.
    let start = Instant::now();
    let status = appliance.process.terminate(Duration::from_secs(60));
    assert!(status.success(), "{status}");
    eprintln!(
        "cluster gone: the write failed after {failed_after:?} (io_timeout 5 s); SIGTERM to exit took {:?}",
        start.elapsed()
    );
}
