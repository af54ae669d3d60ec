//! The checked calls: what `op_check` hands a backend. Each holds the op's arguments and the
//! sizes derived from their shapes, and a private field, so only `op_check` can make one.

use crate::backend::{Activation, BatchShape, Conv2d, Pool2d, Pooling, RampWeights};

/// The mark of a call that `op_check` made: nothing outside it can name this type's value.
pub(super) struct Checked;

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
    pub(super) _checked: Checked,
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
    pub(super) _checked: Checked,
}

/// A row-wise op (softmax, L2 normalisation) over `rows` rows of `cols` (>= 1) values.
pub struct RowsCall<'a, T> {
    pub x: &'a T,
    pub rows: usize,
    pub cols: usize,
    pub(super) _checked: Checked,
}

/// Self-attention over fused `qkv` [rows, 3 * width], `heads` heads of `width / heads`.
pub struct AttentionCall<'a, T> {
    pub qkv: &'a T,
    pub shape: &'a BatchShape,
    pub heads: usize,
    pub rows: usize,
    pub width: usize,
    pub(super) _checked: Checked,
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
    pub(super) _checked: Checked,
}

/// Token states [batch * seq, cols] pooled to [batch, cols].
pub struct PoolCall<'a, T> {
    pub x: &'a T,
    pub shape: &'a BatchShape,
    pub kind: Pooling,
    pub cols: usize,
    pub(super) _checked: Checked,
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
    /// Whether a convolution with these sizes and `p` is a plain GEMM over the input's pixels:
    /// a dense 1x1 kernel at stride 1 whose output has exactly the input's pixels. Padding of any
    /// kind (including the odd pixel of SAME padding) adds output pixels with no input row, so
    /// the input cannot be read as the GEMM's `[m, cin]` operand. Decided here, for every backend.
    pub fn is_pointwise(&self, p: &Conv2d) -> bool {
        p.groups == 1
            && self.kh == 1
            && self.kw == 1
            && p.stride == [1, 1]
            && self.oh == self.h
            && self.ow == self.w
    }

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
    pub(super) _checked: Checked,
}

/// One convolution of an inverted residual block, as the caller gives it: weight, bias,
/// geometry and activation (see [`crate::backend::Backend::inverted_residual`]).
pub struct ConvStep<'a, T> {
    pub w: &'a T,
    pub b: Option<&'a T>,
    pub p: Conv2d,
    pub act: Activation,
}

impl<T> Clone for ConvStep<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for ConvStep<'_, T> {}

/// An inverted residual block: an optional 1x1 expansion, a depthwise convolution and a 1x1
/// projection (with the residual added), each step's sizes checked against the output of the
/// step before it.
pub struct InvertedResidualCall<'a, T> {
    pub x: &'a T,
    pub expand: Option<(ConvStep<'a, T>, ConvDims)>,
    pub depthwise: (ConvStep<'a, T>, ConvDims),
    pub project: (ConvStep<'a, T>, ConvDims),
    pub residual: Option<&'a T>,
    pub(super) _checked: Checked,
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
    pub(super) _checked: Checked,
}

/// [n, h, w, c] -> [n, c].
pub struct GlobalPoolCall<'a, T> {
    pub x: &'a T,
    pub n: usize,
    pub hw: usize,
    pub c: usize,
    pub(super) _checked: Checked,
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
    pub(super) _checked: Checked,
}
