//! tract latency of the exported model, float vs int8 weights vs int8, measured in the same run.
//!
//! Criterion times the models one after the other; on a shared machine that order alone moved
//! the float : int8-weights ratio between 1.00 and 1.12. For the ratio, `petcam bench`, which
//! interleaves the models run by run, is the measurement to trust.
//!
//! Both files are built here from the ImageNet backbone and a fixed two-class head, so no
//! training is needed. Needs `../shared/backbones/efficientnet-lite0-57934424.pth`.
//! Run: `cargo bench -p petcam-host --bench exported_model`.

use candle_core::Device;
use criterion::{criterion_group, criterion_main, Criterion};
use petcam_host::backbone::Backbone;
use petcam_host::export::calibrate::{self, RangeMethod};
use petcam_host::export::onnx;
use petcam_host::export::quantize::QuantizeForm;
use petcam_host::head::HeadWeights;
use petcam_host::model::ExportedModel;
use petcam_host::test_support::shared_fixture;
use petcam_shared::metadata;

fn exported_model(c: &mut Criterion) {
    let Some(weights) = shared_fixture("backbones/efficientnet-lite0-57934424.pth") else {
        return;
    };
    let net = Backbone::load("efficientnet-lite0", &weights, &Device::Cpu).unwrap();
    let head = HeadWeights {
        classes: 2,
        features: 1280,
        weight: (0..2 * 1280)
            .map(|i| ((i % 7) as f32 - 3.0) * 0.01)
            .collect(),
        bias: vec![0.1, -0.1],
    };
    let input = onnx::input_spec(&net, false);
    let meta = vec![
        (metadata::LABELS.to_owned(), r#"["cat","dog"]"#.to_owned()),
        (
            metadata::INPUT.to_owned(),
            serde_json::to_string(&input).unwrap(),
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let img = image::RgbImage::from_fn(224, 224, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x + y) % 256) as u8])
    });

    let mut group = c.benchmark_group("tract_exported_model_1_thread");
    group.sample_size(60);
    // Ranges from the one bench image: enough to time the int8 graph, not to judge accuracy.
    let cal = calibrate::calibrate(
        &net,
        &head,
        std::slice::from_ref(&img),
        RangeMethod::MinMax,
        &|| {},
    )
    .unwrap();
    for form in [
        QuantizeForm::None,
        QuantizeForm::Int8Weights,
        QuantizeForm::Int8,
    ] {
        let path = dir.path().join(format!("{}.onnx", form.name()));
        let spec = onnx::GraphSpec {
            form: onnx::Form::new(form, &cal),
            mirror_average: false,
        };
        let proto = onnx::build_model(&net, &head, spec, &meta).unwrap();
        let bytes = onnx::write_model(&proto, &path).unwrap();
        eprintln!("{}: {bytes} bytes", form.name());
        let model = ExportedModel::load(&path).unwrap();
        group.bench_function(form.name(), |b| b.iter(|| model.predict(&img).unwrap()));
    }
    group.finish();
}

criterion_group!(benches, exported_model);
criterion_main!(benches);
