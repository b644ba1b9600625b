//! The real stages of a conversion, and the planner that wires them into one build graph
//! for all runs of an invocation.
//!
//! Per run:
//! ```text
//! checkpoint, config ─► resolve_model ─► export_onnx ─► conversion_summary
//!                              │             │   ▲   ▲
//!                              │             ▼   │   │
//!          sample image ───────┴────────► parity_check ─► publish_model (model.onnx)
//! dataset ─► ground_truth (shared by runs) ─► evaluate_onnx ─┐
//!                              └──────────► evaluate_pytorch ┴► compare
//!                                   (or the user's own eval: pytorch_metrics_from_user)
//! with --quantize int8:
//! calibration images, export_onnx ─► calibrate ─► quantize ─► publish_int8 (model.int8.onnx,
//!                                                  only if parity_check passed, as publish_model)
//!                                          ground_truth, quantize ─► evaluate_int8 ─► compare
//! ```

pub mod convert;
pub mod evaluate;
pub mod parity;
pub mod quantize;
pub mod summary;
pub mod wiring;

use crate::data::dataset::Dataset;
use crate::data::run_dir::{file_tag, RunDir};
use crate::engine::{Graph, NodeHandle, NodeSpec};
use crate::runtime::{Detections, RgbImage};
use std::path::PathBuf;
use wiring::{add, Int8Model, OnnxModel, Planned};

pub use crate::runtime::pytorch::Device;

/// What to build.
#[derive(Clone, Debug)]
pub struct BuildRequest {
    /// The runs.
    pub runs: Vec<RunDir>,
    /// The dataset, when given.
    pub dataset: Option<Dataset>,
    /// The parity sample image when given (else the dataset's first image).
    pub image_input: Option<PathBuf>,
    /// Whether to evaluate and compare.
    pub evaluate: bool,
    /// Whether to run the parity check.
    pub parity: bool,
    /// Keep the ONNX model even when parity fails.
    pub keep_failed_parity: bool,
    /// PyTorch device.
    pub device: Device,
    /// Threads per stage for libtorch / ONNX Runtime.
    pub threads: usize,
    /// Visualizations per evaluation.
    pub visualizations: usize,
    /// Lowest score drawn in visualizations.
    pub vis_score_thresh: f32,
    /// `--quantize int8`: also build (and, when evaluating, evaluate) an INT8 model.
    pub int8: Option<Int8Request>,
}

/// How to make the INT8 model.
#[derive(Clone, Debug)]
pub struct Int8Request {
    /// Method, count and source of the calibration.
    pub settings: quantize::CalibrationSettings,
    /// The calibration images, in order (file inputs of `calibrate`).
    pub images: Vec<PathBuf>,
}

/// The nodes planned for one run (for reports).
#[derive(Clone, Debug)]
pub struct PlannedRun {
    /// The run's label (its directory as given).
    pub label: String,
    /// Its `resolve_model` node (architecture, hyperparameters).
    pub model: Option<NodeHandle>,
    /// Its `publish_model` node, which puts `onnx_model/model.onnx` in place.
    pub publish: Option<NodeHandle>,
    /// Its parity node, when checking parity.
    pub parity: Option<NodeHandle>,
    /// Its `compare` node, when evaluating.
    pub compare: Option<NodeHandle>,
    /// Why the run could not be planned (its other runs are planned all the same).
    pub error: Option<String>,
}

/// Adds a dataset's files ([`evaluate::DatasetFiles`]) as file inputs of a node.
fn with_dataset(mut spec: NodeSpec, files: &evaluate::DatasetFiles) -> NodeSpec {
    for (name, path) in files.inputs() {
        spec = spec.file(name.clone(), path.clone());
    }
    spec
}

/// The config's foreground class names (cheap: the planner reads only the YAML, never the
/// checkpoint, so a no-op rebuild stays a matter of stats).
fn planned_class_names(run: &RunDir) -> anyhow::Result<Vec<String>> {
    let cfg = crate::data::hydra::TrainingConfig::load(&run.config)?;
    Ok(cfg.class_names.map(|(_, names)| crate::model::resolve::foreground_names(&names).to_vec()).unwrap_or_default())
}

/// Builds the graph for `req`; each run's nodes carry the run directory as label. A run
/// that cannot be planned is reported in its [`PlannedRun::error`]; the others are planned
/// all the same (one broken run never stops a fleet).
pub fn plan(req: &BuildRequest) -> (Graph, Vec<PlannedRun>) {
    let mut g = Graph::new();
    let mut planned = Vec::new();
    for run in &req.runs {
        let label = run.root.display().to_string();
        let mut p = PlannedRun { label, model: None, publish: None, parity: None, compare: None, error: None };
        if let Err(e) = plan_run(&mut g, req, run, &mut p) {
            p.error = Some(format!("{e:#}"));
        }
        planned.push(p);
    }
    (g, planned)
}

/// Adds one run's nodes to `g`, recording them in `p` as they are added. Each stage value
/// is built from the nodes it reads (see [`wiring`]): the types say which connects where.
fn plan_run(g: &mut Graph, req: &BuildRequest, run: &RunDir, p: &mut PlannedRun) -> anyhow::Result<()> {
    let label = p.label.clone();
    let onnx_dir = run.onnx_dir();
    let model = add(g, convert::ResolveModel, |s| s.label(&label).file("checkpoint", &run.checkpoint).file("config", &run.config))?;
    p.model = Some(model.handle());
    let onnx = add(g, convert::ExportOnnx { model: model.as_input("model") }, |s| s.label(&label).file("checkpoint", &run.checkpoint))?;

    let sample = req.image_input.clone().or_else(|| req.dataset.as_ref().and_then(|d| d.images.first().map(|i| d.image_path(i))));
    let parity = match (req.parity, sample) {
        (true, Some(image)) => {
            let check = parity::ParityCheck {
                device: req.device,
                threads: req.threads,
                sample_name: image.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
                model: model.as_input("model"),
                onnx: onnx.as_input("onnx"),
            };
            Some(add(g, check, |s| s.label(&label).file("checkpoint", &run.checkpoint).file("image", &image))?)
        }
        _ => None,
    };
    p.parity = parity.map(Planned::handle);
    let parity_input = parity.map(|n| n.as_input("parity"));
    let publish = convert::PublishModel { keep_failed_parity: req.keep_failed_parity, model: onnx.as_input("onnx"), parity: parity_input };
    p.publish = Some(add(g, publish, |s| s.label(&label).materialize(OnnxModel::FILE, onnx_dir.join(OnnxModel::FILE)))?.handle());
    let summary = summary::ConversionSummary {
        checkpoint_name: file_tag_name(run),
        keep_failed_parity: req.keep_failed_parity,
        int8_calibration: req.int8.as_ref().map(|q| q.settings.clone()),
        model: model.as_input("model"),
        onnx: onnx.as_input("onnx"),
        parity: parity_input,
    };
    add(g, summary, |s| {
        s.label(&label)
            .file("checkpoint", &run.checkpoint)
            .file("config", &run.config)
            .materialize(wiring::Summary::FILE, onnx_dir.join(wiring::Summary::FILE))
    })?;

    let int8 = match &req.int8 {
        Some(q) => {
            let calibrate = quantize::Calibrate {
                settings: q.settings.clone(),
                threads: req.threads,
                onnx: onnx.as_input("onnx"),
                images: q.images.clone(),
            };
            let calibration = add(g, calibrate, |s| s.label(&label))?;
            let quantize = quantize::Quantize { onnx: onnx.as_input("onnx"), calibration: calibration.as_input("calibration") };
            let quantized = add(g, quantize, |s| s.label(&label))?;
            let publish_int8 = convert::PublishInt8 {
                keep_failed_parity: req.keep_failed_parity,
                model: quantized.as_input("int8"),
                parity: parity_input,
            };
            add(g, publish_int8, |s| s.label(&label).materialize(Int8Model::FILE, onnx_dir.join(Int8Model::FILE)))?;
            Some(quantized)
        }
        None => None,
    };

    let (true, Some(ds)) = (req.evaluate, req.dataset.as_ref()) else { return Ok(()) };
    // The ground truth names its categories after the config's classes, so it is shared
    // only by runs with the same class names. A config that cannot be read fails this run
    // in `resolve_model`, with its own error; there is nothing to evaluate.
    let Ok(class_names) = planned_class_names(run) else { return Ok(()) };
    let identity = format!("classes:{}", serde_json::to_string(&class_names)?);
    let dataset = evaluate::DatasetFiles::of(ds);
    let gt = add(g, evaluate::GroundTruth { class_names, dataset: dataset.clone() }, |s| s.identity(identity).label(&label))?;
    // An evaluation: the dataset's files, the resolved model and the ground truth in, its
    // directory of metrics, predictions and pictures out.
    let options =
        evaluate::EvaluationOptions { visualizations: req.visualizations, vis_score_thresh: req.vis_score_thresh, threads: req.threads };
    let inputs = evaluate::EvaluationInputs { model: model.as_input("model"), ground_truth: gt.as_input("ground_truth") };
    let evaluation = |s: NodeSpec, dest: PathBuf| with_dataset(s, &dataset).label(&label).materialize_dir("", dest);
    let onnx_eval_dir = run.root.join(format!("eval_{}_{}", ds.name, file_tag(std::path::Path::new(OnnxModel::FILE))));
    let onnx_eval = add(g, evaluate::EvaluateOnnx { options, inputs, onnx: onnx.as_input("onnx") }, |s| evaluation(s, onnx_eval_dir))?;
    let pt_dir = run.root.join(format!("eval_{}_{}", ds.name, run.checkpoint_tag()));
    let user_evaluation = evaluate::find_user_evaluation(&pt_dir);
    let (pytorch, pytorch_source, user_ground_truth) = match user_evaluation {
        Some((metrics, user_gt)) => {
            let source = format!(
                "{}/{}",
                pt_dir.file_name().unwrap_or_default().to_string_lossy(),
                metrics.file_name().unwrap_or_default().to_string_lossy()
            );
            let user = add(g, evaluate::UserPytorchMetrics, |s| s.label(&label).file("metrics", &metrics))?;
            let pytorch = evaluate::PytorchMetrics::User { headline: user.as_input("pytorch_user"), with_ground_truth: user_gt.is_some() };
            (pytorch, format!("user evaluation {source}"), user_gt)
        }
        None => {
            let stage = parity::EvaluatePytorch { device: req.device, options, inputs };
            let pt = add(g, stage, |s| evaluation(s, pt_dir).file("checkpoint", &run.checkpoint))?;
            (evaluate::PytorchMetrics::Evaluated(pt.as_input("pytorch_eval")), "libtorch (mkonnx)".to_string(), None)
        }
    };
    let int8 = match int8 {
        Some(quantized) => {
            let int8_eval_dir = run.root.join(format!("eval_{}_{}", ds.name, file_tag(std::path::Path::new(Int8Model::FILE))));
            let stage = quantize::EvaluateInt8 { options, inputs, int8: quantized.as_input("int8") };
            let int8_eval = add(g, stage, |s| evaluation(s, int8_eval_dir))?;
            Some(evaluate::Int8Inputs { evaluation: int8_eval.as_input("int8_eval"), model: quantized.as_input("quantization") })
        }
        None => None,
    };
    let compare = evaluate::Compare { pytorch_source: Some(pytorch_source), onnx: onnx_eval.as_input("onnx_eval"), pytorch, int8 };
    let compared = add(g, compare, |mut s| {
        s = s.label(&label).materialize(wiring::ComparisonFile::FILE, onnx_dir.join(wiring::ComparisonFile::FILE));
        if let Some(path) = user_ground_truth {
            s = s.file(evaluate::USER_GROUND_TRUTH_INPUT, path);
        }
        s
    })?;
    p.compare = Some(compared.handle());
    Ok(())
}

fn file_tag_name(run: &RunDir) -> String {
    run.checkpoint.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Draws one evaluation picture: predictions with class names and scores over the image,
/// ground truth in another colour.
pub fn visualize(
    rgb: &RgbImage,
    det: &Detections,
    img: &crate::data::dataset::DatasetImage,
    info: &convert::ModelInfo,
    min_score: f32,
) -> anyhow::Result<Vec<u8>> {
    use crate::eval::visualize::{draw_detections, encode_png, from_chw, DrawBox, Style};
    let base = from_chw(&rgb.chw, rgb.height, rgb.width)?;
    let preds: Vec<DrawBox> = det
        .boxes
        .iter()
        .zip(&det.scores)
        .zip(&det.labels)
        .filter(|((_, &s), _)| s >= min_score)
        .map(|((b, &s), &l)| DrawBox { bbox: *b, label: info.class_name(l), score: Some(s), class_id: usize::try_from(l).ok() })
        .collect();
    let gt: Vec<DrawBox> = img
        .boxes
        .iter()
        .zip(&img.labels)
        .map(|(b, &l)| DrawBox { bbox: b.map(|v| v as f32), label: info.class_name(i64::from(l)), score: None, class_id: Some(l as usize) })
        .collect();
    let drawn = draw_detections(&base, &preds, &gt, &Style::default());
    Ok(encode_png(&drawn)?)
}
