//! `petcam flash`: deploys a model to a device over its serial link.
//!
//! Handshake (`Hello` both ways, same protocol version), `Begin` (the device answers with the
//! offset it already holds for this image, so an interrupted upload resumes), chunks each
//! acknowledged before the next is sent, resent after a timeout with growing waits, `Commit`
//! (the device verifies hash and signature, self-tests and activates), then `Status` for the
//! model the device reports as active.

use std::collections::VecDeque;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ed25519_dalek::Signer;
use petcam_shared::protocol::upload::{
    self, DriveError, Transport, UploadConfig, UploadError, Uploader,
};
use petcam_shared::protocol::{
    self, serial, Begin, ImageKind, Message, Nack, NackReason, ProtocolError, Reassembler,
    Received, Role,
};
use petcam_shared::signing;
use sha2::Digest;

/// Deploy a model (or a petcam-device binary) to a device over its serial link: resumes an
/// interrupted upload, retries lost chunks, and prints what the device reports as active.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The model (model.onnx from `petcam train-and-export`).
    #[arg(value_name = "MODEL.onnx", required_unless_present = "firmware")]
    pub model: Option<PathBuf>,
    /// A petcam-device binary to install instead of a model (needs --image-version). The
    /// device self-tests it, switches to it and restarts; one that does not stay up through
    /// its grace period is rolled back at the next start.
    #[arg(long, value_name = "BINARY", conflicts_with = "model")]
    pub firmware: Option<PathBuf>,
    /// Seconds to wait for the device to come back after a firmware update.
    #[arg(long, default_value_t = 60)]
    pub restart_timeout: u64,
    /// Serial port to the device (/dev/ttyUSB0, ...).
    #[arg(long, value_name = "PATH")]
    pub port: PathBuf,
    #[arg(long, default_value_t = 921_600)]
    pub baud: u32,
    /// Secret key from `petcam keygen` to sign the upload with; devices started with
    /// `--trusted-key` refuse anything else.
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Version of the model [default: its export time as YYYYMMDD.HHMMSS, so a newer export
    /// is a newer version]. Devices refuse versions older than their active model.
    #[arg(long = "image-version", value_name = "VERSION")]
    pub image_version: Option<String>,
    /// Resends of one message before giving up.
    #[arg(long, default_value_t = 8)]
    pub retries: u32,
    /// Seconds to wait for the device's self-test and activation after the last chunk.
    #[arg(long, default_value_t = 120)]
    pub commit_timeout: u64,
    /// One JSON object at the end instead of text.
    #[arg(long)]
    pub json: bool,
    /// Send the file even if this machine cannot load it as a model (the device's self-test
    /// still decides; --image-version is then required).
    #[arg(long)]
    pub no_local_check: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let (kind, path) = match (&args.firmware, &args.model) {
        (Some(f), _) => (ImageKind::Firmware, f.clone()),
        (None, Some(m)) => (ImageKind::Model, m.clone()),
        (None, None) => bail!("nothing to flash: give MODEL.onnx or --firmware BINARY"),
    };
    let image = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    if kind == ImageKind::Firmware && args.image_version.is_none() {
        bail!("--firmware needs --image-version (the device refuses versions older than its own)");
    }
    // Refuse here what the device would refuse after the upload.
    let model = if args.no_local_check || kind == ImageKind::Firmware {
        None
    } else {
        Some(
            petcam_runtime::infer::ExportedModel::from_bytes(&image, &path).with_context(|| {
                format!(
                    "{} is not a model petcam-device can run (--no-local-check sends it anyway)",
                    path.display()
                )
            })?,
        )
    };
    let version = match (&args.image_version, &model) {
        (Some(v), _) => v.clone(),
        (None, Some(model)) => default_version(model)?,
        (None, None) => bail!("--no-local-check needs --image-version"),
    };
    let sha256: [u8; 32] = sha2::Sha256::digest(&image).into();
    let signature = match &args.key {
        Some(k) => {
            let key = super::keygen::read_secret(k)?;
            key.sign(&signing::signed_payload(kind, &version, &sha256))
                .to_bytes()
                .to_vec()
        }
        None => Vec::new(),
    };
    let mut link = Link::open(&args.port, args.baud)?;
    let hello = link.handshake(args.retries)?;
    tracing::info!(device = %hello.device_id, firmware = %hello.firmware_version, "connected");

    let begin = Message::Begin(Begin {
        kind,
        size: image.len() as u64,
        sha256,
        version: version.clone(),
        signature,
    });
    let offset = link.exchange(&begin, args.retries, Duration::from_secs(5), "Begin", None)?;
    let resumed_from = offset;
    if offset > 0 {
        tracing::info!(
            offset,
            "the device holds part of this image already; resuming"
        );
    }
    let bar = indicatif::ProgressBar::new(image.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    if args.json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_position(offset);
    let start = Instant::now();
    let wire_bytes = send_window(&mut link, &image, offset, args.baud, args.retries, &bar)?;
    bar.finish_and_clear();
    let sent_bytes = image.len() as u64 - resumed_from;
    let upload_s = start.elapsed().as_secs_f64();
    link.exchange(
        &Message::Commit,
        1,
        Duration::from_secs(args.commit_timeout),
        "Commit",
        Some(image.len() as u64),
    )?;
    let status = match kind {
        ImageKind::Model => link.status(args.retries)?,
        ImageKind::Firmware => {
            // The device exits to restart into the new binary; wait for it to greet again.
            drop(link);
            link = reconnect(
                &args.port,
                args.baud,
                Duration::from_secs(args.restart_timeout),
            )?;
            link.status(args.retries)?
        }
    };
    let active = match kind {
        ImageKind::Model => status.active_model,
        ImageKind::Firmware => status.active_firmware,
    }
    .context("the device accepted the upload but reports nothing active")?;
    let active_id = petcam_runtime::infer::model_id(&active.sha256);
    if active.sha256 != sha256 {
        bail!(
            "the device accepted the upload but reports {} as active, not {}",
            active_id,
            petcam_runtime::infer::model_id(&sha256)
        );
    }
    let summary = Summary {
        device: hello.device_id,
        kind: match kind {
            ImageKind::Model => "model",
            ImageKind::Firmware => "firmware",
        },
        active_id,
        version: active.version,
        bytes: image.len(),
        resumed_from,
        sent_bytes,
        upload_s,
        wire_bytes,
        resends: link.resends,
        rejected: link.rejected,
        heartbeats: link.heartbeats,
    };
    summary.print(args.json);
    Ok(())
}

/// What a finished upload reports.
#[derive(Debug)]
struct Summary {
    device: String,
    kind: &'static str,
    active_id: String,
    version: String,
    bytes: usize,
    resumed_from: u64,
    sent_bytes: u64,
    upload_s: f64,
    wire_bytes: u64,
    resends: u64,
    rejected: u64,
    heartbeats: u64,
}

impl Summary {
    fn print(&self, json: bool) {
        let efficiency = if self.wire_bytes > 0 {
            self.sent_bytes as f64 / self.wire_bytes as f64
        } else {
            1.0
        };
        if json {
            let model = self.kind == "model";
            println!(
                "{}",
                serde_json::json!({
                    "device": self.device,
                    "kind": self.kind,
                    "active_model": model.then_some(&self.active_id),
                    "active_firmware": (!model).then_some(&self.active_id),
                    "version": self.version,
                    "bytes": self.bytes,
                    "resumed_from": self.resumed_from,
                    "upload_s": self.upload_s,
                    "wire_bytes": self.wire_bytes,
                    "link_efficiency": efficiency,
                    "resends": self.resends,
                    "rejected_frames": self.rejected,
                    "heartbeats": self.heartbeats,
                })
            );
        } else {
            println!(
                "{}: active {} {} (version {}); sent {} bytes{} in {:.1} s, link efficiency {:.3}, {} resend(s)",
                self.device,
                self.kind,
                self.active_id,
                self.version,
                self.sent_bytes,
                if self.resumed_from > 0 {
                    format!(" (resumed at {})", self.resumed_from)
                } else {
                    String::new()
                },
                self.upload_s,
                efficiency,
                self.resends
            );
        }
    }
}

/// Opens the port again and again until the device greets, for up to `timeout`.
fn reconnect(port: &Path, baud: u32, timeout: Duration) -> anyhow::Result<Link> {
    let deadline = Instant::now() + timeout;
    loop {
        let attempt = Link::open(port, baud).and_then(|mut l| l.handshake(0).map(|_| l));
        match attempt {
            Ok(link) => return Ok(link),
            Err(e) if Instant::now() >= deadline => {
                return Err(e.context(format!(
                    "the device did not come back within {} s after the firmware update",
                    timeout.as_secs()
                )))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

/// Sends `image` from `offset` on with the go-back-N [`Uploader`]; returns the bytes written
/// to the link.
fn send_window(
    link: &mut Link,
    image: &[u8],
    offset: u64,
    baud: u32,
    retries: u32,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<u64> {
    let config = UploadConfig {
        baud,
        retries,
        ..UploadConfig::default()
    };
    let mut uploader = Uploader::new(image, offset, config);
    let sent = upload::drive(link, &mut uploader, |acked| bar.set_position(acked));
    link.resends += uploader.resends();
    link.heartbeats += uploader.heartbeats();
    let port = link.name.display();
    match sent {
        Ok(wire_bytes) => Ok(wire_bytes),
        Err(DriveError::Transport(e)) => Err(e),
        Err(DriveError::Upload(UploadError::Dropped { acked })) => bail!(
            "the device on {port} dropped the upload at {acked} bytes (did it restart?); run \
             petcam flash again: it resumes from what the device kept"
        ),
        Err(DriveError::Upload(UploadError::Refused(n))) => Err(refused(n)),
        Err(DriveError::Upload(UploadError::NoAnswer { acked, tries })) => Err(NoAnswer {
            port: port.to_string(),
            what: format!("the chunk at {acked}"),
            tries,
        }
        .into()),
    }
}

/// The device did not answer in time (as opposed to refusing).
#[derive(Debug, thiserror::Error)]
#[error("no answer from the device on {port} to {what} after {tries} tries")]
struct NoAnswer {
    port: String,
    what: String,
    tries: u32,
}

/// `YYYYMMDD.HHMMSS` of the model's export time.
fn default_version(model: &petcam_runtime::infer::ExportedModel) -> anyhow::Result<String> {
    let created = model
        .metadata
        .get(petcam_shared::metadata::CREATED)
        .context("the model records no export time; pass --image-version")?;
    let digits: String = created.chars().filter(char::is_ascii_digit).collect();
    if digits.len() < 14 {
        bail!("cannot read a version from the export time {created:?}; pass --image-version");
    }
    Ok(format!("{}.{}", &digits[..8], &digits[8..14]))
}

/// The serial link: frames out, messages in.
struct Link {
    port: serialport::TTYPort,
    name: PathBuf,
    rx: Reassembler,
    inbox: VecDeque<Message>,
    resends: u64,
    rejected: u64,
    /// Heartbeats the device sent while waiting for its replies: telemetry kept flowing.
    heartbeats: u64,
    /// A frame refused because the device speaks another protocol version.
    version_mismatch: Option<ProtocolError>,
}

impl Link {
    fn open(path: &Path, baud: u32) -> anyhow::Result<Self> {
        let port = serial::open(path, baud, Duration::from_millis(20))?;
        // Whatever waits in the port's buffer answers an earlier session.
        let _ = serialport::SerialPort::clear(&port, serialport::ClearBuffer::Input);
        Ok(Self {
            port,
            name: path.to_owned(),
            rx: Reassembler::new(),
            inbox: VecDeque::new(),
            resends: 0,
            rejected: 0,
            heartbeats: 0,
            version_mismatch: None,
        })
    }

    fn send(&mut self, m: &Message) -> anyhow::Result<u64> {
        let frame = protocol::encode(m).map_err(|e| anyhow::anyhow!("encoding {m:?}: {e}"))?;
        // The port's 20 ms timeout is for noticing silence; a write may wait longer while the
        // device drains what is in flight.
        protocol::write_frame(&mut self.port, &frame, Duration::from_secs(5))
            .with_context(|| format!("writing to {}", self.name.display()))?;
        Ok(frame.len() as u64)
    }

    /// The next message from the device, or `None` after `timeout`.
    fn recv(&mut self, timeout: Duration) -> anyhow::Result<Option<Message>> {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        loop {
            if let Some(m) = self.inbox.pop_front() {
                return Ok(Some(m));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            match self.port.read(&mut buf) {
                Ok(n) => {
                    let (inbox, rejected, version) = (
                        &mut self.inbox,
                        &mut self.rejected,
                        &mut self.version_mismatch,
                    );
                    self.rx.push(&buf[..n], |r| match r {
                        Received::Message(m) => inbox.push_back(m),
                        Received::Rejected { bytes, error } => {
                            *rejected += 1;
                            tracing::debug!(bytes, %error, "rejected a frame from the device");
                            if let ProtocolError::Version { .. } = error {
                                *version = Some(error);
                            }
                        }
                    });
                    if let Some(e) = self.version_mismatch.take() {
                        bail!("the device on {} answered: {e}", self.name.display());
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("reading {}", self.name.display()))
                }
            }
        }
    }

    fn handshake(&mut self, retries: u32) -> anyhow::Result<protocol::Hello> {
        let ours = Message::Hello(protocol::Hello::new(
            Role::Host,
            "petcam",
            env!("CARGO_PKG_VERSION"),
            "",
        ));
        for _ in 0..=retries.min(3) {
            self.send(&ours)?;
            let deadline = Instant::now() + Duration::from_secs(1);
            while let Some(m) = self.recv(deadline.saturating_duration_since(Instant::now()))? {
                if let Message::Hello(h) = m {
                    h.check_version().map_err(|e| {
                        anyhow::anyhow!(
                            "the device on {} {e}; update one side",
                            self.name.display()
                        )
                    })?;
                    return Ok(h);
                }
            }
        }
        bail!(
            "no answer from a petcam device on {} within {} s: is `petcam-device agent` (or `run --port`) running there, at the same --baud?",
            self.name.display(),
            retries.min(3) + 1
        )
    }

    /// Sends `m` until the device acknowledges it ([`upload::request`]); the acknowledged
    /// offset. `stale` is the offset a chunk sent twice is refused with.
    fn exchange(
        &mut self,
        m: &Message,
        retries: u32,
        timeout: Duration,
        what: &str,
        stale: Option<u64>,
    ) -> anyhow::Result<u64> {
        let (mut resends, mut heartbeats) = (0, 0);
        let retry = upload::Retry { retries, timeout };
        let answer = upload::request(self, m, retry, stale, |event| match event {
            upload::Event::Resend { attempt } => {
                resends += 1;
                tracing::debug!(attempt, what, "no reply; sending again");
            }
            upload::Event::Other(Message::Heartbeat(_)) => heartbeats += 1,
            // Other telemetry and stale replies are not answers to this message.
            upload::Event::Other(_) => {}
        });
        self.resends += resends;
        self.heartbeats += heartbeats;
        answer.map_err(|e| match e {
            upload::RequestError::Transport(e) => e,
            upload::RequestError::Refused(n) => refused(n),
            upload::RequestError::NoAnswer { tries } => NoAnswer {
                port: self.name.display().to_string(),
                what: what.to_owned(),
                tries,
            }
            .into(),
        })
    }

    fn status(&mut self, retries: u32) -> anyhow::Result<protocol::Status> {
        for _ in 0..=retries {
            self.send(&Message::StatusRequest)?;
            let deadline = Instant::now() + Duration::from_secs(2);
            while let Some(m) = self.recv(deadline.saturating_duration_since(Instant::now()))? {
                if let Message::Status(s) = m {
                    return Ok(s);
                }
            }
        }
        bail!(
            "the device on {} does not answer status requests",
            self.name.display()
        )
    }
}

/// The uploader sends chunks through the same framing and version check as every exchange.
impl Transport for Link {
    type Error = anyhow::Error;

    fn send(&mut self, m: &Message) -> anyhow::Result<u64> {
        Link::send(self, m)
    }

    fn recv(&mut self, timeout: Duration) -> anyhow::Result<Option<Message>> {
        Link::recv(self, timeout)
    }
}

fn refused(n: Nack) -> anyhow::Error {
    let what = match n.reason {
        NackReason::Unsigned => "refused an unsigned upload (sign it with --key NAME.key)",
        NackReason::BadSignature => {
            "refused the signature (is --key the pair of the device's --trusted-key?)"
        }
        NackReason::Downgrade => "refused a downgrade",
        NackReason::SelfTestFailed => "refused the model: its self-test failed",
        NackReason::HashMismatch => "refused the upload: the received bytes do not match the hash",
        NackReason::TooLarge => "refused the upload as too large",
        NackReason::Storage => "could not store the upload",
        _ => "refused the upload",
    };
    anyhow::anyhow!("the device {what}: {}", n.detail)
}
