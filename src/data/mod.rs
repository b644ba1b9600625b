//! Inputs: run directories, Hydra configs, datasets and `torch.save` checkpoints.

pub mod checkpoint;
pub mod dataset;
pub mod hydra;
pub mod run_dir;
