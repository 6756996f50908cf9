//! The scrape-time collectors and their encoding: [`StateCollector`] snapshots every
//! export's counters (summed per export, LUN, op and queue) and writes the daemon, export,
//! LUN and queue families; [`ProcessCollector`] writes the standard `process_*` families.
//! Also the small helpers that start a family and write a counter or gauge sample.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use targets::stats::{
    Failure, Op, FAILURES, LATENCY_BUCKETS_NS, LATENCY_SLOTS, OPS, SENSE_KEYS, TMF_FUNCTIONS,
};

use super::{load, DisconnectReason, ExportSource, ExportState, State, COMMIT};

/// Starts a family; `name` without the `_total` a counter gets.
fn family<'a>(
    encoder: &'a mut DescriptorEncoder<'_>,
    name: &'a str,
    help: &str,
    metric_type: MetricType,
) -> Result<MetricEncoder<'a>, std::fmt::Error> {
    encoder.encode_descriptor(name, help, None, metric_type)
}

fn counter(family: &mut MetricEncoder<'_>, labels: &impl EncodeLabelSet, v: u64) -> Fmt {
    family
        .encode_family(labels)?
        .encode_counter::<NoLabelSet, u64, u64>(&v, None)
}

fn gauge<V: prometheus_client::encoding::EncodeGaugeValue>(
    family: &mut MetricEncoder<'_>,
    labels: &impl EncodeLabelSet,
    v: V,
) -> Fmt {
    family.encode_family(labels)?.encode_gauge(&v)
}

type Fmt = Result<(), std::fmt::Error>;

/// One LUN's counters summed over the export's queues.
#[derive(Debug, Clone)]
struct LunTotals {
    requests: [u64; OPS],
    bytes: [u64; OPS],
    duration_ns: [u64; OPS],
    buckets: [[u64; LATENCY_SLOTS]; OPS],
    failed: [[u64; FAILURES]; OPS],
    check_conditions: [u64; 16],
    inflight: u64,
}

impl Default for LunTotals {
    fn default() -> Self {
        LunTotals {
            requests: [0; OPS],
            bytes: [0; OPS],
            duration_ns: [0; OPS],
            buckets: [[0; LATENCY_SLOTS]; OPS],
            failed: [[0; FAILURES]; OPS],
            check_conditions: [0; 16],
            inflight: 0,
        }
    }
}

/// One queue's counters.
#[derive(Debug)]
struct QueueTotals {
    index: usize,
    requests: u64,
    inflight: u64,
    kicks: u64,
    notifications: u64,
    polled: u64,
    malformed: u64,
}

/// One export, as read at the start of a scrape.
#[derive(Debug)]
struct ExportSnapshot {
    name: String,
    kind: &'static str,
    transport: &'static str,
    /// LUN label → counters; LUN numbers in order, then `none`.
    luns: BTreeMap<LunKey, LunTotals>,
    capacities: Vec<(u16, u64)>,
    queues: Vec<QueueTotals>,
    refused: Vec<u64>,
    tmf: [u64; TMF_FUNCTIONS.len()],
    connected: bool,
    connections: u64,
    disconnects: [u64; 3],
}

/// A LUN slot's label: a LUN number, or none (sorts last).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum LunKey {
    Lun(u16),
    None,
}

impl LunKey {
    fn label(self) -> String {
        match self {
            LunKey::Lun(id) => id.to_string(),
            LunKey::None => "none".to_string(),
        }
    }
}

impl ExportSnapshot {
    fn read(name: &str, source: &ExportSource) -> Self {
        let capacities = source.device.lun_capacities();
        let mut luns: BTreeMap<LunKey, LunTotals> = capacities
            .iter()
            .map(|&(id, _)| (LunKey::Lun(id), LunTotals::default()))
            .collect();
        let mut queues = Vec::with_capacity(source.queues.len());
        let mut refused = vec![0u64; targets::blk::Refusal::ALL.len()];
        let mut tmf = [0u64; TMF_FUNCTIONS.len()];
        for (index, stats) in &source.queues {
            let mut q = QueueTotals {
                index: *index,
                requests: 0,
                inflight: 0,
                kicks: load(&stats.kicks),
                notifications: load(&stats.notifications),
                polled: load(&stats.polled),
                malformed: load(&stats.malformed),
            };
            for lun in stats.luns() {
                let key = lun.lun.map_or(LunKey::None, LunKey::Lun);
                let t = luns.entry(key).or_default();
                for op in 0..OPS {
                    let o = &lun.ops[op];
                    // The histogram's count is the sum of its buckets, read once, so the
                    // exposition is self-consistent even while the queue is counting.
                    let mut count = 0;
                    for (slot, b) in o.buckets.iter().enumerate() {
                        let n = load(b);
                        t.buckets[op][slot] += n;
                        count += n;
                    }
                    t.requests[op] += load(&o.requests);
                    t.bytes[op] += load(&o.bytes);
                    t.duration_ns[op] += load(&o.duration_ns);
                    q.requests += count;
                    for (reason, f) in lun.failed[op].iter().enumerate() {
                        t.failed[op][reason] += load(f);
                    }
                }
                for (key, c) in lun.check_conditions.iter().enumerate() {
                    t.check_conditions[key] += load(c);
                }
                let inflight = load(&lun.inflight);
                t.inflight += inflight;
                q.inflight += inflight;
            }
            for (total, c) in refused.iter_mut().zip(&stats.refused) {
                *total += load(c);
            }
            for (total, c) in tmf.iter_mut().zip(&stats.tmf) {
                *total += load(c);
            }
            queues.push(q);
        }
        let c = &source.connections;
        ExportSnapshot {
            name: name.to_string(),
            kind: source.kind,
            transport: source.transport,
            luns,
            capacities,
            queues,
            refused,
            tmf,
            connected: c.connected.load(Ordering::Relaxed),
            connections: load(&c.connections),
            disconnects: [0, 1, 2].map(|i| load(&c.disconnects[i])),
        }
    }
}

/// Daemon, export, LUN and queue families.
#[derive(Debug)]
pub(super) struct StateCollector(pub(super) Arc<State>);

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (snapshots, states) = {
            let exports = self.0.exports.lock().unwrap_or_else(|p| p.into_inner());
            let snapshots: Vec<ExportSnapshot> = exports
                .iter()
                .filter_map(|(name, e)| e.source.as_ref().map(|s| ExportSnapshot::read(name, s)))
                .collect();
            let mut states = [0u64; 2];
            for e in exports.values() {
                states[e.state as usize] += 1;
            }
            (snapshots, states)
        };
        self.daemon(&mut encoder, states)?;
        export_families(&mut encoder, &snapshots)?;
        lun_families(&mut encoder, &snapshots)?;
        queue_families(&mut encoder, &snapshots)
    }
}

impl StateCollector {
    fn daemon(&self, encoder: &mut DescriptorEncoder<'_>, states: [u64; 2]) -> Fmt {
        let s = &self.0;
        let mut f = family(
            encoder,
            "vhost_appliance_build_info",
            "Build of the running daemon (always 1).",
            MetricType::Gauge,
        )?;
        let labels = [("version", env!("CARGO_PKG_VERSION")), ("commit", COMMIT)];
        gauge(&mut f, &labels, 1u64)?;

        let mut f = family(
            encoder,
            "vhost_appliance_config_reloads",
            "Configuration reload attempts (file change or SIGHUP), by result.",
            MetricType::Counter,
        )?;
        for (i, result) in ["success", "failure"].into_iter().enumerate() {
            counter(&mut f, &[("result", result)], load(&s.reloads[i]))?;
        }
        family(
            encoder,
            "vhost_appliance_config_last_reload_successful",
            "Whether the last configuration load or reload succeeded (1) or was refused (0).",
            MetricType::Gauge,
        )?
        .encode_gauge(&u64::from(s.last_reload_ok.load(Ordering::Relaxed)))?;
        family(
            encoder,
            "vhost_appliance_config_last_reload_success_timestamp_seconds",
            "When the configuration was last loaded successfully, in seconds since the epoch.",
            MetricType::Gauge,
        )?
        .encode_gauge(&f64::from_bits(
            s.last_reload_success.load(Ordering::Relaxed),
        ))?;

        let mut f = family(
            encoder,
            "vhost_appliance_exports",
            "Exports declared in the configuration, by state (failed: could not be started).",
            MetricType::Gauge,
        )?;
        for state in ExportState::ALL {
            gauge(&mut f, &[("state", state.name())], states[state as usize])?;
        }
        Ok(())
    }
}

fn export_families(encoder: &mut DescriptorEncoder<'_>, exports: &[ExportSnapshot]) -> Fmt {
    let mut f = family(
        encoder,
        "vhost_appliance_export_info",
        "A running export (always 1): device type and transport.",
        MetricType::Gauge,
    )?;
    for e in exports {
        let labels = [
            ("export", e.name.as_str()),
            ("type", e.kind),
            ("transport", e.transport),
        ];
        gauge(&mut f, &labels, 1u64)?;
    }
    let mut f = family(
        encoder,
        "vhost_appliance_export_frontend_connected",
        "Whether a frontend is connected to the export (1) or not (0).",
        MetricType::Gauge,
    )?;
    for e in exports {
        gauge(
            &mut f,
            &[("export", e.name.as_str())],
            u64::from(e.connected),
        )?;
    }
    let mut f = family(
        encoder,
        "vhost_appliance_export_connections",
        "Frontend connections accepted by the export.",
        MetricType::Counter,
    )?;
    for e in exports {
        counter(&mut f, &[("export", e.name.as_str())], e.connections)?;
    }
    let mut f = family(
        encoder,
        "vhost_appliance_export_disconnects",
        "Frontend connections ended, by reason (clean: closed by the frontend; error: protocol or transport error; removed: ended by the daemon).",
        MetricType::Counter,
    )?;
    for e in exports {
        for reason in DisconnectReason::ALL {
            let labels = [("export", e.name.as_str()), ("reason", reason.name())];
            counter(&mut f, &labels, e.disconnects[reason as usize])?;
        }
    }
    let mut f = family(
        encoder,
        "vhost_appliance_scsi_task_management",
        "virtio-scsi task management functions received, by function.",
        MetricType::Counter,
    )?;
    for e in exports.iter().filter(|e| e.kind == "scsi") {
        for (function, n) in TMF_FUNCTIONS.iter().zip(e.tmf) {
            let labels = [("export", e.name.as_str()), ("function", *function)];
            counter(&mut f, &labels, n)?;
        }
    }
    let mut f = family(
        encoder,
        "vhost_appliance_blk_refusals",
        "virtio-blk requests refused without disk I/O, by refusal (the detail of requests_failed_total's invalid, unsupported and read_only reasons).",
        MetricType::Counter,
    )?;
    for e in exports.iter().filter(|e| e.kind == "blk") {
        for (refusal, n) in targets::blk::Refusal::ALL.iter().zip(&e.refused) {
            if *n > 0 {
                let labels = [("export", e.name.as_str()), ("reason", refusal.name())];
                counter(&mut f, &labels, *n)?;
            }
        }
    }
    Ok(())
}

fn lun_families(encoder: &mut DescriptorEncoder<'_>, exports: &[ExportSnapshot]) -> Fmt {
    // (export, lun label, counters) for every LUN slot.
    let luns: Vec<(&str, String, &LunTotals)> = exports
        .iter()
        .flat_map(|e| {
            e.luns
                .iter()
                .map(move |(key, t)| (e.name.as_str(), key.label(), t))
        })
        .collect();
    let mut f = family(
        encoder,
        "vhost_appliance_lun_capacity_bytes",
        "Current size of the LUN, in bytes.",
        MetricType::Gauge,
    )?;
    for e in exports {
        for (id, bytes) in &e.capacities {
            let lun = id.to_string();
            gauge(
                &mut f,
                &[("export", e.name.as_str()), ("lun", &lun)],
                *bytes,
            )?;
        }
    }
    let mut f = family(
        encoder,
        "vhost_appliance_lun_inflight_requests",
        "Requests of the LUN handed to the disk and not completed yet.",
        MetricType::Gauge,
    )?;
    // Requests to no LUN never reach a disk.
    for (export, lun, t) in luns.iter().filter(|(_, lun, _)| lun != "none") {
        gauge(&mut f, &[("export", *export), ("lun", lun)], t.inflight)?;
    }
    let mut f = family(
        encoder,
        "vhost_appliance_requests",
        "Requests answered (successful or not), by operation.",
        MetricType::Counter,
    )?;
    for (export, lun, t) in &luns {
        for op in Op::ALL {
            let labels = [("export", *export), ("lun", lun), ("op", op.name())];
            counter(&mut f, &labels, t.requests[op as usize])?;
        }
    }
    let mut f = family(
        encoder,
        "vhost_appliance_requests_failed",
        "Requests answered with an error, by operation and reason.",
        MetricType::Counter,
    )?;
    for (export, lun, t) in &luns {
        for op in Op::ALL {
            for reason in Failure::ALL {
                let n = t.failed[op as usize][reason as usize];
                if n > 0 {
                    let labels = [
                        ("export", *export),
                        ("lun", lun.as_str()),
                        ("op", op.name()),
                        ("reason", reason.name()),
                    ];
                    counter(&mut f, &labels, n)?;
                }
            }
        }
    }
    let mut f = family(
        encoder,
        "vhost_appliance_request_bytes",
        "Bytes moved (read, write) or covered (discard, write_zeroes) by successful requests.",
        MetricType::Counter,
    )?;
    for (export, lun, t) in &luns {
        for op in Op::ALL {
            let labels = [("export", *export), ("lun", lun), ("op", op.name())];
            counter(&mut f, &labels, t.bytes[op as usize])?;
        }
    }
    let mut f = family(
        encoder,
        "vhost_appliance_request_duration_seconds",
        "Request latency from the descriptor chain being taken off the available ring to its used-ring entry being produced, in seconds.",
        MetricType::Histogram,
    )?;
    let bounds: Vec<f64> = LATENCY_BUCKETS_NS
        .iter()
        .map(|&ns| ns as f64 / 1e9)
        .chain([f64::INFINITY])
        .collect();
    let mut buckets: Vec<(f64, u64)> = Vec::with_capacity(LATENCY_SLOTS);
    for (export, lun, t) in &luns {
        for op in Op::ALL {
            let counts = &t.buckets[op as usize];
            buckets.clear();
            buckets.extend(bounds.iter().copied().zip(counts.iter().copied()));
            let count = counts.iter().sum();
            let sum = t.duration_ns[op as usize] as f64 / 1e9;
            let labels = [
                ("export", *export),
                ("lun", lun.as_str()),
                ("op", op.name()),
            ];
            f.encode_family(&labels)?
                .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        }
    }
    let mut f = family(
        encoder,
        "vhost_appliance_scsi_check_conditions",
        "SCSI commands answered with CHECK CONDITION, by sense key.",
        MetricType::Counter,
    )?;
    for (export, lun, t) in &luns {
        for (key, n) in SENSE_KEYS.iter().zip(t.check_conditions) {
            if n > 0 {
                let labels = [
                    ("export", *export),
                    ("lun", lun.as_str()),
                    ("sense_key", key),
                ];
                counter(&mut f, &labels, n)?;
            }
        }
    }
    Ok(())
}

fn queue_families(encoder: &mut DescriptorEncoder<'_>, exports: &[ExportSnapshot]) -> Fmt {
    type Get = fn(&QueueTotals) -> u64;
    let families: [(&str, &str, MetricType, Get); 6] = [
        (
            "vhost_appliance_queue_requests",
            "Requests answered by the virtqueue.",
            MetricType::Counter,
            |q| q.requests,
        ),
        (
            "vhost_appliance_queue_inflight_requests",
            "Requests of the virtqueue handed to the disk and not completed yet.",
            MetricType::Gauge,
            |q| q.inflight,
        ),
        (
            "vhost_appliance_queue_kicks",
            "Guest notifications (kicks) handled by the virtqueue's worker.",
            MetricType::Counter,
            |q| q.kicks,
        ),
        (
            "vhost_appliance_queue_notifications",
            "Used-ring notifications (call eventfd signals) sent to the guest.",
            MetricType::Counter,
            |q| q.notifications,
        ),
        (
            "vhost_appliance_queue_polled_events",
            "Requests or completions a busy-polling worker found without a kick or a signal (export poll:).",
            MetricType::Counter,
            |q| q.polled,
        ),
        (
            "vhost_appliance_queue_malformed_requests",
            "Descriptor chains that broke the virtio framing (with or without a status to answer).",
            MetricType::Counter,
            |q| q.malformed,
        ),
    ];
    for (name, help, metric_type, get) in families {
        let mut f = family(encoder, name, help, metric_type)?;
        for e in exports {
            for q in &e.queues {
                let queue = q.index.to_string();
                let labels = [("export", e.name.as_str()), ("queue", &queue)];
                match metric_type {
                    MetricType::Counter => counter(&mut f, &labels, get(q))?,
                    _ => gauge(&mut f, &labels, get(q))?,
                }
            }
        }
    }
    Ok(())
}

/// The standard `process_*` families, read from `/proc/self` at scrape time.
#[derive(Debug)]
pub(super) struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let p = crate::process::read();
        if let Some(cpu) = p.cpu_seconds {
            family(
                &mut encoder,
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds.",
                MetricType::Counter,
            )?
            .encode_counter::<NoLabelSet, f64, f64>(&cpu, None)?;
        }
        let gauges = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                p.resident_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                p.virtual_bytes,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors.",
                p.open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors.",
                p.max_fds,
            ),
        ];
        for (name, help, value) in gauges {
            if let Some(v) = value {
                family(&mut encoder, name, help, MetricType::Gauge)?.encode_gauge(&v)?;
            }
        }
        if let Some(start) = p.start_time_seconds {
            family(
                &mut encoder,
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                MetricType::Gauge,
            )?
            .encode_gauge(&start)?;
        }
        Ok(())
    }
}
