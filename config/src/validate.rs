//! Validation of a parsed [`ConfigFile`] into a typed [`Config`]. Every error names the file
//! and, where it can be found, the line, the export and the field.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::locate::LineIndex;
use crate::schema::{ConfigFile, ExportFile, ModeValue, SizeValue, SocketPermissionsFile};

mod rbd;
use crate::size::parse_size;
pub use rbd::RbdImage;

/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/vhost-appliance";
/// Default socket mode: owner and group may connect.
pub const DEFAULT_SOCKET_MODE: u32 = 0o660;
/// Upper bound on virtqueues per export (one worker thread each).
pub const MAX_NUM_QUEUES: u32 = 64;
/// Default maximum virtqueue size; frontends choose any power of two up to it (QEMU: 128).
pub const DEFAULT_QUEUE_SIZE: u32 = 256;
/// Highest SCSI LUN number (flat addressing, 14 bits).
pub const MAX_LUN: u16 = 16383;
/// Upper bound on the virtqueue size (QEMU's vhost-user-blk limit).
pub const MAX_QUEUE_SIZE: u32 = 1024;
/// virtio-blk GET_ID returns at most 20 bytes.
pub const MAX_SERIAL_LEN: usize = 20;

/// A configuration error, with as much location as could be found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The config file (or `<string>` for in-memory text).
    pub file: PathBuf,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// The export the error belongs to (its name, or `#N` when unnamed).
    pub export: Option<String>,
    /// The offending field.
    pub field: Option<String>,
    /// What is wrong, in words an operator can act on.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        write!(f, ":")?;
        if let Some(export) = &self.export {
            write!(f, " export {export:?}:")?;
        }
        if let Some(field) = &self.field {
            write!(f, " field {field:?}:")?;
        }
        write!(f, " {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// On-disk format of the backing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackingFormat {
    /// Raw file or block device.
    Raw,
    /// qcow2 image (with its backing chain).
    Qcow2,
    /// Ceph RBD image ([`Disk::rbd`]).
    Rbd,
    /// No backing file: reads return zeroes, writes are dropped. A benchmarking aid (as
    /// qemu-storage-daemon's `null-co`, SPDK's null bdev); its `path` is empty.
    Null,
}

/// Write cache mode presented to the guest (the guest may toggle it via CONFIG_WCE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteCache {
    /// Writes complete when in the host page cache / device cache; FLUSH makes them durable.
    Writeback,
    /// Every write is durable (RWF_DSYNC) before it completes.
    Writethrough,
}

/// `create:` of an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateSpec {
    /// Size in bytes of the sparse file (or virtual size of the qcow2 image) created when the
    /// backing path does not exist.
    pub size: u64,
    /// qcow2 only: the new image's backing file, as written into the image.
    pub backing: Option<PathBuf>,
}

/// A backing store and how it is presented (a blk export, or one SCSI LUN).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// Backing file or block device; for an RBD image its name, `rbd:pool/image`.
    pub path: PathBuf,
    /// Backing format.
    pub format: BackingFormat,
    /// The image of a [`BackingFormat::Rbd`] disk (boxed: most disks are files).
    pub rbd: Option<Box<RbdImage>>,
    /// Refuse writes.
    pub readonly: bool,
    /// 512 or 4096.
    pub logical_block_size: u32,
    /// Serial number (virtio-blk GET_ID, SCSI VPD 0x80); ≤ 20 printable ASCII bytes.
    pub serial: String,
    /// O_DIRECT on the backing file.
    pub direct: bool,
    /// Initial write cache mode.
    pub write_cache: WriteCache,
    /// Create the backing file when missing.
    pub create: Option<CreateSpec>,
    /// `size:`, in bytes (a multiple of `logical_block_size`): the capacity the daemon
    /// maintains. A smaller backing store is grown to it (a raw file by `ftruncate`, a
    /// qcow2 image through imago); a larger one is refused, as shrinking is. `None`: the
    /// capacity is the backing store's size, and follows it when it grows.
    pub size: Option<u64>,
}

/// One logical unit of a scsi export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScsiLun {
    /// LUN number.
    pub lun: u16,
    /// Its backing store.
    pub disk: Disk,
    /// Report a rotating medium.
    pub rotational: bool,
    /// NAA identifier (VPD 0x83).
    pub wwn: u64,
}

/// What an export presents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Device {
    /// vhost-user-blk over one disk.
    Blk(Disk),
    /// vhost-user-scsi with these LUNs (one target).
    Scsi(Vec<ScsiLun>),
}

/// How frontends reach an export.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Transport {
    /// Host mode: a listening unix socket.
    Socket(PathBuf),
    /// Appliance-VM mode: a virtio-vhost-user device.
    Vvu(VvuDevice),
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Transport::Socket(path) => write!(f, "socket {}", path.display()),
            Transport::Vvu(VvuDevice::PciAddress(a)) => write!(f, "vvu device {a}"),
            Transport::Vvu(VvuDevice::Uuid(u)) => write!(f, "vvu device uuid {u}"),
        }
    }
}

/// How an export names its virtio-vhost-user device.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum VvuDevice {
    /// PCI address in sysfs form, `dddd:bb:dd.f` (lower case).
    PciAddress(String),
    /// The device's `uuid` property, lower-case hyphenated form.
    Uuid(String),
}

impl VvuDevice {
    /// Parses `0000:00:10.0`, `00:10.0` or a uuid.
    pub fn parse(text: &str) -> Result<VvuDevice, String> {
        let t = text.trim().to_ascii_lowercase();
        let hex = |s: &str, n: usize| s.len() == n && s.chars().all(|c| c.is_ascii_hexdigit());
        let groups: Vec<&str> = t.split('-').collect();
        if groups.len() == 5 && groups.iter().zip([8, 4, 4, 4, 12]).all(|(g, n)| hex(g, n)) {
            return Ok(VvuDevice::Uuid(t));
        }
        let full = if t.matches(':').count() == 1 {
            format!("0000:{t}")
        } else {
            t.clone()
        };
        let pci_ok = full.split_once('.').is_some_and(|(bdf, function)| {
            let parts: Vec<&str> = bdf.split(':').collect();
            parts.len() == 3
                && hex(parts[0], 4)
                && hex(parts[1], 2)
                && hex(parts[2], 2)
                && u8::from_str_radix(parts[2], 16).is_ok_and(|d| d < 32)
                && function.len() == 1
                && matches!(function.as_bytes()[0], b'0'..=b'7')
        });
        if pci_ok {
            Ok(VvuDevice::PciAddress(full))
        } else {
            Err(format!(
                "{text:?} is neither a PCI address (0000:00:10.0) nor a uuid"
            ))
        }
    }
}

/// One validated export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    /// Unique name.
    pub name: String,
    /// Where frontends connect.
    pub transport: Transport,
    /// Request virtqueues offered (scsi adds its control and event queues).
    pub num_queues: u16,
    /// Maximum virtqueue size.
    pub queue_size: u16,
    /// The device and its backing stores.
    pub device: Device,
    /// Busy-polling before a queue's worker sleeps; `None`: off (the default).
    pub poll: Option<Poll>,
}

/// `poll:` of an export: each queue's worker, after handling its work, keeps checking the
/// virtqueue's avail ring and its disk completions for up to `max_us` before it sleeps,
/// with guest kicks and completion signals suppressed meanwhile (as QEMU's iothread
/// polling and SPDK's pollers do). Costs CPU for latency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Poll {
    /// Longest busy-poll, in µs (1..=[`MAX_POLL_US`]).
    pub max_us: u32,
    /// Grow the poll time while work arrives within `max_us` of the last, shrink it while
    /// it does not (QEMU's adaptive polling); false: always poll `max_us`.
    pub adaptive: bool,
}

/// Longest `poll: { max_us }` accepted, in µs.
pub const MAX_POLL_US: u32 = 1000;

/// One backing store of an export and where it sits: for a scsi LUN, its position in
/// `luns:` (as error fields name it, `luns[i]`) and its LUN number; `None` for a blk export.
#[derive(Debug, Clone, Copy)]
pub struct DiskSlot<'a> {
    /// Position in `luns:`.
    pub position: Option<usize>,
    /// LUN number.
    pub lun: Option<u16>,
    /// The backing store.
    pub disk: &'a Disk,
}

impl DiskSlot<'_> {
    /// The field path of `field` of this disk: `path`, or `luns[2].path`.
    pub fn field(&self, field: &str) -> String {
        match self.position {
            Some(i) => format!("luns[{i}].{field}"),
            None => field.to_string(),
        }
    }
}

impl Export {
    /// Every backing store of the export.
    pub fn disks(&self) -> Vec<&Disk> {
        self.disk_slots().into_iter().map(|s| s.disk).collect()
    }

    /// Every backing store with its position and LUN number.
    pub fn disk_slots(&self) -> Vec<DiskSlot<'_>> {
        match &self.device {
            Device::Blk(disk) => vec![DiskSlot {
                position: None,
                lun: None,
                disk,
            }],
            Device::Scsi(luns) => luns
                .iter()
                .enumerate()
                .map(|(i, l)| DiskSlot {
                    position: Some(i),
                    lun: Some(l.lun),
                    disk: &l.disk,
                })
                .collect(),
        }
    }
}

/// Ownership and mode of export sockets (names are resolved by the daemon).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketPermissions {
    /// Permission bits.
    pub mode: u32,
    /// User name or uid.
    pub owner: Option<String>,
    /// Group name or gid.
    pub group: Option<String>,
}

/// `run_as:`: the user and group the daemon switches to before it serves (names are
/// resolved by the daemon, as for [`SocketPermissions`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    /// User name or uid.
    pub user: String,
    /// Group name or gid; the user's primary group when `None`.
    pub group: Option<String>,
}

/// A whole validated `exports.yaml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// State directory.
    pub state_dir: PathBuf,
    /// Where the metrics endpoint listens, if enabled.
    pub metrics_listen: Option<SocketAddr>,
    /// Applied to every export socket.
    pub socket_permissions: SocketPermissions,
    /// Whom the daemon runs as after start-up; `None` keeps root (with fewer capabilities).
    pub run_as: Option<RunAs>,
    /// Exports in file order.
    pub exports: Vec<Export>,
}

/// Reads and validates a config file. Relative paths inside it are resolved against its folder.
pub fn load_file(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        line: None,
        export: None,
        field: None,
        message: format!("cannot read config file: {e}"),
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    parse_str(&text, path, base)
}

/// Parses and validates config text; `file` names it in errors, `base` resolves relative paths.
pub fn parse_str(text: &str, file: &Path, base: &Path) -> Result<Config, ConfigError> {
    let raw: ConfigFile = serde_yaml_ng::from_str(text).map_err(|e| {
        let line = e.location().map(|l| l.line());
        let mut message = e.to_string();
        // The line goes in front, as in every other error; serde repeats it at the end.
        if let Some(at) = message.rfind(" at line ") {
            if line.is_some() {
                message.truncate(at);
            }
        }
        ConfigError {
            file: file.to_path_buf(),
            line,
            export: None,
            field: None,
            message,
        }
    })?;
    Validator {
        file,
        base,
        index: LineIndex::new(text),
    }
    .config(raw)
}

/// Validates one export given on the command line (single-export mode), with the same rules
/// as an entry of `exports.yaml`; relative paths are resolved against `base`.
pub fn single_export(raw: ExportFile, base: &Path) -> Result<Export, ConfigError> {
    Validator {
        file: Path::new("<command line>"),
        base,
        index: LineIndex::new(""),
    }
    .export(0, raw)
}

struct Validator<'a> {
    file: &'a Path,
    base: &'a Path,
    index: LineIndex<'a>,
}

/// Per-export (and per-LUN) error context.
struct At<'v, 'a> {
    validator: &'v Validator<'a>,
    index: usize,
    export: String,
    /// Position in `luns:` when validating a LUN.
    lun: Option<usize>,
}

impl At<'_, '_> {
    fn err(&self, field: &str, message: impl Into<String>) -> ConfigError {
        let index = &self.validator.index;
        let (line, field) = match self.lun {
            None => (index.field_line(self.index, field), field.to_string()),
            Some(lun) => (
                index.lun_field_line(self.index, lun, field),
                format!("luns[{lun}].{field}"),
            ),
        };
        ConfigError {
            file: self.validator.file.to_path_buf(),
            line,
            export: Some(self.export.clone()),
            field: Some(field),
            message: message.into(),
        }
    }

    fn for_lun(&self, lun: usize) -> At<'_, '_> {
        At {
            validator: self.validator,
            index: self.index,
            export: self.export.clone(),
            lun: Some(lun),
        }
    }
}

/// The disk fields as written, wherever they appear (blk export or SCSI LUN).
struct DiskFields {
    path: Option<String>,
    format: Option<String>,
    rbd: Option<crate::schema::RbdFile>,
    readonly: Option<bool>,
    logical_block_size: Option<u32>,
    serial: Option<String>,
    direct: Option<bool>,
    write_cache: Option<String>,
    create: Option<crate::schema::CreateFile>,
    size: Option<SizeValue>,
}

/// A stable locally assigned NAA (type 3) identifier for an export's LUN.
fn default_wwn(export: &str, lun: u16) -> u64 {
    // FNV-1a over "export/lun": the same name always gets the same identifier.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in format!("{export}/{lun}").bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (3u64 << 60) | (h & 0x0fff_ffff_ffff_ffff)
}

fn parse_wwn(text: &str) -> Result<u64, String> {
    let hex = text
        .trim()
        .trim_start_matches("naa.")
        .trim_start_matches("0x")
        .replace(':', "");
    let value = u64::from_str_radix(&hex, 16)
        .ok()
        .filter(|_| hex.len() == 16)
        .ok_or_else(|| format!("{text:?} is not 16 hex digits (e.g. \"0x3000123456789abc\")"))?;
    match value >> 60 {
        2 | 3 | 5 => Ok(value),
        naa => Err(format!(
            "NAA type {naa} is not an 8-byte identifier (use 2, 3 or 5)"
        )),
    }
}

impl Validator<'_> {
    fn top_err(&self, key: &str, field: &str, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_path_buf(),
            line: self.index.top_level_line(key),
            export: None,
            field: Some(field.to_string()),
            message: message.into(),
        }
    }

    fn resolve(&self, path: &str) -> PathBuf {
        let p = Path::new(path);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    fn config(&self, raw: ConfigFile) -> Result<Config, ConfigError> {
        let state_dir = self.resolve(raw.state_dir.as_deref().unwrap_or(DEFAULT_STATE_DIR));
        let metrics_listen = match raw.metrics {
            None => None,
            Some(m) => Some(m.listen.parse::<SocketAddr>().map_err(|e| {
                self.top_err(
                    "metrics",
                    "metrics.listen",
                    format!("{:?} is not host:port ({e})", m.listen),
                )
            })?),
        };
        let socket_permissions = self.socket_permissions(raw.socket_permissions)?;
        let run_as = match raw.run_as {
            None => None,
            Some(r) => {
                for (field, value) in [("user", Some(&r.user)), ("group", r.group.as_ref())] {
                    if value.is_some_and(|v| v.trim().is_empty()) {
                        return Err(self.top_err(
                            "run_as",
                            &format!("run_as.{field}"),
                            "must not be empty",
                        ));
                    }
                }
                Some(RunAs {
                    user: r.user,
                    group: r.group,
                })
            }
        };
        let Some(raw_exports) = raw.exports else {
            return Err(ConfigError {
                file: self.file.to_path_buf(),
                line: None,
                export: None,
                field: Some("exports".into()),
                message: "is missing (an empty or partly written file?); write `exports: []` to serve no exports".into(),
            });
        };
        let mut exports = Vec::with_capacity(raw_exports.len());
        for (i, export) in raw_exports.into_iter().enumerate() {
            exports.push(self.export(i, export)?);
        }
        self.check_unique(&exports)?;
        Ok(Config {
            state_dir,
            metrics_listen,
            socket_permissions,
            run_as,
            exports,
        })
    }

    fn socket_permissions(
        &self,
        raw: Option<SocketPermissionsFile>,
    ) -> Result<SocketPermissions, ConfigError> {
        let Some(raw) = raw else {
            return Ok(SocketPermissions {
                mode: DEFAULT_SOCKET_MODE,
                owner: None,
                group: None,
            });
        };
        let mode = match raw.mode {
            None => DEFAULT_SOCKET_MODE,
            Some(value) => parse_mode(&value)
                .map_err(|m| self.top_err("socket_permissions", "socket_permissions.mode", m))?,
        };
        for (field, value) in [("owner", &raw.owner), ("group", &raw.group)] {
            if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                return Err(self.top_err(
                    "socket_permissions",
                    &format!("socket_permissions.{field}"),
                    "must not be empty",
                ));
            }
        }
        Ok(SocketPermissions {
            mode,
            owner: raw.owner,
            group: raw.group,
        })
    }

    fn export(&self, index: usize, raw: ExportFile) -> Result<Export, ConfigError> {
        let mut at = At {
            validator: self,
            index,
            export: format!("#{}", index + 1),
            lun: None,
        };
        let name = raw
            .name
            .clone()
            .ok_or_else(|| at.err("name", "is required"))?;
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(at.err(
                "name",
                format!("{name:?} must be non-empty and use only letters, digits, '-', '_', '.'"),
            ));
        }
        at.export = name.clone();
        let transport = match (raw.socket.as_deref(), raw.vvu.as_deref()) {
            (Some(s), None) => Transport::Socket(self.resolve(s)),
            (None, Some(v)) => Transport::Vvu(VvuDevice::parse(v).map_err(|m| at.err("vvu", m))?),
            (None, None) => {
                return Err(at.err(
                    "socket",
                    "is required (or vvu: a virtio-vhost-user device in appliance-VM mode)",
                ))
            }
            (Some(_), Some(_)) => {
                return Err(at.err("vvu", "an export has either socket or vvu, not both"))
            }
        };
        let num_queues = raw.num_queues.unwrap_or(1);
        if !(1..=MAX_NUM_QUEUES).contains(&num_queues) {
            return Err(at.err(
                "num_queues",
                format!("{num_queues} is out of range 1..={MAX_NUM_QUEUES}"),
            ));
        }
        let queue_size = raw.queue_size.unwrap_or(DEFAULT_QUEUE_SIZE);
        if !queue_size.is_power_of_two() || !(2..=MAX_QUEUE_SIZE).contains(&queue_size) {
            return Err(at.err(
                "queue_size",
                format!("{queue_size} must be a power of two in 2..={MAX_QUEUE_SIZE}"),
            ));
        }
        let fields = DiskFields {
            path: raw.path,
            format: raw.format,
            rbd: raw.rbd,
            readonly: raw.readonly,
            logical_block_size: raw.logical_block_size,
            serial: raw.serial,
            direct: raw.direct,
            write_cache: raw.write_cache,
            create: raw.create,
            size: raw.size,
        };
        let device = match raw.export_type.as_deref() {
            None => return Err(at.err("type", "is required (blk or scsi)")),
            Some("blk") => {
                if raw.luns.is_some() {
                    return Err(at.err("luns", "only scsi exports have luns"));
                }
                let mut serial = name.clone();
                serial.truncate(MAX_SERIAL_LEN);
                Device::Blk(self.disk(&at, fields, serial)?)
            }
            Some("scsi") => {
                for (field, set) in [
                    ("path", fields.path.is_some()),
                    ("format", fields.format.is_some()),
                    ("rbd", fields.rbd.is_some()),
                    ("readonly", fields.readonly.is_some()),
                    ("logical_block_size", fields.logical_block_size.is_some()),
                    ("serial", fields.serial.is_some()),
                    ("direct", fields.direct.is_some()),
                    ("write_cache", fields.write_cache.is_some()),
                    ("create", fields.create.is_some()),
                    ("size", fields.size.is_some()),
                ] {
                    if set {
                        return Err(at.err(field, "belongs to each entry of luns in a scsi export"));
                    }
                }
                Device::Scsi(self.luns(&at, &name, raw.luns.unwrap_or_default())?)
            }
            Some(other) => {
                return Err(at.err("type", format!("unknown type {other:?} (use blk or scsi)")))
            }
        };
        let poll = match raw.poll {
            None | Some(crate::schema::PollFile { max_us: 0, .. }) => None,
            Some(p) if p.max_us > MAX_POLL_US => {
                return Err(at.err(
                    "poll",
                    format!("max_us {} is above {MAX_POLL_US} µs", p.max_us),
                ))
            }
            Some(p) => Some(Poll {
                max_us: p.max_us,
                adaptive: p.adaptive.unwrap_or(true),
            }),
        };
        Ok(Export {
            name,
            transport,
            // Range-checked above.
            num_queues: num_queues as u16,
            queue_size: queue_size as u16,
            device,
            poll,
        })
    }

    fn luns(
        &self,
        at: &At<'_, '_>,
        export: &str,
        raw: Vec<crate::schema::LunFile>,
    ) -> Result<Vec<ScsiLun>, ConfigError> {
        if raw.is_empty() {
            return Err(at.err("luns", "a scsi export needs at least one LUN"));
        }
        let mut luns: Vec<ScsiLun> = Vec::with_capacity(raw.len());
        for (i, l) in raw.into_iter().enumerate() {
            let at = at.for_lun(i);
            let lun = l.lun.unwrap_or(i as u16);
            if lun > MAX_LUN {
                return Err(at.err("lun", format!("{lun} is beyond {MAX_LUN}")));
            }
            if luns.iter().any(|x| x.lun == lun) {
                return Err(at.err("lun", format!("LUN {lun} is listed twice")));
            }
            let wwn = match l.wwn.as_deref() {
                None => default_wwn(export, lun),
                Some(text) => parse_wwn(text).map_err(|m| at.err("wwn", m))?,
            };
            let mut serial = format!("{export}-{lun}");
            serial.truncate(MAX_SERIAL_LEN);
            let disk = self.disk(
                &at,
                DiskFields {
                    path: l.path,
                    format: l.format,
                    rbd: l.rbd,
                    readonly: l.readonly,
                    logical_block_size: l.logical_block_size,
                    serial: l.serial,
                    direct: l.direct,
                    write_cache: l.write_cache,
                    create: l.create,
                    size: l.size,
                },
                serial,
            )?;
            luns.push(ScsiLun {
                lun,
                disk,
                rotational: l.rotational.unwrap_or(false),
                wwn,
            });
        }
        Ok(luns)
    }

    fn disk(
        &self,
        at: &At<'_, '_>,
        raw: DiskFields,
        default_serial: String,
    ) -> Result<Disk, ConfigError> {
        let format = match raw.format.as_deref() {
            None | Some("raw") => BackingFormat::Raw,
            Some("qcow2") => BackingFormat::Qcow2,
            Some("rbd") => BackingFormat::Rbd,
            Some("null") => BackingFormat::Null,
            Some(other) => {
                return Err(at.err(
                    "format",
                    format!("unknown format {other:?} (use raw, qcow2, rbd or null)"),
                ))
            }
        };
        if format == BackingFormat::Null {
            return self.null_disk(at, raw, default_serial);
        }
        let (path, rbd) = self.location(at, format, raw.path, raw.rbd, raw.direct.is_some())?;
        let logical_block_size = raw.logical_block_size.unwrap_or(512);
        if !matches!(logical_block_size, 512 | 4096) {
            return Err(at.err(
                "logical_block_size",
                format!("{logical_block_size} must be 512 or 4096"),
            ));
        }
        let serial = raw.serial.unwrap_or(default_serial);
        if serial.is_empty()
            || serial.len() > MAX_SERIAL_LEN
            || !serial.chars().all(|c| c.is_ascii_graphic() || c == ' ')
        {
            return Err(at.err(
                "serial",
                format!("{serial:?} must be 1 to {MAX_SERIAL_LEN} printable ASCII characters"),
            ));
        }
        let write_cache = match raw.write_cache.as_deref() {
            None | Some("writeback") => WriteCache::Writeback,
            Some("writethrough") => WriteCache::Writethrough,
            Some(other) => {
                return Err(at.err(
                    "write_cache",
                    format!("unknown mode {other:?} (use writeback or writethrough)"),
                ))
            }
        };
        let readonly = raw.readonly.unwrap_or(false);
        let block_multiple = |field: &str, value: SizeValue| -> Result<u64, ConfigError> {
            let size = match value {
                SizeValue::Bytes(b) => b,
                SizeValue::Text(t) => parse_size(&t).map_err(|m| at.err(field, m))?,
            };
            if size == 0 || size % u64::from(logical_block_size) != 0 {
                return Err(at.err(
                    field,
                    format!(
                        "size {size} must be a positive multiple of logical_block_size {logical_block_size}"
                    ),
                ));
            }
            Ok(size)
        };
        let create = match raw.create {
            None => None,
            Some(c) => {
                let size = block_multiple("create", c.size)?;
                if readonly {
                    return Err(
                        at.err("create", "a readonly export cannot create its backing file")
                    );
                }
                if c.backing.is_some() && format != BackingFormat::Qcow2 {
                    return Err(at.err("create", "a backing file needs format: qcow2"));
                }
                Some(CreateSpec {
                    size,
                    backing: c.backing.map(PathBuf::from),
                })
            }
        };
        let size = match raw.size {
            None => None,
            Some(value) => {
                let size = block_multiple("size", value)?;
                if readonly {
                    return Err(at.err(
                        "size",
                        "a readonly export cannot grow its backing store (remove size:)",
                    ));
                }
                if let Some(c) = create.as_ref().filter(|c| c.size > size) {
                    return Err(at.err(
                        "size",
                        format!(
                            "{size} is smaller than create: {{ size: {} }}; shrinking is refused",
                            c.size
                        ),
                    ));
                }
                Some(size)
            }
        };
        Ok(Disk {
            path,
            format,
            rbd,
            readonly,
            logical_block_size,
            serial,
            direct: raw.direct.unwrap_or(true),
            write_cache,
            create,
            size,
        })
    }

    /// A `format: null` disk: `size:` is required, there is no file (`path`, `create`,
    /// `direct` are refused rather than ignored). Its `create` carries the size, so the
    /// daemon "creates" it like a missing file and never looks for one.
    fn null_disk(
        &self,
        at: &At<'_, '_>,
        mut raw: DiskFields,
        default_serial: String,
    ) -> Result<Disk, ConfigError> {
        for (field, given) in [
            ("path", raw.path.is_some()),
            ("create", raw.create.is_some()),
            ("direct", raw.direct.is_some()),
        ] {
            if given {
                return Err(at.err(
                    field,
                    "format: null stores nothing and has no backing file; give only size:",
                ));
            }
        }
        let Some(size) = raw.size.take() else {
            return Err(at.err("size", "is required with format: null"));
        };
        raw.path = Some(String::new());
        raw.format = Some("raw".to_string());
        raw.direct = Some(false);
        raw.create = Some(crate::schema::CreateFile {
            size: size.clone(),
            backing: None,
        });
        raw.size = Some(size);
        // Nothing is created on a read-only null disk either; check the rest as writable.
        let readonly = raw.readonly.take().unwrap_or(false);
        let disk = self.disk(at, raw, default_serial)?;
        Ok(Disk {
            path: PathBuf::new(),
            format: BackingFormat::Null,
            readonly,
            ..disk
        })
    }

    /// Names and sockets are unique; a backing file is shared only between readonly disks.
    fn check_unique(&self, exports: &[Export]) -> Result<(), ConfigError> {
        let mut names: HashMap<&str, usize> = HashMap::new();
        let mut transports: HashMap<&Transport, usize> = HashMap::new();
        let mut paths: HashMap<&Path, (usize, bool)> = HashMap::new();
        for (i, e) in exports.iter().enumerate() {
            let at = At {
                validator: self,
                index: i,
                export: e.name.clone(),
                lun: None,
            };
            let first_line = |j: usize| {
                self.index
                    .export_line(j)
                    .map(|l| format!(" (line {l})"))
                    .unwrap_or_default()
            };
            if let Some(&j) = names.get(e.name.as_str()) {
                return Err(at.err(
                    "name",
                    format!(
                        "duplicate name, also used by export #{}{}",
                        j + 1,
                        first_line(j)
                    ),
                ));
            }
            names.insert(&e.name, i);
            if let Some(&j) = transports.get(&e.transport) {
                let field = match e.transport {
                    Transport::Socket(_) => "socket",
                    Transport::Vvu(_) => "vvu",
                };
                return Err(at.err(
                    field,
                    format!(
                        "duplicate {}, also used by export {:?}{}",
                        e.transport,
                        exports[j].name,
                        first_line(j)
                    ),
                ));
            }
            transports.insert(&e.transport, i);
            for (k, disk) in e.disks().into_iter().enumerate() {
                if disk.format == BackingFormat::Null {
                    continue;
                }
                if let Some(&(j, readonly)) = paths.get(disk.path.as_path()) {
                    if !(disk.readonly && readonly) {
                        let at = match e.device {
                            Device::Scsi(_) => at.for_lun(k),
                            Device::Blk(_) => At { lun: None, ..at },
                        };
                        return Err(at.err(
                            "path",
                            format!(
                                "backing file {} is also used by export {:?}{}; only readonly disks may share one",
                                disk.path.display(),
                                exports[j].name,
                                first_line(j)
                            ),
                        ));
                    }
                }
                paths.insert(&disk.path, (i, disk.readonly));
            }
        }
        Ok(())
    }
}

fn parse_mode(value: &ModeValue) -> Result<u32, String> {
    let digits = match value {
        ModeValue::Text(t) => t.trim().trim_start_matches("0o").to_string(),
        ModeValue::Number(n) => n.to_string(),
    };
    let mode = u32::from_str_radix(&digits, 8)
        .map_err(|_| format!("{digits:?} is not an octal mode such as \"0660\""))?;
    if mode > 0o777 {
        return Err(format!("{digits:?} has bits beyond 0777"));
    }
    Ok(mode)
}
