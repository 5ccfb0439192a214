//! Photos in, one verified model and its report out, in four stages:
//! [`extract`] → [`fit`] → [`export`] → [`verify`]. Each stage takes its own config and the
//! artifact of the stage before it and returns its own artifact; the [`Report`] is assembled
//! from the artifacts ([`report::assemble`]). `petcam train-and-export` is this pipeline with
//! the configs read from its flags.

pub mod export;
pub mod extract;
pub mod fit;
pub mod report;
pub mod verify;

use std::path::PathBuf;
use std::time::Instant;

use candle_core::Device;

use crate::augment::Policy;
use crate::backbone::{BackboneError, LoadOptions};
use crate::dataset::{DatasetError, PhotoError};
use crate::export::calibrate::{CalibrationError, RangeMethod};
use crate::export::onnx::OnnxError;
use crate::export::quantize::QuantizeForm;
use crate::export::verify::VerifyError;
use crate::features::FeatureError;
use crate::model::ModelError;
use crate::report::{Misclassified, Report, ReportError};
use crate::train::{TrainConfig, TrainError};

pub use export::Exported;
pub use extract::Extracted;
pub use fit::Fitted;
pub use verify::Verified;

/// Where the photos are and how they split into training and validation.
#[derive(Debug, Clone)]
pub struct DataConfig {
    /// `DIR/<class>/*` or `DIR/train/<class>/*` plus `DIR/val/<class>/*`.
    pub root: PathBuf,
    /// Fraction held out for validation with the `DIR/<class>` layout.
    pub val_fraction: f32,
}

/// Which backbone, from which weights file.
#[derive(Debug, Clone)]
pub struct BackboneConfig {
    pub name: String,
    pub weights: PathBuf,
    pub options: LoadOptions,
}

/// How features are computed and kept.
#[derive(Debug, Clone)]
pub struct FeatureConfig {
    /// The cache folder; `None` recomputes every feature.
    pub cache_root: Option<PathBuf>,
    /// Photos per backbone pass on a GPU (one per core on CPU).
    pub extract_batch: usize,
}

/// What learns, and from which rows.
#[derive(Debug, Clone)]
pub enum TrainingMode {
    /// The backbone stays frozen and the head learns on its pooled features; with `views`,
    /// also on the features of augmented views of each photo, computed once and cached.
    Probe { views: Option<CachedViews> },
    /// The top blocks learn too.
    FineTune(FineTune),
}

/// Augmented views of each training photo, computed once before training.
#[derive(Debug, Clone, Copy)]
pub struct CachedViews {
    pub policy: Policy,
    pub per_photo: u32,
}

/// Fine-tuning of the top blocks of the backbone with the head.
#[derive(Debug, Clone, Copy)]
pub struct FineTune {
    /// Blocks at the top that train, with the head convolution.
    pub unfreeze: usize,
    /// AdamW learning rate of the unfrozen layers.
    pub backbone_lr: f64,
    /// Update BatchNorm statistics from each batch.
    pub train_bn: bool,
    /// A fresh augmented view of every photo each epoch (not cached).
    pub views: Option<Policy>,
}

impl TrainingMode {
    /// Blocks that train (0 for a probe).
    pub fn unfrozen_blocks(&self) -> usize {
        match self {
            Self::Probe { .. } => 0,
            Self::FineTune(f) => f.unfreeze,
        }
    }
}

/// How the model trains.
#[derive(Debug, Clone)]
pub struct TrainingConfig {
    pub mode: TrainingMode,
    /// Epochs, learning rate, batch size, dropout, seed, patience (of the head, when
    /// fine-tuning).
    pub head: TrainConfig,
    /// Where training runs.
    pub device: Device,
}

/// How `model.onnx` stores its numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantization {
    Float,
    /// Per-channel int8 weights, float arithmetic.
    Int8Weights,
    /// int8 weights and u8 activations, ranges calibrated on training photos.
    Int8(CalibrationConfig),
}

/// How `int8` activation ranges are found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CalibrationConfig {
    /// Training photos the float model runs over.
    pub images: usize,
    pub method: RangeMethod,
}

impl Quantization {
    pub fn form(self) -> QuantizeForm {
        match self {
            Self::Float => QuantizeForm::None,
            Self::Int8Weights => QuantizeForm::Int8Weights,
            Self::Int8(_) => QuantizeForm::Int8,
        }
    }
}

/// What is exported.
#[derive(Debug, Clone, Copy)]
pub struct ExportSpec {
    pub quantization: Quantization,
    /// The graph averages the probabilities of each frame and of its mirror image.
    pub mirror_average: bool,
}

/// How the export is checked, and what is written when it passes.
#[derive(Debug, Clone)]
pub struct VerifyConfig {
    /// Minimum top-1 agreement of the float model (tract) with the trainer (candle).
    pub min_agreement: f64,
    /// Single-thread runs per model for the latency comparison.
    pub latency_runs: usize,
    /// Write a quantized model that loses more than a point of accuracy, with a warning.
    pub allow_accuracy_drop: bool,
    /// Also write the float model as `model-f32.onnx` when `model.onnx` is quantized.
    pub keep_float: bool,
}

/// Everything one run needs.
#[derive(Debug, Clone)]
pub struct Config {
    pub data: DataConfig,
    pub backbone: BackboneConfig,
    pub features: FeatureConfig,
    pub training: TrainingConfig,
    pub export: ExportSpec,
    pub verify: VerifyConfig,
    /// Output folder: `model.onnx` (and `model-f32.onnx`).
    pub out: PathBuf,
}

/// A finished run: the report and the photos it shows.
#[derive(Debug)]
pub struct Trained {
    pub report: Report,
    pub misclassified: Vec<Misclassified>,
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("cannot create output folder {path}")]
    OutputFolder {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error("loading backbone {name}")]
    Backbone {
        name: String,
        // Boxed: the largest error by far, and rare.
        #[source]
        source: Box<BackboneError>,
    },
    #[error(
        "--unfreeze {unfreeze} asks for more blocks than {backbone} has ({blocks}); use 1 to {blocks}"
    )]
    TooManyBlocks {
        unfreeze: usize,
        backbone: String,
        blocks: usize,
    },
    #[error(
        "--mirror-average needs validation photos to check the export against; {} has none",
        .data.display()
    )]
    MirrorWithoutValidation { data: PathBuf },
    #[error(
        "the mirrored validation photos differ from the photos; a photo changed while reading?"
    )]
    MirrorMismatch,
    #[error(transparent)]
    Features(#[from] FeatureError),
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error("pooled features through the fine-tuned backbone")]
    Pooled(#[from] candle_core::Error),
    #[error("reading golden photo {path}")]
    Golden {
        path: PathBuf,
        #[source]
        source: PhotoError,
    },
    #[error("encoding the golden photo")]
    GoldenPng(#[from] image::ImageError),
    #[error("the golden entry is missing from the model's metadata")]
    NoGolden,
    #[error(transparent)]
    Metadata(#[from] serde_json::Error),
    #[error(transparent)]
    Calibration(#[from] CalibrationError),
    #[error(transparent)]
    Onnx(#[from] OnnxError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("verifying the export to {path}")]
    Verify {
        path: PathBuf,
        #[source]
        source: VerifyError,
    },
    #[error(
        "{source}; {} was not written. Export with {alternative}, or keep it anyway with \
         --allow-accuracy-drop",
        .path.display()
    )]
    AccuracyDrop {
        source: VerifyError,
        path: PathBuf,
        alternative: &'static str,
    },
    #[error(transparent)]
    Report(#[from] ReportError),
}

/// Runs every stage; nothing reaches `config.out` unless verification passed.
pub fn run(config: &Config) -> Result<Trained, PipelineError> {
    let t0 = Instant::now();
    std::fs::create_dir_all(&config.out).map_err(|source| PipelineError::OutputFolder {
        path: config.out.clone(),
        source,
    })?;
    let extracted = extract::extract(
        &config.data,
        &config.backbone,
        &config.features,
        &config.training,
        config.export.mirror_average,
    )?;
    let fitted = fit::fit(extracted, &config.training, config.features.extract_batch)?;
    let exported = export::export(&fitted, &config.export, &config.out)?;
    let verified = verify::verify(&fitted, exported, &config.verify)?;
    let written = verify::write(&fitted, verified, config.verify.keep_float)?;
    Ok(report::assemble(config, &fitted, &written, t0))
}
