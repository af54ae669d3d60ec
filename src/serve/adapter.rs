//! The adapter thread: feeds the adaptation loops ([`Loops`]) the record of every finished batch and publishes
//! the configurations it answers with (the executor picks them up between batches) and its
//! events. Nothing on the request path waits for it; it ends when the releaser drops its sender.

use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};

use crate::adapt::{ActiveConfig, AdaptEvent, BatchRecord, HeadUpdate, Loops};
use crate::metrics::Metrics;

/// How often the adapter thread publishes its CPU time (the last reading lags by at most this).
const ADAPTER_CPU_READ_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

pub(crate) struct Adapter {
    /// Nice value the thread gives itself ([`crate::adapt::ApparateConfig::adapter_nice`]).
    pub nice: usize,
    pub controller: Loops,
    /// Retrained heads for the executor; pushed before the configuration that expects them.
    pub head_updates: Arc<Mutex<Vec<HeadUpdate>>>,
    pub metrics: Arc<Metrics>,
    pub events: Arc<Mutex<Vec<AdaptEvent>>>,
    pub active: Arc<Mutex<Arc<ActiveConfig>>>,
    /// Point of each ramp of the file.
    pub points: Vec<String>,
}

impl Adapter {
    pub fn run(mut self, records: Receiver<BatchRecord>) {
        if self.nice > 0 {
            // Refused only by an unusual sandbox; the loops work the same at normal priority.
            let _ = crate::sched::nice(self.nice as i32);
        }
        let mut cpu_read = std::time::Instant::now();
        for rec in records {
            let changed = self.controller.on_batch(rec);
            for s in self.controller.take_learn_stats() {
                self.metrics.count_learn(&s);
            }
            // Not every batch: the thread CPU clock is a system call that takes the scheduler's
            // run-queue lock, and per batch it was about a third of the adapter's own samples in a
            // `perf` profile of an MNIST run (a 1 ms model at 30 batches/s).
            if cpu_read.elapsed() >= ADAPTER_CPU_READ_EVERY {
                cpu_read = std::time::Instant::now();
                if let Some(cpu) = crate::sched::thread_cpu_time() {
                    self.metrics.set_adapter_cpu(cpu);
                }
            }
            let heads = self.controller.take_head_updates();
            if !heads.is_empty() {
                self.head_updates
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend(heads);
            }
            let evs = self.controller.drain_events();
            if let Some(a) = evs.last() {
                self.metrics.set_window_accuracy(a.window_accuracy);
            }
            if let Some(c) = changed {
                publish(&self.metrics, &self.points, &c);
                *self.active.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(c);
            }
            if !evs.is_empty() {
                self.events
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend(evs);
            }
        }
        if let Some(cpu) = crate::sched::thread_cpu_time() {
            self.metrics.set_adapter_cpu(cpu);
        }
    }
}

/// Shows the active ramps and thresholds in the metrics.
pub(crate) fn publish(m: &Metrics, points: &[String], c: &ActiveConfig) {
    m.set_active(
        c.ramps
            .iter()
            .zip(&c.thresholds)
            .map(|(&r, &t)| (points[r].clone(), t))
            .collect(),
    );
}
