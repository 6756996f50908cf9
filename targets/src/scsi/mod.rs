//! SCSI for vhost-user-scsi exports.
//!
//! - [`sense`]: status codes and fixed-format sense data.
//! - [`opcode`]: SCSI operation codes by name.
//! - [`emulation`]: the SPC/SBC command set of one logical unit, producing data, sense, a
//!   disk I/O request (no I/O happens here) or a REPORT LUNS for the target to answer;
//!   its submodule `emulation::commands` holds the command table and CDB usage maps.
//! - [`luns`]: the LUN table, which changes while frontends use it (LUNs added and removed
//!   live) without a lock on the request path.
//! - [`virtio`]: the public face of virtio-scsi, re-exporting the modules below:
//!   - `wire`: the wire format (request and response structs, response codes, LUN
//!     addressing);
//!   - `device`: the device (LUN table, config space, unit attentions);
//!   - `request`: the request queues and their disk I/O;
//!   - `control`: the control queue, task management functions;
//!   - `events`: the event queue and the events pending for it.

mod control;
mod device;
pub mod emulation;
mod events;
pub mod luns;
pub mod opcode;
mod request;
pub mod sense;
pub mod virtio;
mod wire;
