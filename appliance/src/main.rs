//! `vhost-appliance`: serves vhost-user-blk and vhost-user-scsi exports from raw files,
//! block devices and qcow2 images, on the host or inside an appliance VM.
//!
//! Two ways to run it:
//! - `--config exports.yaml`: every export in the file, one unix socket each.
//! - QEMU's backend-program conventions for a single export: `--socket-path` or `--fd`,
//!   `--blk-file`, `--read-only`, `--print-capabilities`.
//!
//! The daemon itself is the `appliance` library (`lib.rs`, which lists its modules); this
//! file is its command line. The process never daemonizes; it exits cleanly on
//! SIGTERM/SIGINT after completing in-flight I/O, and tells systemd it is ready when
//! `NOTIFY_SOCKET` is set.

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use nix::sys::signal::{SigSet, Signal};

use appliance::export::{RunningExport, SocketSource};
use appliance::{manpage, metrics, reload, sandbox, watch};

/// Serve vhost-user-blk and vhost-user-scsi exports (raw files, block devices or qcow2
/// images, over io_uring) on unix sockets or through a virtio-vhost-user device.
///
/// With --config, every export of an exports.yaml, applying its edits live; otherwise one
/// virtio-blk export given by --socket-path or --fd and --blk-file.
#[derive(Debug, Parser)]
#[command(name = "vhost-appliance", version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// Serve every export in this exports.yaml.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["socket_path", "fd", "blk_file"])]
    config: Option<PathBuf>,

    /// Single export: listen on this unix socket.
    #[arg(long, value_name = "PATH", conflicts_with = "fd")]
    socket_path: Option<PathBuf>,

    /// Single export: serve on this inherited listening socket.
    #[arg(long, value_name = "FDNUM")]
    fd: Option<RawFd>,

    /// Single export: the backing file or block device.
    #[arg(long, value_name = "PATH")]
    blk_file: Option<PathBuf>,

    /// Single export: refuse writes.
    #[arg(long)]
    read_only: bool,

    /// Single export: number of virtqueues.
    #[arg(long, value_name = "N")]
    num_queues: Option<u32>,

    /// Single export: open the backing file without O_DIRECT.
    #[arg(long)]
    no_direct: bool,

    /// Print the vhost-user backend capabilities as JSON and exit.
    #[arg(long)]
    print_capabilities: bool,

    /// What the seccomp filter does with a syscall the daemon never makes: log it and kill
    /// the daemon (kill), let it through and have the kernel log it (log), or no filter (off).
    #[arg(long, value_enum, default_value = "kill", value_name = "MODE")]
    seccomp: sandbox::SeccompMode,

    /// Log filter (error, warn, info, debug, trace, or a tracing directive).
    #[arg(long, global = true, default_value = "info", value_name = "LEVEL")]
    log_level: String,
}

/// Subcommands.
#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Validate an exports.yaml offline (the checks of a live reload); exit 0 if valid.
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
    /// Write the man pages (section 8, from this command line) into DIR; used to package
    /// the daemon (packaging/build-deb.sh).
    #[command(hide = true)]
    GenerateMan {
        /// Output directory (created if missing).
        dir: PathBuf,
    },
}

/// QEMU's backend-program capability description for a block device backend.
const CAPABILITIES: &str = r#"{
  "type": "block",
  "features": [
    "blk-file",
    "read-only-bdev"
  ]
}"#;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.print_capabilities {
        println!("{CAPABILITIES}");
        return ExitCode::SUCCESS;
    }
    if let Some(Command::CheckConfig { file }) = &cli.command {
        return check_config(file);
    }
    if let Some(Command::GenerateMan { dir }) = &cli.command {
        return match manpage::generate(<Cli as clap::CommandFactory>::command(), dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vhost-appliance: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("vhost-appliance: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    // Signals are taken synchronously by the main thread; every thread spawned from here on
    // inherits the blocked mask.
    let mut signals = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        signals.add(s);
    }
    signals.thread_block().context("cannot block signals")?;
    raise_open_file_limit();

    match &cli.config {
        Some(path) => serve_config(path, &signals, cli.seccomp),
        None => {
            sandbox::enter(None, None, cli.seccomp)?;
            let export = start_single(cli)?;
            notify_systemd_ready();
            loop {
                match signals.wait() {
                    Ok(Signal::SIGHUP) => {
                        tracing::info!(
                            "SIGHUP: a single export has no configuration file to reload"
                        )
                    }
                    Ok(signal) => {
                        tracing::info!("{signal}: completing in-flight I/O and exiting");
                        break;
                    }
                    Err(e) => tracing::warn!("waiting for signals failed: {e}"),
                }
            }
            export.stop();
            Ok(())
        }
    }
}

/// Serves the exports of `path`, applying edits of the file (and SIGHUP) live, until
/// SIGTERM or SIGINT.
fn serve_config(
    path: &Path,
    signals: &SigSet,
    seccomp: sandbox::SeccompMode,
) -> anyhow::Result<()> {
    let metrics = metrics::Metrics::new();
    let mut exports = reload::Exports::start(path, metrics.clone(), |config| {
        sandbox::enter(config.run_as.as_ref(), Some(&config.state_dir), seccomp)
    })?;
    let mut watch = watch::ConfigWatch::new(path, signals)?;
    notify_systemd_ready();
    loop {
        match watch.next_event(exports.standby_retry()) {
            watch::Event::Reload(why) => match exports.reload(why, why == watch::SIGHUP) {
                None => {}
                Some(ok) => {
                    metrics.record_reload(ok);
                    if ok {
                        tracing::info!("configuration reload succeeded");
                    } else {
                        tracing::warn!("configuration reload failed: see the errors above");
                    }
                }
            },
            watch::Event::Retry => exports.retry_standby(),
            watch::Event::StoreChanged => {
                exports.follow_grown_stores("the store reported a change")
            }
            watch::Event::Stop(signal) => {
                tracing::info!("{signal}: completing in-flight I/O and exiting");
                break;
            }
        }
    }
    exports.stop_all();
    Ok(())
}

/// `check-config FILE`: the validation of a reload, offline. Exit 0 when valid.
fn check_config(file: &Path) -> ExitCode {
    let text = match std::fs::read_to_string(file) {
        Ok(text) => text,
        Err(e) => {
            eprintln!("{}: cannot read: {e}", file.display());
            return ExitCode::FAILURE;
        }
    };
    let base = file.parent().unwrap_or(Path::new("."));
    match config::parse_str(&text, file, base) {
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
        Ok(config) => {
            let mut missing = config::missing_backing_files(&config, &text, file, |_, _| true);
            missing.extend(config::aliased_paths(&config, &text, file));
            for e in &missing {
                eprintln!("{e}");
            }
            if missing.is_empty() {
                println!(
                    "{}: valid, {} exports",
                    file.display(),
                    config.exports.len()
                );
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn start_single(cli: &Cli) -> anyhow::Result<RunningExport> {
    let blk_file = cli
        .blk_file
        .as_ref()
        .context("give --config FILE, or --blk-file with --socket-path or --fd")?;
    let socket_path = match (&cli.socket_path, cli.fd) {
        (Some(p), None) => p.clone(),
        (None, Some(fd)) => PathBuf::from(format!("fd:{fd}")),
        _ => anyhow::bail!("a single export needs exactly one of --socket-path and --fd"),
    };
    let export = config::single_export(
        config::schema::ExportFile {
            name: Some("export0".into()),
            export_type: Some("blk".into()),
            socket: Some(socket_path.to_string_lossy().into_owned()),
            vvu: None,
            path: Some(blk_file.to_string_lossy().into_owned()),
            format: None,
            rbd: None,
            readonly: Some(cli.read_only),
            num_queues: cli.num_queues,
            queue_size: None,
            logical_block_size: None,
            serial: None,
            direct: Some(!cli.no_direct),
            write_cache: None,
            create: None,
            size: None,
            luns: None,
            poll: None,
        },
        &std::env::current_dir().context("cannot read the current directory")?,
    )?;
    let permissions = config::SocketPermissions {
        mode: config::DEFAULT_SOCKET_MODE,
        owner: None,
        group: None,
    };
    let socket = match (cli.fd, &export.transport) {
        (Some(fd), _) => SocketSource::Fd(fd),
        (None, config::Transport::Socket(path)) => SocketSource::Path(path, &permissions),
        (None, config::Transport::Vvu(_)) => anyhow::bail!("a single export takes a socket"),
    };
    RunningExport::start(&export, socket, None)
}

/// Raises the soft RLIMIT_NOFILE to the hard limit, as most daemons do: every frontend
/// connection holds a few fds per queue (kick, call, memory regions), and systemd's default
/// soft limit (1024) would cap a busy daemon well below what the host allows.
fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(e) => {
            tracing::warn!("cannot read the open file limit: {e}");
            return;
        }
    };
    if soft >= hard {
        tracing::info!(soft, hard, "open file limit");
        return;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => tracing::info!(was = soft, soft = hard, hard, "open file limit raised"),
        Err(e) => tracing::warn!(soft, hard, "cannot raise the open file limit: {e}"),
    }
}

/// sd_notify(READY=1) when started by systemd with `Type=notify`.
fn notify_systemd_ready() {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let target = target.to_string_lossy().into_owned();
    let addr = match target.strip_prefix('@') {
        Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name.as_bytes()),
        None => SocketAddr::from_pathname(&target),
    };
    let sent = addr.and_then(|addr| {
        let socket = UnixDatagram::unbound()?;
        socket.send_to_addr(b"READY=1\n", &addr)
    });
    if let Err(e) = sent {
        tracing::warn!("cannot notify systemd at {target}: {e}");
    }
}
