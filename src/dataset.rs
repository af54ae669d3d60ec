//! Input streams read from disk for bootstrap training and profiling: a text file (one input per
//! line) for text models; a folder of images or a `.safetensors` array (`images`: U8
//! `[n, height, width, channels]`, raw pixels) for image models. Only the prefix asked for is
//! decoded (the bootstrap set is the first 10% of a stream by default).

use std::path::Path;

use crate::backbone::{Backbone, BatchInput};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::models::cnn::ImageInput;

/// Inputs in stream order.
#[derive(Clone, Debug)]
pub enum Inputs {
    Texts(Vec<String>),
    /// Normalised HWC pixels, `per_image` values each.
    Images {
        pixels: Vec<f32>,
        count: usize,
        per_image: usize,
    },
}

impl Inputs {
    /// One input for timing runs when no data is given: a text of about `seq` tokens
    /// (`[CLS] a a ... [SEP]`, one token per word in an uncased WordPiece vocabulary), or a
    /// blank image.
    pub fn synthetic<B: Backend>(backbone: &Backbone<B>, seq: usize) -> Inputs {
        match backbone.image_input() {
            Some(i) => Inputs::Images {
                pixels: vec![0.0; i.height * i.width * i.channels],
                count: 1,
                per_image: i.height * i.width * i.channels,
            },
            None => Inputs::Texts(vec![vec!["a"; seq.saturating_sub(2).max(1)].join(" ")]),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Inputs::Texts(t) => t.len(),
            Inputs::Images { count, .. } => *count,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Inputs `range` as one batch for `backbone`.
    pub fn batch<B: Backend>(
        &self,
        backbone: &Backbone<B>,
        range: std::ops::Range<usize>,
    ) -> Result<BatchInput> {
        match self {
            Inputs::Texts(t) => {
                let refs: Vec<&str> = t[range].iter().map(String::as_str).collect();
                backbone.prepare_texts(&refs)
            }
            Inputs::Images {
                pixels, per_image, ..
            } => backbone.prepare_images(
                pixels[range.start * per_image..range.end * per_image].to_vec(),
                range.len(),
            ),
        }
    }

    /// The inputs `range` (a split of the stream).
    pub fn slice(&self, range: std::ops::Range<usize>) -> Inputs {
        match self {
            Inputs::Texts(t) => Inputs::Texts(t[range].to_vec()),
            Inputs::Images {
                pixels, per_image, ..
            } => Inputs::Images {
                pixels: pixels[range.start * per_image..range.end * per_image].to_vec(),
                count: range.len(),
                per_image: *per_image,
            },
        }
    }
}

/// Which first part of a stream to read.
#[derive(Copy, Clone, Debug, PartialEq)]
pub enum Prefix {
    /// This fraction (0 < f <= 1) of it, rounded up (the bootstrap set: 0.1).
    Fraction(f64),
    /// At most this many inputs.
    Count(usize),
}

impl Prefix {
    /// How many of `total` inputs the prefix holds (at least one when the stream is not empty).
    pub fn len(self, total: usize) -> usize {
        let n = match self {
            Prefix::Fraction(f) => (total as f64 * f).ceil() as usize,
            Prefix::Count(n) => n,
        };
        n.clamp(total.min(1), total)
    }
}

/// Reads the `prefix` of the stream at `path` as inputs for a model taking `image` input
/// (`None`: a text model). `progress(done, total)` is called while images decode.
pub fn load_stream(
    path: &Path,
    image: Option<&ImageInput>,
    prefix: Prefix,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Inputs> {
    match prefix {
        Prefix::Fraction(f) if !(f > 0.0 && f <= 1.0) => {
            return Err(Error::Input(format!(
                "the fraction of the stream to read must be in (0, 1], not {f}"
            )));
        }
        Prefix::Count(0) => return Err(Error::Input("asked for 0 inputs of the stream".into())),
        _ => {}
    }
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let inputs = match image {
        None => {
            if meta.is_dir() {
                return Err(Error::Input(format!(
                    "{} is a folder; a text model reads a text file with one input per line",
                    path.display()
                )));
            }
            let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
            let text = String::from_utf8(bytes).map_err(|_| {
                Error::format(
                    path,
                    "not UTF-8 text; a text model reads a text file with one input per line",
                )
            })?;
            if text.contains('\0') {
                return Err(Error::format(
                    path,
                    "holds NUL bytes: a binary file, not one text per line",
                ));
            }
            let lines: Vec<String> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect();
            let n = prefix.len(lines.len());
            Inputs::Texts(lines.into_iter().take(n).collect())
        }
        Some(input) if meta.is_dir() => load_image_folder(path, input, prefix, progress)?,
        Some(input) => load_image_array(path, input, prefix)?,
    };
    if inputs.is_empty() {
        return Err(Error::Input(format!("{} holds no inputs", path.display())));
    }
    Ok(inputs)
}

fn load_image_folder(
    dir: &Path,
    input: &ImageInput,
    prefix: Prefix,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Inputs> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
        })
        .collect();
    if files.is_empty() {
        return Err(Error::Input(format!(
            "{} holds no .png/.jpg/.jpeg images",
            dir.display()
        )));
    }
    // Stream order = file name order.
    files.sort();
    let n = prefix.len(files.len());
    let per_image = input.height * input.width * input.channels;
    let mut pixels = Vec::with_capacity(n * per_image);
    for (i, f) in files.iter().take(n).enumerate() {
        pixels.extend(crate::vision::load_image(f, input)?);
        progress(i + 1, n);
    }
    Ok(Inputs::Images {
        pixels,
        count: n,
        per_image,
    })
}

fn load_image_array(path: &Path, input: &ImageInput, prefix: Prefix) -> Result<Inputs> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
        Error::format(
            path,
            format!(
                "an image model reads a folder of images or a .safetensors file with an \
                 `images` tensor; this is neither ({e})"
            ),
        )
    })?;
    let t = st.tensor("images").map_err(|_| {
        Error::format(
            path,
            "no `images` tensor (expected U8 [n, height, width, channels])",
        )
    })?;
    let want = [input.height, input.width, input.channels];
    if t.dtype() != safetensors::Dtype::U8 || t.shape().len() != 4 || t.shape()[1..] != want {
        return Err(Error::format(
            path,
            format!(
                "`images` is {:?} {:?}; the model takes U8 [n, {}, {}, {}]",
                t.dtype(),
                t.shape(),
                want[0],
                want[1],
                want[2]
            ),
        ));
    }
    let total = t.shape()[0];
    let n = prefix.len(total);
    let per_image = want.iter().product::<usize>();
    let c = input.channels;
    let pixels = t.data()[..n * per_image]
        .iter()
        .enumerate()
        .map(|(i, &p)| (p as f32 / 255.0 - input.mean[i % c]) / input.std[i % c])
        .collect();
    Ok(Inputs::Images {
        pixels,
        count: n,
        per_image,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_is_at_least_one_and_at_most_all() {
        let f = Prefix::Fraction;
        assert_eq!(f(0.1).len(0), 0);
        assert_eq!(f(0.1).len(5), 1);
        assert_eq!(f(0.1).len(100), 10);
        assert_eq!(f(0.1).len(101), 11);
        assert_eq!(f(1.0).len(7), 7);
        assert_eq!(Prefix::Count(16).len(7), 7);
        assert_eq!(Prefix::Count(16).len(70), 16);
    }
}
