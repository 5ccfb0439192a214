//! `petcam-device launch` and `petcam-device self-test`: the start-up side of firmware updates.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use petcam_device::firmware::{Boot, FirmwareStore};
use petcam_device::threads::Threads;
use petcam_device::update::{self, Store};

/// Start the firmware flashed last (`firmware/current` in the state directory) with the given
/// arguments, or this binary when none was flashed; roll back a new one that never confirmed
/// itself. This is what the systemd unit runs: `petcam-device launch -- run --config ...`.
#[derive(Debug, clap::Args)]
pub struct LaunchArgs {
    #[arg(long, value_name = "DIR", default_value = "/var/lib/petcam")]
    pub state_dir: PathBuf,
    /// Starts a new binary gets to confirm itself before it is rolled back.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub trial_starts: u32,
    /// The arguments for the firmware, after `--`.
    #[arg(last = true, required = true, value_name = "ARGS")]
    pub args: Vec<String>,
}

pub fn launch(args: LaunchArgs) -> anyhow::Result<ExitCode> {
    let fw = FirmwareStore::open(&args.state_dir).with_context(|| {
        format!(
            "cannot use the state directory {}",
            args.state_dir.display()
        )
    })?;
    let program = match fw.boot(args.trial_starts)? {
        Boot::Packaged => None,
        Boot::Current(p) => Some(p),
        Boot::Trial(p) => {
            tracing::warn!("starting a newly flashed binary on trial: {}", p.display());
            Some(p)
        }
        Boot::RolledBack { failed, to } => {
            tracing::error!(
                "the binary flashed as version {} (sha256 {}) never confirmed itself; rolled back to {}",
                failed.version,
                &failed.sha256[..12],
                to.as_ref()
                    .map_or("the packaged binary".into(), |p| p.display().to_string())
            );
            to
        }
    };
    let program = match program {
        Some(p) => p,
        None => std::env::current_exe().context("cannot find this binary")?,
    };
    // Replaces this process, so systemd sees the firmware itself.
    let err = std::process::Command::new(&program).args(&args.args).exec();
    Err(err).with_context(|| format!("cannot start {}", program.display()))
}

/// Check that this binary works on this device: loads the active model (the one flashed last,
/// or --model) and runs its golden input. A flashed binary runs this before it is installed.
#[derive(Debug, clap::Args)]
pub struct SelfTestArgs {
    #[arg(long, value_name = "DIR", default_value = "/var/lib/petcam")]
    pub state_dir: PathBuf,
    /// The model to test when the state directory has none.
    #[arg(long, value_name = "FILE")]
    pub model: Option<PathBuf>,
    /// A golden inference slower than this fails the test. On a Pi keep the default; under
    /// emulation raise it by the emulator's slowdown (tools/arm-check measures it).
    #[arg(long, value_name = "MS", default_value_t = 2000.0)]
    pub latency_budget_ms: f64,
}

pub fn self_test(args: SelfTestArgs) -> anyhow::Result<ExitCode> {
    let active = Store::open(&args.state_dir)
        .ok()
        .and_then(|s| s.active())
        .map(|(_, p)| p);
    let Some(path) = active.or(args.model) else {
        println!("{{\"passed\":true,\"model\":null}}");
        return Ok(ExitCode::SUCCESS);
    };
    let bytes = std::fs::read(&path)
        .with_context(|| format!("cannot read the model {}", path.display()))?;
    if args.latency_budget_ms.is_nan() || args.latency_budget_ms <= 0.0 {
        anyhow::bail!(
            "--latency-budget-ms {} is not a positive number of milliseconds",
            args.latency_budget_ms
        );
    }
    let mut policy = super::trust::local_policy(Threads::One);
    policy.latency_budget_ms = args.latency_budget_ms;
    match update::self_test(&bytes, &path, &policy) {
        Ok(model) => {
            println!(
                "{}",
                serde_json::json!({"passed": true, "model": model.id()})
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(reason) => {
            println!("{}", serde_json::json!({"passed": false, "reason": reason}));
            Ok(ExitCode::from(1))
        }
    }
}
