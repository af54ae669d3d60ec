//! Image input for CNN models: decode PNG or JPEG, resize (and center-crop) to the model's input,
//! normalise per channel, lay out as NHWC f32 — as the model file's `input` says.

use std::path::Path;

use image::imageops::FilterType;

use crate::error::{Error, Result};
use crate::models::cnn::ImageInput;

/// Decodes the image at `path` and returns `height * width * channels` normalised values (HWC).
pub fn load_image(path: &Path, input: &ImageInput) -> Result<Vec<f32>> {
    let img = image::ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?
        .decode()
        .map_err(|e| Error::format(path, format!("cannot decode the image: {e}")))?;
    preprocess(&img, input).map_err(|r| Error::format(path, r))
}

/// Resizes, crops and normalises a decoded image (bilinear filtering).
pub fn preprocess(
    img: &image::DynamicImage,
    input: &ImageInput,
) -> std::result::Result<Vec<f32>, String> {
    let (h, w) = (input.height as u32, input.width as u32);
    let resized = match input.resize_shorter {
        // Already the model's size (e.g. pre-cropped): the pixels are used as they are.
        None if img.width() == w && img.height() == h => img.clone(),
        Some(s) => {
            // Shorter side to `s`, then the center h x w.
            let (iw, ih) = (img.width().max(1), img.height().max(1));
            let scale = s as f64 / iw.min(ih) as f64;
            let (nw, nh) = (
                ((iw as f64 * scale).round() as u32).max(w),
                ((ih as f64 * scale).round() as u32).max(h),
            );
            let r = img.resize_exact(nw, nh, FilterType::Triangle);
            r.crop_imm((nw - w) / 2, (nh - h) / 2, w, h)
        }
        None => img.resize_exact(w, h, FilterType::Triangle),
    };
    let pixels: Vec<u8> = match input.channels {
        1 => resized.to_luma8().into_raw(),
        3 => resized.to_rgb8().into_raw(),
        c => {
            return Err(format!(
                "the model takes {c}-channel images; only 1 (gray) or 3 (RGB) are supported"
            ));
        }
    };
    let c = input.channels;
    Ok(pixels
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
}
