//! Inputs: run directories, Hydra configs, datasets and `torch.save` checkpoints.

pub mod checkpoint;
pub mod dataset;
pub mod hydra;
pub mod range;
pub mod run_dir;
