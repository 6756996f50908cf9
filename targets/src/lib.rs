//! Device logic with no vhost-user or VVU dependency.
//!
//! - [`blk`]: virtio-blk feature bits, config space and per-queue request handling.
//! - [`disk`]: backing stores behind one asynchronous per-queue interface; raw files and
//!   block devices on io_uring.
//! - [`iobuf`]: aligned bounce buffers.
//! - [`stats`]: per-queue counters for the metrics endpoint.
//!
//! The transports (vhost-user unix sockets, virtio-vhost-user) live in `appliance` and hand
//! this crate descriptor chains over guest memory.

pub mod blk;
pub mod disk;
pub mod iobuf;
pub mod stats;
