//! Settings of the adaptation loops and their validation: every knob has a range that makes
//! sense, checked in one place ([`ApparateConfig::validate`]) that the engine builder and the
//! command line both call, so the library API refuses what the CLI refuses.

use std::ops::Bound;

use super::tuner::TunerConfig;
use crate::error::{Error, Result};
use crate::format::Family;

/// Which control loops adapt ramps and thresholds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Mode {
    /// The evidence-driven loops (docs/adaptation.md): shadow evidence for every candidate ramp,
    /// confidence-bounded thresholds, ramps that keep learning, a sequential drift test. Each
    /// part can be switched off in [`LiveConfig`] for ablations. The default.
    #[default]
    Live,
    /// The Apparate paper's loops as published (section 4): thresholds tuned on a window with a
    /// fixed headroom, ramp adjustment by utilities, ramps trained once.
    Paper,
}

impl std::str::FromStr for Mode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Mode> {
        match s {
            "live" => Ok(Mode::Live),
            "paper" => Ok(Mode::Paper),
            _ => Err(Error::config("mode", format!("`{s}`"), "live or paper")),
        }
    }
}

/// Settings of the live loops ([`Mode::Live`]). Each `bool` switches one part of the design on
/// or off, so an ablation can show what it buys.
#[derive(Clone, Debug)]
pub struct LiveConfig {
    /// Part 1: on sampled batches, pool the features of every candidate ramp point and score
    /// every ramp's head on them off the request path, so ramp sets are chosen on live evidence
    /// and start tuned. Off: candidates are judged on the bootstrap outputs only. Default `true`.
    pub shadow: bool,
    /// Largest fraction of batches that run shadow evaluation. The fraction used is lowered
    /// further so that its measured cost plus the active ramps' stays within `max_ramp_cost`.
    /// Default 1.0 (the cost budget decides).
    pub shadow_fraction: f64,
    /// Smallest fraction of batches that run shadow evaluation, even when the active ramps use
    /// the whole ramp budget: it keeps evidence for every candidate (and the measured cost of a
    /// shadow batch) current, so a cost estimate that came out high once cannot stop shadow
    /// evaluation for good. Its cost is measured and reported with the rest. Default 1/32.
    pub min_shadow_fraction: f64,
    /// Part 2: thresholds whose disagreement, as an exact (Clopper-Pearson) upper confidence
    /// bound on held-back evidence, stays within the budget. Off: tuned to `accuracy_budget *
    /// (1 - tuning_headroom)` on the evidence, as the paper mode. Default `true`.
    pub bound: bool,
    /// Confidence of that bound. Default 0.95.
    pub confidence: f64,
    /// Score the bootstrap inputs the first set is planned on with cross-fitted heads: each
    /// half scored by a head whose output layer was trained on the other half only. The
    /// ramps file's heads were (usually) trained on these very inputs, so their own scores are
    /// optimistic (MNIST grid ramps: 99.6% agreement on their training inputs, 88% held out)
    /// and thresholds tuned on them released too much at the start. Needs the bootstrap
    /// features and host heads. Default `true`.
    pub cross_fit_bootstrap: bool,
    /// Part 3: retrain the ramp heads on the model's own answers to live inputs (shadow
    /// samples), and swap a head in when it beats the serving one on held-out live samples.
    /// Needs `shadow`. Default `true`.
    pub learning: bool,
    /// New live samples between retraining runs, or half the samples with features when that
    /// is fewer (after a drift: runs at 192, 288, 432, ... samples). Default 256.
    pub retrain_every: usize,
    /// Live samples needed before the first retraining (and after a drift). Default 192.
    pub retrain_min: usize,
    /// Retrain on a background thread (serving) or inline (tests: deterministic). Default `true`.
    pub learn_in_background: bool,
    /// Most of one core the background retraining may use over time: after a run of `T`
    /// seconds the next starts no sooner than `T / learn_share` after that run began (a drift
    /// lifts the wait, and so does a ramp set that is off: those runs are small and urgent).
    /// Without it a video run spent 46.5 s of a core in 120 s on 11 runs (16 heads over up to
    /// 2,048 samples, up to 9.4 s a run) next to two compute threads on two cores. The learner
    /// thread runs in Linux's idle scheduling class (next to no CPU time from a busy core;
    /// nice 10 where that is refused), so the cap no longer protects serving there; it bounds
    /// the CPU time learning costs. At 0.1 (the default before idle scheduling) the heads that
    /// release most of video's frames came at request 1,367 of a 120 s run; at 0.5 at 909 and
    /// 984 (two runs). Where the thread keeps normal
    /// priority (not Linux), set it lower. In (0, 1]. Default 0.5.
    pub learn_share: f64,
    /// Part 4: a sequential (CUSUM) test on the released answers' disagreement tells a regime
    /// change from noise and shrinks the evidence to the samples after the estimated change
    /// point. Off: the paper's fixed-count drift alarm. Default `true`.
    pub drift_test: bool,
    /// CUSUM decision threshold (log-likelihood ratio units). Higher: fewer false alarms,
    /// slower detection. Default 10.0 (at half the budget no false alarm in 5 x 50,000 seeded inputs, where 8.0 had one in 31,000; a jump to 6% fires within 400 inputs, a real drift (tens of percent wrong) within a few).
    pub drift_threshold: f64,
    /// Most recent samples kept as evidence (and as retraining data). Default 2048.
    pub evidence_capacity: usize,
    /// Batches between re-evaluations of the ramp set on the evidence. Default 32.
    pub replan_every_batches: usize,
    /// Part 5: spend the measured slack. Every released answer is checked against the final
    /// layer, so the realized disagreement is known exactly, not estimated. The level the
    /// bounded tuner aims at moves with it, as in adaptive conformal inference: down by
    /// `spend_step` budgets at each wrong release, up a little at each other answered input,
    /// so that wrong releases average `spend_goal` of the budget over any long stretch (at
    /// most `1 / spend_step` wrong answers more than that, plus those of the last batch,
    /// whatever the stream; per regime: a detected drift restarts a level below the budget
    /// at the budget). On news and video the
    /// bound alone released 0-0.11% wrong answers against a 1% budget. Off: the tuner aims at
    /// the budget itself. Default `true`.
    pub spend_slack: bool,
    /// Share of `accuracy_budget` the realized disagreement is steered to. Below 1: the gap
    /// is the margin for the windows (at half the budget a 256-answer window holds 1.3 wrong
    /// releases on average; at 0.7 of it, with steps of a whole budget up to 3, the window
    /// guard closed four times in a 300 s news run and cost more exits than the spending won).
    /// Default 0.5.
    pub spend_goal: f64,
    /// How far one wrong release lowers the level, in budgets (the other inputs raise it by
    /// `spend_step * spend_goal * accuracy_budget` each: one budget in 400 inputs at the
    /// defaults). Larger steps react faster and promise less slack (`1 / spend_step` wrong
    /// releases above the goal). Default 0.5.
    pub spend_step: f64,
    /// Highest level, in budgets: while the realized disagreement stays below the goal the
    /// level climbs, and a stretch where nothing is wrong must not wind it up without end.
    /// The promise above does not depend on it, and the window guard bounds what a wound-up
    /// level can cost in any window. At 2.5 a video run (dcc2e2c) aimed at the cap in 14 of
    /// the 33 tunings of its second half with 0.26% of its answers wrong against a goal of
    /// 0.5%: the evidence, rescored by cross-fitted heads after every swap, judges the
    /// serving heads more harshly than the stream does. Default 4.
    pub spend_cap: f64,
    /// The window guard: answered inputs over which the agreement must stay at least
    /// `window_floor`. When the last `window` hold as many wrong releases as that allows,
    /// releases stop until one leaves the window; one short of it, the tuner aims no higher
    /// than the budget. Default 256.
    pub window: usize,
    /// Lowest agreement of a window. Default 0.985 (3 wrong releases in 256).
    pub window_floor: f64,
}

impl LiveConfig {
    /// Wrong releases a window of `window` answers may hold and still agree on `window_floor`.
    pub fn window_max_wrong(&self) -> usize {
        ((self.window as f64) * (1.0 - self.window_floor) + 1e-9).floor() as usize
    }
}

impl Default for LiveConfig {
    fn default() -> Self {
        LiveConfig {
            shadow: true,
            shadow_fraction: 1.0,
            min_shadow_fraction: 1.0 / 32.0,
            bound: true,
            confidence: 0.95,
            cross_fit_bootstrap: true,
            learning: true,
            retrain_every: 256,
            retrain_min: 192,
            learn_in_background: true,
            learn_share: 0.5,
            drift_test: true,
            drift_threshold: 10.0,
            evidence_capacity: 2048,
            replan_every_batches: 32,
            spend_slack: true,
            spend_goal: 0.5,
            spend_step: 0.5,
            spend_cap: 4.0,
            window: 256,
            window_floor: 0.985,
        }
    }
}

/// Settings of the adaptation loops. Defaults follow the Apparate paper (section 4) where the
/// paper sets them; the family-specific ones come from [`ApparateConfig::vision`] /
/// [`ApparateConfig::language`].
#[derive(Clone, Debug)]
pub struct ApparateConfig {
    /// `false` serves the plain model: no ramps run, nothing adapts. Default `true`.
    pub enabled: bool,
    /// The loops: [`Mode::Live`] (default) or [`Mode::Paper`].
    pub mode: Mode,
    /// Settings of the live loops.
    pub live: LiveConfig,
    /// Largest tolerated disagreement with the model, per window. Default 0.01.
    pub accuracy_budget: f64,
    /// Share of the budget the tuner keeps unused: it tunes for a disagreement of at most
    /// `accuracy_budget * (1 - tuning_headroom)` on the window, and a violation is declared only
    /// past the full budget. Thresholds pushed by the search right up to the limit on a window
    /// miss it on the inputs that follow (the search stops just before the next disagreement):
    /// on the MNIST replay (12,000 inputs at 800/s) the released answers agreed with the model
    /// on 98.77% with a headroom of 0.5 and 99.15% with 0.75. The gap is also the loops'
    /// hysteresis. Default 0.75.
    pub tuning_headroom: f64,
    /// Window of the threshold tuner: the last this many batches... Default 4.
    pub window_batches: usize,
    /// ... but at least this many samples. Default 256.
    pub window_min_samples: usize,
    /// Violating batches between ramp checks before the offending ramps are switched off until
    /// the next tuning. Default 2.
    pub violations_before_disable: usize,
    /// Drift alarm: when the last `drift_samples` released answers hold `drift_errors` or more
    /// disagreements (improbable within budget: at the tuner's 0.25% target, 3 or more in 64
    /// happen with probability 0.05%), the ramps with wrong exits among them are switched off
    /// at once, the window restarts from those samples, and the ramp set retunes when its
    /// window is full again. The window check alone needs hundreds of samples to see a drift
    /// (at 30 frames/s and batches of one: seconds of wrong answers). Defaults 64 and 3.
    pub drift_samples: usize,
    pub drift_errors: usize,
    /// Batches between ramp adjustments. Default 30 (vision), 100 (language).
    pub adjust_every_batches: usize,
    /// Batches whose exit fractions the ramp utilities use. Default 20.
    pub utility_batches: usize,
    /// A retune is kept instead of changing ramps when it raises the predicted saving by this
    /// much (fraction of V). Default 0.02 (vision), 0.05 (language).
    pub retune_margin: f64,
    /// At most this many active ramps. Default 3 (vision), 2 (language).
    pub max_ramps: usize,
    /// Total active ramp cost at most this fraction of the model's latency. Default 0.05.
    pub max_ramp_cost: f64,
    /// Ramp sets remembered to damp oscillation: the adjuster never returns to one of the last
    /// this many sets. Default 4.
    pub history: usize,
    /// Weight of a live stage timing in the running profile (exponential average). Default 0.1.
    pub profile_update_weight: f64,
    /// Serve exactly these ramps (points) with these thresholds and never adapt: a static
    /// early-exit baseline (one threshold set tuned once, BranchyNet/DeeBERT style), or a fixed
    /// configuration for tests. Default `None`.
    pub fixed: Option<Vec<(String, f32)>>,
    /// The oracle of the benchmarks: each input is answered at the first active ramp whose
    /// answer equals the model's final one. That is only known at the end of the batch, so the
    /// answer is completed then and *back-dated* (its `released_at` and timings) to that ramp:
    /// an upper bound on what early exits can give, not a serving mode. Use with `fixed` ramps
    /// at threshold 0. Default `false`.
    pub oracle: bool,
    /// Search settings of the threshold tuner (its `accuracy_budget` is set from this config's
    /// budget and headroom).
    pub tuner: TunerConfig,
    /// Nice value the engine's adapter thread (the one that runs these loops) gives itself
    /// (Linux; 0..=19, 0 leaves it as it is). Its work is small on average (under 1% of a core
    /// on MNIST-drift at 30 batches/s) but comes in bursts when it plans, and a burst should give
    /// way to the request path's other threads (submission, release, a server's I/O). At nice
    /// 10 the scheduler weighs it at about a tenth of a normal thread while they contend, still
    /// far more than its average need. (It did not remove the load generator's lateness in
    /// Apparate's benchmark slices, whose cause is not settled: docs/results.md.) Default 10.
    pub adapter_nice: usize,
}

impl ApparateConfig {
    pub fn vision() -> ApparateConfig {
        ApparateConfig {
            enabled: true,
            mode: Mode::Live,
            live: LiveConfig::default(),
            accuracy_budget: 0.01,
            tuning_headroom: 0.75,
            window_batches: 4,
            window_min_samples: 256,
            violations_before_disable: 2,
            drift_samples: 64,
            drift_errors: 3,
            adjust_every_batches: 30,
            utility_batches: 20,
            retune_margin: 0.02,
            max_ramps: 3,
            max_ramp_cost: 0.05,
            history: 4,
            profile_update_weight: 0.1,
            fixed: None,
            oracle: false,
            tuner: TunerConfig::default(),
            adapter_nice: 10,
        }
    }

    pub fn language() -> ApparateConfig {
        ApparateConfig {
            adjust_every_batches: 100,
            retune_margin: 0.05,
            max_ramps: 2,
            ..ApparateConfig::vision()
        }
    }

    /// [`Self::language`] for text models, [`Self::vision`] for CNNs.
    pub fn for_family(family: &Family) -> ApparateConfig {
        match family {
            Family::Bert(_) | Family::Llama(_) => ApparateConfig::language(),
            Family::Cnn(_) => ApparateConfig::vision(),
        }
    }
}

impl Default for ApparateConfig {
    fn default() -> Self {
        ApparateConfig::vision()
    }
}

/// Largest count knob accepted where no tighter bound applies: far above any useful setting,
/// low enough that a typo (`1e8`) is refused instead of allocating or looping for it.
pub const MAX_COUNT: usize = 1_000_000;

impl ApparateConfig {
    /// Checks every knob against its range; the error names the knob and the range. Whether
    /// `fixed` points exist is checked when the ramps file is known (engine start).
    pub fn validate(&self) -> Result<()> {
        use Bound::{Excluded, Included};
        check_real(
            "accuracy_budget",
            self.accuracy_budget,
            Excluded(0.0),
            Excluded(1.0),
        )?;
        check_real(
            "tuning_headroom",
            self.tuning_headroom,
            Included(0.0),
            Excluded(1.0),
        )?;
        check_count("window_batches", self.window_batches, 1, MAX_COUNT)?;
        check_count("window_min_samples", self.window_min_samples, 0, MAX_COUNT)?;
        check_count(
            "violations_before_disable",
            self.violations_before_disable,
            1,
            MAX_COUNT,
        )?;
        check_count("drift_samples", self.drift_samples, 1, MAX_COUNT)?;
        // `drift_errors`: 0, or more than `drift_samples`, switches the alarm off; any count is
        // meaningful.
        check_count(
            "adjust_every_batches",
            self.adjust_every_batches,
            1,
            MAX_COUNT,
        )?;
        check_count("utility_batches", self.utility_batches, 1, MAX_COUNT)?;
        check_real(
            "retune_margin",
            self.retune_margin,
            Included(0.0),
            Included(1.0),
        )?;
        check_count("max_ramps", self.max_ramps, 0, 1024)?;
        check_real(
            "max_ramp_cost",
            self.max_ramp_cost,
            Included(0.0),
            Included(1.0),
        )?;
        check_count("history", self.history, 1, 10_000)?;
        check_count("adapter_nice", self.adapter_nice, 0, 19)?;
        check_real(
            "profile_update_weight",
            self.profile_update_weight,
            Included(0.0),
            Included(1.0),
        )?;
        if let Some(fixed) = &self.fixed {
            for (i, (p, t)) in fixed.iter().enumerate() {
                if p.trim().is_empty() {
                    return Err(Error::config(
                        "fixed",
                        format!("an empty point name (entry {i})"),
                        "ramp points of the ramps file",
                    ));
                }
                if fixed[..i].iter().any(|(q, _)| q == p) {
                    return Err(Error::config(
                        "fixed",
                        format!("`{p}` given twice"),
                        "a list of distinct ramp points",
                    ));
                }
                check_real(
                    &format!("fixed threshold of `{p}`"),
                    *t as f64,
                    Included(0.0),
                    Included(1.0),
                )?;
            }
        }
        let l = &self.live;
        check_real(
            "live.shadow_fraction",
            l.shadow_fraction,
            Included(0.0),
            Included(1.0),
        )?;
        check_real(
            "live.min_shadow_fraction",
            l.min_shadow_fraction,
            Included(0.0),
            Included(l.shadow_fraction),
        )?;
        check_real(
            "live.confidence",
            l.confidence,
            Excluded(0.5),
            Excluded(1.0),
        )?;
        check_count("live.retrain_every", l.retrain_every, 1, MAX_COUNT)?;
        check_real(
            "live.learn_share",
            l.learn_share,
            Excluded(0.0),
            Included(1.0),
        )?;
        check_count("live.retrain_min", l.retrain_min, 8, MAX_COUNT)?;
        check_real(
            "live.drift_threshold",
            l.drift_threshold,
            Excluded(0.0),
            Included(1e6),
        )?;
        check_count("live.evidence_capacity", l.evidence_capacity, 64, MAX_COUNT)?;
        check_count(
            "live.replan_every_batches",
            l.replan_every_batches,
            1,
            MAX_COUNT,
        )?;
        check_real(
            "live.spend_goal",
            l.spend_goal,
            Excluded(0.0),
            Included(1.0),
        )?;
        check_real(
            "live.spend_step",
            l.spend_step,
            Excluded(0.0),
            Included(100.0),
        )?;
        check_real(
            "live.spend_cap",
            l.spend_cap,
            Included(1.0),
            Included(100.0),
        )?;
        check_count("live.window", l.window, 16, MAX_COUNT)?;
        check_real(
            "live.window_floor",
            l.window_floor,
            Excluded(0.0),
            Excluded(1.0),
        )?;
        if l.window_max_wrong() == 0 {
            return Err(Error::config(
                "live.window_floor",
                l.window_floor,
                format!(
                    "(0, {}]: a window of {} must be allowed one wrong answer",
                    1.0 - 1.0 / l.window as f64,
                    l.window
                ),
            ));
        }
        if self.tuner.initial_steps.is_empty() {
            return Err(Error::config(
                "tuner.initial_steps",
                "an empty list",
                "one or more steps",
            ));
        }
        for &s in &self.tuner.initial_steps {
            check_real(
                "tuner.initial_steps",
                s as f64,
                Excluded(0.0),
                Included(1.0),
            )?;
        }
        // A step of 0 (or NaN) would never fall below the minimum: the search would not end.
        check_real(
            "tuner.min_step",
            self.tuner.min_step as f64,
            Excluded(0.0),
            Included(1.0),
        )?;
        Ok(())
    }
}

/// `v` is finite and within `lo`..`hi`, or an [`Error::Config`] naming `knob` and the range.
pub fn check_real(knob: &str, v: f64, lo: Bound<f64>, hi: Bound<f64>) -> Result<()> {
    let above = match lo {
        Bound::Included(l) => v >= l,
        Bound::Excluded(l) => v > l,
        Bound::Unbounded => true,
    };
    let below = match hi {
        Bound::Included(h) => v <= h,
        Bound::Excluded(h) => v < h,
        Bound::Unbounded => true,
    };
    if v.is_finite() && above && below {
        return Ok(());
    }
    let (open, l) = match lo {
        Bound::Included(l) => ("[", l.to_string()),
        Bound::Excluded(l) => ("(", l.to_string()),
        Bound::Unbounded => ("(", "-inf".into()),
    };
    let (close, h) = match hi {
        Bound::Included(h) => ("]", h.to_string()),
        Bound::Excluded(h) => (")", h.to_string()),
        Bound::Unbounded => (")", "inf".into()),
    };
    Err(Error::config(knob, v, format!("{open}{l}, {h}{close}")))
}

/// `lo <= v <= hi`, or an [`Error::Config`] naming `knob` and the range.
pub fn check_count(knob: &str, v: usize, lo: usize, hi: usize) -> Result<()> {
    if (lo..=hi).contains(&v) {
        Ok(())
    } else {
        Err(Error::config(knob, v, format!("{lo}..={hi}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_nonsense_is_refused_by_name() {
        ApparateConfig::vision().validate().unwrap();
        ApparateConfig::language().validate().unwrap();
        let bad = |f: fn(&mut ApparateConfig), knob: &str| {
            let mut c = ApparateConfig::vision();
            f(&mut c);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(knob), "{e}");
        };
        bad(|c| c.accuracy_budget = 2.0, "accuracy_budget");
        bad(|c| c.accuracy_budget = -0.5, "accuracy_budget");
        bad(|c| c.accuracy_budget = f64::NAN, "accuracy_budget");
        bad(|c| c.tuning_headroom = 5.0, "tuning_headroom");
        bad(|c| c.adjust_every_batches = 0, "adjust_every_batches");
        bad(|c| c.window_batches = 0, "window_batches");
        bad(|c| c.tuner.min_step = 0.0, "tuner.min_step");
        bad(|c| c.tuner.initial_steps.clear(), "tuner.initial_steps");
        bad(|c| c.live.learn_share = 0.0, "live.learn_share");
        bad(|c| c.live.learn_share = 1.5, "live.learn_share");
        bad(|c| c.live.spend_goal = 0.0, "live.spend_goal");
        bad(|c| c.live.spend_cap = 0.5, "live.spend_cap");
        bad(|c| c.live.window_floor = 0.999, "must be allowed one wrong");
        assert_eq!(LiveConfig::default().window_max_wrong(), 3);
        bad(
            |c| c.fixed = Some(vec![("a".into(), 0.1), ("a".into(), 0.2)]),
            "twice",
        );
        bad(
            |c| c.fixed = Some(vec![("a".into(), 1.5)]),
            "fixed threshold",
        );
        let e = check_real("x", 2.0, Bound::Excluded(0.0), Bound::Excluded(1.0)).unwrap_err();
        assert_eq!(e.to_string(), "x = 2 is outside (0, 1)");
    }
}
