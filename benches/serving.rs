//! Tail latency of the serving engine on the real workloads, side by side in one process on the
//! same schedule and batching knobs: the plain model (vanilla), Apparate (the live loops, the
//! default) and Apparate with the paper's loops (`apparate-paper`), two static early-exit
//! baselines (ramps at every eligible point, thresholds tuned once on the bootstrap data: one
//! shared threshold, or per-ramp thresholds), the oracle (each input answered at the first ramp
//! that agrees with the final answer), and the plain model once more (`vanilla-again`: what
//! the machine's run-to-run noise alone does to the numbers). `--ablation` runs Apparate with
//! each part of its live loops switched off in turn instead. The systems are interleaved:
//! every engine starts first, then the replay plays in slices of `--slice-seconds` (15), each
//! slice once per system, their order rotating from slice to slice.
//!
//! The offered load is a share of the machine's capacity: before the systems run, the plain
//! model's throughput is measured closed loop (`--max-batch` requests in flight for
//! `--capacity-seconds`), and the text workloads are offered `--load` times it as their mean
//! rate (default 0.4, so that the bursty trace's busiest minute stays below the
//! capacity); the frame workloads keep 30 frames/s unless that is above the share (then
//! the rate is lowered and the benchmark says so). `--rate` overrides both.
//!
//! ```sh
//! cargo bench --bench serving -- --workload mnist-drift        # MNIST ResNet, 30 frames/s, drift
//! cargo bench --bench serving -- --workload video              # EfficientNet-Lite0, video clips
//! cargo bench --bench serving -- --workload tweets             # MiniLM sentiment, bursty trace
//! cargo bench --bench serving -- --workload movies             # MiniLM movie reviews, bursty
//! cargo bench --bench serving -- --workload news               # MiniLM news topics, bursty
//! cargo bench --bench serving -- --workload tweets --ablation  # each live part switched off
//! cargo bench --bench serving -- --workload mnist-drift --sweep  # highest rate, p99 <= bound
//! ```
//! (`vision` and `language` are the old names of `mnist-drift` and `tweets`.) Needs
//! `weights/fetch.sh` (models and workload streams); ramps and profiles are made if missing.
//! Prints a table last; writes JSON and SVG plots (latency CDFs, adaptation timeline) under
//! `target/bench-results/`, named `serving-<workload>[-ablation][-seed<N>]`. `tools/bench-all.sh`
//! runs every workload.

use std::path::{Path, PathBuf};
use std::time::Duration;

use apparate::adapt::latency::LatencyModel;
use apparate::adapt::tuner::{Samples, evaluate, tune};
use apparate::adapt::{AdaptEvent, ApparateConfig, Mode};
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

#[path = "serving/capacity.rs"]
mod capacity;
#[path = "serving/plots.rs"]
mod plots;
#[path = "serving/report.rs"]
mod report;
#[path = "serving/sweep.rs"]
mod sweep;
#[path = "serving/workloads.rs"]
mod workloads;

use capacity::{Capacity, measure_capacity};
use report::{Report, SystemResult, print_table, set_reductions, summarise};
use sweep::{SweepReport, print_sweep, sweep};
use workloads::{ArrivalKind, Clip, Drift, Workload, clip_marks, clip_of, read_clips};

/// The systems of a plain run, in order.
const DEFAULT_SYSTEMS: &str =
    "vanilla,apparate,apparate-paper,static-shared,static-per-ramp,oracle,vanilla-again";
/// The systems of `--ablation`: Apparate whole and with one part of its live loops off.
const ABLATION_SYSTEMS: &str = "vanilla,apparate,apparate-no-shadow,apparate-no-bound,apparate-no-learning,apparate-no-drift,apparate-no-spend,vanilla-again";

#[derive(Parser, Debug)]
struct Args {
    /// `mnist-drift` (MNIST ResNet at 30 frames/s with an injected drift; old name `vision`),
    /// `video` (EfficientNet-Lite0 on video clips played one after another, 30 frames/s),
    /// `tweets` (MiniLM sentiment, bursty arrivals; old name `language`), `movies` (MiniLM
    /// movie-review sentiment, bursty) or `news` (MiniLM news topics on whole articles, bursty).
    #[arg(long, default_value = "mnist-drift")]
    workload: String,
    /// Length of the replay, seconds.
    #[arg(long, default_value_t = 60.0)]
    seconds: f64,
    /// Systems to run (comma-separated): vanilla, apparate, apparate-paper, static-shared,
    /// static-per-ramp, oracle, apparate-no-shadow, apparate-no-bound, apparate-no-learning,
    /// apparate-no-drift, apparate-no-spend; `vanilla-again` runs the plain model once more
    /// where it is listed, to show the run-to-run noise. Default: vanilla, apparate,
    /// apparate-paper, the two static baselines, oracle, vanilla-again.
    #[arg(long, value_delimiter = ',', conflicts_with = "ablation")]
    systems: Option<Vec<String>>,
    /// Run the ablation instead: vanilla, apparate, and apparate with shadow evaluation, the
    /// confidence bound, learning, the drift test or the slack spending switched off, then
    /// vanilla-again.
    #[arg(long)]
    ablation: bool,
    /// Requests per second, overriding the capacity-based rate: the frame rate (frame
    /// workloads) or the mean rate over the replayed trace minutes (text workloads).
    #[arg(long)]
    rate: Option<f64>,
    /// Share of the plain model's measured capacity offered as the mean rate (text workloads),
    /// and the most the frame workloads' 30 frames/s may take. In (0, 1]. The default 0.4
    /// keeps the bursty trace's busiest minute (2.15x the mean over the first six minutes, the
    /// ones a 60 s run replays) at 0.86 of the capacity: a share of 0.5 would put it above.
    #[arg(long, default_value_t = 0.4)]
    load: f64,
    /// How long the capacity is measured (after a 1 s warm-up), seconds.
    #[arg(long, default_value_t = 3.0)]
    capacity_seconds: f64,
    /// Most requests per batch.
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Longest wait of an under-full batch, ms (default 0: under load the queue fills batches
    /// by itself; on the language workload a 5 ms wait raised the plain model's p50 from 16.2
    /// to 19.7 ms, since few requests arrive within 5 ms at these rates).
    #[arg(long)]
    max_delay_ms: Option<f64>,
    /// Latency objective for goodput, ms (default per workload: 10 mnist-drift, 100 video,
    /// tweets and movies, 400 news).
    #[arg(long)]
    slo_ms: Option<f64>,
    /// mnist-drift: the fraction of the replay after which frames drift (noise, lower
    /// contrast).
    #[arg(long, default_value_t = 0.5)]
    drift_at: f64,
    /// Window (requests) for the worst-window agreement.
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// CPU threads (default: 1 for mnist-drift, every core for the others).
    #[arg(long)]
    threads: Option<usize>,
    /// Instead of the side-by-side run: find each system's highest rate whose p99 stays under
    /// `--p99-bound-ms` (Poisson arrivals for frame workloads, the bursty trace scaled for
    /// text).
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
    /// First rate of the sweep, per second (default: `--load` x the measured capacity).
    #[arg(long)]
    sweep_start: Option<f64>,
    /// The sweep's p99 bound, ms (default per workload: 10 mnist-drift, 100 video, 200 tweets
    /// and movies, 800 news).
    #[arg(long)]
    p99_bound_ms: Option<f64>,
    /// Length of the slices the replay plays in, seconds: each slice runs once per system
    /// (every engine started first, their order rotating from slice to slice), so that the
    /// machine's slow spells fall on every system alike. 0: each system replays the whole
    /// trace in turn (the order of the first sessions' results).
    #[arg(long, default_value_t = 15.0)]
    slice_seconds: f64,
    /// Where the JSON goes.
    #[arg(long, default_value = "target/bench-results")]
    out: PathBuf,
    /// Seed of the arrivals and the injected drift; a nonzero seed is part of the file names.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Apparate's tuning window: at least this many samples (default: the config's).
    #[arg(long)]
    window_min_samples: Option<usize>,
    /// The live loops' `live.learn_share` (most of a core background retraining may use over
    /// time; default: the config's).
    #[arg(long)]
    learn_share: Option<f64>,
    /// Load the workload (model, stream, clip index) and print how its replay would play at
    /// the workload's own rate (or `--rate`), then stop: no ramps trained, nothing measured.
    #[arg(long)]
    dry_run: bool,
    // `cargo bench` passes `--bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

fn missing(p: &Path) -> apparate::Error {
    apparate::Error::Input(format!(
        "{} is missing: run weights/fetch.sh first",
        p.display()
    ))
}

fn main() -> apparate::Result<()> {
    let args = Args::parse();
    check_args(&args)?;
    let wl: &Workload = workloads::find(&args.workload)?;
    let model_path = PathBuf::from(format!("weights/{}.apparate", wl.model));
    let ramps_path = PathBuf::from(format!("weights/{}.ramps", wl.model));
    let profile_path = PathBuf::from(format!("weights/{}.profile.json", wl.model));
    let stream = Path::new(wl.stream);
    for p in [model_path.as_path(), stream] {
        if !p.exists() {
            return Err(missing(p));
        }
    }
    if let Drift::Clips { index } = wl.drift
        && !Path::new(index).exists()
    {
        return Err(missing(Path::new(index)));
    }
    let systems = match (&args.systems, args.ablation) {
        (Some(s), _) => s.clone(),
        (None, true) => ABLATION_SYSTEMS.split(',').map(String::from).collect(),
        (None, false) => DEFAULT_SYSTEMS.split(',').map(String::from).collect(),
    };
    for s in systems.iter().chain(
        args.sweep
            .then_some(&args.sweep_systems)
            .into_iter()
            .flatten(),
    ) {
        check_system(s)?;
    }
    let threads = args.threads.or(wl.threads);
    let file = ModelFile::open(&model_path)?;
    let backbone = Backbone::load(
        CpuBackend::new(CpuConfig {
            threads,
            ..Default::default()
        })?,
        &file,
    )?;
    let device = backbone.backend().device_id();
    let image_input = backbone.image_input().cloned();
    eprintln!("{} on {device}", wl.model);

    // The stream: bootstrap (first 10%, in order: see `workloads::WORKLOADS`), then the replay.
    let mut shown = 0;
    let all = load_stream(
        stream,
        backbone.image_input(),
        Prefix::Fraction(1.0),
        &mut |done, total| {
            if done == total || done >= shown + 100 {
                eprintln!("  decoded {done} of {total} frames");
                shown = done;
            }
        },
    )?;
    let boot_n = Prefix::Fraction(0.1).len(all.len());
    if boot_n >= all.len() {
        return Err(apparate::Error::Input(format!(
            "{} holds {} inputs: too few for a bootstrap set and a replay",
            stream.display(),
            all.len()
        )));
    }
    let boot = all.slice(0..boot_n);
    let clips = match wl.drift {
        Drift::Clips { index } => read_clips(Path::new(index), all.len())?,
        _ => Vec::new(),
    };

    if args.dry_run {
        let rate = match (args.rate, wl.arrivals) {
            (Some(r), _) => r,
            (None, ArrivalKind::Frames { fps }) => fps,
            (None, ArrivalKind::Bursty) => {
                println!(
                    "{}: {} inputs, bootstrap {boot_n}, replay {}; bursty arrivals at a share of the capacity (measured in a real run)",
                    wl.name,
                    all.len(),
                    all.len() - boot_n
                );
                return Ok(());
            }
        };
        let n = (args.seconds * rate).floor() as usize;
        let pool = all.len() - boot_n;
        println!(
            "{}: {} inputs, bootstrap {boot_n} (the first 10%), replay {pool}; {n} requests at {rate}/s{}",
            wl.name,
            all.len(),
            if n > pool { " (the replay loops)" } else { "" }
        );
        if !clips.is_empty() {
            println!(
                "drift: {}",
                describe_clips(&clips, boot_n, &clip_marks(&clips, boot_n, pool, n))
            );
        }
        return Ok(());
    }

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
    if let Some(share) = args.learn_share {
        base_cfg.live.learn_share = share;
    }
    base_cfg.validate()?;
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
            max_queue_wait: None,
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
    // The replay's inputs (the stream after the bootstrap set), looped when a run needs more.
    let pool = to_inputs(&all.slice(boot_n..all.len()));

    // The plain model's capacity, unless every rate is given.
    let capacity = if args.rate.is_none() || (args.sweep && args.sweep_start.is_none()) {
        eprintln!(
            "measuring the plain model's capacity (closed loop, {} requests in flight, {} s after 1 s warm-up) ...",
            args.max_batch, args.capacity_seconds
        );
        Some(measure_capacity(
            &systems_ctx,
            &pool,
            args.max_batch,
            Duration::from_secs(1),
            Duration::from_secs_f64(args.capacity_seconds),
        )?)
    } else {
        None
    };
    let stem = format!(
        "serving-{}{}{}",
        wl.name,
        if args.sweep {
            "-sweep"
        } else if args.ablation {
            "-ablation"
        } else {
            ""
        },
        if args.seed != 0 {
            format!("-seed{}", args.seed)
        } else {
            String::new()
        }
    );

    if args.sweep {
        let bound = args.p99_bound_ms.unwrap_or(wl.p99_bound_ms);
        let start = match (args.sweep_start, &capacity) {
            (Some(s), _) => s,
            (None, Some(c)) => args.load * c.per_second,
            (None, None) => unreachable!("the capacity is measured when no start is given"),
        };
        eprintln!(
            "sweeping {} from {start:.1}/s (p99 bound {bound} ms), one step of each in turn ...",
            args.sweep_systems.join(", ")
        );
        let results = sweep(
            &systems_ctx,
            &args.sweep_systems,
            &pool,
            wl.arrivals,
            bound,
            start,
            &args,
        )?;
        let report = SweepReport {
            workload: wl.name.to_string(),
            commit: build_commit(),
            device: device.clone(),
            model: model_path.display().to_string(),
            arrivals: match wl.arrivals {
                ArrivalKind::Frames { .. } => "Poisson (seeded)".into(),
                ArrivalKind::Bursty => "the main run's minutes of the bursty trace, compressed into each step and scaled to each mean rate".into(),
            },
            capacity,
            p99_bound_ms: bound,
            step_seconds: args.sweep_seconds,
            precision: args.sweep_precision,
            batching,
            systems: results,
        };
        let json_path = args.out.join(format!("{stem}.json"));
        write_json(&json_path, &report)?;
        print_sweep(&report, &json_path);
        return Ok(());
    }

    // The schedule and the inputs, the same for every system.
    // The bursty trace's minutes of this run, and its busiest minute over their mean.
    let trace = match wl.arrivals {
        ArrivalKind::Frames { .. } => None,
        ArrivalKind::Bursty => {
            let t = read_trace(Path::new("benches/traces/bursty.csv"))?;
            let minutes = trace_minutes(&t, args.seconds);
            Some((t, minutes))
        }
    };
    let peak_factor = trace.as_ref().map_or(1.0, |(t, m)| peak_to_mean(&t[..*m]));
    let (rate, offer) = offered_rate(wl, &args, capacity.as_ref(), peak_factor);
    eprintln!("{offer}");
    let (arrivals, label) = match &trace {
        None => (Arrivals::Fixed { rate }, format!("fixed {rate:.1}/s")),
        Some((trace, minutes)) => {
            let minutes = *minutes;
            let peak = peak_factor * rate;
            (
                bursty(trace, minutes, Duration::from_secs(10), rate, args.seed),
                format!(
                    "bursty trace (first {minutes} minutes of benches/traces/bursty.csv, 10 s per trace minute, scaled to a mean of {rate:.1}/s; busiest minute {peak:.1}/s)"
                ),
            )
        }
    };
    arrivals.validate()?;
    let n_wanted = (args.seconds * rate).ceil() as usize;
    let offsets: Vec<Duration> = arrivals
        .schedule(n_wanted * 4)
        .into_iter()
        .take_while(|d| d.as_secs_f64() <= args.seconds)
        .collect();
    let n = offsets.len();
    if n == 0 {
        return Err(apparate::Error::Input(format!(
            "no request falls within {} s at {rate}/s: a longer --seconds or a higher --rate",
            args.seconds
        )));
    }
    if n > pool.len() {
        eprintln!(
            "the replay loops: {n} requests over a stream of {} inputs after the bootstrap set",
            pool.len()
        );
    }
    let mut inputs: Vec<Input> = (0..n).map(|i| pool[i % pool.len()].clone()).collect();
    let (drift, marks) = match wl.drift {
        Drift::None => (None, Vec::new()),
        Drift::Injected => {
            let from = ((n as f64 * args.drift_at) as usize).min(n);
            if let Some(inp) = &image_input {
                inject_drift(&mut inputs[from..], inp, args.seed);
            }
            (
                Some(format!(
                    "from request {from} of {n}: contrast x0.6 and Gaussian noise (sd 0.15 of full scale) on the raw pixels"
                )),
                vec![from],
            )
        }
        Drift::Clips { .. } => {
            let marks = clip_marks(&clips, boot_n, pool.len(), n);
            (Some(describe_clips(&clips, boot_n, &marks)), marks)
        }
    };
    eprintln!(
        "{n} requests over {:.0} s ({label})",
        offsets.last().map_or(0.0, |d| d.as_secs_f64())
    );

    let slo = args.slo_ms.unwrap_or(wl.slo_ms);
    let mut results: Vec<SystemResult> = Vec::new();
    let mut vanilla_classes: Option<Vec<Option<usize>>> = None;
    let mut systems = systems;
    // Agreement is judged against the plain model's answers, so it always runs (first).
    systems.retain(|s| s != "vanilla");
    systems.insert(0, "vanilla".into());
    let split = marks.first().copied().unwrap_or(n);
    // Every engine starts first; then the replay plays in slices, each slice once per system
    // with the systems' order rotating from slice to slice. Run one after another, whole, the
    // systems met different machines: on this shared 2-core VM the plain model's second run
    // differed from its first by up to 15% at the median, and the first adaptive system of a
    // text run was 10-20% slower than the second whichever loops it ran (tweets, systems
    // swapped: `docs/bench/serving-tweets-swapped-order-dcc2e2c.json`). In slices a slow
    // spell of the machine falls on every system alike.
    let mut engines = Vec::with_capacity(systems.len());
    for system in &systems {
        let started = std::time::Instant::now();
        let engine = systems_ctx.engine(system)?;
        let thresholds = engine.metrics().active();
        // Start-up (loading, the bootstrap pass of the adaptive systems) is not part of the
        // replay but is most of a short run's wall time: shown so run times can be planned.
        eprintln!(
            "started {system} in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        engines.push((engine, thresholds));
    }
    let slices = slices(&offsets, args.slice_seconds);
    let mut outcomes: Vec<Vec<Outcome>> = vec![Vec::with_capacity(n); systems.len()];
    // (steal, all) CPU ticks during each system's slices.
    let mut steal = vec![(0u64, 0u64); systems.len()];
    for (j, &(a, b)) in slices.iter().enumerate() {
        let at = offsets[a];
        let shifted: Vec<Duration> = offsets[a..b].iter().map(|&o| o - at).collect();
        let order: Vec<usize> = (0..systems.len())
            .map(|k| (j + k) % systems.len())
            .collect();
        eprintln!(
            "slice {} of {} (requests {a}..{b}): {}",
            j + 1,
            slices.len(),
            order
                .iter()
                .map(|&k| systems[k].as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        for k in order {
            let before = cpu_ticks();
            let got = run(&engines[k].0, &inputs[a..b], &shifted);
            if let (Some(b0), Some(b1)) = (before, cpu_ticks()) {
                steal[k].0 += b1.0.saturating_sub(b0.0);
                steal[k].1 += b1.1.saturating_sub(b0.1);
            }
            outcomes[k].extend(got.into_iter().map(|o| Outcome {
                scheduled: o.scheduled + at,
                ..o
            }));
        }
    }
    for (((system, (engine, thresholds)), outcomes), steal) in
        systems.iter().zip(engines).zip(&outcomes).zip(&steal)
    {
        let m = engine.shared_metrics();
        let events = engine.drain_events();
        engine.shutdown();
        let classes: Vec<Option<usize>> = outcomes.iter().map(|o| o.class).collect();
        let reference = vanilla_classes.get_or_insert_with(|| classes.clone());
        results.push(summarise(
            system,
            outcomes,
            reference,
            slo,
            args.window,
            &m,
            events,
            thresholds,
            split,
        ));
        if let Some(r) = results.last_mut() {
            r.cpu_steal_pct = (steal.1 > 0).then(|| 100.0 * steal.0 as f64 / steal.1 as f64);
        }
    }
    set_reductions(&mut results);

    let report = Report {
        workload: wl.name.to_string(),
        commit: build_commit(),
        device,
        model: model_path.display().to_string(),
        arrivals: label,
        capacity,
        offer,
        offered_rate: n as f64 / offsets.last().map_or(1.0, |d| d.as_secs_f64()),
        seconds: args.seconds,
        batching,
        slo_ms: slo,
        drift,
        drift_from: marks.first().copied(),
        drift_marks: marks,
        clips,
        window: args.window,
        seed: args.seed,
        systems: results,
    };
    let json_path = args.out.join(format!("{stem}.json"));
    write_json(&json_path, &report)?;
    let cdf = args.out.join(format!("{stem}-cdf.svg"));
    let timeline = args.out.join(format!("{stem}-timeline.svg"));
    plots::latency_cdf(&report, &cdf)?;
    plots::timeline(&report, &timeline)?;
    print_table(&report, &json_path);
    println!("plots: {} and {}", cdf.display(), timeline.display());
    Ok(())
}

/// The mean rate to offer, and the line that says where it comes from: `--rate`, or `--load` x
/// the measured capacity (text), or the workload's frame rate when it is within that share.
/// `peak_factor` is the busiest trace minute over the mean (1 for frames): the line gives the
/// busiest minute's share too, and says when it is above the capacity.
fn offered_rate(
    wl: &Workload,
    args: &Args,
    cap: Option<&Capacity>,
    peak_factor: f64,
) -> (f64, String) {
    let (Some(c), None) = (cap, args.rate) else {
        let r = args
            .rate
            .expect("the capacity is measured when no rate is given");
        return (
            r,
            format!("offering {r:.1}/s (--rate; capacity not measured)"),
        );
    };
    let share_rate = args.load * c.per_second;
    match wl.arrivals {
        ArrivalKind::Frames { fps } if fps <= share_rate => (
            fps,
            format!(
                "capacity {:.1}/s measured, offering {fps:.1}/s (share {:.2}; the workload's frame rate, within --load {})",
                c.per_second,
                fps / c.per_second,
                args.load
            ),
        ),
        ArrivalKind::Frames { fps } => (
            share_rate,
            format!(
                "capacity {:.1}/s measured: {fps:.1} frames/s would be a share of {:.2}, above --load {}; offering {share_rate:.1}/s (share {}) instead",
                c.per_second,
                fps / c.per_second,
                args.load,
                args.load
            ),
        ),
        ArrivalKind::Bursty => {
            let peak_share = args.load * peak_factor;
            (
                share_rate,
                format!(
                    "capacity {:.1}/s measured, offering {share_rate:.1}/s (share {}) as the trace's mean rate; its busiest minute offers {:.1}/s (share {peak_share:.2}){}",
                    c.per_second,
                    args.load,
                    share_rate * peak_factor,
                    if peak_share > 1.0 {
                        ": above the capacity, queues build up during that minute"
                    } else {
                        ""
                    }
                ),
            )
        }
    }
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

/// The drift line of a clip stream: the clips in order, where the replay starts, and the
/// requests where the clip changes.
fn describe_clips(clips: &[Clip], boot_n: usize, marks: &[usize]) -> String {
    let order: Vec<String> = clips
        .iter()
        .map(|c| format!("{} (from frame {})", c.name, c.start))
        .collect();
    format!(
        "natural: clips played one after another ({}); the replay starts at frame {boot_n} in `{}` and changes clip at requests {marks:?}",
        order.join(", "),
        clips[clip_of(clips, boot_n)].name,
    )
}

/// The busiest minute of a trace over its mean minute.
fn peak_to_mean(trace: &[u32]) -> f64 {
    let mean = trace.iter().map(|&c| c as f64).sum::<f64>() / trace.len().max(1) as f64;
    trace.iter().copied().max().unwrap_or(0) as f64 / mean.max(1e-9)
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

/// Every system the benchmark knows.
const SYSTEMS: &[&str] = &[
    "vanilla",
    "vanilla-again",
    "apparate",
    "apparate-paper",
    "apparate-no-shadow",
    "apparate-no-bound",
    "apparate-no-learning",
    "apparate-no-drift",
    "apparate-no-spend",
    "static-shared",
    "static-per-ramp",
    "oracle",
];

/// Refuses an unknown system name before anything is loaded or measured.
fn check_system(s: &str) -> apparate::Result<()> {
    if SYSTEMS.contains(&s) {
        Ok(())
    } else {
        Err(apparate::Error::Input(format!(
            "unknown system `{s}`: one of {}",
            SYSTEMS.join(", ")
        )))
    }
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
            "apparate"
            | "apparate-paper"
            | "apparate-no-shadow"
            | "apparate-no-bound"
            | "apparate-no-learning"
            | "apparate-no-drift"
            | "apparate-no-spend" => {
                match system {
                    "apparate-paper" => cfg.mode = Mode::Paper,
                    // Learning trains on shadow samples, so without shadow it has no data
                    // either: this ablation shows what live evidence buys as a whole.
                    "apparate-no-shadow" => cfg.live.shadow = false,
                    "apparate-no-bound" => cfg.live.bound = false,
                    "apparate-no-learning" => cfg.live.learning = false,
                    "apparate-no-drift" => cfg.live.drift_test = false,
                    "apparate-no-spend" => cfg.live.spend_slack = false,
                    _ => {}
                }
                builder = builder.ramps(&self.ramps).bootstrap(self.boot.clone());
            }
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
            s => return Err(check_system(s).unwrap_err()),
        }
        builder.apparate(cfg).build()
    }
}

/// `(steal, all)` CPU time since boot in clock ticks, summed over the CPUs (the first line of
/// `/proc/stat`: user, nice, system, idle, iowait, irq, softirq, steal); `None` where there is
/// no such file. Steal is time the hypervisor gave to other guests while this one wanted to
/// run: on the shared 2-core VM the results were measured on it reached a third of the CPU
/// time, which no interleaving can hide, so each system's share of it is reported.
fn cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let first = stat.lines().next()?;
    let v: Vec<u64> = first
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    Some((*v.get(7)?, v.iter().sum()))
}

/// `[a, b)` request ranges of the replay's slices: consecutive, non-empty, covering every
/// request; slice `j` holds the requests scheduled in `[j * seconds, (j + 1) * seconds)`,
/// except that a last slice shorter than half a slice joins the one before (a 60 s replay
/// has a request at 60.0 s). A length of 0 makes one slice.
fn slices(offsets: &[Duration], seconds: f64) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    let mut a = 0;
    for i in 1..=offsets.len() {
        let cut = i == offsets.len()
            || (seconds > 0.0
                && (offsets[i].as_secs_f64() / seconds).floor()
                    > (offsets[a].as_secs_f64() / seconds).floor());
        if cut {
            out.push((a, i));
            a = i;
        }
    }
    if let [.., (_, end), (a, b)] = &mut out[..]
        && (offsets[*b - 1] - offsets[*a]).as_secs_f64() < seconds / 2.0
    {
        *end = *b;
        out.pop();
    }
    out
}

/// Requests from stream inputs (image streams are already normalised).
fn to_inputs(stream: &Inputs) -> Vec<Input> {
    match stream {
        Inputs::Texts(t) => t.iter().cloned().map(Input::Text).collect(),
        Inputs::Images {
            pixels,
            count,
            per_image,
        } => (0..*count)
            .map(|i| Input::Normalized(pixels[i * per_image..(i + 1) * per_image].to_vec()))
            .collect(),
    }
}

/// The injected drift of `mnist-drift`: lower contrast and noise on the raw pixels of every
/// (normalised) frame of `frames`.
fn inject_drift(frames: &mut [Input], inp: &apparate::models::cnn::ImageInput, seed: u64) {
    let mut rng = SplitMix::new(seed ^ 0xd1f7);
    let c = inp.mean.len();
    for f in frames {
        if let Input::Normalized(v) = f {
            for (k, x) in v.iter_mut().enumerate() {
                let (mean, std) = (inp.mean[k % c], inp.std[k % c]);
                let raw = *x * std + mean;
                let noise: f32 = (0..4).map(|_| rng.uniform()).sum::<f32>() * 0.5 * 0.15;
                let raw = (raw * 0.6 + noise).clamp(0.0, 1.0);
                *x = (raw - mean) / std;
            }
        }
    }
}

/// Refuses lengths, shares and precisions that would make a run empty (every step "passes"
/// with no requests), overload the machine by construction, or a sweep that never ends (a
/// precision of 0).
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
    )?;
    check_real("--load", a.load, Excluded(0.0), Included(1.0))?;
    check_real(
        "--capacity-seconds",
        a.capacity_seconds,
        Excluded(0.0),
        Included(600.0),
    )?;
    check_real("--drift-at", a.drift_at, Included(0.0), Included(1.0))?;
    check_real(
        "--slice-seconds",
        a.slice_seconds,
        Included(0.0),
        Included(day),
    )?;
    if let Some(r) = a.rate {
        check_real("--rate", r, Excluded(0.0), Included(1e6))?;
    }
    Ok(())
}
