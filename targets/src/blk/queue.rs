//! virtio-blk request handling on one virtqueue ([`BlkQueue`]): descriptor chains parsed
//! into [`DiskOp`]s (virtio 1.2 §5.2.6), refused with the status [`BlkError::status`]
//! gives, or run on the shared request layer ([`IoQueue`]) and answered when the disk
//! completes them.

use std::sync::Arc;
use std::time::Instant;

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::statuses::{status, BlkError, Refusal};
use super::{
    BlkDevice, DISCARD_SEGMENT_SIZE, HEADER_SIZE, MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS,
    SECTOR_SIZE,
};
use crate::chain::{gather, scatter, split_segments, total, Memory, Segment};
use crate::device::Completed;
use crate::disk::{DiskOp, DiskQueue};
use crate::guest::{data_buffer, GuestRam};
use crate::request::{
    Accounting, Answer, DeviceQueue, IoDevice, IoOutcome, IoQueue, Pending, Popped,
};
use crate::stats::{bump, LunStats, Op, QueueStats};

/// What a request turned into.
enum Action {
    /// Finished without disk I/O: bytes written to the data buffers.
    Done(u32),
    /// Answered without disk I/O.
    Refuse(Refusal),
    /// Needs the disk.
    Io(PendingIo),
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

/// A request with disk I/O in flight: where its answer goes.
pub struct InFlight {
    head: u16,
    status: GuestAddress,
    ram: GuestRam,
    kind: Kind,
    offset: u64,
    len: u64,
    /// A bounced read's guest buffers, to copy the data into.
    copy_back: Option<Vec<Segment>>,
}

impl Pending for InFlight {
    type Receipt = ();

    fn finish(self, outcome: IoOutcome) -> (Answer, ()) {
        if let Some(result) = outcome.error {
            tracing::warn!(
                kind = ?self.kind,
                offset = self.offset,
                len = self.len,
                result,
                "disk I/O failed"
            );
        }
        let mut error = outcome.error.map(BlkError::Io);
        if error.is_none() {
            if let Some(segs) = &self.copy_back {
                let data = outcome.buf.as_ref();
                let copied = data
                    .and_then(|buf| buf.as_slice())
                    .and_then(|bytes| scatter(&self.ram, segs, bytes).map(|n| n == bytes.len()));
                if copied != Some(true) {
                    error = Some(BlkError::BounceCopy);
                }
            }
        }
        let data_written = match error {
            None if self.kind == Kind::Read => self.len as u32,
            _ => 0,
        };
        let answer = write_status(&self.ram, self.head, self.status, error, data_written);
        (answer, ())
    }
}

/// Writes the status byte of a request answered `error` (`None`: OK) that wrote
/// `data_written` bytes into its data buffers.
fn write_status(
    mem: &Memory,
    head: u16,
    at: GuestAddress,
    error: Option<BlkError>,
    data_written: u32,
) -> Answer {
    let code = error.map_or(status::OK, BlkError::status);
    let used_len = match mem.write_obj(code, at) {
        Ok(()) => data_written + 1,
        Err(_) => 0,
    };
    Answer {
        completed: Completed { head, used_len },
        failure: error.map(BlkError::failure),
        sense_key: None,
    }
}

/// One virtqueue's request handler, owned by that queue's worker thread.
pub type BlkQueue = DeviceQueue<BlkRequests>;

/// virtio-blk's part of a [`BlkQueue`]: parsing and answering requests.
pub struct BlkRequests {
    device: Arc<BlkDevice>,
    stats: Arc<QueueStats>,
    /// The queue's one LUN slot of `stats`, kept here so requests take no lock.
    lun_stats: Arc<LunStats>,
}

impl BlkQueue {
    /// A handler for one virtqueue of `device`, doing I/O on `disk`.
    pub fn new(device: Arc<BlkDevice>, disk: Box<dyn DiskQueue>) -> Self {
        let stats = Arc::new(QueueStats::default());
        let lun_stats = stats.lun(0).unwrap_or_else(|| stats.add_lun(0));
        let requests = BlkRequests {
            device,
            stats: Arc::clone(&stats),
            lun_stats,
        };
        DeviceQueue::from_parts(requests, IoQueue::single(disk), stats)
    }
}

impl BlkRequests {
    /// How a request counts on this queue.
    fn accounting(&self, op: Op, bytes: u64, started: Instant) -> Accounting {
        Accounting {
            stats: Some(Arc::clone(&self.lun_stats)),
            op,
            bytes,
            started,
        }
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
        let (error, data_written) = match answer {
            Ok(n) => (None, n),
            Err(refusal) => {
                if let Some(count) = self.stats.refused.get(refusal as usize) {
                    bump(count, 1);
                }
                if refusal.is_malformed() {
                    bump(&self.stats.malformed, 1);
                }
                (Some(BlkError::Refused(refusal)), 0)
            }
        };
        let answer = write_status(mem, head, status, error, data_written);
        self.accounting(op, 0, started)
            .record(answer.failure, answer.sense_key);
        done.push(answer.completed);
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

    /// Starts a validated request's disk I/O: its data straight from guest memory or
    /// through a bounce buffer ([`data_buffer`]), in the write cache mode now.
    fn submit_io(
        &mut self,
        queue: &mut IoQueue<InFlight>,
        mem: &GuestRam,
        head: u16,
        status: GuestAddress,
        io: PendingIo,
        started: Instant,
    ) -> Result<(), Refusal> {
        // In writethrough mode every request is durable when it completes (virtio spec
        // 5.2.6.3), discards and zeroing included.
        let durable = !self.device.writeback_enabled();
        let mut copy_back = None;
        let op = match io.kind {
            Kind::Read | Kind::Write => {
                let write = io.kind == Kind::Write;
                let (buf, bounced) = data_buffer(mem, &io.data, self.device.disk.direct, write)
                    .ok_or(Refusal::BadMemory)?;
                if write {
                    DiskOp::Write {
                        offset: io.offset,
                        buf,
                        durable,
                    }
                } else {
                    copy_back = bounced.then_some(io.data);
                    DiskOp::Read {
                        offset: io.offset,
                        buf,
                    }
                }
            }
            Kind::Flush => DiskOp::Flush,
            Kind::Discard => DiskOp::Discard {
                offset: io.offset,
                len: io.len,
                durable,
            },
            Kind::WriteZeroes { unmap } => DiskOp::WriteZeroes {
                offset: io.offset,
                len: io.len,
                unmap,
                durable,
            },
        };
        let request = InFlight {
            head,
            status,
            ram: mem.clone(),
            kind: io.kind,
            offset: io.offset,
            len: io.len,
            copy_back,
        };
        let accounting = self.accounting(io.kind.op(), io.len, started);
        queue
            .start(0, request, [op], accounting)
            .map_err(|_| Refusal::DiskQueue)
    }
}

impl IoDevice for BlkRequests {
    type Request = InFlight;

    fn handle(&mut self, io: &mut IoQueue<InFlight>, req: Popped, done: &mut Vec<Completed>) {
        let head = req.chain.head;
        let max_descriptors = self.device.seg_max() as usize + 2;
        let too_long = req.chain.readable.len() + req.chain.writable.len() > max_descriptors;
        // The status byte is the last writable byte; without one nothing can be reported.
        let writable_len = total(&req.chain.writable);
        let status_at = writable_len.checked_sub(1).and_then(|last| {
            let (_, tail) = split_segments(&req.chain.writable, last);
            tail.first().map(|s| s.addr)
        });
        let Some(status) = status_at.filter(|a| req.mem.check_range(*a, 1)) else {
            tracing::debug!(head, "request without a writable status byte dropped");
            bump(&self.stats.malformed, 1);
            done.push(Completed { head, used_len: 0 });
            return;
        };
        let (writable_data, _) = split_segments(&req.chain.writable, writable_len - 1);

        let (op, action) = if req.chain.misordered || too_long {
            tracing::debug!(
                head,
                misordered = req.chain.misordered,
                too_long,
                "malformed descriptor chain"
            );
            (Op::Other, Action::Refuse(Refusal::MalformedChain))
        } else {
            self.parse(req.mem, &req.chain.readable, writable_data)
        };
        let refusal = match action {
            Action::Done(data_written) => {
                return self.finish_now(
                    req.mem,
                    head,
                    status,
                    Ok(data_written),
                    op,
                    req.started,
                    done,
                )
            }
            Action::Refuse(refusal) => refusal,
            Action::Io(pending) => {
                match self.submit_io(io, req.mem, head, status, pending, req.started) {
                    Ok(()) => return,
                    Err(refusal) => refusal,
                }
            }
        };
        tracing::debug!(head, ?refusal, "request refused");
        self.finish_now(req.mem, head, status, Err(refusal), op, req.started, done);
    }
}
