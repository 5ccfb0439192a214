//! `petcam monitor`: watches a device's telemetry over its serial link.
//!
//! Says `Hello` (so the device answers with its identity) and asks for a `Status` on every
//! connection, then decodes every frame: a live view when stderr is a terminal, one line per
//! event, error and log otherwise, and optionally every message to a JSONL file. A port that goes
//! away (a device rebooting over USB) is reopened every second until it is back.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use petcam_shared::protocol::{
    self, Heartbeat, Hello, Message, ProtocolError, Reassembler, Received, Role, Status,
    PROTOCOL_VERSION,
};
use serde_json::{json, Value};
use serialport::TTYPort;

/// Watch a petcam device over its serial link: identity, decision, speed, temperature, and its
/// recent events, errors and logs.
///
/// On a terminal the view is redrawn in place on stderr; otherwise each event, error and log is
/// one line. Runs until Ctrl-C or SIGTERM (or `--duration`); a port that disappears, as when the
/// device reboots, is reopened every second.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Serial port to the device (/dev/ttyUSB0, ...).
    #[arg(long, value_name = "PATH")]
    pub port: PathBuf,
    /// Baud rate; must match the device's --baud.
    #[arg(long, default_value_t = 921_600)]
    pub baud: u32,
    /// Append every message received to FILE, one JSON object a line:
    /// {"t_ms": milliseconds since the monitor started, "type": "Heartbeat", "message": {...}};
    /// a frame that does not decode is a line {"type": "Rejected", "bytes", "error"}. Each line
    /// is written whole as it arrives, so the file is complete even if the monitor is killed.
    #[arg(long, value_name = "FILE")]
    pub jsonl: Option<PathBuf>,
    /// Stop after this many seconds (decimals allowed) [default: until Ctrl-C or SIGTERM].
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds)]
    pub duration: Option<Duration>,
    /// At exit, print one JSON object to stdout: messages by type, rejected frames, the last
    /// heartbeat, the device's Hello, reconnections.
    #[arg(long)]
    pub json: bool,
}

/// How long one read waits: short, so Ctrl-C, the deadline and redraws are never late.
const READ_TIMEOUT: Duration = Duration::from_millis(50);
/// Between attempts to reopen a port that went away.
const RETRY: Duration = Duration::from_secs(1);
/// Between redraws of the live view (4 a second).
const REDRAW: Duration = Duration::from_millis(250);
/// Events, errors, logs and notices kept for the live view.
const RECENT: usize = 8;

pub fn run(args: Args) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::Relaxed))
        .context("cannot install the Ctrl-C/SIGTERM handler")?;
    let jsonl = args
        .jsonl
        .as_deref()
        .map(|path| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open {} for appending", path.display()))
        })
        .transpose()?;
    // A port missing at start is a wrong path more often than a rebooting device: fail now.
    let mut port = Some(open(&args.port, args.baud)?);
    let start = Instant::now();
    let deadline = args.duration.map(|d| start + d);
    let mut mon = Monitor::new(&args, start, std::io::stderr().is_terminal(), jsonl);
    if let Some(p) = &mut port {
        if let Err(e) = mon.greet(p) {
            mon.lost(&e);
            port = None;
        }
    }
    let mut retry_at = start + RETRY;
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) && deadline.is_none_or(|d| Instant::now() < d) {
        match &mut port {
            Some(p) => match p.read(&mut buf) {
                Ok(0) => {
                    mon.lost(&std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
                    port = None;
                    retry_at = Instant::now() + RETRY;
                }
                Ok(n) => mon.receive(&buf[..n])?,
                Err(e) if is_transient(&e) => {}
                Err(e) => {
                    mon.lost(&e);
                    port = None;
                    retry_at = Instant::now() + RETRY;
                }
            },
            None if Instant::now() >= retry_at => {
                retry_at = Instant::now() + RETRY;
                match open(&args.port, args.baud) {
                    Ok(mut p) => match mon.greet(&mut p) {
                        Ok(()) => {
                            mon.reconnected();
                            port = Some(p);
                        }
                        Err(e) => tracing::debug!(error = %e, "reopened, but cannot write"),
                    },
                    Err(e) => tracing::debug!(error = %format!("{e:#}"), "still gone"),
                }
            }
            None => std::thread::sleep(READ_TIMEOUT),
        }
        mon.redraw(false);
    }
    mon.redraw(true);
    mon.finish(args.json);
    Ok(())
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|e| format!("{s:?} is not a number of seconds: {e}"))?;
    Duration::try_from_secs_f64(secs)
        .map_err(|_| format!("{s:?} is not a number of seconds of 0 or more"))
}

/// Errors after which the port is still usable: a read that found nothing, or a signal.
fn is_transient(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::TimedOut
            | std::io::ErrorKind::Interrupted
            | std::io::ErrorKind::WouldBlock
    )
}

fn open(path: &Path, baud: u32) -> anyhow::Result<TTYPort> {
    Ok(petcam_shared::protocol::serial::open(
        path,
        baud,
        READ_TIMEOUT,
    )?)
}

/// The variant name and its fields, from serde's externally tagged form of a message:
/// `{"Heartbeat": {...}}`, or `"Commit"` for a variant without fields (fields `null`).
///
/// Taking the name from serde keeps it in step with the enum without a hand-written list.
fn tagged(msg: &Message) -> (String, Value) {
    match serde_json::to_value(msg) {
        Ok(Value::Object(map)) if map.len() == 1 => map
            .into_iter()
            .next()
            .unwrap_or_else(|| ("Unknown".into(), Value::Null)),
        Ok(Value::String(name)) => (name, Value::Null),
        Ok(other) => ("Unknown".into(), other),
        Err(e) => ("Unknown".into(), Value::String(e.to_string())),
    }
}

/// `s` without control characters, so a device's string cannot move the cursor or recolour the
/// terminal, cut to `max` characters.
fn printable(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .take(max)
        .collect();
    if s.chars().count() > max {
        out.push('…');
    }
    out
}

fn label(l: &Option<String>) -> String {
    l.as_deref()
        .map_or_else(|| "not sure".into(), |l| printable(l, 40))
}

/// A device time (ms since its start) as seconds.
fn device_time(at_ms: u64) -> String {
    format!("{:.3} s", at_ms as f64 / 1000.0)
}

/// One line for the messages an operator reads one by one; `None` for the others.
fn describe(msg: &Message) -> Option<String> {
    Some(match msg {
        Message::Event(e) => format!(
            "event  {} → {} ({:.2}) at frame {}, device time {}",
            label(&e.from),
            label(&e.to),
            e.confidence,
            e.frame,
            device_time(e.at_ms)
        ),
        Message::Error(e) => format!(
            "error  {:?}: {} (device time {})",
            e.source,
            printable(&e.message, 200),
            device_time(e.at_ms)
        ),
        Message::Log(l) => format!(
            "log    {}: {} (device time {})",
            format!("{:?}", l.level).to_lowercase(),
            printable(&l.message, 200),
            device_time(l.at_ms)
        ),
        Message::Nack(n) => format!("nack   {:?}: {}", n.reason, printable(&n.detail, 200)),
        _ => return None,
    })
}

enum Link {
    Connected,
    Lost(String),
}

/// What the monitor has seen, and where it goes: the live view, stderr lines, the JSONL file.
struct Monitor {
    port: PathBuf,
    baud: u32,
    start: Instant,
    /// stderr is a terminal: redraw the live view instead of printing lines.
    live: bool,
    jsonl: Option<(PathBuf, File)>,
    rx: Reassembler,
    link: Link,
    reconnects: u64,
    counts: BTreeMap<String, u64>,
    rejected: u64,
    hello: Option<Hello>,
    /// The protocol version of a device that speaks another one, already reported.
    foreign_version: Option<u16>,
    heartbeat: Option<Heartbeat>,
    status: Option<Status>,
    last_message: Option<Instant>,
    recent: VecDeque<(Duration, String)>,
    last_draw: Option<Instant>,
}

impl Monitor {
    fn new(args: &Args, start: Instant, live: bool, jsonl: Option<File>) -> Self {
        Self {
            port: args.port.clone(),
            baud: args.baud,
            start,
            live,
            jsonl: jsonl.map(|f| (args.jsonl.clone().unwrap_or_default(), f)),
            rx: Reassembler::new(),
            link: Link::Connected,
            reconnects: 0,
            counts: BTreeMap::new(),
            rejected: 0,
            hello: None,
            foreign_version: None,
            heartbeat: None,
            status: None,
            last_message: None,
            recent: VecDeque::with_capacity(RECENT),
            last_draw: None,
        }
    }

    /// Our `Hello`, so the device answers with its own, and a request for its images.
    fn greet(&self, port: &mut TTYPort) -> std::io::Result<()> {
        let hello = Message::Hello(Hello::new(
            Role::Host,
            "petcam",
            env!("CARGO_PKG_VERSION"),
            "",
        ));
        let mut out = Vec::new();
        for m in [&hello, &Message::StatusRequest] {
            // Both messages are small and fixed: they always fit a frame.
            protocol::encode_into(m, &mut out).map_err(std::io::Error::other)?;
        }
        match port.write_all(&out).and_then(|()| port.flush()) {
            // A line that does not drain (flow control, a device not reading) is still a line:
            // keep listening, the device's own Hello will say who it is.
            Err(e) if is_transient(&e) => {
                tracing::debug!(error = %e, "could not send Hello and StatusRequest");
                Ok(())
            }
            result => result,
        }
    }

    fn lost(&mut self, e: &std::io::Error) {
        let what = format!(
            "lost {}: {e}; reopening it every second",
            self.port.display()
        );
        self.notice(&what);
        self.link = Link::Lost(what);
        // A half-received frame from before will never be completed.
        self.rx = Reassembler::new();
    }

    fn reconnected(&mut self) {
        self.reconnects += 1;
        self.link = Link::Connected;
        self.notice(&format!("reopened {}", self.port.display()));
    }

    /// A line for the operator: in the live view's list, or logged when there is no live view.
    fn notice(&mut self, text: &str) {
        if !self.live {
            tracing::warn!("{text}");
        }
        self.remember(text.to_owned());
    }

    fn remember(&mut self, text: String) {
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back((self.start.elapsed(), text));
    }

    fn receive(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        let mut received = Vec::new();
        self.rx.push(bytes, |r| received.push(r));
        for r in received {
            match r {
                Received::Message(m) => self.message(m)?,
                Received::Rejected { bytes, error } => self.rejected(bytes, &error)?,
            }
        }
        Ok(())
    }

    fn message(&mut self, m: Message) -> anyhow::Result<()> {
        self.last_message = Some(Instant::now());
        let (kind, fields) = tagged(&m);
        self.write_line(&json!({
            "t_ms": self.t_ms(),
            "type": kind,
            "message": fields,
        }))?;
        *self.counts.entry(kind).or_default() += 1;
        if let Some(text) = describe(&m) {
            if !self.live {
                eprintln!("[{:>9.3} s] {text}", self.start.elapsed().as_secs_f64());
            }
            self.remember(text);
        }
        match m {
            Message::Hello(h) if h.role == Role::Device => {
                if !self.live {
                    tracing::info!(
                        device = %printable(&h.device_id, 64),
                        firmware = %printable(&h.firmware_version, 64),
                        model = %printable(&h.model_id, 64),
                        "connected"
                    );
                }
                self.foreign_version = None;
                self.hello = Some(h);
            }
            Message::Heartbeat(h) => self.heartbeat = Some(h),
            Message::Status(s) => self.status = Some(s),
            _ => {}
        }
        Ok(())
    }

    fn rejected(&mut self, bytes: usize, error: &ProtocolError) -> anyhow::Result<()> {
        self.rejected += 1;
        self.write_line(&json!({
            "t_ms": self.t_ms(),
            "type": "Rejected",
            "bytes": bytes,
            "error": error.to_string(),
        }))?;
        match *error {
            // Said once per version: everything the device sends after it may be rejected too.
            ProtocolError::Version { ours, theirs } if self.foreign_version != Some(theirs) => {
                self.foreign_version = Some(theirs);
                self.notice(&format!(
                    "the device on {} speaks protocol version {theirs}, this petcam speaks \
                     {ours}: its messages cannot be decoded; update the older of petcam and \
                     petcam-device",
                    self.port.display()
                ));
            }
            _ => tracing::debug!(bytes, %error, "rejected a frame"),
        }
        Ok(())
    }

    fn t_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// One JSONL line, written with a single `write` on an unbuffered file: whatever stops the
    /// monitor, the file ends with whole lines.
    fn write_line(&mut self, value: &Value) -> anyhow::Result<()> {
        if let Some((path, file)) = &mut self.jsonl {
            let mut line = value.to_string();
            line.push('\n');
            file.write_all(line.as_bytes())
                .with_context(|| format!("cannot write to {}", path.display()))?;
        }
        Ok(())
    }

    /// Redraws the live view if it is due (or `force`d); nothing without a terminal.
    fn redraw(&mut self, force: bool) {
        let now = Instant::now();
        if !self.live || (!force && self.last_draw.is_some_and(|t| now - t < REDRAW)) {
            return;
        }
        // Clear the screen once; after that, home, then each line clears its own rest and the
        // screen below the view is cleared: no blank frame between two views, so no flicker.
        let mut screen = String::from(if self.last_draw.is_none() {
            "\x1b[2J\x1b[H"
        } else {
            "\x1b[H"
        });
        self.last_draw = Some(now);
        for line in self.view(now).lines() {
            screen.push_str(line);
            screen.push_str("\x1b[K\n");
        }
        screen.push_str("\x1b[J");
        let mut err = std::io::stderr().lock();
        // A terminal that went away is no reason to stop recording.
        let _ = err.write_all(screen.as_bytes()).and_then(|()| err.flush());
    }

    /// The live view's text.
    fn view(&self, now: Instant) -> String {
        use std::fmt::Write as _;
        let dash = || "–".to_string();
        let mut v = String::new();
        let _ = writeln!(
            v,
            "petcam monitor  {} @ {} baud  {:.0} s",
            self.port.display(),
            self.baud,
            (now - self.start).as_secs_f64()
        );
        let link = match (&self.link, self.last_message) {
            (Link::Lost(why), _) => why.clone(),
            (Link::Connected, None) => "open, nothing received yet".into(),
            (Link::Connected, Some(t)) => format!(
                "open, last message {:.1} s ago",
                now.saturating_duration_since(t).as_secs_f64()
            ),
        };
        let _ = writeln!(v, "link          {link}");
        let hb = self.heartbeat.as_ref();
        let (device, firmware, protocol) = match &self.hello {
            Some(h) => (
                printable(&h.device_id, 40),
                printable(&h.firmware_version, 40),
                h.protocol_version.to_string(),
            ),
            None => (dash(), dash(), dash()),
        };
        let protocol = match self.foreign_version {
            Some(theirs) => format!("{theirs} (this petcam speaks {PROTOCOL_VERSION}: MISMATCH)"),
            None => protocol,
        };
        let _ = writeln!(
            v,
            "device        {device}   firmware {firmware}   protocol {protocol}"
        );
        // The heartbeat's model is the newer news: it follows a swap without a new Hello.
        let model = hb
            .map(|h| h.model_id.as_str())
            .or(self.hello.as_ref().map(|h| h.model_id.as_str()))
            .filter(|m| !m.is_empty())
            .map_or_else(dash, |m| printable(m, 40));
        let _ = writeln!(v, "model         {model}");
        let _ = match hb {
            Some(h) => writeln!(
                v,
                "decision      {} (confidence {:.2})\n\
                 speed         {:.1} fps   inference p50 {:.1} ms   p95 {:.1} ms\n\
                 frames        {}   dropped {}   telemetry dropped {}\n\
                 cpu temp      {}\n\
                 uptime        {}",
                label(&h.decision),
                h.confidence,
                h.fps,
                h.infer_p50_ms,
                h.infer_p95_ms,
                h.frames,
                h.frames_dropped,
                h.telemetry_dropped,
                h.cpu_temp_c
                    .map_or_else(|| "n/a".into(), |c| format!("{c:.1} °C")),
                humantime::format_duration(Duration::from_secs(h.uptime_ms / 1000)),
            ),
            None => writeln!(v, "heartbeat     none yet"),
        };
        let active = match &self.status {
            None => dash(),
            Some(s) => {
                let mut a = s.active_model.as_ref().map_or_else(
                    || "none".into(),
                    |m| {
                        format!(
                            "{} (version {})",
                            petcam_runtime::infer::model_id(&m.sha256),
                            printable(&m.version, 40)
                        )
                    },
                );
                if let Some(st) = &s.staged_model {
                    let _ = write!(
                        a,
                        "; staged {} ({}/{} bytes)",
                        printable(&st.version, 40),
                        st.received,
                        st.size
                    );
                }
                if let Some(e) = &s.last_error {
                    let _ = write!(a, "; last error: {}", printable(e, 120));
                }
                a
            }
        };
        let _ = writeln!(v, "active model  {active}");
        let _ = writeln!(v, "rejected      {} frame(s)", self.rejected);
        let _ = writeln!(v, "recent");
        for (t, text) in &self.recent {
            let _ = writeln!(v, "  {:>9.3} s  {text}", t.as_secs_f64());
        }
        v
    }

    /// The summary: a JSON object with `--json`, a line otherwise.
    fn finish(&self, json: bool) {
        let total: u64 = self.counts.values().sum();
        if json {
            let summary = json!({
                "port": self.port.display().to_string(),
                "duration_s": self.start.elapsed().as_secs_f64(),
                "messages": self.counts,
                "total": total,
                "rejected": self.rejected,
                "reconnects": self.reconnects,
                "device": self.hello.as_ref().map(|h| tagged(&Message::Hello(h.clone())).1),
                "last_heartbeat": self
                    .heartbeat
                    .as_ref()
                    .map(|h| tagged(&Message::Heartbeat(h.clone())).1),
            });
            println!("{summary}");
        } else {
            let by_type: Vec<String> = self
                .counts
                .iter()
                .map(|(k, n)| format!("{n} {k}"))
                .collect();
            println!(
                "{}: {total} message(s) in {:.1} s ({}), {} rejected frame(s), {} reconnection(s)",
                self.port.display(),
                self.start.elapsed().as_secs_f64(),
                if by_type.is_empty() {
                    "none".into()
                } else {
                    by_type.join(", ")
                },
                self.rejected,
                self.reconnects
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use petcam_shared::protocol::{Event, ImageInfo};

    fn monitor() -> Monitor {
        let args = Args {
            port: "/dev/ttyPETCAM".into(),
            baud: 115_200,
            jsonl: None,
            duration: None,
            json: false,
        };
        Monitor::new(&args, Instant::now(), true, None)
    }

    fn heartbeat(temp: Option<f32>) -> Heartbeat {
        Heartbeat {
            uptime_ms: 3_725_000,
            frames: 1234,
            fps: 12.5,
            infer_p50_ms: 40.3,
            infer_p95_ms: 55.5,
            frames_dropped: 7,
            telemetry_dropped: 2,
            cpu_temp_c: temp,
            model_id: "0123456789ab".into(),
            decision: Some("cat".into()),
            confidence: 0.91,
        }
    }

    #[test]
    fn the_view_shows_heartbeat_status_and_recent_messages() {
        let mut m = monitor();
        m.message(Message::Hello(Hello::new(
            Role::Device,
            "garden",
            "0.3.1",
            "x",
        )))
        .unwrap();
        m.message(Message::Heartbeat(heartbeat(None))).unwrap();
        m.message(Message::Status(Status {
            active_model: Some(ImageInfo {
                version: "20250101.120000".into(),
                sha256: [0xab; 32],
                size: 10,
            }),
            staged_model: None,
            active_firmware: None,
            staged_firmware: None,
            last_error: None,
        }))
        .unwrap();
        m.message(Message::Event(Event {
            at_ms: 5_000,
            frame: 42,
            from: None,
            to: Some("dog\x1b[2J".into()),
            confidence: 0.8,
        }))
        .unwrap();
        let v = m.view(Instant::now());
        for want in [
            "garden",
            "firmware 0.3.1",
            "protocol 1",
            "model         0123456789ab",
            "cat (confidence 0.91)",
            "12.5 fps",
            "p50 40.3 ms",
            "p95 55.5 ms",
            "frames        1234   dropped 7   telemetry dropped 2",
            "cpu temp      n/a",
            "uptime        1h 2m 5s",
            "active model  abababababab (version 20250101.120000)",
            "rejected      0 frame(s)",
            "event  not sure → dog?[2J (0.80) at frame 42",
        ] {
            assert!(v.contains(want), "{want:?} not in\n{v}");
        }
        m.message(Message::Heartbeat(heartbeat(Some(48.3))))
            .unwrap();
        assert!(m.view(Instant::now()).contains("cpu temp      48.3 °C"));
    }

    #[test]
    fn another_protocol_version_is_reported_once_and_shown() {
        let mut m = monitor();
        let err = ProtocolError::Version { ours: 1, theirs: 7 };
        m.rejected(20, &err).unwrap();
        m.rejected(20, &err).unwrap();
        let v = m.view(Instant::now());
        assert_eq!(v.matches("speaks protocol version 7").count(), 1, "{v}");
        assert!(
            v.contains("protocol 7 (this petcam speaks 1: MISMATCH)"),
            "{v}"
        );
        assert!(v.contains("rejected      2 frame(s)"), "{v}");
    }

    #[test]
    fn recent_keeps_the_last_eight() {
        let mut m = monitor();
        for i in 0..20 {
            m.remember(format!("line {i}"));
        }
        let texts: Vec<&str> = m.recent.iter().map(|(_, t)| t.as_str()).collect();
        assert_eq!(texts.first(), Some(&"line 12"));
        assert_eq!(texts.len(), RECENT);
    }

    #[test]
    fn messages_are_split_into_type_and_fields() {
        let (kind, fields) = tagged(&Message::Ack { offset: 5 });
        assert_eq!((kind.as_str(), fields), ("Ack", json!({ "offset": 5 })));
        assert_eq!(tagged(&Message::Commit), ("Commit".into(), Value::Null));
    }

    #[test]
    fn durations_parse_as_seconds() {
        assert_eq!(parse_seconds("2.5"), Ok(Duration::from_millis(2500)));
        assert!(parse_seconds("-1").is_err());
        assert!(parse_seconds("soon").is_err());
    }
}
