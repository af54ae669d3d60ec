//! The all-backends op test: every op x dtype x shape on each GPU device (the emulated device
//! always; a real GPU in an ignored test that tools/gpu-check.sh runs) against the `cpu` backend, by relative L2 error
//! (f32 <= 1e-5, f16/bf16 <= 1e-2), with fresh random inputs and outputs poisoned (NaN) before
//! every launch. Inputs are rounded to the storage dtype first, so both sides see the same values.

mod common;

use std::sync::Arc;

use apparate::backend::cuda::{CudaConfig, CudaDevice};
use apparate::backend::device::Device;
use apparate::backend::emu::{EmuConfig, EmuDevice};
use apparate::backend::gpu::GpuBackend;
use apparate::backend::{Activation, Backend, BatchShape, CpuBackend, Pooling};
use apparate::models::bert::synthetic::SplitMix;
use apparate::tensor::{DType, TensorView};
use common::cpu;

fn tolerance(dt: DType) -> f64 {
    match dt {
        DType::F32 => 1e-5,
        _ => 1e-2,
    }
}

fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
        .sum();
    let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// Random values rounded to `dt`, so the CPU reference sees exactly what the device stores.
fn rand(rng: &mut SplitMix, n: usize, scale: f32, dt: DType) -> Vec<f32> {
    let v: Vec<f32> = (0..n).map(|_| rng.uniform() * scale).collect();
    let bytes = dt.encode(&v);
    TensorView {
        name: "",
        dtype: dt,
        shape: &[n],
        bytes: &bytes,
    }
    .to_f32()
    .into_owned()
}

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// Runs `$body(name, &backend, &cpu)` on the emulated GPU in every storage dtype (the real GPU
/// runs every op in `every_op_on_a_real_gpu`, ignored where there is none).
macro_rules! on_every_device {
    ($body:ident) => {{
        let c = cpu();
        let emu = Arc::new(EmuDevice::new(EmuConfig::default()).unwrap());
        for dt in DTYPES {
            let be = GpuBackend::shared(emu.clone(), dt).with_poisoned_outputs();
            $body(&format!("emu/{dt}"), &be, &c);
        }
    }};
}

/// Every op of this file on a real GPU, in every storage dtype, against the CPU backend.
#[test]
#[ignore = "needs a CUDA GPU: run by tools/gpu-check.sh"]
fn every_op_on_a_real_gpu() {
    let c = cpu();
    let dev = CudaDevice::new(CudaConfig::default())
        .unwrap_or_else(|e| panic!("needs a CUDA GPU (tools/gpu-check.sh runs this): {e}"));
    let dev = Arc::new(dev);
    for dt in DTYPES {
        let be = GpuBackend::shared(dev.clone(), dt).with_poisoned_outputs();
        let name = format!("cuda/{dt}");
        linear(&name, &be, &c);
        layernorm(&name, &be, &c);
        attention(&name, &be, &c);
        embedding(&name, &be, &c);
        pooling_normalize_softmax(&name, &be, &c);
        conv_and_pool(&name, &be, &c);
        ramp(&name, &be, &c);
    }
}

fn check(name: &str, case: &str, dt: DType, got: Vec<f32>, want: Vec<f32>) {
    assert!(
        got.iter().all(|v| v.is_finite()),
        "{name} {case}: non-finite output (unwritten element?)"
    );
    let e = rel_l2(&got, &want);
    assert!(
        e <= tolerance(dt),
        "{name} {case}: relative L2 error {e:.3e} > {:.0e}",
        tolerance(dt)
    );
}

struct Case<'a, B: Backend> {
    be: &'a B,
    cpu: &'a CpuBackend,
    dt: DType,
}

impl<B: Backend> Case<'_, B> {
    fn up(&self, v: &[f32], shape: &[usize]) -> (B::Tensor, <CpuBackend as Backend>::Tensor) {
        (
            self.be.upload(v, shape).unwrap(),
            self.cpu.upload(v, shape).unwrap(),
        )
    }
}

fn linear<D: Device>(name: &str, be: &GpuBackend<D>, c: &CpuBackend) {
    let dt = be.dtype();
    let case = Case { be, cpu: c, dt };
    let mut rng = SplitMix::new(11);
    for &(m, n, k) in &[
        (1, 1, 1),
        (3, 5, 7),
        (17, 33, 65),
        (64, 64, 64),
        (130, 96, 200),
        (200, 384, 384),
    ] {
        for (act, bias) in [
            (Activation::None, false),
            (Activation::GeluErf, true),
            (Activation::Tanh, true),
        ] {
            let x = rand(&mut rng, m * k, 1.0, case.dt);
            let w = rand(&mut rng, n * k, 0.5, case.dt);
            let b = rand(&mut rng, n, 0.5, case.dt);
            let (xg, xc) = case.up(&x, &[m, k]);
            let (wg, wc) = case.up(&w, &[n, k]);
            let (bg, bc) = case.up(&b, &[n]);
            let got = be.linear(&xg, &wg, bias.then_some(&bg), act).unwrap();
            let want = c.linear(&xc, &wc, bias.then_some(&bc), act).unwrap();
            check(
                name,
                &format!("linear {m}x{n}x{k} {act:?} bias={bias}"),
                dt,
                be.download(&got).unwrap(),
                c.download(&want).unwrap(),
            );
        }
    }
}

#[test]
fn linear_all_dtypes_and_shapes() {
    on_every_device!(linear);
}

fn layernorm<D: Device>(name: &str, be: &GpuBackend<D>, c: &CpuBackend) {
    let dt = be.dtype();
    let case = Case { be, cpu: c, dt };
    let mut rng = SplitMix::new(12);
    for &(rows, cols) in &[(1, 1), (3, 7), (5, 384), (64, 1000)] {
        let x = rand(&mut rng, rows * cols, 2.0, dt);
        let r = rand(&mut rng, rows * cols, 2.0, dt);
        let g = rand(&mut rng, cols, 1.0, dt);
        let b = rand(&mut rng, cols, 1.0, dt);
        let (xg, xc) = case.up(&x, &[rows, cols]);
        let (rg, rc) = case.up(&r, &[rows, cols]);
        let (gg, gc) = case.up(&g, &[cols]);
        let (bg, bc) = case.up(&b, &[cols]);
        let got = be.add_layernorm(&xg, &rg, &gg, &bg, 1e-5).unwrap();
        let want = c.add_layernorm(&xc, &rc, &gc, &bc, 1e-5).unwrap();
        // A 1-wide row normalises to exactly beta on both sides.
        check(
            name,
            &format!("add_layernorm {rows}x{cols}"),
            dt,
            be.download(&got).unwrap(),
            c.download(&want).unwrap(),
        );
    }
}

#[test]
fn layernorm_all_dtypes_and_shapes() {
    on_every_device!(layernorm);
}

fn attention<D: Device>(name: &str, be: &GpuBackend<D>, c: &CpuBackend) {
    let dt = be.dtype();
    let case = Case { be, cpu: c, dt };
    let mut rng = SplitMix::new(13);
    for (seq, heads, d, lengths) in [
        (1, 1, 1, vec![1]),
        (7, 3, 4, vec![7, 3]),
        (33, 2, 32, vec![33, 1, 17]),
        (128, 12, 32, vec![128, 77]),
    ] {
        let shape = BatchShape {
            seq,
            lengths: lengths.clone(),
        };
        let width = heads * d;
        let qkv = rand(&mut rng, shape.rows() * 3 * width, 1.5, dt);
        let (qg, qc) = case.up(&qkv, &[shape.rows(), 3 * width]);
        let got = be.attention(&qg, &shape, heads).unwrap();
        let want = c.attention(&qc, &shape, heads).unwrap();
        check(
            name,
            &format!("attention seq {seq} heads {heads} d {d} lengths {lengths:?}"),
            dt,
            be.download(&got).unwrap(),
            c.download(&want).unwrap(),
        );
    }
}

#[test]
fn attention_all_dtypes_and_shapes() {
    on_every_device!(attention);
}

fn embedding<D: Device>(name: &str, be: &GpuBackend<D>, c: &CpuBackend) {
    let dt = be.dtype();
    let case = Case { be, cpu: c, dt };
    let mut rng = SplitMix::new(14);
    for &(batch, seq, width) in &[(1, 1, 1), (2, 5, 16), (3, 33, 384)] {
        let (vocab, types, positions) = (50, 2, 40);
        let shape = BatchShape {
            seq,
            lengths: (0..batch).map(|i| seq - i.min(seq - 1)).collect(),
        };
        let ids: Vec<u32> = (0..shape.rows()).map(|_| rng.below(vocab) as u32).collect();
        let tys: Vec<u32> = (0..shape.rows()).map(|_| rng.below(types) as u32).collect();
        let tables = [(vocab, 1.0), (positions, 0.5), (types, 0.5)]
            .map(|(r, s)| rand(&mut rng, r * width, s, dt));
        let (wg, wc) = case.up(&tables[0], &[vocab, width]);
        let (pg, pc) = case.up(&tables[1], &[positions, width]);
        let (tg, tc) = case.up(&tables[2], &[types, width]);
        let g = rand(&mut rng, width, 1.0, dt);
        let b = rand(&mut rng, width, 1.0, dt);
        let (gg, gc) = case.up(&g, &[width]);
        let (bg, bc) = case.up(&b, &[width]);
        let got = be
            .embed(&ids, &tys, &shape, &wg, &pg, &tg, &gg, &bg, 1e-12)
            .unwrap();
        let want = c
            .embed(&ids, &tys, &shape, &wc, &pc, &tc, &gc, &bc, 1e-12)
            .unwrap();
        check(
            name,
            &format!("embed {batch}x{seq}x{width}"),
            dt,
            be.download(&got).unwrap(),
            c.download(&want).unwrap(),
        );
        // Bad ids are refused before any launch.
        let mut bad = ids.clone();
        bad[0] = vocab as u32;
        let e = be
            .embed(&bad, &tys, &shape, &wg, &pg, &tg, &gg, &bg, 1e-12)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("outside the vocabulary"), "{e}");
    }
}

#[test]
fn embedding_all_dtypes_and_shapes() {
    on_every_device!(embedding);
}

fn pooling_normalize_softmax<D: Device>(name: &str, be: &GpuBackend<D>, c: &CpuBackend) {
    let dt = be.dtype();
    let case = Case { be, cpu: c, dt };
    let mut rng = SplitMix::new(15);
    for (seq, width, lengths) in [
        (1, 1, vec![1]),
        (9, 17, vec![9, 2, 5]),
        (128, 384, vec![128, 3]),
    ] {
        let shape = BatchShape { seq, lengths };
        let x = rand(&mut rng, shape.rows() * width, 1.0, dt);
        let (xg, xc) = case.up(&x, &[shape.rows(), width]);
        for kind in [Pooling::Mean, Pooling::Cls] {
            let got = be.pool(&xg, &shape, kind).unwrap();
            let want = c.pool(&xc, &shape, kind).unwrap();
            check(
                name,
                &format!("pool {kind:?} {seq}x{width}"),
                dt,
                be.download(&got).unwrap(),
                c.download(&want).unwrap(),
            );
        }
    }
    for &(rows, cols) in &[(1, 1), (3, 157), (7, 1000)] {
        let x = rand(&mut rng, rows * cols, 4.0, dt);
        let (xg, xc) = case.up(&x, &[rows, cols]);
        let got = be.l2_normalize(&xg).unwrap();
        let want = c.l2_normalize(&xc).unwrap();
        check(
            name,
            &format!("l2_normalize {rows}x{cols}"),
            dt,
            be.download(&got).unwrap(),
            c.download(&want).unwrap(),
        );
        let got = be.softmax(&xg).unwrap();
        let want = c.softmax(&xc).unwrap();
        check(
            name,
            &format!("softmax {rows}x{cols}"),
            dt,
            be.download(&got).unwrap(),
            c.download(&want).unwrap(),
        );
    }
}

#[test]
fn pooling_normalize_softmax_all_dtypes_and_shapes() {
    on_every_device!(pooling_normalize_softmax);
}

fn conv_and_pool<D: Device>(name: &str, be: &GpuBackend<D>, c: &CpuBackend) {
    use apparate::backend::{Conv2d, Pool2d};
    let dt = be.dtype();
    let case = Case { be, cpu: c, dt };
    let mut rng = SplitMix::new(16);
    // (n, h, w, cin, cout, k, stride, pad, groups, residual, act)
    let convs = [
        (1, 1, 1, 1, 1, 1, 1, 0, 1, false, Activation::None),
        (2, 7, 5, 3, 8, 3, 1, 1, 1, true, Activation::Relu),
        (1, 9, 9, 16, 16, 3, 2, 1, 16, false, Activation::Relu6),
        (2, 8, 8, 8, 12, 3, 1, 1, 4, true, Activation::None),
        (1, 6, 6, 16, 24, 1, 1, 0, 1, true, Activation::Relu),
        (1, 28, 28, 3, 16, 7, 2, 3, 1, false, Activation::Relu),
        (1, 14, 14, 32, 65, 3, 1, 1, 1, false, Activation::None),
    ];
    for (n, h, w, cin, cout, k, s, p, g, with_res, act) in convs {
        let geo = Conv2d {
            stride: [s, s],
            padding: [p, p],
            groups: g,
            padding_extra: [0, 0],
        };
        let (oh, ow) = geo.output_size(h, w, k, k).unwrap();
        let x = rand(&mut rng, n * h * w * cin, 1.0, dt);
        let wt = rand(&mut rng, cout * k * k * (cin / g), 0.5, dt);
        let b = rand(&mut rng, cout, 0.5, dt);
        let r = rand(&mut rng, n * oh * ow * cout, 1.0, dt);
        let (xg, xc) = case.up(&x, &[n, h, w, cin]);
        let (wg, wc) = case.up(&wt, &[cout, k, k, cin / g]);
        let (bg, bc) = case.up(&b, &[cout]);
        let (rg, rc) = case.up(&r, &[n, oh, ow, cout]);
        let got = be
            .conv2d(&xg, &wg, Some(&bg), &geo, with_res.then_some(&rg), act)
            .unwrap();
        let want = c
            .conv2d(&xc, &wc, Some(&bc), &geo, with_res.then_some(&rc), act)
            .unwrap();
        check(
            name,
            &format!("conv2d {n}x{h}x{w}x{cin}->{cout} k{k} s{s} p{p} g{g} res={with_res} {act:?}"),
            dt,
            be.download(&got).unwrap(),
            c.download(&want).unwrap(),
        );
    }
    // TensorFlow "SAME" padding: the odd pixel after the last row and column.
    for (g, cin) in [(1, 3), (8, 8)] {
        let geo = Conv2d {
            stride: [2, 2],
            padding: [0, 0],
            groups: g,
            padding_extra: [1, 1],
        };
        let x = rand(&mut rng, 10 * 10 * cin, 1.0, dt);
        let wt = rand(&mut rng, 8 * 9 * (cin / g), 0.5, dt);
        let (xg, xc) = case.up(&x, &[1, 10, 10, cin]);
        let (wg, wc) = case.up(&wt, &[8, 3, 3, cin / g]);
        let got = be
            .conv2d(&xg, &wg, None, &geo, None, Activation::Relu6)
            .unwrap();
        let want = c
            .conv2d(&xc, &wc, None, &geo, None, Activation::Relu6)
            .unwrap();
        assert_eq!(be.shape(&got), &[1, 5, 5, 8]);
        check(
            name,
            &format!("conv2d SAME-padded g{g}"),
            dt,
            be.download(&got).unwrap(),
            c.download(&want).unwrap(),
        );
    }
    for (shape, pool) in [
        (
            [2, 9, 9, 5],
            Pool2d {
                max: true,
                kernel: [3, 3],
                stride: [2, 2],
                padding: [1, 1],
            },
        ),
        (
            [1, 8, 8, 3],
            Pool2d {
                max: false,
                kernel: [2, 2],
                stride: [2, 2],
                padding: [0, 0],
            },
        ),
        (
            [1, 7, 7, 4],
            Pool2d {
                max: false,
                kernel: [3, 3],
                stride: [1, 1],
                padding: [1, 1],
            },
        ),
    ] {
        let x = rand(&mut rng, shape.iter().product(), 1.0, dt);
        let (xg, xc) = case.up(&x, &shape);
        let got = be.pool2d(&xg, &pool).unwrap();
        let want = c.pool2d(&xc, &pool).unwrap();
        check(
            name,
            &format!("pool2d {shape:?} {pool:?}"),
            dt,
            be.download(&got).unwrap(),
            c.download(&want).unwrap(),
        );
    }
    let x = rand(&mut rng, 2 * 7 * 7 * 16, 1.0, dt);
    let (xg, xc) = case.up(&x, &[2, 7, 7, 16]);
    let got = be.global_avg_pool(&xg).unwrap();
    let want = c.global_avg_pool(&xc).unwrap();
    check(
        name,
        "global_avg_pool 2x7x7x16",
        dt,
        be.download(&got).unwrap(),
        c.download(&want).unwrap(),
    );
    // Bad geometry is an error, not a launch.
    let bad = Conv2d {
        stride: [1, 1],
        padding: [0, 0],
        groups: 3,
        padding_extra: [0, 0],
    };
    let (xg, _) = case.up(&x, &[2, 7, 7, 16]);
    let (wg, _) = case.up(&vec![0.0; 8 * 9 * 16], &[8, 3, 3, 16]);
    let e = be
        .conv2d(&xg, &wg, None, &bad, None, Activation::None)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("groups"), "{e}");
}

#[test]
fn conv_and_pooling_all_dtypes_and_shapes() {
    on_every_device!(conv_and_pool);
}

fn ramp<D: Device>(name: &str, be: &GpuBackend<D>, c: &CpuBackend) {
    use apparate::backend::{RampInput, RampWeights};
    let dt = be.dtype();
    let case = Case { be, cpu: c, dt };
    let mut rng = SplitMix::new(17);
    // (positions, width, classes, lengths, pooling, dense)
    let cases = [
        (7, 16, 5, vec![7, 1, 4], Pooling::Mean, false),
        (49, 64, 10, vec![49, 49], Pooling::Mean, true),
        (33, 384, 157, vec![33, 2, 17, 9], Pooling::Cls, true),
        (1, 1, 1, vec![1], Pooling::Mean, false),
    ];
    for (positions, width, classes, lengths, pooling, dense) in cases {
        let batch = lengths.len();
        let x = rand(&mut rng, batch * positions * width, 2.0, dt);
        let dw = rand(&mut rng, width * width, 0.5, dt);
        let db = rand(&mut rng, width, 0.5, dt);
        let ow = rand(&mut rng, classes * width, 1.0, dt);
        let ob = rand(&mut rng, classes, 0.5, dt);
        let (xg, xc) = case.up(&x, &[batch * positions, width]);
        let (dwg, dwc) = case.up(&dw, &[width, width]);
        let (dbg, dbc) = case.up(&db, &[width]);
        let (owg, owc) = case.up(&ow, &[classes, width]);
        let (obg, obc) = case.up(&ob, &[classes]);
        let head_c = RampWeights {
            dense: dense.then_some((&dwc, &dbc)),
            out: (&owc, &obc),
        };
        let head_g = RampWeights {
            dense: dense.then_some((&dwg, &dbg)),
            out: (&owg, &obg),
        };
        // A threshold between two of the CPU's uncertainties, so some inputs exit and some don't.
        let (_, t1) = case.up(&[2.0], &[1]);
        let input_c = RampInput {
            x: &xc,
            positions,
            lengths: &lengths,
            pooling,
        };
        let input_g = RampInput {
            x: &xg,
            positions,
            lengths: &lengths,
            pooling,
        };
        let probe = c.ramp_exit(&input_c, &head_c, &t1).unwrap();
        let mut us: Vec<f32> = probe.iter().map(|d| d.uncertainty).collect();
        us.sort_by(f32::total_cmp);
        let t = if us.len() > 1 {
            (us[0] + us[1]) / 2.0
        } else {
            us[0] + 0.25
        };
        let t = rand_exact(t, dt);
        let (tg, tc) = case.up(&[t], &[1]);
        let want = c.ramp_exit(&input_c, &head_c, &tc).unwrap();
        let got = be.ramp_exit(&input_g, &head_g, &tg).unwrap();
        let what = format!("ramp_exit {positions}x{width}->{classes} {pooling:?} dense={dense}");
        // The asynchronous path (pinned copy + event on cuda) brings back the same bytes.
        let later = be
            .ramp_exit_async(&input_g, &head_g, &tg)
            .unwrap()
            .wait()
            .unwrap();
        assert_eq!(later, got, "{name} {what}: async vs sync");
        assert_eq!(got.len(), want.len(), "{name} {what}");
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g.class, w.class, "{name} {what}: class");
            assert!(
                (g.uncertainty - w.uncertainty).abs() <= 1e-4,
                "{name} {what}: uncertainty {} vs {}",
                g.uncertainty,
                w.uncertainty
            );
            assert_eq!(
                g.exit, w.exit,
                "{name} {what}: exit (u {} vs threshold {t})",
                w.uncertainty
            );
        }
    }
}

/// `v` rounded to what `dt` stores.
fn rand_exact(v: f32, dt: DType) -> f32 {
    let b = dt.encode(&[v]);
    TensorView {
        name: "",
        dtype: dt,
        shape: &[1],
        bytes: &b,
    }
    .to_f32()[0]
}

#[test]
fn fused_ramp_exit_all_dtypes_and_shapes() {
    on_every_device!(ramp);
}
