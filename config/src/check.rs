//! Checks of a valid config against the machine, which validation proper does not do: a
//! backing file that must exist (no `create:`) does. Used by `check-config` and, for the
//! exports and LUNs a reload adds, by live reload; errors name file, line, export and field.

use std::path::Path;

use crate::locate::LineIndex;
use crate::validate::{Config, ConfigError, Device};

/// 1-based line of `field` of export `export_index` in `text` (of LUN position `lun` of it
/// for LUN settings), falling back to the export's or LUN's own line.
pub fn field_line(
    text: &str,
    export_index: usize,
    lun: Option<usize>,
    field: &str,
) -> Option<usize> {
    let index = LineIndex::new(text);
    match lun {
        Some(position) => index.lun_field_line(export_index, position, field),
        None => index.field_line(export_index, field),
    }
}

/// Backing files that neither exist nor have `create:`, for the exports `wanted` accepts
/// (by name; `None` for a blk export, `Some(lun)` for a scsi LUN).
pub fn missing_backing_files(
    config: &Config,
    text: &str,
    file: &Path,
    wanted: impl Fn(&str, Option<u16>) -> bool,
) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    for (index, export) in config.exports.iter().enumerate() {
        let disks: Vec<(Option<usize>, Option<u16>, &crate::Disk)> = match &export.device {
            Device::Blk(d) => vec![(None, None, d)],
            Device::Scsi(luns) => luns
                .iter()
                .enumerate()
                .map(|(i, l)| (Some(i), Some(l.lun), &l.disk))
                .collect(),
        };
        for (position, lun, disk) in disks {
            if disk.create.is_some() || !wanted(&export.name, lun) || disk.path.exists() {
                continue;
            }
            let field = match position {
                Some(i) => format!("luns[{i}].path"),
                None => "path".to_string(),
            };
            errors.push(ConfigError {
                file: file.to_path_buf(),
                line: field_line(text, index, position, "path"),
                export: Some(export.name.clone()),
                field: Some(field),
                message: format!(
                    "{} does not exist (give create: {{ size: ... }} to create it)",
                    disk.path.display()
                ),
            });
        }
    }
    errors
}
