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
    pub layout: Layout,
    pub dtype: DType,
    pub color: Color,
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

impl InputSpec {
    /// The input every petcam export takes: `size` x `size` RGB bytes, NHWC, resized with
    /// [`RESIZE_BILINEAR_AA`].
    pub fn rgb_bytes(name: &str, size: u32, mean: f32, std: f32, mirror_average: bool) -> Self {
        Self {
            name: name.into(),
            width: size,
            height: size,
            channels: 3,
            layout: Layout::Nhwc,
            dtype: DType::Uint8,
            color: Color::Rgb,
            resize: RESIZE_BILINEAR_AA.into(),
            mean,
            std,
            mirror_average,
        }
    }
}

/// Axis order of the input tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Layout {
    /// Batch (1), height, width, channel.
    #[serde(rename = "NHWC")]
    Nhwc,
}

/// Element type of the input tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DType {
    #[serde(rename = "uint8")]
    Uint8,
}

/// Channel order of the input tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Color {
    #[serde(rename = "RGB")]
    Rgb,
}

macro_rules! names {
    ($($ty:ty { $($variant:ident => $name:literal),+ $(,)? })+) => {$(
        impl $ty {
            /// The name written into the model file (and shown by `petcam inspect`).
            pub fn name(self) -> &'static str {
                match self {
                    $(Self::$variant => $name),+
                }
            }
        }

        impl core::fmt::Display for $ty {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                f.write_str(self.name())
            }
        }
    )+};
}

names! {
    Layout { Nhwc => "NHWC" }
    DType { Uint8 => "uint8" }
    Color { Rgb => "RGB" }
    QuantizationForm { None => "none", Int8Weights => "int8-weights", Int8 => "int8" }
    CalibrationMethod { MinMax => "min-max", Percentile => "percentile" }
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
    pub form: QuantizationForm,
    /// How `int8` activation ranges were chosen; absent for the other forms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<CalibrationSpec>,
}

/// How the model stores its numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum QuantizationForm {
    /// Float32 weights and activations.
    #[serde(rename = "none")]
    None,
    /// Per-channel int8 weights restored to float at load, float activations.
    #[serde(rename = "int8-weights")]
    Int8Weights,
    /// int8 weights and u8 activations (QLinearConv, QLinearMatMul).
    #[serde(rename = "int8")]
    Int8,
}

/// How `int8` activation ranges were chosen from the calibration values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CalibrationMethod {
    /// Every value inside the range.
    #[serde(rename = "min-max")]
    MinMax,
    /// The rarest values at each end saturate.
    #[serde(rename = "percentile")]
    Percentile,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationSpec {
    pub method: CalibrationMethod,
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
    use alloc::string::ToString;

    /// `petcam.input` and `petcam.quantization` as a model exported before these fields were
    /// enums wrote them: they still load, and are written back byte for byte.
    #[test]
    fn metadata_of_older_models_loads_and_round_trips() {
        let input = r#"{"name":"image","width":128,"height":128,"channels":3,"layout":"NHWC","dtype":"uint8","color":"RGB","resize":"bilinear-antialias","mean":127.0,"std":128.0}"#;
        let spec: InputSpec = serde_json::from_str(input).unwrap();
        assert_eq!(
            spec,
            InputSpec::rgb_bytes("image", 128, 127.0, 128.0, false)
        );
        assert_eq!(serde_json::to_string(&spec).unwrap(), input);
        let quantization = r#"{"form":"int8","calibration":{"method":"percentile","images":10}}"#;
        let q: QuantizationSpec = serde_json::from_str(quantization).unwrap();
        assert_eq!(q.form, QuantizationForm::Int8);
        assert_eq!(
            q.calibration.as_ref().unwrap().method,
            CalibrationMethod::Percentile
        );
        assert_eq!(serde_json::to_string(&q).unwrap(), quantization);
        // The names the enums print are the names in the file.
        assert_eq!(spec.layout.name(), "NHWC");
        assert_eq!(QuantizationForm::Int8Weights.to_string(), "int8-weights");
        assert_eq!(CalibrationMethod::MinMax.name(), "min-max");
        // A layout petcam never wrote is refused, not guessed.
        let nchw = input.replace("NHWC", "NCHW");
        assert!(serde_json::from_str::<InputSpec>(&nchw).is_err());
    }

    #[test]
    fn quantization_spec_reads_models_without_calibration() {
        let old: QuantizationSpec = serde_json::from_str(r#"{"form":"int8-weights"}"#).unwrap();
        assert_eq!(old.form, QuantizationForm::Int8Weights);
        assert_eq!(old.calibration, None);
        assert_eq!(
            serde_json::to_string(&old).unwrap(),
            r#"{"form":"int8-weights"}"#
        );
        let int8 = QuantizationSpec {
            form: QuantizationForm::Int8,
            calibration: Some(CalibrationSpec {
                method: CalibrationMethod::Percentile,
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
