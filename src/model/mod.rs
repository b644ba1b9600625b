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

impl Detector {
    /// A run's PyTorch model as `mkonnx build` resolves it: the checkpoint read natively, the
    /// architecture and hyperparameters from its config and weights. For tools and tests that
    /// run a model outside a build (the build itself caches each step as a stage).
    pub fn load_run(run: &crate::data::run_dir::RunDir) -> anyhow::Result<Detector> {
        let (weights, _, _) = Weights::load_checkpoint(&run.checkpoint)?;
        let config = crate::data::hydra::TrainingConfig::load(&run.config)?;
        let resolve::Resolved { arch, params, .. } = resolve::resolve(&config, &weights, &run.checkpoint)?;
        Ok(Detector { arch, params, weights })
    }
}

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
