//! Converters from other checkpoint formats into ours.

pub mod hf_bert;
