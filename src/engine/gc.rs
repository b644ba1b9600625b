//! Garbage collection: delete what no node record or materialization refers to.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs;
use std::path::Path;

use rusqlite::TransactionBehavior;

use super::exec::Engine;
use super::hash::{Hash, InputKind};
use super::store::NodeRecord;
use super::EngineError;

/// Options of [`Engine::gc`].
#[derive(Clone, Debug, Default)]
pub struct GcOptions {
    /// Also forget nodes whose outputs are gone: a node is kept if one of its
    /// materialized files still exists, or if it is upstream of a kept node. Use after
    /// deleting run directories. Without it, every node's last result is kept.
    pub prune_missing: bool,
}

/// What [`Engine::gc`] removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Node records forgotten (with `prune_missing`).
    pub nodes_pruned: usize,
    /// Stored results no node refers to any more.
    pub results_deleted: usize,
    /// Blob files deleted, including ones a killed process left unrecorded.
    pub blobs_deleted: usize,
    /// Their total size.
    pub bytes_freed: u64,
    /// Stat cache entries of files that no longer exist (with `prune_missing`).
    pub stat_entries_pruned: usize,
    /// Scratch directories of dead processes, and stale lock files, removed.
    pub scratch_removed: usize,
}

impl fmt::Display for GcReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "freed {:.1} MiB: {} blob(s), {} result(s), {} node record(s)",
            self.bytes_freed as f64 / (1024.0 * 1024.0),
            self.blobs_deleted,
            self.results_deleted,
            self.nodes_pruned
        )
    }
}

impl Engine {
    /// Deletes stored results that no node record refers to, blobs that no remaining
    /// result or materialization refers to, blob files the database does not know (left
    /// by killed processes), dead scratch directories and lock files. Waits until no
    /// build is running on the store (builds hold the gc lock shared).
    pub fn gc(&self, opts: &GcOptions) -> Result<GcReport, EngineError> {
        let _exclusive = self.store.lock_gc(true)?;
        let mut report = GcReport::default();
        if opts.prune_missing {
            self.prune_missing(&mut report)?;
        }
        report.results_deleted = self.store.db(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute("DELETE FROM result_artifacts WHERE key NOT IN (SELECT key FROM nodes)", [])?;
            let n = tx.execute("DELETE FROM results WHERE key NOT IN (SELECT key FROM nodes)", [])?;
            tx.commit()?;
            Ok(n)
        })?;

        let unreferenced: Vec<(String, i64)> = self.store.db(|c| {
            let mut s = c.prepare(
                "SELECT hash, size FROM blobs
                 WHERE hash NOT IN (SELECT blob FROM result_artifacts)
                   AND hash NOT IN (SELECT blob FROM materializations)",
            )?;
            let rows = s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect();
            rows
        })?;
        for (hash, size) in &unreferenced {
            let Some(h) = Hash::from_hex(hash) else {
                continue;
            };
            let path = self.store.blob_path(&h);
            match fs::remove_file(&path) {
                Ok(()) => {
                    report.blobs_deleted += 1;
                    report.bytes_freed += u64::try_from(*size).unwrap_or(0);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(EngineError::io("remove", &path, e)),
            }
        }
        self.store.db(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            {
                let mut del = tx.prepare("DELETE FROM blobs WHERE hash = ?1")?;
                for (hash, _) in &unreferenced {
                    del.execute([hash])?;
                }
            }
            tx.commit()
        })?;

        // Blob files the database does not list: a process killed between moving a blob
        // into place and recording its result. Safe to delete only because no build is
        // running (we hold the gc lock exclusively).
        let known: HashSet<String> = self.store.db(|c| {
            let mut s = c.prepare("SELECT hash FROM blobs")?;
            let rows = s.query_map([], |r| r.get(0))?.collect();
            rows
        })?;
        let blobs_dir = self.store.root().join("blobs");
        for shard in read_dir(&blobs_dir)? {
            let shard_name = shard.file_name().to_string_lossy().into_owned();
            for entry in read_dir(&shard.path())? {
                let hex = format!("{shard_name}{}", entry.file_name().to_string_lossy());
                if known.contains(&hex) {
                    continue;
                }
                let path = entry.path();
                let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
                fs::remove_file(&path).map_err(|e| EngineError::io("remove", &path, e))?;
                report.blobs_deleted += 1;
                report.bytes_freed += size;
            }
        }

        // Quarantined blobs were kept for a post-mortem of the damage; gc is the user saying
        // the store may forget. Reports of runs whose directory is gone go with them.
        let quarantine = self.store.root().join("quarantine");
        if quarantine.is_dir() {
            for entry in read_dir(&quarantine)? {
                let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
                if fs::remove_file(entry.path()).is_ok() {
                    report.bytes_freed += size;
                    report.scratch_removed += 1;
                }
            }
        }
        if opts.prune_missing {
            let runs: Vec<String> = self.store.db(|c| {
                let mut s = c.prepare("SELECT run FROM run_reports")?;
                let rows = s.query_map([], |r| r.get(0))?.collect();
                rows
            })?;
            let gone: Vec<&String> = runs.iter().filter(|r| !Path::new(r.as_str()).is_dir()).collect();
            self.store.db(|c| {
                let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
                for run in &gone {
                    tx.execute("DELETE FROM run_reports WHERE run = ?1", [run])?;
                }
                tx.commit()
            })?;
        }
        report.scratch_removed += self.store.remove_dead_sessions();
        let locks = self.store.root().join("locks");
        for entry in read_dir(&locks)? {
            // No build holds a key lock while we hold the gc lock; gc.lock itself stays.
            if entry.file_name() != "gc.lock" && fs::remove_file(entry.path()).is_ok() {
                report.scratch_removed += 1;
            }
        }
        Ok(report)
    }

    fn prune_missing(&self, report: &mut GcReport) -> Result<(), EngineError> {
        let rows: Vec<(String, String)> = self.store.db(|c| {
            let mut s = c.prepare("SELECT node_id, record FROM nodes")?;
            let rows = s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect();
            rows
        })?;
        let mut records: HashMap<String, NodeRecord> = HashMap::new();
        for (id, json) in rows {
            let rec: NodeRecord = serde_json::from_str(&json)
                .map_err(|e| EngineError::CorruptRecord { path: self.store.db_path().to_path_buf(), what: format!("node {id}: {e}") })?;
            records.insert(id, rec);
        }
        let mut live: HashSet<&str> = HashSet::new();
        let mut work: Vec<&str> = records
            .iter()
            .filter(|(_, r)| r.materializations.iter().any(|m| Path::new(&m.dest).exists()))
            .map(|(id, _)| id.as_str())
            .collect();
        while let Some(id) = work.pop() {
            if !live.insert(id) {
                continue;
            }
            if let Some(rec) = records.get(id) {
                for input in rec.inputs.iter().filter(|i| i.kind == InputKind::Node) {
                    work.push(input.identity.as_str());
                }
            }
        }
        let dead: Vec<&String> = records.keys().filter(|id| !live.contains(id.as_str())).collect();
        report.nodes_pruned = dead.len();

        let stat_paths: Vec<String> = self.store.db(|c| {
            let mut s = c.prepare("SELECT path FROM stat_cache")?;
            let rows = s.query_map([], |r| r.get(0))?.collect();
            rows
        })?;
        let gone: Vec<&String> = stat_paths.iter().filter(|p| !Path::new(p.as_str()).exists()).collect();
        report.stat_entries_pruned = gone.len();

        self.store.db(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            {
                let mut del_node = tx.prepare("DELETE FROM nodes WHERE node_id = ?1")?;
                let mut del_mat = tx.prepare("DELETE FROM materializations WHERE node_id = ?1")?;
                for id in &dead {
                    del_node.execute([id])?;
                    del_mat.execute([id])?;
                }
                let mut del_stat = tx.prepare("DELETE FROM stat_cache WHERE path = ?1")?;
                for p in &gone {
                    del_stat.execute([p])?;
                }
            }
            tx.commit()
        })
    }
}

fn read_dir(dir: &Path) -> Result<Vec<fs::DirEntry>, EngineError> {
    let entries = fs::read_dir(dir).map_err(|e| EngineError::io("list", dir, e))?;
    entries.collect::<Result<Vec<_>, _>>().map_err(|e| EngineError::io("list", dir, e))
}
