//! Child processes under test: the appliance daemon and the reference
//! `qemu-storage-daemon`. Each runs in its own scratch directory with its log captured to a
//! file, and is stopped (SIGTERM, then SIGKILL) when dropped, so a failing test never leaves
//! a process behind.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Path of the `vhost-appliance` binary: `$VHOST_APPLIANCE_BIN`, or the one cargo built next
/// to this test executable.
pub fn appliance_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("VHOST_APPLIANCE_BIN") {
        return PathBuf::from(path);
    }
    workspace_binary("vhost-appliance")
}

/// Path of the daemon built with the fault-injecting engine (feature `fault-injection`,
/// rules from `VHOST_APPLIANCE_FAULTS`): `$VHOST_APPLIANCE_FAULTS_BIN`, or
/// `vhost-appliance-faults` next to this test executable, which `tests/run.sh` builds.
pub fn fault_appliance_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("VHOST_APPLIANCE_FAULTS_BIN") {
        return PathBuf::from(path);
    }
    let built = appliance_binary().with_file_name("vhost-appliance-faults");
    assert!(
        built.exists(),
        "{} not found: run tests/scripts/build-fault-daemon.sh first",
        built.display()
    );
    built
}

/// A binary of this workspace, as cargo built it next to the running executable.
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> (tests) or target/<profile>/<bin> (benchmarks).
    let bin = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("target/debug").join(name));
    assert!(
        bin.exists(),
        "{} not found: run `cargo build --workspace --bins` first",
        bin.display()
    );
    bin
}

/// A scratch directory on the same file system as the build (ext4 here, so O_DIRECT is
/// meaningful; /tmp may be tmpfs elsewhere).
pub fn scratch_dir() -> tempfile::TempDir {
    let exe = std::env::current_exe().expect("test executable path");
    // Cargo's target directory (it holds CACHEDIR.TAG), whether this is a test
    // (target/<profile>/deps/<test>) or a program (target/<profile>/<bin>).
    let target = exe
        .ancestors()
        .find(|dir| dir.join("CACHEDIR.TAG").exists())
        .map(|t| t.join("tmp"))
        .unwrap_or_else(std::env::temp_dir);
    fs::create_dir_all(&target).expect("create scratch parent");
    tempfile::tempdir_in(target).expect("create scratch dir")
}

/// A running child process that is stopped on drop.
pub struct Process {
    child: Option<Child>,
    log: PathBuf,
    what: String,
}

impl Process {
    /// Spawns `command` with stdout and stderr written to `log` (created, or truncated).
    pub fn spawn(mut command: Command, log: &Path, what: &str) -> Self {
        let out = fs::File::create(log).expect("create log");
        let err = out.try_clone().expect("dup log");
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        Process {
            child: Some(child),
            log: log.to_path_buf(),
            what: what.to_string(),
        }
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// The captured output so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `path` exists (a socket being bound), failing with the log if the process
    /// exits or time runs out.
    pub fn wait_for_path(&mut self, path: &Path, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !path.exists() {
            if let Some(status) = self.try_wait() {
                panic!(
                    "{} exited ({status}) before creating {}:\n{}",
                    self.what,
                    path.display(),
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} did not create {} within {timeout:?}:\n{}",
                self.what,
                path.display(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the log holds `needle` at least `count` times; returns the log.
    pub fn wait_for_log(&mut self, needle: &str, count: usize, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if log.matches(needle).count() >= count {
                return log;
            }
            if let Some(status) = self.try_wait() {
                panic!(
                    "{} exited ({status}) before logging {needle:?}:\n{log}",
                    self.what
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} did not log {needle:?} {count} times within {timeout:?}:\n{log}",
                self.what
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Exit status if the process has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit:\n{}",
                self.what,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: i32) -> io::Result<()> {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let rc = unsafe { libc::kill(self.pid() as libc::pid_t, signal) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let _ = self.signal(libc::SIGTERM);
        self.wait_exit(timeout)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if matches!(child.try_wait(), Ok(None)) {
                // SAFETY: as in `signal`.
                unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
                let deadline = Instant::now() + Duration::from_secs(5);
                while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// What a process holds, from `/proc/PID`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Open file descriptors.
    pub fds: usize,
    /// Threads.
    pub threads: usize,
    /// Mappings of memfds (frontend guest memory arrives as memfds).
    pub memfd_maps: usize,
    /// Address space, KiB (VmSize).
    pub vm_kib: u64,
    /// Resident memory, KiB (VmRSS).
    pub rss_kib: u64,
}

/// Reads [`Usage`] of process `pid`.
pub fn usage(pid: u32) -> Usage {
    let count = |dir: &str| {
        fs::read_dir(format!("/proc/{pid}/{dir}"))
            .expect("read /proc")
            .count()
    };
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).expect("read maps");
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("a kB field of /proc/PID/status")
    };
    Usage {
        fds: count("fd"),
        threads: count("task"),
        memfd_maps: maps.lines().filter(|l| l.contains("/memfd:")).count(),
        vm_kib: kib("VmSize:"),
        rss_kib: kib("VmRSS:"),
    }
}

/// The appliance daemon serving an `exports.yaml` written into a scratch directory.
pub struct Appliance {
    /// The daemon process.
    pub process: Process,
    /// Its scratch directory (config, sockets, backing files).
    pub dir: tempfile::TempDir,
}

impl Appliance {
    /// Writes `config` (with `@DIR@` replaced by the scratch directory) and starts the
    /// daemon on it, waiting for each of `sockets` (relative to the directory) to appear.
    pub fn start(config: &str, sockets: &[&str]) -> Self {
        let dir = scratch_dir();
        Self::start_in(dir, config, sockets)
    }

    /// As [`Appliance::start`] in an existing directory (to reuse backing files).
    pub fn start_in(dir: tempfile::TempDir, config: &str, sockets: &[&str]) -> Self {
        Self::start_with(dir, Command::new(appliance_binary()), config, sockets)
    }

    /// As [`Appliance::start`] with a prepared command (environment, limits) for the
    /// daemon binary; the config and log arguments are added here.
    pub fn start_command(command: Command, config: &str, sockets: &[&str]) -> Self {
        Self::start_with(scratch_dir(), command, config, sockets)
    }

    fn start_with(
        dir: tempfile::TempDir,
        command: Command,
        config: &str,
        sockets: &[&str],
    ) -> Self {
        let root = dir.path();
        let mut text = config.replace("@DIR@", &root.display().to_string());
        // The daemon keeps state (a guest's write-cache choice) in state_dir: a test's goes
        // into its scratch directory, never the system's /var/lib/vhost-appliance.
        // Appended, so the lines a test's error messages name stay where they were.
        if !text.contains("state_dir:") {
            text = format!("{}\nstate_dir: {}/state\n", text.trim_end(), root.display());
        }
        fs::write(root.join("exports.yaml"), text).expect("write config");
        let process = Self::spawn(root, command, sockets);
        Appliance { process, dir }
    }

    /// Starts the daemon on `root/exports.yaml`, logging to `root/daemon.log`, and waits
    /// for `sockets`.
    fn spawn(root: &Path, mut command: Command, sockets: &[&str]) -> Process {
        command
            .arg("--config")
            .arg(root.join("exports.yaml"))
            .arg("--log-level")
            .arg(std::env::var("APPLIANCE_TEST_LOG").unwrap_or_else(|_| "debug".into()));
        let mut process = Process::spawn(command, &root.join("daemon.log"), "vhost-appliance");
        for s in sockets {
            process.wait_for_path(&root.join(s), Duration::from_secs(20));
        }
        process
    }

    /// Restarts the daemon as an operator's service restart does: SIGTERM, which it must
    /// answer with a clean exit within `timeout`, then [`appliance_binary`] again on the
    /// same config and directory (backing files kept), waiting for `sockets`. For an
    /// appliance from [`Appliance::start`] or [`Appliance::start_in`] (one from
    /// [`Appliance::start_command`] would come back as the plain binary). Returns the
    /// stopped daemon's log, kept as `daemon.log.1`; `daemon.log` holds the new one's.
    pub fn restart(&mut self, sockets: &[&str], timeout: Duration) -> String {
        let status = self.process.terminate(timeout);
        let log = self.process.log();
        assert!(
            status.success(),
            "the daemon exited with {status} on SIGTERM:\n{log}"
        );
        fs::rename(self.path("daemon.log"), self.path("daemon.log.1")).expect("keep the log");
        self.process = Self::spawn(self.dir.path(), Command::new(appliance_binary()), sockets);
        log
    }

    /// A path inside the scratch directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Replaces `exports.yaml` the way editors and config managers do: writes a new file
    /// next to it and renames it over the old one (`@DIR@` is replaced as at start).
    pub fn rewrite_config(&self, config: &str) {
        let root = self.dir.path().display().to_string();
        let mut text = config.replace("@DIR@", &root);
        if !text.contains("state_dir:") {
            text = format!("{}\nstate_dir: {root}/state\n", text.trim_end());
        }
        let tmp = self.path(".exports.yaml.new");
        fs::write(&tmp, text).expect("write new config");
        fs::rename(&tmp, self.path("exports.yaml")).expect("rename new config");
    }
}

/// `qemu-storage-daemon` exporting `image` as vhost-user-blk on `socket`: the reference
/// backend for differential tests.
pub fn qemu_storage_daemon(image: &Path, socket: &Path, log: &Path) -> Process {
    let mut command = Command::new("qemu-storage-daemon");
    command
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=file0,filename={},cache.direct=on,discard=unmap",
            image.display()
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=export0,node-name=file0,addr.type=unix,addr.path={},writable=on",
            socket.display()
        ));
    let mut process = Process::spawn(command, log, "qemu-storage-daemon");
    process.wait_for_path(socket, Duration::from_secs(20));
    process
}

/// `qemu-storage-daemon` exporting RBD image `pool/image` of the cluster of `conf` as
/// vhost-user-blk on `socket` (QEMU's rbd driver, cache off and discards passed through, as
/// the appliance does): the reference for RBD differential tests.
pub fn qemu_storage_daemon_rbd(
    pool: &str,
    image: &str,
    conf: &Path,
    socket: &Path,
    log: &Path,
) -> Process {
    let mut command = Command::new("qemu-storage-daemon");
    command
        .arg("--blockdev")
        .arg(format!(
            "driver=rbd,node-name=rbd0,pool={pool},image={image},conf={},cache.direct=on,discard=unmap",
            conf.display()
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=export0,node-name=rbd0,addr.type=unix,addr.path={},writable=on",
            socket.display()
        ));
    let mut process = Process::spawn(command, log, "qemu-storage-daemon");
    process.wait_for_path(socket, Duration::from_secs(30));
    process
}

impl Drop for Appliance {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- vhost-appliance log ----\n{}", self.process.log());
        }
    }
}
