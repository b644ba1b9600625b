//! Running an exported model in ONNX Runtime (through `ort`, loading the onnxruntime wheel's
//! shared library found at build time, or `ORT_DYLIB_PATH`).

use super::{Detections, ImageBatch, RuntimeError};
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::Tensor;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

static ENVIRONMENT: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();

/// The process's one ONNX Runtime environment, loading the library on first use.
fn environment() -> Result<&'static ort::environment::Environment, RuntimeError> {
    ENVIRONMENT
        .get_or_init(|| {
            let path =
                std::env::var("ORT_DYLIB_PATH").ok().filter(|p| !p.is_empty()).unwrap_or_else(|| env!("MKONNX_ORT_DYLIB").to_string());
            if path.is_empty() {
                return Err("no ONNX Runtime library known: set ORT_DYLIB_PATH to libonnxruntime.so".to_string());
            }
            let builder = ort::init_from(&path).map_err(|e| format!("cannot load ONNX Runtime from {path}: {e}"))?;
            builder.with_name("mkonnx").build().map_err(|e| format!("cannot create the ONNX Runtime environment: {e}"))
        })
        .as_ref()
        .map_err(|e| RuntimeError::OnnxRuntime(e.clone()))
}

/// An ONNX Runtime session on an mkonnx model (`input` → `location`, `score`, `category`).
pub struct OnnxDetector {
    session: Mutex<Session>,
}

impl OnnxDetector {
    /// Loads `model` with `threads` intra-op threads.
    ///
    /// Graph optimizations are off: ONNX Runtime's fusions (Conv+BatchNorm folding, NCHWc
    /// kernels) round differently from PyTorch's separate ops, enough to swap near-tie RPN
    /// proposals at the top-1000 cut and so flip a detection (measured on the trained ResNet-50
    /// fixtures: one detection of 98, and one extra at score 0.064). Unfused, results equal
    /// eager's; the cost measured here is ~4-9% of inference time.
    pub fn load(model: &Path, threads: usize) -> Result<OnnxDetector, RuntimeError> {
        let env = environment()?;
        let err = |e: String| RuntimeError::OnnxRuntime(format!("{}: {e}", model.display()));
        let session = Session::builder(env)
            .map_err(|e| err(e.to_string()))?
            .with_optimization_level(GraphOptimizationLevel::Disable)
            .map_err(|e| err(e.to_string()))?
            .with_intra_threads(threads.max(1))
            .map_err(|e| err(e.to_string()))?
            .commit_from_file(model)
            .map_err(|e| err(e.to_string()))?;
        Ok(OnnxDetector { session: Mutex::new(session) })
    }

    /// Runs one batch of same-size images; returns each image's detections in pixels.
    pub fn detect(&self, batch: &ImageBatch) -> Result<Vec<Detections>, RuntimeError> {
        let (b, h, w) = (batch.len, batch.height, batch.width);
        let input = Tensor::from_array(([b, 3, h, w], batch.data.clone())).map_err(|e| RuntimeError::OnnxRuntime(e.to_string()))?;
        let mut session = self.session.lock().map_err(|_| RuntimeError::OnnxRuntime("session lock poisoned".into()))?;
        let outputs = session.run(ort::inputs!["input" => input]).map_err(|e| RuntimeError::OnnxRuntime(e.to_string()))?;
        let ext = |e: ort::Error| RuntimeError::OnnxRuntime(e.to_string());
        let (shape, location) = outputs["location"].try_extract_tensor::<f32>().map_err(ext)?;
        let n = shape[1] as usize;
        let (_, score) = outputs["score"].try_extract_tensor::<f32>().map_err(ext)?;
        let (_, category) = outputs["category"].try_extract_tensor::<i64>().map_err(ext)?;
        let (wf, hf) = (w as f32, h as f32);
        Ok((0..b)
            .map(|i| {
                let mut d = Detections::default();
                for j in 0..n {
                    let k = i * n + j;
                    if category[k] == 0 {
                        continue; // padding row of a smaller image in the batch
                    }
                    let l = &location[k * 4..k * 4 + 4];
                    d.boxes.push([l[0] * wf, l[1] * hf, l[2] * wf, l[3] * hf]);
                    d.scores.push(score[k]);
                    d.labels.push(category[k]);
                }
                d
            })
            .collect())
    }
}
