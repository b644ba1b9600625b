//! The DAG of nodes for one invocation.

use std::collections::{BTreeMap, HashMap};
use std::fmt::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::EdgeRef;
use petgraph::Direction;
use serde_json::Value;

use super::hash::{canonical_json, Hash, KeyHasher, NODE_ID_DOMAIN};
use super::stage::{validate_artifact_name, Stage};
use super::EngineError;

/// A node of one [`Graph`]; cheap to copy. Indices follow insertion order, which is a
/// topological order (a node can only name nodes added before it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeHandle(pub(crate) usize);

impl NodeHandle {
    /// Position in insertion order.
    pub fn index(self) -> usize {
        self.0
    }
}

/// A node's identity across invocations: stage name, [`NodeSpec::identity`] and the
/// identities of its inputs (file paths, upstream node ids). Not its parameters or
/// versions, so that their changes can be explained rather than seen as a new node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub(crate) Hash);

impl NodeId {
    /// The underlying hash.
    pub fn hash(&self) -> Hash {
        self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// Where a node's artifacts are copied after it is built or found in the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Materialize {
    /// Artifact `artifact` to the file `dest`.
    File {
        /// Artifact name.
        artifact: String,
        /// Destination file.
        dest: PathBuf,
    },
    /// Every artifact whose name starts with `prefix` (empty, or ending in `/`) to
    /// `dest_dir` joined with the rest of its name.
    Dir {
        /// Name prefix, `""` for all artifacts.
        prefix: String,
        /// Destination directory.
        dest_dir: PathBuf,
    },
}

/// Describes a node to add to a [`Graph`].
pub struct NodeSpec {
    stage: Arc<dyn Stage>,
    labels: Vec<String>,
    identity: Option<String>,
    files: Vec<(String, PathBuf)>,
    inputs: Vec<(String, NodeHandle)>,
    materializations: Vec<Materialize>,
}

impl NodeSpec {
    /// A node running `stage`.
    pub fn new(stage: impl Stage + 'static) -> Self {
        Self::from_arc(Arc::new(stage))
    }

    /// A node running a shared stage value, with the node inputs the stage declares
    /// ([`Stage::inputs`]).
    pub fn from_arc(stage: Arc<dyn Stage>) -> Self {
        let inputs = stage.inputs().into_iter().map(|(name, node)| (name.to_string(), node)).collect();
        let files = stage.files();
        NodeSpec { stage, labels: Vec::new(), identity: None, files, inputs, materializations: Vec::new() }
    }

    /// Names the run this node belongs to (e.g. the run directory as the user typed it);
    /// reports group nodes by label. A node shared by several runs carries each label.
    pub fn label(mut self, label: impl Into<String>) -> Self {
        self.labels.push(label.into());
        self
    }

    /// Distinguishes nodes of the same stage with the same inputs (e.g. two parameter
    /// variants in one graph). Part of the [`NodeId`], not of the key.
    pub fn identity(mut self, identity: impl Into<String>) -> Self {
        self.identity = Some(identity.into());
        self
    }

    /// Adds file input `name` (e.g. `"checkpoint"`): its content hash enters the key.
    pub fn file(mut self, name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        self.files.push((name.into(), path.into()));
        self
    }

    /// Adds node input `name`: the upstream's output hash enters the key, and the stage
    /// reads its artifacts with [`crate::engine::StageContext::input_artifact`].
    pub fn input(mut self, name: impl Into<String>, upstream: NodeHandle) -> Self {
        self.inputs.push((name.into(), upstream));
        self
    }

    /// Copies artifact `artifact` to `dest` (restored whenever missing or edited).
    pub fn materialize(mut self, artifact: impl Into<String>, dest: impl Into<PathBuf>) -> Self {
        self.materializations.push(Materialize::File { artifact: artifact.into(), dest: dest.into() });
        self
    }

    /// Copies every artifact named `prefix...` to `dest_dir/...`; `prefix` is empty or
    /// ends in `/` (e.g. `"visualizations/"`).
    pub fn materialize_dir(mut self, prefix: impl Into<String>, dest_dir: impl Into<PathBuf>) -> Self {
        self.materializations.push(Materialize::Dir { prefix: prefix.into(), dest_dir: dest_dir.into() });
        self
    }
}

/// One node, resolved.
pub(crate) struct Node {
    pub stage: Arc<dyn Stage>,
    pub name: &'static str,
    pub version: u32,
    pub id: NodeId,
    pub params: Value,
    pub params_canonical: String,
    pub labels: Vec<String>,
    /// (input name, absolute path).
    pub files: Vec<(String, PathBuf)>,
    /// (input name, upstream).
    pub upstream: Vec<(String, NodeHandle)>,
    pub materializations: Vec<Materialize>,
}

/// One materialized file: destination, artifact, blob.
pub(crate) type PlannedCopy = (PathBuf, String, Hash);

impl Node {
    /// Whether `dest` is one of this node's destinations: a file it materializes, or a path
    /// inside a directory it materializes into.
    pub(crate) fn owns(&self, dest: &Path) -> bool {
        self.materializations.iter().any(|m| match m {
            Materialize::File { dest: d, .. } => d == dest,
            Materialize::Dir { dest_dir, .. } => dest.starts_with(dest_dir),
        })
    }

    /// The files to write for a result with these artifacts.
    pub(crate) fn materialization_plan(&self, artifacts: &BTreeMap<String, Hash>) -> Result<Vec<PlannedCopy>, EngineError> {
        let mut plan = Vec::new();
        for m in &self.materializations {
            match m {
                Materialize::File { artifact, dest } => {
                    let blob = artifacts.get(artifact).ok_or_else(|| EngineError::MissingArtifact {
                        stage: self.name.to_string(),
                        artifact: artifact.clone(),
                        dest: dest.clone(),
                        available: artifacts.keys().cloned().collect::<Vec<_>>().join(", "),
                    })?;
                    plan.push((dest.clone(), artifact.clone(), *blob));
                }
                Materialize::Dir { prefix, dest_dir } => {
                    for (name, blob) in artifacts {
                        if let Some(rest) = name.strip_prefix(prefix.as_str()) {
                            plan.push((dest_dir.join(rest), name.clone(), *blob));
                        }
                    }
                }
            }
        }
        Ok(plan)
    }
}

/// The DAG of one invocation: every node of every run. Build it with [`Graph::add`], then
/// hand it to [`crate::engine::Engine::build`] or [`crate::engine::Engine::status`].
#[derive(Default)]
pub struct Graph {
    dag: DiGraph<Node, String>,
    by_id: HashMap<NodeId, NodeHandle>,
    /// Materialization destination -> node, to refuse two nodes writing one file.
    dests: HashMap<PathBuf, NodeHandle>,
    /// File input paths as given -> resolved: the stages of a run share its checkpoint, and
    /// resolving a path costs a system call per component.
    resolved: HashMap<PathBuf, PathBuf>,
}

impl Graph {
    /// An empty graph.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a node, or returns the existing node with the same [`NodeId`] (after checking
    /// it has the same stage version and parameters, and merging labels and
    /// materializations), so that a node shared by runs is built once.
    pub fn add(&mut self, spec: NodeSpec) -> Result<NodeHandle, EngineError> {
        let name = spec.stage.name();
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)) {
            return Err(EngineError::InvalidStageName { name: name.to_string() });
        }
        let params = spec.stage.params();
        check_no_absolute_paths(name, "", &params)?;
        let params_canonical = canonical_json(&params);
        let version = spec.stage.version();

        let mut seen = std::collections::HashSet::new();
        for input in spec.files.iter().map(|f| &f.0).chain(spec.inputs.iter().map(|i| &i.0)) {
            if input.is_empty() || !seen.insert(input.as_str()) {
                return Err(EngineError::DuplicateInput { stage: name.to_string(), input: input.clone() });
            }
        }
        for (_, up) in &spec.inputs {
            if up.0 >= self.dag.node_count() {
                return Err(EngineError::UnknownNode { index: up.0 });
            }
        }
        let mut files = Vec::with_capacity(spec.files.len());
        for (input, path) in spec.files {
            let resolved = match self.resolved.get(&path) {
                Some(r) => r.clone(),
                None => {
                    let r = resolve(&path)?;
                    self.resolved.insert(path, r.clone());
                    r
                }
            };
            files.push((input, resolved));
        }
        let mut materializations = Vec::with_capacity(spec.materializations.len());
        for m in spec.materializations {
            materializations.push(match m {
                Materialize::File { artifact, dest } => {
                    validate_artifact_name(name, &artifact)?;
                    Materialize::File { artifact, dest: absolute_utf8(&dest)? }
                }
                Materialize::Dir { prefix, dest_dir } => {
                    if !prefix.is_empty() {
                        validate_artifact_name(name, prefix.trim_end_matches('/'))?;
                        if !prefix.ends_with('/') {
                            return Err(EngineError::InvalidArtifactName {
                                stage: name.to_string(),
                                name: prefix,
                                why: "a directory prefix must be empty or end with '/'",
                            });
                        }
                    }
                    Materialize::Dir { prefix, dest_dir: absolute_utf8(&dest_dir)? }
                }
            });
        }

        let id = self.node_id(name, spec.identity.as_deref(), &files, &spec.inputs);
        if let Some(&existing) = self.by_id.get(&id) {
            let node = &self.dag[NodeIndex::new(existing.0)];
            if node.version != version {
                return Err(EngineError::ConflictingNode { stage: name.to_string(), what: "stage versions" });
            }
            if node.params_canonical != params_canonical {
                return Err(EngineError::ConflictingNode { stage: name.to_string(), what: "parameters" });
            }
            self.claim_dests(&materializations, existing, &self.display_name(existing))?;
            let node = &mut self.dag[NodeIndex::new(existing.0)];
            for label in spec.labels {
                if !node.labels.contains(&label) {
                    node.labels.push(label);
                }
            }
            for m in materializations {
                if !node.materializations.contains(&m) {
                    node.materializations.push(m);
                }
            }
            return Ok(existing);
        }

        let handle = NodeHandle(self.dag.node_count());
        let mut labels = Vec::new();
        for label in spec.labels {
            if !labels.contains(&label) {
                labels.push(label);
            }
        }
        let display = if labels.is_empty() { name.to_string() } else { format!("{name} [{}]", labels.join(", ")) };
        self.claim_dests(&materializations, handle, &display)?;
        let idx = self.dag.add_node(Node {
            stage: spec.stage,
            name,
            version,
            id,
            params,
            params_canonical,
            labels,
            files,
            upstream: spec.inputs.clone(),
            materializations,
        });
        debug_assert_eq!(idx.index(), handle.0);
        for (input, up) in spec.inputs {
            self.dag.add_edge(NodeIndex::new(up.0), idx, input);
        }
        self.by_id.insert(id, handle);
        Ok(handle)
    }

    fn node_id(&self, stage: &str, identity: Option<&str>, files: &[(String, PathBuf)], inputs: &[(String, NodeHandle)]) -> NodeId {
        let mut parts: Vec<(&str, &str, Vec<u8>)> = files
            .iter()
            .map(|(n, p)| (n.as_str(), "file", p.as_os_str().as_encoded_bytes().to_vec()))
            .chain(inputs.iter().map(|(n, h)| (n.as_str(), "node", self.dag[NodeIndex::new(h.0)].id.0.as_bytes().to_vec())))
            .collect();
        parts.sort();
        let mut h = KeyHasher::new(NODE_ID_DOMAIN);
        h.str("stage", stage);
        match identity {
            Some(i) => h.str("identity", i),
            None => h.str("no-identity", ""),
        };
        h.u64("inputs", parts.len() as u64);
        for (name, kind, ident) in parts {
            h.str("input", name).str("kind", kind).bytes("identity", &ident);
        }
        NodeId(h.finish())
    }

    /// Records `handle` as the writer of each destination, after checking that no other
    /// node writes any of them (all checked first, so a refused node claims nothing).
    fn claim_dests(&mut self, mats: &[Materialize], handle: NodeHandle, display: &str) -> Result<(), EngineError> {
        let dest_of = |m: &Materialize| match m {
            Materialize::File { dest, .. } => dest.clone(),
            Materialize::Dir { dest_dir, .. } => dest_dir.clone(),
        };
        for (i, m) in mats.iter().enumerate() {
            let dest = dest_of(m);
            if mats[..i].iter().any(|earlier| dest_of(earlier) == dest && earlier != m) {
                return Err(EngineError::DestinationConflict { dest, first: display.to_string(), second: display.to_string() });
            }
            if let Some(&other) = self.dests.get(&dest) {
                if other != handle {
                    return Err(EngineError::DestinationConflict { dest, first: self.display_name(other), second: display.to_string() });
                }
            }
        }
        for m in mats {
            self.dests.insert(dest_of(m), handle);
        }
        Ok(())
    }

    /// The node of this graph that materializes `dest`, if any.
    pub(crate) fn writer_of(&self, dest: &Path) -> Option<NodeHandle> {
        self.dests.get(dest).copied()
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.dag.node_count()
    }

    /// Whether the graph has no nodes.
    pub fn is_empty(&self) -> bool {
        self.dag.node_count() == 0
    }

    /// All nodes in insertion (topological) order.
    pub fn handles(&self) -> impl Iterator<Item = NodeHandle> + '_ {
        (0..self.dag.node_count()).map(NodeHandle)
    }

    /// The nodes running the stage called `stage`, e.g. to force them.
    pub fn find_stage(&self, stage: &str) -> Vec<NodeHandle> {
        self.handles().filter(|h| self.node(*h).name == stage).collect()
    }

    pub(crate) fn node(&self, h: NodeHandle) -> &Node {
        &self.dag[NodeIndex::new(h.0)]
    }

    /// The node's persistent id.
    pub fn node_id_of(&self, h: NodeHandle) -> NodeId {
        self.node(h).id
    }

    /// The node's stage name.
    pub fn stage_name(&self, h: NodeHandle) -> &'static str {
        self.node(h).name
    }

    /// The node's labels.
    pub fn labels(&self, h: NodeHandle) -> &[String] {
        &self.node(h).labels
    }

    /// `stage [label, ...]`, for messages.
    pub fn display_name(&self, h: NodeHandle) -> String {
        let n = self.node(h);
        if n.labels.is_empty() {
            n.name.to_string()
        } else {
            format!("{} [{}]", n.name, n.labels.join(", "))
        }
    }

    /// Dependents of `h`, one entry per edge.
    pub(crate) fn dependents(&self, h: NodeHandle) -> impl Iterator<Item = NodeHandle> + '_ {
        self.dag.edges_directed(NodeIndex::new(h.0), Direction::Outgoing).map(|e| NodeHandle(e.target().index()))
    }

    /// Graphviz source of the DAG: nodes (filled with `fill(node)`, a Graphviz colour name;
    /// `StatusReport::dot_fill` colours by freshness), file inputs, and edges labelled with
    /// input names.
    pub fn to_dot(&self, fill: &dyn Fn(NodeHandle) -> &'static str) -> String {
        let mut out = String::from("digraph mkonnx {\n  rankdir=LR;\n  node [shape=box, style=filled, fillcolor=white];\n");
        let mut file_ids: BTreeMap<&Path, usize> = BTreeMap::new();
        for h in self.handles() {
            let n = self.node(h);
            let mut label = n.name.to_string();
            for l in &n.labels {
                label.push('\n');
                label.push_str(l);
            }
            let colour = fill(h);
            let _ = writeln!(out, "  n{} [label=\"{}\", fillcolor={colour}];", h.0, escape(&label));
            for (input, path) in &n.files {
                let next = file_ids.len();
                let fid = *file_ids.entry(path.as_path()).or_insert_with(|| {
                    let fname = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
                    let _ = writeln!(out, "  f{next} [label=\"{}\", shape=note];", escape(&fname));
                    next
                });
                let _ = writeln!(out, "  f{fid} -> n{} [label=\"{}\"];", h.0, escape(input));
            }
        }
        for e in self.dag.edge_references() {
            let _ = writeln!(out, "  n{} -> n{} [label=\"{}\"];", e.source().index(), e.target().index(), escape(e.weight()));
        }
        out.push_str("}\n");
        out
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Canonical path when the file exists (symlinks resolved, so two spellings of one file
/// are one node), else absolute: a missing input is reported when the node runs.
fn resolve(path: &Path) -> Result<PathBuf, EngineError> {
    match std::fs::canonicalize(path) {
        Ok(p) => Ok(p),
        Err(_) => std::path::absolute(path).map_err(|e| EngineError::io("resolve", path, e)),
    }
}

fn absolute_utf8(path: &Path) -> Result<PathBuf, EngineError> {
    let abs = std::path::absolute(path).map_err(|e| EngineError::io("resolve", path, e))?;
    if abs.to_str().is_none() {
        return Err(EngineError::NonUtf8Path { path: abs });
    }
    Ok(abs)
}

fn check_no_absolute_paths(stage: &str, at: &str, v: &Value) -> Result<(), EngineError> {
    match v {
        Value::String(s) if s.len() > 1 && Path::new(s).is_absolute() => Err(EngineError::AbsolutePathInParams {
            stage: stage.to_string(),
            key: if at.is_empty() { "(root)".to_string() } else { at.to_string() },
            value: s.clone(),
        }),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                check_no_absolute_paths(stage, &format!("{at}[{i}]"), item)?;
            }
            Ok(())
        }
        Value::Object(map) => {
            for (k, item) in map {
                let key = if at.is_empty() { k.clone() } else { format!("{at}.{k}") };
                check_no_absolute_paths(stage, &key, item)?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}
