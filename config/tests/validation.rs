//! exports.yaml validation: good files load, broken files give errors naming file, line,
//! export and field.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use config::{diff, parse_str, ConfigError, Device, Disk, Transport, VvuDevice, WriteCache};

fn parse(text: &str) -> Result<config::Config, ConfigError> {
    parse_str(text, Path::new("exports.yaml"), Path::new("/etc/appliance"))
}

fn blk(e: &config::Export) -> &Disk {
    match &e.device {
        Device::Blk(d) => d,
        other => panic!("not a blk export: {other:?}"),
    }
}

fn parse_err(text: &str) -> ConfigError {
    match parse(text) {
        Ok(c) => panic!("expected an error, got {c:?}"),
        Err(e) => e,
    }
}

const TWO_EXPORTS: &str = "\
state_dir: /var/lib/x
exports:
  - name: a
    type: blk
    socket: /run/a.sock
    path: /data/a.raw
  - name: b
    type: blk
    socket: /run/b.sock
    path: b.raw
    readonly: true
    num_queues: 4
    write_cache: writethrough
";

#[test]
fn example_config_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/exports.yaml");
    let cfg = config::load_file(&path).unwrap();
    assert_eq!(cfg.exports.len(), 1);
    let vol0 = &cfg.exports[0];
    assert_eq!(vol0.name, "vol0");
    assert_eq!(vol0.num_queues, 4);
    assert_eq!(blk(vol0).create.as_ref().map(|c| c.size), Some(1 << 30));
    assert_eq!(cfg.socket_permissions.mode, 0o660);
    assert_eq!(cfg.metrics_listen.map(|a| a.port()), Some(9410));
}

#[test]
fn defaults_and_relative_paths() {
    let cfg = parse(TWO_EXPORTS).unwrap();
    let a = &cfg.exports[0];
    assert_eq!(a.num_queues, 1);
    assert_eq!(a.queue_size, 256);
    let d = blk(a);
    assert_eq!(d.logical_block_size, 512);
    assert!(d.direct);
    assert!(!d.readonly);
    assert_eq!(d.write_cache, WriteCache::Writeback);
    assert_eq!(d.serial, "a");
    let b = blk(&cfg.exports[1]);
    assert_eq!(b.path, Path::new("/etc/appliance/b.raw"));
    assert_eq!(b.write_cache, WriteCache::Writethrough);
    assert!(b.readonly);
}

#[test]
fn unknown_field_names_line() {
    let e = parse_err("exports:\n  - name: a\n    type: blk\n    sokcet: /run/a.sock\n");
    assert_eq!(e.line, Some(4), "{e}");
    assert!(e.to_string().contains("unknown field `sokcet`"), "{e}");
    assert!(e.to_string().starts_with("exports.yaml:4"), "{e}");
}

#[test]
fn duplicate_socket_names_both_exports() {
    let text = TWO_EXPORTS.replace("/run/b.sock", "/run/a.sock");
    let e = parse_err(&text);
    assert_eq!(e.export.as_deref(), Some("b"));
    assert_eq!(e.field.as_deref(), Some("socket"));
    assert_eq!(e.line, Some(9));
    let text = e.to_string();
    assert!(text.contains("duplicate socket /run/a.sock"), "{text}");
    assert!(text.contains("\"a\" (line 3)"), "{text}");
}

#[test]
fn duplicate_name_and_shared_writable_path_are_refused() {
    let e = parse_err(&TWO_EXPORTS.replace("name: b", "name: a"));
    assert_eq!(e.field.as_deref(), Some("name"));
    let e = parse_err(
        &TWO_EXPORTS
            .replace("path: b.raw", "path: /data/a.raw")
            .replace("readonly: true", "readonly: false"),
    );
    assert_eq!(e.field.as_deref(), Some("path"));
    // Two readonly exports may share a file.
    let shared_ro = TWO_EXPORTS
        .replace("path: b.raw", "path: /data/a.raw")
        .replace(
            "    path: /data/a.raw\n  - name: b",
            "    path: /data/a.raw\n    readonly: true\n  - name: b",
        );
    assert!(parse(&shared_ro).is_ok());
}

#[test]
fn bad_values_name_their_field() {
    let cases = [
        ("num_queues: 4", "num_queues: 0", "num_queues"),
        ("num_queues: 4", "num_queues: 65", "num_queues"),
        ("num_queues: 4", "queue_size: 100", "queue_size"),
        (
            "num_queues: 4",
            "logical_block_size: 1024",
            "logical_block_size",
        ),
        (
            "num_queues: 4",
            "serial: \"this serial is much too long\"",
            "serial",
        ),
        (
            "write_cache: writethrough",
            "write_cache: sometimes",
            "write_cache",
        ),
        (
            "type: blk\n    socket: /run/b",
            "type: nvme\n    socket: /run/b",
            "type",
        ),
        ("path: b.raw", "path: b.raw\n    format: vmdk", "format"),
        (
            "path: b.raw",
            "path: b.raw\n    create: { size: 1M, backing: base.raw }",
            "create",
        ),
        (
            "path: b.raw",
            "path: b.raw\n    create: { size: 1X }",
            "create",
        ),
        (
            "path: b.raw",
            "path: b.raw\n    create: { size: 1000 }",
            "create",
        ),
        ("name: b", "name: \"b/../c\"", "name"),
    ];
    for (from, to, field) in cases {
        let text = TWO_EXPORTS.replace(from, to);
        assert_ne!(text, TWO_EXPORTS, "replacement of {from:?} did not apply");
        let e = parse_err(&text);
        assert_eq!(e.field.as_deref(), Some(field), "{to}: {e}");
        assert!(e.line.is_some(), "{to}: {e}");
    }
}

#[test]
fn missing_required_fields() {
    let e = parse_err("exports:\n  - name: a\n    type: blk\n    path: /x\n");
    assert_eq!(e.field.as_deref(), Some("socket"));
    assert_eq!(e.export.as_deref(), Some("a"));
    let e = parse_err("exports:\n  - type: blk\n    path: /x\n");
    assert_eq!(e.export.as_deref(), Some("#1"));
    assert_eq!(e.field.as_deref(), Some("name"));
}

#[test]
fn syntax_error_and_wrong_types_have_lines() {
    let e = parse_err("exports:\n  - name: a\n    num_queues: [1\n");
    assert!(e.line.is_some(), "{e}");
    let e = parse_err("exports:\n  - name: a\n    readonly: yes\n");
    assert_eq!(e.line, Some(3), "{e}");
}

#[test]
fn missing_config_file_is_a_clear_error() {
    let e = config::load_file(Path::new("/nonexistent/exports.yaml")).unwrap_err();
    assert!(e.to_string().contains("cannot read config file"), "{e}");
    assert!(
        e.to_string().starts_with("/nonexistent/exports.yaml"),
        "{e}"
    );
}

#[test]
fn socket_permissions_modes() {
    let base = "socket_permissions:\n  mode: MODE\n  group: kvm\nexports: []\n";
    for (mode, want) in [
        ("\"0660\"", 0o660),
        ("0600", 0o600),
        ("660", 0o660),
        ("\"0o640\"", 0o640),
    ] {
        let cfg = parse(&base.replace("MODE", mode)).unwrap();
        assert_eq!(cfg.socket_permissions.mode, want, "{mode}");
        assert_eq!(cfg.socket_permissions.group.as_deref(), Some("kvm"));
    }
    let e = parse_err(&base.replace("MODE", "\"0689\""));
    assert_eq!(e.field.as_deref(), Some("socket_permissions.mode"));
    assert_eq!(e.line, Some(1));
}

#[test]
fn diff_reports_added_removed_changed() {
    let old = parse(TWO_EXPORTS).unwrap();
    let new_text = TWO_EXPORTS
        .replace("num_queues: 4", "num_queues: 2")
        .replace(
            "  - name: a\n    type: blk\n    socket: /run/a.sock\n    path: /data/a.raw\n",
            "  - name: c\n    type: blk\n    socket: /run/c.sock\n    path: /data/c.raw\n",
        );
    let new = parse(&new_text).unwrap();
    let d = diff(&old, &new);
    assert_eq!(
        d.added.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
        ["c"]
    );
    assert_eq!(
        d.removed
            .iter()
            .map(|e| e.name.as_str())
            .collect::<Vec<_>>(),
        ["a"]
    );
    assert_eq!(d.changed.len(), 1);
    assert_eq!(d.changed[0].1.num_queues, 2);
    assert!(diff(&old, &old).is_empty());
}

const SCSI: &str = "\
exports:
  - name: s0
    type: scsi
    socket: /run/s0.sock
    num_queues: 2
    luns:
      - path: /data/l0.raw
        create: { size: 64M }
      - lun: 7
        path: /data/l7.raw
        readonly: true
        rotational: true
        wwn: \"0x3000123456789abc\"
        logical_block_size: 4096
";

fn scsi_luns(cfg: &config::Config) -> &[config::ScsiLun] {
    match &cfg.exports[0].device {
        Device::Scsi(l) => l,
        other => panic!("not scsi: {other:?}"),
    }
}

#[test]
fn scsi_export_with_luns() {
    let cfg = parse(SCSI).unwrap();
    let luns = scsi_luns(&cfg);
    assert_eq!(luns.len(), 2);
    assert_eq!(luns[0].lun, 0);
    assert_eq!(luns[0].disk.serial, "s0-0");
    assert_eq!(luns[0].wwn >> 60, 3, "locally assigned NAA");
    assert_eq!(luns[1].lun, 7);
    assert!(luns[1].rotational && luns[1].disk.readonly);
    assert_eq!(luns[1].wwn, 0x3000_1234_5678_9abc);
    assert_eq!(luns[1].disk.logical_block_size, 4096);
    // The default WWN is stable.
    assert_eq!(scsi_luns(&parse(SCSI).unwrap())[0].wwn, luns[0].wwn);
}

#[test]
fn scsi_errors_name_the_lun_and_line() {
    let e = parse_err(&SCSI.replace("      - lun: 7\n", "      - lun: 0\n"));
    assert_eq!(e.field.as_deref(), Some("luns[1].lun"), "{e}");
    assert_eq!(e.line, Some(9), "{e}");
    let e = parse_err(&SCSI.replace("0x3000123456789abc", "0x6000123456789abc"));
    assert_eq!(e.field.as_deref(), Some("luns[1].wwn"), "{e}");
    assert_eq!(e.line, Some(13), "{e}");
    let e = parse_err(&SCSI.replace("        path: /data/l7.raw\n", ""));
    assert_eq!(e.field.as_deref(), Some("luns[1].path"), "{e}");
    let e = parse_err(&SCSI.replace("    num_queues: 2\n", "    num_queues: 2\n    path: /x\n"));
    assert_eq!(e.field.as_deref(), Some("path"));
    assert!(e.to_string().contains("each entry of luns"), "{e}");
    let e = parse_err("exports:\n  - name: s\n    type: scsi\n    socket: /s\n");
    assert_eq!(e.field.as_deref(), Some("luns"));
    let e = parse_err(&SCSI.replace("lun: 7", "lun: 20000"));
    assert_eq!(e.field.as_deref(), Some("luns[1].lun"));
    let e = parse_err(&SCSI.replace("/data/l7.raw", "/data/l0.raw"));
    assert_eq!(e.field.as_deref(), Some("luns[1].path"), "{e}");
}

#[test]
fn qcow2_with_a_backing_file_to_create() {
    let text = TWO_EXPORTS.replace(
        "    path: b.raw\n    readonly: true\n",
        "    path: b.qcow2\n    format: qcow2\n    create: { size: 1G, backing: base.qcow2 }\n",
    );
    let cfg = parse(&text).unwrap();
    let d = blk(&cfg.exports[1]);
    assert_eq!(d.format, config::BackingFormat::Qcow2);
    let create = d.create.as_ref().unwrap();
    assert_eq!(create.size, 1 << 30);
    assert_eq!(
        create.backing.as_deref(),
        Some(Path::new("base.qcow2")),
        "kept as written"
    );
}

#[test]
fn null_format_needs_a_size_and_takes_no_file() {
    for spelling in ["null", "\"null\""] {
        let text = TWO_EXPORTS.replace(
            "    path: b.raw\n    readonly: true\n",
            &format!("    format: {spelling}\n    size: 1G\n"),
        );
        let cfg = parse(&text).unwrap();
        let d = blk(&cfg.exports[1]);
        assert_eq!(d.format, config::BackingFormat::Null, "format: {spelling}");
        assert_eq!(d.size, Some(1 << 30));
        assert_eq!(d.create.as_ref().map(|c| c.size), Some(1 << 30));
        assert!(!d.direct && !d.readonly);
    }
    // Two null exports share no file.
    let two = TWO_EXPORTS
        .replace(
            "    path: /data/a.raw\n",
            "    format: null\n    size: 1M\n",
        )
        .replace(
            "    path: b.raw\n    readonly: true\n",
            "    format: null\n    size: 1M\n",
        );
    assert_eq!(parse(&two).unwrap().exports.len(), 2);
    let ro = TWO_EXPORTS.replace("    path: b.raw\n", "    format: null\n    size: 1M\n");
    assert!(blk(&parse(&ro).unwrap().exports[1]).readonly);
    for (extra, field) in [
        ("    path: /x\n", "path"),
        ("    create: { size: 1M }\n", "create"),
        ("    direct: true\n", "direct"),
    ] {
        let text = TWO_EXPORTS.replace(
            "    path: b.raw\n    readonly: true\n",
            &format!("    format: null\n    size: 1M\n{extra}"),
        );
        let e = parse_err(&text);
        assert_eq!(e.field.as_deref(), Some(field), "{e}");
        assert!(e.to_string().contains("format: null"), "{e}");
    }
    let e = parse_err(&TWO_EXPORTS.replace("    path: b.raw\n", "    format: null\n"));
    assert_eq!(e.field.as_deref(), Some("size"), "{e}");
    let e = parse_err(&TWO_EXPORTS.replace("    path: b.raw\n", "    format: nul\n"));
    assert!(e.to_string().contains("use raw, qcow2, rbd or null"), "{e}");
}

#[test]
fn vvu_transport_by_pci_address_or_uuid() {
    let text = TWO_EXPORTS
        .replace("socket: /run/a.sock", "vvu: 00:10.0")
        .replace(
            "socket: /run/b.sock",
            "vvu: 6C1E7D52-3B0A-4F4E-9D41-0123456789AB",
        );
    let cfg = parse(&text).unwrap();
    assert_eq!(
        cfg.exports[0].transport,
        Transport::Vvu(VvuDevice::PciAddress("0000:00:10.0".into()))
    );
    assert_eq!(
        cfg.exports[1].transport,
        Transport::Vvu(VvuDevice::Uuid(
            "6c1e7d52-3b0a-4f4e-9d41-0123456789ab".into()
        ))
    );
    let cfg = parse(TWO_EXPORTS).unwrap();
    assert_eq!(
        cfg.exports[0].transport,
        Transport::Socket("/run/a.sock".into())
    );
}

#[test]
fn vvu_transport_errors_name_the_field() {
    for bad in [
        "vvu: 00:40.0",
        "vvu: 0000:00:10.8",
        "vvu: eth0",
        "vvu: 6c1e7d52-3b0a",
    ] {
        let e = parse_err(&TWO_EXPORTS.replace("socket: /run/a.sock", bad));
        assert_eq!(e.field.as_deref(), Some("vvu"), "{bad}: {e}");
        assert_eq!(e.line, Some(5), "{bad}: {e}");
        assert!(
            e.to_string().contains("neither a PCI address"),
            "{bad}: {e}"
        );
    }
    let both = TWO_EXPORTS.replace(
        "socket: /run/a.sock",
        "socket: /run/a.sock\n    vvu: 0000:00:10.0",
    );
    let e = parse_err(&both);
    assert_eq!(e.field.as_deref(), Some("vvu"));
    assert!(e.to_string().contains("not both"), "{e}");
    let twice = TWO_EXPORTS
        .replace("socket: /run/a.sock", "vvu: 0000:00:10.0")
        .replace("socket: /run/b.sock", "vvu: 00:10.0");
    let e = parse_err(&twice);
    assert_eq!(e.export.as_deref(), Some("b"));
    assert!(
        e.to_string().contains("duplicate vvu device 0000:00:10.0"),
        "{e}"
    );
}

#[test]
fn size_is_a_block_multiple_on_a_blk_export_and_each_lun() {
    let cfg = parse(&TWO_EXPORTS.replace(
        "    path: /data/a.raw\n",
        "    path: /data/a.raw\n    size: 2G\n",
    ))
    .unwrap();
    assert_eq!(blk(&cfg.exports[0]).size, Some(2 << 30));
    assert_eq!(blk(&cfg.exports[1]).size, None);
    let cfg = parse(&SCSI.replace(
        "        create: { size: 64M }\n",
        "        create: { size: 64M }\n        size: 1073741824\n",
    ))
    .unwrap();
    assert_eq!(scsi_luns(&cfg)[0].disk.size, Some(1 << 30));
    assert_eq!(scsi_luns(&cfg)[1].disk.size, None);

    // (text, field, line, words of the message)
    let with_a = |line: &str| {
        TWO_EXPORTS.replace(
            "    path: /data/a.raw\n",
            &format!("    path: /data/a.raw\n{line}"),
        )
    };
    let cases = [
        (
            with_a("    size: 1000\n"),
            "size",
            7,
            "multiple of logical_block_size 512",
        ),
        (
            with_a("    logical_block_size: 4096\n    size: 6K\n"),
            "size",
            8,
            "multiple of logical_block_size 4096",
        ),
        (with_a("    size: 0\n"), "size", 7, "positive multiple"),
        (with_a("    size: 1Q\n"), "size", 7, "unknown size suffix"),
        (
            with_a("    create:\n      size: 2M\n    size: 1M\n"),
            "size",
            9,
            "shrinking is refused",
        ),
        (
            with_a("    readonly: true\n    size: 1M\n"),
            "size",
            8,
            "readonly",
        ),
        (
            SCSI.replace("    num_queues: 2\n", "    num_queues: 2\n    size: 1G\n"),
            "size",
            6,
            "each entry of luns",
        ),
        (
            SCSI.replace("        readonly: true\n", "        size: 6K\n"),
            "luns[1].size",
            11,
            "multiple of logical_block_size 4096",
        ),
    ];
    for (text, field, line, words) in cases {
        let e = parse_err(&text);
        assert_eq!(e.field.as_deref(), Some(field), "{e}");
        assert_eq!(e.line, Some(line), "{e}");
        assert!(e.to_string().contains(words), "{e}");
    }
}

#[test]
fn a_size_change_is_its_own_change() {
    use config::{export_changes, ExportChange};
    let sized = |size: &str| {
        let text = TWO_EXPORTS.replace(
            "    path: /data/a.raw\n",
            &format!("    path: /data/a.raw\n{size}"),
        );
        parse(&text).unwrap().exports[0].clone()
    };
    let (none, one, two) = (sized(""), sized("    size: 1G\n"), sized("    size: 2G\n"));
    let grow = export_changes(&one, &two);
    assert_eq!(
        grow,
        [ExportChange::Size {
            lun: None,
            old: Some(1 << 30),
            new: Some(2 << 30)
        }]
    );
    assert!(!grow[0].is_shrink());
    assert_eq!(grow[0].field_path(), "size");
    let shrink = export_changes(&two, &one);
    assert!(shrink[0].is_shrink());
    let pinned = export_changes(&none, &one);
    assert_eq!(
        pinned,
        [ExportChange::Size {
            lun: None,
            old: None,
            new: Some(1 << 30)
        }]
    );
    assert!(
        !pinned[0].is_shrink(),
        "pinning is checked against the store"
    );
    // A LUN's size, with another setting refused beside it.
    let old = parse(SCSI).unwrap().exports[0].clone();
    let new = parse(
        &SCSI
            .replace("        rotational: true\n", "")
            .replace("        readonly: true\n", "        size: 8M\n"),
    )
    .unwrap()
    .exports[0]
        .clone();
    let changes = export_changes(&old, &new);
    let paths: Vec<String> = changes.iter().map(ExportChange::field_path).collect();
    assert_eq!(
        paths,
        ["luns[1].readonly", "luns[1].rotational", "luns[1].size"]
    );
}

#[test]
fn poll_settings_and_their_changes() {
    let with = |poll: &str| {
        TWO_EXPORTS.replace(
            "    path: /data/a.raw\n",
            &format!("    path: /data/a.raw\n{poll}"),
        )
    };
    let cfg = parse(&with("    poll: { max_us: 50 }\n")).unwrap();
    assert_eq!(
        cfg.exports[0].poll,
        Some(config::Poll {
            max_us: 50,
            adaptive: true
        })
    );
    assert_eq!(cfg.exports[1].poll, None, "off by default");
    let fixed = parse(&with("    poll: { max_us: 20, adaptive: false }\n")).unwrap();
    assert!(!fixed.exports[0].poll.unwrap().adaptive);
    assert_eq!(
        parse(&with("    poll: { max_us: 0 }\n")).unwrap().exports[0].poll,
        None
    );
    let e = parse_err(&with("    poll: { max_us: 5000 }\n"));
    assert_eq!(e.field.as_deref(), Some("poll"), "{e}");
    let e = parse_err(&with("    poll: { max: 5 }\n"));
    assert!(e.to_string().contains("max"), "{e}");
    // A running export's poll setting is not changed by a reload.
    let changes = config::export_changes(&parse(TWO_EXPORTS).unwrap().exports[0], &cfg.exports[0]);
    let paths: Vec<String> = changes
        .iter()
        .map(config::ExportChange::field_path)
        .collect();
    assert_eq!(paths, ["poll"]);
}

#[test]
fn a_file_without_an_exports_list_is_refused() {
    for text in [
        "",
        "# nothing yet\n",
        "---\n",
        "exports:\n",
        "state_dir: /tmp/x\n",
    ] {
        let e = config::parse_str(text, Path::new("exports.yaml"), Path::new("/")).expect_err(text);
        assert_eq!(e.field.as_deref(), Some("exports"), "{text:?}: {e}");
        assert!(e.to_string().contains("exports: []"), "{e}");
    }
    let c = config::parse_str("exports: []\n", Path::new("exports.yaml"), Path::new("/")).unwrap();
    assert!(c.exports.is_empty());
}
