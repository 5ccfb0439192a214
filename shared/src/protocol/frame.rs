//! Message ⇄ frame: postcard body, CRC-32C, COBS, delimiter.

use alloc::vec::Vec;
use postcard::ser_flavors::Flavor;

use super::cobs;
use super::crc::{crc32c, Crc32c};
use super::{Message, ProtocolError, MAX_FRAME, PROTOCOL_VERSION};

/// Bytes of CRC after the body.
pub(crate) const CRC_LEN: usize = 4;
/// Largest postcard body that fits a frame.
const MAX_BODY: usize = MAX_FRAME - CRC_LEN;

/// Encodes `msg` as one frame, delimiter included.
pub fn encode(msg: &Message) -> Result<Vec<u8>, ProtocolError> {
    let mut out = Vec::new();
    encode_into(msg, &mut out)?;
    Ok(out)
}

/// Appends the frame of `msg`, delimiter included, to `out`; on error `out` is left as it was.
///
/// The body is serialised, checksummed and stuffed in one pass straight into `out`, so a sender
/// that reuses one buffer allocates nothing once the buffer has grown to its largest frame.
pub fn encode_into(msg: &Message, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
    let start = out.len();
    let result = write_frame(msg, out);
    if result.is_err() {
        out.truncate(start);
    }
    result
}

fn write_frame(msg: &Message, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
    let cobs = cobs::Encoder::start(out);
    let writer = FrameWriter {
        out,
        cobs,
        crc: Crc32c::new(),
        body_len: 0,
    };
    let FrameWriter {
        out,
        mut cobs,
        crc,
        body_len,
    } = postcard::serialize_with_flavor(msg, writer).map_err(ProtocolError::Encode)?;
    if body_len > MAX_BODY {
        return Err(ProtocolError::TooLarge {
            size: body_len + CRC_LEN,
            max: MAX_FRAME,
        });
    }
    for byte in crc.finish().to_le_bytes() {
        cobs.push(out, byte);
    }
    cobs.finish(out);
    out.push(0);
    Ok(())
}

/// A postcard output that checksums and COBS-encodes the body as it is produced.
///
/// Past [`MAX_BODY`] it only counts, so an oversized message is reported with its real size
/// without being written out.
struct FrameWriter<'a> {
    out: &'a mut Vec<u8>,
    cobs: cobs::Encoder,
    crc: Crc32c,
    body_len: usize,
}

impl Flavor for FrameWriter<'_> {
    type Output = Self;

    fn try_push(&mut self, byte: u8) -> postcard::Result<()> {
        self.try_extend(&[byte])
    }

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        let room = MAX_BODY.saturating_sub(self.body_len);
        let kept = &data[..data.len().min(room)];
        self.crc.update(kept);
        for &byte in kept {
            self.cobs.push(self.out, byte);
        }
        self.body_len += data.len();
        Ok(())
    }

    fn finalize(self) -> postcard::Result<Self> {
        Ok(self)
    }
}

/// Decodes one frame, as received between two 0x00 delimiters (without them).
///
/// Checks, in order: COBS, size, CRC, then the protocol version of a `Hello` (before parsing the
/// rest, whose layout may differ in another version), then parses the message; bytes left after
/// the message are an error too.
pub fn decode_frame(frame: &[u8]) -> Result<Message, ProtocolError> {
    let mut buf = frame.to_vec();
    decode_in_place(&mut buf)
}

/// [`decode_frame`] without a copy: the frame is decoded in its own buffer.
pub(crate) fn decode_in_place(buf: &mut [u8]) -> Result<Message, ProtocolError> {
    let len = cobs::decode_in_place(buf).ok_or(ProtocolError::Cobs)?;
    if len > MAX_FRAME {
        return Err(ProtocolError::TooLarge {
            size: len,
            max: MAX_FRAME,
        });
    }
    if len < CRC_LEN {
        return Err(ProtocolError::TooShort { size: len });
    }
    let (body, tail) = buf[..len].split_at(len - CRC_LEN);
    let expected = u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]);
    let found = crc32c(body);
    if expected != found {
        return Err(ProtocolError::Crc { expected, found });
    }
    // Variant 0 is `Hello` and its first field the version, in every version of the protocol.
    if let [0, rest @ ..] = body {
        if let Some(theirs) = read_varint_u16(rest) {
            if theirs != PROTOCOL_VERSION {
                return Err(ProtocolError::Version {
                    ours: PROTOCOL_VERSION,
                    theirs,
                });
            }
        }
    }
    let (msg, rest) = postcard::take_from_bytes(body).map_err(ProtocolError::Decode)?;
    if !rest.is_empty() {
        return Err(ProtocolError::Trailing { bytes: rest.len() });
    }
    Ok(msg)
}

/// postcard's varint (LEB128) for a `u16`: at most 3 bytes.
fn read_varint_u16(bytes: &[u8]) -> Option<u16> {
    let mut value = 0u32;
    for (i, &byte) in bytes.iter().take(3).enumerate() {
        value |= u32::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return u16::try_from(value).ok();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Chunk, Hello, Role};
    use alloc::vec;

    /// Builds a frame around any body, valid or not, the way `encode` would.
    fn frame_of(body: &[u8]) -> Vec<u8> {
        let mut plain = body.to_vec();
        plain.extend_from_slice(&crc32c(body).to_le_bytes());
        let mut out = Vec::new();
        let mut encoder = cobs::Encoder::start(&mut out);
        for &byte in &plain {
            encoder.push(&mut out, byte);
        }
        encoder.finish(&mut out);
        out
    }

    fn body_of(frame: &[u8]) -> Vec<u8> {
        let mut buf = frame.strip_suffix(&[0]).unwrap().to_vec();
        let len = cobs::decode_in_place(&mut buf).unwrap();
        buf.truncate(len - CRC_LEN);
        buf
    }

    #[test]
    fn hello_body_starts_with_tag_0_and_the_version() {
        let frame = encode(&Message::Hello(Hello::new(Role::Host, "h", "0.1.0", ""))).unwrap();
        assert_eq!(body_of(&frame)[..2], [0, PROTOCOL_VERSION as u8]);
    }

    #[test]
    fn frame_layout_is_cobs_of_body_and_crc_le() {
        let frame = encode(&Message::Ack { offset: 5 }).unwrap();
        // Ack is variant 9; offset 5 is one varint byte.
        let crc = crc32c(&[9, 5]).to_le_bytes();
        assert_eq!(body_of(&frame), [9, 5]);
        assert_eq!(frame, [frame_of(&[9, 5]), vec![0]].concat());
        assert_eq!(frame.len(), 2 + crc.len() + 2);
    }

    #[test]
    fn another_version_is_refused_even_with_another_layout() {
        // A version-3 Hello whose remaining fields mean nothing to version 1.
        let body = [0, 3, 0xFF, 0xFF, 0xFF, 0x01];
        let err = decode_frame(&frame_of(&body)).unwrap_err();
        assert_eq!(err, ProtocolError::Version { ours: 1, theirs: 3 });
        // Two-byte varint: version 300.
        let body = [0, 0xAC, 0x02];
        let err = decode_frame(&frame_of(&body)).unwrap_err();
        assert_eq!(
            err,
            ProtocolError::Version {
                ours: 1,
                theirs: 300
            }
        );
    }

    #[test]
    fn decoded_size_limit_is_exact() {
        // A valid CRC over a body one byte too large.
        let body = vec![0x42; MAX_BODY + 1];
        assert_eq!(
            decode_frame(&frame_of(&body)).unwrap_err(),
            ProtocolError::TooLarge {
                size: MAX_FRAME + 1,
                max: MAX_FRAME
            }
        );
        // At the limit, the frame gets past the size check to the parser.
        let body = vec![0x42; MAX_BODY];
        assert!(matches!(
            decode_frame(&frame_of(&body)).unwrap_err(),
            ProtocolError::Decode(_)
        ));
    }

    #[test]
    fn encode_size_limit_is_exact() {
        // Chunk body: tag 6, offset 1, a 2-byte length, the data.
        let chunk = |len: usize| {
            Message::Chunk(Chunk {
                offset: 1,
                data: vec![0xEE; len],
            })
        };
        let largest = MAX_BODY - 4;
        let frame = encode(&chunk(largest)).unwrap();
        assert_eq!(body_of(&frame).len(), MAX_BODY);
        assert!(frame.len() <= crate::protocol::MAX_ENCODED);
        let mut out = vec![7];
        assert_eq!(
            encode_into(&chunk(largest + 1), &mut out).unwrap_err(),
            ProtocolError::TooLarge {
                size: MAX_FRAME + 1,
                max: MAX_FRAME
            }
        );
        assert_eq!(out, [7], "a failed encode leaves the buffer as it was");
    }

    #[test]
    fn short_corrupt_and_trailing_frames_are_refused() {
        assert_eq!(
            decode_frame(&[]).unwrap_err(),
            ProtocolError::TooShort { size: 0 }
        );
        assert_eq!(
            decode_frame(&[0x04, 1, 2, 3]).unwrap_err(),
            ProtocolError::TooShort { size: 3 }
        );
        assert_eq!(
            decode_frame(&[0x05, 1, 0]).unwrap_err(),
            ProtocolError::Cobs
        );
        let mut frame = encode(&Message::Commit).unwrap();
        frame.pop();
        frame[1] ^= 0x10;
        assert!(matches!(
            decode_frame(&frame).unwrap_err(),
            ProtocolError::Crc { .. }
        ));
        // Commit (tag 7) followed by a stray byte.
        assert_eq!(
            decode_frame(&frame_of(&[7, 1])).unwrap_err(),
            ProtocolError::Trailing { bytes: 1 }
        );
        // Unknown variant.
        assert!(matches!(
            decode_frame(&frame_of(&[13])).unwrap_err(),
            ProtocolError::Decode(_)
        ));
    }
}
