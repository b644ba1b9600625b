//! torchvision's `GeneralizedRCNN.forward` (eval) after the transform, written once over
//! [`PipelineOps`]: the RPN's proposals ([`proposals`]), `MultiScaleRoIAlign`
//! ([`multi_scale_roi_align`]) and `RoIHeads.postprocess_detections` with
//! `transform.postprocess` ([`detections`]), tied together by [`detect`].
//!
//! The ONNX writer runs this description as graph nodes on padded per-batch tensors; the
//! libtorch runner runs it as eager PyTorch's ATen calls on per-image tensors. What differs
//! between them is only how a backend carries per-image sets of candidates
//! ([`PipelineOps::Sets`]): the graph keeps every image's candidates in one padded
//! `[B, K, ...]` tensor and marks dropped ones, the runner keeps a tensor per image and
//! drops them, as eager does. The steps, their order and every formula are here.
//!
//! Operation order and tensor shapes follow torchvision's code: the runner must equal eager
//! PyTorch bit for bit, and ATen rounds a transcendental op (`exp`, `sigmoid`, `softmax`)
//! differently in a loop's SIMD body and its scalar tail, so each one runs on the elements,
//! in the order, that eager's runs on.

use super::{box_coder, boxes, level_mapper, DetectionOps, ImageSize};
use crate::model::anchors::cell_anchors;
use crate::model::arch::{
    Architecture, DetectorParams, DETECTION_MIN_BOX_SIZE, ROI_BOX_CODER_WEIGHTS, ROI_FEATURE_NAMES, RPN_MIN_BOX_SIZE, SIZE_DIVISIBLE,
};
use crate::model::network;
use crate::model::weights::WeightError;

/// Candidates of an image (or, in a padded backend, of every image): boxes [.., N, 4],
/// scores [.., N] and class ids [.., N] (float32: RPN levels 0.., or labels 1..).
pub struct Candidates<T> {
    /// Boxes (x1, y1, x2, y2).
    pub boxes: T,
    /// Scores (objectness probabilities, or class probabilities).
    pub scores: T,
    /// The id `batched_nms` suppresses within: the feature level, or the label.
    pub classes: T,
}

/// The RPN's proposals per image: boxes [K_i, 4] and objectness [K_i].
pub struct Proposals<S> {
    /// Boxes in the resized frame, by decreasing objectness.
    pub boxes: S,
    /// Their objectness probabilities.
    pub scores: S,
}

/// One image's sizes, as the formulas' scalars.
pub struct Frame<S> {
    /// After the transform's resize (the frame proposals and detections live in).
    pub resized: ImageSize<S>,
    /// The input image (the frame detections are returned in).
    pub original: ImageSize<S>,
}

/// What the pipeline does with tensors beyond the formulas' [`DetectionOps`]: shapes, top-k,
/// gathers, NMS, RoIAlign, and per-image sets.
///
/// Axes are counted from the end where a padded backend has one more (the batch) than a
/// per-image one: inside [`PipelineOps::map_images`], boxes are `[.., N, 4]` and scores
/// `[.., N]` in both.
pub trait PipelineOps: DetectionOps {
    /// A whole number known from shapes (a feature map side, a count, a stride): an int64
    /// graph value in ONNX, a number on libtorch.
    type Int: Clone;
    /// Per-image sets of rows, as many per image as that image has (proposals, detections).
    type Sets;
    /// The batch's image sizes (one [`Frame`] per image) and its padded size.
    type Frames;

    /// The size of `x` along `axis` (negative: from the end).
    fn dim(&mut self, x: &Self::Tensor, axis: i64) -> Self::Int;
    /// `a + b`.
    fn int_add(&mut self, a: &Self::Int, b: &Self::Int) -> Self::Int;
    /// `a // b` (both positive).
    fn int_div(&mut self, a: &Self::Int, b: &Self::Int) -> Self::Int;
    /// `a * b`.
    fn int_mul(&mut self, a: &Self::Int, b: &Self::Int) -> Self::Int;
    /// The constant `v`.
    fn int_const(&mut self, v: i64) -> Self::Int;
    /// `i` as a scalar of the formulas.
    fn int_scalar(&mut self, i: &Self::Int) -> Self::Scalar;
    /// `a / b` as Python divides two ints (a double), used as float32.
    fn quotient(&mut self, a: &Self::Scalar, b: &Self::Scalar) -> Self::Scalar;
    /// `torch.tensor(x, dtype=float32).log2().round()`.
    fn log2_round(&mut self, x: &Self::Scalar) -> Self::Scalar;
    /// `2 ** e`.
    fn pow2(&mut self, e: &Self::Scalar) -> Self::Scalar;
    /// `-x`.
    fn neg(&mut self, x: &Self::Scalar) -> Self::Scalar;

    /// The padded batch's [height, width] (`ImageList.tensors.shape[-2:]`).
    fn padded_size(&mut self, frames: &Self::Frames) -> [Self::Int; 2];
    /// The tallest resized image of the batch, as `MultiScaleRoIAlign` measures scales by.
    fn max_resized_height(&mut self, frames: &Self::Frames) -> Self::Scalar;
    /// `MultiScaleRoIAlign`'s level scale exponents: `compute`d, or what the backend kept
    /// from an earlier batch (torchvision's module computes them on its first call only).
    fn level_exponents(&mut self, compute: impl FnOnce(&mut Self) -> Vec<Self::Scalar>) -> Vec<Self::Scalar>;

    /// float32 `[0, s, 2s, .., (n - 1)s]`.
    fn strided_range(&mut self, n: &Self::Int, s: &Self::Int) -> Self::Tensor;
    /// `torch.meshgrid(ys, xs, indexing="ij")`, each flattened: [h·w] y and x.
    fn mesh(&mut self, ys: &Self::Tensor, xs: &Self::Tensor) -> [Self::Tensor; 2];
    /// A constant float32 tensor.
    fn const_tensor(&mut self, values: &[f32], shape: &[i64]) -> Self::Tensor;
    /// `a / b`, broadcasting.
    fn div(&mut self, a: &Self::Tensor, b: &Self::Tensor) -> Self::Tensor;
    /// `x.reshape(shape)`, where 0 keeps that axis of `x` and -1 is inferred.
    fn reshape(&mut self, x: &Self::Tensor, shape: &[i64]) -> Self::Tensor;
    /// `torch.cat(xs, axis)`.
    fn concat(&mut self, xs: &[Self::Tensor], axis: i64) -> Self::Tensor;
    /// torchvision's `permute_and_flatten(x, N, A, c, H, W)`: [B, A·c, H, W] → [B, H·W·A, c].
    fn permute_and_flatten(&mut self, x: &Self::Tensor, c: i64) -> Self::Tensor;
    /// `x.topk(min(cap, n), dim=-1)`: (values, indices) of each row's largest.
    fn top_k(&mut self, x: &Self::Tensor, cap: usize) -> (Self::Tensor, Self::Tensor);
    /// Indices plus `by`.
    fn offset_indices(&mut self, indices: &Self::Tensor, by: &Self::Int) -> Self::Tensor;
    /// `x[batch_idx, indices]` for x [B, N, 4] and indices [B, K]: [B, K, 4].
    fn gather_boxes(&mut self, x: &Self::Tensor, indices: &Self::Tensor) -> Self::Tensor;
    /// A float32 tensor shaped like `like`, every value `v`.
    fn fill_like(&mut self, like: &Self::Tensor, v: f64) -> Self::Tensor;
    /// `torch.sigmoid`.
    fn sigmoid(&mut self, x: &Self::Tensor) -> Self::Tensor;
    /// `F.softmax(x, -1)`.
    fn softmax(&mut self, x: &Self::Tensor) -> Self::Tensor;
    /// The boolean mask `x > s`.
    fn greater(&mut self, x: &Self::Tensor, s: &Self::Scalar) -> Self::Tensor;
    /// `x` from index `start` on along `axis` (negative).
    fn slice_from(&mut self, x: &Self::Tensor, axis: i64, start: i64) -> Self::Tensor;
    /// `x` with axes `axis` and `axis + 1` (negative) merged into one.
    fn merge_axes(&mut self, x: &Self::Tensor, axis: i64) -> Self::Tensor;
    /// Float32 class ids shaped like `scores` [.., C]: `arange(C)` along the last axis.
    fn class_ids_like(&mut self, scores: &Self::Tensor) -> Self::Tensor;

    /// Per-image sets from a batch tensor [B, N, ...] (N rows for every image).
    fn per_image(&mut self, x: &Self::Tensor) -> Self::Sets;
    /// Every image's rows, image after image: [R, ...].
    fn rows(&mut self, sets: &Self::Sets) -> Self::Tensor;
    /// The image each of [`rows`](PipelineOps::rows)' rows belongs to, [R], as RoIAlign takes it.
    fn batch_index(&mut self, sets: &Self::Sets) -> Self::Tensor;
    /// Rows [R, ...] laid out as `like` ([`rows`](PipelineOps::rows)' inverse).
    fn split_rows(&mut self, rows: &Self::Tensor, like: &Self::Sets) -> Self::Sets;
    /// `f` on each image's tensors (taken from `inputs`, one per set) and frame; returns the
    /// per-image sets of `f`'s outputs. A padded backend calls `f` once on the whole batch.
    fn map_images<F>(&mut self, frames: &Self::Frames, inputs: &[&Self::Sets], f: F) -> Vec<Self::Sets>
    where
        F: FnMut(&mut Self, &[Self::Tensor], &Frame<Self::Scalar>) -> Vec<Self::Tensor>;
    /// The candidates where `keep` [.., N] holds (`boxes[keep]`, ...); the rest are gone.
    fn keep_where(&mut self, c: Candidates<Self::Tensor>, keep: &Self::Tensor) -> Candidates<Self::Tensor>;
    /// `keep = batched_nms(boxes, scores, classes, iou)[:k]`, then the candidates at `keep`
    /// (by decreasing score). `class_ids` are the values `classes` can take.
    ///
    /// A padded backend fills rows past an image's count with other candidates' boxes and
    /// the score [`PipelineOps::without_padding`] recognizes.
    fn batched_nms_top(
        &mut self,
        c: &Candidates<Self::Tensor>,
        class_ids: std::ops::Range<usize>,
        iou: f32,
        k: usize,
    ) -> Candidates<Self::Tensor>;

    /// `roi_align(map, [batch_index, rois], output 7x7, spatial_scale, sampling 2,
    /// aligned=False)` as `MultiScaleRoIAlign` calls it: [R, C, 7, 7].
    fn roi_align(&mut self, map: &Self::Tensor, rois: &Self::Tensor, batch_index: &Self::Tensor, scale: &Self::Scalar) -> Self::Tensor;
    /// Which rows have `levels[row] == level`: an index for [`take_rows`](PipelineOps::take_rows).
    fn rows_at_level(&mut self, levels: &Self::Tensor, level: usize) -> Self::Tensor;
    /// `x[index]`.
    fn take_rows(&mut self, x: &Self::Tensor, index: &Self::Tensor) -> Self::Tensor;
    /// `into[index] = rows`.
    fn put_rows(&mut self, into: Self::Tensor, index: &Self::Tensor, rows: &Self::Tensor) -> Self::Tensor;
    /// `boxes` [R, 4] with the rows that pad a set (those `batched_nms_top` filled, told by
    /// their `scores` [R]) made zero-sized: a box decoded against a zero-sized reference is
    /// zero-sized, and `remove_small_boxes` drops it, so padding never becomes a detection.
    /// The identity where sets are not padded.
    fn without_padding(&mut self, boxes: &Self::Tensor, scores: &Self::Tensor) -> Self::Tensor;
    /// Zeros [R, C, 7, 7] for `rois` [R, 4] and a feature map of C channels.
    fn zeros_pooled(&mut self, rois: &Self::Tensor, map: &Self::Tensor) -> Self::Tensor;

    /// Marks the end of a phase of [`detect`] (a backend that runs eagerly may time them).
    fn phase_done(&mut self, _phase: &'static str) {}
}

/// `GeneralizedRCNN.forward` after the transform, for the padded batch `images` of
/// `frames`: the backbone, the RPN, RoI pooling, the box head and post-processing.
/// Returns the proposals (boxes, in the resized frame) and the detections (boxes in each
/// image's original frame, scores, labels), per image.
pub fn detect<B: PipelineOps>(
    b: &mut B,
    arch: Architecture,
    params: &DetectorParams,
    images: &B::Tensor,
    frames: &B::Frames,
) -> Result<(B::Sets, Candidates<B::Sets>), WeightError> {
    let features = network::backbone(b, arch, images)?;
    b.phase_done("backbone+fpn");
    let proposals = proposals(b, arch, params, &features.maps, frames)?;
    b.phase_done("rpn");
    let pooled = multi_scale_roi_align(b, &features.names, &features.maps, &proposals.boxes, frames);
    b.phase_done("roi_align");
    let x = network::box_head(b, arch, &pooled)?;
    let (class_logits, box_regression) = network::box_predictor(b, &x)?;
    let detections = detections(b, params, &class_logits, &box_regression, &proposals, frames);
    b.phase_done("roi_heads");
    Ok((proposals.boxes, detections))
}

/// `GeneralizedRCNNTransform.normalize`: `(image - mean[:, None, None]) / std[:, None, None]`
/// for images [.., 3, H, W].
pub fn normalize<B: PipelineOps>(b: &mut B, p: &DetectorParams, images: &B::Tensor) -> B::Tensor {
    let mean = b.const_tensor(&p.image_mean, &[3, 1, 1]);
    let std = b.const_tensor(&p.image_std, &[3, 1, 1]);
    let centred = b.sub(images, &mean);
    b.div(&centred, &std)
}

/// `GeneralizedRCNNTransform.batch_images`: a side padded up to a multiple of
/// [`SIZE_DIVISIBLE`], `ceil(side / 32) * 32`.
pub fn padded_side<B: PipelineOps>(b: &mut B, side: &B::Int) -> B::Int {
    let below = b.int_const(SIZE_DIVISIBLE - 1);
    let divisor = b.int_const(SIZE_DIVISIBLE);
    let up = b.int_add(side, &below);
    let blocks = b.int_div(&up, &divisor);
    b.int_mul(&blocks, &divisor)
}

/// `AnchorGenerator.grid_anchors` for one feature map: the level's cell anchors shifted
/// over the map, with stride = padded image size // map size, for the padded batch's
/// [height, width] `padded`. [h·w·A, 4].
pub fn grid_anchors<B: PipelineOps>(b: &mut B, feature: &B::Tensor, cells: &[[f32; 4]], padded: &[B::Int; 2]) -> B::Tensor {
    let [padded_h, padded_w] = padded;
    let (h, w) = (b.dim(feature, 2), b.dim(feature, 3));
    let stride_h = b.int_div(padded_h, &h);
    let stride_w = b.int_div(padded_w, &w);
    let ys = b.strided_range(&h, &stride_h);
    let xs = b.strided_range(&w, &stride_w);
    let [ys, xs] = b.mesh(&ys, &xs);
    let shifts = b.stack_coords(&[xs.clone(), ys.clone(), xs, ys]);
    let shifts = b.reshape(&shifts, &[-1, 1, 4]);
    let flat: Vec<f32> = cells.iter().flatten().copied().collect();
    let base = b.const_tensor(&flat, &[1, cells.len() as i64, 4]);
    let anchors = b.plus(&shifts, &base);
    b.reshape(&anchors, &[-1, 4])
}

/// `RegionProposalNetwork.forward` (eval): the head on every level, anchors, decoding, the
/// per-level top-n (`_get_top_n_idx`) and `filter_proposals`: per image, clipping, small and
/// low-score removal, NMS per level and the post-NMS top-n. Proposals [K_i, 4] per image, by
/// decreasing objectness, in the resized frame, and their objectness [K_i].
pub fn proposals<B: PipelineOps>(
    b: &mut B,
    arch: Architecture,
    p: &DetectorParams,
    maps: &[B::Tensor],
    frames: &B::Frames,
) -> Result<Proposals<B::Sets>, WeightError> {
    let (sizes, ratios) = (arch.anchor_sizes(), arch.aspect_ratios());
    let mut objectness = Vec::with_capacity(maps.len());
    let mut deltas = Vec::with_capacity(maps.len());
    let mut anchors = Vec::with_capacity(maps.len());
    let padded = b.padded_size(frames);
    for ((map, sizes), ratios) in maps.iter().zip(&sizes).zip(&ratios) {
        let (logits, bbox) = network::rpn_head(b, arch, map)?;
        // concat_box_prediction_layers: [B, H·W·A] logits and [B, H·W·A, 4] deltas per level.
        let flat = b.permute_and_flatten(&logits, 1);
        objectness.push(b.reshape(&flat, &[0, -1]));
        deltas.push(b.permute_and_flatten(&bbox, 4));
        anchors.push(grid_anchors(b, map, &cell_anchors(sizes, ratios), &padded));
    }
    let anchors = b.concat(&anchors, 0);
    let deltas = b.concat(&deltas, 1);
    // BoxCoder.decode: every image's deltas against the same anchors, [B, T, 4].
    let proposals = box_coder::decode(b, &deltas, &anchors, [1.0; 4]);

    // _get_top_n_idx: the pre-NMS top-n of each level, as indices into all levels.
    let mut offset = b.int_const(0);
    let mut top_logits = Vec::with_capacity(maps.len());
    let mut top_index = Vec::with_capacity(maps.len());
    let mut top_levels = Vec::with_capacity(maps.len());
    for (level, level_objectness) in objectness.iter().enumerate() {
        let (values, index) = b.top_k(level_objectness, p.rpn_pre_nms_top_n_test);
        top_levels.push(b.fill_like(&values, level as f64));
        top_index.push(b.offset_indices(&index, &offset));
        let count = b.dim(level_objectness, 1);
        offset = b.int_add(&offset, &count);
        top_logits.push(values);
    }
    let top_index = b.concat(&top_index, 1);
    let boxes = b.gather_boxes(&proposals, &top_index);
    let logits = b.concat(&top_logits, 1);
    let probabilities = b.sigmoid(&logits);
    let levels = b.concat(&top_levels, 1);

    // filter_proposals, image by image.
    let (boxes, scores, levels) = (b.per_image(&boxes), b.per_image(&probabilities), b.per_image(&levels));
    let mut filtered = b.map_images(frames, &[&boxes, &scores, &levels], |b, t, frame| {
        let coords = boxes::clip_to_image(b, &t[0], &frame.resized);
        let big = boxes::big_enough(b, &coords, f64::from(RPN_MIN_BOX_SIZE));
        let boxes = b.stack_coords(&coords);
        let score_thresh = b.constant(f64::from(p.rpn_score_thresh));
        let confident = b.at_least(&t[1], &score_thresh);
        let keep = b.both(&big, &confident);
        let candidates = b.keep_where(Candidates { boxes, scores: t[1].clone(), classes: t[2].clone() }, &keep);
        let kept = b.batched_nms_top(&candidates, 0..maps.len(), p.rpn_nms_thresh, p.rpn_post_nms_top_n_test);
        vec![kept.boxes, kept.scores]
    });
    let scores = filtered.pop().expect("two outputs");
    let boxes = filtered.pop().expect("two outputs");
    Ok(Proposals { boxes, scores })
}

/// `MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)` over every image's proposals: each RoI
/// pooled from the level `LevelMapper` assigns it. [R, C, 7, 7], rows image after image.
pub fn multi_scale_roi_align<B: PipelineOps>(
    b: &mut B,
    names: &[String],
    maps: &[B::Tensor],
    proposals: &B::Sets,
    frames: &B::Frames,
) -> B::Tensor {
    let levels: Vec<&B::Tensor> =
        names.iter().zip(maps).filter(|(name, _)| ROI_FEATURE_NAMES.contains(&name.as_str())).map(|(_, map)| map).collect();
    let rois = b.rows(proposals);
    let batch_index = b.batch_index(proposals);
    let exponents = b.level_exponents(|b| level_scale_exponents(b, &levels, frames));
    let scales: Vec<B::Scalar> = exponents.iter().map(|e| b.pow2(e)).collect();
    if levels.len() == 1 {
        return b.roi_align(levels[0], &rois, &batch_index, &scales[0]);
    }
    // lvl_min = -log2(scales[0]), lvl_max = -log2(scales[-1]): exact for powers of two.
    let k_min = b.neg(&exponents[0]);
    let k_max = b.neg(&exponents[levels.len() - 1]);
    let target = level_mapper::target_levels(b, &rois, &k_min, &k_max);
    let mut pooled = b.zeros_pooled(&rois, levels[0]);
    for (level, (map, scale)) in levels.iter().zip(&scales).enumerate() {
        let members = b.rows_at_level(&target, level);
        let level_rois = b.take_rows(&rois, &members);
        let level_batch_index = b.take_rows(&batch_index, &members);
        let level_pooled = b.roi_align(map, &level_rois, &level_batch_index, scale);
        pooled = b.put_rows(pooled, &members, &level_pooled);
    }
    pooled
}

/// `MultiScaleRoIAlign._setup_scales`: each level's `_infer_scale`, `2 ** round(log2(
/// feature height / image height))`, from the tallest image, as the exponents.
fn level_scale_exponents<B: PipelineOps>(b: &mut B, levels: &[&B::Tensor], frames: &B::Frames) -> Vec<B::Scalar> {
    let image_height = b.max_resized_height(frames);
    levels
        .iter()
        .map(|map| {
            let height = b.dim(map, 2);
            let height = b.int_scalar(&height);
            let approx_scale = b.quotient(&height, &image_height);
            b.log2_round(&approx_scale)
        })
        .collect()
}

/// `RoIHeads.postprocess_detections` and `GeneralizedRCNNTransform.postprocess`: every
/// class's box decoded against its proposal and clipped, the background dropped, low-score
/// and small boxes removed, NMS per label, the top detections per image, and the boxes
/// rescaled to the original image. Per image: boxes [D_i, 4], scores [D_i], labels [D_i].
pub fn detections<B: PipelineOps>(
    b: &mut B,
    p: &DetectorParams,
    class_logits: &B::Tensor,
    box_regression: &B::Tensor,
    proposals: &Proposals<B::Sets>,
    frames: &B::Frames,
) -> Candidates<B::Sets> {
    // box_coder.decode(box_regression, proposals): [R, C, 4].
    let rois = b.rows(&proposals.boxes);
    let objectness = b.rows(&proposals.scores);
    let rois = b.without_padding(&rois, &objectness);
    let reference = b.reshape(&rois, &[-1, 1, 4]);
    let deltas = b.reshape(box_regression, &[-1, p.num_classes as i64, 4]);
    let boxes = box_coder::decode(b, &deltas, &reference, ROI_BOX_CODER_WEIGHTS.map(f64::from));
    let scores = b.softmax(class_logits);
    let boxes = b.split_rows(&boxes, &proposals.boxes);
    let scores = b.split_rows(&scores, &proposals.boxes);

    let mut out = b.map_images(frames, &[&boxes, &scores], |b, t, frame| {
        let coords = boxes::clip_to_image(b, &t[0], &frame.resized);
        let boxes = b.stack_coords(&coords);
        let labels = b.class_ids_like(&t[1]);
        // Every (proposal, foreground class) pair: boxes[:, 1:].reshape(-1, 4), ...
        let boxes = b.slice_from(&boxes, -2, 1);
        let boxes = b.merge_axes(&boxes, -3);
        let scores = b.slice_from(&t[1], -1, 1);
        let scores = b.merge_axes(&scores, -2);
        let labels = b.slice_from(&labels, -1, 1);
        let labels = b.merge_axes(&labels, -2);
        let score_thresh = b.constant(f64::from(p.box_score_thresh));
        let confident = b.greater(&scores, &score_thresh);
        let coords = b.coords(&boxes);
        let big = boxes::big_enough(b, &coords, f64::from(DETECTION_MIN_BOX_SIZE));
        let keep = b.both(&confident, &big);
        let candidates = b.keep_where(Candidates { boxes, scores, classes: labels }, &keep);
        let kept = b.batched_nms_top(&candidates, 1..p.num_classes, p.box_nms_thresh, p.box_detections_per_img);
        // transform.postprocess: back to the original image.
        let coords = b.coords(&kept.boxes);
        let coords = boxes::resize_to_original(b, &coords, &frame.resized, &frame.original);
        let boxes = b.stack_coords(&coords);
        vec![boxes, kept.scores, kept.classes]
    });
    let classes = out.pop().expect("three outputs");
    let scores = out.pop().expect("three outputs");
    let boxes = out.pop().expect("three outputs");
    Candidates { boxes, scores, classes }
}
