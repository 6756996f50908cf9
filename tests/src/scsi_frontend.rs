//! A virtio-scsi driver over the raw frontend: SCSI commands to the request queue (queue 2,
//! after the control and event queues), answers decoded from `virtio_scsi_cmd_resp`.

use std::path::Path;
use std::time::Duration;

use vvu_transport::split_ring::Buffer;

use crate::frontend::{RawFrontend, DATA_START};

/// Guest address of the request header (`virtio_scsi_cmd_req`, 51 bytes with a 32-byte CDB).
pub const REQ: u64 = DATA_START;
/// Guest address of the response (`virtio_scsi_cmd_resp`, 108 bytes with 96 bytes of sense).
pub const RESP: u64 = DATA_START + 0x1000;
/// Guest address of data-out and data-in buffers.
pub const DATA: u64 = DATA_START + 0x2000;
/// The first request queue (virtio-scsi: control 0, event 1, requests from 2).
pub const REQUEST_QUEUE: usize = 2;
const TIMEOUT: Duration = Duration::from_secs(10);

/// A completed SCSI command: virtio response code, SCSI status, sense key/asc/ascq,
/// residual, bytes written.
#[derive(Debug)]
pub struct Reply {
    pub response: u8,
    pub status: u8,
    pub sense: (u8, u8, u8),
    pub residual: u32,
    pub used: u32,
}

/// A connected virtio-scsi frontend.
pub struct ScsiFrontend {
    pub fe: RawFrontend,
    /// How long a command may take to be answered (10 s unless changed).
    pub timeout: Duration,
}

impl ScsiFrontend {
    /// Connects with `request_queues` request queues of 64 entries, all features.
    pub fn connect(socket: &Path, request_queues: usize) -> Self {
        Self::over(RawFrontend::connect_queues(
            socket,
            2 + request_queues,
            64,
            u64::MAX,
        ))
    }

    /// A virtio-scsi frontend over `fe`, connected and set up as the caller chose.
    pub fn over(fe: RawFrontend) -> Self {
        ScsiFrontend {
            fe,
            timeout: TIMEOUT,
        }
    }

    /// The LUN field addressing `lun` of target 0 (flat addressing above 255).
    pub fn lun_field(lun: u16) -> [u8; 8] {
        [1, 0, 0x40 | (lun >> 8) as u8, lun as u8, 0, 0, 0, 0]
    }

    /// Puts `cdb` for `lun_field` on request queue `queue` without waiting; data-out bytes
    /// or a data-in buffer of `data_in` bytes at [`DATA`]. Returns the chain's head.
    pub fn submit_raw(
        &mut self,
        queue: usize,
        lun_field: [u8; 8],
        cdb: &[u8],
        data_out: &[u8],
        data_in: u32,
    ) -> u16 {
        let mut req = vec![0u8; 51];
        req[..8].copy_from_slice(&lun_field);
        req[8..16].copy_from_slice(&7u64.to_le_bytes());
        req[19..19 + cdb.len()].copy_from_slice(cdb);
        self.fe.write_mem(REQ, &req);
        self.fe.write_mem(RESP, &[0xee; 108]);
        let mut chain = vec![Buffer::readable(REQ, 51)];
        if !data_out.is_empty() {
            self.fe.write_mem(DATA, data_out);
            chain.push(Buffer::readable(DATA, data_out.len() as u32));
        }
        chain.push(Buffer::writable(RESP, 108));
        if data_in > 0 {
            chain.push(Buffer::writable(DATA, data_in));
        }
        self.fe.submit_on(queue, &chain)
    }

    /// Sends `cdb` to `lun_field` on the first request queue and waits for the answer.
    pub fn command_raw(
        &mut self,
        lun_field: [u8; 8],
        cdb: &[u8],
        data_out: &[u8],
        data_in: u32,
    ) -> Reply {
        let head = self.submit_raw(REQUEST_QUEUE, lun_field, cdb, data_out, data_in);
        let (used_head, used) = self.fe.wait_used_on(REQUEST_QUEUE, self.timeout);
        assert_eq!(used_head, head);
        let resp = self.fe.read_mem(RESP, 108);
        Reply {
            response: resp[11],
            status: resp[10],
            sense: (resp[12 + 2] & 0x0f, resp[12 + 12], resp[12 + 13]),
            residual: u32::from_le_bytes([resp[4], resp[5], resp[6], resp[7]]),
            used,
        }
    }

    /// Sends `cdb` to `lun` with `data_out` bytes or a `data_in` buffer of that length.
    pub fn command(&mut self, lun: u16, cdb: &[u8], data_out: &[u8], data_in: u32) -> Reply {
        self.command_raw(Self::lun_field(lun), cdb, data_out, data_in)
    }

    /// Runs a command expecting GOOD; returns the data-in bytes.
    pub fn good(&mut self, lun: u16, cdb: &[u8], data_out: &[u8], data_in: u32) -> Vec<u8> {
        let r = self.command(lun, cdb, data_out, data_in);
        assert_eq!(
            (r.response, r.status),
            (0, 0),
            "{cdb:02x?} on LUN {lun}: {r:?}"
        );
        let n = r.used as usize - 108;
        self.fe.read_mem(DATA, n)
    }

    /// Clears the power-on unit attention of `lun` (the first command sees it).
    pub fn clear_ua(&mut self, lun: u16) {
        let r = self.command(lun, &[0x00, 0, 0, 0, 0, 0], &[], 0);
        assert_eq!(
            (r.status, r.sense),
            (2, (0x06, 0x29, 0x00)),
            "first TUR: {r:?}"
        );
        let r = self.command(lun, &[0x00, 0, 0, 0, 0, 0], &[], 0);
        assert_eq!(r.status, 0, "{r:?}");
    }

    /// TEST UNIT READY until `lun` answers GOOD (at most 3 times): for a target that may
    /// or may not report a power-on unit attention first (other implementations).
    pub fn until_ready(&mut self, lun: u16) {
        let mut last = None;
        for _ in 0..3 {
            let r = self.command(lun, &[0x00, 0, 0, 0, 0, 0], &[], 0);
            if (r.response, r.status) == (0, 0) {
                return;
            }
            last = Some(r);
        }
        panic!("LUN {lun} not ready: {last:?}");
    }
}
