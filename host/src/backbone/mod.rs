//! Frozen ImageNet backbones, "headless": RGB photo in, pooled feature vector out.
//!
//! Every backbone is reduced at load time to the same inference form, [`Backbone`]: a stem
//! convolution, inverted-residual blocks (optional 1x1 expansion, depthwise, 1x1 projection,
//! optional residual add) and a 1x1 head convolution, with BatchNorm already folded into each
//! convolution's weight and bias. candle runs that form for feature extraction, and the ONNX
//! exporter walks the very same layers, so the exported graph cannot drift from what was trained on.

pub mod efficientnet_lite;
pub mod mobilenet_v2;
pub mod ops;
mod pickle;
pub mod tflite;
pub mod weights;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};

pub use efficientnet_lite::EfficientNetLiteConfig;

#[derive(Debug, thiserror::Error)]
pub enum BackboneError {
    #[error(transparent)]
    Weights(#[from] weights::WeightsError),
    #[error("{path} does not hold {name} weights: {source}")]
    Parameter {
        path: PathBuf,
        name: String,
        // Boxed: candle's error is large and this variant is rare.
        #[source]
        source: Box<candle_core::Error>,
    },
    #[error("unknown backbone {0:?}; available: {names}", names = NAMES.join(", "))]
    Unknown(String),
    #[error("input size {0} is not supported: use a multiple of 32 from 64 to 512 (96, 128, 160, 192, 224 are the usual ones)")]
    InputSize(usize),
    #[error("--width-multiplier {asked} was asked for, but the weights are MobileNetV2 {found}")]
    Width { asked: f32, found: f32 },
    #[error("{0}")]
    Option(String),
    #[error("backbone forward pass failed: {0}")]
    Forward(#[from] candle_core::Error),
}

/// Pointwise non-linearity after a convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Linear,
    Relu6,
}

/// Zero padding of a convolution; asymmetric where TensorFlow's SAME padding asks for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Padding {
    pub top: usize,
    pub left: usize,
    pub bottom: usize,
    pub right: usize,
}

impl Padding {
    pub fn symmetric(p: usize) -> Self {
        Self {
            top: p,
            left: p,
            bottom: p,
            right: p,
        }
    }

    pub fn is_symmetric(&self) -> bool {
        self.top == self.bottom && self.left == self.right && self.top == self.left
    }
}

/// A convolution with BatchNorm folded in: `activation(conv(x, weight) + bias)`.
#[derive(Debug, Clone)]
pub struct Conv {
    /// `[out_channels, in_channels / groups, kh, kw]`.
    pub weight: Tensor,
    /// `[out_channels]`.
    pub bias: Tensor,
    pub stride: usize,
    pub padding: Padding,
    pub groups: usize,
    pub activation: Activation,
}

impl Conv {
    /// Folds an inference-mode BatchNorm into a bias-free convolution weight.
    pub fn fold_batch_norm(
        weight: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        mean: &Tensor,
        var: &Tensor,
        eps: f64,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let scale = gamma.div(&(var + eps)?.sqrt()?)?;
        let cout = weight.dim(0)?;
        let w = weight.broadcast_mul(&scale.reshape((cout, 1, 1, 1))?)?;
        let b = (beta - mean.mul(&scale)?)?;
        Ok((w, b))
    }

    pub fn out_channels(&self) -> usize {
        self.weight.dims()[0]
    }

    pub fn kernel_size(&self) -> usize {
        self.weight.dims()[2]
    }

    fn is_pointwise(&self) -> bool {
        self.kernel_size() == 1 && self.stride == 1 && self.groups == 1
    }

    fn is_depthwise(&self) -> bool {
        self.groups > 1 && self.weight.dims()[1] == 1 && self.groups == self.out_channels()
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let cout = self.out_channels();
        let y = if self.is_pointwise() {
            if x.device().is_cpu() {
                return ops::pointwise(x, &self.weight, &self.bias, self.activation);
            }
            // A 1x1 convolution is one matrix product per image; the broadcast weight has batch
            // stride 0, so candle's matmul reads it in place instead of copying it per image.
            let wt = self.weight.reshape((cout, c))?;
            let y = wt
                .broadcast_as((b, cout, c))?
                .matmul(&x.reshape((b, c, h * w))?)?;
            return ops::bias_activation(&y, &self.bias, self.activation)?.reshape((b, cout, h, w));
        } else if self.is_depthwise() && x.device().is_cpu() {
            return ops::depthwise(
                x,
                &self.weight,
                &self.bias,
                self.stride,
                self.padding,
                self.activation,
            );
        } else if self.is_depthwise() {
            ops::depthwise_taps(x, &self.weight, self.stride, self.padding)?
        } else {
            let x = if self.padding.is_symmetric() {
                x.clone()
            } else {
                x.pad_with_zeros(2, self.padding.top, self.padding.bottom)?
                    .pad_with_zeros(3, self.padding.left, self.padding.right)?
            };
            let pad = if self.padding.is_symmetric() {
                self.padding.top
            } else {
                0
            };
            x.conv2d(&self.weight, pad, self.stride, 1, self.groups)?
        };
        let (_, _, oh, ow) = y.dims4()?;
        ops::bias_activation(&y.reshape((b, cout, oh * ow))?, &self.bias, self.activation)?
            .reshape((b, cout, oh, ow))
    }
}

/// An inverted-residual block (MBConv / MobileNetV2 bottleneck), BatchNorm folded.
#[derive(Debug, Clone)]
pub struct Block {
    pub expand: Option<Conv>,
    pub depthwise: Conv,
    pub project: Conv,
    /// Adds the block's input to its output (stride 1, same channel count).
    pub residual: bool,
}

impl Module for Block {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut y = match &self.expand {
            Some(e) => e.forward(x)?,
            None => x.clone(),
        };
        y = self.depthwise.forward(&y)?;
        y = self.project.forward(&y)?;
        if self.residual {
            y = (y + x)?;
        }
        Ok(y)
    }
}

/// How RGB bytes become network input: `x = (pixel - mean) / std`, the same for all channels.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Normalization {
    pub mean: f32,
    pub std: f32,
}

/// The ImageNet 1000-class top, kept only to check the backbone against reference outputs.
#[derive(Debug, Clone)]
pub struct Classifier {
    /// `[classes, features]`.
    pub weight: Tensor,
    pub bias: Tensor,
}

/// Where feature extraction stops: the pooled features, or the input of a block (what the
/// frozen part hands to the blocks that are fine-tuned).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Tap {
    #[default]
    Pooled,
    Block(usize),
}

/// Names `--backbone` accepts.
pub const NAMES: &[&str] = &[
    "efficientnet-lite0",
    "efficientnet-lite1",
    "efficientnet-lite2",
    "mobilenet-v2",
];

/// The input size a backbone runs at unless told otherwise: the size it was trained at,
/// rounded to the nearest multiple of 32 (Lite1's 240 and Lite2's 260 both become 256).
pub fn default_input_size(name: &str) -> usize {
    EfficientNetLiteConfig::by_name(name)
        .map(|cfg| (cfg.input_size + 16) / 32 * 32)
        .unwrap_or(224)
}

/// Five stride-2 layers: the input must divide by 32 for every stage to halve evenly.
pub fn check_input_size(size: usize) -> Result<(), BackboneError> {
    if size.is_multiple_of(32) && (64..=512).contains(&size) {
        Ok(())
    } else {
        Err(BackboneError::InputSize(size))
    }
}

/// What may vary for one backbone architecture.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// Input height and width; default: [`default_input_size`].
    pub input_size: Option<usize>,
    /// MobileNetV2's width multiplier; default: whatever the weights have.
    pub width: Option<f32>,
}

/// A frozen backbone in inference form.
#[derive(Debug, Clone)]
pub struct Backbone {
    /// Short name written into reports and model metadata, e.g. `efficientnet-lite0`.
    pub name: String,
    pub input_size: usize,
    pub normalization: Normalization,
    pub stem: Conv,
    pub blocks: Vec<Block>,
    pub head: Conv,
    pub classifier: Option<Classifier>,
    /// SHA-256 of the weights file: part of the feature cache key.
    pub weights_sha256: String,
}

impl Backbone {
    /// Loads a backbone by name from a weights file.
    pub fn load(name: &str, path: &Path, device: &Device) -> Result<Self, BackboneError> {
        Self::load_with(name, path, device, LoadOptions::default())
    }

    /// Loads a backbone by name from a weights file, at another input size or width.
    pub fn load_with(
        name: &str,
        path: &Path,
        device: &Device,
        options: LoadOptions,
    ) -> Result<Self, BackboneError> {
        let size = options
            .input_size
            .unwrap_or_else(|| default_input_size(name));
        if let Some(cfg) = EfficientNetLiteConfig::by_name(name) {
            if options.width.is_some() {
                return Err(BackboneError::Option(format!(
                    "--width-multiplier is for mobilenet-v2; {name} has one width"
                )));
            }
            check_input_size(size)?;
            let mut b = efficientnet_lite::load(&cfg, path, device)?;
            // Every layer is convolutional with symmetric padding: any multiple of 32 works.
            b.input_size = size;
            return Ok(b);
        }
        match name {
            "mobilenet-v2" => mobilenet_v2::load(
                path,
                mobilenet_v2::Options {
                    input_size: size,
                    width: options.width,
                },
                device,
            ),
            other => Err(BackboneError::Unknown(other.to_owned())),
        }
    }

    /// The same backbone with its tensors on `device`.
    pub fn to_device(self, device: &Device) -> candle_core::Result<Self> {
        if device.same_device(self.device()) {
            return Ok(self);
        }
        let conv = |c: Conv| -> candle_core::Result<Conv> {
            Ok(Conv {
                weight: c.weight.to_device(device)?,
                bias: c.bias.to_device(device)?,
                ..c
            })
        };
        let blocks = self
            .blocks
            .into_iter()
            .map(|b| {
                Ok(Block {
                    expand: b.expand.map(conv).transpose()?,
                    depthwise: conv(b.depthwise)?,
                    project: conv(b.project)?,
                    residual: b.residual,
                })
            })
            .collect::<candle_core::Result<_>>()?;
        let classifier = self
            .classifier
            .map(|c| {
                Ok::<_, candle_core::Error>(Classifier {
                    weight: c.weight.to_device(device)?,
                    bias: c.bias.to_device(device)?,
                })
            })
            .transpose()?;
        Ok(Self {
            stem: conv(self.stem)?,
            blocks,
            head: conv(self.head)?,
            classifier,
            ..self
        })
    }

    pub fn feature_dim(&self) -> usize {
        self.head.out_channels()
    }

    pub fn device(&self) -> &Device {
        self.stem.weight.device()
    }

    /// RGB bytes `[batch, height, width, 3]` (u8) to normalised NCHW float input.
    pub fn normalize(&self, rgb: &Tensor) -> candle_core::Result<Tensor> {
        let n = self.normalization;
        rgb.to_dtype(DType::F32)?
            .affine(1.0 / n.std as f64, -(n.mean / n.std) as f64)?
            .permute((0, 3, 1, 2))?
            .contiguous()
    }

    /// Normalised NCHW input to pooled features `[batch, feature_dim]`.
    pub fn forward_features(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.features_from_block(&self.stem.forward(x)?, 0)
    }

    /// The stem's output for RGB bytes: on CPU one fused op that reads the bytes directly.
    fn stem_from(&self, rgb: &Tensor) -> candle_core::Result<Tensor> {
        if rgb.device().is_cpu() && self.stem.groups == 1 {
            ops::stem_from_rgb(rgb, &self.stem, self.normalization)
        } else {
            self.stem.forward(&self.normalize(rgb)?)
        }
    }

    /// RGB bytes `[batch, height, width, 3]` to pooled features `[batch, feature_dim]`.
    pub fn features(&self, rgb: &Tensor) -> candle_core::Result<Tensor> {
        self.features_from_block(&self.stem_from(rgb)?, 0)
    }

    /// Like [`Backbone::features`], calling `visit` with every tensor the int8 export
    /// quantizes, in graph order: `stem`, then per block `block{i}_expand` (when the block
    /// expands), `block{i}_depthwise`, `block{i}_project`, `block{i}_add` (when residual), then
    /// `head_conv` and the pooled `features`. Calibration records their ranges under these names.
    pub fn trace(
        &self,
        rgb: &Tensor,
        visit: &mut dyn FnMut(&str, &Tensor) -> candle_core::Result<()>,
    ) -> candle_core::Result<Tensor> {
        let mut y = self.stem_from(rgb)?;
        visit("stem", &y)?;
        for (i, block) in self.blocks.iter().enumerate() {
            let input = y.clone();
            if let Some(e) = &block.expand {
                y = e.forward(&y)?;
                visit(&format!("block{i}_expand"), &y)?;
            }
            y = block.depthwise.forward(&y)?;
            visit(&format!("block{i}_depthwise"), &y)?;
            y = block.project.forward(&y)?;
            visit(&format!("block{i}_project"), &y)?;
            if block.residual {
                y = (y + input)?;
                visit(&format!("block{i}_add"), &y)?;
            }
        }
        y = self.head.forward(&y)?;
        visit("head_conv", &y)?;
        let f = y.mean((2, 3))?;
        visit("features", &f)?;
        Ok(f)
    }

    /// Where block `index` starts: `(channels, height, width)` of its input.
    pub fn block_input_shape(&self, index: usize) -> (usize, usize, usize) {
        let mut side = self.input_size.div_ceil(self.stem.stride);
        for b in &self.blocks[..index] {
            side = side.div_ceil(b.depthwise.stride);
        }
        let channels = match self.blocks.get(index) {
            Some(b) => b
                .expand
                .as_ref()
                .map_or(b.depthwise.out_channels(), |e| e.weight.dims()[1]),
            None => self.head.weight.dims()[1],
        };
        (channels, side, side)
    }

    /// Values per photo at `tap`.
    pub fn tap_dim(&self, tap: Tap) -> usize {
        match tap {
            Tap::Pooled => self.feature_dim(),
            Tap::Block(i) => {
                let (c, h, w) = self.block_input_shape(i);
                c * h * w
            }
        }
    }

    /// RGB bytes `[batch, height, width, 3]` to what the backbone has at `tap`, one row per
    /// photo: `[batch, tap_dim]`.
    pub fn tap(&self, rgb: &Tensor, tap: Tap) -> candle_core::Result<Tensor> {
        let Tap::Block(cut) = tap else {
            return self.features(rgb);
        };
        let mut y = self.stem_from(rgb)?;
        for block in &self.blocks[..cut] {
            y = block.forward(&y)?;
        }
        y.flatten_from(1)
    }

    /// Pooled features from the input of block `cut` (`[batch, c, h, w]`), in inference form.
    pub fn features_from_block(&self, x: &Tensor, cut: usize) -> candle_core::Result<Tensor> {
        let mut y = x.clone();
        for block in &self.blocks[cut..] {
            y = block.forward(&y)?;
        }
        self.head.forward(&y)?.mean((2, 3))
    }

    /// ImageNet logits from pooled features, when the checkpoint carries its classifier.
    pub fn imagenet_logits(&self, features: &Tensor) -> Option<candle_core::Result<Tensor>> {
        let c = self.classifier.as_ref()?;
        Some(
            c.weight
                .t()
                .and_then(|w| features.matmul(&w))
                .and_then(|l| l.broadcast_add(&c.bias)),
        )
    }
}
