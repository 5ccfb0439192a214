//! Bytes from the line ⇄ frames: accumulate up to a delimiter, decode, resynchronise after
//! garbage.

use alloc::vec::Vec;
use core::fmt;

use super::frame::decode_in_place;
use super::{Message, ProtocolError, MAX_ENCODED};

/// Longest frame kept, without its delimiter.
const MAX_FRAME_BYTES: usize = MAX_ENCODED - 1;

/// What [`Reassembler::push`] reports for each non-empty frame.
#[derive(Debug, Clone, PartialEq)]
#[allow(
    clippy::large_enum_variant,
    reason = "handed to the callback and dropped, never stored in bulk; a Box would cost an allocation per frame"
)]
pub enum Received {
    Message(Message),
    /// A frame that did not decode; its `bytes` (delimiter not counted) are dropped.
    Rejected {
        bytes: usize,
        error: ProtocolError,
    },
}

/// Cuts a byte stream (a serial port read at arbitrary boundaries) into frames and decodes them.
///
/// Its buffer is allocated once, at [`MAX_ENCODED`] bytes, and never grows: a frame longer than
/// that (noise, or a peer that never sends a delimiter) is skipped up to the next 0x00 and
/// reported once, so a bad line cannot exhaust the memory of a small device. Empty frames
/// (consecutive delimiters) are ignored, so a sender may emit a 0x00 first to flush whatever
/// half-frame the receiver held.
pub struct Reassembler {
    buf: Vec<u8>,
    /// Bytes of an oversized frame skipped so far; 0 when not skipping.
    skipped: usize,
    frames_ok: u64,
    frames_rejected: u64,
    bytes_dropped: u64,
}

impl Reassembler {
    pub fn new() -> Self {
        Self {
            buf: Vec::with_capacity(MAX_ENCODED),
            skipped: 0,
            frames_ok: 0,
            frames_rejected: 0,
            bytes_dropped: 0,
        }
    }

    /// Feeds bytes as they arrive; `on` is called once per complete non-empty frame, in order.
    pub fn push(&mut self, mut bytes: &[u8], mut on: impl FnMut(Received)) {
        while !bytes.is_empty() {
            match bytes.iter().position(|&b| b == 0) {
                Some(end) => {
                    self.absorb(&bytes[..end]);
                    self.end_frame(&mut on);
                    bytes = &bytes[end + 1..];
                }
                None => {
                    self.absorb(bytes);
                    bytes = &[];
                }
            }
        }
    }

    fn absorb(&mut self, bytes: &[u8]) {
        if self.skipped > 0 {
            self.skipped += bytes.len();
            self.bytes_dropped += bytes.len() as u64;
        } else if self.buf.len() + bytes.len() > MAX_FRAME_BYTES {
            self.skipped = self.buf.len() + bytes.len();
            self.bytes_dropped += self.skipped as u64;
            self.buf.clear();
        } else {
            self.buf.extend_from_slice(bytes);
        }
    }

    fn end_frame(&mut self, on: &mut impl FnMut(Received)) {
        if self.skipped > 0 {
            let bytes = core::mem::take(&mut self.skipped);
            self.frames_rejected += 1;
            on(Received::Rejected {
                bytes,
                error: ProtocolError::TooLarge {
                    size: bytes + 1,
                    max: MAX_ENCODED,
                },
            });
            return;
        }
        if self.buf.is_empty() {
            return;
        }
        let bytes = self.buf.len();
        let result = decode_in_place(&mut self.buf);
        self.buf.clear();
        match result {
            Ok(msg) => {
                self.frames_ok += 1;
                on(Received::Message(msg));
            }
            Err(error) => {
                self.frames_rejected += 1;
                self.bytes_dropped += bytes as u64;
                on(Received::Rejected { bytes, error });
            }
        }
    }

    /// Frames decoded into a message.
    pub fn frames_ok(&self) -> u64 {
        self.frames_ok
    }

    /// Frames reported as [`Received::Rejected`].
    pub fn frames_rejected(&self) -> u64 {
        self.frames_rejected
    }

    /// Bytes of rejected frames, delimiters not counted; includes an oversized frame still
    /// being skipped.
    pub fn bytes_dropped(&self) -> u64 {
        self.bytes_dropped
    }

    /// Bytes of the incomplete frame held.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Capacity of the buffer; stays [`MAX_ENCODED`].
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }
}

impl Default for Reassembler {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Reassembler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reassembler")
            .field("buffered", &self.buf.len())
            .field("skipped", &self.skipped)
            .field("frames_ok", &self.frames_ok)
            .field("frames_rejected", &self.frames_rejected)
            .field("bytes_dropped", &self.bytes_dropped)
            .finish()
    }
}
