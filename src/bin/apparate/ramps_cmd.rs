//! `apparate train-ramps` and `apparate profile`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use apparate::backbone::Backbone;
use apparate::backend::Backend;
use apparate::dataset::{Prefix, load_stream};
use apparate::format::{ModelFile, RampsFile, sha256_hex};
use apparate::profile::{ProfileConfig, measure};
use apparate::ramps::Ramps;
use apparate::ramps::bootstrap::{BootstrapConfig, BootstrapReport, train_ramps};
use apparate::select::{BackendJob, with_backend};
use apparate::{Error, Result};
use clap::Args;

use super::progress::ProgressBar;
use super::{DeviceArgs, MAX_BATCH, check_count, check_fraction, create_output, emit, ms};

#[derive(Args)]
pub struct TrainRampsArgs {
    /// Model file (with a classifier head).
    #[arg(short, long)]
    model: PathBuf,
    /// The stream: a text file with one input per line (text models), a folder of images or
    /// a .safetensors file with `images` U8 [n, h, w, c] (image models).
    #[arg(long)]
    data: PathBuf,
    /// Output ramps file (default: the model's path with the extension `.ramps`).
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Write the report (agreements, exit curves, timings) as JSON here too.
    #[arg(long)]
    report: Option<PathBuf>,
    /// The bootstrap set is this first fraction of the stream.
    #[arg(long, default_value_t = 0.1)]
    bootstrap_fraction: f64,
    /// Fraction of the bootstrap set held out (its end) to measure agreement on.
    #[arg(long, default_value_t = 0.1)]
    holdout_fraction: f64,
    /// Only these points (comma-separated; default: every ramp-eligible point).
    #[arg(long, value_delimiter = ',')]
    points: Option<Vec<String>>,
    /// CNN ramps: average each stage output over a GRID x GRID grid of cells instead of the whole
    /// image (the head reads GRID * GRID * channels cell means). Default: per point, the finest
    /// of 4, 2, 1 that fits the output with at most 1,024 values. 1 is the global average.
    #[arg(long)]
    grid: Option<usize>,
    /// Passes over the training features per head.
    #[arg(long, default_value_t = 60)]
    epochs: usize,
    /// Adam learning rate.
    #[arg(long, default_value_t = 3e-3)]
    learning_rate: f32,
    /// L2 penalty on the heads' weight matrices (default: 1e-4 for linear heads, 1e-2 for
    /// the 2-layer heads of text models).
    #[arg(long)]
    weight_decay: Option<f32>,
    /// Seed of shuffling and initialisation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Inputs per backbone batch while caching features.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    #[command(flatten)]
    device: DeviceArgs,
}

pub fn train_ramps_cmd(a: TrainRampsArgs) -> Result<()> {
    check_fraction("--bootstrap-fraction", a.bootstrap_fraction)?;
    check_fraction("--holdout-fraction", a.holdout_fraction)?;
    check_count("--epochs", a.epochs, 1, 100_000)?;
    check_count("--batch-size", a.batch_size, 1, MAX_BATCH)?;
    if let Some(g) = a.grid {
        check_count("--grid", g, 1, 64)?;
    }
    apparate::adapt::config::check_real(
        "--learning-rate",
        a.learning_rate as f64,
        std::ops::Bound::Excluded(0.0),
        std::ops::Bound::Included(1.0),
    )?;
    if let Some(w) = a.weight_decay {
        apparate::adapt::config::check_real(
            "--weight-decay",
            w as f64,
            std::ops::Bound::Included(0.0),
            std::ops::Bound::Included(1.0),
        )?;
    }
    let output = a.output.unwrap_or_else(|| a.model.with_extension("ramps"));
    // Refused now rather than after the training.
    let report = a.report.as_deref().map(create_output).transpose()?;
    let cfg = BootstrapConfig {
        holdout_fraction: a.holdout_fraction,
        batch_size: a.batch_size,
        points: a.points,
        grid: a.grid,
        train: apparate::ramps::train::TrainConfig {
            epochs: a.epochs,
            learning_rate: a.learning_rate,
            weight_decay: a.weight_decay,
            seed: a.seed,
            ..Default::default()
        },
    };
    with_backend(
        &a.device.choice()?,
        TrainRampsJob {
            model: a.model,
            data: a.data,
            output,
            report,
            bootstrap_fraction: a.bootstrap_fraction,
            cfg,
        },
    )
}

/// Trains ramps on the bootstrap prefix of a stream.
struct TrainRampsJob {
    pub model: PathBuf,
    pub data: PathBuf,
    pub output: PathBuf,
    /// Opened before the run, so an unwritable path fails at once.
    pub report: Option<(PathBuf, std::fs::File)>,
    pub bootstrap_fraction: f64,
    pub cfg: BootstrapConfig,
}

impl BackendJob for TrainRampsJob {
    type Output = ();
    fn run<B: Backend + 'static>(self, be: B, what: String) -> Result<()> {
        let t0 = Instant::now();
        let file = ModelFile::open(&self.model)?;
        let backbone = Backbone::load(be, &file)?;
        eprintln!(
            "loaded {} in {} ({what})",
            self.model.display(),
            ms(t0.elapsed())
        );
        let mut bar = ProgressBar::new();
        let inputs = load_stream(
            &self.data,
            backbone.image_input(),
            Prefix::Fraction(self.bootstrap_fraction),
            &mut |d, t| bar.update("decoding", d, t),
        )?;
        eprintln!(
            "bootstrap set: the first {} inputs of {} ({}% of the stream); training at {}",
            inputs.len(),
            self.data.display(),
            self.bootstrap_fraction * 100.0,
            self.cfg
                .points
                .as_ref()
                .map_or("every ramp-eligible point".to_string(), |p| p.join(", "))
        );
        let report = train_ramps(
            &backbone,
            &file,
            &inputs,
            &self.output,
            &self.cfg,
            &mut |phase, d, t| bar.update(phase, d, t),
        )?;
        if let Some((path, file)) = self.report {
            let text = serde_json::to_string_pretty(&report).expect("a report serializes");
            super::write_output(&path, file, &(text + "\n"))?;
        }
        emit(&render_report(&report, &self.output, backbone.labels()))
    }
}

fn render_report(r: &BootstrapReport, out: &Path, labels: &[String]) -> String {
    let mut s = String::new();
    outln!(
        s,
        "wrote {} ({} ramps) for model sha256 {}",
        out.display(),
        r.ramps.len(),
        &r.model_sha256[..12]
    );
    outln!(
        s,
        "{} training inputs, {} held out; features {:.1} s, training {:.1} s, held-out {:.1} s ({})",
        r.train_inputs,
        r.heldout_inputs,
        r.features_seconds,
        r.training_seconds,
        r.heldout_seconds,
        r.backend
    );
    let mut by_count: Vec<(usize, usize)> = r
        .label_counts
        .iter()
        .copied()
        .enumerate()
        .filter(|(_, c)| *c > 0)
        .collect();
    by_count.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut dist: Vec<String> = by_count
        .iter()
        .take(10)
        .map(|(k, c)| format!("{} {c}", labels.get(*k).map_or("?", String::as_str)))
        .collect();
    if by_count.len() > 10 {
        dist.push(format!("... ({} classes in all)", by_count.len()));
    }
    outln!(
        s,
        "model's answers on the bootstrap set: {}",
        dist.join(", ")
    );
    outln!(s, "");
    outln!(
        s,
        "{:<12} {:<18} {:>4} {:>6} {:>10} {:>9}",
        "ramp",
        "head",
        "grid",
        "width",
        "train agr",
        "held agr"
    );
    for x in &r.ramps {
        outln!(
            s,
            "{:<12} {:<18} {:>4} {:>6} {:>9.1}% {:>8.1}%",
            x.point,
            x.head,
            format!("{0}x{0}", x.grid),
            x.width,
            x.train_agreement * 100.0,
            x.heldout_agreement * 100.0
        );
    }
    outln!(s, "");
    outln!(
        s,
        "held-out exit rate / agreement of the exiting inputs, by threshold on u = 1 - max p:"
    );
    let mut head = format!("{:<12}", "ramp");
    if let Some(x) = r.ramps.first() {
        for c in &x.curve {
            head.push_str(&format!(" {:>11}", format!("u<{}", c.threshold)));
        }
    }
    outln!(s, "{head}");
    for x in &r.ramps {
        let mut line = format!("{:<12}", x.point);
        for c in &x.curve {
            line.push_str(&format!(
                " {:>11}",
                format!(
                    "{:.0}%/{:.0}%",
                    c.exit_rate * 100.0,
                    c.exited_agreement * 100.0
                )
            ));
        }
        outln!(s, "{line}");
    }
    s
}

/// Measures stage and ramp costs.
#[derive(Args)]
pub struct ProfileArgs {
    /// Model file.
    #[arg(short, long)]
    model: PathBuf,
    /// Ramps file whose ramps to time too.
    #[arg(long)]
    ramps: Option<PathBuf>,
    /// Inputs to time with (as for train-ramps); default: texts of --seq tokens or blank
    /// images.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Tokens per text when no --data is given.
    #[arg(long, default_value_t = 32)]
    seq: usize,
    /// Output profile (JSON).
    #[arg(short, long)]
    output: PathBuf,
    /// Largest batch size.
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Untimed runs per batch size.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Timed runs per batch size (the median is kept).
    #[arg(long, default_value_t = 10)]
    repeats: usize,
    #[command(flatten)]
    device: DeviceArgs,
}

pub fn profile_cmd(a: ProfileArgs) -> Result<()> {
    check_count("--max-batch", a.max_batch, 1, MAX_BATCH)?;
    check_count("--repeats", a.repeats, 1, 100_000)?;
    check_count("--warmup", a.warmup, 0, 100_000)?;
    check_count("--seq", a.seq, 1, 100_000)?;
    with_backend(
        &a.device.choice()?,
        ProfileJob {
            model: a.model,
            ramps: a.ramps,
            data: a.data,
            seq: a.seq,
            output: a.output,
            cfg: ProfileConfig {
                max_batch: a.max_batch,
                warmup: a.warmup,
                repeats: a.repeats,
            },
        },
    )
}

struct ProfileJob {
    pub model: PathBuf,
    pub ramps: Option<PathBuf>,
    pub data: Option<PathBuf>,
    pub seq: usize,
    pub output: PathBuf,
    pub cfg: ProfileConfig,
}

impl BackendJob for ProfileJob {
    type Output = ();
    fn run<B: Backend + 'static>(self, be: B, what: String) -> Result<()> {
        let t0 = Instant::now();
        let file = ModelFile::open(&self.model)?;
        let backbone = Backbone::load(be, &file)?;
        let ramps_file = self
            .ramps
            .as_ref()
            .map(|p| RampsFile::open(p, &file))
            .transpose()?;
        let ramps = ramps_file
            .as_ref()
            .map(|f| Ramps::load(&backbone, f))
            .transpose()?;
        let ramps_sha = match &self.ramps {
            Some(p) => Some(sha256_hex(&std::fs::read(p).map_err(|e| Error::Io {
                path: p.clone(),
                source: e,
            })?)),
            None => None,
        };
        eprintln!(
            "loaded {} in {} ({what})",
            self.model.display(),
            ms(t0.elapsed())
        );
        let inputs = match &self.data {
            Some(path) => {
                // The largest batch is filled from the stream's first inputs.
                let mut bar = ProgressBar::new();
                load_stream(
                    path,
                    backbone.image_input(),
                    Prefix::Count(self.cfg.max_batch),
                    &mut |d, t| bar.update("decoding", d, t),
                )?
            }
            None => apparate::dataset::Inputs::synthetic(&backbone, self.seq),
        };
        let mut bar = ProgressBar::new();
        let profile = measure(
            &backbone,
            file.sha256(),
            ramps
                .as_ref()
                .map(|r| (r, ramps_sha.clone().unwrap_or_default())),
            &inputs,
            &self.cfg,
            &mut |b, k, n| bar.update(&format!("batch {b}"), k, n),
        )?;
        profile.save(&self.output)?;
        let mut s = String::new();
        outln!(
            s,
            "wrote {} ({}; commit {}; {} warm-up + {} timed runs per size; took {:.1} s)",
            self.output.display(),
            profile.device,
            profile.commit,
            profile.warmup,
            profile.repeats,
            profile.measure_seconds
        );
        outln!(
            s,
            "{:>5} {:>5} {:>11} {:>15} {:>13}  slowest stages",
            "batch",
            "seq",
            "model ms",
            "stages sum ms",
            "ramps ms"
        );
        for b in &profile.batches {
            let sum: f64 = b.stages.iter().map(|t| t.median_ms).fold(0.0, |a, x| a + x);
            let ramps: f64 = b.ramps.iter().map(|t| t.median_ms).fold(0.0, |a, x| a + x);
            let mut by_cost: Vec<_> = b.stages.iter().collect();
            by_cost.sort_by(|a, b| b.median_ms.total_cmp(&a.median_ms));
            let top: Vec<String> = by_cost
                .iter()
                .take(3)
                .map(|t| format!("{} {:.3}", t.name, t.median_ms))
                .collect();
            outln!(
                s,
                "{:>5} {:>5} {:>11.3} {:>15.3} {:>13.3}  {}",
                b.batch,
                b.seq.map_or("-".into(), |q| q.to_string()),
                b.vanilla_ms(),
                sum,
                ramps,
                top.join(", ")
            );
        }
        emit(&s)
    }
}
