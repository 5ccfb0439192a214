//! petcam on the workstation: transfer learning on a frozen ImageNet backbone, export of backbone
//! and head as one ONNX model, and evaluation of exported models with tract.

pub mod augment;
pub mod backbone;
pub mod cli;
pub mod dataset;
pub mod export;
pub mod features;
pub mod finetune;
pub mod head;
pub mod model;
pub mod pipeline;
pub mod report;
pub mod rng;
pub mod test_support;
pub mod train;
