//! Telemetry to the host over a serial link: a `Hello` first on every (re)connection, then a
//! heartbeat every second, an event on every change of decision, and errors.
//!
//! Inference must never wait for the link. Messages go into a small bounded queue that drops
//! the oldest (and counts it) when the link is slow or gone; one writer thread drains it and
//! reopens a port that disappeared (a USB-UART adapter pulled out) with back-off.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use petcam_shared::protocol::{self, Heartbeat, Hello, Message, Reassembler, Received};
use serialport::SerialPort;

use crate::agent::FrameQueue;
use crate::retry::{self, Backoff};

/// Messages waiting for the link; beyond this the oldest is dropped.
pub const QUEUE: usize = 64;

/// This device's name in `Hello` when none is configured: the host name (`petcam` when it has
/// none).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "petcam".to_owned())
}

/// What the writer did, for the summary at exit.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct LinkStats {
    pub messages: u64,
    pub bytes: u64,
    pub connects: u64,
    /// Messages dropped: by the full queue, or lost with a write that failed.
    pub dropped: u64,
}

/// The sending side of the telemetry link.
#[derive(Debug)]
pub struct Telemetry {
    queue: Arc<FrameQueue<Message>>,
    writer: Option<JoinHandle<LinkStats>>,
    lost: Arc<std::sync::atomic::AtomicU64>,
    /// Sent first on every connection; its model id follows the model in use.
    hello: Arc<Mutex<Hello>>,
    /// Stops the reader threads of [`Telemetry::serial_with_inbox`].
    stop_readers: Arc<AtomicBool>,
}

impl Telemetry {
    /// Telemetry over the serial port at `path`.
    pub fn serial(path: PathBuf, baud: u32, hello: Hello) -> Self {
        Self::spawn(hello, Backoff::default(), move || open_serial(&path, baud))
    }

    /// Telemetry over the serial port at `path`, with every message the host sends decoded and
    /// passed to `inbox` (by a reader thread per connection).
    pub fn serial_with_inbox(
        path: PathBuf,
        baud: u32,
        hello: Hello,
        inbox: mpsc::Sender<Message>,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let mut t = Self::spawn(hello, Backoff::default(), move || {
            let port = open_serial(&path, baud)?;
            let mut reader = port.try_clone_native().map_err(std::io::Error::other)?;
            reader
                .set_timeout(Duration::from_millis(100))
                .map_err(std::io::Error::other)?;
            let (inbox, stop) = (inbox.clone(), s.clone());
            std::thread::Builder::new()
                .name("link-reader".into())
                .spawn(move || read_loop(reader, &inbox, &stop))?;
            Ok(port)
        });
        t.stop_readers = stop;
        t
    }

    /// Telemetry over whatever `open` connects to; `open` is called again after a failure.
    pub fn spawn<W, O>(hello: Hello, backoff: Backoff, open: O) -> Self
    where
        W: Write,
        O: FnMut() -> std::io::Result<W> + Send + 'static,
    {
        let queue = Arc::new(FrameQueue::new(QUEUE));
        let lost = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let hello = Arc::new(Mutex::new(hello));
        let (q, l, h) = (queue.clone(), lost.clone(), hello.clone());
        let writer = std::thread::Builder::new()
            .name("telemetry".into())
            .spawn(move || write_loop(&q, &h, backoff, open, &l))
            .expect("spawn the telemetry thread");
        Self {
            queue,
            writer: Some(writer),
            lost,
            hello,
            stop_readers: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Queues a message; never waits.
    pub fn send(&self, msg: Message) {
        self.queue.push_dropping_oldest(msg);
    }

    /// Sends a message before any telemetry queued, after the replies queued before it, and
    /// never drops it: a reply the host waits for.
    pub fn send_urgent(&self, msg: Message) {
        self.queue.push_urgent(msg);
    }

    /// The `Hello` this side sends.
    pub fn hello(&self) -> Hello {
        self.hello.lock().expect("hello").clone()
    }

    /// A new model runs: later `Hello`s carry its id.
    pub fn set_model_id(&self, id: &str) {
        self.hello.lock().expect("hello").model_id = id.to_owned();
    }

    /// Messages dropped so far.
    pub fn dropped(&self) -> u64 {
        self.queue.dropped() + self.lost.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sends what is queued, flushes the port and stops the writer.
    pub fn finish(mut self) -> LinkStats {
        self.stop_readers.store(true, Ordering::Relaxed);
        self.queue.close();
        self.writer
            .take()
            .and_then(|w| w.join().ok())
            .map(|mut s| {
                s.dropped = self.dropped();
                s
            })
            .unwrap_or_default()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.stop_readers.store(true, Ordering::Relaxed);
        self.queue.close();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

fn open_serial(path: &Path, baud: u32) -> std::io::Result<serialport::TTYPort> {
    // A write that cannot finish within this is a stuck link; it is reopened.
    Ok(petcam_shared::protocol::serial::open(
        path,
        baud,
        Duration::from_secs(2),
    )?)
}

/// Decodes what the host sends until the port fails, `stop` is set or nobody listens.
fn read_loop(mut port: impl Read, inbox: &mpsc::Sender<Message>, stop: &AtomicBool) {
    let mut rx = Reassembler::new();
    let mut buf = [0u8; 1024];
    while !stop.load(Ordering::Relaxed) {
        let n = match port.read(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::TimedOut | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            // The writer notices too, and reopens the port with a new reader.
            Err(_) => return,
        };
        let mut gone = false;
        rx.push(&buf[..n], |r| match r {
            Received::Message(m) => gone |= inbox.send(m).is_err(),
            Received::Rejected { bytes, error } => {
                tracing::warn!(bytes, %error, "rejected a frame from the link");
            }
        });
        if gone {
            return;
        }
    }
}

fn write_loop<W: Write>(
    queue: &FrameQueue<Message>,
    hello: &Mutex<Hello>,
    mut backoff: Backoff,
    mut open: impl FnMut() -> std::io::Result<W>,
    lost: &std::sync::atomic::AtomicU64,
) -> LinkStats {
    let mut stats = LinkStats::default();
    let mut buf = Vec::with_capacity(protocol::MAX_ENCODED);
    let mut reported = false;
    loop {
        let mut port = match open() {
            Ok(p) => {
                backoff.reset();
                p
            }
            Err(e) => {
                let wait = backoff.next_delay();
                // Once per outage, not once per attempt: a missing adapter would flood the log.
                if !reported {
                    tracing::warn!("telemetry link down: {e}; retrying every {wait:?} or slower");
                    reported = true;
                }
                if !retry::sleep_unless(wait, || queue.is_closed()) {
                    return stats;
                }
                continue;
            }
        };
        stats.connects += 1;
        tracing::info!("telemetry link up");
        let mut next = Some(Message::Hello(hello.lock().expect("hello").clone()));
        loop {
            let greeting = next.is_some();
            let Some(msg) = next.take().or_else(|| queue.pop()) else {
                let _ = port.flush();
                return stats;
            };
            buf.clear();
            if greeting {
                // Whatever the line carried before (a boot console, a tty's echo, the half
                // frame of a writer that died) would otherwise run into the Hello and take it
                // down with it: a delimiter first ends it, and an empty frame is ignored.
                buf.push(0);
            }
            if let Err(e) = protocol::encode_into(&msg, &mut buf) {
                tracing::warn!("telemetry message not sent: {e}");
                lost.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                continue;
            }
            match port.write_all(&buf).and_then(|()| port.flush()) {
                Ok(()) => {
                    stats.messages += 1;
                    stats.bytes += buf.len() as u64;
                }
                Err(e) => {
                    // Logged here, so the failed reopening attempts that follow stay quiet.
                    tracing::warn!("telemetry link lost: {e}; reopening");
                    lost.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    reported = true;
                    break;
                }
            }
        }
    }
}

/// The figures a heartbeat reports, kept up to date by the inference loop.
#[derive(Debug, Clone)]
pub struct Live {
    start: Instant,
    frames: u64,
    recent_ms: VecDeque<f32>,
    last_beat: Option<(Instant, u64)>,
    decision: Option<String>,
    confidence: f32,
    /// The CPU's thermal zone, found once: the heartbeat only reads its temperature.
    thermal_zone: Option<PathBuf>,
}

/// Inference times a heartbeat's percentiles are taken over.
const WINDOW: usize = 100;

impl Default for Live {
    fn default() -> Self {
        Self::new(Instant::now())
    }
}

impl Live {
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            frames: 0,
            recent_ms: VecDeque::with_capacity(WINDOW),
            last_beat: None,
            decision: None,
            confidence: 0.0,
            thermal_zone: cpu_thermal_zone(Path::new("/sys/class/thermal")),
        }
    }

    /// Frames classified so far.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// One classified frame.
    pub fn record(&mut self, infer_ms: f32, decision: Option<&str>, confidence: f32) {
        self.frames += 1;
        if self.recent_ms.len() == WINDOW {
            self.recent_ms.pop_front();
        }
        self.recent_ms.push_back(infer_ms);
        // A decision holds for many frames: only a change costs an allocation.
        if self.decision.as_deref() != decision {
            self.decision = decision.map(str::to_owned);
        }
        self.confidence = confidence;
    }

    /// The heartbeat at `now`; its fps is over the time since the previous heartbeat.
    pub fn heartbeat(
        &mut self,
        now: Instant,
        frames_dropped: u64,
        telemetry_dropped: u64,
        model_id: &str,
    ) -> Heartbeat {
        let (since, frames_then) = self.last_beat.unwrap_or((self.start, 0));
        let secs = now.saturating_duration_since(since).as_secs_f32();
        let fps = if secs > 0.0 {
            (self.frames - frames_then) as f32 / secs
        } else {
            0.0
        };
        self.last_beat = Some((now, self.frames));
        let mut sorted: Vec<f32> = self.recent_ms.iter().copied().collect();
        sorted.sort_by(f32::total_cmp);
        let pct = |q: f64| crate::infer::percentile(&sorted, q).unwrap_or(0.0);
        Heartbeat {
            uptime_ms: now.saturating_duration_since(self.start).as_millis() as u64,
            frames: self.frames,
            fps,
            infer_p50_ms: pct(0.5),
            infer_p95_ms: pct(0.95),
            frames_dropped,
            telemetry_dropped,
            cpu_temp_c: self.thermal_zone.as_deref().and_then(zone_temperature_c),
            model_id: model_id.to_owned(),
            decision: self.decision.clone(),
            confidence: self.confidence,
        }
    }
}

/// The thermal zone under `root` (`/sys/class/thermal`) named for the CPU, else the first;
/// `None` where the machine exposes none.
fn cpu_thermal_zone(root: &Path) -> Option<PathBuf> {
    let mut zones: Vec<PathBuf> = std::fs::read_dir(root)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("thermal_zone"))
        })
        .collect();
    zones.sort();
    let is_cpu = |z: &PathBuf| {
        std::fs::read_to_string(z.join("type")).is_ok_and(|t| {
            let t = t.trim();
            t.contains("cpu") || t == "x86_pkg_temp" || t == "soc_thermal"
        })
    };
    let cpu = zones.iter().position(is_cpu).unwrap_or(0);
    (!zones.is_empty()).then(|| zones.swap_remove(cpu))
}

/// A thermal zone's temperature in °C.
fn zone_temperature_c(zone: &Path) -> Option<f32> {
    let milli: f32 = std::fs::read_to_string(zone.join("temp"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(milli / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use petcam_shared::protocol::{Reassembler, Received, Role};
    use std::sync::Mutex;

    /// A port whose bytes land in a shared buffer; it fails after `fail_after` writes, as a
    /// USB adapter that is pulled out does.
    struct Port {
        out: Arc<Mutex<Vec<u8>>>,
        writes_left: Option<usize>,
    }

    impl Write for Port {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            if let Some(n) = self.writes_left.as_mut() {
                if *n == 0 {
                    return Err(std::io::Error::other("device disconnected"));
                }
                *n -= 1;
            }
            self.out.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn decode(bytes: &[u8]) -> Vec<Message> {
        let mut r = Reassembler::new();
        let mut out = Vec::new();
        r.push(bytes, |m| {
            if let Received::Message(m) = m {
                out.push(m)
            }
        });
        out
    }

    fn hello() -> Hello {
        Hello::new(Role::Device, "pi", "0.1.0", "abc")
    }

    fn log(i: u64) -> Message {
        Message::Log(protocol::Log {
            at_ms: i,
            level: protocol::LogLevel::Info,
            message: format!("{i}"),
        })
    }

    #[test]
    fn a_port_that_disappears_is_reopened_and_greeted_again() {
        let out = Arc::new(Mutex::new(Vec::new()));
        let opens = Arc::new(Mutex::new(0));
        let (o, n) = (out.clone(), opens.clone());
        let t = Telemetry::spawn(
            hello(),
            Backoff::new(Duration::from_millis(1), Duration::from_millis(1)),
            move || {
                let mut n = n.lock().unwrap();
                *n += 1;
                match *n {
                    // Missing at first, then a port that takes Hello and 2 messages and dies.
                    1 => Err(std::io::Error::other("No such file or directory")),
                    2 => Ok(Port {
                        out: o.clone(),
                        writes_left: Some(3),
                    }),
                    _ => Ok(Port {
                        out: o.clone(),
                        writes_left: None,
                    }),
                }
            },
        );
        for i in 0..6 {
            t.send(log(i));
            std::thread::sleep(Duration::from_millis(5));
        }
        let stats = t.finish();
        let got = decode(&out.lock().unwrap());
        let hellos = got
            .iter()
            .filter(|m| matches!(m, Message::Hello(_)))
            .count();
        assert_eq!(hellos, 2, "{got:?}");
        assert_eq!(got[0], Message::Hello(hello()));
        assert_eq!(stats.connects, 2);
        // Everything sent arrived, but for the one message lost with the failed write.
        let logs = got.iter().filter(|m| matches!(m, Message::Log(_))).count() as u64;
        assert_eq!(logs + stats.dropped, 6, "{got:?} {stats:?}");
        assert_eq!(stats.dropped, 1);
        assert!(*opens.lock().unwrap() >= 3);
    }

    #[test]
    fn the_hello_survives_what_the_line_carried_before_it() {
        // Bytes without a delimiter at the far end (here a tty's echo of `^@`) are followed,
        // on every connection, by the Hello, intact.
        let out = Arc::new(Mutex::new(b"^C^@^G^G".to_vec()));
        let o = out.clone();
        let t = Telemetry::spawn(hello(), Backoff::default(), move || {
            Ok(Port {
                out: o.clone(),
                writes_left: None,
            })
        });
        t.send(log(1));
        t.finish();
        let got = decode(&out.lock().unwrap());
        assert_eq!(got, vec![Message::Hello(hello()), log(1)]);
    }

    #[test]
    fn a_slow_link_drops_the_oldest_messages_and_never_blocks() {
        let gate = Arc::new(Mutex::new(()));
        let held = gate.lock().unwrap();
        let g = gate.clone();
        let out = Arc::new(Mutex::new(Vec::new()));
        let o = out.clone();
        // The port cannot open until the gate is released: everything queues meanwhile.
        let t = Telemetry::spawn(hello(), Backoff::default(), move || {
            drop(g.lock().unwrap());
            Ok(Port {
                out: o.clone(),
                writes_left: None,
            })
        });
        for i in 0..(QUEUE as u64 + 10) {
            t.send(log(i));
        }
        assert_eq!(t.dropped(), 10);
        drop(held);
        let stats = t.finish();
        let got = decode(&out.lock().unwrap());
        assert_eq!(got.len(), QUEUE + 1);
        // The newest survived: the first log after the Hello is number 10.
        assert_eq!(got[1], log(10));
        assert_eq!(stats.dropped, 10);
    }

    #[test]
    fn heartbeats_report_rate_percentiles_and_decision() {
        let t0 = Instant::now();
        let mut live = Live::new(t0);
        for i in 0..20 {
            live.record(10.0 + i as f32, Some("cat"), 0.9);
        }
        let hb = live.heartbeat(t0 + Duration::from_secs(2), 3, 1, "abc");
        assert_eq!(hb.frames, 20);
        assert!((hb.fps - 10.0).abs() < 1e-4, "{}", hb.fps);
        assert_eq!(hb.infer_p50_ms, 20.0);
        assert_eq!(hb.infer_p95_ms, 28.0);
        assert_eq!((hb.frames_dropped, hb.telemetry_dropped), (3, 1));
        assert_eq!(hb.decision.as_deref(), Some("cat"));
        assert_eq!(hb.uptime_ms, 2000);
        // The next heartbeat's rate covers only the frames since this one.
        live.record(5.0, None, 0.5);
        let hb = live.heartbeat(t0 + Duration::from_secs(3), 3, 1, "abc");
        assert!((hb.fps - 1.0).abs() < 1e-4, "{}", hb.fps);
        assert_eq!(hb.decision, None);
    }

    #[test]
    fn the_cpu_zone_is_found_by_its_type() {
        let dir = tempfile::tempdir().unwrap();
        for (zone, kind, temp) in [
            ("thermal_zone0", "acpitz", "30000"),
            ("thermal_zone1", "cpu-thermal", "51234"),
        ] {
            let z = dir.path().join(zone);
            std::fs::create_dir(&z).unwrap();
            std::fs::write(z.join("type"), format!("{kind}\n")).unwrap();
            std::fs::write(z.join("temp"), format!("{temp}\n")).unwrap();
        }
        let temperature = |root: &Path| cpu_thermal_zone(root).and_then(|z| zone_temperature_c(&z));
        assert_eq!(temperature(dir.path()), Some(51.234));
        assert_eq!(temperature(&dir.path().join("absent")), None);
    }
}
