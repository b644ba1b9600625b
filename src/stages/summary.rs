//! Stage `conversion_summary`: `onnx_model/conversion_summary.txt`.

use super::convert::ModelInfo;
use super::parity::ParityReport;
use super::wiring::{OnnxModel, Parity, Produces, ResolvedModel, Summary, Upstream};
use crate::engine::{NodeHandle, Stage, StageContext};
use std::fmt::Write;

/// Writes the human-readable summary of a conversion.
pub struct ConversionSummary {
    /// The checkpoint's file name (relative: artifacts never hold absolute paths).
    pub checkpoint_name: String,
    /// Whether a model that failed its parity check is published anyway.
    pub keep_failed_parity: bool,
    /// With `--quantize int8`: how the INT8 model is calibrated (the settings, not the
    /// images' content, so that a new calibration set does not rerun the summary).
    pub int8_calibration: Option<super::quantize::CalibrationSettings>,
    /// The detector's description.
    pub model: Upstream<ResolvedModel>,
    /// The exported model (its size and hash).
    pub onnx: Upstream<OnnxModel>,
    /// Its parity check, when one was asked for.
    pub parity: Option<Upstream<Parity>>,
}

impl Stage for ConversionSummary {
    fn name(&self) -> &'static str {
        "conversion_summary"
    }
    fn version(&self) -> u32 {
        1
    }
    fn params(&self) -> serde_json::Value {
        serde_json::json!({
            "checkpoint_name": self.checkpoint_name,
            "keep_failed_parity": self.keep_failed_parity,
            "int8_calibration": self.int8_calibration,
        })
    }
    fn inputs(&self) -> Vec<(&'static str, NodeHandle)> {
        [Some(self.model.wire()), Some(self.onnx.wire()), self.parity.map(|p| p.wire())].into_iter().flatten().collect()
    }
    fn run(&self, ctx: &mut StageContext<'_>) -> anyhow::Result<()> {
        let info = self.model.info(ctx)?;
        let onnx_size = std::fs::metadata(self.onnx.model(ctx)?)?.len();
        let onnx_hash = self.onnx.model_hash(ctx)?;
        let parity: Option<ParityReport> = self.parity.map(|p| p.report(ctx)).transpose()?;
        let text = render(
            self,
            &info,
            &ctx.input_file_hash("checkpoint")?.to_hex(),
            &ctx.input_file_hash("config")?.to_hex(),
            &onnx_hash.to_hex(),
            onnx_size,
            parity.as_ref(),
        );
        ctx.write_output(Summary::FILE, text)?;
        Ok(())
    }
}

impl Produces for ConversionSummary {
    type Product = Summary;
}

fn render(
    s: &ConversionSummary,
    info: &ModelInfo,
    ckpt_hash: &str,
    config_hash: &str,
    onnx_hash: &str,
    onnx_size: u64,
    parity: Option<&ParityReport>,
) -> String {
    let p = &info.params;
    let mut t = String::new();
    let _ = writeln!(t, "mkonnx {} conversion summary", env!("CARGO_PKG_VERSION"));
    let _ = writeln!(t, "==============================\n");
    let _ = writeln!(t, "Built by          {}\n", crate::build_identity());
    let _ = writeln!(t, "Source");
    let _ = writeln!(t, "  checkpoint      {} (blake3 {ckpt_hash})", s.checkpoint_name);
    let _ = writeln!(
        t,
        "  state dict      {} tensors, {} parameters{}{}",
        info.tensors,
        info.parameters,
        info.wrapper.as_ref().map(|w| format!(", under `{w}`")).unwrap_or_default(),
        info.stripped_prefix.as_ref().map(|w| format!(", prefix `{w}` stripped")).unwrap_or_default()
    );
    let _ = writeln!(t, "  config          .hydra/config.yaml (blake3 {config_hash})\n");
    let _ = writeln!(t, "Model");
    let _ = writeln!(t, "  architecture    torchvision.models.detection.{} (from {})", info.arch, info.arch_source);
    let _ = writeln!(
        t,
        "  num_classes     {} (including background){}",
        p.num_classes,
        info.class_names.as_ref().map(|n| format!(": {}", n[1..].join(", "))).unwrap_or_default()
    );
    let _ = writeln!(t, "  min_size        {}    max_size {}", p.min_size, p.max_size);
    let _ = writeln!(t, "  image_mean      {:?}    image_std {:?}", p.image_mean, p.image_std);
    let _ = writeln!(
        t,
        "  rpn             pre_nms_top_n {} post_nms_top_n {} nms_thresh {} score_thresh {}",
        p.rpn_pre_nms_top_n_test, p.rpn_post_nms_top_n_test, p.rpn_nms_thresh, p.rpn_score_thresh
    );
    let _ = writeln!(
        t,
        "  box             score_thresh {} nms_thresh {} detections_per_img {}\n",
        p.box_score_thresh, p.box_nms_thresh, p.box_detections_per_img
    );
    let _ = writeln!(t, "ONNX model");
    let _ = writeln!(t, "  file            onnx_model/model.onnx ({:.1} MB, blake3 {onnx_hash})", onnx_size as f64 / 1e6);
    let _ = writeln!(t, "  opset           {} (IR version {})", crate::onnx::builder::OPSET, crate::onnx::builder::IR_VERSION);
    let _ = writeln!(t, "  input           input     float32 [batch_size, 3, height, width], RGB in 0..1 (any size; resize, normalization and padding are inside the graph)");
    let _ = writeln!(t, "  outputs         location  float32 [batch_size, N, 4]  x1, y1, x2, y2 divided by the input width/height");
    let _ = writeln!(t, "                  score     float32 [batch_size, N]     descending per image");
    let _ = writeln!(
        t,
        "                  category  int64   [batch_size, N]     1-indexed class; rows past an image's count are 0 (score 0)\n"
    );
    if let Some(c) = &s.int8_calibration {
        let _ = writeln!(t, "INT8 model");
        let _ = writeln!(
            t,
            "  file            onnx_model/model.int8.onnx (QDQ: per-channel symmetric int8 weights, per-tensor uint8 activations)"
        );
        let _ = writeln!(t, "  quantized       Conv/Gemm of the backbone, FPN, RPN head and box head; the rest stays float32");
        let _ = writeln!(t, "  calibration     {}", c.statement());
        let _ = writeln!(t, "  run it with     ONNX Runtime's default graph optimizations (they fuse QDQ into integer kernels)\n");
    }
    let _ = writeln!(t, "Parity with PyTorch (libtorch, same checkpoint)");
    match parity {
        Some(r) if r.passed => {
            let _ = writeln!(t, "  {}\n", r.line());
        }
        Some(r) if s.keep_failed_parity => {
            let _ = writeln!(t, "  {}", r.line());
            let _ = writeln!(t, "  model.onnx published anyway (--keep-failed-parity): do not deploy it\n");
        }
        Some(r) => {
            let _ = writeln!(t, "  {}", r.failure());
            let _ = writeln!(t, "  model.onnx NOT published: onnx_model/model.onnx is absent (--keep-failed-parity keeps it)\n");
        }
        None => {
            let _ = writeln!(t, "  not checked (--no-parity-check)\n");
        }
    }
    let _ = writeln!(t, "Usage (Python, onnxruntime)");
    let _ = writeln!(t, "  import numpy as np, onnxruntime as ort");
    let _ = writeln!(t, "  from PIL import Image");
    let _ = writeln!(t, "  options = ort.SessionOptions()");
    let _ = writeln!(t, "  # unfused = the same detections as PyTorch eager; ORT's fusions are ~5% faster but round");
    let _ = writeln!(t, "  # differently and can flip near-tie detections");
    let _ = writeln!(t, "  options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL");
    let _ = writeln!(t, "  session = ort.InferenceSession(\"onnx_model/model.onnx\", options)");
    let _ = writeln!(t, "  image = np.asarray(Image.open(\"image.png\").convert(\"RGB\"), dtype=np.float32) / 255.0");
    let _ = writeln!(t, "  location, score, category = session.run(None, {{\"input\": image.transpose(2, 0, 1)[None]}})");
    let _ = writeln!(t, "  boxes = location[0] * [image.shape[1], image.shape[0]] * 2  # pixels\n");
    let _ = writeln!(t, "Usage (Rust, ort 2)");
    let _ = writeln!(t, "  let mut session = ort::session::Session::builder()?");
    let _ = writeln!(t, "      .with_optimization_level(ort::session::builder::GraphOptimizationLevel::Disable)?");
    let _ = writeln!(t, "      .commit_from_file(\"onnx_model/model.onnx\")?;");
    let _ = writeln!(t, "  let input = ort::value::Tensor::from_array(([1usize, 3, h, w], chw_pixels_0_to_1))?;");
    let _ = writeln!(t, "  let outputs = session.run(ort::inputs![\"input\" => input])?;");
    let _ = writeln!(t, "  let (shape, location) = outputs[\"location\"].try_extract_tensor::<f32>()?;");
    t
}
