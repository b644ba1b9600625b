//! torchvision's CPU `nms`, `batched_nms` and `roi_align`, re-implemented on f32 slices.
//!
//! libtorch alone (what tch links) has no torchvision operators, so these are ours. They
//! follow torchvision's CPU kernels (`torchvision/csrc/ops/cpu/nms_kernel.cpp`,
//! `roi_align_kernel.cpp`, `roi_align_common.h`) operation for operation in float32, so their
//! outputs are bit-identical: same kept indices in the same order, same pooled values.
//!
//! Two details decide the exactness:
//! - Ties. Tied scores are common (saturated sigmoids, duplicated proposals), and the order
//!   among them decides which box survives and in which order detections come out. The nms
//!   kernel sorts stably (ties by index, [`sort_descending_stable`]); `batched_nms`'s
//!   per-class path merges with Python's `scores.sort(descending=True)`, which on CPU is
//!   libstdc++'s `std::sort` (introsort, *unstable*), replayed step for step by
//!   [`sort_descending`]. Both put NaN first, as ATen's comparator does.
//! - C++ `std::max`/`std::min` and float-to-int casts are spelled out where NaN or
//!   out-of-range values could make Rust's `f32::max` or `as` behave differently.

use mkonnx::model::arch::batched_nms_trick_max_candidates;
#[cfg(doc)]
use mkonnx::model::arch::{BATCHED_NMS_TRICK_MAX_NUMEL_CPU, BATCHED_NMS_TRICK_MAX_NUMEL_CUDA};

/// Errors of the operators' inputs.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum OpsError {
    /// Slices whose lengths disagree with each other or with the declared shape.
    #[error("{op}: {what}")]
    Shape {
        /// Operator name.
        op: &'static str,
        /// What does not fit.
        what: String,
    },
    /// A RoI names a batch image that the input does not have.
    #[error("roi_align: RoI {roi} has batch index {index}, the input has {batch} images")]
    BatchIndex {
        /// RoI row.
        roi: usize,
        /// Its batch index (first column), as written.
        index: f32,
        /// Images in the input.
        batch: usize,
    },
}

// ----------------------------------------------------------------------------- sorting

/// libstdc++'s `_S_threshold`: introsort leaves partitions this small to insertion sort.
const SORT_THRESHOLD: usize = 16;

/// The permutation that torch's CPU `values.sort(0, descending=True)` returns (its indices):
/// NaN first, then decreasing values; ties in the order libstdc++'s `std::sort` leaves them.
pub fn sort_descending(values: &[f32]) -> Vec<usize> {
    let mut items: Vec<(f32, usize)> = values.iter().copied().zip(0..).collect();
    // ATen's KeyValueCompDesc.
    let comp = |a: &(f32, usize), b: &(f32, usize)| (a.0.is_nan() && !b.0.is_nan()) || a.0 > b.0;
    std_sort(&mut items, &comp);
    items.into_iter().map(|(_, i)| i).collect()
}

/// The permutation of a stable descending sort (NaN first, ties by index): the order in
/// which torchvision's CPU nms kernel visits the boxes.
pub fn sort_descending_stable(values: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    let before = |a: f32, b: f32| (a.is_nan() && !b.is_nan()) || a > b;
    order.sort_by(|&i, &j| {
        if before(values[i], values[j]) {
            std::cmp::Ordering::Less
        } else if before(values[j], values[i]) {
            std::cmp::Ordering::Greater
        } else {
            std::cmp::Ordering::Equal
        }
    });
    order
}

/// libstdc++'s `std::sort`: introsort (median-of-three quicksort, heapsort past a depth of
/// 2·⌊log2 n⌋) down to partitions of 16, then one insertion sort pass.
fn std_sort<T: Copy, F: Fn(&T, &T) -> bool>(v: &mut [T], comp: &F) {
    let n = v.len();
    if n < 2 {
        return;
    }
    let depth = 2 * (usize::BITS - 1 - n.leading_zeros());
    introsort_loop(v, 0, n, depth, comp);
    final_insertion_sort(v, comp);
}

fn introsort_loop<T: Copy, F: Fn(&T, &T) -> bool>(v: &mut [T], first: usize, mut last: usize, mut depth: u32, comp: &F) {
    while last - first > SORT_THRESHOLD {
        if depth == 0 {
            heap_sort(&mut v[first..last], comp);
            return;
        }
        depth -= 1;
        let cut = unguarded_partition_pivot(v, first, last, comp);
        introsort_loop(v, cut, last, depth, comp);
        last = cut;
    }
}

fn unguarded_partition_pivot<T: Copy, F: Fn(&T, &T) -> bool>(v: &mut [T], first: usize, last: usize, comp: &F) -> usize {
    let mid = first + (last - first) / 2;
    move_median_to_first(v, first, first + 1, mid, last - 1, comp);
    unguarded_partition(v, first + 1, last, first, comp)
}

fn move_median_to_first<T: Copy, F: Fn(&T, &T) -> bool>(v: &mut [T], result: usize, a: usize, b: usize, c: usize, comp: &F) {
    let pick = if comp(&v[a], &v[b]) {
        if comp(&v[b], &v[c]) {
            b
        } else if comp(&v[a], &v[c]) {
            c
        } else {
            a
        }
    } else if comp(&v[a], &v[c]) {
        a
    } else if comp(&v[b], &v[c]) {
        c
    } else {
        b
    };
    v.swap(result, pick);
}

/// Hoare partition around `v[pivot]`; libstdc++ relies on sentinels, the bounds checks here
/// only guard against a comparator that is not a strict weak order (never taken otherwise).
fn unguarded_partition<T: Copy, F: Fn(&T, &T) -> bool>(v: &mut [T], mut first: usize, mut last: usize, pivot: usize, comp: &F) -> usize {
    loop {
        while first < v.len() - 1 && comp(&v[first], &v[pivot]) {
            first += 1;
        }
        last -= 1;
        while last > 0 && comp(&v[pivot], &v[last]) {
            last -= 1;
        }
        if first >= last {
            return first;
        }
        v.swap(first, last);
        first += 1;
    }
}

fn final_insertion_sort<T: Copy, F: Fn(&T, &T) -> bool>(v: &mut [T], comp: &F) {
    if v.len() > SORT_THRESHOLD {
        insertion_sort(&mut v[..SORT_THRESHOLD], comp);
        for i in SORT_THRESHOLD..v.len() {
            unguarded_linear_insert(v, i, comp);
        }
    } else {
        insertion_sort(v, comp);
    }
}

fn insertion_sort<T: Copy, F: Fn(&T, &T) -> bool>(v: &mut [T], comp: &F) {
    for i in 1..v.len() {
        if comp(&v[i], &v[0]) {
            let val = v[i];
            v.copy_within(0..i, 1);
            v[0] = val;
        } else {
            unguarded_linear_insert(v, i, comp);
        }
    }
}

fn unguarded_linear_insert<T: Copy, F: Fn(&T, &T) -> bool>(v: &mut [T], mut hole: usize, comp: &F) {
    let val = v[hole];
    while hole > 0 && comp(&val, &v[hole - 1]) {
        v[hole] = v[hole - 1];
        hole -= 1;
    }
    v[hole] = val;
}

/// `std::__partial_sort(first, last, last)`: make_heap, then sort_heap.
fn heap_sort<T: Copy, F: Fn(&T, &T) -> bool>(v: &mut [T], comp: &F) {
    let len = v.len();
    if len >= 2 {
        let mut parent = (len - 2) / 2;
        loop {
            let value = v[parent];
            adjust_heap(v, parent, len, value, comp);
            if parent == 0 {
                break;
            }
            parent -= 1;
        }
    }
    let mut last = len;
    while last > 1 {
        last -= 1;
        let value = v[last];
        v[last] = v[0];
        adjust_heap(&mut v[..last], 0, last, value, comp);
    }
}

fn adjust_heap<T: Copy, F: Fn(&T, &T) -> bool>(v: &mut [T], mut hole: usize, len: usize, value: T, comp: &F) {
    let top = hole;
    let mut second = hole;
    while second < (len.saturating_sub(1)) / 2 {
        second = 2 * (second + 1);
        if comp(&v[second], &v[second - 1]) {
            second -= 1;
        }
        v[hole] = v[second];
        hole = second;
    }
    if len & 1 == 0 && len >= 2 && second == (len - 2) / 2 {
        second = 2 * (second + 1);
        v[hole] = v[second - 1];
        hole = second - 1;
    }
    // __push_heap
    while hole > top {
        let parent = (hole - 1) / 2;
        if !comp(&v[parent], &value) {
            break;
        }
        v[hole] = v[parent];
        hole = parent;
    }
    v[hole] = value;
}

// ----------------------------------------------------------------------------- NMS

/// C++ `std::max(a, b)`: `a < b ? b : a` (keeps `a` when either is NaN).
fn cmax(a: f32, b: f32) -> f32 {
    if a < b {
        b
    } else {
        a
    }
}

/// C++ `std::min(a, b)`: `b < a ? b : a`.
fn cmin(a: f32, b: f32) -> f32 {
    if b < a {
        b
    } else {
        a
    }
}

/// `torchvision.ops.nms` on CPU: indices of the kept boxes, by decreasing score.
///
/// `iou_threshold` is a double as in torchvision (the IoU, a float, is compared to it
/// widened): pass the value the Python side would (see [`python_float`]).
pub fn nms(boxes: &[[f32; 4]], scores: &[f32], iou_threshold: f64) -> Result<Vec<usize>, OpsError> {
    if boxes.len() != scores.len() {
        return Err(OpsError::Shape { op: "nms", what: format!("{} boxes but {} scores", boxes.len(), scores.len()) });
    }
    let n = boxes.len();
    let areas: Vec<f32> = boxes.iter().map(|b| (b[2] - b[0]) * (b[3] - b[1])).collect();
    let order = sort_descending_stable(scores);
    let mut suppressed = vec![false; n];
    let mut keep = Vec::new();
    for (pos, &i) in order.iter().enumerate() {
        if suppressed[i] {
            continue;
        }
        keep.push(i);
        let [ix1, iy1, ix2, iy2] = boxes[i];
        let iarea = areas[i];
        for &j in &order[pos + 1..] {
            if suppressed[j] {
                continue;
            }
            let xx1 = cmax(ix1, boxes[j][0]);
            let yy1 = cmax(iy1, boxes[j][1]);
            let xx2 = cmin(ix2, boxes[j][2]);
            let yy2 = cmin(iy2, boxes[j][3]);
            let w = cmax(0.0, xx2 - xx1);
            let h = cmax(0.0, yy2 - yy1);
            let inter = w * h;
            let ovr = inter / (iarea + areas[j] - inter);
            if f64::from(ovr) > iou_threshold {
                suppressed[j] = true;
            }
        }
    }
    Ok(keep)
}

/// `torchvision.ops.batched_nms`: NMS independently per category `idxs`, indices of the kept
/// boxes by decreasing score. Like torchvision it offsets boxes per category and runs one
/// NMS (the "coordinate trick") unless `boxes.numel()` exceeds
/// [`BATCHED_NMS_TRICK_MAX_NUMEL_CPU`] (on CUDA, `on_cuda`, [`BATCHED_NMS_TRICK_MAX_NUMEL_CUDA`]),
/// where it loops over the categories and merges by a sort.
pub fn batched_nms(boxes: &[[f32; 4]], scores: &[f32], idxs: &[i64], iou_threshold: f64, on_cuda: bool) -> Result<Vec<usize>, OpsError> {
    if boxes.len() != scores.len() || boxes.len() != idxs.len() {
        return Err(OpsError::Shape {
            op: "batched_nms",
            what: format!("{} boxes, {} scores and {} category indices", boxes.len(), scores.len(), idxs.len()),
        });
    }
    if boxes.len() > batched_nms_trick_max_candidates(on_cuda) {
        batched_nms_vanilla(boxes, scores, idxs, iou_threshold)
    } else {
        batched_nms_coordinate_trick(boxes, scores, idxs, iou_threshold)
    }
}

fn batched_nms_coordinate_trick(boxes: &[[f32; 4]], scores: &[f32], idxs: &[i64], iou_threshold: f64) -> Result<Vec<usize>, OpsError> {
    if boxes.is_empty() {
        return Ok(Vec::new());
    }
    // boxes.max(): NaN propagates, as torch's max reduction does.
    let max_coordinate = boxes.iter().flatten().fold(f32::NEG_INFINITY, |m, &v| if v.is_nan() || m.is_nan() { f32::NAN } else { m.max(v) });
    let span = max_coordinate + 1.0;
    let shifted: Vec<[f32; 4]> = boxes
        .iter()
        .zip(idxs)
        .map(|(b, &c)| {
            let offset = c as f32 * span;
            b.map(|v| v + offset)
        })
        .collect();
    nms(&shifted, scores, iou_threshold)
}

fn batched_nms_vanilla(boxes: &[[f32; 4]], scores: &[f32], idxs: &[i64], iou_threshold: f64) -> Result<Vec<usize>, OpsError> {
    let mut classes: Vec<i64> = idxs.to_vec();
    classes.sort_unstable();
    classes.dedup();
    let mut keep_mask = vec![false; boxes.len()];
    for class in classes {
        let members: Vec<usize> = (0..idxs.len()).filter(|&i| idxs[i] == class).collect();
        let b: Vec<[f32; 4]> = members.iter().map(|&i| boxes[i]).collect();
        let s: Vec<f32> = members.iter().map(|&i| scores[i]).collect();
        for k in nms(&b, &s, iou_threshold)? {
            keep_mask[members[k]] = true;
        }
    }
    let kept: Vec<usize> = (0..boxes.len()).filter(|&i| keep_mask[i]).collect();
    let kept_scores: Vec<f32> = kept.iter().map(|&i| scores[i]).collect();
    Ok(sort_descending(&kept_scores).into_iter().map(|k| kept[k]).collect())
}

/// The double that Python passes for a hyperparameter stored here as f32: the shortest
/// decimal that round-trips the f32 (what a config file holds, `0.7`), read as f64. Using
/// `f64::from(0.7f32)` = 0.69999998807907 instead would move NMS's `IoU > threshold` test
/// for IoUs between the two.
pub fn python_float(x: f32) -> f64 {
    format!("{x}").parse().unwrap_or(f64::from(x))
}

// ----------------------------------------------------------------------------- RoIAlign

/// Parameters of `torchvision.ops.roi_align`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RoiAlignParams {
    /// Scale from RoI coordinates to feature-map coordinates.
    pub spatial_scale: f32,
    /// Output height.
    pub pooled_height: usize,
    /// Output width.
    pub pooled_width: usize,
    /// Samples per bin and direction; <= 0 means adaptive (`ceil(roi size / output size)`).
    pub sampling_ratio: i32,
    /// Half-pixel offset (`aligned=True`).
    pub aligned: bool,
}

/// One bilinear sample: four input offsets (within a channel plane) and their weights.
#[derive(Clone, Copy, Default)]
struct PreCalc {
    pos: [usize; 4],
    w: [f32; 4],
}

/// `torchvision.ops.roi_align` (CPU kernel, average pooling) of `input` [N, C, H, W] over
/// `rois` [K, 5] = (batch index, x1, y1, x2, y2), writing [K, C, ph, pw] into `output`.
pub fn roi_align(input: &[f32], shape: [usize; 4], rois: &[[f32; 5]], p: &RoiAlignParams, output: &mut [f32]) -> Result<(), OpsError> {
    let [batch, channels, height, width] = shape;
    let plane = height * width;
    if input.len() != batch * channels * plane {
        return Err(OpsError::Shape {
            op: "roi_align",
            what: format!("input has {} values, shape {shape:?} needs {}", input.len(), batch * channels * plane),
        });
    }
    let (ph_n, pw_n) = (p.pooled_height, p.pooled_width);
    let per_roi = channels * ph_n * pw_n;
    if output.len() != rois.len() * per_roi {
        return Err(OpsError::Shape {
            op: "roi_align",
            what: format!("output has {} values, {} RoIs need {}", output.len(), rois.len(), rois.len() * per_roi),
        });
    }
    if per_roi == 0 {
        return Ok(());
    }
    let mut pre_calc = Vec::new();
    for (n, (roi, out)) in rois.iter().zip(output.chunks_exact_mut(per_roi)).enumerate() {
        // C++ `int roi_batch_ind = offset_rois[0]` truncates.
        let b = roi[0];
        if !(b > -1.0 && (b.trunc() as usize) < batch) {
            return Err(OpsError::BatchIndex { roi: n, index: b, batch });
        }
        let b = b.trunc() as usize;
        let offset = if p.aligned { 0.5f32 } else { 0.0 };
        let roi_start_w = roi[1] * p.spatial_scale - offset;
        let roi_start_h = roi[2] * p.spatial_scale - offset;
        let roi_end_w = roi[3] * p.spatial_scale - offset;
        let roi_end_h = roi[4] * p.spatial_scale - offset;
        let mut roi_width = roi_end_w - roi_start_w;
        let mut roi_height = roi_end_h - roi_start_h;
        if !p.aligned {
            // Malformed RoIs are forced to 1x1.
            roi_width = cmax(roi_width, 1.0);
            roi_height = cmax(roi_height, 1.0);
        }
        let bin_size_h = roi_height / ph_n as f32;
        let bin_size_w = roi_width / pw_n as f32;
        let grid_h = if p.sampling_ratio > 0 { p.sampling_ratio } else { (roi_height / ph_n as f32).ceil() as i32 };
        let grid_w = if p.sampling_ratio > 0 { p.sampling_ratio } else { (roi_width / pw_n as f32).ceil() as i32 };
        let (grid_h, grid_w) = (grid_h.max(0) as usize, grid_w.max(0) as usize);
        let count = (grid_h * grid_w).max(1) as f32;

        pre_calc.clear();
        pre_calc.reserve(grid_h * grid_w * ph_n * pw_n);
        for ph in 0..ph_n {
            for pw in 0..pw_n {
                for iy in 0..grid_h {
                    let yy = roi_start_h + ph as f32 * bin_size_h + (iy as f32 + 0.5) * bin_size_h / grid_h as f32;
                    for ix in 0..grid_w {
                        let xx = roi_start_w + pw as f32 * bin_size_w + (ix as f32 + 0.5) * bin_size_w / grid_w as f32;
                        pre_calc.push(bilinear_weights(height, width, yy, xx));
                    }
                }
            }
        }

        let base = &input[b * channels * plane..(b + 1) * channels * plane];
        for (c, out_c) in out.chunks_exact_mut(ph_n * pw_n).enumerate() {
            let x = &base[c * plane..(c + 1) * plane];
            let mut samples = pre_calc.iter();
            for o in out_c.iter_mut() {
                let mut val = 0.0f32;
                for pc in samples.by_ref().take(grid_h * grid_w) {
                    val += pc.w[0] * x[pc.pos[0]] + pc.w[1] * x[pc.pos[1]] + pc.w[2] * x[pc.pos[2]] + pc.w[3] * x[pc.pos[3]];
                }
                *o = val / count;
            }
        }
    }
    Ok(())
}

/// One coordinate of a sampling point: clamped at 0, its lower and upper neighbour on an axis
/// of `size` cells, and the coordinate moved onto the last cell when it lies past it.
fn neighbours(v: f32, size: usize) -> (f32, usize, usize) {
    let v = if v <= 0.0 { 0.0 } else { v };
    let low = v as usize;
    if low >= size - 1 {
        ((size - 1) as f32, size - 1, size - 1)
    } else {
        (v, low, low + 1)
    }
}

/// `pre_calc_for_bilinear_interpolate` for one sampling point.
fn bilinear_weights(height: usize, width: usize, yy: f32, xx: f32) -> PreCalc {
    let (h, w) = (height as f32, width as f32);
    // Written as !(in range) so that NaN coordinates count as outside.
    if !(f64::from(yy) >= -1.0 && yy <= h && f64::from(xx) >= -1.0 && xx <= w) || height == 0 || width == 0 {
        return PreCalc::default();
    }
    let (y, y_low, y_high) = neighbours(yy, height);
    let (x, x_low, x_high) = neighbours(xx, width);
    let ly = y - y_low as f32;
    let lx = x - x_low as f32;
    let hy = 1.0 - ly;
    let hx = 1.0 - lx;
    PreCalc {
        pos: [y_low * width + x_low, y_low * width + x_high, y_high * width + x_low, y_high * width + x_high],
        w: [hy * hx, hy * lx, ly * hx, ly * lx],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sort_puts_nan_first_and_orders_descending() {
        let v = [1.0, f32::NAN, 2.0, f32::NEG_INFINITY, f32::INFINITY];
        assert_eq!(sort_descending(&v), vec![1, 4, 2, 0, 3]);
        let v = [0.5, 1.0, 0.5, f32::NAN, 1.0, 0.0, -0.0];
        assert_eq!(sort_descending_stable(&v), vec![3, 1, 4, 0, 2, 5, 6]);
    }

    #[test]
    fn sort_is_a_permutation_in_order_for_long_inputs() {
        // Deterministic pseudo-random values with many ties, past the insertion-sort size.
        let v: Vec<f32> = (0..5000u32).map(|i| ((i.wrapping_mul(2654435761) >> 7) % 37) as f32).collect();
        let order = sort_descending(&v);
        let mut seen = order.clone();
        seen.sort_unstable();
        assert_eq!(seen, (0..v.len()).collect::<Vec<_>>());
        assert!(order.windows(2).all(|w| v[w[0]] >= v[w[1]]));
    }

    #[test]
    fn heap_sort_fallback_sorts() {
        let mut v: Vec<(f32, usize)> = (0..100).map(|i| (((i * 37) % 11) as f32, i)).collect();
        let comp = |a: &(f32, usize), b: &(f32, usize)| a.0 > b.0;
        heap_sort(&mut v, &comp);
        assert!(v.windows(2).all(|w| w[0].0 >= w[1].0));
    }

    #[test]
    fn nms_suppresses_overlaps_only_above_threshold() {
        let boxes = [[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0], [20.0, 20.0, 30.0, 30.0]];
        // IoU(0, 1) = 90 / 110 = 0.818.
        assert_eq!(nms(&boxes, &[0.9, 0.8, 0.7], 0.5).unwrap(), vec![0, 2]);
        assert_eq!(nms(&boxes, &[0.9, 0.8, 0.7], 0.85).unwrap(), vec![0, 1, 2]);
        assert!(nms(&boxes, &[0.9], 0.5).is_err());
    }

    #[test]
    fn batched_nms_keeps_other_categories() {
        let boxes = [[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]];
        assert_eq!(batched_nms(&boxes, &[0.5, 0.6], &[1, 2], 0.5, false).unwrap(), vec![1, 0]);
        assert_eq!(batched_nms(&boxes, &[0.5, 0.6], &[1, 1], 0.5, false).unwrap(), vec![1]);
    }

    #[test]
    fn python_float_recovers_the_decimal() {
        assert_eq!(python_float(0.7), 0.7f64);
        assert_eq!(python_float(1e-5), 1e-5f64);
        assert_eq!(python_float(0.5), 0.5f64);
    }

    #[test]
    fn roi_align_of_a_constant_map_is_constant_inside() {
        let input = vec![2.0f32; 2 * 8 * 8];
        let p = RoiAlignParams { spatial_scale: 1.0, pooled_height: 2, pooled_width: 2, sampling_ratio: 2, aligned: false };
        let mut out = vec![0.0; 2 * 2 * 2];
        roi_align(&input, [1, 2, 8, 8], &[[0.0, 1.0, 1.0, 5.0, 5.0]], &p, &mut out).unwrap();
        assert!(out.iter().all(|&v| v == 2.0));
        let err = roi_align(&input, [1, 2, 8, 8], &[[1.0, 1.0, 1.0, 5.0, 5.0]], &p, &mut out).unwrap_err();
        assert!(matches!(err, OpsError::BatchIndex { .. }));
    }
}
