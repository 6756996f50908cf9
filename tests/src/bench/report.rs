//! The benchmark's output: a text table (stdout), JSON and an SVG chart.
//!
//! Every row is compared with qemu-storage-daemon's row of the same backing and workload
//! ("vs QSD") and with fio's ("vs limit") by the workload's figure of merit: mean latency
//! for QD1 workloads (ratio < 1 is faster), IOPS otherwise (ratio > 1 is faster).
//!
//! The chart is written by hand (a few dozen lines of SVG text): a chart crate (plotters)
//! needs a font backend to lay out labels, for one bar chart.

use std::fmt::Write as _;

use serde_json::{json, Value};

use super::{Measured, Workload};

/// One measured row.
#[derive(Debug, Clone)]
pub struct Row {
    /// Backing name ([`super::servers::Backing::name`]).
    pub backing: &'static str,
    pub workload: Workload,
    /// `ours`, `ours-poll`, `qsd`, `vhost-device-scsi`, `fio` ...
    pub server: String,
    pub measured: Measured,
}

/// The server rows are compared with: the peer daemon of the backing.
pub fn is_peer(server: &str) -> bool {
    server == "qsd" || server == "vhost-device-scsi"
}

/// The figure of merit of `m` for workload `w`: µs (latency workloads) or IOPS.
fn merit(w: &Workload, m: &Measured) -> f64 {
    if w.latency {
        m.lat_us[0]
    } else {
        m.iops()
    }
}

/// `row`'s figure of merit divided by that of the row of `server_pred` with the same backing
/// and workload.
fn ratio(rows: &[Row], row: &Row, server_pred: impl Fn(&str) -> bool) -> Option<f64> {
    let other = rows.iter().find(|r| {
        r.backing == row.backing && r.workload.name == row.workload.name && server_pred(&r.server)
    })?;
    let base = merit(&other.workload, &other.measured);
    (base > 0.0).then(|| merit(&row.workload, &row.measured) / base)
}

/// The run with the median figure of merit among `runs` (at least one).
pub fn median(w: &Workload, mut runs: Vec<Measured>) -> Measured {
    runs.sort_by(|a, b| merit(w, a).total_cmp(&merit(w, b)));
    let mid = runs.len() / 2;
    runs.swap_remove(mid)
}

fn si(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

/// The text table, one section per backing.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    let mut backing = "";
    for r in rows {
        if r.backing != backing {
            backing = r.backing;
            let _ = writeln!(
                out,
                "\n== {backing}\n{:<22} {:<18} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>7} {:>7}",
                "workload", "server", "IOPS", "MB/s", "mean µs", "p50", "p99", "p99.9", "cpu s/M", "vs QSD", "vs lim"
            );
        }
        let m = &r.measured;
        let fmt_ratio = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.2}×"));
        let _ = writeln!(
            out,
            "{:<22} {:<18} {:>8} {:>8.0} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>9} {:>7} {:>7}",
            r.workload.name,
            r.server,
            si(m.iops()),
            m.mbps(),
            m.lat_us[0],
            m.lat_us[1],
            m.lat_us[2],
            m.lat_us[3],
            m.cpu_s_per_mio
                .map_or("-".to_string(), |c| format!("{c:.1}")),
            fmt_ratio(ratio(rows, r, is_peer).filter(|_| !is_peer(&r.server))),
            fmt_ratio(ratio(rows, r, |s| s == "fio").filter(|_| r.server != "fio")),
        );
    }
    out.push_str(
        "\nvs QSD / vs lim: mean latency ratio for qd1 rows (below 1 is faster), IOPS ratio otherwise (above 1 is faster).\n",
    );
    out
}

/// The JSON document: `machine` (free-form facts) and every row.
pub fn json(rows: &[Row], machine: Value) -> Value {
    let rows: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "backing": r.backing,
                "workload": r.workload.name,
                "block_bytes": r.workload.block,
                "queues": r.workload.queues,
                "depth_per_queue": r.workload.depth,
                "server": r.server,
                "result": r.measured.json(),
                "vs_peer": ratio(rows, r, is_peer),
                "vs_limit": ratio(rows, r, |s| s == "fio"),
            })
        })
        .collect();
    json!({ "machine": machine, "rows": rows })
}

/// The rows of a JSON document written by [`json`] (to draw its table and chart again).
/// Rows of unknown backings or workloads are skipped.
pub fn rows_from_json(doc: &Value) -> Vec<Row> {
    let workloads = super::suite(usize::MAX);
    let backings = super::servers::Backing::ALL;
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    doc["rows"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(|r| {
            let backing = backings.iter().find(|b| r["backing"] == b.name())?.name();
            let workload = *workloads.iter().find(|w| r["workload"] == w.name)?;
            let m = &r["result"];
            let lat = &m["lat_us"];
            Some(Row {
                backing,
                workload,
                server: r["server"].as_str()?.to_string(),
                measured: Measured {
                    ios: m["ios"].as_u64().unwrap_or(0),
                    seconds: f(&m["seconds"]),
                    lat_us: [
                        f(&lat["mean"]),
                        f(&lat["p50"]),
                        f(&lat["p99"]),
                        f(&lat["p99_9"]),
                    ],
                    block: workload.block,
                    cpu_s_per_mio: m["cpu_s_per_million_ios"].as_f64(),
                },
            })
        })
        .collect()
}

/// A horizontal bar chart: for each backing and workload, the speed of this daemon with
/// its defaults (`ours`, and `ours-vvu-*`) and of the limit (`fio`) relative to the peer's
/// (peer = 1; latency rows inverted so that longer bars are faster). The poll rows are in
/// the table and the JSON.
pub fn svg(rows: &[Row]) -> String {
    let charted = |s: &str| s == "ours" || s == "fio" || s.starts_with("ours-vvu");
    let bars: Vec<(String, &str, f64)> = rows
        .iter()
        .filter(|r| charted(&r.server))
        .filter_map(|r| {
            let x = ratio(rows, r, is_peer)?;
            let speed = if r.workload.latency { 1.0 / x } else { x };
            Some((
                format!("{} {}", r.backing, r.workload.name),
                r.server.as_str(),
                speed,
            ))
        })
        .collect();
    let servers: Vec<&str> = {
        let mut s: Vec<&str> = bars.iter().map(|b| b.1).collect();
        s.sort_unstable();
        s.dedup();
        s
    };
    let colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"];
    let colour =
        |s: &str| colours[servers.iter().position(|x| *x == s).unwrap_or(0) % colours.len()];
    let max = bars.iter().map(|b| b.2).fold(1.0f64, f64::max).ceil();
    let (left, width, bar_h) = (330.0, 560.0, 12.0);
    // Bars from y = 34, then the axis labels, then one legend line per server.
    let bars_end = 34.0 + bars.len() as f64 * (bar_h + 2.0);
    let height = bars_end + 30.0 + servers.len() as f64 * 16.0;
    let x = |v: f64| left + v / max * width;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{height}" font-family="sans-serif" font-size="11">"#,
        left + width + 20.0
    );
    let _ = writeln!(
        s,
        r#"<text x="10" y="18" font-size="14">Speed relative to the peer daemon (qemu-storage-daemon; vhost-device-scsi for SCSI) = 1</text>"#
    );
    let mut tick = 0.0;
    while tick <= max {
        let _ = writeln!(
            s,
            r##"<line x1="{0}" y1="30" x2="{0}" y2="{1}" stroke="#ccc"/><text x="{0}" y="{2}" text-anchor="middle">{tick}</text>"##,
            x(tick),
            bars_end,
            bars_end + 12.0,
        );
        tick += if max > 6.0 { 1.0 } else { 0.5 };
    }
    let mut y = 34.0;
    let mut last = String::new();
    for (label, server, v) in &bars {
        if *label != last {
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="end">{label}</text>"#,
                left - 6.0,
                y + bar_h - 2.0
            );
            last = label.clone();
        }
        let _ = writeln!(
            s,
            r#"<rect x="{left}" y="{y}" width="{:.1}" height="{bar_h}" fill="{}"><title>{server}: {v:.2}</title></rect>"#,
            (x(*v) - left).max(0.5),
            colour(server)
        );
        y += bar_h + 2.0;
    }
    let _ = writeln!(
        s,
        r##"<line x1="{0}" y1="30" x2="{0}" y2="{y}" stroke="#000"/>"##,
        x(1.0)
    );
    for (i, server) in servers.iter().enumerate() {
        let ly = bars_end + 32.0 + 16.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<rect x="{left}" y="{}" width="10" height="10" fill="{}"/><text x="{}" y="{}">{server}</text>"#,
            ly - 9.0,
            colour(server),
            left + 14.0,
            ly
        );
    }
    s.push_str("</svg>\n");
    s
}
