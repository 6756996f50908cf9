//! The difference between two valid configs, keyed by export name: what live reload applies.

use crate::validate::{Config, Export};

/// Exports added, removed and changed between an old and a new config.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ConfigDiff {
    /// In the new config only.
    pub added: Vec<Export>,
    /// In the old config only.
    pub removed: Vec<Export>,
    /// In both under the same name, with different settings: `(old, new)`.
    pub changed: Vec<(Export, Export)>,
}

impl ConfigDiff {
    /// True when the two configs declare the same exports.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// Computes what changed from `old` to `new`.
pub fn diff(old: &Config, new: &Config) -> ConfigDiff {
    let find = |c: &Config, name: &str| c.exports.iter().find(|e| e.name == name).cloned();
    let mut result = ConfigDiff::default();
    for export in &new.exports {
        match find(old, &export.name) {
            None => result.added.push(export.clone()),
            Some(previous) if previous != *export => {
                result.changed.push((previous, export.clone()))
            }
            Some(_) => {}
        }
    }
    for export in &old.exports {
        if find(new, &export.name).is_none() {
            result.removed.push(export.clone());
        }
    }
    result
}
