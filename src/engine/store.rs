//! The store: content-addressed blobs on disk, indexed by a SQLite database.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::file_stat::{FileStat, StatRecord};
use super::hash::{hash_file, Hash, InputKind};
use super::EngineError;

/// Schema migrations, applied in order; `PRAGMA user_version` counts those applied.
/// Append only: never edit a released entry, add a new one.
const MIGRATIONS: &[&str] = &[
    // 1: initial schema.
    "CREATE TABLE blobs (
        hash TEXT PRIMARY KEY,
        size INTEGER NOT NULL,
        created_ns INTEGER NOT NULL
    );
    CREATE TABLE results (
        key TEXT PRIMARY KEY,
        stage TEXT NOT NULL,
        output_hash TEXT NOT NULL,
        duration_ms INTEGER NOT NULL,
        created_ns INTEGER NOT NULL
    );
    CREATE TABLE result_artifacts (
        key TEXT NOT NULL REFERENCES results(key) ON DELETE CASCADE,
        name TEXT NOT NULL,
        blob TEXT NOT NULL,
        PRIMARY KEY (key, name)
    );
    CREATE INDEX result_artifacts_blob ON result_artifacts(blob);
    CREATE TABLE nodes (
        node_id TEXT PRIMARY KEY,
        stage TEXT NOT NULL,
        key TEXT NOT NULL,
        record TEXT NOT NULL,
        updated_ns INTEGER NOT NULL
    );
    CREATE INDEX nodes_key ON nodes(key);
    CREATE TABLE materializations (
        dest TEXT PRIMARY KEY,
        node_id TEXT NOT NULL,
        artifact TEXT NOT NULL,
        blob TEXT NOT NULL,
        updated_ns INTEGER NOT NULL
    );
    CREATE INDEX materializations_node ON materializations(node_id);
    CREATE INDEX materializations_blob ON materializations(blob);
    CREATE TABLE stat_cache (
        path TEXT PRIMARY KEY,
        size INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        ctime_ns INTEGER NOT NULL,
        inode INTEGER NOT NULL,
        hash TEXT NOT NULL,
        recorded_ns INTEGER NOT NULL
    );",
    // 2: the last report of each run (label), for `mkonnx report` without building.
    "CREATE TABLE run_reports (
        run TEXT PRIMARY KEY,
        report TEXT NOT NULL,
        updated_ns INTEGER NOT NULL
    );",
];

/// How long a writer waits for another process's transaction before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(120);

/// A materialization temp file untouched for this long belongs to a dead process.
const STALE_TEMP_AGE: Duration = Duration::from_secs(600);

static SESSION_COUNTER: AtomicU64 = AtomicU64::new(0);

/// What [`Store::verify_all`] found.
#[derive(Debug, Default)]
pub struct VerifyReport {
    /// Blobs whose bytes were hashed.
    pub blobs_checked: usize,
    /// Their total size.
    pub bytes_checked: u64,
    /// Blobs whose bytes did not match their hash (now in `quarantine/`).
    pub corrupt: Vec<PathBuf>,
    /// Blobs the database recorded but the disk did not have.
    pub missing: Vec<PathBuf>,
    /// What SQLite's integrity check reported, if not "ok".
    pub database_problems: Vec<String>,
}

impl VerifyReport {
    /// Whether nothing was wrong.
    pub fn clean(&self) -> bool {
        self.corrupt.is_empty() && self.missing.is_empty() && self.database_problems.is_empty()
    }
}

/// What the store knows about one built key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct StoredResult {
    pub output_hash: Hash,
    /// Artifact name -> blob hash.
    pub artifacts: BTreeMap<String, Hash>,
    pub duration_ms: u64,
}

/// The last successful build of a node, kept to explain why it is stale now.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct NodeRecord {
    pub stage: String,
    pub stage_version: u32,
    pub tool_version: String,
    pub params: Value,
    pub inputs: Vec<InputRecord>,
    pub key: Hash,
    pub output_hash: Hash,
    pub materializations: Vec<MatRecord>,
}

/// One input as it was at the last build.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct InputRecord {
    pub name: String,
    pub kind: InputKind,
    /// Content hash (file) or upstream output hash (node).
    pub hash: Hash,
    /// The file's absolute path, or the upstream's node id.
    pub identity: String,
}

/// One materialized file as it was written at the last build.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct MatRecord {
    pub dest: String,
    pub artifact: String,
    pub blob: Hash,
}

/// How a build puts a stored artifact at its materialized path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputMode {
    /// A blob of at least `min_bytes` (the models) becomes a hard link to the store's copy
    /// when both are on one filesystem: no bytes written, and the output is read-only like
    /// the blob. Smaller blobs (metrics, pictures, text), and any across filesystems, are
    /// copied. Editing a linked output in place (as root, who can) damages the blob: the
    /// store notices at its next read and rebuilds it.
    Link {
        /// The smallest blob that is linked rather than copied.
        min_bytes: u64,
    },
    /// Independent, writable copies of everything (`--copy-outputs`).
    Copy,
}

impl OutputMode {
    /// The smallest blob [`OutputMode::default`] links: models are tens to hundreds of MB
    /// (what is worth not writing twice); the metrics and pictures users may open and edit
    /// are far smaller, and stay ordinary files.
    pub const LINK_MIN_BYTES: u64 = 1 << 20;
}

impl Default for OutputMode {
    fn default() -> Self {
        OutputMode::Link { min_bytes: Self::LINK_MIN_BYTES }
    }
}

/// A content-addressed artifact store: a directory holding `store.sqlite` and `blobs/`.
/// Open one per process (or per thread, in tests); any number may share a directory.
pub struct Store {
    root: PathBuf,
    db_path: PathBuf,
    conn: Mutex<Connection>,
    /// A second connection for a worker that finds the first busy, opened when first
    /// needed: the workers of a no-op build over a fleet do little but query the store, and
    /// on one connection they mostly wait for each other. SQLite (WAL) reads in parallel.
    second: std::sync::OnceLock<Option<Mutex<Connection>>>,
    /// This process's scratch space; `None` when the store is read-only.
    session: Option<Session>,
    scratch_counter: AtomicU64,
    /// Blobs whose bytes this process knows to match their hash (it wrote them, or read and
    /// hashed them), with their stat then: one whose stat is unchanged is not read again.
    /// Known only per process: a bit flipped on disk changes no stat, so nothing persists.
    verified: Mutex<std::collections::HashMap<Hash, FileStat>>,
}

/// A process's scratch directory in the store and the lock that says it is alive.
struct Session {
    dir: PathBuf,
    lock_path: PathBuf,
    /// Held for the store's lifetime; tells other processes the session dir is in use.
    _lock: File,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("root", &self.root).finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (creating if needed) the store in `root`, migrates its schema and removes the
    /// scratch files of processes that died. A store this process may not write (a shared
    /// cache mounted read-only, another user's) opens read-only, as sccache and ccache fall
    /// back: everything fresh in it is used, and only a stage that must run fails.
    pub fn open(root: &Path) -> Result<Store, EngineError> {
        match Store::open_writable(root) {
            Err(e) if e.is_permission_problem() && root.join("store.sqlite").is_file() => Store::open_read_only(root),
            other => other,
        }
    }

    /// Whether this store was opened read-only (see [`Store::open`]).
    pub fn is_read_only(&self) -> bool {
        self.session.is_none()
    }

    fn read_only_error(&self) -> EngineError {
        EngineError::ReadOnlyStore { path: self.root.clone() }
    }

    pub(crate) fn open_read_only(root: &Path) -> Result<Store, EngineError> {
        let root = fs::canonicalize(root).map_err(|e| EngineError::io("resolve", root, e))?;
        let db_path = root.join("store.sqlite");
        let sql = |e| EngineError::sqlite(&db_path, e);
        let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_URI;
        // mode=ro still needs the WAL index (-shm) to exist or be creatable; where neither is
        // possible, immutable=1 reads the file as it is (no other process can write it
        // either, or we would have the permission too, as a rule).
        let mut last = None;
        for query in ["mode=ro", "immutable=1"] {
            let uri = format!("file:{}?{query}", db_path.display());
            let attempt = Connection::open_with_flags(&uri, flags).and_then(|c| {
                c.busy_timeout(BUSY_TIMEOUT)?;
                let v: u32 = c.pragma_query_value(None, "user_version", |r| r.get(0))?;
                Ok((c, v))
            });
            match attempt {
                Ok((conn, version)) => {
                    if version as usize != MIGRATIONS.len() {
                        return Err(EngineError::ReadOnlyStore { path: root.clone() });
                    }
                    return Ok(Store {
                        root,
                        db_path,
                        conn: Mutex::new(conn),
                        second: std::sync::OnceLock::from(None),
                        session: None,
                        scratch_counter: AtomicU64::new(0),
                        verified: Mutex::new(std::collections::HashMap::new()),
                    });
                }
                Err(e) => last = Some(e),
            }
        }
        Err(sql(last.expect("two attempts were made")))
    }

    fn open_writable(root: &Path) -> Result<Store, EngineError> {
        for sub in ["", "blobs", "tmp", "locks"] {
            let dir = root.join(sub);
            fs::create_dir_all(&dir).map_err(|e| EngineError::io("create directory", &dir, e))?;
        }
        let root = fs::canonicalize(root).map_err(|e| EngineError::io("resolve", root, e))?;
        let db_path = root.join("store.sqlite");
        let sql = |e| EngineError::sqlite(&db_path, e);
        let mut conn = Connection::open(&db_path).map_err(sql)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(sql)?;
        // Switching a new database to WAL, and its first migration, can report SQLITE_BUSY
        // at once when another process is doing the same (SQLite skips the busy handler where
        // waiting could deadlock), so the set-up is retried for up to the busy timeout.
        let started = std::time::Instant::now();
        loop {
            match configure(&mut conn, &db_path) {
                Err(EngineError::Sqlite { source, .. }) if is_busy(&source) && started.elapsed() < BUSY_TIMEOUT => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                other => break other?,
            }
        }

        let tmp = root.join("tmp");
        let store = Store {
            root,
            db_path,
            conn: Mutex::new(conn),
            second: std::sync::OnceLock::new(),
            session: Some(new_session(&tmp)?),
            scratch_counter: AtomicU64::new(0),
            verified: Mutex::new(std::collections::HashMap::new()),
        };
        store.remove_dead_sessions();
        Ok(store)
    }

    /// The store's directory (canonical).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Path of the SQLite database.
    pub fn db_path(&self) -> &Path {
        &self.db_path
    }

    /// Where the blob with this hash lives.
    pub(crate) fn blob_path(&self, hash: &Hash) -> PathBuf {
        let hex = hash.to_hex();
        self.root.join("blobs").join(&hex[..2]).join(&hex[2..])
    }

    /// Runs `f` on the connection, mapping errors to [`EngineError::Sqlite`].
    pub(crate) fn db<T>(&self, f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>) -> Result<T, EngineError> {
        let mut conn = match self.conn.try_lock() {
            Ok(c) => c,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => match self.second.get_or_init(|| self.open_second()) {
                Some(second) => second.lock().unwrap_or_else(PoisonError::into_inner),
                None => self.conn.lock().unwrap_or_else(PoisonError::into_inner),
            },
        };
        f(&mut conn).map_err(|e| EngineError::sqlite(&self.db_path, e))
    }

    /// Opens the second connection (see [`Store::second`]); `None` if it cannot be had, and
    /// the first is shared.
    fn open_second(&self) -> Option<Mutex<Connection>> {
        let conn = Connection::open(&self.db_path).ok()?;
        conn.busy_timeout(BUSY_TIMEOUT).ok()?;
        conn.pragma_update(None, "synchronous", "NORMAL").ok()?;
        conn.pragma_update(None, "foreign_keys", "ON").ok()?;
        Some(Mutex::new(conn))
    }

    fn corrupt(&self, what: String) -> EngineError {
        EngineError::CorruptRecord { path: self.db_path.clone(), what }
    }

    fn parse_hash(&self, s: &str, what: &str) -> Result<Hash, EngineError> {
        Hash::from_hex(s).ok_or_else(|| self.corrupt(format!("{what}: not a hash: {s:?}")))
    }

    /// A fresh, empty directory in this process's scratch space.
    pub(crate) fn scratch_dir(&self) -> Result<PathBuf, EngineError> {
        let session = self.session.as_ref().ok_or_else(|| self.read_only_error())?;
        let n = self.scratch_counter.fetch_add(1, Ordering::Relaxed);
        let dir = session.dir.join(n.to_string());
        fs::create_dir_all(&dir).map_err(|e| EngineError::io("create directory", &dir, e))?;
        Ok(dir)
    }

    /// Moves a finished file into the blob store; returns its hash and size. The file is
    /// fsynced first, so a blob under its final name is always complete. `known` is the
    /// (hash, size) of the bytes the stage wrote, when it wrote them whole from memory; the
    /// file is then not read back (it is if its size disagrees). Nothing is recorded in the
    /// database here: see [`Store::commit_result`].
    pub(crate) fn commit_blob(&self, temp: &Path, known: Option<(Hash, u64)>) -> Result<(Hash, u64), EngineError> {
        if self.is_read_only() {
            return Err(self.read_only_error());
        }
        let file = File::open(temp).map_err(|e| EngineError::io("open", temp, e))?;
        file.sync_all().map_err(|e| EngineError::io("fsync", temp, e))?;
        let meta = file.metadata().map_err(|e| EngineError::io("stat", temp, e))?;
        drop(file);
        let size = meta.len();
        let hash = match known {
            Some((hash, known_size)) if known_size == size => hash,
            _ => hash_file(temp).map_err(|e| EngineError::io("read", temp, e))?,
        };
        let dest = self.blob_path(&hash);
        if self.is_verified(&hash, &dest) {
            // Already stored, and known good (same content built before by this process).
            fs::remove_file(temp).map_err(|e| EngineError::io("remove", temp, e))?;
            return Ok((hash, size));
        }
        // A blob already under this name but not known good may be damaged: the bytes just
        // built, hashed on the way, replace it (rename is atomic for its readers).
        let parent = dest.parent().unwrap_or(&self.root);
        fs::create_dir_all(parent).map_err(|e| EngineError::io("create directory", parent, e))?;
        // Read-only, so that a stage that opens an input artifact for writing fails
        // instead of corrupting the store.
        let mut perms = meta.permissions();
        perms.set_readonly(true);
        fs::set_permissions(temp, perms).map_err(|e| EngineError::io("set permissions of", temp, e))?;
        fs::rename(temp, &dest).map_err(|e| EngineError::io("move into the store", &dest, e))?;
        sync_dir(parent);
        if let Ok(stat) = FileStat::of(&dest) {
            self.verified.lock().unwrap_or_else(PoisonError::into_inner).insert(hash, stat);
        }
        Ok((hash, size))
    }

    /// The result stored under `key`, if any, and whether all its blobs are on disk.
    pub(crate) fn lookup_result(&self, key: &Hash) -> Result<Option<(StoredResult, bool)>, EngineError> {
        let k = key.to_hex();
        // One query (a no-op build asks this of every node): the result's row joined with its
        // artifacts; a result without artifacts comes back as one row of NULL name and blob.
        let rows = self.db(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT r.output_hash, r.duration_ms, a.name, a.blob
                 FROM results r LEFT JOIN result_artifacts a ON a.key = r.key WHERE r.key = ?1",
            )?;
            let rows = stmt.query_map([&k], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, Option<String>>(2)?, r.get::<_, Option<String>>(3)?))
            })?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        })?;
        let Some((output_hash, duration_ms, _, _)) = rows.first().cloned() else {
            return Ok(None);
        };
        let arts = rows.into_iter().filter_map(|(_, _, name, blob)| Some((name?, blob?)));
        let mut artifacts = BTreeMap::new();
        for (name, blob) in arts {
            artifacts.insert(name, self.parse_hash(&blob, "result artifact")?);
        }
        let present = artifacts.values().all(|h| self.blob_path(h).is_file());
        let result = StoredResult {
            output_hash: self.parse_hash(&output_hash, "result output hash")?,
            artifacts,
            duration_ms: u64::try_from(duration_ms).unwrap_or(0),
        };
        Ok(Some((result, present)))
    }

    /// The bytes of artifact `name` of the result stored under `key` (for reports that read
    /// a stage's output after a build), verified against their hash; a damaged blob is
    /// quarantined and its results forgotten, so the next build makes it again.
    pub fn read_artifact(&self, key: &Hash, name: &str) -> Result<Vec<u8>, EngineError> {
        let (result, _) = self.lookup_result(key)?.ok_or_else(|| self.corrupt(format!("no result for key {}", key.to_hex())))?;
        let hash = result.artifacts.get(name).ok_or_else(|| self.corrupt(format!("result {} has no artifact {name}", key.to_hex())))?;
        if let Err(e) = self.verify_blob(hash) {
            self.forget_blob(hash)?;
            return Err(e);
        }
        let path = self.blob_path(hash);
        fs::read(&path).map_err(|e| EngineError::io("read", path, e))
    }

    /// Checks every blob the store records against its hash (and SQLite's own integrity
    /// check); damaged or missing blobs are quarantined and their results forgotten.
    pub fn verify_all(&self) -> Result<VerifyReport, EngineError> {
        let integrity: Vec<String> = self.db(|c| {
            let mut stmt = c.prepare("PRAGMA integrity_check")?;
            let rows = stmt.query_map([], |r| r.get::<_, String>(0))?.collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })?;
        let blobs: Vec<(String, i64)> = self.db(|c| {
            let mut stmt = c.prepare("SELECT hash, size FROM blobs ORDER BY hash")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })?;
        let mut report =
            VerifyReport { database_problems: integrity.into_iter().filter(|l| l != "ok").collect(), ..VerifyReport::default() };
        for (hex, size) in blobs {
            let hash = self.parse_hash(&hex, "blob")?;
            let path = self.blob_path(&hash);
            if !path.exists() {
                self.forget_blob(&hash)?;
                report.missing.push(path);
                continue;
            }
            report.blobs_checked += 1;
            report.bytes_checked += u64::try_from(size).unwrap_or(0);
            if self.verify_blob(&hash).is_err() {
                self.forget_blob(&hash)?;
                report.corrupt.push(path);
            }
        }
        Ok(report)
    }

    /// Records a built result. Call only after every blob went through
    /// [`Store::commit_blob`]; `sizes` gives each blob's size.
    pub(crate) fn commit_result(
        &self,
        key: &Hash,
        stage: &str,
        result: &StoredResult,
        sizes: &BTreeMap<Hash, u64>,
        now_ns: i64,
    ) -> Result<(), EngineError> {
        if self.is_read_only() {
            return Err(self.read_only_error());
        }
        let k = key.to_hex();
        self.db(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            {
                let mut blob = tx.prepare_cached("INSERT OR IGNORE INTO blobs (hash, size, created_ns) VALUES (?1, ?2, ?3)")?;
                for (hash, size) in sizes {
                    blob.execute(params![hash.to_hex(), *size as i64, now_ns])?;
                }
                tx.execute("DELETE FROM result_artifacts WHERE key = ?1", [&k])?;
                tx.execute(
                    "INSERT OR REPLACE INTO results (key, stage, output_hash, duration_ms, created_ns)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![k, stage, result.output_hash.to_hex(), result.duration_ms as i64, now_ns],
                )?;
                let mut art = tx.prepare_cached("INSERT INTO result_artifacts (key, name, blob) VALUES (?1, ?2, ?3)")?;
                for (name, hash) in &result.artifacts {
                    art.execute(params![k, name, hash.to_hex()])?;
                }
            }
            tx.commit()
        })
    }

    /// Whether the blob's bytes are known to match `hash` in this process, its stat unchanged.
    fn is_verified(&self, hash: &Hash, blob: &Path) -> bool {
        let known = self.verified.lock().unwrap_or_else(PoisonError::into_inner).get(hash).copied();
        known.is_some_and(|stat| FileStat::of(blob).is_ok_and(|now| now == stat))
    }

    fn mark_verified(&self, hash: &Hash, blob: &Path) {
        if let Ok(stat) = FileStat::of(blob) {
            self.verified.lock().unwrap_or_else(PoisonError::into_inner).insert(*hash, stat);
        }
    }

    /// Checks that the blob's bytes hash to `hash` (streaming blake3, once per process while
    /// its stat is unchanged): every stored byte a stage or a report reads goes through here
    /// first. A missing or damaged blob is [`EngineError::CorruptBlob`].
    pub(crate) fn verify_blob(&self, hash: &Hash) -> Result<(), EngineError> {
        let blob = self.blob_path(hash);
        if self.is_verified(hash, &blob) {
            return Ok(());
        }
        match hash_file(&blob) {
            Ok(actual) if actual == *hash => {
                self.mark_verified(hash, &blob);
                Ok(())
            }
            _ => Err(EngineError::CorruptBlob { path: blob }),
        }
    }

    /// Forgets a blob found missing or corrupt: moves the file to `quarantine/` (kept for a
    /// post-mortem, never read again) and deletes every result that uses it, so the next
    /// lookup misses, the stage runs again and the store is repaired.
    pub(crate) fn forget_blob(&self, hash: &Hash) -> Result<(), EngineError> {
        if self.is_read_only() {
            return Err(self.read_only_error());
        }
        let path = self.blob_path(hash);
        let quarantine = self.root.join("quarantine");
        if path.exists() {
            fs::create_dir_all(&quarantine).map_err(|e| EngineError::io("create directory", &quarantine, e))?;
            let dest = quarantine.join(format!("{}.{}", hash.to_hex(), std::process::id()));
            match fs::rename(&path, &dest) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(EngineError::io("quarantine", &path, e)),
            }
        }
        self.verified.lock().unwrap_or_else(PoisonError::into_inner).remove(hash);
        let h = hash.to_hex();
        self.db(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute("DELETE FROM results WHERE key IN (SELECT key FROM result_artifacts WHERE blob = ?1)", [&h])?;
            tx.execute("DELETE FROM blobs WHERE hash = ?1", [&h])?;
            tx.commit()
        })
    }

    /// Saves the reports of runs (keyed by the run's absolute path; the report is opaque
    /// JSON to the store), all in one transaction.
    pub fn put_run_reports(&self, reports: &[(String, String)], now_ns: i64) -> Result<(), EngineError> {
        if reports.is_empty() || self.is_read_only() {
            return Ok(());
        }
        self.db(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            {
                let mut put = tx.prepare_cached("INSERT OR REPLACE INTO run_reports (run, report, updated_ns) VALUES (?1, ?2, ?3)")?;
                for (run, report) in reports {
                    put.execute(params![run, report, now_ns])?;
                }
            }
            tx.commit()
        })
    }

    /// The saved reports of these runs, by run (runs without one are absent).
    pub fn run_reports(&self, runs: &[String]) -> Result<std::collections::HashMap<String, String>, EngineError> {
        self.db(|c| {
            let mut get = c.prepare_cached("SELECT report FROM run_reports WHERE run = ?1")?;
            let mut found = std::collections::HashMap::new();
            for run in runs {
                if let Some(report) = get.query_row([run], |r| r.get::<_, String>(0)).optional()? {
                    found.insert(run.clone(), report);
                }
            }
            Ok(found)
        })
    }

    /// The record of the node's last successful build.
    pub(crate) fn node_record(&self, node_id: &Hash) -> Result<Option<NodeRecord>, EngineError> {
        let json = self.db(|c| {
            c.prepare_cached("SELECT record FROM nodes WHERE node_id = ?1")?
                .query_row([node_id.to_hex()], |r| r.get::<_, String>(0))
                .optional()
        })?;
        json.map(|j| serde_json::from_str(&j).map_err(|e| self.corrupt(format!("node {}: {e}", node_id.short())))).transpose()
    }

    /// Replaces the node's record and its materialization rows in one transaction.
    pub(crate) fn put_node_record(&self, node_id: &Hash, rec: &NodeRecord, now_ns: i64) -> Result<(), EngineError> {
        if self.is_read_only() {
            return Ok(()); // only explains `status`; a read-only store keeps its old records
        }
        let json = serde_json::to_string(rec).map_err(|e| self.corrupt(format!("node {}: cannot encode record: {e}", node_id.short())))?;
        let id = node_id.to_hex();
        self.db(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute(
                "INSERT OR REPLACE INTO nodes (node_id, stage, key, record, updated_ns) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![id, rec.stage, rec.key.to_hex(), json, now_ns],
            )?;
            tx.execute("DELETE FROM materializations WHERE node_id = ?1", [&id])?;
            {
                let mut m = tx.prepare_cached(
                    "INSERT OR REPLACE INTO materializations (dest, node_id, artifact, blob, updated_ns)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )?;
                for mat in &rec.materializations {
                    m.execute(params![mat.dest, id, mat.artifact, mat.blob.to_hex(), now_ns])?;
                }
            }
            tx.commit()
        })
    }

    /// The stat cache's record for `path`.
    pub(crate) fn stat_get(&self, path: &str) -> Result<Option<StatRecord>, EngineError> {
        let row = self.db(|c| {
            c.prepare_cached("SELECT size, mtime_ns, ctime_ns, inode, hash, recorded_ns FROM stat_cache WHERE path = ?1")?
                .query_row([path], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, String>(4)?,
                        r.get::<_, i64>(5)?,
                    ))
                })
                .optional()
        })?;
        let Some((size, mtime_ns, ctime_ns, inode, hash, recorded_ns)) = row else {
            return Ok(None);
        };
        Ok(Some(StatRecord {
            // Bit-preserving casts: SQLite integers are signed.
            stat: FileStat { size: size as u64, mtime_ns, ctime_ns, inode: inode as u64 },
            hash: self.parse_hash(&hash, "stat cache")?,
            recorded_ns,
        }))
    }

    /// Writes stat cache records in one transaction.
    pub(crate) fn stat_put_many(&self, rows: &[(String, StatRecord)]) -> Result<(), EngineError> {
        if rows.is_empty() || self.is_read_only() {
            return Ok(());
        }
        self.db(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            {
                let mut s = tx.prepare_cached(
                    "INSERT OR REPLACE INTO stat_cache (path, size, mtime_ns, ctime_ns, inode, hash, recorded_ns)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )?;
                for (path, r) in rows {
                    s.execute(params![
                        path,
                        r.stat.size as i64,
                        r.stat.mtime_ns,
                        r.stat.ctime_ns,
                        r.stat.inode as i64,
                        r.hash.to_hex(),
                        r.recorded_ns
                    ])?;
                }
            }
            tx.commit()
        })
    }

    /// Blocks until this process holds the build lock of `key`. The lock is released when
    /// the returned file is dropped, or by the OS if the process dies.
    pub(crate) fn lock_key(&self, key: &Hash) -> Result<File, EngineError> {
        self.lock_file(&format!("{}.lock", key.to_hex()), false)
    }

    /// The store-wide lock: shared by builds, exclusive for gc.
    pub(crate) fn lock_gc(&self, exclusive: bool) -> Result<File, EngineError> {
        self.lock_file("gc.lock", !exclusive)
    }

    fn lock_file(&self, name: &str, shared: bool) -> Result<File, EngineError> {
        let path = self.root.join("locks").join(name);
        if self.is_read_only() {
            // Builds only read a read-only store: a shared lock on the file as it is (a
            // writer's gc waits for it), or none where the file cannot be opened.
            if !shared {
                return Err(self.read_only_error());
            }
            let f = File::open(&path).or_else(|_| File::open("/dev/null")).map_err(|e| EngineError::io("open lock", &path, e))?;
            let _ = f.lock_shared();
            return Ok(f);
        }
        let f =
            OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(|e| EngineError::io("open lock", &path, e))?;
        let locked = if shared { f.lock_shared() } else { f.lock() };
        locked.map_err(|e| EngineError::io("lock", &path, e))?;
        Ok(f)
    }

    /// Puts blob `hash` at `dest` atomically (temp name in dest's directory, rename): a hard
    /// link under [`OutputMode::Link`] when the filesystem allows one, else a copy whose
    /// bytes are verified against the hash on the way (unless this process stored the blob
    /// itself). A missing or corrupt blob gives [`EngineError::CorruptBlob`] and leaves
    /// `dest` untouched.
    pub(crate) fn restore_blob(&self, hash: &Hash, dest: &Path, mode: OutputMode) -> Result<(), EngineError> {
        let blob = self.blob_path(hash);
        let parent =
            dest.parent().ok_or_else(|| EngineError::io("write", dest, std::io::Error::other("destination has no parent directory")))?;
        fs::create_dir_all(parent).map_err(|e| EngineError::io("create directory", parent, e))?;
        let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let prefix = format!(".{name}.mkonnx-tmp-");
        remove_stale_temps(parent, &prefix);
        let tmp = parent.join(format!("{prefix}{}-{}", std::process::id(), SESSION_COUNTER.fetch_add(1, Ordering::Relaxed)));
        let guard = RemoveOnDrop(Some(tmp.clone()));
        let corrupt = || EngineError::CorruptBlob { path: blob.clone() };
        let linked = match mode {
            OutputMode::Link { min_bytes } => fs::metadata(&blob).map_err(|_| corrupt())?.len() >= min_bytes,
            OutputMode::Copy => false,
        };
        if linked {
            self.verify_blob(hash)?;
            // The output's mtime is the time it appeared, as with a copy, so that a Makefile
            // rule sees it newer than the run's files. Only the shared inode's times change,
            // not its bytes: the blob stays verified.
            let touch = |path: &Path| File::open(path).and_then(|f| f.set_modified(std::time::SystemTime::now()));
            if fs::hard_link(&blob, &tmp).is_ok() {
                let touched = touch(&tmp);
                self.mark_verified(hash, &blob);
                if touched.is_ok() {
                    fs::rename(&tmp, dest).map_err(|e| EngineError::io("write", dest, e))?;
                    // (A rename between two links of one inode does nothing: the guard then
                    // removes the temporary name.)
                    drop(guard);
                    return Ok(());
                }
                // A blob this user may link but not touch (another owner's store): a copy.
                fs::remove_file(&tmp).map_err(|e| EngineError::io("remove", &tmp, e))?;
            }
            // Another filesystem, too many links, links refused or an untouchable blob: a copy.
        }
        let mut src = File::open(&blob).map_err(|_| corrupt())?;
        let mut out = OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(|e| EngineError::io("create", &tmp, e))?;
        let unchanged_since_verified = self.verified.lock().unwrap_or_else(PoisonError::into_inner).get(hash).copied()
            == Some(FileStat::from_metadata(&src.metadata().map_err(|_| corrupt())?));
        if unchanged_since_verified {
            // Hashed from the bytes this process wrote, untouched since: an in-kernel copy.
            std::io::copy(&mut src, &mut out).map_err(|e| EngineError::io("copy to", &tmp, e))?;
        } else {
            let mut hasher = blake3::Hasher::new();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = src.read(&mut buf).map_err(|_| corrupt())?;
                if n == 0 {
                    break;
                }
                super::hash::update(&mut hasher, &buf[..n]);
                out.write_all(&buf[..n]).map_err(|e| EngineError::io("write", &tmp, e))?;
            }
            if Hash::from(hasher.finalize()) != *hash {
                return Err(corrupt());
            }
            self.mark_verified(hash, &blob);
        }
        // No fsync: the store holds the durable copy (its blob was fsynced when committed),
        // and a copy lost to a crash is restored by the next build. The rename still makes
        // the copy appear whole or not at all to a reader.
        drop(out);
        fs::rename(&tmp, dest).map_err(|e| EngineError::io("write", dest, e))?;
        guard.disarm();
        Ok(())
    }

    /// Removes scratch sessions whose owner died (their lock can be taken). Best effort:
    /// anything left is tried again next time.
    pub(crate) fn remove_dead_sessions(&self) -> usize {
        let tmp = self.root.join("tmp");
        let Some(session) = &self.session else { return 0 };
        let Ok(entries) = fs::read_dir(&tmp) else {
            return 0;
        };
        let mut removed = 0;
        for entry in entries.flatten() {
            let path = entry.path();
            if path == session.dir || path == session.lock_path {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_suffix(".lock") {
                let Ok(f) = File::open(&path) else { continue };
                match f.try_lock() {
                    Ok(()) => {
                        let _ = fs::remove_dir_all(tmp.join(id));
                        let _ = fs::remove_file(&path);
                        removed += 1;
                    }
                    Err(TryLockError::WouldBlock) | Err(TryLockError::Error(_)) => {}
                }
            } else if name.starts_with('.') && name.ends_with(".locking") {
                // A session that died between creating and publishing its lock.
                if is_older_than(&path, Duration::from_secs(60)) {
                    let _ = fs::remove_file(&path);
                }
            } else if entry.file_type().is_ok_and(|t| t.is_dir()) && !tmp.join(format!("{name}.lock")).exists() {
                // Sessions publish their lock before creating their directory, so a
                // directory without a lock file belongs to nobody.
                let _ = fs::remove_dir_all(&path);
                removed += 1;
            }
        }
        removed
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Some(session) = &self.session {
            let _ = fs::remove_dir_all(&session.dir);
            let _ = fs::remove_file(&session.lock_path);
        }
    }
}

/// WAL, durability and foreign keys, then the schema migrations.
fn configure(conn: &mut Connection, db_path: &Path) -> Result<(), EngineError> {
    let sql = |e| EngineError::sqlite(db_path, e);
    conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get::<_, String>(0)).map_err(sql)?;
    // NORMAL in WAL mode keeps the database consistent on a crash; a power cut may
    // lose the last transactions, which only means rebuilding those results.
    conn.pragma_update(None, "synchronous", "NORMAL").map_err(sql)?;
    conn.pragma_update(None, "foreign_keys", "ON").map_err(sql)?;
    migrate(conn, db_path)
}

/// Whether SQLite said "busy" or "locked".
fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(e.sqlite_error_code(), Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked))
}

fn migrate(conn: &mut Connection, db_path: &Path) -> Result<(), EngineError> {
    let sql = |e| EngineError::sqlite(db_path, e);
    // Immediate: two processes opening a new store must not both run migration 1.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sql)?;
    let found: u32 = tx.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(sql)?;
    let known = MIGRATIONS.len() as u32;
    if found > known {
        return Err(EngineError::SchemaTooNew { path: db_path.to_path_buf(), found, known });
    }
    for migration in &MIGRATIONS[found as usize..] {
        tx.execute_batch(migration).map_err(sql)?;
    }
    if found < known {
        tx.pragma_update(None, "user_version", known).map_err(sql)?;
    }
    tx.commit().map_err(sql)
}

/// Creates this process's scratch session: its lock file is locked *before* it gets its
/// public name, so another process never sees an unlocked live session.
fn new_session(tmp: &Path) -> Result<Session, EngineError> {
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let id = format!("{}-{}-{}", std::process::id(), nanos, SESSION_COUNTER.fetch_add(1, Ordering::Relaxed));
    let locking = tmp.join(format!(".{id}.locking"));
    let lock_path = tmp.join(format!("{id}.lock"));
    let dir = tmp.join(&id);
    let f = File::create(&locking).map_err(|e| EngineError::io("create", &locking, e))?;
    f.lock().map_err(|e| EngineError::io("lock", &locking, e))?;
    fs::rename(&locking, &lock_path).map_err(|e| EngineError::io("rename", &lock_path, e))?;
    fs::create_dir_all(&dir).map_err(|e| EngineError::io("create directory", &dir, e))?;
    Ok(Session { dir, lock_path, _lock: f })
}

fn is_older_than(path: &Path, age: Duration) -> bool {
    fs::metadata(path).and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok()).is_some_and(|e| e > age)
}

/// Removes materialization temp files (`prefix*`) left in `dir` by killed processes.
/// A live writer keeps touching its file, so only old ones are taken.
fn remove_stale_temps(dir: &Path, prefix: &str) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(prefix) && is_older_than(&entry.path(), STALE_TEMP_AGE) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Makes a rename durable. Best effort: some filesystems cannot fsync directories, and
/// losing a rename on power loss only costs a rebuild.
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// A file being written that asks the kernel to start writing each finished 8 MiB to disk
/// while the rest is still being produced (Linux `sync_file_range`, a hint that never waits).
/// A stage's output is fsynced when [`Store::commit_blob`] takes it; for a model of hundreds
/// of MB that fsync would otherwise wait for all of it at once, after the stage is done.
pub(crate) struct EarlyWriteback {
    file: File,
    written: u64,
    started: u64,
}

/// How much written data [`EarlyWriteback`] lets accumulate before starting its writeback.
const WRITEBACK_CHUNK: u64 = 8 << 20;

impl EarlyWriteback {
    pub(crate) fn new(file: File) -> Self {
        EarlyWriteback { file, written: 0, started: 0 }
    }

    #[cfg(target_os = "linux")]
    fn start_writeback(&self, offset: u64, len: u64) {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain syscall on a file descriptor we own; its failure (a filesystem
        // without writeback, say) only means the later fsync does all the work.
        unsafe {
            libc::sync_file_range(self.file.as_raw_fd(), offset as libc::off64_t, len as libc::off64_t, libc::SYNC_FILE_RANGE_WRITE);
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn start_writeback(&self, _offset: u64, _len: u64) {}
}

impl Write for EarlyWriteback {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.written += n as u64;
        if self.written - self.started >= WRITEBACK_CHUNK {
            self.start_writeback(self.started, self.written - self.started);
            self.started = self.written;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// A file written around the page cache (Linux `O_DIRECT`), for downloads: bytes go from
/// this writer's page-aligned block straight to the disk, so a download of gigabytes neither
/// copies every byte into the page cache nor makes the kernel reclaim cache for it (measured
/// on this project's 2-core VM: 1.5 GB written in 0.7-1.1 s this way, 0.3-4.9 s through the
/// page cache depending on memory pressure). The blob is complete on disk when
/// [`DirectWriter::finish`] returns, so [`Store::commit_blob`]'s fsync has only metadata
/// left. Where the filesystem refuses `O_DIRECT` (tmpfs, some network filesystems) it writes
/// through the page cache with [`EarlyWriteback`]. It hashes what it writes, a block at a
/// time (in parallel, see [`super::hash::update`]), so the bytes are copied once.
pub(crate) struct DirectWriter {
    sink: DirectSink,
    hasher: blake3::Hasher,
    /// Bytes taken so far.
    written: u64,
    /// [`DIRECT_BLOCK`] bytes, page-aligned (`O_DIRECT` wants aligned memory and lengths).
    block: Vec<Page>,
    /// How many bytes of `block` hold data.
    filled: usize,
}

enum DirectSink {
    Direct(File),
    Buffered(EarlyWriteback),
}

/// One page of [`DirectWriter`]'s block: its alignment is the block's.
#[derive(Clone, Copy)]
#[repr(C, align(4096))]
struct Page([u8; 4096]);

// SAFETY: a byte array whose size equals its alignment: no padding, every bit pattern valid.
unsafe impl bytemuck::Zeroable for Page {}
// SAFETY: as above; Copy and 'static.
unsafe impl bytemuck::Pod for Page {}

/// [`DirectWriter`]'s block: a whole number of pages, written in one call.
const DIRECT_BLOCK: usize = 4 << 20;

impl DirectWriter {
    /// Creates `path` (which must not exist) for writing.
    pub(crate) fn create(path: &Path) -> std::io::Result<DirectWriter> {
        let block = vec![Page([0; 4096]); DIRECT_BLOCK / std::mem::size_of::<Page>()];
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::fs::OpenOptionsExt;
            if let Ok(file) = OpenOptions::new().write(true).create_new(true).custom_flags(libc::O_DIRECT).open(path) {
                return Ok(DirectWriter::new(DirectSink::Direct(file), block));
            }
        }
        let file = OpenOptions::new().write(true).create_new(true).open(path)?;
        Ok(DirectWriter::new(DirectSink::Buffered(EarlyWriteback::new(file)), block))
    }

    fn new(sink: DirectSink, block: Vec<Page>) -> Self {
        DirectWriter { sink, hasher: blake3::Hasher::new(), written: 0, block, filled: 0 }
    }

    /// How many bytes have been written so far.
    pub(crate) fn written(&self) -> u64 {
        self.written
    }

    /// Writes the first `len` bytes of the block: directly when it is a whole block and
    /// the file is open for that, else (the tail, a filesystem without `O_DIRECT`, or after
    /// a short or refused direct write) through the page cache.
    fn write_block(&mut self, len: usize) -> std::io::Result<()> {
        super::hash::update(&mut self.hasher, &bytemuck::cast_slice::<Page, u8>(&self.block)[..len]);
        let mut done = 0;
        if let (DirectSink::Direct(file), true) = (&mut self.sink, len == DIRECT_BLOCK) {
            match file.write(&bytemuck::cast_slice::<Page, u8>(&self.block)[..len]) {
                Ok(n) => done = n,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => return Err(e),
            }
        }
        if done < len {
            if let DirectSink::Direct(file) = &self.sink {
                self.sink = DirectSink::Buffered(EarlyWriteback::new(buffered(file)?));
            }
            if let DirectSink::Buffered(w) = &mut self.sink {
                w.write_all(&bytemuck::cast_slice::<Page, u8>(&self.block)[done..len])?;
            }
        }
        self.filled = 0;
        Ok(())
    }

    /// Writes what is left: the file then holds every byte written, and their blake3 hash
    /// is returned.
    pub(crate) fn finish(mut self) -> std::io::Result<Hash> {
        if self.filled > 0 {
            self.write_block(self.filled)?;
        }
        if let DirectSink::Buffered(w) = &mut self.sink {
            w.flush()?;
        }
        Ok(Hash::from(self.hasher.finalize()))
    }
}

/// The same file without `O_DIRECT` (a new handle: the open file's flags are changed, so the
/// old handle must not be used for direct writes any more).
fn buffered(file: &File) -> std::io::Result<File> {
    let file = file.try_clone()?;
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: fcntl on a descriptor we own, with flags read from it.
        let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        if flags < 0 || unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_DIRECT) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(file)
}

impl Write for DirectWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len().min(DIRECT_BLOCK - self.filled);
        bytemuck::cast_slice_mut::<Page, u8>(&mut self.block)[self.filled..self.filled + n].copy_from_slice(&buf[..n]);
        self.filled += n;
        self.written += n as u64;
        if self.filled == DIRECT_BLOCK {
            self.write_block(DIRECT_BLOCK)?;
        }
        Ok(n)
    }

    /// Does nothing: a partial block can only be written once, by [`DirectWriter::finish`].
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Removes a scratch directory when dropped (whatever happened in it).
pub(super) struct RemoveDirOnDrop(pub(super) PathBuf);

impl Drop for RemoveDirOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

struct RemoveOnDrop(Option<PathBuf>);

impl RemoveOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::hash::hash_bytes;

    #[test]
    fn open_migrates_once_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let v: u32 = s.db(|c| c.pragma_query_value(None, "user_version", |r| r.get(0))).unwrap();
        assert_eq!(v as usize, MIGRATIONS.len());
        let mode: String = s.db(|c| c.pragma_query_value(None, "journal_mode", |r| r.get(0))).unwrap();
        assert_eq!(mode.to_lowercase(), "wal");
        drop(s);
        Store::open(dir.path()).unwrap();
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.db(|c| c.pragma_update(None, "user_version", 99)).unwrap();
        drop(s);
        let err = Store::open(dir.path()).unwrap_err();
        assert!(matches!(err, EngineError::SchemaTooNew { found: 99, .. }), "{err}");
    }

    #[test]
    fn early_writeback_writes_every_byte() {
        // More than two writeback chunks, in odd-sized writes, so that ranges start mid-write.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        let data: Vec<u8> = (0..(2 * WRITEBACK_CHUNK as usize + 12_345)).map(|i| (i % 251) as u8).collect();
        let mut w = EarlyWriteback::new(File::create(&path).unwrap());
        for piece in data.chunks(1_000_003) {
            w.write_all(piece).unwrap();
        }
        w.flush().unwrap();
        // Started after the write that passed 8 MiB (the 9th); the rest was under a chunk.
        assert_eq!(w.started, 9 * 1_000_003);
        drop(w);
        assert_eq!(fs::read(&path).unwrap(), data);
    }

    #[test]
    fn direct_writer_writes_every_byte_at_every_length() {
        // Lengths around the page and the block, in network-sized and odd-sized writes: the
        // whole blocks go around the page cache, the tail through it.
        let dir = tempfile::tempdir().unwrap();
        let lengths = [0, 1, 4095, 4096, 4097, DIRECT_BLOCK - 1, DIRECT_BLOCK, DIRECT_BLOCK + 1, 2 * DIRECT_BLOCK + 4097];
        for (i, len) in lengths.into_iter().enumerate() {
            let data: Vec<u8> = (0..len).map(|j| (j % 251) as u8).collect();
            for piece in [16 * 1024, 1_000_003] {
                let path = dir.path().join(format!("blob-{i}-{piece}"));
                let mut w = DirectWriter::create(&path).unwrap();
                for chunk in data.chunks(piece) {
                    w.write_all(chunk).unwrap();
                }
                assert_eq!(w.written(), len as u64);
                assert_eq!(w.finish().unwrap(), Hash::from(blake3::hash(&data)));
                assert_eq!(fs::read(&path).unwrap(), data, "length {len}, writes of {piece}");
            }
        }
        // Like File::create_new: an existing file is an error, not overwritten.
        assert!(DirectWriter::create(&dir.path().join("blob-0-16384")).is_err());
    }

    #[test]
    fn blobs_round_trip_and_corruption_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("store")).unwrap();
        let scratch = s.scratch_dir().unwrap();
        let tmp = scratch.join("a");
        fs::write(&tmp, b"artifact bytes").unwrap();
        let (h, size) = s.commit_blob(&tmp, None).unwrap();
        assert_eq!(h, hash_bytes(b"artifact bytes"));
        assert_eq!(size, 14);
        assert!(!tmp.exists());
        let blob = s.blob_path(&h);
        assert!(fs::metadata(&blob).unwrap().permissions().readonly());

        let dest = dir.path().join("run/onnx_model/model.onnx");
        s.restore_blob(&h, &dest, OutputMode::Copy).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"artifact bytes");
        assert!(!fs::metadata(&dest).unwrap().permissions().readonly());

        // Flip the blob's content behind the store's back.
        let mut p = fs::metadata(&blob).unwrap().permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        p.set_readonly(false);
        fs::set_permissions(&blob, p).unwrap();
        fs::write(&blob, b"artifact bytez").unwrap();
        fs::write(&dest, b"user edit").unwrap();
        let err = s.restore_blob(&h, &dest, OutputMode::Copy).unwrap_err();
        assert!(matches!(err, EngineError::CorruptBlob { .. }), "{err}");
        assert_eq!(fs::read(&dest).unwrap(), b"user edit", "a failed restore must not touch dest");
        let leftovers: Vec<_> = fs::read_dir(dest.parent().unwrap()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temp file left behind");
    }

    #[test]
    fn a_known_hash_is_trusted_only_when_the_size_agrees() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("store")).unwrap();
        let scratch = s.scratch_dir().unwrap();
        let (a, b) = (scratch.join("a"), scratch.join("b"));
        fs::write(&a, b"written whole").unwrap();
        assert_eq!(s.commit_blob(&a, Some((hash_bytes(b"written whole"), 13))).unwrap(), (hash_bytes(b"written whole"), 13));
        // The file grew after the stage hashed its bytes: read back, not trusted.
        fs::write(&b, b"written whole, then more").unwrap();
        let (h, _) = s.commit_blob(&b, Some((hash_bytes(b"written whole"), 13))).unwrap();
        assert_eq!(h, hash_bytes(b"written whole, then more"));
        // Restoring a blob this process stored (untouched since) copies it without re-reading.
        let dest = dir.path().join("out/b");
        s.restore_blob(&h, &dest, OutputMode::Copy).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"written whole, then more");
    }

    #[test]
    fn dead_sessions_are_removed_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let a = Store::open(dir.path()).unwrap();
        let a_scratch = a.scratch_dir().unwrap();
        fs::write(a_scratch.join("partial.onnx"), b"half").unwrap();
        // A dead process's session: a directory with an unlocked lock file, and one
        // with no lock file at all.
        let tmp = dir.path().join("tmp");
        fs::create_dir_all(tmp.join("1-2-3/0")).unwrap();
        fs::write(tmp.join("1-2-3/0/model.onnx"), b"half").unwrap();
        fs::write(tmp.join("1-2-3.lock"), b"").unwrap();
        fs::create_dir_all(tmp.join("4-5-6")).unwrap();

        let b = Store::open(dir.path()).unwrap();
        assert!(!tmp.join("1-2-3").exists());
        assert!(!tmp.join("1-2-3.lock").exists());
        assert!(!tmp.join("4-5-6").exists());
        assert!(a_scratch.join("partial.onnx").exists(), "a live session is left alone");
        drop(a);
        drop(b);
        assert_eq!(fs::read_dir(&tmp).unwrap().count(), 0, "closed stores clean up after themselves");
    }

    #[test]
    fn key_lock_excludes_a_second_holder() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let key = hash_bytes(b"k");
        let held = s.lock_key(&key).unwrap();
        let path = dir.path().join("locks").join(format!("{}.lock", key.to_hex()));
        let other = File::open(&path).unwrap();
        assert!(matches!(other.try_lock(), Err(TryLockError::WouldBlock)));
        drop(held);
        other.try_lock().unwrap();
    }
}
