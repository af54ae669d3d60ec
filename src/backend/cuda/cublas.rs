//! cuBLAS as the yardstick of the kernel benchmarks (the engine uses its own GEMM).

use std::ffi::c_int;

use super::{BACKEND, CudaBuf, CudaDevice, guard};
use crate::error::{Error, Result};

impl CudaDevice {
    /// `Y = X W^T` with cuBLAS (`cublasGemmEx`, f32 accumulation) on the device's stream, with
    /// the same layouts as our `gemm_*` kernels: X [m, k], W [n, k], Y [m, n], row-major, all of
    /// `dtype`. The yardstick of the kernel benchmarks.
    #[allow(clippy::too_many_arguments)]
    pub fn cublas_gemm(
        &self,
        dtype: crate::tensor::DType,
        m: usize,
        n: usize,
        k: usize,
        x: &CudaBuf,
        w: &CudaBuf,
        y: &CudaBuf,
    ) -> Result<()> {
        use cudarc::cublas::sys as bsys;
        let size = dtype.size();
        let bytes = |a: usize, b: usize| a.saturating_mul(b).saturating_mul(size);
        let fail = |reason: String| Error::device(BACKEND, "cublas_gemm", reason);
        if x.len < bytes(m, k) || w.len < bytes(n, k) || y.len < bytes(m, n) {
            return Err(fail(format!("buffers too small for {m}x{n}x{k} {dtype}")));
        }
        let dim = |v: usize| c_int::try_from(v).map_err(|_| fail(format!("{v} too large")));
        let (mi, ni, ki) = (dim(m)?, dim(n)?, dim(k)?);
        guard("cublasGemmEx", || {
            let blas = self.blas.get_or_init(|| {
                // SAFETY: only asks the loader whether the library exists.
                if !unsafe { bsys::is_culib_present() } {
                    return Err("no cuBLAS library (libcublas.so) found".to_string());
                }
                cudarc::cublas::CudaBlas::new(self.stream().clone()).map_err(|e| format!("{e:?}"))
            });
            let blas = blas.as_ref().map_err(|e| fail(e.clone()))?;
            let ty = match dtype {
                crate::tensor::DType::F32 => bsys::cudaDataType::CUDA_R_32F,
                crate::tensor::DType::F16 => bsys::cudaDataType::CUDA_R_16F,
                crate::tensor::DType::BF16 => bsys::cudaDataType::CUDA_R_16BF,
            };
            let (alpha, beta) = (1.0f32, 0.0f32);
            // Column-major view: Y^T [n, m] = W [n, k] (stored as W^T, k x n) transposed times
            // X^T (k x m).
            // SAFETY: sizes checked above; pointers are device allocations of this context.
            unsafe {
                cudarc::cublas::result::gemm_ex(
                    *blas.handle(),
                    bsys::cublasOperation_t::CUBLAS_OP_T,
                    bsys::cublasOperation_t::CUBLAS_OP_N,
                    ni,
                    mi,
                    ki,
                    (&alpha as *const f32).cast(),
                    w.ptr as *const std::ffi::c_void,
                    ty,
                    ki,
                    x.ptr as *const std::ffi::c_void,
                    ty,
                    ki,
                    (&beta as *const f32).cast(),
                    y.ptr as *mut std::ffi::c_void,
                    ty,
                    ni,
                    bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .map_err(|e| fail(format!("cublasGemmEx: {e:?}")))
        })
    }
}
