//! Exports with `poll:` (busy-polling workers), VM-less: the libblkio suite (every
//! operation on two queues, 64 requests in flight per queue) and SCSI reads and writes
//! pass with adaptive and with fixed polling, and the metrics show that polling, not only
//! kicks and completion signals, found work.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use appliance_tests::blk_suite::{self, HostFile};
use appliance_tests::blkio_frontend::Frontend;
use appliance_tests::daemon::Appliance;
use appliance_tests::prom;
use appliance_tests::rng::Rng;
use appliance_tests::scsi_frontend::ScsiFrontend;

fn config(adaptive: bool) -> String {
    format!(
        "metrics:
  listen: 127.0.0.1:0
exports:
  - name: vol0
    type: blk
    socket: @DIR@/vol0.sock
    path: @DIR@/vol0.raw
    create: {{ size: 64M }}
    num_queues: 2
    poll: {{ max_us: 200, adaptive: {adaptive} }}
  - name: db
    type: scsi
    socket: @DIR@/db.sock
    poll: {{ max_us: 200, adaptive: {adaptive} }}
    luns:
      - path: @DIR@/db0.raw
        create: {{ size: 16M }}
"
    )
}

fn polls_and_serves(adaptive: bool) {
    let appliance = Appliance::start(&config(adaptive), &["vol0.sock", "db.sock"]);
    let addr = prom::endpoint(&appliance);
    let mut backing = HostFile(appliance.path("vol0.raw"));
    blk_suite::all_operations(&appliance.path("vol0.sock"), 2, &mut backing);
    blk_suite::queue_depth_64(&appliance.path("vol0.sock"), &mut backing);
    // Back-to-back requests, as a QD1 workload makes them: adaptive polling grows its
    // window to the gap between them and then catches them without kicks.
    {
        let mut fe = Frontend::connect(&appliance.path("vol0.sock"), 1);
        for i in 0..2000u64 {
            assert_eq!(fe.read(0, (i % 1024) * 4096, 0, 4096), 0);
        }
    }

    // SCSI: WRITE(10) then READ(10) of 64 KiB at 32 places, read back equal.
    let mut s = ScsiFrontend::connect(&appliance.path("db.sock"), 1);
    s.clear_ua(0);
    let mut rng = Rng::new(7);
    for i in 0..32u32 {
        let mut data = vec![0u8; 65536];
        rng.fill(&mut data);
        let lba = (i * 256).to_be_bytes();
        let write = [0x2a, 0, lba[0], lba[1], lba[2], lba[3], 0, 0, 128, 0];
        s.good(0, &write, &data, 0);
        let read = [0x28, 0, lba[0], lba[1], lba[2], lba[3], 0, 0, 128, 0];
        assert_eq!(s.good(0, &read, &[], 65536), data, "LBA {}", i * 256);
    }

    let scrape = prom::scrape(addr);
    let polled = |export: &str| {
        scrape.sum(
            "vhost_appliance_queue_polled_events_total",
            &[("export", export)],
        )
    };
    assert!(polled("vol0") > 0.0, "no work found by polling on vol0");
    assert!(polled("db") > 0.0, "no work found by polling on db");
    // virtio-scsi's control and event queues do not poll.
    for q in ["0", "1"] {
        assert_eq!(
            scrape.value(
                "vhost_appliance_queue_polled_events_total",
                &[("export", "db"), ("queue", q)]
            ),
            0.0
        );
    }
    assert_eq!(
        scrape.sum("vhost_appliance_queue_inflight_requests", &[]),
        0.0
    );
}

#[test]
fn adaptive_polling_serves_blk_and_scsi() {
    polls_and_serves(true);
}

#[test]
fn fixed_polling_serves_blk_and_scsi() {
    polls_and_serves(false);
}
