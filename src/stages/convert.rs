//! Conversion stages: resolve the detector, export ONNX, write the conversion summary.

use crate::data::checkpoint::load_state_dict;
use crate::data::hydra::TrainingConfig;
use crate::engine::{Stage, StageContext};
use crate::model::resolve::{resolve, Resolved};
use crate::model::{Architecture, Detector, DetectorParams, Weights};
use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::path::Path;

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

/// Reads a checkpoint and converts its tensors to float32 weights.
pub fn load_weights(checkpoint: &Path) -> anyhow::Result<(Weights, Option<String>, Option<String>)> {
    let sd = load_state_dict(checkpoint)?;
    let (wrapper, prefix) = (sd.wrapper.clone(), sd.stripped_prefix.clone());
    Ok((Weights::from_state_dict(sd), wrapper, prefix))
}

/// Loads the detector described by `info` with the checkpoint's weights.
pub fn load_detector(checkpoint: &Path, info: &ModelInfo) -> anyhow::Result<Detector> {
    let (weights, _, _) = load_weights(checkpoint)?;
    Ok(Detector { arch: info.arch, params: info.params.clone(), weights })
}

/// Reads an upstream JSON artifact.
pub fn read_json<T: for<'de> Deserialize<'de>>(ctx: &StageContext<'_>, input: &str, artifact: &str) -> anyhow::Result<T> {
    let bytes = ctx.read_input_artifact(input, artifact)?;
    serde_json::from_slice(&bytes).with_context(|| format!("corrupt artifact {artifact} of {input}"))
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
        1
    }
    fn run(&self, ctx: &mut StageContext<'_>) -> anyhow::Result<()> {
        let checkpoint = ctx.input_file("checkpoint")?.to_path_buf();
        let config = TrainingConfig::load(ctx.input_file("config")?)?;
        let (weights, wrapper, stripped_prefix) = load_weights(&checkpoint)?;
        let Resolved { arch, arch_source, params, class_names } = resolve(&config, &weights, &checkpoint)?;
        let parameters = weights.names().map(|n| weights.get(n).map(|t| t.data.len()).unwrap_or(0)).sum();
        let info = ModelInfo { arch, arch_source, params, class_names, wrapper, stripped_prefix, tensors: weights.len(), parameters };
        ctx.write_output("model.json", serde_json::to_vec_pretty(&info)?)?;
        Ok(())
    }
}

/// Stage `export_onnx`: the ONNX graph, natively.
pub struct ExportOnnx;

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
    fn run(&self, ctx: &mut StageContext<'_>) -> anyhow::Result<()> {
        let info: ModelInfo = read_json(ctx, "model", "model.json")?;
        let detector = load_detector(ctx.input_file("checkpoint")?, &info)?;
        let model = crate::onnx::export(&detector).with_context(|| format!("exporting {}", info.arch))?;
        ctx.write_output("model.onnx", crate::onnx::encode(&model))?;
        Ok(())
    }
}
