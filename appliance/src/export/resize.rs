//! Online resize of a running export: the capacity its device presents, the size of its
//! backing stores, checking a `size:` before a reload applies it, and growing the device
//! ([`RunningExport::resize`]) and telling the frontend. Also growing a backing store to
//! `size:` ([`apply_size`]; shrinking is always refused).

use anyhow::{anyhow, bail, Context};

use super::{DeviceHandle, ExportDisk, RunningExport};
use targets::disk::Disk;

/// What [`RunningExport::resize`] did to a device's capacity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resized {
    /// Capacity before, in bytes.
    pub old: u64,
    /// Capacity now, in bytes.
    pub new: u64,
    /// How the frontend was told, as a phrase for the log.
    pub notified: String,
}

impl RunningExport {
    fn disk(&self, lun: Option<u16>) -> anyhow::Result<&ExportDisk> {
        self.disks
            .iter()
            .find(|d| d.lun == lun)
            .ok_or_else(|| anyhow!("export {} has no LUN {lun:?}", self.name))
    }

    /// The capacity the device presents for `lun` (`None` for a blk export), in bytes.
    pub fn capacity(&self, lun: Option<u16>) -> anyhow::Result<u64> {
        let disk = self.disk(lun)?;
        match (&self.device, lun) {
            (DeviceHandle::Blk(d), None) => Ok(d.capacity_bytes()),
            (DeviceHandle::Scsi(d), Some(id)) => d
                .luns()
                .find(id)
                .map(|l| l.lun.emulation.blocks() * disk.block_size)
                .ok_or_else(|| anyhow!("export {} has no LUN {id}", self.name)),
            _ => bail!("export {}: LUN {lun:?} is not one of its device", self.name),
        }
    }

    /// The size of the backing store of `lun` now, in bytes (it may have grown underneath).
    pub fn store_size(&self, lun: Option<u16>) -> anyhow::Result<u64> {
        let disk = self.disk(lun)?;
        disk.backing
            .current_size()
            .with_context(|| format!("cannot read the size of {}", disk.backing.path().display()))
    }

    /// Whether `size:` `bytes` can be applied to `lun` without shrinking it: refused when the
    /// backing store is larger, or when it is a block device that would need to grow.
    pub fn check_size(&self, lun: Option<u16>, bytes: u64) -> Result<(), SizeRefusal> {
        let disk = self.disk(lun).map_err(SizeRefusal::NoSuchDisk)?;
        let store = disk
            .backing
            .current_size()
            .map_err(SizeRefusal::StoreSize)?;
        if bytes < store {
            return Err(SizeRefusal::Shrink { bytes, store });
        }
        if bytes > store && disk.backing.info().is_block_device {
            return Err(SizeRefusal::BlockDevice {
                path: disk.backing.path().to_path_buf(),
                store,
            });
        }
        Ok(())
    }

    /// Online resize of `lun` (`None` for a blk export): with `size` (`size:` in bytes), the
    /// backing store is grown to it first (a smaller size is refused: shrinking is); without,
    /// the device follows the store, which may have grown underneath. The capacity becomes
    /// the store's size rounded down to the logical block size, and the frontend is told:
    /// virtio-blk by VHOST_USER_BACKEND_CONFIG_CHANGE_MSG on its backend channel, SCSI by
    /// CAPACITY DATA HAS CHANGED (and a parameter-change event). Returns what changed, or
    /// `None` when the capacity already was that (a capacity never shrinks).
    pub fn resize(&self, lun: Option<u16>, size: Option<u64>) -> anyhow::Result<Option<Resized>> {
        let disk = self.disk(lun)?;
        if let Some(bytes) = size {
            apply_size(&*disk.backing, bytes)?;
        }
        let target = match size {
            Some(bytes) => bytes,
            None => self.store_size(lun)?,
        } / disk.block_size
            * disk.block_size;
        let old = match (&self.device, lun) {
            (DeviceHandle::Blk(d), None) => d.grow_capacity(target),
            (DeviceHandle::Scsi(d), Some(id)) => {
                let blocks = d
                    .grow_lun(id, target / disk.block_size)
                    .ok_or_else(|| anyhow!("export {} has no LUN {id}", self.name))?;
                blocks * disk.block_size
            }
            _ => bail!("export {}: LUN {lun:?} is not one of its device", self.name),
        };
        if target <= old {
            return Ok(None);
        }
        let notified = match &self.device {
            DeviceHandle::Scsi(_) => {
                "frontend told by the unit attention CAPACITY DATA HAS CHANGED (and a parameter-change event where the driver takes them)".to_string()
            }
            DeviceHandle::Blk(_) => match self.connection.channel.config_changed() {
                Ok(true) => "frontend told by CONFIG_CHANGE_MSG on the backend channel".to_string(),
                Ok(false) => {
                    "no backend channel to tell a frontend: it sees the capacity when it reads the config space again".to_string()
                }
                Err(e) => {
                    tracing::warn!(export = self.name, "telling the frontend of the new capacity failed: {e}");
                    format!("telling the frontend failed: CONFIG_CHANGE_MSG: {e}")
                }
            },
        };
        Ok(Some(Resized {
            old,
            new: target,
            notified,
        }))
    }
}

/// Makes the store hold `size` bytes (`size:`): grows a smaller one (a raw file by
/// `ftruncate`, a qcow2 image through imago), refuses a larger one (shrinking is refused)
/// and a block device that would have to grow (its owner grows it).
pub(super) fn apply_size(disk: &dyn Disk, size: u64) -> anyhow::Result<()> {
    let path = disk.path().display();
    let store = disk
        .current_size()
        .with_context(|| format!("cannot read the size of {path}"))?;
    if size < store {
        bail!("size: {size} is smaller than the backing store {path} ({store} bytes): shrinking is refused");
    }
    if size > store {
        disk.grow(size)
            .with_context(|| format!("cannot grow {path} from {store} to {size} bytes"))?;
        tracing::info!(path = %path, old = store, new = size, "backing store grown to size:");
    }
    Ok(())
}

/// Why a `size:` cannot be applied to a running export or LUN (the running size stays).
#[derive(Debug, thiserror::Error)]
pub enum SizeRefusal {
    /// The export has no such disk.
    #[error("{0}")]
    NoSuchDisk(anyhow::Error),
    /// The backing store's size cannot be read.
    #[error("cannot read the size of the backing store: {0}")]
    StoreSize(std::io::Error),
    /// `size:` is below the backing store: shrinking is refused.
    #[error("{bytes} is smaller than the backing store ({store} bytes): shrinking is refused; the running size stays")]
    Shrink {
        /// `size:` in bytes.
        bytes: u64,
        /// The store's size in bytes.
        store: u64,
    },
    /// The store is a block device, which its owner grows (the daemon does not).
    #[error("{} is a block device of {store} bytes: it is grown by its owner (e.g. lvextend), then picked up at the next reload; the running size stays", path.display())]
    BlockDevice {
        /// The device node.
        path: std::path::PathBuf,
        /// Its size in bytes.
        store: u64,
    },
}
