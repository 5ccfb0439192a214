//! Fine-tuning the top of the backbone together with the head (`--unfreeze N`).
//!
//! The blocks below the cut stay frozen: what they hand to the top for each photo is computed
//! once and cached like pooled features (with augmentation, computed for each epoch's views), so
//! an epoch runs only the top N blocks and the head convolution, forward and backward.
//!
//! BatchNorm is folded into the convolutions at load. With frozen statistics (the default) the
//! fold is exact, so the folded weights and biases are what train. With `train_bn` every
//! unfrozen convolution gets its BatchNorm back, in training mode, set up so that in inference
//! mode it computes exactly the folded convolution: running statistics measured on training
//! photos, scale `sqrt(var + eps)`, shift `mean + bias`. Export folds it back in.
//!
//! The head starts from a linear probe (the head trained on the frozen backbone), so the first
//! steps do not push a random head's gradients into the pretrained blocks.

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};

use crate::backbone::{ops, Activation, Backbone, Block, Conv};
use crate::features::FeatureSet;
use crate::head::{Head, HeadWeights};
use crate::train::{self, EpochMetrics, SplitMix64, TrainConfig, TrainError, TrainOutcome};

/// BatchNorm epsilon and running-average momentum with `train_bn` (PyTorch's defaults).
const BN_EPS: f64 = 1e-5;
const BN_MOMENTUM: f64 = 0.1;
/// Training photos whose activations set the BatchNorm statistics with `train_bn`.
const BN_MEASURE_PHOTOS: usize = 256;

#[derive(Debug, Clone)]
pub struct FineTuneConfig {
    /// Blocks at the top of the backbone that train, with its head convolution.
    pub unfreeze: usize,
    /// Epochs, head learning rate, batch size, dropout, seed, patience, ...
    pub head: TrainConfig,
    /// AdamW learning rate of the unfrozen backbone layers.
    pub backbone_lr: f64,
    /// Update BatchNorm statistics from each batch instead of keeping ImageNet's.
    pub train_bn: bool,
}

/// What one fine-tuning run measured besides the per-epoch metrics.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FineTuneStats {
    /// Index of the first unfrozen block.
    pub first_unfrozen_block: usize,
    pub trainable_parameters: usize,
    pub frozen_parameters: usize,
    /// Validation accuracy of the linear probe the head started from.
    pub probe_val_accuracy: f64,
    /// Training rows per second through the unfrozen part and head: forward, backward, update.
    pub train_images_per_s: f64,
    /// Validation rows per second through the unfrozen part and head: forward only.
    pub forward_images_per_s: f64,
}

/// A fine-tuned backbone and its head.
#[derive(Debug, Clone)]
pub struct FineTuned {
    /// The backbone with the best epoch's top blocks, BatchNorm folded.
    pub backbone: Backbone,
    pub outcome: TrainOutcome,
    pub stats: FineTuneStats,
}

/// Training photos of one epoch: the cached activations, or this epoch's augmented views.
pub type EpochRows<'a> = dyn FnMut(usize) -> Result<Option<FeatureSet>, TrainError> + 'a;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// BatchNorm (with `train_bn`) normalises with the batch's statistics and updates its
    /// running ones.
    Train,
    Eval,
    /// Sets up each convolution's BatchNorm from this batch's statistics, then acts as Eval.
    Measure,
}

#[derive(Debug)]
struct Norm {
    gamma: Var,
    beta: Var,
    mean: Tensor,
    var: Tensor,
}

/// One unfrozen convolution.
#[derive(Debug)]
struct TrainConv {
    template: Conv,
    weight: Var,
    /// The folded bias, while there is no BatchNorm to carry it.
    bias: Option<Var>,
    norm: Option<Norm>,
    zero_bias: Tensor,
}

/// Mean over everything but the channel (last) axis of `[b, h, w, c]`, as `[1, 1, 1, c]`.
fn per_channel(t: &Tensor) -> candle_core::Result<Tensor> {
    t.mean_keepdim(0)?.mean_keepdim(1)?.mean_keepdim(2)
}

impl TrainConv {
    fn new(c: &Conv) -> candle_core::Result<Self> {
        Ok(Self {
            template: c.clone(),
            // Copies: the optimizer updates a Var's storage in place.
            weight: Var::from_tensor(&c.weight.copy()?)?,
            bias: Some(Var::from_tensor(&c.bias.copy()?)?),
            norm: None,
            zero_bias: c.bias.zeros_like()?,
        })
    }

    fn vars(&self) -> Vec<Var> {
        let mut v = vec![self.weight.clone()];
        v.extend(self.bias.clone());
        if let Some(n) = &self.norm {
            v.extend([n.gamma.clone(), n.beta.clone()]);
        }
        v
    }

    fn parameters(&self) -> usize {
        self.vars().iter().map(|v| v.elem_count()).sum()
    }

    /// `conv(x, weight) + bias` on channels-last `[b, h, w, c]`, with the activation when
    /// `activation` is set. Channels-last makes a 1x1 convolution one matrix product over the
    /// whole batch, which trains several times faster than a product per image.
    fn linear(
        &self,
        x: &Tensor,
        bias: &Tensor,
        activation: Activation,
    ) -> candle_core::Result<Tensor> {
        let c = &self.template;
        let w = self.weight.as_tensor();
        let (b, h, wd, cin) = x.dims4()?;
        let cout = c.out_channels();
        if c.kernel_size() == 1 && c.stride == 1 && c.groups == 1 {
            let y = x
                .reshape((b * h * wd, cin))?
                .matmul(&w.reshape((cout, cin))?.t()?)?
                .broadcast_add(bias)?
                .reshape((b, h, wd, cout))?;
            return activate(y, activation);
        }
        let x = x.permute((0, 3, 1, 2))?;
        let y = if c.groups == cout && x.device().is_cpu() {
            ops::depthwise(&x, w, bias, c.stride, c.padding, activation)?
        } else {
            let y = if c.groups == cout {
                ops::depthwise_taps(&x, w, c.stride, c.padding)?
            } else {
                let p = c.padding;
                x.pad_with_zeros(2, p.top, p.bottom)?
                    .pad_with_zeros(3, p.left, p.right)?
                    .conv2d(w, 0, c.stride, 1, c.groups)?
            };
            activate(
                y.broadcast_add(&bias.reshape((1, cout, 1, 1))?)?,
                activation,
            )?
        };
        y.permute((0, 2, 3, 1))?.contiguous()
    }

    fn forward(&mut self, x: &Tensor, mode: Mode) -> candle_core::Result<Tensor> {
        let act = self.template.activation;
        if mode == Mode::Measure {
            let z = self.linear(x, &self.zero_bias, Activation::Linear)?;
            let mean = per_channel(&z)?;
            let var = per_channel(&z.broadcast_sub(&mean)?.sqr()?)?;
            let bias = self
                .bias
                .take()
                .expect("BatchNorm is measured once")
                .as_tensor()
                .reshape(mean.shape())?;
            // Measured on the folded convolution: in inference mode the new BatchNorm
            // reproduces it exactly.
            self.norm = Some(Norm {
                gamma: Var::from_tensor(&(&var + BN_EPS)?.sqrt()?)?,
                beta: Var::from_tensor(&(&mean + &bias)?)?,
                mean,
                var,
            });
            return activate(z.broadcast_add(&bias)?, act);
        }
        if self.norm.is_none() {
            let bias = self
                .bias
                .as_ref()
                .expect("a conv without BatchNorm keeps its bias");
            return self.linear(x, bias.as_tensor(), act);
        }
        let z = self.linear(x, &self.zero_bias, Activation::Linear)?;
        let norm = self.norm.as_mut().expect("checked above");
        let (mean, var) = if mode == Mode::Train {
            let mean = per_channel(&z)?;
            let var = per_channel(&z.broadcast_sub(&mean)?.sqr()?)?;
            let n = (z.elem_count() / z.dim(1)?) as f64;
            let m = BN_MOMENTUM;
            // Running variance is the unbiased estimate, as in PyTorch.
            norm.mean = ((&norm.mean * (1.0 - m))? + (mean.detach() * m)?)?;
            norm.var = ((&norm.var * (1.0 - m))? + (var.detach() * (m * n / (n - 1.0).max(1.0)))?)?;
            (mean, var)
        } else {
            (norm.mean.clone(), norm.var.clone())
        };
        let y = z
            .broadcast_sub(&mean)?
            .broadcast_div(&(var + BN_EPS)?.sqrt()?)?
            .broadcast_mul(norm.gamma.as_tensor())?
            .broadcast_add(norm.beta.as_tensor())?;
        activate(y, act)
    }

    /// The convolution in inference form, BatchNorm folded, as fresh tensors.
    fn export(&self) -> candle_core::Result<Conv> {
        let (weight, bias) = match (&self.norm, &self.bias) {
            (Some(n), _) => {
                let cout = self.template.out_channels();
                let scale = n.gamma.as_tensor().div(&(&n.var + BN_EPS)?.sqrt()?)?;
                let weight = self
                    .weight
                    .as_tensor()
                    .broadcast_mul(&scale.reshape((cout, 1, 1, 1))?)?;
                let bias = (n.beta.as_tensor() - n.mean.mul(&scale)?)?.reshape(cout)?;
                (weight, bias)
            }
            (None, Some(b)) => (self.weight.as_tensor().copy()?, b.as_tensor().copy()?),
            (None, None) => unreachable!("a conv keeps its bias until BatchNorm takes it"),
        };
        Ok(Conv {
            weight,
            bias,
            ..self.template.clone()
        })
    }
}

fn activate(y: Tensor, activation: Activation) -> candle_core::Result<Tensor> {
    match activation {
        Activation::Linear => Ok(y),
        Activation::Relu6 => y.clamp(0f32, 6f32),
    }
}

#[derive(Debug)]
struct TrainBlock {
    expand: Option<TrainConv>,
    depthwise: TrainConv,
    project: TrainConv,
    residual: bool,
}

/// The unfrozen top of a backbone: blocks `cut..` and the head convolution, pooled.
#[derive(Debug)]
struct Top {
    cut: usize,
    blocks: Vec<TrainBlock>,
    head: TrainConv,
}

impl Top {
    fn new(backbone: &Backbone, cut: usize) -> candle_core::Result<Self> {
        let blocks = backbone.blocks[cut..]
            .iter()
            .map(|b| {
                Ok(TrainBlock {
                    expand: b.expand.as_ref().map(TrainConv::new).transpose()?,
                    depthwise: TrainConv::new(&b.depthwise)?,
                    project: TrainConv::new(&b.project)?,
                    residual: b.residual,
                })
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            cut,
            blocks,
            head: TrainConv::new(&backbone.head)?,
        })
    }

    fn convs(&self) -> impl Iterator<Item = &TrainConv> {
        self.blocks
            .iter()
            .flat_map(|b| b.expand.iter().chain([&b.depthwise, &b.project]))
            .chain([&self.head])
    }

    fn vars(&self) -> Vec<Var> {
        self.convs().flat_map(TrainConv::vars).collect()
    }

    /// Pooled features `[batch, feature_dim]` from block `cut`'s input `[batch, c, h, w]`.
    fn forward(&mut self, x: &Tensor, mode: Mode) -> candle_core::Result<Tensor> {
        let mut y = x.permute((0, 2, 3, 1))?.contiguous()?;
        for b in &mut self.blocks {
            let input = y.clone();
            if let Some(e) = &mut b.expand {
                y = e.forward(&y, mode)?;
            }
            y = b.depthwise.forward(&y, mode)?;
            y = b.project.forward(&y, mode)?;
            if b.residual {
                y = (y + input)?;
            }
        }
        self.head.forward(&y, mode)?.mean((1, 2))
    }

    /// `backbone` with this top in inference form.
    fn export(&self, backbone: &Backbone) -> candle_core::Result<Backbone> {
        let mut out = backbone.clone();
        for (slot, b) in out.blocks[self.cut..].iter_mut().zip(&self.blocks) {
            *slot = Block {
                expand: b.expand.as_ref().map(TrainConv::export).transpose()?,
                depthwise: b.depthwise.export()?,
                project: b.project.export()?,
                residual: b.residual,
            };
        }
        out.head = self.head.export()?;
        Ok(out)
    }
}

fn parameters<'a>(convs: impl Iterator<Item = &'a Conv>) -> usize {
    convs
        .map(|c| c.weight.elem_count() + c.bias.elem_count())
        .sum()
}

/// Rows `idx` of `set` as a `[n, c, h, w]` batch.
fn batch(
    set: &FeatureSet,
    idx: &[usize],
    shape: (usize, usize, usize),
    dev: &Device,
) -> candle_core::Result<Tensor> {
    let mut x = Vec::with_capacity(idx.len() * set.dim);
    for &i in idx {
        x.extend_from_slice(set.row(i));
    }
    Tensor::from_vec(x, (idx.len(), shape.0, shape.1, shape.2), dev)
}

/// Runs `forward` over `set` (rows shaped `shape`) 64 rows at a time and collects its pooled
/// features.
fn pooled_by(
    set: &FeatureSet,
    shape: (usize, usize, usize),
    dev: &Device,
    mut forward: impl FnMut(&Tensor) -> candle_core::Result<Tensor>,
) -> candle_core::Result<FeatureSet> {
    let idx: Vec<usize> = (0..set.len()).collect();
    let mut features = Vec::new();
    let mut dim = 0;
    for chunk in idx.chunks(64) {
        let f = forward(&batch(set, chunk, shape, dev)?)?;
        dim = f.dim(1)?;
        features.extend(f.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(FeatureSet {
        dim,
        features,
        labels: set.labels.clone(),
        paths: set.paths.clone(),
        content_sha256: set.content_sha256.clone(),
    })
}

/// Pooled features of every row of `set` through `top` in inference form.
fn pooled(
    top: &mut Top,
    set: &FeatureSet,
    shape: (usize, usize, usize),
    dev: &Device,
) -> candle_core::Result<FeatureSet> {
    pooled_by(set, shape, dev, |x| top.forward(x, Mode::Eval))
}

/// Pooled features of `set` (activations at the input of block `cut`) through `backbone`'s
/// top in inference form: what the exported model computes.
pub fn pooled_features(
    backbone: &Backbone,
    cut: usize,
    set: &FeatureSet,
) -> candle_core::Result<FeatureSet> {
    pooled_by(
        set,
        backbone.block_input_shape(cut),
        backbone.device(),
        |x| backbone.features_from_block(x, cut),
    )
}

/// Cosine decay from the full rate at epoch 1 towards zero after the last epoch.
pub fn cosine_factor(epoch: usize, epochs: usize) -> f64 {
    0.5 * (1.0 + (std::f64::consts::PI * (epoch - 1) as f64 / epochs.max(1) as f64).cos())
}

/// Fine-tunes the top `cfg.unfreeze` blocks of `backbone` and a head on activations at their
/// input. `train_set` and `val_set` hold those activations (rows of `c*h*w` values);
/// `epoch_rows(epoch)` may replace the training rows for an epoch (augmented views), `None`
/// keeps `train_set`. `on_epoch` sees each epoch's metrics as they come.
pub fn fine_tune(
    backbone: &Backbone,
    train_set: &FeatureSet,
    val_set: &FeatureSet,
    classes: usize,
    cfg: &FineTuneConfig,
    epoch_rows: &mut EpochRows,
    mut on_epoch: impl FnMut(&EpochMetrics),
) -> Result<FineTuned, TrainError> {
    if train_set.is_empty() {
        return Err(TrainError::NoTrainingData);
    }
    let dev = backbone.device().clone();
    let cut = backbone.blocks.len() - cfg.unfreeze.min(backbone.blocks.len());
    let shape = backbone.block_input_shape(cut);
    let hc = &cfg.head;
    let mut top = Top::new(backbone, cut)?;

    // The head starts as a linear probe on the frozen top's features.
    let probe_train = pooled(&mut top, train_set, shape, &dev)?;
    let probe_val = pooled(&mut top, val_set, shape, &dev)?;
    let probe_cfg = TrainConfig {
        epochs: TrainConfig::default().epochs.max(hc.epochs),
        ..hc.clone()
    };
    let probe = train::train(&probe_train, &probe_val, classes, &probe_cfg, &dev, |_| {})?;
    let probe_val_accuracy = probe
        .history
        .get(probe.best_epoch - 1)
        .map_or(f64::NAN, |m| m.val_accuracy);
    tracing::info!(
        "linear probe: validation accuracy {:.2}% at epoch {}",
        probe_val_accuracy * 100.0,
        probe.best_epoch
    );
    let head = Head::new(probe.head.features, classes, hc.dropout, &dev)?;
    head.weight.set(&Tensor::from_vec(
        probe.head.weight.clone(),
        (classes, probe.head.features),
        &dev,
    )?)?;
    head.bias
        .set(&Tensor::from_vec(probe.head.bias.clone(), classes, &dev)?)?;

    if cfg.train_bn {
        // Spread over the set: photos come grouped by class.
        let n = train_set.len().min(BN_MEASURE_PHOTOS);
        let idx: Vec<usize> = (0..n).map(|i| i * train_set.len() / n).collect();
        top.forward(&batch(train_set, &idx, shape, &dev)?, Mode::Measure)?;
    }

    let params = |lr| ParamsAdamW {
        lr,
        weight_decay: hc.weight_decay,
        ..Default::default()
    };
    let mut opt_head = AdamW::new(head.vars(), params(hc.lr))?;
    let mut opt_backbone = AdamW::new(top.vars(), params(cfg.backbone_lr))?;
    let weights = train::class_weights(&train_set.labels, classes);
    let mut rng = SplitMix64::new(hc.seed);
    let mut history = Vec::new();
    let mut best: Option<(f64, usize, HeadWeights, Backbone)> = None;
    let (mut step_rows, mut step_s, mut eval_rows, mut eval_s) = (0usize, 0f64, 0usize, 0f64);

    for epoch in 1..=hc.epochs {
        let factor = cosine_factor(epoch, hc.epochs);
        let (lr, backbone_lr) = (hc.lr * factor, cfg.backbone_lr * factor);
        opt_head.set_learning_rate(lr);
        opt_backbone.set_learning_rate(backbone_lr);
        let views = epoch_rows(epoch)?;
        let rows = views.as_ref().unwrap_or(train_set);
        let mut order: Vec<usize> = (0..rows.len()).collect();
        rng.shuffle(&mut order);
        let (mut loss_sum, mut right) = (0.0, 0);
        let t = Instant::now();
        for idx in order.chunks(hc.batch_size.max(1)) {
            let x = batch(rows, idx, shape, &dev)?;
            let f = top.forward(&x, Mode::Train)?;
            let mask = train::dropout_mask(&mut rng, hc.dropout, f.dims2()?, &dev)?;
            let labels: Vec<usize> = idx.iter().map(|&i| rows.labels[i]).collect();
            let logits = head.forward(&f, mask.as_ref())?;
            let l = train::loss(&logits, &labels, classes, hc.label_smoothing, &weights)?;
            let grads = l.backward()?;
            opt_head.step(&grads)?;
            opt_backbone.step(&grads)?;
            loss_sum += l.to_scalar::<f32>()? as f64 * idx.len() as f64;
            right += train::correct(&logits, &labels)?;
        }
        step_s += t.elapsed().as_secs_f64();
        step_rows += rows.len();

        let t = Instant::now();
        let val_features = pooled(&mut top, val_set, shape, &dev)?;
        let (val_loss, val_accuracy) = train::evaluate(&head, &val_features, classes, &dev)?;
        eval_s += t.elapsed().as_secs_f64();
        eval_rows += val_set.len();

        let m = EpochMetrics {
            epoch,
            train_loss: loss_sum / rows.len() as f64,
            train_accuracy: right as f64 / rows.len() as f64,
            val_loss,
            val_accuracy,
            lr: Some(lr),
            backbone_lr: Some(backbone_lr),
        };
        tracing::info!(
            "epoch {epoch}: train loss {:.4}, validation loss {:.4} accuracy {:.2}%, lr {lr:.2e} \
             (backbone {backbone_lr:.2e})",
            m.train_loss,
            m.val_loss,
            m.val_accuracy * 100.0
        );
        on_epoch(&m);
        history.push(m);
        let score = if val_loss.is_nan() {
            -(epoch as f64)
        } else {
            val_loss
        };
        if best.as_ref().is_none_or(|(b, ..)| score < *b) {
            best = Some((score, epoch, head.weights()?, top.export(backbone)?));
        } else if best
            .as_ref()
            .is_some_and(|(_, e, ..)| epoch - e >= hc.patience)
        {
            tracing::info!(
                "early stop at epoch {epoch}: no better validation loss for {} epochs",
                hc.patience
            );
            break;
        }
    }
    let (_, best_epoch, head, tuned) = best.expect("at least one epoch ran");
    let trainable = top.convs().map(TrainConv::parameters).sum::<usize>();
    let all = parameters(
        std::iter::once(&backbone.stem)
            .chain(
                backbone
                    .blocks
                    .iter()
                    .flat_map(|b| b.expand.iter().chain([&b.depthwise, &b.project])),
            )
            .chain([&backbone.head]),
    );
    let head_conv_and_top = parameters(top.convs().map(|c| &c.template));
    Ok(FineTuned {
        backbone: tuned,
        outcome: TrainOutcome {
            head,
            best_epoch,
            history,
            class_weights: weights,
        },
        stats: FineTuneStats {
            first_unfrozen_block: cut,
            trainable_parameters: trainable,
            frozen_parameters: all - head_conv_and_top,
            probe_val_accuracy,
            train_images_per_s: step_rows as f64 / step_s.max(1e-9),
            forward_images_per_s: eval_rows as f64 / eval_s.max(1e-9),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backbone::{Normalization, Padding};

    fn tensor(rng: &mut SplitMix64, shape: &[usize], scale: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| scale * (rng.next_f32() - 0.5)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn conv(
        rng: &mut SplitMix64,
        cout: usize,
        cin: usize,
        k: usize,
        stride: usize,
        groups: usize,
        activation: Activation,
    ) -> Conv {
        Conv {
            weight: tensor(
                rng,
                &[cout, cin / groups, k, k],
                2.0 / (cin / groups * k * k) as f32,
            ),
            bias: tensor(rng, &[cout], 0.5),
            stride,
            padding: if stride == 2 {
                // TensorFlow SAME on stride 2: the extra row and column at the end.
                Padding {
                    top: 0,
                    left: 0,
                    bottom: 1,
                    right: 1,
                }
            } else {
                Padding::symmetric(k / 2)
            },
            groups,
            activation,
        }
    }

    fn block(
        rng: &mut SplitMix64,
        cin: usize,
        hidden: usize,
        cout: usize,
        k: usize,
        s: usize,
    ) -> Block {
        Block {
            expand: Some(conv(rng, hidden, cin, 1, 1, 1, Activation::Relu6)),
            depthwise: conv(rng, hidden, hidden, k, s, hidden, Activation::Relu6),
            project: conv(rng, cout, hidden, 1, 1, 1, Activation::Linear),
            residual: s == 1 && cin == cout,
        }
    }

    /// A small random network of the same form as the real backbones: 32x32 input, four blocks
    /// (one strided, one residual, 3x3 and 5x5 kernels), a head convolution to 16 features.
    fn tiny_backbone() -> Backbone {
        let mut rng = SplitMix64::new(5);
        let r = &mut rng;
        Backbone {
            name: "tiny".into(),
            input_size: 32,
            normalization: Normalization {
                mean: 127.0,
                std: 128.0,
            },
            stem: conv(r, 8, 3, 3, 2, 1, Activation::Relu6),
            blocks: vec![
                block(r, 8, 16, 8, 3, 1),
                block(r, 8, 24, 12, 3, 2),
                block(r, 12, 24, 12, 5, 1),
                block(r, 12, 36, 16, 3, 1),
            ],
            head: conv(r, 16, 16, 1, 1, 1, Activation::Relu6),
            classifier: None,
            weights_sha256: "0".repeat(64),
        }
    }

    /// Activations at the input of block `cut` for `n` random photos, labelled by a feature of
    /// the image (its left half brighter than its right) so the task can be learnt.
    fn cut_set(b: &Backbone, cut: usize, n: usize, seed: u64) -> FeatureSet {
        let mut rng = SplitMix64::new(seed);
        let size = b.input_size;
        let mut pixels = Vec::with_capacity(n * size * size * 3);
        let mut labels = Vec::new();
        for i in 0..n {
            let label = i % 2;
            for _y in 0..size {
                for x in 0..size {
                    let bright = (x < size / 2) == (label == 0);
                    for _ in 0..3 {
                        let base = if bright { 170.0 } else { 80.0 };
                        pixels.push((base + 60.0 * (rng.next_f32() - 0.5)) as u8);
                    }
                }
            }
            labels.push(label);
        }
        let rgb = Tensor::from_vec(pixels, (n, size, size, 3), &Device::Cpu).unwrap();
        let rows = b.tap(&rgb, crate::backbone::Tap::Block(cut)).unwrap();
        FeatureSet {
            dim: b.tap_dim(crate::backbone::Tap::Block(cut)),
            features: rows.flatten_all().unwrap().to_vec1().unwrap(),
            labels,
            paths: (0..n).map(|i| format!("{i}.jpg").into()).collect(),
            content_sha256: (0..n).map(|i| format!("{i:064}")).collect(),
        }
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        crate::test_support::max_abs_diff(a, b)
    }

    fn config(unfreeze: usize, train_bn: bool) -> FineTuneConfig {
        FineTuneConfig {
            unfreeze,
            head: TrainConfig {
                epochs: 3,
                lr: 1e-2,
                batch_size: 8,
                patience: 10,
                ..Default::default()
            },
            backbone_lr: 1e-2,
            train_bn,
        }
    }

    #[test]
    fn block_input_shapes_follow_the_strides() {
        let b = tiny_backbone();
        assert_eq!(b.block_input_shape(0), (8, 16, 16));
        assert_eq!(b.block_input_shape(2), (12, 8, 8));
        assert_eq!(b.block_input_shape(4), (16, 8, 8));
        let rgb = Tensor::zeros((1, 32, 32, 3), candle_core::DType::U8, &Device::Cpu).unwrap();
        let t = b.tap(&rgb, crate::backbone::Tap::Block(2)).unwrap();
        assert_eq!(t.dims(), &[1, 12 * 8 * 8]);
    }

    /// The channels-last training forward computes what the inference forward computes.
    #[test]
    fn training_top_matches_the_inference_backbone() {
        let b = tiny_backbone();
        let set = cut_set(&b, 1, 6, 1);
        let shape = b.block_input_shape(1);
        let x = batch(&set, &[0, 1, 2, 3, 4, 5], shape, &Device::Cpu).unwrap();
        let mut top = Top::new(&b, 1).unwrap();
        let ours = top.forward(&x, Mode::Eval).unwrap();
        let reference = b.features_from_block(&x, 1).unwrap();
        assert!(max_diff(&ours, &reference) < 1e-5);
        // And both from the photo: the tap plus the top is the whole backbone.
        let pooled = pooled_features(&b, 1, &set).unwrap();
        assert!(
            max_diff(
                &Tensor::new(pooled.row(3), &Device::Cpu).unwrap(),
                &reference.get(3).unwrap()
            ) < 1e-5
        );
    }

    #[test]
    fn frozen_layers_stay_and_unfrozen_layers_change() {
        let b = tiny_backbone();
        let cut = 2;
        let (tr, va) = (cut_set(&b, cut, 32, 1), cut_set(&b, cut, 16, 2));
        let mut epochs_seen = Vec::new();
        let tuned = fine_tune(&b, &tr, &va, 2, &config(2, false), &mut |_| Ok(None), |m| {
            epochs_seen.push(m.epoch)
        })
        .unwrap();
        assert_eq!(epochs_seen, vec![1, 2, 3]);
        let t = &tuned.backbone;
        assert_eq!(values(&t.stem.weight), values(&b.stem.weight));
        for (i, (new, old)) in t.blocks.iter().zip(&b.blocks).enumerate() {
            let pairs = [
                (
                    &new.expand.as_ref().unwrap().weight,
                    &old.expand.as_ref().unwrap().weight,
                ),
                (&new.depthwise.weight, &old.depthwise.weight),
                (&new.depthwise.bias, &old.depthwise.bias),
                (&new.project.weight, &old.project.weight),
            ];
            for (n, o) in pairs {
                if i < cut {
                    assert_eq!(values(n), values(o), "frozen block {i} changed");
                } else {
                    assert!(max_diff(n, o) > 1e-6, "unfrozen block {i} did not train");
                }
            }
        }
        assert!(max_diff(&t.head.weight, &b.head.weight) > 1e-6);
        assert_eq!(tuned.stats.first_unfrozen_block, cut);
        let top_params: usize = b.blocks[cut..]
            .iter()
            .flat_map(|b| b.expand.iter().chain([&b.depthwise, &b.project]))
            .chain([&b.head])
            .map(|c| c.weight.elem_count() + c.bias.elem_count())
            .sum();
        assert_eq!(tuned.stats.trainable_parameters, top_params);
        // Both learning rates are recorded and decay.
        let h = &tuned.outcome.history;
        assert_eq!(h[0].lr, Some(1e-2));
        assert_eq!(h[0].backbone_lr, Some(1e-2));
        assert!(h[2].backbone_lr.unwrap() < h[1].backbone_lr.unwrap());
        // The exported backbone computes what the kept head was validated with.
        let kept = &tuned.outcome.history[tuned.outcome.best_epoch - 1];
        let pooled = pooled_features(t, cut, &va).unwrap();
        let right = (0..pooled.len())
            .filter(|&i| {
                let p = tuned.outcome.head.probabilities(pooled.row(i));
                (p[1] > p[0]) as usize == pooled.labels[i]
            })
            .count();
        assert!((right as f64 / pooled.len() as f64 - kept.val_accuracy).abs() < 1e-9);
    }

    /// With `train_bn` the new BatchNorm starts as the folded network, trains, and folds back
    /// into exactly what its inference mode computes.
    #[test]
    fn train_bn_starts_from_and_folds_back_to_the_inference_form() {
        let b = tiny_backbone();
        let cut = 1;
        let set = cut_set(&b, cut, 16, 3);
        let shape = b.block_input_shape(cut);
        let idx: Vec<usize> = (0..16).collect();
        let x = batch(&set, &idx, shape, &Device::Cpu).unwrap();
        let mut top = Top::new(&b, cut).unwrap();
        top.forward(&x, Mode::Measure).unwrap();
        assert!(top.convs().all(|c| c.norm.is_some() && c.bias.is_none()));
        let reference = b.features_from_block(&x, cut).unwrap();
        assert!(max_diff(&top.forward(&x, Mode::Eval).unwrap(), &reference) < 1e-4);

        // Training-mode steps move the running statistics and the parameters.
        let mut opt = AdamW::new(
            top.vars(),
            ParamsAdamW {
                lr: 1e-2,
                ..Default::default()
            },
        )
        .unwrap();
        for _ in 0..3 {
            let loss = top
                .forward(&x, Mode::Train)
                .unwrap()
                .sqr()
                .unwrap()
                .mean_all()
                .unwrap();
            opt.backward_step(&loss).unwrap();
        }
        let eval = top.forward(&x, Mode::Eval).unwrap();
        assert!(
            max_diff(&eval, &reference) > 1e-3,
            "training changed nothing"
        );
        let folded = top.export(&b).unwrap();
        assert!(max_diff(&folded.features_from_block(&x, cut).unwrap(), &eval) < 1e-4);
    }

    #[test]
    fn cosine_schedule_starts_full_and_decays() {
        assert_eq!(cosine_factor(1, 10), 1.0);
        assert!((cosine_factor(6, 10) - 0.5).abs() < 1e-12);
        assert!(cosine_factor(10, 10) > 0.0 && cosine_factor(10, 10) < 0.03);
    }
}
