//! The `rbd:` section of a `format: rbd` disk: its validated form [`RbdImage`] and the
//! rules (pool and image required, names without `/` or `@`, no `path:` or `direct:`).

use std::path::PathBuf;

use super::{At, BackingFormat, ConfigError, Validator};
use crate::schema::RbdFile;

/// A Ceph RBD image and how to reach its cluster (`rbd:` of a `format: rbd` disk).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdImage {
    /// Pool name.
    pub pool: String,
    /// RADOS namespace in the pool.
    pub namespace: Option<String>,
    /// Image name.
    pub image: String,
    /// `ceph.conf` (`None`: librados's default search).
    pub conf: Option<PathBuf>,
    /// Client id without `client.` (`None`: `admin`).
    pub client_id: Option<String>,
    /// Keyring (`None`: what `ceph.conf` says).
    pub keyring: Option<PathBuf>,
    /// Seconds an operation waits for an unreachable cluster before failing (`None`: no
    /// limit).
    pub io_timeout: Option<u64>,
}

impl RbdImage {
    /// `rbd:pool/image` or `rbd:pool/namespace/image`: the disk's [`Disk::path`], as QEMU
    /// spells an RBD image.
    pub fn name(&self) -> PathBuf {
        PathBuf::from(match &self.namespace {
            Some(ns) => format!("rbd:{}/{ns}/{}", self.pool, self.image),
            None => format!("rbd:{}/{}", self.pool, self.image),
        })
    }
}

impl Validator<'_> {
    /// Where a disk's data is: a file path, or an RBD image (then its name is the path).
    pub(super) fn location(
        &self,
        at: &At<'_, '_>,
        format: BackingFormat,
        path: Option<String>,
        rbd: Option<RbdFile>,
        direct_set: bool,
    ) -> Result<(PathBuf, Option<Box<RbdImage>>), ConfigError> {
        Ok(match (format, rbd) {
            (BackingFormat::Rbd, Some(r)) => {
                if path.is_some() {
                    return Err(at.err(
                        "path",
                        "an rbd disk names its image in rbd: (pool, image), not path",
                    ));
                }
                if direct_set {
                    return Err(at.err(
                        "direct",
                        "applies to files only (an rbd disk has no page cache; librbd's cache is off)",
                    ));
                }
                let image = self.rbd(at, r)?;
                (image.name(), Some(Box::new(image)))
            }
            (BackingFormat::Rbd, None) => {
                return Err(at.err(
                    "rbd",
                    "is required with format: rbd (pool and image, optionally namespace, conf, client_id, keyring)",
                ))
            }
            (_, Some(_)) => return Err(at.err("rbd", "needs format: rbd")),
            (_, None) => (
                path
                    .as_deref()
                    .map(|s| self.resolve(s))
                    .ok_or_else(|| at.err("path", "is required"))?,
                None,
            ),
        })
    }

    /// The `rbd:` section of a disk.
    fn rbd(&self, at: &At<'_, '_>, raw: RbdFile) -> Result<RbdImage, ConfigError> {
        let name = |field: &str, value: Option<String>, required: bool| {
            let full = format!("rbd.{field}");
            match value {
                None if required => Err(at.err(&full, "is required")),
                None => Ok(None),
                Some(v) if v.is_empty() || v.contains(['/', '@', '\0']) || v.trim() != v => Err(at
                    .err(
                        &full,
                        format!("{v:?} must be non-empty, without '/', '@' or surrounding spaces"),
                    )),
                Some(v) => Ok(Some(v)),
            }
        };
        let pool = name("pool", raw.pool, true)?.unwrap_or_default();
        let image = name("image", raw.image, true)?.unwrap_or_default();
        let namespace = name("namespace", raw.namespace, false)?;
        let client_id = name("client_id", raw.client_id, false)?;
        if let Some(id) = client_id.as_deref().filter(|id| id.starts_with("client.")) {
            return Err(at.err(
                "rbd.client_id",
                format!("{id:?}: give the id without \"client.\" (as rbd --id takes it)"),
            ));
        }
        if raw.io_timeout == Some(0) {
            return Err(at.err(
                "rbd.io_timeout",
                "must be at least 1 second (leave it out for no limit)",
            ));
        }
        Ok(RbdImage {
            pool,
            namespace,
            image,
            conf: raw.conf.as_deref().map(|p| self.resolve(p)),
            client_id,
            keyring: raw.keyring.as_deref().map(|p| self.resolve(p)),
            io_timeout: raw.io_timeout,
        })
    }
}
