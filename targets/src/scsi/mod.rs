//! SCSI for vhost-user-scsi exports.
//!
//! - [`sense`]: status codes and fixed-format sense data.
//! - [`emulation`]: the SPC/SBC command set of one logical unit, producing data, sense, a
//!   disk I/O request (no I/O happens here) or a REPORT LUNS for the target to answer;
//!   its submodule `emulation::commands` holds the command table and CDB usage maps.
//! - [`luns`]: the LUN table, which changes while frontends use it (LUNs added and removed
//!   live) without a lock on the request path.
//! - [`virtio`]: virtio-scsi framing, LUN addressing, unit attentions, the request queue
//!   that runs the LUNs' disk I/O, and the config space; re-exports the two queues below.
//! - `control`: the control queue, task management functions (`virtio::ControlQueue`).
//! - `events`: the event queue and the events pending for it (`virtio::EventQueue`).

mod control;
pub mod emulation;
mod events;
pub mod luns;
pub mod sense;
pub mod virtio;
