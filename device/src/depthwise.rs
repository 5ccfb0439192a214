//! tract's depthwise convolutions, replaced at load time by the kernel shared with the trainer
//! (`petcam_shared::depthwise`).
//!
//! Depthwise layers are a large share of EfficientNet-Lite0's time in tract. The shared kernel
//! is vectorised for the shapes of this network and, unlike tract's depthwise operator, spreads
//! its channels over the threads the model was loaded with. The replacement is made on the
//! decluttered graph, before tract's optimiser, for every float, undilated depthwise `Conv`
//! whose weights are constants. Channels-first layers (NCHW, or CHW once tract has dropped the
//! batch axis) run the shared kernel channel by channel; channels-last ones (NHWC, HWC: tract
//! keeps the first depthwise layer after the stem so) run a kernel here that vectorises across
//! channels, split by output rows.

use std::sync::Arc;

use petcam_shared::depthwise::{Activation, DepthwiseConv};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat};
use tract_onnx::tract_core::ops::nn::DataFormat;

/// How the op's input and output are laid out. Without a batch axis (`Chw`, `Hwc`) is how
/// tract's decluttering leaves one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    Nchw,
    Chw,
    Nhwc,
    Hwc,
}

impl Layout {
    fn channels_last(self) -> bool {
        matches!(self, Layout::Nhwc | Layout::Hwc)
    }
}

/// A depthwise convolution run by `petcam_shared`'s kernel, weights and bias held by the op.
#[derive(Debug, Clone)]
pub struct SharedDepthwise {
    geometry: DepthwiseConv,
    batch: usize,
    layout: Layout,
    /// `C x kh x kw` for channels-first layouts; `kh x kw x C` for channels-last, so a tap's
    /// weights for all channels are adjacent, as the pixels they multiply are; for a dense
    /// convolution `kh x kw x Cin x C`.
    weight: Arc<Vec<f32>>,
    /// A dense (not depthwise) channels-last convolution with this many input channels: the
    /// stem, whose 3 RGB inputs make tract's im2col and matrix product mostly overhead.
    dense_inputs: Option<usize>,
    /// The input is the model's u8 image, normalised here as `(x - offset) * scale` instead of
    /// by a cast and two elementwise operators before the stem.
    input_affine: Option<(f32, f32)>,
    bias: Arc<Vec<f32>>,
    threads: usize,
}

impl PartialEq for SharedDepthwise {
    fn eq(&self, other: &Self) -> bool {
        self.geometry == other.geometry
            && self.batch == other.batch
            && self.layout == other.layout
            && self.dense_inputs == other.dense_inputs
            && self.input_affine.map(|(o, s)| (o.to_bits(), s.to_bits()))
                == other.input_affine.map(|(o, s)| (o.to_bits(), s.to_bits()))
            && self.weight == other.weight
            && self.bias == other.bias
            && self.threads == other.threads
    }
}

// Weights and activation bounds are finite, so equality is reflexive.
impl Eq for SharedDepthwise {}

/// The op's input: activations, or the model's u8 image with its normalisation.
#[derive(Clone, Copy)]
enum Image<'a> {
    F32(&'a [f32]),
    U8 {
        data: &'a [u8],
        offset: f32,
        scale: f32,
    },
}

impl<'a> Image<'a> {
    fn len(&self) -> usize {
        match self {
            Image::F32(d) => d.len(),
            Image::U8 { data, .. } => data.len(),
        }
    }

    /// `len` values from `start`.
    fn slice(&self, start: usize, len: usize) -> Image<'a> {
        match *self {
            Image::F32(d) => Image::F32(&d[start..start + len]),
            Image::U8 {
                data,
                offset,
                scale,
            } => Image::U8 {
                data: &data[start..start + len],
                offset,
                scale,
            },
        }
    }

    fn floats(&self) -> TractResult<&'a [f32]> {
        match *self {
            Image::F32(d) => Ok(d),
            Image::U8 { .. } => bail!("a u8 input reached a layer that takes floats"),
        }
    }
}

/// Below this many output values per channel group, a second thread costs more than it saves.
const MIN_PER_THREAD: usize = 16 * 1024;

impl SharedDepthwise {
    fn out_shape(&self) -> TVec<usize> {
        let g = &self.geometry;
        let (c, h, w) = (g.channels, g.out_h(), g.out_w());
        match self.layout {
            Layout::Nchw => tvec!(self.batch, c, h, w),
            Layout::Chw => tvec!(c, h, w),
            Layout::Nhwc => tvec!(self.batch, h, w, c),
            Layout::Hwc => tvec!(h, w, c),
        }
    }

    fn run(&self, input: Image, output: &mut [f32]) -> TractResult<()> {
        if self.layout.channels_last() {
            return self.run_channels_last(input, output);
        }
        let input = input.floats()?;
        let g = &self.geometry;
        let (in_plane, out_plane, k_len) =
            (g.input_plane_len(), g.output_plane_len(), g.kernel_len());
        let planes = self.batch * g.channels;
        let threads = self
            .threads
            .min(pool_threads())
            .min((planes * out_plane) / MIN_PER_THREAD)
            .clamp(1, planes.max(1));
        let out_w = g.out_w();
        if threads > 1 && g.out_h() >= MIN_BAND_ROWS * threads {
            // Large planes: each thread takes a band of rows of every channel, the same part
            // of the image the matrix products before and after it give that thread, so the
            // activations stay in that core's cache instead of crossing to the other.
            let bounds: Vec<usize> = (0..=threads).map(|t| t * g.out_h() / threads).collect();
            let mut parts: Vec<(usize, Vec<&mut [f32]>)> = (0..threads)
                .map(|t| (t, Vec::with_capacity(planes)))
                .collect();
            for plane in output.chunks_exact_mut(out_plane) {
                let mut rest = plane;
                for (t, part) in parts.iter_mut().enumerate() {
                    let (band, tail) = rest.split_at_mut((bounds[t + 1] - bounds[t]) * out_w);
                    part.1.push(band);
                    rest = tail;
                }
            }
            fork(parts, |(t, bands)| {
                let (band, first_row, last_row) = row_band(g, bounds[t], bounds[t + 1]);
                let mut scratch = Vec::new();
                for (p, o) in bands.into_iter().enumerate() {
                    let c = p % g.channels;
                    let plane = &input[p * in_plane..(p + 1) * in_plane];
                    band.run_channel_with_scratch(
                        c,
                        &plane[first_row * g.in_w..last_row * g.in_w],
                        &self.weight[c * k_len..(c + 1) * k_len],
                        self.bias[c],
                        o,
                        &mut scratch,
                    );
                }
            });
            return Ok(());
        }
        // Small planes: contiguous runs of channels, one per thread.
        let per = planes.div_ceil(threads);
        fork(runs(output, out_plane, per), |(first, out)| {
            let mut scratch = Vec::new();
            for (i, o) in out.chunks_exact_mut(out_plane).enumerate() {
                let p = first + i;
                let c = p % g.channels;
                g.run_channel_with_scratch(
                    c,
                    &input[p * in_plane..(p + 1) * in_plane],
                    &self.weight[c * k_len..(c + 1) * k_len],
                    self.bias[c],
                    o,
                    &mut scratch,
                );
            }
        });
        Ok(())
    }
}

/// Output rows per thread below which a plane is split by channels instead of by rows.
const MIN_BAND_ROWS: usize = 8;

/// The geometry that computes output rows `r0..r1` of `g` alone, from input rows
/// `first..last` (returned with it): the same convolution on a horizontal band, its padding
/// adjusted so the band's edges that are inside the image read real rows.
fn row_band(g: &DepthwiseConv, r0: usize, r1: usize) -> (DepthwiseConv, usize, usize) {
    let first = (r0 * g.stride_h).saturating_sub(g.pad_top);
    let last = ((r1 - 1) * g.stride_h + g.kernel_h)
        .saturating_sub(g.pad_top)
        .min(g.in_h);
    let pad_top = g.pad_top + first - r0 * g.stride_h;
    let in_h = last - first;
    let band = DepthwiseConv {
        in_h,
        pad_top,
        // Exactly enough for r1 - r0 output rows.
        pad_bottom: (r1 - r0 - 1) * g.stride_h + g.kernel_h - in_h - pad_top,
        ..*g
    };
    debug_assert_eq!(band.out_h(), r1 - r0);
    (band, first, last)
}

/// `output` cut into runs of `per` blocks of `len` values: (index of the run's first block, run).
fn runs(output: &mut [f32], len: usize, per: usize) -> Vec<(usize, &mut [f32])> {
    output
        .chunks_mut(per * len)
        .enumerate()
        .map(|(t, out)| (t * per, out))
        .collect()
}

/// Runs `f` on every part: the first on this thread, the others on the pool tract runs the
/// plan with. The first part staying here matters: the matrix products give this thread the
/// first part of their output too, so the data it reads is already in its cache.
/// Threads of the pool this inference runs on: 1 when it runs on the calling thread alone
/// (a model loaded with `Threads::Auto` may run either way).
fn pool_threads() -> usize {
    match tract_linalg::multithread::current_tract_executor() {
        tract_linalg::multithread::Executor::MultiThread(pool) => pool.current_num_threads(),
        _ => 1,
    }
}

fn fork<T: Send>(parts: Vec<T>, f: impl Fn(T) + Sync) {
    let mut parts = parts.into_iter();
    let Some(first) = parts.next() else { return };
    match tract_linalg::multithread::current_tract_executor() {
        tract_linalg::multithread::Executor::MultiThread(pool) if parts.len() > 0 => {
            let f = &f;
            pool.scope(move |s| {
                for part in parts {
                    s.spawn(move |_| f(part));
                }
                f(first);
            });
        }
        _ => {
            f(first);
            parts.for_each(&f);
        }
    }
}

impl SharedDepthwise {
    fn dense_taps<V: Fn(usize) -> f32>(&self, value: V) -> DenseTaps<'_, V> {
        DenseTaps {
            value,
            weight: &self.weight,
            inputs: self.dense_inputs.unwrap_or(1),
            channels: self.geometry.channels,
        }
    }

    /// Channels-last: each output pixel is `bias + sum over taps of pixel * weight`, all
    /// channels at once; output rows are split over the threads.
    fn run_channels_last(&self, input: Image, output: &mut [f32]) -> TractResult<()> {
        let g = &self.geometry;
        let row_len = g.out_w() * g.channels;
        let in_channels = self.dense_inputs.unwrap_or(g.channels);
        let (in_image, out_image) = (g.in_h * g.in_w * in_channels, g.out_h() * row_len);
        let rows = self.batch * g.out_h();
        let threads = self
            .threads
            .min(pool_threads())
            .min(output.len() / MIN_PER_THREAD)
            .clamp(1, rows.max(1));
        let per = rows.div_ceil(threads);
        debug_assert_eq!(output.len(), self.batch * out_image);
        if self.dense_inputs.is_none() {
            input.floats()?;
        }
        fork(runs(output, row_len, per), |(first, out)| {
            for (i, row) in out.chunks_exact_mut(row_len).enumerate() {
                let (n, oy) = ((first + i) / g.out_h(), (first + i) % g.out_h());
                let image = input.slice(n * in_image, in_image);
                match (self.dense_inputs, image) {
                    (Some(_), Image::F32(d)) => {
                        hwc_row(g, &self.dense_taps(|i| d[i]), &self.bias, oy, row)
                    }
                    (
                        Some(_),
                        Image::U8 {
                            data,
                            offset,
                            scale,
                        },
                    ) => {
                        let value = |i: usize| (f32::from(data[i]) - offset) * scale;
                        hwc_row(g, &self.dense_taps(value), &self.bias, oy, row)
                    }
                    (None, Image::F32(image)) => {
                        let taps = DepthwiseTaps {
                            image,
                            weight: &self.weight,
                            channels: g.channels,
                        };
                        hwc_row(g, &taps, &self.bias, oy, row)
                    }
                    // Checked above.
                    (None, Image::U8 { .. }) => {}
                }
            }
        });
        Ok(())
    }
}

/// What one tap of a channels-last convolution adds to a block of output channels.
trait Taps {
    /// Adds tap `tap` (`ky * kernel_w + kx`) at input pixel `pixel` (`iy * in_w + ix`) to the
    /// accumulators of output channels `first..first + n`.
    fn add<const FMA: bool>(
        &self,
        acc: &mut [f32; BLOCK],
        first: usize,
        n: usize,
        pixel: usize,
        tap: usize,
    );

    /// [`Taps::add`] for the `4 * L` output channels from `first`, in NEON registers.
    #[cfg(target_arch = "aarch64")]
    fn add_neon<const L: usize>(
        &self,
        acc: &mut [neon::float32x4_t; L],
        first: usize,
        pixel: usize,
        tap: usize,
    );
}

/// Depthwise: output channel `c` reads input channel `c`; `weight` is `kh x kw x C`.
struct DepthwiseTaps<'a> {
    image: &'a [f32],
    weight: &'a [f32],
    channels: usize,
}

impl Taps for DepthwiseTaps<'_> {
    #[inline(always)]
    fn add<const FMA: bool>(
        &self,
        acc: &mut [f32; BLOCK],
        first: usize,
        n: usize,
        pixel: usize,
        tap: usize,
    ) {
        let c = self.channels;
        let x = &self.image[pixel * c + first..][..n];
        let w = &self.weight[tap * c + first..][..n];
        block_madd::<FMA>(acc, w, |j| x[j]);
    }

    #[cfg(target_arch = "aarch64")]
    #[inline(always)]
    fn add_neon<const L: usize>(
        &self,
        acc: &mut [neon::float32x4_t; L],
        first: usize,
        pixel: usize,
        tap: usize,
    ) {
        let c = self.channels;
        // One bounds check per block, none per register.
        let x = &self.image[pixel * c + first..][..4 * L];
        let w = &self.weight[tap * c + first..][..4 * L];
        for (l, a) in acc.iter_mut().enumerate() {
            *a = neon::madd(*a, neon::load(x, 4 * l), neon::load(w, 4 * l));
        }
    }
}

/// Dense with few inputs: every output channel sums all `inputs` channels of the tap;
/// `weight` is `kh x kw x inputs x C`, `value(i)` is input value `i`.
struct DenseTaps<'a, V> {
    value: V,
    weight: &'a [f32],
    inputs: usize,
    channels: usize,
}

impl<V: Fn(usize) -> f32> Taps for DenseTaps<'_, V> {
    #[inline(always)]
    fn add<const FMA: bool>(
        &self,
        acc: &mut [f32; BLOCK],
        first: usize,
        n: usize,
        pixel: usize,
        tap: usize,
    ) {
        for i in 0..self.inputs {
            let x = (self.value)(pixel * self.inputs + i);
            let w = &self.weight[(tap * self.inputs + i) * self.channels + first..][..n];
            block_madd::<FMA>(acc, w, |_| x);
        }
    }

    #[cfg(target_arch = "aarch64")]
    #[inline(always)]
    fn add_neon<const L: usize>(
        &self,
        acc: &mut [neon::float32x4_t; L],
        first: usize,
        pixel: usize,
        tap: usize,
    ) {
        for i in 0..self.inputs {
            let x = (self.value)(pixel * self.inputs + i);
            let w = &self.weight[(tap * self.inputs + i) * self.channels + first..][..4 * L];
            for (l, a) in acc.iter_mut().enumerate() {
                *a = neon::madd_scalar(*a, neon::load(w, 4 * l), x);
            }
        }
    }
}

/// `acc[j] += x(j) * w[j]` for the block; a full block has a fixed length, so the loop
/// unrolls into whole vector registers.
#[inline(always)]
fn block_madd<const FMA: bool>(acc: &mut [f32; BLOCK], w: &[f32], x: impl Fn(usize) -> f32) {
    if let Ok(w) = <&[f32; BLOCK]>::try_from(w) {
        for j in 0..BLOCK {
            acc[j] = madd::<FMA>(x(j), w[j], acc[j]);
        }
    } else {
        for (j, &w) in w.iter().enumerate() {
            acc[j] = madd::<FMA>(x(j), w, acc[j]);
        }
    }
}

/// `PETCAM_PORTABLE_KERNELS=1` keeps the kernels on their portable path where the CPU has a
/// hand-vectorised one (AVX2 on x86-64, NEON on aarch64): for comparing the two
/// (tools/arm-insn-count).
fn portable_only() -> bool {
    static PORTABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PORTABLE.get_or_init(|| std::env::var_os("PETCAM_PORTABLE_KERNELS").is_some_and(|v| v == "1"))
}

/// One output row of a channels-last convolution.
fn hwc_row(g: &DepthwiseConv, taps: &impl Taps, bias: &[f32], oy: usize, row: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if !portable_only()
        && std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
    {
        // SAFETY: the CPU has AVX2 and FMA, checked just above.
        return unsafe { hwc_row_avx2(g, taps, bias, oy, row) };
    }
    #[cfg(target_arch = "aarch64")]
    if !portable_only() {
        return neon::hwc_row(g, taps, bias, oy, row);
    }
    hwc_row_generic::<{ cfg!(target_arch = "aarch64") }>(g, taps, bias, oy, row)
}

/// Calls `f(pixel, tap)` for every tap of output pixel `(oy, ox)` that lands inside the input
/// (padding adds nothing).
#[inline(always)]
fn for_each_tap(g: &DepthwiseConv, oy: usize, ox: usize, mut f: impl FnMut(usize, usize)) {
    for ky in 0..g.kernel_h {
        let Some(iy) = (oy * g.stride_h + ky)
            .checked_sub(g.pad_top)
            .filter(|&y| y < g.in_h)
        else {
            continue;
        };
        for kx in 0..g.kernel_w {
            let Some(ix) = (ox * g.stride_w + kx)
                .checked_sub(g.pad_left)
                .filter(|&x| x < g.in_w)
            else {
                continue;
            };
            f(iy * g.in_w + ix, ky * g.kernel_w + kx);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn hwc_row_avx2(
    g: &DepthwiseConv,
    taps: &impl Taps,
    bias: &[f32],
    oy: usize,
    row: &mut [f32],
) {
    hwc_row_generic::<true>(g, taps, bias, oy, row)
}

/// `FMA`: multiply-add in one rounding, for targets where that is one instruction (it is a
/// slow library call elsewhere).
#[inline(always)]
fn hwc_row_generic<const FMA: bool>(
    g: &DepthwiseConv,
    taps: &impl Taps,
    bias: &[f32],
    oy: usize,
    row: &mut [f32],
) {
    let c = g.channels;
    for (ox, out) in row.chunks_exact_mut(c).enumerate() {
        // Blocks of 32 channels: the accumulators stay in registers across all the taps.
        let mut first = 0;
        while first < c {
            let n = (c - first).min(BLOCK);
            hwc_block::<FMA>(g, taps, bias, (oy, ox), first, n, out);
            first += n;
        }
    }
}

/// Output channels `first..first + n` (at most [`BLOCK`]) of output pixel `(oy, ox)`, whose
/// channels are `out`.
#[inline(always)]
fn hwc_block<const FMA: bool>(
    g: &DepthwiseConv,
    taps: &impl Taps,
    bias: &[f32],
    (oy, ox): (usize, usize),
    first: usize,
    n: usize,
    out: &mut [f32],
) {
    let (lo, hi) = g.activation.bounds();
    let mut acc = [0f32; BLOCK];
    acc[..n].copy_from_slice(&bias[first..first + n]);
    for_each_tap(g, oy, ox, |pixel, tap| {
        taps.add::<FMA>(&mut acc, first, n, pixel, tap)
    });
    for (o, &v) in out[first..first + n].iter_mut().zip(&acc[..n]) {
        // Comparisons, not `f32::clamp`: no panic on odd bounds, NaN passes through.
        let v = if v < lo { lo } else { v };
        *o = if v > hi { hi } else { v };
    }
}

/// The channels-last kernel in NEON intrinsics. The portable code compiles to NEON too, but
/// keeps its accumulator array in memory (a store per multiply-add) and its partial blocks
/// (144 or 240 channels are not whole blocks of 32) scalar; here accumulators stay in
/// registers, and partial blocks run 4 channels at a time.
#[cfg(target_arch = "aarch64")]
mod neon {
    pub use std::arch::aarch64::float32x4_t;
    use std::arch::aarch64::{
        vdupq_n_f32, vfmaq_f32, vfmaq_n_f32, vld1q_f32, vmaxq_f32, vminq_f32, vst1q_f32,
    };

    use super::{for_each_tap, hwc_block, DepthwiseConv, Taps};

    /// 4 values of `v` from `at`.
    #[inline(always)]
    pub fn load(v: &[f32], at: usize) -> float32x4_t {
        let v = &v[at..at + 4];
        // SAFETY: `v` holds the 4 values read; NEON is part of the aarch64 baseline.
        unsafe { vld1q_f32(v.as_ptr()) }
    }

    /// `acc + x * w`, lane by lane, in one rounding.
    #[inline(always)]
    pub fn madd(acc: float32x4_t, x: float32x4_t, w: float32x4_t) -> float32x4_t {
        // SAFETY: NEON is part of the aarch64 baseline.
        unsafe { vfmaq_f32(acc, x, w) }
    }

    /// `acc + w * x` for one `x`, in one rounding.
    #[inline(always)]
    pub fn madd_scalar(acc: float32x4_t, w: float32x4_t, x: f32) -> float32x4_t {
        // SAFETY: NEON is part of the aarch64 baseline.
        unsafe { vfmaq_n_f32(acc, w, x) }
    }

    pub fn hwc_row(g: &DepthwiseConv, taps: &impl Taps, bias: &[f32], oy: usize, row: &mut [f32]) {
        let c = g.channels;
        for (ox, out) in row.chunks_exact_mut(c).enumerate() {
            let mut first = 0;
            while first + 32 <= c {
                block::<8>(g, taps, bias, (oy, ox), first, out);
                first += 32;
            }
            while first + 4 <= c {
                block::<1>(g, taps, bias, (oy, ox), first, out);
                first += 4;
            }
            if first < c {
                hwc_block::<true>(g, taps, bias, (oy, ox), first, c - first, out);
            }
        }
    }

    /// Output channels `first..first + 4 * L` of output pixel `(oy, ox)`.
    #[inline(always)]
    fn block<const L: usize>(
        g: &DepthwiseConv,
        taps: &impl Taps,
        bias: &[f32],
        (oy, ox): (usize, usize),
        first: usize,
        out: &mut [f32],
    ) {
        let mut acc: [float32x4_t; L] = std::array::from_fn(|l| load(bias, first + 4 * l));
        for_each_tap(g, oy, ox, |pixel, tap| {
            taps.add_neon::<L>(&mut acc, first, pixel, tap)
        });
        let (lo, hi) = g.activation.bounds();
        let out = &mut out[first..first + 4 * L];
        // SAFETY: NEON is part of the aarch64 baseline; `out` holds the 4 * L values written.
        unsafe {
            let (lo, hi) = (vdupq_n_f32(lo), vdupq_n_f32(hi));
            for (l, a) in acc.into_iter().enumerate() {
                // FMAX and FMIN return NaN for a NaN lane, as the portable comparisons do.
                vst1q_f32(out.as_mut_ptr().add(4 * l), vminq_f32(vmaxq_f32(a, lo), hi));
            }
        }
    }
}

/// Input channels up to which a dense channels-last convolution runs here (the RGB stem).
const MAX_DENSE_INPUTS: usize = 4;

/// Channels per register block of the channels-last kernel.
const BLOCK: usize = 32;

#[inline(always)]
fn madd<const FMA: bool>(x: f32, w: f32, acc: f32) -> f32 {
    if FMA {
        x.mul_add(w, acc)
    } else {
        acc + x * w
    }
}

impl Op for SharedDepthwise {
    fn name(&self) -> StaticName {
        match self.dense_inputs {
            Some(_) => "PetcamStemConv".into(),
            None => "PetcamDepthwise".into(),
        }
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let g = &self.geometry;
        Ok(vec![format!(
            "{}x{} stride {} on {}x{}x{}, {} thread(s)",
            g.kernel_h, g.kernel_w, g.stride_h, g.channels, g.in_h, g.in_w, self.threads
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for SharedDepthwise {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let plain = input.try_as_plain_ram()?;
        let image = match self.input_affine {
            Some((offset, scale)) => Image::U8 {
                data: plain.as_slice::<u8>()?,
                offset,
                scale,
            },
            None => Image::F32(plain.as_slice::<f32>()?),
        };
        let g = &self.geometry;
        let in_channels = self.dense_inputs.unwrap_or(g.channels);
        ensure!(image.len() == self.batch * in_channels * g.input_plane_len());
        let mut output = Tensor::zero::<f32>(&self.out_shape())?;
        self.run(image, output.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?)?;
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for SharedDepthwise {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(&*self.out_shape())))
    }

    as_op!();
}

/// The shared-kernel op for `node`, when it is a depthwise convolution the kernel covers.
fn replacement(
    model: &TypedModel,
    node: &TypedNode,
    threads: usize,
) -> TractResult<Option<SharedDepthwise>> {
    let Some(conv) = node.op_as::<Conv>() else {
        return Ok(None);
    };
    let spec = &conv.pool_spec;
    let (cin, channels) = (conv.input_channels(), conv.output_channels());
    // The stem: dense, a few input channels, channels-last.
    let dense = conv.group == 1
        && cin <= MAX_DENSE_INPUTS
        && matches!(spec.data_format, DataFormat::NHWC | DataFormat::HWC);
    if conv.q_params.is_some()
        || !(dense || (conv.group == cin && cin == channels))
        || conv.kernel_fmt != KernelFormat::OIHW
        || spec.kernel_shape.len() != 2
        || spec.dilations().iter().any(|&d| d != 1)
        || node.inputs.len() != 3
    {
        return Ok(None);
    }
    let fact = model.outlet_fact(node.inputs[0])?;
    let Some(shape) = fact.shape.as_concrete() else {
        return Ok(None);
    };
    let layout = match spec.data_format {
        DataFormat::NCHW => Layout::Nchw,
        DataFormat::CHW => Layout::Chw,
        DataFormat::NHWC => Layout::Nhwc,
        DataFormat::HWC => Layout::Hwc,
    };
    // As [N, C, H, W].
    let (batch, dims) = match (layout, shape) {
        (Layout::Nchw, &[n, c, h, w]) => (n, [c, h, w]),
        (Layout::Chw, &[c, h, w]) => (1, [c, h, w]),
        (Layout::Nhwc, &[n, h, w, c]) => (n, [c, h, w]),
        (Layout::Hwc, &[h, w, c]) => (1, [c, h, w]),
        _ => return Ok(None),
    };
    if fact.datum_type != f32::datum_type() || dims[0] != cin {
        return Ok(None);
    }
    let konst = |i: usize| model.outlet_fact(node.inputs[i]).map(|f| f.konst.clone());
    let (Some(weight), Some(bias)) = (konst(1)?, konst(2)?) else {
        return Ok(None);
    };
    let (kh, kw) = (spec.kernel_shape[0], spec.kernel_shape[1]);
    let per_output = if dense { cin } else { 1 };
    if weight.datum_type() != f32::datum_type() || weight.len() != channels * per_output * kh * kw {
        return Ok(None);
    }
    let bias: Vec<f32> = match bias.len() {
        0 => vec![0.0; channels],
        1 => vec![bias.cast_to_scalar::<f32>()?; channels],
        n if n == channels => bias
            .cast_to::<f32>()?
            .try_as_plain_ram()?
            .as_slice::<f32>()?
            .to_vec(),
        _ => return Ok(None),
    };
    let (h, w) = (dims[1], dims[2]);
    let padding = spec.computed_padding(&[h, w]);
    let strides = spec.strides();
    let geometry = DepthwiseConv {
        channels,
        in_h: h,
        in_w: w,
        kernel_h: kh,
        kernel_w: kw,
        stride_h: strides[0],
        stride_w: strides[1],
        pad_top: padding[0].pad_before,
        pad_left: padding[1].pad_before,
        pad_bottom: padding[0].pad_after,
        pad_right: padding[1].pad_after,
        activation: Activation::None,
    };
    if geometry.out_h() != padding[0].convoluted || geometry.out_w() != padding[1].convoluted {
        return Ok(None);
    }
    let weight = weight.try_as_plain_ram()?.as_slice::<f32>()?;
    let taps = kh * kw;
    let weight = if dense {
        // C x Cin x kh x kw → kh x kw x Cin x C.
        (0..taps * cin * channels)
            .map(|i| {
                let (tap, ci, co) = (i / (cin * channels), i / channels % cin, i % channels);
                weight[(co * cin + ci) * taps + tap]
            })
            .collect()
    } else if layout.channels_last() {
        // C x kh x kw → kh x kw x C.
        (0..taps * channels)
            .map(|i| weight[(i % channels) * taps + i / channels])
            .collect()
    } else {
        weight.to_vec()
    };
    Ok(Some(SharedDepthwise {
        geometry,
        batch,
        layout,
        dense_inputs: dense.then_some(cin),
        input_affine: None,
        weight: Arc::new(weight),
        bias: Arc::new(bias),
        threads: threads.max(1),
    }))
}

/// The constant scalar of a `Max` or `Min` node whose other input comes from `from`.
fn scalar_operand(
    model: &TypedModel,
    node: &TypedNode,
    from: usize,
) -> Option<(&'static str, f32)> {
    let op = node.op_as::<TypedBinOp>()?;
    let name = op.0.name();
    if !matches!(name, "Max" | "Min") || node.inputs.len() != 2 {
        return None;
    }
    let other = node.inputs.iter().find(|i| i.node != from)?;
    if node.inputs.iter().filter(|i| i.node == from).count() != 1 {
        return None;
    }
    let k = model.outlet_fact(*other).ok()?.konst.clone()?;
    if k.len() != 1 {
        return None;
    }
    Some((name, k.cast_to_scalar::<f32>().ok()?))
}

/// The clamp (ReLU6 is `Max(x, 0)` then `Min(x, 6)` once decluttered) that follows node `id`
/// and nothing else reads in between: its bounds and the node whose output it ends at.
fn clamp_after(model: &TypedModel, id: usize) -> TractResult<Option<(f32, f32, usize)>> {
    let is_output = |n: usize| model.outputs.contains(&OutletId::new(n, 0));
    let Some(first) = model.single_succ(id)? else {
        return Ok(None);
    };
    let Some(second) = model.single_succ(first.id)? else {
        return Ok(None);
    };
    if is_output(id) || is_output(first.id) {
        return Ok(None);
    }
    let (Some(a), Some(b)) = (
        scalar_operand(model, first, id),
        scalar_operand(model, second, first.id),
    ) else {
        return Ok(None);
    };
    let (lo, hi) = match (a, b) {
        (("Max", lo), ("Min", hi)) | (("Min", hi), ("Max", lo)) => (lo, hi),
        _ => return Ok(None),
    };
    // With lo > hi the two orders differ; leave such a graph to tract.
    Ok((lo <= hi).then_some((lo, hi, second.id)))
}

/// The constant scalar of binary op `node` (`Sub` or `Mul`, named by `name`) whose other
/// input is `from`, the first input for `Sub`.
fn scalar_of(model: &TypedModel, node: &TypedNode, name: &str) -> Option<(OutletId, f32)> {
    let op = node.op_as::<TypedBinOp>()?;
    if op.0.name() != name || node.inputs.len() != 2 {
        return None;
    }
    let konst = |i: usize| {
        let k = model.outlet_fact(node.inputs[i]).ok()?.konst.clone()?;
        (k.len() == 1)
            .then(|| k.cast_to_scalar::<f32>().ok())
            .flatten()
    };
    match (name, konst(0), konst(1)) {
        (_, None, Some(c)) => Some((node.inputs[0], c)),
        ("Mul", Some(c), None) => Some((node.inputs[1], c)),
        _ => None,
    }
}

/// `(x - offset) * scale` of a u8 image cast to floats, when that is what `input` is and
/// nothing else reads the steps in between: the image's outlet, `offset` and `scale`.
fn normalised_image(
    model: &TypedModel,
    input: OutletId,
) -> TractResult<Option<(OutletId, f32, f32)>> {
    let only_one_reader = |n: usize| -> TractResult<bool> {
        Ok(model.single_succ(n)?.is_some() && !model.outputs.iter().any(|o| o.node == n))
    };
    let mul = &model.nodes[input.node];
    let Some((sub_out, scale)) = scalar_of(model, mul, "Mul") else {
        return Ok(None);
    };
    let sub = &model.nodes[sub_out.node];
    let Some((cast_out, offset)) = scalar_of(model, sub, "Sub") else {
        return Ok(None);
    };
    let cast = &model.nodes[cast_out.node];
    let is_cast = cast
        .op_as::<tract_onnx::tract_core::ops::cast::Cast>()
        .is_some_and(|c| c.to == f32::datum_type());
    if !is_cast || cast.inputs.len() != 1 {
        return Ok(None);
    }
    let image = cast.inputs[0];
    if model.outlet_fact(image)?.datum_type != u8::datum_type() {
        return Ok(None);
    }
    for n in [mul.id, sub.id, cast.id] {
        if !only_one_reader(n)? {
            return Ok(None);
        }
    }
    Ok(Some((image, offset, scale)))
}

/// What [`replace_depthwise`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Replaced {
    pub depthwise: usize,
    /// Dense convolutions with few input channels (the stem).
    pub dense: usize,
    /// Input normalisations (u8 cast, subtraction, multiplication) folded into the stem.
    pub normalisations: usize,
    /// Clamps (ReLU6) fused into a replaced depthwise convolution.
    pub clamps: usize,
}

/// Replaces every depthwise convolution of a decluttered `model` that the shared kernel covers,
/// with the clamp that follows it (ReLU6) fused into the kernel's output.
pub fn replace_depthwise(model: &mut TypedModel, threads: usize) -> TractResult<Replaced> {
    let mut done = Replaced::default();
    for id in model.eval_order()? {
        let node = &model.nodes[id];
        let Some(mut op) = replacement(model, node, threads)? else {
            continue;
        };
        let mut output = OutletId::new(id, 0);
        if let Some((min, max, last)) = clamp_after(model, id)? {
            op.geometry.activation = Activation::Clamp { min, max };
            output = OutletId::new(last, 0);
            done.clamps += 1;
        }
        let mut input = node.inputs[0];
        if op.dense_inputs.is_some() {
            if let Some((image, offset, scale)) = normalised_image(model, input)? {
                op.input_affine = Some((offset, scale));
                input = image;
                done.normalisations += 1;
            }
        }
        let mut patch = TypedModelPatch::default();
        let x = patch.tap_model(model, input)?;
        let dense = op.dense_inputs.is_some();
        let y = patch.wire_node(&node.name, op, &[x])?[0];
        patch.shunt_outside(model, output, y)?;
        patch.apply(model)?;
        if dense {
            done.dense += 1;
        } else {
            done.depthwise += 1;
        }
    }
    if done.depthwise + done.dense > 0 {
        *model = std::mem::take(model).into_compact()?;
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::tract_core::ops::cnn::{PaddingSpec, PoolSpec};

    /// A one-layer model: a depthwise convolution with random weights and bias.
    fn depthwise_model(
        c: usize,
        hw: (usize, usize),
        (k, stride): (usize, usize),
        padding: PaddingSpec,
        seed: u64,
        relu6: bool,
        channels_last: bool,
    ) -> TypedModel {
        let format = if channels_last {
            DataFormat::NHWC
        } else {
            DataFormat::NCHW
        };
        let conv = conv_op(format, (c, c), c, (k, stride), padding);
        let shape = input_shape(c, hw, channels_last);
        conv_model(
            |m| m.add_source("x", f32::fact(shape)).unwrap(),
            conv,
            seed,
            relu6,
        )
    }

    fn conv_op(
        data_format: DataFormat,
        (input_channels, output_channels): (usize, usize),
        group: usize,
        (k, stride): (usize, usize),
        padding: PaddingSpec,
    ) -> Conv {
        Conv {
            pool_spec: PoolSpec {
                data_format,
                kernel_shape: tvec!(k, k),
                padding,
                dilations: None,
                strides: Some(tvec!(stride, stride)),
                input_channels,
                output_channels,
            },
            kernel_fmt: KernelFormat::OIHW,
            group,
            q_params: None,
        }
    }

    /// `conv` on the input `input` wires, random weights and bias, then ReLU6 if asked.
    fn conv_model(
        input: impl FnOnce(&mut TypedModel) -> OutletId,
        conv: Conv,
        seed: u64,
        relu6: bool,
    ) -> TypedModel {
        let mut rng = seed;
        let mut random = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    rng = rng
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((rng >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
                })
                .collect()
        };
        let (cout, per_group) = (conv.output_channels(), conv.input_channels() / conv.group);
        let k = conv.pool_spec.kernel_shape[0];
        let mut model = TypedModel::default();
        let x = input(&mut model);
        let weights = random(cout * per_group * k * k);
        let w = model
            .add_const(
                "w",
                Tensor::from_shape(&[cout, per_group, k, k], &weights).unwrap(),
            )
            .unwrap();
        let b = model
            .add_const("b", Tensor::from_shape(&[cout], &random(cout)).unwrap())
            .unwrap();
        let mut y = model.wire_node("conv", conv, &[x, w, b]).unwrap();
        if relu6 {
            // As tract declutters ONNX's Clip(0, 6).
            let zero = model.add_const("zero", tensor4(&[[[[0f32]]]])).unwrap();
            let six = model.add_const("six", tensor4(&[[[[6f32]]]])).unwrap();
            y = model
                .wire_node(
                    "max",
                    tract_onnx::tract_core::ops::math::max(),
                    &[y[0], zero],
                )
                .unwrap();
            y = model
                .wire_node(
                    "min",
                    tract_onnx::tract_core::ops::math::min(),
                    &[y[0], six],
                )
                .unwrap();
        }
        model.select_output_outlets(&y).unwrap();
        model
    }

    /// Runs `model` through tract alone and with the replacement on `threads` (as a plan runs
    /// with `RunOptions { executor }`): the largest difference relative to the largest output
    /// (summation orders differ), tract's output and ours.
    fn compare(
        model: TypedModel,
        x: Tensor,
        threads: usize,
        expect: Replaced,
    ) -> (f32, Vec<f32>, Vec<f32>) {
        let mut ours = model.clone().into_decluttered().unwrap();
        assert_eq!(replace_depthwise(&mut ours, threads).unwrap(), expect);
        let tract = model.into_optimized().unwrap().into_runnable().unwrap();
        let ours = ours.into_optimized().unwrap().into_runnable().unwrap();
        let want = tract.run(tvec!(x.clone().into())).unwrap().remove(0);
        let executor = if threads > 1 {
            tract_linalg::multithread::Executor::multithread(threads)
        } else {
            tract_linalg::multithread::Executor::SingleThread
        };
        let got = tract_linalg::multithread::multithread_tract_scope(executor, || {
            ours.run(tvec!(x.into())).unwrap().remove(0)
        });
        assert_eq!(want.shape(), got.shape());
        let want: Vec<f32> = want
            .to_plain_array_view::<f32>()
            .unwrap()
            .iter()
            .copied()
            .collect();
        let got: Vec<f32> = got
            .to_plain_array_view::<f32>()
            .unwrap()
            .iter()
            .copied()
            .collect();
        let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        let worst = want
            .iter()
            .zip(got.iter())
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        (worst / scale, want, got)
    }

    #[test]
    fn the_stem_convolution_matches_tracts_own() {
        // (input channels, output channels, input size, kernel and stride, padding)
        let cases = [
            (
                3,
                32,
                (224, 224),
                (3, 2),
                PaddingSpec::ExplicitOnnxPool(tvec!(1, 1), tvec!(1, 1), false),
            ),
            (3, 40, (33, 20), (3, 2), PaddingSpec::SameUpper),
            (1, 8, (17, 18), (5, 1), PaddingSpec::Valid),
            (
                4,
                70,
                (30, 31),
                (3, 1),
                PaddingSpec::ExplicitOnnxPool(tvec!(0, 2), tvec!(2, 1), false),
            ),
        ];
        for (i, (cin, cout, hw, ks, padding)) in cases.into_iter().enumerate() {
            for (threads, relu6) in [(1, false), (2, false), (1, true), (2, true)] {
                let conv = conv_op(DataFormat::NHWC, (cin, cout), 1, ks, padding.clone());
                let shape = [1, hw.0, hw.1, cin];
                let source = |m: &mut TypedModel| m.add_source("x", f32::fact(shape)).unwrap();
                let model = conv_model(source, conv, i as u64, relu6);
                let x = Tensor::from_shape(&shape, &random_input(shape.iter().product(), i as u32))
                    .unwrap();
                let expect = Replaced {
                    dense: 1,
                    clamps: usize::from(relu6),
                    ..Replaced::default()
                };
                let (worst, want, _) = compare(model, x, threads, expect);
                assert!(
                    worst <= 1e-5,
                    "case {i}, {threads} thread(s), relu6 {relu6}: {worst}"
                );
                if relu6 {
                    assert!(want.contains(&0.0) && want.contains(&6.0));
                }
            }
        }
    }

    #[test]
    fn the_image_normalisation_is_folded_into_the_stem() {
        use tract_onnx::tract_core::ops::{cast::cast, math};
        let shape = [1, 57, 64, 3];
        // The model's input as the exporter writes it: u8, cast, minus 127, times 1/128.
        let normalised = |m: &mut TypedModel| {
            let x = m.add_source("image", u8::fact(shape)).unwrap();
            let x = m.wire_node("cast", cast(f32::datum_type()), &[x]).unwrap();
            let mean = m.add_const("mean", tensor4(&[[[[127f32]]]])).unwrap();
            let x = m.wire_node("sub", math::sub(), &[x[0], mean]).unwrap();
            let scale = m
                .add_const("scale", tensor4(&[[[[1f32 / 128.0]]]]))
                .unwrap();
            m.wire_node("mul", math::mul(), &[x[0], scale]).unwrap()[0]
        };
        let pixels: Vec<u8> = (0..shape.iter().product::<usize>())
            .map(|i| (i * 7919 % 256) as u8)
            .collect();
        for threads in [1, 2] {
            let padding = PaddingSpec::ExplicitOnnxPool(tvec!(1, 1), tvec!(1, 1), false);
            let conv = conv_op(DataFormat::NHWC, (3, 32), 1, (3, 2), padding);
            let model = conv_model(normalised, conv, 7, true);
            let x = Tensor::from_shape(&shape, &pixels).unwrap();
            let expect = Replaced {
                dense: 1,
                normalisations: 1,
                clamps: 1,
                ..Replaced::default()
            };
            let (worst, _, _) = compare(model, x, threads, expect);
            assert!(worst <= 1e-5, "{threads} thread(s): {worst}");
        }
    }

    fn input_shape(c: usize, hw: (usize, usize), channels_last: bool) -> [usize; 4] {
        if channels_last {
            [1, hw.0, hw.1, c]
        } else {
            [1, c, hw.0, hw.1]
        }
    }

    fn random_input(len: usize, seed: u32) -> Vec<f32> {
        // -8..8, so the weighted sums cross both ReLU6 bounds.
        (0..len)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 2001) as f32 / 125.0 - 8.0)
            .collect()
    }

    #[test]
    fn the_shared_kernel_matches_tracts_own_depthwise_on_random_inputs() {
        let cases = [
            (32, (112, 112), 3, 1, PaddingSpec::SameUpper),
            (96, (112, 112), 3, 2, PaddingSpec::SameUpper),
            (144, (56, 56), 5, 2, PaddingSpec::SameUpper),
            (240, (28, 28), 5, 1, PaddingSpec::SameUpper),
            (7, (9, 13), 3, 1, PaddingSpec::Valid),
            // Split into row bands on 2 threads, with uneven padding at both ends.
            (
                6,
                (40, 33),
                5,
                2,
                PaddingSpec::ExplicitOnnxPool(tvec!(2, 1), tvec!(1, 2), false),
            ),
            (9, (37, 20), 3, 1, PaddingSpec::Valid),
            (
                5,
                (10, 11),
                5,
                2,
                PaddingSpec::ExplicitOnnxPool(tvec!(2, 1), tvec!(1, 2), false),
            ),
        ];
        let variants = [(1, false), (2, false), (1, true), (2, true)];
        for (i, (c, hw, k, stride, padding)) in cases.into_iter().enumerate() {
            for ((threads, relu6), channels_last) in
                variants.into_iter().flat_map(|v| [(v, false), (v, true)])
            {
                let model = depthwise_model(
                    c,
                    hw,
                    (k, stride),
                    padding.clone(),
                    i as u64,
                    relu6,
                    channels_last,
                );
                let x = Tensor::from_shape(
                    &input_shape(c, hw, channels_last),
                    &random_input(c * hw.0 * hw.1, i as u32),
                )
                .unwrap();
                let expect = Replaced {
                    depthwise: 1,
                    clamps: usize::from(relu6),
                    ..Replaced::default()
                };
                let (worst, want, got) = compare(model, x, threads, expect);
                assert!(
                    worst <= 1e-5,
                    "case {i}, {threads} thread(s), relu6 {relu6}, channels last \
                     {channels_last}: max difference {worst} of the largest output"
                );
                if relu6 {
                    // Both bounds are reached, so the fused clamp is exercised.
                    assert!(want.contains(&0.0) && want.contains(&6.0));
                    assert!(got.iter().all(|&v| (0.0..=6.0).contains(&v)));
                }
            }
        }
    }

    /// The row kernel this CPU runs (NEON on aarch64, AVX2 on x86-64 that has it) against the
    /// portable one, on channel counts that are whole blocks, partial ones and neither, for
    /// depthwise and dense taps, with and without the ReLU6 bounds.
    #[test]
    fn the_vector_row_kernels_match_the_portable_one() {
        // What the portable kernel is compiled with where `hwc_row` takes its vector path.
        #[cfg(target_arch = "x86_64")]
        let fma = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma");
        #[cfg(not(target_arch = "x86_64"))]
        let fma = cfg!(target_arch = "aarch64");
        for (case, &c) in [1usize, 3, 4, 5, 17, 32, 36, 144, 240].iter().enumerate() {
            for (stride, activation) in [
                (1, Activation::None),
                (2, Activation::Clamp { min: 0.0, max: 6.0 }),
            ] {
                let g = DepthwiseConv {
                    channels: c,
                    in_h: 5,
                    in_w: 7,
                    kernel_h: 3,
                    kernel_w: 3,
                    stride_h: stride,
                    stride_w: stride,
                    pad_top: 1,
                    pad_left: 1,
                    pad_bottom: 1,
                    pad_right: 1,
                    activation,
                };
                let seed = case as u32 * 7 + stride as u32;
                let image = random_input(g.in_h * g.in_w * c, seed);
                let weight = random_input(9 * 3 * c, seed + 1);
                let bias = random_input(c, seed + 2);
                let depthwise = DepthwiseTaps {
                    image: &image,
                    weight: &weight,
                    channels: c,
                };
                let dense = DenseTaps {
                    value: |i: usize| image[i % image.len()] / 4.0,
                    weight: &weight,
                    inputs: 3,
                    channels: c,
                };
                let row_len = g.out_w() * c;
                for oy in 0..g.out_h() {
                    let rows = |taps: &dyn Fn(&mut [f32], &mut [f32])| {
                        let (mut vector, mut portable) = (vec![0.0; row_len], vec![0.0; row_len]);
                        taps(&mut vector, &mut portable);
                        vector
                            .iter()
                            .zip(&portable)
                            .map(|(v, p)| (v - p).abs() / p.abs().max(1.0))
                            .fold(0f32, f32::max)
                    };
                    let worst_depthwise = rows(&|v, p| {
                        hwc_row(&g, &depthwise, &bias, oy, v);
                        if fma {
                            hwc_row_generic::<true>(&g, &depthwise, &bias, oy, p)
                        } else {
                            hwc_row_generic::<false>(&g, &depthwise, &bias, oy, p)
                        }
                    });
                    let worst_dense = rows(&|v, p| {
                        hwc_row(&g, &dense, &bias, oy, v);
                        if fma {
                            hwc_row_generic::<true>(&g, &dense, &bias, oy, p)
                        } else {
                            hwc_row_generic::<false>(&g, &dense, &bias, oy, p)
                        }
                    });
                    assert!(
                        worst_depthwise <= 1e-6 && worst_dense <= 1e-6,
                        "{c} channels, stride {stride}, row {oy}: relative differences \
                         {worst_depthwise} (depthwise), {worst_dense} (dense)"
                    );
                }
            }
        }
    }
}
