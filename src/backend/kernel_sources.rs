//! The CUDA kernel sources (`kernels/`), embedded at build time so the CUDA backend can compile
//! them with NVRTC on a machine that has only the binary.

include!(concat!(env!("OUT_DIR"), "/kernel_sources.rs"));
