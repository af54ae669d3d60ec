//! The BERT family on the CPU backend with random tiny models: padding invariance, f16/bf16
//! storage, input validation, and the converter's error messages.

mod common;

use apparate::backend::{BatchShape, CpuBackend, CpuConfig};
use apparate::convert::hf_bert::{ConvertOptions, convert};
use apparate::format::ModelFile;
use apparate::models::bert::EncoderInput;
use apparate::models::bert::synthetic::{tiny_config, tiny_tokenizer_json, write_random_bert};
use apparate::pipeline::TextModel;
use apparate::rng::SplitMix;
use apparate::tensor::DType;
use common::*;
use proptest::prelude::*;

fn tiny_model(dir: &TempDir, dtype: DType) -> TextModel<apparate::backend::CpuBackend> {
    let p = dir.path(&format!("tiny-{dtype}.apparate"));
    write_random_bert(&p, &tiny_config(), Some(5), dtype, 42).unwrap();
    TextModel::load(cpu(), &p).unwrap()
}

fn random_ids(rng: &mut SplitMix, len: usize, vocab: usize) -> Vec<u32> {
    let mut ids = vec![2u32];
    ids.extend((1..len - 1).map(|_| 4 + rng.below(vocab - 4) as u32));
    ids.push(3);
    ids
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn padding_never_changes_a_result(lens in proptest::collection::vec(2usize..=16, 1..6), seed in any::<u64>()) {
        let dir = TempDir::new("pad");
        let model = tiny_model(&dir, DType::F32);
        let mut rng = SplitMix::new(seed);
        let vocab = tiny_config().vocab_size;
        let ids: Vec<Vec<u32>> = lens.iter().map(|&l| random_ids(&mut rng, l, vocab)).collect();
        let masks: Vec<Vec<u32>> = ids.iter().map(|s| vec![1; s.len()]).collect();
        let batch = EncoderInput::from_ids_and_masks(&ids, &masks, 0).unwrap();
        let together = model.encoder.forward(&batch).unwrap();
        for (i, s) in ids.iter().enumerate() {
            let alone = EncoderInput::from_ids_and_masks(std::slice::from_ref(s), &[vec![1; s.len()]], 0).unwrap();
            let out = model.encoder.forward(&alone).unwrap();
            prop_assert!(max_abs_diff(out.embedding(0), together.embedding(i)) <= 1e-5);
            let p = out.probs.as_ref().unwrap();
            let q = together.probs.as_ref().unwrap();
            prop_assert!(max_abs_diff(p, &q[i * 5..(i + 1) * 5]) <= 1e-5);
        }
    }
}

#[test]
fn half_storage_is_upcast_exactly() {
    // An f16 (bf16) file must give the same results as an f32 file holding the rounded values.
    let dir = TempDir::new("half");
    for dt in [DType::F16, DType::BF16] {
        let half = dir.path(&format!("m-{dt}.apparate"));
        write_random_bert(&half, &tiny_config(), Some(5), dt, 9).unwrap();
        let hf = ModelFile::open(&half).unwrap();
        let meta = hf.meta().clone();
        let tensors = meta
            .expected_tensors()
            .into_iter()
            .map(|(n, s)| {
                let v = hf.tensor(&n).unwrap().to_f32().into_owned();
                (
                    n,
                    apparate::format::OwnedTensor::from_f32(&v, s, DType::F32),
                )
            })
            .collect();
        let full = dir.path(&format!("m-{dt}-as-f32.apparate"));
        apparate::format::write_model(
            &full,
            &meta,
            &[("tokenizer.json".into(), tiny_tokenizer_json())],
            tensors,
        )
        .unwrap();
        // In f32: the bf16 kernels (which round activations too) switched off.
        let f32_cpu = || {
            CpuBackend::new(CpuConfig {
                bf16: Some(false),
                ..Default::default()
            })
            .unwrap()
        };
        let a = TextModel::load(f32_cpu(), &half).unwrap();
        let b = TextModel::load(f32_cpu(), &full).unwrap();
        let texts = ["the cat sat on the mat", "a dog ran far ."];
        let (oa, _) = a.run(&texts).unwrap();
        let (ob, _) = b.run(&texts).unwrap();
        assert_eq!(oa.embeddings, ob.embeddings, "{dt}");
        // The default backend: a bf16 file's products on the bf16 kernels where the CPU has
        // them (f32 elsewhere), close to the f32 run of the same weights.
        let be = cpu();
        let kernels = be.bf16();
        let (od, _) = TextModel::load(be, &half).unwrap().run(&texts).unwrap();
        for i in 0..2 {
            let c = cosine(od.embedding(i), ob.embedding(i));
            assert!(c > 0.999, "{dt} (bf16 kernels: {kernels}): cosine {c}");
        }
        if dt == DType::BF16 && kernels {
            assert_ne!(od.embeddings, ob.embeddings, "the bf16 kernels did not run");
        }
        // And the half model stays close to the f32 original it was rounded from.
        let orig = dir.path("orig.apparate");
        write_random_bert(&orig, &tiny_config(), Some(5), DType::F32, 9).unwrap();
        let (oc, _) = TextModel::load(cpu(), &orig).unwrap().run(&texts).unwrap();
        for i in 0..2 {
            assert!(cosine(oa.embedding(i), oc.embedding(i)) > 0.99, "{dt}");
        }
    }
}

#[test]
fn tokenizer_fixed_padding_is_turned_off() {
    let dir = TempDir::new("tok");
    let model = tiny_model(&dir, DType::F32);
    // The synthetic tokenizer.json pads to 16 like MiniLM's pads to 128.
    let input = model.tokenizer.encode(&["the cat", "a dog ran"]).unwrap();
    assert_eq!(input.shape.seq, 5);
    assert_eq!(input.shape.lengths, vec![4, 5]);
    assert_eq!(&input.ids[..5], &[2, 4, 5, 3, 0]);
}

#[test]
fn tokenizer_larger_than_the_vocabulary_is_refused() {
    let dir = TempDir::new("vocab");
    let mut c = tiny_config();
    c.vocab_size = 10; // the synthetic tokenizer has 16 tokens
    let p = dir.path("small-vocab.apparate");
    write_random_bert(&p, &c, None, DType::F32, 3).unwrap();
    let e = TextModel::load(cpu(), &p)
        .err()
        .expect("accepted")
        .to_string();
    assert!(
        e.contains("small-vocab.apparate") && e.contains("16 tokens"),
        "{e}"
    );
}

#[test]
fn classify_returns_labels_best_first() {
    let dir = TempDir::new("cls");
    let model = tiny_model(&dir, DType::F32);
    let (preds, _) = model.classify(&["the cat sat", "dogs ran"], 3).unwrap();
    assert_eq!(preds.len(), 2);
    for p in &preds {
        assert_eq!(p.len(), 3);
        assert!(p[0].probability >= p[1].probability && p[1].probability >= p[2].probability);
        assert!(p[0].label.starts_with("class"));
    }
}

#[test]
fn bad_inputs_are_errors() {
    let dir = TempDir::new("badin");
    let model = tiny_model(&dir, DType::F32);
    let e = model.run(&[]).unwrap_err().to_string();
    assert!(e.contains("no texts"), "{e}");

    let e = EncoderInput::from_ids_and_masks(&[vec![2, 4, 3]], &[vec![1, 0, 1]], 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("ones then zeros"), "{e}");
    let e = EncoderInput::from_ids_and_masks(&[vec![2, 4]], &[vec![1, 1, 1]], 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("mask of 3"), "{e}");

    let bad_id = EncoderInput::from_ids_and_masks(&[vec![2, 999, 3]], &[vec![1, 1, 1]], 0).unwrap();
    let e = model.encoder.forward(&bad_id).unwrap_err().to_string();
    assert!(e.contains("token id 999"), "{e}");

    let long = EncoderInput {
        ids: vec![4; 40],
        type_ids: vec![0; 40],
        shape: BatchShape {
            seq: 40,
            lengths: vec![40],
        },
    };
    let e = model.encoder.forward(&long).unwrap_err().to_string();
    assert!(e.contains("40 tokens") && e.contains("32 positions"), "{e}");

    let ok = EncoderInput::from_ids_and_masks(&[vec![2, 3]], &[vec![1, 1]], 0).unwrap();
    let x = model.encoder.embed(&ok).unwrap();
    let e = model.encoder.layer(7, &x, &ok.shape);
    assert!(e.unwrap_err().to_string().contains("layer 7"));
}

/// Writes a Hugging Face style BERT folder from a random tiny model.
fn hf_folder(
    dir: &TempDir,
    mutate: impl Fn(&mut Vec<(String, Vec<usize>, Vec<f32>)>, &mut serde_json::Value),
) -> std::path::PathBuf {
    let c = tiny_config();
    let (h, f) = (c.hidden_size, c.intermediate_size);
    let mut rng = SplitMix::new(5);
    let mut t = |name: &str, shape: Vec<usize>| {
        let n = shape.iter().product();
        (
            name.to_string(),
            shape,
            (0..n).map(|_| rng.uniform() * 0.1).collect::<Vec<f32>>(),
        )
    };
    let mut tensors = vec![
        t("embeddings.word_embeddings.weight", vec![c.vocab_size, h]),
        t(
            "embeddings.position_embeddings.weight",
            vec![c.max_position_embeddings, h],
        ),
        t("embeddings.token_type_embeddings.weight", vec![2, h]),
        t("embeddings.LayerNorm.weight", vec![h]),
        t("embeddings.LayerNorm.bias", vec![h]),
    ];
    for i in 0..c.num_layers {
        let p = format!("encoder.layer.{i}");
        for (n, s) in [
            ("attention.self.query.weight", vec![h, h]),
            ("attention.self.query.bias", vec![h]),
            ("attention.self.key.weight", vec![h, h]),
            ("attention.self.key.bias", vec![h]),
            ("attention.self.value.weight", vec![h, h]),
            ("attention.self.value.bias", vec![h]),
            ("attention.output.dense.weight", vec![h, h]),
            ("attention.output.dense.bias", vec![h]),
            ("attention.output.LayerNorm.weight", vec![h]),
            ("attention.output.LayerNorm.bias", vec![h]),
            ("intermediate.dense.weight", vec![f, h]),
            ("intermediate.dense.bias", vec![f]),
            ("output.dense.weight", vec![h, f]),
            ("output.dense.bias", vec![h]),
            ("output.LayerNorm.weight", vec![h]),
            ("output.LayerNorm.bias", vec![h]),
        ] {
            tensors.push(t(&format!("{p}.{n}"), s));
        }
    }
    let mut config = serde_json::json!({
        "model_type": "bert", "hidden_act": "gelu", "vocab_size": c.vocab_size,
        "hidden_size": h, "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "intermediate_size": f, "max_position_embeddings": c.max_position_embeddings,
        "type_vocab_size": 2, "layer_norm_eps": 1e-12
    });
    mutate(&mut tensors, &mut config);
    let folder = dir.path("hf");
    std::fs::create_dir_all(&folder).unwrap();
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(n, s, v)| (n, s, bytemuck::cast_slice(&v).to_vec()))
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &folder.join("model.safetensors")).unwrap();
    std::fs::write(folder.join("config.json"), config.to_string()).unwrap();
    std::fs::write(folder.join("tokenizer.json"), tiny_tokenizer_json()).unwrap();
    folder
}

#[test]
fn converter_round_trip_and_errors() {
    let dir = TempDir::new("conv");
    let ok = hf_folder(&dir, |_, _| {});
    let out = dir.path("ok.apparate");
    for dt in [DType::F32, DType::F16, DType::BF16] {
        let opts = ConvertOptions {
            dtype: dt,
            ..ConvertOptions::default()
        };
        let r = convert(&ok, &out, &opts).unwrap();
        assert_eq!(r.tensors, 5 + 2 * 12);
        let m = TextModel::load(cpu(), &out).unwrap();
        m.run(&["the cat"]).unwrap();
    }

    let dir2 = TempDir::new("conv-missing");
    let missing = hf_folder(&dir2, |t, _| {
        t.retain(|x| x.0 != "encoder.layer.1.attention.self.key.bias")
    });
    let e = convert(
        &missing,
        &dir2.path("m.apparate"),
        &ConvertOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("encoder.layer.1.attention.self.key.bias") && e.contains("missing"),
        "{e}"
    );

    let dir3 = TempDir::new("conv-act");
    let act = hf_folder(&dir3, |_, c| c["hidden_act"] = "gelu_new".into());
    let e = convert(&act, &dir3.path("m.apparate"), &ConvertOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("config.json") && e.contains("gelu_new"), "{e}");

    let dir4 = TempDir::new("conv-shape");
    let shape = hf_folder(&dir4, |_, c| c["intermediate_size"] = 25.into());
    let e = convert(&shape, &dir4.path("m.apparate"), &ConvertOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("intermediate.dense.weight") && e.contains("expected [25, 16]"),
        "{e}"
    );

    let e = convert(
        &dir.path("nope"),
        &dir.path("x.apparate"),
        &ConvertOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("nope") && e.contains("not a directory"), "{e}");
}

#[test]
fn broken_tokenizer_template_is_an_error_not_a_panic() {
    // A template that names a special token the tokenizer does not define parses, but makes the
    // tokenizers crate panic on encode.
    let json = tiny_tokenizer_json().replacen(
        "\"[CLS]\":{\"id\":\"[CLS]\",\"ids\"",
        "\"[XLS]\":{\"id\":\"[XLS]\",\"ids\"",
        1,
    );
    assert!(json.contains("[XLS]"));
    let e = apparate::tokenize::TextTokenizer::from_json(&json, 16)
        .err()
        .expect("accepted")
        .to_string();
    assert!(e.contains("tokenizer.json does not work"), "{e}");
}
