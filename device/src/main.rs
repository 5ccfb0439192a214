//! `petcam-device`: the program that runs petcam models on the camera computer.
//!
//! Exit codes: 0 success; 1 the model (or another required file) is missing or unusable;
//! 2 bad command line (or config file); 3 some images could not be read (the others were
//! classified).

use std::path::Path;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use petcam_device::infer::ExportedModel;
use petcam_device::threads::Threads;

mod cli;

/// petcam on the camera computer (Raspberry Pi): classify photos with an exported model,
/// measure how fast it runs here, and watch a camera for months.
///
/// The model (`model.onnx` from `petcam train-and-export`) says everything the device needs:
/// labels, input size and normalisation.
#[derive(Debug, Parser)]
#[command(name = "petcam-device", version, propagate_version = true)]
struct Cli {
    /// More log output on stderr (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Classify(cli::classify::ClassifyArgs),
    Bench(cli::bench::BenchArgs),
    Run(Box<cli::run::RunArgs>),
    Agent(cli::agent::AgentArgs),
    Launch(cli::launch::LaunchArgs),
    SelfTest(cli::launch::SelfTestArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let result = match cli.command {
        Command::Classify(a) => cli::classify::classify(a),
        Command::Bench(a) => cli::bench::bench(a).map(|()| ExitCode::SUCCESS),
        Command::Run(a) => cli::run::run(*a),
        Command::Agent(a) => cli::agent::agent(a),
        Command::Launch(a) => cli::launch::launch(a),
        Command::SelfTest(a) => cli::launch::self_test(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

pub(crate) fn load(path: &Path, threads: Threads) -> anyhow::Result<ExportedModel> {
    if !path.exists() {
        anyhow::bail!(
            "model file {} does not exist; copy model.onnx from `petcam train-and-export`",
            path.display()
        );
    }
    let options = petcam_device::infer::LoadOptions {
        threads,
        // PETCAM_TRACT_DEPTHWISE=1: tract's own convolutions, to compare with petcam's.
        kernels: petcam_device::infer::Kernels::from_env(),
    };
    Ok(ExportedModel::load_with(path, options)?)
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
