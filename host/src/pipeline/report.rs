//! The run's [`Report`], assembled from the artifacts of the stages.

use std::time::Instant;

use candle_core::Device;

use crate::dataset::{self, Split};
use crate::export::onnx;
use crate::features::FeatureSet;
use crate::report::{self as r, Misclassified, Report};

use super::verify::Written;
use super::{Config, Fitted, Trained};

/// The report of a run that started at `started`, and its most confident mistakes.
pub fn assemble(config: &Config, fitted: &Fitted, written: &Written, started: Instant) -> Trained {
    let misclassified = misclassified(fitted);
    let exported = written.exported();
    let verified = &written.verified;
    let backbone = &fitted.backbone;
    let check = &verified.check;
    let report = Report {
        petcam_version: env!("CARGO_PKG_VERSION").into(),
        created: exported.created.clone(),
        backbone: r::BackboneInfo {
            name: backbone.name.clone(),
            weights: fitted.backbone_config.weights.display().to_string(),
            weights_sha256: backbone.weights_sha256.clone(),
            input_size: backbone.input_size as u32,
            feature_dim: backbone.feature_dim(),
        },
        dataset: dataset_info(config, fitted),
        skipped: fitted.skipped.clone(),
        training: training_info(config, fitted),
        evaluation: fitted.evaluation.clone(),
        export: Some(r::ExportInfo {
            model: exported.model_path.display().to_string(),
            model_bytes: written.model_bytes,
            opset: onnx::OPSET,
            mirror_average: exported.mirror_average,
            verify_images: check.float.images,
            candle_accuracy: check.float.candle_accuracy,
            onnx_accuracy: check
                .quantized
                .as_ref()
                .map_or(check.float.tract_accuracy, |q| q.accuracy),
            float_agreement: check.float.agreement,
            float_max_probability_diff: check.float.max_probability_diff,
            tract_ms_per_image: check.ms_per_image,
            quantization: quantization_info(written),
        }),
        timings: r::Timings {
            dataset_s: fitted.features.dataset_s,
            features_s: fitted.features.features_s,
            features_cached: fitted.features.cached,
            features_computed: fitted.features.computed,
            backbone_images_per_s: fitted.features.images_per_s,
            train_s: fitted.train_s,
            export_s: written.export_s,
            verify_s: verified.verify_s,
            total_s: started.elapsed().as_secs_f64(),
            peak_rss_mb: petcam_runtime::peak_rss_mb(),
        },
    };
    Trained {
        report,
        misclassified,
    }
}

fn dataset_info(config: &Config, fitted: &Fitted) -> r::DatasetInfo {
    let ds = &fitted.dataset;
    r::DatasetInfo {
        root: config.data.root.display().to_string(),
        layout: match ds.split {
            Split::Folders => "train-val-folders".into(),
            Split::Hash { .. } => "hash-split".into(),
        },
        val_fraction: match ds.split {
            Split::Folders => None,
            Split::Hash { val_fraction } => Some(val_fraction),
        },
        digest: fitted.digest.clone(),
        classes: ds.classes.clone(),
        train_counts: count(&fitted.train, ds.classes.len()),
        val_counts: count(&fitted.val, ds.classes.len()),
    }
}

fn training_info(config: &Config, fitted: &Fitted) -> r::TrainingInfo {
    let cfg = &config.training.head;
    let outcome = &fitted.outcome;
    r::TrainingInfo {
        device: device_name(&config.training.device).into(),
        epochs_requested: cfg.epochs,
        epochs_run: outcome.history.len(),
        best_epoch: outcome.best_epoch,
        lr: cfg.lr,
        weight_decay: cfg.weight_decay,
        batch_size: cfg.batch_size,
        dropout: cfg.dropout,
        label_smoothing: cfg.label_smoothing,
        seed: cfg.seed,
        class_weights: outcome.class_weights.clone(),
        early_stopping_patience: cfg.patience,
        augmentation: fitted.augmentation.clone(),
        fine_tune: fitted.fine_tune.clone(),
        history: outcome.history.clone(),
    }
}

/// The name `--device` takes.
fn device_name(device: &Device) -> &'static str {
    match device {
        Device::Cpu => "cpu",
        Device::Cuda(_) => "cuda",
        Device::Metal(_) => "metal",
    }
}

fn quantization_info(written: &Written) -> r::QuantizationInfo {
    let verified = &written.verified;
    let check = &verified.check;
    let latency = check
        .quantized_latency
        .clone()
        .unwrap_or_else(|| check.float_latency.clone());
    let (accuracy, agreement, max_probability_diff, mean_probability_diff) = match &check.quantized
    {
        Some(q) => (
            q.accuracy,
            q.agreement,
            q.max_probability_diff,
            q.mean_probability_diff,
        ),
        None => (check.float.tract_accuracy, 1.0, 0.0, 0.0),
    };
    let graph = &verified.graph;
    r::QuantizationInfo {
        form: written.exported().form().into(),
        calibration: written.calibration().map(|c| r::CalibrationInfo {
            method: c.method.into(),
            images: c.images,
            tensors: c.ranges.len(),
        }),
        float_model: written.float_model_file.clone(),
        float_model_bytes: written.float_model_bytes,
        size_ratio: written.model_bytes as f64 / written.float_model_bytes as f64,
        float_accuracy: check.float.tract_accuracy,
        accuracy,
        agreement,
        max_probability_diff,
        mean_probability_diff,
        latency_ratio: latency.p50_ms / check.float_latency.p50_ms,
        float_latency: check.float_latency.clone(),
        latency,
        int8_layers: graph.int8_layers,
        int8_weight_layers: graph.int8_weight_layers,
        float_weight_layers: graph.float_weight_layers,
        profile_by_layer: crate::model::time_by_layer_kind(&verified.profile, graph),
        profile: crate::model::time_by_op(&verified.profile),
        accuracy_drop_accepted: verified.accuracy_drop_accepted,
    }
}

fn count(set: &FeatureSet, classes: usize) -> Vec<usize> {
    let mut c = vec![0; classes];
    for &l in &set.labels {
        c[l] += 1;
    }
    c
}

/// The most confident mistakes: the most instructive (and the likeliest label errors).
fn misclassified(fitted: &Fitted) -> Vec<Misclassified> {
    let (val, predicted, probs) = (&fitted.val, &fitted.predicted, &fitted.probabilities);
    let classes = &fitted.dataset.classes;
    let mut wrong: Vec<usize> = (0..val.len())
        .filter(|&i| predicted[i] != val.labels[i])
        .collect();
    wrong.sort_by(|&a, &b| probs[b][predicted[b]].total_cmp(&probs[a][predicted[a]]));
    wrong
        .into_iter()
        .take(r::MAX_MISCLASSIFIED_SHOWN)
        .filter_map(|i| {
            let img = dataset::load_rgb(&val.paths[i]).ok()?;
            Some(Misclassified {
                thumbnail: img,
                true_label: classes[val.labels[i]].clone(),
                predicted_label: classes[predicted[i]].clone(),
                confidence: probs[i][predicted[i]],
            })
        })
        .collect()
}
