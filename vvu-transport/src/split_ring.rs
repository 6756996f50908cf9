//! The driver side of a virtio split virtqueue (virtio 1.x §2.7): the driver owns the
//! descriptor table and the available ring, the device fills the used ring.
//!
//! Addresses are device-visible addresses in a [`GuestMemoryMmap`]: guest-physical addresses
//! for a vhost-user test frontend, IOVAs for the virtio-vhost-user driver's rxq/txq. The ring
//! never trusts what the device writes: a used element naming a descriptor that is not in
//! flight is reported as an error, not followed.

use std::sync::atomic::Ordering;

use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

/// Size of one descriptor.
const DESC_SIZE: u64 = 16;

/// Errors of driver-side ring operations.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RingError {
    /// Queue sizes are powers of two from 1 to 32768.
    #[error("queue size {0} is not a power of two in 1..=32768")]
    BadSize(u16),
    /// Not enough free descriptors for the chain.
    #[error("{wanted} descriptors wanted, {free} free")]
    Full {
        /// Descriptors the chain needs.
        wanted: usize,
        /// Descriptors free.
        free: usize,
    },
    /// A chain needs at least one descriptor.
    #[error("empty descriptor chain")]
    EmptyChain,
    /// Ring memory is not inside the memory map.
    #[error("ring memory at {0:#x} is not accessible")]
    Memory(u64),
    /// The device returned a descriptor id that is not in flight.
    #[error("device returned descriptor {0}, which is not in flight")]
    BogusUsed(u32),
}

/// One buffer of a chain as the driver describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffer {
    /// Device-visible address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// The device writes it (else it reads it).
    pub device_writable: bool,
}

impl Buffer {
    /// A buffer the device reads.
    pub fn readable(addr: u64, len: u32) -> Self {
        Buffer {
            addr,
            len,
            device_writable: false,
        }
    }

    /// Its descriptor flags (NEXT aside).
    fn flags(&self) -> u16 {
        if self.device_writable {
            VRING_DESC_F_WRITE as u16
        } else {
            0
        }
    }

    /// A buffer the device writes.
    pub fn writable(addr: u64, len: u32) -> Self {
        Buffer {
            addr,
            len,
            device_writable: true,
        }
    }
}

/// Byte sizes of the three ring areas for `size` entries (no EVENT_IDX fields used, but
/// space reserved for them as the spec lays out).
pub fn ring_sizes(size: u16) -> (u64, u64, u64) {
    let n = u64::from(size);
    (n * DESC_SIZE, 6 + 2 * n, 6 + 8 * n)
}

/// A driver-side split virtqueue.
#[derive(Debug)]
pub struct SplitRing {
    size: u16,
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    free: Vec<u16>,
    /// Chain length of each in-flight head (0 = not in flight).
    chain_len: Vec<u16>,
    next_avail: u16,
    last_used: u16,
}

impl SplitRing {
    /// Lays the ring out at `base` (16-byte aligned areas, in order desc/avail/used) and
    /// zeroes it. Returns the ring and the first address after it.
    pub fn new(
        mem: &GuestMemoryMmap,
        base: GuestAddress,
        size: u16,
    ) -> Result<(Self, GuestAddress), RingError> {
        if !size.is_power_of_two() || size > 32768 {
            return Err(RingError::BadSize(size));
        }
        let (desc_len, avail_len, used_len) = ring_sizes(size);
        let align = |a: u64| (a + 15) & !15;
        let desc = base;
        let avail = GuestAddress(align(desc.0 + desc_len));
        let used = GuestAddress(align(avail.0 + avail_len));
        let end = GuestAddress(align(used.0 + used_len));
        let zeroes = vec![0u8; (end.0 - base.0) as usize];
        mem.write_slice(&zeroes, base)
            .map_err(|_| RingError::Memory(base.0))?;
        let ring = SplitRing {
            size,
            desc,
            avail,
            used,
            free: (0..size).rev().collect(),
            chain_len: vec![0; usize::from(size)],
            next_avail: 0,
            last_used: 0,
        };
        Ok((ring, end))
    }

    /// Number of entries.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Descriptor table address.
    pub fn desc_addr(&self) -> GuestAddress {
        self.desc
    }

    /// Available ring address.
    pub fn avail_addr(&self) -> GuestAddress {
        self.avail
    }

    /// Used ring address.
    pub fn used_addr(&self) -> GuestAddress {
        self.used
    }

    /// Free descriptors.
    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Writes a chain of `buffers` and makes it available; returns its head index.
    pub fn add(&mut self, mem: &GuestMemoryMmap, buffers: &[Buffer]) -> Result<u16, RingError> {
        let flags: Vec<u16> = buffers.iter().map(Buffer::flags).collect();
        self.add_with_flags(mem, buffers, &flags)
    }

    /// As [`SplitRing::add`] with explicit descriptor flags (NEXT is managed here): lets a
    /// test driver build chains a well-behaved driver never would.
    pub fn add_with_flags(
        &mut self,
        mem: &GuestMemoryMmap,
        buffers: &[Buffer],
        flags: &[u16],
    ) -> Result<u16, RingError> {
        if buffers.is_empty() {
            return Err(RingError::EmptyChain);
        }
        if buffers.len() > self.free.len() {
            return Err(RingError::Full {
                wanted: buffers.len(),
                free: self.free.len(),
            });
        }
        let ids: Vec<u16> = (0..buffers.len()).filter_map(|_| self.free.pop()).collect();
        let flags: Vec<u16> = (0..buffers.len())
            .map(|i| flags.get(i).copied().unwrap_or(0))
            .collect();
        write_chain(mem, self.desc, &ids, buffers, &flags)?;
        let head = ids[0];
        self.chain_len[usize::from(head)] = buffers.len() as u16;
        let slot = u64::from(self.next_avail % self.size);
        let ring_entry = self.avail.unchecked_add(4 + 2 * slot);
        mem.write_obj(head.to_le(), ring_entry)
            .map_err(|_| RingError::Memory(ring_entry.0))?;
        self.next_avail = self.next_avail.wrapping_add(1);
        // Descriptors and the ring entry must be visible before the new index.
        let idx = self.avail.unchecked_add(2);
        mem.store(self.next_avail.to_le(), idx, Ordering::Release)
            .map_err(|_| RingError::Memory(idx.0))?;
        Ok(head)
    }

    /// Writes `buffers` as an indirect table at `table` (outside the ring) and makes one
    /// descriptor pointing at it available; returns its head.
    pub fn add_indirect(
        &mut self,
        mem: &GuestMemoryMmap,
        table: GuestAddress,
        buffers: &[Buffer],
    ) -> Result<u16, RingError> {
        if buffers.is_empty() {
            return Err(RingError::EmptyChain);
        }
        let ids: Vec<u16> = (0..buffers.len() as u16).collect();
        let flags: Vec<u16> = buffers.iter().map(Buffer::flags).collect();
        write_chain(mem, table, &ids, buffers, &flags)?;
        let table_len = (buffers.len() as u64 * DESC_SIZE) as u32;
        self.add_with_flags(
            mem,
            &[Buffer::readable(table.0, table_len)],
            &[VRING_DESC_F_INDIRECT as u16],
        )
    }

    /// Takes the next used element, if the device published one: `(head, written_len)`.
    pub fn pop_used(&mut self, mem: &GuestMemoryMmap) -> Result<Option<(u16, u32)>, RingError> {
        let idx_at = self.used.unchecked_add(2);
        let used_idx: u16 = mem
            .load(idx_at, Ordering::Acquire)
            .map(u16::from_le)
            .map_err(|_| RingError::Memory(idx_at.0))?;
        if used_idx == self.last_used {
            return Ok(None);
        }
        let slot = u64::from(self.last_used % self.size);
        let elem_at = self.used.unchecked_add(4 + 8 * slot);
        let mut elem = [0u8; 8];
        mem.read_slice(&mut elem, elem_at)
            .map_err(|_| RingError::Memory(elem_at.0))?;
        self.last_used = self.last_used.wrapping_add(1);
        let [i0, i1, i2, i3, l0, l1, l2, l3] = elem;
        let id = u32::from_le_bytes([i0, i1, i2, i3]);
        let len = u32::from_le_bytes([l0, l1, l2, l3]);
        let head = u16::try_from(id)
            .ok()
            .filter(|&h| h < self.size)
            .ok_or(RingError::BogusUsed(id))?;
        let chain_len = std::mem::take(&mut self.chain_len[usize::from(head)]);
        if chain_len == 0 {
            return Err(RingError::BogusUsed(id));
        }
        // Walk the chain to return its descriptors to the free list.
        let mut id = head;
        for _ in 0..chain_len {
            self.free.push(id);
            let at = self.desc.unchecked_add(u64::from(id) * DESC_SIZE + 14);
            id = mem
                .read_obj::<u16>(at)
                .map(u16::from_le)
                .map_err(|_| RingError::Memory(at.0))?;
        }
        Ok(Some((head, len)))
    }
}

/// Writes descriptors `ids[i]` = `buffers[i]` into the table at `table`, linked in order.
fn write_chain(
    mem: &GuestMemoryMmap,
    table: GuestAddress,
    ids: &[u16],
    buffers: &[Buffer],
    flags: &[u16],
) -> Result<(), RingError> {
    for (i, (buffer, &id)) in buffers.iter().zip(ids).enumerate() {
        let mut f = flags.get(i).copied().unwrap_or(0) & !(VRING_DESC_F_NEXT as u16);
        let next = match ids.get(i + 1) {
            Some(&n) => {
                f |= VRING_DESC_F_NEXT as u16;
                n
            }
            None => 0,
        };
        let mut raw = [0u8; DESC_SIZE as usize];
        raw[0..8].copy_from_slice(&buffer.addr.to_le_bytes());
        raw[8..12].copy_from_slice(&buffer.len.to_le_bytes());
        raw[12..14].copy_from_slice(&f.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        let at = table.unchecked_add(u64::from(id) * DESC_SIZE);
        mem.write_slice(&raw, at)
            .map_err(|_| RingError::Memory(at.0))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::{Queue, QueueOwnedT, QueueT};

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn device_queue(ring: &SplitRing) -> Queue {
        let mut q = Queue::new(ring.size()).unwrap();
        q.set_desc_table_address(
            Some(ring.desc_addr().0 as u32),
            Some((ring.desc_addr().0 >> 32) as u32),
        );
        q.set_avail_ring_address(Some(ring.avail_addr().0 as u32), Some(0));
        q.set_used_ring_address(Some(ring.used_addr().0 as u32), Some(0));
        q.set_ready(true);
        q
    }

    /// The driver ring interoperates with virtio-queue's device-side implementation.
    #[test]
    fn chains_round_trip_through_a_device_queue() {
        let mem = memory();
        let (mut ring, end) = SplitRing::new(&mem, GuestAddress(0x1000), 8).unwrap();
        assert!(end.0 > ring.used_addr().0);
        let mut device = device_queue(&ring);
        let head = ring
            .add(
                &mem,
                &[
                    Buffer::readable(0x8000, 16),
                    Buffer::writable(0x9000, 512),
                    Buffer::writable(0xa000, 1),
                ],
            )
            .unwrap();
        assert_eq!(ring.num_free(), 5);
        let chain = device.iter(&mem).unwrap().next().unwrap();
        assert_eq!(chain.head_index(), head);
        let descs: Vec<_> = chain.collect();
        assert_eq!(descs.len(), 3);
        assert!(!descs[0].is_write_only() && descs[1].is_write_only() && descs[2].is_write_only());
        assert_eq!((descs[1].addr().0, descs[1].len()), (0x9000, 512));

        assert_eq!(ring.pop_used(&mem).unwrap(), None);
        device.add_used(&mem, head, 513).unwrap();
        assert_eq!(ring.pop_used(&mem).unwrap(), Some((head, 513)));
        assert_eq!(ring.num_free(), 8);
    }

    #[test]
    fn indirect_chain_is_seen_whole_by_the_device() {
        let mem = memory();
        let (mut ring, _) = SplitRing::new(&mem, GuestAddress(0), 4).unwrap();
        let mut device = device_queue(&ring);
        let buffers: Vec<Buffer> = (0..6)
            .map(|i| Buffer::writable(0x8000 + i * 0x100, 0x100))
            .collect();
        let head = ring
            .add_indirect(&mem, GuestAddress(0x4000), &buffers)
            .unwrap();
        assert_eq!(ring.num_free(), 3, "one ring slot for six buffers");
        let chain = device.iter(&mem).unwrap().next().unwrap();
        assert_eq!(chain.head_index(), head);
        let addrs: Vec<u64> = chain.map(|d| d.addr().0).collect();
        assert_eq!(addrs, buffers.iter().map(|b| b.addr).collect::<Vec<_>>());
        device.add_used(&mem, head, 0).unwrap();
        assert_eq!(ring.pop_used(&mem).unwrap(), Some((head, 0)));
        assert_eq!(ring.num_free(), 4);
    }

    #[test]
    fn full_ring_and_wraparound() {
        let mem = memory();
        let (mut ring, _) = SplitRing::new(&mem, GuestAddress(0), 2).unwrap();
        let mut device = device_queue(&ring);
        for round in 0..5u32 {
            let a = ring.add(&mem, &[Buffer::writable(0x8000, 4)]).unwrap();
            let b = ring.add(&mem, &[Buffer::writable(0x9000, 4)]).unwrap();
            assert_eq!(
                ring.add(&mem, &[Buffer::writable(0xa000, 4)]),
                Err(RingError::Full { wanted: 1, free: 0 })
            );
            let heads: Vec<u16> = device.iter(&mem).unwrap().map(|c| c.head_index()).collect();
            assert_eq!(heads, [a, b], "round {round}");
            device.add_used(&mem, b, round).unwrap();
            device.add_used(&mem, a, round + 1).unwrap();
            assert_eq!(ring.pop_used(&mem).unwrap(), Some((b, round)));
            assert_eq!(ring.pop_used(&mem).unwrap(), Some((a, round + 1)));
        }
    }

    #[test]
    fn bogus_used_ids_are_errors() {
        let mem = memory();
        let (mut ring, _) = SplitRing::new(&mem, GuestAddress(0), 4).unwrap();
        let mut device = device_queue(&ring);
        let head = ring.add(&mem, &[Buffer::writable(0x8000, 4)]).unwrap();
        let _ = device.iter(&mem).unwrap().next();
        // The device names a descriptor that is not in flight.
        device.add_used(&mem, (head + 1) % 4, 0).unwrap();
        assert!(matches!(ring.pop_used(&mem), Err(RingError::BogusUsed(_))));
        assert_eq!(
            SplitRing::new(&mem, GuestAddress(0), 3).unwrap_err(),
            RingError::BadSize(3)
        );
        assert_eq!(ring.add(&mem, &[]), Err(RingError::EmptyChain));
    }
}
