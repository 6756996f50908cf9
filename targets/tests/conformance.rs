//! The conformance suite every disk engine runs: raw with O_DIRECT, raw through the page
//! cache, qcow2, and the fault-injecting engine (over raw and over qcow2). Each engine is
//! opened through `targets::disk::open` and driven the way a guest drives it, through the
//! virtio-blk and virtio-scsi request handling, with descriptor chains in guest memory:
//!
//! - read, write, flush, discard and write-zeroes round trips;
//! - guest buffers that are not aligned (bounced with O_DIRECT);
//! - requests at and past the end of the disk;
//! - I/O errors reaching the guest as the right virtio-blk status and SCSI sense (the
//!   fault engine fails chosen operations);
//! - completions out of order (the fault engine holds one request while another
//!   completes);
//! - a queue dropped with requests in flight: nothing written is lost, nothing hangs.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use targets::blk::{status, BlkDevice, BlkQueue, BlkSettings, Completed, Memory};
use targets::device::QueueHandler;
use targets::disk::fault::{Fault, FaultControl, FaultDisk, OpKind, OpMatch};
use targets::disk::{Disk, DiskSpec, Format};
use targets::guest::GuestRam;
use targets::scsi::emulation::{Lun, LunSettings};
use targets::scsi::sense::Sense;
use targets::scsi::virtio::{encode_lun, RequestQueue, ScsiDevice, ScsiLun, RESP_SIZE};
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use common::{readable, writable};

const SIZE: u64 = 1 << 20;
const SECTORS: u64 = SIZE / 512;
const HEADER: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const RESP: u64 = 0x70_0000;
const STATUS: u64 = 0x80_0000;

/// One engine under test.
struct Engine {
    name: &'static str,
    _dir: tempfile::TempDir,
    disk: Arc<dyn Disk>,
    fault: Option<FaultControl>,
}

fn open(dir: &tempfile::TempDir, format: Format, direct: bool) -> Arc<dyn Disk> {
    targets::disk::open(&DiskSpec {
        path: dir.path().join(match format {
            Format::Raw => "disk.raw",
            Format::Qcow2 => "disk.qcow2",
            Format::Rbd => "rbd needs a cluster: tests/tests/rbd_e2e.rs",
            // Not in this suite: it stores nothing (its own tests are in disk/null.rs).
            Format::Null => "unused",
        }),
        format,
        readonly: false,
        direct,
        create: Some((SIZE, None)),
        rbd: None,
    })
    .unwrap()
}

/// Every engine, each on a fresh 1 MiB disk (under the target directory, where O_DIRECT
/// works).
fn engines() -> Vec<Engine> {
    let mut all = Vec::new();
    for (name, format, direct, fault) in [
        ("raw O_DIRECT", Format::Raw, true, false),
        ("raw buffered", Format::Raw, false, false),
        ("qcow2", Format::Qcow2, true, false),
        ("fault over raw", Format::Raw, true, true),
        ("fault over qcow2", Format::Qcow2, false, true),
    ] {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let disk = open(&dir, format, direct);
        let (disk, fault) = if fault {
            let (disk, control) = FaultDisk::new(disk);
            (Arc::new(disk) as Arc<dyn Disk>, Some(control))
        } else {
            (disk, None)
        };
        all.push(Engine {
            name,
            _dir: dir,
            disk,
            fault,
        });
    }
    all
}

fn faulty() -> Vec<Engine> {
    engines()
        .into_iter()
        .filter(|e| e.fault.is_some())
        .collect()
}

/// A virtio-blk queue on an engine, with 16 MiB of guest memory.
struct Blk {
    mem: Arc<Memory>,
    queue: BlkQueue,
}

impl Blk {
    fn new(engine: &Engine, writeback: bool) -> Self {
        let device = Arc::new(
            BlkDevice::new(
                BlkSettings {
                    logical_block_size: 512,
                    readonly: false,
                    serial: "conformance".into(),
                    num_queues: 1,
                    queue_size: 16,
                    writeback,
                    writeback_state: None,
                },
                engine.disk.info(),
            )
            .unwrap(),
        );
        let ring = engine.disk.open_queue(16, None).unwrap();
        Blk {
            mem: Arc::new(Memory::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()),
            queue: BlkQueue::new(device, ring),
        }
    }

    fn ram(&self) -> GuestRam {
        GuestRam::new(Arc::clone(&self.mem))
    }

    /// Starts a request (header at `HEADER + slot * 16`, status at `STATUS + slot`)
    /// without waiting for it.
    fn start(&mut self, slot: u64, request_type: u32, sector: u64, data: Option<RawDescriptor>) {
        let header = HEADER + slot * 16;
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&request_type.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(header)).unwrap();
        self.mem
            .write_obj(0xeeu8, GuestAddress(STATUS + slot))
            .unwrap();
        let mut descs = vec![readable(header, 16)];
        descs.extend(data);
        descs.push(writable(STATUS + slot, 1));
        let vq = MockSplitQueue::new(&*self.mem, 16);
        let chain = vq.build_desc_chain(&descs).unwrap();
        let mut done = Vec::new();
        self.queue.handle_chain(chain, &self.ram(), &mut done);
        assert!(done.is_empty() || done.len() == 1);
        self.queue.submit().unwrap();
    }

    /// Runs one request to completion; its status byte.
    fn run(&mut self, request_type: u32, sector: u64, data: Option<RawDescriptor>) -> u8 {
        let mut done = Vec::new();
        self.start_into(request_type, sector, data, &mut done);
        self.queue.drain(&mut done).unwrap();
        assert_eq!(done.len(), 1, "{done:?}");
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    fn start_into(
        &mut self,
        request_type: u32,
        sector: u64,
        data: Option<RawDescriptor>,
        done: &mut Vec<Completed>,
    ) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&request_type.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(HEADER)).unwrap();
        self.mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        let mut descs = vec![readable(HEADER, 16)];
        descs.extend(data);
        descs.push(writable(STATUS, 1));
        let vq = MockSplitQueue::new(&*self.mem, 16);
        let chain = vq.build_desc_chain(&descs).unwrap();
        self.queue.handle_chain(chain, &self.ram(), done);
        self.queue.submit().unwrap();
    }

    fn write(&mut self, sector: u64, addr: u64, data: &[u8]) -> u8 {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
        let desc = readable(addr, data.len() as u32);
        self.run(VIRTIO_BLK_T_OUT, sector, Some(desc))
    }

    fn read(&mut self, sector: u64, addr: u64, len: usize) -> (u8, Vec<u8>) {
        self.mem
            .write_slice(&vec![0x5a; len], GuestAddress(addr))
            .unwrap();
        let status = self.run(VIRTIO_BLK_T_IN, sector, Some(writable(addr, len as u32)));
        let mut back = vec![0u8; len];
        self.mem.read_slice(&mut back, GuestAddress(addr)).unwrap();
        (status, back)
    }

    /// A discard or write-zeroes of `sectors` at `sector`.
    fn zero(&mut self, request_type: u32, sector: u64, sectors: u32, flags: u32) -> u8 {
        let mut seg = [0u8; 16];
        seg[..8].copy_from_slice(&sector.to_le_bytes());
        seg[8..12].copy_from_slice(&sectors.to_le_bytes());
        seg[12..].copy_from_slice(&flags.to_le_bytes());
        let at = DATA + 0x8_0000;
        self.mem.write_slice(&seg, GuestAddress(at)).unwrap();
        self.run(request_type, 0, Some(readable(at, 16)))
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

#[test]
fn read_write_flush_round_trip_on_every_engine() {
    for e in engines() {
        for writeback in [true, false] {
            let mut blk = Blk::new(&e, writeback);
            let data = pattern(8192, 3);
            assert_eq!(blk.write(8, DATA, &data), status::OK, "{}", e.name);
            assert_eq!(
                blk.run(VIRTIO_BLK_T_FLUSH, 0, None),
                status::OK,
                "{}",
                e.name
            );
            let (st, back) = blk.read(8, DATA + 0x10000, 8192);
            assert_eq!(st, status::OK, "{}", e.name);
            assert!(back == data, "{}: read back what was written", e.name);
            let (st, back) = blk.read(100, DATA, 4096);
            assert_eq!(st, status::OK, "{}", e.name);
            assert!(back.iter().all(|&b| b == 0), "{}: never written", e.name);
        }
    }
}

#[test]
fn discard_and_write_zeroes_read_back_as_promised() {
    for e in engines() {
        let info = e.disk.info();
        let mut blk = Blk::new(&e, true);
        let data = pattern(65536, 9);
        assert_eq!(blk.write(0, DATA, &data), status::OK, "{}", e.name);
        // Zeroes without and with unmap, on 4 KiB-aligned ranges.
        assert!(info.deallocate_zeroes, "{}", e.name);
        assert_eq!(
            blk.zero(VIRTIO_BLK_T_WRITE_ZEROES, 8, 8, 0),
            status::OK,
            "{}",
            e.name
        );
        assert_eq!(
            blk.zero(VIRTIO_BLK_T_WRITE_ZEROES, 24, 8, 1),
            status::OK,
            "{}",
            e.name
        );
        assert_eq!(
            blk.zero(VIRTIO_BLK_T_DISCARD, 64, 64, 0),
            status::OK,
            "{}",
            e.name
        );
        let (st, back) = blk.read(0, DATA + 0x10000, 65536);
        assert_eq!(st, status::OK, "{}", e.name);
        let mut want = data.clone();
        want[4096..8192].fill(0);
        want[12288..16384].fill(0);
        if info.discard_zeroes {
            want[32768..65536].fill(0);
        }
        assert!(
            back == want,
            "{}: zeroed ranges and their neighbours",
            e.name
        );
    }
}

#[test]
fn unaligned_guest_buffers_round_trip() {
    for e in engines() {
        let mut blk = Blk::new(&e, true);
        let data = pattern(4096, 5);
        // Odd guest addresses: O_DIRECT engines bounce them.
        assert_eq!(blk.write(16, DATA + 1, &data), status::OK, "{}", e.name);
        let (st, back) = blk.read(16, DATA + 0x10003, 4096);
        assert_eq!(st, status::OK, "{}", e.name);
        assert!(back == data, "{}", e.name);
        // Split over two odd-sized descriptors.
        blk.mem
            .write_slice(&vec![0u8; 4096], GuestAddress(DATA + 0x20000))
            .unwrap();
        let mut done = Vec::new();
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
        h[8..].copy_from_slice(&16u64.to_le_bytes());
        blk.mem.write_slice(&h, GuestAddress(HEADER)).unwrap();
        let vq = MockSplitQueue::new(&*blk.mem, 16);
        let chain = vq
            .build_desc_chain(&[
                readable(HEADER, 16),
                writable(DATA + 0x20000, 1000),
                writable(DATA + 0x30001, 3096),
                writable(STATUS, 1),
            ])
            .unwrap();
        blk.queue.handle_chain(chain, &blk.ram(), &mut done);
        blk.queue.submit().unwrap();
        blk.queue.drain(&mut done).unwrap();
        let st: u8 = blk.mem.read_obj(GuestAddress(STATUS)).unwrap();
        assert_eq!(st, status::OK, "{}", e.name);
        let mut back = vec![0u8; 4096];
        blk.mem
            .read_slice(&mut back[..1000], GuestAddress(DATA + 0x20000))
            .unwrap();
        blk.mem
            .read_slice(&mut back[1000..], GuestAddress(DATA + 0x30001))
            .unwrap();
        assert!(back == data, "{}: scattered read", e.name);
    }
}

#[test]
fn requests_at_and_past_the_end() {
    for e in engines() {
        let mut blk = Blk::new(&e, true);
        let (st, _) = blk.read(SECTORS - 1, DATA, 512);
        assert_eq!(st, status::OK, "{}: the last sector", e.name);
        let (st, _) = blk.read(SECTORS, DATA, 512);
        assert_eq!(st, status::IOERR, "{}: past the end", e.name);
        let (st, _) = blk.read(SECTORS - 1, DATA, 1024);
        assert_eq!(st, status::IOERR, "{}: across the end", e.name);
        assert_eq!(
            blk.write(SECTORS, DATA, &[1; 512]),
            status::IOERR,
            "{}",
            e.name
        );
        assert_eq!(
            blk.zero(VIRTIO_BLK_T_DISCARD, SECTORS - 1, 2, 0),
            status::IOERR,
            "{}",
            e.name
        );
        let mut scsi = Scsi::new(&e);
        let sense = scsi.check(&read10(SECTORS as u32, 1), 512);
        assert_eq!(sense, Some(Sense::LBA_OUT_OF_RANGE), "{}", e.name);
        assert_eq!(scsi.check(&read10(SECTORS as u32 - 1, 1), 512), None);
    }
}

#[test]
fn io_errors_reach_the_guest_as_virtio_blk_status() {
    for e in faulty() {
        let fault = e.fault.clone().unwrap();
        let mut blk = Blk::new(&e, true);
        fault.inject(OpMatch::kind(OpKind::Read), Fault::Fail(libc::EIO), Some(1));
        let (st, _) = blk.read(0, DATA, 4096);
        assert_eq!(st, status::IOERR, "{}: failed read", e.name);
        let (st, _) = blk.read(0, DATA, 4096);
        assert_eq!(st, status::OK, "{}: the rule was used up", e.name);
        fault.inject(
            OpMatch::kind(OpKind::Write),
            Fault::Fail(libc::ENOSPC),
            Some(1),
        );
        assert_eq!(blk.write(0, DATA, &[7; 4096]), status::IOERR, "{}", e.name);
        fault.inject(
            OpMatch::kind(OpKind::Flush),
            Fault::Fail(libc::EIO),
            Some(1),
        );
        assert_eq!(blk.run(VIRTIO_BLK_T_FLUSH, 0, None), status::IOERR);
        fault.inject(
            OpMatch::kind(OpKind::Discard),
            Fault::Fail(libc::EIO),
            Some(1),
        );
        assert_eq!(blk.zero(VIRTIO_BLK_T_DISCARD, 0, 8, 0), status::IOERR);
        assert_eq!(blk.queue.in_flight(), 0);
    }
}

#[test]
fn io_errors_reach_the_guest_as_scsi_sense() {
    for e in faulty() {
        let fault = e.fault.clone().unwrap();
        let mut scsi = Scsi::new(&e);
        let cases: [(OpKind, i32, Vec<u8>, Sense); 4] = [
            (
                OpKind::Read,
                libc::EIO,
                read10(0, 8),
                Sense::UNRECOVERED_READ_ERROR,
            ),
            (OpKind::Write, libc::EIO, write10(0, 8), Sense::WRITE_ERROR),
            (
                OpKind::Write,
                libc::ENOSPC,
                write10(0, 8),
                Sense::SPACE_ALLOCATION_FAILED,
            ),
            (
                OpKind::Flush,
                libc::EIO,
                vec![0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                Sense::WRITE_ERROR,
            ),
        ];
        for (kind, errno, cdb, want) in cases {
            fault.inject(OpMatch::kind(kind), Fault::Fail(errno), Some(1));
            assert_eq!(
                scsi.check(&cdb, 4096),
                Some(want),
                "{}: {kind:?} failing with {errno}",
                e.name
            );
            assert_eq!(scsi.check(&cdb, 4096), None, "{}: once only", e.name);
        }
    }
}

#[test]
fn a_held_request_completes_after_a_later_one() {
    for e in faulty() {
        let fault = e.fault.clone().unwrap();
        let mut blk = Blk::new(&e, true);
        // A: a write to sector 0, held. B: a write to sector 64, through.
        fault.inject(OpMatch::at(OpKind::Write, 0), Fault::Hold, Some(1));
        blk.mem
            .write_slice(&[0xaa; 4096], GuestAddress(DATA))
            .unwrap();
        blk.mem
            .write_slice(&[0xbb; 4096], GuestAddress(DATA + 0x10000))
            .unwrap();
        blk.start(0, VIRTIO_BLK_T_OUT, 0, Some(readable(DATA, 4096)));
        blk.start(
            1,
            VIRTIO_BLK_T_OUT,
            64,
            Some(readable(DATA + 0x10000, 4096)),
        );
        let b_done = reap_until(&mut blk.queue, 1);
        assert_eq!(b_done.len(), 1, "{}", e.name);
        let status_of =
            |blk: &Blk, slot| -> u8 { blk.mem.read_obj(GuestAddress(STATUS + slot)).unwrap() };
        assert_eq!(status_of(&blk, 1), status::OK, "{}: B completed", e.name);
        assert_eq!(status_of(&blk, 0), 0xee, "{}: A still held", e.name);
        assert_eq!((fault.held(), blk.queue.in_flight()), (1, 1), "{}", e.name);
        assert!(fault.release_oldest());
        let a_done = reap_until(&mut blk.queue, 1);
        assert_eq!(a_done.len(), 1, "{}", e.name);
        assert_eq!(status_of(&blk, 0), status::OK, "{}: A completed", e.name);
        let (_, back) = blk.read(0, DATA + 0x20000, 4096);
        assert!(back.iter().all(|&b| b == 0xaa), "{}", e.name);
    }
}

/// Reaps as the worker does, on eventfd wake-ups, until `n` requests completed.
fn reap_until(queue: &mut BlkQueue, n: usize) -> Vec<Completed> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut done = Vec::new();
    while done.len() < n {
        assert!(Instant::now() < deadline, "no completion within 10 s");
        let mut pfd = libc::pollfd {
            fd: queue.completion_fd().unwrap(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, 100) };
        queue.reap(&mut done);
        queue.published();
    }
    done
}

#[test]
fn a_queue_dropped_with_requests_in_flight_loses_nothing() {
    for e in engines() {
        let mut blk = Blk::new(&e, true);
        if let Some(fault) = &e.fault {
            // Some held, some delayed: dropping must complete them all.
            fault.inject(OpMatch::at(OpKind::Write, 0), Fault::Hold, Some(1));
            fault.inject(
                OpMatch::at(OpKind::Write, 8192),
                Fault::Delay(Duration::from_millis(50)),
                Some(1),
            );
        }
        for slot in 0..8u64 {
            let addr = DATA + slot * 0x10000;
            blk.mem
                .write_slice(&[slot as u8 + 1; 4096], GuestAddress(addr))
                .unwrap();
            blk.start(slot, VIRTIO_BLK_T_OUT, slot * 8, Some(readable(addr, 4096)));
        }
        assert!(blk.queue.in_flight() > 0, "{}", e.name);
        drop(blk);
        let mut blk = Blk::new(&e, true);
        for slot in 0..8u64 {
            let (st, back) = blk.read(slot * 8, DATA, 4096);
            assert_eq!(st, status::OK, "{}", e.name);
            assert!(
                back.iter().all(|&b| b == slot as u8 + 1),
                "{}: write {slot} lost",
                e.name
            );
        }
        if let Some(fault) = &e.fault {
            assert_eq!(fault.held(), 0, "{}", e.name);
        }
    }
}

/// A virtio-scsi request queue with LUN 0 on an engine.
struct Scsi {
    mem: Arc<Memory>,
    queue: RequestQueue,
}

fn read10(lba: u32, blocks: u16) -> Vec<u8> {
    let mut cdb = vec![0x28, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    cdb[2..6].copy_from_slice(&lba.to_be_bytes());
    cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
    cdb
}

fn write10(lba: u32, blocks: u16) -> Vec<u8> {
    let mut cdb = read10(lba, blocks);
    cdb[0] = 0x2a;
    cdb
}

impl Scsi {
    fn new(engine: &Engine) -> Self {
        let info = engine.disk.info();
        let lun = ScsiLun {
            id: 0,
            emulation: Lun::new(LunSettings {
                block_size: 512,
                blocks: info.size / 512,
                readonly: false,
                serial: "conformance".into(),
                wwn: 0x3000_0000_0000_0001,
                rotational: false,
                write_cache: true,
                discard: true,
                unmapped_reads_zero: info.discard_zeroes,
            }),
            disk: info,
        };
        let device = Arc::new(ScsiDevice::new(vec![lun], 1, 16).unwrap());
        let disk = Arc::clone(&engine.disk);
        let queue = RequestQueue::new(device, |_, n| disk.open_queue(16, Some(n))).unwrap();
        Scsi {
            mem: Arc::new(Memory::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()),
            queue,
        }
    }

    /// Runs `cdb` with `len` data bytes (data-out for WRITE, data-in otherwise); the sense
    /// of a CHECK CONDITION, `None` for GOOD.
    fn check(&mut self, cdb: &[u8], len: u32) -> Option<Sense> {
        let mut req = [0u8; 51];
        req[..8].copy_from_slice(&encode_lun(0));
        req[19..19 + cdb.len()].copy_from_slice(cdb);
        self.mem.write_slice(&req, GuestAddress(HEADER)).unwrap();
        let data = if cdb[0] == 0x2a {
            vec![
                readable(HEADER, 51),
                readable(DATA, len),
                writable(RESP, 108),
            ]
        } else {
            vec![
                readable(HEADER, 51),
                writable(RESP, 108),
                writable(DATA, len),
            ]
        };
        let vq = MockSplitQueue::new(&*self.mem, 16);
        let chain = vq.build_desc_chain(&data).unwrap();
        let mut done = Vec::new();
        let ram = GuestRam::new(Arc::clone(&self.mem));
        self.queue.handle_chain(chain, &ram, &mut done);
        self.queue.submit().unwrap();
        self.queue.drain(&mut done).unwrap();
        self.queue.published();
        assert_eq!(done.len(), 1);
        let mut resp = [0u8; RESP_SIZE];
        self.mem.read_slice(&mut resp, GuestAddress(RESP)).unwrap();
        assert_eq!(resp[11], 0, "virtio-scsi response OK");
        match resp[10] {
            0 => None,
            2 => Some(Sense {
                key: resp[12 + 2] & 0x0f,
                asc: resp[12 + 12],
                ascq: resp[12 + 13],
            }),
            other => panic!("status {other:#x}"),
        }
    }
}
