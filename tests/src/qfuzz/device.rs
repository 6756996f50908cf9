//! The device as the guest finds it: PCI config space through ports 0xcf8/0xcfc, BARs sized
//! and placed, and the addresses of every structure its capabilities point at
//! (`design/VVU-SPEC.md`: cfg_type 1-4 standard virtio, 6 doorbells, 7 notification, 8 shared
//! memory; MSI-X in BAR 1).

use super::qtest::{value, Failure, DEVICE_SLOT};

/// Guest RAM (the machine runs with `-m 64M`): rings, MSI-X targets and buffers live here.
pub const RAM_SIZE: u64 = 64 << 20;
/// Rings of queue q of device d at `RING_BASE + (2 * d + q) * RING_STRIDE` (up to 4 devices).
pub const RING_BASE: u64 = 0x10_0000;
/// Room for one queue's split ring of up to 1024 entries.
pub const RING_STRIDE: u64 = 0x1_0000;
/// Indirect descriptor tables.
pub const INDIRECT_BASE: u64 = 0x18_0000;
/// MSI-X messages aimed at RAM land at `MSI_BASE + d * MSI_STRIDE + 4 * vector`.
pub const MSI_BASE: u64 = 0x1c_0000;
/// RAM for one device's MSI-X messages.
pub const MSI_STRIDE: u64 = 0x1000;
/// Data buffers, handed out round-robin.
pub const BUF_BASE: u64 = 0x20_0000;
/// End of the buffer area.
pub const BUF_END: u64 = 0x300_0000;
/// 32-bit BARs (all but the shared memory) of device d go at
/// `MMIO32_BASE + d * 16 MiB + bar * 1 MiB`.
pub const MMIO32_BASE: u64 = 0xe000_0000;

/// virtio_pci_common_cfg field offsets (virtio 1.2, 4.1.4.3).
pub mod common {
    /// le32 device_feature_select
    pub const DFSELECT: u64 = 0x00;
    /// le32 device_feature
    pub const DF: u64 = 0x04;
    /// le32 driver_feature_select
    pub const GFSELECT: u64 = 0x08;
    /// le32 driver_feature
    pub const GF: u64 = 0x0c;
    /// le16 config_msix_vector
    pub const MSIX: u64 = 0x10;
    /// le16 num_queues
    pub const NUMQ: u64 = 0x12;
    /// u8 device_status
    pub const STATUS: u64 = 0x14;
    /// u8 config_generation
    pub const CFGGEN: u64 = 0x15;
    /// le16 queue_select
    pub const Q_SELECT: u64 = 0x16;
    /// le16 queue_size
    pub const Q_SIZE: u64 = 0x18;
    /// le16 queue_msix_vector
    pub const Q_MSIX: u64 = 0x1a;
    /// le16 queue_enable
    pub const Q_ENABLE: u64 = 0x1c;
    /// le16 queue_notify_off
    pub const Q_NOFF: u64 = 0x1e;
    /// le64 queue_desc
    pub const Q_DESC: u64 = 0x20;
    /// le64 queue_driver (avail)
    pub const Q_AVAIL: u64 = 0x28;
    /// le64 queue_device (used)
    pub const Q_USED: u64 = 0x30;
    /// le16 queue_reset (QEMU implements it); the structure ends at 0x3c
    pub const Q_RESET: u64 = 0x3a;
    /// Size of the structure QEMU implements.
    pub const LEN: u64 = 0x3c;
}

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    /// ACKNOWLEDGE
    pub const ACK: u8 = 1;
    /// DRIVER
    pub const DRIVER: u8 = 2;
    /// DRIVER_OK
    pub const DRIVER_OK: u8 = 4;
    /// FEATURES_OK
    pub const FEATURES_OK: u8 = 8;
    /// DEVICE_NEEDS_RESET
    pub const NEEDS_RESET: u8 = 0x40;
    /// FAILED
    pub const FAILED: u8 = 0x80;
}

/// Everything that talks qtest: the fuzzer records each command in its trace.
pub trait Qt {
    /// Sends a qtest command; returns what follows OK.
    fn qt(&mut self, line: String) -> Result<String, Failure>;

    /// The PCI slot of the device config accesses go to.
    fn slot(&self) -> u32 {
        DEVICE_SLOT
    }

    /// Reads `width` bytes (1, 2, 4) of the device's PCI config space at `off` (< 256).
    fn cfg_read(&mut self, off: u8, width: u8) -> Result<u32, Failure> {
        let addr = 0x8000_0000 | (self.slot() << 11) | u32::from(off & 0xfc);
        self.qt(format!("outl 0xcf8 {addr:#x}"))?;
        let port = 0xcfc + u32::from(off & 3);
        let cmd = match width {
            1 => "inb",
            2 => "inw",
            _ => "inl",
        };
        Ok(value(&self.qt(format!("{cmd} {port:#x}"))?) as u32)
    }

    /// Writes `width` bytes of PCI config space at `off`.
    fn cfg_write(&mut self, off: u8, width: u8, val: u32) -> Result<(), Failure> {
        let addr = 0x8000_0000 | (self.slot() << 11) | u32::from(off & 0xfc);
        self.qt(format!("outl 0xcf8 {addr:#x}"))?;
        let port = 0xcfc + u32::from(off & 3);
        let cmd = match width {
            1 => "outb",
            2 => "outw",
            _ => "outl",
        };
        self.qt(format!("{cmd} {port:#x} {val:#x}"))?;
        Ok(())
    }

    /// A memory read of `width` bytes (1, 2, 4, 8).
    fn read(&mut self, addr: u64, width: u8) -> Result<u64, Failure> {
        let cmd = match width {
            1 => "readb",
            2 => "readw",
            4 => "readl",
            _ => "readq",
        };
        Ok(value(&self.qt(format!("{cmd} {addr:#x}"))?))
    }

    /// A memory write of `width` bytes.
    fn write(&mut self, addr: u64, width: u8, val: u64) -> Result<(), Failure> {
        let cmd = match width {
            1 => "writeb",
            2 => "writew",
            4 => "writel",
            _ => "writeq",
        };
        self.qt(format!("{cmd} {addr:#x} {val:#x}"))?;
        Ok(())
    }

    /// Reads `len` bytes of guest memory.
    fn read_bytes(&mut self, addr: u64, len: usize) -> Result<Vec<u8>, Failure> {
        if len == 0 {
            return Ok(Vec::new());
        }
        Ok(super::qtest::bytes(
            &self.qt(format!("read {addr:#x} {len:#x}"))?,
            len,
        ))
    }

    /// Writes bytes into guest memory.
    fn write_bytes(&mut self, addr: u64, data: &[u8]) -> Result<(), Failure> {
        if data.is_empty() {
            return Ok(());
        }
        let hex: String = data.iter().map(|b| format!("{b:02x}")).collect();
        self.qt(format!("write {addr:#x} {:#x} 0x{hex}", data.len()))?;
        Ok(())
    }
}

/// One BAR as sized and placed.
#[derive(Debug, Clone, Copy, Default)]
pub struct Bar {
    /// Guest physical address (0: not placed).
    pub addr: u64,
    /// Size in bytes (0: not implemented).
    pub size: u64,
    /// A 64-bit memory BAR (takes the next register too).
    pub is64: bool,
}

/// Where the device's structures are, once its BARs are placed.
#[derive(Debug, Clone, Default)]
pub struct Layout {
    /// BARs 0-5.
    pub bars: [Bar; 6],
    /// Config space as first read (256 bytes).
    pub config: Vec<u8>,
    /// Common configuration (cfg_type 1).
    pub common: u64,
    /// Notification area (cfg_type 2) and its notify_off_multiplier.
    pub notify: u64,
    /// notify_off_multiplier of the notify capability.
    pub notify_mult: u64,
    /// ISR status (cfg_type 3).
    pub isr: u64,
    /// Device-specific configuration (cfg_type 4): status, max_vhost_queues, uuid.
    pub device_cfg: u64,
    /// Doorbells (cfg_type 6).
    pub doorbells: u64,
    /// doorbell_off_multiplier.
    pub doorbell_mult: u64,
    /// Length of the doorbell area.
    pub doorbells_len: u64,
    /// Notification structure (cfg_type 7): le16 select, le16 msix_vector.
    pub notification: u64,
    /// Shared memory (cfg_type 8, id 1).
    pub shm: u64,
    /// Its length.
    pub shm_len: u64,
    /// Offset of the MSI-X capability in config space (0: none).
    pub msix_cap: u8,
    /// MSI-X table address.
    pub msix_table: u64,
    /// Number of MSI-X vectors.
    pub msix_entries: u16,
}

fn le32(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 4).map_or(0, |s| {
        u64::from(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    })
}

impl Layout {
    /// Reads config space, sizes the BARs, places them, enables memory space and bus
    /// mastering, and resolves every capability to an address.
    pub fn discover(q: &mut impl Qt) -> Result<Layout, Failure> {
        let mut l = Layout::default();
        let mut bar = 0;
        while bar < 6 {
            let reg = 0x10 + 4 * bar as u8;
            let orig = q.cfg_read(reg, 4)?;
            q.cfg_write(reg, 4, 0xffff_ffff)?;
            let mask = q.cfg_read(reg, 4)?;
            q.cfg_write(reg, 4, orig)?;
            if mask == 0 || mask & 1 != 0 {
                bar += 1;
                continue; // absent, or I/O (this device has none)
            }
            let is64 = mask & 0x6 == 0x4;
            let mut size = u64::from(!(mask & !0xf)).wrapping_add(1) & 0xffff_ffff;
            if is64 {
                let hi_reg = reg + 4;
                let orig_hi = q.cfg_read(hi_reg, 4)?;
                q.cfg_write(hi_reg, 4, 0xffff_ffff)?;
                let hi = q.cfg_read(hi_reg, 4)?;
                q.cfg_write(hi_reg, 4, orig_hi)?;
                let full = (u64::from(hi) << 32) | u64::from(mask & !0xf);
                size = (!full).wrapping_add(1);
            }
            l.bars[bar] = Bar {
                addr: 0,
                size,
                is64,
            };
            bar += if is64 { 2 } else { 1 };
        }
        l.place(q)?;
        l.config = Vec::with_capacity(256);
        for off in (0..=252u8).step_by(4) {
            l.config
                .extend_from_slice(&q.cfg_read(off, 4)?.to_le_bytes());
        }
        l.resolve_caps();
        Ok(l)
    }

    /// Programs the BAR addresses (again, after a hostile write moved them) and turns on
    /// memory space and bus mastering.
    pub fn place(&mut self, q: &mut impl Qt) -> Result<(), Failure> {
        let dev = u64::from(q.slot() - DEVICE_SLOT);
        for i in 0..6 {
            let b = self.bars[i];
            if b.size == 0 {
                continue;
            }
            let addr = if b.size > 1 << 20 {
                // The shared memory: above 4 GiB, in q35's 64-bit PCI hole, aligned.
                (1u64 << 32).max(b.size) + dev * b.size
            } else {
                MMIO32_BASE + (dev << 24) + ((i as u64) << 20)
            };
            self.bars[i].addr = addr;
            let reg = 0x10 + 4 * i as u8;
            q.cfg_write(reg, 4, addr as u32)?;
            if b.is64 {
                q.cfg_write(reg + 4, 4, (addr >> 32) as u32)?;
            }
        }
        q.cfg_write(0x04, 2, 0x6)
    }

    fn resolve_caps(&mut self) {
        let c = &self.config;
        let mut at = usize::from(c.get(0x34).copied().unwrap_or(0));
        let mut guard = 0;
        while at != 0 && at + 16 <= c.len() && guard < 48 {
            guard += 1;
            let next = usize::from(c[at + 1]);
            match c[at] {
                0x11 => {
                    self.msix_cap = at as u8;
                    self.msix_entries = (le32(c, at) >> 16) as u16 % 0x800 + 1;
                    let table = le32(c, at + 4);
                    let bar = self.bars[(table & 7) as usize % 6].addr;
                    self.msix_table = bar + (table & !7);
                }
                0x09 => {
                    let bar = self.bars[usize::from(c[at + 4]) % 6].addr;
                    let offset = le32(c, at + 8);
                    let length = le32(c, at + 12);
                    let addr = bar + offset;
                    match c[at + 3] {
                        1 => self.common = addr,
                        2 => {
                            self.notify = addr;
                            self.notify_mult = le32(c, at + 16);
                        }
                        3 => self.isr = addr,
                        4 => self.device_cfg = addr,
                        6 => {
                            self.doorbells = addr;
                            self.doorbells_len = length;
                            self.doorbell_mult = le32(c, at + 16);
                        }
                        7 => self.notification = addr,
                        8 => {
                            let offset = offset | (le32(c, at + 16) << 32);
                            self.shm = bar + offset;
                            self.shm_len = length | (le32(c, at + 20) << 32);
                        }
                        _ => {}
                    }
                }
                _ => {}
            }
            at = next;
        }
    }

    /// The BARs the fuzzer pokes at random (placed ones), as (address, size).
    pub fn mmio_ranges(&self) -> Vec<(u64, u64)> {
        self.bars
            .iter()
            .filter(|b| b.size != 0)
            .map(|b| (b.addr, b.size))
            .collect()
    }
}
