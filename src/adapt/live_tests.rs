//! The live loops on synthetic streams with features: ramp heads are real (host) softmax
//! regressions over 2-wide features, so shadow scoring, retraining and head swaps run as in
//! serving. Seeded, fast.

use super::live::LiveController;
use super::tests::profile;
use super::*;
use crate::format::RampHead;
use crate::rng::SplitMix;

/// Inputs of a stream: the model answers class `y` (0 or 1, even odds); at candidate ramp `r`
/// the feature is `sign[r] * strength[r] * (2y - 1)` plus Gaussian-like noise of `noise[r]`,
/// and a constant. The starting heads read the first feature's sign, so a ramp is confident
/// where `strength / noise` is high and confidently wrong where `sign` is flipped.
struct FeatureWorld {
    strength: Vec<f32>,
    noise: Vec<f32>,
    sign: Vec<f32>,
    rng: SplitMix,
    shadow_credit: f32,
}

fn start_head() -> TrainedHead {
    TrainedHead::from_tensors(
        RampHead::Linear {
            width: 2,
            classes: 2,
        },
        vec![vec![-1.0, 0.0, 1.0, 0.0], vec![0.0, 0.0]],
    )
    .unwrap()
}

use crate::ramps::train::TrainedHead;

impl FeatureWorld {
    fn new(k: usize, seed: u64) -> FeatureWorld {
        FeatureWorld {
            strength: vec![3.0; k],
            noise: vec![1.0; k],
            sign: vec![1.0; k],
            rng: SplitMix::new(seed),
            shadow_credit: 0.0,
        }
    }

    fn gauss(&mut self) -> f32 {
        (0..4).map(|_| self.rng.uniform()).sum::<f32>() * 0.87
    }

    /// One batch of `n` under `cfg` scored by `heads` (the serving heads), as the executor and
    /// releaser record it.
    fn batch(&mut self, cfg: &ActiveConfig, heads: &[TrainedHead], n: usize) -> BatchRecord {
        let k = self.strength.len();
        self.shadow_credit = (self.shadow_credit + cfg.shadow_fraction).min(2.0);
        let shadow = self.shadow_credit >= 1.0;
        if shadow {
            self.shadow_credit -= 1.0;
        }
        let mut feats: Vec<Vec<f32>> = vec![Vec::new(); k];
        let mut answers = Vec::new();
        for _ in 0..n {
            let y = u32::from(self.rng.uniform() > 0.0);
            for (r, f) in feats.iter_mut().enumerate() {
                let x = self.sign[r] * self.strength[r] * (2.0 * y as f32 - 1.0)
                    + self.noise[r] * self.gauss();
                f.extend([x, 1.0]);
            }
            answers.push(y);
        }
        let scored: Vec<Vec<(u32, f32)>> = (0..k)
            .map(|r| heads[r].predict_hidden(&heads[r].hidden(&feats[r])))
            .collect();
        let rows: Vec<Vec<(f32, bool)>> = (0..n)
            .map(|i| {
                cfg.ramps
                    .iter()
                    .map(|&r| (scored[r][i].1, scored[r][i].0 == answers[i]))
                    .collect()
            })
            .collect();
        let mut rec = BatchRecord::replay(cfg, rows);
        rec.answers = answers;
        rec.shadow = shadow.then_some(ShadowRecord {
            features: feats,
            ms: 0.05,
        });
        rec
    }
}

fn config() -> ApparateConfig {
    let mut cfg = ApparateConfig::vision();
    cfg.live.learn_in_background = false;
    cfg
}

/// Runs `batches` batches of `n`; returns per input `(exited, agreed)`.
fn run(
    c: &mut LiveController,
    w: &mut FeatureWorld,
    heads: &mut [TrainedHead],
    batches: usize,
    n: usize,
) -> Vec<(bool, bool)> {
    let mut out = Vec::new();
    for _ in 0..batches {
        let cfg = c.active().clone();
        let rec = w.batch(&cfg, heads, n);
        out.extend(
            rec.exited
                .iter()
                .zip(&rec.agreed)
                .map(|(e, a)| (e.is_some(), *a)),
        );
        c.on_batch(rec);
        for u in c.take_head_updates() {
            heads[u.ramp] = (*u.head).clone();
        }
    }
    out
}

/// Live loops over five candidate ramps with the starting heads, no bootstrap, and the world
/// they serve (seeded).
fn five_candidates(seed: u64) -> (LiveController, FeatureWorld, Vec<TrainedHead>) {
    let (profile, points) = profile(5, 0.1);
    let k = points.len();
    let heads = vec![start_head(); k];
    let c = LiveController::new(config(), points, profile, None, heads.clone());
    (c, FeatureWorld::new(k, seed), heads)
}

/// The first event of `kind`; fails the test, listing the events, when there is none.
fn first<'a>(events: &'a [AdaptEvent], kind: &str) -> &'a AdaptEvent {
    events
        .iter()
        .find(|e| e.kind == kind)
        .unwrap_or_else(|| panic!("no `{kind}` event: {events:#?}"))
}

fn exit_rate(x: &[(bool, bool)]) -> f64 {
    x.iter().filter(|e| e.0).count() as f64 / x.len().max(1) as f64
}

/// Largest share of wrong releases in any window of `w` consecutive inputs.
fn worst_window(x: &[(bool, bool)], w: usize) -> f64 {
    let wrong: Vec<usize> = x.iter().map(|e| usize::from(!e.1)).collect();
    wrong
        .windows(w)
        .map(|win| win.iter().sum::<usize>() as f64 / w as f64)
        .fold(0.0, f64::max)
}

#[test]
fn a_new_ramp_set_starts_tuned_no_window_goes_without_exits() {
    let (profile, points) = profile(5, 0.1);
    let k = points.len();
    let mut w = FeatureWorld::new(k, 11);
    // At first only the last candidate is sure; the first is noise.
    w.strength = vec![0.2, 0.2, 3.0];
    let mut heads = vec![start_head(); k];
    // One ramp at a time, so that moving to a better candidate is a set change.
    let mut cfg = config();
    cfg.max_ramps = 1;
    let mut c = LiveController::new(cfg, points, profile, None, heads.clone());
    let mut all = run(&mut c, &mut w, &mut heads, 400, 4);
    // Then the first candidate becomes as sure: the set must take it in (it releases earlier).
    w.strength = vec![3.0, 0.2, 3.0];
    all.extend(run(&mut c, &mut w, &mut heads, 400, 4));
    let events = c.drain_events();
    let replans: Vec<&AdaptEvent> = events.iter().filter(|e| e.kind == "replan").collect();
    assert!(!replans.is_empty(), "no set change: {events:#?}");
    for e in &replans {
        assert!(
            e.thresholds.iter().any(|&t| t > 0.0),
            "a new set started without exits: {e:?}"
        );
    }
    let last = replans.last().unwrap();
    assert!(last.ramps.contains(&"s1".to_string()), "{last:?}");
    // From the first exits on, no 256-input stretch without exits.
    let first = all.iter().position(|e| e.0).expect("exits happen");
    for win in all[first..].windows(256) {
        assert!(win.iter().any(|e| e.0), "a 256-input stretch without exits");
    }
    // The budget: at most 1% wrong releases overall, and no 256-input window past 1.5% (the
    // issue's worst-window line: chance alone spreads a rate near the budget over windows).
    let wrong = all.iter().filter(|e| !e.1).count() as f64 / all.len() as f64;
    assert!(wrong <= 0.01, "{wrong} wrong overall");
    let worst = worst_window(&all[first..], 256);
    assert!(worst <= 0.015, "worst window {worst}: {events:#?}");
}

#[test]
fn after_a_drift_exits_recover_within_a_bounded_number_of_inputs() {
    let (mut c, mut w, mut heads) = five_candidates(5);
    let k = heads.len();
    let warm = run(&mut c, &mut w, &mut heads, 300, 4);
    let before = exit_rate(&warm[600..]);
    assert!(before > 0.3, "exit rate before the drift {before}");
    // The drift: every ramp's feature flips, so the serving heads are confidently wrong.
    w.sign = vec![-1.0; k];
    let after = run(&mut c, &mut w, &mut heads, 700, 4);
    let events = c.drain_events();
    let drift = first(&events, "drift");
    let learned = events
        .iter()
        .any(|e| e.kind == "learn" && e.why.contains("swapped"));
    assert!(learned, "no head retrained: {events:#?}");
    // Wrong releases before the detection are the price of any test that needs evidence.
    let detected = (drift.inputs as usize).saturating_sub(warm.len());
    let wrong_before = after[..detected.min(after.len())]
        .iter()
        .filter(|e| !e.1)
        .count();
    // A few wrong releases in quick succession pause the exits while the test decides on
    // what the held thresholds would release: three wrong releases pause them at the
    // defaults, and a batch in flight may add one.
    assert!(
        first(&events, "pause").inputs <= drift.inputs,
        "{events:#?}"
    );
    assert!(
        wrong_before <= 5,
        "{wrong_before} wrong releases before detection: {events:#?}"
    );
    // Recovery: within 2,000 inputs of the drift the exit rate is back to 80% of before ...
    let recovered = exit_rate(&after[2000..]);
    assert!(
        recovered >= 0.8 * before,
        "exit rate {recovered} after, {before} before: {events:#?}"
    );
    // ... and every window after the detection stays within the window bound (1.5%, as above),
    // the recovered stream within the budget overall.
    assert!(worst_window(&after[detected..], 256) <= 0.015);
    let wrong = after[detected..].iter().filter(|e| !e.1).count() as f64;
    assert!(wrong / (after.len() - detected) as f64 <= 0.01);
}

#[test]
fn paper_mode_and_every_part_switched_off_still_run() {
    let (profile, points) = profile(5, 0.1);
    let k = points.len();
    for part in 0..5 {
        let mut cfg = config();
        match part {
            0 => cfg.mode = Mode::Paper,
            1 => cfg.live.shadow = false,
            2 => cfg.live.bound = false,
            3 => cfg.live.learning = false,
            _ => cfg.live.drift_test = false,
        }
        let mut w = FeatureWorld::new(k, 9);
        let mut heads = vec![start_head(); k];
        let mut loops = Loops::new(cfg, points.clone(), profile.clone(), None, heads.clone());
        for _ in 0..200 {
            let cfg = loops.active().clone();
            let rec = w.batch(&cfg, &heads, 4);
            loops.on_batch(rec);
            for u in loops.take_head_updates() {
                heads[u.ramp] = (*u.head).clone();
            }
        }
        assert!(!loops.drain_events().is_empty(), "part {part}");
    }
}

/// A drift that leaves the ramps mostly unsure: few releases, some wrong. The test on wrong
/// releases alone would take hundreds of inputs; once they pause the exits, the drop of the
/// first ramp's agreement with the model tells the change within tens of inputs.
#[test]
fn a_pause_on_unsure_ramps_ends_in_a_drift_when_their_agreement_dropped() {
    let (mut c, mut w, mut heads) = five_candidates(21);
    let k = heads.len();
    run(&mut c, &mut w, &mut heads, 300, 4);
    c.drain_events();
    // Weaker features: the heads agree with the model on about 88% of inputs (99% before),
    // and few of their confident releases are wrong.
    w.strength = vec![1.2; k];
    run(&mut c, &mut w, &mut heads, 400, 4);
    let events = c.drain_events();
    let (pause, drift) = (first(&events, "pause"), first(&events, "drift"));
    assert!(drift.why.contains("agreed"), "{drift:?}");
    assert!(
        drift.inputs >= pause.inputs && drift.inputs - pause.inputs <= 100,
        "pause at {}, drift at {}",
        pause.inputs,
        drift.inputs
    );
}

/// Live loops with batches of one over five candidates whose features are `strength` strong
/// (the same at every candidate), `spend` on or off; returns per input `(exited, agreed)`.
fn one_at_a_time(seed: u64, strength: f32, spend: bool, inputs: usize) -> Vec<(bool, bool)> {
    let (profile, points) = profile(5, 0.1);
    let k = points.len();
    let mut heads = vec![start_head(); k];
    let mut cfg = config();
    cfg.live.spend_slack = spend;
    let mut c = LiveController::new(cfg, points, profile, None, heads.clone());
    let mut w = FeatureWorld::new(k, seed);
    w.strength = vec![strength; k];
    run(&mut c, &mut w, &mut heads, inputs, 1)
}

/// Part 5: where the bound leaves most of the budget unused, the level climbs and more inputs
/// leave early, while the wrong releases stay within what the level's rule promises (the
/// goal's share of the budget, plus the start's credit of `1 / spend_step` and the last
/// input's debt of one).
#[test]
fn spending_the_slack_releases_more_and_keeps_its_promise() {
    let budget = ApparateConfig::vision().accuracy_budget;
    let l = LiveConfig::default();
    let (goal, slack) = (l.spend_goal * budget, 1.0 / l.spend_step + 1.0);
    let n = 4000;
    let (mut on_total, mut off_total) = (0.0, 0.0);
    for seed in [1, 2, 3] {
        // Weak features: on the bound alone the ramps release about a third of the inputs.
        let on = one_at_a_time(seed, 1.0, true, n);
        let off = one_at_a_time(seed, 1.0, false, n);
        let wrong = on.iter().filter(|e| !e.1).count();
        assert!(
            wrong as f64 <= goal * n as f64 + slack,
            "seed {seed}: {wrong} wrong releases in {n}"
        );
        on_total += exit_rate(&on[1000..]);
        off_total += exit_rate(&off[1000..]);
    }
    assert!(
        on_total > off_total * 1.1,
        "exit rate with spending {:.3}, without {:.3}",
        on_total / 3.0,
        off_total / 3.0
    );
}

/// Largest count of wrong releases in any `w` consecutive inputs.
fn most_wrong(x: &[(bool, bool)], w: usize) -> usize {
    let wrong: Vec<usize> = x.iter().map(|e| usize::from(!e.1)).collect();
    wrong
        .windows(w)
        .map(|win| win.iter().sum::<usize>())
        .max()
        .unwrap_or(0)
}

/// The window guard: with batches of one, no 256 consecutive inputs hold more wrong releases
/// than the window's floor allows (3), across a drift that makes every head confidently
/// wrong. With the floor lowered (the guard as good as off) the same stream breaks it, so the
/// guard is what holds it.
#[test]
fn the_window_guard_holds_every_window_within_its_floor() {
    let run_with = |floor: f64| {
        let (profile, points) = profile(5, 0.1);
        let k = points.len();
        let mut heads = vec![start_head(); k];
        let mut cfg = config();
        cfg.live.window_floor = floor;
        // A slow drift test: the guard alone must hold the window.
        cfg.live.drift_threshold = 1e3;
        let mut c = LiveController::new(cfg, points, profile, None, heads.clone());
        let mut w = FeatureWorld::new(k, 17);
        w.strength = vec![2.0; k];
        let mut all = run(&mut c, &mut w, &mut heads, 1500, 1);
        w.sign = vec![-1.0; k];
        all.extend(run(&mut c, &mut w, &mut heads, 1500, 1));
        (all, c.drain_events())
    };
    let (guarded, events) = run_with(0.985);
    let most = most_wrong(&guarded, 256);
    assert!(most <= 3, "{most} wrong releases in a window: {events:#?}");
    first(&events, "hold");
    let (open, _) = run_with(0.5);
    assert!(
        most_wrong(&open, 256) > 3,
        "the stream never tested the guard"
    );
}
