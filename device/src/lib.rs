//! petcam on the camera computer: running the exported model with tract.
//!
//! The library holds what the host shares with the device: the model runtime ([`infer`]) and
//! the photo decoding and resize ([`preprocess`]).

pub mod infer;
pub mod preprocess;

/// Peak resident memory of this process so far (Linux `VmHWM`), in MB; `None` elsewhere.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
