//! The daemon's library: everything `vhost-appliance` (`main.rs`, the command line) runs,
//! split out of the binary so the fuzz targets (`fuzz/`) can drive an export in process.
//!
//! Modules: [`backend`] (the `VhostUserBackend`), [`export`] (sockets, connection
//! lifecycle; online resize in its `resize` submodule), `relay` (each frontend's control
//! messages to its daemon, and the backend channel kept for CONFIG_CHANGE_MSG), [`reload`]
//! (live `exports.yaml`), [`watch`] (inotify and signals), `vvu` (appliance-VM mode:
//! exports served through a virtio-vhost-user device), [`metrics`] (its `collector`
//! submodule encodes every family at scrape time) and `http` (Prometheus `/metrics` and
//! `/healthz` on `metrics.listen`), `process` (the daemon's own resource use),
//! [`manpage`] (the man pages of the Debian package, from the command line), [`sandbox`]
//! (run-as user, capabilities and the seccomp filter, entered before anything serves).

pub mod backend;
pub mod export;
#[cfg(feature = "fault-injection")]
mod faults;
mod http;
mod inflight;
pub mod manpage;
pub mod metrics;
mod poll;
mod process;
mod relay;
pub mod reload;
pub mod sandbox;
mod vring;
mod vvu;
pub mod watch;
