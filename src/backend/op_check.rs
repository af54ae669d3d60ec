//! The one place that checks an op's arguments before any backend runs it.
//!
//! Every public op of [`Backend`] is a provided method that calls a function here and hands the
//! result, a `*Call` value, to the backend's `run_*` method. A call carries the tensors and the
//! sizes derived from their shapes; it can only be made here (a private field), so a backend
//! never sees arguments that were not checked, and no backend (nor a wrapper such as `faulty`)
//! repeats a check. What stays in a backend is what only it knows: a GPU's 32-bit sizes, shared
//! memory and launch limits, a tensor of another storage dtype.

use super::{Activation, Backend, BatchShape, Conv2d, Pool2d, Pooling, RampWeights};
use crate::error::{Error, Result};

/// `act(x W^T + b)` with `x` [m, k] (leading dimensions flattened), `w` [n, k].
pub struct LinearCall<'a, T> {
    pub x: &'a T,
    pub w: &'a T,
    pub b: Option<&'a T>,
    pub act: Activation,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// The output's shape: `x`'s with the last dimension `n`.
    pub out_shape: Vec<usize>,
    _checked: (),
}

/// `LayerNorm(x + residual) * gamma + beta` over `rows` rows of `cols` (>= 1) values.
pub struct LayerNormCall<'a, T> {
    pub x: &'a T,
    pub residual: &'a T,
    pub gamma: &'a T,
    pub beta: &'a T,
    pub eps: f32,
    pub rows: usize,
    pub cols: usize,
    _checked: (),
}

/// A row-wise op (softmax, L2 normalisation) over `rows` rows of `cols` (>= 1) values.
pub struct RowsCall<'a, T> {
    pub x: &'a T,
    pub rows: usize,
    pub cols: usize,
    _checked: (),
}

/// Self-attention over fused `qkv` [rows, 3 * width], `heads` heads of `width / heads`.
pub struct AttentionCall<'a, T> {
    pub qkv: &'a T,
    pub shape: &'a BatchShape,
    pub heads: usize,
    pub rows: usize,
    pub width: usize,
    _checked: (),
}

/// The embedding tables of a BERT encoder on a backend.
pub struct EmbeddingTables<'a, T> {
    pub word: &'a T,
    pub position: &'a T,
    pub token_type: &'a T,
    pub gamma: &'a T,
    pub beta: &'a T,
}

/// Embedding lookup + LayerNorm of every row of a batch; ids are inside the tables.
pub struct EmbedCall<'a, T> {
    pub ids: &'a [u32],
    pub type_ids: &'a [u32],
    pub shape: &'a BatchShape,
    pub tables: EmbeddingTables<'a, T>,
    pub eps: f32,
    pub width: usize,
    _checked: (),
}

/// Token states [batch * seq, cols] pooled to [batch, cols].
pub struct PoolCall<'a, T> {
    pub x: &'a T,
    pub shape: &'a BatchShape,
    pub kind: Pooling,
    pub cols: usize,
    _checked: (),
}

/// Sizes of a convolution over NHWC.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ConvDims {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub cin: usize,
    pub cout: usize,
    pub kh: usize,
    pub kw: usize,
    pub oh: usize,
    pub ow: usize,
}

impl ConvDims {
    /// (n, h, w, cin, cout, kh, kw, oh, ow), the order the CPU loops take them in.
    pub(crate) fn to_array(self) -> [usize; 9] {
        [
            self.n, self.h, self.w, self.cin, self.cout, self.kh, self.kw, self.oh, self.ow,
        ]
    }
}

pub struct ConvCall<'a, T> {
    pub x: &'a T,
    pub w: &'a T,
    pub b: Option<&'a T>,
    pub p: Conv2d,
    pub residual: Option<&'a T>,
    pub act: Activation,
    pub dims: ConvDims,
    _checked: (),
}

/// Sizes of a pooling window over NHWC.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Pool2dDims {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub oh: usize,
    pub ow: usize,
}

impl Pool2dDims {
    /// (n, h, w, c, oh, ow), the order the CPU loops take them in.
    pub(crate) fn to_array(self) -> [usize; 6] {
        [self.n, self.h, self.w, self.c, self.oh, self.ow]
    }
}

pub struct Pool2dCall<'a, T> {
    pub x: &'a T,
    pub p: Pool2d,
    pub dims: Pool2dDims,
    _checked: (),
}

/// [n, h, w, c] -> [n, c].
pub struct GlobalPoolCall<'a, T> {
    pub x: &'a T,
    pub n: usize,
    pub hw: usize,
    pub c: usize,
    _checked: (),
}

/// A stage output a ramp reads: `x` viewed as [lengths.len(), positions, width], pooled over
/// each input's first `lengths[b]` positions (`Mean`) or its first one (`Cls`).
pub struct RampInput<'a, T> {
    pub x: &'a T,
    pub positions: usize,
    pub lengths: &'a [usize],
    pub pooling: Pooling,
}

/// The fused ramp + exit check on `batch` inputs of `width` values, `classes` classes.
pub struct RampCall<'a, T> {
    pub input: &'a RampInput<'a, T>,
    pub head: &'a RampWeights<'a, T>,
    pub threshold: &'a T,
    pub batch: usize,
    pub width: usize,
    pub classes: usize,
    _checked: (),
}

fn fmt_shape(s: &[usize]) -> String {
    format!("{s:?}")
}

/// (rows, last dimension) of a shape; a 0-D shape is one value.
pub(crate) fn rows_cols(shape: &[usize]) -> (usize, usize) {
    let cols = shape.last().copied().unwrap_or(1);
    (shape.iter().product::<usize>() / cols.max(1), cols)
}

fn last_dim(op: &'static str, what: &str, shape: &[usize], cols: usize) -> Result<()> {
    if shape.last() != Some(&cols) {
        return Err(Error::shape(
            op,
            format!("{what} shape"),
            format!("last dimension {cols}"),
            fmt_shape(shape),
        ));
    }
    Ok(())
}

/// Rows of width 0 have no mean, no maximum and no norm: every backend refuses them alike.
fn nonzero_width(op: &'static str, shape: &[usize]) -> Result<(usize, usize)> {
    let (rows, cols) = rows_cols(shape);
    if cols == 0 {
        return Err(Error::shape(
            op,
            format!("row width of input {shape:?}"),
            "at least 1",
            0,
        ));
    }
    Ok((rows, cols))
}

fn lengths_in(op: &'static str, lengths: &[usize], seq: usize) -> Result<()> {
    if let Some(&bad) = lengths.iter().find(|&&l| l == 0 || l > seq) {
        return Err(Error::shape(op, "input length", format!("1..={seq}"), bad));
    }
    Ok(())
}

pub(crate) fn upload(values: usize, shape: &[usize]) -> Result<()> {
    let n: usize = shape.iter().product();
    if values != n {
        return Err(Error::shape(
            "upload",
            format!("values for shape {shape:?}"),
            n,
            values,
        ));
    }
    Ok(())
}

pub(crate) fn reshape(from: &[usize], to: &[usize]) -> Result<()> {
    if from.iter().product::<usize>() != to.iter().product::<usize>() {
        return Err(Error::shape(
            "reshape",
            format!("element count of {to:?}"),
            format!("{} (as {from:?})", from.iter().product::<usize>()),
            to.iter().product::<usize>(),
        ));
    }
    Ok(())
}

pub(crate) fn linear<'a, B: Backend + ?Sized>(
    be: &B,
    x: &'a B::Tensor,
    w: &'a B::Tensor,
    b: Option<&'a B::Tensor>,
    act: Activation,
) -> Result<LinearCall<'a, B::Tensor>> {
    let ws = be.shape(w);
    if ws.len() != 2 {
        return Err(Error::shape(
            "linear",
            "weight shape",
            "[n, k] (2-D)",
            fmt_shape(ws),
        ));
    }
    let (n, k) = (ws[0], ws[1]);
    let xs = be.shape(x);
    last_dim("linear", "input", xs, k)?;
    if let Some(b) = b
        && be.shape(b) != [n]
    {
        return Err(Error::shape(
            "linear",
            "bias shape",
            format!("[{n}]"),
            fmt_shape(be.shape(b)),
        ));
    }
    let (m, _) = rows_cols(xs);
    let mut out_shape = xs.to_vec();
    *out_shape.last_mut().expect("last_dim checked it") = n;
    Ok(LinearCall {
        x,
        w,
        b,
        act,
        m,
        n,
        k,
        out_shape,
        _checked: (),
    })
}

pub(crate) fn add_layernorm<'a, B: Backend + ?Sized>(
    be: &B,
    x: &'a B::Tensor,
    residual: &'a B::Tensor,
    gamma: &'a B::Tensor,
    beta: &'a B::Tensor,
    eps: f32,
) -> Result<LayerNormCall<'a, B::Tensor>> {
    const OP: &str = "add_layernorm";
    let xs = be.shape(x);
    if xs != be.shape(residual) {
        return Err(Error::shape(
            OP,
            "residual shape",
            fmt_shape(xs),
            fmt_shape(be.shape(residual)),
        ));
    }
    let (rows, cols) = nonzero_width(OP, xs)?;
    last_dim(OP, "gamma", be.shape(gamma), cols)?;
    last_dim(OP, "beta", be.shape(beta), cols)?;
    Ok(LayerNormCall {
        x,
        residual,
        gamma,
        beta,
        eps,
        rows,
        cols,
        _checked: (),
    })
}

pub(crate) fn rows<'a, B: Backend + ?Sized>(
    be: &B,
    op: &'static str,
    x: &'a B::Tensor,
) -> Result<RowsCall<'a, B::Tensor>> {
    let (rows, cols) = nonzero_width(op, be.shape(x))?;
    Ok(RowsCall {
        x,
        rows,
        cols,
        _checked: (),
    })
}

pub(crate) fn attention<'a, B: Backend + ?Sized>(
    be: &B,
    qkv: &'a B::Tensor,
    shape: &'a BatchShape,
    heads: usize,
) -> Result<AttentionCall<'a, B::Tensor>> {
    let qs = be.shape(qkv);
    let (rows, cols3) = rows_cols(qs);
    if rows != shape.rows()
        || !cols3.is_multiple_of(3)
        || heads == 0
        || !(cols3 / 3).is_multiple_of(heads)
    {
        return Err(Error::shape(
            "attention",
            "qkv shape",
            format!(
                "[{} inputs x {} positions, 3 x a multiple of {heads} heads]",
                shape.batch(),
                shape.seq
            ),
            fmt_shape(qs),
        ));
    }
    lengths_in("attention", &shape.lengths, shape.seq)?;
    Ok(AttentionCall {
        qkv,
        shape,
        heads,
        rows,
        width: cols3 / 3,
        _checked: (),
    })
}

/// Checks an embedding call before any table is indexed: the tables' shapes agree, and the token
/// ids (user input) are inside them.
pub(crate) fn embed<'a, B: Backend + ?Sized>(
    be: &B,
    ids: &'a [u32],
    type_ids: &'a [u32],
    shape: &'a BatchShape,
    tables: EmbeddingTables<'a, B::Tensor>,
    eps: f32,
) -> Result<EmbedCall<'a, B::Tensor>> {
    const OP: &str = "embed";
    let word = be.shape(tables.word);
    let width = word.last().copied().unwrap_or(0);
    for (what, t) in [
        ("word table", word),
        ("position table", be.shape(tables.position)),
        ("token type table", be.shape(tables.token_type)),
    ] {
        if t.len() != 2 || t[0] == 0 || t[1] != width || width == 0 {
            return Err(Error::shape(
                OP,
                format!("{what} shape"),
                format!("[rows >= 1, {width}] with width >= 1"),
                fmt_shape(t),
            ));
        }
    }
    for (what, t) in [
        ("gamma", be.shape(tables.gamma)),
        ("beta", be.shape(tables.beta)),
    ] {
        if t != [width] {
            return Err(Error::shape(
                OP,
                format!("{what} shape"),
                format!("[{width}]"),
                fmt_shape(t),
            ));
        }
    }
    let vocab = word[0];
    let types = be.shape(tables.token_type)[0];
    let positions = be.shape(tables.position)[0];
    let rows = shape.rows();
    if ids.len() != rows || type_ids.len() != rows {
        return Err(Error::shape(
            OP,
            "token ids and type ids",
            format!("{rows} each (one per position)"),
            format!("{} and {}", ids.len(), type_ids.len()),
        ));
    }
    if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
        return Err(Error::shape(
            OP,
            format!("token id {bad}"),
            format!("an id below {vocab}"),
            format!("one outside the vocabulary of {vocab}"),
        ));
    }
    if let Some(bad) = type_ids.iter().find(|&&i| i as usize >= types) {
        return Err(Error::shape(
            OP,
            "token type id",
            format!("0..{types}"),
            bad,
        ));
    }
    if shape.seq > positions {
        return Err(Error::shape(
            OP,
            "sequence length",
            format!("at most the model's {positions} positions"),
            shape.seq,
        ));
    }
    lengths_in(OP, &shape.lengths, shape.seq)?;
    Ok(EmbedCall {
        ids,
        type_ids,
        shape,
        tables,
        eps,
        width,
        _checked: (),
    })
}

pub(crate) fn pool<'a, B: Backend + ?Sized>(
    be: &B,
    x: &'a B::Tensor,
    shape: &'a BatchShape,
    kind: Pooling,
) -> Result<PoolCall<'a, B::Tensor>> {
    let (rows, cols) = nonzero_width("pool", be.shape(x))?;
    if rows != shape.rows() {
        return Err(Error::shape(
            "pool",
            "rows",
            format!("{} inputs x {} positions", shape.batch(), shape.seq),
            rows,
        ));
    }
    lengths_in("pool", &shape.lengths, shape.seq)?;
    Ok(PoolCall {
        x,
        shape,
        kind,
        cols,
        _checked: (),
    })
}

/// A convolution's geometry against its input and weight shapes. Stride, kernel and group
/// count are checked before the channels, so a zero among them is named as such rather than
/// reported as channels that do not agree.
pub fn conv_dims(
    x: &[usize],
    w: &[usize],
    b: Option<&[usize]>,
    p: &Conv2d,
    residual: Option<&[usize]>,
) -> Result<ConvDims> {
    const OP: &str = "conv2d";
    if x.len() != 4 || w.len() != 4 {
        return Err(Error::shape(
            OP,
            "input and weight shapes",
            "4-D: NHWC input, [cout, kh, kw, cin / groups] weight",
            format!("{x:?} and {w:?}"),
        ));
    }
    let (n, h, wd, cin) = (x[0], x[1], x[2], x[3]);
    let (cout, kh, kw, cg) = (w[0], w[1], w[2], w[3]);
    if p.stride.contains(&0) {
        return Err(Error::shape(
            OP,
            "stride",
            "at least 1",
            fmt_shape(&p.stride),
        ));
    }
    if kh == 0 || kw == 0 {
        return Err(Error::shape(
            OP,
            "kernel size (weight dimensions 1 and 2)",
            "at least 1x1",
            format!("{kh}x{kw}"),
        ));
    }
    if p.groups == 0 {
        return Err(Error::shape(OP, "groups", "at least 1", 0));
    }
    if cin == 0 || cout == 0 {
        return Err(Error::shape(
            OP,
            "input and output channels",
            "at least 1 each",
            format!("{cin} and {cout}"),
        ));
    }
    if !cin.is_multiple_of(p.groups) || !cout.is_multiple_of(p.groups) || cg * p.groups != cin {
        return Err(Error::shape(
            OP,
            format!("channels with {} groups", p.groups),
            format!(
                "input channels = weight's last dimension x groups, both channel counts multiples of {}",
                p.groups
            ),
            format!("{cin} input channels, weight {w:?}"),
        ));
    }
    let (oh, ow) = p.output_size(h, wd, kh, kw).ok_or_else(|| {
        Error::shape(
            OP,
            "kernel size",
            format!(
                "at most the {h}x{wd} input padded by {:?} (+{:?})",
                p.padding, p.padding_extra
            ),
            format!("{kh}x{kw}"),
        )
    })?;
    if let Some(b) = b
        && b != [cout]
    {
        return Err(Error::shape(
            OP,
            "bias shape",
            format!("[{cout}]"),
            fmt_shape(b),
        ));
    }
    let out = [n, oh, ow, cout];
    if let Some(r) = residual
        && r != out
    {
        return Err(Error::shape(
            OP,
            "residual shape",
            fmt_shape(&out),
            fmt_shape(r),
        ));
    }
    Ok(ConvDims {
        n,
        h,
        w: wd,
        cin,
        cout,
        kh,
        kw,
        oh,
        ow,
    })
}

pub(crate) fn conv2d<'a, B: Backend + ?Sized>(
    be: &B,
    x: &'a B::Tensor,
    w: &'a B::Tensor,
    b: Option<&'a B::Tensor>,
    p: &Conv2d,
    residual: Option<&'a B::Tensor>,
    act: Activation,
) -> Result<ConvCall<'a, B::Tensor>> {
    let dims = conv_dims(
        be.shape(x),
        be.shape(w),
        b.map(|b| be.shape(b)),
        p,
        residual.map(|r| be.shape(r)),
    )?;
    Ok(ConvCall {
        x,
        w,
        b,
        p: *p,
        residual,
        act,
        dims,
        _checked: (),
    })
}

/// A pooling window against an NHWC input shape.
pub fn pool2d_dims(x: &[usize], p: &Pool2d) -> Result<Pool2dDims> {
    const OP: &str = "pool2d";
    if x.len() != 4 || x[3] == 0 {
        return Err(Error::shape(
            OP,
            "input shape",
            "4-D (NHWC), at least 1 channel",
            fmt_shape(x),
        ));
    }
    if p.stride.contains(&0)
        || p.kernel.contains(&0)
        || p.padding[0] * 2 > p.kernel[0]
        || p.padding[1] * 2 > p.kernel[1]
    {
        return Err(Error::shape(
            OP,
            "window",
            "kernel and stride at least 1, padding at most half the kernel",
            format!(
                "kernel {:?}, stride {:?}, padding {:?}",
                p.kernel, p.stride, p.padding
            ),
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
            Error::shape(
                OP,
                "window",
                format!(
                    "at most the {}x{} input padded by {:?}",
                    x[1], x[2], p.padding
                ),
                fmt_shape(&p.kernel),
            )
        })?;
    Ok(Pool2dDims {
        n: x[0],
        h: x[1],
        w: x[2],
        c: x[3],
        oh,
        ow,
    })
}

pub(crate) fn pool2d<'a, B: Backend + ?Sized>(
    be: &B,
    x: &'a B::Tensor,
    p: &Pool2d,
) -> Result<Pool2dCall<'a, B::Tensor>> {
    Ok(Pool2dCall {
        x,
        p: *p,
        dims: pool2d_dims(be.shape(x), p)?,
        _checked: (),
    })
}

pub(crate) fn global_avg_pool<'a, B: Backend + ?Sized>(
    be: &B,
    x: &'a B::Tensor,
) -> Result<GlobalPoolCall<'a, B::Tensor>> {
    let s = be.shape(x);
    // No pixels have no mean (a GPU would leave the output unwritten).
    if s.len() != 4 || s[1] == 0 || s[2] == 0 {
        return Err(Error::shape(
            "global_avg_pool",
            "input shape",
            "4-D (NHWC) with at least one pixel",
            fmt_shape(s),
        ));
    }
    Ok(GlobalPoolCall {
        x,
        n: s[0],
        hw: s[1] * s[2],
        c: s[3],
        _checked: (),
    })
}

pub(crate) fn ramp<'a, B: Backend + ?Sized>(
    be: &B,
    input: &'a RampInput<'a, B::Tensor>,
    head: &'a RampWeights<'a, B::Tensor>,
    threshold: &'a B::Tensor,
) -> Result<RampCall<'a, B::Tensor>> {
    const OP: &str = "ramp_exit";
    let x = be.shape(input.x);
    let positions = input.positions;
    let width = x.last().copied().unwrap_or(0);
    let rows = x.iter().product::<usize>() / width.max(1);
    let batch = input.lengths.len();
    if width == 0 || positions == 0 || rows != batch * positions {
        return Err(Error::shape(
            OP,
            "input shape",
            format!("{batch} inputs x {positions} positions x width >= 1"),
            fmt_shape(x),
        ));
    }
    lengths_in(OP, input.lengths, positions)?;
    if let Some((w, b)) = head.dense {
        let (w, b) = (be.shape(w), be.shape(b));
        if w != [width, width] || b != [width] {
            return Err(Error::shape(
                OP,
                "dense layer",
                format!("[{width}, {width}] / [{width}]"),
                format!("{w:?} / {b:?}"),
            ));
        }
    }
    let (ow, ob) = (be.shape(head.out.0), be.shape(head.out.1));
    let classes = ow.first().copied().unwrap_or(0);
    if classes == 0 || ow != [classes, width] || ob != [classes] {
        return Err(Error::shape(
            OP,
            "classifier",
            format!("[classes >= 1, {width}] / [classes]"),
            format!("{ow:?} / {ob:?}"),
        ));
    }
    if be.shape(threshold) != [1] {
        return Err(Error::shape(
            OP,
            "threshold shape",
            "[1]",
            fmt_shape(be.shape(threshold)),
        ));
    }
    Ok(RampCall {
        input,
        head,
        threshold,
        batch,
        width,
        classes,
        _checked: (),
    })
}
