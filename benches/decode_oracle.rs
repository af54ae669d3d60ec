//! How early SmolLM2-135M knows its next token: for greedy generation from the 20 prompts of
//! the transformers fixture (`tests/fixtures/smollm2_golden.json`), the model's own final norm
//! and head applied after every block (a full-vocabulary ramp at each block), compared with the
//! token the whole model chooses. Prints, per block, how often the ramp's top token is the
//! model's and its top-1 minus top-2 probability; the oracle's exit (the earliest block whose
//! top token is the model's) and the depth a margin threshold would give at each agreement.
//! This bounds what per-token exits can save on this model (docs/results.md).
//!
//! `--dump DIR` also writes the raw material of a ramp-adapter experiment
//! (`tools/ramp_adapter_probe.py`): the residual stream after blocks `FIRST_DUMPED..` for every
//! generated token and for teacher-forced text (the repo's docs), the decoded head and the final
//! norm's weights, as little-endian f32 files.
//!
//! ```sh
//! cargo bench --bench decode_oracle -- [--steps 64] [--threads N] [--json out.json] [--dump DIR]
//! ```

use apparate::backend::decoder::DecoderBackend;
use apparate::backend::{Backend, CpuBackend, CpuConfig};
use apparate::gguf::GgufFile;
use apparate::models::llama::{Chunk, KvCacheConfig, Llama, SeqCache};

/// The first block whose output `--dump` writes.
const FIRST_DUMPED: usize = 14;
/// Teacher-forced tokens `--dump` writes, in chunks of `TRAIN_CHUNK` (each its own sequence).
const TRAIN_TOKENS: usize = 12_288;
const TRAIN_CHUNK: usize = 256;

fn put(out: &mut Vec<u8>, v: &[f32]) {
    out.extend(v.iter().flat_map(|x| x.to_le_bytes()));
}

/// Top token and top-1 minus top-2 probability of a logit row, over the tokens `keep` lets
/// through (all, or a shortlist).
fn top2(row: &[f32], keep: impl Fn(usize) -> bool) -> (u32, f32) {
    let (mut i1, mut l1, mut l2) = (0usize, f32::NEG_INFINITY, f32::NEG_INFINITY);
    for (i, &v) in row.iter().enumerate() {
        if !keep(i) {
            continue;
        }
        if v > l1 {
            l2 = l1;
            l1 = v;
            i1 = i;
        } else if v > l2 {
            l2 = v;
        }
    }
    let z: f32 = row
        .iter()
        .enumerate()
        .filter(|&(i, _)| keep(i))
        .map(|(_, &v)| (v - l1).exp())
        .sum();
    (i1 as u32, (1.0 - (l2 - l1).exp()) / z)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let steps: usize = flag("--steps").map_or(64, |v| v.parse().expect("--steps N"));
    let threads = flag("--threads").map(|v| v.parse().expect("--threads N"));
    let be = CpuBackend::new(CpuConfig {
        threads,
        ..Default::default()
    })
    .expect("cpu backend");
    let g = GgufFile::open("weights/smollm2-135m-instruct.q4_1.gguf")
        .expect("the SmolLM2 GGUF (run weights/fetch.sh)");
    let model = Llama::load(be, &g).expect("model");
    let blocks = model.config().blocks;
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string("tests/fixtures/smollm2_golden.json").expect("fixture"),
    )
    .expect("fixture json");
    let mut cache = model.new_cache(KvCacheConfig::default()).unwrap();
    // Per generated token: the model's token, and per block the ramp's (token, margin).
    let mut tokens: Vec<(u32, Vec<(u32, f32)>)> = Vec::new();
    // The same with a shortlist ramp: the `SHORTLIST` lowest token ids (BPE ids follow merge
    // order, so roughly frequency) and every token of the sequence so far.
    let shortlist: usize = flag("--shortlist").map_or(2048, |v| v.parse().expect("--shortlist N"));
    let mut short: Vec<(u32, Vec<(u32, f32)>)> = Vec::new();
    let dump = flag("--dump");
    let (mut eval_h, mut eval_tok) = (Vec::new(), Vec::new());
    for case in fixture["cases"].as_array().unwrap() {
        let ids: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let mut seq = SeqCache::default();
        cache.reserve(&mut seq, ids.len() + steps).unwrap();
        let chunk = Chunk {
            tokens: &ids,
            start: 0,
            table: seq.table(),
        };
        let l = model.forward(&mut cache, &[chunk]).unwrap();
        let mut next = model.backend().argmax(&l).unwrap()[0];
        let mut seen = vec![false; model.config().vocab];
        for &t in &ids {
            seen[t as usize] = true;
        }
        for s in 0..steps {
            seen[next as usize] = true;
            let mut ramps = Vec::with_capacity(blocks);
            let mut sramps = Vec::with_capacity(blocks);
            let tok = [next];
            let chunk = Chunk {
                tokens: &tok,
                start: ids.len() + s,
                table: seq.table(),
            };
            let l = model
                .forward_observed(&mut cache, &[chunk], |b, hid| {
                    let r = model.backend().download(&model.head_logits(hid, &[0])?)?;
                    ramps.push(top2(&r, |_| true));
                    sramps.push(top2(&r, |i| i < shortlist || seen[i]));
                    if dump.is_some() && b >= FIRST_DUMPED {
                        put(
                            &mut eval_h,
                            &model.backend().download(&model.hidden_rows(hid, &[0])?)?,
                        );
                    }
                    Ok(())
                })
                .unwrap();
            next = model.backend().argmax(&l).unwrap()[0];
            tokens.push((next, ramps));
            eval_tok.extend(next.to_le_bytes());
            short.push((next, sramps));
        }
        cache.release(&mut seq);
        eprint!(".");
    }
    eprintln!();
    if let Some(dir) = &dump {
        dump_files(&model, &g, &mut cache, dir, &eval_h, &eval_tok);
    }
    let full = report("full head", &tokens, blocks, steps);
    let shortlisted = report(
        &format!("shortlist of {shortlist} + the sequence's tokens"),
        &short,
        blocks,
        steps,
    );
    if let Some(p) = flag("--json") {
        let doc = serde_json::json!({"full_head": full, "shortlist": shortlisted, "shortlist_size": shortlist});
        std::fs::write(&p, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
        println!("wrote {p}");
    }
}

/// Per-block agreement, the oracle's depth and a margin-threshold sweep, printed and returned.
fn report(
    what: &str,
    tokens: &[(u32, Vec<(u32, f32)>)],
    blocks: usize,
    steps: usize,
) -> serde_json::Value {
    let n = tokens.len() as f64;
    println!("SmolLM2-135M, {n} tokens (20 prompts x {steps}), {what} after each block");
    println!("block  agree  mean margin (agreeing)  mean margin (not)");
    let mut per_block = Vec::new();
    for b in 0..blocks {
        let (mut agree, mut ma, mut mn, mut nn) = (0usize, 0f64, 0f64, 0usize);
        for (t, r) in tokens {
            if r[b].0 == *t {
                agree += 1;
                ma += r[b].1 as f64;
            } else {
                nn += 1;
                mn += r[b].1 as f64;
            }
        }
        let a = agree as f64 / n;
        println!(
            "{b:>5}  {:>5.1}%  {:>8.3}  {:>8.3}",
            100.0 * a,
            ma / agree.max(1) as f64,
            mn / nn.max(1) as f64
        );
        per_block.push(serde_json::json!({"block": b, "agreement": a}));
    }
    // Oracle: the earliest block whose ramp gives the model's token.
    let oracle: Vec<usize> = tokens
        .iter()
        .map(|(t, r)| r.iter().position(|x| x.0 == *t).unwrap_or(blocks - 1))
        .collect();
    let depth = oracle.iter().map(|&b| (b + 1) as f64).sum::<f64>() / n / blocks as f64;
    println!(
        "oracle exit: mean depth {:.1}% of the blocks (blocks run, ramps free)",
        100.0 * depth
    );
    // A single margin threshold over all blocks (exit at the first block whose margin passes):
    // agreement and mean depth at each threshold.
    println!("threshold  agreement  mean depth");
    let mut sweep = Vec::new();
    for th in [0.5f32, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99] {
        let (mut agree, mut d) = (0usize, 0f64);
        for (t, r) in tokens {
            let b = r.iter().position(|x| x.1 >= th).unwrap_or(blocks - 1);
            d += (b + 1) as f64;
            agree += usize::from(r[b].0 == *t);
        }
        println!(
            "{th:>9.2}  {:>8.1}%  {:>9.1}%",
            100.0 * agree as f64 / n,
            100.0 * d / n / blocks as f64
        );
        sweep.push(serde_json::json!({"threshold": th, "agreement": agree as f64 / n, "depth": d / n / blocks as f64}));
    }
    serde_json::json!({"tokens": n, "per_block": per_block, "oracle_depth": depth, "sweep": sweep})
}

/// Writes the adapter experiment's files (see the module docs) into `dir`.
fn dump_files(
    model: &Llama<CpuBackend>,
    g: &GgufFile,
    cache: &mut apparate::models::llama::KvCache<CpuBackend>,
    dir: &str,
    eval_h: &[u8],
    eval_tok: &[u8],
) {
    std::fs::create_dir_all(dir).unwrap();
    let w = |name: &str, bytes: &[u8]| std::fs::write(format!("{dir}/{name}"), bytes).unwrap();
    w("eval_h.bin", eval_h);
    w("eval_tok.bin", eval_tok);
    let e = g.tensor("token_embd.weight").expect("token_embd.weight");
    let cols = e.dims[0] as usize;
    let mut head = vec![0f32; e.dims[1] as usize * cols];
    apparate::quant::dequantize_rows(e.ggml_type, g.data(e), cols, &mut head).unwrap();
    let mut bytes = Vec::new();
    put(&mut bytes, &head);
    w("head.bin", &bytes);
    let n = g.tensor("output_norm.weight").expect("output_norm.weight");
    let gamma: Vec<f32> = g
        .data(n)
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    bytes.clear();
    put(&mut bytes, &gamma);
    w("gamma.bin", &bytes);
    // Teacher-forced text: the repo's docs, tokenized raw.
    let tok = apparate::gguf::tokenizer::tokenizer(g).unwrap();
    let mut text = String::new();
    for f in [
        "README.md",
        "docs/architecture.md",
        "docs/format.md",
        "docs/results.md",
    ] {
        text.push_str(&std::fs::read_to_string(f).unwrap_or_default());
    }
    let ids = tok.encode(text.as_str(), false).unwrap().get_ids().to_vec();
    let mut train = Vec::new();
    let rows: Vec<u32> = (0..TRAIN_CHUNK as u32).collect();
    for part in ids
        .chunks_exact(TRAIN_CHUNK)
        .take(TRAIN_TOKENS / TRAIN_CHUNK)
    {
        let mut seq = SeqCache::default();
        cache.reserve(&mut seq, TRAIN_CHUNK).unwrap();
        let chunk = Chunk {
            tokens: part,
            start: 0,
            table: seq.table(),
        };
        // Per block, then reordered to [token, block, width].
        let mut per_block: Vec<Vec<f32>> = Vec::new();
        model
            .forward_observed(cache, &[chunk], |b, hid| {
                if b >= FIRST_DUMPED {
                    per_block.push(model.backend().download(&model.hidden_rows(hid, &rows)?)?);
                }
                Ok(())
            })
            .unwrap();
        let width = per_block[0].len() / TRAIN_CHUNK;
        for t in 0..TRAIN_CHUNK {
            for b in &per_block {
                put(&mut train, &b[t * width..(t + 1) * width]);
            }
        }
        cache.release(&mut seq);
    }
    w("train_h.bin", &train);
    eprintln!(
        "wrote {dir}: {} training tokens",
        train.len() / 4 / 576 / 16
    );
}
