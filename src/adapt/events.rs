//! What flows in and out of the [`super::Controller`]: the configuration the executor runs
//! ([`ActiveConfig`]), the record of one finished batch ([`BatchRecord`]) and the log of every
//! decision ([`AdaptEvent`]).

use serde::Serialize;

/// What the executor runs: which ramps (indices into the candidate list, stage order) with which
/// thresholds. Swapped as a whole between batches.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ActiveConfig {
    /// Increases with every change.
    pub id: u64,
    pub ramps: Vec<usize>,
    pub thresholds: Vec<f32>,
    /// Share of batches that pool every candidate ramp point's features for the live loops'
    /// evidence (shadow evaluation). Changes without a new `id`: the active ramps' outputs stay
    /// valid.
    pub shadow_fraction: f32,
}

impl ActiveConfig {
    /// No ramps, no shadow evaluation.
    pub fn empty(id: u64) -> ActiveConfig {
        ActiveConfig {
            id,
            ramps: Vec::new(),
            thresholds: Vec::new(),
            shadow_fraction: 0.0,
        }
    }
}

/// A shadow batch's extra record: per ramp of the file, the pooled features it reads
/// (`[inputs, width]`), and what pooling them cost.
#[derive(Clone, Debug)]
pub struct ShadowRecord {
    pub features: Vec<Vec<f32>>,
    pub ms: f64,
}

/// A retrained head for ramp `ramp` of the file, for the executor to upload between batches.
#[derive(Clone, Debug)]
pub struct HeadUpdate {
    pub ramp: usize,
    pub head: std::sync::Arc<crate::ramps::train::TrainedHead>,
}

/// What one batch did, as the executor records it.
#[derive(Clone, Debug)]
pub struct BatchRecord {
    /// The [`ActiveConfig::id`] it ran under.
    pub config_id: u64,
    /// Per input, per active ramp: `(u, ramp class == final class)`.
    pub rows: Vec<Vec<(f32, bool)>>,
    /// Per input: the active ramp it was released at (index into the active list), or `None`.
    pub exited: Vec<Option<usize>>,
    /// Per input: whether the released answer equals the final one.
    pub agreed: Vec<bool>,
    /// Wall time of each stage, when the backend runs synchronously (else `None`).
    pub stage_ms: Option<Vec<f64>>,
    /// Per input: the model's answer (the final stage's class).
    pub answers: Vec<u32>,
    /// On shadow batches: every candidate point's pooled features.
    pub shadow: Option<ShadowRecord>,
}

impl BatchRecord {
    /// What the executor records for inputs whose active ramps output `rows` (per input, per
    /// active ramp: `(u, ramp class == final class)`) under `cfg`: each input is released at
    /// the first ramp with `u` below its threshold. Replays recorded ramp outputs through the
    /// controller.
    pub fn replay(cfg: &ActiveConfig, rows: Vec<Vec<(f32, bool)>>) -> BatchRecord {
        let mut exited = Vec::with_capacity(rows.len());
        let mut agreed = Vec::with_capacity(rows.len());
        for row in &rows {
            let exit = row
                .iter()
                .zip(&cfg.thresholds)
                .position(|((u, _), t)| u < t);
            agreed.push(exit.is_none_or(|a| row[a].1));
            exited.push(exit);
        }
        BatchRecord {
            config_id: cfg.id,
            rows,
            exited,
            agreed,
            stage_ms: None,
            answers: Vec::new(),
            shadow: None,
        }
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
    pub fn accuracy(&self) -> f64 {
        let n = self.agreed.len().max(1) as f64;
        self.agreed.iter().filter(|a| **a).count() as f64 / n
    }
}

/// One decision of the loops, for logs and the live display.
#[derive(Clone, Debug, Serialize)]
pub struct AdaptEvent {
    /// Batches seen when it happened.
    pub batch: u64,
    /// Inputs seen when it happened (the answered requests, in completion order).
    pub inputs: u64,
    /// `place`, `tune`, `violation`, `disable`, `retune`, `remove`, `add`, `probe`, `keep`
    /// (paper mode); `place`, `tune`, `replan`, `off` (ramps switched off while nothing may
    /// exit), `pause` / `resume` (releases held while a drift is suspected), `drift`,
    /// `violation`, `learn` (live mode).
    pub kind: &'static str,
    pub why: String,
    /// Active ramp points and thresholds after the decision.
    pub ramps: Vec<String>,
    pub thresholds: Vec<f32>,
    /// Predicted latency saving (fraction of V) and window agreement of the new configuration.
    pub predicted_saving: f64,
    pub window_accuracy: f64,
}
