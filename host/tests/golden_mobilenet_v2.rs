//! Google's quantized MobileNetV2 TFLite model, imported as a float candle backbone, against
//! what the TFLite interpreter computes with that file (`../shared/golden/mobilenet_v2_tflite.json`):
//! the interpreter's top-1 ImageNet class within our top 3 on 4 photos, and the zero-shot
//! cat-vs-dog rate on the validation photos within 2 points of the interpreter's. The original
//! computes in u8, so exact equality is not expected.

use std::path::Path;

use candle_core::{Device, Tensor};
use petcam_host::backbone::{mobilenet_v2, Backbone, LoadOptions};
use petcam_host::test_support::shared_fixture;

fn probabilities(net: &Backbone, photo: &Path) -> Vec<f32> {
    let size = net.input_size as u32;
    let img = petcam_runtime::preprocess::load_input(photo, size, size).unwrap();
    let rgb = Tensor::from_vec(
        img.into_raw(),
        (1, size as usize, size as usize, 3),
        &Device::Cpu,
    )
    .unwrap();
    let features = net.features(&rgb).unwrap();
    let logits = net.imagenet_logits(&features).unwrap().unwrap();
    candle_nn::ops::softmax_last_dim(&logits)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn top(p: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..p.len()).collect();
    order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
    order.truncate(k);
    order
}

#[test]
fn imported_tflite_mobilenet_v2_agrees_with_the_tflite_interpreter() {
    let (Some(tflite), Some(json), Some(shared)) = (
        shared_fixture("backbones/mobilenet_v2_1.0_224_quant.tflite"),
        shared_fixture("golden/mobilenet_v2_tflite.json"),
        shared_fixture(""),
    ) else {
        return;
    };
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    let net = Backbone::load("mobilenet-v2", &tflite, &Device::Cpu).unwrap();
    assert_eq!(net.name, "mobilenet-v2-1.0");
    assert_eq!(net.feature_dim(), 1280);
    // The file's input scaling: (pixel - 128) / 128.
    assert_eq!(
        (net.normalization.mean, net.normalization.std),
        (128.0, 128.0)
    );
    // TensorFlow SAME on a stride-2 conv over an even size: the extra row at the bottom.
    let p = net.stem.padding;
    assert_eq!((p.top, p.left, p.bottom, p.right), (0, 0, 1, 1));
    let classes = net.classifier.as_ref().unwrap().weight.dims()[0];
    assert_eq!(
        classes, 1001,
        "background first, as in the interpreter's output"
    );

    for image in golden["images"].as_array().unwrap() {
        let photo = shared.join(image["image"].as_str().unwrap());
        let p = probabilities(&net, &photo);
        let theirs = image["top5"][0]["class"].as_u64().unwrap() as usize;
        let ours = top(&p, 5);
        eprintln!(
            "{}: interpreter top-1 {theirs}, ours top-5 {ours:?}",
            photo.display()
        );
        assert!(
            ours[..3].contains(&theirs),
            "{}: the interpreter's top-1 class {theirs} is not in our top 3 {:?}",
            photo.display(),
            &ours[..3]
        );
    }

    // Zero-shot: the summed cat classes against the summed dog classes, as the golden file's rule.
    let zero_shot = &golden["zero_shot_cat_vs_dog_on_val"];
    let rule = zero_shot["rule"].as_str().unwrap();
    assert!(
        rule.contains("282-286") && rule.contains("152-269"),
        "{rule}"
    );
    let mut right = 0;
    let mut total = 0;
    for (class, is_cat) in [("cat", true), ("dog", false)] {
        let dir = shared.join("datasets/cats-vs-dogs/val").join(class);
        let mut photos: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        photos.sort();
        for photo in photos {
            let p = probabilities(&net, &photo);
            let cat: f32 = p[282..=286].iter().sum();
            let dog: f32 = p[152..=269].iter().sum();
            right += usize::from((cat > dog) == is_cat);
            total += 1;
        }
    }
    let ours = right as f64 / total as f64;
    let theirs = zero_shot["accuracy"].as_f64().unwrap();
    eprintln!("zero-shot cat vs dog: ours {ours:.4} on {total} photos, interpreter {theirs:.4}");
    assert_eq!(total as u64, zero_shot["images"].as_u64().unwrap());
    assert!(
        (ours - theirs).abs() <= 0.02,
        "zero-shot accuracy {ours:.4} is not within 2 points of the interpreter's {theirs:.4}"
    );
}

/// The safetensors written by `import-backbone` is the same backbone as the TFLite file.
#[test]
fn import_backbone_round_trips_through_safetensors() {
    let Some(tflite) = shared_fixture("backbones/mobilenet_v2_1.0_224_quant.tflite") else {
        return;
    };
    let model = petcam_host::backbone::tflite::TfliteModel::load(&tflite).unwrap();
    let (tensors, meta) = mobilenet_v2::import_tflite(&model).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("mnv2.safetensors");
    mobilenet_v2::save_safetensors(&tensors, &meta, &out).unwrap();
    let options = LoadOptions {
        input_size: Some(160),
        width: Some(1.0),
    };
    let a = Backbone::load_with("mobilenet-v2", &tflite, &Device::Cpu, options).unwrap();
    let b = Backbone::load_with("mobilenet-v2", &out, &Device::Cpu, options).unwrap();
    assert_eq!(a.input_size, 160);
    assert_eq!(a.normalization, b.normalization);
    assert_eq!(a.stem.padding, b.stem.padding);
    let rgb = Tensor::from_vec(
        (0..160 * 160 * 3)
            .map(|i| (i * 37 % 256) as u8)
            .collect::<Vec<u8>>(),
        (1, 160, 160, 3),
        &Device::Cpu,
    )
    .unwrap();
    let fa = a.features(&rgb).unwrap();
    let fb = b.features(&rgb).unwrap();
    let diff = petcam_host::test_support::max_abs_diff(&fa, &fb);
    assert_eq!(diff, 0.0);

    // Asking for another width names both.
    let e = Backbone::load_with(
        "mobilenet-v2",
        &out,
        &Device::Cpu,
        LoadOptions {
            input_size: None,
            width: Some(0.5),
        },
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("0.5") && e.to_string().contains("1"),
        "{e}"
    );
}
