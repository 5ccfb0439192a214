//! The `petcam-device` binary's errors and exit codes. (Its runs on real photos and models are
//! in the workspace's end-to-end tests, `tests/`.)

use std::process::Command;

fn device() -> Command {
    Command::new(env!("CARGO_BIN_EXE_petcam-device"))
}

#[test]
fn a_missing_or_corrupt_model_is_exit_code_1_with_its_name() {
    let tmp = tempfile::tempdir().unwrap();
    let photo = tmp.path().join("a.jpg");
    std::fs::write(&photo, b"x").unwrap();
    let corrupt = tmp.path().join("model.onnx");
    std::fs::write(&corrupt, b"\x08\x07\x12\x06petcam\x3a\xff\xff").unwrap();
    for (model, says) in [
        (tmp.path().join("absent.onnx"), "does not exist"),
        (corrupt, "not a loadable ONNX model"),
    ] {
        for sub in ["classify", "bench", "run"] {
            let mut cmd = device();
            cmd.arg(sub).arg("--model").arg(&model);
            match sub {
                "classify" => cmd.arg(&photo),
                "run" => cmd.arg(format!("--source=dir:{}", tmp.path().display())),
                _ => &mut cmd,
            };
            let out = cmd.output().unwrap();
            assert_eq!(out.status.code(), Some(1), "{sub} {}", model.display());
            let err = String::from_utf8_lossy(&out.stderr);
            let name = model.file_name().unwrap().to_str().unwrap();
            assert!(err.contains(name) && err.contains(says), "{sub}: {err}");
        }
    }
}

#[test]
fn a_bad_command_line_is_exit_code_2() {
    let out = device()
        .args(["run", "--model", "m.onnx", "--source", "rtsp://cam"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("rtsp://cam") && err.contains("dir:PATH"),
        "{err}"
    );
}
