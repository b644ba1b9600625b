//! Freshness tests in the manner of cargo's `testsuite/freshness.rs`: small DAGs of
//! stand-in stages over temporary files; each test changes one thing and asserts exactly
//! which stages run, which are fresh, and why `status` says so.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Value};

use super::*;

/// The system clock shifted by a settable offset. Tests run an hour ahead so that the
/// files they just wrote count as old (the racy-clean rule is tested on its own).
struct OffsetClock(AtomicI64);

impl Clock for OffsetClock {
    fn now_ns(&self) -> i64 {
        SystemClock.now_ns() + self.0.load(Ordering::SeqCst)
    }
}

const HOUR_NS: i64 = 3_600_000_000_000;

/// How many times each stage (by name) ran.
#[derive(Default)]
struct Runs(Mutex<BTreeMap<&'static str, usize>>);

impl Runs {
    fn bump(&self, name: &'static str) {
        *self.0.lock().unwrap().entry(name).or_default() += 1;
    }
    fn get(&self, name: &str) -> usize {
        self.0.lock().unwrap().get(name).copied().unwrap_or(0)
    }
}

#[derive(Clone)]
enum Behaviour {
    /// Writes `name(salt)[inputs...]` to `out`: changes whenever any input changes.
    Concat,
    /// Writes the number of lines of its inputs: unchanged by edits within lines.
    LineCount,
    /// Fails with an error.
    Fail,
    /// Writes part of its output, then panics.
    Panic,
    /// Registers an output path but never writes it.
    ForgetOutput,
    /// Concat after sleeping, to make concurrent builds overlap.
    Slow(Duration),
    /// Writes part of its output, creates the marker file, then sleeps (to be killed).
    Hang(PathBuf),
    /// Writes `metrics.json` and `viz/0.png`, `viz/1.png`.
    Several,
    /// Appends to its file input `x` while running.
    EditInput,
    /// Writes `viz/0.png` ... `viz/<n-1>.png`.
    Pictures(usize),
    /// Publishes its input `a`'s artifact `out` as its own `out`, without copying.
    Reuse,
    /// Like `Concat`, plus how many times this stage ran in the test: not bit-reproducible.
    Unreproducible,
}

struct TestStage {
    name: &'static str,
    version: u32,
    params: Value,
    behaviour: Behaviour,
    runs: Arc<Runs>,
}

impl TestStage {
    fn version(mut self, v: u32) -> Self {
        self.version = v;
        self
    }
    fn salt(mut self, s: &str) -> Self {
        self.params = json!({ "salt": s });
        self
    }
    fn params(mut self, p: Value) -> Self {
        self.params = p;
        self
    }
    fn behaviour(mut self, b: Behaviour) -> Self {
        self.behaviour = b;
        self
    }
}

impl Stage for TestStage {
    fn name(&self) -> &'static str {
        self.name
    }
    fn version(&self) -> u32 {
        self.version
    }
    fn params(&self) -> Value {
        self.params.clone()
    }
    fn run(&self, ctx: &mut StageContext<'_>) -> anyhow::Result<()> {
        self.runs.bump(self.name);
        let mut inputs = Vec::new();
        for (_, path) in ctx.file_inputs() {
            inputs.extend(fs::read(path)?);
        }
        for input in ctx.node_inputs() {
            inputs.extend(ctx.read_input_artifact(input, "out")?);
        }
        let concat = || {
            let mut out = format!("{}({})[", self.name, self.params).into_bytes();
            out.extend(&inputs);
            out.push(b']');
            out
        };
        match &self.behaviour {
            Behaviour::Concat => ctx.write_output("out", concat())?,
            Behaviour::LineCount => {
                let lines = inputs.iter().filter(|&&b| b == b'\n').count();
                ctx.write_output("out", format!("{lines} lines"))?
            }
            Behaviour::Fail => anyhow::bail!("conversion failed: weights do not match the config"),
            Behaviour::Panic => {
                let p = ctx.output_path("out")?;
                fs::write(p, b"half an artif")?;
                panic!("stage blew up halfway");
            }
            Behaviour::ForgetOutput => {
                ctx.output_path("out")?;
            }
            Behaviour::Slow(d) => {
                std::thread::sleep(*d);
                ctx.write_output("out", concat())?
            }
            Behaviour::Hang(marker) => {
                fs::write(ctx.output_path("out")?, b"half")?;
                fs::write(marker, b"started")?;
                std::thread::sleep(Duration::from_secs(60));
            }
            Behaviour::Several => {
                ctx.write_output("out", concat())?;
                ctx.write_output("metrics.json", b"{\"AP\": 0.5}")?;
                ctx.write_output("viz/0.png", b"png0")?;
                ctx.write_output("viz/1.png", b"png1")?;
            }
            Behaviour::Pictures(n) => {
                for i in 0..*n {
                    ctx.write_output(&format!("viz/{i}.png"), format!("png{i}"))?;
                }
            }
            Behaviour::Reuse => ctx.reuse_input_artifact("a", "out", "out")?,
            Behaviour::Unreproducible => {
                let mut out = concat();
                out.extend(format!("#{}", self.runs.get(self.name)).into_bytes());
                ctx.write_output("out", out)?
            }
            Behaviour::EditInput => {
                let x = ctx.input_file("x")?.to_path_buf();
                let mut content = fs::read(&x)?;
                content.extend(b"more");
                fs::write(&x, content)?;
                ctx.write_output("out", concat())?
            }
        }
        Ok(())
    }
}

struct Env {
    dir: tempfile::TempDir,
    clock: Arc<OffsetClock>,
    runs: Arc<Runs>,
    mtime_seq: AtomicI64,
}

impl Env {
    fn new() -> Env {
        Env {
            dir: tempfile::tempdir().unwrap(),
            clock: Arc::new(OffsetClock(AtomicI64::new(HOUR_NS))),
            runs: Arc::new(Runs::default()),
            mtime_seq: AtomicI64::new(0),
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn store_dir(&self) -> PathBuf {
        self.path("store")
    }

    /// Writes a file as a user would, with a distinct mtime.
    fn write(&self, rel: &str, content: &str) {
        let p = self.path(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, content).unwrap();
        let n = self.mtime_seq.fetch_add(1, Ordering::SeqCst);
        let f = fs::File::options().write(true).open(&p).unwrap();
        f.set_modified(SystemTime::now() - Duration::from_secs(600) + Duration::from_millis(n as u64 * 10)).unwrap();
    }

    fn read(&self, rel: &str) -> String {
        fs::read_to_string(self.path(rel)).unwrap()
    }

    fn engine(&self) -> Engine {
        self.engine_version("0.1.0")
    }

    fn engine_version(&self, tool_version: &str) -> Engine {
        Engine::open(&self.store_dir(), tool_version).unwrap().with_jobs(4).with_clock(self.clock.clone())
    }

    fn stage(&self, name: &'static str) -> TestStage {
        TestStage { name, version: 1, params: json!({ "salt": "" }), behaviour: Behaviour::Concat, runs: self.runs.clone() }
    }

    fn runs(&self, name: &str) -> usize {
        self.runs.get(name)
    }
}

fn build(engine: &Engine, graph: &Graph) -> BuildReport {
    engine.build(graph, &BuildOptions::default()).unwrap()
}

/// A build whose outputs are copies (`--copy-outputs`), not links into the store.
fn build_copying(engine: &Engine, graph: &Graph) -> BuildReport {
    engine.build(graph, &BuildOptions { outputs: OutputMode::Copy, ..Default::default() }).unwrap()
}

/// `(stage, outcome word)` per node, for compact assertions.
fn outcomes(report: &BuildReport) -> Vec<(&'static str, &'static str)> {
    report
        .nodes
        .iter()
        .map(|n| {
            let word = match n.outcome {
                Outcome::Fresh => "fresh",
                Outcome::Restored { .. } => "restored",
                Outcome::Built { .. } => "built",
                Outcome::Failed { .. } => "failed",
                Outcome::Skipped { .. } => "skipped",
            };
            (n.stage, word)
        })
        .collect()
}

fn status_of(report: &StatusReport, h: NodeHandle) -> &NodeStatus {
    &report.get(h).status
}

/// The standard DAG:
///
/// ```text
/// x.txt -> a --+--> c -> d      (a -> run/a.txt, d -> run/d.txt)
/// y.txt -> b --+
/// ```
struct Dag {
    graph: Graph,
    a: NodeHandle,
    b: NodeHandle,
    c: NodeHandle,
    d: NodeHandle,
}

fn dag_with(env: &Env, a: TestStage, b: TestStage, c: TestStage, d: TestStage) -> Dag {
    let mut graph = Graph::new();
    let a = graph.add(NodeSpec::new(a).label("run").file("x", env.path("x.txt")).materialize("out", env.path("run/a.txt"))).unwrap();
    let b = graph.add(NodeSpec::new(b).label("run").file("y", env.path("y.txt"))).unwrap();
    let c = graph.add(NodeSpec::new(c).label("run").input("a", a).input("b", b)).unwrap();
    let d = graph.add(NodeSpec::new(d).label("run").input("c", c).materialize("out", env.path("run/d.txt"))).unwrap();
    Dag { graph, a, b, c, d }
}

fn dag(env: &Env) -> Dag {
    dag_with(env, env.stage("a"), env.stage("b"), env.stage("c"), env.stage("d"))
}

fn setup() -> Env {
    let env = Env::new();
    env.write("x.txt", "x1\n");
    env.write("y.txt", "y1\n");
    env
}

#[test]
fn first_build_runs_everything_and_a_rebuild_nothing() {
    let env = setup();
    let dag = dag(&env);
    let engine = env.engine();
    let status = engine.status(&dag.graph, &Force::Nothing).unwrap();
    let up = |input: &str, h| StaleReason::UpstreamStale { input: input.into(), node: dag.graph.display_name(h) };
    let never = StaleReason::NeverBuilt;
    assert_eq!(status_of(&status, dag.a), &NodeStatus::Stale(vec![never.clone()]));
    assert_eq!(status_of(&status, dag.b), &NodeStatus::Stale(vec![never.clone()]));
    assert_eq!(status_of(&status, dag.c), &NodeStatus::Stale(vec![never.clone(), up("a", dag.a), up("b", dag.b)]));
    assert_eq!(status_of(&status, dag.d), &NodeStatus::Stale(vec![never, up("c", dag.c)]));
    let r = build(&engine, &dag.graph);
    assert_eq!(outcomes(&r), [("a", "built"), ("b", "built"), ("c", "built"), ("d", "built")]);
    assert!(r.ok());
    assert_eq!(
        env.read("run/a.txt"),
        r#"a({"salt":""})[x1
]"#
    );
    assert_eq!(env.read("run/d.txt"), "d({\"salt\":\"\"})[c({\"salt\":\"\"})[a({\"salt\":\"\"})[x1\n]b({\"salt\":\"\"})[y1\n]]]");

    // A new engine, as a new process would have.
    let engine = env.engine();
    let r = build(&engine, &dag.graph);
    assert_eq!(outcomes(&r), [("a", "fresh"), ("b", "fresh"), ("c", "fresh"), ("d", "fresh")]);
    assert_eq!(r.files_hashed, 0, "unchanged files must not be read again");
    for name in ["a", "b", "c", "d"] {
        assert_eq!(env.runs(name), 1, "{name}");
    }
    let status = engine.status(&dag.graph, &Force::Nothing).unwrap();
    assert!(status.all_fresh(), "{status}");
}

#[test]
fn changing_each_input_reruns_exactly_its_dependents() {
    let env = setup();
    let dag = dag(&env);
    build(&env.engine(), &dag.graph);

    let old_x = hash_bytes(b"x1\n");
    env.write("x.txt", "x2\n");
    let engine = env.engine();
    let status = engine.status(&dag.graph, &Force::Nothing).unwrap();
    assert_eq!(
        status_of(&status, dag.a),
        &NodeStatus::Stale(vec![StaleReason::InputChanged { input: "x".into(), old_hash: old_x, new_hash: hash_bytes(b"x2\n") }])
    );
    assert_eq!(status_of(&status, dag.b), &NodeStatus::Fresh);
    assert_eq!(
        status_of(&status, dag.c),
        &NodeStatus::Stale(vec![StaleReason::UpstreamStale { input: "a".into(), node: "a [run]".into() }])
    );
    assert_eq!(
        status_of(&status, dag.d),
        &NodeStatus::Stale(vec![StaleReason::UpstreamStale { input: "c".into(), node: "c [run]".into() }])
    );
    let text = status.to_string();
    assert!(text.contains("stale   a [run]: input `x` changed ("), "{text}");

    let r = build(&engine, &dag.graph);
    assert_eq!(outcomes(&r), [("a", "built"), ("b", "fresh"), ("c", "built"), ("d", "built")]);
    assert!(env.read("run/d.txt").contains("x2"));

    env.write("y.txt", "y2\n");
    let r = build(&env.engine(), &dag.graph);
    assert_eq!(outcomes(&r), [("a", "fresh"), ("b", "built"), ("c", "built"), ("d", "built")]);
    assert_eq!((env.runs("a"), env.runs("b"), env.runs("c"), env.runs("d")), (2, 2, 3, 3));

    // Going back to content built before needs no stage at all: every key is stored.
    env.write("x.txt", "x1\n");
    env.write("y.txt", "y1\n");
    let r = build(&env.engine(), &dag.graph);
    assert_eq!(outcomes(&r), [("a", "restored"), ("b", "fresh"), ("c", "fresh"), ("d", "restored")]);
    assert!(env.read("run/d.txt").contains("x1") && env.read("run/d.txt").contains("y1"));
    assert_eq!((env.runs("a"), env.runs("b"), env.runs("c"), env.runs("d")), (2, 2, 3, 3));
}

#[test]
fn unchanged_output_stops_propagation() {
    let env = setup();
    let dag = dag_with(&env, env.stage("a").behaviour(Behaviour::LineCount), env.stage("b"), env.stage("c"), env.stage("d"));
    build(&env.engine(), &dag.graph);
    // Same number of lines, different content: a reruns, its output is identical.
    env.write("x.txt", "a different first line\n");
    let r = build(&env.engine(), &dag.graph);
    assert_eq!(outcomes(&r), [("a", "built"), ("b", "fresh"), ("c", "fresh"), ("d", "fresh")]);
    assert_eq!((env.runs("a"), env.runs("c"), env.runs("d")), (2, 1, 1));
    // A real change goes through.
    env.write("x.txt", "one\ntwo\n");
    let r = build(&env.engine(), &dag.graph);
    assert_eq!(outcomes(&r), [("a", "built"), ("b", "fresh"), ("c", "built"), ("d", "built")]);
}

#[test]
fn deleted_or_edited_copied_outputs_are_restored_without_running_stages() {
    // Small outputs are copies by default too; `build_copying` makes it explicit.
    let env = setup();
    let dag = dag(&env);
    build_copying(&env.engine(), &dag.graph);
    let d_content = env.read("run/d.txt");
    let a_content = env.read("run/a.txt");

    fs::remove_file(env.path("run/d.txt")).unwrap();
    env.write("run/a.txt", "user edit");
    let engine = env.engine();
    let status = engine.status(&dag.graph, &Force::Nothing).unwrap();
    assert_eq!(status_of(&status, dag.a), &NodeStatus::Restore(vec![StaleReason::OutputModified { path: env.path("run/a.txt") }]));
    assert_eq!(status_of(&status, dag.c), &NodeStatus::Fresh);
    assert_eq!(status_of(&status, dag.d), &NodeStatus::Restore(vec![StaleReason::OutputMissing { path: env.path("run/d.txt") }]));

    let r = build_copying(&engine, &dag.graph);
    assert_eq!(outcomes(&r), [("a", "restored"), ("b", "fresh"), ("c", "fresh"), ("d", "restored")]);
    match &r.get(dag.d).outcome {
        Outcome::Restored { paths } => assert_eq!(paths, &[env.path("run/d.txt")]),
        other => panic!("{other:?}"),
    }
    assert_eq!(env.read("run/d.txt"), d_content);
    assert_eq!(env.read("run/a.txt"), a_content);
    assert_eq!((env.runs("a"), env.runs("d")), (1, 1));

    // Even the whole run directory.
    fs::remove_dir_all(env.path("run")).unwrap();
    let r = build_copying(&env.engine(), &dag.graph);
    assert_eq!(outcomes(&r), [("a", "restored"), ("b", "fresh"), ("c", "fresh"), ("d", "restored")]);
    assert_eq!(env.read("run/d.txt"), d_content);
}

#[test]
fn linked_outputs_share_the_blob_and_an_edit_in_place_is_repaired() {
    use std::os::unix::fs::MetadataExt;
    let env = setup();
    let dag = dag(&env);
    // These outputs are a few bytes: link every size.
    let build = |engine: &Engine, graph: &Graph| {
        engine.build(graph, &BuildOptions { outputs: OutputMode::Link { min_bytes: 0 }, ..Default::default() }).unwrap()
    };
    build(&env.engine(), &dag.graph);
    let a_content = env.read("run/a.txt");
    let out = fs::metadata(env.path("run/a.txt")).unwrap();
    assert_eq!(out.nlink(), 2, "the output is a hard link to its blob");
    assert!(out.permissions().readonly(), "a linked output is read-only like its blob");
    // Its mtime is when it appeared (for Makefile rules), not when the blob was stored.
    assert!(out.modified().unwrap() >= env.path("x.txt").metadata().unwrap().modified().unwrap());

    // Replaced (a new file under the name, as most editors and tools save): restored from
    // the store without running anything.
    let tmp = env.path("run/a.txt.new");
    fs::write(&tmp, "user edit").unwrap();
    fs::rename(&tmp, env.path("run/a.txt")).unwrap();
    let r = build(&env.engine(), &dag.graph);
    assert_eq!(outcomes(&r), [("a", "restored"), ("b", "fresh"), ("c", "fresh"), ("d", "fresh")]);
    assert_eq!(env.read("run/a.txt"), a_content);

    // Made writable and written in place (or by root, who ignores the bit): the shared
    // blob is damaged too. The next build notices, rebuilds the stage and repairs the store.
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(env.path("run/a.txt"), fs::Permissions::from_mode(0o644)).unwrap();
    env.write("run/a.txt", "user edit");
    let r = build(&env.engine(), &dag.graph);
    assert_eq!(outcomes(&r)[0], ("a", "built"));
    assert_eq!(env.read("run/a.txt"), a_content);
    assert!(env.engine().store().verify_all().unwrap().clean());
}

#[test]
fn stage_version_change_reruns_the_stage_and_cutoff_spares_dependents() {
    let env = setup();
    build(&env.engine(), &dag(&env).graph);
    // c's output does not depend on its version, so d stays fresh after c reruns.
    let dag = dag_with(&env, env.stage("a"), env.stage("b"), env.stage("c").version(2), env.stage("d"));
    let engine = env.engine();
    let status = engine.status(&dag.graph, &Force::Nothing).unwrap();
    assert_eq!(status_of(&status, dag.c), &NodeStatus::Stale(vec![StaleReason::StageVersionChanged { old: 1, new: 2 }]));
    let r = build(&engine, &dag.graph);
    assert_eq!(outcomes(&r), [("a", "fresh"), ("b", "fresh"), ("c", "built"), ("d", "fresh")]);
}

#[test]
fn params_change_is_explained_by_key() {
    let env = setup();
    build(&env.engine(), &dag(&env).graph);
    let dag = dag_with(&env, env.stage("a"), env.stage("b"), env.stage("c").salt("pepper"), env.stage("d"));
    let engine = env.engine();
    let status = engine.status(&dag.graph, &Force::Nothing).unwrap();
    assert_eq!(status_of(&status, dag.c), &NodeStatus::Stale(vec![StaleReason::ParamsChanged { keys: vec!["salt".into()] }]));
    let r = build(&engine, &dag.graph);
    assert_eq!(outcomes(&r), [("a", "fresh"), ("b", "fresh"), ("c", "built"), ("d", "built")]);
}

#[test]
fn tool_version_change_rebuilds_everything() {
    let env = setup();
    let dag = dag(&env);
    build(&env.engine(), &dag.graph);
    let engine = env.engine_version("0.2.0");
    let status = engine.status(&dag.graph, &Force::Nothing).unwrap();
    assert!(status_of(&status, dag.a).reasons().contains(&StaleReason::ToolVersionChanged { old: "0.1.0".into(), new: "0.2.0".into() }));
    let r = build(&engine, &dag.graph);
    assert!(r.nodes.iter().all(|n| matches!(n.outcome, Outcome::Built { .. })));
}

#[test]
fn force_rebuilds_the_named_nodes_only() {
    let env = setup();
    let dag = dag(&env);
    build(&env.engine(), &dag.graph);
    let engine = env.engine();
    let force = Force::Nodes(BTreeSet::from([dag.a]));
    let status = engine.status(&dag.graph, &force).unwrap();
    assert_eq!(status_of(&status, dag.a), &NodeStatus::Stale(vec![StaleReason::Forced]));
    let r = engine.build(&dag.graph, &BuildOptions { force, ..Default::default() }).unwrap();
    assert_eq!(outcomes(&r), [("a", "built"), ("b", "fresh"), ("c", "fresh"), ("d", "fresh")]);
    let r = engine.build(&dag.graph, &BuildOptions { force: Force::All, ..Default::default() }).unwrap();
    assert_eq!(outcomes(&r), [("a", "built"), ("b", "built"), ("c", "built"), ("d", "built")]);
}

#[test]
fn shared_node_is_built_once_and_listed_in_every_run() {
    let env = setup();
    env.write("dataset.jsonl", "{\"image\": \"0.png\"}\n");
    env.write("run1/ckpt", "w1");
    env.write("run2/ckpt", "w2");
    let mut graph = Graph::new();
    let mut evals = Vec::new();
    let mut gts = Vec::new();
    for run in ["run1", "run2"] {
        let gt = graph
            .add(
                NodeSpec::new(env.stage("ground_truth"))
                    .label(run)
                    .file("dataset", env.path("dataset.jsonl"))
                    .materialize("out", env.path(&format!("{run}/eval/ground_truth_coco.json"))),
            )
            .unwrap();
        let eval = graph
            .add(
                NodeSpec::new(env.stage("eval"))
                    .label(run)
                    .file("checkpoint", env.path(&format!("{run}/ckpt")))
                    .input("gt", gt)
                    .materialize("out", env.path(&format!("{run}/eval/metrics.json"))),
            )
            .unwrap();
        gts.push(gt);
        evals.push(eval);
    }
    assert_eq!(gts[0], gts[1]);
    assert_eq!(graph.len(), 3);
    assert_eq!(graph.labels(gts[0]), ["run1", "run2"]);

    let r = build(&env.engine(), &graph);
    assert_eq!(env.runs("ground_truth"), 1);
    assert_eq!(env.runs("eval"), 2);
    for run in ["run1", "run2"] {
        assert!(env.read(&format!("{run}/eval/ground_truth_coco.json")).starts_with("ground_truth"));
    }
    let runs = r.runs();
    assert_eq!(runs.len(), 2);
    for (run, eval) in runs.iter().zip(&evals) {
        let nodes: Vec<NodeHandle> = run.nodes.iter().map(|n| n.node).collect();
        assert_eq!(nodes, [gts[0], *eval]);
        assert!(run.ok());
    }
}

#[test]
fn identical_content_in_two_runs_is_built_once() {
    // Two run directories holding the same checkpoint: different nodes, same key.
    let env = Env::new();
    env.write("run1/best_model.pth", "same weights");
    env.write("run2/best_model.pth", "same weights");
    let mut graph = Graph::new();
    for run in ["run1", "run2"] {
        graph
            .add(
                NodeSpec::new(env.stage("convert"))
                    .label(run)
                    .file("checkpoint", env.path(&format!("{run}/best_model.pth")))
                    .materialize("out", env.path(&format!("{run}/onnx_model/model.onnx"))),
            )
            .unwrap();
    }
    assert_eq!(graph.len(), 2);
    let r = build(&env.engine(), &graph);
    assert!(r.ok());
    assert_eq!(env.runs("convert"), 1);
    assert_eq!(r.nodes[0].key, r.nodes[1].key);
    assert_eq!(env.read("run1/onnx_model/model.onnx"), env.read("run2/onnx_model/model.onnx"));
}

#[test]
fn a_failure_skips_its_dependents_and_spares_other_runs() {
    let env = setup();
    env.write("z.txt", "z\n");
    let mut graph = Graph::new();
    let bad = graph.add(NodeSpec::new(env.stage("convert").behaviour(Behaviour::Fail)).label("bad").file("x", env.path("x.txt"))).unwrap();
    let bad_eval = graph.add(NodeSpec::new(env.stage("eval")).label("bad").input("model", bad)).unwrap();
    let bad_cmp = graph.add(NodeSpec::new(env.stage("compare")).label("bad").input("eval", bad_eval)).unwrap();
    let good = graph.add(NodeSpec::new(env.stage("convert")).label("good").file("x", env.path("z.txt"))).unwrap();
    let good_eval = graph.add(NodeSpec::new(env.stage("eval")).label("good").input("model", good)).unwrap();

    let r = build(&env.engine(), &graph);
    assert!(!r.ok());
    match &r.get(bad).outcome {
        Outcome::Failed { error } => assert!(format!("{error:#}").contains("weights do not match"), "{error:#}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(r.get(bad_eval).outcome, Outcome::Skipped { because } if because == bad));
    assert!(matches!(r.get(bad_cmp).outcome, Outcome::Skipped { because } if because == bad));
    assert!(matches!(r.get(good).outcome, Outcome::Built { .. }));
    assert!(matches!(r.get(good_eval).outcome, Outcome::Built { .. }));
    let runs = r.runs();
    assert_eq!((runs[0].label, runs[0].ok()), ("bad", false));
    assert_eq!((runs[1].label, runs[1].ok()), ("good", true));
    assert!(r.to_string().contains("skipped   compare [bad]: convert [bad] failed"), "{r}");
    let engine = env.engine();
    let status = engine.status(&graph, &Force::Nothing).unwrap();
    assert_eq!(status_of(&status, bad), &NodeStatus::Stale(vec![StaleReason::NeverBuilt]));
}

#[test]
fn a_dependent_that_failed_after_its_upstream_changed_says_so() {
    let env = setup();
    let dag = dag(&env);
    build(&env.engine(), &dag.graph);
    env.write("x.txt", "x2\n");
    // c fails this time: a is rebuilt and recorded, c keeps its old record.
    let failing = dag_with(&env, env.stage("a"), env.stage("b"), env.stage("c").behaviour(Behaviour::Fail), env.stage("d"));
    let r = build(&env.engine(), &failing.graph);
    assert_eq!(outcomes(&r), [("a", "built"), ("b", "fresh"), ("c", "failed"), ("d", "skipped")]);
    let status = env.engine().status(&dag.graph, &Force::Nothing).unwrap();
    assert_eq!(status_of(&status, dag.a), &NodeStatus::Fresh);
    assert_eq!(
        status_of(&status, dag.c),
        &NodeStatus::Stale(vec![StaleReason::UpstreamChanged { input: "a".into(), node: "a [run]".into() }])
    );
    let r = build(&env.engine(), &dag.graph);
    assert_eq!(outcomes(&r), [("a", "fresh"), ("b", "fresh"), ("c", "built"), ("d", "built")]);
}

#[test]
fn a_panicking_stage_fails_cleanly_and_leaves_nothing_behind() {
    let env = setup();
    let broken = dag_with(&env, env.stage("a").behaviour(Behaviour::Panic), env.stage("b"), env.stage("c"), env.stage("d"));
    let engine = env.engine();
    let r = build(&engine, &broken.graph);
    assert_eq!(outcomes(&r), [("a", "failed"), ("b", "built"), ("c", "skipped"), ("d", "skipped")]);
    match &r.get(broken.a).outcome {
        Outcome::Failed { error } => assert!(error.to_string().contains("panicked: stage blew up halfway"), "{error}"),
        other => panic!("{other:?}"),
    }
    assert!(!env.path("run/a.txt").exists());
    // The half-written output went with the scratch directory.
    let scratch_files =
        walk(&env.store_dir().join("tmp")).into_iter().filter(|p| p.is_file() && !p.to_string_lossy().ends_with(".lock")).count();
    assert_eq!(scratch_files, 0);
    drop(engine);
    let fixed = dag(&env);
    let r = build(&env.engine(), &fixed.graph);
    assert_eq!(outcomes(&r), [("a", "built"), ("b", "fresh"), ("c", "built"), ("d", "built")]);
}

#[test]
fn stage_mistakes_are_reported_and_not_recorded() {
    let env = setup();
    let mut graph = Graph::new();
    let forgot = graph.add(NodeSpec::new(env.stage("forgot").behaviour(Behaviour::ForgetOutput)).file("x", env.path("x.txt"))).unwrap();
    let wrong_name = graph
        .add(NodeSpec::new(env.stage("wrong_name")).file("x", env.path("x.txt")).materialize("model.onnx", env.path("run/model.onnx")))
        .unwrap();
    let missing = graph.add(NodeSpec::new(env.stage("missing_input")).file("checkpoint", env.path("nope.pth"))).unwrap();
    let engine = env.engine();
    let r = build(&engine, &graph);
    let err = |h| match &r.get(h).outcome {
        Outcome::Failed { error } => format!("{error:#}"),
        other => panic!("{other:?}"),
    };
    assert!(err(forgot).contains("did not write its output \"out\""), "{}", err(forgot));
    assert!(err(wrong_name).contains("produced no artifact \"model.onnx\""), "{}", err(wrong_name));
    assert!(err(wrong_name).contains("it produced: out"), "{}", err(wrong_name));
    assert!(err(missing).contains("input \"checkpoint\"") && err(missing).contains("nope.pth"), "{}", err(missing));
    let status = engine.status(&graph, &Force::Nothing).unwrap();
    assert_eq!(status_of(&status, forgot), &NodeStatus::Stale(vec![StaleReason::NeverBuilt]));
    // wrong_name's stage did run; its result is not recorded, so it never counts as built.
    assert_eq!(status_of(&status, wrong_name), &NodeStatus::Stale(vec![StaleReason::NeverBuilt]));
    let reasons = status_of(&status, missing).reasons();
    assert!(matches!(&reasons[1], StaleReason::InputUnreadable { input, .. } if input == "checkpoint"), "{reasons:?}");
}

#[test]
fn asking_for_an_artifact_a_stored_result_lacks_is_explained() {
    let env = setup();
    let mut graph = Graph::new();
    graph.add(NodeSpec::new(env.stage("a")).file("x", env.path("x.txt"))).unwrap();
    build(&env.engine(), &graph);
    // The caller now wants an artifact the (stored, fresh) stage never produces.
    let mut graph = Graph::new();
    let h = graph
        .add(NodeSpec::new(env.stage("a")).file("x", env.path("x.txt")).materialize("model.onnx", env.path("run/model.onnx")))
        .unwrap();
    let engine = env.engine();
    let status = engine.status(&graph, &Force::Nothing).unwrap();
    assert_eq!(
        status_of(&status, h),
        &NodeStatus::Stale(vec![StaleReason::MissingArtifact { artifact: "model.onnx".into(), path: env.path("run/model.onnx") }])
    );
    let r = build(&engine, &graph);
    assert_eq!(outcomes(&r), [("a", "failed")]);
    assert_eq!(env.runs("a"), 1, "the stored result was found; the stage did not run again");
}

#[test]
fn an_empty_graph_builds_to_an_empty_report() {
    let env = Env::new();
    let r = build(&env.engine(), &Graph::new());
    assert!(r.ok() && r.nodes.is_empty() && r.runs().is_empty());
}

#[test]
fn an_input_edited_while_its_stage_runs_fails_the_node() {
    let env = setup();
    let mut graph = Graph::new();
    let h = graph.add(NodeSpec::new(env.stage("a").behaviour(Behaviour::EditInput)).file("x", env.path("x.txt"))).unwrap();
    let r = build(&env.engine(), &graph);
    match &r.get(h).outcome {
        Outcome::Failed { error } => assert!(error.to_string().contains("changed while the stage was running"), "{error}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn directory_materialization_restores_single_files() {
    let env = setup();
    let mut graph = Graph::new();
    let h = graph
        .add(
            NodeSpec::new(env.stage("eval").behaviour(Behaviour::Several))
                .file("x", env.path("x.txt"))
                .materialize("metrics.json", env.path("run/eval/onnx_metrics.json"))
                .materialize_dir("viz/", env.path("run/eval/visualizations")),
        )
        .unwrap();
    build(&env.engine(), &graph);
    assert_eq!(env.read("run/eval/visualizations/0.png"), "png0");
    assert_eq!(env.read("run/eval/visualizations/1.png"), "png1");
    assert!(!env.path("run/eval/visualizations/out").exists());
    fs::remove_file(env.path("run/eval/visualizations/1.png")).unwrap();
    let r = build(&env.engine(), &graph);
    match &r.get(h).outcome {
        Outcome::Restored { paths } => {
            assert_eq!(paths, &[env.path("run/eval/visualizations/1.png")])
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(env.runs("eval"), 1);
}

#[test]
fn fewer_outputs_remove_the_stale_ones_but_not_the_users() {
    let env = setup();
    let pictures = |n: usize| {
        let mut graph = Graph::new();
        let stage = env.stage("eval").params(json!({ "n": n })).behaviour(Behaviour::Pictures(n));
        graph.add(NodeSpec::new(stage).file("x", env.path("x.txt")).materialize_dir("viz/", env.path("run/viz"))).unwrap();
        graph
    };
    build(&env.engine(), &pictures(4));
    assert_eq!(walk(&env.path("run/viz")).iter().filter(|p| p.is_file()).count(), 4);
    fs::write(env.path("run/viz/3.png"), "the user's own picture").unwrap();
    let r = build(&env.engine(), &pictures(2));
    assert!(r.ok());
    assert_eq!(env.read("run/viz/0.png"), "png0");
    assert_eq!(env.read("run/viz/1.png"), "png1");
    assert!(!env.path("run/viz/2.png").exists(), "a picture of the last build that this one does not draw stays behind");
    assert_eq!(env.read("run/viz/3.png"), "the user's own picture");
}

#[test]
fn a_failed_node_withdraws_what_it_published_and_so_do_its_skipped_dependents() {
    let env = setup();
    let graph_with = |a: TestStage| dag_with(&env, a, env.stage("b"), env.stage("c"), env.stage("d"));
    build(&env.engine(), &graph_with(env.stage("a")).graph);
    assert!(env.path("run/a.txt").exists() && env.path("run/d.txt").exists());
    env.write("x.txt", "x2\n");
    let dag = graph_with(env.stage("a").behaviour(Behaviour::Fail));
    let r = build(&env.engine(), &dag.graph);
    assert!(matches!(r.get(dag.a).outcome, Outcome::Failed { .. }));
    assert!(matches!(r.get(dag.d).outcome, Outcome::Skipped { .. }));
    assert!(!env.path("run/a.txt").exists(), "the output of the old x.txt is still published");
    assert!(!env.path("run/d.txt").exists());
    // Fixed: everything is back.
    let r = build(&env.engine(), &graph_with(env.stage("a")).graph);
    assert!(r.ok());
    assert_eq!(env.read("run/a.txt"), "a({\"salt\":\"\"})[x2\n]");
}

#[test]
fn a_reused_artifact_is_the_upstream_blob_itself() {
    let env = setup();
    let mut graph = Graph::new();
    let a = graph.add(NodeSpec::new(env.stage("a")).file("x", env.path("x.txt"))).unwrap();
    let p = graph
        .add(NodeSpec::new(env.stage("publish").behaviour(Behaviour::Reuse)).input("a", a).materialize("out", env.path("run/p.txt")))
        .unwrap();
    let r = build(&env.engine(), &graph);
    assert!(r.ok(), "{r}");
    assert_eq!(env.read("run/p.txt"), "a({\"salt\":\"\"})[x1\n]");
    let blobs: Vec<PathBuf> = walk(&env.store_dir().join("blobs")).into_iter().filter(|p| p.is_file()).collect();
    assert_eq!(blobs.len(), 1, "{blobs:?}");
    let r = build(&env.engine(), &graph);
    assert_eq!(outcomes(&r), [("a", "fresh"), ("publish", "fresh")]);
    let _ = p;
}

#[test]
fn a_corrupt_blob_is_rebuilt_not_copied() {
    let env = setup();
    let dag = dag(&env);
    build(&env.engine(), &dag.graph);
    let good = env.read("run/d.txt");
    // Corrupt d's blob in place (same length) and delete the materialized copy.
    let blob = blob_with_content(&env.store_dir(), good.as_bytes()).expect("d's blob");
    make_writable(&blob);
    let mut bytes = fs::read(&blob).unwrap();
    bytes[0] ^= 1;
    fs::write(&blob, bytes).unwrap();
    fs::remove_file(env.path("run/d.txt")).unwrap();
    let r = build(&env.engine(), &dag.graph);
    assert_eq!(outcomes(&r), [("a", "fresh"), ("b", "fresh"), ("c", "fresh"), ("d", "built")]);
    assert_eq!(env.read("run/d.txt"), good);
}

/// Flips one bit of the blob holding `content`; returns the blob's path.
fn flip_a_bit(env: &Env, content: &[u8]) -> PathBuf {
    let blob = blob_with_content(&env.store_dir(), content).expect("the blob");
    make_writable(&blob);
    let mut bytes = fs::read(&blob).unwrap();
    bytes[0] ^= 1;
    fs::write(&blob, bytes).unwrap();
    blob
}

#[test]
fn a_damaged_input_is_quarantined_and_its_maker_rebuilt_before_a_stage_reads_it() {
    let env = setup();
    let dag = dag(&env);
    build(&env.engine(), &dag.graph);
    let good = env.read("run/d.txt");
    // c's output is what d reads; damage it, then make d run (a new parameter).
    let c_out = fs::read(
        walk(&env.store_dir().join("blobs")).into_iter().find(|p| p.is_file() && fs::read(p).unwrap().starts_with(b"c(")).unwrap(),
    )
    .unwrap();
    let blob = flip_a_bit(&env, &c_out);
    let dag2 = dag_with(&env, env.stage("a"), env.stage("b"), env.stage("c"), env.stage("d").salt("2"));
    let r = build(&env.engine(), &dag2.graph);
    assert!(r.ok(), "{r}");
    assert_eq!(env.runs("c"), 2, "c must be built again from its inputs");
    assert_eq!(fs::read(&blob).unwrap(), c_out, "the store is repaired");
    assert!(!env.read("run/d.txt").contains("c(\u{1}"), "d read the damaged bytes");
    assert!(env.read("run/d.txt").starts_with("d({\"salt\":\"2\"})[c("));
    let quarantined = walk(&env.store_dir().join("quarantine"));
    assert_eq!(quarantined.len(), 1, "{quarantined:?}");
    let _ = good;
}

#[test]
fn force_replaces_a_damaged_blob_and_verify_finds_damage() {
    let env = setup();
    let dag = dag(&env);
    build(&env.engine(), &dag.graph);
    let good = env.read("run/a.txt");
    let blob = flip_a_bit(&env, good.as_bytes());
    let engine = env.engine();
    let report = engine.store().verify_all().unwrap();
    assert_eq!(report.corrupt, vec![blob.clone()]);
    assert!(!report.clean() && report.blobs_checked == 4 && report.missing.is_empty(), "{report:?}");
    assert!(engine.store().verify_all().unwrap().clean(), "the damaged blob was quarantined and forgotten");
    // The same damage, then --force: the rebuilt bytes replace the damaged blob.
    build(&env.engine(), &dag.graph);
    let blob = flip_a_bit(&env, good.as_bytes());
    let r = env.engine().build(&dag.graph, &BuildOptions { force: Force::All, ..Default::default() }).unwrap();
    assert!(r.ok());
    assert_eq!(fs::read_to_string(&blob).unwrap(), good);
    assert!(env.engine().store().verify_all().unwrap().clean());
}

#[test]
fn a_read_only_store_serves_fresh_builds_and_refuses_only_to_build() {
    let env = setup();
    let dag = dag(&env);
    build(&env.engine(), &dag.graph);
    // Root ignores file permissions, so the store is opened the way `Store::open` falls back
    // to when it may not write.
    let read_only = || Engine::new(Store::open_read_only(&env.store_dir()).unwrap(), "0.1.0").with_clock(env.clock.clone());
    assert!(read_only().store().is_read_only());
    fs::remove_file(env.path("run/d.txt")).unwrap();
    let r = build(&read_only(), &dag.graph);
    assert_eq!(outcomes(&r), [("a", "fresh"), ("b", "fresh"), ("c", "fresh"), ("d", "restored")]);
    env.write("x.txt", "x2\n");
    let r = build(&read_only(), &dag.graph);
    match &r.get(dag.a).outcome {
        Outcome::Failed { error } => assert!(format!("{error:#}").contains("read-only"), "{error:#}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(env.runs("a"), 1);
}

#[test]
fn two_engines_on_one_store_build_each_key_once() {
    for round in 0..3 {
        let env = setup();
        env.write("z.txt", "z\n");
        let slow = Behaviour::Slow(Duration::from_millis(30));
        let make = |extra: &'static str, dest: &str| {
            let mut g = Graph::new();
            let a = g
                .add(NodeSpec::new(env.stage("a").behaviour(slow.clone())).file("x", env.path("x.txt")).materialize("out", env.path(dest)))
                .unwrap();
            let b = g.add(NodeSpec::new(env.stage("b").behaviour(slow.clone())).file("y", env.path("y.txt"))).unwrap();
            let c = g.add(NodeSpec::new(env.stage("c").behaviour(slow.clone())).input("a", a).input("b", b)).unwrap();
            g.add(NodeSpec::new(env.stage(extra).behaviour(slow.clone())).input("c", c).file("z", env.path("z.txt"))).unwrap();
            g
        };
        let g1 = make("e1", "p1/a.txt");
        let g2 = make("e2", "p2/a.txt");
        let (r1, r2) = std::thread::scope(|s| {
            let t1 = s.spawn(|| build(&env.engine(), &g1));
            let t2 = s.spawn(|| build(&env.engine(), &g2));
            (t1.join().unwrap(), t2.join().unwrap())
        });
        assert!(r1.ok() && r2.ok(), "{r1}\n{r2}");
        for name in ["a", "b", "c", "e1", "e2"] {
            assert_eq!(env.runs(name), 1, "round {round}: stage {name} ran {} times", env.runs(name));
        }
        assert_eq!(env.read("p1/a.txt"), env.read("p2/a.txt"));
        let engine = env.engine();
        assert!(engine.status(&g1, &Force::Nothing).unwrap().all_fresh());
        assert!(engine.status(&g2, &Force::Nothing).unwrap().all_fresh());
    }
}

#[test]
fn leftovers_of_a_killed_process_are_harmless() {
    let env = setup();
    let dag = dag(&env);
    let store = env.store_dir();
    // What a killed process leaves: a scratch session without a live lock, a key lock
    // file, a blob moved into place but never recorded, and a half-copied output.
    Store::open(&store).unwrap();
    fs::create_dir_all(store.join("tmp/4242-1-1/0/out")).unwrap();
    fs::write(store.join("tmp/4242-1-1/0/out/out"), b"half").unwrap();
    fs::write(store.join("tmp/4242-1-1.lock"), b"").unwrap();
    let orphan = hash_bytes(b"orphan");
    let orphan_path = store.join("blobs").join(&orphan.to_hex()[..2]).join(&orphan.to_hex()[2..]);
    fs::create_dir_all(orphan_path.parent().unwrap()).unwrap();
    fs::write(&orphan_path, b"orphan").unwrap();
    let a_out = format!("a({})[x1\n]", json!({"salt": ""}));
    let pre = hash_bytes(a_out.as_bytes()).to_hex();
    let pre_path = store.join("blobs").join(&pre[..2]).join(&pre[2..]);
    fs::create_dir_all(pre_path.parent().unwrap()).unwrap();
    fs::write(&pre_path, &a_out).unwrap();
    fs::write(store.join("locks").join("0".repeat(64) + ".lock"), b"").unwrap();
    fs::create_dir_all(env.path("run")).unwrap();
    let stale_tmp = env.path("run/.a.txt.mkonnx-tmp-4242-0");
    fs::write(&stale_tmp, b"half").unwrap();
    fs::File::options().write(true).open(&stale_tmp).unwrap().set_modified(SystemTime::now() - Duration::from_secs(3600)).unwrap();

    let engine = env.engine();
    assert!(!store.join("tmp/4242-1-1").exists());
    let r = build(&engine, &dag.graph);
    assert_eq!(outcomes(&r), [("a", "built"), ("b", "built"), ("c", "built"), ("d", "built")]);
    assert_eq!(env.read("run/a.txt"), a_out);
    assert!(!stale_tmp.exists());

    let report = engine.gc(&GcOptions::default()).unwrap();
    assert_eq!(report.blobs_deleted, 1, "{report:?}");
    assert_eq!(report.bytes_freed, 6);
    assert!(!orphan_path.exists());
    assert!(pre_path.exists(), "the blob a's result uses stays");
    assert!(engine.status(&dag.graph, &Force::Nothing).unwrap().all_fresh());
}

/// Runs a build in a child process (this test binary, filtered to this test), kills it
/// with SIGKILL while its stage is halfway through writing, and checks the next build.
#[test]
fn a_build_killed_midway_is_recovered_by_the_next() {
    const CHILD: &str = "MKONNX_ENGINE_TEST_KILL_CHILD";
    if let Ok(root) = std::env::var(CHILD) {
        // Child: build until killed.
        let env = Env { dir: tempfile::TempDir::new_in(&root).unwrap(), ..Env::new() };
        let root = PathBuf::from(root);
        let mut graph = Graph::new();
        graph
            .add(
                NodeSpec::new(env.stage("a").behaviour(Behaviour::Hang(root.join("started"))))
                    .file("x", root.join("x.txt"))
                    .materialize("out", root.join("run/a.txt")),
            )
            .unwrap();
        let engine = Engine::open(&root.join("store"), "0.1.0").unwrap();
        let _ = engine.build(&graph, &BuildOptions::default());
        return;
    }
    let env = setup();
    let test_name = format!("{}::a_build_killed_midway_is_recovered_by_the_next", module_path!().split_once("::").unwrap().1);
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([test_name.as_str(), "--exact", "--test-threads=1"])
        .env(CHILD, env.dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !env.path("started").exists() {
        assert!(started.elapsed() < Duration::from_secs(30), "child never started its stage");
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap();
    child.wait().unwrap();

    let mut graph = Graph::new();
    let a = graph.add(NodeSpec::new(env.stage("a")).file("x", env.path("x.txt")).materialize("out", env.path("run/a.txt"))).unwrap();
    let engine = env.engine();
    let status = engine.status(&graph, &Force::Nothing).unwrap();
    assert_eq!(status_of(&status, a), &NodeStatus::Stale(vec![StaleReason::NeverBuilt]));
    let r = build(&engine, &graph);
    assert_eq!(outcomes(&r), [("a", "built")], "the key lock died with the child");
    assert!(env.read("run/a.txt").starts_with("a("));
    let tmp_entries = fs::read_dir(env.store_dir().join("tmp")).unwrap().count();
    assert_eq!(tmp_entries, 2, "only this process's session (dir + lock) remains");
    let ok: String = engine.store().db(|c| c.query_row("PRAGMA integrity_check", [], |r| r.get(0))).unwrap();
    assert_eq!(ok, "ok");
}

#[test]
fn gc_keeps_current_results_and_frees_old_ones() {
    let env = setup();
    let dag = dag(&env);
    build(&env.engine(), &dag.graph);
    env.write("x.txt", "x2 is longer\n");
    build(&env.engine(), &dag.graph);
    let engine = env.engine();
    let report = engine.gc(&GcOptions::default()).unwrap();
    // The first build's a, c and d are no node's current result.
    assert_eq!(report.results_deleted, 3, "{report:?}");
    assert_eq!(report.blobs_deleted, 3);
    assert!(report.bytes_freed > 0);
    assert!(engine.status(&dag.graph, &Force::Nothing).unwrap().all_fresh());
    assert_eq!(engine.gc(&GcOptions::default()).unwrap().bytes_freed, 0, "nothing left to free");

    // After the run directory is deleted, pruning forgets its nodes and frees everything.
    fs::remove_dir_all(env.path("run")).unwrap();
    let report = engine.gc(&GcOptions { prune_missing: true }).unwrap();
    assert_eq!(report.nodes_pruned, 4, "{report:?}");
    assert_eq!(walk(&env.store_dir().join("blobs")).iter().filter(|p| p.is_file()).count(), 0);
    let status = engine.status(&dag.graph, &Force::Nothing).unwrap();
    assert_eq!(status_of(&status, dag.a), &NodeStatus::Stale(vec![StaleReason::NeverBuilt]));
}

#[test]
fn graph_refuses_ambiguous_or_machine_specific_nodes() {
    let env = setup();
    let mut graph = Graph::new();
    graph.add(NodeSpec::new(env.stage("a")).file("x", env.path("x.txt"))).unwrap();
    let err = graph.add(NodeSpec::new(env.stage("a").salt("other")).file("x", env.path("x.txt"))).unwrap_err();
    assert!(matches!(err, EngineError::ConflictingNode { what: "parameters", .. }), "{err}");
    let err = graph.add(NodeSpec::new(env.stage("a").version(2)).file("x", env.path("x.txt"))).unwrap_err();
    assert!(matches!(err, EngineError::ConflictingNode { what: "stage versions", .. }), "{err}");
    graph.add(NodeSpec::new(env.stage("a").salt("other")).identity("variant 2").file("x", env.path("x.txt"))).unwrap();

    let abs = env.path("x.txt").to_string_lossy().into_owned();
    let err = graph.add(NodeSpec::new(env.stage("p").params(json!({"model": {"path": abs}})))).unwrap_err();
    assert!(matches!(&err, EngineError::AbsolutePathInParams { key, .. } if key == "model.path"), "{err}");
    let err = graph.add(NodeSpec::new(env.stage("d")).file("x", env.path("x.txt")).file("x", env.path("y.txt"))).unwrap_err();
    assert!(matches!(err, EngineError::DuplicateInput { .. }), "{err}");
    let err = graph.add(NodeSpec::new(env.stage("bad name"))).unwrap_err();
    assert!(matches!(err, EngineError::InvalidStageName { .. }), "{err}");
    let err = graph.add(NodeSpec::new(env.stage("m")).materialize("../out", env.path("o"))).unwrap_err();
    assert!(matches!(err, EngineError::InvalidArtifactName { .. }), "{err}");
    let err = graph.add(NodeSpec::new(env.stage("m")).materialize_dir("viz", env.path("o"))).unwrap_err();
    assert!(matches!(err, EngineError::InvalidArtifactName { .. }), "{err}");
    let err = graph.add(NodeSpec::new(env.stage("u")).input("up", NodeHandle(99))).unwrap_err();
    assert!(matches!(err, EngineError::UnknownNode { index: 99 }), "{err}");

    graph.add(NodeSpec::new(env.stage("w1")).label("r").file("x", env.path("x.txt")).materialize("out", env.path("run/o"))).unwrap();
    let err = graph
        .add(NodeSpec::new(env.stage("w2")).label("r").file("x", env.path("x.txt")).materialize("out", env.path("run/o")))
        .unwrap_err();
    assert!(err.to_string().contains("both w1 [r] and w2 [r] write"), "{err}");
    let err = graph
        .add(
            NodeSpec::new(env.stage("w3"))
                .file("x", env.path("x.txt"))
                .materialize("out", env.path("p"))
                .materialize("other", env.path("p")),
        )
        .unwrap_err();
    assert!(matches!(err, EngineError::DestinationConflict { .. }), "{err}");
    assert_eq!(graph.len(), 3, "refused nodes are not added");
}

#[test]
fn dot_shows_nodes_files_edges_and_status() {
    let env = setup();
    let dag = dag(&env);
    let engine = env.engine();
    build(&engine, &dag.graph);
    env.write("y.txt", "y2\n");
    let status = engine.status(&dag.graph, &Force::Nothing).unwrap();
    let dot = dag.graph.to_dot(&|h| status.dot_fill(h));
    assert!(dot.starts_with("digraph mkonnx {"), "{dot}");
    assert!(dot.contains("n0 [label=\"a\\nrun\", fillcolor=palegreen];"), "{dot}");
    assert!(dot.contains("n1 [label=\"b\\nrun\", fillcolor=lightsalmon];"), "{dot}");
    assert!(dot.contains("f0 [label=\"x.txt\", shape=note];"), "{dot}");
    assert!(dot.contains("f0 -> n0 [label=\"x\"];"), "{dot}");
    assert!(dot.contains("n0 -> n2 [label=\"a\"];") && dot.contains("n2 -> n3 [label=\"c\"];"), "{dot}");
}

#[test]
fn observer_sees_started_for_stages_that_run_and_finished_for_all() {
    let env = setup();
    let dag = dag(&env);
    build(&env.engine(), &dag.graph);
    env.write("y.txt", "y2\n");
    let events = Mutex::new(Vec::new());
    let observer = |e: &BuildEvent<'_>| {
        let s = match e {
            BuildEvent::Started { node } => format!("start {}", node.index()),
            BuildEvent::Finished { node, outcome } => {
                format!("end {} {}", node.index(), outcome.is_ok())
            }
        };
        events.lock().unwrap().push(s);
    };
    env.engine().build(&dag.graph, &BuildOptions { observer: Some(&observer), ..Default::default() }).unwrap();
    let mut events = events.into_inner().unwrap();
    events.sort();
    assert_eq!(events, ["end 0 true", "end 1 true", "end 2 true", "end 3 true", "start 1", "start 2", "start 3"]);
}

#[test]
fn jobs_run_in_parallel_up_to_the_limit() {
    let env = Env::new();
    let mut graph = Graph::new();
    for i in 0..8 {
        env.write(&format!("f{i}"), &format!("{i}"));
        graph
            .add(
                NodeSpec::new(env.stage("slow").behaviour(Behaviour::Slow(Duration::from_millis(100))))
                    .file("x", env.path(&format!("f{i}"))),
            )
            .unwrap();
    }
    let t = Instant::now();
    let r = env.engine().with_jobs(4).build(&graph, &BuildOptions::default()).unwrap();
    let elapsed = t.elapsed();
    assert!(r.ok());
    // 8 stages of 100 ms on 4 workers: about 200 ms, far from the 800 ms of one worker.
    assert!(elapsed >= Duration::from_millis(200), "{elapsed:?}: more than 4 at once?");
    assert!(elapsed < Duration::from_millis(700), "{elapsed:?}: not parallel?");
}

/// The cost of a no-op rebuild: a fresh process opening the store and finding 100 nodes
/// (50 runs of 2, each with an input file and a materialized output) fresh.
#[test]
fn noop_rebuild_of_100_nodes_costs_milliseconds() {
    let env = Env::new();
    let mut graph = Graph::new();
    for i in 0..50 {
        let run = format!("runs/{i:02}");
        env.write(&format!("{run}/best_model.pth"), &format!("weights {i}"));
        let read =
            graph.add(NodeSpec::new(env.stage("read")).label(&run).file("checkpoint", env.path(&format!("{run}/best_model.pth")))).unwrap();
        graph
            .add(
                NodeSpec::new(env.stage("export"))
                    .label(&run)
                    .input("weights", read)
                    .materialize("out", env.path(&format!("{run}/onnx_model/model.onnx"))),
            )
            .unwrap();
    }
    assert_eq!(graph.len(), 100);
    let first = build(&env.engine(), &graph);
    assert!(first.ok());
    let t = Instant::now();
    let engine = env.engine();
    let r = build(&engine, &graph);
    let noop = t.elapsed();
    let t = Instant::now();
    let status = engine.status(&graph, &Force::Nothing).unwrap();
    let status_time = t.elapsed();
    assert!(r.nodes.iter().all(|n| matches!(n.outcome, Outcome::Fresh)));
    assert!(status.all_fresh());
    assert_eq!(r.files_hashed, 0);
    eprintln!("no-op rebuild of 100 nodes: open + build {noop:?}, status {status_time:?} (first build {:?})", first.elapsed);
    assert!(noop < Duration::from_secs(2), "no-op rebuild took {noop:?}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            }
            out.push(p);
        }
    }
    out
}

fn blob_with_content(store: &Path, content: &[u8]) -> Option<PathBuf> {
    let h = hash_bytes(content).to_hex();
    let p = store.join("blobs").join(&h[..2]).join(&h[2..]);
    p.exists().then_some(p)
}

fn make_writable(p: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(p, fs::Permissions::from_mode(0o644)).unwrap();
    }
}

/// An engine on its own store ("another machine") in `env`, with remote `remote`.
fn machine(env: &Env, store: &str, remote: &Path) -> Engine {
    let url = format!("file://{}", remote.display());
    let remote = RemoteStore::open(&url, RemoteOptions::default()).unwrap();
    Engine::open(&env.path(store), "0.1.0").unwrap().with_jobs(2).with_clock(env.clock.clone()).with_remote(Arc::new(remote))
}

#[test]
fn a_lost_race_adopts_the_winners_artifacts_so_machines_agree_downstream() {
    let env = setup();
    let remote = env.path("remote");
    let dag = dag_with(&env, env.stage("a").behaviour(Behaviour::Unreproducible), env.stage("b"), env.stage("c"), env.stage("d"));
    let first = machine(&env, "store-a", &remote);
    let r = build(&first, &dag.graph);
    assert_eq!(outcomes(&r), [("a", "built"), ("b", "built"), ("c", "built"), ("d", "built")]);
    let (winner_a, winner_d) = (env.read("run/a.txt"), env.read("run/d.txt"));
    assert!(winner_a.ends_with("#1"), "{winner_a}");
    assert_eq!(first.remote().unwrap().stats().uploads, 4);

    // Another machine builds `a` again (forced: as if both had missed at once): its bytes
    // differ, the record is already there, so it takes the winner's, and so do `c` and `d`.
    let second = machine(&env, "store-b", &remote);
    let r = second.build(&dag.graph, &BuildOptions { force: Force::Nodes([dag.a].into()), ..Default::default() }).unwrap();
    assert_eq!(outcomes(&r)[0], ("a", "built"));
    assert_eq!(env.runs("a"), 2);
    let stats = second.remote().unwrap().stats();
    assert_eq!((stats.races_lost, stats.adopted, stats.uploads, stats.hits), (1, 1, 0, 3), "{stats:?}");
    assert_eq!(env.read("run/a.txt"), winner_a);
    assert_eq!(env.read("run/d.txt"), winner_d);
    assert_eq!(env.runs("c"), 1, "c's key is the winner's: downloaded, not rebuilt");
}

#[test]
fn a_truncated_remote_blob_is_a_miss_and_the_rebuild_repairs_it() {
    let env = setup();
    let remote = env.path("remote");
    let dag = dag(&env);
    build(&machine(&env, "store-a", &remote), &dag.graph);
    let d_out = env.read("run/d.txt");
    let d_blob = blob_with_content(&remote, d_out.as_bytes()).expect("d's blob in the remote");
    fs::write(&d_blob, &d_out.as_bytes()[..5]).unwrap();

    let second = machine(&env, "store-b", &remote);
    fs::remove_file(env.path("run/d.txt")).unwrap();
    let r = build(&second, &dag.graph);
    // No stage but d runs: the others' results come from the remote (a's file was intact).
    assert_eq!(outcomes(&r), [("a", "fresh"), ("b", "fresh"), ("c", "fresh"), ("d", "built")]);
    assert_eq!((env.runs("a"), env.runs("b"), env.runs("c"), env.runs("d")), (1, 1, 1, 2));
    assert_eq!(env.read("run/d.txt"), d_out);
    assert_eq!(fs::read(&d_blob).unwrap(), d_out.as_bytes(), "the upload after the rebuild repaired the remote");
    let stats = second.remote().unwrap().stats();
    assert_eq!((stats.hits, stats.misses, stats.errors, stats.races_lost), (3, 1, 1, 1), "{stats:?}");
}

#[test]
fn remote_gc_sweeps_the_blobs_no_record_names() {
    let env = setup();
    let remote = env.path("remote");
    let dag = dag(&env);
    let first = machine(&env, "store-a", &remote);
    let r = build(&first, &dag.graph);
    let store = first.remote().unwrap();
    assert_eq!(store.gc(None, Duration::ZERO).unwrap(), (0, 0, 0), "every blob is named by a record");

    // Without d's record, d's blob is garbage; the others stay.
    let d_key = r.get(dag.d).key.unwrap().to_hex();
    fs::remove_file(remote.join(format!("records/{d_key}.json"))).unwrap();
    let d_out = env.read("run/d.txt");
    let (records, blobs, bytes) = store.gc(None, Duration::ZERO).unwrap();
    assert_eq!((records, blobs, bytes), (0, 1, d_out.len() as u64));
    assert!(blob_with_content(&remote, d_out.as_bytes()).is_none());
    assert!(blob_with_content(&remote, env.read("run/a.txt").as_bytes()).is_some());
    // A grace period keeps young blobs; a record age limit of 0 days removes every record.
    fs::remove_file(remote.join(format!("records/{}.json", r.get(dag.a).key.unwrap().to_hex()))).unwrap();
    assert_eq!(store.gc(None, Duration::from_secs(3600)).unwrap(), (0, 0, 0));
    let (records, blobs, _) = store.gc(Some(Duration::ZERO), Duration::ZERO).unwrap();
    assert_eq!((records, blobs), (2, 3), "b's and c's records, then a's, b's and c's blobs");
    assert!(!remote.join("blobs").read_dir().unwrap().any(|shard| shard.unwrap().path().read_dir().unwrap().next().is_some()));
    assert!(remote.join("mkonnx-remote.json").is_file(), "the marker stays");
}
