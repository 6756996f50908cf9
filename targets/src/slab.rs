//! [`Slab`]: entries addressed by a small integer key that is reused once freed. Every
//! table of operations in flight in this crate is one: the request layer's requests (the
//! key travels with the disk operation as its token), a raw ring's operations (the key is
//! the io_uring user data), a qcow2 queue's tasks and its ring's system calls. The table
//! stays as large as the deepest queue it served.

/// Entries addressed by key.
#[derive(Debug)]
pub(crate) struct Slab<T> {
    entries: Vec<Option<T>>,
    free: Vec<usize>,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            entries: Vec::new(),
            free: Vec::new(),
        }
    }
}

impl<T> Slab<T> {
    /// Stores `value`; returns its key.
    pub(crate) fn insert(&mut self, value: T) -> usize {
        match self.free.pop() {
            Some(key) => {
                if let Some(slot) = self.entries.get_mut(key) {
                    *slot = Some(value);
                }
                key
            }
            None => {
                self.entries.push(Some(value));
                self.entries.len() - 1
            }
        }
    }

    /// The entry of `key`, if there is one.
    pub(crate) fn get_mut(&mut self, key: usize) -> Option<&mut T> {
        self.entries.get_mut(key).and_then(Option::as_mut)
    }

    /// Removes the entry of `key` and frees the key.
    pub(crate) fn remove(&mut self, key: usize) -> Option<T> {
        let value = self.entries.get_mut(key).and_then(Option::take)?;
        self.free.push(key);
        Some(value)
    }

    /// Entries stored.
    pub(crate) fn len(&self) -> usize {
        self.entries.len() - self.free.len()
    }

    /// No entry stored.
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes every entry.
    pub(crate) fn drain(&mut self) -> impl Iterator<Item = T> + '_ {
        self.free.clear();
        self.entries.drain(..).flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::Slab;

    #[test]
    fn keys_are_reused_and_counted() {
        let mut t = Slab::default();
        let a = t.insert("a");
        let b = t.insert("b");
        assert_eq!(t.remove(b), Some("b"));
        assert_eq!(t.len(), 1);
        let c = t.insert("c");
        assert_eq!(c, b, "freed key reused");
        assert_eq!(t.remove(a), Some("a"));
        assert_eq!(t.remove(a), None, "removed once");
        assert_eq!(t.get_mut(c), Some(&mut "c"));
        assert_eq!(t.len(), 1);
        assert_eq!(t.remove(99), None);
        assert_eq!(t.drain().collect::<Vec<_>>(), ["c"]);
        assert!(t.is_empty());
    }
}
