//! What the model store ([`crate::update`]) and the firmware store ([`crate::firmware`]) share
//! in the state directory: the record of an installed image, and syncing a folder.

use std::fs::File;
use std::io;
use std::path::Path;

use petcam_shared::protocol::ImageInfo;
use serde::{Deserialize, Serialize};

/// An image (a model or a binary) in service, as `active.json` and `firmware/current.json`
/// record it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub version: String,
    /// Hex.
    pub sha256: String,
    pub size: u64,
}

impl Entry {
    /// The entry as the link reports it in a `Status`.
    pub fn info(&self) -> ImageInfo {
        ImageInfo {
            version: self.version.clone(),
            sha256: from_hex(&self.sha256).unwrap_or([0; 32]),
            size: self.size,
        }
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn from_hex(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if s.len() != 64 {
        return None;
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    // A directory is synced through a read-only handle to it (Linux and the BSDs).
    File::open(dir)?.sync_all()
}
