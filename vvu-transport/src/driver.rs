//! The virtio-vhost-user driver: brings the device up (virtio 1.x §3.1.1 over the PCI
//! transport of §4.1), runs rxq/txq, maps vhost-queue kicks to MSI-X vectors and rings
//! doorbells, as `design/VVU-SPEC.md` specifies.
//!
//! Everything received from the device is checked before use: message lengths against the
//! buffers they arrived in, used-ring ids against what is in flight. A bad message is an
//! error for the caller to answer by resetting the session, never a panic.

use std::io;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::pci::{CapsError, PciTransport, Region, VirtioCaps};
use crate::split_ring::{Buffer, RingError, SplitRing};

/// Size of each rx and tx buffer: one vhost-user message each.
pub const BUFFER_SIZE: usize = 4096;
/// The vhost-user message header: request, flags, size.
pub const HEADER_SIZE: usize = 12;
/// "No MSI-X vector" in virtio registers.
pub const NO_VECTOR: u16 = 0xffff;

/// MSI-X vector of configuration changes.
pub const CONFIG_VECTOR: u16 = 0;
/// MSI-X vector of rxq.
pub const RX_VECTOR: u16 = 1;
/// MSI-X vector of txq.
pub const TX_VECTOR: u16 = 2;
/// MSI-X vector of vhost queue 0's kick; queue *i* uses `FIRST_KICK_VECTOR + i`.
pub const FIRST_KICK_VECTOR: u16 = 3;

const RXQ: u16 = 0;
const TXQ: u16 = 1;

/// Device status bits (virtio 1.x §2.1).
mod status {
    pub const ACKNOWLEDGE: u8 = 1;
    pub const DRIVER: u8 = 2;
    pub const DRIVER_OK: u8 = 4;
    pub const FEATURES_OK: u8 = 8;
    pub const DEVICE_NEEDS_RESET: u8 = 0x40;
}

/// Feature bits the driver negotiates.
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VIRTIO_F_ACCESS_PLATFORM: u64 = 1 << 33;

/// Device config status bits.
pub const BACKEND_UP: u32 = 1 << 0;
/// Set by the device while a frontend is connected.
pub const FRONTEND_UP: u32 = 1 << 1;

/// Offsets in the common configuration structure (virtio 1.x §4.1.4.3).
mod common {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const MSIX_CONFIG: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;
}

/// Driver errors.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// Register or memory access failed.
    #[error("device access failed")]
    Io(#[from] io::Error),
    /// The capability walk failed.
    #[error(transparent)]
    Caps(#[from] CapsError),
    /// A ring operation failed.
    #[error(transparent)]
    Ring(#[from] RingError),
    /// The device did not come out of reset.
    #[error("device did not reset (status {0:#x})")]
    ResetTimeout(u8),
    /// The device lacks a feature the driver needs.
    #[error("device does not offer {0}")]
    MissingFeature(&'static str),
    /// The device refused the negotiated features.
    #[error("device refused the negotiated features")]
    FeaturesRejected,
    /// The device has fewer than two virtqueues.
    #[error("device has {0} virtqueues; rxq and txq are needed")]
    TooFewQueues(u16),
    /// A queue is unusable.
    #[error("virtqueue {queue} has size {size}")]
    BadQueue {
        /// Queue index.
        queue: u16,
        /// Size the device reported.
        size: u16,
    },
    /// The device did not accept an MSI-X vector.
    #[error("MSI-X vector {vector} for {what} was not accepted")]
    VectorRejected {
        /// What the vector is for.
        what: String,
        /// The vector.
        vector: u16,
    },
    /// Not enough MSI-X vectors or DMA memory.
    #[error("{0}")]
    Resources(String),
    /// A received message is malformed; the session must be reset.
    #[error("malformed message from the device: {0}")]
    Malformed(String),
    /// A message to send does not fit one buffer.
    #[error("message of {0} bytes exceeds the {BUFFER_SIZE}-byte buffer")]
    MessageTooLarge(usize),
    /// All tx buffers are in flight.
    #[error("no free tx buffer")]
    TxFull,
}

/// One of the driver's virtqueues with its buffers.
struct Queue {
    ring: SplitRing,
    /// Offset of this queue's notification register in the notify BAR.
    notify_offset: u64,
    /// Buffer address of each in-flight head.
    buffers: Vec<Option<u64>>,
    /// Buffers not in flight (tx only).
    free: Vec<u64>,
}

/// A running virtio-vhost-user device.
pub struct VvuDriver<T: PciTransport> {
    pci: T,
    caps: VirtioCaps,
    rxq: Queue,
    txq: Queue,
    config_event: EventFd,
    rx_event: EventFd,
    tx_event: EventFd,
    kick_events: Vec<EventFd>,
    /// MSI-X vector of each vhost queue's kick, `NO_VECTOR` where polled.
    kick_vectors: Vec<u16>,
    max_vhost_queues: u32,
}

impl<T: PciTransport> VvuDriver<T> {
    /// Initialises the device with rxq/txq of up to `queue_size` entries, using DMA memory
    /// from `dma_base`; vhost queues' kicks get MSI-X vectors where the table has room.
    pub fn new(pci: T, queue_size: u16, dma_base: GuestAddress) -> Result<Self, DriverError> {
        let caps = VirtioCaps::parse(&pci)?;
        let mut driver_status = 0u8;
        write_common_u8(&pci, &caps, common::DEVICE_STATUS, 0)?;
        let mut tries = 0;
        loop {
            let s = read_common_u8(&pci, &caps, common::DEVICE_STATUS)?;
            if s == 0 {
                break;
            }
            tries += 1;
            if tries > 1000 {
                return Err(DriverError::ResetTimeout(s));
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        for bit in [status::ACKNOWLEDGE, status::DRIVER] {
            driver_status |= bit;
            write_common_u8(&pci, &caps, common::DEVICE_STATUS, driver_status)?;
        }

        let offered = read_features(&pci, &caps)?;
        if offered & VIRTIO_F_VERSION_1 == 0 {
            return Err(DriverError::MissingFeature("VIRTIO_F_VERSION_1"));
        }
        let wanted = VIRTIO_F_VERSION_1 | (offered & VIRTIO_F_ACCESS_PLATFORM);
        write_features(&pci, &caps, wanted)?;
        driver_status |= status::FEATURES_OK;
        write_common_u8(&pci, &caps, common::DEVICE_STATUS, driver_status)?;
        if read_common_u8(&pci, &caps, common::DEVICE_STATUS)? & status::FEATURES_OK == 0 {
            return Err(DriverError::FeaturesRejected);
        }

        let num_queues = read_common_u16(&pci, &caps, common::NUM_QUEUES)?;
        if num_queues < 2 {
            return Err(DriverError::TooFewQueues(num_queues));
        }
        let max_vhost_queues = read_device_u32(&pci, &caps, 4)?;
        // config + rxq + txq, then one kick vector per vhost queue that fits the table.
        if caps.msix_vectors < FIRST_KICK_VECTOR {
            return Err(DriverError::Resources(format!(
                "{} MSI-X vectors; at least {FIRST_KICK_VECTOR} are needed",
                caps.msix_vectors
            )));
        }
        let kick_count =
            (u32::from(caps.msix_vectors - FIRST_KICK_VECTOR)).min(max_vhost_queues) as usize;
        let config_event = EventFd::new(EFD_NONBLOCK)?;
        let rx_event = EventFd::new(EFD_NONBLOCK)?;
        let tx_event = EventFd::new(EFD_NONBLOCK)?;
        let kick_events = (0..kick_count)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()?;
        let mut all: Vec<&EventFd> = vec![&config_event, &rx_event, &tx_event];
        all.extend(kick_events.iter());
        pci.enable_msix(&all)?;

        write_common_u16(&pci, &caps, common::MSIX_CONFIG, CONFIG_VECTOR)?;
        if read_common_u16(&pci, &caps, common::MSIX_CONFIG)? != CONFIG_VECTOR {
            return Err(DriverError::VectorRejected {
                what: "config".into(),
                vector: CONFIG_VECTOR,
            });
        }

        let mem = pci.dma_memory();
        let (rxq, next) = setup_queue(&pci, &caps, mem, RXQ, queue_size, RX_VECTOR, dma_base)?;
        let (txq, next) = setup_queue(&pci, &caps, mem, TXQ, queue_size, TX_VECTOR, next)?;
        let mut rxq = rxq;
        let mut txq = txq;
        // Buffers follow the rings.
        let buffers_start = next.0.next_multiple_of(BUFFER_SIZE as u64);
        let buffers_len =
            (usize::from(rxq.ring.size()) + usize::from(txq.ring.size())) * BUFFER_SIZE;
        if !mem.check_range(GuestAddress(buffers_start), buffers_len) {
            return Err(DriverError::Resources(format!(
                "DMA memory for {buffers_len} bytes of buffers at {buffers_start:#x} is not mapped"
            )));
        }
        let mut addr = buffers_start;
        for _ in 0..rxq.ring.size() {
            let head = rxq
                .ring
                .add(mem, &[Buffer::writable(addr, BUFFER_SIZE as u32)])?;
            rxq.buffers[usize::from(head)] = Some(addr);
            addr += BUFFER_SIZE as u64;
        }
        for _ in 0..txq.ring.size() {
            txq.free.push(addr);
            addr += BUFFER_SIZE as u64;
        }

        driver_status |= status::DRIVER_OK;
        write_common_u8(&pci, &caps, common::DEVICE_STATUS, driver_status)?;
        let mut driver = VvuDriver {
            pci,
            caps,
            rxq,
            txq,
            config_event,
            rx_event,
            tx_event,
            kick_events,
            kick_vectors: Vec::new(),
            max_vhost_queues,
        };
        driver.notify(RXQ)?;
        driver.map_kick_vectors()?;
        Ok(driver)
    }

    /// Maps vhost queue *i*'s kick to vector `FIRST_KICK_VECTOR + i`; queues beyond the MSI-X
    /// table (or whose mapping the device refuses) stay unmapped and are polled.
    fn map_kick_vectors(&mut self) -> Result<(), DriverError> {
        let region = self.caps.notification;
        self.kick_vectors = vec![NO_VECTOR; self.max_vhost_queues as usize];
        for i in 0..self.kick_events.len() {
            let vector = FIRST_KICK_VECTOR + i as u16;
            write_u16(&self.pci, region, 0, i as u16)?;
            write_u16(&self.pci, region, 2, vector)?;
            self.kick_vectors[i] = read_u16(&self.pci, region, 2)?;
        }
        Ok(())
    }

    fn notify(&self, queue: u16) -> Result<(), DriverError> {
        let q = if queue == RXQ { &self.rxq } else { &self.txq };
        let notify = self.caps.notify;
        self.pci.bar_write(
            notify.bar,
            notify.offset + q.notify_offset,
            &queue.to_le_bytes(),
        )?;
        Ok(())
    }

    /// Sets or clears BACKEND_UP: while set, the device takes on frontend connections.
    pub fn set_backend_up(&self, up: bool) -> Result<(), DriverError> {
        write_device_u32(&self.pci, &self.caps, 0, if up { BACKEND_UP } else { 0 })
    }

    /// The device config status (BACKEND_UP, FRONTEND_UP).
    pub fn device_status(&self) -> Result<u32, DriverError> {
        read_device_u32(&self.pci, &self.caps, 0)
    }

    /// Whether the device has entered DEVICE_NEEDS_RESET (it found an error in what the
    /// driver did and stopped processing its queues until a reset).
    pub fn needs_reset(&self) -> Result<bool, DriverError> {
        let s = read_common_u8(&self.pci, &self.caps, common::DEVICE_STATUS)?;
        Ok(s & status::DEVICE_NEEDS_RESET != 0)
    }

    /// The device's uuid, which exports use to name it.
    pub fn uuid(&self) -> Result<[u8; 16], DriverError> {
        let mut uuid = [0u8; 16];
        let d = self.caps.device;
        self.pci.bar_read(d.bar, d.offset + 8, &mut uuid)?;
        Ok(uuid)
    }

    /// vhost queues the device can wire.
    pub fn max_vhost_queues(&self) -> u32 {
        self.max_vhost_queues
    }

    /// The MSI-X vector of vhost queue `i`'s kick, `NO_VECTOR` when it must be polled.
    pub fn kick_vector(&self, i: usize) -> u16 {
        self.kick_vectors.get(i).copied().unwrap_or(NO_VECTOR)
    }

    /// The eventfd signalled when vhost queue `i` is kicked, if it has a vector.
    pub fn kick_event(&self, i: usize) -> Option<&EventFd> {
        (self.kick_vector(i) != NO_VECTOR)
            .then(|| self.kick_events.get(i))
            .flatten()
    }

    /// Signalled on configuration changes (a frontend connected or left).
    pub fn config_event(&self) -> &EventFd {
        &self.config_event
    }

    /// Signalled when rxq has messages.
    pub fn rx_event(&self) -> &EventFd {
        &self.rx_event
    }

    /// Signalled when txq returned buffers.
    pub fn tx_event(&self) -> &EventFd {
        &self.tx_event
    }

    /// Where the frontend's memory appears.
    pub fn shared_memory(&self) -> Region {
        self.caps.shared_memory
    }

    /// The doorbell of index `i` (calls 0..N-1, errs N..2N-1): its BAR and offset.
    pub fn doorbell(&self, i: u32) -> Option<(u8, u64)> {
        (i <= 2 * self.max_vhost_queues).then(|| {
            let d = self.caps.doorbells;
            (
                d.bar,
                d.offset + u64::from(i) * u64::from(self.caps.doorbell_multiplier),
            )
        })
    }

    /// Rings doorbell `i` with a 16-bit store (the value is ignored by the device).
    pub fn ring_doorbell(&self, i: u32) -> Result<(), DriverError> {
        let (bar, offset) = self
            .doorbell(i)
            .ok_or_else(|| DriverError::Malformed(format!("doorbell {i} out of range")))?;
        self.pci.bar_write(bar, offset, &0u16.to_le_bytes())?;
        Ok(())
    }

    /// Wires doorbell `i` to `eventfd` (or unwires it with `None`): each signal of the
    /// eventfd rings the doorbell in the kernel. This is how a backend's ordinary call
    /// eventfd reaches the frontend with no forwarding thread.
    pub fn wire_doorbell(&self, i: u32, eventfd: Option<&EventFd>) -> Result<(), DriverError> {
        let (bar, offset) = self
            .doorbell(i)
            .ok_or_else(|| DriverError::Malformed(format!("doorbell {i} out of range")))?;
        self.pci.store_on_signal(bar, offset, eventfd)?;
        Ok(())
    }

    /// Takes the next message the device delivered on rxq, re-posting its buffer.
    pub fn recv(&mut self) -> Result<Option<Vec<u8>>, DriverError> {
        let mem = self.pci.dma_memory();
        let Some((head, len)) = self.rxq.ring.pop_used(mem)? else {
            return Ok(None);
        };
        let addr = self
            .rxq
            .buffers
            .get_mut(usize::from(head))
            .and_then(Option::take)
            .ok_or_else(|| {
                DriverError::Malformed(format!("rx descriptor {head} was not posted"))
            })?;
        let len = len as usize;
        let mut msg = vec![0u8; len.min(BUFFER_SIZE)];
        let read = mem.read_slice(&mut msg, GuestAddress(addr));
        // Re-post the buffer whatever the message looks like.
        let new_head = self
            .rxq
            .ring
            .add(mem, &[Buffer::writable(addr, BUFFER_SIZE as u32)])?;
        self.rxq.buffers[usize::from(new_head)] = Some(addr);
        self.notify(RXQ)?;
        read.map_err(|e| io::Error::other(e.to_string()))?;
        check_message(&msg, len)?;
        Ok(Some(msg))
    }

    /// Sends one message on txq.
    pub fn send(&mut self, msg: &[u8]) -> Result<(), DriverError> {
        if msg.len() > BUFFER_SIZE {
            return Err(DriverError::MessageTooLarge(msg.len()));
        }
        self.reclaim_tx()?;
        let mem = self.pci.dma_memory();
        let addr = self.txq.free.pop().ok_or(DriverError::TxFull)?;
        mem.write_slice(msg, GuestAddress(addr))
            .map_err(|e| io::Error::other(e.to_string()))?;
        let head = self
            .txq
            .ring
            .add(mem, &[Buffer::readable(addr, msg.len() as u32)])?;
        self.txq.buffers[usize::from(head)] = Some(addr);
        self.notify(TXQ)
    }

    /// Returns buffers the device finished with to the tx pool.
    pub fn reclaim_tx(&mut self) -> Result<(), DriverError> {
        let mem = self.pci.dma_memory();
        while let Some((head, _)) = self.txq.ring.pop_used(mem)? {
            let addr = self
                .txq
                .buffers
                .get_mut(usize::from(head))
                .and_then(Option::take)
                .ok_or_else(|| {
                    DriverError::Malformed(format!("tx descriptor {head} was not in flight"))
                })?;
            self.txq.free.push(addr);
        }
        Ok(())
    }

    /// The PCI device (for its owner's resources, e.g. BAR mappings).
    pub fn pci(&self) -> &T {
        &self.pci
    }
}

/// A message is a 12-byte header and exactly `size` payload bytes within one buffer.
fn check_message(msg: &[u8], used_len: usize) -> Result<(), DriverError> {
    if used_len > BUFFER_SIZE {
        return Err(DriverError::Malformed(format!(
            "{used_len} bytes overflow a {BUFFER_SIZE}-byte buffer"
        )));
    }
    if msg.len() < HEADER_SIZE {
        return Err(DriverError::Malformed(format!(
            "{} bytes is shorter than a header",
            msg.len()
        )));
    }
    let size = u32::from_le_bytes([msg[8], msg[9], msg[10], msg[11]]) as usize;
    if HEADER_SIZE + size != msg.len() {
        return Err(DriverError::Malformed(format!(
            "header announces {size} payload bytes, buffer holds {}",
            msg.len() - HEADER_SIZE
        )));
    }
    Ok(())
}

fn setup_queue<T: PciTransport>(
    pci: &T,
    caps: &VirtioCaps,
    mem: &GuestMemoryMmap,
    index: u16,
    wanted: u16,
    vector: u16,
    base: GuestAddress,
) -> Result<(Queue, GuestAddress), DriverError> {
    write_common_u16(pci, caps, common::QUEUE_SELECT, index)?;
    let max = read_common_u16(pci, caps, common::QUEUE_SIZE)?;
    let size = wanted.min(max);
    if size == 0 || !size.is_power_of_two() {
        return Err(DriverError::BadQueue {
            queue: index,
            size: max,
        });
    }
    write_common_u16(pci, caps, common::QUEUE_SIZE, size)?;
    write_common_u16(pci, caps, common::QUEUE_MSIX_VECTOR, vector)?;
    if read_common_u16(pci, caps, common::QUEUE_MSIX_VECTOR)? != vector {
        return Err(DriverError::VectorRejected {
            what: format!("virtqueue {index}"),
            vector,
        });
    }
    let (ring, next) = SplitRing::new(mem, base, size)?;
    write_common_u64(pci, caps, common::QUEUE_DESC, ring.desc_addr().0)?;
    write_common_u64(pci, caps, common::QUEUE_DRIVER, ring.avail_addr().0)?;
    write_common_u64(pci, caps, common::QUEUE_DEVICE, ring.used_addr().0)?;
    let notify_off = read_common_u16(pci, caps, common::QUEUE_NOTIFY_OFF)?;
    write_common_u16(pci, caps, common::QUEUE_ENABLE, 1)?;
    let queue = Queue {
        ring,
        notify_offset: u64::from(notify_off) * u64::from(caps.notify_multiplier),
        buffers: vec![None; usize::from(size)],
        free: Vec::new(),
    };
    Ok((queue, next))
}

fn read_features<T: PciTransport>(pci: &T, caps: &VirtioCaps) -> Result<u64, DriverError> {
    let mut features = 0u64;
    for half in 0..2u32 {
        write_common_u32(pci, caps, common::DEVICE_FEATURE_SELECT, half)?;
        features |= u64::from(read_common_u32(pci, caps, common::DEVICE_FEATURE)?) << (32 * half);
    }
    Ok(features)
}

fn write_features<T: PciTransport>(
    pci: &T,
    caps: &VirtioCaps,
    features: u64,
) -> Result<(), DriverError> {
    for half in 0..2u32 {
        write_common_u32(pci, caps, common::DRIVER_FEATURE_SELECT, half)?;
        write_common_u32(
            pci,
            caps,
            common::DRIVER_FEATURE,
            (features >> (32 * half)) as u32,
        )?;
    }
    Ok(())
}

fn read_bytes<T: PciTransport, const N: usize>(
    pci: &T,
    r: Region,
    off: u64,
) -> Result<[u8; N], DriverError> {
    let mut b = [0u8; N];
    pci.bar_read(r.bar, r.offset + off, &mut b)?;
    Ok(b)
}

fn read_u16<T: PciTransport>(pci: &T, r: Region, off: u64) -> Result<u16, DriverError> {
    read_bytes::<T, 2>(pci, r, off).map(u16::from_le_bytes)
}

fn write_u16<T: PciTransport>(pci: &T, r: Region, off: u64, v: u16) -> Result<(), DriverError> {
    Ok(pci.bar_write(r.bar, r.offset + off, &v.to_le_bytes())?)
}

fn read_common_u8<T: PciTransport>(pci: &T, c: &VirtioCaps, off: u64) -> Result<u8, DriverError> {
    read_bytes::<T, 1>(pci, c.common, off).map(|b| b[0])
}

fn write_common_u8<T: PciTransport>(
    pci: &T,
    c: &VirtioCaps,
    off: u64,
    v: u8,
) -> Result<(), DriverError> {
    Ok(pci.bar_write(c.common.bar, c.common.offset + off, &[v])?)
}

fn read_common_u16<T: PciTransport>(pci: &T, c: &VirtioCaps, off: u64) -> Result<u16, DriverError> {
    read_u16(pci, c.common, off)
}

fn write_common_u16<T: PciTransport>(
    pci: &T,
    c: &VirtioCaps,
    off: u64,
    v: u16,
) -> Result<(), DriverError> {
    write_u16(pci, c.common, off, v)
}

fn read_common_u32<T: PciTransport>(pci: &T, c: &VirtioCaps, off: u64) -> Result<u32, DriverError> {
    read_bytes::<T, 4>(pci, c.common, off).map(u32::from_le_bytes)
}

fn write_common_u32<T: PciTransport>(
    pci: &T,
    c: &VirtioCaps,
    off: u64,
    v: u32,
) -> Result<(), DriverError> {
    Ok(pci.bar_write(c.common.bar, c.common.offset + off, &v.to_le_bytes())?)
}

/// 64-bit registers are written as two 32-bit halves, low first (virtio 1.x §4.1.3.1).
fn write_common_u64<T: PciTransport>(
    pci: &T,
    c: &VirtioCaps,
    off: u64,
    v: u64,
) -> Result<(), DriverError> {
    write_common_u32(pci, c, off, v as u32)?;
    write_common_u32(pci, c, off + 4, (v >> 32) as u32)
}

fn read_device_u32<T: PciTransport>(pci: &T, c: &VirtioCaps, off: u64) -> Result<u32, DriverError> {
    read_bytes::<T, 4>(pci, c.device, off).map(u32::from_le_bytes)
}

fn write_device_u32<T: PciTransport>(
    pci: &T,
    c: &VirtioCaps,
    off: u64,
    v: u32,
) -> Result<(), DriverError> {
    Ok(pci.bar_write(c.device.bar, c.device.offset + off, &v.to_le_bytes())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{FakeVvu, SHM_SIZE};
    use crate::pci::cfg_type;

    fn driver(vectors: u16, max_queues: u32) -> VvuDriver<FakeVvu> {
        VvuDriver::new(FakeVvu::new(vectors, max_queues), 8, GuestAddress(0x1000)).unwrap()
    }

    fn message(request: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = request.to_le_bytes().to_vec();
        m.extend_from_slice(&1u32.to_le_bytes());
        m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        m.extend_from_slice(payload);
        m
    }

    #[test]
    fn capabilities_are_found() {
        let fake = FakeVvu::new(12, 8);
        let caps = VirtioCaps::parse(&fake).unwrap();
        assert_eq!((caps.common.bar, caps.device.offset), (4, 0x2000));
        assert_eq!(caps.notify_multiplier, 4);
        assert_eq!((caps.doorbells.bar, caps.doorbell_multiplier), (0, 4));
        assert_eq!(
            (caps.notification.offset, caps.notification.length),
            (0x1000, 4)
        );
        assert_eq!(
            (caps.shared_memory.bar, caps.shared_memory.length),
            (2, SHM_SIZE)
        );
        assert_eq!(caps.msix_vectors, 12);
        // Another device, or a missing capability, is refused.
        fake.state.borrow_mut().config[2] = 0x42;
        assert!(matches!(
            VirtioCaps::parse(&fake),
            Err(CapsError::WrongDevice { .. })
        ));
        let fake = FakeVvu::new(12, 8);
        fake.state.borrow_mut().config[0xa8 + 3] = 0x77; // notification cap gets another type
        assert!(matches!(
            VirtioCaps::parse(&fake),
            Err(CapsError::Missing(cfg_type::NOTIFICATION))
        ));
        let fake = FakeVvu::new(12, 8);
        fake.state.borrow_mut().config[0x41] = 0x40; // capability list loops
        assert!(matches!(
            VirtioCaps::parse(&fake),
            Err(CapsError::Malformed(_))
        ));
    }

    #[test]
    fn initialisation_negotiates_and_programs_the_device() {
        let d = driver(12, 16);
        let s = d.pci().state.borrow();
        assert_eq!(
            s.status,
            1 | 2 | 8 | 4,
            "ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK"
        );
        assert_eq!(
            s.driver_features,
            VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM
        );
        // 12 vectors: config, rxq, txq, and kicks for the first 9 of 16 vhost queues.
        assert_eq!(&s.kick_vectors[..9], &[3, 4, 5, 6, 7, 8, 9, 10, 11]);
        assert!(s.kick_vectors[9..].iter().all(|&v| v == NO_VECTOR));
        assert_eq!(s.notifies, [0], "rxq notified after posting its buffers");
        drop(s);
        assert_eq!(d.pci().rx_available(), 8, "every rx buffer posted");
        assert_eq!(d.kick_vector(2), 5);
        assert!(d.kick_event(2).is_some());
        assert_eq!(d.kick_vector(12), NO_VECTOR);
        assert!(d.kick_event(12).is_none(), "polled");
        assert_eq!(d.max_vhost_queues(), 16);
        assert_eq!(&d.uuid().unwrap(), b"0123456789abcdef");
    }

    #[test]
    fn initialisation_failures_are_errors() {
        let fake = FakeVvu::new(12, 8);
        fake.state.borrow_mut().device_features = 0;
        assert!(matches!(
            VvuDriver::new(fake, 8, GuestAddress(0x1000)),
            Err(DriverError::MissingFeature(_))
        ));
        let fake = FakeVvu::new(12, 8);
        fake.state.borrow_mut().refuse_features_ok = true;
        assert!(matches!(
            VvuDriver::new(fake, 8, GuestAddress(0x1000)),
            Err(DriverError::FeaturesRejected)
        ));
        let fake = FakeVvu::new(2, 8);
        assert!(matches!(
            VvuDriver::new(fake, 8, GuestAddress(0x1000)),
            Err(DriverError::Resources(_))
        ));
        // Rings and buffers beyond the DMA memory.
        let fake = FakeVvu::new(12, 8);
        assert!(VvuDriver::new(fake, 8, GuestAddress((4 << 20) - 0x1000)).is_err());
    }

    #[test]
    fn messages_flow_both_ways_with_buffer_recycling() {
        let mut d = driver(12, 8);
        assert_eq!(d.recv().unwrap(), None);
        // Far more messages than buffers: both queues must recycle.
        for i in 0..100u32 {
            let request = message(1, &i.to_le_bytes());
            assert!(d.pci().push_rx(&request), "no rx buffer for message {i}");
            assert_eq!(d.rx_event().read().unwrap(), 1, "rxq vector signalled");
            assert_eq!(d.recv().unwrap(), Some(request));
            let reply = message(1 | (1 << 16), &(u64::from(i) * 3).to_le_bytes());
            d.send(&reply).unwrap();
            assert_eq!(d.pci().pop_tx(), Some(reply));
        }
        assert!(matches!(
            d.send(&[0u8; BUFFER_SIZE + 1]),
            Err(DriverError::MessageTooLarge(_))
        ));
    }

    #[test]
    fn tx_buffers_run_out_until_the_device_returns_them() {
        let mut d = driver(12, 8);
        for _ in 0..8 {
            d.send(&message(2, &[])).unwrap();
        }
        assert!(matches!(d.send(&message(2, &[])), Err(DriverError::TxFull)));
        assert!(d.pci().pop_tx().is_some());
        d.send(&message(2, &[])).unwrap();
    }

    #[test]
    fn malformed_rx_messages_are_errors_and_buffers_come_back() {
        let mut d = driver(12, 8);
        // Shorter than a header.
        d.pci().push_rx_raw(&[1, 2, 3], 3);
        assert!(matches!(d.recv(), Err(DriverError::Malformed(_))));
        // Header announcing more payload than arrived.
        let mut lying = message(5, &[0; 8]);
        lying[8] = 200;
        d.pci().push_rx(&lying);
        assert!(matches!(d.recv(), Err(DriverError::Malformed(_))));
        // A used length larger than the buffer.
        d.pci()
            .push_rx_raw(&message(1, &[]), BUFFER_SIZE as u32 + 1);
        assert!(matches!(d.recv(), Err(DriverError::Malformed(_))));
        assert_eq!(d.pci().rx_available(), 8 + 3, "every buffer re-posted");
        let good = message(3, &[9; 4]);
        d.pci().push_rx(&good);
        assert_eq!(d.recv().unwrap(), Some(good));
        // A used id beyond the ring.
        d.pci().push_bogus_rx_used(200);
        assert!(matches!(
            d.recv(),
            Err(DriverError::Ring(RingError::BogusUsed(200)))
        ));
    }

    #[test]
    fn doorbells_and_backend_up() {
        let d = driver(12, 8);
        d.ring_doorbell(3).unwrap();
        d.ring_doorbell(8 + 3).unwrap(); // err doorbell of vhost queue 3
        assert_eq!(d.pci().state.borrow().doorbell_writes, [(12, 2), (44, 2)]);
        assert!(d.ring_doorbell(17).is_err(), "beyond 2N");
        // A wired eventfd rings its doorbell when signalled, until it is unwired.
        let call = EventFd::new(EFD_NONBLOCK).unwrap();
        d.wire_doorbell(5, Some(&call)).unwrap();
        assert!(d.wire_doorbell(17, Some(&call)).is_err(), "beyond 2N");
        call.write(1).unwrap();
        d.pci().deliver_signals();
        d.wire_doorbell(5, None).unwrap();
        call.write(1).unwrap();
        d.pci().deliver_signals();
        assert_eq!(
            d.pci().state.borrow().doorbell_writes,
            [(12, 2), (44, 2), (20, 2)]
        );
        assert_eq!(d.device_status().unwrap(), 0);
        d.set_backend_up(true).unwrap();
        assert_eq!(d.device_status().unwrap(), BACKEND_UP);
        d.set_backend_up(false).unwrap();
        assert_eq!(d.device_status().unwrap(), 0);
    }
}
