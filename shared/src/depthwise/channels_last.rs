//! Channels-last (HWC) convolutions for one image: a depthwise one, and a dense one with a few
//! input channels (the RGB stem). Each output pixel is `bias + sum over taps of pixel *
//! weight`, for all channels at once: blocks of 32 output channels stay in registers across
//! the taps. Callers split the output rows over threads ([`depthwise_row`], [`dense_row`]).
//!
//! Weights are `kh x kw x C` (depthwise) or `kh x kw x Cin x C` (dense), so a tap's weights for
//! all channels are adjacent, as the pixels they multiply are.

use super::DepthwiseConv;

/// Output row `oy` of a depthwise convolution of `image` (`in_h x in_w x channels`) with
/// `weight` (`kernel_h x kernel_w x channels`), `bias` and `g`'s activation.
pub fn depthwise_row(
    g: &DepthwiseConv,
    image: &[f32],
    weight: &[f32],
    bias: &[f32],
    oy: usize,
    row: &mut [f32],
) {
    let taps = DepthwiseTaps {
        image,
        weight,
        channels: g.channels,
    };
    hwc_row(g, &taps, bias, oy, row)
}

/// Output row `oy` of a dense convolution with `inputs` input channels (at most
/// [`MAX_DENSE_INPUTS`]): `value(i)` is value `i` of the `in_h x in_w x inputs` image, `weight`
/// is `kernel_h x kernel_w x inputs x channels`.
pub fn dense_row(
    g: &DepthwiseConv,
    value: impl Fn(usize) -> f32,
    inputs: usize,
    weight: &[f32],
    bias: &[f32],
    oy: usize,
    row: &mut [f32],
) {
    let taps = DenseTaps {
        value,
        weight,
        inputs,
        channels: g.channels,
    };
    hwc_row(g, &taps, bias, oy, row)
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
#[inline(always)]
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
pub const MAX_DENSE_INPUTS: usize = 4;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::depthwise::Activation;
    use alloc::vec;
    use alloc::vec::Vec;

    fn random_input(len: usize, seed: u32) -> Vec<f32> {
        // -8..8, so the weighted sums cross both ReLU6 bounds.
        (0..len)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 2001) as f32 / 125.0 - 8.0)
            .collect()
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
