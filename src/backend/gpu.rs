//! The GPU backend: the [`Backend`] ops as launches of `kernels/*.cu` on any [`Device`] (`emu`
//! or `cuda`). Launchers (grid sizes, argument packing, checks) are written once, here.
//!
//! Tensors live on the device in the backend's storage dtype (f32, f16 or bf16); kernels compute
//! in f32. Host values cross in f32 and are converted on the way. Temporary buffers (token ids,
//! lengths) are dropped right after their launch: devices free memory in stream order.

use std::sync::Arc;

use super::device::{Device, KernelArg, LaunchConfig, MAX_SHARED_BYTES};
use super::{
    Activation, Backend, BatchShape, Conv2d, PendingDecisions, Pool2d, Pooling, RampDecision,
    RampWeights,
};
use crate::error::{Error, Result};
use crate::tensor::{DType, TensorView};

/// A tensor in device memory.
pub struct GpuTensor<B> {
    buf: B,
    shape: Vec<usize>,
    dtype: DType,
}

impl<B> GpuTensor<B> {
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    fn rows_cols(&self) -> (usize, usize) {
        let cols = self.shape.last().copied().unwrap_or(1).max(1);
        (self.shape.iter().product::<usize>() / cols, cols)
    }
}

/// Threads per block of the row kernels (norm, embedding, pooling, softmax).
const ROW_THREADS: u32 = 128;
/// Query rows (warps) per block of the attention kernel; matches `ATTN_WARPS` in attention.cu.
const ATTN_WARPS: u32 = 4;
/// Output tile of the GEMM kernels; matches `GEMM_BM`/`GEMM_BN` in gemm.cu.
const GEMM_TILE: usize = 64;

/// The GPU backend over device `D`, storing tensors as `dtype`.
pub struct GpuBackend<D: Device> {
    dev: Arc<D>,
    dtype: DType,
    poison: bool,
}

impl<D: Device> Clone for GpuBackend<D> {
    fn clone(&self) -> Self {
        GpuBackend {
            dev: self.dev.clone(),
            dtype: self.dtype,
            poison: self.poison,
        }
    }
}

impl<D: Device> GpuBackend<D> {
    pub fn new(dev: D, dtype: DType) -> GpuBackend<D> {
        Self::shared(Arc::new(dev), dtype)
    }

    /// A backend on a device that other backends (e.g. other dtypes) share.
    pub fn shared(dev: Arc<D>, dtype: DType) -> GpuBackend<D> {
        GpuBackend {
            dev,
            dtype,
            poison: false,
        }
    }

    /// Fill every op output with NaN before its kernel runs, so an element a kernel forgets to
    /// write shows up in the results (the parity tests use this).
    pub fn with_poisoned_outputs(mut self) -> GpuBackend<D> {
        self.poison = true;
        self
    }

    pub fn device(&self) -> &D {
        &self.dev
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    fn err(&self, reason: impl Into<String>) -> Error {
        Error::Backend {
            backend: self.dev.name(),
            reason: reason.into(),
        }
    }

    fn kernel(&self, op: &str) -> String {
        format!("{op}_{}", self.dtype.name())
    }

    fn alloc(&self, shape: Vec<usize>) -> Result<GpuTensor<D::Buf>> {
        let n: usize = shape.iter().product();
        let buf = self.dev.alloc(n * self.dtype.size())?;
        if self.poison {
            self.dev.fill(&buf, 0xff)?;
        }
        Ok(GpuTensor {
            buf,
            shape,
            dtype: self.dtype,
        })
    }

    /// A tensor as a kernel argument; refuses one of another dtype (backends that share a
    /// device share the tensor type, and a kernel would read the wrong number of bytes).
    fn ptr(&self, t: &GpuTensor<D::Buf>) -> Result<KernelArg> {
        if t.dtype != self.dtype {
            return Err(self.err(format!(
                "a {} tensor handed to the {} backend",
                t.dtype, self.dtype
            )));
        }
        Ok(KernelArg::Ptr(self.dev.address(&t.buf)))
    }

    /// `y = act(x W^T + b + residual)` through the GEMM kernels; `x` is an address (a tensor
    /// or an im2col buffer) of [m, k] values of this backend's dtype.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        x: KernelArg,
        w: &GpuTensor<D::Buf>,
        b: Option<&GpuTensor<D::Buf>>,
        residual: Option<&GpuTensor<D::Buf>>,
        y: &GpuTensor<D::Buf>,
        [m, n, k]: [usize; 3],
        act: Activation,
    ) -> Result<()> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        let threads = if self.dtype == DType::F32 { 256 } else { 128 };
        let cfg = LaunchConfig {
            grid: [
                self.grid("GEMM row tiles", m.div_ceil(GEMM_TILE))?,
                self.grid("GEMM column tiles", n.div_ceil(GEMM_TILE))?,
                1,
            ],
            block: [threads, 1, 1],
            shared_bytes: 0,
        };
        let opt = |t: Option<&GpuTensor<D::Buf>>| -> Result<KernelArg> {
            t.map_or(Ok(KernelArg::Ptr(0)), |t| self.ptr(t))
        };
        self.launch(
            &self.kernel("gemm"),
            cfg,
            &[
                x,
                self.ptr(w)?,
                opt(b)?,
                opt(residual)?,
                self.ptr(y)?,
                self.u32("M", m)?,
                self.u32("N", n)?,
                self.u32("K", k)?,
                KernelArg::I32(act.code()),
            ],
        )
    }

    /// A launch with one thread per element of `total`, grid-stride (kernels loop over the
    /// rest), capped at a grid every device accepts.
    fn elementwise_cfg(&self, total: usize) -> LaunchConfig {
        LaunchConfig::linear(total.div_ceil(256).clamp(1, 1 << 20) as u32, 256, 0)
    }

    /// Every launch of this backend goes through here.
    fn launch(&self, kernel: &str, cfg: LaunchConfig, args: &[KernelArg]) -> Result<()> {
        // SAFETY: the launchers in this file pass arguments in the order and types of the
        // kernel signatures in kernels/*.cu, addresses of live buffers they allocated or were
        // given (of this backend's dtype, checked by `ptr`), and sizes taken from the shapes
        // of those same buffers after checking that the shapes agree.
        unsafe { self.dev.launch(kernel, cfg, args) }
    }

    fn ints(&self, values: impl Iterator<Item = usize>) -> Result<D::Buf> {
        let v: Vec<i32> = values.map(|x| x as i32).collect();
        self.dev.upload(bytemuck::cast_slice(&v))
    }

    fn check_cols(&self, what: &str, t: &GpuTensor<D::Buf>, cols: usize) -> Result<()> {
        if t.shape.last() != Some(&cols) {
            return Err(self.err(format!(
                "{what}: shape {:?}, last dimension must be {cols}",
                t.shape
            )));
        }
        Ok(())
    }

    /// Dynamic shared memory of a row kernel that keeps one f32 row plus 32 floats of scratch.
    fn row_shared(&self, cols: usize) -> Result<u32> {
        let bytes = (cols + 32) * 4;
        if bytes > MAX_SHARED_BYTES as usize {
            return Err(self.err(format!("rows of {cols} values do not fit in shared memory")));
        }
        Ok(bytes as u32)
    }

    /// A grid dimension; `launch` rejects those over the device limits.
    fn grid(&self, what: &str, v: usize) -> Result<u32> {
        u32::try_from(v).map_err(|_| {
            self.err(format!(
                "{what} = {v} is more blocks than a launch can have"
            ))
        })
    }

    fn u32(&self, what: &str, v: usize) -> Result<KernelArg> {
        u32::try_from(v).map(KernelArg::U32).map_err(|_| {
            self.err(format!(
                "{what} = {v} does not fit the kernels' 32-bit sizes"
            ))
        })
    }
}

impl<D: Device> Backend for GpuBackend<D> {
    type Tensor = GpuTensor<D::Buf>;

    fn name(&self) -> &'static str {
        self.dev.name()
    }

    fn device_id(&self) -> String {
        format!("{}, {}", self.dev.describe(), self.dtype.name())
    }

    fn synchronize(&self) -> Result<()> {
        self.dev.synchronize()
    }

    fn upload(&self, values: &[f32], shape: &[usize]) -> Result<Self::Tensor> {
        if values.len() != shape.iter().product::<usize>() {
            return Err(self.err(format!(
                "upload: {} values do not fill shape {shape:?}",
                values.len()
            )));
        }
        Ok(GpuTensor {
            buf: self.dev.upload(&self.dtype.encode(values))?,
            shape: shape.to_vec(),
            dtype: self.dtype,
        })
    }

    fn load_weight(&self, view: &TensorView<'_>) -> Result<Self::Tensor> {
        let buf = if view.dtype == self.dtype {
            self.dev.upload(view.bytes)?
        } else {
            self.dev.upload(&self.dtype.encode(&view.to_f32()))?
        };
        Ok(GpuTensor {
            buf,
            shape: view.shape.to_vec(),
            dtype: self.dtype,
        })
    }

    fn download(&self, t: &Self::Tensor) -> Result<Vec<f32>> {
        self.dev.synchronize()?;
        let mut bytes = vec![0u8; self.dev.len(&t.buf)];
        self.dev.download(&t.buf, &mut bytes)?;
        let view = TensorView {
            name: "",
            dtype: t.dtype,
            shape: &t.shape,
            bytes: &bytes,
        };
        Ok(view.to_f32().into_owned())
    }

    fn shape<'t>(&self, t: &'t Self::Tensor) -> &'t [usize] {
        &t.shape
    }

    fn linear(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        b: Option<&Self::Tensor>,
        act: Activation,
    ) -> Result<Self::Tensor> {
        if w.shape.len() != 2 {
            return Err(self.err(format!("linear: weight shape {:?} is not 2-D", w.shape)));
        }
        let (n, k) = (w.shape[0], w.shape[1]);
        self.check_cols("linear input", x, k)?;
        if let Some(b) = b
            && b.shape != [n]
        {
            return Err(self.err(format!("linear: bias shape {:?}, expected [{n}]", b.shape)));
        }
        let (m, _) = x.rows_cols();
        let mut shape = x.shape.clone();
        *shape.last_mut().expect("checked") = n;
        let y = self.alloc(shape)?;
        self.gemm(self.ptr(x)?, w, b, None, &y, [m, n, k], act)?;
        Ok(y)
    }

    fn add_layernorm(
        &self,
        x: &Self::Tensor,
        residual: &Self::Tensor,
        gamma: &Self::Tensor,
        beta: &Self::Tensor,
        eps: f32,
    ) -> Result<Self::Tensor> {
        if x.shape != residual.shape {
            return Err(self.err(format!(
                "add_layernorm: shapes {:?} and {:?} differ",
                x.shape, residual.shape
            )));
        }
        let (rows, cols) = x.rows_cols();
        self.check_cols("add_layernorm gamma", gamma, cols)?;
        self.check_cols("add_layernorm beta", beta, cols)?;
        let out = self.alloc(x.shape.clone())?;
        if rows == 0 {
            return Ok(out);
        }
        let cfg = LaunchConfig::linear(
            self.grid("rows", rows)?,
            ROW_THREADS,
            self.row_shared(cols)?,
        );
        self.launch(
            &self.kernel("add_layernorm"),
            cfg,
            &[
                self.ptr(x)?,
                self.ptr(residual)?,
                self.ptr(gamma)?,
                self.ptr(beta)?,
                self.ptr(&out)?,
                self.u32("cols", cols)?,
                KernelArg::F32(eps),
            ],
        )?;
        Ok(out)
    }

    fn attention(
        &self,
        qkv: &Self::Tensor,
        shape: &BatchShape,
        heads: usize,
    ) -> Result<Self::Tensor> {
        let (rows, cols3) = qkv.rows_cols();
        if rows != shape.rows()
            || !cols3.is_multiple_of(3)
            || heads == 0
            || !(cols3 / 3).is_multiple_of(heads)
        {
            return Err(self.err(format!(
                "attention: qkv shape {:?} does not fit {} inputs x {} positions x {heads} heads",
                qkv.shape,
                shape.batch(),
                shape.seq
            )));
        }
        if let Some(&bad) = shape.lengths.iter().find(|&&l| l == 0 || l > shape.seq) {
            return Err(self.err(format!("attention: length {bad} outside 1..={}", shape.seq)));
        }
        let width = cols3 / 3;
        let out = self.alloc(vec![rows, width])?;
        if rows == 0 {
            return Ok(out);
        }
        let lengths = self.ints(shape.lengths.iter().copied())?;
        let smem = ATTN_WARPS as usize * shape.seq * 4;
        if smem > MAX_SHARED_BYTES as usize {
            return Err(self.err(format!(
                "attention over {} positions does not fit in shared memory",
                shape.seq
            )));
        }
        let cfg = LaunchConfig {
            grid: [
                self.grid("inputs x heads", shape.batch() * heads)?,
                self.grid("query blocks", shape.seq.div_ceil(ATTN_WARPS as usize))?,
                1,
            ],
            block: [ATTN_WARPS * 32, 1, 1],
            shared_bytes: smem as u32,
        };
        self.launch(
            &self.kernel("attention"),
            cfg,
            &[
                self.ptr(qkv)?,
                KernelArg::Ptr(self.dev.address(&lengths)),
                self.ptr(&out)?,
                self.u32("seq", shape.seq)?,
                self.u32("width", width)?,
                self.u32("heads", heads)?,
                KernelArg::F32(1.0 / ((width / heads) as f32).sqrt()),
            ],
        )?;
        Ok(out)
    }

    fn embed(
        &self,
        ids: &[u32],
        type_ids: &[u32],
        shape: &BatchShape,
        word: &Self::Tensor,
        position: &Self::Tensor,
        token_type: &Self::Tensor,
        gamma: &Self::Tensor,
        beta: &Self::Tensor,
        eps: f32,
    ) -> Result<Self::Tensor> {
        let width = super::check_embedding(
            ids,
            type_ids,
            shape,
            &word.shape,
            &position.shape,
            &token_type.shape,
            &gamma.shape,
            &beta.shape,
        )
        .map_err(|e| self.err(e))?;
        let out = self.alloc(vec![shape.rows(), width])?;
        if shape.rows() == 0 {
            return Ok(out);
        }
        let ids_buf = self.ints(ids.iter().map(|&i| i as usize))?;
        let types_buf = self.ints(type_ids.iter().map(|&i| i as usize))?;
        let cfg = LaunchConfig::linear(
            self.grid("tokens", shape.rows())?,
            ROW_THREADS,
            self.row_shared(width)?,
        );
        self.launch(
            &self.kernel("embed"),
            cfg,
            &[
                KernelArg::Ptr(self.dev.address(&ids_buf)),
                KernelArg::Ptr(self.dev.address(&types_buf)),
                self.ptr(word)?,
                self.ptr(position)?,
                self.ptr(token_type)?,
                self.ptr(gamma)?,
                self.ptr(beta)?,
                self.ptr(&out)?,
                self.u32("seq", shape.seq)?,
                self.u32("width", width)?,
                KernelArg::F32(eps),
            ],
        )?;
        Ok(out)
    }

    fn pool(&self, x: &Self::Tensor, shape: &BatchShape, kind: Pooling) -> Result<Self::Tensor> {
        let (rows, cols) = x.rows_cols();
        if rows != shape.rows() {
            return Err(self.err(format!(
                "pool: {rows} rows, batch has {} x {}",
                shape.batch(),
                shape.seq
            )));
        }
        if let Some(&bad) = shape.lengths.iter().find(|&&l| l == 0 || l > shape.seq) {
            return Err(self.err(format!("pool: length {bad} outside 1..={}", shape.seq)));
        }
        let out = self.alloc(vec![shape.batch(), cols])?;
        if shape.batch() == 0 {
            return Ok(out);
        }
        let lengths = self.ints(shape.lengths.iter().copied())?;
        let mode = match kind {
            Pooling::Mean => 0,
            Pooling::Cls => 1,
        };
        self.launch(
            &self.kernel("pool"),
            LaunchConfig::linear(self.grid("inputs", shape.batch())?, ROW_THREADS, 0),
            &[
                self.ptr(x)?,
                KernelArg::Ptr(self.dev.address(&lengths)),
                self.ptr(&out)?,
                self.u32("seq", shape.seq)?,
                self.u32("width", cols)?,
                KernelArg::I32(mode),
            ],
        )?;
        Ok(out)
    }

    fn l2_normalize(&self, x: &Self::Tensor) -> Result<Self::Tensor> {
        self.row_op("l2_normalize", x)
    }

    fn softmax(&self, x: &Self::Tensor) -> Result<Self::Tensor> {
        self.row_op("softmax", x)
    }

    fn conv2d(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        b: Option<&Self::Tensor>,
        p: &Conv2d,
        residual: Option<&Self::Tensor>,
        act: Activation,
    ) -> Result<Self::Tensor> {
        let dims = super::check_conv(
            &x.shape,
            &w.shape,
            b.map(|b| b.shape.as_slice()),
            p,
            residual.map(|r| r.shape.as_slice()),
        )
        .map_err(|e| self.err(e))?;
        let [n, h, wd, cin, cout, kh, kw, oh, ow] = dims;
        let y = self.alloc(vec![n, oh, ow, cout])?;
        let m = n * oh * ow;
        if m == 0 || cout == 0 {
            return Ok(y);
        }
        let geometry = [
            self.u32("n", n)?,
            self.u32("h", h)?,
            self.u32("w", wd)?,
            self.u32("cin", cin)?,
        ];
        let window = [
            self.u32("kh", kh)?,
            self.u32("kw", kw)?,
            self.u32("oh", oh)?,
            self.u32("ow", ow)?,
            self.u32("stride", p.stride[0])?,
            self.u32("stride", p.stride[1])?,
            self.u32("padding", p.padding[0])?,
            self.u32("padding", p.padding[1])?,
        ];
        if p.groups == 1 {
            let k = kh * kw * cin;
            if kh == 1 && kw == 1 && p.stride == [1, 1] && p.padding == [0, 0] {
                self.gemm(self.ptr(x)?, w, b, residual, &y, [m, cout, k], act)?;
            } else {
                let cols = self.dev.alloc(m * k * self.dtype.size())?;
                let mut args = vec![self.ptr(x)?, KernelArg::Ptr(self.dev.address(&cols))];
                args.extend(geometry);
                args.extend(window);
                self.launch(&self.kernel("im2col"), self.elementwise_cfg(m * k), &args)?;
                let cols_arg = KernelArg::Ptr(self.dev.address(&cols));
                self.gemm(cols_arg, w, b, residual, &y, [m, cout, k], act)?;
            }
            return Ok(y);
        }
        let opt = |t: Option<&GpuTensor<D::Buf>>| -> Result<KernelArg> {
            t.map_or(Ok(KernelArg::Ptr(0)), |t| self.ptr(t))
        };
        let mut args = vec![
            self.ptr(x)?,
            self.ptr(w)?,
            opt(b)?,
            opt(residual)?,
            self.ptr(&y)?,
        ];
        args.extend(geometry);
        args.insert(9, self.u32("cout", cout)?);
        args.extend(window);
        args.push(self.u32("groups", p.groups)?);
        args.push(KernelArg::I32(act.code()));
        self.launch(
            &self.kernel("conv_grouped"),
            self.elementwise_cfg(m * cout),
            &args,
        )?;
        Ok(y)
    }

    fn reshape(&self, t: Self::Tensor, shape: &[usize]) -> Result<Self::Tensor> {
        if shape.iter().product::<usize>() != t.shape.iter().product::<usize>() {
            return Err(self.err(format!("reshape of {:?} to {shape:?}", t.shape)));
        }
        Ok(GpuTensor {
            shape: shape.to_vec(),
            ..t
        })
    }

    fn pool2d(&self, x: &Self::Tensor, p: &Pool2d) -> Result<Self::Tensor> {
        let [n, h, w, c, oh, ow] = super::check_pool(&x.shape, p).map_err(|e| self.err(e))?;
        let y = self.alloc(vec![n, oh, ow, c])?;
        let total = n * oh * ow * c;
        if total == 0 {
            return Ok(y);
        }
        let dims = [
            n,
            h,
            w,
            c,
            oh,
            ow,
            p.kernel[0],
            p.kernel[1],
            p.stride[0],
            p.stride[1],
            p.padding[0],
            p.padding[1],
        ];
        let mut args = vec![self.ptr(x)?, self.ptr(&y)?];
        for v in dims {
            args.push(self.u32("pool2d size", v)?);
        }
        args.push(KernelArg::I32(i32::from(p.max)));
        self.launch(&self.kernel("pool2d"), self.elementwise_cfg(total), &args)?;
        Ok(y)
    }

    fn global_avg_pool(&self, x: &Self::Tensor) -> Result<Self::Tensor> {
        if x.shape.len() != 4 {
            return Err(self.err(format!(
                "global_avg_pool: input {:?} must be 4-D (NHWC)",
                x.shape
            )));
        }
        let (n, hw, c) = (x.shape[0], x.shape[1] * x.shape[2], x.shape[3]);
        let y = self.alloc(vec![n, c])?;
        if n * c == 0 || hw == 0 {
            return Ok(y);
        }
        self.launch(
            &self.kernel("global_avg_pool"),
            self.elementwise_cfg(n * c),
            &[
                self.ptr(x)?,
                self.ptr(&y)?,
                self.u32("n", n)?,
                self.u32("hw", hw)?,
                self.u32("c", c)?,
            ],
        )?;
        Ok(y)
    }

    fn ramp_exit(
        &self,
        x: &Self::Tensor,
        positions: usize,
        lengths: &[usize],
        pooling: Pooling,
        head: &RampWeights<'_, Self::Tensor>,
        threshold: &Self::Tensor,
    ) -> Result<Vec<RampDecision>> {
        let Some((out, batch)) =
            self.launch_ramp(x, positions, lengths, pooling, head, threshold)?
        else {
            return Ok(Vec::new());
        };
        let mut bytes = vec![0u8; self.dev.len(&out)];
        self.dev.download(&out, &mut bytes)?;
        Ok(super::decode_decisions(&bytes, batch))
    }

    fn ramp_exit_async(
        &self,
        x: &Self::Tensor,
        positions: usize,
        lengths: &[usize],
        pooling: Pooling,
        head: &RampWeights<'_, Self::Tensor>,
        threshold: &Self::Tensor,
    ) -> Result<Box<dyn PendingDecisions>> {
        let Some((out, batch)) =
            self.launch_ramp(x, positions, lengths, pooling, head, threshold)?
        else {
            return Ok(Box::new(super::ReadyDecisions(Vec::new())));
        };
        let mut pinned = self.dev.alloc_pinned(self.dev.len(&out))?;
        self.dev.download_async(&out, &mut pinned)?;
        // `out` may be dropped now: device memory is freed after the work queued on it.
        Ok(Box::new(GpuPending {
            dev: self.dev.clone(),
            pinned,
            batch,
        }))
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
        Ok(super::decode_decisions(&bytes, self.batch))
    }
}

impl<D: Device> GpuBackend<D> {
    /// Launches the fused ramp kernel; its output buffer holds the class ids, uncertainties and
    /// exit flags of the `batch` inputs one after the other (see `decode_decisions`). `None`
    /// for an empty batch.
    #[allow(clippy::too_many_arguments)]
    fn launch_ramp(
        &self,
        x: &GpuTensor<D::Buf>,
        positions: usize,
        lengths: &[usize],
        pooling: Pooling,
        head: &RampWeights<'_, GpuTensor<D::Buf>>,
        threshold: &GpuTensor<D::Buf>,
    ) -> Result<Option<(D::Buf, usize)>> {
        let (batch, width, classes) = super::check_ramp(
            &x.shape,
            positions,
            lengths,
            head.dense
                .map(|(w, b)| (w.shape.as_slice(), b.shape.as_slice())),
            (&head.out.0.shape, &head.out.1.shape),
            &threshold.shape,
        )
        .map_err(|e| self.err(e))?;
        if batch == 0 {
            return Ok(None);
        }
        let smem = (2 * width + classes + 32) * 4;
        if smem > MAX_SHARED_BYTES as usize {
            return Err(self.err(format!(
                "a ramp of width {width} and {classes} classes does not fit in shared memory"
            )));
        }
        let lens = self.ints(lengths.iter().copied())?;
        // One buffer for the three outputs, so one copy brings them back.
        let out = self.dev.alloc(3 * batch * 4)?;
        let base = self.dev.address(&out);
        let (dw, db) = match head.dense {
            Some((w, b)) => (self.ptr(w)?, self.ptr(b)?),
            None => (KernelArg::Ptr(0), KernelArg::Ptr(0)),
        };
        self.launch(
            &self.kernel("ramp_exit"),
            LaunchConfig::linear(self.grid("inputs", batch)?, 256, smem as u32),
            &[
                self.ptr(x)?,
                KernelArg::Ptr(self.dev.address(&lens)),
                dw,
                db,
                self.ptr(head.out.0)?,
                self.ptr(head.out.1)?,
                self.ptr(threshold)?,
                KernelArg::Ptr(base),
                KernelArg::Ptr(base + 4 * batch as u64),
                KernelArg::Ptr(base + 8 * batch as u64),
                self.u32("positions", positions)?,
                self.u32("width", width)?,
                self.u32("classes", classes)?,
                KernelArg::I32(if pooling == Pooling::Cls { 1 } else { 0 }),
            ],
        )?;
        Ok(Some((out, batch)))
    }
}

impl<D: Device> GpuBackend<D> {
    /// A kernel with arguments (x, out, cols) and one block per row.
    fn row_op(&self, op: &str, x: &GpuTensor<D::Buf>) -> Result<GpuTensor<D::Buf>> {
        let (rows, cols) = x.rows_cols();
        let out = self.alloc(x.shape.clone())?;
        if rows == 0 {
            return Ok(out);
        }
        self.launch(
            &self.kernel(op),
            LaunchConfig::linear(self.grid("rows", rows)?, ROW_THREADS, 0),
            &[self.ptr(x)?, self.ptr(&out)?, self.u32("cols", cols)?],
        )?;
        Ok(out)
    }
}
