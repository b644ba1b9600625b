//! Detection-level agreement between two detectors on the same image (PyTorch vs ONNX).
//!
//! Detections are paired greedily, highest reference score first, with the unpaired
//! candidate of the same label whose score is within the tolerance and whose box is closest.
//! A reference detection left unpaired is excused only at a cut: when its score is within
//! the tolerance of the score threshold or of the last detection kept (the
//! detections-per-image cut), since there a kernel-level difference legitimately flips it.

use crate::runtime::Detections;
use serde::{Deserialize, Serialize};

/// Tolerances of a parity check.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Tolerance {
    /// Largest allowed |score difference|.
    pub score: f32,
    /// Largest allowed |box coordinate difference| in pixels of the original image.
    pub box_px: f32,
}

/// The contract (docs/DESIGN.md section 2) for ONNX vs torchvision eager: 1e-3 in score, 0.1 px in box.
pub const ONNX_TOLERANCE: Tolerance = Tolerance { score: 1e-3, box_px: 0.1 };

/// The outcome of comparing two detection lists.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ParityResult {
    /// Detections of the reference.
    pub reference: usize,
    /// Detections of the candidate.
    pub candidate: usize,
    /// Pairs found.
    pub matched: usize,
    /// Largest |score difference| over pairs.
    pub max_score_diff: f32,
    /// Largest |box difference| over pairs, pixels.
    pub max_box_diff: f32,
    /// Unpaired detections excused as near-ties at a cut, described.
    pub flips_at_cut: Vec<String>,
    /// Unpaired detections that are real disagreements, described.
    pub mismatches: Vec<String>,
}

impl ParityResult {
    /// Whether the two agree within `tol`.
    pub fn passed(&self, tol: Tolerance) -> bool {
        self.mismatches.is_empty() && self.max_score_diff <= tol.score && self.max_box_diff <= tol.box_px
    }
}

/// Compares `candidate` against `reference`; `score_thresh` is the model's box_score_thresh.
pub fn compare(reference: &Detections, candidate: &Detections, tol: Tolerance, score_thresh: f32) -> ParityResult {
    let mut used = vec![false; candidate.len()];
    let mut r = ParityResult { reference: reference.len(), candidate: candidate.len(), ..Default::default() };
    let last_kept = |d: &Detections| d.scores.last().copied().unwrap_or(f32::INFINITY);
    let at_cut = |s: f32, other: &Detections| (s - score_thresh).abs() <= tol.score || (s - last_kept(other)).abs() <= tol.score;
    // An unpaired detection is a flip at a cut when near one, else a real mismatch.
    let unpaired = |r: &mut ParityResult, side: &str, d: &Detections, i: usize, other: &Detections| {
        let what = format!("{side} detection {i} (label {}, score {:.6}, box {:?})", d.labels[i], d.scores[i], d.boxes[i]);
        if at_cut(d.scores[i], other) {
            r.flips_at_cut.push(what);
        } else {
            r.mismatches.push(what);
        }
    };
    for i in 0..reference.len() {
        let best = (0..candidate.len())
            .filter(|&j| {
                !used[j] && candidate.labels[j] == reference.labels[i] && (candidate.scores[j] - reference.scores[i]).abs() <= tol.score
            })
            .map(|j| (j, box_diff(&reference.boxes[i], &candidate.boxes[j])))
            .min_by(|a, b| a.1.total_cmp(&b.1));
        match best {
            Some((j, d)) => {
                used[j] = true;
                r.matched += 1;
                r.max_box_diff = r.max_box_diff.max(d);
                r.max_score_diff = r.max_score_diff.max((candidate.scores[j] - reference.scores[i]).abs());
            }
            None => unpaired(&mut r, "reference", reference, i, candidate),
        }
    }
    for j in (0..candidate.len()).filter(|&j| !used[j]) {
        unpaired(&mut r, "candidate", candidate, j, reference);
    }
    r
}

fn box_diff(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn det(v: &[(f32, i64, f32)]) -> Detections {
        Detections {
            boxes: v.iter().map(|&(_, _, x)| [x, 0.0, x + 10.0, 10.0]).collect(),
            scores: v.iter().map(|t| t.0).collect(),
            labels: v.iter().map(|t| t.1).collect(),
        }
    }

    #[test]
    fn pairs_by_label_score_and_box() {
        let a = det(&[(0.9, 1, 5.0), (0.8, 2, 50.0)]);
        let b = det(&[(0.8004, 2, 50.05), (0.9, 1, 5.0)]);
        let r = compare(&a, &b, ONNX_TOLERANCE, 0.05);
        assert!(r.passed(ONNX_TOLERANCE), "{r:?}");
        assert!((r.max_box_diff - 0.05).abs() < 1e-4);
    }

    #[test]
    fn a_real_difference_fails_and_a_cut_flip_is_excused() {
        let a = det(&[(0.9, 1, 5.0), (0.0504, 1, 80.0)]);
        let b = det(&[(0.9, 1, 5.6)]);
        let r = compare(&a, &b, ONNX_TOLERANCE, 0.05);
        assert!(!r.passed(ONNX_TOLERANCE));
        assert_eq!(r.flips_at_cut.len(), 1);
        let b = det(&[(0.9, 1, 5.0), (0.7, 2, 5.0)]);
        let r = compare(&a, &b, ONNX_TOLERANCE, 0.05);
        assert_eq!(r.mismatches.len(), 1);
    }
}
