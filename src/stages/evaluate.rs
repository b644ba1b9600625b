//! Evaluation stages: COCO ground truth, the ONNX and PyTorch evaluations, the user's own
//! PyTorch evaluation, and the comparison.

use super::convert::ModelInfo;
use super::wiring::{
    ComparisonFile, EvaluatedModel, Evaluation, GroundTruthSet, Int8Model, Int8Side, OnnxModel, OnnxSide, Produces, PytorchSide,
    ResolvedModel, Upstream, UserMetrics,
};
use crate::data::dataset::Dataset;
use crate::engine::NodeHandle;
use crate::engine::{Stage, StageContext};
use crate::eval::coco::{self, CocoAnnotation, CocoCategory, CocoDetection, CocoGroundTruth, CocoImage, CocoMetrics};
use crate::eval::compare::{Comparison, DatasetCheck, Headline, Int8Column, LatencyColumns};
use crate::eval::latency::Latency;
use crate::runtime::onnx::{OnnxDetector, Optimization};
use crate::runtime::{Detections, ImageBatch, RgbImage};
use anyhow::Context;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Facts about the evaluated dataset, recorded next to its ground truth.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DatasetInfo {
    /// Dataset name (directory base name).
    pub name: String,
    /// blake3 over the index and every image, in order.
    pub hash: String,
    /// Number of images.
    pub images: usize,
}

/// Node-input name of a dataset's index file.
pub const DATASET_INDEX_INPUT: &str = "dataset.jsonl";

/// The dataset whose index is the stage's `dataset.jsonl` input.
fn dataset_of(ctx: &StageContext<'_>) -> anyhow::Result<Dataset> {
    let index = ctx.input_file(DATASET_INDEX_INPUT)?;
    let dir = index.parent().context("dataset index has no directory")?;
    Ok(Dataset::load(dir)?)
}

/// A dataset's files as file inputs of a node: the index ([`DATASET_INDEX_INPUT`]) and every
/// image once (`image:<path in the index>`), even when several lines name the same image.
#[derive(Clone, Debug)]
pub struct DatasetFiles {
    inputs: Vec<(String, PathBuf)>,
}

impl DatasetFiles {
    /// The files of `ds`.
    pub fn of(ds: &Dataset) -> Self {
        let mut inputs = vec![(DATASET_INDEX_INPUT.to_string(), ds.dir.join(crate::data::dataset::INDEX_FILE))];
        let mut seen = std::collections::HashSet::new();
        for img in ds.images.iter().filter(|img| seen.insert(img.image.as_str())) {
            inputs.push((format!("image:{}", img.image), ds.image_path(img)));
        }
        DatasetFiles { inputs }
    }

    /// (input name, path) of each file.
    pub fn inputs(&self) -> &[(String, PathBuf)] {
        &self.inputs
    }

    /// blake3 over the files' names and content hashes, in name order.
    fn hash(&self, ctx: &StageContext<'_>) -> anyhow::Result<String> {
        let mut names: Vec<&str> = self.inputs.iter().map(|(name, _)| name.as_str()).collect();
        names.sort();
        let mut h = blake3::Hasher::new_derive_key("mkonnx.dataset.v1");
        for name in names {
            h.update(name.as_bytes());
            h.update(ctx.input_file_hash(name)?.as_bytes());
        }
        Ok(h.finalize().to_hex().to_string())
    }
}

/// Stage `ground_truth`: `ground_truth_coco.json` from `dataset.jsonl`, categories named
/// from the config's class names. Shared by every run with the same dataset and classes.
pub struct GroundTruth {
    /// Foreground class names (label 1 first); labels past the list are named `class_<n>`.
    pub class_names: Vec<String>,
    /// The dataset's files.
    pub dataset: DatasetFiles,
}

impl Stage for GroundTruth {
    fn name(&self) -> &'static str {
        "ground_truth"
    }
    fn version(&self) -> u32 {
        1
    }
    fn params(&self) -> serde_json::Value {
        serde_json::json!({ "class_names": self.class_names })
    }
    fn files(&self) -> Vec<(String, PathBuf)> {
        self.dataset.inputs().to_vec()
    }
    fn run(&self, ctx: &mut StageContext<'_>) -> anyhow::Result<()> {
        let ds = dataset_of(ctx)?;
        let gt = ground_truth(&ds, &self.class_names)?;
        let info = DatasetInfo { name: ds.name.clone(), hash: self.dataset.hash(ctx)?, images: ds.images.len() };
        ctx.write_output(GroundTruthSet::COCO, serde_json::to_vec_pretty(&gt)?)?;
        ctx.write_output(GroundTruthSet::DATASET, serde_json::to_vec_pretty(&info)?)?;
        Ok(())
    }
}

impl Produces for GroundTruth {
    type Product = GroundTruthSet;
}

/// COCO ground truth of a dataset. Annotation ids start at 1 (pycocotools treats id 0 as
/// "unmatched"); area is w·h; image sizes come from the line or the image header.
/// Categories are 1..=max(names, largest label): categories without ground truth do not
/// change COCO's means, and every labelled class must be listed.
pub fn ground_truth(ds: &Dataset, class_names: &[String]) -> anyhow::Result<CocoGroundTruth> {
    let sizes: Vec<(u32, u32)> = ds
        .images
        .par_iter()
        .map(|img| match (img.width, img.height) {
            (Some(w), Some(h)) => Ok((w, h)),
            // The decoders' own header read (by content, with their pixel limit).
            _ => Ok(crate::runtime::image_size(&ds.image_path(img))?),
        })
        .collect::<anyhow::Result<_>>()?;
    let mut gt = CocoGroundTruth::default();
    for (img, (w, h)) in ds.images.iter().zip(sizes) {
        gt.images.push(CocoImage { id: img.id as i64, file_name: Some(img.image.clone()), width: Some(w), height: Some(h) });
        for (b, &label) in img.boxes.iter().zip(&img.labels) {
            let (bw, bh) = (b[2] - b[0], b[3] - b[1]);
            gt.annotations.push(CocoAnnotation {
                id: gt.annotations.len() as i64 + 1,
                image_id: img.id as i64,
                category_id: i64::from(label),
                bbox: [b[0], b[1], bw, bh],
                area: bw * bh,
                iscrowd: false,
                ignore: None,
            });
        }
    }
    let max_label = ds.images.iter().flat_map(|i| i.labels.iter().copied()).max().unwrap_or(0) as usize;
    gt.categories = (1..=class_names.len().max(max_label))
        .map(|id| CocoCategory {
            id: id as i64,
            name: class_names.get(id - 1).cloned().unwrap_or_else(|| format!("class_{id}")),
            supercategory: None,
        })
        .collect();
    Ok(gt)
}

/// What an evaluation records besides COCO's stats.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MetricsFile {
    /// COCO metrics (all 12, named).
    #[serde(flatten)]
    pub metrics: CocoMetrics,
    /// Which model was evaluated (`onnx` or `pytorch`).
    pub model: String,
    /// Dataset name, hash and image count.
    pub dataset: DatasetInfo,
    /// Who produced the file; mkonnx's own PyTorch evaluations say `mkonnx`, which tells them
    /// apart from a user's evaluation in the same directory.
    pub producer: String,
    /// Per-image latency of the model as deployed (see [`crate::eval::latency`]). A
    /// measurement: it differs between two runs of the stage, unlike everything else here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency: Option<Latency>,
}

/// How an evaluation times its model for [`MetricsFile::latency`] (the protocol is
/// [`crate::eval::latency`]'s).
pub struct LatencyProbe<'a> {
    /// Intra-op threads of the runtime.
    pub threads: usize,
    /// What is timed: runtime, settings, what the time includes.
    pub measured: String,
    /// Runs one batch and says how long the model took.
    pub run: &'a mut dyn FnMut(&ImageBatch) -> anyhow::Result<std::time::Duration>,
}

/// The inputs every evaluation stage reads: the resolved model (class count, names, and for
/// PyTorch the detector) and the dataset's ground truth.
#[derive(Clone, Copy)]
pub struct EvaluationInputs {
    /// The detector's description.
    pub model: Upstream<ResolvedModel>,
    /// The dataset's COCO ground truth.
    pub ground_truth: Upstream<GroundTruthSet>,
}

impl EvaluationInputs {
    /// Both, for [`crate::engine::Stage::inputs`].
    pub fn wire(&self) -> [(&'static str, NodeHandle); 2] {
        [self.model.wire(), self.ground_truth.wire()]
    }
}

/// Runs `detect` over the dataset and writes model `M`'s metrics and predictions
/// ([`Evaluation`]'s file names), `ground_truth_coco.json` and `visualizations/`; with a
/// `latency` probe, times the model on single images afterwards.
pub fn evaluate_dataset<M: EvaluatedModel>(
    ctx: &mut StageContext<'_>,
    inputs: &EvaluationInputs,
    info: &ModelInfo,
    visualizations: usize,
    vis_score_thresh: f32,
    detect: &(dyn Fn(&ImageBatch) -> anyhow::Result<Vec<Detections>> + Sync),
    latency: Option<LatencyProbe<'_>>,
) -> anyhow::Result<()> {
    let ds = dataset_of(ctx)?;
    ds.check_labels(info.params.num_classes)?;
    let prefix = M::PREFIX;
    let gt_bytes = inputs.ground_truth.coco_bytes(ctx)?;
    let gt: CocoGroundTruth = serde_json::from_slice(&gt_bytes)?;
    let dataset = inputs.ground_truth.dataset(ctx)?;

    // Decode in parallel, then run same-size neighbours as one batch.
    let images: Vec<RgbImage> = ds.images.par_iter().map(|img| RgbImage::load(&ds.image_path(img))).collect::<Result<_, _>>()?;
    let mut detections: Vec<Detections> = Vec::with_capacity(images.len());
    let mut start = 0;
    while start < images.len() {
        let mut end = start + 1;
        while end < images.len()
            && end - start < MAX_BATCH
            && images[end].height == images[start].height
            && images[end].width == images[start].width
        {
            end += 1;
        }
        let refs: Vec<&RgbImage> = images[start..end].iter().collect();
        let batch = ImageBatch::stack(&refs).expect("same-size images stack");
        detections.extend(
            detect(&batch).with_context(|| format!("running the {prefix} model on {}", ds.image_path(&ds.images[start]).display()))?,
        );
        start = end;
    }

    let mut predictions = Vec::new();
    for (img, det) in ds.images.iter().zip(&detections) {
        for ((b, &s), &l) in det.boxes.iter().zip(&det.scores).zip(&det.labels) {
            let [x1, y1, x2, y2] = b.map(f64::from);
            predictions.push(CocoDetection {
                image_id: img.id as i64,
                category_id: l,
                bbox: [x1, y1, x2 - x1, y2 - y1],
                score: f64::from(s),
            });
        }
    }
    let metrics = coco::evaluate(&gt, &predictions)?;
    let latency = match latency {
        Some(probe) => Some(
            crate::eval::latency::measure(&images, probe.threads, &probe.measured, probe.run)
                .with_context(|| format!("timing the {prefix} model"))?,
        ),
        None => None,
    };
    let file = MetricsFile { metrics, model: prefix.into(), dataset, producer: "mkonnx".into(), latency };
    ctx.write_output(&Evaluation::<M>::metrics_file(), serde_json::to_vec_pretty(&file)?)?;
    ctx.write_output(&Evaluation::<M>::predictions_file(), serde_json::to_vec(&predictions)?)?;
    ctx.write_output(GroundTruthSet::COCO, &gt_bytes)?;

    let pictures: Vec<(String, Vec<u8>)> = images
        .par_iter()
        .zip(ds.images.par_iter())
        .zip(detections.par_iter())
        .take(visualizations)
        .enumerate()
        .map(|(i, ((rgb, img), det))| -> anyhow::Result<(String, Vec<u8>)> {
            let png = super::visualize(rgb, det, img, info, vis_score_thresh)?;
            Ok((format!("visualizations/{i:04}_detected.png"), png))
        })
        .collect::<anyhow::Result<_>>()?;
    for (name, png) in pictures {
        ctx.write_output(&name, png)?;
    }
    Ok(())
}

/// Images run together when they have the same size.
const MAX_BATCH: usize = 4;

/// What ONNX latency measures (see [`crate::eval::latency`]).
pub const ONNX_LATENCY: &str =
    "ONNX Runtime, default graph optimizations (as deployed), CPU; wall time of one run call incl. input/output copies";

/// Stage `evaluate_onnx`: the ONNX model in ONNX Runtime over the dataset; metrics from a
/// session without graph optimizations (parity with PyTorch), latency from one with ONNX
/// Runtime's defaults.
pub struct EvaluateOnnx {
    /// Pictures, threads.
    pub options: EvaluationOptions,
    /// The resolved model and the ground truth.
    pub inputs: EvaluationInputs,
    /// The model evaluated.
    pub onnx: Upstream<OnnxModel>,
}

/// The options every evaluation stage (`evaluate_onnx`, `evaluate_pytorch`, `evaluate_int8`)
/// takes from the command line; all of them are in its key.
#[derive(Clone, Copy, Debug)]
pub struct EvaluationOptions {
    /// Pictures to draw.
    pub visualizations: usize,
    /// Lowest score drawn.
    pub vis_score_thresh: f32,
    /// Intra-op threads of the runtime (ONNX Runtime or libtorch). Part of the key: kernels
    /// split their sums by thread, so the last bits of scores and boxes depend on it
    /// (measured: predictions differ between 1 and 2 threads on every fixture architecture).
    pub threads: usize,
}

impl EvaluationOptions {
    /// The stage parameters these options contribute.
    pub fn params(&self) -> serde_json::Value {
        serde_json::json!({ "visualizations": self.visualizations, "vis_score_thresh": self.vis_score_thresh, "threads": self.threads })
    }
}

impl Stage for EvaluateOnnx {
    fn name(&self) -> &'static str {
        "evaluate_onnx"
    }
    fn version(&self) -> u32 {
        2 // 2: latency
    }
    fn params(&self) -> serde_json::Value {
        self.options.params()
    }
    fn inputs(&self) -> Vec<(&'static str, NodeHandle)> {
        let mut inputs = self.inputs.wire().to_vec();
        inputs.push(self.onnx.wire());
        inputs
    }
    fn run(&self, ctx: &mut StageContext<'_>) -> anyhow::Result<()> {
        let EvaluationOptions { visualizations, vis_score_thresh, threads } = self.options;
        let info = self.inputs.model.info(ctx)?;
        let onnx = self.onnx.model(ctx)?;
        let detector = OnnxDetector::load(&onnx, threads)?;
        // The metrics come from the unoptimized session (equal to eager PyTorch); latency
        // from a second session as a user deploys the model.
        let deployed = OnnxDetector::load_with(&onnx, threads, Optimization::Deployed)?;
        let probe = LatencyProbe { threads, measured: ONNX_LATENCY.into(), run: &mut |b| deployed.time(b) };
        evaluate_dataset::<OnnxSide>(ctx, &self.inputs, &info, visualizations, vis_score_thresh, &|b| Ok(detector.detect(b)?), Some(probe))
    }
}

impl Produces for EvaluateOnnx {
    type Product = Evaluation<OnnxSide>;
}

/// Stage `pytorch_metrics_from_user`: the user's own evaluation (`eval_<ds>_<ckpt>/`),
/// normalized. Recognised: a metrics JSON with a `stats` list of 12 (pycocotools order) or
/// the keys AP, AP50, AP75, AR100 (any case; `mAP`, `map`, `map_50`, `map_75`, `mar_100` too).
pub struct UserPytorchMetrics;

impl Stage for UserPytorchMetrics {
    fn name(&self) -> &'static str {
        "pytorch_metrics_from_user"
    }
    fn version(&self) -> u32 {
        1
    }
    fn run(&self, ctx: &mut StageContext<'_>) -> anyhow::Result<()> {
        let path = ctx.input_file("metrics")?.to_path_buf();
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
        let headline = user_headline(&v).with_context(|| {
            format!("{}: no COCO metrics found (expected `stats` with 12 numbers, or AP/AP50/AP75/AR100)", path.display())
        })?;
        ctx.write_output(UserMetrics::FILE, serde_json::to_vec_pretty(&headline)?)?;
        Ok(())
    }
}

impl Produces for UserPytorchMetrics {
    type Product = UserMetrics;
}

/// Reads the headline metrics out of a user's metrics JSON.
pub fn user_headline(v: &serde_json::Value) -> Option<Headline> {
    if let Some(stats) = v.get("stats").and_then(|s| s.as_array()).filter(|s| s.len() == 12) {
        let s: Vec<f64> = stats.iter().filter_map(|x| x.as_f64()).collect();
        if s.len() == 12 {
            return Some(Headline::from_stats(&s.try_into().ok()?));
        }
    }
    let obj = v.as_object()?;
    let find = |names: &[&str]| obj.iter().find(|(k, _)| names.iter().any(|n| k.eq_ignore_ascii_case(n))).and_then(|(_, v)| v.as_f64());
    Some(Headline {
        ap: find(&["AP", "mAP", "map", "bbox_mAP"])?,
        ap50: find(&["AP50", "map_50", "mAP_50", "bbox_mAP_50"])?,
        ap75: find(&["AP75", "map_75", "mAP_75", "bbox_mAP_75"])?,
        ar100: find(&["AR100", "mar_100", "AR@100"])?,
    })
}

/// File input of `compare`: the ground truth of the user's own evaluation, when it has one.
pub const USER_GROUND_TRUTH_INPUT: &str = "user_ground_truth";

/// Where `compare` takes the PyTorch side from.
#[derive(Clone, Copy)]
pub enum PytorchMetrics {
    /// mkonnx's own evaluation on libtorch.
    Evaluated(Upstream<Evaluation<PytorchSide>>),
    /// The user's evaluation in the run directory.
    User {
        /// Its metrics, normalized.
        headline: Upstream<UserMetrics>,
        /// Whether its ground truth is the stage's [`USER_GROUND_TRUTH_INPUT`] file.
        with_ground_truth: bool,
    },
}

/// The INT8 column's inputs.
#[derive(Clone, Copy)]
pub struct Int8Inputs {
    /// The INT8 model's evaluation.
    pub evaluation: Upstream<Evaluation<Int8Side>>,
    /// How the model was made (its calibration).
    pub model: Upstream<Int8Model>,
}

/// Stage `compare`: `comparison.json` from both sides' metrics.
pub struct Compare {
    /// Where the PyTorch metrics come from, for the file ("libtorch (mkonnx)" or a path).
    pub pytorch_source: Option<String>,
    /// The ONNX model's evaluation.
    pub onnx: Upstream<Evaluation<OnnxSide>>,
    /// The PyTorch side.
    pub pytorch: PytorchMetrics,
    /// The INT8 model's column, with `--quantize int8`.
    pub int8: Option<Int8Inputs>,
}

impl Stage for Compare {
    fn name(&self) -> &'static str {
        "compare"
    }
    fn version(&self) -> u32 {
        2 // 2: latency, the INT8 column
    }
    fn params(&self) -> serde_json::Value {
        serde_json::json!({ "pytorch_source": self.pytorch_source })
    }
    fn inputs(&self) -> Vec<(&'static str, NodeHandle)> {
        let pytorch = match self.pytorch {
            PytorchMetrics::Evaluated(e) => e.wire(),
            PytorchMetrics::User { headline, .. } => headline.wire(),
        };
        let mut inputs = vec![self.onnx.wire(), pytorch];
        if let Some(int8) = self.int8 {
            inputs.extend([int8.evaluation.wire(), int8.model.wire()]);
        }
        inputs
    }
    fn run(&self, ctx: &mut StageContext<'_>) -> anyhow::Result<()> {
        let onnx = self.onnx.metrics(ctx)?;
        let ours_gt = self.onnx.ground_truth_bytes(ctx)?;
        let (headline, hash, images, same_gt, pytorch_latency) = match self.pytorch {
            PytorchMetrics::Evaluated(evaluation) => {
                let m = evaluation.metrics(ctx)?;
                let gt = evaluation.ground_truth_bytes(ctx)?;
                (Headline::from_stats(&m.metrics.stats), Some(m.dataset.hash), Some(m.dataset.images), Some(gt == ours_gt), m.latency)
            }
            PytorchMetrics::User { headline, with_ground_truth } => {
                let same_gt = match with_ground_truth {
                    true => Some(same_ground_truth(ctx.input_file(USER_GROUND_TRUTH_INPUT)?, &ours_gt)),
                    false => None,
                };
                (headline.headline(ctx)?, None, None, same_gt, None)
            }
        };
        let consistent = hash.as_ref().is_none_or(|x| *x == onnx.dataset.hash)
            && images.is_none_or(|n| n == onnx.dataset.images)
            && same_gt != Some(false);
        let check = DatasetCheck {
            onnx_dataset_hash: onnx.dataset.hash.clone(),
            pytorch_dataset_hash: hash,
            onnx_images: onnx.dataset.images,
            pytorch_images: images,
            same_ground_truth: same_gt,
            consistent,
        };
        let source = self.pytorch_source.clone().unwrap_or_default();
        let float32 = Headline::from_stats(&onnx.metrics.stats);
        let mut comparison = Comparison::new(float32, Some((headline, source)), check);
        comparison.latency = LatencyColumns { pytorch: pytorch_latency, onnx: onnx.latency.clone(), int8: None };
        if let Some(Int8Inputs { evaluation, model }) = self.int8 {
            let int8 = evaluation.metrics(ctx)?;
            let quantization = model.report(ctx)?;
            comparison.int8 = Some(Int8Column::new(
                Headline::from_stats(&int8.metrics.stats),
                &float32,
                comparison.pytorch.as_ref(),
                quantization.calibration.statement(),
            ));
            comparison.latency.int8 = int8.latency;
        }
        ctx.write_output(ComparisonFile::FILE, serde_json::to_vec_pretty(&comparison)?)?;
        Ok(())
    }
}

impl Produces for Compare {
    type Product = ComparisonFile;
}

/// Whether a user's ground-truth file describes the same images and annotations as ours
/// (compared as COCO content, not bytes: key order and float formatting may differ).
fn same_ground_truth(user: &Path, ours: &[u8]) -> bool {
    let (Ok(u), Ok(o)) = (CocoGroundTruth::from_path(user), serde_json::from_slice::<CocoGroundTruth>(ours)) else {
        return false;
    };
    let key = |g: &CocoGroundTruth| {
        let mut images: Vec<i64> = g.images.iter().map(|i| i.id).collect();
        images.sort_unstable();
        let mut anns: Vec<(i64, i64, [i64; 4])> =
            g.annotations.iter().map(|a| (a.image_id, a.category_id, a.bbox.map(|v| (v * 1000.0).round() as i64))).collect();
        anns.sort_unstable();
        (images, anns)
    };
    key(&u) == key(&o)
}

/// The user's evaluation files for a run, if they made one: (metrics file, ground truth).
pub fn find_user_evaluation(eval_dir: &Path) -> Option<(PathBuf, Option<PathBuf>)> {
    let metrics = ["pytorch_metrics.json", "metrics.json", "coco_metrics.json"].iter().map(|n| eval_dir.join(n)).find(|p| p.is_file())?;
    // A directory mkonnx wrote itself is not the user's.
    let text = std::fs::read_to_string(&metrics).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    if v.get("producer").and_then(|p| p.as_str()) == Some("mkonnx") {
        return None;
    }
    let gt = eval_dir.join("ground_truth_coco.json");
    Some((metrics, gt.is_file().then_some(gt)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_metrics_styles() {
        let v = serde_json::json!({"stats": [0.1,0.2,0.3,0,0,0,0,0,0.4,0,0,0]});
        assert_eq!(user_headline(&v).unwrap().ar100, 0.4);
        let v = serde_json::json!({"mAP": 0.5, "map_50": 0.7, "map_75": 0.6, "mar_100": 0.55});
        assert_eq!(user_headline(&v).unwrap().ap50, 0.7);
        assert!(user_headline(&serde_json::json!({"loss": 1.0})).is_none());
    }
}
