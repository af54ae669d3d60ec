//! The serving runtime: an [`Engine`] batches requests, runs each batch stage by stage, releases
//! the answers of inputs that exit at a ramp while the batch runs on, and adapts thresholds and
//! ramps on a separate thread (Apparate sections 2-5).
//!
//! Threads: the caller's (validates and prepares its input, submits, awaits); the *executor*
//! ([`executor`]: forms batches from the [`queue`], runs them); the *releaser* ([`releaser`]:
//! waits for ramp decisions and completes requests); the *adapter* ([`adapter`]: feeds
//! adaptation loops ([`crate::adapt::Loops`]) the records of finished batches and publishes new
//! configurations, which the executor picks up between batches). Nothing on the request path
//! waits for the adapter. A panic on any of them fails the engine instead of hanging it
//! ([`health`]). Loading (model, ramps, profile, bootstrap) is [`loader`]; inputs are prepared at
//! submission ([`input`]); settings are [`config`].

mod adapter;
mod completion;
pub mod config;
mod executor;
mod health;
mod input;
mod loader;
mod queue;
mod releaser;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Where the model runs (built by [`crate::select::with_backend`]).
pub use crate::select::BackendChoice;
pub use completion::ResponseFuture;
pub use config::{BatchingConfig, duration_from_millis};
pub use input::Input;

use crate::adapt::{AdaptEvent, ApparateConfig, Loops};
use crate::backend::Backend;
use crate::dataset::Inputs;
use crate::error::Result;
use crate::metrics::Metrics;
use health::Health;
use input::InputKind;
use queue::{Pending, Queue};

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
    /// A thread of the engine panicked: this request and every later one get this answer,
    /// and [`Engine::health`] says why.
    #[error("the engine failed: {0}")]
    Failed(String),
}

/// What a model takes ([`Engine::input_spec`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputSpec {
    /// A text ([`Input::Text`]).
    Text,
    /// HWC 8-bit pixels at this size ([`Input::Pixels`]).
    Image {
        height: usize,
        width: usize,
        channels: usize,
    },
}

/// Options of one request.
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestOptions {
    /// Answer `DeadlineExceeded` (never compute) if still queued at this instant.
    pub deadline: Option<Instant>,
}

/// A running engine. Cloneable handles are not needed: share it behind an `Arc`.
pub struct Engine {
    queue: Arc<Queue>,
    metrics: Arc<Metrics>,
    events: Arc<Mutex<Vec<AdaptEvent>>>,
    health: Arc<Health>,
    kind: InputKind,
    labels: Vec<String>,
    points: Vec<String>,
    device: String,
    /// Reads the backend's graph counters (GPU backends).
    graphs: Option<crate::backend::capture::GraphProbe>,
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
    /// Batching settings (checked by [`BatchingConfig::validate`] when the engine is built).
    pub fn batching(mut self, c: BatchingConfig) -> Self {
        self.batching = c;
        self
    }
    /// Adaptation settings (default: [`ApparateConfig::for_family`]; checked by
    /// [`ApparateConfig::validate`] when the engine is built).
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
        struct Start(EngineBuilder);
        impl crate::select::BackendJob for Start {
            type Output = Engine;
            fn run<B: Backend + 'static>(self, be: B, _: String) -> Result<Engine> {
                start(be, self.0)
            }
        }
        let choice = self.backend.clone();
        crate::select::with_backend(&choice, Start(self))
    }
}

/// Loads everything ([`loader`]), then wires and starts the threads.
fn start<B: Backend + 'static>(be: B, b: EngineBuilder) -> Result<Engine> {
    let l = loader::load(be, &b)?;
    let kind = InputKind::of(&l.backbone)?;
    let controller = Loops::new(
        l.cfg.clone(),
        l.points.clone(),
        l.profile,
        l.bootstrap.as_ref(),
        l.heads,
    );
    let head_updates = Arc::new(Mutex::new(Vec::new()));
    let metrics = Arc::new(Metrics::new());
    let active = Arc::new(Mutex::new(Arc::new(controller.active().clone())));
    adapter::publish(&metrics, &l.points, controller.active());
    let queue = Arc::new(Queue::new(b.batching.clone(), metrics.clone()));
    let health = Arc::new(Health::default());
    let labels = l.backbone.labels().to_vec();
    let device = l.backbone.backend().device_id();
    let graphs = l.backbone.backend().graph_probe();
    let (records_tx, records_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel();
    let mut adapter = adapter::Adapter {
        nice: l.cfg.adapter_nice,
        controller,
        metrics: metrics.clone(),
        events: Arc::new(Mutex::new(Vec::new())),
        active: active.clone(),
        points: l.points.clone(),
        head_updates: head_updates.clone(),
    };
    *adapter.events.lock().unwrap_or_else(|p| p.into_inner()) = adapter.controller.drain_events();
    let events = adapter.events.clone();
    let releaser = releaser::Releaser {
        metrics: metrics.clone(),
        records: records_tx,
        labels: labels.clone(),
        points: l.points.clone(),
        oracle: l.cfg.oracle,
        health: health.clone(),
    };
    let exec = executor::Executor {
        timed_stages: l.backbone.backend().name() == "cpu",
        backbone: l.backbone,
        ramps: l.ramps,
        active,
        queue: queue.clone(),
        metrics: metrics.clone(),
        release: release_tx,
        head_updates,
        health: health.clone(),
    };
    let mut engine = Engine {
        queue: queue.clone(),
        metrics,
        events,
        health: health.clone(),
        kind,
        labels,
        points: l.points,
        device,
        graphs,
        threads: Vec::new(),
    };
    // Pushed one by one: if a later thread cannot start, dropping the engine stops the earlier.
    let (h, q) = (health.clone(), queue.clone());
    engine
        .threads
        .push(health::spawn("executor", h, q, move || exec.run())?);
    let (h, q) = (health.clone(), queue.clone());
    engine
        .threads
        .push(health::spawn("releaser", h, q, move || {
            releaser.run(release_rx)
        })?);
    engine
        .threads
        .push(health::spawn("adapter", health, queue, move || {
            adapter.run(records_rx)
        })?);
    Ok(engine)
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

    /// [`Engine::infer`] with a deadline. The input is validated and prepared (tokenized,
    /// normalised) here, on the calling thread: a bad input is answered at once.
    pub fn infer_with(&self, input: Input, opts: RequestOptions) -> ResponseFuture {
        self.metrics.count_request();
        if let Some(why) = self.health.failure() {
            self.metrics.count_failed();
            return ResponseFuture::ready(Err(ServeError::Failed(why)));
        }
        let input = match self.kind.prepare(input) {
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
            metrics: self.metrics.clone(),
        };
        match self.queue.push(p) {
            Ok(()) => {}
            Err(ServeError::Overloaded(_)) => self.metrics.count_rejected(),
            Err(_) => self.metrics.count_failed(),
        }
        ResponseFuture::new(slot)
    }

    /// Blocking twin of [`Engine::infer`].
    pub fn infer_blocking(&self, input: Input) -> Result<Response, ServeError> {
        self.infer(input).wait()
    }

    /// `Ok` while the engine serves; the [`ServeError::Failed`] every request now gets once a
    /// thread of the engine has panicked (a server's readiness probe).
    pub fn health(&self) -> Result<(), ServeError> {
        match self.health.failure() {
            Some(why) => Err(ServeError::Failed(why)),
            None => Ok(()),
        }
    }

    /// Whether the engine serves ([`Engine::health`] is `Ok`).
    pub fn is_ready(&self) -> bool {
        self.health().is_ok()
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

    /// What the model takes: a text, or HWC 8-bit pixels of a fixed size.
    pub fn input_spec(&self) -> InputSpec {
        match &self.kind {
            InputKind::Text { .. } => InputSpec::Text,
            InputKind::Image(i) => InputSpec::Image {
                height: i.height,
                width: i.width,
                channels: i.channels,
            },
        }
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
    /// What the backend's graphs have done so far (each stage replayed as one graph per batch
    /// and sequence size: [`crate::backend::capture`]); `None` on a backend without graphs.
    pub fn graph_stats(&self) -> Option<crate::backend::capture::GraphStats> {
        self.graphs.as_ref().map(|probe| probe())
    }

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
        // A thread that panicked has already failed its requests (see `health`).
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
