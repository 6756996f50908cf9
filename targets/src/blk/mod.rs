//! virtio-blk: feature bits, config space, and per-queue request handling.
//!
//! [`BlkDevice`] (here) holds what all queues of one export share (settings, the
//! guest-visible write cache mode, negotiated features). [`BlkQueue`] (`blk/queue.rs`)
//! turns descriptor chains into [`crate::disk::DiskOp`]s on the shared request layer, and
//! reports finished requests as [`Completed`] `(head, used_len)` pairs for the transport to
//! put on the used ring. Requests it refuses, and requests whose I/O fails, are answered
//! with the status [`BlkError::status`] gives (`blk/status.rs`: the spec's, else QEMU's),
//! never a panic; chains without a writable status byte are returned with used length 0.
//!
//! The capacity can grow while queues run ([`BlkDevice::grow_capacity`], online resize):
//! it is one atomic that range checks and the config space read without a lock. Telling
//! the driver (a configuration change notification, virtio 1.2 §2.5.2 / §5.2.6) is the
//! transport's part.

mod queue;
mod statuses;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

pub use self::queue::BlkQueue;
pub use self::statuses::{status, BlkError, Refusal};
pub use crate::chain::Memory;
use crate::device::VirtioDevice;
pub use crate::device::{Completed, ConfigWriteError};
use crate::disk::{BlockSizeError, DiskInfo};
pub use crate::guest::GuestRam;

/// virtio-blk sectors are always 512 bytes, whatever the logical block size.
pub const SECTOR_SIZE: u64 = 512;
/// Size of `struct virtio_blk_config` up to and including `write_zeroes_may_unmap`.
pub const CONFIG_SPACE_SIZE: usize = 60;
/// Offset of the `writeback` byte in the config space.
const CONFIG_WRITEBACK_OFFSET: usize = 32;
/// Largest single data segment advertised (SIZE_MAX).
pub const SIZE_MAX: u32 = 256 * 1024;
/// Cap on data descriptors per request (SEG_MAX).
pub const MAX_SEGMENTS: u32 = 254;
/// Sectors a single discard / write-zeroes segment may cover (1 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// Segments per discard / write-zeroes request.
pub const MAX_DISCARD_SEGMENTS: u32 = 1;
/// Size of `struct virtio_blk_discard_write_zeroes`.
const DISCARD_SEGMENT_SIZE: usize = 16;
/// Size of `struct virtio_blk_outhdr`.
const HEADER_SIZE: usize = 16;
/// Physical block size reported in the topology (4 KiB, as modern disks).
const PHYSICAL_BLOCK_SIZE: u32 = 4096;

/// Settings of one virtio-blk export.
#[derive(Debug, Clone)]
pub struct BlkSettings {
    /// 512 or 4096.
    pub logical_block_size: u32,
    /// Refuse writes (advertises VIRTIO_BLK_F_RO).
    pub readonly: bool,
    /// GET_ID answer (≤ 20 bytes).
    pub serial: String,
    /// Virtqueues offered.
    pub num_queues: u16,
    /// Maximum virtqueue size.
    pub queue_size: u16,
    /// Initial write cache mode: true = writeback.
    pub writeback: bool,
    /// Where the driver's write cache choice (a config write of `writeback`) is kept across
    /// daemon restarts; `None` keeps it in memory only. A vhost-user frontend reads the
    /// config space once and never again (QEMU caches it and does not re-send it when it
    /// reconnects), so a restarted daemon must come back in the mode the driver chose, or a
    /// guest that set writethrough would get a volatile cache it does not know about.
    pub writeback_state: Option<PathBuf>,
}

/// Why an export cannot be served with the given settings and disk.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The disk cannot back blocks of the configured size (O_DIRECT alignment, or too
    /// small).
    #[error(transparent)]
    BlockSize(#[from] BlockSizeError),
    /// A writable export on a read-only disk.
    #[error("the export is writable but the backing file was opened read-only")]
    ReadonlyDisk,
}

/// State shared by all queues of one virtio-blk export.
#[derive(Debug)]
pub struct BlkDevice {
    settings: BlkSettings,
    /// The disk as opened (its `size` is the size at open; the capacity may grow since).
    disk: DiskInfo,
    /// Exported size in bytes, a multiple of the logical block size; only ever grows.
    capacity_bytes: AtomicU64,
    writeback: AtomicBool,
    acked_features: AtomicU64,
}

impl BlkDevice {
    /// Checks the settings against the opened disk.
    pub fn new(settings: BlkSettings, disk: DiskInfo) -> Result<Self, SettingsError> {
        let lbs = u64::from(settings.logical_block_size);
        disk.check_block_size(settings.logical_block_size)?;
        if disk.readonly && !settings.readonly {
            return Err(SettingsError::ReadonlyDisk);
        }
        let capacity_bytes = disk.size / lbs * lbs;
        let writeback = match &settings.writeback_state {
            Some(path) => saved_writeback(path, settings.writeback),
            None => settings.writeback,
        };
        Ok(BlkDevice {
            writeback: AtomicBool::new(writeback),
            settings,
            disk,
            capacity_bytes: AtomicU64::new(capacity_bytes),
            acked_features: AtomicU64::new(0),
        })
    }

    /// Settings as configured.
    pub fn settings(&self) -> &BlkSettings {
        &self.settings
    }

    /// Exported size in bytes: the backing size at open rounded down to the logical block
    /// size, or what [`BlkDevice::grow_capacity`] made it since.
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_bytes.load(Ordering::Acquire)
    }

    /// Grows the exported size to `bytes` rounded down to the logical block size, for a
    /// backing store that has grown to at least that (online resize). Requests are checked
    /// against the new size from now on; the config space's `capacity` (512-byte sectors)
    /// reports it. A size at or below the current one changes nothing: the capacity never
    /// shrinks under a driver. Returns the previous capacity in bytes.
    pub fn grow_capacity(&self, bytes: u64) -> u64 {
        let lbs = u64::from(self.settings.logical_block_size);
        self.capacity_bytes
            .fetch_max(bytes / lbs * lbs, Ordering::AcqRel)
    }

    /// Most data descriptors per request: the ring minus header and status, capped so one
    /// request stays at most `MAX_SEGMENTS * SIZE_MAX` bytes.
    pub fn seg_max(&self) -> u32 {
        u32::from(self.settings.queue_size)
            .saturating_sub(2)
            .clamp(1, MAX_SEGMENTS)
    }

    /// Largest data transfer per request.
    pub fn max_request_bytes(&self) -> u64 {
        u64::from(self.seg_max()) * u64::from(SIZE_MAX)
    }

    /// virtio feature bits offered (without the vhost-user PROTOCOL_FEATURES bit).
    pub fn features(&self) -> u64 {
        let mut bits = vec![
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_TOPOLOGY,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_CONFIG_WCE,
            VIRTIO_BLK_F_MQ,
        ];
        if self.settings.readonly {
            bits.push(VIRTIO_BLK_F_RO);
        } else {
            bits.push(VIRTIO_BLK_F_DISCARD);
            // Zeroing is done by fallocate; without it the driver writes zeroes itself.
            if self.disk.deallocate_zeroes {
                bits.push(VIRTIO_BLK_F_WRITE_ZEROES);
            }
        }
        bits.into_iter().fold(0, |acc, bit| acc | (1u64 << bit))
    }

    /// Records the features the driver accepted.
    pub fn set_acked_features(&self, features: u64) {
        self.acked_features.store(features, Ordering::Relaxed);
    }

    /// Whether writes may complete before they are durable (virtio spec 5.2.6.3).
    pub fn writeback_enabled(&self) -> bool {
        let acked = self.acked_features.load(Ordering::Relaxed);
        // A driver that cannot flush never gets a volatile cache (virtio 1.2 5.2.5.1:
        // with CONFIG_WCE but not FLUSH, writeback must be 0).
        if acked & (1 << VIRTIO_BLK_F_FLUSH) == 0 {
            false
        } else if acked & (1 << VIRTIO_BLK_F_CONFIG_WCE) != 0 {
            self.writeback.load(Ordering::Relaxed)
        } else {
            true
        }
    }

    /// `struct virtio_blk_config` as the guest reads it.
    pub fn config_space(&self) -> [u8; CONFIG_SPACE_SIZE] {
        let lbs = self.settings.logical_block_size;
        let mut c = [0u8; CONFIG_SPACE_SIZE];
        let mut put = |off: usize, bytes: &[u8]| c[off..off + bytes.len()].copy_from_slice(bytes);
        put(0, &(self.capacity_bytes() / SECTOR_SIZE).to_le_bytes());
        put(8, &SIZE_MAX.to_le_bytes());
        put(12, &self.seg_max().to_le_bytes());
        // geometry (16..20) left zero: not offered.
        put(20, &lbs.to_le_bytes());
        let physical_exp = (PHYSICAL_BLOCK_SIZE.max(lbs) / lbs).trailing_zeros() as u8;
        put(24, &[physical_exp, 0]);
        put(26, &1u16.to_le_bytes()); // min_io_size, in logical blocks
        put(28, &0u32.to_le_bytes()); // opt_io_size: none
        put(
            CONFIG_WRITEBACK_OFFSET,
            &[u8::from(self.writeback.load(Ordering::Relaxed)), 0],
        );
        put(34, &self.settings.num_queues.to_le_bytes());
        let sector_align = (lbs / SECTOR_SIZE as u32).max(1);
        put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(40, &MAX_DISCARD_SEGMENTS.to_le_bytes());
        put(44, &sector_align.to_le_bytes());
        put(48, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(52, &MAX_DISCARD_SEGMENTS.to_le_bytes());
        put(56, &[1]); // write_zeroes_may_unmap
        c
    }

    /// Applies a driver write to the config space. Only the `writeback` byte is writable.
    pub fn write_config(&self, offset: u32, data: &[u8]) -> Result<(), ConfigWriteError> {
        if offset as usize == CONFIG_WRITEBACK_OFFSET && data.len() == 1 {
            match data[0] {
                0 | 1 => {
                    let writeback = data[0] == 1;
                    // Kept before it is acknowledged: a crash in between leaves the
                    // frontend's cached config and the saved mode as before.
                    if let Some(path) = &self.settings.writeback_state {
                        save_writeback(path, self.settings.writeback, writeback)
                            .map_err(|e| ConfigWriteError::NotSaved(e.to_string()))?;
                    }
                    self.writeback.store(writeback, Ordering::Relaxed);
                    Ok(())
                }
                v => Err(ConfigWriteError::BadValue(v)),
            }
        } else {
            Err(ConfigWriteError::ReadOnlyField {
                offset,
                len: data.len(),
            })
        }
    }
}

impl VirtioDevice for BlkDevice {
    fn num_queues(&self) -> usize {
        usize::from(self.settings.num_queues)
    }

    fn max_queue_size(&self) -> u16 {
        self.settings.queue_size
    }

    fn features(&self) -> u64 {
        BlkDevice::features(self)
    }

    fn set_acked_features(&self, features: u64) {
        BlkDevice::set_acked_features(self, features)
    }

    fn config_space(&self) -> Vec<u8> {
        BlkDevice::config_space(self).to_vec()
    }

    fn write_config(&self, offset: u32, data: &[u8]) -> Result<(), ConfigWriteError> {
        BlkDevice::write_config(self, offset, data)
    }

    fn lun_capacities(&self) -> Vec<(u16, u64)> {
        vec![(0, self.capacity_bytes())]
    }
}

/// The driver's saved write cache choice at `path`, if it was made under the same
/// configured default (`configured`); otherwise (none saved, or the operator changed the
/// default since) the default. The file holds `configured chosen`, each 0 or 1.
fn saved_writeback(path: &Path, configured: bool) -> bool {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return configured,
        Err(e) => {
            tracing::warn!(path = %path.display(), "cannot read the saved write cache mode: {e}");
            return configured;
        }
    };
    match text.split_whitespace().collect::<Vec<_>>().as_slice() {
        [saved_default, chosen] if *saved_default == if configured { "1" } else { "0" } => {
            let chosen = *chosen == "1";
            if chosen != configured {
                tracing::info!(
                    path = %path.display(),
                    writeback = chosen,
                    "the driver's write cache choice, saved before a restart, applies"
                );
            }
            chosen
        }
        _ => configured,
    }
}

/// Saves the driver's write cache choice durably (written aside, synced, renamed over).
fn save_writeback(path: &Path, configured: bool, chosen: bool) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("new");
    let mut f = std::fs::File::create(&tmp)?;
    writeln!(f, "{} {}", u8::from(configured), u8::from(chosen))?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
