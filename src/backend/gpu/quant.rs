//! Launchers of `kernels/quant.cu`: the product with block-quantized weights (one warp per
//! weight row, `QMM_TILE` activation rows per block row of the grid) and the gather of decoded
//! rows of a quantized table.

use super::decoder::GpuQTensor;
use super::{GpuBackend, GpuTensor, params};
use crate::backend::device::{Device, KernelArg, LaunchConfig};
use crate::error::Result;
use crate::gguf::GgmlType;

/// The kernels' name for a block type (`qmatmul_q4_1_f16`, ...).
fn type_name(ty: GgmlType) -> &'static str {
    match ty {
        GgmlType::Q4_1 => "q4_1",
        // QInfo::checked admits only the two types with kernels.
        _ => "q8_0",
    }
}

impl<D: Device> GpuBackend<D> {
    pub(super) fn launch_qmatmul(
        &self,
        x: &GpuTensor<D::Buf>,
        w: &GpuQTensor<D::Buf>,
    ) -> Result<GpuTensor<D::Buf>> {
        let m = x.shape[0];
        let (rows, cols) = (w.info.rows, w.info.cols);
        let y = self.alloc(vec![m, rows])?;
        let cfg = LaunchConfig {
            grid: [
                self.grid("weight rows", rows.div_ceil(params::QMM_WARPS as usize))?,
                self.grid("activation rows", m.div_ceil(params::QMM_TILE as usize))?,
                1,
            ],
            block: [32 * params::QMM_WARPS, 1, 1],
            shared_bytes: 0,
        };
        self.launch(
            &self.kernel(&format!("qmatmul_{}", type_name(w.info.ty))),
            cfg,
            &[
                KernelArg::Ptr(self.dev.address(&w.buf)),
                self.ptr(x)?,
                self.ptr(&y)?,
                self.u32("m", m)?,
                self.u32("rows", rows)?,
                self.u32("cols", cols)?,
            ],
        )?;
        Ok(y)
    }

    pub(super) fn launch_qembed(
        &self,
        ids: &[u32],
        table: &GpuQTensor<D::Buf>,
    ) -> Result<GpuTensor<D::Buf>> {
        let cols = table.info.cols;
        let y = self.alloc(vec![ids.len(), cols])?;
        let ids_buf = self.ints("token ids", ids.iter().map(|&i| i as usize))?;
        self.launch(
            &self.kernel(&format!("qembed_{}", type_name(table.info.ty))),
            self.rows_cfg("rows", ids.len(), 0)?,
            &[
                KernelArg::Ptr(self.dev.address(&table.buf)),
                KernelArg::Ptr(self.dev.address(&ids_buf)),
                self.ptr(&y)?,
                self.u32("cols", cols)?,
            ],
        )?;
        Ok(y)
    }
}
