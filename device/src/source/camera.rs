//! A live camera that may come and go: it is opened, read, lost and reopened with back-off, and
//! every change is reported. A missing or unplugged camera never ends the program; it waits for
//! the camera, and says which video devices it can see meanwhile.
//!
//! The retry logic is generic over [`Camera`], so it is tested with a mock; the V4L2 camera
//! (feature `camera`, Linux) is [`v4l2::open`].

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{FrameData, PixelFormat};
pub use crate::retry::Backoff;

/// What `run` asks of a camera.
#[derive(Debug, Clone, PartialEq)]
pub struct CameraSettings {
    pub path: PathBuf,
    pub width: u32,
    pub height: u32,
    pub fps: u32,
}

/// An open camera streaming frames.
pub trait Camera: Send {
    /// The next frame's bytes, waiting for it. An error means the camera is gone or stuck.
    fn grab(&mut self) -> std::io::Result<&[u8]>;
    /// The format the driver agreed to.
    fn format(&self) -> (PixelFormat, u32, u32);
}

/// A change in the camera's state, for the operator and the telemetry link.
#[derive(Debug, Clone, PartialEq)]
pub enum CameraNotice {
    Opened {
        path: PathBuf,
        format: PixelFormat,
        width: u32,
        height: u32,
    },
    /// Opening failed; another try comes after `retry_in`.
    Unavailable {
        path: PathBuf,
        error: String,
        devices: Vec<String>,
        retry_in: Duration,
    },
    /// A camera that was streaming stopped (unplugged, or no frame within the timeout).
    Lost { path: PathBuf, error: String },
}

impl CameraNotice {
    pub fn is_error(&self) -> bool {
        !matches!(self, CameraNotice::Opened { .. })
    }
}

impl std::fmt::Display for CameraNotice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CameraNotice::Opened {
                path,
                format,
                width,
                height,
            } => write!(
                f,
                "camera {}: streaming {format} {width}x{height}",
                path.display()
            ),
            CameraNotice::Unavailable {
                path,
                error,
                devices,
                retry_in,
            } => {
                let found = if devices.is_empty() {
                    "no video devices found".to_owned()
                } else {
                    format!("video devices found: {}", devices.join(", "))
                };
                write!(
                    f,
                    "camera {} unavailable: {error}; {found}; retrying in {:.1} s",
                    path.display(),
                    retry_in.as_secs_f64()
                )
            }
            CameraNotice::Lost { path, error } => {
                write!(f, "camera {} lost: {error}; reopening", path.display())
            }
        }
    }
}

/// Frames from a camera, reopened whenever it fails; ends only when `stop` is set.
pub struct LiveSource<O> {
    open: O,
    path: PathBuf,
    camera: Option<Box<dyn Camera>>,
    backoff: Backoff,
    stop: Arc<AtomicBool>,
    notify: Box<dyn FnMut(CameraNotice) + Send>,
    frame: u64,
}

impl<O> std::fmt::Debug for LiveSource<O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveSource")
            .field("path", &self.path)
            .field("open", &self.camera.is_some())
            .field("frame", &self.frame)
            .finish()
    }
}

impl<O> LiveSource<O>
where
    O: FnMut() -> std::io::Result<Box<dyn Camera>>,
{
    pub fn new(
        path: PathBuf,
        open: O,
        backoff: Backoff,
        stop: Arc<AtomicBool>,
        notify: impl FnMut(CameraNotice) + Send + 'static,
    ) -> Self {
        Self {
            open,
            path,
            camera: None,
            backoff,
            stop,
            notify: Box::new(notify),
            frame: 0,
        }
    }

    fn wait(&self, d: Duration) -> bool {
        crate::retry::sleep_unless(d, || self.stop.load(Ordering::Relaxed))
    }
}

impl<O> Iterator for LiveSource<O>
where
    O: FnMut() -> std::io::Result<Box<dyn Camera>>,
{
    /// The frame's name (`frame N`) and its undecoded bytes.
    type Item = (String, FrameData);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return None;
            }
            let Some(camera) = self.camera.as_mut() else {
                match (self.open)() {
                    Ok(camera) => {
                        let (format, width, height) = camera.format();
                        self.backoff.reset();
                        (self.notify)(CameraNotice::Opened {
                            path: self.path.clone(),
                            format,
                            width,
                            height,
                        });
                        self.camera = Some(camera);
                    }
                    Err(e) => {
                        let retry_in = self.backoff.next_delay();
                        (self.notify)(CameraNotice::Unavailable {
                            path: self.path.clone(),
                            error: e.to_string(),
                            devices: super::video_devices(),
                            retry_in,
                        });
                        if !self.wait(retry_in) {
                            return None;
                        }
                    }
                }
                continue;
            };
            let (format, width, height) = camera.format();
            match camera.grab() {
                Ok(data) => {
                    let item = (
                        format!("frame {}", self.frame),
                        FrameData::Camera {
                            format,
                            width,
                            height,
                            data: data.to_vec(),
                        },
                    );
                    self.frame += 1;
                    return Some(item);
                }
                Err(e) => {
                    self.camera = None;
                    // A grab cut short by the stop request is no loss to report.
                    if self.stop.load(Ordering::Relaxed) {
                        return None;
                    }
                    (self.notify)(CameraNotice::Lost {
                        path: self.path.clone(),
                        error: e.to_string(),
                    });
                }
            }
        }
    }
}

/// The V4L2 camera through the `v4l` crate: memory-mapped streaming, MJPEG preferred.
#[cfg(all(feature = "camera", target_os = "linux"))]
pub mod v4l2 {
    use std::io;
    use std::time::Duration;

    use v4l::buffer::Type;
    use v4l::io::mmap::Stream;
    use v4l::io::traits::CaptureStream;
    use v4l::video::Capture;
    use v4l::{Device, FourCC};

    use super::{Camera, CameraSettings};
    use crate::source::PixelFormat;

    /// A frame that takes longer than this means the camera is stuck or gone.
    const FRAME_TIMEOUT: Duration = Duration::from_secs(3);

    struct V4l2Camera {
        // The stream keeps its own handle to the device; the device is kept for clarity of
        // ownership (closing it ends the stream).
        stream: Stream<'static>,
        _device: Device,
        format: PixelFormat,
        width: u32,
        height: u32,
    }

    impl Camera for V4l2Camera {
        fn grab(&mut self) -> io::Result<&[u8]> {
            let (buf, meta) = self.stream.next()?;
            let used = (meta.bytesused as usize).min(buf.len());
            if used == 0 {
                return Err(io::Error::other("the driver delivered an empty buffer"));
            }
            Ok(&buf[..used])
        }

        fn format(&self) -> (PixelFormat, u32, u32) {
            (self.format, self.width, self.height)
        }
    }

    /// Opens the camera in the first format of [`PixelFormat::PREFERRED`] it offers, at the
    /// size and rate closest to `settings` that the driver accepts.
    pub fn open(settings: &CameraSettings) -> io::Result<Box<dyn Camera>> {
        let device = Device::with_path(&settings.path)?;
        let caps = device.query_caps()?;
        if !caps
            .capabilities
            .contains(v4l::capability::Flags::VIDEO_CAPTURE)
        {
            return Err(io::Error::other(format!(
                "{} ({}) is not a video capture device",
                caps.card, caps.driver
            )));
        }
        let offered: Vec<FourCC> = device.enum_formats()?.iter().map(|d| d.fourcc).collect();
        let wanted = PixelFormat::PREFERRED
            .into_iter()
            .find(|f| offered.contains(&FourCC::new(&f.fourcc())))
            .ok_or_else(|| {
                let names: Vec<String> = offered.iter().map(|f| f.to_string()).collect();
                io::Error::other(format!(
                    "{} offers {}; petcam reads MJPG or YUYV",
                    caps.card,
                    names.join(", ")
                ))
            })?;
        let mut fmt = device.format()?;
        fmt.width = settings.width;
        fmt.height = settings.height;
        fmt.fourcc = FourCC::new(&wanted.fourcc());
        let fmt = device.set_format(&fmt)?;
        let format = PixelFormat::from_fourcc(fmt.fourcc.repr)
            .ok_or_else(|| io::Error::other(format!("the driver switched to {}", fmt.fourcc)))?;
        if settings.fps > 0 {
            // Not every driver lets the rate be set; the camera then runs at its own.
            if let Err(e) =
                device.set_params(&v4l::video::capture::Parameters::with_fps(settings.fps))
            {
                tracing::warn!(
                    "camera {}: cannot set the frame rate: {e}",
                    settings.path.display()
                );
            }
        }
        let mut stream = Stream::with_buffers(&device, Type::VideoCapture, 4)?;
        stream.set_timeout(FRAME_TIMEOUT);
        Ok(Box::new(V4l2Camera {
            stream,
            _device: device,
            format,
            width: fmt.width,
            height: fmt.height,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A camera that delivers `frames` frames and then fails, as an unplugged one does.
    struct Mock {
        frames: usize,
        data: Vec<u8>,
    }

    impl Camera for Mock {
        fn grab(&mut self) -> std::io::Result<&[u8]> {
            if self.frames == 0 {
                return Err(std::io::Error::other("No such device"));
            }
            self.frames -= 1;
            Ok(&self.data)
        }
        fn format(&self) -> (PixelFormat, u32, u32) {
            (PixelFormat::Yuyv, 2, 1)
        }
    }

    #[test]
    fn a_missing_then_unplugged_camera_is_retried_and_reported() {
        // Opening fails twice, then a camera gives 2 frames and is unplugged, then a second
        // one gives 3 frames.
        let mut attempts = 0;
        let open = move || -> std::io::Result<Box<dyn Camera>> {
            attempts += 1;
            match attempts {
                1 | 2 => Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "No such file or directory",
                )),
                3 => Ok(Box::new(Mock {
                    frames: 2,
                    data: vec![235, 128, 235, 128],
                })),
                _ => Ok(Box::new(Mock {
                    frames: 3,
                    data: vec![16, 128, 16, 128],
                })),
            }
        };
        let notices = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let seen = notices.clone();
        let source = LiveSource::new(
            "/dev/video9".into(),
            open,
            Backoff::new(Duration::from_millis(1), Duration::from_millis(2)),
            stop.clone(),
            move |n| seen.lock().unwrap().push(n),
        );
        let frames: Vec<(String, FrameData)> = source.take(5).collect();
        let names: Vec<&str> = frames.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["frame 0", "frame 1", "frame 2", "frame 3", "frame 4"]
        );
        let rgb: Vec<[u8; 3]> = frames
            .into_iter()
            .map(|(_, f)| f.decode().unwrap().get_pixel(0, 0).0)
            .collect();
        assert_eq!(rgb[1], [255, 255, 255]);
        assert_eq!(rgb[2], [0, 0, 0]);

        let notices = notices.lock().unwrap();
        let kinds: Vec<&str> = notices
            .iter()
            .map(|n| match n {
                CameraNotice::Opened { .. } => "opened",
                CameraNotice::Unavailable { .. } => "unavailable",
                CameraNotice::Lost { .. } => "lost",
            })
            .collect();
        assert_eq!(
            kinds,
            ["unavailable", "unavailable", "opened", "lost", "opened"]
        );
        let CameraNotice::Unavailable { retry_in, .. } = &notices[1] else {
            unreachable!()
        };
        assert_eq!(*retry_in, Duration::from_millis(2));
        let text = notices[0].to_string();
        assert!(
            text.contains("/dev/video9")
                && text.contains("No such file")
                && text.contains("video devices"),
            "{text}"
        );
    }

    #[test]
    fn a_stop_request_ends_the_wait_for_a_camera() {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let open = || -> std::io::Result<Box<dyn Camera>> { Err(std::io::Error::other("gone")) };
        let mut source = LiveSource::new(
            "/dev/video9".into(),
            open,
            Backoff::new(Duration::from_secs(3600), Duration::from_secs(3600)),
            stop,
            move |_| s.store(true, Ordering::Relaxed),
        );
        // The notice sets the stop flag: the hour-long wait ends at once and the source ends.
        assert!(source.next().is_none());
    }
}
