//! `petcam bench`: tract latency of exported models, side by side, with a per-node profile.

use std::path::PathBuf;
use std::time::Instant;

use crate::dataset;
use crate::model::{self, ExportedModel, Latency, OpTime};

/// Measure how fast tract runs exported models on this machine (one thread).
///
/// The models take turns run by run, so a busy spell of the machine slows all of them alike
/// and their ratio holds. The input is each model's stored golden image, or --image.
/// The first model is the reference of the ratios (e.g. model-f32.onnx model.onnx).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Model files (model.onnx, model-f32.onnx, ...).
    #[arg(required = true)]
    pub models: Vec<PathBuf>,
    /// Timed runs per model (after one warm-up run).
    #[arg(long, default_value_t = 50)]
    pub runs: usize,
    /// Photo to run instead of the golden image (resized as the model's metadata says).
    #[arg(long, value_name = "FILE")]
    pub image: Option<PathBuf>,
    /// Also time every node of tract's optimised plan and show where the time goes.
    #[arg(long)]
    pub profile: bool,
    /// Profiled runs per model (their mean is shown).
    #[arg(long, default_value_t = 10)]
    pub profile_runs: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, serde::Serialize)]
struct ModelBench {
    model: String,
    bytes: u64,
    quantization: Option<petcam_shared::metadata::QuantizationForm>,
    load_ms: f64,
    latency: Latency,
    /// p50 over the first model's p50.
    ratio: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    profile: Option<Vec<OpTime>>,
    /// The profile by layer kind (depthwise conv, 1x1 conv, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    layers: Option<Vec<OpTime>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    slowest_nodes: Option<Vec<model::NodeTime>>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut loaded = Vec::new();
    for path in &args.models {
        let start = Instant::now();
        // One thread; PETCAM_TRACT_DEPTHWISE=1 runs tract's own convolutions, to compare.
        let options = model::LoadOptions {
            threads: model::Threads::One,
            kernels: model::Kernels::from_env(),
        };
        let m = ExportedModel::load_with(path, options)?;
        loaded.push((m, start.elapsed().as_secs_f64() * 1000.0));
    }
    let image = |m: &ExportedModel| -> anyhow::Result<image::RgbImage> {
        Ok(match &args.image {
            Some(p) => dataset::load_input(p, m.input.width, m.input.height)?,
            None => m.golden()?.0,
        })
    };
    let first = image(&loaded[0].0)?;
    for (m, _) in &loaded[1..] {
        anyhow::ensure!(
            (m.input.width, m.input.height) == first.dimensions(),
            "{} takes {}x{} input, {} takes {}x{}: bench models of the same input size",
            m.path.display(),
            m.input.width,
            m.input.height,
            args.models[0].display(),
            first.width(),
            first.height()
        );
    }
    let models: Vec<&ExportedModel> = loaded.iter().map(|(m, _)| m).collect();
    let latencies = model::latency(&models, &first, args.runs)?;
    let base = latencies[0].p50_ms;
    let mut out = Vec::new();
    for ((m, load_ms), latency) in loaded.iter().zip(latencies) {
        let (profile, layers, slowest) = if args.profile {
            let nodes = m.profile(&first, args.profile_runs)?;
            let mut slowest = nodes.clone();
            slowest.sort_by(|a, b| b.ms.total_cmp(&a.ms));
            slowest.truncate(10);
            (
                Some(model::time_by_op(&nodes)),
                Some(model::time_by_layer_kind(&nodes, &m.graph)),
                Some(slowest),
            )
        } else {
            (None, None, None)
        };
        let quantization = m
            .metadata
            .get(petcam_shared::metadata::QUANTIZATION)
            .and_then(|j| serde_json::from_str::<petcam_shared::metadata::QuantizationSpec>(j).ok())
            .map(|q| q.form);
        out.push(ModelBench {
            model: m.path.display().to_string(),
            bytes: m.bytes,
            quantization,
            load_ms: *load_ms,
            ratio: latency.p50_ms / base,
            latency,
            profile,
            layers,
            slowest_nodes: slowest,
        });
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "runs": args.runs,
                "threads": 1,
                "models": out,
            }))?
        );
        return Ok(());
    }
    println!("tract, 1 thread, {} runs per model:", args.runs);
    for b in &out {
        println!(
            "{}  {}  {:.2} MB  load {:.0} ms  p50 {:.2} ms  p90 {:.2} ms  mean {:.2} ms  ({:.2}x)",
            b.model,
            b.quantization.map_or("?", |q| q.name()),
            b.bytes as f64 / 1e6,
            b.load_ms,
            b.latency.p50_ms,
            b.latency.p90_ms,
            b.latency.mean_ms,
            b.ratio
        );
        if let Some(layers) = &b.layers {
            println!(
                "  where the time goes by layer kind (mean of {} runs):",
                args.profile_runs
            );
            for t in layers {
                println!(
                    "    {:<32} {:>4} nodes {:>9.2} ms {:>6.1}%",
                    t.op,
                    t.nodes,
                    t.ms,
                    t.share * 100.0
                );
            }
        }
        if let Some(profile) = &b.profile {
            println!("  by operator of tract's optimised plan:");
            for t in profile.iter().take(12) {
                println!(
                    "    {:<32} {:>4} nodes {:>9.2} ms {:>6.1}%",
                    t.op,
                    t.nodes,
                    t.ms,
                    t.share * 100.0
                );
            }
        }
        if let Some(nodes) = &b.slowest_nodes {
            println!("  slowest nodes:");
            for n in nodes {
                println!("    {:<48} {:<24} {:>8.2} ms", n.name, n.op, n.ms);
            }
        }
    }
    Ok(())
}
