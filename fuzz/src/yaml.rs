//! `exports_yaml`: `exports.yaml` text through the config crate the way `check-config` and
//! a live reload take it: parse and validate ([`config::parse_str`]), the checks against
//! the machine ([`config::missing_backing_files`], [`config::aliased_paths`]), every error
//! formatted with its line, and, when the input holds two valid files, the reload diff
//! ([`config::diff`], [`config::export_changes`]) with the line of each changed field.
//!
//! Input: the old file's text, a NUL byte, the new file's text (no NUL: one file). Bytes
//! that are not UTF-8 are replaced, as a reader of the file would get an error for them
//! before the parser sees them.

use std::path::Path;

use crate::scratch;

/// Runs one input.
pub fn run(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (old, new) = match text.split_once('\0') {
        Some((old, new)) => (old, Some(new)),
        None => (&*text, None),
    };
    let base = scratch::dir();
    let file = base.join("exports.yaml");
    let old_config = check(old, &file, base);
    let Some(new) = new else {
        return;
    };
    let new_config = check(new, &file, base);
    if let (Some(old_config), Some(new_config)) = (old_config, new_config) {
        let diff = config::diff(&old_config, &new_config);
        let _ = diff.is_empty();
        for (before, after) in &diff.changed {
            let index = new_config
                .exports
                .iter()
                .position(|e| e.name == after.name)
                .unwrap_or(0);
            for change in config::export_changes(before, after) {
                let _ = change.is_shrink();
                let field = change.field_path();
                let _ = config::field_line(new, index, None, &field);
            }
        }
    }
}

/// What `check-config` does with one file; the config if it is valid.
fn check(text: &str, file: &Path, base: &Path) -> Option<config::Config> {
    match config::parse_str(text, file, base) {
        Err(e) => {
            let _ = e.to_string();
            None
        }
        Ok(config) => {
            for e in config::missing_backing_files(&config, text, file, |_, _| true)
                .iter()
                .chain(&config::aliased_paths(&config, text, file))
            {
                let _ = e.to_string();
            }
            for (index, export) in config.exports.iter().enumerate() {
                for field in ["path", "socket", "size", "luns", "num_queues"] {
                    let _ = config::field_line(text, index, None, field);
                }
                for slot in export.disk_slots() {
                    let _ = config::field_line(text, index, slot.position, "path");
                    let _ = slot.field("path");
                }
            }
            Some(config)
        }
    }
}

/// The shipped example (`config/examples/exports.yaml`).
const EXAMPLE: &str = include_str!("../../config/examples/exports.yaml");

/// Every export kind and setting, valid.
const FULL: &str = "\
state_dir: /var/lib/vhost-appliance
metrics:
  listen: 127.0.0.1:9410
socket_permissions:
  mode: \"0660\"
  owner: root
  group: kvm
exports:
  - name: vol0
    type: blk
    socket: /run/vhost-appliance/vol0.sock
    path: /var/lib/vhost-appliance/vol0.raw
    format: raw
    create: { size: 1G }
    size: 2G
    num_queues: 4
    queue_size: 256
    logical_block_size: 4096
    serial: vol0-serial
    direct: true
    write_cache: writethrough
    readonly: false
    poll: { max_us: 50, adaptive: true }
  - name: img
    type: blk
    socket: /run/vhost-appliance/img.sock
    path: /var/lib/vhost-appliance/img.qcow2
    format: qcow2
    create: { size: 10G, backing: base.qcow2 }
  - name: disks
    type: scsi
    socket: /run/vhost-appliance/disks.sock
    num_queues: 2
    luns:
      - lun: 0
        path: /var/lib/vhost-appliance/l0.raw
        create: { size: 512M }
        wwn: \"0x5000123456789abc\"
        rotational: true
      - lun: 3
        path: /var/lib/vhost-appliance/l3.qcow2
        format: qcow2
        readonly: true
        logical_block_size: 512
        write_cache: writeback
      - lun: 4
        format: rbd
        rbd: { pool: rbd, namespace: ns, image: lun4, client_id: admin, io_timeout: 30 }
  - name: bench
    type: blk
    socket: /run/vhost-appliance/bench.sock
    format: null
    create: { size: 1T }
  - name: guest
    type: blk
    vvu: \"0000:00:10.0\"
    path: /var/lib/vhost-appliance/guest.raw
    create: { size: 1G }
";

/// The seeds: each file alone, and reload pairs (settings changed, grown, LUNs added and
/// removed, exports added and removed).
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let grown = FULL
        .replace("size: 2G", "size: 3G")
        .replace("num_queues: 4", "num_queues: 8")
        .replace("      - lun: 4\n", "      - lun: 5\n")
        .replace("  - name: bench", "  - name: bench2");
    let pair = |a: &str, b: &str| format!("{a}\0{b}").into_bytes();
    vec![
        ("example".into(), EXAMPLE.as_bytes().to_vec()),
        ("full".into(), FULL.as_bytes().to_vec()),
        ("empty".into(), b"exports: []\n".to_vec()),
        ("reload-example-full".into(), pair(EXAMPLE, FULL)),
        ("reload-grown".into(), pair(FULL, &grown)),
        ("reload-shrunk".into(), pair(&grown, FULL)),
    ]
}
