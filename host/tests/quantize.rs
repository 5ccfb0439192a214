//! Every quantization form goes through export and tract; a broken quantization is refused.
//!
//! A head is trained on the features of 32 photos from `../shared`, then the real backbone plus
//! that head is exported in each form and run with tract on 16 other photos.

use candle_core::Device;
use petcam_host::backbone::Backbone;
use petcam_host::dataset::{self, Dataset, Sample};
use petcam_host::export::calibrate::{self, RangeMethod};
use petcam_host::export::onnx;
use petcam_host::export::quantize::QuantizeForm;
use petcam_host::export::verify::{self, VerifyError};
use petcam_host::features::{self, FeatureSet};
use petcam_host::head::HeadWeights;
use petcam_host::model::{top1, ExportedModel};
use petcam_host::test_support::shared_fixture;
use petcam_host::train::{self, TrainConfig};
use petcam_shared::metadata;

struct Fixture {
    backbone: Backbone,
    head: HeadWeights,
    train: FeatureSet,
    val: FeatureSet,
    candle_probs: Vec<Vec<f32>>,
    meta: Vec<(String, String)>,
}

/// `per_class` samples of each class, spread over the list.
fn pick(samples: &[Sample], per_class: usize) -> Vec<Sample> {
    let mut out = Vec::new();
    for label in 0..2 {
        let of: Vec<&Sample> = samples.iter().filter(|s| s.label == label).collect();
        out.extend(
            (0..per_class)
                .map(|i| of[i * of.len() / per_class])
                .cloned(),
        );
    }
    out
}

fn fixture() -> Option<Fixture> {
    let weights = shared_fixture("backbones/efficientnet-lite0-57934424.pth")?;
    let data = shared_fixture("datasets/cats-vs-dogs")?;
    let backbone = Backbone::load("efficientnet-lite0", &weights, &Device::Cpu).unwrap();
    let ds = Dataset::discover(&data, 0.2).unwrap();
    let (train, _) = features::extract(&backbone, &pick(&ds.train, 16), None, 1, "train").unwrap();
    let (val, _) = features::extract(&backbone, &pick(&ds.val, 8), None, 1, "val").unwrap();
    let cfg = TrainConfig {
        epochs: 30,
        ..TrainConfig::default()
    };
    let head = train::train(&train, &val, 2, &cfg, &Device::Cpu, |_| {})
        .unwrap()
        .head;
    let candle_probs = (0..val.len())
        .map(|i| head.probabilities(val.row(i)))
        .collect();
    let input = onnx::input_spec(&backbone, false);
    let meta = vec![
        (metadata::LABELS.into(), r#"["cat","dog"]"#.into()),
        (
            metadata::INPUT.into(),
            serde_json::to_string(&input).unwrap(),
        ),
    ];
    Some(Fixture {
        backbone,
        head,
        train,
        val,
        candle_probs,
        meta,
    })
}

fn calibration(f: &Fixture) -> calibrate::Calibration {
    let images: Vec<_> = f
        .train
        .paths
        .iter()
        .step_by(4)
        .map(|p| dataset::load_input(p, 224, 224).unwrap())
        .collect();
    calibrate::calibrate(
        &f.backbone,
        &f.head,
        &images,
        RangeMethod::Percentile,
        &|| {},
    )
    .unwrap()
}

fn spec(
    form: QuantizeForm,
    cal: &calibrate::Calibration,
    mirror_average: bool,
) -> onnx::GraphSpec<'_> {
    onnx::GraphSpec {
        form: onnx::Form::new(form, cal),
        mirror_average,
    }
}

fn load(proto: &tract_onnx::pb::ModelProto, name: &str) -> ExportedModel {
    use prost::Message;
    ExportedModel::from_bytes(&proto.encode_to_vec(), std::path::Path::new(name)).unwrap()
}

/// Zeroes every value of the first initializer whose name starts with `prefix`.
fn zero_scale(proto: &mut tract_onnx::pb::ModelProto, prefix: &str) {
    let init = proto
        .graph
        .as_mut()
        .unwrap()
        .initializer
        .iter_mut()
        .find(|t| t.name.starts_with(prefix))
        .unwrap_or_else(|| panic!("no initializer {prefix}*"));
    init.raw_data.iter_mut().for_each(|b| *b = 0);
}

#[test]
fn every_form_round_trips_through_export_and_tract() {
    let Some(f) = fixture() else { return };
    let cal = calibration(&f);
    let build = |form| {
        let proto =
            onnx::build_model(&f.backbone, &f.head, spec(form, &cal, false), &f.meta).unwrap();
        let bytes = {
            use prost::Message;
            proto.encoded_len()
        };
        (load(&proto, form.name()), bytes)
    };
    let (float, float_bytes) = build(QuantizeForm::None);
    let (weights8, weights8_bytes) = build(QuantizeForm::Int8Weights);
    let (int8, int8_bytes) = build(QuantizeForm::Int8);

    // What each graph is made of: 49 convolutions and the classifier.
    assert_eq!(float.graph.float_weight_layers, 50);
    assert_eq!(weights8.graph.int8_weight_layers, 50);
    assert_eq!(weights8.graph.float_weight_layers, 0);
    assert_eq!(int8.graph.int8_layers, 50);
    assert_eq!(
        int8.graph.int8_weight_layers + int8.graph.float_weight_layers,
        0
    );
    assert!(!int8.graph.ops.contains_key("Conv"));
    assert!(
        weights8_bytes * 10 < float_bytes * 3,
        "{weights8_bytes} vs {float_bytes}"
    );
    assert!(
        int8_bytes * 10 < float_bytes * 3,
        "{int8_bytes} vs {float_bytes}"
    );

    let mut worst = [0f32; 3];
    for (i, path) in f.val.paths.iter().enumerate() {
        let img = dataset::load_input(path, 224, 224).unwrap();
        let candle = &f.candle_probs[i];
        for (k, m) in [&float, &weights8, &int8].iter().enumerate() {
            let p = m.predict(&img).unwrap();
            let d = p
                .iter()
                .zip(candle)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            worst[k] = worst[k].max(d);
            // A confident float prediction survives every form.
            if top1(candle).1 > 0.75 {
                assert_eq!(
                    top1(&p).0,
                    top1(candle).0,
                    "{} on {}",
                    m.path.display(),
                    path.display()
                );
            }
        }
    }
    // Float matches to rounding. Quantization moves an unsure photo's probabilities by a few
    // hundredths (measured: 0.06 with int8 weights, 0.04 with int8); a broken graph by ~0.5.
    assert!(worst[0] < 1e-4, "float differs from candle by {}", worst[0]);
    assert!(
        worst[1] < 0.1,
        "int8 weights differ from candle by {}",
        worst[1]
    );
    assert!(worst[2] < 0.1, "int8 differs from candle by {}", worst[2]);
}

#[test]
fn a_model_with_a_zeroed_scale_is_refused_by_verification() {
    let Some(f) = fixture() else { return };
    let cal = calibration(&f);
    let float = load(
        &onnx::build_model(
            &f.backbone,
            &f.head,
            spec(QuantizeForm::None, &cal, false),
            &f.meta,
        )
        .unwrap(),
        "float",
    );
    let img = dataset::load_input(&f.val.paths[0], 224, 224).unwrap();
    for form in [QuantizeForm::Int8Weights, QuantizeForm::Int8] {
        let mut proto =
            onnx::build_model(&f.backbone, &f.head, spec(form, &cal, false), &f.meta).unwrap();
        // The intact model passes.
        let good = load(&proto, form.name());
        let v =
            verify::verify(&float, Some(&good), &f.val, &f.candle_probs, 0.995, &img, 1).unwrap();
        let q = v.quantized.as_ref().unwrap();
        verify::check_accuracy_drop(form.name(), q).unwrap();
        assert_eq!(v.float_latency.runs, 1);
        assert!(v.quantized_latency.is_some());

        // The stem's weight scales zeroed: every photo looks the same to the head.
        zero_scale(&mut proto, "stem_weight_scale");
        let broken = load(&proto, form.name());
        let v = verify::verify(
            &float,
            Some(&broken),
            &f.val,
            &f.candle_probs,
            0.995,
            &img,
            1,
        )
        .unwrap();
        let q = v.quantized.unwrap();
        assert!(q.accuracy <= 0.5 + 1e-9, "{form:?}: {}", q.accuracy);
        match verify::check_accuracy_drop(form.name(), &q) {
            Err(e @ VerifyError::AccuracyDrop { .. }) => {
                let msg = e.to_string();
                assert!(
                    msg.contains(form.name()) && msg.contains("below the float"),
                    "{msg}"
                );
            }
            other => panic!("{form:?}: broken model not refused: {other:?}"),
        }
    }
}

#[test]
fn a_mirror_averaging_model_is_the_mean_of_the_photo_and_its_mirror() {
    let Some(f) = fixture() else { return };
    let cal = calibration(&f);
    let img = dataset::load_input(&f.val.paths[0], 224, 224).unwrap();
    let mut flipped = img.clone();
    image::imageops::flip_horizontal_in_place(&mut flipped);
    for form in [
        QuantizeForm::None,
        QuantizeForm::Int8Weights,
        QuantizeForm::Int8,
    ] {
        let build = |mirror| {
            let proto =
                onnx::build_model(&f.backbone, &f.head, spec(form, &cal, mirror), &f.meta).unwrap();
            load(&proto, form.name())
        };
        let (plain, mirrored) = (build(false), build(true));
        // The mirror pass reuses the weights: the file grows by its nodes only.
        assert!(
            mirrored.bytes < plain.bytes + plain.bytes / 100,
            "{form:?}: {} bytes against {}",
            mirrored.bytes,
            plain.bytes
        );
        let a = plain.predict(&img).unwrap();
        let b = plain.predict(&flipped).unwrap();
        let m = mirrored.predict(&img).unwrap();
        assert_eq!(m.len(), 2);
        // The photo and its mirror give different probabilities, so a graph that ignored
        // either half would fail this. (The int8 form's quantized logits may round both to the
        // same step.)
        if form != QuantizeForm::Int8 {
            assert!((a[0] - b[0]).abs() > 1e-4, "{form:?}: {a:?} {b:?}");
        }
        for c in 0..2 {
            let mean = (a[c] + b[c]) / 2.0;
            assert!((m[c] - mean).abs() < 1e-5, "{form:?}: {m:?} against {mean}");
        }
        // Mirroring a mirror-averaging model's input changes nothing.
        let mf = mirrored.predict(&flipped).unwrap();
        assert!((mf[0] - m[0]).abs() < 1e-5, "{form:?}: {mf:?} {m:?}");
    }
}
