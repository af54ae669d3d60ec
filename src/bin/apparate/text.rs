//! `apparate embed` and `apparate classify`: texts through a text model, or image files through
//! a CNN, printed as they are answered.

use std::io::BufRead;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use apparate::backend::Backend;
use apparate::format::{Family, ModelFile};
use apparate::pipeline::TextModel;
use apparate::select::{BackendJob, with_backend};
use apparate::{Error, Result};
use clap::Args;

use super::{DeviceArgs, emit, ms};

#[derive(Args)]
pub struct RunArgs {
    /// Model file.
    #[arg(short, long)]
    model: PathBuf,
    /// Texts (image files for an image model); `-` reads one per line from standard input.
    texts: Vec<String>,
    /// Read one text (or image path) per line from a file.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Inputs per forward pass.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(Args)]
pub struct EmbedArgs {
    #[command(flatten)]
    run: RunArgs,
    /// Print the full vectors as JSON lines (default: first 8 values).
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ClassifyArgs {
    #[command(flatten)]
    run: RunArgs,
    /// How many labels to print per input (1 or more; at most the model's classes are shown).
    #[arg(long, default_value_t = 3)]
    top: usize,
}

pub fn embed(a: EmbedArgs) -> Result<()> {
    let texts = gather_texts(&a.run)?;
    with_model(
        &a.run,
        EmbedJob {
            texts,
            batch_size: a.run.batch_size,
            json: a.json,
        },
    )
}

pub fn classify(a: ClassifyArgs) -> Result<()> {
    let run = a.run;
    if a.top == 0 {
        return Err(Error::config("--top", 0, "1 or more labels per input"));
    }
    let texts = gather_texts(&run)?;
    let file = ModelFile::open(&run.model)?;
    if let Family::Cnn(_) = &file.meta().family {
        return with_backend(
            &run.device.choice()?,
            ImageJob {
                model: run.model.clone(),
                images: texts,
                batch_size: run.batch_size,
                top: a.top,
                file,
            },
        );
    }
    let job = ClassifyJob {
        texts,
        batch_size: run.batch_size,
        top: a.top,
        model: run.model.clone(),
    };
    with_model(&run, job)
}

fn gather_texts(run: &RunArgs) -> Result<Vec<String>> {
    super::check_count("--batch-size", run.batch_size, 1, super::MAX_BATCH)?;
    let mut texts = Vec::new();
    if let Some(f) = &run.file {
        let content = std::fs::read_to_string(f).map_err(|e| Error::Io {
            path: f.clone(),
            source: e,
        })?;
        texts.extend(
            content
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(String::from),
        );
    }
    for t in &run.texts {
        if t == "-" {
            for line in std::io::stdin().lock().lines() {
                let line = line.map_err(|e| Error::Io {
                    path: "<stdin>".into(),
                    source: e,
                })?;
                if !line.trim().is_empty() {
                    texts.push(line);
                }
            }
        } else {
            texts.push(t.clone());
        }
    }
    if texts.is_empty() {
        return Err(Error::Input(
            "no texts: pass them as arguments, with --file, or `-` for standard input".into(),
        ));
    }
    Ok(texts)
}

/// Runs `job` with the model loaded on the backend `run` asks for.
fn with_model<J: Job>(run: &RunArgs, job: J) -> Result<()> {
    with_backend(&run.device.choice()?, TextJob(job, run.model.clone()))
}

/// Loads the text model on the backend, then runs the job on it.
struct TextJob<J>(J, PathBuf);

impl<J: Job> BackendJob for TextJob<J> {
    type Output = ();
    fn run<B: Backend + 'static>(self, be: B, what: String) -> Result<()> {
        let model = TextModel::load(be, &self.1)?;
        eprintln!(
            "loaded {} in {} ({what})",
            self.1.display(),
            ms(model.load_time)
        );
        self.0.run(&model)
    }
}

/// Work to do with a loaded model, whatever its backend.
trait Job {
    fn run<B: Backend>(self, model: &TextModel<B>) -> Result<()>;
}

/// Runs `texts` in batches, calling `each(model, batch_texts, output)`; prints timings.
fn run_batches<B: Backend>(
    model: &TextModel<B>,
    texts: &[String],
    batch_size: usize,
    mut each: impl FnMut(&[String], &apparate::models::bert::EncoderOutput) -> String,
) -> Result<()> {
    let (mut tok, mut fwd) = (Duration::ZERO, Duration::ZERO);
    let t0 = Instant::now();
    for chunk in texts.chunks(batch_size) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let (out, t) = model.run(&refs)?;
        tok += t.tokenize;
        fwd += t.forward;
        emit(&each(chunk, &out))?;
    }
    let total = t0.elapsed();
    eprintln!(
        "{} texts in {} (tokenize {}, forward {}; {:.1} texts/s)",
        texts.len(),
        ms(total),
        ms(tok),
        ms(fwd),
        texts.len() as f64 / total.as_secs_f64()
    );
    Ok(())
}

/// Classifies image files with a CNN model.
struct ImageJob {
    model: PathBuf,
    images: Vec<String>,
    batch_size: usize,
    top: usize,
    file: ModelFile,
}

impl BackendJob for ImageJob {
    type Output = ();
    fn run<B: Backend + 'static>(self, be: B, what: String) -> Result<()> {
        let t0 = Instant::now();
        let cnn = apparate::models::cnn::Cnn::load(be, &self.file)?;
        eprintln!(
            "loaded {} in {} ({what})",
            self.model.display(),
            ms(t0.elapsed())
        );
        let input = cnn.config().input.clone();
        let labels = cnn.labels().to_vec();
        let (mut decode, mut fwd) = (Duration::ZERO, Duration::ZERO);
        let t_all = Instant::now();
        for chunk in self.images.chunks(self.batch_size) {
            let t = Instant::now();
            let mut batch = Vec::new();
            for path in chunk {
                batch.extend(apparate::vision::load_image(
                    std::path::Path::new(path),
                    &input,
                )?);
            }
            decode += t.elapsed();
            let t = Instant::now();
            let out = cnn.forward(&batch, chunk.len())?;
            fwd += t.elapsed();
            let mut s = String::new();
            for (i, path) in chunk.iter().enumerate() {
                let preds: Vec<String> = out
                    .top_k(i, self.top)
                    .into_iter()
                    .map(|(c, p)| format!("{} {p:.3}", labels.get(c).map_or("?", String::as_str)))
                    .collect();
                outln!(s, "{:<40} {path}", preds.join(", "));
            }
            emit(&s)?;
        }
        eprintln!(
            "{} images in {} (decode+resize {}, forward {})",
            self.images.len(),
            ms(t_all.elapsed()),
            ms(decode),
            ms(fwd)
        );
        Ok(())
    }
}

struct EmbedJob {
    texts: Vec<String>,
    batch_size: usize,
    json: bool,
}

impl Job for EmbedJob {
    fn run<B: Backend>(self, model: &TextModel<B>) -> Result<()> {
        let json = self.json;
        run_batches(model, &self.texts, self.batch_size, |chunk, out| {
            let mut s = String::new();
            for (i, text) in chunk.iter().enumerate() {
                let e = out.embedding(i);
                if json {
                    outln!(s, "{}", serde_json::json!({ "text": text, "embedding": e }));
                } else {
                    let head: Vec<String> = e.iter().take(8).map(|v| format!("{v:+.4}")).collect();
                    outln!(s, "[{} ...] ({} dims)  {text}", head.join(" "), e.len());
                }
            }
            s
        })
    }
}

struct ClassifyJob {
    texts: Vec<String>,
    batch_size: usize,
    top: usize,
    model: PathBuf,
}

impl Job for ClassifyJob {
    fn run<B: Backend>(self, model: &TextModel<B>) -> Result<()> {
        if !model.encoder.has_head() {
            return Err(Error::Input(format!(
                "{} has no classifier head (convert it with --head, or use `embed`)",
                self.model.display()
            )));
        }
        let labels = model.encoder.labels().to_vec();
        let top = self.top;
        run_batches(model, &self.texts, self.batch_size, |chunk, out| {
            let mut s = String::new();
            for (i, text) in chunk.iter().enumerate() {
                let preds: Vec<String> = out
                    .top_k(i, top)
                    .into_iter()
                    .map(|(c, p)| format!("{} {:.3}", labels[c], p))
                    .collect();
                outln!(s, "{:<28} {text}", preds.join(", "));
            }
            s
        })
    }
}
