//! Image input for CNN models: decode PNG or JPEG, resize (and center-crop) to the model's input,
//! normalise per channel, lay out as NHWC f32 — as the model file's `input` says.
//!
//! The geometry follows torchvision's `Resize(s)` + `CenterCrop` on a PIL image, since that is
//! how the models we convert were evaluated: the shorter side becomes `s` and the longer one
//! `int(s * long / short)` (truncated, not rounded), filtering is bilinear with a support that
//! widens when shrinking (antialiased, as PIL does), and the crop's offset is
//! `round((size - crop) / 2)` with Python's round-half-to-even. `tests/golden_efficientnet.rs`
//! checks the whole chain against PIL + torchvision on photos.
//!
//! An image file's header is read before any pixel is decoded, and files whose decoded or resized
//! pixels would exceed [`ImageLimits`] are refused: a 275-byte PNG can declare 200000 x 1 pixels,
//! which, resized so its shorter side is 256, would need 13 GB.

use std::path::Path;

use image::imageops::FilterType;
use image::{DynamicImage, ImageDecoder};

use crate::error::{Error, Result};
use crate::models::cnn::ImageInput;

/// What an image file may ask for before it is refused.
#[derive(Copy, Clone, Debug, PartialEq)]
pub struct ImageLimits {
    /// Most pixels (width x height) of the decoded image, and of the image after the resize.
    pub max_pixels: u64,
    /// Most the longer side may be of the shorter one; beyond it a resize to the model's input
    /// would keep almost nothing of the picture (or, with a shorter-side resize, blow up).
    pub max_aspect_ratio: f64,
}

impl Default for ImageLimits {
    /// 50 megapixels (a large camera photo; 200 MB as RGBA), aspect ratios up to 20:1.
    fn default() -> ImageLimits {
        ImageLimits {
            max_pixels: 50_000_000,
            max_aspect_ratio: 20.0,
        }
    }
}

impl ImageLimits {
    /// Refuses an image of `width x height` pixels that would need more than the limits, before
    /// anything is allocated for it. `resized` is the size the model's preprocessing resizes it
    /// to, if any.
    pub fn check(
        &self,
        width: u32,
        height: u32,
        resized: Option<(u32, u32)>,
    ) -> std::result::Result<(), String> {
        if width == 0 || height == 0 {
            return Err(format!(
                "the image is {width}x{height} pixels: it has no pixels"
            ));
        }
        let pixels = width as u64 * height as u64;
        if pixels > self.max_pixels {
            return Err(format!(
                "the image is {width}x{height} pixels ({:.1} megapixels); at most {:.1} megapixels are decoded",
                pixels as f64 / 1e6,
                self.max_pixels as f64 / 1e6
            ));
        }
        let aspect = width.max(height) as f64 / width.min(height) as f64;
        // A NaN limit refuses rather than accepts everything.
        if self.max_aspect_ratio.is_nan() || aspect > self.max_aspect_ratio {
            return Err(format!(
                "the image is {width}x{height} pixels: an aspect ratio of {aspect:.0}:1 is more than the {}:1 accepted",
                self.max_aspect_ratio
            ));
        }
        if let Some((w, h)) = resized
            && w as u64 * h as u64 > self.max_pixels
        {
            return Err(format!(
                "the image is {width}x{height} pixels; resized for the model it would be {w}x{h}, more than {:.1} megapixels",
                self.max_pixels as f64 / 1e6
            ));
        }
        Ok(())
    }
}

/// Decodes the image at `path` and returns `height * width * channels` normalised values (HWC),
/// within the default [`ImageLimits`].
pub fn load_image(path: &Path, input: &ImageInput) -> Result<Vec<f32>> {
    load_image_with(path, input, &ImageLimits::default())
}

/// [`load_image`] with explicit limits.
pub fn load_image_with(path: &Path, input: &ImageInput, limits: &ImageLimits) -> Result<Vec<f32>> {
    let img = decode_within(path, input, limits)?;
    preprocess(&img, input).map_err(|r| Error::format(path, r))
}

/// The bytes of an image file (PNG or JPEG, as a client sends them), decoded and prepared as
/// [`load_image_with`] prepares a file: `height * width * channels` normalised values (HWC).
/// The error says what is wrong with the image.
pub fn image_from_bytes(
    bytes: &[u8],
    input: &ImageInput,
    limits: &ImageLimits,
) -> std::result::Result<Vec<f32>, String> {
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| format!("cannot read the image: {e}"))?;
    let img = decode_checked(reader, input, limits)?;
    preprocess(&img, input)
}

/// Reads the header, checks the dimensions against `limits` (and against what the resize for
/// `input` would make of them), and only then decodes.
fn decode_within(path: &Path, input: &ImageInput, limits: &ImageLimits) -> Result<DynamicImage> {
    let reader = image::ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    decode_checked(reader, input, limits).map_err(|r| Error::format(path, r))
}

fn decode_checked<R: std::io::BufRead + std::io::Seek>(
    mut reader: image::ImageReader<R>,
    input: &ImageInput,
    limits: &ImageLimits,
) -> std::result::Result<DynamicImage, String> {
    // The decoder's own limits back up the check below for formats whose header lies about the
    // size: 8 bytes per pixel covers 16-bit RGBA, the widest format we decode.
    let mut decoder_limits = image::Limits::default();
    decoder_limits.max_alloc = Some(limits.max_pixels.saturating_mul(8));
    reader.limits(decoder_limits);
    let decoder = reader
        .into_decoder()
        .map_err(|e| format!("cannot decode the image: {e}"))?;
    let (w, h) = decoder.dimensions();
    let resized = (w > 0 && h > 0).then(|| resize_size(w, h, input));
    limits.check(w, h, resized)?;
    DynamicImage::from_decoder(decoder).map_err(|e| format!("cannot decode the image: {e}"))
}

/// The size an image of `w x h` is resized to for `input`: torchvision's `Resize(s)` when the
/// model names a shorter side (the longer side is truncated, as `int(s * long / short)`), else
/// the input size itself. Never smaller than the crop.
pub fn resize_size(w: u32, h: u32, input: &ImageInput) -> (u32, u32) {
    let (cw, ch) = (input.width as u32, input.height as u32);
    match input.resize_shorter {
        None => (cw, ch),
        Some(s) => {
            let s = s as u64;
            let (w64, h64) = (w.max(1) as u64, h.max(1) as u64);
            // Integer division is Python's `int(s * long / short)` without the float rounding.
            let (nw, nh) = if w64 <= h64 {
                (s, s.saturating_mul(h64) / w64)
            } else {
                (s.saturating_mul(w64) / h64, s)
            };
            let clamp = |v: u64| v.min(u32::MAX as u64) as u32;
            (clamp(nw).max(cw), clamp(nh).max(ch))
        }
    }
}

/// torchvision's center-crop offset: `int(round(excess / 2))`, Python rounding half to even.
fn crop_offset(excess: u32) -> u32 {
    let half = excess / 2;
    if excess % 2 == 1 && half % 2 == 1 {
        half + 1
    } else {
        half
    }
}

/// Resizes, crops and normalises a decoded image (bilinear filtering, antialiased when
/// shrinking). Channels are converted first, as `PIL.Image.convert("RGB")` before the transforms.
fn preprocess(img: &DynamicImage, input: &ImageInput) -> std::result::Result<Vec<f32>, String> {
    let (w, h) = (input.width as u32, input.height as u32);
    let img = match input.channels {
        1 => DynamicImage::ImageLuma8(img.to_luma8()),
        3 => DynamicImage::ImageRgb8(img.to_rgb8()),
        c => {
            return Err(format!(
                "the model takes {c}-channel images; only 1 (gray) or 3 (RGB) are supported"
            ));
        }
    };
    let (nw, nh) = resize_size(img.width(), img.height(), input);
    let resized = if (nw, nh) == (img.width(), img.height()) {
        // Already that size (e.g. pre-cropped): the pixels are used as they are.
        img
    } else {
        img.resize_exact(nw, nh, FilterType::Triangle)
    };
    let cropped = if (nw, nh) == (w, h) {
        resized
    } else {
        resized.crop_imm(crop_offset(nw - w), crop_offset(nh - h), w, h)
    };
    let c = input.channels;
    Ok(cropped
        .as_bytes()
        .iter()
        .enumerate()
        .map(|(i, &p)| (p as f32 / 255.0 - input.mean[i % c]) / input.std[i % c])
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(resize_shorter: Option<usize>, channels: usize) -> ImageInput {
        ImageInput {
            height: 4,
            width: 4,
            channels,
            resize_shorter,
            mean: vec![0.5; channels],
            std: vec![0.5; channels],
        }
    }

    #[test]
    fn normalises_and_lays_out_hwc() {
        let img = image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(8, 6, |x, _| {
            image::Rgb([255, 0, if x < 4 { 0 } else { 255 }])
        }));
        let v = preprocess(&img, &input(Some(4), 3)).unwrap();
        assert_eq!(v.len(), 4 * 4 * 3);
        // Red is 255 everywhere -> (1 - 0.5) / 0.5 = 1; green 0 -> -1.
        assert!(
            v.chunks(3)
                .all(|p| (p[0] - 1.0).abs() < 1e-6 && (p[1] + 1.0).abs() < 1e-6)
        );
        let gray = preprocess(&img, &input(None, 1)).unwrap();
        assert_eq!(gray.len(), 16);
    }

    #[test]
    fn bad_files_are_errors_naming_them() {
        let dir = std::env::temp_dir().join(format!("apparate-vision-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("not-an-image.png");
        std::fs::write(&p, b"hello").unwrap();
        let e = load_image(&p, &input(None, 3)).unwrap_err().to_string();
        assert!(
            e.contains("not-an-image.png") && e.contains("decode"),
            "{e}"
        );
        let e = load_image(&dir.join("missing.jpg"), &input(None, 3))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.jpg"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn write_png(path: &Path, w: u32, h: u32) {
        let img = image::GrayImage::new(w, h);
        img.save(path).unwrap();
    }

    #[test]
    fn a_tiny_file_declaring_a_huge_aspect_ratio_is_refused_before_decoding() {
        let dir = std::env::temp_dir().join(format!("apparate-vision-wide-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("wide.png");
        write_png(&p, 200_000, 1);
        assert!(std::fs::metadata(&p).unwrap().len() < 2000);
        let mut inp = input(Some(256), 3);
        inp.height = 224;
        inp.width = 224;
        inp.mean = vec![0.5; 3];
        inp.std = vec![0.5; 3];
        let t = std::time::Instant::now();
        let e = load_image(&p, &inp).unwrap_err().to_string();
        assert!(
            t.elapsed() < std::time::Duration::from_secs(2),
            "{:?}",
            t.elapsed()
        );
        assert!(
            e.contains("wide.png") && e.contains("200000x1") && e.contains("aspect ratio"),
            "{e}"
        );
        // Within the aspect ratio, the resized size is capped too.
        let loose = ImageLimits {
            max_aspect_ratio: f64::INFINITY,
            ..ImageLimits::default()
        };
        let e = load_image_with(&p, &inp, &loose).unwrap_err().to_string();
        assert!(
            e.contains("resized for the model it would be 51200000x256"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn decoded_pixels_are_capped() {
        let l = ImageLimits::default();
        assert!(l.check(9000, 6000, None).is_err());
        assert!(l.check(6000, 4000, Some((384, 256))).is_ok());
        assert!(l.check(0, 5, None).is_err());
        let e = l.check(10_000, 10_000, None).unwrap_err();
        assert!(e.contains("100.0 megapixels") && e.contains("50.0"), "{e}");
    }

    #[test]
    fn geometry_follows_torchvision() {
        let mut inp = input(Some(256), 3);
        inp.height = 224;
        inp.width = 224;
        // int(256 * 451 / 300) = 384 (a rounding resize would give 385).
        assert_eq!(resize_size(451, 300, &inp), (384, 256));
        assert_eq!(resize_size(300, 451, &inp), (256, 384));
        assert_eq!(resize_size(512, 512, &inp), (256, 256));
        // round(80.5) = 80 and round(81.5) = 82 in Python.
        assert_eq!(crop_offset(161), 80);
        assert_eq!(crop_offset(163), 82);
        assert_eq!(crop_offset(160), 80);
        assert_eq!(crop_offset(0), 0);
    }
}
