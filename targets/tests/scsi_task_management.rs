//! virtio-scsi task management: an abort or reset answers only after the commands it
//! affects have completed and been published to their used ring (virtio-scsi requires it;
//! Linux reuses an aborted command as soon as the TMF succeeds), or FAILURE when they take
//! longer than the TMF timeout. The control queue runs on its own thread, as in the daemon.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use targets::blk::Memory;
use targets::device::QueueHandler;
use targets::guest::GuestRam;
use targets::scsi::virtio::{
    encode_lun, response, ControlQueue, RequestQueue, ScsiDevice, REQ_SIZE, RESP_SIZE,
};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use common::{readable, writable, ScsiFixture};

const REQ: u64 = 0x20_0000;
const RESP: u64 = 0x21_0000;
const DATA: u64 = 0x22_0000;
const TMF_REQ: u64 = 0x30_0000;
const TMF_RESP: u64 = 0x31_0000;

/// VIRTIO_SCSI_T_TMF subtypes.
const ABORT_TASK_SET: u32 = 1;
const LOGICAL_UNIT_RESET: u32 = 5;
const QUERY_TASK_SET: u32 = 7;

struct Fixture {
    device: Arc<ScsiDevice>,
    mem: Arc<Memory>,
    requests: RequestQueue,
    _scsi: ScsiFixture,
}

fn fixture() -> Fixture {
    let scsi = ScsiFixture::new(&[0, 1]);
    Fixture {
        device: Arc::clone(&scsi.device),
        mem: Arc::clone(&scsi.mem),
        requests: scsi.request_queue(),
        _scsi: scsi,
    }
}

impl Fixture {
    /// READ(10) of 8 blocks on LUN 0: accepted, its disk I/O in flight (not reaped).
    fn start_read(&mut self) {
        let mut req = [0u8; REQ_SIZE];
        req[..8].copy_from_slice(&encode_lun(0));
        req[19..29].copy_from_slice(&[0x28, 0, 0, 0, 0, 8, 0, 0, 8, 0]);
        self.mem.write_slice(&req, GuestAddress(REQ)).unwrap();
        let vq = MockSplitQueue::new(&*self.mem, 16);
        let chain = vq
            .build_desc_chain(&[
                readable(REQ, REQ_SIZE as u32),
                writable(RESP, RESP_SIZE as u32),
                writable(DATA, 4096),
            ])
            .unwrap();
        let mut done = Vec::new();
        self.requests
            .handle_chain(chain, &GuestRam::new(Arc::clone(&self.mem)), &mut done);
        assert!(done.is_empty(), "the read waits for its disk I/O");
        self.requests.submit().unwrap();
    }

    /// Completes the read and publishes it, as the transport does after the used ring.
    fn finish_read(&mut self) {
        let mut done = Vec::new();
        self.requests.drain(&mut done).unwrap();
        assert_eq!(done.len(), 1);
        self.requests.published();
    }

    /// Sends a TMF on a control queue running on its own thread; the answer comes on the
    /// returned channel.
    fn tmf(&self, subtype: u32, lun: u16) -> mpsc::Receiver<u8> {
        let mut req = [0u8; 24];
        req[4..8].copy_from_slice(&subtype.to_le_bytes());
        req[8..16].copy_from_slice(&encode_lun(lun));
        self.mem.write_slice(&req, GuestAddress(TMF_REQ)).unwrap();
        self.mem
            .write_slice(&[0xee], GuestAddress(TMF_RESP))
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let device = Arc::clone(&self.device);
        let mem = Arc::clone(&self.mem);
        std::thread::spawn(move || {
            let mut control = ControlQueue::new(device);
            let vq = MockSplitQueue::new(&*mem, 16);
            let chain = vq
                .build_desc_chain(&[readable(TMF_REQ, 24), writable(TMF_RESP, 1)])
                .unwrap();
            let mut done = Vec::new();
            control.handle_chain(chain, &GuestRam::new(Arc::clone(&mem)), &mut done);
            assert_eq!(done.len(), 1);
            let mut answer = [0u8; 1];
            mem.read_slice(&mut answer, GuestAddress(TMF_RESP)).unwrap();
            let _ = tx.send(answer[0]);
        });
        rx
    }
}

#[test]
fn a_reset_answers_after_the_affected_commands_are_published() {
    let mut f = fixture();
    f.start_read();
    assert_eq!(
        f.tmf(QUERY_TASK_SET, 0)
            .recv_timeout(Duration::from_secs(5))
            .unwrap(),
        response::FUNCTION_SUCCEEDED,
        "LUN 0 has a command in flight"
    );
    assert_eq!(
        f.tmf(ABORT_TASK_SET, 1)
            .recv_timeout(Duration::from_secs(5))
            .unwrap(),
        response::FUNCTION_COMPLETE,
        "nothing in flight on LUN 1: answered at once"
    );
    let answer = f.tmf(LOGICAL_UNIT_RESET, 0);
    assert_eq!(
        answer.recv_timeout(Duration::from_millis(300)),
        Err(mpsc::RecvTimeoutError::Timeout),
        "the reset must wait for the read"
    );
    // Completing the disk I/O is not enough: the command must be on the used ring.
    let mut done = Vec::new();
    f.requests.drain(&mut done).unwrap();
    assert_eq!(done.len(), 1);
    assert_eq!(
        answer.recv_timeout(Duration::from_millis(300)),
        Err(mpsc::RecvTimeoutError::Timeout),
        "the reset must wait until the read is published"
    );
    f.requests.published();
    assert_eq!(
        answer.recv_timeout(Duration::from_secs(5)).unwrap(),
        response::FUNCTION_SUCCEEDED
    );
    assert_eq!(
        f.tmf(QUERY_TASK_SET, 0)
            .recv_timeout(Duration::from_secs(5))
            .unwrap(),
        response::FUNCTION_COMPLETE,
        "nothing in flight any more"
    );
}

#[test]
fn a_reset_that_outwaits_the_timeout_answers_failure() {
    let mut f = fixture();
    f.device.set_tmf_timeout(Duration::from_millis(200));
    f.start_read();
    assert_eq!(
        f.tmf(ABORT_TASK_SET, 0)
            .recv_timeout(Duration::from_secs(5))
            .unwrap(),
        response::FAILURE,
        "the initiator escalates"
    );
    f.finish_read();
    assert_eq!(
        f.tmf(ABORT_TASK_SET, 0)
            .recv_timeout(Duration::from_secs(5))
            .unwrap(),
        response::FUNCTION_COMPLETE
    );
}
