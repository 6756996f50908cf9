//! The in-flight table of a queue: requests handed to the disk, keyed by a small integer
//! that travels with the disk operation and comes back with its completion. Keys are reused
//! once released, so the table stays as large as the deepest queue.

/// Requests in flight, addressed by key.
#[derive(Debug)]
pub(crate) struct InFlightTable<T> {
    entries: Vec<Option<T>>,
    free: Vec<usize>,
}

impl<T> InFlightTable<T> {
    pub(crate) fn new() -> Self {
        InFlightTable {
            entries: Vec::new(),
            free: Vec::new(),
        }
    }

    /// A key for a new entry (filled with [`InFlightTable::fill`] once its I/O is queued,
    /// or given back with [`InFlightTable::release`]).
    pub(crate) fn reserve(&mut self) -> usize {
        self.free.pop().unwrap_or_else(|| {
            self.entries.push(None);
            self.entries.len() - 1
        })
    }

    /// Stores the request of a reserved key.
    pub(crate) fn fill(&mut self, key: usize, value: T) {
        if let Some(slot) = self.entries.get_mut(key) {
            *slot = Some(value);
        }
    }

    /// The request of `key`, if in flight.
    pub(crate) fn get_mut(&mut self, key: usize) -> Option<&mut T> {
        self.entries.get_mut(key).and_then(Option::as_mut)
    }

    /// Removes the request of `key` and frees the key.
    pub(crate) fn take(&mut self, key: usize) -> Option<T> {
        let value = self.entries.get_mut(key).and_then(Option::take)?;
        self.free.push(key);
        Some(value)
    }

    /// Gives back a reserved key that was never filled.
    pub(crate) fn release(&mut self, key: usize) {
        if self.entries.get(key).is_some_and(Option::is_none) {
            self.free.push(key);
        }
    }

    /// Requests in flight.
    pub(crate) fn len(&self) -> usize {
        self.entries.len() - self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::InFlightTable;

    #[test]
    fn keys_are_reused_and_counted() {
        let mut t = InFlightTable::new();
        let a = t.reserve();
        t.fill(a, "a");
        let b = t.reserve();
        t.release(b);
        assert_eq!(t.len(), 1);
        let c = t.reserve();
        assert_eq!(c, b, "released key reused");
        t.fill(c, "c");
        assert_eq!(t.take(a), Some("a"));
        assert_eq!(t.take(a), None, "taken once");
        assert_eq!(t.get_mut(c), Some(&mut "c"));
        assert_eq!(t.len(), 1);
        assert_eq!(t.take(99), None);
    }
}
