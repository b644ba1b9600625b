//! FasterRCNN → ONNX: the whole of torchvision's eager inference inside one graph.
//!
//! Interface (docs/DESIGN.md section 2): `input` float32 [B, 3, H, W] in 0..1; outputs `location`
//! [B, N, 4] (x1, y1, x2, y2 divided by W and H), `score` [B, N], `category` int64 [B, N].
//! B, H, W and N are dynamic. All images of a batch share H and W, so they share one resize;
//! rows past an image's own detection count come out as zeros.
//!
//! The layers, formulas and pipeline are the shared descriptions of [`crate::model`]; this
//! module is [`OnnxBackend`], which emits them as nodes (per-image sets as padded [B, K, ...]
//! tensors, see [`PipelineOps`] there), plus what only the graph has: the transform's resize
//! in exact integer arithmetic ([`eager_resize_hw`]), the batched NMS graph, and the output
//! layout.

use super::builder::{Dim, GraphBuilder, Value};
use super::ops::ConvParams;
use super::proto::{DataType, ModelProto};
use crate::model::arch::*;
use crate::model::detection::pipeline::{self, Candidates, Frame, PipelineOps};
use crate::model::detection::{DetectionOps, ImageSize};
use crate::model::network::Backend;
use crate::model::weights::{WeightError, Weights};
use crate::model::Detector;
use std::collections::HashSet;

/// Emits the network layers (the [`Backend`] operations) as ONNX nodes, adding each weight as
/// an initializer named by its state_dict path the first time it is used.
pub struct OnnxBackend<'a> {
    /// The graph under construction.
    pub g: &'a mut GraphBuilder,
    weights: &'a Weights,
    added: HashSet<String>,
}

impl<'a> OnnxBackend<'a> {
    /// A backend writing into `g`, taking tensors from `weights`.
    pub fn new(g: &'a mut GraphBuilder, weights: &'a Weights) -> Self {
        OnnxBackend { g, weights, added: HashSet::new() }
    }

    fn weight(&mut self, name: &str, rank: usize) -> Result<(Value, Vec<usize>), WeightError> {
        let t = self.weights.shared(name)?;
        if t.shape.len() != rank {
            return Err(WeightError::Shape { name: name.into(), found: t.shape.clone(), expected: format!("{rank} dimensions") });
        }
        if self.added.insert(name.to_string()) {
            self.g.initializer_f32(name, t);
        }
        Ok((Value(name.to_string()), t.shape.clone()))
    }
}

impl Backend for OnnxBackend<'_> {
    type Tensor = Value;

    fn conv2d(&mut self, x: &Value, path: &str, bias: bool, stride: i64, padding: i64, groups: i64) -> Result<Value, WeightError> {
        let (w, shape) = self.weight(&format!("{path}.weight"), 4)?;
        let b = if bias { Some(self.weight(&format!("{path}.bias"), 1)?.0) } else { None };
        Ok(self.g.conv(x, &w, b.as_ref(), shape[2] as i64, ConvParams { stride, padding, groups }))
    }

    fn batch_norm(&mut self, x: &Value, path: &str) -> Result<Value, WeightError> {
        let scale = self.weight(&format!("{path}.weight"), 1)?.0;
        let bias = self.weight(&format!("{path}.bias"), 1)?.0;
        let mean = self.weight(&format!("{path}.running_mean"), 1)?.0;
        let var = self.weight(&format!("{path}.running_var"), 1)?.0;
        Ok(self.g.batch_norm(x, &scale, &bias, &mean, &var, BATCH_NORM_EPS))
    }

    fn linear(&mut self, x: &Value, path: &str) -> Result<Value, WeightError> {
        let w = self.weight(&format!("{path}.weight"), 2)?.0;
        let b = self.weight(&format!("{path}.bias"), 1)?.0;
        Ok(self.g.linear(x, &w, &b))
    }

    fn relu(&mut self, x: Value) -> Value {
        self.g.relu(&x)
    }
    fn hardswish(&mut self, x: Value) -> Value {
        self.g.hard_swish(&x)
    }
    fn hardsigmoid(&mut self, x: &Value) -> Value {
        self.g.hard_sigmoid(x)
    }
    fn add(&mut self, a: Value, b: &Value) -> Value {
        self.g.add(&a, b)
    }
    fn mul(&mut self, a: &Value, b: &Value) -> Value {
        self.g.mul(a, b)
    }
    fn max_pool2d(&mut self, x: &Value, kernel: i64, stride: i64, padding: i64) -> Value {
        self.g.max_pool(x, kernel, stride, padding)
    }
    fn global_avg_pool(&mut self, x: &Value) -> Value {
        self.g.global_average_pool(x)
    }
    fn upsample_nearest_like(&mut self, x: &Value, like: &Value) -> Value {
        let sizes = self.g.shape(like);
        self.g.resize_nearest(x, &sizes)
    }
    fn flatten(&mut self, x: &Value) -> Value {
        self.g.flatten(x, 1)
    }
}

/// The detection formulas ([`crate::model::detection`]) as ONNX nodes. Scalars are float32
/// graph values, since image sizes and level bounds depend on the input's shape.
impl DetectionOps for OnnxBackend<'_> {
    type Scalar = Value;

    fn constant(&mut self, v: f64) -> Value {
        self.g.scalar_f32(v as f32)
    }
    fn ratio(&mut self, a: &Value, b: &Value) -> Value {
        self.g.div(a, b)
    }
    fn coords(&mut self, boxes: &Value) -> [Value; 4] {
        unbind_boxes(self.g, boxes)
    }
    fn stack_coords(&mut self, coords: &[Value; 4]) -> Value {
        stack_boxes(self.g, coords)
    }
    fn plus(&mut self, a: &Value, b: &Value) -> Value {
        self.g.add(a, b)
    }
    fn sub(&mut self, a: &Value, b: &Value) -> Value {
        self.g.sub(a, b)
    }
    fn add_scalar(&mut self, x: &Value, s: &Value) -> Value {
        self.g.add(x, s)
    }
    fn sub_scalar(&mut self, x: &Value, s: &Value) -> Value {
        self.g.sub(x, s)
    }
    fn mul_scalar(&mut self, x: &Value, s: &Value) -> Value {
        self.g.mul(x, s)
    }
    fn div_scalar(&mut self, x: &Value, s: &Value) -> Value {
        self.g.div(x, s)
    }
    fn clamp(&mut self, x: &Value, lo: Option<&Value>, hi: Option<&Value>) -> Value {
        match (lo, hi) {
            (Some(lo), Some(hi)) => self.g.clip(x, lo, hi),
            (Some(lo), None) => self.g.max(x, lo),
            (None, Some(hi)) => self.g.min(x, hi),
            (None, None) => x.clone(),
        }
    }
    fn exp(&mut self, x: &Value) -> Value {
        self.g.exp(x)
    }
    fn sqrt(&mut self, x: &Value) -> Value {
        self.g.sqrt(x)
    }
    fn log2(&mut self, x: &Value) -> Value {
        // ONNX has no Log2: ln(x) / ln(2).
        let ln = self.g.log(x);
        let ln2 = self.g.scalar_f32(std::f32::consts::LN_2);
        self.g.div(&ln, &ln2)
    }
    fn floor(&mut self, x: &Value) -> Value {
        self.g.floor(x)
    }
    fn at_least(&mut self, x: &Value, s: &Value) -> Value {
        self.g.greater_or_equal(x, s)
    }
    fn both(&mut self, a: &Value, b: &Value) -> Value {
        self.g.and(a, b)
    }
}

/// Builds the complete ONNX model for `detector`.
pub fn export(detector: &Detector) -> Result<ModelProto, WeightError> {
    let mut g = GraphBuilder::new();
    let input = g.input("input", DataType::Float, &[Dim::Named("batch_size"), Dim::Fixed(3), Dim::Named("height"), Dim::Named("width")]);
    let (location, score, category) = {
        let mut b = OnnxBackend::new(&mut g, &detector.weights);
        let (images, frames) = transform(&mut b, &detector.params, &input);
        let (_, detections) = pipeline::detect(&mut b, detector.arch, &detector.params, &images, &frames)?;
        output_layout(b.g, &detections, &frames)
    };
    let n = [Dim::Named("batch_size"), Dim::Named("num_detections")];
    g.output(&location, "location", DataType::Float, &[n[0].clone(), n[1].clone(), Dim::Fixed(4)]);
    g.output(&score, "score", DataType::Float, &n);
    g.output(&category, "category", DataType::Int64, &n);
    let doc = format!("torchvision {} converted by mkonnx {}", detector.arch, env!("CARGO_PKG_VERSION"));
    let metadata = vec![
        ("architecture".to_string(), detector.arch.constructor().to_string()),
        ("num_classes".to_string(), detector.params.num_classes.to_string()),
        ("params".to_string(), serde_json::to_string(&detector.params).unwrap_or_default()),
    ];
    Ok(g.finish("fasterrcnn", &doc, metadata))
}

/// The batch's sizes as graph values. All images of a batch share one input size, so they
/// share one frame.
pub struct Frames {
    /// The resized and the input image sizes, float32 scalars.
    frame: Frame<Value>,
    /// [1] int64 padded height and width.
    padded: [Value; 2],
}

impl Frames {
    /// The frames of a batch whose images share the `resized` and `original` sizes (float32
    /// scalars), padded to `padded` (int64 [1] height and width).
    pub fn new(resized: ImageSize<Value>, original: ImageSize<Value>, padded: [Value; 2]) -> Self {
        Frames { frame: Frame { resized, original }, padded }
    }
}

/// The detections as the model's outputs: `location` [B, N, 4] (boxes divided by the input's
/// width and height), `score` [B, N], `category` int64 [B, N], where N is the largest
/// detection count of the batch and rows past an image's own count are zeros.
fn output_layout(g: &mut GraphBuilder, d: &Candidates<Value>, frames: &Frames) -> (Value, Value, Value) {
    let valid = is_candidate(g, &d.scores);
    // Kept detections come first in each row (by decreasing score).
    let count = g.cast(&valid, DataType::Int64);
    let count = g.reduce_sum(&count, &[1], false);
    let n = g.reduce_max(&count, &[0], true);
    let zero_i = g.ints(&[0]);
    let [valid, scores, classes, boxes] = [&valid, &d.scores, &d.classes, &d.boxes].map(|v| g.slice(v, &zero_i, &n, &[1]));
    let zero = g.scalar_f32(0.0);
    let score = g.where_(&valid, &scores, &zero);
    let label = g.where_(&valid, &classes, &zero);
    let category = g.cast(&label, DataType::Int64);
    let [x1, y1, x2, y2] = unbind_boxes(g, &boxes);
    let input = &frames.frame.original;
    let normalized = [g.div(&x1, &input.width), g.div(&y1, &input.height), g.div(&x2, &input.width), g.div(&y2, &input.height)];
    let location = stack_boxes(g, &normalized);
    let valid4 = g.unsqueeze(&valid, &[2]);
    let location = g.where_(&valid4, &location, &zero);
    (location, score, category)
}

fn transform(b: &mut OnnxBackend, p: &DetectorParams, input: &Value) -> (Value, Frames) {
    let normalized = pipeline::normalize(b, p, input);
    let g = &mut *b.g;

    // Eager: scale = min(min_size / min(h, w), max_size / max(h, w)) in Python doubles, and
    // the output size int(size * scale); reproduced exactly in integers (see eager_resize_hw
    // for why not in float64 or float32).
    let shape = g.shape(input);
    let batch = g.element(&shape, 0);
    let hw = g.slice_const(&shape, &[2], &[4], &[0]);
    let resized_hw = eager_resize_hw(g, &hw, p.min_size, p.max_size);
    let channels = g.ints(&[3]);
    let out_size = g.concat(&[&batch, &channels, &resized_hw], 0);
    let resized = g.resize_bilinear(&normalized, &out_size);

    // batch_images: zero padding up to a multiple of SIZE_DIVISIBLE, after normalization.
    let padded_hw = pipeline::padded_side(b, &resized_hw);
    let g = &mut *b.g;
    let extra = g.sub(&padded_hw, &resized_hw);
    let zeros = g.ints(&[0, 0, 0, 0, 0, 0]);
    let pads = g.concat(&[&zeros, &extra], 0);
    let images = g.pad_zeros(&resized, &pads);

    let resized_f = g.cast(&resized_hw, DataType::Float);
    let input_f = g.cast(&hw, DataType::Float);
    let frames = Frames {
        frame: Frame {
            resized: ImageSize { height: scalar_at(g, &resized_f, 0), width: scalar_at(g, &resized_f, 1) },
            original: ImageSize { height: scalar_at(g, &input_f, 0), width: scalar_at(g, &input_f, 1) },
        },
        padded: [g.element(&padded_hw, 0), g.element(&padded_hw, 1)],
    };
    (images, frames)
}

/// The size eager torchvision resizes an image to: for int64 `hw` [.., 2] (height, width),
/// `int(x * min(min_size / short, max_size / long))` for x = height and width, with the
/// division, the product and the truncation in Python doubles. Returns int64 [.., 2].
///
/// Computed exactly in small-integer arithmetic instead of float64, because runtimes differ
/// in how they run a float64 shape computation, and a resize one pixel off moves detections
/// beyond the parity tolerances. OpenVINO 2026.4's CPU plugin:
/// - runs float64 in float32, which gives a different size for some image sizes (16x79 →
///   269x1332 instead of 269x1333 with 800/1333; 100x317 lost 8 of 9 detections with 320/640);
/// - miscompiled the float64 form this graph used to have: it fused
///   `Div(min_size, ReduceMin(hw))` into the reduce as a post-op scale and computed
///   `ReduceMin(hw) / min_size` (`Node::canBePerformedAsScaleShift` accepts a Divide or
///   Subtract whatever input the fused node feeds, and `getScalesAndShifts` always takes the
///   constant as divisor or subtrahend), so a 200x320 image became 48x76 instead of 800x1280.
///   Exposing the reduce as a model output, or a static input shape, hides it. Keep `Div`
///   and `Sub` with a constant first input away from nodes OpenVINO fuses post-ops into
///   (reduces, convolutions, matmuls, pooling, ...);
/// - runs int64 as int32, and integer `Div` and `Mod` through float32: exact only while the
///   dividend is below 2^24. So every product here stays below 2^31, every dividend below
///   2^24, and large values are compared through the sign of their (exact) difference.
///
/// torchvision's own traced export computes the scale as `Reciprocal` + `Mul` in float32 and
/// is wrong in every runtime: 200x320 → 319x511 instead of 320x512 with 320/640.
///
/// With c/d the chosen ratio (min_size/short or max_size/long) and n = floor(x·c/d), the
/// doubles give n exactly except where d divides x·c: there the rounding of c/d can leave
/// x·fl(c/d) just below the integer n, and the truncation gives n − 1. That happens when
/// fl(c/d) was rounded down and x's share of the rounding error exceeds half the spacing of
/// doubles below n; both are decided from r = c·2^K mod d, the remainder of the 53-bit
/// quotient (K = 52 − floor(log2(c/d))). Exact for image sides below 32768 px and min_size,
/// max_size below 65536; checked against Python's doubles for every image size up to 1500 px and
/// spot checks up to 32767 px, in ONNX Runtime and OpenVINO (tests/openvino.rs).
pub fn eager_resize_hw(g: &mut GraphBuilder, hw: &Value, min_size: u32, max_size: u32) -> Value {
    let pow2: Vec<i64> = (0..31).map(|k| 1i64 << k).collect();
    let pow2_table = g.ints(&pow2); // 2^0 .. 2^30, indexed by exponent
    let pow2_from_1 = g.ints(&pow2[1..]); // 2^1 .. 2^30
    let zero = g.scalar_i64(0);
    let one = g.scalar_i64(1);
    let byte = g.scalar_i64(256);
    let count_true = |g: &mut GraphBuilder, b: &Value, keepdims: bool| {
        let i = g.cast(b, DataType::Int64);
        g.reduce_sum(&i, &[-1], keepdims)
    };

    // The ratio c/d that min() picks: min_size/short <= max_size/long, compared exactly
    // (equal ratios are equal doubles, and rounding keeps the order of unequal ones).
    let h = g.slice_const(hw, &[0], &[1], &[-1]);
    let w = g.slice_const(hw, &[1], &[2], &[-1]);
    let short = g.min(&h, &w);
    let long = g.max(&h, &w);
    let mn = g.scalar_i64(i64::from(min_size));
    let mx = g.scalar_i64(i64::from(max_size));
    let a = g.mul(&short, &mx);
    let b = g.mul(&long, &mn);
    let margin = g.sub(&a, &b);
    let by_short = g.greater_or_equal(&margin, &zero);
    let c = g.where_(&by_short, &mn, &mx); // [.., 1]
    let d = g.where_(&by_short, &short, &long); // [.., 1]

    // n = floor(x·c/d) and its remainder, by long division over the two bytes of c.
    let c_hi = g.div(&c, &byte);
    let c_lo = g.modulo(&c, &byte);
    let t1 = g.mul(hw, &c_hi);
    let q1 = g.div(&t1, &d);
    let r1 = g.modulo(&t1, &d);
    let r1_shifted = g.mul(&r1, &byte);
    let x_lo = g.mul(hw, &c_lo);
    let t2 = g.add(&r1_shifted, &x_lo);
    let q2 = g.div(&t2, &d);
    let rem = g.modulo(&t2, &d);
    let q1_shifted = g.mul(&q1, &byte);
    let n = g.add(&q1_shifted, &q2); // [.., 2]

    // e = floor(log2(c/d)) = #{k >= 1: d·2^k <= c} − #{k >= 0: c·2^k < d}, without products.
    let c_down = g.div(&c, &pow2_from_1);
    let fits_up = g.greater_or_equal(&c_down, &d);
    let up = count_true(g, &fits_up, true);
    let d_minus_1 = g.sub(&d, &one);
    let d_down = g.div(&d_minus_1, &pow2_table);
    let fits_down = g.greater_or_equal(&d_down, &c);
    let down_count = count_true(g, &fits_down, true);

    // v = c·2^K mod 2d with K = 52 − e, in steps of 2^8 (dividends below 2^24):
    // fl(c/d) = (floor(c·2^K / d), or one more) · 2^-K, r = v mod d its remainder.
    let fifty_two = g.scalar_i64(52);
    let k_plus = g.add(&down_count, &fifty_two);
    let mut k = g.sub(&k_plus, &up); // <= 52 + 15 for sides below 2^15
    let two_d = g.add(&d, &d);
    let mut v = g.modulo(&c, &two_d);
    let step = g.scalar_i64(8);
    for _ in 0..9 {
        let s = g.min(&k, &step);
        let factor = g.gather(&pow2_table, &s, 0);
        let shifted = g.mul(&v, &factor);
        v = g.modulo(&shifted, &two_d);
        k = g.sub(&k, &s);
    }
    // The quotient rounds down when 2r < d, or 2r == d and it is even (ties to even).
    let r = g.modulo(&v, &d);
    let odd = g.greater_or_equal(&v, &d);
    let two_r = g.add(&r, &r);
    let below_half = g.greater(&d, &two_r);
    let at_half = g.equal(&two_r, &d);
    let even = g.not(&odd);
    let tie_down = g.and(&at_half, &even);
    let rounded_down = g.or(&below_half, &tie_down);
    let inexact = g.greater(&r, &zero);
    let rounded_down = g.and(&rounded_down, &inexact);

    // x·fl(c/d) = n − x·r·2^(e−52)/d; truncating gives n − 1 iff that shortfall exceeds half
    // the spacing of doubles below n (2^(e_n−53), or 2^(e_n−54) when n is a power of two; a
    // tie rounds to n, whose mantissa is even): x·r·2^t > d with t = e + 1 − e_n + [n = 2^e_n].
    let n_col = g.unsqueeze(&n, &[-1]);
    let n_fits = g.greater_or_equal(&n_col, &pow2_from_1);
    let e_n = count_true(g, &n_fits, false); // floor(log2 n), [.., 2]
    let n_floor_pow2 = g.gather(&pow2_table, &e_n, 0);
    let is_pow2 = g.equal(&n, &n_floor_pow2);
    let is_pow2 = g.cast(&is_pow2, DataType::Int64);
    let up_plus_one = g.add(&up, &one);
    let t_pos = g.add(&up_plus_one, &is_pow2); // t = t_pos − t_neg
    let t_neg = g.add(&down_count, &e_n);
    let thirty = g.scalar_i64(30);
    let lhs_shift = g.sub(&t_pos, &t_neg);
    let lhs_shift = g.max(&lhs_shift, &zero);
    let lhs_shift = g.min(&lhs_shift, &thirty);
    let rhs_shift = g.sub(&t_neg, &t_pos);
    let rhs_shift = g.max(&rhs_shift, &zero);
    let rhs_shift = g.min(&rhs_shift, &thirty);
    let xr = g.mul(hw, &r);
    let lhs_factor = g.gather(&pow2_table, &lhs_shift, 0);
    let lhs = g.mul(&xr, &lhs_factor);
    let rhs_factor = g.gather(&pow2_table, &rhs_shift, 0);
    let rhs = g.mul(&d, &rhs_factor);
    let excess = g.sub(&lhs, &rhs);
    let short_of_n = g.greater(&excess, &zero);

    let divides = g.equal(&rem, &zero);
    let corr = g.and(&divides, &rounded_down);
    let corr = g.and(&corr, &short_of_n);
    let corr = g.cast(&corr, DataType::Int64);
    g.sub(&n, &corr)
}

fn scalar_at(g: &mut GraphBuilder, v: &Value, i: i64) -> Value {
    let idx = g.scalar_i64(i);
    g.gather(v, &idx, 0)
}

/// Splits boxes [.., 4] into four [..] coordinate tensors along the last axis.
fn unbind_boxes(g: &mut GraphBuilder, boxes: &Value) -> [Value; 4] {
    [0, 1, 2, 3].map(|i| {
        let s = g.slice_const(boxes, &[i], &[i + 1], &[-1]);
        g.squeeze(&s, &[-1])
    })
}

/// Stacks four coordinate tensors into [.., 4].
fn stack_boxes(g: &mut GraphBuilder, c: &[Value; 4]) -> Value {
    let parts: Vec<Value> = c.iter().map(|v| g.unsqueeze(v, &[-1])).collect();
    g.concat(&parts.iter().collect::<Vec<_>>(), -1)
}

/// torchvision's `batched_nms` per image over padded candidates: boxes [B, N, 4], scores
/// [B, N] with [`INVALID`] for candidates that are not eligible, classes [B, N] or [N] as
/// float32 ids taking the values `class_ids` (the ids torchvision passes: levels 0.., labels
/// 1..). Returns which candidates are kept, [B, N] bool.
///
/// torchvision (on CPU) suppresses per class with the coordinate trick (boxes offset by
/// class · (max coordinate + 1), one NMS) when an image has at most 1000 candidates, and
/// class by class otherwise. The two agree except where float rounding of the offset boxes
/// moves an IoU across the threshold, so both are computed and each image takes the one
/// eager PyTorch would have used.
fn batched_nms(g: &mut GraphBuilder, boxes: &Value, scores: &Value, classes: &Value, class_ids: &[f32], iou: f32) -> Value {
    let eligible = is_candidate(g, scores);

    // Coordinate trick: max over the image's eligible boxes (clipped boxes are >= 0).
    let zero = g.scalar_f32(0.0);
    let eligible4 = g.unsqueeze(&eligible, &[2]);
    let eligible_boxes = g.where_(&eligible4, boxes, &zero);
    let max_coord = g.reduce_max(&eligible_boxes, &[1, 2], true);
    let one = g.scalar_f32(1.0);
    let span = g.add(&max_coord, &one);
    let classes3 = g.unsqueeze(classes, &[-1]);
    let offsets = g.mul(&classes3, &span);
    let shifted = g.add(boxes, &offsets);
    let single = g.unsqueeze(scores, &[1]);
    let selected = g.non_max_suppression(&shifted, &single, iou, INVALID_THRESHOLD);
    let kept_trick = kept_mask(g, scores, &selected);

    // Class by class: one NonMaxSuppression "class" per class id.
    let invalid = g.scalar_f32(INVALID);
    let per_class: Vec<Value> = class_ids
        .iter()
        .map(|&c| {
            let cv = g.scalar_f32(c);
            let is_c = g.equal(classes, &cv);
            let s = g.where_(&is_c, scores, &invalid);
            g.unsqueeze(&s, &[1])
        })
        .collect();
    let class_scores = g.concat(&per_class.iter().collect::<Vec<_>>(), 1);
    let selected = g.non_max_suppression(boxes, &class_scores, iou, INVALID_THRESHOLD);
    let kept_vanilla = kept_mask(g, scores, &selected);

    // boxes.numel() > BATCHED_NMS_TRICK_MAX_NUMEL_CPU (4 coordinates a candidate) selects the
    // per-class loop.
    let count = g.cast(&eligible, DataType::Int64);
    let count = g.reduce_sum(&count, &[1], true);
    let limit = g.const_i64(&[], &[batched_nms_trick_max_candidates(false) as i64]);
    let many = g.greater(&count, &limit);
    let few = g.not(&many);
    let by_class = g.and(&many, &kept_vanilla);
    let by_trick = g.and(&few, &kept_trick);
    g.or(&by_class, &by_trick)
}

/// NonMaxSuppression's selected (batch, class, box) triples as a [B, N] bool mask shaped
/// like `scores`.
fn kept_mask(g: &mut GraphBuilder, scores: &Value, selected: &Value) -> Value {
    let batch_and_box = g.ints(&[0, 2]);
    let index = g.gather(selected, &batch_and_box, 1);
    let zeros = {
        let shape = g.shape(scores);
        let zero = g.const_f32(&[1], &[0.0]);
        g.expand(&zero, &shape)
    };
    let ones = {
        let m = g.shape(selected);
        let m = g.element(&m, 0);
        let one = g.const_f32(&[1], &[1.0]);
        g.expand(&one, &m)
    };
    let kept = g.scatter_nd(&zeros, &index, &ones);
    let half = g.scalar_f32(0.5);
    g.greater(&kept, &half)
}

/// The kept candidates by descending score, at most `k_max` per image: (scores [B, K],
/// indices [B, K]); rows past an image's count have the score [`INVALID`].
fn top_kept(g: &mut GraphBuilder, scores: &Value, kept: &Value, k_max: usize) -> (Value, Value) {
    let invalid = g.scalar_f32(INVALID);
    let masked = g.where_(kept, scores, &invalid);
    top_k_capped(g, &masked, k_max)
}

/// `x.topk(min(cap, n), dim=-1)`: (values, indices).
fn top_k_capped(g: &mut GraphBuilder, x: &Value, cap: usize) -> (Value, Value) {
    let n = dim_of(g, x, -1);
    let cap = g.ints(&[cap as i64]);
    let k = g.min(&n, &cap);
    g.top_k(x, &k, -1)
}

/// Which rows of a padded set hold a candidate, from their scores: [`INVALID`] marks the rest.
fn is_candidate(g: &mut GraphBuilder, scores: &Value) -> Value {
    let threshold = g.scalar_f32(INVALID_THRESHOLD);
    g.greater(scores, &threshold)
}

/// Score given to candidates that must not be selected; real scores (probabilities) are >= 0.
const INVALID: f32 = -1.0;
/// NonMaxSuppression's score threshold: keeps every probability, drops [`INVALID`].
const INVALID_THRESHOLD: f32 = -0.5;

/// Gathers rows of `x` [B, N, ...] at `indices` [B, K] → [B, K, ...] (last dim `width`, or none).
fn gather_rows(g: &mut GraphBuilder, x: &Value, indices: &Value, width: Option<i64>) -> Value {
    match width {
        None => g.gather_elements(x, indices, 1),
        Some(w) => {
            let idx = g.unsqueeze(indices, &[2]);
            let shape = g.shape(&idx);
            let lead = g.slice_const(&shape, &[0], &[2], &[0]);
            let wv = g.ints(&[w]);
            let target = g.concat(&[&lead, &wv], 0);
            let idx = g.expand(&idx, &target);
            g.gather_elements(x, &idx, 1)
        }
    }
}

/// The size of `x` along `axis` (negative: from the end), int64 [1].
fn dim_of(g: &mut GraphBuilder, x: &Value, axis: i64) -> Value {
    let shape = g.shape(x);
    let end = if axis == -1 { i64::MAX } else { axis + 1 };
    g.slice_const(&shape, &[axis], &[end], &[0])
}

/// `x` with axes `axis` and `axis + 1` merged (either sign), through its runtime shape.
fn merge_two_axes(g: &mut GraphBuilder, x: &Value, axis: i64) -> Value {
    let shape = g.shape(x);
    let mut parts = Vec::new();
    if axis != 0 {
        parts.push(g.slice_const(&shape, &[0], &[axis], &[0]));
    }
    parts.push(g.ints(&[-1]));
    if axis + 2 != 0 {
        parts.push(g.slice_const(&shape, &[axis + 2], &[i64::MAX], &[0]));
    }
    let target = g.concat(&parts.iter().collect::<Vec<_>>(), 0);
    g.reshape(x, &target)
}

/// The pipeline ([`pipeline`]) as ONNX nodes on padded batches: per-image sets are
/// [B, K, ...] tensors, and a dropped candidate (or a row past an image's count after NMS)
/// keeps its row with the score [`INVALID`].
impl PipelineOps for OnnxBackend<'_> {
    type Int = Value;
    type Sets = Value;
    type Frames = Frames;

    fn dim(&mut self, x: &Value, axis: i64) -> Value {
        dim_of(self.g, x, axis)
    }
    fn int_add(&mut self, a: &Value, b: &Value) -> Value {
        self.g.add(a, b)
    }
    fn int_div(&mut self, a: &Value, b: &Value) -> Value {
        self.g.div(a, b)
    }
    fn int_mul(&mut self, a: &Value, b: &Value) -> Value {
        self.g.mul(a, b)
    }
    fn int_const(&mut self, v: i64) -> Value {
        self.g.ints(&[v])
    }
    fn int_scalar(&mut self, i: &Value) -> Value {
        let f = self.g.cast(i, DataType::Float);
        self.g.squeeze(&f, &[0])
    }
    fn quotient(&mut self, a: &Value, b: &Value) -> Value {
        // float32 division: the ratio of two small integers only feeds round(log2(.)).
        self.g.div(a, b)
    }
    fn log2_round(&mut self, x: &Value) -> Value {
        let l = self.log2(x);
        self.g.round(&l)
    }
    fn pow2(&mut self, e: &Value) -> Value {
        let two = self.g.scalar_f32(2.0);
        self.g.pow(&two, e)
    }
    fn neg(&mut self, x: &Value) -> Value {
        // Neg, not Sub(0, e): OpenVINO's CPU plugin can fuse a Sub whose constant is the first
        // input into the producer of the second and compute e - 0 (see eager_resize_hw).
        self.g.neg(x)
    }

    fn padded_size(&mut self, frames: &Frames) -> [Value; 2] {
        frames.padded.clone()
    }
    fn max_resized_height(&mut self, frames: &Frames) -> Value {
        frames.frame.resized.height.clone()
    }
    fn level_exponents(&mut self, compute: impl FnOnce(&mut Self) -> Vec<Value>) -> Vec<Value> {
        compute(self)
    }

    fn strided_range(&mut self, n: &Value, s: &Value) -> Value {
        let g = &mut *self.g;
        let zero = g.scalar_i64(0);
        let one = g.scalar_i64(1);
        let n = g.squeeze(n, &[0]);
        let r = g.range(&zero, &n, &one);
        let r = g.mul(&r, s);
        g.cast(&r, DataType::Float)
    }
    fn mesh(&mut self, ys: &Value, xs: &Value) -> [Value; 2] {
        let g = &mut *self.g;
        let (h, w) = (g.shape(ys), g.shape(xs));
        let grid = g.concat(&[&h, &w], 0);
        let ys = g.unsqueeze(ys, &[1]);
        let ys = g.expand(&ys, &grid);
        let xs = g.unsqueeze(xs, &[0]);
        let xs = g.expand(&xs, &grid);
        [g.reshape_const(&ys, &[-1]), g.reshape_const(&xs, &[-1])]
    }
    fn const_tensor(&mut self, values: &[f32], shape: &[i64]) -> Value {
        let dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
        self.g.const_f32(&dims, values)
    }
    fn div(&mut self, a: &Value, b: &Value) -> Value {
        self.g.div(a, b)
    }
    fn reshape(&mut self, x: &Value, shape: &[i64]) -> Value {
        self.g.reshape_const(x, shape)
    }
    fn concat(&mut self, xs: &[Value], axis: i64) -> Value {
        self.g.concat(&xs.iter().collect::<Vec<_>>(), axis)
    }
    fn permute_and_flatten(&mut self, x: &Value, c: i64) -> Value {
        // [B, A·c, H, W] → [B, H, W, A·c] → [B, H·W·A, c]: the same order as torchvision's
        // view(B, A, c, H, W).permute(0, 3, 4, 1, 2).
        let t = self.g.transpose(x, &[0, 2, 3, 1]);
        self.g.reshape_const(&t, &[0, -1, c])
    }
    fn top_k(&mut self, x: &Value, cap: usize) -> (Value, Value) {
        top_k_capped(self.g, x, cap)
    }
    fn offset_indices(&mut self, indices: &Value, by: &Value) -> Value {
        self.g.add(indices, by)
    }
    fn gather_boxes(&mut self, x: &Value, indices: &Value) -> Value {
        gather_rows(self.g, x, indices, Some(4))
    }
    fn fill_like(&mut self, like: &Value, v: f64) -> Value {
        let g = &mut *self.g;
        let value = g.const_f32(&[1], &[v as f32]);
        let shape = g.shape(like);
        g.expand(&value, &shape)
    }
    fn sigmoid(&mut self, x: &Value) -> Value {
        self.g.sigmoid(x)
    }
    fn softmax(&mut self, x: &Value) -> Value {
        self.g.softmax(x, -1)
    }
    fn greater(&mut self, x: &Value, s: &Value) -> Value {
        self.g.greater(x, s)
    }
    fn slice_from(&mut self, x: &Value, axis: i64, start: i64) -> Value {
        self.g.slice_const(x, &[start], &[i64::MAX], &[axis])
    }
    fn merge_axes(&mut self, x: &Value, axis: i64) -> Value {
        merge_two_axes(self.g, x, axis)
    }
    fn class_ids_like(&mut self, scores: &Value) -> Value {
        let c = dim_of(self.g, scores, -1);
        let one = self.g.ints(&[1]);
        let ids = self.strided_range(&c, &one);
        let shape = self.g.shape(scores);
        self.g.expand(&ids, &shape)
    }

    fn per_image(&mut self, x: &Value) -> Value {
        x.clone()
    }
    fn rows(&mut self, sets: &Value) -> Value {
        merge_two_axes(self.g, sets, 0)
    }
    fn batch_index(&mut self, sets: &Value) -> Value {
        let g = &mut *self.g;
        let shape = g.shape(sets);
        let batch_and_k = g.slice_const(&shape, &[0], &[2], &[0]);
        let batch = g.element(&shape, 0);
        let zero = g.scalar_i64(0);
        let one = g.scalar_i64(1);
        let batch = g.squeeze(&batch, &[0]);
        let r = g.range(&zero, &batch, &one);
        let r = g.unsqueeze(&r, &[1]);
        let r = g.expand(&r, &batch_and_k);
        g.reshape_const(&r, &[-1])
    }
    fn split_rows(&mut self, rows: &Value, like: &Value) -> Value {
        let g = &mut *self.g;
        let like_shape = g.shape(like);
        let batch_and_k = g.slice_const(&like_shape, &[0], &[2], &[0]);
        let rows_shape = g.shape(rows);
        let rest = g.slice_const(&rows_shape, &[1], &[i64::MAX], &[0]);
        let target = g.concat(&[&batch_and_k, &rest], 0);
        g.reshape(rows, &target)
    }
    fn map_images<F>(&mut self, frames: &Frames, inputs: &[&Value], mut f: F) -> Vec<Value>
    where
        F: FnMut(&mut Self, &[Value], &Frame<Value>) -> Vec<Value>,
    {
        let inputs: Vec<Value> = inputs.iter().map(|&v| v.clone()).collect();
        f(self, &inputs, &frames.frame)
    }
    fn keep_where(&mut self, c: Candidates<Value>, keep: &Value) -> Candidates<Value> {
        let invalid = self.g.scalar_f32(INVALID);
        let scores = self.g.where_(keep, &c.scores, &invalid);
        Candidates { scores, ..c }
    }
    fn batched_nms_top(&mut self, c: &Candidates<Value>, class_ids: std::ops::Range<usize>, iou: f32, k: usize) -> Candidates<Value> {
        let g = &mut *self.g;
        let ids: Vec<f32> = class_ids.map(|c| c as f32).collect();
        let kept = batched_nms(g, &c.boxes, &c.scores, &c.classes, &ids, iou);
        let (scores, order) = top_kept(g, &c.scores, &kept, k);
        let boxes = gather_rows(g, &c.boxes, &order, Some(4));
        let classes = gather_rows(g, &c.classes, &order, None);
        Candidates { boxes, scores, classes }
    }

    fn roi_align(&mut self, map: &Value, rois: &Value, batch_index: &Value, scale: &Value) -> Value {
        // RoIAlign's spatial_scale is an attribute; the scale depends on the input's shape, so
        // the RoIs are scaled instead (the kernel multiplies them by it first, the same product).
        let scaled = self.g.mul(rois, scale);
        self.g.roi_align(map, &scaled, batch_index, ROI_OUTPUT_SIZE, ROI_SAMPLING_RATIO)
    }
    fn rows_at_level(&mut self, levels: &Value, level: usize) -> Value {
        let g = &mut *self.g;
        let level = g.scalar_f32(level as f32);
        let here = g.equal(levels, &level);
        let index = g.non_zero(&here);
        g.transpose(&index, &[1, 0])
    }
    fn take_rows(&mut self, x: &Value, index: &Value) -> Value {
        let flat = self.g.squeeze(index, &[1]);
        self.g.gather(x, &flat, 0)
    }
    fn put_rows(&mut self, into: Value, index: &Value, rows: &Value) -> Value {
        self.g.scatter_nd(&into, index, rows)
    }
    fn without_padding(&mut self, boxes: &Value, scores: &Value) -> Value {
        let g = &mut *self.g;
        let real = is_candidate(g, scores);
        let real = g.unsqueeze(&real, &[-1]);
        let zero = g.scalar_f32(0.0);
        g.where_(&real, boxes, &zero)
    }
    fn zeros_pooled(&mut self, rois: &Value, map: &Value) -> Value {
        let g = &mut *self.g;
        let r = dim_of(g, rois, 0);
        let c = dim_of(g, map, 1);
        let tail = g.ints(&[ROI_OUTPUT_SIZE, ROI_OUTPUT_SIZE]);
        let shape = g.concat(&[&r, &c, &tail], 0);
        let zero = g.const_f32(&[1], &[0.0]);
        g.expand(&zero, &shape)
    }
}
