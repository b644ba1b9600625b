//! pycocotools' `accumulate()`: precision at 101 recall points and final recall, per
//! IoU threshold, category, area range and `maxDets`.
//!
//! Arithmetic follows numpy's: the cumulative true/false positive counts are exact
//! integers (`np.cumsum` of booleans), recall is `tp / npig`, precision is
//! `tp / (fp + tp + np.spacing(1))`, made monotone by a running maximum from the
//! right, and read at `np.searchsorted(rc, recThrs, side='left')`; thresholds past
//! the last detection keep precision 0.
//!
//! Only the precision at true positives is kept: the envelope and the search read
//! nothing else (see [`first_count_reaching`]), so the work per threshold is the
//! number of true positives rather than of detections, with the same doubles.

use rayon::prelude::*;

use super::evaluate::{by_score, DetBits, ImageEvals};
use super::{rec_thresholds, MAX_DETS, N_AREAS, N_IOU, N_MAX_DETS, N_REC};

/// The accumulated evaluation: pycocotools' `eval['precision']` and `eval['recall']`.
///
/// Entries are -1 where a category has no ground truth that counts (nothing to
/// evaluate), exactly as in pycocotools.
#[derive(Debug, Clone, PartialEq)]
pub struct Accumulated {
    /// The category ids, ascending: the `K` axis.
    pub cat_ids: Vec<i64>,
    /// Precision, shape `[T=10][R=101][K][A=4][M=3]`, row-major (numpy's layout).
    pub precision: Vec<f64>,
    /// Recall, shape `[T=10][K][A=4][M=3]`, row-major.
    pub recall: Vec<f64>,
}

impl Accumulated {
    /// Number of categories (`K`).
    pub fn num_categories(&self) -> usize {
        self.cat_ids.len()
    }

    /// Flat index of `precision[t, r, k, a, m]`.
    pub fn precision_index(&self, t: usize, r: usize, k: usize, a: usize, m: usize) -> usize {
        (((t * N_REC + r) * self.num_categories() + k) * N_AREAS + a) * N_MAX_DETS + m
    }

    /// Flat index of `recall[t, k, a, m]`.
    pub fn recall_index(&self, t: usize, k: usize, a: usize, m: usize) -> usize {
        ((t * self.num_categories() + k) * N_AREAS + a) * N_MAX_DETS + m
    }
}

/// Precision and recall of one category: `[T][R][A][M]` and `[T][A][M]`.
struct CategoryResult {
    precision: Vec<f64>,
    recall: Vec<f64>,
}

/// Buffers reused across categories by one worker.
#[derive(Default)]
struct Scratch {
    /// The category's detections by descending score (stable).
    order: Vec<u32>,
    /// Outcome bits of the detections counted for one maxDets, in order.
    bits: Vec<[DetBits; N_AREAS]>,
    /// Per threshold: precision at each true positive, in order; then its running
    /// maximum from the right.
    tp_pr: [Vec<f64>; N_IOU],
}

/// Runs `accumulate()` over the per-image results, one category per task.
pub(crate) fn accumulate(ev: &ImageEvals) -> Accumulated {
    let k_count = ev.cat_ids.len();
    let per_cat: Vec<CategoryResult> =
        (0..k_count).into_par_iter().map_init(Scratch::default, |s, k| accumulate_category(ev, k, s)).collect();

    let mut precision = vec![-1.0; N_IOU * N_REC * k_count * N_AREAS * N_MAX_DETS];
    let mut recall = vec![-1.0; N_IOU * k_count * N_AREAS * N_MAX_DETS];
    let am = N_AREAS * N_MAX_DETS;
    for (k, c) in per_cat.iter().enumerate() {
        for t in 0..N_IOU {
            for r in 0..N_REC {
                let src = (t * N_REC + r) * am;
                let dst = ((t * N_REC + r) * k_count + k) * am;
                precision[dst..dst + am].copy_from_slice(&c.precision[src..src + am]);
            }
            let src = t * am;
            let dst = (t * k_count + k) * am;
            recall[dst..dst + am].copy_from_slice(&c.recall[src..src + am]);
        }
    }
    Accumulated { cat_ids: ev.cat_ids.clone(), precision, recall }
}

fn accumulate_category(ev: &ImageEvals, k: usize, s: &mut Scratch) -> CategoryResult {
    let am = N_AREAS * N_MAX_DETS;
    let mut out = CategoryResult { precision: vec![-1.0; N_IOU * N_REC * am], recall: vec![-1.0; N_IOU * am] };
    let (p0, p1) = ev.cat_pairs[k];
    if p0 == p1 {
        // No image has ground truth or detections of this category: `E` is empty.
        return out;
    }
    let pairs = &ev.pairs[p0 as usize..p1 as usize];
    let d0 = pairs[0].det_start as usize;
    let d1 = pairs.last().map_or(d0, |p| (p.det_start + p.det_len) as usize);

    // np.argsort(-dtScores, kind='mergesort') over the images' detections
    // concatenated in image order: descending score, ties in concatenation order.
    // Cutting each image to maxDet keeps the relative order of what is left, so one
    // sort serves all three maxDets.
    s.order.clear();
    s.order.extend(d0 as u32..d1 as u32);
    let scores = &ev.det_score;
    s.order.sort_unstable_by(|&a, &b| by_score(scores[a as usize], scores[b as usize]).then(a.cmp(&b)));

    let rec_thrs = rec_thresholds();
    for (m, &max_det) in MAX_DETS.iter().enumerate() {
        s.bits.clear();
        for &d in &s.order {
            if usize::from(ev.det_rank[d as usize]) < max_det {
                s.bits.push(ev.det_bits[d as usize]);
            }
        }
        let nd = s.bits.len();
        for a in 0..N_AREAS {
            let npig: u64 = ev.npig[p0 as usize..p1 as usize].iter().map(|n| u64::from(n[a])).sum();
            if npig == 0 {
                continue;
            }
            let npig_f = npig as f64;
            let (mut tp, mut fp) = ([0u32; N_IOU], [0u32; N_IOU]);
            for pr in s.tp_pr.iter_mut() {
                pr.clear();
            }
            for b in &s.bits {
                let b = b[a];
                let mut f = b.fp;
                while f != 0 {
                    fp[f.trailing_zeros() as usize] += 1;
                    f &= f - 1;
                }
                let mut p = b.tp;
                while p != 0 {
                    let t = p.trailing_zeros() as usize;
                    tp[t] += 1;
                    let (tpf, fpf) = (f64::from(tp[t]), f64::from(fp[t]));
                    s.tp_pr[t].push(tpf / (fpf + tpf + f64::EPSILON));
                    p &= p - 1;
                }
            }
            for (t, (&tp_total, pr)) in tp.iter().zip(s.tp_pr.iter_mut()).enumerate() {
                out.recall[t * am + a * N_MAX_DETS + m] = if nd > 0 { f64::from(tp_total) / npig_f } else { 0.0 };
                for i in (1..pr.len()).rev() {
                    if pr[i] > pr[i - 1] {
                        pr[i - 1] = pr[i];
                    }
                }
                for (r, &thr) in rec_thrs.iter().enumerate() {
                    let q = if nd == 0 {
                        0.0
                    } else if 0.0 >= thr {
                        // The first detection: the envelope's maximum.
                        pr.first().copied().unwrap_or(0.0)
                    } else {
                        match first_count_reaching(thr, npig_f, pr.len()) {
                            Some(c) => pr[c - 1],
                            None => 0.0,
                        }
                    };
                    out.precision[(t * N_REC + r) * am + a * N_MAX_DETS + m] = q;
                }
            }
        }
    }
    out
}

/// The smallest true positive count `c` in `1..=max` with `c / npig >= thr`.
///
/// Why this is `searchsorted(rc, thr, 'left')`: recall only grows at true
/// positives, and `c / npig` is monotone in `c`, so the first detection whose
/// recall reaches `thr` is the `c`-th true positive. The precision envelope there is
/// the largest precision at or after it, and precision peaks at true positives, so
/// the envelope over true positives alone gives the same value.
fn first_count_reaching(thr: f64, npig: f64, max: usize) -> Option<usize> {
    // A first guess from the product, then exact steps with numpy's division.
    let mut c = ((thr * npig).floor() as usize).clamp(1, max.max(1));
    while c > 1 && (c - 1) as f64 / npig >= thr {
        c -= 1;
    }
    while c <= max && (c as f64) / npig < thr {
        c += 1;
    }
    (c <= max).then_some(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::coco::format::{CocoAnnotation, CocoCategory, CocoDetection, CocoGroundTruth, CocoImage};

    fn gt(n_objects: usize) -> CocoGroundTruth {
        CocoGroundTruth {
            info: None,
            images: vec![CocoImage { id: 7, ..Default::default() }],
            annotations: (0..n_objects)
                .map(|i| CocoAnnotation {
                    id: i as i64 + 1,
                    image_id: 7,
                    category_id: 3,
                    bbox: [100.0 * i as f64, 0.0, 50.0, 50.0],
                    area: 2500.0,
                    iscrowd: false,
                    ignore: None,
                })
                .collect(),
            categories: vec![CocoCategory { id: 3, name: "c".into(), supercategory: None }],
        }
    }

    fn det(x: f64, score: f64) -> CocoDetection {
        CocoDetection { image_id: 7, category_id: 3, bbox: [x, 0.0, 50.0, 50.0], score }
    }

    #[test]
    fn precision_is_interpolated_from_the_right() {
        // Two objects; ranked detections: miss, hit, hit.
        // Raw precision 0, 1/2, 2/3; envelope 2/3, 2/3, 2/3; recall 0, 1/2, 1.
        let g = gt(2);
        let dt = vec![det(1000.0, 0.9), det(0.0, 0.8), det(100.0, 0.7)];
        let acc = accumulate(&crate::eval::coco::evaluate::evaluate_images(&g, &dt));
        let eps = f64::EPSILON;
        let top = 2.0 / (3.0 + eps);
        for r in 0..N_REC {
            let p = acc.precision[acc.precision_index(0, r, 0, 0, 2)];
            assert_eq!(p, top, "recall point {r}");
        }
        assert_eq!(acc.recall[acc.recall_index(0, 0, 0, 2)], 1.0);
        // maxDets=1 keeps only the miss: precision 0 everywhere, recall 0.
        assert_eq!(acc.precision[acc.precision_index(0, 0, 0, 0, 0)], 0.0);
        assert_eq!(acc.recall[acc.recall_index(0, 0, 0, 0)], 0.0);
        // No small or large objects: -1.
        assert_eq!(acc.precision[acc.precision_index(0, 0, 0, 1, 2)], -1.0);
        assert_eq!(acc.recall[acc.recall_index(0, 0, 3, 2)], -1.0);
    }

    #[test]
    fn recall_points_past_the_last_detection_stay_zero() {
        // Four objects, one hit ranked first: recall reaches 1/4 only.
        let g = gt(4);
        let dt = vec![det(0.0, 0.9), det(1000.0, 0.5)];
        let acc = accumulate(&crate::eval::coco::evaluate::evaluate_images(&g, &dt));
        let at = |r| acc.precision[acc.precision_index(0, r, 0, 0, 2)];
        let p1 = 1.0 / (1.0 + f64::EPSILON);
        // searchsorted 'left': recall points 0.00..=0.25 land on the first detection.
        for r in 0..=25 {
            assert_eq!(at(r), p1, "recall point {r}");
        }
        for r in 26..N_REC {
            assert_eq!(at(r), 0.0, "recall point {r}");
        }
        assert_eq!(acc.recall[acc.recall_index(0, 0, 0, 2)], 0.25);
    }
}
