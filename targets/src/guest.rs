//! Guest memory as a transport hands it in ([`GuestRam`]), and the one decision of whether
//! a request's data goes to the disk straight from guest memory or through a bounce buffer
//! (`data_buffer`).
//!
//! Whether the kernel can do direct I/O on guest memory is a property of that memory, set
//! by the transport that maps it: a vhost-user frontend's shared memory can be pinned; the
//! consumer's memory seen through a virtio-vhost-user PCI BAR (appliance-VM mode) is
//! PFN-mapped and cannot (O_DIRECT on it fails with EFAULT), so O_DIRECT disks bounce every
//! request there.

use std::ops::Deref;
use std::sync::Arc;

use crate::chain::{gather, Memory, Segment};
use crate::disk::DirectAlignment;
use crate::iobuf::{AlignedBuf, IoBuf};

/// A guest memory table, and whether the kernel can pin it for direct I/O.
#[derive(Debug, Clone)]
pub struct GuestRam {
    map: Arc<Memory>,
    pinnable: bool,
}

impl GuestRam {
    /// Ordinary shared memory (a vhost-user frontend's memfd or file mappings): the
    /// kernel can do direct I/O on it.
    pub fn new(map: Arc<Memory>) -> Self {
        GuestRam {
            map,
            pinnable: true,
        }
    }

    /// Memory the kernel cannot pin: a PFN-mapped PCI BAR (appliance-VM mode). Direct
    /// I/O always goes through a bounce buffer.
    pub fn unpinnable(map: Arc<Memory>) -> Self {
        GuestRam {
            map,
            pinnable: false,
        }
    }

    /// The memory table, shared.
    pub fn map(&self) -> &Arc<Memory> {
        &self.map
    }

    /// Whether the kernel can do direct I/O on this memory.
    pub fn pinnable(&self) -> bool {
        self.pinnable
    }
}

impl Deref for GuestRam {
    type Target = Memory;

    fn deref(&self) -> &Memory {
        &self.map
    }
}

/// The buffer a read into or a write from guest segments `segs` does its I/O on, and
/// whether it bounces (a read's data must then be copied to the guest on completion):
///
/// - buffered I/O (`direct` is `None`): guest memory itself;
/// - O_DIRECT on pinnable memory whose buffers meet the kernel's alignment: guest memory;
/// - otherwise an aligned bounce buffer of the same length, filled from the guest for a
///   write.
///
/// `None` when the segments are not all in guest memory or the buffer cannot be allocated.
pub(crate) fn data_buffer(
    ram: &GuestRam,
    segs: &[Segment],
    direct: Option<DirectAlignment>,
    write: bool,
) -> Option<(IoBuf, bool)> {
    let guest = IoBuf::guest(ram.map(), segs)?;
    let Some(direct) = direct else {
        return Some((guest, false));
    };
    // Nothing to transfer: nothing to bounce either (an allocation is never empty).
    if guest.is_empty() || (ram.pinnable() && guest.aligned_to(direct.memory)) {
        return Some((guest, false));
    }
    let mut bounce = AlignedBuf::new(guest.len(), direct.memory)?;
    if write {
        gather(ram, segs, bounce.as_mut_slice())?;
    }
    Some((IoBuf::owned(bounce), true))
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;

    use super::*;

    #[test]
    fn bounce_only_misaligned_buffers_unless_guest_memory_cannot_be_pinned() {
        let map = Arc::new(Memory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap());
        let direct = Some(DirectAlignment {
            memory: 512,
            offset: 512,
        });
        let seg = |addr, len| {
            [Segment {
                addr: GuestAddress(addr),
                len,
            }]
        };
        let ram = GuestRam::new(Arc::clone(&map));
        let bounced = |ram: &GuestRam, segs: &[Segment], direct| {
            data_buffer(ram, segs, direct, true).map(|(_, bounced)| bounced)
        };
        assert_eq!(bounced(&ram, &seg(0x1001, 4096), None), Some(false));
        assert_eq!(bounced(&ram, &seg(0x1000, 4096), direct), Some(false));
        assert_eq!(bounced(&ram, &seg(0x1001, 4096), direct), Some(true));
        let bar = GuestRam::unpinnable(map);
        assert_eq!(bounced(&bar, &seg(0x1000, 4096), direct), Some(true));
        assert_eq!(bounced(&bar, &seg(0x1000, 4096), None), Some(false));
        assert_eq!(
            bounced(&ram, &seg(0xf000, 0x2000), None),
            None,
            "past the end"
        );
    }
}
