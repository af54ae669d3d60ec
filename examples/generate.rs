//! Streaming generation from the embedding API: load a `llama` GGUF file, start the
//! continuous-batching engine, submit two chat prompts at once and print each one's text as its
//! tokens arrive.
//!
//! ```sh
//! cargo run --release --example generate [-- MODEL.gguf]
//! ```

use apparate::backend::{CpuBackend, CpuConfig};
use apparate::generation::{Engine, EngineConfig, GenerateRequest, LanguageModel, TokenEvent};
use apparate::models::llama::Sampling;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "weights/smollm2-135m-instruct.q4_1.gguf".into());
    let lm = LanguageModel::open_gguf(CpuBackend::new(CpuConfig::default())?, &path)?;
    let prompts = ["What is the capital of France?", "Name three colors."];
    let requests: Vec<GenerateRequest> = prompts
        .iter()
        .map(|p| {
            Ok(GenerateRequest {
                prompt: lm.prompt_ids(p, false, None)?, // chat template applied
                max_tokens: 48,
                sampling: Sampling::default(), // greedy
                stop: lm.stop.clone(),
            })
        })
        .collect::<apparate::Result<_>>()?;
    let tokenizer = lm.tokenizer.clone();
    // The engine owns the model; several generations share its steps.
    let engine = Engine::start(lm.model, EngineConfig::default())?;
    let streams = requests
        .into_iter()
        .map(|r| engine.submit(r))
        .collect::<Result<Vec<_>, _>>()?;
    for (prompt, stream) in prompts.iter().zip(streams) {
        let mut text = apparate::generation::TextStream::new(&tokenizer);
        print!("{prompt}\n  -> ");
        for event in stream {
            match event {
                TokenEvent::Token(t) => print!("{}", text.push(t)?),
                TokenEvent::Done(why, stats) => println!(
                    "\n  ({why:?}: {} tokens, first after {:?}, all after {:?})",
                    stats.generated, stats.time_to_first_token, stats.total
                ),
                TokenEvent::Failed(e) => println!("\n  failed: {e}"),
            }
        }
    }
    Ok(())
}
