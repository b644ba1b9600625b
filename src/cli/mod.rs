//! The `mkonnx` command line: argument handling, the store location, progress and reports.

pub mod args;

use crate::data::dataset::Dataset;
use crate::data::run_dir::RunDir;
use crate::engine::{BuildEvent, BuildOptions, Engine, Force, Outcome};
use crate::stages::{plan, BuildRequest, Device};
use anyhow::Context;
use args::{BuildArgs, Cli, Command, DeviceArg};
use clap::Parser;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Runs the command line; the binary's `main` is only this.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("Error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Build(a) => build(&a, Mode::Build),
        Command::Status(a) => build(&a, Mode::Status),
        Command::Graph(a) => build(&a, Mode::Graph),
        Command::Gc(s) => {
            let engine = Engine::open(&store_dir(s.store.as_deref())?, tool_version())?;
            let r = engine.gc(&crate::engine::GcOptions { prune_missing: true })?;
            println!(
                "gc: {} result(s) and {} blob(s) deleted, {:.1} MB freed",
                r.results_deleted,
                r.blobs_deleted,
                r.bytes_freed as f64 / 1e6
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::CocoEval(a) => {
            let m = crate::eval::coco::evaluate_files(&a.ground_truth, &a.predictions)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&m)?);
            } else {
                print!("{}", crate::eval::coco::summary_text(&m));
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
}

/// The version that enters every stage key: a new mkonnx rebuilds everything.
fn tool_version() -> String {
    format!("mkonnx {}", env!("CARGO_PKG_VERSION"))
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
        eprintln!("Error: {message}");
        return Ok(ExitCode::from(2));
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
    let mut failed_runs = Vec::new();
    for dir in &a.run_dirs {
        match RunDir::locate(dir, a.checkpoint_path.as_deref()) {
            Ok(r) => runs.push(r),
            Err(e) => {
                eprintln!("Error: {e}");
                failed_runs.push((dir.display().to_string(), e.to_string()));
            }
        }
    }

    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let jobs = a.jobs.unwrap_or(cpus).max(1);
    let threads = (cpus / jobs).max(1);
    let device = match a.device {
        DeviceArg::Cpu => Device::Cpu,
        DeviceArg::Cuda => {
            // Fail before any work when no GPU can run the PyTorch side.
            crate::runtime::pytorch::check_device(Device::Cuda)?;
            Device::Cuda
        }
    };
    let req = BuildRequest {
        runs,
        dataset,
        image_input: a.image_input.clone(),
        evaluate: a.evaluate_converted_model,
        parity: !a.no_parity_check,
        keep_failed_parity: a.keep_failed_parity,
        device,
        threads,
        visualizations: a.visualizations,
        vis_score_thresh: a.vis_score_thresh,
    };
    let (graph, planned) = plan(&req)?;
    let engine = Engine::open(&store_dir(a.store.store.as_deref())?, tool_version())?.with_jobs(jobs);
    let force = if a.force { Force::All } else { Force::Nothing };

    if mode == Mode::Graph {
        let status = engine.status(&graph, &force)?;
        print!("{}", graph.to_dot(Some(&status)));
        return Ok(ExitCode::SUCCESS);
    }
    if mode == Mode::Status || a.dry_run {
        let status = engine.status(&graph, &force)?;
        print!("{status}");
        return Ok(ExitCode::SUCCESS);
    }

    let quiet = a.quiet || a.json;
    // On a terminal: a progress bar over the graph's stages, with a line per stage built;
    // elsewhere (CI logs): plain lines; with --quiet or --json: nothing.
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
        None => eprintln!("{line}"),
    };
    let observer = |e: &BuildEvent<'_>| {
        if quiet {
            return;
        }
        match e {
            BuildEvent::Started { node } => match &bar {
                Some(b) => b.set_message(format!("running {}", graph.display_name(*node))),
                None => eprintln!("  running  {}", graph.display_name(*node)),
            },
            BuildEvent::Finished { node, outcome } => {
                if let Some(b) = &bar {
                    b.inc(1);
                }
                match outcome {
                    Outcome::Built { duration } => say(format!("  built    {} ({:.1?})", graph.display_name(*node), duration)),
                    Outcome::Failed { error } => say(format!("  FAILED   {}: {error:#}", graph.display_name(*node))),
                    _ => {}
                }
            }
        }
    };
    let report = engine.build(&graph, &BuildOptions { force, observer: Some(&observer) })?;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }

    let mut all_ok = failed_runs.is_empty();
    let mut json_runs = Vec::new();
    for (run, p) in req.runs.iter().zip(&planned) {
        let nodes: Vec<_> = report.nodes.iter().filter(|n| n.labels.contains(&p.label)).collect();
        let ok = nodes.iter().all(|n| n.outcome.is_ok());
        all_ok &= ok;
        let parity_failed = p.parity.is_some_and(|h| matches!(report.get(h).outcome, Outcome::Failed { .. }));
        if parity_failed && !a.keep_failed_parity {
            // A model that disagrees with PyTorch is not left where deployments pick it up.
            let _ = std::fs::remove_file(run.onnx_dir().join("model.onnx"));
        }
        let built = nodes.iter().filter(|n| matches!(n.outcome, Outcome::Built { .. })).count();
        let fresh = nodes.iter().filter(|n| matches!(n.outcome, Outcome::Fresh | Outcome::Restored { .. })).count();
        let parity = p.parity.and_then(|h| read_artifact::<crate::stages::parity::ParityReport>(&engine, &report, h, "parity.json"));
        let comparison = p.compare.and_then(|h| read_artifact::<crate::eval::compare::Comparison>(&engine, &report, h, "comparison.json"));
        if !quiet {
            println!("{} {}: {} stage(s) built, {} fresh", if ok { "✓" } else { "✗" }, p.label, built, fresh);
            if ok {
                println!("  model: {}", run.onnx_dir().join("model.onnx").display());
            }
            if let Some(par) = &parity {
                println!("  {}", par.line());
            }
            if let Some(c) = &comparison {
                for line in c.table().lines() {
                    println!("  {line}");
                }
            }
            for n in nodes.iter().filter(|n| !n.outcome.is_ok()) {
                if let Outcome::Failed { error } = &n.outcome {
                    println!("  failed: {}: {error:#}", n.name);
                }
            }
        }
        json_runs.push(serde_json::json!({
            "run": p.label, "ok": ok, "stages_built": built, "stages_fresh": fresh,
            "onnx_model": run.onnx_dir().join("model.onnx"),
            "parity": parity, "comparison": comparison,
            "stages": nodes.iter().map(|n| serde_json::json!({ "stage": n.stage, "outcome": outcome_name(&n.outcome) })).collect::<Vec<_>>(),
            "errors": nodes.iter().filter_map(|n| match &n.outcome { Outcome::Failed { error } => Some(format!("{}: {error:#}", n.name)), _ => None }).collect::<Vec<_>>(),
        }));
    }
    for (dir, e) in &failed_runs {
        json_runs.push(serde_json::json!({ "run": dir, "ok": false, "errors": [e] }));
    }
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({ "ok": all_ok, "runs": json_runs, "elapsed_s": report.elapsed.as_secs_f64() })
            )?
        );
    } else if !quiet {
        let n = a.run_dirs.len();
        println!("{} of {n} run(s) succeeded in {:.1?}", n - json_runs.iter().filter(|r| r["ok"] == false).count(), report.elapsed);
    }
    Ok(if all_ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
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

/// Reads a JSON artifact of a node that built or was fresh in this report.
fn read_artifact<T: for<'de> serde::Deserialize<'de>>(
    engine: &Engine,
    report: &crate::engine::BuildReport,
    node: crate::engine::NodeHandle,
    artifact: &str,
) -> Option<T> {
    let key = report.get(node).key?;
    let bytes = engine.store().read_artifact(&key, artifact).ok()?;
    serde_json::from_slice(&bytes).ok()
}
