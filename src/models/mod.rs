//! Model families, written once against [`crate::backend::Backend`].

pub mod bert;
pub mod cnn;
pub mod llama;
pub mod llama_reference;
