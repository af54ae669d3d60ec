//! Runs MiniLM-sentiment stage by stage with its ramps and says which inputs could leave early.
//! Needs `weights/fetch.sh` and `tools/train-ramps.sh` to have run.
//! `cargo run --release --example early_exit -- "what a lovely day" "my flight got cancelled"`

use apparate::backbone::Backbone;
use apparate::backend::{Backend, CpuBackend, CpuConfig};
use apparate::format::{ModelFile, RampsFile};
use apparate::ramps::Ramps;

fn main() -> apparate::Result<()> {
    let texts: Vec<String> = std::env::args().skip(1).collect();
    let texts: Vec<&str> = if texts.is_empty() {
        vec!["what a lovely day", "my flight got cancelled again"]
    } else {
        texts.iter().map(String::as_str).collect()
    };
    let file = ModelFile::open("weights/minilm-l6-sentiment.apparate")?;
    let model = Backbone::load(CpuBackend::new(CpuConfig::default())?, &file)?;
    let ramps_file = RampsFile::open("weights/minilm-l6-sentiment.ramps", &file)?;
    let ramps = Ramps::load(&model, &ramps_file)?;
    // Exit where the ramp's uncertainty u = 1 - max p is below 0.05.
    let threshold = model.backend().upload(&[0.05], &[1])?;

    let batch = model.prepare_texts(&texts)?;
    let mut x = None;
    for stage in 0..model.num_stages() {
        let out = model.run_stage(stage, &batch, x)?;
        if let Some(r) = ramps.at_stage(stage) {
            let point = &ramps.iter().nth(r).expect("ramp index").point;
            let decisions = ramps.check(&model, r, &out, &threshold)?;
            for (text, d) in texts.iter().zip(&decisions) {
                if d.exit {
                    let label = &model.labels()[d.class as usize];
                    println!("{point}: {label} (u = {:.3})  {text}", d.uncertainty);
                }
            }
        }
        x = Some(out);
    }
    let answers = model.predictions(x.as_ref().expect("the model has stages"))?;
    for (text, a) in texts.iter().zip(answers) {
        println!("final: {}  {text}", model.labels()[a as usize]);
    }
    Ok(())
}
