//! The live loops ([`super::Mode::Live`]): the [`LiveController`], fed one [`BatchRecord`] at a
//! time like the paper's [`super::Controller`], built on four parts that can each be switched
//! off ([`super::LiveConfig`]):
//!
//! 1. **Evidence for every candidate ramp** ([`super::evidence`]): shadow batches pool every
//!    candidate point's features; the host copies of the heads score them, so ramp sets are
//!    chosen on live evidence and a new set starts with thresholds tuned on it.
//! 2. **Confidence-bounded thresholds** ([`super::bound`]).
//! 3. **Ramps that keep learning** ([`super::learner`]), on a background thread.
//! 4. **A sequential drift test** ([`super::cusum`]) that shrinks the evidence to the new regime.
//!
//! Each batch: score and store its samples, feed the drift test, start or
//! collect a retraining run, and every `replan_every_batches` batches choose the ramp set and
//! thresholds on the evidence.

use std::collections::VecDeque;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use super::bound::{PATH_EVERY, certifiable_rate, tune_bounded_split};
use super::config::ApparateConfig;
use super::cusum::Cusum;
use super::drift::DriftAlarm;
use super::events::{ActiveConfig, AdaptEvent, BatchRecord, HeadUpdate};
use super::evidence::{Evidence, Sample};
use super::latency::LatencyModel;
use super::learner::{LearnJob, LearnOutcome, LearnStat, LearnerPriority, learn};
use super::tuner::{Samples, Tuned, TunerConfig, evaluate, tune};
use crate::profile::Profile;
use crate::ramps::train::{TrainConfig, TrainedHead};

/// How heads are retrained (the output layer, on a few thousand samples at most).
fn retrain_config() -> TrainConfig {
    TrainConfig {
        epochs: RETRAIN_EPOCHS,
        ..TrainConfig::default()
    }
}

/// Fewest samples with every candidate scored before ramp sets are compared on them.
const MIN_PLAN_SAMPLES: usize = 64;
/// Most inputs before a detected drift that the evidence keeps. The CUSUM's own estimate (the
/// last time its statistic was 0) reaches far back when the wrong-release rate sat between its
/// two hypotheses for long (as after a start on optimistic bootstrap evidence): on an MNIST-drift
/// run it pointed 890 inputs before the drift, and the evidence kept 892 samples, almost all of
/// the old regime. An abrupt drift fires within a few wrong releases, tens of inputs after it.
const DRIFT_LOOKBACK: u64 = 64;
/// Share of the drift threshold at which releases pause: a few wrong releases in quick
/// succession (three at the defaults) stop the exits while the test decides, judging the held
/// thresholds on the ramps' outputs, which still run. Without the pause an MNIST-drift run
/// released 8 wrong answers in the 256 requests around the drift before the test fired.
const PAUSE_AT: f64 = 0.5;
/// Share of the drift threshold below which paused releases resume (the wrong releases were
/// noise after all). The statistic falls by about 0.025 per input without a wrong release,
/// so a pause on noise lasts at least a hundred inputs or so; more when the held thresholds
/// keep (counterfactually) releasing wrong answers (300 on a movies run).
const RESUME_AT: f64 = 0.25;
/// While paused, a drop of the first active ramp's agreement with the model on the inputs
/// since the pause, this many standard errors below its rate in the evidence, is a drift: the
/// test on (counterfactual) wrong releases alone is slow there, because on drifted inputs the
/// ramps are rarely sure enough to release. On an MNIST-drift run a pause 98 requests after the
/// drift held 293 requests before that test fired, with no exits and no retraining meanwhile.
/// Under a pause on noise the agreement does not move (4 standard errors: about 3 in 100,000
/// checks by chance).
const AGREEMENT_DROP_Z: f64 = 4.0;
/// Inputs since the pause before the agreement is compared.
const AGREEMENT_MIN_INPUTS: u64 = 32;
/// Weight of a new shadow-cost measurement in its running average.
const SHADOW_COST_WEIGHT: f64 = 0.1;
/// Epochs of a retraining run (a few thousand samples; the output layer only).
const RETRAIN_EPOCHS: usize = 30;
/// Periodic plans between two ramp-set changes, at least (drifts and violations may change the
/// set at once). On the MNIST stream without it the set changed 7 times in the first 460
/// inputs, each time on a saving estimate a few points above the last.
const SET_DWELL: u64 = 4;
/// A new set's predicted saving must beat the active set's by this share of it, plus
/// `retune_margin`.
const SET_MARGIN_RELATIVE: f64 = 0.1;

/// The bootstrap inputs as the live loops start from them.
pub struct BootEvidence {
    /// Per input, every ramp's `(u, agrees)` (from the fused kernel).
    pub rows: Vec<Vec<(f32, bool)>>,
    /// The model's answers.
    pub answers: Vec<u32>,
    /// Per ramp, the pooled features `[inputs, width]` (empty: none kept).
    pub features: Vec<Vec<f32>>,
}

/// The state of the live loops.
pub struct LiveController {
    cfg: ApparateConfig,
    points: Vec<String>,
    allowed: Vec<bool>,
    profile: Profile,
    active: ActiveConfig,
    events: Vec<AdaptEvent>,
    /// Host copies of the serving heads (empty: unknown, so no shadow scoring or learning).
    heads: Vec<Arc<TrainedHead>>,
    evidence: Evidence,
    /// Next sequence number.
    seq: u64,
    batches: u64,
    inputs: u64,
    cusum: Cusum,
    /// The paper's fixed-count alarm, used when the drift test is switched off.
    alarm: DriftAlarm,
    since_plan: usize,
    plan_due: bool,
    recent_sizes: VecDeque<usize>,
    /// Shadow samples since the last retraining run started.
    new_featured: usize,
    learner: Option<JoinHandle<LearnOutcome>>,
    head_updates: Vec<HeadUpdate>,
    learn_stats: Vec<LearnStat>,
    /// Running average of a shadow batch's pooling time, ms.
    shadow_ms: Option<f64>,
    /// Shadow batches seen (the first is a warm-up: not measured).
    shadow_batches: u64,
    /// Batch count at the last ramp-set change.
    last_set_change: u64,
    /// While releases are held (a drift is suspected, the window guard closed, or part 5's
    /// level is in debt): what the ramps would release, for the drift test to judge. The
    /// published thresholds are 0 meanwhile; releases resume through a fresh plan.
    held: Option<Vec<f32>>,
    /// Releases paused because a drift is suspected (the drift test's statistic is high).
    drift_pause: bool,
    /// Releases held because the last `live.window` answers hold the most wrong releases the
    /// window allows.
    window_hold: bool,
    /// One wrong release short of that: the tuner aims no higher than the budget.
    window_tight: bool,
    /// Part 5: the disagreement rate the tuner aims at (see `live.spend_slack`).
    level: f64,
    /// Whether each of the last `live.window` answered inputs was released wrong, and how many
    /// were.
    ledger: VecDeque<bool>,
    ledger_wrong: usize,
    /// No retraining run starts before this (`live.learn_share`).
    learn_not_before: Option<Instant>,
    /// While paused: the first sequence number paused, the first active ramp's agreement
    /// rate in the evidence then, and `(inputs, agreeing)` of that ramp since.
    pause_watch: Option<(u64, f64, u64, u64)>,
}

impl LiveController {
    /// Starts from the bootstrap inputs when given (the first set is planned on them),
    /// otherwise with the first `max_ramps` allowed candidates spread evenly and no exits until
    /// live evidence arrives. `heads` are the host copies of the ramps file's heads (stage
    /// order), or empty.
    pub fn new(
        cfg: ApparateConfig,
        points: Vec<String>,
        profile: Profile,
        boot: Option<&BootEvidence>,
        heads: Vec<TrainedHead>,
    ) -> LiveController {
        let allowed = super::placement::allowed_candidates(&profile, &points);
        let k = points.len();
        let heads: Vec<Arc<TrainedHead>> = if heads.len() == k {
            heads.into_iter().map(Arc::new).collect()
        } else {
            Vec::new()
        };
        let mut c = LiveController {
            evidence: Evidence::new(cfg.live.evidence_capacity),
            cusum: Cusum::new(cfg.accuracy_budget, cfg.live.drift_threshold),
            alarm: DriftAlarm::new(cfg.drift_samples, cfg.drift_errors),
            cfg,
            points,
            allowed,
            profile,
            active: ActiveConfig::empty(0),
            events: Vec::new(),
            heads,
            seq: 0,
            batches: 0,
            inputs: 0,
            since_plan: 0,
            plan_due: false,
            recent_sizes: VecDeque::new(),
            new_featured: 0,
            learner: None,
            head_updates: Vec::new(),
            learn_stats: Vec::new(),
            shadow_ms: None,
            shadow_batches: 0,
            last_set_change: 0,
            held: None,
            drift_pause: false,
            window_hold: false,
            window_tight: false,
            level: 0.0,
            ledger: VecDeque::new(),
            ledger_wrong: 0,
            learn_not_before: None,
            pause_watch: None,
        };
        c.level = c.cfg.accuracy_budget;
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
                shadow_fraction: 0.0,
            };
            c.log(
                "place",
                "fixed configuration: no adaptation".into(),
                0.0,
                1.0,
            );
            return c;
        }
        if !c.cfg.enabled {
            return c;
        }
        if let Some(b) = boot.filter(|b| b.rows.iter().all(|r| r.len() == k)) {
            let fitted = if c.cfg.live.cross_fit_bootstrap
                && !c.heads.is_empty()
                && b.features.len() == k
            {
                super::learner::cross_fitted(&c.heads, &b.features, &b.answers, &retrain_config())
            } else {
                vec![None; k]
            };
            for (i, (row, &answer)) in b.rows.iter().zip(&b.answers).enumerate() {
                let features = (b.features.len() == k && b.features.iter().all(|f| !f.is_empty()))
                    .then(|| {
                        Arc::new(
                            b.features
                                .iter()
                                .map(|f| {
                                    let w = f.len() / b.rows.len().max(1);
                                    f[i * w..(i + 1) * w].to_vec()
                                })
                                .collect(),
                        )
                    });
                c.evidence.push(Sample {
                    seq: i as u64,
                    scores: row
                        .iter()
                        .zip(&fitted)
                        .map(|(x, f)| Some(f.as_ref().map_or(*x, |f| f[i])))
                        .collect(),
                    features,
                    answer,
                });
            }
            c.seq = b.rows.len() as u64;
            c.new_featured = 0;
            c.plan("place", "planned on the bootstrap inputs");
        } else {
            let cands: Vec<usize> = (0..k).filter(|&r| c.allowed[r]).collect();
            let m = c.cfg.max_ramps.min(cands.len());
            let set: Vec<usize> = (0..m)
                .map(|i| cands[(2 * i + 1) * cands.len() / (2 * m)])
                .collect();
            c.active = ActiveConfig {
                id: 1,
                thresholds: vec![0.0; set.len()],
                ramps: set,
                shadow_fraction: 0.0,
            };
            c.log(
                "place",
                "no bootstrap inputs: ramps spread evenly, no exits until live evidence".into(),
                0.0,
                1.0,
            );
        }
        c.active.shadow_fraction = c.shadow_fraction();
        c
    }

    pub fn active(&self) -> &ActiveConfig {
        &self.active
    }

    pub fn points(&self) -> &[String] {
        &self.points
    }

    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    pub fn drain_events(&mut self) -> Vec<AdaptEvent> {
        std::mem::take(&mut self.events)
    }

    /// Retrained heads to upload before the next batch.
    pub fn take_head_updates(&mut self) -> Vec<HeadUpdate> {
        std::mem::take(&mut self.head_updates)
    }

    /// Cost and swaps of each finished retraining run since the last call.
    pub fn take_learn_stats(&mut self) -> Vec<LearnStat> {
        std::mem::take(&mut self.learn_stats)
    }

    /// Samples in the evidence (for tests and logs).
    pub fn evidence_len(&self) -> usize {
        self.evidence.len()
    }

    fn typical_batch(&self) -> usize {
        let n = self.recent_sizes.len();
        if n == 0 {
            return 1;
        }
        ((self.recent_sizes.iter().sum::<usize>() as f64 / n as f64).round() as usize).max(1)
    }

    fn latency(&self, ramps: &[usize]) -> LatencyModel {
        let names: Vec<&str> = ramps.iter().map(|&r| self.points[r].as_str()).collect();
        self.profile
            .for_batch(self.typical_batch())
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

    /// The disagreement rate the tuner aims at: the budget, or with part 5 the level the
    /// realized disagreement steers (no higher than the budget while the window guard is one
    /// wrong release from closing).
    fn tuning_budget(&self) -> f64 {
        let b = self.cfg.accuracy_budget;
        if self.drift_pause {
            // The drift test judges what the held thresholds would release; tuned at a level
            // in debt they would release nothing, the ramps would go off, and with them the
            // test and the agreement check that end the pause.
            return b;
        }
        match (self.cfg.live.spend_slack, self.window_tight) {
            (false, _) => b,
            (true, true) => self.level.min(b),
            // The bound is defined for rates below 1; a large budget times the cap is not.
            (true, false) => self.level.min(b.max(0.5)),
        }
    }

    /// Thresholds for `set` on `s` (rows of the inputs `seqs`) at the aim of
    /// [`Self::tuning_budget`].
    fn tune_set(&self, s: &Samples, seqs: &[u64], set: &[usize]) -> Tuned {
        self.tune_set_at(s, seqs, set, self.tuning_budget())
    }

    /// [`Self::tune_set`] aiming at `budget`: bounded (part 2) or at the paper's headroom.
    fn tune_set_at(&self, s: &Samples, seqs: &[u64], set: &[usize], budget: f64) -> Tuned {
        let lat = self.latency(set);
        if budget <= 0.0 {
            // Part 5's level is in debt: nothing is released until it is paid back.
            return Tuned {
                eval: evaluate(s, &vec![0.0; set.len()], &lat),
                thresholds: vec![0.0; set.len()],
            };
        }
        // Retrained heads can be less sharp than bootstrap ones: see `skip_gaps`.
        let tuner = TunerConfig {
            skip_gaps: true,
            ..self.cfg.tuner.clone()
        };
        if self.cfg.live.bound {
            // Each input proposes or tests by its place in the stream, not in the evidence:
            // successive tunings on sliding evidence then split it the same way.
            let mask: Vec<bool> = seqs.iter().map(|q| q % PATH_EVERY as u64 == 0).collect();
            tune_bounded_split(s, &mask, &lat, &tuner, budget, self.cfg.live.confidence)
        } else if s.len() < self.cfg.window_min_samples {
            // Without the bound, too few samples are not trusted at all (the paper's rule).
            Tuned {
                eval: evaluate(s, &vec![0.0; set.len()], &lat),
                thresholds: vec![0.0; set.len()],
            }
        } else {
            let cfg = TunerConfig {
                accuracy_budget: budget * (1.0 - self.cfg.tuning_headroom.clamp(0.0, 1.0)),
                ..tuner
            };
            tune(s, &lat, &cfg)
        }
    }

    /// Chooses the ramp set and thresholds on the evidence: greedily the candidates that most
    /// raise the tuned saving on samples where every candidate is scored (shadow and bootstrap
    /// samples), against the active set on the same samples; a different set must win by
    /// `retune_margin`. Then the chosen set is tuned on every sample that scores it.
    fn plan(&mut self, kind: &'static str, why: &str) {
        self.since_plan = 0;
        self.plan_due = false;
        let cands: Vec<usize> = (0..self.points.len())
            .filter(|&r| self.allowed[r])
            .collect();
        let mut set = self.active.ramps.clone();
        let mut reason = why.to_string();
        let (full, full_seqs) = self.evidence.samples_and_seqs(&cands);
        let may_change = kind != "tune"
            || self.batches
                >= self.last_set_change + SET_DWELL * self.cfg.live.replan_every_batches as u64;
        if may_change && full.len() >= MIN_PLAN_SAMPLES && !cands.is_empty() {
            let pos = |r: usize| cands.iter().position(|&c| c == r);
            // With the bound, sets are compared on the proposal part only. The test part must
            // judge one configuration per plan, the chosen set's path: ranking dozens of sets by
            // their bounded savings picks the one whose test passed most generously, which
            // spends the bound's confidence on the selection (a movies run released 1.7% wrong
            // at a 1% budget that way).
            let (ranked, aim) = if self.cfg.live.bound {
                let mask: Vec<bool> = full_seqs
                    .iter()
                    .map(|q| q % PATH_EVERY as u64 == 0)
                    .collect();
                let (propose, test) = full.split_by(&mask);
                // Sets are ranked at the rate their test can certify, as their paths are
                // tuned (see `certifiable_rate`): ranked at the budget, sets of many ramps
                // with small shares each win on paper and lose once the test cuts them.
                let aim =
                    certifiable_rate(test.len(), self.tuning_budget(), self.cfg.live.confidence);
                (propose, aim.unwrap_or(0.0))
            } else {
                (full.clone(), self.tuning_budget())
            };
            let score = |this: &Self, s: &[usize]| -> f64 {
                let idx: Vec<usize> = s.iter().filter_map(|&r| pos(r)).collect();
                if this.cfg.live.bound {
                    let cfg = TunerConfig {
                        accuracy_budget: aim,
                        skip_gaps: true,
                        ..this.cfg.tuner.clone()
                    };
                    tune(&ranked.select(&idx), &this.latency(s), &cfg)
                        .eval
                        .saving
                } else {
                    this.tune_set(&full.select(&idx), &full_seqs, s).eval.saving
                }
            };
            let current = if set.iter().all(|&r| pos(r).is_some()) && !set.is_empty() {
                score(self, &set)
            } else {
                f64::NEG_INFINITY
            };
            let mut best: Vec<usize> = Vec::new();
            let mut best_saving = 0.0;
            loop {
                let mut round: Option<(Vec<usize>, f64)> = None;
                for &c in &cands {
                    if best.contains(&c) {
                        continue;
                    }
                    let mut cand = best.clone();
                    cand.push(c);
                    cand.sort_unstable();
                    if !self.within_budget(&cand) {
                        continue;
                    }
                    let s = score(self, &cand);
                    if round.as_ref().is_none_or(|r| s > r.1 + 1e-12) {
                        round = Some((cand, s));
                    }
                }
                match round {
                    Some((cand, s)) if s > best_saving + 1e-9 => {
                        best = cand;
                        best_saving = s;
                    }
                    _ => break,
                }
            }
            let margin = if set.is_empty() || kind == "place" {
                0.0
            } else {
                self.cfg.retune_margin
            };
            // A new set must win clearly: savings estimated on sliding evidence move by a few
            // points between plans, and each change costs the active ramps' own evidence.
            let bar = current.max(0.0) * (1.0 + SET_MARGIN_RELATIVE) + margin;
            if best != set && best_saving > bar {
                self.last_set_change = self.batches;
                reason = format!(
                    "{why}: predicted saving {best_saving:.3} on {} samples of every candidate, \
                     the active set's {:.3}",
                    full.len(),
                    current.max(0.0)
                );
                set = best;
            }
        }
        let (mut s, mut seqs) = self.evidence.samples_and_seqs(&set);
        let mut t = self.tune_set(&s, &seqs, &set);
        // What the bound alone allows (part 5 may aim lower: a level in debt, or the window
        // guard one wrong release from closing). It decides whether the ramps are worth
        // running, and it is what the drift test judges while nothing is published.
        let budget = self.cfg.accuracy_budget;
        let mut reference = if self.tuning_budget() < budget {
            self.tune_set_at(&s, &seqs, &set, budget).thresholds
        } else {
            t.thresholds.clone()
        };
        // Ramps that may release nothing (after a drift, before the evidence allows an exit)
        // only cost: switched off, their share of the ramp budget goes to shadow evaluation,
        // which gathers the evidence that brings them back. Not counted as a set change, so
        // the dwell does not hold back the set the new evidence supports. Not on part 5's
        // account: ramps switched off for a level in debt also blinded the drift test (an
        // MNIST-drift run went through its drift without a detection).
        let set_off = self.cfg.live.shadow
            && !self.heads.is_empty()
            && !set.is_empty()
            && reference.iter().all(|&x| x <= 0.0);
        if set_off {
            reason =
                format!("{reason}; nothing may exit on this evidence: ramps off until it does");
            set.clear();
            (s, seqs) = self.evidence.samples_and_seqs(&set);
            t = self.tune_set(&s, &seqs, &set);
            reference = t.thresholds.clone();
        }
        // While held, a plan (after a head swap) updates the thresholds releases resume at;
        // a drift ends the drift pause (the plan starts over on the new regime's evidence),
        // not the window guard's hold.
        if kind == "drift" {
            self.drift_pause = false;
            self.pause_watch = None;
        }
        let paused = self.drift_pause || self.window_hold;
        let releases = t.thresholds.iter().any(|&x| x > 0.0);
        self.held = None;
        if !set_off && (paused || !releases) {
            // Held: published as 0; the drift test judges what they would release (with a
            // level in debt: what the bound alone would).
            self.held = Some(if releases {
                t.thresholds.clone()
            } else {
                reference
            });
            t.thresholds = vec![0.0; t.thresholds.len()];
        } else if set_off {
            // Nothing to hold: a drift pause ends with the ramps (the window guard's stays,
            // and holds whatever the next plan brings back).
            self.drift_pause = false;
            self.pause_watch = None;
        }
        let changed_set = set != self.active.ramps;
        if paused && changed_set {
            // The agreement watched since the pause was another ramp's.
            self.pause_watch = None;
        }
        let changed = changed_set
            || t.thresholds.len() != self.active.thresholds.len()
            || t.thresholds
                .iter()
                .zip(&self.active.thresholds)
                .any(|(a, b)| (a - b).abs() > 1e-6);
        if changed || kind == "place" {
            self.active.id += 1;
            self.active.ramps = set;
            self.active.thresholds = t.thresholds;
            let kind = if changed_set && set_off {
                "off"
            } else if changed_set && kind != "place" {
                "replan"
            } else {
                kind
            };
            let msg = if self.cfg.live.spend_slack && self.cfg.live.bound {
                format!(
                    "{reason} ({} samples, aiming at {:.2}% disagreement)",
                    s.len(),
                    self.tuning_budget() * 100.0
                )
            } else {
                format!("{reason} ({} samples)", s.len())
            };
            self.log(kind, msg, t.eval.saving, t.eval.accuracy);
        }
    }

    /// Share of batches to shadow: what the ramp budget leaves after the active ramps, at the
    /// measured cost of a shadow batch, at most `live.shadow_fraction`.
    fn shadow_fraction(&self) -> f32 {
        let l = &self.cfg.live;
        if !l.shadow || self.heads.is_empty() || !self.cfg.enabled || self.cfg.fixed.is_some() {
            return 0.0;
        }
        let lat = self.latency(&self.active.ramps);
        let left = self.cfg.max_ramp_cost * lat.vanilla_ms - lat.ramp_ms.iter().sum::<f64>();
        let f = match self.shadow_ms {
            // Not measured yet: measure at the configured share.
            None => l.shadow_fraction,
            Some(ms) if ms > 0.0 => (left.max(0.0) / ms).min(l.shadow_fraction),
            Some(_) => l.shadow_fraction,
        }
        .max(l.min_shadow_fraction);
        // In 1/32 steps: the running cost moves a little every batch, and each change is a new
        // configuration to publish.
        let q = (f * 32.0).floor() / 32.0;
        (if q > 0.0 { q } else { f }) as f32
    }

    /// Feeds one batch; returns the configuration to run from now on when it changed.
    pub fn on_batch(&mut self, rec: BatchRecord) -> Option<ActiveConfig> {
        self.batches += 1;
        self.inputs += rec.len() as u64;
        if rec.is_empty() {
            return None;
        }
        if let Some(ms) = &rec.stage_ms {
            super::controller::refresh_profile(
                &mut self.profile,
                self.cfg.profile_update_weight,
                rec.len(),
                ms,
            );
        }
        if !self.cfg.enabled || self.cfg.fixed.is_some() {
            return None;
        }
        let before = self.active.clone();
        self.recent_sizes.push_back(rec.len());
        while self.recent_sizes.len() > self.cfg.utility_batches.max(1) {
            self.recent_sizes.pop_front();
        }
        self.collect_learner(false);
        // Before the window guard, which may publish a new configuration.
        let current = rec.config_id == self.active.id;
        self.account(&rec);
        let seq0 = self.seq;
        self.seq += rec.len() as u64;
        self.store(&rec, seq0, current);
        if current && self.watch(&rec, seq0) {
            // A drift: replanned already.
        } else {
            self.since_plan += 1;
            // While paused too: a plan then retunes the held thresholds on the evidence, which
            // now holds the wrong releases that caused the pause, and the test judges those.
            if self.plan_due {
                self.plan("tune", "the aim moved, or releases resume");
            } else if self.since_plan >= self.cfg.live.replan_every_batches {
                self.plan("tune", "periodic: evidence grew");
            }
        }
        self.maybe_learn();
        self.active.shadow_fraction = self.shadow_fraction();
        (self.active != before).then(|| self.active.clone())
    }

    /// Adds the batch's inputs to the evidence: shadow inputs scored at every ramp by the host
    /// heads, the others with the active ramps' own outputs (when they ran under the active
    /// configuration).
    fn store(&mut self, rec: &BatchRecord, seq0: u64, current: bool) {
        let k = self.points.len();
        let n = rec.len();
        let shadow = rec
            .shadow
            .as_ref()
            .filter(|s| s.features.len() == k && rec.answers.len() == n && !self.heads.is_empty());
        if let Some(sh) = shadow {
            // The first shadow batch is a warm-up (first-touch allocations, cold caches): on the
            // MNIST ResNet the first two averaged 0.38 ms against about 0.1 ms later, and an
            // estimate that high had cut the share to almost nothing for the rest of the run.
            self.shadow_batches += 1;
            if self.shadow_batches > 1 {
                let w = SHADOW_COST_WEIGHT;
                self.shadow_ms = Some(match self.shadow_ms {
                    None => sh.ms,
                    Some(old) => (1.0 - w) * old + w * sh.ms,
                });
            }
            let mut scores: Vec<Vec<Option<(f32, bool)>>> = vec![vec![None; k]; n];
            let mut feats: Vec<Vec<Vec<f32>>> = vec![Vec::with_capacity(k); n];
            for (r, (f, head)) in sh.features.iter().zip(&self.heads).enumerate() {
                let width = head.head.width();
                if f.len() != n * width {
                    return;
                }
                let preds = head.predict_hidden(&head.hidden(f));
                for (i, ((s, x), p)) in scores.iter_mut().zip(&mut feats).zip(&preds).enumerate() {
                    s[r] = Some((p.1, p.0 == rec.answers[i]));
                    x.push(f[i * width..(i + 1) * width].to_vec());
                }
            }
            for (i, (s, f)) in scores.into_iter().zip(feats).enumerate() {
                self.evidence.push(Sample {
                    seq: seq0 + i as u64,
                    scores: s,
                    features: Some(Arc::new(f)),
                    answer: rec.answers[i],
                });
            }
            self.new_featured += n;
        } else if current {
            for (i, row) in rec.rows.iter().enumerate() {
                let mut scores = vec![None; k];
                for (a, &r) in self.active.ramps.iter().enumerate() {
                    scores[r] = row.get(a).copied();
                }
                self.evidence.push(Sample {
                    seq: seq0 + i as u64,
                    scores,
                    features: None,
                    answer: rec.answers.get(i).copied().unwrap_or(0),
                });
            }
        }
    }

    /// The drift test on the batch's released answers; `true` when it changed the
    /// configuration.
    fn watch(&mut self, rec: &BatchRecord, seq0: u64) -> bool {
        for (i, (e, a)) in rec.exited.iter().zip(&rec.agreed).enumerate() {
            let seq = seq0 + i as u64;
            // While paused nothing is released: the test judges what the held thresholds
            // would have released, from the ramps' outputs.
            let wrong = match &self.held {
                Some(tau) => rec.rows.get(i).is_some_and(|row| {
                    row.iter()
                        .zip(tau)
                        .find(|(x, t)| x.0 < **t)
                        .is_some_and(|(x, _)| !x.1)
                }),
                None => e.is_some() && !a,
            };
            if self.cfg.live.drift_test
                && let Some(cp) = self.cusum.observe(seq, wrong)
            {
                self.react_to_drift(
                    cp.max(seq.saturating_sub(DRIFT_LOOKBACK)),
                    "the sequential test on released answers fired",
                );
                return true;
            }
            if self.drift_pause
                && let Some((from, why)) = self.agreement_dropped(rec, i)
            {
                self.react_to_drift(from, &why);
                return true;
            }
        }
        if self.cfg.live.drift_test {
            self.pause_or_resume();
        }
        if !self.cfg.live.drift_test {
            self.alarm.observe(rec, &self.active.ramps);
            if let Some(alarm) = self.alarm.check() {
                self.alarm.reset();
                // Without the test there is no change point: keep the newest samples only.
                let from = self.seq.saturating_sub(self.cfg.drift_samples as u64);
                let why = format!(
                    "{} of the last {} answers disagreed",
                    alarm.wrong, self.cfg.drift_samples
                );
                self.react_to_drift(from, &why);
                return true;
            }
        }
        false
    }

    /// While paused: counts input `i` of `rec` at the first active ramp and returns the change
    /// point and reason when that ramp's agreement fell [`AGREEMENT_DROP_Z`] standard errors
    /// below its rate in the evidence at the pause.
    fn agreement_dropped(&mut self, rec: &BatchRecord, i: usize) -> Option<(u64, String)> {
        let (from, p, n, k) = self.pause_watch.as_mut()?;
        let agrees = rec.rows.get(i)?.first()?.1;
        *n += 1;
        *k += u64::from(agrees);
        let (p, n, k, from) = (*p, *n, *k, *from);
        if n < AGREEMENT_MIN_INPUTS || !(p > 0.0 && p < 1.0) {
            return None;
        }
        let rate = k as f64 / n as f64;
        let z = (p - rate) / (p * (1.0 - p) / n as f64).sqrt();
        (z > AGREEMENT_DROP_Z).then(|| {
            (
                from.saturating_sub(DRIFT_LOOKBACK),
                format!(
                    "while paused, the first ramp agreed with the model on {:.0}% of {n} inputs \
                     against {:.0}% in the evidence",
                    rate * 100.0,
                    p * 100.0
                ),
            )
        })
    }

    /// Pauses releases when the drift test's statistic passes [`PAUSE_AT`] of its threshold,
    /// and resumes them when it falls back below [`RESUME_AT`].
    fn pause_or_resume(&mut self) {
        let level = self.cusum.statistic() / self.cfg.live.drift_threshold;
        let releasing = self
            .held
            .as_ref()
            .unwrap_or(&self.active.thresholds)
            .iter()
            .any(|&t| t > 0.0);
        if !self.drift_pause && level > PAUSE_AT && releasing {
            self.drift_pause = true;
            self.hold();
            let first = self.active.ramps[0];
            let (s, _) = self.evidence.samples_and_seqs(&[first]);
            let p = s.correct.iter().filter(|&&c| c).count() as f64 / s.len().max(1) as f64;
            self.pause_watch = Some((self.seq, p, 0, 0));
            self.log(
                "pause",
                format!(
                    "wrong releases in quick succession (drift test at {:.0}% of its \
                     threshold): no exits until it decides",
                    level * 100.0
                ),
                0.0,
                1.0,
            );
        } else if level <= RESUME_AT && self.drift_pause {
            self.drift_pause = false;
            self.pause_watch = None;
            self.unhold();
            let still = if self.window_hold {
                " (the window guard still holds them)"
            } else {
                ""
            };
            self.log(
                "resume",
                format!("the drift test fell back: the wrong releases were noise{still}"),
                0.0,
                1.0,
            );
        }
    }

    /// Publishes thresholds of 0, keeping the active ones for the drift test to judge.
    fn hold(&mut self) {
        if self.held.is_none() {
            let zero = vec![0.0; self.active.thresholds.len()];
            self.held = Some(std::mem::replace(&mut self.active.thresholds, zero));
            self.active.id += 1;
        }
    }

    /// Releases resume (unless the drift pause or the window guard still holds) at
    /// thresholds tuned afresh in this batch's plan: the held ones may be the bound's alone,
    /// or tuned at a level that has moved since.
    fn unhold(&mut self) {
        if !(self.drift_pause || self.window_hold) {
            self.plan_due = true;
        }
    }

    /// Part 5 and the window guard, on every answered input of the batch (whatever
    /// configuration it ran under): the window's wrong releases and the level the tuner aims
    /// at.
    fn account(&mut self, rec: &BatchRecord) {
        let l = &self.cfg.live;
        let budget = self.cfg.accuracy_budget;
        let step = l.spend_step * budget;
        let (goal, cap) = (l.spend_goal * budget, l.spend_cap * budget);
        let mut any_wrong = false;
        for (e, a) in rec.exited.iter().zip(&rec.agreed) {
            let wrong = e.is_some() && !a;
            any_wrong |= wrong;
            self.ledger.push_back(wrong);
            self.ledger_wrong += usize::from(wrong);
            while self.ledger.len() > l.window {
                if self.ledger.pop_front() == Some(true) {
                    self.ledger_wrong -= 1;
                }
            }
            // No floor: a level at or below 0 releases nothing (the bound certifies nothing),
            // and the debt it records is what keeps the long-run promise. Every input counts,
            // released or not, as in adaptive conformal inference; the cap keeps a long
            // stretch without releases from winding the level up.
            if l.spend_slack {
                let err = if wrong { 1.0 } else { 0.0 };
                self.level = (self.level + step * (goal - err)).min(cap);
            }
        }
        if any_wrong && l.spend_slack {
            // The level fell: thresholds tuned at the old one must not go on releasing.
            self.plan_due = true;
        }
        let most = l.window_max_wrong();
        let tight = self.ledger_wrong + 1 >= most;
        if tight != self.window_tight {
            // The tuner's aim changes: retune now, not at the next periodic plan.
            self.window_tight = tight;
            self.plan_due = true;
        }
        let full = self.ledger_wrong >= most;
        if full && !self.window_hold {
            self.window_hold = true;
            self.hold();
            self.log(
                "hold",
                format!(
                    "{} wrong releases in the last {} answers, the most the window allows: \
                     no exits until one leaves it",
                    self.ledger_wrong,
                    self.ledger.len()
                ),
                0.0,
                1.0,
            );
        } else if !full && self.window_hold {
            self.window_hold = false;
            self.unhold();
            self.log(
                "open",
                format!(
                    "{} wrong releases in the last {} answers: exits resume",
                    self.ledger_wrong,
                    self.ledger.len()
                ),
                0.0,
                1.0,
            );
        }
    }

    /// A regime change from sequence number `from` on: only the evidence since then counts, the
    /// thresholds are retuned on it (with the bound: no exits until enough is known), and the
    /// heads retrain as soon as enough post-change samples arrive.
    fn react_to_drift(&mut self, from: u64, why: &str) {
        let before = self.evidence.len();
        self.evidence.keep_from(from);
        self.cusum.reset();
        // A new regime starts with the budget as its aim: the wrong releases that revealed
        // the change are not paid back out of the new regime's exits (in debt, the level
        // would hold every exit back for hundreds of inputs after the bound allows them).
        self.level = self.level.max(self.cfg.accuracy_budget);
        // A run started on pre-change samples would judge heads on the old regime.
        self.collect_learner(true);
        self.learn_not_before = None;
        self.new_featured = self.evidence.featured().len();
        let msg = format!(
            "{why}: evidence shrunk from {before} to {} samples (from input {from})",
            self.evidence.len()
        );
        self.plan("drift", &msg);
        if self.events.last().is_none_or(|e| e.kind != "drift") {
            self.log("drift", msg, 0.0, 1.0);
        }
    }

    /// Starts a retraining run when enough new shadow samples arrived.
    fn maybe_learn(&mut self) {
        let l = &self.cfg.live;
        if !l.learning || !l.shadow || self.heads.is_empty() || self.learner.is_some() {
            return;
        }
        // While no ramp may release anything (the set is off: weak bootstrap heads, or the
        // evidence after a drift), retraining is the only way back to exits, and the cap on
        // its share waits for nothing: on a video run the set was off from frame 347 to 715,
        // and the run that brought the exits back, due about 200 frames after the one at 347
        // (1.4 s long), waited for the cap until 14.5 s after that one began.
        let urgent = self.active.ramps.is_empty();
        if l.learn_in_background
            && !urgent
            && self.learn_not_before.is_some_and(|t| Instant::now() < t)
        {
            return;
        }
        // Counted, not copied: this runs every batch, a run is due every few hundred inputs.
        let have = self.evidence.featured_len();
        // While the evidence is small (after a drift) a run is due once it grew by half: heads
        // trained on 192 post-drift samples are weak, and waiting for 256 more held the exits
        // back for 400 frames of an MNIST-drift run.
        if have < l.retrain_min || self.new_featured < l.retrain_every.min(have / 2) {
            return;
        }
        let featured = self.evidence.featured();
        self.new_featured = 0;
        let ramps: Vec<usize> = (0..self.points.len())
            .filter(|&r| self.allowed[r])
            .collect();
        let job = LearnJob {
            ramps,
            heads: self.heads.clone(),
            samples: featured,
            budget: self.cfg.accuracy_budget,
            train: retrain_config(),
        };
        if self.cfg.live.learn_in_background {
            match std::thread::Builder::new()
                .name("apparate-learner".into())
                .spawn(move || {
                    let priority = super::learner::yield_to_serving();
                    let out = learn(job);
                    LearnOutcome {
                        priority: Some(priority),
                        // The thread is new: its CPU time is the run's.
                        cpu: crate::sched::thread_cpu_time(),
                        ..out
                    }
                }) {
                Ok(h) => self.learner = Some(h),
                Err(e) => self.log(
                    "learn",
                    format!("could not start the learner thread ({e}): heads kept"),
                    0.0,
                    1.0,
                ),
            }
        } else {
            let out = learn(job);
            self.apply(out);
        }
    }

    /// Collects a finished run (or waits for it with `wait`, discarding it with `discard`).
    fn collect_learner(&mut self, discard: bool) {
        let done = self.learner.as_ref().is_some_and(|h| h.is_finished());
        if !(done || discard) {
            return;
        }
        let Some(h) = self.learner.take() else {
            return;
        };
        let joined = h.join();
        if let Ok(out) = &joined {
            // The run began `elapsed` ago; the next may begin `elapsed / share` after it.
            let wait = out.elapsed.mul_f64(1.0 / self.cfg.live.learn_share - 1.0);
            self.learn_not_before = Some(Instant::now() + wait);
        }
        match joined {
            Ok(out) if !discard => self.apply(out),
            Ok(out) => self.learn_stats.push(LearnStat {
                wall: out.elapsed,
                cpu: out.cpu,
                swapped: 0,
            }),
            Err(_) => self.log(
                "learn",
                "the retraining run panicked: heads kept".into(),
                0.0,
                1.0,
            ),
        }
    }

    /// Swaps in the heads that won, rescoring their evidence.
    fn apply(&mut self, out: LearnOutcome) {
        self.learn_stats.push(LearnStat {
            wall: out.elapsed,
            cpu: out.cpu,
            swapped: out.heads.len(),
        });
        if out.heads.is_empty() {
            let msg = format!(
                "retrained {} heads in {:.0} ms{}: none beat the serving ones",
                out.tried,
                out.elapsed.as_secs_f64() * 1e3,
                at(out.priority)
            );
            self.log("learn", msg, 0.0, 1.0);
            return;
        }
        let mut names = Vec::new();
        for nh in out.heads {
            let head = nh.head.clone();
            self.evidence.rescore(nh.ramp, &nh.scores, |f, answer| {
                let p = head.predict_hidden(&head.hidden(f));
                (p[0].1, p[0].0 == answer)
            });
            names.push(format!(
                "{} ({} -> {} of {} held-out exits)",
                self.points[nh.ramp], nh.old_exits, nh.new_exits, nh.held_out
            ));
            self.heads[nh.ramp] = nh.head.clone();
            self.head_updates.push(HeadUpdate {
                ramp: nh.ramp,
                head: nh.head,
            });
        }
        // Outputs recorded under the old heads no longer describe the serving ones.
        self.active.id += 1;
        self.log(
            "learn",
            format!(
                "retrained {} heads in {:.0} ms{}, swapped in: {}",
                out.tried,
                out.elapsed.as_secs_f64() * 1e3,
                at(out.priority),
                names.join(", ")
            ),
            0.0,
            1.0,
        );
        self.plan("tune", "heads retrained");
    }
}

/// " at idle priority" (how a background run ran, for the event log), or "" for a run inline.
fn at(priority: Option<LearnerPriority>) -> String {
    priority.map(|p| format!(" at {p}")).unwrap_or_default()
}
