//! Loading backbone weights: PyTorch checkpoints (legacy and zip serialisation) and safetensors.
//!
//! candle's `.pth` reader handles only the zip format and refuses non-contiguous tensors; the
//! EfficientNet-Lite0 ImageNet checkpoint is in the legacy format and its conv kernels are stored
//! channels-last (permuted, not copied). Reading them while ignoring strides yields a network
//! that predicts one class for every photo, so every tensor here is gathered through its strides.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use super::pickle::{self, PickleError, Value};

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("cannot read weights file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a readable PyTorch checkpoint: {source}")]
    Pickle {
        path: PathBuf,
        #[source]
        source: PickleError,
    },
    #[error("{path}: {what}")]
    Format { path: PathBuf, what: String },
    #[error("{path}: cannot read zip archive: {source}")]
    Zip {
        path: PathBuf,
        #[source]
        source: zip::result::ZipError,
    },
    #[error("{path}: {source}")]
    Tensor {
        path: PathBuf,
        #[source]
        source: candle_core::Error,
    },
}

/// Every named tensor of a weights file, as contiguous CPU tensors.
pub type TensorMap = HashMap<String, Tensor>;

/// Reads `.pth` (legacy or zip) or `.safetensors`, chosen by the file's content, not its name.
pub fn load(path: &Path) -> Result<TensorMap, WeightsError> {
    load_with_sha256(path).map(|(tensors, _)| tensors)
}

/// [`load`], plus the SHA-256 (hex) of the file's bytes, which identifies the weights in the
/// feature cache key and in reports.
pub fn load_with_sha256(path: &Path) -> Result<(TensorMap, String), WeightsError> {
    let data = std::fs::read(path).map_err(|source| WeightsError::Io {
        path: path.to_owned(),
        source,
    })?;
    parse(path, &data).map(|w| (w.tensors, w.sha256))
}

/// A weights file's tensors, its safetensors metadata (empty for `.pth`) and its SHA-256.
#[derive(Debug)]
pub struct Weights {
    pub tensors: TensorMap,
    pub metadata: HashMap<String, String>,
    pub sha256: String,
}

/// SHA-256 of `data`, in hex.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// Reads the bytes of a `.pth` (legacy or zip) or `.safetensors` file read from `path`.
pub fn parse(path: &Path, data: &[u8]) -> Result<Weights, WeightsError> {
    let sha256 = sha256_hex(data);
    let mut metadata = HashMap::new();
    let tensors = if data.is_empty() {
        return Err(format_err(
            path,
            "file is empty (0 bytes); fetch it again with tools/fetch-backbone",
        ));
    } else if data.starts_with(b"PK\x03\x04") {
        load_zip_pth(path, data)
    } else if data.starts_with(&[0x80, 0x02]) {
        load_legacy_pth(path, data)
    } else if looks_like_safetensors(data) {
        if let Ok((_, m)) = safetensors::SafeTensors::read_metadata(data) {
            metadata = m.metadata().clone().unwrap_or_default();
        }
        candle_core::safetensors::load_buffer(data, &Device::Cpu).map_err(|source| {
            WeightsError::Tensor {
                path: path.to_owned(),
                source,
            }
        })
    } else if super::tflite::is_tflite(data) {
        Err(format_err(
            path,
            "a TensorFlow Lite model is read only for --backbone mobilenet-v2",
        ))
    } else {
        Err(format_err(
            path,
            "unknown weights format: expected a PyTorch .pth (legacy or zip), a .safetensors or \
             (for mobilenet-v2) a .tflite file",
        ))
    }?;
    Ok(Weights {
        tensors,
        metadata,
        sha256,
    })
}

fn format_err(path: &Path, what: impl Into<String>) -> WeightsError {
    WeightsError::Format {
        path: path.to_owned(),
        what: what.into(),
    }
}

fn looks_like_safetensors(data: &[u8]) -> bool {
    data.len() >= 10
        && u64::from_le_bytes(data[..8].try_into().unwrap()) < data.len() as u64
        && data[8] == b'{'
}

/// The element type of a PyTorch storage.
#[derive(Debug, Clone, Copy, PartialEq)]
enum StorageKind {
    F32,
    F64,
    I64,
}

impl StorageKind {
    fn from_class(name: &str) -> Option<Self> {
        match name {
            "FloatStorage" => Some(Self::F32),
            "DoubleStorage" => Some(Self::F64),
            "LongStorage" => Some(Self::I64),
            _ => None,
        }
    }

    fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F64 | Self::I64 => 8,
        }
    }
}

/// A tensor as the pickle describes it, before its storage bytes are known.
#[derive(Debug)]
struct TensorRef {
    name: String,
    storage_key: String,
    kind: StorageKind,
    offset: usize,
    size: Vec<usize>,
    stride: Vec<usize>,
}

fn load_legacy_pth(path: &Path, data: &[u8]) -> Result<TensorMap, WeightsError> {
    let pickle_err = |source| WeightsError::Pickle {
        path: path.to_owned(),
        source,
    };
    let mut pos = 0;
    let magic = pickle::read(data, &mut pos).map_err(pickle_err)?;
    // 0x1950a86a20f9469cfc6c, PyTorch's legacy magic number.
    const MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
    if magic != Value::BigInt(MAGIC.to_vec()) {
        return Err(format_err(
            path,
            "not a PyTorch legacy checkpoint (wrong magic number)",
        ));
    }
    let _protocol = pickle::read(data, &mut pos).map_err(pickle_err)?;
    let _sys_info = pickle::read(data, &mut pos).map_err(pickle_err)?;
    let state = pickle::read(data, &mut pos).map_err(pickle_err)?;
    let keys = pickle::read(data, &mut pos).map_err(pickle_err)?;
    let tensors = tensor_refs(path, state)?;

    // Storages follow in the order of `keys`: an 8-byte element count, then the raw elements.
    let kinds: HashMap<&str, StorageKind> = tensors
        .iter()
        .map(|t| (t.storage_key.as_str(), t.kind))
        .collect();
    let keys = keys
        .as_seq()
        .ok_or_else(|| format_err(path, "storage key list is not a list"))?;
    let mut storages: HashMap<String, &[u8]> = HashMap::new();
    for key in keys {
        let key = key
            .as_str()
            .ok_or_else(|| format_err(path, "storage key is not a string"))?;
        let kind = *kinds
            .get(key)
            .ok_or_else(|| format_err(path, format!("storage {key} is not used by any tensor")))?;
        let start = pos + 8;
        let count = data
            .get(pos..start)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
            .ok_or_else(|| truncated(path, key))?;
        let len = usize::try_from(count)
            .ok()
            .and_then(|c| c.checked_mul(kind.size()))
            .ok_or_else(|| format_err(path, format!("storage {key}: absurd size {count}")))?;
        // The count is read from the file: checked, so that a huge one is a truncation.
        let bytes = start
            .checked_add(len)
            .and_then(|end| data.get(start..end))
            .ok_or_else(|| truncated(path, key))?;
        storages.insert(key.to_owned(), bytes);
        pos = start + len;
    }
    materialise(path, tensors, |key| storages.get(key).map(|b| b.to_vec()))
}

fn truncated(path: &Path, key: &str) -> WeightsError {
    format_err(
        path,
        format!("file is truncated inside storage {key}; fetch it again with tools/fetch-backbone"),
    )
}

fn load_zip_pth(path: &Path, data: &[u8]) -> Result<TensorMap, WeightsError> {
    let zip_err = |source| WeightsError::Zip {
        path: path.to_owned(),
        source,
    };
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(data)).map_err(zip_err)?;
    let pkl_name = archive
        .file_names()
        .find(|n| n.ends_with("data.pkl"))
        .map(str::to_owned)
        .ok_or_else(|| format_err(path, "zip checkpoint has no data.pkl"))?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_owned();
    let read_entry =
        |archive: &mut zip::ZipArchive<_>, name: &str| -> Result<Vec<u8>, WeightsError> {
            let mut entry = archive.by_name(name).map_err(zip_err)?;
            // The size is what the entry's header claims; it is checked as the entry is read.
            let claimed = usize::try_from(entry.size()).unwrap_or(usize::MAX);
            let mut buf = Vec::with_capacity(claimed.min(data.len()));
            entry
                .read_to_end(&mut buf)
                .map_err(|source| WeightsError::Io {
                    path: path.to_owned(),
                    source,
                })?;
            Ok(buf)
        };
    let pkl = read_entry(&mut archive, &pkl_name)?;
    let state = pickle::read(&pkl, &mut 0).map_err(|source| WeightsError::Pickle {
        path: path.to_owned(),
        source,
    })?;
    let tensors = tensor_refs(path, state)?;
    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    for t in &tensors {
        if !storages.contains_key(&t.storage_key) {
            let bytes = read_entry(&mut archive, &format!("{prefix}data/{}", t.storage_key))?;
            storages.insert(t.storage_key.clone(), bytes);
        }
    }
    materialise(path, tensors, |key| storages.remove(key))
}

/// Finds the state dict (possibly nested under `state_dict` or `model`) and its tensors.
fn tensor_refs(path: &Path, state: Value) -> Result<Vec<TensorRef>, WeightsError> {
    let mut entries = match state {
        Value::Dict(d) => d,
        Value::Call(_, _) => Vec::new(), // an OrderedDict() that was never filled
        other => {
            return Err(format_err(
                path,
                format!("expected a state dict, found {}", kind_name(&other)),
            ))
        }
    };
    // Training checkpoints wrap the weights: {"state_dict": {...}, "epoch": ...}.
    for wrapper in ["state_dict", "model_state_dict", "model"] {
        if let Some(pos) = entries
            .iter()
            .position(|(k, v)| k.as_str() == Some(wrapper) && matches!(v, Value::Dict(_)))
        {
            if let (_, Value::Dict(inner)) = entries.swap_remove(pos) {
                entries = inner;
            }
            break;
        }
    }
    let mut out = Vec::new();
    for (k, v) in entries {
        let Some(name) = k.as_str().map(str::to_owned) else {
            continue;
        };
        if let Some(t) = parse_tensor(path, &name, v)? {
            out.push(t);
        }
    }
    if out.is_empty() {
        return Err(format_err(path, "the checkpoint holds no tensors"));
    }
    Ok(out)
}

fn kind_name(v: &Value) -> &'static str {
    match v {
        Value::Dict(_) => "a dict",
        Value::List(_) => "a list",
        Value::Tuple(_) => "a tuple",
        Value::Call(_, _) | Value::Build(_, _) => "an object",
        _ => "a scalar",
    }
}

/// `_rebuild_tensor_v2(storage, offset, size, stride, ...)`, possibly inside `_rebuild_parameter`.
fn parse_tensor(path: &Path, name: &str, v: Value) -> Result<Option<TensorRef>, WeightsError> {
    let Value::Call(callable, args) = v else {
        return Ok(None);
    };
    let Value::Global(module, func) = *callable else {
        return Ok(None);
    };
    let mut args = match *args {
        Value::Tuple(a) => a,
        _ => return Ok(None),
    };
    if module == "torch._utils" && func == "_rebuild_parameter" && !args.is_empty() {
        return parse_tensor(path, name, args.swap_remove(0));
    }
    if !(module == "torch._utils" && func == "_rebuild_tensor_v2") {
        return Ok(None);
    }
    let bad = |what: &str| format_err(path, format!("tensor {name}: {what}"));
    if args.len() < 4 {
        return Err(bad("_rebuild_tensor_v2 has fewer than 4 arguments"));
    }
    let Value::Persistent(pid) = &args[0] else {
        return Err(bad("storage is not a persistent reference"));
    };
    // ('storage', torch.FloatStorage, key, location, numel)
    let pid = pid
        .as_seq()
        .ok_or_else(|| bad("malformed storage reference"))?;
    let (class, key) = match pid {
        [_, Value::Global(_, class), key, ..] => (class, key),
        _ => return Err(bad("malformed storage reference")),
    };
    let kind = StorageKind::from_class(class)
        .ok_or_else(|| bad(&format!("unsupported storage type {class}")))?;
    let key = key
        .as_str()
        .ok_or_else(|| bad("storage key is not a string"))?;
    let ints = |v: &Value| -> Option<Vec<usize>> {
        v.as_seq()?
            .iter()
            .map(|x| x.as_int().and_then(|i| usize::try_from(i).ok()))
            .collect()
    };
    let offset = args[1]
        .as_int()
        .and_then(|i| usize::try_from(i).ok())
        .ok_or_else(|| bad("storage offset is not an integer"))?;
    let size = ints(&args[2]).ok_or_else(|| bad("size is not a tuple of integers"))?;
    let stride = ints(&args[3]).ok_or_else(|| bad("stride is not a tuple of integers"))?;
    if size.len() != stride.len() {
        return Err(bad("size and stride have different ranks"));
    }
    Ok(Some(TensorRef {
        name: name.to_owned(),
        storage_key: key.to_owned(),
        kind,
        offset,
        size,
        stride,
    }))
}

fn materialise(
    path: &Path,
    tensors: Vec<TensorRef>,
    mut storage: impl FnMut(&str) -> Option<Vec<u8>>,
) -> Result<TensorMap, WeightsError> {
    // Several tensors may share one storage; fetch each storage once.
    let mut cache: HashMap<String, Vec<u8>> = HashMap::new();
    let mut out = HashMap::with_capacity(tensors.len());
    for t in tensors {
        if !cache.contains_key(&t.storage_key) {
            let bytes = storage(&t.storage_key).ok_or_else(|| {
                format_err(
                    path,
                    format!("tensor {}: storage {} is missing", t.name, t.storage_key),
                )
            })?;
            cache.insert(t.storage_key.clone(), bytes);
        }
        let bytes = &cache[&t.storage_key];
        let numel = bytes.len() / t.kind.size();
        let index = strided_indices(&t.size, &t.stride, t.offset, numel).ok_or_else(|| {
            format_err(
                path,
                format!(
                    "tensor {}: size {:?} with stride {:?} at offset {} does not fit in its storage of {} elements",
                    t.name, t.size, t.stride, t.offset, numel
                ),
            )
        })?;
        let tensor = match t.kind {
            StorageKind::F32 => {
                let v: Vec<f32> = index.iter().map(|&i| read_f32(bytes, i)).collect();
                Tensor::from_vec(v, t.size.as_slice(), &Device::Cpu)
            }
            StorageKind::F64 => {
                let v: Vec<f32> = index.iter().map(|&i| read_f64(bytes, i) as f32).collect();
                Tensor::from_vec(v, t.size.as_slice(), &Device::Cpu)
            }
            StorageKind::I64 => {
                let v: Vec<i64> = index.iter().map(|&i| read_i64(bytes, i)).collect();
                Tensor::from_vec(v, t.size.as_slice(), &Device::Cpu)
            }
        }
        .map_err(|source| WeightsError::Tensor {
            path: path.to_owned(),
            source,
        })?;
        out.insert(t.name, tensor);
    }
    Ok(out)
}

fn read_f32(b: &[u8], i: usize) -> f32 {
    f32::from_le_bytes(b[4 * i..4 * i + 4].try_into().unwrap())
}

fn read_f64(b: &[u8], i: usize) -> f64 {
    f64::from_le_bytes(b[8 * i..8 * i + 8].try_into().unwrap())
}

fn read_i64(b: &[u8], i: usize) -> i64 {
    i64::from_le_bytes(b[8 * i..8 * i + 8].try_into().unwrap())
}

/// Storage indices of every element of a strided view, in row-major order of `size`; `None` if
/// the view reaches outside a storage of `numel` elements or has more elements than it.
///
/// Only a view that overlaps itself (a stride of 0, as `expand` makes) can have more elements
/// than its storage; PyTorch saves no weights so, and allowing it would let a few bytes of
/// pickle claim a tensor of any size.
fn strided_indices(
    size: &[usize],
    stride: &[usize],
    offset: usize,
    numel: usize,
) -> Option<Vec<usize>> {
    let count = size.iter().try_fold(1usize, |c, &n| c.checked_mul(n))?;
    if count == 0 {
        return Some(Vec::new());
    }
    if count > numel {
        return None;
    }
    // No dimension is 0 here; checked, since sizes and strides are read from the file.
    let last = size.iter().zip(stride).try_fold(offset, |last, (&n, &s)| {
        last.checked_add((n - 1).checked_mul(s)?)
    })?;
    if last >= numel {
        return None;
    }
    let mut out = Vec::with_capacity(count);
    let mut idx = vec![0usize; size.len()];
    for _ in 0..count {
        out.push(offset + idx.iter().zip(stride).map(|(&i, &s)| i * s).sum::<usize>());
        // Odometer increment, last dimension fastest.
        for d in (0..size.len()).rev() {
            idx[d] += 1;
            if idx[d] < size[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_indices_follow_strides() {
        // A 2x3 view of a channels-last 3x2 buffer: the transpose.
        assert_eq!(
            strided_indices(&[2, 3], &[1, 2], 0, 6).unwrap(),
            vec![0, 2, 4, 1, 3, 5]
        );
        assert_eq!(
            strided_indices(&[2, 2], &[2, 1], 2, 6).unwrap(),
            vec![2, 3, 4, 5]
        );
        assert!(strided_indices(&[2, 2], &[2, 1], 3, 6).is_none());
        assert_eq!(strided_indices(&[], &[], 1, 2).unwrap(), vec![1]);
    }

    /// A minimal legacy checkpoint, laid out exactly as `torch.save(..., _use_new_zipfile_serialization=False)`
    /// writes one: magic, protocol, sys info, state dict, storage keys, then the storages.
    fn legacy_file(stride: (u8, u8), elements: &[f32]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.");
        f.extend_from_slice(b"\x80\x02M\xe9\x03.");
        f.extend_from_slice(b"\x80\x02}q\x00.");
        // OrderedDict(w=_rebuild_tensor_v2(('storage', FloatStorage, '0', 'cpu', 6), 0, (2, 3), stride, ...))
        f.extend_from_slice(b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01X\x01\x00\x00\x00wq\x02ctorch._utils\n_rebuild_tensor_v2\nq\x03((X\x07\x00\x00\x00storageq\x04ctorch\nFloatStorage\nq\x05X\x01\x00\x00\x000q\x06X\x03\x00\x00\x00cpuq\x07K\x06tq\x08QK\x00K\x02K\x03\x86q\tK");
        f.push(stride.0);
        f.push(b'K');
        f.push(stride.1);
        f.extend_from_slice(b"\x86q\n\x89h\x00)Rq\x0btq\x0cRq\rs.");
        f.extend_from_slice(b"\x80\x02]q\x00X\x01\x00\x00\x000q\x01a.");
        f.extend_from_slice(&(elements.len() as u64).to_le_bytes());
        for e in elements {
            f.extend_from_slice(&e.to_le_bytes());
        }
        f
    }

    /// The same tensor as a zip checkpoint (`torch.save` since PyTorch 1.6).
    fn zip_file(stride: (u8, u8), elements: &[f32]) -> Vec<u8> {
        use std::io::Write;
        let legacy = legacy_file(stride, elements);
        // The state-dict pickle is the fourth of the legacy file's five pickles.
        let mut pos = 0;
        for _ in 0..3 {
            pickle::read(&legacy, &mut pos).unwrap();
        }
        let start = pos;
        pickle::read(&legacy, &mut pos).unwrap();
        let pkl = &legacy[start..pos];
        let raw: Vec<u8> = elements.iter().flat_map(|e| e.to_le_bytes()).collect();
        let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        zip.start_file("archive/data.pkl", opts).unwrap();
        zip.write_all(pkl).unwrap();
        zip.start_file("archive/data/0", opts).unwrap();
        zip.write_all(&raw).unwrap();
        zip.finish().unwrap().into_inner()
    }

    #[test]
    fn zip_reader_honours_strides() {
        let storage = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0];
        let f = write_tmp(&zip_file((1, 2), &storage));
        let w = load(f.path()).unwrap()["w"].to_vec2::<f32>().unwrap();
        assert_eq!(w, vec![vec![0.0, 2.0, 4.0], vec![1.0, 3.0, 5.0]]);
    }

    #[test]
    fn safetensors_are_read_by_content() {
        let t = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
        let dir = tempfile::tempdir().unwrap();
        // A misleading extension: the format is recognised from the bytes.
        let path = dir.path().join("weights.bin");
        candle_core::safetensors::save(&HashMap::from([("w".to_owned(), t)]), &path).unwrap();
        let w = load(&path).unwrap()["w"].to_vec2::<f32>().unwrap();
        assert_eq!(w, vec![vec![1.0, 2.0], vec![3.0, 4.0]]);
    }

    fn write_tmp(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, bytes).unwrap();
        f
    }

    #[test]
    fn legacy_reader_honours_strides() {
        let storage = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0];
        // Contiguous (3, 1) and transposed (1, 2) views of the same storage.
        let f = write_tmp(&legacy_file((3, 1), &storage));
        let w = load(f.path()).unwrap()["w"].to_vec2::<f32>().unwrap();
        assert_eq!(w, vec![vec![0.0, 1.0, 2.0], vec![3.0, 4.0, 5.0]]);
        let f = write_tmp(&legacy_file((1, 2), &storage));
        let w = load(f.path()).unwrap()["w"].to_vec2::<f32>().unwrap();
        assert_eq!(w, vec![vec![0.0, 2.0, 4.0], vec![1.0, 3.0, 5.0]]);
    }

    #[test]
    fn truncated_and_empty_files_are_clear_errors() {
        let full = legacy_file((3, 1), &[0.0; 6]);
        let f = write_tmp(&full[..full.len() - 5]);
        let err = load(f.path()).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
        let f = write_tmp(b"");
        assert!(load(f.path()).unwrap_err().to_string().contains("empty"));
        let f = write_tmp(b"hello world, not weights");
        assert!(load(f.path())
            .unwrap_err()
            .to_string()
            .contains("unknown weights format"));
    }

    #[test]
    fn a_storage_count_past_the_file_is_truncation_not_an_overflow() {
        let mut file = legacy_file((3, 1), &[0.0; 6]);
        // The count before the 6 elements: one that makes the end of the storage overflow.
        let at = file.len() - 6 * 4 - 8;
        file[at..at + 8].copy_from_slice(&(u64::MAX / 4 - 1).to_le_bytes());
        let err = parse(Path::new("w.pth"), &file).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
        file[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        let err = parse(Path::new("w.pth"), &file).unwrap_err().to_string();
        assert!(err.contains("absurd size"), "{err}");
    }

    #[test]
    fn a_view_with_more_elements_than_its_storage_is_refused() {
        // Size (2^31 - 1, 2^31 - 1) with strides (0, 0) over a storage of 6 floats: 2^62
        // elements, all in bounds.
        let file = legacy_file((0, 0), &[0.0; 6]);
        let size = b"K\x02K\x03\x86";
        let at = file.windows(size.len()).position(|w| w == size).unwrap();
        let mut huge = file[..at].to_vec();
        huge.extend_from_slice(b"J\xff\xff\xff\x7fJ\xff\xff\xff\x7f\x86");
        huge.extend_from_slice(&file[at + size.len()..]);
        let err = parse(Path::new("w.pth"), &huge).unwrap_err().to_string();
        assert!(err.contains("does not fit in its storage"), "{err}");
        assert!(strided_indices(&[usize::MAX, 2], &[1, 1], 0, 6).is_none());
        assert!(strided_indices(&[2, 2], &[usize::MAX, 1], 0, 6).is_none());
    }
}
