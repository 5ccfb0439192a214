//! Writing backbone + head as one ONNX graph, from Rust, with standard operators only (opset 13).
//!
//! The graph takes the camera's RGB bytes as they are (`image`: u8 `[1, H, W, 3]`); the cast,
//! normalisation and NHWC to NCHW transpose are its first nodes, so no device can feed it
//! differently normalised input. The output is `probabilities` (softmax inside the graph).

use std::path::Path;

use prost::Message;
use tract_onnx::pb::{
    self, attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto::dimension,
    type_proto, AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto,
    StringStringEntryProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};

use super::quantize::{per_channel_int8, QuantizeForm};
use crate::backbone::{Activation, Backbone, Conv};
use crate::head::HeadWeights;

pub const OPSET: i64 = 13;
pub const INPUT_NAME: &str = "image";
pub const OUTPUT_NAME: &str = "probabilities";

#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    #[error("cannot read a weight tensor for export: {0}")]
    Tensor(#[from] candle_core::Error),
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

    fn constant_f32(&mut self, prefix: &str, dims: &[usize], values: &[f32]) -> String {
        let name = self.fresh(prefix);
        self.initializers.push(TensorProto {
            name: name.clone(),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: DataType::Float as i32,
            raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ..Default::default()
        });
        name
    }

    fn constant_i8(&mut self, prefix: &str, dims: &[usize], values: &[i8]) -> String {
        let name = self.fresh(prefix);
        self.initializers.push(TensorProto {
            name: name.clone(),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: DataType::Int8 as i32,
            raw_data: values.iter().map(|&v| v as u8).collect(),
            ..Default::default()
        });
        name
    }

    /// A weight tensor whose first dimension is the output channel, stored as the export's
    /// quantization form asks; the returned name always carries float values.
    fn weight(&mut self, prefix: &str, dims: &[usize], values: &[f32]) -> String {
        match self.form {
            QuantizeForm::None => self.constant_f32(prefix, dims, values),
            QuantizeForm::Int8Weights => {
                let (q, scales) = per_channel_int8(values, dims[0]);
                let q = self.constant_i8(&format!("{prefix}_int8"), dims, &q);
                let scale = self.constant_f32(&format!("{prefix}_scale"), &[dims[0]], &scales);
                let zero =
                    self.constant_i8(&format!("{prefix}_zero"), &[dims[0]], &vec![0; dims[0]]);
                self.node(
                    "DequantizeLinear",
                    &[&q, &scale, &zero],
                    vec![attr_int("axis", 0)],
                    None,
                )
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
        let p = conv.padding;
        let s = conv.stride as i64;
        let y = self.node(
            "Conv",
            &[x, &w, &b],
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
            ],
            None,
        );
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

/// The complete model: graph plus `metadata_props` (key, value) in the given order, with its
/// weights stored as `form` says.
pub fn build_model(
    backbone: &Backbone,
    head: &HeadWeights,
    form: QuantizeForm,
    metadata: &[(String, String)],
) -> Result<ModelProto, OnnxError> {
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
        form,
    };

    // Preprocessing inside the graph: u8 NHWC -> f32, (x - mean) / std, -> NCHW.
    let x = g.node(
        "Cast",
        &[INPUT_NAME],
        vec![attr_int("to", DataType::Float as i64)],
        None,
    );
    let mean = g.constant_f32("mean", &[], &[backbone.normalization.mean]);
    let x = g.node("Sub", &[&x, &mean], vec![], None);
    let std = g.constant_f32("std", &[], &[backbone.normalization.std]);
    let x = g.node("Div", &[&x, &std], vec![], None);
    let mut x = g.node(
        "Transpose",
        &[&x],
        vec![attr_ints("perm", &[0, 3, 1, 2])],
        None,
    );

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
    x = g.node("Gemm", &[&x, &w, &b], vec![attr_int("transB", 1)], None);
    g.node(
        "Softmax",
        &[&x],
        vec![attr_int("axis", 1)],
        Some(OUTPUT_NAME),
    );

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
