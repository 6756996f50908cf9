//! Descriptor chains as byte streams.
//!
//! virtio lets a driver frame a request over descriptors any way it likes (virtio 1.x
//! 2.7.4: devices must not assume a particular layout), so requests are handled as a
//! device-readable byte stream followed by a device-writable one. [`Chain`] collects a
//! chain into those two segment lists; the helpers copy bytes out of and into them
//! (`IoBuf::guest` turns them into host iovecs for zero-copy I/O).

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest memory as the transports map it.
pub type Memory = GuestMemoryMmap<()>;

/// A descriptor chain split into its device-readable and device-writable bytes.
#[derive(Debug)]
pub struct Chain {
    /// Head descriptor index, for the used ring.
    pub(crate) head: u16,
    /// Device-readable buffers, in order.
    pub(crate) readable: Vec<Segment>,
    /// Device-writable buffers, in order.
    pub(crate) writable: Vec<Segment>,
    /// A readable descriptor followed a writable one (forbidden by the spec).
    pub(crate) misordered: bool,
}

impl Chain {
    /// Collects a chain. virtio-queue bounds a chain by the queue (or indirect table) size,
    /// so this is bounded too.
    pub(crate) fn collect<M>(chain: DescriptorChain<M>) -> Chain
    where
        M: Deref<Target = Memory>,
    {
        let head = chain.head_index();
        let mut readable = Vec::new();
        let mut writable = Vec::new();
        let mut misordered = false;
        for desc in chain {
            let seg = Segment {
                addr: desc.addr(),
                len: desc.len() as usize,
            };
            if desc.is_write_only() {
                writable.push(seg);
            } else {
                misordered |= !writable.is_empty();
                readable.push(seg);
            }
        }
        Chain {
            head,
            readable,
            writable,
            misordered,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Segment {
    pub(crate) addr: GuestAddress,
    pub(crate) len: usize,
}

/// Splits `segs` after `n` bytes.
pub(crate) fn split_segments(segs: &[Segment], mut n: usize) -> (Vec<Segment>, Vec<Segment>) {
    let mut head = Vec::new();
    let mut tail = Vec::new();
    for s in segs {
        if n == 0 {
            tail.push(*s);
        } else if s.len <= n {
            head.push(*s);
            n -= s.len;
        } else {
            head.push(Segment {
                addr: s.addr,
                len: n,
            });
            tail.push(Segment {
                addr: GuestAddress(s.addr.0.wrapping_add(n as u64)),
                len: s.len - n,
            });
            n = 0;
        }
    }
    (head, tail)
}

pub(crate) fn total(segs: &[Segment]) -> usize {
    segs.iter().map(|s| s.len).sum()
}

/// Reads exactly `buf.len()` bytes gathered from `segs`.
pub(crate) fn gather(mem: &Memory, segs: &[Segment], buf: &mut [u8]) -> Option<()> {
    let mut pos = 0;
    for s in segs {
        if pos == buf.len() {
            break;
        }
        let n = s.len.min(buf.len() - pos);
        mem.read_slice(&mut buf[pos..pos + n], s.addr).ok()?;
        pos += n;
    }
    (pos == buf.len()).then_some(())
}

/// Writes `data` scattered over `segs`; returns bytes written.
pub(crate) fn scatter(mem: &Memory, segs: &[Segment], data: &[u8]) -> Option<usize> {
    let mut pos = 0;
    for s in segs {
        if pos == data.len() {
            break;
        }
        let n = s.len.min(data.len() - pos);
        mem.write_slice(&data[pos..pos + n], s.addr).ok()?;
        pos += n;
    }
    Some(pos)
}
