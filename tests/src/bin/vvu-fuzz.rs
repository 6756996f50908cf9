//! `vvu-fuzz`: the guest-side fuzzer of the virtio-vhost-user-pci device model (see
//! `appliance_tests::qfuzz`), run against QEMU built with `qemu-device/build.sh --asan`.
//!
//! - `vvu-fuzz run [--seconds N] [--seed S] [--out DIR] [--summary FILE]`: fuzz for N seconds
//!   (default `VVU_FUZZ_SECONDS`, else 90); prints what it executed and writes every distinct
//!   failure's trace to DIR. Exits 1 if anything failed, or if the run never got deep (no
//!   message reached the guest, or no oracle check passed).
//! - `vvu-fuzz replay TRACE...`: replays traces; exits 1 if any makes QEMU fail.
//! - `vvu-fuzz minimize TRACE [-o OUT] [--minutes M]`: shrinks a failing trace.
//!
//! `--qemu PATH` (or `VVU_QEMU_ASAN`) picks the QEMU; by default the cached ASan build.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use appliance_tests::qfuzz::qtest::asan_qemu;
use appliance_tests::qfuzz::run::{kinds, minimize, replay, run, RunConfig};
use appliance_tests::qfuzz::trace::Trace;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Guest-side fuzzer of the virtio-vhost-user-pci QEMU device")]
struct Cli {
    /// The QEMU to fuzz (default: VVU_QEMU_ASAN, else `qemu-device/build.sh --asan`).
    #[arg(long, global = true)]
    qemu: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fuzz for a bounded time.
    Run {
        /// Seconds to run (default: VVU_FUZZ_SECONDS, else 90).
        #[arg(long)]
        seconds: Option<u64>,
        /// Seed (default: from the clock; printed either way).
        #[arg(long)]
        seed: Option<u64>,
        /// Where failing traces go.
        #[arg(long, default_value = "target/vvu-fuzz")]
        out: PathBuf,
        /// Write the JSON summary here too, and one TSV row beside it (same name, .tsv).
        #[arg(long)]
        summary: Option<PathBuf>,
    },
    /// Replay traces; fail if any makes QEMU crash, hang or report.
    Replay {
        /// Trace files.
        #[arg(required = true)]
        traces: Vec<PathBuf>,
    },
    /// Shrink a failing trace.
    Minimize {
        /// The trace.
        trace: PathBuf,
        /// Output file (default: TRACE.min).
        #[arg(short)]
        o: Option<PathBuf>,
        /// Time budget in minutes.
        #[arg(long, default_value_t = 20)]
        minutes: u64,
    },
}

fn read_trace(path: &PathBuf) -> Result<Trace, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Trace::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let qemu = cli.qemu.unwrap_or_else(asan_qemu);
    match cli.cmd {
        Cmd::Run {
            seconds,
            seed,
            out,
            summary,
        } => {
            let seconds = seconds
                .or_else(|| std::env::var("VVU_FUZZ_SECONDS").ok()?.parse().ok())
                .unwrap_or(90);
            let seed = seed.unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            });
            eprintln!(
                "vvu-fuzz: seed {seed}, {seconds} s, QEMU {}",
                qemu.display()
            );
            let cfg = RunConfig {
                qemu,
                duration: Duration::from_secs(seconds),
                seed,
                out,
            };
            let result = run(&cfg);
            let json = result.to_json(seed);
            let text = serde_json::to_string_pretty(&json).unwrap_or_default();
            println!("{text}");
            let s = &result.stats;
            let oracles = s.oracle_memory + s.oracle_doorbell + s.oracle_kick;
            if let Some(path) = summary {
                let tsv = format!(
                    "target\tseconds\tseed\tsequences\toperations\tqtest_commands\t\
                     frontend_messages\tqemu_instances\toracle_checks\tfailures\n\
                     virtio-vhost-user-pci\t{:.0}\t{seed}\t{}\t{}\t{}\t{}\t{}\t{oracles}\t{}\n",
                    result.seconds,
                    s.sequences,
                    s.actions,
                    s.qtest_commands,
                    s.fe_messages,
                    s.qemu_starts,
                    result.found.len()
                );
                let written = std::fs::write(&path, format!("{text}\n"))
                    .and_then(|()| std::fs::write(path.with_extension("tsv"), tsv));
                if let Err(e) = written {
                    eprintln!("vvu-fuzz: writing {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
            }
            eprintln!(
                "vvu-fuzz: {} sequences, {} operations ({} qtest commands, {} front-end messages) \
                 on {} QEMU instances in {:.0} s, seed {seed}: {} distinct failures {:?}",
                s.sequences,
                s.actions,
                s.qtest_commands,
                s.fe_messages,
                s.qemu_starts,
                result.seconds,
                result.found.len(),
                kinds(&result.found)
            );
            for f in &result.found {
                eprintln!(
                    "vvu-fuzz: {} x{}: {} ({})",
                    f.kind,
                    f.count,
                    f.signature,
                    f.trace.display()
                );
            }
            if s.rx_messages == 0 || oracles == 0 {
                eprintln!(
                    "vvu-fuzz: the run never got deep ({} rx messages, {oracles} oracle checks)",
                    s.rx_messages
                );
                return ExitCode::FAILURE;
            }
            if result.found.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Cmd::Replay { traces } => {
            let mut bad = 0;
            for path in &traces {
                let result = read_trace(path).and_then(|t| {
                    replay(&qemu, &t)
                        .map_err(|f| format!("{}: {}\n{}", f.kind(), f.signature(), f.detail()))
                });
                match result {
                    Ok(()) => eprintln!("vvu-fuzz: {}: QEMU survived, no report", path.display()),
                    Err(e) => {
                        bad += 1;
                        eprintln!("vvu-fuzz: {}: {e}", path.display());
                    }
                }
            }
            if bad == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Cmd::Minimize { trace, o, minutes } => {
            let t = match read_trace(&trace) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("vvu-fuzz: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let min = minimize(&qemu, &t, Duration::from_secs(60 * minutes));
            let out = o.unwrap_or_else(|| trace.with_extension("min.qtest"));
            eprintln!(
                "vvu-fuzz: {} -> {} actions: {}",
                t.actions.len(),
                min.actions.len(),
                out.display()
            );
            match std::fs::write(&out, min.to_string()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("vvu-fuzz: {}: {e}", out.display());
                    ExitCode::FAILURE
                }
            }
        }
    }
}
