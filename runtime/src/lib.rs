//! An exported petcam model, run with tract, exactly as both ends run it: the host scores and
//! verifies a model with this crate, the device classifies its frames with it.
//!
//! - [`infer`]: loading a model ([`infer::LoadOptions`]), its metadata, predictions, latency
//!   and per-node profile.
//! - [`rewrite`]: the load-time pass that puts petcam's operators into the graph.
//! - [`ops`]: those operators, one per file, on `petcam_shared`'s kernels.
//! - [`preprocess`]: photo decoding (EXIF, any colour model) and the resize to the input.
//! - [`threads`]: how an inference uses the cores.

pub mod infer;
pub mod ops;
pub mod preprocess;
pub mod rewrite;
pub mod threads;

/// Peak resident memory of this process so far (Linux `VmHWM`), in MB; `None` elsewhere.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
