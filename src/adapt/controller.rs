//! The [`Controller`]: the state of both loops, fed one [`BatchRecord`] at a time. Each batch
//! goes through named steps ([`Controller::on_batch`]): bookkeeping, the drift alarm
//! ([`super::drift`]), the window check (tune a new set, retune on a violation, switch the worst
//! ramps off on repeated ones), and every `adjust_every_batches` the ramp adjuster
//! ([`super::adjuster`]). The first placement is [`super::placement`].

use std::collections::VecDeque;

use super::config::ApparateConfig;
use super::drift::DriftAlarm;
use super::events::{ActiveConfig, AdaptEvent, BatchRecord};
use super::latency::LatencyModel;
use super::tuner::{Evaluation, Samples, evaluate, tune};
use crate::profile::Profile;

/// Most rows kept as the tuner's evidence after a drift alarm.
const POST_DRIFT_ROWS: usize = 2048;

/// The state of both loops.
pub struct Controller {
    pub(super) cfg: ApparateConfig,
    /// Every ramp the runtime may activate: point names in stage order.
    pub(super) points: Vec<String>,
    /// Candidates late enough to be useless are never activated (see
    /// [`super::placement::allowed_candidates`]).
    pub(super) allowed: Vec<bool>,
    pub(super) profile: Profile,
    pub(super) active: ActiveConfig,
    pub(super) tuned: bool,
    pub(super) window: VecDeque<BatchRecord>,
    pub(super) recent_exits: VecDeque<Vec<f64>>,
    pub(super) recent_sizes: VecDeque<usize>,
    pub(super) batches: u64,
    pub(super) inputs: u64,
    pub(super) since_adjust: usize,
    pub(super) violations: usize,
    pub(super) history: VecDeque<Vec<usize>>,
    pub(super) drift: DriftAlarm,
    /// Every candidate ramp's outputs on the bootstrap inputs (per input), used as a prior by
    /// the tuner until a drift alarm says the inputs have changed.
    pub(super) prior: Option<Vec<Vec<(f32, bool)>>>,
    /// After a drift alarm: every row of the active ramps since the alarm (or since the last
    /// ramp change), up to `POST_DRIFT_ROWS`, so the tuner's evidence grows back past the window.
    pub(super) post: VecDeque<Vec<(f32, bool)>>,
    pub(super) events: Vec<AdaptEvent>,
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
        let allowed = super::placement::allowed_candidates(&profile, &points);
        let points_len = points.len();
        let drift = DriftAlarm::new(cfg.drift_samples, cfg.drift_errors);
        let mut c = Controller {
            cfg,
            points,
            allowed,
            profile,
            active: ActiveConfig::empty(0),
            tuned: false,
            window: VecDeque::new(),
            recent_exits: VecDeque::new(),
            recent_sizes: VecDeque::new(),
            batches: 0,
            inputs: 0,
            since_adjust: 0,
            violations: 0,
            history: VecDeque::new(),
            drift,
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
            c.place_fixed(&fixed);
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

    pub(super) fn typical_batch(&self) -> usize {
        let n = self.recent_sizes.len();
        if n == 0 {
            return 1;
        }
        (self.recent_sizes.iter().sum::<usize>() as f64 / n as f64).round() as usize
    }

    pub(super) fn latency(&self, ramps: &[usize]) -> LatencyModel {
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

    pub(super) fn within_budget(&self, ramps: &[usize]) -> bool {
        ramps.len() <= self.cfg.max_ramps
            && self.latency(ramps).ramp_cost_fraction() <= self.cfg.max_ramp_cost + 1e-12
    }

    pub(super) fn log(&mut self, kind: &'static str, why: String, saving: f64, accuracy: f64) {
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

    pub(super) fn remember(&mut self, set: Vec<usize>) {
        self.history.push_back(set);
        while self.history.len() > self.cfg.history.max(1) {
            self.history.pop_front();
        }
    }

    /// Switches to a new ramp set with zero thresholds; the next batch tunes it.
    pub(super) fn set_ramps(&mut self, set: Vec<usize>, kind: &'static str, why: String) {
        self.active = ActiveConfig {
            id: self.active.id + 1,
            thresholds: vec![0.0; set.len()],
            ramps: set.clone(),
            shadow_fraction: 0.0,
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
    pub(super) fn tuning_samples(&self) -> Samples {
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

    pub(super) fn window_samples(&self) -> Samples {
        let rows: Vec<Vec<(f32, bool)>> = self
            .window
            .iter()
            .flat_map(|b| b.rows.iter().cloned())
            .collect();
        Samples::from_rows(self.active.ramps.len(), &rows)
    }

    pub(super) fn retune(&mut self, kind: &'static str, why: String) {
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

    /// Feeds one batch; returns the configuration to run from now on when it changed.
    pub fn on_batch(&mut self, rec: BatchRecord) -> Option<ActiveConfig> {
        self.batches += 1;
        self.inputs += rec.len() as u64;
        if rec.is_empty() {
            return None;
        }
        if let Some(ms) = &rec.stage_ms {
            refresh_profile(
                &mut self.profile,
                self.cfg.profile_update_weight,
                rec.len(),
                ms,
            );
        }
        if !self.cfg.enabled || self.cfg.fixed.is_some() || rec.config_id != self.active.id {
            // Ran under an older configuration: its rows do not match the active ramps.
            return None;
        }
        let before = self.active.clone();
        let k = self.active.ramps.len();
        self.observe(rec);
        if k > 0
            && let Some(alarm) = self.drift.check()
        {
            self.react_to_drift(alarm);
            return Some(self.active.clone());
        }
        let total = self.trim_window();
        if k > 0 {
            self.judge_window(total);
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

    /// Bookkeeping of a batch run under the active configuration: exit fractions and sizes for
    /// the utilities, the drift alarm's answers, the post-drift evidence, the window.
    fn observe(&mut self, rec: BatchRecord) {
        let k = self.active.ramps.len();
        let n = rec.len() as f64;
        let mut fractions = vec![0.0; k + 1];
        for e in &rec.exited {
            fractions[e.unwrap_or(k).min(k)] += 1.0 / n;
        }
        let keep = self.cfg.utility_batches.max(1);
        self.recent_exits.push_back(fractions);
        while self.recent_exits.len() > keep {
            self.recent_exits.pop_front();
        }
        self.recent_sizes.push_back(rec.len());
        while self.recent_sizes.len() > keep {
            self.recent_sizes.pop_front();
        }
        self.drift.observe(&rec, &self.active.ramps);
        if self.prior.is_none() {
            self.post.extend(rec.rows.iter().cloned());
            while self.post.len() > POST_DRIFT_ROWS {
                self.post.pop_front();
            }
        }
        self.window.push_back(rec);
    }

    /// Drops the oldest batches beyond `window_batches` while `window_min_samples` remain;
    /// returns the samples in the window.
    fn trim_window(&mut self) -> usize {
        let mut total: usize = self.window.iter().map(BatchRecord::len).sum();
        while self.window.len() > self.cfg.window_batches.max(1)
            && total - self.window[0].len() >= self.cfg.window_min_samples
        {
            total -= self.window[0].len();
            self.window.pop_front();
        }
        total
    }

    /// The accuracy constraint, checked on the window (at least `window_min_samples` inputs),
    /// not on the last batch alone: in a batch of 6 one wrong exit is 17% disagreement, and
    /// switching ramps off on such noise would leave them off most of the time.
    fn judge_window(&mut self, total: usize) {
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
                self.disable_worst(&now, floor, &lat);
            } else {
                self.on_violation(&now, floor);
            }
        }
    }

    /// A repeated violation: switch off the ramp(s) with the most wrong exits on the window
    /// until the next tuning.
    fn disable_worst(&mut self, now: &Evaluation, floor: f64, lat: &LatencyModel) {
        let k = self.active.ramps.len();
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
        let after = evaluate(&self.window_samples(), &self.active.thresholds, lat);
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
    }

    /// A first violation: retune on the window.
    fn on_violation(&mut self, now: &Evaluation, floor: f64) {
        // A violation says the bootstrap prior does not describe the live inputs (ramps are
        // more confident on the inputs they were trained on): from now on the evidence is live
        // rows only, growing from this window.
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

/// Refreshes a running profile with a batch's live stage timings (exponential average of weight
/// `w`; the straight-through time scales with the stages' sum).
pub(super) fn refresh_profile(profile: &mut Profile, w: f64, batch: usize, stage_ms: &[f64]) {
    if let Some(p) = profile.batches.iter_mut().find(|p| p.batch == batch)
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
