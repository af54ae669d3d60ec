//! The drift alarm: a window check needs hundreds of samples to see that the inputs changed (at
//! 30 frames/s and batches of one: seconds of wrong answers), so the last few released answers
//! are watched as well. When the last `drift_samples` hold `drift_errors` or more disagreements
//! (improbable within budget: at the tuner's 0.25% target, 3 or more in 64 happen with
//! probability 0.05%), the ramps with wrong exits among them are switched off at once, the
//! window restarts from the newest batch, and the set retunes when its window is full again.

use std::collections::VecDeque;

use super::controller::Controller;
use super::events::BatchRecord;

/// The released answers the alarm watches.
pub(super) struct DriftAlarm {
    samples: usize,
    errors: usize,
    /// Since the last alarm: `(ramp of the file it exited at, or None for the final stage,
    /// agreed)`. Ramps of the file, not active indices: the active set may change between the
    /// batches these came from, and an old index would name another ramp (or none).
    recent: VecDeque<(Option<usize>, bool)>,
}

/// A fired alarm.
pub(super) struct Alarm {
    /// Disagreements among the watched answers.
    pub wrong: usize,
    /// Ramps of the file that released a wrong answer among them (stage order, distinct).
    pub ramps: Vec<usize>,
}

impl DriftAlarm {
    pub fn new(samples: usize, errors: usize) -> DriftAlarm {
        DriftAlarm {
            samples: samples.max(1),
            errors,
            recent: VecDeque::new(),
        }
    }

    /// Adds the releases of a batch run under the active ramps `ramps` (file indices).
    pub fn observe(&mut self, rec: &BatchRecord, ramps: &[usize]) {
        for (e, a) in rec.exited.iter().zip(&rec.agreed) {
            let ramp = e.and_then(|i| ramps.get(i).copied());
            self.recent.push_back((ramp, *a));
        }
        while self.recent.len() > self.samples {
            self.recent.pop_front();
        }
    }

    /// The alarm, if the watched answers hold too many disagreements (0 errors: switched off).
    pub fn check(&self) -> Option<Alarm> {
        let wrong = self.recent.iter().filter(|(_, a)| !a).count();
        if self.errors == 0 || wrong < self.errors {
            return None;
        }
        let mut ramps: Vec<usize> = self
            .recent
            .iter()
            .filter(|(_, a)| !a)
            .filter_map(|(r, _)| *r)
            .collect();
        ramps.sort_unstable();
        ramps.dedup();
        Some(Alarm { wrong, ramps })
    }

    pub fn reset(&mut self) {
        self.recent.clear();
    }
}

impl Controller {
    /// The reaction to an alarm: the offending ramps off, only the newest samples kept as
    /// evidence, the bootstrap prior dropped (the inputs no longer look like it).
    pub(super) fn react_to_drift(&mut self, alarm: Alarm) {
        let off: Vec<usize> = alarm
            .ramps
            .iter()
            .filter_map(|r| self.active.ramps.iter().position(|x| x == r))
            .collect();
        for &r in &off {
            self.active.thresholds[r] = 0.0;
        }
        self.active.id += 1;
        // Only the newest samples describe the inputs now.
        if let Some(latest) = self.window.pop_back() {
            self.window.clear();
            self.window.push_back(latest);
        }
        self.drift.reset();
        self.tuned = false;
        self.violations = 0;
        // The bootstrap inputs no longer describe the stream, nor do the rows before now.
        self.prior = None;
        self.post.clear();
        let names: Vec<&str> = off
            .iter()
            .map(|&r| self.points[self.active.ramps[r]].as_str())
            .collect();
        let samples = self.cfg.drift_samples;
        self.log(
            "drift",
            format!(
                "{} of the last {samples} answers disagreed: {} off, retuning on new samples",
                alarm.wrong,
                names.join(", ")
            ),
            0.0,
            1.0 - alarm.wrong as f64 / samples.max(1) as f64,
        );
    }
}
