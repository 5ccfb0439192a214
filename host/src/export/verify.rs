//! After export: the written files, loaded with tract, are checked on the validation photos.
//!
//! - The float model must predict what the trainer (candle) predicted: anything else is an
//!   exporter bug.
//! - A quantized model is compared with the float model: top-1 agreement, accuracy of both,
//!   sizes and single-thread latency of both, measured in the same run. A quantized model
//!   that scores more than [`MAX_ACCURACY_DROP`] below float is refused.

use std::time::Instant;

use image::RgbImage;
use rayon::prelude::*;

use crate::dataset;
use crate::features::FeatureSet;
use crate::model::{self, top1, ExportedModel, Latency};

/// Largest accepted accuracy loss of a quantized model against float (1 point).
pub const MAX_ACCURACY_DROP: f64 = 0.01;

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(
        "exported float model disagrees with training: top-1 agreement {:.2}% on {} validation \
         photos, below the required {:.2}% (candle accuracy {:.2}%, tract accuracy {:.2}%)",
        .0.agreement * 100.0, .0.images, .1 * 100.0, .0.candle_accuracy * 100.0,
        .0.tract_accuracy * 100.0
    )]
    Disagreement(FloatCheck, f64),
    #[error(
        "the {form} model scores {:.2}% on {images} validation photos, {:.2} points below the \
         float model's {:.2}% (more than {:.0} point lost to quantization)",
        accuracy * 100.0, (float_accuracy - accuracy) * 100.0, float_accuracy * 100.0,
        MAX_ACCURACY_DROP * 100.0
    )]
    AccuracyDrop {
        form: String,
        images: usize,
        accuracy: f64,
        float_accuracy: f64,
    },
    #[error("tract could not run the exported model on {path}: {reason}")]
    Run { path: String, reason: String },
}

/// The float model (tract) against the trainer (candle).
#[derive(Debug, Clone, PartialEq)]
pub struct FloatCheck {
    pub images: usize,
    pub candle_accuracy: f64,
    pub tract_accuracy: f64,
    /// Fraction of photos where candle and tract pick the same class.
    pub agreement: f64,
    /// Largest difference in any class probability between candle and tract.
    pub max_probability_diff: f32,
}

/// A quantized model (tract) against the float model (tract).
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedCheck {
    pub images: usize,
    pub float_accuracy: f64,
    pub accuracy: f64,
    /// Fraction of photos where both models pick the same class.
    pub agreement: f64,
    pub max_probability_diff: f32,
    /// Mean over photos of the largest class-probability difference.
    pub mean_probability_diff: f32,
}

/// What verification measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Verification {
    pub float: FloatCheck,
    /// `None` when the exported model is the float model.
    pub quantized: Option<QuantizedCheck>,
    /// Single-thread latency of the float model and, when there is one, the quantized model.
    pub float_latency: Latency,
    pub quantized_latency: Option<Latency>,
    /// Wall-clock per photo of the accuracy pass across all threads, decoding included.
    pub ms_per_image: f64,
}

fn frac(k: usize, n: usize) -> f64 {
    if n == 0 {
        f64::NAN
    } else {
        k as f64 / n as f64
    }
}

fn compare(a: &[Vec<f32>], b: &[Vec<f32>], labels: &[usize]) -> (usize, usize, usize, f32) {
    let (mut agree, mut a_right, mut b_right, mut max_diff) = (0, 0, 0, 0f32);
    for ((pa, pb), &label) in a.iter().zip(b).zip(labels) {
        let (ta, _) = top1(pa);
        let (tb, _) = top1(pb);
        agree += (ta == tb) as usize;
        a_right += (ta == label) as usize;
        b_right += (tb == label) as usize;
        for (x, y) in pa.iter().zip(pb) {
            max_diff = max_diff.max((x - y).abs());
        }
    }
    (agree, a_right, b_right, max_diff)
}

/// Runs `float` (and `quantized`, when given) over the photos of `val` and compares with
/// candle's probabilities (one row per photo of `val`, in order). Latency is measured on
/// `latency_image` with `latency_runs` runs per model.
///
/// Fails when the float model's top-1 agreement with candle is below `min_agreement`, or
/// when the quantized model loses more than [`MAX_ACCURACY_DROP`] against float and
/// `allow_accuracy_drop` is false.
pub fn verify(
    float: &ExportedModel,
    quantized: Option<&ExportedModel>,
    val: &FeatureSet,
    candle_probs: &[Vec<f32>],
    min_agreement: f64,
    latency_image: &RgbImage,
    latency_runs: usize,
) -> Result<Verification, VerifyError> {
    let start = Instant::now();
    let run_err = |p: &std::path::Path, e: String| VerifyError::Run {
        path: p.display().to_string(),
        reason: e,
    };
    // Each photo is decoded once and run through both models.
    let probs: Vec<(Vec<f32>, Option<Vec<f32>>)> = val
        .paths
        .par_iter()
        .map(|p| {
            let img = dataset::load_input(p, float.input.width, float.input.height)
                .map_err(|e| run_err(p, e.to_string()))?;
            let f = float.predict(&img).map_err(|e| run_err(p, e.to_string()))?;
            let q = quantized
                .map(|m| m.predict(&img).map_err(|e| run_err(p, e.to_string())))
                .transpose()?;
            Ok((f, q))
        })
        .collect::<Result<_, VerifyError>>()?;
    let ms_per_image = if val.is_empty() {
        0.0
    } else {
        start.elapsed().as_secs_f64() * 1000.0 / val.len() as f64
    };
    let n = val.len();
    let float_probs: Vec<Vec<f32>> = probs.iter().map(|(f, _)| f.clone()).collect();
    let (agree, candle_right, tract_right, max_diff) =
        compare(candle_probs, &float_probs, &val.labels);
    let float_check = FloatCheck {
        images: n,
        candle_accuracy: frac(candle_right, n),
        tract_accuracy: frac(tract_right, n),
        agreement: if n == 0 { 1.0 } else { frac(agree, n) },
        max_probability_diff: max_diff,
    };
    if float_check.agreement < min_agreement {
        return Err(VerifyError::Disagreement(float_check, min_agreement));
    }
    let quantized_check = quantized.map(|_| {
        let q: Vec<Vec<f32>> = probs.iter().filter_map(|(_, q)| q.clone()).collect();
        let (agree, float_right, q_right, max_diff) = compare(&float_probs, &q, &val.labels);
        let mean_diff = float_probs
            .iter()
            .zip(&q)
            .map(|(a, b)| {
                a.iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max)
            })
            .sum::<f32>()
            / n.max(1) as f32;
        QuantizedCheck {
            images: n,
            float_accuracy: frac(float_right, n),
            accuracy: frac(q_right, n),
            agreement: if n == 0 { 1.0 } else { frac(agree, n) },
            max_probability_diff: max_diff,
            mean_probability_diff: mean_diff,
        }
    });

    let mut models = vec![float];
    models.extend(quantized);
    let mut lat = model::latency(&models, latency_image, latency_runs)
        .map_err(|e| run_err(&float.path, e.to_string()))?
        .into_iter();
    let float_latency = lat.next().expect("one latency per model");
    Ok(Verification {
        float: float_check,
        quantized: quantized_check,
        float_latency,
        quantized_latency: lat.next(),
        ms_per_image,
    })
}

/// Refuses a quantized model that loses more than [`MAX_ACCURACY_DROP`] against float.
pub fn check_accuracy_drop(form: &str, q: &QuantizedCheck) -> Result<(), VerifyError> {
    if q.float_accuracy - q.accuracy > MAX_ACCURACY_DROP {
        return Err(VerifyError::AccuracyDrop {
            form: form.to_owned(),
            images: q.images,
            accuracy: q.accuracy,
            float_accuracy: q.float_accuracy,
        });
    }
    Ok(())
}
