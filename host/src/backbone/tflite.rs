//! Reads a TensorFlow Lite model (a FlatBuffer with TFLite's schema) into plain Rust values:
//! tensors with their shapes, types, quantization and data, and operators with their options.
//!
//! tract cannot load Google's quantized MobileNetV2 (its TFLite front end refuses the quantized
//! ADD), and all petcam needs is the weights and the wiring, so the file is read here. The
//! reader is bounds-checked at every step: a truncated or corrupt file is an error naming what
//! was being read, never a panic.
//!
//! FlatBuffers in brief: a table starts with a signed offset back to its vtable; the vtable
//! lists, per field, the field's offset inside the table (0: absent, use the default).
//! References to tables, vectors and strings are unsigned offsets relative to where they are
//! stored; a vector is a `u32` length followed by its elements.

use std::path::Path;

/// A corrupt, truncated or unsupported file.
#[derive(Debug, thiserror::Error)]
pub enum TfliteError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("not a TFLite model: {0}")]
    Format(String),
}

fn bad(what: impl Into<String>) -> TfliteError {
    TfliteError::Format(what.into())
}

type Result<T> = std::result::Result<T, TfliteError>;

/// Whether `data` starts like a TFLite FlatBuffer (file identifier `TFL3` at byte 4).
pub fn is_tflite(data: &[u8]) -> bool {
    data.get(4..8) == Some(b"TFL3")
}

/// Element types of TFLite tensors (schema `TensorType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorType {
    F32,
    I32,
    U8,
    I64,
    I8,
    Other(u8),
}

impl TensorType {
    fn from_code(code: u8) -> Self {
        match code {
            0 => Self::F32,
            2 => Self::I32,
            3 => Self::U8,
            4 => Self::I64,
            9 => Self::I8,
            other => Self::Other(other),
        }
    }
}

/// Affine quantization: `real = scale * (q - zero_point)`, per tensor or per channel along
/// `dimension`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Quantization {
    pub scale: Vec<f32>,
    pub zero_point: Vec<i64>,
    pub dimension: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: TensorType,
    /// Index into [`TfliteModel::buffers`]; buffer 0 is the empty sentinel.
    pub buffer: usize,
    pub quantization: Option<Quantization>,
}

/// TensorFlow's padding: `Same` pads so that output = ceil(input / stride), the extra row and
/// column at the bottom and right.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    Same,
    Valid,
}

/// Activations fused into an operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    None,
    Relu,
    Relu6,
    Other(u8),
}

impl Activation {
    fn from_code(code: u8) -> Self {
        match code {
            0 => Self::None,
            1 => Self::Relu,
            3 => Self::Relu6,
            other => Self::Other(other),
        }
    }
}

/// An operator, with the options petcam reads.
#[derive(Debug, Clone, PartialEq)]
pub enum OpKind {
    Conv2d {
        padding: Padding,
        stride: (usize, usize),
        activation: Activation,
    },
    DepthwiseConv2d {
        padding: Padding,
        stride: (usize, usize),
        depth_multiplier: usize,
        activation: Activation,
    },
    Add {
        activation: Activation,
    },
    AveragePool2d,
    Reshape,
    Softmax,
    FullyConnected,
    /// Any other builtin operator, by its schema code.
    Other(i32),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Operator {
    pub kind: OpKind,
    /// Tensor indices; -1 marks an absent optional input.
    pub inputs: Vec<i32>,
    pub outputs: Vec<i32>,
}

/// The first subgraph of a TFLite model and its buffers.
#[derive(Debug, Clone)]
pub struct TfliteModel {
    pub tensors: Vec<TensorInfo>,
    pub operators: Vec<Operator>,
    pub inputs: Vec<i32>,
    pub outputs: Vec<i32>,
    pub buffers: Vec<Vec<u8>>,
}

impl TfliteModel {
    pub fn load(path: &Path) -> Result<Self> {
        let data = std::fs::read(path).map_err(|source| TfliteError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&data)
    }

    pub fn parse(data: &[u8]) -> Result<Self> {
        let fb = Fb { buf: data };
        if !is_tflite(data) {
            return Err(bad("no TFL3 file identifier at byte 4"));
        }
        let model = fb.root()?;
        let codes: Vec<i32> = fb
            .tables(model, 1, "operator_codes")?
            .into_iter()
            .map(|c| {
                // Old files only have the 1-byte code; newer ones the 4-byte one.
                let old = fb
                    .scalar::<1>(c, 0, "deprecated_builtin_code")?
                    .map_or(0, |b| b[0] as i8);
                let new = fb
                    .scalar::<4>(c, 3, "builtin_code")?
                    .map_or(0, i32::from_le_bytes);
                Ok(new.max(i32::from(old)))
            })
            .collect::<Result<_>>()?;
        let buffers = fb
            .tables(model, 4, "buffers")?
            .into_iter()
            .map(|b| Ok(fb.bytes(b, 0, "buffer data")?.unwrap_or_default()))
            .collect::<Result<Vec<_>>>()?;
        // Buffers are copied out: many that name the same bytes could otherwise claim far more
        // memory than the file has. A converter writes each buffer once.
        let copied = buffers
            .iter()
            .map(|b| b.len())
            .fold(0usize, usize::saturating_add);
        if copied > data.len() {
            return Err(bad(format!(
                "buffers hold {copied} bytes, more than the file's {}",
                data.len()
            )));
        }
        let buffers: Vec<Vec<u8>> = buffers.into_iter().map(<[u8]>::to_vec).collect();
        let subgraphs = fb.tables(model, 2, "subgraphs")?;
        let graph = *subgraphs.first().ok_or_else(|| bad("no subgraph"))?;
        let tensors = fb
            .tables(graph, 0, "tensors")?
            .into_iter()
            .map(|t| fb.tensor(t))
            .collect::<Result<Vec<_>>>()?;
        let operators = fb
            .tables(graph, 3, "operators")?
            .into_iter()
            .map(|o| fb.operator(o, &codes))
            .collect::<Result<Vec<_>>>()?;
        for t in &tensors {
            if t.buffer >= buffers.len() {
                return Err(bad(format!("tensor {} names buffer {}", t.name, t.buffer)));
            }
        }
        Ok(Self {
            inputs: fb.ints(graph, 1, "subgraph inputs")?,
            outputs: fb.ints(graph, 2, "subgraph outputs")?,
            tensors,
            operators,
            buffers,
        })
    }

    /// The tensor's values as floats: dequantized with its scale and zero point (per channel
    /// along the quantized dimension), or read as they are for f32. `None` for a tensor
    /// without data (an activation).
    pub fn dequantized(&self, tensor: usize) -> Result<Option<Vec<f32>>> {
        let t = self
            .tensors
            .get(tensor)
            .ok_or_else(|| bad(format!("no tensor {tensor}")))?;
        let data = &self.buffers[t.buffer];
        if data.is_empty() {
            return Ok(None);
        }
        let count = t
            .shape
            .iter()
            .try_fold(1usize, |c, &d| c.checked_mul(d))
            .ok_or_else(|| bad(format!("tensor {}: shape {:?} overflows", t.name, t.shape)))?;
        let values: Vec<f32> = match t.dtype {
            TensorType::F32 => data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            TensorType::U8 | TensorType::I8 | TensorType::I32 => {
                let q = t
                    .quantization
                    .as_ref()
                    .filter(|q| !q.scale.is_empty())
                    .ok_or_else(|| {
                        bad(format!("tensor {} is quantized without a scale", t.name))
                    })?;
                let raw: Vec<i64> = match t.dtype {
                    TensorType::U8 => data.iter().map(|&v| i64::from(v)).collect(),
                    TensorType::I8 => data.iter().map(|&v| i64::from(v as i8)).collect(),
                    _ => data
                        .chunks_exact(4)
                        .map(|b| i64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])))
                        .collect(),
                };
                // Elements per step of the quantized dimension (row-major shapes).
                // Saturating: with a dimension of 0 the others may overflow (and the value
                // count check below fails anyway).
                let inner = t
                    .shape
                    .iter()
                    .skip(q.dimension.saturating_add(1))
                    .fold(1usize, |c, &d| c.saturating_mul(d));
                let channels = t.shape.get(q.dimension).copied().unwrap_or(1);
                raw.iter()
                    .enumerate()
                    .map(|(i, &v)| {
                        let c = if q.scale.len() > 1 {
                            (i / inner.max(1)) % channels.max(1)
                        } else {
                            0
                        };
                        let scale = *q.scale.get(c).unwrap_or(&q.scale[0]);
                        let zero = *q.zero_point.get(c).or(q.zero_point.first()).unwrap_or(&0);
                        // A zero point is read from the file: saturating, not overflowing.
                        scale * v.saturating_sub(zero) as f32
                    })
                    .collect()
            }
            other => {
                return Err(bad(format!(
                    "tensor {} has type {other:?}, which petcam does not read",
                    t.name
                )))
            }
        };
        if values.len() != count {
            return Err(bad(format!(
                "tensor {} has {} values for shape {:?}",
                t.name,
                values.len(),
                t.shape
            )));
        }
        Ok(Some(values))
    }
}

/// Bounds-checked reads of a FlatBuffer.
struct Fb<'a> {
    buf: &'a [u8],
}

impl<'a> Fb<'a> {
    fn read<const N: usize>(&self, at: usize, what: &str) -> Result<[u8; N]> {
        self.buf
            .get(at..at.checked_add(N).ok_or_else(|| bad(what))?)
            .map(|s| s.try_into().expect("length checked"))
            .ok_or_else(|| bad(format!("{what}: offset {at} is past the end of the file")))
    }

    fn u32_at(&self, at: usize, what: &str) -> Result<usize> {
        Ok(u32::from_le_bytes(self.read::<4>(at, what)?) as usize)
    }

    fn root(&self) -> Result<usize> {
        self.u32_at(0, "root table")
    }

    /// Where field `field` of the table at `table` is stored; `None` when absent.
    fn field(&self, table: usize, field: usize, what: &str) -> Result<Option<usize>> {
        let soffset = i32::from_le_bytes(self.read::<4>(table, what)?);
        let vtable = (table as i64 - i64::from(soffset)) as usize;
        let vtable_len = u16::from_le_bytes(self.read::<2>(vtable, what)?) as usize;
        let slot = 4 + 2 * field;
        if slot + 2 > vtable_len {
            return Ok(None);
        }
        let offset = u16::from_le_bytes(self.read::<2>(vtable + slot, what)?) as usize;
        Ok((offset != 0).then_some(table + offset))
    }

    fn scalar<const N: usize>(
        &self,
        table: usize,
        field: usize,
        what: &str,
    ) -> Result<Option<[u8; N]>> {
        self.field(table, field, what)?
            .map(|at| self.read::<N>(at, what))
            .transpose()
    }

    /// The object a reference field points to.
    fn target(&self, table: usize, field: usize, what: &str) -> Result<Option<usize>> {
        self.field(table, field, what)?
            .map(|at| Ok(at + self.u32_at(at, what)?))
            .transpose()
    }

    /// A vector field: where its elements start and how many there are.
    fn vector(&self, table: usize, field: usize, what: &str) -> Result<Option<(usize, usize)>> {
        let Some(v) = self.target(table, field, what)? else {
            return Ok(None);
        };
        let len = self.u32_at(v, what)?;
        Ok(Some((v + 4, len)))
    }

    fn tables(&self, table: usize, field: usize, what: &str) -> Result<Vec<usize>> {
        let Some((start, len)) = self.vector(table, field, what)? else {
            return Ok(Vec::new());
        };
        (0..len)
            .map(|i| {
                let at = start + 4 * i;
                Ok(at + self.u32_at(at, what)?)
            })
            .collect()
    }

    fn bytes(&self, table: usize, field: usize, what: &str) -> Result<Option<&'a [u8]>> {
        let Some((start, len)) = self.vector(table, field, what)? else {
            return Ok(None);
        };
        start
            .checked_add(len)
            .and_then(|end| self.buf.get(start..end))
            .map(Some)
            .ok_or_else(|| bad(format!("{what}: {len} bytes at {start} are past the end")))
    }

    fn ints(&self, table: usize, field: usize, what: &str) -> Result<Vec<i32>> {
        let Some((start, len)) = self.vector(table, field, what)? else {
            return Ok(Vec::new());
        };
        (0..len)
            .map(|i| Ok(i32::from_le_bytes(self.read::<4>(start + 4 * i, what)?)))
            .collect()
    }

    fn string(&self, table: usize, field: usize, what: &str) -> Result<String> {
        Ok(self
            .bytes(table, field, what)?
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_default())
    }

    fn int_or(&self, table: usize, field: usize, default: i32, what: &str) -> Result<i32> {
        Ok(self
            .scalar::<4>(table, field, what)?
            .map_or(default, i32::from_le_bytes))
    }

    fn byte_or(&self, table: usize, field: usize, default: u8, what: &str) -> Result<u8> {
        Ok(self
            .scalar::<1>(table, field, what)?
            .map_or(default, |b| b[0]))
    }

    fn tensor(&self, t: usize) -> Result<TensorInfo> {
        let name = self.string(t, 3, "tensor name")?;
        let shape = self
            .ints(t, 0, "tensor shape")?
            .into_iter()
            .map(|d| usize::try_from(d).map_err(|_| bad(format!("tensor {name}: dimension {d}"))))
            .collect::<Result<Vec<_>>>()?;
        let quantization = match self.target(t, 4, "quantization")? {
            None => None,
            Some(q) => {
                let scale = match self.vector(q, 2, "scale")? {
                    None => Vec::new(),
                    Some((start, len)) => (0..len)
                        .map(|i| Ok(f32::from_le_bytes(self.read::<4>(start + 4 * i, "scale")?)))
                        .collect::<Result<_>>()?,
                };
                let zero_point = match self.vector(q, 3, "zero point")? {
                    None => Vec::new(),
                    Some((start, len)) => (0..len)
                        .map(|i| {
                            Ok(i64::from_le_bytes(
                                self.read::<8>(start + 8 * i, "zero point")?,
                            ))
                        })
                        .collect::<Result<_>>()?,
                };
                let dimension = self.int_or(q, 6, 0, "quantized dimension")?;
                Some(Quantization {
                    scale,
                    zero_point,
                    dimension: usize::try_from(dimension)
                        .map_err(|_| bad("quantized dimension"))?,
                })
            }
        };
        Ok(TensorInfo {
            dtype: TensorType::from_code(self.byte_or(t, 1, 0, "tensor type")?),
            buffer: self.int_or(t, 2, 0, "tensor buffer")? as u32 as usize,
            name,
            shape,
            quantization,
        })
    }

    fn operator(&self, o: usize, codes: &[i32]) -> Result<Operator> {
        let index = self.int_or(o, 0, 0, "opcode index")? as u32 as usize;
        let code = *codes
            .get(index)
            .ok_or_else(|| bad(format!("operator code {index} of {}", codes.len())))?;
        let options = self.target(o, 4, "builtin options")?;
        let padding = |opt: usize| -> Result<Padding> {
            Ok(match self.byte_or(opt, 0, 0, "padding")? {
                0 => Padding::Same,
                _ => Padding::Valid,
            })
        };
        let stride = |opt: usize| -> Result<(usize, usize)> {
            let w = self.int_or(opt, 1, 1, "stride w")?;
            let h = self.int_or(opt, 2, 1, "stride h")?;
            Ok((h.max(1) as usize, w.max(1) as usize))
        };
        let kind = match (code, options) {
            (3, Some(opt)) => OpKind::Conv2d {
                padding: padding(opt)?,
                stride: stride(opt)?,
                activation: Activation::from_code(self.byte_or(opt, 3, 0, "activation")?),
            },
            (4, Some(opt)) => OpKind::DepthwiseConv2d {
                padding: padding(opt)?,
                stride: stride(opt)?,
                depth_multiplier: self.int_or(opt, 3, 1, "depth multiplier")?.max(1) as usize,
                activation: Activation::from_code(self.byte_or(opt, 4, 0, "activation")?),
            },
            (0, opt) => OpKind::Add {
                activation: match opt {
                    Some(opt) => Activation::from_code(self.byte_or(opt, 0, 0, "activation")?),
                    None => Activation::None,
                },
            },
            (1, _) => OpKind::AveragePool2d,
            (9, _) => OpKind::FullyConnected,
            (22, _) => OpKind::Reshape,
            (25, _) => OpKind::Softmax,
            (3 | 4, None) => return Err(bad(format!("convolution without options (code {code})"))),
            (other, _) => OpKind::Other(other),
        };
        Ok(Operator {
            kind,
            inputs: self.ints(o, 1, "operator inputs")?,
            outputs: self.ints(o, 2, "operator outputs")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_that_is_not_tflite_or_is_cut_short_is_an_error_not_a_panic() {
        assert!(TfliteModel::parse(b"").is_err());
        assert!(TfliteModel::parse(b"\x10\0\0\0TFL3").is_err());
        assert!(TfliteModel::parse(&[0xff; 64]).is_err());
        let mut fake = vec![0u8; 64];
        fake[4..8].copy_from_slice(b"TFL3");
        fake[0] = 200; // root table past the end
        assert!(TfliteModel::parse(&fake).is_err());
    }

    /// Inputs under `fuzz/regressions` that once crashed the reader or made it allocate without
    /// bound.
    const ALIASED_BUFFERS: &[u8] =
        include_bytes!("../../../fuzz/regressions/tflite-aliased-buffers");
    const SHAPE_OVERFLOW: &[u8] = include_bytes!("../../../fuzz/regressions/tflite-shape-overflow");
    const ZERO_POINT_OVERFLOW: &[u8] =
        include_bytes!("../../../fuzz/regressions/tflite-zero-point-overflow");

    #[test]
    fn buffers_that_name_the_same_bytes_cannot_claim_more_than_the_file() {
        // 500 buffers, all the same 1024 bytes, in a file of 3 KiB.
        let err = TfliteModel::parse(ALIASED_BUFFERS).unwrap_err();
        assert!(err.to_string().contains("more than the file"), "{err}");
    }

    #[test]
    fn an_overflowing_shape_or_zero_point_is_an_error_or_a_value_not_a_panic() {
        let model = TfliteModel::parse(SHAPE_OVERFLOW).unwrap();
        let err = model.dequantized(0).unwrap_err();
        assert!(err.to_string().contains("overflows"), "{err}");
        // A zero point of i64::MIN: the value saturates.
        let model = TfliteModel::parse(ZERO_POINT_OVERFLOW).unwrap();
        assert_eq!(model.dequantized(0).unwrap().unwrap().len(), 1);
    }

    #[test]
    fn the_fuzz_seed_reads() {
        let model = TfliteModel::parse(include_bytes!("../../../fuzz/seeds/tflite/conv-dw-add-fc"))
            .unwrap();
        assert_eq!(model.tensors.len(), 6);
        assert_eq!(model.operators.len(), 6);
        assert_eq!(model.dequantized(1).unwrap().unwrap(), vec![1.5, -0.5]);
    }
}
