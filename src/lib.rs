//! mkonnx: turn torchvision FasterRCNN training runs into verified ONNX deployables.
//!
//! Architecture, one module per concern:
//! - [`cli`]: the command line (`mkonnx build/status/graph/gc/coco-eval`).
//! - [`engine`]: the build engine — a DAG of content-hashed stages in a SQLite store.
//! - [`stages`]: the real stages (resolve, export, parity, ground truth, evaluations,
//!   comparison, summary) and the planner that wires them for a set of runs.
//! - [`model`]: torchvision's FasterRCNN described once (architectures, module tree).
//! - [`onnx`]: the ONNX writer (protobuf, typed graph builder, exporter).
//! - [`runtime`]: running the ONNX model (ONNX Runtime) and the PyTorch model (libtorch).
//! - [`eval`]: COCO evaluation, comparison, visualizations.
//! - [`data`]: run directories, Hydra configs, datasets, `torch.save` checkpoints.

pub mod cli;
pub mod data;
pub mod engine;
pub mod eval;
pub mod model;
pub mod onnx;
pub mod runtime;
pub mod stages;

/// This build's identity: `mkonnx <version> (src <hash of the sources>, onnxruntime <v>,
/// libtorch <v>)`, computed by `build.rs`. It enters every stage key, so results built by
/// another build are never reused, and the PyTorch runner must report the same one.
pub fn build_identity() -> &'static str {
    env!("MKONNX_BUILD_IDENTITY")
}
