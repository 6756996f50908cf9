//! The sanitizer-built QEMU under `-accel qtest`: started with the device, driven by qtest
//! commands over a unix socket, watched for sanitizer reports on its stderr.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::trace::DeviceParams;

/// How long one qtest command may take before QEMU counts as hung. Generous: under ASan
/// at -O0 a memory transaction with 32 mapped regions takes milliseconds, and the machine
/// is shared.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);

/// Where the first device sits: 00:04.0 on q35's root bus; device k at slot 4 + k.
pub const DEVICE_SLOT: u32 = 4;

/// Why a run failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// QEMU wrote a sanitizer report, an assertion, or a GLib critical (the text).
    Sanitizer(String),
    /// QEMU exited or died without a report (exit status and stderr tail).
    Died(String),
    /// QEMU stopped answering qtest.
    Hang(String),
    /// An oracle saw the device do the wrong thing (what it saw).
    Oracle(String),
}

impl Failure {
    /// A short label for summaries and file names.
    pub fn kind(&self) -> &'static str {
        match self {
            Failure::Sanitizer(_) => "sanitizer",
            Failure::Died(_) => "died",
            Failure::Hang(_) => "hang",
            Failure::Oracle(_) => "oracle",
        }
    }

    /// The full text.
    pub fn detail(&self) -> &str {
        match self {
            Failure::Sanitizer(s) | Failure::Died(s) | Failure::Hang(s) | Failure::Oracle(s) => s,
        }
    }

    /// Where it happened: the first stack frame in the device's own sources if the report
    /// has one, else the first line. Two failures with one signature are one bug.
    pub fn signature(&self) -> String {
        let text = self.detail();
        let first = text.lines().next().unwrap_or_default();
        match self {
            // "what: expected X, read Y": the values may change while minimizing.
            Failure::Oracle(_) => {
                return first
                    .split(": expected")
                    .next()
                    .unwrap_or_default()
                    .to_string()
            }
            // How QEMU went, and its last word (an abort's message, say).
            Failure::Died(_) => {
                let last = text
                    .lines()
                    .skip(1)
                    .filter(|l| {
                        !l.contains("warning") && !l.starts_with("==") && !l.trim().is_empty()
                    })
                    .last()
                    .unwrap_or_default();
                return format!("{first}: {last}");
            }
            _ => {}
        }
        text.lines()
            .find(|l| l.contains("virtio-vhost-user") && l.trim_start().starts_with('#'))
            .or_else(|| {
                text.lines()
                    .find(|l| l.contains("ERROR:") || l.contains("runtime error"))
            })
            .or_else(|| text.lines().next())
            .map(|l| {
                // Drop the frame number and the address, keep "in fn file:line".
                l.split_once(" in ")
                    .map_or(l, |(_, rest)| rest)
                    .trim()
                    .to_string()
            })
            .unwrap_or_default()
    }
}

/// Markers of a sanitizer report or an assertion in QEMU's stderr.
const REPORT_MARKERS: &[&str] = &[
    "ERROR: AddressSanitizer",
    "ERROR: LeakSanitizer",
    "runtime error:",
    "Assertion `",
    "assertion failed:",
    "GLib-CRITICAL",
    "Bail out!",
];

/// Returns the report in `stderr`, if there is one.
pub fn sanitizer_report(stderr: &str) -> Option<String> {
    let at = REPORT_MARKERS.iter().filter_map(|m| stderr.find(m)).min()?;
    // From the start of the marker's line.
    let start = stderr[..at].rfind('\n').map_or(0, |i| i + 1);
    Some(stderr[start..].chars().take(16 * 1024).collect())
}

/// Whether this host can run QEMU under KVM (for `accel=kvm` instances).
pub fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// The QEMU build under test: `VVU_QEMU_ASAN`, else `qemu-device/build.sh --asan` (cached).
pub fn asan_qemu() -> PathBuf {
    if let Some(qemu) = std::env::var_os("VVU_QEMU_ASAN") {
        return PathBuf::from(qemu);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../qemu-device/build.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg("--asan")
        .stderr(Stdio::inherit())
        .output()
        .expect("run qemu-device/build.sh --asan");
    assert!(out.status.success(), "qemu-device/build.sh --asan failed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    PathBuf::from(stdout.lines().last().expect("qemu path").trim())
}

/// A running QEMU with the device, under qtest.
pub struct Qemu {
    child: Child,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    stderr: Arc<Mutex<String>>,
    stderr_thread: Option<JoinHandle<()>>,
    /// Each device's chardev socket (QEMU listens on them).
    pub chardevs: Vec<PathBuf>,
    /// qtest commands sent.
    pub commands: u64,
    /// Print every command and its answer (`VVU_FUZZ_VERBOSE=1`, for reading a trace).
    verbose: bool,
}

impl Qemu {
    /// Starts `binary` with the device as `params` says; sockets go into `dir`.
    pub fn start(binary: &Path, params: &DeviceParams, dir: &Path) -> std::io::Result<Qemu> {
        let qtest_path = dir.join("qtest.sock");
        let _ = std::fs::remove_file(&qtest_path);
        let listener = UnixListener::bind(&qtest_path)?;
        let mut cmd = Command::new(binary);
        let mut chardevs = Vec::new();
        for k in 0..params.devices.max(1) {
            let chardev = dir.join(format!("vvu{k}.sock"));
            let _ = std::fs::remove_file(&chardev);
            cmd.arg("-chardev")
                .arg(format!(
                    "socket,id=vvu{k},path={},server=on,wait=off",
                    chardev.display()
                ))
                .arg("-device")
                .arg(format!(
                    "virtio-vhost-user-pci,chardev=vvu{k},addr={:#x}.0,max-vhost-queues={},\
                     queue-size={},shm-size={},uuid=6c1e7d52-3b0a-4f4e-9d41-0123456789{k:02x}{}{}",
                    DEVICE_SLOT + k,
                    params.max_vhost_queues,
                    params.queue_size,
                    params.shm_size,
                    match params.recv_delay_ms {
                        0 => String::new(),
                        ms => format!(",x-recv-delay-ms={ms}"),
                    },
                    if params.keep_msgfd_flags {
                        ""
                    } else {
                        ",x-keep-msgfd-flags=off"
                    }
                ));
            chardevs.push(chardev);
        }
        let mut child = cmd
            .args(["-L", "/usr/share/seabios", "-L", "/usr/share/qemu"])
            .args(["-machine", "q35", "-m", "64M", "-accel"])
            .args(if params.kvm {
                &["kvm", "-S"][..]
            } else {
                &["qtest"][..]
            })
            .args(["-display", "none", "-nodefaults", "-qtest-log", "/dev/null"])
            .arg("-qtest")
            .arg(format!("unix:{}", qtest_path.display()))
            // Leaks at exit are QEMU's own (the fuzzer kills QEMU anyway); everything else
            // stops QEMU with a report. UBSan keeps going, its reports are caught in stderr.
            .env(
                "ASAN_OPTIONS",
                "detect_leaks=0:abort_on_error=0:print_summary=1",
            )
            .env("UBSAN_OPTIONS", "print_stacktrace=1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;

        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().ok_or(ErrorKind::BrokenPipe)?;
        let sink = Arc::clone(&stderr);
        let stderr_thread = std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let mut s = sink.lock().unwrap_or_else(|e| e.into_inner());
                // Keep the first 4 MiB: a report comes early, and then QEMU stops.
                if s.len() < 4 << 20 {
                    s.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }
        });

        listener.set_nonblocking(true)?;
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        let stream = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if let Some(status) = child.try_wait()? {
                        let _ = stderr_thread.join();
                        let err = stderr.lock().unwrap_or_else(|e| e.into_inner()).clone();
                        return Err(std::io::Error::other(format!(
                            "QEMU exited ({status}) before connecting to qtest:\n{err}"
                        )));
                    }
                    if Instant::now() > deadline {
                        let _ = child.kill();
                        return Err(std::io::Error::other("QEMU did not connect to qtest"));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(e),
            }
        };
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(COMMAND_TIMEOUT))?;
        let writer = stream.try_clone()?;
        Ok(Qemu {
            child,
            reader: BufReader::new(stream),
            writer,
            stderr,
            stderr_thread: Some(stderr_thread),
            chardevs,
            commands: 0,
            verbose: std::env::var_os("VVU_FUZZ_VERBOSE").is_some(),
        })
    }

    /// QEMU's stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Why QEMU is gone or hung, with its report if it wrote one. Waits briefly for a
    /// dying QEMU to finish writing.
    fn failure(&mut self, hang: Option<String>) -> Failure {
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if hang.is_none() && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => break None,
            }
        };
        if status.is_some() {
            if let Some(t) = self.stderr_thread.take() {
                let _ = t.join();
            }
        }
        let stderr = self.stderr();
        if let Some(report) = sanitizer_report(&stderr) {
            return Failure::Sanitizer(report);
        }
        let tail: String = {
            let lines: Vec<&str> = stderr.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        };
        match (hang, status) {
            (Some(what), None) => Failure::Hang(format!("{what}\n{tail}")),
            (_, status) => Failure::Died(format!(
                "QEMU exited: {}\n{tail}",
                status.map_or("still running".into(), |s| s.to_string())
            )),
        }
    }

    /// Sends one qtest command and returns what follows `OK` in its answer.
    pub fn cmd(&mut self, line: &str) -> Result<String, Failure> {
        self.commands += 1;
        if let Err(e) = writeln!(self.writer, "{line}") {
            let _ = e;
            return Err(self.failure(None));
        }
        loop {
            let mut answer = String::new();
            match self.reader.read_line(&mut answer) {
                Ok(0) => return Err(self.failure(None)),
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err(self.failure(Some(format!(
                        "no answer to {line:?} in {COMMAND_TIMEOUT:?}"
                    ))));
                }
                Err(_) => return Err(self.failure(None)),
            }
            let answer = answer.trim_end();
            if answer.starts_with("IRQ") {
                continue; // asynchronous; never requested, but harmless
            }
            if self.verbose {
                eprintln!("{line} -> {answer}");
            }
            if let Some(rest) = answer.strip_prefix("OK") {
                return Ok(rest.trim().to_string());
            }
            // FAIL: the fuzzer sent something qtest cannot parse, a fuzzer bug.
            panic!("qtest refused {line:?}: {answer}");
        }
    }

    /// Checks that QEMU answers and wrote no report.
    pub fn check(&mut self) -> Result<(), Failure> {
        self.cmd("endianness")?;
        match sanitizer_report(&self.stderr()) {
            Some(report) => Err(Failure::Sanitizer(report)),
            None => Ok(()),
        }
    }

    /// Stops QEMU as a host would (SIGTERM: QEMU shuts down and exits, which runs its exit
    /// path under the sanitizers too), or kills it after 10 s; returns any report.
    pub fn stop(mut self) -> Option<Failure> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(t) = self.stderr_thread.take() {
            let _ = t.join();
        }
        sanitizer_report(&self.stderr()).map(Failure::Sanitizer)
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Parses a qtest value (`0x...` or decimal).
pub fn value(s: &str) -> u64 {
    let s = s.trim();
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).unwrap_or(0),
        None => s.parse().unwrap_or(0),
    }
}

/// Parses the hex data of a qtest `read` answer into `len` bytes (zero-filled).
pub fn bytes(s: &str, len: usize) -> Vec<u8> {
    let h = s.trim().trim_start_matches("0x");
    let mut out: Vec<u8> = (0..h.len() / 2)
        .filter_map(|i| u8::from_str_radix(&h[2 * i..2 * i + 2], 16).ok())
        .collect();
    out.resize(len, 0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_is_found_from_the_start_of_its_line_and_the_warning_is_not_one() {
        let clean = "==1==WARNING: ASan doesn't fully support makecontext/swapcontext\n\
                     qemu-system-x86_64: warning: virtio-vhost-user: refused request 99\n";
        assert_eq!(sanitizer_report(clean), None);
        let asan = format!("{clean}=================\n==1==ERROR: AddressSanitizer: heap-use-after-free\n    #0 0x1 in vvu_read ../hw/virtio/virtio-vhost-user.c:10\n");
        let report = sanitizer_report(&asan).unwrap();
        assert!(
            report.starts_with("==1==ERROR: AddressSanitizer"),
            "{report}"
        );
        let f = Failure::Sanitizer(report);
        assert_eq!(
            f.signature(),
            "vvu_read ../hw/virtio/virtio-vhost-user.c:10"
        );
        let ubsan = "../hw/virtio/virtio-vhost-user.c:5:3: runtime error: shift exponent 64\n";
        assert!(sanitizer_report(ubsan).is_some());
    }

    #[test]
    fn qtest_values_and_data_parse() {
        assert_eq!(value("0x106b1af4"), 0x106b_1af4);
        assert_eq!(value("12"), 12);
        assert_eq!(bytes("0x0102ff", 4), vec![1, 2, 0xff, 0]);
    }
}
