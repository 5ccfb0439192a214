//! `petcam train-and-export` then `petcam evaluate`, on a small slice of the Kaggle photos.

use std::process::Command;

use petcam_tests::{binary, photo_subset, photos_and_weights, run, shared, train_and_export};

#[test]
fn trains_exports_and_evaluates_a_small_cats_vs_dogs_model() {
    let Some((data, weights)) = photos_and_weights() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let photos = tmp.path().join("photos");
    photo_subset(&data, &photos, 20, 15);
    // Files a real folder collects: an empty file, notes, a photo cut off mid-transfer.
    std::fs::write(photos.join("train/cat/empty.jpg"), b"").unwrap();
    std::fs::write(photos.join("train/dog/notes.txt"), b"good dogs\n").unwrap();
    let whole = std::fs::read(data.join("train/dog/dog.1.jpg")).unwrap();
    std::fs::write(photos.join("train/dog/cut.jpg"), &whole[..whole.len() / 2]).unwrap();

    let out = tmp.path().join("out");
    let cache = tmp.path().join("cache");
    let train = |extra: &[&str]| {
        let mut cmd = train_and_export(&photos, &weights, &out, &cache);
        cmd.args(["--latency-runs", "5"]).args(extra);
        run(&mut cmd)
    };
    let first = train(&[]);
    assert!(first.status.success(), "train-and-export failed");
    for file in [
        "model.onnx",
        "report.json",
        "report.md",
        "training_curves.png",
        "confusion_matrix.png",
    ] {
        assert!(out.join(file).is_file(), "{file} was not written");
    }
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    let skipped: Vec<&str> = report["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["path"].as_str().unwrap())
        .collect();
    assert_eq!(skipped.len(), 3, "skipped: {skipped:?}");
    for name in ["empty.jpg", "notes.txt", "cut.jpg"] {
        assert!(
            skipped.iter().any(|p| p.ends_with(name)),
            "{name} not reported"
        );
    }
    assert_eq!(
        report["dataset"]["train_counts"],
        serde_json::json!([20, 20])
    );
    assert_eq!(report["dataset"]["val_counts"], serde_json::json!([15, 15]));
    let val_acc = report["evaluation"]["accuracy"].as_f64().unwrap();
    assert!(val_acc >= 0.9, "validation accuracy {val_acc}");
    let export = &report["export"];
    assert!(export["float_agreement"].as_f64().unwrap() >= 0.995);
    let q = &export["quantization"];
    assert_eq!(q["form"], "int8-weights");
    assert!(q["agreement"].as_f64().unwrap() >= 0.995);
    assert!(q["accuracy"].as_f64().unwrap() >= q["float_accuracy"].as_f64().unwrap() - 0.01);
    assert!(q["size_ratio"].as_f64().unwrap() <= 0.3);
    assert_eq!(q["latency"]["runs"], 5);
    assert!(q["profile"].as_array().unwrap().len() > 3);
    assert!(q["calibration"].is_null());
    assert_eq!(report["timings"]["features_computed"], 70);

    // The exported file, scored by tract, through the evaluate command.
    let mut cmd = Command::new(binary("petcam"));
    cmd.arg("evaluate")
        .arg("--model")
        .arg(out.join("model.onnx"))
        .arg("--data")
        .arg(photos.join("val"))
        .arg("--json");
    let eval = run(&mut cmd);
    assert!(eval.status.success());
    let eval: serde_json::Value = serde_json::from_slice(&eval.stdout).unwrap();
    assert_eq!(eval["images"], 30);
    assert_eq!(eval["accuracy"].as_f64(), export["onnx_accuracy"].as_f64());
    assert_eq!(eval["confusion"].as_array().unwrap().len(), 2);
    assert!(eval["per_class"]["cat"]["recall"].is_number());
    assert!(eval.get("photos").is_none());
    // Photo by photo: what the accuracy was counted from.
    let eval = run(cmd.arg("--per-photo"));
    assert!(eval.status.success());
    let eval: serde_json::Value = serde_json::from_slice(&eval.stdout).unwrap();
    let per_photo = eval["photos"].as_array().unwrap();
    assert_eq!(per_photo.len(), 30);
    let val_dir = photos.join("val").display().to_string();
    let right = per_photo
        .iter()
        .filter(|p| {
            let probs: Vec<f64> = p["probabilities"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            assert_eq!(probs.len(), 2);
            assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-4, "{p}");
            assert!(p["path"].as_str().unwrap().starts_with(&val_dir), "{p}");
            p["label"] == p["predicted"]
        })
        .count();
    // The accuracy is a share of 30 photos: the count it stands for.
    let counted = (eval["accuracy"].as_f64().unwrap() * 30.0).round() as usize;
    assert_eq!(right, counted);

    // The device runs the same file: `petcam-device classify` over the same folder gives the
    // same accuracy, and an unreadable image is reported on its own line without stopping it.
    let broken = tmp.path().join("broken.jpg");
    std::fs::write(&broken, b"not a photo").unwrap();
    let mut cmd = Command::new(binary("petcam-device"));
    cmd.arg("classify")
        .arg("--model")
        .arg(out.join("model.onnx"))
        .arg(photos.join("val"))
        .arg(&broken)
        .arg("--json");
    let classified = run(&mut cmd);
    assert_eq!(
        classified.status.code(),
        Some(3),
        "exit code for an unreadable image"
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(classified.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 31);
    let errors: Vec<&serde_json::Value> =
        lines.iter().filter(|l| l.get("error").is_some()).collect();
    assert_eq!(errors.len(), 1);
    assert!(errors[0]["path"].as_str().unwrap().ends_with("broken.jpg"));
    let right = lines
        .iter()
        .filter(|l| l.get("label").is_some())
        .filter(|l| {
            let path = std::path::Path::new(l["path"].as_str().unwrap());
            let folder = path
                .parent()
                .unwrap()
                .file_name()
                .unwrap()
                .to_str()
                .unwrap();
            assert!(l["probabilities"][folder].is_number());
            assert!(l["latency_ms"].as_f64().unwrap() > 0.0);
            l["label"] == folder
        })
        .count();
    let eval_right = (eval["accuracy"].as_f64().unwrap() * 30.0).round() as usize;
    assert_eq!(right, eval_right, "classify and evaluate disagree");

    // A reader that goes away (`classify ... | head -1`) ends the run quietly, not in a panic.
    let mut child = Command::new(binary("petcam-device"))
        .arg("classify")
        .arg("--model")
        .arg(out.join("model.onnx"))
        .arg(photos.join("val"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let closed = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&closed.stderr);
    assert!(closed.status.success(), "{:?}: {stderr}", closed.status);
    assert!(!stderr.contains("panicked"), "{stderr}");

    // run over the same folder, deciding on every frame (no smoothing): each change of the
    // classified label is one decision event, on the frame where classify saw it change.
    let classified: Vec<(&str, &str)> = lines
        .iter()
        .filter(|l| l.get("label").is_some())
        .map(|l| (l["path"].as_str().unwrap(), l["label"].as_str().unwrap()))
        .collect();
    let mut expected = Vec::new();
    let mut current = "none";
    for &(path, label) in &classified {
        if label != current {
            expected.push((path, current, label));
            current = label;
        }
    }
    let mut cmd = Command::new(binary("petcam-device"));
    cmd.arg("run")
        .arg("--model")
        .arg(out.join("model.onnx"))
        .arg(format!("--source=dir:{}", photos.join("val").display()))
        .args([
            "--smooth",
            "1",
            "--threshold",
            "0.5",
            "--threads",
            "1",
            "--json",
        ]);
    let ran = run(&mut cmd);
    assert!(ran.status.success());
    let events: Vec<serde_json::Value> = String::from_utf8(ran.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let (summary, decisions) = events.split_last().unwrap();
    assert_eq!(summary["event"], "summary");
    assert_eq!(summary["frames"], 30);
    assert_eq!(summary["dropped"], 0);
    let got: Vec<(&str, &str, &str)> = decisions
        .iter()
        .map(|e| {
            (
                e["frame"].as_str().unwrap(),
                e["from"].as_str().unwrap(),
                e["to"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, expected);

    let mut cmd = Command::new(binary("petcam-device"));
    cmd.arg("bench")
        .arg("--model")
        .arg(out.join("model.onnx"))
        .args(["--iterations", "5", "--threads", "1", "--json"]);
    let bench = run(&mut cmd);
    assert!(bench.status.success());
    let bench: serde_json::Value = serde_json::from_slice(&bench.stdout).unwrap();
    for key in [
        "load_ms",
        "infer_p50_ms",
        "infer_p90_ms",
        "infer_p99_ms",
        "preprocess_p50_ms",
        "peak_rss_mb",
    ] {
        assert!(bench[key].as_f64().unwrap() > 0.0, "{key}: {bench}");
    }
    let p = |k: &str| bench[k].as_f64().unwrap();
    assert!(p("infer_p50_ms") <= p("infer_p90_ms") && p("infer_p90_ms") <= p("infer_p99_ms"));

    // inspect: what the model is, and its stored golden pair run through tract.
    let mut cmd = Command::new(binary("petcam"));
    cmd.arg("inspect").arg(out.join("model.onnx")).arg("--json");
    let inspect = run(&mut cmd);
    assert!(inspect.status.success());
    let inspect: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(inspect["labels"], serde_json::json!(["cat", "dog"]));
    assert_eq!(inspect["self_test"]["passed"], true);
    assert_eq!(inspect["quantization"]["form"], "int8-weights");
    assert_eq!(inspect["graph"]["float_weight_layers"], 0);
    assert_eq!(inspect["graph"]["int8_weight_layers"], 50); // 49 convolutions + the head
    assert_eq!(inspect["graph"]["int8_layers"], 0);
    assert_eq!(
        inspect["metrics"]["tract_accuracy"].as_f64(),
        export["onnx_accuracy"].as_f64()
    );

    // Second run: every feature comes from the cache, and the same seed gives the same model.
    // The default model stores int8 weights: about a quarter of the float model, which
    // --keep-float writes beside it.
    let model_a = std::fs::read(out.join("model.onnx")).unwrap();
    let second = train(&["--keep-float"]);
    assert!(second.status.success());
    let report2: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report2["timings"]["features_computed"], 0);
    assert_eq!(report2["timings"]["features_cached"], 70);
    assert_eq!(
        report2["evaluation"]["confusion"],
        report["evaluation"]["confusion"]
    );
    let model_b = std::fs::read(out.join("model.onnx")).unwrap();
    let float = std::fs::metadata(out.join("model-f32.onnx")).unwrap().len();
    assert_eq!(
        report2["export"]["quantization"]["float_model_bytes"],
        float
    );
    assert!(
        (model_b.len() as f64) < 0.3 * float as f64,
        "int8 model {} bytes, float {float}",
        model_b.len()
    );
    // Only the creation time in the metadata may differ.
    assert_eq!(model_a.len(), model_b.len());

    // Static int8: QLinearConv everywhere, calibrated on training photos, still verified
    // against float (a loss of more than a point would fail this run).
    let third = train(&["--quantize", "int8", "--calibration-images", "12"]);
    assert!(third.status.success());
    let report3: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    let q = &report3["export"]["quantization"];
    assert_eq!(q["form"], "int8");
    assert_eq!(q["calibration"]["images"], 12);
    assert_eq!(q["calibration"]["method"], "percentile");
    assert_eq!(q["int8_layers"], 50);
    assert!(q["accuracy"].as_f64().unwrap() >= q["float_accuracy"].as_f64().unwrap() - 0.01);
    let mut cmd = Command::new(binary("petcam"));
    cmd.arg("inspect").arg(out.join("model.onnx")).arg("--json");
    let inspect = run(&mut cmd);
    assert!(
        inspect.status.success(),
        "self-test of the int8 model failed"
    );
    let inspect: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(inspect["graph"]["ops"]["QLinearConv"], 49);
    assert_eq!(inspect["graph"]["ops"]["QLinearMatMul"], 1);
    assert!(inspect["graph"]["ops"]["Conv"].is_null());
    assert_eq!(inspect["quantization"]["calibration"]["images"], 12);
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        md.contains("## Quantization") && md.contains("im2col"),
        "{md}"
    );

    // bench: both files side by side, with a per-operator profile.
    let mut cmd = Command::new(binary("petcam"));
    cmd.arg("bench")
        .arg(out.join("model-f32.onnx"))
        .arg(out.join("model.onnx"))
        .args(["--runs", "3", "--profile", "--profile-runs", "1", "--json"]);
    let bench = run(&mut cmd);
    assert!(bench.status.success());
    let bench: serde_json::Value = serde_json::from_slice(&bench.stdout).unwrap();
    let models = bench["models"].as_array().unwrap();
    assert_eq!(models.len(), 2);
    assert_eq!(models[0]["quantization"], "none");
    assert_eq!(models[1]["quantization"], "int8");
    assert_eq!(models[1]["latency"]["runs"], 3);
    assert!(models[1]["profile"].as_array().unwrap().len() > 3);

    // --augment: 2 views of each of the 40 readable training photos are computed once, then
    // come from the cache; the head trains on 120 rows; validation is never augmented.
    for computed in [80, 0] {
        let augmented = train(&["--augment", "--augment-views", "2", "--quantize", "none"]);
        assert!(augmented.status.success());
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
        assert_eq!(report["timings"]["features_computed"], computed);
        let a = &report["training"]["augmentation"];
        assert_eq!(a["views_per_photo"], 2);
        assert_eq!(a["training_rows"], 120);
        assert_eq!(
            report["dataset"]["train_counts"],
            serde_json::json!([20, 20])
        );
        assert_eq!(report["evaluation"]["images"], 30);
    }
    // Low-resolution views are other pixels: cached apart from the plain views, named apart.
    let low = train(&[
        "--augment",
        "--augment-views",
        "2",
        "--augment-low-res",
        "--quantize",
        "none",
    ]);
    assert!(low.status.success());
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["timings"]["features_computed"], 80);
    let kind = report["training"]["augmentation"]["kind"].as_str().unwrap();
    assert!(kind.contains("lowres"), "{kind}");
}

#[test]
fn a_folder_with_one_class_is_an_error_that_names_it() {
    let Some(weights) = shared("backbones/efficientnet-lite0-57934424.pth") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("photos/cat")).unwrap();
    std::fs::write(tmp.path().join("photos/cat/a.jpg"), b"x").unwrap();
    let mut cmd = Command::new(binary("petcam"));
    cmd.arg("train-and-export")
        .arg("--data")
        .arg(tmp.path().join("photos"))
        .arg("--weights")
        .arg(&weights)
        .arg("--out")
        .arg(tmp.path().join("out"));
    let out = run(&mut cmd);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("photos") && err.contains("two"), "{err}");
}

#[test]
fn evaluate_refuses_a_truncated_model_with_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model.onnx");
    std::fs::write(&model, b"\x08\x07\x12\x06petcam\x3a\xff\xff").unwrap();
    std::fs::create_dir_all(tmp.path().join("photos/cat")).unwrap();
    let mut cmd = Command::new(binary("petcam"));
    cmd.arg("evaluate")
        .arg("--model")
        .arg(&model)
        .arg("--data")
        .arg(tmp.path().join("photos"));
    let out = run(&mut cmd);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("model.onnx") && err.contains("not a loadable ONNX model"),
        "{err}"
    );
}

#[test]
fn missing_weights_and_missing_cuda_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    for class in ["cat", "dog"] {
        std::fs::create_dir_all(tmp.path().join("photos").join(class)).unwrap();
    }
    let petcam = |extra: &[&str]| {
        let mut cmd = Command::new(binary("petcam"));
        cmd.arg("train-and-export")
            .arg("--data")
            .arg(tmp.path().join("photos"))
            .arg("--out")
            .arg(tmp.path().join("out"))
            .arg("--cache-dir")
            .arg(tmp.path().join("empty-cache"))
            .args(extra);
        let out = run(&mut cmd);
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // No --weights and nothing fetched: the error says how to get the checkpoint.
    let err = petcam(&[]);
    assert!(
        err.contains("tools/fetch-backbone --backbone efficientnet-lite0"),
        "{err}"
    );
    // The same for the larger Lites, which have their own checkpoints.
    let err = petcam(&["--backbone", "efficientnet-lite2"]);
    assert!(
        err.contains("efficientnet-lite2-9656183e.pth")
            && err.contains("tools/fetch-backbone --backbone efficientnet-lite2"),
        "{err}"
    );
    // Without CUDA in the build (the tested path) or without a GPU, asking for it is an error
    // that says which, never a panic. (A CUDA build on a GPU gets as far as the weights.)
    let err = petcam(&["--device", "cuda"]);
    assert!(
        err.contains("without CUDA support")
            || err.contains("no usable NVIDIA GPU")
            || err.contains("tools/fetch-backbone"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}
