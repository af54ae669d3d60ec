//! Backends: where the ops of a model run. Model code is written once against [`Backend`].
//!
//! `cpu` is pure Rust; the GPU path is one backend (`gpu::GpuBackend`) over a [`device::Device`]:
//! `emu` (the kernel sources compiled for the host) or `cuda` (the same sources through NVRTC).

pub mod cpu;
pub mod cuda;
pub mod device;
pub mod emu;
mod entry_points;
pub mod faulty;
pub mod gpu;
pub mod kernel_sources;

use crate::error::Result;
use crate::tensor::TensorView;

pub use cpu::{CpuBackend, CpuConfig};

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
    /// The code the kernels use (`ACT_*` in kernels/common/apparate.cuh).
    pub fn code(self) -> i32 {
        match self {
            Activation::None => 0,
            Activation::GeluErf => 1,
            Activation::Tanh => 2,
            Activation::Relu => 3,
            Activation::Relu6 => 4,
        }
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

/// Checks an embedding call before any table is indexed: the tables' shapes agree, and the token
/// ids (user input) are inside them. Returns the width. Shared by every backend.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_embedding(
    ids: &[u32],
    type_ids: &[u32],
    shape: &BatchShape,
    word: &[usize],
    position: &[usize],
    token_type: &[usize],
    gamma: &[usize],
    beta: &[usize],
) -> std::result::Result<usize, String> {
    let width = word.last().copied().unwrap_or(0);
    for (what, t) in [
        ("word", word),
        ("position", position),
        ("token type", token_type),
    ] {
        if t.len() != 2 || t[0] == 0 || t[1] != width || width == 0 {
            return Err(format!(
                "embed {what} table: shape {t:?} is not [rows, {width}]"
            ));
        }
    }
    for (what, t) in [("gamma", gamma), ("beta", beta)] {
        if t != [width] {
            return Err(format!("embed {what}: shape {t:?}, expected [{width}]"));
        }
    }
    let (vocab, types, positions) = (word[0], token_type[0], position[0]);
    let rows = shape.rows();
    if ids.len() != rows || type_ids.len() != rows {
        return Err(format!(
            "embed: {} ids and {} type ids for {rows} positions",
            ids.len(),
            type_ids.len()
        ));
    }
    if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
        return Err(format!(
            "token id {bad} is outside the vocabulary of {vocab}"
        ));
    }
    if let Some(bad) = type_ids.iter().find(|&&i| i as usize >= types) {
        return Err(format!("token type id {bad} is outside 0..{types}"));
    }
    if shape.seq > positions {
        return Err(format!(
            "sequence of {} positions is longer than the model's {positions}",
            shape.seq
        ));
    }
    if let Some(&bad) = shape.lengths.iter().find(|&&l| l == 0 || l > shape.seq) {
        return Err(format!("length {bad} outside 1..={}", shape.seq));
    }
    Ok(width)
}

/// The ops a backend provides, each with its fusion boundary fixed here so every backend fuses
/// the same way (and the parity harness compares like with like).
pub trait Backend: Send + Sync {
    /// A tensor resident on this backend: row-major, f32 semantics.
    type Tensor: Send + Sync;

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

    /// Copies host values into a new tensor of `shape`.
    fn upload(&self, values: &[f32], shape: &[usize]) -> Result<Self::Tensor>;

    /// Loads a weight from its file storage. The CPU upcasts f16/bf16 to f32 here, once.
    fn load_weight(&self, view: &TensorView<'_>) -> Result<Self::Tensor> {
        self.upload(&view.to_f32(), view.shape)
    }

    /// Copies a tensor back to the host.
    fn download(&self, t: &Self::Tensor) -> Result<Vec<f32>>;

    fn shape<'t>(&self, t: &'t Self::Tensor) -> &'t [usize];

    /// `act(x W^T + b)`: `x` [m, k], `w` [n, k] (PyTorch `Linear` layout), `b` [n] -> [m, n].
    fn linear(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        b: Option<&Self::Tensor>,
        act: Activation,
    ) -> Result<Self::Tensor>;

    /// `LayerNorm(x + residual) * gamma + beta`, row-wise over the last dimension.
    fn add_layernorm(
        &self,
        x: &Self::Tensor,
        residual: &Self::Tensor,
        gamma: &Self::Tensor,
        beta: &Self::Tensor,
        eps: f32,
    ) -> Result<Self::Tensor>;

    /// Multi-head self-attention core: from fused `qkv` [rows, 3 * width] (Q | K | V, heads
    /// contiguous within each) to the context [rows, width]: `softmax(Q K^T / sqrt(d)) V` with
    /// keys beyond each input's length masked out. Rows of padding positions come out zero.
    fn attention(
        &self,
        qkv: &Self::Tensor,
        shape: &BatchShape,
        heads: usize,
    ) -> Result<Self::Tensor>;

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
    ) -> Result<Self::Tensor>;

    /// Token states [rows, width] -> one vector per input [batch, width].
    fn pool(&self, x: &Self::Tensor, shape: &BatchShape, kind: Pooling) -> Result<Self::Tensor>;

    /// Row-wise `x / max(||x||, 1e-12)`.
    fn l2_normalize(&self, x: &Self::Tensor) -> Result<Self::Tensor>;

    /// Row-wise softmax.
    fn softmax(&self, x: &Self::Tensor) -> Result<Self::Tensor>;

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
    ) -> Result<Self::Tensor>;

    /// The same elements under another shape (no copy).
    fn reshape(&self, t: Self::Tensor, shape: &[usize]) -> Result<Self::Tensor>;

    /// Max or average pooling over NHWC windows.
    fn pool2d(&self, x: &Self::Tensor, p: &Pool2d) -> Result<Self::Tensor>;

    /// [n, h, w, c] -> [n, c], the mean over every pixel.
    fn global_avg_pool(&self, x: &Self::Tensor) -> Result<Self::Tensor>;

    /// The fused ramp + exit check on a stage output `x` viewed as [batch, positions, width]
    /// (token states: positions = sequence; NHWC images: positions = h * w), pooled over each
    /// input's first `lengths[b]` positions (`Mean`) or its first position (`Cls`), through the
    /// ramp head, softmax, and the exit test against `threshold` (a [1] tensor in device memory).
    fn ramp_exit(
        &self,
        x: &Self::Tensor,
        positions: usize,
        lengths: &[usize],
        pooling: Pooling,
        head: &RampWeights<'_, Self::Tensor>,
        threshold: &Self::Tensor,
    ) -> Result<Vec<RampDecision>>;

    /// [`Backend::ramp_exit`] without waiting: the decisions travel to the host while the
    /// backend goes on with later work; [`PendingDecisions::wait`] blocks until they are there
    /// (engine.md section 5: on a GPU, an async copy into pinned memory and an event; on a
    /// synchronous backend they are ready at once).
    #[allow(clippy::too_many_arguments)]
    fn ramp_exit_async(
        &self,
        x: &Self::Tensor,
        positions: usize,
        lengths: &[usize],
        pooling: Pooling,
        head: &RampWeights<'_, Self::Tensor>,
        threshold: &Self::Tensor,
    ) -> Result<Box<dyn PendingDecisions>> {
        let d = self.ramp_exit(x, positions, lengths, pooling, head, threshold)?;
        Ok(Box::new(ReadyDecisions(d)))
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

/// Checks a ramp call's shapes; returns (batch, width, classes).
pub(crate) fn check_ramp(
    x: &[usize],
    positions: usize,
    lengths: &[usize],
    dense: Option<(&[usize], &[usize])>,
    out: (&[usize], &[usize]),
    threshold: &[usize],
) -> std::result::Result<(usize, usize, usize), String> {
    let width = x.last().copied().unwrap_or(0);
    let rows = x.iter().product::<usize>() / width.max(1);
    let batch = lengths.len();
    if width == 0 || positions == 0 || rows != batch * positions {
        return Err(format!(
            "ramp: input {x:?} is not {batch} inputs x {positions} positions x width"
        ));
    }
    if let Some(&bad) = lengths.iter().find(|&&l| l == 0 || l > positions) {
        return Err(format!("ramp: length {bad} outside 1..={positions}"));
    }
    if let Some((w, b)) = dense
        && (w != [width, width] || b != [width])
    {
        return Err(format!(
            "ramp: dense layer {w:?} / {b:?}, expected [{width}, {width}] / [{width}]"
        ));
    }
    let classes = out.0.first().copied().unwrap_or(0);
    if classes == 0 || out.0 != [classes, width] || out.1 != [classes] {
        return Err(format!(
            "ramp: classifier {:?} / {:?} does not read width {width}",
            out.0, out.1
        ));
    }
    if threshold != [1] {
        return Err(format!("ramp: threshold shape {threshold:?}, expected [1]"));
    }
    Ok((batch, width, classes))
}

/// Checks a convolution's shapes (shared by every backend); returns (n, h, w, cin, cout, kh, kw,
/// oh, ow).
pub(crate) fn check_conv(
    x: &[usize],
    w: &[usize],
    b: Option<&[usize]>,
    p: &Conv2d,
    residual: Option<&[usize]>,
) -> std::result::Result<[usize; 9], String> {
    if x.len() != 4 || w.len() != 4 {
        return Err(format!(
            "conv2d: input {x:?} and weight {w:?} must be 4-D (NHWC, [cout, kh, kw, cin/groups])"
        ));
    }
    let (n, h, wd, cin) = (x[0], x[1], x[2], x[3]);
    let (cout, kh, kw, cg) = (w[0], w[1], w[2], w[3]);
    if p.groups == 0
        || !cin.is_multiple_of(p.groups)
        || !cout.is_multiple_of(p.groups)
        || cg * p.groups != cin
    {
        return Err(format!(
            "conv2d: {cin} input channels, weight {w:?} and {} groups do not agree",
            p.groups
        ));
    }
    if p.stride.contains(&0) || kh == 0 || kw == 0 {
        return Err(format!(
            "conv2d: zero stride {:?} or kernel {kh}x{kw}",
            p.stride
        ));
    }
    let (oh, ow) = p.output_size(h, wd, kh, kw).ok_or_else(|| {
        format!(
            "conv2d: a {kh}x{kw} kernel does not fit a {h}x{wd} input padded by {:?}",
            p.padding
        )
    })?;
    if let Some(b) = b
        && b != [cout]
    {
        return Err(format!("conv2d: bias shape {b:?}, expected [{cout}]"));
    }
    if let Some(r) = residual
        && r != [n, oh, ow, cout]
    {
        return Err(format!(
            "conv2d: residual shape {r:?}, expected {:?}",
            [n, oh, ow, cout]
        ));
    }
    Ok([n, h, wd, cin, cout, kh, kw, oh, ow])
}

/// Checks a pooling's shapes; returns (n, h, w, c, oh, ow).
pub(crate) fn check_pool(x: &[usize], p: &Pool2d) -> std::result::Result<[usize; 6], String> {
    if x.len() != 4 {
        return Err(format!("pool2d: input {x:?} must be 4-D (NHWC)"));
    }
    if p.stride.contains(&0)
        || p.kernel.contains(&0)
        || p.padding[0] * 2 > p.kernel[0]
        || p.padding[1] * 2 > p.kernel[1]
    {
        return Err(format!(
            "pool2d: kernel {:?}, stride {:?}, padding {:?} are not a valid window",
            p.kernel, p.stride, p.padding
        ));
    }
    let c = Conv2d {
        stride: p.stride,
        padding: p.padding,
        groups: 1,
        padding_extra: [0, 0],
    };
    let (oh, ow) = c
        .output_size(x[1], x[2], p.kernel[0], p.kernel[1])
        .ok_or_else(|| {
            format!(
                "pool2d: a {:?} window does not fit a {}x{} input",
                p.kernel, x[1], x[2]
            )
        })?;
    Ok([x[0], x[1], x[2], x[3], oh, ow])
}
