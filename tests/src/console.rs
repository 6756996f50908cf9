//! The command channel of the project's guest images: their `/init` reads one shell command
//! line at a time from the first serial port and prints `@@DONE@@ <status>` after each
//! (image-builder/consumer/init). [`Console`] drives it over the unix socket QEMU serves the
//! serial port on, whoever started QEMU: a test ([`crate::vm::Vm`]) or libvirt. Every line it
//! sends is tagged and acknowledged, so output is never attributed to the wrong command, and a
//! script runs only once the guest holds it byte for byte.

use std::io::{BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Printed by the guest's init when it takes commands.
const READY: &str = "@@READY@@";
/// Printed by the guest's init after each command, with its exit status.
const DONE: &str = "@@DONE@@ ";
/// Echoed by a helper line of [`Console::run`] once it succeeded, with the line's tag.
const ACK: &str = "@@ACK@@ ";
/// Echoed before a [`Console::run`] script starts, with its tag: its output follows.
const BEGIN: &str = "@@BEGIN@@ ";
/// Echoed instead of [`BEGIN`] when the guest's copy of the script is not what was sent.
const GARBLED: &str = "@@GARBLED@@ ";

/// Connects to the unix socket at `path`, which QEMU has bound but may not be listening on
/// yet (the file appears at `bind`; a connect before `listen` is refused): refused
/// connections are retried for up to 10 s.
pub fn connect_listening(path: &Path) -> std::io::Result<UnixStream> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match UnixStream::connect(path) {
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            result => return result,
        }
    }
}

/// Output of one guest command.
#[derive(Debug, Clone)]
pub struct GuestOutput {
    /// Exit status in the guest.
    pub status: i32,
    /// Combined stdout and stderr (with any kernel messages printed meanwhile).
    pub output: String,
}

/// A guest's serial command channel, with everything read from it kept.
pub struct Console {
    serial: BufReader<UnixStream>,
    transcript: String,
    /// Tag of the last [`Console::run`] script (tags its lines).
    sequence: u64,
    /// How long a script's BEGIN may lag a `@@DONE@@` before the script is sent again.
    grace: Duration,
    /// A log appended to failure messages (QEMU's own).
    qemu_log: PathBuf,
}

impl Console {
    /// Connects to the serial socket at `path`; `qemu_log` is the file shown with failures.
    pub fn connect(path: &Path, qemu_log: &Path) -> Result<Console, String> {
        let serial =
            connect_listening(path).map_err(|e| format!("serial {}: {e}", path.display()))?;
        Ok(Console {
            serial: BufReader::new(serial),
            transcript: String::new(),
            sequence: 0,
            grace: Duration::from_secs(30),
            qemu_log: qemu_log.to_path_buf(),
        })
    }

    /// QEMU's log so far (empty if it cannot be read).
    pub fn qemu_log(&self) -> String {
        std::fs::read_to_string(&self.qemu_log).unwrap_or_default()
    }

    /// Everything read from the guest so far.
    pub fn transcript(&self) -> &str {
        &self.transcript
    }

    /// The last `chars` characters of the transcript.
    pub fn transcript_tail(&self, chars: usize) -> String {
        let tail: Vec<char> = self.transcript.chars().rev().take(chars).collect();
        tail.into_iter().rev().collect()
    }

    /// Waits until the guest's init takes commands; false on timeout or EOF.
    pub fn wait_ready(&mut self, timeout: Duration) -> bool {
        self.read_until(|line| line.contains(READY), timeout)
            .is_some()
    }

    /// Reads serial lines until `done` matches one; returns it, or `None` on timeout/EOF.
    pub fn read_until(
        &mut self,
        mut done: impl FnMut(&str) -> bool,
        timeout: Duration,
    ) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut line = String::new();
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            self.serial
                .get_ref()
                .set_read_timeout(Some(left.max(Duration::from_millis(10))))
                .ok()?;
            let mut byte = [0u8; 1];
            match self.serial.read(&mut byte) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(_) => return None,
            }
            let c = byte[0] as char;
            self.transcript.push(c);
            if c == '\n' {
                let complete = line.trim_end_matches('\r').to_string();
                line.clear();
                if done(&complete) {
                    return Some(complete);
                }
            } else {
                line.push(c);
            }
        }
    }

    /// Runs a shell script in the guest and returns its status and output.
    pub fn run(&mut self, script: &str, timeout: Duration) -> GuestOutput {
        // One line per command on the serial line: ship the script base64-encoded in chunks
        // short enough for the tty's line buffer. Every line carries a tag the guest echoes
        // back, so a `@@DONE@@` that belongs to another line is never taken for this one's,
        // and the script is run only once the guest holds exactly what was sent.
        let encoded = base64_lite::encode(script.as_bytes());
        for attempt in 1..=3 {
            self.sequence += 1;
            let tag = self.sequence;
            self.send_line("rm -f /tmp/cmd.b64", &format!("{ACK}{tag}.0"));
            for (i, chunk) in encoded.as_bytes().chunks(512).enumerate() {
                let chunk = std::str::from_utf8(chunk).expect("base64 is ascii");
                let ack = format!("{ACK}{tag}.{}", i + 1);
                self.send_line(&format!("echo {chunk} >> /tmp/cmd.b64"), &ack);
            }
            self.write_line(&format!(
                "if base64 -d /tmp/cmd.b64 > /tmp/cmd.sh && [ $(wc -c < /tmp/cmd.sh) -eq {} ]; \
                 then echo {BEGIN}{tag}; sh /tmp/cmd.sh; else echo {GARBLED}{tag}; false; fi",
                script.len()
            ));
            let begin = format!("{BEGIN}{tag}");
            let garbled = format!("{GARBLED}{tag}");
            // Normally BEGIN (or GARBLED) comes at once. A `@@DONE@@` first is either a stale
            // one or this line's, failed before the `if` ran (the line itself arrived garbled):
            // wait a little longer for BEGIN, then send the script again.
            let mut saw_done = false;
            let first = loop {
                let wait = if saw_done { self.grace } else { timeout };
                match self.read_until(|l| l == begin || l == garbled || l.starts_with(DONE), wait) {
                    Some(l) if l.starts_with(DONE) => saw_done = true,
                    Some(l) => break Some(l),
                    None if !saw_done => self.timed_out(script, timeout, ""),
                    None => break None,
                }
            };
            if first.as_deref() != Some(begin.as_str()) {
                if first.is_some() {
                    self.read_until(|l| l.starts_with(DONE), Duration::from_secs(30));
                }
                eprintln!(
                    "console: the guest did not run script {tag} as sent (attempt {attempt}), \
                     sending it again; serial so far:\n{}",
                    self.transcript_tail(2000)
                );
                continue;
            }
            let start = self.transcript.len();
            let marker = self.read_until(|l| l.starts_with(DONE), timeout);
            let output = self.transcript[start..].to_string();
            let Some(line) = marker else {
                self.timed_out(script, timeout, &output);
            };
            return GuestOutput {
                status: line[DONE.len()..].trim().parse().unwrap_or(-1),
                output: output
                    .lines()
                    .filter(|l| !l.starts_with(DONE))
                    .collect::<Vec<_>>()
                    .join("\n"),
            };
        }
        panic!(
            "the guest never got this script whole:\n{script}\n--- serial ---\n{}",
            self.transcript_tail(4000)
        );
    }

    fn timed_out(&self, script: &str, timeout: Duration, output: &str) -> ! {
        panic!(
            "guest command timed out after {timeout:?}:\n{script}\n--- output ---\n{output}\n--- serial ---\n{}\n--- qemu ---\n{}",
            self.transcript_tail(2000),
            self.qemu_log()
        )
    }

    /// Runs `script` and fails the test with its output unless it exits 0.
    pub fn run_ok(&mut self, script: &str, timeout: Duration) -> String {
        let out = self.run(script, timeout);
        assert_eq!(
            out.status, 0,
            "guest script failed:\n{script}\n--- output ---\n{}",
            out.output
        );
        out.output
    }

    /// Writes one line to the guest without waiting for anything.
    pub fn write_line(&mut self, line: &str) {
        let stream = self.serial.get_mut();
        stream.write_all(line.as_bytes()).expect("serial write");
        stream.write_all(b"\n").expect("serial write");
    }

    /// Sends one helper command with `&& echo <ack>` appended and waits for that
    /// acknowledgement and the `@@DONE@@` after it; a `@@DONE@@` seen before the
    /// acknowledgement belongs to an earlier line and is skipped (and reported).
    fn send_line(&mut self, command: &str, ack: &str) {
        self.write_line(&format!("{command} && echo {ack}"));
        let mut stale = 0;
        let found = self.read_until(
            |l| {
                if l.starts_with(DONE) {
                    stale += 1;
                }
                l == ack
            },
            Duration::from_secs(30),
        );
        if stale > 0 {
            eprintln!(
                "console: skipped {stale} stale {DONE}line(s) before {ack}; serial so far:\n{}",
                self.transcript_tail(2000)
            );
        }
        let done =
            found.and_then(|_| self.read_until(|l| l.starts_with(DONE), Duration::from_secs(30)));
        assert!(
            done.is_some(),
            "guest stopped answering on the serial console (no {ack}):\n{}",
            self.transcript_tail(2000)
        );
    }

    /// Waits until a virtio-blk disk with `serial` appears; returns its device name (`vdb`).
    pub fn wait_for_blk(&mut self, serial: &str, timeout: Duration) -> String {
        let script = format!(
            "i=0; while [ $i -lt {} ]; do for d in /sys/block/vd*; do \
             if [ \"$(cat $d/serial 2>/dev/null)\" = \"{serial}\" ]; then basename $d; exit 0; fi; done; \
             sleep 0.2; i=$((i+1)); done; exit 1",
            timeout.as_millis() / 200
        );
        let out = self.run(&script, timeout + Duration::from_secs(30));
        assert_eq!(
            out.status, 0,
            "disk with serial {serial} did not appear:\n{}",
            out.output
        );
        out.output
            .lines()
            .last()
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    /// Waits until no virtio-blk disk has `serial`.
    pub fn wait_for_blk_gone(&mut self, serial: &str, timeout: Duration) {
        let script = format!(
            "i=0; while [ $i -lt {} ]; do found=0; for d in /sys/block/vd*; do \
             [ \"$(cat $d/serial 2>/dev/null)\" = \"{serial}\" ] && found=1; done; \
             [ $found = 0 ] && exit 0; sleep 0.2; i=$((i+1)); done; exit 1",
            timeout.as_millis() / 200
        );
        let out = self.run(&script, timeout + Duration::from_secs(30));
        assert_eq!(
            out.status, 0,
            "disk with serial {serial} did not go away:\n{}",
            out.output
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::process::{Command, Stdio};

    /// Runs `input` through the host's `base64 -d`.
    fn decode(input: &str) -> String {
        let mut child = Command::new("base64")
            .arg("-d")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap()
    }

    fn between<'a>(line: &'a str, from: &str, to: &str) -> &'a str {
        let rest = &line[line.find(from).unwrap() + from.len()..];
        &rest[..rest.find(to).unwrap()]
    }

    /// A stand-in for the guest's init loop (the real one is tested by every guest test):
    /// it prints a stale `@@DONE@@` before its first answer, loses the first chunk of the
    /// first script it is sent, and fails the next script line as a shell would one that
    /// arrived garbled.
    fn fake_guest(stream: UnixStream) {
        let mut out = stream.try_clone().unwrap();
        let mut b64 = String::new();
        let mut stale_sent = false;
        let mut lost_one = false;
        let mut scripts = 0;
        for line in std::io::BufReader::new(stream).lines() {
            let line = line.unwrap();
            let mut reply = String::new();
            if !stale_sent {
                reply.push_str("@@DONE@@ 0\n");
                stale_sent = true;
            }
            if let Some((command, ack)) = line.rsplit_once(" && echo ") {
                if command == "rm -f /tmp/cmd.b64" {
                    b64.clear();
                } else if !lost_one {
                    lost_one = true;
                } else {
                    b64.push_str(between(command, "echo ", " >>"));
                    b64.push('\n');
                }
                reply.push_str(&format!("{ack}\n@@DONE@@ 0\n"));
                out.write_all(reply.as_bytes()).unwrap();
                continue;
            }
            scripts += 1;
            let script = decode(&b64);
            let len: usize = between(&line, "-eq ", " ]").parse().unwrap();
            if scripts == 2 {
                reply.push_str("sh: syntax error: unexpected \"then\"\n@@DONE@@ 2\n");
            } else if script.len() == len {
                let ran = Command::new("sh").arg("-c").arg(&script).output().unwrap();
                reply.push_str(&format!(
                    "{}\r\n{}@@DONE@@ {}\n",
                    between(&line, "then echo ", ";"),
                    String::from_utf8_lossy(&ran.stdout),
                    ran.status.code().unwrap()
                ));
            } else {
                reply.push_str(&format!(
                    "{}\n@@DONE@@ 1\n",
                    between(&line, "else echo ", ";")
                ));
            }
            out.write_all(reply.as_bytes()).unwrap();
        }
    }

    #[test]
    fn stale_markers_are_skipped_and_garbled_scripts_sent_again() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let guest = std::thread::spawn(move || fake_guest(theirs));
        let mut console = Console {
            serial: BufReader::new(ours),
            transcript: String::new(),
            sequence: 0,
            grace: Duration::from_millis(500),
            qemu_log: PathBuf::from("/nonexistent"),
        };
        let out = console.run("echo first; exit 3", Duration::from_secs(30));
        assert_eq!((out.status, out.output.as_str()), (3, "first"));
        // Longer than one chunk, so it is sent in several lines.
        let long = format!("echo {}", "x".repeat(1500));
        let out = console.run(&long, Duration::from_secs(30));
        assert_eq!((out.status, out.output.len()), (0, 1500));
        assert!(console.transcript().contains("@@GARBLED@@ 1"));
        assert!(console.transcript().contains("@@BEGIN@@ 3"));
        drop(console);
        guest.join().unwrap();
    }
}

/// Minimal standard base64 encoding (the guest decodes with busybox `base64 -d`).
mod base64_lite {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub fn encode(data: &[u8]) -> String {
        let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
        for chunk in data.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn known_vectors() {
            assert_eq!(super::encode(b""), "");
            assert_eq!(super::encode(b"f"), "Zg==");
            assert_eq!(super::encode(b"fo"), "Zm8=");
            assert_eq!(super::encode(b"foo"), "Zm9v");
            assert_eq!(super::encode(b"foobar"), "Zm9vYmFy");
        }
    }
}
