//! The virtio-scsi control queue (queue 0): task management functions, answered once the
//! I/O they affect has completed, and asynchronous notification requests (none supported).

use std::sync::Arc;

use virtio_bindings::bindings::virtio_scsi::{
    VIRTIO_SCSI_T_AN_QUERY, VIRTIO_SCSI_T_AN_SUBSCRIBE, VIRTIO_SCSI_T_TMF,
    VIRTIO_SCSI_T_TMF_ABORT_TASK, VIRTIO_SCSI_T_TMF_ABORT_TASK_SET,
    VIRTIO_SCSI_T_TMF_CLEAR_TASK_SET, VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET,
    VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET, VIRTIO_SCSI_T_TMF_QUERY_TASK,
    VIRTIO_SCSI_T_TMF_QUERY_TASK_SET,
};
use virtio_queue::DescriptorChain;

use super::device::ScsiDevice;
use super::luns::LunSlot;
use super::sense::Sense;
use super::wire::{decode_lun, response};
use crate::chain::{gather, scatter, total, Chain, Memory, Segment};
use crate::device::{Completed, QueueHandler};
use crate::guest::GuestRam;
use crate::stats::{bump, QueueStats, TMF_FUNCTIONS};

/// Size of `struct virtio_scsi_ctrl_tmf_req`: type, subtype, lun[8], tag.
const TMF_REQ_SIZE: usize = 24;
/// Size of `struct virtio_scsi_ctrl_an_req`: type, lun[8], event_requested.
const AN_REQ_SIZE: usize = 16;
/// Size of `struct virtio_scsi_ctrl_an_resp`: event_actual, response.
const AN_RESP_SIZE: usize = 5;

/// `virtio_scsi_ctrl_tmf_req` (virtio 1.2 §5.6.6.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TmfReq {
    /// `subtype`: which task management function (`VIRTIO_SCSI_T_TMF_*`).
    subtype: u32,
    /// `lun`: the 8-byte LUN field.
    lun: [u8; 8],
    /// `tag`: the command an ABORT TASK or QUERY TASK names.
    tag: u64,
}

impl TmfReq {
    fn parse(req: &[u8; TMF_REQ_SIZE]) -> Self {
        let mut lun = [0u8; 8];
        lun.copy_from_slice(&req[8..16]);
        let mut tag = [0u8; 8];
        tag.copy_from_slice(&req[16..24]);
        TmfReq {
            subtype: u32::from_le_bytes([req[4], req[5], req[6], req[7]]),
            lun,
            tag: u64::from_le_bytes(tag),
        }
    }
}

/// `virtio_scsi_ctrl_an_resp`: no asynchronous event is supported, so `event_actual` is
/// always 0.
fn an_resp(response: u8) -> Vec<u8> {
    let mut r = 0u32.to_le_bytes().to_vec();
    r.push(response);
    r
}

/// The control queue: task management functions and asynchronous notification requests.
pub struct ControlQueue {
    device: Arc<ScsiDevice>,
    stats: Arc<QueueStats>,
}

impl ControlQueue {
    /// The control queue of `device`.
    pub fn new(device: Arc<ScsiDevice>) -> Self {
        ControlQueue {
            device,
            stats: Arc::new(QueueStats::without_luns()),
        }
    }

    /// Counters of this queue (task management functions by subtype).
    pub fn stats(&self) -> &Arc<QueueStats> {
        &self.stats
    }

    /// Answers the control request of chain `head` (its readable and writable buffers).
    fn answer(
        &self,
        head: u16,
        readable: &[Segment],
        writable: &[Segment],
        mem: &GuestRam,
        done: &mut Vec<Completed>,
    ) {
        let mut req = [0u8; TMF_REQ_SIZE];
        let req_len = total(readable).min(req.len());
        let req_ok = gather(mem, readable, &mut req[..req_len]).is_some();
        let kind = u32::from_le_bytes([req[0], req[1], req[2], req[3]]);
        let reply: Vec<u8> = match kind {
            VIRTIO_SCSI_T_TMF if req_ok && req_len >= TMF_REQ_SIZE => {
                vec![self.tmf(TmfReq::parse(&req))]
            }
            // No asynchronous events are supported.
            VIRTIO_SCSI_T_AN_QUERY | VIRTIO_SCSI_T_AN_SUBSCRIBE
                if req_ok && req_len >= AN_REQ_SIZE =>
            {
                an_resp(response::OK)
            }
            _ => {
                tracing::debug!(kind, req_len, "malformed control request");
                if total(writable) >= AN_RESP_SIZE {
                    an_resp(response::FAILURE)
                } else {
                    vec![response::FAILURE]
                }
            }
        };
        let used_len = scatter(mem, writable, &reply).unwrap_or(0) as u32;
        done.push(Completed { head, used_len });
    }

    /// Answers a TMF. In-flight commands cannot be taken back from the kernel: an abort or
    /// reset waits until the commands it affects have completed (normally) and are on
    /// their used rings, as virtio-scsi requires of a completed TMF, then answers. If that
    /// takes longer than the TMF timeout, it answers FAILURE and the initiator escalates.
    fn tmf(&self, req: TmfReq) -> u8 {
        let subtype = req.subtype;
        let function = (subtype as usize).min(TMF_FUNCTIONS.len() - 1);
        if let Some(count) = self.stats.tmf.get(function) {
            bump(count, 1);
        }
        let table = self.device.luns();
        let index = decode_lun(&req.lun).and_then(|id| table.find(id).cloned());
        let settle = |luns: &[Arc<LunSlot>], answer: u8| {
            if self.device.wait_idle(luns) {
                answer
            } else {
                tracing::warn!(
                    subtype,
                    "task management: in-flight I/O did not complete in time; answering FAILURE"
                );
                response::FAILURE
            }
        };
        match subtype {
            VIRTIO_SCSI_T_TMF_ABORT_TASK
            | VIRTIO_SCSI_T_TMF_ABORT_TASK_SET
            | VIRTIO_SCSI_T_TMF_CLEAR_TASK_SET => match index {
                Some(i) => settle(&[i], response::FUNCTION_COMPLETE),
                None => response::INCORRECT_LUN,
            },
            VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET => {
                let all: Vec<Arc<LunSlot>> = table.iter().cloned().collect();
                let answer = settle(&all, response::FUNCTION_SUCCEEDED);
                self.device.set_unit_attention(None, Sense::I_T_NEXUS_LOSS);
                answer
            }
            VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET => match index {
                Some(i) => {
                    let answer = settle(std::slice::from_ref(&i), response::FUNCTION_SUCCEEDED);
                    i.set_unit_attention(Sense::LUN_RESET_OCCURRED);
                    answer
                }
                None => response::INCORRECT_LUN,
            },
            // QUERY TASK SET: whether the LUN has commands in flight. QUERY TASK would need
            // the tag, which is not tracked: it reports none.
            VIRTIO_SCSI_T_TMF_QUERY_TASK | VIRTIO_SCSI_T_TMF_QUERY_TASK_SET => match index {
                Some(i) if subtype == VIRTIO_SCSI_T_TMF_QUERY_TASK_SET && i.busy() > 0 => {
                    tracing::trace!(tag = req.tag, "QUERY TASK SET: commands in flight");
                    response::FUNCTION_SUCCEEDED
                }
                Some(_) => response::FUNCTION_COMPLETE,
                None => response::INCORRECT_LUN,
            },
            // CLEAR ACA (no ACA support) and anything unknown.
            _ => response::FUNCTION_REJECTED,
        }
    }
}

impl QueueHandler for ControlQueue {
    fn handle_chain(
        &mut self,
        chain: DescriptorChain<&Memory>,
        mem: &GuestRam,
        done: &mut Vec<Completed>,
    ) {
        let Chain {
            head,
            readable,
            writable,
            ..
        } = Chain::collect(chain);
        self.answer(head, &readable, &writable, mem, done);
    }

    /// A TMF accepted before a restart is answered FAILURE without running it: the commands
    /// it named are being re-run on their own queues, so it can neither claim they are
    /// aborted nor wait for them in order; the initiator escalates (to a LUN reset, which
    /// then runs normally). Asynchronous notification requests are answered again.
    fn resubmit_chain(
        &mut self,
        chain: DescriptorChain<&Memory>,
        mem: &GuestRam,
        done: &mut Vec<Completed>,
    ) {
        let Chain {
            head,
            readable,
            writable,
            ..
        } = Chain::collect(chain);
        let mut kind = [0u8; 4];
        let is_tmf = total(&readable) >= TMF_REQ_SIZE
            && gather(mem, &readable, &mut kind).is_some()
            && u32::from_le_bytes(kind) == VIRTIO_SCSI_T_TMF;
        if is_tmf {
            tracing::info!("a task management function in flight at a restart answered FAILURE");
            let used_len = scatter(mem, &writable, &[response::FAILURE]).unwrap_or(0) as u32;
            done.push(Completed { head, used_len });
        } else {
            self.answer(head, &readable, &writable, mem, done);
        }
    }

    fn stats(&self) -> Option<Arc<QueueStats>> {
        Some(Arc::clone(&self.stats))
    }
}
