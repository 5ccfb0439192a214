//! The weights reader: a legacy `.pth` (pickles and raw storages), a zip `.pth` or a
//! `.safetensors`, chosen by the content as `petcam train --weights` chooses it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use petcam_host::backbone::weights;

fuzz_target!(|data: &[u8]| {
    let _ = weights::parse(std::path::Path::new("fuzz.pth"), data);
});
