//! `petcam train-and-export`: photos in, one verified ONNX model and a report out. The flags
//! become the configs of [`crate::pipeline`], which does the work.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::Device;

use crate::augment::Policy;
use crate::backbone::LoadOptions;
use crate::export::calibrate::RangeMethod;
use crate::export::quantize::QuantizeForm;
use crate::features;
use crate::pipeline::{self, fit, CachedViews, CalibrationConfig, Quantization, TrainingMode};
use crate::report::{self, Report};
use crate::train::TrainConfig;

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
    #[command(flatten)]
    pub data: DataArgs,
    /// Output folder for the model and the report (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    #[command(flatten)]
    pub backbone: BackboneArgs,
    #[command(flatten)]
    pub train: TrainArgs,
    #[command(flatten)]
    pub fine_tune: FineTuneArgs,
    #[command(flatten)]
    pub augment: AugmentArgs,
    #[command(flatten)]
    pub export: ExportArgs,
    #[command(flatten)]
    pub verify: VerifyArgs,
    #[command(flatten)]
    pub cache: CacheArgs,
    /// Print the report as JSON on stdout when done.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
#[command(next_help_heading = "Photos")]
pub struct DataArgs {
    /// Photo folder: DIR/<class>/* (validation split by file-name hash) or
    /// DIR/train/<class>/* plus DIR/val/<class>/*. JPEG, PNG, WebP and BMP.
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    /// Fraction of photos held out for validation with the DIR/<class> layout.
    #[arg(long, default_value_t = 0.2)]
    pub val_fraction: f32,
}

#[derive(Debug, clap::Args)]
#[command(next_help_heading = "Backbone")]
pub struct BackboneArgs {
    /// Backbone network. Lite1 and Lite2 are larger EfficientNet-Lites: more accurate, slower
    /// on the camera. mobilenet-v2 reads torchvision or timm state dicts, or a TFLite model (see
    /// `petcam import-backbone`).
    #[arg(long, default_value = "efficientnet-lite0", value_parser = crate::backbone::NAMES.to_vec())]
    pub backbone: String,
    /// Backbone weights: .pth (legacy or zip) or .safetensors; for mobilenet-v2 also a
    /// TensorFlow Lite model. Default (EfficientNet-Lite): the file `tools/fetch-backbone
    /// [--backbone NAME]` put in the cache folder.
    #[arg(long, value_name = "FILE")]
    pub weights: Option<PathBuf>,
    /// Input height and width in pixels: a multiple of 32 from 64 to 512. Smaller is faster on
    /// the camera and less accurate; larger sees small or low-resolution pets better
    /// [default: 224; 256 for efficientnet-lite1 and -lite2].
    #[arg(long, value_name = "PIXELS")]
    pub input_size: Option<usize>,
    /// MobileNetV2 width multiplier (0.35, 0.5, 0.75 or 1.0) the weights must have. Default:
    /// whatever the weights have.
    #[arg(long, value_name = "W")]
    pub width_multiplier: Option<f32>,
}

#[derive(Debug, clap::Args)]
#[command(next_help_heading = "Training")]
pub struct TrainArgs {
    /// Maximum training epochs (early stopping usually ends sooner) [default: 60, or 12 with
    /// --unfreeze].
    #[arg(long)]
    pub epochs: Option<usize>,
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
}

#[derive(Debug, clap::Args)]
#[command(next_help_heading = "Fine-tuning")]
pub struct FineTuneArgs {
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
}

#[derive(Debug, clap::Args)]
#[command(next_help_heading = "Augmentation")]
pub struct AugmentArgs {
    /// Augment the training photos: a random resized crop (at least 35% of the photo, aspect
    /// 3:4 to 4:3), a horizontal flip and mild colour jitter (brightness, contrast and
    /// saturation within 20%), drawn from --seed. With a frozen backbone, --augment-views
    /// views of each photo are computed once and their features cached; the head trains on
    /// the photos and their views. With --unfreeze, every epoch draws a new view of each
    /// photo. Validation photos are never augmented.
    #[arg(long)]
    pub augment: bool,
    /// Augmented views per training photo, with --augment and a frozen backbone.
    #[arg(long, default_value_t = 4, value_name = "K", requires = "augment")]
    pub augment_views: u32,
    /// With --augment, shrink half of the views to between half the input size and the input
    /// size before resizing them to the input: a pet far from the camera, a low-resolution
    /// camera or a small photo, whose pixels reach the network soft and upscaled.
    #[arg(long, requires = "augment")]
    pub augment_low_res: bool,
}

#[derive(Debug, clap::Args)]
#[command(next_help_heading = "Export")]
pub struct ExportArgs {
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
    /// Export a model that averages the probabilities of each frame and of its mirror image
    /// (flipped left to right) inside the graph: a little steadier on hard photos, twice the
    /// inference time. The validation figures and the verification include the mirror too.
    #[arg(long)]
    pub mirror_average: bool,
    /// Also write the float model as model-f32.onnx when model.onnx is quantized.
    #[arg(long)]
    pub keep_float: bool,
    /// Write the model even if quantization costs more than 1 point of validation accuracy.
    /// The report then carries a warning.
    #[arg(long)]
    pub allow_accuracy_drop: bool,
}

#[derive(Debug, clap::Args)]
#[command(next_help_heading = "Verification")]
pub struct VerifyArgs {
    /// Minimum top-1 agreement between the float ONNX model (tract) and the trainer (candle);
    /// below it the exporter itself is wrong and nothing is written.
    #[arg(long, default_value_t = 0.995)]
    pub min_agreement: f64,
    /// Single-thread tract runs per model for the latency comparison of the verification.
    #[arg(long, default_value_t = 50, value_name = "N")]
    pub latency_runs: usize,
}

#[derive(Debug, clap::Args)]
#[command(next_help_heading = "Features and cache")]
pub struct CacheArgs {
    /// Cache folder for features and fetched weights [default: $PETCAM_CACHE, else
    /// $XDG_CACHE_HOME/petcam, else ~/.cache/petcam].
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Recompute every feature instead of reading or writing the cache.
    #[arg(long)]
    pub no_cache: bool,
    /// Photos per backbone forward pass on a GPU. On CPU each pass takes one photo and each
    /// core runs its own pass, which is faster there.
    #[arg(long, default_value_t = 32)]
    pub extract_batch: usize,
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
            let why = e.to_string();
            // The toolkit's stub libcuda (what links a CUDA build without a GPU) answers every
            // call with this error: the libraries were found, the NVIDIA driver was not.
            let hint = if why.contains("CUDA_ERROR_STUB_LIBRARY") {
                "the libcuda.so.1 on the library path is the CUDA toolkit's stub, not an NVIDIA \
                 driver: install the driver, or take the stubs folder off LD_LIBRARY_PATH"
            } else {
                "check `nvidia-smi`"
            };
            anyhow::anyhow!("no usable NVIDIA GPU ({why}); {hint}, or use --device cpu")
        }),
        other => bail!("unknown device {other:?}; use cpu or cuda"),
    }
}

impl BackboneArgs {
    /// `--weights`, or the checkpoint `tools/fetch-backbone` put in the cache.
    fn weights(&self, cache_root: &Path) -> anyhow::Result<PathBuf> {
        if let Some(w) = &self.weights {
            if !w.is_file() {
                bail!("weights file {} does not exist", w.display());
            }
            return Ok(w.clone());
        }
        let file = BACKBONES
            .iter()
            .find(|(name, _)| *name == self.backbone)
            .map(|(_, f)| *f)
            .with_context(|| {
                format!(
                    "no default weights for {}; pass --weights FILE: a torchvision or timm state \
                     dict (.pth, .safetensors), or a TFLite model such as \
                     ../shared/backbones/mobilenet_v2_1.0_224_quant.tflite",
                    self.backbone
                )
            })?;
        let path = cache_root.join("backbones").join(file);
        if !path.is_file() {
            bail!(
                "no --weights given and {} is missing; run tools/fetch-backbone --backbone {} to \
                 fetch the ImageNet checkpoint, or pass --weights FILE",
                path.display(),
                self.backbone
            );
        }
        Ok(path)
    }

    fn config(&self, cache_root: &Path) -> anyhow::Result<pipeline::BackboneConfig> {
        Ok(pipeline::BackboneConfig {
            name: self.backbone.clone(),
            weights: self.weights(cache_root)?,
            options: LoadOptions {
                input_size: self.input_size,
                width: self.width_multiplier,
            },
        })
    }
}

impl Args {
    /// The training mode the fine-tuning and augmentation flags ask for.
    fn mode(&self) -> TrainingMode {
        let policy = Policy {
            seed: self.train.seed,
            low_res: self.augment.augment_low_res,
        };
        let augment = self.augment.augment;
        if self.fine_tune.unfreeze == 0 {
            TrainingMode::Probe {
                views: augment.then_some(CachedViews {
                    policy,
                    per_photo: self.augment.augment_views,
                }),
            }
        } else {
            TrainingMode::FineTune(pipeline::FineTune {
                unfreeze: self.fine_tune.unfreeze,
                backbone_lr: self.fine_tune.backbone_lr.unwrap_or(self.train.lr / 10.0),
                train_bn: self.fine_tune.train_bn,
                views: augment.then_some(policy),
            })
        }
    }

    fn training(&self) -> anyhow::Result<pipeline::TrainingConfig> {
        let mode = self.mode();
        let t = &self.train;
        let head = TrainConfig {
            epochs: t.epochs.unwrap_or_else(|| fit::default_epochs(&mode)),
            lr: t.lr,
            weight_decay: t.weight_decay,
            batch_size: t.batch_size,
            dropout: t.dropout,
            label_smoothing: t.label_smoothing,
            seed: t.seed,
            patience: t.patience,
        };
        Ok(pipeline::TrainingConfig {
            mode,
            head,
            device: select_device(&t.device)?,
        })
    }

    fn quantization(&self) -> Quantization {
        match self.export.quantize {
            QuantizeForm::None => Quantization::Float,
            QuantizeForm::Int8Weights => Quantization::Int8Weights,
            QuantizeForm::Int8 => Quantization::Int8(CalibrationConfig {
                images: self.export.calibration_images,
                method: self.export.calibration_method,
            }),
        }
    }

    /// The pipeline's configs, with every default resolved.
    pub fn config(&self) -> anyhow::Result<pipeline::Config> {
        let training = self.training()?;
        let cache_root = self
            .cache
            .cache_dir
            .clone()
            .unwrap_or_else(features::default_cache_root);
        Ok(pipeline::Config {
            data: pipeline::DataConfig {
                root: self.data.data.clone(),
                val_fraction: self.data.val_fraction,
            },
            backbone: self.backbone.config(&cache_root)?,
            features: pipeline::FeatureConfig {
                cache_root: (!self.cache.no_cache).then_some(cache_root),
                extract_batch: self.cache.extract_batch,
            },
            training,
            export: pipeline::ExportSpec {
                quantization: self.quantization(),
                mirror_average: self.export.mirror_average,
            },
            verify: pipeline::VerifyConfig {
                min_agreement: self.verify.min_agreement,
                latency_runs: self.verify.latency_runs,
                allow_accuracy_drop: self.export.allow_accuracy_drop,
                keep_float: self.export.keep_float,
            },
            out: self.out.clone(),
        })
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let config = args.config()?;
    let trained = pipeline::run(&config)?;
    report::write_report(&config.out, &trained.report, &trained.misclassified)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&trained.report)?);
    } else {
        print_summary(&trained.report, &config.out);
    }
    Ok(())
}

/// A few lines for people: accuracy, what was exported, where the report is.
fn print_summary(rep: &Report, out: &Path) {
    println!(
        "validation accuracy {:.2}% on {} photos ({} classes: {})",
        rep.evaluation.accuracy * 100.0,
        rep.evaluation.images,
        rep.dataset.classes.len(),
        rep.dataset.classes.join(", ")
    );
    if let Some(export) = &rep.export {
        let q = &export.quantization;
        println!(
            "exported {} ({}, {:.1} MB = {:.1}% of float): tract accuracy {:.2}% (float {:.2}%), \
             same prediction as float on {:.2}%, p50 latency {:.1} ms ({:.2}x float)",
            export.model,
            q.form,
            export.model_bytes as f64 / 1e6,
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
                export.model,
                (q.float_accuracy - q.accuracy) * 100.0
            );
        }
    }
    println!(
        "report: {} ({} skipped photo(s)); total {:.1} s",
        out.join("report.md").display(),
        rep.skipped.len(),
        rep.timings.total_s
    );
}

#[cfg(all(test, feature = "cuda"))]
mod tests {
    /// `--device cuda` in a CUDA build: with a GPU, a tensor computes there; without one (CI
    /// runs this against the toolkit's driver stub) an error that names the CUDA error and
    /// the way out, not a panic.
    #[test]
    fn cuda_device_works_or_says_why_not() {
        match super::select_device("cuda") {
            Ok(dev) => {
                assert!(dev.is_cuda());
                let x = candle_core::Tensor::arange(0f32, 4.0, &dev).unwrap();
                let doubled = (&x * 2.0).unwrap().to_vec1::<f32>().unwrap();
                assert_eq!(doubled, [0.0, 2.0, 4.0, 6.0]);
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.contains("no usable NVIDIA GPU"), "{msg}");
                assert!(msg.contains("CUDA_ERROR_"), "{msg}");
                assert!(msg.contains("--device cpu"), "{msg}");
                if msg.contains("CUDA_ERROR_STUB_LIBRARY") {
                    assert!(msg.contains("toolkit's stub"), "{msg}");
                }
            }
        }
    }
}
