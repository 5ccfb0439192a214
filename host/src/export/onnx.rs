//! Writing backbone + head as one ONNX graph, from Rust, with standard operators only (opset 13).
//!
//! The graph takes the camera's RGB bytes as they are (`image`: u8 `[1, H, W, 3]`); the cast,
//! normalisation and NHWC to NCHW transpose are its first nodes, so no device can feed it
//! differently normalised input. The output is `probabilities` (softmax inside the graph).
//! With mirror averaging the graph also flips the image left to right, runs it through the same
//! weights and averages both probabilities: one input, one output, as without it.

use std::collections::HashMap;
use std::path::Path;

use prost::Message;
use tract_onnx::pb::{
    self, attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto::dimension,
    type_proto, AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto,
    StringStringEntryProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};

use super::calibrate::{Calibration, CalibrationError, HEAD_MATMUL};
use super::quantize::{affine_u8, conv_int8, per_channel_int8, QuantizeForm};
use crate::backbone::{Activation, Backbone, Conv};
use crate::head::HeadWeights;
use petcam_shared::metadata;

pub const OPSET: i64 = 13;
pub const INPUT_NAME: &str = "image";
pub const OUTPUT_NAME: &str = "probabilities";

#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    #[error("cannot read a weight tensor for export: {0}")]
    Tensor(#[from] candle_core::Error),
    #[error(transparent)]
    Calibration(#[from] CalibrationError),
    #[error("head expects {head} features but the backbone gives {backbone}")]
    HeadMismatch { head: usize, backbone: usize },
    #[error("cannot write {path}: {source}")]
    Write {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Builds nodes and initializers with generated, unique names.
struct GraphBuilder {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    counter: usize,
    form: QuantizeForm,
    /// Tensors already in the graph, by what they hold (prefix, type, dims, bytes): a second
    /// pass over the backbone (the mirror image) reuses the first pass's weights, so the file
    /// holds them once.
    known: HashMap<(String, i32, Vec<i64>, Vec<u8>), String>,
    /// DequantizeLinear outputs by their (shared) inputs: weight, scale, zero point.
    dequantized: HashMap<[String; 3], String>,
}

fn attr_int(name: &str, i: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i,
        ..Default::default()
    }
}

fn attr_ints(name: &str, ints: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Ints as i32,
        ints: ints.to_vec(),
        ..Default::default()
    }
}

fn value_info(name: &str, elem: DataType, dims: &[i64]) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: elem as i32,
                shape: Some(TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|&d| pb::tensor_shape_proto::Dimension {
                            value: Some(dimension::Value::DimValue(d)),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

impl GraphBuilder {
    fn fresh(&mut self, prefix: &str) -> String {
        self.counter += 1;
        format!("{prefix}_{}", self.counter)
    }

    /// An initializer, or the name of an identical one already in the graph.
    fn initializer(
        &mut self,
        prefix: &str,
        data_type: DataType,
        dims: &[usize],
        raw: Vec<u8>,
    ) -> String {
        let dims: Vec<i64> = dims.iter().map(|&d| d as i64).collect();
        let key = (prefix.to_owned(), data_type as i32, dims, raw);
        if let Some(name) = self.known.get(&key) {
            return name.clone();
        }
        let name = self.fresh(prefix);
        self.initializers.push(TensorProto {
            name: name.clone(),
            dims: key.2.clone(),
            data_type: data_type as i32,
            raw_data: key.3.clone(),
            ..Default::default()
        });
        self.known.insert(key, name.clone());
        name
    }

    fn constant_f32(&mut self, prefix: &str, dims: &[usize], values: &[f32]) -> String {
        let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializer(prefix, DataType::Float, dims, raw)
    }

    fn constant_i8(&mut self, prefix: &str, dims: &[usize], values: &[i8]) -> String {
        let raw = values.iter().map(|&v| v as u8).collect();
        self.initializer(prefix, DataType::Int8, dims, raw)
    }

    fn constant_u8(&mut self, prefix: &str, value: u8) -> String {
        self.initializer(prefix, DataType::Uint8, &[], vec![value])
    }

    fn constant_i32(&mut self, prefix: &str, values: &[i32]) -> String {
        let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializer(prefix, DataType::Int32, &[values.len()], raw)
    }

    /// A weight tensor whose first dimension is the output channel, stored as the export's
    /// quantization form asks; the returned name always carries float values.
    fn weight(&mut self, prefix: &str, dims: &[usize], values: &[f32]) -> String {
        match self.form {
            QuantizeForm::None => self.constant_f32(prefix, dims, values),
            QuantizeForm::Int8Weights | QuantizeForm::Int8 => {
                let (q, scales) = per_channel_int8(values, dims[0]);
                let q = self.constant_i8(&format!("{prefix}_int8"), dims, &q);
                let scale = self.constant_f32(&format!("{prefix}_scale"), &[dims[0]], &scales);
                let zero =
                    self.constant_i8(&format!("{prefix}_zero"), &[dims[0]], &vec![0; dims[0]]);
                // Its inputs are shared by content, so they name the weight: one
                // DequantizeLinear per weight, whichever pass asks for it.
                let inputs = [q, scale, zero];
                if let Some(name) = self.dequantized.get(&inputs) {
                    return name.clone();
                }
                let name = self.node(
                    "DequantizeLinear",
                    &[&inputs[0], &inputs[1], &inputs[2]],
                    vec![attr_int("axis", 0)],
                    None,
                );
                self.dequantized.insert(inputs, name.clone());
                name
            }
        }
    }

    fn node(
        &mut self,
        op: &str,
        inputs: &[&str],
        attributes: Vec<AttributeProto>,
        output: Option<&str>,
    ) -> String {
        let out = output
            .map(str::to_owned)
            .unwrap_or_else(|| self.fresh(&op.to_lowercase()));
        let name = self.fresh(op);
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.clone()],
            name,
            op_type: op.into(),
            attribute: attributes,
            ..Default::default()
        });
        out
    }

    fn conv(&mut self, x: &str, conv: &Conv, prefix: &str) -> Result<String, OnnxError> {
        let dims = conv.weight.dims().to_vec();
        let w = conv.weight.flatten_all()?.to_vec1::<f32>()?;
        let b = conv.bias.to_vec1::<f32>()?;
        let w = self.weight(&format!("{prefix}_weight"), &dims, &w);
        let b = self.constant_f32(&format!("{prefix}_bias"), &[dims[0]], &b);
        let y = self.node("Conv", &[x, &w, &b], conv_attributes(conv), None);
        Ok(match conv.activation {
            Activation::Linear => y,
            Activation::Relu6 => {
                let lo = self.constant_f32("relu6_min", &[], &[0.0]);
                let hi = self.constant_f32("relu6_max", &[], &[6.0]);
                self.node("Clip", &[&y, &lo, &hi], vec![], None)
            }
        })
    }
}

fn conv_attributes(conv: &Conv) -> Vec<AttributeProto> {
    let dims = conv.weight.dims();
    let p = conv.padding;
    let s = conv.stride as i64;
    vec![
        attr_ints("kernel_shape", &[dims[2] as i64, dims[3] as i64]),
        attr_ints("strides", &[s, s]),
        // ONNX order: all begins, then all ends.
        attr_ints(
            "pads",
            &[p.top as i64, p.left as i64, p.bottom as i64, p.right as i64],
        ),
        attr_ints("dilations", &[1, 1]),
        attr_int("group", conv.groups as i64),
    ]
}

/// A u8 tensor of the int8 graph with its scale and zero point (as values and initializers).
#[derive(Clone)]
struct QTensor {
    name: String,
    scale: f32,
    scale_name: String,
    zero_name: String,
}

impl GraphBuilder {
    fn affine(&mut self, prefix: &str, scale: f32, zero: u8) -> (String, String) {
        (
            self.constant_f32(&format!("{prefix}_scale"), &[], &[scale]),
            self.constant_u8(&format!("{prefix}_zero_point"), zero),
        )
    }

    fn quantize(&mut self, x: &str, range: (f32, f32), prefix: &str) -> QTensor {
        let (scale, zero) = affine_u8(range.0, range.1);
        let (scale_name, zero_name) = self.affine(prefix, scale, zero);
        let name = self.node(
            "QuantizeLinear",
            &[x, &scale_name, &zero_name],
            vec![],
            None,
        );
        QTensor {
            name,
            scale,
            scale_name,
            zero_name,
        }
    }

    fn dequantize(&mut self, x: &QTensor) -> String {
        self.node(
            "DequantizeLinear",
            &[&x.name, &x.scale_name, &x.zero_name],
            vec![],
            None,
        )
    }

    /// QLinearConv: u8 input, int8 per-channel weights, int32 bias, u8 output covering
    /// `out_range`. The activation needs no node: ReLU6 outputs are calibrated within
    /// `[0, 6]`, so the u8 output saturates exactly where the clip would.
    fn qconv(
        &mut self,
        x: &QTensor,
        conv: &Conv,
        out_range: (f32, f32),
        prefix: &str,
    ) -> Result<QTensor, OnnxError> {
        let dims = conv.weight.dims().to_vec();
        let cout = dims[0];
        let (q, w_scales, bias) = conv_int8(
            &conv.weight.flatten_all()?.to_vec1::<f32>()?,
            &conv.bias.to_vec1::<f32>()?,
            x.scale,
        );
        let w = self.constant_i8(&format!("{prefix}_weight_int8"), &dims, &q);
        let w_scale = self.constant_f32(&format!("{prefix}_weight_scale"), &[cout], &w_scales);
        let w_zero = self.constant_i8(&format!("{prefix}_weight_zero"), &[cout], &vec![0; cout]);
        let b = self.constant_i32(&format!("{prefix}_bias_int32"), &bias);
        let range = match conv.activation {
            Activation::Relu6 => (0.0, out_range.1.min(6.0)),
            Activation::Linear => out_range,
        };
        let (scale, zero) = affine_u8(range.0, range.1);
        let (scale_name, zero_name) = self.affine(prefix, scale, zero);
        let name = self.node(
            "QLinearConv",
            &[
                &x.name,
                &x.scale_name,
                &x.zero_name,
                &w,
                &w_scale,
                &w_zero,
                &scale_name,
                &zero_name,
                &b,
            ],
            conv_attributes(conv),
            None,
        );
        Ok(QTensor {
            name,
            scale,
            scale_name,
            zero_name,
        })
    }
}

/// Static int8 graph from the float input `x` (NCHW, normalised) or, when the normalisation
/// maps bytes onto an exact u8 affine form, from the image bytes themselves.
fn int8_body(
    g: &mut GraphBuilder,
    image: &str,
    backbone: &Backbone,
    head: &HeadWeights,
    cal: &Calibration,
) -> Result<String, OnnxError> {
    let n = backbone.normalization;
    // x = (p - mean) / std is the u8 affine form scale 1/std, zero point mean when mean is a
    // whole byte value: the camera's bytes are then the quantized input, no arithmetic needed.
    let mut x = if n.mean.fract() == 0.0 && (0.0..=255.0).contains(&n.mean) && n.std > 0.0 {
        let (scale_name, zero_name) = g.affine("input", 1.0 / n.std, n.mean as u8);
        let name = g.node(
            "Transpose",
            &[image],
            vec![attr_ints("perm", &[0, 3, 1, 2])],
            None,
        );
        QTensor {
            name,
            scale: 1.0 / n.std,
            scale_name,
            zero_name,
        }
    } else {
        let f = float_input(g, image, backbone);
        let range = ((0.0 - n.mean) / n.std, (255.0 - n.mean) / n.std);
        g.quantize(&f, range, "input")
    };

    x = g.qconv(&x, &backbone.stem, cal.range("stem")?, "stem")?;
    for (i, block) in backbone.blocks.iter().enumerate() {
        let input = x.clone();
        if let Some(e) = &block.expand {
            let p = format!("block{i}_expand");
            x = g.qconv(&x, e, cal.range(&p)?, &p)?;
        }
        let p = format!("block{i}_depthwise");
        x = g.qconv(&x, &block.depthwise, cal.range(&p)?, &p)?;
        let p = format!("block{i}_project");
        x = g.qconv(&x, &block.project, cal.range(&p)?, &p)?;
        if block.residual {
            // No standard quantized Add: dequantize both sides, add in float, requantize.
            let a = g.dequantize(&x);
            let b = g.dequantize(&input);
            let sum = g.node("Add", &[&a, &b], vec![], None);
            let p = format!("block{i}_add");
            x = g.quantize(&sum, cal.range(&p)?, &p);
        }
    }
    x = g.qconv(&x, &backbone.head, cal.range("head_conv")?, "head_conv")?;
    // No standard quantized pooling either.
    let f = g.dequantize(&x);
    let f = g.node("GlobalAveragePool", &[&f], vec![], None);
    let f = g.node("Flatten", &[&f], vec![attr_int("axis", 1)], None);
    let f = g.quantize(&f, cal.range("features")?, "features");

    // Classifier: QLinearMatMul with per-column (per-class) weight scales, bias added in float.
    let (q, w_scales) = per_channel_int8(&head.weight, head.classes);
    let mut qt = vec![0i8; q.len()];
    for c in 0..head.classes {
        for k in 0..head.features {
            qt[k * head.classes + c] = q[c * head.features + k];
        }
    }
    let w = g.constant_i8(
        "classifier_weight_int8",
        &[head.features, head.classes],
        &qt,
    );
    let w_scale = g.constant_f32("classifier_weight_scale", &[head.classes], &w_scales);
    let w_zero = g.constant_i8(
        "classifier_weight_zero",
        &[head.classes],
        &vec![0; head.classes],
    );
    let (lo, hi) = cal.range(HEAD_MATMUL)?;
    let (scale, zero) = affine_u8(lo, hi);
    let (y_scale, y_zero) = g.affine("classifier", scale, zero);
    let logits = g.node(
        "QLinearMatMul",
        &[
            &f.name,
            &f.scale_name,
            &f.zero_name,
            &w,
            &w_scale,
            &w_zero,
            &y_scale,
            &y_zero,
        ],
        vec![],
        None,
    );
    let logits = g.dequantize(&QTensor {
        name: logits,
        scale,
        scale_name: y_scale,
        zero_name: y_zero,
    });
    let b = g.constant_f32("classifier_bias", &[head.classes], &head.bias);
    Ok(g.node("Add", &[&logits, &b], vec![], None))
}

/// u8 NHWC image to normalised float NCHW: Cast, Sub, Div, Transpose.
fn float_input(g: &mut GraphBuilder, image: &str, backbone: &Backbone) -> String {
    let x = g.node(
        "Cast",
        &[image],
        vec![attr_int("to", DataType::Float as i64)],
        None,
    );
    let mean = g.constant_f32("mean", &[], &[backbone.normalization.mean]);
    let x = g.node("Sub", &[&x, &mean], vec![], None);
    let std = g.constant_f32("std", &[], &[backbone.normalization.std]);
    let x = g.node("Div", &[&x, &std], vec![], None);
    g.node(
        "Transpose",
        &[&x],
        vec![attr_ints("perm", &[0, 3, 1, 2])],
        None,
    )
}

/// The float (or int8-weight) graph body, from the image to the logits.
fn float_body(
    g: &mut GraphBuilder,
    image: &str,
    backbone: &Backbone,
    head: &HeadWeights,
) -> Result<String, OnnxError> {
    let mut x = float_input(g, image, backbone);
    x = g.conv(&x, &backbone.stem, "stem")?;
    for (i, block) in backbone.blocks.iter().enumerate() {
        let input = x.clone();
        if let Some(e) = &block.expand {
            x = g.conv(&x, e, &format!("block{i}_expand"))?;
        }
        x = g.conv(&x, &block.depthwise, &format!("block{i}_depthwise"))?;
        x = g.conv(&x, &block.project, &format!("block{i}_project"))?;
        if block.residual {
            x = g.node("Add", &[&x, &input], vec![], None);
        }
    }
    x = g.conv(&x, &backbone.head, "head_conv")?;
    x = g.node("GlobalAveragePool", &[&x], vec![], None);
    x = g.node("Flatten", &[&x], vec![attr_int("axis", 1)], None);
    let w = g.weight(
        "classifier_weight",
        &[head.classes, head.features],
        &head.weight,
    );
    let b = g.constant_f32("classifier_bias", &[head.classes], &head.bias);
    Ok(g.node("Gemm", &[&x, &w, &b], vec![attr_int("transB", 1)], None))
}

/// How the graph stores its numbers, with what each form needs: int8 arithmetic needs the
/// activation ranges of a calibration.
#[derive(Debug, Clone, Copy)]
pub enum Form<'a> {
    Float,
    Int8Weights,
    Int8(&'a Calibration),
}

impl<'a> Form<'a> {
    /// The form `--quantize` names; `calibration` is used by `int8` only.
    pub fn new(form: QuantizeForm, calibration: &'a Calibration) -> Self {
        match form {
            QuantizeForm::None => Self::Float,
            QuantizeForm::Int8Weights => Self::Int8Weights,
            QuantizeForm::Int8 => Self::Int8(calibration),
        }
    }

    pub fn quantize_form(self) -> QuantizeForm {
        match self {
            Self::Float => QuantizeForm::None,
            Self::Int8Weights => QuantizeForm::Int8Weights,
            Self::Int8(_) => QuantizeForm::Int8,
        }
    }
}

/// What [`build_model`] builds.
#[derive(Debug, Clone, Copy)]
pub struct GraphSpec<'a> {
    pub form: Form<'a>,
    /// The output is the mean of the probabilities of the image and of its mirror image.
    pub mirror_average: bool,
}

/// The model's input as `petcam.input` records it.
pub fn input_spec(backbone: &Backbone, mirror_average: bool) -> metadata::InputSpec {
    metadata::InputSpec::rgb_bytes(
        INPUT_NAME,
        backbone.input_size as u32,
        backbone.normalization.mean,
        backbone.normalization.std,
        mirror_average,
    )
}

/// The complete model: graph plus `metadata_props` (key, value) in the given order, built as
/// `spec` says.
pub fn build_model(
    backbone: &Backbone,
    head: &HeadWeights,
    spec: GraphSpec<'_>,
    metadata: &[(String, String)],
) -> Result<ModelProto, OnnxError> {
    let GraphSpec {
        form,
        mirror_average,
    } = spec;
    if head.features != backbone.feature_dim() {
        return Err(OnnxError::HeadMismatch {
            head: head.features,
            backbone: backbone.feature_dim(),
        });
    }
    let size = backbone.input_size as i64;
    let mut g = GraphBuilder {
        nodes: Vec::new(),
        initializers: Vec::new(),
        counter: 0,
        form: form.quantize_form(),
        known: HashMap::new(),
        dequantized: HashMap::new(),
    };

    let body = |g: &mut GraphBuilder, image: &str| match form {
        Form::Int8(calibration) => int8_body(g, image, backbone, head, calibration),
        Form::Float | Form::Int8Weights => float_body(g, image, backbone, head),
    };
    let logits = body(&mut g, INPUT_NAME)?;
    if mirror_average {
        // The mirror image is a Gather of the columns in reverse order, on the bytes, so it is
        // exactly the flipped frame. It runs through a second pass of batch 1 over the same
        // weights (tract runs a batch of two through 1x1 convolutions 4x slower, not 2x).
        let columns: Vec<i32> = (0..size as i32).rev().collect();
        let columns = g.constant_i32("mirror_columns", &columns);
        let mirrored = g.node(
            "Gather",
            &[INPUT_NAME, &columns],
            vec![attr_int("axis", 2)],
            None,
        );
        let mirror_logits = body(&mut g, &mirrored)?;
        let both = g.node(
            "Concat",
            &[&logits, &mirror_logits],
            vec![attr_int("axis", 0)],
            None,
        );
        let p = g.node("Softmax", &[&both], vec![attr_int("axis", 1)], None);
        g.node(
            "ReduceMean",
            &[&p],
            vec![attr_ints("axes", &[0]), attr_int("keepdims", 1)],
            Some(OUTPUT_NAME),
        );
    } else {
        g.node(
            "Softmax",
            &[&logits],
            vec![attr_int("axis", 1)],
            Some(OUTPUT_NAME),
        );
    }

    let graph = GraphProto {
        name: format!("petcam-{}", backbone.name),
        node: g.nodes,
        initializer: g.initializers,
        input: vec![value_info(INPUT_NAME, DataType::Uint8, &[1, size, size, 3])],
        output: vec![value_info(
            OUTPUT_NAME,
            DataType::Float,
            &[1, head.classes as i64],
        )],
        ..Default::default()
    };
    Ok(ModelProto {
        // IR version 7 is what opset 13 shipped with; every current runtime reads it.
        ir_version: 7,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
        }],
        producer_name: "petcam".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(graph),
        metadata_props: metadata
            .iter()
            .map(|(k, v)| StringStringEntryProto {
                key: k.clone(),
                value: v.clone(),
            })
            .collect(),
        ..Default::default()
    })
}

/// Encodes and writes the model atomically (a temporary file renamed into place), so a crash
/// never leaves a half-written model where a valid one is expected.
pub fn write_model(model: &ModelProto, path: &Path) -> Result<u64, OnnxError> {
    let bytes = model.encode_to_vec();
    let err = |source| OnnxError::Write {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("onnx.partial");
    std::fs::write(&tmp, &bytes).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)?;
    Ok(bytes.len() as u64)
}
