//! The serving runtime: an [`Engine`] batches requests, runs each batch stage by stage, releases
//! the answers of inputs that exit at a ramp while the batch runs on, and adapts thresholds and
//! ramps on a separate thread (Apparate sections 2-5).
//!
//! Threads: the caller's (submits, awaits); the *executor* (forms batches from the queue, runs
//! them, completes requests); the *adapter* (feeds [`crate::adapt::Controller`] the records of
//! finished batches and publishes new configurations, which the executor picks up between
//! batches). Nothing on the request path waits for the adapter.

mod completion;
mod executor;
mod queue;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use completion::ResponseFuture;

use crate::adapt::{ActiveConfig, AdaptEvent, ApparateConfig, Controller};
use crate::backbone::Backbone;
use crate::backend::cuda::{CudaConfig, CudaDevice};
use crate::backend::emu::{EmuConfig, EmuDevice};
use crate::backend::gpu::GpuBackend;
use crate::backend::{Backend, CpuBackend, CpuConfig};
use crate::dataset::Inputs;
use crate::error::{Error, Result};
use crate::format::{ModelFile, RampsFile};
use crate::metrics::Metrics;
use crate::profile::{Profile, ProfileConfig};
use crate::ramps::Ramps;
use crate::tensor::DType;
use queue::{Pending, Queue};

/// Batching settings.
#[derive(Clone, Debug)]
pub struct BatchingConfig {
    /// Most requests per batch. Default 16.
    pub max_batch_size: usize,
    /// Longest an under-full batch waits for more requests, from its oldest request's arrival.
    /// Default 5 ms.
    pub max_queue_delay: Duration,
    /// Most requests waiting; more are rejected with [`ServeError::Overloaded`]. Default 1024.
    pub queue_capacity: usize,
}

impl Default for BatchingConfig {
    fn default() -> Self {
        BatchingConfig {
            max_batch_size: 16,
            max_queue_delay: Duration::from_millis(5),
            queue_capacity: 1024,
        }
    }
}

/// Where the model runs.
#[derive(Clone, Debug)]
pub enum BackendChoice {
    /// The CPU backend with this many threads (`None`: all cores or `APPARATE_THREADS`).
    Cpu { threads: Option<usize> },
    /// The CUDA kernels on the emulated device (slow; for testing).
    Emu {
        threads: Option<usize>,
        dtype: DType,
    },
    /// A real NVIDIA GPU.
    Cuda { dtype: DType },
}

impl Default for BackendChoice {
    fn default() -> Self {
        BackendChoice::Cpu { threads: None }
    }
}

/// One request's input.
#[derive(Clone, Debug)]
pub enum Input {
    /// A text (text models).
    Text(String),
    /// Raw 8-bit pixels, HWC at the model's input size (image models); normalised by the engine.
    Pixels(Vec<u8>),
    /// Already normalised HWC values (image models), as [`crate::dataset`] reads them.
    Normalized(Vec<f32>),
}

/// Where an answer came from.
#[derive(Clone, Debug, PartialEq)]
pub enum Exit {
    /// A ramp: its index in the ramps file (stage order) and its point.
    Ramp { index: usize, point: String },
    /// The model's last stage.
    Final,
}

/// Time spent by one request.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Timings {
    /// Submission to the start of its batch.
    pub queued: Duration,
    /// Start of its batch to its release (shorter for early exits).
    pub computed: Duration,
    /// Submission to release.
    pub total: Duration,
}

/// The answer to one request.
#[derive(Clone, Debug, PartialEq)]
pub struct Response {
    pub class: usize,
    pub label: String,
    /// The answering head's probability of `class` (`1 - u` for a ramp).
    pub confidence: f32,
    pub exit: Exit,
    pub timings: Timings,
    /// When the answer was released (for latency from a scheduled send time).
    pub released_at: Instant,
}

/// Why a request got no answer.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ServeError {
    #[error("overloaded: {0}")]
    Overloaded(String),
    #[error("the deadline passed while the request was queued")]
    DeadlineExceeded,
    #[error("cancelled")]
    Cancelled,
    #[error("bad input: {0}")]
    BadInput(String),
    #[error("the backend failed on this request's batch: {0}")]
    Backend(String),
    #[error("shut down: {0}")]
    ShutDown(String),
}

/// Options of one request.
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestOptions {
    /// Answer `DeadlineExceeded` (never compute) if still queued at this instant.
    pub deadline: Option<Instant>,
}

/// What kind of input the model takes.
#[derive(Clone, Debug)]
enum InputKind {
    Text,
    Image {
        values: usize,
        mean: Vec<f32>,
        std: Vec<f32>,
    },
}

/// A running engine. Cloneable handles are not needed: share it behind an `Arc`.
pub struct Engine {
    queue: Arc<Queue>,
    metrics: Arc<Metrics>,
    events: Arc<Mutex<Vec<AdaptEvent>>>,
    kind: InputKind,
    labels: Vec<String>,
    points: Vec<String>,
    device: String,
    threads: Vec<JoinHandle<()>>,
}

/// Where start-up progress lines go.
type LogFn = Box<dyn Fn(&str) + Send>;

/// Builds an [`Engine`]: `Engine::builder(model).ramps(path).build()`.
pub struct EngineBuilder {
    model: PathBuf,
    ramps: Option<PathBuf>,
    backend: BackendChoice,
    batching: BatchingConfig,
    apparate: Option<ApparateConfig>,
    profile: Option<PathBuf>,
    bootstrap: Option<Inputs>,
    log: Option<LogFn>,
}

impl EngineBuilder {
    /// The ramps file (without one the engine serves the plain model).
    pub fn ramps(mut self, path: impl AsRef<Path>) -> Self {
        self.ramps = Some(path.as_ref().to_path_buf());
        self
    }
    pub fn backend(mut self, b: BackendChoice) -> Self {
        self.backend = b;
        self
    }
    pub fn batching(mut self, c: BatchingConfig) -> Self {
        self.batching = c;
        self
    }
    /// Adaptation settings (default: [`ApparateConfig::for_family`]).
    pub fn apparate(mut self, c: ApparateConfig) -> Self {
        self.apparate = Some(c);
        self
    }
    /// A profile from `apparate profile` on this device (default: a short one is measured at
    /// start-up).
    pub fn profile(mut self, path: impl AsRef<Path>) -> Self {
        self.profile = Some(path.as_ref().to_path_buf());
        self
    }
    /// Bootstrap inputs for the initial ramp placement (default: none; ramps start spread out).
    pub fn bootstrap(mut self, inputs: Inputs) -> Self {
        self.bootstrap = Some(inputs);
        self
    }
    /// Where start-up progress lines go (default: nowhere).
    pub fn log(mut self, f: impl Fn(&str) + Send + 'static) -> Self {
        self.log = Some(Box::new(f));
        self
    }

    /// Like [`EngineBuilder::build`] on a backend you made (a shared device, a custom or
    /// instrumented backend); the `backend` choice is ignored.
    pub fn build_on<B: Backend + 'static>(self, backend: B) -> Result<Engine> {
        start(backend, self)
    }

    /// Loads everything, places the first ramps and starts the threads.
    pub fn build(self) -> Result<Engine> {
        match self.backend.clone() {
            BackendChoice::Cpu { threads } => {
                let be = CpuBackend::new(CpuConfig { threads })?;
                start(be, self)
            }
            BackendChoice::Emu { threads, dtype } => {
                let dev = EmuDevice::new(EmuConfig {
                    threads,
                    ..EmuConfig::default()
                })?;
                start(GpuBackend::new(dev, dtype), self)
            }
            BackendChoice::Cuda { dtype } => {
                let dev = CudaDevice::new(CudaConfig::default())?;
                start(GpuBackend::new(dev, dtype), self)
            }
        }
    }
}

fn start<B: Backend + 'static>(be: B, b: EngineBuilder) -> Result<Engine> {
    let log = |s: &str| {
        if let Some(f) = &b.log {
            f(s)
        }
    };
    if b.batching.max_batch_size == 0 || b.batching.queue_capacity == 0 {
        return Err(Error::Input(
            "max_batch_size and queue_capacity must be at least 1".into(),
        ));
    }
    let file = ModelFile::open(&b.model)?;
    let backbone = Backbone::load(be, &file)?;
    let mut cfg = b
        .apparate
        .clone()
        .unwrap_or_else(|| ApparateConfig::for_family(&file.meta().family));
    let ramps = match &b.ramps {
        Some(p) => {
            if !backbone.has_classifier() {
                return Err(Error::Input(format!(
                    "{} has no classifier head: ramps need one",
                    b.model.display()
                )));
            }
            let rf = RampsFile::open(p, &file)?;
            let bytes = std::fs::read(p).map_err(|e| Error::io(p, e))?;
            Some((
                Ramps::load(&backbone, &rf)?,
                crate::format::sha256_hex(&bytes),
            ))
        }
        None => {
            cfg.enabled = false;
            None
        }
    };
    let points: Vec<String> = ramps
        .as_ref()
        .map(|(r, _)| r.iter().map(|x| x.point.clone()).collect())
        .unwrap_or_default();
    if let Some(fixed) = &cfg.fixed {
        for (p, t) in fixed {
            if !points.contains(p) {
                return Err(Error::Input(format!(
                    "fixed ramp `{p}` is not in the ramps file (it has: {})",
                    points.join(", ")
                )));
            }
            if !(0.0..=1.0).contains(t) {
                return Err(Error::Input(format!(
                    "fixed threshold {t} of `{p}` is outside [0, 1]"
                )));
            }
        }
    }
    let device = backbone.backend().device_id();
    let profile = match &b.profile {
        Some(p) => Profile::load(p, &device, file.sha256())?,
        None => {
            let t0 = Instant::now();
            let inputs = b
                .bootstrap
                .clone()
                .unwrap_or_else(|| backbone.synthetic_inputs(32));
            let pc = ProfileConfig {
                max_batch: b.batching.max_batch_size,
                warmup: 1,
                repeats: 3,
            };
            let p = crate::profile::measure(
                &backbone,
                file.sha256(),
                ramps.as_ref().map(|(r, sha)| (r, sha.clone())),
                &inputs,
                &pc,
                &mut |_, _, _| {},
            )?;
            log(&format!(
                "measured a start-up profile (batch 1..{}) in {:.1} s",
                pc.max_batch,
                t0.elapsed().as_secs_f64()
            ));
            p
        }
    };
    if let Some((r, _)) = &ramps
        && profile.batches.iter().any(|bp| bp.ramps.len() != r.len())
    {
        return Err(Error::Input(
            "the profile has no timings for these ramps: run `apparate profile --ramps` with \
             the same ramps file"
                .into(),
        ));
    }
    let bootstrap_samples = match (&ramps, &b.bootstrap, cfg.enabled) {
        (Some((r, _)), Some(inputs), true) => {
            let t0 = Instant::now();
            let rows =
                crate::ramps::record_outputs(&backbone, r, inputs, b.batching.max_batch_size)?;
            let s = crate::adapt::tuner::Samples::from_rows(r.len(), &rows);
            log(&format!(
                "ran {} bootstrap inputs through all {} ramps in {:.1} s",
                inputs.len(),
                r.len(),
                t0.elapsed().as_secs_f64()
            ));
            Some(s)
        }
        _ => None,
    };
    let mut controller = Controller::new(
        cfg.clone(),
        points.clone(),
        profile,
        bootstrap_samples.as_ref(),
    );
    let metrics = Arc::new(Metrics::new());
    let events = Arc::new(Mutex::new(controller.drain_events()));
    let active = Arc::new(Mutex::new(Arc::new(controller.active().clone())));
    publish(&metrics, &points, controller.active());
    let queue = Arc::new(Queue::new(b.batching.clone(), metrics.clone()));
    let kind = match backbone.image_input() {
        None => InputKind::Text,
        Some(i) => InputKind::Image {
            values: i.height * i.width * i.channels,
            mean: i.mean.clone(),
            std: i.std.clone(),
        },
    };
    let labels = backbone.labels().to_vec();
    let (tx, rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel();
    let synchronous = backbone.backend().name() == "cpu";
    let releaser = executor::Releaser {
        metrics: metrics.clone(),
        records: tx,
        labels: labels.clone(),
        points: points.clone(),
        oracle: cfg.oracle,
    };
    let exec = executor::Executor {
        backbone,
        ramps: ramps.map(|(r, _)| r),
        active: active.clone(),
        queue: queue.clone(),
        metrics: metrics.clone(),
        release: release_tx,
        timed_stages: synchronous,
    };
    let mut threads = Vec::new();
    threads.push(
        std::thread::Builder::new()
            .name("apparate-executor".into())
            .spawn(move || exec.run())
            .map_err(|e| Error::Input(format!("cannot start the executor thread: {e}")))?,
    );
    threads.push(
        std::thread::Builder::new()
            .name("apparate-releaser".into())
            .spawn(move || releaser.run(release_rx))
            .map_err(|e| Error::Input(format!("cannot start the releaser thread: {e}")))?,
    );
    let (m2, e2, p2) = (metrics.clone(), events.clone(), points.clone());
    threads.push(
        std::thread::Builder::new()
            .name("apparate-adapter".into())
            .spawn(move || {
                // Ends when the executor drops its sender.
                for rec in rx {
                    let changed = controller.on_batch(rec);
                    let evs = controller.drain_events();
                    if let Some(a) = evs.last() {
                        m2.set_window_accuracy(a.window_accuracy);
                    }
                    if let Some(c) = changed {
                        publish(&m2, &p2, &c);
                        *active.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(c);
                    }
                    if !evs.is_empty() {
                        e2.lock().unwrap_or_else(|p| p.into_inner()).extend(evs);
                    }
                }
            })
            .map_err(|e| Error::Input(format!("cannot start the adapter thread: {e}")))?,
    );
    Ok(Engine {
        queue,
        metrics,
        events,
        kind,
        labels,
        points,
        device,
        threads,
    })
}

fn publish(m: &Metrics, points: &[String], c: &ActiveConfig) {
    m.set_active(
        c.ramps
            .iter()
            .zip(&c.thresholds)
            .map(|(&r, &t)| (points[r].clone(), t))
            .collect(),
    );
}

impl Engine {
    pub fn builder(model: impl AsRef<Path>) -> EngineBuilder {
        EngineBuilder {
            model: model.as_ref().to_path_buf(),
            ramps: None,
            backend: BackendChoice::default(),
            batching: BatchingConfig::default(),
            apparate: None,
            profile: None,
            bootstrap: None,
            log: None,
        }
    }

    /// Submits a request; await the result (any executor, or none: see
    /// [`ResponseFuture::wait`]). Dropping it before the answer cancels the request if it has not
    /// started computing.
    pub fn infer(&self, input: Input) -> ResponseFuture {
        self.infer_with(input, RequestOptions::default())
    }

    /// [`Engine::infer`] with a deadline.
    pub fn infer_with(&self, input: Input, opts: RequestOptions) -> ResponseFuture {
        self.metrics.count_request();
        let input = match self.check(input) {
            Ok(i) => i,
            Err(e) => {
                self.metrics.count_failed();
                return ResponseFuture::ready(Err(e));
            }
        };
        let slot = Arc::new(completion::Slot::default());
        let p = Pending {
            input,
            slot: slot.clone(),
            submitted: Instant::now(),
            deadline: opts.deadline,
        };
        match self.queue.push(p) {
            Ok(()) => ResponseFuture::new(slot),
            Err((_, e)) => {
                match &e {
                    ServeError::Overloaded(_) => self.metrics.count_rejected(),
                    _ => self.metrics.count_failed(),
                }
                ResponseFuture::ready(Err(e))
            }
        }
    }

    /// Blocking twin of [`Engine::infer`].
    pub fn infer_blocking(&self, input: Input) -> Result<Response, ServeError> {
        self.infer(input).wait()
    }

    /// Validates an input against the model and normalises pixels.
    fn check(&self, input: Input) -> Result<Input, ServeError> {
        match (&self.kind, input) {
            (InputKind::Text, Input::Text(t)) => Ok(Input::Text(t)),
            (InputKind::Text, _) => Err(ServeError::BadInput(
                "this is a text model: send Input::Text".into(),
            )),
            (InputKind::Image { .. }, Input::Text(_)) => Err(ServeError::BadInput(
                "this is an image model: send Input::Pixels or Input::Normalized".into(),
            )),
            (InputKind::Image { values, mean, std }, Input::Pixels(p)) => {
                if p.len() != *values {
                    return Err(ServeError::BadInput(format!(
                        "{} pixel values, the model takes {values}",
                        p.len()
                    )));
                }
                let c = mean.len();
                Ok(Input::Normalized(
                    p.iter()
                        .enumerate()
                        .map(|(i, &v)| (v as f32 / 255.0 - mean[i % c]) / std[i % c])
                        .collect(),
                ))
            }
            (InputKind::Image { values, .. }, Input::Normalized(v)) => {
                if v.len() != *values {
                    return Err(ServeError::BadInput(format!(
                        "{} values, the model takes {values}",
                        v.len()
                    )));
                }
                if v.iter().any(|x| !x.is_finite()) {
                    return Err(ServeError::BadInput("non-finite input values".into()));
                }
                Ok(Input::Normalized(v))
            }
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The metrics, shared (they outlive the engine: read the final counts after shutdown).
    pub fn shared_metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Adaptation decisions logged since the last call.
    pub fn drain_events(&self) -> Vec<AdaptEvent> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Class names of the model's head.
    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    /// Every ramp of the ramps file (the candidates), in stage order.
    pub fn ramp_points(&self) -> &[String] {
        &self.points
    }

    /// The device the engine runs on ([`Backend::device_id`]).
    pub fn device(&self) -> &str {
        &self.device
    }

    /// Requests waiting for a batch.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Stops accepting requests, serves every queued one, and waits for the threads.
    pub fn shutdown(mut self) {
        self.stop(true);
    }

    fn stop(&mut self, drain: bool) {
        self.queue.close(drain);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Engine {
    /// Fails every queued request with `ShutDown`, finishes the running batch, and joins.
    fn drop(&mut self) {
        self.stop(false);
    }
}
