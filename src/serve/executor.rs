//! The executor thread: forms batches from the queue and runs each stage by stage. After a
//! stage with an active ramp it issues the fused ramp + exit check without waiting for its
//! result ([`Backend::ramp_exit_async`]) and hands the pending decisions to the releaser
//! ([`super::releaser`]); the whole batch goes on to the last stage, whose answers complete the
//! rest and are the labels every ramp decision is judged by. Inputs arrive prepared (tokenized,
//! normalised) from submission: the executor only pads or stacks them.

use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::ServeError;
use super::input::assemble;
use super::queue::{Pending, Queue};
use super::releaser::Release;
use crate::adapt::ActiveConfig;
use crate::backbone::Backbone;
use crate::backend::Backend;
use crate::error::Result;
use crate::metrics::Metrics;
use crate::ramps::Ramps;

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
            let t = match thresholds.take() {
                Some(t) if t.id == cfg.id => t,
                _ => match self.upload_thresholds(&cfg) {
                    Ok(t) => t,
                    Err(e) => {
                        for p in &batch {
                            p.fail(ServeError::Backend(e.to_string()));
                        }
                        continue;
                    }
                },
            };
            self.run_batch(batch, cfg, &t.values);
            thresholds = Some(t);
        }
    }

    fn upload_thresholds(&self, cfg: &ActiveConfig) -> Result<Thresholds<B::Tensor>> {
        let values = cfg
            .thresholds
            .iter()
            .map(|&t| self.backbone.backend().upload(&[t], &[1]))
            .collect::<Result<Vec<_>>>()?;
        Ok(Thresholds { id: cfg.id, values })
    }

    fn run_batch(&self, batch: Vec<Pending>, cfg: Arc<ActiveConfig>, thresholds: &[B::Tensor]) {
        let input = match assemble(&self.backbone, &batch) {
            Ok(i) => i,
            Err(e) => {
                for p in &batch {
                    p.fail(ServeError::Backend(e.to_string()));
                }
                return;
            }
        };
        let start = Instant::now();
        self.metrics.count_batch();
        let send = |m: Release| {
            // The releaser lives as long as the executor unless it panicked; then the requests
            // in an unsent message are failed as it drops.
            let _ = self.release.send(m);
        };
        send(Release::Begin {
            batch,
            start,
            cfg: cfg.clone(),
        });
        let mut stage_ms = Vec::new();
        let mut t0 = Instant::now();
        let result = self
            .backbone
            .run_stages(&input, |s, out| {
                stage_ms.push(t0.elapsed().as_secs_f64() * 1e3);
                if let Some(ramps) = &self.ramps
                    && let Some(r) = ramps.at_stage(s)
                    && let Some(a) = cfg.ramps.iter().position(|&x| x == r)
                {
                    let pending =
                        ramps.check_async(self.backbone.backend(), r, out, &thresholds[a])?;
                    send(Release::Ramp {
                        active: a,
                        ramp: r,
                        pending,
                    });
                }
                t0 = Instant::now();
                Ok(())
            })
            .and_then(|last| self.backbone.predictions_with_confidence(&last));
        match result {
            Ok(finals) => send(Release::End {
                finals,
                stage_ms: self.timed_stages.then_some(stage_ms),
            }),
            Err(e) => send(Release::Failed(e.to_string())),
        }
    }
}
