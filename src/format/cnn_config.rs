//! CNN hyper-parameters as stored in the model file: the input image and an explicit list of
//! blocks (one stage each), which is what ResNet, VGG and EfficientNet-Lite all reduce to once
//! BatchNorm is folded into the convolutions at conversion.

use serde::{Deserialize, Serialize};

use crate::backend::{Activation, Conv2d, Pool2d};
use crate::graph::StageGraph;

/// One operation inside a block. Tensors are `<name>.weight` / `<name>.bias`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Op {
    /// NHWC convolution, weight `[cout, k, k, cin / groups]`, bias `[cout]` (BatchNorm folded).
    Conv {
        name: String,
        cin: usize,
        cout: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        groups: usize,
        act: Activation,
        /// Extra padding after the last row/column ("SAME" padding's odd pixel).
        #[serde(default)]
        padding_extra: usize,
    },
    Pool(Pool2d),
    /// [n, h, w, c] -> [n, c].
    GlobalAvgPool,
    /// [n, h, w, c] -> [n, h * w * c] (NHWC order; the converter permutes weights to match).
    Flatten,
    /// Weight `[outputs, inputs]`, bias `[outputs]`.
    Linear {
        name: String,
        inputs: usize,
        outputs: usize,
        act: Activation,
    },
}

impl Op {
    /// A convolution's geometry (square kernel, the same stride and padding on both axes);
    /// `None` for other ops.
    pub fn conv_geometry(&self) -> Option<Conv2d> {
        let Op::Conv {
            stride,
            padding,
            groups,
            padding_extra,
            ..
        } = self
        else {
            return None;
        };
        Some(Conv2d {
            stride: [*stride; 2],
            padding: [*padding; 2],
            groups: *groups,
            padding_extra: [*padding_extra; 2],
        })
    }
}

/// A skip connection around a block: `act(last_conv(..) + shortcut(input))`, the addition fused
/// into the block's last convolution (which must have no activation of its own).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Residual {
    /// A projection of the input (ResNet's 1x1 "downsample"); `None`: the input itself.
    pub shortcut: Option<Op>,
    pub act: Activation,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Block {
    pub name: String,
    pub ops: Vec<Op>,
    #[serde(default)]
    pub residual: Option<Residual>,
}

/// The image a model takes: size after preprocessing, and the per-channel normalisation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageInput {
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    /// Resize the shorter side to this many pixels before the center crop (ImageNet: 256 for
    /// 224); `None`: resize straight to height x width.
    #[serde(default)]
    pub resize_shorter: Option<usize>,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CnnConfig {
    /// What it is, for people (`resnet18`, `vgg11`, `efficientnet-lite0`, ...).
    pub arch: String,
    pub input: ImageInput,
    pub blocks: Vec<Block>,
}

const MAX_BLOCKS: usize = 4096;
const MAX_DIM: usize = 1 << 20;

impl CnnConfig {
    /// Shape flowing between ops: `Image(h, w, c)` or `Flat(features)`.
    fn walk(&self) -> Result<Vec<Shape>, String> {
        let i = &self.input;
        if i.height == 0 || i.width == 0 || i.channels == 0 || i.height > 16384 || i.width > 16384 {
            return Err(format!(
                "cnn config: input {}x{}x{} is not a sensible image",
                i.height, i.width, i.channels
            ));
        }
        // NaN fails both tests (`!(s > 0.0)`), so a NaN or infinite constant cannot slip through
        // and turn every input into NaN.
        if i.mean.len() != i.channels
            || i.std.len() != i.channels
            || i.std.iter().any(|s| !(s.is_finite() && *s > 0.0))
            || i.mean.iter().any(|m| !m.is_finite())
        {
            return Err(format!(
                "cnn config: mean {:?} / std {:?} must have one finite entry per channel (std > 0)",
                i.mean, i.std
            ));
        }
        // The shorter-side resize comes before the centre crop: smaller than the crop would
        // stretch the picture, larger than the input cap would ask for absurd images.
        if let Some(s) = i.resize_shorter
            && (s < i.height.max(i.width) || s > 16384)
        {
            return Err(format!(
                "cnn config: resize_shorter {s} is outside {}..=16384 (at least the {}x{} crop)",
                i.height.max(i.width),
                i.height,
                i.width
            ));
        }
        if self.blocks.is_empty() || self.blocks.len() > MAX_BLOCKS {
            return Err(format!(
                "cnn config: {} blocks (1..={MAX_BLOCKS})",
                self.blocks.len()
            ));
        }
        let mut shape = Shape::Image(i.height, i.width, i.channels);
        let mut after_block = Vec::new();
        for b in &self.blocks {
            let input = shape;
            for op in &b.ops {
                shape = step(op, shape).map_err(|e| format!("block `{}`: {e}", b.name))?;
            }
            if let Some(r) = &b.residual {
                let last_plain = matches!(
                    b.ops.last(),
                    Some(Op::Conv {
                        act: Activation::None,
                        ..
                    })
                );
                if !last_plain {
                    return Err(format!(
                        "block `{}`: a residual needs a last convolution without activation",
                        b.name
                    ));
                }
                let s = match &r.shortcut {
                    None => input,
                    Some(op @ Op::Conv { .. }) => {
                        step(op, input).map_err(|e| format!("block `{}` shortcut: {e}", b.name))?
                    }
                    Some(_) => {
                        return Err(format!(
                            "block `{}`: a shortcut must be a convolution",
                            b.name
                        ));
                    }
                };
                if s != shape {
                    return Err(format!(
                        "block `{}`: shortcut gives {s:?}, the block {shape:?}",
                        b.name
                    ));
                }
            }
            after_block.push(shape);
        }
        if !matches!(shape, Shape::Flat(_)) {
            return Err("cnn config: the last block must end in class scores (Linear)".into());
        }
        Ok(after_block)
    }

    pub fn validate(&self) -> Result<(), String> {
        self.walk().map(|_| ())
    }

    /// Number of classes of the final layer.
    pub fn classes(&self) -> usize {
        match self.walk().ok().and_then(|s| s.last().copied()) {
            Some(Shape::Flat(n)) => n,
            _ => 0,
        }
    }

    /// Channels at the output of stage `name` (what a ramp there reads after pooling).
    pub fn width_at(&self, name: &str) -> Option<usize> {
        let shapes = self.walk().ok()?;
        let i = self.blocks.iter().position(|b| b.name == name)?;
        Some(match shapes[i] {
            Shape::Image(_, _, c) => c,
            Shape::Flat(n) => n,
        })
    }

    /// `(height, width, channels)` at the output of stage `name`, if it is an image.
    pub fn image_at(&self, name: &str) -> Option<(usize, usize, usize)> {
        let shapes = self.walk().ok()?;
        let i = self.blocks.iter().position(|b| b.name == name)?;
        match shapes[i] {
            Shape::Image(h, w, c) => Some((h, w, c)),
            Shape::Flat(_) => None,
        }
    }

    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let mut t = Vec::new();
        let mut push = |op: &Op| match op {
            Op::Conv {
                name,
                cin,
                cout,
                kernel,
                groups,
                ..
            } => {
                t.push((
                    format!("{name}.weight"),
                    vec![*cout, *kernel, *kernel, cin / groups.max(&1)],
                ));
                t.push((format!("{name}.bias"), vec![*cout]));
            }
            Op::Linear {
                name,
                inputs,
                outputs,
                ..
            } => {
                t.push((format!("{name}.weight"), vec![*outputs, *inputs]));
                t.push((format!("{name}.bias"), vec![*outputs]));
            }
            _ => {}
        };
        for b in &self.blocks {
            b.ops.iter().for_each(&mut push);
            if let Some(Residual {
                shortcut: Some(s), ..
            }) = &b.residual
            {
                push(s);
            }
        }
        t
    }

    /// One stage per block; every block output but the first (the stem) and the last (the
    /// classifier) is ramp-eligible, since skip connections live inside blocks.
    pub fn stage_graph(&self) -> StageGraph {
        StageGraph::chain(self.blocks.iter().map(|b| b.name.clone()))
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Shape {
    Image(usize, usize, usize),
    Flat(usize),
}

fn step(op: &Op, s: Shape) -> Result<Shape, String> {
    match (op, s) {
        (
            Op::Conv {
                name,
                cin,
                cout,
                kernel,
                stride,
                groups,
                ..
            },
            Shape::Image(h, w, c),
        ) => {
            // Geometry first: a zero here is not a channel mismatch and must not read as one.
            for (knob, v) in [("kernel", kernel), ("stride", stride), ("groups", groups)] {
                if *v == 0 {
                    return Err(format!("conv `{name}`: {knob} is 0; it must be at least 1"));
                }
            }
            if *cin != c || cin % groups != 0 || cout % groups != 0 || *cout == 0 || *cout > MAX_DIM
            {
                return Err(format!(
                    "conv `{name}`: {cin}->{cout} channels, {groups} groups, on {c} channels"
                ));
            }
            let g = op.conv_geometry().expect("a convolution");
            let (oh, ow) = g.output_size(h, w, *kernel, *kernel).ok_or(format!(
                "conv `{name}`: kernel {kernel} does not fit {h}x{w}"
            ))?;
            Ok(Shape::Image(oh, ow, *cout))
        }
        (Op::Pool(p), Shape::Image(h, w, c)) => {
            let (_, _, _, _, oh, ow) = crate::backend::check_pool(&[1, h, w, c], p)
                .map(|d| (d[0], d[1], d[2], d[3], d[4], d[5]))?;
            Ok(Shape::Image(oh, ow, c))
        }
        (Op::GlobalAvgPool, Shape::Image(_, _, c)) => Ok(Shape::Flat(c)),
        (Op::Flatten, Shape::Image(h, w, c)) => Ok(Shape::Flat(h * w * c)),
        (
            Op::Linear {
                name,
                inputs,
                outputs,
                ..
            },
            Shape::Flat(n),
        ) => {
            if *inputs != n || *outputs == 0 || *outputs > MAX_DIM {
                return Err(format!("linear `{name}`: {inputs} inputs on {n} features"));
            }
            Ok(Shape::Flat(*outputs))
        }
        (op, s) => Err(format!("{op:?} cannot follow a tensor of shape {s:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_conv(kernel: usize, stride: usize, groups: usize) -> CnnConfig {
        CnnConfig {
            arch: "test".into(),
            input: ImageInput {
                height: 8,
                width: 8,
                channels: 3,
                resize_shorter: None,
                mean: vec![0.5; 3],
                std: vec![0.5; 3],
            },
            blocks: vec![
                Block {
                    name: "stem".into(),
                    ops: vec![Op::Conv {
                        name: "stem.conv".into(),
                        cin: 3,
                        cout: 4,
                        kernel,
                        stride,
                        padding: 0,
                        groups,
                        act: Activation::Relu,
                        padding_extra: 0,
                    }],
                    residual: None,
                },
                Block {
                    name: "head".into(),
                    ops: vec![
                        Op::GlobalAvgPool,
                        Op::Linear {
                            name: "fc".into(),
                            inputs: 4,
                            outputs: 2,
                            act: Activation::None,
                        },
                    ],
                    residual: None,
                },
            ],
        }
    }

    #[test]
    fn zero_kernel_stride_or_groups_is_named_not_called_a_channel_mismatch() {
        one_conv(3, 1, 1).validate().unwrap();
        for (cfg, knob) in [
            (one_conv(0, 1, 1), "kernel is 0"),
            (one_conv(3, 0, 1), "stride is 0"),
            (one_conv(3, 1, 0), "groups is 0"),
        ] {
            let e = cfg.validate().unwrap_err();
            assert!(e.contains(knob) && !e.contains("channels"), "{e}");
        }
    }

    #[test]
    fn absurd_preprocessing_constants_are_refused() {
        let with = |f: &dyn Fn(&mut ImageInput)| {
            let mut c = one_conv(3, 1, 1);
            f(&mut c.input);
            c.validate()
        };
        with(&|i| i.resize_shorter = Some(8)).unwrap();
        for (bad, needle) in [
            (with(&|i| i.std[1] = f32::NAN), "std"),
            (with(&|i| i.std[0] = -1.0), "std"),
            (with(&|i| i.mean[2] = f32::INFINITY), "mean"),
            (with(&|i| i.resize_shorter = Some(0)), "resize_shorter 0"),
            (with(&|i| i.resize_shorter = Some(7)), "resize_shorter 7"),
            (
                with(&|i| i.resize_shorter = Some(usize::MAX)),
                "resize_shorter",
            ),
        ] {
            let e = bad.unwrap_err();
            assert!(e.contains(needle), "{e}");
        }
    }
}
