//! `petcam flash` against `petcam-device agent`, the real binaries, over two pseudo-terminal
//! pairs joined by a proxy in this test that can flip bits and drop bytes: signing, downgrade,
//! resume after the host is killed, a noisy line, and the active model's bytes after each.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use petcam_shared::protocol::{
    self as protocol, encode, Begin, Hello, ImageKind, Message, NackReason, Reassembler, Received,
    Role, PROTOCOL_VERSION,
};
use petcam_tests::{binary, copy_first, photos_and_weights, run, train_and_export};
use serialport::{SerialPort, TTYPort};

/// What the proxy does to the bytes it carries.
#[derive(Default)]
struct Line {
    /// Damage 1 byte in 1000: half of them have a bit flipped, half are dropped.
    noisy: AtomicBool,
    /// About 1 MB/s, so an upload can be caught in the middle.
    slow: AtomicBool,
}

/// Copies bytes from `from` to `to`, as `line` says.
fn pump(mut from: TTYPort, mut to: TTYPort, line: Arc<Line>, mut seed: u64) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            let n = match from.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => continue,
                Err(_) => return,
            };
            let mut out = Vec::with_capacity(n);
            for &b in &buf[..n] {
                if line.noisy.load(Ordering::Relaxed) {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let r = (seed >> 33) % 2000;
                    if r == 0 {
                        continue;
                    }
                    if r == 1 {
                        out.push(b ^ (1 << ((seed >> 20) % 8)));
                        continue;
                    }
                }
                out.push(b);
            }
            // A full buffer on the far side is back-pressure, not a broken line.
            if protocol::write_frame(&mut to, &out, Duration::from_secs(30)).is_err() {
                return;
            }
            if line.slow.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_micros(n as u64));
            }
        }
    });
}

/// Two pseudo-terminals joined through the proxy: (device side, host side, the slaves to keep
/// open, what the line does).
fn link() -> (PathBuf, PathBuf, Vec<TTYPort>, Arc<Line>) {
    let (mut ma, sa) = TTYPort::pair().unwrap();
    let (mut mb, sb) = TTYPort::pair().unwrap();
    for m in [&mut ma, &mut mb] {
        m.set_timeout(Duration::from_millis(50)).unwrap();
    }
    let line = Arc::new(Line::default());
    pump(
        ma.try_clone_native().unwrap(),
        mb.try_clone_native().unwrap(),
        line.clone(),
        1,
    );
    pump(mb, ma, line.clone(), 2);
    let (a, b) = (sa.name().unwrap().into(), sb.name().unwrap().into());
    (a, b, vec![sa, sb], line)
}

fn agent(port: &Path, state: &Path, trusted: &Path, log: &Path) -> Child {
    // Its log goes to a file: a noisy line makes many warnings, which would fill a pipe.
    Command::new(binary("petcam-device"))
        .args(["agent", "--threads", "1", "--port"])
        .arg(port)
        .arg("--state-dir")
        .arg(state)
        .arg("--trusted-key")
        .arg(trusted)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

fn flash(port: &Path, model: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(binary("petcam"));
    cmd.arg("flash")
        .arg("--port")
        .arg(port)
        .arg(model)
        .arg("--json")
        .args(extra);
    cmd
}

fn active_bytes(state: &Path) -> Option<Vec<u8>> {
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state.join("active.json")).ok()?).unwrap();
    let sha = record["model"]["sha256"].as_str().unwrap();
    Some(std::fs::read(state.join("models").join(format!("{sha}.onnx"))).unwrap())
}

fn json_of(out: &std::process::Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("{e}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr)))
}

/// Two small models of the same photos that differ (another seed), in `dir`; the photos are
/// left in `dir/photos`.
fn two_models(data: &Path, weights: &Path, dir: &Path) -> (PathBuf, PathBuf) {
    let photos = dir.join("photos");
    for class in ["cat", "dog"] {
        copy_first(&data.join("train").join(class), &photos.join(class), 8);
    }
    let cache = dir.join("cache");
    let mut models = Vec::new();
    for seed in ["1", "2"] {
        let out = dir.join(format!("model{seed}"));
        let o = run(train_and_export(&photos, weights, &out, &cache)
            .args([
                "--epochs",
                "2",
                "--val-fraction",
                "0.25",
                "--latency-runs",
                "1",
            ])
            .args(["--seed", seed]));
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        models.push(out.join("model.onnx"));
    }
    let m2 = models.pop().unwrap();
    let m1 = models.pop().unwrap();
    assert_ne!(std::fs::read(&m1).unwrap(), std::fs::read(&m2).unwrap());
    (m1, m2)
}

#[test]
fn models_are_flashed_signed_resumed_and_never_half_installed() {
    let Some((data, weights)) = photos_and_weights() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (m1, m2) = two_models(&data, &weights, tmp.path());
    let (m1, m2) = (&m1, &m2);

    let keys = tmp.path().join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    for name in ["petcam", "other"] {
        let o = run(Command::new(binary("petcam"))
            .args(["keygen", "--out"])
            .arg(keys.join(name)));
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let key = keys.join("petcam.key");
    let key = key.to_str().unwrap();
    let other = keys.join("other.key");
    let other = other.to_str().unwrap();

    let (device_port, host_port, _slaves, line) = link();
    let state = tmp.path().join("state");
    let log = tmp.path().join("agent.log");
    let mut device = agent(&device_port, &state, &keys.join("petcam.pub"), &log);

    // Unsigned: refused, nothing installed.
    let o = run(&mut flash(&host_port, m1, &[]));
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("unsigned"),
        "{o:?}"
    );
    assert_eq!(active_bytes(&state), None);

    // Garbage, and a frame longer than any the protocol allows: the agent skips them and
    // answers the next frame.
    {
        let mut p = serialport::new(host_port.to_string_lossy(), 921_600)
            .timeout(Duration::from_secs(5))
            .open_native()
            .unwrap();
        let garbage: Vec<u8> = (0..5000u32).map(|i| (i * 7919 % 251) as u8 + 1).collect();
        p.write_all(&garbage).unwrap();
        p.write_all(&[0]).unwrap();
        p.write_all(&vec![0x55; 6000]).unwrap();
        p.write_all(&[0]).unwrap();
        p.flush().unwrap();
    }

    // Signed: installed, and the device reports it active.
    let o = run(&mut flash(
        &host_port,
        m1,
        &["--key", key, "--image-version", "2.0"],
    ));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report = json_of(&o);
    let m1_bytes = std::fs::read(m1).unwrap();
    assert_eq!(active_bytes(&state).as_deref(), Some(&m1_bytes[..]));
    let sha1 = report["active_model"].as_str().unwrap().to_owned();
    assert_eq!(sha1.len(), 12);
    let efficiency = report["link_efficiency"].as_f64().unwrap();
    assert!(efficiency >= 0.9, "link efficiency {efficiency}");

    // A signature cut short, sent by hand: refused as a bad signature.
    {
        let mut p = serialport::new(host_port.to_string_lossy(), 921_600)
            .timeout(Duration::from_millis(50))
            .open_native()
            .unwrap();
        let begin = Message::Begin(Begin {
            kind: ImageKind::Model,
            size: 10,
            sha256: [7; 32],
            version: "9.0".into(),
            signature: vec![1; 63],
        });
        p.write_all(&encode(&begin).unwrap()).unwrap();
        let mut rx = Reassembler::new();
        let mut buf = [0u8; 1024];
        let mut reply = None;
        let end = Instant::now() + Duration::from_secs(10);
        while reply.is_none() && Instant::now() < end {
            if let Ok(n) = p.read(&mut buf) {
                rx.push(&buf[..n], |r| {
                    if let Received::Message(Message::Nack(n)) = r {
                        reply = Some(n);
                    }
                });
            }
        }
        let nack = reply.expect("a Nack for a truncated signature");
        assert_eq!(nack.reason, NackReason::BadSignature, "{nack:?}");
        assert!(nack.detail.contains("63 bytes"), "{nack:?}");
    }

    // Signed with another key, or an older version: refused; the active model is unchanged.
    let o = run(&mut flash(
        &host_port,
        m2,
        &["--key", other, "--image-version", "3.0"],
    ));
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("signature"),
        "{o:?}"
    );
    let o = run(&mut flash(
        &host_port,
        m2,
        &["--key", key, "--image-version", "1.9"],
    ));
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("downgrade"),
        "{o:?}"
    );
    assert_eq!(active_bytes(&state).as_deref(), Some(&m1_bytes[..]));

    // The host is killed part-way; run again, it resumes past 0 and completes.
    line.slow.store(true, Ordering::Relaxed);
    let mut host = flash(&host_port, m2, &["--key", key, "--image-version", "3.0"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let part = state.join("staging/model.part");
    let start = Instant::now();
    while std::fs::metadata(&part).map_or(0, |m| m.len()) < 64 * 1024 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the upload never started"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    host.kill().unwrap();
    host.wait().unwrap();
    line.slow.store(false, Ordering::Relaxed);
    assert_eq!(active_bytes(&state).as_deref(), Some(&m1_bytes[..]));
    // The device goes down too (SIGKILL, as a power cut would stop it) and comes back.
    device.kill().unwrap();
    device.wait().unwrap();
    device = agent(&device_port, &state, &keys.join("petcam.pub"), &log);
    let o = run(&mut flash(
        &host_port,
        m2,
        &["--key", key, "--image-version", "3.0"],
    ));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report = json_of(&o);
    assert!(report["resumed_from"].as_u64().unwrap() > 0, "{report}");
    let m2_bytes = std::fs::read(m2).unwrap();
    assert_eq!(active_bytes(&state).as_deref(), Some(&m2_bytes[..]));

    // A line that flips and drops bytes: the upload still completes with the right bytes.
    line.noisy.store(true, Ordering::Relaxed);
    let o = run(&mut flash(
        &host_port,
        m1,
        &["--key", key, "--image-version", "4.0"],
    ));
    line.noisy.store(false, Ordering::Relaxed);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report = json_of(&o);
    assert!(report["resends"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(active_bytes(&state).as_deref(), Some(&m1_bytes[..]));

    // The device survived all of it and stops cleanly.
    assert_eq!(device.try_wait().unwrap(), None, "the agent exited");
    let kill = Command::new("kill")
        .args(["-TERM", &device.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = device.wait().unwrap();
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("rejected a frame"), "{stderr}");
}

/// Reads the host side of the link until the device sends a message `done` accepts: what
/// it sent up to that one. Panics after `timeout`, with what it saw.
fn wait_for(port: &Path, timeout: Duration, done: impl Fn(&Message) -> bool) -> Vec<Message> {
    let mut p = serialport::new(port.to_string_lossy(), 921_600)
        .timeout(Duration::from_millis(50))
        .open_native()
        .unwrap();
    let mut rx = Reassembler::new();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if let Ok(n) = p.read(&mut buf) {
            rx.push(&buf[..n], |r| {
                if let Received::Message(m) = r {
                    got.push(m)
                }
            });
            if got.iter().any(&done) {
                return got;
            }
        }
    }
    panic!("nothing expected within {timeout:?}; got {got:?}");
}

fn heartbeat_model(m: &Message) -> Option<&str> {
    match m {
        Message::Heartbeat(h) => Some(h.model_id.as_str()),
        _ => None,
    }
}

/// The model's golden output with its first probability's leading digit changed: still a
/// valid model of the same length, whose self-test can only fail.
fn with_wrong_golden(model: &[u8]) -> Vec<u8> {
    let key = b"\"probabilities\":[";
    let at = model
        .windows(key.len())
        .position(|w| w == key)
        .expect("a golden output in the metadata")
        + key.len();
    let mut out = model.to_vec();
    // `0.97...` becomes `0.17...` (or `0.87...`): far outside any tolerance.
    let digit = out[at..].iter().position(u8::is_ascii_digit).unwrap() + at + 2;
    out[digit] = if out[digit] == b'1' { b'8' } else { b'1' };
    out
}

#[test]
fn a_model_flashed_to_a_running_device_takes_over_without_a_restart() {
    let Some((data, weights)) = photos_and_weights() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (m1, m2) = two_models(&data, &weights, tmp.path());
    let (device_port, host_port, _slaves, line) = link();
    let state = tmp.path().join("state");
    let photos = tmp.path().join("photos/cat");
    let log = tmp.path().join("run.log");
    let mut device = Command::new(binary("petcam-device"))
        .args([
            "run",
            "--threads",
            "1",
            "--loop",
            "--json",
            "--allow-unsigned",
        ])
        .arg("--model")
        .arg(&m1)
        .arg(format!("--source=dir:{}", photos.display()))
        .arg("--port")
        .arg(&device_port)
        .arg("--state-dir")
        .arg(&state)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // Loading takes a moment; heartbeats then come every second.
    let before = wait_for(&host_port, Duration::from_secs(30), |m| {
        heartbeat_model(m).is_some()
    });
    let m1_id = before.iter().find_map(heartbeat_model).unwrap().to_owned();
    assert_eq!(m1_id.len(), 12);

    // A graph that does not load, and a model whose golden output is wrong: refused with the
    // reason, and the running model stays.
    let corrupt = tmp.path().join("corrupt.onnx");
    let m2_bytes = std::fs::read(&m2).unwrap();
    std::fs::write(&corrupt, &m2_bytes[..m2_bytes.len() / 2]).unwrap();
    let o = run(&mut flash(
        &host_port,
        &corrupt,
        &["--no-local-check", "--image-version", "1"],
    ));
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("self-test") && err.contains("does not load"),
        "{err}"
    );
    let wrong = tmp.path().join("wrong-golden.onnx");
    std::fs::write(&wrong, with_wrong_golden(&m2_bytes)).unwrap();
    let o = run(&mut flash(&host_port, &wrong, &[]));
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("self-test") && err.contains("golden output differs"),
        "{err}"
    );
    assert_eq!(active_bytes(&state), None);

    // The real one, over a slow line: accepted, and the running program switches to it.
    line.slow.store(true, Ordering::Relaxed);
    let o = run(&mut flash(&host_port, &m2, &[]));
    line.slow.store(false, Ordering::Relaxed);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report = json_of(&o);
    let m2_id = report["active_model"].as_str().unwrap().to_owned();
    // Heartbeats kept coming during the upload, about one a second.
    let seconds = report["upload_s"].as_f64().unwrap();
    let beats = report["heartbeats"].as_u64().unwrap();
    assert!(
        seconds >= 2.0,
        "the upload was too quick to tell: {seconds} s"
    );
    assert!(
        beats as f64 >= seconds.floor() - 1.0,
        "{beats} heartbeats in {seconds} s"
    );
    assert_ne!(m1_id, m2_id);
    assert_eq!(active_bytes(&state).as_deref(), Some(&m2_bytes[..]));
    // The next heartbeats carry the new model's id (the first may have been on its way).
    let after = wait_for(&host_port, Duration::from_secs(30), |m| {
        heartbeat_model(m) == Some(m2_id.as_str())
    });
    let ids: Vec<&str> = after.iter().filter_map(heartbeat_model).collect();
    assert!(
        ids.len() <= 2,
        "the switch took more than a heartbeat: {ids:?}"
    );

    let kill = Command::new("kill")
        .args(["-TERM", &device.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let mut stdout = String::new();
    device
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    let status = device.wait().unwrap();
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(0), "{stderr}");
    // stdout says which model took over, and the run went on with it.
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let switched = lines
        .iter()
        .position(|l| l["event"] == "model")
        .unwrap_or_else(|| panic!("no model event: {stdout}"));
    assert_eq!(lines[switched]["model_id"], m2_id.as_str());
    assert_eq!(lines.last().unwrap()["event"], "summary");
}

/// A stand-in for systemd running `petcam-device launch -- agent ...`: restarts it after an
/// error exit or exit status 75, stops after a clean exit. The exit statuses, in order.
fn supervise(
    state: &Path,
    port: &Path,
    log: &Path,
    current: Arc<std::sync::Mutex<Option<u32>>>,
) -> std::thread::JoinHandle<Vec<i32>> {
    let (state, port, log) = (state.to_owned(), port.to_owned(), log.to_owned());
    std::thread::spawn(move || {
        let mut codes = Vec::new();
        loop {
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .unwrap();
            let mut child = Command::new(binary("petcam-device"))
                .arg("launch")
                .arg("--state-dir")
                .arg(&state)
                .args(["--", "agent", "--allow-unsigned", "--threads", "1"])
                .args(["--health-grace", "2", "--state-dir"])
                .arg(&state)
                .arg("--port")
                .arg(&port)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap();
            *current.lock().unwrap() = Some(child.id());
            let code = child.wait().unwrap().code().unwrap_or(-1);
            codes.push(code);
            if code == 0 || codes.len() > 10 {
                return codes;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    })
}

fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    p
}

#[test]
fn a_flashed_binary_is_self_tested_switched_to_and_rolled_back_if_it_does_not_stay_up() {
    let tmp = tempfile::tempdir().unwrap();
    let (device_port, host_port, _slaves, _line) = link();
    let state = tmp.path().join("state");
    let log = tmp.path().join("device.log");
    let current = Arc::new(std::sync::Mutex::new(None));
    let supervisor = supervise(&state, &device_port, &log, current.clone());
    let device = binary("petcam-device");
    // Firmware images: scripts, so the test needs no second build. `good` is the real binary.
    let good = script(
        tmp.path(),
        "good",
        &format!("exec '{}' \"$@\"", device.display()),
    );
    let fails_self_test = script(tmp.path(), "fails", "echo 'no camera driver' >&2; exit 3");
    let crashes = script(
        tmp.path(),
        "crashes",
        "[ \"$1\" = self-test ] && exit 0; echo 'crashed at start' >&2; exit 3",
    );
    let firmware = |path: &Path, version: &str| {
        let mut cmd = Command::new(binary("petcam"));
        cmd.arg("flash")
            .arg("--port")
            .arg(&host_port)
            .arg("--firmware")
            .arg(path)
            .args([
                "--image-version",
                version,
                "--json",
                "--restart-timeout",
                "20",
            ]);
        cmd
    };
    let current_json = || -> Option<serde_json::Value> {
        let text = std::fs::read_to_string(state.join("firmware/current.json")).ok()?;
        Some(serde_json::from_str(&text).unwrap())
    };

    // A binary that fails its self-test is refused, with what it printed.
    let o = run(&mut firmware(&fails_self_test, "1.0"));
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("self-test") && err.contains("no camera driver"),
        "{err}"
    );
    assert_eq!(current_json(), None);

    // A good one: installed, the device restarts into it, and it confirms itself.
    let o = run(&mut firmware(&good, "1.0"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let good_id = json_of(&o)["active_firmware"].as_str().unwrap().to_owned();
    assert_eq!(current_json().unwrap()["version"], "1.0");
    let start = Instant::now();
    while state.join("firmware/trial.json").exists() {
        assert!(start.elapsed() < Duration::from_secs(20), "never confirmed");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Older than the running one: refused.
    let o = run(&mut firmware(&good, "0.9"));
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("downgrade"));

    // Passes its self-test but does not stay up: the next start rolls back to the good one,
    // and flash says the device did not keep it.
    let o = run(&mut firmware(&crashes, "2.0"));
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&good_id), "{err}");
    let now = current_json().unwrap();
    assert_eq!(now["version"], "1.0");
    assert!(now["sha256"].as_str().unwrap().starts_with(&good_id));

    // A clean stop ends the service.
    let pid = current.lock().unwrap().unwrap();
    let kill = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let codes = supervisor.join().unwrap();
    let logged = std::fs::read_to_string(&log).unwrap();
    // Packaged binary → 75 (installed 1.0) → 1.0 → 75 (installed 2.0) → 2.0 crashed (3) →
    // rolled back to 1.0 → stopped (0).
    assert_eq!(codes, vec![75, 75, 3, 0], "{logged}");
    assert!(
        logged.contains("never confirmed itself; rolled back"),
        "{logged}"
    );
}

#[test]
fn flash_names_a_missing_port_a_silent_device_and_another_protocol_version() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("image.bin");
    std::fs::write(&file, b"not a model").unwrap();
    let args = ["--no-local-check", "--image-version", "1", "--retries", "1"];

    let o = run(&mut flash(Path::new("/dev/ttyPETCAM-none"), &file, &args));
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("/dev/ttyPETCAM-none does not exist; serial ports here:"),
        "{err}"
    );

    // Nobody on the far end.
    let (device_port, host_port, _slaves, _line) = link();

    // Held by another program (this test): named, with its process id.
    {
        let _held = serialport::new(host_port.to_string_lossy(), 921_600)
            .open_native()
            .unwrap();
        let o = run(&mut flash(&host_port, &file, &args));
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        let me = format!("(pid {})", std::process::id());
        assert!(err.contains("it is held by") && err.contains(&me), "{err}");
    }

    let o = run(&mut flash(&host_port, &file, &args));
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no answer from a petcam device"), "{err}");

    // A device of a later protocol version answers the Hello.
    let stop = Arc::new(AtomicBool::new(false));
    let device = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut p = serialport::new(device_port.to_string_lossy(), 921_600)
                .timeout(Duration::from_millis(50))
                .open_native()
                .unwrap();
            let mut rx = Reassembler::new();
            let mut buf = [0u8; 1024];
            while !stop.load(Ordering::Relaxed) {
                let Ok(n) = p.read(&mut buf) else { continue };
                let mut hello = false;
                rx.push(&buf[..n], |r| {
                    hello |= matches!(r, Received::Message(Message::Hello(_)))
                });
                if hello {
                    let mut theirs = Hello::new(Role::Device, "future", "9.0", "");
                    theirs.protocol_version = PROTOCOL_VERSION + 1;
                    p.write_all(&encode(&Message::Hello(theirs)).unwrap())
                        .unwrap();
                }
            }
        })
    };
    let o = run(&mut flash(&host_port, &file, &args));
    stop.store(true, Ordering::Relaxed);
    device.join().unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    let both = format!(
        "this side speaks version {PROTOCOL_VERSION}, the peer speaks version {}",
        PROTOCOL_VERSION + 1
    );
    assert!(err.contains(&both), "{err}");
}
