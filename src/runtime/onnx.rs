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

/// How ONNX Runtime may rewrite the graph before running it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Optimization {
    /// No graph optimizations: what evaluations and parity checks of the float32 model use.
    ///
    /// ONNX Runtime's fusions (Conv+BatchNorm folding, NCHWc kernels) round differently from
    /// PyTorch's separate ops, enough to swap near-tie RPN proposals at the top-1000 cut and
    /// so flip a detection (measured on the trained ResNet-50 fixtures: one detection of 98,
    /// and one extra at score 0.064). Unfused, results equal eager's; the cost measured here
    /// is ~4-9% of inference time.
    Parity,
    /// ONNX Runtime's default (every graph optimization level enabled): the model as a user
    /// deploys it. Latency is measured this way, and INT8 models run this way, since only
    /// the optimizer turns their QuantizeLinear/DequantizeLinear pairs into integer kernels.
    Deployed,
}

/// An ONNX Runtime session on an mkonnx model (`input` → `location`, `score`, `category`).
pub struct OnnxDetector {
    session: Mutex<Session>,
}

/// An ONNX Runtime session on `model` (a file, or the model's bytes) with `threads` intra-op
/// threads; errors name `label`.
fn session(model: ModelSource<'_>, label: &Path, threads: usize, optimization: Optimization) -> Result<Session, RuntimeError> {
    let env = environment()?;
    let err = |e: String| RuntimeError::OnnxRuntime(format!("{}: {e}", label.display()));
    let level = match optimization {
        Optimization::Parity => GraphOptimizationLevel::Disable,
        Optimization::Deployed => GraphOptimizationLevel::All,
    };
    let mut builder = Session::builder(env)
        .map_err(|e| err(e.to_string()))?
        .with_optimization_level(level)
        .map_err(|e| err(e.to_string()))?
        .with_intra_threads(threads.max(1))
        .map_err(|e| err(e.to_string()))?;
    match model {
        ModelSource::File(path) => builder.commit_from_file(path),
        ModelSource::Bytes(bytes) => builder.commit_from_memory(bytes),
    }
    .map_err(|e| err(e.to_string()))
}

/// Where a session's model comes from.
enum ModelSource<'a> {
    File(&'a Path),
    Bytes(&'a [u8]),
}

impl OnnxDetector {
    /// Loads `model` with `threads` intra-op threads and graph optimizations off (see
    /// [`Optimization::Parity`]).
    pub fn load(model: &Path, threads: usize) -> Result<OnnxDetector, RuntimeError> {
        Self::load_with(model, threads, Optimization::Parity)
    }

    /// Loads `model` with `threads` intra-op threads and the given graph optimizations.
    pub fn load_with(model: &Path, threads: usize, optimization: Optimization) -> Result<OnnxDetector, RuntimeError> {
        Ok(OnnxDetector { session: Mutex::new(session(ModelSource::File(model), model, threads, optimization)?) })
    }

    /// Runs one batch and returns its wall time (for latency; the detections are dropped).
    pub fn time(&self, batch: &ImageBatch) -> anyhow::Result<std::time::Duration> {
        let start = std::time::Instant::now();
        self.detect(batch)?;
        Ok(start.elapsed())
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

/// Runs the model `model` (its bytes; `label` names it in errors) on each image, one at a
/// time, with graph optimizations off and `threads` intra-op threads, and hands every
/// tensor named in `tensors` (which must be float32 graph outputs of the model) to `visit`
/// as (index in `tensors`, values). What calibration of an INT8 model uses.
pub fn visit_tensors(
    model: &[u8],
    label: &Path,
    threads: usize,
    images: &mut dyn Iterator<Item = Result<super::RgbImage, RuntimeError>>,
    tensors: &[String],
    visit: &mut dyn FnMut(usize, &[f32]),
) -> Result<(), RuntimeError> {
    let mut session = session(ModelSource::Bytes(model), label, threads, Optimization::Parity)?;
    let ext = |e: ort::Error| RuntimeError::OnnxRuntime(format!("{}: {e}", label.display()));
    for image in images {
        let image = image?;
        let input = Tensor::from_array(([1, 3, image.height, image.width], image.chw)).map_err(ext)?;
        let outputs = session.run(ort::inputs!["input" => input]).map_err(ext)?;
        for (i, name) in tensors.iter().enumerate() {
            let (_, values) = outputs[name.as_str()].try_extract_tensor::<f32>().map_err(ext)?;
            visit(i, values);
        }
    }
    Ok(())
}
