//! Device logic with no vhost-user or VVU dependency.
//!
//! - [`blk`]: virtio-blk feature bits, config space and per-queue request handling.
//! - `chain`: descriptor chains as readable/writable byte streams (shared by the devices).
//! - [`device`]: the traits a transport drives: device-wide [`device::VirtioDevice`] and
//!   per-queue [`device::QueueHandler`].
//! - [`disk`]: the disk engines behind one [`disk::Disk`] trait and one asynchronous
//!   per-queue interface, opened by [`disk::open`]: raw files and block devices on
//!   io_uring, qcow2 images, and (feature `fault-injection`) a fault-injecting wrapper.
//! - [`guest`]: guest memory as a transport hands it in, and the bounce decision.
//! - [`iobuf`]: the buffers disk operations own (guest memory, aligned bounce buffers).
//! - [`qcow2`]: qcow2 images through imago, on a per-queue executor over io_uring.
//! - `request`: the request layer both devices share: requests in flight, completion,
//!   reaping and draining, counting.
//! - [`scsi`]: SCSI command emulation and virtio-scsi request handling.
//! - `slab`: the one table type for everything in flight.
//! - [`stats`]: per-queue counters for the metrics endpoint.
//! - `uring`: io_uring submission entries, built in one place for every engine.
//!
//! The transports (vhost-user unix sockets, virtio-vhost-user) live in `appliance` and hand
//! this crate descriptor chains over guest memory.

pub mod blk;
mod chain;
pub mod device;
pub mod disk;
pub mod guest;
pub mod iobuf;
pub mod qcow2;
mod request;
pub mod scsi;
mod slab;
pub mod stats;
mod uring;
