//! Ramp adjustment (Apparate section 4.2), every `adjust_every_batches` batches: a retune that
//! clearly raises the predicted saving is enough; otherwise ramps whose utility is negative (they
//! cost the inputs that pass them more than they save the ones that exit) are removed and one
//! ramp moves deeper, or, when every ramp pays off, an earlier position is probed. Recent ramp
//! sets are never revisited, which damps oscillation.

use super::controller::Controller;
use super::tuner::{evaluate, tune};

impl Controller {
    /// Ramp adjustment (section 4.2).
    pub(super) fn adjust(&mut self) {
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
