//! The live loops' drift test (part 4): a Bernoulli CUSUM on whether each answered input was
//! released early with an answer the model disagrees with. In control the rate is at most half
//! the budget (what the bounded tuner aims below); after a regime change it is several times the
//! budget. The statistic adds the log-likelihood ratio of each observation and is floored at 0,
//! so isolated wrong exits (noise) decay away while a run of them crosses the threshold; the
//! last time it left 0 estimates where the new regime began, and the evidence is shrunk to the
//! samples after it.

/// The sequential test.
pub(crate) struct Cusum {
    /// Log-likelihood ratio of a wrong release (positive) and of a right one (negative).
    up: f64,
    down: f64,
    threshold: f64,
    s: f64,
    /// Sequence number of the first observation after the statistic was last 0.
    start: u64,
}

impl Cusum {
    /// In control: disagreement rate `budget / 2`; out of control: `3 * budget`.
    pub fn new(budget: f64, threshold: f64) -> Cusum {
        let p0 = (budget / 2.0).clamp(1e-6, 0.25);
        let p1 = (budget * 3.0).clamp(2.0 * p0, 0.5);
        Cusum {
            up: (p1 / p0).ln(),
            down: ((1.0 - p1) / (1.0 - p0)).ln(),
            threshold,
            s: 0.0,
            start: 0,
        }
    }

    /// Observes the answer of input `seq`; returns the estimated change point (a sequence
    /// number) when the test fires, and starts over.
    pub fn observe(&mut self, seq: u64, wrong_release: bool) -> Option<u64> {
        if self.s <= 0.0 {
            self.start = seq;
        }
        self.s = (self.s + if wrong_release { self.up } else { self.down }).max(0.0);
        if self.s > self.threshold {
            self.s = 0.0;
            return Some(self.start);
        }
        None
    }

    /// The statistic now (0 in control; the test fires above its threshold).
    pub fn statistic(&self) -> f64 {
        self.s
    }

    pub fn reset(&mut self) {
        self.s = 0.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix;

    #[test]
    fn noise_does_not_fire_a_regime_change_does_and_is_located() {
        let coin = |rng: &mut SplitMix, p: f64| ((rng.uniform() + 1.0) / 2.0) < p as f32;
        for seed in 0..5 {
            let mut rng = SplitMix::new(seed);
            let mut c = Cusum::new(0.01, 10.0);
            // 50,000 inputs at half the budget (0.5% wrong releases): no alarm.
            for seq in 0..50_000 {
                assert_eq!(
                    c.observe(seq, coin(&mut rng, 0.005)),
                    None,
                    "false alarm at {seq} (seed {seed})"
                );
            }
            // Then 6% wrong releases: an alarm within a few hundred inputs, located near the
            // change.
            let fired = (50_000..51_000)
                .find_map(|seq| c.observe(seq, coin(&mut rng, 0.06)).map(|cp| (seq, cp)));
            let (at, cp) = fired.expect("the change is detected");
            assert!(at < 50_400, "detected only at {at} (seed {seed})");
            assert!(
                (49_900..=at).contains(&cp),
                "change point {cp} (seed {seed})"
            );
        }
    }
}
