//! virtio-scsi (virtio 1.x §5.6): one target with many LUNs, by module:
//!
//! - `scsi/wire.rs`: the wire format: `virtio_scsi_cmd_req` ([`CmdReq`], 51 bytes with a
//!   32-byte CDB, followed by data-out bytes) and `virtio_scsi_cmd_resp` (108 bytes with
//!   96 bytes of sense, followed by data-in bytes), response codes, LUN addressing.
//! - `scsi/device.rs`: the device ([`ScsiDevice`]: LUN table, config space, unit
//!   attentions, LUN changes and capacity growth).
//! - `scsi/request.rs`: the request queues ([`RequestQueue`], queues 2..): commands to the
//!   LUNs' emulation ([`super::emulation::Lun`]) and their disk I/O, one ring per LUN per
//!   queue, all signalling one completion eventfd.
//! - `scsi/control.rs`: queue 0, the control queue ([`ControlQueue`]: task management
//!   functions and asynchronous notification requests).
//! - `scsi/events.rs`: queue 1, the event queue ([`EventQueue`]) and its pending events.
//!
//! This module re-exports them, the public face of virtio-scsi.

pub use super::control::ControlQueue;
pub use super::device::{LunExists, ScsiDevice, ScsiLun};
pub use super::events::{event_lun, EventQueue, EVENT_SIZE};
pub use super::request::RequestQueue;
pub use super::wire::{
    decode_lun, encode_lun, response, CmdReq, CDB_SIZE, CONFIG_SPACE_SIZE, REQ_SIZE, RESP_SIZE,
    SENSE_SIZE,
};
