//! [`Backend`] on libtorch: the network layers as the same ATen calls torchvision's modules
//! make (`F.conv2d`, `torch.batch_norm`, `F.linear`, ...), on weights converted once.

use super::{RuntimeError, TorchContext};
use crate::ops::{batched_nms, python_float, roi_align, RoiAlignParams};
use mkonnx::model::arch::{Architecture, BATCH_NORM_EPS, ROI_OUTPUT_SIZE, ROI_SAMPLING_RATIO};
use mkonnx::model::detection::pipeline::{Candidates, Frame, PipelineOps};
use mkonnx::model::detection::{DetectionOps, ImageSize};
use mkonnx::model::network::Backend;
use mkonnx::model::weights::{WeightError, Weights};
use std::cell::OnceCell;
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};

/// The checkpoint's tensors on the device, by state_dict name, plus the folded parameters of
/// every `FrozenBatchNorm2d`.
pub(crate) struct WeightStore {
    tensors: HashMap<String, Tensor>,
    /// `{path}` → (scale, bias) [1, C, 1, 1] of a FrozenBatchNorm2d.
    frozen: HashMap<String, (Tensor, Tensor)>,
}

impl WeightStore {
    /// Converts every float tensor of `weights` to a tch tensor on `device`.
    pub(crate) fn new(weights: &Weights, device: Device, arch: Architecture) -> Result<Self, RuntimeError> {
        let mut tensors = HashMap::new();
        for name in weights.names() {
            if name.ends_with(".num_batches_tracked") {
                continue;
            }
            let w = weights
                .get(name)
                .map_err(|e| RuntimeError::Torch { step: format!("loading `{name}`"), source: tch::TchError::Kind(e.to_string()) })?;
            let shape: Vec<i64> = w.shape.iter().map(|&d| d as i64).collect();
            let t = Tensor::f_from_slice(&w.data)
                .and_then(|t| t.f_view(shape.as_slice()))
                .and_then(|t| t.f_to_device(device))
                .step(&format!("loading `{name}`"))?;
            tensors.insert(name.to_string(), t);
        }
        let mut store = WeightStore { tensors, frozen: HashMap::new() };
        // FrozenBatchNorm2d has no num_batches_tracked buffer; BatchNorm2d has one.
        let frozen_paths: Vec<String> = weights
            .names()
            .filter_map(|n| n.strip_suffix(".running_var"))
            .filter(|p| !weights.contains(&format!("{p}.num_batches_tracked")))
            .map(str::to_string)
            .collect();
        for path in frozen_paths {
            let folded = store.fold_frozen_batch_norm(&path).map_err(|e| match e {
                FoldError::Weight(source) => RuntimeError::Weights { arch, source },
                FoldError::Torch(e) => e,
            })?;
            store.frozen.insert(path, folded);
        }
        Ok(store)
    }

    fn get(&self, name: &str, rank: usize) -> Result<&Tensor, WeightError> {
        let t = self.tensors.get(name).ok_or_else(|| WeightError::Missing(name.to_string()))?;
        if t.dim() != rank {
            return Err(WeightError::Shape {
                name: name.to_string(),
                found: t.size().iter().map(|&d| d as usize).collect(),
                expected: format!("{rank} dimensions"),
            });
        }
        Ok(t)
    }

    fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// torchvision's `FrozenBatchNorm2d.forward`, up to the input:
    /// `scale = w * (rv + eps).rsqrt(); bias = b - rm * scale`, on [1, C, 1, 1] views.
    fn fold_frozen_batch_norm(&self, path: &str) -> Result<(Tensor, Tensor), FoldError> {
        let step = format!("folding FrozenBatchNorm2d `{path}`");
        let view = |suffix: &str| -> Result<Tensor, FoldError> {
            let t = self.get(&format!("{path}.{suffix}"), 1).map_err(FoldError::Weight)?;
            t.f_reshape([1, -1, 1, 1]).step(&step).map_err(FoldError::Torch)
        };
        let (w, b, rm, rv) = (view("weight")?, view("bias")?, view("running_mean")?, view("running_var")?);
        let scale = rv
            .f_add_scalar(python_float(BATCH_NORM_EPS))
            .and_then(|t| t.f_rsqrt())
            .and_then(|t| w.f_mul(&t))
            .step(&step)
            .map_err(FoldError::Torch)?;
        let bias = rm.f_mul(&scale).and_then(|t| b.f_sub(&t)).step(&step).map_err(FoldError::Torch)?;
        Ok((scale, bias))
    }
}

enum FoldError {
    Weight(WeightError),
    Torch(RuntimeError),
}

/// A tch tensor that clones shallowly (a new handle on the same storage): the network
/// description clones values to reuse them, and never modifies one in place.
pub struct Shared(pub Tensor);

impl Clone for Shared {
    fn clone(&self) -> Self {
        Shared(self.0.shallow_clone())
    }
}

/// Runs [`mkonnx::model::network`] layers with tch. Errors of the infallible trait methods
/// (a residual sum of mis-shaped branches, say) are kept here; the first one is reported by
/// [`TchBackend::take_error`] after the network returns.
pub struct TchBackend<'a> {
    store: &'a WeightStore,
    error: Option<RuntimeError>,
    /// Where new tensors (anchors, constants, pooled features) are made.
    device: Device,
    /// `MultiScaleRoIAlign`'s level scale exponents, kept from the first batch as the module
    /// keeps its scales (absent: computed on every call).
    level_exponents: Option<&'a OnceCell<Vec<f64>>>,
    phases: PhaseTimer,
}

impl<'a> TchBackend<'a> {
    pub(crate) fn new(store: &'a WeightStore) -> Self {
        TchBackend { store, error: None, device: Device::Cpu, level_exponents: None, phases: PhaseTimer::from_env() }
    }

    /// A backend for one call of a detector: its weights, its device, and the level scales
    /// it keeps across calls.
    pub(crate) fn for_detector(store: &'a WeightStore, device: Device, level_exponents: &'a OnceCell<Vec<f64>>) -> Self {
        TchBackend { device, level_exponents: Some(level_exponents), ..TchBackend::new(store) }
    }

    /// Prints the phase times, if profiling.
    pub(crate) fn report_phases(&self) {
        self.phases.report();
    }

    /// Keeps `e` (if it is the first error) and returns an empty tensor in place of a result.
    fn fail(&mut self, e: RuntimeError) -> Shared {
        self.error.get_or_insert(e);
        Shared(Tensor::new())
    }

    /// The size of `t` along `axis` (negative: from the end); 0 for a tensor an earlier
    /// error left undefined.
    fn size_at(&self, t: &Shared, axis: i64) -> i64 {
        if !t.0.defined() {
            return 0;
        }
        let size = t.0.size();
        let axis = if axis < 0 { size.len() as i64 + axis } else { axis };
        usize::try_from(axis).ok().and_then(|a| size.get(a)).copied().unwrap_or(0)
    }

    /// The first error met since the last call, if any.
    pub fn take_error(&mut self) -> Option<RuntimeError> {
        self.error.take()
    }

    /// Runs `op` and keeps its tensor, or keeps its error (the first one) and returns an empty
    /// tensor. Once an error is kept, `op` is not run: later ops would only fail on the empty
    /// tensors it leaves, and libtorch aborts the process, through tch's `Scalar` destructor,
    /// when an op with a scalar argument fails.
    fn keep(&mut self, op: impl FnOnce() -> Result<Tensor, tch::TchError>, step: &str) -> Shared {
        if self.error.is_some() {
            return Shared(Tensor::new());
        }
        match op() {
            Ok(t) => Shared(t),
            Err(source) => {
                self.error.get_or_insert(RuntimeError::Torch { step: step.to_string(), source });
                Shared(Tensor::new())
            }
        }
    }

    /// A failed layer: the libtorch error is kept (it says what did not fit), the network
    /// description gets a weight error naming the layer.
    fn layer_failed(&mut self, path: &str, weight: &Tensor, source: tch::TchError) -> WeightError {
        let found = weight.size().iter().map(|&d| d as usize).collect();
        let message = source.to_string();
        self.error.get_or_insert(RuntimeError::Torch { step: format!("layer `{path}`"), source });
        WeightError::Shape {
            name: format!("{path}.weight"),
            found,
            expected: format!("a shape that fits its input ({})", first_line(&message)),
        }
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

impl Backend for TchBackend<'_> {
    type Tensor = Shared;

    fn conv2d(&mut self, x: &Shared, path: &str, bias: bool, stride: i64, padding: i64, groups: i64) -> Result<Shared, WeightError> {
        let w = self.store.get(&format!("{path}.weight"), 4)?;
        let b = if bias { Some(self.store.get(&format!("{path}.bias"), 1)?) } else { None };
        // `F.conv2d` is `at::_convolution` with the context's flags; on CPU this is the same
        // call. On CUDA, PyTorch lets cuDNN use TF32 by default, which moves boxes by ~0.1 px
        // against float32 (measured on an H200): mkonnx's PyTorch reference is full float32, as
        // on CPU and in ONNX Runtime.
        x.0.f_internal_convolution(w, b, [stride, stride], [padding, padding], [1, 1], false, [0, 0], groups, false, false, true, false)
            .map(Shared)
            .map_err(|e| self.layer_failed(path, w, e))
    }

    fn batch_norm(&mut self, x: &Shared, path: &str) -> Result<Shared, WeightError> {
        let w = self.store.get(&format!("{path}.weight"), 1)?;
        if let Some((scale, bias)) = self.store.frozen.get(path) {
            // FrozenBatchNorm2d: x * scale + bias.
            return x.0.f_mul(scale).and_then(|t| t.f_add(bias)).map(Shared).map_err(|e| self.layer_failed(path, w, e));
        }
        if !self.store.has(&format!("{path}.running_var")) {
            return Err(WeightError::Missing(format!("{path}.running_var")));
        }
        let b = self.store.get(&format!("{path}.bias"), 1)?;
        let rm = self.store.get(&format!("{path}.running_mean"), 1)?;
        let rv = self.store.get(&format!("{path}.running_var"), 1)?;
        // nn.BatchNorm2d in eval: torch.batch_norm(x, w, b, rm, rv, False, 0.1, eps, cudnn.enabled).
        x.0.f_batch_norm(Some(w), Some(b), Some(rm), Some(rv), false, 0.1, python_float(BATCH_NORM_EPS), true)
            .map(Shared)
            .map_err(|e| self.layer_failed(path, w, e))
    }

    fn linear(&mut self, x: &Shared, path: &str) -> Result<Shared, WeightError> {
        let w = self.store.get(&format!("{path}.weight"), 2)?;
        let b = self.store.get(&format!("{path}.bias"), 1)?;
        x.0.f_linear(w, Some(b)).map(Shared).map_err(|e| self.layer_failed(path, w, e))
    }

    // In place, as torchvision's `inplace=True` activations and `out += identity`: no new
    // [R, 256, 7, 7] buffer per layer (same kernels, same values).
    fn relu(&mut self, x: Shared) -> Shared {
        self.keep(
            || {
                let mut t = x.0;
                t.f_relu_().map(|_| t)
            },
            "relu",
        )
    }

    fn hardswish(&mut self, x: Shared) -> Shared {
        self.keep(
            || {
                let mut t = x.0;
                t.f_hardswish_().map(|_| t)
            },
            "hardswish",
        )
    }

    fn hardsigmoid(&mut self, x: &Shared) -> Shared {
        self.keep(|| x.0.f_hardsigmoid(), "hardsigmoid")
    }

    fn add(&mut self, a: Shared, b: &Shared) -> Shared {
        self.keep(
            || {
                let mut t = a.0;
                t.f_add_(&b.0).map(|_| t)
            },
            "residual sum",
        )
    }

    fn mul(&mut self, a: &Shared, b: &Shared) -> Shared {
        self.keep(|| a.0.f_mul(&b.0), "squeeze-excitation product")
    }

    fn max_pool2d(&mut self, x: &Shared, kernel: i64, stride: i64, padding: i64) -> Shared {
        self.keep(|| x.0.f_max_pool2d([kernel, kernel], [stride, stride], [padding, padding], [1, 1], false), "max_pool2d")
    }

    fn global_avg_pool(&mut self, x: &Shared) -> Shared {
        self.keep(|| x.0.f_adaptive_avg_pool2d([1, 1]), "adaptive_avg_pool2d")
    }

    fn upsample_nearest_like(&mut self, x: &Shared, like: &Shared) -> Shared {
        let hw = [self.size_at(like, 2), self.size_at(like, 3)];
        self.keep(|| x.0.f_upsample_nearest2d(hw, None, None), "FPN upsampling")
    }

    fn flatten(&mut self, x: &Shared) -> Shared {
        self.keep(|| x.0.f_flatten(1, -1), "flatten")
    }
}

/// The detection formulas ([`mkonnx::model::detection`]) as the ATen calls eager torchvision
/// makes: scalars are plain numbers passed as ATen `Scalar`s, which ATen rounds to float32
/// for float32 tensors, as it does with torchvision's Python numbers.
impl DetectionOps for TchBackend<'_> {
    type Scalar = f64;

    fn constant(&mut self, v: f64) -> f64 {
        v
    }
    fn ratio(&mut self, a: &f64, b: &f64) -> f64 {
        f64::from(*a as f32 / *b as f32)
    }
    fn coords(&mut self, boxes: &Shared) -> [Shared; 4] {
        [0, 1, 2, 3].map(|i| self.keep(|| boxes.0.f_select(-1, i), "box coordinates"))
    }
    fn stack_coords(&mut self, c: &[Shared; 4]) -> Shared {
        self.keep(|| Tensor::f_stack(&[&c[0].0, &c[1].0, &c[2].0, &c[3].0], -1), "stacking box coordinates")
    }
    fn plus(&mut self, a: &Shared, b: &Shared) -> Shared {
        self.keep(|| a.0.f_add(&b.0), "add")
    }
    fn sub(&mut self, a: &Shared, b: &Shared) -> Shared {
        self.keep(|| a.0.f_sub(&b.0), "sub")
    }
    fn add_scalar(&mut self, x: &Shared, s: &f64) -> Shared {
        self.keep(|| x.0.f_add_scalar(*s), "add")
    }
    fn sub_scalar(&mut self, x: &Shared, s: &f64) -> Shared {
        self.keep(|| x.0.f_sub_scalar(*s), "sub")
    }
    fn mul_scalar(&mut self, x: &Shared, s: &f64) -> Shared {
        self.keep(|| x.0.f_mul_scalar(*s), "mul")
    }
    fn div_scalar(&mut self, x: &Shared, s: &f64) -> Shared {
        self.keep(|| x.0.f_div_scalar(*s), "div")
    }
    fn clamp(&mut self, x: &Shared, lo: Option<&f64>, hi: Option<&f64>) -> Shared {
        // torch.clamp dispatches on which bounds are given; so do these calls.
        let op = || match (lo, hi) {
            (Some(lo), Some(hi)) => x.0.f_clamp(*lo, *hi),
            (Some(lo), None) => x.0.f_clamp_min(*lo),
            (None, Some(hi)) => x.0.f_clamp_max(*hi),
            (None, None) => Ok(x.0.shallow_clone()),
        };
        self.keep(op, "clamp")
    }
    fn exp(&mut self, x: &Shared) -> Shared {
        self.keep(|| x.0.f_exp(), "exp")
    }
    fn sqrt(&mut self, x: &Shared) -> Shared {
        self.keep(|| x.0.f_sqrt(), "sqrt")
    }
    fn log2(&mut self, x: &Shared) -> Shared {
        self.keep(|| x.0.f_log2(), "log2")
    }
    fn floor(&mut self, x: &Shared) -> Shared {
        self.keep(|| x.0.f_floor(), "floor")
    }
    fn at_least(&mut self, x: &Shared, s: &f64) -> Shared {
        self.keep(|| x.0.f_ge(*s), "comparison")
    }
    fn both(&mut self, a: &Shared, b: &Shared) -> Shared {
        self.keep(|| a.0.f_logical_and(&b.0), "logical and")
    }
}

/// The batch's image sizes on libtorch: each image's own frame, and the padded size.
pub struct TchFrames {
    /// Per image: resized and original [height, width].
    frames: Vec<Frame<f64>>,
    /// The padded batch's [height, width].
    padded: [i64; 2],
}

impl TchFrames {
    /// Frames from each image's resized and original [height, width].
    pub(crate) fn new(sizes: &[([i64; 2], [i64; 2])], padded: [i64; 2]) -> Self {
        let size = |[h, w]: [i64; 2]| ImageSize { height: h as f64, width: w as f64 };
        TchFrames {
            frames: sizes.iter().map(|&(resized, original)| Frame { resized: size(resized), original: size(original) }).collect(),
            padded,
        }
    }
}

/// Copies a tensor to a Vec (through the CPU).
pub(crate) fn to_vec<T: tch::kind::Element + Default + Clone>(t: &Tensor, step: &str) -> Result<Vec<T>, RuntimeError> {
    let t = t.f_to_device(Device::Cpu).and_then(|t| t.f_to_kind(T::KIND)).and_then(|t| t.f_contiguous()).step(step)?;
    let mut v = vec![T::default(); t.numel()];
    t.f_copy_data(&mut v, t.numel()).step(step)?;
    Ok(v)
}

/// Boxes [N, 4] as a Vec of rows.
pub(crate) fn to_boxes(t: &Tensor, step: &str) -> Result<Vec<[f32; 4]>, RuntimeError> {
    Ok(to_vec::<f32>(t, step)?.chunks_exact(4).map(|c| [c[0], c[1], c[2], c[3]]).collect())
}

/// The pipeline ([`mkonnx::model::detection::pipeline`]) as eager torchvision runs it:
/// per-image sets are one tensor per image, dropped candidates are gone (`boxes[keep]`),
/// NMS and RoIAlign are torchvision's CPU kernels ([`crate::ops`]).
impl PipelineOps for TchBackend<'_> {
    type Int = i64;
    type Sets = Vec<Shared>;
    type Frames = TchFrames;

    fn dim(&mut self, x: &Shared, axis: i64) -> i64 {
        self.size_at(x, axis)
    }
    fn int_add(&mut self, a: &i64, b: &i64) -> i64 {
        a + b
    }
    fn int_div(&mut self, a: &i64, b: &i64) -> i64 {
        if *b == 0 {
            self.fail(RuntimeError::Torch { step: "anchor strides".into(), source: tch::TchError::Kind("empty feature map".into()) });
            return 0;
        }
        a / b
    }
    fn int_mul(&mut self, a: &i64, b: &i64) -> i64 {
        a * b
    }
    fn int_const(&mut self, v: i64) -> i64 {
        v
    }
    fn int_scalar(&mut self, i: &i64) -> f64 {
        *i as f64
    }
    fn quotient(&mut self, a: &f64, b: &f64) -> f64 {
        a / b
    }
    fn log2_round(&mut self, x: &f64) -> f64 {
        let r = Tensor::f_from_slice(&[*x as f32])
            .and_then(|t| t.f_reshape([0i64; 0]))
            .and_then(|t| t.f_log2())
            .and_then(|t| t.f_round())
            .and_then(|t| t.f_double_value(&[]));
        r.unwrap_or_else(|source| {
            self.fail(RuntimeError::Torch { step: "MultiScaleRoIAlign scales".into(), source });
            0.0
        })
    }
    fn pow2(&mut self, e: &f64) -> f64 {
        2f64.powf(*e)
    }
    fn neg(&mut self, x: &f64) -> f64 {
        -x
    }

    fn padded_size(&mut self, frames: &TchFrames) -> [i64; 2] {
        frames.padded
    }
    fn max_resized_height(&mut self, frames: &TchFrames) -> f64 {
        frames.frames.iter().map(|f| f.resized.height).fold(0.0, f64::max)
    }
    fn level_exponents(&mut self, compute: impl FnOnce(&mut Self) -> Vec<f64>) -> Vec<f64> {
        if let Some(kept) = self.level_exponents.and_then(OnceCell::get) {
            return kept.clone();
        }
        let exponents = compute(self);
        if let (Some(cell), None) = (self.level_exponents, &self.error) {
            let _ = cell.set(exponents.clone());
        }
        exponents
    }

    fn strided_range(&mut self, n: &i64, s: &i64) -> Shared {
        // torch.arange(0, n, dtype=int32) * s: whole numbers, exact in float32.
        let device = self.device;
        self.keep(
            || Tensor::f_arange(*n, (Kind::Int64, device)).and_then(|t| t.f_mul_scalar(*s)).and_then(|t| t.f_to_kind(Kind::Float)),
            "grid anchors",
        )
    }
    fn mesh(&mut self, ys: &Shared, xs: &Shared) -> [Shared; 2] {
        let (h, w) = (self.size_at(ys, 0), self.size_at(xs, 0));
        let y = self.keep(|| ys.0.f_view([-1, 1]).and_then(|t| t.f_expand([h, w], false)).and_then(|t| t.f_reshape([-1])), "grid anchors");
        let x = self.keep(|| xs.0.f_view([1, -1]).and_then(|t| t.f_expand([h, w], false)).and_then(|t| t.f_reshape([-1])), "grid anchors");
        [y, x]
    }
    fn const_tensor(&mut self, values: &[f32], shape: &[i64]) -> Shared {
        let device = self.device;
        self.keep(|| Tensor::f_from_slice(values).and_then(|t| t.f_view(shape)).and_then(|t| t.f_to_device(device)), "constant")
    }
    fn div(&mut self, a: &Shared, b: &Shared) -> Shared {
        self.keep(|| a.0.f_div(&b.0), "div")
    }
    fn reshape(&mut self, x: &Shared, shape: &[i64]) -> Shared {
        let shape: Vec<i64> = shape.iter().enumerate().map(|(i, &d)| if d == 0 { self.size_at(x, i as i64) } else { d }).collect();
        self.keep(|| x.0.f_reshape(shape.as_slice()), "reshape")
    }
    fn concat(&mut self, xs: &[Shared], axis: i64) -> Shared {
        let tensors: Vec<&Tensor> = xs.iter().map(|x| &x.0).collect();
        self.keep(|| Tensor::f_cat(&tensors, axis), "cat")
    }
    fn permute_and_flatten(&mut self, x: &Shared, c: i64) -> Shared {
        let (n, h, w) = (self.size_at(x, 0), self.size_at(x, 2), self.size_at(x, 3));
        self.keep(
            || x.0.f_view([n, -1, c, h, w]).and_then(|t| t.f_permute([0, 3, 4, 1, 2])).and_then(|t| t.f_reshape([n, -1, c])),
            "permute_and_flatten",
        )
    }
    fn top_k(&mut self, x: &Shared, cap: usize) -> (Shared, Shared) {
        let k = (cap as i64).min(self.size_at(x, -1));
        match x.0.f_topk(k, -1, true, true) {
            Ok((values, indices)) => (Shared(values), Shared(indices)),
            Err(source) => {
                let failed = self.fail(RuntimeError::Torch { step: "top-k".into(), source });
                (failed.clone(), failed)
            }
        }
    }
    fn offset_indices(&mut self, indices: &Shared, by: &i64) -> Shared {
        self.keep(|| indices.0.f_add_scalar(*by), "top-k indices")
    }
    fn gather_boxes(&mut self, x: &Shared, indices: &Shared) -> Shared {
        let (n, k) = (self.size_at(indices, 0), self.size_at(indices, 1));
        self.keep(
            || indices.0.f_unsqueeze(-1).and_then(|i| i.f_expand([n, k, 4], false)).and_then(|i| x.0.f_gather(1, &i, false)),
            "gathering boxes",
        )
    }
    fn fill_like(&mut self, like: &Shared, v: f64) -> Shared {
        self.keep(|| like.0.f_full_like(v), "fill")
    }
    fn sigmoid(&mut self, x: &Shared) -> Shared {
        self.keep(|| x.0.f_sigmoid(), "sigmoid")
    }
    fn softmax(&mut self, x: &Shared) -> Shared {
        self.keep(|| x.0.f_softmax(-1, None::<Kind>), "softmax")
    }
    fn greater(&mut self, x: &Shared, s: &f64) -> Shared {
        self.keep(|| x.0.f_gt(*s), "comparison")
    }
    fn slice_from(&mut self, x: &Shared, axis: i64, start: i64) -> Shared {
        let len = self.size_at(x, axis) - start;
        self.keep(|| x.0.f_narrow(axis, start, len.max(0)), "slice")
    }
    fn merge_axes(&mut self, x: &Shared, axis: i64) -> Shared {
        let mut size = if x.0.defined() { x.0.size() } else { Vec::new() };
        let a = if axis < 0 { size.len() as i64 + axis } else { axis };
        if a < 0 || a as usize + 1 >= size.len() {
            return self.fail(RuntimeError::Torch {
                step: "reshape".into(),
                source: tch::TchError::Shape(format!("cannot merge axis {axis} of {size:?}")),
            });
        }
        let a = a as usize;
        size[a] *= size[a + 1];
        size.remove(a + 1);
        self.keep(|| x.0.f_reshape(size.as_slice()), "reshape")
    }
    fn class_ids_like(&mut self, scores: &Shared) -> Shared {
        // torch.arange(num_classes).view(1, -1).expand_as(scores), as float ids.
        let c = self.size_at(scores, -1);
        let device = self.device;
        self.keep(|| Tensor::f_arange(c, (Kind::Float, device)).and_then(|t| t.f_expand_as(&scores.0)), "labels")
    }

    fn per_image(&mut self, x: &Shared) -> Vec<Shared> {
        (0..self.size_at(x, 0)).map(|i| self.keep(|| x.0.f_select(0, i), "per-image split")).collect()
    }
    fn rows(&mut self, sets: &Vec<Shared>) -> Shared {
        self.concat(sets, 0)
    }
    fn batch_index(&mut self, sets: &Vec<Shared>) -> Shared {
        let index: Vec<f32> =
            sets.iter().enumerate().flat_map(|(i, s)| std::iter::repeat_n(i as f32, self.size_at(s, 0) as usize)).collect();
        let device = self.device;
        self.keep(|| Tensor::f_from_slice(&index).and_then(|t| t.f_to_device(device)), "batch index")
    }
    fn split_rows(&mut self, rows: &Shared, like: &Vec<Shared>) -> Vec<Shared> {
        let counts: Vec<i64> = like.iter().map(|s| self.size_at(s, 0)).collect();
        match rows.0.f_split_with_sizes(counts.as_slice(), 0) {
            Ok(parts) => parts.into_iter().map(Shared).collect(),
            Err(source) => vec![self.fail(RuntimeError::Torch { step: "per-image split".into(), source }); like.len()],
        }
    }
    fn map_images<F>(&mut self, frames: &TchFrames, inputs: &[&Vec<Shared>], mut f: F) -> Vec<Vec<Shared>>
    where
        F: FnMut(&mut Self, &[Shared], &Frame<f64>) -> Vec<Shared>,
    {
        let mut outputs: Vec<Vec<Shared>> = Vec::new();
        for (i, frame) in frames.frames.iter().enumerate() {
            let tensors: Vec<Shared> = inputs.iter().map(|set| set.get(i).cloned().unwrap_or_else(|| Shared(Tensor::new()))).collect();
            let results = f(self, &tensors, frame);
            outputs.resize_with(results.len(), Vec::new);
            for (set, t) in outputs.iter_mut().zip(results) {
                set.push(t);
            }
        }
        outputs
    }
    fn keep_where(&mut self, c: Candidates<Shared>, keep: &Shared) -> Candidates<Shared> {
        let index = self.keep(|| keep.0.f_nonzero().and_then(|t| t.f_squeeze_dim(1)), "filtering candidates");
        let [boxes, scores, classes] =
            [&c.boxes, &c.scores, &c.classes].map(|t| self.keep(|| t.0.f_index_select(0, &index.0), "filtering candidates"));
        Candidates { boxes, scores, classes }
    }
    fn batched_nms_top(&mut self, c: &Candidates<Shared>, _class_ids: std::ops::Range<usize>, iou: f32, k: usize) -> Candidates<Shared> {
        let step = "batched_nms";
        let kept = (|| -> Result<Shared, RuntimeError> {
            let boxes = to_boxes(&c.boxes.0, step)?;
            let scores = to_vec::<f32>(&c.scores.0, step)?;
            let classes = to_vec::<i64>(&c.classes.0, step)?;
            let mut keep = batched_nms(&boxes, &scores, &classes, python_float(iou), self.device.is_cuda())?;
            keep.truncate(k);
            let keep: Vec<i64> = keep.into_iter().map(|i| i as i64).collect();
            Tensor::f_from_slice(&keep).and_then(|t| t.f_to_device(self.device)).map(Shared).step(step)
        })();
        let kept = kept.unwrap_or_else(|e| self.fail(e));
        let [boxes, scores, classes] = [&c.boxes, &c.scores, &c.classes].map(|t| self.keep(|| t.0.f_index_select(0, &kept.0), step));
        Candidates { boxes, scores, classes }
    }

    fn roi_align(&mut self, map: &Shared, rois: &Shared, batch_index: &Shared, scale: &f64) -> Shared {
        let step = "MultiScaleRoIAlign";
        let pooled = (|| -> Result<Tensor, RuntimeError> {
            let (r, c) = (self.size_at(rois, 0), self.size_at(map, 1));
            let side = ROI_OUTPUT_SIZE;
            if r == 0 {
                return Tensor::f_zeros([0, c, side, side], (Kind::Float, self.device)).step(step);
            }
            let shape = [0, 1, 2, 3].map(|axis| self.size_at(map, axis) as usize);
            let input = to_vec::<f32>(&map.0, step)?;
            let boxes = to_boxes(&rois.0, step)?;
            let images = to_vec::<f32>(&batch_index.0, step)?;
            let rois: Vec<[f32; 5]> = images.iter().zip(&boxes).map(|(&i, b)| [i, b[0], b[1], b[2], b[3]]).collect();
            let params = RoiAlignParams {
                spatial_scale: *scale as f32,
                pooled_height: side as usize,
                pooled_width: side as usize,
                sampling_ratio: ROI_SAMPLING_RATIO as i32,
                aligned: false,
            };
            let mut out = vec![0f32; rois.len() * shape[1] * (side * side) as usize];
            roi_align(&input, shape, &rois, &params, &mut out)?;
            Tensor::f_from_slice(&out).and_then(|t| t.f_view([r, c, side, side])).and_then(|t| t.f_to_device(self.device)).step(step)
        })();
        pooled.map(Shared).unwrap_or_else(|e| self.fail(e))
    }
    fn rows_at_level(&mut self, levels: &Shared, level: usize) -> Shared {
        self.keep(|| levels.0.f_eq(level as f64).and_then(|t| t.f_nonzero()).and_then(|t| t.f_squeeze_dim(1)), "LevelMapper")
    }
    fn take_rows(&mut self, x: &Shared, index: &Shared) -> Shared {
        self.keep(|| x.0.f_index_select(0, &index.0), "MultiScaleRoIAlign")
    }
    fn put_rows(&mut self, into: Shared, index: &Shared, rows: &Shared) -> Shared {
        self.keep(
            || {
                let mut t = into.0;
                t.f_index_copy_(0, &index.0, &rows.0).map(|_| t)
            },
            "MultiScaleRoIAlign",
        )
    }
    fn without_padding(&mut self, boxes: &Shared, _scores: &Shared) -> Shared {
        boxes.clone()
    }
    fn zeros_pooled(&mut self, rois: &Shared, map: &Shared) -> Shared {
        let (r, c) = (self.size_at(rois, 0), self.size_at(map, 1));
        let device = self.device;
        self.keep(|| Tensor::f_zeros([r, c, ROI_OUTPUT_SIZE, ROI_OUTPUT_SIZE], (Kind::Float, device)), "MultiScaleRoIAlign")
    }

    fn phase_done(&mut self, phase: &'static str) {
        self.phases.lap(phase);
    }
}

/// Wall time per inference phase, printed to stderr when `MKONNX_TORCH_PROFILE` is set (to
/// see where a slow model spends its time, next to eager PyTorch's own profile).
pub(crate) struct PhaseTimer {
    last: Option<std::time::Instant>,
    laps: Vec<(&'static str, std::time::Duration)>,
}

impl PhaseTimer {
    fn from_env() -> Self {
        let on = std::env::var_os("MKONNX_TORCH_PROFILE").is_some_and(|v| !v.is_empty() && v != "0");
        PhaseTimer { last: on.then(std::time::Instant::now), laps: Vec::new() }
    }

    fn lap(&mut self, phase: &'static str) {
        if let Some(last) = self.last.as_mut() {
            let now = std::time::Instant::now();
            self.laps.push((phase, now - *last));
            *last = now;
        }
    }

    fn report(&self) {
        if self.last.is_some() {
            let laps: Vec<String> = self.laps.iter().map(|(p, d)| format!("{p} {:.1} ms", d.as_secs_f64() * 1e3)).collect();
            eprintln!("mkonnx-torch profile: {}", laps.join(", "));
        }
    }
}

#[cfg(test)]
mod tests {
    //! The detection formulas and the pipeline's composites (grid anchors, MultiScaleRoIAlign,
    //! batched NMS)
    //! on libtorch against torchvision itself, bit for bit, on the inputs of
    //! `tests/detection_formulas.py` (the ONNX side is tests/detection_formulas.rs).

    use super::*;
    use mkonnx::model::anchors::cell_anchors;
    use mkonnx::model::detection::{box_coder, boxes, level_mapper, pipeline, ImageSize};
    use serde_json::Value;
    use std::path::Path;

    fn torchvision_cases() -> Value {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let python =
            root.ancestors().map(|d| d.join(".venv/bin/python")).find(|p| p.exists()).expect(".venv/bin/python (run `make setup`)");
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("cases.json");
        let o = std::process::Command::new(python).arg(root.join("tests/detection_formulas.py")).arg(&out).output().unwrap();
        assert!(o.status.success(), "tests/detection_formulas.py: {}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap()
    }

    fn tensor(v: &Value, shape: &[i64]) -> Shared {
        let values: Vec<f32> = v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
        Shared(Tensor::from_slice(&values).view(shape))
    }

    fn assert_same_bits(what: &str, got: &Shared, expected: &Shared) {
        let got: Vec<f32> = Vec::try_from(got.0.to_kind(tch::Kind::Float).flatten(0, -1)).unwrap();
        let expected: Vec<f32> = Vec::try_from(expected.0.flatten(0, -1)).unwrap();
        assert_eq!(got.len(), expected.len(), "{what}: size");
        let bad = got.iter().zip(&expected).position(|(a, b)| a.to_bits() != b.to_bits());
        if let Some(i) = bad {
            panic!("{what}: value {i} is {} on libtorch, {} in torchvision", got[i], expected[i]);
        }
    }

    #[test]
    fn pipeline_composites_equal_torchvision_bit_for_bit() {
        let cases = torchvision_cases();
        let store = WeightStore { tensors: HashMap::new(), frozen: HashMap::new() };
        let mut b = TchBackend::new(&store);
        let int = |v: &Value| v.as_i64().unwrap();

        for case in cases["grid_anchors"].as_array().unwrap() {
            let lists = |key: &str| -> Vec<Vec<f32>> {
                case[key]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|l| l.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect())
                    .collect()
            };
            let padded = [int(&case["padded"][0]), int(&case["padded"][1])];
            let levels: Vec<Shared> = case["features"]
                .as_array()
                .unwrap()
                .iter()
                .zip(lists("sizes").iter().zip(lists("ratios")))
                .map(|(hw, (sizes, ratios))| {
                    let feature = Shared(Tensor::zeros([1, 1, int(&hw[0]), int(&hw[1])], (Kind::Float, Device::Cpu)));
                    pipeline::grid_anchors(&mut b, &feature, &cell_anchors(sizes, &ratios), &padded)
                })
                .collect();
            let anchors = b.concat(&levels, 0);
            assert_same_bits(&format!("AnchorGenerator (padded {padded:?})"), &anchors, &tensor(&case["out"], &[-1, 4]));
        }

        let pool = &cases["multi_scale_roi_align"];
        let names: Vec<String> = pool["names"].as_array().unwrap().iter().map(|n| n.as_str().unwrap().to_string()).collect();
        let maps: Vec<Shared> = pool["features"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| tensor(&f["values"], &f["shape"].as_array().unwrap().iter().map(int).collect::<Vec<_>>()))
            .collect();
        let proposals: Vec<Shared> = pool["boxes"].as_array().unwrap().iter().map(|boxes| tensor(boxes, &[-1, 4])).collect();
        let sizes: Vec<([i64; 2], [i64; 2])> = pool["image_sizes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let size = [int(&s[0]), int(&s[1])];
                (size, size)
            })
            .collect();
        let frames = TchFrames::new(&sizes, [0, 0]);
        let pooled = pipeline::multi_scale_roi_align(&mut b, &names, &maps, &proposals, &frames);
        let channels = maps[0].0.size()[1];
        assert_same_bits("MultiScaleRoIAlign", &pooled, &tensor(&pool["out"], &[-1, channels, 7, 7]));

        for case in cases["batched_nms"].as_array().unwrap() {
            let n = case["scores"].as_array().unwrap().len() as i64;
            let candidates = Candidates {
                boxes: tensor(&case["boxes"], &[n, 4]),
                scores: tensor(&case["scores"], &[n]),
                classes: tensor(&case["classes"], &[n]),
            };
            let iou = case["iou_threshold"].as_f64().unwrap() as f32;
            let kept = b.batched_nms_top(&candidates, 0..0, iou, n as usize);
            let keep: Vec<i64> = case["keep"].as_array().unwrap().iter().map(int).collect();
            let keep = Tensor::from_slice(&keep);
            let what = format!("batched_nms (n={n})");
            assert_same_bits(&what, &kept.boxes, &Shared(candidates.boxes.0.index_select(0, &keep)));
            assert_same_bits(&what, &kept.scores, &Shared(candidates.scores.0.index_select(0, &keep)));
        }
        assert!(b.take_error().is_none());
    }

    #[test]
    fn detection_formulas_equal_torchvision_bit_for_bit() {
        let cases = torchvision_cases();
        let store = WeightStore { tensors: HashMap::new(), frozen: HashMap::new() };
        let mut b = TchBackend::new(&store);
        let rows = |v: &Value| v.as_array().unwrap().len() as i64 / 4;

        for case in cases["decode"].as_array().unwrap() {
            let (r, k) = (case["rois"].as_i64().unwrap(), case["k"].as_i64().unwrap());
            let w: Vec<f64> = case["weights"].as_array().unwrap().iter().map(|w| w.as_f64().unwrap()).collect();
            let decoded = box_coder::decode(
                &mut b,
                &tensor(&case["deltas"], &[r, k, 4]),
                &tensor(&case["boxes"], &[r, 1, 4]),
                [w[0], w[1], w[2], w[3]],
            );
            assert_same_bits("BoxCoder.decode_single", &decoded, &tensor(&case["out"], &[r, k, 4]));
        }

        let clip = &cases["clip"];
        let size = ImageSize { height: clip["size"][0].as_f64().unwrap(), width: clip["size"][1].as_f64().unwrap() };
        let n = rows(&clip["boxes"]);
        let coords = boxes::clip_to_image(&mut b, &tensor(&clip["boxes"], &[n, 4]), &size);
        let clipped = b.stack_coords(&coords);
        assert_same_bits("clip_boxes_to_image", &clipped, &tensor(&clip["out"], &[n, 4]));

        for case in cases["small_boxes"].as_array().unwrap() {
            let n = rows(&case["boxes"]);
            let coords = b.coords(&tensor(&case["boxes"], &[n, 4]));
            let keep = boxes::big_enough(&mut b, &coords, case["min_size"].as_f64().unwrap());
            let expected: Vec<f32> =
                case["keep"].as_array().unwrap().iter().map(|k| if k.as_bool().unwrap() { 1.0 } else { 0.0 }).collect();
            assert_same_bits("remove_small_boxes", &keep, &Shared(Tensor::from_slice(&expected)));
        }

        let resize = &cases["resize_boxes"];
        let n = rows(&resize["boxes"]);
        let side = |v: &Value, i: usize| v[i].as_f64().unwrap();
        let resized = ImageSize { height: side(&resize["resized"], 0), width: side(&resize["resized"], 1) };
        let original = ImageSize { height: side(&resize["original"], 0), width: side(&resize["original"], 1) };
        let coords = b.coords(&tensor(&resize["boxes"], &[n, 4]));
        let coords = boxes::resize_to_original(&mut b, &coords, &resized, &original);
        let rescaled = b.stack_coords(&coords);
        assert_same_bits("resize_boxes", &rescaled, &tensor(&resize["out"], &[n, 4]));

        let levels = &cases["level_mapper"];
        let n = rows(&levels["boxes"]);
        let (k_min, k_max) = (levels["k_min"].as_f64().unwrap(), levels["k_max"].as_f64().unwrap());
        let target = level_mapper::target_levels(&mut b, &tensor(&levels["boxes"], &[n, 4]), &k_min, &k_max);
        assert_same_bits("LevelMapper", &target, &tensor(&levels["out"], &[n]));
        assert!(b.take_error().is_none());
    }
}
