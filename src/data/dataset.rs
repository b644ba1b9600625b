//! A detection dataset directory: `dataset.jsonl` (one image per line) and `data/`.

use super::range::Range;
use serde::Deserialize;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

/// Allowed image ids: COCO ids are written to JSON, and readers that parse JSON numbers as
/// doubles (JavaScript, many JSON libraries) would silently merge ids above 2^53 - 1; larger
/// ids also used to wrap negative in the int64 COCO files.
pub const ID_RANGE: Range = Range::integer(0, (1 << 53) - 1);
/// Allowed labels: 1-indexed, 0 is the background.
pub const LABEL_RANGE: Range = Range::integer(1, u32::MAX as u64);
/// Allowed declared `width`/`height`: positive, and no side can be longer than the decoders'
/// pixel limit.
pub const SIDE_RANGE: Range = Range::integer(1, MAX_IMAGE_PIXELS);

/// The most pixels an image may have (checked by `runtime::RgbImage` when it decodes one):
/// PIL's default `Image.MAX_IMAGE_PIXELS`, its guard
/// against decompression bombs (a 420 KB PNG of 12000x12000 made mkonnx take 8.7 GB). PIL
/// only warns between this and twice this; mkonnx refuses, since such an image costs
/// gigabytes here and torchvision resizes it far below its size anyway.
pub const MAX_IMAGE_PIXELS: u64 = 89_478_485;

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

/// A line as written. The integers are read as JSON values so that a float, a negative or a
/// too-large number gets the range in its message rather than serde's type error.
#[derive(Deserialize)]
struct Line {
    image: Option<String>,
    #[serde(default)]
    boxes: Vec<Vec<f64>>,
    #[serde(default)]
    labels: Vec<Value>,
    width: Option<Value>,
    height: Option<Value>,
    id: Option<Value>,
}

/// `v` as an integer in `range`, else a message naming `what`, the range and the value.
fn integer_in(v: &Value, what: &str, range: Range) -> Result<u64, String> {
    // In range means integral, non-negative (every range here starts at 0 or 1) and below
    // 2^53, so the cast is exact.
    v.as_f64().filter(|&x| range.contains(x)).map(|x| x as u64).ok_or_else(|| format!("{what} should be {range}, found {v}"))
}

/// Whether `image` (as written in a line) names a file inside the dataset directory: a
/// relative path whose `..` components never climb above it. Checked on the text, not the
/// file system: a symlink inside the directory is the dataset author's choice (datasets
/// sharing an image pool use them) and is followed.
fn stays_inside(image: &str) -> bool {
    let mut depth = 0usize;
    for c in Path::new(image).components() {
        match c {
            Component::Prefix(_) | Component::RootDir => return false,
            Component::CurDir => {}
            Component::ParentDir => match depth.checked_sub(1) {
                Some(d) => depth = d,
                None => return false,
            },
            Component::Normal(_) => depth += 1,
        }
    }
    true
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
        // Editors on Windows write a byte-order mark; JSON parsers reject it (Python's
        // `open(..., encoding="utf-8-sig")` skips it).
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        let mut images: Vec<DatasetImage> = Vec::new();
        let mut line_of_id: HashMap<u64, usize> = HashMap::new();
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            if raw.trim().is_empty() {
                continue;
            }
            let bad = |message: String| DatasetError::BadLine { path: path.clone(), line, message };
            let l: Line = serde_json::from_str(raw).map_err(|e| bad(format!("not a JSON object of the dataset format: {e}")))?;
            let image = l.image.ok_or_else(|| bad("missing \"image\"".into()))?;
            if !stays_inside(&image) {
                return Err(bad(format!(
                    "image path {image:?} is outside the dataset directory (paths are relative to {} and may not climb out of it)",
                    dir.display()
                )));
            }
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
                .map(|(i, v)| integer_in(v, &format!("label {i} (labels are 1-indexed, 0 is background)"), LABEL_RANGE).map(|l| l as u32))
                .collect::<Result<Vec<_>, _>>()
                .map_err(bad)?;
            let [width, height] = [("width", &l.width), ("height", &l.height)]
                .map(|(what, v)| v.as_ref().map(|v| integer_in(v, what, SIDE_RANGE).map(|x| x as u32)).transpose());
            let (width, height) = (width.map_err(bad)?, height.map_err(bad)?);
            let id = match &l.id {
                Some(v) => integer_in(v, "id", ID_RANGE).map_err(bad)?,
                None => images.len() as u64,
            };
            // Two images with one id would pool their ground truth and detections in COCO's
            // matching and change AP without a word.
            if let Some(first) = line_of_id.insert(id, line) {
                return Err(bad(format!("image id {id} is also the id of line {first} (COCO image ids must be unique)")));
            }
            images.push(DatasetImage { line, id, image, boxes, labels, width, height });
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

    #[test]
    fn numbers_are_checked_against_their_range() {
        let d = tempfile::tempdir().unwrap();
        let line = |extra: &str| format!("{{\"image\": \"data/a.png\", \"boxes\": [[0,0,1,1]], \"labels\": [1]{extra}}}\n");
        for (extra, expect) in [
            (", \"id\": 18446744073709551615", ":1: id should be an integer in [0, 9007199254740991], found 18446744073709551615"),
            (", \"id\": 9223372036854775808", "found 9223372036854775808"),
            (", \"id\": -1", "id should be an integer in [0, 9007199254740991], found -1"),
            (", \"id\": 1.5", "found 1.5"),
            (", \"id\": \"7\"", "found \"7\""),
            (", \"width\": 0, \"height\": 5", "width should be an integer in [1, 89478485], found 0"),
            (", \"width\": 5, \"height\": 4294967296", "height should be an integer in [1, 89478485]"),
        ] {
            write(d.path(), &line(extra));
            let e = Dataset::load(d.path()).unwrap_err().to_string();
            assert!(e.contains("dataset.jsonl") && e.contains(expect), "{extra}: {e}");
        }
        write(d.path(), "{\"image\": \"data/a.png\", \"boxes\": [[0,0,1,1]], \"labels\": [1.5]}\n");
        let e = Dataset::load(d.path()).unwrap_err().to_string();
        assert!(
            e.contains(":1: label 0 (labels are 1-indexed, 0 is background) should be an integer in [1, 4294967295], found 1.5"),
            "{e}"
        );
        write(d.path(), &line(", \"id\": 9007199254740991, \"width\": 3, \"height\": 2"));
        let img = &Dataset::load(d.path()).unwrap().images[0];
        assert_eq!((img.id, img.width, img.height), (9007199254740991, Some(3), Some(2)));
    }

    #[test]
    fn duplicate_ids_name_both_lines() {
        let d = tempfile::tempdir().unwrap();
        let a = "{\"image\": \"data/a.png\", \"id\": 3}\n";
        write(d.path(), &format!("{a}\n{{\"image\": \"data/a.png\"}}\n{a}"));
        let e = Dataset::load(d.path()).unwrap_err().to_string();
        assert!(e.contains("dataset.jsonl:4: image id 3 is also the id of line 1"), "{e}");
        // An explicit id equal to another line's implicit one (its 0-based index) too.
        write(d.path(), "{\"image\": \"data/a.png\"}\n{\"image\": \"data/a.png\", \"id\": 0}\n");
        let e = Dataset::load(d.path()).unwrap_err().to_string();
        assert!(e.contains(":2: image id 0 is also the id of line 1"), "{e}");
    }

    #[test]
    fn image_paths_stay_inside_the_dataset() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("ds");
        write(&dir, "");
        std::fs::write(root.path().join("secret.png"), b"png").unwrap();
        let outside = root.path().join("secret.png");
        for image in ["../secret.png", "data/../../secret.png", outside.to_str().unwrap()] {
            std::fs::write(dir.join(INDEX_FILE), format!("{{\"image\": {image:?}}}\n")).unwrap();
            let e = Dataset::load(&dir).unwrap_err().to_string();
            assert!(e.contains("dataset.jsonl:1: image path") && e.contains("is outside the dataset directory"), "{image}: {e}");
        }
        // `..` that stays inside and `./` are fine; so is a symlink inside pointing out.
        std::os::unix::fs::symlink(&outside, dir.join("data/link.png")).unwrap();
        std::fs::write(dir.join(INDEX_FILE), "{\"image\": \"./data/../data/a.png\"}\n{\"image\": \"data/link.png\"}\n").unwrap();
        assert_eq!(Dataset::load(&dir).unwrap().images.len(), 2);
    }

    #[test]
    fn a_leading_byte_order_mark_is_skipped() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "\u{feff}{\"image\": \"data/a.png\", \"id\": 4}\n");
        assert_eq!(Dataset::load(d.path()).unwrap().images[0].id, 4);
    }
}
