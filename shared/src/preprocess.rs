//! The one image resize routine used by the trainer, the evaluator and the device.
//!
//! The reference preprocessing (and the golden tensors in `../shared/golden`) were produced with
//! Pillow's `Image.resize(size, Image.BILINEAR)`, so this module reproduces Pillow's algorithm
//! (`libImaging/Resample.c`) exactly, integer arithmetic included: a separable triangle filter
//! whose support grows with the downscale factor (so shrinking averages instead of aliasing),
//! centre-aligned sampling, and two passes (along x, along y), each rounded to `u8`, with
//! coefficients in 22-bit fixed point. Given the same decoded pixels the output matches Pillow
//! 13.0 byte for byte.
//!
//! Pass order matters to the last bit because the intermediate image is rounded. Pillow 13 runs
//! the vertical pass first when the height shrinks by more than twice as many pixels as the width
//! (tall photos); Pillow 12 and older always ran the horizontal pass first. This module follows
//! Pillow 13. The two orders differ by at most one level, on a small share of pixels, and only
//! for such tall inputs; landscape photos and camera frames take the same path in both.
//!
//! Images are interleaved RGB8, rows top to bottom, no padding between rows. The whole frame is
//! resized to the target size: no crop, aspect ratio not preserved.

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

/// Side length of the square model input, in pixels.
pub const DEFAULT_INPUT_SIZE: u32 = 224;

/// Bytes per pixel of interleaved RGB8.
const CHANNELS: usize = 3;

/// Fractional bits of the fixed-point coefficients: 32 bits minus 8 for the pixel value minus 2
/// of headroom, as in Pillow, so rounding happens at exactly the same points.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Which of the two images an error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageRole {
    /// The image being resized.
    Source,
    /// The resized image.
    Destination,
}

impl fmt::Display for ImageRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ImageRole::Source => "source",
            ImageRole::Destination => "destination",
        })
    }
}

/// Why a resize was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResizeError {
    /// A width or height is zero.
    ZeroSize {
        role: ImageRole,
        width: u32,
        height: u32,
    },
    /// `width * height * 3` does not fit in `usize`.
    TooLarge {
        role: ImageRole,
        width: u32,
        height: u32,
    },
    /// The buffer length is not `width * height * 3`.
    LengthMismatch {
        role: ImageRole,
        width: u32,
        height: u32,
        expected: usize,
        actual: usize,
    },
}

impl fmt::Display for ResizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ResizeError::ZeroSize {
                role,
                width,
                height,
            } => write!(
                f,
                "{role} image is {width}x{height}: width and height must both be at least 1"
            ),
            ResizeError::TooLarge {
                role,
                width,
                height,
            } => write!(
                f,
                "{role} image {width}x{height} is too large: its RGB8 size does not fit in memory \
                 on this target"
            ),
            ResizeError::LengthMismatch {
                role,
                width,
                height,
                expected,
                actual,
            } => write!(
                f,
                "{role} buffer holds {actual} bytes but a {width}x{height} RGB8 image needs \
                 {expected} (width * height * 3); pass tightly packed interleaved RGB, not RGBA, \
                 grey or rows with padding"
            ),
        }
    }
}

impl core::error::Error for ResizeError {}

/// Byte length of a `width` x `height` RGB8 image, checking the sizes.
fn rgb_len(role: ImageRole, width: u32, height: u32) -> Result<usize, ResizeError> {
    if width == 0 || height == 0 {
        return Err(ResizeError::ZeroSize {
            role,
            width,
            height,
        });
    }
    (width as usize)
        .checked_mul(height as usize)
        .and_then(|n| n.checked_mul(CHANNELS))
        .ok_or(ResizeError::TooLarge {
            role,
            width,
            height,
        })
}

fn check_len(role: ImageRole, width: u32, height: u32, actual: usize) -> Result<(), ResizeError> {
    let expected = rgb_len(role, width, height)?;
    if actual != expected {
        return Err(ResizeError::LengthMismatch {
            role,
            width,
            height,
            expected,
            actual,
        });
    }
    Ok(())
}

/// Resizes an interleaved RGB8 image to `dst_w` x `dst_h` with Pillow-compatible bilinear
/// filtering and returns the new pixels.
///
/// # Errors
/// A zero width or height, or a `src` whose length is not `src_w * src_h * 3`.
pub fn resize_rgb(
    src: &[u8],
    src_w: u32,
    src_h: u32,
    dst_w: u32,
    dst_h: u32,
) -> Result<Vec<u8>, ResizeError> {
    let mut dst = vec![0; rgb_len(ImageRole::Destination, dst_w, dst_h)?];
    resize_rgb_into(src, src_w, src_h, &mut dst, dst_w, dst_h)?;
    Ok(dst)
}

/// Like [`resize_rgb`], writing into `dst`, which must hold exactly `dst_w * dst_h * 3` bytes.
///
/// This still allocates the filter tables and the intermediate image; a caller that resizes
/// many frames of one size should keep an [`RgbResizer`].
///
/// # Errors
/// A zero width or height, or a buffer whose length does not match its size.
pub fn resize_rgb_into(
    src: &[u8],
    src_w: u32,
    src_h: u32,
    dst: &mut [u8],
    dst_w: u32,
    dst_h: u32,
) -> Result<(), ResizeError> {
    RgbResizer::new(src_w, src_h, dst_w, dst_h)?.resize_into(src, dst)
}

/// Fixed-point filter taps for one axis: output pixel `i` reads `len[i]` input pixels starting at
/// `start[i]`, weighted by `weights[i * ksize..][..len[i]]`.
#[derive(Clone, Debug)]
struct AxisCoeffs {
    ksize: usize,
    start: Vec<usize>,
    len: Vec<usize>,
    weights: Vec<i32>,
}

/// Triangle filter of support 1 (Pillow's `bilinear_filter`).
fn triangle(x: f64) -> f64 {
    let x = if x < 0.0 { -x } else { x };
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

/// `ceil` for a positive finite value; `core` has no float rounding functions without `std`.
fn ceil_positive(x: f64) -> usize {
    let t = x as usize;
    if (t as f64) < x {
        t + 1
    } else {
        t
    }
}

impl AxisCoeffs {
    /// Pillow's `precompute_coeffs` followed by `normalize_coeffs_8bpc`, for a box covering the
    /// whole input. Every floating-point operation is done in the same order and precision, since
    /// a coefficient that differs in its last bit can move a rounded pixel by one level.
    fn new(in_size: usize, out_size: usize) -> Self {
        let scale = in_size as f64 / out_size as f64;
        let filterscale = if scale < 1.0 { 1.0 } else { scale };
        // The triangle filter has support 1 at unit scale; shrinking widens it by the factor.
        let support = filterscale;
        let ksize = ceil_positive(support) * 2 + 1;
        let inv_filterscale = 1.0 / filterscale;

        let mut start = Vec::with_capacity(out_size);
        let mut len = Vec::with_capacity(out_size);
        let mut weights = vec![0i32; out_size * ksize];
        let mut taps = vec![0f64; ksize];
        for (xx, row) in weights.chunks_exact_mut(ksize).enumerate() {
            let center = (xx as f64 + 0.5) * scale;
            // C's `(int)` truncates towards zero, as does `as`; negatives are clamped anyway.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let n = xmax.saturating_sub(xmin);
            let mut total = 0.0;
            for (x, tap) in taps[..n].iter_mut().enumerate() {
                let w = triangle((((x + xmin) as f64) - center + 0.5) * inv_filterscale);
                *tap = w;
                total += w;
            }
            for (tap, fixed) in taps[..n].iter().zip(row.iter_mut()) {
                let w = if total != 0.0 { tap / total } else { *tap };
                // Round half up; Pillow rounds negative weights away from zero, but a triangle
                // filter has none.
                *fixed = (w * f64::from(1u32 << PRECISION_BITS) + 0.5) as i32;
            }
            start.push(xmin);
            len.push(n);
        }
        AxisCoeffs {
            ksize,
            start,
            len,
            weights,
        }
    }

    fn taps(&self, i: usize) -> (usize, &[i32]) {
        let w = &self.weights[i * self.ksize..][..self.len[i]];
        (self.start[i], w)
    }
}

/// Shifts a fixed-point sum back to a pixel level; the sum already carries the rounding half.
#[inline(always)]
fn to_u8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Rounding offset added to every sum before the final shift.
const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// A resize between two fixed sizes, with its filter tables and scratch buffers kept so a video
/// loop allocates nothing per frame.
#[derive(Clone, Debug)]
pub struct RgbResizer {
    src_w: u32,
    src_h: u32,
    dst_w: u32,
    dst_h: u32,
    /// `None` when the width does not change (Pillow skips that pass).
    horizontal: Option<AxisCoeffs>,
    /// `None` when the height does not change.
    vertical: Option<AxisCoeffs>,
    /// Pillow 13's pass order; only relevant when both passes run.
    vertical_first: bool,
    /// With the horizontal pass first, only source rows `first_row..first_row + rows` are read
    /// by the vertical pass, so only those are resized along x.
    first_row: usize,
    rows: usize,
    /// The image between the two passes.
    intermediate: Vec<u8>,
    /// One row of fixed-point sums for the vertical pass.
    acc: Vec<i32>,
    /// [`RgbResizer::resize_rows_into`]: one source row, and the source rows the vertical pass
    /// is reading (a ring of as many rows as the filter is long). Empty until first used.
    row: Vec<u8>,
    window: Vec<u8>,
}

impl RgbResizer {
    /// Prepares a resize from `src_w` x `src_h` to `dst_w` x `dst_h`.
    ///
    /// # Errors
    /// A zero width or height, or sizes whose byte length overflows `usize`.
    pub fn new(src_w: u32, src_h: u32, dst_w: u32, dst_h: u32) -> Result<Self, ResizeError> {
        rgb_len(ImageRole::Source, src_w, src_h)?;
        rgb_len(ImageRole::Destination, dst_w, dst_h)?;
        let (sw, sh, dw, dh) = (
            src_w as usize,
            src_h as usize,
            dst_w as usize,
            dst_h as usize,
        );
        let horizontal = (sw != dw).then(|| AxisCoeffs::new(sw, dw));
        let vertical = (sh != dh).then(|| AxisCoeffs::new(sh, dh));
        // Pillow 13: "If height is being scaled down more than twice the amount the width is,
        // run the vertical pass first" (signed pixel counts).
        let shrink_h = i64::from(src_h) - i64::from(dst_h);
        let shrink_w = i64::from(src_w) - i64::from(dst_w);
        let vertical_first = shrink_h > 0 && shrink_h > shrink_w * 2;

        let (first_row, rows) = match &vertical {
            Some(v) if !vertical_first => {
                let end = v.start[dh - 1] + v.len[dh - 1];
                (v.start[0], end - v.start[0])
            }
            _ => (0, sh),
        };
        let intermediate = match (&horizontal, &vertical) {
            (Some(_), Some(_)) if vertical_first => vec![0; sw * dh * CHANNELS],
            (Some(_), Some(_)) => vec![0; dw * rows * CHANNELS],
            _ => Vec::new(),
        };
        let acc = match &vertical {
            // The vertical pass runs on rows as wide as the source when it goes first.
            Some(_) if horizontal.is_none() || vertical_first => vec![0; sw * CHANNELS],
            Some(_) => vec![0; dw * CHANNELS],
            None => Vec::new(),
        };
        Ok(RgbResizer {
            src_w,
            src_h,
            dst_w,
            dst_h,
            horizontal,
            vertical,
            vertical_first,
            first_row,
            rows,
            intermediate,
            acc,
            row: Vec::new(),
            window: Vec::new(),
        })
    }

    /// Source `(width, height)` this resizer was built for.
    pub fn src_size(&self) -> (u32, u32) {
        (self.src_w, self.src_h)
    }

    /// Destination `(width, height)` this resizer was built for.
    pub fn dst_size(&self) -> (u32, u32) {
        (self.dst_w, self.dst_h)
    }

    /// Resizes `src` (`src_w * src_h * 3` bytes) into `dst` (`dst_w * dst_h * 3` bytes).
    ///
    /// # Errors
    /// A buffer whose length does not match the sizes given to [`RgbResizer::new`].
    pub fn resize_into(&mut self, src: &[u8], dst: &mut [u8]) -> Result<(), ResizeError> {
        check_len(ImageRole::Source, self.src_w, self.src_h, src.len())?;
        check_len(ImageRole::Destination, self.dst_w, self.dst_h, dst.len())?;
        let src_stride = self.src_w as usize * CHANNELS;
        let dst_stride = self.dst_w as usize * CHANNELS;
        match (&self.horizontal, &self.vertical) {
            (None, None) => dst.copy_from_slice(src),
            (Some(h), None) => horizontal_pass(h, src, src_stride, dst, dst_stride),
            (None, Some(v)) => vertical_pass(v, 0, src, dst, src_stride, &mut self.acc),
            (Some(h), Some(v)) if self.vertical_first => {
                vertical_pass(v, 0, src, &mut self.intermediate, src_stride, &mut self.acc);
                horizontal_pass(h, &self.intermediate, src_stride, dst, dst_stride);
            }
            (Some(h), Some(v)) => {
                let rows = &src[self.first_row * src_stride..][..self.rows * src_stride];
                horizontal_pass(h, rows, src_stride, &mut self.intermediate, dst_stride);
                vertical_pass(
                    v,
                    self.first_row,
                    &self.intermediate,
                    dst,
                    dst_stride,
                    &mut self.acc,
                );
            }
        }
        Ok(())
    }
}

impl RgbResizer {
    /// Like [`RgbResizer::resize_into`], but the source is never a whole RGB image: `fill(y,
    /// row)` writes source row `y` (`src_w * 3` bytes) when the resize needs it. A camera frame
    /// in another pixel format is converted row by row on its way in, so no full-size RGB copy
    /// exists; the output is byte for byte that of converting the whole frame first, since the
    /// passes see the same rows.
    ///
    /// Rows are asked for in increasing order, each once.
    ///
    /// # Errors
    /// A `dst` whose length does not match the destination size.
    pub fn resize_rows_into(
        &mut self,
        mut fill: impl FnMut(usize, &mut [u8]),
        dst: &mut [u8],
    ) -> Result<(), ResizeError> {
        check_len(ImageRole::Destination, self.dst_w, self.dst_h, dst.len())?;
        let src_stride = self.src_w as usize * CHANNELS;
        let dst_stride = self.dst_w as usize * CHANNELS;
        self.row.resize(src_stride, 0);
        match (&self.horizontal, &self.vertical) {
            (None, None) => {
                for (y, out) in dst.chunks_exact_mut(dst_stride).enumerate() {
                    fill(y, out);
                }
            }
            (Some(h), None) => {
                for (y, out) in dst.chunks_exact_mut(dst_stride).enumerate() {
                    fill(y, &mut self.row);
                    horizontal_pass(h, &self.row, src_stride, out, dst_stride);
                }
            }
            (None, Some(v)) => {
                vertical_pass_rows(v, fill, dst, src_stride, &mut self.acc, &mut self.window);
            }
            (Some(h), Some(v)) if self.vertical_first => {
                let mid = &mut self.intermediate;
                vertical_pass_rows(v, fill, mid, src_stride, &mut self.acc, &mut self.window);
                horizontal_pass(h, mid, src_stride, dst, dst_stride);
            }
            (Some(h), Some(v)) => {
                let rows = self.intermediate.chunks_exact_mut(dst_stride);
                for (y, out) in (self.first_row..).zip(rows) {
                    fill(y, &mut self.row);
                    horizontal_pass(h, &self.row, src_stride, out, dst_stride);
                }
                vertical_pass(
                    v,
                    self.first_row,
                    &self.intermediate,
                    dst,
                    dst_stride,
                    &mut self.acc,
                );
            }
        }
        Ok(())
    }
}

/// [`vertical_pass`] over rows that `fill` produces on demand. Output row `yy` reads source
/// rows `start..start + len` and `start` never decreases, so a ring of `ksize` rows holds every
/// row still needed: row `r` overwrites row `r - ksize`, which lies before the current window.
fn vertical_pass_rows(
    coeffs: &AxisCoeffs,
    mut fill: impl FnMut(usize, &mut [u8]),
    dst: &mut [u8],
    stride: usize,
    acc: &mut [i32],
    window: &mut Vec<u8>,
) {
    let ksize = coeffs.ksize;
    window.resize(ksize * stride, 0);
    let acc = &mut acc[..stride];
    let mut next = 0;
    for (yy, dst_row) in dst.chunks_exact_mut(stride).enumerate() {
        let (start, weights) = coeffs.taps(yy);
        while next < start + weights.len() {
            fill(next, &mut window[(next % ksize) * stride..][..stride]);
            next += 1;
        }
        acc.fill(HALF);
        for (i, &w) in weights.iter().enumerate() {
            let src_row = &window[((start + i) % ksize) * stride..][..stride];
            for (a, &p) in acc.iter_mut().zip(src_row) {
                *a += i32::from(p) * w;
            }
        }
        for (out, &a) in dst_row.iter_mut().zip(acc.iter()) {
            *out = to_u8(a);
        }
    }
}

/// Resizes every row of `src` along x (Pillow's `ImagingResampleHorizontal_8bpc`).
fn horizontal_pass(
    coeffs: &AxisCoeffs,
    src: &[u8],
    src_stride: usize,
    dst: &mut [u8],
    dst_stride: usize,
) {
    for (src_row, dst_row) in src
        .chunks_exact(src_stride)
        .zip(dst.chunks_exact_mut(dst_stride))
    {
        for (xx, out) in dst_row.chunks_exact_mut(CHANNELS).enumerate() {
            let (start, weights) = coeffs.taps(xx);
            let pixels = &src_row[start * CHANNELS..][..weights.len() * CHANNELS];
            let (mut r, mut g, mut b) = (HALF, HALF, HALF);
            for (px, &w) in pixels.chunks_exact(CHANNELS).zip(weights) {
                r += i32::from(px[0]) * w;
                g += i32::from(px[1]) * w;
                b += i32::from(px[2]) * w;
            }
            out[0] = to_u8(r);
            out[1] = to_u8(g);
            out[2] = to_u8(b);
        }
    }
}

/// Resizes along y (Pillow's `ImagingResampleVertical_8bpc`). `src` starts at source row
/// `row_offset`. Whole rows are accumulated at once so the inner loop vectorises.
fn vertical_pass(
    coeffs: &AxisCoeffs,
    row_offset: usize,
    src: &[u8],
    dst: &mut [u8],
    stride: usize,
    acc: &mut [i32],
) {
    let acc = &mut acc[..stride];
    for (yy, dst_row) in dst.chunks_exact_mut(stride).enumerate() {
        let (start, weights) = coeffs.taps(yy);
        acc.fill(HALF);
        for (i, &w) in weights.iter().enumerate() {
            let src_row = &src[(start - row_offset + i) * stride..][..stride];
            for (a, &p) in acc.iter_mut().zip(src_row) {
                *a += i32::from(p) * w;
            }
        }
        for (out, &a) in dst_row.iter_mut().zip(acc.iter()) {
            *out = to_u8(a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::format;
    use std::string::String;

    /// Deterministic pseudo-random bytes (xorshift), so tests need no RNG crate.
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 32) as u8
            })
            .collect()
    }

    #[test]
    fn identity_returns_input() {
        for &(w, h) in &[(1, 1), (2, 3), (17, 5), (224, 224)] {
            let src = noise(w * h * 3, 1);
            let out = resize_rgb(&src, w as u32, h as u32, w as u32, h as u32).unwrap();
            assert_eq!(out, src, "{w}x{h}");
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let sizes = [(1u32, 1u32), (2, 3), (7, 5), (64, 48), (640, 480)];
        for &(sw, sh) in &sizes {
            for &(dw, dh) in &sizes {
                let src: Vec<u8> = [200u8, 17, 255].repeat((sw * sh) as usize);
                let out = resize_rgb(&src, sw, sh, dw, dh).unwrap();
                assert_eq!(out.len(), (dw * dh * 3) as usize);
                for px in out.chunks_exact(3) {
                    assert_eq!(px, [200, 17, 255], "{sw}x{sh} -> {dw}x{dh}");
                }
            }
        }
    }

    #[test]
    fn upscaling_interpolates_like_pillow() {
        // Pillow: Image.fromarray([[black, white]]).resize((4, 1), BILINEAR) -> 0, 64, 191, 255.
        // Centres at 0.25, 0.75, 1.25, 1.75 source pixels; the outer two see only one neighbour.
        let src = [0, 0, 0, 255, 255, 255];
        let out = resize_rgb(&src, 2, 1, 4, 1).unwrap();
        assert_eq!(out, [0, 0, 0, 64, 64, 64, 191, 191, 191, 255, 255, 255]);
        // The same along y, through the vertical pass alone.
        let out = resize_rgb(&src, 1, 2, 1, 4).unwrap();
        assert_eq!(out, [0, 0, 0, 64, 64, 64, 191, 191, 191, 255, 255, 255]);
    }

    /// Tiny 4x3 image and its resizes as produced by Pillow 13.0.0
    /// (`Image.fromarray(a).resize((w, h), Image.BILINEAR)`).
    const TINY_SRC: [u8; 36] = [
        12, 200, 45, 250, 3, 90, 77, 77, 77, 0, 255, 128, //
        34, 56, 78, 90, 12, 240, 255, 255, 0, 5, 6, 7, //
        100, 150, 200, 220, 180, 140, 60, 40, 20, 1, 2, 3,
    ];

    #[test]
    fn tiny_images_match_pillow() {
        let cases: [(u32, u32, &[u8]); 4] = [
            (1, 1, &PILLOW_TINY_1X1),
            (2, 3, &PILLOW_TINY_2X3),
            (3, 2, &PILLOW_TINY_3X2),
            (7, 5, &PILLOW_TINY_7X5),
        ];
        for (w, h, expected) in cases {
            let out = resize_rgb(&TINY_SRC, 4, 3, w, h).unwrap();
            assert_eq!(out, expected, "4x3 -> {w}x{h}");
        }
        let one = resize_rgb(&[9, 8, 7], 1, 1, 2, 3).unwrap();
        assert_eq!(one, [9, 8, 7].repeat(6));
        let back = resize_rgb(&PILLOW_TINY_2X3, 2, 3, 1, 1).unwrap();
        assert_eq!(back, PILLOW_TINY_2X3_TO_1X1);
    }

    const PILLOW_TINY_1X1: [u8; 3] = [104, 100, 87];
    const PILLOW_TINY_2X3: [u8; 18] = [
        123, 98, 69, 69, 143, 101, 90, 66, 136, 124, 114, 37, 146, 147, 149, 58, 44, 30,
    ];
    const PILLOW_TINY_3X2: [u8; 18] = [
        71, 104, 84, 167, 75, 98, 44, 157, 73, 104, 116, 161, 152, 119, 95, 42, 39, 7,
    ];
    const PILLOW_TINY_7X5: [u8; 105] = [
        12, 200, 45, 97, 130, 61, 233, 17, 87, 164, 40, 84, 72, 90, 81, 28, 191, 110, 0, 255, 128,
        21, 142, 58, 80, 94, 91, 174, 16, 143, 168, 78, 98, 138, 149, 49, 54, 153, 68, 2, 155, 80,
        34, 56, 78, 54, 40, 136, 86, 15, 228, 173, 134, 120, 237, 237, 0, 94, 95, 4, 5, 6, 7, 74,
        112, 151, 107, 113, 162, 161, 113, 178, 153, 120, 96, 128, 117, 11, 51, 48, 7, 3, 4, 5,
        100, 150, 200, 143, 161, 179, 211, 178, 144, 140, 110, 80, 56, 37, 19, 22, 16, 9, 1, 2, 3,
    ];
    const PILLOW_TINY_2X3_TO_1X1: [u8; 3] = [102, 101, 87];

    #[test]
    fn tall_images_take_the_vertical_pass_first_like_pillow_13() {
        // 16 rows shrink to 4 (12 rows) while 5 columns shrink to 3 (2 columns): Pillow 13 runs
        // the vertical pass first. Expected bytes from Pillow 13.0.0 on `noise(240, 1)`; Pillow
        // 12 (horizontal first) gives 132, 141, 105, 87, 172 at indices 0, 5, 11, 22, 29.
        let src = noise(5 * 16 * 3, 1);
        let out = resize_rgb(&src, 5, 16, 3, 4).unwrap();
        #[rustfmt::skip]
        let expected = [
            133, 103, 148, 136, 131, 142, 141, 132, 166,
            107, 86, 104, 125, 95, 116, 121, 118, 159,
            127, 103, 131, 147, 88, 122, 141, 138, 127,
            97, 122, 171, 149, 111, 157, 141, 108, 92,
        ];
        assert_eq!(out, expected);
    }

    #[test]
    fn reusable_resizer_matches_one_shot() {
        let src = noise(64 * 48 * 3, 7);
        let mut resizer = RgbResizer::new(64, 48, 23, 31).unwrap();
        let mut dst = vec![0; 23 * 31 * 3];
        for _ in 0..2 {
            resizer.resize_into(&src, &mut dst).unwrap();
            assert_eq!(dst, resize_rgb(&src, 64, 48, 23, 31).unwrap());
        }
        assert_eq!(resizer.src_size(), (64, 48));
        assert_eq!(resizer.dst_size(), (23, 31));
    }

    #[test]
    fn rows_on_demand_match_the_whole_image() {
        // Every pass order: both ways, x only, y only (both directions), identity, and a tall
        // source that runs the vertical pass first.
        let sizes = [
            (64, 48, 23, 31),
            (64, 48, 23, 48),
            (64, 48, 64, 31),
            (64, 48, 64, 90),
            (64, 48, 64, 48),
            (5, 16, 3, 4),
            (600, 400, 224, 224),
        ];
        for (sw, sh, dw, dh) in sizes {
            let src = noise(sw * sh * 3, (sw * dh) as u64);
            let expected = resize_rgb(&src, sw as u32, sh as u32, dw as u32, dh as u32).unwrap();
            let mut resizer = RgbResizer::new(sw as u32, sh as u32, dw as u32, dh as u32).unwrap();
            let mut dst = vec![0; dw * dh * 3];
            for _ in 0..2 {
                let mut asked = Vec::new();
                let fill = |y: usize, row: &mut [u8]| {
                    asked.push(y);
                    row.copy_from_slice(&src[y * sw * 3..][..sw * 3]);
                };
                resizer.resize_rows_into(fill, &mut dst).unwrap();
                assert_eq!(dst, expected, "{sw}x{sh} -> {dw}x{dh}");
                assert!(asked.windows(2).all(|p| p[0] < p[1]), "rows in order, once");
            }
        }
    }

    #[test]
    fn bad_sizes_are_refused() {
        let src = [0u8; 12];
        assert_eq!(
            resize_rgb(&src, 2, 2, 0, 5),
            Err(ResizeError::ZeroSize {
                role: ImageRole::Destination,
                width: 0,
                height: 5
            })
        );
        assert!(matches!(
            resize_rgb(&src, 0, 2, 2, 2),
            Err(ResizeError::ZeroSize {
                role: ImageRole::Source,
                ..
            })
        ));
        let err = resize_rgb(&src[..11], 2, 2, 1, 1).unwrap_err();
        assert_eq!(
            err,
            ResizeError::LengthMismatch {
                role: ImageRole::Source,
                width: 2,
                height: 2,
                expected: 12,
                actual: 11
            }
        );
        let msg = format!("{err}");
        assert!(msg.contains("11 bytes") && msg.contains("2x2"), "{msg}");
        let mut dst = [0u8; 4];
        assert!(matches!(
            resize_rgb_into(&src, 2, 2, &mut dst, 1, 1),
            Err(ResizeError::LengthMismatch {
                role: ImageRole::Destination,
                expected: 3,
                actual: 4,
                ..
            })
        ));
    }

    /// Folder with the reference data, next to the project checkout.
    fn shared_dir() -> Option<std::path::PathBuf> {
        let dir = std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared"));
        if dir.join("golden").is_dir() {
            return Some(dir);
        }
        let msg = format!(
            "reference data not found at {}: check out ../shared next to the project",
            dir.display()
        );
        if std::env::var_os("CI").is_some() {
            panic!("{msg} (required when CI is set)");
        }
        std::eprintln!("skipping: {msg}");
        None
    }

    /// Photos decoded by the `image` crate and resized here, against the golden 224x224 images
    /// (libjpeg decode + Pillow resize). Resize is exact for identical pixels (checked against
    /// Pillow on the `image` crate's own decode); what remains comes from the JPEG decoders.
    #[test]
    fn golden_photos_match_reference_resize() {
        let Some(shared) = shared_dir() else { return };
        let golden = std::fs::read(shared.join("golden/efficientnet_lite0.safetensors")).unwrap();
        let golden = safetensors::SafeTensors::deserialize(&golden).unwrap();
        let meta = std::fs::read_to_string(shared.join("golden/efficientnet_lite0.json")).unwrap();
        let paths = golden_image_paths(&meta);
        assert_eq!(paths.len(), 4, "expected 4 golden images in the JSON");

        let size = DEFAULT_INPUT_SIZE;
        for (i, path) in paths.iter().enumerate() {
            let photo = image::open(shared.join(path)).unwrap().to_rgb8();
            let (w, h) = photo.dimensions();
            let ours = resize_rgb(photo.as_raw(), w, h, size, size).unwrap();
            let reference = golden.tensor(&format!("rgb_{i}")).unwrap();
            assert_eq!(reference.shape(), [size as usize, size as usize, 3]);
            let reference = reference.data();
            let (max, sum) = ours
                .iter()
                .zip(reference)
                .map(|(&a, &b)| a.abs_diff(b))
                .fold((0u8, 0u64), |(m, s), d| (m.max(d), s + u64::from(d)));
            let mean = sum as f64 / ours.len() as f64;
            std::eprintln!("{path} ({w}x{h}): max abs diff {max}, mean abs diff {mean:.4}");
            // Measured with image 0.25 (zune-jpeg): max 2..3, mean 0.08..0.15. All of it comes
            // from the decoders (zune-jpeg vs libjpeg-turbo differ by up to 4 levels on 6-11%
            // of pixels, most in chroma); on identical pixels the resize matches Pillow exactly.
            // Resize bugs are far above the bounds: truncating instead of rounding gives a mean
            // of 0.9, sampling without the half-pixel offset a max of 84 and a mean of 4.
            assert!(max <= 8, "{path}: max abs diff {max} > 8");
            assert!(mean <= 0.3, "{path}: mean abs diff {mean} > 0.3");
        }
    }

    /// The `"image"` values of the golden JSON, in order (avoids a JSON dependency).
    fn golden_image_paths(meta: &str) -> Vec<String> {
        meta.split("\"image\"")
            .skip(1)
            .filter_map(|rest| {
                let rest = rest.trim_start().strip_prefix(':')?.trim_start();
                let rest = rest.strip_prefix('"')?;
                Some(String::from(&rest[..rest.find('"')?]))
            })
            .collect()
    }
}
