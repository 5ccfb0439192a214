//! From trained head to a model file: ONNX graph, metadata, and verification with tract.

pub mod onnx;
pub mod verify;
