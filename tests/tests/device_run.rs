//! `petcam-device run` as it runs on the Pi: options from a config file, telemetry read back
//! through a pseudo-terminal pair and decoded, a camera that is not there, and a clean stop on
//! SIGTERM.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use petcam_shared::protocol::{ErrorSource, Message, Reassembler, Received, Role};
use petcam_tests::{binary, copy_first, photos_and_weights, run, train_and_export};
use serialport::{SerialPort, TTYPort};

/// Reads the master side of the pseudo-terminal until `done`, decoding every frame.
fn read_telemetry(
    mut master: TTYPort,
    done: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(Vec<Message>, u64)> {
    std::thread::spawn(move || {
        let mut r = Reassembler::new();
        let mut messages = Vec::new();
        let mut rejected = 0;
        let mut buf = [0u8; 4096];
        // Keep reading for a moment after `done`, for what the device flushed at exit.
        let mut quiet_reads = 0;
        while quiet_reads < 5 {
            match master.read(&mut buf) {
                Ok(n) if n > 0 => {
                    quiet_reads = 0;
                    r.push(&buf[..n], |m| match m {
                        Received::Message(m) => messages.push(m),
                        Received::Rejected { .. } => rejected += 1,
                    })
                }
                _ => {
                    if done.load(Ordering::Relaxed) {
                        quiet_reads += 1;
                    }
                }
            }
        }
        (messages, rejected)
    })
}

fn sigterm(child: &Child) {
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
}

/// Runs `petcam-device run` with `args` for `seconds`, then SIGTERM; returns the exit code,
/// the stdout JSON lines and the telemetry messages.
fn run_device(
    args: &[&std::ffi::OsStr],
    slave: &Path,
    master: TTYPort,
    seconds: u64,
) -> (Option<i32>, Vec<serde_json::Value>, Vec<Message>, String) {
    let done = Arc::new(AtomicBool::new(false));
    let reader = read_telemetry(master, done.clone());
    let child = Command::new(binary("petcam-device"))
        .arg("run")
        .args(args)
        .arg("--port")
        .arg(slave)
        .arg("--json")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(seconds));
    sigterm(&child);
    let out = child.wait_with_output().unwrap();
    done.store(true, Ordering::Relaxed);
    let (messages, rejected) = reader.join().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        rejected, 0,
        "telemetry frames that did not decode; {stderr}"
    );
    let lines = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    (out.status.code(), lines, messages, stderr)
}

#[test]
fn the_device_reports_over_serial_waits_for_a_camera_and_stops_cleanly() {
    let Some((data, weights)) = photos_and_weights() else {
        return;
    };
    // A tiny model of the same contract: two classes of 6 photos each.
    let tmp = tempfile::tempdir().unwrap();
    let photos = tmp.path().join("photos");
    for class in ["cat", "dog"] {
        copy_first(&data.join("train").join(class), &photos.join(class), 6);
    }
    let out = tmp.path().join("out");
    let mut cmd = train_and_export(&photos, &weights, &out, &tmp.path().join("cache"));
    cmd.args(["--val-fraction", "0.3", "--latency-runs", "1"]);
    assert!(run(&mut cmd).status.success());
    let model = out.join("model.onnx");

    // Options from a config file; the command line's --device-id wins over the file's.
    let config = tmp.path().join("petcam.toml");
    std::fs::write(
        &config,
        format!(
            "model = {:?}\nsource = \"dir:{}\"\nloop = true\nthreads = 1\nsmooth = 1\n\
             threshold = 0.5\ndevice_id = \"shed\"\nbaud = 921600\n",
            model.display().to_string(),
            photos.display()
        ),
    )
    .unwrap();
    let (master, slave) = TTYPort::pair().unwrap();
    let slave_path = slave.name().unwrap();
    let (code, lines, messages, stderr) = run_device(
        &[
            "--config".as_ref(),
            config.as_os_str(),
            "--device-id".as_ref(),
            "garden".as_ref(),
        ],
        Path::new(&slave_path),
        master,
        4,
    );
    assert_eq!(code, Some(0), "{stderr}");
    let (summary, events) = lines.split_last().unwrap();
    assert_eq!(summary["event"], "summary", "{summary}");
    let frames = summary["frames"].as_u64().unwrap();
    assert!(frames > 12, "{summary}"); // looped over the 12 photos
    assert_eq!(summary["telemetry"]["dropped"], 0, "{summary}");
    assert_eq!(
        summary["telemetry"]["messages"].as_u64().unwrap(),
        messages.len() as u64
    );

    // The session opens with the device's Hello, naming the model by its id.
    let Message::Hello(hello) = &messages[0] else {
        panic!("first message is not Hello: {:?}", messages[0]);
    };
    hello.check_version().unwrap();
    assert_eq!(hello.role, Role::Device);
    assert_eq!(hello.device_id, "garden");
    assert_eq!(hello.model_id.len(), 12);

    // Heartbeats every second (4 s of running), counting frames as they go.
    let beats: Vec<_> = messages
        .iter()
        .filter_map(|m| match m {
            Message::Heartbeat(h) => Some(h),
            _ => None,
        })
        .collect();
    assert!(beats.len() >= 2, "{messages:?}");
    assert!(beats.windows(2).all(|w| w[0].frames <= w[1].frames));
    assert!(beats.windows(2).all(|w| w[0].uptime_ms < w[1].uptime_ms));
    let last = beats.last().unwrap();
    assert!(last.frames > 0 && last.fps > 0.0 && last.infer_p50_ms > 0.0);
    assert!(last.infer_p50_ms <= last.infer_p95_ms);
    assert_eq!(last.model_id, hello.model_id);

    // Every decision change on stdout is an Event on the wire, in the same order.
    let printed: Vec<(String, String)> = events
        .iter()
        .filter(|e| e["event"] == "decision")
        .map(|e| (e["from"].to_string(), e["to"].to_string()))
        .collect();
    let label = |l: &Option<String>| format!("{:?}", l.as_deref().unwrap_or("none"));
    let sent: Vec<(String, String)> = messages
        .iter()
        .filter_map(|m| match m {
            Message::Event(e) => Some((label(&e.from), label(&e.to))),
            _ => None,
        })
        .collect();
    assert!(!sent.is_empty());
    assert_eq!(sent, printed);

    // A camera that is not there: reported with the devices found, retried, never a crash;
    // SIGTERM still ends the run with exit code 0.
    let (master, slave) = TTYPort::pair().unwrap();
    let slave_path = slave.name().unwrap();
    let (code, lines, messages, stderr) = run_device(
        &[
            "--model".as_ref(),
            model.as_os_str(),
            "--source".as_ref(),
            "camera:/dev/video-petcam-absent".as_ref(),
        ],
        Path::new(&slave_path),
        master,
        3,
    );
    assert_eq!(code, Some(0), "{stderr}");
    let unavailable: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["event"] == "camera" && l["state"] == "unavailable")
        .collect();
    // Retried with back-off: 0.5 s, then 1 s, then 2 s.
    assert!(unavailable.len() >= 2, "{lines:?}");
    let message = unavailable[0]["message"].as_str().unwrap();
    assert!(
        message.contains("/dev/video-petcam-absent") && message.contains("retrying"),
        "{message}"
    );
    assert!(unavailable[0]["devices"].is_array());
    assert_eq!(lines.last().unwrap()["frames"], 0);
    assert!(matches!(messages[0], Message::Hello(_)));
    let camera_errors = messages
        .iter()
        .filter(|m| matches!(m, Message::Error(e) if e.source == ErrorSource::Camera))
        .count();
    assert_eq!(camera_errors, unavailable.len(), "{messages:?}");
    assert!(messages
        .iter()
        .any(|m| matches!(m, Message::Heartbeat(h) if h.frames == 0)));
    drop(slave);

    mjpeg_from_stdin_is_read_frame_by_frame(&model, &photos);
    sigterm_while_the_model_loads_is_a_clean_stop(&model, &photos);
    self_test_holds_the_golden_inference_to_its_budget(&model, tmp.path());
}

/// `self-test --model` passes on the golden pair within the default budget; a budget the
/// inference cannot meet fails it with the time it took, and a budget that is no time at all is
/// refused.
fn self_test_holds_the_golden_inference_to_its_budget(model: &Path, tmp: &Path) {
    let self_test = |budget: Option<&str>| {
        let mut cmd = Command::new(binary("petcam-device"));
        cmd.arg("self-test")
            .arg("--model")
            .arg(model)
            .arg("--state-dir")
            .arg(tmp.join("no-state"));
        if let Some(b) = budget {
            cmd.args(["--latency-budget-ms", b]);
        }
        let out = run(&mut cmd);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stdout, _) = self_test(None);
    assert_eq!(code, Some(0), "{stdout}");
    let verdict: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(verdict["passed"], true, "{stdout}");

    let (code, stdout, _) = self_test(Some("0.0001"));
    assert_eq!(code, Some(1), "{stdout}");
    let verdict: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(verdict["passed"], false, "{stdout}");
    let reason = verdict["reason"].as_str().unwrap();
    assert!(reason.contains("over the budget of 0 ms"), "{reason}");

    let (code, _, stderr) = self_test(Some("0"));
    assert_ne!(code, Some(0));
    assert!(
        stderr.contains("--latency-budget-ms 0 is not a positive"),
        "{stderr}"
    );
}

/// SIGTERM that arrives while the model is still loading (as systemd's stop of a device just
/// started) ends the run with exit code 0, not the signal's 143.
fn sigterm_while_the_model_loads_is_a_clean_stop(model: &Path, photos: &Path) {
    use std::io::BufRead;
    let mut child = Command::new(binary("petcam-device"))
        .args(["-v", "run", "--model"])
        .arg(model)
        .arg("--source")
        .arg(format!("dir:{}", photos.display()))
        .args(["--loop", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    let mut line = String::new();
    while !seen.contains("loading the model") {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "{seen}");
        seen.push_str(&line);
    }
    // Loading and optimising takes a few hundred milliseconds: the signal lands in it.
    sigterm(&child);
    let status = child.wait().unwrap();
    let mut rest = String::new();
    let _ = stderr.read_to_string(&mut rest);
    seen.push_str(&rest);
    assert_eq!(status.code(), Some(0), "{seen}");
    assert!(seen.contains("stopped while the model loaded"), "{seen}");
}

/// `mjpeg:-`: JPEG frames written one by one into stdin, as ffmpeg or `rpicam-vid --codec
/// mjpeg -o -` would. Decisions come while the writer still holds the pipe open, and the run
/// ends by itself when the writer closes it.
fn mjpeg_from_stdin_is_read_frame_by_frame(model: &Path, photos: &Path) {
    use std::io::{BufRead, Write};
    let mut frames: Vec<Vec<u8>> = Vec::new();
    for class in ["cat", "dog"] {
        let mut files: Vec<_> = std::fs::read_dir(photos.join(class))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        frames.extend(files.into_iter().map(|f| std::fs::read(f).unwrap()));
    }
    let mut child = Command::new(binary("petcam-device"))
        .arg("run")
        .arg("--model")
        .arg(model)
        .args(["--source", "mjpeg:-", "--threads", "1", "--smooth", "1"])
        .args(["--threshold", "0.5", "--json"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let line: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
            tx.send(line).unwrap();
        }
    });
    let mut stdin = child.stdin.take().unwrap();
    let (first, rest) = frames.split_at(frames.len() / 2);
    for f in first {
        stdin.write_all(f).unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    // The pipe is still open: a decision must come anyway.
    let decision = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("no decision while the stream was open");
    assert_eq!(decision["event"], "decision", "{decision}");
    for f in rest {
        stdin.write_all(f).unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(stdin);
    let status = child.wait().unwrap();
    reader.join().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "{err}");
    let lines: Vec<serde_json::Value> = rx.try_iter().collect();
    let summary = lines.last().unwrap();
    assert_eq!(summary["event"], "summary", "{summary}");
    let (seen, dropped) = (
        summary["frames"].as_u64().unwrap(),
        summary["dropped"].as_u64().unwrap(),
    );
    // Every frame written was either classified or dropped for a busy model; none unreadable.
    assert_eq!(seen + dropped, frames.len() as u64, "{summary}");
    assert_eq!(summary["bad_frames"], 0, "{summary}");
}

#[test]
fn a_bad_config_file_names_the_file_and_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("petcam.toml");
    std::fs::write(&config, "model = \"m.onnx\"\nthreshhold = 0.9\n").unwrap();
    let out = Command::new(binary("petcam-device"))
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("petcam.toml") && err.contains("threshhold"),
        "{err}"
    );
    let out = Command::new(binary("petcam-device"))
        .args(["run", "--config"])
        .arg(tmp.path().join("absent.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("absent.toml"));
}
