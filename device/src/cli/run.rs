//! `petcam-device run`: the long-running program (camera → model → decision → pins, with
//! telemetry), configured by flags and an optional TOML file; the work is
//! [`petcam_device::service`]'s.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use petcam_device::actuate::{self, Actuator};
use petcam_device::agent::RunError;
use petcam_device::firmware::EXIT_RESTART;
use petcam_device::infer::ExportedModel;
use petcam_device::service::{Outcome, Service, ServiceConfig};
use petcam_device::source::SourceSpec;
use petcam_device::threads::Threads;
use petcam_device::update::{Store, Updater};
use petcam_shared::protocol::ErrorSource;

/// Watch a source of frames, decide what it sees, drive output pins, report each change of
/// decision, and send telemetry.
///
/// Ends when a file source ends (without --loop), after --max-frames, or on SIGINT/SIGTERM,
/// with the outputs at their inactive level, the telemetry flushed and exit code 0. A camera
/// that is missing or unplugged is waited for (with back-off) and reported, never a crash.
///
/// Every option can also be set in a TOML file given with --config, under the flag's long
/// name with `_` for `-` (`gpio_chip = "/dev/gpiochip0"`, `pin = ["cat=17"]`,
/// `loop = true`); flags given on the command line win. A switch takes `=false` to turn off
/// what the file turned on: `--allow-unsigned=false`, `--json=false`, `--loop=false`.
#[derive(Debug, Default, clap::Args)]
pub struct RunArgs {
    /// Read options from this TOML file (see device/petcam.toml).
    #[arg(long, value_name = "FILE")]
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
    #[arg(long = "loop", value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    looping: Option<bool>,
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
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    allow_unsigned: Option<bool>,
    /// Accept a flashed model older than the active one.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    allow_downgrade: Option<bool>,
    /// Seconds a newly flashed binary must run before it confirms itself [default: 30]; one
    /// that stops sooner is rolled back by `petcam-device launch` at the next start.
    #[arg(long, value_name = "SECONDS")]
    health_grace: Option<f64>,
    /// JSON lines on stdout: one per decision change, camera state change and bad frame, then
    /// a summary.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    json: Option<bool>,
}

/// `value`, when the command line gave it, replaces `slot`.
fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *slot = v;
    }
}

/// An optional setting the command line gave replaces the file's.
fn set_some<T>(slot: &mut Option<T>, value: Option<T>) {
    if value.is_some() {
        *slot = value;
    }
}

/// A list the command line gave (one or more flags) replaces the file's.
fn set_list<T>(slot: &mut Vec<T>, value: Vec<T>) {
    if !value.is_empty() {
        *slot = value;
    }
}

impl RunArgs {
    /// The settings: the defaults, overlaid by the --config file, overlaid by the flags.
    fn config(self) -> anyhow::Result<ServiceConfig> {
        let base = match &self.config {
            Some(path) => read_config(path)?,
            None => ServiceConfig::default(),
        };
        Ok(self.overlay(base))
    }

    /// `config` with every flag given on the command line in place of its value.
    fn overlay(self, mut config: ServiceConfig) -> ServiceConfig {
        let c = &mut config;
        set_some(&mut c.model, self.model);
        set_some(&mut c.source, self.source);
        set(&mut c.looping, self.looping);
        set_some(&mut c.fps, self.fps);
        set(&mut c.width, self.width);
        set(&mut c.height, self.height);
        set(&mut c.rpicam_bin, self.rpicam_bin);
        set_list(&mut c.rpicam_arg, self.rpicam_arg);
        set_some(&mut c.rpicam_stride, self.rpicam_stride);
        set(&mut c.smooth, self.smooth);
        set(&mut c.threshold, self.threshold);
        set_list(&mut c.pins, self.pins);
        set(&mut c.gpio_chip, self.gpio_chip);
        set(&mut c.threads, self.threads);
        set_some(&mut c.max_frames, self.max_frames);
        set_some(&mut c.port, self.port);
        set(&mut c.baud, self.baud);
        set_some(&mut c.device_id, self.device_id);
        set_some(&mut c.state_dir, self.state_dir);
        set_some(&mut c.trusted_key, self.trusted_key);
        set(&mut c.allow_unsigned, self.allow_unsigned);
        set(&mut c.allow_downgrade, self.allow_downgrade);
        set(&mut c.health_grace, self.health_grace);
        set(&mut c.json, self.json);
        config
    }
}

/// Reads a `--config` file.
fn read_config(path: &Path) -> anyhow::Result<ServiceConfig> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read config file {}: {e}", path.display()))?;
    ServiceConfig::from_toml(&text).map_err(|e| {
        anyhow::anyhow!(
            "config file {}: {e}\nkeys are the long flag names of `petcam-device run --help` \
             with `_` for `-`",
            path.display()
        )
    })
}

fn usage_error(msg: impl std::fmt::Display) -> anyhow::Result<ExitCode> {
    eprintln!("error: {msg}");
    Ok(ExitCode::from(2))
}

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let config = match args.config() {
        Ok(config) => config,
        Err(e) => return usage_error(format!("{e:#}")),
    };
    if config.state_dir.is_some() && config.trusted_key.is_none() && !config.allow_unsigned {
        return usage_error(
            "--state-dir accepts flashed models: pass --trusted-key NAME.pub (from `petcam \
             keygen`), or --allow-unsigned for a bench device",
        );
    }
    let store = match &config.state_dir {
        Some(dir) => Some(Store::open(dir).map_err(|e| {
            anyhow::anyhow!("cannot use the state directory {}: {e}", dir.display())
        })?),
        None => None,
    };
    // The model flashed last wins over --model: it is the one the operator deployed.
    let flashed = store.as_ref().and_then(Store::active).map(|(_, path)| path);
    let Some(model_path) = flashed.or_else(|| config.model.clone()) else {
        return usage_error(
            "no model: pass --model FILE or set `model` in the --config file (or flash one \
             into --state-dir)",
        );
    };
    let Some(source) = config.source.clone() else {
        return usage_error(
            "no source: pass --source dir:PATH|mjpeg:FILE|mjpeg:-|camera:/dev/videoN|rpicam: or set \
             `source` in the --config file",
        );
    };
    if !(0.0..=1.0).contains(&config.threshold) {
        return usage_error(format!(
            "--threshold {} is not between 0 and 1",
            config.threshold
        ));
    }

    // Installed before the model loads, so SIGTERM while it loads is a clean stop, not a
    // kill.
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || stop.store(true, Ordering::Relaxed))
            .map_err(|e| anyhow::anyhow!("cannot install the SIGINT/SIGTERM handler: {e}"))?;
    }
    tracing::info!(model = %model_path.display(), threads = %config.threads, "loading the model");
    let model = crate::load(&model_path, config.threads)?;
    if stop.load(Ordering::Relaxed) {
        tracing::info!("stopped while the model loaded");
        return Ok(ExitCode::SUCCESS);
    }
    let pins: Vec<(usize, u32)> = config
        .pins
        .iter()
        .map(|spec| actuate::parse_pin(spec, &model.labels))
        .collect::<Result<_, _>>()?;
    // With a state directory, what the host sends over the link goes to the updater.
    let updater = match store {
        Some(store) => Some(updater(store, &config, &model, !pins.is_empty())?),
        None => None,
    };

    let service = Service::start(&config, &source, &model, updater, stop)?;
    let stats = if pins.is_empty() {
        let mut none = Actuator::<actuate::NoPin>::new(Vec::new())?;
        service.run(&model, &mut none)
    } else {
        match super::gpio::actuator(&config.gpio_chip, &pins) {
            Ok(mut act) => service.run(&model, &mut act),
            Err(e) => {
                service.report_error(ErrorSource::Gpio, format!("{e:#}"));
                Err(RunError::Pin(format!("{e:#}")))
            }
        }
    };
    let outcome = service.finish(stats)?;
    print_summary(&outcome, config.json)?;
    if outcome.restart {
        return Ok(ExitCode::from(EXIT_RESTART));
    }
    Ok(ExitCode::SUCCESS)
}

/// The updater for uploads into `store`, under the trust the config gives.
fn updater(
    store: Store,
    config: &ServiceConfig,
    model: &ExportedModel,
    pins: bool,
) -> anyhow::Result<Updater> {
    let policy = super::trust::policy(
        config.trusted_key.as_deref(),
        config.allow_downgrade,
        config.threads,
        // The pins are wired by label: a model with other labels is refused.
        pins.then(|| model.labels.clone()),
    )?;
    Updater::new(store, policy).map_err(|e| anyhow::anyhow!("cannot use the state directory: {e}"))
}

/// The last line (or JSON object) of a run.
fn print_summary(outcome: &Outcome, json: bool) -> anyhow::Result<()> {
    let Outcome { stats, link, .. } = outcome;
    if json {
        let mut summary = serde_json::to_value(stats)?;
        summary["event"] = "summary".into();
        if let Some(link) = link {
            summary["telemetry"] = serde_json::to_value(link)?;
        }
        println!("{summary}");
        return Ok(());
    }
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
    if let Some(link) = link {
        println!(
            "telemetry: {} messages, {} bytes, {} dropped, {} connection(s)",
            link.messages, link.bytes, link.dropped, link.connects
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn parse(args: &[&str]) -> RunArgs {
        Cli::try_parse_from(std::iter::once("run").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
            .run
    }

    /// `run` names its port as `agent`, `flash` and `monitor` do; unit files written with the
    /// older name keep working.
    #[test]
    fn the_port_keeps_its_older_name_as_an_alias() {
        for flag in ["--port", "--serial"] {
            let cli = parse(&[flag, "/dev/ttyUSB0"]);
            assert_eq!(cli.port, Some("/dev/ttyUSB0".into()), "{flag}");
        }
    }

    #[test]
    fn command_line_flags_win_over_the_file() {
        let file =
            ServiceConfig::from_toml("threshold = 0.9\nsmooth = 5\npin = [\"cat=1\"]").unwrap();
        let merged = parse(&["--threshold", "0.6"]).overlay(file);
        assert_eq!(merged.threshold, 0.6);
        assert_eq!(merged.smooth, 5);
        assert_eq!(merged.pins, ["cat=1"]);
    }

    /// A flag beats the file, the file beats the default, and what neither sets is the
    /// default.
    #[test]
    fn flags_overlay_the_file_which_overlays_the_defaults() {
        let default = ServiceConfig::default();
        let file = ServiceConfig::from_toml(
            "baud = 115200\nwidth = 1280\npin = [\"cat=1\"]\nport = \"/dev/ttyAMA0\"",
        )
        .unwrap();
        let merged = parse(&["--baud", "57600", "--pin", "dog=2", "--height", "720"]).overlay(file);
        assert_eq!(merged.baud, 57_600, "flag over file");
        assert_eq!(merged.pins, ["dog=2"], "flag over file");
        assert_eq!(merged.height, 720, "flag over default");
        assert_eq!(merged.width, 1280, "file over default");
        assert_eq!(
            merged.port,
            Some("/dev/ttyAMA0".into()),
            "file over default"
        );
        assert_eq!(merged.threshold, default.threshold, "the default");
        assert_eq!(merged.gpio_chip, default.gpio_chip, "the default");
        // No flags and no file: the defaults.
        assert_eq!(parse(&[]).overlay(ServiceConfig::default()), default);
    }

    /// A switch the file turns on, a flag turns off, and the other way round; a switch without
    /// a value turns it on, as before.
    #[test]
    fn a_flag_turns_off_a_switch_the_file_turned_on() {
        let file = ServiceConfig::from_toml(
            "allow_unsigned = true\nallow_downgrade = true\njson = true\nloop = true",
        )
        .unwrap();
        let off = parse(&[
            "--allow-unsigned=false",
            "--allow-downgrade=false",
            "--json=false",
            "--loop=false",
        ])
        .overlay(file.clone());
        assert!(!off.allow_unsigned && !off.allow_downgrade && !off.json && !off.looping);
        assert!(
            parse(&[]).overlay(file.clone()).allow_unsigned,
            "the file's"
        );
        let on = parse(&[
            "--allow-unsigned",
            "--json",
            "--loop",
            "--allow-downgrade=true",
        ])
        .overlay(ServiceConfig::default());
        assert!(on.allow_unsigned && on.allow_downgrade && on.json && on.looping);
        // A switch takes its value after `=` only: the next word is not swallowed.
        assert!(Cli::try_parse_from(["run", "--json", "false"]).is_err());
    }

    /// The `[default: …]` that `run --help` shows is ServiceConfig's default.
    #[test]
    fn the_help_shows_the_defaults_of_service_config() {
        use clap::CommandFactory;
        let d = ServiceConfig::default();
        let cmd = Cli::command();
        let help = |id: &str| {
            let arg = cmd.get_arguments().find(|a| a.get_id() == id).unwrap();
            arg.get_help().unwrap().to_string()
        };
        for (id, value) in [
            ("fps", ServiceConfig::CAMERA_FPS.to_string()),
            ("width", d.width.to_string()),
            ("height", d.height.to_string()),
            ("rpicam_bin", d.rpicam_bin.display().to_string()),
            ("smooth", d.smooth.to_string()),
            ("threshold", d.threshold.to_string()),
            ("gpio_chip", d.gpio_chip.display().to_string()),
            ("baud", d.baud.to_string()),
            ("health_grace", d.health_grace.to_string()),
        ] {
            let text = help(id);
            assert!(
                text.contains(&format!("[default: {value}")),
                "--{id}: {text}"
            );
        }
        assert!(help("threads").contains("`auto` (the default)"));
        assert_eq!(d.threads, Threads::auto());
    }
}
