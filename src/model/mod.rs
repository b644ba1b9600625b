//! torchvision's FasterRCNN, described once: architectures and hyperparameters, the module
//! tree over a [`network::Backend`], anchors, and the weights.

pub mod anchors;
pub mod arch;
pub mod detection;
pub mod network;
pub mod resolve;
pub mod weights;

pub use arch::{Architecture, DetectorParams};
pub use weights::{WeightTensor, Weights};

/// A resolved detector: which network, its inference hyperparameters and its weights.
#[derive(Clone, Debug)]
pub struct Detector {
    /// torchvision constructor.
    pub arch: Architecture,
    /// Inference hyperparameters (torchvision defaults with the config's overrides).
    pub params: DetectorParams,
    /// The state_dict's tensors as float32.
    pub weights: Weights,
}
