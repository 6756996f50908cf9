//! What the benchmark runs against: the backing files, this daemon
//! (`vhost-appliance`), `qemu-storage-daemon` with the matching block driver,
//! `vhost-device-scsi` for virtio-scsi, and fio on the backing itself (io_uring on a file,
//! librbd on the RBD image).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use super::{file_size, Measured, Pattern, Workload};
use crate::daemon::{appliance_binary, Process};
use crate::rng::Rng;

/// What the rows of a table section share: the backing store and the device type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// A raw file on tmpfs, buffered: software cost only.
    RawTmpfs,
    /// A raw file on the build file system (ext4), O_DIRECT.
    RawDirect,
    /// A fully allocated qcow2 image on tmpfs, buffered.
    Qcow2Tmpfs,
    /// Nothing stored (this daemon's `format: null`, QSD's `null-co`): the transport alone.
    Null,
    /// The raw tmpfs file as a virtio-scsi LUN.
    ScsiRawTmpfs,
    /// An RBD image (`rbd/bench`, written in full) on the one-node test cluster that the benchmark
    /// starts (`tests/scripts/ceph-cluster.sh`: memstore OSD, loopback).
    Rbd,
}

/// Where the rows of a backing find their data.
#[derive(Debug, Clone)]
pub enum Store {
    /// A file (raw or qcow2).
    File(PathBuf),
    /// Nothing (null).
    Nothing,
    /// Image `bench` of pool `rbd` of the cluster whose ceph.conf this is.
    Rbd(PathBuf),
}

/// The directories and cluster the backings use.
#[derive(Debug, Clone)]
pub struct Places {
    /// On tmpfs.
    pub tmpfs: PathBuf,
    /// On a disk file system (O_DIRECT works).
    pub disk: PathBuf,
    /// The test cluster's ceph.conf, once started.
    pub ceph_conf: Option<PathBuf>,
}

impl Backing {
    /// Every backing, in table order.
    pub const ALL: [Backing; 6] = [
        Backing::RawTmpfs,
        Backing::RawDirect,
        Backing::Qcow2Tmpfs,
        Backing::Null,
        Backing::ScsiRawTmpfs,
        Backing::Rbd,
    ];

    /// Short name (command line, JSON).
    pub fn name(self) -> &'static str {
        match self {
            Backing::RawTmpfs => "raw-tmpfs",
            Backing::RawDirect => "raw-direct",
            Backing::Qcow2Tmpfs => "qcow2-tmpfs",
            Backing::Null => "null",
            Backing::ScsiRawTmpfs => "scsi-raw-tmpfs",
            Backing::Rbd => "rbd",
        }
    }

    /// virtio-scsi rather than virtio-blk.
    pub fn scsi(self) -> bool {
        self == Backing::ScsiRawTmpfs
    }

    /// O_DIRECT on the file.
    fn direct(self) -> bool {
        self == Backing::RawDirect
    }

    /// Where the rows find their data.
    pub fn store(self, places: &Places) -> Store {
        let (tmpfs, disk) = (&places.tmpfs, &places.disk);
        match self {
            Backing::RawTmpfs | Backing::ScsiRawTmpfs => Store::File(tmpfs.join("bench.raw")),
            Backing::RawDirect => Store::File(disk.join("bench.raw")),
            Backing::Qcow2Tmpfs => Store::File(tmpfs.join("bench.qcow2")),
            Backing::Null => Store::Nothing,
            Backing::Rbd => Store::Rbd(places.ceph_conf.clone().expect("a cluster for rbd rows")),
        }
    }

    /// Whether fio can run the limit rows: on the raw files (with fio's io_uring engine)
    /// and the RBD image (fio's librbd engine); not on a qcow2 image (fio would write
    /// over its metadata) nor on null.
    pub fn has_limit(self) -> bool {
        !matches!(self, Backing::Qcow2Tmpfs | Backing::Null)
    }

    /// Creates the data: a file of [`file_size`] bytes of random data (so reads read data,
    /// and a qcow2 image has every cluster allocated), unless it exists with that size; an
    /// RBD image of that size, written in full.
    pub fn prepare(self, places: &Places) {
        let file = match self.store(places) {
            Store::File(file) => file,
            Store::Nothing => return,
            Store::Rbd(conf) => {
                // Written in full: librbd answers reads of objects never written without
                // asking an OSD (object map), which would measure nothing.
                let size = format!("{}M", file_size() >> 20);
                for args in [
                    &["create", "--size", &size, "rbd/bench"][..],
                    &[
                        "bench",
                        "--io-type",
                        "write",
                        "--io-size",
                        "4M",
                        "--io-pattern",
                        "seq",
                    ],
                ] {
                    let mut command = Command::new("rbd");
                    command.args(args).env("CEPH_CONF", &conf);
                    if args[0] == "bench" {
                        command.args(["--io-total", &size, "rbd/bench"]);
                    }
                    let status = command.status().expect("run rbd");
                    assert!(status.success(), "rbd {args:?} failed");
                }
                return;
            }
        };
        if fs::metadata(&file).is_ok_and(|m| m.len() >= file_size()) {
            return;
        }
        let raw = if self == Backing::Qcow2Tmpfs {
            places.tmpfs.join("bench.qcow2-source.raw")
        } else {
            file.clone()
        };
        eprintln!(
            "bench: writing {} MiB of data to {}",
            file_size() >> 20,
            raw.display()
        );
        let mut out = fs::File::create(&raw).expect("create benchmark file");
        let mut rng = Rng::new(42);
        let mut chunk = vec![0u8; 1 << 20];
        for _ in 0..file_size() >> 20 {
            rng.fill(&mut chunk);
            out.write_all(&chunk).expect("fill benchmark file");
        }
        out.sync_all().expect("sync benchmark file");
        if self == Backing::Qcow2Tmpfs {
            let status = Command::new("qemu-img")
                .args(["convert", "-f", "raw", "-O", "qcow2"])
                .arg(&raw)
                .arg(&file)
                .status()
                .expect("run qemu-img (tests/scripts/install-deps.sh installs it)");
            assert!(status.success(), "qemu-img convert failed");
            fs::remove_file(&raw).expect("remove the qcow2 source");
        }
    }
}

/// This daemon's poll setting for a row: off, or busy-polling up to `max_us`, adaptive or
/// fixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Poll {
    pub max_us: u32,
    pub adaptive: bool,
}

/// Starts this daemon serving `backing` on `dir/bench.sock` with `queues` queues.
pub fn start_ours(
    dir: &Path,
    backing: Backing,
    store: &Store,
    queues: usize,
    poll: Option<Poll>,
) -> Process {
    let disk = match store {
        Store::Nothing => format!("format: null\n    size: {}", file_size()),
        Store::Rbd(conf) => format!(
            "format: rbd\n    rbd: {{ pool: rbd, image: bench, conf: {} }}",
            conf.display()
        ),
        Store::File(f) if backing == Backing::Qcow2Tmpfs => format!(
            "path: {}\n    format: qcow2\n    direct: false",
            f.display()
        ),
        Store::File(f) => format!("path: {}\n    direct: {}", f.display(), backing.direct()),
    };
    let poll = match poll {
        None => String::new(),
        Some(p) => format!(
            "    poll: {{ max_us: {}, adaptive: {} }}\n",
            p.max_us, p.adaptive
        ),
    };
    let socket = dir.join("bench.sock");
    let config = if backing.scsi() {
        let disk = disk.replace("\n    ", "\n        ");
        format!(
            "exports:\n  - name: bench\n    type: scsi\n    socket: {}\n    num_queues: {queues}\n{poll}    luns:\n      - {disk}\n",
            socket.display()
        )
    } else {
        format!(
            "exports:\n  - name: bench\n    type: blk\n    socket: {}\n    num_queues: {queues}\n{poll}    {disk}\n",
            socket.display()
        )
    };
    let config_path = dir.join("exports.yaml");
    fs::write(&config_path, config).expect("write bench config");
    let _ = fs::remove_file(&socket);
    let mut command = Command::new(appliance_binary());
    command
        .arg("--config")
        .arg(&config_path)
        .args(["--log-level", "warn"]);
    let mut p = Process::spawn(command, &dir.join("ours.log"), "vhost-appliance");
    p.wait_for_path(&socket, Duration::from_secs(20));
    p
}

/// Starts qemu-storage-daemon (one iothread, its default adaptive polling, io_uring)
/// exporting `backing` as vhost-user-blk on `dir/bench.sock`.
pub fn start_qsd(dir: &Path, backing: Backing, store: &Store, queues: usize) -> Process {
    let socket = dir.join("bench.sock");
    let _ = fs::remove_file(&socket);
    let mut command = Command::new("qemu-storage-daemon");
    command.args(["--object", "iothread,id=io0"]);
    let node = match store {
        Store::Nothing => {
            command.arg("--blockdev").arg(format!(
                "driver=null-co,node-name=null0,size={},read-zeroes=on",
                file_size()
            ));
            "null0"
        }
        Store::Rbd(conf) => {
            command.arg("--blockdev").arg(format!(
                "driver=rbd,node-name=rbd0,pool=rbd,image=bench,conf={},cache.direct=on",
                conf.display()
            ));
            "rbd0"
        }
        Store::File(f) => {
            let direct = if backing.direct() { "on" } else { "off" };
            command.arg("--blockdev").arg(format!(
                "driver=file,node-name=file0,filename={},cache.direct={direct},aio=io_uring",
                f.display()
            ));
            if backing == Backing::Qcow2Tmpfs {
                command.args(["--blockdev", "driver=qcow2,node-name=fmt0,file=file0"]);
                "fmt0"
            } else {
                "file0"
            }
        }
    };
    command.arg("--export").arg(format!(
        "type=vhost-user-blk,id=e0,node-name={node},addr.type=unix,addr.path={},writable=on,num-queues={queues},iothread=io0",
        socket.display()
    ));
    let mut p = Process::spawn(command, &dir.join("qsd.log"), "qemu-storage-daemon");
    p.wait_for_path(&socket, Duration::from_secs(20));
    p
}

/// The vhost-device-scsi binary: `$VHOST_DEVICE_SCSI`, or where
/// `tests/scripts/install-deps.sh` installs it.
pub fn vhost_device_scsi() -> Option<PathBuf> {
    std::env::var_os("VHOST_DEVICE_SCSI")
        .map(PathBuf::from)
        .or_else(|| {
            Some(PathBuf::from(
                "/var/cache/vhost-appliance/vhost-device-scsi-0.1.0/bin/vhost-device-scsi",
            ))
        })
        .filter(|p| p.exists())
}

/// Starts vhost-device-scsi (rust-vmm) serving `file` as LUN 0 on `dir/bench.sock`.
pub fn start_vhost_device_scsi(dir: &Path, binary: &Path, file: &Path) -> Process {
    let socket = dir.join("bench.sock");
    let _ = fs::remove_file(&socket);
    let mut command = Command::new(binary);
    command
        .arg("--socket-path")
        .arg(&socket)
        .arg("--solid-state")
        .arg(file);
    let mut p = Process::spawn(
        command,
        &dir.join("vhost-device-scsi.log"),
        "vhost-device-scsi",
    );
    p.wait_for_path(&socket, Duration::from_secs(20));
    p
}

/// fio on the backing itself: io_uring on a file (the limit of the file system and
/// kernel), librbd on the RBD image (the limit of the cluster and librbd), with no virtio
/// transport in between. Latency is fio's total latency (submission to completion); for
/// the 70/30 mix, each percentile is the larger of the reads' and the writes'.
pub fn run_fio(backing: Backing, store: &Store, w: &Workload, seconds: f64) -> Measured {
    let mut command = Command::new("fio");
    command.arg("--name=limit");
    match store {
        Store::File(file) => {
            command
                .arg(format!("--filename={}", file.display()))
                .arg("--ioengine=io_uring")
                .arg(format!("--direct={}", u8::from(backing.direct())));
        }
        Store::Rbd(conf) => {
            command
                .args([
                    "--ioengine=rbd",
                    "--pool=rbd",
                    "--rbdname=bench",
                    "--clientname=admin",
                ])
                .env("CEPH_CONF", conf);
        }
        Store::Nothing => panic!("no limit row for null"),
    }
    command
        .arg(format!("--rw={}", w.pattern.fio_rw()))
        .arg(format!("--bs={}", w.block))
        .arg(format!("--iodepth={}", w.depth))
        .arg(format!("--numjobs={}", w.queues))
        .arg(format!("--size={}", file_size()))
        .arg(format!("--runtime={seconds}"))
        .arg(format!("--ramp_time={}", super::blk::WARMUP.as_secs_f64()))
        .args([
            "--time_based",
            "--group_reporting",
            "--thread",
            "--output-format=json",
        ]);
    if w.pattern == Pattern::RandMix70 {
        command.arg("--rwmixread=70");
    }
    if w.pattern.sequential() && w.queues > 1 {
        // Each job its own part of the file, as each frontend queue has.
        command.arg(format!("--size={}", file_size() / w.queues as u64));
        command.arg(format!(
            "--offset_increment={}",
            file_size() / w.queues as u64
        ));
    }
    let out = command
        .output()
        .expect("run fio (tests/scripts/install-deps.sh installs it)");
    assert!(
        out.status.success(),
        "fio failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("fio JSON");
    let job = &v["jobs"][0];
    let (mut ios, mut lat_sum, mut p) = (0u64, 0.0, [0.0f64; 3]);
    for dir in ["read", "write"] {
        let d = &job[dir];
        let n = d["total_ios"].as_u64().unwrap_or(0);
        if n == 0 {
            continue;
        }
        ios += n;
        lat_sum += d["lat_ns"]["mean"].as_f64().unwrap_or(0.0) * n as f64;
        for (i, key) in ["50.000000", "99.000000", "99.900000"].iter().enumerate() {
            let v = d["lat_ns"]["percentile"][key].as_f64().unwrap_or(0.0);
            p[i] = p[i].max(v);
        }
    }
    let runtime_s = job["read"]["runtime"]
        .as_f64()
        .filter(|&r| r > 0.0)
        .or_else(|| job["write"]["runtime"].as_f64())
        .unwrap_or(seconds * 1000.0)
        / 1000.0;
    Measured {
        ios,
        seconds: runtime_s,
        lat_us: [
            lat_sum / ios.max(1) as f64 / 1000.0,
            p[0] / 1000.0,
            p[1] / 1000.0,
            p[2] / 1000.0,
        ],
        block: w.block,
        cpu_s_per_mio: None,
    }
}
