//! The per-queue counters the metrics endpoint sums: a known set of virtio-blk and
//! virtio-scsi requests (good, refused, failing, to no LUN, task management) over real
//! io_uring disks, and exactly those numbers in the counters: requests, bytes and failures
//! by op and reason, latency histogram counts, CHECK CONDITIONs by sense key, TMFs by
//! function, and no request left counted as in flight.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use targets::blk::{BlkDevice, BlkQueue, BlkSettings, Memory, Refusal};
use targets::device::{QueueHandler, VirtioDevice};
use targets::disk::{RawDisk, RawDiskOptions};
use targets::guest::GuestRam;
use targets::scsi::virtio::{encode_lun, ControlQueue, REQ_SIZE, RESP_SIZE};
use targets::stats::{Failure, LunStats, Op, QueueStats, LATENCY_SLOTS};
use virtio_bindings::bindings::virtio_blk::*;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use common::{readable, writable, ScsiFixture};

const HEADER: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x80_0000;

/// Runs one chain through `queue` to completion; returns how many completions it gave.
fn run(queue: &mut dyn QueueHandler, mem: &Arc<Memory>, descs: &[RawDescriptor]) -> usize {
    let vq = MockSplitQueue::new(&**mem, 16);
    let chain = vq.build_desc_chain(descs).unwrap();
    let mut done = Vec::new();
    queue.handle_chain(chain, &GuestRam::new(Arc::clone(mem)), &mut done);
    queue.submit().unwrap();
    queue.drain(&mut done).unwrap();
    queue.published();
    done.len()
}

fn blk_request(
    queue: &mut BlkQueue,
    mem: &Arc<Memory>,
    request_type: u32,
    sector: u64,
    data: Option<RawDescriptor>,
) -> u8 {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&request_type.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HEADER)).unwrap();
    mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
    let mut descs = vec![readable(HEADER, 16)];
    descs.extend(data);
    descs.push(writable(STATUS, 1));
    assert_eq!(run(queue, mem, &descs), 1);
    mem.read_obj(GuestAddress(STATUS)).unwrap()
}

/// Requests of `op` in each latency bucket, summed: equals the requests counted.
fn histogram_count(lun: &LunStats, op: Op) -> u64 {
    assert_eq!(lun.op(op).buckets.len(), LATENCY_SLOTS);
    lun.op(op).buckets.iter().map(|b| b.load(Relaxed)).sum()
}

#[test]
fn blk_counters_equal_the_requests_made() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let disk = RawDisk::open(&RawDiskOptions {
        path: dir.path().join("disk.raw"),
        readonly: false,
        direct: true,
        create_size: Some(1 << 20),
    })
    .unwrap();
    let settings = BlkSettings {
        logical_block_size: 512,
        readonly: false,
        serial: "stats".into(),
        num_queues: 1,
        queue_size: 16,
        writeback: true,
        writeback_state: None,
    };
    let device = Arc::new(BlkDevice::new(settings, disk.info()).unwrap());
    assert_eq!(device.lun_capacities(), vec![(0, 1 << 20)]);
    let mut queue = BlkQueue::new(Arc::clone(&device), Box::new(disk.new_queue(16).unwrap()));
    let mem = Arc::new(Memory::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap());
    let ok = VIRTIO_BLK_S_OK as u8;
    let seg = |mem: &Memory, sector: u64, sectors: u32, flags: u32| {
        let mut s = [0u8; 16];
        s[..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&sectors.to_le_bytes());
        s[12..].copy_from_slice(&flags.to_le_bytes());
        mem.write_slice(&s, GuestAddress(DATA)).unwrap();
        Some(readable(DATA, 16))
    };

    for _ in 0..3 {
        let status = blk_request(
            &mut queue,
            &mem,
            VIRTIO_BLK_T_OUT,
            8,
            Some(readable(DATA, 8192)),
        );
        assert_eq!(status, ok);
    }
    for _ in 0..2 {
        let status = blk_request(
            &mut queue,
            &mem,
            VIRTIO_BLK_T_IN,
            0,
            Some(writable(DATA, 4096)),
        );
        assert_eq!(status, ok);
    }
    assert_eq!(
        blk_request(&mut queue, &mem, VIRTIO_BLK_T_FLUSH, 0, None),
        ok
    );
    let d = seg(&mem, 16, 8, 0);
    assert_eq!(
        blk_request(&mut queue, &mem, VIRTIO_BLK_T_DISCARD, 0, d),
        ok
    );
    let wz = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
    let d = seg(&mem, 32, 16, wz);
    assert_eq!(
        blk_request(&mut queue, &mem, VIRTIO_BLK_T_WRITE_ZEROES, 0, d),
        ok
    );
    let status = blk_request(
        &mut queue,
        &mem,
        VIRTIO_BLK_T_GET_ID,
        0,
        Some(writable(DATA, 20)),
    );
    assert_eq!(status, ok);
    // Refused: a read past the end, an unknown type, a discard with unknown flags.
    let past_end = (1 << 20) / 512;
    let status = blk_request(
        &mut queue,
        &mem,
        VIRTIO_BLK_T_IN,
        past_end,
        Some(writable(DATA, 512)),
    );
    assert_eq!(status, VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(
        blk_request(&mut queue, &mem, 0x77, 0, None),
        VIRTIO_BLK_S_UNSUPP as u8
    );
    let d = seg(&mem, 0, 8, 0x10);
    let status = blk_request(&mut queue, &mem, VIRTIO_BLK_T_DISCARD, 0, d);
    assert_eq!(status, VIRTIO_BLK_S_UNSUPP as u8);
    // No status byte: not a request, only malformed.
    assert_eq!(run(&mut queue, &mem, &[readable(HEADER, 16)]), 1);

    let stats: Arc<QueueStats> = QueueHandler::stats(&queue).unwrap();
    let lun = stats.lun(0).unwrap();
    assert_eq!(lun.lun, Some(0));
    for (op, requests, bytes) in [
        (Op::Write, 3, 3 * 8192),
        (Op::Read, 3, 2 * 4096),
        (Op::Flush, 1, 0),
        (Op::Discard, 2, 8 * 512),
        (Op::WriteZeroes, 1, 16 * 512),
        (Op::Other, 2, 0),
    ] {
        assert_eq!(stats.requests(op), requests, "{op:?} requests");
        assert_eq!(stats.bytes(op), bytes, "{op:?} bytes");
        assert_eq!(histogram_count(&lun, op), requests, "{op:?} histogram");
    }
    assert_eq!(stats.failed(Op::Read, Failure::Invalid), 1);
    assert_eq!(stats.failed(Op::Other, Failure::Unsupported), 1);
    assert_eq!(stats.failed(Op::Discard, Failure::Unsupported), 1);
    let stats_ref = &*stats;
    let all_failed: u64 = Op::ALL
        .iter()
        .flat_map(|&op| Failure::ALL.iter().map(move |&f| stats_ref.failed(op, f)))
        .sum();
    assert_eq!(all_failed, 3);
    assert_eq!(stats.refused[Refusal::OutOfRange as usize].load(Relaxed), 1);
    assert_eq!(
        stats.refused[Refusal::UnknownType as usize].load(Relaxed),
        1
    );
    assert_eq!(
        stats.refused[Refusal::UnknownFlags as usize].load(Relaxed),
        1
    );
    assert_eq!(stats.malformed.load(Relaxed), 1);
    assert_eq!(lun.inflight.load(Relaxed), 0);
    let sum_ns: u64 = Op::ALL
        .iter()
        .map(|&op| lun.op(op).duration_ns.load(Relaxed))
        .sum();
    assert!(sum_ns > 0, "latencies are summed");
}

/// A data buffer of a SCSI command.
#[derive(Clone, Copy)]
enum Data {
    Out(u64, u32),
    In(u64, u32),
}

/// A SCSI command on request queue `queue`; returns (response, status, sense key).
fn scsi_command(
    fixture: &ScsiFixture,
    queue: &mut dyn QueueHandler,
    lun_field: [u8; 8],
    cdb: &[u8],
    data: Option<Data>,
) -> (u8, u8, u8) {
    const REQ: u64 = 0x20_0000;
    const RESP: u64 = 0x21_0000;
    let mut req = [0u8; REQ_SIZE];
    req[..8].copy_from_slice(&lun_field);
    req[19..19 + cdb.len()].copy_from_slice(cdb);
    fixture.mem.write_slice(&req, GuestAddress(REQ)).unwrap();
    let mut descs = vec![readable(REQ, REQ_SIZE as u32)];
    if let Some(Data::Out(addr, len)) = data {
        descs.push(readable(addr, len));
    }
    descs.push(writable(RESP, RESP_SIZE as u32));
    if let Some(Data::In(addr, len)) = data {
        descs.push(writable(addr, len));
    }
    assert_eq!(run(queue, &fixture.mem, &descs), 1);
    let mut resp = [0u8; RESP_SIZE];
    fixture
        .mem
        .read_slice(&mut resp, GuestAddress(RESP))
        .unwrap();
    (resp[11], resp[10], resp[12 + 2] & 0x0f)
}

#[test]
fn scsi_counters_equal_the_commands_made() {
    let fixture = ScsiFixture::new(&[0, 3]);
    fixture.device.session_started();
    let mut queue = fixture.request_queue();
    let lun0 = encode_lun(0);
    let lun3 = encode_lun(3);
    const UNIT_ATTENTION: u8 = 0x06;
    const ILLEGAL_REQUEST: u8 = 0x05;
    let tur = [0x00, 0, 0, 0, 0, 0];
    // The first command to each LUN reports the power-on unit attention.
    assert_eq!(
        scsi_command(&fixture, &mut queue, lun0, &tur, None),
        (0, 2, UNIT_ATTENTION)
    );
    assert_eq!(
        scsi_command(&fixture, &mut queue, lun3, &tur, None),
        (0, 2, UNIT_ATTENTION)
    );
    // WRITE(10) 8 blocks, READ(10) 4 blocks, SYNCHRONIZE CACHE(10) on LUN 0.
    let write = [0x2a, 0, 0, 0, 0, 16, 0, 0, 8, 0];
    assert_eq!(
        scsi_command(
            &fixture,
            &mut queue,
            lun0,
            &write,
            Some(Data::Out(0x22_0000, 4096))
        )
        .1,
        0
    );
    let read = [0x28, 0, 0, 0, 0, 16, 0, 0, 4, 0];
    assert_eq!(
        scsi_command(
            &fixture,
            &mut queue,
            lun0,
            &read,
            Some(Data::In(0x22_0000, 2048))
        )
        .1,
        0
    );
    assert_eq!(
        scsi_command(
            &fixture,
            &mut queue,
            lun0,
            &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            None
        )
        .1,
        0
    );
    // A read past the end of LUN 0: ILLEGAL REQUEST.
    let past_end = [0x28, 0, 0, 0, 0x10, 0, 0, 0, 1, 0];
    let r = scsi_command(
        &fixture,
        &mut queue,
        lun0,
        &past_end,
        Some(Data::In(0x22_0000, 512)),
    );
    assert_eq!(r, (0, 2, ILLEGAL_REQUEST));
    // UNMAP of 2 ranges (8 + 24 blocks) on LUN 3.
    let mut params = vec![0u8; 8 + 32];
    params[1] = 6 + 32;
    params[3] = 32;
    params[8..16].copy_from_slice(&64u64.to_be_bytes());
    params[16..20].copy_from_slice(&8u32.to_be_bytes());
    params[24..32].copy_from_slice(&128u64.to_be_bytes());
    params[32..36].copy_from_slice(&24u32.to_be_bytes());
    fixture
        .mem
        .write_slice(&params, GuestAddress(0x23_0000))
        .unwrap();
    let unmap = [0x42, 0, 0, 0, 0, 0, 0, 0, 40, 0];
    let r = scsi_command(
        &fixture,
        &mut queue,
        lun3,
        &unmap,
        Some(Data::Out(0x23_0000, 40)),
    );
    assert_eq!(r.1, 0, "{r:?}");
    // To an absent LUN: counted in the slot of no LUN.
    let r = scsi_command(&fixture, &mut queue, encode_lun(9), &tur, None);
    assert_eq!(r, (0, 2, ILLEGAL_REQUEST));
    // A LUN field for another target: BAD_TARGET.
    let r = scsi_command(&fixture, &mut queue, [1, 1, 0, 0, 0, 0, 0, 0], &tur, None);
    assert_eq!(r.0, 3);

    let stats = QueueHandler::stats(&queue).unwrap();
    let slots: Vec<Option<u16>> = stats.luns().iter().map(|l| l.lun).collect();
    assert_eq!(slots, [Some(0), Some(3), None]);
    let [l0, l3, none] = [0, 1, 2].map(|i| stats.lun(i).unwrap());
    let (l0, l3, none) = (&*l0, &*l3, &*none);
    let requests = |l: &LunStats, op: Op| l.op(op).requests.load(Relaxed);
    let bytes = |l: &LunStats, op: Op| l.op(op).bytes.load(Relaxed);
    assert_eq!(
        [Op::Read, Op::Write, Op::Flush, Op::Other].map(|op| requests(l0, op)),
        [2, 1, 1, 1]
    );
    assert_eq!((bytes(l0, Op::Read), bytes(l0, Op::Write)), (2048, 4096));
    assert_eq!(
        (requests(l3, Op::Discard), bytes(l3, Op::Discard)),
        (1, 32 * 512)
    );
    assert_eq!(requests(l3, Op::Other), 1);
    assert_eq!(requests(none, Op::Other), 2);
    assert_eq!(l0.failed(Op::Other, Failure::UnitAttention), 1);
    assert_eq!(l0.failed(Op::Read, Failure::Invalid), 1);
    assert_eq!(l3.failed(Op::Other, Failure::UnitAttention), 1);
    assert_eq!(none.failed(Op::Other, Failure::Invalid), 2);
    let checks = |l: &LunStats, key: u8| l.check_conditions[usize::from(key)].load(Relaxed);
    assert_eq!(
        (checks(l0, UNIT_ATTENTION), checks(l0, ILLEGAL_REQUEST)),
        (1, 1)
    );
    assert_eq!(
        (checks(l3, UNIT_ATTENTION), checks(none, ILLEGAL_REQUEST)),
        (1, 1)
    );
    for l in [l0, l3, none] {
        for op in Op::ALL {
            assert_eq!(
                histogram_count(l, op),
                requests(l, op),
                "{:?} {op:?}",
                l.lun
            );
        }
        assert_eq!(l.inflight.load(Relaxed), 0);
    }

    // Task management: a LUN reset and an unknown function, by function.
    let mut control = ControlQueue::new(Arc::clone(&fixture.device));
    for subtype in [5u32, 42] {
        let mut req = [0u8; 24];
        req[4..8].copy_from_slice(&subtype.to_le_bytes());
        req[8..16].copy_from_slice(&lun0);
        fixture
            .mem
            .write_slice(&req, GuestAddress(0x30_0000))
            .unwrap();
        let descs = [readable(0x30_0000, 24), writable(0x31_0000, 1)];
        assert_eq!(run(&mut control, &fixture.mem, &descs), 1);
    }
    let tmf: Vec<u64> = control
        .stats()
        .tmf
        .iter()
        .map(|c| c.load(Relaxed))
        .collect();
    assert_eq!(tmf, [0, 0, 0, 0, 0, 1, 0, 0, 1]);
    assert!(control.stats().luns().is_empty());
}

/// What counting costs a request: the clock read at pop, and `record` at completion (the
/// second clock read, the histogram bucket search, six relaxed load/stores). Run with
/// `cargo test --release -p targets --test queue_stats -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement, not a check"]
fn cost_of_counting_a_request() {
    let stats = QueueStats::default();
    let lun = stats.lun(0).unwrap();
    let n = 10_000_000u32;
    let t = std::time::Instant::now();
    for i in 0..n {
        let started = std::time::Instant::now();
        let op = if i % 2 == 0 { Op::Read } else { Op::Write };
        lun.record(op, 4096, started, None);
    }
    let per = t.elapsed().as_nanos() as f64 / f64::from(n);
    let t = std::time::Instant::now();
    for _ in 0..n {
        std::hint::black_box(std::time::Instant::now());
    }
    let clock = t.elapsed().as_nanos() as f64 / f64::from(n);
    println!("count one request: {per:.1} ns (of which a clock read: {clock:.1} ns)");
    assert_eq!(
        stats.requests(Op::Read) + stats.requests(Op::Write),
        u64::from(n)
    );
}
