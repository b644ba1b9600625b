//! A detection dataset directory: `dataset.jsonl` (one image per line) and `data/`.

use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Errors reading a dataset; each names the file and, for a bad line, the line number.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// No `dataset.jsonl` in the directory.
    #[error("dataset index not found: {0} (a dataset directory holds dataset.jsonl and data/)")]
    NotFound(PathBuf),
    /// The index cannot be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A line is wrong.
    #[error("{path}:{line}: {message}")]
    BadLine {
        /// `dataset.jsonl`.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// The dataset has no images.
    #[error("{0}: the dataset has no images")]
    Empty(PathBuf),
}

/// One image of the dataset with its ground truth.
#[derive(Clone, Debug, PartialEq)]
pub struct DatasetImage {
    /// 1-based line number in `dataset.jsonl`.
    pub line: usize,
    /// COCO image id: the line's `id`, else its 0-based index.
    pub id: u64,
    /// The image path as written (relative to the dataset directory).
    pub image: String,
    /// Ground-truth boxes, pixel x1, y1, x2, y2.
    pub boxes: Vec<[f64; 4]>,
    /// 1-indexed labels.
    pub labels: Vec<u32>,
    /// Declared size, when the line has it.
    pub width: Option<u32>,
    /// Declared size, when the line has it.
    pub height: Option<u32>,
}

/// A parsed dataset.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    /// The dataset directory.
    pub dir: PathBuf,
    /// Its base name (used in evaluation directory names).
    pub name: String,
    /// Images in file order.
    pub images: Vec<DatasetImage>,
}

#[derive(Deserialize)]
struct Line {
    image: Option<String>,
    #[serde(default)]
    boxes: Vec<Vec<f64>>,
    #[serde(default)]
    labels: Vec<i64>,
    width: Option<u32>,
    height: Option<u32>,
    id: Option<u64>,
}

/// The index file name inside a dataset directory.
pub const INDEX_FILE: &str = "dataset.jsonl";

impl Dataset {
    /// Reads and validates `<dir>/dataset.jsonl`; every referenced image must exist.
    pub fn load(dir: &Path) -> Result<Dataset, DatasetError> {
        let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
        let path = dir.join(INDEX_FILE);
        if !path.is_file() {
            return Err(DatasetError::NotFound(path));
        }
        let text = std::fs::read_to_string(&path).map_err(|source| DatasetError::Io { path: path.clone(), source })?;
        let mut images = Vec::new();
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            if raw.trim().is_empty() {
                continue;
            }
            let bad = |message: String| DatasetError::BadLine { path: path.clone(), line, message };
            let l: Line = serde_json::from_str(raw).map_err(|e| bad(format!("not a JSON object of the dataset format: {e}")))?;
            let image = l.image.ok_or_else(|| bad("missing \"image\"".into()))?;
            if !dir.join(&image).is_file() {
                return Err(bad(format!("image not found: {}", dir.join(&image).display())));
            }
            if l.boxes.len() != l.labels.len() {
                return Err(bad(format!("{} boxes but {} labels", l.boxes.len(), l.labels.len())));
            }
            let mut boxes = Vec::with_capacity(l.boxes.len());
            for (i, b) in l.boxes.iter().enumerate() {
                let b: [f64; 4] =
                    b.as_slice().try_into().map_err(|_| bad(format!("box {i} has {} numbers, expected 4 (x1, y1, x2, y2)", b.len())))?;
                if !b.iter().all(|v| v.is_finite()) || b[2] < b[0] || b[3] < b[1] {
                    return Err(bad(format!("box {i} {b:?} is not x1 <= x2, y1 <= y2")));
                }
                boxes.push(b);
            }
            let labels = l
                .labels
                .iter()
                .enumerate()
                .map(|(i, &v)| {
                    u32::try_from(v)
                        .ok()
                        .filter(|&v| v >= 1)
                        .ok_or_else(|| bad(format!("label {i} is {v}; labels are 1-indexed (0 is background)")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let id = l.id.unwrap_or(images.len() as u64);
            images.push(DatasetImage { line, id, image, boxes, labels, width: l.width, height: l.height });
        }
        if images.is_empty() {
            return Err(DatasetError::Empty(path));
        }
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "dataset".into());
        Ok(Dataset { dir, name, images })
    }

    /// Checks every label against the model's class count (labels 1..num_classes-1).
    pub fn check_labels(&self, num_classes: usize) -> Result<(), DatasetError> {
        for img in &self.images {
            if let Some((i, l)) = img.labels.iter().enumerate().find(|(_, &l)| l as usize >= num_classes) {
                return Err(DatasetError::BadLine {
                    path: self.dir.join(INDEX_FILE),
                    line: img.line,
                    message: format!("label {i} is {l}, out of range for a model with {num_classes} classes (1..={})", num_classes - 1),
                });
            }
        }
        Ok(())
    }

    /// Absolute path of an image.
    pub fn image_path(&self, img: &DatasetImage) -> PathBuf {
        self.dir.join(&img.image)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, jsonl: &str) {
        std::fs::create_dir_all(dir.join("data")).unwrap();
        std::fs::write(dir.join("data/a.png"), b"png").unwrap();
        std::fs::write(dir.join(INDEX_FILE), jsonl).unwrap();
    }

    #[test]
    fn parses_and_numbers_lines() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("tri");
        write(&dir, "{\"image\": \"data/a.png\", \"boxes\": [[1,2,3,4]], \"labels\": [1]}\n{\"image\": \"data/a.png\", \"boxes\": [], \"labels\": [], \"id\": 7}\n");
        let ds = Dataset::load(&dir).unwrap();
        assert_eq!(ds.name, "tri");
        assert_eq!(ds.images.len(), 2);
        assert_eq!((ds.images[0].id, ds.images[1].id, ds.images[1].line), (0, 7, 2));
        assert!(ds.check_labels(2).is_ok());
        assert!(ds.check_labels(1).unwrap_err().to_string().contains(":1: label 0 is 1"));
    }

    #[test]
    fn bad_lines_name_file_and_line() {
        let d = tempfile::tempdir().unwrap();
        for (jsonl, expect) in [
            ("{\"image\": \"data/a.png\", \"boxes\": [], \"labels\": []}\nnot json\n", ":2: not a JSON"),
            ("{\"boxes\": [], \"labels\": []}\n", ":1: missing \"image\""),
            ("{\"image\": \"data/b.png\"}\n", "image not found"),
            ("{\"image\": \"data/a.png\", \"boxes\": [[5,0,1,1]], \"labels\": [1]}\n", "not x1 <= x2"),
            ("{\"image\": \"data/a.png\", \"boxes\": [[0,0,1,1]], \"labels\": []}\n", "1 boxes but 0 labels"),
            ("{\"image\": \"data/a.png\", \"boxes\": [[0,0,1,1]], \"labels\": [0]}\n", "1-indexed"),
        ] {
            write(d.path(), jsonl);
            let e = Dataset::load(d.path()).unwrap_err().to_string();
            assert!(e.contains("dataset.jsonl") && e.contains(expect), "{e}");
        }
    }
}
