//! `petcam train-and-export --unfreeze`: fine-tuning the top of the backbone, end to end.

use std::process::Command;

use petcam_tests::{binary, photo_subset, photos_and_weights, run, train_and_export};

fn report(out: &std::path::Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap()
}

#[test]
fn fine_tunes_the_top_blocks_and_exports_them() {
    let Some((data, weights)) = photos_and_weights() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let photos = tmp.path().join("photos");
    photo_subset(&data, &photos, 20, 15);
    let cache = tmp.path().join("cache");
    let train = |out: &str, extra: &[&str]| {
        let out = tmp.path().join(out);
        let mut cmd = train_and_export(&photos, &weights, &out, &cache);
        cmd.args(["--latency-runs", "5"]).args(extra);
        let result = run(&mut cmd);
        assert!(result.status.success(), "train-and-export {extra:?} failed");
        out
    };

    // The top 2 of 16 blocks train, on a fresh augmented view of every photo each epoch.
    let out = train("two", &["--unfreeze", "2", "--augment", "--epochs", "2"]);
    let r = report(&out);
    let t = &r["training"];
    let f = &t["fine_tune"];
    assert_eq!(f["unfrozen_blocks"], 2);
    assert_eq!(f["total_blocks"], 16);
    assert_eq!(f["first_unfrozen_block"], 14);
    assert_eq!(f["train_bn"], false);
    assert_eq!(f["backbone_lr"], 1e-4, "default: a tenth of --lr");
    assert!(f["trainable_parameters"].as_u64().unwrap() > 1_000_000);
    assert!(f["train_images_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(t["augmentation"]["on_the_fly"], true);
    assert_eq!(
        t["augmentation"]["views_per_photo"], 2,
        "one view per epoch"
    );
    assert!(t["augmentation"]["views_s"].as_f64().unwrap() > 0.0);
    // Both learning rates per epoch, the backbone's a tenth of the head's, decaying.
    let history = t["history"].as_array().unwrap();
    assert_eq!(history.len(), 2);
    assert_eq!(history[0]["lr"], 1e-3);
    assert_eq!(history[0]["backbone_lr"], 1e-4);
    assert!(history[1]["backbone_lr"].as_f64().unwrap() < 1e-4);
    // The block inputs of the 70 photos were computed (the views never reach the cache).
    assert_eq!(r["timings"]["features_computed"], 70);
    // The export is the fine-tuned network: tract on the float model gives the probabilities
    // candle computes with the fine-tuned blocks (a stale export would differ by far more).
    let export = &r["export"];
    assert!(export["float_max_probability_diff"].as_f64().unwrap() < 1e-3);
    assert!(export["float_agreement"].as_f64().unwrap() >= 0.995);
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        md.contains("top 2 of 16 blocks") && md.contains("backbone lr"),
        "{md}"
    );
    // The model says it was fine-tuned, and its self-test (the golden pair) passes in tract.
    let mut cmd = Command::new(binary("petcam"));
    cmd.arg("inspect").arg(out.join("model.onnx")).arg("--json");
    let inspect = run(&mut cmd);
    assert!(inspect.status.success());
    let inspect: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(inspect["backbone"]["fine_tuned_blocks"], 2);
    assert_eq!(inspect["self_test"]["passed"], true, "{inspect}");

    // --mirror-average: the graph averages each photo with its mirror image; candle does the
    // same with the fine-tuned blocks on the mirrored validation photos, and the two agree.
    let out = train(
        "mirror",
        &["--unfreeze", "2", "--epochs", "1", "--mirror-average"],
    );
    let r = report(&out);
    assert_eq!(r["export"]["mirror_average"], true);
    assert!(r["export"]["float_max_probability_diff"].as_f64().unwrap() < 1e-3);
    assert!(r["export"]["float_agreement"].as_f64().unwrap() >= 0.995);
    let mut cmd = Command::new(binary("petcam"));
    cmd.arg("inspect").arg(out.join("model.onnx")).arg("--json");
    let inspect = run(&mut cmd);
    assert!(inspect.status.success());
    let inspect: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(inspect["input"]["mirror_average"], true);
    assert_eq!(inspect["self_test"]["passed"], true, "{inspect}");

    // --train-bn: BatchNorm in training mode, folded back into the convolutions on export.
    // Each cut has its own cache, so the inputs of block 15 are computed afresh.
    let out = train(
        "bn",
        &[
            "--unfreeze",
            "1",
            "--train-bn",
            "--epochs",
            "1",
            "--backbone-lr",
            "3e-4",
            "--quantize",
            "none",
        ],
    );
    let r = report(&out);
    let f = &r["training"]["fine_tune"];
    assert_eq!(f["train_bn"], true);
    assert_eq!(f["backbone_lr"], 3e-4);
    assert_eq!(f["first_unfrozen_block"], 15);
    assert_eq!(r["timings"]["features_computed"], 70);
    assert!(r["export"]["float_max_probability_diff"].as_f64().unwrap() < 1e-3);
}

#[test]
fn unfreezing_more_blocks_than_the_backbone_has_is_an_error() {
    let Some((data, weights)) = photos_and_weights() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let photos = tmp.path().join("photos");
    photo_subset(&data, &photos, 2, 1);
    let mut cmd = train_and_export(
        &photos,
        &weights,
        &tmp.path().join("out"),
        &tmp.path().join("cache"),
    );
    cmd.args(["--unfreeze", "17"]);
    let out = run(&mut cmd);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--unfreeze 17") && err.contains("(16)"),
        "{err}"
    );
    // The fine-tuning options need --unfreeze.
    let mut cmd = train_and_export(
        &photos,
        &weights,
        &tmp.path().join("out"),
        &tmp.path().join("cache"),
    );
    cmd.arg("--train-bn");
    let out = run(&mut cmd);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--unfreeze"), "{err}");
}
