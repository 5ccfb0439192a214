//! `petcam train-and-export`: photos in, one verified ONNX model and a report out.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use base64::Engine;
use candle_core::Device;
use petcam_shared::metadata;
use prost::Message;

use crate::backbone::{Backbone, LoadOptions, Tap};
use crate::dataset::{self, Dataset, Split};
use crate::export::calibrate::{self, RangeMethod};
use crate::export::quantize::QuantizeForm;
use crate::export::{onnx, verify};
use crate::features::{self, FeatureCache, FeatureSet, View};
use crate::finetune::{self, FineTuneConfig};
use crate::model::{top1, ExportedModel};
use crate::report::{self, Misclassified, Report};
use crate::train::{self, TrainConfig};

/// Default epochs with --unfreeze: each runs the unfrozen blocks forward and backward.
const FINE_TUNE_EPOCHS: usize = 12;

/// Backbones `--backbone` accepts, with the file `tools/fetch-backbone` puts in the cache.
const BACKBONES: &[(&str, &str)] = &[
    ("efficientnet-lite0", "efficientnet-lite0-57934424.pth"),
    ("efficientnet-lite1", "efficientnet-lite1-77cc7160.pth"),
    ("efficientnet-lite2", "efficientnet-lite2-9656183e.pth"),
];

/// Train a classifier on photo folders and export it as one ONNX model.
///
/// A backbone pretrained on ImageNet is kept frozen; its features for every photo are computed
/// once and cached on disk; a new head (dropout + linear) learns your classes; backbone and head
/// are exported as one ONNX model that takes RGB bytes and returns class probabilities. The
/// model is then loaded with tract and checked against the trainer on the validation photos.
///
/// With --unfreeze N the top N blocks of the backbone and its head convolution train too (at
/// --backbone-lr); what the frozen blocks below hand them is cached instead of the pooled
/// features, so an epoch runs only the unfrozen part. The exported model carries the
/// fine-tuned weights.
///
/// OUT receives model.onnx, report.json, report.md, training_curves.png,
/// confusion_matrix.png and misclassified.jpg.
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Photo folder: DIR/<class>/* (validation split by file-name hash) or
    /// DIR/train/<class>/* plus DIR/val/<class>/*. JPEG, PNG, WebP and BMP.
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    /// Output folder for the model and the report (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Backbone weights: .pth (legacy or zip) or .safetensors; for mobilenet-v2 also a
    /// TensorFlow Lite model. Default (EfficientNet-Lite): the file `tools/fetch-backbone
    /// [--backbone NAME]` put in the cache folder.
    #[arg(long, value_name = "FILE")]
    pub weights: Option<PathBuf>,
    /// Backbone network. Lite1 and Lite2 are larger EfficientNet-Lites: more accurate, slower
    /// on the camera. mobilenet-v2 reads torchvision or timm state dicts, or a TFLite model (see
    /// `petcam import-backbone`).
    #[arg(long, default_value = "efficientnet-lite0", value_parser = crate::backbone::NAMES.to_vec())]
    pub backbone: String,
    /// Input height and width in pixels: a multiple of 32 from 64 to 512. Smaller is faster on
    /// the camera and less accurate; larger sees small or low-resolution pets better
    /// [default: 224; 256 for efficientnet-lite1 and -lite2].
    #[arg(long, value_name = "PIXELS")]
    pub input_size: Option<usize>,
    /// MobileNetV2 width multiplier (0.35, 0.5, 0.75 or 1.0) the weights must have. Default:
    /// whatever the weights have.
    #[arg(long, value_name = "W")]
    pub width_multiplier: Option<f32>,
    /// Fraction of photos held out for validation with the DIR/<class> layout.
    #[arg(long, default_value_t = 0.2)]
    pub val_fraction: f32,
    /// Maximum training epochs (early stopping usually ends sooner) [default: 60, or 12 with
    /// --unfreeze].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Fine-tune the top N blocks of the backbone and its head convolution together with the
    /// head (0 = the whole backbone stays frozen). The head first learns on the frozen
    /// backbone (a linear probe), then both learning rates follow a cosine decay.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub unfreeze: usize,
    /// AdamW learning rate of the unfrozen backbone layers [default: --lr / 10].
    #[arg(long, value_name = "LR", requires = "unfreeze")]
    pub backbone_lr: Option<f64>,
    /// Update the BatchNorm statistics of the unfrozen blocks from each batch (PyTorch's
    /// train mode). By default ImageNet's statistics stay, which suits small batches.
    #[arg(long, requires = "unfreeze")]
    pub train_bn: bool,
    /// Augment the training photos: a random resized crop (at least 35% of the photo, aspect
    /// 3:4 to 4:3), a horizontal flip and mild colour jitter (brightness, contrast and
    /// saturation within 20%), drawn from --seed. With a frozen backbone, --augment-views
    /// views of each photo are computed once and their features cached; the head trains on
    /// the photos and their views. With --unfreeze, every epoch draws a new view of each
    /// photo. Validation photos are never augmented.
    #[arg(long)]
    pub augment: bool,
    /// With --augment, shrink half of the views to between half the input size and the input
    /// size before resizing them to the input: a pet far from the camera, a low-resolution
    /// camera or a small photo, whose pixels reach the network soft and upscaled.
    #[arg(long, requires = "augment")]
    pub augment_low_res: bool,
    /// Export a model that averages the probabilities of each frame and of its mirror image
    /// (flipped left to right) inside the graph: a little steadier on hard photos, twice the
    /// inference time. The validation figures and the verification include the mirror too.
    #[arg(long)]
    pub mirror_average: bool,
    /// Augmented views per training photo, with --augment and a frozen backbone.
    #[arg(long, default_value_t = 4, value_name = "K", requires = "augment")]
    pub augment_views: u32,
    /// AdamW learning rate (of the head, when fine-tuning).
    #[arg(long, default_value_t = TrainConfig::default().lr)]
    pub lr: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = TrainConfig::default().weight_decay)]
    pub weight_decay: f64,
    /// Photos per training step.
    #[arg(long, default_value_t = TrainConfig::default().batch_size)]
    pub batch_size: usize,
    /// Dropout on the features during training.
    #[arg(long, default_value_t = TrainConfig::default().dropout)]
    pub dropout: f32,
    /// Label smoothing of the cross-entropy targets (0 = off).
    #[arg(long, default_value_t = TrainConfig::default().label_smoothing)]
    pub label_smoothing: f32,
    /// Stop after this many epochs without a better validation loss.
    #[arg(long, default_value_t = TrainConfig::default().patience)]
    pub patience: usize,
    /// Seed for shuffling and dropout: the same seed and photos give the same model.
    #[arg(long, default_value_t = TrainConfig::default().seed)]
    pub seed: u64,
    /// Where training runs. `cuda` needs a build with `--features cuda` and an NVIDIA GPU.
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda"])]
    pub device: String,
    /// Photos per backbone forward pass on a GPU. On CPU each pass takes one photo and each
    /// core runs its own pass, which is faster there.
    #[arg(long, default_value_t = 32)]
    pub extract_batch: usize,
    /// Cache folder for features and fetched weights [default: $PETCAM_CACHE, else
    /// $XDG_CACHE_HOME/petcam, else ~/.cache/petcam].
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Recompute every feature instead of reading or writing the cache.
    #[arg(long)]
    pub no_cache: bool,
    /// Minimum top-1 agreement between the float ONNX model (tract) and the trainer (candle);
    /// below it the exporter itself is wrong and nothing is written.
    #[arg(long, default_value_t = 0.995)]
    pub min_agreement: f64,
    /// How model.onnx stores its numbers:
    ///   int8-weights  per-channel int8 weights restored to float at load: ~27% of the
    ///                 float size, float accuracy and speed (the default);
    ///   int8          int8 weights and u8 activations (QLinearConv, QLinearMatMul), ranges
    ///                 calibrated on training photos: for runtimes with int8 kernels;
    ///   none          float32.
    #[arg(long, value_enum, default_value = "int8-weights", verbatim_doc_comment)]
    pub quantize: QuantizeForm,
    /// Training photos the float model runs over to calibrate `--quantize int8`.
    #[arg(long, default_value_t = 200, value_name = "N")]
    pub calibration_images: usize,
    /// How `--quantize int8` turns calibration values into ranges: `percentile` lets the
    /// rarest 0.01% of values at each end saturate, `min-max` keeps every value.
    #[arg(long, value_enum, default_value = "percentile")]
    pub calibration_method: RangeMethod,
    /// Single-thread tract runs per model for the latency comparison of the verification.
    #[arg(long, default_value_t = 50, value_name = "N")]
    pub latency_runs: usize,
    /// Also write the float model as model-f32.onnx when model.onnx is quantized.
    #[arg(long)]
    pub keep_float: bool,
    /// Write the model even if quantization costs more than 1 point of validation accuracy.
    /// The report then carries a warning.
    #[arg(long)]
    pub allow_accuracy_drop: bool,
    /// Print the report as JSON on stdout when done.
    #[arg(long)]
    pub json: bool,
}

/// Picks the compute device, with an error that says how to get the one asked for.
pub fn select_device(name: &str) -> anyhow::Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" if !cfg!(feature = "cuda") => bail!(
            "this petcam was built without CUDA support; rebuild with \
             `cargo build --release --features cuda` (needs the CUDA toolkit), or use --device cpu"
        ),
        "cuda" => Device::new_cuda(0).map_err(|e| {
            anyhow::anyhow!("no usable NVIDIA GPU ({e}); check `nvidia-smi`, or use --device cpu")
        }),
        other => bail!("unknown device {other:?}; use cpu or cuda"),
    }
}

fn resolve_weights(args: &Args, cache_root: &Path) -> anyhow::Result<PathBuf> {
    if let Some(w) = &args.weights {
        if !w.is_file() {
            bail!("weights file {} does not exist", w.display());
        }
        return Ok(w.clone());
    }
    let file = BACKBONES
        .iter()
        .find(|(name, _)| *name == args.backbone)
        .map(|(_, f)| *f)
        .with_context(|| {
            format!(
                "no default weights for {}; pass --weights FILE: a torchvision or timm state \
                 dict (.pth, .safetensors), or a TFLite model such as \
                 ../shared/backbones/mobilenet_v2_1.0_224_quant.tflite",
                args.backbone
            )
        })?;
    let path = cache_root.join("backbones").join(file);
    if !path.is_file() {
        bail!(
            "no --weights given and {} is missing; run tools/fetch-backbone --backbone {} to \
             fetch the ImageNet checkpoint, or pass --weights FILE",
            path.display(),
            args.backbone
        );
    }
    Ok(path)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let device = select_device(&args.device)?;
    let cache_root = args
        .cache_dir
        .clone()
        .unwrap_or_else(features::default_cache_root);
    let weights = resolve_weights(&args, &cache_root)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create output folder {}", args.out.display()))?;

    let ds = Dataset::discover(&args.data, args.val_fraction)?;
    tracing::info!(
        "{}: classes {:?}, {} training and {} validation photos",
        args.data.display(),
        ds.classes,
        ds.train.len(),
        ds.val.len()
    );
    let t_dataset = t0.elapsed().as_secs_f64();

    let options = LoadOptions {
        input_size: args.input_size,
        width: args.width_multiplier,
    };
    let mut backbone = Backbone::load_with(&args.backbone, &weights, &device, options)
        .with_context(|| format!("loading backbone {}", args.backbone))?;
    let blocks = backbone.blocks.len();
    if args.unfreeze > blocks {
        bail!(
            "--unfreeze {} asks for more blocks than {} has ({blocks}); use 1 to {blocks}",
            args.unfreeze,
            backbone.name
        );
    }
    let cut = blocks - args.unfreeze;
    // Fine-tuning caches what the frozen blocks hand to the first unfrozen one.
    let tap = if args.unfreeze > 0 {
        Tap::Block(cut)
    } else {
        Tap::Pooled
    };
    let cache = (!args.no_cache).then(|| FeatureCache::at(&cache_root, &backbone, tap));

    let t_feat = Instant::now();
    let (mut train_set, train_stats) = features::extract_at(
        &backbone,
        tap,
        &ds.train,
        None,
        cache.as_ref(),
        args.extract_batch,
        "train",
    )?;
    let (mut val_set, val_stats) = features::extract_at(
        &backbone,
        tap,
        &ds.val,
        None,
        cache.as_ref(),
        args.extract_batch,
        "val",
    )?;
    // A mirror-averaging model is checked against candle on the mirrored validation photos too.
    let mut mirror_val = if args.mirror_average {
        if val_set.is_empty() {
            bail!(
                "--mirror-average needs validation photos to check the export against; {} has \
                 none",
                args.data.display()
            );
        }
        let (set, _) = features::extract_at(
            &backbone,
            tap,
            &ds.val,
            Some(View::Mirror),
            cache.as_ref(),
            args.extract_batch,
            "mirror",
        )?;
        if set.paths != val_set.paths {
            bail!("the mirrored validation photos differ from the photos; a photo changed while reading?");
        }
        Some(set)
    } else {
        None
    };
    for (label, dir) in ds.class_dirs.iter().enumerate() {
        if !train_set.labels.contains(&label) {
            bail!(dataset::DatasetError::EmptyClass { path: dir.clone() });
        }
    }
    // The head trains on the photos and, with --augment, their views; the digest, the
    // calibration and the report's counts stay with the photos themselves.
    let mut fit_set = train_set.clone();
    let mut augment_stats = None;
    let policy = crate::augment::Policy {
        seed: args.seed,
        low_res: args.augment_low_res,
    };
    if args.augment && args.augment_views > 0 && args.unfreeze == 0 {
        let (views, stats) = features::extract_augmented(
            &backbone,
            &ds.train,
            policy,
            args.augment_views,
            cache.as_ref(),
            args.extract_batch,
            "augment",
        )?;
        fit_set.append(&views);
        augment_stats = Some(stats);
    }
    let features_s = t_feat.elapsed().as_secs_f64();
    let skipped: Vec<report::SkippedFile> = train_stats
        .skipped
        .iter()
        .chain(&val_stats.skipped)
        .map(|s| report::SkippedFile {
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
    let all_stats: Vec<&features::ExtractStats> = [&train_stats, &val_stats]
        .into_iter()
        .chain(augment_stats.as_ref())
        .collect();
    let computed: usize = all_stats.iter().map(|s| s.computed).sum();
    let compute_s = all_stats
        .iter()
        .filter_map(|s| s.images_per_s.map(|r| s.computed as f64 / r))
        .sum::<f64>();
    let images_per_s = (computed > 0 && compute_s > 0.0).then(|| computed as f64 / compute_s);
    if let Some(r) = images_per_s {
        tracing::info!(
            "features: {computed} computed at {r:.1} photos/s, {} from cache",
            all_stats.iter().map(|s| s.cached).sum::<usize>()
        );
    }

    let default_epochs = if args.unfreeze > 0 {
        FINE_TUNE_EPOCHS
    } else {
        TrainConfig::default().epochs
    };
    let cfg = TrainConfig {
        epochs: args.epochs.unwrap_or(default_epochs),
        lr: args.lr,
        weight_decay: args.weight_decay,
        batch_size: args.batch_size,
        dropout: args.dropout,
        label_smoothing: args.label_smoothing,
        seed: args.seed,
        patience: args.patience,
    };
    let t_train = Instant::now();
    let bar = indicatif::ProgressBar::new(cfg.epochs as u64).with_style(
        indicatif::ProgressStyle::with_template("{msg:>10} [{bar:30}] epoch {pos}/{len} {prefix}")
            .unwrap()
            .progress_chars("=> "),
    );
    let show = |m: &train::EpochMetrics| {
        bar.set_prefix(format!(
            "train loss {:.4} acc {:.2}% | val loss {:.4} acc {:.2}%",
            m.train_loss,
            m.train_accuracy * 100.0,
            m.val_loss,
            m.val_accuracy * 100.0
        ));
        bar.inc(1);
    };
    let mut fine_tune = None;
    let mut view_stats = Vec::new();
    let outcome = if args.unfreeze == 0 {
        bar.set_message("head");
        train::train(&fit_set, &val_set, ds.classes.len(), &cfg, &device, show)?
    } else {
        bar.set_message("fine-tune");
        let ft_cfg = FineTuneConfig {
            unfreeze: args.unfreeze,
            head: cfg.clone(),
            backbone_lr: args.backbone_lr.unwrap_or(args.lr / 10.0),
            train_bn: args.train_bn,
        };
        // With --augment each epoch trains on a fresh view of every photo, through the frozen
        // blocks again; the views are not cached (each is seen once).
        let mut epoch_rows = |epoch: usize| -> Result<Option<FeatureSet>, train::TrainError> {
            if !args.augment {
                return Ok(None);
            }
            let view = View::Augmented {
                policy,
                index: epoch as u32,
            };
            let (set, stats) = bar
                .suspend(|| {
                    features::extract_at(
                        &backbone,
                        tap,
                        &ds.train,
                        Some(view),
                        None,
                        args.extract_batch,
                        &format!("views {epoch}"),
                    )
                })
                .map_err(|e| train::TrainError::Views(e.to_string()))?;
            view_stats.push(stats);
            Ok(Some(set))
        };
        let tuned = finetune::fine_tune(
            &backbone,
            &train_set,
            &val_set,
            ds.classes.len(),
            &ft_cfg,
            &mut epoch_rows,
            show,
        )?;
        // From here on the exported (fine-tuned, BatchNorm folded) backbone is the reference:
        // pooled features through it are what model.onnx computes.
        train_set = finetune::pooled_features(&tuned.backbone, cut, &train_set)?;
        val_set = finetune::pooled_features(&tuned.backbone, cut, &val_set)?;
        if let Some(m) = &mut mirror_val {
            *m = finetune::pooled_features(&tuned.backbone, cut, m)?;
        }
        fit_set = train_set.clone();
        backbone = tuned.backbone;
        fine_tune = Some(report::FineTuneInfo {
            unfrozen_blocks: args.unfreeze,
            total_blocks: blocks,
            backbone_lr: ft_cfg.backbone_lr,
            train_bn: ft_cfg.train_bn,
            schedule: "linear probe, then cosine decay of both rates over the epochs".into(),
            stats: tuned.stats,
        });
        tuned.outcome
    };
    bar.finish_and_clear();
    let train_s = t_train.elapsed().as_secs_f64();

    let candle_probs: Vec<Vec<f32>> = (0..val_set.len())
        .map(|i| {
            let p = outcome.head.probabilities(val_set.row(i));
            match &mirror_val {
                Some(m) => {
                    let q = outcome.head.probabilities(m.row(i));
                    p.iter().zip(q).map(|(a, b)| (a + b) / 2.0).collect()
                }
                None => p,
            }
        })
        .collect();
    let predicted: Vec<usize> = candle_probs.iter().map(|p| top1(p).0).collect();
    let evaluation = report::Evaluation::from_predictions(&ds.classes, &val_set.labels, &predicted);
    let digest = features::dataset_digest(&ds.classes, &train_set, &val_set);

    // Export: the float model is always built (it is the reference of the verification);
    // the quantized one, when asked for, is what model.onnx holds.
    let t_export = Instant::now();
    let model_path = args.out.join("model.onnx");
    let float_path = args.out.join("model-f32.onnx");
    let created = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let (meta, golden_img) = model_metadata(
        &backbone,
        &ds,
        &outcome.head,
        &val_set,
        &candle_probs,
        &train_set,
        &evaluation,
        &digest,
        &created,
        args.quantize,
        None,
        args.unfreeze,
        args.mirror_average,
    )?;
    let quantized = args.quantize != QuantizeForm::None;
    let calibration = if args.quantize == QuantizeForm::Int8 {
        Some(calibrate_int8(&args, &backbone, &outcome.head, &train_set)?)
    } else {
        None
    };
    let mut float_meta = meta.clone();
    set_meta(
        &mut float_meta,
        metadata::QUANTIZATION,
        quantization_json(QuantizeForm::None, None)?,
    );
    let float_proto = onnx::build_model(
        &backbone,
        &outcome.head,
        QuantizeForm::None,
        None,
        &float_meta,
        args.mirror_average,
    )?;
    let float_bytes = float_proto.encode_to_vec();
    let float_model = ExportedModel::from_bytes(
        &float_bytes,
        if quantized { &float_path } else { &model_path },
    )?;
    let quantized_model = if quantized {
        let mut meta = meta;
        set_meta(
            &mut meta,
            metadata::QUANTIZATION,
            quantization_json(args.quantize, calibration.as_ref())?,
        );
        Some(quantized_model(
            &backbone,
            &outcome.head,
            args.quantize,
            calibration.as_ref(),
            meta,
            &golden_img,
            &model_path,
            args.mirror_average,
        )?)
    } else {
        None
    };
    let export_s = t_export.elapsed().as_secs_f64();

    // Verify before anything is written: a refused model never reaches the output folder.
    let t_verify = Instant::now();
    let check = verify::verify(
        &float_model,
        quantized_model.as_ref().map(|(m, _)| m),
        &val_set,
        &candle_probs,
        args.min_agreement,
        &golden_img,
        args.latency_runs,
    )
    .with_context(|| format!("verifying the export to {}", model_path.display()))?;
    let mut accuracy_drop_accepted = false;
    if let Some(q) = &check.quantized {
        if let Err(e) = verify::check_accuracy_drop(args.quantize.name(), q) {
            if !args.allow_accuracy_drop {
                bail!(
                    "{e}; {} was not written. Export with {}, or keep it anyway with \
                     --allow-accuracy-drop",
                    model_path.display(),
                    match args.quantize {
                        QuantizeForm::Int8 => "--quantize int8-weights or none",
                        _ => "--quantize none",
                    }
                );
            }
            tracing::warn!("{e}; writing it anyway because --allow-accuracy-drop was given");
            accuracy_drop_accepted = true;
        }
    }
    let exported_model = quantized_model
        .as_ref()
        .map(|(m, _)| m)
        .unwrap_or(&float_model);
    let profile = exported_model.profile(&golden_img, PROFILE_RUNS)?;
    let exported_graph = exported_model.graph.clone();
    let verify_s = t_verify.elapsed().as_secs_f64();

    // What verification measured travels in the file too (`petcam inspect` shows it).
    let mut float_proto = float_proto;
    let metrics = serde_json::json!({
        "val_accuracy": evaluation.accuracy,
        "val_images": val_set.len(),
        "train_images": train_set.len(),
        "tract_accuracy": check.float.tract_accuracy,
    });
    set_proto_meta(&mut float_proto, metadata::METRICS, metrics.to_string());
    let mut quantized_proto = quantized_model.map(|(_, proto)| proto);
    if let (Some(proto), Some(q)) = (&mut quantized_proto, &check.quantized) {
        let metrics = serde_json::json!({
            "val_accuracy": evaluation.accuracy,
            "val_images": val_set.len(),
            "train_images": train_set.len(),
            "tract_accuracy": q.accuracy,
            "float_tract_accuracy": q.float_accuracy,
            "agreement_with_float": q.agreement,
        });
        set_proto_meta(proto, metadata::METRICS, metrics.to_string());
    }
    let float_model_bytes = float_proto.encoded_len() as u64;
    let t_write = Instant::now();
    let model_bytes = onnx::write_model(
        quantized_proto.as_ref().unwrap_or(&float_proto),
        &model_path,
    )?;
    let float_model_file = if quantized && args.keep_float {
        onnx::write_model(&float_proto, &float_path)?;
        Some(float_path.display().to_string())
    } else {
        None
    };
    let export_s = export_s + t_write.elapsed().as_secs_f64();

    // The most confident mistakes are the most instructive (and the likeliest label errors).
    let mut wrong: Vec<usize> = (0..val_set.len())
        .filter(|&i| predicted[i] != val_set.labels[i])
        .collect();
    wrong.sort_by(|&a, &b| candle_probs[b][predicted[b]].total_cmp(&candle_probs[a][predicted[a]]));
    let misclassified: Vec<Misclassified> = wrong
        .into_iter()
        .take(report::MAX_MISCLASSIFIED_SHOWN)
        .filter_map(|i| {
            let img = dataset::load_rgb(&val_set.paths[i]).ok()?;
            Some(Misclassified {
                thumbnail: img,
                true_label: ds.classes[val_set.labels[i]].clone(),
                predicted_label: ds.classes[predicted[i]].clone(),
                confidence: candle_probs[i][predicted[i]],
            })
        })
        .collect();

    let rep = Report {
        petcam_version: env!("CARGO_PKG_VERSION").into(),
        created,
        backbone: report::BackboneInfo {
            name: backbone.name.clone(),
            weights: weights.display().to_string(),
            weights_sha256: backbone.weights_sha256.clone(),
            input_size: backbone.input_size as u32,
            feature_dim: backbone.feature_dim(),
        },
        dataset: report::DatasetInfo {
            root: args.data.display().to_string(),
            layout: match ds.split {
                Split::Folders => "train-val-folders".into(),
                Split::Hash { .. } => "hash-split".into(),
            },
            val_fraction: match ds.split {
                Split::Folders => None,
                Split::Hash { val_fraction } => Some(val_fraction),
            },
            digest: digest.clone(),
            classes: ds.classes.clone(),
            train_counts: count(&train_set, ds.classes.len()),
            val_counts: count(&val_set, ds.classes.len()),
        },
        skipped,
        training: report::TrainingInfo {
            device: args.device.clone(),
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
            augmentation: if !args.augment {
                None
            } else if fine_tune.is_some() {
                Some(report::AugmentationInfo {
                    kind: policy.kind(),
                    views_per_photo: view_stats.len() as u32,
                    training_rows: fit_set.len(),
                    on_the_fly: true,
                    views_s: Some(view_stats.iter().map(|s| s.seconds).sum()),
                })
            } else {
                augment_stats.as_ref().map(|_| report::AugmentationInfo {
                    kind: policy.kind(),
                    views_per_photo: args.augment_views,
                    training_rows: fit_set.len(),
                    on_the_fly: false,
                    views_s: None,
                })
            },
            fine_tune,
            history: outcome.history.clone(),
        },
        evaluation,
        export: Some(report::ExportInfo {
            model: model_path.display().to_string(),
            model_bytes,
            opset: onnx::OPSET,
            mirror_average: args.mirror_average,
            verify_images: check.float.images,
            candle_accuracy: check.float.candle_accuracy,
            onnx_accuracy: check
                .quantized
                .as_ref()
                .map_or(check.float.tract_accuracy, |q| q.accuracy),
            float_agreement: check.float.agreement,
            float_max_probability_diff: check.float.max_probability_diff,
            tract_ms_per_image: check.ms_per_image,
            quantization: quantization_info(
                &args,
                &check,
                calibration.as_ref(),
                float_model_file,
                float_model_bytes,
                model_bytes,
                &exported_graph,
                profile,
                accuracy_drop_accepted,
            ),
        }),
        timings: report::Timings {
            dataset_s: t_dataset,
            features_s,
            features_cached: all_stats.iter().map(|s| s.cached).sum(),
            features_computed: computed,
            backbone_images_per_s: images_per_s,
            train_s,
            export_s,
            verify_s,
            total_s: t0.elapsed().as_secs_f64(),
            peak_rss_mb: super::peak_rss_mb(),
        },
    };
    report::write_report(&args.out, &rep, &misclassified)?;

    if args.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        println!(
            "validation accuracy {:.2}% on {} photos ({} classes: {})",
            rep.evaluation.accuracy * 100.0,
            rep.evaluation.images,
            ds.classes.len(),
            ds.classes.join(", ")
        );
        let export = rep.export.as_ref().expect("exported");
        let q = &export.quantization;
        println!(
            "exported {} ({}, {:.1} MB = {:.1}% of float): tract accuracy {:.2}% (float {:.2}%), \
             same prediction as float on {:.2}%, p50 latency {:.1} ms ({:.2}x float)",
            model_path.display(),
            q.form,
            model_bytes as f64 / 1e6,
            q.size_ratio * 100.0,
            q.accuracy * 100.0,
            q.float_accuracy * 100.0,
            q.agreement * 100.0,
            q.latency.p50_ms,
            q.latency_ratio
        );
        if q.accuracy_drop_accepted {
            println!(
                "WARNING: {} loses {:.2} points of accuracy to quantization and was kept only \
                 because of --allow-accuracy-drop",
                model_path.display(),
                (q.float_accuracy - q.accuracy) * 100.0
            );
        }
        println!(
            "report: {} ({} skipped photo(s)); total {:.1} s",
            args.out.join("report.md").display(),
            rep.skipped.len(),
            rep.timings.total_s
        );
    }
    Ok(())
}

fn count(set: &FeatureSet, classes: usize) -> Vec<usize> {
    let mut c = vec![0; classes];
    for &l in &set.labels {
        c[l] += 1;
    }
    c
}

/// The model's self-description (see `petcam_shared::metadata`).
#[allow(clippy::too_many_arguments)]
fn model_metadata(
    backbone: &Backbone,
    ds: &Dataset,
    head: &crate::head::HeadWeights,
    val: &FeatureSet,
    val_probabilities: &[Vec<f32>],
    train: &FeatureSet,
    evaluation: &report::Evaluation,
    digest: &str,
    created: &str,
    form: QuantizeForm,
    calibration: Option<&calibrate::Calibration>,
    fine_tuned_blocks: usize,
    mirror_average: bool,
) -> anyhow::Result<(Vec<(String, String)>, image::RgbImage)> {
    let size = backbone.input_size as u32;
    let input = metadata::InputSpec {
        name: onnx::INPUT_NAME.into(),
        width: size,
        height: size,
        channels: 3,
        layout: "NHWC".into(),
        dtype: "uint8".into(),
        color: "RGB".into(),
        resize: metadata::RESIZE_BILINEAR_AA.into(),
        mean: backbone.normalization.mean,
        std: backbone.normalization.std,
        mirror_average,
    };
    let backbone_spec = metadata::BackboneSpec {
        name: backbone.name.clone(),
        input_size: size,
        feature_dim: backbone.feature_dim() as u32,
        weights_sha256: backbone.weights_sha256.clone(),
        fine_tuned_blocks: fine_tuned_blocks as u32,
    };
    let metrics = serde_json::json!({
        "val_accuracy": evaluation.accuracy,
        "val_images": val.len(),
        "train_images": train.len(),
    });
    // The golden pair: the first validation photo (or training photo) and the probabilities the
    // trainer computed for it. The device's self-test runs it through the model file.
    let (set, i) = if !val.is_empty() {
        (val, 0)
    } else {
        (train, 0)
    };
    let img = dataset::load_input(&set.paths[i], size, size)
        .with_context(|| format!("reading golden photo {}", set.paths[i].display()))?;
    let mut png = Vec::new();
    image::DynamicImage::ImageRgb8(img.clone())
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
    let golden = metadata::Golden {
        input_png_base64: base64::engine::general_purpose::STANDARD.encode(&png),
        probabilities: match val_probabilities.first() {
            Some(p) => p.clone(),
            None => head.probabilities(set.row(i)),
        },
        tolerance: 1e-3,
    };
    let meta = vec![
        (metadata::LABELS.into(), serde_json::to_string(&ds.classes)?),
        (metadata::INPUT.into(), serde_json::to_string(&input)?),
        (
            metadata::BACKBONE.into(),
            serde_json::to_string(&backbone_spec)?,
        ),
        (
            metadata::QUANTIZATION.into(),
            quantization_json(form, calibration)?,
        ),
        (metadata::METRICS.into(), metrics.to_string()),
        (metadata::DATASET_DIGEST.into(), digest.into()),
        (metadata::VERSION.into(), env!("CARGO_PKG_VERSION").into()),
        (metadata::CREATED.into(), created.into()),
        (metadata::GOLDEN.into(), serde_json::to_string(&golden)?),
    ];
    Ok((meta, img))
}

fn quantization_json(
    form: QuantizeForm,
    calibration: Option<&calibrate::Calibration>,
) -> anyhow::Result<String> {
    Ok(serde_json::to_string(&metadata::QuantizationSpec {
        form: form.name().into(),
        calibration: calibration.map(|c| metadata::CalibrationSpec {
            method: c.method.name().into(),
            images: c.images as u32,
        }),
    })?)
}

fn set_proto_meta(proto: &mut tract_onnx::pb::ModelProto, key: &str, value: String) {
    if let Some(entry) = proto.metadata_props.iter_mut().find(|e| e.key == key) {
        entry.value = value;
    }
}

fn set_meta(meta: &mut [(String, String)], key: &str, value: String) {
    if let Some(entry) = meta.iter_mut().find(|(k, _)| k == key) {
        entry.1 = value;
    }
}

/// Builds a quantized model in memory and loads it with tract. Its golden output is what this
/// graph computes (run here with tract), so the device's self-test checks the file, not the
/// float trainer.
#[allow(clippy::too_many_arguments)]
fn quantized_model(
    backbone: &Backbone,
    head: &crate::head::HeadWeights,
    form: QuantizeForm,
    calibration: Option<&calibrate::Calibration>,
    meta: Vec<(String, String)>,
    golden_img: &image::RgbImage,
    path: &Path,
    mirror_average: bool,
) -> anyhow::Result<(ExportedModel, tract_onnx::pb::ModelProto)> {
    let mut proto = onnx::build_model(backbone, head, form, calibration, &meta, mirror_average)?;
    // Loaded (and optimised by tract) once: the golden entry changes only metadata, not the
    // graph, so the loaded model just takes the new entry.
    let mut model = ExportedModel::from_bytes(&proto.encode_to_vec(), path)?;
    let probabilities = model.predict(golden_img)?;
    let entry = proto
        .metadata_props
        .iter_mut()
        .find(|e| e.key == metadata::GOLDEN)
        .context("golden metadata missing")?;
    let mut golden: metadata::Golden = serde_json::from_str(&entry.value)?;
    golden.probabilities = probabilities;
    entry.value = serde_json::to_string(&golden)?;
    model
        .metadata
        .insert(metadata::GOLDEN.to_owned(), entry.value.clone());
    model.bytes = proto.encoded_len() as u64;
    Ok((model, proto))
}

/// Mean of this many profiled runs gives the report's per-operator times.
const PROFILE_RUNS: usize = 5;

/// Runs the float backbone over `--calibration-images` readable training photos, spread
/// evenly over the (class-sorted) training list so every class is represented.
fn calibrate_int8(
    args: &Args,
    backbone: &Backbone,
    head: &crate::head::HeadWeights,
    train: &FeatureSet,
) -> anyhow::Result<calibrate::Calibration> {
    let n = args.calibration_images.min(train.len()).max(1);
    let size = backbone.input_size as u32;
    let picked: Vec<&Path> = (0..n)
        .map(|i| train.paths[i * train.len() / n].as_path())
        .collect();
    use rayon::prelude::*;
    let images: Vec<image::RgbImage> = picked
        .par_iter()
        .filter_map(|p| match dataset::load_input(p, size, size) {
            Ok(img) => Some(img),
            Err(e) => {
                tracing::warn!("calibration skips {}: {e}", p.display());
                None
            }
        })
        .collect();
    let passes = match args.calibration_method {
        RangeMethod::MinMax => 1,
        RangeMethod::Percentile => 2,
    };
    let bar = indicatif::ProgressBar::new((images.len() * passes) as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "{msg:>10} [{bar:30}] {pos}/{len} photo passes, {per_sec}, eta {eta}",
        )
        .unwrap()
        .progress_chars("=> "),
    );
    bar.set_message("calibrate");
    let cal = calibrate::calibrate(backbone, head, &images, args.calibration_method, &|| {
        bar.inc(1)
    })?;
    bar.finish_and_clear();
    tracing::info!(
        "calibrated {} activation tensors on {} training photos ({})",
        cal.ranges.len(),
        cal.images,
        cal.method.name()
    );
    Ok(cal)
}

#[allow(clippy::too_many_arguments)]
fn quantization_info(
    args: &Args,
    check: &verify::Verification,
    calibration: Option<&calibrate::Calibration>,
    float_model: Option<String>,
    float_model_bytes: u64,
    model_bytes: u64,
    graph: &crate::model::GraphSummary,
    profile: Vec<crate::model::NodeTime>,
    accuracy_drop_accepted: bool,
) -> report::QuantizationInfo {
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
    report::QuantizationInfo {
        form: args.quantize.name().into(),
        calibration: calibration.map(|c| report::CalibrationInfo {
            method: c.method.name().into(),
            images: c.images,
            tensors: c.ranges.len(),
        }),
        float_model,
        float_model_bytes,
        size_ratio: model_bytes as f64 / float_model_bytes as f64,
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
        profile_by_layer: crate::model::time_by_layer_kind(&profile, graph),
        profile: crate::model::time_by_op(&profile),
        accuracy_drop_accepted,
    }
}
