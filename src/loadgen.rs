//! Open-loop load generation for the benchmarks: requests are sent on a schedule that never
//! waits for answers, and latency is measured from each request's *scheduled* send time (a
//! sender that falls behind does not hide the delay: no coordinated omission).

use std::path::Path;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::metrics::Summary;
use crate::rng::SplitMix;
use crate::serve::{Engine, Exit, Input, ResponseFuture};

/// An arrival process.
#[derive(Clone, Debug, Serialize)]
pub enum Arrivals {
    /// Exponential gaps at `rate` per second (seeded).
    Poisson { rate: f64, seed: u64 },
    /// Evenly spaced at `rate` per second (video: 30 frames/s).
    Fixed { rate: f64 },
    /// Per-minute request counts (a trace), each minute compressed to `minute` of wall time,
    /// requests spread uniformly at random inside their minute (seeded), counts scaled by
    /// `scale`.
    Trace {
        per_minute: Vec<u32>,
        minute: Duration,
        scale: f64,
        seed: u64,
    },
}

/// Longest schedule accepted: a day of sending is far beyond any benchmark, and keeps
/// `Instant` arithmetic far from overflow.
pub const MAX_SCHEDULE: Duration = Duration::from_secs(86_400);

impl Arrivals {
    /// Checks the rates and scales (finite and positive; a rate of 0 would schedule requests at
    /// an infinite offset).
    pub fn validate(&self) -> Result<()> {
        let positive = |knob: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(Error::config(knob, v, "(0, inf) per second"))
            }
        };
        match self {
            Arrivals::Poisson { rate, .. } | Arrivals::Fixed { rate } => positive("rate", *rate),
            Arrivals::Trace {
                per_minute,
                minute,
                scale,
                ..
            } => {
                if minute.is_zero() || *minute > MAX_SCHEDULE {
                    return Err(Error::config(
                        "minute",
                        format!("{minute:?}"),
                        format!("(0, {MAX_SCHEDULE:?}]"),
                    ));
                }
                // A zero scale or a trace of empty minutes would send nothing, silently.
                if !(scale.is_finite() && *scale > 0.0) {
                    return Err(Error::config("scale", scale, "(0, inf)"));
                }
                if per_minute.iter().all(|&c| c == 0) {
                    return Err(Error::config(
                        "trace",
                        "no requests",
                        "at least one minute with requests",
                    ));
                }
                Ok(())
            }
        }
    }

    /// Send offsets from the start for up to `n` requests, in order. Offsets beyond
    /// [`MAX_SCHEDULE`] (absurd rates: see [`Arrivals::validate`]) are cut off there instead of
    /// panicking.
    pub fn schedule(&self, n: usize) -> Vec<Duration> {
        let secs = |t: f64| {
            if t.is_nan() || t <= 0.0 {
                Duration::ZERO
            } else {
                Duration::try_from_secs_f64(t)
                    .unwrap_or(MAX_SCHEDULE)
                    .min(MAX_SCHEDULE)
            }
        };
        match self {
            Arrivals::Poisson { rate, seed } => {
                let mut rng = SplitMix::new(*seed);
                let mut t = 0.0f64;
                (0..n)
                    .map(|_| {
                        let u = ((rng.uniform() as f64 + 1.0) / 2.0).clamp(1e-12, 1.0);
                        t += -u.ln() / rate;
                        secs(t)
                    })
                    .collect()
            }
            Arrivals::Fixed { rate } => (1..=n).map(|i| secs(i as f64 / rate)).collect(),
            Arrivals::Trace {
                per_minute,
                minute,
                scale,
                seed,
            } => {
                let mut rng = SplitMix::new(*seed);
                let mut out = Vec::new();
                for (m, &c) in per_minute.iter().enumerate() {
                    // More than `n` in one minute would only be cut off below.
                    let k = ((c as f64 * scale).round() as usize).min(n);
                    let mut inside: Vec<f64> =
                        (0..k).map(|_| (rng.uniform() as f64 + 1.0) / 2.0).collect();
                    inside.sort_by(f64::total_cmp);
                    out.extend(
                        inside
                            .into_iter()
                            .map(|f| secs(minute.as_secs_f64() * (m as f64 + f))),
                    );
                    if out.len() >= n {
                        break;
                    }
                }
                out.truncate(n);
                out
            }
        }
    }
}

/// Reads a per-minute trace: a CSV with a header and the count in the last column.
pub fn read_trace(path: &Path) -> Result<Vec<u32>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Input(format!("{}: {e}", path.display())))?;
    let mut counts = Vec::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let last = line.rsplit(',').next().unwrap_or("");
        let c: u32 = last.trim().parse().map_err(|_| {
            Error::Input(format!(
                "{} line {}: `{last}` is not a count",
                path.display(),
                i + 1
            ))
        })?;
        counts.push(c);
    }
    if counts.is_empty() {
        return Err(Error::Input(format!("{} holds no counts", path.display())));
    }
    Ok(counts)
}

/// One request's outcome.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// Offset of its scheduled send time from the start.
    pub scheduled: Duration,
    /// Scheduled send time to release; `None` when it got an error.
    pub latency: Option<Duration>,
    pub class: Option<usize>,
    /// Exit point (`final` for the last stage), or the error.
    pub exit: String,
    /// How late the sender was against the schedule (the load generator's own error).
    pub sent_late: Duration,
    /// Submission to the start of its batch, and batch start to release (zero on errors).
    pub queued: Duration,
    pub computed: Duration,
}

/// Sends `inputs[i]` at `offsets[i]` from now (open loop) and collects every outcome.
pub fn run(engine: &Engine, inputs: &[Input], offsets: &[Duration]) -> Vec<Outcome> {
    let n = inputs.len().min(offsets.len());
    let start = Instant::now();
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::channel::<(Duration, Duration, ResponseFuture)>();
        let collector = scope.spawn(move || {
            let mut out = Vec::with_capacity(n);
            for (at, sent_late, f) in rx {
                let scheduled = start + at;
                out.push(match f.wait() {
                    Ok(r) => Outcome {
                        scheduled: at,
                        latency: Some(r.released_at.saturating_duration_since(scheduled)),
                        class: Some(r.class),
                        exit: match r.exit {
                            Exit::Ramp { point, .. } => point,
                            Exit::Final => "final".into(),
                        },
                        sent_late,
                        queued: r.timings.queued,
                        computed: r.timings.computed,
                    },
                    Err(e) => Outcome {
                        scheduled: at,
                        latency: None,
                        class: None,
                        exit: format!("error: {e}"),
                        sent_late,
                        queued: Duration::ZERO,
                        computed: Duration::ZERO,
                    },
                });
            }
            out
        });
        for i in 0..n {
            let due = start + offsets[i];
            wait_until(due);
            let sent_late = Instant::now().saturating_duration_since(due);
            let f = engine.infer(inputs[i].clone());
            if tx.send((offsets[i], sent_late, f)).is_err() {
                break;
            }
        }
        drop(tx);
        collector.join().unwrap_or_default()
    })
}

/// Sleeps until shortly before `due`, then yields until it: a plain sleep wakes up to the
/// kernel's timer slack (50 us by default) plus a scheduling delay late, and that error would
/// be charged to every request's latency alike, blurring the differences being measured.
fn wait_until(due: Instant) {
    const SPIN: Duration = Duration::from_micros(300);
    if let Some(w) = due.checked_duration_since(Instant::now())
        && w > SPIN
    {
        std::thread::sleep(w - SPIN);
    }
    while Instant::now() < due {
        std::thread::yield_now();
    }
}

/// Latency percentiles of outcomes (errors excluded), in milliseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

pub fn percentiles(outcomes: &[Outcome]) -> Percentiles {
    percentiles_of(outcomes.iter().filter_map(|o| o.latency))
}

/// Where the time went, over the answered requests: the sender's lateness, the wait for a
/// batch to start, and the batch's start to the release.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Breakdown {
    pub sent_late: Percentiles,
    pub queued: Percentiles,
    pub computed: Percentiles,
}

pub fn breakdown(outcomes: &[Outcome]) -> Breakdown {
    let ok = || outcomes.iter().filter(|o| o.latency.is_some());
    Breakdown {
        sent_late: percentiles_of(ok().map(|o| o.sent_late)),
        queued: percentiles_of(ok().map(|o| o.queued)),
        computed: percentiles_of(ok().map(|o| o.computed)),
    }
}

/// Percentiles of durations (microsecond resolution), in milliseconds.
pub fn percentiles_of(durations: impl Iterator<Item = Duration>) -> Percentiles {
    let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("bounds");
    for l in durations {
        let _ = h.record((l.as_micros() as u64).max(1));
    }
    if h.is_empty() {
        return Percentiles::default();
    }
    let q = |x: f64| h.value_at_quantile(x) as f64 / 1e3;
    let s = Summary::of(&h);
    Percentiles {
        count: h.len(),
        mean_ms: s.mean_ms,
        p50_ms: q(0.5),
        p90_ms: q(0.9),
        p95_ms: q(0.95),
        p99_ms: q(0.99),
        p999_ms: q(0.999),
        max_ms: h.max() as f64 / 1e3,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_breakdown_covers_answered_requests_only() {
        let ms = Duration::from_millis;
        let ok = |late, queued, computed| Outcome {
            scheduled: Duration::ZERO,
            latency: Some(ms(late + queued + computed)),
            class: Some(0),
            exit: "final".into(),
            sent_late: ms(late),
            queued: ms(queued),
            computed: ms(computed),
        };
        let failed = Outcome {
            latency: None,
            class: None,
            exit: "error: overloaded".into(),
            sent_late: ms(500),
            ..ok(0, 0, 0)
        };
        let b = breakdown(&[ok(1, 2, 3), ok(1, 4, 5), failed]);
        // HDR histograms keep 3 significant digits.
        let close = |a: f64, b: f64| (a - b).abs() <= b * 1e-3;
        assert_eq!(b.sent_late.count, 2);
        assert!(close(b.sent_late.max_ms, 1.0), "{b:?}");
        assert!(close(b.queued.max_ms, 4.0), "{b:?}");
        assert!(close(b.computed.p50_ms, 3.0), "{b:?}");
        assert_eq!(percentiles(&[]).count, 0);
    }

    #[test]
    fn absurd_rates_are_refused_and_never_panic() {
        for rate in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let a = Arrivals::Poisson { rate, seed: 1 };
            assert!(a.validate().is_err(), "{rate}");
            assert!(a.schedule(5).iter().all(|d| *d <= MAX_SCHEDULE));
            let a = Arrivals::Fixed { rate };
            assert!(a.validate().is_err(), "{rate}");
            assert_eq!(a.schedule(3).len(), 3);
        }
        let t = Arrivals::Trace {
            per_minute: vec![10, 10],
            minute: Duration::from_secs(1),
            scale: f64::INFINITY,
            seed: 2,
        };
        assert!(t.validate().is_err());
        assert_eq!(t.schedule(7).len(), 7);
        let silent = |per_minute: Vec<u32>, scale: f64| Arrivals::Trace {
            per_minute,
            minute: Duration::from_secs(1),
            scale,
            seed: 2,
        };
        assert!(silent(vec![10, 10], 0.0).validate().is_err());
        assert!(silent(vec![0, 0], 1.0).validate().is_err());
        assert!(silent(vec![0, 3], 1.0).validate().is_ok());
        assert!(
            Arrivals::Fixed { rate: 30.0 }.validate().is_ok()
                && Arrivals::Poisson { rate: 1e6, seed: 0 }.validate().is_ok()
        );
    }

    #[test]
    fn schedules_have_the_asked_rates() {
        let p = Arrivals::Poisson {
            rate: 100.0,
            seed: 1,
        }
        .schedule(10_000);
        let rate = 10_000.0 / p.last().unwrap().as_secs_f64();
        assert!((rate - 100.0).abs() < 5.0, "{rate}");
        assert!(p.windows(2).all(|w| w[0] <= w[1]));
        let f = Arrivals::Fixed { rate: 30.0 }.schedule(30);
        assert!((f[29].as_secs_f64() - 1.0).abs() < 1e-9);
        let t = Arrivals::Trace {
            per_minute: vec![10, 0, 30],
            minute: Duration::from_secs(1),
            scale: 1.0,
            seed: 3,
        }
        .schedule(100);
        assert_eq!(t.len(), 40);
        assert!(t[..10].iter().all(|d| d.as_secs_f64() < 1.0));
        assert!(t[10..].iter().all(|d| d.as_secs_f64() >= 2.0));
    }
}
