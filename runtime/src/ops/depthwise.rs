//! `PetcamDepthwise`: a depthwise convolution on `petcam_shared`'s kernels, weights and bias
//! held by the op, the clamp that follows it (ReLU6) fused into its output.

use std::sync::Arc;

use petcam_shared::depthwise::channels_last;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

use super::{fork, pool_threads, row_band, runs, Frame, MIN_BAND_ROWS, MIN_PER_THREAD};

#[derive(Debug, Clone)]
pub struct PetcamDepthwise {
    pub(crate) frame: Frame,
    /// `C x kh x kw` for channels-first layouts; `kh x kw x C` for channels-last, so a tap's
    /// weights for all channels are adjacent, as the pixels they multiply are.
    pub(crate) weight: Arc<Vec<f32>>,
    pub(crate) bias: Arc<Vec<f32>>,
    pub(crate) threads: usize,
}

impl PartialEq for PetcamDepthwise {
    fn eq(&self, other: &Self) -> bool {
        self.frame == other.frame
            && self.weight == other.weight
            && self.bias == other.bias
            && self.threads == other.threads
    }
}

// Weights and activation bounds are finite, so equality is reflexive.
impl Eq for PetcamDepthwise {}

impl PetcamDepthwise {
    fn run(&self, input: &[f32], output: &mut [f32]) {
        if self.frame.layout.channels_last() {
            return self.run_channels_last(input, output);
        }
        let g = &self.frame.geometry;
        let (in_plane, out_plane, k_len) =
            (g.input_plane_len(), g.output_plane_len(), g.kernel_len());
        let planes = self.frame.batch * g.channels;
        let threads = self
            .threads
            .min(pool_threads())
            .min((planes * out_plane) / MIN_PER_THREAD)
            .clamp(1, planes.max(1));
        let out_w = g.out_w();
        if threads > 1 && g.out_h() >= MIN_BAND_ROWS * threads {
            // Large planes: each thread takes a band of rows of every channel, the same part
            // of the image the matrix products before and after it give that thread, so the
            // activations stay in that core's cache instead of crossing to the other.
            let bounds: Vec<usize> = (0..=threads).map(|t| t * g.out_h() / threads).collect();
            let mut parts: Vec<(usize, Vec<&mut [f32]>)> = (0..threads)
                .map(|t| (t, Vec::with_capacity(planes)))
                .collect();
            for plane in output.chunks_exact_mut(out_plane) {
                let mut rest = plane;
                for (t, part) in parts.iter_mut().enumerate() {
                    let (band, tail) = rest.split_at_mut((bounds[t + 1] - bounds[t]) * out_w);
                    part.1.push(band);
                    rest = tail;
                }
            }
            fork(parts, |(t, bands)| {
                let (band, first_row, last_row) = row_band(g, bounds[t], bounds[t + 1]);
                let mut scratch = Vec::new();
                for (p, o) in bands.into_iter().enumerate() {
                    let c = p % g.channels;
                    let plane = &input[p * in_plane..(p + 1) * in_plane];
                    band.run_channel_with_scratch(
                        c,
                        &plane[first_row * g.in_w..last_row * g.in_w],
                        &self.weight[c * k_len..(c + 1) * k_len],
                        self.bias[c],
                        o,
                        &mut scratch,
                    );
                }
            });
            return;
        }
        // Small planes: contiguous runs of channels, one per thread.
        let per = planes.div_ceil(threads);
        fork(runs(output, out_plane, per), |(first, out)| {
            let mut scratch = Vec::new();
            for (i, o) in out.chunks_exact_mut(out_plane).enumerate() {
                let p = first + i;
                let c = p % g.channels;
                g.run_channel_with_scratch(
                    c,
                    &input[p * in_plane..(p + 1) * in_plane],
                    &self.weight[c * k_len..(c + 1) * k_len],
                    self.bias[c],
                    o,
                    &mut scratch,
                );
            }
        });
    }

    /// Channels-last: each output pixel is `bias + sum over taps of pixel * weight`, all
    /// channels at once; output rows are split over the threads.
    fn run_channels_last(&self, input: &[f32], output: &mut [f32]) {
        let g = &self.frame.geometry;
        let in_image = g.in_h * g.in_w * g.channels;
        debug_assert_eq!(
            output.len(),
            self.frame.batch * g.out_h() * g.out_w() * g.channels
        );
        self.frame.for_each_row(self.threads, output, |n, oy, row| {
            let image = &input[n * in_image..(n + 1) * in_image];
            channels_last::depthwise_row(g, image, &self.weight, &self.bias, oy, row)
        });
    }
}

impl Op for PetcamDepthwise {
    fn name(&self) -> StaticName {
        "PetcamDepthwise".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![self.frame.describe(self.threads)])
    }

    op_as_typed_op!();
}

impl EvalOp for PetcamDepthwise {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let input = input.try_as_plain_ram()?.as_slice::<f32>()?;
        let g = &self.frame.geometry;
        ensure!(input.len() == self.frame.batch * g.channels * g.input_plane_len());
        let mut output = self.frame.output()?;
        self.run(input, output.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?);
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for PetcamDepthwise {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(self.frame.fact()))
    }

    as_op!();
}
