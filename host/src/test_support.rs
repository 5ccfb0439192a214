//! Locating the read-only reference data in `../shared` for tests and benchmarks.

use std::path::PathBuf;

/// The workspace's `../shared` folder (weights, photos, golden outputs), if present.
pub fn shared_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared");
    dir.is_dir().then(|| dir.canonicalize().unwrap_or(dir))
}

/// A file or folder under `../shared`. When it is absent the calling test should return early:
/// this prints why; under CI (`CI` set) a missing fixture is a failure instead, so CI can never
/// pass by skipping.
pub fn shared_fixture(relative: &str) -> Option<PathBuf> {
    let found = shared_dir()
        .map(|d| d.join(relative))
        .filter(|p| p.exists());
    if found.is_none() {
        let msg = format!("../shared/{relative} is missing");
        if std::env::var_os("CI").is_some() {
            panic!("{msg} (CI is set, so this is a failure, not a skip)");
        }
        eprintln!("skipping: {msg}");
    }
    found
}

/// The largest absolute difference between two tensors of the same number of elements.
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    let b = b.reshape(a.shape()).expect("same number of elements");
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("an f32 difference")
}
