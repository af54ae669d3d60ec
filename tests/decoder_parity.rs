//! The decoder ops (`DecoderBackend`) on the emulated GPU, in f32, f16 and bf16, against the
//! CPU backend: quantized products and embeddings (Q4_1, Q8_0), RMSNorm with and without the
//! residual (both row kernels: one block per row and one warp per row, at widths that the
//! warp kernel takes and ones it leaves to the block kernel), rotary embeddings, attention over
//! a paged cache (a prefill chunk and decode rows of other sequences in one step, then a decode
//! step alone; non-contiguous block tables; the simple and the split-KV flash kernel, the latter
//! also in short chunks), SwiGLU, row selection and argmax. Outputs are poisoned before every launch. Relative L2 error <= 1e-5 in f32 and
//! <= 1e-2 in f16/bf16 (inputs rounded to the dtype first, so both sides see the same values).
//! `decoder_ops_on_a_real_gpu` runs the same on a CUDA device (ignored without one).

mod common;

use std::sync::Arc;

use apparate::backend::Backend;
use apparate::backend::cuda::{CudaConfig, CudaDevice};
use apparate::backend::decoder::{DecoderBackend, Heads, KvLayer, KvPlan};
use apparate::backend::device::Device;
use apparate::backend::emu::{EmuConfig, EmuDevice};
use apparate::backend::gpu::{AttentionKernel, GpuBackend, KvSplit, RowKernel};
use apparate::gguf::GgmlType;
use apparate::quant::quantize;
use apparate::rng::SplitMix;
use apparate::tensor::DType;

fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut r = SplitMix::new(seed);
    (0..n).map(|_| r.uniform() * scale).collect()
}

/// `v` as the dtype stores it.
fn round(dt: DType, v: &[f32]) -> Vec<f32> {
    match dt {
        DType::F32 => v.to_vec(),
        DType::F16 => v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect(),
        DType::BF16 => v
            .iter()
            .map(|&x| half::bf16::from_f32(x).to_f32())
            .collect(),
    }
}

fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
        .sum();
    let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

fn tol(dt: DType) -> f64 {
    if dt == DType::F32 { 1e-5 } else { 1e-2 }
}

fn same(what: &str, dt: DType, got: &[f32], want: &[f32]) {
    assert!(
        got.iter().all(|v| v.is_finite()),
        "{what} ({dt}): non-finite output (unwritten?)"
    );
    let e = rel_err(got, want);
    assert!(e <= tol(dt), "{what} ({dt}): relative error {e:.2e}");
}

fn up<B: Backend>(be: &B, dt: DType, v: &[f32], shape: &[usize]) -> B::Tensor {
    be.upload(&round(dt, v), shape).unwrap()
}

fn run_all<D: Device>(label: &str, dev: Arc<D>) {
    let cpu = common::cpu();
    for dt in [DType::F32, DType::F16, DType::BF16] {
        let gpu = GpuBackend::shared(dev.clone(), dt).with_poisoned_outputs();
        let name = |op: &str| format!("{label} {op}");
        quantized(&name("qlinear/qembed"), dt, &gpu, &cpu);
        norms_and_rows(&name("rows"), dt, &gpu, &cpu);
        for rows in [RowKernel::Block, RowKernel::Warp] {
            let g = GpuBackend::shared(dev.clone(), dt)
                .with_poisoned_outputs()
                .with_rows(rows);
            // Widths: odd multiples of 8 (the warp kernel's vectors in f16/bf16), SmolLM2's
            // 576, the warp kernel's largest (2048), and ones it leaves to the block kernel
            // (198: not whole 16-byte vectors in any dtype; 2056: too wide).
            for (m, cols) in [(5, 200), (9, 576), (3, 198), (6, 2048), (2, 2056)] {
                rms_norms(
                    &name(&format!("{rows:?} {m}x{cols}")),
                    dt,
                    &g,
                    &cpu,
                    m,
                    cols,
                );
            }
        }
        // Both attention kernels; the flash one also in chunks of 5 keys (many chunks, some
        // past a row's last position). Head dimensions: 64, 40 (vectors for lane groups not a
        // power of two), 256 (32 vectors in f16/bf16; too wide for flash in f32) and 36 (not
        // whole vectors in f16/bf16: the simple kernel runs).
        let kernels = [
            (AttentionKernel::Simple, KvSplit::default()),
            (AttentionKernel::Flash, KvSplit::default()),
            (
                AttentionKernel::Flash,
                KvSplit {
                    target_blocks: 4096,
                    min_chunk: 5,
                    max_chunk: 5,
                },
            ),
        ];
        for (kernel, split) in kernels {
            let g = GpuBackend::shared(dev.clone(), dt)
                .with_poisoned_outputs()
                .with_attention(kernel)
                .with_kv_split(split);
            // (head dim, query heads, key/value heads): 2 and 4 query heads per key/value
            // head, and one each.
            for (hd, qh, kvh) in [
                (64, 4, 2),
                (40, 4, 2),
                (256, 4, 2),
                (36, 4, 2),
                (64, 8, 2),
                (32, 3, 3),
            ] {
                let what = format!(
                    "kv_attention {kernel:?} chunk>={} d={hd} heads {qh}/{kvh}",
                    split.min_chunk
                );
                let heads = Heads {
                    heads: qh,
                    kv_heads: kvh,
                    head_dim: hd,
                };
                attention(&name(&what), dt, &g, &cpu, heads);
            }
            // Long contexts: a decode row over 301 and 151 cached positions, so the default
            // split runs several chunks per row (64 keys at least) and the combine adds them;
            // head dimension 128 (Llama-class models') with 4 query heads per key/value head,
            // and 64 with one each.
            for (hd, qh, kvh) in [(128, 8, 2), (64, 4, 4)] {
                let what = format!(
                    "kv_attention {kernel:?} chunk>={} long context d={hd} heads {qh}/{kvh}",
                    split.min_chunk
                );
                let heads = Heads {
                    heads: qh,
                    kv_heads: kvh,
                    head_dim: hd,
                };
                long_context(&name(&what), dt, &g, &cpu, heads);
            }
        }
    }
}

/// One decode row each for two sequences whose caches already hold 300 and 150 positions
/// (random keys and values uploaded to both sides, as earlier steps would have written them),
/// in blocks of 16 spread over the cache out of order.
fn long_context<G: DecoderBackend>(
    what: &str,
    dt: DType,
    g: &G,
    c: &apparate::backend::CpuBackend,
    heads: Heads,
) {
    let (bs, blocks) = (16, 32);
    // A takes 20 blocks in a scattered order (7 is prime to 32), B the 12 others, reversed.
    let a_table: Vec<u32> = (0..20).map(|i| (i * 7 % 32) as u32).collect();
    let b_table: Vec<u32> = (0..32u32).rev().filter(|b| !a_table.contains(b)).collect();
    assert_eq!(b_table.len(), 12);
    let kvw = heads.kv_width();
    let slots = bs * blocks;
    let (mut kg, mut kc) = (
        g.alloc_kv_layer(slots, kvw).unwrap(),
        c.alloc_kv_layer(slots, kvw).unwrap(),
    );
    let (k, v) = (values(slots * kvw, 70, 2.0), values(slots * kvw, 71, 1.0));
    kg.k = up(g, dt, &k, &[slots, kvw]);
    kg.v = up(g, dt, &v, &[slots, kvw]);
    kc.k = up(c, dt, &k, &[slots, kvw]);
    kc.v = up(c, dt, &v, &[slots, kvw]);
    let mut plan = KvPlan::new(bs, blocks);
    plan.push(&a_table, 300, 1).unwrap();
    plan.push(&b_table, 150, 1).unwrap();
    let qkv = round(dt, &values(plan.rows() * heads.qkv_width(), 72, 2.0));
    let og = attend(g, dt, &qkv, &mut kg, &plan, heads);
    let oc = attend(c, dt, &qkv, &mut kc, &plan, heads);
    same(&format!("{what} attention"), dt, &og, &oc);
}

/// One `kv_attention` step of `plan` on `be` over `qkv` (rows of the plan), downloaded.
fn attend<B: DecoderBackend>(
    be: &B,
    dt: DType,
    qkv: &[f32],
    cache: &mut KvLayer<B::Tensor>,
    plan: &KvPlan,
    heads: Heads,
) -> Vec<f32> {
    let x = up(be, dt, qkv, &[plan.rows(), heads.qkv_width()]);
    let p = be.upload_plan(plan).unwrap();
    be.download(&be.kv_attention(&x, cache, &p, heads).unwrap())
        .unwrap()
}

fn quantized<G: DecoderBackend>(what: &str, dt: DType, g: &G, c: &apparate::backend::CpuBackend) {
    let (rows, cols) = (37, 96);
    for ty in [GgmlType::Q4_1, GgmlType::Q8_0] {
        let w = quantize(ty, &values(rows * cols, 1, 1.0)).unwrap();
        let (wg, wc) = (
            g.load_quantized(ty, rows, cols, &w).unwrap(),
            c.load_quantized(ty, rows, cols, &w).unwrap(),
        );
        for m in [1, 5, 8, 9, 17] {
            let x = values(m * cols, 2 + m as u64, 2.0);
            let yg = g
                .download(&g.qlinear(&up(g, dt, &x, &[m, cols]), &wg).unwrap())
                .unwrap();
            let yc = c
                .download(&c.qlinear(&up(c, dt, &x, &[m, cols]), &wc).unwrap())
                .unwrap();
            same(&format!("{what} {ty} qlinear m={m}"), dt, &yg, &yc);
        }
        let ids = [3u32, 0, 36, 3];
        let eg = g.download(&g.embed_quantized(&ids, &wg).unwrap()).unwrap();
        let ec = c.download(&c.embed_quantized(&ids, &wc).unwrap()).unwrap();
        same(&format!("{what} {ty} embed"), dt, &eg, &round(dt, &ec));
        // Refused alike: a token outside the table, an input of the wrong width.
        assert!(g.embed_quantized(&[37], &wg).is_err() && c.embed_quantized(&[37], &wc).is_err());
        let bad = up(g, dt, &values(2 * 64, 9, 1.0), &[2, 64]);
        let e = g.qlinear(&bad, &wg).err().expect("refused").to_string();
        assert!(e.contains("qlinear") && e.contains("96"), "{e}");
    }
}

/// Residual + RMSNorm of `m` rows of `cols`, with and without the residual, against the CPU.
fn rms_norms<G: DecoderBackend>(
    what: &str,
    dt: DType,
    g: &G,
    c: &apparate::backend::CpuBackend,
    m: usize,
    cols: usize,
) {
    let x = values(m * cols, 11, 3.0);
    let r = values(m * cols, 12, 3.0);
    let gamma = values(cols, 13, 1.5);
    for with_res in [false, true] {
        let run = |be: &dyn Fn(bool) -> (Option<Vec<f32>>, Vec<f32>)| be(with_res);
        let gr = run(&|res| {
            let (h, y) = g
                .rms_norm(
                    &up(g, dt, &x, &[m, cols]),
                    res.then(|| up(g, dt, &r, &[m, cols])).as_ref(),
                    &up(g, dt, &gamma, &[cols]),
                    1e-5,
                )
                .unwrap();
            (h.map(|h| g.download(&h).unwrap()), g.download(&y).unwrap())
        });
        let cr = run(&|res| {
            let (h, y) = c
                .rms_norm(
                    &up(c, dt, &x, &[m, cols]),
                    res.then(|| up(c, dt, &r, &[m, cols])).as_ref(),
                    &up(c, dt, &gamma, &[cols]),
                    1e-5,
                )
                .unwrap();
            (h.map(|h| c.download(&h).unwrap()), c.download(&y).unwrap())
        });
        same(&format!("{what} rms_norm res={with_res}"), dt, &gr.1, &cr.1);
        assert_eq!(gr.0.is_some(), with_res);
        if let (Some(a), Some(b)) = (gr.0, cr.0) {
            same(&format!("{what} rms_norm sum"), dt, &a, &b);
        }
    }
}

fn norms_and_rows<G: DecoderBackend>(
    what: &str,
    dt: DType,
    g: &G,
    c: &apparate::backend::CpuBackend,
) {
    let (m, cols) = (5, 200);
    let x = values(m * cols, 11, 3.0);
    // SwiGLU, row selection, argmax.
    let gu = values(m * 2 * 48, 14, 4.0);
    let sg = g
        .download(&g.silu_mul(&up(g, dt, &gu, &[m, 96])).unwrap())
        .unwrap();
    let sc = c
        .download(&c.silu_mul(&up(c, dt, &gu, &[m, 96])).unwrap())
        .unwrap();
    same(&format!("{what} silu_mul"), dt, &sg, &sc);
    let rows = [4u32, 0, 4];
    let xg = up(g, dt, &x, &[m, cols]);
    let xc = up(c, dt, &x, &[m, cols]);
    same(
        &format!("{what} select_rows"),
        dt,
        &g.download(&g.select_rows(&xg, &rows).unwrap()).unwrap(),
        &c.download(&c.select_rows(&xc, &rows).unwrap()).unwrap(),
    );
    assert!(g.select_rows(&xg, &[5]).is_err() && c.select_rows(&xc, &[5]).is_err());
    // Argmax over rows with ties (the lowest index wins), NaNs (never win) and all-NaN (0).
    let vocab = 1000;
    let mut l = values(4 * vocab, 15, 10.0);
    l[vocab + 700] = 50.0;
    l[vocab + 900] = 50.0;
    l[2 * vocab..3 * vocab]
        .iter_mut()
        .step_by(3)
        .for_each(|v| *v = f32::NAN);
    l[3 * vocab..].iter_mut().for_each(|v| *v = f32::NAN);
    let ag = g.argmax(&up(g, dt, &l, &[4, vocab])).unwrap();
    let ac = c.argmax(&up(c, dt, &l, &[4, vocab])).unwrap();
    assert_eq!(ag, ac, "{what} argmax ({dt})");
    assert_eq!(ac[1], 700);
    assert_eq!(ac[3], 0);
}

/// Two sequences in one step: A's prefill chunk of positions 5..12 (its 0..5 written by an
/// earlier step), B's decode row at position 37; block size 4, tables out of order.
fn attention<G: DecoderBackend>(
    what: &str,
    dt: DType,
    g: &G,
    c: &apparate::backend::CpuBackend,
    heads: Heads,
) {
    let head_dim = heads.head_dim;
    let (bs, blocks) = (4, 16);
    let a_table = [7u32, 2, 9, 13];
    let b_table: Vec<u32> = vec![0, 1, 3, 4, 5, 6, 8, 10, 11, 12];
    let kvw = heads.kv_width();
    let (mut kg, mut kc) = (
        g.alloc_kv_layer(bs * blocks, kvw).unwrap(),
        c.alloc_kv_layer(bs * blocks, kvw).unwrap(),
    );
    let w = heads.qkv_width();
    let mut seed = 20;
    let mut step = |plan: &KvPlan, check: bool| {
        seed += 1;
        let qkv = values(plan.rows() * w, seed, 2.0);
        let pg = g.upload_plan(plan).unwrap();
        let pc = c.upload_plan(plan).unwrap();
        let mut xg = up(g, dt, &qkv, &[plan.rows(), w]);
        let mut xc = up(c, dt, &qkv, &[plan.rows(), w]);
        g.rope(
            &mut xg,
            &pg,
            heads.heads + heads.kv_heads,
            head_dim,
            10000.0,
        )
        .unwrap();
        c.rope(
            &mut xc,
            &pc,
            heads.heads + heads.kv_heads,
            head_dim,
            10000.0,
        )
        .unwrap();
        let rg = g.download(&xg).unwrap();
        let rc = c.download(&xc).unwrap();
        if check {
            same(&format!("{what} rope"), dt, &rg, &round(dt, &rc));
        }
        // Both sides attend over the same rotated values (the CPU's, rounded).
        let xg = up(g, dt, &rc, &[plan.rows(), w]);
        let xc = up(c, dt, &rc, &[plan.rows(), w]);
        let og = g
            .download(&g.kv_attention(&xg, &mut kg, &pg, heads).unwrap())
            .unwrap();
        let oc = c
            .download(&c.kv_attention(&xc, &mut kc, &pc, heads).unwrap())
            .unwrap();
        if check {
            same(&format!("{what} attention"), dt, &og, &oc);
            same(
                &format!("{what} key cache"),
                dt,
                &g.download(&kg.k).unwrap(),
                &round(dt, &c.download(&kc.k).unwrap()),
            );
        }
    };
    let mut first = KvPlan::new(bs, blocks);
    first.push(&a_table, 0, 5).unwrap();
    first.push(&b_table, 0, 37).unwrap();
    step(&first, true);
    let mut second = KvPlan::new(bs, blocks);
    second.push(&a_table, 5, 7).unwrap();
    second.push(&b_table, 37, 1).unwrap();
    step(&second, true);
    // A decode step alone: one row of each sequence (few pairs: the flash kernel splits B).
    let mut third = KvPlan::new(bs, blocks);
    third.push(&b_table, 38, 1).unwrap();
    third.push(&a_table, 12, 1).unwrap();
    step(&third, true);
    // A plan that names a block outside the cache, or a table too short, is refused.
    assert!(KvPlan::new(bs, blocks).push(&[16], 0, 1).is_err());
    assert!(KvPlan::new(bs, blocks).push(&[1], 0, 5).is_err());
    // A cache of the wrong size for the plan is refused by both.
    let mut small_g = g.alloc_kv_layer(8, kvw).unwrap();
    let pg = g.upload_plan(&second).unwrap();
    let xg = up(g, dt, &values(8 * w, 5, 1.0), &[8, w]);
    let e = g
        .kv_attention(&xg, &mut small_g, &pg, heads)
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("key cache"), "{e}");
}

#[test]
fn decoder_ops_on_the_emulated_gpu() {
    run_all(
        "emu",
        Arc::new(EmuDevice::new(EmuConfig::default()).unwrap()),
    );
}

#[test]
#[ignore = "needs a CUDA GPU (tools/gpu-check.sh runs it)"]
fn decoder_ops_on_a_real_gpu() {
    let dev = CudaDevice::new(CudaConfig::default()).expect("a CUDA device");
    run_all("cuda", Arc::new(dev));
}
