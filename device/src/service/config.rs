//! The service's settings, with every default in one place: [`ServiceConfig::default`].
//!
//! A config file is read into a `ServiceConfig` (keys it leaves out keep their default), and
//! the command line is an overlay of `Option`s on top of that (`petcam-device run`'s
//! `RunArgs`), so a flag wins over the file and the file over the default.

use std::path::PathBuf;

use crate::source::SourceSpec;
use crate::telemetry;
use crate::threads::Threads;

/// Everything `petcam-device run` can be told, as a `petcam.toml` spells it: the long flag
/// names with `_` for `-`.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceConfig {
    /// The exported model; a model flashed into `state_dir` wins over it.
    pub model: Option<PathBuf>,
    pub source: Option<SourceSpec>,
    /// Start again at the first file when a `dir:` or `mjpeg:` file ends.
    #[serde(rename = "loop")]
    pub looping: bool,
    /// Camera: the rate to ask for ([`ServiceConfig::CAMERA_FPS`] when unset). Files: play
    /// them at this rate, dropping frames; unset, every file is classified.
    pub fps: Option<f64>,
    pub width: u32,
    pub height: u32,
    pub rpicam_bin: PathBuf,
    pub rpicam_arg: Vec<String>,
    /// `None`: the Pi's own rule for the Y plane's row stride.
    pub rpicam_stride: Option<u32>,
    /// Frames whose mean probabilities make a decision.
    pub smooth: usize,
    /// Below this smoothed probability the decision is `none`.
    pub threshold: f32,
    /// `LABEL=LINE` outputs.
    #[serde(rename = "pin")]
    pub pins: Vec<String>,
    pub gpio_chip: PathBuf,
    pub threads: Threads,
    pub max_frames: Option<u64>,
    /// The telemetry link; `None` sends no telemetry. `serial` is its older name.
    #[serde(alias = "serial")]
    pub port: Option<PathBuf>,
    pub baud: u32,
    /// `None`: the host name ([`ServiceConfig::device_id`]).
    pub device_id: Option<String>,
    /// Where flashed models are accepted; `None` accepts none.
    pub state_dir: Option<PathBuf>,
    pub trusted_key: Option<PathBuf>,
    pub allow_unsigned: bool,
    pub allow_downgrade: bool,
    /// Seconds a newly flashed binary runs before it confirms itself.
    pub health_grace: f64,
    /// JSON lines on stdout instead of text.
    pub json: bool,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            model: None,
            source: None,
            looping: false,
            fps: None,
            width: 640,
            height: 480,
            rpicam_bin: "rpicam-vid".into(),
            rpicam_arg: Vec::new(),
            rpicam_stride: None,
            smooth: 3,
            threshold: 0.8,
            pins: Vec::new(),
            gpio_chip: "/dev/gpiochip0".into(),
            threads: Threads::default(),
            max_frames: None,
            port: None,
            // As `petcam flash` and `petcam monitor` use.
            baud: 921_600,
            device_id: None,
            state_dir: None,
            trusted_key: None,
            allow_unsigned: false,
            allow_downgrade: false,
            health_grace: 30.0,
            json: false,
        }
    }
}

impl ServiceConfig {
    /// The frame rate a camera is asked for when `fps` is unset.
    pub const CAMERA_FPS: f64 = 30.0;

    /// Parses a `petcam.toml`.
    pub fn from_toml(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// The rate files are played at: `None` classifies every file.
    pub fn file_fps(&self) -> Option<f64> {
        self.fps.filter(|f| *f > 0.0)
    }

    /// The rate a camera is asked for.
    pub fn camera_fps(&self) -> u32 {
        self.file_fps().unwrap_or(Self::CAMERA_FPS).round() as u32
    }

    /// This device's name on the link.
    pub fn device_id(&self) -> String {
        self.device_id.clone().unwrap_or_else(telemetry::host_name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `device/petcam.toml` with every `# key = value` line uncommented.
    fn every_key() -> String {
        include_str!("../../petcam.toml")
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(kv) if kv.contains(" = ") && !kv.contains(':') => kv,
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The example config shipped for the Pi parses, with every documented key uncommented.
    #[test]
    fn the_example_config_parses_with_every_key() {
        let text = include_str!("../../petcam.toml");
        let file = ServiceConfig::from_toml(text).unwrap();
        assert_eq!(file.source, Some(SourceSpec::Camera("/dev/video0".into())));
        assert_eq!(file.pins, ["cat=17", "dog=27"]);
        let all = every_key();
        let file = ServiceConfig::from_toml(&all).unwrap_or_else(|e| panic!("{e}\n{all}"));
        assert_eq!(file.gpio_chip, PathBuf::from("/dev/gpiochip0"));
        assert_eq!(file.port, Some("/dev/serial0".into()));
        assert_eq!((file.width, file.height, file.baud), (640, 480, 921_600));
        assert!(file.max_frames.is_some());
        assert_eq!(file.threads, Threads::auto());
        for key in [
            "threshold",
            "smooth",
            "max_frames",
            "health_grace",
            "allow_unsigned",
        ] {
            assert!(
                all.contains(&format!("\n{key} = ")),
                "{key} is not documented"
            );
        }
    }

    /// The values `petcam.toml` shows as defaults (its commented-out keys) are the defaults.
    #[test]
    fn the_documented_defaults_are_the_defaults() {
        let d = ServiceConfig::default();
        let file = ServiceConfig::from_toml(&every_key()).unwrap();
        assert_eq!(file.rpicam_bin, d.rpicam_bin);
        assert_eq!((file.width, file.height), (d.width, d.height));
        assert_eq!(file.fps, Some(ServiceConfig::CAMERA_FPS));
        assert_eq!(file.looping, d.looping);
        assert_eq!((file.smooth, file.threshold), (d.smooth, d.threshold));
        assert_eq!(file.gpio_chip, d.gpio_chip);
        assert_eq!(file.baud, d.baud);
        assert_eq!(
            (file.allow_unsigned, file.allow_downgrade),
            (d.allow_unsigned, d.allow_downgrade)
        );
        assert_eq!(file.health_grace, d.health_grace);
        assert_eq!(file.threads, d.threads);
        assert_eq!(file.json, d.json);
        // And the values the issue of scattered defaults named, once more by hand.
        assert_eq!((d.threshold, d.smooth, d.baud), (0.8, 3, 921_600));
        assert_eq!((d.width, d.height, d.camera_fps()), (640, 480, 30));
        assert_eq!(d.gpio_chip, PathBuf::from("/dev/gpiochip0"));
        assert_eq!(d.health_grace, 30.0);
    }

    /// Keys a file leaves out keep their default; an empty file is the default.
    #[test]
    fn a_file_overlays_the_defaults() {
        assert_eq!(
            ServiceConfig::from_toml("").unwrap(),
            ServiceConfig::default()
        );
        let file = ServiceConfig::from_toml("threshold = 0.9\nallow_unsigned = true").unwrap();
        assert_eq!(file.threshold, 0.9);
        assert!(file.allow_unsigned);
        assert_eq!(
            ServiceConfig {
                threshold: 0.8,
                allow_unsigned: false,
                ..file
            },
            ServiceConfig::default()
        );
    }

    #[test]
    fn the_port_keeps_its_older_key_as_an_alias() {
        for key in ["port", "serial"] {
            let file = ServiceConfig::from_toml(&format!("{key} = \"/dev/ttyAMA0\"")).unwrap();
            assert_eq!(file.port, Some("/dev/ttyAMA0".into()), "{key}");
        }
    }

    #[test]
    fn an_unknown_key_is_an_error_that_names_it() {
        let e = ServiceConfig::from_toml("threshhold = 0.9").unwrap_err();
        assert!(e.to_string().contains("threshhold"), "{e}");
    }

    #[test]
    fn a_camera_is_asked_for_the_default_rate_unless_told() {
        let mut c = ServiceConfig::default();
        assert_eq!((c.camera_fps(), c.file_fps()), (30, None));
        c.fps = Some(0.0);
        assert_eq!((c.camera_fps(), c.file_fps()), (30, None));
        c.fps = Some(12.4);
        assert_eq!((c.camera_fps(), c.file_fps()), (12, Some(12.4)));
    }
}
