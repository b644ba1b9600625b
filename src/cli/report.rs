//! The fleet report: one row per run (architecture, result, stages built and fresh, both
//! sides' AP, verdict, time, the error), printed after every multi-run build, written as
//! `mkonnx build --json`, and shown again by `mkonnx report` from the store without
//! building. Every row a build makes is saved in the store under the run's absolute path.

use crate::data::run_dir::RunDir;
use crate::engine::{BuildReport, Engine, Hash, NodeHandle, NodeReport, Outcome};
use crate::eval::compare::Comparison;
use crate::stages::convert::ModelInfo;
use crate::stages::parity::ParityReport;
use crate::stages::PlannedRun;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::Path;

/// How a run stands.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RunResult {
    /// Every stage of the run is built or fresh (and its model is published).
    Ok,
    /// A stage failed, or the run could not be planned; `error` says why.
    Failed,
    /// (`mkonnx report`) its checkpoint or config changed since its last build.
    Stale,
    /// (`mkonnx report`) this store has no build of it.
    NotBuilt,
}

impl RunResult {
    fn word(self) -> &'static str {
        match self {
            RunResult::Ok => "ok",
            RunResult::Failed => "FAILED",
            RunResult::Stale => "stale",
            RunResult::NotBuilt => "not built",
        }
    }
}

/// One run's line of the fleet report.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RunRow {
    /// The run directory as given on the command line.
    pub run: String,
    /// The torchvision constructor, once resolved.
    pub architecture: Option<String>,
    /// The outcome.
    pub result: RunResult,
    /// Stages that ran in the build this row comes from.
    pub stages_built: usize,
    /// Stages found fresh (or restored from the store) in it.
    pub stages_fresh: usize,
    /// The parity check: `OK`, `FAILED` (model not published) or `FAILED (kept)`.
    pub parity: Option<String>,
    /// COCO AP of the PyTorch model.
    pub pytorch_ap: Option<f64>,
    /// COCO AP of the ONNX model.
    pub onnx_ap: Option<f64>,
    /// The comparison's overall verdict (excellent, good, warning).
    pub verdict: Option<String>,
    /// COCO AP of the INT8 model (`--quantize int8`).
    #[serde(default)]
    pub int8_ap: Option<f64>,
    /// The INT8 column's overall verdict (against PyTorch, same tiers).
    #[serde(default)]
    pub int8_verdict: Option<String>,
    /// Median latency per image of the PyTorch model (libtorch), in ms.
    #[serde(default)]
    pub pytorch_ms: Option<f64>,
    /// Median latency per image of the ONNX float32 model (ONNX Runtime, default optimizations), in ms.
    #[serde(default)]
    pub onnx_ms: Option<f64>,
    /// Median latency per image of the INT8 model, in ms.
    #[serde(default)]
    pub int8_ms: Option<f64>,
    /// Intra-op threads the latencies were measured with.
    #[serde(default)]
    pub latency_threads: Option<usize>,
    /// Seconds its stages ran in that build (a stage shared by runs counts for each).
    pub seconds: f64,
    /// Why it failed: the first failed stage and its error.
    pub error: Option<String>,
    /// blake3 of the checkpoint it was built from (to tell a stale row).
    pub checkpoint_hash: Option<String>,
    /// blake3 of the config it was built from.
    pub config_hash: Option<String>,
    /// A hash of every stage key of the run: equal keys mean equal results, so a no-op
    /// build reuses the saved row instead of reading the artifacts again.
    #[serde(default)]
    pub keys: Option<String>,
}

impl RunRow {
    /// A run that failed before any of its stages could be planned.
    pub fn failed(run: &str, error: String) -> RunRow {
        RunRow {
            run: run.to_string(),
            architecture: None,
            result: RunResult::Failed,
            stages_built: 0,
            stages_fresh: 0,
            parity: None,
            pytorch_ap: None,
            onnx_ap: None,
            verdict: None,
            int8_ap: None,
            int8_verdict: None,
            pytorch_ms: None,
            onnx_ms: None,
            int8_ms: None,
            latency_threads: None,
            seconds: 0.0,
            error: Some(error),
            checkpoint_hash: None,
            config_hash: None,
            keys: None,
        }
    }
}

/// What a run's build left in the store that reports and the terminal show, read (and
/// verified) once, and only when something asks for it: a no-op fleet build whose saved
/// rows still hold reads none of it.
pub struct RunOutputs<'a> {
    engine: &'a Engine,
    report: &'a BuildReport,
    planned: &'a PlannedRun,
    read: std::cell::OnceCell<Outputs>,
}

/// The artifacts of [`RunOutputs`].
#[derive(Default)]
pub struct Outputs {
    /// The resolved model (`model.json`).
    pub info: Option<ModelInfo>,
    /// The parity check (`parity.json`).
    pub parity: Option<ParityReport>,
    /// The comparison (`comparison.json`).
    pub comparison: Option<Comparison>,
    /// Whether `publish_model` succeeded, i.e. `onnx_model/model.onnx` is in place.
    pub published: bool,
}

impl<'a> RunOutputs<'a> {
    /// The outputs of `planned` in `report`, not read yet.
    pub fn new(engine: &'a Engine, report: &'a BuildReport, planned: &'a PlannedRun) -> Self {
        RunOutputs { engine, report, planned, read: std::cell::OnceCell::new() }
    }

    /// The outputs, read from the store on first use.
    pub fn get(&self) -> &Outputs {
        self.read.get_or_init(|| {
            let (engine, report, p) = (self.engine, self.report, self.planned);
            Outputs {
                info: p.model.and_then(|h| read_artifact(engine, report, h, "model.json")),
                parity: p.parity.and_then(|h| read_artifact(engine, report, h, "parity.json")),
                comparison: p.compare.and_then(|h| read_artifact(engine, report, h, "comparison.json")),
                published: p.publish.is_some_and(|h| report.get(h).outcome.is_ok()),
            }
        })
    }
}

/// The row of one planned run after a build; `nodes` are the run's nodes in `report` (see
/// [`BuildReport::by_label`]). `saved` is the row saved by the run's last build, reused when
/// every stage key is the same (only the counts and time are new).
pub fn build_row(
    report: &BuildReport,
    nodes: &[&NodeReport],
    run: &str,
    planned: &PlannedRun,
    outputs: &RunOutputs<'_>,
    saved: Option<RunRow>,
) -> RunRow {
    if let Some(error) = &planned.error {
        return RunRow::failed(run, error.clone());
    }
    let built = nodes.iter().filter(|n| matches!(n.outcome, Outcome::Built { .. })).count();
    let fresh = nodes.iter().filter(|n| matches!(n.outcome, Outcome::Fresh | Outcome::Restored { .. })).count();
    let seconds = nodes.iter().map(|n| if let Outcome::Built { duration } = n.outcome { duration.as_secs_f64() } else { 0.0 }).sum();
    let error = nodes.iter().find_map(|n| match &n.outcome {
        Outcome::Failed { error } => Some(format!("{}: {error:#}", n.stage)),
        _ => None,
    });
    let keys = (error.is_none()).then(|| {
        let mut h = blake3::Hasher::new_derive_key("mkonnx.run-keys.v1");
        for n in nodes {
            h.update(n.key.map(|k| *k.as_bytes()).unwrap_or_default().as_slice());
        }
        h.finalize().to_hex()[..32].to_string()
    });
    if let Some(mut row) = saved.filter(|s| keys.is_some() && s.keys == keys && s.result == RunResult::Ok) {
        row.run = run.to_string();
        (row.stages_built, row.stages_fresh, row.seconds) = (built, fresh, seconds);
        return row;
    }
    let input_hash = |name: &str| {
        let model = planned.model.map(|m| report.get(m))?;
        model.file_hashes.iter().find(|(n, _)| n == name).map(|(_, h)| h.to_hex())
    };
    let Outputs { info, parity, comparison, published } = outputs.get();
    let latency = comparison.as_ref().map(|c| &c.latency);
    RunRow {
        run: run.to_string(),
        architecture: info.as_ref().map(|i| i.arch.to_string()),
        result: if error.is_none() { RunResult::Ok } else { RunResult::Failed },
        stages_built: built,
        stages_fresh: fresh,
        parity: parity.as_ref().map(|p| match (p.passed, published) {
            (true, _) => "OK".to_string(),
            (false, true) => "FAILED (kept)".to_string(),
            (false, false) => "FAILED".to_string(),
        }),
        pytorch_ap: comparison.as_ref().and_then(|c| c.pytorch.as_ref().map(|p| p.ap)),
        onnx_ap: comparison.as_ref().map(|c| c.onnx.ap),
        verdict: comparison.as_ref().and_then(|c| c.overall).map(|v| format!("{v:?}").to_lowercase()),
        int8_ap: comparison.as_ref().and_then(|c| c.int8.as_ref()).map(|q| q.headline.ap),
        int8_verdict: comparison.as_ref().and_then(|c| c.int8.as_ref()).map(|q| format!("{:?}", q.overall).to_lowercase()),
        pytorch_ms: latency.and_then(|l| l.pytorch.as_ref()).map(|l| l.median_ms),
        onnx_ms: latency.and_then(|l| l.onnx.as_ref()).map(|l| l.median_ms),
        int8_ms: latency.and_then(|l| l.int8.as_ref()).map(|l| l.median_ms),
        latency_threads: latency.and_then(|l| [&l.onnx, &l.pytorch, &l.int8].into_iter().flatten().next()).map(|l| l.threads),
        seconds,
        error,
        checkpoint_hash: input_hash("checkpoint"),
        config_hash: input_hash("config"),
        keys,
    }
}

/// Reads a JSON artifact of a node that built or was fresh in this report.
fn read_artifact<T: for<'de> Deserialize<'de>>(engine: &Engine, report: &BuildReport, node: NodeHandle, artifact: &str) -> Option<T> {
    let n = report.get(node);
    if !n.outcome.is_ok() {
        return None;
    }
    let bytes = engine.store().read_artifact(&n.key?, artifact).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The key a run's row is saved under: its absolute path (labels are as typed).
pub fn row_key(run: &Path) -> String {
    std::path::absolute(run).unwrap_or_else(|_| run.to_path_buf()).to_string_lossy().into_owned()
}

/// The saved rows of `runs` (by position), decoded; a row that cannot be decoded is absent.
pub fn saved_rows(engine: &Engine, runs: &[&Path]) -> anyhow::Result<Vec<Option<RunRow>>> {
    let keys: Vec<String> = runs.iter().map(|r| row_key(r)).collect();
    let mut found = engine.store().run_reports(&keys)?;
    Ok(keys.iter().map(|k| found.remove(k).and_then(|json| serde_json::from_str(&json).ok())).collect())
}

/// Saves rows under their runs' absolute paths.
pub fn save_rows(engine: &Engine, rows: &[(&Path, &RunRow)]) -> anyhow::Result<()> {
    let encoded = rows.iter().map(|(run, row)| Ok((row_key(run), serde_json::to_string(row)?))).collect::<anyhow::Result<Vec<_>>>()?;
    Ok(engine.store().put_run_reports(&encoded, engine.now_ns())?)
}

/// `mkonnx report`: each run's saved row, checked against its checkpoint and config now.
pub fn report_rows(engine: &Engine, runs: &[&Path], checkpoint: Option<&Path>) -> anyhow::Result<Vec<RunRow>> {
    let saved = saved_rows(engine, runs)?;
    let mut rows = Vec::with_capacity(runs.len());
    for (run, saved) in runs.iter().zip(saved) {
        let label = run.display().to_string();
        let located = match RunDir::locate(run, checkpoint) {
            Ok(r) => r,
            Err(e) => {
                rows.push(RunRow::failed(&label, e.to_string()));
                continue;
            }
        };
        let Some(mut row) = saved else {
            let mut row = RunRow::failed(&label, String::new());
            (row.result, row.error) = (RunResult::NotBuilt, None);
            rows.push(row);
            continue;
        };
        row.run = label;
        let now = engine.hash_files(&[&located.checkpoint, &located.config])?;
        let now: Vec<Option<String>> = now.into_iter().map(|h| h.ok().map(|h: Hash| h.to_hex())).collect();
        let changed: Vec<&str> = [("checkpoint", &row.checkpoint_hash, &now[0]), ("config", &row.config_hash, &now[1])]
            .into_iter()
            .filter(|(_, then, now)| then.is_some() && then != now)
            .map(|(name, _, _)| name)
            .collect();
        if !changed.is_empty() {
            row.result = RunResult::Stale;
            row.error = Some(format!("{} changed since the last build", changed.join(" and ")));
        }
        rows.push(row);
    }
    Ok(rows)
}

/// How `mkonnx report` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// An aligned table for terminals and logs.
    Text,
    /// A GitHub-flavoured Markdown table (CI job summaries).
    Markdown,
    /// `{"ok": ..., "runs": [rows]}`, the rows of `mkonnx build --json`.
    Json,
}

const HEADERS: [&str; 15] = [
    "run",
    "architecture",
    "result",
    "built",
    "fresh",
    "PyTorch AP",
    "ONNX AP",
    "verdict",
    "INT8 AP",
    "INT8 verdict",
    "PyTorch ms",
    "ONNX ms",
    "INT8 ms",
    "time",
    "error",
];

/// The columns printed right-aligned (numbers).
const NUMERIC: [&str; 9] = ["built", "fresh", "PyTorch AP", "ONNX AP", "INT8 AP", "PyTorch ms", "ONNX ms", "INT8 ms", "time"];

/// The cells of a row, as text (the error's first line only).
fn cells(row: &RunRow) -> [String; 15] {
    let ap = |v: Option<f64>| v.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
    let ms = |v: Option<f64>| v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into());
    let mut result = row.result.word().to_string();
    if let Some(p) = row.parity.as_deref().filter(|p| *p != "OK") {
        let _ = write!(result, " (parity {p})");
    }
    [
        row.run.clone(),
        row.architecture.clone().unwrap_or_else(|| "-".into()),
        result,
        row.stages_built.to_string(),
        row.stages_fresh.to_string(),
        ap(row.pytorch_ap),
        ap(row.onnx_ap),
        row.verdict.clone().unwrap_or_else(|| "-".into()),
        ap(row.int8_ap),
        row.int8_verdict.clone().unwrap_or_else(|| "-".into()),
        ms(row.pytorch_ms),
        ms(row.onnx_ms),
        ms(row.int8_ms),
        format!("{:.1}s", row.seconds),
        row.error.as_deref().and_then(|e| e.lines().next()).unwrap_or("").to_string(),
    ]
}

/// Whether every row is a success.
pub fn all_ok(rows: &[RunRow]) -> bool {
    rows.iter().all(|r| r.result == RunResult::Ok)
}

/// The report in `format`.
pub fn render(rows: &[RunRow], format: Format) -> String {
    let ok = rows.iter().filter(|r| r.result == RunResult::Ok).count();
    let mut footer = format!("{ok} of {} run(s) ok", rows.len());
    if let Some(threads) = rows.iter().find_map(|r| r.latency_threads) {
        let _ = write!(footer, "; ms = median latency per image after warm-up, {threads} intra-op thread(s)");
    }
    let table: Vec<[String; 15]> = rows.iter().map(cells).collect();
    match format {
        Format::Json => {
            let json = serde_json::json!({ "ok": all_ok(rows), "runs": rows });
            serde_json::to_string_pretty(&json).unwrap_or_default() + "\n"
        }
        Format::Markdown => {
            let line = |c: &[String]| format!("| {} |\n", c.iter().map(|s| s.replace('|', "\\|")).collect::<Vec<_>>().join(" | "));
            let mut out = line(&HEADERS.map(String::from));
            out += &line(&HEADERS.map(|h| if NUMERIC.contains(&h) { "---:" } else { "---" }.to_string()));
            for c in &table {
                out += &line(c);
            }
            out + "\n" + &footer + "\n"
        }
        Format::Text => {
            let mut widths = HEADERS.map(str::len);
            for c in &table {
                for (w, cell) in widths.iter_mut().zip(c) {
                    *w = (*w).max(cell.chars().count());
                }
            }
            let line = |c: &[String]| {
                let mut s = String::new();
                for (i, cell) in c.iter().enumerate() {
                    let pad = widths[i].saturating_sub(cell.chars().count());
                    if i == c.len() - 1 {
                        s += cell;
                    } else if NUMERIC.contains(&HEADERS[i]) {
                        let _ = write!(s, "{}{cell}  ", " ".repeat(pad));
                    } else {
                        let _ = write!(s, "{cell}{}  ", " ".repeat(pad));
                    }
                }
                s.trim_end().to_string() + "\n"
            };
            let mut out = line(&HEADERS.map(String::from));
            for c in &table {
                out += &line(c);
            }
            out + &footer + "\n"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(run: &str, result: RunResult) -> RunRow {
        let mut r = RunRow::failed(run, "resolve_model: bad | config\nsecond line".into());
        r.result = result;
        if result == RunResult::Ok {
            r.error = None;
            r.architecture = Some("fasterrcnn_resnet50_fpn".into());
            (r.pytorch_ap, r.onnx_ap, r.verdict) = (Some(0.37731), Some(0.37729), Some("excellent".into()));
            (r.int8_ap, r.int8_verdict) = (Some(0.37012), Some("good".into()));
            (r.pytorch_ms, r.onnx_ms, r.int8_ms, r.latency_threads) = (Some(412.25), Some(301.5), Some(190.04), Some(1));
        }
        r
    }

    #[test]
    fn text_markdown_and_json_carry_every_row() {
        let rows = vec![row("outputs/a", RunResult::Ok), row("outputs/b", RunResult::Failed)];
        let text = render(&rows, Format::Text);
        assert!(text.starts_with("run "), "{text}");
        assert!(text.contains("fasterrcnn_resnet50_fpn") && text.contains("0.3773") && text.contains("excellent"), "{text}");
        assert!(text.contains("FAILED") && text.contains("resolve_model: bad | config") && !text.contains("second line"), "{text}");
        assert!(text.contains("0.3701") && text.contains("412.2") && text.contains("190.0"), "{text}");
        assert!(text.ends_with("1 of 2 run(s) ok; ms = median latency per image after warm-up, 1 intra-op thread(s)\n"), "{text}");
        let md = render(&rows, Format::Markdown);
        assert!(md.starts_with("| run | architecture |") && md.contains("| --- |") && md.contains("bad \\| config"), "{md}");
        assert!(md.contains("| INT8 AP | INT8 verdict | PyTorch ms | ONNX ms | INT8 ms |") && md.contains("| 301.5 |"), "{md}");
        let json: serde_json::Value = serde_json::from_str(&render(&rows, Format::Json)).unwrap();
        assert_eq!(json["ok"], false);
        assert_eq!(json["runs"][1]["result"], "failed");
        let back: Vec<RunRow> = serde_json::from_value(json["runs"].clone()).unwrap();
        assert_eq!(back, rows);
    }
}
