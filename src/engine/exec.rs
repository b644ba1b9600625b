//! Executing a graph: keys, store lookups, locks, running stages, materializing.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use anyhow::anyhow;

use super::file_stat::FileStat;
use super::freshness::{reusable_result, stale_copy};
use super::graph::{Graph, Node, NodeHandle, PlannedCopy};
use super::hash::{output_set_hash, stage_key, Hash, InputKind, KeyIngredients};
use super::remote::RemoteStore;
use super::stage::{HashedFile, StageContext};
use super::stat_cache::{Clock, FileHasher, SystemClock, RACY_MARGIN_NS};
use super::store::{InputRecord, MatRecord, NodeRecord, OutputMode, RemoveDirOnDrop, Store, StoredResult};
use super::EngineError;

/// Which nodes to rebuild even if the store has their key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Force {
    /// None: the store decides.
    #[default]
    Nothing,
    /// Every node.
    All,
    /// These nodes. Their dependents rebuild only if the forced outputs change.
    Nodes(BTreeSet<NodeHandle>),
}

impl Force {
    /// Whether `h` is forced.
    pub fn contains(&self, h: NodeHandle) -> bool {
        match self {
            Force::Nothing => false,
            Force::All => true,
            Force::Nodes(set) => set.contains(&h),
        }
    }
}

/// Progress notifications, delivered from worker threads.
#[derive(Debug)]
pub enum BuildEvent<'r> {
    /// The node's key missed the store and its stage is about to run.
    Started {
        /// The node.
        node: NodeHandle,
    },
    /// The node is done, one way or another.
    Finished {
        /// The node.
        node: NodeHandle,
        /// What happened.
        outcome: &'r Outcome,
    },
}

/// Options of [`Engine::build`].
#[derive(Default)]
pub struct BuildOptions<'a> {
    /// Nodes to rebuild regardless of the store.
    pub force: Force,
    /// Called on worker threads as nodes start and finish (e.g. to drive a progress bar).
    pub observer: Option<&'a (dyn Fn(&BuildEvent<'_>) + Sync)>,
    /// Never run a stage: a key that neither the local store nor the remote has fails the
    /// node (`mkonnx pull`).
    pub no_run: bool,
    /// Also share results found in the local store with the remote, not only those built
    /// now (`mkonnx push`).
    pub publish_fresh: bool,
    /// Hard links into the store (the default) or copies for materialized outputs.
    pub outputs: OutputMode,
}

/// What happened to one node in a build.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// Its key was in the store and every materialized file was intact.
    Fresh,
    /// Its key was in the store; these materialized files were missing or edited and
    /// were copied back from the store.
    Restored {
        /// The files written.
        paths: Vec<PathBuf>,
    },
    /// Its stage ran.
    Built {
        /// How long the stage ran.
        duration: Duration,
    },
    /// Its stage, its inputs or the store failed. Format with `{:#}` for the whole chain.
    Failed {
        /// The error.
        error: Arc<anyhow::Error>,
    },
    /// Not attempted because an upstream node failed.
    Skipped {
        /// The failed node at the root of the chain.
        because: NodeHandle,
    },
}

impl Outcome {
    /// Fresh, restored or built.
    pub fn is_ok(&self) -> bool {
        matches!(self, Outcome::Fresh | Outcome::Restored { .. } | Outcome::Built { .. })
    }
}

/// One node's line in a [`BuildReport`].
#[derive(Clone, Debug)]
pub struct NodeReport {
    /// The node.
    pub node: NodeHandle,
    /// `stage [labels]`.
    pub name: String,
    /// The stage's name.
    pub stage: &'static str,
    /// The runs it belongs to.
    pub labels: Vec<String>,
    /// Its key, when its inputs could be hashed.
    pub key: Option<Hash>,
    /// Content hashes of its file inputs, by input name (those that could be hashed).
    pub file_hashes: Vec<(String, Hash)>,
    /// What happened.
    pub outcome: Outcome,
}

/// The result of [`Engine::build`]: one entry per node, in graph order.
#[derive(Clone, Debug)]
pub struct BuildReport {
    /// Per node, indexed by [`NodeHandle::index`].
    pub nodes: Vec<NodeReport>,
    /// Files whose content was read to hash them (the rest came from the stat cache).
    pub files_hashed: usize,
    /// Their total size.
    pub bytes_hashed: u64,
    /// Wall time of the whole build.
    pub elapsed: Duration,
}

/// The nodes of one label (run).
#[derive(Debug)]
pub struct RunSummary<'r> {
    /// The label.
    pub label: &'r str,
    /// Its nodes, in graph order.
    pub nodes: Vec<&'r NodeReport>,
}

impl RunSummary<'_> {
    /// Whether every node of the run is fresh, restored or built.
    pub fn ok(&self) -> bool {
        self.nodes.iter().all(|n| n.outcome.is_ok())
    }
}

impl BuildReport {
    /// Whether every node is fresh, restored or built.
    pub fn ok(&self) -> bool {
        self.nodes.iter().all(|n| n.outcome.is_ok())
    }

    /// The report of node `h`.
    pub fn get(&self, h: NodeHandle) -> &NodeReport {
        &self.nodes[h.0]
    }

    /// Nodes grouped by label, labels in order of first appearance. A shared node appears
    /// under each of its labels; unlabelled nodes under none.
    pub fn runs(&self) -> Vec<RunSummary<'_>> {
        let mut runs: Vec<RunSummary<'_>> = Vec::new();
        let mut index: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
        for n in &self.nodes {
            for label in &n.labels {
                let i = *index.entry(label.as_str()).or_insert_with(|| {
                    runs.push(RunSummary { label, nodes: Vec::new() });
                    runs.len() - 1
                });
                runs[i].nodes.push(n);
            }
        }
        runs
    }

    /// The nodes of each label (run), in graph order; a shared node is under each label.
    pub fn by_label(&self) -> std::collections::HashMap<&str, Vec<&NodeReport>> {
        self.runs().into_iter().map(|r| (r.label, r.nodes)).collect()
    }
}

impl fmt::Display for BuildReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for n in &self.nodes {
            match &n.outcome {
                Outcome::Fresh => writeln!(f, "fresh     {}", n.name)?,
                Outcome::Restored { paths } => writeln!(f, "restored  {} ({} file(s))", n.name, paths.len())?,
                Outcome::Built { duration } => writeln!(f, "built     {} in {:.2?}", n.name, duration)?,
                Outcome::Failed { error } => writeln!(f, "FAILED    {}: {:#}", n.name, error)?,
                Outcome::Skipped { because } => writeln!(f, "skipped   {}: {} failed", n.name, self.nodes[because.0].name)?,
            }
        }
        Ok(())
    }
}

/// The build engine: a store, the tool version that enters every key, and a job count.
pub struct Engine {
    pub(crate) store: Arc<Store>,
    pub(crate) tool_version: String,
    jobs: usize,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) racy_margin_ns: i64,
    /// Results shared with other machines, consulted after a local miss (see `remote.rs`).
    remote: Option<Arc<RemoteStore>>,
}

/// What dependents need of a finished node.
#[derive(Clone)]
enum Done {
    Ok { output_hash: Hash, artifacts: Arc<BTreeMap<String, Hash>> },
    Failed { root: NodeHandle },
}

/// A finished upstream, as its dependent sees it.
struct Upstream<'a> {
    input: &'a str,
    node: NodeHandle,
    output_hash: Hash,
    artifacts: Arc<BTreeMap<String, Hash>>,
}

struct Finished {
    done: Done,
    outcome: Outcome,
    key: Option<Hash>,
    file_hashes: Vec<(String, Hash)>,
}

impl Finished {
    fn failed(h: NodeHandle, key: Option<Hash>, error: anyhow::Error) -> Self {
        Finished::failed_with(h, key, Arc::new(error))
    }

    /// A failure whose error is shared with other nodes (the same key failed for them).
    fn failed_with(h: NodeHandle, key: Option<Hash>, error: Arc<anyhow::Error>) -> Self {
        Finished { done: Done::Failed { root: h }, outcome: Outcome::Failed { error }, key, file_hashes: Vec::new() }
    }
}

struct Sched {
    ready: VecDeque<NodeHandle>,
    /// Unfinished incoming edges per node.
    waiting: Vec<usize>,
    finished: usize,
}

struct BuildCx<'a> {
    graph: &'a Graph,
    opts: &'a BuildOptions<'a>,
    hasher: FileHasher,
    done: Vec<OnceLock<Finished>>,
    sched: Mutex<Sched>,
    wake: Condvar,
    /// Keys whose stage failed in this build, with the error: another node with the same
    /// key (runs sharing a checkpoint and config) fails at once instead of running it again.
    failed_keys: Mutex<BTreeMap<Hash, Arc<anyhow::Error>>>,
    /// Stages allowed to run at once (`jobs`); the workers, more numerous with a remote,
    /// take a slot only to run a stage, not to download or materialize a result.
    stage_slots: Slots,
}

/// A counting semaphore: [`Slots::take`] waits for a free slot, its guard gives it back.
struct Slots {
    free: Mutex<usize>,
    freed: Condvar,
}

impl Slots {
    fn new(n: usize) -> Self {
        Slots { free: Mutex::new(n), freed: Condvar::new() }
    }

    fn take(&self) -> SlotGuard<'_> {
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        while *free == 0 {
            free = self.freed.wait(free).unwrap_or_else(PoisonError::into_inner);
        }
        *free -= 1;
        SlotGuard(self)
    }
}

struct SlotGuard<'a>(&'a Slots);

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        self.0.freed.notify_one();
    }
}

/// Workers of a build with a remote store: a remote hit waits on the network, not on a
/// CPU, so downloads go on in parallel beyond `jobs` (as Bazel's `--jobs` with a remote
/// cache); stages still run `jobs` at a time.
const REMOTE_WORKERS: usize = 8;

/// An attempt at a node failed because the store's copy of something is bad.
enum MatError {
    /// A blob of the node's own result (found while materializing it).
    CorruptBlob(Hash),
    /// A blob of an upstream's result that the stage was about to read.
    CorruptInput {
        upstream: NodeHandle,
        blob: Hash,
    },
    Other(EngineError),
}

impl Engine {
    /// An engine over `store`. `tool_version` enters every key: results of another version
    /// are never reused. Jobs default to the number of CPUs.
    pub fn new(store: Store, tool_version: impl Into<String>) -> Engine {
        Engine {
            store: Arc::new(store),
            tool_version: tool_version.into(),
            jobs: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            clock: Arc::new(SystemClock),
            racy_margin_ns: RACY_MARGIN_NS,
            remote: None,
        }
    }

    /// Opens the store in `store_dir` and makes an engine over it.
    pub fn open(store_dir: &Path, tool_version: impl Into<String>) -> Result<Engine, EngineError> {
        Ok(Engine::new(Store::open(store_dir)?, tool_version))
    }

    /// Runs at most `jobs` stages at once (`0`: the number of CPUs).
    pub fn with_jobs(mut self, jobs: usize) -> Self {
        if jobs > 0 {
            self.jobs = jobs;
        }
        self
    }

    /// Puts a remote store behind the local one: a local miss is looked up there, and
    /// results built here are uploaded to it.
    pub fn with_remote(mut self, remote: Arc<RemoteStore>) -> Self {
        self.remote = Some(remote);
        self
    }

    /// The remote store, if any.
    pub fn remote(&self) -> Option<&RemoteStore> {
        self.remote.as_deref()
    }

    /// Replaces the clock the stat cache uses (tests).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The tool version in every key.
    pub fn tool_version(&self) -> &str {
        &self.tool_version
    }

    /// Content hashes of files, through the store's stat cache (an unchanged file is not
    /// read again); one result per path.
    pub fn hash_files(&self, paths: &[&Path]) -> Result<Vec<Result<Hash, EngineError>>, EngineError> {
        let hasher = self.new_hasher();
        let hashes = paths.iter().map(|p| hasher.hash(p).map(|(h, _)| h)).collect();
        hasher.flush()?;
        Ok(hashes)
    }

    /// The engine's clock, in nanoseconds since the epoch (for records written beside a build).
    pub fn now_ns(&self) -> i64 {
        self.clock.now_ns()
    }

    pub(crate) fn new_hasher(&self) -> FileHasher {
        FileHasher::new(self.store.clone(), self.clock.clone(), self.racy_margin_ns)
    }

    /// Builds every node of `graph`: up to `jobs` stages at a time, each as soon as its
    /// upstream nodes are done. A failing node skips its dependents; the others go on.
    /// The error is only for the store itself failing before any node could run.
    pub fn build(&self, graph: &Graph, opts: &BuildOptions<'_>) -> Result<BuildReport, EngineError> {
        let start = Instant::now();
        let _gc_guard = self.store.lock_gc(false)?;
        let n = graph.len();
        let mut waiting = vec![0usize; n];
        for h in graph.handles() {
            for d in graph.dependents(h) {
                waiting[d.0] += 1;
            }
        }
        let ready = graph.handles().filter(|h| waiting[h.0] == 0).collect();
        let cx = BuildCx {
            graph,
            opts,
            hasher: self.new_hasher(),
            done: (0..n).map(|_| OnceLock::new()).collect(),
            sched: Mutex::new(Sched { ready, waiting, finished: 0 }),
            wake: Condvar::new(),
            failed_keys: Mutex::new(BTreeMap::new()),
            stage_slots: Slots::new(self.jobs.max(1)),
        };
        let wanted = if self.remote.is_some() { self.jobs.max(REMOTE_WORKERS) } else { self.jobs };
        let workers = wanted.clamp(1, n.max(1));
        std::thread::scope(|s| {
            let mut spawned = 0;
            for i in 0..workers {
                let cx = &cx;
                let spawn = std::thread::Builder::new().name(format!("mkonnx-build-{i}")).spawn_scoped(s, move || self.worker(cx));
                if spawn.is_ok() {
                    spawned += 1;
                }
            }
            if spawned == 0 {
                // No thread could be created: build on this one.
                self.worker(&cx);
            }
        });
        cx.hasher.flush()?;
        let BuildCx { done, hasher, .. } = cx;
        let nodes = done
            .into_iter()
            .enumerate()
            .map(|(i, f)| {
                let h = NodeHandle(i);
                let f = f.into_inner().unwrap_or_else(|| Finished::failed(h, None, anyhow!("internal error: node was never scheduled")));
                NodeReport {
                    node: h,
                    name: graph.display_name(h),
                    stage: graph.stage_name(h),
                    labels: graph.labels(h).to_vec(),
                    key: f.key,
                    file_hashes: f.file_hashes,
                    outcome: f.outcome,
                }
            })
            .collect();
        Ok(BuildReport { nodes, files_hashed: hasher.files_read(), bytes_hashed: hasher.bytes_read(), elapsed: start.elapsed() })
    }

    fn worker(&self, cx: &BuildCx<'_>) {
        let n = cx.graph.len();
        loop {
            let h = {
                let mut st = cx.sched.lock().unwrap_or_else(PoisonError::into_inner);
                loop {
                    if let Some(h) = st.ready.pop_front() {
                        break h;
                    }
                    if st.finished == n {
                        return;
                    }
                    st = cx.wake.wait(st).unwrap_or_else(PoisonError::into_inner);
                }
            };
            // Whatever happens inside, the node must be marked finished, or every other
            // worker would wait for it forever.
            let finished = catch_unwind(AssertUnwindSafe(|| self.process(cx, h)))
                .unwrap_or_else(|p| Finished::failed(h, None, anyhow!("internal error: {}", panic_message(&*p))));
            let node = cx.graph.node(h);
            if !finished.outcome.is_ok() && !node.materializations.is_empty() {
                // What it published for earlier inputs does not belong to the inputs now.
                if let Ok(Some(previous)) = self.store.node_record(&node.id.0) {
                    self.withdraw_outputs(cx, h, &previous, &[]);
                }
            }
            if let Some(observer) = cx.opts.observer {
                let _ = catch_unwind(AssertUnwindSafe(|| observer(&BuildEvent::Finished { node: h, outcome: &finished.outcome })));
            }
            let _ = cx.done[h.0].set(finished);
            let mut st = cx.sched.lock().unwrap_or_else(PoisonError::into_inner);
            st.finished += 1;
            for d in cx.graph.dependents(h) {
                st.waiting[d.0] -= 1;
                if st.waiting[d.0] == 0 {
                    st.ready.push_back(d);
                }
            }
            drop(st);
            cx.wake.notify_all();
        }
    }

    fn process(&self, cx: &BuildCx<'_>, h: NodeHandle) -> Finished {
        let node = cx.graph.node(h);
        let mut upstream: Vec<Upstream<'_>> = Vec::new();
        for (input, up) in &node.upstream {
            match cx.done[up.0].get().map(|f| &f.done) {
                Some(Done::Ok { output_hash, artifacts }) => {
                    upstream.push(Upstream { input: input.as_str(), node: *up, output_hash: *output_hash, artifacts: artifacts.clone() })
                }
                Some(Done::Failed { root }) => {
                    return Finished {
                        done: Done::Failed { root: *root },
                        outcome: Outcome::Skipped { because: *root },
                        key: None,
                        file_hashes: Vec::new(),
                    };
                }
                None => return Finished::failed(h, None, anyhow!("internal error: upstream {} not finished", up.0)),
            }
        }
        let mut files = Vec::with_capacity(node.files.len());
        for (name, path) in &node.files {
            match cx.hasher.hash(path) {
                Ok((hash, stat)) => files.push(HashedFile { name: name.clone(), path: path.clone(), hash, stat }),
                Err(e) => return Finished::failed(h, None, anyhow::Error::new(e).context(format!("input {name:?}"))),
            }
        }
        let mut key = self.key_of(node, &files, upstream.iter().map(|u| (u.input, u.output_hash)));
        let forced = cx.opts.force.contains(h);
        // A corrupt blob is quarantined and forgotten, and whoever made it is built again:
        // this node when its own result was bad, the upstream when a blob this stage was
        // about to read was. Twice is enough unless the disk keeps corrupting files.
        let mut last_error = None;
        for _ in 0..3 {
            match self.attempt(cx, h, node, &files, &upstream, key, forced) {
                Ok(mut f) => {
                    f.file_hashes = files.iter().map(|f| (f.name.clone(), f.hash)).collect();
                    return f;
                }
                Err(MatError::CorruptBlob(blob)) => {
                    if let Err(e) = self.store.forget_blob(&blob) {
                        return Finished::failed(h, Some(key), e.into());
                    }
                    last_error = Some(EngineError::CorruptBlob { path: self.store.blob_path(&blob) });
                }
                Err(MatError::CorruptInput { upstream: up, blob }) => {
                    if let Err(e) = self.store.forget_blob(&blob) {
                        return Finished::failed(h, Some(key), e.into());
                    }
                    last_error = Some(EngineError::CorruptBlob { path: self.store.blob_path(&blob) });
                    let Done::Ok { output_hash, artifacts } = self.process(cx, up).done else {
                        let what = cx.graph.display_name(up);
                        return Finished::failed(h, Some(key), anyhow!("{what} was damaged in the store, and building it again failed"));
                    };
                    for u in upstream.iter_mut().filter(|u| u.node == up) {
                        (u.output_hash, u.artifacts) = (output_hash, artifacts.clone());
                    }
                    key = self.key_of(node, &files, upstream.iter().map(|u| (u.input, u.output_hash)));
                }
                Err(MatError::Other(e)) => return Finished::failed(h, Some(key), e.into()),
            }
        }
        let e = last_error.map(anyhow::Error::new).unwrap_or_else(|| anyhow!("store kept failing"));
        Finished::failed(h, Some(key), e)
    }

    pub(crate) fn key_of<'i>(&self, node: &Node, files: &[HashedFile], upstream: impl Iterator<Item = (&'i str, Hash)>) -> Hash {
        let inputs: Vec<(String, InputKind, Hash)> = files
            .iter()
            .map(|f| (f.name.clone(), InputKind::File, f.hash))
            .chain(upstream.map(|(n, hash)| (n.to_string(), InputKind::Node, hash)))
            .collect();
        stage_key(&KeyIngredients {
            stage: node.name,
            version: node.version,
            tool_version: &self.tool_version,
            params_canonical: &node.params_canonical,
            inputs: &inputs,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn attempt(
        &self,
        cx: &BuildCx<'_>,
        h: NodeHandle,
        node: &Node,
        files: &[HashedFile],
        upstream: &[Upstream<'_>],
        key: Hash,
        forced: bool,
    ) -> Result<Finished, MatError> {
        let mut stored = reusable_result(&self.store, &key, forced).map_err(MatError::Other)?;
        let mut built = None;
        if stored.is_none() {
            let lock = self.store.lock_key(&key).map_err(MatError::Other)?;
            // Another process (or another node with the same key) may have built it while
            // we waited for the lock.
            stored = reusable_result(&self.store, &key, forced).map_err(MatError::Other)?;
            if let (None, false, Some(remote)) = (&stored, forced, &self.remote) {
                // A result built on another machine is downloaded, verified and committed
                // locally like one built here.
                match remote.fetch(&key, &self.store, self.clock.now_ns()) {
                    Ok(found) => stored = found,
                    Err(e) => return Ok(Finished::failed(h, Some(key), e.into())),
                }
            }
            if stored.is_none() && cx.opts.no_run {
                return Ok(Finished::failed(
                    h,
                    Some(key),
                    anyhow!("not built yet: neither the local store nor the remote has this stage's result"),
                ));
            }
            if stored.is_none() {
                // Every stored byte the stage may read is checked first (once per process).
                for u in upstream {
                    if let Some(blob) = u.artifacts.values().find(|b| self.store.verify_blob(b).is_err()) {
                        return Err(MatError::CorruptInput { upstream: u.node, blob: *blob });
                    }
                }
                let failed_before = cx.failed_keys.lock().unwrap_or_else(PoisonError::into_inner).get(&key).cloned();
                if let Some(error) = failed_before {
                    return Ok(Finished::failed(
                        h,
                        Some(key),
                        anyhow!("{error:#} (the same stage with the same inputs failed earlier in this build)"),
                    ));
                }
                let slot = cx.stage_slots.take();
                if let Some(observer) = cx.opts.observer {
                    observer(&BuildEvent::Started { node: h });
                }
                let ran = self.run_stage(node, files, upstream, key);
                drop(slot);
                match ran {
                    Ok((result, duration)) => {
                        built = Some(duration);
                        match self.share(node, &key, &result) {
                            // Another machine recorded this key first: its result wins.
                            Ok(winner) => stored = Some(winner.unwrap_or(result)),
                            Err(e) => return Ok(Finished::failed(h, Some(key), e.into())),
                        }
                    }
                    Err(e) => {
                        let e = Arc::new(e);
                        cx.failed_keys.lock().unwrap_or_else(PoisonError::into_inner).insert(key, e.clone());
                        return Ok(Finished::failed_with(h, Some(key), e));
                    }
                }
            }
            drop(lock);
        } else if cx.opts.publish_fresh {
            if let Some(result) = &stored {
                let shared = self.remote.as_ref().map_or(Ok(true), |r| r.has_record(&key));
                let winner = match shared {
                    Ok(true) => Ok(None),
                    Ok(false) => self.share(node, &key, result),
                    Err(e) => Err(e),
                };
                match winner {
                    Ok(Some(w)) => stored = Some(w),
                    Ok(None) => {}
                    Err(e) => return Ok(Finished::failed(h, Some(key), e.into())),
                }
            }
        }
        let Some(result) = stored else {
            return Ok(Finished::failed(h, Some(key), anyhow!("internal error: no result")));
        };
        let plan = match node.materialization_plan(&result.artifacts) {
            Ok(p) => p,
            Err(e) => return Ok(Finished::failed(h, Some(key), e.into())),
        };
        let previous = self.store.node_record(&node.id.0).map_err(MatError::Other)?;
        if let Some(previous) = &previous {
            self.withdraw_outputs(cx, h, previous, &plan);
        }
        let mut restored = Vec::new();
        for (dest, _, blob) in &plan {
            if stale_copy(&cx.hasher, dest, blob).is_none() {
                continue;
            }
            let t = cx.hasher.now_ns();
            match self.store.restore_blob(blob, dest, cx.opts.outputs) {
                Ok(()) => {}
                Err(EngineError::CorruptBlob { .. }) => return Err(MatError::CorruptBlob(*blob)),
                Err(e) => return Err(MatError::Other(e)),
            }
            cx.hasher.record_written(dest, *blob, t).map_err(MatError::Other)?;
            restored.push(dest.clone());
        }

        let mut inputs: Vec<InputRecord> = files
            .iter()
            .map(|f| InputRecord {
                name: f.name.clone(),
                kind: InputKind::File,
                hash: f.hash,
                identity: f.path.to_string_lossy().into_owned(),
            })
            .chain(upstream.iter().map(|u| InputRecord {
                name: u.input.to_string(),
                kind: InputKind::Node,
                hash: u.output_hash,
                identity: cx.graph.node(u.node).id.to_string(),
            }))
            .collect();
        inputs.sort_by(|a, b| a.name.cmp(&b.name));
        let record = NodeRecord {
            stage: node.name.to_string(),
            stage_version: node.version,
            tool_version: self.tool_version.clone(),
            params: node.params.clone(),
            inputs,
            key,
            output_hash: result.output_hash,
            materializations: plan
                .iter()
                .map(|(dest, artifact, blob)| MatRecord {
                    dest: dest.to_string_lossy().into_owned(),
                    artifact: artifact.clone(),
                    blob: *blob,
                })
                .collect(),
        };
        // A no-op build writes nothing: the record is rewritten only when it changed.
        if previous.as_ref() != Some(&record) {
            self.store.put_node_record(&node.id.0, &record, cx.hasher.now_ns()).map_err(MatError::Other)?;
        }

        let outcome = match built {
            Some(duration) => Outcome::Built { duration },
            None if restored.is_empty() => Outcome::Fresh,
            None => Outcome::Restored { paths: restored },
        };
        Ok(Finished {
            done: Done::Ok { output_hash: result.output_hash, artifacts: Arc::new(result.artifacts) },
            outcome,
            key: Some(key),
            file_hashes: Vec::new(),
        })
    }

    /// Uploads a result of the local store to the remote (if any); the winner's result when
    /// another machine recorded the key first with other artifacts (adopted locally).
    fn share(&self, node: &Node, key: &Hash, result: &StoredResult) -> Result<Option<StoredResult>, super::remote::RemoteError> {
        match &self.remote {
            Some(remote) => remote.publish(key, node.name, result, &self.store, self.clock.now_ns()),
            None => Ok(None),
        }
    }

    /// Removes the files node `h` materialized at its last successful build that `keep` no
    /// longer writes, among the destinations it owns in this graph (its files, and what lies
    /// in its directories), when their content is still what the store wrote (a file the
    /// user replaced is theirs). A failed node keeps nothing, so a run directory never shows
    /// a model or an evaluation of other inputs; a rebuild with `--visualizations 2` after 8
    /// leaves 2 pictures. Best effort: a file that cannot be removed stays, and the store is
    /// not touched.
    fn withdraw_outputs(&self, cx: &BuildCx<'_>, h: NodeHandle, previous: &NodeRecord, keep: &[PlannedCopy]) {
        let node = cx.graph.node(h);
        for m in &previous.materializations {
            let dest = Path::new(&m.dest);
            if !node.owns(dest) || keep.iter().any(|(d, _, _)| d == dest) || cx.graph.writer_of(dest).is_some_and(|w| w != h) {
                continue;
            }
            if cx.hasher.hash(dest).is_ok_and(|(current, _)| current == m.blob) && fs::remove_file(dest).is_ok() {
                cx.hasher.forget(dest);
            }
        }
    }

    /// Runs the stage in a scratch directory and commits its outputs to the store.
    /// Called with the key's lock held.
    fn run_stage(
        &self,
        node: &Node,
        files: &[HashedFile],
        upstream: &[Upstream<'_>],
        key: Hash,
    ) -> anyhow::Result<(StoredResult, Duration)> {
        let scratch = self.store.scratch_dir()?;
        let _cleanup = RemoveDirOnDrop(scratch.clone());
        let out_dir = scratch.join("out");
        let temp_dir = scratch.join("work");
        for d in [&out_dir, &temp_dir] {
            fs::create_dir_all(d).map_err(|e| EngineError::io("create directory", d, e))?;
        }
        let mut ctx = StageContext {
            stage: node.name,
            labels: &node.labels,
            key,
            files,
            upstream: upstream.iter().map(|u| (u.input, u.artifacts.as_ref())).collect(),
            store: &self.store,
            out_dir: out_dir.clone(),
            temp_dir,
            outputs: BTreeSet::new(),
            written: BTreeMap::new(),
            reused: BTreeMap::new(),
        };
        let start = Instant::now();
        match catch_unwind(AssertUnwindSafe(|| node.stage.run(&mut ctx))) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(p) => return Err(anyhow!("stage {} panicked: {}", node.name, panic_message(&*p))),
        }
        let duration = start.elapsed();
        // The key was computed from the inputs as they were before the run; if one changed
        // meanwhile, the outputs may belong to neither version.
        for f in files {
            if FileStat::of(&f.path).ok() != Some(f.stat) {
                return Err(EngineError::InputChangedDuringBuild { input: f.name.clone(), path: f.path.clone() }.into());
            }
        }
        let (names, written, reused) = (ctx.outputs, ctx.written, ctx.reused);
        for name in &names {
            let path = out_dir.join(name);
            if !path.is_file() {
                return Err(EngineError::MissingOutput { stage: node.name.to_string(), name: name.clone(), path }.into());
            }
        }
        let mut artifacts = BTreeMap::new();
        let mut sizes = BTreeMap::new();
        for name in &names {
            let (hash, size) = self.store.commit_blob(&out_dir.join(name), written.get(name).copied())?;
            artifacts.insert(name.clone(), hash);
            sizes.insert(hash, size);
        }
        for (name, hash) in reused {
            let blob = self.store.blob_path(&hash);
            let size = fs::metadata(&blob).map_err(|e| EngineError::io("stat", &blob, e))?.len();
            artifacts.insert(name, hash);
            sizes.insert(hash, size);
        }
        // Checked before the result is recorded, so a stage that forgot an artifact the
        // caller needs does not leave a result that can never be materialized.
        node.materialization_plan(&artifacts)?;
        let result = StoredResult {
            output_hash: output_set_hash(&artifacts),
            artifacts,
            duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
        };
        self.store.commit_result(&key, node.name, &result, &sizes, self.clock.now_ns())?;
        Ok((result, duration))
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".to_string()
    }
}
