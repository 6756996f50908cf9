//! Guest memory and a split virtqueue in it, written the way a hostile driver may write
//! them: raw descriptors (any flags, lengths, addresses, `next` links, indirect tables),
//! any avail index and heads. Chains are popped with virtio-queue's `pop_descriptor_chain`
//! (what the vhost-user transport calls) and handed to a real [`QueueHandler`]; what it
//! completes goes on the used ring with `add_used`, as the transport does.
//!
//! The format a target reads ([`RingInput::read`]):
//!
//! | field | bytes |
//! | --- | --- |
//! | queue size exponent (size `1 << min(e, 8)`) | 1 |
//! | avail index | 2 |
//! | heads, for `min(avail index, size)` entries | 2 each |
//! | descriptor count `n` (at most the size) | 1 |
//! | descriptors 0..n, `virtq_desc` as on the wire | 16 each |
//! | memory writes: address (u32), blob (u16 length) | until the end |

use std::sync::Arc;

use targets::blk::Memory;
use targets::device::{Completed, QueueHandler};
use targets::guest::GuestRam;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::input::{Input, Output};

/// Where the queue's rings start (descriptor table, then avail and used rings).
pub const RING_BASE: u64 = 0;
/// First byte past the rings of the largest queue (256 entries), page-aligned: buffers
/// in the seeds start here.
pub const DATA_BASE: u64 = 0x4000;

/// Guest memory of the ring targets: `regions` `(address, bytes)`, zeroed for each input.
pub struct Guest {
    /// The memory, shared with the handlers.
    pub mem: Arc<Memory>,
    regions: Vec<(u64, usize)>,
}

impl Guest {
    /// Anonymous memory at these `(guest address, bytes)` ranges.
    pub fn new(regions: &[(u64, usize)]) -> Self {
        let ranges: Vec<(GuestAddress, usize)> =
            regions.iter().map(|&(a, n)| (GuestAddress(a), n)).collect();
        let mem = match Memory::from_ranges(&ranges) {
            Ok(mem) => mem,
            Err(e) => harness_failure("guest memory", e),
        };
        Guest {
            mem: Arc::new(mem),
            regions: regions.to_vec(),
        }
    }

    /// Zeroes every region.
    pub fn reset(&self) {
        for &(addr, len) in &self.regions {
            if let Some((region, offset)) = self.mem.to_region_addr(GuestAddress(addr)) {
                let _ = region.write_slice(&vec![0u8; len], offset);
            }
        }
    }

    /// Zeroes `len` bytes at `addr`.
    pub fn reset_range(&self, addr: u64, len: usize) {
        self.write(addr, &vec![0u8; len]);
    }

    /// Writes what fits of `bytes` at `addr` (a driver can only write its own memory).
    pub fn write(&self, addr: u64, bytes: &[u8]) {
        let _ = self.mem.write(bytes, GuestAddress(addr));
    }

    /// The memory as a handler sees it: pinnable (vhost-user shared memory) or not (a PCI
    /// BAR in appliance-VM mode, where O_DIRECT bounces).
    pub fn ram(&self, pinnable: bool) -> GuestRam {
        if pinnable {
            GuestRam::new(Arc::clone(&self.mem))
        } else {
            GuestRam::unpinnable(Arc::clone(&self.mem))
        }
    }
}

/// A setup step of the harness failed: not a finding about the input.
pub fn harness_failure(what: &str, e: impl std::fmt::Debug) -> ! {
    eprintln!("fuzz harness: {what} failed: {e:?}");
    std::process::abort()
}

/// One ring's worth of driver writes.
#[derive(Debug, Default)]
pub struct RingInput {
    /// Queue size.
    pub size: u16,
    /// The avail ring's `idx`.
    pub avail_idx: u16,
    /// Its heads.
    pub heads: Vec<u16>,
    /// Descriptor table entries from index 0, 16 bytes each.
    pub descriptors: Vec<[u8; 16]>,
    /// Other writes into guest memory: headers, CDBs, indirect tables, data.
    pub writes: Vec<(u64, Vec<u8>)>,
}

impl RingInput {
    /// Reads one from `input` (everything left).
    pub fn read(input: &mut Input<'_>) -> Self {
        let size = 1u16 << input.u8().min(8);
        let avail_idx = input.u16();
        let heads = (0..avail_idx.min(size)).map(|_| input.u16()).collect();
        let n = u16::from(input.u8()).min(size);
        let descriptors = (0..n).map(|_| input.array::<16>()).collect();
        let mut writes = Vec::new();
        while !input.is_empty() {
            let addr = u64::from(input.u32());
            writes.push((addr, input.blob().to_vec()));
        }
        RingInput {
            size,
            avail_idx,
            heads,
            descriptors,
            writes,
        }
    }

    /// Puts it in guest memory, pops every chain and runs it through `handler` (reaping
    /// after each when `interleave`), drains, and puts the completions on the used ring.
    /// Returns the completions.
    pub fn run(
        &self,
        guest: &Guest,
        ram: &GuestRam,
        handler: &mut dyn QueueHandler,
        interleave: bool,
    ) -> Vec<Completed> {
        let mem = &*guest.mem;
        let vq = MockSplitQueue::create(mem, GuestAddress(RING_BASE), self.size);
        for (i, d) in self.descriptors.iter().enumerate() {
            guest.write(vq.desc_table_addr().0 + 16 * i as u64, d);
        }
        let avail = vq.avail_addr().0;
        for (i, head) in self.heads.iter().enumerate() {
            guest.write(avail + 4 + 2 * i as u64, &head.to_le_bytes());
        }
        guest.write(avail + 2, &self.avail_idx.to_le_bytes());
        for (addr, bytes) in &self.writes {
            guest.write(*addr, bytes);
        }
        let mut queue: Queue = match vq.create_queue() {
            Ok(q) => q,
            Err(e) => harness_failure("queue setup", e),
        };
        let mut done = Vec::new();
        // A ring cannot hold more chains than its size; the bound also stops a head that
        // is popped again and again.
        for _ in 0..self.size {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            handler.handle_chain(chain, ram, &mut done);
            if interleave {
                let _ = handler.submit();
                if handler.poll_ready() {
                    handler.reap(&mut done);
                }
            }
        }
        let _ = handler.submit();
        if let Err(e) = handler.drain(&mut done) {
            harness_failure("drain", e);
        }
        for c in &done {
            let _ = queue.add_used(mem, c.head, c.used_len);
        }
        handler.published();
        done
    }

    /// Writes it in the format [`RingInput::read`] reads.
    pub fn write(&self, out: &mut Output) {
        out.u8(self.size.trailing_zeros() as u8);
        out.u16(self.avail_idx);
        for h in &self.heads {
            out.u16(*h);
        }
        out.u8(self.descriptors.len() as u8);
        for d in &self.descriptors {
            out.bytes(d);
        }
        for (addr, bytes) in &self.writes {
            out.u32(*addr as u32);
            out.blob(bytes);
        }
    }
}

/// A `virtq_desc`: address, length, flags, next.
pub fn desc(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    d
}

/// Descriptors `(address, length, device-writable)` linked into one chain from index
/// `first` (as a driver writes a request).
pub fn chain(first: u16, bufs: &[(u64, u32, bool)]) -> Vec<[u8; 16]> {
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    bufs.iter()
        .enumerate()
        .map(|(i, &(addr, len, write))| {
            let i = first + i as u16;
            let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
            let last = usize::from(i - first) + 1 == bufs.len();
            if !last {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            desc(addr, len, flags, if last { 0 } else { i + 1 })
        })
        .collect()
}
