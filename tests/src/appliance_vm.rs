//! The appliance VM as a user starts it, for tests: a config drive made from a directory
//! holding `exports.yaml`, and `image-builder/launch-appliance.sh` with one `--vvu` per
//! consumer socket. The daemon inside logs to `/config/appliance.log`; its pid is in
//! `/run/appliance.pid`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::daemon::appliance_binary;
use crate::vm::{patched_qemu, preferred_accel, with_heap_checks, Accel, ConsumerImage, Vm};

const MINUTE: Duration = Duration::from_secs(60);

/// One virtio-vhost-user device of the appliance VM: the host socket consumers connect
/// to, and the uuid an export may name it by (else it is named by PCI address, the i-th
/// device at `0000:00:1<i>.0`).
#[derive(Debug, Clone)]
pub struct VvuSocket {
    /// Socket file name inside the sockets directory.
    pub socket: String,
    /// Device uuid, if the exports name the device by uuid.
    pub uuid: Option<String>,
}

impl VvuSocket {
    /// A device the exports name by PCI address.
    pub fn at(socket: &str) -> Self {
        VvuSocket {
            socket: socket.into(),
            uuid: None,
        }
    }

    /// A device the exports name by `uuid`.
    pub fn with_uuid(socket: &str, uuid: &str) -> Self {
        VvuSocket {
            socket: socket.into(),
            uuid: Some(uuid.into()),
        }
    }
}

/// How to start the appliance VM.
#[derive(Debug, Clone)]
pub struct ApplianceVmOptions {
    /// Contents of `exports.yaml` on the config drive.
    pub exports: String,
    /// The virtio-vhost-user devices, in PCI address order.
    pub vvus: Vec<VvuSocket>,
    /// Exports that must log `export ready` before [`start`] returns.
    pub ready_exports: usize,
    /// Host port forwarded to the daemon's metrics port 9410 inside the VM.
    pub metrics_port: Option<u16>,
    /// Shared-memory BAR per device (covers the consumers' RAM).
    pub shm_size: String,
    /// Appliance VM RAM in MiB.
    pub memory_mib: u32,
    /// The daemon's log level (default `$APPLIANCE_TEST_LOG`, else `info`).
    pub log_level: Option<String>,
    /// Boot from the config drive an earlier VM left (`config.img`), as a restart after a
    /// power cut does, instead of making a new one from `exports`.
    pub reuse_config_drive: bool,
    /// QEMU trace events the appliance VM's QEMU logs to its log (`--trace`), e.g. `vvu_*`.
    pub trace: Vec<String>,
    /// Properties every `--vvu` device gets besides socket and uuid, e.g. the test hooks
    /// `x-recv-delay-ms=20` and `x-keep-msgfd-flags=off` (`qemu-device/README.md`).
    pub vvu_properties: Vec<String>,
}

impl ApplianceVmOptions {
    /// Options for `exports` served on `vvus`, with the defaults the tests use.
    pub fn new(exports: &str, vvus: Vec<VvuSocket>, ready_exports: usize) -> Self {
        ApplianceVmOptions {
            exports: exports.to_string(),
            vvus,
            ready_exports,
            metrics_port: None,
            shm_size: "1G".into(),
            memory_mib: 768,
            log_level: None,
            reuse_config_drive: false,
            trace: Vec::new(),
            vvu_properties: Vec::new(),
        }
    }
}

/// Path of the launcher script.
pub fn launcher() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../image-builder/launch-appliance.sh")
}

/// A TCP port on the host's loopback that nothing listens on.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local address").port()
}

/// Starts the appliance VM with its sockets, config directory and config drive
/// (`config.img`) in `sockets`, and waits until the daemon init started last has logged
/// `export ready` for `ready_exports` exports (lines from earlier boots of a reused config
/// drive do not count).
pub fn start(sockets: &Path, options: &ApplianceVmOptions) -> Vm {
    let config = sockets.join("config");
    let drive = sockets.join("config.img");
    if !options.reuse_config_drive {
        std::fs::create_dir_all(&config).expect("config dir");
        std::fs::write(config.join("exports.yaml"), &options.exports).expect("exports.yaml");
        let out = Command::new("bash")
            .arg(launcher())
            .args(["make-config-drive"])
            .arg(&config)
            .arg(&drive)
            .arg("256M")
            .output()
            .expect("run make-config-drive");
        assert!(
            out.status.success(),
            "make-config-drive: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let image = ConsumerImage::appliance(&[&appliance_binary()]);
    let accel = preferred_accel();
    let command = |vm_dir: &Path| {
        let mut cmd = Command::new("bash");
        with_heap_checks(&mut cmd);
        cmd.arg(launcher()).arg("--config-drive").arg(&drive);
        for vvu in &options.vvus {
            let socket = sockets.join(&vvu.socket);
            let mut arg = socket.display().to_string();
            let uuid = vvu.uuid.as_ref().map(|u| format!("uuid={u}"));
            for property in uuid.iter().chain(&options.vvu_properties) {
                arg.push(',');
                arg.push_str(property);
            }
            cmd.arg("--vvu").arg(arg);
        }
        cmd.args(["--shm-size", &options.shm_size])
            .args(["--memory", &options.memory_mib.to_string()])
            .arg("--log-level")
            .arg(options.log_level.clone().unwrap_or_else(|| {
                std::env::var("APPLIANCE_TEST_LOG").unwrap_or_else(|_| "info".into())
            }));
        if let Some(port) = options.metrics_port {
            cmd.arg("--metrics-port").arg(port.to_string());
        }
        for events in &options.trace {
            cmd.arg("--trace").arg(events);
        }
        cmd.arg("--serial")
            .arg(format!("unix:{}", vm_dir.join("serial.sock").display()))
            .arg("--qmp")
            .arg(vm_dir.join("qmp.sock"))
            .arg("--image")
            .arg(&image.dir)
            .arg("--qemu")
            .arg(patched_qemu())
            .arg("--accel")
            .arg(match accel {
                Accel::Kvm => "kvm",
                Accel::Tcg => "tcg",
            });
        cmd
    };
    eprintln!("appliance: starting the appliance VM under {accel:?}");
    let mut vm = Vm::boot_command(command, accel);
    let log = wait_for_daemon_log(&mut vm, "export ready", options.ready_exports);
    eprintln!("appliance log at start:\n{log}");
    vm
}

/// Waits up to a minute until the daemon init started last has logged `needle` (no regex
/// characters) `count` times, counting from init's marker in `/config/appliance.log` (the
/// log outlives restarts and reboots); fails the test otherwise. Returns the whole log.
pub fn wait_for_daemon_log(vm: &mut Vm, needle: &str, count: usize) -> String {
    vm.run_ok(
        &format!(
            "seen() {{ n=$(awk '/appliance-init: starting vhost-appliance/ {{ n = 0 }} /{needle}/ {{ n++ }} END {{ print n + 0 }}' /config/appliance.log 2>/dev/null); [ \"${{n:-0}}\" -ge {count} ]; }}; \
             i=0; while ! seen && [ $i -lt 300 ]; do sleep 0.2; i=$((i+1)); done; cat /config/appliance.log; seen"
        ),
        2 * MINUTE,
    )
}

/// Stops the appliance VM as its operator does: `appliance-stop` (the daemon completes
/// in-flight I/O and syncs, the config drive is unmounted), which must stop the daemon and
/// unmount `/config`, then a power-off; QEMU must exit cleanly within `timeout`.
/// [`start`] with `reuse_config_drive` boots it again.
pub fn stop(vm: &mut Vm, timeout: Duration) {
    let out = vm.run(
        "p=$(cat /run/appliance.pid); appliance-stop --no-poweroff; \
         if kill -0 $p 2>/dev/null; then echo DAEMON-STILL-RUNNING; exit 1; fi; \
         if grep -q ' /config ' /proc/mounts; then echo CONFIG-STILL-MOUNTED; exit 1; fi",
        timeout,
    );
    assert_eq!(out.status, 0, "appliance-stop:\n{}", out.output);
    vm.power_off(timeout);
}

/// True while the daemon the appliance VM started at boot runs (one its init restarted
/// after it died does not count: /run/appliance.restarts lists those exits).
pub fn daemon_alive(vm: &mut Vm) -> bool {
    vm.run(
        "[ ! -s /run/appliance.restarts ] && kill -0 $(cat /run/appliance.pid)",
        MINUTE,
    )
    .status
        == 0
}

/// The last 400 lines of the daemon's log inside the appliance VM, and whether the whole
/// log mentions a panic (a debug log of a long run is too long for the serial console).
pub fn daemon_log(vm: &mut Vm) -> String {
    vm.run(
        "grep -q panicked /config/appliance.log && echo 'DAEMON-PANICKED (grep panicked /config/appliance.log)'; \
         tail -n 400 /config/appliance.log",
        MINUTE,
    )
    .output
}

/// The appliance kernel's reports of a stalled CPU, one per line, or "" when there are
/// none: RCU stalls, a grace-period kthread whose timer wakeup did not happen, soft and hard
/// lockups, workqueue lockups. Under TCG a missed timer wakeup means a vCPU stopped taking
/// interrupts, so MSI-X kicks aimed at it would go unserviced; the others may come from a
/// vCPU that still takes interrupts. Only the kernel log's matching lines are returned, not
/// the other console output of the command.
pub fn kernel_stall_reports(vm: &mut Vm) -> String {
    const PREFIX: &str = "KERNEL-STALL: ";
    let out = vm
        .run(
            &format!(
                "dmesg | grep -E 'detected stalls on CPUs|self-detected stall|detected expedited stalls|\
                 timer wakeup didn.t happen|soft lockup|hard LOCKUP|workqueue lockup' \
                 | sed 's/^/{PREFIX}/' || true"
            ),
            MINUTE,
        )
        .output;
    out.lines()
        .filter_map(|line| line.strip_prefix(PREFIX))
        .collect::<Vec<_>>()
        .join("\n")
}

/// What the appliance VM shows of a stuck session, for a failure report: the daemon's
/// log, its threads (where they wait, the CPU they last ran on), the per-CPU interrupt
/// counts twice 2 s apart (kicks arrive as the devices' MSI-X interrupts; a vCPU that stopped
/// taking interrupts shows frozen LOC counts) with each vfio interrupt's effective CPU, the
/// kernel log's tail (RCU stalls, soft lockups), and the daemon's per-queue metrics.
pub fn diagnostics(vm: &mut Vm) -> String {
    vm.run(
        "p=$(cat /run/appliance.pid); tail -n 400 /config/appliance.log; echo '--- threads (tid comm wchan cpu)'; \
         for t in /proc/$p/task/*; do echo \"$(basename $t) $(cat $t/comm) $(cat $t/wchan) cpu=$(cut -d' ' -f39 $t/stat)\"; done; \
         echo '--- interrupts'; grep -iE 'vfio|CPU|LOC|RES|CAL' /proc/interrupts; sleep 2; \
         echo '--- interrupts 2 s later'; grep -iE 'vfio|CPU|LOC|RES|CAL' /proc/interrupts; \
         for i in $(grep vfio /proc/interrupts | cut -d: -f1); do echo \"irq $i effective cpu $(cat /proc/irq/$i/effective_affinity_list)\"; done; \
         echo '--- kernel log'; dmesg | tail -n 30; \
         echo '--- metrics'; wget -qO- http://127.0.0.1:9410/metrics 2>&1 | grep -E '^vhost_appliance_(queue_kicks|requests_total|export_connections)' ",
        MINUTE,
    )
    .output
}

/// Whether the tests that hunt issue #18's hangs have QEMU trace (`vvu_*` in the appliance
/// VM, vhost-user in consumers): `SESSION_MATRIX_TRACE=0` turns it off, since the hangs
/// were seen untraced and tracing changes QEMU's timing.
pub fn tracing_enabled() -> bool {
    std::env::var("SESSION_MATRIX_TRACE").as_deref() != Ok("0")
}

/// Extra properties for the appliance's devices in the tests that hunt issue #18's hangs:
/// `SESSION_MATRIX_VVU_PROPERTIES=x-recv-delay-ms=20,x-keep-msgfd-flags=off` reopens and
/// widens the fd-flag window the fix closed, to see whether the hangs come back. None
/// when unset.
pub fn hunt_vvu_properties() -> Vec<String> {
    std::env::var("SESSION_MATRIX_VVU_PROPERTIES")
        .map(|v| {
            v.split(',')
                .filter(|p| !p.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// How many times a repeatable test runs: `$name` as a count, at least 1, `default` when
/// unset or not a number.
pub fn repetitions(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
        .max(1)
}

/// What the appliance VM's QEMU logs for a kick it did not deliver at once: the device's
/// trace events for no vector mapped, the vector not in use, MSI-X off or the vector
/// masked, and the IOMMU's refusals to remap an MSI (`vtd_irte_get: detected non-present
/// IRTE ...`, logged whether traced or not).
const KICK_NOT_SENT: [&str; 4] = [
    "vvu_kick_unrouted",
    "vvu_pci_notify_unused",
    "vvu_pci_notify_held",
    "vtd_",
];

/// The lines of an appliance VM's QEMU log (`Vm::qemu_log`) that say a kick was not
/// delivered at once, joined by newlines; "" when there are none.
pub fn kicks_not_sent(log: &str) -> String {
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| KICK_NOT_SENT.iter().any(|t| l.contains(t)))
        .collect();
    lines.join("\n")
}

/// Everything the appliance VM shows of a failed session, for a failure report:
/// [`diagnostics`], the kernel's stall reports, each vCPU's local APIC (pending and
/// in-service vectors: an MSI the device sent that no vCPU took shows there), the last 400
/// lines of its QEMU's log and the kicks that QEMU did not deliver at once.
pub fn failure_report(vm: &mut Vm) -> String {
    let mut report = format!("appliance VM after the failure:\n{}\n", diagnostics(vm));
    report += &format!(
        "appliance kernel's stall reports (all of its log):\n{}\n",
        kernel_stall_reports(vm)
    );
    for cpu in 0..8 {
        let lapic = vm.qmp().execute(
            "human-monitor-command",
            serde_json::json!({ "command-line": "info lapic", "cpu-index": cpu }),
        );
        match lapic {
            Ok(out) => {
                report += &format!(
                    "appliance vCPU {cpu} local APIC:\n{}\n",
                    out.as_str().unwrap_or_default()
                )
            }
            Err(_) => break,
        }
    }
    let log = vm.qemu_log();
    let lines: Vec<&str> = log.lines().collect();
    let tail = lines[lines.len().saturating_sub(400)..].join("\n");
    report += &format!("appliance VM's QEMU (last 400 lines):\n{tail}\n");
    report += &format!(
        "appliance VM's QEMU, kicks not delivered at once (whole log):\n{}",
        kicks_not_sent(&log)
    );
    report
}

/// The md5 in the output of `md5sum` (the last line that starts with one).
pub fn md5_of(out: &str) -> String {
    out.lines()
        .rev()
        .find_map(|l| {
            let h = l.split_whitespace().next()?;
            (h.len() == 32 && h.chars().all(|c| c.is_ascii_hexdigit())).then(|| h.to_string())
        })
        .unwrap_or_else(|| panic!("no md5 in {out}"))
}
