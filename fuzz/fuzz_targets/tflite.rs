//! The TFLite flatbuffer reader, and the dequantisation of every tensor it found.
#![no_main]

use libfuzzer_sys::fuzz_target;
use petcam_host::backbone::tflite::TfliteModel;

fuzz_target!(|data: &[u8]| {
    if let Ok(model) = TfliteModel::parse(data) {
        for t in 0..model.tensors.len() {
            let _ = model.dequantized(t);
        }
    }
});
