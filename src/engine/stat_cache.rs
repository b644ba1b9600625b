//! The stat cache: hash each file once, and re-read it only when its stat changed or the
//! cached hash may be racy (git's racy-clean rule).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use super::file_stat::{system_time_ns, FileStat, StatRecord};
use super::hash::{hash_file, Hash};
use super::store::Store;
use super::EngineError;

/// How much older than the moment of hashing a file's mtime must be for its cached hash
/// to be trusted. Covers coarse filesystem timestamps (FAT: 2 s; ext4 and tmpfs take
/// them from the kernel's tick, milliseconds) and small clock skew with network file
/// systems. A file modified inside this window is simply hashed again next time.
pub const RACY_MARGIN_NS: i64 = 2_000_000_000;

/// The margin for files whose mtime has a sub-second part: their filesystem keeps
/// sub-second timestamps (ext4, xfs, btrfs, tmpfs, NTFS; exFAT's are 10 ms), which Linux
/// takes from its coarse clock (one tick, at most 10 ms), so two writes with one stat are at
/// most a tick apart. Files rebuilt moments after they were written (a no-op rebuild right
/// after a build) are then trusted after 100 ms instead of 2 s.
pub const FINE_RACY_MARGIN_NS: i64 = 100_000_000;

/// A source of "now", abstracted so freshness tests can move time without sleeping.
pub trait Clock: Send + Sync {
    /// Nanoseconds since the Unix epoch.
    fn now_ns(&self) -> i64;
}

/// The system's wall clock, the one file timestamps come from.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ns(&self) -> i64 {
        system_time_ns(SystemTime::now())
    }
}

/// Git's racy-clean rule: trust the record only if the file looks the same and its mtime
/// was older than the record by the margin. A file rewritten right after it was hashed,
/// with the same size and an mtime that the filesystem rounded to the same value, looks
/// unchanged; its mtime is then within the margin of the record, so it is re-read.
/// `margin_ns` is the coarse margin; see [`margin_for`].
pub(crate) fn is_trusted(record: &StatRecord, current: &FileStat, margin_ns: i64) -> bool {
    record.stat == *current && current.mtime_ns.saturating_add(margin_for(current, margin_ns)) <= record.recorded_ns
}

/// The racy margin for a file: [`FINE_RACY_MARGIN_NS`] (or the coarse margin, if smaller)
/// when its mtime has a sub-second part, else the coarse margin (FAT, HFS+, ext3 and some
/// network filesystems store whole seconds).
pub(crate) fn margin_for(stat: &FileStat, coarse_margin_ns: i64) -> i64 {
    if stat.mtime_ns.rem_euclid(1_000_000_000) != 0 {
        coarse_margin_ns.min(FINE_RACY_MARGIN_NS)
    } else {
        coarse_margin_ns
    }
}

/// Hashes files through the stat cache. New records are kept in memory and written in
/// one transaction by [`FileHasher::flush`].
pub(crate) struct FileHasher {
    store: Arc<Store>,
    clock: Arc<dyn Clock>,
    margin_ns: i64,
    pending: Mutex<HashMap<PathBuf, StatRecord>>,
    /// Records of the files read by this hasher, by their stat: another path with the same
    /// inode, size, mtime and ctime is a hard link to the same bytes (a fleet of runs that
    /// share one checkpoint file), so it is not read again.
    by_stat: Mutex<HashMap<FileStat, StatRecord>>,
    /// What [`FileHasher::hash`] answered for each path in this build (so the stat cache is
    /// looked up once per path: a checkpoint that four stages of a run take as input).
    seen: Mutex<HashMap<PathBuf, (Hash, FileStat)>>,
    files_read: AtomicUsize,
    bytes_read: AtomicU64,
}

impl FileHasher {
    pub(crate) fn new(store: Arc<Store>, clock: Arc<dyn Clock>, margin_ns: i64) -> Self {
        FileHasher {
            store,
            clock,
            margin_ns,
            pending: Mutex::new(HashMap::new()),
            by_stat: Mutex::new(HashMap::new()),
            seen: Mutex::new(HashMap::new()),
            files_read: AtomicUsize::new(0),
            bytes_read: AtomicU64::new(0),
        }
    }

    /// The content hash of the file at `path` (absolute), and the stat it had. A path is
    /// looked at once per build (as make and ninja stat each file once): the stages of a
    /// run share its checkpoint, and the runs of a fleet their sample image. The engine's
    /// own writes update what was seen ([`FileHasher::record_written`]), and a stage's inputs
    /// are stat'ed again after it ran.
    pub(crate) fn hash(&self, path: &Path) -> Result<(Hash, FileStat), EngineError> {
        if let Some(seen) = self.seen.lock().unwrap_or_else(PoisonError::into_inner).get(path) {
            return Ok(*seen);
        }
        let hashed = self.hash_now(path)?;
        self.seen.lock().unwrap_or_else(PoisonError::into_inner).insert(path.to_path_buf(), hashed);
        Ok(hashed)
    }

    fn hash_now(&self, path: &Path) -> Result<(Hash, FileStat), EngineError> {
        let before = self.clock.now_ns();
        let stat = FileStat::of(path).map_err(|e| EngineError::io("stat", path, e))?;
        if let Some(record) = self.cached(path)? {
            if is_trusted(&record, &stat, self.margin_ns) {
                return Ok((record.hash, stat));
            }
        }
        let linked = self.by_stat.lock().unwrap_or_else(PoisonError::into_inner).get(&stat).copied();
        if let Some(record) = linked {
            self.remember(path, record);
            return Ok((record.hash, stat));
        }
        let hash = hash_file(path).map_err(|e| EngineError::io("read", path, e))?;
        self.files_read.fetch_add(1, Ordering::Relaxed);
        self.bytes_read.fetch_add(stat.size, Ordering::Relaxed);
        let after = FileStat::of(path).map_err(|e| EngineError::io("stat", path, e))?;
        // A file that changed while being read has no well-defined hash to cache; the
        // hash is still returned, and whoever uses it re-checks the stat afterwards.
        if after == stat {
            let record = StatRecord { stat, hash, recorded_ns: before };
            self.remember(path, record);
            self.by_stat.lock().unwrap_or_else(PoisonError::into_inner).insert(stat, record);
        }
        Ok((hash, stat))
    }

    /// Records the hash of a file the engine itself just wrote with known content, taking
    /// its stat now. The time recorded is the time the write started (`written_ns`),
    /// so a file written within the racy window is re-read once later.
    pub(crate) fn record_written(&self, path: &Path, hash: Hash, written_ns: i64) -> Result<(), EngineError> {
        let stat = FileStat::of(path).map_err(|e| EngineError::io("stat", path, e))?;
        self.seen.lock().unwrap_or_else(PoisonError::into_inner).insert(path.to_path_buf(), (hash, stat));
        self.remember(path, StatRecord { stat, hash, recorded_ns: written_ns });
        Ok(())
    }

    pub(crate) fn now_ns(&self) -> i64 {
        self.clock.now_ns()
    }

    /// Forgets what was seen of `path` in this build (the engine just removed it).
    pub(crate) fn forget(&self, path: &Path) {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner).remove(path);
    }

    fn cached(&self, path: &Path) -> Result<Option<StatRecord>, EngineError> {
        let pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(r) = pending.get(path) {
            return Ok(Some(*r));
        }
        drop(pending);
        match path.to_str() {
            Some(p) => self.store.stat_get(p),
            None => Ok(None),
        }
    }

    fn remember(&self, path: &Path, record: StatRecord) {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner).insert(path.to_path_buf(), record);
    }

    /// Writes the new records in one transaction. Paths that are not UTF-8 are not cached.
    pub(crate) fn flush(&self) -> Result<(), EngineError> {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner));
        let rows: Vec<(String, StatRecord)> = pending.into_iter().filter_map(|(p, r)| p.to_str().map(|s| (s.to_string(), r))).collect();
        self.store.stat_put_many(&rows)
    }

    /// How many files were actually read (not answered from the cache).
    pub(crate) fn files_read(&self) -> usize {
        self.files_read.load(Ordering::Relaxed)
    }

    /// How many bytes those files had.
    pub(crate) fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::hash::hash_bytes;
    use std::sync::atomic::AtomicI64;

    /// A clock the test sets by hand.
    struct ManualClock(AtomicI64);
    impl Clock for ManualClock {
        fn now_ns(&self) -> i64 {
            self.0.load(Ordering::SeqCst)
        }
    }

    const S: i64 = 1_000_000_000;

    fn stat(mtime_ns: i64) -> FileStat {
        FileStat { size: 10, mtime_ns, ctime_ns: mtime_ns, inode: 7 }
    }

    #[test]
    fn racy_rule_on_pure_records() {
        let h = hash_bytes(b"x");
        let rec = StatRecord { stat: stat(100 * S), hash: h, recorded_ns: 100 * S + S / 2 };
        // Hashed half a second after the write: racy, never trusted, however much later we look.
        assert!(!is_trusted(&rec, &stat(100 * S), RACY_MARGIN_NS));
        let old = StatRecord { recorded_ns: 103 * S, ..rec };
        assert!(is_trusted(&old, &stat(100 * S), RACY_MARGIN_NS));
        // Exactly at the margin counts as old enough.
        let edge = StatRecord { recorded_ns: 102 * S, ..rec };
        assert!(is_trusted(&edge, &stat(100 * S), RACY_MARGIN_NS));
        // Any stat difference: not trusted.
        for changed in [
            FileStat { size: 11, ..stat(100 * S) },
            FileStat { inode: 8, ..stat(100 * S) },
            FileStat { ctime_ns: 105 * S, ..stat(100 * S) },
            stat(101 * S),
        ] {
            assert!(!is_trusted(&old, &changed, RACY_MARGIN_NS), "{changed:?}");
        }
    }

    #[test]
    fn sub_second_timestamps_get_the_fine_margin() {
        let h = hash_bytes(b"x");
        let fine = FileStat { mtime_ns: 100 * S + 123_456_789, ..stat(0) };
        let rec = |recorded_ns| StatRecord { stat: fine, hash: h, recorded_ns };
        assert!(!is_trusted(&rec(fine.mtime_ns + S / 20), &fine, RACY_MARGIN_NS), "50 ms after the write: racy");
        assert!(is_trusted(&rec(fine.mtime_ns + S / 5), &fine, RACY_MARGIN_NS), "200 ms after: trusted");
        // Whole-second timestamps keep the coarse margin.
        let coarse = stat(100 * S);
        let rec = StatRecord { stat: coarse, hash: h, recorded_ns: 100 * S + S / 5 };
        assert!(!is_trusted(&rec, &coarse, RACY_MARGIN_NS));
        assert_eq!(margin_for(&fine, 10), 10, "a smaller configured margin wins");
    }

    #[test]
    fn racy_record_is_reread_then_trusted_once_time_has_passed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("store")).unwrap());
        let file = dir.path().join("checkpoint.pth");
        std::fs::write(&file, b"weights v1").unwrap();
        let mtime = FileStat::of(&file).unwrap().mtime_ns;
        let clock = Arc::new(ManualClock(AtomicI64::new(mtime)));

        // Hashed in the same instant the file was written: a racy record.
        let hasher = FileHasher::new(store.clone(), clock.clone(), RACY_MARGIN_NS);
        assert_eq!(hasher.hash(&file).unwrap().0, hash_bytes(b"weights v1"));
        hasher.flush().unwrap();
        assert_eq!(hasher.files_read(), 1);

        // Much later, the stat is unchanged but the record is racy: read again, and the
        // new record (taken long after the write) is trusted from then on.
        clock.0.store(mtime + 60 * S, Ordering::SeqCst);
        let hasher = FileHasher::new(store.clone(), clock.clone(), RACY_MARGIN_NS);
        hasher.hash(&file).unwrap();
        hasher.flush().unwrap();
        assert_eq!(hasher.files_read(), 1);

        let hasher = FileHasher::new(store.clone(), clock.clone(), RACY_MARGIN_NS);
        assert_eq!(hasher.hash(&file).unwrap().0, hash_bytes(b"weights v1"));
        assert_eq!(hasher.files_read(), 0, "an unchanged, old file must not be re-read");
        assert_eq!(hasher.bytes_read(), 0);

        // A content change that keeps the size is caught by mtime/ctime.
        std::fs::write(&file, b"weights v2").unwrap();
        clock.0.store(mtime + 120 * S, Ordering::SeqCst);
        let hasher = FileHasher::new(store, clock, RACY_MARGIN_NS);
        assert_eq!(hasher.hash(&file).unwrap().0, hash_bytes(b"weights v2"));
        assert_eq!(hasher.files_read(), 1);
    }

    #[test]
    fn racy_rewrite_with_identical_stat_is_detected() {
        // The case the rule exists for: the file is rewritten after hashing and the
        // filesystem reports exactly the same stat (coarse timestamps). Simulated by
        // putting a record in the cache whose stat matches the file but whose hash is
        // of the old content, taken within the margin of the mtime.
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("store")).unwrap());
        let file = dir.path().join("config.yaml");
        std::fs::write(&file, b"lr: 0.2").unwrap();
        let st = FileStat::of(&file).unwrap();
        let stale = StatRecord { stat: st, hash: hash_bytes(b"lr: 0.1"), recorded_ns: st.mtime_ns + S / 100 };
        store.stat_put_many(&[(file.to_str().unwrap().to_string(), stale)]).unwrap();

        let clock = Arc::new(ManualClock(AtomicI64::new(st.mtime_ns + 3600 * S)));
        let hasher = FileHasher::new(store.clone(), clock.clone(), RACY_MARGIN_NS);
        assert_eq!(hasher.hash(&file).unwrap().0, hash_bytes(b"lr: 0.2"));

        // Whereas a record old enough is believed (which is why the margin matters).
        let old = StatRecord { recorded_ns: st.mtime_ns + 3 * S, ..stale };
        store.stat_put_many(&[(file.to_str().unwrap().to_string(), old)]).unwrap();
        let hasher = FileHasher::new(store, clock, RACY_MARGIN_NS);
        assert_eq!(hasher.hash(&file).unwrap().0, hash_bytes(b"lr: 0.1"));
    }

    #[test]
    fn missing_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("store")).unwrap());
        let hasher = FileHasher::new(store, Arc::new(SystemClock), RACY_MARGIN_NS);
        let missing = dir.path().join("best_model.pth");
        let err = hasher.hash(&missing).unwrap_err().to_string();
        assert!(err.contains("best_model.pth"), "{err}");
    }
}
