//! A time-bounded fuzzing run (QEMU instances with random device properties, each for a few
//! sequences), replay of a trace, and minimization of a failing trace (delta debugging).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::rng::Rng;

use super::fuzzer::{Fuzzer, Machine, Stats};
use super::qtest::{kvm_usable, Failure};
use super::trace::{Action, DeviceParams, Trace};

/// What `run` is asked to do.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// The ASan QEMU.
    pub qemu: PathBuf,
    /// Wall-clock budget.
    pub duration: Duration,
    /// The run's seed: the same seed on the same build does the same thing (up to QEMU's
    /// main loop scheduling, which `fe settle` pins down).
    pub seed: u64,
    /// Failing traces (`*.qtest`) and QEMU's stderr go here.
    pub out: PathBuf,
}

/// A distinct failure of a run: the first trace that showed it, and how often it came.
#[derive(Debug, Clone)]
pub struct Found {
    /// sanitizer / died / hang / oracle.
    pub kind: &'static str,
    /// Where (see [`Failure::signature`]).
    pub signature: String,
    /// The trace file written for its first occurrence.
    pub trace: PathBuf,
    /// Occurrences.
    pub count: u64,
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// The counters, summed over all QEMU instances.
    pub stats: Stats,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Distinct failures by signature.
    pub found: Vec<Found>,
}

impl Summary {
    /// The summary as JSON (for the README table and CI logs).
    pub fn to_json(&self, seed: u64) -> serde_json::Value {
        let s = &self.stats;
        serde_json::json!({
            "target": "virtio-vhost-user-pci (qemu-device, ASan+UBSan, qtest)",
            "seed": seed,
            "seconds": (self.seconds * 10.0).round() / 10.0,
            "sequences": s.sequences,
            "operations": s.actions,
            "qtest_commands": s.qtest_commands,
            "frontend_messages": s.fe_messages,
            "qemu_instances": s.qemu_starts,
            "qemu_instances_under_kvm": s.kvm_instances,
            "driver_bring_ups": s.bring_ups,
            "rx_messages_delivered": s.rx_messages,
            "tx_messages_posted": s.tx_msgs,
            "device_needs_reset_seen": s.needs_reset,
            "oracle_checks_passed": {
                "memory_through_bar": s.oracle_memory,
                "doorbell_to_eventfd": s.oracle_doorbell,
                "kick_to_msix": s.oracle_kick,
            },
            "oracle_checks_skipped": s.oracle_skipped,
            "failures": self.found.iter().map(|f| serde_json::json!({
                "kind": f.kind,
                "signature": f.signature,
                "trace": f.trace.display().to_string(),
                "count": f.count,
            })).collect::<Vec<_>>(),
        })
    }
}

/// Device properties for a new instance: mostly the appliance's, sometimes the extremes;
/// half the instances run under KVM when the host has it, one in four has two devices.
fn random_params(rng: &mut Rng, kvm: bool) -> DeviceParams {
    let pick = |rng: &mut Rng, o: &[u64]| o[rng.below(o.len() as u64) as usize];
    let devices = if rng.below(4) == 0 { 2 } else { 1 };
    let mut p = DeviceParams {
        max_vhost_queues: pick(rng, &[1, 2, 4, 4, 8, 64, 256]) as u32,
        queue_size: pick(rng, &[2, 4, 16, 16, 128, 1024]) as u32,
        shm_size: pick(rng, &[2 << 20, 64 << 20, 1 << 30, 1 << 30, 16 << 30]),
        kvm: kvm && rng.below(2) == 0,
        devices,
        recv_delay_ms: 0,
        keep_msgfd_flags: true,
    };
    if devices > 1 {
        // Two shared-memory BARs must fit q35's 32 GiB 64-bit hole.
        p.shm_size = p.shm_size.min(1 << 30);
    }
    p
}

fn record(summary: &mut Summary, out: &Path, trace: Trace, failure: &Failure, stderr: &str) {
    let signature = failure.signature();
    if let Some(f) = summary.found.iter_mut().find(|f| f.signature == signature) {
        f.count += 1;
        return;
    }
    let n = summary.found.len();
    let path = out.join(format!("{}-{n}.qtest", failure.kind()));
    let mut trace = trace;
    trace
        .notes
        .push(format!("# {}: {signature}", failure.kind()));
    let _ = std::fs::create_dir_all(out);
    let _ = std::fs::write(&path, trace.to_string());
    let _ = std::fs::write(
        path.with_extension("stderr"),
        format!("{}\n---\n{stderr}", failure.detail()),
    );
    summary.found.push(Found {
        kind: failure.kind(),
        signature,
        trace: path,
        count: 1,
    });
}

/// Fuzzes until the time is up. Each QEMU instance runs 5-20 sequences; a failure ends its
/// instance, and its whole trace (from QEMU's start) is kept.
pub fn run(cfg: &RunConfig) -> Summary {
    let start = Instant::now();
    let deadline = start + cfg.duration;
    let mut rng = Rng::new(cfg.seed);
    let mut summary = Summary::default();
    let mut instance = 0u64;
    let kvm = kvm_usable();
    while Instant::now() < deadline {
        instance += 1;
        let params = random_params(&mut rng, kvm);
        let seed = rng.next_u64();
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut f = match Fuzzer::start(&cfg.qemu, params.clone(), dir.path(), Rng::new(seed)) {
            Ok(f) => f,
            Err(failure) => {
                let trace = Trace {
                    params,
                    ..Trace::default()
                };
                record(&mut summary, &cfg.out, trace, &failure, "");
                continue;
            }
        };
        f.deadline = Some(deadline);
        let mut failed = None;
        for _ in 0..5 + rng.below(16) {
            if Instant::now() >= deadline {
                break;
            }
            if let Err(e) = f.sequence() {
                failed = Some(e);
                break;
            }
        }
        f.stats.qtest_commands = f.m.qemu.commands;
        summary.stats.add(&f.stats);
        let stderr = f.m.qemu.stderr();
        let trace = Trace {
            params: f.params.clone(),
            notes: vec![format!("# vvu-fuzz seed {} instance {instance}", cfg.seed)],
            actions: std::mem::take(&mut f.trace),
        };
        let failed = failed
            .or_else(|| f.m.qemu.check().err())
            .or_else(|| f.m.stop());
        if let Some(failure) = failed {
            eprintln!(
                "vvu-fuzz: instance {instance}: {}: {}",
                failure.kind(),
                failure.signature()
            );
            record(&mut summary, &cfg.out, trace, &failure, &stderr);
        }
    }
    summary.seconds = start.elapsed().as_secs_f64();
    summary
}

/// Replays a trace on a fresh QEMU: Err with what went wrong if QEMU crashed, hung or
/// wrote a report.
pub fn replay(qemu: &Path, trace: &Trace) -> Result<(), Failure> {
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut params = trace.params.clone();
    if params.kvm && !kvm_usable() {
        eprintln!("vvu-fuzz: no usable /dev/kvm: replaying an accel=kvm trace under qtest");
        params.kvm = false;
    }
    let mut m = Machine::start(qemu, &params, dir.path())?;
    for action in &trace.actions {
        m.exec(action)?;
    }
    m.exec(&Action::Settle)?;
    m.qemu.check()?;
    match m.stop() {
        Some(failure) => Err(failure),
        None => Ok(()),
    }
}

/// Shrinks a failing trace to one that fails the same way (same kind and signature) by
/// delta debugging over its actions, within `budget`. Returns the input if it does not fail.
/// For an oracle failure, the failing oracle (from the last `fe oracle` on) is kept whole:
/// only what came before it is shrunk.
pub fn minimize(qemu: &Path, trace: &Trace, budget: Duration) -> Trace {
    let Err(original) = replay(qemu, trace) else {
        return trace.clone();
    };
    let key = (original.kind(), original.signature());
    let suffix = match original {
        Failure::Oracle(_) => trace
            .actions
            .iter()
            .rposition(|a| *a == Action::OracleStart),
        _ => None,
    }
    .unwrap_or(trace.actions.len());
    let build = |keep: &[usize]| -> Vec<Action> {
        keep.iter().map(|&i| trace.actions[i].clone()).collect()
    };
    let pinned: Vec<usize> = (suffix..trace.actions.len()).collect();
    let fails = |removable: &[usize]| {
        let mut keep: Vec<usize> = removable.iter().chain(&pinned).copied().collect();
        keep.sort_unstable();
        let t = Trace {
            actions: build(&keep),
            ..trace.clone()
        };
        matches!(replay(qemu, &t), Err(f) if (f.kind(), f.signature()) == key)
    };
    let deadline = Instant::now() + budget;
    let mut removable: Vec<usize> = (0..suffix).collect();
    let mut n = 2usize;
    while removable.len() >= 2 && Instant::now() < deadline {
        // Try removing each of n chunks; keep the first removal that still fails.
        let chunk = removable.len().div_ceil(n);
        let reduced = (0..n)
            .map(|i| (i * chunk, ((i + 1) * chunk).min(removable.len())))
            .take_while(|&(lo, _)| lo < removable.len() && Instant::now() < deadline)
            .map(|(lo, hi)| {
                let rest = removable[..lo].iter().chain(&removable[hi..]);
                rest.copied().collect::<Vec<usize>>()
            })
            .find(|candidate| fails(candidate));
        match reduced {
            Some(candidate) => {
                removable = candidate;
                n = (n - 1).max(2);
            }
            None if n >= removable.len() => break,
            None => n = (2 * n).min(removable.len()),
        }
    }
    let mut keep: Vec<usize> = removable.iter().chain(&pinned).copied().collect();
    keep.sort_unstable();
    let actions = build(&keep);
    let mut notes = trace.notes.clone();
    notes.push(format!(
        "# minimized from {} to {} actions",
        trace.actions.len(),
        actions.len()
    ));
    Trace {
        params: trace.params.clone(),
        notes,
        actions,
    }
}

/// Counts of failure kinds, for a one-line report.
pub fn kinds(found: &[Found]) -> BTreeMap<&'static str, u64> {
    let mut m = BTreeMap::new();
    for f in found {
        *m.entry(f.kind).or_default() += f.count;
    }
    m
}
