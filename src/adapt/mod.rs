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
pub mod config;
mod controller;
mod drift;
pub mod events;
pub mod latency;
mod placement;
pub mod tuner;

pub use config::{ApparateConfig, LiveConfig, Mode};
pub use controller::Controller;
pub use events::{ActiveConfig, AdaptEvent, BatchRecord};

#[cfg(test)]
pub(crate) mod tests;
