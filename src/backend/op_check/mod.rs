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
pub(crate) use image::{conv2d, global_avg_pool, inverted_residual, pool2d};
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

/// Elements of `shape`; a shape whose count overflows is refused (a wrapped product could match
/// a small buffer).
fn elements(op: &'static str, shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| Error::shape(op, "element count", "at most usize::MAX", fmt_shape(shape)))
}

pub(crate) fn upload(values: usize, shape: &[usize]) -> Result<()> {
    let n = elements("upload", shape)?;
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
    let (n_from, n_to) = (elements("reshape", from)?, elements("reshape", to)?);
    if n_from != n_to {
        return Err(Error::shape(
            "reshape",
            format!("element count of {to:?}"),
            format!("{n_from} (as {from:?})"),
            n_to,
        ));
    }
    Ok(())
}

/// A LayerNorm epsilon: finite and not negative (NaN would make every output NaN).
pub(crate) fn epsilon(op: &'static str, eps: f32) -> Result<()> {
    if eps.is_finite() && eps >= 0.0 {
        Ok(())
    } else {
        Err(Error::shape(op, "epsilon", "finite, >= 0", eps))
    }
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
    epsilon(OP, eps)?;
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

#[cfg(test)]
mod tests {
    use crate::backend::{Backend, CpuBackend, CpuConfig};

    #[test]
    fn absurd_epsilons_and_overflowing_shapes_are_refused() {
        let be = CpuBackend::new(CpuConfig {
            threads: Some(1),
            ..Default::default()
        })
        .unwrap();
        let x = be.upload(&[1.0, 2.0], &[1, 2]).unwrap();
        let g = be.upload(&[1.0, 1.0], &[2]).unwrap();
        let b = be.upload(&[0.0, 0.0], &[2]).unwrap();
        be.add_layernorm(&x, &x, &g, &b, 1e-5).unwrap();
        for eps in [f32::NAN, -1.0, f32::INFINITY] {
            let e = be.add_layernorm(&x, &x, &g, &b, eps).unwrap_err();
            assert!(e.to_string().contains("epsilon"), "{eps}: {e}");
        }
        // 2^32 x 2^32 wraps to 0 in a plain product, which would match an empty buffer.
        let e = be.upload(&[], &[1 << 32, 1 << 32]).unwrap_err();
        assert!(e.to_string().contains("element count"), "{e}");
        let e = be.reshape(x, &[1 << 32, 1 << 32, 0, 2]).unwrap_err();
        assert!(e.to_string().contains("element count"), "{e}");
    }
}
