//! Converters from other checkpoint formats into ours.

mod checkpoint;
pub mod hf_bert;
pub mod torchvision;
