//! PCI access for the virtio-vhost-user driver, and the capability walk.
//!
//! [`PciTransport`] is all the driver needs of a PCI device: config space, BAR register
//! access, MSI-X eventfds and DMA-able memory. The vfio-pci implementation sits behind it in
//! the appliance VM; tests use a fake device. [`VirtioCaps::parse`] finds the standard virtio
//! structures (common, notify, ISR, device) and the virtio-vhost-user ones (doorbells,
//! notification, shared memory) as `design/VVU-SPEC.md` lays them out.

use std::io;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// PCI vendor ID of virtio devices.
pub const VIRTIO_VENDOR_ID: u16 = 0x1af4;
/// PCI device ID of the virtio-vhost-user device (0x1040 + virtio ID 43).
pub const VVU_DEVICE_ID: u16 = 0x106b;

const PCI_CAP_POINTER: u64 = 0x34;
const PCI_CAP_ID_VNDR: u8 = 0x09;
const PCI_CAP_ID_MSIX: u8 = 0x11;

/// virtio PCI capability types.
pub mod cfg_type {
    /// Common configuration.
    pub const COMMON: u8 = 1;
    /// Notifications (queue doorbells towards the device).
    pub const NOTIFY: u8 = 2;
    /// ISR status.
    pub const ISR: u8 = 3;
    /// Device-specific configuration.
    pub const DEVICE: u8 = 4;
    /// virtio-vhost-user doorbells (calls towards the frontend).
    pub const DOORBELL: u8 = 6;
    /// virtio-vhost-user notification structure (kick → MSI-X vector).
    pub const NOTIFICATION: u8 = 7;
    /// Shared memory (frontend memory, id 1).
    pub const SHARED_MEMORY: u8 = 8;
}

/// Where a structure lives: a BAR and a range inside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// BAR index.
    pub bar: u8,
    /// Offset inside the BAR.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
}

/// The device's virtio capabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioCaps {
    /// Common configuration structure.
    pub common: Region,
    /// Queue notification area.
    pub notify: Region,
    /// `notify_off_multiplier` of the notify capability.
    pub notify_multiplier: u32,
    /// Device configuration (status, max_vhost_queues, uuid).
    pub device: Region,
    /// Doorbells towards the frontend.
    pub doorbells: Region,
    /// `doorbell_off_multiplier` of the doorbell capability.
    pub doorbell_multiplier: u32,
    /// Notification structure (select + MSI-X vector).
    pub notification: Region,
    /// Frontend memory (shared memory id 1).
    pub shared_memory: Region,
    /// MSI-X table size.
    pub msix_vectors: u16,
}

/// What the driver needs of a PCI device.
pub trait PciTransport {
    /// Reads PCI configuration space.
    fn config_read(&self, offset: u64, data: &mut [u8]) -> io::Result<()>;
    /// Writes PCI configuration space.
    fn config_write(&self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Reads device registers in a BAR.
    fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]) -> io::Result<()>;
    /// Writes device registers in a BAR.
    fn bar_write(&self, bar: u8, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Wires MSI-X vectors `0..eventfds.len()` to these eventfds.
    fn enable_msix(&self, eventfds: &[&EventFd]) -> io::Result<()>;
    /// Memory the device can DMA to, addressed by device-visible address (IOVA).
    fn dma_memory(&self) -> &GuestMemoryMmap;
    /// Makes every signal of `eventfd` perform a 16-bit store at `bar`:`offset` without a
    /// user-space thread in between; `None` removes the wiring of that location.
    fn store_on_signal(&self, bar: u8, offset: u64, eventfd: Option<&EventFd>) -> io::Result<()>;
    /// A file that maps BAR `bar` from the returned file offset: how another component (the
    /// vhost-user backend) maps frontend memory out of the shared-memory BAR by itself.
    fn bar_file(&self, bar: u8) -> io::Result<(std::fs::File, u64)>;
}

/// Capability walk errors.
#[derive(Debug, thiserror::Error)]
pub enum CapsError {
    /// Reading config space failed.
    #[error("reading PCI config space")]
    Io(#[from] io::Error),
    /// A required capability is absent.
    #[error("virtio capability type {0} not found")]
    Missing(u8),
    /// The capability list loops or points outside config space.
    #[error("malformed PCI capability list at offset {0:#x}")]
    Malformed(u64),
    /// Not the virtio-vhost-user device.
    #[error("PCI device {vendor:04x}:{device:04x} is not virtio-vhost-user (1af4:106b)")]
    WrongDevice {
        /// Vendor ID.
        vendor: u16,
        /// Device ID.
        device: u16,
    },
}

fn read_u8<T: PciTransport + ?Sized>(t: &T, at: u64) -> io::Result<u8> {
    let mut b = [0u8; 1];
    t.config_read(at, &mut b)?;
    Ok(b[0])
}

fn read_u16<T: PciTransport + ?Sized>(t: &T, at: u64) -> io::Result<u16> {
    let mut b = [0u8; 2];
    t.config_read(at, &mut b)?;
    Ok(u16::from_le_bytes(b))
}

fn read_u32<T: PciTransport + ?Sized>(t: &T, at: u64) -> io::Result<u32> {
    let mut b = [0u8; 4];
    t.config_read(at, &mut b)?;
    Ok(u32::from_le_bytes(b))
}

impl VirtioCaps {
    /// Walks the capability list of a 1af4:106b device.
    pub fn parse<T: PciTransport + ?Sized>(t: &T) -> Result<Self, CapsError> {
        let vendor = read_u16(t, 0)?;
        let device = read_u16(t, 2)?;
        if (vendor, device) != (VIRTIO_VENDOR_ID, VVU_DEVICE_ID) {
            return Err(CapsError::WrongDevice { vendor, device });
        }
        let mut found: [Option<(Region, u32)>; 9] = [None; 9];
        let mut msix_vectors = 0;
        let mut at = u64::from(read_u8(t, PCI_CAP_POINTER)? & 0xfc);
        let mut hops = 0;
        while at != 0 {
            hops += 1;
            if hops > 48 || !(0x40..0x100).contains(&at) {
                return Err(CapsError::Malformed(at));
            }
            let id = read_u8(t, at)?;
            let next = u64::from(read_u8(t, at + 1)? & 0xfc);
            if id == PCI_CAP_ID_MSIX {
                msix_vectors = (read_u16(t, at + 2)? & 0x7ff) + 1;
            }
            if id == PCI_CAP_ID_VNDR {
                let len = read_u8(t, at + 2)?;
                let kind = read_u8(t, at + 3)?;
                let bar = read_u8(t, at + 4)?;
                let mut offset = u64::from(read_u32(t, at + 8)?);
                let mut length = u64::from(read_u32(t, at + 12)?);
                let mut extra = 0;
                if kind == cfg_type::SHARED_MEMORY && len >= 24 {
                    offset |= u64::from(read_u32(t, at + 16)?) << 32;
                    length |= u64::from(read_u32(t, at + 20)?) << 32;
                } else if len >= 20 {
                    extra = read_u32(t, at + 16)?;
                }
                if let Some(slot) = found.get_mut(usize::from(kind)) {
                    // The first capability of a type wins (virtio 1.x 4.1.4).
                    slot.get_or_insert((
                        Region {
                            bar,
                            offset,
                            length,
                        },
                        extra,
                    ));
                }
            }
            at = next;
        }
        let get = |kind: u8| found[usize::from(kind)].ok_or(CapsError::Missing(kind));
        let (common, _) = get(cfg_type::COMMON)?;
        let (notify, notify_multiplier) = get(cfg_type::NOTIFY)?;
        let (device, _) = get(cfg_type::DEVICE)?;
        let (doorbells, doorbell_multiplier) = get(cfg_type::DOORBELL)?;
        let (notification, _) = get(cfg_type::NOTIFICATION)?;
        let (shared_memory, _) = get(cfg_type::SHARED_MEMORY)?;
        Ok(VirtioCaps {
            common,
            notify,
            notify_multiplier,
            device,
            doorbells,
            doorbell_multiplier,
            notification,
            shared_memory,
            msix_vectors,
        })
    }
}
