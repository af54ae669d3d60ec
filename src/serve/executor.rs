//! The executor and the releaser.
//!
//! The executor thread forms batches from the queue and runs each stage by stage. After a stage
//! with an active ramp it issues the fused ramp + exit check without waiting for its result
//! ([`Backend::ramp_exit_async`]) and hands the pending decisions to the releaser; the whole
//! batch goes on to the last stage, whose answers complete the rest and are the labels every
//! ramp decision is judged by.
//!
//! The releaser thread takes the executor's messages in order, waits for each ramp's decisions
//! (on `cuda`: an async copy into pinned memory and its event, engine.md section 5, so the
//! stream never waits for the host) and completes the requests that exit at once, while the
//! executor keeps the device busy with the next stages. At the end of a batch it completes the
//! remaining requests and sends the batch's record to the adapter. On synchronous backends
//! (CPU, the emulated device) the decisions are ready when issued and the same path runs.

use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::queue::{Pending, Queue};
use super::{Exit, Input, Response, ServeError, Timings};
use crate::adapt::{ActiveConfig, BatchRecord};
use crate::backbone::{Backbone, BatchInput};
use crate::backend::{Backend, PendingDecisions};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::ramps::Ramps;

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
    },
    /// The batch failed; unreleased requests get the error.
    Failed(String),
}

pub(crate) struct Executor<B: Backend> {
    pub backbone: Backbone<B>,
    pub ramps: Option<Ramps<B::Tensor>>,
    pub active: Arc<Mutex<Arc<ActiveConfig>>>,
    pub queue: Arc<Queue>,
    pub metrics: Arc<Metrics>,
    pub release: Sender<Release>,
    /// Stage wall times are real (the backend computes synchronously) and feed the profile.
    pub timed_stages: bool,
}

/// Per-ramp threshold tensors of one configuration.
struct Thresholds<T> {
    id: u64,
    values: Vec<T>,
}

impl<B: Backend> Executor<B> {
    pub fn run(self) {
        let mut thresholds: Option<Thresholds<B::Tensor>> = None;
        while let Some(batch) = self.queue.next_batch() {
            let cfg = self
                .active
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            // Thresholds live in backend memory; new ones are uploaded between batches.
            if thresholds.as_ref().is_none_or(|t| t.id != cfg.id) {
                let values: Result<Vec<B::Tensor>> = cfg
                    .thresholds
                    .iter()
                    .map(|&t| self.backbone.backend().upload(&[t], &[1]))
                    .collect();
                match values {
                    Ok(values) => thresholds = Some(Thresholds { id: cfg.id, values }),
                    Err(e) => {
                        for p in &batch {
                            if p.slot.complete(Err(ServeError::Backend(e.to_string()))) {
                                self.metrics.count_failed();
                            }
                        }
                        continue;
                    }
                }
            }
            let t = thresholds.as_ref().expect("set above");
            self.run_batch(batch, cfg, &t.values);
        }
    }

    fn prepare(&self, batch: &[Pending]) -> Result<BatchInput> {
        match &batch[0].input {
            Input::Text(_) => {
                let texts: Vec<&str> = batch
                    .iter()
                    .map(|p| match &p.input {
                        Input::Text(t) => t.as_str(),
                        _ => "",
                    })
                    .collect();
                self.backbone.prepare_texts(&texts)
            }
            _ => {
                let mut pixels = Vec::new();
                for p in batch {
                    if let Input::Normalized(v) = &p.input {
                        pixels.extend_from_slice(v);
                    }
                }
                self.backbone.prepare_images(pixels, batch.len())
            }
        }
    }

    /// Answers `BadInput` to the requests that cannot be prepared alone, so that one bad input
    /// does not fail its batch-mates.
    fn isolate_bad_inputs(&self, batch: Vec<Pending>) -> Vec<Pending> {
        batch
            .into_iter()
            .filter(|p| match self.prepare(std::slice::from_ref(p)) {
                Ok(_) => true,
                Err(e) => {
                    if p.slot.complete(Err(ServeError::BadInput(e.to_string()))) {
                        self.metrics.count_failed();
                    }
                    false
                }
            })
            .collect()
    }

    fn run_batch(&self, batch: Vec<Pending>, cfg: Arc<ActiveConfig>, thresholds: &[B::Tensor]) {
        // Tokenized (or stacked) once; only a failing batch is retried without its bad inputs.
        let (batch, input) = match self.prepare(&batch) {
            Ok(input) => (batch, Ok(input)),
            Err(_) => {
                let batch = self.isolate_bad_inputs(batch);
                if batch.is_empty() {
                    return;
                }
                let input = self.prepare(&batch);
                (batch, input)
            }
        };
        let input = match input {
            Ok(i) => i,
            Err(e) => {
                for p in &batch {
                    if p.slot.complete(Err(ServeError::BadInput(e.to_string()))) {
                        self.metrics.count_failed();
                    }
                }
                return;
            }
        };
        let start = Instant::now();
        self.metrics.count_batch();
        let send = |m: Release| {
            // The releaser lives as long as the executor; a send can only fail at teardown.
            let _ = self.release.send(m);
        };
        send(Release::Begin {
            batch,
            start,
            cfg: cfg.clone(),
        });
        let mut stage_ms = Vec::new();
        let result = (|| -> Result<Vec<(u32, f32)>> {
            let mut x = None;
            for s in 0..self.backbone.num_stages() {
                let t0 = Instant::now();
                let out = self.backbone.run_stage(s, &input, x)?;
                stage_ms.push(t0.elapsed().as_secs_f64() * 1e3);
                if let Some(ramps) = &self.ramps
                    && let Some(r) = ramps.at_stage(s)
                    && let Some(a) = cfg.ramps.iter().position(|&x| x == r)
                {
                    let pending =
                        ramps.check_async(self.backbone.backend(), r, &out, &thresholds[a])?;
                    send(Release::Ramp {
                        active: a,
                        ramp: r,
                        pending,
                    });
                }
                x = Some(out);
            }
            let last = x.ok_or_else(|| Error::Input("the model has no stages".into()))?;
            self.backbone.predictions_with_confidence(&last)
        })();
        match result {
            Ok(finals) => send(Release::End {
                finals,
                stage_ms: self.timed_stages.then_some(stage_ms),
            }),
            Err(e) => send(Release::Failed(e.to_string())),
        }
    }
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
    failed: bool,
}

pub(crate) struct Releaser {
    pub metrics: Arc<Metrics>,
    pub records: Sender<BatchRecord>,
    pub labels: Vec<String>,
    /// Point of each ramp of the file.
    pub points: Vec<String>,
    /// Back-date each answer to the first ramp that agrees with the final one (benchmarks).
    pub oracle: bool,
}

impl Releaser {
    pub fn run(self, rx: Receiver<Release>) {
        let mut cur: Option<InFlight> = None;
        for msg in rx {
            match msg {
                Release::Begin { batch, start, cfg } => {
                    if let Some(old) = cur.take() {
                        // A batch without an end: only at teardown.
                        self.fail(old, "the batch was abandoned");
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
                        failed: false,
                    });
                }
                Release::Ramp {
                    active,
                    ramp,
                    pending,
                } => {
                    let Some(b) = cur.as_mut().filter(|b| !b.failed) else {
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
                Release::End { finals, stage_ms } => {
                    if let Some(b) = cur.take() {
                        self.finish(b, finals, stage_ms);
                    }
                }
                Release::Failed(e) => {
                    if let Some(b) = cur.take() {
                        self.fail(b, &e);
                    }
                }
            }
        }
        if let Some(b) = cur.take() {
            self.fail(b, "the engine stopped during the batch");
        }
    }

    fn fail(&self, mut b: InFlight, e: &str) {
        b.failed = true;
        self.metrics.compute.record(b.start.elapsed());
        for (p, r) in b.batch.iter().zip(&b.released) {
            if r.is_none() && p.slot.complete(Err(ServeError::Backend(e.to_string()))) {
                self.metrics.count_failed();
            }
        }
    }

    fn finish(&self, b: InFlight, finals: Vec<(u32, f32)>, stage_ms: Option<Vec<f64>>) {
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
