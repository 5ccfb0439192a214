//! Depthwise 2-D convolution on plain `f32` slices, shared by the candle (host) and tract (device)
//! back-ends.
//!
//! Depthwise layers are the hot spot of the EfficientNet-Lite0 backbone: candle runs a grouped
//! convolution as one call per group, and tract reaches only about 1.3 GMAC/s on them. This kernel
//! is portable Rust written so that LLVM vectorises it for SSE2, NEON (aarch64) and NEON/VFP
//! (armv7) alike: no intrinsics, no `target-cpu` requirements.
//!
//! Layout is NCHW for one image: input `C x H x W`, weights `C x KH x KW`, optional bias `C`,
//! output `C x OH x OW`. [`DepthwiseConv::run`] does all channels; [`DepthwiseConv::run_channel`]
//! does one so callers can spread `(batch, channel)` pairs over threads.
//!
//! A plane is computed one of two ways, chosen per shape from measurements on the
//! EfficientNet-Lite0 layers:
//!
//! - **In place** (wide planes): for each output row only the kernel rows that land inside the
//!   input are visited, so vertical padding costs nothing. Interior columns (all taps inside the
//!   row) are computed in blocks of up to 64 adjacent outputs while every tap is applied; a
//!   short last block overlaps the previous one instead of falling back to scalar code. The few
//!   border columns clip their taps one by one.
//! - **Padded copy** (narrow planes, and stride 2 with 5-wide kernels): the plane is first copied
//!   into a zero-padded buffer wide enough for whole blocks, so every output row is a run of full
//!   blocks with no border code. Tall kernels compute two output rows per pass, sharing each
//!   input load; stride-2 rows are stored as their even columns then their odd columns, so
//!   every tap reads adjacent values instead of gathering every other one.
//!
//! Bias and activation are applied as each block is stored. Common kernel/stride pairs get their
//! own monomorphised copy so the tap loops unroll; other shapes take a generic path.

use alloc::vec::Vec;
use core::fmt;

// Channels-last layouts need runtime CPU detection (and `f32::mul_add`): std only.
#[cfg(feature = "std")]
pub mod channels_last;

/// Activation fused into the convolution's output.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    /// Output is the convolution plus bias.
    None,
    /// Output is clamped to `[min, max]`; ReLU6 is `Clamp { min: 0.0, max: 6.0 }`.
    Clamp { min: f32, max: f32 },
}

impl Activation {
    /// `min(max(x, 0), 6)`, the activation of MobileNet and EfficientNet-Lite.
    pub const RELU6: Activation = Activation::Clamp { min: 0.0, max: 6.0 };

    /// The activation as a `[lo, hi]` clamp; `None` is the infinite range, which the comparisons
    /// in [`clamp`] leave every value (NaN included) unchanged by. Kernels clamp every output
    /// unconditionally instead of branching on the activation per value.
    pub fn bounds(self) -> (f32, f32) {
        match self {
            Activation::None => (f32::NEG_INFINITY, f32::INFINITY),
            Activation::Clamp { min, max } => (min, max),
        }
    }
}

/// Written as comparisons rather than `f32::clamp` so it cannot panic and compiles to vector
/// min/max; NaN passes through unchanged.
#[inline(always)]
fn clamp(x: f32, (lo, hi): (f32, f32)) -> f32 {
    let x = if x < lo { lo } else { x };
    if x > hi {
        hi
    } else {
        x
    }
}

/// Which slice passed to the kernel an error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Buffer {
    Input,
    Weight,
    Bias,
    Output,
}

impl fmt::Display for Buffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Buffer::Input => "input",
            Buffer::Weight => "weight",
            Buffer::Bias => "bias",
            Buffer::Output => "output",
        })
    }
}

/// Why a depthwise convolution was refused.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum DepthwiseError {
    /// A size or stride that must be at least 1 is 0.
    Zero { field: &'static str },
    /// The kernel is larger than the padded input along one axis, so no output fits.
    KernelTooLarge {
        axis: &'static str,
        kernel: usize,
        input: usize,
        pad_before: usize,
        pad_after: usize,
    },
    /// The clamp range is empty or contains NaN.
    InvalidClamp { min: f32, max: f32 },
    /// A buffer size overflows `usize`.
    TooLarge,
    /// A slice does not have the length the shape requires.
    Length {
        buffer: Buffer,
        expected: usize,
        actual: usize,
    },
}

impl fmt::Display for DepthwiseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            DepthwiseError::Zero { field } => write!(
                f,
                "depthwise convolution has {field} = 0: channels, input size, kernel size and \
                 stride must all be at least 1"
            ),
            DepthwiseError::KernelTooLarge {
                axis,
                kernel,
                input,
                pad_before,
                pad_after,
            } => write!(
                f,
                "depthwise kernel {axis} {kernel} exceeds the padded input {axis} \
                 {input} + {pad_before} + {pad_after}: no output position fits; use a smaller \
                 kernel or more padding"
            ),
            DepthwiseError::InvalidClamp { min, max } => write!(
                f,
                "clamp activation range [{min}, {max}] is invalid: min must be <= max and \
                 neither may be NaN"
            ),
            DepthwiseError::TooLarge => {
                f.write_str("depthwise convolution buffers are too large for this target's usize")
            }
            DepthwiseError::Length {
                buffer,
                expected,
                actual,
            } => write!(
                f,
                "depthwise {buffer} buffer has {actual} elements but the shape needs {expected}"
            ),
        }
    }
}

impl core::error::Error for DepthwiseError {}

/// Shape, padding, stride and activation of one depthwise convolution layer.
///
/// Padding is explicit per side because TensorFlow's SAME padding on stride 2 puts the extra row
/// and column at the bottom and right.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DepthwiseConv {
    pub channels: usize,
    pub in_h: usize,
    pub in_w: usize,
    pub kernel_h: usize,
    pub kernel_w: usize,
    pub stride_h: usize,
    pub stride_w: usize,
    pub pad_top: usize,
    pub pad_left: usize,
    pub pad_bottom: usize,
    pub pad_right: usize,
    pub activation: Activation,
}

/// Output length along one axis; 0 when the kernel does not fit or the stride is 0.
fn out_len(input: usize, kernel: usize, stride: usize, before: usize, after: usize) -> usize {
    match input
        .checked_add(before)
        .and_then(|n| n.checked_add(after))
        .and_then(|n| n.checked_sub(kernel))
    {
        Some(span) if stride > 0 && kernel > 0 => span / stride + 1,
        _ => 0,
    }
}

impl DepthwiseConv {
    /// Output height: `(in_h + pad_top + pad_bottom - kernel_h) / stride_h + 1`, or 0 when the
    /// geometry is invalid (see [`DepthwiseConv::validate`]).
    pub fn out_h(&self) -> usize {
        out_len(
            self.in_h,
            self.kernel_h,
            self.stride_h,
            self.pad_top,
            self.pad_bottom,
        )
    }

    /// Output width, like [`DepthwiseConv::out_h`].
    pub fn out_w(&self) -> usize {
        out_len(
            self.in_w,
            self.kernel_w,
            self.stride_w,
            self.pad_left,
            self.pad_right,
        )
    }

    /// Elements in one input channel plane, `in_h * in_w` (saturating).
    pub fn input_plane_len(&self) -> usize {
        self.in_h.saturating_mul(self.in_w)
    }

    /// Elements in one channel's kernel, `kernel_h * kernel_w` (saturating).
    pub fn kernel_len(&self) -> usize {
        self.kernel_h.saturating_mul(self.kernel_w)
    }

    /// Elements in one output channel plane, `out_h * out_w` (saturating).
    pub fn output_plane_len(&self) -> usize {
        self.out_h().saturating_mul(self.out_w())
    }

    /// Checks the geometry and the lengths of the buffers for one image: input
    /// `channels * in_h * in_w`, weight `channels * kernel_h * kernel_w`, bias `channels` (pass
    /// `None` when there is no bias) and output `channels * out_h * out_w`.
    ///
    /// # Errors
    /// The first problem found, naming the field or buffer.
    pub fn validate(
        &self,
        input_len: usize,
        weight_len: usize,
        bias_len: Option<usize>,
        output_len: usize,
    ) -> Result<(), DepthwiseError> {
        self.validate_geometry()?;
        let total = |plane: usize| {
            plane
                .checked_mul(self.channels)
                .ok_or(DepthwiseError::TooLarge)
        };
        let plane = |a: usize, b: usize| a.checked_mul(b).ok_or(DepthwiseError::TooLarge);
        let checks = [
            (
                Buffer::Input,
                total(plane(self.in_h, self.in_w)?)?,
                input_len,
            ),
            (
                Buffer::Weight,
                total(plane(self.kernel_h, self.kernel_w)?)?,
                weight_len,
            ),
            (
                Buffer::Output,
                total(plane(self.out_h(), self.out_w())?)?,
                output_len,
            ),
        ];
        for (buffer, expected, actual) in checks {
            if expected != actual {
                return Err(DepthwiseError::Length {
                    buffer,
                    expected,
                    actual,
                });
            }
        }
        match bias_len {
            Some(actual) if actual != self.channels => Err(DepthwiseError::Length {
                buffer: Buffer::Bias,
                expected: self.channels,
                actual,
            }),
            _ => Ok(()),
        }
    }

    fn validate_geometry(&self) -> Result<(), DepthwiseError> {
        let fields = [
            ("channels", self.channels),
            ("in_h", self.in_h),
            ("in_w", self.in_w),
            ("kernel_h", self.kernel_h),
            ("kernel_w", self.kernel_w),
            ("stride_h", self.stride_h),
            ("stride_w", self.stride_w),
        ];
        if let Some(&(field, _)) = fields.iter().find(|(_, v)| *v == 0) {
            return Err(DepthwiseError::Zero { field });
        }
        let axes = [
            (
                "height",
                self.kernel_h,
                self.in_h,
                self.pad_top,
                self.pad_bottom,
                self.out_h(),
            ),
            (
                "width",
                self.kernel_w,
                self.in_w,
                self.pad_left,
                self.pad_right,
                self.out_w(),
            ),
        ];
        for (axis, kernel, input, pad_before, pad_after, out) in axes {
            if out == 0 {
                return Err(DepthwiseError::KernelTooLarge {
                    axis,
                    kernel,
                    input,
                    pad_before,
                    pad_after,
                });
            }
        }
        if let Activation::Clamp { min, max } = self.activation {
            if min.is_nan() || max.is_nan() || min > max {
                return Err(DepthwiseError::InvalidClamp { min, max });
            }
        }
        Ok(())
    }

    /// Convolves one image: input `C*H*W`, weight `C*KH*KW`, bias `C`, output `C*OH*OW`.
    ///
    /// # Errors
    /// Whatever [`DepthwiseConv::validate`] reports; nothing is written then.
    pub fn run(
        &self,
        input: &[f32],
        weight: &[f32],
        bias: Option<&[f32]>,
        output: &mut [f32],
    ) -> Result<(), DepthwiseError> {
        self.run_with(input, weight, bias, output, Path::Auto)
    }

    fn run_with(
        &self,
        input: &[f32],
        weight: &[f32],
        bias: Option<&[f32]>,
        output: &mut [f32],
        path: Path,
    ) -> Result<(), DepthwiseError> {
        self.validate(
            input.len(),
            weight.len(),
            bias.map(<[f32]>::len),
            output.len(),
        )?;
        let in_plane = self.input_plane_len();
        let k_len = self.kernel_len();
        let out_plane = self.output_plane_len();
        let mut scratch = Vec::new();
        for (c, ((input_plane, kernel), out_plane)) in input
            .chunks_exact(in_plane)
            .zip(weight.chunks_exact(k_len))
            .zip(output.chunks_exact_mut(out_plane))
            .enumerate()
        {
            let b = bias.map_or(0.0, |b| b[c]);
            self.channel(c, input_plane, kernel, b, out_plane, &mut scratch, path);
        }
        Ok(())
    }

    /// Convolves channel `c`: `input_plane` is its `in_h * in_w` input, `kernel` its
    /// `kernel_h * kernel_w` weights, `bias` its bias (0.0 for none), and `out_plane` receives
    /// `out_h * out_w` values.
    ///
    /// The shape must have passed [`DepthwiseConv::validate`] (once, for all channels); this
    /// function does no validation beyond what memory safety needs. `c` is only checked against
    /// `channels` in debug builds; it names the channel so call sites read like `run`.
    ///
    /// Narrow planes are copied into a zero-padded buffer first, which this function allocates;
    /// [`DepthwiseConv::run_channel_with_scratch`] reuses one instead.
    ///
    /// # Panics
    /// If a slice is shorter than the shape requires, or (in debug builds) on an invalid shape.
    pub fn run_channel(
        &self,
        c: usize,
        input_plane: &[f32],
        kernel: &[f32],
        bias: f32,
        out_plane: &mut [f32],
    ) {
        let mut scratch = Vec::new();
        self.channel(
            c,
            input_plane,
            kernel,
            bias,
            out_plane,
            &mut scratch,
            Path::Auto,
        );
    }

    /// [`DepthwiseConv::run_channel`] with a caller-owned scratch buffer, so a thread that
    /// convolves many channels (for example through rayon's `map_init`) allocates once. The
    /// buffer's contents on entry do not matter.
    ///
    /// # Panics
    /// As [`DepthwiseConv::run_channel`].
    pub fn run_channel_with_scratch(
        &self,
        c: usize,
        input_plane: &[f32],
        kernel: &[f32],
        bias: f32,
        out_plane: &mut [f32],
        scratch: &mut Vec<f32>,
    ) {
        self.channel(c, input_plane, kernel, bias, out_plane, scratch, Path::Auto);
    }

    /// Whether the zero-padded copy beats reading the input in place. Measured on the
    /// EfficientNet-Lite0 layers: it wins on narrow planes, where border columns are a large
    /// share of the work, and on stride-2 planes with 5-wide kernels, which it also splits into
    /// even and odd columns; the copy costs more than it saves on wide planes, and on 3-wide
    /// stride-2 kernels, which read each input value only a couple of times.
    fn prefers_padded(&self) -> bool {
        let out_w = self.out_w();
        match self.stride_w {
            1 => out_w <= 64,
            2 if self.kernel_w >= 5 => true,
            _ => out_w <= 32,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn channel(
        &self,
        c: usize,
        input_plane: &[f32],
        kernel: &[f32],
        bias: f32,
        out_plane: &mut [f32],
        scratch: &mut Vec<f32>,
        path: Path,
    ) {
        // The portable build targets baseline x86-64 (SSE2, 4 lanes). Where the CPU has AVX2,
        // the same code compiled for it runs twice as many lanes per instruction.
        #[cfg(all(feature = "std", target_arch = "x86_64"))]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA, as just checked.
            return unsafe {
                self.channel_avx2(c, input_plane, kernel, bias, out_plane, scratch, path)
            };
        }
        self.channel_portable(c, input_plane, kernel, bias, out_plane, scratch, path)
    }

    /// [`Self::channel_portable`] compiled with AVX2 and FMA enabled.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[cfg(all(feature = "std", target_arch = "x86_64"))]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn channel_avx2(
        &self,
        c: usize,
        input_plane: &[f32],
        kernel: &[f32],
        bias: f32,
        out_plane: &mut [f32],
        scratch: &mut Vec<f32>,
        path: Path,
    ) {
        self.channel_portable(c, input_plane, kernel, bias, out_plane, scratch, path)
    }

    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn channel_portable(
        &self,
        c: usize,
        input_plane: &[f32],
        kernel: &[f32],
        bias: f32,
        out_plane: &mut [f32],
        scratch: &mut Vec<f32>,
        path: Path,
    ) {
        debug_assert!(
            c < self.channels,
            "channel {c} out of range 0..{}",
            self.channels
        );
        debug_assert_eq!(self.validate_geometry(), Ok(()));
        let plane = Plane {
            conv: self,
            input: &input_plane[..self.in_h * self.in_w],
            kernel: &kernel[..self.kernel_h * self.kernel_w],
            bias,
            bounds: self.activation.bounds(),
        };
        let out = &mut out_plane[..self.out_h() * self.out_w()];
        let padded = match path {
            Path::Auto => self.prefers_padded(),
            Path::Direct => false,
            Path::Padded => true,
        };
        // One monomorphised copy per common (kernel width, stride) so tap loops fully unroll;
        // kernel heights vary the row loop only, which stays a runtime loop.
        macro_rules! dispatch {
            ($($kw:literal, $sw:literal;)*) => {
                match (self.kernel_w, self.stride_w, padded) {
                    $(
                        ($kw, $sw, false) => plane.direct::<$kw, $sw>(out),
                        ($kw, $sw, true) => plane.padded::<$kw, $sw>(out, scratch),
                    )*
                    (_, _, false) => plane.direct::<0, 0>(out),
                    (_, _, true) => plane.padded::<0, 0>(out, scratch),
                }
            };
        }
        dispatch! {
            3, 1; 3, 2; 5, 1; 5, 2; 7, 1; 7, 2; 1, 1;
        }
    }
}

/// Which plane algorithm to use. Only tests force one, so both are checked on every shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Auto,
    #[cfg_attr(not(test), allow(dead_code))]
    Direct,
    #[cfg_attr(not(test), allow(dead_code))]
    Padded,
}

/// Multiply-add of every tap. Fused where FMA is part of the target's baseline (aarch64, or x86
/// built with `fma`): one instruction and one rounding. Elsewhere `f32::mul_add` would be a slow
/// library call, so it stays a multiply and an add.
#[inline(always)]
fn madd(acc: f32, w: f32, x: f32) -> f32 {
    #[cfg(all(feature = "std", any(target_arch = "aarch64", target_feature = "fma")))]
    {
        w.mul_add(x, acc)
    }
    #[cfg(not(all(feature = "std", any(target_arch = "aarch64", target_feature = "fma"))))]
    {
        acc + w * x
    }
}

/// Adds one kernel row to `B` adjacent outputs; `row` starts at the first output's first tap.
///
/// With `SPLIT` the row holds its even columns and, `split` values further, its odd columns
/// (see [`Plane::padded`]); `row` then starts at the first output's even column. Every tap of a
/// stride-2 kernel reads adjacent values that way instead of gathering every other one.
#[inline(always)]
fn tap_row<const B: usize, const SPLIT: bool>(
    acc: &mut [f32; B],
    row: &[f32],
    split: usize,
    k: &[f32],
    kw: usize,
    sw: usize,
) {
    if SPLIT {
        let (even, odd) = (&row[..B + kw / 2], &row[split..split + B + kw / 2]);
        for (kx, &w) in k[..kw].iter().enumerate() {
            let cols = if kx % 2 == 0 { even } else { odd };
            for (a, &x) in acc.iter_mut().zip(&cols[kx / 2..kx / 2 + B]) {
                *a = madd(*a, w, x);
            }
        }
    } else {
        let row = &row[..(B - 1) * sw + kw];
        for (kx, &w) in k[..kw].iter().enumerate() {
            for (i, a) in acc.iter_mut().enumerate() {
                *a = madd(*a, w, row[i * sw + kx]);
            }
        }
    }
}

/// Like [`tap_row`] for two output rows that read the same input row through different kernel
/// rows: each input value is loaded once for both, and the two accumulator sets are independent
/// chains, which keeps the adders busy.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn tap_row2<const B: usize, const SPLIT: bool>(
    a: &mut [f32; B],
    b: &mut [f32; B],
    row: &[f32],
    split: usize,
    ka: &[f32],
    kb: &[f32],
    kw: usize,
    sw: usize,
) {
    let (ka, kb) = (&ka[..kw], &kb[..kw]);
    if SPLIT {
        let (even, odd) = (&row[..B + kw / 2], &row[split..split + B + kw / 2]);
        for kx in 0..kw {
            let (wa, wb) = (ka[kx], kb[kx]);
            let cols = if kx % 2 == 0 { even } else { odd };
            let cols = &cols[kx / 2..kx / 2 + B];
            for i in 0..B {
                a[i] = madd(a[i], wa, cols[i]);
                b[i] = madd(b[i], wb, cols[i]);
            }
        }
    } else {
        let row = &row[..(B - 1) * sw + kw];
        for kx in 0..kw {
            let (wa, wb) = (ka[kx], kb[kx]);
            for i in 0..B {
                let x = row[i * sw + kx];
                a[i] = madd(a[i], wa, x);
                b[i] = madd(b[i], wb, x);
            }
        }
    }
}

/// Input rows as the row kernels see them: row `r` starts at `data[r * stride]`; with split
/// rows, its odd columns start `split` values after its even ones.
#[derive(Clone, Copy)]
struct Src<'a> {
    data: &'a [f32],
    stride: usize,
    split: usize,
}

impl<'a> Src<'a> {
    #[inline(always)]
    fn row(&self, r: usize, x: usize) -> &'a [f32] {
        &self.data[r * self.stride + x..]
    }
}

/// `B` outputs of one row: input rows `row0..`, kernel rows `kernel` (`kw` weights each), first
/// tap at column `x` (for split rows: at even column `x`).
#[inline(always)]
fn block1<const B: usize, const SPLIT: bool>(
    src: Src<'_>,
    row0: usize,
    kernel: &[f32],
    kw: usize,
    sw: usize,
    x: usize,
) -> [f32; B] {
    let mut acc = [0.0; B];
    for (r, k) in kernel.chunks_exact(kw).enumerate() {
        tap_row::<B, SPLIT>(&mut acc, src.row(row0 + r, x), src.split, k, kw, sw);
    }
    acc
}

/// `B` outputs of two rows `sh` input rows apart, both with all `kh` kernel rows inside `src`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn block2<const B: usize, const SPLIT: bool>(
    src: Src<'_>,
    row0: usize,
    kernel: &[f32],
    kh: usize,
    kw: usize,
    sh: usize,
    sw: usize,
    x: usize,
) -> ([f32; B], [f32; B]) {
    let (mut a, mut b) = ([0.0; B], [0.0; B]);
    let k = |ky: usize| &kernel[ky * kw..(ky + 1) * kw];
    let split = src.split;
    // Input rows used by the first output row only, by both, then by the second only.
    for u in 0..sh.min(kh) {
        tap_row::<B, SPLIT>(&mut a, src.row(row0 + u, x), split, k(u), kw, sw);
    }
    for u in sh..kh {
        let row = src.row(row0 + u, x);
        tap_row2::<B, SPLIT>(&mut a, &mut b, row, split, k(u), k(u - sh), kw, sw);
    }
    for u in kh.max(sh)..sh + kh {
        tap_row::<B, SPLIT>(&mut b, src.row(row0 + u, x), split, k(u - sh), kw, sw);
    }
    (a, b)
}

/// One channel's data, with the geometry.
struct Plane<'a> {
    conv: &'a DepthwiseConv,
    input: &'a [f32],
    kernel: &'a [f32],
    bias: f32,
    /// The activation as a clamp range.
    bounds: (f32, f32),
}

impl Plane<'_> {
    /// Writes `acc + bias` through the activation into `dst` (up to `B` values).
    #[inline(always)]
    fn store<const B: usize>(&self, dst: &mut [f32], acc: &[f32; B]) {
        if let Ok(dst) = <&mut [f32; B]>::try_from(&mut *dst) {
            // Full block: fixed length, so this is a few vector instructions.
            for (d, &a) in dst.iter_mut().zip(acc) {
                *d = clamp(a + self.bias, self.bounds);
            }
        } else {
            for (d, &a) in dst.iter_mut().zip(acc) {
                *d = clamp(a + self.bias, self.bounds);
            }
        }
    }

    /// `(kw, sw)` from the const parameters, or from the shape when they are 0.
    #[inline(always)]
    fn kw_sw<const KW: usize, const SW: usize>(&self) -> (usize, usize) {
        if KW == 0 {
            (self.conv.kernel_w, self.conv.stride_w)
        } else {
            (KW, SW)
        }
    }

    /// Wide planes, read in place: kernel rows outside the input are skipped, interior columns
    /// go through vector blocks, and the few border columns clip their taps one by one.
    ///
    /// One output row at a time: blocks this wide already keep enough additions in flight, and
    /// pairing rows here (as the padded path does) measured 10-30% slower on the 112x112 and
    /// 56x56 layers, the second row's accumulators spilling out of registers.
    #[inline(always)]
    fn direct<const KW: usize, const SW: usize>(&self, out: &mut [f32]) {
        let conv = self.conv;
        let (kw, sw) = self.kw_sw::<KW, SW>();
        let (in_h, in_w, kh, sh) = (conv.in_h, conv.in_w, conv.kernel_h, conv.stride_h);
        let (pt, pl) = (conv.pad_top, conv.pad_left);
        let (out_h, out_w) = (conv.out_h(), conv.out_w());
        let src = Src {
            data: self.input,
            stride: in_w,
            split: 0,
        };

        // Interior columns: `ox * sw >= pl` and `ox * sw - pl + kw <= in_w`.
        let ox_lo = pl.div_ceil(sw).min(out_w);
        let ox_hi = if in_w + pl >= kw {
            ((in_w + pl - kw) / sw + 1).min(out_w)
        } else {
            0
        }
        .max(ox_lo);

        for (oy, out_row) in out.chunks_exact_mut(out_w).enumerate().take(out_h) {
            let top = oy * sh;
            // Kernel rows that land inside the input: iy = top - pt + ky in 0..in_h.
            let ky_lo = pt.saturating_sub(top).min(kh);
            let ky_hi = (in_h + pt).saturating_sub(top).min(kh).max(ky_lo);
            if ky_lo == ky_hi {
                // Only reachable with padding of a kernel height or more: all taps are zeros.
                out_row.fill(clamp(self.bias, self.bounds));
                continue;
            }
            let rows = Rows {
                row0: top + ky_lo - pt,
                kernel: &self.kernel[ky_lo * kw..ky_hi * kw],
            };
            self.borders(kw, sw, rows, out_row, ox_lo, ox_hi);
            if ox_hi > ox_lo {
                let interior = &mut out_row[ox_lo..ox_hi];
                let x0 = ox_lo * sw - pl;
                match interior.len() {
                    64.. => self.interior::<64>(src, rows, kw, sw, x0, interior),
                    32.. => self.interior::<32>(src, rows, kw, sw, x0, interior),
                    16.. => self.interior::<16>(src, rows, kw, sw, x0, interior),
                    8.. => self.interior::<8>(src, rows, kw, sw, x0, interior),
                    4.. => self.interior::<4>(src, rows, kw, sw, x0, interior),
                    _ => self.interior::<1>(src, rows, kw, sw, x0, interior),
                }
            }
        }
    }

    /// Interior outputs of one row, `B` at a time. `out.len() >= B`; the last block is moved
    /// back to end at `out.len()`, recomputing a few outputs rather than running a scalar tail.
    #[inline(always)]
    fn interior<const B: usize>(
        &self,
        src: Src<'_>,
        rows: Rows<'_>,
        kw: usize,
        sw: usize,
        x0: usize,
        out: &mut [f32],
    ) {
        let n = out.len();
        let mut next = 0;
        while next < n {
            let start = next.min(n - B);
            let acc = block1::<B, false>(src, rows.row0, rows.kernel, kw, sw, x0 + start * sw);
            self.store(&mut out[start..start + B], &acc);
            next = start + B;
        }
    }

    /// The columns before `ox_lo` and from `ox_hi` on, whose kernels stick out of the input.
    #[inline(always)]
    fn borders(
        &self,
        kw: usize,
        sw: usize,
        rows: Rows<'_>,
        out_row: &mut [f32],
        ox_lo: usize,
        ox_hi: usize,
    ) {
        let (left, rest) = out_row.split_at_mut(ox_lo);
        for (ox, o) in left.iter_mut().enumerate() {
            *o = self.border_pixel(kw, sw, rows, ox);
        }
        for (ox, o) in rest[ox_hi - ox_lo..].iter_mut().enumerate() {
            *o = self.border_pixel(kw, sw, rows, ox_hi + ox);
        }
    }

    /// An output whose kernel sticks out left or right of the input: clips the kernel columns.
    #[inline(always)]
    fn border_pixel(&self, kw: usize, sw: usize, rows: Rows<'_>, ox: usize) -> f32 {
        let conv = self.conv;
        let left = ox * sw;
        let kx_lo = conv.pad_left.saturating_sub(left).min(kw);
        let kx_hi = (conv.in_w + conv.pad_left)
            .saturating_sub(left)
            .min(kw)
            .max(kx_lo);
        let mut acc = 0.0;
        if kx_hi > kx_lo {
            let ix_lo = left + kx_lo - conv.pad_left;
            for (r, k) in rows.kernel.chunks_exact(kw).enumerate() {
                let src = &self.input[(rows.row0 + r) * conv.in_w + ix_lo..][..kx_hi - kx_lo];
                for (&x, &w) in src.iter().zip(&k[kx_lo..kx_hi]) {
                    acc = madd(acc, w, x);
                }
            }
        }
        clamp(acc + self.bias, self.bounds)
    }

    /// Narrow planes, and stride 2 with kernels 5 or wider: copies the input into a zero-padded
    /// buffer wide enough for whole vector blocks, so every output row is a run of full blocks
    /// with no border or tail code. For those stride-2 kernels each padded row is stored as its
    /// even columns followed by its odd columns, which turns every tap into a contiguous read.
    #[inline(always)]
    fn padded<const KW: usize, const SW: usize>(&self, out: &mut [f32], scratch: &mut Vec<f32>) {
        // Two output rows share kernel-height-minus-stride input rows; measured worthwhile only
        // when that is most of the kernel.
        let pairs = self.conv.stride_h == 1 && self.conv.kernel_h >= 5;
        let out_w = self.conv.out_w();
        match (out_w, pairs) {
            (0..=8, true) => self.padded_blocks::<KW, SW, 8, true>(out, scratch),
            (0..=8, false) => self.padded_blocks::<KW, SW, 8, false>(out, scratch),
            (_, true) => self.padded_blocks::<KW, SW, 16, true>(out, scratch),
            (0..=32, false) => self.padded_blocks::<KW, SW, 16, false>(out, scratch),
            (_, false) => self.padded_blocks::<KW, SW, 32, false>(out, scratch),
        }
    }

    #[inline(always)]
    fn padded_blocks<const KW: usize, const SW: usize, const B: usize, const PAIRS: bool>(
        &self,
        out: &mut [f32],
        scratch: &mut Vec<f32>,
    ) {
        let conv = self.conv;
        let (kw, sw) = self.kw_sw::<KW, SW>();
        let (kh, sh, pl) = (conv.kernel_h, conv.stride_h, conv.pad_left);
        let out_w = conv.out_w();
        let blocks = out_w.div_ceil(B);
        let (pt, in_w) = (conv.pad_top, conv.in_w);
        let height = pt + conv.in_h + conv.pad_bottom;
        let padded_w = pl + in_w + conv.pad_right;
        // Stride 2 with a wide kernel reads each input value often enough to pay for splitting
        // rows into even and odd columns; with 3 taps the split costs more than the gathers.
        let split = SW == 2 && KW >= 5;
        let (width, half) = if split {
            // Each half must hold every block plus the kernel's reach beyond it.
            let half = padded_w.div_ceil(2).max(blocks * B + kw / 2);
            (2 * half, half)
        } else {
            (padded_w.max((blocks * B - 1) * sw + kw), 0)
        };
        // One memset of the whole plane is cheaper than zeroing just the padding row by row:
        // rows here are short, and per-row fills are calls.
        scratch.clear();
        scratch.resize(width * height, 0.0);
        let plane = &mut scratch[..];
        for (dst, src) in plane[pt * width..]
            .chunks_exact_mut(width)
            .zip(self.input.chunks_exact(in_w))
        {
            if split {
                // Padded column `pl + i` holds `src[i]`: even `i` go to one half and odd `i` to
                // the other, which ones depending on the parity of `pl`.
                let (even, odd) = dst.split_at_mut(half);
                if pl % 2 == 0 {
                    deinterleave(src, &mut even[pl / 2..], &mut odd[pl / 2..]);
                } else {
                    deinterleave(src, &mut odd[pl / 2..], &mut even[pl / 2 + 1..]);
                }
            } else {
                dst[pl..pl + in_w].copy_from_slice(src);
            }
        }
        let src = Src {
            data: plane,
            stride: width,
            split: half,
        };
        if split {
            self.padded_rows::<B, PAIRS, true>(src, out, kh, kw, sh, sw, blocks, |blk| blk * B);
        } else {
            let x = |blk: usize| blk * B * sw;
            self.padded_rows::<B, PAIRS, false>(src, out, kh, kw, sh, sw, blocks, x);
        }
    }

    /// All output rows of a padded plane; `x(block)` is where a block's first tap reads.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn padded_rows<const B: usize, const PAIRS: bool, const SPLIT: bool>(
        &self,
        src: Src<'_>,
        out: &mut [f32],
        kh: usize,
        kw: usize,
        sh: usize,
        sw: usize,
        blocks: usize,
        x: impl Fn(usize) -> usize,
    ) {
        let out_w = self.conv.out_w();
        let mut rows = out.chunks_exact_mut(out_w).enumerate();
        while let Some((oy, row_a)) = rows.next() {
            let row0 = oy * sh;
            if PAIRS {
                if let Some((_, row_b)) = rows.next() {
                    for blk in 0..blocks {
                        let (a, b) =
                            block2::<B, SPLIT>(src, row0, self.kernel, kh, kw, sh, sw, x(blk));
                        let end = (blk * B + B).min(out_w);
                        self.store(&mut row_a[blk * B..end], &a);
                        self.store(&mut row_b[blk * B..end], &b);
                    }
                    continue;
                }
            }
            for blk in 0..blocks {
                let a = block1::<B, SPLIT>(src, row0, self.kernel, kw, sw, x(blk));
                let end = (blk * B + B).min(out_w);
                self.store(&mut row_a[blk * B..end], &a);
            }
        }
    }
}

/// Splits `src` into its even-indexed values (into `first`) and odd-indexed values (into
/// `second`).
#[inline(always)]
fn deinterleave(src: &[f32], first: &mut [f32], second: &mut [f32]) {
    let n = src.len() / 2;
    // Slicing to exact lengths up front removes the bounds checks, which lets the loop
    // vectoriser turn the stride-2 loads into vector loads and shuffles.
    let (pairs, rest) = src.split_at(2 * n);
    let (first, second) = (&mut first[..n + rest.len()], &mut second[..n]);
    for j in 0..n {
        first[j] = pairs[2 * j];
        second[j] = pairs[2 * j + 1];
    }
    if let [last] = rest {
        first[n] = *last;
    }
}

/// Kernel rows of one output row that land inside the input, read from input rows starting at
/// `row0`.
#[derive(Clone, Copy)]
struct Rows<'a> {
    row0: usize,
    /// Whole kernel rows, `kernel_w` weights each.
    kernel: &'a [f32],
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use alloc::vec::Vec;
    use proptest::prelude::*;

    /// Straightforward definition: every tap, with a bounds test for the zero padding.
    fn naive(
        conv: &DepthwiseConv,
        input: &[f32],
        weight: &[f32],
        bias: Option<&[f32]>,
    ) -> Vec<f32> {
        let (oh, ow) = (conv.out_h(), conv.out_w());
        let mut out = vec![0.0; conv.channels * oh * ow];
        for c in 0..conv.channels {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut sum = 0.0f64;
                    for ky in 0..conv.kernel_h {
                        for kx in 0..conv.kernel_w {
                            let iy = (oy * conv.stride_h + ky) as isize - conv.pad_top as isize;
                            let ix = (ox * conv.stride_w + kx) as isize - conv.pad_left as isize;
                            if iy < 0
                                || ix < 0
                                || iy >= conv.in_h as isize
                                || ix >= conv.in_w as isize
                            {
                                continue;
                            }
                            let x = input[(c * conv.in_h + iy as usize) * conv.in_w + ix as usize];
                            let w = weight[(c * conv.kernel_h + ky) * conv.kernel_w + kx];
                            sum += f64::from(x) * f64::from(w);
                        }
                    }
                    let mut v = sum as f32 + bias.map_or(0.0, |b| b[c]);
                    if let Activation::Clamp { min, max } = conv.activation {
                        v = v.max(min).min(max);
                    }
                    out[(c * oh + oy) * ow + ox] = v;
                }
            }
        }
        out
    }

    fn conv(
        channels: usize,
        in_hw: (usize, usize),
        kernel: (usize, usize),
        stride: (usize, usize),
        pads: [usize; 4],
    ) -> DepthwiseConv {
        DepthwiseConv {
            channels,
            in_h: in_hw.0,
            in_w: in_hw.1,
            kernel_h: kernel.0,
            kernel_w: kernel.1,
            stride_h: stride.0,
            stride_w: stride.1,
            pad_top: pads[0],
            pad_left: pads[1],
            pad_bottom: pads[2],
            pad_right: pads[3],
            activation: Activation::None,
        }
    }

    fn assert_close(actual: &[f32], expected: &[f32]) {
        assert_eq!(actual.len(), expected.len());
        for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
            let tol = 1e-4 * e.abs().max(1.0);
            assert!((a - e).abs() <= tol, "element {i}: got {a}, expected {e}");
        }
    }

    #[test]
    fn asymmetric_padding_matches_hand_computation() {
        // TensorFlow SAME, 4x4 input, 3x3 kernel, stride 2: pad 0 top/left, 1 bottom/right.
        let c = conv(1, (4, 4), (3, 3), (2, 2), [0, 0, 1, 1]);
        assert_eq!((c.out_h(), c.out_w()), (2, 2));
        let input: Vec<f32> = (1..=16).map(|v| v as f32).collect();
        let mut out = [0.0; 4];
        c.run(&input, &[1.0; 9], None, &mut out).unwrap();
        // Top-left window rows 0..3, cols 0..3; bottom-right window is rows/cols 2..4 plus padding.
        assert_eq!(out, [54.0, 45.0, 72.0, 54.0]);
        // Symmetric padding of 1 would centre the windows differently.
        let sym = conv(1, (4, 4), (3, 3), (2, 2), [1, 1, 1, 1]);
        let mut sym_out = [0.0; 4];
        sym.run(&input, &[1.0; 9], None, &mut sym_out).unwrap();
        assert_eq!(sym_out, [14.0, 30.0, 57.0, 99.0]);
    }

    #[test]
    fn clamp_applies_after_bias() {
        let mut c = conv(2, (1, 4), (1, 1), (1, 1), [0; 4]);
        c.activation = Activation::RELU6;
        let input = [-3.0, 0.5, 2.0, 10.0, -1.0, 1.0, 2.0, 3.0];
        let weight = [2.0, -1.0];
        let bias = [1.0, 0.5];
        let mut out = [0.0; 8];
        c.run(&input, &weight, Some(&bias), &mut out).unwrap();
        assert_eq!(out, [0.0, 2.0, 5.0, 6.0, 1.5, 0.0, 0.0, 0.0]);
        c.activation = Activation::Clamp {
            min: -1.0,
            max: 1.0,
        };
        c.run(&input, &weight, Some(&bias), &mut out).unwrap();
        assert_eq!(out, [-1.0, 1.0, 1.0, 1.0, 1.0, -0.5, -1.0, -1.0]);
    }

    #[test]
    fn channel_entry_point_matches_run() {
        let c = conv(3, (20, 37), (5, 5), (2, 2), [1, 2, 3, 2]);
        let input: Vec<f32> = (0..3 * 20 * 37).map(|i| (i % 17) as f32 - 8.0).collect();
        let weight: Vec<f32> = (0..75).map(|i| (i % 7) as f32 * 0.25 - 0.5).collect();
        let bias = [0.5, -0.5, 2.0];
        let mut whole = vec![0.0; 3 * c.output_plane_len()];
        c.run(&input, &weight, Some(&bias), &mut whole).unwrap();
        assert_close(&whole, &naive(&c, &input, &weight, Some(&bias)));
        // A scratch buffer left over from a larger plane must not leak into the result.
        let mut scratch = vec![f32::NAN; 5000];
        for ch in 0..3 {
            let (input, kernel) = (&input[ch * 740..][..740], &weight[ch * 25..][..25]);
            let mut plane = vec![0.0; c.output_plane_len()];
            c.run_channel(ch, input, kernel, bias[ch], &mut plane);
            assert_eq!(plane, whole[ch * plane.len()..][..plane.len()]);
            let mut reused = vec![0.0; c.output_plane_len()];
            c.run_channel_with_scratch(ch, input, kernel, bias[ch], &mut reused, &mut scratch);
            assert_eq!(reused, plane);
        }
    }

    #[test]
    fn padding_wider_than_kernel_gives_bias() {
        let c = conv(1, (2, 2), (1, 1), (1, 1), [2, 1, 0, 0]);
        let mut out = vec![0.0; c.output_plane_len()];
        assert_eq!((c.out_h(), c.out_w()), (4, 3));
        c.run(&[1.0, 2.0, 3.0, 4.0], &[2.0], Some(&[-0.5]), &mut out)
            .unwrap();
        #[rustfmt::skip]
        let expected = [
            -0.5, -0.5, -0.5,
            -0.5, -0.5, -0.5,
            -0.5, 1.5, 3.5,
            -0.5, 5.5, 7.5,
        ];
        assert_eq!(out, expected);
    }

    #[test]
    fn validate_reports_the_problem() {
        let c = conv(2, (5, 5), (3, 3), (1, 1), [1; 4]);
        assert_eq!(c.validate(50, 18, Some(2), 50), Ok(()));
        assert_eq!(c.validate(50, 18, None, 50), Ok(()));
        assert_eq!(
            c.validate(49, 18, None, 50),
            Err(DepthwiseError::Length {
                buffer: Buffer::Input,
                expected: 50,
                actual: 49
            })
        );
        assert!(matches!(
            c.validate(50, 9, None, 50),
            Err(DepthwiseError::Length {
                buffer: Buffer::Weight,
                ..
            })
        ));
        assert!(matches!(
            c.validate(50, 18, Some(1), 50),
            Err(DepthwiseError::Length {
                buffer: Buffer::Bias,
                ..
            })
        ));
        assert!(matches!(
            c.validate(50, 18, None, 32),
            Err(DepthwiseError::Length {
                buffer: Buffer::Output,
                ..
            })
        ));
        let mut out = [7.0; 32];
        assert!(c.run(&[0.0; 50], &[0.0; 18], None, &mut out).is_err());
        assert_eq!(out, [7.0; 32], "nothing written on error");

        let big = conv(1, (2, 5), (4, 3), (1, 1), [0, 0, 1, 0]);
        assert_eq!(big.out_h(), 0);
        assert!(matches!(
            big.validate(10, 12, None, 0),
            Err(DepthwiseError::KernelTooLarge { axis: "height", .. })
        ));
        let zero = conv(1, (4, 4), (3, 3), (0, 1), [0; 4]);
        assert_eq!(
            zero.validate(16, 9, None, 0),
            Err(DepthwiseError::Zero { field: "stride_h" })
        );
        let mut bad = conv(1, (4, 4), (3, 3), (1, 1), [1; 4]);
        bad.activation = Activation::Clamp { min: 6.0, max: 0.0 };
        assert!(matches!(
            bad.validate(16, 9, None, 16),
            Err(DepthwiseError::InvalidClamp { .. })
        ));
        bad.activation = Activation::Clamp {
            min: f32::NAN,
            max: 0.0,
        };
        assert!(bad.validate(16, 9, None, 16).is_err());
    }

    fn shapes() -> impl Strategy<Value = (DepthwiseConv, bool)> {
        (
            1usize..4,
            (1usize..24, 1usize..48),
            (1usize..8, 1usize..8),
            (1usize..4, 1usize..4),
            [0usize..5, 0usize..5, 0usize..5, 0usize..5],
            0usize..3,
            any::<bool>(),
        )
            .prop_filter_map(
                "kernel must fit the padded input",
                |(channels, in_hw, kernel, stride, pads, act, with_bias)| {
                    let mut c = conv(channels, in_hw, kernel, stride, pads);
                    c.activation = match act {
                        0 => Activation::None,
                        1 => Activation::RELU6,
                        _ => Activation::Clamp {
                            min: -0.75,
                            max: 0.5,
                        },
                    };
                    (c.out_h() > 0 && c.out_w() > 0).then_some((c, with_bias))
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        #[test]
        fn matches_naive_reference((c, with_bias) in shapes(), seed in any::<u64>()) {
            // Values from a seeded generator: cheaper to shrink than a vector strategy.
            let mut s = seed | 1;
            let mut next = move || {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 * 2.0 - 1.0
            };
            let input: Vec<f32> = (0..c.channels * c.in_h * c.in_w).map(|_| next()).collect();
            let weight: Vec<f32> = (0..c.channels * c.kernel_len()).map(|_| next()).collect();
            let bias: Vec<f32> = (0..c.channels).map(|_| next()).collect();
            let bias = with_bias.then_some(bias.as_slice());
            let expected = naive(&c, &input, &weight, bias);
            for path in [Path::Auto, Path::Direct, Path::Padded] {
                let mut out = vec![f32::NAN; c.channels * c.output_plane_len()];
                c.run_with(&input, &weight, bias, &mut out, path).unwrap();
                assert_close(&out, &expected);
            }
        }
    }

    #[test]
    fn efficientnet_shapes_match_naive() {
        // Full-size planes exercise the 16-wide blocks and their overlapping last block.
        for (k, s, ch, hw) in [(3, 1, 2, 112), (3, 2, 2, 112), (5, 2, 2, 56), (5, 1, 2, 7)] {
            let p = (k - 1) / 2;
            let mut c = conv(ch, (hw, hw), (k, k), (s, s), [p; 4]);
            c.activation = Activation::RELU6;
            let n = ch * hw * hw;
            let input: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 / 250.0).collect();
            let weight: Vec<f32> = (0..ch * k * k)
                .map(|i| ((i * 31) % 11) as f32 / 11.0 - 0.4)
                .collect();
            let bias: Vec<f32> = (0..ch).map(|i| i as f32 * 0.1).collect();
            let expected = naive(&c, &input, &weight, Some(&bias));
            for path in [Path::Direct, Path::Padded] {
                let mut out = vec![f32::NAN; ch * c.output_plane_len()];
                c.run_with(&input, &weight, Some(&bias), &mut out, path)
                    .unwrap();
                assert_close(&out, &expected);
            }
        }
    }
}
