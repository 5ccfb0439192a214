//! `petcam inspect`: what a model file is, and whether it still computes its stored golden output.

use std::path::PathBuf;

use petcam_shared::metadata;

use crate::model::ExportedModel;

/// Print what an exported model is: labels, input, backbone, quantization, size, operator
/// histogram (how many layers compute in integers, hold int8 weights, or are float), training
/// metrics, and the result of running the golden input stored in the model through tract.
///
/// Exits with an error when the self-test fails.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The model file (model.onnx from `petcam train-and-export`).
    pub model: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let model = ExportedModel::load(&args.model)?;
    let test = model.self_test()?;
    let json_field = |key: &str| -> serde_json::Value {
        model
            .metadata
            .get(key)
            .map(|v| {
                serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.clone()))
            })
            .unwrap_or(serde_json::Value::Null)
    };
    if args.json {
        let out = serde_json::json!({
            "model": args.model.display().to_string(),
            "bytes": model.bytes,
            "labels": model.labels,
            "input": model.input,
            "backbone": json_field(metadata::BACKBONE),
            "quantization": json_field(metadata::QUANTIZATION),
            "metrics": json_field(metadata::METRICS),
            "dataset_digest": json_field(metadata::DATASET_DIGEST),
            "version": json_field(metadata::VERSION),
            "created": json_field(metadata::CREATED),
            "graph": model.graph,
            "self_test": test,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "model         {} ({:.2} MB)",
            args.model.display(),
            model.bytes as f64 / 1e6
        );
        println!("labels        {}", model.labels.join(", "));
        let i = &model.input;
        println!(
            "input         {} {}x{}x{} {} {}, resize {}, (x - {}) / {} inside the graph",
            i.name, i.height, i.width, i.channels, i.dtype, i.layout, i.resize, i.mean, i.std
        );
        if i.mirror_average {
            println!("mirror        each frame and its mirror image, probabilities averaged");
        }
        for (label, key) in [
            ("backbone", metadata::BACKBONE),
            ("quantization", metadata::QUANTIZATION),
            ("metrics", metadata::METRICS),
            ("dataset", metadata::DATASET_DIGEST),
            ("version", metadata::VERSION),
            ("created", metadata::CREATED),
        ] {
            println!(
                "{label:<13} {}",
                model.metadata.get(key).map(String::as_str).unwrap_or("-")
            );
        }
        let g = &model.graph;
        println!(
            "layers        {} integer (QLinearConv/QLinearMatMul), {} with int8 weights, {} float",
            g.int8_layers, g.int8_weight_layers, g.float_weight_layers
        );
        let ops: Vec<String> = model
            .graph
            .ops
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        println!("operators     {}", ops.join(", "));
        println!(
            "self-test     {} (max difference {:.2e}, tolerance {:.0e})",
            if test.passed { "passed" } else { "FAILED" },
            test.max_abs_diff,
            test.tolerance
        );
    }
    if !test.passed {
        anyhow::bail!(
            "{}: the golden input no longer gives the stored output (max difference {:.3e} > {:.0e})",
            args.model.display(),
            test.max_abs_diff,
            test.tolerance
        );
    }
    Ok(())
}
