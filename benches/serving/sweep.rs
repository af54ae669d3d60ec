//! The rate sweep of the serving benchmark: the highest offered rate each system serves with
//! its p99 under a bound.

use super::*;

#[derive(Serialize)]
pub(crate) struct SweepStep {
    pub(crate) rate: f64,
    pub(crate) requests: usize,
    pub(crate) errors: usize,
    pub(crate) achieved_rate: f64,
    pub(crate) latency: Percentiles,
    pub(crate) passed: bool,
}

#[derive(Serialize)]
pub(crate) struct SweepResult {
    pub(crate) system: String,
    /// The highest rate tried whose p99 stayed under the bound with no errors.
    pub(crate) highest_rate: f64,
    pub(crate) steps: Vec<SweepStep>,
}

#[derive(Serialize)]
pub(crate) struct SweepReport {
    pub(crate) workload: String,
    pub(crate) commit: String,
    pub(crate) device: String,
    pub(crate) model: String,
    pub(crate) arrivals: String,
    /// The plain model's measured capacity (absent when `--sweep-start` was given).
    pub(crate) capacity: Option<Capacity>,
    pub(crate) p99_bound_ms: f64,
    pub(crate) step_seconds: f64,
    pub(crate) precision: f64,
    pub(crate) batching: String,
    pub(crate) systems: Vec<SweepResult>,
}

/// Finds the highest rate whose p99 stays under `bound` (and nothing fails): doubles from
/// `start` until a rate misses (or halves until one passes), then bisects the bracket down to
/// `--sweep-precision`. Every step is a fresh engine on the same seeded schedule shape.
pub(crate) fn sweep(
    ctx: &Systems,
    system: &str,
    pool: &[Input],
    kind: ArrivalKind,
    bound: f64,
    start: f64,
    args: &Args,
) -> apparate::Result<SweepResult> {
    let trace = match kind {
        ArrivalKind::Frames { .. } => None,
        ArrivalKind::Bursty => Some(read_trace(Path::new("benches/traces/bursty.csv"))?),
    };
    let mut steps: Vec<SweepStep> = Vec::new();
    let mut step = |rate: f64| -> apparate::Result<bool> {
        let arrivals = match &trace {
            None => Arrivals::Poisson {
                rate,
                seed: args.seed,
            },
            Some(t) => {
                // The main run's minutes of the trace, compressed into one step.
                let minutes = trace_minutes(t, args.seconds);
                let minute = Duration::from_secs_f64(args.sweep_seconds / minutes as f64);
                bursty(t, minutes, minute, rate, args.seed)
            }
        };
        arrivals.validate()?;
        let want = (args.sweep_seconds * rate * 4.0).ceil() as usize + 16;
        let offsets: Vec<Duration> = arrivals
            .schedule(want)
            .into_iter()
            .take_while(|d| d.as_secs_f64() <= args.sweep_seconds)
            .collect();
        let inputs: Vec<Input> = (0..offsets.len())
            .map(|i| pool[i % pool.len()].clone())
            .collect();
        let engine = ctx.engine(system)?;
        let outcomes = run(&engine, &inputs, &offsets);
        engine.shutdown();
        let latency = percentiles(&outcomes);
        let errors = outcomes.iter().filter(|o| o.latency.is_none()).count();
        let span = offsets.last().map_or(1.0, |d| d.as_secs_f64()).max(1e-9);
        let passed = errors == 0 && latency.p99_ms <= bound;
        eprintln!(
            "  {system} at {rate:.1}/s: p99 {:.2} ms, {errors} errors -> {}",
            latency.p99_ms,
            if passed { "under" } else { "over" }
        );
        steps.push(SweepStep {
            rate,
            requests: outcomes.len(),
            errors,
            achieved_rate: (outcomes.len() - errors) as f64 / span,
            latency,
            passed,
        });
        Ok(passed)
    };
    let (mut lo, mut hi) = (0.0f64, f64::INFINITY);
    let mut r = start;
    for _ in 0..12 {
        if step(r)? {
            lo = r;
            if hi.is_finite() {
                break;
            }
            r *= 2.0;
        } else {
            hi = r;
            if lo > 0.0 {
                break;
            }
            r /= 2.0;
        }
    }
    while lo > 0.0 && hi.is_finite() && (hi - lo) / lo > args.sweep_precision {
        let mid = (lo + hi) / 2.0;
        if step(mid)? {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(SweepResult {
        system: system.to_string(),
        highest_rate: lo,
        steps,
    })
}

pub(crate) fn print_sweep(r: &SweepReport, json: &Path) {
    println!();
    println!(
        "{} rate sweep: {}, {}; p99 bound {} ms; {} s per step; commit {}; {}",
        r.workload, r.arrivals, r.batching, r.p99_bound_ms, r.step_seconds, r.commit, r.device
    );
    if let Some(c) = &r.capacity {
        println!(
            "capacity of the plain model: {:.1}/s (closed loop, {} in flight)",
            c.per_second, c.in_flight
        );
    }
    println!(
        "{:<20} {:>10} {:>22} {:>10}",
        "system", "highest/s", "p99 there (ms)", "steps"
    );
    for s in &r.systems {
        let at = s
            .steps
            .iter()
            .find(|x| x.rate == s.highest_rate)
            .map_or(f64::NAN, |x| x.latency.p99_ms);
        println!(
            "{:<20} {:>10.1} {:>22.2} {:>10}",
            s.system,
            s.highest_rate,
            at,
            s.steps.len()
        );
    }
    if let (Some(v), Some(a)) = (r.systems.first(), r.systems.get(1)) {
        println!(
            "{} vs {}: highest rate {:+.1}%",
            a.system,
            v.system,
            (a.highest_rate / v.highest_rate - 1.0) * 100.0
        );
    }
    println!("(full results: {})", json.display());
}
