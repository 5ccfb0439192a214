//! Calibration for static int8 quantization: the float backbone runs over training photos and
//! every tensor the int8 graph stores as u8 gets a range `[lo, hi]`.
//!
//! Two methods:
//! - `min-max`: the smallest and largest value seen. Nothing saturates, but one outlier
//!   pixel in one photo stretches the step for every value of that tensor.
//! - `percentile`: the range that keeps all but [`PERCENTILE_TAIL`] of the values on each side
//!   (from a histogram of [`BINS`] bins over the min-max range); the rare outliers saturate and
//!   the common values get finer steps.
//!
//! Every range contains 0, so a u8 zero point represents zero exactly (zero padding, ReLU).

use std::collections::BTreeMap;

use candle_core::Tensor;
use image::RgbImage;
use petcam_shared::metadata::CalibrationMethod;
use rayon::prelude::*;

use crate::backbone::Backbone;
use crate::head::HeadWeights;

/// Histogram bins per tensor for the percentile method.
pub const BINS: usize = 2048;
/// Fraction of values allowed to saturate at each end with the percentile method (0.01%).
pub const PERCENTILE_TAIL: f64 = 1e-4;
/// Name of the classifier's matrix product (before its bias) in the calibration table.
pub const HEAD_MATMUL: &str = "head_matmul";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RangeMethod {
    /// Smallest and largest value seen.
    MinMax,
    /// Keeps all but 0.01% of the values at each end.
    Percentile,
}

impl RangeMethod {
    pub fn name(self) -> &'static str {
        CalibrationMethod::from(self).name()
    }
}

impl From<RangeMethod> for CalibrationMethod {
    fn from(method: RangeMethod) -> Self {
        match method {
            RangeMethod::MinMax => Self::MinMax,
            RangeMethod::Percentile => Self::Percentile,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CalibrationError {
    #[error("calibration needs at least one photo")]
    NoPhotos,
    #[error("the backbone failed during calibration: {0}")]
    Backbone(#[from] candle_core::Error),
    #[error("calibration has no range for tensor {0}")]
    Missing(String),
}

/// The chosen range of every quantized tensor.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Calibration {
    pub method: RangeMethod,
    pub images: usize,
    /// Tensor name (see [`Backbone::trace`] and [`HEAD_MATMUL`]) to `[lo, hi]`.
    pub ranges: BTreeMap<String, (f32, f32)>,
}

impl Calibration {
    pub fn range(&self, name: &str) -> Result<(f32, f32), CalibrationError> {
        self.ranges
            .get(name)
            .copied()
            .ok_or_else(|| CalibrationError::Missing(name.to_owned()))
    }
}

/// Every traced tensor of one photo, in trace order, as flat values.
fn activations(
    backbone: &Backbone,
    head: &HeadWeights,
    img: &RgbImage,
) -> candle_core::Result<Vec<(String, Vec<f32>)>> {
    let (w, h) = img.dimensions();
    let rgb = Tensor::from_vec(
        img.as_raw().clone(),
        (1, h as usize, w as usize, 3),
        backbone.device(),
    )?;
    let mut out = Vec::new();
    let features = backbone.trace(&rgb, &mut |name, t| {
        out.push((name.to_owned(), t.flatten_all()?.to_vec1::<f32>()?));
        Ok(())
    })?;
    let x = features.flatten_all()?.to_vec1::<f32>()?;
    let logits = head
        .weight
        .chunks(head.features)
        .map(|row| row.iter().zip(&x).map(|(w, x)| w * x).sum())
        .collect();
    out.push((HEAD_MATMUL.to_owned(), logits));
    Ok(out)
}

fn min_max(v: &[f32]) -> (f32, f32) {
    v.iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

/// Ranges of every quantized tensor over `images` (already resized to the backbone's input).
pub fn calibrate(
    backbone: &Backbone,
    head: &HeadWeights,
    images: &[RgbImage],
    method: RangeMethod,
    progress: &(dyn Fn() + Sync),
) -> Result<Calibration, CalibrationError> {
    if images.is_empty() {
        return Err(CalibrationError::NoPhotos);
    }
    type Extremes = Vec<(String, f32, f32)>;
    let merge = |a: Extremes, b: Extremes| -> Extremes {
        if a.is_empty() {
            return b;
        }
        a.into_iter()
            .zip(b)
            .map(|((n, lo, hi), (_, lo2, hi2))| (n, lo.min(lo2), hi.max(hi2)))
            .collect()
    };
    let extremes: Extremes = images
        .par_iter()
        .map(|img| -> candle_core::Result<Extremes> {
            let acts = activations(backbone, head, img)?;
            if method == RangeMethod::MinMax {
                progress();
            }
            Ok(acts
                .into_iter()
                .map(|(n, v)| {
                    let (lo, hi) = min_max(&v);
                    (n, lo, hi)
                })
                .collect())
        })
        .try_reduce(Vec::new, |a, b| Ok(merge(a, b)))?;

    let ranges = match method {
        RangeMethod::MinMax => extremes
            .into_iter()
            .map(|(n, lo, hi)| (n, (lo.min(0.0), hi.max(0.0))))
            .collect(),
        RangeMethod::Percentile => {
            // Second pass: a histogram per tensor over its min-max range.
            let hist = images
                .par_iter()
                .map(|img| -> candle_core::Result<Vec<Vec<u64>>> {
                    let acts = activations(backbone, head, img)?;
                    progress();
                    Ok(acts
                        .iter()
                        .zip(&extremes)
                        .map(|((_, v), &(_, lo, hi))| histogram(v, lo, hi))
                        .collect())
                })
                .try_reduce(Vec::new, |a, b| {
                    if a.is_empty() {
                        return Ok(b);
                    }
                    Ok(a.into_iter()
                        .zip(b)
                        .map(|(x, y)| x.into_iter().zip(y).map(|(p, q)| p + q).collect())
                        .collect())
                })?;
            extremes
                .into_iter()
                .zip(hist)
                .map(|((n, lo, hi), h)| {
                    let (plo, phi) = percentile_range(&h, lo, hi, PERCENTILE_TAIL);
                    (n, (plo.min(0.0), phi.max(0.0)))
                })
                .collect()
        }
    };
    Ok(Calibration {
        method,
        images: images.len(),
        ranges,
    })
}

fn histogram(v: &[f32], lo: f32, hi: f32) -> Vec<u64> {
    let mut h = vec![0u64; BINS];
    let width = (hi - lo) / BINS as f32;
    if width <= 0.0 {
        h[0] = v.len() as u64;
        return h;
    }
    let inv = 1.0 / width;
    for &x in v {
        let b = ((x - lo) * inv) as usize;
        h[b.min(BINS - 1)] += 1;
    }
    h
}

/// The range that leaves at most `tail` of the histogram's mass outside on each side; bin
/// edges are conservative (the kept range covers whole bins).
fn percentile_range(h: &[u64], lo: f32, hi: f32, tail: f64) -> (f32, f32) {
    let total: u64 = h.iter().sum();
    if total == 0 || hi <= lo {
        return (lo, hi);
    }
    let width = (hi - lo) / h.len() as f32;
    let allowed = (total as f64 * tail).floor() as u64;
    let (mut first, mut acc) = (0, 0u64);
    for (i, &c) in h.iter().enumerate() {
        if acc + c > allowed {
            first = i;
            break;
        }
        acc += c;
    }
    let (mut last, mut acc) = (h.len() - 1, 0u64);
    for (i, &c) in h.iter().enumerate().rev() {
        if acc + c > allowed {
            last = i;
            break;
        }
        acc += c;
    }
    (lo + first as f32 * width, lo + (last + 1) as f32 * width)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_drops_only_the_outlier_tail() {
        // 10 000 values in [0, 1) and one outlier at 100.
        let mut v: Vec<f32> = (0..10_000).map(|i| i as f32 / 10_000.0).collect();
        v.push(100.0);
        let (lo, hi) = min_max(&v);
        assert_eq!((lo, hi), (0.0, 100.0));
        let h = histogram(&v, lo, hi);
        assert_eq!(h.iter().sum::<u64>(), v.len() as u64);
        let (plo, phi) = percentile_range(&h, lo, hi, PERCENTILE_TAIL);
        assert_eq!(plo, 0.0);
        // The outlier (1 of 10 001 values, within the 0.01% tail) is cut; the bulk is kept.
        assert!((1.0..1.1).contains(&phi), "{phi}");
        // With no tail allowed the full range stays.
        assert_eq!(percentile_range(&h, lo, hi, 0.0), (0.0, 100.0));
    }

    #[test]
    fn constant_tensor_has_a_degenerate_but_valid_histogram() {
        let h = histogram(&[2.0; 5], 2.0, 2.0);
        assert_eq!(h[0], 5);
        assert_eq!(percentile_range(&h, 2.0, 2.0, PERCENTILE_TAIL), (2.0, 2.0));
    }
}
