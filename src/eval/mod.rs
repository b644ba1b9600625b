//! Evaluation: COCO bbox metrics equal to pycocotools, the PyTorch-vs-ONNX comparison, and
//! pictures of the detections.

pub mod coco;
pub mod compare;
pub mod latency;
pub mod parity;
pub mod visualize;
