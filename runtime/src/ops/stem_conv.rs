//! `PetcamStemConv`: the dense channels-last convolution with a few input channels that starts
//! the network. Its 3 RGB inputs make tract's im2col and matrix product mostly overhead; here
//! every output pixel sums its taps directly, and the op can read the model's u8 image and
//! normalise it itself instead of a cast and two elementwise operators before it.

use std::sync::Arc;

use petcam_shared::depthwise::channels_last;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

use super::Frame;

#[derive(Debug, Clone)]
pub struct PetcamStemConv {
    pub(crate) frame: Frame,
    /// Input channels (at most [`channels_last::MAX_DENSE_INPUTS`]).
    pub(crate) inputs: usize,
    /// `kh x kw x inputs x C`.
    pub(crate) weight: Arc<Vec<f32>>,
    pub(crate) bias: Arc<Vec<f32>>,
    /// The input is the model's u8 image, normalised here as `(x - offset) * scale`.
    pub(crate) input_affine: Option<(f32, f32)>,
    pub(crate) threads: usize,
}

impl PartialEq for PetcamStemConv {
    fn eq(&self, other: &Self) -> bool {
        self.frame == other.frame
            && self.inputs == other.inputs
            && self.input_affine.map(|(o, s)| (o.to_bits(), s.to_bits()))
                == other.input_affine.map(|(o, s)| (o.to_bits(), s.to_bits()))
            && self.weight == other.weight
            && self.bias == other.bias
            && self.threads == other.threads
    }
}

// Weights and activation bounds are finite, so equality is reflexive.
impl Eq for PetcamStemConv {}

/// The op's input: activations, or the model's u8 image with its normalisation.
#[derive(Clone, Copy)]
enum Image<'a> {
    F32(&'a [f32]),
    U8 {
        data: &'a [u8],
        offset: f32,
        scale: f32,
    },
}

impl<'a> Image<'a> {
    fn len(&self) -> usize {
        match self {
            Image::F32(d) => d.len(),
            Image::U8 { data, .. } => data.len(),
        }
    }

    /// `len` values from `start`.
    fn slice(&self, start: usize, len: usize) -> Image<'a> {
        match *self {
            Image::F32(d) => Image::F32(&d[start..start + len]),
            Image::U8 {
                data,
                offset,
                scale,
            } => Image::U8 {
                data: &data[start..start + len],
                offset,
                scale,
            },
        }
    }
}

impl PetcamStemConv {
    fn run(&self, input: Image, output: &mut [f32]) {
        let g = &self.frame.geometry;
        let in_image = g.in_h * g.in_w * self.inputs;
        debug_assert_eq!(
            output.len(),
            self.frame.batch * g.out_h() * g.out_w() * g.channels
        );
        let (weight, bias) = (&self.weight[..], &self.bias[..]);
        self.frame.for_each_row(self.threads, output, |n, oy, row| {
            match input.slice(n * in_image, in_image) {
                Image::F32(d) => {
                    channels_last::dense_row(g, |i| d[i], self.inputs, weight, bias, oy, row)
                }
                Image::U8 {
                    data,
                    offset,
                    scale,
                } => {
                    let value = |i: usize| (f32::from(data[i]) - offset) * scale;
                    channels_last::dense_row(g, value, self.inputs, weight, bias, oy, row)
                }
            }
        });
    }
}

impl Op for PetcamStemConv {
    fn name(&self) -> StaticName {
        "PetcamStemConv".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![self.frame.describe(self.threads)])
    }

    op_as_typed_op!();
}

impl EvalOp for PetcamStemConv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let plain = input.try_as_plain_ram()?;
        let image = match self.input_affine {
            Some((offset, scale)) => Image::U8 {
                data: plain.as_slice::<u8>()?,
                offset,
                scale,
            },
            None => Image::F32(plain.as_slice::<f32>()?),
        };
        let g = &self.frame.geometry;
        ensure!(image.len() == self.frame.batch * self.inputs * g.input_plane_len());
        let mut output = self.frame.output()?;
        self.run(image, output.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?);
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for PetcamStemConv {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(self.frame.fact()))
    }

    as_op!();
}
