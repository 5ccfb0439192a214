//! `petcam-device agent`: serves the serial link for a device with no camera: status, and
//! model uploads into the state directory (see [`petcam_device::update`]).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use petcam_device::firmware::FirmwareStore;
use petcam_device::threads::Threads;
use petcam_device::update::{Activated, Policy, Store, Updater};
use petcam_shared::protocol::{self, Message, Reassembler, Received, Role};
use petcam_shared::signing::{self, VerifyingKey};

/// Serve the serial link: answer `petcam flash` and status requests, with no camera.
#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// Serial port to the host (a USB-UART or the GPIO UART: /dev/ttyAMA0, /dev/ttyUSB0).
    #[arg(long, value_name = "PATH")]
    pub port: PathBuf,
    #[arg(long, default_value_t = 921_600)]
    pub baud: u32,
    /// Where uploads are staged and models kept; it survives restarts.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/petcam")]
    pub state_dir: PathBuf,
    #[command(flatten)]
    pub trust: TrustArgs,
    /// Name reported in `Hello` [default: the host name].
    #[arg(long)]
    pub device_id: Option<String>,
    /// Threads the self-test loads a model with: `auto` (the default), `N` or `auto:N`, as
    /// `run --threads` takes them.
    #[arg(long)]
    pub threads: Option<Threads>,
    /// Seconds a newly flashed binary must run before it confirms itself; one that stops
    /// sooner is rolled back by `petcam-device launch` at the next start.
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS")]
    pub health_grace: f64,
}

/// Exit status after a new binary was installed: the service manager starts the program
/// again (`RestartForceExitStatus=75` in device/petcam-device.service), now the new binary.
pub const EXIT_RESTART: u8 = 75;

/// Confirms a binary on trial once the program has run `grace` without failing.
#[derive(Debug)]
pub struct Health {
    firmware: Option<FirmwareStore>,
    confirm_at: Instant,
}

impl Health {
    pub fn new(state_dir: &Path, grace: Duration) -> Self {
        let firmware = FirmwareStore::open(state_dir)
            .ok()
            .filter(FirmwareStore::on_trial);
        if firmware.is_some() {
            tracing::info!("running a newly flashed binary on trial for {grace:?}");
        }
        Self {
            firmware,
            confirm_at: Instant::now() + grace,
        }
    }

    /// Call now and then; confirms once the grace period is over.
    pub fn tick(&mut self) {
        if self.firmware.is_some() && Instant::now() >= self.confirm_at {
            if let Some(fw) = self.firmware.take() {
                match fw.confirm() {
                    Ok(()) => tracing::info!("the new binary ran its grace period: confirmed"),
                    Err(e) => tracing::warn!("cannot confirm the new binary: {e}"),
                }
            }
        }
    }
}

/// Which uploads are accepted.
#[derive(Debug, Clone, clap::Args)]
pub struct TrustArgs {
    /// Public key (`NAME.pub` from `petcam keygen`) that uploads must be signed with.
    #[arg(long, value_name = "FILE", required_unless_present = "allow_unsigned")]
    pub trusted_key: Option<PathBuf>,
    /// Accept unsigned uploads. For a bench device only: anyone on the link can replace the model.
    #[arg(long, conflicts_with = "trusted_key")]
    pub allow_unsigned: bool,
    /// Accept a model older than the active one.
    #[arg(long)]
    pub allow_downgrade: bool,
    /// Largest upload accepted, in MiB.
    #[arg(long, default_value_t = 64)]
    pub max_upload_mib: u64,
    /// A model whose golden inference takes longer than this fails its self-test.
    #[arg(long, default_value_t = 2000.0)]
    pub latency_budget_ms: f64,
}

impl TrustArgs {
    pub fn policy(&self, threads: Threads) -> anyhow::Result<Policy> {
        let mut p = policy(
            self.trusted_key.as_deref(),
            self.allow_downgrade,
            threads,
            None,
        )?;
        p.max_size = self.max_upload_mib << 20;
        p.latency_budget_ms = self.latency_budget_ms;
        Ok(p)
    }
}

/// What uploads are accepted: signed with `trusted_key`, or anything (a loud warning) when
/// there is none.
pub fn policy(
    trusted_key: Option<&Path>,
    allow_downgrade: bool,
    threads: Threads,
    required_labels: Option<Vec<String>>,
) -> anyhow::Result<Policy> {
    let trusted_key = match trusted_key {
        Some(path) => Some(read_public_key(path)?),
        None => {
            tracing::warn!(
                "--allow-unsigned: this device accepts UNSIGNED uploads; anyone on the serial link can replace its model"
            );
            None
        }
    };
    Ok(Policy {
        trusted_key,
        allow_downgrade,
        required_labels,
        ..local_policy(threads)
    })
}

/// The policy of a check that takes nothing from a link (`self-test`): no key to trust, and
/// so nothing to warn about.
pub fn local_policy(threads: Threads) -> Policy {
    Policy {
        trusted_key: None,
        allow_downgrade: false,
        max_size: 64 << 20,
        latency_budget_ms: 2000.0,
        threads,
        required_labels: None,
        firmware_version: env!("CARGO_PKG_VERSION").to_owned(),
        firmware_self_test_timeout: Duration::from_secs(60),
    }
}

fn read_public_key(path: &Path) -> anyhow::Result<VerifyingKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the trusted key {}", path.display()))?;
    let bytes = signing::decode_key(signing::PUBLIC_KEY_TAG, &text).with_context(|| {
        format!(
            "{} is not a petcam public key (expected `{} <64 hex digits>`, as `petcam keygen` writes NAME.pub)",
            path.display(),
            signing::PUBLIC_KEY_TAG
        )
    })?;
    VerifyingKey::from_bytes(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: not a valid ed25519 public key ({e})", path.display()))
}

pub fn agent(args: AgentArgs) -> anyhow::Result<ExitCode> {
    let threads = args.threads.unwrap_or_default();
    let policy = args.trust.policy(threads)?;
    let store = Store::open(&args.state_dir).with_context(|| {
        format!(
            "cannot use the state directory {}",
            args.state_dir.display()
        )
    })?;
    let mut updater = Updater::new(store, policy).with_context(|| {
        format!(
            "cannot use the state directory {}",
            args.state_dir.display()
        )
    })?;
    let mut health = Health::new(&args.state_dir, Duration::from_secs_f64(args.health_grace));
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || stop.store(true, Ordering::Relaxed))
            .map_err(|e| anyhow::anyhow!("cannot install the SIGINT/SIGTERM handler: {e}"))?;
    }
    let device_id = args
        .device_id
        .clone()
        .unwrap_or_else(crate::cli::run::host_name);
    let mut port = protocol::serial::open(&args.port, args.baud, Duration::from_millis(100))?;
    let hello = |u: &Updater| {
        let model = u
            .store()
            .active()
            .map(|(e, _)| e.sha256[..12].to_owned())
            .unwrap_or_default();
        Message::Hello(protocol::Hello::new(
            Role::Device,
            device_id.clone(),
            env!("CARGO_PKG_VERSION"),
            model,
        ))
    };
    // Whatever the line carried before (a boot console, the half frame of a writer that
    // died) would run into the first Hello: a delimiter ends it, and an empty frame is ignored.
    port.write_all(&[0])
        .with_context(|| format!("writing to {}", args.port.display()))?;
    send(&mut port, &hello(&updater))?;
    tracing::info!(port = %args.port.display(), state = %args.state_dir.display(), "agent ready");
    let mut rx = Reassembler::new();
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        health.tick();
        let n = match port.read(&mut buf) {
            Ok(0) => continue,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context(format!("reading {}", args.port.display())),
        };
        let mut messages = Vec::new();
        rx.push(&buf[..n], |r| match r {
            Received::Message(m) => messages.push(m),
            Received::Rejected { bytes, error } => {
                tracing::warn!(bytes, %error, "rejected a frame from the link");
            }
        });
        for m in messages {
            if let Message::Hello(h) = &m {
                if let Err(e) = h.check_version() {
                    tracing::warn!(%e, "host speaks another protocol version");
                }
                send(&mut port, &hello(&updater))?;
                continue;
            }
            let Some((reply, activated)) = updater.handle(&m) else {
                continue;
            };
            send(&mut port, &reply)?;
            match activated {
                Some(Activated::Model { entry, .. }) => {
                    tracing::info!(version = %entry.version, sha256 = %entry.sha256, "model activated");
                }
                Some(Activated::Firmware { entry }) => {
                    tracing::info!(version = %entry.version, sha256 = %entry.sha256, "firmware installed; restarting into it");
                    return Ok(ExitCode::from(EXIT_RESTART));
                }
                None => {}
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn send(port: &mut impl Write, m: &Message) -> anyhow::Result<()> {
    let frame = protocol::encode(m).map_err(|e| anyhow::anyhow!("encoding a reply: {e}"))?;
    // The port's 100 ms timeout paces the read loop; a reply may wait longer for the line.
    protocol::write_frame(port, &frame, Duration::from_secs(5))
        .context("writing to the serial port")
}
