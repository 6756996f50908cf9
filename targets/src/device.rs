//! What a transport (vhost-user today, virtio-vhost-user next) needs of a virtio device:
//! [`VirtioDevice`] for feature bits and config space, and one [`QueueHandler`] per
//! virtqueue that turns descriptor chains into [`Completed`] used-ring entries.

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

use virtio_queue::DescriptorChain;

use crate::chain::Memory;
use crate::guest::GuestRam;
use crate::stats::QueueStats;

/// A request the transport must put on the used ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completed {
    /// Head descriptor index.
    pub head: u16,
    /// Bytes written into the chain's writable buffers.
    pub used_len: u32,
}

/// A driver write to the configuration space that the device refuses.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigWriteError {
    /// The write touches a field the driver may not change (virtio-blk: everything but
    /// `writeback`, offset 32, 1 byte).
    #[error("config write of {len} bytes at offset {offset} touches a read-only field")]
    ReadOnlyField {
        /// Offset written, in bytes.
        offset: u32,
        /// Bytes written.
        len: usize,
    },
    /// virtio-blk `writeback` takes 0 (writethrough) or 1 (writeback).
    #[error("writeback value {0} is not 0 or 1")]
    BadValue(u8),
    /// The new write cache mode could not be saved for a restart, so it is not applied.
    #[error("the write cache mode could not be saved: {0}")]
    NotSaved(String),
    /// virtio-scsi: `sense_size` and `cdb_size` are writable, but only their defaults are
    /// supported.
    #[error("config write of {len} bytes at offset {offset}: only the default sense_size {sense_size} and cdb_size {cdb_size} are supported")]
    UnsupportedSize {
        /// Offset written, in bytes.
        offset: u32,
        /// Bytes written.
        len: usize,
        /// The supported `sense_size`, in bytes.
        sense_size: usize,
        /// The supported `cdb_size`, in bytes.
        cdb_size: usize,
    },
}

/// A virtio device as a whole: shared by all of its queues.
pub trait VirtioDevice: Send + Sync {
    /// Number of virtqueues.
    fn num_queues(&self) -> usize;
    /// Largest virtqueue size a driver may choose.
    fn max_queue_size(&self) -> u16;
    /// virtio feature bits offered.
    fn features(&self) -> u64;
    /// Records the features the driver accepted.
    fn set_acked_features(&self, features: u64);
    /// The device-specific configuration space.
    fn config_space(&self) -> Vec<u8>;
    /// Applies a driver write to the configuration space.
    fn write_config(&self, offset: u32, data: &[u8]) -> Result<(), ConfigWriteError>;
    /// A new driver session starts (a frontend connected, or the device was reset).
    fn session_started(&self) {}
    /// Whether frontends should read the config space from the backend (vhost-user
    /// CONFIG); false where the frontend keeps its own.
    fn offers_config(&self) -> bool {
        true
    }
    /// The logical units the device exposes, by LUN number, with their current capacity in
    /// bytes (virtio-blk: one, LUN 0). Read by the metrics collector at scrape time.
    fn lun_capacities(&self) -> Vec<(u16, u64)> {
        Vec::new()
    }
}

/// The request handler of one virtqueue, owned by that queue's worker thread.
pub trait QueueHandler: Send {
    /// Handles one chain over guest memory `mem` (which says whether the kernel can do
    /// direct I/O on it): queues disk I/O, or completes it at once into `done`.
    fn handle_chain(
        &mut self,
        chain: DescriptorChain<&Memory>,
        mem: &GuestRam,
        done: &mut Vec<Completed>,
    );
    /// Handles a chain accepted before a restart of the device (a daemon that crashed, as
    /// the vhost-user inflight area records) and never completed: runs it again, unless the
    /// queue says otherwise (a virtio-scsi task management function is not re-run).
    fn resubmit_chain(
        &mut self,
        chain: DescriptorChain<&Memory>,
        mem: &GuestRam,
        done: &mut Vec<Completed>,
    ) {
        self.handle_chain(chain, mem, done);
    }
    /// Hands queued disk I/O to the kernel.
    fn submit(&mut self) -> io::Result<()> {
        Ok(())
    }
    /// Collects requests whose disk I/O finished.
    fn reap(&mut self, _done: &mut Vec<Completed>) {}
    /// Waits for every in-flight request and collects them.
    fn drain(&mut self, _done: &mut Vec<Completed>) -> io::Result<()> {
        Ok(())
    }
    /// Readable when disk completions are ready; `None` for queues without disk I/O.
    fn completion_fd(&self) -> Option<RawFd> {
        None
    }
    /// Whether this queue busy-polls when its export has `poll:`: queues of requests with
    /// disk I/O do; virtio-scsi's control and event queues do not.
    fn polls(&self) -> bool {
        false
    }
    /// Whether disk completions wait to be reaped (a busy-polling worker asks this instead
    /// of sleeping on [`QueueHandler::completion_fd`]).
    fn poll_ready(&mut self) -> bool {
        false
    }
    /// Stops (`false`) or restarts signalling [`QueueHandler::completion_fd`] while the
    /// worker busy-polls; after restarting, ask [`QueueHandler::poll_ready`] once more.
    fn set_completion_notify(&mut self, _enabled: bool) {}
    /// The transport has put every request collected into `done` so far on the used ring
    /// (or dropped them with the ring).
    fn published(&mut self) {}
    /// The control path changed the device (e.g. its LUNs): take the change over,
    /// completing into `done` whatever it ends. Called with the queue's worker stopped.
    fn refresh(&mut self, _done: &mut Vec<Completed>) {}
    /// This queue's counters, shared with the metrics collector (which sums them at scrape
    /// time); `None` for a queue that keeps none.
    fn stats(&self) -> Option<Arc<QueueStats>> {
        None
    }
}
