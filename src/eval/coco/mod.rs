//! COCO bbox evaluation, equal to pycocotools 2.0.x `COCOeval(gt, dt, 'bbox')`.
//!
//! `evaluate()`, `accumulate()` and `summarize()` are reproduced with pycocotools'
//! default parameters (IoU thresholds 0.50:0.05:0.95, 101 recall points, maxDets
//! 1/10/100, area ranges all/small/medium/large, per-category evaluation), including
//! its quirks, so the 12 stats agree to the last bit and the printed summary agrees
//! character for character:
//!
//! - a ground truth is ignored when it is a crowd (`iscrowd`); the `ignore` key is
//!   overwritten by pycocotools and has no effect;
//! - area ranges are inclusive at both ends and use the annotation's `area`, not its
//!   box; detections use `w * h`;
//! - detections are ranked by score with a stable sort, cut to 100 per image and
//!   category before matching, and the 1- and 10-detection figures reuse the
//!   100-detection matching;
//! - an equal IoU moves a match to the later ground truth; a match to a regular
//!   object stops the search at the ignored ones; crowds take any number of matches;
//! - a match to a ground truth whose id is 0 reads as no match.
//!
//! Two things differ on purpose, where pycocotools fails: an empty results list is
//! evaluated (every detection-dependent figure is 0) instead of raising `IndexError`
//! in `loadRes`, and a missing `iscrowd` reads as 0 instead of raising `KeyError`.
//!
//! The work is split over rayon's pool: per-image matching in chunks of (category,
//! image) pairs, accumulation per category.

mod accumulate;
mod evaluate;
mod format;
mod summarize;

use std::path::{Path, PathBuf};

pub use accumulate::Accumulated;
pub use format::{load_detections, CocoAnnotation, CocoCategory, CocoDetection, CocoGroundTruth, CocoImage};
pub use summarize::{summary_text, CocoMetrics};

/// Number of IoU thresholds (`T`).
pub const N_IOU: usize = 10;
/// Number of recall points (`R`).
pub const N_REC: usize = 101;
/// Number of area ranges (`A`).
pub const N_AREAS: usize = 4;
/// Number of maxDets settings (`M`).
pub const N_MAX_DETS: usize = 3;
/// `params.maxDets`.
pub const MAX_DETS: [usize; N_MAX_DETS] = [1, 10, 100];
/// `params.areaRng`: `[0, 1e5²]`, `[0, 32²]`, `[32², 96²]`, `[96², 1e5²]`, bounds inclusive.
pub const AREA_RANGES: [(f64, f64); N_AREAS] = [(0.0, 1e10), (0.0, 1024.0), (1024.0, 9216.0), (9216.0, 1e10)];
/// `params.areaRngLbl`.
pub const AREA_LABELS: [&str; N_AREAS] = ["all", "small", "medium", "large"];

/// `np.linspace(start, stop, N)` computed as numpy does (`i * step + start`, the last
/// point set to `stop`), so the thresholds are the same doubles as pycocotools'.
fn linspace<const N: usize>(start: f64, stop: f64) -> [f64; N] {
    let step = (stop - start) / (N - 1) as f64;
    let mut out = [0.0; N];
    for (i, v) in out.iter_mut().enumerate() {
        *v = i as f64 * step + start;
    }
    out[N - 1] = stop;
    out
}

/// `params.iouThrs`: `np.linspace(.5, 0.95, 10)` (0.8999999999999999, not 0.9).
pub fn iou_thresholds() -> [f64; N_IOU] {
    linspace::<N_IOU>(0.5, 0.95)
}

/// `params.recThrs`: `np.linspace(.0, 1.00, 101)`.
pub fn rec_thresholds() -> [f64; N_REC] {
    linspace::<N_REC>(0.0, 1.0)
}

/// What can go wrong reading or evaluating COCO files.
#[derive(Debug, thiserror::Error)]
pub enum CocoError {
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The ground truth file is not a COCO ground truth JSON object.
    #[error("{} is not a COCO ground truth file (an object with images, annotations with id/image_id/category_id/bbox/area, and categories): {source}", path.display())]
    GroundTruthJson {
        /// The file.
        path: PathBuf,
        /// Where and what the JSON error is.
        source: serde_json::Error,
    },
    /// The results file is not a list of bbox detections.
    #[error("{} is not a COCO results file (a list of {{image_id, category_id, bbox, score}}): {source}", path.display())]
    ResultsJson {
        /// The file.
        path: PathBuf,
        /// Where and what the JSON error is.
        source: serde_json::Error,
    },
    /// Detections name images that the ground truth does not have (pycocotools:
    /// "Results do not correspond to current coco set").
    #[error("{}do not correspond to the ground truth: {count} detection(s) name image ids that are not among its images, e.g. {examples:?}", match path { Some(p) => format!("results in {} ", p.display()), None => "results ".to_string() })]
    UnknownImages {
        /// The results file, when read from one.
        path: Option<PathBuf>,
        /// How many detections are affected.
        count: usize,
        /// A few of the unknown image ids.
        examples: Vec<i64>,
    },
}

/// Evaluates detections against ground truth: pycocotools'
/// `loadRes` + `evaluate()` + `accumulate()` + `summarize()` for bbox.
pub fn evaluate(gt: &CocoGroundTruth, dt: &[CocoDetection]) -> Result<CocoMetrics, CocoError> {
    Ok(evaluate_detailed(gt, dt)?.1)
}

/// As [`evaluate()`], also returning the accumulated precision and recall arrays
/// (per IoU threshold, recall point, category, area range and maxDets), from which
/// per-category figures can be read.
pub fn evaluate_detailed(gt: &CocoGroundTruth, dt: &[CocoDetection]) -> Result<(Accumulated, CocoMetrics), CocoError> {
    evaluate::check_images(gt, dt)?;
    let per_image = evaluate::evaluate_images(gt, dt);
    let acc = accumulate::accumulate(&per_image);
    let metrics = summarize::summarize(&acc);
    Ok((acc, metrics))
}

/// Reads a ground truth file and a results file and evaluates them, like
/// `COCOeval(COCO(gt), COCO(gt).loadRes(dt), 'bbox')`.
pub fn evaluate_files(gt: &Path, dt: &Path) -> Result<CocoMetrics, CocoError> {
    // The two files parse independently; reading them side by side saves the
    // larger one's parse time on multi-core machines.
    let (g, d) = rayon::join(|| CocoGroundTruth::from_path(gt), || load_detections(dt));
    let (g, d) = (g?, d?);
    evaluate(&g, &d).map_err(|e| match e {
        CocoError::UnknownImages { count, examples, .. } => CocoError::UnknownImages { path: Some(dt.to_path_buf()), count, examples },
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_are_numpys_linspace() {
        let t = iou_thresholds();
        assert_eq!(t[0], 0.5);
        assert_eq!(t[5], 0.75);
        assert_eq!(t[8], 0.8999999999999999);
        assert_eq!(t[9], 0.95);
        let r = rec_thresholds();
        assert_eq!(r[25], 0.25);
        assert_eq!(r[100], 1.0);
    }

    #[test]
    fn unknown_images_are_an_error() {
        let gt = CocoGroundTruth {
            images: vec![CocoImage { id: 1, ..Default::default() }],
            categories: vec![CocoCategory { id: 1, ..Default::default() }],
            ..Default::default()
        };
        let dt = [CocoDetection { image_id: 5, category_id: 1, bbox: [0.0, 0.0, 1.0, 1.0], score: 1.0 }];
        let err = evaluate(&gt, &dt).unwrap_err();
        assert!(matches!(err, CocoError::UnknownImages { count: 1, .. }));
        assert!(err.to_string().contains("[5]"), "{err}");
    }

    #[test]
    fn nothing_to_evaluate_gives_minus_one() {
        let gt = CocoGroundTruth {
            images: vec![CocoImage { id: 1, ..Default::default() }],
            categories: vec![CocoCategory { id: 1, ..Default::default() }],
            ..Default::default()
        };
        let m = evaluate(&gt, &[]).unwrap();
        assert_eq!(m.stats, [-1.0; 12]);
    }
}
