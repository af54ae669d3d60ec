//! The releaser thread takes the executor's messages in order, waits for each ramp's decisions
//! (on `cuda`: an async copy into pinned memory and its event, so the stream never waits for
//! the host) and completes the requests that exit at once, while the executor keeps the device
//! busy with the next stages. At the end of a batch it completes the remaining requests and
//! sends the batch's record to the adapter. On synchronous backends (CPU, the emulated device)
//! the decisions are ready when issued and the same path runs.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender};
use std::time::Instant;

use super::health::{Health, PEER_FAILURE_WAIT};
use super::queue::Pending;
use super::{Exit, Response, ServeError, Timings};
use crate::adapt::{ActiveConfig, BatchRecord, ShadowRecord};
use crate::backend::PendingDecisions;
use crate::metrics::Metrics;

/// What the executor tells the releaser, in order.
pub(crate) enum Release {
    /// A batch starts: its requests move to the releaser.
    Begin {
        batch: Vec<Pending>,
        start: Instant,
        cfg: Arc<ActiveConfig>,
    },
    /// Active ramp `active` (ramp `ramp` of the file) was issued.
    Ramp {
        active: usize,
        ramp: usize,
        pending: Box<dyn PendingDecisions>,
    },
    /// The last stage's answers.
    End {
        finals: Vec<(u32, f32)>,
        stage_ms: Option<Vec<f64>>,
        /// Shadow batches: every candidate point's pooled features.
        shadow: Option<ShadowRecord>,
    },
    /// The batch failed; unreleased requests get the error.
    Failed(String),
}

/// The releaser's state for the batch in flight.
struct InFlight {
    batch: Vec<Pending>,
    start: Instant,
    cfg: Arc<ActiveConfig>,
    /// Per input: `(active ramp, class)` where it was released.
    released: Vec<Option<(usize, u32)>>,
    /// Per input, per active ramp so far: `(class, u)`.
    outputs: Vec<Vec<(u32, f32)>>,
    /// When each active ramp's decisions arrived: `(active index, ramp of the file, instant)`.
    ramp_times: Vec<(usize, usize, Instant)>,
}

pub(crate) struct Releaser {
    pub metrics: Arc<Metrics>,
    pub records: Sender<BatchRecord>,
    pub labels: Vec<String>,
    /// Point of each ramp of the file.
    pub points: Vec<String>,
    /// Back-date each answer to the first ramp that agrees with the final one (benchmarks).
    pub oracle: bool,
    /// Why the engine failed, if the executor dies mid-batch.
    pub health: Arc<Health>,
}

impl Releaser {
    pub fn run(self, rx: Receiver<Release>) {
        let mut cur: Option<InFlight> = None;
        for msg in rx {
            match msg {
                Release::Begin { batch, start, cfg } => {
                    if let Some(old) = cur.take() {
                        // A batch without an end: the executor failed during it.
                        self.fail_with(
                            old,
                            ServeError::Failed(
                                "the executor abandoned this request's batch".into(),
                            ),
                        );
                    }
                    for p in &batch {
                        self.metrics.queue.record(start - p.submitted);
                    }
                    let n = batch.len();
                    cur = Some(InFlight {
                        batch,
                        start,
                        cfg,
                        released: vec![None; n],
                        outputs: vec![Vec::new(); n],
                        ramp_times: Vec::new(),
                    });
                }
                Release::Ramp {
                    active,
                    ramp,
                    pending,
                } => {
                    let Some(b) = cur.as_mut() else {
                        continue;
                    };
                    match pending.wait() {
                        Ok(decisions) => {
                            let now = Instant::now();
                            b.ramp_times.push((active, ramp, now));
                            for (i, d) in decisions.iter().enumerate().take(b.batch.len()) {
                                b.outputs[i].push((d.class, d.uncertainty));
                                if d.exit && !self.oracle && b.released[i].is_none() {
                                    b.released[i] = Some((active, d.class));
                                    self.complete(
                                        &b.batch[i],
                                        b.start,
                                        now,
                                        d.class as usize,
                                        1.0 - d.uncertainty,
                                        Exit::Ramp {
                                            index: ramp,
                                            point: self
                                                .points
                                                .get(ramp)
                                                .cloned()
                                                .unwrap_or_default(),
                                        },
                                    );
                                }
                            }
                        }
                        Err(e) => {
                            if let Some(b) = cur.take() {
                                self.fail(b, &e.to_string());
                            }
                        }
                    }
                }
                Release::End {
                    finals,
                    stage_ms,
                    shadow,
                } => {
                    if let Some(b) = cur.take() {
                        if finals.len() == b.batch.len() {
                            self.finish(b, finals, stage_ms, shadow);
                        } else {
                            // Never answer "class 0" for an input the model gave no answer for.
                            let e = format!(
                                "the model answered {} of the batch's {} inputs",
                                finals.len(),
                                b.batch.len()
                            );
                            self.fail(b, &e);
                        }
                    }
                }
                Release::Failed(e) => {
                    if let Some(b) = cur.take() {
                        self.fail(b, &e);
                    }
                }
            }
        }
        // The executor ends only between batches, unless it panicked: then its handler marks
        // the engine failed within moments, and the answer says why (a caller who gets it and
        // asks `health()` next must not be told the engine is fine).
        if let Some(b) = cur.take() {
            let why = self
                .health
                .wait_failure(PEER_FAILURE_WAIT)
                .unwrap_or_else(|| "the executor stopped during this request's batch".into());
            self.fail_with(b, ServeError::Failed(why));
        }
    }

    fn fail(&self, b: InFlight, e: &str) {
        self.fail_with(b, ServeError::Backend(e.to_string()));
    }

    /// Answers every request of the batch not released yet with `e`.
    fn fail_with(&self, b: InFlight, e: ServeError) {
        self.metrics.compute.record(b.start.elapsed());
        for (p, r) in b.batch.iter().zip(&b.released) {
            if r.is_none() {
                p.fail(e.clone());
            }
        }
    }

    fn finish(
        &self,
        b: InFlight,
        finals: Vec<(u32, f32)>,
        stage_ms: Option<Vec<f64>>,
        shadow: Option<ShadowRecord>,
    ) {
        let end = Instant::now();
        self.metrics.compute.record(end - b.start);
        let n = b.batch.len();
        let mut agreed = Vec::with_capacity(n);
        let mut exited = Vec::with_capacity(n);
        for (i, p) in b.batch.iter().enumerate() {
            let (class, conf) = finals.get(i).copied().unwrap_or((0, 0.0));
            if self.oracle
                && let Some(k) = b.outputs[i].iter().position(|(c, _)| *c == class)
                && let Some(&(a, ramp, at)) = b.ramp_times.get(k)
            {
                agreed.push(true);
                exited.push(Some(a));
                let point = self.points.get(ramp).cloned().unwrap_or_default();
                self.metrics.count_answer(&point, true);
                let u = b.outputs[i][k].1;
                self.complete(
                    p,
                    b.start,
                    at,
                    class as usize,
                    1.0 - u,
                    Exit::Ramp { index: ramp, point },
                );
                continue;
            }
            match b.released[i] {
                Some((a, c)) => {
                    let ok = c == class;
                    agreed.push(ok);
                    exited.push(Some(a));
                    let point = b
                        .cfg
                        .ramps
                        .get(a)
                        .and_then(|&r| self.points.get(r))
                        .cloned()
                        .unwrap_or_default();
                    self.metrics.count_answer(&point, ok);
                }
                None => {
                    agreed.push(true);
                    exited.push(None);
                    self.metrics.count_answer("final", true);
                    self.complete(p, b.start, end, class as usize, conf, Exit::Final);
                }
            }
        }
        let rows = b
            .outputs
            .iter()
            .zip(&finals)
            .map(|(o, (label, _))| o.iter().map(|(c, u)| (*u, c == label)).collect())
            .collect();
        let _ = self.records.send(BatchRecord {
            config_id: b.cfg.id,
            rows,
            exited,
            agreed,
            stage_ms,
            answers: finals.iter().map(|f| f.0).collect(),
            shadow,
        });
    }

    fn complete(
        &self,
        p: &Pending,
        start: Instant,
        now: Instant,
        class: usize,
        confidence: f32,
        exit: Exit,
    ) {
        let timings = Timings {
            queued: start - p.submitted,
            computed: now - start,
            total: now - p.submitted,
        };
        let label = self.labels.get(class).cloned().unwrap_or_default();
        if p.slot.complete(Ok(Response {
            class,
            label,
            confidence,
            exit,
            timings,
            released_at: now,
        })) {
            self.metrics.release.record(timings.computed);
            self.metrics.end_to_end.record(timings.total);
        }
    }
}
