//! The README's embedding example: the serving engine from a model, its ramps and profile.
//! Needs `weights/fetch.sh` and `tools/train-ramps.sh`. `cargo run --release --example engine`

use apparate::adapt::ApparateConfig;
use apparate::serve::{BackendChoice, BatchingConfig, Engine, Exit, Input};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let engine = Engine::builder("weights/minilm-l6-sentiment.apparate")
        .ramps("weights/minilm-l6-sentiment.ramps")
        .profile("weights/minilm-l6-sentiment.profile.json") // from `apparate profile`
        .backend(BackendChoice::Cpu { threads: None })
        .batching(BatchingConfig::default()) // 16 per batch, 5 ms, 1024 queued
        .apparate(ApparateConfig::language()) // 1% budget, at most 2 ramps, ...
        .build()?;
    let r = engine.infer_blocking(Input::Text("what a lovely day".into()))?;
    let at = match &r.exit {
        Exit::Ramp { point, .. } => point.as_str(),
        Exit::Final => "final",
    };
    println!(
        "{} ({:.2}) released at {at} after {:?}",
        r.label, r.confidence, r.timings.total
    );
    // In async code: `let r = engine.infer(input).await?;` (dropping the future cancels).
    print!("{}", engine.metrics().render_prometheus());
    engine.shutdown(); // serves what is queued, then stops
    Ok(())
}
