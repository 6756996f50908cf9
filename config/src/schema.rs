//! The on-disk shape of `exports.yaml`. Every struct refuses unknown fields so a typo is an
//! error with a line number, never a silently ignored setting.

use serde::{Deserialize, Deserializer};

/// `format:` as written. Present but YAML null (`format: null`, unquoted) is the null
/// format, not "no format given": an operator writing it means the null backing.
fn format_name<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(Some(
        Option::<String>::deserialize(d)?.unwrap_or_else(|| "null".to_string()),
    ))
}

/// Top level of `exports.yaml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Directory for daemon state (created if missing).
    pub state_dir: Option<String>,
    /// Prometheus endpoint settings.
    pub metrics: Option<MetricsFile>,
    /// Mode and ownership applied to every export socket.
    pub socket_permissions: Option<SocketPermissionsFile>,
    /// The user and group the daemon runs as after start-up (it starts as root).
    pub run_as: Option<RunAsFile>,
    /// The exported LUNs. Required, so that an empty or half-written file is an error
    /// rather than a config without exports: `exports: []` says "none" explicitly.
    pub exports: Option<Vec<ExportFile>>,
}

/// `metrics:` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsFile {
    /// `host:port` the HTTP endpoint listens on.
    pub listen: String,
}

/// `socket_permissions:` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SocketPermissionsFile {
    /// Octal mode, e.g. `"0660"` (an unquoted `0660` or `660` is read as octal digits too).
    pub mode: Option<ModeValue>,
    /// User name or numeric uid that owns the sockets.
    pub owner: Option<String>,
    /// Group name or numeric gid of the sockets.
    pub group: Option<String>,
}

/// `run_as:` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunAsFile {
    /// User name or numeric uid.
    pub user: String,
    /// Group name or numeric gid; the user's primary group when absent.
    pub group: Option<String>,
}

/// A file mode as written: a string or an integer whose decimal digits are octal digits.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ModeValue {
    /// `"0660"`.
    Text(String),
    /// `660` or `0660`.
    Number(u64),
}

/// A size as written: bytes, or a string with a K/M/G/T suffix.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum SizeValue {
    /// A number of bytes.
    Bytes(u64),
    /// `"1G"`, `"512M"`, `"4096"`.
    Text(String),
}

/// One entry of `exports:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportFile {
    /// Unique export name (also the default serial).
    pub name: Option<String>,
    /// `blk` (vhost-user-blk) or `scsi` (vhost-user-scsi).
    #[serde(rename = "type")]
    pub export_type: Option<String>,
    /// Unix socket the frontend connects to (host mode).
    pub socket: Option<String>,
    /// Appliance-VM mode: the virtio-vhost-user device that carries this export, by PCI
    /// address (`0000:00:10.0`) or uuid.
    pub vvu: Option<String>,
    /// Backing file or block device.
    pub path: Option<String>,
    /// `raw`, `qcow2`, `rbd` or `null` (a bare YAML `null` means the null format too).
    #[serde(default, deserialize_with = "format_name")]
    pub format: Option<String>,
    /// `format: rbd`: the Ceph RBD image and how to reach its cluster (instead of `path`).
    pub rbd: Option<RbdFile>,
    /// Refuse writes.
    pub readonly: Option<bool>,
    /// Number of virtqueues (one worker thread each).
    pub num_queues: Option<u32>,
    /// Maximum virtqueue size offered to the frontend.
    pub queue_size: Option<u32>,
    /// 512 or 4096.
    pub logical_block_size: Option<u32>,
    /// Up to 20 ASCII bytes reported by GET_ID.
    pub serial: Option<String>,
    /// Open the backing file with O_DIRECT.
    pub direct: Option<bool>,
    /// `writeback` or `writethrough`.
    pub write_cache: Option<String>,
    /// Create a sparse backing file of this size when it does not exist.
    pub create: Option<CreateFile>,
    /// The capacity the daemon maintains: the backing store is grown to it (never shrunk).
    pub size: Option<SizeValue>,
    /// The logical units of a `scsi` export.
    pub luns: Option<Vec<LunFile>>,
    /// Busy-polling of the virtqueues and disk completions before a worker sleeps.
    pub poll: Option<PollFile>,
}

/// `poll:` of an export.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PollFile {
    /// Longest busy-poll before sleeping, in µs (0: off).
    pub max_us: u32,
    /// Adapt the poll time to how soon work arrives (default true), or always poll
    /// `max_us`.
    pub adaptive: Option<bool>,
}

/// One entry of a scsi export's `luns:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LunFile {
    /// LUN number (default: the position in the list).
    pub lun: Option<u16>,
    /// Backing file or block device.
    pub path: Option<String>,
    /// `raw`, `qcow2`, `rbd` or `null` (a bare YAML `null` means the null format too).
    #[serde(default, deserialize_with = "format_name")]
    pub format: Option<String>,
    /// `format: rbd`: the Ceph RBD image and how to reach its cluster (instead of `path`).
    pub rbd: Option<RbdFile>,
    /// Refuse writes.
    pub readonly: Option<bool>,
    /// 512 or 4096.
    pub logical_block_size: Option<u32>,
    /// VPD 0x80 unit serial number.
    pub serial: Option<String>,
    /// NAA identifier for VPD 0x83, 16 hex digits (NAA type 3 or 5), e.g. `"0x3000123456789abc"`.
    pub wwn: Option<String>,
    /// Report a rotating medium.
    pub rotational: Option<bool>,
    /// Open the backing file with O_DIRECT.
    pub direct: Option<bool>,
    /// `writeback` or `writethrough`.
    pub write_cache: Option<String>,
    /// Create a sparse backing file of this size when it does not exist.
    pub create: Option<CreateFile>,
    /// The capacity the daemon maintains: the backing store is grown to it (never shrunk).
    pub size: Option<SizeValue>,
}

/// `create:` of an export.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateFile {
    /// Size of the new backing file (the virtual size of a qcow2 image).
    pub size: SizeValue,
    /// qcow2 only: the backing file of the new image, as qemu-img takes it (relative paths
    /// are relative to the image's folder).
    pub backing: Option<String>,
}

/// `rbd:` of a `format: rbd` disk.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RbdFile {
    /// Pool name.
    pub pool: Option<String>,
    /// RADOS namespace in the pool (default: none).
    pub namespace: Option<String>,
    /// Image name.
    pub image: Option<String>,
    /// `ceph.conf` path (default: librados's search, `$CEPH_CONF` then `/etc/ceph/ceph.conf`).
    pub conf: Option<String>,
    /// Ceph client id without `client.` (default `admin`).
    pub client_id: Option<String>,
    /// Keyring path (default: what `ceph.conf` says).
    pub keyring: Option<String>,
    /// Seconds an operation waits for an unreachable cluster before it fails (default:
    /// no limit).
    pub io_timeout: Option<u64>,
}
