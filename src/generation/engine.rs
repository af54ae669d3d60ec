//! The generation engine: many sequences decoded at once with iteration-level (continuous)
//! batching, each caller receiving its tokens as a stream.
//!
//! One engine thread owns the model's key/value cache and loops over steps. A step is one
//! [`Llama::forward`] over a mix of rows: the next token of every running sequence that has
//! finished its prompt, and prompt chunks of sequences still prefilling, as many tokens as
//! [`EngineConfig::max_step_tokens`] allows (decode rows first, so a long prompt never stalls
//! the sequences already generating: it is fed in chunks across steps). Sequences join between
//! steps when the cache can hold them and leave as soon as they finish or are cancelled.
//!
//! Memory: a sequence is admitted with its whole budget (prompt + `max_tokens` positions)
//! reserved in the cache, so a running sequence never runs out and nothing is ever evicted.
//! Requests that do not fit yet wait in a bounded queue, in arrival order; a full queue
//! answers [`ServeError::Overloaded`] at once, and a request larger than the whole cache
//! [`ServeError::BadInput`]. Dropping a [`GenerationStream`] (or [`GenerationStream::cancel`])
//! cancels its sequence: the engine frees its blocks before the next step.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::backend::decoder::DecoderBackend;
use crate::error::{Error, Result};
use crate::models::llama::{Chunk, KvCache, KvCacheConfig, Llama, SeqCache};
use crate::models::llama::{Sampler, Sampling};
use crate::serve::ServeError;

/// Settings of the engine.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineConfig {
    /// Tokens one step may run (decode rows plus prompt chunks). Default 256: a step's
    /// activations stay small, and a prompt of 1,000 tokens costs the running sequences four
    /// steps of some milliseconds each, not one long stall.
    pub max_step_tokens: usize,
    /// Sequences generating at once. Default 32.
    pub max_running: usize,
    /// Requests waiting for room (in the cache or among the running). Default 256; 0 refuses
    /// every request that cannot start at once.
    pub queue_capacity: usize,
    pub kv: KvCacheConfig,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_step_tokens: 256,
            max_running: 32,
            queue_capacity: 256,
            kv: KvCacheConfig::default(),
        }
    }
}

impl EngineConfig {
    pub fn validate(&self) -> Result<()> {
        if !(1..=65536).contains(&self.max_step_tokens) {
            return Err(Error::config(
                "max_step_tokens",
                self.max_step_tokens,
                "1..=65536",
            ));
        }
        if !(1..=4096).contains(&self.max_running) {
            return Err(Error::config("max_running", self.max_running, "1..=4096"));
        }
        if self.queue_capacity > 1 << 20 {
            return Err(Error::config(
                "queue_capacity",
                self.queue_capacity,
                "0..=1048576",
            ));
        }
        Ok(())
    }
}

/// One generation to run.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    /// Tokens to generate at most.
    pub max_tokens: usize,
    pub sampling: Sampling,
    /// Tokens that end the generation (emitted, then done).
    pub stop: Vec<u32>,
}

/// Why a generation ended.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token was generated.
    Stop,
    /// `max_tokens` were generated.
    Length,
    /// The sequence reached the model's context length.
    Context,
}

/// What a generation did.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub generated: usize,
    /// From submission to the first token.
    pub time_to_first_token: Duration,
    /// From submission to the end.
    pub total: Duration,
    /// Waiting in the queue before admission.
    pub queued: Duration,
}

/// What a stream yields.
#[derive(Clone, Debug, PartialEq)]
pub enum TokenEvent {
    Token(u32),
    Done(FinishReason, GenerationStats),
    Failed(ServeError),
}

/// The tokens of one generation as they are produced. Dropping it cancels the generation.
pub struct GenerationStream {
    rx: Receiver<TokenEvent>,
    cancel: Arc<AtomicBool>,
    done: bool,
}

impl GenerationStream {
    /// Stops the generation; the engine frees its cache before its next step.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    /// Every token until the end: the ids, and how it ended.
    pub fn collect_tokens(
        self,
    ) -> std::result::Result<(Vec<u32>, FinishReason, GenerationStats), ServeError> {
        let mut ids = Vec::new();
        for e in self {
            match e {
                TokenEvent::Token(t) => ids.push(t),
                TokenEvent::Done(r, s) => return Ok((ids, r, s)),
                TokenEvent::Failed(e) => return Err(e),
            }
        }
        Err(ServeError::ShutDown(
            "the stream ended without an answer".into(),
        ))
    }
}

impl Iterator for GenerationStream {
    type Item = TokenEvent;
    fn next(&mut self) -> Option<TokenEvent> {
        if self.done {
            return None;
        }
        match self.rx.recv() {
            Ok(e) => {
                self.done = !matches!(e, TokenEvent::Token(_));
                Some(e)
            }
            Err(_) => {
                self.done = true;
                Some(TokenEvent::Failed(ServeError::ShutDown(
                    "the engine stopped".into(),
                )))
            }
        }
    }
}

impl Drop for GenerationStream {
    fn drop(&mut self) {
        self.cancel();
    }
}

/// Counters of the engine, for reports and tests.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EngineStats {
    pub steps: u64,
    /// Rows run, split by kind.
    pub decode_rows: u64,
    pub prefill_rows: u64,
    /// Most sequences running in one step.
    pub max_running_seen: usize,
    pub completed: u64,
    pub cancelled: u64,
    pub rejected: u64,
    pub failed: u64,
    /// Free key/value cache blocks after the last step (of `cache_blocks`).
    pub free_blocks: usize,
    pub cache_blocks: usize,
}

/// Where a generation's events go: the channel of a blocking [`GenerationStream`] or of an
/// [`AsyncGenerationStream`]. Both are unbounded: the engine thread never waits on a caller.
enum Sink {
    Blocking(Sender<TokenEvent>),
    Async(tokio::sync::mpsc::UnboundedSender<TokenEvent>),
}

impl Sink {
    /// `Err` when the receiving end is gone.
    fn send(&self, e: TokenEvent) -> std::result::Result<(), ()> {
        match self {
            Sink::Blocking(tx) => tx.send(e).map_err(|_| ()),
            Sink::Async(tx) => tx.send(e).map_err(|_| ()),
        }
    }
}

/// [`GenerationStream`] for async callers: await [`AsyncGenerationStream::next`]; no thread
/// blocks while tokens are awaited. Dropping it cancels the generation.
pub struct AsyncGenerationStream {
    rx: tokio::sync::mpsc::UnboundedReceiver<TokenEvent>,
    cancel: Arc<AtomicBool>,
    done: bool,
}

impl AsyncGenerationStream {
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    /// The next event, as [`GenerationStream`]'s iterator gives them: tokens, then one `Done`
    /// or `Failed`, then `None`.
    pub async fn next(&mut self) -> Option<TokenEvent> {
        if self.done {
            return None;
        }
        match self.rx.recv().await {
            Some(e) => {
                self.done = !matches!(e, TokenEvent::Token(_));
                Some(e)
            }
            None => {
                self.done = true;
                Some(TokenEvent::Failed(ServeError::ShutDown(
                    "the engine stopped".into(),
                )))
            }
        }
    }
}

impl Drop for AsyncGenerationStream {
    fn drop(&mut self) {
        self.cancel();
    }
}

struct Pending {
    req: GenerateRequest,
    tx: Sink,
    cancel: Arc<AtomicBool>,
    submitted: Instant,
}

enum Msg {
    Submit(Pending),
    Stop,
}

/// The handle callers submit to; the engine thread stops when it is dropped (running and queued
/// generations end with [`ServeError::ShutDown`]).
pub struct Engine {
    tx: SyncSender<Msg>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<Mutex<EngineStats>>,
    capacity: usize,
    context: usize,
    occupancy: Arc<Occupancy>,
    queue_capacity: usize,
    max_running: usize,
}

/// What submitters read to refuse at once: generations submitted and not yet running (in the
/// channel or the thread's queue), and those running. The thread keeps the exact bound (it
/// knows the cache); this lets [`Engine::submit`] answer `Overloaded` in the caller's own
/// call instead of as a first event, once the thread has fallen behind.
#[derive(Default)]
struct Occupancy {
    waiting: AtomicUsize,
    running: AtomicUsize,
}

impl Engine {
    /// Starts the engine thread over `model` with a cache of `cfg.kv`.
    pub fn start<B: DecoderBackend + 'static>(
        model: Llama<B>,
        cfg: EngineConfig,
    ) -> Result<Engine> {
        cfg.validate()?;
        let cache = model.new_cache(cfg.kv)?;
        let capacity = cache.capacity();
        let context = model.cfg.context;
        // The channel holds what the engine thread has not picked up yet; the queue bound is
        // enforced by the thread (it knows what is waiting), the channel only has to be
        // large enough not to block a submitter for long.
        let (tx, rx) = mpsc::sync_channel(cfg.queue_capacity.max(1) + cfg.max_running);
        let stats = Arc::new(Mutex::new(EngineStats::default()));
        let st = stats.clone();
        let occupancy = Arc::new(Occupancy::default());
        let occ = occupancy.clone();
        let (queue_capacity, max_running) = (cfg.queue_capacity, cfg.max_running);
        let thread = std::thread::Builder::new()
            .name("apparate-generate".into())
            .spawn(move || Worker::new(model, cache, cfg, st, occ).run(rx))
            .map_err(|e| Error::Input(format!("cannot start the generation thread: {e}")))?;
        Ok(Engine {
            occupancy,
            queue_capacity,
            max_running,
            tx,
            thread: Some(thread),
            stats,
            capacity,
            context,
        })
    }

    /// Queues a generation; its tokens arrive on the returned stream. Refused at once (an
    /// `Err` here, or a `Failed` first event) when it can never fit or the queue is full.
    pub fn submit(
        &self,
        req: GenerateRequest,
    ) -> std::result::Result<GenerationStream, ServeError> {
        let (tx, rx) = mpsc::channel();
        let cancel = self.enqueue(req, Sink::Blocking(tx))?;
        Ok(GenerationStream {
            rx,
            cancel,
            done: false,
        })
    }

    /// [`Engine::submit`] for async callers (a server): the same checks and queue, the tokens on
    /// an [`AsyncGenerationStream`].
    pub fn submit_async(
        &self,
        req: GenerateRequest,
    ) -> std::result::Result<AsyncGenerationStream, ServeError> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let cancel = self.enqueue(req, Sink::Async(tx))?;
        Ok(AsyncGenerationStream {
            rx,
            cancel,
            done: false,
        })
    }

    /// Checks a request and queues it with its sink; its cancel flag.
    fn enqueue(
        &self,
        req: GenerateRequest,
        tx: Sink,
    ) -> std::result::Result<Arc<AtomicBool>, ServeError> {
        if req.prompt.is_empty() {
            return Err(ServeError::BadInput("an empty prompt".into()));
        }
        if req.max_tokens == 0 {
            return Err(ServeError::BadInput("max_tokens is 0".into()));
        }
        req.sampling
            .check()
            .map_err(|e| ServeError::BadInput(e.to_string()))?;
        let need = req.prompt.len() + req.max_tokens;
        if req.prompt.len() >= self.context {
            return Err(ServeError::BadInput(format!(
                "a prompt of {} tokens leaves no room in the model's context of {}",
                req.prompt.len(),
                self.context
            )));
        }
        if need.min(self.context) > self.capacity {
            return Err(ServeError::BadInput(format!(
                "{} prompt tokens + {} to generate need {} cache positions; the key/value cache holds {}",
                req.prompt.len(),
                req.max_tokens,
                need.min(self.context),
                self.capacity
            )));
        }
        // Room: the queue, plus the running slots free now (a request there starts at once).
        let occ = &self.occupancy;
        let room = self.queue_capacity
            + self
                .max_running
                .saturating_sub(occ.running.load(Ordering::Relaxed));
        let waiting = occ.waiting.fetch_add(1, Ordering::Relaxed);
        if waiting >= room {
            occ.waiting.fetch_sub(1, Ordering::Relaxed);
            self.stats.lock().map(|mut s| s.rejected += 1).ok();
            return Err(ServeError::Overloaded(format!(
                "{waiting} generations are waiting for room (a queue of {})",
                self.queue_capacity
            )));
        }
        let cancel = Arc::new(AtomicBool::new(false));
        let p = Pending {
            req,
            tx,
            cancel: cancel.clone(),
            submitted: Instant::now(),
        };
        let refused = match self.tx.try_send(Msg::Submit(p)) {
            Ok(()) => return Ok(cancel),
            Err(TrySendError::Full(_)) => {
                self.stats.lock().map(|mut s| s.rejected += 1).ok();
                ServeError::Overloaded("the generation queue is full".into())
            }
            Err(TrySendError::Disconnected(_)) => ServeError::ShutDown("the engine stopped".into()),
        };
        occ.waiting.fetch_sub(1, Ordering::Relaxed);
        Err(refused)
    }

    pub fn stats(&self) -> EngineStats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Positions the key/value cache holds.
    pub fn cache_capacity(&self) -> usize {
        self.capacity
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // A full channel: the thread drains it and sees the sender gone instead.
        let _ = self.tx.try_send(Msg::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A sequence the engine is running.
struct Running {
    p: Pending,
    seq: SeqCache,
    sampler: Sampler,
    /// Prompt tokens fed so far.
    fed: usize,
    /// The token to feed next once the prompt is in (the last one generated).
    next: Option<u32>,
    generated: usize,
    admitted: Instant,
    first_token: Option<Instant>,
}

struct Worker<B: DecoderBackend> {
    model: Llama<B>,
    cache: KvCache<B>,
    cfg: EngineConfig,
    stats: Arc<Mutex<EngineStats>>,
    queue: VecDeque<Pending>,
    running: Vec<Running>,
    occupancy: Arc<Occupancy>,
}

impl<B: DecoderBackend> Worker<B> {
    fn new(
        model: Llama<B>,
        cache: KvCache<B>,
        cfg: EngineConfig,
        stats: Arc<Mutex<EngineStats>>,
        occupancy: Arc<Occupancy>,
    ) -> Self {
        Worker {
            model,
            cache,
            cfg,
            stats,
            queue: VecDeque::new(),
            running: Vec::new(),
            occupancy,
        }
    }

    /// `n` submitted generations stopped waiting (started, refused or cancelled).
    fn left_waiting(&self, n: usize) {
        self.occupancy.waiting.fetch_sub(n, Ordering::Relaxed);
    }

    fn count(&self, f: impl FnOnce(&mut EngineStats)) {
        if let Ok(mut s) = self.stats.lock() {
            f(&mut s);
        }
    }

    fn run(mut self, rx: Receiver<Msg>) {
        loop {
            // Idle: block for work; busy: take what has arrived and go on.
            let first = if self.running.is_empty() && self.queue.is_empty() {
                match rx.recv() {
                    Ok(m) => Some(m),
                    Err(_) => return,
                }
            } else {
                match rx.recv_timeout(Duration::ZERO) {
                    Ok(m) => Some(m),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return self.shut_down(),
                }
            };
            let mut msgs: Vec<Msg> = first.into_iter().collect();
            msgs.extend(rx.try_iter());
            for m in msgs {
                match m {
                    Msg::Submit(p) => self.enqueue(p),
                    Msg::Stop => return self.shut_down(),
                }
            }
            self.drop_cancelled();
            self.admit();
            if !self.running.is_empty() {
                self.step();
            }
            self.occupancy
                .running
                .store(self.running.len(), Ordering::Relaxed);
            let (free, total) = (self.cache.free_blocks(), self.cache.blocks());
            self.count(|s| {
                s.free_blocks = free;
                s.cache_blocks = total;
            });
        }
    }

    /// Queues `p` and starts what fits; refuses it when the queue is then over its bound.
    fn enqueue(&mut self, p: Pending) {
        self.queue.push_back(p);
        self.admit();
        if self.queue.len() > self.cfg.queue_capacity {
            let p = self.queue.pop_back().expect("over the bound");
            self.left_waiting(1);
            let _ = p.tx.send(TokenEvent::Failed(ServeError::Overloaded(format!(
                "{} generations are waiting for room ({} running; {} of {} cache blocks free)",
                self.queue.len(),
                self.running.len(),
                self.cache.free_blocks(),
                self.cache.blocks()
            ))));
            self.count(|s| s.rejected += 1);
        }
    }

    fn budget(&self, req: &GenerateRequest) -> usize {
        (req.prompt.len() + req.max_tokens).min(self.model.cfg.context)
    }

    /// Ends cancelled sequences (running or queued) and frees their blocks.
    fn drop_cancelled(&mut self) {
        let before = self.running.len() + self.queue.len();
        let cache = &mut self.cache;
        self.running.retain_mut(|r| {
            let gone = r.p.cancel.load(Ordering::Relaxed);
            if gone {
                cache.release(&mut r.seq);
            }
            !gone
        });
        let queued = self.queue.len();
        self.queue.retain(|p| !p.cancel.load(Ordering::Relaxed));
        self.left_waiting(queued - self.queue.len());
        let n = before - self.running.len() - self.queue.len();
        if n > 0 {
            self.count(|s| s.cancelled += n as u64);
        }
    }

    /// Starts queued requests, in order, while the cache and the running set have room.
    fn admit(&mut self) {
        while let Some(p) = self.queue.front() {
            if self.running.len() >= self.cfg.max_running {
                return;
            }
            let budget = self.budget(&p.req);
            let mut seq = SeqCache::default();
            if self.cache.reserve(&mut seq, budget).is_err() {
                return;
            }
            let p = self.queue.pop_front().expect("front exists");
            self.left_waiting(1);
            let sampler = Sampler::new(p.req.sampling).expect("checked at submission");
            self.running.push(Running {
                p,
                seq,
                sampler,
                fed: 0,
                next: None,
                generated: 0,
                admitted: Instant::now(),
                first_token: None,
            });
        }
    }

    fn step(&mut self) {
        // Decode rows first, then prompt chunks in admission order within the token budget.
        let mut budget = self.cfg.max_step_tokens;
        let mut plan: Vec<(usize, usize, usize)> = Vec::new(); // (running index, start, len)
        for (i, r) in self.running.iter().enumerate() {
            if r.next.is_some() && budget > 0 {
                plan.push((i, r.seq.len(), 1));
                budget -= 1;
            }
        }
        for (i, r) in self.running.iter().enumerate() {
            if r.next.is_none() && budget > 0 {
                let n = (r.p.req.prompt.len() - r.fed).min(budget);
                plan.push((i, r.seq.len(), n));
                budget -= n;
            }
        }
        let decode_rows = plan
            .iter()
            .filter(|p| self.running[p.0].next.is_some())
            .count();
        let tokens: Vec<Vec<u32>> = plan
            .iter()
            .map(|&(i, _, n)| {
                let r = &self.running[i];
                match r.next {
                    Some(t) => vec![t],
                    None => r.p.req.prompt[r.fed..r.fed + n].to_vec(),
                }
            })
            .collect();
        let chunks: Vec<Chunk<'_>> = plan
            .iter()
            .zip(&tokens)
            .map(|(&(i, start, _), t)| Chunk {
                tokens: t,
                start,
                table: self.running[i].seq.table(),
            })
            .collect();
        let result = self
            .model
            .forward(&mut self.cache, &chunks)
            .and_then(|logits| {
                let be = self.model.backend();
                let ids = be.argmax(&logits)?;
                let any_sampled = plan
                    .iter()
                    .any(|&(i, _, _)| !self.running[i].sampler.config().is_greedy());
                let host = if any_sampled {
                    Some(be.download(&logits)?)
                } else {
                    None
                };
                Ok((ids, host))
            });
        let running = self.running.len();
        self.count(|s| {
            s.steps += 1;
            s.decode_rows += decode_rows as u64;
            s.prefill_rows += (tokens.iter().map(Vec::len).sum::<usize>() - decode_rows) as u64;
            s.max_running_seen = s.max_running_seen.max(running);
        });
        let (ids, host) = match result {
            Ok(v) => v,
            Err(e) => {
                // The step's sequences cannot go on (their cache is half-written).
                let mut failed: Vec<usize> = plan.iter().map(|p| p.0).collect();
                failed.sort_unstable();
                for &i in failed.iter().rev() {
                    let mut r = self.running.remove(i);
                    self.cache.release(&mut r.seq);
                    self.count(|s| s.failed += 1);
                    let why = ServeError::Backend(e.to_string());
                    let _ = r.p.tx.send(TokenEvent::Failed(why));
                }
                return;
            }
        };
        let vocab = self.model.cfg.vocab;
        let mut finished: Vec<(usize, Option<FinishReason>)> = Vec::new();
        for (k, &(i, start, n)) in plan.iter().enumerate() {
            let context = self.model.cfg.context;
            let r = &mut self.running[i];
            self.cache.set_len(&mut r.seq, start + n);
            if r.next.is_none() {
                r.fed += n;
                if r.fed < r.p.req.prompt.len() {
                    continue; // more prompt to feed
                }
            }
            let token = match &host {
                Some(h) if !r.sampler.config().is_greedy() => {
                    r.sampler.sample(&h[k * vocab..(k + 1) * vocab])
                }
                _ => ids[k],
            };
            r.generated += 1;
            r.first_token.get_or_insert_with(Instant::now);
            if r.p.tx.send(TokenEvent::Token(token)).is_err() {
                finished.push((i, None)); // the caller went away
                continue;
            }
            let reason = if r.p.req.stop.contains(&token) {
                Some(FinishReason::Stop)
            } else if r.generated >= r.p.req.max_tokens {
                Some(FinishReason::Length)
            } else if r.seq.len() >= context {
                Some(FinishReason::Context)
            } else {
                None
            };
            match reason {
                Some(why) => finished.push((i, Some(why))),
                None => r.next = Some(token),
            }
        }
        finished.sort_unstable_by_key(|f| f.0);
        // Removed from the back, in place, so the others keep their admission order.
        for &(i, why) in finished.iter().rev() {
            let mut r = self.running.remove(i);
            self.cache.release(&mut r.seq);
            match why {
                Some(why) => {
                    let now = Instant::now();
                    let stats = GenerationStats {
                        prompt_tokens: r.p.req.prompt.len(),
                        generated: r.generated,
                        time_to_first_token: r.first_token.unwrap_or(now) - r.p.submitted,
                        total: now - r.p.submitted,
                        queued: r.admitted - r.p.submitted,
                    };
                    // Counted before the caller hears of it, so stats read after the last
                    // event include it.
                    self.count(|s| s.completed += 1);
                    let _ = r.p.tx.send(TokenEvent::Done(why, stats));
                }
                None => self.count(|s| s.cancelled += 1),
            }
        }
    }

    fn shut_down(mut self) {
        for mut r in self.running.drain(..) {
            let _ = r.p.tx.send(TokenEvent::Failed(ServeError::ShutDown(
                "the engine stopped".into(),
            )));
            self.cache.release(&mut r.seq);
        }
        for p in self.queue.drain(..) {
            let _ = p.tx.send(TokenEvent::Failed(ServeError::ShutDown(
                "the engine stopped".into(),
            )));
        }
    }
}
