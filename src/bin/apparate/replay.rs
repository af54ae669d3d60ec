//! `apparate serve-replay`: a stored stream fed through the engine in real time by an open-loop
//! arrival process, with a live view of what the runtime does.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use apparate::adapt::ApparateConfig;
use apparate::dataset::{Inputs, Prefix, load_stream};
use apparate::format::ModelFile;
use apparate::metrics::{Metrics, Summary};
use apparate::rng::SplitMix;
use apparate::serve::{
    BackendChoice, BatchingConfig, Engine, Input, ResponseFuture, duration_from_millis,
};
use apparate::{Error, Result};
use clap::Args;

use super::{DeviceArgs, check_fraction, create_output, emit, write_output};

/// How requests arrive.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Arrivals {
    /// Exponential gaps (a Poisson process): bursty, like independent users.
    Poisson,
    /// Evenly spaced.
    Uniform,
}

#[derive(Args)]
pub struct ServeReplayArgs {
    /// Model file.
    #[arg(short, long)]
    model: PathBuf,
    /// Ramps file (without: the plain model).
    #[arg(long)]
    ramps: Option<PathBuf>,
    /// The stream (as for train-ramps); its first --bootstrap-fraction places the first
    /// ramps and the rest is replayed.
    #[arg(long)]
    data: PathBuf,
    /// Profile from `apparate profile` on this device (default: measured at start-up).
    #[arg(long)]
    profile: Option<PathBuf>,
    /// Requests per second.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Arrival process.
    #[arg(long, default_value = "poisson")]
    arrivals: Arrivals,
    /// Replay at most this many inputs.
    #[arg(long)]
    limit: Option<usize>,
    #[arg(long, default_value_t = 0.1)]
    bootstrap_fraction: f64,
    /// Most requests per batch.
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Longest wait of an under-full batch, milliseconds.
    #[arg(long, default_value_t = 5.0)]
    max_delay_ms: f64,
    /// Most queued requests (more are rejected).
    #[arg(long, default_value_t = 1024)]
    queue: usize,
    /// Tolerated disagreement with the model per window.
    #[arg(long, default_value_t = 0.01)]
    accuracy_budget: f64,
    /// Share of the budget the tuner leaves unused (it tunes for budget x (1 - headroom)).
    #[arg(long)]
    tuning_headroom: Option<f64>,
    /// Batches between ramp adjustments (default: 30 vision, 100 language).
    #[arg(long)]
    adjust_every: Option<usize>,
    /// The adaptation loops: `live` (shadow evidence, confidence-bounded thresholds, heads that
    /// keep learning, a sequential drift test; docs/adaptation.md) or `paper` (the Apparate
    /// paper's loops).
    #[arg(long, default_value = "live")]
    mode: apparate::adapt::Mode,
    /// Confidence of the live loops' bound on disagreement, in (0.5, 1).
    #[arg(long, default_value_t = 0.95)]
    confidence: f64,
    /// Live loops: switch parts off (ablation): `shadow`, `bound`, `learning`, `drift-test`,
    /// `spend` (aim at the budget, not at the level the realized disagreement steers),
    /// `cross-fit` (plan the first set on the heads' own bootstrap scores).
    #[arg(long = "without", value_delimiter = ',')]
    without: Vec<String>,
    /// Serve these ramps with fixed thresholds, no adaptation (a static early-exit
    /// baseline): `point=threshold,...`.
    #[arg(long, value_delimiter = ',')]
    fixed: Option<Vec<String>>,
    /// Seed of the arrival process.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write the summary (and every adaptation event) as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// No live status lines (events and the summary are still printed).
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    device: DeviceArgs,
}

/// Checks every flag (the configs' own `validate`, the rest here) and opens the `--json` file,
/// all before anything is loaded, so a bad flag fails at once and names itself.
pub fn serve_replay_cmd(a: ServeReplayArgs) -> Result<()> {
    check_fraction("--bootstrap-fraction", a.bootstrap_fraction)?;
    if a.limit == Some(0) {
        return Err(Error::config(
            "--limit",
            0,
            "1 or more inputs to replay (leave it out to replay the whole stream)",
        ));
    }
    if !(a.rate > 0.0 && a.rate.is_finite()) {
        return Err(Error::config(
            "--rate",
            a.rate,
            "(0, inf) requests per second",
        ));
    }
    let batching = BatchingConfig {
        max_batch_size: a.max_batch,
        max_queue_delay: duration_from_millis("--max-delay-ms", a.max_delay_ms)?,
        queue_capacity: a.queue,
        max_queue_wait: None,
    };
    batching.validate()?;
    let family = ModelFile::open(&a.model)?.meta().family.clone();
    let mut c = ApparateConfig::for_family(&family);
    c.accuracy_budget = a.accuracy_budget;
    if let Some(h) = a.tuning_headroom {
        c.tuning_headroom = h;
    }
    if let Some(n) = a.adjust_every {
        c.adjust_every_batches = n;
    }
    c.mode = a.mode;
    c.live.confidence = a.confidence;
    for part in &a.without {
        match part.as_str() {
            "shadow" => c.live.shadow = false,
            "bound" => c.live.bound = false,
            "learning" => c.live.learning = false,
            "drift-test" => c.live.drift_test = false,
            "spend" => c.live.spend_slack = false,
            "cross-fit" => c.live.cross_fit_bootstrap = false,
            p => {
                return Err(Error::config(
                    "--without",
                    format!("`{p}`"),
                    "shadow, bound, learning, drift-test, spend, cross-fit",
                ));
            }
        }
    }
    if let Some(f) = a.fixed {
        let mut pairs = Vec::new();
        for item in f {
            let (p, t) = item.split_once('=').ok_or_else(|| {
                Error::Input(format!("--fixed wants point=threshold, got `{item}`"))
            })?;
            let t: f32 = t
                .parse()
                .map_err(|_| Error::Input(format!("--fixed: `{t}` is not a threshold")))?;
            pairs.push((p.to_string(), t));
        }
        c.fixed = Some(pairs);
    }
    c.validate()?;
    let json = a.json.as_deref().map(create_output).transpose()?;
    ReplayJob {
        model: a.model,
        ramps: a.ramps,
        data: a.data,
        profile: a.profile,
        rate: a.rate,
        arrivals: a.arrivals,
        limit: a.limit,
        bootstrap_fraction: a.bootstrap_fraction,
        batching,
        apparate: Some(c),
        backend: a.device.choice()?,
        seed: a.seed,
        json,
        quiet: a.quiet,
    }
    .run()
}

pub struct ReplayJob {
    pub model: PathBuf,
    pub ramps: Option<PathBuf>,
    pub data: PathBuf,
    pub profile: Option<PathBuf>,
    pub rate: f64,
    pub arrivals: Arrivals,
    pub limit: Option<usize>,
    pub bootstrap_fraction: f64,
    pub batching: BatchingConfig,
    pub apparate: Option<ApparateConfig>,
    pub backend: BackendChoice,
    pub seed: u64,
    /// Opened before the run, so an unwritable path fails at once.
    pub json: Option<(PathBuf, std::fs::File)>,
    pub quiet: bool,
}

/// What a replay measured (also written as JSON with `--json`).
#[derive(serde::Serialize)]
pub struct ReplaySummary {
    pub model: String,
    pub device: String,
    pub ramps: bool,
    pub rate: f64,
    pub requests: u64,
    pub answered: u64,
    pub rejected: u64,
    pub failed: u64,
    pub seconds: f64,
    pub throughput: f64,
    pub end_to_end: Summary,
    pub queue: Summary,
    pub compute: Summary,
    /// Agreement of the released answers with the model's own.
    pub accuracy: f64,
    pub exits: Vec<(String, u64)>,
    pub events: Vec<apparate::adapt::AdaptEvent>,
    /// What the GPU backend's graphs did (recorded, replayed, eager runs); absent elsewhere.
    pub graphs: Option<apparate::backend::capture::GraphStats>,
}

fn line_of(m: &Metrics, t: f64, sent: usize, total: usize, last: (u64, f64)) -> String {
    let e2e = Summary::of(&m.end_to_end.snapshot());
    let answered = m.answered();
    let rate = (answered - last.0) as f64 / (t - last.1).max(1e-9);
    let n = answered.max(1) as f64;
    let exits: Vec<String> = m
        .exits()
        .iter()
        .filter(|(p, c)| p != "final" && *c > 0)
        .map(|(p, c)| format!("{p} {:.0}%", *c as f64 / n * 100.0))
        .collect();
    let active: Vec<String> = m
        .active()
        .iter()
        .map(|(p, th)| format!("{p}@{th:.3}"))
        .collect();
    format!(
        "{t:>6.1} s  [{:>3.0}%] sent {sent}/{total}  done {answered}  {rate:>6.1}/s  p50 {:.2} ms  p99 {:.2} ms  \
         exits [{}]  agreement {:.2}%  window {:.2}%  ramps [{}]",
        answered as f64 / total.max(1) as f64 * 100.0,
        e2e.p50_ms,
        e2e.p99_ms,
        exits.join(", "),
        m.accuracy() * 100.0,
        m.window_accuracy() * 100.0,
        active.join(", ")
    )
}

impl ReplayJob {
    pub fn run(self) -> Result<()> {
        if !(self.rate > 0.0 && self.rate.is_finite()) {
            return Err(Error::Input(format!(
                "--rate must be a positive number of requests per second, not {}",
                self.rate
            )));
        }
        let file = ModelFile::open(&self.model)?;
        let image = match &file.meta().family {
            apparate::format::Family::Cnn(c) => Some(c.input.clone()),
            _ => None,
        };
        let all = load_stream(
            &self.data,
            image.as_ref(),
            Prefix::Fraction(1.0),
            &mut |_, _| {},
        )?;
        let boot_n = Prefix::Fraction(self.bootstrap_fraction).len(all.len());
        let bootstrap = all.slice(0..boot_n);
        let end = self
            .limit
            .map_or(all.len(), |l| (boot_n + l).min(all.len()));
        if end <= boot_n {
            return Err(Error::Input(format!(
                "{} has {} inputs: none left after the {boot_n} of the bootstrap set",
                self.data.display(),
                all.len()
            )));
        }
        let stream = all.slice(boot_n..end);
        drop(all);
        eprintln!(
            "replaying {} inputs of {} (after the {boot_n}-input bootstrap set) at {} req/s ({:?})",
            stream.len(),
            self.data.display(),
            self.rate,
            self.arrivals
        );
        let mut builder = Engine::builder(&self.model)
            .backend(self.backend.clone())
            .batching(self.batching.clone())
            .bootstrap(bootstrap)
            .log(|s| eprintln!("{s}"));
        if let Some(r) = &self.ramps {
            builder = builder.ramps(r);
        }
        if let Some(p) = &self.profile {
            builder = builder.profile(p);
        }
        if let Some(a) = self.apparate.clone() {
            builder = builder.apparate(a);
        }
        let t0 = Instant::now();
        let engine = Arc::new(builder.build()?);
        eprintln!(
            "engine ready in {:.1} s on {}",
            t0.elapsed().as_secs_f64(),
            engine.device()
        );
        for e in engine.drain_events() {
            eprintln!(
                "[adapt] {} {}: {:?} {:?}",
                e.kind, e.why, e.ramps, e.thresholds
            );
        }

        // Open loop: the sender keeps the schedule whatever the engine does.
        let total = stream.len();
        let (tx, rx) = std::sync::mpsc::channel::<ResponseFuture>();
        let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let (eng, sent2, rate, arrivals, seed) = (
            engine.clone(),
            sent.clone(),
            self.rate,
            self.arrivals,
            self.seed,
        );
        let start = Instant::now();
        let sender = std::thread::spawn(move || {
            let mut rng = SplitMix::new(seed);
            let mut at = 0.0f64;
            for i in 0..total {
                let gap = match arrivals {
                    Arrivals::Uniform => 1.0 / rate,
                    Arrivals::Poisson => {
                        let u = ((rng.uniform() + 1.0) / 2.0).clamp(1e-9, 1.0) as f64;
                        -u.ln() / rate
                    }
                };
                at += gap;
                let due = start + Duration::from_secs_f64(at);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let input = match &stream {
                    Inputs::Texts(t) => Input::Text(t[i].clone()),
                    Inputs::Images {
                        pixels, per_image, ..
                    } => Input::Normalized(pixels[i * per_image..(i + 1) * per_image].to_vec()),
                };
                let f = eng.infer(input);
                sent2.fetch_add(1, Ordering::Relaxed);
                if tx.send(f).is_err() {
                    break;
                }
            }
        });
        let collector = {
            let done = done.clone();
            std::thread::spawn(move || {
                // Outcomes are counted by the engine's metrics; this only waits for all of them.
                for f in rx {
                    let _ = f.wait();
                }
                done.store(true, Ordering::Relaxed);
            })
        };
        let tty = std::io::stderr().is_terminal();
        let mut last = (0u64, 0.0f64);
        let mut events = Vec::new();
        while !done.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(200));
            let t = start.elapsed().as_secs_f64();
            for e in engine.drain_events() {
                if tty && !self.quiet {
                    eprintln!();
                }
                eprintln!(
                    "[adapt {:>6.1} s, batch {}] {}: {} -> ramps {:?} thresholds {:?} (predicted saving {:.1}%, window agreement {:.2}%)",
                    t,
                    e.batch,
                    e.kind,
                    e.why,
                    e.ramps,
                    e.thresholds
                        .iter()
                        .map(|x| (x * 1000.0).round() / 1000.0)
                        .collect::<Vec<_>>(),
                    e.predicted_saving * 100.0,
                    e.window_accuracy * 100.0
                );
                events.push(e);
            }
            if self.quiet || t - last.1 < 1.0 {
                continue;
            }
            let line = line_of(
                engine.metrics(),
                t,
                sent.load(Ordering::Relaxed),
                total,
                last,
            );
            if tty {
                eprint!("\r{line}\x1b[K");
            } else {
                eprintln!("{line}");
            }
            last = (engine.metrics().answered(), t);
        }
        if tty && !self.quiet {
            eprintln!();
        }
        let _ = sender.join();
        let _ = collector.join();
        let seconds = start.elapsed().as_secs_f64();
        let engine = Arc::try_unwrap(engine)
            .map_err(|_| Error::Input("the engine is still shared".into()))?;
        let device = engine.device().to_string();
        let m = engine.shared_metrics();
        events.extend(engine.drain_events());
        let graphs = engine.graph_stats();
        engine.shutdown();
        let summary = ReplaySummary {
            model: self.model.display().to_string(),
            device,
            ramps: self.ramps.is_some(),
            rate: self.rate,
            requests: m.requests(),
            answered: m.answered(),
            rejected: m.rejected(),
            failed: m.failed(),
            seconds,
            throughput: m.answered() as f64 / seconds,
            end_to_end: Summary::of(&m.end_to_end.snapshot()),
            queue: Summary::of(&m.queue.snapshot()),
            compute: Summary::of(&m.compute.snapshot()),
            accuracy: m.accuracy(),
            exits: m.exits(),
            events,
            graphs,
        };
        if let Some((path, file)) = self.json {
            let text = serde_json::to_string_pretty(&summary).expect("a summary serializes");
            write_output(&path, file, &(text + "\n"))?;
        }
        let mut s = String::new();
        let n = summary.answered.max(1) as f64;
        outln!(
            s,
            "{} requests in {:.1} s: {} answered ({:.1}/s), {} rejected, {} failed",
            summary.requests,
            seconds,
            summary.answered,
            summary.throughput,
            summary.rejected,
            summary.failed
        );
        for (name, x) in [
            ("end to end", &summary.end_to_end),
            ("queue", &summary.queue),
            ("batch compute", &summary.compute),
        ] {
            outln!(
                s,
                "  {name:<14} p50 {:>8.2} ms  p90 {:>8.2} ms  p99 {:>8.2} ms  max {:>8.2} ms",
                x.p50_ms,
                x.p90_ms,
                x.p99_ms,
                x.max_ms
            );
        }
        let exits: Vec<String> = summary
            .exits
            .iter()
            .map(|(p, c)| format!("{p} {:.1}%", *c as f64 / n * 100.0))
            .collect();
        outln!(s, "  released at: {}", exits.join(", "));
        outln!(
            s,
            "  agreement with the model: {:.2}%; ramp changes: {}, threshold updates: {}",
            summary.accuracy * 100.0,
            summary
                .events
                .iter()
                .filter(|e| matches!(e.kind, "remove" | "add" | "probe" | "place"))
                .count(),
            summary
                .events
                .iter()
                .filter(|e| matches!(e.kind, "tune" | "retune" | "violation" | "disable"))
                .count()
        );
        if let Some(g) = &summary.graphs {
            outln!(
                s,
                "  graphs: {} stage runs recorded, {} replayed as one graph launch, {} eager, {} replays abandoned",
                g.recorded,
                g.replayed,
                g.eager,
                g.rerecorded
            );
        }
        emit(&s)
    }
}
