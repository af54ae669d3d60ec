//! A backend that fails on purpose: wraps any backend and turns chosen compute calls into
//! errors, to test what a server does when the device fails in the middle of a batch (every
//! request of that batch gets the error; the next batch is served).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{Activation, Backend, BatchShape, Conv2d, Pool2d, Pooling, RampDecision, RampWeights};
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
            return Err(Error::Backend {
                backend: "faulty",
                reason: format!("injected failure of `{op}` (call {n})"),
            });
        }
        Ok(())
    }
}

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
    fn upload(&self, values: &[f32], shape: &[usize]) -> Result<Self::Tensor> {
        self.inner.upload(values, shape)
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
    fn linear(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        b: Option<&Self::Tensor>,
        act: Activation,
    ) -> Result<Self::Tensor> {
        self.tick("linear")?;
        self.inner.linear(x, w, b, act)
    }
    fn add_layernorm(
        &self,
        x: &Self::Tensor,
        residual: &Self::Tensor,
        gamma: &Self::Tensor,
        beta: &Self::Tensor,
        eps: f32,
    ) -> Result<Self::Tensor> {
        self.tick("add_layernorm")?;
        self.inner.add_layernorm(x, residual, gamma, beta, eps)
    }
    fn attention(
        &self,
        qkv: &Self::Tensor,
        shape: &BatchShape,
        heads: usize,
    ) -> Result<Self::Tensor> {
        self.tick("attention")?;
        self.inner.attention(qkv, shape, heads)
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
        self.tick("embed")?;
        self.inner.embed(
            ids, type_ids, shape, word, position, token_type, gamma, beta, eps,
        )
    }
    fn pool(&self, x: &Self::Tensor, shape: &BatchShape, kind: Pooling) -> Result<Self::Tensor> {
        self.tick("pool")?;
        self.inner.pool(x, shape, kind)
    }
    fn l2_normalize(&self, x: &Self::Tensor) -> Result<Self::Tensor> {
        self.tick("l2_normalize")?;
        self.inner.l2_normalize(x)
    }
    fn softmax(&self, x: &Self::Tensor) -> Result<Self::Tensor> {
        self.tick("softmax")?;
        self.inner.softmax(x)
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
        self.tick("conv2d")?;
        self.inner.conv2d(x, w, b, p, residual, act)
    }
    fn reshape(&self, t: Self::Tensor, shape: &[usize]) -> Result<Self::Tensor> {
        self.inner.reshape(t, shape)
    }
    fn pool2d(&self, x: &Self::Tensor, p: &Pool2d) -> Result<Self::Tensor> {
        self.tick("pool2d")?;
        self.inner.pool2d(x, p)
    }
    fn global_avg_pool(&self, x: &Self::Tensor) -> Result<Self::Tensor> {
        self.tick("global_avg_pool")?;
        self.inner.global_avg_pool(x)
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
        self.tick("ramp_exit")?;
        self.inner
            .ramp_exit(x, positions, lengths, pooling, head, threshold)
    }
}
