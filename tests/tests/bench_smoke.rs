//! The benchmark program (`bin/bench.rs`) works end to end: a short run over some backings
//! starts every server, measures every row, and writes a table, JSON and an SVG chart whose
//! rows are all there. The figures are not checked (this is a debug build on a shared
//! machine); that the program runs and reports is.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

use appliance_tests::daemon::{scratch_dir, workspace_binary};

#[test]
#[ignore = "full tier (tests/run.sh): needs fio, qemu-storage-daemon, qemu-img, vhost-device-scsi and Ceph from tests/scripts/install-deps.sh"]
fn a_short_benchmark_run_reports_every_row() {
    let out = scratch_dir();
    let tmpfs = tempfile::tempdir_in("/dev/shm").unwrap();
    let output = Command::new(workspace_binary("bench"))
        .args(["--seconds", "0.2", "--poll-us", "16", "--size-mib", "64"])
        .args(["--workload", "randread-qd1", "randwrite-4q"])
        .args([
            "--backing",
            "raw-direct",
            "qcow2-tmpfs",
            "null",
            "scsi-raw-tmpfs",
            "rbd",
        ])
        .arg("--out")
        .arg(out.path())
        .arg("--tmpfs")
        .arg(tmpfs.path())
        .arg("--disk")
        .arg(out.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "bench failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("vs QSD"), "{stdout}");

    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("bench.json")).unwrap()).unwrap();
    let rows = json["rows"].as_array().unwrap();
    let has = |backing: &str, workload: &str, server: &str| {
        rows.iter().any(|r| {
            r["backing"] == backing
                && r["workload"] == workload
                && r["server"] == server
                && r["result"]["ios"].as_u64().unwrap_or(0) > 0
        })
    };
    let ours = ["ours", "ours-poll", "ours-poll-fixed"];
    for backing in ["raw-direct", "qcow2-tmpfs", "null"] {
        for workload in ["4k-randread-qd1", "4k-randwrite-4q-qd8"] {
            for server in ours.iter().chain(&["qsd"]) {
                assert!(
                    has(backing, workload, server),
                    "no {backing} {workload} {server} row"
                );
            }
            assert_eq!(
                has(backing, workload, "fio"),
                backing == "raw-direct",
                "{backing} {workload}: fio runs on raw files only"
            );
        }
    }
    for server in ours.iter().chain(&["vhost-device-scsi", "fio"]) {
        assert!(
            has("scsi-raw-tmpfs", "4k-randread-qd1", server),
            "no scsi {server} row"
        );
    }
    for server in ours.iter().chain(&["qsd", "fio"]) {
        assert!(has("rbd", "4k-randread-qd1", server), "no rbd {server} row");
    }
    assert!(
        !has("rbd", "4k-randwrite-4q-qd8", "ours"),
        "rbd rows use one queue"
    );
    // Every daemon row has its CPU cost and a ratio to its peer.
    for r in rows
        .iter()
        .filter(|r| ours.contains(&r["server"].as_str().unwrap()))
    {
        assert!(
            r["result"]["cpu_s_per_million_ios"].as_f64().is_some(),
            "{r}"
        );
        assert!(r["vs_peer"].as_f64().is_some_and(|x| x > 0.0), "{r}");
    }
    assert!(json["machine"]["cpus"].as_u64().unwrap() >= 1);

    let svg = std::fs::read_to_string(out.path().join("bench.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert!(svg.matches("<rect").count() >= 10, "{svg}");
}
