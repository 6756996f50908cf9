//! Pieces the request-level tests share: descriptors for `MockSplitQueue` chains, and a
//! SCSI LUN over a raw disk.

// Each test crate uses its own subset.
#![allow(dead_code)]

use targets::disk::RawDisk;
use targets::scsi::emulation::{Lun, LunSettings};
use targets::scsi::virtio::ScsiLun;
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};

/// A descriptor the device reads.
pub fn readable(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, 0, 0))
}

/// A descriptor the device writes.
pub fn writable(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(
        addr,
        len,
        VRING_DESC_F_WRITE as u16,
        0,
    ))
}

/// LUN `id` over `disk`: 512-byte blocks, writable, write cache and discard on.
pub fn scsi_lun(id: u16, disk: &RawDisk) -> ScsiLun {
    ScsiLun {
        id,
        emulation: Lun::new(LunSettings {
            block_size: 512,
            blocks: disk.info().size / 512,
            readonly: false,
            serial: format!("L{id}"),
            wwn: 0x3000_0000_0000_0000 | u64::from(id),
            rotational: false,
            write_cache: true,
            discard: true,
            unmapped_reads_zero: true,
        }),
        disk: disk.info(),
    }
}
