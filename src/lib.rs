//! Apparate: an inference engine with early exits for low tail latency.
//!
//! Layers, bottom up: [`tensor`] (dtypes, views), [`rng`] (the seeded generator), [`graph`]
//! (stages and ramp-eligible points), [`backend`] (where ops run) and [`select`] (building the
//! backend a run asks for), [`format`] (our model and ramps files on the safetensors container,
//! with the model families' configurations), [`models`] (families written against the backend
//! trait), [`vision`] (image files to model input), [`tokenize`] and [`pipeline`] (text in,
//! answer out), [`convert`] (real checkpoints into our format), [`backbone`] (any model as a
//! chain of stages), [`ramps`] (exit heads: loading, bootstrap training), [`dataset`] (input
//! streams from disk), [`head_train`] (a classifier head trained on a frozen backbone),
//! [`profile`] (measured stage and ramp costs), [`adapt`] (thresholds and ramp placement at run
//! time), [`serve`] (the engine), [`metrics`] and [`loadgen`] (measuring it). The command-line
//! front end is `src/bin/apparate/`.

pub mod adapt;
pub mod backbone;
pub mod backend;
pub mod chat;
pub mod convert;
pub mod dataset;
pub mod error;
pub mod format;
pub mod generation;
pub mod gguf;
pub mod graph;
pub mod head_train;
pub mod loadgen;
pub mod metrics;
pub mod models;
pub mod pipeline;
pub mod profile;
pub mod quant;
pub mod ramps;
pub mod rng;
mod sched;
pub mod select;
pub mod serve;
pub mod server;
pub mod tensor;
pub mod tokenize;
pub mod vision;

pub use error::{Error, Result};
