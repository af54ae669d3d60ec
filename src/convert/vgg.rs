//! torchvision VGG 11/13/16 checkpoints -> our blocks: one stage per pooling stage, the
//! classifier's first layer reordered from PyTorch's (c, h, w) flattening to our NHWC one.

use super::checkpoint::Checkpoint;
use super::torchvision::{Out, conv, linear};
use crate::backend::{Activation, Pool2d};
use crate::error::{Error, Result};
use crate::models::cnn::{Block, Op};

pub(super) fn vgg(
    ck: &mut Checkpoint,
    out: &mut Out,
    depth: usize,
    input: usize,
) -> Result<Vec<Block>> {
    const M: usize = 0;
    let plan: &[usize] = match depth {
        11 => &[64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M],
        13 => &[
            64, 64, M, 128, 128, M, 256, 256, M, 512, 512, M, 512, 512, M,
        ],
        16 => &[
            64, 64, M, 128, 128, M, 256, 256, 256, M, 512, 512, 512, M, 512, 512, 512, M,
        ],
        d => {
            return Err(Error::Input(format!(
                "vgg{d} is not supported (11, 13 or 16)"
            )));
        }
    };
    // torchvision's `features` is a Sequential of conv, ReLU and max-pool modules; one block per
    // pooling stage.
    let (mut blocks, mut ops, mut idx, mut stage) = (Vec::new(), Vec::new(), 0usize, 1);
    for &c in plan {
        if c == M {
            ops.push(Op::Pool(Pool2d {
                max: true,
                kernel: [2, 2],
                stride: [2, 2],
                padding: [0, 0],
            }));
            blocks.push(Block {
                name: format!("stage{stage}"),
                ops: std::mem::take(&mut ops),
                residual: None,
            });
            stage += 1;
            idx += 1;
        } else {
            let src = format!("features.{idx}");
            ops.push(conv(
                ck,
                out,
                &src,
                None,
                &format!("stage{stage}.conv{}", ops.len()),
                1,
                1,
                Activation::Relu,
            )?);
            idx += 2;
        }
    }
    // Classifier: AdaptiveAvgPool2d(7) -> flatten (c, h, w) -> Linear(512*49, 4096) -> ...
    let side = input / 32;
    let fc0 = "classifier.0.weight";
    let shape = ck.shape_of(fc0)?;
    if shape.len() != 2 || shape[1] != 512 * 49 {
        return Err(Error::tensor(
            &ck.path,
            fc0,
            format!("shape {shape:?}, expected [_, 25088]"),
        ));
    }
    let w = ck.take(fc0, &shape)?;
    let hidden = shape[0];
    let (first, w0): (Vec<Op>, Vec<f32>) = match side {
        // 7x7 features: the adaptive pool is the identity; reorder (c, h, w) -> (h, w, c).
        7 => {
            let mut p = vec![0.0; w.len()];
            for o in 0..hidden {
                for c in 0..512 {
                    for s in 0..49 {
                        p[o * 25088 + s * 512 + c] = w[o * 25088 + c * 49 + s];
                    }
                }
            }
            (vec![Op::Flatten], p)
        }
        // 1x1 features: the adaptive pool copies the pixel 49 times, so the layer sees each
        // channel 49 times: sum those weights (exact).
        1 => {
            let mut p = vec![0.0; hidden * 512];
            for o in 0..hidden {
                for c in 0..512 {
                    p[o * 512 + c] = (0..49).map(|s| w[o * 25088 + c * 49 + s]).sum();
                }
            }
            (vec![Op::GlobalAvgPool], p)
        }
        s => {
            return Err(Error::Input(format!(
                "vgg at input {input} leaves {s}x{s} features; supported inputs give 7x7 (224) or 1x1 (32)"
            )));
        }
    };
    let inputs = w0.len() / hidden;
    out.put("head.fc0.weight".into(), vec![hidden, inputs], &w0);
    out.put(
        "head.fc0.bias".into(),
        vec![hidden],
        &ck.take("classifier.0.bias", &[hidden])?,
    );
    let mut head = first;
    head.push(Op::Linear {
        name: "head.fc0".into(),
        inputs,
        outputs: hidden,
        act: Activation::Relu,
    });
    head.push(linear(
        ck,
        out,
        "classifier.3",
        "head.fc1",
        Activation::Relu,
    )?);
    head.push(linear(
        ck,
        out,
        "classifier.6",
        "head.fc2",
        Activation::None,
    )?);
    blocks.push(Block {
        name: "head".into(),
        ops: head,
        residual: None,
    });
    Ok(blocks)
}
