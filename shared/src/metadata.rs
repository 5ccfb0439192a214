//! What an exported model says about itself, in ONNX `metadata_props`.
//!
//! The model file is the contract between host and device: everything the device needs (labels,
//! input size and layout, how to resize) is read from these keys, so no device flag repeats it.

use alloc::string::String;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

/// JSON array of class names, in the order of the model's output.
pub const LABELS: &str = "petcam.labels";
/// JSON [`InputSpec`].
pub const INPUT: &str = "petcam.input";
/// JSON [`BackboneSpec`].
pub const BACKBONE: &str = "petcam.backbone";
/// JSON [`QuantizationSpec`].
pub const QUANTIZATION: &str = "petcam.quantization";
/// JSON object of training and verification metrics (accuracies, counts).
pub const METRICS: &str = "petcam.metrics";
/// `sha256:<hex>` of the photos trained and validated on.
pub const DATASET_DIGEST: &str = "petcam.dataset_digest";
/// The petcam version that wrote the model.
pub const VERSION: &str = "petcam.version";
/// RFC 3339 UTC time of export.
pub const CREATED: &str = "petcam.created";
/// JSON [`Golden`]: one input and the output the exporter computed for it, for self-tests.
pub const GOLDEN: &str = "petcam.golden";

/// Name of the resize routine in [`crate::preprocess`], recorded so a reader knows how the
/// trainer turned photos into input.
pub const RESIZE_BILINEAR_AA: &str = "bilinear-antialias";

/// The model's input: RGB bytes of a fixed size. Normalisation happens inside the graph; it is
/// recorded here for people and tools that inspect the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputSpec {
    pub name: String,
    pub width: u32,
    pub height: u32,
    pub channels: u32,
    /// Always `NHWC` (batch, height, width, channel) with batch 1.
    pub layout: String,
    /// Always `uint8`.
    pub dtype: String,
    /// Channel order, `RGB`.
    pub color: String,
    /// How a frame of any size becomes `width` x `height`: [`RESIZE_BILINEAR_AA`], no crop.
    pub resize: String,
    /// `x = (pixel - mean) / std`, applied inside the graph.
    pub mean: f32,
    pub std: f32,
    /// The graph averages the probabilities of the frame and of its mirror image (twice the
    /// work of one inference). Absent (false) otherwise.
    #[serde(default, skip_serializing_if = "is_false")]
    pub mirror_average: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackboneSpec {
    pub name: String,
    pub input_size: u32,
    pub feature_dim: u32,
    pub weights_sha256: String,
    /// Top blocks (with the head convolution) fine-tuned on the photos: their weights are no
    /// longer the checkpoint's. Absent (0) when the whole backbone stayed frozen.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub fine_tuned_blocks: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantizationSpec {
    /// `none`, `int8-weights` or `int8`.
    pub form: String,
    /// How `int8` activation ranges were chosen; absent for the other forms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<CalibrationSpec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationSpec {
    /// `min-max` or `percentile`.
    pub method: String,
    /// Training photos the float model ran over.
    pub images: u32,
}

/// A self-test vector: the input (PNG, base64) and the probabilities the exporter computed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Golden {
    pub input_png_base64: String,
    pub probabilities: Vec<f32>,
    /// Largest acceptable absolute difference per probability.
    pub tolerance: f32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantization_spec_reads_models_without_calibration() {
        let old: QuantizationSpec = serde_json::from_str(r#"{"form":"int8-weights"}"#).unwrap();
        assert_eq!(old.form, "int8-weights");
        assert_eq!(old.calibration, None);
        assert_eq!(
            serde_json::to_string(&old).unwrap(),
            r#"{"form":"int8-weights"}"#
        );
        let int8 = QuantizationSpec {
            form: "int8".into(),
            calibration: Some(CalibrationSpec {
                method: "percentile".into(),
                images: 200,
            }),
        };
        let json = serde_json::to_string(&int8).unwrap();
        assert_eq!(
            json,
            r#"{"form":"int8","calibration":{"method":"percentile","images":200}}"#
        );
        assert_eq!(
            serde_json::from_str::<QuantizationSpec>(&json).unwrap(),
            int8
        );
    }
}
