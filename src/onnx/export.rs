//! FasterRCNN → ONNX: the whole of torchvision's eager inference inside one graph.
//!
//! Interface (docs/DESIGN.md section 2): `input` float32 [B, 3, H, W] in 0..1; outputs `location`
//! [B, N, 4] (x1, y1, x2, y2 divided by W and H), `score` [B, N], `category` int64 [B, N].
//! B, H, W and N are dynamic. All images of a batch share H and W, so they share one resize;
//! per-image ragged results (proposals, detections) are carried as padded [B, K] tensors with a
//! validity mask, and rows past an image's own detection count come out as zeros.
//!
//! Each step mirrors torchvision's code, including its float32/float64 arithmetic where it
//! decides discrete outcomes (the resize size, RoI levels), so sizes and levels are exact.

use super::builder::{Dim, GraphBuilder, Value};
use super::ops::ConvParams;
use super::proto::{DataType, ModelProto};
use crate::model::anchors::cell_anchors;
use crate::model::arch::*;
use crate::model::detection::{box_coder, boxes, level_mapper, DetectionOps, ImageSize};
use crate::model::network::{self, Backend};
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
        detector_graph(&mut b, detector, &input)?
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

/// Shape bookkeeping shared by the steps: the batch size and image sizes as graph values.
struct Sizes {
    /// [1] int64: batch size.
    batch: Value,
    /// The resized (unpadded) image: float32 scalars.
    resized: ImageSize<Value>,
    /// The input image: float32 scalars.
    input: ImageSize<Value>,
    /// [1] int64 padded height and width.
    padded_h: Value,
    padded_w: Value,
}

fn detector_graph(b: &mut OnnxBackend, det: &Detector, input: &Value) -> Result<(Value, Value, Value), WeightError> {
    let (images, sizes) = transform(b.g, &det.params, input);
    let features = network::backbone(b, det.arch, &images)?;
    let (proposals, proposal_valid) = rpn(b, det, &features.maps, &sizes)?;
    let pooled = multi_scale_roi_align(b, &features.names, &features.maps, &proposals, &sizes);
    let x = network::box_head(b, det.arch, &pooled)?;
    let (logits, deltas) = network::box_predictor(b, &x)?;
    Ok(postprocess(b, &det.params, &logits, &deltas, &proposals, &proposal_valid, &sizes))
}

/// `GeneralizedRCNNTransform`: normalize, resize as eager PyTorch computes the size, pad to 32.
fn transform(g: &mut GraphBuilder, p: &DetectorParams, input: &Value) -> (Value, Sizes) {
    let mean = g.const_f32(&[1, 3, 1, 1], &p.image_mean);
    let std = g.const_f32(&[1, 3, 1, 1], &p.image_std);
    let centred = g.sub(input, &mean);
    let normalized = g.div(&centred, &std);

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
    let below = g.ints(&[SIZE_DIVISIBLE - 1]);
    let divisor = g.ints(&[SIZE_DIVISIBLE]);
    let up = g.add(&resized_hw, &below);
    let blocks = g.div(&up, &divisor);
    let padded_hw = g.mul(&blocks, &divisor);
    let extra = g.sub(&padded_hw, &resized_hw);
    let zeros = g.ints(&[0, 0, 0, 0, 0, 0]);
    let pads = g.concat(&[&zeros, &extra], 0);
    let images = g.pad_zeros(&resized, &pads);

    let resized_f = g.cast(&resized_hw, DataType::Float);
    let input_f = g.cast(&hw, DataType::Float);
    let sizes = Sizes {
        batch,
        resized: ImageSize { height: scalar_at(g, &resized_f, 0), width: scalar_at(g, &resized_f, 1) },
        input: ImageSize { height: scalar_at(g, &input_f, 0), width: scalar_at(g, &input_f, 1) },
        padded_h: g.element(&padded_hw, 0),
        padded_w: g.element(&padded_hw, 1),
    };
    (images, sizes)
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
    let threshold = g.scalar_f32(INVALID_THRESHOLD);
    let eligible = g.greater(scores, &threshold);

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
    let limit = g.const_i64(&[], &[(BATCHED_NMS_TRICK_MAX_NUMEL_CPU / 4) as i64]);
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

/// The kept candidates by descending score, at most `k_max` per image: returns
/// (scores [B, K], indices [B, K], valid [B, K]).
fn top_kept(g: &mut GraphBuilder, scores: &Value, kept: &Value, k_max: usize) -> (Value, Value, Value) {
    let invalid = g.scalar_f32(INVALID);
    let masked = g.where_(kept, scores, &invalid);
    let n = g.shape(scores);
    let n = g.element(&n, 1);
    let cap = g.ints(&[k_max as i64]);
    let k = g.min(&n, &cap);
    let (top, idx) = g.top_k(&masked, &k, 1);
    let threshold = g.scalar_f32(INVALID_THRESHOLD);
    let valid = g.greater(&top, &threshold);
    (top, idx, valid)
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

/// The RPN: head, anchors, decoding, per-level top-k, clipping, small/low-score removal,
/// per-level NMS and the post-NMS top-n. Returns proposals [B, K, 4] (sorted by objectness)
/// and their validity [B, K].
fn rpn(b: &mut OnnxBackend, det: &Detector, maps: &[Value], sizes: &Sizes) -> Result<(Value, Value), WeightError> {
    let arch = det.arch;
    let p = &det.params;
    let anchor_sizes = arch.anchor_sizes();
    let ratios = arch.aspect_ratios();
    let mut objectness = Vec::new();
    let mut deltas = Vec::new();
    let mut anchors = Vec::new();
    for (level, feature) in maps.iter().enumerate() {
        let (logits, bbox) = network::rpn_head(b, arch, feature)?;
        let g = &mut *b.g;
        let cells = cell_anchors(&anchor_sizes[level], &ratios[level]);
        let a = cells.len() as i64;
        // permute_and_flatten: [B, A, h, w] → [B, h·w·A].
        let t = g.transpose(&logits, &[0, 2, 3, 1]);
        objectness.push(g.reshape_const(&t, &[0, -1]));
        // [B, 4A, h, w] → [B, A, 4, h·w] → [B, h·w, A, 4] → [B, h·w·A, 4].
        let t = g.reshape_const(&bbox, &[0, a, 4, -1]);
        let t = g.transpose(&t, &[0, 3, 1, 2]);
        deltas.push(g.reshape_const(&t, &[0, -1, 4]));
        anchors.push(grid_anchors(g, feature, &cells, sizes));
    }
    let anchors_all = b.g.concat(&anchors.iter().collect::<Vec<_>>(), 0);
    let deltas_all = b.g.concat(&deltas.iter().collect::<Vec<_>>(), 1);
    let proposals = box_coder::decode(b, &deltas_all, &anchors_all, [1.0; 4]);
    let g = &mut *b.g;

    // Per-level top-k of the objectness logits (torchvision: _get_top_n_idx).
    let mut top_idx = Vec::new();
    let mut top_logits = Vec::new();
    let mut top_levels = Vec::new();
    let mut offset = g.ints(&[0]);
    for (level, obj) in objectness.iter().enumerate() {
        let n = g.shape(obj);
        let n = g.element(&n, 1);
        let cap = g.ints(&[p.rpn_pre_nms_top_n_test as i64]);
        let k = g.min(&n, &cap);
        let (values, idx) = g.top_k(obj, &k, 1);
        top_logits.push(values);
        top_idx.push(g.add(&idx, &offset));
        offset = g.add(&offset, &n);
        let lvl = g.const_f32(&[1], &[level as f32]);
        top_levels.push(g.expand(&lvl, &k));
    }
    let logits = g.concat(&top_logits.iter().collect::<Vec<_>>(), 1);
    let idx = g.concat(&top_idx.iter().collect::<Vec<_>>(), 1);
    let levels = g.concat(&top_levels.iter().collect::<Vec<_>>(), 0);
    let boxes = gather_rows(g, &proposals, &idx, Some(4));
    let probs = g.sigmoid(&logits);

    let clipped = boxes::clip_to_image(b, &boxes, &sizes.resized);
    let keep = boxes::big_enough(b, &clipped, f64::from(RPN_MIN_BOX_SIZE));
    let g = &mut *b.g;
    let boxes = stack_boxes(g, &clipped);
    let thresh = g.scalar_f32(p.rpn_score_thresh);
    let confident = g.greater_or_equal(&probs, &thresh);
    let keep = g.and(&keep, &confident);

    // NMS independently per level (batched_nms with the level as class).
    let invalid = g.scalar_f32(INVALID);
    let masked = g.where_(&keep, &probs, &invalid);
    let level_ids: Vec<f32> = (0..maps.len()).map(|l| l as f32).collect();
    let kept = batched_nms(g, &boxes, &masked, &levels, &level_ids, p.rpn_nms_thresh);
    let (_, order, valid) = top_kept(g, &masked, &kept, p.rpn_post_nms_top_n_test);
    let proposals = gather_rows(g, &boxes, &order, Some(4));
    Ok((proposals, valid))
}

/// `AnchorGenerator.grid_anchors` for one level: the cell anchors shifted over the feature
/// map with stride = padded image size // feature size. [h·w·A, 4].
fn grid_anchors(g: &mut GraphBuilder, feature: &Value, cells: &[[f32; 4]], sizes: &Sizes) -> Value {
    let shape = g.shape(feature);
    let fh = g.element(&shape, 2);
    let fw = g.element(&shape, 3);
    let stride_h = g.div(&sizes.padded_h, &fh);
    let stride_w = g.div(&sizes.padded_w, &fw);
    let zero = g.scalar_i64(0);
    let one = g.scalar_i64(1);
    let fh_s = g.squeeze(&fh, &[0]);
    let fw_s = g.squeeze(&fw, &[0]);
    let ys = g.range(&zero, &fh_s, &one);
    let ys = g.mul(&ys, &stride_h);
    let xs = g.range(&zero, &fw_s, &one);
    let xs = g.mul(&xs, &stride_w);
    let grid = g.concat(&[&fh, &fw], 0);
    let ys = g.unsqueeze(&ys, &[1]);
    let ys = g.expand(&ys, &grid);
    let xs = g.unsqueeze(&xs, &[0]);
    let xs = g.expand(&xs, &grid);
    let ys = g.reshape_const(&ys, &[-1]);
    let xs = g.reshape_const(&xs, &[-1]);
    let shifts = stack_boxes(g, &[xs.clone(), ys.clone(), xs, ys]);
    let shifts = g.cast(&shifts, DataType::Float);
    let shifts = g.unsqueeze(&shifts, &[1]);
    let flat: Vec<f32> = cells.iter().flatten().copied().collect();
    let base = g.const_f32(&[1, cells.len(), 4], &flat);
    let anchors = g.add(&shifts, &base);
    g.reshape_const(&anchors, &[-1, 4])
}

/// `MultiScaleRoIAlign` over the maps named `0`..`3`: each RoI pooled from the level
/// torchvision's `LevelMapper` assigns it. proposals [B, K, 4] → [B·K, C, 7, 7].
fn multi_scale_roi_align(b: &mut OnnxBackend, names: &[String], maps: &[Value], proposals: &Value, sizes: &Sizes) -> Value {
    let g = &mut *b.g;
    let levels: Vec<&Value> = names.iter().zip(maps).filter(|(n, _)| ROI_FEATURE_NAMES.contains(&n.as_str())).map(|(_, m)| m).collect();
    let rois = g.reshape_const(proposals, &[-1, 4]);
    let k = g.shape(proposals);
    let k = g.element(&k, 1);
    let batch_indices = {
        let zero = g.scalar_i64(0);
        let one = g.scalar_i64(1);
        let b = g.squeeze(&sizes.batch, &[0]);
        let r = g.range(&zero, &b, &one);
        let r = g.unsqueeze(&r, &[1]);
        let shape = g.concat(&[&sizes.batch, &k], 0);
        let r = g.expand(&r, &shape);
        g.reshape_const(&r, &[-1])
    };

    // Scale of each level: 2^round(log2(feature height / resized height)) in float32, as
    // torchvision's _infer_scale does (from the first dimension).
    let ln2 = g.scalar_f32(std::f32::consts::LN_2);
    let mut exponents = Vec::new();
    for m in &levels {
        let shape = g.shape(m);
        let fh = g.element(&shape, 2);
        let fh = g.cast(&fh, DataType::Float);
        let fh = g.squeeze(&fh, &[0]);
        let ratio = g.div(&fh, &sizes.resized.height);
        let l = g.log(&ratio);
        let l = g.div(&l, &ln2);
        exponents.push(g.round(&l));
    }
    let scale_of = |g: &mut GraphBuilder, e: &Value| {
        let two = g.scalar_f32(2.0);
        g.node1("Pow", &[&two, e], &[])
    };
    if levels.len() == 1 {
        let s = scale_of(g, &exponents[0]);
        let scaled = g.mul(&rois, &s);
        return g.roi_align(levels[0], &scaled, &batch_indices, ROI_OUTPUT_SIZE, ROI_SAMPLING_RATIO);
    }

    // Neg, not Sub(0, e): OpenVINO's CPU plugin can fuse a Sub whose constant is the first
    // input into the producer of the second and compute e - 0 (see eager_resize_hw).
    let k_min = g.neg(&exponents[0]);
    let k_max = g.neg(&exponents[levels.len() - 1]);
    let target = level_mapper::target_levels(b, &rois, &k_min, &k_max);
    let g = &mut *b.g;

    let pooled_shape = {
        let r = g.shape(&rois);
        let r = g.element(&r, 0);
        let c = g.shape(levels[0]);
        let c = g.element(&c, 1);
        let tail = g.ints(&[ROI_OUTPUT_SIZE, ROI_OUTPUT_SIZE]);
        g.concat(&[&r, &c, &tail], 0)
    };
    let zero_f = g.const_f32(&[1], &[0.0]);
    let mut result = g.expand(&zero_f, &pooled_shape);
    for (i, m) in levels.iter().enumerate() {
        let li = g.scalar_f32(i as f32);
        let here = g.equal(&target, &li);
        let idx = g.non_zero(&here);
        let idx = g.transpose(&idx, &[1, 0]);
        let flat = g.squeeze(&idx, &[1]);
        let level_rois = g.gather(&rois, &flat, 0);
        let s = scale_of(g, &exponents[i]);
        let level_rois = g.mul(&level_rois, &s);
        let level_batch = g.gather(&batch_indices, &flat, 0);
        let pooled = g.roi_align(m, &level_rois, &level_batch, ROI_OUTPUT_SIZE, ROI_SAMPLING_RATIO);
        result = g.scatter_nd(&result, &idx, &pooled);
    }
    result
}

/// `RoIHeads.postprocess_detections` + `GeneralizedRCNNTransform.postprocess`, then the
/// normalized, zero-padded output layout.
fn postprocess(
    b: &mut OnnxBackend,
    p: &DetectorParams,
    logits: &Value,
    deltas: &Value,
    proposals: &Value,
    proposal_valid: &Value,
    sizes: &Sizes,
) -> (Value, Value, Value) {
    let num_classes = p.num_classes as i64;
    let fg = num_classes - 1;
    // Decode every class's box against its proposal: [B·K, C, 4].
    let rois = b.g.reshape_const(proposals, &[-1, 1, 4]);
    let d = b.g.reshape_const(deltas, &[0, num_classes, 4]);
    let boxes = box_coder::decode(b, &d, &rois, ROI_BOX_CODER_WEIGHTS.map(f64::from));
    let clipped = boxes::clip_to_image(b, &boxes, &sizes.resized);
    let g = &mut *b.g;
    let boxes = stack_boxes(g, &clipped);
    let scores = g.softmax(logits, -1);

    // Drop the background column, then lay candidates out per image: [B, K·(C-1)].
    let boxes = g.slice_const(&boxes, &[1], &[num_classes], &[1]);
    let scores = g.slice_const(&scores, &[1], &[num_classes], &[1]);
    let tail = g.ints(&[-1, 4]);
    let per_image_boxes = g.concat(&[&sizes.batch, &tail], 0);
    let boxes = g.reshape(&boxes, &per_image_boxes);
    let tail = g.ints(&[-1]);
    let per_image = g.concat(&[&sizes.batch, &tail], 0);
    let scores = g.reshape(&scores, &per_image);
    let labels = {
        let l: Vec<f32> = (1..num_classes).map(|c| c as f32).collect();
        let l = g.const_f32(&[1, 1, fg as usize], &l);
        let shape = {
            let s = g.shape(proposal_valid);
            let tail = g.ints(&[fg]);
            g.concat(&[&s, &tail], 0)
        };
        let l = g.expand(&l, &shape);
        g.reshape(&l, &per_image)
    };
    let roi_valid = {
        let v = g.unsqueeze(proposal_valid, &[2]);
        let shape = {
            let s = g.shape(proposal_valid);
            let tail = g.ints(&[fg]);
            g.concat(&[&s, &tail], 0)
        };
        let v = g.expand(&v, &shape);
        g.reshape(&v, &per_image)
    };

    let thresh = g.scalar_f32(p.box_score_thresh);
    let confident = g.greater(&scores, &thresh);
    let coords = unbind_boxes(g, &boxes);
    let big = boxes::big_enough(b, &coords, f64::from(DETECTION_MIN_BOX_SIZE));
    let g = &mut *b.g;
    let keep = g.and(&roi_valid, &confident);
    let keep = g.and(&keep, &big);

    // batched_nms by label.
    let invalid = g.scalar_f32(INVALID);
    let masked = g.where_(&keep, &scores, &invalid);
    let label_ids: Vec<f32> = (1..num_classes).map(|c| c as f32).collect();
    let kept = batched_nms(g, &boxes, &masked, &labels, &label_ids, p.box_nms_thresh);
    let (top, order, valid) = top_kept(g, &masked, &kept, p.box_detections_per_img);
    let zero = g.scalar_f32(0.0);

    // N = the largest detection count in the batch; rows past an image's count are zeros.
    let count = g.cast(&valid, DataType::Int64);
    let count = g.reduce_sum(&count, &[1], false);
    let n = g.reduce_max(&count, &[0], true);
    let zero_i = g.ints(&[0]);
    let top = g.slice(&top, &zero_i, &n, &[1]);
    let order = g.slice(&order, &zero_i, &n, &[1]);
    let valid = g.slice(&valid, &zero_i, &n, &[1]);
    let score = g.where_(&valid, &top, &zero);
    let label = gather_rows(g, &labels, &order, None);
    let label = g.where_(&valid, &label, &zero);
    let category = g.cast(&label, DataType::Int64);
    let det_boxes = gather_rows(g, &boxes, &order, Some(4));

    // transform.postprocess (boxes back to the input image), then normalized.
    let coords = unbind_boxes(g, &det_boxes);
    let [x1, y1, x2, y2] = boxes::resize_to_original(b, &coords, &sizes.resized, &sizes.input);
    let g = &mut *b.g;
    let input = &sizes.input;
    let norm = [g.div(&x1, &input.width), g.div(&y1, &input.height), g.div(&x2, &input.width), g.div(&y2, &input.height)];
    let location = stack_boxes(g, &norm);
    let valid4 = g.unsqueeze(&valid, &[2]);
    let location = g.where_(&valid4, &location, &zero);
    (location, score, category)
}
