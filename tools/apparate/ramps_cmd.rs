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
use apparate::{Error, Result};

use super::progress::ProgressBar;
use super::{BackendJob, emit, ms};

/// Trains ramps on the bootstrap prefix of a stream.
pub struct TrainRampsJob {
    pub model: PathBuf,
    pub data: PathBuf,
    pub output: PathBuf,
    pub report: Option<PathBuf>,
    pub bootstrap_fraction: f64,
    pub cfg: BootstrapConfig,
}

impl BackendJob<()> for TrainRampsJob {
    fn run<B: Backend>(self, be: B, what: String) -> Result<()> {
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
        if let Some(path) = &self.report {
            let text = serde_json::to_string_pretty(&report).expect("a report serializes");
            std::fs::write(path, text + "\n").map_err(|e| Error::Io {
                path: path.clone(),
                source: e,
            })?;
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
        "{:<12} {:<18} {:>6} {:>10} {:>9}",
        "ramp",
        "head",
        "width",
        "train agr",
        "held agr"
    );
    for x in &r.ramps {
        outln!(
            s,
            "{:<12} {:<18} {:>6} {:>9.1}% {:>8.1}%",
            x.point,
            x.head,
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
pub struct ProfileJob {
    pub model: PathBuf,
    pub ramps: Option<PathBuf>,
    pub data: Option<PathBuf>,
    pub seq: usize,
    pub output: PathBuf,
    pub cfg: ProfileConfig,
}

impl BackendJob<()> for ProfileJob {
    fn run<B: Backend>(self, be: B, what: String) -> Result<()> {
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
            None => backbone.synthetic_inputs(self.seq),
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
