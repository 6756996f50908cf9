#![allow(clippy::expect_used, clippy::panic, clippy::unwrap_used)]
// Test support: a failed expectation here is a failed test, reported with its message.

//! Shared helpers for the end-to-end tests in `tests/tests/`.
//!
//! - [`appliance_vm`]: the appliance VM started as a user does (config drive, launcher).
//! - [`bench`]: the benchmark suite's workloads, servers and report (`bin/bench.rs`).
//! - [`blk_raw`]: virtio-blk requests over the raw frontend.
//! - [`blk_suite`]: the libblkio suite for a blk export, wherever its backing file is.
//! - [`blkio_frontend`]: libblkio as a frontend, and randomized workloads to replay.
//! - [`churn`]: short verified sessions and resource baselines for the churn tests.
//! - [`ceph`]: a throwaway one-node Ceph cluster and RBD images for the RBD tests.
//! - [`console`]: the guest images' serial command channel, whoever runs QEMU.
//! - [`daemon`]: runs the real `vhost-appliance` binary (or `qemu-storage-daemon`) on a
//!   scratch directory and always stops it.
//! - [`frontend`]: a raw vhost-user frontend that can send any descriptor chain.
//! - [`nspawn`]: Debian bookworm containers booted under systemd-nspawn, for the package.
//! - [`qfuzz`]: the guest-side fuzzer of the virtio-vhost-user-pci QEMU device (`bin/vvu-fuzz.rs`).
//! - [`prom`]: the daemon's metrics endpoint: scrapes, their samples, and promtool.
//! - [`rng`]: a small seeded generator for reproducible randomized workloads.
//! - [`scsi_frontend`]: SCSI commands over the raw frontend's virtio-scsi request queue.
//! - [`tcg_defects`]: QEMU TCG defects that fail a boot now and then, and their one retry.
//! - [`vm`]: consumer VMs (stock QEMU, serial command channel, QMP hotplug).

pub mod appliance_vm;
pub mod bench;
pub mod blk_raw;
pub mod blk_suite;
pub mod blkio_frontend;
pub mod ceph;
pub mod churn;
pub mod console;
pub mod daemon;
pub mod frontend;
pub mod nspawn;
pub mod prom;
pub mod qfuzz;
pub mod rng;
pub mod scsi_frontend;
pub mod tcg_defects;
pub mod vm;
