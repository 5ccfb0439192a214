//! The training report: what was trained on what, how well it does on the validation set, and
//! whether the exported model agrees with the trained one.
//!
//! [`write_report`] puts into one folder:
//!
//! | file | for |
//! |---|---|
//! | `report.json` | tools; the whole [`Report`], pretty-printed |
//! | `report.md` | people; scores, dataset, training, export and timings, linking the pictures |
//! | `training_curves.png` | loss and accuracy per epoch, train and validation |
//! | `confusion_matrix.png` | counts per (true, predicted) class pair |
//! | `misclassified.jpg` | the most confident mistakes as a contact sheet |
//!
//! `misclassified.jpg` is always written, as a small "no misclassified photos" picture when there
//! are none, so tools can rely on every file existing; `report.md` then says so instead of
//! linking it.

mod draw;

use std::fmt::{self, Write as _};
use std::fs;
use std::io::{self, Cursor};
use std::path::{Path, PathBuf};

use image::codecs::jpeg::JpegEncoder;
use image::{ImageFormat, RgbImage};
use petcam_shared::metadata::{CalibrationMethod, QuantizationForm};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// File name of the machine-readable report.
pub const JSON_FILE: &str = "report.json";
/// File name of the human-readable report.
pub const MARKDOWN_FILE: &str = "report.md";
/// File name of the loss and accuracy plot.
pub const CURVES_FILE: &str = "training_curves.png";
/// File name of the confusion matrix picture.
pub const CONFUSION_FILE: &str = "confusion_matrix.png";
/// File name of the contact sheet of misclassified photos.
pub const MISCLASSIFIED_FILE: &str = "misclassified.jpg";
/// Most photos shown on the contact sheet; more would make the thumbnails too small to judge.
pub const MAX_MISCLASSIFIED_SHOWN: usize = 16;
/// Most skipped files listed in `report.md`; `report.json` always lists them all.
const MAX_SKIPPED_LISTED: usize = 100;
/// JPEG quality of the contact sheet: high enough that the 8-pixel captions stay crisp.
const JPEG_QUALITY: u8 = 90;

/// Everything known about one training run.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Report {
    /// Version of petcam that trained the model.
    pub petcam_version: String,
    /// When the report was made, RFC 3339 in UTC.
    pub created: String,
    /// The frozen feature extractor.
    pub backbone: BackboneInfo,
    /// The photos trained and validated on.
    pub dataset: DatasetInfo,
    /// Files found in the dataset folder that could not be used.
    pub skipped: Vec<SkippedFile>,
    /// Hyperparameters and per-epoch metrics of the head training.
    pub training: TrainingInfo,
    /// The validation set scored with candle's predictions.
    pub evaluation: Evaluation,
    /// The ONNX export and its verification; `None` when nothing was exported.
    pub export: Option<ExportInfo>,
    /// Wall-clock time per stage.
    pub timings: Timings,
}

/// The ImageNet backbone the head was trained on top of.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct BackboneInfo {
    /// Architecture, e.g. `efficientnet-lite0`.
    pub name: String,
    /// Where the weights were loaded from.
    pub weights: String,
    /// SHA-256 of the weights file, hex.
    pub weights_sha256: String,
    /// Side of the square input in pixels.
    pub input_size: u32,
    /// Length of the feature vector the head sees.
    pub feature_dim: usize,
}

/// The dataset as it was found on disk.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct DatasetInfo {
    /// The dataset folder.
    pub root: String,
    /// `"train-val-folders"` (the folder holds `train/` and `val/`) or `"hash-split"` (one folder
    /// per class, split by a hash of each file's path).
    pub layout: String,
    /// Share of photos sent to validation by a hash split.
    pub val_fraction: Option<f32>,
    /// Digest of the file list and contents, to tell whether two runs saw the same data.
    pub digest: String,
    /// Class names, in model output order.
    pub classes: Vec<String>,
    /// Training photos per class, in `classes` order.
    pub train_counts: Vec<usize>,
    /// Validation photos per class, in `classes` order.
    pub val_counts: Vec<usize>,
}

/// A file in the dataset folder that was left out.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct SkippedFile {
    /// The file.
    pub path: String,
    /// Why it was left out, e.g. the decoder's error.
    pub reason: String,
}

/// How the classification head was trained.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct TrainingInfo {
    /// The candle device, e.g. `cpu` or `cuda:0`.
    pub device: String,
    /// Epochs asked for.
    pub epochs_requested: usize,
    /// Epochs run before finishing or stopping early.
    pub epochs_run: usize,
    /// Epoch whose weights were kept.
    pub best_epoch: usize,
    /// Learning rate.
    pub lr: f64,
    /// Weight decay.
    pub weight_decay: f64,
    /// Photos per batch.
    pub batch_size: usize,
    /// Dropout before the head.
    pub dropout: f32,
    /// Label smoothing of the cross-entropy loss.
    pub label_smoothing: f32,
    /// Seed for initialisation and shuffling.
    pub seed: u64,
    /// Loss weight per class, in class order.
    pub class_weights: Vec<f32>,
    /// Epochs without validation improvement before stopping.
    pub early_stopping_patience: usize,
    /// Training-photo augmentation, when asked for.
    #[serde(default)]
    pub augmentation: Option<AugmentationInfo>,
    /// Fine-tuning of the backbone's top blocks; absent when the whole backbone was frozen.
    #[serde(default)]
    pub fine_tune: Option<FineTuneInfo>,
    /// One entry per epoch run.
    pub history: Vec<EpochMetrics>,
}

/// How the training photos were augmented (frozen backbone: views computed once, cached).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct AugmentationInfo {
    /// What a view is: crop, flip and jitter ranges, and their version.
    pub kind: String,
    /// Augmented views per training photo.
    pub views_per_photo: u32,
    /// Training rows: the photos plus their views.
    pub training_rows: usize,
    /// Views drawn afresh every epoch (fine-tuning) instead of computed once and cached.
    #[serde(default)]
    pub on_the_fly: bool,
    /// Seconds spent decoding, augmenting and running views through the frozen blocks (on the
    /// fly only; cached views count as features).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub views_s: Option<f64>,
}

/// Which part of the backbone trained, and how fast.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct FineTuneInfo {
    /// Blocks at the top that trained, with the head convolution.
    pub unfrozen_blocks: usize,
    /// Blocks in the backbone.
    pub total_blocks: usize,
    /// Peak learning rate of the unfrozen layers (the head's is `lr`).
    pub backbone_lr: f64,
    /// Whether BatchNorm statistics were updated (otherwise ImageNet's were kept).
    pub train_bn: bool,
    /// How both learning rates change over the epochs.
    pub schedule: String,
    #[serde(flatten)]
    pub stats: crate::finetune::FineTuneStats,
}

/// Metrics at the end of one epoch, as training records them.
pub use crate::train::EpochMetrics;

/// Scores of a set of predictions against the truth.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Evaluation {
    /// Share of photos predicted correctly, 0..=1.
    pub accuracy: f64,
    /// Number of photos scored.
    pub images: usize,
    /// Class names, in index order.
    pub labels: Vec<String>,
    /// Precision, recall and F1 per class, in `labels` order.
    pub per_class: Vec<ClassMetrics>,
    /// `confusion[true][predicted]` counts photos.
    pub confusion: Vec<Vec<usize>>,
}

/// Scores of one class.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ClassMetrics {
    /// Class name.
    pub label: String,
    /// Of the photos predicted as this class, the share that are; 0 when none was.
    pub precision: f64,
    /// Of the photos of this class, the share predicted as it; 0 when there are none.
    pub recall: f64,
    /// Harmonic mean of precision and recall; 0 when both are 0.
    pub f1: f64,
    /// Photos of this class.
    pub support: usize,
}

/// The exported ONNX model and how well it matches the candle model.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ExportInfo {
    /// Path of the model file.
    pub model: String,
    /// Size of the model file.
    pub model_bytes: u64,
    /// ONNX opset.
    pub opset: i64,
    /// The model averages each frame's probabilities with its mirror image's.
    #[serde(default)]
    pub mirror_average: bool,
    /// Validation photos the models classified.
    pub verify_images: usize,
    /// Accuracy of the trainer (candle) on those photos, 0..=1.
    pub candle_accuracy: f64,
    /// Accuracy of the exported model (run with tract) on those photos, 0..=1.
    pub onnx_accuracy: f64,
    /// Share of photos on which the float ONNX model (tract) and candle predict the same class.
    pub float_agreement: f64,
    /// Largest difference between candle and the float ONNX model in any class probability.
    pub float_max_probability_diff: f32,
    /// Wall-clock time per photo of the verification pass (all threads, decoding included).
    pub tract_ms_per_image: f64,
    pub quantization: QuantizationInfo,
}

/// The exported model against the float model, both run with tract.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct QuantizationInfo {
    pub form: QuantizationForm,
    /// Activation ranges, for `int8`.
    pub calibration: Option<CalibrationInfo>,
    /// `model-f32.onnx` when it was written (`--keep-float`).
    pub float_model: Option<String>,
    /// Size of the float model (built for verification even when not written).
    pub float_model_bytes: u64,
    /// `model_bytes / float_model_bytes`.
    pub size_ratio: f64,
    pub float_accuracy: f64,
    pub accuracy: f64,
    /// Share of photos on which both models predict the same class.
    pub agreement: f64,
    pub max_probability_diff: f32,
    /// Mean over photos of the largest class-probability difference.
    pub mean_probability_diff: f32,
    pub float_latency: crate::model::Latency,
    pub latency: crate::model::Latency,
    /// p50 latency of the exported model over that of the float model.
    pub latency_ratio: f64,
    /// Layers computed in integers (QLinearConv, QLinearMatMul).
    pub int8_layers: usize,
    /// Float layers whose weights are stored as int8.
    pub int8_weight_layers: usize,
    /// Float layers with float weights.
    pub float_weight_layers: usize,
    /// Where the exported model's time goes in tract (one thread), by operator of the
    /// optimised plan, largest first.
    pub profile: Vec<crate::model::OpTime>,
    /// The same time by layer kind (depthwise conv, 1x1 conv, ...), largest first.
    pub profile_by_layer: Vec<crate::model::OpTime>,
    /// The model lost more than a point against float and was kept by
    /// `--allow-accuracy-drop`.
    pub accuracy_drop_accepted: bool,
}

/// How `--quantize int8` chose its activation ranges.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct CalibrationInfo {
    pub method: CalibrationMethod,
    /// Training photos the float model ran over.
    pub images: usize,
    /// Quantized activation tensors.
    pub tensors: usize,
}

/// Wall-clock seconds per stage.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Timings {
    /// Scanning and splitting the dataset.
    pub dataset_s: f64,
    /// Extracting (or loading cached) backbone features.
    pub features_s: f64,
    /// Photos whose features came from the cache.
    pub features_cached: usize,
    /// Photos run through the backbone.
    pub features_computed: usize,
    /// Backbone throughput; `None` when every feature was cached.
    pub backbone_images_per_s: Option<f64>,
    /// Training the head.
    pub train_s: f64,
    /// Writing the ONNX model.
    pub export_s: f64,
    /// Running the exported model against candle.
    pub verify_s: f64,
    /// The whole run.
    pub total_s: f64,
    /// Peak resident memory, where the platform reports it.
    pub peak_rss_mb: Option<f64>,
}

impl Evaluation {
    /// Scores `predicted` against `truth`, both class indices into `labels`.
    ///
    /// Precision, recall and F1 are 0 where they are undefined (no photo predicted as, or
    /// belonging to, the class); accuracy is 0 for no photos.
    ///
    /// # Panics
    ///
    /// If `truth` and `predicted` differ in length, or an index is not below `labels.len()`.
    pub fn from_predictions(labels: &[String], truth: &[usize], predicted: &[usize]) -> Evaluation {
        assert_eq!(
            truth.len(),
            predicted.len(),
            "one prediction per true label"
        );
        let n = labels.len();
        let mut confusion = vec![vec![0usize; n]; n];
        for (&t, &p) in truth.iter().zip(predicted) {
            confusion[t][p] += 1;
        }
        let ratio = |num: usize, den: usize| {
            if den == 0 {
                0.0
            } else {
                num as f64 / den as f64
            }
        };
        let per_class = labels
            .iter()
            .enumerate()
            .map(|(c, label)| {
                let hits = confusion[c][c];
                let support: usize = confusion[c].iter().sum();
                let predicted_as: usize = confusion.iter().map(|row| row[c]).sum();
                let precision = ratio(hits, predicted_as);
                let recall = ratio(hits, support);
                let f1 = if precision + recall == 0.0 {
                    0.0
                } else {
                    2.0 * precision * recall / (precision + recall)
                };
                ClassMetrics {
                    label: label.clone(),
                    precision,
                    recall,
                    f1,
                    support,
                }
            })
            .collect();
        let correct = (0..n).map(|c| confusion[c][c]).sum();
        Evaluation {
            accuracy: ratio(correct, truth.len()),
            images: truth.len(),
            labels: labels.to_vec(),
            per_class,
            confusion,
        }
    }

    /// Photos predicted correctly.
    pub fn correct(&self) -> usize {
        self.confusion
            .iter()
            .enumerate()
            .filter_map(|(c, row)| row.get(c))
            .sum()
    }

    /// A plain-text per-class table, the accuracy and the confusion matrix, for a terminal.
    pub fn table(&self) -> String {
        let mut out = String::new();
        self.write_table(&mut out)
            .expect("formatting into a String cannot fail");
        out
    }

    fn write_table(&self, out: &mut String) -> fmt::Result {
        let corner = "true \\ pred";
        let name_w = self
            .labels
            .iter()
            .map(|l| l.chars().count())
            .chain([corner.len()])
            .max()
            .unwrap_or(0);
        writeln!(
            out,
            "{:<name_w$}  {:>9}  {:>7}  {:>7}  {:>7}",
            "class", "precision", "recall", "f1", "support"
        )?;
        for m in &self.per_class {
            writeln!(
                out,
                "{:<name_w$}  {:>9.3}  {:>7.3}  {:>7.3}  {:>7}",
                m.label, m.precision, m.recall, m.f1, m.support
            )?;
        }
        writeln!(
            out,
            "\naccuracy {:.2}% ({} of {} photos)",
            self.accuracy * 100.0,
            self.correct(),
            self.images
        )?;

        writeln!(out, "\nconfusion matrix (rows: true, columns: predicted)")?;
        let count_w = self
            .confusion
            .iter()
            .flatten()
            .map(|c| c.to_string().len())
            .chain(self.labels.iter().map(|l| l.chars().count()))
            .max()
            .unwrap_or(1);
        write!(out, "{corner:<name_w$}")?;
        for label in &self.labels {
            write!(out, "  {label:>count_w$}")?;
        }
        writeln!(out)?;
        for (label, row) in self.labels.iter().zip(&self.confusion) {
            write!(out, "{label:<name_w$}")?;
            for count in row {
                write!(out, "  {count:>count_w$}")?;
            }
            writeln!(out)?;
        }
        Ok(())
    }
}

/// A validation photo the model got wrong, for the contact sheet.
#[derive(Debug, Clone)]
pub struct Misclassified {
    /// The photo, any size; it is letterboxed into the sheet's cell.
    pub thumbnail: RgbImage,
    /// The class it belongs to.
    pub true_label: String,
    /// The class the model chose.
    pub predicted_label: String,
    /// The model's probability for `predicted_label`.
    pub confidence: f32,
}

/// The paths [`write_report`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportFiles {
    /// `report.json`.
    pub json: PathBuf,
    /// `report.md`.
    pub markdown: PathBuf,
    /// `training_curves.png`.
    pub training_curves: PathBuf,
    /// `confusion_matrix.png`.
    pub confusion_matrix: PathBuf,
    /// `misclassified.jpg`.
    pub misclassified: PathBuf,
}

impl ReportFiles {
    fn in_dir(dir: &Path) -> ReportFiles {
        ReportFiles {
            json: dir.join(JSON_FILE),
            markdown: dir.join(MARKDOWN_FILE),
            training_curves: dir.join(CURVES_FILE),
            confusion_matrix: dir.join(CONFUSION_FILE),
            misclassified: dir.join(MISCLASSIFIED_FILE),
        }
    }

    /// Every path, in the order written.
    pub fn paths(&self) -> [&Path; 5] {
        [
            &self.json,
            &self.markdown,
            &self.training_curves,
            &self.confusion_matrix,
            &self.misclassified,
        ]
    }
}

/// A report file that could not be written.
#[derive(Debug, Error)]
pub enum ReportError {
    /// The output folder could not be created.
    #[error("cannot create the report folder {}: check the path and its permissions", path.display())]
    CreateDir {
        /// The folder.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A file could not be written.
    #[error("cannot write {}: check permissions and free disk space", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A picture could not be encoded.
    #[error("cannot encode the picture for {}", path.display())]
    Encode {
        /// The file it was meant for.
        path: PathBuf,
        /// The cause.
        #[source]
        source: image::ImageError,
    },
    /// The report could not be serialised.
    #[error("cannot serialise the report for {}", path.display())]
    Json {
        /// The file it was meant for.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
}

/// Writes the report files into `dir`, creating it if needed.
///
/// `misclassified` may be a selection of the validation mistakes; `report.md` takes their total
/// from `report.evaluation`. The contact sheet shows the [`MAX_MISCLASSIFIED_SHOWN`] most
/// confident of those given: confident mistakes point at mislabelled photos and systematic
/// confusions.
pub fn write_report(
    dir: &Path,
    report: &Report,
    misclassified: &[Misclassified],
) -> Result<ReportFiles, ReportError> {
    fs::create_dir_all(dir).map_err(|source| ReportError::CreateDir {
        path: dir.to_owned(),
        source,
    })?;
    let files = ReportFiles::in_dir(dir);

    let mut shown: Vec<&Misclassified> = misclassified.iter().collect();
    shown.sort_by(|a, b| b.confidence.total_cmp(&a.confidence));
    shown.truncate(MAX_MISCLASSIFIED_SHOWN);

    let json = serde_json::to_vec_pretty(report).map_err(|source| ReportError::Json {
        path: files.json.clone(),
        source,
    })?;
    write_file(&files.json, &json)?;
    let markdown = markdown(report, shown.len());
    write_file(&files.markdown, markdown.as_bytes())?;
    write_png(
        &files.training_curves,
        &draw::training_curves(&report.training),
    )?;
    write_png(
        &files.confusion_matrix,
        &draw::confusion_matrix(&report.evaluation),
    )?;

    let sheet = draw::contact_sheet(&shown);
    let mut jpeg = Vec::new();
    JpegEncoder::new_with_quality(&mut jpeg, JPEG_QUALITY)
        .encode_image(&sheet)
        .map_err(|source| ReportError::Encode {
            path: files.misclassified.clone(),
            source,
        })?;
    write_file(&files.misclassified, &jpeg)?;
    Ok(files)
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), ReportError> {
    fs::write(path, bytes).map_err(|source| ReportError::Write {
        path: path.to_owned(),
        source,
    })
}

fn write_png(path: &Path, img: &RgbImage) -> Result<(), ReportError> {
    let mut png = Cursor::new(Vec::new());
    img.write_to(&mut png, ImageFormat::Png)
        .map_err(|source| ReportError::Encode {
            path: path.to_owned(),
            source,
        })?;
    write_file(path, png.get_ref())
}

fn markdown(report: &Report, shown: usize) -> String {
    let mut out = String::new();
    write_markdown(&mut out, report, shown).expect("formatting into a String cannot fail");
    out
}

fn quantization_section(out: &mut String, export: &ExportInfo) -> std::fmt::Result {
    let q = &export.quantization;
    writeln!(out, "## Quantization\n")?;
    writeln!(out, "| | float | exported ({}) |\n|---|---|---|", q.form)?;
    writeln!(
        out,
        "| file | {} | {} |",
        q.float_model
            .as_deref()
            .map(cell)
            .unwrap_or("(not kept)".into()),
        cell(&export.model)
    )?;
    writeln!(
        out,
        "| size | {:.2} MB | {:.2} MB ({:.1}% of float) |",
        q.float_model_bytes as f64 / 1e6,
        export.model_bytes as f64 / 1e6,
        q.size_ratio * 100.0
    )?;
    writeln!(
        out,
        "| accuracy (tract, {} photos) | {} | {} |",
        export.verify_images,
        pct(q.float_accuracy),
        pct(q.accuracy)
    )?;
    writeln!(
        out,
        "| tract latency p50 / p90, 1 thread, {} runs | {:.1} / {:.1} ms | {:.1} / {:.1} ms ({:.2}x) |",
        q.latency.runs,
        q.float_latency.p50_ms,
        q.float_latency.p90_ms,
        q.latency.p50_ms,
        q.latency.p90_ms,
        q.latency_ratio
    )?;
    writeln!(
        out,
        "| layers | | {} integer (QLinearConv/QLinearMatMul), {} int8 weights, {} float |\n",
        q.int8_layers, q.int8_weight_layers, q.float_weight_layers
    )?;
    writeln!(
        out,
        "Same top-1 prediction as the float model on {} of the photos; probability \
         difference {:.2e} on average, {:.2e} at most.",
        pct(q.agreement),
        q.mean_probability_diff,
        q.max_probability_diff
    )?;
    if let Some(c) = &q.calibration {
        writeln!(
            out,
            "Activation ranges of {} tensors calibrated on {} training photos ({}).",
            c.tensors, c.images, c.method
        )?;
    }
    if q.accuracy_drop_accepted {
        writeln!(
            out,
            "\n**Warning:** this model loses more than a point of accuracy against float and was \
             kept only because `--allow-accuracy-drop` was given."
        )?;
    }
    if q.form == QuantizationForm::Int8 {
        writeln!(
            out,
            "\nThis form computes in integers for ARM cores with int8 dot-product units. tract \
             0.23 runs every QLinearConv as an explicit im2col, an i32 matrix product and \
             separate requantization passes; a depthwise QLinearConv gets no depthwise kernel \
             and goes through im2col too. The profile below shows what that costs on this CPU."
        )?;
    }
    writeln!(
        out,
        "\nWhere the exported model's time goes (tract, 1 thread), by layer kind and by \
         operator of the optimised plan:\n"
    )?;
    writeln!(
        out,
        "| layer kind | plan nodes | ms | share |\n|---|---|---|---|"
    )?;
    for t in &q.profile_by_layer {
        writeln!(
            out,
            "| {} | {} | {:.2} | {} |",
            cell(&t.op),
            t.nodes,
            t.ms,
            pct(t.share)
        )?;
    }
    writeln!(out)?;
    writeln!(out, "| operator | nodes | ms | share |\n|---|---|---|---|")?;
    for t in q.profile.iter().take(12) {
        writeln!(
            out,
            "| {} | {} | {:.2} | {} |",
            cell(&t.op),
            t.nodes,
            t.ms,
            pct(t.share)
        )?;
    }
    writeln!(out)
}

fn pct(fraction: f64) -> String {
    format!("{:.2}%", fraction * 100.0)
}

fn or_dash(value: Option<String>) -> String {
    value.unwrap_or_else(|| "–".to_owned())
}

/// Escapes `s` for a Markdown table cell: class names and paths may hold `_`, `*` or `|`.
fn cell(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' | '|' | '*' | '_' | '`' | '[' | ']' | '<' | '>' | '#' => {
                out.push('\\');
                out.push(c);
            }
            '\n' | '\r' => out.push(' '),
            _ => out.push(c),
        }
    }
    out
}

fn write_markdown(out: &mut String, report: &Report, shown: usize) -> fmt::Result {
    let Report {
        backbone,
        dataset,
        training,
        evaluation,
        timings,
        ..
    } = report;

    writeln!(out, "# petcam training report\n")?;
    writeln!(
        out,
        "**Validation accuracy: {}** ({} of {} photos, {} classes)\n",
        pct(evaluation.accuracy),
        evaluation.correct(),
        evaluation.images,
        evaluation.labels.len()
    )?;
    writeln!(
        out,
        "Backbone {}, best epoch {} of {} run. Created {} by petcam {}.\n",
        cell(&backbone.name),
        training.best_epoch,
        training.epochs_run,
        cell(&report.created),
        cell(&report.petcam_version)
    )?;
    if let Some(export) = &report.export {
        let q = &export.quantization;
        writeln!(
            out,
            "Exported {} ({}, {:.1} MB): accuracy {} in tract, {} of predictions the same as \
             the float model.\n",
            cell(&export.model),
            q.form,
            export.model_bytes as f64 / 1e6,
            pct(export.onnx_accuracy),
            pct(q.agreement)
        )?;
    }
    writeln!(out, "![training curves]({CURVES_FILE})\n")?;

    writeln!(out, "## Dataset\n")?;
    writeln!(out, "| | |\n|---|---|")?;
    writeln!(out, "| folder | {} |", cell(&dataset.root))?;
    writeln!(out, "| layout | {} |", cell(&dataset.layout))?;
    if let Some(fraction) = dataset.val_fraction {
        writeln!(out, "| validation share | {} |", pct(f64::from(fraction)))?;
    }
    writeln!(out, "| digest | `{}` |\n", dataset.digest.replace('`', ""))?;
    writeln!(
        out,
        "| class | train | validation | total |\n|---|---:|---:|---:|"
    )?;
    let count = |counts: &[usize], i: usize| counts.get(i).copied().unwrap_or(0);
    for (i, class) in dataset.classes.iter().enumerate() {
        let (train, val) = (
            count(&dataset.train_counts, i),
            count(&dataset.val_counts, i),
        );
        writeln!(
            out,
            "| {} | {train} | {val} | {} |",
            cell(class),
            train + val
        )?;
    }
    let train: usize = dataset.train_counts.iter().sum();
    let val: usize = dataset.val_counts.iter().sum();
    writeln!(
        out,
        "| **all** | **{train}** | **{val}** | **{}** |\n",
        train + val
    )?;

    writeln!(out, "### Skipped files\n")?;
    if report.skipped.is_empty() {
        writeln!(out, "None.\n")?;
    } else {
        let n = report.skipped.len();
        let files = if n == 1 { "file was" } else { "files were" };
        writeln!(out, "{n} {files} left out.\n")?;
        writeln!(out, "| file | reason |\n|---|---|")?;
        for skipped in report.skipped.iter().take(MAX_SKIPPED_LISTED) {
            writeln!(
                out,
                "| {} | {} |",
                cell(&skipped.path),
                cell(&skipped.reason)
            )?;
        }
        if report.skipped.len() > MAX_SKIPPED_LISTED {
            writeln!(
                out,
                "\n…and {} more, all listed in {JSON_FILE}.",
                report.skipped.len() - MAX_SKIPPED_LISTED
            )?;
        }
        writeln!(out)?;
    }

    writeln!(out, "## Validation\n")?;
    writeln!(
        out,
        "| class | precision | recall | F1 | photos |\n|---|---:|---:|---:|---:|"
    )?;
    for m in &evaluation.per_class {
        writeln!(
            out,
            "| {} | {:.3} | {:.3} | {:.3} | {} |",
            cell(&m.label),
            m.precision,
            m.recall,
            m.f1,
            m.support
        )?;
    }
    writeln!(
        out,
        "\nConfusion matrix, rows are the true class, columns the predicted one:\n"
    )?;
    write!(out, "| true \\\\ predicted |")?;
    for label in &evaluation.labels {
        write!(out, " {} |", cell(label))?;
    }
    write!(out, "\n|---|")?;
    for _ in &evaluation.labels {
        write!(out, "---:|")?;
    }
    writeln!(out)?;
    for (label, row) in evaluation.labels.iter().zip(&evaluation.confusion) {
        write!(out, "| **{}** |", cell(label))?;
        for count in row {
            write!(out, " {count} |")?;
        }
        writeln!(out)?;
    }
    writeln!(out, "\n![confusion matrix]({CONFUSION_FILE})\n")?;

    writeln!(out, "### Misclassified photos\n")?;
    let wrong = evaluation.images.saturating_sub(evaluation.correct());
    let photos = if wrong == 1 { "photo" } else { "photos" };
    if wrong == 0 {
        writeln!(out, "No validation photo was misclassified.\n")?;
    } else if shown == 0 {
        writeln!(out, "{wrong} misclassified {photos}, none pictured.\n")?;
    } else {
        if shown >= wrong {
            writeln!(
                out,
                "{wrong} misclassified {photos}, most confident first:\n"
            )?;
        } else {
            writeln!(
                out,
                "{shown} of the {wrong} misclassified photos, most confident first:\n"
            )?;
        }
        writeln!(out, "![misclassified photos]({MISCLASSIFIED_FILE})\n")?;
    }

    writeln!(out, "## Training\n")?;
    let weights: Vec<String> = training
        .class_weights
        .iter()
        .map(|w| format!("{w:.3}"))
        .collect();
    writeln!(out, "| | |\n|---|---|")?;
    writeln!(out, "| device | {} |", cell(&training.device))?;
    writeln!(
        out,
        "| epochs | {} of {} (best {}) |",
        training.epochs_run, training.epochs_requested, training.best_epoch
    )?;
    writeln!(
        out,
        "| early stopping patience | {} |",
        training.early_stopping_patience
    )?;
    writeln!(out, "| learning rate | {} |", training.lr)?;
    writeln!(out, "| weight decay | {} |", training.weight_decay)?;
    writeln!(out, "| batch size | {} |", training.batch_size)?;
    writeln!(out, "| dropout | {} |", training.dropout)?;
    writeln!(out, "| label smoothing | {} |", training.label_smoothing)?;
    writeln!(out, "| class weights | {} |", weights.join(", "))?;
    writeln!(out, "| seed | {} |", training.seed)?;
    match &training.fine_tune {
        Some(f) => {
            writeln!(
                out,
                "| backbone | top {} of {} blocks and the head convolution trained ({} \
                 parameters), blocks below frozen ({} parameters) |",
                f.unfrozen_blocks,
                f.total_blocks,
                f.stats.trainable_parameters,
                f.stats.frozen_parameters
            )?;
            writeln!(
                out,
                "| backbone learning rate | {} ({}) |",
                f.backbone_lr,
                cell(&f.schedule)
            )?;
            writeln!(
                out,
                "| BatchNorm statistics | {} |",
                if f.train_bn {
                    "updated from each batch"
                } else {
                    "frozen (ImageNet)"
                }
            )?;
            writeln!(
                out,
                "| head start | linear probe, {} validation accuracy |",
                pct(f.stats.probe_val_accuracy)
            )?;
            writeln!(
                out,
                "| unfrozen part, images/s | {:.1} training (forward, backward, update), {:.1} \
                 forward |",
                f.stats.train_images_per_s, f.stats.forward_images_per_s
            )?;
        }
        None => writeln!(out, "| backbone | frozen |")?,
    }
    match &training.augmentation {
        Some(a) if a.on_the_fly => writeln!(
            out,
            "| augmentation | a new view of each photo every epoch ({}), {:.1} s |\n",
            a.kind,
            a.views_s.unwrap_or(f64::NAN)
        )?,
        Some(a) => writeln!(
            out,
            "| augmentation | {} views per photo ({}), {} training rows |\n",
            a.views_per_photo, a.kind, a.training_rows
        )?,
        None => writeln!(out, "| augmentation | none |\n")?,
    }
    let fine_tuned = training.fine_tune.is_some();
    if fine_tuned {
        writeln!(
            out,
            "| epoch | train loss | train accuracy | validation loss | validation accuracy | \
             head lr | backbone lr |\n|---:|---:|---:|---:|---:|---:|---:|"
        )?;
    } else {
        writeln!(
            out,
            "| epoch | train loss | train accuracy | validation loss | validation accuracy |\n\
             |---:|---:|---:|---:|---:|"
        )?;
    }
    for m in &training.history {
        let best = if m.epoch == training.best_epoch {
            " (best)"
        } else {
            ""
        };
        write!(
            out,
            "| {}{best} | {:.4} | {} | {:.4} | {} |",
            m.epoch,
            m.train_loss,
            pct(m.train_accuracy),
            m.val_loss,
            pct(m.val_accuracy)
        )?;
        if fine_tuned {
            let lr = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.2e}"));
            write!(out, " {} | {} |", lr(m.lr), lr(m.backbone_lr))?;
        }
        writeln!(out)?;
    }
    writeln!(out)?;

    writeln!(out, "## Backbone\n")?;
    writeln!(out, "| | |\n|---|---|")?;
    writeln!(out, "| name | {} |", cell(&backbone.name))?;
    writeln!(out, "| weights | {} |", cell(&backbone.weights))?;
    writeln!(
        out,
        "| SHA-256 | `{}` |",
        backbone.weights_sha256.replace('`', "")
    )?;
    writeln!(out, "| input | {0}×{0} RGB |", backbone.input_size)?;
    writeln!(out, "| features | {} |\n", backbone.feature_dim)?;

    writeln!(out, "## Export\n")?;
    match &report.export {
        None => writeln!(out, "No model was exported.\n")?,
        Some(export) => {
            writeln!(out, "| | |\n|---|---|")?;
            writeln!(out, "| model | {} |", cell(&export.model))?;
            writeln!(out, "| size | {:.1} MB |", export.model_bytes as f64 / 1e6)?;
            writeln!(out, "| ONNX opset | {} |", export.opset)?;
            if export.mirror_average {
                writeln!(
                    out,
                    "| mirror averaging | each frame and its mirror image, probabilities averaged |"
                )?;
            }
            writeln!(out, "| photos verified | {} |", export.verify_images)?;
            writeln!(out, "| candle accuracy | {} |", pct(export.candle_accuracy))?;
            writeln!(
                out,
                "| float ONNX in tract: same prediction as candle | {} |",
                pct(export.float_agreement)
            )?;
            writeln!(
                out,
                "| float ONNX: largest probability difference from candle | {:.2e} |",
                export.float_max_probability_diff
            )?;
            writeln!(
                out,
                "| verification pass | {:.1} ms per photo |\n",
                export.tract_ms_per_image
            )?;
            quantization_section(out, export)?;
        }
    }

    writeln!(out, "## Timings\n")?;
    writeln!(out, "| stage | seconds | |\n|---|---:|---|")?;
    writeln!(out, "| dataset scan | {:.1} | |", timings.dataset_s)?;
    writeln!(
        out,
        "| features | {:.1} | {} cached, {} computed, {} photos/s |",
        timings.features_s,
        timings.features_cached,
        timings.features_computed,
        or_dash(timings.backbone_images_per_s.map(|r| format!("{r:.1}")))
    )?;
    writeln!(out, "| training | {:.1} | |", timings.train_s)?;
    writeln!(out, "| export | {:.1} | |", timings.export_s)?;
    writeln!(out, "| verification | {:.1} | |", timings.verify_s)?;
    writeln!(
        out,
        "| **total** | **{:.1}** | peak memory {} MB |",
        timings.total_s,
        or_dash(timings.peak_rss_mb.map(|m| format!("{m:.0}")))
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn from_predictions_matches_hand_counts() {
        // fox is never predicted, owl neither appears nor is predicted.
        let labels = labels(&["cat", "dog", "fox", "owl"]);
        let truth = [0, 0, 0, 1, 1, 2, 2];
        let predicted = [0, 0, 1, 1, 0, 1, 1];
        let e = Evaluation::from_predictions(&labels, &truth, &predicted);

        assert_eq!(
            e.confusion,
            vec![
                vec![2, 1, 0, 0],
                vec![1, 1, 0, 0],
                vec![0, 2, 0, 0],
                vec![0, 0, 0, 0],
            ]
        );
        assert_eq!(e.images, 7);
        assert_eq!(e.correct(), 3);
        assert!(close(e.accuracy, 3.0 / 7.0));

        let cat = &e.per_class[0];
        assert!(close(cat.precision, 2.0 / 3.0));
        assert!(close(cat.recall, 2.0 / 3.0));
        assert!(close(cat.f1, 2.0 / 3.0));
        assert_eq!(cat.support, 3);

        // dog: predicted 4 times, right once; 2 dogs.
        let dog = &e.per_class[1];
        assert!(close(dog.precision, 1.0 / 4.0));
        assert!(close(dog.recall, 1.0 / 2.0));
        assert!(close(dog.f1, 1.0 / 3.0));
        assert_eq!(dog.support, 2);

        for (m, support) in [(&e.per_class[2], 2), (&e.per_class[3], 0)] {
            assert_eq!((m.precision, m.recall, m.f1), (0.0, 0.0, 0.0));
            assert_eq!(m.support, support);
        }
    }

    #[test]
    fn from_predictions_with_no_photos_scores_zero() {
        let e = Evaluation::from_predictions(&labels(&["cat", "dog"]), &[], &[]);
        assert_eq!(e.accuracy, 0.0);
        assert_eq!(e.confusion, vec![vec![0, 0], vec![0, 0]]);
    }

    #[test]
    fn table_lists_classes_and_matrix() {
        let e = Evaluation::from_predictions(&labels(&["cat", "dog"]), &[0, 0, 1], &[0, 1, 1]);
        let expected = "\
class        precision   recall       f1  support
cat              1.000    0.500    0.667        2
dog              0.500    1.000    0.667        1

accuracy 66.67% (2 of 3 photos)

confusion matrix (rows: true, columns: predicted)
true \\ pred  cat  dog
cat            1    1
dog            0    1
";
        assert_eq!(e.table(), expected);
    }

    fn sample_report(history_len: usize) -> Report {
        let classes = labels(&["cat", "dog"]);
        let truth: Vec<usize> = (0..40).map(|i| i % 2).collect();
        let predicted: Vec<usize> = (0..40)
            .map(|i| if i % 7 == 0 { 1 - i % 2 } else { i % 2 })
            .collect();
        let history = (1..=history_len)
            .map(|epoch| {
                let t = epoch as f64;
                EpochMetrics {
                    epoch,
                    train_loss: 0.7 / t,
                    train_accuracy: 1.0 - 0.4 / t,
                    val_loss: 0.6 / t + 0.01 * t,
                    val_accuracy: 0.97 - 0.35 / t,
                    lr: Some(1e-3),
                    backbone_lr: None,
                }
            })
            .collect();
        Report {
            petcam_version: "0.1.0".into(),
            created: "2025-01-02T03:04:05Z".into(),
            backbone: BackboneInfo {
                name: "efficientnet-lite0".into(),
                weights: "weights/efficientnet-lite0.safetensors".into(),
                weights_sha256: "ab".repeat(32),
                input_size: 224,
                feature_dim: 1280,
            },
            dataset: DatasetInfo {
                root: "photos".into(),
                layout: "hash-split".into(),
                val_fraction: Some(0.2),
                digest: "cd".repeat(32),
                classes: classes.clone(),
                train_counts: vec![80, 82],
                val_counts: vec![20, 20],
            },
            skipped: vec![SkippedFile {
                path: "photos/cat/broken_file.jpg".into(),
                reason: "not a JPEG: bad marker".into(),
            }],
            training: TrainingInfo {
                device: "cpu".into(),
                epochs_requested: 30,
                epochs_run: history_len,
                best_epoch: history_len.saturating_sub(2).max(1),
                lr: 1e-3,
                weight_decay: 1e-4,
                batch_size: 32,
                dropout: 0.2,
                label_smoothing: 0.1,
                seed: 42,
                class_weights: vec![1.0, 0.975],
                early_stopping_patience: 5,
                augmentation: None,
                fine_tune: None,
                history,
            },
            evaluation: Evaluation::from_predictions(&classes, &truth, &predicted),
            export: Some(ExportInfo {
                model: "out/model.onnx".into(),
                model_bytes: 3_670_000,
                opset: 13,
                mirror_average: false,
                verify_images: 40,
                candle_accuracy: 0.85,
                onnx_accuracy: 0.85,
                float_agreement: 1.0,
                float_max_probability_diff: 1e-6,
                tract_ms_per_image: 31.7,
                quantization: QuantizationInfo {
                    form: QuantizationForm::Int8,
                    calibration: Some(CalibrationInfo {
                        method: CalibrationMethod::Percentile,
                        images: 200,
                        tensors: 71,
                    }),
                    float_model: None,
                    float_model_bytes: 13_540_000,
                    size_ratio: 0.271,
                    float_accuracy: 0.85,
                    accuracy: 0.85,
                    agreement: 0.975,
                    max_probability_diff: 0.02,
                    mean_probability_diff: 0.004,
                    float_latency: crate::model::Latency {
                        runs: 50,
                        p50_ms: 25.0,
                        p90_ms: 26.0,
                        p99_ms: 27.0,
                        mean_ms: 25.2,
                    },
                    latency: crate::model::Latency {
                        runs: 50,
                        p50_ms: 200.0,
                        p90_ms: 210.0,
                        p99_ms: 215.0,
                        mean_ms: 202.0,
                    },
                    latency_ratio: 8.0,
                    int8_layers: 50,
                    int8_weight_layers: 0,
                    float_weight_layers: 0,
                    profile: vec![crate::model::OpTime {
                        op: "OptMatMul".into(),
                        nodes: 50,
                        ms: 84.2,
                        share: 0.42,
                    }],
                    profile_by_layer: vec![crate::model::OpTime {
                        op: "depthwise conv 3x3".into(),
                        nodes: 48,
                        ms: 101.0,
                        share: 0.5,
                    }],
                    accuracy_drop_accepted: false,
                },
            }),
            timings: Timings {
                dataset_s: 0.4,
                features_s: 12.5,
                features_cached: 100,
                features_computed: 102,
                backbone_images_per_s: Some(8.2),
                train_s: 3.1,
                export_s: 0.8,
                verify_s: 2.2,
                total_s: 19.0,
                peak_rss_mb: Some(812.0),
            },
        }
    }

    /// Photos whose colour depends on `i`, with varied aspect ratios.
    fn photos(count: usize) -> Vec<Misclassified> {
        (0..count)
            .map(|i| {
                let (w, h) = [(64, 48), (30, 90), (120, 120)][i % 3];
                let thumbnail = RgbImage::from_fn(w, h, |x, y| {
                    image::Rgb([(x * 4) as u8, (y * 3) as u8, (i * 40) as u8])
                });
                Misclassified {
                    thumbnail,
                    true_label: if i % 2 == 0 { "cat" } else { "dog" }.into(),
                    predicted_label: if i % 2 == 0 { "dog" } else { "cat" }.into(),
                    confidence: 0.5 + i as f32 / 50.0,
                }
            })
            .collect()
    }

    /// Compares two JSON trees, floats to the last bit or two: without serde_json's
    /// `float_roundtrip` feature, parsing may land one ulp away from the printed value.
    fn assert_same_json(a: &serde_json::Value, b: &serde_json::Value, at: &str) {
        use serde_json::Value;
        match (a, b) {
            (Value::Number(x), Value::Number(y)) => {
                let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
                assert!(
                    (x - y).abs() <= 1e-15 * x.abs().max(y.abs()),
                    "{at}: {x} != {y}"
                );
            }
            (Value::Array(x), Value::Array(y)) => {
                assert_eq!(x.len(), y.len(), "{at}");
                for (i, (x, y)) in x.iter().zip(y).enumerate() {
                    assert_same_json(x, y, &format!("{at}[{i}]"));
                }
            }
            (Value::Object(x), Value::Object(y)) => {
                assert!(x.keys().eq(y.keys()), "{at}: keys differ");
                for (key, x) in x {
                    assert_same_json(x, &y[key], &format!("{at}.{key}"));
                }
            }
            _ => assert_eq!(a, b, "{at}"),
        }
    }

    /// Standard deviation of the grey level: 0 for a blank picture.
    fn spread(img: &RgbImage) -> f64 {
        let grey: Vec<f64> = img
            .pixels()
            .map(|p| p.0.iter().map(|&c| f64::from(c)).sum::<f64>() / 3.0)
            .collect();
        let mean = grey.iter().sum::<f64>() / grey.len() as f64;
        (grey.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / grey.len() as f64).sqrt()
    }

    fn decode(path: &Path) -> RgbImage {
        image::open(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .to_rgb8()
    }

    #[test]
    fn write_report_writes_every_file() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("report");
        let report = sample_report(12);
        let files = write_report(&out, &report, &photos(5)).unwrap();

        for path in files.paths() {
            assert!(path.is_file(), "{} missing", path.display());
            assert_eq!(path.parent(), Some(out.as_path()));
        }

        let text = fs::read_to_string(&files.json).unwrap();
        let back: Report = serde_json::from_str(&text).unwrap();
        assert_same_json(
            &serde_json::to_value(&back).unwrap(),
            &serde_json::to_value(&report).unwrap(),
            "report",
        );

        let curves = decode(&files.training_curves);
        assert_eq!(curves.dimensions(), draw::CURVES_SIZE);
        assert!(spread(&curves) > 10.0);
        let confusion = decode(&files.confusion_matrix);
        assert_eq!(confusion.dimensions(), draw::CONFUSION_SIZE);
        assert!(spread(&confusion) > 10.0);
        assert!(spread(&decode(&files.misclassified)) > 10.0);

        let md = fs::read_to_string(&files.markdown).unwrap();
        for needle in [
            "**Validation accuracy: 85.00%** (34 of 40 photos, 2 classes)",
            "photos/cat/broken\\_file.jpg | not a JPEG: bad marker",
            "| **cat** | 17 | 3 |",
            "| 10 (best) |",
            "](training_curves.png)",
            "](confusion_matrix.png)",
            "5 of the 6 misclassified photos, most confident first:\n\n![misclassified photos](misclassified.jpg)",
            "| float ONNX in tract: same prediction as candle | 100.00% |",
            "| size | 13.54 MB | 3.67 MB (27.1% of float) |",
            "| tract latency p50 / p90, 1 thread, 50 runs | 25.0 / 26.0 ms | 200.0 / 210.0 ms (8.00x) |",
            "Same top-1 prediction as the float model on 97.50% of the photos",
            "Activation ranges of 71 tensors calibrated on 200 training photos (percentile).",
            "| OptMatMul | 50 | 84.20 | 42.00% |",
            "| depthwise conv 3x3 | 48 | 101.00 | 50.00% |",
        ] {
            assert!(md.contains(needle), "report.md lacks {needle:?}:\n{md}");
        }
    }

    #[test]
    fn fine_tuning_shows_its_configuration_and_both_learning_rates() {
        let dir = tempfile::tempdir().unwrap();
        let mut report = sample_report(4);
        for m in &mut report.training.history {
            m.backbone_lr = m.lr.map(|lr| lr / (10.0 * m.epoch as f64));
        }
        report.training.fine_tune = Some(FineTuneInfo {
            unfrozen_blocks: 2,
            total_blocks: 16,
            backbone_lr: 1e-4,
            train_bn: false,
            schedule: "cosine".into(),
            stats: crate::finetune::FineTuneStats {
                first_unfrozen_block: 14,
                trainable_parameters: 1_487_360,
                frozen_parameters: 1_862_640,
                probe_val_accuracy: 0.995,
                train_images_per_s: 64.0,
                forward_images_per_s: 345.0,
            },
        });
        let files = write_report(&dir.path().join("r"), &report, &[]).unwrap();
        let md = fs::read_to_string(&files.markdown).unwrap();
        for needle in [
            "| backbone | top 2 of 16 blocks and the head convolution trained (1487360 parameters)",
            "| BatchNorm statistics | frozen (ImageNet) |",
            "| head start | linear probe, 99.50% validation accuracy |",
            "| 64.0 training (forward, backward, update), 345.0 forward |",
            "| head lr | backbone lr |",
            "| 1.00e-3 | 2.50e-5 |",
        ] {
            assert!(md.contains(needle), "report.md lacks {needle:?}:\n{md}");
        }
        // The curves gain a third panel: the learning rates.
        let with_lr = decode(&files.training_curves);
        report.training.fine_tune = None;
        report
            .training
            .history
            .iter_mut()
            .for_each(|m| m.backbone_lr = None);
        let files = write_report(&dir.path().join("f"), &report, &[]).unwrap();
        assert_ne!(with_lr, decode(&files.training_curves));
        let md = fs::read_to_string(&files.markdown).unwrap();
        assert!(md.contains("| backbone | frozen |") && !md.contains("backbone lr"));
    }

    #[test]
    fn contact_sheet_caps_at_sixteen_in_four_columns() {
        let cell_w = draw::THUMB + draw::SHEET_PAD;
        let cell_h = draw::THUMB + draw::CAPTION + draw::SHEET_PAD;
        let size = |columns: u32, rows: u32| {
            (
                columns * cell_w + draw::SHEET_PAD,
                rows * cell_h + draw::SHEET_PAD,
            )
        };
        let dir = tempfile::tempdir().unwrap();
        let report = sample_report(3);
        for (count, expected) in [
            (0, draw::EMPTY_SHEET_SIZE),
            (1, size(1, 1)),
            (5, size(4, 2)),
            (20, size(4, 4)),
        ] {
            let files = write_report(dir.path(), &report, &photos(count)).unwrap();
            let sheet = decode(&files.misclassified);
            assert_eq!(sheet.dimensions(), expected, "{count} photos");
            assert!(spread(&sheet) > 5.0, "{count} photos");
        }
    }

    #[test]
    fn write_report_survives_an_empty_run() {
        let dir = tempfile::tempdir().unwrap();
        let mut report = sample_report(0);
        report.evaluation = Evaluation::from_predictions(&[], &[], &[]);
        report.export = None;
        let files = write_report(dir.path(), &report, &[]).unwrap();
        let md = fs::read_to_string(&files.markdown).unwrap();
        assert!(md.contains("No validation photo was misclassified."));
        assert!(md.contains("No model was exported."));
        assert!(!md.contains("](misclassified.jpg)"));
        assert_eq!(
            decode(&files.training_curves).dimensions(),
            draw::CURVES_SIZE
        );
    }

    #[test]
    fn write_report_names_the_folder_it_cannot_create() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        fs::write(&blocker, b"").unwrap();
        let err = write_report(&blocker.join("report"), &sample_report(1), &[]).unwrap_err();
        assert!(matches!(err, ReportError::CreateDir { .. }), "{err:?}");
        assert!(err.to_string().contains("file/report"), "{err}");
        assert!(std::error::Error::source(&err).is_some());
    }
}
