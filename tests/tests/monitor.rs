//! `petcam monitor` against a fake device on a pseudo-terminal: every frame the device sends is
//! decoded into the JSONL file in order, bad frames are recorded as rejected, another protocol
//! version is reported once, the monitor greets the device, a vanished port is reopened, and
//! SIGTERM ends it cleanly.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use petcam_shared::protocol::{
    encode, ErrorReport, ErrorSource, Event, Heartbeat, Hello, Log, LogLevel, Message, Reassembler,
    Received, Role, PROTOCOL_VERSION,
};
use petcam_tests::binary;
use serde_json::Value;
use serialport::{SerialPort, TTYPort};

/// Longest wait for something the monitor should do at once; only reached on failure.
const PATIENCE: Duration = Duration::from_secs(15);

/// Held while a pseudo-terminal's descriptors would leak into a child process, and while
/// spawning one.
static FORK: Mutex<()> = Mutex::new(());

/// A pseudo-terminal pair (master, slave) whose descriptors child processes do not inherit.
///
/// `TTYPort::pair` opens both ends without `O_CLOEXEC`: a monitor spawned meanwhile, by this test
/// or one running in parallel, would hold the device's end open, and closing it would never hang
/// up the port. `try_clone_native` duplicates with `O_CLOEXEC`; the lock keeps spawns out until
/// the originals are closed.
fn pair() -> (TTYPort, TTYPort) {
    let _fork = FORK.lock().unwrap_or_else(PoisonError::into_inner);
    let (master, slave) = TTYPort::pair().unwrap();
    (
        master.try_clone_native().unwrap(),
        slave.try_clone_native().unwrap(),
    )
}

/// Decodes what the monitor writes to the device side of the link, until stopped.
struct Listener {
    messages: Receiver<Message>,
    stop: Arc<AtomicBool>,
    /// Yields the number of frames that did not decode.
    thread: JoinHandle<u64>,
}

impl Listener {
    fn new(master: &TTYPort) -> Self {
        let mut port = master.try_clone_native().unwrap();
        port.set_timeout(Duration::from_millis(20)).unwrap();
        let (tx, messages) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut rx = Reassembler::new();
            let mut buf = [0u8; 1024];
            let mut rejected = 0;
            while !flag.load(Ordering::Relaxed) {
                match port.read(&mut buf) {
                    Ok(n) => rx.push(&buf[..n], |r| match r {
                        // The receiver is gone only once the test no longer cares.
                        Received::Message(m) => {
                            let _ = tx.send(m);
                        }
                        Received::Rejected { .. } => rejected += 1,
                    }),
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                    Err(_) => break,
                }
            }
            rejected
        });
        Self {
            messages,
            stop,
            thread,
        }
    }

    /// Waits for the monitor's Hello and StatusRequest: the port is open and being read.
    fn expect_greeting(&self) {
        let (mut hello, mut status) = (false, false);
        while !(hello && status) {
            match self.messages.recv_timeout(PATIENCE) {
                Ok(Message::Hello(h)) => {
                    assert_eq!(h.protocol_version, PROTOCOL_VERSION);
                    assert_eq!(h.role, Role::Host);
                    assert_eq!(h.device_id, "petcam");
                    hello = true;
                }
                Ok(Message::StatusRequest) => {
                    assert!(hello, "StatusRequest before Hello");
                    status = true;
                }
                Ok(other) => panic!("unexpected message from the monitor: {other:?}"),
                Err(e) => {
                    panic!("no greeting from the monitor (hello {hello}, status {status}): {e}")
                }
            }
        }
    }

    /// Stops reading; the messages received since the greeting and the undecodable frames.
    fn finish(self) -> (Vec<Message>, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let rejected = self.thread.join().unwrap();
        (self.messages.try_iter().collect(), rejected)
    }
}

/// Kills the monitor if a test fails before it exits.
struct Monitor(Option<Child>);

impl Monitor {
    fn spawn(port: &Path, jsonl: &Path, extra: &[&str]) -> Self {
        let _fork = FORK.lock().unwrap_or_else(PoisonError::into_inner);
        let child = Command::new(binary("petcam"))
            .arg("monitor")
            .arg("--port")
            .arg(port)
            .arg("--jsonl")
            .arg(jsonl)
            .arg("--json")
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Self(Some(child))
    }

    fn sigterm(&self) {
        let pid = self.0.as_ref().unwrap().id().to_string();
        let kill = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(kill.success());
    }

    /// Exit code, the `--json` summary and stderr.
    fn wait(mut self) -> (Option<i32>, Value, String) {
        let out = self.0.take().unwrap().wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let summary = serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("summary {stdout:?}: {e}\n{stderr}"));
        (out.status.code(), summary, stderr)
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn heartbeat(frames: u64) -> Message {
    Message::Heartbeat(Heartbeat {
        uptime_ms: frames * 100,
        frames,
        fps: 10.0,
        infer_p50_ms: 30.0,
        infer_p95_ms: 42.0,
        frames_dropped: 1,
        telemetry_dropped: 0,
        cpu_temp_c: None,
        model_id: "0123456789ab".into(),
        decision: Some("cat".into()),
        confidence: 0.9,
    })
}

fn device_hello(version: u16) -> Message {
    Message::Hello(Hello {
        protocol_version: version,
        ..Hello::new(Role::Device, "kitchen", "9.9.9", "0123456789ab")
    })
}

fn frames(messages: &[Message]) -> Vec<u8> {
    messages.iter().flat_map(|m| encode(m).unwrap()).collect()
}

fn lines(jsonl: &Path) -> Vec<Value> {
    std::fs::read_to_string(jsonl)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

/// Waits until the monitor has written `n` JSONL lines.
fn wait_for_lines(jsonl: &Path, n: usize) {
    let deadline = Instant::now() + PATIENCE;
    while lines(jsonl).len() < n {
        assert!(
            Instant::now() < deadline,
            "expected {n} lines in {}: {:?}",
            jsonl.display(),
            lines(jsonl)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn every_frame_is_recorded_in_order_and_bad_frames_are_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let jsonl = tmp.path().join("telemetry.jsonl");
    let (mut master, slave) = pair();
    master.set_timeout(Duration::from_secs(5)).unwrap();
    let listener = Listener::new(&master);
    let monitor = Monitor::spawn(
        Path::new(&slave.name().unwrap()),
        &jsonl,
        &["--duration", "3"],
    );
    listener.expect_greeting();

    let mut wire = frames(&[
        device_hello(PROTOCOL_VERSION),
        heartbeat(10),
        heartbeat(20),
        heartbeat(30),
        Message::Event(Event {
            at_ms: 1_200,
            frame: 31,
            from: None,
            to: Some("cat".into()),
            confidence: 0.875,
        }),
        Message::Error(ErrorReport {
            at_ms: 1_300,
            source: ErrorSource::Camera,
            message: "no frame from /dev/video0".into(),
        }),
    ]);
    // Line noise (invalid COBS), then a frame larger than any receiver keeps.
    wire.extend_from_slice(&[0x13, 0x37, 0xFF, 0x42, 0x00]);
    wire.extend(std::iter::repeat_n(0x55, 6000));
    wire.push(0x00);
    wire.extend(frames(&[
        heartbeat(40),
        heartbeat(50),
        // A device of another protocol version, saying hello twice.
        device_hello(PROTOCOL_VERSION + 1),
        device_hello(PROTOCOL_VERSION + 1),
        Message::Log(Log {
            at_ms: 1_400,
            level: LogLevel::Warn,
            message: "inference is slow".into(),
        }),
    ]));
    master.write_all(&wire).unwrap();

    let (code, summary, stderr) = monitor.wait();
    assert_eq!(code, Some(0), "{stderr}");
    let (extra, rejected) = listener.finish();
    assert!(
        extra.is_empty(),
        "the monitor greeted more than once: {extra:?}"
    );
    assert_eq!(rejected, 0, "undecodable frames from the monitor");

    let got = lines(&jsonl);
    let types: Vec<&str> = got.iter().map(|l| l["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            "Hello",
            "Heartbeat",
            "Heartbeat",
            "Heartbeat",
            "Event",
            "Error",
            "Rejected",
            "Rejected",
            "Heartbeat",
            "Heartbeat",
            "Rejected",
            "Rejected",
            "Log"
        ],
        "{got:#?}"
    );
    let t_ms: Vec<u64> = got.iter().map(|l| l["t_ms"].as_u64().unwrap()).collect();
    assert!(t_ms.windows(2).all(|w| w[0] <= w[1]), "{t_ms:?}");
    assert!(t_ms[t_ms.len() - 1] < 3_000, "{t_ms:?}");

    assert_eq!(got[0]["message"]["device_id"], "kitchen");
    assert_eq!(got[0]["message"]["role"], "Device");
    let beats: Vec<u64> = got
        .iter()
        .filter(|l| l["type"] == "Heartbeat")
        .map(|l| l["message"]["frames"].as_u64().unwrap())
        .collect();
    assert_eq!(beats, [10, 20, 30, 40, 50]);
    assert_eq!(got[1]["message"]["cpu_temp_c"], Value::Null);
    assert_eq!(got[4]["message"]["to"], "cat");
    assert_eq!(got[4]["message"]["from"], Value::Null);
    assert_eq!(got[4]["message"]["confidence"], 0.875);
    assert_eq!(got[5]["message"]["source"], "Camera");
    assert_eq!(got[5]["message"]["message"], "no frame from /dev/video0");
    assert_eq!(got[12]["message"]["level"], "Warn");
    // The noise, the oversized frame (its bytes before the delimiter), the foreign Hellos.
    assert_eq!(got[6]["bytes"], 4);
    assert!(
        got[6]["error"].as_str().unwrap().contains("COBS"),
        "{}",
        got[6]
    );
    assert_eq!(got[7]["bytes"], 6000);
    assert!(
        got[7]["error"]
            .as_str()
            .unwrap()
            .contains("exceeds the limit"),
        "{}",
        got[7]
    );
    for l in &got[10..12] {
        assert!(
            l["error"]
                .as_str()
                .unwrap()
                .contains("protocol version mismatch"),
            "{l}"
        );
    }

    // Events, errors and logs are one line each on a stderr that is not a terminal; the other
    // protocol version is explained once, with both versions.
    assert!(
        stderr.contains("event  not sure → cat (0.88) at frame 31"),
        "{stderr}"
    );
    assert!(
        stderr.contains("error  Camera: no frame from /dev/video0"),
        "{stderr}"
    );
    assert!(
        stderr.contains("log    warn: inference is slow"),
        "{stderr}"
    );
    let foreign = format!(
        "speaks protocol version {}, this petcam speaks {PROTOCOL_VERSION}",
        PROTOCOL_VERSION + 1
    );
    assert_eq!(stderr.matches(&foreign).count(), 1, "{stderr}");
    assert!(!stderr.contains("\x1b[H"), "redraws on a pipe: {stderr}");

    assert_eq!(summary["messages"]["Hello"], 1, "{summary}");
    assert_eq!(summary["messages"]["Heartbeat"], 5, "{summary}");
    assert_eq!(summary["messages"]["Event"], 1, "{summary}");
    assert_eq!(summary["messages"]["Error"], 1, "{summary}");
    assert_eq!(summary["messages"]["Log"], 1, "{summary}");
    assert_eq!(summary["total"], 9, "{summary}");
    assert_eq!(summary["rejected"], 4, "{summary}");
    assert_eq!(summary["reconnects"], 0, "{summary}");
    assert_eq!(summary["last_heartbeat"]["frames"], 50, "{summary}");
    assert_eq!(summary["device"]["device_id"], "kitchen", "{summary}");
    drop(slave);
}

#[test]
fn a_port_that_disappears_is_reopened_and_sigterm_stops_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let jsonl = tmp.path().join("telemetry.jsonl");
    // The monitor opens a link, so the test can point it at a new pseudo-terminal, as udev
    // points /dev/serial/by-id/... at a device that came back.
    let link = tmp.path().join("port");
    let (mut master, slave) = pair();
    std::os::unix::fs::symlink(slave.name().unwrap(), &link).unwrap();
    let listener = Listener::new(&master);
    let monitor = Monitor::spawn(&link, &jsonl, &[]);
    listener.expect_greeting();
    master
        .write_all(&frames(&[device_hello(PROTOCOL_VERSION), heartbeat(1)]))
        .unwrap();
    wait_for_lines(&jsonl, 2);

    // The device goes away: its end of the link closes.
    let (extra, _) = listener.finish();
    assert!(extra.is_empty(), "{extra:?}");
    drop((master, slave));
    let (mut master, slave) = pair();
    let next = tmp.path().join("port.next");
    std::os::unix::fs::symlink(slave.name().unwrap(), &next).unwrap();
    std::fs::rename(&next, &link).unwrap();

    // It comes back: greeted again, and read again.
    let listener = Listener::new(&master);
    listener.expect_greeting();
    master.write_all(&frames(&[heartbeat(2)])).unwrap();
    wait_for_lines(&jsonl, 3);

    monitor.sigterm();
    let (code, summary, stderr) = monitor.wait();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains(&format!("lost {}", link.display())),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("reopened {}", link.display())),
        "{stderr}"
    );
    assert_eq!(summary["reconnects"], 1, "{summary}");
    assert_eq!(summary["messages"]["Heartbeat"], 2, "{summary}");
    assert_eq!(summary["last_heartbeat"]["frames"], 2, "{summary}");
    assert_eq!(summary["rejected"], 0, "{summary}");
    let types: Vec<Value> = lines(&jsonl).iter().map(|l| l["type"].clone()).collect();
    assert_eq!(types, ["Hello", "Heartbeat", "Heartbeat"]);
    drop(slave);
}
