//! The decisions `build` and `status` share, so that what `status` says is what a build
//! does: whether a stored result is used ([`reusable_result`]), and which of its
//! materialized files must be written again, with the reason ([`stale_copy`]). `status`
//! adds the other reasons (what changed since the last build) in dirty.rs.

use std::fmt;
use std::path::{Path, PathBuf};

use super::hash::Hash;
use super::stat_cache::FileHasher;
use super::store::{Store, StoredResult};
use super::EngineError;

/// The stored result a build uses for `key` instead of running the stage: complete results
/// only, and none when the node is forced.
pub(crate) fn reusable_result(store: &Store, key: &Hash, forced: bool) -> Result<Option<StoredResult>, EngineError> {
    if forced {
        return Ok(None);
    }
    Ok(store.lookup_result(key)?.and_then(|(result, complete)| complete.then_some(result)))
}

/// Whether the materialized file `dest` already holds `blob`: `None` if so (a build leaves it
/// alone), else why a build writes it again.
pub(crate) fn stale_copy(hasher: &FileHasher, dest: &Path, blob: &Hash) -> Option<StaleReason> {
    match hasher.hash(dest) {
        Ok((current, _)) if current == *blob => None,
        Ok(_) => Some(StaleReason::OutputModified { path: dest.to_path_buf() }),
        Err(_) => Some(StaleReason::OutputMissing { path: dest.to_path_buf() }),
    }
}

/// Why a node is not fresh. Each renders as a sentence for users (`Display`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StaleReason {
    /// The node has no record of a successful build.
    NeverBuilt,
    /// The [`Force`] option names it.
    Forced,
    /// The stage's version differs from the last build's.
    StageVersionChanged {
        /// Version at the last build.
        old: u32,
        /// Version now.
        new: u32,
    },
    /// The tool version differs from the last build's.
    ToolVersionChanged {
        /// Version at the last build.
        old: String,
        /// Version now.
        new: String,
    },
    /// Parameters differ from the last build's.
    ParamsChanged {
        /// Dotted paths of the parameters that changed, added or were removed.
        keys: Vec<String>,
    },
    /// A file input's content differs from the last build's. (A different *path* makes
    /// a different node, see [`crate::engine::NodeId`]; it is never built if its content
    /// was built before, else it is [`StaleReason::NeverBuilt`].)
    InputChanged {
        /// The input's name ("checkpoint", "config", "dataset", ...).
        input: String,
        /// Hash at the last build.
        old_hash: Hash,
        /// Hash now.
        new_hash: Hash,
    },
    /// A file input cannot be read now.
    InputUnreadable {
        /// The input's name.
        input: String,
        /// Its path.
        path: PathBuf,
        /// Why.
        error: String,
    },
    /// An upstream node's outputs differ from those this node was last built from.
    UpstreamChanged {
        /// The input that names the upstream.
        input: String,
        /// The upstream's display name.
        node: String,
    },
    /// An upstream node is stale, so its outputs, and hence this node's key, are known
    /// only once it has run (it may turn out fresh after all, by early cutoff).
    UpstreamStale {
        /// The input that names the upstream.
        input: String,
        /// The upstream's display name.
        node: String,
    },
    /// A materialized output file is missing (restored from the store by a build).
    OutputMissing {
        /// The file.
        path: PathBuf,
    },
    /// A materialized output file's content differs from the store's (restored by a build).
    OutputModified {
        /// The file.
        path: PathBuf,
    },
    /// A materialization names an artifact the stored result does not have (the graph
    /// asks for an output the stage does not produce); a build fails this node.
    MissingArtifact {
        /// The artifact name.
        artifact: String,
        /// Where it was to be written.
        path: PathBuf,
    },
    /// The last build's ingredients all match, but the store no longer holds the result
    /// (removed by gc, or its files were deleted).
    NotInStore,
}

impl fmt::Display for StaleReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StaleReason::NeverBuilt => write!(f, "never built"),
            StaleReason::Forced => write!(f, "forced"),
            StaleReason::StageVersionChanged { old, new } => {
                write!(f, "stage version changed ({old} -> {new})")
            }
            StaleReason::ToolVersionChanged { old, new } => {
                write!(f, "mkonnx version changed ({old} -> {new})")
            }
            StaleReason::ParamsChanged { keys } => {
                write!(f, "parameters changed: {}", keys.join(", "))
            }
            StaleReason::InputChanged { input, old_hash, new_hash } => {
                write!(f, "input `{input}` changed ({} -> {})", old_hash.short(), new_hash.short())
            }
            StaleReason::InputUnreadable { input, path, error } => {
                write!(f, "input `{input}` ({}) cannot be read: {error}", path.display())
            }
            StaleReason::UpstreamChanged { input, node } => {
                write!(f, "upstream {node} (input `{input}`) changed")
            }
            StaleReason::UpstreamStale { input, node } => {
                write!(f, "upstream {node} (input `{input}`) is stale; rechecked once it has run")
            }
            StaleReason::OutputMissing { path } => {
                write!(f, "output {} is missing", path.display())
            }
            StaleReason::OutputModified { path } => {
                write!(f, "output {} was modified", path.display())
            }
            StaleReason::MissingArtifact { artifact, path } => {
                write!(f, "the stage produces no artifact `{artifact}` to write to {}", path.display())
            }
            StaleReason::NotInStore => write!(f, "the store no longer holds its result"),
        }
    }
}
