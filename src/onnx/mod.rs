//! The ONNX writer: protobuf messages, a typed graph builder, and the FasterRCNN exporter.

pub mod builder;
pub mod export;
pub mod ops;
pub mod proto;

pub use export::export;

use prost::Message;

/// Serializes a model to protobuf bytes.
pub fn encode(model: &proto::ModelProto) -> Vec<u8> {
    model.encode_to_vec()
}
