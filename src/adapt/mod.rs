//! Apparate's two control loops (section 4), off the request path: threshold tuning (fast,
//! accuracy first) and ramp adjustment (slow, latency first), plus the initial ramp placement.
//!
//! The [`Controller`] is plain state fed one [`BatchRecord`] at a time (the serving runtime runs
//! it on its own thread); it answers with a new [`ActiveConfig`] when thresholds or ramps change,
//! and logs every decision as an [`AdaptEvent`]. It is deterministic, so tests drive it directly
//! with recorded ramp outputs.
//!
//! Files: [`config`] (the knobs and their ranges), [`events`] (what goes in and out),
//! [`controller`] (the state and the per-batch steps), [`placement`] (the first ramps),
//! [`adjuster`] (ramp adjustment), [`drift`] (the drift alarm), [`tuner`] (threshold search),
//! [`latency`] (the latency model read from a profile).

mod adjuster;
pub mod bound;
pub mod config;
mod controller;
mod cusum;
mod drift;
pub mod events;
mod evidence;
pub mod latency;
mod learner;
pub mod live;
mod placement;
pub mod tuner;

pub use config::{ApparateConfig, LiveConfig, Mode};
pub use controller::Controller;
pub use events::{ActiveConfig, AdaptEvent, BatchRecord, HeadUpdate, ShadowRecord};
pub use learner::LearnStat;
pub use live::{BootEvidence, LiveController};

use crate::profile::Profile;
use crate::ramps::train::TrainedHead;

/// The loops the configuration's [`Mode`] selects, behind one interface for the runtime.
pub enum Loops {
    Paper(Controller),
    Live(LiveController),
}

impl Loops {
    /// Builds the loops of `cfg.mode`. `boot`: the bootstrap inputs' ramp outputs, answers and
    /// features; `heads`: host copies of the ramps file's heads (live mode scores shadow
    /// samples and retrains with them).
    pub fn new(
        cfg: ApparateConfig,
        points: Vec<String>,
        profile: Profile,
        boot: Option<&BootEvidence>,
        heads: Vec<TrainedHead>,
    ) -> Loops {
        match cfg.mode {
            Mode::Paper => {
                let samples = boot.map(|b| tuner::Samples::from_rows(points.len(), &b.rows));
                Loops::Paper(Controller::new(cfg, points, profile, samples.as_ref()))
            }
            Mode::Live => Loops::Live(LiveController::new(cfg, points, profile, boot, heads)),
        }
    }

    pub fn active(&self) -> &ActiveConfig {
        match self {
            Loops::Paper(c) => c.active(),
            Loops::Live(c) => c.active(),
        }
    }

    pub fn on_batch(&mut self, rec: BatchRecord) -> Option<ActiveConfig> {
        match self {
            Loops::Paper(c) => c.on_batch(rec),
            Loops::Live(c) => c.on_batch(rec),
        }
    }

    pub fn drain_events(&mut self) -> Vec<AdaptEvent> {
        match self {
            Loops::Paper(c) => c.drain_events(),
            Loops::Live(c) => c.drain_events(),
        }
    }

    /// Retrained heads for the executor (live mode).
    pub fn take_head_updates(&mut self) -> Vec<HeadUpdate> {
        match self {
            Loops::Paper(_) => Vec::new(),
            Loops::Live(c) => c.take_head_updates(),
        }
    }

    /// Cost and swaps of finished retraining runs (live mode).
    pub fn take_learn_stats(&mut self) -> Vec<LearnStat> {
        match self {
            Loops::Paper(_) => Vec::new(),
            Loops::Live(c) => c.take_learn_stats(),
        }
    }
}

#[cfg(test)]
mod live_tests;
#[cfg(test)]
pub(crate) mod tests;
