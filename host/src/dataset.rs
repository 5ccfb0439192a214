//! Photo folders: finding the photos and their classes, splitting them, and decoding one photo
//! into the RGB bytes the backbone sees.
//!
//! Two layouts are accepted: `DIR/<class>/*` (a deterministic validation split by file-name hash)
//! and `DIR/train/<class>/*` + `DIR/val/<class>/*`. A photo that cannot be decoded is never fatal:
//! the caller records it as skipped and goes on, because one bad file among thousands is normal.

use std::path::{Path, PathBuf};

pub use petcam_runtime::preprocess::{decode_rgb, load_input, load_rgb, resize, PhotoError};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("cannot read folder {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds {found} class folder(s){names}; at least two are needed, e.g. {path}/cat/ and {path}/dog/")]
    TooFewClasses {
        path: PathBuf,
        found: usize,
        names: String,
    },
    #[error("class folder {path} holds no readable image; add photos (JPEG, PNG, WebP or BMP) or remove the folder")]
    EmptyClass { path: PathBuf },
    #[error("{train} and {val} have different class folders ({train_classes:?} vs {val_classes:?}); give both the same set")]
    ClassMismatch {
        train: PathBuf,
        val: PathBuf,
        train_classes: Vec<String>,
        val_classes: Vec<String>,
    },
    #[error("--val-fraction must be in (0, 1), got {0}")]
    BadFraction(f32),
}

/// How the split between training and validation photos was made.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Split {
    /// `DIR/train/<class>` and `DIR/val/<class>`.
    Folders,
    /// `DIR/<class>`, a file goes to validation when the hash of its name falls below the fraction.
    Hash { val_fraction: f32 },
}

/// One photo and the index of its class.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub path: PathBuf,
    pub label: usize,
}

#[derive(Debug, Clone)]
pub struct Dataset {
    pub root: PathBuf,
    pub split: Split,
    /// Class names, sorted; a label is an index into this.
    pub classes: Vec<String>,
    /// The folder each class's training photos came from, for error messages.
    pub class_dirs: Vec<PathBuf>,
    pub train: Vec<Sample>,
    pub val: Vec<Sample>,
}

impl Dataset {
    /// Finds the classes and photos under `root`. Photos are not decoded here.
    pub fn discover(root: &Path, val_fraction: f32) -> Result<Self, DatasetError> {
        if !(val_fraction > 0.0 && val_fraction < 1.0) {
            return Err(DatasetError::BadFraction(val_fraction));
        }
        let train_dir = root.join("train");
        let val_dir = root.join("val");
        if train_dir.is_dir() && val_dir.is_dir() {
            let (classes, train) = class_folder(&train_dir)?;
            let (val_classes, val) = class_folder(&val_dir)?;
            if classes != val_classes {
                return Err(DatasetError::ClassMismatch {
                    train: train_dir,
                    val: val_dir,
                    train_classes: classes,
                    val_classes,
                });
            }
            let class_dirs = classes.iter().map(|c| train_dir.join(c)).collect();
            Ok(Self {
                root: root.to_owned(),
                split: Split::Folders,
                classes,
                class_dirs,
                train,
                val,
            })
        } else {
            let (classes, all) = class_folder(root)?;
            let (val, train): (Vec<_>, Vec<_>) = all
                .into_iter()
                .partition(|s| in_validation(&s.path, val_fraction));
            let class_dirs = classes.iter().map(|c| root.join(c)).collect();
            Ok(Self {
                root: root.to_owned(),
                split: Split::Hash { val_fraction },
                classes,
                class_dirs,
                train,
                val,
            })
        }
    }
}

/// Reads `DIR/<class>/*`: class names (sorted) and every regular, non-hidden file. At least two
/// classes, each with at least one file.
pub fn class_folder(dir: &Path) -> Result<(Vec<String>, Vec<Sample>), DatasetError> {
    let listed = list_classes(dir)?;
    if listed.len() < 2 {
        return Err(DatasetError::TooFewClasses {
            path: dir.to_owned(),
            found: listed.len(),
            names: if listed.is_empty() {
                String::new()
            } else {
                format!(" ({})", listed[0].0)
            },
        });
    }
    let mut classes = Vec::new();
    let mut samples = Vec::new();
    for (label, (class, files)) in listed.into_iter().enumerate() {
        if files.is_empty() {
            return Err(DatasetError::EmptyClass {
                path: dir.join(&class),
            });
        }
        classes.push(class);
        samples.extend(files.into_iter().map(|path| Sample { path, label }));
    }
    Ok((classes, samples))
}

/// The class folders of `dir` (sorted by name), each with its files (sorted).
pub fn list_classes(dir: &Path) -> Result<Vec<(String, Vec<PathBuf>)>, DatasetError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| DatasetError::Io { path, source }
    };
    let visible = |e: &std::fs::DirEntry| !e.file_name().to_string_lossy().starts_with('.');
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        if !visible(&entry) || !entry.path().is_dir() {
            continue;
        }
        let class_dir = entry.path();
        let mut files = Vec::new();
        for f in std::fs::read_dir(&class_dir).map_err(io(&class_dir))? {
            let f = f.map_err(io(&class_dir))?;
            if visible(&f) && f.path().is_file() {
                files.push(f.path());
            }
        }
        files.sort();
        out.push((entry.file_name().to_string_lossy().into_owned(), files));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// The validation split depends only on the file's name, so it survives moving the folder, adding
/// photos, or running on another machine.
fn in_validation(path: &Path, val_fraction: f32) -> bool {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let h = Sha256::digest(name.as_bytes());
    let x = u64::from_le_bytes(h[..8].try_into().unwrap());
    (x as f64 / u64::MAX as f64) < val_fraction as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn tree(classes: &[(&str, &[&str])]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        // Discovery lists files and never decodes them; decoding is tested in petcam-device.
        let jpg = b"\xFF\xD8 photo \xFF\xD9";
        for (class, files) in classes {
            fs::create_dir_all(dir.path().join(class)).unwrap();
            for f in *files {
                fs::write(dir.path().join(class).join(f), jpg).unwrap();
            }
        }
        dir
    }

    #[test]
    fn hash_split_is_deterministic_and_near_the_fraction() {
        let names: Vec<String> = (0..400).map(|i| format!("p{i}.jpg")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let dir = tree(&[("cat", &refs), ("dog", &refs)]);
        let a = Dataset::discover(dir.path(), 0.2).unwrap();
        let b = Dataset::discover(dir.path(), 0.2).unwrap();
        assert_eq!(a.classes, vec!["cat", "dog"]);
        assert_eq!(a.train, b.train);
        assert_eq!(a.val, b.val);
        assert_eq!(a.train.len() + a.val.len(), 800);
        let frac = a.val.len() as f64 / 800.0;
        assert!((0.15..0.25).contains(&frac), "val fraction {frac}");
        // The split depends on names only: the same file name is in val for both classes.
        let val_names = |label| -> Vec<_> {
            a.val
                .iter()
                .filter(|s| s.label == label)
                .map(|s| s.path.file_name().unwrap().to_owned())
                .collect()
        };
        assert_eq!(val_names(0), val_names(1));
        // A larger fraction only moves photos into validation.
        let c = Dataset::discover(dir.path(), 0.4).unwrap();
        assert!(a.val.iter().all(|s| c.val.contains(s)));
    }

    #[test]
    fn train_val_folders_are_used_as_given() {
        let dir = tempfile::tempdir().unwrap();
        let jpg = b"\xFF\xD8 photo \xFF\xD9";
        for split in ["train", "val"] {
            for class in ["b", "a"] {
                let d = dir.path().join(split).join(class);
                fs::create_dir_all(&d).unwrap();
                fs::write(d.join("x.jpg"), jpg).unwrap();
            }
        }
        let ds = Dataset::discover(dir.path(), 0.2).unwrap();
        assert_eq!(ds.split, Split::Folders);
        assert_eq!(ds.classes, vec!["a", "b"]);
        assert_eq!(ds.train.len(), 2);
        assert_eq!(ds.val.len(), 2);
        fs::create_dir_all(dir.path().join("val/c")).unwrap();
        fs::write(dir.path().join("val/c/y.jpg"), jpg).unwrap();
        assert!(matches!(
            Dataset::discover(dir.path(), 0.2),
            Err(DatasetError::ClassMismatch { .. })
        ));
    }

    #[test]
    fn too_few_classes_and_empty_class_name_the_folder() {
        let dir = tree(&[("cat", &["a.jpg"])]);
        let err = Dataset::discover(dir.path(), 0.2).unwrap_err();
        assert!(matches!(err, DatasetError::TooFewClasses { found: 1, .. }));
        assert!(err.to_string().contains(&dir.path().display().to_string()));
        fs::create_dir_all(dir.path().join("dog")).unwrap();
        let err = Dataset::discover(dir.path(), 0.2).unwrap_err();
        assert!(matches!(err, DatasetError::EmptyClass { ref path } if path.ends_with("dog")));
        assert!(matches!(
            Dataset::discover(dir.path(), 1.5),
            Err(DatasetError::BadFraction(_))
        ));
    }
}
