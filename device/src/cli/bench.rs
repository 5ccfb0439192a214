//! `petcam-device bench`: load time, latency, preprocessing and memory on this machine.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use petcam_device::infer::{self, Latency};
use petcam_device::preprocess;
use petcam_device::threads::Threads;

/// Measure load time, inference latency, the preprocessing of a 640x480 camera frame and peak
/// memory.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// The exported model.
    #[arg(long, value_name = "FILE")]
    model: PathBuf,
    /// Inference threads: `auto` (the default) splits inferences over every core while that is
    /// measured faster than one thread, and runs them on one while other work holds the
    /// cores; `N` always uses N; `auto:N` chooses between 1 and N.
    #[arg(long)]
    threads: Option<Threads>,
    /// Timed inferences (after one warm-up).
    #[arg(long, default_value_t = 50)]
    iterations: usize,
    /// Also time every node of tract's plan and print where the time goes.
    #[arg(long)]
    profile: bool,
    /// Hold this many cores with busy loops while timing, as other work on the device would.
    #[arg(long, value_name = "CORES", default_value_t = 0)]
    load: usize,
    /// Instead, time one thread, a pool and `auto` in turn, with the cores free and then with
    /// one held by a busy loop, and print their p50s and ratios (the pool's size: --threads's,
    /// else every core).
    #[arg(long, conflicts_with_all = ["profile", "load"])]
    sharing: bool,
    /// One JSON object: load_ms, infer_p50_ms, infer_p90_ms, infer_p99_ms,
    /// preprocess_p50_ms, peak_rss_mb (and the profile with --profile); with --sharing, the
    /// p50s idle and busy and their ratios.
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

/// Busy loops on `cores` threads until dropped: other work holding cores.
struct BusyLoops {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl BusyLoops {
    fn start(cores: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..cores)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        Self { stop, threads }
    }
}

impl Drop for BusyLoops {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

pub fn bench(args: BenchArgs) -> anyhow::Result<()> {
    if args.sharing {
        return sharing(args);
    }
    let threads = args.threads.unwrap_or_default();
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
    let busy = BusyLoops::start(args.load);
    let infer = infer::latency(&[&model], &input, args.iterations)?.remove(0);
    drop(busy);
    let profile = if args.profile {
        Some(model.profile(&input, args.iterations.clamp(1, 10))?)
    } else {
        None
    };
    let peak_rss_mb = petcam_device::peak_rss_mb();

    if args.json {
        let mut out = serde_json::json!({
            "model": args.model.display().to_string(),
            "threads": threads.to_string(),
            "busy_cores": args.load,
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
        "{}: {} thread(s), {} iterations{}",
        args.model.display(),
        threads,
        infer.runs,
        match args.load {
            0 => String::new(),
            n => format!(", {n} core(s) held by busy loops"),
        }
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

/// p50 of one thread, a pool and `auto`, timed in turns (25 inferences each, round after
/// round, so the machine's drift touches all three alike) under one load.
#[derive(Debug, serde::Serialize)]
struct Sharing {
    busy_cores: usize,
    one_p50_ms: f64,
    pool_p50_ms: f64,
    auto_p50_ms: f64,
    /// Share of `auto`'s inferences that ran on the pool.
    auto_pool_share: f64,
}

/// Inferences in a row of one model in `--sharing`: each runs as it would alone.
const TURN: usize = 25;

fn sharing(args: BenchArgs) -> anyhow::Result<()> {
    let n = args.threads.unwrap_or_default().max();
    if n < 2 {
        anyhow::bail!(
            "--sharing compares one thread with a pool: this machine has one core, pass --threads 2 or more"
        );
    }
    let one = crate::load(&args.model, Threads::One)?;
    let pool = crate::load(&args.model, Threads::Pool(n))?;
    let auto = crate::load(&args.model, Threads::Auto(n))?;
    let input = preprocess::resize(&camera_frame(), one.input.width, one.input.height);
    let mut levels = Vec::new();
    for busy_cores in [0, 1] {
        let before = auto.lane_counts().unwrap_or_default();
        let busy = BusyLoops::start(busy_cores);
        let t = infer::latency_in_turns(&[&one, &pool, &auto], &input, args.iterations, TURN)?;
        drop(busy);
        let after = auto.lane_counts().unwrap_or_default();
        let (ones, pools) = (after.0 - before.0, after.1 - before.1);
        levels.push(Sharing {
            busy_cores,
            one_p50_ms: t[0].p50_ms,
            pool_p50_ms: t[1].p50_ms,
            auto_p50_ms: t[2].p50_ms,
            auto_pool_share: pools as f64 / (ones + pools).max(1) as f64,
        });
    }
    let (idle, busy) = (&levels[0], &levels[1]);
    let idle_speedup_pool = idle.one_p50_ms / idle.pool_p50_ms;
    let idle_speedup_auto = idle.one_p50_ms / idle.auto_p50_ms;
    let busy_auto_vs_one = busy.auto_p50_ms / busy.one_p50_ms;
    let busy_pool_vs_one = busy.pool_p50_ms / busy.one_p50_ms;
    if args.json {
        let out = serde_json::json!({
            "model": args.model.display().to_string(),
            "pool_threads": n,
            "iterations": args.iterations.max(1),
            "idle": idle,
            "busy": busy,
            "idle_speedup_pool": idle_speedup_pool,
            "idle_speedup_auto": idle_speedup_auto,
            "busy_auto_vs_one": busy_auto_vs_one,
            "busy_pool_vs_one": busy_pool_vs_one,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "{}: 1 thread, {n} threads and auto:{n}, {TURN} inferences in turn, {} each",
        args.model.display(),
        args.iterations.max(1)
    );
    println!("                 1 thread  {n:>2} threads      auto  (auto on the pool)");
    for l in &levels {
        println!(
            "{:<15} {:>6.2} ms  {:>7.2} ms  {:>6.2} ms  ({:.0}%)",
            match l.busy_cores {
                0 => "cores free",
                _ => "one core busy",
            },
            l.one_p50_ms,
            l.pool_p50_ms,
            l.auto_p50_ms,
            l.auto_pool_share * 100.0
        );
    }
    println!(
        "cores free: {n} threads {idle_speedup_pool:.2}x as fast as 1, auto {idle_speedup_auto:.2}x"
    );
    println!(
        "one core busy: {n} threads take {busy_pool_vs_one:.2}x the 1-thread p50, auto {busy_auto_vs_one:.2}x"
    );
    Ok(())
}
