//! Training the head on cached features: AdamW, cross-entropy with optional label smoothing and
//! class weights, early stopping on validation loss, and a seed that makes runs repeatable.

use candle_core::{Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};

use crate::features::FeatureSet;
use crate::head::{Head, HeadWeights};

#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub epochs: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub batch_size: usize,
    pub dropout: f32,
    pub label_smoothing: f32,
    pub seed: u64,
    /// Epochs without a better validation loss before stopping.
    pub patience: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 60,
            lr: 1e-3,
            weight_decay: 1e-4,
            batch_size: 32,
            dropout: 0.2,
            label_smoothing: 0.0,
            seed: 42,
            patience: 8,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("no training photos could be read")]
    NoTrainingData,
    #[error("training failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("augmented views: {0}")]
    Views(String),
}

/// Loss and accuracy of one epoch. Accuracies are fractions in 0..=1.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EpochMetrics {
    /// Epoch number, counting from 1.
    pub epoch: usize,
    /// Mean training loss.
    pub train_loss: f64,
    /// Training accuracy.
    pub train_accuracy: f64,
    /// Mean validation loss (plain cross-entropy).
    pub val_loss: f64,
    /// Validation accuracy.
    pub val_accuracy: f64,
    /// Learning rate of the head during the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// Learning rate of the unfrozen backbone layers, when fine-tuning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backbone_lr: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct TrainOutcome {
    /// The head of the epoch with the lowest validation loss.
    pub head: HeadWeights,
    pub best_epoch: usize,
    pub history: Vec<EpochMetrics>,
    /// Per-class loss weights used (all 1 when classes are balanced).
    pub class_weights: Vec<f32>,
}

pub use crate::rng::SplitMix64;

/// "Balanced" weights `n / (k * count)` when the largest class has over 1.5x the photos of the
/// smallest; otherwise 1 for all, so balanced data trains on the plain loss.
pub fn class_weights(labels: &[usize], classes: usize) -> Vec<f32> {
    let mut counts = vec![0usize; classes];
    for &l in labels {
        counts[l] += 1;
    }
    let (min, max) = (
        *counts.iter().min().unwrap_or(&0),
        *counts.iter().max().unwrap_or(&0),
    );
    if min == 0 || max as f32 <= 1.5 * min as f32 {
        return vec![1.0; classes];
    }
    counts
        .iter()
        .map(|&c| labels.len() as f32 / (classes * c) as f32)
        .collect()
}

/// Weighted cross-entropy with label smoothing, averaged with the weights as in PyTorch.
pub(crate) fn loss(
    logits: &Tensor,
    labels: &[usize],
    classes: usize,
    smoothing: f32,
    weights: &[f32],
) -> candle_core::Result<Tensor> {
    let dev = logits.device();
    let n = labels.len();
    let off = smoothing / classes as f32;
    let mut target = vec![off; n * classes];
    let mut w = Vec::with_capacity(n);
    for (i, &l) in labels.iter().enumerate() {
        target[i * classes + l] += 1.0 - smoothing;
        w.push(weights[l]);
    }
    let target = Tensor::from_vec(target, (n, classes), dev)?;
    let w_sum: f32 = w.iter().sum();
    let w = Tensor::from_vec(w, n, dev)?;
    let logp = candle_nn::ops::log_softmax(logits, 1)?;
    let per_sample = (logp * target)?.sum(1)?.neg()?;
    (per_sample * w)?.sum_all()? / w_sum as f64
}

fn batch_tensor(set: &FeatureSet, idx: &[usize], dev: &Device) -> candle_core::Result<Tensor> {
    let mut x = Vec::with_capacity(idx.len() * set.dim);
    for &i in idx {
        x.extend_from_slice(set.row(i));
    }
    Tensor::from_vec(x, (idx.len(), set.dim), dev)
}

/// An inverted-dropout mask for `(rows, dim)` inputs: 0 or 1/(1-p) per value, from `rng` so
/// runs repeat; `None` when `p` is 0.
pub(crate) fn dropout_mask(
    rng: &mut SplitMix64,
    p: f32,
    shape: (usize, usize),
    dev: &Device,
) -> candle_core::Result<Option<Tensor>> {
    if p <= 0.0 {
        return Ok(None);
    }
    let keep = 1.0 - p;
    let m: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| {
            if rng.next_f32() < keep {
                1.0 / keep
            } else {
                0.0
            }
        })
        .collect();
    Tensor::from_vec(m, shape, dev).map(Some)
}

pub(crate) fn correct(logits: &Tensor, labels: &[usize]) -> candle_core::Result<usize> {
    let pred = logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?;
    Ok(pred
        .iter()
        .zip(labels)
        .filter(|(p, l)| **p as usize == **l)
        .count())
}

/// Validation loss (plain cross-entropy, no smoothing or weights) and accuracy.
pub(crate) fn evaluate(
    head: &Head,
    set: &FeatureSet,
    classes: usize,
    dev: &Device,
) -> candle_core::Result<(f64, f64)> {
    if set.is_empty() {
        return Ok((f64::NAN, f64::NAN));
    }
    let idx: Vec<usize> = (0..set.len()).collect();
    let (mut loss_sum, mut right) = (0.0, 0);
    for chunk in idx.chunks(1024) {
        let logits = head.forward(&batch_tensor(set, chunk, dev)?, None)?;
        let labels = &set.labels[chunk[0]..chunk[0] + chunk.len()];
        let l = loss(&logits, labels, classes, 0.0, &vec![1.0; classes])?.to_scalar::<f32>()?;
        loss_sum += l as f64 * chunk.len() as f64;
        right += correct(&logits, labels)?;
    }
    Ok((loss_sum / set.len() as f64, right as f64 / set.len() as f64))
}

/// Trains a head; `on_epoch` sees each epoch's metrics as they come (for progress display).
pub fn train(
    train: &FeatureSet,
    val: &FeatureSet,
    classes: usize,
    cfg: &TrainConfig,
    device: &Device,
    mut on_epoch: impl FnMut(&EpochMetrics),
) -> Result<TrainOutcome, TrainError> {
    if train.is_empty() {
        return Err(TrainError::NoTrainingData);
    }
    let head = Head::new(train.dim, classes, cfg.dropout, device)?;
    let mut opt = AdamW::new(
        head.vars(),
        ParamsAdamW {
            lr: cfg.lr,
            weight_decay: cfg.weight_decay,
            ..Default::default()
        },
    )?;
    let weights = class_weights(&train.labels, classes);
    let mut rng = SplitMix64::new(cfg.seed);
    let mut order: Vec<usize> = (0..train.len()).collect();
    let mut history = Vec::new();
    let mut best: Option<(f64, usize, HeadWeights)> = None;

    for epoch in 1..=cfg.epochs {
        rng.shuffle(&mut order);
        let (mut loss_sum, mut right) = (0.0, 0);
        for idx in order.chunks(cfg.batch_size.max(1)) {
            let x = batch_tensor(train, idx, device)?;
            let mask = dropout_mask(&mut rng, cfg.dropout, (idx.len(), train.dim), device)?;
            let labels: Vec<usize> = idx.iter().map(|&i| train.labels[i]).collect();
            let logits = head.forward(&x, mask.as_ref())?;
            let l = loss(&logits, &labels, classes, cfg.label_smoothing, &weights)?;
            opt.backward_step(&l)?;
            loss_sum += l.to_scalar::<f32>()? as f64 * idx.len() as f64;
            right += correct(&logits, &labels)?;
        }
        let (val_loss, val_accuracy) = evaluate(&head, val, classes, device)?;
        let m = EpochMetrics {
            epoch,
            train_loss: loss_sum / train.len() as f64,
            train_accuracy: right as f64 / train.len() as f64,
            val_loss,
            val_accuracy,
            lr: Some(cfg.lr),
            backbone_lr: None,
        };
        on_epoch(&m);
        history.push(m);
        // Without validation photos, the last epoch is the one kept.
        let score = if val_loss.is_nan() {
            -(epoch as f64)
        } else {
            val_loss
        };
        if best.as_ref().is_none_or(|(b, _, _)| score < *b) {
            best = Some((score, epoch, head.weights()?));
        } else if best
            .as_ref()
            .is_some_and(|(_, e, _)| epoch - e >= cfg.patience)
        {
            tracing::info!(
                "early stop at epoch {epoch}: no better validation loss for {} epochs",
                cfg.patience
            );
            break;
        }
    }
    let (_, best_epoch, head) = best.expect("at least one epoch ran");
    Ok(TrainOutcome {
        head,
        best_epoch,
        history,
        class_weights: weights,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two separable Gaussian blobs in 16 dimensions.
    fn blobs(n: usize, seed: u64) -> FeatureSet {
        let mut rng = SplitMix64::new(seed);
        let dim = 16;
        let mut set = FeatureSet {
            dim,
            ..Default::default()
        };
        for i in 0..n {
            let label = i % 2;
            for d in 0..dim {
                let centre = if (d % 2 == 0) == (label == 0) {
                    1.0
                } else {
                    0.0
                };
                set.features.push(centre + 0.3 * (rng.next_f32() - 0.5));
            }
            set.labels.push(label);
            set.paths.push(format!("{i}.jpg").into());
            set.content_sha256.push(format!("{i:064}"));
        }
        set
    }

    #[test]
    fn learns_separable_data_and_same_seed_gives_same_head() {
        let (tr, va) = (blobs(200, 1), blobs(60, 2));
        let cfg = TrainConfig {
            epochs: 30,
            lr: 1e-2,
            ..Default::default()
        };
        let a = train(&tr, &va, 2, &cfg, &Device::Cpu, |_| {}).unwrap();
        let b = train(&tr, &va, 2, &cfg, &Device::Cpu, |_| {}).unwrap();
        assert_eq!(a.head, b.head);
        let last = a.history.last().unwrap();
        assert!(
            last.val_accuracy > 0.99,
            "val accuracy {}",
            last.val_accuracy
        );
        assert!(a.history[0].train_loss > last.train_loss);
        let c = train(
            &tr,
            &va,
            2,
            &TrainConfig { seed: 7, ..cfg },
            &Device::Cpu,
            |_| {},
        )
        .unwrap();
        assert_ne!(a.head, c.head);
    }

    #[test]
    fn early_stopping_keeps_the_best_epoch() {
        // Labels unrelated to features: validation loss stops improving quickly.
        let mut tr = blobs(100, 3);
        let mut rng = SplitMix64::new(9);
        tr.labels
            .iter_mut()
            .for_each(|l| *l = (rng.next_u64() % 2) as usize);
        let va = blobs(40, 4);
        let cfg = TrainConfig {
            epochs: 200,
            lr: 5e-2,
            patience: 3,
            ..Default::default()
        };
        let out = train(&tr, &va, 2, &cfg, &Device::Cpu, |_| {}).unwrap();
        assert!(out.history.len() < 200, "did not stop early");
        assert_eq!(out.history.len(), out.best_epoch + 3);
        let best = &out.history[out.best_epoch - 1];
        assert!(out.history.iter().all(|m| m.val_loss >= best.val_loss));
    }

    #[test]
    fn class_weights_only_when_imbalanced() {
        assert_eq!(class_weights(&[0, 1, 0, 1], 2), vec![1.0, 1.0]);
        let w = class_weights(&[0, 0, 0, 1], 2);
        assert!((w[0] - 4.0 / 6.0).abs() < 1e-6 && (w[1] - 2.0).abs() < 1e-6);
    }

    #[test]
    fn label_smoothing_and_weights_change_the_loss() {
        let dev = Device::Cpu;
        let logits = Tensor::new(&[[2f32, 0.0], [0.0, 1.0]], &dev).unwrap();
        let plain = loss(&logits, &[0, 1], 2, 0.0, &[1.0, 1.0])
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // By hand: mean of -ln(sigmoid(2)) and -ln(sigmoid(1)).
        let expected =
            (-(1.0 / (1.0 + (-2f32).exp())).ln() - (1.0 / (1.0 + (-1f32).exp())).ln()) / 2.0;
        assert!((plain - expected).abs() < 1e-5);
        let smooth = loss(&logits, &[0, 1], 2, 0.2, &[1.0, 1.0])
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(smooth > plain);
        let weighted = loss(&logits, &[0, 1], 2, 0.0, &[1.0, 3.0])
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(weighted > plain); // the harder sample counts 3x
    }
}
