//! `apparate inspect`: a model file's metadata, stages, ramp points and tensors; or a GGUF
//! file's metadata and tensor table (what `convert` would read).

use std::path::PathBuf;

use apparate::Result;
use apparate::format::{Family, ModelFile, ModelMeta, Preprocessing};
use apparate::gguf::{GgufFile, Value};
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
    if apparate::generation::is_gguf(&a.file) {
        inspect_gguf(&a.file, a.tensors)
    } else {
        inspect(&a.file, a.tensors)
    }
}

/// "  tensors: N (P M parameters; n TYPE, x MB; ...)": the summary line of both kinds of file.
fn tensor_summary(
    count: usize,
    params: f64,
    by_type: &std::collections::BTreeMap<&str, (usize, usize)>,
) -> String {
    format!(
        "  tensors: {count} ({:.2} M parameters; {})",
        params / 1e6,
        by_type
            .iter()
            .map(|(d, (n, b))| format!("{n} {d}, {:.1} MB", *b as f64 / 1e6))
            .collect::<Vec<_>>()
            .join("; ")
    )
}

/// A metadata value in one line: scalars as they are, long strings and arrays abridged.
fn show_value(v: &Value) -> String {
    const MAX: usize = 80;
    match v {
        Value::String(s) if s.chars().count() > MAX => {
            let head: String = s.chars().take(MAX).collect();
            format!("{head:?}... ({} characters)", s.chars().count())
        }
        Value::String(s) => format!("{s:?}"),
        Value::Array(items) => {
            let kind = items.first().map_or("empty", Value::type_name);
            let first: Vec<String> = items.iter().take(4).map(show_value).collect();
            format!(
                "[{} {kind}: {}{}]",
                items.len(),
                first.join(", "),
                if items.len() > 4 { ", ..." } else { "" }
            )
        }
        Value::Bool(b) => b.to_string(),
        Value::F32(x) => x.to_string(),
        Value::F64(x) => x.to_string(),
        Value::U8(x) => x.to_string(),
        Value::I8(x) => x.to_string(),
        Value::U16(x) => x.to_string(),
        Value::I16(x) => x.to_string(),
        Value::U32(x) => x.to_string(),
        Value::I32(x) => x.to_string(),
        Value::U64(x) => x.to_string(),
        Value::I64(x) => x.to_string(),
    }
}

fn inspect_gguf(path: &std::path::Path, all: bool) -> Result<()> {
    let g = GgufFile::open(path)?;
    let mut out = String::new();
    outln!(out, "{}", path.display());
    outln!(
        out,
        "  GGUF version {}, alignment {}, architecture {}, tensor data from byte {}",
        g.version(),
        g.alignment(),
        g.architecture().unwrap_or("(none given)"),
        g.data_start()
    );
    outln!(out, "  metadata ({} entries):", g.metadata().len());
    for (k, v) in g.metadata() {
        outln!(out, "    {k:<44} {}", show_value(v));
    }
    let mut by_type = std::collections::BTreeMap::<&str, (usize, usize)>::new();
    for t in g.tensors() {
        let e = by_type.entry(t.ggml_type.name()).or_default();
        e.0 += 1;
        e.1 += t.range.len();
    }
    let params: u64 = g.tensors().iter().map(|t| t.elements()).sum();
    outln!(
        out,
        "{}",
        tensor_summary(g.tensors().len(), params as f64, &by_type)
    );
    if all {
        for t in g.tensors() {
            outln!(
                out,
                "    {:<40} {:<5} {:<14} {:>10} bytes",
                t.name,
                t.ggml_type.name(),
                format!("{:?}", t.shape()),
                t.range.len()
            );
        }
    }
    emit(&out)
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
        Family::Llama(c) => format!(
            "family llama: {} blocks, width {}, ffn {}, {} heads ({} key/value) of {}, vocabulary {}, context {}, rope base {}, eps {:e}; {} head; {}",
            c.blocks,
            c.width,
            c.ffn,
            c.heads,
            c.kv_heads,
            c.head_dim,
            c.vocab,
            c.context,
            c.rope_base,
            c.eps,
            if c.tied { "tied" } else { "separate" },
            if c.chat_template.is_some() {
                "chat template"
            } else {
                "no chat template"
            }
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
        None if matches!(m.family, Family::Llama(_)) => {}
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
        let e = by_dtype
            .entry(t.blocks.map_or(t.dtype.name(), |b| b.name()))
            .or_default();
        e.0 += 1;
        e.1 += t.range.len();
    }
    let params: usize = f
        .tensors()
        .map(|(_, t)| t.shape.iter().product::<usize>())
        .sum();
    outln!(
        out,
        "{}",
        tensor_summary(f.tensors().count(), params as f64, &by_dtype)
    );
    if all {
        for (name, t) in f.tensors() {
            outln!(
                out,
                "    {name:<40} {:<5} {:<14} {:>10} bytes",
                t.blocks.map_or(t.dtype.name(), |b| b.name()),
                format!("{:?}", t.shape),
                t.range.len()
            );
        }
    }
    emit(&out)
}
