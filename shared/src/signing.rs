//! What an upload's signature covers, how versions compare, and ed25519 verification.
//!
//! The signature is over the image's kind, version and SHA-256, not over its bytes: the
//! device checks it when the upload is announced (`Begin`), before a byte of data is stored,
//! and the hash it checks at `Commit` ties the signature to the data.

use alloc::vec::Vec;
use core::cmp::Ordering;

use ed25519_dalek::Signature;
pub use ed25519_dalek::VerifyingKey;

use crate::protocol::ImageKind;

/// Length of an ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// Domain separation: a signature made for anything else never verifies as a petcam image.
const DOMAIN: &[u8] = b"petcam image signature v1\0";

/// The bytes that are signed for an image of `kind`, `version` and `sha256`.
pub fn signed_payload(kind: ImageKind, version: &str, sha256: &[u8; 32]) -> Vec<u8> {
    let mut m = Vec::with_capacity(DOMAIN.len() + 1 + 8 + version.len() + 32);
    m.extend_from_slice(DOMAIN);
    m.push(match kind {
        ImageKind::Model => b'M',
        ImageKind::Firmware => b'F',
    });
    // Length-prefixed so no two (version, hash) pairs give the same bytes.
    m.extend_from_slice(&(version.len() as u64).to_le_bytes());
    m.extend_from_slice(version.as_bytes());
    m.extend_from_slice(sha256);
    m
}

/// Why a signature was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureError {
    /// No signature at all.
    Missing,
    /// Not 64 bytes.
    Malformed { len: usize },
    /// 64 bytes that do not verify with the trusted key.
    Invalid,
}

impl core::fmt::Display for SignatureError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            SignatureError::Missing => write!(f, "the upload is not signed"),
            SignatureError::Malformed { len } => {
                write!(f, "the signature is {len} bytes, not {SIGNATURE_LEN}")
            }
            SignatureError::Invalid => {
                write!(f, "the signature does not verify with the trusted key")
            }
        }
    }
}

/// Checks `signature` over the image's identity with `key` (strict verification: no
/// malleable or small-order signatures).
pub fn verify(
    key: &VerifyingKey,
    kind: ImageKind,
    version: &str,
    sha256: &[u8; 32],
    signature: &[u8],
) -> Result<(), SignatureError> {
    if signature.is_empty() {
        return Err(SignatureError::Missing);
    }
    let sig = Signature::from_slice(signature).map_err(|_| SignatureError::Malformed {
        len: signature.len(),
    })?;
    let payload = signed_payload(kind, version, sha256);
    key.verify_strict(&payload, &sig)
        .map_err(|_| SignatureError::Invalid)
}

/// Compares versions such as `1.2.10` and `1.10`: dot-separated parts, numerically where both
/// parts are numbers, as text otherwise; a missing part counts as 0 (`1.2` = `1.2.0`).
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    let mut x = a.trim().split('.');
    let mut y = b.trim().split('.');
    loop {
        let (p, q) = match (x.next(), y.next()) {
            (None, None) => return Ordering::Equal,
            (p, q) => (p.unwrap_or("0"), q.unwrap_or("0")),
        };
        let ord = match (p.parse::<u64>(), q.parse::<u64>()) {
            (Ok(p), Ok(q)) => p.cmp(&q),
            _ => p.cmp(q),
        };
        if ord != Ordering::Equal {
            return ord;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    #[test]
    fn a_signature_verifies_only_for_what_was_signed() {
        let k = key(7);
        let hash = [3u8; 32];
        let sig = k.sign(&signed_payload(ImageKind::Model, "1.2.0", &hash));
        let sig = sig.to_bytes();
        let pk = k.verifying_key();
        assert_eq!(verify(&pk, ImageKind::Model, "1.2.0", &hash, &sig), Ok(()));
        // Another kind, version, hash or key: refused.
        let bad = Err(SignatureError::Invalid);
        assert_eq!(verify(&pk, ImageKind::Firmware, "1.2.0", &hash, &sig), bad);
        assert_eq!(verify(&pk, ImageKind::Model, "1.2.1", &hash, &sig), bad);
        assert_eq!(verify(&pk, ImageKind::Model, "1.2.0", &[4; 32], &sig), bad);
        assert_eq!(
            verify(
                &key(8).verifying_key(),
                ImageKind::Model,
                "1.2.0",
                &hash,
                &sig
            ),
            bad
        );
        // Missing, truncated, or one bit off.
        assert_eq!(
            verify(&pk, ImageKind::Model, "1.2.0", &hash, &[]),
            Err(SignatureError::Missing)
        );
        assert_eq!(
            verify(&pk, ImageKind::Model, "1.2.0", &hash, &sig[..63]),
            Err(SignatureError::Malformed { len: 63 })
        );
        let mut flipped = sig;
        flipped[10] ^= 1;
        assert_eq!(verify(&pk, ImageKind::Model, "1.2.0", &hash, &flipped), bad);
    }

    #[test]
    fn versions_compare_by_numeric_parts() {
        use Ordering::*;
        assert_eq!(compare_versions("1.10", "1.9"), Greater);
        assert_eq!(compare_versions("1.2", "1.2.0"), Equal);
        assert_eq!(compare_versions("0.9.1", "0.10"), Less);
        assert_eq!(compare_versions("2", "10"), Less);
        assert_eq!(compare_versions("1.0-rc1", "1.0-rc2"), Less);
    }
}

/// First word of a public key file (`petcam keygen` writes `NAME.pub`).
pub const PUBLIC_KEY_TAG: &str = "petcam-ed25519-public";
/// First word of a secret key file (`NAME.key`).
pub const SECRET_KEY_TAG: &str = "petcam-ed25519-secret";

/// A key file's text: its tag, a space, 64 hex digits, a newline.
pub fn encode_key(tag: &str, key: &[u8; 32]) -> alloc::string::String {
    let mut s = alloc::string::String::from(tag);
    s.push(' ');
    for b in key {
        s.push(char::from_digit(u32::from(b >> 4), 16).unwrap_or('0'));
        s.push(char::from_digit(u32::from(b & 15), 16).unwrap_or('0'));
    }
    s.push('\n');
    s
}

/// The 32 key bytes of a key file written by [`encode_key`] with `tag`; `None` when the text
/// is anything else (another tag: a secret key given where a public one is expected).
pub fn decode_key(tag: &str, text: &str) -> Option<[u8; 32]> {
    let hex = text.trim().strip_prefix(tag)?.strip_prefix(' ')?.trim();
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod key_file_tests {
    use super::*;

    #[test]
    fn key_files_round_trip_and_are_told_apart() {
        let k = [0xa5u8; 32];
        let text = encode_key(PUBLIC_KEY_TAG, &k);
        assert_eq!(decode_key(PUBLIC_KEY_TAG, &text), Some(k));
        assert_eq!(decode_key(SECRET_KEY_TAG, &text), None);
        assert_eq!(decode_key(PUBLIC_KEY_TAG, &text[..60]), None);
    }
}
