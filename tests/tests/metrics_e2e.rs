//! The metrics endpoint end to end: the real daemon serving a virtio-blk export (two
//! queues) and a two-LUN virtio-scsi export, driven by libblkio and the raw frontends with a
//! known set of requests — reads, writes, flushes, discards, write-zeroes, a refused
//! request, SCSI CHECK CONDITIONs, a task management function — then `/metrics` scraped:
//! - `promtool check metrics` (Prometheus 2.42, Debian bookworm) exits 0 with no findings;
//! - every request, byte and error counter equals exactly what the test did, the latency
//!   histograms count every request, nothing is left in flight;
//! - connections, disconnects, LUN capacities, exports by state, `/healthz`.
//!
//! And the Grafana dashboard (`appliance/grafana/dashboard.json`): every panel expression
//! passes `promtool check rules`, and every metric it names is in a real scrape.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use appliance_tests::blk_raw;
use appliance_tests::blkio_frontend::Frontend;
use appliance_tests::daemon::Appliance;
use appliance_tests::frontend::RawFrontend;
use appliance_tests::prom;
use appliance_tests::scsi_frontend::{ScsiFrontend, REQ, RESP};
use vvu_transport::split_ring::Buffer;

const KIB: usize = 1 << 10;
const MIB: u64 = 1 << 20;

const CONFIG: &str = "state_dir: @DIR@/state
metrics:
  listen: 127.0.0.1:0
exports:
  - name: vol0
    type: blk
    socket: @DIR@/vol0.sock
    path: @DIR@/vol0.raw
    create: { size: 64M }
    num_queues: 2
  - name: db
    type: scsi
    socket: @DIR@/db.sock
    num_queues: 1
    luns:
      - path: @DIR@/db0.raw
        create: { size: 16M }
      - lun: 2
        path: @DIR@/db2.raw
        create: { size: 32M }
  - name: gone
    type: blk
    socket: @DIR@/gone.sock
    path: @DIR@/does-not-exist.raw
";

/// Requests of one op the workload makes on one LUN: (export, lun, op, requests, bytes).
type Expect = (&'static str, &'static str, &'static str, u64, u64);

/// SCSI status CHECK CONDITION, and the sense keys the workload provokes.
const CHECK_CONDITION: u8 = 2;
const ILLEGAL_REQUEST: u8 = 0x05;
const UNIT_ATTENTION: u8 = 0x06;

/// Starts the daemon and runs the workload; returns the daemon and its endpoint.
fn run_workload() -> (Appliance, SocketAddr) {
    let appliance = Appliance::start(CONFIG, &["vol0.sock", "db.sock"]);
    let addr = prom::endpoint(&appliance);

    // libblkio on vol0, both queues.
    {
        let mut fe = Frontend::connect(&appliance.path("vol0.sock"), 2);
        for i in 0..5u64 {
            assert_eq!(fe.write(0, i * 64 * KIB as u64, 0, 64 * KIB), 0);
        }
        for i in 0..3u64 {
            assert_eq!(fe.read(0, i * 16 * KIB as u64, 0, 16 * KIB), 0);
        }
        assert_eq!(fe.flush(0), 0);
        assert_eq!(fe.flush(0), 0);
        assert_eq!(fe.discard(0, MIB, 128 * KIB as u64), 0);
        assert_eq!(fe.write_zeroes(0, 2 * MIB, 256 * KIB as u64), 0);
        assert_eq!(fe.write(1, 8 * MIB, 0, 4 * KIB), 0);
        assert_eq!(fe.write(1, 9 * MIB, 0, 4 * KIB), 0);
        assert_eq!(fe.read(1, 8 * MIB, 0, 4 * KIB), 0);
    }
    wait_disconnects(addr, "vol0", 1);

    // The raw frontend on vol0: a read past the end is refused (IOERR, out of range).
    {
        let mut fe = RawFrontend::connect(&appliance.path("vol0.sock"), 16, u64::MAX);
        let (_, status) = blk_raw::read(&mut fe, 64 * MIB / 512, 4096);
        assert_eq!(status, 1, "VIRTIO_BLK_S_IOERR");
    }
    wait_disconnects(addr, "vol0", 2);

    // The raw virtio-scsi frontend on db.
    {
        let mut s = ScsiFrontend::connect(&appliance.path("db.sock"), 1);
        let tur = [0x00, 0, 0, 0, 0, 0];
        // LUN 0: the power-on unit attention, then a good TEST UNIT READY.
        let r = s.command(0, &tur, &[], 0);
        assert_eq!((r.status, r.sense.0), (CHECK_CONDITION, UNIT_ATTENTION));
        s.good(0, &tur, &[], 0);
        // WRITE(10) 16 blocks at LBA 8, READ(10) 8 blocks, SYNCHRONIZE CACHE(10).
        s.good(0, &[0x2a, 0, 0, 0, 0, 8, 0, 0, 16, 0], &[0x5a; 8192], 0);
        s.good(0, &[0x28, 0, 0, 0, 0, 8, 0, 0, 8, 0], &[], 4096);
        s.good(0, &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 0);
        // UNMAP 32 blocks at LBA 64.
        let mut params = vec![0u8; 24];
        params[1] = 22;
        params[3] = 16;
        params[8..16].copy_from_slice(&64u64.to_be_bytes());
        params[16..20].copy_from_slice(&32u32.to_be_bytes());
        s.good(0, &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], &params, 0);
        // READ(10) past the end of the 16 MiB LUN: ILLEGAL REQUEST.
        let r = s.command(0, &[0x28, 0, 0, 0x01, 0, 0, 0, 0, 1, 0], &[], 512);
        assert_eq!((r.status, r.sense.0), (CHECK_CONDITION, ILLEGAL_REQUEST));
        // LUN 2: its unit attention, then INQUIRY.
        let r = s.command(2, &tur, &[], 0);
        assert_eq!((r.status, r.sense.0), (CHECK_CONDITION, UNIT_ATTENTION));
        s.good(2, &[0x12, 0, 0, 0, 96, 0], &[], 96);
        // LUN 5 does not exist: LOGICAL UNIT NOT SUPPORTED.
        let r = s.command(5, &tur, &[], 0);
        assert_eq!((r.status, r.sense.0), (CHECK_CONDITION, ILLEGAL_REQUEST));
        // LOGICAL UNIT RESET on LUN 2 (control queue): FUNCTION SUCCEEDED.
        let mut tmf = vec![0u8; 24];
        tmf[4..8].copy_from_slice(&5u32.to_le_bytes());
        tmf[8..16].copy_from_slice(&ScsiFrontend::lun_field(2));
        s.fe.write_mem(REQ, &tmf);
        let head =
            s.fe.submit_on(0, &[Buffer::readable(REQ, 24), Buffer::writable(RESP, 1)]);
        assert_eq!(s.fe.wait_used_on(0, Duration::from_secs(10)), (head, 1));
        assert_eq!(s.fe.read_mem(RESP, 1)[0], 10, "FUNCTION SUCCEEDED");
    }
    wait_disconnects(addr, "db", 1);
    (appliance, addr)
}

/// Waits until export `export` has seen `n` disconnects.
fn wait_disconnects(addr: SocketAddr, export: &str, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = prom::scrape(addr);
        let ended = s.sum(
            "vhost_appliance_export_disconnects_total",
            &[("export", export)],
        );
        if ended >= n as f64 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{export}: {ended} disconnects, want {n}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The per-op figures the workload produces: (export, lun, op, requests, bytes).
const EXPECTED: [Expect; 12] = [
    // vol0: 5 x 64 KiB + 2 x 4 KiB writes; 3 x 16 KiB + 4 KiB reads, one more refused.
    ("vol0", "0", "write", 7, 5 * 64 * 1024 + 2 * 4096),
    ("vol0", "0", "read", 5, 3 * 16 * 1024 + 4096),
    ("vol0", "0", "flush", 2, 0),
    ("vol0", "0", "discard", 1, 128 * 1024),
    ("vol0", "0", "write_zeroes", 1, 256 * 1024),
    ("vol0", "0", "other", 0, 0),
    // db LUN 0: WRITE(10) 8 KiB; READ(10) 4 KiB and one past the end; SYNCHRONIZE CACHE;
    // UNMAP of 16 KiB; two TEST UNIT READY (the first answered with a unit attention).
    ("db", "0", "write", 1, 8192),
    ("db", "0", "read", 2, 4096),
    ("db", "0", "flush", 1, 0),
    ("db", "0", "discard", 1, 16384),
    ("db", "0", "other", 2, 0),
    // db LUN 2: TEST UNIT READY (unit attention) and INQUIRY.
    ("db", "2", "other", 2, 0),
];

#[test]
#[ignore = "full tier (tests/run.sh): needs promtool from tests/scripts/install-deps.sh"]
fn counters_equal_the_io_performed_and_promtool_accepts_them() {
    let (appliance, addr) = run_workload();
    let s = prom::scrape(addr);
    prom::check_metrics(&s.text);

    for (export, lun, op, requests, bytes) in EXPECTED {
        let l = [("export", export), ("lun", lun), ("op", op)];
        let what = format!("{export} lun {lun} {op}");
        assert_eq!(
            s.value("vhost_appliance_requests_total", &l),
            requests as f64,
            "{what}: requests"
        );
        assert_eq!(
            s.value("vhost_appliance_request_bytes_total", &l),
            bytes as f64,
            "{what}: bytes"
        );
        let count = s.value("vhost_appliance_request_duration_seconds_count", &l);
        assert_eq!(count, requests as f64, "{what}: histogram count");
        let mut inf = l.to_vec();
        inf.push(("le", "+Inf"));
        let in_inf = s.value("vhost_appliance_request_duration_seconds_bucket", &inf);
        assert_eq!(in_inf, count, "{what}: +Inf bucket");
    }
    // Nothing else was asked of any LUN.
    let expected_total: u64 = EXPECTED.iter().map(|e| e.3).sum::<u64>() + 1; // + LUN 5
    assert_eq!(
        s.sum("vhost_appliance_requests_total", &[]),
        expected_total as f64
    );
    assert_eq!(
        s.value(
            "vhost_appliance_requests_total",
            &[("export", "db"), ("lun", "none"), ("op", "other")]
        ),
        1.0,
        "the command to LUN 5 is counted under lun=none"
    );

    // Failures, exactly: the refused blk read, the SCSI read past the end, LUN 5, and the
    // two unit attentions.
    let failed: BTreeSet<(String, u64)> = s
        .matching("vhost_appliance_requests_failed_total", &[])
        .map(|x| {
            let l = &x.labels;
            let key = format!("{} {} {} {}", l["export"], l["lun"], l["op"], l["reason"]);
            (key, x.value as u64)
        })
        .collect();
    let want: BTreeSet<(String, u64)> = [
        ("vol0 0 read invalid", 1),
        ("db 0 read invalid", 1),
        ("db 0 other unit_attention", 1),
        ("db 2 other unit_attention", 1),
        ("db none other invalid", 1),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(failed, want);
    assert_eq!(
        s.value(
            "vhost_appliance_blk_refusals_total",
            &[("export", "vol0"), ("reason", "out_of_range")]
        ),
        1.0
    );
    assert_eq!(s.sum("vhost_appliance_blk_refusals_total", &[]), 1.0);
    let checks: BTreeSet<(String, u64)> = s
        .matching("vhost_appliance_scsi_check_conditions_total", &[])
        .map(|x| {
            let l = &x.labels;
            (
                format!("{} {} {}", l["export"], l["lun"], l["sense_key"]),
                x.value as u64,
            )
        })
        .collect();
    let want: BTreeSet<(String, u64)> = [
        ("db 0 unit_attention", 1),
        ("db 0 illegal_request", 1),
        ("db 2 unit_attention", 1),
        ("db none illegal_request", 1),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(checks, want);
    let tmf = |function| {
        s.value(
            "vhost_appliance_scsi_task_management_total",
            &[("export", "db"), ("function", function)],
        )
    };
    assert_eq!(tmf("logical_unit_reset"), 1.0);
    assert_eq!(
        s.sum("vhost_appliance_scsi_task_management_total", &[]),
        1.0
    );

    // Queues: vol0's queue 0 answered 13 requests (one refused), queue 1 three; db's
    // request queue (2) all ten SCSI commands. Each was kicked and notified: at most once
    // per request, plus up to two kicks per connection (below).
    let queue =
        |name: &str, export: &str, q: &str| s.value(name, &[("export", export), ("queue", q)]);
    assert_eq!(
        queue("vhost_appliance_queue_requests_total", "vol0", "0"),
        13.0
    );
    assert_eq!(
        queue("vhost_appliance_queue_requests_total", "vol0", "1"),
        3.0
    );
    assert_eq!(
        queue("vhost_appliance_queue_requests_total", "db", "2"),
        10.0
    );
    assert_eq!(
        queue("vhost_appliance_queue_requests_total", "db", "0"),
        0.0
    );
    for (export, q, requests, connections) in [
        ("vol0", "0", 13.0, 2.0),
        ("vol0", "1", 3.0, 1.0),
        ("db", "2", 10.0, 1.0),
    ] {
        let kicks = queue("vhost_appliance_queue_kicks_total", export, q);
        let calls = queue("vhost_appliance_queue_notifications_total", export, q);
        // Per connection up to two kicks besides the requests': the frontend's when it
        // starts the ring, and the daemon's own when the kick fd is installed (it signals
        // a new kick fd once, `appliance/src/vring.rs`); the two may coalesce.
        assert!(
            kicks >= 1.0 && kicks <= requests + 2.0 * connections,
            "{export}/{q}: {kicks} kicks"
        );
        assert!(
            calls >= 1.0 && calls <= requests,
            "{export}/{q}: {calls} notifications"
        );
    }
    // The TMF came on the control queue.
    assert!(queue("vhost_appliance_queue_kicks_total", "db", "0") >= 1.0);
    assert_eq!(s.sum("vhost_appliance_queue_inflight_requests", &[]), 0.0);
    assert_eq!(s.sum("vhost_appliance_lun_inflight_requests", &[]), 0.0);
    assert_eq!(
        s.sum("vhost_appliance_queue_malformed_requests_total", &[]),
        0.0
    );

    // Connections: vol0 had two frontends, db one; all gone, cleanly.
    for (export, n) in [("vol0", 2.0), ("db", 1.0)] {
        let e = [("export", export)];
        assert_eq!(s.value("vhost_appliance_export_connections_total", &e), n);
        assert_eq!(
            s.value("vhost_appliance_export_frontend_connected", &e),
            0.0
        );
        let clean = [("export", export), ("reason", "clean")];
        assert_eq!(
            s.value("vhost_appliance_export_disconnects_total", &clean),
            n
        );
        assert_eq!(s.sum("vhost_appliance_export_disconnects_total", &e), n);
    }
    let info = [("export", "db"), ("type", "scsi"), ("transport", "socket")];
    assert_eq!(s.value("vhost_appliance_export_info", &info), 1.0);

    // LUNs, exports by state, reloads, build and process.
    for (export, lun, bytes) in [
        ("vol0", "0", 64 * MIB),
        ("db", "0", 16 * MIB),
        ("db", "2", 32 * MIB),
    ] {
        let l = [("export", export), ("lun", lun)];
        assert_eq!(
            s.value("vhost_appliance_lun_capacity_bytes", &l),
            bytes as f64
        );
    }
    assert_eq!(
        s.value("vhost_appliance_exports", &[("state", "serving")]),
        2.0
    );
    assert_eq!(
        s.value("vhost_appliance_exports", &[("state", "failed")]),
        1.0
    );
    assert!(!s.text.contains("export=\"gone\""));
    assert!(
        !s.text.contains(&*appliance.dir.path().to_string_lossy()),
        "no paths"
    );
    assert_eq!(
        s.value("vhost_appliance_config_last_reload_successful", &[]),
        1.0
    );
    assert_eq!(s.sum("vhost_appliance_config_reloads_total", &[]), 0.0);
    assert_eq!(
        s.matching("vhost_appliance_build_info", &[]).count(),
        1,
        "build info"
    );
    let pid_fds = std::fs::read_dir(format!("/proc/{}/fd", appliance.process.pid()))
        .unwrap()
        .count() as f64;
    let fds = s.value("process_open_fds", &[]);
    assert!((fds - pid_fds).abs() <= 2.0, "open fds {fds} vs {pid_fds}");
    assert!(s.value("process_resident_memory_bytes", &[]) > 1e6);
    assert!(s.value("process_cpu_seconds_total", &[]) >= 0.0);

    // Liveness, and what else the endpoint answers.
    let (status, _, body) = prom::get(addr, "/healthz");
    assert_eq!(
        (status.as_str(), body.as_str()),
        ("HTTP/1.1 200 OK", "ok\n")
    );
    assert!(prom::get(addr, "/").0.contains("404"));
}

/// Grafana's built-in interval variables, replaced as Grafana would for a 5-minute range.
const GRAFANA_VARIABLES: [(&str, &str); 6] = [
    ("$__rate_interval", "1m"),
    ("${__rate_interval}", "1m"),
    ("$__interval", "15s"),
    ("${__interval}", "15s"),
    ("$__range", "5m"),
    ("${__range}", "5m"),
];

/// Every `targets[].expr` of the dashboard's panels (rows' nested panels included).
fn dashboard_expressions(dashboard: &serde_json::Value) -> Vec<(String, String)> {
    let mut found = Vec::new();
    let mut panels: Vec<&serde_json::Value> = dashboard["panels"]
        .as_array()
        .expect("dashboard panels")
        .iter()
        .collect();
    while let Some(panel) = panels.pop() {
        if let Some(nested) = panel["panels"].as_array() {
            panels.extend(nested);
        }
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                let title = panel["title"].as_str().unwrap_or("?").to_string();
                found.push((title, expr.to_string()));
            }
        }
    }
    found
}

/// `$var` / `${var}` / `[[var]]` of the dashboard's own template variables → `.*`.
fn substitute(expr: &str, variables: &[String]) -> String {
    let mut e = expr.to_string();
    for (from, to) in GRAFANA_VARIABLES {
        e = e.replace(from, to);
    }
    for v in variables {
        for form in [format!("${{{v}}}"), format!("${v}"), format!("[[{v}]]")] {
            e = e.replace(&form, ".*");
        }
    }
    assert!(!e.contains('$'), "unsubstituted variable in {expr}");
    e
}

#[test]
#[ignore = "full tier (tests/run.sh): needs promtool from tests/scripts/install-deps.sh"]
fn dashboard_expressions_pass_promtool_and_name_scraped_metrics() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../appliance/grafana/dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let variables: Vec<String> = dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["name"].as_str().map(String::from))
        .collect();
    assert!(
        variables.iter().any(|v| v == "datasource"),
        "a datasource variable"
    );
    let exprs = dashboard_expressions(&dashboard);
    assert!(exprs.len() >= 10, "{} expressions", exprs.len());
    // Panel ids are unique; every panel other than a row has a query.
    let mut ids = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        assert!(ids.insert(panel["id"].as_u64().unwrap()), "duplicate id");
        if panel["type"] != "row" {
            assert!(
                panel["targets"].as_array().is_some_and(|t| !t.is_empty()),
                "panel {} has no query",
                panel["title"]
            );
        }
    }

    // Every expression, as a recording rule: promtool parses it as Prometheus would.
    let dir = appliance_tests::daemon::scratch_dir();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (_, expr)) in exprs.iter().enumerate() {
        let e = substitute(expr, &variables);
        rules.push_str(&format!(
            "      - record: dashboard:expr_{i}\n        expr: {}\n",
            serde_json::to_string(&e).unwrap()
        ));
    }
    let file = dir.path().join("dashboard-rules.yml");
    std::fs::write(&file, &rules).unwrap();
    prom::check_rules(&file);

    // Every metric name the dashboard uses is in a real scrape (after the workload, which
    // makes the failure families appear).
    let (_appliance, addr) = run_workload();
    let scraped = prom::scrape(addr).names();
    let mut used = BTreeSet::new();
    for (title, expr) in &exprs {
        for name in metric_names(expr) {
            assert!(
                scraped.contains(&name),
                "panel {title:?} uses {name}, which the daemon does not export"
            );
            used.insert(name);
        }
    }
    for family in [
        "vhost_appliance_requests_total",
        "vhost_appliance_request_bytes_total",
        "vhost_appliance_request_duration_seconds_bucket",
        "vhost_appliance_requests_failed_total",
        "vhost_appliance_queue_inflight_requests",
        "vhost_appliance_export_frontend_connected",
        "vhost_appliance_config_reloads_total",
    ] {
        assert!(used.contains(family), "the dashboard shows {family}");
    }
}

/// Names of the `vhost_appliance_*` and `process_*` metrics an expression uses.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    for prefix in ["vhost_appliance_", "process_"] {
        let mut rest = expr;
        while let Some(i) = rest.find(prefix) {
            let preceded = rest[..i]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(tail.len());
            if !preceded {
                names.push(tail[..end].to_string());
            }
            rest = &tail[end..];
        }
    }
    names
}
