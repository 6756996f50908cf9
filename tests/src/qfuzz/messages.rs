//! vhost-user messages (docs/interop/vhost-user.rst) as the fuzzer builds them: the
//! front-end's requests with their file descriptors, the guest's txq replies and backend
//! requests, and the front-end's replies on the backend channel; each valid most of the
//! time and mutated the rest (flags, size field, payload length, fd count and kind).

use crate::rng::Rng;

use super::trace::{FdKind, FdSpec};

/// Header flags: version 1, REPLY, NEED_REPLY.
pub const VERSION: u32 = 1;
/// The REPLY flag.
pub const REPLY: u32 = 1 << 2;
/// The NEED_REPLY flag.
pub const NEED_REPLY: u32 = 1 << 3;
/// Header size.
pub const HDR: usize = 12;

/// Front-end request codes (vhost-user spec "Front-end message types").
#[allow(missing_docs)]
pub mod req {
    pub const GET_FEATURES: u32 = 1;
    pub const SET_FEATURES: u32 = 2;
    pub const SET_OWNER: u32 = 3;
    pub const RESET_OWNER: u32 = 4;
    pub const SET_MEM_TABLE: u32 = 5;
    pub const SET_VRING_NUM: u32 = 8;
    pub const SET_VRING_ADDR: u32 = 9;
    pub const SET_VRING_BASE: u32 = 10;
    pub const GET_VRING_BASE: u32 = 11;
    pub const SET_VRING_KICK: u32 = 12;
    pub const SET_VRING_CALL: u32 = 13;
    pub const SET_VRING_ERR: u32 = 14;
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    pub const GET_QUEUE_NUM: u32 = 17;
    pub const SET_VRING_ENABLE: u32 = 18;
    pub const SET_BACKEND_REQ_FD: u32 = 21;
    pub const GET_CONFIG: u32 = 24;
    pub const SET_CONFIG: u32 = 25;
    pub const GET_INFLIGHT_FD: u32 = 31;
    pub const SET_INFLIGHT_FD: u32 = 32;
    pub const RESET_DEVICE: u32 = 34;
    pub const GET_MAX_MEM_SLOTS: u32 = 36;
    pub const ADD_MEM_REG: u32 = 37;
    pub const REM_MEM_REG: u32 = 38;
    pub const SET_STATUS: u32 = 39;
    pub const GET_STATUS: u32 = 40;
}

/// Header plus payload, with the size field telling the truth.
pub fn msg(request: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(HDR + payload.len());
    m.extend_from_slice(&request.to_le_bytes());
    m.extend_from_slice(&flags.to_le_bytes());
    m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    m.extend_from_slice(payload);
    m
}

/// The request, flags and size fields of a message (zeros where it is too short).
pub fn header(m: &[u8]) -> (u32, u32, u32) {
    let f = |at: usize| {
        m.get(at..at + 4)
            .map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    };
    (f(0), f(4), f(8))
}

/// A little-endian u64 at `at` (0 where `m` is too short).
pub fn le64(m: &[u8], at: usize) -> u64 {
    m.get(at..at + 8).map_or(0, |s| {
        let mut b = [0u8; 8];
        b.copy_from_slice(s);
        u64::from_le_bytes(b)
    })
}

fn pick<T: Copy>(rng: &mut Rng, options: &[T]) -> T {
    options[rng.below(options.len() as u64) as usize]
}

fn chance(rng: &mut Rng, percent: u64) -> bool {
    rng.below(100) < percent
}

/// An "interesting" u64: boundaries more often than uniform noise.
pub fn interesting(rng: &mut Rng) -> u64 {
    match rng.below(8) {
        0 => 0,
        1 => u64::MAX,
        2 => 1u64 << rng.below(64),
        3 => (1u64 << rng.below(64)).wrapping_sub(1),
        4 => rng.below(0x100),
        5 => 0x8000_0000_0000_0000 | rng.below(0x1000),
        _ => rng.next_u64(),
    }
}

/// What the front-end's generator needs to know and remember.
#[derive(Debug, Default)]
pub struct FrontendCtx {
    /// The next fd id (ids are unique per QEMU instance).
    pub next_fd: u32,
    /// max-vhost-queues of the device.
    pub max_vhost_queues: u32,
    /// shm-size of the device.
    pub shm_size: u64,
    /// Regions added this session (guest_phys_addr, memory_size), for REM_MEM_REG.
    pub regions: Vec<(u64, u64)>,
}

impl FrontendCtx {
    fn fd(&mut self, kind: FdKind) -> FdSpec {
        self.next_fd += 1;
        FdSpec {
            kind,
            id: self.next_fd,
        }
    }

    /// A vring index: usually valid, sometimes at or past max-vhost-queues.
    fn vring(&self, rng: &mut Rng) -> u64 {
        match rng.below(10) {
            0 => u64::from(self.max_vhost_queues),
            1 => rng.below(256),
            2 => interesting(rng),
            _ => rng.below(u64::from(self.max_vhost_queues.max(1))),
        }
    }

    /// A memory region description (guest_phys_addr, memory_size, userspace_addr,
    /// mmap_offset) and the memfd it comes with.
    fn region(&mut self, rng: &mut Rng) -> ([u8; 32], FdSpec) {
        let shm = self.shm_size;
        let size = match rng.below(12) {
            0 => 0x20_0000,
            1 => 0x20_1000,
            2 => 0x4000,
            3 => shm,
            4 => shm + 0x1000,
            5 => 0,
            6 => interesting(rng),
            7 => 0x3b10,
            _ => (rng.below(64) + 1) * 0x1000,
        };
        let mmap_offset = match rng.below(8) {
            0 => 0x1000,
            1 => 0x20_0000,
            2 => rng.below(0x1000), // unaligned most of the time
            3 => interesting(rng),
            _ => 0,
        };
        let file = match rng.below(8) {
            0 => 0,
            1 => mmap_offset,
            2 => 0x3b10,
            3 => mmap_offset.saturating_add(size / 2),
            4 => rng.below(1 << 24),
            _ => mmap_offset.saturating_add(size),
        }
        .min(64 << 30);
        let gpa = match rng.below(4) {
            0 => interesting(rng),
            _ => rng.below(1 << 20) << 12,
        };
        let mut d = [0u8; 32];
        d[0..8].copy_from_slice(&gpa.to_le_bytes());
        d[8..16].copy_from_slice(&size.to_le_bytes());
        d[16..24].copy_from_slice(&(0x7f00_0000_0000u64.wrapping_add(gpa)).to_le_bytes());
        d[24..32].copy_from_slice(&mmap_offset.to_le_bytes());
        self.regions.push((gpa, size));
        let fd = self.fd(FdKind::Memfd(file));
        (d, fd)
    }

    /// A well-formed region of `size` bytes in a memfd of its size (for the oracles).
    pub fn plain_region(&mut self, gpa: u64, size: u64) -> ([u8; 32], FdSpec) {
        let mut d = [0u8; 32];
        d[0..8].copy_from_slice(&gpa.to_le_bytes());
        d[8..16].copy_from_slice(&size.to_le_bytes());
        d[16..24].copy_from_slice(&(0x7f00_0000_0000u64.wrapping_add(gpa)).to_le_bytes());
        self.regions.push((gpa, size));
        (d, self.fd(FdKind::Memfd(size)))
    }

    /// A fresh socketpair spec (the front-end keeps the other end as its backend channel).
    pub fn socketpair(&mut self) -> FdSpec {
        self.fd(FdKind::Socketpair)
    }

    /// REM_MEM_REG of a region this session added (or of one it did not).
    pub fn rem_region(&mut self, rng: &mut Rng) -> (Vec<u8>, Vec<FdSpec>) {
        let (gpa, size) = match self.regions.len() {
            0 => (interesting(rng), interesting(rng)),
            n => self.regions.swap_remove(rng.below(n as u64) as usize),
        };
        let mut p = vec![0u8; 40];
        p[8..16].copy_from_slice(&gpa.to_le_bytes());
        p[16..24].copy_from_slice(&size.to_le_bytes());
        (
            msg(req::REM_MEM_REG, VERSION, &p),
            vec![self.fd(FdKind::Memfd(0x1000))],
        )
    }

    /// A fresh eventfd spec.
    pub fn eventfd(&mut self) -> FdSpec {
        self.fd(FdKind::Eventfd)
    }

    /// A front-end request, valid or mutated, with its fds.
    pub fn message(&mut self, rng: &mut Rng) -> (Vec<u8>, Vec<FdSpec>) {
        use req::*;
        let flags = VERSION | if chance(rng, 30) { NEED_REPLY } else { 0 };
        let mut fds = Vec::new();
        let (request, payload): (u32, Vec<u8>) = match rng.below(24) {
            0 | 1 => {
                let n = match rng.below(8) {
                    0 => 0,
                    1 => 9,
                    _ => rng.below(4) + 1,
                };
                let mut p = Vec::new();
                p.extend_from_slice(&(n as u32).to_le_bytes());
                p.extend_from_slice(&0u32.to_le_bytes());
                for _ in 0..n.min(8) {
                    let (d, fd) = self.region(rng);
                    p.extend_from_slice(&d);
                    fds.push(fd);
                }
                (SET_MEM_TABLE, p)
            }
            2 | 3 => {
                let (d, fd) = self.region(rng);
                fds.push(fd);
                let mut p = vec![0u8; 8];
                p.extend_from_slice(&d);
                (ADD_MEM_REG, p)
            }
            4 => {
                let (m, f) = self.rem_region(rng);
                fds = f;
                (REM_MEM_REG, m[HDR..].to_vec())
            }
            5..=8 => {
                let request = pick(rng, &[SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR]);
                let mut v = self.vring(rng);
                if chance(rng, 15) {
                    v |= 1 << 8; // NOFD
                } else if chance(rng, 10) {
                    // Not an eventfd: KVM refuses those as ioeventfds.
                    let kind = pick(
                        rng,
                        &[
                            FdKind::Pipe,
                            FdKind::DevNull,
                            FdKind::Memfd(8),
                            FdKind::Socketpair,
                        ],
                    );
                    fds.push(self.fd(kind));
                } else {
                    fds.push(self.fd(FdKind::Eventfd));
                }
                (request, v.to_le_bytes().to_vec())
            }
            9 | 10 => {
                let request = pick(rng, &[SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ENABLE]);
                let mut p = (self.vring(rng) as u32).to_le_bytes().to_vec();
                p.extend_from_slice(&(rng.below(0x1_0000) as u32).to_le_bytes());
                (request, p)
            }
            11 => {
                let mut p = (self.vring(rng) as u32).to_le_bytes().to_vec();
                p.extend_from_slice(&0u32.to_le_bytes());
                for _ in 0..4 {
                    p.extend_from_slice(&interesting(rng).to_le_bytes());
                }
                (SET_VRING_ADDR, p)
            }
            12 => {
                let mut p = (self.vring(rng) as u32).to_le_bytes().to_vec();
                p.extend_from_slice(&0u32.to_le_bytes());
                (GET_VRING_BASE, p)
            }
            13 => (
                pick(
                    rng,
                    &[
                        GET_FEATURES,
                        GET_PROTOCOL_FEATURES,
                        GET_QUEUE_NUM,
                        GET_MAX_MEM_SLOTS,
                        GET_STATUS,
                        SET_OWNER,
                        RESET_OWNER,
                        RESET_DEVICE,
                    ],
                ),
                Vec::new(),
            ),
            14 | 15 => {
                let request = pick(rng, &[SET_FEATURES, SET_PROTOCOL_FEATURES, SET_STATUS]);
                (request, interesting(rng).to_le_bytes().to_vec())
            }
            16 => {
                fds.push(self.fd(FdKind::Socketpair));
                (SET_BACKEND_REQ_FD, Vec::new())
            }
            17 | 18 => {
                let size = pick(
                    rng,
                    &[0x1000, 0x2_0000, 0, u64::MAX, 64 << 20, (64 << 20) + 1],
                );
                let offset = pick(rng, &[0u64, 0x1000, 0x123, !0xfff]);
                let mut p = size.to_le_bytes().to_vec();
                p.extend_from_slice(&offset.to_le_bytes());
                p.extend_from_slice(&(rng.below(300) as u16).to_le_bytes());
                p.extend_from_slice(&(rng.below(2048) as u16).to_le_bytes());
                p.extend_from_slice(&[0u8; 12]);
                if rng.below(2) == 0 {
                    (GET_INFLIGHT_FD, p)
                } else {
                    let file = pick(rng, &[size.min(1 << 30), 0x1000, 0]).saturating_add(offset);
                    fds.push(self.fd(FdKind::Memfd(file.min(1 << 30))));
                    (SET_INFLIGHT_FD, p)
                }
            }
            19 => {
                let size = pick(rng, &[0u32, 4, 24, 256, 4096, u32::MAX]);
                let mut p = (rng.below(64) as u32).to_le_bytes().to_vec();
                p.extend_from_slice(&size.to_le_bytes());
                p.extend_from_slice(&0u32.to_le_bytes());
                p.resize(12 + (size as usize).min(256), 0xa5);
                (pick(rng, &[GET_CONFIG, SET_CONFIG]), p)
            }
            20 => {
                let request = pick(
                    rng,
                    &[0, 6, 7, 19, 20, 22, 23, 26, 33, 35, 41, 42, 99, u32::MAX],
                );
                let mut p = vec![0u8; rng.below(64) as usize];
                rng.fill(&mut p);
                (request, p)
            }
            _ => (
                pick(rng, &[GET_FEATURES, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM]),
                Vec::new(),
            ),
        };
        let mut m = msg(request, flags, &payload);
        if chance(rng, 15) {
            self.mutate(rng, &mut m, &mut fds);
        }
        (m, fds)
    }

    /// Breaks a message: flags, size field, length, or its fds.
    fn mutate(&mut self, rng: &mut Rng, m: &mut Vec<u8>, fds: &mut Vec<FdSpec>) {
        match rng.below(9) {
            0 => m[4..8].copy_from_slice(&(rng.next_u64() as u32).to_le_bytes()),
            8 => {
                // A short payload the size field agrees with.
                let keep = rng.below((m.len() - HDR) as u64 + 1) as usize;
                m.truncate(HDR + keep);
                m[8..12].copy_from_slice(&(keep as u32).to_le_bytes());
            }
            1 => {
                let any = rng.below(8192) as u32;
                let lie = pick(rng, &[0u32, 1, 4084, 4085, u32::MAX, any]);
                m[8..12].copy_from_slice(&lie.to_le_bytes());
            }
            2 => {
                let keep = rng.below(m.len() as u64) as usize;
                m.truncate(keep.max(1));
            }
            3 => {
                let mut extra = vec![0u8; rng.below(64) as usize + 1];
                rng.fill(&mut extra);
                m.extend_from_slice(&extra);
            }
            4 => fds.clear(),
            5 => {
                for _ in 0..rng.below(10) + 1 {
                    let kind = pick(
                        rng,
                        &[
                            FdKind::Eventfd,
                            FdKind::Memfd(0x1000),
                            FdKind::DevNull,
                            FdKind::Pipe,
                            FdKind::Socketpair,
                        ],
                    );
                    fds.push(self.fd(kind));
                }
            }
            6 => {
                // The right number of fds, of the wrong kind.
                for fd in fds.iter_mut() {
                    fd.kind = pick(
                        rng,
                        &[
                            FdKind::Eventfd,
                            FdKind::DevNull,
                            FdKind::Pipe,
                            FdKind::Socketpair,
                            FdKind::Memfd(0),
                        ],
                    );
                }
            }
            _ => {
                let at = rng.below(m.len() as u64) as usize;
                m[at] ^= 1 << rng.below(8);
            }
        }
    }
}

/// The guest's answer to front-end request `request` (REPLY set), usually well-formed.
pub fn guest_reply(rng: &mut Rng, request: u32) -> Vec<u8> {
    use req::*;
    let flags = VERSION | REPLY;
    let payload: Vec<u8> = match request {
        GET_VRING_BASE => {
            let mut p = (rng.below(8) as u32).to_le_bytes().to_vec();
            p.extend_from_slice(&(rng.below(0x1_0000) as u32).to_le_bytes());
            p
        }
        GET_CONFIG => {
            let size = rng.below(64) as u32;
            let mut p = 0u32.to_le_bytes().to_vec();
            p.extend_from_slice(&size.to_le_bytes());
            p.extend_from_slice(&0u32.to_le_bytes());
            p.resize(12 + size as usize, 0x5a);
            p
        }
        GET_INFLIGHT_FD => {
            let any = interesting(rng);
            let size = pick(
                rng,
                &[
                    0u64,
                    0x1000,
                    0x2_1000,
                    64 << 20,
                    (64 << 20) + 1,
                    u64::MAX,
                    any,
                ],
            );
            let mut p = size.to_le_bytes().to_vec();
            p.extend_from_slice(&interesting(rng).to_le_bytes());
            p.extend_from_slice(&[2, 0, 0x80, 0]);
            p.resize(if chance(rng, 10) { 20 } else { 32 }, 0);
            p
        }
        _ => interesting(rng).to_le_bytes().to_vec(),
    };
    let mut m = msg(request, flags, &payload);
    if chance(rng, 10) {
        m[8..12].copy_from_slice(&(rng.below(64) as u32).to_le_bytes());
    }
    m
}

/// Something else the guest puts on txq: a backend request (no REPLY flag) or noise.
pub fn guest_other(rng: &mut Rng) -> Vec<u8> {
    match rng.below(5) {
        0 | 1 => {
            // Backend requests (vhost-user "Back-end message types"): CONFIG_CHANGE_MSG,
            // VRING_HOST_NOTIFIER_MSG, SHARED_OBJECT_*, or anything.
            let any = rng.below(20) as u32;
            let request = pick(rng, &[2u32, 3, 6, 7, 8, any]);
            let flags = VERSION | if chance(rng, 50) { NEED_REPLY } else { 0 };
            let mut p = vec![0u8; pick(rng, &[0usize, 8, 24, 40, 4084])];
            rng.fill(&mut p);
            msg(request, flags, &p)
        }
        2 => {
            let mut p = vec![0u8; rng.below(5000) as usize];
            rng.fill(&mut p);
            p
        }
        3 => {
            // A header whose size field disagrees with the buffer.
            let mut m = msg(rng.below(50) as u32, VERSION | REPLY, &[0u8; 16]);
            m[8..12].copy_from_slice(&(interesting(rng) as u32).to_le_bytes());
            m
        }
        _ => {
            let mut m = msg(rng.below(50) as u32, rng.next_u64() as u32, &[0u8; 8]);
            m.truncate(rng.below(m.len() as u64 + 1) as usize);
            m
        }
    }
}

/// The front-end's reply on the backend channel, usually well-formed.
pub fn backend_reply(rng: &mut Rng) -> Vec<u8> {
    match rng.below(4) {
        0 => {
            let mut p = vec![0u8; rng.below(5000) as usize];
            rng.fill(&mut p);
            p
        }
        1 => msg(rng.below(10) as u32, VERSION, &[0u8; 8]), // no REPLY flag: not a reply
        _ => msg(2, VERSION | REPLY, &0u64.to_le_bytes()),
    }
}
