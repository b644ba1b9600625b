//! What the engine remembers about a file: the stat fields that change with its content
//! ([`FileStat`]) and a cached hash with the stat it had ([`StatRecord`]). Shared by the
//! stat cache (which decides when to trust a record) and the store (which persists them).

use super::hash::Hash;
use std::fs::Metadata;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// Nanoseconds since the Unix epoch (negative before it).
pub(crate) fn system_time_ns(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_nanos()).unwrap_or(i64::MAX),
    }
}

/// The parts of a file's metadata that change when its content may have changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileStat {
    /// Length in bytes.
    pub size: u64,
    /// Modification time, ns since the epoch.
    pub mtime_ns: i64,
    /// Status-change time, ns since the epoch; catches an mtime set back by `touch -d`.
    pub ctime_ns: i64,
    /// Inode number; catches a file replaced by rename.
    pub inode: u64,
}

impl FileStat {
    /// Stats `path`, following symlinks.
    pub fn of(path: &Path) -> std::io::Result<FileStat> {
        Ok(FileStat::from_metadata(&std::fs::metadata(path)?))
    }

    /// Extracts the fields from metadata already read.
    pub fn from_metadata(m: &Metadata) -> FileStat {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            FileStat {
                size: m.len(),
                mtime_ns: m.mtime().saturating_mul(1_000_000_000).saturating_add(m.mtime_nsec()),
                ctime_ns: m.ctime().saturating_mul(1_000_000_000).saturating_add(m.ctime_nsec()),
                inode: m.ino(),
            }
        }
        #[cfg(not(unix))]
        {
            FileStat { size: m.len(), mtime_ns: m.modified().map(system_time_ns).unwrap_or(0), ctime_ns: 0, inode: 0 }
        }
    }
}

/// A cached hash: the stat the file had and the time the hash was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct StatRecord {
    pub stat: FileStat,
    pub hash: Hash,
    /// Clock time taken *before* the file was stat'ed and read.
    pub recorded_ns: i64,
}
