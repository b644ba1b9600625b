//! pycocotools' `summarize()`: the 12 bbox stats and their printed lines.
//!
//! Each stat is `np.mean(s[s > -1])` over a slice of precision or recall, or -1 when
//! that slice holds nothing to evaluate. The mean is computed as numpy does it
//! (pairwise summation over the slice in C order, then one division), so the stats
//! agree with pycocotools to the last bit, and so does the 3-decimal rounding of the
//! printed lines.

use serde::{Deserialize, Serialize};

use super::accumulate::Accumulated;
use super::{iou_thresholds, AREA_LABELS, MAX_DETS, N_IOU, N_REC};

/// The 12 COCO bbox metrics, named, plus the raw `stats` array of pycocotools'
/// `COCOeval.stats` (same order). -1 means "nothing to evaluate".
///
/// Serializes as `{"AP":..,"AP50":..,"AP75":..,"APs":..,"APm":..,"APl":..,
/// "AR1":..,"AR10":..,"AR100":..,"ARs":..,"ARm":..,"ARl":..,"stats":[...]}`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CocoMetrics {
    /// AP @[IoU=0.50:0.95 | area=all | maxDets=100].
    #[serde(rename = "AP")]
    pub ap: f64,
    /// AP @[IoU=0.50 | area=all | maxDets=100].
    #[serde(rename = "AP50")]
    pub ap50: f64,
    /// AP @[IoU=0.75 | area=all | maxDets=100].
    #[serde(rename = "AP75")]
    pub ap75: f64,
    /// AP @[IoU=0.50:0.95 | area=small | maxDets=100].
    #[serde(rename = "APs")]
    pub ap_small: f64,
    /// AP @[IoU=0.50:0.95 | area=medium | maxDets=100].
    #[serde(rename = "APm")]
    pub ap_medium: f64,
    /// AP @[IoU=0.50:0.95 | area=large | maxDets=100].
    #[serde(rename = "APl")]
    pub ap_large: f64,
    /// AR @[IoU=0.50:0.95 | area=all | maxDets=1].
    #[serde(rename = "AR1")]
    pub ar1: f64,
    /// AR @[IoU=0.50:0.95 | area=all | maxDets=10].
    #[serde(rename = "AR10")]
    pub ar10: f64,
    /// AR @[IoU=0.50:0.95 | area=all | maxDets=100].
    #[serde(rename = "AR100")]
    pub ar100: f64,
    /// AR @[IoU=0.50:0.95 | area=small | maxDets=100].
    #[serde(rename = "ARs")]
    pub ar_small: f64,
    /// AR @[IoU=0.50:0.95 | area=medium | maxDets=100].
    #[serde(rename = "ARm")]
    pub ar_medium: f64,
    /// AR @[IoU=0.50:0.95 | area=large | maxDets=100].
    #[serde(rename = "ARl")]
    pub ar_large: f64,
    /// `COCOeval.stats`: the twelve values above, in this order.
    pub stats: [f64; 12],
}

impl CocoMetrics {
    /// Names the values of a `COCOeval.stats` array.
    pub fn from_stats(stats: [f64; 12]) -> Self {
        let [ap, ap50, ap75, ap_small, ap_medium, ap_large, ar1, ar10, ar100, ar_small, ar_medium, ar_large] = stats;
        Self { ap, ap50, ap75, ap_small, ap_medium, ap_large, ar1, ar10, ar100, ar_small, ar_medium, ar_large, stats }
    }
}

/// One line of `summarize()`: which slice is averaged.
#[derive(Debug, Clone, Copy)]
struct StatSpec {
    /// Average precision (true) or recall (false).
    precision: bool,
    /// A single IoU threshold, or all of them.
    iou: Option<f64>,
    /// Index into the area ranges (all, small, medium, large).
    area: usize,
    /// The maxDets value.
    max_dets: usize,
}

/// `_summarizeDets`, in order.
const SPECS: [StatSpec; 12] = {
    const fn s(precision: bool, iou: Option<f64>, area: usize, max_dets: usize) -> StatSpec {
        StatSpec { precision, iou, area, max_dets }
    }
    [
        s(true, None, 0, 100),
        s(true, Some(0.5), 0, 100),
        s(true, Some(0.75), 0, 100),
        s(true, None, 1, 100),
        s(true, None, 2, 100),
        s(true, None, 3, 100),
        s(false, None, 0, 1),
        s(false, None, 0, 10),
        s(false, None, 0, 100),
        s(false, None, 1, 100),
        s(false, None, 2, 100),
        s(false, None, 3, 100),
    ]
};

/// Computes the 12 stats from the accumulated precision and recall.
pub(crate) fn summarize(acc: &Accumulated) -> CocoMetrics {
    let mut stats = [0.0; 12];
    let mut buf = Vec::new();
    for (stat, spec) in stats.iter_mut().zip(SPECS.iter()) {
        *stat = summarize_one(acc, spec, &mut buf);
    }
    CocoMetrics::from_stats(stats)
}

fn summarize_one(acc: &Accumulated, spec: &StatSpec, buf: &mut Vec<f64>) -> f64 {
    let thrs = iou_thresholds();
    // `np.where(iouThr == p.iouThrs)`: exact float equality, as in pycocotools.
    let ts: Vec<usize> = match spec.iou {
        Some(v) => (0..N_IOU).filter(|&t| thrs[t] == v).collect(),
        None => (0..N_IOU).collect(),
    };
    let ms: Vec<usize> = (0..MAX_DETS.len()).filter(|&m| MAX_DETS[m] == spec.max_dets).collect();
    let k_count = acc.num_categories();
    buf.clear();
    // `s[s > -1]` walks the sliced array in C order: t, (r,) k, then the area and
    // maxDets indices.
    for &t in &ts {
        if spec.precision {
            for r in 0..N_REC {
                for k in 0..k_count {
                    for &m in &ms {
                        let v = acc.precision[acc.precision_index(t, r, k, spec.area, m)];
                        if v > -1.0 {
                            buf.push(v);
                        }
                    }
                }
            }
        } else {
            for k in 0..k_count {
                for &m in &ms {
                    let v = acc.recall[acc.recall_index(t, k, spec.area, m)];
                    if v > -1.0 {
                        buf.push(v);
                    }
                }
            }
        }
    }
    if buf.is_empty() {
        -1.0
    } else {
        // np.mean: add.reduce starts from the identity 0.0, then divides by the count.
        (0.0 + pairwise_sum(buf)) / buf.len() as f64
    }
}

/// numpy's `pairwise_sum` for float64 (`loops_utils.h.src`): blocks of at most 128
/// summed with 8 accumulators, split in halves (multiples of 8) above that.
fn pairwise_sum(a: &[f64]) -> f64 {
    let n = a.len();
    if n < 8 {
        let mut res = -0.0;
        for &v in a {
            res += v;
        }
        res
    } else if n <= 128 {
        let mut r = [0.0f64; 8];
        r.copy_from_slice(&a[..8]);
        let mut i = 8;
        while i < n - (n % 8) {
            for (j, acc) in r.iter_mut().enumerate() {
                *acc += a[i + j];
            }
            i += 8;
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        while i < n {
            res += a[i];
            i += 1;
        }
        res
    } else {
        let mut n2 = n / 2;
        n2 -= n2 % 8;
        pairwise_sum(&a[..n2]) + pairwise_sum(&a[n2..])
    }
}

/// The twelve lines pycocotools' `summarize()` prints, each ending in a newline,
/// e.g. ` Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 0.504`.
pub fn summary_text(metrics: &CocoMetrics) -> String {
    let thrs = iou_thresholds();
    let mut out = String::new();
    for (spec, value) in SPECS.iter().zip(metrics.stats.iter()) {
        let (title, kind) = if spec.precision { ("Average Precision", "(AP)") } else { ("Average Recall", "(AR)") };
        let iou = match spec.iou {
            Some(v) => format!("{v:0.2}"),
            None => format!("{:0.2}:{:0.2}", thrs[0], thrs[N_IOU - 1]),
        };
        // ' {:<18} {} @[ IoU={:<9} | area={:>6s} | maxDets={:>3d} ] = {:0.3f}'
        out.push_str(&format!(
            " {title:<18} {kind} @[ IoU={iou:<9} | area={area:>6} | maxDets={md:>3} ] = {value:0.3}\n",
            area = AREA_LABELS[spec.area],
            md = spec.max_dets,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairwise_sum_follows_numpys_blocking() {
        // Values whose sum depends on the order of additions; the expected values
        // are numpy's: np.add.reduce(v) and np.mean(v) on the same list.
        let v: Vec<f64> = (0..300).map(|i| if i % 3 == 0 { 1e16 } else { 1.0 + f64::from(i) * 1e-3 }).collect();
        assert_eq!(pairwise_sum(&v), 1.0000000000000003e18);
        assert_eq!((0.0 + pairwise_sum(&v)) / 300.0, 3333333333333334.0);
        let naive: f64 = v.iter().fold(0.0, |a, b| a + b);
        assert_eq!(naive, 1e18, "a left-to-right sum differs, so the test tells them apart");
    }

    #[test]
    fn summary_lines_match_pycocotools_format() {
        let mut stats = [0.5; 12];
        stats[3] = -1.0;
        stats[0] = 0.0625; // an exact tie: Python rounds half to even, so does Rust
        let text = summary_text(&CocoMetrics::from_stats(stats));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 12);
        assert_eq!(lines[0], " Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 0.062");
        assert_eq!(lines[1], " Average Precision  (AP) @[ IoU=0.50      | area=   all | maxDets=100 ] = 0.500");
        assert_eq!(lines[3], " Average Precision  (AP) @[ IoU=0.50:0.95 | area= small | maxDets=100 ] = -1.000");
        assert_eq!(lines[6], " Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=  1 ] = 0.500");
        assert_eq!(lines[11], " Average Recall     (AR) @[ IoU=0.50:0.95 | area= large | maxDets=100 ] = 0.500");
    }

    #[test]
    fn metrics_serialize_with_coco_names() {
        let m = CocoMetrics::from_stats(std::array::from_fn(|i| i as f64));
        let v: serde_json::Value = serde_json::to_value(m).unwrap();
        assert_eq!(v["AP"], 0.0);
        assert_eq!(v["APs"], 3.0);
        assert_eq!(v["AR100"], 8.0);
        assert_eq!(v["ARl"], 11.0);
        assert_eq!(v["stats"][11], 11.0);
        let back: CocoMetrics = serde_json::from_value(v).unwrap();
        assert_eq!(back, m);
    }
}
