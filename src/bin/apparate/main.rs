//! `apparate`: the command-line front end. One module per subcommand: [`convert_cmd`],
//! [`inspect`], [`devices`], [`generate`], [`text`] (embed, classify), [`ramps_cmd`] (train-ramps, profile),
//! [`train_head`], [`replay`] (serve-replay). Every flag is checked before anything is loaded; ranges of the
//! serving and adaptation knobs are the config structs' own `validate`, so the library API and
//! the command line refuse the same values.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use apparate::select::BackendChoice;
use apparate::tensor::DType;
use apparate::{Error, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

/// `writeln!` into a String (cannot fail).
macro_rules! outln {
    ($s:expr, $($t:tt)*) => {{
        use std::fmt::Write as _;
        let _ = writeln!($s, $($t)*);
    }};
}

mod convert_cmd;
mod devices;
mod generate;
mod inspect;
mod progress;
mod ramps_cmd;
mod replay;
mod serve_cmd;
mod text;
mod train_head;

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
    /// (model.safetensors, config.json, tokenizer.json), with --arch a torchvision ResNet/VGG
    /// or EfficientNet-Lite0 safetensors file, or a `llama` GGUF file (blocks kept as they are).
    Convert(convert_cmd::ConvertArgs),
    /// Show a model file's metadata, stages, ramp points and tensors (or a GGUF file's
    /// metadata and tensor table).
    Inspect(inspect::InspectArgs),
    /// Show which backends can run here (cpu, the emulated GPU, a real GPU) and why not; with
    /// --compile, also build every CUDA kernel for the GPU now, into the on-disk cache.
    Devices(devices::DevicesArgs),
    /// Generate text with a decoder model (a `llama` GGUF file), streamed to standard output;
    /// the chat template is applied unless --raw; prefill and decode speed go to standard error.
    Generate(generate::GenerateArgs),
    /// Print sentence embeddings of texts.
    Embed(text::EmbedArgs),
    /// Classify texts (or image files, with an image model) with a model that has a head.
    Classify(text::ClassifyArgs),
    /// Train a ramp (exit head) at every ramp-eligible point on the first part of a stream,
    /// with the model's own answers as labels; write the ramps file and report each ramp's
    /// held-out agreement with the model and its exit curve.
    TrainRamps(ramps_cmd::TrainRampsArgs),
    /// Train a classifier head on a frozen backbone from labelled data (texts + labels, or
    /// image folders): run the backbone once over the inputs, fit softmax regression on the
    /// features its classifier reads, and write the model with that head plus a held-out
    /// accuracy report.
    TrainHead(train_head::TrainHeadArgs),
    /// Feed a stored stream through the serving engine in real time (open-loop arrivals) and show
    /// what it does: throughput, latency percentiles, exits, agreement, ramp changes.
    ServeReplay(replay::ServeReplayArgs),
    /// Serve a model over HTTP with the Open Inference Protocol (KServe v2 REST): health,
    /// metadata, infer (text as BYTES, images as UINT8), the classification extension,
    /// Prometheus /metrics; 413 for oversize bodies, 429 when the queue is full, graceful
    /// shutdown on SIGTERM.
    Serve(serve_cmd::ServeArgs),
    /// Measure the time of every stage and every ramp per batch size (1, 2, 4, ..., max) on
    /// this device, and write the profile the runtime loads.
    Profile(ramps_cmd::ProfileArgs),
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

/// Where a command runs.
#[derive(Args)]
struct DeviceArgs {
    /// CPU worker threads of the cpu and emu backends (default: all cores, or APPARATE_THREADS;
    /// at most 64 per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Where the model runs.
    #[arg(long, default_value = "cpu")]
    backend: BackendArg,
    /// Storage dtype of weights and activations on emu/cuda (compute is f32 everywhere).
    #[arg(long, default_value = "f32")]
    dtype: DType,
}

impl DeviceArgs {
    /// The backend these flags ask for (built, and its thread count checked, by
    /// [`apparate::select::with_backend`]). `--threads` with `--backend cuda` is refused: the
    /// GPU backend has no CPU worker threads, and a flag that silently does nothing misleads.
    fn choice(&self) -> Result<BackendChoice> {
        if let (BackendArg::Cuda, Some(t)) = (self.backend, self.threads) {
            return Err(Error::Config {
                knob: "--threads".into(),
                value: t.to_string(),
                range: "the cpu and emu backends (cuda has no worker threads)".into(),
            });
        }
        Ok(match self.backend {
            BackendArg::Cpu => BackendChoice::Cpu {
                threads: self.threads,
            },
            BackendArg::Emu => BackendChoice::Emu {
                threads: self.threads,
                dtype: self.dtype,
            },
            BackendArg::Cuda => BackendChoice::Cuda { dtype: self.dtype },
        })
    }
}

/// Most inputs per batch a flag may ask for (the serving engine's own bound).
const MAX_BATCH: usize = apparate::serve::config::MAX_BATCH_SIZE;

/// `lo <= v <= hi`, or an error naming the flag and the range.
use apparate::adapt::config::check_count;

/// A fraction of a stream: in (0, 1].
fn check_fraction(flag: &str, v: f64) -> Result<()> {
    use std::ops::Bound::{Excluded, Included};
    apparate::adapt::config::check_real(flag, v, Excluded(0.0), Included(1.0))
}

/// Creates (truncates) an output file now, so an unwritable path fails before a long run
/// rather than after it; [`write_output`] fills it at the end.
fn create_output(path: &Path) -> Result<(PathBuf, std::fs::File)> {
    let file = std::fs::File::create(path).map_err(|e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    Ok((path.to_path_buf(), file))
}

fn write_output(path: &Path, mut file: std::fs::File, text: &str) -> Result<()> {
    use std::io::Write as _;
    file.write_all(text.as_bytes())
        .and_then(|()| file.flush())
        .map_err(|e| Error::Io {
            path: path.to_path_buf(),
            source: e,
        })
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

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn real_main(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Convert(a) => convert_cmd::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Devices(a) => devices::devices(&a),
        Command::Generate(a) => generate::run(a),
        Command::Embed(a) => text::embed(a),
        Command::Classify(a) => text::classify(a),
        Command::TrainRamps(a) => ramps_cmd::train_ramps_cmd(a),
        Command::TrainHead(a) => train_head::train_head_cmd(a),
        Command::ServeReplay(a) => replay::serve_replay_cmd(a),
        Command::Serve(a) => serve_cmd::run(a),
        Command::Profile(a) => ramps_cmd::profile_cmd(a),
    }
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
