//! SCSI for vhost-user-scsi exports.
//!
//! - [`sense`]: status codes and fixed-format sense data.
//! - [`emulation`]: the SPC/SBC command set of one logical unit, producing data, sense or
//!   a disk I/O request (no I/O happens here).

pub mod emulation;
pub mod sense;
