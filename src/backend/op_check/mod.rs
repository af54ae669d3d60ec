//! The one place that checks an op's arguments before any backend runs it.
//!
//! Every public op of [`Backend`] is a provided method that calls a function here and hands the
//! result, a `*Call` value, to the backend's `run_*` method. A call carries the tensors and the
//! sizes derived from their shapes; it can only be made here (a private field), so a backend
//! never sees arguments that were not checked, and no backend (nor a wrapper such as `faulty`)
//! repeats a check. What stays in a backend is what only it knows: a GPU's 32-bit sizes, shared
//! memory and launch limits, a tensor of another storage dtype.

mod calls;
mod image;
mod sequence;

pub use calls::*;
pub use image::{conv_dims, pool2d_dims};
pub(crate) use image::{conv2d, global_avg_pool, pool2d};
pub(crate) use sequence::{attention, embed, pool, ramp};

use crate::backend::{Activation, Backend};
use crate::error::{Error, Result};

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
        _checked: Checked,
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
        _checked: Checked,
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
        _checked: Checked,
    })
}
