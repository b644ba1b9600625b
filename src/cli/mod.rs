//! The `mkonnx` command line: argument handling, the store location, progress and reports.

/// `println!` that never panics: a closed stdout (`mkonnx build ... | head`) drops the
/// output, and the exit status still says how the build went.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// `print!` that never panics (see [`out!`]).
macro_rules! out_raw {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// `eprintln!` that never panics on a closed stderr.
macro_rules! err {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

pub mod args;
pub mod report;
pub mod shard;

use crate::data::dataset::Dataset;
use crate::data::run_dir::RunDir;
use crate::engine::{BuildEvent, BuildOptions, Engine, Force, Outcome, OutputMode, RemoteMode, RemoteOptions, RemoteStore};
use crate::stages::{plan, BuildRequest, Device};
use anyhow::Context;
use args::{BuildArgs, Cli, Command, DeviceArg, PlanArgs, RemoteArgs, RemoteCommand, RemoteModeArg, ReportArgs, ShardArgs};
use clap::Parser;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

/// Runs the command line; the binary's `main` is only this.
pub fn main() -> ExitCode {
    // ONNX Runtime (1.29 and later) writes a device id under ~/.cache/Microsoft and sends
    // telemetry unless told not to before it starts; a build tool writes only its outputs
    // and its store. Set here, while the process has one thread; a user's own value wins.
    if std::env::var_os("ORT_DISABLE_TELEMETRY").is_none() {
        std::env::set_var("ORT_DISABLE_TELEMETRY", "1");
    }
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            err!("Error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Build(a) => build(&a, Mode::Build),
        Command::Status(a) => build(&a, Mode::Status),
        Command::Graph(a) => build(&a, Mode::Graph),
        Command::Report(a) => report_command(&a),
        Command::Push(a) => build(&a, Mode::Push),
        Command::Pull(a) => build(&a, Mode::Pull),
        Command::Plan(a) => plan_command(&a),
        Command::Remote(RemoteCommand::Check(r)) => remote_check(&r),
        Command::Remote(RemoteCommand::Gc(g)) => {
            let remote = open_remote(&g.remote)?.context("mkonnx remote gc needs --remote URL (or MKONNX_REMOTE)")?;
            let day = std::time::Duration::from_secs(24 * 3600);
            let grace = std::time::Duration::from_secs(3600 * g.grace_hours);
            let (records, blobs, bytes) = remote.gc(g.max_record_age_days.map(|d| day * d as u32), grace)?;
            out!("remote gc: {records} record(s) and {blobs} blob(s) deleted, {:.1} MB freed", bytes as f64 / 1e6);
            Ok(ExitCode::SUCCESS)
        }
        Command::Gc(s) => {
            let engine = Engine::open(&store_dir(s.store.as_deref())?, crate::build_identity())?;
            let r = engine.gc(&crate::engine::GcOptions { prune_missing: true })?;
            out!("gc: {} result(s) and {} blob(s) deleted, {:.1} MB freed", r.results_deleted, r.blobs_deleted, r.bytes_freed as f64 / 1e6);
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify(s) => {
            let engine = Engine::open(&store_dir(s.store.as_deref())?, crate::build_identity())?;
            let r = engine.store().verify_all()?;
            out!(
                "verify: {} blob(s), {:.1} MB checked in {}",
                r.blobs_checked,
                r.bytes_checked as f64 / 1e6,
                engine.store().root().display()
            );
            for path in &r.corrupt {
                err!("damaged: {} (moved to quarantine/; the next build makes it again)", path.display());
            }
            for path in &r.missing {
                err!("missing: {} (forgotten; the next build makes it again)", path.display());
            }
            for line in &r.database_problems {
                err!("database: {line}");
            }
            Ok(if r.clean() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::CocoEval(a) => {
            let m = crate::eval::coco::evaluate_files(&a.ground_truth, &a.predictions)?;
            if a.json {
                out!("{}", serde_json::to_string_pretty(&m)?);
            } else {
                out_raw!("{}", crate::eval::coco::summary_text(&m));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Build,
    Status,
    Graph,
    /// Build, and upload results already in the local store too.
    Push,
    /// Download and materialize; never run a stage.
    Pull,
}

/// Connects to the remote of `--remote` / `$MKONNX_REMOTE`, if one is given.
fn open_remote(r: &RemoteArgs) -> anyhow::Result<Option<Arc<RemoteStore>>> {
    let Some(url) = r.remote.as_deref().filter(|u| !u.is_empty()) else {
        return Ok(None);
    };
    let options = RemoteOptions {
        mode: match r.remote_mode {
            RemoteModeArg::Rw => RemoteMode::ReadWrite,
            RemoteModeArg::Ro => RemoteMode::ReadOnly,
        },
        required: r.remote_required,
        transfer_timeout: std::time::Duration::from_secs(r.remote_timeout),
        ..RemoteOptions::default()
    };
    Ok(Some(Arc::new(RemoteStore::open(url, options)?)))
}

/// The run directories of this process's shard (all of them without `--shard`).
fn sharded_run_dirs(s: &ShardArgs, dirs: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    let Some(spec) = &s.shard else {
        return Ok(dirs.to_vec());
    };
    let shard = shard::Shard::parse(spec, s.shard_count, &|name| std::env::var(name).ok())?;
    Ok(shard::select(dirs, shard, &s.shard_root)?.into_iter().cloned().collect())
}

/// `mkonnx plan`: the runs of a shard, one per line.
fn plan_command(a: &PlanArgs) -> anyhow::Result<ExitCode> {
    match sharded_run_dirs(&a.shard, &a.run_dirs) {
        Ok(dirs) => {
            for d in dirs {
                out!("{}", d.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(message) => {
            err!("Error: {message}");
            Ok(ExitCode::from(2))
        }
    }
}

/// `mkonnx remote check`: one line per probe; fails if one failed.
fn remote_check(r: &RemoteArgs) -> anyhow::Result<ExitCode> {
    let required = RemoteArgs { remote_required: true, ..r.clone() };
    let remote = open_remote(&required)?.context("mkonnx remote check needs --remote URL (or MKONNX_REMOTE)")?;
    let mut ok = true;
    for (probe, outcome) in remote.check() {
        match outcome {
            Ok(detail) => out!("ok      {probe}: {detail}"),
            Err(e) => {
                ok = false;
                out!("FAILED  {probe}: {e}");
            }
        }
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// `--store`, else `$MKONNX_STORE`, else `$XDG_CACHE_HOME/mkonnx`, else `~/.cache/mkonnx`.
pub fn store_dir(flag: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = flag {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("MKONNX_STORE").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(p).join("mkonnx"));
    }
    let home = std::env::var_os("HOME").context("no --store, MKONNX_STORE or HOME to place the store in")?;
    Ok(PathBuf::from(home).join(".cache").join("mkonnx"))
}

fn build(a: &BuildArgs, mode: Mode) -> anyhow::Result<ExitCode> {
    if let Err(message) = a.validate() {
        err!("Error: {message}");
        return Ok(ExitCode::from(2));
    }
    let run_dirs = match sharded_run_dirs(&a.shard, &a.run_dirs) {
        Ok(dirs) => dirs,
        Err(message) => {
            err!("Error: {message}");
            return Ok(ExitCode::from(2));
        }
    };
    if run_dirs.is_empty() {
        out!("shard {}: no runs among the {} given", a.shard.shard.as_deref().unwrap_or_default(), a.run_dirs.len());
        return Ok(ExitCode::SUCCESS);
    }
    if matches!(mode, Mode::Push | Mode::Pull) && a.remote.remote.is_none() {
        anyhow::bail!("push and pull need --remote URL (or MKONNX_REMOTE)");
    }
    let dataset = match &a.dataset_dir {
        Some(d) => Some(Dataset::load(d)?),
        None => None,
    };
    if let Some(img) = &a.image_input {
        if !img.is_file() {
            anyhow::bail!("Image not found: {}", img.display());
        }
    }
    // Runs whose inputs are missing fail alone; the others still build (make -k).
    let mut runs = Vec::new();
    let mut unlocated = Vec::new();
    for dir in &run_dirs {
        match RunDir::locate(dir, a.checkpoint_path.as_deref()) {
            Ok(r) => runs.push((dir.as_path(), r)),
            Err(e) => {
                err!("Error: {e}");
                unlocated.push((dir.as_path(), e.to_string()));
            }
        }
    }

    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let jobs = a.jobs.map_or(cpus, usize::from);
    let threads = a.threads.map_or((cpus / jobs).max(1), usize::from);
    let device = match a.device {
        DeviceArg::Cpu => Device::Cpu,
        DeviceArg::Cuda => {
            // Fail before any work when no GPU can run the PyTorch side.
            crate::runtime::pytorch::check_device(Device::Cuda)?;
            Device::Cuda
        }
    };
    let int8 = match a.quantize {
        Some(args::QuantizeArg::Int8) => {
            let settings = crate::stages::quantize::CalibrationSettings {
                method: a.calibration_method,
                images: a.calibration_images,
                source: match (&a.calibration_dir, &dataset) {
                    (Some(dir), _) => format!("calibration directory {}", dir_name(dir)),
                    (None, Some(ds)) => format!("the evaluation dataset {}", ds.name),
                    (None, None) => unreachable!("validate() asks for one of them"),
                },
                from_evaluation_set: a.calibration_dir.is_none(),
            };
            let images = match &dataset {
                Some(ds) => crate::stages::quantize::calibration_images(a.calibration_dir.as_deref(), ds, a.calibration_images)?,
                None => {
                    crate::stages::quantize::calibration_images_in(a.calibration_dir.as_deref().expect("validated"), a.calibration_images)?
                }
            };
            Some(crate::stages::Int8Request { settings, images })
        }
        None => None,
    };
    let req = BuildRequest {
        runs: runs.iter().map(|(_, r)| r.clone()).collect(),
        dataset,
        image_input: a.image_input.clone(),
        evaluate: a.evaluate_converted_model,
        parity: !a.no_parity_check,
        keep_failed_parity: a.keep_failed_parity,
        device,
        threads,
        visualizations: a.visualizations,
        vis_score_thresh: a.vis_score_thresh,
        int8,
    };
    let (graph, planned) = plan(&req);
    for (p, (dir, _)) in planned.iter().zip(&runs) {
        if let Some(e) = &p.error {
            err!("Error: {}: {e}", dir.display());
        }
    }
    let mut engine = Engine::open(&store_dir(a.store.store.as_deref())?, crate::build_identity())?.with_jobs(jobs);
    if matches!(mode, Mode::Build | Mode::Push | Mode::Pull) {
        if let Some(remote) = open_remote(&a.remote)? {
            engine = engine.with_remote(remote);
        }
    }
    let force = if a.force { Force::All } else { Force::Nothing };

    if mode == Mode::Graph {
        let status = engine.status(&graph, &force)?;
        out_raw!("{}", graph.to_dot(&|h| status.dot_fill(h)));
        return Ok(ExitCode::SUCCESS);
    }
    if mode == Mode::Status || a.dry_run {
        let status = engine.status(&graph, &force)?;
        out_raw!("{status}");
        return Ok(ExitCode::SUCCESS);
    }

    let quiet = a.quiet || a.json;
    // On a terminal: a progress bar over the graph's stages, with a line per stage built;
    // elsewhere (CI logs): plain lines; with --quiet or --json: nothing. Errors are printed
    // once, after the build, whatever the mode.
    let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(graph.len() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} stages  {wide_msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        bar
    });
    let say = |line: String| match &bar {
        Some(b) => b.println(line),
        None => err!("{line}"),
    };
    let observer = |e: &BuildEvent<'_>| {
        if quiet {
            return;
        }
        match e {
            BuildEvent::Started { node } => match &bar {
                Some(b) => b.set_message(format!("running {}", graph.display_name(*node))),
                None => err!("  running  {}", graph.display_name(*node)),
            },
            BuildEvent::Finished { node, outcome } => {
                if let Some(b) = &bar {
                    b.inc(1);
                }
                match outcome {
                    Outcome::Built { duration } => say(format!("  built    {} ({:.1?})", graph.display_name(*node), duration)),
                    Outcome::Failed { .. } => say(format!("  FAILED   {}", graph.display_name(*node))),
                    _ => {}
                }
            }
        }
    };
    let outputs = if a.copy_outputs { OutputMode::Copy } else { OutputMode::default() };
    let opts = BuildOptions { force, observer: Some(&observer), no_run: mode == Mode::Pull, publish_fresh: mode == Mode::Push, outputs };
    let report = engine.build(&graph, &opts)?;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }

    let dirs: Vec<&Path> = runs.iter().map(|(d, _)| *d).collect();
    let saved = report::saved_rows(&engine, &dirs)?;
    let by_label = report.by_label();
    let mut rows = Vec::new();
    let mut json_rows = Vec::new();
    let mut changed = Vec::new();
    for (((dir, run), p), saved) in runs.iter().zip(&planned).zip(saved) {
        let nodes = by_label.get(p.label.as_str()).map(Vec::as_slice).unwrap_or_default();
        let outputs = report::RunOutputs::new(&engine, &report, p);
        let row = report::build_row(&report, nodes, &dir.display().to_string(), p, &outputs, saved.clone());
        if let Some(error) = &row.error {
            if p.error.is_none() {
                err!("Error: {}: {error}", dir.display());
            }
        }
        if saved.as_ref() != Some(&row) {
            changed.push((*dir, rows.len()));
        }
        if !quiet {
            let mark = if row.result == report::RunResult::Ok { "✓" } else { "✗" };
            out!("{mark} {}: {} stage(s) built, {} fresh", dir.display(), row.stages_built, row.stages_fresh);
            let o = outputs.get();
            if o.published {
                out!("  model: {}", run.onnx_dir().join("model.onnx").display());
            }
            if let Some(par) = &o.parity {
                out!("  {}", par.line());
            }
            if let Some(c) = &o.comparison {
                for line in c.table().lines() {
                    out!("  {line}");
                }
            }
        }
        if a.json {
            // The report's row, with the details a script may want besides: every stage's
            // outcome, the comparison and the parity check in full, the model's path.
            let o = outputs.get();
            let mut details = serde_json::to_value(&row)?;
            details["stages"] =
                nodes.iter().map(|n| serde_json::json!({ "stage": n.stage, "outcome": outcome_name(&n.outcome) })).collect();
            details["comparison"] = serde_json::to_value(&o.comparison)?;
            details["parity_check"] = serde_json::to_value(&o.parity)?;
            details["onnx_model"] =
                if o.published { run.onnx_dir().join("model.onnx").display().to_string().into() } else { serde_json::Value::Null };
            json_rows.push(details);
        }
        rows.push(row);
    }
    for (dir, error) in &unlocated {
        changed.push((*dir, rows.len()));
        rows.push(report::RunRow::failed(&dir.display().to_string(), error.clone()));
    }
    let to_save: Vec<(&Path, &report::RunRow)> = changed.iter().map(|(dir, i)| (*dir, &rows[*i])).collect();
    if let Err(e) = report::save_rows(&engine, &to_save) {
        // The build itself is done; only `mkonnx report` loses these rows.
        err!("warning: could not save the run reports in the store: {e:#}");
    }

    let remote = engine.remote().map(|r| (r.url(), r.stats()));
    if let (Some((url, s)), false) = (&remote, a.json) {
        err!(
            "remote {url} ({}): {} hit(s), {} miss(es), {} upload(s) ({} blob(s), {:.1} MB up, {:.1} MB down), {} race(s) lost ({} adopted), {} error(s)",
            s.state,
            s.hits,
            s.misses,
            s.uploads,
            s.blobs_uploaded,
            s.bytes_uploaded as f64 / 1e6,
            s.bytes_downloaded as f64 / 1e6,
            s.races_lost,
            s.adopted,
            s.errors
        );
    }
    if a.json {
        json_rows.extend(rows[json_rows.len()..].iter().map(serde_json::to_value).collect::<Result<Vec<_>, _>>()?);
        let mut json = serde_json::json!({ "ok": report::all_ok(&rows), "runs": json_rows, "elapsed_s": report.elapsed.as_secs_f64() });
        if let Some((url, stats)) = &remote {
            json["remote"] = serde_json::to_value(stats)?;
            json["remote"]["url"] = (*url).into();
        }
        out!("{}", serde_json::to_string_pretty(&json)?);
    } else if run_dirs.len() > 1 {
        out_raw!("\n{}", report::render(&rows, report::Format::Text));
    } else if !quiet {
        let ok = rows.iter().filter(|r| r.result == report::RunResult::Ok).count();
        out!("{ok} of {} run(s) succeeded in {:.1?}", rows.len(), report.elapsed);
    }
    // A push that could not write (read-only credentials, an unreachable remote) shared
    // nothing: the warning said why, the exit status says it failed.
    let push_failed = mode == Mode::Push && remote.as_ref().is_some_and(|(_, s)| s.state != "read-write");
    if push_failed {
        err!("Error: push: the remote could not be written; nothing more was uploaded");
    }
    Ok(if report::all_ok(&rows) && !push_failed { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// `mkonnx report`: the saved rows of the runs, checked against their inputs now.
fn report_command(a: &ReportArgs) -> anyhow::Result<ExitCode> {
    let engine = Engine::open(&store_dir(a.store.store.as_deref())?, crate::build_identity())?;
    let runs: Vec<&Path> = a.run_dirs.iter().map(PathBuf::as_path).collect();
    let rows = report::report_rows(&engine, &runs, a.checkpoint_path.as_deref())?;
    out_raw!("{}", report::render(&rows, a.format));
    Ok(if report::all_ok(&rows) { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// A directory's base name, for messages and keys (never its absolute path).
fn dir_name(dir: &Path) -> String {
    std::path::absolute(dir)
        .ok()
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| dir.display().to_string())
}

/// One word per outcome, for `--json`.
fn outcome_name(o: &Outcome) -> &'static str {
    match o {
        Outcome::Fresh => "fresh",
        Outcome::Restored { .. } => "restored",
        Outcome::Built { .. } => "built",
        Outcome::Failed { .. } => "failed",
        Outcome::Skipped { .. } => "skipped",
    }
}
