//! Device logic with no vhost-user or VVU dependency.
//!
//! - [`blk`]: virtio-blk feature bits, config space and per-queue request handling.
//! - `chain`: descriptor chains as readable/writable byte streams (shared by the devices).
//! - [`device`]: the traits a transport drives: device-wide [`device::VirtioDevice`] and
//!   per-queue [`device::QueueHandler`].
//! - [`disk`]: backing stores behind one asynchronous per-queue interface; raw files and
//!   block devices on io_uring.
//! - `inflight`: the per-queue table of requests handed to the disk.
//! - [`iobuf`]: aligned bounce buffers.
//! - [`qcow2`]: qcow2 images through imago, on a per-queue executor over io_uring.
//! - [`scsi`]: SCSI command emulation and virtio-scsi request handling.
//! - [`stats`]: per-queue counters for the metrics endpoint.
//!
//! The transports (vhost-user unix sockets, virtio-vhost-user) live in `appliance` and hand
//! this crate descriptor chains over guest memory.

pub mod blk;
mod chain;
pub mod device;
pub mod disk;
mod inflight;
pub mod iobuf;
pub mod qcow2;
pub mod scsi;
pub mod stats;
