//! How long one threshold tuning takes (Apparate section 4.1 asks for well under 1 ms for 3
//! ramps and a 1,000-sample window on one core). Measured, not asserted.
//! `cargo bench --bench tuner`

use std::time::Instant;

use apparate::adapt::latency::LatencyModel;
use apparate::adapt::tuner::{Samples, TunerConfig, tune};

fn main() {
    let lat = LatencyModel {
        vanilla_ms: 10.0,
        until_ms: vec![2.5, 5.0, 7.5],
        ramp_ms: vec![0.1; 3],
    };
    let cfg = TunerConfig {
        accuracy_budget: 0.0025,
        ..TunerConfig::default()
    };
    for (n, k) in [(256, 3), (1000, 3), (1000, 2), (4000, 3)] {
        let lat = LatencyModel {
            until_ms: lat.until_ms[..k].to_vec(),
            ramp_ms: lat.ramp_ms[..k].to_vec(),
            ..lat.clone()
        };
        let mut times = Vec::new();
        let mut saving = 0.0;
        for seed in 0..200 {
            let s = Samples::synthetic(n, k, seed);
            let t0 = Instant::now();
            let t = tune(&s, &lat, &cfg);
            times.push(t0.elapsed().as_secs_f64() * 1e3);
            saving += t.eval.saving / 200.0;
        }
        times.sort_by(f64::total_cmp);
        println!(
            "tune: {k} ramps x {n:>4} samples: median {:.3} ms, p99 {:.3} ms, max {:.3} ms (mean predicted saving {:.1}%)",
            times[100],
            times[198],
            times[199],
            saving * 100.0
        );
    }
}
