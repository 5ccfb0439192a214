//! The `petcam` command line: one file per subcommand.

pub mod bench;
pub mod evaluate;
pub mod flash;
pub mod import_backbone;
pub mod inspect;
pub mod keygen;
pub mod monitor;
pub mod train_and_export;

use clap::{Parser, Subcommand};

/// petcam: transfer learning for a camera that tells cats from dogs (or any photo folders).
///
/// Train on a workstation, export one ONNX model that carries its labels and preprocessing, and
/// run it on a Raspberry Pi with `petcam-device`.
#[derive(Debug, Parser)]
#[command(name = "petcam", version, propagate_version = true)]
pub struct Cli {
    /// More log output (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    TrainAndExport(train_and_export::Args),
    Evaluate(evaluate::Args),
    Inspect(inspect::Args),
    ImportBackbone(import_backbone::Args),
    Bench(bench::Args),
    Keygen(keygen::Args),
    Flash(flash::Args),
    Monitor(monitor::Args),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::TrainAndExport(a) => train_and_export::run(a),
        Command::Evaluate(a) => evaluate::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::ImportBackbone(a) => import_backbone::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Keygen(a) => keygen::run(a),
        Command::Flash(a) => flash::run(a),
        Command::Monitor(a) => monitor::run(a),
    }
}

pub fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn,petcam_host=info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .init();
}

pub use petcam_runtime::peak_rss_mb;
