//! Runs a [`Workload`] against a vhost-user-scsi socket: READ(10) and WRITE(10) to LUN 0
//! on the first request queue, through the raw frontend (one thread; virtio-scsi workloads
//! use one request queue, as vhost-device-scsi serves only one).

use std::path::Path;
use std::time::{Duration, Instant};

use vvu_transport::split_ring::Buffer;

use super::{file_size, Measured, Window, Workload};
use crate::frontend::{RawFrontend, DATA_START};
use crate::rng::Rng;
use crate::scsi_frontend::{ScsiFrontend, REQUEST_QUEUE};

/// Logical block size the exports use, in bytes.
const LBS: u64 = 512;
/// Where each slot's request header (51 bytes), response (108 bytes) and data live.
const REQ_AT: u64 = DATA_START;
const RESP_AT: u64 = DATA_START + 0x1_0000;
const DATA_AT: u64 = DATA_START + 0x2_0000;

/// TEST UNIT READY until LUN 0 answers GOOD (a power-on unit attention first, or not),
/// kicking again when no answer comes: vhost-device-scsi 0.1.0 sometimes loses the
/// first kick after the rings are set up, and a benchmark row should not die of it.
fn until_ready(fe: &mut ScsiFrontend) {
    let lun = ScsiFrontend::lun_field(0);
    let mut req = [0u8; 51];
    req[..8].copy_from_slice(&lun);
    fe.fe.write_mem(REQ_AT, &req);
    for _ in 0..3 {
        fe.fe.add_on(
            REQUEST_QUEUE,
            &[Buffer::readable(REQ_AT, 51), Buffer::writable(RESP_AT, 108)],
        );
        let mut answered = false;
        for _ in 0..20 {
            fe.fe.kick(REQUEST_QUEUE);
            let deadline = Instant::now() + Duration::from_millis(500);
            while Instant::now() < deadline {
                if fe.fe.try_used_on(REQUEST_QUEUE).is_some() {
                    answered = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            if answered {
                break;
            }
        }
        assert!(answered, "the SCSI target does not answer TEST UNIT READY");
        let resp = fe.fe.read_mem(RESP_AT, 12);
        if (resp[11], resp[10]) == (0, 0) {
            return;
        }
    }
    panic!("LUN 0 not ready after 3 TEST UNIT READY");
}

/// Runs `w` (one queue) for `seconds` after the warm-up on the export at `socket`,
/// charging the CPU time of process `server` inside the measured window to it.
pub fn run(socket: &Path, w: &Workload, seconds: f64, server: u32) -> Measured {
    assert_eq!(w.queues, 1, "virtio-scsi workloads use one request queue");
    // Three descriptors a request: 128 entries hold QD32 (and QD8 of 128 KiB).
    let mut fe = ScsiFrontend::over(RawFrontend::connect_queues(
        socket,
        REQUEST_QUEUE + 1,
        128,
        u64::MAX,
    ));
    until_ready(&mut fe);
    let lun = ScsiFrontend::lun_field(0);
    for slot in 0..w.depth {
        let mut req = [0u8; 51];
        req[..8].copy_from_slice(&lun);
        req[8..16].copy_from_slice(&(slot as u64).to_le_bytes());
        fe.fe.write_mem(REQ_AT + slot as u64 * 64, &req);
    }
    let mut rng = Rng::new(0x5c51);
    let blocks = file_size() / w.block as u64;
    let mut next_seq = 0u64;
    let mut slot_of_head = vec![usize::MAX; 1 << 16];
    let mut started = vec![Instant::now(); w.depth];
    let mut submit = |fe: &mut ScsiFrontend, slot: usize, started: &mut [Instant]| {
        let block = if w.pattern.sequential() {
            next_seq = (next_seq + 1) % blocks;
            next_seq
        } else {
            rng.below(blocks)
        };
        let write = w.pattern.is_write(rng.below(100));
        // READ(10)/WRITE(10): vhost-device-scsi has no 16-byte variants, and 512 MiB
        // needs only 32-bit LBAs.
        let lba = (block * w.block as u64 / LBS) as u32;
        let count = (w.block as u64 / LBS) as u16;
        let mut cdb = [0u8; 10];
        cdb[0] = if write { 0x2a } else { 0x28 };
        cdb[2..6].copy_from_slice(&lba.to_be_bytes());
        cdb[7..9].copy_from_slice(&count.to_be_bytes());
        let req = REQ_AT + slot as u64 * 64;
        fe.fe.write_mem(req + 19, &cdb);
        let resp = Buffer::writable(RESP_AT + slot as u64 * 128, 108);
        let data = DATA_AT + (slot * w.block) as u64;
        let chain = if write {
            [
                Buffer::readable(req, 51),
                Buffer::readable(data, w.block as u32),
                resp,
            ]
        } else {
            [
                Buffer::readable(req, 51),
                resp,
                Buffer::writable(data, w.block as u32),
            ]
        };
        started[slot] = Instant::now();
        fe.fe.add_on(REQUEST_QUEUE, &chain)
    };
    for slot in 0..w.depth {
        let head = submit(&mut fe, slot, &mut started);
        slot_of_head[usize::from(head)] = slot;
    }
    fe.fe.kick(REQUEST_QUEUE);
    let from = Instant::now() + super::blk::WARMUP;
    let window = Window {
        from,
        end: from + Duration::from_secs_f64(seconds),
    };
    let cpu = window.sample_cpu(server);
    let mut lat = Vec::with_capacity(1 << 20);
    let mut in_flight = w.depth;
    while in_flight > 0 {
        let (head, _) = fe.fe.wait_used_on(REQUEST_QUEUE, Duration::from_secs(30));
        let now = Instant::now();
        let slot = slot_of_head[usize::from(head)];
        let resp = fe.fe.read_mem(RESP_AT + slot as u64 * 128, 12);
        if (resp[11], resp[10]) != (0, 0) {
            let sense = fe.fe.read_mem(RESP_AT + slot as u64 * 128 + 12, 18);
            panic!(
                "SCSI command failed: response {} status {:#x} sense {sense:02x?}",
                resp[11], resp[10]
            );
        }
        in_flight -= 1;
        if window.complete(&mut lat, started[slot], now) {
            let head = submit(&mut fe, slot, &mut started);
            slot_of_head[usize::from(head)] = slot;
            fe.fe.kick(REQUEST_QUEUE);
            in_flight += 1;
        }
    }
    let mut m = Measured::from_latencies(lat, seconds, w.block);
    Window::charge_cpu(&mut m, cpu);
    m
}
