//! SCSI for vhost-user-scsi exports.
//!
//! - [`sense`]: status codes and fixed-format sense data.
//! - [`emulation`]: the SPC/SBC command set of one logical unit, producing data, sense, a
//!   disk I/O request (no I/O happens here) or a REPORT LUNS for the target to answer.
//! - [`virtio`]: virtio-scsi framing, LUN addressing, unit attentions, the request queue
//!   that runs the LUNs' disk I/O, the control and event queues, and the config space.

pub mod emulation;
pub mod sense;
pub mod virtio;
