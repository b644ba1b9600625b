//! Typed helpers, one per ONNX operator mkonnx emits (opset 17 semantics).
//!
//! Each helper documents what the operator does for us and links its spec; attribute values
//! are typed so a graph cannot be built with a misspelt or missing attribute.

use super::builder::{Attr, GraphBuilder, Value};
use super::proto::DataType;

/// Conv2d hyperparameters (square kernels, symmetric padding, as torchvision uses).
#[derive(Clone, Copy, Debug)]
pub struct ConvParams {
    /// Stride in both directions.
    pub stride: i64,
    /// Padding on every side.
    pub padding: i64,
    /// Channel groups (depthwise convolutions use `groups == channels`).
    pub groups: i64,
}

macro_rules! unary {
    ($($(#[$doc:meta])* $fn_name:ident => $op:literal),* $(,)?) => {
        $( $(#[$doc])* pub fn $fn_name(&mut self, x: &Value) -> Value { self.node1($op, &[x], &[]) } )*
    };
}

macro_rules! binary {
    ($($(#[$doc:meta])* $fn_name:ident => $op:literal),* $(,)?) => {
        $( $(#[$doc])* pub fn $fn_name(&mut self, a: &Value, b: &Value) -> Value { self.node1($op, &[a, b], &[]) } )*
    };
}

impl GraphBuilder {
    unary! {
        /// [Relu](https://onnx.ai/onnx/operators/onnx__Relu.html).
        relu => "Relu",
        /// [Sigmoid](https://onnx.ai/onnx/operators/onnx__Sigmoid.html).
        sigmoid => "Sigmoid",
        /// [HardSwish](https://onnx.ai/onnx/operators/onnx__HardSwish.html): x * relu6(x + 3) / 6, as torch's.
        hard_swish => "HardSwish",
        /// [Exp](https://onnx.ai/onnx/operators/onnx__Exp.html).
        exp => "Exp",
        /// [Log](https://onnx.ai/onnx/operators/onnx__Log.html) (natural).
        log => "Log",
        /// [Sqrt](https://onnx.ai/onnx/operators/onnx__Sqrt.html).
        sqrt => "Sqrt",
        /// [Floor](https://onnx.ai/onnx/operators/onnx__Floor.html).
        floor => "Floor",
        /// [Round](https://onnx.ai/onnx/operators/onnx__Round.html): half to even, like torch.round.
        round => "Round",
        /// [Neg](https://onnx.ai/onnx/operators/onnx__Neg.html).
        neg => "Neg",
        /// [Not](https://onnx.ai/onnx/operators/onnx__Not.html).
        not => "Not",
        /// [Shape](https://onnx.ai/onnx/operators/onnx__Shape.html): int64 [rank].
        shape => "Shape",
        /// [NonZero](https://onnx.ai/onnx/operators/onnx__NonZero.html): int64 [rank, n].
        non_zero => "NonZero",
        /// [GlobalAveragePool](https://onnx.ai/onnx/operators/onnx__GlobalAveragePool.html): AdaptiveAvgPool2d(1).
        global_average_pool => "GlobalAveragePool",
    }

    binary! {
        /// [Add](https://onnx.ai/onnx/operators/onnx__Add.html), broadcasting.
        add => "Add",
        /// [Sub](https://onnx.ai/onnx/operators/onnx__Sub.html), broadcasting.
        sub => "Sub",
        /// [Mul](https://onnx.ai/onnx/operators/onnx__Mul.html), broadcasting.
        mul => "Mul",
        /// [Div](https://onnx.ai/onnx/operators/onnx__Div.html), broadcasting; integer division truncates.
        div => "Div",
        /// [Min](https://onnx.ai/onnx/operators/onnx__Min.html) of two tensors.
        min => "Min",
        /// [Max](https://onnx.ai/onnx/operators/onnx__Max.html) of two tensors.
        max => "Max",
        /// [Equal](https://onnx.ai/onnx/operators/onnx__Equal.html).
        equal => "Equal",
        /// [Pow](https://onnx.ai/onnx/operators/onnx__Pow.html) `a ** b`.
        pow => "Pow",
        /// [Greater](https://onnx.ai/onnx/operators/onnx__Greater.html).
        greater => "Greater",
        /// [GreaterOrEqual](https://onnx.ai/onnx/operators/onnx__GreaterOrEqual.html).
        greater_or_equal => "GreaterOrEqual",
        /// [And](https://onnx.ai/onnx/operators/onnx__And.html).
        and => "And",
        /// [Or](https://onnx.ai/onnx/operators/onnx__Or.html).
        or => "Or",
        /// [Expand](https://onnx.ai/onnx/operators/onnx__Expand.html) `a` to the int64 shape `b`.
        expand => "Expand",
        /// [Reshape](https://onnx.ai/onnx/operators/onnx__Reshape.html) `a` to the int64 shape `b` (0 copies, -1 infers).
        reshape => "Reshape",
        /// [Unsqueeze](https://onnx.ai/onnx/operators/onnx__Unsqueeze.html) `a` at the int64 axes `b`.
        unsqueeze_at => "Unsqueeze",
        /// [Squeeze](https://onnx.ai/onnx/operators/onnx__Squeeze.html) `a` at the int64 axes `b`.
        squeeze_at => "Squeeze",
    }

    /// [Conv](https://onnx.ai/onnx/operators/onnx__Conv.html) with an OIHW weight.
    pub fn conv(&mut self, x: &Value, weight: &Value, bias: Option<&Value>, kernel: i64, p: ConvParams) -> Value {
        let mut inputs = vec![x, weight];
        if let Some(b) = bias {
            inputs.push(b);
        }
        let attrs = [
            ("kernel_shape", Attr::Ints(vec![kernel, kernel])),
            ("strides", Attr::Ints(vec![p.stride, p.stride])),
            ("pads", Attr::Ints(vec![p.padding; 4])),
            ("group", Attr::Int(p.groups)),
            ("dilations", Attr::Ints(vec![1, 1])),
        ];
        self.node1("Conv", &inputs, &attrs)
    }

    /// [BatchNormalization](https://onnx.ai/onnx/operators/onnx__BatchNormalization.html) in inference mode.
    pub fn batch_norm(&mut self, x: &Value, scale: &Value, bias: &Value, mean: &Value, var: &Value, eps: f32) -> Value {
        self.node1("BatchNormalization", &[x, scale, bias, mean, var], &[("epsilon", Attr::Float(eps))])
    }

    /// [HardSigmoid](https://onnx.ai/onnx/operators/onnx__HardSigmoid.html) with torch's constants (relu6(x + 3) / 6).
    pub fn hard_sigmoid(&mut self, x: &Value) -> Value {
        self.node1("HardSigmoid", &[x], &[("alpha", Attr::Float(1.0 / 6.0)), ("beta", Attr::Float(0.5))])
    }

    /// [MaxPool](https://onnx.ai/onnx/operators/onnx__MaxPool.html), square kernel.
    pub fn max_pool(&mut self, x: &Value, kernel: i64, stride: i64, padding: i64) -> Value {
        let attrs = [
            ("kernel_shape", Attr::Ints(vec![kernel, kernel])),
            ("strides", Attr::Ints(vec![stride, stride])),
            ("pads", Attr::Ints(vec![padding; 4])),
        ];
        self.node1("MaxPool", &[x], &attrs)
    }

    /// [Gemm](https://onnx.ai/onnx/operators/onnx__Gemm.html) as torch's Linear: x · Wᵀ + b.
    pub fn linear(&mut self, x: &Value, weight: &Value, bias: &Value) -> Value {
        self.node1("Gemm", &[x, weight, bias], &[("transB", Attr::Int(1))])
    }

    /// [Flatten](https://onnx.ai/onnx/operators/onnx__Flatten.html) to 2-D at `axis`.
    pub fn flatten(&mut self, x: &Value, axis: i64) -> Value {
        self.node1("Flatten", &[x], &[("axis", Attr::Int(axis))])
    }

    /// [Transpose](https://onnx.ai/onnx/operators/onnx__Transpose.html).
    pub fn transpose(&mut self, x: &Value, perm: &[i64]) -> Value {
        self.node1("Transpose", &[x], &[("perm", Attr::Ints(perm.to_vec()))])
    }

    /// [Concat](https://onnx.ai/onnx/operators/onnx__Concat.html).
    pub fn concat(&mut self, xs: &[&Value], axis: i64) -> Value {
        self.node1("Concat", xs, &[("axis", Attr::Int(axis))])
    }

    /// [Slice](https://onnx.ai/onnx/operators/onnx__Slice.html) with int64 tensor bounds on `axes`.
    pub fn slice(&mut self, x: &Value, starts: &Value, ends: &Value, axes: &[i64]) -> Value {
        let axes = self.ints(axes);
        self.node1("Slice", &[x, starts, ends, &axes], &[])
    }

    /// Slice with constant bounds.
    pub fn slice_const(&mut self, x: &Value, starts: &[i64], ends: &[i64], axes: &[i64]) -> Value {
        let (s, e) = (self.ints(starts), self.ints(ends));
        self.slice(x, &s, &e, axes)
    }

    /// [Gather](https://onnx.ai/onnx/operators/onnx__Gather.html) along `axis`.
    pub fn gather(&mut self, x: &Value, indices: &Value, axis: i64) -> Value {
        self.node1("Gather", &[x, indices], &[("axis", Attr::Int(axis))])
    }

    /// [GatherElements](https://onnx.ai/onnx/operators/onnx__GatherElements.html) along `axis`.
    pub fn gather_elements(&mut self, x: &Value, indices: &Value, axis: i64) -> Value {
        self.node1("GatherElements", &[x, indices], &[("axis", Attr::Int(axis))])
    }

    /// [ScatterND](https://onnx.ai/onnx/operators/onnx__ScatterND.html) (overwrite).
    pub fn scatter_nd(&mut self, data: &Value, indices: &Value, updates: &Value) -> Value {
        self.node1("ScatterND", &[data, indices, updates], &[])
    }

    /// [Mod](https://onnx.ai/onnx/operators/onnx__Mod.html) of integers (`fmod = 0`: the result takes the
    /// divisor's sign, as Python's `%`; the same as C's for the non-negative values mkonnx uses).
    pub fn modulo(&mut self, a: &Value, b: &Value) -> Value {
        self.node1("Mod", &[a, b], &[("fmod", Attr::Int(0))])
    }

    /// [Cast](https://onnx.ai/onnx/operators/onnx__Cast.html).
    pub fn cast(&mut self, x: &Value, to: DataType) -> Value {
        self.node1("Cast", &[x], &[("to", Attr::Int(to as i64))])
    }

    /// [Where](https://onnx.ai/onnx/operators/onnx__Where.html).
    pub fn where_(&mut self, cond: &Value, a: &Value, b: &Value) -> Value {
        self.node1("Where", &[cond, a, b], &[])
    }

    /// [Clip](https://onnx.ai/onnx/operators/onnx__Clip.html) between scalar tensors.
    pub fn clip(&mut self, x: &Value, lo: &Value, hi: &Value) -> Value {
        self.node1("Clip", &[x, lo, hi], &[])
    }

    /// [Softmax](https://onnx.ai/onnx/operators/onnx__Softmax.html) on `axis`.
    pub fn softmax(&mut self, x: &Value, axis: i64) -> Value {
        self.node1("Softmax", &[x], &[("axis", Attr::Int(axis))])
    }

    /// [ReduceMax](https://onnx.ai/onnx/operators/onnx__ReduceMax.html) (opset 13-17: axes attribute).
    pub fn reduce_max(&mut self, x: &Value, axes: &[i64], keepdims: bool) -> Value {
        self.node1("ReduceMax", &[x], &[("axes", Attr::Ints(axes.to_vec())), ("keepdims", Attr::Int(keepdims as i64))])
    }

    /// [ReduceMin](https://onnx.ai/onnx/operators/onnx__ReduceMin.html) (opset 13-17: axes attribute).
    pub fn reduce_min(&mut self, x: &Value, axes: &[i64], keepdims: bool) -> Value {
        self.node1("ReduceMin", &[x], &[("axes", Attr::Ints(axes.to_vec())), ("keepdims", Attr::Int(keepdims as i64))])
    }

    /// [ReduceSum](https://onnx.ai/onnx/operators/onnx__ReduceSum.html) (axes input since opset 13).
    pub fn reduce_sum(&mut self, x: &Value, axes: &[i64], keepdims: bool) -> Value {
        let axes = self.ints(axes);
        self.node1("ReduceSum", &[x, &axes], &[("keepdims", Attr::Int(keepdims as i64))])
    }

    /// [TopK](https://onnx.ai/onnx/operators/onnx__TopK.html), largest first; ties keep the lower index first.
    /// `k` is an int64 tensor of shape [1]. Returns (values, indices).
    pub fn top_k(&mut self, x: &Value, k: &Value, axis: i64) -> (Value, Value) {
        let mut out = self.node("TopK", &[x, k], &[("axis", Attr::Int(axis)), ("largest", Attr::Int(1)), ("sorted", Attr::Int(1))], 2);
        let indices = out.pop().expect("TopK has two outputs");
        (out.pop().expect("TopK has two outputs"), indices)
    }

    /// [Range](https://onnx.ai/onnx/operators/onnx__Range.html) over scalar tensors.
    pub fn range(&mut self, start: &Value, limit: &Value, delta: &Value) -> Value {
        self.node1("Range", &[start, limit, delta], &[])
    }

    /// [Pad](https://onnx.ai/onnx/operators/onnx__Pad.html) with zeros; `pads` is int64 [2·rank].
    pub fn pad_zeros(&mut self, x: &Value, pads: &Value) -> Value {
        self.node1("Pad", &[x, pads], &[("mode", Attr::Str("constant"))])
    }

    /// [Resize](https://onnx.ai/onnx/operators/onnx__Resize.html) to int64 `sizes`, bilinear with PyTorch's
    /// `align_corners=False` sampling (`pytorch_half_pixel`).
    pub fn resize_bilinear(&mut self, x: &Value, sizes: &Value) -> Value {
        let none = self.none();
        let attrs = [("mode", Attr::Str("linear")), ("coordinate_transformation_mode", Attr::Str("pytorch_half_pixel"))];
        self.node1("Resize", &[x, &none, &none, sizes], &attrs)
    }

    /// [Resize](https://onnx.ai/onnx/operators/onnx__Resize.html) to int64 `sizes`, nearest as PyTorch's
    /// legacy `mode="nearest"` (source index = floor(dst · in / out)).
    pub fn resize_nearest(&mut self, x: &Value, sizes: &Value) -> Value {
        let none = self.none();
        let attrs = [
            ("mode", Attr::Str("nearest")),
            ("coordinate_transformation_mode", Attr::Str("asymmetric")),
            ("nearest_mode", Attr::Str("floor")),
        ];
        self.node1("Resize", &[x, &none, &none, sizes], &attrs)
    }

    /// [NonMaxSuppression](https://onnx.ai/onnx/operators/onnx__NonMaxSuppression.html): boxes [B, N, 4] as
    /// corner pairs, scores [B, C, N]; keeps boxes scoring above `score_threshold` and suppresses
    /// IoU > `iou_threshold`. Returns selected (batch, class, box) int64 [M, 3].
    pub fn non_max_suppression(&mut self, boxes: &Value, scores: &Value, iou_threshold: f32, score_threshold: f32) -> Value {
        let max_out = self.ints(&[i64::from(i32::MAX)]);
        let iou = self.const_f32(&[1], &[iou_threshold]);
        let score = self.const_f32(&[1], &[score_threshold]);
        self.node1("NonMaxSuppression", &[boxes, scores, &max_out, &iou, &score], &[("center_point_box", Attr::Int(0))])
    }

    /// [RoiAlign](https://onnx.ai/onnx/operators/onnx__RoiAlign.html), average mode, with torchvision's
    /// `aligned=False` (`output_half_pixel`); rois are already in feature-map coordinates.
    pub fn roi_align(&mut self, x: &Value, rois: &Value, batch_indices: &Value, output_size: i64, sampling_ratio: i64) -> Value {
        let attrs = [
            ("mode", Attr::Str("avg")),
            ("output_height", Attr::Int(output_size)),
            ("output_width", Attr::Int(output_size)),
            ("sampling_ratio", Attr::Int(sampling_ratio)),
            ("spatial_scale", Attr::Float(1.0)),
            ("coordinate_transformation_mode", Attr::Str("output_half_pixel")),
        ];
        self.node1("RoiAlign", &[x, rois, batch_indices], &attrs)
    }

    /// Unsqueeze at constant axes.
    pub fn unsqueeze(&mut self, x: &Value, axes: &[i64]) -> Value {
        let axes = self.ints(axes);
        self.unsqueeze_at(x, &axes)
    }

    /// Squeeze at constant axes.
    pub fn squeeze(&mut self, x: &Value, axes: &[i64]) -> Value {
        let axes = self.ints(axes);
        self.squeeze_at(x, &axes)
    }

    /// Reshape to a constant shape (0 copies the input's dimension, -1 infers).
    pub fn reshape_const(&mut self, x: &Value, shape: &[i64]) -> Value {
        let shape = self.ints(shape);
        self.reshape(x, &shape)
    }

    /// Element `index` of a 1-D int64 tensor, as a [1]-shaped tensor.
    pub fn element(&mut self, x: &Value, index: i64) -> Value {
        self.slice_const(x, &[index], &[index + 1], &[0])
    }
}
