//! Thresholds with a statistical guarantee (live loops, part 2). Instead of aiming at a fixed
//! share of the budget on the evidence (the paper mode's headroom), the tuner proposes a path of
//! ever larger thresholds on one part of the evidence and tests it, in order, on the other part:
//! a configuration is accepted when the exact binomial (Clopper-Pearson) upper confidence bound
//! of its disagreement rate on the held-back part stays within the budget, and the first one
//! that fails ends the walk. Testing a fixed sequence in order needs no correction for the
//! number of configurations tested ("fixed-sequence testing", as in Learn-then-Test), so the
//! chosen thresholds exceed the budget on fresh inputs from the same stream with probability at
//! most `1 - confidence`. The bound is loose when little is known (no exits at all below about
//! 300 held-back samples for a 1% budget at 95%) and tightens by itself as evidence grows.

use super::latency::LatencyModel;
use super::tuner::{Samples, Tuned, TunerConfig, evaluate, tune_path};

/// Every `PATH_EVERY`-th sample proposes the path; the others (two thirds) test it. The path
/// needs little data (only the order of moves), the test needs as much as it can get.
pub const PATH_EVERY: usize = 3;

/// The most wrong answers among `n` that still show, at `confidence`, that the disagreement
/// rate is at most `budget`: the largest `w` with `P(Binomial(n, budget) <= w) <= 1 -
/// confidence`. `None` when even no wrong answer is enough (too few samples).
pub fn max_wrong(n: usize, budget: f64, confidence: f64) -> Option<usize> {
    if n == 0 || !(budget > 0.0 && budget < 1.0) {
        return None;
    }
    let delta = 1.0 - confidence;
    // log pmf(0) = n ln(1 - b); pmf(k + 1) = pmf(k) (n - k) / (k + 1) b / (1 - b). The CDF is
    // summed in log space: pmf(0) underflows f64 for n in the tens of thousands.
    let ln_ratio = budget.ln() - (1.0 - budget).ln();
    let mut ln_pmf = n as f64 * (1.0 - budget).ln();
    let mut ln_cdf = ln_pmf;
    let ln_delta = delta.ln();
    if ln_cdf > ln_delta {
        return None;
    }
    let mut w = 0;
    for k in 0..n {
        ln_pmf += ((n - k) as f64).ln() - ((k + 1) as f64).ln() + ln_ratio;
        let hi = ln_cdf.max(ln_pmf);
        ln_cdf = hi + ((ln_cdf - hi).exp() + (ln_pmf - hi).exp()).ln();
        if ln_cdf > ln_delta {
            break;
        }
        w = k + 1;
    }
    Some(w)
}

/// The disagreement rate a path should aim at when `n_test` samples will test it: the rate
/// the test can certify (`max_wrong / n_test`) plus one wrong answer's worth, so the test
/// still has the last word. A path tuned at the budget itself runs far past what a few
/// hundred test samples can certify, and the test then stops it early, on a prefix the climb
/// never optimised for (on MNIST-drift a three-ramp set ranked at the budget kept thresholds
/// of 0.01 and released 26% of the frames before the drift, where one ramp tuned for what the
/// test certifies had released 71-79%). `None`: nothing can be certified.
pub fn certifiable_rate(n_test: usize, budget: f64, confidence: f64) -> Option<f64> {
    let w = max_wrong(n_test, budget, confidence)?;
    Some(((w + 1) as f64 / n_test as f64).min(budget))
}

/// Tunes thresholds on `s` whose disagreement is at most `budget` with the given confidence
/// (see the module comment). The result's evaluation is on all of `s`.
pub fn tune_bounded(
    s: &Samples,
    lat: &LatencyModel,
    cfg: &TunerConfig,
    budget: f64,
    confidence: f64,
) -> Tuned {
    let mask: Vec<bool> = (0..s.len()).map(|i| i % PATH_EVERY == 0).collect();
    tune_bounded_split(s, &mask, lat, cfg, budget, confidence)
}

/// [`tune_bounded`] with the inputs that propose the path given (`path[i]`), e.g. by their
/// position in the stream so that each keeps its role as the evidence slides.
pub fn tune_bounded_split(
    s: &Samples,
    path_mask: &[bool],
    lat: &LatencyModel,
    cfg: &TunerConfig,
    budget: f64,
    confidence: f64,
) -> Tuned {
    let k = s.ramps;
    let zero = vec![0.0f32; k];
    let (propose, test) = s.split_by(path_mask);
    let none = Tuned {
        eval: evaluate(s, &zero, lat),
        thresholds: zero,
    };
    let (Some(allowed), Some(aim)) = (
        max_wrong(test.len(), budget, confidence),
        certifiable_rate(test.len(), budget, confidence),
    ) else {
        return none;
    };
    let search = TunerConfig {
        accuracy_budget: aim,
        ..cfg.clone()
    };
    let (_, path) = tune_path(&propose, lat, &search);
    let path = refine(&propose, &path);
    let mut chosen: Option<&Vec<f32>> = None;
    for tau in &path {
        if wrong_exits(&test, tau) > allowed {
            break;
        }
        chosen = Some(tau);
    }
    match chosen {
        Some(tau) => Tuned {
            eval: evaluate(s, tau, lat),
            thresholds: tau.clone(),
        },
        None => none,
    }
}

/// Steps a path move is cut into, at most (see [`refine`]).
const SUBSTEPS: usize = 8;

/// The path with each move that raises one ramp's threshold cut into up to [`SUBSTEPS`]
/// steps, each releasing about as many more of the proposal inputs. The climb's moves are
/// coarse (a step of 0.01 in `u` releases half the inputs at once for a sharp head), and the
/// test can only stop between moves: with a few wrong answers allowed, whether the first move
/// passed flipped from plan to plan as the evidence slid, and the ramps went off and on every
/// few hundred inputs (MNIST-drift). The finer path is still fixed before the test sees its
/// part, so the guarantee is the same.
fn refine(propose: &Samples, path: &[Vec<f32>]) -> Vec<Vec<f32>> {
    let n = propose.len();
    let mut out = Vec::with_capacity(path.len() * SUBSTEPS);
    let mut prev = vec![0.0f32; propose.ramps];
    for next in path {
        let moved: Vec<usize> = (0..prev.len()).filter(|&r| prev[r] != next[r]).collect();
        if let [r] = moved[..]
            && next[r] > prev[r]
        {
            let mut us: Vec<f32> = propose.u[r * n..(r + 1) * n]
                .iter()
                .copied()
                .filter(|&u| u >= prev[r] && u < next[r])
                .collect();
            us.sort_by(f32::total_cmp);
            us.dedup();
            // Cut points at quantiles of the newly released inputs' `u`: a threshold equal to
            // a `u` releases the inputs below it.
            let cuts = SUBSTEPS.min(us.len());
            for q in 1..cuts {
                let t = us[q * us.len() / cuts];
                if t > prev[r] && out.last().is_none_or(|l: &Vec<f32>| l[r] < t) {
                    let mut tau = prev.clone();
                    tau[r] = t;
                    out.push(tau);
                }
            }
        }
        out.push(next.clone());
        prev = next.clone();
    }
    out
}

/// Inputs released at a ramp whose answer differs from the model's, under thresholds `tau`.
fn wrong_exits(s: &Samples, tau: &[f32]) -> usize {
    let n = s.len();
    let mut wrong = 0;
    for i in 0..n {
        for (r, &t) in tau.iter().enumerate() {
            if s.u[r * n + i] < t {
                wrong += usize::from(!s.correct[r * n + i]);
                break;
            }
        }
    }
    wrong
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix;

    /// P(Binomial(n, p) <= w), summed directly (small n only).
    fn cdf(n: usize, p: f64, w: usize) -> f64 {
        let mut c = 0.0;
        let mut pmf = (1.0 - p).powi(n as i32);
        for k in 0..=w {
            c += pmf;
            pmf *= (n - k) as f64 / (k + 1) as f64 * p / (1.0 - p);
        }
        c
    }

    #[test]
    fn max_wrong_is_the_exact_binomial_quantile() {
        // (0.99)^298 = 0.0500..: 298 samples are not enough at 95%, 299 are (with none wrong).
        assert_eq!(max_wrong(298, 0.01, 0.95), None);
        assert_eq!(max_wrong(299, 0.01, 0.95), Some(0));
        for &(n, b, c) in &[(500, 0.01, 0.95), (2000, 0.01, 0.95), (1000, 0.05, 0.9)] {
            let w = max_wrong(n, b, c).unwrap();
            assert!(cdf(n, b, w) <= 1.0 - c, "n {n}: cdf at {w}");
            assert!(cdf(n, b, w + 1) > 1.0 - c, "n {n}: cdf at {}", w + 1);
        }
        // The bound tightens with evidence: the allowed rate rises towards the budget.
        let rate = |n: usize| max_wrong(n, 0.01, 0.95).unwrap() as f64 / n as f64;
        assert!(rate(1000) < rate(4000) && rate(4000) < rate(100_000));
        assert!(rate(100_000) < 0.01);
        // Very large n does not underflow.
        assert!(max_wrong(1_000_000, 0.01, 0.95).unwrap() > 9_000);
        // What a path aims at: one wrong answer more than the test certifies, never above the
        // budget, nothing below 299 samples.
        assert_eq!(certifiable_rate(298, 0.01, 0.95), None);
        assert_eq!(certifiable_rate(299, 0.01, 0.95), Some(1.0 / 299.0));
        let w = max_wrong(2000, 0.01, 0.95).unwrap();
        assert_eq!(
            certifiable_rate(2000, 0.01, 0.95),
            Some((w + 1) as f64 / 2000.0)
        );
        assert!(certifiable_rate(1_000_000, 0.01, 0.95).unwrap() <= 0.01);
    }

    #[test]
    fn a_refined_path_cuts_each_raise_into_steps_of_the_released_inputs() {
        // One ramp, u = 0.00, 0.01, ..., 0.99: the move 0 -> 0.5 releases 50 inputs.
        let rows: Vec<Vec<(f32, bool)>> =
            (0..100).map(|i| vec![(i as f32 / 100.0, true)]).collect();
        let s = Samples::from_rows(1, &rows);
        let path = refine(&s, &[vec![0.5], vec![0.6]]);
        assert_eq!(path.len(), 2 * SUBSTEPS);
        assert_eq!(path[SUBSTEPS - 1], vec![0.5]);
        assert_eq!(path.last(), Some(&vec![0.6]));
        // Increasing, and each step releases at most 50 / SUBSTEPS + 1 more inputs.
        let released = |t: f32| s.u.iter().filter(|&&u| u < t).count();
        let mut last = 0;
        for tau in &path {
            let r = released(tau[0]);
            assert!(r > last && r - last <= 50 / SUBSTEPS + 1, "{path:?}");
            last = r;
        }
        // A move that lowers a threshold or moves two ramps is kept whole.
        let two = Samples::from_rows(2, &[vec![(0.1, true), (0.2, true)]]);
        let p = refine(&two, &[vec![0.3, 0.3], vec![0.1, 0.3]]);
        assert_eq!(p, vec![vec![0.3, 0.3], vec![0.1, 0.3]]);
    }

    fn lat() -> LatencyModel {
        LatencyModel {
            vanilla_ms: 100.0,
            until_ms: vec![25.0, 50.0, 75.0],
            ramp_ms: vec![1.0; 3],
        }
    }

    /// A stream where ramp `r` is wrong with probability rising in `u`: `P(wrong) = u^2 *
    /// hardness`; the same generator makes the tuning evidence and the fresh inputs.
    fn stream(n: usize, hardness: f32, rng: &mut SplitMix) -> Samples {
        let rows: Vec<Vec<(f32, bool)>> = (0..n)
            .map(|_| {
                (0..3)
                    .map(|r| {
                        let u = (rng.uniform() + 1.0) / 2.0 * (0.9 - 0.2 * r as f32);
                        let wrong = (rng.uniform() + 1.0) / 2.0 < u * u * hardness;
                        (u, !wrong)
                    })
                    .collect()
            })
            .collect();
        Samples::from_rows(3, &rows)
    }

    /// The guarantee, checked: on i.i.d. streams the chosen thresholds exceed the budget on
    /// fresh inputs (a large sample, so its rate is the true rate to within 0.1 points) no more
    /// often than the confidence allows. Seeded; 300 cases of 600 to 3,000 samples.
    #[test]
    fn the_bound_holds_on_fresh_samples_as_often_as_its_confidence_says() {
        let cfg = TunerConfig::default();
        let (budget, confidence) = (0.01, 0.9);
        let mut rng = SplitMix::new(7);
        let mut exceeded = 0;
        let cases = 300;
        let mut exits = 0.0;
        for case in 0..cases {
            let hardness = [0.1, 0.3, 1.0][case % 3];
            let n = 600 + (case * 97) % 2400;
            let evidence = stream(n, hardness, &mut rng);
            let t = tune_bounded(&evidence, &lat(), &cfg, budget, confidence);
            let fresh = stream(40_000, hardness, &mut rng);
            let e = evaluate(&fresh, &t.thresholds, &lat());
            exits += 1.0 - e.exit_fractions[3];
            if 1.0 - e.accuracy > budget {
                exceeded += 1;
            }
        }
        // At most 10% expected; 300 cases give a standard error of 1.7 points.
        assert!(
            (exceeded as f64) / (cases as f64) <= 1.0 - confidence + 0.035,
            "{exceeded} of {cases} exceeded the budget on fresh inputs"
        );
        // And it is not vacuous: inputs do exit.
        assert!(
            exits / cases as f64 > 0.2,
            "mean exit fraction {}",
            exits / cases as f64
        );
    }
}
