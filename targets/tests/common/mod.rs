//! Pieces the request-level tests share: descriptors for `MockSplitQueue` chains, a SCSI
//! LUN over a raw disk, and a SCSI device with its guest memory.

// Each test crate uses its own subset.
#![allow(dead_code)]

use std::sync::Arc;

use targets::blk::Memory;
use targets::disk::{DiskQueue, RawDisk, RawDiskOptions};
use targets::scsi::emulation::{Lun, LunSettings};
use targets::scsi::virtio::{RequestQueue, ScsiDevice, ScsiLun};
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use vm_memory::GuestAddress;

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

/// A SCSI device whose LUNs all sit on one 1 MiB raw file, with 4 MiB of guest memory.
pub struct ScsiFixture {
    pub dir: tempfile::TempDir,
    pub disk: RawDisk,
    pub device: Arc<ScsiDevice>,
    pub mem: Arc<Memory>,
}

impl ScsiFixture {
    /// LUNs `ids`, one request queue of 16.
    pub fn new(ids: &[u16]) -> Self {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let disk = RawDisk::open(&RawDiskOptions {
            path: dir.path().join("l.raw"),
            readonly: false,
            direct: false,
            create_size: Some(1 << 20),
        })
        .unwrap();
        let luns = ids.iter().map(|&id| scsi_lun(id, &disk)).collect();
        let device = Arc::new(ScsiDevice::new(luns, 1, 16).unwrap());
        let mem = Arc::new(Memory::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap());
        ScsiFixture {
            dir,
            disk,
            device,
            mem,
        }
    }

    /// A request queue of the device, every LUN's ring on the raw file.
    pub fn request_queue(&self) -> RequestQueue {
        RequestQueue::new(Arc::clone(&self.device), |_, notifier| {
            Ok(Box::new(self.disk.new_queue_with_notifier(16, notifier)?) as Box<dyn DiskQueue>)
        })
        .unwrap()
    }
}
