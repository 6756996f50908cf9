//! The metrics endpoint: a minimal HTTP/1.x responder on one thread, built on
//! `std::net::TcpListener`.
//!
//! - `GET /metrics` (and `HEAD`): [`Metrics::encode`], Prometheus text format 0.0.4;
//! - `GET /healthz` (and `HEAD`): `ok` — the process is alive and its HTTP thread answers;
//! - any other path: 404; any other method: 405; a request that is not HTTP: 400; a
//!   request head over [`MAX_REQUEST`] bytes: 431.
//!
//! Each connection is answered on a thread of its own (at most [`MAX_CONNECTIONS`] at once)
//! with `Connection: close`; the request body (there should be none) is never read. Reading
//! a request may take [`IO_TIMEOUT`] in all and each write as long, so a client that stalls
//! or trickles bytes holds only its own connection, never a scrape or a liveness probe.
//!
//! Why not a crate: the HTTP server crates that need no async runtime are `tiny_http`
//! (no release since 2022, an acceptor plus a worker pool) and `astra` (hyper and mio under
//! a thread pool); hyper and axum need an executor. Two GET routes do not justify any of
//! them, and the parser below (request line and header end only) is small enough to test
//! exhaustively.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::metrics::{Metrics, CONTENT_TYPE};

/// Largest request head read (request line and headers).
pub const MAX_REQUEST: usize = 8 << 10;
/// Read and write timeout of a connection.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds `addr` and serves the endpoint from a new thread until the process exits.
/// Returns the bound address (the port, when `addr` asked for port 0).
pub fn serve(addr: SocketAddr, metrics: Metrics) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || accept_loop(&listener, &metrics))?;
    Ok(bound)
}

/// Connections answered at once; more are closed unanswered. Each holds its thread for at
/// most [`IO_TIMEOUT`] reading and as long per write, so idle or trickling clients cannot
/// delay a scrape or a liveness probe unless they keep this many connections open.
pub const MAX_CONNECTIONS: usize = 64;

/// Counts a connection being answered for as long as it lives.
struct Active(Arc<AtomicUsize>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn accept_loop(listener: &TcpListener, metrics: &Metrics) {
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
                    active.fetch_sub(1, Ordering::AcqRel);
                    tracing::debug!(%peer, "metrics endpoint busy: connection closed");
                    continue;
                }
                let guard = Active(Arc::clone(&active));
                let metrics = metrics.clone();
                let spawned = std::thread::Builder::new()
                    .name("metrics-conn".into())
                    .spawn(move || {
                        let _guard = guard;
                        if let Err(e) = handle(stream, &metrics) {
                            tracing::debug!(%peer, "metrics request failed: {e}");
                        }
                    });
                if let Err(e) = spawned {
                    tracing::warn!("metrics endpoint: cannot start a connection thread: {e}");
                }
            }
            Err(e) => {
                tracing::warn!("metrics endpoint: accept failed: {e}");
                // Out of fds, most likely: do not spin.
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Metrics,
    Health,
}

/// An HTTP response: status line, content type, body.
#[derive(Debug, PartialEq, Eq)]
struct Response {
    status: &'static str,
    content_type: &'static str,
    body: String,
    /// HEAD: headers only.
    head_only: bool,
    allow: bool,
}

impl Response {
    fn text(status: &'static str, body: &str) -> Self {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: format!("{body}\n"),
            head_only: false,
            allow: false,
        }
    }
}

/// Parses a request head (everything before the blank line) into a route, or the error
/// response to give.
fn parse(head: &[u8]) -> Result<(Route, bool), Response> {
    let bad = || Response::text("400 Bad Request", "bad request");
    let line_end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
    let line = std::str::from_utf8(&head[..line_end]).map_err(|_| bad())?;
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    if !version.starts_with("HTTP/1.") || target.is_empty() {
        return Err(bad());
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => {
            return Err(Response {
                allow: true,
                ..Response::text("405 Method Not Allowed", "only GET and HEAD")
            })
        }
    };
    let path = target.split(['?', '#']).next().unwrap_or(target);
    let route = match path {
        "/metrics" => Route::Metrics,
        "/healthz" => Route::Health,
        _ => return Err(Response::text("404 Not Found", "not found: try /metrics")),
    };
    Ok((route, head_only))
}

/// A stream whose reads can be given a timeout.
trait TimedRead: Read {
    fn set_timeout(&mut self, timeout: Duration) -> io::Result<()>;
}

impl TimedRead for TcpStream {
    fn set_timeout(&mut self, timeout: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(timeout))
    }
}

impl TimedRead for &[u8] {
    fn set_timeout(&mut self, _: Duration) -> io::Result<()> {
        Ok(())
    }
}

/// Reads the request head: up to the blank line, at most [`MAX_REQUEST`] bytes, within
/// [`IO_TIMEOUT`] in all (a client trickling bytes does not hold the endpoint longer).
fn read_head(stream: &mut impl TimedRead) -> Result<Vec<u8>, Response> {
    let deadline = Instant::now() + IO_TIMEOUT;
    let timeout = || Response::text("408 Request Timeout", "timeout");
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    loop {
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            return Ok(head);
        }
        if head.len() >= MAX_REQUEST {
            return Err(Response::text(
                "431 Request Header Fields Too Large",
                "request too large",
            ));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_timeout(left).is_err() {
            return Err(timeout());
        }
        let want = buf.len().min(MAX_REQUEST - head.len());
        match stream.read(&mut buf[..want]) {
            Ok(0) => {
                // The peer closed early; answer what arrived if it is a whole request line.
                return if head.contains(&b'\n') {
                    Ok(head)
                } else {
                    Err(Response::text("400 Bad Request", "incomplete request"))
                };
            }
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Err(timeout()),
        }
    }
}

fn respond(head: Result<Vec<u8>, Response>, metrics: &Metrics) -> Response {
    let (route, head_only) = match head.and_then(|h| parse(&h)) {
        Ok(r) => r,
        Err(response) => return response,
    };
    let mut response = match route {
        Route::Health => Response::text("200 OK", "ok"),
        Route::Metrics => match metrics.encode() {
            Ok(body) => Response {
                status: "200 OK",
                content_type: CONTENT_TYPE,
                body,
                head_only: false,
                allow: false,
            },
            Err(_) => Response::text("500 Internal Server Error", "encoding failed"),
        },
    };
    response.head_only = head_only;
    response
}

fn handle(mut stream: TcpStream, metrics: &Metrics) -> io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let response = respond(read_head(&mut stream), metrics);
    let mut out = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        response.status,
        response.content_type,
        response.body.len()
    );
    if response.allow {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str("\r\n");
    stream.write_all(out.as_bytes())?;
    if !response.head_only {
        stream.write_all(response.body.as_bytes())?;
    }
    stream.flush()?;
    // Let the client see the whole response before the close (no RST for unread input).
    let _ = stream.shutdown(std::net::Shutdown::Write);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(head: &[u8]) -> &'static str {
        match parse(head) {
            Ok(_) => "ok",
            Err(r) => r.status,
        }
    }

    #[test]
    fn routes_and_methods() {
        assert_eq!(
            parse(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Ok((Route::Metrics, false))
        );
        assert_eq!(
            parse(b"HEAD /healthz HTTP/1.0\r\n\r\n"),
            Ok((Route::Health, true))
        );
        assert_eq!(
            parse(b"GET /metrics?name[]=x HTTP/1.1\r\n\r\n"),
            Ok((Route::Metrics, false))
        );
        assert_eq!(
            status(b"POST /metrics HTTP/1.1\r\n\r\n"),
            "405 Method Not Allowed"
        );
        assert_eq!(status(b"GET / HTTP/1.1\r\n\r\n"), "404 Not Found");
        assert_eq!(status(b"GET /metrics/ HTTP/1.1\r\n\r\n"), "404 Not Found");
    }

    #[test]
    fn garbage_is_a_bad_request() {
        for head in [
            &b""[..],
            b"\r\n\r\n",
            b"GET\r\n\r\n",
            b"GET /metrics\r\n\r\n",
            b"GET /metrics HTTP/2\r\n\r\n",
            b"GET  /metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics HTTP/1.1 extra\r\n\r\n",
            b"\xff\xfe /metrics HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(status(head), "400 Bad Request", "{head:?}");
        }
    }

    #[test]
    fn request_heads_are_capped() {
        let mut big = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        big.resize(3 * MAX_REQUEST, b'a');
        let r = read_head(&mut &big[..]).err().map(|r| r.status);
        assert_eq!(r, Some("431 Request Header Fields Too Large"));
        let r = read_head(&mut &b"GET /metrics HTTP/1.1\r\n\r\nbody"[..]);
        assert!(r.is_ok());
        let r = read_head(&mut &b"GET /met"[..]).err().map(|r| r.status);
        assert_eq!(r, Some("400 Bad Request"));
    }

    #[test]
    fn serves_metrics_and_health_over_tcp() {
        let metrics = Metrics::new();
        let addr = serve("127.0.0.1:0".parse().unwrap(), metrics).unwrap();
        let get = |request: &str| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(request.as_bytes()).unwrap();
            let mut reply = String::new();
            s.read_to_string(&mut reply).unwrap();
            reply
        };
        let r = get("GET /healthz HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.contains("Connection: close\r\n"));
        assert!(r.ends_with("\r\n\r\nok\n"), "{r}");
        let r = get("GET /metrics HTTP/1.1\r\n\r\n");
        assert!(r.contains("Content-Type: text/plain; version=0.0.4"), "{r}");
        assert!(r.contains("\nvhost_appliance_build_info{"), "{r}");
        assert!(r.contains("\nprocess_open_fds "), "{r}");
        let r = get("HEAD /metrics HTTP/1.1\r\n\r\n");
        assert!(r.ends_with("\r\n\r\n"), "{r}");
        let r = get("DELETE /metrics HTTP/1.1\r\n\r\n");
        assert!(r.contains("405") && r.contains("Allow: GET, HEAD"), "{r}");
    }
}
