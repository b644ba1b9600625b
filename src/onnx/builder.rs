//! A small, typed ONNX graph builder.
//!
//! Each operator mkonnx emits has one method here (see [`crate::onnx::ops`]) whose
//! arguments are typed, so a graph is assembled from checked calls rather than strings glued
//! together. The builder names values and nodes, keeps weights as initializers named by their
//! state_dict path, and produces a [`ModelProto`].

use super::proto::*;
use crate::model::WeightTensor;
use bytes::Bytes;
use std::sync::Arc;

/// The opset mkonnx targets. 17 is the oldest opset that has everything the detector needs
/// with torchvision's semantics (RoiAlign's `coordinate_transformation_mode`, from opset 16,
/// expresses `aligned=False`), it is what `torch.onnx.export` uses for torchvision models, and
/// every maintained runtime (ONNX Runtime >= 1.12, TensorRT >= 8.6, OpenVINO) runs it.
pub const OPSET: i64 = 17;
/// The IR version that goes with opset 17.
pub const IR_VERSION: i64 = 8;

/// A named value (tensor) in the graph under construction.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Value(pub(crate) String);

impl Value {
    /// The value's name in the graph.
    pub fn name(&self) -> &str {
        &self.0
    }
}

/// One dimension of a graph input or output: fixed or symbolic.
#[derive(Clone, Debug)]
pub enum Dim {
    /// A fixed size.
    Fixed(i64),
    /// A named dynamic size (`batch_size`, `height`, ...).
    Named(&'static str),
}

/// An attribute value for a node.
#[derive(Clone, Debug)]
pub enum Attr {
    /// A single int64.
    Int(i64),
    /// A single float.
    Float(f32),
    /// A string.
    Str(&'static str),
    /// A list of int64.
    Ints(Vec<i64>),
}

/// Builds one ONNX graph.
#[derive(Default)]
pub struct GraphBuilder {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    next_id: usize,
}

impl GraphBuilder {
    /// An empty graph.
    pub fn new() -> Self {
        Self::default()
    }

    fn fresh(&mut self, hint: &str) -> String {
        self.next_id += 1;
        format!("{hint}_{}", self.next_id)
    }

    /// Declares a graph input.
    pub fn input(&mut self, name: &str, elem: DataType, dims: &[Dim]) -> Value {
        self.inputs.push(value_info(name, elem, dims));
        Value(name.to_string())
    }

    /// Declares `value` as the graph output `name` (through an Identity, so the name is ours).
    pub fn output(&mut self, value: &Value, name: &str, elem: DataType, dims: &[Dim]) {
        self.nodes.push(NodeProto {
            input: vec![value.0.clone()],
            output: vec![name.to_string()],
            name: format!("output_{name}"),
            op_type: "Identity".into(),
            ..Default::default()
        });
        self.outputs.push(value_info(name, elem, dims));
    }

    /// Adds a float32 initializer under `name` (a state_dict path for weights); on
    /// little-endian machines the model shares the tensor's memory instead of copying it.
    pub fn initializer_f32(&mut self, name: &str, tensor: &Arc<WeightTensor>) -> Value {
        let raw = if cfg!(target_endian = "little") {
            Bytes::from_owner(LittleEndianF32(tensor.clone()))
        } else {
            Bytes::from(tensor.data.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())
        };
        self.push_initializer(name.to_string(), DataType::Float, &tensor.shape, raw)
    }

    /// A float32 constant.
    pub fn const_f32(&mut self, dims: &[usize], data: &[f32]) -> Value {
        let name = self.fresh("const");
        let raw: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.push_initializer(name, DataType::Float, dims, raw)
    }

    /// A float64 constant.
    pub fn const_f64(&mut self, dims: &[usize], data: &[f64]) -> Value {
        let name = self.fresh("const");
        let raw: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.push_initializer(name, DataType::Double, dims, raw)
    }

    /// An int64 constant.
    pub fn const_i64(&mut self, dims: &[usize], data: &[i64]) -> Value {
        let name = self.fresh("const");
        let raw: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.push_initializer(name, DataType::Int64, dims, raw)
    }

    /// A 1-D int64 constant (shapes, axes, indices).
    pub fn ints(&mut self, data: &[i64]) -> Value {
        self.const_i64(&[data.len()], data)
    }

    /// A float32 scalar constant.
    pub fn scalar_f32(&mut self, v: f32) -> Value {
        self.const_f32(&[], &[v])
    }

    /// A float64 scalar constant.
    pub fn scalar_f64(&mut self, v: f64) -> Value {
        self.const_f64(&[], &[v])
    }

    /// An int64 scalar constant.
    pub fn scalar_i64(&mut self, v: i64) -> Value {
        self.const_i64(&[], &[v])
    }

    fn push_initializer(&mut self, name: String, elem: DataType, dims: &[usize], raw: impl Into<Bytes>) -> Value {
        self.initializers.push(TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: elem as i32,
            name: name.clone(),
            raw_data: raw.into(),
        });
        Value(name)
    }

    /// Appends a node with `n_out` outputs; the typed helpers in `ops` call this.
    pub(crate) fn node(&mut self, op: &'static str, inputs: &[&Value], attrs: &[(&'static str, Attr)], n_out: usize) -> Vec<Value> {
        let node_name = self.fresh(op);
        let outputs: Vec<String> = (0..n_out).map(|i| format!("{node_name}_out{i}")).collect();
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|v| v.0.clone()).collect(),
            output: outputs.clone(),
            name: node_name,
            op_type: op.into(),
            attribute: attrs.iter().map(|(name, a)| attribute(name, a)).collect(),
            ..Default::default()
        });
        outputs.into_iter().map(Value).collect()
    }

    /// Like [`Self::node`] for the common single-output case.
    pub(crate) fn node1(&mut self, op: &'static str, inputs: &[&Value], attrs: &[(&'static str, Attr)]) -> Value {
        self.node(op, inputs, attrs, 1).remove(0)
    }

    /// An empty (omitted) optional input, as ONNX spells it.
    pub fn none(&self) -> Value {
        Value(String::new())
    }

    /// Number of nodes so far.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Finishes the model.
    pub fn finish(self, graph_name: &str, doc: &str, metadata: Vec<(String, String)>) -> ModelProto {
        ModelProto {
            ir_version: IR_VERSION,
            opset_import: vec![OperatorSetIdProto { domain: String::new(), version: OPSET }],
            producer_name: "mkonnx".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            domain: String::new(),
            model_version: 1,
            doc_string: doc.into(),
            graph: Some(GraphProto {
                node: self.nodes,
                name: graph_name.into(),
                initializer: self.initializers,
                doc_string: String::new(),
                input: self.inputs,
                output: self.outputs,
                value_info: vec![],
            }),
            metadata_props: metadata.into_iter().map(|(key, value)| StringStringEntryProto { key, value }).collect(),
        }
    }
}

/// A weight tensor's values viewed as bytes: ONNX's little-endian `raw_data` layout on a
/// little-endian machine (only used there), kept alive by the model that refers to it.
struct LittleEndianF32(Arc<WeightTensor>);

impl AsRef<[u8]> for LittleEndianF32 {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0.data)
    }
}

fn attribute(name: &str, a: &Attr) -> AttributeProto {
    let mut p = AttributeProto { name: name.into(), ..Default::default() };
    match a {
        Attr::Int(i) => {
            p.r#type = AttributeType::Int as i32;
            p.i = *i;
        }
        Attr::Float(f) => {
            p.r#type = AttributeType::Float as i32;
            p.f = *f;
        }
        Attr::Str(s) => {
            p.r#type = AttributeType::String as i32;
            p.s = s.as_bytes().to_vec();
        }
        Attr::Ints(v) => {
            p.r#type = AttributeType::Ints as i32;
            p.ints = v.clone();
        }
    }
    p
}

fn value_info(name: &str, elem: DataType, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Dim::Fixed(v) => DimensionValue::DimValue(*v),
                Dim::Named(n) => DimensionValue::DimParam((*n).to_string()),
            }),
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto { tensor_type: Some(TensorTypeProto { elem_type: elem as i32, shape: Some(TensorShapeProto { dim }) }) }),
        doc_string: String::new(),
    }
}
