//! Conversion stages: resolve the detector, export ONNX, write the conversion summary.

use crate::data::hydra::TrainingConfig;
use crate::engine::{Stage, StageContext};
use crate::model::resolve::{resolve, Resolved};
use crate::model::weights::LoadedWeights;
use crate::model::{Architecture, Detector, DetectorParams, Weights};
use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::wiring::{Int8Model, OnnxModel, Parity, Produces, PublishableModel, Published, ResolvedModel, Upstream};

/// What `resolve_model` records: the detector description and facts about the checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ModelInfo {
    /// torchvision constructor.
    pub arch: Architecture,
    /// Where the architecture came from.
    pub arch_source: String,
    /// Inference hyperparameters.
    pub params: DetectorParams,
    /// Class names by label (0 = background), when the config has them.
    pub class_names: Option<Vec<String>>,
    /// The key the state dict was found under, if wrapped.
    pub wrapper: Option<String>,
    /// The key prefix that was stripped (`module.`), if any.
    pub stripped_prefix: Option<String>,
    /// Number of tensors in the state dict.
    pub tensors: usize,
    /// Number of parameters (elements of float tensors).
    pub parameters: usize,
}

impl ModelInfo {
    /// The class name of a label, or `class_<label>`.
    pub fn class_name(&self, label: i64) -> String {
        self.class_names.as_ref().and_then(|n| n.get(label as usize).cloned()).unwrap_or_else(|| format!("class_{label}"))
    }
}

/// The checkpoints read most recently in this process, by content hash: the stages of one
/// run (resolve, export) read the same checkpoint, and [`Weights`] are shared, not copied.
static RECENT_CHECKPOINTS: std::sync::Mutex<Vec<(crate::engine::Hash, std::sync::Arc<LoadedWeights>)>> = std::sync::Mutex::new(Vec::new());

/// How many parsed checkpoints [`RECENT_CHECKPOINTS`] keeps (a ResNet-50 is ~170 MB).
const RECENT_CHECKPOINTS_KEPT: usize = 2;

/// The stage's `checkpoint` input, parsed once per process and content hash.
pub fn checkpoint_weights(ctx: &StageContext<'_>) -> anyhow::Result<std::sync::Arc<LoadedWeights>> {
    let hash = ctx.input_file_hash("checkpoint")?;
    if let Some((_, w)) =
        RECENT_CHECKPOINTS.lock().map_err(|_| anyhow::anyhow!("checkpoint cache poisoned"))?.iter().find(|(h, _)| *h == hash)
    {
        return Ok(w.clone());
    }
    let loaded = std::sync::Arc::new(Weights::load_checkpoint(ctx.input_file("checkpoint")?)?);
    let mut recent = RECENT_CHECKPOINTS.lock().map_err(|_| anyhow::anyhow!("checkpoint cache poisoned"))?;
    recent.insert(0, (hash, loaded.clone()));
    recent.truncate(RECENT_CHECKPOINTS_KEPT);
    Ok(loaded)
}

/// Loads the detector described by `info` with the stage's checkpoint.
pub fn load_detector(ctx: &StageContext<'_>, info: &ModelInfo) -> anyhow::Result<Detector> {
    let weights = checkpoint_weights(ctx)?.0.clone(); // shared, not copied
    Ok(Detector { arch: info.arch, params: info.params.clone(), weights })
}

/// Stage `resolve_model`: architecture and hyperparameters from config + weights.
/// Its output is small and canonical, so a config edit that changes nothing about the model
/// leaves the export and everything after it fresh (early cutoff).
pub struct ResolveModel;

impl Stage for ResolveModel {
    fn name(&self) -> &'static str {
        "resolve_model"
    }
    fn version(&self) -> u32 {
        // 2: config numbers are range-checked; a store may hold results of configs that
        // version 1 accepted wrongly (min_size 4294967616 as 320).
        2
    }
    fn run(&self, ctx: &mut StageContext<'_>) -> anyhow::Result<()> {
        let checkpoint = ctx.input_file("checkpoint")?.to_path_buf();
        let config = TrainingConfig::load(ctx.input_file("config")?)?;
        let loaded = checkpoint_weights(ctx)?;
        let (weights, wrapper, stripped_prefix) = (&loaded.0, loaded.1.clone(), loaded.2.clone());
        let Resolved { arch, arch_source, params, class_names } = resolve(&config, weights, &checkpoint)?;
        let parameters = weights.names().map(|n| weights.get(n).map(|t| t.data.len()).unwrap_or(0)).sum();
        let info = ModelInfo { arch, arch_source, params, class_names, wrapper, stripped_prefix, tensors: weights.len(), parameters };
        ctx.write_output(ResolvedModel::FILE, serde_json::to_vec_pretty(&info)?)?;
        Ok(())
    }
}

impl Produces for ResolveModel {
    type Product = ResolvedModel;
}

/// Stage `export_onnx`: the ONNX graph, natively.
pub struct ExportOnnx {
    /// The detector to export.
    pub model: Upstream<ResolvedModel>,
}

impl Stage for ExportOnnx {
    fn name(&self) -> &'static str {
        "export_onnx"
    }
    fn version(&self) -> u32 {
        1
    }
    fn params(&self) -> serde_json::Value {
        serde_json::json!({ "opset": crate::onnx::builder::OPSET })
    }
    fn inputs(&self) -> Vec<(&'static str, crate::engine::NodeHandle)> {
        vec![self.model.wire()]
    }
    fn run(&self, ctx: &mut StageContext<'_>) -> anyhow::Result<()> {
        let info = self.model.info(ctx)?;
        let detector = load_detector(ctx, &info)?;
        let model = crate::onnx::export(&detector).with_context(|| format!("exporting {}", info.arch))?;
        ctx.write_output_with(OnnxModel::FILE, |out| crate::onnx::write_model(&model, out))?;
        Ok(())
    }
}

impl Produces for ExportOnnx {
    type Product = OnnxModel;
}

/// Stages `publish_model` and `publish_int8`: put a model where deployments pick it up
/// (`onnx_model/model.onnx`, `onnx_model/model.int8.onnx`) only when the float model's parity
/// check passed (or no check was asked for, or `--keep-failed-parity`); the INT8 model is
/// made from the float graph, so a float graph that disagrees with PyTorch publishes
/// neither. Being a node of the graph, a failed check keeps the model out of the run
/// directory the same way every other failure keeps its outputs out, and the verdict is
/// cached with everything else. It reuses the producer's blob: no copy.
pub struct Publish<P: PublishableModel> {
    /// Publish even when the parity check failed (`--keep-failed-parity`, for debugging).
    pub keep_failed_parity: bool,
    /// The model.
    pub model: Upstream<P>,
    /// The float model's parity check, when one was asked for.
    pub parity: Option<Upstream<Parity>>,
}

/// `publish_model`: the exported model.
pub type PublishModel = Publish<OnnxModel>;
/// `publish_int8`: the INT8 model.
pub type PublishInt8 = Publish<Int8Model>;

impl<P: PublishableModel> Stage for Publish<P> {
    fn name(&self) -> &'static str {
        P::PUBLISH_STAGE
    }
    fn version(&self) -> u32 {
        1
    }
    fn params(&self) -> serde_json::Value {
        serde_json::json!({ "keep_failed_parity": self.keep_failed_parity })
    }
    fn inputs(&self) -> Vec<(&'static str, crate::engine::NodeHandle)> {
        [Some(self.model.wire()), self.parity.map(|p| p.wire())].into_iter().flatten().collect()
    }
    /// Declares the model as this stage's output (no copy), unless its parity check failed
    /// and `keep_failed_parity` is off.
    fn run(&self, ctx: &mut StageContext<'_>) -> anyhow::Result<()> {
        if let Some(parity) = &self.parity {
            let parity = parity.report(ctx)?;
            if !parity.passed && !self.keep_failed_parity {
                anyhow::bail!("{}; {} is not published (--keep-failed-parity keeps it)", parity.failure(), P::MODEL_FILE);
            }
        }
        self.model.reuse_model(ctx)
    }
}

impl<P: PublishableModel> Produces for Publish<P> {
    type Product = Published;
}
