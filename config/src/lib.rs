//! `exports.yaml`: the appliance's single source of truth.
//!
//! - [`schema`]: the serde structs exactly as an operator writes them (`deny_unknown_fields`).
//! - [`validate`]: turns the schema into typed [`Config`] / [`Export`] values, or a
//!   [`ConfigError`] that names the file, line, export and field.
//! - [`diff`]: the difference between two valid configs, which drives live reload.
//! - [`size`]: byte sizes written as integers or with K/M/G/T suffixes.
//! - [`check`]: checks against the machine (backing files that must exist) and the line of
//!   a field, for `check-config` and live reload.

mod check;
mod diff;
mod locate;
pub mod schema;
mod size;
mod validate;

pub use check::{aliased_paths, field_line, missing_backing_files};
pub use diff::{diff, export_changes, ConfigDiff, ExportChange};
pub use size::parse_size;
pub use validate::{
    load_file, parse_str, single_export, BackingFormat, Config, ConfigError, CreateSpec, Device,
    Disk, DiskSlot, Export, Poll, RbdImage, RunAs, ScsiLun, SocketPermissions, Transport,
    VvuDevice, WriteCache, DEFAULT_SOCKET_MODE, MAX_POLL_US,
};
