//! Serving metrics: HDR histograms of latencies (end to end, queueing, batch compute, release),
//! counters and gauges, rendered in the Prometheus text format.
//!
//! Histograms (the `hdrhistogram` crate: exact percentiles at a fixed relative precision, which
//! is what tail latency needs) record microseconds with 3 significant digits.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;

/// Largest latency a histogram holds (longer ones are clamped): one hour.
const MAX_MICROS: u64 = 3_600_000_000;

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_MICROS, 3).expect("valid histogram bounds")
}

/// A latency histogram.
pub struct Latency(Mutex<Histogram<u64>>);

impl Latency {
    fn new() -> Latency {
        Latency(Mutex::new(histogram()))
    }

    pub fn record(&self, d: Duration) {
        let us = (d.as_micros() as u64).clamp(1, MAX_MICROS);
        let mut h = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let _ = h.record(us);
    }

    /// A copy of the histogram (for percentiles and merging).
    pub fn snapshot(&self) -> Histogram<u64> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn reset(&self) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).reset();
    }
}

/// Percentiles of a histogram, in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Summary {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Summary {
    pub fn of(h: &Histogram<u64>) -> Summary {
        if h.is_empty() {
            return Summary::default();
        }
        let ms = |us: u64| us as f64 / 1e3;
        Summary {
            count: h.len(),
            mean_ms: h.mean() / 1e3,
            p50_ms: ms(h.value_at_quantile(0.5)),
            p90_ms: ms(h.value_at_quantile(0.9)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            max_ms: ms(h.max()),
        }
    }
}

/// Everything the engine counts.
pub struct Metrics {
    /// Submission to release, per request.
    pub end_to_end: Latency,
    /// Submission to the start of its batch.
    pub queue: Latency,
    /// Whole batch, start to the last stage's answers, per batch.
    pub compute: Latency,
    /// Start of the batch to this request's release (short for early exits).
    pub release: Latency,
    requests: AtomicU64,
    answered: AtomicU64,
    rejected: AtomicU64,
    expired: AtomicU64,
    cancelled: AtomicU64,
    failed: AtomicU64,
    batches: AtomicU64,
    agreed: AtomicU64,
    /// Releases per active-ramp point, and `final`.
    exits: Mutex<Vec<(String, u64)>>,
    /// Active ramps and their thresholds.
    active: Mutex<Vec<(String, f32)>>,
    window_accuracy: AtomicU64,
    /// Overhead of the live loops (see [`Overhead`]).
    shadow_batches: AtomicU64,
    shadow_us: AtomicU64,
    learn_runs: AtomicU64,
    learn_us: AtomicU64,
    learn_cpu_us: AtomicU64,
    adapter_cpu_us: AtomicU64,
    heads_swapped: AtomicU64,
}

/// What the live adaptation loops cost, counted since the engine started: shadow evaluation on
/// the request path (pooling every candidate ramp point on sampled batches) and head retraining
/// off it.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Overhead {
    /// Batches run (all of them).
    pub batches: u64,
    /// Batches that also pooled features at every candidate ramp point.
    pub shadow_batches: u64,
    /// Wall time those batches spent on it, ms in all.
    pub shadow_ms: f64,
    /// Head retraining runs, and their wall time (on the adapter's learner thread), ms in all.
    pub learn_runs: u64,
    pub learn_ms: f64,
    /// CPU time of those runs, ms in all (Linux; 0 elsewhere). Below `learn_ms` by the time
    /// the idle-priority learner waited for a free core.
    pub learn_cpu_ms: f64,
    /// CPU time of the adapter thread, ms in all (Linux; 0 elsewhere): the live loops'
    /// bookkeeping, tuning and planning for every batch, off the request path but on the same
    /// cores as it.
    pub adapter_cpu_ms: f64,
    /// Retrained heads that beat the serving head on held-out live samples and replaced it.
    pub heads_swapped: u64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics {
            end_to_end: Latency::new(),
            queue: Latency::new(),
            compute: Latency::new(),
            release: Latency::new(),
            requests: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            agreed: AtomicU64::new(0),
            exits: Mutex::new(vec![("final".into(), 0)]),
            active: Mutex::new(Vec::new()),
            window_accuracy: AtomicU64::new(1f64.to_bits()),
            shadow_batches: AtomicU64::new(0),
            shadow_us: AtomicU64::new(0),
            learn_runs: AtomicU64::new(0),
            learn_us: AtomicU64::new(0),
            learn_cpu_us: AtomicU64::new(0),
            adapter_cpu_us: AtomicU64::new(0),
            heads_swapped: AtomicU64::new(0),
        }
    }

    pub(crate) fn count_request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn count_rejected(&self) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn count_expired(&self) {
        self.expired.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn count_cancelled(&self) {
        self.cancelled.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn count_failed(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn count_batch(&self) {
        self.batches.fetch_add(1, Ordering::Relaxed);
    }

    /// One answer released at `exit` (a ramp point or `final`), agreeing with the model or not.
    pub(crate) fn count_answer(&self, exit: &str, agreed: bool) {
        self.answered.fetch_add(1, Ordering::Relaxed);
        if agreed {
            self.agreed.fetch_add(1, Ordering::Relaxed);
        }
        let mut e = self.exits.lock().unwrap_or_else(|p| p.into_inner());
        match e.iter_mut().find(|(n, _)| n == exit) {
            Some((_, c)) => *c += 1,
            None => e.push((exit.to_string(), 1)),
        }
    }

    pub(crate) fn count_shadow(&self, d: std::time::Duration) {
        self.shadow_batches.fetch_add(1, Ordering::Relaxed);
        self.shadow_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    pub(crate) fn count_learn(&self, s: &crate::adapt::LearnStat) {
        self.learn_runs.fetch_add(1, Ordering::Relaxed);
        self.learn_us
            .fetch_add(s.wall.as_micros() as u64, Ordering::Relaxed);
        if let Some(cpu) = s.cpu {
            self.learn_cpu_us
                .fetch_add(cpu.as_micros() as u64, Ordering::Relaxed);
        }
        self.heads_swapped
            .fetch_add(s.swapped as u64, Ordering::Relaxed);
    }

    /// The adapter thread's CPU time so far (a running total, not an increment).
    pub(crate) fn set_adapter_cpu(&self, total: std::time::Duration) {
        self.adapter_cpu_us
            .store(total.as_micros() as u64, Ordering::Relaxed);
    }

    /// The live loops' overhead so far.
    pub fn overhead(&self) -> Overhead {
        Overhead {
            batches: self.batches(),
            shadow_batches: self.shadow_batches.load(Ordering::Relaxed),
            shadow_ms: self.shadow_us.load(Ordering::Relaxed) as f64 / 1e3,
            learn_runs: self.learn_runs.load(Ordering::Relaxed),
            learn_ms: self.learn_us.load(Ordering::Relaxed) as f64 / 1e3,
            learn_cpu_ms: self.learn_cpu_us.load(Ordering::Relaxed) as f64 / 1e3,
            adapter_cpu_ms: self.adapter_cpu_us.load(Ordering::Relaxed) as f64 / 1e3,
            heads_swapped: self.heads_swapped.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn set_active(&self, ramps: Vec<(String, f32)>) {
        *self.active.lock().unwrap_or_else(|p| p.into_inner()) = ramps;
    }

    pub(crate) fn set_window_accuracy(&self, a: f64) {
        self.window_accuracy.store(a.to_bits(), Ordering::Relaxed);
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }
    pub fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }
    pub fn expired(&self) -> u64 {
        self.expired.load(Ordering::Relaxed)
    }
    pub fn cancelled(&self) -> u64 {
        self.cancelled.load(Ordering::Relaxed)
    }
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }
    pub fn batches(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }
    /// Fraction of answers (released so far) equal to the model's final answer.
    pub fn accuracy(&self) -> f64 {
        let n = self.answered();
        if n == 0 {
            1.0
        } else {
            self.agreed.load(Ordering::Relaxed) as f64 / n as f64
        }
    }
    pub fn window_accuracy(&self) -> f64 {
        f64::from_bits(self.window_accuracy.load(Ordering::Relaxed))
    }
    /// Releases per exit point (`final` included).
    pub fn exits(&self) -> Vec<(String, u64)> {
        self.exits.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    /// Active ramps and thresholds.
    pub fn active(&self) -> Vec<(String, f32)> {
        self.active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn render_prometheus(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = writeln!(s, "# HELP apparate_{name} {help}");
            let _ = writeln!(s, "# TYPE apparate_{name} counter");
            let _ = writeln!(s, "apparate_{name} {v}");
        };
        counter("requests_total", "Requests submitted.", self.requests());
        counter(
            "answered_total",
            "Requests answered by the model or a ramp.",
            self.answered(),
        );
        counter(
            "rejected_total",
            "Requests rejected because the queue was full.",
            self.rejected(),
        );
        counter(
            "expired_total",
            "Requests whose deadline passed while queued.",
            self.expired(),
        );
        counter(
            "cancelled_total",
            "Requests cancelled while queued.",
            self.cancelled(),
        );
        counter(
            "failed_total",
            "Requests answered with an error.",
            self.failed(),
        );
        counter("batches_total", "Batches run.", self.batches());
        let _ = writeln!(
            s,
            "# HELP apparate_exits_total Answers released, by exit point."
        );
        let _ = writeln!(s, "# TYPE apparate_exits_total counter");
        for (point, n) in self.exits() {
            let _ = writeln!(s, "apparate_exits_total{{exit=\"{point}\"}} {n}");
        }
        let _ = writeln!(
            s,
            "# HELP apparate_ramp_threshold Exit threshold of each active ramp."
        );
        let _ = writeln!(s, "# TYPE apparate_ramp_threshold gauge");
        let active = self.active();
        for (point, t) in &active {
            let _ = writeln!(s, "apparate_ramp_threshold{{ramp=\"{point}\"}} {t}");
        }
        let _ = writeln!(s, "# HELP apparate_active_ramps Active ramps.");
        let _ = writeln!(s, "# TYPE apparate_active_ramps gauge");
        let _ = writeln!(s, "apparate_active_ramps {}", active.len());
        let _ = writeln!(
            s,
            "# HELP apparate_window_accuracy Agreement with the model on the tuning window."
        );
        let _ = writeln!(s, "# TYPE apparate_window_accuracy gauge");
        let _ = writeln!(s, "apparate_window_accuracy {}", self.window_accuracy());
        for (name, h) in [
            ("end_to_end", &self.end_to_end),
            ("queue", &self.queue),
            ("compute", &self.compute),
            ("release", &self.release),
        ] {
            let h = h.snapshot();
            let _ = writeln!(s, "# HELP apparate_{name}_seconds {name} latency.");
            let _ = writeln!(s, "# TYPE apparate_{name}_seconds summary");
            for q in [0.5, 0.9, 0.99, 0.999] {
                let v = if h.is_empty() {
                    0
                } else {
                    h.value_at_quantile(q)
                };
                let _ = writeln!(
                    s,
                    "apparate_{name}_seconds{{quantile=\"{q}\"}} {}",
                    v as f64 / 1e6
                );
            }
            let sum = h.mean() * h.len() as f64 / 1e6;
            let _ = writeln!(s, "apparate_{name}_seconds_sum {sum}");
            let _ = writeln!(s, "apparate_{name}_seconds_count {}", h.len());
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_has_every_family() {
        let m = Metrics::new();
        m.count_request();
        m.count_answer("layer2.0", true);
        m.count_answer("final", false);
        m.end_to_end.record(Duration::from_millis(3));
        m.set_active(vec![("layer2.0".into(), 0.25)]);
        let t = m.render_prometheus();
        for needle in [
            "apparate_requests_total 1",
            "apparate_exits_total{exit=\"layer2.0\"} 1",
            "apparate_exits_total{exit=\"final\"} 1",
            "apparate_ramp_threshold{ramp=\"layer2.0\"} 0.25",
            "apparate_active_ramps 1",
            "apparate_end_to_end_seconds_count 1",
            "# TYPE apparate_queue_seconds summary",
        ] {
            assert!(t.contains(needle), "missing {needle} in\n{t}");
        }
        assert_eq!(m.accuracy(), 0.5);
        let s = Summary::of(&m.end_to_end.snapshot());
        assert!((s.p50_ms - 3.0).abs() < 0.01, "{s:?}");
    }
}
