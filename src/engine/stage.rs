//! What a stage implements, and what it sees while it runs.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::file_stat::FileStat;
use super::hash::Hash;
use super::store::Store;
use super::EngineError;

/// A kind of build step. One value of a type implementing `Stage` (holding its parameters)
/// is one node's code; its inputs and outputs are wired by [`crate::engine::NodeSpec`].
///
/// A stage must be deterministic in its key's ingredients: name, version, [`Stage::params`]
/// and the content of its inputs. Anything else it reads (environment, clock, absolute
/// paths of its inputs) must not change its outputs, or cached results will be wrong.
pub trait Stage: Send + Sync {
    /// Stable name, `[A-Za-z0-9_.-]+`; part of the key and shown to users.
    fn name(&self) -> &'static str;

    /// Bump when the stage's code changes what it writes: every result of the old
    /// version becomes stale ([`crate::engine::StaleReason::StageVersionChanged`]).
    fn version(&self) -> u32;

    /// The parameters that influence the outputs, as JSON. Object key order does not
    /// matter (the engine canonicalizes). Must not contain absolute paths: pass files as
    /// inputs instead, so that only their content enters the key.
    fn params(&self) -> Value {
        Value::Object(serde_json::Map::new())
    }

    /// The upstream nodes this stage reads, by input name (the name is part of the key).
    /// A stage holds its inputs as typed fields (mkonnx's stages: `stages::wiring`) and lists
    /// them here; [`crate::engine::NodeSpec::new`] wires them. Stages of engine tests, with
    /// none, are wired by [`crate::engine::NodeSpec::input`] instead.
    fn inputs(&self) -> Vec<(&'static str, super::graph::NodeHandle)> {
        Vec::new()
    }

    /// The files this stage reads, by input name (the name and the file's content are part
    /// of the key), for a stage that holds them as fields (its own list of images, say);
    /// wired like [`Stage::inputs`]. Files of the run a planner knows about are added with
    /// [`crate::engine::NodeSpec::file`] instead.
    fn files(&self) -> Vec<(String, PathBuf)> {
        Vec::new()
    }

    /// Does the work: reads inputs and writes outputs through `ctx`. An error (or a panic)
    /// fails this node and skips its dependents; nothing it wrote is kept.
    fn run(&self, ctx: &mut StageContext<'_>) -> anyhow::Result<()>;
}

/// A file input after hashing.
#[derive(Clone, Debug)]
pub(crate) struct HashedFile {
    pub name: String,
    pub path: PathBuf,
    pub hash: Hash,
    /// The stat when hashed; compared again after the stage ran.
    pub stat: FileStat,
}

/// A stage's view of its inputs and its output directory while it runs.
pub struct StageContext<'a> {
    pub(crate) stage: &'static str,
    pub(crate) labels: &'a [String],
    pub(crate) key: Hash,
    pub(crate) files: &'a [HashedFile],
    /// (input name, upstream artifacts: name -> blob hash).
    pub(crate) upstream: Vec<(&'a str, &'a BTreeMap<String, Hash>)>,
    pub(crate) store: &'a Store,
    pub(crate) out_dir: PathBuf,
    pub(crate) temp_dir: PathBuf,
    pub(crate) outputs: BTreeSet<String>,
    /// Content hash and size of outputs written by [`StageContext::write_output`] or
    /// [`StageContext::write_output_with`]: hashed as they were written, so committing them
    /// need not read them back.
    pub(crate) written: BTreeMap<String, (Hash, u64)>,
    /// Outputs that are an upstream's artifact as it is (see
    /// [`StageContext::reuse_input_artifact`]): name -> blob hash already in the store.
    pub(crate) reused: BTreeMap<String, Hash>,
}

impl StageContext<'_> {
    /// The running stage's name.
    pub fn stage_name(&self) -> &'static str {
        self.stage
    }

    /// The labels (runs) of the node, for messages.
    pub fn labels(&self) -> &[String] {
        self.labels
    }

    /// The node's key (hex in [`Hash::to_hex`]), e.g. for a summary file.
    pub fn key(&self) -> Hash {
        self.key
    }

    /// The path of file input `name`.
    pub fn input_file(&self, name: &str) -> Result<&Path, EngineError> {
        self.file(name).map(|f| f.path.as_path())
    }

    /// The content hash of file input `name` (blake3 of its bytes).
    pub fn input_file_hash(&self, name: &str) -> Result<Hash, EngineError> {
        self.file(name).map(|f| f.hash)
    }

    fn file(&self, name: &str) -> Result<&HashedFile, EngineError> {
        self.files
            .iter()
            .find(|f| f.name == name)
            .ok_or_else(|| EngineError::UnknownInput { stage: self.stage.to_string(), input: name.to_string() })
    }

    fn upstream(&self, input: &str) -> Result<&BTreeMap<String, Hash>, EngineError> {
        self.upstream
            .iter()
            .find(|(n, _)| *n == input)
            .map(|(_, a)| *a)
            .ok_or_else(|| EngineError::UnknownInput { stage: self.stage.to_string(), input: input.to_string() })
    }

    /// Names and paths of all file inputs, sorted by name.
    pub fn file_inputs(&self) -> Vec<(&str, &Path)> {
        let mut v: Vec<(&str, &Path)> = self.files.iter().map(|f| (f.name.as_str(), f.path.as_path())).collect();
        v.sort();
        v
    }

    /// Names of all node inputs, sorted.
    pub fn node_inputs(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.upstream.iter().map(|(n, _)| *n).collect();
        v.sort();
        v
    }

    /// The blob hash of artifact `artifact` of node input `input`.
    pub fn input_artifact_hash(&self, input: &str, artifact: &str) -> Result<Hash, EngineError> {
        let arts = self.upstream(input)?;
        arts.get(artifact).copied().ok_or_else(|| EngineError::UnknownArtifact {
            stage: self.stage.to_string(),
            input: input.to_string(),
            artifact: artifact.to_string(),
            available: arts.keys().cloned().collect::<Vec<_>>().join(", "),
        })
    }

    /// The path, inside the store, of artifact `artifact` of node input `input`.
    /// The file is read-only: copy it to change it.
    pub fn input_artifact(&self, input: &str, artifact: &str) -> Result<PathBuf, EngineError> {
        Ok(self.store.blob_path(&self.input_artifact_hash(input, artifact)?))
    }

    /// Reads artifact `artifact` of node input `input`.
    pub fn read_input_artifact(&self, input: &str, artifact: &str) -> Result<Vec<u8>, EngineError> {
        let path = self.input_artifact(input, artifact)?;
        fs::read(&path).map_err(|e| EngineError::io("read", path, e))
    }

    /// Every artifact of node input `input` as (name, store path), sorted by name; for
    /// outputs whose names are not known in advance (one image per dataset entry).
    pub fn input_artifacts(&self, input: &str) -> Result<Vec<(String, PathBuf)>, EngineError> {
        Ok(self.upstream(input)?.iter().map(|(name, h)| (name.clone(), self.store.blob_path(h))).collect())
    }

    /// Registers output artifact `name` (a relative path such as `model.onnx` or
    /// `visualizations/0000_detected.png`) and returns the temporary path the stage must
    /// write it to; parent directories exist. The file must exist when `run` returns.
    pub fn output_path(&mut self, name: &str) -> Result<PathBuf, EngineError> {
        validate_artifact_name(self.stage, name)?;
        let path = self.out_dir.join(name);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|e| EngineError::io("create directory", parent, e))?;
        }
        self.outputs.insert(name.to_string());
        // The caller may write anything there: forget a hash taken from earlier bytes.
        self.written.remove(name);
        self.reused.remove(name);
        Ok(path)
    }

    /// Writes output artifact `name` with the given bytes.
    pub fn write_output(&mut self, name: &str, bytes: impl AsRef<[u8]>) -> Result<(), EngineError> {
        let bytes = bytes.as_ref();
        let path = self.output_path(name)?;
        fs::write(&path, bytes).map_err(|e| EngineError::io("write", &path, e))?;
        self.written.insert(name.to_string(), (super::hash::hash_bytes(bytes), bytes.len() as u64));
        Ok(())
    }

    /// Writes output artifact `name` by streaming it through `write`, hashing on the way: for
    /// large artifacts (a model of hundreds of MB) that need not sit in memory whole.
    pub fn write_output_with(
        &mut self,
        name: &str,
        write: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()>,
    ) -> Result<(), EngineError> {
        let path = self.output_path(name)?;
        let file = fs::File::create(&path).map_err(|e| EngineError::io("create", &path, e))?;
        let file = super::store::EarlyWriteback::new(file);
        let mut out = HashingWriter { inner: std::io::BufWriter::with_capacity(1 << 20, file), hasher: blake3::Hasher::new(), len: 0 };
        write(&mut out).and_then(|()| std::io::Write::flush(&mut out)).map_err(|e| EngineError::io("write", &path, e))?;
        self.written.insert(name.to_string(), (out.hasher.finalize().into(), out.len));
        Ok(())
    }

    /// Declares output artifact `name` to be artifact `artifact` of node input `input`, byte
    /// for byte, without copying it: a stage that only decides whether an upstream's output
    /// goes on (publishing a model that passed its parity check) costs no I/O.
    pub fn reuse_input_artifact(&mut self, input: &str, artifact: &str, name: &str) -> Result<(), EngineError> {
        validate_artifact_name(self.stage, name)?;
        let hash = self.input_artifact_hash(input, artifact)?;
        self.outputs.remove(name);
        self.written.remove(name);
        self.reused.insert(name.to_string(), hash);
        Ok(())
    }

    /// A private, empty directory for intermediate files; removed after the stage ends.
    pub fn temp_dir(&self) -> &Path {
        &self.temp_dir
    }
}

/// A writer that hashes (blake3) and counts what passes through it.
struct HashingWriter<W> {
    inner: W,
    hasher: blake3::Hasher,
    len: u64,
}

impl<W: std::io::Write> std::io::Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        super::hash::update(&mut self.hasher, &buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Artifact names are relative paths with `/` separators and plain components, so that
/// materializing one into a directory can never escape it.
pub(crate) fn validate_artifact_name(stage: &str, name: &str) -> Result<(), EngineError> {
    let bad = |why| Err(EngineError::InvalidArtifactName { stage: stage.to_string(), name: name.to_string(), why });
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.contains('\\') || name.contains('\0') {
        return bad("it contains a backslash or NUL; use '/' to separate directories");
    }
    if name.starts_with('/') {
        return bad("it is absolute");
    }
    if name.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return bad("it has an empty, '.' or '..' component");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn artifact_names() {
        for ok in ["model.onnx", "visualizations/0000_detected.png", "a/b/c"] {
            validate_artifact_name("s", ok).unwrap();
        }
        for bad in ["", "/etc/passwd", "../x", "a/../b", "a//b", "a/", "./a", "a\\b"] {
            assert!(validate_artifact_name("s", bad).is_err(), "{bad:?}");
        }
    }
}
