//! virtio-blk: feature bits, config space, and per-queue request handling.
//!
//! [`BlkDevice`] holds what all queues of one export share (settings, the guest-visible write
//! cache mode, negotiated features). [`BlkQueue`] turns descriptor chains into [`DiskOp`]s on
//! its own [`DiskQueue`], keeps each request in an in-flight table until the disk completes
//! it, and reports finished requests as [`Completed`] `(head, used_len)` pairs for the
//! transport to put on the used ring. Requests it refuses are answered with the status
//! [`Refusal::status`] gives (the spec's, else QEMU's), never a panic; chains without a
//! writable status byte are returned with used length 0.
//!
//! The capacity can grow while queues run ([`BlkDevice::grow_capacity`], online resize):
//! it is one atomic that range checks and the config space read without a lock. Telling
//! the driver (a configuration change notification, virtio 1.2 §2.5.2 / §5.2.6) is the
//! transport's part.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use virtio_bindings::bindings::virtio_blk::*;
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

pub use crate::chain::Memory;
use crate::chain::{
    bounce_alignment, gather, host_iovecs, scatter, split_segments, total, Chain, Segment,
};
pub use crate::device::Completed;
use crate::device::{QueueHandler, VirtioDevice};
use crate::disk::{DiskCompletion, DiskInfo, DiskOp, DiskQueue};
use crate::inflight::InFlightTable;
use crate::iobuf::AlignedBuf;
use crate::stats::{bump, Failure, LunStats, Op, QueueStats};

/// virtio-blk sectors are always 512 bytes, whatever the logical block size.
pub const SECTOR_SIZE: u64 = 512;
/// Size of `struct virtio_blk_config` up to and including `write_zeroes_may_unmap`.
pub const CONFIG_SPACE_SIZE: usize = 60;
/// Offset of the `writeback` byte in the config space.
const CONFIG_WRITEBACK_OFFSET: usize = 32;
/// Largest single data segment advertised (SIZE_MAX).
pub const SIZE_MAX: u32 = 256 * 1024;
/// Cap on data descriptors per request (SEG_MAX).
pub const MAX_SEGMENTS: u32 = 254;
/// Sectors a single discard / write-zeroes segment may cover (1 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// Segments per discard / write-zeroes request.
pub const MAX_DISCARD_SEGMENTS: u32 = 1;
/// Size of `struct virtio_blk_discard_write_zeroes`.
const DISCARD_SEGMENT_SIZE: usize = 16;
/// Size of `struct virtio_blk_outhdr`.
const HEADER_SIZE: usize = 16;
/// Physical block size reported in the topology (4 KiB, as modern disks).
const PHYSICAL_BLOCK_SIZE: u32 = 4096;

/// Settings of one virtio-blk export.
#[derive(Debug, Clone)]
pub struct BlkSettings {
    /// 512 or 4096.
    pub logical_block_size: u32,
    /// Refuse writes (advertises VIRTIO_BLK_F_RO).
    pub readonly: bool,
    /// GET_ID answer (≤ 20 bytes).
    pub serial: String,
    /// Virtqueues offered.
    pub num_queues: u16,
    /// Maximum virtqueue size.
    pub queue_size: u16,
    /// Initial write cache mode: true = writeback.
    pub writeback: bool,
}

/// Why an export cannot be served with the given settings and disk.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// O_DIRECT needs larger alignment than the exported block size.
    #[error("the backing file needs {alignment}-byte aligned direct I/O but logical_block_size is {lbs}; set logical_block_size: {alignment} or direct: false")]
    DirectAlignment {
        /// Required alignment.
        alignment: usize,
        /// Exported logical block size.
        lbs: u32,
    },
    /// The disk is smaller than one logical block.
    #[error("the backing file is smaller than one logical block ({0} bytes)")]
    TooSmall(u32),
    /// A writable export on a read-only disk.
    #[error("the export is writable but the backing file was opened read-only")]
    ReadonlyDisk,
}

/// State shared by all queues of one virtio-blk export.
#[derive(Debug)]
pub struct BlkDevice {
    settings: BlkSettings,
    /// The disk as opened (its `size` is the size at open; the capacity may grow since).
    disk: DiskInfo,
    /// Exported size in bytes, a multiple of the logical block size; only ever grows.
    capacity_bytes: AtomicU64,
    writeback: AtomicBool,
    acked_features: AtomicU64,
}

impl BlkDevice {
    /// Checks the settings against the opened disk.
    pub fn new(settings: BlkSettings, disk: DiskInfo) -> Result<Self, SettingsError> {
        let lbs = u64::from(settings.logical_block_size);
        if let Some(direct) = disk.direct {
            if direct.offset as u64 > lbs {
                return Err(SettingsError::DirectAlignment {
                    alignment: direct.offset,
                    lbs: settings.logical_block_size,
                });
            }
        }
        if disk.readonly && !settings.readonly {
            return Err(SettingsError::ReadonlyDisk);
        }
        let capacity_bytes = disk.size / lbs * lbs;
        if capacity_bytes == 0 {
            return Err(SettingsError::TooSmall(settings.logical_block_size));
        }
        Ok(BlkDevice {
            writeback: AtomicBool::new(settings.writeback),
            settings,
            disk,
            capacity_bytes: AtomicU64::new(capacity_bytes),
            acked_features: AtomicU64::new(0),
        })
    }

    /// Settings as configured.
    pub fn settings(&self) -> &BlkSettings {
        &self.settings
    }

    /// Exported size in bytes: the backing size at open rounded down to the logical block
    /// size, or what [`BlkDevice::grow_capacity`] made it since.
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_bytes.load(Ordering::Acquire)
    }

    /// Grows the exported size to `bytes` rounded down to the logical block size, for a
    /// backing store that has grown to at least that (online resize). Requests are checked
    /// against the new size from now on; the config space's `capacity` (512-byte sectors)
    /// reports it. A size at or below the current one changes nothing: the capacity never
    /// shrinks under a driver. Returns the previous capacity in bytes.
    pub fn grow_capacity(&self, bytes: u64) -> u64 {
        let lbs = u64::from(self.settings.logical_block_size);
        self.capacity_bytes
            .fetch_max(bytes / lbs * lbs, Ordering::AcqRel)
    }

    /// Most data descriptors per request: the ring minus header and status, capped so one
    /// request stays at most `MAX_SEGMENTS * SIZE_MAX` bytes.
    pub fn seg_max(&self) -> u32 {
        u32::from(self.settings.queue_size)
            .saturating_sub(2)
            .clamp(1, MAX_SEGMENTS)
    }

    /// Largest data transfer per request.
    pub fn max_request_bytes(&self) -> u64 {
        u64::from(self.seg_max()) * u64::from(SIZE_MAX)
    }

    /// virtio feature bits offered (without the vhost-user PROTOCOL_FEATURES bit).
    pub fn features(&self) -> u64 {
        let mut bits = vec![
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_TOPOLOGY,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_CONFIG_WCE,
            VIRTIO_BLK_F_MQ,
        ];
        if self.settings.readonly {
            bits.push(VIRTIO_BLK_F_RO);
        } else {
            bits.push(VIRTIO_BLK_F_DISCARD);
            // Zeroing is done by fallocate; without it the driver writes zeroes itself.
            if self.disk.deallocate_zeroes {
                bits.push(VIRTIO_BLK_F_WRITE_ZEROES);
            }
        }
        bits.into_iter().fold(0, |acc, bit| acc | (1u64 << bit))
    }

    /// Records the features the driver accepted.
    pub fn set_acked_features(&self, features: u64) {
        self.acked_features.store(features, Ordering::Relaxed);
    }

    /// Whether writes may complete before they are durable (virtio spec 5.2.6.3).
    pub fn writeback_enabled(&self) -> bool {
        let acked = self.acked_features.load(Ordering::Relaxed);
        if acked & (1 << VIRTIO_BLK_F_CONFIG_WCE) != 0 {
            self.writeback.load(Ordering::Relaxed)
        } else {
            acked & (1 << VIRTIO_BLK_F_FLUSH) != 0
        }
    }

    /// `struct virtio_blk_config` as the guest reads it.
    pub fn config_space(&self) -> [u8; CONFIG_SPACE_SIZE] {
        let lbs = self.settings.logical_block_size;
        let mut c = [0u8; CONFIG_SPACE_SIZE];
        let mut put = |off: usize, bytes: &[u8]| c[off..off + bytes.len()].copy_from_slice(bytes);
        put(0, &(self.capacity_bytes() / SECTOR_SIZE).to_le_bytes());
        put(8, &SIZE_MAX.to_le_bytes());
        put(12, &self.seg_max().to_le_bytes());
        // geometry (16..20) left zero: not offered.
        put(20, &lbs.to_le_bytes());
        let physical_exp = (PHYSICAL_BLOCK_SIZE.max(lbs) / lbs).trailing_zeros() as u8;
        put(24, &[physical_exp, 0]);
        put(26, &1u16.to_le_bytes()); // min_io_size, in logical blocks
        put(28, &0u32.to_le_bytes()); // opt_io_size: none
        put(
            CONFIG_WRITEBACK_OFFSET,
            &[u8::from(self.writeback.load(Ordering::Relaxed)), 0],
        );
        put(34, &self.settings.num_queues.to_le_bytes());
        let sector_align = (lbs / SECTOR_SIZE as u32).max(1);
        put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(40, &MAX_DISCARD_SEGMENTS.to_le_bytes());
        put(44, &sector_align.to_le_bytes());
        put(48, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(52, &MAX_DISCARD_SEGMENTS.to_le_bytes());
        put(56, &[1]); // write_zeroes_may_unmap
        c
    }

    /// Applies a driver write to the config space. Only the `writeback` byte is writable.
    pub fn write_config(&self, offset: u32, data: &[u8]) -> Result<(), ConfigWriteError> {
        if offset as usize == CONFIG_WRITEBACK_OFFSET && data.len() == 1 {
            match data[0] {
                0 | 1 => {
                    self.writeback.store(data[0] == 1, Ordering::Relaxed);
                    Ok(())
                }
                v => Err(ConfigWriteError::BadValue(v)),
            }
        } else {
            Err(ConfigWriteError::ReadOnlyField {
                offset,
                len: data.len(),
            })
        }
    }
}

/// A rejected config space write.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigWriteError {
    /// Only `writeback` (offset 32, 1 byte) is writable.
    #[error("config write of {len} bytes at offset {offset} touches a read-only field")]
    ReadOnlyField {
        /// Offset written.
        offset: u32,
        /// Bytes written.
        len: usize,
    },
    /// `writeback` takes 0 or 1.
    #[error("writeback value {0} is not 0 or 1")]
    BadValue(u8),
}

/// What a request turned into.
enum Action {
    /// Finished without disk I/O: bytes written to the data buffers.
    Done(u32),
    /// Answered without disk I/O.
    Refuse(Refusal),
    /// Needs the disk.
    Io(PendingIo),
}

/// Why a request is answered without disk I/O. [`Refusal::status`] is the one table of the
/// status each gets: the virtio spec's where it names one (virtio 1.2 §5.2.6.2), otherwise
/// that of QEMU's virtio-blk handler (`block/export/virtio-blk-handler.c`, which
/// qemu-storage-daemon serves vhost-user-blk with), so drivers and QEMU's tests see the
/// same answers from both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The chain breaks virtio framing: a device-readable descriptor after a writable one,
    /// or more descriptors than `seg_max` + 2.
    MalformedChain,
    /// The request header (`virtio_blk_outhdr`, 16 bytes) is short or unreadable.
    ShortHeader,
    /// A read's data buffers are device-readable, or a write's are device-writable.
    WrongDirection,
    /// A write, discard or write-zeroes on a read-only device (spec: "MUST set the status
    /// byte to VIRTIO_BLK_S_IOERR for a write request if VIRTIO_BLK_F_RO is offered").
    ReadOnly,
    /// The sector range is not aligned to the logical block size or ends past capacity.
    OutOfRange,
    /// More data than `size_max` × `seg_max` bytes.
    TooLarge,
    /// A request type the device does not implement (spec: VIRTIO_BLK_S_UNSUPP).
    UnknownType,
    /// A discard or write-zeroes with more segments than `max_discard_seg` /
    /// `max_write_zeroes_seg` (QEMU: VIRTIO_BLK_S_UNSUPP).
    TooManySegments,
    /// A discard or write-zeroes whose segment (`virtio_blk_discard_write_zeroes`,
    /// 16 bytes) is short or unreadable.
    ShortSegment,
    /// Unknown flags in a discard or write-zeroes segment, or UNMAP on a discard (spec:
    /// VIRTIO_BLK_S_UNSUPP).
    UnknownFlags,
    /// A segment covers more sectors than `max_discard_sectors` /
    /// `max_write_zeroes_sectors`.
    TooManySectors,
    /// An operation whose feature the device did not offer (write-zeroes where ranges
    /// cannot be zeroed).
    NotOffered,
    /// The guest memory a request names cannot be reached or a bounce buffer cannot be
    /// allocated.
    BadMemory,
    /// The queue's disk context would not take the operation (logged).
    DiskQueue,
}

impl Refusal {
    /// Every refusal, in declaration order (`Refusal as usize` indexes this).
    pub const ALL: [Refusal; 14] = [
        Refusal::MalformedChain,
        Refusal::ShortHeader,
        Refusal::WrongDirection,
        Refusal::ReadOnly,
        Refusal::OutOfRange,
        Refusal::TooLarge,
        Refusal::UnknownType,
        Refusal::TooManySegments,
        Refusal::ShortSegment,
        Refusal::UnknownFlags,
        Refusal::TooManySectors,
        Refusal::NotOffered,
        Refusal::BadMemory,
        Refusal::DiskQueue,
    ];

    /// snake_case name (a metric label value).
    pub fn name(self) -> &'static str {
        match self {
            Refusal::MalformedChain => "malformed_chain",
            Refusal::ShortHeader => "short_header",
            Refusal::WrongDirection => "wrong_direction",
            Refusal::ReadOnly => "read_only",
            Refusal::OutOfRange => "out_of_range",
            Refusal::TooLarge => "too_large",
            Refusal::UnknownType => "unknown_type",
            Refusal::TooManySegments => "too_many_segments",
            Refusal::ShortSegment => "short_segment",
            Refusal::UnknownFlags => "unknown_flags",
            Refusal::TooManySectors => "too_many_sectors",
            Refusal::NotOffered => "not_offered",
            Refusal::BadMemory => "bad_memory",
            Refusal::DiskQueue => "disk_queue",
        }
    }

    /// The virtio-blk status byte the driver gets.
    pub fn status(self) -> u8 {
        let status = match self {
            Refusal::UnknownType
            | Refusal::TooManySegments
            | Refusal::UnknownFlags
            | Refusal::NotOffered => VIRTIO_BLK_S_UNSUPP,
            Refusal::MalformedChain
            | Refusal::ShortHeader
            | Refusal::WrongDirection
            | Refusal::ReadOnly
            | Refusal::OutOfRange
            | Refusal::TooLarge
            | Refusal::ShortSegment
            | Refusal::TooManySectors
            | Refusal::BadMemory
            | Refusal::DiskQueue => VIRTIO_BLK_S_IOERR,
        };
        status as u8
    }

    /// The failure reason a refused request counts under (metric label `reason`).
    pub fn failure(self) -> Failure {
        match self {
            Refusal::ReadOnly => Failure::ReadOnly,
            Refusal::UnknownType
            | Refusal::TooManySegments
            | Refusal::UnknownFlags
            | Refusal::NotOffered => Failure::Unsupported,
            Refusal::DiskQueue => Failure::IoError,
            Refusal::MalformedChain
            | Refusal::ShortHeader
            | Refusal::WrongDirection
            | Refusal::OutOfRange
            | Refusal::TooLarge
            | Refusal::ShortSegment
            | Refusal::TooManySectors
            | Refusal::BadMemory => Failure::Invalid,
        }
    }

    /// The driver broke the virtio framing (counted as malformed, not as an I/O error).
    pub fn is_malformed(self) -> bool {
        matches!(
            self,
            Refusal::MalformedChain | Refusal::ShortHeader | Refusal::WrongDirection
        )
    }
}

/// Which operation, for completion handling and statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes { unmap: bool },
}

impl Kind {
    /// The metric op of a request of this kind.
    fn op(self) -> Op {
        match self {
            Kind::Read => Op::Read,
            Kind::Write => Op::Write,
            Kind::Flush => Op::Flush,
            Kind::Discard => Op::Discard,
            Kind::WriteZeroes { .. } => Op::WriteZeroes,
        }
    }
}

/// The metric op of a virtio-blk request type.
fn request_op(request_type: u32) -> Op {
    match request_type {
        VIRTIO_BLK_T_IN => Op::Read,
        VIRTIO_BLK_T_OUT => Op::Write,
        VIRTIO_BLK_T_FLUSH => Op::Flush,
        VIRTIO_BLK_T_DISCARD => Op::Discard,
        VIRTIO_BLK_T_WRITE_ZEROES => Op::WriteZeroes,
        _ => Op::Other,
    }
}

struct PendingIo {
    kind: Kind,
    offset: u64,
    len: u64,
    data: Vec<Segment>,
}

/// A request submitted to the disk, owned by the in-flight table until it completes.
struct InFlight {
    head: u16,
    status: GuestAddress,
    /// Keeps guest memory mapped while the kernel may still access it.
    mem: Arc<Memory>,
    io: PendingIo,
    bounce: Option<AlignedBuf>,
    /// When the chain was popped (request latency).
    started: Instant,
}

/// One virtqueue's request handler, owned by that queue's worker thread.
pub struct BlkQueue {
    device: Arc<BlkDevice>,
    disk: Box<dyn DiskQueue>,
    inflight: InFlightTable<InFlight>,
    stats: Arc<QueueStats>,
    /// The queue's one LUN slot of `stats`, kept here so requests take no lock.
    lun_stats: Arc<LunStats>,
    scratch: Vec<DiskCompletion>,
}

impl BlkQueue {
    /// A handler for one virtqueue of `device`, doing I/O on `disk`.
    pub fn new(device: Arc<BlkDevice>, disk: Box<dyn DiskQueue>) -> Self {
        let stats = Arc::new(QueueStats::default());
        let lun_stats = stats.lun(0).unwrap_or_else(|| stats.add_lun(0));
        BlkQueue {
            device,
            disk,
            inflight: InFlightTable::new(),
            lun_stats,
            stats,
            scratch: Vec::new(),
        }
    }

    /// Counters of this queue (shared with the metrics endpoint).
    pub fn stats(&self) -> &Arc<QueueStats> {
        &self.stats
    }

    /// Requests submitted to the disk and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// Handles one descriptor chain: queues its disk I/O, or completes it at once into `done`.
    fn handle(
        &mut self,
        chain: DescriptorChain<&Memory>,
        mem: &Arc<Memory>,
        done: &mut Vec<Completed>,
    ) {
        let started = Instant::now();
        let Chain {
            head,
            readable,
            writable,
            misordered,
        } = Chain::collect(chain);
        let max_descriptors = self.device.seg_max() as usize + 2;
        let too_long = readable.len() + writable.len() > max_descriptors;
        // The status byte is the last writable byte; without one nothing can be reported.
        let writable_len = total(&writable);
        let status_at = writable_len.checked_sub(1).and_then(|last| {
            let (_, tail) = split_segments(&writable, last);
            tail.first().map(|s| s.addr)
        });
        let Some(status) = status_at.filter(|a| mem.check_range(*a, 1)) else {
            tracing::debug!(head, "request without a writable status byte dropped");
            bump(&self.stats.malformed, 1);
            done.push(Completed { head, used_len: 0 });
            return;
        };
        let (writable_data, _) = split_segments(&writable, writable_len - 1);

        let (op, action) = if misordered || too_long {
            tracing::debug!(head, misordered, too_long, "malformed descriptor chain");
            (Op::Other, Action::Refuse(Refusal::MalformedChain))
        } else {
            self.parse(mem, &readable, writable_data)
        };
        let refusal = match action {
            Action::Done(data_written) => {
                return self.finish_now(mem, head, status, Ok(data_written), op, started, done)
            }
            Action::Refuse(refusal) => refusal,
            Action::Io(io) => match self.submit_io(mem, head, status, io, started) {
                Ok(()) => return,
                Err(refusal) => refusal,
            },
        };
        tracing::debug!(head, ?refusal, "request refused");
        self.finish_now(mem, head, status, Err(refusal), op, started, done);
    }

    /// Answers a request without disk I/O: done (`Ok(bytes written to its data buffers)`)
    /// or refused, and counts it.
    #[allow(clippy::too_many_arguments)]
    fn finish_now(
        &self,
        mem: &Memory,
        head: u16,
        status: GuestAddress,
        answer: Result<u32, Refusal>,
        op: Op,
        started: Instant,
        done: &mut Vec<Completed>,
    ) {
        let (code, data_written, failure) = match answer {
            Ok(n) => (VIRTIO_BLK_S_OK as u8, n, None),
            Err(refusal) => {
                if let Some(count) = self.stats.refused.get(refusal as usize) {
                    bump(count, 1);
                }
                if refusal.is_malformed() {
                    bump(&self.stats.malformed, 1);
                }
                (refusal.status(), 0, Some(refusal.failure()))
            }
        };
        let used_len = match mem.write_obj(code, status) {
            Ok(()) => data_written + 1,
            Err(_) => 0,
        };
        self.lun_stats.record(op, 0, started, failure);
        done.push(Completed { head, used_len });
    }

    /// Validates a well-framed request; also says which op it is (for the counters).
    fn parse(
        &self,
        mem: &Memory,
        readable: &[Segment],
        writable_data: Vec<Segment>,
    ) -> (Op, Action) {
        let (header_segs, readable_data) = split_segments(readable, HEADER_SIZE);
        let mut header = [0u8; HEADER_SIZE];
        if gather(mem, &header_segs, &mut header).is_none() {
            return (Op::Other, Action::Refuse(Refusal::ShortHeader));
        }
        let [t0, t1, t2, t3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = header;
        let request_type = u32::from_le_bytes([t0, t1, t2, t3]);
        let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
        (
            request_op(request_type),
            self.parse_request(mem, request_type, sector, readable_data, writable_data),
        )
    }

    /// Validates a request whose header was read.
    fn parse_request(
        &self,
        mem: &Memory,
        request_type: u32,
        sector: u64,
        readable_data: Vec<Segment>,
        writable_data: Vec<Segment>,
    ) -> Action {
        let readonly = self.device.settings.readonly;
        match request_type {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
                let is_read = request_type == VIRTIO_BLK_T_IN;
                let (data, wrong_way) = if is_read {
                    (writable_data, &readable_data)
                } else {
                    (readable_data.clone(), &writable_data)
                };
                if !wrong_way.is_empty() {
                    return Action::Refuse(Refusal::WrongDirection);
                }
                if !is_read && readonly {
                    return Action::Refuse(Refusal::ReadOnly);
                }
                let len = total(&data) as u64;
                if len > self.device.max_request_bytes() {
                    return Action::Refuse(Refusal::TooLarge);
                }
                match self.check_range(sector, len) {
                    Some(offset) => Action::Io(PendingIo {
                        kind: if is_read { Kind::Read } else { Kind::Write },
                        offset,
                        len,
                        data,
                    }),
                    None => Action::Refuse(Refusal::OutOfRange),
                }
            }
            VIRTIO_BLK_T_FLUSH => Action::Io(PendingIo {
                kind: Kind::Flush,
                offset: 0,
                len: 0,
                data: Vec::new(),
            }),
            VIRTIO_BLK_T_GET_ID => {
                let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
                let serial = self.device.settings.serial.as_bytes();
                let n = serial.len().min(id.len());
                id[..n].copy_from_slice(&serial[..n]);
                let limit = total(&writable_data).min(id.len());
                match scatter(mem, &writable_data, &id[..limit]) {
                    Some(written) => Action::Done(written as u32),
                    None => Action::Refuse(Refusal::BadMemory),
                }
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                match self.parse_segment(mem, request_type, &readable_data) {
                    Ok(io) => Action::Io(io),
                    Err(refusal) => Action::Refuse(refusal),
                }
            }
            _ => Action::Refuse(Refusal::UnknownType),
        }
    }

    /// Validates a discard or write-zeroes request, in the order QEMU checks it.
    fn parse_segment(
        &self,
        mem: &Memory,
        request_type: u32,
        payload: &[Segment],
    ) -> Result<PendingIo, Refusal> {
        let is_discard = request_type == VIRTIO_BLK_T_DISCARD;
        if self.device.settings.readonly {
            return Err(Refusal::ReadOnly);
        }
        if !is_discard && !self.device.disk.deallocate_zeroes {
            // Not offered: the backing store cannot zero a range without writing it.
            return Err(Refusal::NotOffered);
        }
        let len = total(payload);
        if len > DISCARD_SEGMENT_SIZE * MAX_DISCARD_SEGMENTS as usize {
            return Err(Refusal::TooManySegments);
        }
        let mut seg = [0u8; DISCARD_SEGMENT_SIZE];
        if len < DISCARD_SEGMENT_SIZE || gather(mem, payload, &mut seg).is_none() {
            return Err(Refusal::ShortSegment);
        }
        let [a0, a1, a2, a3, a4, a5, a6, a7, n0, n1, n2, n3, f0, f1, f2, f3] = seg;
        let seg_sector = u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]);
        let num_sectors = u32::from_le_bytes([n0, n1, n2, n3]);
        let flags = u32::from_le_bytes([f0, f1, f2, f3]);
        if num_sectors > MAX_DISCARD_SECTORS {
            return Err(Refusal::TooManySectors);
        }
        let len = u64::from(num_sectors) * SECTOR_SIZE;
        let offset = self
            .check_range(seg_sector, len)
            .ok_or(Refusal::OutOfRange)?;
        let allowed_flags = if is_discard {
            0
        } else {
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        };
        if flags & !allowed_flags != 0 {
            return Err(Refusal::UnknownFlags);
        }
        Ok(PendingIo {
            kind: if is_discard {
                Kind::Discard
            } else {
                Kind::WriteZeroes {
                    unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
                }
            },
            offset,
            len,
            data: Vec::new(),
        })
    }

    /// Byte offset of `sector` if `[sector, +len)` is block-aligned and inside the disk.
    fn check_range(&self, sector: u64, len: u64) -> Option<u64> {
        let lbs = u64::from(self.device.settings.logical_block_size);
        let offset = sector.checked_mul(SECTOR_SIZE)?;
        let end = offset.checked_add(len)?;
        (offset.is_multiple_of(lbs)
            && len.is_multiple_of(lbs)
            && end <= self.device.capacity_bytes())
        .then_some(offset)
    }

    fn submit_io(
        &mut self,
        mem: &Arc<Memory>,
        head: u16,
        status: GuestAddress,
        io: PendingIo,
        started: Instant,
    ) -> Result<(), Refusal> {
        const IOERR: Refusal = Refusal::BadMemory;
        let mut bounce = None;
        let op = match io.kind {
            Kind::Read | Kind::Write => {
                let mut iovecs = host_iovecs(mem, &io.data).ok_or(IOERR)?;
                if let Some(align) = bounce_alignment(self.device.disk.direct, &iovecs) {
                    let mut buf = AlignedBuf::new(io.len as usize, align).ok_or(IOERR)?;
                    if io.kind == Kind::Write {
                        gather(mem, &io.data, buf.as_mut_slice()).ok_or(IOERR)?;
                    }
                    iovecs = vec![libc::iovec {
                        iov_base: buf.as_mut_slice().as_mut_ptr().cast(),
                        iov_len: buf.len(),
                    }];
                    bounce = Some(buf);
                }
                if io.kind == Kind::Read {
                    DiskOp::Read {
                        offset: io.offset,
                        iovecs,
                    }
                } else {
                    DiskOp::Write {
                        offset: io.offset,
                        iovecs,
                        durable: !self.device.writeback_enabled(),
                    }
                }
            }
            Kind::Flush => DiskOp::Flush,
            // In writethrough mode every request is durable when it completes (virtio spec
            // 5.2.6.3), discards and zeroing included.
            Kind::Discard => DiskOp::Discard {
                offset: io.offset,
                len: io.len,
                durable: !self.device.writeback_enabled(),
            },
            Kind::WriteZeroes { unmap } => DiskOp::WriteZeroes {
                offset: io.offset,
                len: io.len,
                unmap,
                durable: !self.device.writeback_enabled(),
            },
        };
        let slot = self.inflight.reserve();
        if let Err(e) = self.disk.push(op, slot as u64) {
            tracing::warn!("cannot queue disk I/O: {e}");
            self.inflight.release(slot);
            return Err(Refusal::DiskQueue);
        }
        self.inflight.fill(
            slot,
            InFlight {
                head,
                status,
                mem: Arc::clone(mem),
                io,
                bounce,
                started,
            },
        );
        self.lun_stats.started_io();
        Ok(())
    }

    fn complete_all(&mut self, completions: &mut Vec<DiskCompletion>, done: &mut Vec<Completed>) {
        for c in completions.drain(..) {
            let slot = c.token as usize;
            let Some(request) = self.inflight.take(slot) else {
                tracing::error!(token = c.token, "completion for an unknown request");
                continue;
            };
            let completed = self.complete(request, c.result);
            done.push(completed);
        }
    }

    /// Finishes one request with the disk's result.
    fn complete(&mut self, request: InFlight, result: i32) -> Completed {
        let ok = match request.io.kind {
            Kind::Read | Kind::Write => result >= 0 && result as u64 == request.io.len,
            _ => result >= 0,
        };
        if !ok {
            tracing::warn!(
                kind = ?request.io.kind,
                offset = request.io.offset,
                len = request.io.len,
                result,
                "disk I/O failed"
            );
        }
        self.finish(request, ok)
    }

    /// Counts a finished request and writes its status.
    fn finish(&self, request: InFlight, ok: bool) -> Completed {
        let io = &request.io;
        let mut failure = (!ok).then_some(Failure::IoError);
        if ok && io.kind == Kind::Read {
            if let Some(buf) = &request.bounce {
                if scatter(&request.mem, &io.data, buf.as_slice()) != Some(buf.len()) {
                    failure = Some(Failure::Invalid);
                }
            }
        }
        let (code, data_written) = match failure {
            Some(_) => (VIRTIO_BLK_S_IOERR as u8, 0),
            None if io.kind == Kind::Read => (VIRTIO_BLK_S_OK as u8, io.len as u32),
            None => (VIRTIO_BLK_S_OK as u8, 0),
        };
        let used_len = match request.mem.write_obj(code, request.status) {
            Ok(()) => data_written + 1,
            Err(_) => 0,
        };
        self.lun_stats.finished_io();
        self.lun_stats
            .record(io.kind.op(), io.len, request.started, failure);
        Completed {
            head: request.head,
            used_len,
        }
    }
}

impl QueueHandler for BlkQueue {
    fn handle_chain(
        &mut self,
        chain: DescriptorChain<&Memory>,
        mem: &Arc<Memory>,
        done: &mut Vec<Completed>,
    ) {
        self.handle(chain, mem, done);
    }

    fn submit(&mut self) -> io::Result<()> {
        self.disk.submit()
    }

    fn reap(&mut self, done: &mut Vec<Completed>) {
        let mut completions = std::mem::take(&mut self.scratch);
        self.disk.reap(&mut completions);
        self.complete_all(&mut completions, done);
        self.scratch = completions;
    }

    fn drain(&mut self, done: &mut Vec<Completed>) -> io::Result<()> {
        while self.in_flight() > 0 {
            let mut completions = Vec::new();
            self.disk.drain(&mut completions)?;
            self.complete_all(&mut completions, done);
        }
        Ok(())
    }

    fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.disk.completion_fd())
    }

    fn stats(&self) -> Option<Arc<QueueStats>> {
        Some(Arc::clone(&self.stats))
    }
}

impl VirtioDevice for BlkDevice {
    fn num_queues(&self) -> usize {
        usize::from(self.settings.num_queues)
    }

    fn max_queue_size(&self) -> u16 {
        self.settings.queue_size
    }

    fn features(&self) -> u64 {
        BlkDevice::features(self)
    }

    fn set_acked_features(&self, features: u64) {
        BlkDevice::set_acked_features(self, features)
    }

    fn config_space(&self) -> Vec<u8> {
        BlkDevice::config_space(self).to_vec()
    }

    fn write_config(&self, offset: u32, data: &[u8]) -> Result<(), String> {
        BlkDevice::write_config(self, offset, data).map_err(|e| e.to_string())
    }

    fn lun_capacities(&self) -> Vec<(u16, u64)> {
        vec![(0, self.capacity_bytes())]
    }
}
