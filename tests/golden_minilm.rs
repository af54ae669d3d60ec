//! The real all-MiniLM-L6-v2 (+ the real 157-intent head) on the CPU backend against outputs
//! of sentence-transformers and scikit-learn (tests/fixtures/minilm_golden.json, made by
//! tools/make_golden_minilm.py). Needs `weights/fetch.sh` to have run.

mod common;

use apparate::pipeline::TextModel;
use common::*;
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    text: String,
    tokens: usize,
    embedding: Vec<f32>,
    intent_row: usize,
    intent: String,
}

#[derive(Deserialize)]
struct Golden {
    cases: Vec<Case>,
}

fn golden() -> Golden {
    let raw = include_str!("fixtures/minilm_golden.json");
    serde_json::from_str(raw).expect("fixture parses")
}

#[test]
fn minilm_matches_sentence_transformers_in_one_mixed_batch() {
    let g = golden();
    assert!(g.cases.len() >= 20);
    let model = TextModel::load(cpu(), weights_file("minilm-l6-intent.apparate")).unwrap();
    let texts: Vec<&str> = g.cases.iter().map(|c| c.text.as_str()).collect();
    let input = model.tokenizer.encode(&texts).unwrap();
    // The batch really mixes lengths, and our tokenizer agrees with the reference on them.
    let lens: Vec<usize> = g.cases.iter().map(|c| c.tokens).collect();
    assert_eq!(input.shape.lengths, lens);
    assert!(lens.iter().min() < Some(&5) && lens.iter().max() > Some(&100));
    let out = model.encoder.forward(&input).unwrap();
    let labels = model.encoder.labels();
    let (mut worst_cos, mut worst_err) = (1.0f64, 0.0f32);
    for (i, case) in g.cases.iter().enumerate() {
        let e = out.embedding(i);
        let cos = cosine(e, &case.embedding);
        let err = max_abs_diff(e, &case.embedding);
        assert!(
            cos >= 0.9999 && err <= 1e-4,
            "sentence {i} {:?}: cosine {cos}, max abs error {err}",
            case.text
        );
        worst_cos = worst_cos.min(cos);
        worst_err = worst_err.max(err);
        let (row, _) = out.top1(i).unwrap();
        assert_eq!(
            (row, labels[row].as_str()),
            (case.intent_row, case.intent.as_str()),
            "intent of sentence {i} {:?}",
            case.text
        );
    }
    eprintln!(
        "{} sentences: worst cosine {worst_cos:.7}, worst max abs error {worst_err:.2e}",
        g.cases.len()
    );
}

#[test]
fn padding_does_not_change_results() {
    let g = golden();
    let model = TextModel::load(cpu(), weights_file("minilm-l6.apparate")).unwrap();
    let texts: Vec<&str> = g.cases.iter().map(|c| c.text.as_str()).collect();
    let (batched, _) = model.run(&texts).unwrap();
    for (i, t) in texts.iter().enumerate() {
        let (alone, _) = model.run(&[t]).unwrap();
        let err = max_abs_diff(alone.embedding(0), batched.embedding(i));
        assert!(
            err <= 1e-5,
            "sentence {i}: alone vs in batch differ by {err}"
        );
    }
}

#[test]
fn fixed_padding_of_the_tokenizer_file_is_switched_off() {
    let model = TextModel::load(cpu(), weights_file("minilm-l6.apparate")).unwrap();
    // MiniLM's tokenizer.json pads every input to 128; we pad only to the longest in a batch.
    let input = model.tokenizer.encode(&["hello world", "hi"]).unwrap();
    assert_eq!(input.shape.seq, 4);
    assert_eq!(input.shape.lengths, vec![4, 3]);
}

#[test]
fn half_precision_storage_stays_close() {
    // The real model re-stored as f16 / bf16: f16 upcast at load by the CPU backend, bf16 on
    // its bf16 kernels where the CPU has AVX512-BF16 (upcast too elsewhere).
    let g = golden();
    let src = apparate::format::ModelFile::open(weights_file("minilm-l6-intent.apparate")).unwrap();
    let texts: Vec<&str> = g.cases.iter().map(|c| c.text.as_str()).collect();
    let dir = TempDir::new("half-real");
    for (dtype, min_cos) in [
        (apparate::tensor::DType::F16, 0.9999),
        (apparate::tensor::DType::BF16, 0.999),
    ] {
        let path = dir.path(&format!("minilm-{dtype}.apparate"));
        let tokenizer = [("tokenizer.json".into(), src.tokenizer_json().to_string())];
        write_as_dtype(&src, &path, dtype, &tokenizer);
        let model = TextModel::load(cpu(), &path).unwrap();
        let (out, _) = model.run(&texts).unwrap();
        let mut worst = 1.0f64;
        let mut agree = 0;
        for (i, case) in g.cases.iter().enumerate() {
            worst = worst.min(cosine(out.embedding(i), &case.embedding));
            agree += usize::from(out.top1(i).unwrap().0 == case.intent_row);
        }
        eprintln!(
            "{dtype}: worst cosine {worst:.6}, intent agreement {agree}/{}",
            g.cases.len()
        );
        assert!(worst >= min_cos, "{dtype}: worst cosine {worst}");
        assert_eq!(agree, g.cases.len(), "{dtype}: intent argmax changed");
    }
}

/// MiniLM on a GPU backend (emulated or real), in every dtype, against the CPU backend on the
/// same model file and against the golden fixture. `APPARATE_GPU_MODEL` names another file in
/// the weights folder (the GPU check carries an f16-stored copy, which fits its size limit).
fn minilm_on_gpu<D: apparate::backend::device::Device>(device: &str, dev: std::sync::Arc<D>) {
    use apparate::backend::gpu::GpuBackend;
    use apparate::tensor::DType;
    let g = golden();
    let name = std::env::var("APPARATE_GPU_MODEL").unwrap_or("minilm-l6-intent.apparate".into());
    let path = weights_file(&name);
    let stored_f32 = apparate::format::ModelFile::open(&path)
        .unwrap()
        .tensors()
        .all(|(_, t)| t.dtype == DType::F32);
    // A mixed batch with the longest sentence (127 tokens), so every kernel sees padding.
    let picks = [0usize, 2, 6, 10, 11, 13, 19, 22];
    let texts: Vec<&str> = picks.iter().map(|&i| g.cases[i].text.as_str()).collect();
    assert!(picks.iter().any(|&i| g.cases[i].tokens > 120));
    let (reference, _) = TextModel::load(cpu(), &path).unwrap().run(&texts).unwrap();
    for (dt, min_cos) in [
        (DType::F32, 0.9999),
        (DType::F16, 0.999),
        (DType::BF16, 0.99),
    ] {
        let be = GpuBackend::shared(dev.clone(), dt).with_poisoned_outputs();
        let model = TextModel::load(be, &path).unwrap();
        let (out, t) = model.run(&texts).unwrap();
        let (mut cos_cpu, mut err_cpu, mut cos_golden, mut err_golden, mut agree) =
            (1.0f64, 0.0f32, 1.0f64, 0.0f32, 0);
        for (k, &i) in picks.iter().enumerate() {
            let case = &g.cases[i];
            cos_cpu = cos_cpu.min(cosine(out.embedding(k), reference.embedding(k)));
            err_cpu = err_cpu.max(max_abs_diff(out.embedding(k), reference.embedding(k)));
            cos_golden = cos_golden.min(cosine(out.embedding(k), &case.embedding));
            err_golden = err_golden.max(max_abs_diff(out.embedding(k), &case.embedding));
            agree += usize::from(out.top1(k).unwrap().0 == case.intent_row);
        }
        eprintln!(
            "{device}/{dt} ({name}): vs cpu cosine {cos_cpu:.7} max abs {err_cpu:.2e}; vs golden cosine {cos_golden:.7} max abs {err_golden:.2e}; intent {agree}/{}; forward {:.2} s",
            picks.len(),
            t.forward.as_secs_f64()
        );
        assert!(
            cos_cpu >= min_cos && cos_golden >= min_cos,
            "{device}/{dt}: cosine vs cpu {cos_cpu}, vs golden {cos_golden}"
        );
        if dt == DType::F32 {
            // Same weights, both in f32: the bounds of the CPU against the reference framework.
            assert!(
                err_cpu <= 1e-4,
                "{device}/f32: max abs error vs cpu {err_cpu}"
            );
            if stored_f32 {
                assert!(
                    err_golden <= 1e-4,
                    "{device}/f32: max abs error vs golden {err_golden}"
                );
            }
        }
        if dt != DType::BF16 {
            assert_eq!(agree, picks.len(), "{device}/{dt}: intent argmax changed");
        }
    }
}

#[test]
fn minilm_on_the_emulated_gpu_matches_the_golden_fixture() {
    use apparate::backend::emu::{EmuConfig, EmuDevice};
    minilm_on_gpu(
        "emu",
        std::sync::Arc::new(EmuDevice::new(EmuConfig::default()).unwrap()),
    );
}

#[test]
#[ignore = "needs a CUDA GPU: run by tools/gpu-check.sh"]
fn minilm_on_a_real_gpu_matches_the_golden_fixture() {
    use apparate::backend::cuda::{CudaConfig, CudaDevice};
    let dev = CudaDevice::new(CudaConfig::default())
        .unwrap_or_else(|e| panic!("needs a CUDA GPU (tools/gpu-check.sh runs this): {e}"));
    minilm_on_gpu("cuda", std::sync::Arc::new(dev));
}
