//! The command channel of the project's guest images: their `/init` reads one shell command
//! line at a time from the first serial port and prints `@@DONE@@ <status>` after each
//! (image-builder/consumer/init). [`Console`] drives it over the unix socket QEMU serves the
//! serial port on, whoever started QEMU: a test ([`crate::vm::Vm`]) or libvirt.

use std::io::{BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Printed by the guest's init when it takes commands.
const READY: &str = "@@READY@@";
/// Printed by the guest's init after each command, with its exit status.
const DONE: &str = "@@DONE@@ ";

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
    /// A log appended to failure messages (QEMU's own).
    qemu_log: PathBuf,
}

impl Console {
    /// Connects to the serial socket at `path`; `qemu_log` is the file shown with failures.
    pub fn connect(path: &Path, qemu_log: &Path) -> Result<Console, String> {
        let serial =
            UnixStream::connect(path).map_err(|e| format!("serial {}: {e}", path.display()))?;
        Ok(Console {
            serial: BufReader::new(serial),
            transcript: String::new(),
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
        // short enough for the tty's line buffer.
        let encoded = base64_lite::encode(script.as_bytes());
        self.send_line("rm -f /tmp/cmd.b64");
        for chunk in encoded.as_bytes().chunks(512) {
            let chunk = std::str::from_utf8(chunk).expect("base64 is ascii");
            self.send_line(&format!("echo {chunk} >> /tmp/cmd.b64"));
        }
        let start = self.transcript.len();
        self.write_line("base64 -d /tmp/cmd.b64 > /tmp/cmd.sh && sh /tmp/cmd.sh");
        let marker = self.read_until(|l| l.starts_with(DONE), timeout);
        let output = self.transcript[start..].to_string();
        match marker {
            Some(line) => GuestOutput {
                status: line[DONE.len()..].trim().parse().unwrap_or(-1),
                output: output
                    .lines()
                    .filter(|l| !l.starts_with(DONE))
                    .collect::<Vec<_>>()
                    .join("\n"),
            },
            None => panic!(
                "guest command timed out after {timeout:?}:\n{script}\n--- output ---\n{output}\n--- qemu ---\n{}",
                self.qemu_log()
            ),
        }
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

    /// Sends one command line and waits for its completion marker (helper commands).
    fn send_line(&mut self, line: &str) {
        self.write_line(line);
        let ok = self.read_until(|l| l.starts_with(DONE), Duration::from_secs(30));
        assert!(
            ok.is_some(),
            "guest stopped answering on the serial console"
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
