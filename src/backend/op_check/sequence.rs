//! Checks of the sequence ops: attention, embedding, token pooling and the fused ramp.

use super::calls::{
    AttentionCall, Checked, EmbedCall, EmbeddingTables, PoolCall, RampCall, RampInput,
};
use super::{fmt_shape, lengths_in, nonzero_width, rows_cols};
use crate::backend::{Backend, BatchShape, Pooling, RampWeights};
use crate::error::{Error, Result};

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
        _checked: Checked,
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
    super::epsilon(OP, eps)?;
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
        _checked: Checked,
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
        _checked: Checked,
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
        _checked: Checked,
    })
}
