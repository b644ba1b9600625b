//! The generic build engine: a DAG of stages whose outputs are content-addressed
//! artifacts in a SQLite-indexed store.
//!
//! # Design
//!
//! A *node* is one stage instance: a [`Stage`] (code with a name, a version and canonical
//! parameters) plus named *file inputs* (paths on disk) and named *node inputs* (other
//! nodes whose artifacts it reads). A node writes named *artifacts* (bytes) through its
//! [`StageContext`]; the engine stores each artifact as a blob named by its blake3 hash
//! and copies ("materializes") the ones the caller asked for to destinations such as
//! `<run_dir>/onnx_model/model.onnx`.
//!
//! ## The key: what decides whether a stage runs
//!
//! A node's *key* is a blake3 hash (derive-key mode, domain `mkonnx.stage-key.v1`, every
//! field tagged and length-prefixed) of:
//!
//! | goes into the key                              | never goes into the key          |
//! |------------------------------------------------|----------------------------------|
//! | stage name and stage version                   | absolute paths (of inputs, store, run dir) |
//! | the tool version given to the [`Engine`]       | mtimes, ctimes, inodes           |
//! | canonical parameter JSON (object keys sorted)  | labels (run names), materialization destinations |
//! | each input's name and *content* hash, sorted by name; a node input contributes its upstream's output hash | how long a stage took, which process built it |
//!
//! If the key is in the store, the stage does not run: its artifacts are reused and only
//! missing or edited materialized files are restored. Because an upstream's contribution
//! is the hash of its *outputs*, a stage that reruns but produces byte-identical output
//! leaves its dependents' keys unchanged, so they stay fresh ("early cutoff").
//!
//! Keeping paths out of the key means two run directories holding the same checkpoint
//! and config share one conversion, and moving a run directory does not rebuild it.
//!
//! ## Node identity: what lets `status` say *why*
//!
//! Separately from the key, each node has a stable [`NodeId`] (domain `mkonnx.node-id.v1`)
//! made of its stage name, an optional caller-given identity string, and its inputs'
//! *identities*: a file input's absolute path, a node input's [`NodeId`]. Parameters and
//! versions are deliberately left out, so that when they change the node keeps its id and
//! the engine can compare the new key's ingredients with the record of the last build:
//! [`StaleReason::ParamsChanged`], [`StaleReason::StageVersionChanged`],
//! [`StaleReason::InputChanged`] and so on. Two nodes that differ only in parameters must
//! therefore be told apart with [`NodeSpec::identity`]; adding both without one is an error
//! ([`EngineError::ConflictingNode`]). Adding the same node twice (same id, same stage and
//! parameters) returns the first node, so a node used by many runs is built once.
//!
//! ## Hashing files once
//!
//! File content hashes go through a stat cache (size, mtime, ctime, inode in SQLite). A
//! record is trusted only if the file's stat is unchanged *and* its mtime was at least
//! [`RACY_MARGIN_NS`] (2 s; [`FINE_RACY_MARGIN_NS`], 100 ms, for files with sub-second
//! timestamps) older than the moment the hash was taken: git's racy-clean rule, which
//! guards against a file rewritten within the filesystem's timestamp granularity after it
//! was hashed. So an unchanged checkpoint is never re-read, and a file written
//! just before it was hashed is hashed again the next time.
//!
//! ## The store
//!
//! ```text
//! <store>/store.sqlite          results, node records, materializations, stat cache
//! <store>/blobs/ab/cdef...      artifacts, named by the blake3 hash of their bytes, read-only
//! <store>/tmp/<session>/        a process's scratch space (stage outputs before commit)
//! <store>/tmp/<session>.lock    held while that process lives
//! <store>/locks/<key>.lock      held while a key is being built
//! <store>/locks/gc.lock         shared by builds, exclusive for gc
//! ```
//!
//! ## Safety
//!
//! - Every file the engine writes is written to a temporary name, then renamed; blobs are
//!   fsynced first. A blob is recorded in SQLite only after it is on disk; a result only
//!   after all its blobs are. Copies materialized into run directories are not fsynced:
//!   the store has the durable copy, and the next build restores one a crash lost. A
//!   process killed at any point leaves at most unreferenced files, which the next process
//!   (scratch sessions whose lock is free) or [`Engine::gc`] removes.
//! - Concurrent processes: the key lock (`std::fs::File::lock`, released by the OS when a
//!   process dies) is taken on a store miss, and the store is checked again under it, so
//!   a key is built once even when two processes (or two nodes of one build) want it.
//!   SQLite runs in WAL mode with a busy timeout; writes use `BEGIN IMMEDIATE`.
//! - Workers are plain threads, not a rayon pool: a rayon worker waiting in `join` may
//!   steal another node's job onto its own stack, and if that node blocks on a key lock
//!   held further down the same stack, the thread deadlocks. Stages may use rayon freely.

mod dirty;
mod exec;
mod file_stat;
mod freshness;
mod gc;
mod graph;
mod hash;
mod remote;
mod stage;
mod stat_cache;
mod store;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use dirty::{NodeStatus, NodeStatusReport, StatusReport};
pub use exec::{BuildEvent, BuildOptions, BuildReport, Engine, Force, NodeReport, Outcome, RunSummary};
pub use file_stat::FileStat;
pub use freshness::StaleReason;
pub use gc::{GcOptions, GcReport};
pub use graph::{Graph, Materialize, NodeHandle, NodeId, NodeSpec};
pub use hash::{canonical_json, hash_bytes, hash_file, Hash};
pub use remote::{
    RemoteError, RemoteMode, RemoteOptions, RemoteStats, RemoteStore, FORMAT_MARKER, FORMAT_VERSION, TEST_HOOK_BEFORE_RECORD,
};
pub use stage::{Stage, StageContext};
pub use stat_cache::{Clock, SystemClock, FINE_RACY_MARGIN_NS, RACY_MARGIN_NS};
pub use store::{OutputMode, Store, VerifyReport};

/// What can go wrong in the engine itself (as opposed to inside a stage, whose errors
/// are `anyhow::Error`s reported per node in [`Outcome::Failed`]).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A filesystem operation on a named path failed.
    #[error("could not {op} {}: {source}", path.display())]
    Io {
        /// What the engine was doing ("create directory", "read", ...).
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The store's SQLite database failed.
    #[error("store database {}: {source}", path.display())]
    Sqlite {
        /// Path of `store.sqlite`.
        path: PathBuf,
        /// The SQLite error.
        #[source]
        source: rusqlite::Error,
    },
    /// The store was written by a newer mkonnx with a schema this build does not know.
    #[error(
        "store database {} has schema version {found}, but this mkonnx knows only up to {known}; \
         use a newer mkonnx or another store (--store)",
        path.display()
    )]
    SchemaTooNew {
        /// Path of `store.sqlite`.
        path: PathBuf,
        /// `PRAGMA user_version` found.
        found: u32,
        /// Highest version this build can migrate to.
        known: u32,
    },
    /// A row of the store database could not be decoded.
    #[error("store database {}: corrupt record: {what}", path.display())]
    CorruptRecord {
        /// Path of `store.sqlite`.
        path: PathBuf,
        /// Which record and what is wrong with it.
        what: String,
    },
    /// A stage name is empty or contains characters other than `[A-Za-z0-9_.-]`.
    #[error("invalid stage name {name:?}: use letters, digits, '_', '.' or '-'")]
    InvalidStageName {
        /// The offending name.
        name: String,
    },
    /// An artifact name is not a plain relative path.
    #[error("stage {stage}: invalid artifact name {name:?}: {why}")]
    InvalidArtifactName {
        /// The stage that used the name.
        stage: String,
        /// The offending name.
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// An input name is empty or used twice on one node.
    #[error("stage {stage}: input name {input:?} is empty or used twice")]
    DuplicateInput {
        /// The stage of the node being added.
        stage: String,
        /// The input name.
        input: String,
    },
    /// A node handle does not belong to the graph.
    #[error("node handle {index} does not belong to this graph")]
    UnknownNode {
        /// The handle's index.
        index: usize,
    },
    /// Two nodes have the same identity but different stage versions or parameters.
    #[error(
        "two nodes of stage {stage} have the same inputs but different {what}; \
         give them distinct NodeSpec::identity values"
    )]
    ConflictingNode {
        /// The stage.
        stage: String,
        /// "parameters" or "stage versions".
        what: &'static str,
    },
    /// Two different nodes materialize to the same destination.
    #[error("both {first} and {second} write {}", dest.display())]
    DestinationConflict {
        /// The contested destination path.
        dest: PathBuf,
        /// Display name of the node that claimed it first.
        first: String,
        /// Display name of the other node.
        second: String,
    },
    /// Parameters contain an absolute path, which would make keys machine-specific.
    #[error(
        "stage {stage}: parameter {key} holds an absolute path ({value}); pass files as inputs \
         so that only their content enters the key"
    )]
    AbsolutePathInParams {
        /// The stage.
        stage: String,
        /// Dotted path of the parameter.
        key: String,
        /// The value.
        value: String,
    },
    /// A stage asked its context for an input it was not given.
    #[error("stage {stage}: no input named {input:?}")]
    UnknownInput {
        /// The stage.
        stage: String,
        /// The input name it asked for.
        input: String,
    },
    /// A stage asked for an artifact its upstream did not produce.
    #[error("stage {stage}: input {input:?} has no artifact {artifact:?} (it has: {available})")]
    UnknownArtifact {
        /// The stage.
        stage: String,
        /// The node input.
        input: String,
        /// The artifact name asked for.
        artifact: String,
        /// Comma-separated names the upstream did produce.
        available: String,
    },
    /// A stage registered an output path but did not write the file.
    #[error("stage {stage} did not write its output {name:?} ({})", path.display())]
    MissingOutput {
        /// The stage.
        stage: String,
        /// The artifact name.
        name: String,
        /// Where the file was expected.
        path: PathBuf,
    },
    /// A materialization names an artifact the stage does not produce.
    #[error("stage {stage} produced no artifact {artifact:?} to write to {} (it produced: {available})", dest.display())]
    MissingArtifact {
        /// The stage.
        stage: String,
        /// The artifact name.
        artifact: String,
        /// Where it was to be written.
        dest: PathBuf,
        /// Comma-separated names the stage did produce.
        available: String,
    },
    /// An input file changed while its stage was running, so the result cannot be trusted.
    #[error("input {input:?} ({}) changed while the stage was running; run again", path.display())]
    InputChangedDuringBuild {
        /// The input name.
        input: String,
        /// Its path.
        path: PathBuf,
    },
    /// A stored blob is missing or its content does not match its hash.
    #[error("store blob {} is missing or corrupt", path.display())]
    CorruptBlob {
        /// The blob's path in the store.
        path: PathBuf,
    },
    /// The store's SQLite index is damaged (a truncated or overwritten file).
    #[error(
        "store database {db} is damaged ({source}). Run directories are intact; to recover, move the \
         index aside and build again (stages rerun and refill the store): mv {db} {db}.damaged, or use \
         another store (--store DIR). `mkonnx verify` checks the blobs of a store that opens",
        db = path.display()
    )]
    CorruptDatabase {
        /// Path of `store.sqlite`.
        path: PathBuf,
        /// What SQLite said.
        #[source]
        source: rusqlite::Error,
    },
    /// The store could be opened only read-only, and this needs to write it.
    #[error(
        "store {} is read-only for this user: results in it are used, but a stage that must run \
         cannot be recorded (or its schema is older than this mkonnx); use a writable store (--store DIR)",
        path.display()
    )]
    ReadOnlyStore {
        /// The store's directory.
        path: PathBuf,
    },
    /// A path is not valid UTF-8, which the store's records require.
    #[error("path is not valid UTF-8: {}", path.display())]
    NonUtf8Path {
        /// The path.
        path: PathBuf,
    },
}

impl EngineError {
    /// Whether this is the operating system or SQLite refusing to write (a read-only store).
    pub(crate) fn is_permission_problem(&self) -> bool {
        match self {
            EngineError::Io { source, .. } => {
                matches!(source.kind(), std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem)
            }
            EngineError::Sqlite { source, .. } => {
                matches!(source.sqlite_error_code(), Some(rusqlite::ErrorCode::ReadOnly | rusqlite::ErrorCode::CannotOpen))
            }
            _ => false,
        }
    }

    /// A SQLite error on the store's database: [`EngineError::CorruptDatabase`] when SQLite
    /// says the file is damaged or not a database, else [`EngineError::Sqlite`].
    pub(crate) fn sqlite(path: &std::path::Path, source: rusqlite::Error) -> Self {
        let damaged = matches!(source.sqlite_error_code(), Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase));
        if damaged {
            EngineError::CorruptDatabase { path: path.to_path_buf(), source }
        } else {
            EngineError::Sqlite { path: path.to_path_buf(), source }
        }
    }

    /// Shorthand for [`EngineError::Io`].
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        EngineError::Io { op, path: path.into(), source }
    }
}
