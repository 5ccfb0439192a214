//! Helpers for the end-to-end tests in `tests/`: locating the built binaries and the read-only
//! reference data in `../shared`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub mod vm;

/// A binary of the workspace, built by `cargo test --workspace` next to the test executable.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target folder");
    let bin = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "{} is not built; run the tests with `cargo test --workspace`",
        bin.display()
    );
    bin
}

/// The workspace's `../shared` item, or `None` (with a message) when it is absent. Under CI
/// (`CI` set) a missing item fails the test instead: CI must never pass by skipping.
pub fn shared(relative: &str) -> Option<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared")
        .join(relative);
    if path.exists() {
        return Some(path);
    }
    let msg = format!("../shared/{relative} is missing");
    if std::env::var_os("CI").is_some() {
        panic!("{msg} (CI is set, so this is a failure, not a skip)");
    }
    eprintln!("skipping: {msg}");
    None
}

/// Runs a command and returns its output; panics with both streams if it cannot start.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    eprintln!("$ {cmd:?}\n{}", String::from_utf8_lossy(&out.stderr));
    out
}

/// Copies the first `n` files (by name order) of `src` into `dst`.
pub fn copy_first(src: &Path, dst: &Path, n: usize) {
    std::fs::create_dir_all(dst).unwrap();
    let mut files: Vec<PathBuf> = std::fs::read_dir(src)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    for f in files.into_iter().take(n) {
        std::fs::copy(&f, dst.join(f.file_name().unwrap())).unwrap();
    }
}

/// The Kaggle photos and the EfficientNet-Lite0 checkpoint from `../shared`, or `None` (see
/// [`shared`]).
pub fn photos_and_weights() -> Option<(PathBuf, PathBuf)> {
    Some((
        shared("datasets/cats-vs-dogs")?,
        shared("backbones/efficientnet-lite0-57934424.pth")?,
    ))
}

/// `petcam train-and-export` on `photos` into `out`, with its feature cache in `cache`.
pub fn train_and_export(photos: &Path, weights: &Path, out: &Path, cache: &Path) -> Command {
    let mut cmd = Command::new(binary("petcam"));
    cmd.arg("train-and-export")
        .arg("--data")
        .arg(photos)
        .arg("--weights")
        .arg(weights)
        .arg("--out")
        .arg(out)
        .arg("--cache-dir")
        .arg(cache);
    cmd
}

/// A model trained in `dir` on the first 6 training photos of each class (into
/// `dir/photos/cat` and `dir/photos/dog`) at 128 px, several times faster than a 30 fps
/// stream and a second per inference under emulation, and still confident on most photos.
/// Returns the model's path.
pub fn train_tiny_model(data: &Path, weights: &Path, dir: &Path) -> PathBuf {
    let photos = dir.join("photos");
    for class in ["cat", "dog"] {
        copy_first(&data.join("train").join(class), &photos.join(class), 6);
    }
    let out = dir.join("out");
    let mut cmd = train_and_export(&photos, weights, &out, &dir.join("cache"));
    cmd.args([
        "--val-fraction",
        "0.3",
        "--latency-runs",
        "1",
        "--input-size",
        "128",
    ]);
    let done = run(&mut cmd);
    assert!(done.status.success(), "train-and-export failed");
    out.join("model.onnx")
}

/// A small copy of the Kaggle photos in the `train/` + `val/` layout: the first `train` and
/// `val` photos of each class.
pub fn photo_subset(data: &Path, dst: &Path, train: usize, val: usize) {
    for class in ["cat", "dog"] {
        for (split, n) in [("train", train), ("val", val)] {
            copy_first(
                &data.join(split).join(class),
                &dst.join(split).join(class),
                n,
            );
        }
    }
}
