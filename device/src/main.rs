//! `petcam-device`: the program that runs petcam models on the camera computer.
//!
//! Exit codes: 0 success; 1 the model (or another required file) is missing or unusable;
//! 2 bad command line; 3 some images could not be read (the others were classified).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use petcam_device::infer::{self, top1, ExportedModel, Latency};
use petcam_device::{preprocess, source};

/// petcam on the camera computer (Raspberry Pi): classify photos with an exported model and
/// measure how fast it runs here.
///
/// The model (`model.onnx` from `petcam train-and-export`) says everything the device needs:
/// labels, input size and normalisation.
#[derive(Debug, Parser)]
#[command(name = "petcam-device", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Classify(ClassifyArgs),
    Bench(BenchArgs),
    Run(RunArgs),
}

/// Watch a source of frames, decide what it sees, drive output pins, and report each change of
/// decision. Ends when the source ends (without --loop), after --max-frames, or on
/// SIGINT/SIGTERM, with the outputs at their inactive level and exit code 0.
#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The exported model.
    #[arg(long, value_name = "FILE")]
    model: PathBuf,
    /// dir:PATH (images in name order), mjpeg:FILE (concatenated JPEG frames) or
    /// camera:/dev/videoN.
    #[arg(long, value_name = "SRC")]
    source: source::SourceSpec,
    /// Start again at the first file when a dir: or mjpeg: source ends.
    #[arg(long = "loop")]
    looping: bool,
    /// Pace a dir: or mjpeg: source like a camera at this many frames per second; frames are
    /// then dropped (oldest first) when inference is slower. Unpaced files are all classified.
    #[arg(long, value_name = "FPS")]
    fps: Option<f64>,
    /// Decide on the mean probabilities of the last N frames.
    #[arg(long, default_value_t = 3, value_name = "N")]
    smooth: usize,
    /// Below this smoothed probability the decision is `none`.
    #[arg(long, default_value_t = 0.8)]
    threshold: f32,
    /// Drive a GPIO line while a label is decided, e.g. --pin cat=17 --pin dog=27 (needs a build
    /// with the `gpio` feature).
    #[arg(long = "pin", value_name = "LABEL=LINE")]
    pins: Vec<String>,
    /// GPIO character device of the --pin lines.
    #[arg(long, default_value = "/dev/gpiochip0", value_name = "DEV")]
    gpio_chip: PathBuf,
    /// Threads for tract's matrix products [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Stop after this many classified frames.
    #[arg(long, value_name = "N")]
    max_frames: Option<u64>,
    /// JSON lines: one per decision change and bad frame, then a summary.
    #[arg(long)]
    json: bool,
}

/// Classify image files, or every image under folders, one line per image.
///
/// An image that cannot be read is reported on its own line and the run goes on; the exit
/// code is then 3.
#[derive(Debug, clap::Args)]
struct ClassifyArgs {
    /// The exported model.
    #[arg(long, value_name = "FILE")]
    model: PathBuf,
    /// Image files or folders (searched recursively, in name order).
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<PathBuf>,
    /// Threads for tract's matrix products [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
    /// JSON lines: path, label, confidence, probabilities, latency_ms (or path and error).
    #[arg(long)]
    json: bool,
}

/// Measure load time, inference latency, the preprocessing of a 640x480 camera frame and peak
/// memory.
#[derive(Debug, clap::Args)]
struct BenchArgs {
    /// The exported model.
    #[arg(long, value_name = "FILE")]
    model: PathBuf,
    /// Threads for tract's matrix products [default: all cores].
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Classify(a) => classify(a),
        Command::Bench(a) => bench(a).map(|()| ExitCode::SUCCESS),
        Command::Run(a) => run(a).map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn threads(requested: Option<usize>) -> usize {
    requested
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1)
}

fn load(path: &Path, threads: usize) -> anyhow::Result<ExportedModel> {
    if !path.exists() {
        anyhow::bail!(
            "model file {} does not exist; copy model.onnx from `petcam train-and-export`",
            path.display()
        );
    }
    Ok(ExportedModel::load_with_threads(path, threads)?)
}

fn classify(args: ClassifyArgs) -> anyhow::Result<ExitCode> {
    let model = load(&args.model, threads(args.threads))?;
    let mut files = Vec::new();
    for p in &args.paths {
        files.extend(source::image_files(p)?);
    }
    let mut failed = 0;
    for path in &files {
        let start = Instant::now();
        let result = preprocess::load_input(path, model.input.width, model.input.height)
            .map_err(|e| e.to_string())
            .and_then(|img| model.predict(&img).map_err(|e| e.to_string()));
        let latency_ms = start.elapsed().as_secs_f64() * 1000.0;
        match result {
            Ok(probs) => {
                let (i, confidence) = top1(&probs);
                let label = &model.labels[i];
                if args.json {
                    let probabilities: serde_json::Map<String, serde_json::Value> = model
                        .labels
                        .iter()
                        .zip(&probs)
                        .map(|(l, p)| (l.clone(), serde_json::json!(p)))
                        .collect();
                    println!(
                        "{}",
                        serde_json::json!({
                            "path": path.display().to_string(),
                            "label": label,
                            "confidence": confidence,
                            "probabilities": probabilities,
                            "latency_ms": latency_ms,
                        })
                    );
                } else {
                    println!(
                        "{}\t{label}\t{confidence:.4}\t{latency_ms:.1} ms",
                        path.display()
                    );
                }
            }
            Err(e) => {
                failed += 1;
                if args.json {
                    println!(
                        "{}",
                        serde_json::json!({"path": path.display().to_string(), "error": e})
                    );
                } else {
                    eprintln!("{}: cannot classify: {e}", path.display());
                }
            }
        }
    }
    if failed > 0 {
        eprintln!(
            "{failed} of {} image(s) could not be read; the others were classified",
            files.len()
        );
        return Ok(ExitCode::from(3));
    }
    Ok(ExitCode::SUCCESS)
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

fn bench(args: BenchArgs) -> anyhow::Result<()> {
    let threads = threads(args.threads);
    let start = Instant::now();
    let model = load(&args.model, threads)?;
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

fn run(args: RunArgs) -> anyhow::Result<()> {
    use petcam_device::actuate::{self, Actuator};
    use petcam_device::agent::{self, Report};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let model = load(&args.model, threads(args.threads))?;
    let pins: Vec<(usize, u32)> = args
        .pins
        .iter()
        .map(|spec| actuate::parse_pin(spec, &model.labels))
        .collect::<Result<_, _>>()?;
    let frames = match &args.source {
        source::SourceSpec::Dir(p) => source::FileSource::dir(p, args.looping)?,
        source::SourceSpec::Mjpeg(p) => source::FileSource::mjpeg(p, args.looping)?,
        source::SourceSpec::Camera(p) => anyhow::bail!(
            "camera source {}: this petcam-device has no camera support yet; use dir: or mjpeg:",
            p.display()
        ),
    };
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || stop.store(true, Ordering::Relaxed))
            .map_err(|e| anyhow::anyhow!("cannot install the SIGINT/SIGTERM handler: {e}"))?;
    }
    let paced = args
        .fps
        .filter(|f| *f > 0.0)
        .map(|f| std::time::Duration::from_secs_f64(1.0 / f));
    let (queue, capture) = agent::spawn_capture(frames, paced, stop.clone());
    let cfg = agent::RunConfig {
        smooth: args.smooth,
        threshold: args.threshold,
        max_frames: args.max_frames,
    };
    let labels = model.labels.clone();
    let json = args.json;
    let report = move |r: Report| match r {
        Report::Decision { frame, event } => {
            let (from, to) = (
                agent::decision_label(event.from, &labels),
                agent::decision_label(event.to, &labels),
            );
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "event": "decision", "frame": frame, "from": from, "to": to,
                        "confidence": event.confidence,
                    })
                );
            } else {
                println!("{frame}\t{from} -> {to}\t{:.3}", event.confidence);
            }
        }
        Report::BadFrame { frame, error } => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"event": "bad_frame", "frame": frame, "error": error})
                );
            } else {
                eprintln!("{frame}: skipped: {error}");
            }
        }
    };
    let stats = if pins.is_empty() {
        let mut none = Actuator::<actuate::NoPin>::new(Vec::new())?;
        agent::run_loop(&model, &queue, &cfg, &mut none, &stop, report)
    } else {
        let mut act = gpio::actuator(&args.gpio_chip, &pins)?;
        agent::run_loop(&model, &queue, &cfg, &mut act, &stop, report)
    };
    // The capture thread ends once it sees the stop flag or a closed queue.
    stop.store(true, Ordering::Relaxed);
    queue.close();
    let _ = capture.join();
    let stats = stats?;
    if args.json {
        let mut summary = serde_json::to_value(&stats)?;
        summary["event"] = "summary".into();
        println!("{summary}");
    } else {
        println!(
            "{} frames in {:.1} s ({:.1} fps), {} dropped, {} unreadable, {} decision changes; \
             inference p50 {:.1} ms, preprocessing p50 {:.2} ms",
            stats.frames,
            stats.seconds,
            stats.fps,
            stats.dropped,
            stats.bad_frames,
            stats.events,
            stats.infer.p50_ms,
            stats.preprocess.p50_ms
        );
    }
    Ok(())
}

/// The Linux GPIO back-end: character-device lines (`/dev/gpiochipN`).
#[cfg(feature = "gpio")]
mod gpio {
    use std::path::Path;

    use linux_embedded_hal::gpio_cdev::{Chip, LineRequestFlags};
    use linux_embedded_hal::CdevPin;
    use petcam_device::actuate::Actuator;

    pub fn actuator(chip: &Path, pins: &[(usize, u32)]) -> anyhow::Result<Actuator<CdevPin>> {
        let mut c = Chip::new(chip).map_err(|e| {
            anyhow::anyhow!(
                "cannot open GPIO chip {}: {e}; is the user in the gpio group?",
                chip.display()
            )
        })?;
        let mut out = Vec::new();
        for &(label, line) in pins {
            let handle = c
                .get_line(line)
                .and_then(|l| l.request(LineRequestFlags::OUTPUT, 0, "petcam"))
                .map_err(|e| {
                    anyhow::anyhow!("cannot claim GPIO line {line} of {}: {e}", chip.display())
                })?;
            out.push((label, CdevPin::new(handle)?));
        }
        Actuator::new(out).map_err(|e| anyhow::anyhow!("cannot drive a GPIO line: {e:?}"))
    }
}

#[cfg(not(feature = "gpio"))]
mod gpio {
    use std::path::Path;

    use petcam_device::actuate::{Actuator, NoPin};

    pub fn actuator(_chip: &Path, _pins: &[(usize, u32)]) -> anyhow::Result<Actuator<NoPin>> {
        anyhow::bail!(
            "--pin needs GPIO support: build with `cargo build --release -p petcam-device --features gpio`"
        )
    }
}
