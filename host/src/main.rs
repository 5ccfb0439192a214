//! `petcam`: teach a camera computer to tell your photo folders apart.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = petcam_host::cli::Cli::parse();
    petcam_host::cli::init_logging(cli.verbose);
    match petcam_host::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
