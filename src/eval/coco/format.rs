//! The COCO JSON files, bbox subset: ground truth (`instances_*.json` layout) and
//! results (a list of detections).
//!
//! These types read what pycocotools reads and write what mkonnx produces
//! (`ground_truth_coco.json`, `*_predictions.json`). Fields that pycocotools ignores for
//! bbox evaluation (segmentation, licenses, ...) are skipped on read; unknown keys are
//! accepted so that files written by other tools load.

use std::path::Path;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::CocoError;

/// A COCO ground truth file: images, annotations and categories.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CocoGroundTruth {
    /// Free-form `info` block, carried through unchanged when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<serde_json::Value>,
    /// Every image of the evaluated set; images without annotations still count.
    pub images: Vec<CocoImage>,
    /// Ground truth boxes. A file without the key has none.
    #[serde(default)]
    pub annotations: Vec<CocoAnnotation>,
    /// The categories evaluated; annotations and detections of other ids are skipped.
    pub categories: Vec<CocoCategory>,
}

/// One image of the ground truth.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CocoImage {
    /// Image id that annotations and detections refer to.
    pub id: i64,
    /// Path of the image, relative to the dataset directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_name: Option<String>,
    /// Width in pixels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    /// Height in pixels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
}

/// One ground truth object.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CocoAnnotation {
    /// Annotation id. Start at 1: pycocotools stores the matched ground truth id as
    /// "the match", so a detection matched to id 0 counts as unmatched (mirrored here).
    pub id: i64,
    /// The image this object is in.
    pub image_id: i64,
    /// The object's category id.
    pub category_id: i64,
    /// `[x, y, width, height]` in pixels.
    pub bbox: [f64; 4],
    /// Object area. pycocotools bins objects into small/medium/large by this value,
    /// not by the box, so it is required (COCO writes the segmentation's area here;
    /// for box-only data write `width * height`).
    pub area: f64,
    /// Crowd region: matched with intersection over detection area, and ignored.
    /// Read from `0`/`1` or `false`/`true`; a missing key reads as not a crowd.
    #[serde(default, with = "int_bool")]
    pub iscrowd: bool,
    /// The optional `ignore` flag of some COCO-style files. pycocotools 2.0.x reads it
    /// and then overwrites it with `iscrowd` (cocoeval.py, `_prepare`), so it has no
    /// effect on the metrics; it is kept only so that such files round-trip.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_int_bool")]
    pub ignore: Option<bool>,
}

/// One category of the ground truth.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CocoCategory {
    /// Category id (labels are 1-indexed in mkonnx datasets, matching this id).
    pub id: i64,
    /// Human-readable name.
    #[serde(default)]
    pub name: String,
    /// Optional parent name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supercategory: Option<String>,
}

/// One detection of a COCO results file.
///
/// As in pycocotools' `loadRes`, a detection's area is `width * height`, its id is its
/// 1-based position in the file, and it is never a crowd; any such keys in the file
/// are ignored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct CocoDetection {
    /// Image the detection is in; must be one of the ground truth's images.
    pub image_id: i64,
    /// Predicted category id.
    pub category_id: i64,
    /// `[x, y, width, height]` in pixels.
    pub bbox: [f64; 4],
    /// Confidence; higher ranks first.
    pub score: f64,
}

impl CocoGroundTruth {
    /// Reads a ground truth file.
    pub fn from_path(path: &Path) -> Result<Self, CocoError> {
        let bytes = read(path)?;
        serde_json::from_slice(&bytes).map_err(|source| CocoError::GroundTruthJson { path: path.to_path_buf(), source })
    }
}

/// Reads a results file: a JSON list of [`CocoDetection`].
pub fn load_detections(path: &Path) -> Result<Vec<CocoDetection>, CocoError> {
    let bytes = read(path)?;
    serde_json::from_slice(&bytes).map_err(|source| CocoError::ResultsJson { path: path.to_path_buf(), source })
}

fn read(path: &Path) -> Result<Vec<u8>, CocoError> {
    std::fs::read(path).map_err(|source| CocoError::Read { path: path.to_path_buf(), source })
}

/// A flag written as a COCO integer (0/1) and read from an integer or a boolean,
/// since both appear in the wild and pycocotools takes either (`int(o['iscrowd'])`).
mod int_bool {
    use super::*;

    pub fn serialize<S: Serializer>(v: &bool, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(u8::from(*v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
        d.deserialize_any(FlagVisitor)
    }

    pub(super) struct FlagVisitor;

    impl serde::de::Visitor<'_> for FlagVisitor {
        type Value = bool;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("0, 1, false or true")
        }
        fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<bool, E> {
            Ok(v)
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<bool, E> {
            Ok(v != 0)
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<bool, E> {
            Ok(v != 0)
        }
    }
}

/// [`int_bool`] for an optional key (`null` reads as absent).
mod opt_int_bool {
    use super::*;

    pub fn serialize<S: Serializer>(v: &Option<bool>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => s.serialize_u8(u8::from(*b)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
        struct OptVisitor;
        impl<'de> serde::de::Visitor<'de> for OptVisitor {
            type Value = Option<bool>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("null, 0, 1, false or true")
            }
            fn visit_none<E: serde::de::Error>(self) -> Result<Option<bool>, E> {
                Ok(None)
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<Option<bool>, E> {
                Ok(None)
            }
            fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<Option<bool>, D2::Error> {
                d.deserialize_any(int_bool::FlagVisitor).map(Some)
            }
        }
        d.deserialize_option(OptVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotation_flags_read_from_ints_and_bools() {
        let a: CocoAnnotation =
            serde_json::from_str(r#"{"id":1,"image_id":2,"category_id":3,"bbox":[1,2,3,4],"area":12,"iscrowd":true,"ignore":1}"#).unwrap();
        assert!(a.iscrowd);
        assert_eq!(a.ignore, Some(true));
        let b: CocoAnnotation =
            serde_json::from_str(r#"{"id":1,"image_id":2,"category_id":3,"bbox":[1,2,3,4],"area":12,"iscrowd":0}"#).unwrap();
        assert!(!b.iscrowd);
        assert_eq!(b.ignore, None);
        let text = serde_json::to_string(&a).unwrap();
        assert!(text.contains(r#""iscrowd":1"#), "{text}");
        assert!(text.contains(r#""ignore":1"#), "{text}");
        assert!(!serde_json::to_string(&b).unwrap().contains("ignore"));
    }

    #[test]
    fn missing_area_is_an_error() {
        let r: Result<CocoAnnotation, _> = serde_json::from_str(r#"{"id":1,"image_id":2,"category_id":3,"bbox":[1,2,3,4]}"#);
        assert!(r.unwrap_err().to_string().contains("area"));
    }

    #[test]
    fn detections_ignore_extra_keys() {
        let d: Vec<CocoDetection> =
            serde_json::from_str(r#"[{"image_id":1,"category_id":2,"bbox":[0.5,1,2,3],"score":0.25,"id":99,"area":7}]"#).unwrap();
        assert_eq!(d[0].bbox, [0.5, 1.0, 2.0, 3.0]);
        assert_eq!(d[0].score, 0.25);
    }
}
