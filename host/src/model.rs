//! An exported petcam model, loaded with tract: its metadata and its predictions.
//!
//! Everything about the input (size, layout) and output (labels) comes from the model's own
//! metadata, exactly as the device reads it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use image::RgbImage;
use petcam_shared::metadata::{self, InputSpec};
use tract_onnx::prelude::*;

use crate::dataset;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read model {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a loadable ONNX model ({reason}); re-export it with `petcam train-and-export`")]
    Load { path: PathBuf, reason: String },
    #[error("{path} is not a petcam model: metadata {key} is {problem}")]
    Metadata {
        path: PathBuf,
        key: &'static str,
        problem: String,
    },
    #[error("inference failed: {0}")]
    Run(String),
}

type Plan = TypedSimplePlan;

/// A model ready to run, with what it says about itself.
#[derive(Clone)]
pub struct ExportedModel {
    pub path: PathBuf,
    pub bytes: u64,
    pub labels: Vec<String>,
    pub input: InputSpec,
    /// Every `metadata_props` entry.
    pub metadata: BTreeMap<String, String>,
    pub graph: GraphSummary,
    plan: Arc<Plan>,
}

/// What the graph is made of, read from the file (before any runtime optimisation).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct GraphSummary {
    /// Node count per operator type.
    pub ops: BTreeMap<String, usize>,
    /// Convolutions and matrix products whose weights are stored as int8.
    pub int8_weight_layers: usize,
    /// Convolutions and matrix products whose weights are stored as float.
    pub float_weight_layers: usize,
}

impl GraphSummary {
    fn of(graph: &tract_onnx::pb::GraphProto) -> Self {
        let dequantized: std::collections::HashSet<&str> = graph
            .node
            .iter()
            .filter(|n| n.op_type == "DequantizeLinear")
            .flat_map(|n| n.output.iter().map(String::as_str))
            .collect();
        let mut s = Self::default();
        for n in &graph.node {
            *s.ops.entry(n.op_type.clone()).or_default() += 1;
            if matches!(n.op_type.as_str(), "Conv" | "Gemm" | "MatMul") {
                match n.input.get(1) {
                    Some(w) if dequantized.contains(w.as_str()) => s.int8_weight_layers += 1,
                    _ => s.float_weight_layers += 1,
                }
            }
        }
        s
    }
}

impl std::fmt::Debug for ExportedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportedModel")
            .field("path", &self.path)
            .field("labels", &self.labels)
            .field("input", &self.input)
            .finish_non_exhaustive()
    }
}

impl ExportedModel {
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let data = std::fs::read(path).map_err(|source| ModelError::Io {
            path: path.to_owned(),
            source,
        })?;
        let load_err = |e: anyhow::Error| ModelError::Load {
            path: path.to_owned(),
            reason: format!("{e:#}"),
        };
        let proto = tract_onnx::onnx()
            .proto_model_for_read(&mut data.as_slice())
            .map_err(load_err)?;
        let metadata: BTreeMap<String, String> = proto
            .metadata_props
            .iter()
            .map(|e| (e.key.clone(), e.value.clone()))
            .collect();
        let meta_err = |key, problem: String| ModelError::Metadata {
            path: path.to_owned(),
            key,
            problem,
        };
        let json = |key: &'static str| -> Result<&str, ModelError> {
            metadata
                .get(key)
                .map(String::as_str)
                .ok_or_else(|| meta_err(key, "missing".into()))
        };
        let labels: Vec<String> = serde_json::from_str(json(metadata::LABELS)?)
            .map_err(|e| meta_err(metadata::LABELS, format!("not a JSON list of names ({e})")))?;
        let input: InputSpec = serde_json::from_str(json(metadata::INPUT)?)
            .map_err(|e| meta_err(metadata::INPUT, format!("malformed ({e})")))?;
        let graph = proto
            .graph
            .as_ref()
            .map(GraphSummary::of)
            .unwrap_or_default();
        let plan = tract_onnx::onnx()
            .model_for_proto_model(&proto)
            .and_then(|m| m.into_optimized())
            .and_then(|m| m.into_runnable())
            .map_err(load_err)?;
        Ok(Self {
            path: path.to_owned(),
            bytes: data.len() as u64,
            labels,
            input,
            metadata,
            graph,
            plan,
        })
    }

    /// Class probabilities for an RGB image already resized to the model's input.
    pub fn predict(&self, rgb: &RgbImage) -> Result<Vec<f32>, ModelError> {
        let (w, h) = (self.input.width, self.input.height);
        if rgb.dimensions() != (w, h) {
            return Err(ModelError::Run(format!(
                "image is {}x{}, the model takes {w}x{h}",
                rgb.width(),
                rgb.height()
            )));
        }
        let input = tract_ndarray::Array4::from_shape_vec(
            (1, h as usize, w as usize, 3),
            rgb.as_raw().clone(),
        )
        .map_err(|e| ModelError::Run(e.to_string()))?;
        let out = self
            .plan
            .run(tvec!(Tensor::from(input).into_tvalue()))
            .map_err(|e| ModelError::Run(format!("{e:#}")))?;
        let probs = out[0]
            .to_plain_array_view::<f32>()
            .map_err(|e| ModelError::Run(format!("{e:#}")))?;
        Ok(probs.iter().copied().collect())
    }

    /// Decodes a photo, resizes it with the shared routine and predicts.
    pub fn predict_file(&self, path: &Path) -> Result<Vec<f32>, PredictFileError> {
        let img = dataset::load_input(path, self.input.width, self.input.height)?;
        Ok(self.predict(&img)?)
    }
}

/// The result of running the model's stored golden input through it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SelfTest {
    pub passed: bool,
    pub max_abs_diff: f32,
    pub tolerance: f32,
    pub expected: Vec<f32>,
    pub got: Vec<f32>,
}

impl ExportedModel {
    /// Runs the golden input stored in `petcam.golden` and compares with the stored output.
    pub fn self_test(&self) -> Result<SelfTest, ModelError> {
        use base64::Engine;
        let meta_err = |problem: String| ModelError::Metadata {
            path: self.path.clone(),
            key: metadata::GOLDEN,
            problem,
        };
        let golden: metadata::Golden = self
            .metadata
            .get(metadata::GOLDEN)
            .ok_or_else(|| meta_err("missing".into()))
            .and_then(|j| {
                serde_json::from_str(j).map_err(|e| meta_err(format!("malformed ({e})")))
            })?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(&golden.input_png_base64)
            .map_err(|e| meta_err(format!("input is not base64 ({e})")))?;
        let img = image::load_from_memory(&png)
            .map_err(|e| meta_err(format!("input is not a PNG ({e})")))?
            .into_rgb8();
        let got = self.predict(&img)?;
        let max_abs_diff = if got.len() == golden.probabilities.len() {
            got.iter()
                .zip(&golden.probabilities)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max)
        } else {
            f32::INFINITY
        };
        Ok(SelfTest {
            passed: max_abs_diff <= golden.tolerance,
            max_abs_diff,
            tolerance: golden.tolerance,
            expected: golden.probabilities,
            got,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PredictFileError {
    #[error(transparent)]
    Photo(#[from] dataset::PhotoError),
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// Index and value of the largest probability.
pub fn top1(probs: &[f32]) -> (usize, f32) {
    probs
        .iter()
        .copied()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or((0, 0.0))
}
