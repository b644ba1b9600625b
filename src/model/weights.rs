//! The model's weights: float32 tensors addressed by their state_dict path.

use std::collections::HashMap;
use std::sync::Arc;

/// Errors about the weights a model description asks for.
#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    /// The description needs a tensor the checkpoint does not have.
    #[error("the checkpoint has no tensor `{0}` (is the architecture right?)")]
    Missing(String),
    /// A tensor has another shape than the architecture implies.
    #[error("tensor `{name}` has shape {found:?}, expected {expected}")]
    Shape {
        /// state_dict path.
        name: String,
        /// What the checkpoint holds.
        found: Vec<usize>,
        /// What was expected, in words.
        expected: String,
    },
}

/// A float32 tensor from the checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct WeightTensor {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub data: Vec<f32>,
}

/// All tensors of a state_dict, converted to float32, by name (wrapper keys and
/// `module.`/`model.` prefixes already removed by the checkpoint reader).
///
/// Immutable once built and cheap to clone (shared): the stages of a run share one parsed
/// checkpoint, and a ResNet-50's weights are 170 MB.
#[derive(Clone, Debug, Default)]
pub struct Weights {
    tensors: Arc<HashMap<String, Arc<WeightTensor>>>,
}

impl Weights {
    /// Builds from (name, tensor) pairs.
    pub fn new(tensors: impl IntoIterator<Item = (String, WeightTensor)>) -> Self {
        Weights { tensors: Arc::new(tensors.into_iter().map(|(name, t)| (name, Arc::new(t))).collect()) }
    }

    /// The tensor at `name`, or a [`WeightError::Missing`].
    pub fn get(&self, name: &str) -> Result<&WeightTensor, WeightError> {
        self.shared(name).map(|t| &**t)
    }

    /// The tensor at `name` as a shared handle (the ONNX writer hands the values to the
    /// protobuf without copying them).
    pub fn shared(&self, name: &str) -> Result<&Arc<WeightTensor>, WeightError> {
        self.tensors.get(name).ok_or_else(|| WeightError::Missing(name.to_string()))
    }

    /// Whether `name` is present.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// All names (unordered).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether there are no tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }
}

/// A checkpoint's weights with the wrapper key and stripped prefix its state dict was found
/// under (`load_state_dict`'s findings).
pub type LoadedWeights = (Weights, Option<String>, Option<String>);

impl Weights {
    /// Reads a `torch.save` checkpoint natively and converts its tensors to float32.
    pub fn load_checkpoint(path: &std::path::Path) -> Result<LoadedWeights, crate::data::checkpoint::CheckpointError> {
        let sd = crate::data::checkpoint::load_state_dict(path)?;
        let (wrapper, prefix) = (sd.wrapper.clone(), sd.stripped_prefix.clone());
        Ok((Weights::from_state_dict(sd), wrapper, prefix))
    }

    /// Converts a checkpoint's state dict: floating tensors to float32; integer buffers
    /// (`num_batches_tracked`) are kept as float32 too, they are only looked at for presence.
    pub fn from_state_dict(sd: crate::data::checkpoint::StateDict) -> Self {
        use rayon::prelude::*;
        let tensors: Vec<(String, WeightTensor)> = sd
            .into_tensors()
            .into_par_iter()
            .map(|(name, t)| {
                let shape = t.shape().to_vec();
                (name, WeightTensor { shape, data: t.into_f32() })
            })
            .collect();
        Weights::new(tensors)
    }
}
