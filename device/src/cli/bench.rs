//! `petcam-device bench`: load time, latency, preprocessing and memory on this machine.

use std::path::PathBuf;
use std::time::Instant;

use petcam_device::infer::{self, Latency};
use petcam_device::preprocess;

/// Measure load time, inference latency, the preprocessing of a 640x480 camera frame and peak
/// memory.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// The exported model.
    #[arg(long, value_name = "FILE")]
    model: PathBuf,
    /// Inference threads (matrix products and depthwise layers) [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Timed inferences (after one warm-up).
    #[arg(long, default_value_t = 50)]
    iterations: usize,
    /// Also time every node of tract's plan and print where the time goes.
    #[arg(long)]
    profile: bool,
    /// One JSON object: load_ms, infer_p50_ms, infer_p90_ms, infer_p99_ms,
    /// preprocess_p50_ms, peak_rss_mb (and the profile with --profile).
    #[arg(long)]
    json: bool,
}

/// A synthetic 640x480 camera frame (a gradient with texture), so the benchmark needs no file.
fn camera_frame() -> image::RgbImage {
    image::RgbImage::from_fn(640, 480, |x, y| {
        image::Rgb([
            (x * 255 / 640) as u8,
            (y * 255 / 480) as u8,
            ((x ^ y) & 0xff) as u8,
        ])
    })
}

pub fn bench(args: BenchArgs) -> anyhow::Result<()> {
    let threads = crate::threads(args.threads);
    let start = Instant::now();
    let model = crate::load(&args.model, threads)?;
    let load_ms = start.elapsed().as_secs_f64() * 1000.0;

    let frame = camera_frame();
    let (w, h) = (model.input.width, model.input.height);
    let preprocess_ms: Vec<f64> = (0..args.iterations.max(1))
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(preprocess::resize(&frame, w, h));
            t.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    let preprocess = Latency::from_samples(preprocess_ms);
    let input = preprocess::resize(&frame, w, h);
    let infer = infer::latency(&[&model], &input, args.iterations)?.remove(0);
    let profile = if args.profile {
        Some(model.profile(&input, args.iterations.clamp(1, 10))?)
    } else {
        None
    };
    let peak_rss_mb = petcam_device::peak_rss_mb();

    if args.json {
        let mut out = serde_json::json!({
            "model": args.model.display().to_string(),
            "threads": threads,
            "iterations": infer.runs,
            "load_ms": load_ms,
            "infer_p50_ms": infer.p50_ms,
            "infer_p90_ms": infer.p90_ms,
            "infer_p99_ms": infer.p99_ms,
            "infer_mean_ms": infer.mean_ms,
            "preprocess_p50_ms": preprocess.p50_ms,
            "peak_rss_mb": peak_rss_mb,
        });
        if let Some(p) = &profile {
            out["profile_by_layer"] =
                serde_json::to_value(infer::time_by_layer_kind(p, &model.graph))?;
            out["profile_by_op"] = serde_json::to_value(infer::time_by_op(p))?;
            out["profile_nodes"] = serde_json::to_value(p)?;
        }
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "{}: {} thread(s), {} iterations",
        args.model.display(),
        threads,
        infer.runs
    );
    println!("load + optimise  {load_ms:.0} ms");
    println!(
        "inference        p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  mean {:.2} ms",
        infer.p50_ms, infer.p90_ms, infer.p99_ms, infer.mean_ms
    );
    println!(
        "preprocess       p50 {:.2} ms (640x480 RGB frame to {w}x{h})",
        preprocess.p50_ms
    );
    if let Some(mb) = peak_rss_mb {
        println!("peak memory      {mb:.0} MB");
    }
    if let Some(p) = &profile {
        println!("\nby layer kind:");
        for t in infer::time_by_layer_kind(p, &model.graph) {
            println!(
                "  {:<28} {:>4} nodes {:>9.2} ms {:>6.1}%",
                t.op,
                t.nodes,
                t.ms,
                t.share * 100.0
            );
        }
        println!("\nper node (tract's optimised plan, in order):");
        for n in p {
            println!("  {:>4} {:<48} {:<28} {:>8.3} ms", n.id, n.name, n.op, n.ms);
        }
    }
    Ok(())
}
