//! The trace format: one action per line, so a failing run can be replayed and minimized.
//!
//! ```text
//! # params max-vhost-queues=4 queue-size=16 shm-size=1073741824 accel=qtest devices=1
//! outl 0xcf8 0x80002004          a qtest command, sent to QEMU as is
//! fe connect                     the fake front-end connects to the device's chardev
//! fe send 01000000010000000000000000 eventfd#3   a message (hex) and the fds sent with it
//! fe signal 3                    write 1 to eventfd #3 (a kick)
//! fe poke 5 0x1000 deadbeef      write bytes into memfd #5 at an offset
//! fe backend 02000000050000000800000000000000    send on the backend channel
//! fe backend-close | fe close | fe settle
//! fe device 1                    later fe lines are for device 1's front-end
//! fe expect-signal 3             eventfd #3 must have been signalled (clears it)
//! fe expect-memfd 5 0x1000 deadbeef   memfd #5 must hold these bytes there
//! fe expect-read 0xdeadbeef readl 0xe0000000   this qtest read must return this value
//! ```
//!
//! The `expect` lines are the oracles' checks, so a trace of an oracle failure replays it.
//! `fe oracle` marks where an oracle starts setting up what it checks; minimizing an oracle
//! failure keeps everything from the last mark on.
//!
//! Each fd a message carries is created by the replayer as its spec says (`memfd:SIZE`,
//! `eventfd`, `socketpair`, `devnull`, `pipe`) and named `#id`, so removing lines while
//! minimizing does not renumber the others. Lines starting with `#` are comments.

use std::fmt;

/// The device properties of one QEMU instance (the trace's `# params` line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceParams {
    /// `max-vhost-queues`: N (doorbells 0..2N, notification select 0..N).
    pub max_vhost_queues: u32,
    /// `queue-size` of rxq and txq.
    pub queue_size: u32,
    /// `shm-size` in bytes: the shared-memory BAR.
    pub shm_size: u64,
    /// Devices in the machine (each with its own chardev and front-end; `fe device K`
    /// picks the one later `fe` lines use).
    pub devices: u32,
    /// Run under KVM (`-accel kvm -S`: no vCPU runs, but memory listeners, ioeventfds and
    /// MSI routes are KVM's, as in the appliance) instead of `-accel qtest`.
    pub kvm: bool,
    /// `x-recv-delay-ms`: milliseconds the device holds each read from its socket that
    /// carried fds before handling them (0: off; only regression tests set it).
    pub recv_delay_ms: u32,
    /// `x-keep-msgfd-flags`: false restores the device's behaviour before issue #18's fix
    /// (received fds blocking until the device handles them; only regression tests clear it).
    pub keep_msgfd_flags: bool,
}

impl Default for DeviceParams {
    fn default() -> Self {
        DeviceParams {
            max_vhost_queues: 4,
            queue_size: 16,
            shm_size: 1 << 30,
            kvm: false,
            devices: 1,
            recv_delay_ms: 0,
            keep_msgfd_flags: true,
        }
    }
}

impl DeviceParams {
    /// The `# params` line.
    pub fn header(&self) -> String {
        let mut line = format!(
            "# params max-vhost-queues={} queue-size={} shm-size={} accel={} devices={}",
            self.max_vhost_queues,
            self.queue_size,
            self.shm_size,
            if self.kvm { "kvm" } else { "qtest" },
            self.devices
        );
        if self.recv_delay_ms != 0 {
            line.push_str(&format!(" recv-delay-ms={}", self.recv_delay_ms));
        }
        if !self.keep_msgfd_flags {
            line.push_str(" keep-msgfd-flags=off");
        }
        line
    }

    /// Parses a `# params` line; None if `line` is not one.
    pub fn parse(line: &str) -> Option<DeviceParams> {
        let rest = line.strip_prefix("# params ")?;
        let mut p = DeviceParams::default();
        for kv in rest.split_whitespace() {
            let (k, v) = kv.split_once('=')?;
            match k {
                "max-vhost-queues" => p.max_vhost_queues = v.parse().ok()?,
                "queue-size" => p.queue_size = v.parse().ok()?,
                "shm-size" => p.shm_size = v.parse().ok()?,
                "accel" => p.kvm = v == "kvm",
                "devices" => p.devices = v.parse().ok()?,
                "recv-delay-ms" => p.recv_delay_ms = v.parse().ok()?,
                "keep-msgfd-flags" => {
                    p.keep_msgfd_flags = match v {
                        "on" => true,
                        "off" => false,
                        _ => return None,
                    }
                }
                _ => return None,
            }
        }
        Some(p)
    }
}

/// What kind of file descriptor the front-end creates and sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdKind {
    /// A memfd of this many bytes (sparse: costs nothing until written).
    Memfd(u64),
    /// A non-blocking eventfd.
    Eventfd,
    /// One end of a socketpair; the front-end keeps the other as its backend channel.
    Socketpair,
    /// `/dev/null` (a character device: not mappable as memory in a useful way).
    DevNull,
    /// The read end of a pipe.
    Pipe,
}

/// A file descriptor a message carries, with the id later lines name it by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdSpec {
    /// What to create.
    pub kind: FdKind,
    /// Its name in the trace.
    pub id: u32,
}

impl fmt::Display for FdSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            FdKind::Memfd(size) => write!(f, "memfd:{size}#{}", self.id),
            FdKind::Eventfd => write!(f, "eventfd#{}", self.id),
            FdKind::Socketpair => write!(f, "socketpair#{}", self.id),
            FdKind::DevNull => write!(f, "devnull#{}", self.id),
            FdKind::Pipe => write!(f, "pipe#{}", self.id),
        }
    }
}

impl FdSpec {
    fn parse(s: &str) -> Option<FdSpec> {
        let (kind, id) = s.split_once('#')?;
        let id = id.parse().ok()?;
        let kind = match kind {
            "eventfd" => FdKind::Eventfd,
            "socketpair" => FdKind::Socketpair,
            "devnull" => FdKind::DevNull,
            "pipe" => FdKind::Pipe,
            m => FdKind::Memfd(m.strip_prefix("memfd:")?.parse().ok()?),
        };
        Some(FdSpec { kind, id })
    }
}

/// One step of a trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// A qtest command line.
    Qtest(String),
    /// The front-end connects (closing any previous connection first).
    Connect,
    /// The front-end closes its connection (and its backend channel).
    Close,
    /// A message (header and payload as sent, possibly malformed) with file descriptors.
    Send {
        /// Bytes written to the socket.
        bytes: Vec<u8>,
        /// File descriptors attached to the first byte.
        fds: Vec<FdSpec>,
    },
    /// Write 1 to eventfd `id` (a kick).
    Signal(u32),
    /// Write bytes into memfd `id` at an offset.
    Poke {
        /// Which memfd.
        id: u32,
        /// Byte offset in the file.
        offset: u64,
        /// What to write.
        data: Vec<u8>,
    },
    /// Send bytes on the backend channel (the front-end's end of the last socketpair).
    Backend(Vec<u8>),
    /// Close the backend channel.
    BackendClose,
    /// Let QEMU's main loop process what the front-end sent (qtest round trips).
    Settle,
    /// Later front-end actions are for device `k`'s front-end.
    Device(u32),
    /// Where an oracle starts (no effect).
    OracleStart,
    /// Check: eventfd `id` was signalled since it was last read (reading clears it).
    ExpectSignal(u32),
    /// Check: memfd `id` holds `data` at `offset`.
    ExpectMemfd {
        /// Which memfd.
        id: u32,
        /// Byte offset in the file.
        offset: u64,
        /// What it must hold.
        data: Vec<u8>,
    },
    /// Check: the qtest read command `read` answers `value`.
    ExpectRead {
        /// The value it must return.
        value: u64,
        /// A qtest read command (readb/w/l/q).
        read: String,
    },
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() & 1 == 1 {
        return None;
    }
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok())
        .collect()
}

fn parse_u64(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Qtest(line) => f.write_str(line),
            Action::Connect => f.write_str("fe connect"),
            Action::Close => f.write_str("fe close"),
            Action::Send { bytes, fds } => {
                // An empty message is written as "-" so the line keeps its shape.
                let body = if bytes.is_empty() {
                    "-".into()
                } else {
                    hex(bytes)
                };
                write!(f, "fe send {body}")?;
                for fd in fds {
                    write!(f, " {fd}")?;
                }
                Ok(())
            }
            Action::Signal(id) => write!(f, "fe signal {id}"),
            Action::Poke { id, offset, data } => {
                write!(f, "fe poke {id} {offset:#x} {}", hex(data))
            }
            Action::Backend(bytes) => write!(f, "fe backend {}", hex(bytes)),
            Action::BackendClose => f.write_str("fe backend-close"),
            Action::Settle => f.write_str("fe settle"),
            Action::Device(k) => write!(f, "fe device {k}"),
            Action::OracleStart => f.write_str("fe oracle"),
            Action::ExpectSignal(id) => write!(f, "fe expect-signal {id}"),
            Action::ExpectMemfd { id, offset, data } => {
                write!(f, "fe expect-memfd {id} {offset:#x} {}", hex(data))
            }
            Action::ExpectRead { value, read } => write!(f, "fe expect-read {value:#x} {read}"),
        }
    }
}

impl Action {
    /// Parses one trace line; None for comments, blank lines and lines it cannot read.
    pub fn parse(line: &str) -> Option<Action> {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            return None;
        }
        let Some(rest) = line.strip_prefix("fe ") else {
            return Some(Action::Qtest(line.to_string()));
        };
        let mut words = rest.split_whitespace();
        let action = match words.next()? {
            "connect" => Action::Connect,
            "close" => Action::Close,
            "settle" => Action::Settle,
            "oracle" => Action::OracleStart,
            "backend-close" => Action::BackendClose,
            "send" => {
                let body = words.next()?;
                let bytes = if body == "-" {
                    Vec::new()
                } else {
                    unhex(body)?
                };
                let fds = words.map(FdSpec::parse).collect::<Option<Vec<_>>>()?;
                Action::Send { bytes, fds }
            }
            "signal" => Action::Signal(words.next()?.parse().ok()?),
            "device" => Action::Device(words.next()?.parse().ok()?),
            "poke" => Action::Poke {
                id: words.next()?.parse().ok()?,
                offset: parse_u64(words.next()?)?,
                data: unhex(words.next()?)?,
            },
            "backend" => Action::Backend(unhex(words.next()?)?),
            "expect-signal" => Action::ExpectSignal(words.next()?.parse().ok()?),
            "expect-memfd" => Action::ExpectMemfd {
                id: words.next()?.parse().ok()?,
                offset: parse_u64(words.next()?)?,
                data: unhex(words.next()?)?,
            },
            "expect-read" => Action::ExpectRead {
                value: parse_u64(words.next()?)?,
                read: words.collect::<Vec<_>>().join(" "),
            },
            _ => return None,
        };
        Some(action)
    }
}

/// A trace: the device it ran against and its actions.
#[derive(Debug, Clone, Default)]
pub struct Trace {
    /// The QEMU instance's device properties.
    pub params: DeviceParams,
    /// Comment lines kept at the top (what failed, the seed).
    pub notes: Vec<String>,
    /// The actions, in order.
    pub actions: Vec<Action>,
}

impl Trace {
    /// Parses a trace file; lines it cannot read are an error (with their number).
    pub fn parse(text: &str) -> Result<Trace, String> {
        let mut trace = Trace::default();
        for (n, line) in text.lines().enumerate() {
            if let Some(params) = DeviceParams::parse(line) {
                trace.params = params;
            } else if line.trim().is_empty() {
                continue;
            } else if line.starts_with('#') {
                trace.notes.push(line.to_string());
            } else {
                let action = Action::parse(line)
                    .ok_or_else(|| format!("line {}: cannot parse {line:?}", n + 1))?;
                trace.actions.push(action);
            }
        }
        Ok(trace)
    }
}

impl fmt::Display for Trace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for note in &self.notes {
            writeln!(f, "{note}")?;
        }
        writeln!(f, "{}", self.params.header())?;
        for action in &self.actions {
            writeln!(f, "{action}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_action_survives_a_round_trip_through_its_line() {
        let actions = vec![
            Action::Qtest("writel 0xe0000000 0x1".into()),
            Action::Connect,
            Action::Close,
            Action::Send {
                bytes: vec![1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0],
                fds: vec![
                    FdSpec {
                        kind: FdKind::Memfd(4096),
                        id: 3,
                    },
                    FdSpec {
                        kind: FdKind::Eventfd,
                        id: 4,
                    },
                    FdSpec {
                        kind: FdKind::Socketpair,
                        id: 5,
                    },
                    FdSpec {
                        kind: FdKind::DevNull,
                        id: 6,
                    },
                    FdSpec {
                        kind: FdKind::Pipe,
                        id: 7,
                    },
                ],
            },
            Action::Send {
                bytes: vec![],
                fds: vec![],
            },
            Action::Signal(4),
            Action::Poke {
                id: 3,
                offset: 0x1000,
                data: vec![0xde, 0xad],
            },
            Action::Backend(vec![2, 0, 0, 0]),
            Action::BackendClose,
            Action::Settle,
            Action::Device(1),
            Action::OracleStart,
            Action::ExpectSignal(4),
            Action::ExpectMemfd {
                id: 3,
                offset: 8,
                data: vec![1, 2],
            },
            Action::ExpectRead {
                value: 0x1234,
                read: "readq 0x100000000".into(),
            },
        ];
        let trace = Trace {
            params: DeviceParams {
                max_vhost_queues: 7,
                queue_size: 2,
                shm_size: 1 << 21,
                kvm: true,
                devices: 2,
                recv_delay_ms: 40,
                keep_msgfd_flags: false,
            },
            notes: vec!["# a note".into()],
            actions,
        };
        let parsed = Trace::parse(&trace.to_string()).unwrap();
        assert_eq!(parsed.params, trace.params);
        assert_eq!(parsed.notes, trace.notes);
        assert_eq!(parsed.actions, trace.actions);
    }

    #[test]
    fn a_line_it_cannot_read_is_an_error_with_its_number() {
        let err = Trace::parse("# params queue-size=4\nfe send zz\n").unwrap_err();
        assert!(err.starts_with("line 2:"), "{err}");
    }
}
