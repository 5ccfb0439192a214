//! Code that the petcam host (workstation) and device (Raspberry Pi) must agree on byte for byte.
//!
//! - [`preprocess`]: the one image resize routine used by the trainer, the evaluator and the
//!   device. Keeping it in one place is what prevents train/serve skew.
//! - [`depthwise`]: the depthwise 2-D convolution kernel that both inference back-ends (candle on
//!   the host, tract on the device) call for the hot layers of the backbone.
//! - [`protocol`]: the messages host and device exchange over serial, and their framing
//!   (postcard, CRC-32C, COBS) and version check.
//!
//! The crate is `no_std` + `alloc` so the wire protocol also fits a microcontroller; the `std`
//! feature (on by default) only adds conveniences for hosted targets.

#![no_std]

extern crate alloc;
// Tests use std for files and formatting even when the `std` feature is off.
#[cfg(any(test, feature = "std"))]
extern crate std;

// Numeric kernels.
pub mod depthwise;
pub mod preprocess;

// Wire protocol and model metadata.
pub mod metadata;
pub mod protocol;
pub mod signing;
