//! `petcam-device agent`: serves the serial link for a device with no camera: status, and
//! model uploads into the state directory (see [`petcam_device::update`]).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use petcam_device::firmware::{Health, EXIT_RESTART};
use petcam_device::service::ServiceConfig;
use petcam_device::telemetry;
use petcam_device::threads::Threads;
use petcam_device::update::{Activated, Store, Updater};
use petcam_shared::protocol::{self, Message, Reassembler, Received, Role};

use super::trust::TrustArgs;

/// Serve the serial link: answer `petcam flash` and status requests, with no camera.
#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// Serial port to the host (a USB-UART or the GPIO UART: /dev/ttyAMA0, /dev/ttyUSB0).
    #[arg(long, value_name = "PATH")]
    pub port: PathBuf,
    #[arg(long, default_value_t = ServiceConfig::default().baud)]
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
    #[arg(long, default_value_t = ServiceConfig::default().health_grace, value_name = "SECONDS")]
    pub health_grace: f64,
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
    let device_id = args.device_id.clone().unwrap_or_else(telemetry::host_name);
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
