//! Where the service's reports go: stdout (text or JSON lines), the live figures for
//! heartbeats, and the telemetry link.

use std::sync::Mutex;
use std::time::Instant;

use petcam_shared::protocol::{self, ErrorSource, Message};

use crate::agent::{self, Report};
use crate::decide::Decision;
use crate::infer::ExportedModel;
use crate::source::camera::CameraNotice;
use crate::telemetry::{LinkStats, Live, Telemetry};

/// Where reports go: stdout (text or JSON lines), the live figures for heartbeats, and the
/// telemetry link. Shared by the capture thread (camera notices) and the inference loop.
pub(super) struct Reporter {
    json: bool,
    /// The running model's labels and id; a flashed model replaces them.
    labels: Mutex<Vec<String>>,
    model_id: Mutex<String>,
    start: Instant,
    live: Mutex<Live>,
    telemetry: Option<Telemetry>,
}

impl Reporter {
    pub(super) fn new(json: bool, model: &ExportedModel, telemetry: Option<Telemetry>) -> Self {
        Self {
            json,
            labels: Mutex::new(model.labels.clone()),
            model_id: Mutex::new(model.id()),
            start: Instant::now(),
            live: Mutex::new(Live::new(Instant::now())),
            telemetry,
        }
    }

    /// The telemetry link, if there is one.
    pub(super) fn link(&self) -> Option<&Telemetry> {
        self.telemetry.as_ref()
    }

    /// Sends a heartbeat with the live figures; `frames_dropped` is the frame queue's count.
    pub(super) fn heartbeat(&self, frames_dropped: u64) {
        let dropped = self.telemetry.as_ref().map_or(0, Telemetry::dropped);
        let id = self.model_id.lock().expect("model id").clone();
        let hb = self.live.lock().expect("live figures").heartbeat(
            Instant::now(),
            frames_dropped,
            dropped,
            &id,
        );
        self.send(Message::Heartbeat(hb));
    }

    /// Writes and flushes everything queued for the link.
    pub(super) fn finish(self) -> Option<LinkStats> {
        self.telemetry.map(Telemetry::finish)
    }

    fn label(&self, d: Decision) -> Option<String> {
        match d {
            Decision::Label(i) => self.labels.lock().expect("labels").get(i).cloned(),
            Decision::Unsure => None,
        }
    }

    fn at_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn send(&self, msg: Message) {
        if let Some(t) = &self.telemetry {
            t.send(msg);
        }
    }

    pub(super) fn error(&self, source: ErrorSource, message: String) {
        self.send(Message::Error(protocol::ErrorReport {
            at_ms: self.at_ms(),
            source,
            message,
        }));
    }

    pub(super) fn camera(&self, notice: CameraNotice) {
        if self.json {
            let mut line = serde_json::json!({"event": "camera", "message": notice.to_string()});
            if let CameraNotice::Unavailable { devices, .. } = &notice {
                line["devices"] = serde_json::json!(devices);
            }
            line["state"] = match &notice {
                CameraNotice::Opened { .. } => "streaming",
                CameraNotice::Unavailable { .. } => "unavailable",
                CameraNotice::Lost { .. } => "lost",
            }
            .into();
            println!("{line}");
        } else {
            eprintln!("{notice}");
        }
        if notice.is_error() {
            tracing::warn!("{notice}");
            self.error(ErrorSource::Camera, notice.to_string());
        } else {
            tracing::info!("{notice}");
        }
    }

    pub(super) fn report(&self, r: Report) {
        match r {
            Report::Classified {
                infer_ms,
                decision,
                confidence,
            } => {
                let label = self.label(decision);
                self.live.lock().expect("live figures").record(
                    infer_ms as f32,
                    label.as_deref(),
                    confidence,
                );
            }
            Report::Decision { frame, event } => {
                let (from, to) = {
                    let labels = self.labels.lock().expect("labels");
                    (
                        agent::decision_label(event.from, &labels).to_owned(),
                        agent::decision_label(event.to, &labels).to_owned(),
                    )
                };
                if self.json {
                    println!(
                        "{}",
                        serde_json::json!({
                            "event": "decision", "frame": frame, "from": from, "to": to,
                            "confidence": event.confidence,
                        })
                    );
                } else {
                    println!("{frame}\t{from} -> {to}\t{:.3}", event.confidence);
                }
                let frames = self.live.lock().expect("live figures").frames();
                self.send(Message::Event(protocol::Event {
                    at_ms: self.at_ms(),
                    frame: frames,
                    from: self.label(event.from),
                    to: self.label(event.to),
                    confidence: event.confidence,
                }));
            }
            Report::BadFrame { frame, error } => {
                if self.json {
                    println!(
                        "{}",
                        serde_json::json!({"event": "bad_frame", "frame": frame, "error": error})
                    );
                } else {
                    eprintln!("{frame}: skipped: {error}");
                }
                self.error(ErrorSource::Camera, format!("{frame}: {error}"));
            }
            Report::ModelChanged { id, labels } => {
                if self.json {
                    println!(
                        "{}",
                        serde_json::json!({"event": "model", "model_id": id, "labels": labels})
                    );
                } else {
                    eprintln!("model {id} now running (labels {labels:?})");
                }
                tracing::info!(model = %id, "a flashed model took over");
                if let Some(t) = &self.telemetry {
                    t.set_model_id(&id);
                    t.send(Message::Log(protocol::Log {
                        at_ms: self.at_ms(),
                        level: protocol::LogLevel::Info,
                        message: format!("model {id} now running"),
                    }));
                }
                *self.labels.lock().expect("labels") = labels;
                *self.model_id.lock().expect("model id") = id;
            }
        }
    }
}
