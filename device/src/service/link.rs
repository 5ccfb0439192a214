//! The threads that serve the telemetry link beside the inference loop: heartbeats, and
//! uploads from `petcam flash`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use petcam_shared::protocol::Message;

use super::report::Reporter;
use crate::agent::{Captured, FrameQueue};
use crate::firmware::Health;
use crate::infer::ExportedModel;
use crate::retry;
use crate::update::{Activated, Updater};

/// Sends a heartbeat every second until `done`: from its own thread, so heartbeats keep coming
/// while the camera is away.
pub(super) fn spawn_heartbeat(
    reporter: Arc<Reporter>,
    queue: Arc<FrameQueue<Captured>>,
    done: Arc<AtomicBool>,
) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name("heartbeat".into())
        .spawn(move || {
            let period = Duration::from_secs(1);
            let mut next = Instant::now() + period;
            while retry::sleep_unless(next.saturating_duration_since(Instant::now()), || {
                done.load(Ordering::Relaxed)
            }) {
                next += period;
                reporter.heartbeat(queue.dropped());
            }
        })
        .expect("spawn the heartbeat thread")
}

/// What the updater thread is handed.
pub(super) struct Uploads {
    pub(super) updater: Updater,
    /// Confirms a binary on trial after its grace period.
    pub(super) health: Health,
    /// Messages from the host.
    pub(super) inbox: mpsc::Receiver<Message>,
    /// Where a flashed model goes, for the inference loop to switch to.
    pub(super) models: mpsc::Sender<ExportedModel>,
}

/// Handles uploads until `done`, off the inference thread: a self-test takes a second or two.
/// An installed binary sets `restart` and `stop`.
pub(super) fn spawn_updater(
    mut uploads: Uploads,
    reporter: Arc<Reporter>,
    done: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    restart: Arc<AtomicBool>,
) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name("updater".into())
        .spawn(move || {
            while !done.load(Ordering::Relaxed) {
                uploads.health.tick();
                let Ok(msg) = uploads.inbox.recv_timeout(Duration::from_millis(200)) else {
                    continue;
                };
                let Some(link) = reporter.link() else {
                    continue;
                };
                if let Message::Hello(h) = &msg {
                    if let Err(e) = h.check_version() {
                        tracing::warn!("the host {e}");
                    }
                    link.send_urgent(Message::Hello(link.hello()));
                    continue;
                }
                let Some((reply, activated)) = uploads.updater.handle(&msg) else {
                    continue;
                };
                link.send_urgent(reply);
                match activated {
                    Some(Activated::Model { model, .. }) => {
                        let _ = uploads.models.send(*model);
                    }
                    Some(Activated::Firmware { entry }) => {
                        tracing::info!(version = %entry.version, "firmware installed; restarting into it");
                        restart.store(true, Ordering::Relaxed);
                        stop.store(true, Ordering::Relaxed);
                    }
                    None => {}
                }
            }
        })
        .expect("spawn the updater thread")
}
