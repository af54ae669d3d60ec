//! The op table: every backend op case as data (op, shapes, dtype, tolerance, name), in the way
//! of llama.cpp's `test-backend-ops`. `tests/op_parity.rs` runs each case on every device and
//! compares it with the `cpu` backend; `benches/kernels.rs --table` times each case per backend.
//! A case either computes (and is compared within its tolerance) or must be refused with an
//! error that names what is wrong.

#![allow(dead_code)] // each includer uses part of it

mod run;

pub use run::*;

use apparate::backend::{Activation, Conv2d, Pool2d, Pooling};
use apparate::tensor::DType;

/// One op with its shapes and settings.
#[derive(Clone, Debug)]
pub enum Op {
    Linear {
        m: usize,
        n: usize,
        k: usize,
        act: Activation,
        bias: bool,
    },
    AddLayerNorm {
        rows: usize,
        cols: usize,
    },
    Attention {
        seq: usize,
        heads: usize,
        head_dim: usize,
        lengths: Vec<usize>,
    },
    /// `bad_id`: the first token id is one past the vocabulary (must be refused).
    Embed {
        batch: usize,
        seq: usize,
        width: usize,
        bad_id: bool,
    },
    Pool {
        seq: usize,
        width: usize,
        lengths: Vec<usize>,
        kind: Pooling,
    },
    L2Normalize {
        rows: usize,
        cols: usize,
    },
    Softmax {
        rows: usize,
        cols: usize,
    },
    /// Square kernel `k`; the weight is `[cout, k, k, cin / groups]`.
    Conv2d {
        x: [usize; 4],
        cout: usize,
        k: usize,
        geo: Conv2d,
        bias: bool,
        residual: bool,
        act: Activation,
    },
    Pool2d {
        x: [usize; 4],
        p: Pool2d,
    },
    GlobalAvgPool {
        x: [usize; 4],
    },
    RampExit {
        positions: usize,
        width: usize,
        classes: usize,
        lengths: Vec<usize>,
        pooling: Pooling,
        dense: bool,
    },
}

/// What a case must do.
#[derive(Clone, Debug, PartialEq)]
pub enum Expect {
    /// Compute, within the case's tolerance of the reference.
    Values,
    /// Be refused before any launch, with an error that contains this text.
    Error(&'static str),
}

#[derive(Clone, Debug)]
pub struct OpCase {
    pub name: String,
    pub op: Op,
    pub dtype: DType,
    /// Largest relative L2 error against the reference (for ramps: of the uncertainties,
    /// absolute; classes and exit flags must match exactly).
    pub tolerance: f64,
    pub expect: Expect,
    /// Seeds the case's random inputs, so a case is the same wherever it runs.
    pub seed: u64,
}

/// f32 against an f32 reference: rounding order only. f16/bf16: the storage rounding of every
/// intermediate tensor.
pub fn tolerance(dt: DType) -> f64 {
    match dt {
        DType::F32 => 1e-5,
        _ => 1e-2,
    }
}

pub const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

fn geo(stride: usize, pad: usize, groups: usize, extra: usize) -> Conv2d {
    Conv2d {
        stride: [stride, stride],
        padding: [pad, pad],
        groups,
        padding_extra: [extra, extra],
    }
}

fn window(max: bool, k: usize, s: usize, p: usize) -> Pool2d {
    Pool2d {
        max,
        kernel: [k, k],
        stride: [s, s],
        padding: [p, p],
    }
}

/// The ops of the table, dtype-free.
pub fn ops() -> Vec<(Op, Expect)> {
    use Activation::{GeluErf, None as Plain, Relu, Relu6, Tanh};
    let mut v = Vec::new();
    let ok = Expect::Values;
    for (m, n, k) in [
        (1, 1, 1),
        (3, 5, 7),
        (17, 33, 65),
        (64, 64, 64),
        (130, 96, 200),
        (200, 384, 384),
    ] {
        for (act, bias) in [(Plain, false), (GeluErf, true), (Tanh, true)] {
            v.push((Op::Linear { m, n, k, act, bias }, ok.clone()));
        }
    }
    // Split-K (GemmKernel::PipelinedSplitK): 4 small tiles, 32 k-steps with a ragged last one:
    // 8 splits of 4.
    v.push((
        Op::Linear {
            m: 70,
            n: 72,
            k: 1000,
            act: Tanh,
            bias: true,
        },
        ok.clone(),
    ));
    // The Hopper GEMM (GemmKernel::Wgmma) unsplit over more k-steps of 64 than its 5 stages
    // (the ring wraps), ragged on every side.
    v.push((
        Op::Linear {
            m: 150,
            n: 200,
            k: 456,
            act: GeluErf,
            bias: true,
        },
        ok.clone(),
    ));
    // Enough 128 x 128 tiles (11 x 12 >= GEMM_PIPE_BIG_MIN_TILES) for the pipelined GEMM's big
    // shape, ragged on both sides, K under one k-step.
    v.push((
        Op::Linear {
            m: 1290,
            n: 1480,
            k: 24,
            act: GeluErf,
            bias: true,
        },
        ok.clone(),
    ));
    // A 1-wide row normalises to exactly beta on both sides.
    // (9, 2048): the widest row of the warp-per-row kernel; (2, 2056): one past it.
    for (rows, cols) in [(1, 1), (3, 7), (5, 384), (64, 1000), (9, 2048), (2, 2056)] {
        v.push((Op::AddLayerNorm { rows, cols }, ok.clone()));
    }
    for (seq, heads, head_dim, lengths) in [
        (1, 1, 1, vec![1]),
        (7, 3, 4, vec![7, 3]),
        (33, 2, 32, vec![33, 1, 17]),
        (128, 12, 32, vec![128, 77]),
        // The flash kernel's head sizes: three key tiles with a ragged last one, a query block
        // of padding only, and one key in all.
        (130, 2, 64, vec![130, 65, 1]),
        (70, 1, 128, vec![70, 64]),
        // The wide block (128 query rows, two 16-row blocks per warp): one whose later warps
        // hold only padding rows, and a second block past one input's length.
        (200, 2, 32, vec![200, 100, 129]),
        // BERT-base's longest input (512 tokens, head size 64: eight key tiles; four wide
        // blocks of queries where the wide block is forced), beside a shorter one.
        (512, 1, 64, vec![512, 300]),
    ] {
        v.push((
            Op::Attention {
                seq,
                heads,
                head_dim,
                lengths,
            },
            ok.clone(),
        ));
    }
    // (1, 3, 2048): the widest row of the warp-per-token kernel; 16 and 384 fit it too.
    for (batch, seq, width) in [(1, 1, 1), (2, 5, 16), (3, 33, 384), (1, 3, 2048)] {
        for bad_id in [false, true] {
            let expect = if bad_id {
                Expect::Error("outside the vocabulary")
            } else {
                ok.clone()
            };
            v.push((
                Op::Embed {
                    batch,
                    seq,
                    width,
                    bad_id,
                },
                expect,
            ));
        }
    }
    for (seq, width, lengths) in [
        (1, 1, vec![1]),
        (9, 17, vec![9, 2, 5]),
        (128, 384, vec![128, 3]),
        // The vectorised pooling's column chunks: 257 (f16) or 514 (f32) vectors, a ragged
        // last chunk; fewer rows than its warps.
        (5, 2056, vec![5, 1]),
    ] {
        for kind in [Pooling::Mean, Pooling::Cls] {
            let lengths = lengths.clone();
            v.push((
                Op::Pool {
                    seq,
                    width,
                    lengths,
                    kind,
                },
                ok.clone(),
            ));
        }
    }
    // (7, 1000), (4, 8) and (5, 2048) fit the warp-per-row kernels; (2, 2056) is one vector
    // past them.
    for (rows, cols) in [(1, 1), (3, 157), (7, 1000), (4, 8), (5, 2048), (2, 2056)] {
        v.push((Op::L2Normalize { rows, cols }, ok.clone()));
        v.push((Op::Softmax { rows, cols }, ok.clone()));
    }
    // Rows of width 0 are refused alike by every backend (the GPU used to accept them).
    v.push((
        Op::AddLayerNorm { rows: 3, cols: 0 },
        Expect::Error("row width"),
    ));
    v.push((Op::Softmax { rows: 2, cols: 0 }, Expect::Error("row width")));
    // (x, cout, k, geometry, residual, act); every dense case has a bias.
    let convs = [
        ([1, 1, 1, 1], 1, 1, geo(1, 0, 1, 0), false, Plain),
        ([2, 7, 5, 3], 8, 3, geo(1, 1, 1, 0), true, Relu),
        ([1, 9, 9, 16], 16, 3, geo(2, 1, 16, 0), false, Relu6),
        ([2, 8, 8, 8], 12, 3, geo(1, 1, 4, 0), true, Plain),
        ([1, 6, 6, 16], 24, 1, geo(1, 0, 1, 0), true, Relu),
        ([1, 28, 28, 3], 16, 7, geo(2, 3, 1, 0), false, Relu),
        ([1, 14, 14, 32], 65, 3, geo(1, 1, 1, 0), false, Plain),
        // A 1x1 kernel with an extra padding pixel: more output pixels than input ones, so not a
        // plain GEMM over the input (the fast path read past the input when it looked at the
        // kernel and padding only).
        ([1, 10, 10, 4], 8, 1, geo(1, 0, 1, 1), false, Relu6),
        // Channels in multiples of 8 (the implicit GEMM's gather, conv_pipe): one chunk per
        // pixel at stride 2 with a residual; a 5x5 window whose K = 600 ends inside a k-step
        // and splits; enough rows for the big tile at a low fill; odd sizes throughout.
        ([2, 9, 7, 8], 16, 3, geo(2, 1, 1, 0), true, Relu),
        ([1, 6, 5, 24], 40, 5, geo(1, 2, 1, 0), false, Plain),
        ([3, 11, 12, 16], 72, 3, geo(1, 1, 1, 0), true, Relu6),
        // A ResNet stage's entry at batch 2 (28 x 28 x 64 -> 14 x 14 x 128, stride 2): 392
        // rows, N = 128, K = 576 in 18 k-steps.
        ([2, 28, 28, 64], 128, 3, geo(2, 1, 1, 0), true, Relu),
    ];
    for (x, cout, k, geo, residual, act) in convs {
        v.push((
            Op::Conv2d {
                x,
                cout,
                k,
                geo,
                bias: true,
                residual,
                act,
            },
            ok.clone(),
        ));
    }
    // TensorFlow "SAME" padding: the odd pixel after the last row and column.
    for (groups, cin) in [(1, 3), (8, 8), (1, 8)] {
        v.push((
            Op::Conv2d {
                x: [1, 10, 10, cin],
                cout: 8,
                k: 3,
                geo: geo(2, 0, groups, 1),
                bias: false,
                residual: false,
                act: Relu6,
            },
            ok.clone(),
        ));
    }
    // Bad geometry is an error, not a launch; a zero stride or kernel is named as such.
    let bad_conv = |g: Conv2d, k: usize, expect: &'static str| {
        (
            Op::Conv2d {
                x: [2, 7, 7, 16],
                cout: 8,
                k,
                geo: g,
                bias: false,
                residual: false,
                act: Plain,
            },
            Expect::Error(expect),
        )
    };
    v.push(bad_conv(geo(1, 0, 3, 0), 3, "groups"));
    v.push(bad_conv(geo(0, 0, 1, 0), 3, "stride"));
    v.push(bad_conv(geo(1, 0, 1, 0), 0, "kernel size"));
    v.push((
        Op::Pool2d {
            x: [2, 9, 9, 5],
            p: window(true, 3, 2, 1),
        },
        ok.clone(),
    ));
    v.push((
        Op::Pool2d {
            x: [1, 8, 8, 3],
            p: window(false, 2, 2, 0),
        },
        ok.clone(),
    ));
    v.push((
        Op::Pool2d {
            x: [1, 7, 7, 4],
            p: window(false, 3, 1, 1),
        },
        ok.clone(),
    ));
    v.push((Op::GlobalAvgPool { x: [2, 7, 7, 16] }, ok.clone()));
    v.push((
        Op::GlobalAvgPool { x: [2, 0, 7, 16] },
        Expect::Error("at least one pixel"),
    ));
    for (positions, width, classes, lengths, pooling, dense) in [
        (7, 16, 5, vec![7, 1, 4], Pooling::Mean, false),
        (49, 64, 10, vec![49, 49], Pooling::Mean, true),
        (33, 384, 157, vec![33, 2, 17, 9], Pooling::Cls, true),
        // A ramp at BERT-base's width: a 768 x 768 dense layer before a 10-class head.
        (65, 768, 10, vec![65, 40, 7], Pooling::Mean, true),
        (1, 1, 1, vec![1], Pooling::Mean, false),
    ] {
        v.push((
            Op::RampExit {
                positions,
                width,
                classes,
                lengths,
                pooling,
                dense,
            },
            ok.clone(),
        ));
    }
    v
}

/// A short, unique-enough name for reports: `linear 17x33x65 GeluErf bias`.
pub fn op_name(op: &Op) -> String {
    match op {
        Op::Linear { m, n, k, act, bias } => format!("linear {m}x{n}x{k} {act:?} bias={bias}"),
        Op::AddLayerNorm { rows, cols } => format!("add_layernorm {rows}x{cols}"),
        Op::Attention {
            seq,
            heads,
            head_dim,
            lengths,
        } => format!("attention seq {seq} heads {heads} d {head_dim} lengths {lengths:?}"),
        Op::Embed {
            batch,
            seq,
            width,
            bad_id,
        } => format!(
            "embed {batch}x{seq}x{width}{}",
            if *bad_id { " bad id" } else { "" }
        ),
        Op::Pool {
            seq,
            width,
            lengths,
            kind,
        } => format!("pool {kind:?} {seq}x{width} lengths {lengths:?}"),
        Op::L2Normalize { rows, cols } => format!("l2_normalize {rows}x{cols}"),
        Op::Softmax { rows, cols } => format!("softmax {rows}x{cols}"),
        Op::Conv2d {
            x,
            cout,
            k,
            geo,
            residual,
            act,
            ..
        } => format!(
            "conv2d {x:?}->{cout} k{k} s{} p{}+{} g{} res={residual} {act:?}",
            geo.stride[0], geo.padding[0], geo.padding_extra[0], geo.groups
        ),
        Op::Pool2d { x, p } => format!(
            "pool2d {x:?} {} k{} s{} p{}",
            if p.max { "max" } else { "avg" },
            p.kernel[0],
            p.stride[0],
            p.padding[0]
        ),
        Op::GlobalAvgPool { x } => format!("global_avg_pool {x:?}"),
        Op::RampExit {
            positions,
            width,
            classes,
            lengths,
            pooling,
            dense,
        } => format!(
            "ramp_exit {positions}x{width}->{classes} {pooling:?} dense={dense} batch {}",
            lengths.len()
        ),
    }
}

/// The whole table: every op in every dtype.
pub fn cases() -> Vec<OpCase> {
    let mut all = Vec::new();
    for (i, (op, expect)) in ops().into_iter().enumerate() {
        for dtype in DTYPES {
            all.push(OpCase {
                name: format!("{} {dtype}", op_name(&op)),
                op: op.clone(),
                dtype,
                tolerance: tolerance(dtype),
                expect: expect.clone(),
                seed: 1000 + i as u64,
            });
        }
    }
    all
}
