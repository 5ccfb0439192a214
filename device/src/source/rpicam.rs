//! The Raspberry Pi Camera Modules (CSI) through libcamera: `rpicam-vid` runs as a child and
//! writes raw I420 frames to its stdout, so the Pi encodes and decodes no JPEG.
//!
//! What `rpicam-vid --codec yuv420 -o -` writes (rpicam-apps): the null encoder hands each
//! capture buffer to the output whole, and a buffer is one dma-buf of the stream's `frameSize`
//! (`RPiCamApp::setupCapture`, `core/rpicam_app.cpp`), holding the Y plane at the row stride
//! libcamera chose, then U and V at half of it, with no gap. Nothing in the stream marks where
//! a frame starts, and rpicam-vid never prints the stride, so the layout is worked out the way
//! the Pi's pipelines work it out:
//! - Pi 0 to 4 (VC4 ISP, `bcm2835-isp`): YUV420 rows are aligned to 64 bytes;
//! - Pi 5 (PiSP, `brcm,bcm2712`): libcamera's `computeOptimalStride` aligns the chroma rows to
//!   64 bytes and doubles that for luma: rows are aligned to 128 bytes.
//!
//! The frame size is then `stride * height * 3 / 2`. `--rpicam-stride` overrides the rule.
//!
//! The child never outlives `petcam-device`: it is stopped when the camera is dropped, it
//! gets SIGKILL from the kernel if the thread that started it dies (`PR_SET_PDEATHSIG`; the
//! capture thread owns it for its whole life), and it runs in its own process group, so a
//! Ctrl-C on the terminal reaches `petcam-device` alone, which then stops it in order.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use super::{I420Layout, YuvMatrix};

#[cfg(target_os = "linux")]
mod child;
#[cfg(target_os = "linux")]
pub use child::open;

/// What `run --source rpicam:` asks of `rpicam-vid`.
#[derive(Debug, Clone)]
pub struct RpicamSettings {
    /// `rpicam-vid`, or `libcamera-vid` on bullseye.
    pub bin: PathBuf,
    /// `rpicam:N`: the camera index (`--camera N`).
    pub camera: Option<u32>,
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    /// The row stride, when the platform's rule is not the right one.
    pub stride: Option<u32>,
    /// Passed on after petcam's own options (e.g. `--hflip`, `--awb indoor`).
    pub extra_args: Vec<String>,
    /// Set when `petcam-device` is stopping: a wait for a frame ends at once.
    pub stop: Arc<AtomicBool>,
}

/// The row alignment of YUV420 on the Pi this runs on (see the module's notes).
pub fn platform_stride_align() -> u32 {
    let compatible = std::fs::read("/proc/device-tree/compatible").unwrap_or_default();
    let is_pi5 = compatible
        .split(|&b| b == 0)
        .any(|c| c.starts_with(b"brcm,bcm2712"));
    if is_pi5 {
        128
    } else {
        64
    }
}

impl RpicamSettings {
    /// The frame layout `rpicam-vid` will write.
    pub fn layout(&self) -> Result<I420Layout, super::yuv::LayoutError> {
        let stride = self
            .stride
            .unwrap_or_else(|| self.width.next_multiple_of(platform_stride_align()));
        I420Layout::new(
            self.width,
            self.height,
            stride,
            YuvMatrix::for_rpicam_video(self.width, self.height),
        )
    }

    /// The child's arguments: raw frames on stdout, forever, no preview window, each frame
    /// flushed as soon as it is written.
    pub fn args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = [
            "--codec",
            "yuv420",
            "--output",
            "-",
            "--timeout",
            "0",
            "--nopreview",
            "--flush",
        ]
        .iter()
        .map(Into::into)
        .collect();
        for (flag, value) in [
            ("--width", self.width),
            ("--height", self.height),
            ("--framerate", self.fps),
        ] {
            args.push(flag.into());
            args.push(value.to_string().into());
        }
        if let Some(n) = self.camera {
            args.push("--camera".into());
            args.push(n.to_string().into());
        }
        args.extend(self.extra_args.iter().map(Into::into));
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(width: u32, stride: Option<u32>) -> RpicamSettings {
        RpicamSettings {
            bin: "rpicam-vid".into(),
            camera: Some(1),
            width,
            height: 480,
            fps: 30,
            stride,
            extra_args: vec!["--hflip".into()],
            stop: Arc::default(),
        }
    }

    #[test]
    fn rows_are_padded_to_the_platform_alignment() {
        let align = platform_stride_align();
        let layout = settings(600, None).layout().unwrap();
        assert_eq!(layout.stride, 600u32.next_multiple_of(align));
        assert_eq!(layout.frame_len(), layout.stride as usize * 480 * 3 / 2);
        // An explicit stride wins; one shorter than the width is refused.
        assert_eq!(settings(600, Some(768)).layout().unwrap().stride, 768);
        assert!(settings(600, Some(512)).layout().is_err());
        assert!(settings(601, None).layout().is_err());
    }

    #[test]
    fn the_child_is_asked_for_raw_frames_on_stdout() {
        let args: Vec<String> = settings(640, None)
            .args()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let joined = args.join(" ");
        for part in [
            "--codec yuv420",
            "--output -",
            "--timeout 0",
            "--width 640",
            "--height 480",
            "--framerate 30",
            "--camera 1",
        ] {
            assert!(joined.contains(part), "{part} missing from {joined}");
        }
        // Extra options come last, so they can override petcam's.
        assert_eq!(args.last().unwrap(), "--hflip");
    }
}
