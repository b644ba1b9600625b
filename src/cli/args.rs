//! The command line, as clap derives it. `mkonnx build` keeps `convert_model.sh`'s options.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// mkonnx — convert torchvision FasterRCNN training runs to verified ONNX models.
///
/// A run directory is what `python src/train.py` (Hydra) leaves: `best_model.pth` and
/// `.hydra/config.yaml`. `mkonnx build` writes `<run_dir>/onnx_model/model.onnx`, checks it
/// against the PyTorch model, and with `--evaluate-converted-model` evaluates both on a
/// dataset with COCO metrics and compares them. Every stage is cached by content in a store,
/// so a rerun does only what changed.
#[derive(Debug, Parser)]
#[command(name = "mkonnx", version, about, long_about = None, after_help = EXAMPLES)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

const EXAMPLES: &str = "Examples:
  mkonnx build outputs/2026-02-02/15-15-47 --image-input sample.png
  mkonnx build outputs/*/* --dataset-dir data/triangles_dataset_small --evaluate-converted-model -j 2
  mkonnx status outputs/*/* --dataset-dir data/triangles_dataset_small --evaluate-converted-model
  mkonnx report outputs/*/* --format markdown >> \"$GITHUB_STEP_SUMMARY\"
  mkonnx coco-eval ground_truth_coco.json onnx_predictions.json";

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Convert (and optionally evaluate and compare) one or more runs.
    Build(BuildArgs),
    /// Show which stages of the runs are fresh and why the others would rebuild.
    Status(BuildArgs),
    /// Print the build graph of the runs as Graphviz DOT.
    Graph(BuildArgs),
    /// Show the fleet report of runs (architecture, result, APs, verdict, error) from the
    /// store, without building.
    Report(ReportArgs),
    /// Delete store entries that no run refers to any more.
    Gc(StoreArgs),
    /// Check every blob of the store against its hash (and the database's integrity);
    /// damaged blobs are quarantined so the next build makes them again.
    Verify(StoreArgs),
    /// COCO bbox evaluation of a results file against a ground truth, as pycocotools prints it.
    CocoEval(CocoEvalArgs),
    /// List the runs of a shard (`--shard K/N`), one per line, without building.
    Plan(PlanArgs),
    /// Upload the results of the runs' stages in the local store to the remote (--remote),
    /// building what is missing first.
    Push(BuildArgs),
    /// Download the runs' results from the remote (--remote) and write their outputs; never
    /// runs a stage (a stage nobody built fails).
    Pull(BuildArgs),
    /// The remote store: check it, or collect its garbage.
    #[command(subcommand)]
    Remote(RemoteCommand),
}

/// `mkonnx remote ...`.
#[derive(Debug, Subcommand)]
pub enum RemoteCommand {
    /// Read, write and conditional-put probes against the remote.
    Check(RemoteArgs),
    /// Mark and sweep: delete blobs no record names (older than --grace-hours), and records
    /// older than --max-record-age-days when given.
    Gc(RemoteGcArgs),
}

/// The remote store shared between machines.
#[derive(Debug, Args, Clone)]
pub struct RemoteArgs {
    /// Remote store: s3://bucket/prefix, gs://bucket/prefix, az://container/prefix or
    /// file:///dir. Credentials the standard way (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL,
    /// AWS_ALLOW_HTTP=true for plain http, GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_*...).
    #[arg(long, value_name = "URL", env = "MKONNX_REMOTE")]
    pub remote: Option<String>,
    /// rw: download results and upload new ones; ro: download only.
    #[arg(long, value_enum, default_value_t = RemoteModeArg::Rw, value_name = "MODE")]
    pub remote_mode: RemoteModeArg,
    /// Fail when the remote cannot be reached, instead of building with the local store only.
    #[arg(long)]
    pub remote_required: bool,
    /// Seconds a blob's upload or download may take (connecting: 5; other requests: 10,
    /// with 2 retries).
    #[arg(long, value_name = "SECS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub remote_timeout: u64,
}

/// Whether the remote is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RemoteModeArg {
    /// Read and write.
    Rw,
    /// Read only.
    Ro,
}

/// Options of `remote gc`.
#[derive(Debug, Args, Clone)]
pub struct RemoteGcArgs {
    /// The remote.
    #[command(flatten)]
    pub remote: RemoteArgs,
    /// Also delete records (stage results) not written for this many days.
    #[arg(long, value_name = "DAYS")]
    pub max_record_age_days: Option<u64>,
    /// Blobs younger than this are kept even if no record names them (an upload whose record
    /// is not written yet).
    #[arg(long, value_name = "HOURS", default_value_t = 24)]
    pub grace_hours: u64,
}

/// Which runs of the command line this process takes (job arrays).
#[derive(Debug, Args, Clone)]
pub struct ShardArgs {
    /// Take only shard K of N (K from 0): the runs whose id (path relative to --shard-root)
    /// hashes to K. `auto`: from SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT, or
    /// JOB_COMPLETION_INDEX with --shard-count.
    #[arg(long, value_name = "K/N|auto")]
    pub shard: Option<String>,
    /// Number of shards for `--shard auto` in a Kubernetes Indexed Job (its completions).
    #[arg(long, value_name = "N", env = "MKONNX_SHARD_COUNT", value_parser = clap::value_parser!(u64).range(1..))]
    pub shard_count: Option<u64>,
    /// Directory that run ids are relative to (default: the current directory). Every task
    /// of an array must use the same.
    #[arg(long, value_name = "DIR", default_value = ".")]
    pub shard_root: PathBuf,
}

/// Options of `plan`.
#[derive(Debug, Args, Clone)]
pub struct PlanArgs {
    /// Training run directories.
    #[arg(value_name = "RUN_DIR", required = true)]
    pub run_dirs: Vec<PathBuf>,
    /// Sharding.
    #[command(flatten)]
    pub shard: ShardArgs,
}

/// Where the cache lives.
#[derive(Debug, Args, Clone)]
pub struct StoreArgs {
    /// Store directory (default: $MKONNX_STORE, else the user's cache directory).
    #[arg(long, value_name = "DIR", global = true)]
    pub store: Option<PathBuf>,
}

/// Which device runs the PyTorch model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    /// The CPU.
    Cpu,
    /// The first CUDA GPU libtorch sees.
    Cuda,
}

/// Options of `build`, `status` and `graph`.
#[derive(Debug, Args, Clone)]
pub struct BuildArgs {
    /// Training run directories (each with best_model.pth and .hydra/config.yaml).
    #[arg(value_name = "RUN_DIR", required = true)]
    pub run_dirs: Vec<PathBuf>,
    /// Dataset directory (dataset.jsonl + data/): its first image is the parity sample, and
    /// it is what `--evaluate-converted-model` evaluates on.
    #[arg(long, value_name = "DIR")]
    pub dataset_dir: Option<PathBuf>,
    /// Image used to check the converted model against the PyTorch model.
    #[arg(long, value_name = "PATH")]
    pub image_input: Option<PathBuf>,
    /// Checkpoint to convert instead of <run_dir>/best_model.pth.
    #[arg(long, value_name = "PATH")]
    pub checkpoint_path: Option<PathBuf>,
    /// Device for the PyTorch model.
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
    /// Evaluate the ONNX model on --dataset-dir and compare it with the PyTorch model.
    #[arg(long)]
    pub evaluate_converted_model: bool,
    /// Skip the PyTorch-vs-ONNX check on the sample image (conversion only, fastest).
    #[arg(long)]
    pub no_parity_check: bool,
    /// Keep the converted model even when the parity check fails (for debugging).
    #[arg(long)]
    pub keep_failed_parity: bool,
    /// Number of visualizations to draw per evaluation.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub visualizations: usize,
    /// Only predictions scoring at least this are drawn in the visualizations (the metrics
    /// use every detection).
    #[arg(long, value_name = "SCORE", default_value_t = 0.3, value_parser = parse_score)]
    pub vis_score_thresh: f32,
    /// Also build an INT8 model (onnx_model/model.int8.onnx, QDQ), calibrated on
    /// --calibration-dir (default: the images of --dataset-dir); with
    /// --evaluate-converted-model it is evaluated and compared too.
    #[arg(long, value_enum, value_name = "PRECISION")]
    pub quantize: Option<QuantizeArg>,
    /// Images to calibrate the INT8 model on (.png/.jpg, the first --calibration-images by
    /// name). Default: the images of --dataset-dir, which flatters the INT8 metrics when the
    /// same dataset is evaluated.
    #[arg(long, value_name = "DIR", requires = "quantize")]
    pub calibration_dir: Option<PathBuf>,
    /// Number of calibration images.
    #[arg(long, value_name = "N", default_value_t = crate::stages::quantize::DEFAULT_CALIBRATION_IMAGES,
          value_parser = parse_calibration_images)]
    pub calibration_images: usize,
    /// How activation ranges are calibrated: the lowest and highest values seen, or the
    /// 99.999th percentile of their magnitudes (clips outliers).
    #[arg(long, value_enum, value_name = "METHOD", default_value_t = crate::onnx::quantize::CalibrationMethod::Minmax)]
    pub calibration_method: crate::onnx::quantize::CalibrationMethod,
    /// Stages to run at once (default: the number of CPUs).
    #[arg(short = 'j', long = "jobs", value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub jobs: Option<u16>,
    /// Intra-op threads of ONNX Runtime and libtorch in each model stage (default: CPUs /
    /// jobs, at least 1). Part of those stages' keys (the last bits of results depend on
    /// it): machines sharing a remote store share model stages only with the same value, so
    /// give them all the same `--threads`.
    #[arg(long, value_name = "N", env = "MKONNX_THREADS", value_parser = clap::value_parser!(u16).range(1..))]
    pub threads: Option<u16>,
    /// Write every output as an independent, writable copy. By default outputs of 1 MiB and
    /// more (the models) are hard links to the store's read-only copies when both are on one
    /// filesystem (no second copy of each model on disk); smaller ones are copies.
    #[arg(long, env = "MKONNX_COPY_OUTPUTS", value_parser = clap::builder::FalseyValueParser::new())]
    pub copy_outputs: bool,
    /// Rebuild every stage even when it is fresh.
    #[arg(long)]
    pub force: bool,
    /// Show what would be rebuilt and why, without building (same as `mkonnx status`).
    #[arg(long)]
    pub dry_run: bool,
    /// No progress bars, per-stage lines or per-run details (errors still go to stderr, and
    /// a build of several runs still ends with its report).
    #[arg(short, long)]
    pub quiet: bool,
    /// Print a machine-readable JSON summary on stdout.
    #[arg(long)]
    pub json: bool,
    /// Store options.
    #[command(flatten)]
    pub store: StoreArgs,
    /// Remote store options.
    #[command(flatten)]
    pub remote: RemoteArgs,
    /// Sharding.
    #[command(flatten)]
    pub shard: ShardArgs,
}

/// The precisions `--quantize` offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QuantizeArg {
    /// 8-bit integers (QDQ; weights per channel, activations per tensor).
    Int8,
}

/// Options of `report`.
#[derive(Debug, Args, Clone)]
pub struct ReportArgs {
    /// Training run directories, as given to `mkonnx build`.
    #[arg(value_name = "RUN_DIR", required = true)]
    pub run_dirs: Vec<PathBuf>,
    /// Output format: an aligned table, Markdown (CI job summaries) or JSON.
    #[arg(long, value_enum, default_value_t = crate::cli::report::Format::Text)]
    pub format: crate::cli::report::Format,
    /// Checkpoint the runs were built from instead of <run_dir>/best_model.pth.
    #[arg(long, value_name = "PATH")]
    pub checkpoint_path: Option<PathBuf>,
    /// Store options.
    #[command(flatten)]
    pub store: StoreArgs,
}

/// Options of `coco-eval`.
#[derive(Debug, Args, Clone)]
pub struct CocoEvalArgs {
    /// COCO ground truth JSON.
    pub ground_truth: PathBuf,
    /// COCO results JSON (a list of {image_id, category_id, bbox, score}).
    pub predictions: PathBuf,
    /// Print the 12 stats as JSON instead of pycocotools' text.
    #[arg(long)]
    pub json: bool,
}

impl BuildArgs {
    /// Checks the option combinations `convert_model.sh` rejected, with its wording.
    pub fn validate(&self) -> Result<(), String> {
        if self.evaluate_converted_model && self.dataset_dir.is_none() {
            return Err("--evaluate-converted-model requires --dataset-dir".into());
        }
        if self.image_input.is_none() && self.dataset_dir.is_none() {
            return Err("Either --image-input or --dataset-dir must be provided".into());
        }
        if self.quantize.is_some() && self.calibration_dir.is_none() && self.dataset_dir.is_none() {
            return Err("--quantize needs calibration images: give --calibration-dir or --dataset-dir".into());
        }
        Ok(())
    }
}

/// A number of calibration images: 1 to 100 000.
fn parse_calibration_images(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(n) if (1..=100_000).contains(&n) => Ok(n),
        Ok(n) => Err(format!("{n} calibration images: use 1 to 100000")),
        Err(e) => Err(format!("{e}: use a number of images from 1 to 100000")),
    }
}

/// A score threshold: a number in [0, 1] (NaN and infinities refused, so that no two spellings
/// of "nothing" reach a stage key as the same JSON `null`).
fn parse_score(text: &str) -> Result<f32, String> {
    match text.trim().parse::<f32>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        Ok(v) => Err(format!("{v} is not a score: use a number from 0 to 1")),
        Err(e) => Err(format!("{e}: use a number from 0 to 1")),
    }
}
