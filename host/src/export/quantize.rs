//! Weight quantization for export: per-output-channel symmetric int8.
//!
//! Each output channel `c` of a weight tensor gets its own scale `max|w_c| / 127`, so a channel
//! of small weights keeps its precision instead of sharing the range of the largest channel.
//! The graph restores float weights with a standard `DequantizeLinear` (axis 0); runtimes fold
//! that at load, so the model is ~4x smaller and runs at float speed.

use petcam_shared::metadata::QuantizationForm;

/// How the exported model stores its numbers (`--quantize`; the model file records it as a
/// [`QuantizationForm`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QuantizeForm {
    /// Float32 weights and activations.
    None,
    /// int8 weights (per output channel, symmetric), float activations.
    #[value(name = "int8-weights")]
    Int8Weights,
    /// int8 weights and u8 activations (static, calibrated): QLinearConv / QLinearMatMul.
    Int8,
}

impl QuantizeForm {
    /// The name written into `petcam.quantization` and the report.
    pub fn name(self) -> &'static str {
        QuantizationForm::from(self).name()
    }
}

impl From<QuantizeForm> for QuantizationForm {
    fn from(form: QuantizeForm) -> Self {
        match form {
            QuantizeForm::None => Self::None,
            QuantizeForm::Int8Weights => Self::Int8Weights,
            QuantizeForm::Int8 => Self::Int8,
        }
    }
}

/// int8 values and one scale per output channel (the first dimension) of `w`.
pub fn per_channel_int8(w: &[f32], channels: usize) -> (Vec<i8>, Vec<f32>) {
    assert!(channels > 0 && w.len().is_multiple_of(channels));
    let per = w.len() / channels;
    let mut q = Vec::with_capacity(w.len());
    let mut scales = Vec::with_capacity(channels);
    for row in w.chunks(per) {
        let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        // An all-zero channel still needs a positive scale to be a valid DequantizeLinear.
        let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
        q.extend(
            row.iter()
                .map(|v| (v / scale).round().clamp(-127.0, 127.0) as i8),
        );
        scales.push(scale);
    }
    (q, scales)
}

/// Scale and zero point of an asymmetric u8 tensor covering `[lo, hi]` (which contains 0, so
/// zero is exactly representable): `x = scale * (q - zero_point)`.
pub fn affine_u8(lo: f32, hi: f32) -> (f32, u8) {
    let (lo, hi) = (lo.min(0.0), hi.max(0.0));
    if hi - lo <= f32::EPSILON {
        return (1.0, 0);
    }
    let scale = (hi - lo) / 255.0;
    let zero = (-lo / scale).round().clamp(0.0, 255.0) as u8;
    (scale, zero)
}

/// Largest bias magnitude [`conv_int8`] stores, in accumulator units: with up to ~2^25 from
/// the products of a 1152-deep 1x1 conv, the accumulator stays far inside i32.
pub const BIAS_LIMIT: f32 = (1 << 24) as f32;

/// A conv for QLinearConv: per-output-channel int8 weights and scales, and the int32 bias.
///
/// A channel whose weights are all tiny (BatchNorm folding can leave such channels) would get
/// a scale so small that its bias overflows the accumulator; its scale is raised until the
/// bias fits in [`BIAS_LIMIT`]. Its weights then round to few levels, which costs nothing: the
/// channel's output is its bias to within a step.
pub fn conv_int8(w: &[f32], bias: &[f32], input_scale: f32) -> (Vec<i8>, Vec<f32>, Vec<i32>) {
    let channels = bias.len();
    let (_, mut scales) = per_channel_int8(w, channels);
    for (s, b) in scales.iter_mut().zip(bias) {
        *s = s.max(b.abs() / (input_scale * BIAS_LIMIT));
    }
    let per = w.len() / channels;
    let q = w
        .chunks(per)
        .zip(&scales)
        .flat_map(|(row, s)| {
            row.iter()
                .map(move |v| (v / s).round().clamp(-127.0, 127.0) as i8)
        })
        .collect();
    let b = bias_int32(bias, input_scale, &scales);
    (q, scales, b)
}

/// A conv's float bias in the int32 form QLinearConv adds to its accumulator: per output
/// channel, scale `input_scale * weight_scale[c]`, zero point 0.
pub fn bias_int32(bias: &[f32], input_scale: f32, weight_scales: &[f32]) -> Vec<i32> {
    bias.iter()
        .zip(weight_scales)
        .map(|(b, ws)| {
            (*b as f64 / (input_scale as f64 * *ws as f64))
                .round()
                .clamp(i32::MIN as f64, i32::MAX as f64) as i32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn affine_u8_by_hand() {
        // [-1, 3]: scale 4/255, zero point round(1 / (4/255)) = round(63.75) = 64.
        let (s, z) = affine_u8(-1.0, 3.0);
        assert_eq!(s, 4.0 / 255.0);
        assert_eq!(z, 64);
        // ReLU outputs: zero point 0, the top of the range is q = 255.
        let (s, z) = affine_u8(0.0, 6.0);
        assert_eq!((s, z), (6.0 / 255.0, 0));
        // A range that excludes zero is widened to include it.
        assert_eq!(affine_u8(2.0, 5.1), affine_u8(0.0, 5.1));
        assert_eq!(affine_u8(0.0, 0.0), (1.0, 0));
    }

    #[test]
    fn conv_int8_keeps_the_bias_of_a_near_dead_channel_in_range() {
        // Channel 0 is ordinary; channel 1 has weights of 1e-12 and a bias of 2.
        let w = [0.5f32, -0.25, 1e-12, -1e-12];
        let (q, s, b) = conv_int8(&w, &[0.1, 2.0], 0.02);
        assert_eq!(s[0], 0.5 / 127.0);
        assert_eq!(&q[..2], &[127, -64]); // -0.25 / (0.5/127) = -63.5 rounds away from zero
        assert_eq!(
            b[0],
            (0.1f64 / (0.02 * (0.5f64 / 127.0) as f32 as f64)).round() as i32
        );
        // The raised scale makes the bias exactly the limit; the tiny weights become 0.
        assert!(s[1] >= 2.0 / (0.02 * BIAS_LIMIT));
        assert!((b[1] as f32 - BIAS_LIMIT).abs() <= 1.0, "{}", b[1]);
        assert_eq!(&q[2..], &[0, 0]);
    }

    #[test]
    fn bias_int32_by_hand() {
        // 0.5 / (0.01 * 0.1) = 500; -0.25 / (0.01 * 0.5) = -50.
        assert_eq!(bias_int32(&[0.5, -0.25], 0.01, &[0.1, 0.5]), vec![500, -50]);
    }

    #[test]
    fn round_trip_error_is_at_most_half_a_step_per_channel() {
        let w = [0.5f32, -1.0, 0.25, 0.001, 0.002, -0.003, 0.0, 0.0, 0.0];
        let (q, s) = per_channel_int8(&w, 3);
        // By hand: channel scales max|w| / 127 = 1/127 and 0.003/127; an all-zero channel 1.
        assert_eq!(s, vec![1.0 / 127.0, 0.003 / 127.0, 1.0]);
        // 0.5 / (1/127) = 63.5 rounds away from zero; 0.25 -> 31.75 -> 32.
        assert_eq!(&q[..3], &[64, -127, 32]);
        // 0.001 / (0.003/127) = 42.33 -> 42; 0.002 -> 84.67 -> 85.
        assert_eq!(&q[3..6], &[42, 85, -127]);
        assert_eq!(q[1], -127);
        assert_eq!(q[5], -127); // the small channel uses its own full range
        assert_eq!(&q[6..], &[0, 0, 0]);
        assert_eq!(s[2], 1.0);
        for (c, row) in w.chunks(3).enumerate() {
            for (i, v) in row.iter().enumerate() {
                let back = q[c * 3 + i] as f32 * s[c];
                assert!((back - v).abs() <= s[c] / 2.0 + 1e-9, "{v} -> {back}");
            }
        }
    }
}
