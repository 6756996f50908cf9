//! The daemon's metrics endpoint from a test: its address (from the daemon's log), HTTP
//! GETs, the samples of a scrape, and `promtool` (bookworm's `prometheus` package, unpacked
//! by `tests/scripts/install-deps.sh`).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::daemon::Appliance;

/// Where `install-deps.sh` unpacks the `prometheus` package.
pub const PROMETHEUS_CACHE: &str = "/var/cache/vhost-appliance";

/// The address the daemon's metrics endpoint listens on, from its log line
/// `metrics endpoint listening addr=…` (the config may ask for port 0).
pub fn endpoint(appliance: &Appliance) -> SocketAddr {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = appliance.process.log();
        let found = log
            .lines()
            .filter(|l| l.contains("metrics endpoint listening"))
            .find_map(|l| {
                l.split("addr=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            });
        if let Some(addr) = found {
            return addr;
        }
        assert!(
            Instant::now() < deadline,
            "the daemon did not start its metrics endpoint:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `GET path` (HTTP/1.1, `Connection: close`); returns the status line, the headers and
/// the body.
pub fn get(addr: SocketAddr, path: &str) -> (String, String, String) {
    let mut s = TcpStream::connect(addr).expect("connect to the metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: */*\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).expect("read the response");
    let (head, body) = reply.split_once("\r\n\r\n").expect("a header block");
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_string(), headers.to_string(), body.to_string())
}

/// `GET /metrics`, checked to be a 200 in the Prometheus text format.
pub fn scrape(addr: SocketAddr) -> Scrape {
    let (status, headers, body) = get(addr, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK", "{headers}\n{body}");
    assert!(
        headers.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8"),
        "{headers}"
    );
    Scrape::parse(&body)
}

/// One sample: metric name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed scrape.
#[derive(Debug, Clone)]
pub struct Scrape {
    /// The exposition as served.
    pub text: String,
    pub samples: Vec<Sample>,
}

impl Scrape {
    /// Parses the Prometheus text format (as the daemon writes it: no timestamps).
    pub fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| parse_sample(l).unwrap_or_else(|| panic!("unparsable sample line: {l}")))
            .collect();
        Scrape {
            text: text.to_string(),
            samples,
        }
    }

    /// Names of every sample (histograms as their `_bucket`, `_sum`, `_count` series).
    pub fn names(&self) -> BTreeSet<String> {
        self.samples.iter().map(|s| s.name.clone()).collect()
    }

    /// Samples of `name` whose labels include `labels`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The one sample of `name` with exactly `labels`; panics if there is none.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no sample {name}{labels:?} in:\n{}", self.text))
    }

    /// The one sample of `name` with exactly `labels`, if present.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = self
            .matching(name, labels)
            .filter(|s| s.labels.len() == labels.len());
        let first = found.next().map(|s| s.value);
        assert!(found.next().is_none(), "{name}{labels:?} is not unique");
        first
    }

    /// Sum of the samples of `name` whose labels include `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }
}

fn parse_sample(line: &str) -> Option<Sample> {
    let (series, value) = line.rsplit_once(' ')?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    let (name, labels) = match series.split_once('{') {
        None => (series, BTreeMap::new()),
        Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}')?)?),
    };
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// `k="v",k2="v2"` with `\\`, `\"` and `\n` escapes in values.
fn parse_labels(mut s: &str) -> Option<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    while !s.is_empty() {
        let (key, rest) = s.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        labels.insert(key.to_string(), value);
        s = rest[end + 1..]
            .strip_prefix(',')
            .unwrap_or(&rest[end + 1..]);
    }
    Some(labels)
}

/// The `promtool` binary: `$PROMTOOL`, else the newest one `install-deps.sh` unpacked,
/// else one on `PATH`. Panics (never skips) with how to get it when there is none.
pub fn promtool() -> PathBuf {
    if let Some(p) = std::env::var_os("PROMTOOL") {
        return PathBuf::from(p);
    }
    let cached = std::fs::read_dir(PROMETHEUS_CACHE)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("prometheus-"))
        .map(|e| e.path().join("usr/bin/promtool"))
        .filter(|p| p.exists())
        .max();
    if let Some(p) = cached {
        return p;
    }
    if Command::new("promtool")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        return PathBuf::from("promtool");
    }
    panic!(
        "promtool not found: run `bash tests/scripts/install-deps.sh` (as root; it unpacks \
         bookworm's prometheus package into {PROMETHEUS_CACHE}/prometheus-VERSION), or set \
         PROMTOOL=/path/to/promtool"
    );
}

/// Runs `promtool ARGS` with `stdin`; returns (exit code, stdout + stderr).
pub fn run_promtool(args: &[&str], stdin: &str) -> (i32, String) {
    let mut child = Command::new(promtool())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .expect("promtool stdin")
        .write_all(stdin.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// `promtool check metrics` on `text`: must exit 0 with no findings.
pub fn check_metrics(text: &str) {
    let (code, out) = run_promtool(&["check", "metrics"], text);
    assert_eq!(code, 0, "promtool check metrics failed:\n{out}");
    assert!(
        out.trim().is_empty(),
        "promtool check metrics findings:\n{out}"
    );
}

/// `promtool check rules FILE`: must exit 0.
pub fn check_rules(file: &Path) {
    let (code, out) = run_promtool(&["check", "rules", &file.display().to_string()], "");
    assert_eq!(code, 0, "promtool check rules {}:\n{out}", file.display());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_samples_with_labels_and_escapes() {
        let s = Scrape::parse(
            "# HELP a_total x\n# TYPE a_total counter\na_total{x=\"1\",y=\"q\\\"\\\\z\"} 3\nb 2.5\nc_bucket{le=\"+Inf\"} 7\n",
        );
        assert_eq!(s.value("a_total", &[("x", "1"), ("y", "q\"\\z")]), 3.0);
        assert_eq!(s.value("b", &[]), 2.5);
        assert_eq!(s.value("c_bucket", &[("le", "+Inf")]), 7.0);
        assert_eq!(s.sum("a_total", &[]), 3.0);
    }
}
