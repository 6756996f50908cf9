//! The virtio-scsi wire format (virtio 1.2 §5.6.6): request and response layouts and
//! sizes, response codes, LUN addressing, and typed request ([`CmdReq`]) and response
//! ([`Response`]) structs.

use super::sense::{status, Sense, FIXED_SENSE_LEN};
use crate::stats::Failure;

/// CDB bytes in a request (the config space's default `cdb_size`).
pub const CDB_SIZE: usize = 32;
/// Sense bytes in a response (the config space's default `sense_size`).
pub const SENSE_SIZE: usize = 96;
/// `virtio_scsi_cmd_req`: `lun[8]`, tag, task_attr, prio, crn, cdb.
pub const REQ_SIZE: usize = 8 + 8 + 3 + CDB_SIZE;
/// `virtio_scsi_cmd_resp`: sense_len, resid, status_qualifier, status, response, sense.
pub const RESP_SIZE: usize = 4 + 4 + 2 + 1 + 1 + SENSE_SIZE;
/// Size of `struct virtio_scsi_config`.
pub const CONFIG_SPACE_SIZE: usize = 36;

/// `virtio_scsi_cmd_req`, as read from the request's first [`REQ_SIZE`] bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CmdReq {
    /// `lun`: the 8-byte LUN field ([`decode_lun`]).
    pub lun: [u8; 8],
    /// `tag`: the initiator's command identifier (little-endian on the wire).
    pub tag: u64,
    /// `task_attr`: SAM task attribute.
    pub task_attr: u8,
    /// `prio`: SAM command priority.
    pub prio: u8,
    /// `crn`: command reference number.
    pub crn: u8,
    /// `cdb`: the command descriptor block, [`CDB_SIZE`] bytes.
    pub cdb: [u8; CDB_SIZE],
}

impl CmdReq {
    /// The request in `bytes`.
    pub fn parse(bytes: &[u8; REQ_SIZE]) -> Self {
        let mut lun = [0u8; 8];
        lun.copy_from_slice(&bytes[0..8]);
        let mut tag = [0u8; 8];
        tag.copy_from_slice(&bytes[8..16]);
        let mut cdb = [0u8; CDB_SIZE];
        cdb.copy_from_slice(&bytes[19..19 + CDB_SIZE]);
        CmdReq {
            lun,
            tag: u64::from_le_bytes(tag),
            task_attr: bytes[16],
            prio: bytes[17],
            crn: bytes[18],
            cdb,
        }
    }
}

/// virtio-scsi response codes.
pub mod response {
    /// Command completed (see status).
    pub const OK: u8 = 0;
    /// Data buffers too small for the transfer.
    pub const OVERRUN: u8 = 1;
    /// No such target.
    pub const BAD_TARGET: u8 = 3;
    /// Request failed (unsupported framing).
    pub const FAILURE: u8 = 9;
    /// TMF: function complete.
    pub const FUNCTION_COMPLETE: u8 = 0;
    /// TMF: function succeeded.
    pub const FUNCTION_SUCCEEDED: u8 = 10;
    /// TMF: function rejected.
    pub const FUNCTION_REJECTED: u8 = 11;
    /// TMF: no such LUN.
    pub const INCORRECT_LUN: u8 = 12;
}

/// Decodes an 8-byte virtio-scsi LUN field: `Some(lun)` for target 0, single level.
pub fn decode_lun(field: &[u8; 8]) -> Option<u16> {
    if field[0] != 1 || field[1] != 0 || field[4..] != [0, 0, 0, 0] {
        return None;
    }
    Some(u16::from_be_bytes([field[2], field[3]]) & 0x3fff)
}

/// The 8-byte virtio-scsi LUN field for target 0, `lun` (flat addressing, as Linux's
/// virtio_scsi writes it in requests).
pub fn encode_lun(lun: u16) -> [u8; 8] {
    [
        1,
        0,
        0x40 | ((lun >> 8) as u8 & 0x3f),
        lun as u8,
        0,
        0,
        0,
        0,
    ]
}

/// The response to write into `virtio_scsi_cmd_resp`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Response {
    /// `response`: a virtio-scsi response code ([`response`]).
    pub(crate) response: u8,
    /// `status`: the SAM status byte.
    pub(crate) status: u8,
    /// Sense data, for a CHECK CONDITION.
    pub(crate) sense: Option<Sense>,
    /// Sense INFORMATION field (e.g. the offset of a miscompare).
    pub(crate) information: Option<u32>,
    /// `resid`: data-in bytes not written.
    pub(crate) residual: u32,
}

impl Response {
    pub(crate) fn ok(residual: u32) -> Self {
        Response {
            response: response::OK,
            status: status::GOOD,
            sense: None,
            information: None,
            residual,
        }
    }

    pub(crate) fn check(sense: Sense, residual: u32) -> Self {
        Response {
            response: response::OK,
            status: status::CHECK_CONDITION,
            sense: Some(sense),
            information: None,
            residual,
        }
    }

    pub(crate) fn transport(code: u8) -> Self {
        Response {
            response: code,
            status: status::GOOD,
            sense: None,
            information: None,
            residual: 0,
        }
    }

    /// The `virtio_scsi_cmd_resp` bytes.
    pub(crate) fn bytes(&self) -> [u8; RESP_SIZE] {
        let mut r = [0u8; RESP_SIZE];
        if let Some(sense) = self.sense {
            r[0..4].copy_from_slice(&(FIXED_SENSE_LEN as u32).to_le_bytes());
            let bytes = match self.information {
                Some(info) => sense.fixed_with_information(info),
                None => sense.fixed(),
            };
            r[12..12 + FIXED_SENSE_LEN].copy_from_slice(&bytes);
        }
        r[4..8].copy_from_slice(&self.residual.to_le_bytes());
        r[10] = self.status;
        r[11] = self.response;
        r
    }
}

impl Response {
    /// Why the command failed, if it did (metric label `reason`).
    pub(crate) fn failure(&self) -> Option<Failure> {
        if self.response != response::OK {
            // OVERRUN, BAD_TARGET, FAILURE: the request's framing or addressing.
            return Some(Failure::Invalid);
        }
        if self.status == status::GOOD {
            return None;
        }
        Some(match self.sense {
            Some(s) if s == Sense::SPACE_ALLOCATION_FAILED => Failure::IoError,
            Some(s)
                if s == Sense::INVALID_OPCODE || s == Sense::SAVING_PARAMETERS_NOT_SUPPORTED =>
            {
                Failure::Unsupported
            }
            Some(Sense { key: 0x05, .. }) => Failure::Invalid,
            Some(Sense { key: 0x06, .. }) => Failure::UnitAttention,
            Some(Sense { key: 0x07, .. }) => Failure::ReadOnly,
            Some(Sense { key: 0x0e, .. }) => Failure::Miscompare,
            _ => Failure::IoError,
        })
    }
}
