//! What the serving benchmark reports per system (latency percentiles, agreement, exits,
//! adaptation events, the live loops' overhead, the share of the oracle's reduction) and the
//! tables it prints.

use super::*;

#[derive(Serialize)]
pub(crate) struct SystemResult {
    pub(crate) system: String,
    pub(crate) latency: Percentiles,
    /// Sender lateness, queueing, and batch start to release.
    pub(crate) breakdown: Breakdown,
    pub(crate) requests: usize,
    pub(crate) errors: usize,
    pub(crate) achieved_rate: f64,
    pub(crate) goodput: f64,
    pub(crate) agreement: f64,
    /// Agreement before and after the drift starts (vision).
    pub(crate) agreement_before_drift: f64,
    pub(crate) agreement_after_drift: f64,
    pub(crate) worst_window_agreement: f64,
    /// Agreement of every `--window` consecutive requests (the first included), in order: where
    /// the worst window lies (the start, a drift).
    pub(crate) window_agreements: Vec<f64>,
    /// Median latency before and after the drift starts (vision).
    pub(crate) p50_before_drift_ms: f64,
    pub(crate) p50_after_drift_ms: f64,
    pub(crate) exits: Vec<(String, f64)>,
    /// The replay in four parts of equal request count, in order: where an adaptive system's
    /// gains are (after its first retrained heads, say) when the whole-run median hides them.
    pub(crate) quarters: Vec<Quarter>,
    pub(crate) average_batch: f64,
    pub(crate) events: Vec<AdaptEvent>,
    pub(crate) thresholds: Vec<(String, f32)>,
    /// Share of the CPU time the hypervisor stole (gave to other guests) during this system's
    /// slices, %: a system whose slices fell in a steal spell ran on a slower machine.
    /// `None` off Linux.
    pub(crate) cpu_steal_pct: Option<f64>,
    /// What the live loops cost (zero for systems without them).
    pub(crate) overhead: OverheadReport,
    /// (vanilla p50 - this p50) / (vanilla p50 - oracle p50): the share of the oracle's median
    /// reduction this system captures (`None` without an oracle run, or when the oracle is not
    /// faster than the plain model).
    pub(crate) reduction_vs_oracle: Option<f64>,
    /// Per request, for the plots.
    #[serde(skip)]
    pub(crate) agree: Vec<bool>,
    #[serde(skip)]
    pub(crate) latency_ms: Vec<f64>,
}

/// One part of the replay (see [`SystemResult::quarters`]).
#[derive(Serialize)]
pub(crate) struct Quarter {
    /// Requests `[from, to)`.
    pub(crate) from: usize,
    pub(crate) to: usize,
    pub(crate) p50_ms: f64,
    /// Share of the part's requests answered at a ramp.
    pub(crate) early_exits: f64,
}

#[derive(Serialize)]
pub(crate) struct Report {
    pub(crate) workload: String,
    pub(crate) commit: String,
    pub(crate) device: String,
    pub(crate) model: String,
    pub(crate) arrivals: String,
    /// The plain model's measured capacity (absent when `--rate` was given).
    pub(crate) capacity: Option<Capacity>,
    /// Where the offered rate comes from (capacity and share, or `--rate`).
    pub(crate) offer: String,
    pub(crate) offered_rate: f64,
    pub(crate) seconds: f64,
    pub(crate) batching: String,
    pub(crate) slo_ms: f64,
    pub(crate) drift: Option<String>,
    /// First drifted request (mnist-drift: the injected drift; video: the first clip change).
    pub(crate) drift_from: Option<usize>,
    /// Every request where the stream changes (the injected drift, or each clip change).
    pub(crate) drift_marks: Vec<usize>,
    /// The clips of a clip stream, in stream order.
    pub(crate) clips: Vec<workloads::Clip>,
    /// Requests per agreement window.
    pub(crate) window: usize,
    pub(crate) seed: u64,
    pub(crate) systems: Vec<SystemResult>,
}

/// The live loops' overhead counters with the ratios the tables show.
#[derive(Serialize, Default)]
pub(crate) struct OverheadReport {
    #[serde(flatten)]
    pub(crate) counters: apparate::metrics::Overhead,
    /// Batch compute time (batch start to its last answers), ms in all batches.
    pub(crate) compute_ms: f64,
    /// Shadow batches as a share of all batches, %.
    pub(crate) shadow_batches_pct: f64,
    /// Shadow evaluation time per shadow batch, ms.
    pub(crate) shadow_ms_per_shadow_batch: f64,
    /// Shadow evaluation time as a share of the batch compute time, %.
    pub(crate) shadow_pct_of_compute: f64,
    /// The adapter thread's CPU time as a share of the batch compute time, %.
    pub(crate) adapter_pct_of_compute: f64,
}

impl OverheadReport {
    fn of(m: &apparate::metrics::Metrics) -> OverheadReport {
        let o = m.overhead();
        let h = m.compute.snapshot();
        let compute_ms = h.mean() * h.len() as f64 / 1e3;
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        OverheadReport {
            counters: o,
            compute_ms,
            shadow_batches_pct: 100.0 * ratio(o.shadow_batches as f64, o.batches as f64),
            shadow_ms_per_shadow_batch: ratio(o.shadow_ms, o.shadow_batches as f64),
            shadow_pct_of_compute: 100.0 * ratio(o.shadow_ms, compute_ms),
            adapter_pct_of_compute: 100.0 * ratio(o.adapter_cpu_ms, compute_ms),
        }
    }
}

/// Fills every system's `reduction_vs_oracle` from the first system (the plain model) and the
/// `oracle` run, when there is one that is faster than the plain model.
pub(crate) fn set_reductions(systems: &mut [SystemResult]) {
    let (Some(base), Some(oracle)) = (
        systems.first().map(|s| s.latency.p50_ms),
        systems
            .iter()
            .find(|s| s.system == "oracle")
            .map(|s| s.latency.p50_ms),
    ) else {
        return;
    };
    if base - oracle <= 0.0 {
        return;
    }
    for s in systems.iter_mut() {
        s.reduction_vs_oracle = Some((base - s.latency.p50_ms) / (base - oracle));
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn summarise(
    system: &str,
    outcomes: &[Outcome],
    reference: &[Option<usize>],
    slo_ms: f64,
    window: usize,
    m: &apparate::metrics::Metrics,
    events: Vec<AdaptEvent>,
    thresholds: Vec<(String, f32)>,
    drift_from: usize,
) -> SystemResult {
    let n = outcomes.len();
    let agree: Vec<bool> = outcomes
        .iter()
        .zip(reference)
        .map(|(o, r)| o.class.is_some() && o.class == *r)
        .collect();
    let frac = |v: &[bool]| v.iter().filter(|a| **a).count() as f64 / v.len().max(1) as f64;
    let agreement = frac(&agree);
    let split = drift_from.min(agree.len());
    let windows: Vec<f64> = agree
        .chunks(window.max(1))
        .filter(|c| c.len() == window)
        .map(|c| c.iter().filter(|a| **a).count() as f64 / c.len() as f64)
        .collect();
    // Worst window after the first (tuning needs one).
    let worst = windows.iter().skip(1).copied().fold(1.0, f64::min);
    let span = outcomes
        .last()
        .map_or(1.0, |o| o.scheduled.as_secs_f64())
        .max(1e-9);
    let good = outcomes
        .iter()
        .filter(|o| o.latency.is_some_and(|l| l.as_secs_f64() * 1e3 <= slo_ms))
        .count();
    let mut exits: Vec<(String, f64)> = Vec::new();
    for o in outcomes {
        match exits.iter_mut().find(|(p, _)| *p == o.exit) {
            Some((_, c)) => *c += 1.0,
            None => exits.push((o.exit.clone(), 1.0)),
        }
    }
    exits.iter_mut().for_each(|(_, c)| *c /= n.max(1) as f64);
    exits.sort_by(|a, b| a.0.cmp(&b.0));
    SystemResult {
        system: system.to_string(),
        latency: percentiles(outcomes),
        breakdown: breakdown(outcomes),
        requests: n,
        errors: outcomes.iter().filter(|o| o.latency.is_none()).count(),
        achieved_rate: outcomes.iter().filter(|o| o.latency.is_some()).count() as f64 / span,
        goodput: good as f64 / span,
        agreement,
        agreement_before_drift: frac(&agree[..split]),
        agreement_after_drift: frac(&agree[split..]),
        worst_window_agreement: worst,
        window_agreements: windows,
        p50_before_drift_ms: percentiles(&outcomes[..split]).p50_ms,
        p50_after_drift_ms: percentiles(&outcomes[split..]).p50_ms,
        exits,
        quarters: (0..4)
            .map(|q| {
                let (from, to) = (q * n / 4, (q + 1) * n / 4);
                let part = &outcomes[from..to];
                let early = part
                    .iter()
                    .filter(|o| o.latency.is_some() && o.exit != "final")
                    .count();
                Quarter {
                    from,
                    to,
                    p50_ms: percentiles(part).p50_ms,
                    early_exits: early as f64 / part.len().max(1) as f64,
                }
            })
            .collect(),
        average_batch: m.answered() as f64 / m.batches().max(1) as f64,
        events,
        thresholds,
        cpu_steal_pct: None,
        overhead: OverheadReport::of(m),
        reduction_vs_oracle: None,
        latency_ms: outcomes
            .iter()
            .filter_map(|o| o.latency)
            .map(|l| l.as_secs_f64() * 1e3)
            .collect(),
        agree,
    }
}

pub(crate) fn print_table(r: &Report, json: &Path) {
    println!();
    println!(
        "{} workload: {} requests, {} ({:.1}/s offered), {}; SLO {} ms; commit {}; {}",
        r.workload,
        r.systems.first().map_or(0, |s| s.requests),
        r.arrivals,
        r.offered_rate,
        r.batching,
        r.slo_ms,
        r.commit,
        r.device
    );
    println!("load: {}", r.offer);
    if let Some(d) = &r.drift {
        println!("drift: {d}");
    }
    println!(
        "{:<20} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>8} {:>7} {:>7} {:>6} {:>6}",
        "system",
        "p50",
        "p90",
        "p95",
        "p99",
        "p99.9",
        "max",
        "rate/s",
        "goodput",
        "agree",
        "worst",
        "early",
        "batch"
    );
    let base = r
        .systems
        .first()
        .map(|s| s.latency.clone())
        .unwrap_or_default();
    for s in &r.systems {
        let l = &s.latency;
        let early: f64 = s
            .exits
            .iter()
            .filter(|(p, _)| p != "final" && !p.starts_with("error"))
            .map(|(_, f)| f)
            .fold(0.0, |a, b| a + b);
        println!(
            "{:<20} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>7.1} {:>8.1} {:>6.2}% {:>6.2}% {:>5.1}% {:>6.2}",
            s.system,
            l.p50_ms,
            l.p90_ms,
            l.p95_ms,
            l.p99_ms,
            l.p999_ms,
            l.max_ms,
            s.achieved_rate,
            s.goodput,
            s.agreement * 100.0,
            s.worst_window_agreement * 100.0,
            early * 100.0,
            s.average_batch
        );
    }
    if r.drift.is_some() {
        for s in &r.systems {
            println!(
                "{:<20} before the drift: agreement {:.2}%, p50 {:.2} ms; after: {:.2}%, p50 {:.2} ms",
                s.system,
                s.agreement_before_drift * 100.0,
                s.p50_before_drift_ms,
                s.agreement_after_drift * 100.0,
                s.p50_after_drift_ms
            );
        }
    }
    for s in &r.systems {
        let part = |f: &dyn Fn(&Quarter) -> String| {
            s.quarters.iter().map(f).collect::<Vec<_>>().join(" / ")
        };
        println!(
            "{:<20} by quarter of the replay: p50 {} ms; early exits {}; CPU steal {}",
            s.system,
            part(&|q| format!("{:.2}", q.p50_ms)),
            part(&|q| format!("{:.0}%", q.early_exits * 100.0)),
            s.cpu_steal_pct
                .map_or("unknown".into(), |p| format!("{p:.1}%"))
        );
    }
    for s in r.systems.iter().skip(1) {
        let l = &s.latency;
        println!(
            "{:<20} vs vanilla: p50 {:+.1}%  p95 {:+.1}%  p99 {:+.1}%",
            s.system,
            (l.p50_ms / base.p50_ms - 1.0) * 100.0,
            (l.p95_ms / base.p95_ms - 1.0) * 100.0,
            (l.p99_ms / base.p99_ms - 1.0) * 100.0
        );
    }
    if r.systems.iter().any(|s| s.reduction_vs_oracle.is_some()) {
        for s in r.systems.iter().skip(1).filter(|s| s.system != "oracle") {
            if let Some(x) = s.reduction_vs_oracle {
                println!(
                    "{:<20} reduction vs oracle: {:+.1}% of the oracle's median reduction",
                    s.system,
                    x * 100.0
                );
            }
        }
    }
    // The adaptation's cost: shadow evaluation (on the request path), retraining (wall and
    // CPU time of the learner thread), the adapter thread's CPU time (every system has one;
    // the plain model's shows the floor).
    if !r.systems.is_empty() {
        println!(
            "{:<20} {:>8} {:>9} {:>10} {:>7} {:>10} {:>10} {:>11} {:>9} {:>8}",
            "overhead",
            "shadow%",
            "ms/shadow",
            "%compute",
            "learns",
            "learn ms",
            "learn cpu",
            "adapter cpu",
            "%compute",
            "swapped"
        );
        for s in &r.systems {
            let o = &s.overhead;
            println!(
                "{:<20} {:>7.1}% {:>9.3} {:>9.2}% {:>7} {:>10.1} {:>10.1} {:>11.1} {:>8.2}% {:>8}",
                s.system,
                o.shadow_batches_pct,
                o.shadow_ms_per_shadow_batch,
                o.shadow_pct_of_compute,
                o.counters.learn_runs,
                o.counters.learn_ms,
                o.counters.learn_cpu_ms,
                o.counters.adapter_cpu_ms,
                o.adapter_pct_of_compute,
                o.counters.heads_swapped
            );
        }
    }
    for s in &r.systems {
        let b = &s.breakdown;
        println!(
            "{:<20} p50 / p99 of: sender late {:.3} / {:.3}, queued {:.3} / {:.3}, batch start to release {:.3} / {:.3}",
            s.system,
            b.sent_late.p50_ms,
            b.sent_late.p99_ms,
            b.queued.p50_ms,
            b.queued.p99_ms,
            b.computed.p50_ms,
            b.computed.p99_ms
        );
    }
    println!(
        "(latency in ms from the scheduled send time; full results: {})",
        json.display()
    );
}
