//! `vvu_bridge`: the VVU bridge (`vvu_transport::bridge`) and the driver under it fed by a
//! hostile frontend and a misbehaving device: vhost-user messages of any shape arriving on
//! rxq (used lengths that lie, memory regions overlapping or outside the shared-memory BAR,
//! vring indices past the device's queues, requests whose descriptors the device cannot
//! carry), bogus used-ring entries, FRONTEND_UP flapping, DEVICE_NEEDS_RESET, and a backend
//! that answers, sends requests on its backend channel or hangs up. The device is the fake
//! of the driver's unit tests (feature `fake-device`); the backend's end of each session is
//! read here, and every memory area it is handed must lie inside the BAR (the bridge's
//! promise, checked as an oracle: a violation aborts like a crash).
//!
//! Input: MSI-X vectors (u8: 1 + b % 12), vhost queues (u8: b % 9), then up to
//! [`MAX_STEPS`] steps, op (u8) % 8:
//!
//! | op | step |
//! | --- | --- |
//! | 0 | FRONTEND_UP set (u8 bit 0) or cleared |
//! | 1 | a message on rxq: blob (at most 4 KiB), used length (u8: 0 the message's, else a u32 follows) |
//! | 2 | a write of the device into a used ring: u8 (bit 0 rxq/txq), u8 offset, blob |
//! | 3 | a used element naming descriptor u32 on rxq |
//! | 4 | DEVICE_NEEDS_RESET |
//! | 5 | the backend sends a message on its session stream (u8 bit 0: on its backend channel): request (u32), flags (u32), payload (blob) |
//! | 6 | the backend hangs up its session stream |
//! | 7 | the device takes what is on txq |
//!
//! After each step the bridge handles what is ready (`Bridge::poll`, no wait) and the device
//! takes everything on txq. A device failure (which `vvu_transport::bridge::serve` answers
//! by bringing the device up again) ends the input.

use std::cell::RefCell;
use std::io::{self, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::rc::Rc;

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;
use vvu_transport::bridge::Bridge;
use vvu_transport::driver::{VvuDriver, BUFFER_SIZE, HEADER_SIZE};
use vvu_transport::fake::{FakeVvu, SHM_FILE_OFFSET, SHM_SIZE};
use vvu_transport::pci::PciTransport;

use crate::input::{Input, Output};
use crate::ring::harness_failure;

/// Most steps per input.
pub const MAX_STEPS: usize = 32;
/// rxq/txq size the driver sets up.
const QUEUE_SIZE: u16 = 16;

/// The backend's end of one session: what it has read so far, and its backend channel.
struct BackendEnd {
    stream: UnixStream,
    pending: Vec<u8>,
    channel: Option<UnixStream>,
}

fn le32(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 4).map_or(0, |s| {
        u64::from(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    })
}

fn le64(b: &[u8], at: usize) -> u64 {
    le32(b, at) | le32(b, at + 4) << 32
}

/// The oracle: an area of `size` bytes at `offset` of the BAR file lies inside the BAR.
fn check_area(request: u64, size: u64, offset: u64) {
    let inside = offset >= SHM_FILE_OFFSET
        && offset
            .checked_add(size)
            .is_some_and(|end| end <= SHM_FILE_OFFSET + SHM_SIZE);
    if !inside {
        eprintln!(
            "vvu_bridge oracle: request {request} handed the backend {size:#x} bytes at file offset {offset:#x}, outside the BAR ({SHM_FILE_OFFSET:#x}..{:#x})",
            SHM_FILE_OFFSET + SHM_SIZE
        );
        std::process::abort();
    }
}

/// Checks one complete message the backend received.
fn check_message(msg: &[u8]) {
    let request = le32(msg, 0);
    let p = HEADER_SIZE;
    match request {
        // SET_MEM_TABLE: count, padding, regions (gpa, size, user address, mmap offset).
        5 => {
            for i in 0..le32(msg, p).min(8) as usize {
                let at = p + 8 + 32 * i;
                check_area(request, le64(msg, at + 8), le64(msg, at + 24));
            }
        }
        // ADD_MEM_REG / REM_MEM_REG: padding, one region.
        37 | 38 => check_area(request, le64(msg, p + 8 + 8), le64(msg, p + 8 + 24)),
        // SET_INFLIGHT_FD: mmap size, mmap offset.
        32 => check_area(request, le64(msg, p), le64(msg, p + 8)),
        _ => {}
    }
}

impl BackendEnd {
    /// Reads what the bridge forwarded, checks every complete message, and keeps a backend
    /// channel it was handed (a unix stream socket among the descriptors).
    fn read(&mut self) {
        loop {
            let mut buf = vec![0u8; 2 * BUFFER_SIZE];
            let mut fds = [-1; 32];
            let mut iov = [libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            }];
            // SAFETY: the iovec points at `buf`, alive and unaliased for the call.
            let Ok((len, nfds)) = (unsafe { self.stream.recv_with_fds(&mut iov, &mut fds) }) else {
                return;
            };
            for &fd in &fds[..nfds] {
                // SAFETY: the kernel installed these descriptors for this process just now.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                let stream = UnixStream::from(fd);
                if stream.peer_addr().is_ok() {
                    let _ = stream.set_nonblocking(true);
                    self.channel = Some(stream);
                }
            }
            if len == 0 {
                return;
            }
            self.pending.extend_from_slice(&buf[..len]);
            while self.pending.len() >= HEADER_SIZE {
                let size = le32(&self.pending, 8) as usize;
                if self.pending.len() < HEADER_SIZE + size {
                    break;
                }
                let msg: Vec<u8> = self.pending.drain(..HEADER_SIZE + size).collect();
                check_message(&msg);
            }
        }
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let vectors = 1 + u16::from(input.u8() % 12);
    let queues = u32::from(input.u8() % 9);
    let Ok(driver) = VvuDriver::new(FakeVvu::new(vectors, queues), QUEUE_SIZE, GuestAddress(0))
    else {
        return;
    };
    let ends: Rc<RefCell<Vec<BackendEnd>>> = Rc::default();
    let connect = {
        let ends = Rc::clone(&ends);
        move || -> io::Result<UnixStream> {
            let (bridge_end, backend_end) = UnixStream::pair()?;
            backend_end.set_nonblocking(true)?;
            ends.borrow_mut().push(BackendEnd {
                stream: backend_end,
                pending: Vec::new(),
                channel: None,
            });
            Ok(bridge_end)
        }
    };
    let Ok(mut bridge) = Bridge::new(driver, connect) else {
        return;
    };
    if bridge.driver().set_backend_up(true).is_err() {
        return;
    }
    let stop = EventFd::new(EFD_NONBLOCK).unwrap_or_else(|e| harness_failure("eventfd", e));
    for _ in 0..MAX_STEPS {
        if input.is_empty() {
            break;
        }
        let fake = bridge.driver().pci();
        match input.u8() % 8 {
            0 => fake.frontend(input.u8() & 1 != 0),
            1 => {
                let msg = input.blob();
                let msg = &msg[..msg.len().min(BUFFER_SIZE)];
                let used_len = match input.u8() {
                    0 => msg.len() as u32,
                    _ => input.u32(),
                };
                fake.push_rx_raw(msg, used_len);
            }
            2 => {
                let queue = usize::from(input.u8() & 1);
                let offset = u64::from(input.u8());
                let bytes = input.blob();
                let at = fake.used_ring(queue).0 + offset;
                // Within the ring (4 + 8 * size + 2 bytes): the device's own part.
                let room = (6 + 8 * u64::from(QUEUE_SIZE)).saturating_sub(offset) as usize;
                let _ = fake
                    .dma_memory()
                    .write_slice(&bytes[..bytes.len().min(room)], GuestAddress(at));
            }
            3 => fake.push_bogus_rx_used(input.u32()),
            4 => fake.needs_reset(),
            5 => {
                let on_channel = input.u8() & 1 != 0;
                let (request, flags) = (input.u32(), input.u32());
                // Whole messages: the backend is the daemon's own, which writes no torn
                // message (the bridge would wait for its end).
                let bytes = message(request, flags, input.blob());
                if let Some(end) = ends.borrow_mut().last_mut() {
                    let stream = if on_channel {
                        end.channel.as_mut()
                    } else {
                        Some(&mut end.stream)
                    };
                    if let Some(s) = stream {
                        let _ = s.write_all(&bytes);
                    }
                }
            }
            6 => {
                if let Some(end) = ends.borrow_mut().last_mut() {
                    let _ = end.stream.shutdown(std::net::Shutdown::Both);
                }
            }
            _ => {}
        }
        if bridge.poll(&stop, 0).is_err() {
            break;
        }
        while bridge.driver().pci().pop_tx().is_some() {}
        for end in ends.borrow_mut().iter_mut() {
            end.read();
        }
    }
}

/// A vhost-user message: request, flags, size, payload.
fn message(request: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = request.to_le_bytes().to_vec();
    m.extend_from_slice(&flags.to_le_bytes());
    m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    m.extend_from_slice(payload);
    m
}

/// A memory region description: guest address, size, user address, offset in the BAR.
fn region(gpa: u64, size: u64, offset: u64) -> Vec<u8> {
    [gpa, size, 0x7f00_0000_0000 + gpa, offset]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

/// The seeds: a frontend session as QEMU runs it (memory table, regions added and removed,
/// kicks, calls, errs, the backend channel with a request on it and its reply, the
/// inflight area, replies from the backend, the frontend leaving), and the protocol errors
/// the bridge must turn into a dropped frontend.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    use vhost::vhost_user::message::FrontendReq as R;
    let v1 = 1u32;
    let rx = |out: &mut Output, request: R, flags: u32, payload: &[u8]| {
        out.u8(1)
            .blob(&message(request as u32, flags, payload))
            .u8(0);
    };
    let mut table = 2u64.to_le_bytes().to_vec();
    table.extend(region(0, 1 << 20, 0));
    table.extend(region(1 << 32, 4 << 20, 2 << 20));
    let mut add = vec![0u8; 8];
    add.extend(region(1 << 33, 2 << 20, 8 << 20));
    let mut inflight = 4224u64.to_le_bytes().to_vec();
    inflight.extend_from_slice(&(4u64 << 20).to_le_bytes());
    inflight.extend_from_slice(&[2, 0, 128, 0, 0, 0, 0, 0]);
    let mut session = Output::new();
    session.u8(6).u8(4);
    session.u8(0).u8(1);
    rx(&mut session, R::GET_FEATURES, v1, &[]);
    rx(&mut session, R::SET_MEM_TABLE, v1 | 8, &table);
    rx(&mut session, R::ADD_MEM_REG, v1, &add);
    rx(&mut session, R::REM_MEM_REG, v1, &add);
    for request in [R::SET_VRING_KICK, R::SET_VRING_CALL, R::SET_VRING_ERR] {
        rx(&mut session, request, v1, &0u64.to_le_bytes());
        rx(&mut session, request, v1, &0x101u64.to_le_bytes());
    }
    rx(&mut session, R::SET_BACKEND_REQ_FD, v1 | 8, &[]);
    rx(&mut session, R::SET_INFLIGHT_FD, v1, &inflight);
    rx(&mut session, R::GET_INFLIGHT_FD, v1, &[0; 24]);
    // The backend's reply, a CONFIG_CHANGE_MSG on its channel, the frontend's reply to it.
    session
        .u8(5)
        .u8(0)
        .u32(R::GET_FEATURES as u32)
        .u32(v1 | 4)
        .blob(&(1u64 << 32).to_le_bytes());
    session.u8(5).u8(1).u32(2).u32(v1 | 8).blob(&[]);
    rx(&mut session, R::GET_FEATURES, v1 | 4, &0u64.to_le_bytes());
    session.u8(7);
    session.u8(0).u8(0);
    session.u8(0).u8(1);
    rx(&mut session, R::GET_QUEUE_NUM, v1, &[]);
    let mut seeds = vec![("session".to_string(), session.finish())];

    let mut outside = region(0, 1 << 20, SHM_SIZE - 4096);
    outside.splice(0..0, 1u64.to_le_bytes());
    let errors: [(&str, R, Vec<u8>); 5] = [
        ("region-outside-bar", R::SET_MEM_TABLE, outside),
        (
            "mem-table-short",
            R::SET_MEM_TABLE,
            3u64.to_le_bytes().to_vec(),
        ),
        (
            "vring-out-of-range",
            R::SET_VRING_CALL,
            200u64.to_le_bytes().to_vec(),
        ),
        ("log-fd-not-carried", R::SET_LOG_FD, vec![]),
        ("inflight-short", R::SET_INFLIGHT_FD, vec![0; 8]),
    ];
    for (name, request, payload) in errors {
        let mut out = Output::new();
        out.u8(6).u8(4).u8(0).u8(1);
        rx(&mut out, request, v1, &payload);
        rx(&mut out, R::GET_FEATURES, v1, &[]);
        seeds.push((name.to_string(), out.finish()));
    }
    // A device that lies: a used length past the buffer, a descriptor never posted, a
    // used ring index far ahead, then DEVICE_NEEDS_RESET.
    let mut out = Output::new();
    out.u8(6).u8(4).u8(0).u8(1);
    out.u8(1)
        .blob(&message(R::GET_FEATURES as u32, v1, &[]))
        .u8(1)
        .u32(1 << 20);
    out.u8(3).u32(77);
    out.u8(2).u8(0).u8(2).blob(&0x4000u16.to_le_bytes());
    out.u8(4);
    seeds.push(("device-lies".to_string(), out.finish()));
    seeds
}
