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

/// One system's search: doubles from the start rate until a rate misses (or halves until one
/// passes), then bisects the bracket down to `precision`.
struct Search {
    lo: f64,
    hi: f64,
    next: Option<f64>,
    /// Doubling or halving steps taken (at most 12).
    widening: usize,
    precision: f64,
}

impl Search {
    fn new(start: f64, precision: f64) -> Search {
        Search {
            lo: 0.0,
            hi: f64::INFINITY,
            next: Some(start),
            widening: 0,
            precision,
        }
    }

    /// Records the outcome at the rate `next` gave, and picks the next rate (`None`: done).
    fn record(&mut self, passed: bool) {
        let Some(r) = self.next else { return };
        if passed {
            self.lo = r;
        } else {
            self.hi = r;
        }
        let bracketed = self.lo > 0.0 && self.hi.is_finite();
        self.next = if !bracketed {
            self.widening += 1;
            (self.widening < 12).then(|| if passed { r * 2.0 } else { r / 2.0 })
        } else if (self.hi - self.lo) / self.lo > self.precision {
            Some((self.lo + self.hi) / 2.0)
        } else {
            None
        };
    }
}

/// Finds each system's highest rate whose p99 stays under `bound` (and nothing fails), each
/// by its own [`Search`] from `start`. The systems' steps are interleaved, one step of each in
/// turn with the order rotating: run one system's whole search after another's, the plain
/// model's highest rate moved from 454 to 249-316/s within 15 minutes on a VM whose steal
/// time reached a third of the CPU, and the two systems' ratio from -35% to +49%
/// (docs/results.md, issue 13, fifth session).
/// Every step is a fresh engine on the same seeded schedule shape.
pub(crate) fn sweep(
    ctx: &Systems,
    systems: &[String],
    pool: &[Input],
    kind: ArrivalKind,
    bound: f64,
    start: f64,
    args: &Args,
) -> apparate::Result<Vec<SweepResult>> {
    let trace = match kind {
        ArrivalKind::Frames { .. } => None,
        ArrivalKind::Bursty => Some(read_trace(Path::new("benches/traces/bursty.csv"))?),
    };
    let step = |system: &str, rate: f64| -> apparate::Result<SweepStep> {
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
        Ok(SweepStep {
            rate,
            requests: outcomes.len(),
            errors,
            achieved_rate: (outcomes.len() - errors) as f64 / span,
            latency,
            passed,
        })
    };
    let mut searches: Vec<Search> = systems
        .iter()
        .map(|_| Search::new(start, args.sweep_precision))
        .collect();
    let mut steps: Vec<Vec<SweepStep>> = systems.iter().map(|_| Vec::new()).collect();
    let mut round = 0;
    while searches.iter().any(|s| s.next.is_some()) {
        for k in (0..systems.len()).map(|k| (k + round) % systems.len()) {
            if let Some(rate) = searches[k].next {
                let st = step(&systems[k], rate)?;
                searches[k].record(st.passed);
                steps[k].push(st);
            }
        }
        round += 1;
    }
    Ok(systems
        .iter()
        .zip(searches)
        .zip(steps)
        .map(|((system, s), steps)| SweepResult {
            system: system.clone(),
            highest_rate: s.lo,
            steps,
        })
        .collect())
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
