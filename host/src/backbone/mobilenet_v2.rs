//! MobileNetV2 (Sandler et al., 2018): a 3x3 stem, 17 inverted-residual bottlenecks and a 1x1
//! conv to 1280 channels, at width multipliers 0.35 to 1.0 and any input size that is a
//! multiple of 32.
//!
//! Three sources give the same [`Backbone`]:
//! - torchvision `mobilenet_v2` state dicts (`features.N...`, `classifier.1`),
//! - timm `mobilenetv2_*` state dicts (`conv_stem`, `blocks.S.J...`, `conv_head`),
//! - Google's TensorFlow Lite models ([`import_tflite`]): the u8 weights dequantized, the
//!   BatchNorm that TensorFlow folded into each conv kept as its bias, TensorFlow's SAME padding
//!   (one extra row and column at the bottom and right on stride 2) and the input scaling the
//!   file declares. `petcam import-backbone` writes the result as torchvision-named safetensors
//!   whose metadata keeps the padding and the input scaling.
//!
//! The channel counts are read from the weights, and must match one width multiplier.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::tflite::{self, OpKind, TfliteModel};
use super::weights::{self, TensorMap};
use super::{Activation, Backbone, BackboneError, Block, Classifier, Conv, Normalization, Padding};

/// Width multipliers of the published ImageNet models.
pub const WIDTHS: [f32; 4] = [0.35, 0.5, 0.75, 1.0];

/// (expansion, output channels at width 1.0, blocks, stride of the first block) per stage.
const STAGES: [(usize, usize, usize, usize); 7] = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
];

const BLOCKS: usize = 17;
const BATCH_NORM_EPS: f64 = 1e-5;

/// Safetensors metadata written by [`import_tflite`] and read back by [`load`].
pub const META_PADDING: &str = "petcam.padding";
pub const META_INPUT_MEAN: &str = "petcam.input_mean";
pub const META_INPUT_STD: &str = "petcam.input_std";
const PADDING_TENSORFLOW_SAME: &str = "tensorflow-same";

/// The ImageNet per-channel normalisation of torchvision and timm, in pixel units (0-255).
const IMAGENET_MEAN: [f32; 3] = [123.675, 116.28, 103.53];
const IMAGENET_STD: [f32; 3] = [58.395, 57.12, 57.375];

/// Channels rounded to a multiple of 8, never down by more than 10% (torchvision, timm and
/// TensorFlow all use this rule).
pub fn make_divisible(v: f32) -> usize {
    let rounded = (((v + 4.0) as usize) / 8 * 8).max(8);
    if (rounded as f32) < 0.9 * v {
        rounded + 8
    } else {
        rounded
    }
}

/// Output channels of the stem and of each of the 17 blocks at a width multiplier.
pub fn channels(width: f32) -> (usize, Vec<usize>) {
    let stem = make_divisible(32.0 * width);
    let blocks = STAGES
        .iter()
        .flat_map(|&(_, c, n, _)| std::iter::repeat_n(make_divisible(c as f32 * width), n))
        .collect();
    (stem, blocks)
}

/// How a source pads its convolutions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaddingMode {
    /// PyTorch: `(k - 1) / 2` on every side.
    Symmetric,
    /// TensorFlow SAME: output = ceil(input / stride), the odd row and column at the end.
    TensorflowSame,
}

impl PaddingMode {
    /// The padding of a `k`x`k` convolution with `stride` over an `input`-sized square.
    pub fn padding(self, input: usize, k: usize, stride: usize) -> Padding {
        match self {
            Self::Symmetric => Padding::symmetric((k - 1) / 2),
            Self::TensorflowSame => {
                let out = input.div_ceil(stride);
                let total = ((out - 1) * stride + k).saturating_sub(input);
                let (before, after) = (total / 2, total - total / 2);
                Padding {
                    top: before,
                    left: before,
                    bottom: after,
                    right: after,
                }
            }
        }
    }
}

/// Which parameter names a state dict uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Naming {
    Torchvision,
    Timm,
}

/// Where one convolution's parameters are: the conv's prefix and its BatchNorm's.
struct ConvNames {
    conv: String,
    norm: String,
}

impl Naming {
    fn detect(tensors: &TensorMap) -> Option<Self> {
        if tensors.contains_key("features.0.0.weight") {
            Some(Self::Torchvision)
        } else if tensors.contains_key("conv_stem.weight") {
            Some(Self::Timm)
        } else {
            None
        }
    }

    fn stem(self) -> ConvNames {
        match self {
            Self::Torchvision => names("features.0.0", "features.0.1"),
            Self::Timm => names("conv_stem", "bn1"),
        }
    }

    /// Block `i` (0..17): (expand, depthwise, project); no expansion in the first block.
    fn block(self, i: usize) -> (Option<ConvNames>, ConvNames, ConvNames) {
        match self {
            Self::Torchvision => {
                let p = format!("features.{}.conv", i + 1);
                if i == 0 {
                    (
                        None,
                        names(&format!("{p}.0.0"), &format!("{p}.0.1")),
                        names(&format!("{p}.1"), &format!("{p}.2")),
                    )
                } else {
                    (
                        Some(names(&format!("{p}.0.0"), &format!("{p}.0.1"))),
                        names(&format!("{p}.1.0"), &format!("{p}.1.1")),
                        names(&format!("{p}.2"), &format!("{p}.3")),
                    )
                }
            }
            Self::Timm => {
                let (stage, j) = stage_of(i);
                let p = format!("blocks.{stage}.{j}");
                if i == 0 {
                    (
                        None,
                        names(&format!("{p}.conv_dw"), &format!("{p}.bn1")),
                        names(&format!("{p}.conv_pw"), &format!("{p}.bn2")),
                    )
                } else {
                    (
                        Some(names(&format!("{p}.conv_pw"), &format!("{p}.bn1"))),
                        names(&format!("{p}.conv_dw"), &format!("{p}.bn2")),
                        names(&format!("{p}.conv_pwl"), &format!("{p}.bn3")),
                    )
                }
            }
        }
    }

    fn head(self) -> ConvNames {
        match self {
            Self::Torchvision => names("features.18.0", "features.18.1"),
            Self::Timm => names("conv_head", "bn2"),
        }
    }

    fn classifier(self) -> &'static str {
        match self {
            Self::Torchvision => "classifier.1",
            Self::Timm => "classifier",
        }
    }
}

fn names(conv: &str, norm: &str) -> ConvNames {
    ConvNames {
        conv: conv.to_owned(),
        norm: norm.to_owned(),
    }
}

/// (stage, index in stage) of block `i`.
fn stage_of(i: usize) -> (usize, usize) {
    let mut first = 0;
    for (s, &(_, _, n, _)) in STAGES.iter().enumerate() {
        if i < first + n {
            return (s, i - first);
        }
        first += n;
    }
    unreachable!("MobileNetV2 has {BLOCKS} blocks")
}

/// What to build: the input size, and optionally the width multiplier the weights must have.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub input_size: usize,
    pub width: Option<f32>,
}

/// Builds MobileNetV2 from a `.tflite`, `.safetensors` or `.pth` file.
pub fn load(path: &Path, options: Options, device: &Device) -> Result<Backbone, BackboneError> {
    let data = std::fs::read(path).map_err(|source| weights::WeightsError::Io {
        path: path.to_owned(),
        source,
    })?;
    let (tensors, meta, sha) = if tflite::is_tflite(&data) {
        let model = TfliteModel::parse(&data).map_err(|e| format_err(path, e.to_string()))?;
        let (tensors, meta) = import_tflite(&model).map_err(|e| format_err(path, e))?;
        (tensors, meta, weights::sha256_hex(&data))
    } else {
        let w = weights::parse(path, &data)?;
        (w.tensors, w.metadata, w.sha256)
    };
    build(&tensors, &meta, options, sha)
        .and_then(|b| Ok(b.to_device(device)?))
        .map_err(|e| match e {
            BackboneError::Forward(source) => BackboneError::Parameter {
                path: path.to_owned(),
                name: "mobilenet-v2".into(),
                source: Box::new(source),
            },
            other => other,
        })
}

fn format_err(path: &Path, what: impl Into<String>) -> BackboneError {
    BackboneError::Weights(weights::WeightsError::Format {
        path: path.to_owned(),
        what: what.into(),
    })
}

fn msg(what: impl Into<String>) -> BackboneError {
    BackboneError::Forward(candle_core::Error::Msg(what.into()))
}

fn get<'a>(tensors: &'a TensorMap, name: &str) -> Result<&'a Tensor, BackboneError> {
    tensors
        .get(name)
        .ok_or_else(|| msg(format!("no tensor {name}")))
}

/// A convolution from its weight and either a BatchNorm (folded) or a bias.
fn conv(
    tensors: &TensorMap,
    n: &ConvNames,
    stride: usize,
    padding: Padding,
    activation: Activation,
) -> Result<Conv, BackboneError> {
    let weight = get(tensors, &format!("{}.weight", n.conv))?.to_dtype(DType::F32)?;
    if weight.rank() != 4 {
        return Err(msg(format!(
            "{}.weight has shape {:?}, expected 4 dimensions",
            n.conv,
            weight.dims()
        )));
    }
    let cout = weight.dim(0)?;
    let mean = format!("{}.running_mean", n.norm);
    let (weight, bias) = if tensors.contains_key(&mean) {
        let bn = |p: &str| -> Result<Tensor, BackboneError> {
            let t = get(tensors, &format!("{}.{p}", n.norm))?.to_dtype(DType::F32)?;
            if t.dims() != [cout] {
                return Err(msg(format!(
                    "{}.{p} has shape {:?}, expected [{cout}]",
                    n.norm,
                    t.dims()
                )));
            }
            Ok(t)
        };
        Conv::fold_batch_norm(
            &weight,
            &bn("weight")?,
            &bn("bias")?,
            &bn("running_mean")?,
            &bn("running_var")?,
            BATCH_NORM_EPS,
        )?
    } else {
        let bias = get(tensors, &format!("{}.bias", n.conv))
            .map_err(|_| {
                msg(format!(
                    "neither {mean} (BatchNorm) nor {}.bias (folded) is present",
                    n.conv
                ))
            })?
            .to_dtype(DType::F32)?;
        (weight, bias)
    };
    let groups = if weight.dim(1)? == 1 && cout > 1 {
        cout
    } else {
        1
    };
    Ok(Conv {
        weight,
        bias,
        stride,
        padding,
        groups,
        activation,
    })
}

fn build(
    tensors: &TensorMap,
    meta: &HashMap<String, String>,
    options: Options,
    weights_sha256: String,
) -> Result<Backbone, BackboneError> {
    let size = options.input_size;
    super::check_input_size(size)?;
    let naming = Naming::detect(tensors).ok_or_else(|| {
        let mut some: Vec<_> = tensors.keys().take(5).cloned().collect();
        some.sort();
        msg(format!(
            "no MobileNetV2 parameters (torchvision features.0.0.weight or timm \
             conv_stem.weight); the file has {} tensors, e.g. {some:?}",
            tensors.len()
        ))
    })?;
    let mode = match meta.get(META_PADDING).map(String::as_str) {
        Some(PADDING_TENSORFLOW_SAME) => PaddingMode::TensorflowSame,
        Some(other) => return Err(msg(format!("unknown {META_PADDING} {other:?}"))),
        None => PaddingMode::Symmetric,
    };
    let declared = |key: &str| -> Result<Option<f32>, BackboneError> {
        meta.get(key)
            .map(|v| {
                v.parse::<f32>()
                    .map_err(|_| msg(format!("{key} is {v:?}, not a number")))
            })
            .transpose()
    };

    let relu6 = Activation::Relu6;
    let mut hw = size;
    let mut at = |k: usize, stride: usize| {
        let p = mode.padding(hw, k, stride);
        hw = hw.div_ceil(stride);
        p
    };
    let mut stem = conv(tensors, &naming.stem(), 2, at(3, 2), relu6)?;
    let mut blocks = Vec::with_capacity(BLOCKS);
    let mut cin = stem.out_channels();
    let mut i = 0;
    for &(t, _, n, s) in &STAGES {
        for r in 0..n {
            let stride = if r == 0 { s } else { 1 };
            let (e, d, p) = naming.block(i);
            let expand = match (t, e) {
                (1, _) => None,
                (_, Some(e)) => Some(conv(tensors, &e, 1, Padding::symmetric(0), relu6)?),
                (_, None) => unreachable!("only the first block does not expand"),
            };
            let depthwise = conv(tensors, &d, stride, at(3, stride), relu6)?;
            let project = conv(tensors, &p, 1, Padding::symmetric(0), Activation::Linear)?;
            let cout = project.out_channels();
            blocks.push(Block {
                expand,
                depthwise,
                project,
                residual: stride == 1 && cin == cout,
            });
            cin = cout;
            i += 1;
        }
    }
    let head = conv(tensors, &naming.head(), 1, Padding::symmetric(0), relu6)?;
    check_shapes(&stem, &blocks, &head)?;
    let width = width_of(&stem, &blocks)?;
    if let Some(w) = options.width {
        if (w - width).abs() > 1e-6 {
            return Err(BackboneError::Width {
                asked: w,
                found: width,
            });
        }
    }

    let normalization = match (declared(META_INPUT_MEAN)?, declared(META_INPUT_STD)?) {
        (Some(mean), Some(std)) => Normalization { mean, std },
        _ => {
            // torchvision and timm normalise each channel with ImageNet statistics; petcam's
            // models take one mean and std, so the per-channel part is folded into the stem.
            let n = Normalization {
                mean: IMAGENET_MEAN.iter().sum::<f32>() / 3.0,
                std: IMAGENET_STD.iter().sum::<f32>() / 3.0,
            };
            stem = fold_channel_normalization(stem, n)?;
            n
        }
    };

    let classifier = match (
        tensors.get(&format!("{}.weight", naming.classifier())),
        tensors.get(&format!("{}.bias", naming.classifier())),
    ) {
        (Some(w), Some(b)) if w.rank() == 2 && w.dim(1)? == head.out_channels() => {
            Some(Classifier {
                weight: w.to_dtype(DType::F32)?,
                bias: b.to_dtype(DType::F32)?,
            })
        }
        _ => None,
    };
    Ok(Backbone {
        name: format!("mobilenet-v2-{}", width_label(width)),
        input_size: size,
        normalization,
        stem,
        blocks,
        head,
        classifier,
        weights_sha256,
    })
}

/// `1.0`, `0.75`, `0.5`, `0.35`.
pub fn width_label(w: f32) -> String {
    if w == 1.0 {
        "1.0".into()
    } else {
        format!("{w}")
    }
}

/// Each conv's input channels must be the previous layer's output channels.
fn check_shapes(stem: &Conv, blocks: &[Block], head: &Conv) -> Result<(), BackboneError> {
    let expect = |conv: &Conv, cin: usize, what: &str| -> Result<(), BackboneError> {
        let d = conv.weight.dims();
        let got = if conv.groups > 1 { conv.groups } else { d[1] };
        if got != cin {
            return Err(msg(format!(
                "{what} takes {got} channels but receives {cin}: the weights are not a MobileNetV2"
            )));
        }
        if conv.bias.dims() != [d[0]] {
            return Err(msg(format!("{what}: bias of shape {:?}", conv.bias.dims())));
        }
        Ok(())
    };
    expect(stem, 3, "the stem")?;
    let mut cin = stem.out_channels();
    for (i, b) in blocks.iter().enumerate() {
        if let Some(e) = &b.expand {
            expect(e, cin, &format!("block {i}'s expansion"))?;
            cin = e.out_channels();
        }
        if b.depthwise.groups != cin || b.depthwise.kernel_size() != 3 {
            return Err(msg(format!(
                "block {i}'s depthwise conv has shape {:?} for {cin} channels",
                b.depthwise.weight.dims()
            )));
        }
        expect(&b.project, cin, &format!("block {i}'s projection"))?;
        cin = b.project.out_channels();
    }
    expect(head, cin, "the head conv")
}

/// The width multiplier whose channel counts the weights have.
fn width_of(stem: &Conv, blocks: &[Block]) -> Result<f32, BackboneError> {
    let found: Vec<usize> = blocks.iter().map(|b| b.project.out_channels()).collect();
    WIDTHS
        .iter()
        .copied()
        .find(|&w| channels(w) == (stem.out_channels(), found.clone()))
        .ok_or_else(|| {
            msg(format!(
                "stem {} and block channels {found:?} match no MobileNetV2 width ({WIDTHS:?})",
                stem.out_channels()
            ))
        })
}

/// Rewrites a stem that expects `(pixel - mean[c]) / std[c]` per channel so that it takes the
/// common `(pixel - n.mean) / n.std`: exact everywhere but the zero padding at the image's
/// border, which now stands for pixel value `n.mean` (114.5) instead of each channel's mean
/// (within 11 of it).
fn fold_channel_normalization(stem: Conv, n: Normalization) -> Result<Conv, BackboneError> {
    // x_c = (p - m_c) / s_c = x' * (S / s_c) + (M - m_c) / s_c, with x' = (p - M) / S.
    let device = stem.weight.device().clone();
    let scale: Vec<f32> = IMAGENET_STD.iter().map(|s| n.std / s).collect();
    let shift: Vec<f32> = IMAGENET_MEAN
        .iter()
        .zip(IMAGENET_STD)
        .map(|(m, s)| (n.mean - m) / s)
        .collect();
    let scale = Tensor::from_vec(scale, (1, 3, 1, 1), &device)?;
    let shift = Tensor::from_vec(shift, (1, 3, 1, 1), &device)?;
    let bias = (&stem.bias + stem.weight.broadcast_mul(&shift)?.sum((1, 2, 3))?)?;
    let weight = stem.weight.broadcast_mul(&scale)?;
    Ok(Conv {
        weight,
        bias,
        ..stem
    })
}

/// The MobileNetV2 in a TFLite model as torchvision-named tensors (convs with the BatchNorm
/// folded into their biases), plus the metadata that records TensorFlow's padding and the
/// input scaling the file declares.
///
/// The graph must be a MobileNetV2: a stem conv, 17 blocks of (1x1 expansion, except in the
/// first,) depthwise, 1x1 projection and residual addition where shapes allow, a 1x1 conv,
/// average pooling and a classifier (1x1 conv or fully connected).
pub fn import_tflite(m: &TfliteModel) -> Result<(TensorMap, HashMap<String, String>), String> {
    let mut tensors = TensorMap::new();
    let mut meta = HashMap::new();
    let ops = &m.operators;
    let input = *m.inputs.first().ok_or("the model has no input")?;
    let q = m
        .tensors
        .get(input as usize)
        .ok_or("the input tensor is missing")?
        .quantization
        .clone()
        .filter(|q| !q.scale.is_empty());
    let (mean, std) = match q {
        Some(q) => (
            q.zero_point.first().copied().unwrap_or(0) as f32,
            1.0 / q.scale[0],
        ),
        // Float TFLite MobileNets take (pixel - 127.5) / 127.5.
        None => (127.5, 127.5),
    };
    meta.insert(META_PADDING.into(), PADDING_TENSORFLOW_SAME.into());
    meta.insert(META_INPUT_MEAN.into(), mean.to_string());
    meta.insert(META_INPUT_STD.into(), std.to_string());

    let mut next = 0;
    let take =
        |next: &mut usize, expect: &str, ok: &dyn Fn(&OpKind) -> bool| -> Result<usize, String> {
            let i = *next;
            let op = ops
                .get(i)
                .ok_or_else(|| format!("the graph ends where {expect} should be"))?;
            if !ok(&op.kind) {
                return Err(format!(
                    "operator {i} is {:?} where {expect} should be",
                    op.kind
                ));
            }
            *next += 1;
            Ok(i)
        };
    let is_conv = |k: &OpKind| matches!(k, OpKind::Conv2d { .. });
    let is_dw = |k: &OpKind| matches!(k, OpKind::DepthwiseConv2d { .. });
    let tv = Naming::Torchvision;
    const RELU6: tflite::Activation = tflite::Activation::Relu6;

    let stem = take(&mut next, "the stem conv", &is_conv)?;
    if ops[stem].inputs.first() != Some(&input) {
        return Err("the first conv does not read the model's input".into());
    }
    put_conv(m, stem, &tv.stem().conv, RELU6, &mut tensors)?;
    let mut x = ops[stem].outputs[0];
    for i in 0..BLOCKS {
        let (e, d, p) = tv.block(i);
        let block_input = x;
        if let Some(e) = e {
            let op = take(&mut next, "a 1x1 expansion conv", &is_conv)?;
            put_conv(m, op, &e.conv, RELU6, &mut tensors)?;
        }
        let op = take(&mut next, "a depthwise conv", &is_dw)?;
        put_conv(m, op, &d.conv, RELU6, &mut tensors)?;
        let op = take(&mut next, "a 1x1 projection conv", &is_conv)?;
        put_conv(m, op, &p.conv, tflite::Activation::None, &mut tensors)?;
        x = ops[op].outputs[0];
        if let Some(add) = ops
            .get(next)
            .filter(|o| matches!(o.kind, OpKind::Add { .. }))
        {
            if add.inputs.contains(&block_input) && add.inputs.contains(&x) {
                x = add.outputs[0];
                next += 1;
            }
        }
    }
    let head = take(&mut next, "the 1x1 conv to 1280 channels", &is_conv)?;
    put_conv(m, head, &tv.head().conv, RELU6, &mut tensors)?;
    take(&mut next, "the average pooling", &|k| {
        matches!(k, OpKind::AveragePool2d)
    })?;
    if let Ok(top) = take(&mut next, "the classifier", &|k| {
        matches!(k, OpKind::Conv2d { .. } | OpKind::FullyConnected)
    }) {
        let (w, b) = weight_and_bias(m, top)?;
        let classes = w.dim(0).map_err(|e| e.to_string())?;
        let w = w.reshape((classes, ())).map_err(|e| e.to_string())?;
        tensors.insert(format!("{}.weight", tv.classifier()), w);
        tensors.insert(format!("{}.bias", tv.classifier()), b);
    }
    Ok((tensors, meta))
}

/// Dequantized weight (PyTorch layout: OIHW, depthwise `[C, 1, kh, kw]`) and bias of a conv.
fn weight_and_bias(m: &TfliteModel, op: usize) -> Result<(Tensor, Tensor), String> {
    let o = &m.operators[op];
    let read = |k: usize, what: &str| -> Result<(Vec<f32>, Vec<usize>), String> {
        let t = *o
            .inputs
            .get(k)
            .filter(|&&t| t >= 0)
            .ok_or_else(|| format!("operator {op} has no {what}"))? as usize;
        let values = m
            .dequantized(t)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("operator {op}'s {what} has no data"))?;
        Ok((values, m.tensors[t].shape.clone()))
    };
    let (w, shape) = read(1, "weight")?;
    let (b, _) = read(2, "bias")?;
    let w = Tensor::from_vec(w, shape.as_slice(), &Device::Cpu).map_err(|e| e.to_string())?;
    let w = match (&o.kind, shape.len()) {
        // [1, kh, kw, C] -> [C, 1, kh, kw]
        (OpKind::DepthwiseConv2d { .. }, 4) => w.permute((3, 0, 1, 2)),
        // [O, kh, kw, I] -> [O, I, kh, kw]
        (OpKind::Conv2d { .. }, 4) => w.permute((0, 3, 1, 2)),
        (OpKind::FullyConnected, 2) => Ok(w),
        (kind, rank) => return Err(format!("operator {op} ({kind:?}) has a {rank}-d weight")),
    }
    .and_then(|w| w.contiguous())
    .map_err(|e| e.to_string())?;
    let b = Tensor::new(b, &Device::Cpu).map_err(|e| e.to_string())?;
    Ok((w, b))
}

/// Checks a conv's options against MobileNetV2 and stores its weight and folded bias.
fn put_conv(
    m: &TfliteModel,
    op: usize,
    name: &str,
    expected: tflite::Activation,
    out: &mut TensorMap,
) -> Result<(), String> {
    let (padding, activation) = match m.operators[op].kind {
        OpKind::Conv2d {
            padding,
            activation,
            ..
        }
        | OpKind::DepthwiseConv2d {
            padding,
            activation,
            ..
        } => (padding, activation),
        _ => unreachable!("put_conv is only called on convolutions"),
    };
    if padding != tflite::Padding::Same {
        return Err(format!("operator {op} ({name}) does not use SAME padding"));
    }
    if activation != expected {
        return Err(format!(
            "operator {op} ({name}) has activation {activation:?}, MobileNetV2 uses {expected:?}"
        ));
    }
    let (w, b) = weight_and_bias(m, op)?;
    out.insert(format!("{name}.weight"), w);
    out.insert(format!("{name}.bias"), b);
    Ok(())
}

/// Writes tensors and metadata as a safetensors file.
pub fn save_safetensors(
    tensors: &TensorMap,
    meta: &HashMap<String, String>,
    path: &Path,
) -> Result<(), String> {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let data: Vec<(String, Vec<u8>, Vec<usize>)> = names
        .iter()
        .map(|n| {
            let t = &tensors[*n];
            let v: Vec<f32> = t
                .flatten_all()
                .and_then(|t| t.to_vec1())
                .map_err(|e| format!("{n}: {e}"))?;
            let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            Ok(((*n).clone(), bytes, t.dims().to_vec()))
        })
        .collect::<Result<_, String>>()?;
    let views = data
        .iter()
        .map(|(n, bytes, shape)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|v| (n.clone(), v))
                .map_err(|e| format!("{n}: {e}"))
        })
        .collect::<Result<Vec<_>, String>>()?;
    safetensors::tensor::serialize_to_file(views, &Some(meta.clone()), path)
        .map_err(|e| format!("writing {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_counts_follow_the_published_widths() {
        assert_eq!(
            channels(1.0),
            (
                32,
                vec![16, 24, 24, 32, 32, 32, 64, 64, 64, 64, 96, 96, 96, 160, 160, 160, 320]
            )
        );
        // torchvision's mobilenet_v2(width_mult=0.35): 16, then 8, 8, 16, 24, 32, 56, 112.
        let (stem, blocks) = channels(0.35);
        assert_eq!(stem, 16);
        assert_eq!(
            blocks,
            vec![8, 8, 8, 16, 16, 16, 24, 24, 24, 24, 32, 32, 32, 56, 56, 56, 112]
        );
        assert_eq!(channels(0.75).0, 24);
        assert_eq!(channels(0.5).1[16], 160);
    }

    #[test]
    fn tensorflow_same_pads_the_end_on_stride_two() {
        let tf = PaddingMode::TensorflowSame;
        assert_eq!(
            tf.padding(224, 3, 2),
            Padding {
                top: 0,
                left: 0,
                bottom: 1,
                right: 1
            }
        );
        assert_eq!(tf.padding(7, 3, 2), Padding::symmetric(1));
        assert_eq!(tf.padding(56, 3, 1), Padding::symmetric(1));
        assert_eq!(
            PaddingMode::Symmetric.padding(224, 3, 2),
            Padding::symmetric(1)
        );
    }

    /// A random torchvision `mobilenet_v2` state dict at `width`, with BatchNorm.
    fn torchvision_state_dict(width: f32, seed: u64) -> TensorMap {
        let mut rng = seed;
        let mut rand = |n: usize, lo: f32, hi: f32| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    rng = rng
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    lo + (hi - lo) * ((rng >> 40) as f32 / (1u64 << 24) as f32)
                })
                .collect()
        };
        let mut m = TensorMap::new();
        let mut conv_bn = |m: &mut TensorMap, conv: String, bn: String, shape: [usize; 4]| {
            let n: usize = shape.iter().product();
            let fan_in = (shape[1] * shape[2] * shape[3]) as f32;
            let s = (3.0 / fan_in).sqrt();
            let t =
                |v: Vec<f32>, shape: &[usize]| Tensor::from_vec(v, shape, &Device::Cpu).unwrap();
            m.insert(format!("{conv}.weight"), t(rand(n, -s, s), &shape));
            let c = shape[0];
            m.insert(format!("{bn}.weight"), t(rand(c, 0.5, 1.5), &[c]));
            m.insert(format!("{bn}.bias"), t(rand(c, -0.2, 0.2), &[c]));
            m.insert(format!("{bn}.running_mean"), t(rand(c, -0.2, 0.2), &[c]));
            m.insert(format!("{bn}.running_var"), t(rand(c, 0.5, 1.5), &[c]));
        };
        let (stem, outs) = channels(width);
        conv_bn(
            &mut m,
            "features.0.0".into(),
            "features.0.1".into(),
            [stem, 3, 3, 3],
        );
        let mut cin = stem;
        let expansions = STAGES
            .iter()
            .flat_map(|&(t, _, n, _)| std::iter::repeat_n(t, n));
        for (i, (cout, t)) in outs.iter().zip(expansions).enumerate() {
            let p = format!("features.{}.conv", i + 1);
            let hidden = cin * t;
            if t == 1 {
                conv_bn(
                    &mut m,
                    format!("{p}.0.0"),
                    format!("{p}.0.1"),
                    [cin, 1, 3, 3],
                );
                conv_bn(
                    &mut m,
                    format!("{p}.1"),
                    format!("{p}.2"),
                    [*cout, cin, 1, 1],
                );
            } else {
                conv_bn(
                    &mut m,
                    format!("{p}.0.0"),
                    format!("{p}.0.1"),
                    [hidden, cin, 1, 1],
                );
                conv_bn(
                    &mut m,
                    format!("{p}.1.0"),
                    format!("{p}.1.1"),
                    [hidden, 1, 3, 3],
                );
                conv_bn(
                    &mut m,
                    format!("{p}.2"),
                    format!("{p}.3"),
                    [*cout, hidden, 1, 1],
                );
            }
            cin = *cout;
        }
        conv_bn(
            &mut m,
            "features.18.0".into(),
            "features.18.1".into(),
            [1280, cin, 1, 1],
        );
        m
    }

    /// torchvision's names in timm's spelling, written out independently of [`Naming`].
    fn timm_name(tv: &str) -> String {
        let sizes = [1, 2, 3, 4, 3, 3, 1];
        let parts: Vec<&str> = tv.split('.').collect();
        let (layer, param) = (parts[..parts.len() - 1].join("."), parts[parts.len() - 1]);
        let fixed = [
            ("features.0.0", "conv_stem"),
            ("features.0.1", "bn1"),
            ("features.18.0", "conv_head"),
            ("features.18.1", "bn2"),
            ("features.1.conv.0.0", "blocks.0.0.conv_dw"),
            ("features.1.conv.0.1", "blocks.0.0.bn1"),
            ("features.1.conv.1", "blocks.0.0.conv_pw"),
            ("features.1.conv.2", "blocks.0.0.bn2"),
        ];
        if let Some((_, t)) = fixed.iter().find(|(t, _)| *t == layer) {
            return format!("{t}.{param}");
        }
        let k: usize = parts[1].parse().unwrap();
        let (mut stage, mut j) = (0, k - 1);
        while j >= sizes[stage] {
            j -= sizes[stage];
            stage += 1;
        }
        let part = match &parts[3..parts.len() - 1] {
            ["0", "0"] => "conv_pw",
            ["0", "1"] => "bn1",
            ["1", "0"] => "conv_dw",
            ["1", "1"] => "bn2",
            ["2"] => "conv_pwl",
            ["3"] => "bn3",
            other => panic!("{other:?}"),
        };
        format!("blocks.{stage}.{j}.{part}.{param}")
    }

    fn features(tensors: &TensorMap, width: Option<f32>) -> (Backbone, Tensor) {
        let options = Options {
            input_size: 96,
            width,
        };
        let b = build(tensors, &HashMap::new(), options, String::new()).unwrap();
        let rgb: Vec<u8> = (0..96 * 96 * 3).map(|i| (i * 131 % 256) as u8).collect();
        let rgb = Tensor::from_vec(rgb, (1, 96, 96, 3), &Device::Cpu).unwrap();
        let f = b.features(&rgb).unwrap();
        (b, f)
    }

    #[test]
    fn torchvision_and_timm_names_give_the_same_network_at_any_width() {
        for (width, seed) in [(0.5, 1), (1.0, 2)] {
            let tv = torchvision_state_dict(width, seed);
            let timm: TensorMap = tv.iter().map(|(k, v)| (timm_name(k), v.clone())).collect();
            assert_eq!(timm.len(), tv.len());
            let (b, a) = features(&tv, None);
            assert_eq!(b.name, format!("mobilenet-v2-{}", width_label(width)));
            assert_eq!(b.blocks.iter().filter(|b| b.residual).count(), 10);
            assert_eq!(b.stem.padding, Padding::symmetric(1));
            let (_, c) = features(&timm, Some(width));
            let diff: f32 = crate::test_support::max_abs_diff(&a, &c);
            assert_eq!(diff, 0.0, "width {width}");
        }
        // Wrong width asked for, and a tensor missing: errors that name them.
        let tv = torchvision_state_dict(0.5, 3);
        let e = build(
            &tv,
            &HashMap::new(),
            Options {
                input_size: 96,
                width: Some(0.75),
            },
            String::new(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("0.75"), "{e}");
        let mut broken = tv.clone();
        broken.remove("features.5.conv.1.1.running_var");
        let e = build(
            &broken,
            &HashMap::new(),
            Options {
                input_size: 96,
                width: None,
            },
            String::new(),
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("features.5.conv.1.1.running_var"),
            "{e}"
        );
    }

    #[test]
    fn per_channel_normalisation_folds_into_the_stem_exactly_away_from_the_border() {
        let tv = torchvision_state_dict(1.0, 4);
        let n = |p: &str| format!("features.0.{p}");
        let (w, b) = Conv::fold_batch_norm(
            &tv[&n("0.weight")],
            &tv[&n("1.weight")],
            &tv[&n("1.bias")],
            &tv[&n("1.running_mean")],
            &tv[&n("1.running_var")],
            BATCH_NORM_EPS,
        )
        .unwrap();
        let stem = Conv {
            weight: w.clone(),
            bias: b.clone(),
            stride: 1,
            padding: Padding::symmetric(1),
            groups: 1,
            activation: Activation::Linear,
        };
        let common = Normalization {
            mean: 114.5,
            std: 57.6,
        };
        let folded = fold_channel_normalization(stem.clone(), common).unwrap();
        let pixels = Tensor::from_vec(
            (0..3 * 16 * 16)
                .map(|i| (i * 97 % 256) as f32)
                .collect::<Vec<_>>(),
            (1, 3, 16, 16),
            &Device::Cpu,
        )
        .unwrap();
        let per_channel = pixels
            .broadcast_sub(
                &Tensor::from_vec(IMAGENET_MEAN.to_vec(), (1, 3, 1, 1), &Device::Cpu).unwrap(),
            )
            .unwrap()
            .broadcast_div(
                &Tensor::from_vec(IMAGENET_STD.to_vec(), (1, 3, 1, 1), &Device::Cpu).unwrap(),
            )
            .unwrap();
        let shared = ((pixels - common.mean as f64).unwrap() / common.std as f64).unwrap();
        let a = stem
            .forward(&per_channel)
            .unwrap()
            .narrow(2, 1, 14)
            .unwrap()
            .narrow(3, 1, 14)
            .unwrap();
        let b = folded
            .forward(&shared)
            .unwrap()
            .narrow(2, 1, 14)
            .unwrap()
            .narrow(3, 1, 14)
            .unwrap();
        let diff: f32 = crate::test_support::max_abs_diff(&a, &b);
        assert!(diff < 1e-4, "{diff}");
    }
}
