//! Hostile and broken input against the real daemon: malformed descriptor chains over the
//! socket, writes to read-only exports, frontends that vanish mid-I/O or send garbage, and
//! broken exports.yaml files. Each gets the right status or a clear error, and the daemon
//! keeps serving.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use appliance_tests::blk_raw::{read, request, write, DATA, HEADER, STATUS};
use appliance_tests::daemon::{
    appliance_binary, qemu_storage_daemon, scratch_dir, Appliance, Process,
};
use appliance_tests::frontend::{RawFrontend, Setup, DATA_START, MEM_SIZE};
use vhost::vhost_user::message::FrontendReq;
use virtio_bindings::bindings::virtio_blk::*;
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use vvu_transport::split_ring::Buffer;

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
const TIMEOUT: Duration = Duration::from_secs(10);
const ALL_FEATURES: u64 = u64::MAX;

fn export(lbs: u32, readonly: bool) -> String {
    format!(
        "exports:
  - name: vol0
    type: blk
    socket: @DIR@/vol0.sock
    path: @DIR@/vol0.raw
    logical_block_size: {lbs}
    readonly: {readonly}
    queue_size: 16
"
    )
}

fn start(lbs: u32, readonly: bool) -> Appliance {
    let dir = scratch_dir();
    std::fs::write(dir.path().join("vol0.raw"), vec![0x3cu8; 8 << 20]).unwrap();
    Appliance::start_in(dir, &export(lbs, readonly), &["vol0.sock"])
}

#[test]
fn malformed_chains_get_statuses_and_the_queue_keeps_working() {
    let appliance = start(4096, false);
    let mut fe = RawFrontend::connect(&appliance.path("vol0.sock"), 16, ALL_FEATURES);
    let capacity_sectors = u64::from_le_bytes(fe.config(8).try_into().unwrap());
    assert_eq!(capacity_sectors, (8 << 20) / 512);

    assert_eq!(read(&mut fe, 0, 4096), (4097, OK));
    // Out of range, overflowing, and not 4 KiB aligned.
    assert_eq!(read(&mut fe, capacity_sectors, 4096).1, IOERR);
    assert_eq!(read(&mut fe, capacity_sectors - 8, 8192).1, IOERR);
    assert_eq!(read(&mut fe, u64::MAX, 4096).1, IOERR);
    assert_eq!(read(&mut fe, 1, 4096).1, IOERR);
    assert_eq!(read(&mut fe, 0, 512).1, IOERR);
    // Data buffer in the wrong direction, both ways.
    let (_, status) = request(
        &mut fe,
        VIRTIO_BLK_T_IN,
        0,
        &[
            Buffer::readable(HEADER, 16),
            Buffer::readable(DATA, 4096),
            Buffer::writable(STATUS, 1),
        ],
    );
    assert_eq!(status, IOERR);
    let (_, status) = request(
        &mut fe,
        VIRTIO_BLK_T_OUT,
        0,
        &[
            Buffer::readable(HEADER, 16),
            Buffer::writable(DATA, 4096),
            Buffer::writable(STATUS, 1),
        ],
    );
    assert_eq!(status, IOERR);
    // Short header, and a header outside guest memory.
    assert_eq!(
        request(
            &mut fe,
            VIRTIO_BLK_T_IN,
            0,
            &[Buffer::readable(HEADER, 8), Buffer::writable(STATUS, 1)]
        )
        .1,
        IOERR
    );
    assert_eq!(
        request(
            &mut fe,
            VIRTIO_BLK_T_IN,
            0,
            &[Buffer::readable(1 << 40, 16), Buffer::writable(STATUS, 1)]
        )
        .1,
        IOERR
    );
    // Data buffer outside guest memory.
    assert_eq!(
        request(
            &mut fe,
            VIRTIO_BLK_T_IN,
            0,
            &[
                Buffer::readable(HEADER, 16),
                Buffer::writable(1 << 40, 4096),
                Buffer::writable(STATUS, 1)
            ]
        )
        .1,
        IOERR
    );
    // Oversized: seg_max (14 for queue_size 16) times SIZE_MAX (256 KiB) is the limit.
    assert_eq!(read(&mut fe, 0, 14 << 18).1, OK);
    assert_eq!(read(&mut fe, 0, (14 << 18) + 4096).1, IOERR);
    // Unknown request type.
    assert_eq!(
        request(
            &mut fe,
            0x77,
            0,
            &[Buffer::readable(HEADER, 16), Buffer::writable(STATUS, 1)]
        )
        .1,
        UNSUPP
    );
    // Framing is by bytes: the last writable byte is the status. With a zero-length status
    // descriptor that is the data buffer's last byte, leaving a 4095-byte read: IOERR there.
    let (len, status) = request(
        &mut fe,
        VIRTIO_BLK_T_IN,
        0,
        &[
            Buffer::readable(HEADER, 16),
            Buffer::writable(DATA, 4096),
            Buffer::writable(STATUS, 0),
        ],
    );
    assert_eq!((len, status), (1, 0xee));
    assert_eq!(fe.read_mem(DATA + 4095, 1)[0], IOERR);
    // A device-readable descriptor after a writable one: misordered, IOERR in the last
    // writable byte.
    fe.write_mem(STATUS, &[0xee]);
    let flags = [0, VRING_DESC_F_WRITE as u16, 0];
    let head = fe.submit_with_flags(
        &[
            Buffer::readable(HEADER, 16),
            Buffer::writable(DATA, 4096),
            Buffer::readable(STATUS, 1),
        ],
        &flags,
    );
    assert_eq!(fe.wait_used(TIMEOUT), (head, 1));
    assert_eq!(fe.read_mem(DATA + 4095, 1)[0], IOERR);
    // No writable byte at all: nothing can be reported, the chain comes back unused.
    let head = fe.submit(&[Buffer::readable(HEADER, 16), Buffer::readable(STATUS, 1)]);
    assert_eq!(fe.wait_used(TIMEOUT), (head, 0));
    assert_eq!(fe.read_mem(STATUS, 1)[0], 0xee);

    // After all that, the queue still serves good requests.
    fe.write_mem(DATA, &[0x42; 4096]);
    assert_eq!(write(&mut fe, 8, 4096), (1, OK));
    let mut back = [0u8; 4096];
    std::fs::File::open(appliance.path("vol0.raw"))
        .unwrap()
        .read_exact_at(&mut back, 4096)
        .unwrap();
    assert!(back.iter().all(|&b| b == 0x42));
}

#[test]
fn indirect_chains_work_and_oversized_ones_are_refused() {
    const TABLE: u64 = DATA_START + 0xc0_0000;
    let appliance = start(512, false);
    let mut fe = RawFrontend::connect(&appliance.path("vol0.sock"), 16, ALL_FEATURES);
    assert!(
        fe.features & (1 << virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC)
            != 0
    );
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
    h[8..].copy_from_slice(&16u64.to_le_bytes());
    fe.write_mem(HEADER, &h);
    // 14 data segments (= seg_max for a 16-entry ring) through one ring slot.
    let segments = |n: u64| {
        let mut chain = vec![Buffer::readable(HEADER, 16)];
        chain.extend((0..n).map(|i| Buffer::readable(DATA + i * 4096, 4096)));
        chain.push(Buffer::writable(STATUS, 1));
        chain
    };
    let pattern: Vec<u8> = (0..14 * 4096u32).map(|i| (i % 241) as u8).collect();
    fe.write_mem(DATA, &pattern);
    fe.write_mem(STATUS, &[0xee]);
    let head = fe.submit_indirect(TABLE, &segments(14));
    assert_eq!(fe.wait_used(TIMEOUT), (head, 1));
    assert_eq!(fe.read_mem(STATUS, 1)[0], OK);
    let mut back = vec![0u8; pattern.len()];
    std::fs::File::open(appliance.path("vol0.raw"))
        .unwrap()
        .read_exact_at(&mut back, 16 * 512)
        .unwrap();
    assert_eq!(back, pattern);
    // 15 segments: more than seg_max, refused whole.
    fe.write_mem(DATA, &[0u8; 15 * 4096]);
    fe.write_mem(STATUS, &[0xee]);
    let head = fe.submit_indirect(TABLE, &segments(15));
    assert_eq!(fe.wait_used(TIMEOUT), (head, 1));
    assert_eq!(fe.read_mem(STATUS, 1)[0], IOERR);
    std::fs::File::open(appliance.path("vol0.raw"))
        .unwrap()
        .read_exact_at(&mut back, 16 * 512)
        .unwrap();
    assert_eq!(back, pattern, "refused request must not write");
}

#[test]
fn readonly_export_answers_writes_with_ioerr_and_file_is_untouched() {
    let appliance = start(512, true);
    let mut fe = RawFrontend::connect(&appliance.path("vol0.sock"), 16, ALL_FEATURES);
    assert!(
        fe.features & (1 << VIRTIO_BLK_F_RO) != 0,
        "RO feature offered"
    );
    fe.write_mem(DATA, &[0x99; 4096]);
    assert_eq!(write(&mut fe, 0, 4096).1, IOERR);
    let mut seg = [0u8; 16];
    seg[8..12].copy_from_slice(&8u32.to_le_bytes());
    fe.write_mem(DATA, &seg);
    for t in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        let (_, status) = request(
            &mut fe,
            t,
            0,
            &[
                Buffer::readable(HEADER, 16),
                Buffer::readable(DATA, 16),
                Buffer::writable(STATUS, 1),
            ],
        );
        assert_eq!(status, IOERR);
    }
    assert_eq!(read(&mut fe, 0, 4096).1, OK);
    assert!(fe.read_mem(DATA, 4096).iter().all(|&b| b == 0x3c));
    let file = std::fs::read(appliance.path("vol0.raw")).unwrap();
    assert!(
        file.iter().all(|&b| b == 0x3c),
        "read-only backing file was modified"
    );
}

#[test]
fn frontend_disconnecting_mid_io_leaves_the_daemon_serving() {
    let mut appliance = start(512, false);
    let socket = appliance.path("vol0.sock");
    for round in 0..3 {
        let mut fe = RawFrontend::connect(&socket, 16, ALL_FEATURES);
        // Fill the ring with 1 MiB writes and hang up without waiting for any of them.
        for i in 0..4u64 {
            let mut h = [0u8; 16];
            h[..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
            h[8..].copy_from_slice(&(i * 2048).to_le_bytes());
            fe.write_mem(HEADER + i * 16, &h);
            fe.submit(&[
                Buffer::readable(HEADER + i * 16, 16),
                Buffer::readable(DATA + i * (1 << 20), 1 << 20),
                Buffer::writable(STATUS + i, 1),
            ]);
        }
        drop(fe);
        assert!(
            appliance.process.try_wait().is_none(),
            "daemon died in round {round}"
        );
    }
    let mut fe = RawFrontend::connect(&socket, 16, ALL_FEATURES);
    assert_eq!(read(&mut fe, 0, 4096).1, OK);
    assert!(appliance.process.log().contains("frontend disconnected"));
}

/// A read of 4 KiB at sector 0 on queue `q`: its status.
fn read_on(fe: &mut RawFrontend, q: usize) -> u8 {
    fe.write_mem(HEADER, &[0; 16]);
    fe.write_mem(STATUS, &[0xee]);
    let head = fe.submit_on(
        q,
        &[
            Buffer::readable(HEADER, 16),
            Buffer::writable(DATA, 4096),
            Buffer::writable(STATUS, 1),
        ],
    );
    assert_eq!(fe.wait_used_on(q, TIMEOUT).0, head, "queue {q}");
    fe.read_mem(STATUS, 1)[0]
}

#[test]
fn an_avail_index_beyond_the_ring_stops_only_that_queue() {
    // With EVENT_IDX the worker re-reads avail.idx after turning notifications back on,
    // and a ring it cannot pop from still looks busy: it must give the ring up, not spin
    // (holding the lock GET_VRING_BASE waits for) and log on every pass.
    let dir = scratch_dir();
    std::fs::write(dir.path().join("vol0.raw"), vec![0x3cu8; 8 << 20]).unwrap();
    let config = "exports:
  - name: vol0
    type: blk
    socket: @DIR@/vol0.sock
    path: @DIR@/vol0.raw
    num_queues: 2
    queue_size: 16
";
    let appliance = Appliance::start_in(dir, config, &["vol0.sock"]);
    let socket = appliance.path("vol0.sock");
    let setup = Setup {
        event_idx: true,
        ..Setup::plain(2, 16, ALL_FEATURES)
    };
    let mut fe = RawFrontend::connect_with(&socket, &setup);
    assert_eq!(read_on(&mut fe, 0), OK);

    // 1000 chains "available" on a ring of 16, from a driver that kicks again and again.
    fe.set_avail_idx(0, 1000);
    let kick_again = |fe: &mut RawFrontend| {
        for _ in 0..5 {
            fe.kick(0);
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    kick_again(&mut fe);
    // The other queue is served, and the control path answers: the broken ring's worker
    // holds nothing.
    assert_eq!(read_on(&mut fe, 1), OK);
    let faults = |appliance: &Appliance| {
        let log = appliance.process.log();
        assert!(!log.contains("Iterator error"), "{log}");
        assert!(!log.contains("Failed to read from memory"), "{log}");
        log.matches("cannot read the avail ring").count()
    };
    assert_eq!(faults(&appliance), 1, "logged once, when the fault starts");

    // The ring set up again with its avail ring in the last 4 bytes of guest memory: idx
    // is readable, the entries are not. A new fault, logged once as well.
    let base = fe.move_avail_ring(0, MEM_SIZE as u64 - 4, TIMEOUT);
    assert_eq!(base, 1, "stopped after the one good request");
    fe.write_mem(MEM_SIZE as u64 - 2, &2u16.to_le_bytes());
    kick_again(&mut fe);
    assert_eq!(read_on(&mut fe, 1), OK);
    assert_eq!(fe.stop_queue(0, TIMEOUT), 1);
    assert_eq!(fe.stop_queue(1, TIMEOUT), 2);
    assert_eq!(
        faults(&appliance),
        2,
        "each fault logged once, when it starts"
    );
    drop(fe);

    // A new connection is served on both queues.
    let mut fe = RawFrontend::connect_queues(&socket, 2, 16, ALL_FEATURES);
    assert_eq!(read_on(&mut fe, 0), OK);
    assert_eq!(read_on(&mut fe, 1), OK);
}

#[test]
fn garbage_on_the_socket_does_not_crash_the_daemon() {
    let mut appliance = start(512, false);
    let socket = appliance.path("vol0.sock");
    let mut rng = appliance_tests::rng::Rng::new(99);
    for len in [1usize, 11, 12, 64, 4096] {
        let mut junk = vec![0u8; len];
        rng.fill(&mut junk);
        let mut s = UnixStream::connect(&socket).unwrap();
        let _ = s.write_all(&junk);
        drop(s);
        std::thread::sleep(Duration::from_millis(50));
    }
    // A header claiming a huge payload.
    let mut s = UnixStream::connect(&socket).unwrap();
    let mut msg = Vec::new();
    msg.extend_from_slice(&(FrontendReq::SET_MEM_TABLE as u32).to_le_bytes());
    msg.extend_from_slice(&1u32.to_le_bytes());
    msg.extend_from_slice(&u32::MAX.to_le_bytes());
    let _ = s.write_all(&msg);
    drop(s);
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        appliance.process.try_wait().is_none(),
        "daemon exited:\n{}",
        appliance.process.log()
    );
    let mut fe = RawFrontend::connect(&socket, 16, ALL_FEATURES);
    assert_eq!(read(&mut fe, 0, 4096).1, OK);
}

/// Runs the daemon on `config` expecting it to refuse to start; returns its stderr.
fn refused(config: &str) -> String {
    let dir = scratch_dir();
    let path = dir.path().join("exports.yaml");
    std::fs::write(
        &path,
        config.replace("@DIR@", &dir.path().display().to_string()),
    )
    .unwrap();
    let out = Command::new(appliance_binary())
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success(), "daemon accepted a broken config");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn broken_configs_are_refused_with_file_line_and_field() {
    let err = refused(
        "exports:\n  - name: a\n    type: blk\n    socket: @DIR@/a.sock\n    pth: @DIR@/a.raw\n",
    );
    assert!(err.contains("exports.yaml:5"), "{err}");
    assert!(err.contains("unknown field `pth`"), "{err}");

    let err = refused(
        "exports:\n  - name: a\n    type: blk\n    socket: @DIR@/s.sock\n    path: @DIR@/a.raw\n    create: {size: 1M}\n  - name: b\n    type: blk\n    socket: @DIR@/s.sock\n    path: @DIR@/b.raw\n    create: {size: 1M}\n",
    );
    assert!(err.contains("exports.yaml:9"), "{err}");
    assert!(
        err.contains("export \"b\"") && err.contains("field \"socket\""),
        "{err}"
    );
    assert!(err.contains("duplicate socket"), "{err}");

    let out = Command::new(appliance_binary())
        .args(["--config", "/nonexistent/exports.yaml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/exports.yaml") && err.contains("cannot read config file"),
        "{err}"
    );
}

#[test]
fn a_broken_export_does_not_stop_the_others() {
    let config = "exports:
  - name: missing
    type: blk
    socket: @DIR@/missing.sock
    path: @DIR@/does-not-exist.raw
  - name: good
    type: blk
    socket: @DIR@/good.sock
    path: @DIR@/good.raw
    create: { size: 4M }
";
    let appliance = Appliance::start(config, &["good.sock"]);
    let mut fe = RawFrontend::connect(&appliance.path("good.sock"), 16, ALL_FEATURES);
    assert_eq!(read(&mut fe, 0, 4096).1, OK);
    assert!(!appliance.path("missing.sock").exists());
    let log = appliance.process.log();
    assert!(log.contains("does-not-exist.raw does not exist"), "{log}");
    assert!(log.contains("serving 1 of 2 exports"), "{log}");
}

#[test]
fn live_socket_is_not_stolen_and_sigterm_exits_cleanly() {
    let mut first = start(512, false);
    // A second daemon on the same socket must refuse, not unlink the live one.
    let out = Command::new(appliance_binary())
        .arg("--config")
        .arg(first.path("exports.yaml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut fe = RawFrontend::connect(&first.path("vol0.sock"), 16, ALL_FEATURES);
    assert_eq!(read(&mut fe, 0, 4096).1, OK);
    let status = first.process.terminate(Duration::from_secs(10));
    assert!(
        status.success(),
        "SIGTERM exit status {status}:\n{}",
        first.process.log()
    );
    assert!(first.process.log().contains("stopped"));
}

#[test]
fn backend_program_conventions() {
    let out = Command::new(appliance_binary())
        .arg("--print-capabilities")
        .output()
        .unwrap();
    assert!(out.status.success());
    let caps = String::from_utf8_lossy(&out.stdout);
    assert!(
        caps.contains("\"type\": \"block\"") && caps.contains("read-only-bdev"),
        "{caps}"
    );

    // --socket-path + --blk-file + --read-only.
    let dir = scratch_dir();
    let image = dir.path().join("disk.raw");
    std::fs::write(&image, vec![0x17u8; 1 << 20]).unwrap();
    let socket = dir.path().join("s.sock");
    let mut cmd = Command::new(appliance_binary());
    cmd.arg("--socket-path")
        .arg(&socket)
        .arg("--blk-file")
        .arg(&image)
        .arg("--read-only");
    let mut daemon = Process::spawn(cmd, &dir.path().join("single.log"), "vhost-appliance");
    daemon.wait_for_path(&socket, TIMEOUT);
    let mut fe = RawFrontend::connect(&socket, 16, ALL_FEATURES);
    assert!(fe.features & (1 << VIRTIO_BLK_F_RO) != 0);
    assert_eq!(read(&mut fe, 0, 512).1, OK);
    assert!(fe.read_mem(DATA, 512).iter().all(|&b| b == 0x17));
    drop(fe);
    drop(daemon);

    // --fd: an inherited listening socket.
    let listen_path = dir.path().join("fd.sock");
    let listener = std::os::unix::net::UnixListener::bind(&listen_path).unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
    // SAFETY: clearing FD_CLOEXEC on our own listening socket so the child inherits it.
    unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
    let mut cmd = Command::new(appliance_binary());
    cmd.arg("--fd")
        .arg(fd.to_string())
        .arg("--blk-file")
        .arg(&image);
    let _daemon = Process::spawn(cmd, &dir.path().join("fd.log"), "vhost-appliance");
    let mut fe = RawFrontend::connect(&listen_path, 16, ALL_FEATURES);
    assert_eq!(read(&mut fe, 0, 512).1, OK);

    // --fd that is not a socket is refused clearly.
    let out = Command::new(appliance_binary())
        .args(["--fd", "0", "--blk-file"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a socket"));
}

/// Refused requests get the status qemu-storage-daemon gives them (QEMU's own tests hold
/// vhost-user-blk backends to those): the same requests, over the same raw frontend, to both.
#[test]
#[ignore = "full tier (tests/run.sh): needs QEMU's tools from tests/scripts/install-deps.sh"]
fn refused_requests_get_qemu_storage_daemons_statuses() {
    let dir = scratch_dir();
    let image = dir.path().join("qsd.raw");
    std::fs::write(&image, vec![0u8; 8 << 20]).unwrap();
    let qsd_socket = dir.path().join("qsd.sock");
    let _qsd = qemu_storage_daemon(&image, &qsd_socket, &dir.path().join("qsd.log"));
    let appliance = start(512, false);

    let segment = |sector: u64, sectors: u32, flags: u32| {
        let mut seg = [0u8; 16];
        seg[..8].copy_from_slice(&sector.to_le_bytes());
        seg[8..12].copy_from_slice(&sectors.to_le_bytes());
        seg[12..].copy_from_slice(&flags.to_le_bytes());
        seg
    };
    let last = (8 << 20) / 512;
    /// What, request type, sector, payload, payload bytes sent, data-in bytes.
    type Case = (&'static str, u32, u64, Vec<u8>, u32, u32);
    let cases: Vec<Case> = vec![
        (
            "two discard segments",
            VIRTIO_BLK_T_DISCARD,
            0,
            [segment(0, 8, 0), segment(8, 8, 0)].concat(),
            32,
            0,
        ),
        (
            "two write-zeroes segments",
            VIRTIO_BLK_T_WRITE_ZEROES,
            0,
            [segment(0, 8, 0), segment(8, 8, 0)].concat(),
            32,
            0,
        ),
        (
            "a segment and a half",
            VIRTIO_BLK_T_DISCARD,
            0,
            [segment(0, 8, 0), segment(8, 8, 0)].concat(),
            24,
            0,
        ),
        (
            "a short segment",
            VIRTIO_BLK_T_DISCARD,
            0,
            segment(0, 8, 0).to_vec(),
            10,
            0,
        ),
        (
            "discard with UNMAP",
            VIRTIO_BLK_T_DISCARD,
            0,
            segment(0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP).to_vec(),
            16,
            0,
        ),
        (
            "write-zeroes with an unknown flag",
            VIRTIO_BLK_T_WRITE_ZEROES,
            0,
            segment(0, 8, 0x10).to_vec(),
            16,
            0,
        ),
        (
            "discard past the end",
            VIRTIO_BLK_T_DISCARD,
            0,
            segment(last, 8, 0).to_vec(),
            16,
            0,
        ),
        (
            "write-zeroes of too many sectors",
            VIRTIO_BLK_T_WRITE_ZEROES,
            0,
            segment(0, u32::MAX, 0).to_vec(),
            16,
            0,
        ),
        (
            "read past the end",
            VIRTIO_BLK_T_IN,
            last,
            Vec::new(),
            0,
            512,
        ),
        (
            "unaligned read length",
            VIRTIO_BLK_T_IN,
            0,
            Vec::new(),
            0,
            100,
        ),
        ("unknown type", 0xdead, 0, Vec::new(), 0, 0),
        (
            "SCSI command type",
            VIRTIO_BLK_T_SCSI_CMD,
            0,
            Vec::new(),
            0,
            0,
        ),
        (
            "a good single segment",
            VIRTIO_BLK_T_DISCARD,
            0,
            segment(0, 8, 0).to_vec(),
            16,
            0,
        ),
    ];
    let mut ours = RawFrontend::connect(&appliance.path("vol0.sock"), 16, ALL_FEATURES);
    let mut theirs = RawFrontend::connect(&qsd_socket, 16, ALL_FEATURES);
    for (what, request_type, sector, payload, out_len, in_len) in cases {
        let status = |fe: &mut RawFrontend| {
            let mut chain = vec![Buffer::readable(HEADER, 16)];
            if out_len > 0 {
                fe.write_mem(DATA, &payload);
                chain.push(Buffer::readable(DATA, out_len));
            }
            if in_len > 0 {
                chain.push(Buffer::writable(DATA, in_len));
            }
            chain.push(Buffer::writable(STATUS, 1));
            request(fe, request_type, sector, &chain).1
        };
        let (a, q) = (status(&mut ours), status(&mut theirs));
        assert_eq!(a, q, "{what}: ours {a}, qemu-storage-daemon {q}");
    }
}
