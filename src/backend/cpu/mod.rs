//! The `cpu` backend: pure Rust, f32 compute, multi-threaded with its own rayon pool.
//! GEMMs go through the `gemm` crate; the memory-bound ops are fused loops over rows.
//! It is also the reference every other backend is tested against.

mod attention;
mod conv;
mod embedding;
mod linear;
mod norm;
mod pool;
mod ramp;
mod simd;

use std::sync::Arc;

use super::{Activation, Backend, BatchShape, Conv2d, Pool2d, Pooling, RampDecision, RampWeights};
use crate::error::{Error, Result};

/// Settings of the CPU backend.
#[derive(Clone, Debug, Default)]
pub struct CpuConfig {
    /// Worker threads. Default (`None`): the number of logical cores, or `APPARATE_THREADS`
    /// when that environment variable is set.
    pub threads: Option<usize>,
}

/// A tensor in host memory. Its shape always matches its data (made only through
/// [`Backend::upload`] and the ops), which the ops' unsafe GEMM calls rely on.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuTensor {
    shape: Vec<usize>,
    data: Vec<f32>,
}

impl CpuTensor {
    fn new(shape: Vec<usize>, data: Vec<f32>) -> CpuTensor {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "shape/data mismatch"
        );
        CpuTensor { shape, data }
    }
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn data(&self) -> &[f32] {
        &self.data
    }
    /// Leading dimensions flattened: (rows, last dimension).
    fn rows_cols(&self) -> (usize, usize) {
        let cols = self.shape.last().copied().unwrap_or(1);
        (self.data.len() / cols.max(1), cols)
    }
}

#[derive(Clone)]
pub struct CpuBackend {
    pool: Arc<rayon::ThreadPool>,
    threads: usize,
}

impl std::fmt::Debug for CpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CpuBackend {{ threads: {} }}", self.threads)
    }
}

pub(crate) fn err(reason: impl Into<String>) -> Error {
    Error::Backend {
        backend: "cpu",
        reason: reason.into(),
    }
}

impl CpuBackend {
    pub fn new(config: CpuConfig) -> Result<CpuBackend> {
        let from_env = || {
            std::env::var("APPARATE_THREADS")
                .ok()
                .map(|v| {
                    v.parse::<usize>()
                        .map_err(|_| err(format!("APPARATE_THREADS=`{v}` is not a number")))
                })
                .transpose()
        };
        let threads = match config.threads {
            Some(t) => Some(t),
            None => from_env()?,
        }
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("apparate-cpu-{i}"))
            .build()
            .map_err(|e| err(format!("cannot start {threads} worker threads: {e}")))?;
        Ok(CpuBackend {
            pool: Arc::new(pool),
            threads,
        })
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    fn par(&self) -> gemm::Parallelism {
        if self.threads > 1 {
            gemm::Parallelism::Rayon(self.threads)
        } else {
            gemm::Parallelism::None
        }
    }
}

fn check_cols(what: &str, t: &CpuTensor, cols: usize) -> Result<()> {
    if t.shape.last() != Some(&cols) {
        return Err(err(format!(
            "{what}: shape {:?}, last dimension must be {cols}",
            t.shape
        )));
    }
    Ok(())
}

/// The host processor's model name (Linux: /proc/cpuinfo), for device ids.
pub(crate) fn host_cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn device_id(&self) -> String {
        format!("cpu: {}, {} threads, f32", host_cpu_name(), self.threads)
    }

    fn upload(&self, values: &[f32], shape: &[usize]) -> Result<CpuTensor> {
        if values.len() != shape.iter().product::<usize>() {
            return Err(err(format!(
                "upload: {} values do not fill shape {shape:?}",
                values.len()
            )));
        }
        Ok(CpuTensor::new(shape.to_vec(), values.to_vec()))
    }

    fn download(&self, t: &CpuTensor) -> Result<Vec<f32>> {
        Ok(t.data.clone())
    }

    fn shape<'t>(&self, t: &'t CpuTensor) -> &'t [usize] {
        &t.shape
    }

    fn linear(
        &self,
        x: &CpuTensor,
        w: &CpuTensor,
        b: Option<&CpuTensor>,
        act: Activation,
    ) -> Result<CpuTensor> {
        if w.shape.len() != 2 {
            return Err(err(format!(
                "linear: weight shape {:?} is not 2-D",
                w.shape
            )));
        }
        let (n, k) = (w.shape[0], w.shape[1]);
        check_cols("linear input", x, k)?;
        if let Some(b) = b
            && b.shape != [n]
        {
            return Err(err(format!(
                "linear: bias shape {:?}, expected [{n}]",
                b.shape
            )));
        }
        let (m, _) = x.rows_cols();
        let par = self.par();
        let data = self.pool.install(|| {
            linear::linear(
                &x.data,
                &w.data,
                b.map(|b| b.data.as_slice()),
                None,
                m,
                n,
                k,
                act,
                par,
            )
        });
        let mut shape = x.shape.clone();
        *shape.last_mut().expect("checked non-empty") = n;
        Ok(CpuTensor::new(shape, data))
    }

    fn add_layernorm(
        &self,
        x: &CpuTensor,
        residual: &CpuTensor,
        gamma: &CpuTensor,
        beta: &CpuTensor,
        eps: f32,
    ) -> Result<CpuTensor> {
        if x.shape != residual.shape {
            return Err(err(format!(
                "add_layernorm: shapes {:?} and {:?} differ",
                x.shape, residual.shape
            )));
        }
        let (_, cols) = x.rows_cols();
        if cols == 0 {
            return Err(err("add_layernorm: rows of width 0"));
        }
        check_cols("add_layernorm gamma", gamma, cols)?;
        check_cols("add_layernorm beta", beta, cols)?;
        let data = self.pool.install(|| {
            norm::add_layernorm(&x.data, &residual.data, &gamma.data, &beta.data, cols, eps)
        });
        Ok(CpuTensor::new(x.shape.clone(), data))
    }

    fn attention(&self, qkv: &CpuTensor, shape: &BatchShape, heads: usize) -> Result<CpuTensor> {
        let (rows, cols3) = qkv.rows_cols();
        if rows != shape.rows()
            || !cols3.is_multiple_of(3)
            || heads == 0
            || !(cols3 / 3).is_multiple_of(heads)
        {
            return Err(err(format!(
                "attention: qkv shape {:?} does not fit {} inputs x {} positions x {heads} heads",
                qkv.shape,
                shape.batch(),
                shape.seq
            )));
        }
        if let Some(&bad) = shape.lengths.iter().find(|&&l| l == 0 || l > shape.seq) {
            return Err(err(format!(
                "attention: length {bad} outside 1..={}",
                shape.seq
            )));
        }
        let width = cols3 / 3;
        let data = self
            .pool
            .install(|| attention::attention(&qkv.data, shape, width, heads));
        Ok(CpuTensor::new(vec![rows, width], data))
    }

    fn embed(
        &self,
        ids: &[u32],
        type_ids: &[u32],
        shape: &BatchShape,
        word: &CpuTensor,
        position: &CpuTensor,
        token_type: &CpuTensor,
        gamma: &CpuTensor,
        beta: &CpuTensor,
        eps: f32,
    ) -> Result<CpuTensor> {
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
        .map_err(err)?;
        let data = self.pool.install(|| {
            embedding::embed(
                ids,
                type_ids,
                shape,
                &word.data,
                &position.data,
                &token_type.data,
                &gamma.data,
                &beta.data,
                width,
                eps,
            )
        });
        Ok(CpuTensor::new(vec![shape.rows(), width], data))
    }

    fn pool(&self, x: &CpuTensor, shape: &BatchShape, kind: Pooling) -> Result<CpuTensor> {
        let (rows, cols) = x.rows_cols();
        if rows != shape.rows() {
            return Err(err(format!(
                "pool: {rows} rows, batch has {} x {}",
                shape.batch(),
                shape.seq
            )));
        }
        if let Some(&bad) = shape.lengths.iter().find(|&&l| l == 0 || l > shape.seq) {
            return Err(err(format!("pool: length {bad} outside 1..={}", shape.seq)));
        }
        let data = pool::pool(&x.data, shape, cols, kind);
        Ok(CpuTensor::new(vec![shape.batch(), cols], data))
    }

    fn l2_normalize(&self, x: &CpuTensor) -> Result<CpuTensor> {
        let (_, cols) = x.rows_cols();
        Ok(CpuTensor::new(
            x.shape.clone(),
            pool::l2_normalize(&x.data, cols),
        ))
    }

    fn softmax(&self, x: &CpuTensor) -> Result<CpuTensor> {
        let (_, cols) = x.rows_cols();
        let mut data = x.data.clone();
        for row in data.chunks_mut(cols.max(1)) {
            pool::softmax_in_place(row);
        }
        Ok(CpuTensor::new(x.shape.clone(), data))
    }

    fn conv2d(
        &self,
        x: &CpuTensor,
        w: &CpuTensor,
        b: Option<&CpuTensor>,
        p: &Conv2d,
        residual: Option<&CpuTensor>,
        act: Activation,
    ) -> Result<CpuTensor> {
        let dims = super::check_conv(
            &x.shape,
            &w.shape,
            b.map(|b| b.shape.as_slice()),
            p,
            residual.map(|r| r.shape.as_slice()),
        )
        .map_err(err)?;
        let par = self.par();
        let data = self.pool.install(|| {
            conv::conv2d(
                &x.data,
                &w.data,
                b.map(|b| b.data.as_slice()),
                residual.map(|r| r.data.as_slice()),
                dims,
                p,
                act,
                par,
            )
        });
        Ok(CpuTensor::new(
            vec![dims[0], dims[7], dims[8], dims[4]],
            data,
        ))
    }

    fn reshape(&self, t: CpuTensor, shape: &[usize]) -> Result<CpuTensor> {
        if shape.iter().product::<usize>() != t.data.len() {
            return Err(err(format!("reshape of {:?} to {shape:?}", t.shape)));
        }
        Ok(CpuTensor::new(shape.to_vec(), t.data))
    }

    fn pool2d(&self, x: &CpuTensor, p: &Pool2d) -> Result<CpuTensor> {
        let dims = super::check_pool(&x.shape, p).map_err(err)?;
        let data = self.pool.install(|| conv::pool2d(&x.data, dims, p));
        Ok(CpuTensor::new(
            vec![dims[0], dims[4], dims[5], dims[3]],
            data,
        ))
    }

    fn global_avg_pool(&self, x: &CpuTensor) -> Result<CpuTensor> {
        if x.shape.len() != 4 {
            return Err(err(format!(
                "global_avg_pool: input {:?} must be 4-D (NHWC)",
                x.shape
            )));
        }
        let (n, hw, c) = (x.shape[0], x.shape[1] * x.shape[2], x.shape[3]);
        let data = self
            .pool
            .install(|| conv::global_avg_pool(&x.data, n, hw, c));
        Ok(CpuTensor::new(vec![n, c], data))
    }

    fn ramp_exit(
        &self,
        x: &CpuTensor,
        positions: usize,
        lengths: &[usize],
        pooling: Pooling,
        head: &RampWeights<'_, CpuTensor>,
        threshold: &CpuTensor,
    ) -> Result<Vec<RampDecision>> {
        let (_, width, classes) = super::check_ramp(
            &x.shape,
            positions,
            lengths,
            head.dense
                .map(|(w, b)| (w.shape.as_slice(), b.shape.as_slice())),
            (&head.out.0.shape, &head.out.1.shape),
            &threshold.shape,
        )
        .map_err(err)?;
        Ok(self.pool.install(|| {
            ramp::ramp_exit(
                &x.data,
                positions,
                lengths,
                pooling,
                head.dense
                    .map(|(w, b)| (w.data.as_slice(), b.data.as_slice())),
                (&head.out.0.data, &head.out.1.data),
                width,
                classes,
                threshold.data[0],
            )
        }))
    }
}
