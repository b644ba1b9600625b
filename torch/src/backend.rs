//! [`Backend`] on libtorch: the network layers as the same ATen calls torchvision's modules
//! make (`F.conv2d`, `torch.batch_norm`, `F.linear`, ...), on weights converted once.

use super::{RuntimeError, TorchContext};
use crate::ops::python_float;
use mkonnx::model::arch::{Architecture, BATCH_NORM_EPS};
use mkonnx::model::detection::DetectionOps;
use mkonnx::model::network::Backend;
use mkonnx::model::weights::{WeightError, Weights};
use std::collections::HashMap;
use tch::{Device, Tensor};

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
}

impl<'a> TchBackend<'a> {
    pub(crate) fn new(store: &'a WeightStore) -> Self {
        TchBackend { store, error: None }
    }

    /// The first error met since the last call, if any.
    pub fn take_error(&mut self) -> Option<RuntimeError> {
        self.error.take()
    }

    fn keep(&mut self, r: Result<Tensor, tch::TchError>, step: &str) -> Shared {
        match r {
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
        let mut t = x.0;
        let r = t.f_relu_().map(|_| t);
        self.keep(r, "relu")
    }

    fn hardswish(&mut self, x: Shared) -> Shared {
        let mut t = x.0;
        let r = t.f_hardswish_().map(|_| t);
        self.keep(r, "hardswish")
    }

    fn hardsigmoid(&mut self, x: &Shared) -> Shared {
        self.keep(x.0.f_hardsigmoid(), "hardsigmoid")
    }

    fn add(&mut self, a: Shared, b: &Shared) -> Shared {
        let mut t = a.0;
        let r = t.f_add_(&b.0).map(|_| t);
        self.keep(r, "residual sum")
    }

    fn mul(&mut self, a: &Shared, b: &Shared) -> Shared {
        self.keep(a.0.f_mul(&b.0), "squeeze-excitation product")
    }

    fn max_pool2d(&mut self, x: &Shared, kernel: i64, stride: i64, padding: i64) -> Shared {
        self.keep(x.0.f_max_pool2d([kernel, kernel], [stride, stride], [padding, padding], [1, 1], false), "max_pool2d")
    }

    fn global_avg_pool(&mut self, x: &Shared) -> Shared {
        self.keep(x.0.f_adaptive_avg_pool2d([1, 1]), "adaptive_avg_pool2d")
    }

    fn upsample_nearest_like(&mut self, x: &Shared, like: &Shared) -> Shared {
        let size = like.0.size();
        let hw: Vec<i64> = size.iter().skip(2).copied().collect();
        self.keep(x.0.f_upsample_nearest2d(hw.as_slice(), None, None), "FPN upsampling")
    }

    fn flatten(&mut self, x: &Shared) -> Shared {
        self.keep(x.0.f_flatten(1, -1), "flatten")
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
        [0, 1, 2, 3].map(|i| {
            let r = boxes.0.f_select(-1, i);
            self.keep(r, "box coordinates")
        })
    }
    fn stack_coords(&mut self, c: &[Shared; 4]) -> Shared {
        self.keep(Tensor::f_stack(&[&c[0].0, &c[1].0, &c[2].0, &c[3].0], -1), "stacking box coordinates")
    }
    fn plus(&mut self, a: &Shared, b: &Shared) -> Shared {
        self.keep(a.0.f_add(&b.0), "add")
    }
    fn sub(&mut self, a: &Shared, b: &Shared) -> Shared {
        self.keep(a.0.f_sub(&b.0), "sub")
    }
    fn add_scalar(&mut self, x: &Shared, s: &f64) -> Shared {
        self.keep(x.0.f_add_scalar(*s), "add")
    }
    fn sub_scalar(&mut self, x: &Shared, s: &f64) -> Shared {
        self.keep(x.0.f_sub_scalar(*s), "sub")
    }
    fn mul_scalar(&mut self, x: &Shared, s: &f64) -> Shared {
        self.keep(x.0.f_mul_scalar(*s), "mul")
    }
    fn div_scalar(&mut self, x: &Shared, s: &f64) -> Shared {
        self.keep(x.0.f_div_scalar(*s), "div")
    }
    fn clamp(&mut self, x: &Shared, lo: Option<&f64>, hi: Option<&f64>) -> Shared {
        // torch.clamp dispatches on which bounds are given; so do these calls.
        let r = match (lo, hi) {
            (Some(lo), Some(hi)) => x.0.f_clamp(*lo, *hi),
            (Some(lo), None) => x.0.f_clamp_min(*lo),
            (None, Some(hi)) => x.0.f_clamp_max(*hi),
            (None, None) => Ok(x.0.shallow_clone()),
        };
        self.keep(r, "clamp")
    }
    fn exp(&mut self, x: &Shared) -> Shared {
        self.keep(x.0.f_exp(), "exp")
    }
    fn sqrt(&mut self, x: &Shared) -> Shared {
        self.keep(x.0.f_sqrt(), "sqrt")
    }
    fn log2(&mut self, x: &Shared) -> Shared {
        self.keep(x.0.f_log2(), "log2")
    }
    fn floor(&mut self, x: &Shared) -> Shared {
        self.keep(x.0.f_floor(), "floor")
    }
    fn at_least(&mut self, x: &Shared, s: &f64) -> Shared {
        self.keep(x.0.f_ge(*s), "comparison")
    }
    fn both(&mut self, a: &Shared, b: &Shared) -> Shared {
        self.keep(a.0.f_logical_and(&b.0), "logical and")
    }
}

#[cfg(test)]
mod tests {
    //! The detection formulas on libtorch against torchvision itself, bit for bit, on the
    //! inputs of `tests/detection_formulas.py` (the ONNX side is tests/detection_formulas.rs).

    use super::*;
    use mkonnx::model::detection::{box_coder, boxes, level_mapper, ImageSize};
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
