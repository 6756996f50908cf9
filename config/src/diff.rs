//! The difference between two valid configs, keyed by export name: what live reload applies.
//! [`diff`] says which exports were added, removed or changed; [`export_changes`] says, for
//! a changed export, which settings differ, as fields named the way `exports.yaml` writes
//! them, so a refusal can point at the line. A `size:` change is an [`ExportChange::Size`]
//! of its own: reload grows the device for it, where every other setting is refused.

use crate::validate::{Config, Device, Disk, Export, Poll, ScsiLun, Transport};

/// Exports added, removed and changed between an old and a new config.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ConfigDiff {
    /// In the new config only.
    pub added: Vec<Export>,
    /// In the old config only.
    pub removed: Vec<Export>,
    /// In both under the same name, with different settings: `(old, new)`.
    pub changed: Vec<(Export, Export)>,
}

impl ConfigDiff {
    /// True when the two configs declare the same exports.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// Computes what changed from `old` to `new`.
pub fn diff(old: &Config, new: &Config) -> ConfigDiff {
    let find = |c: &Config, name: &str| c.exports.iter().find(|e| e.name == name).cloned();
    let mut result = ConfigDiff::default();
    for export in &new.exports {
        match find(old, &export.name) {
            None => result.added.push(export.clone()),
            Some(previous) if previous != *export => {
                result.changed.push((previous, export.clone()))
            }
            Some(_) => {}
        }
    }
    for export in &old.exports {
        if find(new, &export.name).is_none() {
            result.removed.push(export.clone());
        }
    }
    result
}

/// One difference inside an export present in both configs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportChange {
    /// A setting that differs. `field` is the key as written in `exports.yaml` (`num_queues`,
    /// `path`), `lun` the position in `luns:` of the new config for a LUN's setting; `old`
    /// and `new` are the values as text, for messages.
    Setting {
        /// Key in `exports.yaml`.
        field: &'static str,
        /// Position of the LUN in the new config's `luns:` list, for LUN settings.
        lun: Option<usize>,
        /// The running value.
        old: String,
        /// The value in the file.
        new: String,
    },
    /// `size:` of a blk export or of a scsi LUN differs: the capacity the daemon maintains,
    /// in bytes (`None`: not pinned, the backing store's own size). Whether this grows or
    /// shrinks the device depends on the capacity in use, which only the daemon knows; a
    /// smaller `new` than `old` is a shrink ([`ExportChange::is_shrink`]).
    Size {
        /// Position of the LUN in the new config's `luns:` list; `None` for a blk export.
        lun: Option<usize>,
        /// The running value.
        old: Option<u64>,
        /// The value in the file.
        new: Option<u64>,
    },
    /// A scsi LUN only the new config has, with its position in `luns:`.
    LunAdded(usize, ScsiLun),
    /// A scsi LUN only the old config has.
    LunRemoved(ScsiLun),
}

impl ExportChange {
    /// The field as error messages name it: `num_queues`, `luns[2].path`, `luns`.
    pub fn field_path(&self) -> String {
        match self {
            ExportChange::Setting {
                field,
                lun: Some(i),
                ..
            } => format!("luns[{i}].{field}"),
            ExportChange::Setting { field, .. } => (*field).to_string(),
            ExportChange::Size { lun: Some(i), .. } => format!("luns[{i}].size"),
            ExportChange::Size { lun: None, .. } => "size".to_string(),
            ExportChange::LunAdded(i, _) => format!("luns[{i}]"),
            ExportChange::LunRemoved(_) => "luns".to_string(),
        }
    }

    /// A `size:` made smaller than the running one (refused: shrinking loses data).
    pub fn is_shrink(&self) -> bool {
        matches!(self, ExportChange::Size { old: Some(old), new: Some(new), .. } if new < old)
    }
}

/// Every difference between two definitions of the same export.
pub fn export_changes(old: &Export, new: &Export) -> Vec<ExportChange> {
    let mut changes = Vec::new();
    let mut sizes = Vec::new();
    let mut luns = Vec::new();
    let mut size = |lun: Option<usize>, old: &Disk, new: &Disk| {
        if old.size != new.size {
            sizes.push(ExportChange::Size {
                lun,
                old: old.size,
                new: new.size,
            });
        }
    };
    let mut setting = |field: &'static str, lun: Option<usize>, old: String, new: String| {
        if old != new {
            changes.push(ExportChange::Setting {
                field,
                lun,
                old,
                new,
            });
        }
    };
    let transport_key = |t: &Transport| match t {
        Transport::Socket(_) => "socket",
        Transport::Vvu(_) => "vvu",
    };
    if old.transport != new.transport {
        setting(
            transport_key(&new.transport),
            None,
            old.transport.to_string(),
            new.transport.to_string(),
        );
    }
    setting(
        "num_queues",
        None,
        old.num_queues.to_string(),
        new.num_queues.to_string(),
    );
    setting(
        "queue_size",
        None,
        old.queue_size.to_string(),
        new.queue_size.to_string(),
    );
    let poll = |p: &Option<Poll>| match p {
        None => "off".to_string(),
        Some(p) => format!("{{ max_us: {}, adaptive: {} }}", p.max_us, p.adaptive),
    };
    setting("poll", None, poll(&old.poll), poll(&new.poll));
    match (&old.device, &new.device) {
        (Device::Blk(a), Device::Blk(b)) => {
            disk_changes(a, b, None, &mut setting);
            size(None, a, b);
        }
        (Device::Scsi(a), Device::Scsi(b)) => {
            for (position, lun) in b.iter().enumerate() {
                match a.iter().find(|l| l.lun == lun.lun) {
                    None => luns.push(ExportChange::LunAdded(position, lun.clone())),
                    Some(previous) => {
                        let at = Some(position);
                        disk_changes(&previous.disk, &lun.disk, at, &mut setting);
                        size(at, &previous.disk, &lun.disk);
                        setting(
                            "rotational",
                            at,
                            previous.rotational.to_string(),
                            lun.rotational.to_string(),
                        );
                        setting(
                            "wwn",
                            at,
                            format!("{:#x}", previous.wwn),
                            format!("{:#x}", lun.wwn),
                        );
                    }
                }
            }
            for lun in a {
                if !b.iter().any(|l| l.lun == lun.lun) {
                    luns.push(ExportChange::LunRemoved(lun.clone()));
                }
            }
        }
        (a, b) => setting("type", None, kind(a).into(), kind(b).into()),
    }
    changes.extend(sizes);
    changes.extend(luns);
    changes
}

fn kind(device: &Device) -> &'static str {
    match device {
        Device::Blk(_) => "blk",
        Device::Scsi(_) => "scsi",
    }
}

/// The settings of one backing store that differ, but `size` (an [`ExportChange::Size`]).
fn disk_changes(
    old: &Disk,
    new: &Disk,
    lun: Option<usize>,
    setting: &mut impl FnMut(&'static str, Option<usize>, String, String),
) {
    let path = |d: &Disk| d.path.display().to_string();
    setting("path", lun, path(old), path(new));
    setting(
        "format",
        lun,
        format!("{:?}", old.format),
        format!("{:?}", new.format),
    );
    setting(
        "rbd",
        lun,
        format!("{:?}", old.rbd),
        format!("{:?}", new.rbd),
    );
    setting(
        "readonly",
        lun,
        old.readonly.to_string(),
        new.readonly.to_string(),
    );
    setting(
        "logical_block_size",
        lun,
        old.logical_block_size.to_string(),
        new.logical_block_size.to_string(),
    );
    setting("serial", lun, old.serial.clone(), new.serial.clone());
    setting(
        "direct",
        lun,
        old.direct.to_string(),
        new.direct.to_string(),
    );
    setting(
        "write_cache",
        lun,
        format!("{:?}", old.write_cache),
        format!("{:?}", new.write_cache),
    );
    setting(
        "create",
        lun,
        format!("{:?}", old.create),
        format!("{:?}", new.create),
    );
}
