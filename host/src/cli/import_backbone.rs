//! `petcam import-backbone`: converts a TensorFlow Lite MobileNetV2 into safetensors once.

use std::path::PathBuf;

use anyhow::{bail, Context};
use candle_core::Device;

use crate::backbone::mobilenet_v2::{self, Options};
use crate::backbone::tflite::TfliteModel;

/// Convert a TensorFlow Lite MobileNetV2 (such as Google's quantized
/// mobilenet_v2_1.0_224_quant.tflite) into a .safetensors file that
/// `train-and-export --backbone mobilenet-v2 --weights` reads.
///
/// The u8 weights are dequantized with their scales and zero points; the BatchNorm that
/// TensorFlow folded into each conv becomes its bias; parameter names follow torchvision's
/// mobilenet_v2. The file's metadata keeps what PyTorch weights do not say: TensorFlow's SAME
/// padding and the input scaling the TFLite file declares. The ImageNet classifier is kept.
/// `--weights FILE.tflite` also works directly; converting once skips the dequantization.
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// The TFLite model.
    pub tflite: PathBuf,
    /// Where to write the safetensors file.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.out.exists() && args.out.is_dir() {
        bail!("--out {} is a folder; give a file name", args.out.display());
    }
    let model = TfliteModel::load(&args.tflite)?;
    let (tensors, meta) = mobilenet_v2::import_tflite(&model)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.tflite.display()))?;
    let tmp = args.out.with_extension("safetensors.part");
    mobilenet_v2::save_safetensors(&tensors, &meta, &tmp).map_err(anyhow::Error::msg)?;
    // Read back what was written before it takes the final name.
    let backbone = mobilenet_v2::load(
        &tmp,
        Options {
            input_size: 224,
            width: None,
        },
        &Device::Cpu,
    )
    .with_context(|| format!("reading back {}", tmp.display()))?;
    std::fs::rename(&tmp, &args.out)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    let params: usize = tensors.values().map(|t| t.elem_count()).sum();
    println!(
        "{}: {} ({} tensors, {:.2} M parameters, input (pixel - {}) / {}, TensorFlow SAME padding{})",
        args.out.display(),
        backbone.name,
        tensors.len(),
        params as f64 / 1e6,
        backbone.normalization.mean,
        backbone.normalization.std,
        backbone
            .classifier
            .as_ref()
            .map(|c| format!(", {}-class classifier", c.weight.dims()[0]))
            .unwrap_or_default()
    );
    Ok(())
}
