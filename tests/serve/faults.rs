//! What used to hang or stall the engine (issue 12, defects 6, 8 and 9): a panic on one of its
//! threads, a delay beyond what an `Instant` holds, megabyte texts, empty texts.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use apparate::backend::{
    AttentionCall, Backend, ConvCall, EmbedCall, GlobalPoolCall, LayerNormCall, LinearCall,
    PendingDecisions, Pool2dCall, PoolCall, RampCall, RampDecision, RowsCall,
};
use apparate::format::ModelFile;
use apparate::serve::{BatchingConfig, Engine, Input, Response, ResponseFuture, ServeError};
use apparate::tensor::TensorView;
use apparate::tokenize::TextTokenizer;

use super::common::{TempDir, cpu};
use super::{engine_checking_ramp, threads1, tiny_engine, tiny_model, tiny_texts};

const OFF: u8 = 0;
/// Panic in a compute op: on the executor thread.
const IN_EXECUTOR: u8 = 1;
/// Panic while waiting for a ramp's decisions: on the releaser thread.
const IN_RELEASER: u8 = 2;

/// A backend that panics where its switch says (a bug in a backend or a kernel launcher, an
/// arithmetic overflow in the runtime: anything that unwinds an engine thread).
struct Panicky<B> {
    inner: B,
    mode: Arc<AtomicU8>,
}

impl<B> Panicky<B> {
    fn maybe_panic(&self, op: &str) {
        if self.mode.load(Ordering::Relaxed) == IN_EXECUTOR {
            panic!("injected panic in `{op}`");
        }
    }
}

struct PanicOnWait;

impl PendingDecisions for PanicOnWait {
    fn wait(self: Box<Self>) -> apparate::Result<Vec<RampDecision>> {
        panic!("injected panic while waiting for a ramp's decisions")
    }
}

impl<B: Backend> Backend for Panicky<B> {
    type Tensor = B::Tensor;

    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn device_id(&self) -> String {
        self.inner.device_id()
    }
    fn synchronize(&self) -> apparate::Result<()> {
        self.inner.synchronize()
    }
    fn load_weight(&self, view: &TensorView<'_>) -> apparate::Result<Self::Tensor> {
        self.inner.load_weight(view)
    }
    fn download(&self, t: &Self::Tensor) -> apparate::Result<Vec<f32>> {
        self.inner.download(t)
    }
    fn shape<'t>(&self, t: &'t Self::Tensor) -> &'t [usize] {
        self.inner.shape(t)
    }
    fn run_upload(&self, values: &[f32], shape: &[usize]) -> apparate::Result<Self::Tensor> {
        self.inner.run_upload(values, shape)
    }
    fn run_reshape(&self, t: Self::Tensor, shape: &[usize]) -> apparate::Result<Self::Tensor> {
        self.inner.run_reshape(t, shape)
    }
    fn run_linear(&self, c: LinearCall<'_, Self::Tensor>) -> apparate::Result<Self::Tensor> {
        self.maybe_panic("linear");
        self.inner.run_linear(c)
    }
    fn run_add_layernorm(
        &self,
        c: LayerNormCall<'_, Self::Tensor>,
    ) -> apparate::Result<Self::Tensor> {
        self.inner.run_add_layernorm(c)
    }
    fn run_attention(&self, c: AttentionCall<'_, Self::Tensor>) -> apparate::Result<Self::Tensor> {
        self.inner.run_attention(c)
    }
    fn run_embed(&self, c: EmbedCall<'_, Self::Tensor>) -> apparate::Result<Self::Tensor> {
        self.inner.run_embed(c)
    }
    fn run_pool(&self, c: PoolCall<'_, Self::Tensor>) -> apparate::Result<Self::Tensor> {
        self.inner.run_pool(c)
    }
    fn run_l2_normalize(&self, c: RowsCall<'_, Self::Tensor>) -> apparate::Result<Self::Tensor> {
        self.inner.run_l2_normalize(c)
    }
    fn run_softmax(&self, c: RowsCall<'_, Self::Tensor>) -> apparate::Result<Self::Tensor> {
        self.inner.run_softmax(c)
    }
    fn run_conv2d(&self, c: ConvCall<'_, Self::Tensor>) -> apparate::Result<Self::Tensor> {
        self.inner.run_conv2d(c)
    }
    fn run_pool2d(&self, c: Pool2dCall<'_, Self::Tensor>) -> apparate::Result<Self::Tensor> {
        self.inner.run_pool2d(c)
    }
    fn run_global_avg_pool(
        &self,
        c: GlobalPoolCall<'_, Self::Tensor>,
    ) -> apparate::Result<Self::Tensor> {
        self.inner.run_global_avg_pool(c)
    }
    fn run_ramp_exit(&self, c: RampCall<'_, Self::Tensor>) -> apparate::Result<Vec<RampDecision>> {
        self.inner.run_ramp_exit(c)
    }
    fn run_ramp_exit_async(
        &self,
        c: RampCall<'_, Self::Tensor>,
    ) -> apparate::Result<Box<dyn PendingDecisions>> {
        if self.mode.load(Ordering::Relaxed) == IN_RELEASER {
            return Ok(Box::new(PanicOnWait));
        }
        self.inner.run_ramp_exit_async(c)
    }
}

/// Waits for every answer on another thread, failing (instead of hanging) after `limit`.
fn answers_within(
    futures: Vec<ResponseFuture>,
    limit: Duration,
) -> Vec<Result<Response, ServeError>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(futures.into_iter().map(|f| f.wait()).collect::<Vec<_>>());
    });
    rx.recv_timeout(limit)
        .expect("every request gets an answer (before the fix: they waited forever)")
}

#[test]
fn a_panic_on_an_engine_thread_fails_every_request_and_the_engine_without_hanging() {
    let dir = TempDir::new("serve-panic");
    let (model, ramps) = tiny_model(&dir);
    for (mode, thread) in [(IN_EXECUTOR, "executor"), (IN_RELEASER, "releaser")] {
        let switch = Arc::new(AtomicU8::new(OFF));
        // An active ramp on every batch, so the releaser waits for decisions.
        let backend = Panicky {
            inner: cpu(),
            mode: switch.clone(),
        };
        let engine = engine_checking_ramp(&model, &ramps, "layer.0", backend);
        assert!(engine.is_ready());
        assert!(engine.infer_blocking(Input::Text("the cat".into())).is_ok());
        switch.store(mode, Ordering::Relaxed);
        let futures: Vec<_> = tiny_texts(20, 4)
            .into_iter()
            .map(|t| engine.infer(Input::Text(t)))
            .collect();
        for a in answers_within(futures, Duration::from_secs(30)) {
            // Every answer says why, the requests the thread held included.
            assert!(
                matches!(&a, Err(ServeError::Failed(why)) if why.contains("injected")),
                "{thread}: {a:?}"
            );
        }
        // The engine says why, and later requests are answered at once.
        let health = engine.health().unwrap_err().to_string();
        assert!(
            health.contains(thread) && health.contains("injected"),
            "{health}"
        );
        assert!(!engine.is_ready());
        let t0 = Instant::now();
        let late = engine.infer_blocking(Input::Text("a dog".into()));
        assert!(matches!(late, Err(ServeError::Failed(_))), "{late:?}");
        assert!(t0.elapsed() < Duration::from_secs(1));
        let m = engine.shared_metrics();
        // Dropping it joins the threads: it must not hang either.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            drop(engine);
            let _ = tx.send(());
        });
        rx.recv_timeout(Duration::from_secs(30))
            .expect("the engine shuts down");
        assert_eq!(m.requests(), 22);
        assert_eq!(m.answered() + m.failed(), 22, "{thread}");
        assert_eq!(m.answered(), 1, "{thread}");
    }
}

#[test]
fn delays_beyond_any_instant_are_refused_at_build() {
    let dir = TempDir::new("serve-delay");
    let (model, ramps) = tiny_model(&dir);
    // `--max-delay-ms 1e22` overflowed `Instant + Duration` on the executor, which died with
    // every caller waiting.
    for delay in [Duration::from_secs_f64(1e19), Duration::MAX] {
        let e = Engine::builder(&model)
            .ramps(&ramps)
            .backend(threads1())
            .batching(BatchingConfig {
                max_queue_delay: delay,
                ..BatchingConfig::default()
            })
            .build()
            .err()
            .expect("refused");
        assert!(e.to_string().contains("max_queue_delay"), "{e}");
    }
    let e = apparate::serve::duration_from_millis("--max-delay-ms", 1e300).unwrap_err();
    assert!(e.to_string().contains("--max-delay-ms"), "{e}");
}

#[test]
fn megabyte_texts_are_cut_before_tokenizing_and_do_not_stall_others() {
    let dir = TempDir::new("serve-long");
    let (model, ramps) = tiny_model(&dir);
    let file = ModelFile::open(&model).unwrap();
    let tokenizer = TextTokenizer::from_model(&file).unwrap();
    let megabyte = "cat ".repeat(1 << 18);
    // Bounded work: only `max_chars` characters are read, and the truncation length holds.
    let t0 = Instant::now();
    let tokens = tokenizer.tokenize(&megabyte).unwrap();
    let took = t0.elapsed();
    assert_eq!(tokens.len(), tokenizer.max_length());
    assert!(took < Duration::from_millis(500), "{took:?}");
    // Same tokens as the whole text (the tokenizer's own truncation), cut or not.
    let whole = tokenizer.encode(&[&megabyte[..4 * 40]]).unwrap();
    assert_eq!(whole.ids, tokens.ids);

    let engine = tiny_engine(&model, &ramps);
    let big: Vec<_> = (0..5)
        .map(|_| engine.infer(Input::Text(megabyte.clone())))
        .collect();
    let ordinary = engine
        .infer_blocking(Input::Text("the cat sat".into()))
        .unwrap();
    // Before the fix the five bodies were tokenized whole on the executor, ahead of it
    // (6.3 s measured with MiniLM's tokenizer).
    assert!(
        ordinary.timings.total < Duration::from_secs(1),
        "{:?}",
        ordinary.timings
    );
    let short = engine
        .infer_blocking(Input::Text(megabyte[..4 * 40].to_string()))
        .unwrap();
    for f in big {
        assert_eq!(f.wait().unwrap().class, short.class);
    }
}

#[test]
fn empty_texts_are_refused_at_submission() {
    let dir = TempDir::new("serve-empty");
    let (model, ramps) = tiny_model(&dir);
    let engine = tiny_engine(&model, &ramps);
    for t in ["", "   ", "\n\t"] {
        let e = engine.infer_blocking(Input::Text(t.into())).unwrap_err();
        assert!(
            matches!(e, ServeError::BadInput(ref m) if m.contains("empty")),
            "{e}"
        );
    }
    assert!(engine.infer_blocking(Input::Text("a cat".into())).is_ok());
    let m = engine.shared_metrics();
    engine.shutdown();
    assert_eq!((m.requests(), m.failed(), m.answered()), (4, 3, 1));
}
