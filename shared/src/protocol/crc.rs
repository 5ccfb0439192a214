//! CRC-32C (Castagnoli): the integrity check appended to every frame body.
//!
//! Castagnoli rather than the IEEE CRC-32 of zip and Ethernet because it has the larger Hamming
//! distance at the frame sizes used here (it detects every error of up to 5 flipped bits in
//! frames of several kilobytes), and ARMv8 and x86 both have an instruction for it should the
//! table ever become the bottleneck. The table is built at compile time, so this needs no `std`.

/// Reflected form of the Castagnoli polynomial 0x1EDC6F41.
const POLY: u32 = 0x82F6_3B78;

/// One entry per byte value: the CRC remainder of that byte, for byte-at-a-time updates.
const TABLE: [u32; 256] = make_table();

const fn make_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ POLY
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
}

/// A running CRC-32C, for data that arrives a piece at a time (the encoder feeds it the body as
/// postcard produces it, so the body is never buffered twice).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Crc32c(u32);

impl Crc32c {
    pub(crate) const fn new() -> Self {
        Self(!0)
    }

    #[inline]
    pub(crate) fn push(&mut self, byte: u8) {
        self.0 = TABLE[((self.0 ^ u32::from(byte)) & 0xFF) as usize] ^ (self.0 >> 8);
    }

    pub(crate) fn update(&mut self, data: &[u8]) {
        for &byte in data {
            self.push(byte);
        }
    }

    pub(crate) const fn finish(self) -> u32 {
        !self.0
    }
}

/// CRC-32C of `data` (initial value and final XOR 0xFFFF_FFFF, as in iSCSI and ext4).
pub(crate) fn crc32c(data: &[u8]) -> u32 {
    let mut crc = Crc32c::new();
    crc.update(data);
    crc.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_value_of_123456789() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    /// The test vectors of RFC 3720 (iSCSI), appendix B.4.
    #[test]
    fn rfc3720_vectors() {
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xFFu8; 32]), 0x62A8_AB43);
        let ascending: [u8; 32] = core::array::from_fn(|i| i as u8);
        assert_eq!(crc32c(&ascending), 0x46DD_794E);
        let descending: [u8; 32] = core::array::from_fn(|i| 31 - i as u8);
        assert_eq!(crc32c(&descending), 0x113F_DB5C);
        assert_eq!(crc32c(&[]), 0);
    }

    #[test]
    fn piecewise_equals_whole() {
        let data: [u8; 100] = core::array::from_fn(|i| (i * 37) as u8);
        let mut crc = Crc32c::new();
        crc.update(&data[..13]);
        crc.push(data[13]);
        crc.update(&data[14..]);
        assert_eq!(crc.finish(), crc32c(&data));
    }
}
