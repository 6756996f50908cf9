//! The virtio-scsi request queues (queues 2..): `virtio_scsi_cmd_req` framing, commands
//! to the LUNs' emulation, and the disk I/O of READ, WRITE, VERIFY, UNMAP, WRITE SAME and
//! SYNCHRONIZE CACHE on the shared request layer ([`IoQueue`]), one ring per LUN, all
//! signalling one completion eventfd.

use std::io;
use std::sync::Arc;
use std::time::Instant;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device::ScsiDevice;
use super::emulation::{
    data_out_to_gather, ignores_unit_attention, report_luns, IoRequest, Lun, Outcome,
};
use super::luns::{LunSlot, LunTable};
use super::opcode;
use super::sense::{status, Sense};
use super::wire::{decode_lun, response, CmdReq, Response, REQ_SIZE, RESP_SIZE};
use crate::chain::{gather, scatter, split_segments, total, Memory, Segment};
use crate::device::Completed;
use crate::disk::{DiskOp, DiskQueue};
use crate::guest::{data_buffer, GuestRam};
use crate::iobuf::{AlignedBuf, IoBuf};
use crate::request::{
    Accounting, Answer, DeviceQueue, IoDevice, IoOutcome, IoQueue, Pending, Popped,
};
use crate::stats::{bump, LunStats, Op, QueueStats};

/// Bytes of the write-same pattern buffer (the pattern repeated).
const WRITE_SAME_CHUNK: usize = 1 << 20;

/// How a request is counted: its LUN slot, op and when its chain was popped.
#[derive(Debug, Clone, Copy)]
struct Counted {
    /// The LUN addressed, if the device has it.
    lun: Option<u16>,
    op: Op,
    started: Instant,
}

/// Which disk operation a request runs, for completion handling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IoKind {
    Read,
    Compare,
    Write,
    Flush,
    Unmap,
    Zero,
}

impl IoKind {
    /// The metric op (as [`opcode::metric_op`] gives for the command).
    fn op(self) -> Op {
        match self {
            IoKind::Read | IoKind::Compare => Op::Read,
            IoKind::Write => Op::Write,
            IoKind::Flush => Op::Flush,
            IoKind::Unmap => Op::Discard,
            IoKind::Zero => Op::WriteZeroes,
        }
    }
}

/// Where a command's data and response are: its chain, split.
struct Target<'a> {
    head: u16,
    ram: &'a GuestRam,
    /// The response's segments (`virtio_scsi_cmd_resp`).
    resp: Vec<Segment>,
    /// Data-in segments for a read, data-out for a write.
    data: Vec<Segment>,
    data_in_len: usize,
    started: Instant,
}

/// A command's disk operations, and what finishing it needs.
struct Planned {
    kind: IoKind,
    /// Bytes a read or write moves (0 for the others).
    bytes: u64,
    ops: Vec<DiskOp>,
    /// A bounced read's guest buffers, to copy the data into.
    copy_back: Option<Vec<Segment>>,
    /// What a compare must find.
    expected: Vec<u8>,
}

impl Planned {
    fn one(kind: IoKind, bytes: u64, op: DiskOp) -> Self {
        Planned {
            kind,
            bytes,
            ops: vec![op],
            copy_back: None,
            expected: Vec::new(),
        }
    }
}

/// A command with disk I/O in flight (one or more operations).
pub struct InFlight {
    /// Its LUN.
    lun: Arc<LunSlot>,
    head: u16,
    ram: GuestRam,
    resp: Vec<Segment>,
    kind: IoKind,
    /// Bytes a read or write moves.
    bytes: u64,
    data_in_len: usize,
    copy_back: Option<Vec<Segment>>,
    expected: Vec<u8>,
}

impl Pending for InFlight {
    type Receipt = Arc<LunSlot>;

    fn finish(self, outcome: IoOutcome) -> (Answer, Arc<LunSlot>) {
        let data_in_len = self.data_in_len as u32;
        let data = outcome.buf.as_ref();
        let mut written = 0;
        let r = match outcome.error {
            None => match self.kind {
                IoKind::Compare => match miscompare(data, &self.expected) {
                    Some(offset) => Response {
                        information: Some(offset as u32),
                        ..Response::check(Sense::MISCOMPARE_DURING_VERIFY, data_in_len)
                    },
                    None => Response::ok(data_in_len),
                },
                IoKind::Read if !copied_back(&self.ram, self.copy_back.as_deref(), data) => {
                    Response::check(Sense::INTERNAL_TARGET_FAILURE, data_in_len)
                }
                IoKind::Read => {
                    written = self.bytes as usize;
                    Response::ok((self.data_in_len - written) as u32)
                }
                _ => Response::ok(data_in_len),
            },
            Some(err) => {
                tracing::warn!(kind = ?self.kind, result = err, "SCSI disk I/O failed");
                Response::check(io_error_sense(err, self.kind), data_in_len)
            }
        };
        let answer = respond(&self.ram, self.head, &self.resp, &r, written);
        (answer, self.lun)
    }
}

/// The sense data of a command whose disk I/O failed with `-errno` `err`: the one mapping
/// from I/O errors to sense (SBC-3 4.18, SPC-4 4.5.6).
fn io_error_sense(err: i32, kind: IoKind) -> Sense {
    match (err, kind) {
        (e, _) if e == -libc::ENOSPC => Sense::SPACE_ALLOCATION_FAILED,
        (_, IoKind::Read | IoKind::Compare) => Sense::UNRECOVERED_READ_ERROR,
        (_, IoKind::Unmap) => Sense::INTERNAL_TARGET_FAILURE,
        _ => Sense::WRITE_ERROR,
    }
}

/// The offset of the first byte of `data` that differs from `expected` (a compare without
/// its data is a miscompare at 0).
fn miscompare(data: Option<&IoBuf>, expected: &[u8]) -> Option<usize> {
    let Some(have) = data.and_then(IoBuf::as_slice) else {
        return Some(0);
    };
    have.iter().zip(expected).position(|(h, w)| h != w)
}

/// Copies a bounced read's data into the guest's buffers (nothing to do when it did not
/// bounce); false if that failed.
fn copied_back(ram: &Memory, segs: Option<&[Segment]>, data: Option<&IoBuf>) -> bool {
    let Some(segs) = segs else {
        return true;
    };
    match data.and_then(IoBuf::as_slice) {
        Some(bytes) => scatter(ram, segs, bytes) == Some(bytes.len()),
        None => false,
    }
}

/// Writes response `r` of the command at `head`, which wrote `data_written` data-in bytes.
fn respond(mem: &Memory, head: u16, resp: &[Segment], r: &Response, data_written: usize) -> Answer {
    let used_len = match scatter(mem, resp, &r.bytes()) {
        Some(n) if n == RESP_SIZE => (RESP_SIZE + data_written) as u32,
        _ => 0,
    };
    Answer {
        completed: Completed { head, used_len },
        failure: r.failure(),
        sense_key: match (r.status, r.sense) {
            (status::CHECK_CONDITION, Some(sense)) => Some(sense.key),
            _ => None,
        },
    }
}

/// A request queue of a virtio-scsi device.
pub type RequestQueue = DeviceQueue<ScsiRequests>;

/// virtio-scsi's part of a [`RequestQueue`]: commands to the LUNs.
pub struct ScsiRequests {
    device: Arc<ScsiDevice>,
    /// The LUN table this queue serves (the device's, as of the last refresh).
    table: Arc<LunTable>,
    stats: Arc<QueueStats>,
    /// The LUN slots of `stats` (the last for requests addressed to no LUN), kept here so
    /// requests take no lock; changed with the LUN table.
    lun_stats: Vec<Arc<LunStats>>,
}

impl RequestQueue {
    /// A queue over `device`; `make_disk(lun_index, notifier)` opens each LUN's ring,
    /// signalling `notifier`.
    pub fn new(
        device: Arc<ScsiDevice>,
        mut make_disk: impl FnMut(usize, &EventFd) -> io::Result<Box<dyn DiskQueue>>,
    ) -> io::Result<Self> {
        let notifier = EventFd::new(EFD_NONBLOCK)?;
        let table = device.luns();
        let disks = table
            .iter()
            .enumerate()
            .map(|(i, slot)| Ok((slot.id(), make_disk(i, &notifier)?)))
            .collect::<io::Result<Vec<_>>>()?;
        // One counter slot per LUN, then one for requests addressed to no LUN.
        let slots: Vec<Option<u16>> = table.iter().map(|l| Some(l.id())).chain([None]).collect();
        let stats = Arc::new(QueueStats::new(&slots));
        let lun_stats = stats.luns();
        let requests = ScsiRequests {
            device,
            table,
            stats: Arc::clone(&stats),
            lun_stats,
        };
        Ok(DeviceQueue::from_parts(
            requests,
            IoQueue::shared(notifier, disks),
            stats,
        ))
    }
}

impl ScsiRequests {
    /// How a request to `lun` counts (`None`: addressed to no LUN).
    fn accounting(&self, lun: Option<u16>, op: Op, bytes: u64, started: Instant) -> Accounting {
        Accounting {
            stats: self.lun_stats.iter().find(|s| s.lun == lun).cloned(),
            op,
            bytes,
            started,
        }
    }

    /// Counts a request answered at once with `r` and writes the response.
    #[allow(clippy::too_many_arguments)]
    fn answer(
        &self,
        counted: Counted,
        mem: &Memory,
        head: u16,
        resp: &[Segment],
        r: &Response,
        data_written: usize,
        done: &mut Vec<Completed>,
    ) {
        let answer = respond(mem, head, resp, r, data_written);
        self.accounting(counted.lun, counted.op, 0, counted.started)
            .record(answer.failure, answer.sense_key);
        done.push(answer.completed);
    }

    /// Commands to a LUN that does not exist (SPC-4 4.6.20).
    fn absent_lun(cdb: &[u8], luns: &[u16]) -> Outcome {
        match cdb[0] {
            opcode::INQUIRY if cdb[1] & 0x01 == 0 => {
                let alloc = usize::from(u16::from_be_bytes([cdb[3], cdb[4]]));
                let mut d = Lun::standard_inquiry(true);
                d.truncate(alloc);
                Outcome::Data(d)
            }
            opcode::REPORT_LUNS => report_luns(cdb, luns),
            opcode::REQUEST_SENSE => {
                let mut d = Sense::LUN_NOT_SUPPORTED.fixed().to_vec();
                d.truncate(usize::from(cdb[4]));
                Outcome::Data(d)
            }
            _ => Outcome::Check(Sense::LUN_NOT_SUPPORTED),
        }
    }

    /// Turns an I/O request into disk operations and starts them; `Err` is the response
    /// to give at once.
    fn submit_io(
        &mut self,
        queue: &mut IoQueue<InFlight>,
        lun: &Arc<LunSlot>,
        io: IoRequest,
        t: Target<'_>,
    ) -> Result<(), Response> {
        let planned = self.plan(lun, io, &t)?;
        let covered = planned.ops.iter().map(DiskOp::covered_len).sum();
        let counted_bytes = match planned.kind {
            IoKind::Unmap | IoKind::Zero => covered,
            _ => planned.bytes,
        };
        let request = InFlight {
            lun: Arc::clone(lun),
            head: t.head,
            ram: t.ram.clone(),
            resp: t.resp,
            kind: planned.kind,
            bytes: planned.bytes,
            data_in_len: t.data_in_len,
            copy_back: planned.copy_back,
            expected: planned.expected,
        };
        let accounting =
            self.accounting(Some(lun.id()), planned.kind.op(), counted_bytes, t.started);
        if queue
            .start(lun.id(), request, planned.ops, accounting)
            .is_err()
        {
            return Err(Response::check(Sense::INTERNAL_TARGET_FAILURE, 0));
        }
        lun.started();
        Ok(())
    }

    /// The disk operations of `io` on `lun`. Without a volatile write cache (WCE=0) every
    /// command is durable at GOOD.
    fn plan(&self, lun: &LunSlot, io: IoRequest, t: &Target<'_>) -> Result<Planned, Response> {
        let settings = lun.lun.emulation.settings();
        let bs = u64::from(settings.block_size);
        let durable = !settings.write_cache;
        Ok(match io {
            IoRequest::Compare {
                lba,
                blocks,
                expected,
            } => Planned {
                expected,
                ..compare_op(lba * bs, u64::from(blocks) * bs)?
            },
            IoRequest::Read { lba, blocks } => {
                transfer(lun, t, lba * bs, u64::from(blocks) * bs, None)?
            }
            IoRequest::Write { lba, blocks, fua } => transfer(
                lun,
                t,
                lba * bs,
                u64::from(blocks) * bs,
                Some(fua || durable),
            )?,
            IoRequest::Flush => Planned::one(IoKind::Flush, 0, DiskOp::Flush),
            IoRequest::Unmap(ranges) => Planned {
                kind: IoKind::Unmap,
                bytes: 0,
                ops: ranges
                    .into_iter()
                    .map(|(lba, blocks)| DiskOp::Discard {
                        offset: lba * bs,
                        len: u64::from(blocks) * bs,
                        durable,
                    })
                    .collect(),
                copy_back: None,
                expected: Vec::new(),
            },
            IoRequest::WriteZeroes { lba, blocks, unmap } => Planned::one(
                IoKind::Zero,
                0,
                DiskOp::WriteZeroes {
                    offset: lba * bs,
                    len: u64::from(blocks) * bs,
                    unmap,
                    durable,
                },
            ),
            IoRequest::WriteSame {
                lba,
                blocks,
                pattern,
            } => write_same(lba * bs, u64::from(blocks) * bs, &pattern, durable)?,
        })
    }
}

/// The response when a buffer cannot be allocated.
fn internal_failure() -> Response {
    Response::check(Sense::INTERNAL_TARGET_FAILURE, 0)
}

/// A read of `bytes` at `offset` into an owned buffer, for a compare.
fn compare_op(offset: u64, bytes: u64) -> Result<Planned, Response> {
    let buf = AlignedBuf::new(bytes as usize, 4096).ok_or_else(internal_failure)?;
    Ok(Planned::one(
        IoKind::Compare,
        bytes,
        DiskOp::Read {
            offset,
            buf: IoBuf::owned(buf),
        },
    ))
}

/// A read (`durable` is `None`) or write of `bytes` at `offset`, on the command's data
/// buffers or a bounce buffer.
fn transfer(
    lun: &LunSlot,
    t: &Target<'_>,
    offset: u64,
    bytes: u64,
    durable: Option<bool>,
) -> Result<Planned, Response> {
    if (total(&t.data) as u64) < bytes {
        return Err(Response::transport(response::OVERRUN));
    }
    let (segs, _) = split_segments(&t.data, bytes as usize);
    let write = durable.is_some();
    let (buf, bounced) = data_buffer(t.ram, &segs, lun.lun.disk.direct, write)
        .ok_or_else(|| Response::transport(response::FAILURE))?;
    Ok(match durable {
        Some(durable) => Planned::one(
            IoKind::Write,
            bytes,
            DiskOp::Write {
                offset,
                buf,
                durable,
            },
        ),
        None => Planned {
            copy_back: bounced.then_some(segs),
            ..Planned::one(IoKind::Read, bytes, DiskOp::Read { offset, buf })
        },
    })
}

/// WRITE SAME: `pattern` (one block) repeated over `len` bytes at `offset`, written in
/// chunks from one shared buffer.
fn write_same(offset: u64, len: u64, pattern: &[u8], durable: bool) -> Result<Planned, Response> {
    let chunk = (len as usize).min(WRITE_SAME_CHUNK);
    let mut buf = AlignedBuf::new(chunk, 4096).ok_or_else(internal_failure)?;
    if !pattern.is_empty() {
        for block in buf.as_mut_slice().chunks_mut(pattern.len()) {
            block.copy_from_slice(&pattern[..block.len()]);
        }
    }
    let buf = Arc::new(buf);
    let mut ops = Vec::new();
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(chunk as u64);
        let data = IoBuf::shared(Arc::clone(&buf), n as usize).ok_or_else(internal_failure)?;
        ops.push(DiskOp::Write {
            offset: offset + done,
            buf: data,
            durable,
        });
        done += n;
    }
    Ok(Planned {
        kind: IoKind::Zero,
        bytes: 0,
        ops,
        copy_back: None,
        expected: Vec::new(),
    })
}

impl IoDevice for ScsiRequests {
    type Request = InFlight;

    fn handle(&mut self, queue: &mut IoQueue<InFlight>, popped: Popped, done: &mut Vec<Completed>) {
        let head = popped.chain.head;
        let (req_segs, data_out) = split_segments(&popped.chain.readable, REQ_SIZE);
        let (resp, data_in) = split_segments(&popped.chain.writable, RESP_SIZE);
        let mut req = [0u8; REQ_SIZE];
        if popped.chain.misordered
            || total(&resp) < RESP_SIZE
            || gather(popped.mem, &req_segs, &mut req).is_none()
        {
            tracing::debug!(head, "malformed virtio-scsi request");
            bump(&self.stats.malformed, 1);
            if total(&resp) >= RESP_SIZE {
                self.answer(
                    Counted {
                        lun: None,
                        op: Op::Other,
                        started: popped.started,
                    },
                    popped.mem,
                    head,
                    &resp,
                    &Response::transport(response::FAILURE),
                    0,
                    done,
                );
            } else {
                done.push(Completed { head, used_len: 0 });
            }
            return;
        }
        let data_out_len = total(&data_out);
        let data_in_len = total(&data_in);
        let req = CmdReq::parse(&req);
        let cdb = &req.cdb[..];
        let lun_id = decode_lun(&req.lun);
        let slot = lun_id.and_then(|id| self.table.find(id).cloned());
        let counted = Counted {
            lun: slot.as_ref().map(|s| s.id()),
            op: opcode::metric_op(cdb[0]),
            started: popped.started,
        };
        if data_out_len > 0 && data_in_len > 0 {
            // Bidirectional commands need VIRTIO_SCSI_F_INOUT, which is not offered.
            self.answer(
                counted,
                popped.mem,
                head,
                &resp,
                &Response::transport(response::FAILURE),
                0,
                done,
            );
            return;
        }
        if lun_id.is_none() {
            self.answer(
                counted,
                popped.mem,
                head,
                &resp,
                &Response::transport(response::BAD_TARGET),
                0,
                done,
            );
            return;
        }
        let outcome = match slot {
            None => Self::absent_lun(cdb, &self.table.ids()),
            Some(slot) => {
                let ua = if ignores_unit_attention(cdb) {
                    None
                } else {
                    slot.take_unit_attention()
                        .or_else(|| slot.lun.emulation.take_capacity_changed())
                };
                match ua {
                    Some(sense) => Outcome::Check(sense),
                    None => {
                        let mut params = vec![0u8; data_out_len.min(data_out_to_gather(cdb))];
                        if gather(popped.mem, &data_out, &mut params).is_none() {
                            params.clear();
                        }
                        match slot.lun.emulation.execute(cdb, &params) {
                            Outcome::Io(io) => {
                                let data = if matches!(io, IoRequest::Read { .. }) {
                                    data_in
                                } else {
                                    data_out
                                };
                                let target = Target {
                                    head,
                                    ram: popped.mem,
                                    resp: resp.clone(),
                                    data,
                                    data_in_len,
                                    started: popped.started,
                                };
                                if let Err(r) = self.submit_io(queue, &slot, io, target) {
                                    self.answer(counted, popped.mem, head, &resp, &r, 0, done);
                                }
                                return;
                            }
                            Outcome::ReportLuns => report_luns(cdb, &self.table.ids()),
                            other => other,
                        }
                    }
                }
            }
        };
        let (r, written) = match outcome {
            Outcome::Good => (Response::ok(data_in_len as u32), 0),
            Outcome::Check(sense) => (Response::check(sense, data_in_len as u32), 0),
            Outcome::Data(bytes) if bytes.len() > data_in_len => {
                (Response::transport(response::OVERRUN), 0)
            }
            Outcome::Data(bytes) => match scatter(popped.mem, &data_in, &bytes) {
                Some(n) => (Response::ok((data_in_len - n) as u32), n),
                None => (Response::transport(response::FAILURE), 0),
            },
            // Both were turned into something else above.
            Outcome::Io(_) | Outcome::ReportLuns => (Response::transport(response::FAILURE), 0),
        };
        self.answer(counted, popped.mem, head, &resp, &r, written, done);
    }

    /// Its LUN's in-flight count, which a TMF waits on, drops once the answer is on the
    /// used ring.
    fn published(lun: Arc<LunSlot>) {
        lun.published();
    }

    /// Takes the device's LUN table over: opens rings on added LUNs, completes what is in
    /// flight on removed ones and closes their rings.
    fn refresh(&mut self, io: &mut IoQueue<InFlight>, done: &mut Vec<Completed>) {
        let table = self.device.luns();
        if Arc::ptr_eq(&table, &self.table) {
            return;
        }
        for slot in table.iter() {
            if io.has_ring(slot.id()) {
                continue;
            }
            let Some(notifier) = io.notifier() else {
                continue;
            };
            match slot.open_ring(notifier) {
                Ok(ring) => io.add_ring(slot.id(), ring),
                Err(e) => {
                    tracing::error!(lun = slot.id(), "cannot open a ring on the new LUN: {e}")
                }
            }
        }
        io.retain_rings(|id| table.find(id).is_some(), done);
        // Counter slots follow the LUNs: a removed LUN's series go, an added one's start.
        for slot in self.table.iter() {
            if table.find(slot.id()).is_none() {
                self.stats.remove_lun(slot.id());
            }
        }
        for slot in table.iter() {
            if self.table.find(slot.id()).is_none() {
                self.stats.add_lun(slot.id());
            }
        }
        self.lun_stats = self.stats.luns();
        self.table = table;
    }
}
