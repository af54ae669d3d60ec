//! The executor: forms batches from the queue and runs each stage by stage; after a stage with an
//! active ramp it runs the fused ramp + exit check and completes the requests that exit there at
//! once; the whole batch goes on to the last stage, whose answers complete the rest and are the
//! labels every ramp decision is judged by.
//!
//! Release here is synchronous with the ramp: the ramp's decisions (class, `u`, exit per input)
//! are read back right after its kernel (`Backend::ramp_exit`), and the exited requests are
//! completed before the next stage is issued. On the CPU that is exact. On `cuda` the read-back
//! waits for the stream up to the ramp; the asynchronous variant of engine.md section 5 (copy to
//! pinned memory + event + release thread) is not built yet.

use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::queue::{Pending, Queue};
use super::{Exit, Input, Response, ServeError, Timings};
use crate::adapt::{ActiveConfig, BatchRecord};
use crate::backbone::{Backbone, BatchInput};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::ramps::Ramps;

pub(crate) struct Executor<B: Backend> {
    pub backbone: Backbone<B>,
    pub ramps: Option<Ramps<B::Tensor>>,
    pub active: Arc<Mutex<Arc<ActiveConfig>>>,
    pub queue: Arc<Queue>,
    pub metrics: Arc<Metrics>,
    pub records: Sender<BatchRecord>,
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
                        self.fail_all(&batch, &e);
                        continue;
                    }
                }
            }
            let t = thresholds.as_ref().expect("set above");
            self.run_batch(batch, &cfg, &t.values);
        }
    }

    fn fail_all(&self, batch: &[Pending], e: &Error) {
        for p in batch {
            if p.slot.complete(Err(ServeError::Backend(e.to_string()))) {
                self.metrics.count_failed();
            }
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

    /// Answers `BadInput` to the requests that cannot be prepared alone (e.g. a text longer
    /// than the model's positions), so that one bad input does not fail its batch-mates.
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

    fn run_batch(&self, batch: Vec<Pending>, cfg: &ActiveConfig, thresholds: &[B::Tensor]) {
        let batch = if self.prepare(&batch).is_err() {
            self.isolate_bad_inputs(batch)
        } else {
            batch
        };
        if batch.is_empty() {
            return;
        }
        let start = Instant::now();
        self.metrics.count_batch();
        let n = batch.len();
        for p in &batch {
            self.metrics.queue.record(start - p.submitted);
        }
        // Per input: (active ramp index, class, u) of its release, and every active ramp's
        // (class, u).
        let mut released: Vec<Option<(usize, u32, f32, Instant)>> = vec![None; n];
        let mut outputs: Vec<Vec<(u32, f32)>> = vec![Vec::new(); n];
        let mut stage_ms = Vec::new();
        let result = (|| -> Result<Vec<(u32, f32)>> {
            let input = self.prepare(&batch)?;
            let mut x = None;
            for s in 0..self.backbone.num_stages() {
                let t0 = Instant::now();
                let out = self.backbone.run_stage(s, &input, x)?;
                stage_ms.push(t0.elapsed().as_secs_f64() * 1e3);
                if let Some(ramps) = &self.ramps
                    && let Some(r) = ramps.at_stage(s)
                    && let Some(a) = cfg.ramps.iter().position(|&x| x == r)
                {
                    let decisions =
                        ramps.check(self.backbone.backend(), r, &out, &thresholds[a])?;
                    let now = Instant::now();
                    for (i, d) in decisions.iter().enumerate() {
                        outputs[i].push((d.class, d.uncertainty));
                        if d.exit && released[i].is_none() {
                            released[i] = Some((a, d.class, d.uncertainty, now));
                            self.release(
                                &batch[i],
                                start,
                                now,
                                d.class as usize,
                                1.0 - d.uncertainty,
                                Exit::Ramp {
                                    index: r,
                                    point: ramps
                                        .iter()
                                        .nth(r)
                                        .map(|x| x.point.clone())
                                        .unwrap_or_default(),
                                },
                            );
                        }
                    }
                }
                x = Some(out);
            }
            let last = x.ok_or_else(|| Error::Input("the model has no stages".into()))?;
            self.backbone.predictions_with_confidence(&last)
        })();
        let end = Instant::now();
        self.metrics.compute.record(end - start);
        let finals = match result {
            Ok(f) => f,
            Err(e) => {
                // Requests released at a ramp keep their answers; the rest get the error.
                for (p, r) in batch.iter().zip(&released) {
                    if r.is_none() && p.slot.complete(Err(ServeError::Backend(e.to_string()))) {
                        self.metrics.count_failed();
                    }
                }
                return;
            }
        };
        let mut agreed = Vec::with_capacity(n);
        let mut exited = Vec::with_capacity(n);
        for (i, p) in batch.iter().enumerate() {
            let (class, conf) = finals[i];
            match released[i] {
                Some((a, c, _, _)) => {
                    let ok = c == class;
                    agreed.push(ok);
                    exited.push(Some(a));
                    let point = self.point(cfg.ramps[a]);
                    self.metrics.count_answer(&point, ok);
                }
                None => {
                    agreed.push(true);
                    exited.push(None);
                    self.metrics.count_answer("final", true);
                    self.release(p, start, end, class as usize, conf, Exit::Final);
                }
            }
        }
        let rows = outputs
            .iter()
            .zip(&finals)
            .map(|(o, (label, _))| o.iter().map(|(c, u)| (*u, c == label)).collect())
            .collect();
        let _ = self.records.send(BatchRecord {
            config_id: cfg.id,
            rows,
            exited,
            agreed,
            stage_ms: self.timed_stages.then_some(stage_ms),
        });
    }

    fn point(&self, ramp: usize) -> String {
        self.ramps
            .as_ref()
            .and_then(|r| r.iter().nth(ramp))
            .map(|r| r.point.clone())
            .unwrap_or_default()
    }

    fn release(
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
        let label = self
            .backbone
            .labels()
            .get(class)
            .cloned()
            .unwrap_or_default();
        if p.slot.complete(Ok(Response {
            class,
            label,
            confidence,
            exit,
            timings,
        })) {
            self.metrics.release.record(timings.computed);
            self.metrics.end_to_end.record(timings.total);
        }
    }
}
