//! A throwaway one-node Ceph cluster for the RBD tests (`tests/scripts/ceph-cluster.sh`:
//! one mon, one memstore OSD, loopback only), the `rbd` tool against it, and an image as a
//! [`Backing`] whose bytes are read with `rbd export`.
//!
//! [`shared`] is one cluster for all tests of a test binary that only do I/O; a test that
//! breaks its cluster (stops the OSD, kills it) starts its own with [`Cluster::start`].
//! The script watches its parent, so a cluster never outlives the test process.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::blk_suite::{md5_hex, Backing};
use crate::daemon::{scratch_dir, Process};

/// A running one-node cluster.
pub struct Cluster {
    /// The script supervising mon and OSD.
    pub process: Process,
    /// Its directory (ceph.conf, data, logs).
    pub dir: tempfile::TempDir,
}

/// The cluster shared by the tests of this process (started on first use).
pub fn shared() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(Cluster::start)
}

/// A free loopback port for a mon, outside the kernel's ephemeral range (32768-60999 by
/// default): a port taken from that range and released can be handed to some client's
/// outgoing connection before the mon binds it.
fn free_port() -> u16 {
    use std::hash::{BuildHasher, RandomState};
    for attempt in 0u64..1000 {
        let port = 10000 + (RandomState::new().hash_one(attempt) % 20000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 10000..30000");
}

impl Cluster {
    /// Starts a cluster with pool `rbd` and waits until it serves I/O (~10 s). A start that
    /// fails (Ceph's one-node bootstrap sometimes does, see the script) is retried on a new
    /// directory and port, twice.
    pub fn start() -> Cluster {
        let mut failures = String::new();
        for _ in 0..3 {
            match Cluster::try_start() {
                Ok(cluster) => {
                    if !failures.is_empty() {
                        eprintln!("ceph cluster started after failed attempts:{failures}");
                    }
                    return cluster;
                }
                Err(log) => failures += &format!("\n---- failed start ----\n{log}"),
            }
        }
        panic!("the ceph cluster did not start in 3 attempts:{failures}");
    }

    fn try_start() -> Result<Cluster, String> {
        let dir = scratch_dir();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/ceph-cluster.sh");
        let mut command = Command::new("bash");
        command
            .arg(script)
            .arg(dir.path().join("ceph"))
            .arg(free_port().to_string());
        let mut process = Process::spawn(command, &dir.path().join("cluster.log"), "ceph-cluster");
        let ready = dir.path().join("ceph/ready");
        let deadline = Instant::now() + Duration::from_secs(120);
        while !ready.exists() {
            if process.try_wait().is_some() || Instant::now() > deadline {
                return Err(Cluster { process, dir }.logs());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(Cluster { process, dir })
    }

    /// Its `ceph.conf`.
    pub fn conf(&self) -> PathBuf {
        self.dir.path().join("ceph/ceph.conf")
    }

    /// Runs `rbd ARGS` against the cluster; panics with its output when it fails.
    pub fn rbd(&self, args: &[&str]) -> Vec<u8> {
        let out = Command::new("timeout")
            .arg("120")
            .arg("rbd")
            .args(args)
            .env("CEPH_CONF", self.conf())
            .output()
            .expect("run rbd");
        assert!(
            out.status.success(),
            "rbd {args:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// Creates image `rbd/NAME` holding `data` (`rbd import`).
    pub fn import(&self, name: &str, data: &[u8]) {
        let file = self.dir.path().join(format!("{name}.import"));
        std::fs::write(&file, data).expect("write import file");
        self.rbd(&[
            "import",
            file.to_str().expect("utf-8 path"),
            &format!("rbd/{name}"),
        ]);
        let _ = std::fs::remove_file(file);
    }

    /// Every byte of image `rbd/NAME` (`rbd export`, which opens it read-only and needs no
    /// lock).
    pub fn export(&self, name: &str) -> Vec<u8> {
        self.rbd(&["export", "--no-progress", &format!("rbd/{name}"), "-"])
    }

    /// Process id of a daemon (`mon` or `osd`).
    pub fn pid(&self, daemon: &str) -> i32 {
        let text = std::fs::read_to_string(self.dir.path().join(format!("ceph/{daemon}.pid")))
            .expect("pid file");
        text.trim().parse().expect("a pid")
    }

    /// Sends `signal` to a daemon (`mon` or `osd`).
    pub fn signal(&self, daemon: &str, signal: i32) {
        // SAFETY: kill(2) on a pid of this cluster's daemons; no memory is involved.
        let rc = unsafe { libc::kill(self.pid(daemon), signal) };
        assert_eq!(rc, 0, "kill {daemon}: {}", std::io::Error::last_os_error());
    }

    /// Kills mon and OSD (SIGKILL): the cluster is gone; waits for the script to exit.
    pub fn kill(&mut self) {
        self.signal("osd", libc::SIGKILL);
        self.signal("mon", libc::SIGKILL);
        self.process.wait_exit(Duration::from_secs(30));
    }

    /// The script's and the daemons' logs, for a failure message.
    pub fn logs(&self) -> String {
        let mut text = self.process.log();
        for name in ["mon.a", "osd.0"] {
            let path = self.dir.path().join(format!("ceph/log/{name}.log"));
            if let Ok(log) = std::fs::read_to_string(path) {
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                text += &format!("\n---- {name} (last lines) ----\n");
                text += &tail.into_iter().rev().collect::<Vec<_>>().join("\n");
            }
        }
        text
    }

    /// Waits until `rbd ARGS` succeeds (the cluster is back), up to `timeout`.
    pub fn wait_rbd(&self, args: &[&str], timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let ok = Command::new("timeout")
                .arg("20")
                .arg("rbd")
                .args(args)
                .env("CEPH_CONF", self.conf())
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "rbd {args:?} kept failing");
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// An RBD image as the [`Backing`] of a test: its bytes as `rbd export` reads them.
pub struct RbdImage<'a> {
    /// The cluster.
    pub cluster: &'a Cluster,
    /// Image name in pool `rbd`.
    pub name: String,
}

impl Backing for RbdImage<'_> {
    fn md5(&mut self, offset: u64, len: u64) -> String {
        let all = self.cluster.export(&self.name);
        let (start, end) = (offset as usize, (offset + len) as usize);
        assert!(
            end <= all.len(),
            "image {} is {} bytes",
            self.name,
            all.len()
        );
        md5_hex(&all[start..end])
    }
}
