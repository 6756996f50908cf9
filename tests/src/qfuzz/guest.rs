//! The hostile driver: split virtqueues in guest RAM with descriptor chains of any shape,
//! the driver's bring-up (reset, features, queues, MSI-X, DRIVER_OK, BACKEND_UP) with steps
//! skipped or garbled, and random accesses to every register the device exposes.

use std::collections::HashMap;

use super::device::{
    common, status, Qt, BUF_BASE, BUF_END, INDIRECT_BASE, RAM_SIZE, RING_BASE, RING_STRIDE,
};
use super::fuzzer::Fuzzer;
use super::messages::{self, interesting};
use super::qtest::Failure;

/// VRING_DESC_F_NEXT, _WRITE, _INDIRECT.
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
/// Feature bits: VERSION_1 (32), INDIRECT_DESC (28), EVENT_IDX (29), ACCESS_PLATFORM (33).
const VERSION_1: u64 = 1 << 32;

/// One buffer of a chain.
#[derive(Debug, Clone, Copy)]
pub struct Seg {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

/// The driver's view of one split virtqueue.
#[derive(Debug, Clone, Default)]
pub struct Vq {
    /// Entries (0: not set up).
    pub size: u16,
    /// Descriptor table address.
    pub desc: u64,
    /// Available ring address.
    pub avail: u64,
    /// Used ring address.
    pub used: u64,
    /// Next avail idx to publish.
    pub avail_idx: u16,
    /// Used entries consumed so far.
    pub last_used: u16,
    /// Next descriptor slot to fill (round-robin).
    pub next_desc: u16,
    /// Posted chains by head index.
    pub chains: HashMap<u16, Vec<Seg>>,
}

impl Vq {
    /// The standard placement for ring `index` (2 * device + queue) with `size` entries.
    pub fn standard(index: u64, size: u16) -> Vq {
        let desc = RING_BASE + index * RING_STRIDE;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        Vq {
            size,
            desc,
            avail,
            used,
            ..Vq::default()
        }
    }
}

/// Addresses a hostile driver might hand the device instead of RAM.
fn weird_addr(f: &mut Fuzzer) -> u64 {
    let l = &f.layout;
    let options = [
        RAM_SIZE - 8,
        RAM_SIZE + 0x1000,
        0,
        u64::MAX - 0xf,
        0xffff_ffff_f000,
        l.common + common::STATUS,
        l.common,
        l.doorbells,
        l.notify,
        l.notification,
        l.msix_table,
        l.device_cfg,
        l.shm,
        l.shm + l.shm_len.saturating_sub(8),
        RING_BASE, // the rings themselves
    ];
    let i = f.rng.below(options.len() as u64 + 1) as usize;
    options
        .get(i)
        .copied()
        .unwrap_or_else(|| interesting(&mut f.rng))
}

impl Fuzzer {
    /// A buffer of `len` bytes in the buffer area.
    pub fn alloc(&mut self, len: u64) -> u64 {
        let len = (len.min(1 << 20) + 63) & !63;
        if self.buf_next + len > BUF_END {
            self.buf_next = BUF_BASE;
        }
        let addr = self.buf_next;
        self.buf_next += len.max(64);
        addr
    }

    /// Segments for an rx buffer: one 4 KiB buffer most of the time, else odd shapes.
    fn rx_segs(&mut self) -> Vec<Seg> {
        match self.rng.below(12) {
            0 => {
                let len = self.rng.below(100) as u32;
                vec![Seg {
                    addr: self.alloc(u64::from(len)),
                    len,
                    write: true,
                }]
            }
            1 => (0..self.rng.below(4) + 2)
                .map(|_| Seg {
                    addr: self.alloc(2048),
                    len: 1 + self.rng.below(2048) as u32,
                    write: true,
                })
                .collect(),
            2 => vec![Seg {
                addr: weird_addr(self),
                len: interesting(&mut self.rng) as u32,
                write: true,
            }],
            3 => vec![
                Seg {
                    addr: self.alloc(64),
                    len: 64,
                    write: false,
                },
                Seg {
                    addr: self.alloc(4096),
                    len: 4096,
                    write: true,
                },
            ],
            _ => vec![Seg {
                addr: self.alloc(4096),
                len: 4096,
                write: true,
            }],
        }
    }

    /// Writes the chain into queue `qi` and publishes it, now and then as an indirect
    /// table, a loop, or with a wild `next`; returns false if the queue is not set up.
    pub fn post(&mut self, qi: usize, segs: Vec<Seg>) -> Result<bool, Failure> {
        let shape = self.rng.below(20);
        self.post_shaped(qi, segs, shape)
    }

    /// Posts one plain 4 KiB device-writable buffer on rxq (the buffer a well-behaved driver
    /// gives the device for a message); false if rxq is not set up.
    pub fn post_rx_page(&mut self) -> Result<bool, Failure> {
        let segs = vec![Seg {
            addr: self.alloc(4096),
            len: 4096,
            write: true,
        }];
        self.post_plain(0, segs)
    }

    /// Like [`Fuzzer::post`], always as a plain chain (what a well-behaved driver posts).
    pub fn post_plain(&mut self, qi: usize, segs: Vec<Seg>) -> Result<bool, Failure> {
        self.post_shaped(qi, segs, u64::MAX)
    }

    fn post_shaped(&mut self, qi: usize, segs: Vec<Seg>, shape: u64) -> Result<bool, Failure> {
        let vq = &self.queues[qi];
        if vq.size == 0 || segs.is_empty() {
            return Ok(false);
        }
        let size = vq.size;
        let (desc, avail, head) = (vq.desc, vq.avail, vq.next_desc % size);
        if shape == 0 {
            // Indirect: one descriptor pointing at a table holding the chain.
            let table = INDIRECT_BASE + self.rng.below(0xc0) * 0x100;
            let n = segs.len().min(16);
            for (i, s) in segs.iter().take(n).enumerate() {
                let flags = if s.write { F_WRITE } else { 0 } | if i + 1 < n { F_NEXT } else { 0 };
                self.write_desc(table + 16 * i as u64, s.addr, s.len, flags, (i + 1) as u16)?;
            }
            let len = if self.rng.below(4) == 0 {
                interesting(&mut self.rng) as u32
            } else {
                16 * n as u32
            };
            self.write_desc(desc + 16 * u64::from(head), table, len, F_INDIRECT, 0)?;
            self.queues[qi].next_desc = head.wrapping_add(1) % size;
        } else {
            let n = segs.len() as u16;
            for (i, s) in segs.iter().enumerate() {
                let idx = (head + i as u16) % size;
                let last = i as u16 + 1 == n;
                let mut next = (idx + 1) % size;
                let mut flags = if s.write { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
                if last && shape == 1 {
                    flags |= F_NEXT;
                    next = head; // a loop
                } else if shape == 2 {
                    next = self.rng.below(u64::from(size) + 2) as u16;
                }
                self.write_desc(desc + 16 * u64::from(idx), s.addr, s.len, flags, next)?;
            }
            self.queues[qi].next_desc = (head + n) % size;
        }
        let vq = &mut self.queues[qi];
        let slot = avail + 4 + 2 * u64::from(vq.avail_idx % size);
        vq.avail_idx = vq.avail_idx.wrapping_add(1);
        let idx = vq.avail_idx;
        vq.chains.insert(head, segs);
        self.write(slot, 2, u64::from(head))?;
        self.write(avail + 2, 2, u64::from(idx))?;
        Ok(true)
    }

    fn write_desc(
        &mut self,
        at: u64,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> Result<(), Failure> {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.write_bytes(at, &d)
    }

    /// Notifies queue `q` (0 rxq, 1 txq, or any other index).
    pub fn notify(&mut self, q: u64) -> Result<(), Failure> {
        let addr = self.layout.notify + q * self.layout.notify_mult;
        self.write(addr, 2, q)
    }

    /// Posts 1-4 rx buffers, usually with a notification.
    pub fn op_post_rx(&mut self) -> Result<(), Failure> {
        for _ in 0..self.rng.below(4) + 1 {
            let segs = self.rx_segs();
            self.post(0, segs)?;
        }
        if self.rng.below(5) != 0 {
            self.notify(0)?;
        }
        Ok(())
    }

    /// Puts a message on txq: a reply to a request the guest saw, or something else.
    pub fn op_send_tx(&mut self) -> Result<(), Failure> {
        let msg = match self.pending.pop_front() {
            Some(request) if self.rng.below(10) < 8 => {
                messages::guest_reply(&mut self.rng, request)
            }
            _ => messages::guest_other(&mut self.rng),
        };
        let segs = match self.rng.below(10) {
            0 => {
                // Split across read-only buffers at random points.
                let mut segs = Vec::new();
                let mut at = 0;
                while at < msg.len() {
                    let n = (self.rng.below(msg.len() as u64) as usize + 1).min(msg.len() - at);
                    let addr = self.alloc(n as u64);
                    self.write_bytes(addr, &msg[at..at + n])?;
                    segs.push(Seg {
                        addr,
                        len: n as u32,
                        write: false,
                    });
                    at += n;
                }
                segs
            }
            1 => vec![Seg {
                addr: weird_addr(self),
                len: interesting(&mut self.rng) as u32,
                write: false,
            }],
            2 => {
                let addr = self.alloc(msg.len() as u64);
                self.write_bytes(addr, &msg)?;
                vec![
                    Seg {
                        addr,
                        len: msg.len() as u32,
                        write: false,
                    },
                    Seg {
                        addr: self.alloc(64),
                        len: 64,
                        write: true,
                    },
                ]
            }
            _ => {
                let addr = self.alloc(msg.len() as u64);
                self.write_bytes(addr, &msg)?;
                vec![Seg {
                    addr,
                    len: msg.len() as u32,
                    write: false,
                }]
            }
        };
        if self.post(1, segs)? {
            self.stats.tx_msgs += 1;
        }
        if self.rng.below(8) != 0 {
            self.notify(1)?;
        }
        Ok(())
    }

    /// Consumes rxq's used entries: the messages the device delivered. Returns them with
    /// the address of the buffer each starts in.
    pub fn poll_rx(&mut self) -> Result<Vec<(u64, Vec<u8>)>, Failure> {
        let mut out = Vec::new();
        let vq = &self.queues[0];
        if vq.size == 0 {
            return Ok(out);
        }
        let (used, size) = (vq.used, vq.size);
        let idx = self.read(used + 2, 2)? as u16;
        let mut budget = size;
        while self.queues[0].last_used != idx && budget > 0 {
            budget -= 1;
            let slot = used + 4 + 8 * u64::from(self.queues[0].last_used % size);
            self.queues[0].last_used = self.queues[0].last_used.wrapping_add(1);
            let id = self.read(slot, 4)? as u16;
            let len = self.read(slot + 4, 4)? as usize;
            let Some(segs) = self.queues[0].chains.remove(&id) else {
                continue;
            };
            let mut msg = Vec::new();
            let start = segs.iter().find(|s| s.write).map_or(0, |s| s.addr);
            for s in segs.iter().filter(|s| {
                s.write
                    && s.addr
                        .checked_add(u64::from(s.len))
                        .is_some_and(|end| end <= RAM_SIZE)
            }) {
                let want = (len.min(4096) - msg.len().min(len.min(4096))).min(s.len as usize);
                msg.extend(self.read_bytes(s.addr, want)?);
            }
            if msg.len() >= messages::HDR {
                out.push((start, msg));
            }
        }
        // txq's used entries need no reading; forget chains the ring has wrapped past.
        for q in &mut self.queues {
            if q.chains.len() > 4 * usize::from(q.size.max(1)) {
                q.chains.clear();
            }
        }
        Ok(out)
    }

    /// The driver's bring-up, each step now and then skipped or garbled (`clean`: never).
    pub fn bring_up(&mut self, clean: bool) -> Result<(), Failure> {
        let l = self.layout.clone();
        let skip = |f: &mut Fuzzer| !clean && f.rng.below(25) == 0;
        self.write(l.common + common::STATUS, 1, 0)?;
        self.read(l.common + common::STATUS, 1)?;
        self.write(
            l.common + common::STATUS,
            1,
            u64::from(status::ACK | status::DRIVER),
        )?;
        let mut offered = 0u64;
        for sel in 0..2u64 {
            self.write(l.common + common::DFSELECT, 4, sel)?;
            offered |= self.read(l.common + common::DF, 4)? << (32 * sel);
        }
        let wanted = if skip(self) {
            interesting(&mut self.rng)
        } else {
            offered & (VERSION_1 | self.rng.next_u64() & ((1 << 28) | (1 << 29)))
        };
        for sel in 0..2u64 {
            self.write(l.common + common::GFSELECT, 4, sel)?;
            self.write(
                l.common + common::GF,
                4,
                (wanted >> (32 * sel)) & 0xffff_ffff,
            )?;
        }
        let mut st = status::ACK | status::DRIVER | status::FEATURES_OK;
        self.write(l.common + common::STATUS, 1, u64::from(st))?;
        self.write(l.common + common::MSIX, 2, 0)?;
        for q in 0..2u64 {
            self.write(l.common + common::Q_SELECT, 2, q)?;
            let max = self.read(l.common + common::Q_SIZE, 2)? as u16;
            let size = if skip(self) {
                self.rng.below(0x1_0000) as u16
            } else {
                max.clamp(1, 1024)
            };
            self.write(l.common + common::Q_SIZE, 2, u64::from(size))?;
            self.write(l.common + common::Q_MSIX, 2, q + 1)?;
            let vq = Vq::standard(2 * self.dev as u64 + q, size);
            let ring_len = vq.used + 6 + 8 * u64::from(size) - vq.desc;
            self.qt(format!("memset {:#x} {ring_len:#x} 0", vq.desc))?;
            self.write(l.common + common::Q_DESC, 8, vq.desc)?;
            self.write(l.common + common::Q_AVAIL, 8, vq.avail)?;
            self.write(l.common + common::Q_USED, 8, vq.used)?;
            if !skip(self) {
                self.write(l.common + common::Q_ENABLE, 2, 1)?;
            }
            self.queues[q as usize] = vq;
        }
        self.msix_setup()?;
        st |= status::DRIVER_OK;
        if !skip(self) {
            self.write(l.common + common::STATUS, 1, u64::from(st))?;
        }
        for _ in 0..4 {
            self.post_rx_page()?;
        }
        self.notify(0)?;
        self.write(l.device_cfg, 4, 1)?; // BACKEND_UP
        self.up = true;
        self.stats.bring_ups += 1;
        Ok(())
    }

    /// Enables MSI-X with every vector aimed at its slot in RAM, unmasked.
    pub fn msix_setup(&mut self) -> Result<(), Failure> {
        let l = self.layout.clone();
        if l.msix_cap == 0 {
            return Ok(());
        }
        self.cfg_write(l.msix_cap + 2, 2, 0x8000)?;
        for v in 0..u64::from(l.msix_entries) {
            let e = l.msix_table + 16 * v;
            self.write(e, 4, self.msi_base() + 4 * v)?;
            self.write(e + 4, 4, 0)?;
            self.write(e + 8, 4, 0x1000 + v)?;
            self.write(e + 12, 4, 0)?;
        }
        Ok(())
    }

    /// A random access to one of the device's registers or BARs.
    pub fn op_register(&mut self) -> Result<(), Failure> {
        let l = self.layout.clone();
        let width = [1u8, 2, 4, 8][self.rng.below(4) as usize];
        let val = interesting(&mut self.rng);
        let n = u64::from(self.params.max_vhost_queues);
        let addr = match self.rng.below(10) {
            0 => l.common + self.rng.below(common::LEN + 4),
            1 => l.notify + self.rng.below(8) * l.notify_mult.max(1),
            2 => l.isr,
            3 => l.device_cfg + self.rng.below(28),
            4 => l.doorbells + 4 * self.rng.below(2 * n + 3) + 2 * self.rng.below(2),
            5 => l.notification + self.rng.below(6),
            6 => l.msix_table + self.rng.below(16 * u64::from(l.msix_entries) + 64),
            7 => self.shm_addr(),
            _ => {
                let bars = l.mmio_ranges();
                let (base, size) = bars[self.rng.below(bars.len() as u64) as usize];
                base + self.rng.below(size.min(1 << 22) + 16)
            }
        };
        if self.rng.below(3) == 0 {
            self.read(addr, width)?;
        } else {
            self.write(addr, width, val)?;
        }
        Ok(())
    }

    /// An address in the shared-memory BAR: in a region the guest was told about, at its
    /// edges, or anywhere.
    fn shm_addr(&mut self) -> u64 {
        let l = &self.layout;
        if !self.shm_regions.is_empty() && self.rng.below(3) != 0 {
            let (off, size) =
                self.shm_regions[self.rng.below(self.shm_regions.len() as u64) as usize];
            let at = match self.rng.below(3) {
                0 => size.saturating_sub(8),
                1 => size,
                _ => self.rng.below(size.max(1)),
            };
            return l.shm.wrapping_add(off.saturating_add(at));
        }
        l.shm + self.rng.below(l.shm_len.max(1))
    }

    /// A common-configuration write a driver could do at the worst moment.
    pub fn op_common(&mut self) -> Result<(), Failure> {
        let c = self.layout.common;
        let pick = self.rng.below(9);
        let (off, width, val) = match pick {
            0 => (
                common::STATUS,
                1,
                [0u64, 0x40, 0x4f, 0x80, 0x0b, 0x07, 0xff][self.rng.below(7) as usize],
            ),
            1 => (
                common::Q_SELECT,
                2,
                [0u64, 1, 2, 0xffff][self.rng.below(4) as usize],
            ),
            2 => (common::Q_SIZE, 2, interesting(&mut self.rng) & 0xffff),
            3 => (common::Q_ENABLE, 2, self.rng.below(3)),
            4 => (
                common::Q_MSIX,
                2,
                [0u64, 1, 2, 0xffff, 300][self.rng.below(5) as usize],
            ),
            5 => (
                common::MSIX,
                2,
                [0u64, 0xffff, 300][self.rng.below(3) as usize],
            ),
            6 => (
                [common::Q_DESC, common::Q_AVAIL, common::Q_USED][self.rng.below(3) as usize],
                8,
                if self.rng.below(2) == 0 {
                    weird_addr(self)
                } else {
                    interesting(&mut self.rng)
                },
            ),
            7 => (common::Q_RESET, 2, 1),
            _ => (common::GF, 4, interesting(&mut self.rng) & 0xffff_ffff),
        };
        self.write(c + off, width, val)?;
        if pick == 0 && val == 0 {
            self.up = false;
        }
        Ok(())
    }

    /// The device-specific status: BACKEND_UP on and off, reserved bits, odd widths.
    pub fn op_device_cfg(&mut self) -> Result<(), Failure> {
        let d = self.layout.device_cfg;
        match self.rng.below(6) {
            0 => self.write(d, 4, 0),
            1 => self.write(d, 4, 4),
            2 => {
                let v = self.rng.below(256);
                self.write(d, 1, v)
            }
            3 => {
                self.read(d, 4)?;
                Ok(())
            }
            _ => self.write(d, 4, 1),
        }
    }

    /// Doorbell stores and notification-structure programming.
    pub fn op_doorbell(&mut self) -> Result<(), Failure> {
        let l = self.layout.clone();
        let n = u64::from(self.params.max_vhost_queues);
        if self.rng.below(2) == 0 {
            let db = self.rng.below(2 * n + 2);
            let width = [2u8, 2, 1, 4, 8][self.rng.below(5) as usize];
            let v = self.rng.next_u64();
            return self.write(l.doorbells + db * l.doorbell_mult.max(1), width, v);
        }
        let select = if self.rng.below(5) == 0 {
            interesting(&mut self.rng) & 0xffff
        } else {
            self.rng.below(n + 1)
        };
        self.write(l.notification, 2, select)?;
        let vector = match self.rng.below(4) {
            0 => 0xffff,
            1 => interesting(&mut self.rng) & 0xffff,
            _ => self.rng.below(u64::from(l.msix_entries) + 1),
        };
        let width = [2u8, 4][self.rng.below(2) as usize];
        self.write(l.notification + 2, width, vector)?;
        self.read(l.notification + 2, 2)?;
        Ok(())
    }

    /// MSI-X: a table entry aimed somewhere (RAM, the APIC, the device's own registers), or
    /// the enable and function-mask bits.
    pub fn op_msix(&mut self) -> Result<(), Failure> {
        let l = self.layout.clone();
        if l.msix_cap == 0 {
            return Ok(());
        }
        if self.rng.below(4) == 0 {
            let ctl = [0u32, 0x8000, 0xc000, 0x4000][self.rng.below(4) as usize];
            return self.cfg_write(l.msix_cap + 2, 2, ctl);
        }
        let v = self.rng.below(u64::from(l.msix_entries));
        let e = l.msix_table + 16 * v;
        let (addr, data) = match self.rng.below(4) {
            0 => (0xfee0_0000, 0x4000 + self.rng.below(256)),
            1 => (
                weird_addr(self),
                self.rng.below(4) * 0x40 * self.rng.below(2),
            ),
            _ => (self.msi_base() + 4 * v, 0x1000 + v),
        };
        self.write(e, 4, addr & 0xffff_ffff)?;
        self.write(e + 4, 4, addr >> 32)?;
        self.write(e + 8, 4, data)?;
        let masked = u64::from(self.rng.below(4) == 0);
        self.write(e + 12, 4, masked)
    }

    /// A PCI config access anywhere in the device's 256 bytes; BARs and the command register
    /// are put back at the end of the sequence.
    pub fn op_pci_config(&mut self) -> Result<(), Failure> {
        let off = self.rng.below(256) as u8;
        let width = [1u8, 2, 4][self.rng.below(3) as usize];
        if self.rng.below(3) == 0 {
            self.cfg_read(off, width)?;
            return Ok(());
        }
        self.layout_dirty = true;
        let v = interesting(&mut self.rng) as u32;
        self.cfg_write(off, width, v)
    }
}
