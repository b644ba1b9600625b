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
    /// The path exists but is not what a run holds there (a file where the run directory
    /// should be, a directory or FIFO where the checkpoint should be).
    #[error("{what} is not a {expected}: {} is a {found}", path.display())]
    WrongKind {
        /// "Run directory", "Checkpoint" or "Hydra config".
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// "directory" or "regular file".
        expected: &'static str,
        /// What it is instead.
        found: &'static str,
    },
    /// The path cannot be looked at (a symlink loop, no permission).
    #[error("{what} cannot be read: {}: {source}", path.display())]
    Unreadable {
        /// "Run directory", "Checkpoint" or "Hydra config".
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
}

/// What a path must be.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    File,
}

/// Checks that `path` is a `kind` (following symlinks): missing is `missing(path)`, anything
/// else wrong says what the path is instead, so a FIFO or a symlink loop is never "not found".
fn check_kind(path: &Path, kind: Kind, what: &'static str, missing: fn(PathBuf) -> RunDirError) -> Result<(), RunDirError> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(missing(path.to_path_buf())),
        Err(source) => return Err(RunDirError::Unreadable { what, path: path.to_path_buf(), source }),
    };
    let ft = meta.file_type();
    let ok = match kind {
        Kind::Dir => ft.is_dir(),
        Kind::File => ft.is_file(),
    };
    if ok {
        return Ok(());
    }
    use std::os::unix::fs::FileTypeExt;
    let found = if ft.is_dir() {
        "directory"
    } else if ft.is_file() {
        "regular file"
    } else if ft.is_fifo() {
        "FIFO"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_block_device() || ft.is_char_device() {
        "device"
    } else {
        "special file"
    };
    let expected = if kind == Kind::Dir { "directory" } else { "regular file" };
    Err(RunDirError::WrongKind { what, path: path.to_path_buf(), expected, found })
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
        check_kind(root, Kind::Dir, "Run directory", RunDirError::RunDirNotFound)?;
        let root = std::path::absolute(root).unwrap_or_else(|_| root.to_path_buf());
        let checkpoint = match checkpoint {
            Some(c) => std::path::absolute(c).unwrap_or_else(|_| c.to_path_buf()),
            None => root.join(DEFAULT_CHECKPOINT),
        };
        check_kind(&checkpoint, Kind::File, "Checkpoint", RunDirError::CheckpointNotFound)?;
        let config = root.join(".hydra").join("config.yaml");
        check_kind(&config, Kind::File, "Hydra config", RunDirError::ConfigNotFound)?;
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
    fn odd_files_say_what_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not_a_dir");
        std::fs::write(&file, b"x").unwrap();
        let e = RunDir::locate(&file, None).unwrap_err().to_string();
        assert!(e.starts_with("Run directory is not a directory: ") && e.ends_with("is a regular file"), "{e}");

        let ckpt = dir.path().join(DEFAULT_CHECKPOINT);
        std::fs::create_dir(&ckpt).unwrap();
        let e = RunDir::locate(dir.path(), None).unwrap_err().to_string();
        assert!(e.contains("Checkpoint is not a regular file") && e.ends_with("is a directory"), "{e}");
        std::fs::remove_dir(&ckpt).unwrap();

        let fifo = std::ffi::CString::new(ckpt.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo on a path we own, with a valid C string.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        let e = RunDir::locate(dir.path(), None).unwrap_err().to_string();
        assert!(e.ends_with("is a FIFO"), "{e}");
        std::fs::remove_file(&ckpt).unwrap();

        std::os::unix::fs::symlink(&ckpt, &ckpt).unwrap();
        let e = RunDir::locate(dir.path(), None).unwrap_err().to_string();
        assert!(e.starts_with("Checkpoint cannot be read: ") && e.contains("symbolic links"), "{e}");
    }

    #[test]
    fn tags() {
        assert_eq!(file_tag(Path::new("a/best_model.pth")), "best_model_pth");
        assert_eq!(file_tag(Path::new("model.onnx")), "model_onnx");
    }
}
