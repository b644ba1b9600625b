//! Stages that run the PyTorch model on libtorch (in the `mkonnx-torch` runner): the parity
//! check of a conversion on its sample image, and the PyTorch-side evaluation when the user
//! has none.

use super::convert::ModelInfo;
use super::evaluate::{evaluate_dataset, EvaluationInputs, EvaluationOptions, LatencyProbe};
use super::wiring::{self, Evaluation, OnnxModel, Produces, PytorchSide, ResolvedModel, Upstream};
use super::Device;
use crate::engine::{Stage, StageContext};
use crate::eval::parity::{compare, ParityResult, ONNX_TOLERANCE};
use crate::runtime::onnx::OnnxDetector;
use crate::runtime::pytorch::{PytorchRunner, RunnerSetup};
use crate::runtime::RgbImage;
use serde::{Deserialize, Serialize};

/// `parity.json`: how the ONNX model agrees with the PyTorch model on the sample image.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ParityReport {
    /// The sample image's file name.
    pub image: String,
    /// The comparison (PyTorch is the reference).
    pub result: ParityResult,
    /// Whether it is within the tolerances (1e-3 score, 0.1 px box).
    pub passed: bool,
}

impl ParityReport {
    /// Why the check failed: the summary line and the first mismatches.
    pub fn failure(&self) -> String {
        let details: Vec<&String> = self.result.mismatches.iter().take(3).collect();
        format!(
            "{}; the ONNX model disagrees with PyTorch beyond 1e-3 score / 0.1 px{}",
            self.line(),
            if details.is_empty() { String::new() } else { format!(": {details:?}") }
        )
    }

    /// The one-line summary printed by `mkonnx build` and written to the summary.
    pub fn line(&self) -> String {
        let r = &self.result;
        format!(
            "parity {} on {}: pytorch {} / onnx {} detections, {} matched, max |score diff| {:.2e}, max |box diff| {:.4} px{}",
            if self.passed { "OK" } else { "FAILED" },
            self.image,
            r.reference,
            r.candidate,
            r.matched,
            r.max_score_diff,
            r.max_box_diff,
            if r.flips_at_cut.is_empty() { String::new() } else { format!(", {} near-tie flip(s) at a cut", r.flips_at_cut.len()) }
        )
    }
}

/// Stage `parity_check`.
pub struct ParityCheck {
    /// libtorch device.
    pub device: Device,
    /// Threads for libtorch and ONNX Runtime; in the key, as results depend on it (see
    /// [`super::evaluate::EvaluateOnnx::threads`]).
    pub threads: usize,
    /// The sample's file name, for the report.
    pub sample_name: String,
    /// The PyTorch side: the detector (its weights are the stage's `checkpoint` file).
    pub model: Upstream<ResolvedModel>,
    /// The ONNX side.
    pub onnx: Upstream<OnnxModel>,
}

impl Stage for ParityCheck {
    fn name(&self) -> &'static str {
        "parity_check"
    }
    fn version(&self) -> u32 {
        1
    }
    fn params(&self) -> serde_json::Value {
        serde_json::json!({ "device": self.device, "sample": self.sample_name, "threads": self.threads })
    }
    fn inputs(&self) -> Vec<(&'static str, crate::engine::NodeHandle)> {
        vec![self.model.wire(), self.onnx.wire()]
    }
    fn run(&self, ctx: &mut StageContext<'_>) -> anyhow::Result<()> {
        let info = self.model.info(ctx)?;
        let image = RgbImage::load(ctx.input_file("image")?)?;
        let batch = image.to_batch();
        let torch = start_runner(ctx, &info, self.device, self.threads)?.detect(&batch)?.remove(0);
        let onnx = OnnxDetector::load(&self.onnx.model(ctx)?, self.threads)?.detect(&batch)?.remove(0);
        let result = compare(&torch, &onnx, ONNX_TOLERANCE, info.params.box_score_thresh);
        // A failed check is a result, not an error: `publish_model` decides what it means.
        let report = ParityReport { image: self.sample_name.clone(), passed: result.passed(ONNX_TOLERANCE), result };
        ctx.write_output(wiring::Parity::FILE, serde_json::to_vec_pretty(&report)?)?;
        Ok(())
    }
}

impl Produces for ParityCheck {
    type Product = wiring::Parity;
}

/// Stage `evaluate_pytorch`: the PyTorch model on libtorch over the dataset.
pub struct EvaluatePytorch {
    /// libtorch device.
    pub device: Device,
    /// Pictures, threads (libtorch's).
    pub options: EvaluationOptions,
    /// The detector (its weights are the stage's `checkpoint` file) and the ground truth.
    pub inputs: EvaluationInputs,
}

impl Stage for EvaluatePytorch {
    fn name(&self) -> &'static str {
        "evaluate_pytorch"
    }
    fn version(&self) -> u32 {
        2 // 2: latency
    }
    fn params(&self) -> serde_json::Value {
        let mut params = self.options.params();
        params["device"] = serde_json::json!(self.device);
        params
    }
    fn inputs(&self) -> Vec<(&'static str, crate::engine::NodeHandle)> {
        self.inputs.wire().to_vec()
    }
    fn run(&self, ctx: &mut StageContext<'_>) -> anyhow::Result<()> {
        let EvaluationOptions { visualizations, vis_score_thresh, threads } = self.options;
        let info = self.inputs.model.info(ctx)?;
        let runner = std::sync::Mutex::new(start_runner(ctx, &info, self.device, threads)?);
        let lock = || runner.lock().map_err(|_| anyhow::anyhow!("PyTorch runner lock poisoned"));
        let probe = LatencyProbe {
            threads,
            measured: format!("libtorch (mkonnx-torch runner), {}; model compute inside the runner, no pipe transfer", self.device.name()),
            run: &mut |b| Ok(lock()?.detect_timed(b)?.1),
        };
        evaluate_dataset::<PytorchSide>(
            ctx,
            &self.inputs,
            &info,
            visualizations,
            vis_score_thresh,
            &|b| Ok(lock()?.detect(b)?),
            Some(probe),
        )
    }
}

impl Produces for EvaluatePytorch {
    type Product = Evaluation<PytorchSide>;
}

/// The PyTorch model of `info` on the stage's checkpoint, in a started `mkonnx-torch`.
fn start_runner(ctx: &StageContext<'_>, info: &ModelInfo, device: Device, threads: usize) -> anyhow::Result<PytorchRunner> {
    let setup = RunnerSetup {
        checkpoint: ctx.input_file("checkpoint")?.to_path_buf(),
        arch: info.arch,
        params: info.params.clone(),
        device,
        threads,
    };
    Ok(PytorchRunner::start(&setup)?)
}
