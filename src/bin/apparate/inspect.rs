//! `apparate inspect`: a model file's metadata, stages, ramp points and tensors.

use std::path::PathBuf;

use apparate::Result;
use apparate::format::{Family, ModelFile, ModelMeta, Preprocessing};
use clap::Args;

use super::emit;

#[derive(Args)]
pub struct InspectArgs {
    file: PathBuf,
    /// List every tensor (default: a summary).
    #[arg(long)]
    tensors: bool,
}

pub fn run(a: InspectArgs) -> Result<()> {
    inspect(&a.file, a.tensors)
}

/// One line on a model's family and shape.
pub fn describe_family(m: &ModelMeta) -> String {
    match &m.family {
        Family::Bert(c) => format!(
            "family bert: {} layers, hidden {}, {} heads (dim {}), ffn {}, vocab {}, positions {}, eps {:e}; {:?} pooling{}{}{}",
            c.num_layers,
            c.hidden_size,
            c.num_heads,
            c.head_dim(),
            c.intermediate_size,
            c.vocab_size,
            c.max_position_embeddings,
            c.layer_norm_eps,
            c.pooling,
            if c.normalize { ", L2 normalized" } else { "" },
            if c.has_pooler {
                ", has BERT pooler"
            } else {
                ""
            },
            m.head
                .as_ref()
                .map(|h| format!(", head with {} classes", h.labels.len()))
                .unwrap_or_default()
        ),
        Family::Cnn(c) => format!(
            "family cnn ({}): {} blocks, {} classes, input {}x{}x{}",
            c.arch,
            c.blocks.len(),
            c.classes(),
            c.input.height,
            c.input.width,
            c.input.channels
        ),
    }
}

fn inspect(path: &PathBuf, all: bool) -> Result<()> {
    let f = ModelFile::open(path)?;
    let mut out = String::new();
    let m = f.meta();
    outln!(out, "{}", path.display());
    outln!(
        out,
        "  format version {}, {:.1} MB, sha256 {}",
        m.format_version,
        f.file_size() as f64 / 1e6,
        f.sha256()
    );
    outln!(out, "  {}", describe_family(m));
    match &m.preprocessing {
        Preprocessing::Text {
            tokenizer_entry,
            max_length,
        } => outln!(
            out,
            "  preprocessing: tokenizer `{tokenizer_entry}` ({:.0} KB), truncation at {max_length} tokens",
            f.tokenizer_json().len() as f64 / 1e3
        ),
        Preprocessing::Image {} => {
            if let Family::Cnn(c) = &m.family {
                let i = &c.input;
                // The file stores mean/std of 0..1 pixels; on 0..255 ones they read as the
                // constants papers give ((x - 127) / 128 for EfficientNet-Lite).
                let per_channel: Vec<String> = i
                    .mean
                    .iter()
                    .zip(&i.std)
                    .map(|(m, s)| format!("(x - {:.3}) / {:.3}", m * 255.0, s * 255.0))
                    .collect();
                outln!(
                    out,
                    "  preprocessing: image {}x{}x{}{}, mean {:?}, std {:?} of 0..1 pixels, i.e. {} on 0..255 ones",
                    i.height,
                    i.width,
                    i.channels,
                    i.resize_shorter
                        .map(|r| format!(" (shorter side resized to {r}, center crop)"))
                        .unwrap_or_default(),
                    i.mean,
                    i.std,
                    per_channel.join(", ")
                );
            }
        }
    }
    match &m.head {
        Some(h) => outln!(
            out,
            "  head: {} classes ({}{})",
            h.labels.len(),
            h.labels
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join(", "),
            if h.labels.len() > 5 { ", ..." } else { "" }
        ),
        None => outln!(out, "  head: none (embeddings only)"),
    }
    let stages: Vec<&str> = m.graph.stages.iter().map(|s| s.name.as_str()).collect();
    outln!(out, "  stages: {}", stages.join(" -> "));
    outln!(
        out,
        "  ramp-eligible points: {}",
        m.graph.ramp_points.join(", ")
    );
    for p in &m.provenance {
        outln!(out, "  source: {} (sha256 {})", p.source, p.sha256);
    }
    let mut by_dtype = std::collections::BTreeMap::<&str, (usize, usize)>::new();
    for (_, t) in f.tensors() {
        let e = by_dtype.entry(t.dtype.name()).or_default();
        e.0 += 1;
        e.1 += t.range.len();
    }
    let params: usize = f
        .tensors()
        .map(|(_, t)| t.shape.iter().product::<usize>())
        .sum();
    outln!(
        out,
        "  tensors: {} ({:.2} M parameters; {})",
        f.tensors().count(),
        params as f64 / 1e6,
        by_dtype
            .iter()
            .map(|(d, (n, b))| format!("{n} {d}, {:.1} MB", *b as f64 / 1e6))
            .collect::<Vec<_>>()
            .join("; ")
    );
    if all {
        for (name, t) in f.tensors() {
            outln!(
                out,
                "    {name:<40} {:<5} {:<14} {:>10} bytes",
                t.dtype.name(),
                format!("{:?}", t.shape),
                t.range.len()
            );
        }
    }
    emit(&out)
}
