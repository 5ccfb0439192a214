//! petcam on the camera computer.
//!
//! Frames come from a [`source`], are decoded and resized by [`preprocess`], classified by
//! [`infer`] (both from `petcam-runtime`, which the host uses too, so it scores a model exactly
//! as the device runs it), turned into decisions by [`decide`] and into pin levels by
//! [`actuate`]; [`service`] runs them as `petcam-device run` does, with [`telemetry`] and
//! [`update`]s over the serial link.

pub mod actuate;
pub mod agent;
pub mod decide;
pub mod firmware;
pub mod retry;
pub mod service;
pub mod source;
pub mod state_dir;
pub mod telemetry;
pub mod update;

pub use petcam_runtime::{infer, peak_rss_mb, preprocess, threads};
