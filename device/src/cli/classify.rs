//! `petcam-device classify`: one line per image.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use petcam_device::infer::top1;
use petcam_device::threads::Threads;
use petcam_device::{preprocess, source};

/// Classify image files, or every image under folders, one line per image.
///
/// An image that cannot be read is reported on its own line and the run goes on; the exit
/// code is then 3.
#[derive(Debug, clap::Args)]
pub struct ClassifyArgs {
    /// The exported model.
    #[arg(long, value_name = "FILE")]
    model: PathBuf,
    /// Image files or folders (searched recursively, in name order).
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<PathBuf>,
    /// Inference threads: `auto` (the default) splits inferences over every core while that is
    /// measured faster than one thread, and runs them on one while other work holds the
    /// cores; `N` always uses N; `auto:N` chooses between 1 and N.
    #[arg(long)]
    threads: Option<Threads>,
    /// JSON lines: path, label, confidence, probabilities, latency_ms (or path and error).
    #[arg(long)]
    json: bool,
}

pub fn classify(args: ClassifyArgs) -> anyhow::Result<ExitCode> {
    let model = crate::load(&args.model, args.threads.unwrap_or_default())?;
    let mut files = Vec::new();
    for p in &args.paths {
        files.extend(source::image_files(p)?);
    }
    let mut failed = 0;
    let mut out = std::io::stdout().lock();
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
                let line = if args.json {
                    let probabilities: serde_json::Map<String, serde_json::Value> = model
                        .labels
                        .iter()
                        .zip(&probs)
                        .map(|(l, p)| (l.clone(), serde_json::json!(p)))
                        .collect();
                    serde_json::json!({
                        "path": path.display().to_string(),
                        "label": label,
                        "confidence": confidence,
                        "probabilities": probabilities,
                        "latency_ms": latency_ms,
                    })
                    .to_string()
                } else {
                    format!(
                        "{}\t{label}\t{confidence:.4}\t{latency_ms:.1} ms",
                        path.display()
                    )
                };
                if !emit(&mut out, &line)? {
                    return Ok(ExitCode::SUCCESS);
                }
            }
            Err(e) => {
                failed += 1;
                if args.json {
                    let line = serde_json::json!({"path": path.display().to_string(), "error": e});
                    if !emit(&mut out, &line.to_string())? {
                        return Ok(ExitCode::SUCCESS);
                    }
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

/// Writes one result line. `false` when the reader went away (`classify ... | head`): the
/// run stops quietly, as other command-line tools do.
fn emit(out: &mut impl std::io::Write, line: &str) -> anyhow::Result<bool> {
    match writeln!(out, "{line}").and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e.into()),
    }
}
