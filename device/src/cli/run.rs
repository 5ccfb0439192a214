//! `petcam-device run`: the long-running program (camera → model → decision → pins, with
//! telemetry), configured by flags and an optional TOML file.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use petcam_device::actuate::{self, Actuator};
use petcam_device::agent::{self, Pace, Report};
use petcam_device::decide::Decision;
use petcam_device::source::camera::{Backoff, CameraNotice, CameraSettings, LiveSource};
use petcam_device::source::rpicam::RpicamSettings;
use petcam_device::source::{self, SourceSpec};
use petcam_device::telemetry::{Live, Telemetry};
use petcam_device::threads::Threads;
use petcam_device::update::{Activated, Store, Updater};
use petcam_shared::protocol::{self, ErrorSource, Message, Role};

/// Watch a source of frames, decide what it sees, drive output pins, report each change of
/// decision, and send telemetry.
///
/// Ends when a file source ends (without --loop), after --max-frames, or on SIGINT/SIGTERM,
/// with the outputs at their inactive level, the telemetry flushed and exit code 0. A camera
/// that is missing or unplugged is waited for (with back-off) and reported, never a crash.
///
/// Every option can also be set in a TOML file given with --config, under the flag's long
/// name with `_` for `-` (`gpio_chip = "/dev/gpiochip0"`, `pin = ["cat=17"]`,
/// `loop = true`); flags given on the command line win.
#[derive(Debug, Default, clap::Args, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunArgs {
    /// Read options from this TOML file (see device/petcam.toml).
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// The exported model (required here or in the config).
    #[arg(long, value_name = "FILE")]
    model: Option<PathBuf>,
    /// dir:PATH (images in name order), mjpeg:FILE (concatenated JPEG frames; `mjpeg:-` reads
    /// stdin and a FIFO is read too, frame by frame as the bytes arrive, so ffmpeg or
    /// `rpicam-vid --codec mjpeg -o -` can feed it), camera:/dev/videoN (a V4L2 camera, e.g. a
    /// USB webcam) or rpicam: (a Raspberry Pi Camera Module through `rpicam-vid`; rpicam:N for
    /// camera N) (required here or in the config).
    #[arg(long, value_name = "SRC")]
    source: Option<SourceSpec>,
    /// Start again at the first file when a dir: or mjpeg: file ends (not for streams).
    #[arg(long = "loop")]
    #[serde(rename = "loop", default)]
    looping: bool,
    /// Camera: the frame rate to ask for [default: 30]. dir:/mjpeg: play the files like a
    /// camera at this rate, dropping frames (oldest first) when inference is slower; without
    /// it every file is classified.
    #[arg(long, value_name = "FPS")]
    fps: Option<f64>,
    /// Camera frame width to ask for [default: 640].
    #[arg(long, value_name = "PX")]
    width: Option<u32>,
    /// Camera frame height to ask for [default: 480].
    #[arg(long, value_name = "PX")]
    height: Option<u32>,
    /// rpicam: the program that serves the Camera Module [default: rpicam-vid; libcamera-vid
    /// on bullseye].
    #[arg(long, value_name = "PATH")]
    rpicam_bin: Option<PathBuf>,
    /// rpicam: one more option for rpicam-vid, after petcam's own (repeat it:
    /// --rpicam-arg=--hflip --rpicam-arg=--awb --rpicam-arg=indoor).
    #[arg(long = "rpicam-arg", value_name = "ARG", allow_hyphen_values = true)]
    #[serde(default)]
    rpicam_arg: Vec<String>,
    /// rpicam: bytes per row of the Y plane, when not the Pi's own rule [default: the width
    /// rounded up to 64 bytes, 128 on a Pi 5].
    #[arg(long, value_name = "BYTES")]
    rpicam_stride: Option<u32>,
    /// Decide on the mean probabilities of the last N frames [default: 3].
    #[arg(long, value_name = "N")]
    smooth: Option<usize>,
    /// Below this smoothed probability the decision is `none` [default: 0.8].
    #[arg(long, value_name = "P")]
    threshold: Option<f32>,
    /// Drive a GPIO line while a label is decided, e.g. --pin cat=17 --pin dog=27 (needs a
    /// build with the `gpio` feature).
    #[arg(long = "pin", value_name = "LABEL=LINE")]
    #[serde(rename = "pin", default)]
    pins: Vec<String>,
    /// GPIO character device of the --pin lines [default: /dev/gpiochip0].
    #[arg(long, value_name = "DEV")]
    gpio_chip: Option<PathBuf>,
    /// Inference threads: `auto` (the default) splits inferences over every core while that is
    /// measured faster than one thread, and runs them on one while other work holds the
    /// cores; `N` always uses N; `auto:N` chooses between 1 and N.
    #[arg(long)]
    threads: Option<Threads>,
    /// Stop after this many classified frames.
    #[arg(long, value_name = "N")]
    max_frames: Option<u64>,
    /// Send telemetry (postcard frames) on this serial port, e.g. /dev/ttyAMA0 or /dev/ttyUSB0;
    /// it is reopened if it disappears. (`--serial`, and `serial` in the file, are older names
    /// of this option.)
    #[arg(long, alias = "serial", value_name = "PORT")]
    #[serde(alias = "serial")]
    port: Option<PathBuf>,
    /// Serial speed [default: 921600, as `petcam flash` and `petcam monitor` use].
    #[arg(long, value_name = "BAUD")]
    baud: Option<u32>,
    /// This device's name in telemetry [default: the host name].
    #[arg(long, value_name = "NAME")]
    device_id: Option<String>,
    /// Accept models flashed over --port (`petcam flash`) into this directory, and run the
    /// last one flashed there instead of --model; a new one takes over without a restart.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Public key (`NAME.pub` from `petcam keygen`) that flashed models must be signed with.
    #[arg(long, value_name = "FILE")]
    trusted_key: Option<PathBuf>,
    /// Accept unsigned flashed models. For a bench device only: anyone on the link can
    /// replace the model.
    #[arg(long)]
    #[serde(default)]
    allow_unsigned: bool,
    /// Accept a flashed model older than the active one.
    #[arg(long)]
    #[serde(default)]
    allow_downgrade: bool,
    /// Seconds a newly flashed binary must run before it confirms itself [default: 30]; one
    /// that stops sooner is rolled back by `petcam-device launch` at the next start.
    #[arg(long, value_name = "SECONDS")]
    health_grace: Option<f64>,
    /// JSON lines on stdout: one per decision change, camera state change and bad frame, then
    /// a summary.
    #[arg(long)]
    #[serde(default)]
    json: bool,
}

impl RunArgs {
    /// Flags given on the command line win over the file's.
    fn or(self, file: RunArgs) -> RunArgs {
        RunArgs {
            config: self.config,
            model: self.model.or(file.model),
            source: self.source.or(file.source),
            looping: self.looping || file.looping,
            fps: self.fps.or(file.fps),
            width: self.width.or(file.width),
            height: self.height.or(file.height),
            rpicam_bin: self.rpicam_bin.or(file.rpicam_bin),
            rpicam_arg: if self.rpicam_arg.is_empty() {
                file.rpicam_arg
            } else {
                self.rpicam_arg
            },
            rpicam_stride: self.rpicam_stride.or(file.rpicam_stride),
            smooth: self.smooth.or(file.smooth),
            threshold: self.threshold.or(file.threshold),
            pins: if self.pins.is_empty() {
                file.pins
            } else {
                self.pins
            },
            gpio_chip: self.gpio_chip.or(file.gpio_chip),
            threads: self.threads.or(file.threads),
            max_frames: self.max_frames.or(file.max_frames),
            port: self.port.or(file.port),
            baud: self.baud.or(file.baud),
            device_id: self.device_id.or(file.device_id),
            state_dir: self.state_dir.or(file.state_dir),
            trusted_key: self.trusted_key.or(file.trusted_key),
            allow_unsigned: self.allow_unsigned || file.allow_unsigned,
            allow_downgrade: self.allow_downgrade || file.allow_downgrade,
            health_grace: self.health_grace.or(file.health_grace),
            json: self.json || file.json,
        }
    }
}

/// Reads a `--config` file.
fn read_config(path: &Path) -> anyhow::Result<RunArgs> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read config file {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "config file {}: {e}\nkeys are the long flag names of `petcam-device run --help` \
             with `_` for `-`",
            path.display()
        )
    })
}

pub(crate) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "petcam".to_owned())
}

fn usage_error(msg: impl std::fmt::Display) -> anyhow::Result<ExitCode> {
    eprintln!("error: {msg}");
    Ok(ExitCode::from(2))
}

/// Where reports go: stdout (text or JSON lines), the live figures for heartbeats, and the
/// telemetry link. Shared by the capture thread (camera notices) and the inference loop.
struct Reporter {
    json: bool,
    /// The running model's labels and id; a flashed model replaces them.
    labels: Mutex<Vec<String>>,
    model_id: Mutex<String>,
    start: Instant,
    live: Mutex<Live>,
    telemetry: Option<Telemetry>,
}

impl Reporter {
    fn label(&self, d: Decision) -> Option<String> {
        match d {
            Decision::Label(i) => self.labels.lock().expect("labels").get(i).cloned(),
            Decision::Unsure => None,
        }
    }

    fn at_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn send(&self, msg: Message) {
        if let Some(t) = &self.telemetry {
            t.send(msg);
        }
    }

    fn error(&self, source: ErrorSource, message: String) {
        self.send(Message::Error(protocol::ErrorReport {
            at_ms: self.at_ms(),
            source,
            message,
        }));
    }

    fn camera(&self, notice: CameraNotice) {
        if self.json {
            let mut line = serde_json::json!({"event": "camera", "message": notice.to_string()});
            if let CameraNotice::Unavailable { devices, .. } = &notice {
                line["devices"] = serde_json::json!(devices);
            }
            line["state"] = match &notice {
                CameraNotice::Opened { .. } => "streaming",
                CameraNotice::Unavailable { .. } => "unavailable",
                CameraNotice::Lost { .. } => "lost",
            }
            .into();
            println!("{line}");
        } else {
            eprintln!("{notice}");
        }
        if notice.is_error() {
            tracing::warn!("{notice}");
            self.error(ErrorSource::Camera, notice.to_string());
        } else {
            tracing::info!("{notice}");
        }
    }

    fn report(&self, r: Report) {
        match r {
            Report::Classified {
                infer_ms,
                decision,
                confidence,
            } => {
                let label = self.label(decision);
                self.live.lock().expect("live figures").record(
                    infer_ms as f32,
                    label.as_deref(),
                    confidence,
                );
            }
            Report::Decision { frame, event } => {
                let (from, to) = {
                    let labels = self.labels.lock().expect("labels");
                    (
                        agent::decision_label(event.from, &labels).to_owned(),
                        agent::decision_label(event.to, &labels).to_owned(),
                    )
                };
                if self.json {
                    println!(
                        "{}",
                        serde_json::json!({
                            "event": "decision", "frame": frame, "from": from, "to": to,
                            "confidence": event.confidence,
                        })
                    );
                } else {
                    println!("{frame}\t{from} -> {to}\t{:.3}", event.confidence);
                }
                let frames = self.live.lock().expect("live figures").frames();
                self.send(Message::Event(protocol::Event {
                    at_ms: self.at_ms(),
                    frame: frames,
                    from: self.label(event.from),
                    to: self.label(event.to),
                    confidence: event.confidence,
                }));
            }
            Report::BadFrame { frame, error } => {
                if self.json {
                    println!(
                        "{}",
                        serde_json::json!({"event": "bad_frame", "frame": frame, "error": error})
                    );
                } else {
                    eprintln!("{frame}: skipped: {error}");
                }
                self.error(ErrorSource::Camera, format!("{frame}: {error}"));
            }
            Report::ModelChanged { id, labels } => {
                if self.json {
                    println!(
                        "{}",
                        serde_json::json!({"event": "model", "model_id": id, "labels": labels})
                    );
                } else {
                    eprintln!("model {id} now running (labels {labels:?})");
                }
                tracing::info!(model = %id, "a flashed model took over");
                if let Some(t) = &self.telemetry {
                    t.set_model_id(&id);
                    t.send(Message::Log(protocol::Log {
                        at_ms: self.at_ms(),
                        level: protocol::LogLevel::Info,
                        message: format!("model {id} now running"),
                    }));
                }
                *self.labels.lock().expect("labels") = labels;
                *self.model_id.lock().expect("model id") = id;
            }
        }
    }
}

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let args = match &args.config {
        Some(path) => match read_config(path) {
            Ok(file) => args.or(file),
            Err(e) => return usage_error(format!("{e:#}")),
        },
        None => args,
    };
    if args.state_dir.is_some() && args.trusted_key.is_none() && !args.allow_unsigned {
        return usage_error(
            "--state-dir accepts flashed models: pass --trusted-key NAME.pub (from `petcam \
             keygen`), or --allow-unsigned for a bench device",
        );
    }
    let store = match &args.state_dir {
        Some(dir) => Some(Store::open(dir).map_err(|e| {
            anyhow::anyhow!("cannot use the state directory {}: {e}", dir.display())
        })?),
        None => None,
    };
    // The model flashed last wins over --model: it is the one the operator deployed.
    let flashed = store.as_ref().and_then(Store::active).map(|(_, path)| path);
    let Some(model_path) = flashed.or_else(|| args.model.clone()) else {
        return usage_error(
            "no model: pass --model FILE or set `model` in the --config file (or flash one \
             into --state-dir)",
        );
    };
    let Some(spec) = args.source.clone() else {
        return usage_error(
            "no source: pass --source dir:PATH|mjpeg:FILE|mjpeg:-|camera:/dev/videoN|rpicam: or set \
             `source` in the --config file",
        );
    };
    let threshold = args.threshold.unwrap_or(0.8);
    if !(0.0..=1.0).contains(&threshold) {
        return usage_error(format!("--threshold {threshold} is not between 0 and 1"));
    }
    let fps = args.fps.filter(|f| *f > 0.0);

    // Installed before the model loads, so SIGTERM while it loads is a clean stop, not a
    // kill.
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || stop.store(true, Ordering::Relaxed))
            .map_err(|e| anyhow::anyhow!("cannot install the SIGINT/SIGTERM handler: {e}"))?;
    }

    let threads = args.threads.unwrap_or_default();
    tracing::info!(model = %model_path.display(), %threads, "loading the model");
    let model = crate::load(&model_path, threads)?;
    if stop.load(Ordering::Relaxed) {
        tracing::info!("stopped while the model loaded");
        return Ok(ExitCode::SUCCESS);
    }
    let pins: Vec<(usize, u32)> = args
        .pins
        .iter()
        .map(|spec| actuate::parse_pin(spec, &model.labels))
        .collect::<Result<_, _>>()?;
    let model_id = model.id();

    // With a state directory, what the host sends over the link goes to the updater.
    let updater = match store {
        Some(store) => {
            let policy = super::agent::policy(
                args.trusted_key.as_deref(),
                args.allow_downgrade,
                threads,
                // The pins are wired by label: a model with other labels is refused.
                (!pins.is_empty()).then(|| model.labels.clone()),
            )?;
            Some(
                Updater::new(store, policy)
                    .map_err(|e| anyhow::anyhow!("cannot use the state directory: {e}"))?,
            )
        }
        None => None,
    };
    let (inbox_tx, inbox) = mpsc::channel();
    let telemetry = args.port.as_ref().map(|port| {
        let hello = protocol::Hello::new(
            Role::Device,
            args.device_id.clone().unwrap_or_else(host_name),
            env!("CARGO_PKG_VERSION").to_owned(),
            model_id.clone(),
        );
        let baud = args.baud.unwrap_or(921_600);
        if updater.is_some() {
            Telemetry::serial_with_inbox(port.clone(), baud, hello, inbox_tx.clone())
        } else {
            Telemetry::serial(port.clone(), baud, hello)
        }
    });
    drop(inbox_tx);
    if updater.is_some() && telemetry.is_none() {
        tracing::warn!("--state-dir without --port: nothing can be flashed");
    }
    let reporter = Arc::new(Reporter {
        json: args.json,
        labels: Mutex::new(model.labels.clone()),
        model_id: Mutex::new(model_id.clone()),
        start: Instant::now(),
        live: Mutex::new(Live::new(Instant::now())),
        telemetry,
    });

    // Files are paced like a camera only when --fps asks for it.
    let file_pace = fps.map_or(Pace::Wait, |f| {
        Pace::Every(Duration::from_secs_f64(1.0 / f))
    });
    let mut stream_capture = false;
    let (queue, capture) = match &spec {
        SourceSpec::Dir(p) => {
            let frames = source::FileSource::dir(p, args.looping)?;
            agent::spawn_capture(frames, file_pace, stop.clone())
        }
        SourceSpec::Mjpeg(p) if source::is_stream(p) => {
            if args.looping {
                tracing::warn!("--loop: {} is a stream and plays once", p.display());
            }
            // A stream's frames come at the writer's rate, like a camera's.
            stream_capture = true;
            let (reader, name): (Box<dyn std::io::Read + Send>, String) = if p == Path::new("-") {
                (Box::new(std::io::stdin()), "stdin".into())
            } else {
                let file = std::fs::File::open(p)
                    .map_err(|e| anyhow::anyhow!("cannot open the stream {}: {e}", p.display()))?;
                (Box::new(file), p.display().to_string())
            };
            let frames = source::StreamSource::new(reader, name);
            agent::spawn_capture(frames, Pace::Live, stop.clone())
        }
        SourceSpec::Mjpeg(p) => {
            let frames = source::FileSource::mjpeg(p, args.looping)?;
            agent::spawn_capture(frames, file_pace, stop.clone())
        }
        SourceSpec::Camera(p) => {
            if !cfg!(all(feature = "camera", target_os = "linux")) {
                anyhow::bail!(
                    "camera source {}: this petcam-device was built without camera support \
                     (cargo feature `camera`, Linux); use dir: or mjpeg:",
                    p.display()
                );
            }
            let settings = CameraSettings {
                path: p.clone(),
                width: args.width.unwrap_or(640),
                height: args.height.unwrap_or(480),
                fps: fps.unwrap_or(30.0).round() as u32,
            };
            let r = reporter.clone();
            let frames = LiveSource::new(
                p.clone(),
                camera_opener(settings),
                Backoff::default(),
                stop.clone(),
                move |n| r.camera(n),
            );
            agent::spawn_capture(frames, Pace::Live, stop.clone())
        }
        SourceSpec::Rpicam(camera) => {
            let settings = RpicamSettings {
                bin: args
                    .rpicam_bin
                    .clone()
                    .unwrap_or_else(|| "rpicam-vid".into()),
                camera: *camera,
                width: args.width.unwrap_or(640),
                height: args.height.unwrap_or(480),
                fps: fps.unwrap_or(30.0).round() as u32,
                stride: args.rpicam_stride,
                extra_args: args.rpicam_arg.clone(),
                stop: stop.clone(),
            };
            rpicam_capture(settings, &reporter, &stop)?
        }
    };

    // Heartbeats come from their own thread, so they keep coming while the camera is away.
    let done = Arc::new(AtomicBool::new(false));
    let heartbeat = reporter.telemetry.is_some().then(|| {
        let (r, q, done) = (reporter.clone(), queue.clone(), done.clone());
        std::thread::Builder::new()
            .name("heartbeat".into())
            .spawn(move || {
                let period = Duration::from_secs(1);
                let mut next = Instant::now() + period;
                while petcam_device::retry::sleep_unless(
                    next.saturating_duration_since(Instant::now()),
                    || done.load(Ordering::Relaxed),
                ) {
                    next += period;
                    let dropped = r.telemetry.as_ref().map_or(0, Telemetry::dropped);
                    let id = r.model_id.lock().expect("model id").clone();
                    let hb = r.live.lock().expect("live figures").heartbeat(
                        Instant::now(),
                        q.dropped(),
                        dropped,
                        &id,
                    );
                    r.send(Message::Heartbeat(hb));
                }
            })
            .expect("spawn the heartbeat thread")
    });

    // Uploads are handled off the inference thread: a self-test takes a second or two.
    let (model_tx, model_rx) = mpsc::channel();
    let restart = Arc::new(AtomicBool::new(false));
    let updating = updater.map(|mut updater| {
        let (r, done, stop, restart) = (
            reporter.clone(),
            done.clone(),
            stop.clone(),
            restart.clone(),
        );
        let mut health = super::agent::Health::new(
            updater.store().dir(),
            Duration::from_secs_f64(args.health_grace.unwrap_or(30.0)),
        );
        std::thread::Builder::new()
            .name("updater".into())
            .spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    health.tick();
                    let Ok(msg) = inbox.recv_timeout(Duration::from_millis(200)) else {
                        continue;
                    };
                    let Some(link) = &r.telemetry else { continue };
                    if let Message::Hello(h) = &msg {
                        if let Err(e) = h.check_version() {
                            tracing::warn!("the host {e}");
                        }
                        link.send_urgent(Message::Hello(link.hello()));
                        continue;
                    }
                    if let Some((reply, activated)) = updater.handle(&msg) {
                        link.send_urgent(reply);
                        match activated {
                            Some(Activated::Model { model, .. }) => {
                                let _ = model_tx.send(*model);
                            }
                            Some(Activated::Firmware { entry }) => {
                                tracing::info!(version = %entry.version, "firmware installed; restarting into it");
                                restart.store(true, Ordering::Relaxed);
                                stop.store(true, Ordering::Relaxed);
                            }
                            None => {}
                        }
                    }
                }
            })
            .expect("spawn the updater thread")
    });
    let next_model = move || model_rx.try_recv().ok();

    let cfg = agent::RunConfig {
        smooth: args.smooth.unwrap_or(3),
        threshold,
        max_frames: args.max_frames,
    };
    let r = reporter.clone();
    let report = move |x: Report| r.report(x);
    let stats = if pins.is_empty() {
        let mut none = Actuator::<actuate::NoPin>::new(Vec::new())?;
        agent::run_loop(&model, next_model, &queue, &cfg, &mut none, &stop, report)
    } else {
        let chip = args
            .gpio_chip
            .clone()
            .unwrap_or_else(|| "/dev/gpiochip0".into());
        match super::gpio::actuator(&chip, &pins) {
            Ok(mut act) => {
                agent::run_loop(&model, next_model, &queue, &cfg, &mut act, &stop, report)
            }
            Err(e) => {
                reporter.error(ErrorSource::Gpio, format!("{e:#}"));
                Err(agent::RunError::Pin(format!("{e:#}")))
            }
        }
    };
    // The capture thread ends once it sees the stop flag or a closed queue.
    stop.store(true, Ordering::Relaxed);
    queue.close();
    // A stream's capture thread may sit in a read that only the writer can end; it goes with
    // the process.
    if !stream_capture {
        let _ = capture.join();
    }
    done.store(true, Ordering::Relaxed);
    if let Some(h) = heartbeat {
        let _ = h.join();
    }
    if let Some(h) = updating {
        let _ = h.join();
    }
    if let Err(e) = &stats {
        reporter.error(ErrorSource::Model, e.to_string());
    }
    // Everything queued for the link is written and flushed before exit.
    let link = Arc::into_inner(reporter)
        .and_then(|r| r.telemetry)
        .map(Telemetry::finish);
    let mut stats = stats?;
    if !stream_capture {
        // The capture thread went on until it saw the stop flag: what it dropped after the
        // loop's last count was never classified either.
        stats.dropped = queue.dropped();
    }
    if args.json {
        let mut summary = serde_json::to_value(&stats)?;
        summary["event"] = "summary".into();
        if let Some(link) = &link {
            summary["telemetry"] = serde_json::to_value(link)?;
        }
        println!("{summary}");
    } else {
        println!(
            "{} frames in {:.1} s ({:.1} fps), {} dropped, {} unreadable, {} decision changes; \
             inference p50 {:.1} ms, preprocessing p50 {:.2} ms",
            stats.frames,
            stats.seconds,
            stats.fps,
            stats.dropped,
            stats.bad_frames,
            stats.events,
            stats.infer.p50_ms,
            stats.preprocess.p50_ms
        );
        if let Some(link) = &link {
            println!(
                "telemetry: {} messages, {} bytes, {} dropped, {} connection(s)",
                link.messages, link.bytes, link.dropped, link.connects
            );
        }
    }
    if restart.load(Ordering::Relaxed) {
        return Ok(ExitCode::from(super::agent::EXIT_RESTART));
    }
    Ok(ExitCode::SUCCESS)
}

/// Frames from a Camera Module: `rpicam-vid` started (and restarted, with the camera's
/// back-off) by the capture thread, whose notices are the camera's.
#[cfg(target_os = "linux")]
fn rpicam_capture(
    settings: RpicamSettings,
    reporter: &Arc<Reporter>,
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<(
    Arc<agent::FrameQueue<agent::Captured>>,
    std::thread::JoinHandle<()>,
)> {
    // A size or stride that cannot work is the operator's to fix, not something to retry.
    let layout = settings.layout().map_err(|e| {
        anyhow::anyhow!("rpicam: {e}; pick another --width/--height or --rpicam-stride")
    })?;
    let name: PathBuf = match settings.camera {
        Some(n) => format!("rpicam:{n}").into(),
        None => "rpicam:".into(),
    };
    tracing::info!(
        "rpicam: {} {}x{} at {} fps, I420 rows of {} bytes",
        settings.bin.display(),
        layout.width,
        layout.height,
        settings.fps,
        layout.stride
    );
    let r = reporter.clone();
    let frames = LiveSource::new(
        name,
        move || source::rpicam::open(&settings),
        Backoff::default(),
        stop.clone(),
        move |n| r.camera(n),
    );
    Ok(agent::spawn_capture(frames, Pace::Live, stop.clone()))
}

#[cfg(not(target_os = "linux"))]
fn rpicam_capture(
    _settings: RpicamSettings,
    _reporter: &Arc<Reporter>,
    _stop: &Arc<AtomicBool>,
) -> anyhow::Result<(
    Arc<agent::FrameQueue<agent::Captured>>,
    std::thread::JoinHandle<()>,
)> {
    anyhow::bail!("rpicam: the Camera Module is served by rpicam-vid, which runs on Linux only")
}

/// Opens the camera with the V4L2 back-end, or explains how to get one.
#[cfg(all(feature = "camera", target_os = "linux"))]
fn camera_opener(
    settings: CameraSettings,
) -> impl FnMut() -> std::io::Result<Box<dyn petcam_device::source::camera::Camera>> {
    move || petcam_device::source::camera::v4l2::open(&settings)
}

#[cfg(not(all(feature = "camera", target_os = "linux")))]
fn camera_opener(
    _settings: CameraSettings,
) -> impl FnMut() -> std::io::Result<Box<dyn petcam_device::source::camera::Camera>> {
    // Not reached: `run` refuses a camera source in such a build.
    || Err(std::io::Error::other("no camera support in this build"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example config shipped for the Pi parses, with every documented key uncommented.
    #[test]
    fn the_example_config_parses_with_every_key() {
        let text = include_str!("../../petcam.toml");
        let file: RunArgs = toml::from_str(text).unwrap();
        assert_eq!(file.source, Some(SourceSpec::Camera("/dev/video0".into())));
        assert_eq!(file.pins, ["cat=17", "dog=27"]);
        let all: String = text
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(kv) if kv.contains(" = ") && !kv.contains(':') => kv,
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n");
        let file: RunArgs = toml::from_str(&all).unwrap_or_else(|e| panic!("{e}\n{all}"));
        assert_eq!(file.gpio_chip, Some("/dev/gpiochip0".into()));
        assert_eq!(file.port, Some("/dev/serial0".into()));
        assert_eq!(
            (file.width, file.height, file.baud),
            (Some(640), Some(480), Some(921_600))
        );
        assert!(file.threshold.is_some() && file.smooth.is_some() && file.max_frames.is_some());
        assert_eq!(file.threads, Some(Threads::auto()));
    }

    /// `run` names its port as `agent`, `flash` and `monitor` do; unit files and configs
    /// written with the older name keep working.
    #[test]
    fn the_port_keeps_its_older_name_as_an_alias() {
        use clap::Parser;
        #[derive(Debug, Parser)]
        struct Cli {
            #[command(flatten)]
            run: RunArgs,
        }
        for flag in ["--port", "--serial"] {
            let cli = Cli::try_parse_from(["run", flag, "/dev/ttyUSB0"]).unwrap();
            assert_eq!(cli.run.port, Some("/dev/ttyUSB0".into()), "{flag}");
        }
        for key in ["port", "serial"] {
            let file: RunArgs = toml::from_str(&format!("{key} = \"/dev/ttyAMA0\"")).unwrap();
            assert_eq!(file.port, Some("/dev/ttyAMA0".into()), "{key}");
        }
    }

    #[test]
    fn command_line_flags_win_over_the_file() {
        let file: RunArgs =
            toml::from_str("threshold = 0.9\nsmooth = 5\npin = [\"cat=1\"]").unwrap();
        let cli = RunArgs {
            threshold: Some(0.6),
            ..RunArgs::default()
        };
        let merged = cli.or(file);
        assert_eq!(merged.threshold, Some(0.6));
        assert_eq!(merged.smooth, Some(5));
        assert_eq!(merged.pins, ["cat=1"]);
    }
}
