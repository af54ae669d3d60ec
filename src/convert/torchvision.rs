//! torchvision ResNet (18/34/50) and VGG (11/13/16, in [`super::vgg`]) checkpoints (safetensors
//! with torchvision's tensor names), and EfficientNet-Lite0 (the `efficientnet_lite_pytorch`
//! names, in [`super::efficientnet`]) -> our format. BatchNorm is folded into the preceding
//! convolution here, once: `w' = w * gamma / sqrt(var + eps)`,
//! `b' = beta - mean * gamma / sqrt(var + eps)`; weights are permuted from PyTorch's NCHW
//! `[cout, cin, kh, kw]` to our NHWC `[cout, kh, kw, cin]`.

use std::path::Path;

use super::checkpoint::{Checkpoint, read};
use super::hf_bert::ConvertReport;
use crate::backend::{Activation, Pool2d};
use crate::error::{Error, Result};
use crate::format::{
    FORMAT_VERSION, Family, FileKind, HeadMeta, ModelMeta, OwnedTensor, Preprocessing, Provenance,
    sha256_hex, write_model,
};
use crate::models::cnn::{Block, CnnConfig, ImageInput, Op, Residual};
use crate::tensor::DType;

/// torchvision's BatchNorm epsilon.
const BN_EPS: f32 = 1e-5;

/// What to convert and how the model will be fed.
#[derive(Clone, Debug)]
pub struct TorchvisionOptions {
    /// `resnet18`, `resnet34`, `resnet50`, `vgg11`, `vgg13` or `vgg16`.
    pub arch: String,
    /// Square input size the model will run at (224 for ImageNet weights).
    pub input_size: usize,
    /// Input channels (3 for RGB).
    pub channels: usize,
    /// Per-channel normalisation of 0..1 pixels, `(p - mean) / std`; default: what the
    /// architecture was trained with (see [`TorchvisionOptions::new`]).
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    /// Shorter side before the center crop (ImageNet: 256); `None`: resize to the input size.
    pub resize_shorter: Option<usize>,
    /// Class names, in output order; `None`: `class0`, `class1`, ...
    pub labels: Option<Vec<String>>,
    pub dtype: DType,
    pub source_label: Option<String>,
}

/// ImageNet's per-channel mean and standard deviation (0..1 pixels): torchvision's ResNet/VGG.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];
/// The "edge" normalisation EfficientNet-Lite was trained with, `(x - 127) / 128` on 0..255
/// pixels, written for 0..1 pixels: mean 127/255, std 128/255.
pub const EDGE_MEAN: f32 = 127.0 / 255.0;
pub const EDGE_STD: f32 = 128.0 / 255.0;

impl TorchvisionOptions {
    /// Options for `arch` at `input_size`, normalised as that architecture was trained: the
    /// edge normalisation for `efficientnet-lite*` (feeding it ImageNet's changes the top-1
    /// answer on ordinary photos), ImageNet's for the rest.
    pub fn new(arch: &str, input_size: usize) -> TorchvisionOptions {
        let (mean, std) = if arch.to_ascii_lowercase().starts_with("efficientnet-lite") {
            (vec![EDGE_MEAN; 3], vec![EDGE_STD; 3])
        } else {
            (IMAGENET_MEAN.to_vec(), IMAGENET_STD.to_vec())
        };
        TorchvisionOptions {
            arch: arch.to_string(),
            input_size,
            channels: 3,
            mean,
            std,
            resize_shorter: None,
            labels: None,
            dtype: DType::F32,
            source_label: None,
        }
    }
}

/// Converted tensors in our names and layouts.
pub(super) struct Out {
    tensors: Vec<(String, OwnedTensor)>,
    dtype: DType,
}

impl Out {
    pub(super) fn put(&mut self, name: String, shape: Vec<usize>, v: &[f32]) {
        self.tensors
            .push((name, OwnedTensor::from_f32(v, shape, self.dtype)));
    }
}

/// [cout, cin, kh, kw] -> [cout, kh, kw, cin].
pub(super) fn nchw_to_nhwc(w: &[f32], s: &[usize]) -> Vec<f32> {
    let (co, ci, kh, kw) = (s[0], s[1], s[2], s[3]);
    let mut out = vec![0.0; w.len()];
    for o in 0..co {
        for c in 0..ci {
            for i in 0..kh {
                for j in 0..kw {
                    out[((o * kh + i) * kw + j) * ci + c] = w[((o * ci + c) * kh + i) * kw + j];
                }
            }
        }
    }
    out
}

/// Takes conv `src` (+ BatchNorm `bn`, + conv bias) from the checkpoint and writes the folded
/// convolution as `dst`; returns its op.
#[allow(clippy::too_many_arguments)]
pub(super) fn conv(
    ck: &mut Checkpoint,
    out: &mut Out,
    src: &str,
    bn: Option<&str>,
    dst: &str,
    stride: usize,
    padding: usize,
    act: Activation,
) -> Result<Op> {
    conv_bn(ck, out, src, bn, BN_EPS, dst, [stride, padding, 0], act)
}

/// [`conv`] with the BatchNorm epsilon and [stride, padding, extra padding after] given, for
/// grouped (depthwise) weights too: the group count is `cin / weight's input channels`.
#[allow(clippy::too_many_arguments)]
pub(super) fn conv_bn(
    ck: &mut Checkpoint,
    out: &mut Out,
    src: &str,
    bn: Option<&str>,
    eps: f32,
    dst: &str,
    [stride, padding, padding_extra]: [usize; 3],
    act: Activation,
) -> Result<Op> {
    let wname = format!("{src}.weight");
    let shape = ck.shape_of(&wname)?;
    if shape.len() != 4 {
        return Err(Error::tensor(
            &ck.path,
            &wname,
            format!("shape {shape:?} is not a 2-D convolution"),
        ));
    }
    let (cout, cg, k) = (shape[0], shape[1], shape[2]);
    if shape[3] != k {
        return Err(Error::tensor(
            &ck.path,
            &wname,
            "only square kernels are supported",
        ));
    }
    let mut w = ck.take(&wname, &shape)?;
    let mut b = match ck.tensors.contains_key(&format!("{src}.bias")) {
        true => ck.take(&format!("{src}.bias"), &[cout])?,
        false => vec![0.0; cout],
    };
    if let Some(bn) = bn {
        let g = ck.take(&format!("{bn}.weight"), &[cout])?;
        let beta = ck.take(&format!("{bn}.bias"), &[cout])?;
        let mean = ck.take(&format!("{bn}.running_mean"), &[cout])?;
        let var = ck.take(&format!("{bn}.running_var"), &[cout])?;
        ck.tensors.remove(&format!("{bn}.num_batches_tracked"));
        let per = w.len() / cout;
        for o in 0..cout {
            let scale = g[o] / (var[o] + eps).sqrt();
            w[o * per..(o + 1) * per]
                .iter_mut()
                .for_each(|v| *v *= scale);
            b[o] = beta[o] + (b[o] - mean[o]) * scale;
        }
    }
    out.put(
        format!("{dst}.weight"),
        vec![cout, k, k, cg],
        &nchw_to_nhwc(&w, &shape),
    );
    out.put(format!("{dst}.bias"), vec![cout], &b);
    // A weight with one input channel per output channel is depthwise.
    let groups = if cg == 1 && cout > 1 && depthwise_hint(src) {
        cout
    } else {
        1
    };
    Ok(Op::Conv {
        name: dst.to_string(),
        cin: cg * groups,
        cout,
        kernel: k,
        stride,
        padding,
        groups,
        padding_extra,
        act,
    })
}

/// Depthwise convolutions are named so in the checkpoints we read (EfficientNet's
/// `_depthwise_conv`); a 1-input-channel weight elsewhere is a plain convolution on a gray image.
fn depthwise_hint(src: &str) -> bool {
    src.contains("depthwise")
}

pub(super) fn linear(
    ck: &mut Checkpoint,
    out: &mut Out,
    src: &str,
    dst: &str,
    act: Activation,
) -> Result<Op> {
    let wname = format!("{src}.weight");
    let shape = ck.shape_of(&wname)?;
    if shape.len() != 2 {
        return Err(Error::tensor(
            &ck.path,
            &wname,
            format!("shape {shape:?} is not a linear layer"),
        ));
    }
    let w = ck.take(&wname, &shape)?;
    let b = ck.take(&format!("{src}.bias"), &[shape[0]])?;
    out.put(format!("{dst}.weight"), shape.clone(), &w);
    out.put(format!("{dst}.bias"), vec![shape[0]], &b);
    Ok(Op::Linear {
        name: dst.to_string(),
        inputs: shape[1],
        outputs: shape[0],
        act,
    })
}

/// `depth`: 18, 34 or 50 (torchvision's layouts), or `None` for any ResNet with torchvision's
/// names: the layers and blocks present in the checkpoint, bottleneck blocks when they have a
/// `conv3`, widths from the weights; a 3x3 `conv1` is the small-image stem (stride 1, no
/// max-pool), a 7x7 one ImageNet's (stride 2 + max-pool).
fn resnet(ck: &mut Checkpoint, out: &mut Out, depth: Option<usize>) -> Result<Vec<Block>> {
    let (layers, bottleneck): (Vec<usize>, bool) = match depth {
        Some(18) => (vec![2, 2, 2, 2], false),
        Some(34) => (vec![3, 4, 6, 3], false),
        Some(50) => (vec![3, 4, 6, 3], true),
        Some(d) => {
            return Err(Error::Input(format!(
                "resnet{d} is not supported (18, 34, 50, or `resnet` for any depth)"
            )));
        }
        None => {
            let count = |l: usize| {
                (0..)
                    .take_while(|i| {
                        ck.tensors
                            .contains_key(&format!("layer{l}.{i}.conv1.weight"))
                    })
                    .count()
            };
            let layers: Vec<usize> = (1..=4).map(count).take_while(|&n| n > 0).collect();
            (layers, ck.tensors.contains_key("layer1.0.conv3.weight"))
        }
    };
    let stem_k = ck.shape_of("conv1.weight")?.get(2).copied().unwrap_or(7);
    // A 3x3 conv1 is the small-image stem (stride 1, no max-pool), 7x7 ImageNet's.
    let (stride, pad) = if stem_k == 3 { (1, 1) } else { (2, 3) };
    let mut stem = vec![conv(
        ck,
        out,
        "conv1",
        Some("bn1"),
        "stem.conv",
        stride,
        pad,
        Activation::Relu,
    )?];
    if stem_k != 3 {
        stem.push(Op::Pool(Pool2d {
            max: true,
            kernel: [3, 3],
            stride: [2, 2],
            padding: [1, 1],
        }));
    }
    let mut blocks = vec![Block {
        name: "stem".into(),
        ops: stem,
        residual: None,
    }];
    for (l, &n) in layers.iter().enumerate() {
        for i in 0..n {
            let p = format!("layer{}.{i}", l + 1);
            let stride = if i == 0 && l > 0 { 2 } else { 1 };
            let mut ops = Vec::new();
            if bottleneck {
                ops.push(conv(
                    ck,
                    out,
                    &format!("{p}.conv1"),
                    Some(&format!("{p}.bn1")),
                    &format!("{p}.conv1"),
                    1,
                    0,
                    Activation::Relu,
                )?);
                ops.push(conv(
                    ck,
                    out,
                    &format!("{p}.conv2"),
                    Some(&format!("{p}.bn2")),
                    &format!("{p}.conv2"),
                    stride,
                    1,
                    Activation::Relu,
                )?);
                ops.push(conv(
                    ck,
                    out,
                    &format!("{p}.conv3"),
                    Some(&format!("{p}.bn3")),
                    &format!("{p}.conv3"),
                    1,
                    0,
                    Activation::None,
                )?);
            } else {
                ops.push(conv(
                    ck,
                    out,
                    &format!("{p}.conv1"),
                    Some(&format!("{p}.bn1")),
                    &format!("{p}.conv1"),
                    stride,
                    1,
                    Activation::Relu,
                )?);
                ops.push(conv(
                    ck,
                    out,
                    &format!("{p}.conv2"),
                    Some(&format!("{p}.bn2")),
                    &format!("{p}.conv2"),
                    1,
                    1,
                    Activation::None,
                )?);
            }
            let shortcut = if ck.tensors.contains_key(&format!("{p}.downsample.0.weight")) {
                Some(conv(
                    ck,
                    out,
                    &format!("{p}.downsample.0"),
                    Some(&format!("{p}.downsample.1")),
                    &format!("{p}.downsample"),
                    stride,
                    0,
                    Activation::None,
                )?)
            } else {
                None
            };
            blocks.push(Block {
                name: p,
                ops,
                residual: Some(Residual {
                    shortcut,
                    act: Activation::Relu,
                }),
            });
        }
    }
    blocks.push(Block {
        name: "head".into(),
        ops: vec![
            Op::GlobalAvgPool,
            linear(ck, out, "fc", "head.fc", Activation::None)?,
        ],
        residual: None,
    });
    Ok(blocks)
}

/// Converts a torchvision checkpoint at `src` into our format at `out_path`.
pub fn convert(src: &Path, out_path: &Path, opts: &TorchvisionOptions) -> Result<ConvertReport> {
    let mut ck = Checkpoint::open(src)?;
    let mut out = Out {
        tensors: Vec::new(),
        dtype: opts.dtype,
    };
    let arch = opts.arch.to_ascii_lowercase();
    let blocks = if arch == "resnet" {
        resnet(&mut ck, &mut out, None)?
    } else if let Some(d) = arch.strip_prefix("resnet") {
        resnet(
            &mut ck,
            &mut out,
            Some(
                d.parse()
                    .map_err(|_| Error::Input(format!("unknown architecture `{arch}`")))?,
            ),
        )?
    } else if arch == "efficientnet-lite0" {
        super::efficientnet::efficientnet_lite0(&mut ck, &mut out, opts.input_size)?
    } else if let Some(d) = arch.strip_prefix("vgg") {
        super::vgg::vgg(
            &mut ck,
            &mut out,
            d.parse()
                .map_err(|_| Error::Input(format!("unknown architecture `{arch}`")))?,
            opts.input_size,
        )?
    } else {
        return Err(Error::Input(format!(
            "unknown architecture `{arch}` (resnet18/34/50, vgg11/13/16, efficientnet-lite0)"
        )));
    };
    if let Some(extra) = ck.tensors.keys().next() {
        return Err(Error::tensor(
            &ck.path,
            extra,
            format!("not used by {arch} (wrong architecture?)"),
        ));
    }
    let config = CnnConfig {
        arch: arch.clone(),
        input: ImageInput {
            height: opts.input_size,
            width: opts.input_size,
            channels: opts.channels,
            resize_shorter: opts.resize_shorter,
            mean: opts.mean.clone(),
            std: opts.std.clone(),
        },
        blocks,
    };
    config.validate().map_err(|r| Error::format(src, r))?;
    let classes = config.classes();
    let labels = match &opts.labels {
        Some(l) if l.len() == classes => l.clone(),
        Some(l) => {
            return Err(Error::Input(format!(
                "{} labels for a network with {classes} outputs",
                l.len()
            )));
        }
        None => (0..classes).map(|i| format!("class{i}")).collect(),
    };
    let source = opts
        .source_label
        .clone()
        .unwrap_or_else(|| src.display().to_string());
    let mut provenance = vec![Provenance {
        source,
        sha256: sha256_hex(&read(src)?),
    }];
    // An exported checkpoint names what it was exported from (weights/prepare.py does).
    if let (Some(source), Some(sha256)) = (ck.metadata.get("source"), ck.metadata.get("sha256")) {
        provenance.push(Provenance {
            source: source.clone(),
            sha256: sha256.clone(),
        });
    }
    let meta = ModelMeta {
        format_version: FORMAT_VERSION,
        kind: FileKind::Model,
        graph: config.stage_graph(),
        family: Family::Cnn(config),
        preprocessing: Preprocessing::Image {},
        head: Some(HeadMeta { labels }),
        provenance,
    };
    let parameters = out
        .tensors
        .iter()
        .map(|(_, t)| t.shape.iter().product::<usize>())
        .sum();
    let count = out.tensors.len();
    write_model(out_path, &meta, &[], out.tensors)?;
    let bytes = std::fs::metadata(out_path)
        .map_err(|e| Error::io(out_path, e))?
        .len();
    Ok(ConvertReport {
        meta,
        tensors: count,
        parameters,
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_architecture_is_normalised_as_it_was_trained() {
        let lite = TorchvisionOptions::new("efficientnet-lite0", 224);
        assert_eq!(lite.mean, vec![127.0 / 255.0; 3]);
        assert_eq!(lite.std, vec![128.0 / 255.0; 3]);
        // (p - mean) / std on 0..1 pixels is (x - 127) / 128 on 0..255 ones.
        for x in [0.0f32, 127.0, 255.0] {
            let v = (x / 255.0 - lite.mean[0]) / lite.std[0];
            assert!((v - (x - 127.0) / 128.0).abs() < 1e-6, "{x}: {v}");
        }
        let resnet = TorchvisionOptions::new("resnet18", 224);
        assert_eq!(resnet.mean, IMAGENET_MEAN.to_vec());
        assert_eq!(resnet.std, IMAGENET_STD.to_vec());
    }
}
