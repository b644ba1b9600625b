//! The INT8 stages of `--quantize int8`: `calibrate` (activation ranges of the float32
//! model over the calibration images, in ONNX Runtime), `quantize` (the QDQ model,
//! `onnx_model/model.int8.onnx`) and `evaluate_int8` (COCO metrics and latency of the INT8
//! model in ONNX Runtime with its default optimizations, which fuse QDQ into integer kernels).
//! `compare` then gives the INT8 column.

use super::evaluate::{evaluate_dataset, EvaluationInputs, EvaluationOptions, LatencyProbe};
use super::wiring::{CalibrationRanges, Evaluation, Int8Model, Int8Side, OnnxModel, Produces, Upstream};
use crate::engine::NodeHandle;
use crate::engine::{Stage, StageContext};
use crate::onnx::quantize::{self, CalibrationMethod, QuantizeSummary, Range, RangeCollector};
use crate::runtime::onnx::{OnnxDetector, Optimization};
use crate::runtime::RgbImage;
use anyhow::Context;
use prost::Message;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Default number of calibration images (`--calibration-images`).
pub const DEFAULT_CALIBRATION_IMAGES: usize = 64;

/// File extensions of calibration images taken from a `--calibration-dir`.
const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// How the INT8 model is calibrated: what the user asked for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CalibrationSettings {
    /// Range method.
    pub method: CalibrationMethod,
    /// Images asked for.
    pub images: usize,
    /// Where the images come from, in words (`the evaluation dataset <name>` or
    /// `calibration directory <name>`; never an absolute path: it is in keys).
    pub source: String,
    /// Whether they are the evaluation dataset's own images.
    pub from_evaluation_set: bool,
}

impl CalibrationSettings {
    /// One line for the summary, the comparison and the terminal.
    pub fn statement(&self) -> String {
        let method = match self.method {
            CalibrationMethod::Minmax => "min-max".to_string(),
            CalibrationMethod::Percentile => format!("percentile {}", quantize::PERCENTILE),
        };
        let mut s = format!("{method} ranges over up to {} image(s) of {}", self.images, self.source);
        if self.from_evaluation_set {
            s += " (note: calibrating on the evaluation set flatters the INT8 metrics; pass --calibration-dir with other images of the same domain)";
        }
        s
    }
}

/// The calibration images: the first `n` of `dir` (see [`calibration_images_in`]) when
/// given, else the first `n` distinct images of the dataset, in its index order.
pub fn calibration_images(dir: Option<&Path>, dataset: &crate::data::dataset::Dataset, n: usize) -> anyhow::Result<Vec<PathBuf>> {
    if let Some(dir) = dir {
        return calibration_images_in(dir, n);
    }
    let mut seen = std::collections::HashSet::new();
    let images: Vec<PathBuf> =
        dataset.images.iter().filter(|i| seen.insert(i.image.clone())).map(|i| dataset.image_path(i)).take(n).collect();
    anyhow::ensure!(!images.is_empty(), "the dataset {} has no images to calibrate on", dataset.dir.display());
    Ok(images)
}

/// The first `n` images (.png, .jpg, .jpeg) of `dir`, sorted by name.
pub fn calibration_images_in(dir: &Path, n: usize) -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read the calibration directory {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension().and_then(|e| e.to_str()).is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        })
        .collect();
    files.sort();
    anyhow::ensure!(!files.is_empty(), "the calibration directory {} holds no .png or .jpg image", dir.display());
    files.truncate(n);
    Ok(files)
}

/// The file-input name of the `i`-th calibration image (`calib:0003:name.png`): its position
/// is part of the key, since the images are visited in the order they were chosen in.
fn calibration_input_name(i: usize, path: &Path) -> String {
    format!("calib:{i:04}:{}", file_name(path))
}

fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// `calibration.json`: the activation ranges and what they came from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// The settings.
    pub settings: CalibrationSettings,
    /// The images used, by file name, in order.
    pub images: Vec<String>,
    /// Range of every activation tensor to quantize.
    pub ranges: BTreeMap<String, Range>,
}

/// Stage `calibrate`: runs the float32 model (BatchNorm folded, as it will be quantized) in
/// ONNX Runtime over the calibration images with every activation to quantize as an extra
/// output, and records each one's range.
pub struct Calibrate {
    /// Method, count and source.
    pub settings: CalibrationSettings,
    /// ONNX Runtime intra-op threads (in the key: the last bits of activations depend on it).
    pub threads: usize,
    /// The float32 model.
    pub onnx: Upstream<OnnxModel>,
    /// The calibration images, in the order they are visited.
    pub images: Vec<PathBuf>,
}

impl Stage for Calibrate {
    fn name(&self) -> &'static str {
        "calibrate"
    }
    fn version(&self) -> u32 {
        1
    }
    fn params(&self) -> serde_json::Value {
        serde_json::json!({ "settings": self.settings, "threads": self.threads })
    }
    fn inputs(&self) -> Vec<(&'static str, NodeHandle)> {
        vec![self.onnx.wire()]
    }
    fn files(&self) -> Vec<(String, PathBuf)> {
        self.images.iter().enumerate().map(|(i, path)| (calibration_input_name(i, path), path.clone())).collect()
    }
    fn run(&self, ctx: &mut StageContext<'_>) -> anyhow::Result<()> {
        let onnx_path = self.onnx.model(ctx)?;
        let model = crate::onnx::proto::ModelProto::decode(std::fs::read(&onnx_path)?.as_slice())
            .with_context(|| format!("{} is not an ONNX model", onnx_path.display()))?;
        let (prepared, _) = quantize::prepare(&model)?;
        let plan = quantize::plan(&prepared)?;
        let probed = crate::onnx::encode(&quantize::with_outputs(&prepared, &plan.activations)?);
        let images: Vec<(String, PathBuf)> = self
            .files()
            .into_iter()
            .zip(&self.images)
            .map(|((input, _), path)| Ok((file_name(path), ctx.input_file(&input)?.to_path_buf())))
            .collect::<anyhow::Result<_>>()?;
        let mut collectors = vec![RangeCollector::new(self.settings.method); plan.activations.len()];
        let mut load = images.iter().map(|(_, path)| RgbImage::load(path));
        crate::runtime::onnx::visit_tensors(&probed, &onnx_path, self.threads, &mut load, &plan.activations, &mut |i, values| {
            collectors[i].add(values)
        })?;
        let mut ranges = BTreeMap::new();
        for (name, c) in plan.activations.iter().zip(&collectors) {
            ranges.insert(name.clone(), c.range().with_context(|| format!("activation {name} had no values on the calibration images"))?);
        }
        let calibration =
            Calibration { settings: self.settings.clone(), images: images.into_iter().map(|(name, _)| name).collect(), ranges };
        ctx.write_output(CalibrationRanges::FILE, serde_json::to_vec_pretty(&calibration)?)?;
        Ok(())
    }
}

impl Produces for Calibrate {
    type Product = CalibrationRanges;
}

/// `quantization.json`: how the INT8 model was made.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuantizationReport {
    /// Calibration settings.
    pub calibration: CalibrationSettings,
    /// Calibration images actually used.
    pub calibration_images: Vec<String>,
    /// What the pass quantized.
    pub summary: QuantizeSummary,
}

/// Stage `quantize`: `model.int8.onnx` from the float32 model and the calibration.
pub struct Quantize {
    /// The float32 model.
    pub onnx: Upstream<OnnxModel>,
    /// Its activation ranges.
    pub calibration: Upstream<CalibrationRanges>,
}

impl Stage for Quantize {
    fn name(&self) -> &'static str {
        "quantize"
    }
    fn version(&self) -> u32 {
        1
    }
    fn inputs(&self) -> Vec<(&'static str, NodeHandle)> {
        vec![self.onnx.wire(), self.calibration.wire()]
    }
    fn run(&self, ctx: &mut StageContext<'_>) -> anyhow::Result<()> {
        let onnx_path = self.onnx.model(ctx)?;
        let model = crate::onnx::proto::ModelProto::decode(std::fs::read(&onnx_path)?.as_slice())
            .with_context(|| format!("{} is not an ONNX model", onnx_path.display()))?;
        let calibration = self.calibration.calibration(ctx)?;
        let (prepared, folded) = quantize::prepare(&model)?;
        let (int8, summary) = quantize::quantize(&prepared, folded, &calibration.ranges)?;
        ctx.write_output_with(Int8Model::FILE, |w| crate::onnx::write_model(&int8, w))?;
        let report = QuantizationReport { calibration: calibration.settings, calibration_images: calibration.images, summary };
        ctx.write_output(Int8Model::REPORT, serde_json::to_vec_pretty(&report)?)?;
        Ok(())
    }
}

impl Produces for Quantize {
    type Product = Int8Model;
}

/// What INT8 latency measures (see [`crate::eval::latency`]).
pub const INT8_LATENCY: &str = "ONNX Runtime, default graph optimizations (QDQ fused into integer kernels), CPU; \
     wall time of one run call incl. input/output copies";

/// Stage `evaluate_int8`: the INT8 model in ONNX Runtime (default optimizations) over the
/// dataset, with its latency.
pub struct EvaluateInt8 {
    /// Pictures, threads.
    pub options: EvaluationOptions,
    /// The resolved model and the ground truth.
    pub inputs: EvaluationInputs,
    /// The model evaluated.
    pub int8: Upstream<Int8Model>,
}

impl Stage for EvaluateInt8 {
    fn name(&self) -> &'static str {
        "evaluate_int8"
    }
    fn version(&self) -> u32 {
        1
    }
    fn params(&self) -> serde_json::Value {
        self.options.params()
    }
    fn inputs(&self) -> Vec<(&'static str, NodeHandle)> {
        let mut inputs = self.inputs.wire().to_vec();
        inputs.push(self.int8.wire());
        inputs
    }
    fn run(&self, ctx: &mut StageContext<'_>) -> anyhow::Result<()> {
        let EvaluationOptions { visualizations, vis_score_thresh, threads } = self.options;
        let info = self.inputs.model.info(ctx)?;
        let model = self.int8.model(ctx)?;
        let detector = OnnxDetector::load_with(&model, threads, Optimization::Deployed)?;
        let probe = LatencyProbe { threads, measured: INT8_LATENCY.into(), run: &mut |b| detector.time(b) };
        evaluate_dataset::<Int8Side>(ctx, &self.inputs, &info, visualizations, vis_score_thresh, &|b| Ok(detector.detect(b)?), Some(probe))
    }
}

impl Produces for EvaluateInt8 {
    type Product = Evaluation<Int8Side>;
}
