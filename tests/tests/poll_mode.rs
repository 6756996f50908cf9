//! Exports with `poll:` (busy-polling workers), VM-less: the libblkio suite (every
//! operation on two queues, 64 requests in flight per queue) and SCSI reads and writes
//! pass with adaptive and with fixed polling, and the metrics show that polling, not only
//! kicks and completion signals, found work.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use appliance_tests::bench::cpu_time;
use appliance_tests::blk_suite::{self, HostFile};
use appliance_tests::blkio_frontend::Frontend;
use appliance_tests::daemon::Appliance;
use appliance_tests::frontend::DATA_START;
use appliance_tests::prom;
use appliance_tests::rng::Rng;
use appliance_tests::scsi_frontend::ScsiFrontend;
use vvu_transport::split_ring::Buffer;

/// Where the test's event-queue buffer is in the frontend's memory.
const EVENT_BUFFER: u64 = DATA_START + 0x80_0000;

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
    poll: {{ max_us: 1000, adaptive: {adaptive} }}
  - name: db
    type: scsi
    socket: @DIR@/db.sock
    poll: {{ max_us: 1000, adaptive: {adaptive} }}
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

    // A LUN added by a reload reaches the driver as an event on the event queue (which
    // does not poll, and must still deliver).
    s.fe.submit_on(1, &[Buffer::writable(EVENT_BUFFER, 16)]);
    let with_lun_1 = config(adaptive).replace(
        "        create: { size: 16M }\n",
        "        create: { size: 16M }\n      - path: @DIR@/db1.raw\n        create: { size: 16M }\n",
    );
    appliance.rewrite_config(&with_lun_1);
    let (_, len) = s.fe.wait_used_on(1, std::time::Duration::from_secs(20));
    assert_eq!(len, 16, "a virtio_scsi_event");
    let event = s.fe.read_mem(EVENT_BUFFER, 4);
    assert_ne!(event, [0, 0, 0, 0], "an event type");

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

    // Idle, no worker spins: polling stops after its window (an event queue that polled
    // its never-reset eventfd once kept a core busy for ever).
    std::thread::sleep(std::time::Duration::from_millis(300));
    let pid = appliance.process.pid();
    let before = cpu_time(pid);
    std::thread::sleep(std::time::Duration::from_secs(1));
    let busy = cpu_time(pid).saturating_sub(before);
    assert!(
        busy < std::time::Duration::from_millis(300),
        "an idle daemon used {busy:?} of CPU in 1 s"
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
