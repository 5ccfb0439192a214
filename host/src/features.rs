//! Running the frozen backbone over photos, with an on-disk cache.
//!
//! A feature vector depends only on the photo's bytes, the backbone's weights and the
//! preprocessing, so that triple is the cache key: a second run over the same photos (or a run
//! that adds a few photos) only extracts what it has not seen.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Tensor;
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::augment;
use crate::backbone::{Backbone, Tap};
use crate::dataset::{self, Sample};

/// Bumped whenever decoding or resizing changes in a way that changes the pixels.
const PREPROCESS_VERSION: &str = "decode-exif-rgb/resize-bilinear-aa/v1";

#[derive(Debug, thiserror::Error)]
pub enum FeatureError {
    #[error("backbone failed on {path}: {source}")]
    Backbone {
        path: PathBuf,
        #[source]
        source: candle_core::Error,
    },
    #[error("cannot write feature cache {path}: {source}; pass --cache-dir to use another folder")]
    Cache {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A photo that was not used, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Skipped {
    pub path: PathBuf,
    pub reason: String,
}

/// Features of the readable photos of a sample list, in the list's order.
#[derive(Debug, Clone, Default)]
pub struct FeatureSet {
    pub dim: usize,
    /// `len() * dim` values, row-major.
    pub features: Vec<f32>,
    pub labels: Vec<usize>,
    pub paths: Vec<PathBuf>,
    /// SHA-256 of each photo's bytes (the dataset digest is built from these).
    pub content_sha256: Vec<String>,
}

impl FeatureSet {
    /// Adds `other`'s rows after this set's.
    pub fn append(&mut self, other: &FeatureSet) {
        assert!(
            self.dim == other.dim || other.is_empty(),
            "feature sizes differ"
        );
        self.features.extend_from_slice(&other.features);
        self.labels.extend_from_slice(&other.labels);
        self.paths.extend_from_slice(&other.paths);
        self.content_sha256.extend_from_slice(&other.content_sha256);
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.features[i * self.dim..(i + 1) * self.dim]
    }
}

#[derive(Debug, Clone, Default)]
pub struct ExtractStats {
    pub cached: usize,
    pub computed: usize,
    pub skipped: Vec<Skipped>,
    pub seconds: f64,
    /// Throughput of decode + resize + backbone over the photos actually computed.
    pub images_per_s: Option<f64>,
}

/// Feature vectors on disk, one small file per (photo content, backbone, preprocessing).
#[derive(Debug, Clone)]
pub struct FeatureCache {
    dir: PathBuf,
}

impl FeatureCache {
    /// The cache of one backbone (weights and preprocessing) under `root`.
    pub fn new(root: &Path, backbone: &Backbone) -> Self {
        Self::at(root, backbone, Tap::Pooled)
    }

    /// The cache of what `backbone` has at `tap` under `root`.
    pub fn at(root: &Path, backbone: &Backbone, tap: Tap) -> Self {
        let mut h = Sha256::new();
        let tap = match tap {
            // Pooled features keep the key they had before taps existed.
            Tap::Pooled => String::new(),
            Tap::Block(i) => format!("block-input-{i}"),
        };
        for part in [
            backbone.name.as_str(),
            backbone.weights_sha256.as_str(),
            &backbone.input_size.to_string(),
            PREPROCESS_VERSION,
        ]
        .into_iter()
        .chain((!tap.is_empty()).then_some(tap.as_str()))
        {
            h.update(part.as_bytes());
            h.update([0]);
        }
        let key = hex::encode(h.finalize());
        Self {
            dir: root.join("features").join(&key[..16]),
        }
    }

    fn path(&self, content_sha: &str) -> PathBuf {
        self.dir
            .join(&content_sha[..2])
            .join(format!("{content_sha}.f32"))
    }

    fn get(&self, content_sha: &str, dim: usize) -> Option<Vec<f32>> {
        let bytes = std::fs::read(self.path(content_sha)).ok()?;
        // A cut-off entry (a run killed mid-write on a filesystem without atomic rename) is a miss.
        (bytes.len() == dim * 4).then(|| {
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect()
        })
    }

    fn put(&self, content_sha: &str, features: &[f32]) -> Result<(), FeatureError> {
        let path = self.path(content_sha);
        let err = |source| FeatureError::Cache {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(path.parent().unwrap()).map_err(err)?;
        let bytes: Vec<u8> = features.iter().flat_map(|f| f.to_le_bytes()).collect();
        // Write then rename, so a reader never sees half a file.
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, bytes).map_err(err)?;
        std::fs::rename(&tmp, &path).map_err(err)
    }
}

/// The default cache root: `$PETCAM_CACHE`, else `$XDG_CACHE_HOME/petcam`, else `~/.cache/petcam`.
pub fn default_cache_root() -> PathBuf {
    if let Some(p) = std::env::var_os("PETCAM_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(p).join("petcam");
    }
    std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache/petcam"))
        .unwrap_or_else(|| std::env::temp_dir().join("petcam-cache"))
}

/// Why a photo has no features: an unreadable photo is skipped, a backbone failure aborts.
enum Failure {
    Photo(String),
    Backbone(candle_core::Error),
}

/// What `backbone` has at `tap` for `n` RGB images (`n * size * size * 3` bytes).
fn forward(
    backbone: &Backbone,
    pixels: Vec<u8>,
    n: usize,
    size: u32,
    tap: Tap,
) -> candle_core::Result<Vec<Vec<f32>>> {
    let rgb = Tensor::from_vec(
        pixels,
        (n, size as usize, size as usize, 3),
        backbone.device(),
    )?;
    backbone.tap(&rgb, tap)?.to_vec2::<f32>()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Another view of a photo than the photo resized to the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// The augmented view `index` drawn by `policy` (see [`crate::augment`]).
    Augmented { policy: augment::Policy, index: u32 },
    /// The photo resized to the input, then flipped left to right: the second half of what a
    /// mirror-averaging model computes.
    Mirror,
}

impl View {
    /// The cache key of this view of the photo with content hash `sha`.
    fn key(&self, sha: &str) -> String {
        match self {
            View::Augmented { policy, index } => {
                let tag = sha256_hex(format!("{}/{}", policy.kind(), policy.seed).as_bytes());
                format!("{sha}-{}-{index}", &tag[..12])
            }
            View::Mirror => format!("{sha}-mirror"),
        }
    }
}

/// Extracts (or loads from the cache) the features of every readable photo in `samples`.
pub fn extract(
    backbone: &Backbone,
    samples: &[Sample],
    cache: Option<&FeatureCache>,
    batch_size: usize,
    what: &str,
) -> Result<(FeatureSet, ExtractStats), FeatureError> {
    extract_at(
        backbone,
        Tap::Pooled,
        samples,
        None,
        cache,
        batch_size,
        what,
    )
}

/// [`extract`] for `views` augmented views of each photo, drawn by `policy`: `views` rows per
/// readable photo, in order. Each view's features are cached under the photo, the policy (seed
/// and kind of view, versioned) and the view's index.
pub fn extract_augmented(
    backbone: &Backbone,
    samples: &[Sample],
    policy: augment::Policy,
    views: u32,
    cache: Option<&FeatureCache>,
    batch_size: usize,
    what: &str,
) -> Result<(FeatureSet, ExtractStats), FeatureError> {
    let repeated: Vec<Sample> = samples
        .iter()
        .flat_map(|s| std::iter::repeat_n(s.clone(), views as usize))
        .collect();
    let which: Vec<Option<View>> = samples
        .iter()
        .flat_map(|_| (0..views).map(|index| Some(View::Augmented { policy, index })))
        .collect();
    extract_views(
        backbone,
        Tap::Pooled,
        &repeated,
        &which,
        cache,
        batch_size,
        what,
    )
}

/// What `backbone` has at `tap` for every readable photo in `samples`, each photo as it is or
/// as its augmented `view`. Rows come in the order of `samples`.
pub fn extract_at(
    backbone: &Backbone,
    tap: Tap,
    samples: &[Sample],
    view: Option<View>,
    cache: Option<&FeatureCache>,
    batch_size: usize,
    what: &str,
) -> Result<(FeatureSet, ExtractStats), FeatureError> {
    extract_views(
        backbone,
        tap,
        samples,
        &vec![view; samples.len()],
        cache,
        batch_size,
        what,
    )
}

/// The network input for one sample: the photo resized, or an augmented view of it.
fn load(
    sample: &Sample,
    view: Option<View>,
    sha: Option<&str>,
    size: u32,
) -> Result<image::RgbImage, String> {
    match (view, sha) {
        (Some(View::Augmented { policy, index }), Some(sha)) => {
            let img = dataset::load_rgb(&sample.path).map_err(|e| e.to_string())?;
            let p = augment::ViewParams::draw(policy, sha, index, img.width(), img.height());
            Ok(augment::apply(&img, &p, size))
        }
        (Some(View::Mirror), _) => {
            let mut img =
                dataset::load_input(&sample.path, size, size).map_err(|e| e.to_string())?;
            image::imageops::flip_horizontal_in_place(&mut img);
            Ok(img)
        }
        _ => dataset::load_input(&sample.path, size, size).map_err(|e| e.to_string()),
    }
}

fn extract_views(
    backbone: &Backbone,
    tap: Tap,
    samples: &[Sample],
    views: &[Option<View>],
    cache: Option<&FeatureCache>,
    batch_size: usize,
    what: &str,
) -> Result<(FeatureSet, ExtractStats), FeatureError> {
    let start = Instant::now();
    let dim = backbone.tap_dim(tap);
    let size = backbone.input_size as u32;

    // Hash every photo (reading is cheap next to decoding) and look each hash up in the cache.
    let hashed: Vec<Result<String, String>> = samples
        .par_iter()
        .map(|s| {
            std::fs::read(&s.path)
                .map(|b| sha256_hex(&b))
                .map_err(|e| format!("cannot read: {e}"))
        })
        .collect();
    let keys: Vec<Option<String>> = hashed
        .iter()
        .zip(views)
        .map(|(h, v)| {
            h.as_ref()
                .ok()
                .map(|sha| v.map_or_else(|| sha.clone(), |v| v.key(sha)))
        })
        .collect();
    let mut rows: Vec<Option<Vec<f32>>> = keys
        .par_iter()
        .map(|k| k.as_ref().and_then(|k| cache.and_then(|c| c.get(k, dim))))
        .collect();
    let mut stats = ExtractStats {
        cached: rows.iter().filter(|r| r.is_some()).count(),
        ..Default::default()
    };
    let mut failed: Vec<Option<String>> =
        hashed.iter().map(|h| h.as_ref().err().cloned()).collect();
    let todo: Vec<usize> = (0..samples.len())
        .filter(|&i| rows[i].is_none() && failed[i].is_none())
        .collect();

    if !todo.is_empty() {
        let bar = ProgressBar::new(todo.len() as u64).with_style(
            ProgressStyle::with_template(
                "{msg:>10} [{bar:30}] {pos}/{len} photos, {per_sec}, eta {eta}",
            )
            .unwrap()
            .progress_chars("=> "),
        );
        bar.set_message(what.to_owned());
        let compute_start = Instant::now();
        // On CPU, one photo per task and one task per core: each forward pass then runs on one
        // thread with its activations in that core's cache, which beats splitting every layer
        // of a large batch across cores. A GPU wants large batches instead.
        let per_forward = if backbone.device().is_cpu() {
            1
        } else {
            batch_size.max(1)
        };
        let group = if per_forward == 1 { 64 } else { per_forward };
        for batch in todo.chunks(group) {
            let results: Vec<(usize, Result<Vec<f32>, Failure>)> = if per_forward == 1 {
                batch
                    .par_iter()
                    .map(|&i| {
                        let r = load(&samples[i], views[i], hashed[i].as_deref().ok(), size)
                            .map_err(Failure::Photo)
                            .and_then(|img| {
                                forward(backbone, img.into_raw(), 1, size, tap)
                                    .map(|mut f| f.remove(0))
                                    .map_err(Failure::Backbone)
                            });
                        bar.inc(1);
                        (i, r)
                    })
                    .collect()
            } else {
                let decoded: Vec<Result<image::RgbImage, String>> = batch
                    .par_iter()
                    .map(|&i| load(&samples[i], views[i], hashed[i].as_deref().ok(), size))
                    .collect();
                let mut ok = Vec::new();
                let mut pixels = Vec::new();
                let mut out = Vec::new();
                for (&i, d) in batch.iter().zip(decoded) {
                    match d {
                        Ok(img) => {
                            ok.push(i);
                            pixels.extend_from_slice(img.as_raw());
                        }
                        Err(reason) => out.push((i, Err(Failure::Photo(reason)))),
                    }
                }
                if !ok.is_empty() {
                    let feats =
                        forward(backbone, pixels, ok.len(), size, tap).map_err(|source| {
                            FeatureError::Backbone {
                                path: samples[ok[0]].path.clone(),
                                source,
                            }
                        })?;
                    out.extend(ok.into_iter().zip(feats).map(|(i, f)| (i, Ok(f))));
                }
                bar.inc(batch.len() as u64);
                out
            };
            for (i, r) in results {
                match r {
                    Ok(f) => {
                        if let (Some(c), Some(key)) = (cache, &keys[i]) {
                            c.put(key, &f)?;
                        }
                        rows[i] = Some(f);
                        stats.computed += 1;
                    }
                    Err(Failure::Backbone(source)) => {
                        return Err(FeatureError::Backbone {
                            path: samples[i].path.clone(),
                            source,
                        })
                    }
                    Err(Failure::Photo(reason)) => {
                        tracing::warn!("skipping {}: {reason}", samples[i].path.display());
                        failed[i] = Some(reason);
                    }
                }
            }
        }
        bar.finish_and_clear();
        let secs = compute_start.elapsed().as_secs_f64();
        if stats.computed > 0 && secs > 0.0 {
            stats.images_per_s = Some(stats.computed as f64 / secs);
        }
    }

    let mut set = FeatureSet {
        dim,
        ..Default::default()
    };
    for (i, s) in samples.iter().enumerate() {
        match (rows[i].take(), &hashed[i]) {
            (Some(f), Ok(sha)) => {
                set.features.extend_from_slice(&f);
                set.labels.push(s.label);
                set.paths.push(s.path.clone());
                set.content_sha256.push(sha.clone());
            }
            _ => {
                let reason = failed[i].take().unwrap_or_else(|| "not decoded".into());
                if hashed[i].is_err() {
                    tracing::warn!("skipping {}: {reason}", s.path.display());
                }
                stats.skipped.push(Skipped {
                    path: s.path.clone(),
                    reason,
                })
            }
        }
    }
    stats.seconds = start.elapsed().as_secs_f64();
    Ok((set, stats))
}

/// A digest of the dataset as trained on: class names, and for each used photo its split, class
/// and content hash. Renaming or moving the folder keeps it; changing any photo changes it.
pub fn dataset_digest(classes: &[String], train: &FeatureSet, val: &FeatureSet) -> String {
    let mut h = Sha256::new();
    for c in classes {
        h.update(c.as_bytes());
        h.update([0]);
    }
    for (split, set) in [("train", train), ("val", val)] {
        let mut entries: Vec<(usize, &str)> = set
            .labels
            .iter()
            .zip(&set.content_sha256)
            .map(|(&l, s)| (l, s.as_str()))
            .collect();
        entries.sort();
        for (label, sha) in entries {
            h.update(format!("{split}/{label}/{sha}\n").as_bytes());
        }
    }
    format!("sha256:{}", hex::encode(h.finalize()))
}
