//! `format: rbd` disks in exports.yaml: what a valid one becomes, and errors naming file,
//! line, export and field for the mistakes an operator makes.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use config::{parse_str, BackingFormat, ConfigError, Device};

fn parse(text: &str) -> Result<config::Config, ConfigError> {
    parse_str(text, Path::new("exports.yaml"), Path::new("/etc/appliance"))
}

fn parse_err(text: &str) -> ConfigError {
    match parse(text) {
        Ok(c) => panic!("expected an error, got {c:?}"),
        Err(e) => e,
    }
}

#[test]
fn blk_and_scsi_rbd_disks() {
    let cfg = parse(
        "exports:
  - name: vol
    type: blk
    socket: /run/vol.sock
    format: rbd
    rbd:
      pool: volumes
      namespace: tenant1
      image: vm1
      conf: ceph/ceph.conf
      client_id: appliance
      keyring: /etc/ceph/ceph.client.appliance.keyring
      io_timeout: 30
    create: { size: 10G }
  - name: lun
    type: scsi
    socket: /run/lun.sock
    luns:
      - format: rbd
        rbd: { pool: rbd, image: data }
",
    )
    .unwrap();
    let Device::Blk(disk) = &cfg.exports[0].device else {
        panic!("blk");
    };
    assert_eq!(disk.format, BackingFormat::Rbd);
    assert_eq!(disk.path, PathBuf::from("rbd:volumes/tenant1/vm1"));
    let rbd = disk.rbd.as_ref().unwrap();
    assert_eq!(rbd.pool, "volumes");
    assert_eq!(rbd.namespace.as_deref(), Some("tenant1"));
    assert_eq!(rbd.image, "vm1");
    assert_eq!(
        rbd.conf.as_deref(),
        Some(Path::new("/etc/appliance/ceph/ceph.conf")),
        "relative to the config file's folder"
    );
    assert_eq!(rbd.client_id.as_deref(), Some("appliance"));
    assert_eq!(rbd.io_timeout, Some(30));
    assert_eq!(disk.create.as_ref().map(|c| c.size), Some(10 << 30));
    let Device::Scsi(luns) = &cfg.exports[1].device else {
        panic!("scsi");
    };
    let lun = &luns[0].disk;
    assert_eq!(lun.path, PathBuf::from("rbd:rbd/data"));
    let rbd = lun.rbd.as_ref().unwrap();
    assert_eq!((rbd.conf.as_ref(), rbd.client_id.as_ref()), (None, None));
    assert_eq!(rbd.io_timeout, None);
}

#[test]
fn mistakes_name_file_line_export_and_field() {
    let head = "exports:\n  - name: v\n    type: blk\n    socket: /s\n";
    for (body, field, line, needle) in [
        ("    format: rbd\n", "rbd", 2, "is required with format: rbd"),
        (
            "    format: rbd\n    rbd:\n      image: i\n",
            "rbd.pool",
            6,
            "is required",
        ),
        (
            "    format: rbd\n    rbd:\n      pool: p\n",
            "rbd.image",
            6,
            "is required",
        ),
        (
            "    format: rbd\n    rbd:\n      pool: p\n      image: a/b\n",
            "rbd.image",
            8,
            "without '/'",
        ),
        (
            "    format: rbd\n    rbd: { pool: p, image: i, client_id: client.admin }\n",
            "rbd.client_id",
            6,
            "without \"client.\"",
        ),
        (
            "    format: rbd\n    rbd: { pool: p, image: i, io_timeout: 0 }\n",
            "rbd.io_timeout",
            6,
            "at least 1 second",
        ),
        (
            "    format: rbd\n    path: /x\n    rbd: { pool: p, image: i }\n",
            "path",
            6,
            "not path",
        ),
        (
            "    format: rbd\n    direct: false\n    rbd: { pool: p, image: i }\n",
            "direct",
            6,
            "files only",
        ),
        (
            "    path: /x\n    rbd: { pool: p, image: i }\n",
            "rbd",
            6,
            "needs format: rbd",
        ),
        (
            "    format: rbd\n    rbd: { pool: p, image: i }\n    create: { size: 1M, backing: b.qcow2 }\n",
            "create",
            7,
            "format: qcow2",
        ),
    ] {
        let text = format!("{head}{body}");
        let e = parse_err(&text);
        assert_eq!(e.file, Path::new("exports.yaml"), "{text}");
        assert_eq!(e.export.as_deref(), Some("v"), "{text}");
        assert_eq!(e.field.as_deref(), Some(field), "{text}: {e}");
        assert_eq!(e.line, Some(line), "{text}: {e}");
        assert!(e.message.contains(needle), "{text}: {e}");
    }
    let e = parse_err(&format!(
        "{head}    format: rbd\n    rbd: {{ pool: p, image: i, pol: x }}\n"
    ));
    assert!(e.message.contains("unknown field `pol`"), "{e}");
    assert_eq!(e.line, Some(6), "{e}");
}

#[test]
fn two_writable_exports_of_one_image_are_refused() {
    let e = parse_err(
        "exports:
  - name: a
    type: blk
    socket: /a
    format: rbd
    rbd: { pool: p, image: i }
  - name: b
    type: scsi
    socket: /b
    luns:
      - format: rbd
        rbd: { pool: p, image: i }
",
    );
    assert_eq!(e.export.as_deref(), Some("b"));
    assert_eq!(e.field.as_deref(), Some("luns[0].path"));
    assert!(e.message.contains("rbd:p/i"), "{e}");
}
