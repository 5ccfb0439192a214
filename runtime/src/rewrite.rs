//! The load-time rewrite that puts petcam's operators ([`crate::ops`]) in a decluttered tract
//! graph, before tract's optimiser.
//!
//! Depthwise layers are a large share of EfficientNet-Lite0's time in tract. The shared kernel
//! is vectorised for the shapes of this network and, unlike tract's depthwise operator, spreads
//! its channels over the threads the model was loaded with. Every float, undilated depthwise
//! `Conv` whose weights are constants becomes a [`PetcamDepthwise`], with the clamp that follows
//! it (ReLU6) fused into its output; the dense channels-last stem with a few inputs becomes a
//! [`PetcamStemConv`], with the image normalisation before it folded in.

use std::sync::Arc;

use petcam_shared::depthwise::channels_last::MAX_DENSE_INPUTS;
use petcam_shared::depthwise::{Activation, DepthwiseConv};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat};
use tract_onnx::tract_core::ops::nn::DataFormat;
use tract_onnx::tract_core::transform::ModelTransform;

use crate::ops::depthwise::PetcamDepthwise;
use crate::ops::stem_conv::PetcamStemConv;
use crate::ops::{Frame, Layout};

/// The rewrite as a tract [`ModelTransform`]: every convolution petcam's operators cover,
/// replaced by one that splits its work over `threads`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rewrite {
    pub threads: usize,
}

impl ModelTransform for Rewrite {
    fn name(&self) -> StaticName {
        "petcam-kernels".into()
    }

    fn transform(&self, model: &mut TypedModel) -> TractResult<()> {
        let done = replace_depthwise(model, self.threads)?;
        tracing::debug!(?done, "petcam operators in the graph");
        Ok(())
    }
}

/// What replaces a convolution.
enum Replacement {
    Depthwise(PetcamDepthwise),
    Stem(PetcamStemConv),
}

impl Replacement {
    fn geometry_mut(&mut self) -> &mut DepthwiseConv {
        match self {
            Self::Depthwise(op) => &mut op.frame.geometry,
            Self::Stem(op) => &mut op.frame.geometry,
        }
    }
}

/// petcam's op for `node`, when it is a convolution one of them covers.
fn replacement(
    model: &TypedModel,
    node: &TypedNode,
    threads: usize,
) -> TractResult<Option<Replacement>> {
    let Some(conv) = node.op_as::<Conv>() else {
        return Ok(None);
    };
    let spec = &conv.pool_spec;
    let (cin, channels) = (conv.input_channels(), conv.output_channels());
    // The stem: dense, a few input channels, channels-last.
    let dense = conv.group == 1
        && cin <= MAX_DENSE_INPUTS
        && matches!(spec.data_format, DataFormat::NHWC | DataFormat::HWC);
    if conv.q_params.is_some()
        || !(dense || (conv.group == cin && cin == channels))
        || conv.kernel_fmt != KernelFormat::OIHW
        || spec.kernel_shape.len() != 2
        || spec.dilations().iter().any(|&d| d != 1)
        || node.inputs.len() != 3
    {
        return Ok(None);
    }
    let fact = model.outlet_fact(node.inputs[0])?;
    let Some(shape) = fact.shape.as_concrete() else {
        return Ok(None);
    };
    let layout = match spec.data_format {
        DataFormat::NCHW => Layout::Nchw,
        DataFormat::CHW => Layout::Chw,
        DataFormat::NHWC => Layout::Nhwc,
        DataFormat::HWC => Layout::Hwc,
    };
    // As [N, C, H, W].
    let (batch, dims) = match (layout, shape) {
        (Layout::Nchw, &[n, c, h, w]) => (n, [c, h, w]),
        (Layout::Chw, &[c, h, w]) => (1, [c, h, w]),
        (Layout::Nhwc, &[n, h, w, c]) => (n, [c, h, w]),
        (Layout::Hwc, &[h, w, c]) => (1, [c, h, w]),
        _ => return Ok(None),
    };
    if fact.datum_type != f32::datum_type() || dims[0] != cin {
        return Ok(None);
    }
    let konst = |i: usize| model.outlet_fact(node.inputs[i]).map(|f| f.konst.clone());
    let (Some(weight), Some(bias)) = (konst(1)?, konst(2)?) else {
        return Ok(None);
    };
    let (kh, kw) = (spec.kernel_shape[0], spec.kernel_shape[1]);
    let per_output = if dense { cin } else { 1 };
    if weight.datum_type() != f32::datum_type() || weight.len() != channels * per_output * kh * kw {
        return Ok(None);
    }
    let bias: Vec<f32> = match bias.len() {
        0 => vec![0.0; channels],
        1 => vec![bias.cast_to_scalar::<f32>()?; channels],
        n if n == channels => bias
            .cast_to::<f32>()?
            .try_as_plain_ram()?
            .as_slice::<f32>()?
            .to_vec(),
        _ => return Ok(None),
    };
    let (h, w) = (dims[1], dims[2]);
    let padding = spec.computed_padding(&[h, w]);
    let strides = spec.strides();
    let geometry = DepthwiseConv {
        channels,
        in_h: h,
        in_w: w,
        kernel_h: kh,
        kernel_w: kw,
        stride_h: strides[0],
        stride_w: strides[1],
        pad_top: padding[0].pad_before,
        pad_left: padding[1].pad_before,
        pad_bottom: padding[0].pad_after,
        pad_right: padding[1].pad_after,
        activation: Activation::None,
    };
    if geometry.out_h() != padding[0].convoluted || geometry.out_w() != padding[1].convoluted {
        return Ok(None);
    }
    let weight = weight.try_as_plain_ram()?.as_slice::<f32>()?;
    let taps = kh * kw;
    let weight = if dense {
        // C x Cin x kh x kw → kh x kw x Cin x C.
        (0..taps * cin * channels)
            .map(|i| {
                let (tap, ci, co) = (i / (cin * channels), i / channels % cin, i % channels);
                weight[(co * cin + ci) * taps + tap]
            })
            .collect()
    } else if layout.channels_last() {
        // C x kh x kw → kh x kw x C.
        (0..taps * channels)
            .map(|i| weight[(i % channels) * taps + i / channels])
            .collect()
    } else {
        weight.to_vec()
    };
    let (weight, bias, threads) = (Arc::new(weight), Arc::new(bias), threads.max(1));
    let frame = Frame {
        geometry,
        batch,
        layout,
    };
    Ok(Some(if dense {
        Replacement::Stem(PetcamStemConv {
            frame,
            inputs: cin,
            weight,
            bias,
            input_affine: None,
            threads,
        })
    } else {
        Replacement::Depthwise(PetcamDepthwise {
            frame,
            weight,
            bias,
            threads,
        })
    }))
}

/// The constant scalar of a `Max` or `Min` node whose other input comes from `from`.
fn scalar_operand(
    model: &TypedModel,
    node: &TypedNode,
    from: usize,
) -> Option<(&'static str, f32)> {
    let op = node.op_as::<TypedBinOp>()?;
    let name = op.0.name();
    if !matches!(name, "Max" | "Min") || node.inputs.len() != 2 {
        return None;
    }
    let other = node.inputs.iter().find(|i| i.node != from)?;
    if node.inputs.iter().filter(|i| i.node == from).count() != 1 {
        return None;
    }
    let k = model.outlet_fact(*other).ok()?.konst.clone()?;
    if k.len() != 1 {
        return None;
    }
    Some((name, k.cast_to_scalar::<f32>().ok()?))
}

/// The clamp (ReLU6 is `Max(x, 0)` then `Min(x, 6)` once decluttered) that follows node `id`
/// and nothing else reads in between: its bounds and the node whose output it ends at.
fn clamp_after(model: &TypedModel, id: usize) -> TractResult<Option<(f32, f32, usize)>> {
    let is_output = |n: usize| model.outputs.contains(&OutletId::new(n, 0));
    let Some(first) = model.single_succ(id)? else {
        return Ok(None);
    };
    let Some(second) = model.single_succ(first.id)? else {
        return Ok(None);
    };
    if is_output(id) || is_output(first.id) {
        return Ok(None);
    }
    let (Some(a), Some(b)) = (
        scalar_operand(model, first, id),
        scalar_operand(model, second, first.id),
    ) else {
        return Ok(None);
    };
    let (lo, hi) = match (a, b) {
        (("Max", lo), ("Min", hi)) | (("Min", hi), ("Max", lo)) => (lo, hi),
        _ => return Ok(None),
    };
    // With lo > hi the two orders differ; leave such a graph to tract.
    Ok((lo <= hi).then_some((lo, hi, second.id)))
}

/// The constant scalar of binary op `node` (`Sub` or `Mul`, named by `name`) whose other
/// input is `from`, the first input for `Sub`.
fn scalar_of(model: &TypedModel, node: &TypedNode, name: &str) -> Option<(OutletId, f32)> {
    let op = node.op_as::<TypedBinOp>()?;
    if op.0.name() != name || node.inputs.len() != 2 {
        return None;
    }
    let konst = |i: usize| {
        let k = model.outlet_fact(node.inputs[i]).ok()?.konst.clone()?;
        (k.len() == 1)
            .then(|| k.cast_to_scalar::<f32>().ok())
            .flatten()
    };
    match (name, konst(0), konst(1)) {
        (_, None, Some(c)) => Some((node.inputs[0], c)),
        ("Mul", Some(c), None) => Some((node.inputs[1], c)),
        _ => None,
    }
}

/// `(x - offset) * scale` of a u8 image cast to floats, when that is what `input` is and
/// nothing else reads the steps in between: the image's outlet, `offset` and `scale`.
fn normalised_image(
    model: &TypedModel,
    input: OutletId,
) -> TractResult<Option<(OutletId, f32, f32)>> {
    let only_one_reader = |n: usize| -> TractResult<bool> {
        Ok(model.single_succ(n)?.is_some() && !model.outputs.iter().any(|o| o.node == n))
    };
    let mul = &model.nodes[input.node];
    let Some((sub_out, scale)) = scalar_of(model, mul, "Mul") else {
        return Ok(None);
    };
    let sub = &model.nodes[sub_out.node];
    let Some((cast_out, offset)) = scalar_of(model, sub, "Sub") else {
        return Ok(None);
    };
    let cast = &model.nodes[cast_out.node];
    let is_cast = cast
        .op_as::<tract_onnx::tract_core::ops::cast::Cast>()
        .is_some_and(|c| c.to == f32::datum_type());
    if !is_cast || cast.inputs.len() != 1 {
        return Ok(None);
    }
    let image = cast.inputs[0];
    if model.outlet_fact(image)?.datum_type != u8::datum_type() {
        return Ok(None);
    }
    for n in [mul.id, sub.id, cast.id] {
        if !only_one_reader(n)? {
            return Ok(None);
        }
    }
    Ok(Some((image, offset, scale)))
}

/// What [`replace_depthwise`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Replaced {
    pub depthwise: usize,
    /// Dense convolutions with few input channels (the stem).
    pub dense: usize,
    /// Input normalisations (u8 cast, subtraction, multiplication) folded into the stem.
    pub normalisations: usize,
    /// Clamps (ReLU6) fused into a replaced depthwise convolution.
    pub clamps: usize,
}

/// Replaces every depthwise convolution of a decluttered `model` that the shared kernel covers,
/// with the clamp that follows it (ReLU6) fused into the kernel's output.
pub fn replace_depthwise(model: &mut TypedModel, threads: usize) -> TractResult<Replaced> {
    let mut done = Replaced::default();
    for id in model.eval_order()? {
        let node = &model.nodes[id];
        let Some(mut op) = replacement(model, node, threads)? else {
            continue;
        };
        let mut output = OutletId::new(id, 0);
        if let Some((min, max, last)) = clamp_after(model, id)? {
            op.geometry_mut().activation = Activation::Clamp { min, max };
            output = OutletId::new(last, 0);
            done.clamps += 1;
        }
        let mut input = node.inputs[0];
        if let Replacement::Stem(stem) = &mut op {
            if let Some((image, offset, scale)) = normalised_image(model, input)? {
                stem.input_affine = Some((offset, scale));
                input = image;
                done.normalisations += 1;
            }
        }
        let mut patch = TypedModelPatch::default();
        let x = patch.tap_model(model, input)?;
        let y = match op {
            Replacement::Depthwise(op) => {
                done.depthwise += 1;
                patch.wire_node(&node.name, op, &[x])?[0]
            }
            Replacement::Stem(op) => {
                done.dense += 1;
                patch.wire_node(&node.name, op, &[x])?[0]
            }
        };
        patch.shunt_outside(model, output, y)?;
        patch.apply(model)?;
    }
    if done.depthwise + done.dense > 0 {
        *model = std::mem::take(model).into_compact()?;
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::tract_core::ops::cnn::{PaddingSpec, PoolSpec};

    /// A one-layer model: a depthwise convolution with random weights and bias.
    fn depthwise_model(
        c: usize,
        hw: (usize, usize),
        (k, stride): (usize, usize),
        padding: PaddingSpec,
        seed: u64,
        relu6: bool,
        channels_last: bool,
    ) -> TypedModel {
        let format = if channels_last {
            DataFormat::NHWC
        } else {
            DataFormat::NCHW
        };
        let conv = conv_op(format, (c, c), c, (k, stride), padding);
        let shape = input_shape(c, hw, channels_last);
        conv_model(
            |m| m.add_source("x", f32::fact(shape)).unwrap(),
            conv,
            seed,
            relu6,
        )
    }

    fn conv_op(
        data_format: DataFormat,
        (input_channels, output_channels): (usize, usize),
        group: usize,
        (k, stride): (usize, usize),
        padding: PaddingSpec,
    ) -> Conv {
        Conv {
            pool_spec: PoolSpec {
                data_format,
                kernel_shape: tvec!(k, k),
                padding,
                dilations: None,
                strides: Some(tvec!(stride, stride)),
                input_channels,
                output_channels,
            },
            kernel_fmt: KernelFormat::OIHW,
            group,
            q_params: None,
        }
    }

    /// `conv` on the input `input` wires, random weights and bias, then ReLU6 if asked.
    fn conv_model(
        input: impl FnOnce(&mut TypedModel) -> OutletId,
        conv: Conv,
        seed: u64,
        relu6: bool,
    ) -> TypedModel {
        let mut rng = seed;
        let mut random = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    rng = rng
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((rng >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
                })
                .collect()
        };
        let (cout, per_group) = (conv.output_channels(), conv.input_channels() / conv.group);
        let k = conv.pool_spec.kernel_shape[0];
        let mut model = TypedModel::default();
        let x = input(&mut model);
        let weights = random(cout * per_group * k * k);
        let w = model
            .add_const(
                "w",
                Tensor::from_shape(&[cout, per_group, k, k], &weights).unwrap(),
            )
            .unwrap();
        let b = model
            .add_const("b", Tensor::from_shape(&[cout], &random(cout)).unwrap())
            .unwrap();
        let mut y = model.wire_node("conv", conv, &[x, w, b]).unwrap();
        if relu6 {
            // As tract declutters ONNX's Clip(0, 6).
            let zero = model.add_const("zero", tensor4(&[[[[0f32]]]])).unwrap();
            let six = model.add_const("six", tensor4(&[[[[6f32]]]])).unwrap();
            y = model
                .wire_node(
                    "max",
                    tract_onnx::tract_core::ops::math::max(),
                    &[y[0], zero],
                )
                .unwrap();
            y = model
                .wire_node(
                    "min",
                    tract_onnx::tract_core::ops::math::min(),
                    &[y[0], six],
                )
                .unwrap();
        }
        model.select_output_outlets(&y).unwrap();
        model
    }

    /// Runs `model` through tract alone and with the replacement on `threads` (as a plan runs
    /// with `RunOptions { executor }`): the largest difference relative to the largest output
    /// (summation orders differ), tract's output and ours.
    fn compare(
        model: TypedModel,
        x: Tensor,
        threads: usize,
        expect: Replaced,
    ) -> (f32, Vec<f32>, Vec<f32>) {
        let mut ours = model.clone().into_decluttered().unwrap();
        assert_eq!(replace_depthwise(&mut ours, threads).unwrap(), expect);
        let tract = model.into_optimized().unwrap().into_runnable().unwrap();
        let ours = ours.into_optimized().unwrap().into_runnable().unwrap();
        let want = tract.run(tvec!(x.clone().into())).unwrap().remove(0);
        let executor = if threads > 1 {
            tract_linalg::multithread::Executor::multithread(threads)
        } else {
            tract_linalg::multithread::Executor::SingleThread
        };
        let got = tract_linalg::multithread::multithread_tract_scope(executor, || {
            ours.run(tvec!(x.into())).unwrap().remove(0)
        });
        assert_eq!(want.shape(), got.shape());
        let want: Vec<f32> = want
            .to_plain_array_view::<f32>()
            .unwrap()
            .iter()
            .copied()
            .collect();
        let got: Vec<f32> = got
            .to_plain_array_view::<f32>()
            .unwrap()
            .iter()
            .copied()
            .collect();
        let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        let worst = want
            .iter()
            .zip(got.iter())
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        (worst / scale, want, got)
    }

    #[test]
    fn the_stem_convolution_matches_tracts_own() {
        // (input channels, output channels, input size, kernel and stride, padding)
        let cases = [
            (
                3,
                32,
                (224, 224),
                (3, 2),
                PaddingSpec::ExplicitOnnxPool(tvec!(1, 1), tvec!(1, 1), false),
            ),
            (3, 40, (33, 20), (3, 2), PaddingSpec::SameUpper),
            (1, 8, (17, 18), (5, 1), PaddingSpec::Valid),
            (
                4,
                70,
                (30, 31),
                (3, 1),
                PaddingSpec::ExplicitOnnxPool(tvec!(0, 2), tvec!(2, 1), false),
            ),
        ];
        for (i, (cin, cout, hw, ks, padding)) in cases.into_iter().enumerate() {
            for (threads, relu6) in [(1, false), (2, false), (1, true), (2, true)] {
                let conv = conv_op(DataFormat::NHWC, (cin, cout), 1, ks, padding.clone());
                let shape = [1, hw.0, hw.1, cin];
                let source = |m: &mut TypedModel| m.add_source("x", f32::fact(shape)).unwrap();
                let model = conv_model(source, conv, i as u64, relu6);
                let x = Tensor::from_shape(&shape, &random_input(shape.iter().product(), i as u32))
                    .unwrap();
                let expect = Replaced {
                    dense: 1,
                    clamps: usize::from(relu6),
                    ..Replaced::default()
                };
                let (worst, want, _) = compare(model, x, threads, expect);
                assert!(
                    worst <= 1e-5,
                    "case {i}, {threads} thread(s), relu6 {relu6}: {worst}"
                );
                if relu6 {
                    assert!(want.contains(&0.0) && want.contains(&6.0));
                }
            }
        }
    }

    #[test]
    fn the_image_normalisation_is_folded_into_the_stem() {
        use tract_onnx::tract_core::ops::{cast::cast, math};
        let shape = [1, 57, 64, 3];
        // The model's input as the exporter writes it: u8, cast, minus 127, times 1/128.
        let normalised = |m: &mut TypedModel| {
            let x = m.add_source("image", u8::fact(shape)).unwrap();
            let x = m.wire_node("cast", cast(f32::datum_type()), &[x]).unwrap();
            let mean = m.add_const("mean", tensor4(&[[[[127f32]]]])).unwrap();
            let x = m.wire_node("sub", math::sub(), &[x[0], mean]).unwrap();
            let scale = m
                .add_const("scale", tensor4(&[[[[1f32 / 128.0]]]]))
                .unwrap();
            m.wire_node("mul", math::mul(), &[x[0], scale]).unwrap()[0]
        };
        let pixels: Vec<u8> = (0..shape.iter().product::<usize>())
            .map(|i| (i * 7919 % 256) as u8)
            .collect();
        for threads in [1, 2] {
            let padding = PaddingSpec::ExplicitOnnxPool(tvec!(1, 1), tvec!(1, 1), false);
            let conv = conv_op(DataFormat::NHWC, (3, 32), 1, (3, 2), padding);
            let model = conv_model(normalised, conv, 7, true);
            let x = Tensor::from_shape(&shape, &pixels).unwrap();
            let expect = Replaced {
                dense: 1,
                normalisations: 1,
                clamps: 1,
                ..Replaced::default()
            };
            let (worst, _, _) = compare(model, x, threads, expect);
            assert!(worst <= 1e-5, "{threads} thread(s): {worst}");
        }
    }

    fn input_shape(c: usize, hw: (usize, usize), channels_last: bool) -> [usize; 4] {
        if channels_last {
            [1, hw.0, hw.1, c]
        } else {
            [1, c, hw.0, hw.1]
        }
    }

    fn random_input(len: usize, seed: u32) -> Vec<f32> {
        // -8..8, so the weighted sums cross both ReLU6 bounds.
        (0..len)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 2001) as f32 / 125.0 - 8.0)
            .collect()
    }

    #[test]
    fn the_shared_kernel_matches_tracts_own_depthwise_on_random_inputs() {
        let cases = [
            (32, (112, 112), 3, 1, PaddingSpec::SameUpper),
            (96, (112, 112), 3, 2, PaddingSpec::SameUpper),
            (144, (56, 56), 5, 2, PaddingSpec::SameUpper),
            (240, (28, 28), 5, 1, PaddingSpec::SameUpper),
            (7, (9, 13), 3, 1, PaddingSpec::Valid),
            // Split into row bands on 2 threads, with uneven padding at both ends.
            (
                6,
                (40, 33),
                5,
                2,
                PaddingSpec::ExplicitOnnxPool(tvec!(2, 1), tvec!(1, 2), false),
            ),
            (9, (37, 20), 3, 1, PaddingSpec::Valid),
            (
                5,
                (10, 11),
                5,
                2,
                PaddingSpec::ExplicitOnnxPool(tvec!(2, 1), tvec!(1, 2), false),
            ),
        ];
        let variants = [(1, false), (2, false), (1, true), (2, true)];
        for (i, (c, hw, k, stride, padding)) in cases.into_iter().enumerate() {
            for ((threads, relu6), channels_last) in
                variants.into_iter().flat_map(|v| [(v, false), (v, true)])
            {
                let model = depthwise_model(
                    c,
                    hw,
                    (k, stride),
                    padding.clone(),
                    i as u64,
                    relu6,
                    channels_last,
                );
                let x = Tensor::from_shape(
                    &input_shape(c, hw, channels_last),
                    &random_input(c * hw.0 * hw.1, i as u32),
                )
                .unwrap();
                let expect = Replaced {
                    depthwise: 1,
                    clamps: usize::from(relu6),
                    ..Replaced::default()
                };
                let (worst, want, got) = compare(model, x, threads, expect);
                assert!(
                    worst <= 1e-5,
                    "case {i}, {threads} thread(s), relu6 {relu6}, channels last \
                     {channels_last}: max difference {worst} of the largest output"
                );
                if relu6 {
                    // Both bounds are reached, so the fused clamp is exercised.
                    assert!(want.contains(&0.0) && want.contains(&6.0));
                    assert!(got.iter().all(|&v| (0.0..=6.0).contains(&v)));
                }
            }
        }
    }
}
