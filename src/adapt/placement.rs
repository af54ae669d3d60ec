//! Where the first ramps go: greedily on the bootstrap outputs (each step adds the candidate
//! that most raises the tuned saving, within the budget, while it helps), spread evenly without
//! them, or exactly the `fixed` ramps of a static configuration.

use super::controller::Controller;
use super::events::ActiveConfig;
use super::tuner::{Samples, evaluate, tune};
use crate::profile::Profile;

/// Per candidate ramp: whether it may ever be activated. Exiting there must beat finishing the
/// model (at batch 1), else the ramp only costs.
pub(super) fn allowed_candidates(profile: &Profile, points: &[String]) -> Vec<bool> {
    let base = profile.for_batch(1);
    points
        .iter()
        .map(|p| {
            base.is_some_and(|b| match (b.until_ms(p), b.ramp_ms(p)) {
                (Some(v), Some(o)) => v + o < b.vanilla_ms(),
                _ => false,
            })
        })
        .collect()
}

impl Controller {
    /// The static configuration: exactly these points with these thresholds, never adapted.
    /// Points not among the candidates are ignored here (the engine refuses them at start).
    pub(super) fn place_fixed(&mut self, fixed: &[(String, f32)]) {
        let mut pairs: Vec<(usize, f32)> = fixed
            .iter()
            .filter_map(|(p, t)| self.points.iter().position(|x| x == p).map(|i| (i, *t)))
            .collect();
        pairs.sort_by_key(|p| p.0);
        self.active = ActiveConfig {
            id: 1,
            ramps: pairs.iter().map(|p| p.0).collect(),
            thresholds: pairs.iter().map(|p| p.1).collect(),
            shadow_fraction: 0.0,
        };
        self.log(
            "place",
            "fixed configuration: no adaptation".into(),
            0.0,
            1.0,
        );
    }

    /// Initial placement: greedily add the candidate that most raises the tuned saving on the
    /// bootstrap outputs, within the budget, while it helps.
    pub(super) fn place(&mut self, bootstrap: Option<&Samples>) {
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
            shadow_fraction: 0.0,
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
}
