//! `petcam-device`: the program that runs petcam models on the camera computer.
//!
//! This binary currently only identifies itself; it is where on-device classification, the
//! camera pipeline, GPIO actuation and serial telemetry are built.

use clap::Parser;

/// petcam on the camera computer (Raspberry Pi).
#[derive(Debug, Parser)]
#[command(name = "petcam-device", version)]
struct Cli {}

fn main() {
    let _ = Cli::parse();
    println!(
        "petcam-device {}: no subcommands yet; see `petcam-device --help`",
        env!("CARGO_PKG_VERSION")
    );
}
