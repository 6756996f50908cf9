//! `blk_request`: virtio-blk requests (virtio 1.2 §5.2.6) as a hostile driver writes them,
//! through the daemon's [`BlkQueue`] onto real disks on io_uring: raw files (buffered and
//! O_DIRECT, writable and read-only) and a qcow2 image, all 1 MiB on tmpfs.
//!
//! Input: fixture (u8: which disk and settings), flags (u8: bit 0 memory the kernel cannot
//! pin, as in appliance-VM mode; bit 1 reap after every chain; bits 2-3 which features the
//! driver acked), then one [`RingInput`].

use std::sync::{Arc, Mutex, OnceLock};

use targets::blk::{BlkDevice, BlkQueue, BlkSettings};
use targets::disk::Format;
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_INDIRECT;

use crate::input::{Input, Output};
use crate::ring::{chain, desc, harness_failure, Guest, RingInput, DATA_BASE};
use crate::scratch;

/// Size of every fixture's disk.
const DISK_SIZE: u64 = 1 << 20;
/// Guest memory: 256 KiB at 0 (rings, then buffers), and 64 KiB past a hole.
pub const GUEST: [(u64, usize); 2] = [(0, 0x4_0000), (0x8_0000, 0x1_0000)];

/// One export: its device and the handler of its one queue.
struct Fixture {
    device: Arc<BlkDevice>,
    queue: BlkQueue,
}

struct State {
    guest: Guest,
    fixtures: Vec<Fixture>,
}

/// `(format, O_DIRECT, read-only, logical block size, ring size)` of each fixture. O_DIRECT
/// on tmpfs needs 4 KiB alignment (no STATX_DIOALIGN: the engine assumes 4 KiB).
const FIXTURES: [(Format, bool, bool, u32, u16); 4] = [
    (Format::Raw, false, false, 512, 16),
    (Format::Raw, true, false, 4096, 256),
    (Format::Raw, true, true, 4096, 256),
    (Format::Qcow2, false, false, 512, 256),
];

fn fixture(index: usize) -> Fixture {
    let (format, direct, readonly, lbs, queue_size) = FIXTURES[index];
    let disk = scratch::disk(
        &format!("blk{index}.img"),
        format,
        direct,
        readonly,
        DISK_SIZE,
        251,
    );
    let settings = BlkSettings {
        logical_block_size: lbs,
        readonly,
        // Longer than GET_ID's 20 bytes.
        serial: "fuzz-serial-0123456789abcdef".into(),
        num_queues: 1,
        queue_size,
        writeback: true,
        writeback_state: None,
    };
    let device = Arc::new(
        BlkDevice::new(settings, disk.info()).unwrap_or_else(|e| harness_failure("device", e)),
    );
    let ring = disk
        .open_queue(u32::from(queue_size), None)
        .unwrap_or_else(|e| harness_failure("disk queue", e));
    Fixture {
        queue: BlkQueue::new(Arc::clone(&device), ring),
        device,
    }
}

fn state() -> &'static Mutex<State> {
    static STATE: OnceLock<Mutex<State>> = OnceLock::new();
    STATE.get_or_init(|| {
        Mutex::new(State {
            guest: Guest::new(&GUEST),
            fixtures: (0..FIXTURES.len()).map(fixture).collect(),
        })
    })
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let which = usize::from(input.u8()) % FIXTURES.len();
    let flags = input.u8();
    let ring = RingInput::read(&mut input);
    let mut state = state().lock().unwrap_or_else(|p| p.into_inner());
    let State { guest, fixtures } = &mut *state;
    guest.reset();
    let f = &mut fixtures[which];
    let offered = f.device.features();
    let acked = match (flags >> 2) & 3 {
        0 => offered,
        1 => offered & !(1 << VIRTIO_BLK_F_FLUSH),
        2 => offered & !(1 << VIRTIO_BLK_F_CONFIG_WCE),
        _ => 0,
    };
    f.device.set_acked_features(acked);
    let ram = guest.ram(flags & 1 == 0);
    ring.run(guest, &ram, &mut f.queue, flags & 2 != 0);
}

/// A request header: type, reserved, sector.
fn header(request_type: u32, sector: u64) -> Vec<u8> {
    let mut h = request_type.to_le_bytes().to_vec();
    h.extend_from_slice(&[0; 4]);
    h.extend_from_slice(&sector.to_le_bytes());
    h
}

/// A discard / write-zeroes segment.
fn segment(sector: u64, sectors: u32, flags: u32) -> Vec<u8> {
    let mut s = sector.to_le_bytes().to_vec();
    s.extend_from_slice(&sectors.to_le_bytes());
    s.extend_from_slice(&flags.to_le_bytes());
    s
}

const HDR: u64 = DATA_BASE;
const DATA: u64 = DATA_BASE + 0x1000;
const STATUS: u64 = DATA_BASE + 0x800;
const INDIRECT: u64 = 0x8_0000;

fn seed(fixture: u8, flags: u8, ring: &RingInput) -> Vec<u8> {
    let mut out = Output::new();
    out.u8(fixture).u8(flags);
    ring.write(&mut out);
    out.finish()
}

/// One request framed header / data / status on a ring of 16.
fn request(hdr: Vec<u8>, data: Option<(u32, bool, Vec<u8>)>) -> RingInput {
    let mut bufs = vec![(HDR, 16, false)];
    let mut writes = vec![(HDR, hdr)];
    if let Some((len, write, bytes)) = data {
        bufs.push((DATA, len, write));
        writes.push((DATA, bytes));
    }
    bufs.push((STATUS, 1, true));
    RingInput {
        size: 16,
        avail_idx: 1,
        heads: vec![0],
        descriptors: chain(0, &bufs),
        writes,
    }
}

/// The seed corpus: one well-formed request of each type per fixture, an indirect chain
/// and several chains on one ring.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut seeds = Vec::new();
    for fixture in 0..FIXTURES.len() as u8 {
        let lbs = FIXTURES[usize::from(fixture)].3;
        let sector = u64::from(lbs / 512) * 8;
        let requests = [
            (
                "in",
                request(header(VIRTIO_BLK_T_IN, sector), Some((lbs, true, vec![]))),
            ),
            (
                "out",
                request(
                    header(VIRTIO_BLK_T_OUT, sector),
                    Some((lbs, false, pattern[..lbs as usize].to_vec())),
                ),
            ),
            ("flush", request(header(VIRTIO_BLK_T_FLUSH, 0), None)),
            (
                "get-id",
                request(header(VIRTIO_BLK_T_GET_ID, 0), Some((20, true, vec![]))),
            ),
            (
                "discard",
                request(
                    header(VIRTIO_BLK_T_DISCARD, 0),
                    Some((16, false, segment(sector, lbs / 512 * 2, 0))),
                ),
            ),
            (
                "write-zeroes",
                request(
                    header(VIRTIO_BLK_T_WRITE_ZEROES, 0),
                    Some((16, false, segment(sector, lbs / 512 * 2, 1))),
                ),
            ),
        ];
        for (name, ring) in requests {
            seeds.push((format!("f{fixture}-{name}"), seed(fixture, 0, &ring)));
        }
    }
    // An indirect table of header / data / status, the table in the second region.
    let table: Vec<u8> = chain(
        0,
        &[(HDR, 16, false), (DATA, 1024, true), (STATUS, 1, true)],
    )
    .concat();
    let indirect = RingInput {
        size: 16,
        avail_idx: 1,
        heads: vec![0],
        descriptors: vec![desc(INDIRECT, 48, VRING_DESC_F_INDIRECT as u16, 0)],
        writes: vec![(HDR, header(VIRTIO_BLK_T_IN, 0)), (INDIRECT, table)],
    };
    seeds.push(("f0-indirect".into(), seed(0, 2, &indirect)));
    // Three chains on a ring of 64: a write, a read of it and a flush, header split over
    // two descriptors in the read.
    let mut descriptors = chain(
        0,
        &[(HDR, 16, false), (DATA, 4096, false), (STATUS, 1, true)],
    );
    descriptors.extend(chain(
        3,
        &[
            (HDR + 16, 5, false),
            (HDR + 21, 11, false),
            (DATA + 0x1000, 4096, true),
            (STATUS + 1, 1, true),
        ],
    ));
    descriptors.extend(chain(7, &[(HDR + 32, 16, false), (STATUS + 2, 1, true)]));
    let mut hdrs = header(VIRTIO_BLK_T_OUT, 16);
    hdrs.extend(header(VIRTIO_BLK_T_IN, 16));
    hdrs.extend(header(VIRTIO_BLK_T_FLUSH, 0));
    let batch = RingInput {
        size: 64,
        avail_idx: 3,
        heads: vec![0, 3, 7],
        descriptors,
        writes: vec![(HDR, hdrs), (DATA, pattern.clone())],
    };
    for fixture in [0u8, 1, 3] {
        seeds.push((format!("f{fixture}-batch"), seed(fixture, 0, &batch)));
        seeds.push((format!("f{fixture}-batch-bar"), seed(fixture, 3, &batch)));
    }
    seeds
}
