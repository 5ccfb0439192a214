//! From trained head to a model file: ONNX graph, weight quantization, and verification with
//! tract.

pub mod calibrate;
pub mod onnx;
pub mod quantize;
pub mod verify;
