//! An exported petcam model loaded with tract. The runtime is the device's own
//! (`petcam_runtime::infer`), so `petcam evaluate` scores a model exactly as the camera runs it.

pub use petcam_runtime::infer::*;
