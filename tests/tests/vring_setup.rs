//! How the daemon takes over a ring that a frontend sets up, as QEMU's libvhost-user does:
//! the next used index is the avail base (never a stale value left in guest memory), a
//! newly installed call fd is signalled once, so a completion published while the frontend
//! had no call fd still reaches its driver, and a kick fd replaced while the ring runs is
//! the one polled from then on. And how it gives a ring back: GET_VRING_BASE that stops a
//! ring while its worker is taking requests from it is answered at once, with every
//! request the worker took on the used ring.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use appliance_tests::blk_raw::{read, write, DATA, HEADER, STATUS};
use appliance_tests::daemon::Appliance;
use appliance_tests::frontend::{RawFrontend, Setup};
use virtio_bindings::bindings::virtio_blk::VIRTIO_BLK_T_IN;
use vvu_transport::split_ring::Buffer;

const CONFIG: &str = "exports:
  - name: vol0
    type: blk
    socket: @DIR@/vol0.sock
    path: @DIR@/vol0.raw
    create: { size: 8M }
    num_queues: 2
    queue_size: 16
";

#[test]
fn a_stale_used_index_in_guest_memory_is_not_taken_over() {
    let appliance = Appliance::start(CONFIG, &["vol0.sock"]);
    for (stale, base_first) in [
        (0x1234u16, true),
        (0x1234, false),
        (1, true),
        (0xffff, false),
    ] {
        let mut fe = RawFrontend::connect_with(
            &appliance.path("vol0.sock"),
            &Setup {
                num_queues: 2,
                queue_size: 16,
                wanted_features: u64::MAX,
                stale_used_idx: Some(stale),
                base_first,
                inflight: false,
                event_idx: false,
            },
        );
        fe.write_mem(DATA, &[0xa5; 4096]);
        // Each completion lands in the next slot from 0: used.idx counts from the base.
        assert_eq!(write(&mut fe, 8, 4096), (1, 0), "stale used.idx {stale:#x}");
        assert_eq!(fe.used_idx(0), 1, "stale used.idx {stale:#x}");
        fe.write_mem(DATA, &[0; 4096]);
        assert_eq!(read(&mut fe, 8, 4096), (4097, 0));
        assert_eq!(fe.used_idx(0), 2);
        assert_eq!(fe.read_mem(DATA, 4096), vec![0xa5; 4096]);
    }
    assert!(appliance
        .process
        .log()
        .contains("ignoring the used index in guest memory"));
}

#[test]
fn a_new_call_fd_is_signalled_once() {
    let appliance = Appliance::start(CONFIG, &["vol0.sock"]);
    let mut fe = RawFrontend::connect_queues(&appliance.path("vol0.sock"), 2, 16, u64::MAX);
    // SET_VRING_CALL was acknowledged (REPLY_ACK) before connect returned.
    for q in 0..2 {
        assert_eq!(
            fe.take_calls(q),
            1,
            "queue {q}: call fd signalled at set-up"
        );
        assert_eq!(fe.take_calls(q), 0, "queue {q}: once");
    }
    // A frontend switching notifiers mid-session: the new fd is signalled too.
    fe.replace_call(1);
    assert_eq!(fe.take_calls(1), 1);
    assert_eq!(fe.take_calls(0), 0, "other queues are not disturbed");
    assert_eq!(read(&mut fe, 0, 512), (513, 0));
}

#[test]
fn a_kick_fd_replaced_while_the_ring_runs_is_the_one_polled() {
    let appliance = Appliance::start(CONFIG, &["vol0.sock"]);
    let mut fe = RawFrontend::connect_queues(&appliance.path("vol0.sock"), 2, 16, u64::MAX);
    assert_eq!(read(&mut fe, 0, 512), (513, 0));
    // SET_VRING_KICK on a started, enabled ring, with no GET_VRING_BASE first (the spec
    // allows it; QEMU sends it only after stopping the ring): a duplicate of the current
    // eventfd, as the appliance VM's bridge always sends, then new eventfds. Each is
    // followed by a disable/enable cycle, after which vhost-user-backend 0.24 alone held
    // two registrations of one file (the worker then stopped on the second, empty read).
    for same_file in [true, false, false] {
        let old = fe.replace_kick(0, same_file);
        assert_eq!(
            read(&mut fe, 0, 512),
            (513, 0),
            "a request kicked on the new fd (same file: {same_file})"
        );
        if !same_file {
            // The replaced eventfd is no longer the ring's: a write to it is nothing.
            old.write(1).unwrap();
        }
        fe.cycle_enable(0);
        assert_eq!(
            read(&mut fe, 0, 512),
            (513, 0),
            "after a disable/enable cycle (same file: {same_file})"
        );
    }
    let log = appliance.process.log();
    assert!(!log.contains("virtqueue worker stops"), "{log}");
}

#[test]
fn a_ring_stopped_while_its_worker_takes_requests_stops_at_once() {
    // With EVENT_IDX a worker turns notifications back on after each pass and looks again;
    // GET_VRING_BASE clears the ring's `ready` between two of its pops. The worker must
    // leave a stopped ring alone at once (not re-read a ring that still shows chains
    // available, holding the lock GET_VRING_BASE waits for), on a plain and on a polling
    // export. Whether GET_VRING_BASE lands mid-pass is timing: rounds vary the delay
    // between the kick and it.
    let config = "exports:
  - name: vol0
    type: blk
    socket: @DIR@/vol0.sock
    path: @DIR@/vol0.raw
    create: { size: 8M }
    queue_size: 1024
  - name: vol1
    type: blk
    socket: @DIR@/vol1.sock
    path: @DIR@/vol1.raw
    create: { size: 8M }
    queue_size: 1024
    poll: { max_us: 200, adaptive: false }
";
    let appliance = Appliance::start(config, &["vol0.sock", "vol1.sock"]);
    let setup = Setup {
        event_idx: true,
        ..Setup::plain(1, 1024, u64::MAX)
    };
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    const CHAINS: u16 = 341;
    let rounds = 60u32;
    for socket in ["vol0.sock", "vol1.sock"] {
        let mut mid_pass = 0u32;
        for round in 0..rounds {
            let mut fe = RawFrontend::connect_with(&appliance.path(socket), &setup);
            fe.write_mem(HEADER, &header);
            // Three descriptors each: as many as the ring holds.
            for _ in 0..CHAINS {
                fe.add_on(
                    0,
                    &[
                        Buffer::readable(HEADER, 16),
                        Buffer::writable(DATA, 4096),
                        Buffer::writable(STATUS, 1),
                    ],
                );
            }
            fe.kick(0);
            let delay = Duration::from_micros(u64::from(round % 12) * 40);
            let start = Instant::now();
            while start.elapsed() < delay {
                std::hint::spin_loop();
            }
            let base = fe.stop_queue(0, Duration::from_secs(10));
            assert!(base <= CHAINS, "{socket} round {round}: base {base}");
            assert_eq!(
                fe.used_idx(0),
                base,
                "{socket} round {round}: every request taken is on the used ring"
            );
            if base > 0 && base < CHAINS {
                mid_pass += 1;
            }
        }
        println!("{socket}: {mid_pass} of {rounds} rounds stopped the ring mid-pass");
        // Else the rounds never met the window they are for (they vary the delay so
        // that about half of them do).
        assert!(mid_pass > 0, "{socket}: no round stopped the ring mid-pass");
    }
    let log = appliance.process.log();
    assert!(!log.contains("Iterator error"), "{log}");
    assert!(!log.contains("virtqueue worker stops"), "{log}");
}
