//! The capture thread for each kind of source: files paced or not, a stream, a V4L2 camera, a
//! Camera Module through `rpicam-vid`.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::report::Reporter;
use super::{ServiceConfig, ServiceError};
use crate::agent::{self, Captured, FrameQueue, Pace};
use crate::source::camera::{Backoff, CameraSettings, LiveSource};
use crate::source::rpicam::RpicamSettings;
use crate::source::{self, SourceSpec};

/// A running capture thread and the queue it fills.
pub(super) struct Capture {
    pub(super) queue: Arc<FrameQueue<Captured>>,
    pub(super) thread: JoinHandle<()>,
    /// A stream's thread may sit in a read that only the writer can end: it is not joined.
    pub(super) joinable: bool,
}

/// Starts capturing from `spec`; camera notices go to `reporter`.
pub(super) fn start(
    spec: &SourceSpec,
    config: &ServiceConfig,
    reporter: &Arc<Reporter>,
    stop: &Arc<AtomicBool>,
) -> Result<Capture, ServiceError> {
    // Files are paced like a camera only when --fps asks for it.
    let file_pace = config.file_fps().map_or(Pace::Wait, |f| {
        Pace::Every(Duration::from_secs_f64(1.0 / f))
    });
    let mut joinable = true;
    let (queue, thread) = match spec {
        SourceSpec::Dir(p) => {
            let frames = source::FileSource::dir(p, config.looping)?;
            agent::spawn_capture(frames, file_pace, stop.clone())
        }
        SourceSpec::Mjpeg(p) if source::is_stream(p) => {
            joinable = false;
            stream(p, config.looping, stop)?
        }
        SourceSpec::Mjpeg(p) => {
            let frames = source::FileSource::mjpeg(p, config.looping)?;
            agent::spawn_capture(frames, file_pace, stop.clone())
        }
        SourceSpec::Camera(p) => camera(p, config, reporter, stop)?,
        SourceSpec::Rpicam(camera) => {
            let settings = RpicamSettings {
                bin: config.rpicam_bin.clone(),
                camera: *camera,
                width: config.width,
                height: config.height,
                fps: config.camera_fps(),
                stride: config.rpicam_stride,
                extra_args: config.rpicam_arg.clone(),
                stop: stop.clone(),
            };
            rpicam(settings, reporter, stop)?
        }
    };
    Ok(Capture {
        queue,
        thread,
        joinable,
    })
}

type Started = (Arc<FrameQueue<Captured>>, JoinHandle<()>);

/// Frames from stdin or a FIFO, at the writer's rate, like a camera's.
fn stream(path: &Path, looping: bool, stop: &Arc<AtomicBool>) -> Result<Started, ServiceError> {
    if looping {
        tracing::warn!("--loop: {} is a stream and plays once", path.display());
    }
    let (reader, name): (Box<dyn std::io::Read + Send>, String) = if path == Path::new("-") {
        (Box::new(std::io::stdin()), "stdin".into())
    } else {
        let file = std::fs::File::open(path).map_err(|error| ServiceError::OpenStream {
            path: path.to_owned(),
            error,
        })?;
        (Box::new(file), path.display().to_string())
    };
    let frames = source::StreamSource::new(reader, name);
    Ok(agent::spawn_capture(frames, Pace::Live, stop.clone()))
}

/// Frames from a V4L2 camera, waited for and reopened with back-off.
fn camera(
    path: &Path,
    config: &ServiceConfig,
    reporter: &Arc<Reporter>,
    stop: &Arc<AtomicBool>,
) -> Result<Started, ServiceError> {
    if !cfg!(all(feature = "camera", target_os = "linux")) {
        return Err(ServiceError::NoCameraSupport(path.to_owned()));
    }
    let settings = CameraSettings {
        path: path.to_owned(),
        width: config.width,
        height: config.height,
        fps: config.camera_fps(),
    };
    let r = reporter.clone();
    let frames = LiveSource::new(
        path.to_owned(),
        camera_opener(settings),
        Backoff::default(),
        stop.clone(),
        move |n| r.camera(n),
    );
    Ok(agent::spawn_capture(frames, Pace::Live, stop.clone()))
}

/// Frames from a Camera Module: `rpicam-vid` started (and restarted, with the camera's
/// back-off) by the capture thread, whose notices are the camera's.
#[cfg(target_os = "linux")]
fn rpicam(
    settings: RpicamSettings,
    reporter: &Arc<Reporter>,
    stop: &Arc<AtomicBool>,
) -> Result<Started, ServiceError> {
    // A size or stride that cannot work is the operator's to fix, not something to retry.
    let layout = settings.layout().map_err(ServiceError::RpicamLayout)?;
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
fn rpicam(
    _settings: RpicamSettings,
    _reporter: &Arc<Reporter>,
    _stop: &Arc<AtomicBool>,
) -> Result<Started, ServiceError> {
    Err(ServiceError::RpicamUnsupported)
}

/// Opens the camera with the V4L2 back-end.
#[cfg(all(feature = "camera", target_os = "linux"))]
fn camera_opener(
    settings: CameraSettings,
) -> impl FnMut() -> std::io::Result<Box<dyn source::camera::Camera>> {
    move || source::camera::v4l2::open(&settings)
}

#[cfg(not(all(feature = "camera", target_os = "linux")))]
fn camera_opener(
    _settings: CameraSettings,
) -> impl FnMut() -> std::io::Result<Box<dyn source::camera::Camera>> {
    // Not reached: `camera` refuses a camera source in such a build.
    || Err(std::io::Error::other("no camera support in this build"))
}
