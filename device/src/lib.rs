//! petcam on the camera computer: running the exported model with tract.
//!
//! Frames come from a [`source`], are decoded and resized by [`preprocess`], classified by
//! [`infer`], turned into decisions by [`decide`] and into pin levels by [`actuate`]; [`service`]
//! runs them as `petcam-device run` does, with [`telemetry`] and [`update`]s over the link. The host
//! uses [`infer`] and [`preprocess`] too, so it scores a model exactly as the device runs it.

pub mod actuate;
pub mod agent;
pub mod decide;
pub mod depthwise;
pub mod firmware;
pub mod infer;
pub mod preprocess;
pub mod retry;
pub mod service;
pub mod source;
pub mod state_dir;
pub mod telemetry;
pub mod threads;
pub mod update;

/// Peak resident memory of this process so far (Linux `VmHWM`), in MB; `None` elsewhere.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
