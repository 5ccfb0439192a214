use core::fmt;

/// Why a message could not be encoded, or a frame was refused.
///
/// Written by hand rather than with `thiserror` so the crate stays `no_std` without changing the
/// workspace's `thiserror` features.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    /// The frame is larger than the limit. When encoding or decoding a frame, sizes are of
    /// postcard body + CRC against [`MAX_FRAME`](super::MAX_FRAME); from a
    /// [`Reassembler`](super::Reassembler), of the bytes on the wire including the delimiter
    /// against [`MAX_ENCODED`](super::MAX_ENCODED).
    TooLarge { size: usize, max: usize },
    /// The decoded frame is shorter than its 4-byte CRC.
    TooShort { size: usize },
    /// The frame is not valid COBS (a byte lost or corrupted on the line).
    Cobs,
    /// The CRC in the frame (`expected`) differs from the CRC of its body (`found`).
    Crc { expected: u32, found: u32 },
    /// The CRC matched but the body is not a message of this protocol version.
    Decode(postcard::Error),
    /// The body holds a message and then `bytes` more bytes.
    Trailing { bytes: usize },
    /// The peer's `Hello` carries another protocol version.
    Version { ours: u16, theirs: u16 },
    /// postcard could not serialise the message.
    Encode(postcard::Error),
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLarge { size, max } => {
                write!(f, "frame of {size} bytes exceeds the limit of {max} bytes")
            }
            Self::TooShort { size } => {
                write!(f, "frame of {size} bytes is shorter than its 4-byte CRC")
            }
            Self::Cobs => {
                f.write_str("malformed COBS framing (a byte lost or corrupted on the line)")
            }
            Self::Crc { expected, found } => write!(
                f,
                "CRC mismatch: frame says {expected:#010x}, body gives {found:#010x} \
                 (corrupted on the line)"
            ),
            Self::Decode(e) => write!(f, "undecodable message: {e}"),
            Self::Trailing { bytes } => write!(f, "{bytes} unexpected bytes after the message"),
            Self::Version { ours, theirs } => write!(
                f,
                "protocol version mismatch: this side speaks version {ours}, the peer speaks \
                 version {theirs}; update the older of petcam (host) and petcam-device so both \
                 speak the same version"
            ),
            Self::Encode(e) => write!(f, "cannot encode message: {e}"),
        }
    }
}

impl core::error::Error for ProtocolError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            Self::Decode(e) | Self::Encode(e) => Some(e),
            _ => None,
        }
    }
}
