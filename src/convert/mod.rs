//! Converters from other checkpoint formats into ours.

mod checkpoint;
mod efficientnet;
pub mod gguf_llama;
pub mod hf_bert;
pub mod torchvision;
mod vgg;
