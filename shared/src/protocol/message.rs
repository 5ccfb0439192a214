//! The messages host and device exchange.
//!
//! postcard writes an enum variant as its index and a struct as its fields in declaration order,
//! with no names and no lengths. So the order of variants and fields *is* the wire format:
//! new variants go at the end of an enum; any other change (a field added, removed, reordered or
//! retyped) needs a new [`PROTOCOL_VERSION`](super::PROTOCOL_VERSION).

use alloc::string::String;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

use super::{ProtocolError, PROTOCOL_VERSION};

/// Everything that travels over the link, in either direction.
///
/// Variant 0 is [`Hello`] and must stay so in every version, with `protocol_version` as its first
/// field: that is what lets a peer of any version read the version of the other side and refuse
/// it cleanly instead of misparsing the rest (see [`decode_frame`](super::decode_frame)).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// Starts every session, sent by both sides.
    Hello(Hello),
    /// Device → host, about once a second: the device is alive and how it is doing.
    Heartbeat(Heartbeat),
    /// Device → host: the decision changed.
    Event(Event),
    /// Device → host: something failed.
    Error(ErrorReport),
    /// Device → host: a log line.
    Log(Log),
    /// Host → device: an upload (model or firmware) starts.
    Begin(Begin),
    /// Host → device: a piece of the upload, at most [`CHUNK_SIZE`](super::CHUNK_SIZE) bytes.
    Chunk(Chunk),
    /// Host → device: all chunks are sent; verify, stage and self-test the image.
    Commit,
    /// Host → device: drop the upload in progress.
    Abort,
    /// Device → host: the step was accepted; the image is received up to `offset` bytes.
    Ack {
        /// Bytes of the image received so far.
        offset: u64,
    },
    /// Device → host: the last `Begin`, `Chunk` or `Commit` was refused.
    Nack(Nack),
    /// Host → device: reply with a [`Status`].
    StatusRequest,
    /// Device → host: which images are active and staged.
    Status(Status),
}

/// Which end of the link is speaking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    Host,
    Device,
}

/// The first message of every session, sent by both sides.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// Must stay the first field: it is read before the rest of the message is parsed.
    pub protocol_version: u16,
    pub role: Role,
    /// Stable name of the device (the host sends its host name).
    pub device_id: String,
    /// Version of the sender's software (`petcam` or `petcam-device`).
    pub firmware_version: String,
    /// Identity of the model the device runs; empty when none (and from the host).
    pub model_id: String,
}

impl Hello {
    /// A `Hello` for this build's [`PROTOCOL_VERSION`].
    pub fn new(
        role: Role,
        device_id: impl Into<String>,
        firmware_version: impl Into<String>,
        model_id: impl Into<String>,
    ) -> Self {
        Self {
            protocol_version: PROTOCOL_VERSION,
            role,
            device_id: device_id.into(),
            firmware_version: firmware_version.into(),
            model_id: model_id.into(),
        }
    }

    /// `Err(ProtocolError::Version)` unless the peer speaks this build's protocol version.
    pub fn check_version(&self) -> Result<(), ProtocolError> {
        if self.protocol_version == PROTOCOL_VERSION {
            Ok(())
        } else {
            Err(ProtocolError::Version {
                ours: PROTOCOL_VERSION,
                theirs: self.protocol_version,
            })
        }
    }
}

/// The device's periodic health report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub uptime_ms: u64,
    /// Frames classified since start.
    pub frames: u64,
    /// Frames classified per second, recent average.
    pub fps: f32,
    pub infer_p50_ms: f32,
    pub infer_p95_ms: f32,
    /// Camera frames skipped because inference was still busy.
    pub frames_dropped: u64,
    /// Telemetry messages not sent because the link was too slow.
    pub telemetry_dropped: u64,
    /// `None` where the board has no readable sensor.
    pub cpu_temp_c: Option<f32>,
    pub model_id: String,
    /// The current decision (a label); `None` = not sure.
    pub decision: Option<String>,
    pub confidence: f32,
}

/// A change of decision. Labels are strings so the protocol does not depend on the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub at_ms: u64,
    /// Number of the frame that caused the change.
    pub frame: u64,
    /// `None` = not sure.
    pub from: Option<String>,
    /// `None` = not sure.
    pub to: Option<String>,
    pub confidence: f32,
}

/// Which part of the device failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorSource {
    Camera,
    Model,
    Serial,
    Gpio,
    Upload,
    Other,
}

/// A failure on the device, for the operator watching `petcam monitor`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorReport {
    pub at_ms: u64,
    pub source: ErrorSource,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
}

/// A log line forwarded from the device. Keep messages short: a frame holds at most
/// [`MAX_FRAME`](super::MAX_FRAME) bytes and a longer message fails to encode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Log {
    pub at_ms: u64,
    pub level: LogLevel,
    pub message: String,
}

/// What an upload replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ImageKind {
    Model,
    Firmware,
}

/// Announces an upload. Everything the device needs to refuse it early (too large, unsigned,
/// a downgrade) comes before the first byte of data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Begin {
    pub kind: ImageKind,
    /// Total size of the image in bytes.
    pub size: u64,
    /// SHA-256 of the whole image, checked at `Commit`.
    pub sha256: [u8; 32],
    pub version: String,
    /// Signature over the image; empty for an unsigned upload.
    pub signature: Vec<u8>,
}

/// A piece of the upload. `offset` makes a resend after a lost `Ack` harmless: the device
/// writes at the offset, or answers with the offset it expects.
///
/// postcard writes `data` as a length and the raw bytes, as it would `serde_bytes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Chunk {
    pub offset: u64,
    pub data: Vec<u8>,
}

/// Why the device refused an upload step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum NackReason {
    /// The chunk's offset is not the one expected (see `expected_offset`).
    BadOffset,
    /// The signature does not verify with the device's key.
    BadSignature,
    /// The device requires a signature and there is none.
    Unsigned,
    /// The version is older than the active one.
    Downgrade,
    /// The received image does not hash to the `sha256` of `Begin`.
    HashMismatch,
    /// The staged image failed its self-test (for a model: the golden input/output pair).
    SelfTestFailed,
    /// The image does not fit the device's storage or limits.
    TooLarge,
    /// A `Chunk` or `Commit` arrived with no upload in progress.
    NoUpload,
    /// Another upload is in progress.
    Busy,
    /// Writing to storage failed.
    Storage,
    /// Protocol version mismatch.
    Version,
    Other,
}

/// A refused upload step, with what the host needs to fix or resume it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Nack {
    pub reason: NackReason,
    /// Where the host should resume sending.
    pub expected_offset: u64,
    /// Human-readable detail for the operator.
    pub detail: String,
}

/// An image in service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageInfo {
    pub version: String,
    pub sha256: [u8; 32],
    pub size: u64,
}

/// An image being received or waiting to be swapped in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StagedInfo {
    pub version: String,
    pub sha256: [u8; 32],
    pub size: u64,
    /// Bytes received so far; equal to `size` once complete, so the host can resume at this
    /// offset after a broken link.
    pub received: u64,
}

/// The device's images: what runs, and what is staged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub active_model: Option<ImageInfo>,
    pub staged_model: Option<StagedInfo>,
    pub active_firmware: Option<ImageInfo>,
    pub staged_firmware: Option<StagedInfo>,
    pub last_error: Option<String>,
}
