//! Consistent Overhead Byte Stuffing: removes every 0x00 from a frame so that 0x00 can mark where
//! frames end.
//!
//! Each run of up to 254 non-zero bytes is preceded by a code byte (run length + 1); a code below
//! 0xFF also stands for the 0x00 that followed the run in the original data. The cost is at most
//! one byte per 254, whatever the data, unlike escaping, which can double a frame of 0x7E bytes.
//! A receiver that starts listening mid-stream, or loses a byte, is back in step at the next
//! 0x00.

use alloc::vec::Vec;

/// Longest run a code byte can describe; a full run carries no implied zero.
const MAX_RUN: usize = 254;

/// Worst-case encoded length of `n` bytes (a frame without zeros), delimiter not included.
pub(crate) const fn max_encoded_len(n: usize) -> usize {
    if n == 0 {
        1
    } else {
        n + n.div_ceil(MAX_RUN)
    }
}

/// Encodes a byte at a time, straight into the output, so a message is serialised, checksummed
/// and stuffed in one pass without an intermediate buffer.
///
/// A new block is opened only when a byte needs it, so data ending on a full 254-byte run gets no
/// trailing `01` (the encoding Wikipedia's examples show, and the shortest).
#[derive(Debug)]
pub(crate) struct Encoder {
    /// Index in the output of the open block's code byte; `None` right after a full run.
    code_at: Option<usize>,
    /// Code of the open block: bytes in it + 1.
    code: u8,
}

impl Encoder {
    /// Opens the first block at the end of `out`.
    pub(crate) fn start(out: &mut Vec<u8>) -> Self {
        let code_at = out.len();
        out.push(0);
        Self {
            code_at: Some(code_at),
            code: 1,
        }
    }

    #[inline]
    pub(crate) fn push(&mut self, out: &mut Vec<u8>, byte: u8) {
        let at = match self.code_at {
            Some(at) => at,
            None => {
                let at = out.len();
                out.push(0);
                self.code = 1;
                self.code_at = Some(at);
                at
            }
        };
        if byte == 0 {
            out[at] = self.code;
            self.code_at = Some(out.len());
            out.push(0);
            self.code = 1;
        } else {
            out.push(byte);
            self.code += 1;
            if usize::from(self.code) == MAX_RUN + 1 {
                out[at] = self.code;
                self.code_at = None;
            }
        }
    }

    /// Closes the last block. The delimiter is the caller's to write.
    pub(crate) fn finish(self, out: &mut [u8]) {
        if let Some(at) = self.code_at {
            out[at] = self.code;
        }
    }
}

/// Decodes one frame (no delimiter) in place and returns the decoded length, or `None` if the
/// frame is not valid COBS: a zero byte inside it, or a code that runs past its end.
pub(crate) fn decode_in_place(buf: &mut [u8]) -> Option<usize> {
    let len = buf.len();
    let (mut read, mut write) = (0, 0);
    while read < len {
        let code = usize::from(buf[read]);
        if code == 0 {
            return None;
        }
        read += 1;
        let end = read + code - 1;
        if end > len || buf[read..end].contains(&0) {
            return None;
        }
        // The output never overtakes the input: each block shrinks by its code byte.
        buf.copy_within(read..end, write);
        write += end - read;
        read = end;
        if code <= MAX_RUN && read < len {
            buf[write] = 0;
            write += 1;
        }
    }
    Some(write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn encode(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut encoder = Encoder::start(&mut out);
        for &byte in data {
            encoder.push(&mut out, byte);
        }
        encoder.finish(&mut out);
        out
    }

    fn decode(data: &[u8]) -> Option<Vec<u8>> {
        let mut buf = data.to_vec();
        let len = decode_in_place(&mut buf)?;
        buf.truncate(len);
        Some(buf)
    }

    fn run(from: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| from.wrapping_add(i as u8)).collect()
    }

    /// The examples of the Wikipedia article "Consistent Overhead Byte Stuffing" (delimiter
    /// removed).
    #[test]
    fn wikipedia_examples() {
        let cases: Vec<(Vec<u8>, Vec<u8>)> = vec![
            (vec![0x00], vec![0x01, 0x01]),
            (vec![0x00, 0x00], vec![0x01, 0x01, 0x01]),
            (vec![0x00, 0x11, 0x00], vec![0x01, 0x02, 0x11, 0x01]),
            (
                vec![0x11, 0x22, 0x00, 0x33],
                vec![0x03, 0x11, 0x22, 0x02, 0x33],
            ),
            (
                vec![0x11, 0x22, 0x33, 0x44],
                vec![0x05, 0x11, 0x22, 0x33, 0x44],
            ),
            (
                vec![0x11, 0x00, 0x00, 0x00],
                vec![0x02, 0x11, 0x01, 0x01, 0x01],
            ),
            // 01..=FE
            (run(0x01, 254), [vec![0xFF], run(0x01, 254)].concat()),
            // 00..=FE
            (run(0x00, 255), [vec![0x01, 0xFF], run(0x01, 254)].concat()),
            // 01..=FF
            (
                run(0x01, 255),
                [vec![0xFF], run(0x01, 254), vec![0x02, 0xFF]].concat(),
            ),
            // 02..=FF 00
            (
                run(0x02, 255),
                [vec![0xFF], run(0x02, 254), vec![0x01, 0x01]].concat(),
            ),
            // 03..=FF 00 01
            (
                run(0x03, 255),
                [vec![0xFE], run(0x03, 253), vec![0x02, 0x01]].concat(),
            ),
        ];
        for (data, encoded) in cases {
            assert_eq!(encode(&data), encoded, "encoding {data:02X?}");
            assert_eq!(decode(&encoded), Some(data), "decoding {encoded:02X?}");
        }
    }

    #[test]
    fn worst_case_length_is_exact() {
        for n in [0, 1, 253, 254, 255, 508, 509, 4096, super::super::MAX_FRAME] {
            let data = vec![0x5A; n];
            assert_eq!(encode(&data).len(), max_encoded_len(n), "{n} bytes");
        }
    }

    #[test]
    fn rejects_zero_and_overrun() {
        assert_eq!(decode(&[0x00]), None);
        assert_eq!(decode(&[0x03, 0x11, 0x00]), None);
        assert_eq!(decode(&[0x05, 0x11]), None);
        assert_eq!(decode(&[]), Some(vec![]));
    }
}
