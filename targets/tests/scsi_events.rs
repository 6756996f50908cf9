//! virtio-scsi events: TRANSPORT_RESET on LUN changes reaches the driver's event buffers,
//! overflow is flagged with EVENTS_MISSED, held buffers come back when the ring stops, and
//! every LUN raises REPORTED LUNS DATA CHANGED. REPORT LUNS, which the transport answers
//! with the device's LUN inventory, lists every LUN to present and absent LUNs alike.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use targets::blk::Memory;
use targets::device::{QueueHandler, VirtioDevice};
use targets::guest::GuestRam;
use targets::scsi::virtio::{encode_lun, EventQueue, EVENT_SIZE, REQ_SIZE, RESP_SIZE};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use common::{readable, writable, ScsiFixture};

const EVENT_BUF: u64 = 0x10_0000;

fn fixture() -> ScsiFixture {
    ScsiFixture::new(&[0, 5])
}

fn post_event_buffer(
    eq: &mut EventQueue,
    mem: &Arc<Memory>,
    slot: u64,
) -> Vec<targets::device::Completed> {
    let vq = MockSplitQueue::new(&**mem, 16);
    let chain = vq
        .build_desc_chain(&[writable(EVENT_BUF + slot * 0x100, EVENT_SIZE as u32)])
        .unwrap();
    let mut done = Vec::new();
    eq.handle_chain(chain, &GuestRam::new(Arc::clone(mem)), &mut done);
    done
}

fn event_at(mem: &Memory, slot: u64) -> (u32, [u8; 8], u32) {
    let mut e = [0u8; EVENT_SIZE];
    mem.read_slice(&mut e, GuestAddress(EVENT_BUF + slot * 0x100))
        .unwrap();
    let mut lun = [0u8; 8];
    lun.copy_from_slice(&e[4..12]);
    (
        u32::from_le_bytes(e[0..4].try_into().unwrap()),
        lun,
        u32::from_le_bytes(e[12..16].try_into().unwrap()),
    )
}

#[test]
fn hotplug_is_offered_and_buffers_wait_for_events() {
    let f = fixture();
    assert_ne!(f.device.features() & (1 << 1), 0, "VIRTIO_SCSI_F_HOTPLUG");
    let mut eq = EventQueue::new(Arc::clone(&f.device));
    assert!(
        post_event_buffer(&mut eq, &f.mem, 0).is_empty(),
        "held until an event"
    );
    f.device.report_lun_change(5, true);
    let mut done = Vec::new();
    eq.reap(&mut done);
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].used_len, EVENT_SIZE as u32);
    assert_eq!(
        event_at(&f.mem, 0),
        (1, [1, 0, 0, 5, 0, 0, 0, 0], 0),
        "TRANSPORT_RESET, RESCAN, LUN 5 as REPORT LUNS gives it (no flat-space bit)"
    );
    // An event queued before a buffer arrives is delivered when it does.
    f.device.report_lun_change(0, false);
    let done = post_event_buffer(&mut eq, &f.mem, 1);
    assert_eq!(done.len(), 1);
    assert_eq!(
        event_at(&f.mem, 1),
        (1, [1, 0, 0, 0, 0, 0, 0, 0], 2),
        "TRANSPORT_RESET, REMOVED"
    );
}

#[test]
fn event_luns_use_flat_addressing_only_from_256() {
    let f = fixture();
    let mut eq = EventQueue::new(Arc::clone(&f.device));
    f.device.report_lun_change(300, true);
    let done = post_event_buffer(&mut eq, &f.mem, 0);
    assert_eq!(done.len(), 1);
    assert_eq!(event_at(&f.mem, 0), (1, [1, 0, 0x41, 44, 0, 0, 0, 0], 0));
}

#[test]
fn overflow_is_reported_as_events_missed() {
    let f = fixture();
    let mut eq = EventQueue::new(Arc::clone(&f.device));
    for i in 0..100 {
        f.device.report_lun_change(i, true);
    }
    let mut delivered = Vec::new();
    for slot in 0..70 {
        delivered.extend(post_event_buffer(&mut eq, &f.mem, slot));
    }
    assert_eq!(delivered.len(), 64, "64 kept, the rest dropped");
    let (first, _, _) = event_at(&f.mem, 0);
    assert_eq!(
        first, 0x8000_0001,
        "the first delivery says events were missed"
    );
    let (second, _, _) = event_at(&f.mem, 1);
    assert_eq!(second, 1, "then the flag is cleared");
}

#[test]
fn held_buffers_come_back_when_the_ring_stops() {
    let f = fixture();
    let mut eq = EventQueue::new(Arc::clone(&f.device));
    post_event_buffer(&mut eq, &f.mem, 0);
    post_event_buffer(&mut eq, &f.mem, 1);
    let mut done = Vec::new();
    eq.drain(&mut done).unwrap();
    assert_eq!(done.len(), 2);
    assert_eq!(
        event_at(&f.mem, 0),
        (0, [0; 8], 0),
        "VIRTIO_SCSI_T_NO_EVENT"
    );
    let mut done = Vec::new();
    eq.reap(&mut done);
    assert!(done.is_empty());
}

#[test]
fn lun_changes_raise_reported_luns_data_changed() {
    let f = fixture();
    let mut rq = f.request_queue();
    f.device.report_lun_change(7, true);
    // TEST UNIT READY on LUN 5 sees the unit attention once.
    const REQ: u64 = 0x20_0000;
    const RESP: u64 = 0x21_0000;
    let mut req = [0u8; REQ_SIZE];
    req[..8].copy_from_slice(&encode_lun(5));
    f.mem.write_slice(&req, GuestAddress(REQ)).unwrap();
    for expect_ua in [true, false] {
        let vq = MockSplitQueue::new(&*f.mem, 16);
        let chain = vq
            .build_desc_chain(&[
                readable(REQ, REQ_SIZE as u32),
                writable(RESP, RESP_SIZE as u32),
            ])
            .unwrap();
        let mut done = Vec::new();
        rq.handle_chain(chain, &GuestRam::new(Arc::clone(&f.mem)), &mut done);
        assert_eq!(done.len(), 1);
        let mut resp = [0u8; RESP_SIZE];
        f.mem.read_slice(&mut resp, GuestAddress(RESP)).unwrap();
        if expect_ua {
            assert_eq!(resp[10], 2, "CHECK CONDITION");
            assert_eq!(
                (resp[12 + 2], resp[12 + 12], resp[12 + 13]),
                (0x06, 0x3f, 0x0e)
            );
        } else {
            assert_eq!(resp[10], 0, "GOOD once the unit attention was reported");
        }
    }
}

#[test]
fn report_luns_lists_every_lun_from_any_lun() {
    let f = fixture();
    let mut rq = f.request_queue();
    const REQ: u64 = 0x20_0000;
    const RESP: u64 = 0x21_0000;
    const DATA: u64 = 0x22_0000;
    // LUN 5 exists, LUN 3 does not; a refused CDB (allocation length under 16) is refused
    // on both.
    for (lun, alloc, listed) in [
        (5u16, 64u8, true),
        (3, 64, true),
        (5, 8, false),
        (3, 8, false),
    ] {
        let mut req = [0u8; REQ_SIZE];
        req[..8].copy_from_slice(&encode_lun(lun));
        req[19..31].copy_from_slice(&[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, alloc, 0, 0]);
        f.mem.write_slice(&req, GuestAddress(REQ)).unwrap();
        let vq = MockSplitQueue::new(&*f.mem, 16);
        let chain = vq
            .build_desc_chain(&[
                readable(REQ, REQ_SIZE as u32),
                writable(RESP, RESP_SIZE as u32),
                writable(DATA, 64),
            ])
            .unwrap();
        let mut done = Vec::new();
        rq.handle_chain(chain, &GuestRam::new(Arc::clone(&f.mem)), &mut done);
        assert_eq!(done.len(), 1, "LUN {lun}: answered at once");
        let mut resp = [0u8; RESP_SIZE];
        f.mem.read_slice(&mut resp, GuestAddress(RESP)).unwrap();
        assert_eq!(resp[11], 0, "LUN {lun}: VIRTIO_SCSI_S_OK");
        if !listed {
            assert_eq!(
                resp[10], 2,
                "LUN {lun}, allocation length {alloc}: CHECK CONDITION"
            );
            assert_eq!(
                (resp[12 + 2], resp[12 + 12]),
                (0x05, 0x24),
                "INVALID FIELD IN CDB"
            );
            continue;
        }
        assert_eq!(resp[10], 0, "LUN {lun}: GOOD");
        let mut d = [0u8; 24];
        f.mem.read_slice(&mut d, GuestAddress(DATA)).unwrap();
        assert_eq!(&d[0..4], &16u32.to_be_bytes(), "LUN {lun}: two LUNs");
        assert_eq!((d[9], d[17]), (0, 5), "LUN {lun}: LUNs 0 and 5");
        assert_eq!(
            u32::from_le_bytes(resp[4..8].try_into().unwrap()),
            64 - 24,
            "LUN {lun}: residual"
        );
    }
}
