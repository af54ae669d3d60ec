//! Launcher of `kernels/ramp.cu`: the fused ramp + exit check, one block per input, its three
//! outputs in one buffer so one copy (synchronous, or asynchronous into pinned memory) brings
//! them back.

use std::sync::Arc;

use super::pool::pooling_code;
use super::{GpuBackend, GpuTensor, RowKernel, params};
use crate::backend::device::{Device, KernelArg, LaunchConfig};
use crate::backend::op_check::RampCall;
use crate::backend::{PendingDecisions, RampDecision, ReadyDecisions, decode_decisions};
use crate::error::Result;

impl<D: Device> GpuBackend<D> {
    pub(super) fn launch_ramp_exit(
        &self,
        c: RampCall<'_, GpuTensor<D::Buf>>,
    ) -> Result<Vec<RampDecision>> {
        let Some(out) = self.launch_ramp(&c)? else {
            return Ok(Vec::new());
        };
        let mut bytes = vec![0u8; self.dev.len(&out)];
        self.dev.download(&out, &mut bytes)?;
        Ok(decode_decisions(&bytes, c.batch))
    }

    pub(super) fn launch_ramp_exit_async(
        &self,
        c: RampCall<'_, GpuTensor<D::Buf>>,
    ) -> Result<Box<dyn PendingDecisions>> {
        let Some(out) = self.launch_ramp(&c)? else {
            return Ok(Box::new(ReadyDecisions(Vec::new())));
        };
        let mut pinned = self.dev.alloc_pinned(self.dev.len(&out))?;
        self.dev.download_async(&out, &mut pinned)?;
        // `out` may be dropped now: device memory is freed after the work queued on it.
        Ok(Box::new(GpuPending {
            dev: self.dev.clone(),
            pinned,
            batch: c.batch,
        }))
    }

    /// Launches the fused ramp kernel; its output buffer holds the class ids, uncertainties and
    /// exit flags of the batch's inputs one after the other (see `decode_decisions`). `None`
    /// for an empty batch.
    fn launch_ramp(&self, c: &RampCall<'_, GpuTensor<D::Buf>>) -> Result<Option<D::Buf>> {
        let batch = c.batch;
        if batch == 0 {
            return Ok(None);
        }
        let smem = self.shared_bytes(
            "ramp_exit",
            2 * c.width + c.classes + params::ROW_SCRATCH as usize,
            || format!("a ramp of width {} and {} classes", c.width, c.classes),
        )?;
        let lens = self.ints("length", c.input.lengths.iter().copied())?;
        let out = self.dev.alloc(3 * batch * 4)?;
        let base = self.dev.address(&out);
        let (dw, db) = match c.head.dense {
            Some((w, b)) => (self.ptr(w)?, self.ptr(b)?),
            None => (KernelArg::Ptr(0), KernelArg::Ptr(0)),
        };
        // The warp kernel reads each weight row with one warp (coalesced); the block kernel,
        // its reference, gives each thread a row of its own.
        let kernel = match self.rows {
            RowKernel::Warp => "ramp_exit_warp",
            RowKernel::Block => "ramp_exit",
        };
        self.launch(
            &self.kernel(kernel),
            LaunchConfig::linear(self.grid("inputs", batch)?, params::RAMP_THREADS, smem),
            &[
                self.ptr(c.input.x)?,
                KernelArg::Ptr(self.dev.address(&lens)),
                dw,
                db,
                self.ptr(c.head.out.0)?,
                self.ptr(c.head.out.1)?,
                self.ptr(c.threshold)?,
                KernelArg::Ptr(base),
                KernelArg::Ptr(base + 4 * batch as u64),
                KernelArg::Ptr(base + 8 * batch as u64),
                self.u32("positions", c.input.positions)?,
                self.u32("width", c.width)?,
                self.u32("classes", c.classes)?,
                KernelArg::I32(pooling_code(c.input.pooling)),
            ],
        )?;
        Ok(Some(out))
    }
}

/// A ramp's decisions being copied into pinned host memory.
struct GpuPending<D: Device> {
    dev: Arc<D>,
    pinned: D::Pinned,
    batch: usize,
}

impl<D: Device> PendingDecisions for GpuPending<D> {
    fn wait(self: Box<Self>) -> Result<Vec<RampDecision>> {
        let bytes = self.dev.read_pinned(&self.pinned)?;
        Ok(decode_decisions(&bytes, self.batch))
    }
}
