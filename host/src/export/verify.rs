//! After export: the written file, loaded with tract, must predict what candle predicted.

use std::time::Instant;

use rayon::prelude::*;

use crate::features::FeatureSet;
use crate::model::{top1, ExportedModel};

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(
        "exported model disagrees with training: top-1 agreement {:.2}% on {} validation photos, \
         below the required {:.2}% (candle accuracy {:.2}%, tract accuracy {:.2}%)",
        .0.agreement * 100.0, .0.images, .1 * 100.0, .0.candle_accuracy * 100.0, .0.onnx_accuracy * 100.0
    )]
    Disagreement(Verification, f64),
    #[error("tract could not run the exported model on {path}: {reason}")]
    Run { path: String, reason: String },
}

/// What verification measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Verification {
    pub images: usize,
    pub candle_accuracy: f64,
    pub onnx_accuracy: f64,
    /// Fraction of photos where candle and tract pick the same class.
    pub agreement: f64,
    /// Largest difference in any class probability between candle and tract.
    pub max_probability_diff: f32,
    /// Wall-clock per photo across all threads, decoding included.
    pub ms_per_image: f64,
}

/// Runs `model` over the photos of `val` and compares with candle's probabilities (one row per
/// photo of `val`, in order). Fails when top-1 agreement is below `min_agreement`.
pub fn verify(
    model: &ExportedModel,
    val: &FeatureSet,
    candle_probs: &[Vec<f32>],
    min_agreement: f64,
) -> Result<Verification, VerifyError> {
    let start = Instant::now();
    let tract_probs: Vec<Vec<f32>> = val
        .paths
        .par_iter()
        .map(|p| {
            model.predict_file(p).map_err(|e| VerifyError::Run {
                path: p.display().to_string(),
                reason: e.to_string(),
            })
        })
        .collect::<Result<_, _>>()?;
    let n = val.len();
    let (mut agree, mut candle_right, mut onnx_right, mut max_diff) = (0, 0, 0, 0f32);
    for i in 0..n {
        let (c, _) = top1(&candle_probs[i]);
        let (t, _) = top1(&tract_probs[i]);
        agree += (c == t) as usize;
        candle_right += (c == val.labels[i]) as usize;
        onnx_right += (t == val.labels[i]) as usize;
        for (a, b) in candle_probs[i].iter().zip(&tract_probs[i]) {
            max_diff = max_diff.max((a - b).abs());
        }
    }
    let frac = |k: usize| {
        if n == 0 {
            f64::NAN
        } else {
            k as f64 / n as f64
        }
    };
    let v = Verification {
        images: n,
        candle_accuracy: frac(candle_right),
        onnx_accuracy: frac(onnx_right),
        agreement: if n == 0 { 1.0 } else { agree as f64 / n as f64 },
        max_probability_diff: max_diff,
        ms_per_image: if n == 0 {
            0.0
        } else {
            start.elapsed().as_secs_f64() * 1000.0 / n as f64
        },
    };
    if v.agreement < min_agreement {
        return Err(VerifyError::Disagreement(v, min_agreement));
    }
    Ok(v)
}
