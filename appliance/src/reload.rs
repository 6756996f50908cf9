//! Live configuration: the exports of `exports.yaml` as they run, and reloads of the file.
//!
//! A reload reads the file, validates all of it and checks the backing files of what it
//! adds; an invalid file changes nothing (the error names file, line, export and field).
//! A valid one is applied by [`config::diff`] against what runs: removed exports stop
//! (accepted requests complete, the frontend is disconnected, the socket removed), then
//! changed exports are changed where that is safe under a live frontend and refused
//! field by field where it is not (the running definition stays), then added exports start.
//! Nginx's "validate fully, keep the old configuration on failure" and Prometheus'
//! `last_reload_successful` are the models: a reload succeeds only when everything the file
//! says is in effect.
//!
//! What a live export takes: a grown `size:` (the backing store is grown and the frontend
//! told, see [`RunningExport::resize`]); a smaller one is refused (shrinking is), and so is
//! every other setting. A change is all-or-nothing per export: one refused field keeps the
//! whole running definition. Every reload, whether the file changed or not (SIGHUP with the
//! same file), also looks for backing stores that grew underneath (`truncate -s`,
//! `lvextend`) and, where no `size:` pins the capacity, gives the device the new size.
//!
//! An export that cannot start because another client (another appliance) holds its RBD
//! image's exclusive lock is a standby: it is retried every [`STANDBY_RETRY`] and starts
//! as soon as the lock is free (the holder stopped, or died and its watch expired).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use config::{Config, ConfigError, Device, Export, ExportChange};

use crate::export::{Resized, RunningExport, SocketSource};
use crate::metrics::{ExportState, Metrics};

/// How often an export waiting for its RBD image's lock (a standby) tries again.
pub const STANDBY_RETRY: Duration = Duration::from_secs(1);

/// The exports of one config file, as they run.
pub struct Exports {
    path: PathBuf,
    /// The file's text at the last reload, to ignore events that changed nothing.
    text: String,
    /// What runs: the config with every export's running definition; exports that failed to
    /// start are absent, so the next reload tries them again.
    applied: Config,
    running: BTreeMap<String, RunningExport>,
    /// The last valid file: what an edit adds is judged against it, so an export that
    /// failed to start earlier does not block later edits.
    last_valid: Config,
    /// Whether the last reload succeeded; an unchanged file is skipped only after a
    /// success, so restoring a file after a failure is applied (and counted).
    last_ok: bool,
    /// Exports of the file that could not start (reported as `failed`).
    failed: BTreeSet<String>,
    /// Of those, the ones waiting for their RBD image's exclusive lock (standbys), retried
    /// every [`STANDBY_RETRY`].
    standby: BTreeSet<String>,
    /// Exports by state, reload results.
    metrics: Metrics,
}

impl Exports {
    /// Loads `path` and starts its exports. An invalid file is an error; an export that
    /// cannot start is logged and left out, the others run. `sandbox` runs once the file is
    /// valid and the state directory exists, before anything serves (it enters the
    /// daemon's sandbox); its error is the start's.
    pub fn start(
        path: &Path,
        metrics: Metrics,
        sandbox: impl FnOnce(&Config) -> anyhow::Result<()>,
    ) -> anyhow::Result<Self> {
        let text = read_config(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let config = parse(path, &text)?;
        if let Some(e) = config::aliased_paths(&config, &text, path)
            .into_iter()
            .next()
        {
            return Err(e.into());
        }
        std::fs::create_dir_all(&config.state_dir)
            .with_context(|| format!("cannot create state_dir {}", config.state_dir.display()))?;
        sandbox(&config)?;
        let mut exports = Exports {
            path: path.to_path_buf(),
            text,
            applied: Config {
                exports: Vec::new(),
                ..config.clone()
            },
            running: BTreeMap::new(),
            last_valid: config.clone(),
            last_ok: true,
            failed: Default::default(),
            standby: Default::default(),
            metrics,
        };
        exports.metrics.serve(config.metrics_listen);
        for export in &config.exports {
            exports.start_export(export, &config);
        }
        if exports.running.is_empty() && exports.standby.is_empty() && !config.exports.is_empty() {
            anyhow::bail!(
                "none of the {} exports could be started",
                config.exports.len()
            );
        }
        tracing::info!(
            "serving {} of {} exports from {}",
            exports.running.len(),
            config.exports.len(),
            path.display()
        );
        Ok(exports)
    }

    /// Re-reads the file and applies what changed, then picks up backing stores that grew
    /// underneath; `why` names the trigger for the log. Unless `forced` (SIGHUP: also
    /// retries exports that failed to start), a file whose text did not change is left
    /// alone. Returns `None` when the file was left alone (nothing done but the growth
    /// check), else whether the reload succeeded: the file is valid and everything it says
    /// is in effect.
    pub fn reload(&mut self, why: &str, forced: bool) -> Option<bool> {
        let result = self.reload_file(why, forced);
        self.follow_grown_stores(why);
        if let Some(ok) = result {
            self.last_ok = ok;
        }
        result
    }

    /// The file part of [`Exports::reload`].
    fn reload_file(&mut self, why: &str, forced: bool) -> Option<bool> {
        let text = match read_config(&self.path) {
            Ok(text) => text,
            Err(e) => {
                tracing::error!(
                    "configuration reload ({why}) failed, keeping the running configuration: cannot read {}: {e}",
                    self.path.display()
                );
                return Some(false);
            }
        };
        if text == self.text && !forced && self.last_ok {
            tracing::debug!("configuration reload ({why}): file unchanged");
            return None;
        }
        self.text = text.clone();
        let new = match parse(&self.path, &text) {
            Ok(config) => config,
            Err(e) => {
                tracing::error!(
                    "configuration reload ({why}) failed, keeping the running configuration: {e}"
                );
                return Some(false);
            }
        };
        let diff = config::diff(&self.applied, &new);
        // What this edit adds, against the last valid file (not against what runs: an
        // export that failed before is retried, not held against the edit).
        let added_lun = |name: &str, lun: Option<u16>| {
            let before = self.last_valid.exports.iter().find(|e| e.name == name);
            match (before, lun) {
                (None, _) => true,
                (Some(export), Some(lun)) => match &export.device {
                    config::Device::Scsi(luns) => !luns.iter().any(|l| l.lun == lun),
                    config::Device::Blk(_) => true,
                },
                (Some(_), None) => false,
            }
        };
        let mut missing = config::missing_backing_files(&new, &text, &self.path, added_lun);
        missing.extend(config::aliased_paths(&new, &text, &self.path));
        if !missing.is_empty() {
            for e in &missing {
                tracing::error!(
                    "configuration reload ({why}) failed, keeping the running configuration: {e}"
                );
            }
            return Some(false);
        }
        self.last_valid = new.clone();
        tracing::info!(
            "configuration reload ({why}): {} added, {} removed, {} changed",
            diff.added.len(),
            diff.removed.len(),
            diff.changed.len()
        );
        let mut complete = self.apply_globals(&new);
        for export in &diff.removed {
            self.stop_export(&export.name);
            tracing::info!(export = export.name, "export removed");
        }
        for (old, new_export) in &diff.changed {
            complete &= self.change_export(old, new_export, &new, &text);
        }
        for export in &diff.added {
            complete &= self.start_export(export, &new);
        }
        // Exports that could not start and are no longer in the file are no longer failed.
        let gone: Vec<String> = self
            .failed
            .iter()
            .filter(|name| !new.exports.iter().any(|e| &e.name == *name))
            .cloned()
            .collect();
        for name in gone {
            self.failed.remove(&name);
            self.standby.remove(&name);
            self.metrics.remove_export(&name);
        }
        tracing::info!(
            complete,
            "configuration reload ({why}) applied: serving {} exports: {}",
            self.running.len(),
            self.running.keys().cloned().collect::<Vec<_>>().join(", ")
        );
        Some(complete)
    }

    /// How long the main loop may sleep before [`Exports::retry_standby`] is due: `None`
    /// when no export waits for a lock.
    pub fn standby_retry(&self) -> Option<Duration> {
        (!self.standby.is_empty()).then_some(STANDBY_RETRY)
    }

    /// Tries again to start the exports waiting for their RBD image's lock.
    pub fn retry_standby(&mut self) {
        let config = self.last_valid.clone();
        for name in self.standby.clone() {
            let export = config.exports.iter().find(|e| e.name == name);
            match export {
                Some(export) if !self.running.contains_key(&name) => {
                    self.start_export(export, &config);
                }
                _ => {
                    self.standby.remove(&name);
                }
            }
        }
    }

    /// Stops every export (daemon exit).
    pub fn stop_all(&mut self) {
        let names: Vec<String> = self.running.keys().cloned().collect();
        for name in names {
            self.stop_export(&name);
            tracing::info!(export = name, "stopped");
        }
    }

    /// Settings outside `exports:`. Returns whether all of them are in effect.
    fn apply_globals(&mut self, new: &Config) -> bool {
        let mut complete = true;
        if new.state_dir != self.applied.state_dir {
            match std::fs::create_dir_all(&new.state_dir) {
                Ok(()) => self.applied.state_dir = new.state_dir.clone(),
                Err(e) => {
                    tracing::error!("cannot create state_dir {}: {e}", new.state_dir.display());
                    complete = false;
                }
            }
        }
        if new.socket_permissions != self.applied.socket_permissions {
            for (name, export) in &self.running {
                if let Err(e) = export.apply_socket_permissions(&new.socket_permissions) {
                    tracing::error!(export = name, "socket_permissions not applied: {e:#}");
                    complete = false;
                }
            }
            tracing::info!("socket_permissions applied to the running exports' sockets");
            self.applied.socket_permissions = new.socket_permissions.clone();
        }
        if new.run_as != self.applied.run_as {
            tracing::error!(
                "{}: field \"run_as\": changed from {:?} to {:?}; the daemon keeps running as it does until the next start",
                self.path.display(),
                self.applied.run_as,
                new.run_as
            );
            complete = false;
        }
        if new.metrics_listen != self.applied.metrics_listen {
            tracing::error!(
                "{}: field \"metrics.listen\": changed from {:?} to {:?}; the endpoint stays where it is until the next start",
                self.path.display(),
                self.applied.metrics_listen,
                new.metrics_listen
            );
            complete = false;
        }
        complete
    }

    /// Starts `export` under the settings of `config`. Returns whether it runs.
    fn start_export(&mut self, export: &Export, config: &Config) -> bool {
        let socket = match &export.transport {
            config::Transport::Socket(path) => SocketSource::Path(path, &config.socket_permissions),
            config::Transport::Vvu(device) => SocketSource::Vvu(device),
        };
        match RunningExport::start(export, socket, Some(&config.state_dir)) {
            Ok(running) => {
                if self.standby.remove(&export.name) {
                    tracing::info!(
                        export = export.name,
                        "took the exclusive lock over from the previous holder: serving"
                    );
                }
                self.failed.remove(&export.name);
                self.metrics.add_export(export, running.backend());
                self.running.insert(export.name.clone(), running);
                self.applied.exports.push(export.clone());
                true
            }
            Err(e) => {
                // One broken LUN must not take the others down.
                self.failed.insert(export.name.clone());
                self.metrics
                    .set_export_state(&export.name, ExportState::Failed);
                if lock_held(&e) {
                    if self.standby.insert(export.name.clone()) {
                        tracing::warn!(
                            export = export.name,
                            "{e:#}; waiting for it as a standby (retried every {} s; a dead holder's lock is broken once its watch on the image expired)",
                            STANDBY_RETRY.as_secs()
                        );
                    }
                    return false;
                }
                // Where the export is in the file, so the operator finds it.
                let at = config
                    .exports
                    .iter()
                    .position(|x| x.name == export.name)
                    .and_then(|i| config::field_line(&self.text, i, None, "name"))
                    .map(|line| format!("{}:{line}: ", self.path.display()))
                    .unwrap_or_default();
                tracing::error!(export = export.name, "{at}export not started: {e:#}");
                false
            }
        }
    }

    fn stop_export(&mut self, name: &str) {
        if let Some(export) = self.running.remove(name) {
            export.stop();
        }
        self.metrics.remove_export(name);
        self.applied.exports.retain(|e| e.name != name);
    }

    /// Applies what can change under a live frontend (scsi LUNs added or removed, a grown
    /// `size:`) and refuses the rest, field by field; one refusal keeps the whole running
    /// definition. Returns whether the whole change is in effect.
    fn change_export(&mut self, old: &Export, new: &Export, config: &Config, text: &str) -> bool {
        let index = config
            .exports
            .iter()
            .position(|e| e.name == new.name)
            .unwrap_or(0);
        let refuse = |change: &ExportChange, why: String| {
            let (lun, field) = match change {
                ExportChange::Setting { field, lun, .. } => (*lun, *field),
                ExportChange::Size { lun, .. } => (*lun, "size"),
                ExportChange::LunAdded(position, _) => (Some(*position), "lun"),
                ExportChange::LunRemoved(_) => (None, "luns"),
            };
            let error = ConfigError {
                file: self.path.clone(),
                line: config::field_line(text, index, lun, field),
                export: Some(new.name.clone()),
                field: Some(change.field_path()),
                message: why,
            };
            tracing::error!("configuration change refused: {error}");
        };
        let Some(running) = self.running.get_mut(&new.name) else {
            tracing::error!(export = new.name, "a changed export is not running");
            return false;
        };
        let changes = config::export_changes(old, new);
        // Everything is checked before anything is applied.
        let mut refused = false;
        for change in &changes {
            let why = match change {
                ExportChange::Setting { old, new, .. } => Some(format!(
                    "cannot change while the export is live (running: {old}, file: {new}); the running definition stays: remove the export and add it back to apply it"
                )),
                ExportChange::Size {
                    old: Some(old),
                    new: Some(bytes),
                    ..
                } if change.is_shrink() => Some(format!(
                    "{bytes} is smaller than the running size {old}: shrinking is refused; the running size stays"
                )),
                ExportChange::Size {
                    lun,
                    new: Some(bytes),
                    ..
                } => running
                    .check_size(lun_id(new, *lun), *bytes)
                    .err()
                    .map(|e| e.to_string()),
                ExportChange::Size { new: None, .. } => None,
                ExportChange::LunAdded(..) | ExportChange::LunRemoved(_) => None,
            };
            if let Some(why) = why {
                refuse(change, why);
                refused = true;
            }
        }
        if refused {
            return false;
        }
        // LUNs removed, then added (a LUN number may move to another file), then sizes
        // grown.
        let mut effective = old.clone();
        let mut complete = true;
        let removals = changes
            .iter()
            .filter(|c| matches!(c, ExportChange::LunRemoved(_)));
        let additions = changes
            .iter()
            .filter(|c| matches!(c, ExportChange::LunAdded(..)));
        for change in removals.chain(additions) {
            let Device::Scsi(luns) = &mut effective.device else {
                break;
            };
            match change {
                ExportChange::LunRemoved(lun) => match running.remove_lun(lun.lun) {
                    Ok(()) => {
                        luns.retain(|l| l.lun != lun.lun);
                        tracing::info!(export = new.name, lun = lun.lun, "LUN removed");
                    }
                    Err(e) => {
                        tracing::error!(export = new.name, lun = lun.lun, "LUN not removed: {e:#}");
                        complete = false;
                    }
                },
                ExportChange::LunAdded(_, lun) => match running.add_lun(lun) {
                    Ok(()) => {
                        luns.push(lun.clone());
                        tracing::info!(export = new.name, lun = lun.lun, "LUN added");
                    }
                    Err(e) => {
                        refuse(change, format!("LUN {} not added: {e:#}", lun.lun));
                        complete = false;
                    }
                },
                _ => {}
            }
        }
        for change in &changes {
            let ExportChange::Size { lun, new: size, .. } = change else {
                continue;
            };
            let id = lun_id(new, *lun);
            match running.resize(id, *size) {
                Ok(resized) => {
                    log_resize(&new.name, id, "size: changed", resized.as_ref());
                    set_size(&mut effective, id, *size);
                }
                Err(e) => {
                    refuse(change, format!("{e:#}; the running size stays"));
                    complete = false;
                }
            }
        }
        if let Some(slot) = self.applied.exports.iter_mut().find(|e| e.name == new.name) {
            *slot = effective;
        }
        complete
    }

    /// Exports whose backing store grew underneath (`truncate -s`, `lvextend`) and whose
    /// capacity no `size:` pins take the store's new size, and their frontends are told.
    pub fn follow_grown_stores(&self, why: &str) {
        for export in &self.applied.exports {
            let Some(running) = self.running.get(&export.name) else {
                continue;
            };
            for config::DiskSlot { lun: id, disk, .. } in export.disk_slots() {
                let (store, capacity) = match (running.store_size(id), running.capacity(id)) {
                    (Ok(store), Ok(capacity)) => (store, capacity),
                    (Err(e), _) | (_, Err(e)) => {
                        tracing::warn!(export = export.name, lun = id, "{e:#}");
                        continue;
                    }
                };
                if store < capacity {
                    tracing::error!(
                        export = export.name,
                        lun = id,
                        path = %disk.path.display(),
                        "the backing store shrank underneath to {store} bytes, below the capacity in use ({capacity} bytes): requests past its end fail"
                    );
                    continue;
                }
                match disk.size {
                    Some(pinned) if store > pinned => tracing::warn!(
                        export = export.name,
                        lun = id,
                        path = %disk.path.display(),
                        "the backing store is {store} bytes, more than size: {pinned}; the capacity stays at size:"
                    ),
                    Some(_) => {}
                    None => match running.resize(id, None) {
                        Ok(resized) => log_resize(
                            &export.name,
                            id,
                            &format!("backing store grew underneath ({why})"),
                            resized.as_ref(),
                        ),
                        Err(e) => tracing::warn!(
                            export = export.name,
                            lun = id,
                            "cannot take the grown backing store: {e:#}"
                        ),
                    },
                }
            }
        }
    }
}

/// Whether `e` is an RBD image's exclusive lock held by another client.
fn lock_held(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<targets::disk::OpenError>(),
            Some(targets::disk::OpenError::RbdLockHeld { .. })
        )
    })
}

/// The LUN number of the LUN at `position` in `export`'s `luns:` (`None` for blk).
fn lun_id(export: &Export, position: Option<usize>) -> Option<u16> {
    match (&export.device, position) {
        (config::Device::Scsi(luns), Some(i)) => luns.get(i).map(|l| l.lun),
        _ => None,
    }
}

/// Records `size` as the `size:` of LUN `id` (`None`: the blk disk) of `export`.
fn set_size(export: &mut Export, id: Option<u16>, size: Option<u64>) {
    match (&mut export.device, id) {
        (config::Device::Blk(disk), None) => disk.size = size,
        (config::Device::Scsi(luns), Some(id)) => {
            if let Some(lun) = luns.iter_mut().find(|l| l.lun == id) {
                lun.disk.size = size;
            }
        }
        _ => {}
    }
}

/// Logs an online resize: which export and LUN, from how many bytes to how many, why, and
/// how the frontend was told.
fn log_resize(export: &str, lun: Option<u16>, why: &str, resized: Option<&Resized>) {
    match resized {
        Some(r) => tracing::info!(
            export,
            lun,
            old = r.old,
            new = r.new,
            "resized ({why}): {} -> {} bytes; {}",
            r.old,
            r.new,
            r.notified
        ),
        None => tracing::debug!(export, lun, "{why}: the capacity is unchanged"),
    }
}

/// Reads the config file, refusing anything but a regular file (a FIFO would block the
/// main loop on open).
fn read_config(path: &Path) -> std::io::Result<String> {
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    std::fs::read_to_string(path)
}

fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let base = path.parent().unwrap_or(Path::new("."));
    config::parse_str(text, path, base)
}
