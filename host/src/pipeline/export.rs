//! Stage 3: backbone and head as ONE ONNX graph, float (the reference of the verification)
//! and, when asked for, quantized; both in memory and loaded with tract.

use std::path::{Path, PathBuf};
use std::time::Instant;

use base64::Engine;
use petcam_shared::metadata;
use prost::Message;
use tract_onnx::pb::ModelProto;

use crate::dataset;
use crate::export::calibrate::{self, Calibration};
use crate::export::onnx::{self, Form, GraphSpec};
use crate::export::quantize::QuantizeForm;
use crate::model::ExportedModel;

use super::{CalibrationConfig, ExportSpec, Fitted, PipelineError, Quantization};

/// The models, built and loaded, not yet written.
#[derive(Debug)]
pub struct Exported {
    /// Where `model.onnx` goes, and `model-f32.onnx` when the float model is kept too.
    pub model_path: PathBuf,
    pub float_path: PathBuf,
    pub quantization: Quantized,
    pub mirror_average: bool,
    pub float: (ExportedModel, ModelProto),
    pub quantized: Option<(ExportedModel, ModelProto)>,
    /// The photo of the self-test entry, at the model's input size.
    pub golden_image: image::RgbImage,
    /// RFC 3339 time of export, also the report's.
    pub created: String,
    pub export_s: f64,
}

impl Exported {
    /// What `model.onnx` holds.
    pub fn model(&self) -> &ExportedModel {
        self.quantized.as_ref().map_or(&self.float.0, |(m, _)| m)
    }

    /// The form of `model.onnx`.
    pub fn form(&self) -> QuantizeForm {
        self.quantization.graph_form().quantize_form()
    }
}

/// The quantization of `model.onnx`, with the activation ranges `int8` was calibrated to.
#[derive(Debug)]
pub enum Quantized {
    Float,
    Int8Weights,
    Int8(Calibration),
}

impl Quantized {
    /// What the graph builder needs of it.
    pub fn graph_form(&self) -> Form<'_> {
        match self {
            Self::Float => Form::Float,
            Self::Int8Weights => Form::Int8Weights,
            Self::Int8(c) => Form::Int8(c),
        }
    }

    pub fn calibration(&self) -> Option<&Calibration> {
        match self {
            Self::Int8(c) => Some(c),
            Self::Float | Self::Int8Weights => None,
        }
    }
}

/// Builds the float model and, when `spec` asks for one, the quantized one.
pub fn export(fitted: &Fitted, spec: &ExportSpec, out: &Path) -> Result<Exported, PipelineError> {
    let t0 = Instant::now();
    let model_path = out.join("model.onnx");
    let float_path = out.join("model-f32.onnx");
    let created = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let (meta, golden_image) = model_metadata(fitted, spec, &created)?;
    let quantization = match spec.quantization {
        Quantization::Float => Quantized::Float,
        Quantization::Int8Weights => Quantized::Int8Weights,
        Quantization::Int8(config) => Quantized::Int8(calibrate_int8(fitted, config)?),
    };
    let form = quantization.graph_form();
    let quantized = !matches!(form, Form::Float);

    let mut float_meta = meta.clone();
    set_meta(
        &mut float_meta,
        metadata::QUANTIZATION,
        quantization_json(Form::Float)?,
    );
    let float_proto = onnx::build_model(
        &fitted.backbone,
        &fitted.outcome.head,
        GraphSpec {
            form: Form::Float,
            mirror_average: spec.mirror_average,
        },
        &float_meta,
    )?;
    let float_model = ExportedModel::from_bytes(
        &float_proto.encode_to_vec(),
        if quantized { &float_path } else { &model_path },
    )?;
    let quantized_model = if quantized {
        let mut meta = meta;
        set_meta(&mut meta, metadata::QUANTIZATION, quantization_json(form)?);
        let spec = GraphSpec {
            form,
            mirror_average: spec.mirror_average,
        };
        Some(quantized_model(
            fitted,
            spec,
            meta,
            &golden_image,
            &model_path,
        )?)
    } else {
        None
    };
    Ok(Exported {
        model_path,
        float_path,
        quantization,
        mirror_average: spec.mirror_average,
        float: (float_model, float_proto),
        quantized: quantized_model,
        golden_image,
        created,
        export_s: t0.elapsed().as_secs_f64(),
    })
}

/// The model's self-description (see `petcam_shared::metadata`), with the golden photo.
fn model_metadata(
    fitted: &Fitted,
    spec: &ExportSpec,
    created: &str,
) -> Result<(Vec<(String, String)>, image::RgbImage), PipelineError> {
    let backbone = &fitted.backbone;
    let size = backbone.input_size as u32;
    let input = onnx::input_spec(backbone, spec.mirror_average);
    let backbone_spec = metadata::BackboneSpec {
        name: backbone.name.clone(),
        input_size: size,
        feature_dim: backbone.feature_dim() as u32,
        weights_sha256: backbone.weights_sha256.clone(),
        fine_tuned_blocks: fitted
            .fine_tune
            .as_ref()
            .map_or(0, |f| f.unfrozen_blocks as u32),
    };
    // The golden pair: the first validation photo (or training photo) and the probabilities the
    // trainer computed for it. The device's self-test runs it through the model file.
    let set = if fitted.val.is_empty() {
        &fitted.train
    } else {
        &fitted.val
    };
    let path = &set.paths[0];
    let img = dataset::load_input(path, size, size).map_err(|source| PipelineError::Golden {
        path: path.clone(),
        source,
    })?;
    let mut png = Vec::new();
    image::DynamicImage::ImageRgb8(img.clone())
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
    let golden = metadata::Golden {
        input_png_base64: base64::engine::general_purpose::STANDARD.encode(&png),
        probabilities: match fitted.probabilities.first() {
            Some(p) => p.clone(),
            None => fitted.outcome.head.probabilities(set.row(0)),
        },
        tolerance: 1e-3,
    };
    // The form is set per model; the tract figures join the metrics once verified.
    let meta = vec![
        (
            metadata::LABELS.into(),
            serde_json::to_string(&fitted.dataset.classes)?,
        ),
        (metadata::INPUT.into(), serde_json::to_string(&input)?),
        (
            metadata::BACKBONE.into(),
            serde_json::to_string(&backbone_spec)?,
        ),
        (metadata::QUANTIZATION.into(), String::new()),
        (metadata::METRICS.into(), metrics(fitted, None).to_string()),
        (metadata::DATASET_DIGEST.into(), fitted.digest.clone()),
        (metadata::VERSION.into(), env!("CARGO_PKG_VERSION").into()),
        (metadata::CREATED.into(), created.into()),
        (metadata::GOLDEN.into(), serde_json::to_string(&golden)?),
    ];
    Ok((meta, img))
}

/// What tract measured on the validation photos, for `petcam.metrics`.
#[derive(Debug, Clone, Copy)]
pub enum TractMetrics {
    Float {
        accuracy: f64,
    },
    Quantized {
        accuracy: f64,
        float_accuracy: f64,
        agreement: f64,
    },
}

/// `petcam.metrics`: the trainer's figures, and tract's once verification measured them.
pub fn metrics(fitted: &Fitted, tract: Option<TractMetrics>) -> serde_json::Value {
    let mut m = serde_json::json!({
        "val_accuracy": fitted.evaluation.accuracy,
        "val_images": fitted.val.len(),
        "train_images": fitted.train.len(),
    });
    let extra = match tract {
        None => serde_json::json!({}),
        Some(TractMetrics::Float { accuracy }) => serde_json::json!({ "tract_accuracy": accuracy }),
        Some(TractMetrics::Quantized {
            accuracy,
            float_accuracy,
            agreement,
        }) => serde_json::json!({
            "tract_accuracy": accuracy,
            "float_tract_accuracy": float_accuracy,
            "agreement_with_float": agreement,
        }),
    };
    if let (Some(m), serde_json::Value::Object(extra)) = (m.as_object_mut(), extra) {
        m.extend(extra);
    }
    m
}

fn quantization_json(form: Form<'_>) -> Result<String, serde_json::Error> {
    serde_json::to_string(&metadata::QuantizationSpec {
        form: form.quantize_form().into(),
        calibration: match form {
            Form::Int8(c) => Some(metadata::CalibrationSpec {
                method: c.method.into(),
                images: c.images as u32,
            }),
            Form::Float | Form::Int8Weights => None,
        },
    })
}

pub(super) fn set_meta(meta: &mut [(String, String)], key: &str, value: String) {
    if let Some(entry) = meta.iter_mut().find(|(k, _)| k == key) {
        entry.1 = value;
    }
}

/// Builds a quantized model in memory and loads it with tract. Its golden output is what this
/// graph computes (run here with tract), so the device's self-test checks the file, not the
/// float trainer.
fn quantized_model(
    fitted: &Fitted,
    spec: GraphSpec<'_>,
    meta: Vec<(String, String)>,
    golden_image: &image::RgbImage,
    path: &Path,
) -> Result<(ExportedModel, ModelProto), PipelineError> {
    let mut proto = onnx::build_model(&fitted.backbone, &fitted.outcome.head, spec, &meta)?;
    // Loaded (and optimised by tract) once: the golden entry changes only metadata, not the
    // graph, so the loaded model just takes the new entry.
    let mut model = ExportedModel::from_bytes(&proto.encode_to_vec(), path)?;
    let probabilities = model.predict(golden_image)?;
    let entry = proto
        .metadata_props
        .iter_mut()
        .find(|e| e.key == metadata::GOLDEN)
        .ok_or(PipelineError::NoGolden)?;
    let mut golden: metadata::Golden = serde_json::from_str(&entry.value)?;
    golden.probabilities = probabilities;
    entry.value = serde_json::to_string(&golden)?;
    model
        .metadata
        .insert(metadata::GOLDEN.to_owned(), entry.value.clone());
    model.bytes = proto.encoded_len() as u64;
    Ok((model, proto))
}

/// Runs the float backbone over `config.images` readable training photos, spread evenly over
/// the (class-sorted) training list so every class is represented.
fn calibrate_int8(
    fitted: &Fitted,
    config: CalibrationConfig,
) -> Result<Calibration, PipelineError> {
    use rayon::prelude::*;
    let train = &fitted.train;
    let n = config.images.min(train.len()).max(1);
    let size = fitted.backbone.input_size as u32;
    let picked: Vec<&Path> = (0..n)
        .map(|i| train.paths[i * train.len() / n].as_path())
        .collect();
    let images: Vec<image::RgbImage> = picked
        .par_iter()
        .filter_map(|p| match dataset::load_input(p, size, size) {
            Ok(img) => Some(img),
            Err(e) => {
                tracing::warn!("calibration skips {}: {e}", p.display());
                None
            }
        })
        .collect();
    let passes = match config.method {
        calibrate::RangeMethod::MinMax => 1,
        calibrate::RangeMethod::Percentile => 2,
    };
    let bar = indicatif::ProgressBar::new((images.len() * passes) as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "{msg:>10} [{bar:30}] {pos}/{len} photo passes, {per_sec}, eta {eta}",
        )
        .expect("a valid progress template")
        .progress_chars("=> "),
    );
    bar.set_message("calibrate");
    let cal = calibrate::calibrate(
        &fitted.backbone,
        &fitted.outcome.head,
        &images,
        config.method,
        &|| bar.inc(1),
    )?;
    bar.finish_and_clear();
    tracing::info!(
        "calibrated {} activation tensors on {} training photos ({})",
        cal.ranges.len(),
        cal.images,
        cal.method.name()
    );
    Ok(cal)
}
