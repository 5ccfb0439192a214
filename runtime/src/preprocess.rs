//! From a photo file or camera frame to the bytes the model takes: decoding (format from the
//! content, EXIF orientation, any colour model to RGB) and the one shared resize routine.
//!
//! The trainer (`petcam train-and-export`, `petcam evaluate`) uses these same functions, so a
//! photo classified on the device is the photo the model was validated on.

use std::path::Path;

use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};

/// Why one photo could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PhotoError {
    #[error("cannot read: {0}")]
    Io(#[from] std::io::Error),
    #[error("empty file (0 bytes)")]
    Empty,
    #[error("not an image in a supported format (JPEG, PNG, WebP, BMP)")]
    NotAnImage,
    #[error("truncated JPEG (no end-of-image marker)")]
    TruncatedJpeg,
    #[error("cannot decode: {0}")]
    Decode(#[from] image::ImageError),
    #[error("bad camera frame: {0}")]
    CameraFrame(String),
}

/// Decodes a photo's bytes to RGB: format from the content (not the name), EXIF orientation
/// applied, grayscale and CMYK converted, alpha composited over white.
pub fn decode_rgb(bytes: &[u8]) -> Result<RgbImage, PhotoError> {
    if bytes.is_empty() {
        return Err(PhotoError::Empty);
    }
    let reader = ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format()?;
    let format = reader.format().ok_or(PhotoError::NotAnImage)?;
    if !matches!(
        format,
        image::ImageFormat::Jpeg
            | image::ImageFormat::Png
            | image::ImageFormat::WebP
            | image::ImageFormat::Bmp
    ) {
        return Err(PhotoError::NotAnImage);
    }
    // The JPEG decoder is lenient and fills a cut-off file with grey; a photo that lost its end
    // would then train the model on garbage, so require the end-of-image marker.
    if format == image::ImageFormat::Jpeg && !has_jpeg_end(bytes) {
        return Err(PhotoError::TruncatedJpeg);
    }
    let mut decoder = reader.into_decoder()?;
    let orientation = decoder.orientation()?;
    let mut img = DynamicImage::from_decoder(decoder)?;
    img.apply_orientation(orientation);
    Ok(to_rgb(img))
}

/// Reads and decodes a photo file.
pub fn load_rgb(path: &Path) -> Result<RgbImage, PhotoError> {
    decode_rgb(&std::fs::read(path)?)
}

fn has_jpeg_end(bytes: &[u8]) -> bool {
    // Some cameras append padding after the marker; look at the tail, not only the last 2 bytes.
    let tail = &bytes[bytes.len().saturating_sub(4096)..];
    tail.windows(2).any(|w| w == [0xFF, 0xD9])
}

fn to_rgb(img: DynamicImage) -> RgbImage {
    if !img.color().has_alpha() {
        return img.into_rgb8();
    }
    let rgba = img.into_rgba8();
    let mut out = RgbImage::new(rgba.width(), rgba.height());
    for (o, p) in out.pixels_mut().zip(rgba.pixels()) {
        let a = p[3] as u32;
        for c in 0..3 {
            o[c] = ((p[c] as u32 * a + 255 * (255 - a) + 127) / 255) as u8;
        }
    }
    out
}

/// Decodes a photo and resizes it to the network input with the one shared resize routine.
pub fn load_input(path: &Path, width: u32, height: u32) -> Result<RgbImage, PhotoError> {
    let img = load_rgb(path)?;
    Ok(resize(&img, width, height))
}

/// The shared resize (`petcam_shared::preprocess`), on an `RgbImage`.
pub fn resize(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let out = petcam_shared::preprocess::resize_rgb(img.as_raw(), w, h, width, height)
        .expect("an RgbImage always has width * height * 3 bytes");
    RgbImage::from_raw(width, height, out).expect("resize returns width * height * 3 bytes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageEncoder, Rgb, Rgba, RgbaImage};

    fn jpeg_bytes(img: &RgbImage) -> Vec<u8> {
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
            .write_image(
                img.as_raw(),
                img.width(),
                img.height(),
                image::ExtendedColorType::Rgb8,
            )
            .unwrap();
        out
    }

    fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            Rgb([(x * 255 / w) as u8, (y * 255 / h) as u8, 128])
        })
    }

    #[test]
    fn bad_files_are_told_apart() {
        let jpg = jpeg_bytes(&gradient(64, 48));
        assert!(matches!(decode_rgb(&[]), Err(PhotoError::Empty)));
        assert!(matches!(
            decode_rgb(b"just some notes\n"),
            Err(PhotoError::NotAnImage)
        ));
        assert!(matches!(
            decode_rgb(&jpg[..jpg.len() / 2]),
            Err(PhotoError::TruncatedJpeg)
        ));
        // A PNG cut in half fails in the decoder itself.
        let mut png = Vec::new();
        image::codecs::png::PngEncoder::new(&mut png)
            .write_image(
                gradient(64, 48).as_raw(),
                64,
                48,
                image::ExtendedColorType::Rgb8,
            )
            .unwrap();
        assert!(decode_rgb(&png[..png.len() / 2]).is_err());
        assert_eq!(decode_rgb(&jpg).unwrap().dimensions(), (64, 48));
    }

    #[test]
    fn every_format_and_colour_model_becomes_rgb() {
        let rgb = gradient(32, 24);
        let gray = DynamicImage::ImageRgb8(rgb.clone()).into_luma8();
        let mut rgba = RgbaImage::from_fn(32, 24, |_, _| Rgba([10, 20, 30, 255]));
        rgba.put_pixel(0, 0, Rgba([0, 0, 0, 0])); // fully transparent: becomes white

        let encode = |img: DynamicImage, fmt: image::ImageFormat| {
            let mut out = std::io::Cursor::new(Vec::new());
            img.write_to(&mut out, fmt).unwrap();
            out.into_inner()
        };
        for fmt in [
            image::ImageFormat::Png,
            image::ImageFormat::Bmp,
            image::ImageFormat::WebP,
        ] {
            let got = decode_rgb(&encode(DynamicImage::ImageRgb8(rgb.clone()), fmt)).unwrap();
            assert_eq!(got.dimensions(), (32, 24), "{fmt:?}");
        }
        let g = decode_rgb(&encode(
            DynamicImage::ImageLuma8(gray),
            image::ImageFormat::Png,
        ))
        .unwrap();
        assert_eq!(g.get_pixel(5, 5)[0], g.get_pixel(5, 5)[1]);
        let a = decode_rgb(&encode(
            DynamicImage::ImageRgba8(rgba),
            image::ImageFormat::Png,
        ))
        .unwrap();
        assert_eq!(a.get_pixel(0, 0), &Rgb([255, 255, 255]));
        assert_eq!(a.get_pixel(1, 1), &Rgb([10, 20, 30]));

        // CMYK JPEG (as written by print workflows): decoded to RGB of the right size.
        let cmyk: Vec<u8> = (0..32 * 24).flat_map(|_| [0u8, 255, 255, 0]).collect();
        let mut out = Vec::new();
        jpeg_encoder::Encoder::new(&mut out, 95)
            .encode(&cmyk, 32, 24, jpeg_encoder::ColorType::Cmyk)
            .unwrap();
        let c = decode_rgb(&out).unwrap();
        assert_eq!(c.dimensions(), (32, 24));
        let p = c.get_pixel(16, 12);
        assert!(
            p[0] != p[1] || p[1] != p[2],
            "CMYK red came out grey: {p:?}"
        );
    }

    #[test]
    fn exif_orientation_is_applied() {
        // A 40x20 JPEG tagged "rotate 90 CW" (orientation 6) must come out 20x40.
        let jpg = jpeg_bytes(&gradient(40, 20));
        let exif: &[u8] = &[
            0xFF, 0xE1, 0x00, 0x22, b'E', b'x', b'i', b'f', 0, 0, // APP1 header, length 34
            b'I', b'I', 0x2A, 0x00, 0x08, 0x00, 0x00, 0x00, // TIFF header, IFD at 8
            0x01, 0x00, // one entry
            0x12, 0x01, 0x03, 0x00, 0x01, 0x00, 0x00, 0x00, 0x06, 0x00, 0x00,
            0x00, // Orientation = 6
            0x00, 0x00, 0x00, 0x00, // no next IFD
        ];
        let mut tagged = jpg[..2].to_vec(); // SOI
        tagged.extend_from_slice(exif);
        tagged.extend_from_slice(&jpg[2..]);
        assert_eq!(decode_rgb(&tagged).unwrap().dimensions(), (20, 40));
    }
}
