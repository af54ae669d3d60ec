//! A backend that fails on purpose: wraps any backend and turns chosen compute calls into
//! errors, to test what a server does when the device fails in the middle of a batch (every
//! request of that batch gets the error; the next batch is served).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::op_check::{
    AttentionCall, ConvCall, EmbedCall, GlobalPoolCall, LayerNormCall, LinearCall, Pool2dCall,
    PoolCall, RampCall, RowsCall,
};
use super::{Backend, PendingDecisions, RampDecision};
use crate::error::{Error, Result};
use crate::tensor::TensorView;

/// When a [`Faulty`] backend fails: shared, so a test can arm it after start-up.
#[derive(Debug, Default)]
pub struct FaultPlan {
    /// Fail every n-th compute op from now on (0: never).
    every: AtomicU64,
    calls: AtomicU64,
}

impl FaultPlan {
    pub fn new() -> Arc<FaultPlan> {
        Arc::new(FaultPlan::default())
    }

    /// From now on, fail every `n`-th compute op (0 disarms).
    pub fn fail_every(&self, n: u64) {
        self.calls.store(0, Ordering::Relaxed);
        self.every.store(n, Ordering::Relaxed);
    }
}

/// Fails compute ops (linear, attention, conv2d, ramp_exit, ...) as its [`FaultPlan`] says;
/// uploads, downloads and weight loading never fail.
pub struct Faulty<B> {
    inner: B,
    plan: Arc<FaultPlan>,
}

impl<B: Backend> Faulty<B> {
    pub fn new(inner: B, plan: Arc<FaultPlan>) -> Faulty<B> {
        Faulty { inner, plan }
    }

    fn tick(&self, op: &str) -> Result<()> {
        let every = self.plan.every.load(Ordering::Relaxed);
        if every == 0 {
            return Ok(());
        }
        let n = self.plan.calls.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_multiple_of(every) {
            return Err(Error::device(
                "faulty",
                format!("`{op}`"),
                format!("injected failure (call {n})"),
            ));
        }
        Ok(())
    }
}

/// Forwards every op to the wrapped backend after [`Faulty::tick`]; the arguments were checked
/// once already, by the op method that built the call. An inverted residual block runs as its
/// convolutions (the trait's default), each one call that can fail, so a wrapped CPU backend
/// does not take its fused path.
impl<B: Backend> Backend for Faulty<B> {
    type Tensor = B::Tensor;

    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn device_id(&self) -> String {
        self.inner.device_id()
    }
    fn synchronize(&self) -> Result<()> {
        self.inner.synchronize()
    }
    fn run_upload(&self, values: &[f32], shape: &[usize]) -> Result<Self::Tensor> {
        self.inner.run_upload(values, shape)
    }
    fn load_weight(&self, view: &TensorView<'_>) -> Result<Self::Tensor> {
        self.inner.load_weight(view)
    }
    fn download(&self, t: &Self::Tensor) -> Result<Vec<f32>> {
        self.inner.download(t)
    }
    fn shape<'t>(&self, t: &'t Self::Tensor) -> &'t [usize] {
        self.inner.shape(t)
    }
    fn run_reshape(&self, t: Self::Tensor, shape: &[usize]) -> Result<Self::Tensor> {
        self.inner.run_reshape(t, shape)
    }
    fn run_linear(&self, c: LinearCall<'_, Self::Tensor>) -> Result<Self::Tensor> {
        self.tick("linear")?;
        self.inner.run_linear(c)
    }
    fn run_add_layernorm(&self, c: LayerNormCall<'_, Self::Tensor>) -> Result<Self::Tensor> {
        self.tick("add_layernorm")?;
        self.inner.run_add_layernorm(c)
    }
    fn run_attention(&self, c: AttentionCall<'_, Self::Tensor>) -> Result<Self::Tensor> {
        self.tick("attention")?;
        self.inner.run_attention(c)
    }
    fn run_embed(&self, c: EmbedCall<'_, Self::Tensor>) -> Result<Self::Tensor> {
        self.tick("embed")?;
        self.inner.run_embed(c)
    }
    fn run_pool(&self, c: PoolCall<'_, Self::Tensor>) -> Result<Self::Tensor> {
        self.tick("pool")?;
        self.inner.run_pool(c)
    }
    fn run_l2_normalize(&self, c: RowsCall<'_, Self::Tensor>) -> Result<Self::Tensor> {
        self.tick("l2_normalize")?;
        self.inner.run_l2_normalize(c)
    }
    fn run_softmax(&self, c: RowsCall<'_, Self::Tensor>) -> Result<Self::Tensor> {
        self.tick("softmax")?;
        self.inner.run_softmax(c)
    }
    fn run_conv2d(&self, c: ConvCall<'_, Self::Tensor>) -> Result<Self::Tensor> {
        self.tick("conv2d")?;
        self.inner.run_conv2d(c)
    }
    fn run_pool2d(&self, c: Pool2dCall<'_, Self::Tensor>) -> Result<Self::Tensor> {
        self.tick("pool2d")?;
        self.inner.run_pool2d(c)
    }
    fn run_global_avg_pool(&self, c: GlobalPoolCall<'_, Self::Tensor>) -> Result<Self::Tensor> {
        self.tick("global_avg_pool")?;
        self.inner.run_global_avg_pool(c)
    }
    fn run_ramp_exit(&self, c: RampCall<'_, Self::Tensor>) -> Result<Vec<RampDecision>> {
        self.tick("ramp_exit")?;
        self.inner.run_ramp_exit(c)
    }
    fn run_ramp_exit_async(
        &self,
        c: RampCall<'_, Self::Tensor>,
    ) -> Result<Box<dyn PendingDecisions>> {
        self.tick("ramp_exit")?;
        self.inner.run_ramp_exit_async(c)
    }
}
