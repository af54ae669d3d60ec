//! Decoder models in our format: block-quantized storage (Q4_1/Q8_0 matrices as `u8` rows
//! named in the `apparate.blocks` entry) on a tiny random llama model: it writes, opens and
//! runs alike on the CPU and the emulated GPU; files whose blocks do not match their
//! configuration, or whose blocks entry is malformed, are refused naming the tensor and the
//! problem.

mod common;

use std::collections::{BTreeMap, HashMap};

use apparate::backend::decoder::DecoderBackend;
use apparate::backend::emu::{EmuConfig, EmuDevice};
use apparate::backend::gpu::GpuBackend;
use apparate::format::llama_config::LlamaFileConfig;
use apparate::format::meta::{
    FORMAT_VERSION, Family, FileKind, ModelMeta, Preprocessing, TOKENIZER_ENTRY,
};
use apparate::format::{BLOCKS_ENTRY, ModelFile, OwnedTensor, write_model};
use apparate::gguf::GgmlType;
use apparate::models::llama::{KvCacheConfig, Llama, Sequence};
use apparate::quant::quantize;
use apparate::rng::SplitMix;
use apparate::tensor::DType;

fn config(types: GgmlType) -> LlamaFileConfig {
    let mut c = LlamaFileConfig {
        blocks: 2,
        width: 64,
        ffn: 96,
        heads: 2,
        kv_heads: 1,
        head_dim: 32,
        rope_base: 10000.0,
        eps: 1e-5,
        vocab: 40,
        context: 64,
        tied: true,
        matrix_types: BTreeMap::new(),
        stop_tokens: vec![1],
        chat_template: None,
        bos_token: String::new(),
        eos_token: String::new(),
    };
    c.matrix_types = c
        .matrices()
        .into_iter()
        .map(|(n, _)| (n, types.name().to_string()))
        .collect();
    c
}

fn tensors(c: &LlamaFileConfig, ty: GgmlType) -> Vec<(String, OwnedTensor)> {
    let mut r = SplitMix::new(7);
    let mut v: Vec<(String, OwnedTensor)> = c
        .matrices()
        .into_iter()
        .map(|(n, s)| {
            let vals: Vec<f32> = (0..s[0] * s[1]).map(|_| r.uniform() * 0.2).collect();
            let t = OwnedTensor::from_blocks(ty, s[0], s[1], quantize(ty, &vals).unwrap()).unwrap();
            (n, t)
        })
        .collect();
    for (n, s) in c.expected_tensors() {
        if s.len() == 1 {
            let vals: Vec<f32> = (0..s[0]).map(|_| 1.0 + 0.1 * r.uniform()).collect();
            v.push((n, OwnedTensor::from_f32(&vals, s, DType::F32)));
        }
    }
    v
}

fn meta(c: LlamaFileConfig) -> ModelMeta {
    ModelMeta {
        format_version: FORMAT_VERSION,
        kind: FileKind::Model,
        graph: c.stage_graph(),
        preprocessing: Preprocessing::Text {
            tokenizer_entry: TOKENIZER_ENTRY.into(),
            max_length: c.context,
        },
        family: Family::Llama(c),
        head: None,
        provenance: Vec::new(),
    }
}

fn write(
    dir: &common::TempDir,
    name: &str,
    c: LlamaFileConfig,
    t: Vec<(String, OwnedTensor)>,
) -> std::path::PathBuf {
    let p = dir.path(name);
    write_model(&p, &meta(c), &[(TOKENIZER_ENTRY.into(), "{}".into())], t).unwrap();
    p
}

fn logits<B: DecoderBackend>(be: B, file: &ModelFile) -> Vec<f32> {
    let m = Llama::load_file(be, file).unwrap();
    let mut cache = m.new_cache(KvCacheConfig::default()).unwrap();
    let mut seq = Sequence::new();
    seq.feed(&m, &mut cache, &[3, 9, 27, 5, 11], 3).unwrap();
    let l = seq.feed(&m, &mut cache, &[7], 1).unwrap();
    m.backend().download(&l).unwrap()
}

#[test]
fn a_block_quantized_model_file_runs_on_every_backend() {
    let dir = common::TempDir::new("llama-format");
    for ty in [GgmlType::Q4_1, GgmlType::Q8_0] {
        let c = config(ty);
        let p = write(
            &dir,
            &format!("tiny-{ty}.apparate"),
            c.clone(),
            tensors(&c, ty),
        );
        let f = ModelFile::open(&p).unwrap();
        let (got_ty, shape, bytes) = f.blocks("blk.0.attn_qkv.weight").unwrap();
        assert_eq!((got_ty, shape), (ty, [128, 64]));
        assert_eq!(bytes.len(), 128 * ty.row_bytes(64).unwrap() as usize);
        assert!(
            f.tensor("blk.0.attn_qkv.weight")
                .unwrap_err()
                .to_string()
                .contains("blocks")
        );
        let cpu = logits(common::cpu(), &f);
        let emu = logits(
            GpuBackend::new(EmuDevice::new(EmuConfig::default()).unwrap(), DType::F32),
            &f,
        );
        let err: f32 = cpu
            .iter()
            .zip(&emu)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(err < 1e-4, "{ty}: cpu and emu logits differ by {err}");
    }
}

#[test]
fn blocks_that_do_not_match_the_configuration_are_refused() {
    let dir = common::TempDir::new("llama-format-bad");
    // The configuration says Q4_1, the file holds Q8_0 blocks.
    let p = write(
        &dir,
        "mismatch.apparate",
        config(GgmlType::Q4_1),
        tensors(&config(GgmlType::Q8_0), GgmlType::Q8_0),
    );
    let e = ModelFile::open(&p).err().expect("refused").to_string();
    assert!(
        e.contains("stored as Q8_0 blocks, the configuration says Q4_1 blocks"),
        "{e}"
    );
    // A configuration that names a block type without kernels.
    let mut c = config(GgmlType::Q8_0);
    c.matrix_types
        .insert("blk.0.ffn_down.weight".into(), "Q5_K".into());
    assert!(meta(c).validate().unwrap_err().contains("Q5_K"));
}

/// Containers written by hand: a `u8` tensor the blocks entry does not name, a block type this
/// format does not store, an entry naming a missing tensor, rows that are not whole blocks.
#[test]
fn malformed_block_storage_is_refused_by_name() {
    let dir = common::TempDir::new("llama-format-raw");
    let c = config(GgmlType::Q8_0);
    let meta_json = serde_json::to_string(&meta(c.clone())).unwrap();
    let write_raw = |name: &str, blocks: Option<&str>, row_bytes: usize| {
        let mut md = HashMap::new();
        md.insert("apparate".to_string(), meta_json.clone());
        md.insert(TOKENIZER_ENTRY.to_string(), "{}".to_string());
        if let Some(b) = blocks {
            md.insert(BLOCKS_ENTRY.to_string(), b.to_string());
        }
        let data = vec![0u8; 40 * row_bytes];
        let view = safetensors::tensor::TensorView::new(
            safetensors::Dtype::U8,
            vec![40, row_bytes],
            &data,
        )
        .unwrap();
        let p = dir.path(name);
        safetensors::serialize_to_file([("token_embd.weight", view)], Some(md), &p).unwrap();
        ModelFile::open(&p).err().expect("refused").to_string()
    };
    let e = write_raw("no-entry.apparate", None, 68);
    assert!(e.contains("token_embd.weight") && e.contains("U8"), "{e}");
    let e = write_raw(
        "k-quant.apparate",
        Some(r#"{"token_embd.weight": "Q5_K"}"#),
        68,
    );
    assert!(e.contains("Q5_K") && e.contains("Q4_1 or Q8_0"), "{e}");
    let e = write_raw(
        "missing.apparate",
        Some(r#"{"token_embd.weight": "Q8_0", "ghost": "Q8_0"}"#),
        68,
    );
    assert!(e.contains("ghost"), "{e}");
    let e = write_raw(
        "ragged.apparate",
        Some(r#"{"token_embd.weight": "Q8_0"}"#),
        67,
    );
    assert!(e.contains("not whole 34-byte blocks"), "{e}");
    let e = write_raw("not-json.apparate", Some("[1, 2]"), 68);
    assert!(e.contains(BLOCKS_ENTRY), "{e}");
}
