//! virtio-blk request handling over a real io_uring raw disk, with descriptor chains built in
//! guest memory by virtio-queue's `MockSplitQueue`: good requests, and every kind of
//! malformed one answered with the right status and no panic.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use targets::blk::{BlkDevice, BlkQueue, BlkSettings, Completed, Memory};
use targets::device::QueueHandler;
use targets::disk::{DiskInfo, RawDisk, RawDiskOptions};
use targets::guest::GuestRam;
use targets::stats::Op;
use virtio_bindings::bindings::virtio_blk::*;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use common::{readable, writable};

const HEADER: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x80_0000;
const DISK_SIZE: u64 = 1 << 20;
const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
const UNTOUCHED: u8 = 0xee;

struct Fixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
    mem: Arc<Memory>,
    device: Arc<BlkDevice>,
    queue: BlkQueue,
}

fn settings() -> BlkSettings {
    BlkSettings {
        logical_block_size: 512,
        readonly: false,
        serial: "serial-0123".into(),
        num_queues: 1,
        queue_size: 16,
        writeback: true,
        writeback_state: None,
    }
}

fn fixture_with(settings: BlkSettings, direct: bool) -> Fixture {
    fixture_on_disk(settings, direct, |_| {})
}

/// As [`fixture_with`], with the opened disk's properties adjusted by `adjust`.
fn fixture_on_disk(settings: BlkSettings, direct: bool, adjust: fn(&mut DiskInfo)) -> Fixture {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("disk.raw");
    if settings.readonly {
        std::fs::write(&path, vec![0x5a; DISK_SIZE as usize]).unwrap();
    }
    let disk = RawDisk::open(&RawDiskOptions {
        path: path.clone(),
        readonly: settings.readonly,
        direct,
        create_size: Some(DISK_SIZE),
    })
    .unwrap();
    let mut info = disk.info();
    adjust(&mut info);
    let device = Arc::new(BlkDevice::new(settings, info).unwrap());
    let queue = BlkQueue::new(Arc::clone(&device), Box::new(disk.new_queue(16).unwrap()));
    let mem = Arc::new(Memory::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap());
    Fixture {
        _dir: dir,
        path,
        mem,
        device,
        queue,
    }
}

fn fixture() -> Fixture {
    fixture_with(settings(), true)
}

impl Fixture {
    fn header(&self, request_type: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&request_type.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(HEADER)).unwrap();
    }

    /// Runs one chain to completion; returns the completion and the status byte.
    fn run(&mut self, descs: &[RawDescriptor]) -> (Completed, u8) {
        self.mem.write_obj(UNTOUCHED, GuestAddress(STATUS)).unwrap();
        let vq = MockSplitQueue::new(&*self.mem, 16);
        let chain = vq.build_desc_chain(descs).unwrap();
        let mut done = Vec::new();
        self.queue
            .handle_chain(chain, &GuestRam::new(Arc::clone(&self.mem)), &mut done);
        self.queue.submit().unwrap();
        self.queue.drain(&mut done).unwrap();
        assert_eq!(done.len(), 1, "{done:?}");
        let status: u8 = self.mem.read_obj(GuestAddress(STATUS)).unwrap();
        (done[0], status)
    }

    fn rw(&mut self, request_type: u32, sector: u64, len: u32) -> (Completed, u8) {
        self.header(request_type, sector);
        let data = if request_type == VIRTIO_BLK_T_IN {
            writable(DATA, len)
        } else {
            readable(DATA, len)
        };
        self.run(&[readable(HEADER, 16), data, writable(STATUS, 1)])
    }

    fn file_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        std::fs::File::open(&self.path)
            .unwrap()
            .read_exact_at(&mut buf, offset)
            .unwrap();
        buf
    }

    fn discard_segment(&mut self, request_type: u32, sector: u64, sectors: u32, flags: u32) -> u8 {
        segments(self, request_type, &[segment(sector, sectors, flags)], 16)
    }
}

#[test]
fn write_then_read_round_trips_through_the_file() {
    let mut f = fixture();
    let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
    f.mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
    let (done, status) = f.rw(VIRTIO_BLK_T_OUT, 8, 8192);
    assert_eq!((status, done.used_len), (OK, 1));
    assert_eq!(f.file_bytes(4096, 8192), pattern);

    f.mem.write_slice(&[0u8; 8192], GuestAddress(DATA)).unwrap();
    let (done, status) = f.rw(VIRTIO_BLK_T_IN, 8, 8192);
    assert_eq!((status, done.used_len), (OK, 8193));
    let mut back = vec![0u8; 8192];
    f.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, pattern);
    let stats = f.queue.stats();
    assert_eq!(stats.bytes(Op::Write), 8192);
    assert_eq!(stats.requests(Op::Read), 1);
}

#[test]
fn header_split_over_two_descriptors_is_accepted() {
    let mut f = fixture();
    f.header(VIRTIO_BLK_T_IN, 0);
    let (done, status) = f.run(&[
        readable(HEADER, 5),
        readable(HEADER + 5, 11),
        writable(DATA, 512),
        writable(STATUS, 1),
    ]);
    assert_eq!((status, done.used_len), (OK, 513));
}

#[test]
fn unaligned_guest_buffers_bounce_under_o_direct() {
    let mut f = fixture();
    let pattern: Vec<u8> = (0..1024u32).map(|i| (i % 253) as u8).collect();
    f.mem.write_slice(&pattern, GuestAddress(DATA + 3)).unwrap();
    f.header(VIRTIO_BLK_T_OUT, 2);
    let (_, status) = f.run(&[
        readable(HEADER, 16),
        readable(DATA + 3, 100),
        readable(DATA + 103, 924),
        writable(STATUS, 1),
    ]);
    assert_eq!(status, OK);
    assert_eq!(f.file_bytes(1024, 1024), pattern);

    f.header(VIRTIO_BLK_T_IN, 2);
    let (done, status) = f.run(&[
        readable(HEADER, 16),
        writable(DATA + 0x1001, 1024),
        writable(STATUS, 1),
    ]);
    assert_eq!((status, done.used_len), (OK, 1025));
    let mut back = vec![0u8; 1024];
    f.mem
        .read_slice(&mut back, GuestAddress(DATA + 0x1001))
        .unwrap();
    assert_eq!(back, pattern);
}

#[test]
fn out_of_range_and_overflowing_sectors_are_ioerr() {
    let mut f = fixture();
    let last_sector = DISK_SIZE / 512 - 1;
    assert_eq!(f.rw(VIRTIO_BLK_T_IN, last_sector, 512).1, OK);
    assert_eq!(f.rw(VIRTIO_BLK_T_IN, last_sector, 1024).1, IOERR);
    assert_eq!(f.rw(VIRTIO_BLK_T_OUT, last_sector + 1, 512).1, IOERR);
    assert_eq!(f.rw(VIRTIO_BLK_T_IN, u64::MAX / 256, 512).1, IOERR);
    assert_eq!(f.rw(VIRTIO_BLK_T_IN, u64::MAX, 512).1, IOERR);
    assert_eq!(
        f.discard_segment(VIRTIO_BLK_T_DISCARD, last_sector, 2, 0),
        IOERR
    );
}

#[test]
fn unaligned_sectors_and_lengths_are_ioerr_with_4k_blocks() {
    let mut f = fixture_with(
        BlkSettings {
            logical_block_size: 4096,
            ..settings()
        },
        true,
    );
    assert_eq!(f.rw(VIRTIO_BLK_T_IN, 8, 4096).1, OK);
    assert_eq!(
        f.rw(VIRTIO_BLK_T_IN, 1, 4096).1,
        IOERR,
        "sector not 4K aligned"
    );
    assert_eq!(
        f.rw(VIRTIO_BLK_T_OUT, 8, 512).1,
        IOERR,
        "length not a block multiple"
    );
    assert_eq!(f.rw(VIRTIO_BLK_T_IN, 8, 100).1, IOERR);
}

#[test]
fn missing_or_empty_status_buffer_returns_chain_unused() {
    let mut f = fixture();
    f.header(VIRTIO_BLK_T_IN, 0);
    let (done, status) = f.run(&[readable(HEADER, 16), readable(DATA, 512)]);
    assert_eq!((done.used_len, status), (0, UNTOUCHED));
    let (done, status) = f.run(&[readable(HEADER, 16), writable(STATUS, 0)]);
    assert_eq!((done.used_len, status), (0, UNTOUCHED));
    // A status pointer outside guest memory.
    let (done, _) = f.run(&[readable(HEADER, 16), writable(0x1000_0000_0000, 1)]);
    assert_eq!(done.used_len, 0);
    assert_eq!(
        f.queue
            .stats()
            .malformed
            .load(std::sync::atomic::Ordering::Relaxed),
        3
    );
}

#[test]
fn wrong_directions_are_ioerr() {
    let mut f = fixture();
    // Read whose data buffer is device-readable.
    f.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        f.run(&[
            readable(HEADER, 16),
            readable(DATA, 512),
            writable(STATUS, 1)
        ])
        .1,
        IOERR
    );
    // Write whose data buffer is device-writable.
    f.header(VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        f.run(&[
            readable(HEADER, 16),
            writable(DATA, 512),
            writable(STATUS, 1)
        ])
        .1,
        IOERR
    );
    // A readable descriptor after a writable one.
    f.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        f.run(&[
            readable(HEADER, 16),
            writable(DATA, 512),
            readable(DATA + 512, 16),
            writable(STATUS, 1)
        ])
        .1,
        IOERR
    );
    // A header that is writable only.
    assert_eq!(f.run(&[writable(HEADER, 16), writable(STATUS, 1)]).1, IOERR);
}

#[test]
fn short_header_is_ioerr() {
    let mut f = fixture();
    f.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(f.run(&[readable(HEADER, 8), writable(STATUS, 1)]).1, IOERR);
    // Header pointing outside guest memory.
    assert_eq!(
        f.run(&[readable(0x1000_0000_0000, 16), writable(STATUS, 1)])
            .1,
        IOERR
    );
}

#[test]
fn oversized_requests_are_ioerr() {
    let mut f = fixture_with(
        BlkSettings {
            queue_size: 4,
            ..settings()
        },
        true,
    );
    // queue_size 4: seg_max 2, so at most 2 * SIZE_MAX bytes and 4 descriptors.
    let limit = f.device.max_request_bytes() as u32;
    assert_eq!(limit, 2 * targets::blk::SIZE_MAX);
    assert_eq!(f.rw(VIRTIO_BLK_T_IN, 0, limit).1, OK);
    assert_eq!(f.rw(VIRTIO_BLK_T_IN, 0, limit + 512).1, IOERR);
    f.header(VIRTIO_BLK_T_IN, 0);
    let many: Vec<RawDescriptor> = std::iter::once(readable(HEADER, 16))
        .chain((0..4).map(|i| writable(DATA + i * 512, 512)))
        .chain(std::iter::once(writable(STATUS, 1)))
        .collect();
    assert_eq!(f.run(&many).1, IOERR);
}

#[test]
fn readonly_export_refuses_writes_and_keeps_the_file() {
    let mut f = fixture_with(
        BlkSettings {
            readonly: true,
            ..settings()
        },
        false,
    );
    assert_eq!(
        f.device.features() & (1 << VIRTIO_BLK_F_RO),
        1 << VIRTIO_BLK_F_RO
    );
    assert_eq!(f.device.features() & (1 << VIRTIO_BLK_F_DISCARD), 0);
    f.mem.write_slice(&[1u8; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(f.rw(VIRTIO_BLK_T_OUT, 0, 512).1, IOERR);
    assert_eq!(f.discard_segment(VIRTIO_BLK_T_DISCARD, 0, 8, 0), IOERR);
    assert_eq!(f.discard_segment(VIRTIO_BLK_T_WRITE_ZEROES, 0, 8, 0), IOERR);
    assert_eq!(f.rw(VIRTIO_BLK_T_IN, 0, 512).1, OK);
    assert!(f.file_bytes(0, 4096).iter().all(|&b| b == 0x5a));
}

#[test]
fn discard_and_write_zeroes_zero_the_range() {
    let mut f = fixture();
    f.mem
        .write_slice(&[0x77u8; 16384], GuestAddress(DATA))
        .unwrap();
    assert_eq!(f.rw(VIRTIO_BLK_T_OUT, 0, 16384).1, OK);
    assert_eq!(f.discard_segment(VIRTIO_BLK_T_WRITE_ZEROES, 0, 8, 0), OK);
    assert_eq!(
        f.discard_segment(
            VIRTIO_BLK_T_WRITE_ZEROES,
            8,
            8,
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        ),
        OK
    );
    assert_eq!(f.discard_segment(VIRTIO_BLK_T_DISCARD, 16, 8, 0), OK);
    assert!(f.file_bytes(0, 12288).iter().all(|&b| b == 0));
    assert!(f.file_bytes(12288, 4096).iter().all(|&b| b == 0x77));
}

#[test]
fn write_zeroes_is_not_offered_where_ranges_cannot_be_zeroed() {
    let mut f = fixture_with(settings(), true);
    assert!(f.device.features() & (1 << VIRTIO_BLK_F_WRITE_ZEROES) != 0);
    let mut f_without = fixture_on_disk(settings(), true, |info| {
        info.deallocate_zeroes = false;
    });
    let features = f_without.device.features();
    assert_eq!(features & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
    assert!(
        features & (1 << VIRTIO_BLK_F_DISCARD) != 0,
        "discard stays a hint"
    );
    f_without
        .mem
        .write_slice(&[0x77u8; 4096], GuestAddress(DATA))
        .unwrap();
    assert_eq!(f_without.rw(VIRTIO_BLK_T_OUT, 0, 4096).1, OK);
    assert_eq!(
        f_without.discard_segment(VIRTIO_BLK_T_WRITE_ZEROES, 0, 8, 0),
        UNSUPP
    );
    assert!(f_without.file_bytes(0, 4096).iter().all(|&b| b == 0x77));
    assert_eq!(f.discard_segment(VIRTIO_BLK_T_WRITE_ZEROES, 0, 8, 0), OK);
}

/// A discard or write-zeroes request whose payload is `payload` (segments as given).
fn segments(f: &mut Fixture, request_type: u32, payload: &[[u8; 16]], len: u32) -> u8 {
    f.header(request_type, 0);
    let bytes: Vec<u8> = payload.iter().flatten().copied().collect();
    f.mem.write_slice(&bytes, GuestAddress(DATA)).unwrap();
    f.run(&[
        readable(HEADER, 16),
        readable(DATA, len),
        writable(STATUS, 1),
    ])
    .1
}

fn segment(sector: u64, sectors: u32, flags: u32) -> [u8; 16] {
    let mut seg = [0u8; 16];
    seg[..8].copy_from_slice(&sector.to_le_bytes());
    seg[8..12].copy_from_slice(&sectors.to_le_bytes());
    seg[12..].copy_from_slice(&flags.to_le_bytes());
    seg
}

/// Every way a request is refused, the status it gets (the virtio spec's, or QEMU's
/// virtio-blk handler's where the spec is silent) and the reason counted for it.
#[test]
fn every_refused_request_gets_the_status_qemu_gives() {
    use targets::blk::Refusal;
    type Case = (Refusal, u8, fn(&mut Fixture) -> u8);
    let one = segment(0, 8, 0);
    let cases: [Case; 18] = [
        (Refusal::MalformedChain, IOERR, |f| {
            f.header(VIRTIO_BLK_T_IN, 0);
            let misordered = [
                readable(HEADER, 16),
                writable(DATA, 512),
                readable(DATA + 4096, 512),
                writable(STATUS, 1),
            ];
            f.run(&misordered).1
        }),
        (Refusal::ShortHeader, IOERR, |f| {
            f.run(&[readable(HEADER, 8), writable(STATUS, 1)]).1
        }),
        (Refusal::WrongDirection, IOERR, |f| {
            f.header(VIRTIO_BLK_T_IN, 0);
            f.run(&[
                readable(HEADER, 16),
                readable(DATA, 512),
                writable(STATUS, 1),
            ])
            .1
        }),
        (Refusal::OutOfRange, IOERR, |f| {
            f.rw(VIRTIO_BLK_T_IN, DISK_SIZE / 512, 512).1
        }),
        (Refusal::OutOfRange, IOERR, |f| {
            segments(
                f,
                VIRTIO_BLK_T_DISCARD,
                &[segment(DISK_SIZE / 512, 1, 0)],
                16,
            )
        }),
        (Refusal::TooLarge, IOERR, |f| {
            let limit = f.device.max_request_bytes() as u32;
            f.rw(VIRTIO_BLK_T_IN, 0, limit + 512).1
        }),
        (Refusal::UnknownType, UNSUPP, |f| {
            f.header(0xdead, 0);
            f.run(&[readable(HEADER, 16), writable(STATUS, 1)]).1
        }),
        (Refusal::UnknownType, UNSUPP, |f| {
            f.header(VIRTIO_BLK_T_SCSI_CMD, 0);
            f.run(&[readable(HEADER, 16), writable(STATUS, 1)]).1
        }),
        // max_discard_seg = max_write_zeroes_seg = 1: two segments, or one and a half.
        (Refusal::TooManySegments, UNSUPP, |f| {
            let two = [segment(0, 8, 0), segment(8, 8, 0)];
            segments(f, VIRTIO_BLK_T_DISCARD, &two, 32)
        }),
        (Refusal::TooManySegments, UNSUPP, |f| {
            let two = [segment(0, 8, 0), segment(8, 8, 0)];
            segments(f, VIRTIO_BLK_T_WRITE_ZEROES, &two, 32)
        }),
        (Refusal::TooManySegments, UNSUPP, |f| {
            let two = [segment(0, 8, 0), segment(8, 8, 0)];
            segments(f, VIRTIO_BLK_T_DISCARD, &two, 24)
        }),
        (Refusal::ShortSegment, IOERR, |f| {
            segments(f, VIRTIO_BLK_T_DISCARD, &[segment(0, 8, 0)], 10)
        }),
        (Refusal::UnknownFlags, UNSUPP, |f| {
            let unmap = segment(0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
            segments(f, VIRTIO_BLK_T_DISCARD, &[unmap], 16)
        }),
        (Refusal::UnknownFlags, UNSUPP, |f| {
            segments(f, VIRTIO_BLK_T_WRITE_ZEROES, &[segment(0, 8, 0x10)], 16)
        }),
        (Refusal::TooManySectors, IOERR, |f| {
            let huge = segment(0, targets::blk::MAX_DISCARD_SECTORS + 1, 0);
            segments(f, VIRTIO_BLK_T_WRITE_ZEROES, &[huge], 16)
        }),
        (Refusal::BadMemory, IOERR, |f| {
            f.header(VIRTIO_BLK_T_IN, 0);
            f.run(&[
                readable(HEADER, 16),
                writable(0x0ff0_0000, 4096),
                writable(STATUS, 1),
            ])
            .1
        }),
        (Refusal::NotOffered, UNSUPP, |_| {
            let mut f = fixture_on_disk(settings(), true, |info| info.deallocate_zeroes = false);
            let status = segments(&mut f, VIRTIO_BLK_T_WRITE_ZEROES, &[segment(0, 8, 0)], 16);
            assert_eq!(refused(&f, Refusal::NotOffered), 1);
            status
        }),
        (Refusal::ReadOnly, IOERR, |_| {
            let mut f = fixture_with(
                BlkSettings {
                    readonly: true,
                    ..settings()
                },
                true,
            );
            let statuses = [
                f.rw(VIRTIO_BLK_T_OUT, 0, 512).1,
                segments(&mut f, VIRTIO_BLK_T_DISCARD, &[segment(0, 8, 0)], 16),
                segments(&mut f, VIRTIO_BLK_T_WRITE_ZEROES, &[segment(0, 8, 0)], 16),
            ];
            assert_eq!(statuses, [IOERR; 3]);
            assert_eq!(refused(&f, Refusal::ReadOnly), 3);
            IOERR
        }),
    ];
    for (reason, status, request) in cases {
        assert_eq!(reason.status(), status, "{reason:?}: the table");
        let mut f = fixture();
        let got = request(&mut f);
        assert_eq!(got, status, "{reason:?}: status");
        if !matches!(reason, Refusal::NotOffered | Refusal::ReadOnly) {
            assert_eq!(refused(&f, reason), 1, "{reason:?}: counted reason");
        }
    }
    // A well-formed single segment still works.
    let mut f = fixture();
    assert_eq!(segments(&mut f, VIRTIO_BLK_T_DISCARD, &[one], 16), OK);
}

fn refused(f: &Fixture, reason: targets::blk::Refusal) -> u64 {
    f.queue.stats().refused[reason as usize].load(std::sync::atomic::Ordering::Relaxed)
}

#[test]
fn get_id_flush_and_unknown_types() {
    let mut f = fixture();
    f.header(VIRTIO_BLK_T_GET_ID, 0);
    let (done, status) = f.run(&[
        readable(HEADER, 16),
        writable(DATA, 20),
        writable(STATUS, 1),
    ]);
    assert_eq!((status, done.used_len), (OK, 21));
    let mut id = [0u8; 20];
    f.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..11], b"serial-0123");
    assert!(id[11..].iter().all(|&b| b == 0));

    f.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(f.run(&[readable(HEADER, 16), writable(STATUS, 1)]).1, OK);
    f.header(VIRTIO_BLK_T_SCSI_CMD, 0);
    assert_eq!(
        f.run(&[readable(HEADER, 16), writable(STATUS, 1)]).1,
        UNSUPP
    );
    f.header(0xdead, 0);
    assert_eq!(
        f.run(&[readable(HEADER, 16), writable(STATUS, 1)]).1,
        UNSUPP
    );
}

#[test]
fn config_space_and_write_cache_toggle() {
    let f = fixture();
    let d = &f.device;
    let c = d.config_space();
    assert_eq!(
        u64::from_le_bytes(c[0..8].try_into().unwrap()),
        DISK_SIZE / 512
    );
    assert_eq!(
        u32::from_le_bytes(c[12..16].try_into().unwrap()),
        14,
        "seg_max"
    );
    assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512);
    for off in [36, 40, 44, 48, 52] {
        assert_ne!(
            u32::from_le_bytes(c[off..off + 4].try_into().unwrap()),
            0,
            "limit at {off} is 0"
        );
    }
    assert_eq!(c[32], 1, "writeback");
    d.set_acked_features(d.features());
    assert!(d.writeback_enabled());
    d.write_config(32, &[0]).unwrap();
    assert_eq!(d.config_space()[32], 0);
    assert!(!d.writeback_enabled());
    assert!(d.write_config(32, &[7]).is_err());
    assert!(d.write_config(0, &[0; 8]).is_err());
    // Without CONFIG_WCE and FLUSH the device must be writethrough.
    d.set_acked_features(0);
    d.write_config(32, &[1]).unwrap();
    assert!(!d.writeback_enabled());
}

#[test]
fn a_driver_that_cannot_flush_never_gets_a_volatile_cache() {
    let f = fixture();
    let d = &f.device;
    // virtio 1.2 5.2.5.1: CONFIG_WCE without FLUSH means writeback 0.
    d.set_acked_features(1 << VIRTIO_BLK_F_CONFIG_WCE);
    assert!(!d.writeback_enabled());
    d.set_acked_features(1 << VIRTIO_BLK_F_FLUSH);
    assert!(d.writeback_enabled(), "FLUSH without CONFIG_WCE: writeback");
}

#[test]
fn the_drivers_write_cache_choice_survives_a_restart_of_the_device() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let state = dir.path().join("vol.writeback");
    let with_state = |writeback: bool| BlkSettings {
        writeback,
        writeback_state: Some(state.clone()),
        ..settings()
    };
    let all = (1 << VIRTIO_BLK_F_CONFIG_WCE) | (1 << VIRTIO_BLK_F_FLUSH);
    let f = fixture_with(with_state(true), true);
    f.device.set_acked_features(all);
    assert!(f.device.writeback_enabled());
    f.device.write_config(32, &[0]).unwrap();
    drop(f);
    // A new device (a restarted daemon) comes back in writethrough, and says so.
    let f = fixture_with(with_state(true), true);
    f.device.set_acked_features(all);
    assert!(!f.device.writeback_enabled());
    assert_eq!(f.device.config_space()[32], 0);
    drop(f);
    // The operator changed the configured default since: that wins.
    let f = fixture_with(with_state(false), true);
    f.device.set_acked_features(all);
    assert!(!f.device.writeback_enabled());
    f.device.write_config(32, &[1]).unwrap();
    drop(f);
    let f = fixture_with(with_state(false), true);
    f.device.set_acked_features(all);
    assert!(
        f.device.writeback_enabled(),
        "the choice under this default"
    );
    // A choice that cannot be saved is refused, not applied.
    let f = fixture_with(
        BlkSettings {
            writeback_state: Some(dir.path().join("missing/dir/vol.writeback")),
            ..settings()
        },
        true,
    );
    f.device.set_acked_features(all);
    assert!(f.device.write_config(32, &[0]).is_err());
    assert!(f.device.writeback_enabled());
}

#[test]
fn a_grown_capacity_is_in_the_config_space_and_serves_the_new_range() {
    let mut f = fixture();
    let sectors =
        |f: &Fixture| u64::from_le_bytes(f.device.config_space()[..8].try_into().unwrap());
    assert_eq!(sectors(&f), DISK_SIZE / 512);
    let end = DISK_SIZE / 512;
    assert_eq!(f.rw(VIRTIO_BLK_T_OUT, end, 4096).1, IOERR, "past the end");

    std::fs::OpenOptions::new()
        .write(true)
        .open(&f.path)
        .unwrap()
        .set_len(2 * DISK_SIZE)
        .unwrap();
    // Rounded down to the logical block size.
    assert_eq!(f.device.grow_capacity(2 * DISK_SIZE + 100), DISK_SIZE);
    assert_eq!(f.device.capacity_bytes(), 2 * DISK_SIZE);
    assert_eq!(sectors(&f), 2 * DISK_SIZE / 512);
    f.mem
        .write_slice(&[0x3c; 4096], GuestAddress(DATA))
        .unwrap();
    assert_eq!(f.rw(VIRTIO_BLK_T_OUT, end, 4096).1, OK, "the new range");
    assert_eq!(f.file_bytes(DISK_SIZE, 4096), vec![0x3c; 4096]);
    assert_eq!(f.rw(VIRTIO_BLK_T_IN, 2 * end - 8, 4096).1, OK);
    assert_eq!(f.rw(VIRTIO_BLK_T_IN, 2 * end - 7, 4096).1, IOERR);

    // Never shrinks.
    assert_eq!(f.device.grow_capacity(DISK_SIZE), 2 * DISK_SIZE);
    assert_eq!(f.device.capacity_bytes(), 2 * DISK_SIZE);
}
