//! Ramps that keep learning (live loops, part 3). Every input reaches the final layer, so each
//! answer is a free label: the shadow samples' pooled features and the model's answers retrain
//! every ramp's head (its output layer, see [`TrainedHead::retrain_output`]) on the older three
//! quarters of the evidence, and a new head replaces the serving one only when it releases more
//! of the newest quarter (held out, the regime that matters now) within the budget.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::evidence::Featured;
use crate::ramps::train::{TrainConfig, TrainedHead};

/// Share of the samples (the newest) held out to judge a new head.
const HELD_OUT: f64 = 0.25;

/// Nice value of the background learner thread where idle scheduling is refused (see
/// [`yield_to_serving`]). At nice 10 the kernel's scheduler weighs the learner at about a tenth
/// of a compute thread while they contend.
const LEARNER_NICE: i32 = 10;

/// The priority the learner thread runs at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LearnerPriority {
    /// Linux `SCHED_IDLE`: the thread runs on a core nothing else wants, and gets next to
    /// nothing of one that something else wants.
    Idle,
    /// Nice [`LEARNER_NICE`].
    Nice,
    /// Unchanged: the platform (or the sandbox) allowed neither; `live.learn_share` alone
    /// keeps retraining from taking a core.
    Normal,
}

impl std::fmt::Display for LearnerPriority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LearnerPriority::Idle => f.write_str("idle priority"),
            LearnerPriority::Nice => write!(f, "nice {LEARNER_NICE}"),
            LearnerPriority::Normal => f.write_str("normal priority"),
        }
    }
}

/// Moves the calling thread to the idle scheduling class (Linux `SCHED_IDLE`), or where that
/// is refused lowers it to nice [`LEARNER_NICE`]. A retraining run (up to 3-7 s on video)
/// took a whole core from the two compute threads at normal priority (video queueing p99
/// 45.6 ms against 5.2 ms for the plain model); at nice 10 it still took about a tenth of one
/// while they contended, so `live.learn_share` had to hold retraining to a tenth of a core
/// over time, and the retrained heads that bring the exits back came late (video: exits
/// began at request 605). While it contends with a normal thread, the scheduler weighs an
/// idle-class thread at 3 against 1,024 (about 0.3% of the core), so serving loses next to no
/// CPU time to it however often it runs; what it still shares is the caches and the memory
/// bandwidth (not measured separately: the interleaved rate sweep at `learn_share` 0.5 gave
/// the same 0.89x as the nice-10 learner at 0.1). Both settings are per thread
/// on Linux (`pid` 0 is the calling thread); unprivileged threads may lower their own
/// priority.
pub(crate) fn yield_to_serving() -> LearnerPriority {
    if crate::sched::idle_class() {
        LearnerPriority::Idle
    } else if crate::sched::nice(LEARNER_NICE) {
        LearnerPriority::Nice
    } else {
        LearnerPriority::Normal
    }
}

/// A retraining run's input: a snapshot of the evidence with features.
pub(crate) struct LearnJob {
    /// Ramps (of the file) to retrain.
    pub ramps: Vec<usize>,
    pub heads: Vec<Arc<TrainedHead>>,
    /// `(seq, per-ramp features, model answer)`, oldest first.
    pub samples: Vec<Featured>,
    pub budget: f64,
    pub train: TrainConfig,
}

/// A head that beat the serving one, and its scores on every sample of the job.
pub(crate) struct NewHead {
    pub ramp: usize,
    pub head: Arc<TrainedHead>,
    /// `(seq, (u, agrees))`, ascending seq.
    pub scores: Vec<(u64, (f32, bool))>,
    /// Held-out inputs released within the budget by the old and the new head.
    pub old_exits: usize,
    pub new_exits: usize,
    pub held_out: usize,
}

pub(crate) struct LearnOutcome {
    pub heads: Vec<NewHead>,
    pub tried: usize,
    pub elapsed: Duration,
    /// CPU time the run's thread used (background runs on Linux; `None` otherwise). At idle
    /// priority it is below `elapsed` by the time the thread waited for a free core.
    pub cpu: Option<Duration>,
    /// The priority the run ran at (`None`: inline, on the caller's thread).
    pub priority: Option<LearnerPriority>,
}

/// What one finished retraining run cost and changed, for the engine's overhead counters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LearnStat {
    /// From start to end of the run.
    pub wall: Duration,
    /// CPU time of its thread, where measured (see [`LearnOutcome::cpu`]).
    pub cpu: Option<Duration>,
    /// Heads that replaced serving ones.
    pub swapped: usize,
}

/// How many of `scores` (`(u, agrees)`) a single threshold can release while at most
/// `budget` of all of them are released wrong: the exit capability a head is judged by.
pub(crate) fn exits_within_budget(scores: &[(f32, bool)], budget: f64) -> usize {
    let mut sorted: Vec<(f32, bool)> = scores.to_vec();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let allowed = (budget * scores.len() as f64).floor() as usize;
    let (mut wrong, mut best) = (0, 0);
    let mut i = 0;
    while i < sorted.len() {
        // Inputs with equal u leave together.
        let mut j = i;
        while j < sorted.len() && sorted[j].0 == sorted[i].0 {
            wrong += usize::from(!sorted[j].1);
            j += 1;
        }
        if wrong > allowed {
            break;
        }
        best = j;
        i = j;
    }
    best
}

/// Runs a job (on the learner thread, or inline in tests).
pub(crate) fn learn(job: LearnJob) -> LearnOutcome {
    let t0 = Instant::now();
    let n = job.samples.len();
    let held = ((n as f64 * HELD_OUT).round() as usize).clamp(1, n.saturating_sub(1).max(1));
    let train_n = n - held;
    let answers: Vec<u32> = job.samples.iter().map(|s| s.2).collect();
    let mut heads = Vec::new();
    for &r in &job.ramps {
        let old = &job.heads[r];
        let feats: Vec<f32> = job
            .samples
            .iter()
            .flat_map(|s| s.1[r].iter().copied())
            .collect();
        let width = old.head.width();
        if train_n < 2 || feats.len() != n * width {
            continue;
        }
        let hidden = old.hidden(&feats);
        let Ok(new) =
            old.retrain_output(&hidden[..train_n * width], &answers[..train_n], &job.train)
        else {
            continue;
        };
        let judge = |h: &TrainedHead, from: usize| -> Vec<(f32, bool)> {
            h.predict_hidden(&hidden[from * width..])
                .iter()
                .zip(&answers[from..])
                .map(|((c, u), a)| (*u, c == a))
                .collect()
        };
        let old_held = judge(old, train_n);
        let new_held = judge(&new, train_n);
        let old_exits = exits_within_budget(&old_held, job.budget);
        let new_exits = exits_within_budget(&new_held, job.budget);
        let agreement = |s: &[(f32, bool)]| s.iter().filter(|x| x.1).count();
        let better = new_exits > old_exits
            || (new_exits == old_exits && agreement(&new_held) > agreement(&old_held) + held / 50);
        if !better {
            continue;
        }
        // The evidence is rescored with the new head, but not with its view of its own
        // training inputs: those are optimistic (on a movies run, a swap with evidence
        // rescored that way was followed by 7 wrong releases in 256 requests and a drift
        // alarm on a stream without a drift). The training part is scored cross-fitted (each half by an output layer
        // trained on the other half), the held-out part by the new head.
        let Some(Some(fitted)) = cross_fitted(
            std::slice::from_ref(old),
            &[feats[..train_n * width].to_vec()],
            &answers[..train_n],
            &job.train,
        )
        .pop() else {
            continue;
        };
        let scores = job
            .samples
            .iter()
            .zip(fitted.into_iter().chain(new_held))
            .map(|(s, x)| (s.0, x))
            .collect();
        heads.push(NewHead {
            ramp: r,
            head: Arc::new(new),
            scores,
            old_exits,
            new_exits,
            held_out: held,
        });
    }
    LearnOutcome {
        heads,
        tried: job.ramps.len(),
        elapsed: t0.elapsed(),
        cpu: None,
        priority: None,
    }
}

/// Per input, ramp `r`'s `(u, agrees)` from cross-fitted heads: inputs at even positions
/// scored by `heads[r]` with its output layer retrained on the odd ones, and the other way
/// round. `features[r]` is `[answers.len(), width]`. `None` for a ramp whose halves cannot be
/// trained (one distinct answer, no features): keep its own scores there.
pub(crate) fn cross_fitted(
    heads: &[Arc<TrainedHead>],
    features: &[Vec<f32>],
    answers: &[u32],
    train: &TrainConfig,
) -> Vec<Option<Vec<(f32, bool)>>> {
    let n = answers.len();
    heads
        .iter()
        .zip(features)
        .map(|(head, f)| {
            let width = head.head.width();
            if n < 4 || f.len() != n * width {
                return None;
            }
            let hidden = head.hidden(f);
            let hw = hidden.len() / n;
            let mut out = vec![(1.0, false); n];
            for fold in 0..2 {
                let (mut x, mut y) = (Vec::new(), Vec::new());
                for i in (0..n).filter(|i| i % 2 != fold) {
                    x.extend_from_slice(&hidden[i * hw..(i + 1) * hw]);
                    y.push(answers[i]);
                }
                let h = head.retrain_output(&x, &y, train).ok()?;
                let rows: Vec<usize> = (0..n).filter(|i| i % 2 == fold).collect();
                let xs: Vec<f32> = rows
                    .iter()
                    .flat_map(|&i| hidden[i * hw..(i + 1) * hw].iter().copied())
                    .collect();
                for (&i, (c, u)) in rows.iter().zip(h.predict_hidden(&xs)) {
                    out[i] = (u, c == answers[i]);
                }
            }
            Some(out)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_capability_counts_the_confident_prefix_within_budget() {
        // Sorted by u: right, right, wrong, right, wrong.
        let s = [
            (0.1, true),
            (0.2, true),
            (0.3, false),
            (0.4, true),
            (0.5, false),
        ];
        assert_eq!(exits_within_budget(&s, 0.0), 2);
        assert_eq!(exits_within_budget(&s, 0.2), 4);
        assert_eq!(exits_within_budget(&s, 0.4), 5);
        // Ties leave together: a wrong one among equal u stops them all.
        let t = [(0.1, true), (0.1, false), (0.2, true)];
        assert_eq!(exits_within_budget(&t, 0.0), 0);
    }

    /// Labels that are noise, many features, few inputs: a head trained on all of them
    /// memorises them, so its own scores claim agreement it does not have; cross-fitted scores
    /// do not.
    #[test]
    fn cross_fitted_scores_are_not_the_optimism_of_a_head_on_its_training_inputs() {
        use crate::ramps::train::{HeadInit, train_head};
        let (n, width, classes) = (120, 256, 4);
        let mut rng = crate::rng::SplitMix::new(3);
        let x: Vec<f32> = (0..n * width).map(|_| rng.uniform()).collect();
        let y: Vec<u32> = (0..n).map(|i| ((i * 7 + i / 3) % classes) as u32).collect();
        let cfg = TrainConfig {
            epochs: 300,
            weight_decay: Some(0.0),
            ..TrainConfig::default()
        };
        let head = train_head(&x, &y, width, classes, HeadInit::Linear, &cfg, |_, _| {}).unwrap();
        let agree = |s: &[(f32, bool)]| s.iter().filter(|p| p.1).count() as f64 / n as f64;
        let own: Vec<(f32, bool)> = head
            .predict(&x)
            .iter()
            .zip(&y)
            .map(|((c, u), a)| (*u, c == a))
            .collect();
        let fitted = cross_fitted(&[Arc::new(head)], &[x], &y, &cfg);
        let fitted = fitted[0].as_ref().expect("both halves train");
        assert!(agree(&own) > 0.9, "the head memorised: {}", agree(&own));
        // Chance is 1/4; allow the noise of 120 inputs.
        assert!(
            agree(fitted) < 0.45,
            "cross-fitted agreement {}",
            agree(fitted)
        );
        // One distinct answer: nothing to train on, the ramp keeps its own scores.
        let one = vec![0u32; 8];
        let h = Arc::new(
            train_head(
                &[0.0; 8 * 2],
                &[0, 1, 0, 1, 0, 1, 0, 1],
                2,
                2,
                HeadInit::Linear,
                &cfg,
                |_, _| {},
            )
            .unwrap(),
        );
        assert!(cross_fitted(&[h], &[vec![0.0; 16]], &one, &cfg)[0].is_none());
    }

    /// The learner's priority drops on its own thread only: the serving threads keep theirs.
    #[cfg(target_os = "linux")]
    #[test]
    fn the_learner_yields_on_its_own_thread_only() {
        unsafe extern "C" {
            fn getpriority(which: i32, who: u32) -> i32;
            fn sched_getscheduler(pid: i32) -> i32;
        }
        const SCHED_IDLE: i32 = 5;
        // SAFETY: plain system calls on the calling thread with integer arguments.
        let state = || unsafe { (sched_getscheduler(0), getpriority(0, 0)) };
        let before = state();
        let (got, learner) = std::thread::spawn(move || (yield_to_serving(), state()))
            .join()
            .unwrap();
        match got {
            LearnerPriority::Idle => assert_eq!(learner.0, SCHED_IDLE, "{got}: {learner:?}"),
            LearnerPriority::Nice => assert!(learner.1 >= LEARNER_NICE, "{got}: {learner:?}"),
            // A sandbox may refuse both; then nothing may have changed either.
            LearnerPriority::Normal => assert_eq!(learner, before, "{got}"),
        }
        assert_eq!(state(), before, "the calling thread's scheduling changed");
    }
}
