//! Properties of the engine under random knobs: every request is accounted for exactly once and
//! nothing hangs, including with extreme delays and deadlines; config validation never panics
//! and every config it accepts starts an engine.

use std::time::{Duration, Instant};

use apparate::adapt::ApparateConfig;
use apparate::rng::SplitMix;
use apparate::serve::config::MAX_DELAY;
use apparate::serve::{BatchingConfig, Engine, Input, RequestOptions, ServeError};
use proptest::prelude::*;

use super::{shared_tiny_model, threads1, tiny_texts};

/// Submits `n` requests with random deadlines and cancellations, then shuts down on another
/// thread; every future must resolve and the counts add up, within `limit`.
fn run_and_account(engine: Engine, n: usize, seed: u64, limit: Duration) -> Result<(), String> {
    let mut rng = SplitMix::new(seed);
    let mut waits = Vec::new();
    for t in tiny_texts(n, seed) {
        let deadline = match rng.below(5) {
            0 => Some(Instant::now() + Duration::from_micros(rng.below(2000) as u64)),
            // Tens of thousands of years away.
            1 => Instant::now().checked_add(Duration::from_secs(1 << 40)),
            _ => None,
        };
        let f = engine.infer_with(Input::Text(t), RequestOptions { deadline });
        if rng.below(4) == 0 {
            drop(f);
        } else {
            waits.push(f);
        }
        if rng.below(8) == 0 {
            std::thread::sleep(Duration::from_micros(rng.below(500) as u64));
        }
    }
    let m = engine.shared_metrics();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Draining serves the queued requests at once, whatever the batching delay.
        engine.shutdown();
        let answers: Vec<_> = waits.into_iter().map(|f| f.wait()).collect();
        let _ = tx.send(answers);
    });
    let answers = rx
        .recv_timeout(limit)
        .map_err(|_| "the engine hung".to_string())?;
    for a in &answers {
        if !matches!(
            a,
            Ok(_) | Err(ServeError::Overloaded(_)) | Err(ServeError::DeadlineExceeded)
        ) {
            return Err(format!("unexpected answer {a:?}"));
        }
    }
    let total = m.answered() + m.rejected() + m.expired() + m.cancelled() + m.failed();
    if m.requests() != n as u64 || total != n as u64 {
        return Err(format!(
            "{n} requests: counted {} submitted, {total} accounted for",
            m.requests()
        ));
    }
    Ok(())
}

/// A batching delay: ordinary, zero, up to the maximum, or beyond it (refused at build).
fn delay() -> impl Strategy<Value = Duration> {
    prop_oneof![
        4 => (0u64..3000).prop_map(Duration::from_micros),
        1 => Just(Duration::ZERO),
        1 => Just(MAX_DELAY),
        1 => (1u64..u64::MAX).prop_map(Duration::from_secs),
        1 => Just(Duration::MAX),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    /// Random batching knobs, arrivals, deadlines, cancellations and a small queue (overload):
    /// every request is answered or accounted for exactly once, and nothing hangs. A delay
    /// beyond the maximum is refused when the engine is built.
    #[test]
    fn every_request_is_accounted_for_exactly_once(
        seed in 0u64..1000,
        max_batch in 1usize..6,
        delay in delay(),
        capacity in 1usize..12,
        n in 1usize..80,
    ) {
        let (model, ramps, profile) = shared_tiny_model();
        let built = Engine::builder(model)
            .ramps(ramps)
            .profile(profile)
            .backend(threads1())
            .batching(BatchingConfig {
                max_batch_size: max_batch,
                max_queue_delay: delay,
                queue_capacity: capacity,
                max_queue_wait: None,
            })
            .build();
        if delay > MAX_DELAY {
            let e = built.err().expect("refused");
            prop_assert!(e.to_string().contains("max_queue_delay"), "{}", e);
            return Ok(());
        }
        let engine = built.unwrap();
        run_and_account(engine, n, seed, Duration::from_secs(60)).map_err(TestCaseError::fail)?;
    }
}

/// A real number from everywhere that matters: in ranges, at their ends, beyond, not finite.
fn real() -> impl Strategy<Value = f64> {
    prop_oneof![
        4 => 0.0f64..1.0,
        1 => Just(0.0),
        1 => Just(1.0),
        1 => -10.0f64..10.0,
        1 => prop_oneof![Just(f64::NAN), Just(f64::INFINITY), Just(-f64::INFINITY), Just(1e300)],
    ]
}

/// A count: small, zero, or absurd.
fn count() -> impl Strategy<Value = usize> {
    prop_oneof![
        4 => 1usize..200,
        1 => Just(0usize),
        1 => Just(usize::MAX),
        1 => 1usize..100_000_000,
    ]
}

fn fixed() -> impl Strategy<Value = Option<Vec<(String, f32)>>> {
    let point = prop_oneof![
        Just("layer.0".to_string()),
        Just("layer.1".to_string()),
        Just("nowhere".to_string()),
        Just(String::new()),
    ];
    let threshold = prop_oneof![0.0f32..1.0, Just(f32::NAN), -2.0f32..2.0];
    prop_oneof![
        3 => Just(None),
        1 => proptest::collection::vec((point, threshold), 0..4).prop_map(Some),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    /// Validation never panics; a config it refuses is refused by the builder too, naming the
    /// knob; a config it accepts starts an engine that answers.
    #[test]
    fn config_validation_never_panics_and_accepted_configs_serve(
        budget in real(), headroom in real(), margin in real(), cost in real(), weight in real(),
        window in count(), adjust in count(), drift in count(), utility in count(),
        max_ramps in 0usize..5, min_step in real(), fixed in fixed(),
        max_batch in count(), capacity in count(),
    ) {
        let mut cfg = ApparateConfig::language();
        cfg.accuracy_budget = budget;
        cfg.tuning_headroom = headroom;
        cfg.retune_margin = margin;
        cfg.max_ramp_cost = cost;
        cfg.profile_update_weight = weight;
        cfg.window_batches = window;
        cfg.adjust_every_batches = adjust;
        cfg.drift_samples = drift;
        cfg.utility_batches = utility;
        cfg.max_ramps = max_ramps;
        cfg.tuner.min_step = min_step as f32;
        cfg.fixed = fixed;
        // Small enough batches for the start-up profile to stay quick when accepted.
        let batching = BatchingConfig {
            max_batch_size: if max_batch > 8 && max_batch < 100_000_000 { 8 } else { max_batch },
            max_queue_delay: Duration::from_micros(200),
            queue_capacity: capacity,
            max_queue_wait: None,
        };
        let valid = cfg.validate().is_ok() && batching.validate().is_ok();
        let (model, ramps, profile) = shared_tiny_model();
        let built = Engine::builder(model)
            .ramps(ramps)
            .profile(profile)
            .backend(threads1())
            .apparate(cfg.clone())
            .batching(batching)
            .build();
        match built {
            Ok(engine) => {
                prop_assert!(valid, "accepted an invalid config: {:?}", cfg);
                let a = engine.infer_blocking(Input::Text("the cat".into()));
                prop_assert!(a.is_ok(), "{:?}", a);
                engine.shutdown();
            }
            Err(e) => {
                let msg = e.to_string();
                // Refused by validation, or a `fixed` point that is not in the ramps file.
                prop_assert!(!valid || msg.contains("fixed"), "{}", msg);
                prop_assert!(msg.contains(" = ") || msg.contains("fixed"), "{}", msg);
            }
        }
    }
}
