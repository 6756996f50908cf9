//! vhost-user inflight I/O tracking for split virtqueues (vhost-user spec, "Inflight I/O
//! tracking"; protocol feature INFLIGHT_SHMFD, GET_INFLIGHT_FD / SET_INFLIGHT_FD).
//!
//! Why: a daemon that dies leaves requests it had accepted but not completed. Without this
//! area the frontend can only rewind the avail index to the used index (QEMU does when
//! GET_VRING_BASE fails), which is right only if requests completed in order: with request A
//! still in flight and a later B completed, B would be completed twice and A never.
//!
//! The frontend keeps the area (a memfd this daemon creates at GET_INFLIGHT_FD) for as long
//! as the guest runs and hands it to every new connection with SET_INFLIGHT_FD. Each queue
//! has one region, `QueueRegionSplit`, with libvhost-user's stride
//! (`vu_inflight_queue_size`: 16 bytes per descriptor + 2, rounded up to 64):
//!
//! | offset | field |
//! |---|---|
//! | 0 | le64 features (0) |
//! | 8 | le16 version (1; 0 = not initialised) |
//! | 10 | le16 desc_num (the queue size) |
//! | 12 | le16 last_batch_head |
//! | 14 | le16 used_idx |
//! | 16 + 16 i | `DescStateSplit` of descriptor i: u8 inflight, 5 bytes padding, le16 next, le64 counter |
//!
//! The worker of a queue marks a head in flight (with the next value of its counter) when
//! it pops the chain, before any of its I/O is submitted. To publish completions it first
//! links them into the "last batch" list (so that the list, read from `last_batch_head`,
//! follows the order they go on the used ring), then puts them on the used ring, then clears
//! their marks and stores the used index. On reconnect ([`InflightQueue::recover`]) a
//! difference between the stored and the ring's used index says how many entries of the
//! last batch reached the used ring before the crash; their marks are cleared, and every
//! head still marked is re-run, oldest counter first; the next avail index is the used
//! index plus their number.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};
use targets::blk::Memory;
use vhost::vhost_user::message::VhostUserInflight;
use virtio_queue::{DescriptorChain, Queue, QueueState};
use vm_memory::{
    Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestRegionMmap, MmapRegion,
    VolatileMemory,
};

use crate::backend::VirtioBackend;
use crate::relay::InflightFds;

/// Header of a queue region, bytes.
const HEADER: usize = 16;
/// One `DescStateSplit`, bytes.
const DESC_STATE: usize = 16;
/// Alignment of each queue region (libvhost-user `INFLIGHT_ALIGNMENT`).
const ALIGNMENT: u64 = 64;
/// The region version this daemon writes.
const VERSION: u16 = 1;
/// Field offsets in the header.
const VERSION_AT: usize = 8;
const DESC_NUM_AT: usize = 10;
const LAST_BATCH_HEAD_AT: usize = 12;
const USED_IDX_AT: usize = 14;
/// Field offsets in a `DescStateSplit`.
const INFLIGHT_AT: usize = 0;
const NEXT_AT: usize = 6;
const COUNTER_AT: usize = 8;

/// Bytes one queue's region takes for `queue_size` descriptors (libvhost-user's stride).
pub fn queue_region_size(queue_size: u16) -> u64 {
    let raw = DESC_STATE as u64 * u64::from(queue_size) + 2;
    raw.div_ceil(ALIGNMENT) * ALIGNMENT
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what)
}

/// The inflight area of one frontend, mapped.
pub struct InflightArea {
    map: Arc<MmapRegion<()>>,
    num_queues: u16,
    queue_size: u16,
}

impl InflightArea {
    /// GET_INFLIGHT_FD: a zeroed, size-sealed memfd for `num_queues` queues of `queue_size`
    /// descriptors; returns it and its size in bytes.
    pub fn create(num_queues: u16, queue_size: u16) -> io::Result<(File, u64)> {
        if num_queues == 0 || queue_size == 0 {
            return Err(invalid(format!(
                "an inflight area for {num_queues} queues of {queue_size}"
            )));
        }
        let size = queue_region_size(queue_size) * u64::from(num_queues);
        let fd = memfd_create(
            c"vhost-appliance-inflight",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )?;
        let file = File::from(fd);
        file.set_len(size)?;
        // The frontend cannot shrink it under a mapping (a SIGBUS here).
        fcntl(
            file.as_fd(),
            FcntlArg::F_ADD_SEALS(
                SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_SEAL,
            ),
        )?;
        Ok((file, size))
    }

    /// SET_INFLIGHT_FD: maps the area of `num_queues` queues of `queue_size` descriptors at
    /// `mmap_offset` of `file` (`mmap_size` bytes announced).
    ///
    /// A regular file (a memfd) must be long enough and, if it can be sealed, sealed against
    /// shrinking, or a frontend could truncate it under the mapping. Other files (the VFIO
    /// device of a virtio-vhost-user BAR) are trusted to stay mapped.
    pub fn map(
        file: File,
        mmap_size: u64,
        mmap_offset: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> io::Result<Self> {
        let needed = queue_region_size(queue_size) * u64::from(num_queues);
        if num_queues == 0 || queue_size == 0 || mmap_size < needed {
            return Err(invalid(format!(
                "an inflight area of {mmap_size} bytes for {num_queues} queues of {queue_size} (needs {needed})"
            )));
        }
        let meta = file.metadata()?;
        if meta.file_type().is_file() {
            let end = mmap_offset.checked_add(needed);
            if end.is_none_or(|end| end > meta.len()) {
                return Err(invalid(format!(
                    "the inflight file has {} bytes, the area needs {needed} at {mmap_offset}",
                    meta.len()
                )));
            }
            if let Ok(seals) = fcntl(file.as_fd(), FcntlArg::F_GET_SEALS) {
                if SealFlag::from_bits_truncate(seals).contains(SealFlag::F_SEAL_SHRINK) {
                    // Cannot shrink: safe to map.
                } else {
                    return Err(invalid(
                        "the inflight memfd is not sealed against shrinking".into(),
                    ));
                }
            }
        }
        let len = usize::try_from(needed).map_err(|_| invalid("inflight area too large".into()))?;
        let map = MmapRegion::from_file(FileOffset::new(file, mmap_offset), len)
            .map_err(|e| io::Error::other(format!("cannot map the inflight area: {e}")))?;
        let area = InflightArea {
            map: Arc::new(map),
            num_queues,
            queue_size,
        };
        for q in 0..usize::from(num_queues) {
            if let Some(queue) = area.queue(q) {
                // As libvhost-user does: the frontend's queue size is authoritative.
                queue.store(DESC_NUM_AT, queue_size);
            }
        }
        Ok(area)
    }

    /// The region of queue `index`, if the area has one.
    pub fn queue(&self, index: usize) -> Option<InflightQueue> {
        if index >= usize::from(self.num_queues) {
            return None;
        }
        let stride = usize::try_from(queue_region_size(self.queue_size)).ok()?;
        Some(InflightQueue {
            map: Arc::clone(&self.map),
            base: index * stride,
            desc_num: self.queue_size,
            counter: 0,
        })
    }
}

/// One queue's region of an [`InflightArea`], used by that queue's worker only.
pub struct InflightQueue {
    map: Arc<MmapRegion<()>>,
    /// Byte offset of the region in the mapping.
    base: usize,
    /// Descriptors tracked: heads at or above it are not.
    desc_num: u16,
    /// Value the next accepted head gets (orders re-runs).
    counter: u64,
}

impl InflightQueue {
    // Offsets are below `base + queue_region_size(desc_num)`, inside the mapping by
    // construction, and naturally aligned, so the accesses cannot fail; a failure is logged.
    fn store<T: vm_memory::AtomicAccess>(&self, at: usize, value: T) {
        if let Err(e) = self
            .map
            .as_volatile_slice()
            .store(value, self.base + at, Ordering::Release)
        {
            tracing::error!("inflight area write at {at}: {e}");
        }
    }

    fn load<T: vm_memory::AtomicAccess + Default>(&self, at: usize) -> T {
        self.map
            .as_volatile_slice()
            .load(self.base + at, Ordering::Acquire)
            .unwrap_or_default()
    }

    fn desc(head: u16, field: usize) -> usize {
        HEADER + DESC_STATE * usize::from(head) + field
    }

    /// Records that the chain headed by `head` was accepted (before its I/O is submitted).
    pub fn begin(&mut self, head: u16) {
        if head >= self.desc_num {
            return;
        }
        self.store(Self::desc(head, COUNTER_AT), self.counter.to_le());
        self.counter += 1;
        self.store(Self::desc(head, INFLIGHT_AT), 1u8);
    }

    /// Before the used ring is updated: links `heads`, in the order they go on the used ring,
    /// into the last-batch list (the first one at `last_batch_head`).
    pub fn prepare_batch(&self, heads: &[u16]) {
        let mut last = self.load::<u16>(LAST_BATCH_HEAD_AT);
        for &head in heads.iter().rev().filter(|&&h| h < self.desc_num) {
            self.store(Self::desc(head, NEXT_AT), last);
            last = head.to_le();
        }
        self.store(LAST_BATCH_HEAD_AT, last);
        fence(Ordering::SeqCst);
    }

    /// After the used ring is updated (its index now `used_idx`): clears the marks of
    /// `heads` and records the index.
    pub fn finish_batch(&self, heads: &[u16], used_idx: u16) {
        fence(Ordering::SeqCst);
        for &head in heads.iter().filter(|&&h| h < self.desc_num) {
            self.store(Self::desc(head, INFLIGHT_AT), 0u8);
        }
        fence(Ordering::SeqCst);
        self.store(USED_IDX_AT, used_idx.to_le());
    }

    /// On (re)connection, with the used ring's index `used_idx` as the driver sees it:
    /// repairs the region after a crash inside a batch and returns the heads to re-run, by
    /// ascending counter. A region never initialised (version 0) is initialised instead.
    pub fn recover(&mut self, used_idx: u16) -> Vec<u16> {
        self.counter = 0;
        if self.load::<u16>(VERSION_AT) == 0 {
            self.store(VERSION_AT, VERSION.to_le());
            self.store(USED_IDX_AT, used_idx.to_le());
            return Vec::new();
        }
        let recorded = u16::from_le(self.load(USED_IDX_AT));
        if recorded != used_idx {
            // The crash came between the used-ring update and the end of `finish_batch`:
            // the first `published` entries of the last batch are on the used ring.
            let mut published = used_idx.wrapping_sub(recorded);
            let mut head = u16::from_le(self.load(LAST_BATCH_HEAD_AT));
            while published > 0 && head < self.desc_num {
                self.store(Self::desc(head, INFLIGHT_AT), 0u8);
                head = u16::from_le(self.load(Self::desc(head, NEXT_AT)));
                published -= 1;
            }
            self.store(USED_IDX_AT, used_idx.to_le());
        }
        let mut marked: Vec<(u64, u16)> = (0..self.desc_num)
            .filter(|&h| self.load::<u8>(Self::desc(h, INFLIGHT_AT)) == 1)
            .map(|h| (u64::from_le(self.load(Self::desc(h, COUNTER_AT))), h))
            .collect();
        marked.sort_unstable();
        self.counter = marked.last().map_or(0, |&(c, _)| c.wrapping_add(1));
        marked.into_iter().map(|(_, h)| h).collect()
    }
}

/// Runs `f` on the descriptor chain headed by `head` in the descriptor table of `queue`
/// (a chain accepted before a restart, so no longer in the avail ring).
///
/// virtio-queue builds chains only from avail-ring entries, so this reads the chain
/// through a one-entry avail ring of its own: a private page placed in a copy of the
/// guest memory table just past its last byte. Only the descriptors are read through that
/// table; the request's data goes through `mem` as always.
pub fn with_chain<R>(
    mem: &Memory,
    queue: QueueState,
    head: u16,
    f: impl FnOnce(DescriptorChain<&Memory>) -> R,
) -> io::Result<R> {
    const PAGE: u64 = 4096;
    let base = mem
        .last_addr()
        .raw_value()
        .checked_add(1)
        .and_then(|a| a.checked_next_multiple_of(PAGE))
        .filter(|a| a.checked_add(PAGE).is_some())
        .ok_or_else(|| io::Error::other("no room above guest memory for a private avail ring"))?;
    let page = MmapRegion::new(PAGE as usize)
        .map_err(|e| io::Error::other(format!("cannot map a private avail ring: {e}")))?;
    let region = GuestRegionMmap::new(page, GuestAddress(base))
        .ok_or_else(|| io::Error::other("private avail ring region"))?;
    // struct virtq_avail { le16 flags; le16 idx; le16 ring[] }: one entry, `head`.
    let avail = GuestAddress(base);
    let with_ring = mem
        .insert_region(Arc::new(region))
        .map_err(|e| io::Error::other(format!("private avail ring: {e}")))?;
    with_ring
        .write_obj(1u16.to_le(), avail.unchecked_add(2))
        .and_then(|()| with_ring.write_obj(head.to_le(), avail.unchecked_add(4)))
        .map_err(|e| io::Error::other(format!("private avail ring: {e}")))?;
    let state = QueueState {
        avail_ring: base,
        next_avail: 0,
        ..queue
    };
    let mut replay = Queue::try_from(state)
        .map_err(|e| io::Error::other(format!("the queue cannot be replayed: {e}")))?;
    let chain = virtio_queue::QueueT::pop_descriptor_chain(&mut replay, &with_ring)
        .ok_or_else(|| io::Error::other("the private avail ring yielded no chain"))?;
    Ok(f(chain))
}

impl InflightFds for VirtioBackend {
    fn get_inflight_fd(
        &self,
        request: &VhostUserInflight,
    ) -> io::Result<(VhostUserInflight, File)> {
        let (file, size) = InflightArea::create(request.num_queues, request.queue_size)?;
        Ok((
            VhostUserInflight::new(size, 0, request.num_queues, request.queue_size),
            file,
        ))
    }

    fn set_inflight_fd(&self, area: &VhostUserInflight, file: File) -> io::Result<()> {
        let area = InflightArea::map(
            file,
            area.mmap_size,
            area.mmap_offset,
            area.num_queues,
            area.queue_size,
        )?;
        self.set_inflight(Some(&area));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn area(queues: u16, size: u16) -> InflightArea {
        let (file, len) = InflightArea::create(queues, size).unwrap();
        InflightArea::map(file, len, 0, queues, size).unwrap()
    }

    #[test]
    fn region_stride_holds_header_and_descriptors_as_libvhost_user_lays_it_out() {
        assert_eq!(queue_region_size(128), 2112);
        for size in 1..=1024u16 {
            let stride = queue_region_size(size);
            assert!(stride >= (HEADER + DESC_STATE * usize::from(size)) as u64);
            assert_eq!(stride % ALIGNMENT, 0);
        }
    }

    #[test]
    fn a_fresh_area_is_initialised_and_has_nothing_to_rerun() {
        let a = area(2, 8);
        let mut q = a.queue(1).unwrap();
        assert!(q.recover(5).is_empty());
        assert_eq!(q.load::<u16>(VERSION_AT), 1);
        assert_eq!(q.load::<u16>(DESC_NUM_AT), 8);
        assert_eq!(q.load::<u16>(USED_IDX_AT), 5);
        assert!(a.queue(2).is_none());
    }

    #[test]
    fn out_of_order_completion_leaves_exactly_the_older_request_marked() {
        let a = area(1, 8);
        let mut q = a.queue(0).unwrap();
        q.recover(0);
        q.begin(3); // A
        q.begin(5); // B
        q.begin(1); // C
                    // B completes first.
        q.prepare_batch(&[5]);
        q.finish_batch(&[5], 1);
        // "Restart": a new view of the same memory.
        let mut again = a.queue(0).unwrap();
        assert_eq!(again.recover(1), vec![3, 1]);
        // New heads are ordered after the ones re-run.
        again.begin(6);
        let mut third = a.queue(0).unwrap();
        assert_eq!(third.recover(1), vec![3, 1, 6]);
    }

    #[test]
    fn a_crash_inside_a_batch_clears_only_what_reached_the_used_ring() {
        let a = area(1, 8);
        let mut q = a.queue(0).unwrap();
        q.recover(10);
        for head in [0, 1, 2, 3] {
            q.begin(head);
        }
        // Batch [2, 0, 3] prepared; the crash comes after two of them went on the used
        // ring (used index 10 -> 12) and before any mark was cleared.
        q.prepare_batch(&[2, 0, 3]);
        let mut again = a.queue(0).unwrap();
        assert_eq!(again.recover(12), vec![1, 3]);
        assert_eq!(u16::from_le(again.load(USED_IDX_AT)), 12);
        // Nothing published since: a second restart finds the same.
        let mut third = a.queue(0).unwrap();
        assert_eq!(third.recover(12), vec![1, 3]);
    }

    #[test]
    fn a_crash_after_the_used_index_was_recorded_needs_no_repair() {
        let a = area(1, 4);
        let mut q = a.queue(0).unwrap();
        q.recover(u16::MAX);
        q.begin(0);
        q.begin(1);
        q.prepare_batch(&[1, 0]);
        q.finish_batch(&[1, 0], 1); // used index wrapped to 1
        let mut again = a.queue(0).unwrap();
        assert!(again.recover(1).is_empty());
    }

    #[test]
    fn heads_beyond_the_tracked_size_are_ignored() {
        let a = area(1, 4);
        let mut q = a.queue(0).unwrap();
        q.recover(0);
        q.begin(9);
        q.prepare_batch(&[9]);
        q.finish_batch(&[9], 1);
        assert!(a.queue(0).unwrap().recover(1).is_empty());
    }

    #[test]
    fn a_chain_is_rebuilt_from_its_head_without_the_avail_ring() {
        use vm_memory::GuestMemoryMmap;
        let mem: Memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        // Descriptor table at 0x1000, 8 entries: head 3 -> 5 (NEXT), 5 writable.
        let desc = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
            let at = GuestAddress(0x1000 + 16 * i);
            mem.write_obj(addr, at).unwrap();
            mem.write_obj(len, at.unchecked_add(8)).unwrap();
            mem.write_obj(flags, at.unchecked_add(12)).unwrap();
            mem.write_obj(next, at.unchecked_add(14)).unwrap();
        };
        desc(3, 0x8000, 16, 1, 5);
        desc(5, 0x9000, 512, 2, 0);
        let state = QueueState {
            max_size: 8,
            size: 8,
            ready: true,
            desc_table: 0x1000,
            // The real avail ring says nothing about head 3.
            avail_ring: 0x2000,
            used_ring: 0x3000,
            next_avail: 0,
            next_used: 0,
            event_idx_enabled: false,
        };
        let (head, lens) = with_chain(&mem, state, 3, |chain| {
            let head = chain.head_index();
            (
                head,
                chain
                    .map(|d| (d.len(), d.is_write_only()))
                    .collect::<Vec<_>>(),
            )
        })
        .unwrap();
        assert_eq!(head, 3);
        assert_eq!(lens, vec![(16, false), (512, true)]);
    }

    #[test]
    fn a_short_or_unsealed_file_is_refused() {
        let (file, len) = InflightArea::create(1, 8).unwrap();
        assert!(InflightArea::map(file.try_clone().unwrap(), len, 64, 1, 8).is_err());
        assert!(InflightArea::map(file, len - 1, 0, 1, 8).is_err());
        let fd = memfd_create(c"unsealed", MFdFlags::MFD_CLOEXEC).unwrap();
        let unsealed = File::from(fd);
        unsealed.set_len(4096).unwrap();
        assert!(InflightArea::map(unsealed, 4096, 0, 1, 8).is_err());
    }
}
