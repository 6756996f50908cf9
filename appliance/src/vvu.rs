//! Appliance-VM mode: an export served through a virtio-vhost-user device.
//!
//! The device is found by PCI address or uuid, bound to vfio-pci and driven by
//! `vvu_transport`. A bridge thread carries its frontend sessions into the export's ordinary
//! vhost-user backend over a private (abstract, per-process) unix socket, so the backend,
//! its worker threads and its connection lifecycle are exactly those of host mode. What the
//! device cannot carry as file descriptors the bridge stands in for: memory regions map the
//! shared-memory BAR through the VFIO device fd, kicks are MSI-X eventfds and calls are
//! eventfds the kernel turns into doorbell stores (see `vvu_transport::bridge`).

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context};
use config::VvuDevice;
use vhost::vhost_user::Listener;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vvu_transport::bridge::{serve, Bridge};
use vvu_transport::driver::VvuDriver;
use vvu_transport::vfio::{
    bind_vfio_pci, is_vvu_device, pci_address, vvu_devices, VfioPci, DMA_IOVA, SYSFS_PCI_DEVICES,
};

/// Entries of the device's rxq and txq.
const MESSAGE_QUEUE_SIZE: u16 = 128;
/// How often a failed device is brought up again.
const RETRY: Duration = Duration::from_secs(1);

/// A running bridge; stopping it clears BACKEND_UP, which disconnects the frontend.
pub struct VvuBridge {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl VvuBridge {
    /// Opens the device of `export` and starts carrying its frontend sessions to the
    /// returned listener, which the export's accept loop serves as in host mode.
    /// `vhost_queues` is how many vrings the export's device uses.
    pub fn start(
        export: &str,
        device: &VvuDevice,
        vhost_queues: u32,
    ) -> anyhow::Result<(Listener, VvuBridge)> {
        let (sysfs, driver) = open(device)?;
        let address = pci_address(&sysfs)?;
        if driver.max_vhost_queues() < vhost_queues {
            bail!(
                "vvu device {address} wires {} vhost queues, the export needs {vhost_queues}; raise the device's max-vhost-queues",
                driver.max_vhost_queues()
            );
        }
        if let Some(q) = (0..vhost_queues).find(|&q| driver.kick_event(q as usize).is_none()) {
            bail!("vvu device {address} has no MSI-X vector for the kick of vring {q}");
        }
        let name = format!("vhost-appliance/{}/{export}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes())?;
        let listener = UnixListener::bind_addr(&addr)
            .with_context(|| format!("cannot bind the bridge socket @{name}"))?;
        let bridge = Bridge::new(driver, connector(addr.clone()))?;
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let thread_stop = stop.try_clone()?;
        let thread_export = export.to_string();
        let thread = std::thread::Builder::new()
            .name(format!("vvu-{export}"))
            .spawn(move || {
                let _span = tracing::info_span!("vvu", export = thread_export).entered();
                // A device that fails (DEVICE_NEEDS_RESET) is reset and driven anew.
                let bring_up_again = || -> anyhow::Result<_> {
                    let driver = bring_up(&sysfs)?;
                    Ok(Bridge::new(driver, connector(addr.clone()))?)
                };
                serve(bridge, bring_up_again, &thread_stop, RETRY);
            })?;
        tracing::info!(export, device = address, "virtio-vhost-user device up");
        Ok((
            Listener::from(listener),
            VvuBridge {
                stop,
                thread: Some(thread),
            },
        ))
    }

    /// Disconnects the frontend and releases the device.
    pub fn stop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Finds, binds and brings up the device an export names.
fn open(device: &VvuDevice) -> anyhow::Result<(PathBuf, VvuDriver<VfioPci>)> {
    match device {
        VvuDevice::PciAddress(address) => {
            let sysfs = Path::new(SYSFS_PCI_DEVICES).join(address);
            if !sysfs.exists() {
                bail!("there is no PCI device {address}");
            }
            if !is_vvu_device(&sysfs) {
                bail!("PCI device {address} is not a virtio-vhost-user device (1af4:106b)");
            }
            let driver = bring_up(&sysfs).with_context(|| format!("vvu device {address}"))?;
            Ok((sysfs, driver))
        }
        VvuDevice::Uuid(uuid) => {
            let mut seen = Vec::new();
            for sysfs in vvu_devices().context("cannot list PCI devices")? {
                let address = pci_address(&sysfs)?;
                // A device another export holds fails to open; it is not this one.
                match bring_up(&sysfs) {
                    Ok(driver) => {
                        let found = format_uuid(&driver.uuid()?);
                        if found == *uuid {
                            return Ok((sysfs, driver));
                        }
                        seen.push(format!("{address} has uuid {found}"));
                    }
                    Err(e) => seen.push(format!("{address}: {e:#}")),
                }
            }
            if seen.is_empty() {
                bail!("no virtio-vhost-user device (1af4:106b) is present for uuid {uuid}");
            }
            bail!(
                "no free virtio-vhost-user device has uuid {uuid} ({})",
                seen.join("; ")
            )
        }
    }
}

/// Opens a connection to the export's backend, for each frontend session.
fn connector(addr: SocketAddr) -> impl FnMut() -> std::io::Result<UnixStream> {
    move || UnixStream::connect_addr(&addr)
}

fn bring_up(sysfs: &Path) -> anyhow::Result<VvuDriver<VfioPci>> {
    bind_vfio_pci(sysfs)?;
    let pci = VfioPci::open(sysfs).context("cannot open the device through VFIO")?;
    Ok(VvuDriver::new(
        pci,
        MESSAGE_QUEUE_SIZE,
        GuestAddress(DMA_IOVA),
    )?)
}

/// The hyphenated lower-case form `config` parses uuids into.
fn format_uuid(b: &[u8; 16]) -> String {
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_format_as_config_parses_them() {
        let raw = [
            0x6c, 0x1e, 0x7d, 0x52, 0x3b, 0x0a, 0x4f, 0x4e, 0x9d, 0x41, 0x01, 0x23, 0x45, 0x67,
            0x89, 0xab,
        ];
        let text = format_uuid(&raw);
        assert_eq!(text, "6c1e7d52-3b0a-4f4e-9d41-0123456789ab");
        assert_eq!(VvuDevice::parse(&text), Ok(VvuDevice::Uuid(text.clone())));
    }
}
