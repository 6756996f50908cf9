//! Guest-side pieces of the virtio-vhost-user transport.
//!
//! - [`split_ring`]: the driver side of a virtio split virtqueue. The virtio-vhost-user
//!   driver runs rxq/txq on it; the end-to-end tests drive vhost-user backends with it.
//! - [`pci`]: what the driver needs of a PCI device ([`pci::PciTransport`]) and the walk of
//!   the virtio and virtio-vhost-user capabilities.
//! - [`driver`]: the virtio-vhost-user driver: device initialisation, rxq/txq messages,
//!   kick vectors, doorbells (rung directly, or wired to an eventfd so the kernel rings them),
//!   BACKEND_UP (`design/VVU-SPEC.md`).
//!
//! - [`vfio`]: `PciTransport` over vfio-pci (type1v2 container, DMA memory by IOVA), and
//!   finding and binding a device by PCI address or uuid.
//! - [`bridge`]: carries a device's frontend sessions to an ordinary vhost-user backend over
//!   a unix stream, standing in for the file descriptors the device cannot carry.
//! - `fake` (unit tests, and feature `fake-device` for the fuzz targets): a fake
//!   virtio-vhost-user PCI device whose rxq/txq the caller serves.

pub mod bridge;
pub mod driver;
#[cfg(any(test, feature = "fake-device"))]
pub mod fake;
pub mod pci;
pub mod split_ring;
pub mod vfio;
