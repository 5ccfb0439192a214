//! `petcam-device agent`: serves the serial link for a device with no camera: status, and
//! model uploads into the state directory (see [`petcam_device::update`]).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use petcam_device::update::{Policy, Store, Updater};
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
    /// Threads the self-test loads a model with [default: all cores].
    #[arg(long)]
    pub threads: Option<usize>,
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
    pub fn policy(&self, threads: usize) -> anyhow::Result<Policy> {
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
    threads: usize,
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
        max_size: 64 << 20,
        latency_budget_ms: 2000.0,
        threads,
        required_labels,
    })
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
    let threads = crate::threads(args.threads);
    let policy = args.trust.policy(threads)?;
    let store = Store::open(&args.state_dir).with_context(|| {
        format!(
            "cannot use the state directory {}",
            args.state_dir.display()
        )
    })?;
    let mut updater = Updater::new(store, policy);
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
    let mut port = serialport::new(args.port.to_string_lossy(), args.baud)
        .timeout(Duration::from_millis(100))
        .open_native()
        .with_context(|| format!("cannot open the serial port {}", args.port.display()))?;
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
    send(&mut port, &hello(&updater))?;
    tracing::info!(port = %args.port.display(), state = %args.state_dir.display(), "agent ready");
    let mut rx = Reassembler::new();
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        let n = match port.read(&mut buf) {
            Ok(0) => continue,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context(format!("reading {}", args.port.display())),
        };
        let mut replies = Vec::new();
        rx.push(&buf[..n], |r| match r {
            Received::Message(m) => replies.push(m),
            Received::Rejected { bytes, error } => {
                tracing::warn!(bytes, %error, "rejected a frame from the link");
            }
        });
        for m in replies {
            let reply = match &m {
                Message::Hello(h) => match h.check_version() {
                    Ok(()) => Some(hello(&updater)),
                    Err(e) => {
                        tracing::warn!(%e, "host speaks another protocol version");
                        Some(hello(&updater))
                    }
                },
                _ => updater.handle(&m).map(|(reply, activated)| {
                    if let Some(a) = activated {
                        tracing::info!(version = %a.entry.version, sha256 = %a.entry.sha256, "model activated");
                    }
                    reply
                }),
            };
            if let Some(reply) = reply {
                send(&mut port, &reply)?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn send(port: &mut impl Write, m: &Message) -> anyhow::Result<()> {
    let frame = protocol::encode(m).map_err(|e| anyhow::anyhow!("encoding a reply: {e}"))?;
    port.write_all(&frame)
        .context("writing to the serial port")?;
    port.flush().context("writing to the serial port")
}
