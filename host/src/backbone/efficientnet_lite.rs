//! EfficientNet-Lite (Tan & Le, 2019; the "Lite" variants for mobile accelerators): EfficientNet
//! without squeeze-and-excitation, with ReLU6, and with the stem and head widths fixed.
//!
//! Parameter names follow lukemelas' `EfficientNet` PyTorch implementation (`_conv_stem`, `_bn0`,
//! `_blocks.N._expand_conv`, ...), which is how the ImageNet checkpoints are published.

use std::path::Path;

use candle_core::Device;
use candle_nn::VarBuilder;

use super::{
    weights, Activation, Backbone, BackboneError, Block, Classifier, Conv, Normalization, Padding,
};

/// One stage of identical MBConv blocks.
#[derive(Debug, Clone, Copy)]
pub struct StageConfig {
    pub kernel: usize,
    pub stride: usize,
    pub expand_ratio: usize,
    pub out_channels: usize,
    pub repeats: usize,
}

#[derive(Debug, Clone)]
pub struct EfficientNetLiteConfig {
    pub name: &'static str,
    pub input_size: usize,
    pub stem_channels: usize,
    pub stages: Vec<StageConfig>,
    pub head_channels: usize,
    pub batch_norm_eps: f64,
    pub imagenet_classes: usize,
}

impl EfficientNetLiteConfig {
    /// EfficientNet-Lite0: width and depth multipliers 1.0, 224x224 input.
    pub fn lite0() -> Self {
        let s = |kernel, stride, expand_ratio, out_channels, repeats| StageConfig {
            kernel,
            stride,
            expand_ratio,
            out_channels,
            repeats,
        };
        Self {
            name: "efficientnet-lite0",
            input_size: 224,
            stem_channels: 32,
            stages: vec![
                s(3, 1, 1, 16, 1),
                s(3, 2, 6, 24, 2),
                s(5, 2, 6, 40, 2),
                s(3, 2, 6, 80, 3),
                s(5, 1, 6, 112, 3),
                s(5, 2, 6, 192, 4),
                s(3, 1, 6, 320, 1),
            ],
            head_channels: 1280,
            batch_norm_eps: 1e-3,
            imagenet_classes: 1000,
        }
    }
}

/// A bias-free convolution followed by BatchNorm, loaded and folded.
fn conv_bn(
    conv: VarBuilder,
    bn: VarBuilder,
    shape: (usize, usize, usize, usize),
    stride: usize,
    groups: usize,
    eps: f64,
    activation: Activation,
) -> candle_core::Result<Conv> {
    let cout = shape.0;
    let weight = conv.get(shape, "weight")?;
    let (weight, bias) = Conv::fold_batch_norm(
        &weight,
        &bn.get(cout, "weight")?,
        &bn.get(cout, "bias")?,
        &bn.get(cout, "running_mean")?,
        &bn.get(cout, "running_var")?,
        eps,
    )?;
    Ok(Conv {
        weight,
        bias,
        stride,
        padding: Padding::symmetric((shape.2 - 1) / 2),
        groups,
        activation,
    })
}

/// Builds the network from a weights file (`.pth` or `.safetensors`, lukemelas names).
pub fn load(
    cfg: &EfficientNetLiteConfig,
    path: &Path,
    device: &Device,
) -> Result<Backbone, BackboneError> {
    let (tensors, sha) = weights::load_with_sha256(path)?;
    let vb = VarBuilder::from_tensors(tensors, candle_core::DType::F32, device);
    build(cfg, vb)
        .map(|(stem, blocks, head, classifier)| Backbone {
            name: cfg.name.to_owned(),
            input_size: cfg.input_size,
            normalization: Normalization {
                mean: 127.0,
                std: 128.0,
            },
            stem,
            blocks,
            head,
            classifier,
            weights_sha256: sha,
        })
        .map_err(|source| BackboneError::Parameter {
            path: path.to_owned(),
            name: cfg.name.to_owned(),
            source: Box::new(source),
        })
}

type Parts = (Conv, Vec<Block>, Conv, Option<Classifier>);

fn build(cfg: &EfficientNetLiteConfig, vb: VarBuilder) -> candle_core::Result<Parts> {
    let eps = cfg.batch_norm_eps;
    let relu6 = Activation::Relu6;
    let stem = conv_bn(
        vb.pp("_conv_stem"),
        vb.pp("_bn0"),
        (cfg.stem_channels, 3, 3, 3),
        2,
        1,
        eps,
        relu6,
    )?;
    let mut blocks = Vec::new();
    let mut cin = cfg.stem_channels;
    for stage in &cfg.stages {
        for r in 0..stage.repeats {
            let vb = vb.pp(format!("_blocks.{}", blocks.len()));
            let stride = if r == 0 { stage.stride } else { 1 };
            let hidden = cin * stage.expand_ratio;
            let expand = if stage.expand_ratio != 1 {
                Some(conv_bn(
                    vb.pp("_expand_conv"),
                    vb.pp("_bn0"),
                    (hidden, cin, 1, 1),
                    1,
                    1,
                    eps,
                    relu6,
                )?)
            } else {
                None
            };
            let k = stage.kernel;
            let depthwise = conv_bn(
                vb.pp("_depthwise_conv"),
                vb.pp("_bn1"),
                (hidden, 1, k, k),
                stride,
                hidden,
                eps,
                relu6,
            )?;
            let project = conv_bn(
                vb.pp("_project_conv"),
                vb.pp("_bn2"),
                (stage.out_channels, hidden, 1, 1),
                1,
                1,
                eps,
                Activation::Linear,
            )?;
            blocks.push(Block {
                expand,
                depthwise,
                project,
                residual: stride == 1 && cin == stage.out_channels,
            });
            cin = stage.out_channels;
        }
    }
    let head = conv_bn(
        vb.pp("_conv_head"),
        vb.pp("_bn1"),
        (cfg.head_channels, cin, 1, 1),
        1,
        1,
        eps,
        relu6,
    )?;
    // The ImageNet top is optional: a headless checkpoint still makes a backbone.
    let classifier = match (
        vb.pp("_fc")
            .get((cfg.imagenet_classes, cfg.head_channels), "weight"),
        vb.pp("_fc").get(cfg.imagenet_classes, "bias"),
    ) {
        (Ok(weight), Ok(bias)) => Some(Classifier { weight, bias }),
        _ => None,
    };
    Ok((stem, blocks, head, classifier))
}
