//! Choosing a backend by name (what a command line, a config file or a test asks for) and
//! building it, in one place: the serving engine and the CLI go through
//! [`with_backend`].
//!
//! Backends are generic parameters, not trait objects (every op call is monomorphised), so a
//! choice made at run time cannot return "a backend"; instead the work to do is handed in as a
//! [`BackendJob`] and run on whichever backend was built.
//!
//! GPU backends (`emu`, `cuda`) run on a [`GraphDevice`]: the work a model graphs (its stages,
//! per batch and sequence size) is replayed as one graph launch from its third run on;
//! `APPARATE_GPU_GRAPHS=off` runs everything eagerly.

use std::sync::Arc;

use crate::backend::capture::{GraphConfig, GraphDevice};
use crate::backend::cuda::{CudaConfig, CudaDevice};
use crate::backend::decoder::DecoderBackend;
use crate::backend::emu::{EmuConfig, EmuDevice};
use crate::backend::gpu::GpuBackend;
use crate::backend::{Backend, CpuBackend, CpuConfig};
use crate::error::Result;
use crate::tensor::DType;

/// Which backend to run on.
#[derive(Clone, Debug, PartialEq)]
pub enum BackendChoice {
    /// The CPU backend with this many threads (`None`: all cores or `APPARATE_THREADS`).
    Cpu { threads: Option<usize> },
    /// The CUDA kernels on the emulated device (slow; for testing).
    Emu {
        threads: Option<usize>,
        dtype: DType,
    },
    /// A real NVIDIA GPU.
    Cuda { dtype: DType },
}

impl Default for BackendChoice {
    fn default() -> Self {
        BackendChoice::Cpu { threads: None }
    }
}

/// Work to do on a backend, whatever it is.
pub trait BackendJob {
    type Output;
    /// Runs on `backend`; `description` says which it is for people (`cpu backend, 4 threads`).
    fn run<B: Backend + 'static>(self, backend: B, description: String) -> Result<Self::Output>;
}

/// Work to do on a backend that runs decoder models ([`DecoderBackend`]): every backend does.
pub trait DecoderJob {
    type Output;
    fn run<B: DecoderBackend + 'static>(
        self,
        backend: B,
        description: String,
    ) -> Result<Self::Output>;
}

/// Builds the backend `$choice` names and runs `$job` on it (the body of [`with_backend`] and
/// [`with_decoder_backend`], which differ only in the bound their job's `run` asks for).
macro_rules! dispatch {
    ($choice:expr, $job:expr) => {
        match *$choice {
            BackendChoice::Cpu { threads } => {
                let be = CpuBackend::new(CpuConfig {
                    threads,
                    ..Default::default()
                })?;
                let what = format!("cpu backend, {} threads", be.threads());
                $job.run(be, what)
            }
            BackendChoice::Emu { threads, dtype } => {
                let threads = CpuConfig {
                    threads,
                    ..Default::default()
                }
                .resolve_threads()?;
                let graphs = GraphConfig::from_env()?;
                let dev = EmuDevice::new(EmuConfig {
                    threads: Some(threads),
                    ..EmuConfig::default()
                })?;
                let what = format!(
                    "emulated GPU, {dtype}, {threads} threads{}",
                    graphs_note(&graphs)
                );
                let dev = GraphDevice::with_config(Arc::new(dev), graphs);
                $job.run(GpuBackend::new(dev, dtype), what)
            }
            BackendChoice::Cuda { dtype } => {
                let graphs = GraphConfig::from_env()?;
                let dev = CudaDevice::new(CudaConfig::default())?;
                let what = format!(
                    "cuda: {}, {dtype}{}",
                    dev.info().device_name,
                    graphs_note(&graphs)
                );
                let dev = GraphDevice::with_config(Arc::new(dev), graphs);
                $job.run(GpuBackend::new(dev, dtype), what)
            }
        }
    };
}

/// How a GPU backend's description tells whether its runs are graphed.
fn graphs_note(g: &GraphConfig) -> &'static str {
    if g.enabled {
        ", graphs"
    } else {
        ", graphs off"
    }
}

/// Builds the backend `choice` names and runs `job` on it. Thread counts are checked the same
/// way for `cpu` and `emu` ([`CpuConfig::resolve_threads`]), before any thread starts.
pub fn with_backend<J: BackendJob>(choice: &BackendChoice, job: J) -> Result<J::Output> {
    dispatch!(choice, job)
}

/// [`with_backend`] for a decoder job.
pub fn with_decoder_backend<J: DecoderJob>(choice: &BackendChoice, job: J) -> Result<J::Output> {
    dispatch!(choice, job)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Describe;

    impl BackendJob for Describe {
        type Output = String;
        fn run<B: Backend + 'static>(self, _: B, description: String) -> Result<String> {
            Ok(description)
        }
    }

    #[test]
    fn builds_the_chosen_backend_and_checks_threads_alike() {
        let cpu = with_backend(&BackendChoice::Cpu { threads: Some(1) }, Describe).unwrap();
        assert_eq!(cpu, "cpu backend, 1 threads");
        for choice in [
            BackendChoice::Cpu { threads: Some(0) },
            BackendChoice::Emu {
                threads: Some(0),
                dtype: DType::F32,
            },
            BackendChoice::Emu {
                threads: Some(1_000_000),
                dtype: DType::F32,
            },
        ] {
            let e = with_backend(&choice, Describe).unwrap_err().to_string();
            assert!(e.contains("threads"), "{choice:?}: {e}");
        }
    }
}
