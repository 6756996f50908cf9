//! What the fuzz targets (`fuzz_targets/*.rs`, one line each) run: for each target, the
//! input format, the harness around the daemon's real code, and the seeds
//! (`examples/make_seeds.rs` writes them into `corpus/<target>/`).
//!
//! - [`input`]: the byte reader and writer every format is built on.
//! - [`ring`]: guest memory and a split virtqueue written by a hostile driver.
//! - [`scratch`]: the process's tmpfs folder for disks, images and sockets.
//! - [`blk`]: the `blk_request` target.
//! - [`scsi`]: `scsi_cdb` and `scsi_tmf_an`.
//! - [`yaml`]: the `exports_yaml` target.
//! - [`qcow2`]: the `qcow2_open` target.
//! - [`vhost_user`]: `vhost_user_backend`, with [`leftovers`], its oracle for threads and
//!   descriptors a connection leaves behind.
//! - [`vvu`]: the `vvu_bridge` target.

pub mod blk;
pub mod input;
pub mod leftovers;
pub mod qcow2;
pub mod ring;
pub mod scratch;
pub mod scsi;
pub mod vhost_user;
pub mod vvu;
pub mod yaml;

/// Sends the daemon's log to stderr when `APPLIANCE_FUZZ_LOG` is set (a tracing filter such
/// as `debug`), to see what an input does: `APPLIANCE_FUZZ_LOG=debug cargo fuzz run
/// TARGET FILE`. Off by default: logging costs executions.
pub fn init_logging() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Ok(filter) = std::env::var("APPLIANCE_FUZZ_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_writer(std::io::stderr)
                .try_init();
        }
    });
}
