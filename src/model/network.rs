//! torchvision's FasterRCNN networks, described once and run on any [`Backend`].
//!
//! Every layer is addressed by its exact state_dict path (`backbone.body.layer1.0.conv1`), in
//! the style of tch-rs's vision models, so weights load by name with no mapping table. The same
//! description is emitted as ONNX nodes by the exporter and executed on libtorch by the
//! PyTorch runner: there is no second, hand-kept copy of the network.
//!
//! What is here: the backbone bodies (ResNet-50, MobileNetV3-Large), the FPN, the RPN head, the
//! box head and the box predictor. The detection logic around them (transform, anchors,
//! proposal filtering, RoI pooling, post-processing) is in [`super::detection`], written once
//! the same way.

use super::arch::Architecture;
use super::weights::WeightError;

/// The tensor operations the networks need. Implemented by the ONNX graph builder
/// (symbolic) and by the libtorch runner (eager).
pub trait Backend {
    /// A tensor (or a symbolic value) of this backend.
    type Tensor: Clone;

    /// `nn.Conv2d` whose weight (OIHW) is at `{path}.weight`, with `{path}.bias` when `bias`.
    fn conv2d(
        &mut self,
        x: &Self::Tensor,
        path: &str,
        bias: bool,
        stride: i64,
        padding: i64,
        groups: i64,
    ) -> Result<Self::Tensor, WeightError>;
    /// `nn.BatchNorm2d` (eval) or `FrozenBatchNorm2d` with parameters at `path`.
    fn batch_norm(&mut self, x: &Self::Tensor, path: &str) -> Result<Self::Tensor, WeightError>;
    /// `nn.Linear` at `path`.
    fn linear(&mut self, x: &Self::Tensor, path: &str) -> Result<Self::Tensor, WeightError>;
    /// `nn.ReLU`. Takes `x` by value: a backend may overwrite it in place, as torchvision's
    /// `ReLU(inplace=True)` does, so the description passes only a tensor nothing else reads
    /// afterwards (a fresh layer output, never a clone of one kept elsewhere).
    fn relu(&mut self, x: Self::Tensor) -> Self::Tensor;
    /// `nn.Hardswish`; in place like [`Backend::relu`].
    fn hardswish(&mut self, x: Self::Tensor) -> Self::Tensor;
    /// `nn.Hardsigmoid`.
    fn hardsigmoid(&mut self, x: &Self::Tensor) -> Self::Tensor;
    /// Elementwise sum `a + b`; `a` is taken by value and may be overwritten in place (a
    /// residual's `out += identity`), under the rule of [`Backend::relu`].
    fn add(&mut self, a: Self::Tensor, b: &Self::Tensor) -> Self::Tensor;
    /// Elementwise (broadcasting) product.
    fn mul(&mut self, a: &Self::Tensor, b: &Self::Tensor) -> Self::Tensor;
    /// `F.max_pool2d` with a square kernel.
    fn max_pool2d(&mut self, x: &Self::Tensor, kernel: i64, stride: i64, padding: i64) -> Self::Tensor;
    /// `nn.AdaptiveAvgPool2d(1)`.
    fn global_avg_pool(&mut self, x: &Self::Tensor) -> Self::Tensor;
    /// `F.interpolate(x, size=like.shape[-2:], mode="nearest")`.
    fn upsample_nearest_like(&mut self, x: &Self::Tensor, like: &Self::Tensor) -> Self::Tensor;
    /// `x.flatten(start_dim=1)`.
    fn flatten(&mut self, x: &Self::Tensor) -> Self::Tensor;
}

/// State_dict prefixes of the layers that INT8 quantization covers (`src/onnx/quantize.rs`):
/// the backbone (body and FPN), the RPN head and the box head, as addressed by the builders
/// below. The box predictor and the detection logic around the network (anchors, box
/// decoding, NMS, RoIAlign, post-processing) stay float32.
pub const QUANTIZED_LAYER_PREFIXES: [&str; 3] = ["backbone.", "rpn.head.", "roi_heads.box_head."];

/// Layers under [`QUANTIZED_LAYER_PREFIXES`] that stay float32 all the same: the RPN head's
/// output convolutions, whose objectness logits and box deltas go straight into the top-n
/// cut and anchor decoding. Measured on the ResNet-50 fixture (min-max, its 14 images): with
/// them quantized INT8 AP was 0.025 below float32, without them 0.002 above.
pub const FLOAT_LAYERS: [&str; 2] = ["rpn.head.cls_logits", "rpn.head.bbox_pred"];

/// Activation after a conv-norm layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Activation {
    None,
    Relu,
    Hardswish,
}

fn activate<B: Backend>(b: &mut B, x: B::Tensor, act: Activation) -> B::Tensor {
    match act {
        Activation::None => x,
        Activation::Relu => b.relu(x),
        Activation::Hardswish => b.hardswish(x),
    }
}

/// torchvision's `Conv2dNormActivation` with a norm layer: `{path}.0` conv (no bias), `{path}.1` norm.
fn conv_norm_act<B: Backend>(
    b: &mut B,
    x: &B::Tensor,
    path: &str,
    kernel: i64,
    stride: i64,
    groups: i64,
    act: Activation,
) -> Result<B::Tensor, WeightError> {
    let y = b.conv2d(x, &format!("{path}.0"), false, stride, (kernel - 1) / 2, groups)?;
    let y = b.batch_norm(&y, &format!("{path}.1"))?;
    Ok(activate(b, y, act))
}

/// The feature maps of the backbone with FPN, in torchvision's order (`0`, `1`, ..., `pool`).
pub struct Features<T> {
    /// Feature map names, as `BackboneWithFPN` returns them.
    pub names: Vec<String>,
    /// The maps, [B, 256, h, w] each.
    pub maps: Vec<T>,
}

/// `model.backbone(images)`: body, FPN and the `LastLevelMaxPool` extra level.
pub fn backbone<B: Backend>(b: &mut B, arch: Architecture, images: &B::Tensor) -> Result<Features<B::Tensor>, WeightError> {
    let body =
        if arch.is_resnet() { resnet50_body(b, "backbone.body", images)? } else { mobilenet_v3_large_body(b, "backbone.body", images)? };
    let mut maps = fpn(b, "backbone.fpn", &body, arch == Architecture::ResNet50FpnV2)?;
    let last = maps.last().expect("an FPN has at least one level").clone();
    maps.push(b.max_pool2d(&last, 1, 2, 0));
    let mut names: Vec<String> = (0..body.len()).map(|i| i.to_string()).collect();
    names.push("pool".into());
    Ok(Features { names, maps })
}

/// torchvision's ResNet-50 (v1.5: stride on the 3x3 conv), returning layer1..layer4.
fn resnet50_body<B: Backend>(b: &mut B, p: &str, x: &B::Tensor) -> Result<Vec<B::Tensor>, WeightError> {
    let x = b.conv2d(x, &format!("{p}.conv1"), false, 2, 3, 1)?;
    let x = b.batch_norm(&x, &format!("{p}.bn1"))?;
    let x = b.relu(x);
    let mut x = b.max_pool2d(&x, 3, 2, 1);
    let mut outs = Vec::with_capacity(4);
    for (layer, blocks) in [3usize, 4, 6, 3].into_iter().enumerate() {
        for block in 0..blocks {
            let stride = if layer > 0 && block == 0 { 2 } else { 1 };
            x = bottleneck(b, &format!("{p}.layer{}.{block}", layer + 1), &x, stride, block == 0)?;
        }
        outs.push(x.clone());
    }
    Ok(outs)
}

fn bottleneck<B: Backend>(b: &mut B, p: &str, x: &B::Tensor, stride: i64, downsample: bool) -> Result<B::Tensor, WeightError> {
    let y = b.conv2d(x, &format!("{p}.conv1"), false, 1, 0, 1)?;
    let y = b.batch_norm(&y, &format!("{p}.bn1"))?;
    let y = b.relu(y);
    let y = b.conv2d(&y, &format!("{p}.conv2"), false, stride, 1, 1)?;
    let y = b.batch_norm(&y, &format!("{p}.bn2"))?;
    let y = b.relu(y);
    let y = b.conv2d(&y, &format!("{p}.conv3"), false, 1, 0, 1)?;
    let y = b.batch_norm(&y, &format!("{p}.bn3"))?;
    let identity = if downsample {
        let d = b.conv2d(x, &format!("{p}.downsample.0"), false, stride, 0, 1)?;
        b.batch_norm(&d, &format!("{p}.downsample.1"))?
    } else {
        x.clone()
    };
    let y = b.add(y, &identity);
    Ok(b.relu(y))
}

/// One row of torchvision's MobileNetV3-Large `inverted_residual_setting`.
struct Bneck {
    input: usize,
    kernel: i64,
    expanded: usize,
    out: usize,
    se: bool,
    hardswish: bool,
    stride: i64,
}

const fn bneck(input: usize, kernel: i64, expanded: usize, out: usize, se: bool, hardswish: bool, stride: i64) -> Bneck {
    Bneck { input, kernel, expanded, out, se, hardswish, stride }
}

/// `_mobilenet_v3_conf("mobilenet_v3_large")` (no reduced tail, no dilation), as detection uses it.
const MOBILENET_V3_LARGE: [Bneck; 15] = [
    bneck(16, 3, 16, 16, false, false, 1),
    bneck(16, 3, 64, 24, false, false, 2),
    bneck(24, 3, 72, 24, false, false, 1),
    bneck(24, 5, 72, 40, true, false, 2),
    bneck(40, 5, 120, 40, true, false, 1),
    bneck(40, 5, 120, 40, true, false, 1),
    bneck(40, 3, 240, 80, false, true, 2),
    bneck(80, 3, 200, 80, false, true, 1),
    bneck(80, 3, 184, 80, false, true, 1),
    bneck(80, 3, 184, 80, false, true, 1),
    bneck(80, 3, 480, 112, true, true, 1),
    bneck(112, 3, 672, 112, true, true, 1),
    bneck(112, 5, 672, 160, true, true, 2),
    bneck(160, 5, 960, 160, true, true, 1),
    bneck(160, 5, 960, 160, true, true, 1),
];

/// `backbone.features` of MobileNetV3-Large, returning the outputs that `_mobilenet_extractor`
/// hands to the FPN: the last two stages (the last strided block and the final 1x1 conv).
fn mobilenet_v3_large_body<B: Backend>(b: &mut B, p: &str, x: &B::Tensor) -> Result<Vec<B::Tensor>, WeightError> {
    let last_index = MOBILENET_V3_LARGE.len() + 1;
    // stage_indices = [0] + strided blocks + [last]; the FPN takes the last two.
    let mut stage_indices = vec![0];
    stage_indices.extend(MOBILENET_V3_LARGE.iter().enumerate().filter(|(_, c)| c.stride > 1).map(|(i, _)| i + 1));
    stage_indices.push(last_index);
    let returned = &stage_indices[stage_indices.len() - 2..];

    let mut x = conv_norm_act(b, x, &format!("{p}.0"), 3, 2, 1, Activation::Hardswish)?;
    let mut outs = Vec::new();
    for (i, cnf) in MOBILENET_V3_LARGE.iter().enumerate() {
        x = inverted_residual(b, &format!("{p}.{}.block", i + 1), &x, cnf)?;
        if returned.contains(&(i + 1)) {
            outs.push(x.clone());
        }
    }
    x = conv_norm_act(b, &x, &format!("{p}.{last_index}"), 1, 1, 1, Activation::Hardswish)?;
    outs.push(x);
    Ok(outs)
}

fn inverted_residual<B: Backend>(b: &mut B, p: &str, x: &B::Tensor, cnf: &Bneck) -> Result<B::Tensor, WeightError> {
    let act = if cnf.hardswish { Activation::Hardswish } else { Activation::Relu };
    let mut index = 0;
    let mut y = x.clone();
    if cnf.expanded != cnf.input {
        y = conv_norm_act(b, &y, &format!("{p}.{index}"), 1, 1, 1, act)?;
        index += 1;
    }
    y = conv_norm_act(b, &y, &format!("{p}.{index}"), cnf.kernel, cnf.stride, cnf.expanded as i64, act)?;
    index += 1;
    if cnf.se {
        let s = b.global_avg_pool(&y);
        let s = b.conv2d(&s, &format!("{p}.{index}.fc1"), true, 1, 0, 1)?;
        let s = b.relu(s);
        let s = b.conv2d(&s, &format!("{p}.{index}.fc2"), true, 1, 0, 1)?;
        let s = b.hardsigmoid(&s);
        y = b.mul(&s, &y);
        index += 1;
    }
    y = conv_norm_act(b, &y, &format!("{p}.{index}"), 1, 1, 1, Activation::None)?;
    Ok(if cnf.stride == 1 && cnf.input == cnf.out { b.add(y, x) } else { y })
}

/// `FeaturePyramidNetwork.forward` (without the extra block). With `norm` (v2), the inner and
/// layer blocks are conv (no bias) + BatchNorm; otherwise conv with bias.
fn fpn<B: Backend>(b: &mut B, p: &str, body: &[B::Tensor], norm: bool) -> Result<Vec<B::Tensor>, WeightError> {
    let block = |b: &mut B, x: &B::Tensor, path: String, kernel: i64| -> Result<B::Tensor, WeightError> {
        let y = b.conv2d(x, &format!("{path}.0"), !norm, 1, (kernel - 1) / 2, 1)?;
        if norm {
            b.batch_norm(&y, &format!("{path}.1"))
        } else {
            Ok(y)
        }
    };
    let n = body.len();
    let mut last_inner = block(b, &body[n - 1], format!("{p}.inner_blocks.{}", n - 1), 1)?;
    let mut results = vec![block(b, &last_inner, format!("{p}.layer_blocks.{}", n - 1), 3)?];
    for idx in (0..n - 1).rev() {
        let lateral = block(b, &body[idx], format!("{p}.inner_blocks.{idx}"), 1)?;
        let top_down = b.upsample_nearest_like(&last_inner, &lateral);
        last_inner = b.add(lateral, &top_down);
        results.insert(0, block(b, &last_inner, format!("{p}.layer_blocks.{idx}"), 3)?);
    }
    Ok(results)
}

/// `RPNHead` on one feature map: (objectness logits [B, A, h, w], box deltas [B, 4A, h, w]).
pub fn rpn_head<B: Backend>(b: &mut B, arch: Architecture, feature: &B::Tensor) -> Result<(B::Tensor, B::Tensor), WeightError> {
    let depth = if arch == Architecture::ResNet50FpnV2 { 2 } else { 1 };
    let mut t = feature.clone();
    for i in 0..depth {
        t = b.conv2d(&t, &format!("rpn.head.conv.{i}.0"), true, 1, 1, 1)?;
        t = b.relu(t);
    }
    let logits = b.conv2d(&t, "rpn.head.cls_logits", true, 1, 0, 1)?;
    let deltas = b.conv2d(&t, "rpn.head.bbox_pred", true, 1, 0, 1)?;
    Ok((logits, deltas))
}

/// The box head on pooled RoI features [R, 256, 7, 7] → [R, representation].
pub fn box_head<B: Backend>(b: &mut B, arch: Architecture, pooled: &B::Tensor) -> Result<B::Tensor, WeightError> {
    if arch == Architecture::ResNet50FpnV2 {
        // FastRCNNConvFCHead: four conv-BN-ReLU, flatten, Linear + ReLU.
        let mut x = pooled.clone();
        for i in 0..4 {
            x = conv_norm_act(b, &x, &format!("roi_heads.box_head.{i}"), 3, 1, 1, Activation::Relu)?;
        }
        let x = b.flatten(&x);
        let x = b.linear(&x, "roi_heads.box_head.5")?;
        Ok(b.relu(x))
    } else {
        // TwoMLPHead.
        let x = b.flatten(pooled);
        let x = b.linear(&x, "roi_heads.box_head.fc6")?;
        let x = b.relu(x);
        let x = b.linear(&x, "roi_heads.box_head.fc7")?;
        Ok(b.relu(x))
    }
}

/// `FastRCNNPredictor`: (class logits [R, C], box deltas [R, 4C]).
pub fn box_predictor<B: Backend>(b: &mut B, x: &B::Tensor) -> Result<(B::Tensor, B::Tensor), WeightError> {
    Ok((b.linear(x, "roi_heads.box_predictor.cls_score")?, b.linear(x, "roi_heads.box_predictor.bbox_pred")?))
}
