//! Restart safety with out-of-order completions (vhost-user inflight I/O tracking), made
//! deterministic with the daemon's fault-injecting engine: request A (a write at byte 0) is
//! held inside the daemon, request B (a later write) completes, the daemon is SIGKILLed and
//! an ordinary daemon started on the same export. The raw frontend reconnects as QEMU does
//! after its backend died (avail base rewound to the used index, the inflight area kept).
//!
//! With INFLIGHT_SHMFD, A is re-run once and completes once, B is not completed again, and
//! the used index is right. Without it (the frontend does not negotiate the feature) the
//! same crash completes B twice and never A: the test that shows what the area is for.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use appliance_tests::daemon::{appliance_binary, fault_appliance_binary, scratch_dir, Appliance};
use appliance_tests::frontend::{RawFrontend, Setup, DATA_START};
use appliance_tests::scsi_frontend::{ScsiFrontend, REQUEST_QUEUE};
use virtio_bindings::bindings::virtio_blk::VIRTIO_BLK_T_OUT;
use vvu_transport::split_ring::Buffer;

/// Bytes each request writes.
const LEN: u32 = 4096;
/// Hold the first write at byte 0 (request A) inside the first daemon.
const HOLD_A: &str = "hold:write@0*1";
const TIMEOUT: Duration = Duration::from_secs(20);

/// Guest memory of request slot `slot`: header, data, status (or SCSI response).
fn slot(slot: u64) -> (u64, u64, u64) {
    let base = DATA_START + 0x10_0000 + slot * 0x1_0000;
    (base, base + 0x1000, base + 0x3000)
}

fn config(dir: &Path, kind: &str) -> String {
    let d = dir.display();
    match kind {
        "blk" => format!(
            "state_dir: {d}/state\nexports:\n  - name: e\n    type: blk\n    socket: {d}/e.sock\n    path: {d}/e.raw\n    create: {{ size: 16M }}\n    queue_size: 16\n"
        ),
        _ => format!(
            "state_dir: {d}/state\nexports:\n  - name: e\n    type: scsi\n    socket: {d}/e.sock\n    queue_size: 16\n    luns:\n      - path: {d}/e.raw\n        create: {{ size: 16M }}\n"
        ),
    }
}

/// Starts `binary` on the export in `dir` (with fault rules, if any).
fn start(binary: PathBuf, dir: &Path, kind: &str, faults: Option<&str>) -> Appliance {
    let mut command = Command::new(binary);
    if let Some(rules) = faults {
        command.env("VHOST_APPLIANCE_FAULTS", rules);
    }
    let mut appliance = Appliance::start_command(command, &config(dir, kind), &[]);
    appliance
        .process
        .wait_for_path(&dir.join("e.sock"), TIMEOUT);
    appliance
}

/// SIGKILLs the daemon and removes its socket (so the next one's socket can be awaited).
fn kill(mut appliance: Appliance, dir: &Path) {
    appliance.process.signal(libc::SIGKILL).expect("SIGKILL");
    appliance.process.wait_exit(TIMEOUT);
    std::fs::remove_file(dir.join("e.sock")).expect("remove the dead daemon's socket");
}

/// A virtio-blk write of `LEN` bytes of `byte` at `sector` from slot `n`; returns its head.
fn blk_write(fe: &mut RawFrontend, n: u64, sector: u64, byte: u8) -> u16 {
    let (header, data, status) = slot(n);
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    fe.write_mem(header, &h);
    fe.write_mem(data, &vec![byte; LEN as usize]);
    fe.write_mem(status, &[0xee]);
    fe.submit(&[
        Buffer::readable(header, 16),
        Buffer::readable(data, LEN),
        Buffer::writable(status, 1),
    ])
}

/// Waits until the used ring of queue `q` holds nothing new for `quiet`: returns what came.
fn drain_used(fe: &mut RawFrontend, q: usize, quiet: Duration) -> Vec<(u16, u32)> {
    let mut seen = Vec::new();
    let mut last = Instant::now();
    while last.elapsed() < quiet {
        match fe.try_used_on(q) {
            Some(used) => {
                seen.push(used);
                last = Instant::now();
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    seen
}

fn file_bytes(dir: &Path, offset: usize) -> Vec<u8> {
    let all = std::fs::read(dir.join("e.raw")).expect("read the backing file");
    all[offset..offset + LEN as usize].to_vec()
}

/// A held, B completed, daemon killed and restarted, frontend reconnected; returns the
/// frontend, the heads of A and B and the daemon now running.
fn crash_with_a_in_flight(dir: &Path, inflight: bool) -> (RawFrontend, u16, u16, Appliance) {
    let daemon = start(fault_appliance_binary(), dir, "blk", Some(HOLD_A));
    let socket = dir.join("e.sock");
    let mut fe = RawFrontend::connect_with(
        &socket,
        &Setup {
            num_queues: 1,
            queue_size: 16,
            wanted_features: u64::MAX,
            stale_used_idx: None,
            base_first: true,
            inflight,
            event_idx: false,
        },
    );
    let a = blk_write(&mut fe, 0, 0, 0xaa);
    let b = blk_write(&mut fe, 1, 8, 0xbb);
    assert_eq!(fe.wait_used(TIMEOUT).0, b, "B completes while A is held");
    assert_eq!(fe.read_mem(slot(1).2, 1)[0], 0, "B succeeded");
    assert!(
        drain_used(&mut fe, 0, Duration::from_millis(300)).is_empty(),
        "A is held"
    );
    assert_eq!(fe.used_idx(0), 1);
    assert_ne!(
        file_bytes(dir, 0),
        vec![0xaa; LEN as usize],
        "A is not on disk"
    );

    kill(daemon, dir);
    let daemon = start(appliance_binary(), dir, "blk", None);
    fe.reconnect(&socket);
    (fe, a, b, daemon)
}

#[test]
#[ignore = "full tier (tests/run.sh): needs the fault-injection daemon build"]
fn blk_request_in_flight_at_a_crash_is_rerun_once_and_a_completed_one_is_not_repeated() {
    let dir = scratch_dir();
    let (mut fe, a, b, mut daemon) = crash_with_a_in_flight(dir.path(), true);

    let used = drain_used(&mut fe, 0, Duration::from_secs(2));
    assert_eq!(
        used,
        vec![(a, 1)],
        "only A completes after the restart (B was {b})"
    );
    assert_eq!(fe.read_mem(slot(0).2, 1)[0], 0, "A succeeded");
    assert_eq!(fe.used_idx(0), 2, "used index: B, then A");
    assert_eq!(
        file_bytes(dir.path(), 0),
        vec![0xaa; LEN as usize],
        "A is on disk"
    );
    assert_eq!(
        file_bytes(dir.path(), 4096),
        vec![0xbb; LEN as usize],
        "B is on disk"
    );
    let log = daemon
        .process
        .wait_for_log("re-running requests in flight", 1, TIMEOUT);
    assert!(
        log.contains("requests=1"),
        "exactly one request re-run:\n{log}"
    );

    // The ring goes on from there: a new request takes the next slot.
    let c = blk_write(&mut fe, 2, 16, 0xcc);
    assert_eq!(fe.wait_used(TIMEOUT), (c, 1));
    assert_eq!(fe.used_idx(0), 3);
    assert!(drain_used(&mut fe, 0, Duration::from_millis(300)).is_empty());
}

#[test]
#[ignore = "full tier (tests/run.sh): needs the fault-injection daemon build"]
fn blk_without_inflight_tracking_the_same_crash_completes_b_twice_and_loses_a() {
    let dir = scratch_dir();
    let (fe, a, b, _daemon) = crash_with_a_in_flight(dir.path(), false);

    // The driver's own ring would refuse the second completion of B (a Linux guest marks
    // the virtqueue broken: "id is not a head"), so the used ring is read as written.
    let deadline = Instant::now() + TIMEOUT;
    while fe.used_idx(0) < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        fe.used_elem(0, 1),
        (u32::from(b), 1),
        "the avail index rewound to the used index replays B (A is {a})"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(fe.used_idx(0), 2, "and A never completes");
    assert_ne!(
        file_bytes(dir.path(), 0),
        vec![0xaa; LEN as usize],
        "A is lost"
    );
}

/// A SCSI WRITE(10) of `LEN` bytes of `byte` at `lba` from slot `n` on the first request
/// queue, tag `n`; returns its head.
fn scsi_write(fe: &mut RawFrontend, n: u64, lba: u32, byte: u8) -> u16 {
    let (req, data, resp) = slot(n);
    let mut r = vec![0u8; 51];
    r[..8].copy_from_slice(&ScsiFrontend::lun_field(0));
    r[8..16].copy_from_slice(&n.to_le_bytes());
    let blocks = (LEN / 512) as u16;
    let mut cdb = [0x2a, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    cdb[2..6].copy_from_slice(&lba.to_be_bytes());
    cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
    r[19..29].copy_from_slice(&cdb);
    fe.write_mem(req, &r);
    fe.write_mem(data, &vec![byte; LEN as usize]);
    fe.write_mem(resp, &[0xee; 108]);
    fe.submit_on(
        REQUEST_QUEUE,
        &[
            Buffer::readable(req, 51),
            Buffer::readable(data, LEN),
            Buffer::writable(resp, 108),
        ],
    )
}

/// (virtio response, SCSI status, sense key) of the command in slot `n`.
fn scsi_answer(fe: &RawFrontend, n: u64) -> (u8, u8, u8) {
    let resp = fe.read_mem(slot(n).2, 108);
    (resp[11], resp[10], resp[14] & 0x0f)
}

#[test]
#[ignore = "full tier (tests/run.sh): needs the fault-injection daemon build"]
fn scsi_command_in_flight_at_a_crash_is_rerun_and_the_tmf_waiting_for_it_is_not() {
    let dir = scratch_dir();
    let daemon = start(fault_appliance_binary(), dir.path(), "scsi", Some(HOLD_A));
    let socket = dir.path().join("e.sock");
    let mut scsi = ScsiFrontend::over(RawFrontend::connect_with(
        &socket,
        &Setup {
            num_queues: 3,
            queue_size: 16,
            wanted_features: u64::MAX,
            stale_used_idx: None,
            base_first: true,
            inflight: true,
            event_idx: false,
        },
    ));
    scsi.clear_ua(0);
    let fe = &mut scsi.fe;
    let base = fe.used_idx(REQUEST_QUEUE);
    let a = scsi_write(fe, 0, 0, 0xaa);
    let b = scsi_write(fe, 1, 8, 0xbb);
    assert_eq!(fe.wait_used_on(REQUEST_QUEUE, TIMEOUT).0, b);
    assert_eq!(scsi_answer(fe, 1), (0, 0, 0), "B succeeded");
    // ABORT TASK for A (tag 0) on the control queue: it waits for A, which is held.
    let (tmf, _, tmf_resp) = slot(3);
    let mut req = [0u8; 24];
    req[4..8].copy_from_slice(&0u32.to_le_bytes()); // VIRTIO_SCSI_T_TMF_ABORT_TASK
    req[8..16].copy_from_slice(&ScsiFrontend::lun_field(0));
    fe.write_mem(tmf, &req);
    fe.write_mem(tmf_resp, &[0xee]);
    let abort = fe.submit_on(
        0,
        &[Buffer::readable(tmf, 24), Buffer::writable(tmf_resp, 1)],
    );
    assert!(drain_used(fe, REQUEST_QUEUE, Duration::from_millis(300)).is_empty());
    assert!(drain_used(fe, 0, Duration::from_millis(100)).is_empty());

    kill(daemon, dir.path());
    let _daemon = start(appliance_binary(), dir.path(), "scsi", None);
    fe.reconnect(&socket);

    let control = drain_used(fe, 0, Duration::from_secs(2));
    assert_eq!(control, vec![(abort, 1)], "the TMF is answered once");
    assert_eq!(
        fe.read_mem(tmf_resp, 1)[0],
        9,
        "VIRTIO_SCSI_S_FAILURE: not re-run"
    );
    let used = drain_used(fe, REQUEST_QUEUE, Duration::from_secs(1));
    assert_eq!(
        used.len(),
        1,
        "only A completes after the restart: {used:?}"
    );
    assert_eq!(used[0].0, a);
    assert_eq!(fe.used_idx(REQUEST_QUEUE), base.wrapping_add(2));
    match scsi_answer(fe, 0) {
        (0, 0, _) => {}
        // The restarted target reports its power-on reset first, as SCSI requires: the
        // initiator retries.
        (0, 2, 6) => {
            let again = scsi_write(fe, 0, 0, 0xaa);
            assert_eq!(fe.wait_used_on(REQUEST_QUEUE, TIMEOUT).0, again);
            assert_eq!(scsi_answer(fe, 0), (0, 0, 0), "A succeeds on retry");
        }
        other => panic!("A answered {other:?}"),
    }
    assert_eq!(
        file_bytes(dir.path(), 0),
        vec![0xaa; LEN as usize],
        "A is on disk"
    );
    assert_eq!(
        file_bytes(dir.path(), 4096),
        vec![0xbb; LEN as usize],
        "B is on disk"
    );
}

#[test]
fn a_blk_drivers_write_cache_choice_survives_a_daemon_crash() {
    let dir = scratch_dir();
    let daemon = start(appliance_binary(), dir.path(), "blk", None);
    let socket = dir.path().join("e.sock");
    let mut fe = RawFrontend::connect(&socket, 16, u64::MAX);
    assert_eq!(fe.config(33)[32], 1, "writeback by default");
    // The guest switches to writethrough (Linux: cache_type "write through").
    fe.set_config(32, &[0]);
    assert_eq!(fe.config(33)[32], 0);
    kill(daemon, dir.path());
    let mut daemon = start(appliance_binary(), dir.path(), "blk", None);
    // QEMU would not read the config space again; the daemon must still agree with it.
    let mut again = RawFrontend::connect(&socket, 16, u64::MAX);
    assert_eq!(again.config(33)[32], 0, "writethrough after the restart");
    daemon.process.wait_for_log(
        "the driver's write cache choice, saved before a restart, applies",
        1,
        TIMEOUT,
    );
}
