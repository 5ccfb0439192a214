//! Stage 4: the models checked with tract against the trainer, then written. A refused model
//! never reaches the output folder.

use std::time::Instant;

use petcam_shared::metadata;
use prost::Message;

use crate::export::calibrate::Calibration;
use crate::export::onnx;
use crate::export::quantize::QuantizeForm;
use crate::export::verify::{self, Verification};
use crate::model::{GraphSummary, NodeTime};

use super::export::{metrics, TractMetrics};
use super::{Exported, Fitted, PipelineError, VerifyConfig};

/// Mean of this many profiled runs gives the report's per-operator times.
const PROFILE_RUNS: usize = 5;

/// The export with what verification measured.
#[derive(Debug)]
pub struct Verified {
    pub exported: Exported,
    pub check: Verification,
    /// Per-node times of the exported model and its graph's layer counts.
    pub profile: Vec<NodeTime>,
    pub graph: GraphSummary,
    /// The quantized model lost more than a point and is kept anyway.
    pub accuracy_drop_accepted: bool,
    pub verify_s: f64,
}

/// Runs both models over the validation photos and compares them with the trainer.
pub fn verify(
    fitted: &Fitted,
    exported: Exported,
    config: &VerifyConfig,
) -> Result<Verified, PipelineError> {
    let t0 = Instant::now();
    let check = verify::verify(
        &exported.float.0,
        exported.quantized.as_ref().map(|(m, _)| m),
        &fitted.val,
        &fitted.probabilities,
        config.min_agreement,
        &exported.golden_image,
        config.latency_runs,
    )
    .map_err(|source| PipelineError::Verify {
        path: exported.model_path.clone(),
        source,
    })?;
    let mut accuracy_drop_accepted = false;
    if let Some(q) = &check.quantized {
        if let Err(e) = verify::check_accuracy_drop(exported.form().name(), q) {
            if !config.allow_accuracy_drop {
                return Err(PipelineError::AccuracyDrop {
                    source: e,
                    path: exported.model_path.clone(),
                    alternative: match exported.form() {
                        QuantizeForm::Int8 => "--quantize int8-weights or none",
                        _ => "--quantize none",
                    },
                });
            }
            tracing::warn!("{e}; writing it anyway because --allow-accuracy-drop was given");
            accuracy_drop_accepted = true;
        }
    }
    let model = exported.model();
    let profile = model.profile(&exported.golden_image, PROFILE_RUNS)?;
    let graph = model.graph.clone();
    Ok(Verified {
        exported,
        check,
        profile,
        graph,
        accuracy_drop_accepted,
        verify_s: t0.elapsed().as_secs_f64(),
    })
}

/// What was written.
#[derive(Debug)]
pub struct Written {
    pub verified: Verified,
    pub model_bytes: u64,
    pub float_model_bytes: u64,
    /// `model-f32.onnx`, when it was written.
    pub float_model_file: Option<String>,
    /// Building and writing the models.
    pub export_s: f64,
}

impl Written {
    pub fn exported(&self) -> &Exported {
        &self.verified.exported
    }

    pub fn calibration(&self) -> Option<&Calibration> {
        self.verified.exported.quantization.calibration()
    }
}

/// Writes `model.onnx` (and, with `keep_float`, `model-f32.onnx`), each carrying what
/// verification measured in `petcam.metrics` (`petcam inspect` shows it).
pub fn write(
    fitted: &Fitted,
    mut verified: Verified,
    keep_float: bool,
) -> Result<Written, PipelineError> {
    let t0 = Instant::now();
    let check = &verified.check;
    let exported = &mut verified.exported;
    let float_metrics = metrics(
        fitted,
        Some(TractMetrics::Float {
            accuracy: check.float.tract_accuracy,
        }),
    );
    set_proto_meta(&mut exported.float.1, float_metrics.to_string());
    if let (Some((_, proto)), Some(q)) = (&mut exported.quantized, &check.quantized) {
        let quantized_metrics = metrics(
            fitted,
            Some(TractMetrics::Quantized {
                accuracy: q.accuracy,
                float_accuracy: q.float_accuracy,
                agreement: q.agreement,
            }),
        );
        set_proto_meta(proto, quantized_metrics.to_string());
    }
    let float_proto = &exported.float.1;
    let float_model_bytes = float_proto.encoded_len() as u64;
    let model_proto = exported.quantized.as_ref().map_or(float_proto, |(_, p)| p);
    let model_bytes = onnx::write_model(model_proto, &exported.model_path)?;
    let float_model_file = if exported.quantized.is_some() && keep_float {
        onnx::write_model(float_proto, &exported.float_path)?;
        Some(exported.float_path.display().to_string())
    } else {
        None
    };
    let export_s = exported.export_s + t0.elapsed().as_secs_f64();
    Ok(Written {
        verified,
        model_bytes,
        float_model_bytes,
        float_model_file,
        export_s,
    })
}

fn set_proto_meta(proto: &mut tract_onnx::pb::ModelProto, value: String) {
    if let Some(entry) = proto
        .metadata_props
        .iter_mut()
        .find(|e| e.key == metadata::METRICS)
    {
        entry.value = value;
    }
}
