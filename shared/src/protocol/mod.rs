//! The wire protocol between host and device: messages, framing and versions.
//!
//! Every message is one frame:
//!
//! ```text
//! on the wire:  COBS( body ‖ CRC ) 0x00
//! body:         postcard(Message): varint variant index, then the fields in declaration order
//! CRC:          CRC-32C (Castagnoli) of the body, 4 bytes little-endian
//! limits:       body + CRC ≤ MAX_FRAME = 4352 bytes; on the wire ≤ MAX_ENCODED = 4371 bytes
//! ```
//!
//! - postcard because it is compact (varints, no field names) and `no_std`; it has no integrity
//!   check of its own, so the CRC guards against bits flipped on the serial line, and it is
//!   checked before parsing so line noise never reaches the parser.
//! - COBS because it removes every 0x00 from the frame at a cost of at most 1 byte in 254, so a
//!   0x00 always ends a frame: a receiver that joins mid-stream or loses a byte is back in step
//!   at the next delimiter, and a 2048-byte upload chunk still uses over 98 % of the link.
//! - The size limit lets a receiver (a [`Reassembler`]) use one fixed buffer, and bounds what a
//!   noisy line can cost it.
//! - A session starts with a [`Hello`] from both sides. It is variant 0 and its first field is
//!   the protocol version, in every version, so [`decode_frame`] can read the peer's version
//!   before anything else and refuse another version with [`ProtocolError::Version`] instead of
//!   misparsing it.
//!
//! CRC-32C and COBS are implemented here (small, `no_std`, and the COBS encoder is fused with
//! serialisation so a frame is built in one pass with no intermediate buffer).

mod cobs;
mod crc;
mod error;
mod frame;
mod message;
#[cfg(feature = "std")]
mod port;
mod reassembler;
#[cfg(feature = "serial")]
pub mod serial;
#[cfg(test)]
mod tests;
#[cfg(feature = "std")]
pub mod upload;

pub use error::ProtocolError;
pub use frame::{decode_frame, encode, encode_into};
pub use message::{
    Begin, Chunk, ErrorReport, ErrorSource, Event, Heartbeat, Hello, ImageInfo, ImageKind, Log,
    LogLevel, Message, Nack, NackReason, Role, StagedInfo, Status,
};
#[cfg(feature = "std")]
pub use port::write_frame;
pub use reassembler::{Reassembler, Received};

/// Version of the wire format. Bump it for any change other than a variant appended to an enum.
pub const PROTOCOL_VERSION: u16 = 1;

/// Data bytes per upload [`Chunk`]: large enough that framing costs under 2 %, small enough that
/// a corrupted chunk is cheap to resend.
pub const CHUNK_SIZE: usize = 2048;

/// Largest decoded frame (postcard body + 4 CRC bytes).
///
/// 4096 + 256 leaves room for a chunk of up to 4096 data bytes with its header, so
/// [`CHUNK_SIZE`] can grow without a new limit on the receiving side.
pub const MAX_FRAME: usize = 4096 + 256;

/// Largest frame on the wire: [`MAX_FRAME`] after COBS (worst case, no zero bytes), plus the
/// 0x00 delimiter.
pub const MAX_ENCODED: usize = cobs::max_encoded_len(MAX_FRAME) + 1;
