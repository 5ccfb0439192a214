//! MobileNetV2 end to end, from Google's quantized TFLite file: `petcam import-backbone`,
//! `petcam train-and-export --backbone mobilenet-v2 --input-size 128`, then the exported model
//! on `petcam-device`, which knows nothing about the backbone.

use std::path::{Path, PathBuf};
use std::process::Command;

use petcam_tests::{binary, photo_subset, run, shared};

fn petcam(args: &[&str], paths: &[&Path]) -> std::process::Output {
    let mut cmd = Command::new(binary("petcam"));
    cmd.args(args).args(paths);
    run(&mut cmd)
}

/// The Kaggle photos and Google's MobileNetV2 TFLite file from `../shared`.
fn photos_and_tflite() -> Option<(PathBuf, PathBuf)> {
    Some((
        shared("datasets/cats-vs-dogs")?,
        shared("backbones/mobilenet_v2_1.0_224_quant.tflite")?,
    ))
}

#[test]
fn a_mobilenet_v2_from_tflite_trains_exports_and_runs_on_the_device() {
    let Some((data, tflite)) = photos_and_tflite() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let photos = tmp.path().join("photos");
    // 100 validation photos: one borderline photo that quantization flips costs 1 point,
    // which the export's accuracy gate allows.
    photo_subset(&data, &photos, 40, 50);

    // Convert once; the safetensors file is what training reads.
    let converted = tmp.path().join("mobilenet_v2.safetensors");
    let o = petcam(
        &["import-backbone"],
        &[&tflite, Path::new("--out"), &converted],
    );
    assert!(o.status.success());
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(
        said.contains("mobilenet-v2-1.0") && said.contains("1001-class"),
        "{said}"
    );
    assert!(converted.is_file());

    let out = tmp.path().join("out");
    let o = petcam(
        &[
            "train-and-export",
            "--backbone",
            "mobilenet-v2",
            "--input-size",
            "128",
            "--latency-runs",
            "3",
            "--data",
        ],
        &[
            &photos,
            Path::new("--weights"),
            &converted,
            Path::new("--out"),
            &out,
            Path::new("--cache-dir"),
            &tmp.path().join("cache"),
        ],
    );
    assert!(o.status.success(), "train-and-export failed");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["backbone"]["name"], "mobilenet-v2-1.0");
    assert_eq!(report["backbone"]["input_size"], 128);
    assert_eq!(report["backbone"]["feature_dim"], 1280);
    let q = &report["export"]["quantization"];
    assert_eq!(q["form"], "int8-weights");
    let tract_accuracy = q["accuracy"].as_f64().unwrap();
    assert!(tract_accuracy >= 0.8, "tract accuracy {tract_accuracy}");

    // The model says what it needs: the input size and the backbone.
    let model = out.join("model.onnx");
    let o = petcam(&["inspect", "--json"], &[&model]);
    assert!(o.status.success());
    let meta: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(meta["input"]["width"], 128);
    assert_eq!(meta["input"]["height"], 128);
    assert_eq!(meta["input"]["mean"], 128.0);
    assert_eq!(meta["backbone"]["name"], "mobilenet-v2-1.0");

    // The device classifies the validation photos with it, as tract did in the verification.
    let mut cmd = Command::new(binary("petcam-device"));
    cmd.args(["classify", "--json", "--model"])
        .arg(&model)
        .arg(photos.join("val"));
    let o = run(&mut cmd);
    assert!(o.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 100);
    let right = lines
        .iter()
        .filter(|l| {
            let path = l["path"].as_str().unwrap();
            path.contains(&format!("/{}/", l["label"].as_str().unwrap()))
        })
        .count();
    let device_accuracy = right as f64 / 100.0;
    assert!(
        (device_accuracy - tract_accuracy).abs() <= 0.01 + 1e-9,
        "device {device_accuracy} vs verification {tract_accuracy}"
    );
}

#[test]
fn mobilenet_v2_options_that_do_not_fit_are_errors_that_say_why() {
    let Some((data, tflite)) = photos_and_tflite() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let train = |extra: &[&str], weights: &Path| {
        let o = petcam(
            &[&["train-and-export"], extra].concat(),
            &[
                Path::new("--data"),
                &data,
                Path::new("--weights"),
                weights,
                Path::new("--out"),
                &out,
            ],
        );
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let err = train(
        &["--backbone", "mobilenet-v2", "--width-multiplier", "0.5"],
        &tflite,
    );
    assert!(err.contains("0.5") && err.contains("mobilenet-v2"), "{err}");
    let err = train(
        &["--backbone", "mobilenet-v2", "--input-size", "100"],
        &tflite,
    );
    assert!(
        err.contains("100") && err.contains("multiple of 32"),
        "{err}"
    );
    let err = train(&["--backbone", "efficientnet-lite0"], &tflite);
    assert!(err.contains("mobilenet-v2"), "{err}");
    // A file cut short names the file.
    let cut = tmp.path().join("cut.tflite");
    let bytes = std::fs::read(&tflite).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    let err = train(&["--backbone", "mobilenet-v2"], &cut);
    assert!(err.contains("cut.tflite"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
