//! The long-running service behind `petcam-device run`: a capture thread fills the frame
//! queue, the inference loop ([`crate::agent::run_loop`]) decides and drives the pins, and,
//! with a telemetry link, one thread sends heartbeats and another takes uploads.
//!
//! [`Service::start`] starts the threads, [`Service::run`] runs the inference loop with the
//! caller's pins, and [`Service::finish`] stops the threads and flushes the link.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use embedded_hal::digital::OutputPin;
use petcam_shared::protocol::{ErrorSource, Hello, Role};

use crate::actuate::Actuator;
use crate::agent::{self, RunConfig, RunError, RunStats};
use crate::firmware::Health;
use crate::infer::ExportedModel;
use crate::source::yuv::LayoutError;
use crate::source::{SourceError, SourceSpec};
use crate::telemetry::{LinkStats, Telemetry};
use crate::update::Updater;

mod capture;
mod config;
mod link;
mod report;

pub use config::ServiceConfig;

use capture::Capture;
use report::Reporter;

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("cannot open the stream {}", path.display())]
    OpenStream {
        path: PathBuf,
        #[source]
        error: std::io::Error,
    },
    #[error(
        "camera source {}: this petcam-device was built without camera support (cargo feature \
         `camera`, Linux); use dir: or mjpeg:",
        .0.display()
    )]
    NoCameraSupport(PathBuf),
    #[error("rpicam: {0}; pick another --width/--height or --rpicam-stride")]
    RpicamLayout(LayoutError),
    #[error("rpicam: the Camera Module is served by rpicam-vid, which runs on Linux only")]
    RpicamUnsupported,
}

/// How a run ended.
#[derive(Debug)]
pub struct Outcome {
    pub stats: RunStats,
    /// What the telemetry link carried, when there was one.
    pub link: Option<LinkStats>,
    /// A new binary was installed: the program should exit with
    /// [`crate::firmware::EXIT_RESTART`] so that it starts.
    pub restart: bool,
}

/// The running threads and what they share.
pub struct Service {
    reporter: Arc<Reporter>,
    capture: Capture,
    heartbeat: Option<JoinHandle<()>>,
    uploads: Option<JoinHandle<()>>,
    /// Models flashed while running, for the inference loop to switch to.
    models: mpsc::Receiver<ExportedModel>,
    /// Set by a signal, a firmware install or [`Service::finish`]: capture and inference stop.
    stop: Arc<AtomicBool>,
    /// Set once inference has stopped: the link's threads stop.
    done: Arc<AtomicBool>,
    restart: Arc<AtomicBool>,
    loop_config: RunConfig,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("loop_config", &self.loop_config)
            .field("link", &self.reporter.link())
            .finish_non_exhaustive()
    }
}

impl Service {
    /// Opens the telemetry link (on `config.port`), starts capturing from `source`, and, with
    /// a link, the heartbeat thread and (given an `updater`) the upload thread. `model` is the
    /// one the loop starts with.
    pub fn start(
        config: &ServiceConfig,
        source: &SourceSpec,
        model: &ExportedModel,
        updater: Option<Updater>,
        stop: Arc<AtomicBool>,
    ) -> Result<Self, ServiceError> {
        let (inbox_tx, inbox) = mpsc::channel();
        let telemetry = config.port.as_ref().map(|port| {
            let hello = Hello::new(
                Role::Device,
                config.device_id(),
                env!("CARGO_PKG_VERSION").to_owned(),
                model.id(),
            );
            if updater.is_some() {
                Telemetry::serial_with_inbox(port.clone(), config.baud, hello, inbox_tx.clone())
            } else {
                Telemetry::serial(port.clone(), config.baud, hello)
            }
        });
        drop(inbox_tx);
        if updater.is_some() && telemetry.is_none() {
            tracing::warn!("--state-dir without --port: nothing can be flashed");
        }
        let reporter = Arc::new(Reporter::new(config.json, model, telemetry));
        let capture = capture::start(source, config, &reporter, &stop)?;

        let done = Arc::new(AtomicBool::new(false));
        let heartbeat = reporter
            .link()
            .is_some()
            .then(|| link::spawn_heartbeat(reporter.clone(), capture.queue.clone(), done.clone()));
        let (model_tx, models) = mpsc::channel();
        let restart = Arc::new(AtomicBool::new(false));
        let uploads = updater.map(|updater| {
            let health = Health::new(
                updater.store().dir(),
                Duration::from_secs_f64(config.health_grace),
            );
            let uploads = link::Uploads {
                updater,
                health,
                inbox,
                models: model_tx,
            };
            link::spawn_updater(
                uploads,
                reporter.clone(),
                done.clone(),
                stop.clone(),
                restart.clone(),
            )
        });
        Ok(Self {
            reporter,
            capture,
            heartbeat,
            uploads,
            models,
            stop,
            done,
            restart,
            loop_config: RunConfig {
                smooth: config.smooth,
                threshold: config.threshold,
                max_frames: config.max_frames,
            },
        })
    }

    /// Reports an error on the link, e.g. pins that could not be claimed.
    pub fn report_error(&self, source: ErrorSource, message: String) {
        self.reporter.error(source, message);
    }

    /// The inference loop, from `model` and the models flashed meanwhile, driving `actuator`:
    /// until the source ends, `max_frames`, or a stop.
    pub fn run<P: OutputPin>(
        &self,
        model: &ExportedModel,
        actuator: &mut Actuator<P>,
    ) -> Result<RunStats, RunError> {
        let next_model = || self.models.try_recv().ok();
        let r = self.reporter.clone();
        agent::run_loop(
            model,
            next_model,
            &self.capture.queue,
            &self.loop_config,
            actuator,
            &self.stop,
            move |x| r.report(x),
        )
    }

    /// Stops every thread and flushes the link; `stats` is what [`Service::run`] returned.
    pub fn finish(self, stats: Result<RunStats, RunError>) -> Result<Outcome, RunError> {
        // The capture thread ends once it sees the stop flag or a closed queue.
        self.stop.store(true, Ordering::Relaxed);
        let Capture {
            queue,
            thread,
            joinable,
        } = self.capture;
        queue.close();
        if joinable {
            let _ = thread.join();
        }
        self.done.store(true, Ordering::Relaxed);
        for thread in [self.heartbeat, self.uploads].into_iter().flatten() {
            let _ = thread.join();
        }
        if let Err(e) = &stats {
            self.reporter.error(ErrorSource::Model, e.to_string());
        }
        // Everything queued for the link is written and flushed before exit.
        let link = Arc::into_inner(self.reporter).and_then(Reporter::finish);
        let mut stats = stats?;
        if joinable {
            // The capture thread went on until it saw the stop flag: what it dropped after the
            // loop's last count was never classified either.
            stats.dropped = queue.dropped();
        }
        Ok(Outcome {
            stats,
            link,
            restart: self.restart.load(Ordering::Relaxed),
        })
    }
}
