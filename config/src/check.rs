//! Checks of a valid config against the machine, which validation proper does not do: a
//! backing file that must exist (no `create:`) does, and two spellings of one file or
//! socket are caught. Used by `check-config` and, for the
//! exports and LUNs a reload adds, by live reload; errors name file, line, export and field.

use std::path::Path;

use crate::locate::LineIndex;
use crate::validate::{Config, ConfigError};

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

/// Backing files that neither exist nor have `create:` (RBD images are not checked: that
/// needs the cluster), for the exports `wanted` accepts
/// (by name; `None` for a blk export, `Some(lun)` for a scsi LUN).
pub fn missing_backing_files(
    config: &Config,
    text: &str,
    file: &Path,
    wanted: impl Fn(&str, Option<u16>) -> bool,
) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    for (index, export) in config.exports.iter().enumerate() {
        for slot in export.disk_slots() {
            let disk = slot.disk;
            if disk.create.is_some()
                || disk.rbd.is_some()
                || !wanted(&export.name, slot.lun)
                || disk.path.exists()
            {
                continue;
            }
            errors.push(path_error(
                file,
                text,
                index,
                export,
                &slot,
                format!(
                    "{} does not exist (give create: {{ size: ... }} to create it)",
                    disk.path.display()
                ),
            ));
        }
    }
    errors
}

/// Backing files and sockets that different spellings (a symlink, `..`, a relative path)
/// make the same: two writable exports on one file, or two exports on one socket. Text
/// comparison in validation cannot see these; the file system can, for what exists.
pub fn aliased_paths(config: &Config, text: &str, file: &Path) -> Vec<ConfigError> {
    use std::os::unix::fs::MetadataExt;
    let mut errors = Vec::new();
    // (device, inode) of each existing backing file, with who uses it.
    let mut seen: Vec<((u64, u64), String, bool)> = Vec::new();
    let mut sockets: Vec<(std::path::PathBuf, String)> = Vec::new();
    for (index, export) in config.exports.iter().enumerate() {
        for slot in export.disk_slots() {
            let disk = slot.disk;
            let Ok(meta) = std::fs::metadata(&disk.path) else {
                continue;
            };
            let key = (meta.dev(), meta.ino());
            let who = match slot.position {
                Some(i) => format!("export {:?} luns[{i}]", export.name),
                None => format!("export {:?}", export.name),
            };
            if let Some((_, other, other_ro)) = seen.iter().find(|(k, ..)| *k == key) {
                if !(disk.readonly && *other_ro) {
                    errors.push(path_error(
                        file,
                        text,
                        index,
                        export,
                        &slot,
                        format!(
                            "{} is the same file as the backing file of {other}; two exports may share a backing file only if both are read-only",
                            disk.path.display()
                        ),
                    ));
                }
                continue;
            }
            seen.push((key, who, disk.readonly));
        }
        if let crate::Transport::Socket(path) = &export.transport {
            let real = match (path.parent(), path.file_name()) {
                (Some(dir), Some(name)) => std::fs::canonicalize(dir)
                    .map(|d| d.join(name))
                    .unwrap_or_else(|_| path.clone()),
                _ => path.clone(),
            };
            if let Some((_, other)) = sockets.iter().find(|(p, _)| *p == real) {
                errors.push(ConfigError {
                    file: file.to_path_buf(),
                    line: field_line(text, index, None, "socket"),
                    export: Some(export.name.clone()),
                    field: Some("socket".into()),
                    message: format!(
                        "{} is the same socket as export {other:?}'s",
                        path.display()
                    ),
                });
            } else {
                sockets.push((real, export.name.clone()));
            }
        }
    }
    errors
}

/// An error about the `path` of disk `slot` of export `export` (number `index` in `text`).
fn path_error(
    file: &Path,
    text: &str,
    index: usize,
    export: &crate::Export,
    slot: &crate::DiskSlot<'_>,
    message: String,
) -> ConfigError {
    ConfigError {
        file: file.to_path_buf(),
        line: field_line(text, index, slot.position, "path"),
        export: Some(export.name.clone()),
        field: Some(slot.field("path")),
        message,
    }
}
