//! Google's quantized MobileNetV2 TFLite file (`../shared/backbones`), read by petcam's own
//! FlatBuffer reader: its structure, quantization and weights.

use petcam_host::backbone::tflite::{Activation, OpKind, Padding, TensorType, TfliteModel};
use petcam_host::test_support::shared_fixture;

#[test]
fn mobilenet_v2_tflite_is_read_with_its_quantization_and_wiring() {
    let Some(path) = shared_fixture("backbones/mobilenet_v2_1.0_224_quant.tflite") else {
        return;
    };
    let m = TfliteModel::load(&path).unwrap();
    // One input: the u8 image, quantized so that the model sees (x - 128) / 128.
    assert_eq!(m.inputs.len(), 1);
    let input = &m.tensors[m.inputs[0] as usize];
    assert_eq!(input.shape, vec![1, 224, 224, 3]);
    assert_eq!(input.dtype, TensorType::U8);
    let q = input.quantization.as_ref().unwrap();
    assert!((q.scale[0] - 1.0 / 128.0).abs() < 1e-4, "{q:?}");
    assert_eq!(q.zero_point[0], 128);
    // 1001 classes out.
    let output = &m.tensors[m.outputs[0] as usize];
    assert_eq!(output.shape, vec![1, 1001]);

    let count = |f: fn(&OpKind) -> bool| m.operators.iter().filter(|o| f(&o.kind)).count();
    // MobileNetV2: 17 bottleneck blocks; 17 depthwise layers, 10 residual additions,
    // 35 1x1 convolutions + the stem + the final 1x1 (to 1280) as Conv2d, and a 1x1 conv as
    // the classifier.
    assert_eq!(count(|k| matches!(k, OpKind::DepthwiseConv2d { .. })), 17);
    assert_eq!(count(|k| matches!(k, OpKind::Add { .. })), 10);
    assert!(count(|k| matches!(k, OpKind::Conv2d { .. })) >= 35);

    // The stem: 3x3 stride 2 SAME, ReLU6, 32 filters, u8 weights with per-tensor scale.
    let stem = &m.operators[0];
    assert_eq!(
        stem.kind,
        OpKind::Conv2d {
            padding: Padding::Same,
            stride: (2, 2),
            activation: Activation::Relu6
        }
    );
    let w = &m.tensors[stem.inputs[1] as usize];
    assert_eq!(w.shape, vec![32, 3, 3, 3]);
    let weights = m.dequantized(stem.inputs[1] as usize).unwrap().unwrap();
    assert_eq!(weights.len(), 32 * 27);
    let max = weights.iter().fold(0f32, |a, v| a.max(v.abs()));
    assert!(max > 0.1 && max < 50.0, "stem weights up to {max}");
    // Biases are i32 with scale = input scale x weight scale.
    let b = &m.tensors[stem.inputs[2] as usize];
    assert_eq!(b.dtype, TensorType::I32);
    let bias = m.dequantized(stem.inputs[2] as usize).unwrap().unwrap();
    assert_eq!(bias.len(), 32);
    let expected = q.scale[0] * w.quantization.as_ref().unwrap().scale[0];
    let got = b.quantization.as_ref().unwrap().scale[0];
    assert!(
        (got - expected).abs() <= expected * 1e-3,
        "{got} vs {expected}"
    );
    // Activations carry no data.
    assert_eq!(m.dequantized(stem.outputs[0] as usize).unwrap(), None);

    // Every operator's tensors exist.
    for op in &m.operators {
        for &t in op.inputs.iter().chain(&op.outputs) {
            assert!(t == -1 || (t as usize) < m.tensors.len());
        }
    }
}
