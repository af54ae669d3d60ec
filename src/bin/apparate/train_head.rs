//! `apparate train-head`: a classifier head on a frozen backbone from labelled data (see
//! [`apparate::head_train`]), written as a model file with a held-out accuracy report.

use std::path::{Path, PathBuf};
use std::time::Instant;

use apparate::backbone::Backbone;
use apparate::backend::Backend;
use apparate::format::ModelFile;
use apparate::head_train::{
    HeadReport, HeadTrainConfig, LabelledData, read_image_folders, read_image_list, read_texts,
    train_and_write,
};
use apparate::select::{BackendJob, with_backend};
use apparate::{Error, Result};
use clap::Args;

use super::progress::ProgressBar;
use super::{DeviceArgs, MAX_BATCH, check_count, create_output, emit, ms};

#[derive(Args)]
pub struct TrainHeadArgs {
    /// The backbone's model file (a head it already has is replaced).
    #[arg(short, long)]
    model: PathBuf,
    /// Text models: a text file, one input per line. Image models: a folder with one
    /// sub-folder of images per label, or (with --labels) a folder the list's files are in.
    #[arg(long)]
    data: PathBuf,
    /// Text models: one label per line, line by line with --data. Image models: optional list
    /// of `FILE<TAB>LABEL` lines (FILE relative to --data; `FILE,LABEL` also accepted).
    #[arg(long)]
    labels: Option<PathBuf>,
    /// Output model file: the backbone with the trained head.
    #[arg(short, long)]
    output: PathBuf,
    /// The JSON report (default: the output's path with the extension `.json`).
    #[arg(long)]
    report: Option<PathBuf>,
    /// Fraction of each class held out (seeded, stratified) to measure accuracy on.
    #[arg(long, default_value_t = 0.2)]
    holdout_fraction: f64,
    /// Passes over the training features.
    #[arg(long, default_value_t = 60)]
    epochs: usize,
    /// Adam learning rate.
    #[arg(long, default_value_t = 3e-3)]
    learning_rate: f32,
    /// L2 penalty on the head's (standardised) weights (default: the best of 1e-4 .. 1 on a
    /// validation split of the training part).
    #[arg(long)]
    weight_decay: Option<f32>,
    /// Seed of the split and of the training's shuffling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Inputs per backbone batch while computing features.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    #[command(flatten)]
    device: DeviceArgs,
}

pub fn train_head_cmd(a: TrainHeadArgs) -> Result<()> {
    use std::ops::Bound::{Excluded, Included};
    let check_real = apparate::adapt::config::check_real;
    check_real(
        "--holdout-fraction",
        a.holdout_fraction,
        Excluded(0.0),
        Excluded(1.0),
    )?;
    check_count("--epochs", a.epochs, 1, 100_000)?;
    check_count("--batch-size", a.batch_size, 1, MAX_BATCH)?;
    check_real(
        "--learning-rate",
        a.learning_rate as f64,
        Excluded(0.0),
        Included(1.0),
    )?;
    if let Some(w) = a.weight_decay {
        check_real("--weight-decay", w as f64, Included(0.0), Included(1.0))?;
    }
    let report_path = a
        .report
        .clone()
        .unwrap_or_else(|| a.output.with_extension("json"));
    for (flag, p) in [("--output", &a.output), ("--report", &report_path)] {
        if same_file(p, &a.model) {
            return Err(Error::Input(format!(
                "{flag} {} is the backbone itself; write the new model elsewhere",
                p.display()
            )));
        }
    }
    if same_file(&report_path, &a.output) {
        return Err(Error::Input(format!(
            "the report {} would overwrite the model; give --report another path",
            report_path.display()
        )));
    }
    let choice = a.device.choice()?;
    // Read and checked before the model loads: label/text mismatches fail at once.
    if !a.data.exists() {
        return Err(Error::Input(format!(
            "--data {} does not exist",
            a.data.display()
        )));
    }
    let data = if a.data.is_dir() {
        match &a.labels {
            Some(list) => read_image_list(&a.data, list)?,
            None => read_image_folders(&a.data)?,
        }
    } else {
        let Some(labels) = &a.labels else {
            return Err(Error::Input(format!(
                "{} is a file: a text model needs --labels (one label per line); an image \
                 model takes a folder",
                a.data.display()
            )));
        };
        read_texts(&a.data, labels)?
    };
    // Refused now rather than after the training.
    let report = create_output(&report_path)?;
    let cfg = HeadTrainConfig {
        holdout_fraction: a.holdout_fraction,
        batch_size: a.batch_size,
        train: apparate::ramps::train::TrainConfig {
            epochs: a.epochs,
            learning_rate: a.learning_rate,
            weight_decay: a.weight_decay,
            seed: a.seed,
            ..Default::default()
        },
        ..Default::default()
    };
    let result = with_backend(
        &choice,
        TrainHeadJob {
            model: a.model,
            data,
            output: a.output,
            report,
            cfg,
        },
    );
    if result.is_err() {
        // The report was created empty up front; a failed run leaves no empty report behind
        // (the model file is written atomically, so none is left either).
        let _ = std::fs::remove_file(&report_path);
    }
    result
}

/// Whether two paths name the same file (the same path, or both exist and resolve alike).
fn same_file(a: &Path, b: &Path) -> bool {
    a == b
        || matches!(
            (std::fs::canonicalize(a), std::fs::canonicalize(b)),
            (Ok(x), Ok(y)) if x == y
        )
}

struct TrainHeadJob {
    model: PathBuf,
    data: LabelledData,
    output: PathBuf,
    report: (PathBuf, std::fs::File),
    cfg: HeadTrainConfig,
}

impl BackendJob for TrainHeadJob {
    type Output = ();
    fn run<B: Backend + 'static>(self, be: B, what: String) -> Result<()> {
        let t0 = Instant::now();
        let file = ModelFile::open(&self.model)?;
        let backbone = Backbone::load(be, &file)?;
        eprintln!(
            "loaded {} in {} ({what}); {} labelled inputs from {}",
            self.model.display(),
            ms(t0.elapsed()),
            self.data.labels.len(),
            self.data.description
        );
        let mut bar = ProgressBar::new();
        let mut r = train_and_write(
            &backbone,
            &file,
            &self.data,
            &self.output,
            &self.cfg,
            &mut |phase, d, t| bar.update(phase, d, t),
        )?;
        r.backend = what;
        let (path, f) = self.report;
        let text = serde_json::to_string_pretty(&r).expect("a report serializes");
        super::write_output(&path, f, &(text + "\n"))?;
        emit(&render(&r, &self.output, &path))
    }
}

fn pct(x: f64) -> String {
    format!("{:.2}%", x * 100.0)
}

fn render(r: &HeadReport, out: &Path, report: &Path) -> String {
    let mut s = String::new();
    outln!(
        s,
        "wrote {} ({} classes on {} features of {}) and {}",
        out.display(),
        r.labels.len(),
        r.features,
        r.backbone,
        report.display()
    );
    outln!(
        s,
        "{} training inputs, {} held out ({}% per class, seed {}); features {:.1} s, training {:.1} s",
        r.train_inputs,
        r.held_out_inputs,
        r.holdout_fraction * 100.0,
        r.seed,
        r.features_seconds,
        r.training_seconds
    );
    let search: Vec<String> = r
        .weight_decay_search
        .iter()
        .map(|d| format!("{:e} {}", d.weight_decay, pct(d.validation_accuracy)))
        .collect();
    if !search.is_empty() {
        outln!(
            s,
            "weight decay {:e}, chosen on a validation split of the training part ({})",
            r.weight_decay,
            search.join(", ")
        );
    }
    outln!(
        s,
        "held-out accuracy {} (train {}; always `{}`: {})",
        pct(r.held_out_accuracy),
        pct(r.train_accuracy),
        r.majority_label,
        pct(r.majority_accuracy)
    );
    outln!(
        s,
        "  {:<24} {:>7} {:>9} {:>9}",
        "class",
        "train",
        "held-out",
        "accuracy"
    );
    for c in &r.per_class {
        let acc = if c.held_out > 0 {
            pct(c.held_out_correct as f64 / c.held_out as f64)
        } else {
            "-".into()
        };
        outln!(
            s,
            "  {:<24} {:>7} {:>9} {:>9}",
            c.label,
            c.train,
            c.held_out,
            acc
        );
    }
    s
}
