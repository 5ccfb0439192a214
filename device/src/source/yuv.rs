//! Camera pixel formats that are not JPEG: YUYV from V4L2 webcams and I420 (planar YUV 4:2:0)
//! from `rpicam-vid --codec yuv420`, converted to RGB a row at a time so a frame can go straight
//! into the shared resize.

use image::RgbImage;

/// How Y'CbCr maps to R'G'B', both in limited ("TV") range, as cameras send video.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum YuvMatrix {
    /// ITU-R BT.601 (SMPTE 170M): webcams, and libcamera video below 1280x720.
    Bt601,
    /// ITU-R BT.709: libcamera video from 1280x720 up.
    Bt709,
}

impl YuvMatrix {
    /// The colour space `rpicam-vid` asks libcamera for (`RPiCamApp::ConfigureVideo` in
    /// rpicam-apps' `core/rpicam_app.cpp`): Rec709 when the width is at least 1280 or the height
    /// at least 720, SMPTE 170M otherwise.
    pub fn for_rpicam_video(width: u32, height: u32) -> Self {
        if width >= 1280 || height >= 720 {
            YuvMatrix::Bt709
        } else {
            YuvMatrix::Bt601
        }
    }

    /// Coefficients in 8-bit fixed point: `c` for luma, then Cr→R, Cb→G, Cr→G, Cb→B.
    const fn coefficients(self) -> [i32; 5] {
        match self {
            // 255/219 and 2(1-Kr)*255/224 etc. for Kr = 0.299, Kb = 0.114, times 256.
            YuvMatrix::Bt601 => [298, 409, 100, 208, 516],
            // The same for Kr = 0.2126, Kb = 0.0722.
            YuvMatrix::Bt709 => [298, 459, 55, 136, 541],
        }
    }

    /// One pixel to RGB.
    #[inline(always)]
    pub fn to_rgb(self, y: u8, u: u8, v: u8) -> [u8; 3] {
        let [c, rv, gu, gv, bu] = self.coefficients();
        let (u, v) = (i32::from(u) - 128, i32::from(v) - 128);
        let l = c * (i32::from(y) - 16) + 128;
        let clamp = |x: i32| (x >> 8).clamp(0, 255) as u8;
        [
            clamp(l + rv * v),
            clamp(l - gu * u - gv * v),
            clamp(l + bu * u),
        ]
    }
}

/// The memory layout of one I420 frame: the Y plane (`stride` bytes per row), then U and V
/// (`stride / 2` per row, half the rows), with no gap between the planes. Bytes past `width` in a
/// row, and any bytes after the V plane, are padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct I420Layout {
    pub width: u32,
    pub height: u32,
    pub stride: u32,
    pub matrix: YuvMatrix,
}

/// A frame size or stride that I420 cannot have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("{width}x{height}: I420 (YUV 4:2:0) needs an even, non-zero width and height")]
    OddSize { width: u32, height: u32 },
    #[error("row stride {stride} for width {width}: it must be even and at least the width")]
    Stride { stride: u32, width: u32 },
    #[error("I420 frame of {got} bytes, expected at least {expected} for {width}x{height} (stride {stride})")]
    Short {
        got: usize,
        expected: usize,
        width: u32,
        height: u32,
        stride: u32,
    },
}

impl I420Layout {
    pub fn new(
        width: u32,
        height: u32,
        stride: u32,
        matrix: YuvMatrix,
    ) -> Result<Self, LayoutError> {
        if width == 0 || height == 0 || !width.is_multiple_of(2) || !height.is_multiple_of(2) {
            return Err(LayoutError::OddSize { width, height });
        }
        if stride < width || !stride.is_multiple_of(2) {
            return Err(LayoutError::Stride { stride, width });
        }
        Ok(Self {
            width,
            height,
            stride,
            matrix,
        })
    }

    /// Bytes of the three planes.
    pub fn frame_len(&self) -> usize {
        let (s, h) = (self.stride as usize, self.height as usize);
        s * h + 2 * (s / 2) * (h / 2)
    }

    /// Checks that `data` holds the whole frame (a buffer may be longer: padding).
    pub fn check(&self, data: &[u8]) -> Result<(), LayoutError> {
        if data.len() < self.frame_len() {
            return Err(LayoutError::Short {
                got: data.len(),
                expected: self.frame_len(),
                width: self.width,
                height: self.height,
                stride: self.stride,
            });
        }
        Ok(())
    }

    /// Row `y` of a checked frame to RGB (`width * 3` bytes in `out`). Each chroma sample
    /// covers 2x2 pixels (nearest, not interpolated, as the YUYV path does).
    pub fn row_to_rgb(&self, data: &[u8], y: usize, out: &mut [u8]) {
        let (w, s, h) = (
            self.width as usize,
            self.stride as usize,
            self.height as usize,
        );
        let (cs, ch) = (s / 2, h / 2);
        let luma = &data[y * s..][..w];
        let u = &data[s * h + (y / 2) * cs..][..w / 2];
        let v = &data[s * h + cs * ch + (y / 2) * cs..][..w / 2];
        let out = &mut out[..w * 3];
        for (((px, l), &u), &v) in out
            .chunks_exact_mut(6)
            .zip(luma.chunks_exact(2))
            .zip(u)
            .zip(v)
        {
            px[..3].copy_from_slice(&self.matrix.to_rgb(l[0], u, v));
            px[3..].copy_from_slice(&self.matrix.to_rgb(l[1], u, v));
        }
    }

    /// The whole frame to RGB.
    pub fn to_rgb(&self, data: &[u8]) -> Result<RgbImage, LayoutError> {
        self.check(data)?;
        let row = self.width as usize * 3;
        let mut rgb = vec![0; row * self.height as usize];
        for (y, out) in rgb.chunks_exact_mut(row).enumerate() {
            self.row_to_rgb(data, y, out);
        }
        Ok(RgbImage::from_raw(self.width, self.height, rgb).expect("3 bytes per pixel"))
    }

    /// The frame converted and resized to `width` x `height` in one pass with the shared resize:
    /// rows are converted as the resize reads them, so no full-size RGB copy is made.
    pub fn to_input(&self, data: &[u8], width: u32, height: u32) -> Result<RgbImage, LayoutError> {
        self.check(data)?;
        let mut resizer =
            petcam_shared::preprocess::RgbResizer::new(self.width, self.height, width, height)
                .expect("sizes checked non-zero");
        let mut out = vec![0; width as usize * height as usize * 3];
        resizer
            .resize_rows_into(|y, row| self.row_to_rgb(data, y, row), &mut out)
            .expect("the output holds width * height * 3 bytes");
        Ok(RgbImage::from_raw(width, height, out).expect("3 bytes per pixel"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The conversion straight from the standard's definition, in floating point: luma
    /// `(Y - 16) / 219`, chroma `(C - 128) / 224`, R = Y + 2(1 - Kr) Cr, B = Y + 2(1 - Kb) Cb,
    /// G from Y = Kr R + Kg G + Kb B.
    fn reference(matrix: YuvMatrix, y: u8, u: u8, v: u8) -> [f64; 3] {
        let (kr, kb) = match matrix {
            YuvMatrix::Bt601 => (0.299, 0.114),
            YuvMatrix::Bt709 => (0.2126, 0.0722),
        };
        let l = (f64::from(y) - 16.0) / 219.0;
        let (cb, cr) = (
            (f64::from(u) - 128.0) / 224.0,
            (f64::from(v) - 128.0) / 224.0,
        );
        let r = l + 2.0 * (1.0 - kr) * cr;
        let b = l + 2.0 * (1.0 - kb) * cb;
        let g = (l - kr * r - kb * b) / (1.0 - kr - kb);
        [r, g, b].map(|c| (c * 255.0).clamp(0.0, 255.0))
    }

    #[test]
    fn pixels_match_the_reference_conversion_within_one_level() {
        for matrix in [YuvMatrix::Bt601, YuvMatrix::Bt709] {
            let mut worst = 0.0f64;
            for y in (0..=255u8).step_by(3) {
                for u in (0..=255u8).step_by(5) {
                    for v in (0..=255u8).step_by(5) {
                        let got = matrix.to_rgb(y, u, v);
                        let want = reference(matrix, y, u, v);
                        for (g, w) in got.iter().zip(want) {
                            worst = worst.max((f64::from(*g) - w).abs());
                        }
                    }
                }
            }
            assert!(worst <= 1.0, "{matrix:?}: off by {worst:.2} levels");
        }
        // Limited-range black and white, and a saturated red (BT.601: Y 81, Cb 90, Cr 240).
        assert_eq!(YuvMatrix::Bt601.to_rgb(16, 128, 128), [0, 0, 0]);
        assert_eq!(YuvMatrix::Bt601.to_rgb(235, 128, 128), [255, 255, 255]);
        let red = YuvMatrix::Bt601.to_rgb(81, 90, 240);
        assert!(red[0] >= 254 && red[1] <= 1 && red[2] <= 1, "{red:?}");
    }

    /// A frame with distinct samples everywhere and junk in every padding byte.
    fn frame(layout: &I420Layout, junk: usize) -> Vec<u8> {
        let (w, h, s) = (
            layout.width as usize,
            layout.height as usize,
            layout.stride as usize,
        );
        let mut data = vec![0xA5u8; layout.frame_len() + junk];
        for y in 0..h {
            for x in 0..w {
                data[y * s + x] = (16 + (x * 7 + y * 3) % 220) as u8;
            }
        }
        for plane in 0..2 {
            let base = s * h + plane * (s / 2) * (h / 2);
            for y in 0..h / 2 {
                for x in 0..w / 2 {
                    data[base + y * (s / 2) + x] = (16 + (x * 5 + y * 11 + plane * 90) % 225) as u8;
                }
            }
        }
        data
    }

    #[test]
    fn planes_and_strides_are_read_where_rpicam_puts_them() {
        // 600 is not a multiple of 64: rows are padded to 640 on a Pi 4, 640 on a Pi 5 too
        // (multiple of 128), and 700 is an arbitrary larger stride.
        for stride in [600, 640, 700] {
            let layout = I420Layout::new(600, 20, stride, YuvMatrix::Bt601).unwrap();
            let data = frame(&layout, 13);
            let rgb = layout.to_rgb(&data).unwrap();
            let s = stride as usize;
            for (x, y) in [(0, 0), (599, 0), (1, 1), (598, 19), (301, 10)] {
                let luma = data[y * s + x];
                let u = data[s * 20 + (y / 2) * (s / 2) + x / 2];
                let v = data[s * 20 + (s / 2) * 10 + (y / 2) * (s / 2) + x / 2];
                assert_eq!(
                    rgb.get_pixel(x as u32, y as u32).0,
                    YuvMatrix::Bt601.to_rgb(luma, u, v),
                    "stride {stride}, pixel ({x}, {y})"
                );
            }
        }
    }

    #[test]
    fn the_one_pass_resize_equals_converting_first() {
        for (w, h, stride, dw, dh) in [
            (640, 480, 640, 224, 224),
            (600, 400, 640, 224, 224),
            (1280, 720, 1280, 224, 224),
            (64, 480, 128, 32, 60),
            (40, 30, 64, 40, 30),
        ] {
            let matrix = YuvMatrix::for_rpicam_video(w, h);
            let layout = I420Layout::new(w, h, stride, matrix).unwrap();
            let data = frame(&layout, 0);
            let whole = layout.to_rgb(&data).unwrap();
            let expected = crate::preprocess::resize(&whole, dw, dh);
            assert_eq!(
                layout.to_input(&data, dw, dh).unwrap(),
                expected,
                "{w}x{h} stride {stride} -> {dw}x{dh}"
            );
        }
    }

    #[test]
    fn bad_layouts_and_short_frames_are_refused() {
        assert!(matches!(
            I420Layout::new(641, 480, 704, YuvMatrix::Bt601),
            Err(LayoutError::OddSize { .. })
        ));
        assert!(matches!(
            I420Layout::new(640, 480, 600, YuvMatrix::Bt601),
            Err(LayoutError::Stride { .. })
        ));
        let layout = I420Layout::new(640, 480, 640, YuvMatrix::Bt601).unwrap();
        assert_eq!(layout.frame_len(), 640 * 480 * 3 / 2);
        let err = layout.to_rgb(&[0; 1000]).unwrap_err();
        assert!(err.to_string().contains("460800"), "{err}");
    }

    #[test]
    fn rpicam_picks_bt709_from_720p() {
        assert_eq!(YuvMatrix::for_rpicam_video(640, 480), YuvMatrix::Bt601);
        assert_eq!(YuvMatrix::for_rpicam_video(1280, 720), YuvMatrix::Bt709);
        assert_eq!(YuvMatrix::for_rpicam_video(1024, 768), YuvMatrix::Bt709);
    }
}
