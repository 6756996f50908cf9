//! A fake virtio-vhost-user PCI device for unit tests of the driver and for the fuzz targets
//! (feature `fake-device`): the capability layout of `design/VVU-SPEC.md` (as the QEMU
//! device model builds it), common-configuration register semantics, and a device side that
//! serves rxq/txq with virtio-queue. Its methods panic on misuse by the caller (test code).

// Test code: a failed expectation is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::cell::RefCell;
use std::io;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::pci::PciTransport;

const COMMON: u64 = 0x0;
const DEVICE: u64 = 0x2000;
const NOTIFY: u64 = 0x3000;
const NOTIFICATION: u64 = 0x1000;
/// Bytes of the shared-memory BAR (1 GiB).
pub const SHM_SIZE: u64 = 1 << 30;
/// Where the shared-memory BAR starts in `FakeVvu::shm`.
pub const SHM_FILE_OFFSET: u64 = 2 << 20;

#[derive(Default, Clone, Copy)]
struct QueueRegs {
    size: u16,
    msix: u16,
    enable: u16,
    desc: u64,
    driver: u64,
    device: u64,
}

/// The device's registers and what the driver did to them.
pub struct State {
    /// PCI configuration space.
    pub config: [u8; 256],
    /// Features offered.
    pub device_features: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// virtio device status.
    pub status: u8,
    /// Clear FEATURES_OK whatever the driver accepted.
    pub refuse_features_ok: bool,
    msix_config: u16,
    queue_select: u16,
    queues: [QueueRegs; 2],
    device_queues: [Option<Queue>; 2],
    /// virtio-vhost-user `status` (BACKEND_UP, FRONTEND_UP).
    pub vvu_status: u32,
    /// virtio-vhost-user `max_vhost_queues`.
    pub max_vhost_queues: u32,
    /// virtio-vhost-user `uuid`.
    pub uuid: [u8; 16],
    notification_select: u16,
    /// MSI-X vector of each vring's kick.
    pub kick_vectors: Vec<u16>,
    /// MSI-X vectors of the device.
    pub msix_vectors: u16,
    /// Doorbell stores: offset and width in bytes.
    pub doorbell_writes: Vec<(u64, usize)>,
    /// Every value the driver wrote to the config status.
    pub status_writes: Vec<u32>,
    /// Queue notifications, by queue index.
    pub notifies: Vec<u16>,
}

/// The fake device.
pub struct FakeVvu {
    /// Its registers.
    pub state: RefCell<State>,
    mem: GuestMemoryMmap,
    msix: RefCell<Vec<EventFd>>,
    /// Eventfds wired to BAR locations by `store_on_signal`.
    wired: RefCell<Vec<(u8, u64, EventFd)>>,
    /// Backs the shared-memory BAR (sparse).
    pub shm: std::fs::File,
}

fn put_cap(config: &mut [u8; 256], at: usize, next: u8, bytes: &[u8]) {
    config[at..at + bytes.len()].copy_from_slice(bytes);
    config[at + 1] = next;
}

fn vendor_cap(
    kind: u8,
    len: u8,
    bar: u8,
    id: u8,
    offset: u32,
    length: u32,
    extra: &[u8],
) -> Vec<u8> {
    let mut c = vec![0x09, 0, len, kind, bar, id, 0, 0];
    c.extend_from_slice(&offset.to_le_bytes());
    c.extend_from_slice(&length.to_le_bytes());
    c.extend_from_slice(extra);
    c
}

impl FakeVvu {
    /// A device with `msix_vectors` MSI-X vectors and `max_vhost_queues`, over 4 MiB of DMA
    /// memory at IOVA 0.
    pub fn new(msix_vectors: u16, max_vhost_queues: u32) -> Self {
        let mut config = [0u8; 256];
        config[0..2].copy_from_slice(&0x1af4u16.to_le_bytes());
        config[2..4].copy_from_slice(&0x106bu16.to_le_bytes());
        config[0x34] = 0x40;
        put_cap(
            &mut config,
            0x40,
            0x50,
            &[
                0x11,
                0,
                (msix_vectors - 1) as u8,
                ((msix_vectors - 1) >> 8) as u8,
            ],
        );
        put_cap(
            &mut config,
            0x50,
            0x60,
            &vendor_cap(1, 16, 4, 0, COMMON as u32, 0x1000, &[]),
        );
        put_cap(
            &mut config,
            0x60,
            0x74,
            &vendor_cap(2, 20, 4, 0, NOTIFY as u32, 0x1000, &4u32.to_le_bytes()),
        );
        put_cap(
            &mut config,
            0x74,
            0x84,
            &vendor_cap(3, 16, 4, 0, 0x1000, 0x1000, &[]),
        );
        put_cap(
            &mut config,
            0x84,
            0x94,
            &vendor_cap(4, 16, 4, 0, DEVICE as u32, 24, &[]),
        );
        put_cap(
            &mut config,
            0x94,
            0xa8,
            &vendor_cap(6, 20, 0, 0, 0, 0x1000, &4u32.to_le_bytes()),
        );
        put_cap(
            &mut config,
            0xa8,
            0xb8,
            &vendor_cap(7, 16, 0, 0, NOTIFICATION as u32, 4, &[]),
        );
        let shm = vendor_cap(
            8,
            24,
            2,
            1,
            0,
            SHM_SIZE as u32,
            &[0, 0, 0, 0, (SHM_SIZE >> 32) as u8, 0, 0, 0],
        );
        put_cap(&mut config, 0xb8, 0x00, &shm);
        let state = State {
            config,
            device_features: (1 << 32) | (1 << 33),
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            refuse_features_ok: false,
            msix_config: 0xffff,
            queue_select: 0,
            queues: [QueueRegs {
                size: 128,
                msix: 0xffff,
                ..Default::default()
            }; 2],
            device_queues: [None, None],
            vvu_status: 0,
            max_vhost_queues,
            uuid: *b"0123456789abcdef",
            notification_select: 0,
            kick_vectors: vec![0xffff; max_vhost_queues as usize],
            msix_vectors,
            doorbell_writes: Vec::new(),
            status_writes: Vec::new(),
            notifies: Vec::new(),
        };
        FakeVvu {
            state: RefCell::new(state),
            mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap(),
            msix: RefCell::new(Vec::new()),
            wired: RefCell::new(Vec::new()),
            shm: {
                // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked.
                let fd = unsafe { libc::memfd_create(c"fake-shm".as_ptr(), libc::MFD_CLOEXEC) };
                assert!(fd >= 0, "memfd_create failed");
                // SAFETY: `fd` is a fresh descriptor nothing else owns.
                let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
                file.set_len(SHM_FILE_OFFSET + SHM_SIZE).unwrap();
                file
            },
        }
    }

    fn common_bytes(s: &State) -> [u8; 0x38] {
        let mut c = [0u8; 0x38];
        let q = &s.queues[usize::from(s.queue_select.min(1))];
        let feature = (s.device_features >> (32 * s.device_feature_select.min(1))) as u32;
        c[0..4].copy_from_slice(&s.device_feature_select.to_le_bytes());
        c[4..8].copy_from_slice(&feature.to_le_bytes());
        c[8..12].copy_from_slice(&s.driver_feature_select.to_le_bytes());
        c[0x10..0x12].copy_from_slice(&s.msix_config.to_le_bytes());
        c[0x12..0x14].copy_from_slice(&2u16.to_le_bytes());
        c[0x14] = s.status;
        c[0x16..0x18].copy_from_slice(&s.queue_select.to_le_bytes());
        c[0x18..0x1a].copy_from_slice(&q.size.to_le_bytes());
        c[0x1a..0x1c].copy_from_slice(&q.msix.to_le_bytes());
        c[0x1c..0x1e].copy_from_slice(&q.enable.to_le_bytes());
        c[0x1e..0x20].copy_from_slice(&s.queue_select.to_le_bytes()); // notify_off = index
        c[0x20..0x28].copy_from_slice(&q.desc.to_le_bytes());
        c[0x28..0x30].copy_from_slice(&q.driver.to_le_bytes());
        c[0x30..0x38].copy_from_slice(&q.device.to_le_bytes());
        c
    }

    fn write_common(s: &mut State, off: u64, data: &[u8]) {
        let mut v = [0u8; 8];
        v[..data.len()].copy_from_slice(data);
        let v = u64::from_le_bytes(v);
        let qs = usize::from(s.queue_select.min(1));
        let set_half = |reg: &mut u64, high: bool| {
            if high {
                *reg = (*reg & 0xffff_ffff) | (v << 32);
            } else {
                *reg = (*reg & !0xffff_ffff) | (v & 0xffff_ffff);
            }
        };
        match off {
            0x00 => s.device_feature_select = v as u32,
            0x08 => s.driver_feature_select = v as u32,
            0x0c => {
                let shift = 32 * s.driver_feature_select.min(1);
                s.driver_features =
                    (s.driver_features & !(0xffff_ffffu64 << shift)) | ((v & 0xffff_ffff) << shift);
            }
            0x10 => {
                s.msix_config = if v as u16 >= s.msix_vectors {
                    0xffff
                } else {
                    v as u16
                }
            }
            0x14 => {
                let mut status = v as u8;
                if status & 8 != 0
                    && (s.refuse_features_ok || s.driver_features & !s.device_features != 0)
                {
                    status &= !8;
                }
                s.status = status;
                if status == 0 {
                    s.device_queues = [None, None];
                }
            }
            0x16 => s.queue_select = v as u16,
            0x18 => s.queues[qs].size = v as u16,
            0x1a => {
                s.queues[qs].msix = if v as u16 >= s.msix_vectors {
                    0xffff
                } else {
                    v as u16
                }
            }
            0x1c => s.queues[qs].enable = v as u16,
            0x20 => set_half(&mut s.queues[qs].desc, false),
            0x24 => set_half(&mut s.queues[qs].desc, true),
            0x28 => set_half(&mut s.queues[qs].driver, false),
            0x2c => set_half(&mut s.queues[qs].driver, true),
            0x30 => set_half(&mut s.queues[qs].device, false),
            0x34 => set_half(&mut s.queues[qs].device, true),
            _ => {}
        }
    }

    fn device_queue(s: &mut State, index: usize) -> &mut Queue {
        let regs = s.queues[index];
        s.device_queues[index].get_or_insert_with(|| {
            let mut q = Queue::new(256).unwrap();
            q.set_size(regs.size);
            q.set_desc_table_address(Some(regs.desc as u32), Some((regs.desc >> 32) as u32));
            q.set_avail_ring_address(Some(regs.driver as u32), Some((regs.driver >> 32) as u32));
            q.set_used_ring_address(Some(regs.device as u32), Some((regs.device >> 32) as u32));
            q.set_ready(regs.enable == 1);
            q
        })
    }

    /// A frontend connects (`true`) or leaves: FRONTEND_UP changes and a config interrupt
    /// is raised, as the device does.
    pub fn frontend(&self, up: bool) {
        let vector = {
            let mut s = self.state.borrow_mut();
            s.vvu_status = (s.vvu_status & 1) | if up { 2 } else { 0 };
            s.msix_config
        };
        self.signal(vector);
    }

    /// The device found a driver error: DEVICE_NEEDS_RESET and a config interrupt, as
    /// QEMU's `virtio_error` does.
    pub fn needs_reset(&self) {
        let vector = {
            let mut s = self.state.borrow_mut();
            s.status |= 0x40;
            s.msix_config
        };
        self.signal(vector);
    }

    /// Raises MSI-X `vector`.
    pub fn signal(&self, vector: u16) {
        if let Some(e) = self.msix.borrow().get(usize::from(vector)) {
            e.write(1).unwrap();
        }
    }

    /// Delivers `bytes` in the next rx buffer, reporting `used_len` written bytes.
    pub fn push_rx_raw(&self, bytes: &[u8], used_len: u32) -> bool {
        let mut s = self.state.borrow_mut();
        let vector = s.queues[0].msix;
        let q = Self::device_queue(&mut s, 0);
        // A broken avail ring is the driver's error: the device needs a reset, as QEMU's
        // virtqueue_pop answers it (virtio_error).
        let Ok(mut avail) = q.iter(&self.mem) else {
            drop(s);
            self.needs_reset();
            return false;
        };
        let Some(chain) = avail.next() else {
            return false;
        };
        let head = chain.head_index();
        let desc = chain.clone().next().unwrap();
        assert!(desc.is_write_only(), "rx buffers are device-writable");
        assert!(bytes.len() <= desc.len() as usize);
        self.mem.write_slice(bytes, desc.addr()).unwrap();
        q.add_used(&self.mem, head, used_len).unwrap();
        drop(s);
        self.signal(vector);
        true
    }

    /// Delivers a frontend message on rxq.
    pub fn push_rx(&self, msg: &[u8]) -> bool {
        self.push_rx_raw(msg, msg.len() as u32)
    }

    /// Takes the next message the driver sent on txq.
    pub fn pop_tx(&self) -> Option<Vec<u8>> {
        let mut s = self.state.borrow_mut();
        let vector = s.queues[1].msix;
        let q = Self::device_queue(&mut s, 1);
        let Ok(mut avail) = q.iter(&self.mem) else {
            drop(s);
            self.needs_reset();
            return None;
        };
        let chain = avail.next()?;
        let head = chain.head_index();
        let mut msg = Vec::new();
        for desc in chain {
            let mut buf = vec![0u8; desc.len() as usize];
            self.mem.read_slice(&mut buf, desc.addr()).unwrap();
            msg.extend_from_slice(&buf);
        }
        q.add_used(&self.mem, head, 0).unwrap();
        drop(s);
        self.signal(vector);
        Some(msg)
    }

    /// Writes a used element naming descriptor `id` straight into the rx used ring (a buggy
    /// device; virtio-queue itself refuses out-of-range ids).
    pub fn push_bogus_rx_used(&self, id: u32) {
        let s = self.state.borrow();
        let used = GuestAddress(s.queues[0].device);
        let size = u64::from(s.queues[0].size);
        let idx: u16 = self.mem.read_obj(GuestAddress(used.0 + 2)).unwrap();
        let slot = used.0 + 4 + 8 * (u64::from(idx) % size);
        self.mem.write_obj(id, GuestAddress(slot)).unwrap();
        self.mem.write_obj(12u32, GuestAddress(slot + 4)).unwrap();
        self.mem
            .write_obj(idx.wrapping_add(1), GuestAddress(used.0 + 2))
            .unwrap();
    }

    /// Performs the 16-bit store of every wired eventfd that was signalled (what the
    /// kernel does on its own for a real device).
    pub fn deliver_signals(&self) {
        let fired: Vec<(u8, u64)> = self
            .wired
            .borrow()
            .iter()
            .filter(|(_, _, e)| e.read().is_ok())
            .map(|(b, o, _)| (*b, *o))
            .collect();
        for (bar, offset) in fired {
            let _ = self.bar_write(bar, offset, &0u16.to_le_bytes());
        }
    }

    /// Guest address of the used ring of queue `index` (0 rxq, 1 txq), which the device
    /// writes: where a buggy or hostile device scribbles.
    pub fn used_ring(&self, index: usize) -> GuestAddress {
        GuestAddress(self.state.borrow().queues[index.min(1)].device)
    }

    /// Number of rx buffers the driver has made available.
    pub fn rx_available(&self) -> u16 {
        let mut s = self.state.borrow_mut();
        let q = Self::device_queue(&mut s, 0);
        q.avail_idx(&self.mem, std::sync::atomic::Ordering::Acquire)
            .unwrap()
            .0
    }
}

impl PciTransport for FakeVvu {
    fn config_read(&self, offset: u64, data: &mut [u8]) -> io::Result<()> {
        let s = self.state.borrow();
        let at = offset as usize;
        let src = s
            .config
            .get(at..at + data.len())
            .ok_or_else(|| io::Error::other("config read out of range"))?;
        data.copy_from_slice(src);
        Ok(())
    }

    fn config_write(&self, _offset: u64, _data: &[u8]) -> io::Result<()> {
        Ok(())
    }

    fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]) -> io::Result<()> {
        let s = self.state.borrow();
        let len = data.len();
        match (bar, offset) {
            (4, o) if o < 0x38 => {
                let c = Self::common_bytes(&s);
                data.copy_from_slice(&c[o as usize..o as usize + len]);
            }
            (4, o) if (DEVICE..DEVICE + 24).contains(&o) => {
                let mut d = [0u8; 24];
                d[0..4].copy_from_slice(&s.vvu_status.to_le_bytes());
                d[4..8].copy_from_slice(&s.max_vhost_queues.to_le_bytes());
                d[8..24].copy_from_slice(&s.uuid);
                let o = (o - DEVICE) as usize;
                data.copy_from_slice(&d[o..o + len]);
            }
            (0, o) if o == NOTIFICATION => {
                data.copy_from_slice(&s.notification_select.to_le_bytes()[..len])
            }
            (0, o) if o == NOTIFICATION + 2 => {
                let v = s
                    .kick_vectors
                    .get(usize::from(s.notification_select))
                    .copied()
                    .unwrap_or(0xffff);
                data.copy_from_slice(&v.to_le_bytes()[..len]);
            }
            _ => data.fill(0),
        }
        Ok(())
    }

    fn bar_write(&self, bar: u8, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut s = self.state.borrow_mut();
        match (bar, offset) {
            (4, o) if o < 0x38 => Self::write_common(&mut s, o, data),
            (4, o) if o == DEVICE => {
                let mut v = [0u8; 4];
                v.copy_from_slice(data);
                s.vvu_status = u32::from_le_bytes(v) & 1;
                let status = s.vvu_status;
                s.status_writes.push(status);
            }
            (4, o) if o >= NOTIFY => s.notifies.push(((o - NOTIFY) / 4) as u16),
            (0, o) if o < NOTIFICATION => s.doorbell_writes.push((o, data.len())),
            (0, o) if o == NOTIFICATION => {
                s.notification_select = u16::from_le_bytes([data[0], data[1]])
            }
            (0, o) if o == NOTIFICATION + 2 => {
                let v = u16::from_le_bytes([data[0], data[1]]);
                let sel = usize::from(s.notification_select);
                let accepted = if v < s.msix_vectors { v } else { 0xffff };
                if let Some(slot) = s.kick_vectors.get_mut(sel) {
                    *slot = accepted;
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn enable_msix(&self, eventfds: &[&EventFd]) -> io::Result<()> {
        *self.msix.borrow_mut() = eventfds
            .iter()
            .map(|e| e.try_clone())
            .collect::<io::Result<_>>()?;
        Ok(())
    }

    fn dma_memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    fn store_on_signal(&self, bar: u8, offset: u64, eventfd: Option<&EventFd>) -> io::Result<()> {
        let mut wired = self.wired.borrow_mut();
        wired.retain(|(b, o, _)| (*b, *o) != (bar, offset));
        if let Some(e) = eventfd {
            wired.push((bar, offset, e.try_clone()?));
        }
        Ok(())
    }

    /// The shared-memory BAR is backed by a memfd, placed at a non-zero file offset so a
    /// user that ignores the offset reads the wrong bytes.
    fn bar_file(&self, bar: u8) -> io::Result<(std::fs::File, u64)> {
        assert_eq!(bar, 2, "only the shared-memory BAR is mappable");
        Ok((self.shm.try_clone()?, SHM_FILE_OFFSET))
    }
}
