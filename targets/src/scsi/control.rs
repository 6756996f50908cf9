//! The virtio-scsi control queue (queue 0): task management functions, answered once the
//! I/O they affect has completed, and asynchronous notification requests (none supported).

use std::sync::Arc;

use virtio_queue::DescriptorChain;

use super::luns::LunSlot;
use super::sense::Sense;
use super::virtio::{decode_lun, response, ScsiDevice};
use crate::chain::{gather, scatter, total, Chain, Memory};
use crate::device::{Completed, QueueHandler};
use crate::stats::{bump, QueueStats, TMF_FUNCTIONS};

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

    /// Answers a TMF. In-flight commands cannot be taken back from the kernel: an abort or
    /// reset waits until the commands it affects have completed (normally) and are on
    /// their used rings, as virtio-scsi requires of a completed TMF, then answers. If that
    /// takes longer than the TMF timeout, it answers FAILURE and the initiator escalates.
    fn tmf(&self, req: &[u8]) -> u8 {
        let subtype = u32::from_le_bytes([req[4], req[5], req[6], req[7]]);
        let function = (subtype as usize).min(TMF_FUNCTIONS.len() - 1);
        if let Some(count) = self.stats.tmf.get(function) {
            bump(count, 1);
        }
        let mut lun = [0u8; 8];
        lun.copy_from_slice(&req[8..16]);
        let table = self.device.luns();
        let index = decode_lun(&lun).and_then(|id| table.find(id).cloned());
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
            // ABORT TASK, ABORT TASK SET, CLEAR TASK SET
            0 | 1 | 3 => match index {
                Some(i) => settle(&[i], response::FUNCTION_COMPLETE),
                None => response::INCORRECT_LUN,
            },
            // I_T NEXUS RESET
            4 => {
                let all: Vec<Arc<LunSlot>> = table.iter().cloned().collect();
                let answer = settle(&all, response::FUNCTION_SUCCEEDED);
                self.device.set_unit_attention(None, Sense::I_T_NEXUS_LOSS);
                answer
            }
            // LOGICAL UNIT RESET
            5 => match index {
                Some(i) => {
                    let answer = settle(std::slice::from_ref(&i), response::FUNCTION_SUCCEEDED);
                    i.set_unit_attention(Sense::LUN_RESET_OCCURRED);
                    answer
                }
                None => response::INCORRECT_LUN,
            },
            // QUERY TASK SET: whether the LUN has commands in flight. QUERY TASK would need
            // the tag, which is not tracked: it reports none.
            6 | 7 => match index {
                Some(i) if subtype == 7 && i.busy() > 0 => response::FUNCTION_SUCCEEDED,
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
        mem: &Arc<Memory>,
        done: &mut Vec<Completed>,
    ) {
        let Chain {
            head,
            readable,
            writable,
            ..
        } = Chain::collect(chain);
        let mut req = [0u8; 24];
        let req_len = total(&readable).min(req.len());
        let req_ok = gather(mem, &readable, &mut req[..req_len]).is_some();
        let kind = u32::from_le_bytes([req[0], req[1], req[2], req[3]]);
        let reply: Vec<u8> = match kind {
            // VIRTIO_SCSI_T_TMF
            0 if req_ok && req_len >= 24 => vec![self.tmf(&req)],
            // VIRTIO_SCSI_T_AN_QUERY / AN_SUBSCRIBE: no asynchronous events are supported.
            1 | 2 if req_ok && req_len >= 16 => {
                let mut r = 0u32.to_le_bytes().to_vec();
                r.push(response::OK);
                r
            }
            _ => {
                tracing::debug!(kind, req_len, "malformed control request");
                if total(&writable) >= 5 {
                    let mut r = vec![0u8; 4];
                    r.push(response::FAILURE);
                    r
                } else {
                    vec![response::FAILURE]
                }
            }
        };
        let used_len = scatter(mem, &writable, &reply).unwrap_or(0) as u32;
        done.push(Completed { head, used_len });
    }

    fn stats(&self) -> Option<Arc<QueueStats>> {
        Some(Arc::clone(&self.stats))
    }
}
