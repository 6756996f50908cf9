//! Checks of a qcow2 image's header that imago does not make and then trips over: an image
//! failing them is refused with an error, where imago would panic (and take the daemon, and
//! every other export, down with it). Found by the `qcow2_open` fuzz target.
//!
//! - A feature name table extension (qcow2 spec, "Feature name table": 48-byte entries)
//!   whose length is not a multiple of 48: imago 0.2.6 indexes its last, short entry past
//!   its end (`qcow2/metadata.rs`, `HeaderExtension::deserialize`).
//!
//! The walk over the header extensions is imago's own (v3 images only, from
//! `header_length`, within the first cluster, 8-byte aligned, until the end marker);
//! whatever it finds wrong that imago itself reports is left to imago's error.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Header extension type of the feature name table.
const FEATURE_NAME_TABLE: u32 = 0x6803_f857;
/// Bytes of one feature name table entry: type, bit, 46 bytes of name.
const FEATURE_NAME_ENTRY: u32 = 48;
/// Header extension type of the end marker.
const END: u32 = 0;

fn be32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at + 4)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

/// Checks the header extensions of the qcow2 image in `file`.
pub(super) fn check(file: &File) -> io::Result<()> {
    let mut fixed = [0u8; 104];
    if file.read_exact_at(&mut fixed, 0).is_err() {
        // Too short for a v3 header: imago says what is wrong.
        return Ok(());
    }
    let (Some(version), Some(cluster_bits), Some(header_length)) =
        (be32(&fixed, 4), be32(&fixed, 20), be32(&fixed, 100))
    else {
        return Ok(());
    };
    // qcow2 clusters are 512 bytes to 2 MiB; imago refuses the others.
    if version != 3 || !(9..=21).contains(&cluster_bits) {
        return Ok(());
    }
    let cluster_size = 1usize << cluster_bits;
    let mut cluster = vec![0u8; cluster_size];
    let read = file.read_at(&mut cluster, 0)?;
    cluster.truncate(read);
    let mut at = header_length as usize;
    // Every extension takes at least its 8-byte header: the walk ends within the cluster.
    while at + 8 <= cluster_size {
        let (Some(kind), Some(length)) = (be32(&cluster, at), be32(&cluster, at + 4)) else {
            return Ok(());
        };
        if kind == END {
            return Ok(());
        }
        if kind == FEATURE_NAME_TABLE && length % FEATURE_NAME_ENTRY != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "malformed qcow2 header: a feature name table of {length} bytes is not a whole number of {FEATURE_NAME_ENTRY}-byte entries"
                ),
            ));
        }
        at += 8 + (length as usize).next_multiple_of(8);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    // Test code: a failed unwrap is a failed test, with its message.
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::fs::OpenOptions;

    use super::*;
    use crate::disk::OpenError;
    use crate::qcow2::{Qcow2Disk, Qcow2Options};

    /// A new 1 MiB image whose header extensions end with a feature name table of
    /// `length` bytes (zeroes).
    fn image_with_feature_table(dir: &std::path::Path, length: u32) -> std::path::PathBuf {
        let path = dir.join("features.qcow2");
        drop(
            Qcow2Disk::open(&Qcow2Options {
                path: path.clone(),
                readonly: false,
                direct: false,
                create: Some((1 << 20, None)),
            })
            .unwrap(),
        );
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut header = vec![0u8; 4096];
        file.read_exact_at(&mut header, 0).unwrap();
        assert_eq!(be32(&header, 4), Some(3), "imago creates v3 images");
        // Walk to the end marker and put the table there, a new end marker after it.
        let mut at = be32(&header, 100).unwrap() as usize;
        while be32(&header, at).unwrap() != END {
            at += 8 + (be32(&header, at + 4).unwrap() as usize).next_multiple_of(8);
        }
        let mut ext = FEATURE_NAME_TABLE.to_be_bytes().to_vec();
        ext.extend_from_slice(&length.to_be_bytes());
        ext.resize(8 + (length as usize).next_multiple_of(8), 0);
        ext.extend_from_slice(&[0; 8]);
        file.write_all_at(&ext, at as u64).unwrap();
        path
    }

    fn open_readonly(path: &std::path::Path) -> Result<Qcow2Disk, OpenError> {
        Qcow2Disk::open(&Qcow2Options {
            path: path.to_path_buf(),
            readonly: true,
            direct: false,
            create: None,
        })
    }

    /// Found by the `qcow2_open` fuzz target: imago 0.2.6 panics on a feature name table
    /// whose last entry is short (`feat[2..]` of a 1-byte chunk); the image is refused.
    #[test]
    fn a_feature_name_table_with_a_partial_entry_is_refused_instead_of_panicking() {
        let dir = tempfile::tempdir().unwrap();
        let path = image_with_feature_table(dir.path(), 1);
        let Err(err) = open_readonly(&path) else {
            panic!("the image opened");
        };
        let OpenError::Open { source, .. } = &err else {
            panic!("{err:?}");
        };
        assert_eq!(source.kind(), io::ErrorKind::InvalidData, "{source}");
        assert!(
            source.to_string().contains("feature name table of 1 bytes"),
            "{source}"
        );
        assert!(check(&File::open(&path).unwrap()).is_err());
    }

    /// Whole entries are what the spec allows: such an image opens.
    #[test]
    fn a_feature_name_table_of_whole_entries_opens() {
        let dir = tempfile::tempdir().unwrap();
        let path = image_with_feature_table(dir.path(), 2 * FEATURE_NAME_ENTRY);
        check(&File::open(&path).unwrap()).unwrap();
        let disk = open_readonly(&path).unwrap();
        assert_eq!(disk.info().size, 1 << 20);
    }
}
