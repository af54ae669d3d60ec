//! The adaptation loops on recorded ramp outputs of the real vision workload: the MNIST ResNet's
//! ramps over its augmented digit stream, then a drift to harder inputs. The controller must
//! bring the agreement of the released answers back within the constraint within a bounded
//! number of batches, and keep the stream within it overall.

mod common;

use std::collections::VecDeque;

use apparate::adapt::tuner::Samples;
use apparate::adapt::{ActiveConfig, ApparateConfig, BatchRecord, Controller};
use apparate::backbone::Backbone;
use apparate::dataset::{Prefix, load_stream};
use apparate::format::{ModelFile, RampsFile};
use apparate::profile::{ProfileConfig, measure};
use apparate::ramps::bootstrap::{BootstrapConfig, train_ramps};
use apparate::ramps::{Ramps, record_outputs};
use common::{TempDir, cpu, weights_file, workload_file};

/// What the executor would record for `rows` (all candidate ramps) under `cfg`.
fn record(cfg: &ActiveConfig, rows: &[Vec<(f32, bool)>]) -> BatchRecord {
    let active = rows
        .iter()
        .map(|row| cfg.ramps.iter().map(|&r| row[r]).collect())
        .collect();
    BatchRecord::replay(cfg, active)
}

/// The drift scenario on one workload: ramps trained on the first `boot` inputs, then `easy`
/// batches of the stream as it comes, then the inputs the `mid` ramp is unsure or wrong about.
struct Case {
    model: &'static str,
    stream: &'static str,
    boot: usize,
    live: usize,
    easy: usize,
    mid: &'static str,
    cfg: ApparateConfig,
    batch: usize,
    /// Bounds asserted (batches to recover, worst window after recovery, overall agreement).
    recover_within: usize,
    worst_after: f64,
    overall: f64,
}

fn drift(case: Case) {
    let file = ModelFile::open(weights_file(case.model)).unwrap();
    let backbone = Backbone::load(cpu(), &file).unwrap();
    let stream = load_stream(
        &workload_file(case.stream),
        backbone.image_input(),
        Prefix::Count(case.boot + case.live),
        &mut |_, _| {},
    )
    .unwrap();
    let dir = TempDir::new("adapt-replay");
    let ramps_path = dir.path("m.ramps");
    let boot = stream.slice(0..case.boot);
    train_ramps(
        &backbone,
        &file,
        &boot,
        &ramps_path,
        &BootstrapConfig::default(),
        &mut |_, _, _| {},
    )
    .unwrap();
    let rf = RampsFile::open(&ramps_path, &file).unwrap();
    let ramps = Ramps::load(&backbone, &rf).unwrap();
    // A measured profile's layout with fixed costs, so that the test is deterministic: every
    // block 1 ms, every ramp 0.02 ms (the measured ratios on the CPU are of that order).
    let mut profile = measure(
        &backbone,
        file.sha256(),
        Some((&ramps, String::new())),
        &boot.slice(0..1),
        &ProfileConfig {
            max_batch: 1,
            warmup: 0,
            repeats: 1,
        },
        &mut |_, _, _| {},
    )
    .unwrap();
    for b in &mut profile.batches {
        b.stages.iter_mut().for_each(|t| t.median_ms = 1.0);
        b.ramps.iter_mut().for_each(|t| t.median_ms = 0.02);
        b.vanilla.median_ms = b.stages.len() as f64;
    }
    let points: Vec<String> = ramps.iter().map(|r| r.point.clone()).collect();
    let boot_rows = record_outputs(&backbone, &ramps, &boot, 64).unwrap();
    let live = record_outputs(
        &backbone,
        &ramps,
        &stream.slice(case.boot..case.boot + case.live),
        64,
    )
    .unwrap();

    // Easy phase: the stream as it comes. Hard phase: the inputs on which the middle ramp
    // (layer2.0) is unsure or wrong, i.e. those whose answer is settled late.
    let mid = points.iter().position(|p| p == case.mid).unwrap();
    let (easy, hard): (Vec<_>, Vec<_>) = live
        .iter()
        .cloned()
        .partition(|r| r[mid].0 < 0.2 && r[mid].1);
    assert!(hard.len() > 40 * case.batch, "{} hard inputs", hard.len());
    assert!(easy.len() >= case.easy, "{} easy inputs", easy.len());

    let cfg = case.cfg.clone();
    let samples = Samples::from_rows(points.len(), &boot_rows);
    let mut c = Controller::new(cfg.clone(), points, profile, Some(&samples));
    let batch = case.batch;
    let mut recent: VecDeque<bool> = VecDeque::new();
    let mut agreement_after = Vec::new();
    let mut total_agree = 0usize;
    let mut total = 0usize;
    let phases = [(&easy[..case.easy], "easy"), (&hard[..], "hard")];
    let mut drift_batch = 0;
    let mut batches = 0;
    for (rows, name) in phases {
        if name == "hard" {
            drift_batch = batches;
        }
        for chunk in rows.chunks(batch) {
            let rec = record(c.active(), chunk);
            for &a in &rec.agreed {
                recent.push_back(a);
                total_agree += usize::from(a);
                total += 1;
                if recent.len() > 256 {
                    recent.pop_front();
                }
            }
            c.on_batch(rec);
            batches += 1;
            if name == "hard" {
                let acc = recent.iter().filter(|a| **a).count() as f64 / recent.len() as f64;
                agreement_after.push(acc);
            }
        }
    }
    let events = c.drain_events();
    let kinds: Vec<&str> = events.iter().map(|e| e.kind).collect();
    // The drift is seen and acted on.
    assert!(
        events.iter().any(|e| e.batch > drift_batch as u64
            && matches!(e.kind, "drift" | "violation" | "disable" | "retune")),
        "{kinds:?}"
    );
    // Within 80 batches (640 inputs) of the drift the last 256 released answers are back within
    // the 1% budget, and stay within 2.5% from then on (ramp moves cost a little on the way).
    // Recovery: from the drift to the first batch after the dip with the last 256 answers
    // back within the budget.
    let dip = (0..agreement_after.len())
        .min_by(|&a, &b| agreement_after[a].total_cmp(&agreement_after[b]))
        .unwrap();
    let back = (dip..agreement_after.len())
        .find(|&i| agreement_after[i] >= 0.99)
        .expect("agreement never recovered");
    assert!(
        back <= case.recover_within,
        "recovered only after {back} batches: {agreement_after:?}"
    );
    let worst_after = agreement_after[back..].iter().cloned().fold(1.0, f64::min);
    assert!(
        worst_after >= case.worst_after,
        "dropped to {worst_after} after recovering: {agreement_after:?} {kinds:?}"
    );
    let overall = total_agree as f64 / total as f64;
    assert!(
        overall >= case.overall,
        "overall agreement {overall} ({kinds:?})"
    );
    eprintln!(
        "{}: drift at batch {drift_batch}: back within budget after {back} batches; worst after {worst_after:.4}; overall {overall:.4}; {} events",
        case.model,
        events.len()
    );
}

#[test]
fn vision_after_a_drift_to_harder_inputs_agreement_recovers_within_bounded_batches() {
    drift(Case {
        model: "mnist-resnet.apparate",
        stream: "mnist-stream.safetensors",
        boot: 2000,
        live: 6000,
        easy: 2400,
        mid: "layer2.0",
        cfg: ApparateConfig::vision(),
        batch: 8,
        recover_within: 80,
        worst_after: 0.975,
        overall: 0.99,
    });
}

#[test]
fn language_after_a_drift_to_harder_inputs_agreement_recovers_within_bounded_batches() {
    drift(Case {
        model: "minilm-l6-sentiment.apparate",
        stream: "tweets.txt",
        boot: 600,
        live: 1600,
        easy: 400,
        mid: "layer.2",
        // Ramp checks every 30 batches instead of 100: the recorded stream is short.
        cfg: ApparateConfig {
            adjust_every_batches: 30,
            ..ApparateConfig::language()
        },
        batch: 4,
        recover_within: 120,
        worst_after: 0.97,
        overall: 0.985,
    });
}
