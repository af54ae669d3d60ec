//! Backends: where the ops of a model run. Model code is written once against [`Backend`].
//!
//! `cpu` is pure Rust; the GPU path is one backend (`gpu::GpuBackend`) over a [`device::Device`]:
//! `emu` (the kernel sources compiled for the host) or `cuda` (the same sources through NVRTC).

pub mod capture;
pub mod cpu;
pub mod cuda;
pub mod decoder;
pub mod device;
pub mod emu;
mod entry_points;
pub mod faulty;
pub mod gpu;
pub mod kernel_sources;
pub mod op_check;

use crate::error::Result;
use crate::tensor::TensorView;

pub use cpu::{CpuBackend, CpuConfig, SimdLevel, Winograd};
pub use op_check::{
    AttentionCall, ConvCall, ConvStep, EmbedCall, EmbeddingTables, GlobalPoolCall,
    InvertedResidualCall, LayerNormCall, LinearCall, Pool2dCall, PoolCall, RampCall, RampInput,
    RowsCall,
};

/// An inverted residual block as its three (or two) convolutions, one after the other.
pub fn unfused_inverted_residual<B: Backend + ?Sized>(
    be: &B,
    c: InvertedResidualCall<'_, B::Tensor>,
) -> Result<B::Tensor> {
    let conv =
        |x: &B::Tensor, s: &ConvStep<'_, B::Tensor>, r| be.conv2d(x, s.w, s.b, &s.p, r, s.act);
    let expanded = match &c.expand {
        Some((e, _)) => Some(conv(c.x, e, None)?),
        None => None,
    };
    let d = conv(expanded.as_ref().unwrap_or(c.x), &c.depthwise.0, None)?;
    drop(expanded);
    conv(&d, &c.project.0, c.residual)
}

/// Activation fused into the epilogue of [`Backend::linear`].
#[derive(Copy, Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    None,
    /// The exact GELU, `0.5 x (1 + erf(x / sqrt 2))`, as BERT uses it.
    GeluErf,
    Tanh,
    Relu,
    /// `min(max(x, 0), 6)`, as MobileNet/EfficientNet-Lite use it.
    Relu6,
}

impl Activation {
    /// The code the kernels use (`ACT_*` in kernels/common/params.cuh).
    pub fn code(self) -> i32 {
        use gpu::params;
        let code = match self {
            Activation::None => params::ACT_NONE,
            Activation::GeluErf => params::ACT_GELU_ERF,
            Activation::Tanh => params::ACT_TANH,
            Activation::Relu => params::ACT_RELU,
            Activation::Relu6 => params::ACT_RELU6,
        };
        code as i32
    }
}

/// Geometry of a 2-D convolution over NHWC tensors. The kernel size comes from the weight,
/// laid out `[out_channels, kernel_h, kernel_w, in_channels / groups]`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Conv2d {
    pub stride: [usize; 2],
    /// Zero padding before the first row and column.
    pub padding: [usize; 2],
    pub groups: usize,
    /// Extra zero padding after the last row and column, beyond `padding` (TensorFlow's "SAME"
    /// padding puts the odd pixel there).
    #[serde(default)]
    pub padding_extra: [usize; 2],
}

impl Conv2d {
    /// Output height and width for an input of `h x w` and a `kh x kw` kernel, or None when the
    /// kernel does not fit.
    pub fn output_size(&self, h: usize, w: usize, kh: usize, kw: usize) -> Option<(usize, usize)> {
        let span = |n: usize, k: usize, s: usize, p: usize, e: usize| {
            (n + 2 * p + e).checked_sub(k).map(|d| d / s.max(1) + 1)
        };
        Some((
            span(
                h,
                kh,
                self.stride[0],
                self.padding[0],
                self.padding_extra[0],
            )?,
            span(
                w,
                kw,
                self.stride[1],
                self.padding[1],
                self.padding_extra[1],
            )?,
        ))
    }
}

/// Max or average pooling over NHWC windows. Average pooling counts only the input pixels inside
/// the window (padding excluded), as `count_include_pad = False` in PyTorch.
#[derive(Copy, Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Pool2d {
    pub max: bool,
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub padding: [usize; 2],
}

/// How per-token states become one vector per input.
#[derive(Copy, Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// Mean over the real (unpadded) tokens.
    Mean,
    /// The first token (`[CLS]`).
    Cls,
}

/// Geometry of a padded batch of sequences: `lengths.len()` inputs, each padded on the right to
/// `seq` positions. Token-level tensors are `[batch * seq, width]`, row `b * seq + p`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchShape {
    pub seq: usize,
    pub lengths: Vec<usize>,
}

impl BatchShape {
    pub fn batch(&self) -> usize {
        self.lengths.len()
    }
    pub fn rows(&self) -> usize {
        self.batch() * self.seq
    }
}

/// The ops a backend provides, each with its fusion boundary fixed here so every backend fuses
/// the same way (and the parity harness compares like with like).
///
/// Callers use the op methods (`linear`, `conv2d`, ...). Each checks its arguments in
/// [`op_check`] and passes the checked call to the backend's `run_*` method; a backend implements
/// only those, and must not override the op methods (the checks would then differ between
/// backends again).
pub trait Backend: Send + Sync {
    /// A tensor resident on this backend: row-major, f32 semantics.
    type Tensor: Send + Sync + 'static;

    fn name(&self) -> &'static str;

    /// What this backend runs on, precisely enough that timings taken on one are not mistaken
    /// for another's (profiles record it and refuse to load elsewhere): processor, threads,
    /// storage dtype.
    fn device_id(&self) -> String;

    /// Waits until every op issued so far has finished (a no-op where ops are synchronous);
    /// timing a stage needs it.
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    /// Runs `f` (ops of this backend, no downloads) as one replayable unit named `key` where
    /// the backend can: a GPU backend on a [`capture::GraphDevice`] records it once and then
    /// replays it as one graph launch per call. Others run it as it is. What `f` returns may
    /// live in buffers that the next call of the same key reuses; `f` may run twice in one
    /// call (when a replay finds the run changed), so it must do the same thing each time.
    fn graphed<R>(&self, key: &str, f: &mut dyn FnMut() -> Result<R>) -> Result<R> {
        let _ = key;
        f()
    }

    /// Where the backend graphs runs ([`Backend::graphed`]), a reader of what its graphs have
    /// done so far (recorded, replayed, eager runs), usable from any thread; `None` elsewhere.
    fn graph_probe(&self) -> Option<capture::GraphProbe> {
        None
    }

    /// The sequence length a batch whose longest input has `seq` tokens is padded to on this
    /// backend: where runs are graphed, a few lengths ([`capture::seq_bucket`]) so that the
    /// graphs of a few shapes serve every batch; elsewhere `seq` (padding would only cost).
    fn padded_seq(&self, seq: usize) -> usize {
        match self.graphs_enabled() {
            true => capture::seq_bucket(seq),
            false => seq,
        }
    }

    /// Whether [`Backend::graphed`] records and replays runs on this backend (fixed when it is
    /// made; cheap to ask per batch or step).
    fn graphs_enabled(&self) -> bool {
        false
    }

    /// Loads a weight from its file storage. The CPU upcasts f16/bf16 to f32 here, once.
    fn load_weight(&self, view: &TensorView<'_>) -> Result<Self::Tensor> {
        self.upload(&view.to_f32(), view.shape)
    }

    /// Copies a tensor back to the host.
    fn download(&self, t: &Self::Tensor) -> Result<Vec<f32>>;

    fn shape<'t>(&self, t: &'t Self::Tensor) -> &'t [usize];

    // ---- what a backend implements: the ops on checked arguments ----------------------------

    /// [`Backend::upload`] with `values.len()` equal to the shape's element count.
    fn run_upload(&self, values: &[f32], shape: &[usize]) -> Result<Self::Tensor>;
    /// [`Backend::reshape`] to a shape of the same element count.
    fn run_reshape(&self, t: Self::Tensor, shape: &[usize]) -> Result<Self::Tensor>;
    fn run_linear(&self, c: LinearCall<'_, Self::Tensor>) -> Result<Self::Tensor>;
    fn run_add_layernorm(&self, c: LayerNormCall<'_, Self::Tensor>) -> Result<Self::Tensor>;
    fn run_attention(&self, c: AttentionCall<'_, Self::Tensor>) -> Result<Self::Tensor>;
    fn run_embed(&self, c: EmbedCall<'_, Self::Tensor>) -> Result<Self::Tensor>;
    fn run_pool(&self, c: PoolCall<'_, Self::Tensor>) -> Result<Self::Tensor>;
    fn run_l2_normalize(&self, c: RowsCall<'_, Self::Tensor>) -> Result<Self::Tensor>;
    fn run_softmax(&self, c: RowsCall<'_, Self::Tensor>) -> Result<Self::Tensor>;
    fn run_conv2d(&self, c: ConvCall<'_, Self::Tensor>) -> Result<Self::Tensor>;
    /// Backends that do not fuse the block run its convolutions one after the other
    /// ([`unfused_inverted_residual`]).
    fn run_inverted_residual(
        &self,
        c: InvertedResidualCall<'_, Self::Tensor>,
    ) -> Result<Self::Tensor> {
        unfused_inverted_residual(self, c)
    }
    fn run_pool2d(&self, c: Pool2dCall<'_, Self::Tensor>) -> Result<Self::Tensor>;
    fn run_global_avg_pool(&self, c: GlobalPoolCall<'_, Self::Tensor>) -> Result<Self::Tensor>;
    fn run_ramp_exit(&self, c: RampCall<'_, Self::Tensor>) -> Result<Vec<RampDecision>>;
    /// Synchronous backends need not implement it: their decisions are ready at once.
    fn run_ramp_exit_async(
        &self,
        c: RampCall<'_, Self::Tensor>,
    ) -> Result<Box<dyn PendingDecisions>> {
        Ok(Box::new(ReadyDecisions(self.run_ramp_exit(c)?)))
    }

    // ---- what callers use: checked once, here, for every backend ----------------------------

    /// Copies host values into a new tensor of `shape`.
    fn upload(&self, values: &[f32], shape: &[usize]) -> Result<Self::Tensor> {
        op_check::upload(values.len(), shape)?;
        self.run_upload(values, shape)
    }

    /// The same elements under another shape (no copy).
    fn reshape(&self, t: Self::Tensor, shape: &[usize]) -> Result<Self::Tensor> {
        op_check::reshape(self.shape(&t), shape)?;
        self.run_reshape(t, shape)
    }

    /// `act(x W^T + b)`: `x` [m, k], `w` [n, k] (PyTorch `Linear` layout), `b` [n] -> [m, n].
    fn linear(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        b: Option<&Self::Tensor>,
        act: Activation,
    ) -> Result<Self::Tensor> {
        self.run_linear(op_check::linear(self, x, w, b, act)?)
    }

    /// `LayerNorm(x + residual) * gamma + beta`, row-wise over the last dimension.
    fn add_layernorm(
        &self,
        x: &Self::Tensor,
        residual: &Self::Tensor,
        gamma: &Self::Tensor,
        beta: &Self::Tensor,
        eps: f32,
    ) -> Result<Self::Tensor> {
        self.run_add_layernorm(op_check::add_layernorm(
            self, x, residual, gamma, beta, eps,
        )?)
    }

    /// Multi-head self-attention core: from fused `qkv` [rows, 3 * width] (Q | K | V, heads
    /// contiguous within each) to the context [rows, width]: `softmax(Q K^T / sqrt(d)) V` with
    /// keys beyond each input's length masked out. Rows of padding positions come out zero.
    fn attention(
        &self,
        qkv: &Self::Tensor,
        shape: &BatchShape,
        heads: usize,
    ) -> Result<Self::Tensor> {
        self.run_attention(op_check::attention(self, qkv, shape, heads)?)
    }

    /// `LayerNorm(word[id] + position[p] + token_type[type])` for every row of the batch.
    #[allow(clippy::too_many_arguments)]
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
        let tables = EmbeddingTables {
            word,
            position,
            token_type,
            gamma,
            beta,
        };
        self.run_embed(op_check::embed(self, ids, type_ids, shape, tables, eps)?)
    }

    /// Token states [rows, width] -> one vector per input [batch, width].
    fn pool(&self, x: &Self::Tensor, shape: &BatchShape, kind: Pooling) -> Result<Self::Tensor> {
        self.run_pool(op_check::pool(self, x, shape, kind)?)
    }

    /// Row-wise `x / max(||x||, 1e-12)`.
    fn l2_normalize(&self, x: &Self::Tensor) -> Result<Self::Tensor> {
        self.run_l2_normalize(op_check::rows(self, "l2_normalize", x)?)
    }

    /// Row-wise softmax.
    fn softmax(&self, x: &Self::Tensor) -> Result<Self::Tensor> {
        self.run_softmax(op_check::rows(self, "softmax", x)?)
    }

    /// `act(conv2d(x, w) + b + residual)` over NHWC: `x` [n, h, w, cin], `w` [cout, kh, kw,
    /// cin / groups], `b` [cout], `residual` (if any) shaped like the output [n, oh, ow, cout].
    fn conv2d(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        b: Option<&Self::Tensor>,
        p: &Conv2d,
        residual: Option<&Self::Tensor>,
        act: Activation,
    ) -> Result<Self::Tensor> {
        self.run_conv2d(op_check::conv2d(self, x, w, b, p, residual, act)?)
    }

    /// An inverted residual block (MobileNetV2, EfficientNet's MBConv without
    /// squeeze-excitation): `expand` (a 1x1 convolution, optional), `depthwise`, then `project`
    /// (a 1x1 convolution with `residual` added before its activation). The same values as the
    /// three [`Backend::conv2d`] calls; a backend may fuse them (the CPU backend works through
    /// the image in bands of rows, so that the expanded activations stay in its caches).
    fn inverted_residual(
        &self,
        x: &Self::Tensor,
        expand: Option<ConvStep<'_, Self::Tensor>>,
        depthwise: ConvStep<'_, Self::Tensor>,
        project: ConvStep<'_, Self::Tensor>,
        residual: Option<&Self::Tensor>,
    ) -> Result<Self::Tensor> {
        self.run_inverted_residual(op_check::inverted_residual(
            self, x, expand, depthwise, project, residual,
        )?)
    }

    /// Max or average pooling over NHWC windows.
    fn pool2d(&self, x: &Self::Tensor, p: &Pool2d) -> Result<Self::Tensor> {
        self.run_pool2d(op_check::pool2d(self, x, p)?)
    }

    /// [n, h, w, c] -> [n, c], the mean over every pixel.
    fn global_avg_pool(&self, x: &Self::Tensor) -> Result<Self::Tensor> {
        self.run_global_avg_pool(op_check::global_avg_pool(self, x)?)
    }

    /// The fused ramp + exit check on a stage output (see [`RampInput`]), through the ramp
    /// head, softmax, and the exit test against `threshold` (a [1] tensor in device memory).
    fn ramp_exit(
        &self,
        input: &RampInput<'_, Self::Tensor>,
        head: &RampWeights<'_, Self::Tensor>,
        threshold: &Self::Tensor,
    ) -> Result<Vec<RampDecision>> {
        self.run_ramp_exit(op_check::ramp(self, input, head, threshold)?)
    }

    /// [`Backend::ramp_exit`] without waiting: the decisions travel to the host while the
    /// backend goes on with later work; [`PendingDecisions::wait`] blocks until they are there
    /// (on a GPU, an asynchronous copy into pinned memory and an event; on a synchronous
    /// backend they are ready at once).
    fn ramp_exit_async(
        &self,
        input: &RampInput<'_, Self::Tensor>,
        head: &RampWeights<'_, Self::Tensor>,
        threshold: &Self::Tensor,
    ) -> Result<Box<dyn PendingDecisions>> {
        self.run_ramp_exit_async(op_check::ramp(self, input, head, threshold)?)
    }
}

/// A ramp's decisions on their way to the host.
pub trait PendingDecisions: Send {
    /// Blocks until the decisions are on the host.
    fn wait(self: Box<Self>) -> Result<Vec<RampDecision>>;
}

/// Decisions that are already on the host.
pub struct ReadyDecisions(pub Vec<RampDecision>);

impl PendingDecisions for ReadyDecisions {
    fn wait(self: Box<Self>) -> Result<Vec<RampDecision>> {
        Ok(self.0)
    }
}

/// Decodes the fused ramp kernel's output: `batch` class ids (u32), then `batch`
/// uncertainties (f32), then `batch` exit flags (i32), little-endian.
pub(crate) fn decode_decisions(bytes: &[u8], batch: usize) -> Vec<RampDecision> {
    let word = |k: usize| {
        let o = 4 * k;
        [bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]
    };
    (0..batch)
        .map(|i| RampDecision {
            class: u32::from_le_bytes(word(i)),
            uncertainty: f32::from_le_bytes(word(batch + i)),
            exit: i32::from_le_bytes(word(2 * batch + i)) != 0,
        })
        .collect()
}

/// What the fused ramp + exit check decided for one input.
#[derive(Copy, Clone, Debug, PartialEq)]
pub struct RampDecision {
    /// The ramp's predicted class.
    pub class: u32,
    /// `1 - max p` of the ramp's softmax.
    pub uncertainty: f32,
    /// `uncertainty < threshold`: the input may leave at this ramp.
    pub exit: bool,
}

/// The weights of a ramp head on a backend: an optional `dense + tanh` layer, then the
/// classifier (`[classes, width]`, `[classes]`).
pub struct RampWeights<'a, T> {
    pub dense: Option<(&'a T, &'a T)>,
    pub out: (&'a T, &'a T),
}

/// A pooling window's output geometry for the CNN config check: (n, h, w, c, oh, ow) or what is
/// wrong, as text (that check reports strings).
pub(crate) fn check_pool(x: &[usize], p: &Pool2d) -> std::result::Result<[usize; 6], String> {
    let d = op_check::pool2d_dims(x, p).map_err(|e| e.to_string())?;
    Ok([d.n, d.h, d.w, d.c, d.oh, d.ow])
}
