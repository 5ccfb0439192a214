//! The serial link through a real kernel driver: `petcam-device` runs in the test VM
//! (`tools/vm`, see `tests/vm/README.md`) on the guest's 16550 UART, `/dev/ttyS1`, and the
//! host's real `petcam monitor` and `petcam flash` talk to it on the pseudo-terminal that qemu
//! joins that UART to.
//!
//! - Telemetry: the Hello, heartbeats and decision events of `petcam-device run`, decoded by
//!   `petcam monitor --jsonl`, are what the guest printed, and nothing is lost on the way.
//! - A flash to `petcam-device agent`, its state directory on the VM's ext4 disk, completes.
//! - Power cuts: qemu SIGKILLed during uploads and during the commit (self-test, activation),
//!   the guest booted again from the same disk image each time. The upload resumes from the
//!   offset the device held (at most what it had acknowledged less one sync interval), and the
//!   active model is always the complete old or the complete new one, checked byte for byte
//!   against both model files. `PETCAM_VM_POWER_CUTS` sets how many cuts (default
//!   [`DEFAULT_CUTS`]), `PETCAM_VM_POWER_CUT_SEED` where in the lists of kill points they start.
//!
//! Between `petcam flash` and the VM's pty sits a proxy in this test that decodes both
//! directions: it cuts the power when the device acknowledges a given offset, and records what
//! was sent and acknowledged. Cuts after the commit are timed from the agent's own fsync and
//! rename calls, which the guest kernel's syscall tracepoints print on the console as they are
//! entered; nothing in `petcam-device` knows it is being watched.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use petcam_shared::protocol::{self, Message, Reassembler, Received};
use petcam_tests::vm::{self, Running, Share, Vm};
use petcam_tests::{binary, copy_first, run, shared, train_and_export};
use serde_json::Value;
use serialport::{SerialPort, TTYPort};

/// The 16550's own speed (`tools/vm` sets the guest's ttyS1 to it); both ends use it.
const BAUD: &str = "115200";

/// The agent's state directory on the VM's ext4 disk.
const STATE: &str = "/mnt/state/petcam";

/// What a power cut may cost a resumed upload: the agent syncs its staging file every 64 KiB
/// (`SYNC_EVERY` in device/src/update.rs) and acknowledges a chunk only after writing it.
const SYNC_EVERY: u64 = 64 * 1024;

/// Power cuts when `PETCAM_VM_POWER_CUTS` is not set: one during an upload and one during an
/// activation, which is what fits CI's time for these tests.
const DEFAULT_CUTS: usize = 2;

/// Where upload cuts land: when the device has acknowledged this fraction of what was left to
/// send in that boot.
const UPLOAD_POINTS: [f64; 6] = [0.4, 0.75, 0.1, 0.9, 0.55, 0.25];

/// Where commit cuts land: `delay_ms` after the agent entered its `event`-th fsync or rename
/// since the `Commit` arrived (see [`COMMIT_EVENTS`]).
const COMMIT_POINTS: [(usize, u64); 12] = [
    (5, 0),
    (2, 0),
    (1, 1500),
    (6, 20),
    (3, 0),
    (4, 1),
    (6, 0),
    (2, 5),
    (5, 3),
    (6, 60),
    (1, 200),
    (4, 0),
];

/// The fsync and rename calls of a commit in device/src/update.rs, in order: the staged file
/// is synced, then read, hashed and self-tested (seconds here), then activated.
const COMMIT_EVENTS: [&str; 6] = [
    "fsync of the staged file (then hash and self-test)",
    "rename of the staged file into models/",
    "fsync of models/",
    "fsync of active.json.tmp",
    "rename of active.json.tmp over active.json",
    "fsync of the state directory",
];

fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{name}={v:?} is not a whole number: {e}")),
        Err(_) => default,
    }
}

fn sorted_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn sigterm(child: &Child) {
    vm::kill(child.id(), "TERM");
}

// ---------------------------------------------------------------------------------------------
// Telemetry

/// Frames the telemetry test classifies in the guest (about a second each under emulation).
const FRAMES: u64 = 8;

#[test]
fn telemetry_from_the_guest_uart_is_decoded_by_petcam_monitor() {
    if !vm::available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let Some((photos, tflite)) = photos_and_tflite(tmp.path()) else {
        return;
    };
    let model = small_model(&photos, &tflite, &tmp.path().join("model"), "1");
    let share = Share::with_device("serial-telemetry");
    share.add(&model, "model.onnx");
    // FRAMES / 2 cats, then as many dogs: one MJPEG file of concatenated photos.
    let mut mjpeg = Vec::new();
    for class in ["cat", "dog"] {
        for photo in sorted_files(&photos.join(class))
            .iter()
            .take(FRAMES as usize / 2)
        {
            mjpeg.extend(std::fs::read(photo).unwrap());
        }
    }
    std::fs::write(share.path().join("frames.mjpeg"), &mjpeg).unwrap();
    let jsonl = tmp.path().join("monitor.jsonl");

    let running = Vm::new()
        .share(&share)
        .args(["--serial-pty"])
        .spawn(&format!(
            "./petcam-device run --model model.onnx --source mjpeg:frames.mjpeg --threads 1 \
         --smooth 1 --threshold 0.5 --port /dev/ttyS1 --baud {BAUD} \
         --device-id vm-telemetry --json"
        ));
    let pty = running.serial_pty();
    // The monitor greets the device as it starts. Bytes that reach the guest while its init
    // has ttyS1 open for `stty` (default termios until then: echo on, `^@` for 0x00) come back
    // as an echo. So it starts once the guest is set up; tools/vm holds the pty open from the
    // start, so nothing the guest sends before the monitor opens it is lost.
    running
        .wait_for_stderr("vm: setup done", Duration::from_secs(120))
        .unwrap_or_else(|| panic!("the guest never got set up\n{}", running.stderr()));
    let monitor = Command::new(binary("petcam"))
        .args(["monitor", "--baud", BAUD, "--json", "--port"])
        .arg(&pty)
        .arg("--jsonl")
        .arg(&jsonl)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = running.wait();
    out.assert_success();
    let lines = json_lines(&out.stdout);
    let summary = lines
        .iter()
        .find(|l| l["event"] == "summary")
        .unwrap_or_else(|| panic!("no summary from the guest: {}", out.stdout));
    let decisions: Vec<&Value> = lines.iter().filter(|l| l["event"] == "decision").collect();
    assert_eq!(summary["frames"], FRAMES, "{summary}");
    let link = &summary["telemetry"];
    assert_eq!(link["connects"], 1, "{summary}");
    assert_eq!(link["dropped"], 0, "{summary}");
    let sent = link["messages"].as_u64().unwrap();

    // The device flushed its port before it exited; give the monitor a moment to write the
    // last lines, then stop it.
    let end = Instant::now() + Duration::from_secs(15);
    let received = || {
        std::fs::read_to_string(&jsonl)
            .map(|t| t.lines().count() as u64)
            .unwrap_or(0)
    };
    while received() < sent && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
    sigterm(&monitor);
    let m = monitor.wait_with_output().unwrap();
    let m_stderr = String::from_utf8_lossy(&m.stderr);
    assert!(
        m.status.success(),
        "petcam monitor: {}\n{m_stderr}",
        m.status
    );
    let m_summary: Value = serde_json::from_slice(&m.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&m.stdout)));
    let got_text = std::fs::read_to_string(&jsonl).unwrap();
    assert_eq!(
        m_summary["rejected"], 0,
        "{m_summary}\n{summary}\n{got_text}\n{m_stderr}"
    );
    // Every message the device wrote came through the UART, and nothing else.
    assert_eq!(m_summary["total"], sent, "{m_summary}\n{summary}");

    let got = json_lines(&got_text);
    assert_eq!(got.len() as u64, sent);
    let of = |t: &str| -> Vec<&Value> {
        got.iter()
            .filter(|l| l["type"] == t)
            .map(|l| &l["message"])
            .collect()
    };
    assert!(of("Error").is_empty(), "{got:?}");
    let hello = of("Hello");
    assert_eq!(hello.len(), 1, "{got:?}");
    assert_eq!(got[0]["type"], "Hello", "the Hello comes first: {got:?}");
    let hello = hello[0];
    assert_eq!(hello["role"], "Device");
    assert_eq!(hello["device_id"], "vm-telemetry");
    assert_eq!(hello["firmware_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(hello["protocol_version"], protocol::PROTOCOL_VERSION);
    let model_id = hello["model_id"].as_str().unwrap();
    assert_eq!(model_id.len(), 12, "{hello}");

    // Heartbeats, about one a second while the frames were classified, with the model's id
    // and the frame count growing.
    let beats = of("Heartbeat");
    assert!(beats.len() >= 3, "{} heartbeats: {got:?}", beats.len());
    let mut last = (0u64, 0u64);
    let mut counts = std::collections::BTreeSet::new();
    for b in &beats {
        assert_eq!(b["model_id"], model_id, "{b}");
        let (up, frames) = (
            b["uptime_ms"].as_u64().unwrap(),
            b["frames"].as_u64().unwrap(),
        );
        assert!(
            up > last.0 && frames >= last.1 && frames <= FRAMES,
            "{b} after {last:?}"
        );
        last = (up, frames);
        counts.insert(frames);
    }
    assert!(counts.len() >= 2, "the frame count never moved: {counts:?}");

    // Each decision the guest printed arrived as an Event, in order, with the same labels and
    // confidence.
    let events = of("Event");
    assert!(!decisions.is_empty(), "{}", out.stdout);
    assert_eq!(events.len(), decisions.len(), "{events:?}\n{decisions:?}");
    let label = |v: &Value| -> Value {
        if v == "none" {
            Value::Null
        } else {
            v.clone()
        }
    };
    let mut frame = 0;
    for (e, d) in events.iter().zip(&decisions) {
        assert_eq!(e["from"], label(&d["from"]), "{e} vs {d}");
        assert_eq!(e["to"], label(&d["to"]), "{e} vs {d}");
        assert_eq!(e["confidence"], d["confidence"], "{e} vs {d}");
        let f = e["frame"].as_u64().unwrap();
        assert!(f > frame && f <= FRAMES, "{e}");
        frame = f;
    }
}

// ---------------------------------------------------------------------------------------------
// The proxy between `petcam flash` and the VM's pty

/// What the proxy saw of one `petcam flash` session.
#[derive(Debug, Default, Clone)]
struct Seen {
    /// The agent greeted: its port is open.
    device_hello: bool,
    begin_sent: bool,
    /// The device's answer to `Begin`: the offset it holds of this image.
    begin_ack: Option<u64>,
    /// The highest offset the device acknowledged for a chunk.
    acked: u64,
    /// The end of the furthest chunk forwarded to the device.
    sent_end: u64,
    commit_sent: bool,
    /// The device acknowledged the commit: the new model is active and synced.
    commit_acked: bool,
    nacks: Vec<String>,
    /// The power was cut (by the proxy or the test).
    killed: bool,
}

type Trigger = Box<dyn FnMut(&Seen) -> bool + Send>;

struct ProxyState {
    seen: Mutex<Seen>,
    changed: Condvar,
    /// Checked on every message from the device; when it says so, the proxy cuts the power
    /// before passing that message on.
    trigger: Mutex<Option<Trigger>>,
    qemu: u32,
    stop: AtomicBool,
}

impl ProxyState {
    fn update(&self, f: impl FnOnce(&mut Seen)) {
        f(&mut self.seen.lock().unwrap());
        self.changed.notify_all();
    }

    /// SIGKILL to qemu: the power cut.
    fn cut(&self) {
        vm::kill(self.qemu, "KILL");
        self.update(|s| s.killed = true);
    }
}

/// A pseudo-terminal for `petcam flash`, joined to the VM's pty by two threads that decode
/// what they carry.
struct Proxy {
    state: Arc<ProxyState>,
    host_port: PathBuf,
    /// Held open so the master side never reads a hang-up between two flash sessions.
    _slave: TTYPort,
}

impl Proxy {
    fn start(vm_pty: &Path, qemu: u32) -> Proxy {
        let (master, slave) = TTYPort::pair().unwrap();
        // Duplicates are close-on-exec: the VMs and programs started meanwhile do not inherit them.
        let (mut master, slave) = (
            master.try_clone_native().unwrap(),
            slave.try_clone_native().unwrap(),
        );
        master.set_timeout(Duration::from_millis(20)).unwrap();
        let host_port = PathBuf::from(slave.name().unwrap());
        let to_vm = serialport::new(vm_pty.to_string_lossy(), 115_200)
            .timeout(Duration::from_millis(20))
            .open_native()
            .unwrap_or_else(|e| panic!("cannot open the VM's pty {}: {e}", vm_pty.display()));
        let from_vm = to_vm.try_clone_native().unwrap();
        let state = Arc::new(ProxyState {
            seen: Mutex::new(Seen::default()),
            changed: Condvar::new(),
            trigger: Mutex::new(None),
            qemu,
            stop: AtomicBool::new(false),
        });
        let from_host = master.try_clone_native().unwrap();
        let s = state.clone();
        std::thread::spawn(move || pump(from_host, to_vm, &s, true));
        let s = state.clone();
        std::thread::spawn(move || pump(from_vm, master, &s, false));
        Proxy {
            state,
            host_port,
            _slave: slave,
        }
    }

    /// Forgets the last session and arms `trigger` (or none) for the next.
    fn reset(&self, trigger: Option<Trigger>) {
        *self.state.trigger.lock().unwrap() = trigger;
        self.state.update(|s| {
            *s = Seen {
                device_hello: s.device_hello,
                killed: s.killed,
                ..Seen::default()
            }
        });
    }

    fn seen(&self) -> Seen {
        self.state.seen.lock().unwrap().clone()
    }

    /// Waits until `done` holds for what the proxy saw; the last state and whether it held.
    fn wait(&self, within: Duration, done: impl Fn(&Seen) -> bool) -> (Seen, bool) {
        let end = Instant::now() + within;
        let mut s = self.state.seen.lock().unwrap();
        loop {
            if done(&s) {
                return (s.clone(), true);
            }
            let now = Instant::now();
            if now >= end {
                return (s.clone(), false);
            }
            s = self
                .state
                .changed
                .wait_timeout(s, (end - now).min(Duration::from_millis(100)))
                .unwrap()
                .0;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
    }
}

/// Carries bytes one way, decoding them as it goes. `to_device`: from `petcam flash` to the
/// agent. Ends when either side is gone or the power was cut.
fn pump(mut from: TTYPort, mut to: TTYPort, state: &ProxyState, to_device: bool) {
    let mut rx = Reassembler::new();
    let mut buf = [0u8; 4096];
    while !state.stop.load(Ordering::Relaxed) {
        let n = match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => continue,
            Err(_) => return,
        };
        let mut messages = Vec::new();
        rx.push(&buf[..n], |r| {
            if let Received::Message(m) = r {
                messages.push(m)
            }
        });
        let mut cut = false;
        for m in messages {
            state.update(|s| note(s, &m, to_device));
            if !to_device {
                let seen = state.seen.lock().unwrap().clone();
                if let Some(t) = state.trigger.lock().unwrap().as_mut() {
                    cut |= !seen.killed && t(&seen);
                }
            }
        }
        if cut {
            state.cut();
        }
        if state.seen.lock().unwrap().killed {
            return;
        }
        // A full buffer on the far side is back-pressure, not a broken line.
        if protocol::write_frame(&mut to, &buf[..n], Duration::from_secs(30)).is_err() {
            return;
        }
    }
}

fn note(s: &mut Seen, m: &Message, to_device: bool) {
    match (to_device, m) {
        (true, Message::Begin(_)) => {
            s.begin_sent = true;
            s.begin_ack = None;
        }
        (true, Message::Chunk(c)) => s.sent_end = s.sent_end.max(c.offset + c.data.len() as u64),
        (true, Message::Commit) => s.commit_sent = true,
        (false, Message::Hello(_)) => s.device_hello = true,
        (false, Message::Ack { offset }) => {
            if s.commit_sent {
                s.commit_acked = true;
            } else if s.begin_sent && s.begin_ack.is_none() {
                s.begin_ack = Some(*offset);
            } else {
                s.acked = s.acked.max(*offset);
            }
        }
        (false, Message::Nack(n)) => s.nacks.push(format!("{:?}: {}", n.reason, n.detail)),
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Models and the state the guest finds at boot

/// A model the test flashes.
#[derive(Debug)]
struct Model {
    name: &'static str,
    path: PathBuf,
    bytes: Vec<u8>,
    /// Hex, as the agent names its files.
    sha256: String,
    version: &'static str,
}

fn sha256_hex(path: &Path) -> String {
    let out = run(Command::new("sha256sum").arg(path));
    assert!(out.status.success(), "sha256sum {}", path.display());
    String::from_utf8_lossy(&out.stdout)[..64].to_owned()
}

/// Photos of both classes from `../shared`, and Google's MobileNetV2 from its TFLite file;
/// `None` (with a message) when `../shared` is missing.
fn photos_and_tflite(dir: &Path) -> Option<(PathBuf, PathBuf)> {
    let data = shared("datasets/cats-vs-dogs")?;
    let tflite = shared("backbones/mobilenet_v2_1.0_224_quant.tflite")?;
    let photos = dir.join("photos");
    for class in ["cat", "dog"] {
        copy_first(&data.join("train").join(class), &photos.join(class), 6);
    }
    Some((photos, tflite))
}

/// A small model of `photos`, about a second of training on the host. MobileNetV2 at 96x96:
/// under emulation every byte of an upload and every inference is dear, and its file is two
/// thirds of EfficientNet-Lite0's (2.4 MB, which crosses the emulated UART at some 70 KB/s)
/// and a frame a fifth of the time.
fn small_model(photos: &Path, tflite: &Path, out: &Path, seed: &str) -> PathBuf {
    let cache = photos.with_file_name("cache");
    let o = run(train_and_export(photos, tflite, out, &cache)
        .args(["--backbone", "mobilenet-v2", "--input-size", "96"])
        .args([
            "--val-fraction",
            "0.3",
            "--latency-runs",
            "1",
            "--seed",
            seed,
        ]));
    assert!(o.status.success(), "train-and-export failed");
    out.join("model.onnx")
}

/// Two small models of the same photos that differ (another seed).
fn two_models(dir: &Path) -> Option<[Model; 2]> {
    let (photos, tflite) = photos_and_tflite(dir)?;
    let model = |seed: &str, name, version| {
        let path = small_model(&photos, &tflite, &dir.join(name), seed);
        Model {
            name,
            bytes: std::fs::read(&path).unwrap(),
            sha256: sha256_hex(&path),
            path,
            version,
        }
    };
    let models = [model("1", "m1", "1.0"), model("2", "m2", "2.0")];
    assert_ne!(models[0].bytes, models[1].bytes);
    Some(models)
}

/// The agent's state directory as a boot found it (copied into the share before the agent
/// started), checked: every model file is whole, and the active one is one of `models`.
#[derive(Debug)]
struct Found {
    /// Index into the models of the active one, if any.
    active: Option<usize>,
    /// The staged upload: the model it is of and the bytes held.
    staged: Option<(usize, u64)>,
    /// Files in models/ that active.json does not name (left by a cut activation; the agent
    /// removes them at start).
    orphans: usize,
}

fn which(models: &[Model; 2], sha: &str, what: &str) -> usize {
    models
        .iter()
        .position(|m| m.sha256 == sha)
        .unwrap_or_else(|| panic!("{what} names {sha}, neither model"))
}

fn inspect(dir: &Path, models: &[Model; 2]) -> Found {
    let read_json = |p: &Path| -> Option<Value> {
        let text = std::fs::read_to_string(p).ok()?;
        Some(
            serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{} is not whole JSON ({e}): {text:?}", p.display())),
        )
    };
    // A file in models/ is only ever a whole model: it got there by a rename.
    let mut files = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir.join("models")) {
        for f in rd.flatten() {
            let bytes = std::fs::read(f.path()).unwrap();
            let name = f.file_name().to_string_lossy().into_owned();
            let i = models
                .iter()
                .position(|m| m.bytes == bytes)
                .unwrap_or_else(|| {
                    panic!(
                        "models/{name} ({} bytes) is neither model whole: a mix",
                        bytes.len()
                    )
                });
            assert_eq!(
                name,
                format!("{}.onnx", models[i].sha256),
                "a file named for one model holds another"
            );
            files.push(name);
        }
    }
    let mut named = Vec::new();
    let active = read_json(&dir.join("active.json")).map(|record| {
        let model = &record["model"];
        let i = which(models, model["sha256"].as_str().unwrap(), "active.json");
        assert_eq!(model["size"], models[i].bytes.len(), "{record}");
        assert_eq!(model["version"], models[i].version, "{record}");
        named.push(format!("{}.onnx", models[i].sha256));
        if !record["previous"].is_null() {
            let p = which(
                models,
                record["previous"]["sha256"].as_str().unwrap(),
                "active.json's previous",
            );
            named.push(format!("{}.onnx", models[p].sha256));
        }
        for n in &named {
            assert!(
                files.contains(n),
                "active.json names {n}, not in models/: {files:?}"
            );
        }
        i
    });
    let staged = read_json(&dir.join("staging/model.json")).map(|record| {
        let i = which(
            models,
            record["sha256"].as_str().unwrap(),
            "staging/model.json",
        );
        let part = std::fs::read(dir.join("staging/model.part")).unwrap_or_default();
        assert!(
            models[i].bytes.starts_with(&part),
            "staging/model.part ({} bytes) is not the start of {}",
            part.len(),
            models[i].name
        );
        (i, part.len() as u64)
    });
    let orphans = files.iter().filter(|f| !named.contains(f)).count();
    Found {
        active,
        staged,
        orphans,
    }
}

// ---------------------------------------------------------------------------------------------
// Boots of the agent on one disk image

/// One boot of the VM running `petcam-device agent` on ttyS1, its state on the disk image.
struct Boot {
    running: Running,
    proxy: Proxy,
    found: Found,
    n: usize,
    started: Instant,
}

fn boot(n: usize, share: &Share, disk: &Path, models: &[Model; 2]) -> Boot {
    let started = Instant::now();
    let pidfile = share.path().join(format!("qemu-{n}.pid"));
    let seen = format!("/mnt/host/seen-{n}");
    // Under emulation each receive interrupt costs the same whatever it carries: a FIFO
    // trigger of 14 bytes instead of the driver's 8 makes uploads almost twice as fast.
    // The syscall tracepoints of the agent's process (the shell's pid, kept by exec) go to the
    // console, where the test times its cuts from them.
    let guest = format!(
        "if [ -d {STATE} ]; then cp -r {STATE} {seen}; else mkdir {seen}; fi && \
         echo 14 > /sys/class/tty/ttyS1/rx_trig_bytes && \
         T=/sys/kernel/tracing && mount -t tracefs tracefs $T && echo $$ > $T/set_event_pid && \
         for e in fsync rename renameat renameat2; do \
           echo 1 > $T/events/syscalls/sys_enter_$e/enable || exit 1; done && \
         {{ cat $T/trace_pipe >&2 & }} && \
         exec ./petcam-device agent --port /dev/ttyS1 --baud {BAUD} --state-dir {STATE} \
           --allow-unsigned --allow-downgrade --threads 1 --latency-budget-ms 600000 \
           --device-id vm-agent"
    );
    let running = Vm::new()
        .share(share)
        .args(["--serial-pty", "--timeout", "1800"])
        .args([
            Path::new("--disk"),
            disk,
            Path::new("--pidfile"),
            pidfile.as_path(),
        ])
        .spawn(&guest);
    let pty = running.serial_pty();
    let qemu = vm::read_pid(&pidfile, Duration::from_secs(60));
    let proxy = Proxy::start(&pty, qemu);
    let (_, up) = proxy.wait(Duration::from_secs(120), |s| s.device_hello);
    assert!(up, "the agent never greeted\n{}", running.stderr());
    let found = inspect(&share.path().join(format!("seen-{n}")), models);
    eprintln!(
        "boot {n}: agent up after {:.1} s; found {found:?}",
        started.elapsed().as_secs_f64()
    );
    Boot {
        running,
        proxy,
        found,
        n,
        started,
    }
}

impl Boot {
    /// Starts `petcam flash` of `model` through the proxy.
    fn flash(&self, model: &Model) -> Child {
        Command::new(binary("petcam"))
            .args([
                "flash",
                "--baud",
                BAUD,
                "--json",
                "--image-version",
                model.version,
            ])
            .arg("--port")
            .arg(&self.proxy.host_port)
            .arg(&model.path)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Cuts the power (if not done yet) and waits for the VM to be gone.
    fn power_cut(self, flash: Option<Child>) {
        if !self.proxy.seen().killed {
            self.proxy.state.cut();
        }
        if let Some(mut f) = flash {
            let _ = f.kill();
            let _ = f.wait();
        }
        let out = self.running.wait();
        assert_eq!(
            out.code(),
            Some(137),
            "tools/vm after the cut: {:?}",
            out.status
        );
        eprintln!(
            "boot {}: power cut after {:.1} s",
            self.n,
            self.started.elapsed().as_secs_f64()
        );
    }
}

/// Waits for `petcam flash` to finish; its JSON report, or a panic with its stderr.
fn flash_ok(child: Child) -> Value {
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "petcam flash failed: {stderr}");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// A kill point.
#[derive(Debug, Clone, Copy)]
enum Cut {
    /// When the device has acknowledged this fraction of what is left to send.
    Upload(f64),
    /// `delay_ms` after the agent entered its `event`-th fsync or rename of the commit.
    Commit { event: usize, delay_ms: u64 },
}

impl std::fmt::Display for Cut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cut::Upload(x) => write!(f, "upload, at {:.0}% of what was left", x * 100.0),
            Cut::Commit { event, delay_ms } => {
                write!(
                    f,
                    "commit, {delay_ms} ms after the {}",
                    COMMIT_EVENTS[event - 1]
                )
            }
        }
    }
}

/// The kill points, taken in turn from [`UPLOAD_POINTS`] and [`COMMIT_POINTS`] (each from
/// `seed` on): cuts alternate between an upload and a commit, except that a boot with little
/// left to upload cuts its commit.
#[derive(Debug)]
struct Schedule {
    uploads: usize,
    commits: usize,
}

impl Schedule {
    fn new(seed: usize) -> Schedule {
        Schedule {
            uploads: seed,
            commits: seed,
        }
    }

    fn next(&mut self, i: usize, left_to_send: u64) -> Cut {
        if i.is_multiple_of(2) && left_to_send >= 4 * SYNC_EVERY {
            self.uploads += 1;
            Cut::Upload(UPLOAD_POINTS[(self.uploads - 1) % UPLOAD_POINTS.len()])
        } else {
            self.commits += 1;
            let (event, delay_ms) = COMMIT_POINTS[(self.commits - 1) % COMMIT_POINTS.len()];
            Cut::Commit { event, delay_ms }
        }
    }
}

/// The agent's fsync and rename calls, as the guest's tracepoints print them.
fn is_sync_or_rename(line: &str) -> bool {
    line.contains("sys_fsync(") || line.contains("sys_rename")
}

/// What a cut left to check at the next boot.
#[derive(Debug)]
struct Pending {
    cut: Cut,
    /// The model being flashed and the one active before.
    target: usize,
    old: usize,
    seen: Seen,
    /// The commit's fsync and rename calls the agent entered before the power went.
    events: usize,
}

/// One line of the closing table.
#[derive(Debug)]
struct Row {
    boot: usize,
    cut: Cut,
    what: String,
}

#[test]
fn a_flash_over_the_guest_uart_completes_and_power_cuts_never_leave_a_mixed_model() {
    if !vm::available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let Some(models) = two_models(tmp.path()) else {
        return;
    };
    let cuts = env_usize("PETCAM_VM_POWER_CUTS", DEFAULT_CUTS);
    let seed = env_usize("PETCAM_VM_POWER_CUT_SEED", 0);
    let share = Share::with_device("serial-flash");
    let disk = tmp.path().join("state.img");
    let t0 = Instant::now();

    // Boot 0, an empty disk: a whole flash, and the device reports the model active.
    let mut b = boot(0, &share, &disk, &models);
    assert!(b.found.active.is_none() && b.found.staged.is_none());
    let report = flash_ok(b.flash(&models[0]));
    eprintln!("boot 0: flashed {}: {report}", models[0].name);
    assert_eq!(report["resumed_from"], 0, "{report}");
    assert_eq!(report["active_model"], &models[0].sha256[..12], "{report}");
    assert_eq!(report["bytes"], models[0].bytes.len(), "{report}");
    assert_eq!(b.proxy.seen().begin_ack, Some(0));
    let mut active = 0;
    let mut rows = Vec::new();

    let mut schedule = Schedule::new(seed);
    for i in 0..cuts {
        // The model not active, resuming what the device holds of it.
        let target = 1 - active;
        let held = match b.found.staged {
            Some((m, held)) if m == target => held,
            _ => 0,
        };
        let size = models[target].bytes.len() as u64;
        let cut = schedule.next(i, size - held);
        let trigger: Option<Trigger> = match cut {
            Cut::Upload(x) => {
                let at = held + ((size - held) as f64 * x) as u64;
                Some(Box::new(move |s: &Seen| s.acked >= at))
            }
            Cut::Commit { .. } => None,
        };
        b.proxy.reset(trigger);
        let flash = b.flash(&models[target]);
        let mut events = 0;
        match cut {
            Cut::Upload(_) => {
                let (s, cut_done) = b.proxy.wait(Duration::from_secs(600), |s| s.killed);
                assert!(
                    cut_done,
                    "boot {i}: the upload never reached the cut: {s:?}"
                );
            }
            Cut::Commit { event, delay_ms } => {
                let (s, sent) = b
                    .proxy
                    .wait(Duration::from_secs(600), |s| s.commit_sent || s.killed);
                assert!(sent, "boot {i}: no commit: {s:?}");
                let from = b.running.stderr_len();
                let mut at = from;
                for k in 0..event {
                    let (next, line) = b
                        .running
                        .wait_for_stderr_after(at, is_sync_or_rename, Duration::from_secs(300))
                        .unwrap_or_else(|| {
                            panic!(
                                "boot {i}: the agent's call {} of the commit never came: {:?}\n{}",
                                k + 1,
                                b.proxy.seen(),
                                b.running.stderr()
                            )
                        });
                    at = next;
                    eprintln!("boot {i}: commit call {}: {}", k + 1, line.trim());
                }
                std::thread::sleep(Duration::from_millis(delay_ms));
                b.proxy.state.cut();
                // What reached the console before the power went, and what was still on its
                // way: all of it was entered before the cut.
                std::thread::sleep(Duration::from_millis(300));
                events = b.running.stderr()[from..]
                    .lines()
                    .filter(|l| is_sync_or_rename(l))
                    .count();
            }
        }
        let seen = b.proxy.seen();
        assert!(seen.nacks.is_empty(), "boot {i}: refused: {:?}", seen.nacks);
        assert_eq!(
            seen.begin_ack,
            Some(held),
            "boot {i}: the device did not resume from the {held} bytes it held"
        );
        eprintln!("boot {i}: cut ({cut}) with {seen:?}, {events} commit calls entered");
        b.power_cut(Some(flash));
        let p = Pending {
            cut,
            target,
            old: active,
            seen,
            events,
        };
        // The guest boots again from the same disk and finds what the cut left.
        b = boot(i + 1, &share, &disk, &models);
        let what = check_after_cut(&p, &b.found, &models);
        eprintln!("boot {}: after the cut ({}): {what}", i + 1, p.cut);
        active = b.found.active.expect("an active model");
        rows.push(Row {
            boot: i,
            cut: p.cut,
            what,
        });
    }

    // The last boot only looked (boot 1 also saw the whole flash of boot 0 survive a cut).
    b.power_cut(None);

    eprintln!(
        "{} power cut(s) in {:.1} s (seed {seed}):",
        rows.len(),
        t0.elapsed().as_secs_f64()
    );
    for r in &rows {
        eprintln!("  boot {}: {}: {}", r.boot, r.cut, r.what);
    }
    assert_eq!(rows.len(), cuts);
}

/// Checks what a boot found after the cut `p`; a line saying what happened.
fn check_after_cut(p: &Pending, found: &Found, models: &[Model; 2]) -> String {
    let now = found.active.expect("an active model");
    let name = |i: usize| models[i].name;
    match p.cut {
        Cut::Upload(_) => {
            assert_eq!(now, p.old, "a cut upload changed the active model");
            let (m, held) = found
                .staged
                .unwrap_or_else(|| panic!("the cut upload left nothing staged: {found:?}"));
            assert_eq!(m, p.target, "the staged upload is of the other model");
            assert!(
                held <= p.seen.sent_end,
                "the device holds {held} bytes, more than the {} sent",
                p.seen.sent_end
            );
            assert!(
                held + SYNC_EVERY > p.seen.acked,
                "the device holds {held} bytes after acknowledging {}: more than one sync \
                 interval lost",
                p.seen.acked
            );
            format!(
                "{} still active; {held} bytes of {} held (acknowledged {}, sent {})",
                name(now),
                name(m),
                p.seen.acked,
                p.seen.sent_end
            )
        }
        Cut::Commit { .. } => {
            assert!(
                now == p.old || now == p.target,
                "active is neither the old nor the new model"
            );
            if p.seen.commit_acked {
                assert_eq!(
                    now, p.target,
                    "the device acknowledged the commit, then lost it"
                );
            }
            let staged = match found.staged {
                Some((m, held)) if m == p.target => {
                    format!("{held} bytes of {} staged", name(m))
                }
                _ => "nothing staged".into(),
            };
            format!(
                "{} active ({}), {} of 6 commit calls entered, {}{}, {} orphan(s)",
                name(now),
                if now == p.target { "new" } else { "old" },
                p.events,
                if p.seen.commit_acked {
                    "acknowledged, "
                } else {
                    ""
                },
                staged,
                found.orphans
            )
        }
    }
}
