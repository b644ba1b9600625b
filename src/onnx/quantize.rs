//! INT8 quantization of an exported model: a pass over the float32 [`ModelProto`] that
//! [`super::export`] writes, producing a QDQ model (QuantizeLinear/DequantizeLinear pairs
//! that ONNX Runtime's graph optimizer fuses into integer kernels such as QLinearConv).
//!
//! What is quantized: the Conv and Gemm nodes whose weights live under
//! [`QUANTIZED_LAYER_PREFIXES`] (backbone body and FPN, RPN head, box head: found by the
//! state_dict paths that `src/model/network.rs` gives the weight initializers, not by node
//! position), except the RPN head's output convolutions ([`FLOAT_LAYERS`], see there why).
//! Everything else — anchors, box decoding, NMS, RoIAlign, the box predictor and the
//! post-processing — stays float32.
//!
//! Conventions, as ONNX Runtime's own tools (`onnxruntime.quantization`) and its x86 kernels
//! expect them (U8S8: their integer GEMMs take unsigned activations and signed weights):
//! - weights: int8, symmetric (zero point 0, range -127..127, scale = max|w| / 127), one
//!   scale per output channel (axis 0 of a Conv's OIHW weight and of a `transB` Gemm's [N, K]);
//! - biases: int32 with scale = input scale × weight scale of the channel, zero point 0;
//! - activations: uint8, asymmetric, one scale and zero point per tensor, from a calibrated
//!   range widened to include 0 (scale = (max - min) / 255, zero point = round(-min / scale));
//! - rounding half to even and saturation, as QuantizeLinear does.
//!
//! The activations quantized are each layer's input and output; an output whose only
//! consumer is a Relu is quantized after the Relu (its range starts at 0, so the zero point is
//! 0 and ONNX Runtime drops the Relu into the saturation of the fused kernel). (Cutting the
//! range of tensors read only by HardSwish/HardSigmoid to where those are not saturated,
//! [-3, ...] and [-3, 3], was tried and measured worse on the MobileNetV3-Large-FPN fixture:
//! INT8 AP 0.041 below float32 instead of 0.011.) BatchNorm
//! layers that follow a quantized Conv are folded into its weights and bias first
//! ([`prepare`]), since ONNX Runtime cannot fold them once the weights are quantized.

use super::proto::{AttributeProto, AttributeType, DataType, GraphProto, ModelProto, NodeProto, TensorProto};
use super::proto::{TensorTypeProto, TypeProto, ValueInfoProto};
use crate::model::network::{FLOAT_LAYERS, QUANTIZED_LAYER_PREFIXES};
use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};

/// The calibrated range of one activation tensor.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Range {
    /// Lowest value kept.
    pub min: f32,
    /// Highest value kept.
    pub max: f32,
}

/// What [`quantize`] did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuantizeSummary {
    /// Conv/Gemm layers quantized (a layer run on several inputs, as the RPN head on each
    /// FPN level, counts once per run).
    pub layers: usize,
    /// Activation tensors given a QuantizeLinear/DequantizeLinear pair.
    pub activations: usize,
    /// BatchNorm layers folded into the convolution before them.
    pub folded_batch_norms: usize,
}

/// The layers to quantize in a [`prepare`]d model and the activation tensors around them.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// Indices of the Conv/Gemm nodes.
    pub layers: Vec<usize>,
    /// Names of the activation tensors to calibrate and quantize, in graph order.
    pub activations: Vec<String>,
}

fn graph(model: &ModelProto) -> anyhow::Result<&GraphProto> {
    model.graph.as_ref().context("the model has no graph")
}

fn graph_mut(model: &mut ModelProto) -> anyhow::Result<&mut GraphProto> {
    model.graph.as_mut().context("the model has no graph")
}

/// A float32 initializer's values.
fn floats(t: &TensorProto) -> anyhow::Result<Vec<f32>> {
    if t.data_type != DataType::Float as i32 || t.raw_data.len() != 4 * element_count(t) {
        bail!("initializer {} is not a float32 tensor stored as raw data", t.name);
    }
    Ok(t.raw_data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}

fn element_count(t: &TensorProto) -> usize {
    t.dims.iter().map(|&d| d.max(0) as usize).product()
}

fn tensor(name: String, data_type: DataType, dims: &[i64], raw: Vec<u8>) -> TensorProto {
    TensorProto { dims: dims.to_vec(), data_type: data_type as i32, name, raw_data: raw.into() }
}

fn float_tensor(name: String, dims: &[i64], values: &[f32]) -> TensorProto {
    tensor(name, DataType::Float, dims, values.iter().flat_map(|v| v.to_le_bytes()).collect())
}

fn int_attribute(t: &NodeProto, name: &str) -> Option<i64> {
    t.attribute.iter().find(|a| a.name == name).map(|a| a.i)
}

fn float_attribute(t: &NodeProto, name: &str) -> Option<f32> {
    t.attribute.iter().find(|a| a.name == name).map(|a| a.f)
}

/// Whether `weight` (an initializer name, a state_dict path) belongs to a quantized layer.
fn in_quantized_layers(weight: &str) -> bool {
    QUANTIZED_LAYER_PREFIXES.iter().any(|p| weight.starts_with(p)) && !FLOAT_LAYERS.iter().any(|p| weight.starts_with(&format!("{p}.")))
}

/// Node indices reading each tensor.
fn consumers(g: &GraphProto) -> HashMap<&str, Vec<usize>> {
    let mut map: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, n) in g.node.iter().enumerate() {
        for input in n.input.iter().filter(|s| !s.is_empty()) {
            map.entry(input.as_str()).or_default().push(i);
        }
    }
    map
}

/// Drops initializers no node reads any more.
fn drop_unused_initializers(g: &mut GraphProto) {
    let used: HashSet<String> = g.node.iter().flat_map(|n| n.input.iter().cloned()).collect();
    g.initializer.retain(|t| used.contains(&t.name));
}

/// A copy of `model` ready for quantization: every BatchNormalization that directly follows
/// a Conv of the quantized layers is folded into that Conv's weight and bias (computed in
/// float64, stored as float32), and the BatchNormalization removed. Returns the model and
/// the number of folds.
pub fn prepare(model: &ModelProto) -> anyhow::Result<(ModelProto, usize)> {
    let mut model = model.clone();
    let g = graph_mut(&mut model)?;
    let init: HashMap<String, usize> = g.initializer.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
    let uses = consumers(g);
    let graph_outputs: HashSet<&str> = g.output.iter().map(|o| o.name.as_str()).collect();
    let mut folds = Vec::new(); // (conv index, bn index)
    for (i, conv) in g.node.iter().enumerate() {
        let Some(weight) = conv.input.get(1) else { continue };
        if conv.op_type != "Conv"
            || !in_quantized_layers(weight)
            || !init.contains_key(weight)
            || graph_outputs.contains(conv.output[0].as_str())
        {
            continue;
        }
        let Some([bn]) = uses.get(conv.output[0].as_str()).map(Vec::as_slice) else { continue };
        let norm = &g.node[*bn];
        if norm.op_type == "BatchNormalization" && norm.input.len() == 5 && norm.input[1..].iter().all(|p| init.contains_key(p)) {
            folds.push((i, *bn));
        }
    }
    let mut new_initializers = Vec::new();
    for &(c, b) in &folds {
        let (conv, norm) = (&g.node[c], &g.node[b]);
        let get = |name: &str| floats(&g.initializer[init[name]]);
        let w_tensor = &g.initializer[init[&conv.input[1]]];
        let w = floats(w_tensor)?;
        let dims = w_tensor.dims.clone();
        let (gamma, beta, mean, var) = (get(&norm.input[1])?, get(&norm.input[2])?, get(&norm.input[3])?, get(&norm.input[4])?);
        let out = gamma.len();
        if dims.first() != Some(&(out as i64)) || [&beta, &mean, &var].iter().any(|v| v.len() != out) || w.len() % out != 0 {
            bail!("BatchNormalization {} does not match the channels of the Conv before it", norm.name);
        }
        let bias = match conv.input.get(2).filter(|s| !s.is_empty()) {
            Some(name) => get(name)?,
            None => vec![0.0; out],
        };
        let eps = f64::from(float_attribute(norm, "epsilon").unwrap_or(1e-5));
        let per_channel = w.len() / out;
        let mut folded_w = Vec::with_capacity(w.len());
        let mut folded_b = Vec::with_capacity(out);
        for ch in 0..out {
            let k = f64::from(gamma[ch]) / (f64::from(var[ch]) + eps).sqrt();
            folded_w.extend(w[ch * per_channel..(ch + 1) * per_channel].iter().map(|&v| (f64::from(v) * k) as f32));
            folded_b.push(((f64::from(bias[ch]) - f64::from(mean[ch])) * k + f64::from(beta[ch])) as f32);
        }
        let w_name = format!("{}.bn_folded", conv.input[1]);
        let b_name = format!("{}.bias.bn_folded", conv.input[1].trim_end_matches(".weight"));
        new_initializers.push(float_tensor(w_name.clone(), &dims, &folded_w));
        new_initializers.push(float_tensor(b_name.clone(), &[out as i64], &folded_b));
        let bn_output = norm.output[0].clone();
        let conv = &mut g.node[c];
        conv.input.truncate(1);
        conv.input.extend([w_name, b_name]);
        conv.output[0] = bn_output;
    }
    let removed: HashSet<usize> = folds.iter().map(|&(_, b)| b).collect();
    let mut index = 0;
    g.node.retain(|_| {
        index += 1;
        !removed.contains(&(index - 1))
    });
    g.initializer.extend(new_initializers);
    drop_unused_initializers(g);
    Ok((model, folds.len()))
}

/// The layers of a [`prepare`]d model to quantize, and their activations.
pub fn plan(model: &ModelProto) -> anyhow::Result<Plan> {
    let g = graph(model)?;
    let init: HashSet<&str> = g.initializer.iter().map(|t| t.name.as_str()).collect();
    let uses = consumers(g);
    let mut layers = Vec::new();
    let mut activations = Vec::new();
    let mut seen = HashSet::new();
    for (i, n) in g.node.iter().enumerate() {
        let Some(weight) = n.input.get(1) else { continue };
        let quantizable = match n.op_type.as_str() {
            "Conv" => true,
            // The exporter's Linear: Y = X·Wᵀ + B (weights [N, K], per-channel axis 0).
            "Gemm" => {
                int_attribute(n, "transB") == Some(1)
                    && int_attribute(n, "transA").unwrap_or(0) == 0
                    && float_attribute(n, "alpha").unwrap_or(1.0) == 1.0
                    && float_attribute(n, "beta").unwrap_or(1.0) == 1.0
            }
            _ => false,
        };
        if !quantizable || !in_quantized_layers(weight) || !init.contains(weight.as_str()) {
            continue;
        }
        layers.push(i);
        let output = match uses.get(n.output[0].as_str()).map(Vec::as_slice) {
            Some([only]) if g.node[*only].op_type == "Relu" => g.node[*only].output[0].clone(),
            _ => n.output[0].clone(),
        };
        for t in [n.input[0].clone(), output] {
            if seen.insert(t.clone()) {
                activations.push(t);
            }
        }
    }
    Ok(Plan { layers, activations })
}

/// `model` with `tensors` added as float32 graph outputs (shape left open), so that a
/// runtime returns them: how calibration sees the activations.
pub fn with_outputs(model: &ModelProto, tensors: &[String]) -> anyhow::Result<ModelProto> {
    let mut model = model.clone();
    let g = graph_mut(&mut model)?;
    let existing: HashSet<String> = g.output.iter().map(|o| o.name.clone()).collect();
    for t in tensors.iter().filter(|t| !existing.contains(*t)) {
        g.output.push(ValueInfoProto {
            name: t.clone(),
            r#type: Some(TypeProto { tensor_type: Some(TensorTypeProto { elem_type: DataType::Float as i32, shape: None }) }),
            doc_string: String::new(),
        });
    }
    Ok(model)
}

/// A uint8 activation's scale and zero point for `range` (see the module doc).
pub fn activation_params(range: Range) -> (f32, u8) {
    let (min, max) = (f64::from(range.min.min(0.0)), f64::from(range.max.max(0.0)));
    let scale = ((max - min) / 255.0) as f32;
    // A range of (almost) nothing: any scale represents it; 1 avoids dividing by zero.
    if !scale.is_finite() || scale < f32::MIN_POSITIVE {
        return (1.0, 0);
    }
    let zero_point = (-min / f64::from(scale)).round_ties_even().clamp(0.0, 255.0);
    (scale, zero_point as u8)
}

/// Per-output-channel symmetric int8 weights of `w` with `channels` rows: (values, scales).
pub fn quantize_weights(w: &[f32], channels: usize) -> (Vec<i8>, Vec<f32>) {
    let per_channel = w.len() / channels.max(1);
    let mut q = Vec::with_capacity(w.len());
    let mut scales = Vec::with_capacity(channels);
    for row in w.chunks(per_channel.max(1)).take(channels) {
        let absmax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = if absmax / 127.0 >= f32::MIN_POSITIVE { absmax / 127.0 } else { 1.0 };
        q.extend(row.iter().map(|&v| (v / scale).round_ties_even().clamp(-127.0, 127.0) as i8));
        scales.push(scale);
    }
    (q, scales)
}

fn node(op: &str, name: String, inputs: Vec<String>, output: String, axis: Option<i64>) -> NodeProto {
    NodeProto {
        input: inputs,
        output: vec![output],
        name,
        op_type: op.into(),
        attribute: axis
            .map(|a| AttributeProto { name: "axis".into(), r#type: AttributeType::Int as i32, i: a, ..Default::default() })
            .into_iter()
            .collect(),
        ..Default::default()
    }
}

/// The QDQ model of a [`prepare`]d model, with `ranges` for every activation of its
/// [`plan`] (see the module doc for what is quantized and how).
pub fn quantize(
    prepared: &ModelProto,
    folded_batch_norms: usize,
    ranges: &BTreeMap<String, Range>,
) -> anyhow::Result<(ModelProto, QuantizeSummary)> {
    let plan = plan(prepared)?;
    let mut model = prepared.clone();
    let g = graph_mut(&mut model)?;
    let init: HashMap<String, usize> = g.initializer.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();

    // Activation tensors: one Q/DQ pair each, right after the node that produces them; every
    // reader then reads the dequantized tensor.
    let mut act: HashMap<String, (f32, u8)> = HashMap::new();
    for t in &plan.activations {
        let range = ranges.get(t).with_context(|| format!("no calibrated range for activation {t}"))?;
        act.insert(t.clone(), activation_params(*range));
    }
    let dequantized = |t: &str| format!("{t}_dequantized");
    let mut initializers = Vec::new();
    let mut qdq_after: HashMap<String, Vec<NodeProto>> = HashMap::new();
    for t in &plan.activations {
        let (scale, zero_point) = act[t];
        initializers.push(float_tensor(format!("{t}_scale"), &[], &[scale]));
        initializers.push(tensor(format!("{t}_zero_point"), DataType::Uint8, &[], vec![zero_point]));
        let io = |name: &str| vec![name.to_string(), format!("{t}_scale"), format!("{t}_zero_point")];
        qdq_after.insert(
            t.clone(),
            vec![
                node("QuantizeLinear", format!("{t}_QuantizeLinear"), io(t), format!("{t}_quantized"), None),
                node("DequantizeLinear", format!("{t}_DequantizeLinear"), io(&format!("{t}_quantized")), dequantized(t), None),
            ],
        );
    }
    let graph_inputs: Vec<String> = g.input.iter().map(|i| i.name.clone()).collect();

    // Layers: int8 weights and int32 bias behind DequantizeLinear nodes (axis 0).
    let mut before: HashMap<usize, Vec<NodeProto>> = HashMap::new();
    let mut weights_done = HashSet::new();
    for &i in &plan.layers {
        let n = &g.node[i];
        let (x, w_name) = (n.input[0].clone(), n.input[1].clone());
        let w_tensor = &g.initializer[init[&w_name]];
        let channels = *w_tensor.dims.first().context("a weight without dimensions")? as usize;
        let w = floats(w_tensor)?;
        let (q, scales) = quantize_weights(&w, channels);
        let mut prelude = Vec::new();
        if weights_done.insert(w_name.clone()) {
            initializers.push(tensor(format!("{w_name}_quantized"), DataType::Int8, &w_tensor.dims, q.iter().map(|&v| v as u8).collect()));
            initializers.push(float_tensor(format!("{w_name}_scale"), &[channels as i64], &scales));
            initializers.push(tensor(format!("{w_name}_zero_point"), DataType::Int8, &[channels as i64], vec![0; channels]));
            prelude.push(node(
                "DequantizeLinear",
                format!("{w_name}_DequantizeLinear"),
                vec![format!("{w_name}_quantized"), format!("{w_name}_scale"), format!("{w_name}_zero_point")],
                dequantized(&w_name),
                Some(0),
            ));
        }
        let mut inputs = vec![dequantized(&x), dequantized(&w_name)];
        if let Some(b_name) = n.input.get(2).filter(|s| !s.is_empty()) {
            let b = floats(&g.initializer[init[b_name]])?;
            if b.len() != channels {
                bail!("bias {b_name} has {} values for {channels} channels", b.len());
            }
            let input_scale = act[&x].0;
            let bias_scales: Vec<f32> = scales.iter().map(|s| input_scale * s).collect();
            let qb: Vec<u8> = b
                .iter()
                .zip(&bias_scales)
                .flat_map(|(v, s)| {
                    ((f64::from(*v) / f64::from(*s)).round_ties_even().clamp(i32::MIN as f64, i32::MAX as f64) as i32).to_le_bytes()
                })
                .collect();
            let prefix = format!("{}_bias", n.name);
            initializers.push(tensor(format!("{prefix}_quantized"), DataType::Int32, &[channels as i64], qb));
            initializers.push(float_tensor(format!("{prefix}_scale"), &[channels as i64], &bias_scales));
            initializers.push(tensor(format!("{prefix}_zero_point"), DataType::Int32, &[channels as i64], vec![0; 4 * channels]));
            prelude.push(node(
                "DequantizeLinear",
                format!("{prefix}_DequantizeLinear"),
                vec![format!("{prefix}_quantized"), format!("{prefix}_scale"), format!("{prefix}_zero_point")],
                dequantized(&prefix),
                Some(0),
            ));
            inputs.push(dequantized(&prefix));
        }
        before.insert(i, prelude);
        g.node[i].input = inputs;
    }

    // Every other reader of a quantized activation reads it dequantized.
    let layer_set: HashSet<usize> = plan.layers.iter().copied().collect();
    for (i, n) in g.node.iter_mut().enumerate() {
        if layer_set.contains(&i) {
            continue;
        }
        for input in n.input.iter_mut() {
            if act.contains_key(input.as_str()) {
                *input = dequantized(input);
            }
        }
    }
    let mut nodes = Vec::with_capacity(g.node.len() + 4 * plan.activations.len());
    for t in &graph_inputs {
        nodes.extend(qdq_after.remove(t).unwrap_or_default());
    }
    for (i, n) in std::mem::take(&mut g.node).into_iter().enumerate() {
        nodes.extend(before.remove(&i).unwrap_or_default());
        let outputs = n.output.clone();
        nodes.push(n);
        for o in &outputs {
            nodes.extend(qdq_after.remove(o).unwrap_or_default());
        }
    }
    if let Some(missing) = qdq_after.keys().next() {
        bail!("activation {missing} is produced by no node of the model");
    }
    g.node = nodes;
    g.initializer.extend(initializers);
    drop_unused_initializers(g);
    let summary = QuantizeSummary { layers: plan.layers.len(), activations: plan.activations.len(), folded_batch_norms };
    model.doc_string = format!(
        "{}\nINT8 (QDQ) by mkonnx: {} Conv/Gemm layers of the backbone, FPN, RPN head and box head with per-channel int8 \
         weights, {} uint8 activations; the rest float32.",
        model.doc_string, summary.layers, summary.activations
    );
    Ok((model, summary))
}

/// How activation ranges are calibrated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CalibrationMethod {
    /// The lowest and highest value seen over all calibration images.
    Minmax,
    /// [`PERCENTILE`] of the absolute values seen (a histogram of |x|, as ONNX Runtime's
    /// percentile calibrator), clamped to the values seen: outliers are clipped.
    Percentile,
}

/// The percentile of [`CalibrationMethod::Percentile`] (ONNX Runtime's default).
pub const PERCENTILE: f64 = 99.999;

/// Bins of the percentile histogram (ONNX Runtime's percentile calibrator uses 2048).
const HISTOGRAM_BINS: usize = 2048;

/// Collects one activation tensor's statistics over the calibration images.
#[derive(Clone, Debug)]
pub struct RangeCollector {
    method: CalibrationMethod,
    min: f32,
    max: f32,
    /// Counts of |x| in bins of `bin_width` from 0 (percentile only).
    histogram: Vec<u64>,
    bin_width: f32,
}

impl RangeCollector {
    /// An empty collector.
    pub fn new(method: CalibrationMethod) -> Self {
        RangeCollector { method, min: f32::INFINITY, max: f32::NEG_INFINITY, histogram: Vec::new(), bin_width: 0.0 }
    }

    /// Adds one image's values of the tensor (NaNs are ignored).
    pub fn add(&mut self, values: &[f32]) {
        let finite = values.iter().copied().filter(|v| v.is_finite());
        let (mut lo, mut hi, mut absmax) = (f32::INFINITY, f32::NEG_INFINITY, 0f32);
        for v in finite.clone() {
            (lo, hi, absmax) = (lo.min(v), hi.max(v), absmax.max(v.abs()));
        }
        (self.min, self.max) = (self.min.min(lo), self.max.max(hi));
        if self.method != CalibrationMethod::Percentile {
            return;
        }
        if self.histogram.is_empty() {
            self.histogram = vec![0; HISTOGRAM_BINS];
            self.bin_width = (absmax / HISTOGRAM_BINS as f32).max(f32::MIN_POSITIVE);
        }
        // A wider range than seen so far: merge neighbouring bins (doubling their width) until
        // it fits, so that the histogram keeps its size and earlier counts stay in place.
        while absmax >= self.bin_width * HISTOGRAM_BINS as f32 {
            let merged: Vec<u64> = self.histogram.chunks(2).map(|p| p.iter().sum()).collect();
            self.histogram.fill(0);
            self.histogram[..merged.len()].copy_from_slice(&merged);
            self.bin_width *= 2.0;
        }
        for v in finite {
            let bin = ((v.abs() / self.bin_width) as usize).min(HISTOGRAM_BINS - 1);
            self.histogram[bin] += 1;
        }
    }

    /// The calibrated range; `None` when no value was seen.
    pub fn range(&self) -> Option<Range> {
        if self.min > self.max {
            return None;
        }
        match self.method {
            CalibrationMethod::Minmax => Some(Range { min: self.min, max: self.max }),
            CalibrationMethod::Percentile => {
                let total: u64 = self.histogram.iter().sum();
                let wanted = (PERCENTILE / 100.0 * total as f64).ceil() as u64;
                let mut seen = 0;
                let mut threshold = self.bin_width * HISTOGRAM_BINS as f32;
                for (i, count) in self.histogram.iter().enumerate() {
                    seen += count;
                    if seen >= wanted {
                        threshold = self.bin_width * (i + 1) as f32;
                        break;
                    }
                }
                Some(Range { min: self.min.max(-threshold), max: self.max.min(threshold) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activation_scale_and_zero_point() {
        // A Relu output: zero point 0.
        assert_eq!(activation_params(Range { min: 0.0, max: 2.55 }), (0.01, 0));
        // The range is widened to include 0, and the zero point rounds half to even.
        let (scale, zp) = activation_params(Range { min: -1.0, max: 1.55 });
        assert!((scale - 0.01).abs() < 1e-7 && zp == 100, "{scale} {zp}");
        let (_, zp) = activation_params(Range { min: 1.0, max: 2.0 });
        assert_eq!(zp, 0);
        // An all-zero tensor gets scale 1 rather than a division by zero.
        assert_eq!(activation_params(Range { min: 0.0, max: 0.0 }), (1.0, 0));
    }

    #[test]
    fn weights_are_symmetric_per_channel() {
        let w = [1.27, -0.635, 0.0, 0.0, 0.5, -0.25];
        let (q, scales) = quantize_weights(&w, 3);
        assert_eq!(q, [127, -64, 0, 0, 127, -64]); // -63.5 rounds to even
        assert!((scales[0] - 0.01).abs() < 1e-8 && scales[1] == 1.0, "{scales:?}");
    }

    #[test]
    fn percentile_clips_outliers_and_minmax_does_not() {
        let mut values: Vec<f32> = (0..100_000).map(|i| (i % 1000) as f32 / 1000.0 - 0.5).collect();
        values.push(50.0);
        let mut minmax = RangeCollector::new(CalibrationMethod::Minmax);
        let mut percentile = RangeCollector::new(CalibrationMethod::Percentile);
        // In two halves, the outlier in the second: the histogram widens as it goes.
        for part in values.chunks(60_000) {
            minmax.add(part);
            percentile.add(part);
        }
        assert_eq!(minmax.range(), Some(Range { min: -0.5, max: 50.0 }));
        let r = percentile.range().unwrap();
        assert_eq!(r.min, -0.5);
        assert!(r.max > 0.49 && r.max < 0.6, "{r:?}");
        assert_eq!(RangeCollector::new(CalibrationMethod::Minmax).range(), None);
    }
}
