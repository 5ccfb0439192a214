//! An exported petcam model loaded with tract. The runtime is the device's own
//! (`petcam_device::infer`), so `petcam evaluate` scores a model exactly as the camera runs it.

pub use petcam_device::infer::*;
