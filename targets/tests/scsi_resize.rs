//! Online resize of a SCSI LUN: READ CAPACITY and range checks follow the grown capacity,
//! the LUN's next command gets CAPACITY DATA HAS CHANGED (after any unit attention already
//! pending, and only on that LUN), a smaller size changes nothing, and a driver that accepted
//! VIRTIO_SCSI_F_CHANGE gets a parameter-change event naming the LUN as REPORT LUNS does.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use targets::device::{QueueHandler, VirtioDevice};
use targets::guest::GuestRam;
use targets::scsi::virtio::{
    encode_lun, EventQueue, RequestQueue, EVENT_SIZE, REQ_SIZE, RESP_SIZE,
};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use common::{readable, writable, ScsiFixture};

const REQ: u64 = 0x20_0000;
const RESP: u64 = 0x21_0000;
const DATA: u64 = 0x22_0000;
const EVENT_BUF: u64 = 0x10_0000;
/// The fixture's 1 MiB file in 512-byte blocks.
const BLOCKS: u64 = 2048;

/// Runs `cdb` on `lun` with a data-in buffer of `data_in` bytes; returns status, sense
/// key/ASC/ASCQ and the data.
fn command(
    f: &ScsiFixture,
    rq: &mut RequestQueue,
    lun: u16,
    cdb: &[u8],
    data_in: u32,
) -> (u8, (u8, u8, u8), Vec<u8>) {
    let mut req = [0u8; REQ_SIZE];
    req[..8].copy_from_slice(&encode_lun(lun));
    req[19..19 + cdb.len()].copy_from_slice(cdb);
    f.mem.write_slice(&req, GuestAddress(REQ)).unwrap();
    let vq = MockSplitQueue::new(&*f.mem, 16);
    let mut descs = vec![
        readable(REQ, REQ_SIZE as u32),
        writable(RESP, RESP_SIZE as u32),
    ];
    if data_in > 0 {
        descs.push(writable(DATA, data_in));
    }
    let chain = vq.build_desc_chain(&descs).unwrap();
    let mut done = Vec::new();
    rq.handle_chain(chain, &GuestRam::new(Arc::clone(&f.mem)), &mut done);
    rq.submit().unwrap();
    rq.drain(&mut done).unwrap();
    assert_eq!(done.len(), 1);
    let mut resp = [0u8; RESP_SIZE];
    f.mem.read_slice(&mut resp, GuestAddress(RESP)).unwrap();
    let mut data = vec![0u8; data_in as usize];
    f.mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
    (resp[10], (resp[14] & 0x0f, resp[24], resp[25]), data)
}

fn tur(f: &ScsiFixture, rq: &mut RequestQueue, lun: u16) -> (u8, (u8, u8, u8)) {
    let (status, sense, _) = command(f, rq, lun, &[0, 0, 0, 0, 0, 0], 0);
    (status, sense)
}

/// READ CAPACITY(16): the last LBA.
fn last_lba(f: &ScsiFixture, rq: &mut RequestQueue, lun: u16) -> u64 {
    let mut cdb = [0u8; 16];
    cdb[0] = 0x9e;
    cdb[1] = 0x10;
    cdb[13] = 32;
    let (status, sense, data) = command(f, rq, lun, &cdb, 32);
    assert_eq!(status, 0, "READ CAPACITY(16): {sense:02x?}");
    u64::from_be_bytes(data[..8].try_into().unwrap())
}

/// READ(16) of one block at `lba`: status and sense.
fn read_block(f: &ScsiFixture, rq: &mut RequestQueue, lun: u16, lba: u64) -> (u8, (u8, u8, u8)) {
    let mut cdb = [0u8; 16];
    cdb[0] = 0x88;
    cdb[2..10].copy_from_slice(&lba.to_be_bytes());
    cdb[13] = 1;
    let (status, sense, _) = command(f, rq, lun, &cdb, 512);
    (status, sense)
}

const GOOD: (u8, (u8, u8, u8)) = (0, (0, 0, 0));
const OUT_OF_RANGE: (u8, (u8, u8, u8)) = (2, (0x05, 0x21, 0x00));
const CAPACITY_CHANGED: (u8, (u8, u8, u8)) = (2, (0x06, 0x2a, 0x09));

#[test]
fn a_grown_lun_reports_capacity_data_has_changed_and_serves_the_new_blocks() {
    let f = ScsiFixture::new(&[0, 5]);
    let mut rq = f.request_queue();
    assert_eq!(last_lba(&f, &mut rq, 5), BLOCKS - 1);
    assert_eq!(read_block(&f, &mut rq, 5, BLOCKS), OUT_OF_RANGE);

    // A new initiator (POWER ON) and then the growth: both are reported, in that order.
    f.device.session_started();
    std::fs::OpenOptions::new()
        .write(true)
        .open(f.dir.path().join("l.raw"))
        .unwrap()
        .set_len(2 * BLOCKS * 512)
        .unwrap();
    assert_eq!(f.device.grow_lun(5, 2 * BLOCKS), Some(BLOCKS));
    assert_eq!(f.device.grow_lun(9, 2 * BLOCKS), None, "no LUN 9");
    // INQUIRY reports no unit attention and clears none.
    let (status, _, _) = command(&f, &mut rq, 5, &[0x12, 0, 0, 0, 36, 0], 36);
    assert_eq!(status, 0);
    assert_eq!(
        tur(&f, &mut rq, 5),
        (2, (0x06, 0x29, 0x00)),
        "POWER ON first"
    );
    assert_eq!(tur(&f, &mut rq, 5), CAPACITY_CHANGED);
    assert_eq!(tur(&f, &mut rq, 5), GOOD, "reported once");
    assert_eq!(tur(&f, &mut rq, 0), (2, (0x06, 0x29, 0x00)));
    assert_eq!(tur(&f, &mut rq, 0), GOOD, "LUN 0 did not change");

    assert_eq!(last_lba(&f, &mut rq, 5), 2 * BLOCKS - 1);
    assert_eq!(last_lba(&f, &mut rq, 0), BLOCKS - 1);
    assert_eq!(read_block(&f, &mut rq, 5, 2 * BLOCKS - 1), GOOD);
    assert_eq!(read_block(&f, &mut rq, 5, 2 * BLOCKS), OUT_OF_RANGE);
    // READ CAPACITY(10) and the MODE SENSE block descriptor agree.
    let (_, _, cap10) = command(&f, &mut rq, 5, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8);
    assert_eq!(cap10[..4], ((2 * BLOCKS - 1) as u32).to_be_bytes());
    let (_, _, mode) = command(&f, &mut rq, 5, &[0x1a, 0, 0x3f, 0, 255, 0], 255);
    assert_eq!(mode[4..8], ((2 * BLOCKS) as u32).to_be_bytes());

    // Smaller or equal: nothing changes and nothing is reported.
    assert_eq!(f.device.grow_lun(5, BLOCKS), Some(2 * BLOCKS));
    assert_eq!(f.device.grow_lun(5, 2 * BLOCKS), Some(2 * BLOCKS));
    assert_eq!(tur(&f, &mut rq, 5), GOOD);
    assert_eq!(last_lba(&f, &mut rq, 5), 2 * BLOCKS - 1);
}

#[test]
fn a_driver_with_virtio_scsi_f_change_gets_a_parameter_change_event() {
    let f = ScsiFixture::new(&[0, 300]);
    let mut eq = EventQueue::new(Arc::clone(&f.device));
    let post = |eq: &mut EventQueue, slot: u64| {
        let vq = MockSplitQueue::new(&*f.mem, 16);
        let chain = vq
            .build_desc_chain(&[writable(EVENT_BUF + slot * 0x100, EVENT_SIZE as u32)])
            .unwrap();
        let mut done = Vec::new();
        eq.handle_chain(chain, &GuestRam::new(Arc::clone(&f.mem)), &mut done);
        done
    };
    let event = |slot: u64| {
        let mut e = [0u8; EVENT_SIZE];
        f.mem
            .read_slice(&mut e, GuestAddress(EVENT_BUF + slot * 0x100))
            .unwrap();
        e
    };
    // Without the feature: the unit attention only.
    assert!(post(&mut eq, 0).is_empty());
    f.device.grow_lun(0, BLOCKS + 8);
    let mut done = Vec::new();
    eq.reap(&mut done);
    assert!(done.is_empty(), "no event without VIRTIO_SCSI_F_CHANGE");

    f.device.set_acked_features(f.device.features());
    f.device.grow_lun(0, BLOCKS + 16);
    eq.reap(&mut done);
    assert_eq!(done.len(), 1);
    let e = event(0);
    assert_eq!(&e[0..4], &3u32.to_le_bytes(), "VIRTIO_SCSI_T_PARAM_CHANGE");
    assert_eq!(
        &e[4..12],
        &[1, 0, 0, 0, 0, 0, 0, 0],
        "LUN 0 as REPORT LUNS has it"
    );
    assert_eq!(
        &e[12..16],
        &0x092au32.to_le_bytes(),
        "ASC 2Ah | ASCQ 09h << 8"
    );

    let done = {
        f.device.grow_lun(300, BLOCKS + 8);
        post(&mut eq, 1)
    };
    assert_eq!(done.len(), 1);
    let e = event(1);
    assert_eq!(
        &e[4..12],
        &[1, 0, 0x41, 0x2c, 0, 0, 0, 0],
        "LUN 300, flat addressing"
    );
    // Not grown: no event.
    f.device.grow_lun(300, 8);
    assert!(post(&mut eq, 2).is_empty());
}
