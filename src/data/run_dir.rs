//! A training run directory as Hydra leaves it: `best_model.pth` and `.hydra/config.yaml`.

use std::path::{Path, PathBuf};

/// Errors locating a run's inputs. The messages keep `convert_model.sh`'s wording.
#[derive(Debug, thiserror::Error)]
pub enum RunDirError {
    /// The run directory itself is missing.
    #[error("Run directory not found: {0}")]
    RunDirNotFound(PathBuf),
    /// No checkpoint at the expected path.
    #[error("Checkpoint not found: {0}")]
    CheckpointNotFound(PathBuf),
    /// No Hydra config at the expected path.
    #[error("Hydra config not found: {0}")]
    ConfigNotFound(PathBuf),
}

/// The inputs of one run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunDir {
    /// The run directory (as given, made absolute).
    pub root: PathBuf,
    /// The checkpoint: `<root>/best_model.pth` or `--checkpoint-path`.
    pub checkpoint: PathBuf,
    /// `<root>/.hydra/config.yaml`.
    pub config: PathBuf,
}

/// The checkpoint file name Hydra runs leave.
pub const DEFAULT_CHECKPOINT: &str = "best_model.pth";

impl RunDir {
    /// Locates a run's checkpoint and config; `checkpoint` overrides `<root>/best_model.pth`
    /// (relative paths are taken from the current directory, as the shell script did).
    pub fn locate(root: &Path, checkpoint: Option<&Path>) -> Result<RunDir, RunDirError> {
        if !root.is_dir() {
            return Err(RunDirError::RunDirNotFound(root.to_path_buf()));
        }
        let root = std::path::absolute(root).unwrap_or_else(|_| root.to_path_buf());
        let checkpoint = match checkpoint {
            Some(c) => std::path::absolute(c).unwrap_or_else(|_| c.to_path_buf()),
            None => root.join(DEFAULT_CHECKPOINT),
        };
        if !checkpoint.is_file() {
            return Err(RunDirError::CheckpointNotFound(checkpoint));
        }
        let config = root.join(".hydra").join("config.yaml");
        if !config.is_file() {
            return Err(RunDirError::ConfigNotFound(config));
        }
        Ok(RunDir { root, checkpoint, config })
    }

    /// The checkpoint's name with dots as underscores (`best_model.pth` → `best_model_pth`),
    /// used in evaluation directory names.
    pub fn checkpoint_tag(&self) -> String {
        file_tag(&self.checkpoint)
    }

    /// `<root>/onnx_model`.
    pub fn onnx_dir(&self) -> PathBuf {
        self.root.join("onnx_model")
    }
}

/// A file name with `.` replaced by `_`: `model.onnx` → `model_onnx`.
pub fn file_tag(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().replace('.', "_")).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let e = RunDir::locate(dir.path(), None).unwrap_err();
        assert!(e.to_string().starts_with("Checkpoint not found: "), "{e}");
        std::fs::write(dir.path().join(DEFAULT_CHECKPOINT), b"x").unwrap();
        let e = RunDir::locate(dir.path(), None).unwrap_err();
        assert!(e.to_string().starts_with("Hydra config not found: "), "{e}");
        assert!(e.to_string().ends_with("config.yaml"));
    }

    #[test]
    fn tags() {
        assert_eq!(file_tag(Path::new("a/best_model.pth")), "best_model_pth");
        assert_eq!(file_tag(Path::new("model.onnx")), "model_onnx");
    }
}
