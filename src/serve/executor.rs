//! The executor thread: forms batches from the queue and runs each stage by stage. After a
//! stage with an active ramp it issues the fused ramp + exit check without waiting for its
//! result ([`Backend::ramp_exit_async`]) and hands the pending decisions to the releaser
//! ([`super::releaser`]); the whole batch goes on to the last stage, whose answers complete the
//! rest and are the labels every ramp decision is judged by. Inputs arrive prepared (tokenized,
//! normalised) from submission: the executor only pads or stacks them.

use std::sync::mpsc::{SendError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::ServeError;
use super::health::{Health, PEER_FAILURE_WAIT};
use super::input::assemble;
use super::queue::{Pending, Queue};
use super::releaser::Release;
use crate::adapt::{ActiveConfig, HeadUpdate, ShadowRecord};
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
    /// Retrained heads from the live loops, uploaded between batches.
    pub head_updates: Arc<Mutex<Vec<HeadUpdate>>>,
    /// Why the engine failed, if the releaser dies.
    pub health: Arc<Health>,
}

/// Most shadow batches owed at once. A shadow batch is put off while requests wait behind it
/// (its pooling lengthens the batch, and everyone queued waits for that), so owed ones pile up
/// during a backlog; at this many one runs even though requests wait, so that a sustained
/// backlog still yields evidence, at the configured share, just later.
const SHADOW_CREDIT_CAP: f32 = 3.0;

/// Per-ramp threshold tensors of one configuration.
struct Thresholds<T> {
    id: u64,
    values: Vec<T>,
}

impl<B: Backend> Executor<B> {
    pub fn run(mut self) {
        let mut thresholds: Option<Thresholds<B::Tensor>> = None;
        // Shadow batches are spread evenly at the configured share: a credit grows by the share
        // per batch and each whole unit buys one (deterministic, no random draws), when no
        // request waits or the credit is at its cap.
        let mut shadow_credit = 0.0f32;
        while let Some(batch) = self.queue.next_batch() {
            self.apply_head_updates();
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
            shadow_credit =
                (shadow_credit + cfg.shadow_fraction.clamp(0.0, 1.0)).min(SHADOW_CREDIT_CAP);
            let shadow = shadow_credit >= 1.0
                && (self.queue.len() == 0 || shadow_credit >= SHADOW_CREDIT_CAP);
            if shadow {
                shadow_credit -= 1.0;
            }
            self.run_batch(batch, cfg, &t.values, shadow);
            thresholds = Some(t);
        }
    }

    /// Uploads the heads the live loops retrained. A head that fails to upload keeps the old
    /// one serving (the loops' scores then describe a head that does not serve, which only
    /// costs exits: the kernel's own outputs are what releases are judged by).
    fn apply_head_updates(&mut self) {
        let updates =
            std::mem::take(&mut *self.head_updates.lock().unwrap_or_else(|p| p.into_inner()));
        if let Some(ramps) = self.ramps.as_mut() {
            for u in updates {
                let _ = ramps.replace_head(self.backbone.backend(), u.ramp, &u.head);
            }
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

    fn run_batch(
        &self,
        batch: Vec<Pending>,
        cfg: Arc<ActiveConfig>,
        thresholds: &[B::Tensor],
        shadow: bool,
    ) {
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
            // of an unsent batch are answered with why, once its handler has recorded it.
            if let Err(SendError(Release::Begin { batch, .. })) = self.release.send(m) {
                let why = self
                    .health
                    .wait_failure(PEER_FAILURE_WAIT)
                    .unwrap_or_else(|| "the engine's releaser thread stopped".into());
                for p in &batch {
                    p.fail(ServeError::Failed(why.clone()));
                }
            }
        };
        send(Release::Begin {
            batch,
            start,
            cfg: cfg.clone(),
        });
        let mut stage_ms = Vec::new();
        let candidates = self.ramps.as_ref().map_or(0, |r| r.len());
        let mut features: Vec<Vec<f32>> = vec![Vec::new(); if shadow { candidates } else { 0 }];
        let mut shadow_time = std::time::Duration::ZERO;
        let mut t0 = Instant::now();
        let result = self
            .backbone
            .run_stages(&input, |s, out| {
                stage_ms.push(t0.elapsed().as_secs_f64() * 1e3);
                if let Some(ramps) = &self.ramps
                    && let Some(r) = ramps.at_stage(s)
                    && let Some(a) = cfg.ramps.iter().position(|&x| x == r)
                {
                    let pending = ramps.check_async(&self.backbone, r, out, &thresholds[a])?;
                    send(Release::Ramp {
                        active: a,
                        ramp: r,
                        pending,
                    });
                }
                if shadow
                    && let Some(ramps) = &self.ramps
                    && let Some(r) = ramps.at_stage(s)
                {
                    // After the active ramp is issued: its exits do not wait for this.
                    let ts = Instant::now();
                    features[r] = self.backbone.pooled_features(out, ramps.grid(r))?;
                    shadow_time += ts.elapsed();
                }
                t0 = Instant::now();
                Ok(())
            })
            .and_then(|last| self.backbone.predictions_with_confidence(&last));
        if shadow {
            self.metrics.count_shadow(shadow_time);
        }
        match result {
            Ok(finals) => send(Release::End {
                finals,
                stage_ms: self.timed_stages.then_some(stage_ms),
                shadow: shadow.then_some(ShadowRecord {
                    features,
                    ms: shadow_time.as_secs_f64() * 1e3,
                }),
            }),
            Err(e) => send(Release::Failed(e.to_string())),
        }
    }
}
