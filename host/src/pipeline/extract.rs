//! Stage 1: the photos found and split, the backbone loaded, and what the backbone computes for
//! every photo (cached on disk).

use std::time::Instant;

use crate::backbone::{Backbone, Tap};
use crate::dataset::{self, Dataset};
use crate::features::{self, ExtractStats, FeatureCache, FeatureSet, View};
use crate::report::SkippedFile;

use super::{
    BackboneConfig, CachedViews, DataConfig, FeatureConfig, PipelineError, TrainingConfig,
    TrainingMode,
};

/// The photos and their features, ready to train on.
#[derive(Debug)]
pub struct Extracted {
    pub dataset: Dataset,
    pub backbone: Backbone,
    pub backbone_config: BackboneConfig,
    /// Where the rows come from: pooled features, or the input of the first unfrozen block.
    pub tap: Tap,
    pub train: FeatureSet,
    pub val: FeatureSet,
    /// The validation photos mirrored, for a mirror-averaging export.
    pub mirror_val: Option<FeatureSet>,
    /// Cached augmented views of the training photos, and their policy.
    pub views: Option<(FeatureSet, CachedViews)>,
    /// Training, validation and (when computed) view extraction, in that order.
    pub stats: Vec<ExtractStats>,
    pub skipped: Vec<SkippedFile>,
    pub dataset_s: f64,
    pub features_s: f64,
}

impl Extracted {
    /// Photos computed (not read from the cache), and their throughput.
    pub fn computed(&self) -> (usize, Option<f64>) {
        let computed: usize = self.stats.iter().map(|s| s.computed).sum();
        let compute_s: f64 = self
            .stats
            .iter()
            .filter_map(|s| s.images_per_s.map(|r| s.computed as f64 / r))
            .sum();
        let rate = (computed > 0 && compute_s > 0.0).then(|| computed as f64 / compute_s);
        (computed, rate)
    }

    pub fn cached(&self) -> usize {
        self.stats.iter().map(|s| s.cached).sum()
    }
}

/// Finds the photos, loads the backbone and computes (or reads) the features every later
/// stage needs. `mirror` adds the mirrored validation photos.
pub fn extract(
    data: &DataConfig,
    backbone_config: &BackboneConfig,
    features_config: &FeatureConfig,
    training: &TrainingConfig,
    mirror: bool,
) -> Result<Extracted, PipelineError> {
    let t0 = Instant::now();
    let ds = Dataset::discover(&data.root, data.val_fraction)?;
    tracing::info!(
        "{}: classes {:?}, {} training and {} validation photos",
        data.root.display(),
        ds.classes,
        ds.train.len(),
        ds.val.len()
    );
    let dataset_s = t0.elapsed().as_secs_f64();
    let backbone = load_backbone(backbone_config, training)?;
    let tap = match &training.mode {
        TrainingMode::Probe { .. } => Tap::Pooled,
        // Fine-tuning caches what the frozen blocks hand to the first unfrozen one.
        TrainingMode::FineTune(f) => Tap::Block(backbone.blocks.len() - f.unfreeze),
    };
    let cache = features_config
        .cache_root
        .as_ref()
        .map(|root| FeatureCache::at(root, &backbone, tap));
    let batch = features_config.extract_batch;

    let t_feat = Instant::now();
    let at = |samples: &[dataset::Sample], view: Option<View>, what: &str| {
        features::extract_at(&backbone, tap, samples, view, cache.as_ref(), batch, what)
    };
    let (train, train_stats) = at(&ds.train, None, "train")?;
    let (val, val_stats) = at(&ds.val, None, "val")?;
    // A mirror-averaging model is checked against candle on the mirrored validation photos too.
    let mirror_val = if mirror {
        if val.is_empty() {
            return Err(PipelineError::MirrorWithoutValidation {
                data: data.root.clone(),
            });
        }
        let (set, _) = at(&ds.val, Some(View::Mirror), "mirror")?;
        if set.paths != val.paths {
            return Err(PipelineError::MirrorMismatch);
        }
        Some(set)
    } else {
        None
    };
    for (label, dir) in ds.class_dirs.iter().enumerate() {
        if !train.labels.contains(&label) {
            return Err(dataset::DatasetError::EmptyClass { path: dir.clone() }.into());
        }
    }
    let skipped = skipped(&[&train_stats, &val_stats]);
    let mut stats = vec![train_stats, val_stats];
    let views = match &training.mode {
        TrainingMode::Probe {
            views: Some(views @ CachedViews { per_photo, .. }),
        } if *per_photo > 0 => {
            let (set, s) = features::extract_augmented(
                &backbone,
                &ds.train,
                views.policy,
                views.per_photo,
                cache.as_ref(),
                batch,
                "augment",
            )?;
            stats.push(s);
            Some((set, *views))
        }
        _ => None,
    };
    let extracted = Extracted {
        dataset: ds,
        backbone,
        backbone_config: backbone_config.clone(),
        tap,
        train,
        val,
        mirror_val,
        views,
        stats,
        skipped,
        dataset_s,
        features_s: t_feat.elapsed().as_secs_f64(),
    };
    if let (computed, Some(r)) = extracted.computed() {
        tracing::info!(
            "features: {computed} computed at {r:.1} photos/s, {} from cache",
            extracted.cached()
        );
    }
    Ok(extracted)
}

fn load_backbone(
    config: &BackboneConfig,
    training: &TrainingConfig,
) -> Result<Backbone, PipelineError> {
    let backbone = Backbone::load_with(
        &config.name,
        &config.weights,
        &training.device,
        config.options,
    )
    .map_err(|source| PipelineError::Backbone {
        name: config.name.clone(),
        source: Box::new(source),
    })?;
    let blocks = backbone.blocks.len();
    let unfreeze = training.mode.unfrozen_blocks();
    if unfreeze > blocks {
        return Err(PipelineError::TooManyBlocks {
            unfreeze,
            backbone: backbone.name.clone(),
            blocks,
        });
    }
    Ok(backbone)
}

/// The unreadable photos, for the report (a warning says how many).
fn skipped(stats: &[&ExtractStats]) -> Vec<SkippedFile> {
    let skipped: Vec<SkippedFile> = stats
        .iter()
        .flat_map(|s| &s.skipped)
        .map(|s| SkippedFile {
            path: s.path.display().to_string(),
            reason: s.reason.clone(),
        })
        .collect();
    if !skipped.is_empty() {
        tracing::warn!(
            "{} photo(s) could not be read and were skipped (listed in the report)",
            skipped.len()
        );
    }
    skipped
}
