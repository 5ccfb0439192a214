//! Stage 2: the head trained (and, when fine-tuning, the top blocks), then scored on the
//! validation photos.

use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use crate::backbone::Backbone;
use crate::dataset::Dataset;
use crate::features::{self, FeatureSet, View};
use crate::finetune::{self, FineTuneConfig};
use crate::model::top1;
use crate::report::{AugmentationInfo, Evaluation, FineTuneInfo, SkippedFile};
use crate::train::{self, EpochMetrics, TrainConfig, TrainError, TrainOutcome};

use super::{BackboneConfig, Extracted, FineTune, PipelineError, TrainingConfig, TrainingMode};

/// A trained model and what the trainer computes on the validation photos: the reference the
/// export is checked against.
#[derive(Debug)]
pub struct Fitted {
    pub dataset: Dataset,
    /// The backbone the export carries: fine-tuned (BatchNorm folded), or as loaded.
    pub backbone: Backbone,
    pub backbone_config: BackboneConfig,
    pub outcome: TrainOutcome,
    /// Pooled features through [`Fitted::backbone`].
    pub train: FeatureSet,
    pub val: FeatureSet,
    pub mirror_val: Option<FeatureSet>,
    /// Validation probabilities (averaged with the mirror's for a mirror-averaging model).
    pub probabilities: Vec<Vec<f32>>,
    pub predicted: Vec<usize>,
    pub evaluation: Evaluation,
    pub digest: String,
    pub fine_tune: Option<FineTuneInfo>,
    pub augmentation: Option<AugmentationInfo>,
    /// From the extraction stage, for the report.
    pub skipped: Vec<SkippedFile>,
    pub features: FeatureTimings,
    pub train_s: f64,
}

/// What feature extraction cost.
#[derive(Debug, Clone, Copy)]
pub struct FeatureTimings {
    pub dataset_s: f64,
    pub features_s: f64,
    pub cached: usize,
    pub computed: usize,
    pub images_per_s: Option<f64>,
}

/// Trains as `config.mode` says, on the extracted rows.
pub fn fit(
    extracted: Extracted,
    config: &TrainingConfig,
    extract_batch: usize,
) -> Result<Fitted, PipelineError> {
    let t0 = Instant::now();
    let classes = extracted.dataset.classes.len();
    let (computed, images_per_s) = extracted.computed();
    let features = FeatureTimings {
        dataset_s: extracted.dataset_s,
        features_s: extracted.features_s,
        cached: extracted.cached(),
        computed,
        images_per_s,
    };
    let bar = epoch_bar(config.head.epochs);
    let show = |m: &EpochMetrics| {
        bar.set_prefix(format!(
            "train loss {:.4} acc {:.2}% | val loss {:.4} acc {:.2}%",
            m.train_loss,
            m.train_accuracy * 100.0,
            m.val_loss,
            m.val_accuracy * 100.0
        ));
        bar.inc(1);
    };
    let Extracted {
        dataset,
        mut backbone,
        backbone_config,
        tap,
        mut train,
        mut val,
        mut mirror_val,
        views,
        skipped,
        ..
    } = extracted;
    let (outcome, fine_tune, augmentation) = match &config.mode {
        TrainingMode::Probe { .. } => {
            bar.set_message("head");
            // The head trains on the photos and their views; the digest and the report's
            // counts stay with the photos themselves.
            let mut rows = train.clone();
            let augmentation = views.map(|(set, views)| {
                rows.append(&set);
                AugmentationInfo {
                    kind: views.policy.kind(),
                    views_per_photo: views.per_photo,
                    training_rows: rows.len(),
                    on_the_fly: false,
                    views_s: None,
                }
            });
            let outcome = train::train(&rows, &val, classes, &config.head, &config.device, show)?;
            (outcome, None, augmentation)
        }
        TrainingMode::FineTune(params) => {
            bar.set_message("fine-tune");
            let blocks = backbone.blocks.len();
            let cut = blocks - params.unfreeze;
            let ft_cfg = FineTuneConfig {
                unfreeze: params.unfreeze,
                head: config.head.clone(),
                backbone_lr: params.backbone_lr,
                train_bn: params.train_bn,
            };
            let mut view_stats = Vec::new();
            // With views each epoch trains on a fresh view of every photo, through the frozen
            // blocks again; the views are not cached (each is seen once).
            let mut epoch_rows = |epoch: usize| -> Result<Option<FeatureSet>, TrainError> {
                let Some(policy) = params.views else {
                    return Ok(None);
                };
                let view = View::Augmented {
                    policy,
                    index: epoch as u32,
                };
                let (set, stats) = bar
                    .suspend(|| {
                        features::extract_at(
                            &backbone,
                            tap,
                            &dataset.train,
                            Some(view),
                            None,
                            extract_batch,
                            &format!("views {epoch}"),
                        )
                    })
                    .map_err(|e| TrainError::Views(e.to_string()))?;
                view_stats.push(stats);
                Ok(Some(set))
            };
            let tuned = finetune::fine_tune(
                &backbone,
                &train,
                &val,
                classes,
                &ft_cfg,
                &mut epoch_rows,
                show,
            )?;
            // From here on the exported (fine-tuned, BatchNorm folded) backbone is the
            // reference: pooled features through it are what model.onnx computes.
            train = finetune::pooled_features(&tuned.backbone, cut, &train)?;
            val = finetune::pooled_features(&tuned.backbone, cut, &val)?;
            if let Some(m) = &mut mirror_val {
                *m = finetune::pooled_features(&tuned.backbone, cut, m)?;
            }
            backbone = tuned.backbone;
            let augmentation = params.views.map(|policy| AugmentationInfo {
                kind: policy.kind(),
                views_per_photo: view_stats.len() as u32,
                training_rows: train.len(),
                on_the_fly: true,
                views_s: Some(view_stats.iter().map(|s| s.seconds).sum()),
            });
            let info = fine_tune_info(params, blocks, tuned.stats);
            (tuned.outcome, Some(info), augmentation)
        }
    };
    bar.finish_and_clear();
    let train_s = t0.elapsed().as_secs_f64();

    let probabilities = probabilities(&outcome, &val, mirror_val.as_ref());
    let predicted: Vec<usize> = probabilities.iter().map(|p| top1(p).0).collect();
    let evaluation = Evaluation::from_predictions(&dataset.classes, &val.labels, &predicted);
    let digest = features::dataset_digest(&dataset.classes, &train, &val);
    Ok(Fitted {
        dataset,
        backbone,
        backbone_config,
        outcome,
        train,
        val,
        mirror_val,
        probabilities,
        predicted,
        evaluation,
        digest,
        fine_tune,
        augmentation,
        skipped,
        features,
        train_s,
    })
}

fn epoch_bar(epochs: usize) -> ProgressBar {
    ProgressBar::new(epochs as u64).with_style(
        ProgressStyle::with_template("{msg:>10} [{bar:30}] epoch {pos}/{len} {prefix}")
            .expect("a valid progress template")
            .progress_chars("=> "),
    )
}

fn fine_tune_info(
    params: &FineTune,
    blocks: usize,
    stats: finetune::FineTuneStats,
) -> FineTuneInfo {
    FineTuneInfo {
        unfrozen_blocks: params.unfreeze,
        total_blocks: blocks,
        backbone_lr: params.backbone_lr,
        train_bn: params.train_bn,
        schedule: "linear probe, then cosine decay of both rates over the epochs".into(),
        stats,
    }
}

/// The trainer's validation probabilities; a mirror-averaging model averages each photo's with
/// its mirror's, as the exported graph does.
fn probabilities(
    outcome: &TrainOutcome,
    val: &FeatureSet,
    mirror: Option<&FeatureSet>,
) -> Vec<Vec<f32>> {
    (0..val.len())
        .map(|i| {
            let p = outcome.head.probabilities(val.row(i));
            match mirror {
                Some(m) => {
                    let q = outcome.head.probabilities(m.row(i));
                    p.iter().zip(q).map(|(a, b)| (a + b) / 2.0).collect()
                }
                None => p,
            }
        })
        .collect()
}

/// Epochs a mode trains for when none are asked for.
pub fn default_epochs(mode: &TrainingMode) -> usize {
    match mode {
        TrainingMode::Probe { .. } => TrainConfig::default().epochs,
        TrainingMode::FineTune(_) => FINE_TUNE_EPOCHS,
    }
}

/// Default epochs when fine-tuning: each runs the unfrozen blocks forward and backward.
pub const FINE_TUNE_EPOCHS: usize = 12;
