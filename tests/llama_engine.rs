//! The decoder family on the engine's backends against the reference outputs of
//! transformers on the same GGUF file (tests/fixtures/smollm2_golden.json, made by
//! tools/make_golden_smollm2.py): greedy generation of 64 tokens for 20 chat and raw prompts,
//! and the last-position logits of each prompt. Needs the real model
//! (`weights/fetch.sh` links weights/smollm2-135m-instruct.q4_1.gguf).

mod common;

use apparate::backend::decoder::DecoderBackend;
use apparate::gguf::GgufFile;
use apparate::models::llama::{KvCacheConfig, Llama, Sequence};

fn model_path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("weights/smollm2-135m-instruct.q4_1.gguf")
}

/// What one backend did on the fixture's cases.
struct Outcome {
    worst_logit: f32,
    tokens_equal: usize,
    tokens_total: usize,
    /// Cases whose greedy tokens all matched, and cases that left the reference at a step
    /// where its top two logits were within `margin` (a near tie).
    whole: usize,
    near_ties: Vec<String>,
}

fn run_cases<B: DecoderBackend>(be: B, cases: &[usize], steps: usize, chunk: usize) -> Outcome {
    let g = GgufFile::open(model_path()).unwrap();
    let model = Llama::load(be, &g).unwrap();
    run_model(&model, cases, steps, chunk)
}

fn run_model<B: DecoderBackend>(
    model: &Llama<B>,
    cases: &[usize],
    steps: usize,
    chunk: usize,
) -> Outcome {
    let mut cache = model.new_cache(KvCacheConfig::default()).unwrap();
    let f = common::smollm2_fixture();
    let mut out = Outcome {
        worst_logit: 0.0,
        tokens_equal: 0,
        tokens_total: 0,
        whole: 0,
        near_ties: Vec::new(),
    };
    for &i in cases {
        let c = &f["cases"][i];
        let ids = common::u32s(&c["ids"]);
        let mut seq = Sequence::new();
        let logits = seq.feed(model, &mut cache, &ids, chunk).unwrap();
        let host = model.backend().download(&logits).unwrap();
        for pair in c["top"].as_array().unwrap() {
            let (id, want) = (
                pair[0].as_u64().unwrap() as usize,
                pair[1].as_f64().unwrap(),
            );
            out.worst_logit = out.worst_logit.max((host[id] - want as f32).abs());
        }
        let greedy = common::u32s(&c["greedy"]);
        let margins = c["margins"].as_array().unwrap();
        let mut next = model.backend().argmax(&logits).unwrap()[0];
        let mut all = true;
        for s in 0..steps {
            out.tokens_total += 1;
            if next != greedy[s] {
                let m = margins[s].as_f64().unwrap();
                out.near_ties.push(format!(
                    "case {i} step {s}: {next} vs {} (reference margin {m:.3})",
                    greedy[s]
                ));
                all = false;
                out.tokens_total += steps - s - 1;
                break;
            }
            out.tokens_equal += 1;
            if s + 1 < steps {
                let l = seq.feed(model, &mut cache, &[next], 1).unwrap();
                next = model.backend().argmax(&l).unwrap()[0];
            }
        }
        out.whole += all as usize;
        seq.release(&mut cache);
    }
    assert_eq!(cache.free_blocks(), cache.blocks(), "every block came back");
    out
}

/// All 20 cases, 64 greedy tokens each, on the CPU backend.
#[test]
fn greedy_generation_on_the_cpu_matches_transformers() {
    let t0 = std::time::Instant::now();
    let cases: Vec<usize> = (0..20).collect();
    let o = run_cases(common::cpu(), &cases, 64, 16);
    eprintln!(
        "cpu: {} of {} greedy tokens equal, {} of 20 cases whole, largest top-32 logit difference {:.4} ({:.1} s)",
        o.tokens_equal,
        o.tokens_total,
        o.whole,
        o.worst_logit,
        t0.elapsed().as_secs_f64()
    );
    for t in &o.near_ties {
        eprintln!("  left the reference at {t}");
    }
    assert!(o.worst_logit < 0.01, "logits differ by {}", o.worst_logit);
    assert!(o.near_ties.is_empty(), "{:?}", o.near_ties);
}

/// The 8-bit-activation path (llama.cpp's way) is measured, not required to match: it prints
/// how far it strays.
#[test]
fn q8_activations_stray_measurably() {
    let cases: Vec<usize> = (0..20).collect();
    let o = run_cases(common::cpu().with_q8_activations(true), &cases, 64, 16);
    eprintln!(
        "cpu, 8-bit activations: {} of {} greedy tokens equal, {} of 20 cases whole, largest top-32 logit difference {:.4}",
        o.tokens_equal, o.tokens_total, o.whole, o.worst_logit
    );
    assert!(o.worst_logit < 3.0, "logits differ by {}", o.worst_logit);
    assert!(o.tokens_equal > 0);
}

/// The same model on the emulated GPU (the CUDA kernels compiled for the host), f32 storage:
/// two prompts (one chat, one raw), each prefilled in one step, then 4 greedy tokens. The
/// emulator runs about 6 s per step of this model on 2 cores, so few steps.
#[test]
fn greedy_generation_on_the_emulated_gpu_matches_transformers() {
    use apparate::backend::emu::{EmuConfig, EmuDevice};
    use apparate::backend::gpu::GpuBackend;
    use apparate::tensor::DType;
    let t0 = std::time::Instant::now();
    let be = GpuBackend::new(EmuDevice::new(EmuConfig::default()).unwrap(), DType::F32);
    let o = run_cases(be, &[3, 15], 4, 64);
    eprintln!(
        "emu f32: {} of {} greedy tokens equal, largest top-32 logit difference {:.4} ({:.1} s)",
        o.tokens_equal,
        o.tokens_total,
        o.worst_logit,
        t0.elapsed().as_secs_f64()
    );
    assert!(o.worst_logit < 0.01, "logits differ by {}", o.worst_logit);
    assert!(o.near_ties.is_empty(), "{:?}", o.near_ties);
}

/// `apparate convert`'s output of the same GGUF file: the blocks are the file's, so the logits
/// are bit for bit those of the GGUF-loaded model, and the greedy tokens the reference's.
#[test]
fn the_converted_model_file_generates_the_same() {
    use apparate::format::ModelFile;
    let dir = common::TempDir::new("convert-gguf");
    let out = dir.path("smollm2.apparate");
    let r = apparate::convert::gguf_llama::convert_gguf(&model_path(), &out, None).unwrap();
    assert_eq!(r.tensors, 2 + 30 * 6);
    let file = ModelFile::open(&out).unwrap();
    let from_file = Llama::load_file(common::cpu(), &file).unwrap();
    let g = GgufFile::open(model_path()).unwrap();
    let from_gguf = Llama::load(common::cpu(), &g).unwrap();
    let ids = common::u32s(&common::smollm2_fixture()["cases"][4]["ids"]);
    let logits = |m: &Llama<apparate::backend::CpuBackend>| {
        let mut cache = m.new_cache(KvCacheConfig::default()).unwrap();
        let mut seq = Sequence::new();
        let l = seq.feed(m, &mut cache, &ids, 64).unwrap();
        apparate::backend::Backend::download(m.backend(), &l).unwrap()
    };
    assert_eq!(logits(&from_file), logits(&from_gguf));
    let o = run_model(&from_file, &[0, 4, 12, 19], 16, 32);
    assert_eq!(o.tokens_equal, 64, "{:?}", o.near_ties);
    // The tokenizer, chat template and stop tokens travel with it.
    let lm = apparate::generation::LanguageModel::open(common::cpu(), &out).unwrap();
    let gg = apparate::generation::LanguageModel::open(common::cpu(), model_path()).unwrap();
    assert_eq!(lm.stop, gg.stop);
    let q = "What is the capital of France?";
    assert_eq!(
        lm.prompt_ids(q, false, None).unwrap(),
        gg.prompt_ids(q, false, None).unwrap()
    );
}
