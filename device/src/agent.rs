//! The long-running program: frames from a source, through the model, to decisions and pins.
//!
//! A capture thread reads frames into a small bounded queue; the inference loop always takes
//! the freshest frame. A live source (a camera, or files paced with `--fps`) drops the oldest
//! queued frame when inference falls behind, and counts it; an unpaced file source waits
//! instead, so every file is classified.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use embedded_hal::digital::OutputPin;

use crate::actuate::Actuator;
use crate::decide::{Decider, Decision, Event};
use crate::infer::{ExportedModel, Latency, ModelError};
use crate::source::FrameData;

/// A bounded queue between the capture thread and inference.
#[derive(Debug)]
pub struct FrameQueue<T> {
    state: Mutex<QueueState<T>>,
    changed: Condvar,
    capacity: usize,
}

#[derive(Debug)]
struct QueueState<T> {
    items: VecDeque<T>,
    /// How many items at the front came through [`FrameQueue::push_urgent`]: they keep their
    /// order among themselves and do not count against the capacity.
    urgent: usize,
    closed: bool,
    dropped: u64,
}

impl<T> FrameQueue<T> {
    pub fn new(capacity: usize) -> Self {
        Self {
            state: Mutex::new(QueueState {
                items: VecDeque::new(),
                urgent: 0,
                closed: false,
                dropped: 0,
            }),
            changed: Condvar::new(),
            capacity: capacity.max(1),
        }
    }

    /// Adds a frame; when full, the oldest queued frame is dropped (and counted). Urgent items
    /// are never dropped.
    pub fn push_dropping_oldest(&self, item: T) {
        let mut s = self.state.lock().expect("queue lock");
        if s.items.len() - s.urgent >= self.capacity {
            let oldest = s.urgent;
            s.items.remove(oldest);
            s.dropped += 1;
        }
        s.items.push_back(item);
        self.changed.notify_all();
    }

    /// Puts an item ahead of every ordinary one but behind the urgent ones queued before it,
    /// beyond the capacity if need be: for the replies a waiting host needs, which must be
    /// neither dropped nor reordered (a host reads a late `Ack` of a chunk as the answer to
    /// whatever it sent next).
    pub fn push_urgent(&self, item: T) {
        let mut s = self.state.lock().expect("queue lock");
        let at = s.urgent;
        s.items.insert(at, item);
        s.urgent += 1;
        self.changed.notify_all();
    }

    /// Adds a frame, waiting for room. Returns false when the queue was closed meanwhile.
    pub fn push_waiting(&self, item: T) -> bool {
        let mut s = self.state.lock().expect("queue lock");
        while s.items.len() - s.urgent >= self.capacity && !s.closed {
            s = self.changed.wait(s).expect("queue lock");
        }
        if s.closed {
            return false;
        }
        s.items.push_back(item);
        self.changed.notify_all();
        true
    }

    /// The oldest queued frame, waiting for one; `None` once closed and empty.
    pub fn pop(&self) -> Option<T> {
        let mut s = self.state.lock().expect("queue lock");
        loop {
            if let Some(item) = s.items.pop_front() {
                s.urgent = s.urgent.saturating_sub(1);
                self.changed.notify_all();
                return Some(item);
            }
            if s.closed {
                return None;
            }
            s = self.changed.wait(s).expect("queue lock");
        }
    }

    /// No more frames will come; waiting pushers and poppers return.
    pub fn close(&self) {
        self.state.lock().expect("queue lock").closed = true;
        self.changed.notify_all();
    }

    pub fn dropped(&self) -> u64 {
        self.state.lock().expect("queue lock").dropped
    }

    pub fn is_closed(&self) -> bool {
        self.state.lock().expect("queue lock").closed
    }
}

/// One frame as the capture thread delivers it: its name and its (maybe undecoded) data.
pub type Captured = (String, FrameData);

/// Options of the inference loop.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub smooth: usize,
    pub threshold: f32,
    /// Stop after this many frames have been classified.
    pub max_frames: Option<u64>,
}

/// Something the loop reports as it runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    /// The decision changed.
    Decision { frame: String, event: Event },
    /// A frame was classified (every frame, for live figures such as heartbeats).
    Classified {
        infer_ms: f64,
        decision: Decision,
        /// Smoothed probability of the top label.
        confidence: f32,
    },
    /// A frame could not be decoded; the loop goes on.
    BadFrame { frame: String, error: String },
    /// Another model took over (a new one was flashed): its id and labels. Smoothing starts
    /// again with it.
    ModelChanged { id: String, labels: Vec<String> },
}

/// What a run did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunStats {
    pub frames: u64,
    pub bad_frames: u64,
    pub dropped: u64,
    pub events: u64,
    pub seconds: f64,
    pub fps: f64,
    pub infer: Latency,
    /// Decoding a frame and resizing it to the model's input.
    pub preprocess: Latency,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("cannot drive an output pin: {0}")]
    Pin(String),
}

/// How the capture thread hands frames over.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pace {
    /// Files, as fast as inference takes them: every frame is classified.
    Wait,
    /// A camera: frames come at the camera's rate; the oldest queued one is dropped when
    /// inference falls behind.
    Live,
    /// Files played like a camera at one frame per period, dropping like [`Pace::Live`].
    Every(Duration),
}

/// Starts a capture thread that moves `frames` into a new queue, as `pace` says. The thread
/// ends with the frames, when the queue is closed, or when `stop` is set.
pub fn spawn_capture<I>(
    frames: I,
    pace: Pace,
    stop: Arc<AtomicBool>,
) -> (Arc<FrameQueue<Captured>>, std::thread::JoinHandle<()>)
where
    I: Iterator<Item = Captured> + Send + 'static,
{
    let queue = Arc::new(FrameQueue::new(2));
    let q = queue.clone();
    let handle = std::thread::Builder::new()
        .name("capture".into())
        .spawn(move || {
            let mut next_due = Instant::now();
            for frame in frames {
                if stop.load(Ordering::Relaxed) || q.is_closed() {
                    break;
                }
                match pace {
                    Pace::Wait => {
                        if !q.push_waiting(frame) {
                            break;
                        }
                    }
                    Pace::Live => q.push_dropping_oldest(frame),
                    Pace::Every(period) => {
                        let now = Instant::now();
                        if next_due > now {
                            std::thread::sleep(next_due - now);
                        }
                        next_due += period;
                        q.push_dropping_oldest(frame);
                    }
                }
            }
            q.close();
        })
        .expect("spawn the capture thread");
    (queue, handle)
}

/// The inference loop: until the queue closes, `stop` is set or `max_frames` are done.
/// Before each frame it asks `next_model` whether another model should take over.
/// Pins are left at their inactive level when it returns.
pub fn run_loop<P: OutputPin>(
    model: &ExportedModel,
    mut next_model: impl FnMut() -> Option<ExportedModel>,
    queue: &FrameQueue<Captured>,
    cfg: &RunConfig,
    actuator: &mut Actuator<P>,
    stop: &AtomicBool,
    mut report: impl FnMut(Report),
) -> Result<RunStats, RunError> {
    let start = Instant::now();
    let mut model = model.clone();
    let mut decider = Decider::new(cfg.smooth, cfg.threshold);
    let (mut frames, mut bad, mut events) = (0u64, 0u64, 0u64);
    let (mut infer_ms, mut prep_ms) = (Vec::new(), Vec::new());
    let pin_err = |e: P::Error| RunError::Pin(format!("{e:?}"));
    let result = (|| {
        while !stop.load(Ordering::Relaxed) && cfg.max_frames.is_none_or(|m| frames < m) {
            let Some((name, data)) = queue.pop() else {
                break;
            };
            if let Some(next) = next_model() {
                model = next;
                decider = Decider::new(cfg.smooth, cfg.threshold);
                report(Report::ModelChanged {
                    id: model.id(),
                    labels: model.labels.clone(),
                });
            }
            let (w, h) = (model.input.width, model.input.height);
            let t = Instant::now();
            let input = match data.into_input(w, h) {
                Ok(input) => input,
                Err(e) => {
                    bad += 1;
                    report(Report::BadFrame {
                        frame: name,
                        error: e.to_string(),
                    });
                    continue;
                }
            };
            prep_ms.push(t.elapsed().as_secs_f64() * 1000.0);
            let t = Instant::now();
            let probs = model.predict(&input)?;
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            infer_ms.push(ms);
            frames += 1;
            let event = decider.push(&probs);
            if let Some(event) = &event {
                events += 1;
                actuator.apply(event.to).map_err(pin_err)?;
            }
            report(Report::Classified {
                infer_ms: ms,
                decision: decider.current(),
                confidence: decider.confidence(),
            });
            if let Some(event) = event {
                report(Report::Decision { frame: name, event });
            }
        }
        Ok(())
    })();
    // Whatever ended the loop, the outputs go inactive.
    let released = actuator.release().map_err(pin_err);
    result.and(released)?;
    let seconds = start.elapsed().as_secs_f64();
    Ok(RunStats {
        frames,
        bad_frames: bad,
        dropped: queue.dropped(),
        events,
        seconds,
        fps: if seconds > 0.0 {
            frames as f64 / seconds
        } else {
            0.0
        },
        infer: Latency::from_samples(infer_ms),
        preprocess: Latency::from_samples(prep_ms),
    })
}

/// The label a decision names, or `none`.
pub fn decision_label(d: Decision, labels: &[String]) -> &str {
    match d {
        Decision::Label(i) => labels.get(i).map_or("?", String::as_str),
        Decision::Unsure => "none",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_drops_the_oldest_frame() {
        let q = FrameQueue::new(2);
        for i in 0..5 {
            q.push_dropping_oldest(i);
        }
        assert_eq!(q.dropped(), 3);
        assert_eq!(q.pop(), Some(3));
        assert_eq!(q.pop(), Some(4));
        q.close();
        assert_eq!(q.pop(), None);
    }

    #[test]
    fn urgent_items_go_first_in_their_order_and_are_never_dropped() {
        let q = FrameQueue::new(2);
        q.push_dropping_oldest("telemetry 1");
        q.push_urgent("reply 1");
        q.push_urgent("reply 2");
        q.push_dropping_oldest("telemetry 2");
        q.push_urgent("reply 3");
        // Full of ordinary items: the oldest of those goes, no reply does.
        q.push_dropping_oldest("telemetry 3");
        assert_eq!(q.dropped(), 1);
        let order: Vec<_> = (0..5).map(|_| q.pop().unwrap()).collect();
        assert_eq!(
            order,
            [
                "reply 1",
                "reply 2",
                "reply 3",
                "telemetry 2",
                "telemetry 3"
            ]
        );
        // Taking a reply frees the urgent lane in order too.
        q.push_urgent("reply 4");
        q.push_dropping_oldest("telemetry 4");
        q.push_urgent("reply 5");
        assert_eq!(q.pop(), Some("reply 4"));
        q.push_urgent("reply 6");
        assert_eq!(q.pop(), Some("reply 5"));
        assert_eq!(q.pop(), Some("reply 6"));
        assert_eq!(q.pop(), Some("telemetry 4"));
    }

    #[test]
    fn an_unpaced_producer_waits_and_loses_nothing() {
        let stop = Arc::new(AtomicBool::new(false));
        let frames = (0..50).map(|i| {
            let empty = Err(crate::preprocess::PhotoError::Empty);
            (format!("{i}"), FrameData::Image(empty))
        });
        let (q, handle) = spawn_capture(frames, Pace::Wait, stop);
        let mut got = Vec::new();
        while let Some((name, _)) = q.pop() {
            got.push(name);
        }
        handle.join().unwrap();
        assert_eq!(got.len(), 50);
        assert_eq!(got[49], "49");
        assert_eq!(q.dropped(), 0);
    }
}
