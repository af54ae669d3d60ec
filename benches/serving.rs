//! Tail latency of the serving engine on the real workloads, side by side in one process on the
//! same schedule and batching knobs: the plain model (vanilla), Apparate (adaptive), two static
//! early-exit baselines (ramps at every eligible point, thresholds tuned once on the bootstrap
//! data: one shared threshold, or per-ramp thresholds), the oracle (each input answered at the
//! first ramp that agrees with the final answer), and the plain model once more at the end
//! (`vanilla-again`: what the machine's run-to-run noise alone does to the numbers).
//!
//! ```sh
//! cargo bench --bench serving -- --workload vision            # MNIST ResNet, 30 frames/s, drift
//! cargo bench --bench serving -- --workload language          # MiniLM sentiment, bursty trace
//! cargo bench --bench serving -- --workload vision --sweep    # highest rate with p99 <= bound
//! ```
//! Needs `weights/fetch.sh` (models and workload streams); ramps and profiles are made if missing.
//! Prints a table last; writes JSON and SVG plots (latency CDFs, adaptation timeline) under
//! `target/bench-results/`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use apparate::adapt::latency::LatencyModel;
use apparate::adapt::tuner::{Samples, evaluate, tune};
use apparate::adapt::{AdaptEvent, ApparateConfig};
use apparate::backbone::Backbone;
use apparate::backend::{Backend, CpuBackend, CpuConfig};
use apparate::dataset::{Inputs, Prefix, load_stream};
use apparate::format::{ModelFile, RampsFile};
use apparate::loadgen::{
    Arrivals, Breakdown, Outcome, Percentiles, breakdown, percentiles, read_trace, run,
};
use apparate::profile::{Profile, ProfileConfig, build_commit, measure};
use apparate::ramps::bootstrap::{BootstrapConfig, train_ramps};
use apparate::ramps::{Ramps, record_outputs};
use apparate::rng::SplitMix;
use apparate::serve::{BackendChoice, BatchingConfig, Engine, Input};
use clap::Parser;
use serde::Serialize;

#[path = "serving/plots.rs"]
mod plots;
#[path = "serving/report.rs"]
mod report;
#[path = "serving/sweep.rs"]
mod sweep;

use report::{Report, SystemResult, print_table, summarise};
use sweep::{SweepReport, print_sweep, sweep};

#[derive(Parser, Debug)]
struct Args {
    /// `vision` (MNIST ResNet at 30 frames/s with a drift phase) or `language` (MiniLM
    /// sentiment over tweets with bursty arrivals).
    #[arg(long, default_value = "vision")]
    workload: String,
    /// Length of the replay, seconds.
    #[arg(long, default_value_t = 60.0)]
    seconds: f64,
    /// Systems to run (comma-separated): vanilla, apparate, static-shared, static-per-ramp,
    /// oracle; `vanilla-again` runs the plain model once more where it is listed, to show the
    /// run-to-run noise.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "vanilla,apparate,static-shared,static-per-ramp,oracle,vanilla-again"
    )]
    systems: Vec<String>,
    /// Requests per second: the frame rate (vision, default 30) or the mean rate over the
    /// replayed trace minutes (language, default 40).
    #[arg(long)]
    rate: Option<f64>,
    /// Most requests per batch.
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Longest wait of an under-full batch, ms (default 0: under load the queue fills batches
    /// by itself; on the language workload a 5 ms wait raised the plain model's p50 from 16.2
    /// to 19.7 ms, since few requests arrive within 5 ms at these rates).
    #[arg(long)]
    max_delay_ms: Option<f64>,
    /// Latency objective for goodput, ms (default: 10 vision, 100 language).
    #[arg(long)]
    slo_ms: Option<f64>,
    /// Vision: the fraction of the replay after which frames drift (noise, lower contrast).
    #[arg(long, default_value_t = 0.5)]
    drift_at: f64,
    /// Window (requests) for the worst-window agreement.
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// CPU threads (default: 1 for vision, every core for language).
    #[arg(long)]
    threads: Option<usize>,
    /// Instead of the side-by-side run: find each system's highest rate whose p99 stays under
    /// `--p99-bound-ms` (Poisson arrivals for vision, the bursty trace scaled for language).
    #[arg(long)]
    sweep: bool,
    /// Systems the sweep compares.
    #[arg(long, value_delimiter = ',', default_value = "vanilla,apparate")]
    sweep_systems: Vec<String>,
    /// Length of each sweep step, seconds.
    #[arg(long, default_value_t = 8.0)]
    sweep_seconds: f64,
    /// The sweep stops when the bracket is this narrow (fraction of its low end).
    #[arg(long, default_value_t = 0.03)]
    sweep_precision: f64,
    /// First rate of the sweep, per second (default: 200 vision, 20 language).
    #[arg(long)]
    sweep_start: Option<f64>,
    /// The sweep's p99 bound, ms (default: 10 vision, 200 language).
    #[arg(long)]
    p99_bound_ms: Option<f64>,
    /// Where the JSON goes.
    #[arg(long, default_value = "target/bench-results")]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Apparate's tuning window: at least this many samples (default: the config's).
    #[arg(long)]
    window_min_samples: Option<usize>,
    // `cargo bench` passes `--bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> apparate::Result<()> {
    let args = Args::parse();
    check_args(&args)?;
    let vision = match args.workload.as_str() {
        "vision" => true,
        "language" => false,
        w => return Err(apparate::Error::Input(format!("unknown workload `{w}`"))),
    };
    let (model, stream) = if vision {
        ("mnist-resnet", "workloads/mnist-stream.safetensors")
    } else {
        ("minilm-l6-sentiment", "workloads/tweets.txt")
    };
    let model_path = PathBuf::from(format!("weights/{model}.apparate"));
    let ramps_path = PathBuf::from(format!("weights/{model}.ramps"));
    let profile_path = PathBuf::from(format!("weights/{model}.profile.json"));
    for p in [&model_path, &PathBuf::from(stream)] {
        if !p.exists() {
            return Err(apparate::Error::Input(format!(
                "{} is missing: run weights/fetch.sh first",
                p.display()
            )));
        }
    }
    // Vision runs one frame at a time through a 28x28 model: a second compute thread costs
    // more in hand-offs than it saves (p50 1.24 ms with one thread, 1.64 ms with two, measured
    // on the 2-core machine of docs/results.md) and leaves no core for the releaser.
    let threads = args.threads.or(vision.then_some(1));
    let file = ModelFile::open(&model_path)?;
    let backbone = Backbone::load(CpuBackend::new(CpuConfig { threads })?, &file)?;
    let device = backbone.backend().device_id();
    eprintln!("{model} on {device}");

    // The stream: bootstrap (first 10%), then the replay.
    let all = load_stream(
        Path::new(stream),
        backbone.image_input(),
        Prefix::Fraction(1.0),
        &mut |_, _| {},
    )?;
    let boot_n = Prefix::Fraction(0.1).len(all.len());
    let boot = all.slice(0..boot_n);

    // Ramps and profile: reuse tools/train-ramps.sh's, or make them here.
    if RampsFile::open(&ramps_path, &file).is_err() {
        eprintln!(
            "training ramps on the bootstrap set ({boot_n} inputs) -> {}",
            ramps_path.display()
        );
        train_ramps(
            &backbone,
            &file,
            &boot,
            &ramps_path,
            &BootstrapConfig::default(),
            &mut |_, _, _| {},
        )?;
    }
    let rf = RampsFile::open(&ramps_path, &file)?;
    let ramps = Ramps::load(&backbone, &rf)?;
    let points: Vec<String> = ramps.iter().map(|r| r.point.clone()).collect();
    let profile = match Profile::load(&profile_path, &device, file.sha256()) {
        Ok(p) if p.batches.iter().all(|b| b.ramps.len() == ramps.len()) => p,
        _ => {
            eprintln!("measuring a profile -> {}", profile_path.display());
            let p = measure(
                &backbone,
                file.sha256(),
                Some((&ramps, String::new())),
                &boot,
                &ProfileConfig {
                    max_batch: args.max_batch,
                    warmup: 2,
                    repeats: 5,
                },
                &mut |_, _, _| {},
            )?;
            p.save(&profile_path)?;
            p
        }
    };

    // The schedule and the inputs, the same for every system.
    // Vision: 30 frames/s (video). Language: a mean of 40/s over the replayed minutes, so the
    // trace's bursts (2.15x the mean: 86/s) stay within what MiniLM serves on 2 CPU cores.
    let rate = args.rate.unwrap_or(if vision { 30.0 } else { 40.0 });
    let (arrivals, label) = if vision {
        (Arrivals::Fixed { rate }, format!("fixed {rate}/s"))
    } else {
        let trace = read_trace(Path::new("benches/traces/bursty.csv"))?;
        let minutes = trace_minutes(&trace, args.seconds);
        (
            bursty(&trace, minutes, Duration::from_secs(10), rate, args.seed),
            format!(
                "bursty trace (first {minutes} minutes of benches/traces/bursty.csv, 10 s per trace minute, scaled to a mean of {rate}/s)"
            ),
        )
    };
    arrivals.validate()?;
    let n_wanted = (args.seconds * rate).ceil() as usize;
    let offsets: Vec<Duration> = arrivals
        .schedule(n_wanted * 4)
        .into_iter()
        .take_while(|d| d.as_secs_f64() <= args.seconds)
        .collect();
    let n = offsets.len().min(all.len() - boot_n);
    let offsets = &offsets[..n];
    let replay = all.slice(boot_n..boot_n + n);
    let drift_from = (n as f64 * args.drift_at) as usize;
    let inputs = to_inputs(
        &replay,
        vision.then_some((drift_from, backbone.image_input().cloned())),
        args.seed,
    );
    let drift = vision.then(|| format!(
        "from request {drift_from} of {n}: contrast x0.6 and Gaussian noise (sd 0.15 of full scale) on the raw pixels"
    ));
    eprintln!(
        "{n} requests over {:.0} s ({label})",
        offsets.last().map_or(0.0, |d| d.as_secs_f64())
    );

    // Static baselines: every eligible ramp, thresholds tuned once on the bootstrap outputs.
    let boot_rows = record_outputs(&backbone, &ramps, &boot, 64)?;
    let samples = Samples::from_rows(points.len(), &boot_rows);
    let typical = profile.for_batch(1).expect("profile has batches");
    let lat = LatencyModel::from_profile(
        typical,
        &points.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .expect("profile covers the ramps");
    let mut base_cfg = ApparateConfig::for_family(&file.meta().family);
    if let Some(w) = args.window_min_samples {
        base_cfg.window_min_samples = w;
    }
    let target = base_cfg.accuracy_budget * (1.0 - base_cfg.tuning_headroom);
    // One shared threshold: grid search in steps of 0.01.
    let mut shared = (0.0f32, f64::MIN);
    for step in 0..=100 {
        let t = step as f32 / 100.0;
        let e = evaluate(&samples, &vec![t; points.len()], &lat);
        if e.accuracy >= 1.0 - target && e.saving > shared.1 {
            shared = (t, e.saving);
        }
    }
    let per_ramp = tune(
        &samples,
        &lat,
        &apparate::adapt::tuner::TunerConfig {
            accuracy_budget: target,
            ..Default::default()
        },
    );
    drop(backbone);

    let max_delay = args.max_delay_ms.unwrap_or(0.0);
    let systems_ctx = Systems {
        model: model_path.clone(),
        ramps: ramps_path.clone(),
        profile: profile_path.clone(),
        threads,
        batching: BatchingConfig {
            max_batch_size: args.max_batch,
            max_queue_delay: apparate::serve::duration_from_millis("--max-delay-ms", max_delay)?,
            queue_capacity: 4096,
        },
        base: base_cfg,
        points: points.clone(),
        shared: shared.0,
        per_ramp: per_ramp.thresholds.clone(),
        boot: boot.clone(),
    };
    let batching = format!("max batch {}, max delay {max_delay} ms", args.max_batch);
    std::fs::create_dir_all(&args.out)
        .map_err(|e| apparate::Error::Input(format!("{}: {e}", args.out.display())))?;

    if args.sweep {
        let bound = args
            .p99_bound_ms
            .unwrap_or(if vision { 10.0 } else { 200.0 });
        let start = args
            .sweep_start
            .unwrap_or(if vision { 200.0 } else { 20.0 });
        let mut results = Vec::new();
        for system in &args.sweep_systems {
            eprintln!("sweeping {system} (p99 bound {bound} ms) ...");
            results.push(sweep(
                &systems_ctx,
                system,
                &all.slice(boot_n..all.len()),
                vision,
                bound,
                start,
                &args,
            )?);
        }
        let report = SweepReport {
            workload: args.workload.clone(),
            commit: build_commit(),
            device: device.clone(),
            model: model_path.display().to_string(),
            arrivals: if vision {
                "Poisson (seeded)".into()
            } else {
                "the main run's minutes of the bursty trace, compressed into each step and scaled to each mean rate".into()
            },
            p99_bound_ms: bound,
            step_seconds: args.sweep_seconds,
            precision: args.sweep_precision,
            batching,
            systems: results,
        };
        let json_path = args
            .out
            .join(format!("serving-{}-sweep.json", args.workload));
        write_json(&json_path, &report)?;
        print_sweep(&report, &json_path);
        return Ok(());
    }

    let slo = args.slo_ms.unwrap_or(if vision { 10.0 } else { 100.0 });
    let mut results: Vec<SystemResult> = Vec::new();
    let mut vanilla_classes: Option<Vec<Option<usize>>> = None;
    let mut systems = args.systems.clone();
    // Agreement is judged against the plain model's answers, so it always runs (first).
    systems.retain(|s| s != "vanilla");
    systems.insert(0, "vanilla".into());
    for system in &systems {
        let engine = systems_ctx.engine(system)?;
        let thresholds = engine.metrics().active();
        eprintln!("running {system} ...");
        let outcomes = run(&engine, &inputs, offsets);
        let m = engine.shared_metrics();
        let events = engine.drain_events();
        engine.shutdown();
        let classes: Vec<Option<usize>> = outcomes.iter().map(|o| o.class).collect();
        let reference = vanilla_classes.get_or_insert_with(|| classes.clone());
        results.push(summarise(
            system,
            &outcomes,
            reference,
            slo,
            args.window,
            &m,
            events,
            thresholds,
            if vision { drift_from } else { n },
        ));
    }

    let report = Report {
        workload: args.workload.clone(),
        commit: build_commit(),
        device,
        model: model_path.display().to_string(),
        arrivals: label,
        offered_rate: n as f64 / offsets.last().map_or(1.0, |d| d.as_secs_f64()),
        seconds: args.seconds,
        batching,
        slo_ms: slo,
        drift,
        drift_from: vision.then_some(drift_from),
        window: args.window,
        seed: args.seed,
        systems: results,
    };
    let json_path = args.out.join(format!("serving-{}.json", args.workload));
    write_json(&json_path, &report)?;
    let cdf = args.out.join(format!("serving-{}-cdf.svg", args.workload));
    let timeline = args
        .out
        .join(format!("serving-{}-timeline.svg", args.workload));
    plots::latency_cdf(&report, &cdf)?;
    plots::timeline(&report, &timeline)?;
    print_table(&report, &json_path);
    println!("plots: {} and {}", cdf.display(), timeline.display());
    Ok(())
}

/// Trace minutes replayed in `seconds` at 10 s per minute.
fn trace_minutes(trace: &[u32], seconds: f64) -> usize {
    ((seconds / 10.0).ceil() as usize).clamp(1, trace.len())
}

/// The first `minutes` of a per-minute trace, each lasting `minute`, counts scaled so that
/// their mean is `rate` per second.
fn bursty(trace: &[u32], minutes: usize, minute: Duration, rate: f64, seed: u64) -> Arrivals {
    let part = &trace[..minutes.min(trace.len())];
    let mean = part.iter().map(|&c| c as f64).sum::<f64>() / part.len().max(1) as f64;
    Arrivals::Trace {
        per_minute: part.to_vec(),
        minute,
        scale: rate * minute.as_secs_f64() / mean.max(1e-9),
        seed,
    }
}

fn write_json<T: Serialize>(path: &Path, v: &T) -> apparate::Result<()> {
    std::fs::write(
        path,
        serde_json::to_string_pretty(v).expect("serializes") + "\n",
    )
    .map_err(|e| apparate::Error::Input(format!("{}: {e}", path.display())))
}

/// What every system is built from: the same model, profile, batching and bootstrap data.
struct Systems {
    model: PathBuf,
    ramps: PathBuf,
    profile: PathBuf,
    threads: Option<usize>,
    batching: BatchingConfig,
    base: ApparateConfig,
    points: Vec<String>,
    /// The static baselines' thresholds, tuned once on the bootstrap outputs.
    shared: f32,
    per_ramp: Vec<f32>,
    boot: Inputs,
}

impl Systems {
    fn engine(&self, system: &str) -> apparate::Result<Engine> {
        let mut cfg = self.base.clone();
        let mut builder = Engine::builder(&self.model)
            .backend(BackendChoice::Cpu {
                threads: self.threads,
            })
            .batching(self.batching.clone())
            .profile(&self.profile);
        match system {
            // `vanilla-again`: the plain model once more, after the others (run-order noise).
            "vanilla" | "vanilla-again" => {}
            "apparate" => builder = builder.ramps(&self.ramps).bootstrap(self.boot.clone()),
            "static-shared" => {
                cfg.fixed = Some(
                    self.points
                        .iter()
                        .map(|p| (p.clone(), self.shared))
                        .collect(),
                );
                builder = builder.ramps(&self.ramps);
            }
            "static-per-ramp" => {
                cfg.fixed = Some(
                    self.points
                        .iter()
                        .cloned()
                        .zip(self.per_ramp.iter().copied())
                        .collect(),
                );
                builder = builder.ramps(&self.ramps);
            }
            "oracle" => {
                cfg.fixed = Some(self.points.iter().map(|p| (p.clone(), 0.0)).collect());
                cfg.oracle = true;
                builder = builder.ramps(&self.ramps);
            }
            s => return Err(apparate::Error::Input(format!("unknown system `{s}`"))),
        }
        builder.apparate(cfg).build()
    }
}

/// Requests from stream inputs; vision frames from `drift.0` on get lower contrast and noise.
fn to_inputs(
    replay: &Inputs,
    drift: Option<(usize, Option<apparate::models::cnn::ImageInput>)>,
    seed: u64,
) -> Vec<Input> {
    match replay {
        Inputs::Texts(t) => t.iter().cloned().map(Input::Text).collect(),
        Inputs::Images {
            pixels,
            count,
            per_image,
        } => {
            let mut rng = SplitMix::new(seed ^ 0xd1f7);
            (0..*count)
                .map(|i| {
                    let mut v = pixels[i * per_image..(i + 1) * per_image].to_vec();
                    if let Some((from, Some(inp))) = &drift
                        && i >= *from
                    {
                        let c = inp.mean.len();
                        for (k, x) in v.iter_mut().enumerate() {
                            let (mean, std) = (inp.mean[k % c], inp.std[k % c]);
                            let raw = *x * std + mean;
                            let noise: f32 =
                                (0..4).map(|_| rng.uniform()).sum::<f32>() * 0.5 * 0.15;
                            let raw = (raw * 0.6 + noise).clamp(0.0, 1.0);
                            *x = (raw - mean) / std;
                        }
                    }
                    Input::Normalized(v)
                })
                .collect()
        }
    }
}

/// Refuses lengths and precisions that would make a run empty (every step "passes" with no
/// requests) or a sweep that never ends (a precision of 0).
fn check_args(a: &Args) -> apparate::Result<()> {
    use apparate::adapt::config::check_real;
    use std::ops::Bound::{Excluded, Included};
    let day = apparate::loadgen::MAX_SCHEDULE.as_secs_f64();
    check_real("--seconds", a.seconds, Excluded(0.0), Included(day))?;
    check_real(
        "--sweep-seconds",
        a.sweep_seconds,
        Excluded(0.0),
        Included(day),
    )?;
    check_real(
        "--sweep-precision",
        a.sweep_precision,
        Excluded(0.0),
        Excluded(1.0),
    )
}
