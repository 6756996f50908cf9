//! [`PciTransport`] over vfio-pci, for the appliance VM (which has a vIOMMU: the Debian
//! kernel has no VFIO_NOIOMMU, so the container is type1v2).
//!
//! DMA memory is an anonymous mapping made visible to the device at [`DMA_IOVA`]; rings and
//! message buffers live there, addressed by IOVA.

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vfio_bindings::bindings::vfio::{vfio_device_ioeventfd, VFIO_DEVICE_IOEVENTFD_16};
use vfio_ioctls::{VfioContainer, VfioDevice};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_io_nr;

use crate::pci::PciTransport;

/// Where the driver's DMA memory appears to the device.
pub const DMA_IOVA: u64 = 0x1000_0000;
/// Size of the DMA memory: rings and 4 KiB buffers of rxq and txq.
pub const DMA_SIZE: usize = 4 << 20;

// VFIO_DEVICE_IOEVENTFD = _IO(VFIO_TYPE, VFIO_BASE + 16); vfio-ioctls does not wrap it.
ioctl_io_nr!(VFIO_DEVICE_IOEVENTFD, 59, 100 + 16);

const CONFIG_REGION: u32 = 7; // VFIO_PCI_CONFIG_REGION_INDEX
const PCI_COMMAND: u64 = 0x04;
const PCI_COMMAND_MEMORY: u16 = 0x2;
const PCI_COMMAND_MASTER: u16 = 0x4;

/// Where the kernel lists PCI devices.
pub const SYSFS_PCI_DEVICES: &str = "/sys/bus/pci/devices";
/// PCI vendor and device ID of virtio-vhost-user (sysfs spelling).
const VVU_IDS: (&str, &str) = ("0x1af4", "0x106b");

fn sysfs_read(path: &Path) -> io::Result<String> {
    fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

fn sysfs_write(path: &Path, value: &str) -> io::Result<()> {
    fs::write(path, value).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("writing {value:?} to {}: {e}", path.display()),
        )
    })
}

/// The PCI address (`0000:00:10.0`) of the device at sysfs path `sysfs`.
pub fn pci_address(sysfs: &Path) -> io::Result<String> {
    sysfs
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| io::Error::other(format!("{} names no PCI device", sysfs.display())))
}

/// Whether the device at `sysfs` is a virtio-vhost-user device.
pub fn is_vvu_device(sysfs: &Path) -> bool {
    let id = |f: &str| sysfs_read(&sysfs.join(f)).unwrap_or_default();
    (id("vendor").as_str(), id("device").as_str()) == VVU_IDS
}

/// Every virtio-vhost-user device in the system, by sysfs path, in address order.
pub fn vvu_devices() -> io::Result<Vec<PathBuf>> {
    let mut found: Vec<PathBuf> = fs::read_dir(SYSFS_PCI_DEVICES)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| is_vvu_device(p))
        .collect();
    found.sort();
    Ok(found)
}

/// Binds the device at `sysfs` to vfio-pci (through `driver_override`, so no other device
/// of the same IDs is affected), unbinding it from another driver first. The vfio-pci
/// module must be loaded and the device must be behind an IOMMU.
pub fn bind_vfio_pci(sysfs: &Path) -> io::Result<()> {
    let driver = |p: &Path| {
        fs::read_link(p.join("driver"))
            .ok()
            .and_then(|l| l.file_name().map(|n| n.to_string_lossy().into_owned()))
    };
    if driver(sysfs).as_deref() == Some("vfio-pci") {
        return Ok(());
    }
    let address = pci_address(sysfs)?;
    if driver(sysfs).is_some() {
        sysfs_write(&sysfs.join("driver/unbind"), &address)?;
    }
    sysfs_write(&sysfs.join("driver_override"), "vfio-pci")?;
    // Probing reports an error when no driver takes the device; the check below says why.
    let _ = sysfs_write(Path::new("/sys/bus/pci/drivers_probe"), &address);
    match driver(sysfs) {
        Some(d) if d == "vfio-pci" => Ok(()),
        other => Err(io::Error::other(format!(
            "{address} did not bind to vfio-pci (driver now {}): is the vfio-pci module loaded and an IOMMU present (intel_iommu=on)?",
            other.as_deref().unwrap_or("none")
        ))),
    }
}

/// A PCI device bound to vfio-pci.
pub struct VfioPci {
    device: VfioDevice,
    _container: Arc<VfioContainer>,
    mem: GuestMemoryMmap,
}

fn vfio_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

impl VfioPci {
    /// Opens the device at `sysfs` (e.g. `/sys/bus/pci/devices/0000:00:03.0`), which must be
    /// bound to vfio-pci, maps DMA memory and enables memory decoding and bus mastering.
    pub fn open(sysfs: &Path) -> io::Result<Self> {
        let container = Arc::new(VfioContainer::new(None).map_err(vfio_err)?);
        let device = VfioDevice::new(sysfs, container.clone(), false).map_err(vfio_err)?;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(DMA_IOVA), DMA_SIZE)])
            .map_err(vfio_err)?;
        let host = mem
            .get_host_address(GuestAddress(DMA_IOVA))
            .map_err(vfio_err)?;
        // SAFETY: `host` is the start of a DMA_SIZE-byte mapping owned by `mem`, which lives
        // as long as the container mapping (both are fields of the returned value, and the
        // device is reset before they go).
        unsafe { container.vfio_dma_map(DMA_IOVA, DMA_SIZE, host) }.map_err(vfio_err)?;
        let pci = VfioPci {
            device,
            _container: container,
            mem,
        };
        let mut command = [0u8; 2];
        pci.config_read(PCI_COMMAND, &mut command)?;
        let command = u16::from_le_bytes(command) | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
        pci.config_write(PCI_COMMAND, &command.to_le_bytes())?;
        Ok(pci)
    }

    /// The VFIO device (its fd maps BARs for the bridge).
    pub fn device(&self) -> &VfioDevice {
        &self.device
    }

    /// Maps `len` bytes of BAR `bar` from `offset` (page aligned) for reading and writing,
    /// as the bridge maps frontend memory out of the shared-memory BAR.
    pub fn map_bar(&self, bar: u8, offset: u64, len: usize) -> io::Result<BarMapping> {
        let file_offset = self.device.get_region_offset(u32::from(bar)) + offset;
        let file_offset = libc::off_t::try_from(file_offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        // SAFETY: a fresh shared mapping of the device fd chosen by the kernel (no fixed
        // address), so no existing memory is affected; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.device.as_raw_fd(),
                file_offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(BarMapping {
            ptr: ptr.cast(),
            len,
        })
    }

    /// Wires `fd` (or with -1 unwires) a 16-bit store of 0 at device-fd offset `offset`.
    fn ioeventfd(&self, offset: u64, fd: i32) -> io::Result<()> {
        let request = vfio_device_ioeventfd {
            argsz: std::mem::size_of::<vfio_device_ioeventfd>() as u32,
            flags: VFIO_DEVICE_IOEVENTFD_16,
            offset,
            data: 0,
            fd,
            reserved: 0,
        };
        // SAFETY: the ioctl reads a fully initialised `vfio_device_ioeventfd` that outlives
        // the call; the device fd is valid while `self.device` lives, and the kernel takes its
        // own reference to the eventfd.
        let r = unsafe { ioctl_with_ref(&self.device, VFIO_DEVICE_IOEVENTFD(), &request) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl PciTransport for VfioPci {
    fn config_read(&self, offset: u64, data: &mut [u8]) -> io::Result<()> {
        self.device.region_read(CONFIG_REGION, data, offset);
        Ok(())
    }

    fn config_write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.device.region_write(CONFIG_REGION, data, offset);
        Ok(())
    }

    fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]) -> io::Result<()> {
        self.device.region_read(u32::from(bar), data, offset);
        Ok(())
    }

    fn bar_write(&self, bar: u8, offset: u64, data: &[u8]) -> io::Result<()> {
        self.device.region_write(u32::from(bar), data, offset);
        Ok(())
    }

    fn enable_msix(&self, eventfds: &[&EventFd]) -> io::Result<()> {
        self.device.enable_msix(eventfds.to_vec()).map_err(vfio_err)
    }

    fn dma_memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// VFIO_DEVICE_IOEVENTFD: vfio-pci performs the store itself when the eventfd fires.
    /// The kernel keys a wiring by location and refuses a second one, so any previous wiring
    /// of the location is removed first.
    fn store_on_signal(&self, bar: u8, offset: u64, eventfd: Option<&EventFd>) -> io::Result<()> {
        let offset = self.device.get_region_offset(u32::from(bar)) + offset;
        let removed = self.ioeventfd(offset, -1);
        match eventfd {
            Some(e) => self.ioeventfd(offset, e.as_raw_fd()),
            // Nothing wired there is not an error for the caller.
            None => match removed {
                Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(()),
                other => other,
            },
        }
    }

    /// A duplicate of the VFIO device fd and the BAR's region offset in it.
    fn bar_file(&self, bar: u8) -> io::Result<(std::fs::File, u64)> {
        // SAFETY: the device fd is valid while `self.device` lives, which outlives this call.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.device.as_raw_fd()) };
        let file = std::fs::File::from(fd.try_clone_to_owned()?);
        Ok((file, self.device.get_region_offset(u32::from(bar))))
    }
}

/// A mapping of part of a BAR (see [`VfioPci::map_bar`]); unmapped when dropped.
pub struct BarMapping {
    ptr: *mut u8,
    len: usize,
}

impl BarMapping {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies `out.len()` bytes from `offset` into `out`; `None` if that leaves the mapping.
    /// The other side may write the memory meanwhile (it is a guest's RAM): the copy is
    /// a byte snapshot, as a device's DMA read would be.
    pub fn read(&self, offset: usize, out: &mut [u8]) -> Option<()> {
        let end = offset.checked_add(out.len())?;
        if end > self.len {
            return None;
        }
        // SAFETY: `offset..end` lies inside the live mapping, `out` is a distinct buffer of
        // that length, and byte copies need no alignment.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(offset), out.as_mut_ptr(), out.len()) };
        Some(())
    }
}

impl Drop for BarMapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned, unmapped once, here.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}
