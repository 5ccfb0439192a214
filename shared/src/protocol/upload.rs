//! The sending side of an upload, without I/O: which chunks go out, and when to go back.
//!
//! [`Uploader`] is go-back-N over a lossy, in-order byte link. Up to a window of chunks travels
//! ahead of the last acknowledgement. The device writes chunks only in order and answers one
//! that is not where it expects with the offset it holds, so a lost or damaged chunk makes the
//! sender go back there; a silence longer than the measured round trip makes it go back to the
//! last acknowledged offset. On a lossy line chunks shrink (a damaged byte costs the whole
//! frame) and grow back while they arrive.
//!
//! The state machine is fed replies ([`Uploader::on_reply`]) and silences
//! ([`Uploader::on_timeout`]) and answers with the messages to send; [`drive`] runs it over a
//! [`Transport`]. Keeping I/O out lets a test run it against the device's updater over an
//! in-memory lossy link ([`MemoryLink`]) in milliseconds.

use alloc::collections::VecDeque;
use alloc::vec::Vec;
use core::fmt;
use std::time::{Duration, Instant};

use super::{Chunk, Message, Nack, NackReason, CHUNK_SIZE};

/// How an [`Uploader`] paces itself.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UploadConfig {
    /// Chunks in flight before the first is acknowledged: 8 x 2048 bytes keeps a UART with a
    /// few milliseconds of adapter latency busy (178 ms at 921600 baud).
    pub window: usize,
    /// Data bytes per chunk on a clean line.
    pub max_chunk: usize,
    /// Smallest chunk sent on a bad line.
    pub min_chunk: usize,
    /// Line speed, for the time a window takes to cross it (10 bits a byte).
    pub baud: u32,
    /// Silences in a row before giving up.
    pub retries: u32,
    /// Round trip assumed until one is measured.
    pub initial_rtt: Duration,
}

impl Default for UploadConfig {
    fn default() -> Self {
        Self {
            window: 8,
            max_chunk: CHUNK_SIZE,
            min_chunk: 128,
            baud: 921_600,
            retries: 8,
            initial_rtt: Duration::from_millis(50),
        }
    }
}

/// Why an upload stopped before the device acknowledged all of it.
#[derive(Debug, Clone, PartialEq)]
pub enum UploadError {
    /// The device has no upload in progress any more (it restarted): a new `Begin` resumes
    /// from what it kept.
    Dropped { acked: u64 },
    /// The device refused a chunk.
    Refused(Nack),
    /// `tries` silences in a row while waiting for the chunk at `acked`.
    NoAnswer { acked: u64, tries: u32 },
}

impl fmt::Display for UploadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Dropped { acked } => write!(
                f,
                "the device dropped the upload at {acked} bytes (did it restart?)"
            ),
            Self::Refused(n) => write!(
                f,
                "the device refused a chunk ({:?}): {}",
                n.reason, n.detail
            ),
            Self::NoAnswer { acked, tries } => write!(
                f,
                "no answer from the device to the chunk at {acked} after {tries} tries"
            ),
        }
    }
}

impl core::error::Error for UploadError {}

/// The go-back-N sender of one image, from an offset the device already holds.
#[derive(Debug)]
pub struct Uploader<'a> {
    image: &'a [u8],
    config: UploadConfig,
    /// Everything below is on the device.
    acked: u64,
    /// Where the next chunk starts.
    next: u64,
    /// End offset and send time of each chunk in flight, oldest first.
    in_flight: VecDeque<(u64, Instant)>,
    size: usize,
    /// Acknowledgements since the chunk size last changed.
    clean: u32,
    /// Silences in a row.
    failures: u32,
    rtt: Duration,
    /// Where the last go-back went: further refusals naming it are echoes of chunks already in
    /// flight then, not news.
    went_back_to: Option<u64>,
    resends: u64,
    heartbeats: u64,
}

impl<'a> Uploader<'a> {
    /// An upload of `image` that continues at `offset` (what the device's answer to `Begin`
    /// said it holds).
    pub fn new(image: &'a [u8], offset: u64, config: UploadConfig) -> Self {
        let offset = offset.min(image.len() as u64);
        Self {
            image,
            acked: offset,
            next: offset,
            in_flight: VecDeque::with_capacity(config.window),
            size: config.max_chunk,
            clean: 0,
            failures: 0,
            rtt: config.initial_rtt,
            went_back_to: None,
            resends: 0,
            heartbeats: 0,
            config,
        }
    }

    /// Bytes the device has acknowledged.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Whether the device has acknowledged the whole image.
    pub fn is_done(&self) -> bool {
        self.acked >= self.image.len() as u64
    }

    /// Times the sender went back (after a refusal or a silence).
    pub fn resends(&self) -> u64 {
        self.resends
    }

    /// Heartbeats the device sent meanwhile: its telemetry kept flowing.
    pub fn heartbeats(&self) -> u64 {
        self.heartbeats
    }

    /// The chunks the window has room for, sent `now`.
    pub fn transmit(&mut self, now: Instant) -> Vec<Message> {
        let total = self.image.len() as u64;
        let mut out = Vec::new();
        while self.in_flight.len() < self.config.window && self.next < total {
            let end = (self.next + self.size as u64).min(total);
            out.push(Message::Chunk(Chunk {
                offset: self.next,
                data: self.image[self.next as usize..end as usize].to_vec(),
            }));
            self.in_flight.push_back((end, now));
            self.next = end;
        }
        out
    }

    /// How long a silence lasts before [`Uploader::on_timeout`]: three round trips and two
    /// windows on the wire, doubled for each silence in a row (up to 32 times), at most 10 s.
    pub fn timeout(&self) -> Duration {
        let wire =
            Duration::from_secs_f64((self.size + 64) as f64 * 10.0 / self.config.baud as f64);
        let base = self.rtt * 3 + wire * 2 * self.config.window as u32 + Duration::from_millis(5);
        (base * (1 << self.failures.min(5))).min(Duration::from_secs(10))
    }

    /// A message from the device; the chunks to send next.
    pub fn on_reply(&mut self, reply: &Message, now: Instant) -> Result<Vec<Message>, UploadError> {
        let total = self.image.len() as u64;
        match reply {
            Message::Ack { offset: a } if *a > self.acked && *a <= total => {
                while let Some(&(end, sent_at)) = self.in_flight.front() {
                    if end > *a {
                        break;
                    }
                    if end == *a {
                        self.rtt = (self.rtt * 7 + now.saturating_duration_since(sent_at)) / 8;
                    }
                    self.in_flight.pop_front();
                }
                self.acked = *a;
                self.failures = 0;
                self.clean += 1;
                if self.clean >= 16 && self.size < self.config.max_chunk {
                    self.size = (self.size * 2).min(self.config.max_chunk);
                    self.clean = 0;
                }
            }
            Message::Nack(Nack {
                reason: NackReason::BadOffset,
                expected_offset,
                ..
            }) if self.went_back_to != Some(*expected_offset) && *expected_offset <= total => {
                self.went_back_to = Some(*expected_offset);
                self.acked = self.acked.max(*expected_offset);
                self.go_back_to(*expected_offset);
            }
            // An echo of a chunk sent before the last go-back, or an offset past the image.
            Message::Nack(Nack {
                reason: NackReason::BadOffset,
                ..
            }) => {}
            Message::Nack(Nack {
                reason: NackReason::NoUpload,
                ..
            }) => return Err(UploadError::Dropped { acked: self.acked }),
            Message::Nack(n) => return Err(UploadError::Refused(n.clone())),
            Message::Heartbeat(_) => self.heartbeats += 1,
            // Stale acknowledgements and other telemetry.
            _ => {}
        }
        Ok(self.transmit(now))
    }

    /// No reply within [`Uploader::timeout`]: everything in flight is presumed lost.
    pub fn on_timeout(&mut self, now: Instant) -> Result<Vec<Message>, UploadError> {
        self.failures += 1;
        if self.failures > self.config.retries {
            return Err(UploadError::NoAnswer {
                acked: self.acked,
                tries: self.failures,
            });
        }
        self.went_back_to = None;
        self.go_back_to(self.acked);
        Ok(self.transmit(now))
    }

    fn go_back_to(&mut self, offset: u64) {
        self.resends += 1;
        self.next = offset;
        self.in_flight.clear();
        self.size = (self.size / 2).max(self.config.min_chunk);
        self.clean = 0;
    }
}

/// Messages to and from a peer: a serial port, or an in-memory link in tests.
pub trait Transport {
    type Error;
    /// Sends one message; the bytes it took on the wire.
    fn send(&mut self, message: &Message) -> Result<u64, Self::Error>;
    /// The next message from the peer, or `None` after `timeout`.
    fn recv(&mut self, timeout: Duration) -> Result<Option<Message>, Self::Error>;
}

/// Why [`drive`] stopped.
#[derive(Debug)]
pub enum DriveError<E> {
    Transport(E),
    Upload(UploadError),
}

impl<E: fmt::Display> fmt::Display for DriveError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Transport(e) => e.fmt(f),
            Self::Upload(e) => e.fmt(f),
        }
    }
}

impl<E: fmt::Debug + fmt::Display> core::error::Error for DriveError<E> {}

/// Runs `uploader` over `transport` until the device has acknowledged the whole image;
/// `progress` hears every new acknowledged offset. Returns the bytes written to the link.
pub fn drive<T: Transport>(
    transport: &mut T,
    uploader: &mut Uploader<'_>,
    mut progress: impl FnMut(u64),
) -> Result<u64, DriveError<T::Error>> {
    let mut wire_bytes = 0;
    let mut outgoing = uploader.transmit(Instant::now());
    while !uploader.is_done() {
        for m in &outgoing {
            wire_bytes += transport.send(m).map_err(DriveError::Transport)?;
        }
        let acked = uploader.acked();
        outgoing = match transport
            .recv(uploader.timeout())
            .map_err(DriveError::Transport)?
        {
            Some(reply) => uploader.on_reply(&reply, Instant::now()),
            None => uploader.on_timeout(Instant::now()),
        }
        .map_err(DriveError::Upload)?;
        if uploader.acked() != acked {
            progress(uploader.acked());
        }
    }
    Ok(wire_bytes)
}

/// How [`request`] repeats a control message (`Begin`, `Commit`) until it is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// Sends after the first.
    pub retries: u32,
    /// Wait for the first answer. Each silence doubles it, up to [`MAX_WAIT`] (or `timeout`,
    /// when longer): a busy device or a noisy line gets time to recover.
    pub timeout: Duration,
}

/// Longest wait [`request`] grows to between sends.
pub const MAX_WAIT: Duration = Duration::from_secs(8);

/// What [`request`] tells its observer while it waits.
#[derive(Debug, Clone, Copy)]
pub enum Event<'a> {
    /// No answer came; the message goes out again (`attempt` counts from 1).
    Resend { attempt: u32 },
    /// A message that is not an answer: telemetry, or an echo of an earlier chunk.
    Other(&'a Message),
}

/// Why [`request`] got no acknowledgement.
#[derive(Debug)]
pub enum RequestError<E> {
    Transport(E),
    /// The peer refused the message.
    Refused(Nack),
    /// No answer to any of `tries` sends.
    NoAnswer {
        tries: u32,
    },
}

impl<E: fmt::Display> fmt::Display for RequestError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Transport(e) => e.fmt(f),
            Self::Refused(n) => write!(f, "refused ({:?}): {}", n.reason, n.detail),
            Self::NoAnswer { tries } => write!(f, "no answer to {tries} sends"),
        }
    }
}

impl<E: fmt::Debug + fmt::Display> core::error::Error for RequestError<E> {}

/// Sends `message` until the peer acknowledges it; the acknowledged offset.
///
/// Refusals that only a chunk can get are echoes of chunks sent earlier, not answers to
/// `message`: chunks of an earlier session ("no upload in progress", to a `Begin`), and chunks
/// sent twice ("bad offset" expecting `stale`: the device holds everything). So are
/// acknowledgements short of `stale`: late answers to chunks, where the answer to a `Commit`
/// acknowledges the whole image. Those, telemetry and every resend go to `observe`.
pub fn request<T: Transport>(
    transport: &mut T,
    message: &Message,
    retry: Retry,
    stale: Option<u64>,
    mut observe: impl FnMut(Event<'_>),
) -> Result<u64, RequestError<T::Error>> {
    let mut wait = retry.timeout;
    for attempt in 0..=retry.retries {
        if attempt > 0 {
            observe(Event::Resend { attempt });
        }
        transport.send(message).map_err(RequestError::Transport)?;
        let deadline = Instant::now() + wait;
        while let Some(reply) = transport
            .recv(deadline.saturating_duration_since(Instant::now()))
            .map_err(RequestError::Transport)?
        {
            match reply {
                Message::Ack { offset } if stale.is_some_and(|whole| offset < whole) => {
                    observe(Event::Other(&reply))
                }
                Message::Ack { offset } => return Ok(offset),
                Message::Nack(Nack {
                    reason: NackReason::BadOffset,
                    expected_offset,
                    ..
                }) if Some(expected_offset) == stale => observe(Event::Other(&reply)),
                Message::Nack(Nack {
                    reason: NackReason::NoUpload,
                    ..
                }) if matches!(message, Message::Begin(_)) => observe(Event::Other(&reply)),
                Message::Nack(n) => return Err(RequestError::Refused(n)),
                other => observe(Event::Other(&other)),
            }
        }
        wait = (wait * 2).min(MAX_WAIT.max(retry.timeout));
    }
    Err(RequestError::NoAnswer {
        tries: retry.retries + 1,
    })
}

pub use memory::{MemoryLink, Noise};

mod memory {
    use alloc::vec::Vec;
    use std::collections::VecDeque;
    use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
    use std::time::{Duration, Instant};

    use super::Transport;
    use crate::protocol::{encode, Message, ProtocolError, Reassembler, Received};

    /// What a [`MemoryLink`] does to the bytes it carries, each with its chance per byte.
    #[derive(Debug, Clone, Copy, PartialEq, Default)]
    pub struct Noise {
        /// One bit of the byte flipped.
        pub flip: f64,
        /// The byte lost.
        pub drop: f64,
    }

    /// One end of an in-memory byte link: frames go out through [`Noise`] and come in through
    /// a [`Reassembler`], as over a serial line (bytes stay in order; damaged frames are
    /// dropped by their CRC). Both ends may live on different threads.
    #[derive(Debug)]
    pub struct MemoryLink {
        tx: Sender<Vec<u8>>,
        rx: Receiver<Vec<u8>>,
        noise: Noise,
        rng: u64,
        reassembler: Reassembler,
        inbox: VecDeque<Message>,
        /// Bytes flipped and lost on the way out.
        pub flipped: u64,
        pub dropped: u64,
    }

    impl MemoryLink {
        /// Two connected ends; each damages what it sends by its `Noise`, from a fixed seed.
        pub fn pair(noise: Noise, seed: u64) -> (Self, Self) {
            let (a_tx, b_rx) = channel();
            let (b_tx, a_rx) = channel();
            let end = |tx, rx, seed: u64| Self {
                tx,
                rx,
                noise,
                // xorshift needs a non-zero state.
                rng: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
                reassembler: Reassembler::new(),
                inbox: VecDeque::new(),
                flipped: 0,
                dropped: 0,
            };
            (end(a_tx, a_rx, seed), end(b_tx, b_rx, seed ^ 0x5555))
        }

        /// Uniform in [0, 1).
        fn chance(&mut self) -> f64 {
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            (self.rng >> 11) as f64 / (1u64 << 53) as f64
        }

        fn absorb(&mut self, bytes: &[u8]) {
            let inbox = &mut self.inbox;
            self.reassembler.push(bytes, |r| {
                if let Received::Message(m) = r {
                    inbox.push_back(m);
                }
            });
        }
    }

    impl Transport for MemoryLink {
        /// A message too large to frame; the peer hanging up is silence, as on a serial line.
        type Error = ProtocolError;

        fn send(&mut self, message: &Message) -> Result<u64, ProtocolError> {
            let frame = encode(message)?;
            let mut out = Vec::with_capacity(frame.len());
            for &b in &frame {
                if self.chance() < self.noise.drop {
                    self.dropped += 1;
                } else if self.chance() < self.noise.flip {
                    self.flipped += 1;
                    out.push(b ^ (1 << (self.rng % 8)));
                } else {
                    out.push(b);
                }
            }
            let _ = self.tx.send(out);
            Ok(frame.len() as u64)
        }

        fn recv(&mut self, timeout: Duration) -> Result<Option<Message>, ProtocolError> {
            let deadline = Instant::now() + timeout;
            loop {
                if let Some(m) = self.inbox.pop_front() {
                    return Ok(Some(m));
                }
                match self
                    .rx
                    .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                {
                    Ok(bytes) => self.absorb(&bytes),
                    Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                        return Ok(None)
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Begin, ImageKind};
    use alloc::string::String;
    use alloc::vec;

    fn ack(offset: u64) -> Message {
        Message::Ack { offset }
    }

    fn bad_offset(expected_offset: u64) -> Message {
        Message::Nack(Nack {
            reason: NackReason::BadOffset,
            expected_offset,
            detail: String::new(),
        })
    }

    fn offsets(ms: &[Message]) -> Vec<(u64, usize)> {
        ms.iter()
            .map(|m| match m {
                Message::Chunk(c) => (c.offset, c.data.len()),
                other => panic!("not a chunk: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_window_goes_out_and_each_ack_lets_one_more_chunk_go() {
        let image = vec![7u8; 10 * 2048 + 5];
        let mut up = Uploader::new(&image, 0, UploadConfig::default());
        let now = Instant::now();
        let first = offsets(&up.transmit(now));
        assert_eq!(first.len(), 8);
        assert_eq!(first[3], (3 * 2048, 2048));
        assert_eq!(
            offsets(&up.on_reply(&ack(2048), now).unwrap()),
            [(8 * 2048, 2048)]
        );
        // A stale or out-of-range acknowledgement changes nothing.
        assert!(up.on_reply(&ack(1024), now).unwrap().is_empty());
        assert!(up.on_reply(&ack(1 << 40), now).unwrap().is_empty());
        assert_eq!(up.acked(), 2048);
        let last = offsets(&up.on_reply(&ack(3 * 2048), now).unwrap());
        assert_eq!(last, [(9 * 2048, 2048), (10 * 2048, 5)]);
        assert!(!up.is_done());
        up.on_reply(&ack(image.len() as u64), now).unwrap();
        assert!(up.is_done());
    }

    #[test]
    fn a_refusal_goes_back_once_and_its_echoes_are_ignored() {
        let image = vec![1u8; 64 * 1024];
        let mut up = Uploader::new(&image, 4096, UploadConfig::default());
        let now = Instant::now();
        assert_eq!(offsets(&up.transmit(now))[0], (4096, 2048));
        let again = offsets(&up.on_reply(&bad_offset(6144), now).unwrap());
        // Back to where the device is, with half-size chunks.
        assert_eq!(again[0], (6144, 1024));
        assert_eq!(again.len(), 8);
        assert_eq!(up.acked(), 6144);
        assert_eq!(up.resends(), 1);
        // The chunks in flight before the go-back are refused naming the same offset.
        assert!(up.on_reply(&bad_offset(6144), now).unwrap().is_empty());
        assert_eq!(up.resends(), 1);
    }

    #[test]
    fn silences_back_off_and_give_up_after_the_retries() {
        let image = vec![1u8; 8192];
        let config = UploadConfig {
            retries: 3,
            ..UploadConfig::default()
        };
        let mut up = Uploader::new(&image, 0, config);
        let now = Instant::now();
        up.transmit(now);
        let mut waits = vec![up.timeout()];
        for _ in 0..3 {
            let resent = offsets(&up.on_timeout(now).unwrap());
            assert_eq!(
                resent[0].0, 0,
                "a silence goes back to the last acknowledgement"
            );
            waits.push(up.timeout());
        }
        assert!(waits.windows(2).all(|w| w[1] > w[0]), "{waits:?}");
        assert_eq!(
            up.on_timeout(now),
            Err(UploadError::NoAnswer { acked: 0, tries: 4 })
        );
        // An answer resets the back-off.
        let mut up = Uploader::new(&image, 0, config);
        up.transmit(now);
        let first = up.timeout();
        up.on_timeout(now).unwrap();
        up.on_reply(&ack(128), now).unwrap();
        assert!(up.timeout() <= first, "{:?} > {first:?}", up.timeout());
    }

    #[test]
    fn chunks_shrink_on_a_bad_line_and_grow_back_while_they_arrive() {
        let image = vec![1u8; 1 << 20];
        let mut up = Uploader::new(&image, 0, UploadConfig::default());
        let now = Instant::now();
        up.transmit(now);
        for _ in 0..6 {
            up.on_timeout(now).unwrap();
        }
        let small = offsets(&up.transmit(now));
        assert!(small.is_empty(), "the window is full");
        let mut acked = 0;
        let mut sizes = Vec::new();
        for _ in 0..200 {
            let next = offsets(&up.on_reply(&ack(acked + 128), now).unwrap());
            acked = up.acked();
            if let Some(&(_, len)) = next.last() {
                sizes.push(len);
            }
        }
        assert_eq!(sizes[0], 128, "at the floor after six silences");
        assert_eq!(*sizes.last().unwrap(), 2048, "back to full size: {sizes:?}");
        assert!(sizes.windows(2).all(|w| w[1] >= w[0]), "{sizes:?}");
    }

    #[test]
    fn device_refusals_end_the_upload() {
        let image = vec![1u8; 4096];
        let mut up = Uploader::new(&image, 0, UploadConfig::default());
        let now = Instant::now();
        up.transmit(now);
        up.on_reply(&ack(2048), now).unwrap();
        let no_upload = Message::Nack(Nack {
            reason: NackReason::NoUpload,
            expected_offset: 0,
            detail: "restarted".into(),
        });
        assert_eq!(
            up.on_reply(&no_upload, now),
            Err(UploadError::Dropped { acked: 2048 })
        );
        let storage = Nack {
            reason: NackReason::Storage,
            expected_offset: 2048,
            detail: "disk full".into(),
        };
        assert_eq!(
            up.on_reply(&Message::Nack(storage.clone()), now),
            Err(UploadError::Refused(storage))
        );
    }

    /// A peer that acknowledges chunks in order, as the device's updater does.
    fn receiver(mut end: MemoryLink, size: u64) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut got = Vec::new();
            while let Some(m) = end.recv(Duration::from_secs(2)).unwrap() {
                let reply = match m {
                    Message::Chunk(c) if c.offset == got.len() as u64 => {
                        got.extend_from_slice(&c.data);
                        ack(got.len() as u64)
                    }
                    Message::Chunk(_) => bad_offset(got.len() as u64),
                    _ => continue,
                };
                end.send(&reply).unwrap();
                if got.len() as u64 == size {
                    // Acknowledgements get lost too: answer resends until the sender stops.
                    while let Some(m) = end.recv(Duration::from_millis(200)).unwrap() {
                        if matches!(m, Message::Chunk(_)) {
                            end.send(&ack(size)).unwrap();
                        }
                    }
                    break;
                }
            }
            got
        })
    }

    #[test]
    fn an_image_crosses_a_link_that_flips_and_drops_bytes() {
        let image: Vec<u8> = (0..200_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let noise = Noise {
            flip: 2e-5,
            drop: 2e-5,
        };
        let (mut host, device) = MemoryLink::pair(noise, 42);
        let peer = receiver(device, image.len() as u64);
        let config = UploadConfig {
            baud: 100_000_000,
            initial_rtt: Duration::from_millis(1),
            retries: 20,
            ..UploadConfig::default()
        };
        let mut up = Uploader::new(&image, 0, config);
        let mut progress = Vec::new();
        let wire = drive(&mut host, &mut up, |a| progress.push(a)).unwrap();
        drop(host);
        assert_eq!(peer.join().unwrap(), image);
        assert!(progress.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(progress.last(), Some(&(image.len() as u64)));
        assert!(wire > image.len() as u64);
        assert!(
            up.resends() > 0,
            "the noise cost no resend: too weak to test anything"
        );
    }

    #[test]
    fn a_memory_link_carries_messages_and_its_noise_is_caught_by_the_crc() {
        let (mut a, mut b) = MemoryLink::pair(Noise::default(), 1);
        let begin = Message::Begin(Begin {
            kind: ImageKind::Model,
            size: 5,
            sha256: [3; 32],
            version: "1".into(),
            signature: Vec::new(),
        });
        a.send(&begin).unwrap();
        assert_eq!(b.recv(Duration::from_secs(1)).unwrap(), Some(begin.clone()));
        assert_eq!(b.recv(Duration::from_millis(1)).unwrap(), None);
        let (mut a, mut b) = MemoryLink::pair(
            Noise {
                flip: 1.0,
                drop: 0.0,
            },
            1,
        );
        for _ in 0..10 {
            a.send(&begin).unwrap();
        }
        assert_eq!(b.recv(Duration::from_millis(10)).unwrap(), None);
        assert!(a.flipped > 0 && a.dropped == 0);
    }

    #[test]
    fn late_answers_to_chunks_are_not_taken_for_the_answer_to_a_commit() {
        let (mut host, mut device) = MemoryLink::pair(Noise::default(), 1);
        // What a device still had queued when the host sent `Commit`: answers to chunks.
        for offset in [2048, 4096] {
            device.send(&Message::Ack { offset }).unwrap();
        }
        device
            .send(&Message::Nack(Nack {
                reason: NackReason::BadOffset,
                expected_offset: 6000,
                detail: String::new(),
            }))
            .unwrap();
        device.send(&Message::Ack { offset: 6000 }).unwrap();
        let retry = Retry {
            retries: 0,
            timeout: Duration::from_secs(1),
        };
        let mut echoes = 0;
        let answer = request(&mut host, &Message::Commit, retry, Some(6000), |e| {
            if matches!(e, Event::Other(_)) {
                echoes += 1;
            }
        });
        assert_eq!(answer.unwrap(), 6000);
        assert_eq!(echoes, 3);
        assert_eq!(
            device.recv(Duration::from_secs(1)).unwrap(),
            Some(Message::Commit)
        );
    }
}
