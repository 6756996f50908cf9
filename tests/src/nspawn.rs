//! Debian bookworm containers booted by `systemd-nspawn --boot`, with systemd as their init,
//! for the packaging tests: the Debian package installed and run the way a host runs it.
//!
//! The root file system comes from `image-builder/build-rootfs.sh` (cached) and is never
//! written: the container runs on a tmpfs overlay (`--volatile=overlay`), with the host's
//! network or its own ([`Net`]); `/var/lib/vhost-appliance` is a scratch directory of the host. Commands run inside through `nsenter` into the namespaces of
//! the container's init; the test reaches the container's files (and unix sockets) through
//! `/proc/PID/root`. The package is built once per test process by
//! `packaging/build-deb.sh`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::daemon::{scratch_dir, Process};

/// Runs a project script; returns the last line of its stdout (the path it built).
fn run_script(script: &str, args: &[&str]) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(script);
    eprintln!("nspawn: running {script} {args:?}");
    let out = Command::new("bash")
        .arg(&path)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {script}: {e}"));
    assert!(
        out.status.success(),
        "{script} {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    PathBuf::from(stdout.lines().last().expect("a path").trim())
}

/// The clean bookworm root file system (minbase, systemd), built or taken from the cache.
pub fn base_rootfs() -> &'static Path {
    static ROOTFS: OnceLock<PathBuf> = OnceLock::new();
    ROOTFS.get_or_init(|| run_script("image-builder/build-rootfs.sh", &["base"]))
}

/// The bookworm root file system with libvirt-daemon-system and qemu-system-x86.
pub fn libvirt_rootfs() -> &'static Path {
    static ROOTFS: OnceLock<PathBuf> = OnceLock::new();
    ROOTFS.get_or_init(|| run_script("image-builder/build-rootfs.sh", &["libvirt"]))
}

/// The project's Debian package (`packaging/build-deb.sh`: a release build), once per process.
pub fn debian_package() -> &'static Path {
    static DEB: OnceLock<PathBuf> = OnceLock::new();
    DEB.get_or_init(|| run_script("packaging/build-deb.sh", &[]))
}

/// The network a container sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Net {
    /// The host's (apt can download; the daemon's metrics port is the host's).
    Host,
    /// Its own namespace with only loopback.
    Private,
}

/// A booted container; shut down (and its overlay discarded) when dropped.
pub struct Container {
    process: Process,
    /// Host pid of the container's init (systemd).
    leader: u32,
    _dir: tempfile::TempDir,
}

/// Environment of every command run in a container (not the test's own).
const ENV: [&str; 3] = [
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG=C.UTF-8",
    "DEBIAN_FRONTEND=noninteractive",
];

impl Container {
    /// Boots `rootfs` with the host directories `binds` mounted read-only at the given
    /// container paths, and waits until systemd has finished booting.
    pub fn boot(rootfs: &Path, binds: &[(&Path, &str)], net: Net) -> Container {
        let dir = scratch_dir();
        let name = format!(
            "vhost-test-{}",
            dir.path()
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("x")
                .trim_start_matches('.')
                .replace(|c: char| !c.is_ascii_alphanumeric(), "")
        );
        let mut cmd = Command::new("systemd-nspawn");
        cmd.args([
            "--quiet",
            "--boot",
            // No machined on the host: run in this process's cgroup, unregistered.
            "--register=no",
            "--keep-unit",
            "--volatile=overlay",
            "--console=passive",
        ])
        .args((net == Net::Private).then_some("--private-network"))
        .arg(format!("--machine={name}"))
        .arg("--directory")
        .arg(rootfs);
        for (host, path) in binds {
            cmd.arg(format!("--bind-ro={}:{path}", host.display()));
        }
        // The daemon's state directory on the host's file system, as on a real host: the
        // container's own tree is a tmpfs overlay, where O_DIRECT needs 4 KiB alignment and
        // the example config's 512-byte blocks are refused.
        let state = dir.path().join("state");
        std::fs::create_dir(&state).expect("create the state directory");
        cmd.arg(format!(
            "--bind={}:/var/lib/vhost-appliance",
            state.display()
        ));
        let process = Process::spawn(cmd, &dir.path().join("nspawn.log"), "systemd-nspawn");
        let leader = Self::find_leader(&process);
        let container = Container {
            process,
            leader,
            _dir: dir,
        };
        let started = Instant::now();
        // Until systemd has created /run/systemd/system, systemctl answers "offline"; until
        // it has bound its private socket, it cannot connect at all (no answer). Both mean
        // "not started yet": nsenter can win the race against the container's early boot.
        let deadline = Instant::now() + Duration::from_secs(60);
        let out = loop {
            let out = container.sh("systemctl is-system-running --wait");
            let answer = String::from_utf8_lossy(&out.stdout);
            let started = !matches!(answer.trim(), "" | "offline");
            if started || Instant::now() > deadline {
                break out;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if state != "running" {
            let failed = container
                .sh("systemctl --failed --no-pager; journalctl -b --no-pager | tail -n 80");
            panic!(
                "container booted {state:?}, not running: {}\n{}\n{}",
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&failed.stdout),
                container.process.log()
            );
        }
        eprintln!(
            "nspawn: {name} booted in {:.1}s (systemd is pid {leader} on the host)",
            started.elapsed().as_secs_f64()
        );
        container
    }

    /// Boots `rootfs` (with `binds`, as [`Container::boot`]) with the project's package
    /// ([`debian_package`]) mounted at `/mnt/pkg`, and installs it as an admin installs a
    /// downloaded .deb: `dpkg -i`, then `apt-get -f install` for missing dependencies.
    /// Fails the test unless dpkg then reports the package installed.
    pub fn boot_and_install(rootfs: &Path, binds: &[(&Path, &str)], net: Net) -> Container {
        let deb = debian_package();
        let dir = deb.parent().expect("the package's folder");
        let mut all = vec![(dir, "/mnt/pkg")];
        all.extend_from_slice(binds);
        let container = Container::boot(rootfs, &all, net);
        let file = deb
            .file_name()
            .and_then(|f| f.to_str())
            .expect("package file name");
        let dpkg = container.sh(&format!("dpkg -i /mnt/pkg/{file}"));
        container.sh_ok("apt-get -f install -y -q");
        let status = container.sh_ok("dpkg-query -W -f='${Status} ${Version}' vhost-appliance");
        assert_eq!(
            status,
            format!("install ok installed {}-1", env!("CARGO_PKG_VERSION")),
            "dpkg -i said:\n{}{}",
            String::from_utf8_lossy(&dpkg.stdout),
            String::from_utf8_lossy(&dpkg.stderr)
        );
        container
    }

    /// The container's init: the child of systemd-nspawn that runs systemd.
    fn find_leader(process: &Process) -> u32 {
        let pid = process.pid();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .unwrap_or_default();
            for child in children.split_whitespace() {
                let comm =
                    std::fs::read_to_string(format!("/proc/{child}/comm")).unwrap_or_default();
                if comm.trim() == "systemd" {
                    return child.parse().expect("pid");
                }
            }
            assert!(
                Instant::now() < deadline,
                "systemd-nspawn started no systemd within 60 s:\n{}",
                process.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `script` with `sh -c` inside the container (as root, in its namespaces).
    pub fn sh(&self, script: &str) -> Output {
        Command::new("nsenter")
            .arg("--target")
            .arg(self.leader.to_string())
            .args([
                "--mount", "--uts", "--ipc", "--net", "--pid", "--cgroup", "--root", "--wd",
            ])
            .args(["env", "-i"])
            .args(ENV)
            .args(["sh", "-c", script])
            .output()
            .expect("run nsenter")
    }

    /// Runs `script` inside; fails the test with its output unless it exits 0. Returns stdout.
    pub fn sh_ok(&self, script: &str) -> String {
        let out = self.sh(script);
        assert!(
            out.status.success(),
            "in the container: {script}\nexited {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `path` in the container, as the host reaches it (files and unix sockets alike).
    pub fn host_path(&self, path: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{path}", self.leader))
    }

    /// The journal of `unit` in this boot.
    pub fn journal(&self, unit: &str) -> String {
        let out = self.sh(&format!("journalctl -b --no-pager -o cat -u {unit}"));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until `script` exits 0 inside, polling every 100 ms; fails with `what` and the
    /// journal of `unit` after `timeout`.
    pub fn wait_until(&self, script: &str, what: &str, unit: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.sh(script).status.success() {
            assert!(
                Instant::now() < deadline,
                "{what}: not within {timeout:?}\n--- journal of {unit} ---\n{}",
                self.journal(unit)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let out = self.sh("journalctl -b --no-pager | tail -n 60");
            eprintln!(
                "---- container journal (tail) ----\n{}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        // SIGTERM makes systemd-nspawn shut the container down in order; the process's
        // own drop kills it if that takes too long.
        let _ = self.process.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.process.try_wait().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
