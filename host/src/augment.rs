//! Training-photo augmentation: random resized crop, horizontal flip and mild colour jitter.
//!
//! Every random choice comes from (seed, the photo's content hash, view index), so a view is
//! the same whatever the order or the thread that computes it, and its features can be cached
//! under that key. The crop keeps at least [`MIN_AREA`] of the photo: with a frozen backbone a
//! pet cropped out of the picture teaches the head nothing.
//!
//! With [`Policy::low_res`], half of the views are also shrunk before the final resize, so
//! the network sees the soft, upscaled pixels of a pet far from the camera or of a small photo.

use image::RgbImage;

use crate::dataset;
use crate::rng::SplitMix64;

/// Smallest crop, as a fraction of the photo's area.
pub const MIN_AREA: f32 = 0.35;
/// Crop aspect ratios between 3:4 and 4:3.
const ASPECT: (f32, f32) = (3.0 / 4.0, 4.0 / 3.0);
/// Brightness, contrast and saturation each scaled by a factor in [1 - J, 1 + J].
const JITTER: f32 = 0.2;

/// Low-resolution views are shrunk to between this fraction of the input size and the input size.
pub const LOW_RES_MIN: f32 = 0.5;

/// Bumped whenever a view's pixels change for the same key: it is part of the feature cache key.
pub const VERSION: &str = "rrc0.35-flip-jitter0.2/v1";

/// How views are drawn: the seed, and what kinds of view beyond crop, flip and jitter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Policy {
    pub seed: u64,
    /// Shrink half of the views (see [`LOW_RES_MIN`]) before resizing them to the input.
    pub low_res: bool,
}

impl Policy {
    /// Names the kind of views this policy draws: [`VERSION`], plus what the policy adds. Part
    /// of the feature cache key and of the report.
    pub fn kind(&self) -> String {
        if self.low_res {
            format!("{VERSION}+lowres{LOW_RES_MIN}")
        } else {
            VERSION.to_owned()
        }
    }
}

/// The random choices of one view.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ViewParams {
    /// Crop rectangle in pixels of the decoded photo.
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
    pub flip: bool,
    pub brightness: f32,
    pub contrast: f32,
    pub saturation: f32,
    /// Shrink the crop to this fraction of the input size before resizing it to the input.
    pub shrink: Option<f32>,
}

impl ViewParams {
    /// The view `index`, drawn by `policy`, of a `width` x `height` photo whose content hash is `content_sha256`.
    /// The draws that `policy` adds come last, so the other choices do not depend on it.
    pub fn draw(policy: Policy, content_sha256: &str, index: u32, width: u32, height: u32) -> Self {
        let photo = content_sha256
            .get(..16)
            .and_then(|h| u64::from_str_radix(h, 16).ok())
            .unwrap_or(0);
        let mut rng = SplitMix64::new(
            policy.seed
                ^ photo.rotate_left(17)
                ^ u64::from(index).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let (w, h) = (width as f32, height as f32);
        let area = w * h;
        // torchvision's RandomResizedCrop: up to 10 draws of area and ratio, else the whole photo.
        let mut crop = (0, 0, width, height);
        for _ in 0..10 {
            let target = area * (MIN_AREA + (1.0 - MIN_AREA) * rng.next_f32());
            let (lo, hi) = (ASPECT.0.ln(), ASPECT.1.ln());
            let ratio = (lo + (hi - lo) * rng.next_f32()).exp();
            let cw = (target * ratio).sqrt().round();
            let ch = (target / ratio).sqrt().round();
            if cw >= 1.0 && ch >= 1.0 && cw <= w && ch <= h {
                let x = ((w - cw + 1.0) * rng.next_f32()).floor().min(w - cw) as u32;
                let y = ((h - ch + 1.0) * rng.next_f32()).floor().min(h - ch) as u32;
                crop = (x, y, cw as u32, ch as u32);
                break;
            }
        }
        let mut jitter = || 1.0 + JITTER * (2.0 * rng.next_f32() - 1.0);
        let (brightness, contrast, saturation) = (jitter(), jitter(), jitter());
        let flip = rng.next_u64() & 1 == 1;
        let shrink = (policy.low_res && rng.next_u64() & 1 == 1)
            .then(|| LOW_RES_MIN + (1.0 - LOW_RES_MIN) * rng.next_f32());
        Self {
            x: crop.0,
            y: crop.1,
            width: crop.2,
            height: crop.3,
            flip,
            brightness,
            contrast,
            saturation,
            shrink,
        }
    }
}

/// Crops, flips and jitters `img`, then resizes to `size` x `size` with the shared resize
/// (through the smaller size of a low-resolution view).
pub fn apply(img: &RgbImage, p: &ViewParams, size: u32) -> RgbImage {
    let mut crop = image::imageops::crop_imm(img, p.x, p.y, p.width, p.height).to_image();
    if p.flip {
        image::imageops::flip_horizontal_in_place(&mut crop);
    }
    if let Some(f) = p.shrink {
        let side = ((size as f32 * f).round() as u32).max(1);
        crop = dataset::resize(&crop, side, side);
    }
    let mut out = dataset::resize(&crop, size, size);
    jitter(&mut out, p.brightness, p.contrast, p.saturation);
    out
}

/// Brightness (scale), contrast (towards the mean grey) and saturation (towards each pixel's
/// grey), in that order, as torchvision's ColorJitter defines them.
fn jitter(img: &mut RgbImage, brightness: f32, contrast: f32, saturation: f32) {
    let grey = |p: [f32; 3]| 0.299 * p[0] + 0.587 * p[1] + 0.114 * p[2];
    let n = (img.width() * img.height()).max(1) as f32;
    let mean = img
        .pixels()
        .map(|p| grey([p[0] as f32, p[1] as f32, p[2] as f32]) * brightness)
        .sum::<f32>()
        / n;
    for px in img.pixels_mut() {
        let mut v = [px[0] as f32, px[1] as f32, px[2] as f32].map(|c| c * brightness);
        v = v.map(|c| mean + (c - mean) * contrast);
        let g = grey(v);
        v = v.map(|c| g + (c - g) * saturation);
        for (o, c) in px.0.iter_mut().zip(v) {
            *o = c.round().clamp(0.0, 255.0) as u8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "3f2a9c0d11e4b5a6c7d8e9f0a1b2c3d4e5f60718293a4b5c6d7e8f9012345678";

    fn plain(seed: u64) -> Policy {
        Policy {
            seed,
            low_res: false,
        }
    }

    #[test]
    fn views_are_reproducible_and_differ_by_index_seed_and_photo() {
        let a = ViewParams::draw(plain(7), SHA, 0, 500, 375);
        assert_eq!(a, ViewParams::draw(plain(7), SHA, 0, 500, 375));
        assert_ne!(a, ViewParams::draw(plain(7), SHA, 1, 500, 375));
        assert_ne!(a, ViewParams::draw(plain(8), SHA, 0, 500, 375));
        let other = "00".to_owned() + &SHA[2..];
        assert_ne!(a, ViewParams::draw(plain(7), &other, 0, 500, 375));
    }

    #[test]
    fn crops_stay_inside_the_photo_and_keep_enough_of_it() {
        let mut flips = 0;
        for i in 0..500 {
            let (w, h) = (500, 375);
            let p = ViewParams::draw(plain(1), SHA, i, w, h);
            assert!(p.x + p.width <= w && p.y + p.height <= h, "{p:?}");
            let area = (p.width * p.height) as f32 / (w * h) as f32;
            assert!(area >= MIN_AREA * 0.97, "view {i}: {area} of the photo");
            let ratio = p.width as f32 / p.height as f32;
            assert!(ratio > 0.7 && ratio < 1.4 || area > 0.99, "{ratio}");
            for f in [p.brightness, p.contrast, p.saturation] {
                assert!((1.0 - JITTER..=1.0 + JITTER).contains(&f));
            }
            flips += usize::from(p.flip);
        }
        assert!((200..300).contains(&flips), "{flips} flips in 500");
    }

    #[test]
    fn low_res_shrinks_half_the_views_and_changes_nothing_else() {
        let low = Policy {
            seed: 3,
            low_res: true,
        };
        assert_ne!(low.kind(), plain(3).kind());
        let mut shrunk = 0;
        for i in 0..500 {
            let plain = ViewParams::draw(plain(3), SHA, i, 500, 375);
            let p = ViewParams::draw(low, SHA, i, 500, 375);
            assert_eq!(plain.shrink, None);
            assert_eq!(ViewParams { shrink: None, ..p }, plain);
            if let Some(f) = p.shrink {
                assert!((LOW_RES_MIN..=1.0).contains(&f), "{f}");
                shrunk += 1;
            }
        }
        assert!((200..300).contains(&shrunk), "{shrunk} shrunk in 500");

        // A one-pixel checkerboard survives a plain resize to its own size and is blurred
        // to greys by a shrink to half of it.
        let img = RgbImage::from_fn(32, 32, |x, y| {
            image::Rgb(if (x + y) % 2 == 0 { [0; 3] } else { [255; 3] })
        });
        let p = ViewParams {
            x: 0,
            y: 0,
            width: 32,
            height: 32,
            flip: false,
            brightness: 1.0,
            contrast: 1.0,
            saturation: 1.0,
            shrink: None,
        };
        let sharp = apply(&img, &p, 32);
        assert_eq!(sharp, img);
        let soft = apply(
            &img,
            &ViewParams {
                shrink: Some(0.5),
                ..p
            },
            32,
        );
        assert!(
            soft.pixels().all(|q| (64..=192).contains(&q[0])),
            "{:?}",
            soft.get_pixel(0, 0)
        );
    }

    #[test]
    fn a_view_is_the_cropped_flipped_jittered_photo() {
        // Left half black, right half white: a flip swaps them.
        let img = RgbImage::from_fn(64, 64, |x, _| {
            image::Rgb(if x < 32 { [0, 0, 0] } else { [200, 200, 200] })
        });
        let p = ViewParams {
            x: 0,
            y: 0,
            width: 64,
            height: 64,
            flip: true,
            brightness: 1.0,
            contrast: 1.0,
            saturation: 1.0,
            shrink: None,
        };
        let v = apply(&img, &p, 32);
        assert_eq!(v.dimensions(), (32, 32));
        assert_eq!(v.get_pixel(0, 5)[0], 200);
        assert_eq!(v.get_pixel(31, 5)[0], 0);
        // Brightness 1.2 scales every channel; contrast 0 makes every pixel the mean grey.
        let bright = apply(
            &img,
            &ViewParams {
                flip: false,
                brightness: 1.2,
                ..p
            },
            32,
        );
        assert_eq!(bright.get_pixel(31, 5)[0], 240);
        let flat = apply(
            &img,
            &ViewParams {
                flip: false,
                contrast: 0.0,
                ..p
            },
            32,
        );
        assert_eq!(flat.get_pixel(0, 0), flat.get_pixel(31, 31));
        // A crop of the white half only.
        let white = apply(
            &img,
            &ViewParams {
                x: 40,
                width: 20,
                flip: false,
                ..p
            },
            16,
        );
        assert!(white.pixels().all(|q| q[0] == 200));
    }
}
