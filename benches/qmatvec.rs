//! Decode-step matrix-vector products on SmolLM2's shapes: block-quantized weights read as
//! blocks (`backend::cpu::qmatvec`, activations quantized to 8 bits once) against the f32
//! product of the same weights decoded beforehand (what `models::llama_reference` does).
//! One thread. Prints the time per product and the weight bytes read per second.
//!
//! ```sh
//! cargo bench --bench qmatvec
//! ```

use std::time::Instant;

use apparate::backend::cpu::qmatvec::{Q8Activations, matmul, matvec};
use apparate::gguf::GgmlType;
use apparate::quant::{dequantize_rows, quantize};
use apparate::rng::SplitMix;

/// `n` weights uniform in [-0.1, 0.1), seeded.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut r = SplitMix::new(seed);
    (0..n).map(|_| r.uniform() * 0.1).collect()
}

/// Median seconds of `f` over `reps` runs after one warm-up.
fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[reps / 2]
}

/// A batch of 8 vectors through one `matmul` (each weight row read once) against 8 `matvec`s
/// (the matrix read 8 times): the same on a matrix that stays in the caches, and the output
/// layer's 29 MB of Q8_0 blocks, which does not.
fn batched() {
    let n = 8;
    for (rows, cols, ty, reps) in [
        (1536, 576, GgmlType::Q4_1, 100),
        (49152, 576, GgmlType::Q8_0, 5),
    ] {
        let q = quantize(ty, &values(rows * cols, 1)).unwrap();
        let xs: Vec<Q8Activations> = (0..n)
            .map(|i| Q8Activations::quantize(&values(cols, 10 + i as u64)))
            .collect();
        let mut out = vec![0f32; n * rows];
        let tb = time(reps, || {
            matmul(ty, &q, &xs, &mut out).unwrap();
            std::hint::black_box(&out);
        });
        let ts = time(reps, || {
            for (x, o) in xs.iter().zip(out.chunks_mut(rows)) {
                matvec(ty, &q, x, o).unwrap();
            }
            std::hint::black_box(&out);
        });
        println!(
            "batch of {n}, {rows} x {cols} {ty}: one matmul {:.1} us, {n} matvecs {:.1} us ({:.2}x)",
            tb * 1e6,
            ts * 1e6,
            ts / tb
        );
    }
}

fn main() {
    println!(
        "{:<28} {:>12} {:>12} {:>12} {:>12} {:>8}",
        "shape (rows x cols, type)", "blocks us", "blocks GB/s", "f32 us", "f32 GB/s", "speedup"
    );
    for (rows, cols, ty, reps) in [
        (576, 576, GgmlType::Q4_1, 200),
        (1536, 576, GgmlType::Q4_1, 100),
        (576, 1536, GgmlType::Q4_1, 100),
        (49152, 576, GgmlType::Q8_0, 10),
    ] {
        let q = quantize(ty, &values(rows * cols, 1)).unwrap();
        let mut dec = vec![0f32; rows * cols];
        dequantize_rows(ty, &q, cols, &mut dec).unwrap();
        let x = values(cols, 2);
        let mut out = vec![0f32; rows];
        let tq = time(reps, || {
            let xq = Q8Activations::quantize(&x);
            matvec(ty, &q, &xq, &mut out).unwrap();
            std::hint::black_box(&out);
        });
        let tf = time(reps, || {
            for (o, r) in out.iter_mut().zip(dec.chunks_exact(cols)) {
                let mut acc = [0f32; 8];
                for (a, b) in r.chunks_exact(8).zip(x.chunks_exact(8)) {
                    for i in 0..8 {
                        acc[i] += a[i] * b[i];
                    }
                }
                *o = acc.iter().sum();
            }
            std::hint::black_box(&out);
        });
        println!(
            "{:<28} {:>12.1} {:>12.2} {:>12.1} {:>12.2} {:>7.2}x",
            format!("{rows} x {cols} {ty}"),
            tq * 1e6,
            q.len() as f64 / tq / 1e9,
            tf * 1e6,
            (rows * cols * 4) as f64 / tf / 1e9,
            tf / tq
        );
    }
    batched();
}
