//! torchvision ResNet-18, ResNet-50 (bottleneck blocks) and VGG-11 through our converter (BatchNorm folding, NCHW -> NHWC) and
//! our CNN on `cpu` and `emu`, against torchvision's logits (tests/fixtures/cnn_golden.json, made
//! by tools/make_golden_cnn.py). The weights are generated bit for bit on both sides from each
//! tensor's name, so no checkpoint needs to be committed.

mod common;

use std::sync::Arc;

use apparate::backend::Backend;
use apparate::backend::emu::{EmuConfig, EmuDevice};
use apparate::backend::gpu::GpuBackend;
use apparate::convert::torchvision::{TorchvisionOptions, convert};
use apparate::format::ModelFile;
use apparate::models::cnn::Cnn;
use apparate::tensor::DType;
use common::*;
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    arch: String,
    input_size: usize,
    batch: usize,
    classes: usize,
    tensors: Vec<(String, Vec<usize>)>,
    logits: Vec<f64>,
}

#[derive(Deserialize)]
struct Golden {
    cases: Vec<Case>,
}

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

fn fnv1a64(s: &str) -> u64 {
    s.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01B3)
    })
}

/// The generator of tools/make_golden_cnn.py: values in [-0.5, 0.5), exact in f32.
fn unit(name: &str, n: usize) -> Vec<f64> {
    let base = fnv1a64(name);
    (0..n as u64)
        .map(|i| {
            let mut z = (base ^ i.wrapping_mul(GOLDEN)).wrapping_add(GOLDEN);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 48) as f64 / 65536.0 - 0.5
        })
        .collect()
}

fn values(name: &str, shape: &[usize]) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let v = unit(name, n);
    let f = |g: &dyn Fn(f64) -> f64| v.iter().map(|&x| g(x) as f32).collect::<Vec<f32>>();
    if name.ends_with("running_var") {
        f(&|x| 1.0 + x)
    } else if name.ends_with("running_mean") {
        f(&|x| x * 0.5)
    } else if shape.len() == 1 && name.ends_with(".weight") {
        f(&|x| 1.0 + x * 0.5)
    } else if shape.len() == 1 {
        f(&|x| x * 0.25)
    } else {
        let fan_in = (n / shape[0]) as f64;
        let scale = 2f64.powi((24.0 / fan_in).sqrt().log2().round() as i32);
        f(&|x| x * scale)
    }
}

/// Writes the torchvision checkpoint of `case` and converts it; returns our model file.
fn model(case: &Case, dir: &TempDir) -> std::path::PathBuf {
    model_as(case, dir, DType::F32)
}

/// The fixture's model converted with its weights stored as `dtype`.
fn model_as(case: &Case, dir: &TempDir, dtype: DType) -> std::path::PathBuf {
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = case
        .tensors
        .iter()
        .map(|(n, s)| {
            (
                n.clone(),
                s.clone(),
                bytemuck::cast_slice(&values(n, s)).to_vec(),
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    let src = dir.path(&format!("{}.safetensors", case.arch));
    safetensors::serialize_to_file(views, None, &src).unwrap();
    let out = dir.path(&format!("{}-{dtype}.apparate", case.arch));
    let mut o = TorchvisionOptions::new(&case.arch, case.input_size);
    o.dtype = dtype;
    let r = convert(&src, &out, &o).unwrap();
    assert_eq!(r.meta.head.as_ref().unwrap().labels.len(), case.classes);
    out
}

/// The fixture's input batch, NCHW as torch has it, turned into our NHWC.
fn input(case: &Case) -> Vec<f32> {
    let (b, s) = (case.batch, case.input_size);
    let nchw: Vec<f32> = unit("input", b * 3 * s * s)
        .iter()
        .map(|v| (v * 2.0) as f32)
        .collect();
    let mut nhwc = vec![0.0; nchw.len()];
    for n in 0..b {
        for c in 0..3 {
            for p in 0..s * s {
                nhwc[(n * s * s + p) * 3 + c] = nchw[(n * 3 + c) * s * s + p];
            }
        }
    }
    nhwc
}

fn rel_l2(got: &[f32], want: &[f64]) -> f64 {
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| (*a as f64 - b).powi(2))
        .sum();
    let den: f64 = want.iter().map(|b| b * b).sum();
    (num / den).sqrt()
}

fn run<B: Backend>(name: &str, be: B, path: &std::path::Path, case: &Case) -> f64 {
    run_checked(name, be, path, case, true)
}

/// `top1`: whether each image's top-1 class must equal torchvision's (half precision on these
/// random-weight models may swap near-tied classes, so there only the error is bounded).
fn run_checked<B: Backend>(
    name: &str,
    be: B,
    path: &std::path::Path,
    case: &Case,
    top1: bool,
) -> f64 {
    let file = ModelFile::open(path).unwrap();
    let cnn = Cnn::load(be, &file).unwrap();
    let out = cnn.forward(&input(case), case.batch).unwrap();
    let e = rel_l2(&out.logits, &case.logits);
    eprintln!(
        "{name} {} at {}: relative L2 error {e:.2e}",
        case.arch, case.input_size
    );
    for i in (0..case.batch).filter(|_| top1) {
        let want = (0..case.classes)
            .max_by(|&a, &b| {
                case.logits[i * case.classes + a].total_cmp(&case.logits[i * case.classes + b])
            })
            .unwrap();
        assert_eq!(
            out.top_k(i, 1)[0].0,
            want,
            "{name} {}: top-1 of image {i}",
            case.arch
        );
    }
    e
}

#[test]
fn resnets_and_vgg_match_torchvision_on_cpu_and_emu() {
    let g: Golden = serde_json::from_str(include_str!("fixtures/cnn_golden.json")).unwrap();
    let dir = TempDir::new("cnn");
    for case in &g.cases {
        let path = model(case, &dir);
        let e = run("cpu", cpu(), &path, case);
        assert!(e <= 1e-5, "cpu {}: relative L2 error {e}", case.arch);
        let emu = Arc::new(EmuDevice::new(EmuConfig::default()).unwrap());
        let e = run(
            "emu/f32",
            GpuBackend::shared(emu.clone(), DType::F32).with_poisoned_outputs(),
            &path,
            case,
        );
        assert!(e <= 1e-5, "emu/f32 {}: relative L2 error {e}", case.arch);
    }
}

/// Weights stored as bf16 on the CPU: upcast to f32 (`bf16` off), and on the bf16 kernels
/// where the CPU has them (their 1x1 convolutions round activations to bf16 too), within the
/// 1e-2 of the f64 reference (storing the weights as bf16 alone costs 3-4e-3 here).
#[test]
fn bf16_storage_on_the_cpu_stays_close() {
    use apparate::backend::{CpuBackend, CpuConfig};
    let g: Golden = serde_json::from_str(include_str!("fixtures/cnn_golden.json")).unwrap();
    let dir = TempDir::new("cnn-bf16");
    for case in &g.cases {
        let path = model_as(case, &dir, DType::BF16);
        let f32_cpu = CpuBackend::new(CpuConfig {
            bf16: Some(false),
            ..Default::default()
        })
        .unwrap();
        let upcast = run_checked("cpu/bf16 upcast", f32_cpu, &path, case, false);
        assert!(upcast <= 1e-2, "{}: relative L2 error {upcast}", case.arch);
        let be = cpu();
        if !be.bf16() {
            eprintln!("no AVX512-BF16 on this CPU: the bf16 kernels are not tested here");
            continue;
        }
        let kernels = run_checked("cpu/bf16 kernels", be, &path, case, false);
        assert!(
            kernels <= 1e-2,
            "{}: relative L2 error {kernels}",
            case.arch
        );
        // ResNets have 1x1 convolutions (the kernels' part); VGG has none.
        if case.arch.starts_with("resnet50") {
            assert_ne!(
                kernels, upcast,
                "{}: the bf16 kernels did not run",
                case.arch
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run by tools/gpu-check.sh"]
fn resnets_and_vgg_match_torchvision_on_a_real_gpu() {
    use apparate::backend::cuda::{CudaConfig, CudaDevice};
    let dev = Arc::new(
        CudaDevice::new(CudaConfig::default())
            .unwrap_or_else(|e| panic!("needs a CUDA GPU (tools/gpu-check.sh runs this): {e}")),
    );
    let g: Golden = serde_json::from_str(include_str!("fixtures/cnn_golden.json")).unwrap();
    let dir = TempDir::new("cnn-cuda");
    for case in &g.cases {
        let path = model(case, &dir);
        // f32 on the GPU differs from the emulated device only in FMA contraction and
        // reduction order: far below 1e-4.
        let e = run(
            "cuda/f32",
            GpuBackend::shared(dev.clone(), DType::F32).with_poisoned_outputs(),
            &path,
            case,
        );
        assert!(e <= 1e-4, "cuda/f32 {}: relative L2 error {e}", case.arch);
        for dt in [DType::F16, DType::BF16] {
            let e = run_checked(
                &format!("cuda/{dt}"),
                GpuBackend::shared(dev.clone(), dt).with_poisoned_outputs(),
                &path,
                case,
                false,
            );
            assert!(e <= 5e-2, "cuda/{dt} {}: relative L2 error {e}", case.arch);
        }
    }
}

#[test]
fn stage_graph_has_the_block_outputs_as_ramp_points() {
    let g: Golden = serde_json::from_str(include_str!("fixtures/cnn_golden.json")).unwrap();
    let dir = TempDir::new("cnn-graph");
    let resnet = g.cases.iter().find(|c| c.arch == "resnet18").unwrap();
    let file = ModelFile::open(model(resnet, &dir)).unwrap();
    // ResNet-18: its 8 residual blocks; the skip connections live inside them.
    assert_eq!(
        file.meta().graph.ramp_points,
        [
            "layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1", "layer4.0",
            "layer4.1"
        ]
    );
}

#[test]
fn converter_errors_name_the_problem() {
    let g: Golden = serde_json::from_str(include_str!("fixtures/cnn_golden.json")).unwrap();
    let dir = TempDir::new("cnn-bad");
    let vgg = g.cases.iter().find(|c| c.arch == "vgg11").unwrap();
    model(vgg, &dir);
    let src = dir.path("vgg11.safetensors");
    let e = convert(
        &src,
        &dir.path("x.apparate"),
        &TorchvisionOptions::new("resnet18", 64),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("conv1.weight") && e.contains("missing"), "{e}");
    let e = convert(
        &src,
        &dir.path("x.apparate"),
        &TorchvisionOptions::new("vgg11", 100),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("3x3 features"), "{e}");
    let e = convert(
        &src,
        &dir.path("x.apparate"),
        &TorchvisionOptions::new("alexnet", 32),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("unknown architecture"), "{e}");
}

#[derive(Deserialize)]
struct Digits {
    mean: f32,
    std: f32,
    pixels: Vec<Vec<u8>>,
    labels: Vec<usize>,
    logits: Vec<Vec<f32>>,
}

#[test]
fn trained_mnist_resnet_matches_pytorch_on_cpu_and_emu() {
    // The vision workload's model (committed, trained by tools/train_mnist_resnet.py) on 16
    // held-out digits against PyTorch's logits.
    let d: Digits = serde_json::from_str(include_str!("fixtures/mnist_golden.json")).unwrap();
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("weights/mnist-resnet.apparate");
    let file = ModelFile::open(&path).unwrap();
    let images: Vec<f32> = d
        .pixels
        .iter()
        .flatten()
        .map(|&p| (p as f32 / 255.0 - d.mean) / d.std)
        .collect();
    let want: Vec<f32> = d.logits.iter().flatten().copied().collect();
    let emu = Arc::new(EmuDevice::new(EmuConfig::default()).unwrap());
    let outs = [
        (
            "cpu",
            Cnn::load(cpu(), &file)
                .unwrap()
                .forward(&images, 16)
                .unwrap(),
        ),
        (
            "emu/f32",
            Cnn::load(GpuBackend::shared(emu, DType::F32), &file)
                .unwrap()
                .forward(&images, 16)
                .unwrap(),
        ),
    ];
    for (name, out) in outs {
        let err = max_abs_diff(&out.logits, &want);
        let correct = (0..16)
            .filter(|&i| out.top_k(i, 1)[0].0 == d.labels[i])
            .count();
        eprintln!("{name}: max abs logit error {err:.2e}, {correct}/16 digits right");
        assert!(err <= 1e-4, "{name}: max abs logit error {err}");
        for i in 0..16 {
            let torch_top = (0..10)
                .max_by(|&a, &b| d.logits[i][a].total_cmp(&d.logits[i][b]))
                .unwrap();
            assert_eq!(out.top_k(i, 1)[0].0, torch_top, "{name}: digit {i}");
        }
    }
}
