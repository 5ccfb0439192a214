//! Weight quantization for export: per-output-channel symmetric int8.
//!
//! Each output channel `c` of a weight tensor gets its own scale `max|w_c| / 127`, so a channel
//! of small weights keeps its precision instead of sharing the range of the largest channel.
//! The graph restores float weights with a standard `DequantizeLinear` (axis 0); runtimes fold
//! that at load, so the model is ~4x smaller and runs at float speed.

/// How the exported model stores its numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QuantizeForm {
    /// Float32 weights and activations.
    None,
    /// int8 weights (per output channel, symmetric), float activations.
    #[value(name = "int8-weights")]
    Int8Weights,
}

impl QuantizeForm {
    /// The name written into `petcam.quantization` and the report.
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Int8Weights => "int8-weights",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_error_is_at_most_half_a_step_per_channel() {
        let w = [0.5f32, -1.0, 0.25, 0.001, 0.002, -0.003, 0.0, 0.0, 0.0];
        let (q, s) = per_channel_int8(&w, 3);
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
