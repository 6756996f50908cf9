//! Consumer VMs for tests: stock `qemu-system-x86_64` booting the image from
//! `image-builder/build-image.sh`, with guest RAM shared (memfd) as vhost-user requires,
//! the serial console as a command channel ([`crate::console`]), and a QMP socket for hotplug.
//!
//! KVM is used only where it can run a stock guest kernel (vmx/svm present, no `kvm_pvm`),
//! and only if the guest then actually boots; otherwise TCG. The choice is printed.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::console::Console;
pub use crate::console::GuestOutput;
use crate::daemon::{scratch_dir, Process};
use crate::tcg_defects::{retry_tcg_defect, QemuBuild};

/// Kernel and initramfs of a test VM.
#[derive(Debug, Clone)]
pub struct ConsumerImage {
    /// Directory holding `vmlinuz` and `initrd.img`.
    pub dir: PathBuf,
}

/// Runs `image-builder/build-image.sh` with `args`; returns the image directory.
fn build_image(args: &[&str]) -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../image-builder/build-image.sh");
    let out = Command::new("bash")
        .arg(&script)
        .args(args)
        .output()
        .expect("run build-image.sh");
    assert!(
        out.status.success(),
        "build-image.sh {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    PathBuf::from(stdout.lines().last().expect("image directory").trim())
}

impl ConsumerImage {
    /// Builds (or takes from the cache) the consumer image, once per test process.
    pub fn get() -> &'static ConsumerImage {
        static IMAGE: OnceLock<ConsumerImage> = OnceLock::new();
        IMAGE.get_or_init(|| ConsumerImage {
            dir: build_image(&["consumer"]),
        })
    }

    /// An appliance image carrying `programs` (built or taken from the cache).
    pub fn appliance(programs: &[&Path]) -> ConsumerImage {
        let mut args = vec!["appliance"];
        let paths: Vec<String> = programs.iter().map(|p| p.display().to_string()).collect();
        args.extend(paths.iter().map(String::as_str));
        ConsumerImage {
            dir: build_image(&args),
        }
    }
}

/// `qemu-system-x86_64` with the virtio-vhost-user-pci device, built (or taken from the
/// cache) by `qemu-device/build.sh`, once per test process.
/// `VVU_QEMU` overrides it (e.g. to test an older build).
pub fn patched_qemu() -> &'static Path {
    static QEMU: OnceLock<PathBuf> = OnceLock::new();
    QEMU.get_or_init(|| {
        if let Some(qemu) = std::env::var_os("VVU_QEMU") {
            return PathBuf::from(qemu);
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../qemu-device/build.sh");
        let out = Command::new("bash")
            .arg(&script)
            .output()
            .expect("run qemu-device/build.sh");
        assert!(
            out.status.success(),
            "qemu-device/build.sh failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        PathBuf::from(stdout.lines().last().expect("qemu path").trim())
    })
}

/// Makes QEMU (or a launcher that execs it) run with glibc's heap checks: freed memory is
/// filled with a pattern and the heap is checked harder, so a use after free in a device
/// model under test crashes at once instead of corrupting the heap silently.
pub fn with_heap_checks(cmd: &mut Command) {
    cmd.env("MALLOC_PERTURB_", "165").env("MALLOC_CHECK_", "3");
}

/// The accelerator a VM runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization.
    Kvm,
    /// Software emulation.
    Tcg,
}

/// KVM if this host can run stock guest kernels under it, else TCG.
pub fn preferred_accel() -> Accel {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let has_vmx = cpu.split_whitespace().any(|f| f == "vmx" || f == "svm");
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    if has_vmx && !pvm && Path::new("/dev/kvm").exists() {
        Accel::Kvm
    } else {
        Accel::Tcg
    }
}

/// A vhost-user-blk device present at boot.
#[derive(Debug, Clone)]
pub struct BlkAtBoot {
    /// Chardev and device id.
    pub id: String,
    /// The backend's socket.
    pub socket: PathBuf,
    /// Queues the device uses.
    pub num_queues: u16,
}

/// How to start a consumer VM.
#[derive(Debug, Clone)]
pub struct VmOptions {
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// Room for memory hotplug: `-m` gets `slots=2,maxmem=` this many MiB.
    pub max_memory_mib: Option<u32>,
    /// vCPUs.
    pub cpus: u32,
    /// vhost-user-blk devices present at boot.
    pub blk: Vec<BlkAtBoot>,
    /// Free PCIe root ports for hotplug, named `hp0`, `hp1`, ...
    pub hotplug_ports: u32,
    /// QEMU binary (default: the system's stock `qemu-system-x86_64`).
    pub qemu: PathBuf,
    /// Extra `-M q35,...` machine options (e.g. `kernel-irqchip=split`).
    pub machine_options: String,
    /// Extra kernel command line arguments.
    pub kernel_args: String,
    /// Extra QEMU arguments, appended as given.
    pub extra_args: Vec<String>,
    /// The guest image (default: the consumer image).
    pub image: Option<ConsumerImage>,
    /// Run QEMU with glibc's heap checks ([`with_heap_checks`]).
    pub heap_checks: bool,
    /// A guest reboot restarts the guest in the same QEMU (default: QEMU exits).
    pub allow_reboot: bool,
}

impl Default for VmOptions {
    fn default() -> Self {
        VmOptions {
            memory_mib: 512,
            max_memory_mib: None,
            cpus: 2,
            blk: Vec::new(),
            hotplug_ports: 2,
            qemu: PathBuf::from("qemu-system-x86_64"),
            machine_options: String::new(),
            kernel_args: String::new(),
            extra_args: Vec::new(),
            image: None,
            heap_checks: false,
            allow_reboot: false,
        }
    }
}

/// Filesystem round trip and a verifying fio run on `/dev/$DEV`, as a user would.
pub fn filesystem_and_fio_script(dev: &str) -> String {
    format!(
        r#"set -e
DEV=/dev/{dev}
mkfs.ext4 -q -F $DEV
mount $DEV /mnt
i=0; while [ $i -lt 8 ]; do dd if=/dev/urandom of=/mnt/f$i bs=64k count=8 2>/dev/null; i=$((i+1)); done
sha1sum /mnt/f* > /tmp/sums
sync
umount /mnt
e2fsck -f -n $DEV
mount $DEV /mnt
sha1sum -c /tmp/sums
umount /mnt
fio --name=verify --filename=$DEV --ioengine=io_uring --iodepth=16 --direct=1 \
    --rw=randwrite --bs=4k --size=16M --offset=32M --verify=crc32c --verify_fatal=1 \
    --do_verify=1 --randrepeat=0 --output-format=terse --minimal
echo GUEST-CHECKS-PASSED
"#
    )
}

/// A running consumer VM; QEMU is killed when it is dropped.
pub struct Vm {
    process: Process,
    // Boxed: a Vm sits in enums next to much smaller variants (session_matrix.rs).
    console: Box<Console>,
    qmp: Qmp,
    /// Accelerator in use.
    pub accel: Accel,
    _dir: tempfile::TempDir,
}

impl Vm {
    /// Boots a VM and waits for its command prompt.
    pub fn boot(options: &VmOptions) -> Vm {
        let accel = preferred_accel();
        if accel == Accel::Kvm {
            match Self::try_boot(options, Accel::Kvm) {
                Ok(vm) => return vm,
                Err(log) => eprintln!("vm: KVM guest did not boot, falling back to TCG:\n{log}"),
            }
        }
        let qemu = if options.qemu == patched_qemu() {
            QemuBuild::Patched
        } else {
            QemuBuild::Stock
        };
        retry_tcg_defect(
            Accel::Tcg,
            qemu,
            Self::try_boot(options, Accel::Tcg),
            || Self::try_boot(options, Accel::Tcg),
        )
        .unwrap_or_else(|log| panic!("guest did not boot under TCG:\n{log}"))
    }

    fn try_boot(options: &VmOptions, accel: Accel) -> Result<Vm, String> {
        let image = options
            .image
            .clone()
            .unwrap_or_else(|| ConsumerImage::get().clone());
        let dir = scratch_dir();
        let serial_path = dir.path().join("serial.sock");
        let qmp_path = dir.path().join("qmp.sock");
        let mem = options.memory_mib;
        let mut machine = match accel {
            Accel::Kvm => "q35,accel=kvm".to_string(),
            Accel::Tcg => "q35,accel=tcg".to_string(),
        };
        if !options.machine_options.is_empty() {
            machine.push(',');
            machine.push_str(&options.machine_options);
        }
        eprintln!("vm: booting consumer guest under {accel:?}");
        let mut cmd = Command::new(&options.qemu);
        if options.heap_checks {
            with_heap_checks(&mut cmd);
        }
        // Firmware as Debian ships it (stock QEMU has these built in; a patched build may not).
        cmd.args(["-L", "/usr/share/seabios", "-L", "/usr/share/qemu"]);
        cmd.args(["-M", &machine, "-cpu", "max", "-smp"])
            .arg(options.cpus.to_string())
            .arg("-m")
            .arg(match options.max_memory_mib {
                Some(max) => format!("{mem}M,slots=2,maxmem={max}M"),
                None => format!("{mem}M"),
            })
            .arg("-object")
            .arg(format!("memory-backend-memfd,id=mem,size={mem}M,share=on"))
            .args(["-numa", "node,memdev=mem"])
            .arg("-kernel")
            .arg(image.dir.join("vmlinuz"))
            .arg("-initrd")
            .arg(image.dir.join("initrd.img"))
            .arg("-append")
            .arg(format!(
                "console=ttyS0 loglevel=4 panic=-1 {}",
                options.kernel_args
            ))
            .args(["-display", "none", "-nodefaults", "-monitor", "none"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=serial0,path={},server=on,wait=off,logfile={}",
                serial_path.display(),
                dir.path().join("serial.log").display()
            ))
            .args(["-serial", "chardev:serial0"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()));
        if !options.allow_reboot {
            cmd.arg("-no-reboot");
        }
        for port in 0..options.hotplug_ports {
            cmd.arg("-device").arg(format!(
                "pcie-root-port,id=hp{port},chassis={},slot={}",
                10 + port,
                10 + port
            ));
        }
        for b in &options.blk {
            cmd.arg("-chardev")
                .arg(format!("socket,id={},path={}", b.id, b.socket.display()))
                .arg("-device")
                .arg(format!(
                    "vhost-user-blk-pci,id={},chardev={},num-queues={}",
                    b.id, b.id, b.num_queues
                ));
        }
        cmd.args(&options.extra_args);
        Self::start(cmd, dir, accel)
    }

    /// Starts a VM from a complete QEMU command line (such as the appliance launcher's)
    /// that `command` builds for a new scratch directory, in which the serial port and QMP
    /// monitor are the unix sockets `serial.sock` and `qmp.sock`, and waits for its command
    /// prompt.
    pub fn boot_command(command: impl Fn(&Path) -> Command, accel: Accel) -> Vm {
        let attempt = || {
            let dir = scratch_dir();
            let cmd = command(dir.path());
            Self::start(cmd, dir, accel)
        };
        retry_tcg_defect(accel, QemuBuild::Patched, attempt(), attempt)
            .unwrap_or_else(|log| panic!("guest did not boot:\n{log}"))
    }

    fn start(cmd: Command, dir: tempfile::TempDir, accel: Accel) -> Result<Vm, String> {
        let serial_path = dir.path().join("serial.sock");
        let qmp_path = dir.path().join("qmp.sock");
        let mut process = Process::spawn(cmd, &dir.path().join("qemu.log"), "qemu-system-x86_64");
        process.wait_for_path(&serial_path, Duration::from_secs(120));
        process.wait_for_path(&qmp_path, Duration::from_secs(20));
        let console = Console::connect(&serial_path, &dir.path().join("qemu.log"))
            .map(Box::new)
            .map_err(|e| format!("{e}\n{}", process.log()))?;
        let qmp = Qmp::connect(&qmp_path);
        let mut vm = Vm {
            process,
            console,
            qmp,
            accel,
            _dir: dir,
        };
        let boot_timeout = match accel {
            Accel::Kvm => Duration::from_secs(30),
            Accel::Tcg => Duration::from_secs(120),
        };
        let started = Instant::now();
        if vm.console.wait_ready(boot_timeout) {
            eprintln!(
                "vm: guest ready after {:.1}s ({accel:?})",
                started.elapsed().as_secs_f64()
            );
            Ok(vm)
        } else {
            Err(format!(
                "{}\n{}\n---- qemu threads ----\n{}",
                vm.console.transcript(),
                vm.process.log(),
                thread_states(vm.process.pid())
            ))
        }
    }

    /// Runs a shell script in the guest and returns its status and output.
    pub fn run(&mut self, script: &str, timeout: Duration) -> GuestOutput {
        self.console.run(script, timeout)
    }

    /// Runs `script` and fails the test with its output unless it exits 0.
    pub fn run_ok(&mut self, script: &str, timeout: Duration) -> String {
        self.console.run_ok(script, timeout)
    }

    /// Waits until a virtio-blk disk with `serial` appears; returns its device name (`vdb`).
    pub fn wait_for_blk(&mut self, serial: &str, timeout: Duration) -> String {
        self.console.wait_for_blk(serial, timeout)
    }

    /// Waits until no virtio-blk disk has `serial`.
    pub fn wait_for_blk_gone(&mut self, serial: &str, timeout: Duration) {
        self.console.wait_for_blk_gone(serial, timeout)
    }

    /// Reboots the guest in place (`reboot -f`: the devices are reset while their
    /// backends stay connected) and waits for its command prompt again. Needs
    /// [`VmOptions::allow_reboot`].
    pub fn reboot(&mut self, timeout: Duration) {
        self.console.write_line("reboot -f");
        let started = Instant::now();
        assert!(
            self.console.wait_ready(timeout),
            "the guest did not come back from a reboot within {timeout:?}:\n{}",
            self.process.log()
        );
        eprintln!(
            "vm: guest ready again {:.1}s after reboot",
            started.elapsed().as_secs_f64()
        );
    }

    /// Powers the guest off (`poweroff -f`: ACPI power-off, QEMU stops its vhost-user
    /// devices and exits) and waits for QEMU to exit with status 0.
    pub fn power_off(&mut self, timeout: Duration) {
        self.console.write_line("sync; poweroff -f");
        let status = self.process.wait_exit(timeout);
        assert!(
            status.success(),
            "QEMU exited with {status} after power-off"
        );
    }

    /// Kills QEMU with SIGKILL, as a crashing host process dies: no device is stopped and
    /// the vhost-user sockets just close.
    pub fn kill(&mut self) {
        self.process
            .signal(libc::SIGKILL)
            .expect("SIGKILL the consumer's QEMU");
        self.process.wait_exit(Duration::from_secs(30));
    }

    /// The QMP monitor.
    pub fn qmp(&mut self) -> &mut Qmp {
        &mut self.qmp
    }

    /// QEMU's own log so far.
    pub fn qemu_log(&self) -> String {
        self.process.log()
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// True while QEMU is still running.
    pub fn is_running(&mut self) -> bool {
        self.process.try_wait().is_none()
    }

    /// What a failure report shows of this VM: the serial console's tail, QEMU's log, and
    /// its threads and eventfds (see [`thread_states`], [`eventfd_states`]).
    pub fn failure_report(&self) -> String {
        format!(
            "---- guest serial (tail) ----\n{}\n---- qemu ----\n{}\n---- qemu threads ----\n{}\n---- qemu eventfds ----\n{}",
            self.console.transcript_tail(4000),
            self.process.log(),
            thread_states(self.process.pid()),
            eventfd_states(self.process.pid())
        )
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.failure_report());
        }
    }
}

/// One line per thread of process `pid`: id, name, state, kernel wait channel and the
/// system call it is in (`/proc/PID/task/TID/syscall`: number and arguments), so a QEMU
/// thread blocked for good shows where (a `read` of an eventfd, a mutex...).
pub fn thread_states(pid: u32) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return format!("(process {pid} is gone)");
    };
    let mut lines: Vec<String> = tasks
        .flatten()
        .map(|t| {
            let read = |f: &str| {
                std::fs::read_to_string(t.path().join(f))
                    .unwrap_or_default()
                    .trim()
                    .to_string()
            };
            let stat = read("stat");
            let state = stat
                .rsplit_once(") ")
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .unwrap_or("?")
                .to_string();
            format!(
                "{} {} {state} wchan={} syscall={}",
                t.file_name().to_string_lossy(),
                read("comm"),
                read("wchan"),
                read("syscall")
            )
        })
        .collect();
    lines.sort();
    lines.join("\n")
}

/// The counter of eventfd `fd` of process `pid` (signalled and not yet read), from
/// `/proc/PID/fdinfo` (which prints it in hex) without reading the eventfd, which would
/// clear it; `None` if it is gone or no eventfd.
pub fn eventfd_count(pid: u32, fd: i32) -> Option<u64> {
    let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok()?;
    let hex = info
        .lines()
        .find_map(|l| l.strip_prefix("eventfd-count:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// One line per eventfd process `pid` holds: fd number, `eventfd-id` (the same for every
/// process holding that eventfd, so a consumer's kick can be found in the appliance QEMU),
/// its count ([`eventfd_count`], decimal) and whether the open file description is
/// non-blocking. A lost kick or call shows as a count nobody reads, or as a zero count where
/// the other side never saw a signal.
pub fn eventfd_states(pid: u32) -> String {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return format!("(process {pid} is gone)");
    };
    let mut lines: Vec<(u32, String)> = fds
        .flatten()
        .filter(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|t| t.as_os_str() == "anon_inode:[eventfd]")
        })
        .filter_map(|fd| {
            let n: u32 = fd.file_name().to_str()?.parse().ok()?;
            let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{n}")).ok()?;
            let field = |key: &str| {
                info.lines()
                    .find_map(|l| l.strip_prefix(key))
                    .map(|v| v.trim().to_string())
                    .unwrap_or_else(|| "?".into())
            };
            let nonblock = u32::from_str_radix(&field("flags:"), 8)
                .map(|f| {
                    if f & libc::O_NONBLOCK as u32 != 0 {
                        "nonblock"
                    } else {
                        "BLOCKING"
                    }
                })
                .unwrap_or("?");
            let count = eventfd_count(pid, n as i32).map_or("?".into(), |c| c.to_string());
            Some((
                n,
                format!(
                    "fd {n} eventfd-id={} count={count} {nonblock}",
                    field("eventfd-id:")
                ),
            ))
        })
        .collect();
    lines.sort();
    lines
        .into_iter()
        .map(|(_, l)| l)
        .collect::<Vec<_>>()
        .join("\n")
}

/// A QMP client.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: Vec<Value>,
}

impl Qmp {
    /// Connects and leaves capabilities negotiation mode.
    pub fn connect(path: &Path) -> Qmp {
        let stream = crate::console::connect_listening(path).expect("connect to QMP");
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("QMP timeout");
        let writer = stream.try_clone().expect("dup QMP socket");
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
        };
        let greeting = qmp.read_message();
        assert!(
            greeting.get("QMP").is_some(),
            "not a QMP greeting: {greeting}"
        );
        qmp.execute("qmp_capabilities", json!({}))
            .expect("qmp_capabilities");
        qmp
    }

    fn read_message(&mut self) -> Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("QMP read");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad QMP message {line:?}: {e}"))
    }

    /// Runs a command; `Err` carries QEMU's error description.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, String> {
        let msg = json!({ "execute": command, "arguments": arguments });
        writeln!(self.writer, "{msg}").expect("QMP write");
        loop {
            let reply = self.read_message();
            if reply.get("event").is_some() {
                self.events.push(reply);
            } else if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            } else if let Some(err) = reply.get("error") {
                return Err(err["desc"].as_str().unwrap_or("unknown error").to_string());
            }
        }
    }

    /// Waits for an event matching `pred` (checking ones already received first).
    pub fn wait_event(
        &mut self,
        name: &str,
        pred: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Value {
        if let Some(i) = self
            .events
            .iter()
            .position(|e| e["event"] == name && pred(e))
        {
            return self.events.remove(i);
        }
        let deadline = Instant::now() + timeout;
        loop {
            assert!(
                Instant::now() < deadline,
                "no QMP event {name} within {timeout:?}"
            );
            let msg = self.read_message();
            if msg["event"] == name && pred(&msg) {
                return msg;
            }
            if msg.get("event").is_some() {
                self.events.push(msg);
            }
        }
    }

    /// `chardev-add` of a unix socket client that reconnects every `reconnect_ms`.
    pub fn chardev_add_socket(
        &mut self,
        id: &str,
        path: &Path,
        reconnect_ms: u64,
    ) -> Result<Value, String> {
        self.execute(
            "chardev-add",
            json!({
                "id": id,
                "backend": { "type": "socket", "data": {
                    "addr": { "type": "unix", "data": { "path": path.display().to_string() } },
                    "server": false,
                    "reconnect-ms": reconnect_ms,
                }}
            }),
        )
    }

    /// `device_add` of `driver` with `id`, plugged into `bus`, with extra properties.
    pub fn device_add(
        &mut self,
        driver: &str,
        id: &str,
        bus: &str,
        extra: Value,
    ) -> Result<Value, String> {
        let mut args = json!({ "driver": driver, "id": id, "bus": bus });
        if let (Some(map), Some(more)) = (args.as_object_mut(), extra.as_object()) {
            for (k, v) in more {
                map.insert(k.clone(), v.clone());
            }
        }
        self.execute("device_add", args)
    }

    /// `device_del`, then waits for the guest to release it (DEVICE_DELETED).
    pub fn device_del(&mut self, id: &str, timeout: Duration) {
        self.execute("device_del", json!({ "id": id }))
            .expect("device_del");
        self.wait_event("DEVICE_DELETED", |e| e["data"]["device"] == id, timeout);
    }

    /// `chardev-remove`.
    pub fn chardev_remove(&mut self, id: &str) -> Result<Value, String> {
        self.execute("chardev-remove", json!({ "id": id }))
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;

    #[test]
    fn eventfd_states_show_count_id_and_blocking() {
        let mut fds = Vec::new();
        for flags in [libc::EFD_NONBLOCK, 0] {
            // SAFETY: eventfd(2) with valid flags; the fd is owned by the File right away.
            let fd = unsafe { libc::eventfd(0, flags | libc::EFD_CLOEXEC) };
            assert!(fd >= 0);
            // SAFETY: fd is a fresh eventfd nothing else owns.
            fds.push(unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) });
        }
        // 26: fdinfo prints 1a, which must come out as 26.
        fds[0].write_all(&26u64.to_ne_bytes()).unwrap();
        let states = super::eventfd_states(std::process::id());
        let line = |fd: &std::fs::File| {
            let prefix = format!("fd {} ", fd.as_raw_fd());
            states
                .lines()
                .find(|l| l.starts_with(&prefix))
                .unwrap_or_else(|| panic!("no line for {prefix}in:\n{states}"))
                .to_string()
        };
        let (a, b) = (line(&fds[0]), line(&fds[1]));
        assert!(a.contains(" count=26 ") && a.ends_with(" nonblock"), "{a}");
        assert!(b.contains(" count=0 ") && b.ends_with(" BLOCKING"), "{b}");
        // Both carry an id, and not the same one.
        let id = |l: &str| l.split_whitespace().nth(2).unwrap().to_string();
        assert!(
            id(&a).starts_with("eventfd-id=") && id(&a) != id(&b),
            "{a} / {b}"
        );
    }

    #[test]
    fn thread_states_show_a_thread_blocked_in_read() {
        let (ours, theirs) = nix::unistd::pipe().unwrap();
        let mut ours = std::fs::File::from(ours);
        let reader = std::thread::Builder::new()
            .name("blocked-reader".into())
            .spawn(move || {
                let mut byte = [0u8; 1];
                ours.read(&mut byte).unwrap()
            })
            .unwrap();
        // read(2) is system call 0 on x86_64, 63 on aarch64.
        let read_nr = if cfg!(target_arch = "aarch64") {
            "63"
        } else {
            "0"
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let line = loop {
            let states = super::thread_states(std::process::id());
            if let Some(line) = states.lines().find(|l| l.contains("blocked-reader")) {
                if line.contains(&format!("syscall={read_nr} ")) {
                    break line.to_string();
                }
            }
            assert!(std::time::Instant::now() < deadline, "{states}");
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        assert!(line.contains(" S "), "{line}");
        drop(theirs);
        assert_eq!(reader.join().unwrap(), 0);
    }
}
