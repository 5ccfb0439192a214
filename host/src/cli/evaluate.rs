//! `petcam evaluate`: score an exported model on labelled photo folders, with tract.

use std::path::PathBuf;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;

use crate::dataset;
use crate::model::{top1, ExportedModel};
use crate::report::Evaluation;

/// Run an exported model over DIR/<class>/* and report accuracy, a per-class table and the
/// confusion matrix.
///
/// Folder names are matched to the labels stored in the model; a folder whose name is not one of
/// the model's labels is an error. Unreadable photos are listed as skipped and do not stop the run.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The exported model (model.onnx from `petcam train-and-export`).
    #[arg(long, value_name = "FILE")]
    pub model: PathBuf,
    /// Photo folder laid out as DIR/<label>/*.
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    /// Print one JSON object: accuracy, images, per_class, confusion, skipped.
    #[arg(long)]
    pub json: bool,
    /// With --json, also `photos`: every photo's path, label, predicted label and
    /// probabilities (to compare two models photo by photo).
    #[arg(long, requires = "json")]
    pub per_photo: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let model = ExportedModel::load(&args.model)?;
    let listed = dataset::list_classes(&args.data)?;
    if listed.is_empty() {
        bail!(
            "{} has no class folders; lay photos out as {}/<label>/*.jpg with labels {:?}",
            args.data.display(),
            args.data.display(),
            model.labels
        );
    }
    let mut samples = Vec::new();
    for (name, files) in listed {
        let label = model
            .labels
            .iter()
            .position(|l| *l == name)
            .with_context(|| {
                format!(
                    "folder {} is not one of the model's labels {:?}; rename or remove it",
                    args.data.join(&name).display(),
                    model.labels
                )
            })?;
        samples.extend(files.into_iter().map(|p| (p, label)));
    }

    let bar = ProgressBar::new(samples.len() as u64).with_style(
        ProgressStyle::with_template(
            "{msg:>10} [{bar:30}] {pos}/{len} photos, {per_sec}, eta {eta}",
        )
        .unwrap()
        .progress_chars("=> "),
    );
    bar.set_message("evaluate");
    let results: Vec<Result<Vec<f32>, String>> = samples
        .par_iter()
        .map(|(path, _)| {
            let r = model.predict_file(path).map_err(|e| e.to_string());
            bar.inc(1);
            r
        })
        .collect();
    bar.finish_and_clear();

    let (mut truth, mut predicted, mut skipped) = (Vec::new(), Vec::new(), Vec::new());
    let mut photos = Vec::new();
    for ((path, label), r) in samples.iter().zip(results) {
        match r {
            Ok(p) => {
                let top = top1(&p).0;
                truth.push(*label);
                predicted.push(top);
                if args.per_photo {
                    photos.push(serde_json::json!({
                        "path": path.display().to_string(),
                        "label": model.labels[*label],
                        "predicted": model.labels[top],
                        "probabilities": p,
                    }));
                }
            }
            Err(reason) => {
                tracing::warn!("skipping {}: {reason}", path.display());
                skipped.push(
                    serde_json::json!({"path": path.display().to_string(), "reason": reason}),
                );
            }
        }
    }
    let eval = Evaluation::from_predictions(&model.labels, &truth, &predicted);
    if args.json {
        let per_class: serde_json::Map<String, serde_json::Value> = eval
            .per_class
            .iter()
            .map(|c| {
                (
                    c.label.clone(),
                    serde_json::json!({
                        "precision": c.precision, "recall": c.recall, "f1": c.f1, "support": c.support
                    }),
                )
            })
            .collect();
        let mut out = serde_json::json!({
            "model": args.model.display().to_string(),
            "accuracy": eval.accuracy,
            "images": eval.images,
            "per_class": per_class,
            "confusion": eval.confusion,
            "skipped": skipped,
        });
        if args.per_photo {
            out["photos"] = serde_json::Value::Array(photos);
        }
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "accuracy {:.2}% on {} photos ({} skipped)",
            eval.accuracy * 100.0,
            eval.images,
            skipped.len()
        );
        println!("{}", eval.table());
    }
    Ok(())
}
