#![allow(clippy::expect_used, clippy::panic, clippy::unwrap_used)]
// Test support: a failed expectation here is a failed test, reported with its message.

//! Shared helpers for the end-to-end tests in `tests/tests/`.
//!
//! - [`blkio_frontend`]: libblkio as a frontend, and randomized workloads to replay.
//! - [`daemon`]: runs the real `vhost-appliance` binary (or `qemu-storage-daemon`) on a
//!   scratch directory and always stops it.
//! - [`frontend`]: a raw vhost-user frontend that can send any descriptor chain.
//! - [`rng`]: a small seeded generator for reproducible randomized workloads.
//! - [`vm`]: consumer VMs (stock QEMU, serial command channel, QMP hotplug).

pub mod blkio_frontend;
pub mod daemon;
pub mod frontend;
pub mod rng;
pub mod vm;
