//! Guest-side pieces of the virtio-vhost-user transport.
//!
//! - [`split_ring`]: the driver side of a virtio split virtqueue. The virtio-vhost-user
//!   driver runs rxq/txq on it; the end-to-end tests drive vhost-user backends with it.
//!
//! The vfio-pci driver for the 1af4:106b device and the bridge into the daemon's vhost-user
//! backend come next (see `design/VVU-SPEC.md`).

pub mod split_ring;
