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
    /// EfficientNet-Lite0: width and depth multipliers 1.0, trained at 224x224.
    pub fn lite0() -> Self {
        Self::scaled("efficientnet-lite0", 1.0, 1.0, 224)
    }

    /// EfficientNet-Lite1: depth x1.1, trained at 240x240.
    pub fn lite1() -> Self {
        Self::scaled("efficientnet-lite1", 1.0, 1.1, 240)
    }

    /// EfficientNet-Lite2: width x1.1, depth x1.2, trained at 260x260.
    pub fn lite2() -> Self {
        Self::scaled("efficientnet-lite2", 1.1, 1.2, 260)
    }

    /// The configuration by `--backbone` name.
    pub fn by_name(name: &str) -> Option<Self> {
        match name {
            "efficientnet-lite0" => Some(Self::lite0()),
            "efficientnet-lite1" => Some(Self::lite1()),
            "efficientnet-lite2" => Some(Self::lite2()),
            _ => None,
        }
    }

    /// Lite0's stages scaled as TensorFlow's `efficientnet_lite_builder` does: channels by
    /// `width` (rounded to multiples of 8), repeats by `depth` (rounded up), except that the
    /// stem, the head and the first and last stages stay fixed (the Lite variants'
    /// `fix_head_stem`, which keeps them quantization-friendly).
    fn scaled(name: &'static str, width: f64, depth: f64, input_size: usize) -> Self {
        let base = [
            (3, 1, 1, 16, 1),
            (3, 2, 6, 24, 2),
            (5, 2, 6, 40, 2),
            (3, 2, 6, 80, 3),
            (5, 1, 6, 112, 3),
            (5, 2, 6, 192, 4),
            (3, 1, 6, 320, 1),
        ];
        let last = base.len() - 1;
        let stages = base
            .iter()
            .enumerate()
            .map(
                |(i, &(kernel, stride, expand_ratio, out_channels, repeats))| StageConfig {
                    kernel,
                    stride,
                    expand_ratio,
                    out_channels: round_filters(out_channels, width),
                    repeats: if i == 0 || i == last {
                        repeats
                    } else {
                        (repeats as f64 * depth).ceil() as usize
                    },
                },
            )
            .collect();
        Self {
            name,
            input_size,
            stem_channels: 32,
            stages,
            head_channels: 1280,
            batch_norm_eps: 1e-3,
            imagenet_classes: 1000,
        }
    }
}

/// TensorFlow's `round_filters`: the nearest multiple of 8, never more than 10% below.
fn round_filters(channels: usize, width: f64) -> usize {
    let scaled = channels as f64 * width;
    let rounded = ((scaled + 4.0) as usize / 8 * 8).max(8);
    if (rounded as f64) < 0.9 * scaled {
        rounded + 8
    } else {
        rounded
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

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(cfg: &EfficientNetLiteConfig) -> (Vec<usize>, Vec<usize>) {
        cfg.stages
            .iter()
            .map(|s| (s.out_channels, s.repeats))
            .unzip()
    }

    /// The stage widths and depths of the published Lite checkpoints (their `_project_conv`
    /// shapes, block by block), which the scaling rules must reproduce.
    #[test]
    fn scaling_reproduces_the_published_checkpoints() {
        assert_eq!(
            shape(&EfficientNetLiteConfig::lite0()),
            (
                vec![16, 24, 40, 80, 112, 192, 320],
                vec![1, 2, 2, 3, 3, 4, 1]
            )
        );
        assert_eq!(
            shape(&EfficientNetLiteConfig::lite1()),
            (
                vec![16, 24, 40, 80, 112, 192, 320],
                vec![1, 3, 3, 4, 4, 5, 1]
            )
        );
        assert_eq!(
            shape(&EfficientNetLiteConfig::lite2()),
            (
                vec![16, 24, 48, 88, 120, 208, 352],
                vec![1, 3, 3, 4, 4, 5, 1]
            )
        );
        assert!(EfficientNetLiteConfig::by_name("efficientnet-lite3").is_none());
    }

    #[test]
    fn round_filters_matches_tensorflow() {
        // Lite2, Lite3 (192 x1.2 = 232) and Lite4 (320 x1.4 = 448) as published.
        assert_eq!(round_filters(40, 1.1), 48);
        assert_eq!(round_filters(112, 1.1), 120);
        assert_eq!(round_filters(192, 1.2), 232);
        assert_eq!(round_filters(320, 1.4), 448);
        assert_eq!(round_filters(16, 1.0), 16);
    }
}
