//! Apparate's two control loops (section 4), off the request path: threshold tuning (fast,
//! accuracy first) and ramp adjustment (slow, latency first), plus the initial ramp placement.
//!
//! The [`Controller`] is plain state fed one [`BatchRecord`] at a time (the serving runtime runs
//! it on its own thread); it answers with a new [`ActiveConfig`] when thresholds or ramps change,
//! and logs every decision as an [`AdaptEvent`]. It is deterministic, so tests drive it directly
//! with recorded ramp outputs.

pub mod latency;
pub mod tuner;

use std::collections::VecDeque;

use serde::Serialize;

use crate::format::Family;
use crate::profile::Profile;
use latency::LatencyModel;
use tuner::{Samples, TunerConfig, evaluate, tune};

/// Settings of the adaptation loops. Defaults follow the Apparate paper (section 4); the
/// family-specific ones come from [`ApparateConfig::vision`] / [`ApparateConfig::language`].
#[derive(Clone, Debug)]
pub struct ApparateConfig {
    /// `false` serves the plain model: no ramps run, nothing adapts. Default `true`.
    pub enabled: bool,
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
}

impl ApparateConfig {
    pub fn vision() -> ApparateConfig {
        ApparateConfig {
            enabled: true,
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
            Family::Bert(_) => ApparateConfig::language(),
            Family::Cnn(_) => ApparateConfig::vision(),
        }
    }
}

impl Default for ApparateConfig {
    fn default() -> Self {
        ApparateConfig::vision()
    }
}

/// What the executor runs: which ramps (indices into the candidate list, stage order) with which
/// thresholds. Swapped as a whole between batches.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ActiveConfig {
    /// Increases with every change.
    pub id: u64,
    pub ramps: Vec<usize>,
    pub thresholds: Vec<f32>,
}

/// What one batch did, as the executor records it.
#[derive(Clone, Debug)]
pub struct BatchRecord {
    /// The [`ActiveConfig::id`] it ran under.
    pub config_id: u64,
    /// Per input, per active ramp: `(u, ramp class == final class)`.
    pub rows: Vec<Vec<(f32, bool)>>,
    /// Per input: the active ramp it was released at (index into the active list), or `None`.
    pub exited: Vec<Option<usize>>,
    /// Per input: whether the released answer equals the final one.
    pub agreed: Vec<bool>,
    /// Wall time of each stage, when the backend runs synchronously (else `None`).
    pub stage_ms: Option<Vec<f64>>,
}

impl BatchRecord {
    pub fn len(&self) -> usize {
        self.rows.len()
    }
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
    pub fn accuracy(&self) -> f64 {
        let n = self.agreed.len().max(1) as f64;
        self.agreed.iter().filter(|a| **a).count() as f64 / n
    }
}

/// One decision of the loops, for logs and the live display.
#[derive(Clone, Debug, Serialize)]
pub struct AdaptEvent {
    /// Batches seen when it happened.
    pub batch: u64,
    /// Inputs seen when it happened (the answered requests, in completion order).
    pub inputs: u64,
    /// `place`, `tune`, `violation`, `disable`, `retune`, `remove`, `add`, `probe`, `keep`.
    pub kind: &'static str,
    pub why: String,
    /// Active ramp points and thresholds after the decision.
    pub ramps: Vec<String>,
    pub thresholds: Vec<f32>,
    /// Predicted latency saving (fraction of V) and window agreement of the new configuration.
    pub predicted_saving: f64,
    pub window_accuracy: f64,
}

/// Most rows kept as the tuner's evidence after a drift alarm.
const POST_DRIFT_ROWS: usize = 2048;

/// The state of both loops.
pub struct Controller {
    cfg: ApparateConfig,
    /// Every ramp the runtime may activate: point names in stage order.
    points: Vec<String>,
    /// Candidates late enough to be useless are never activated (see `allowed`).
    allowed: Vec<bool>,
    profile: Profile,
    active: ActiveConfig,
    tuned: bool,
    window: VecDeque<BatchRecord>,
    recent_exits: VecDeque<Vec<f64>>,
    recent_sizes: VecDeque<usize>,
    batches: u64,
    inputs: u64,
    since_adjust: usize,
    violations: usize,
    history: VecDeque<Vec<usize>>,
    /// Realised releases since the last drift action: `(active ramp or None, agreed)`.
    recent: VecDeque<(Option<usize>, bool)>,
    /// Every candidate ramp's outputs on the bootstrap inputs (per input), used as a prior by
    /// the tuner until a drift alarm says the inputs have changed.
    prior: Option<Vec<Vec<(f32, bool)>>>,
    /// After a drift alarm: every row of the active ramps since the alarm (or since the last
    /// ramp change), up to `POST_DRIFT_ROWS`, so the tuner's evidence grows back past the window.
    post: VecDeque<Vec<(f32, bool)>>,
    events: Vec<AdaptEvent>,
}

impl Controller {
    /// A controller over the ramps at `points` (stage order). With `bootstrap` (the outputs of
    /// every candidate ramp on the bootstrap inputs) the first ramps are placed greedily;
    /// without, the first `max_ramps` allowed candidates spread evenly start (untuned).
    pub fn new(
        cfg: ApparateConfig,
        points: Vec<String>,
        profile: Profile,
        bootstrap: Option<&Samples>,
    ) -> Controller {
        let mut cfg = cfg;
        // The tuner aims inside the budget (see `tuning_headroom`).
        cfg.tuner.accuracy_budget =
            cfg.accuracy_budget * (1.0 - cfg.tuning_headroom.clamp(0.0, 1.0));
        let base = profile.for_batch(1).cloned();
        let allowed = points
            .iter()
            .map(|p| {
                base.as_ref().is_some_and(|b| {
                    match (b.until_ms(p), b.ramp_ms(p)) {
                        // Exiting there must beat finishing the model.
                        (Some(v), Some(o)) => v + o < b.vanilla_ms(),
                        _ => false,
                    }
                })
            })
            .collect();
        let points_len = points.len();
        let mut c = Controller {
            cfg,
            points,
            allowed,
            profile,
            active: ActiveConfig {
                id: 0,
                ramps: Vec::new(),
                thresholds: Vec::new(),
            },
            tuned: false,
            window: VecDeque::new(),
            recent_exits: VecDeque::new(),
            recent_sizes: VecDeque::new(),
            batches: 0,
            inputs: 0,
            since_adjust: 0,
            violations: 0,
            history: VecDeque::new(),
            recent: VecDeque::new(),
            prior: bootstrap.filter(|b| b.ramps == points_len).map(|b| {
                (0..b.len())
                    .map(|i| {
                        (0..b.ramps)
                            .map(|r| (b.u[r * b.len() + i], b.correct[r * b.len() + i]))
                            .collect()
                    })
                    .collect()
            }),
            post: VecDeque::new(),
            events: Vec::new(),
        };
        if let Some(fixed) = c.cfg.fixed.clone() {
            let mut pairs: Vec<(usize, f32)> = fixed
                .iter()
                .filter_map(|(p, t)| c.points.iter().position(|x| x == p).map(|i| (i, *t)))
                .collect();
            pairs.sort_by_key(|p| p.0);
            c.active = ActiveConfig {
                id: 1,
                ramps: pairs.iter().map(|p| p.0).collect(),
                thresholds: pairs.iter().map(|p| p.1).collect(),
            };
            c.log(
                "place",
                "fixed configuration: no adaptation".into(),
                0.0,
                1.0,
            );
        } else if c.cfg.enabled {
            c.place(bootstrap);
        }
        c
    }

    pub fn active(&self) -> &ActiveConfig {
        &self.active
    }

    pub fn points(&self) -> &[String] {
        &self.points
    }

    /// Takes the events logged since the last call.
    pub fn drain_events(&mut self) -> Vec<AdaptEvent> {
        std::mem::take(&mut self.events)
    }

    /// The running profile (refreshed by live timings).
    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    fn typical_batch(&self) -> usize {
        let n = self.recent_sizes.len();
        if n == 0 {
            return 1;
        }
        (self.recent_sizes.iter().sum::<usize>() as f64 / n as f64).round() as usize
    }

    fn latency(&self, ramps: &[usize]) -> LatencyModel {
        let names: Vec<&str> = ramps.iter().map(|&r| self.points[r].as_str()).collect();
        self.profile
            .for_batch(self.typical_batch().max(1))
            .and_then(|b| LatencyModel::from_profile(b, &names))
            .unwrap_or(LatencyModel {
                vanilla_ms: 0.0,
                until_ms: vec![0.0; ramps.len()],
                ramp_ms: vec![0.0; ramps.len()],
            })
    }

    fn within_budget(&self, ramps: &[usize]) -> bool {
        ramps.len() <= self.cfg.max_ramps
            && self.latency(ramps).ramp_cost_fraction() <= self.cfg.max_ramp_cost + 1e-12
    }

    fn log(&mut self, kind: &'static str, why: String, saving: f64, accuracy: f64) {
        self.events.push(AdaptEvent {
            batch: self.batches,
            inputs: self.inputs,
            kind,
            why,
            ramps: self
                .active
                .ramps
                .iter()
                .map(|&r| self.points[r].clone())
                .collect(),
            thresholds: self.active.thresholds.clone(),
            predicted_saving: saving,
            window_accuracy: accuracy,
        });
    }

    /// Initial placement: greedily add the candidate that most raises the tuned saving on the
    /// bootstrap outputs, within the budget, while it helps.
    fn place(&mut self, bootstrap: Option<&Samples>) {
        let candidates: Vec<usize> = (0..self.points.len())
            .filter(|&r| self.allowed[r])
            .collect();
        let Some(boot) = bootstrap.filter(|b| !b.is_empty() && b.ramps == self.points.len()) else {
            // No bootstrap outputs: spread `max_ramps` over the allowed candidates.
            let m = self.cfg.max_ramps.min(candidates.len());
            let mut set: Vec<usize> = (0..m)
                .map(|i| candidates[(2 * i + 1) * candidates.len() / (2 * m)])
                .collect();
            while !set.is_empty() && !self.within_budget(&set) {
                set.pop();
            }
            self.set_ramps(
                set,
                "place",
                "no bootstrap outputs: ramps spread evenly".into(),
            );
            return;
        };
        let mut set: Vec<usize> = Vec::new();
        let mut best_saving = 0.0;
        let mut best_tau = Vec::new();
        loop {
            let mut best: Option<(Vec<usize>, f64, Vec<f32>)> = None;
            for &c in &candidates {
                if set.contains(&c) {
                    continue;
                }
                let mut cand = set.clone();
                cand.push(c);
                cand.sort_unstable();
                if !self.within_budget(&cand) {
                    continue;
                }
                let t = tune(&boot.select(&cand), &self.latency(&cand), &self.cfg.tuner);
                if best.as_ref().is_none_or(|b| t.eval.saving > b.1 + 1e-12) {
                    best = Some((cand, t.eval.saving, t.thresholds));
                }
            }
            match best {
                Some((cand, saving, tau)) if saving > best_saving + 1e-9 => {
                    set = cand;
                    best_saving = saving;
                    best_tau = tau;
                }
                _ => break,
            }
        }
        let why = format!("greedy placement on {} bootstrap inputs", boot.len());
        self.active = ActiveConfig {
            id: self.active.id + 1,
            ramps: set.clone(),
            thresholds: if best_tau.len() == set.len() {
                best_tau
            } else {
                vec![0.0; set.len()]
            },
        };
        self.remember(set.clone());
        let eval = evaluate(
            &boot.select(&set),
            &self.active.thresholds,
            &self.latency(&set),
        );
        // Thresholds tuned on the bootstrap data stand until the live window says otherwise.
        self.tuned = true;
        self.log("place", why, eval.saving, eval.accuracy);
    }

    fn remember(&mut self, set: Vec<usize>) {
        self.history.push_back(set);
        while self.history.len() > self.cfg.history.max(1) {
            self.history.pop_front();
        }
    }

    /// Switches to a new ramp set with zero thresholds; the next batch tunes it.
    fn set_ramps(&mut self, set: Vec<usize>, kind: &'static str, why: String) {
        self.active = ActiveConfig {
            id: self.active.id + 1,
            thresholds: vec![0.0; set.len()],
            ramps: set.clone(),
        };
        self.remember(set.clone());
        self.window.clear();
        self.post.clear();
        self.recent_exits.clear();
        self.tuned = false;
        self.violations = 0;
        // With the bootstrap outputs (no drift seen), the new set starts tuned on them instead
        // of running without exits until its window fills.
        if let Some(prior) = &self.prior {
            let rows: Vec<Vec<(f32, bool)>> = prior
                .iter()
                .map(|row| set.iter().map(|&r| row[r]).collect())
                .collect();
            let lat = self.latency(&set);
            let t = tune(&Samples::from_rows(set.len(), &rows), &lat, &self.cfg.tuner);
            self.active.thresholds = t.thresholds;
            self.tuned = true;
            self.log(kind, why, t.eval.saving, t.eval.accuracy);
            return;
        }
        self.log(kind, why, 0.0, 1.0);
    }

    /// What the tuner tunes on: the window, plus (until a drift alarm) the bootstrap outputs of
    /// the active ramps. A window of a few hundred samples alone lets the search push thresholds
    /// to where the next inputs disagree (the winner's curse: on the MNIST replay online-only
    /// tuning released 97.7% agreeing answers before any drift, thresholds tuned once on the
    /// 2,000 bootstrap outputs 99.6%); the prior keeps thresholds honest and the window keeps
    /// them current.
    fn tuning_samples(&self) -> Samples {
        if self.prior.is_none() && self.post.len() > self.window.iter().map(BatchRecord::len).sum()
        {
            let rows: Vec<Vec<(f32, bool)>> = self.post.iter().cloned().collect();
            return Samples::from_rows(self.active.ramps.len(), &rows);
        }
        let mut rows: Vec<Vec<(f32, bool)>> = self
            .window
            .iter()
            .flat_map(|b| b.rows.iter().cloned())
            .collect();
        if let Some(prior) = &self.prior {
            rows.extend(
                prior
                    .iter()
                    .map(|row| self.active.ramps.iter().map(|&r| row[r]).collect()),
            );
        }
        Samples::from_rows(self.active.ramps.len(), &rows)
    }

    fn window_samples(&self) -> Samples {
        let rows: Vec<Vec<(f32, bool)>> = self
            .window
            .iter()
            .flat_map(|b| b.rows.iter().cloned())
            .collect();
        Samples::from_rows(self.active.ramps.len(), &rows)
    }

    fn retune(&mut self, kind: &'static str, why: String) {
        let s = self.tuning_samples();
        let lat = self.latency(&self.active.ramps);
        let mut t = tune(&s, &lat, &self.cfg.tuner);
        // The prior must not outvote the recent inputs: if the result breaks the budget on the
        // window itself, tune on the window alone.
        let window = self.window_samples();
        if !window.is_empty()
            && evaluate(&window, &t.thresholds, &lat).accuracy < 1.0 - self.cfg.accuracy_budget
        {
            t = tune(&window, &lat, &self.cfg.tuner);
        }
        self.active.thresholds = t.thresholds;
        self.active.id += 1;
        self.tuned = true;
        self.log(kind, why, t.eval.saving, t.eval.accuracy);
    }

    /// Refreshes the running profile with a batch's live stage timings.
    fn refresh_profile(&mut self, batch: usize, stage_ms: &[f64]) {
        let w = self.cfg.profile_update_weight;
        if let Some(p) = self.profile.batches.iter_mut().find(|p| p.batch == batch)
            && p.stages.len() == stage_ms.len()
        {
            let old_sum: f64 = p.stages.iter().map(|s| s.median_ms).sum();
            for (s, &t) in p.stages.iter_mut().zip(stage_ms) {
                s.median_ms = (1.0 - w) * s.median_ms + w * t;
            }
            let new_sum: f64 = p.stages.iter().map(|s| s.median_ms).sum();
            if old_sum > 0.0 {
                p.vanilla.median_ms *= new_sum / old_sum;
            }
        }
    }

    /// Feeds one batch; returns the configuration to run from now on when it changed.
    pub fn on_batch(&mut self, rec: BatchRecord) -> Option<ActiveConfig> {
        self.batches += 1;
        self.inputs += rec.len() as u64;
        if rec.is_empty() {
            return None;
        }
        if let Some(ms) = &rec.stage_ms {
            self.refresh_profile(rec.len(), ms);
        }
        if !self.cfg.enabled || self.cfg.fixed.is_some() || rec.config_id != self.active.id {
            // Ran under an older configuration: its rows do not match the active ramps.
            return None;
        }
        let before = self.active.clone();
        let k = self.active.ramps.len();
        let n = rec.len() as f64;
        let mut fractions = vec![0.0; k + 1];
        for e in &rec.exited {
            fractions[e.unwrap_or(k).min(k)] += 1.0 / n;
        }
        self.recent_exits.push_back(fractions);
        while self.recent_exits.len() > self.cfg.utility_batches.max(1) {
            self.recent_exits.pop_front();
        }
        self.recent_sizes.push_back(rec.len());
        while self.recent_sizes.len() > self.cfg.utility_batches.max(1) {
            self.recent_sizes.pop_front();
        }
        for (e, a) in rec.exited.iter().zip(&rec.agreed) {
            self.recent.push_back((*e, *a));
        }
        if self.prior.is_none() {
            self.post.extend(rec.rows.iter().cloned());
            while self.post.len() > POST_DRIFT_ROWS {
                self.post.pop_front();
            }
        }
        while self.recent.len() > self.cfg.drift_samples.max(1) {
            self.recent.pop_front();
        }
        self.window.push_back(rec);
        let wrong_recent = self.recent.iter().filter(|(_, a)| !a).count();
        if k > 0 && self.cfg.drift_errors > 0 && wrong_recent >= self.cfg.drift_errors {
            let mut off: Vec<usize> = self
                .recent
                .iter()
                .filter(|(_, a)| !a)
                .filter_map(|(e, _)| *e)
                .collect();
            off.sort_unstable();
            off.dedup();
            for &r in &off {
                self.active.thresholds[r] = 0.0;
            }
            self.active.id += 1;
            // Only the newest samples describe the inputs now.
            let latest = self.window.pop_back().expect("just pushed");
            self.window.clear();
            self.window.push_back(latest);
            self.recent.clear();
            self.tuned = false;
            self.violations = 0;
            // The bootstrap inputs no longer describe the stream, nor do the rows before now.
            self.prior = None;
            self.post.clear();
            let names: Vec<&str> = off
                .iter()
                .map(|&r| self.points[self.active.ramps[r]].as_str())
                .collect();
            self.log(
                "drift",
                format!(
                    "{wrong_recent} of the last {} answers disagreed: {} off, retuning on new samples",
                    self.cfg.drift_samples,
                    names.join(", ")
                ),
                0.0,
                1.0 - wrong_recent as f64 / self.cfg.drift_samples.max(1) as f64,
            );
            return Some(self.active.clone());
        }
        let mut total: usize = self.window.iter().map(BatchRecord::len).sum();
        while self.window.len() > self.cfg.window_batches.max(1)
            && total - self.window[0].len() >= self.cfg.window_min_samples
        {
            total -= self.window[0].len();
            self.window.pop_front();
        }

        if k > 0 {
            // The constraint is checked on the window (at least `window_min_samples` inputs),
            // not on the last batch alone: in a batch of 6 one wrong exit is 17% disagreement,
            // and switching ramps off on such noise would leave them off most of the time.
            let floor = 1.0 - self.cfg.accuracy_budget;
            let lat = self.latency(&self.active.ramps);
            let now = evaluate(&self.window_samples(), &self.active.thresholds, &lat);
            if total < self.cfg.window_min_samples {
                // Too few samples to judge or tune: one disagreement in 80 inputs reads as a
                // 1.25% violation, and thresholds tuned on so little over-fit (measured on the
                // MNIST replay). A new ramp set runs at its start thresholds (0: no exits)
                // until its window is full.
            } else if !self.tuned {
                self.retune(
                    "tune",
                    format!("new ramp set, tuned on its first {total} samples"),
                );
                // Exits so far ran at threshold 0: utilities start from the tuned thresholds.
                self.recent_exits.clear();
                self.since_adjust = 0;
            } else if now.accuracy < floor {
                self.violations += 1;
                if self.violations >= self.cfg.violations_before_disable {
                    // Switch off the ramp(s) with the most wrong exits on the window.
                    let worst = now.wrong.iter().copied().max().unwrap_or(0);
                    let off: Vec<usize> = (0..k)
                        .filter(|&r| worst > 0 && now.wrong[r] == worst)
                        .collect();
                    for &r in &off {
                        self.active.thresholds[r] = 0.0;
                    }
                    self.active.id += 1;
                    self.violations = 0;
                    let names: Vec<&str> = off
                        .iter()
                        .map(|&r| self.points[self.active.ramps[r]].as_str())
                        .collect();
                    let after = evaluate(&self.window_samples(), &self.active.thresholds, &lat);
                    self.log(
                        "disable",
                        format!(
                            "window agreement {:.4} < {floor:.4} again: {} off until the next tuning",
                            now.accuracy,
                            names.join(", ")
                        ),
                        after.saving,
                        after.accuracy,
                    );
                } else {
                    // A violation says the bootstrap prior does not describe the live inputs
                    // (ramps are more confident on the inputs they were trained on): from now
                    // on the evidence is live rows only, growing from this window.
                    if self.prior.take().is_some() {
                        self.post = self
                            .window
                            .iter()
                            .flat_map(|b| b.rows.iter().cloned())
                            .collect();
                    }
                    self.retune(
                        "violation",
                        format!(
                            "window agreement {:.4} < {floor:.4}: retuned on the window",
                            now.accuracy
                        ),
                    );
                }
            }
        }
        self.since_adjust += 1;
        // A ramp check also needs a full window of evidence about the current set: with
        // batches of one (30 frames/s), 30 batches are 30 inputs, on which utilities and a
        // retune are noise (measured: the set then churned every second on the vision bench).
        if self.since_adjust >= self.cfg.adjust_every_batches
            && (self.tuned || k == 0)
            && total >= self.cfg.window_min_samples
        {
            self.since_adjust = 0;
            self.violations = 0;
            self.adjust();
        }
        (self.active != before).then(|| self.active.clone())
    }

    /// Ramp adjustment (section 4.2).
    fn adjust(&mut self) {
        let k = self.active.ramps.len();
        let lat = self.latency(&self.active.ramps);
        let m = self.recent_exits.len().max(1) as f64;
        let mut fractions = vec![0.0; k + 1];
        for f in &self.recent_exits {
            for (a, b) in fractions.iter_mut().zip(f) {
                *a += b / m;
            }
        }
        if k > 0 && !self.window.is_empty() {
            // 1. A retune that clearly helps is enough.
            let s = self.tuning_samples();
            let current = evaluate(&s, &self.active.thresholds, &lat);
            let t = tune(&s, &lat, &self.cfg.tuner);
            if t.eval.saving > current.saving + self.cfg.retune_margin {
                self.active.thresholds = t.thresholds;
                self.active.id += 1;
                self.tuned = true;
                self.log(
                    "retune",
                    format!(
                        "predicted saving {:.3} -> {:.3}",
                        current.saving, t.eval.saving
                    ),
                    t.eval.saving,
                    t.eval.accuracy,
                );
                return;
            }
        }
        // 2. Remove negative-utility ramps; then move deeper, or probe earlier.
        let util = lat.utilities(&fractions);
        let removed: Vec<usize> = (0..k)
            .filter(|&i| util[i] < 0.0)
            .map(|i| self.active.ramps[i])
            .collect();
        let set: Vec<usize> = self
            .active
            .ramps
            .iter()
            .copied()
            .filter(|r| !removed.contains(r))
            .collect();
        let last_allowed = (0..self.points.len()).rev().find(|&r| self.allowed[r]);
        let Some(last_allowed) = last_allowed else {
            return;
        };
        let (kind, target, why) = if let Some(&deepest) = removed.iter().max() {
            (
                "remove",
                deepest + (last_allowed.saturating_sub(deepest)).div_ceil(2),
                format!(
                    "utility < 0 for {}: removed, one ramp moves deeper",
                    removed
                        .iter()
                        .map(|&r| self.points[r].as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
        } else {
            let earliest = set.first().copied().unwrap_or(last_allowed + 1);
            (
                "probe",
                earliest / 2,
                "every ramp pays off: probing an earlier position".into(),
            )
        };
        // The nearest usable candidate to `target`, not active, within budget, and not
        // leading back to a recent ramp set.
        let mut order: Vec<usize> = (0..self.points.len())
            .filter(|&r| self.allowed[r] && !set.contains(&r))
            .collect();
        order.sort_by_key(|&r| (r.abs_diff(target), r));
        let mut chosen = None;
        for r in order {
            let mut cand = set.clone();
            cand.push(r);
            cand.sort_unstable();
            if !self.within_budget(&cand) || self.history.contains(&cand) {
                continue;
            }
            chosen = Some(cand);
            break;
        }
        match chosen {
            Some(cand) => self.set_ramps(cand, kind, why),
            // Removing a ramp that costs more than it saves always happens (latency first).
            None if !removed.is_empty() => {
                self.set_ramps(set, "remove", format!("{why} (no new position fits)"))
            }
            None => self.log(
                "keep",
                "every ramp pays off and no other ramp fits the budget (or only a recent set)"
                    .into(),
                0.0,
                1.0,
            ),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::models::bert::synthetic::SplitMix;
    use crate::profile::{BatchProfile, PROFILE_VERSION, Timing};

    /// A model of `stages` equal stages (10 ms each) with a ramp after each inner one costing
    /// `ramp_ms`.
    pub(crate) fn profile(stages: usize, ramp_ms: f64) -> (Profile, Vec<String>) {
        let names: Vec<String> = (0..stages).map(|i| format!("s{i}")).collect();
        let points: Vec<String> = names[1..stages - 1].to_vec();
        let t = |n: &str, v: f64| Timing {
            name: n.into(),
            median_ms: v,
            min_ms: v,
            max_ms: v,
        };
        let b = BatchProfile {
            batch: 16,
            seq: None,
            stages: names.iter().map(|n| t(n, 10.0)).collect(),
            ramps: points.iter().map(|p| t(p, ramp_ms)).collect(),
            vanilla: t("model", 10.0 * stages as f64),
        };
        (
            Profile {
                profile_version: PROFILE_VERSION,
                device: "test".into(),
                apparate_version: "0".into(),
                commit: "0".into(),
                model_sha256: "0".into(),
                ramps_sha256: None,
                warmup: 0,
                repeats: 1,
                measure_seconds: 0.0,
                batches: vec![b],
            },
            points,
        )
    }

    /// Inputs of a stream: at candidate ramp `r`, `u` uniform in `[0, spread[r])` and the ramp
    /// right when `u < right_below[r]`.
    pub(crate) struct World {
        pub spread: Vec<f32>,
        pub right_below: Vec<f32>,
        pub rng: SplitMix,
    }

    impl World {
        /// One batch of `n` inputs under `cfg`, as the executor would record it.
        pub(crate) fn batch(&mut self, cfg: &ActiveConfig, n: usize) -> BatchRecord {
            let mut rec = BatchRecord {
                config_id: cfg.id,
                rows: Vec::new(),
                exited: Vec::new(),
                agreed: Vec::new(),
                stage_ms: None,
            };
            for _ in 0..n {
                let mut row = Vec::new();
                let mut exit = None;
                let mut agreed = true;
                for (a, &r) in cfg.ramps.iter().enumerate() {
                    let u = (self.rng.uniform() + 1.0) / 2.0 * self.spread[r];
                    let right = u < self.right_below[r];
                    row.push((u, right));
                    if exit.is_none() && u < cfg.thresholds[a] {
                        exit = Some(a);
                        agreed = right;
                    }
                }
                rec.rows.push(row);
                rec.exited.push(exit);
                rec.agreed.push(agreed);
            }
            rec
        }
    }

    fn run(c: &mut Controller, w: &mut World, batches: usize) -> Vec<Vec<usize>> {
        let mut sets = Vec::new();
        for _ in 0..batches {
            let cfg = c.active().clone();
            let rec = w.batch(&cfg, 16);
            c.on_batch(rec);
            if sets.last() != Some(&c.active().ramps) {
                sets.push(c.active().ramps.clone());
            }
        }
        sets
    }

    fn cfg() -> ApparateConfig {
        ApparateConfig {
            adjust_every_batches: 10,
            window_min_samples: 64,
            ..ApparateConfig::vision()
        }
    }

    #[test]
    fn removes_a_ramp_that_never_pays_and_moves_deeper() {
        let (p, points) = profile(8, 0.5);
        let mut c = Controller::new(cfg(), points, p, None);
        // Start from ramps at s1 and s4; s1 is useless (never confident), s4 good.
        c.set_ramps(vec![0, 3], "place", "test".into());
        let mut w = World {
            spread: vec![1.0, 1.0, 1.0, 0.2, 0.2, 0.2],
            right_below: vec![0.0, 0.0, 0.0, 0.2, 0.2, 0.2],
            rng: SplitMix::new(3),
        };
        w.spread[0] = 1.0;
        run(&mut c, &mut w, 20);
        let events = c.drain_events();
        let removal = events
            .iter()
            .find(|e| e.kind == "remove")
            .expect("a removal");
        assert!(removal.why.contains("s1"), "{removal:?}");
        assert!(!c.active().ramps.contains(&0), "{:?}", c.active());
        // Moved deeper: the new ramp is after the removed one.
        assert!(c.active().ramps.iter().all(|&r| r > 0));
    }

    #[test]
    fn probes_earlier_when_every_ramp_pays_and_respects_the_budget() {
        let (p, points) = profile(8, 0.5);
        let mut c = Controller::new(cfg(), points, p, None);
        c.set_ramps(vec![4], "place", "test".into());
        // Every ramp is confident and right.
        let mut w = World {
            spread: vec![0.05; 6],
            right_below: vec![1.0; 6],
            rng: SplitMix::new(4),
        };
        run(&mut c, &mut w, 20);
        let events = c.drain_events();
        assert!(events.iter().any(|e| e.kind == "probe"), "{events:#?}");
        assert!(c.active().ramps.iter().any(|&r| r < 4), "{:?}", c.active());
        // Budget of one ramp: never more than one active.
        let mut one = Controller::new(
            ApparateConfig {
                max_ramps: 1,
                ..cfg()
            },
            profile(8, 0.5).1,
            profile(8, 0.5).0,
            None,
        );
        for set in run(&mut one, &mut w, 200) {
            assert!(set.len() <= 1, "{set:?}");
        }
        // Budget of cost: ramps of 3 ms on an 80 ms model, at most 5%: one ramp fits.
        let (p, points) = profile(8, 3.0);
        let mut costly = Controller::new(cfg(), points, p, None);
        for set in run(&mut costly, &mut w, 200) {
            assert!(set.len() <= 1, "{set:?}");
        }
    }

    #[test]
    fn a_window_violation_drops_the_bootstrap_prior() {
        let (p, points) = profile(8, 0.5);
        // The bootstrap says every ramp is right on every input, however unsure...
        let rows: Vec<Vec<(f32, bool)>> = (0..2000)
            .map(|i| vec![((i % 100) as f32 / 100.0, true); points.len()])
            .collect();
        let boot = Samples::from_rows(points.len(), &rows);
        let quiet = ApparateConfig {
            // Only the window check may react here, not the drift alarm.
            drift_errors: usize::MAX,
            ..cfg()
        };
        let mut c = Controller::new(quiet, points, p, Some(&boot));
        assert!(c.prior.is_some());
        assert!(
            c.active().thresholds.iter().any(|&t| t > 0.5),
            "{:?}",
            c.active()
        );
        // ... but live, the ramps are wrong on their less confident half.
        let mut w = World {
            spread: vec![1.0; 6],
            right_below: vec![0.5; 6],
            rng: SplitMix::new(8),
        };
        run(&mut c, &mut w, 8);
        let events = c.drain_events();
        assert!(events.iter().any(|e| e.kind == "violation"), "{events:#?}");
        // From then on the tuner's evidence is live rows only, starting with that window.
        assert!(c.prior.is_none());
        assert!(!c.post.is_empty());
        assert!(
            c.active().thresholds.iter().all(|&t| t <= 0.5),
            "{:?}",
            c.active()
        );
    }

    #[test]
    fn does_not_oscillate_on_a_stationary_stream() {
        let (p, points) = profile(10, 0.3);
        let mut c = Controller::new(cfg(), points, p, None);
        let mut w = World {
            spread: vec![1.0, 0.9, 0.6, 0.4, 0.3, 0.2, 0.2, 0.1],
            right_below: vec![0.1, 0.2, 0.3, 0.3, 0.3, 0.2, 0.2, 0.1],
            rng: SplitMix::new(5),
        };
        let sets = run(&mut c, &mut w, 600);
        // No A -> B -> A flip-flop, and it settles: few changes in 60 adjustment rounds.
        for win in sets.windows(3) {
            assert_ne!(win[0], win[2], "flip-flop in {sets:?}");
        }
        assert!(sets.len() <= 12, "{} ramp sets: {sets:?}", sets.len());
    }

    /// A ramp that turns wrong on a third of its confident inputs: the reaction `kind` shows up
    /// and the configuration then keeps a fresh drifted batch within the budget.
    fn drift_is_handled(drift_errors: usize, kind: &str) {
        let (p, points) = profile(6, 0.2);
        let only_tuning = ApparateConfig {
            adjust_every_batches: 1000,
            drift_errors,
            ..cfg()
        };
        let mut c = Controller::new(only_tuning, points, p, None);
        c.set_ramps(vec![1], "place", "test".into());
        let mut w = World {
            spread: vec![0.1; 4],
            right_below: vec![1.0; 4],
            rng: SplitMix::new(6),
        };
        // 20 batches of 16 fill the 256-sample window.
        run(&mut c, &mut w, 20);
        assert!(c.active().thresholds[0] > 0.0, "{:?}", c.active());
        w.right_below = vec![0.066; 4];
        run(&mut c, &mut w, 20);
        let kinds: Vec<&str> = c.drain_events().iter().map(|e| e.kind).collect();
        assert!(kinds.contains(&kind), "{kinds:?}");
        let fresh = w.batch(c.active(), 2000);
        assert!(
            fresh.accuracy() >= 0.99,
            "{} with {:?} ({kinds:?})",
            fresh.accuracy(),
            c.active()
        );
    }

    #[test]
    fn a_drift_switches_the_offending_ramp_off_and_retunes() {
        // The drift alarm (3 of the last 64 answers wrong) acts first.
        drift_is_handled(3, "drift");
    }

    #[test]
    fn without_the_drift_alarm_window_violations_retune_and_switch_ramps_off() {
        drift_is_handled(0, "violation");
    }
}
