//! Graphs of recorded runs: a device wrapper that turns a repeated sequence of launches (a
//! model's forward at one batch and sequence size, say) into one graph launch.
//!
//! [`Device::graphed`] on a [`GraphDevice`] runs a closure of device work under a key. After
//! [`GraphConfig::eager_runs`] plain runs, a run of the key is **recorded**: it runs as usual, and every allocation, upload, launch and fill it makes is
//! noted, its buffers kept alive by the record (persistent buffers per key). From the record
//! the device builds a graph ([`Device::build_graph`]: a CUDA graph on `cuda`) whose uploads
//! copy from a host staging area. Later runs of the key are **replayed**: the closure runs
//! again on the host, but its allocations get the recorded buffers back, its uploads only write
//! their bytes into the staging area, and its launches are compared with the record instead of
//! launched; at the end one graph launch does the device work. So the host still checks every
//! op and builds every argument list (microseconds), and the driver sees one call instead of
//! one per kernel, allocation and copy.
//!
//! Nothing is trusted: a replayed op that differs from the record (another shape, a buffer
//! made outside the run, a different kernel choice) stops the replay before anything runs on
//! the device, and the closure runs again, recorded afresh. A run that reads the device back
//! (a download, an event, a synchronisation) cannot be a graph: it stays eager under that key.
//!
//! What a caller must know:
//! - the closure runs more than once per call when a replay is abandoned, so it must do the
//!   same thing each time (no host side effects that matter);
//! - tensors a graphed run returns live in the key's persistent buffers: the next run of the
//!   same key, on any thread, overwrites them (download or copy them first, as
//!   [`crate::models::bert`] does; the engine runs a model on one executor thread);
//! - one run at a time is graphed per device; work other threads queue meanwhile runs as
//!   usual, and waits while a graph is being built (a CUDA stream capture must not see it;
//!   buffers dropped during a capture have their frees parked until it ends);
//! - a replay's uploads wait until the key's previous graph run has read the staging area, so
//!   back-to-back runs of one key do not overlap their host work with the previous run (double
//!   buffering the staging would).
//!
//! The recorded buffers of a key stay allocated until its record is evicted (the least
//! recently used beyond [`GraphConfig::max_records`] or [`GraphConfig::max_bytes`]),
//! [`GraphDevice::clear`] or the drop of the device. From the tensor sizes (computed, not measured): a MiniLM layer stage at batch 8
//! x 128 tokens in f16 keeps about 9 MB of activations and 9 MB of split-K partial sums.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use super::device::{Device, GraphStep, KernelArg, LaunchConfig, TensorMap, TensorMapSpec};
use crate::error::{Error, Result};

/// A buffer of a [`GraphDevice`]: shared, so that a record keeps it alive after the op that
/// made it drops its tensor.
pub struct GraphBuf<B>(Arc<B>);

/// What the graphs of a [`GraphDevice`] have done so far.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct GraphStats {
    /// Runs recorded (a first run of a key, or one after an abandoned replay).
    pub recorded: u64,
    /// Runs replayed as one graph launch.
    pub replayed: u64,
    /// Replays abandoned because the run differed from its record (then recorded again).
    pub rerecorded: u64,
    /// Runs that ran eagerly: keys whose runs cannot be graphs, and runs while another
    /// thread's run was being graphed.
    pub eager: u64,
    /// Why the last key that could not be a graph could not (or the last abandoned replay).
    pub last_reason: Option<String>,
}

/// The sequence length a batch whose longest input has `seq` tokens is padded to where runs are
/// graphed: graphs are kept per (stage, batch, sequence), so every length its own graph would
/// make most lengths a one-off that never replays (MiniLM: 512 lengths x 16 batch sizes x
/// stages, past [`GraphConfig::max_records`]). Lengths round up to a multiple of 8 up to 64
/// tokens, then of an eighth of the next power of two (16 up to 128, 32 up to 256, 64 up to
/// 512, ...): 20 buckets up to 512, at most 7 padded tokens below 64 and under a quarter of
/// the tokens above (65 -> 80, 513 -> 640). Padded positions are masked like any padding
/// (attention keys, pooling), so answers do not change; at these sizes a GPU forward is bound
/// by its launches, not by the extra rows.
pub fn seq_bucket(seq: usize) -> usize {
    let step = (seq.next_power_of_two() / 8).max(8);
    seq.div_ceil(step) * step
}

/// Reads a device's [`GraphStats`] at any time, from any thread ([`super::Backend::graph_probe`]).
pub type GraphProbe = Arc<dyn Fn() -> GraphStats + Send + Sync>;

/// How a [`GraphDevice`] graphs runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GraphConfig {
    /// Graph runs at all (`false`: every run is eager, as on the wrapped device).
    pub enabled: bool,
    /// Runs of a key before it is recorded: a shape seen once (a one-off batch size and
    /// sequence length) does not pay for a recording and keeps no buffers. Default 1: the
    /// second run of a key is recorded, the third replayed.
    pub eager_runs: u32,
    /// Most records kept (each holds its run's buffers); the least recently used goes first.
    /// Default 4096 (a model's stages are a record each, per batch and sequence size).
    pub max_records: usize,
    /// Most bytes of device memory the records' buffers may hold together; the least recently
    /// used go first, and a run whose buffers alone are more stays eager. Default 2 GiB.
    pub max_bytes: usize,
    /// Abandoned replays of a key after which it runs eagerly for good (its runs keep
    /// changing). Default 3.
    pub max_rerecords: u32,
}

impl Default for GraphConfig {
    fn default() -> Self {
        GraphConfig {
            enabled: true,
            eager_runs: 1,
            max_records: 4096,
            max_bytes: 2 << 30,
            max_rerecords: 3,
        }
    }
}

impl GraphConfig {
    /// The default, switched off by `APPARATE_GPU_GRAPHS=off` (`on` is the default; another
    /// value is refused by name).
    pub fn from_env() -> Result<GraphConfig> {
        let enabled = match std::env::var("APPARATE_GPU_GRAPHS").as_deref() {
            Err(_) | Ok("on") => true,
            Ok("off") => false,
            Ok(other) => {
                return Err(Error::config(
                    "APPARATE_GPU_GRAPHS",
                    format!("`{other}`"),
                    "on or off",
                ));
            }
        };
        Ok(GraphConfig {
            enabled,
            ..GraphConfig::default()
        })
    }
}

/// A device that can record and replay runs of [`Device::graphed`]; every other use passes
/// through to the wrapped device.
pub struct GraphDevice<D: Device> {
    inner: Arc<D>,
    config: GraphConfig,
    /// The thread whose run is being recorded or replayed (0: none).
    owner: AtomicU64,
    region: Mutex<Option<Region<D>>>,
    graphs: Mutex<Records<D>>,
    stats: Mutex<GraphStats>,
    /// Other threads' ops hold it shared; building a graph holds it alone.
    capture: RwLock<()>,
    /// Graphed runs so far (the records' recency).
    clock: AtomicU64,
}

/// Every key's entry, and what the `Ready` ones hold together (kept as entries come and go, so
/// a run does not walk every key to check the budgets).
struct Records<D: Device> {
    map: HashMap<String, Entry<D>>,
    ready: usize,
    bytes: usize,
}

impl<D: Device> Records<D> {
    fn take(&mut self, key: &str) -> Option<Entry<D>> {
        let e = self.map.remove(key)?;
        if let EntryState::Ready(rec) = &e.state {
            self.ready -= 1;
            self.bytes -= rec.bytes;
        }
        Some(e)
    }

    fn put(&mut self, key: &str, e: Entry<D>) {
        if let EntryState::Ready(rec) = &e.state {
            self.ready += 1;
            self.bytes += rec.bytes;
        }
        // Keys repeat for every batch of a shape: the string is made once per new key.
        match self.map.get_mut(key) {
            Some(slot) => *slot = e,
            None => {
                self.map.insert(key.to_string(), e);
            }
        }
    }
}

struct Entry<D: Device> {
    state: EntryState<D>,
    /// Runs of the key so far.
    runs: u64,
    /// Abandoned replays so far.
    rerecords: u32,
    /// When the key last ran (a counter of the device's graphed runs), for eviction.
    used: u64,
}

enum EntryState<D: Device> {
    /// Not recorded yet (fewer than `eager_runs` runs).
    Warming,
    Ready(Record<D>),
    /// Runs of this key cannot be graphs (the reason).
    Eager(String),
}

/// A recorded run: its ops in order, the buffers it made, and the graph built from them.
struct Record<D: Device> {
    ops: Vec<Op>,
    bufs: Vec<Arc<D::Buf>>,
    staging: usize,
    /// Device bytes its buffers hold.
    bytes: usize,
    graph: Option<D::Graph>,
}

#[derive(Debug, PartialEq)]
enum Op {
    Alloc {
        buf: usize,
        bytes: usize,
    },
    Upload {
        buf: usize,
        offset: usize,
        len: usize,
    },
    Launch {
        kernel: String,
        cfg: LaunchConfig,
        args: Vec<KernelArg>,
    },
    Fill {
        buf: usize,
        byte: u8,
    },
}

enum Region<D: Device> {
    Record {
        rec: Record<D>,
        /// Set when the run did something a graph cannot hold.
        eager: Option<String>,
    },
    Replay {
        rec: Record<D>,
        next: usize,
        /// Set when the run differed from the record.
        differs: Option<String>,
    },
}

/// A small number per thread (std's `ThreadId` has no stable integer form).
fn thread_number() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local!(static ID: u64 = NEXT.fetch_add(1, Ordering::Relaxed));
    ID.with(|id| *id)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<D: Device> GraphDevice<D> {
    /// With the default [`GraphConfig`].
    pub fn new(inner: Arc<D>) -> GraphDevice<D> {
        Self::with_config(inner, GraphConfig::default())
    }

    pub fn with_config(inner: Arc<D>, config: GraphConfig) -> GraphDevice<D> {
        GraphDevice {
            inner,
            config,
            clock: AtomicU64::new(0),
            owner: AtomicU64::new(0),
            region: Mutex::new(None),
            graphs: Mutex::new(Records {
                map: HashMap::new(),
                ready: 0,
                bytes: 0,
            }),
            stats: Mutex::new(GraphStats::default()),
            capture: RwLock::new(()),
        }
    }

    /// The wrapped device.
    pub fn inner(&self) -> &Arc<D> {
        &self.inner
    }

    pub fn stats(&self) -> GraphStats {
        lock(&self.stats).clone()
    }

    /// Drops every record and graph (their buffers are freed after the work queued on them).
    pub fn clear(&self) {
        let all = {
            let mut g = lock(&self.graphs);
            (g.ready, g.bytes) = (0, 0);
            std::mem::take(&mut g.map)
        };
        drop(all);
    }

    /// Device bytes the records' buffers hold now.
    pub fn held_bytes(&self) -> usize {
        lock(&self.graphs).bytes
    }

    /// Records and graph runs held now (`Ready` entries).
    pub fn records(&self) -> usize {
        lock(&self.graphs).ready
    }

    fn run<R>(&self, key: &str, f: &mut dyn FnMut() -> Result<R>) -> Result<R> {
        let me = thread_number();
        if !self.config.enabled
            || self
                .owner
                .compare_exchange(0, me, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            // Off, or another run is being graphed (or this is a nested call): as usual.
            lock(&self.stats).eager += 1;
            return f();
        }
        // Hands the device back even when `f` panics.
        struct Release<'a, D: Device>(&'a GraphDevice<D>);
        impl<D: Device> Drop for Release<'_, D> {
            fn drop(&mut self) {
                *lock(&self.0.region) = None;
                self.0.owner.store(0, Ordering::Release);
            }
        }
        let _release = Release(self);
        self.run_owned(key, f)
    }

    fn run_owned<R>(&self, key: &str, f: &mut dyn FnMut() -> Result<R>) -> Result<R> {
        let now = self.clock.fetch_add(1, Ordering::Relaxed);
        let mut entry = lock(&self.graphs).take(key).unwrap_or(Entry {
            state: EntryState::Warming,
            runs: 0,
            rerecords: 0,
            used: now,
        });
        entry.runs += 1;
        entry.used = now;
        let state = std::mem::replace(&mut entry.state, EntryState::Warming);
        match state {
            EntryState::Warming if entry.runs <= u64::from(self.config.eager_runs) => {
                self.keep(key, entry);
                lock(&self.stats).eager += 1;
                f()
            }
            EntryState::Warming => self.record(key, entry, f),
            EntryState::Eager(reason) => {
                entry.state = EntryState::Eager(reason);
                self.keep(key, entry);
                lock(&self.stats).eager += 1;
                f()
            }
            EntryState::Ready(rec) => self.replay(key, entry, rec, f),
        }
    }

    /// Puts an entry back, dropping the least recently used records beyond `max_records` or
    /// `max_bytes`.
    fn keep(&self, key: &str, entry: Entry<D>) {
        // Dropped after the lock is released: dropping a record waits for its graph's last run.
        let mut evicted = Vec::new();
        let mut graphs = lock(&self.graphs);
        graphs.put(key, entry);
        // Only over a budget is every key looked at (for the least recently used).
        while graphs.ready > self.config.max_records || graphs.bytes > self.config.max_bytes {
            let oldest = graphs
                .map
                .iter()
                .filter(|(_, e)| matches!(e.state, EntryState::Ready(_)))
                .min_by_key(|(_, e)| e.used)
                .map(|(k, _)| k.clone());
            let Some(mut e) = oldest.and_then(|k| graphs.take(&k).map(|e| (k, e))) else {
                break;
            };
            // Back to warming: its buffers and graph go (freed after queued work).
            evicted.push(std::mem::replace(&mut e.1.state, EntryState::Warming));
            e.1.runs = 0;
            graphs.put(&e.0, e.1);
        }
        drop(graphs);
        drop(evicted);
    }

    fn replay<R>(
        &self,
        key: &str,
        mut entry: Entry<D>,
        rec: Record<D>,
        f: &mut dyn FnMut() -> Result<R>,
    ) -> Result<R> {
        *lock(&self.region) = Some(Region::Replay {
            rec,
            next: 0,
            differs: None,
        });
        let out = f();
        let Some(Region::Replay { rec, next, differs }) = lock(&self.region).take() else {
            unreachable!("the region of a replay stays a replay")
        };
        let differs = differs.or_else(|| {
            (next != rec.ops.len()).then(|| {
                format!(
                    "the run made {next} device calls, its record {}",
                    rec.ops.len()
                )
            })
        });
        match (differs, out) {
            (None, Ok(r)) => {
                let graph = rec.graph.as_ref().expect("a ready record has its graph");
                if let Err(e) = self.inner.launch_graph(graph) {
                    // Not kept: a graph whose launch failed is not trusted again.
                    drop(rec);
                    entry.runs = 0;
                    self.keep(key, entry);
                    return Err(e);
                }
                entry.state = EntryState::Ready(rec);
                self.keep(key, entry);
                lock(&self.stats).replayed += 1;
                Ok(r)
            }
            // Nothing ran on the device; an error of `f` itself comes back as it is.
            (None, Err(e)) => {
                entry.state = EntryState::Ready(rec);
                self.keep(key, entry);
                Err(e)
            }
            (Some(why), _) => {
                // The old record (and its buffers) goes; the run is recorded again, or runs
                // eagerly for good when its runs keep changing.
                drop(rec);
                entry.rerecords += 1;
                {
                    let mut st = lock(&self.stats);
                    st.rerecorded += 1;
                    st.last_reason = Some(format!("{key}: replay abandoned: {why}"));
                }
                if entry.rerecords >= self.config.max_rerecords {
                    entry.state = EntryState::Eager(format!(
                        "{} replays abandoned, the last: {why}",
                        entry.rerecords
                    ));
                    self.keep(key, entry);
                    lock(&self.stats).eager += 1;
                    return f();
                }
                self.record(key, entry, f)
            }
        }
    }

    fn record<R>(
        &self,
        key: &str,
        mut entry: Entry<D>,
        f: &mut dyn FnMut() -> Result<R>,
    ) -> Result<R> {
        *lock(&self.region) = Some(Region::Record {
            rec: Record {
                ops: Vec::new(),
                bufs: Vec::new(),
                staging: 0,
                bytes: 0,
                graph: None,
            },
            eager: None,
        });
        let out = f();
        let Some(Region::Record { mut rec, eager }) = lock(&self.region).take() else {
            unreachable!("the region of a recording stays a recording")
        };
        let r = match out {
            Ok(r) => r,
            Err(e) => {
                // Nothing kept: the next run of the key records again.
                self.keep(key, entry);
                return Err(e);
            }
        };
        lock(&self.stats).recorded += 1;
        rec.bytes = rec.bufs.iter().map(|b| self.inner.len(b)).sum();
        let never = match eager {
            Some(why) => Some(why),
            None if rec.bytes > self.config.max_bytes => Some(format!(
                "its buffers are {} bytes, more than the {} all records may hold",
                rec.bytes, self.config.max_bytes
            )),
            None => None,
        };
        entry.state = match never {
            Some(why) => {
                lock(&self.stats).last_reason = Some(format!("{key}: runs eagerly: {why}"));
                EntryState::Eager(why)
            }
            None => match self.build(&rec) {
                Ok(graph) => {
                    rec.graph = Some(graph);
                    EntryState::Ready(rec)
                }
                // A failure of the device (or one it kept from elsewhere) need not last: the
                // key warms up and records again, until `max_rerecords` such failures.
                Err(e) => {
                    drop(rec);
                    entry.rerecords += 1;
                    entry.runs = 0;
                    let why = format!("building its graph: {e}");
                    lock(&self.stats).last_reason = Some(format!("{key}: {why}"));
                    if entry.rerecords >= self.config.max_rerecords {
                        EntryState::Eager(why)
                    } else {
                        EntryState::Warming
                    }
                }
            },
        };
        self.keep(key, entry);
        Ok(r)
    }

    fn build(&self, rec: &Record<D>) -> Result<D::Graph> {
        let steps: Vec<GraphStep<'_, D::Buf>> = rec
            .ops
            .iter()
            .filter_map(|op| match op {
                Op::Alloc { .. } => None,
                Op::Upload { buf, offset, len } => Some(GraphStep::Upload {
                    dst: &*rec.bufs[*buf],
                    offset: *offset,
                    len: *len,
                }),
                Op::Launch { kernel, cfg, args } => Some(GraphStep::Launch {
                    kernel,
                    cfg: *cfg,
                    args,
                }),
                Op::Fill { buf, byte } => Some(GraphStep::Fill {
                    dst: &*rec.bufs[*buf],
                    byte: *byte,
                }),
            })
            .collect();
        let _alone = self.capture.write().unwrap_or_else(|p| p.into_inner());
        // SAFETY: every launch was made by the recorded run under `launch`'s contract; the
        // buffers its arguments name are the record's own (kept with the graph) or outlive it:
        // a replay compares every launch's arguments with the live run's before launching the
        // graph, so a graph only runs while the buffers it names are those of a live run.
        unsafe { self.inner.build_graph(&steps, rec.staging) }
    }

    /// Whether the calling thread's run is being recorded or replayed.
    fn mine(&self) -> bool {
        self.owner.load(Ordering::Acquire) == thread_number()
    }

    /// An op of another thread (or outside any run): through to the device, held off while a
    /// graph is built.
    fn pass<T>(&self, op: impl FnOnce() -> Result<T>) -> Result<T> {
        let _shared = self.capture.read().unwrap_or_else(|p| p.into_inner());
        op()
    }

    /// What a replay does when the run differs from its record: remember why and stop the run.
    fn differs(differs: &mut Option<String>, why: String) -> Error {
        let e = Error::device("graph", "replaying a recorded run", why.clone());
        differs.get_or_insert(why);
        e
    }

    /// An op a graph cannot hold (a read back, an event): eager in a recording (which then
    /// stays eager), a difference in a replay.
    fn not_in_graph<T>(&self, what: &str, op: impl FnOnce() -> Result<T>) -> Result<T> {
        if self.mine() {
            let mut region = lock(&self.region);
            match region.as_mut() {
                Some(Region::Record { eager, .. }) => {
                    eager.get_or_insert_with(|| format!("the run does a {what}"));
                }
                Some(Region::Replay { differs, .. }) => {
                    return Err(Self::differs(
                        differs,
                        format!("the run does a {what}, its record did not"),
                    ));
                }
                None => {}
            }
            drop(region);
            return op();
        }
        self.pass(op)
    }
}

impl<D: Device> Device for GraphDevice<D> {
    type Buf = GraphBuf<D::Buf>;

    fn name(&self) -> &'static str {
        self.inner.name()
    }

    /// The wrapped device's, marked when runs are graphed (a profile measured with graphs
    /// does not describe runs without them).
    fn describe(&self) -> String {
        match self.config.enabled {
            true => format!("{} (graphs)", self.inner.describe()),
            false => self.inner.describe(),
        }
    }

    fn alloc(&self, bytes: usize) -> Result<Self::Buf> {
        if !self.mine() {
            return self.pass(|| Ok(GraphBuf(Arc::new(self.inner.alloc(bytes)?))));
        }
        let mut region = lock(&self.region);
        match region.as_mut() {
            Some(Region::Record { rec, .. }) => {
                let b = Arc::new(self.inner.alloc(bytes)?);
                rec.ops.push(Op::Alloc {
                    buf: rec.bufs.len(),
                    bytes,
                });
                rec.bufs.push(b.clone());
                Ok(GraphBuf(b))
            }
            Some(Region::Replay { rec, next, differs }) => match rec.ops.get(*next) {
                Some(&Op::Alloc { buf, bytes: b }) if b == bytes => {
                    *next += 1;
                    Ok(GraphBuf(rec.bufs[buf].clone()))
                }
                other => Err(Self::differs(
                    differs,
                    format!(
                        "call {}: an allocation of {bytes} bytes, recorded {other:?}",
                        *next
                    ),
                )),
            },
            None => Ok(GraphBuf(Arc::new(self.inner.alloc(bytes)?))),
        }
    }

    fn upload(&self, bytes: &[u8]) -> Result<Self::Buf> {
        if !self.mine() {
            return self.pass(|| Ok(GraphBuf(Arc::new(self.inner.upload(bytes)?))));
        }
        let mut region = lock(&self.region);
        match region.as_mut() {
            Some(Region::Record { rec, .. }) => {
                let b = Arc::new(self.inner.upload(bytes)?);
                rec.ops.push(Op::Upload {
                    buf: rec.bufs.len(),
                    offset: rec.staging,
                    len: bytes.len(),
                });
                rec.staging += bytes.len();
                rec.bufs.push(b.clone());
                Ok(GraphBuf(b))
            }
            Some(Region::Replay { rec, next, differs }) => match rec.ops.get(*next) {
                Some(&Op::Upload { buf, offset, len }) if len == bytes.len() => {
                    let graph = rec.graph.as_ref().expect("a ready record has its graph");
                    self.inner.stage(graph, offset, bytes)?;
                    *next += 1;
                    Ok(GraphBuf(rec.bufs[buf].clone()))
                }
                other => Err(Self::differs(
                    differs,
                    format!(
                        "call {}: an upload of {} bytes, recorded {other:?}",
                        *next,
                        bytes.len()
                    ),
                )),
            },
            None => Ok(GraphBuf(Arc::new(self.inner.upload(bytes)?))),
        }
    }

    fn download(&self, buf: &Self::Buf, out: &mut [u8]) -> Result<()> {
        self.not_in_graph("download", || self.inner.download(&buf.0, out))
    }

    fn fill(&self, buf: &Self::Buf, byte: u8) -> Result<()> {
        if !self.mine() {
            return self.pass(|| self.inner.fill(&buf.0, byte));
        }
        let mut region = lock(&self.region);
        match region.as_mut() {
            Some(Region::Record { rec, eager }) => {
                self.inner.fill(&buf.0, byte)?;
                match rec.bufs.iter().position(|b| Arc::ptr_eq(b, &buf.0)) {
                    Some(i) => rec.ops.push(Op::Fill { buf: i, byte }),
                    None => {
                        eager.get_or_insert_with(|| {
                            "the run fills a buffer made outside it".to_string()
                        });
                    }
                }
                Ok(())
            }
            Some(Region::Replay { rec, next, differs }) => match rec.ops.get(*next) {
                Some(&Op::Fill { buf: i, byte: b })
                    if b == byte && Arc::ptr_eq(&rec.bufs[i], &buf.0) =>
                {
                    *next += 1;
                    Ok(())
                }
                other => Err(Self::differs(
                    differs,
                    format!("call {}: a fill, recorded {other:?}", *next),
                )),
            },
            None => self.inner.fill(&buf.0, byte),
        }
    }

    fn address(&self, buf: &Self::Buf) -> u64 {
        self.inner.address(&buf.0)
    }

    fn len(&self, buf: &Self::Buf) -> usize {
        self.inner.len(&buf.0)
    }

    unsafe fn launch(&self, kernel: &str, cfg: LaunchConfig, args: &[KernelArg]) -> Result<()> {
        if !self.mine() {
            // SAFETY: the caller's contract, passed on.
            return self.pass(|| unsafe { self.inner.launch(kernel, cfg, args) });
        }
        let mut region = lock(&self.region);
        match region.as_mut() {
            Some(Region::Record { rec, .. }) => {
                // SAFETY: the caller's contract, passed on.
                unsafe { self.inner.launch(kernel, cfg, args) }?;
                rec.ops.push(Op::Launch {
                    kernel: kernel.to_string(),
                    cfg,
                    args: args.to_vec(),
                });
                Ok(())
            }
            Some(Region::Replay { rec, next, differs }) => match rec.ops.get(*next) {
                Some(Op::Launch {
                    kernel: k,
                    cfg: c,
                    args: a,
                }) if k == kernel && *c == cfg && a == args => {
                    *next += 1;
                    Ok(())
                }
                other => Err(Self::differs(
                    differs,
                    format!(
                        "call {}: a launch of `{kernel}` {cfg:?}, recorded {other:?}",
                        *next
                    ),
                )),
            },
            // SAFETY: the caller's contract, passed on.
            None => unsafe { self.inner.launch(kernel, cfg, args) },
        }
    }

    fn synchronize(&self) -> Result<()> {
        self.not_in_graph("synchronisation", || self.inner.synchronize())
    }

    type Pinned = D::Pinned;

    fn alloc_pinned(&self, bytes: usize) -> Result<D::Pinned> {
        self.not_in_graph("pinned allocation", || self.inner.alloc_pinned(bytes))
    }

    fn download_async(&self, buf: &Self::Buf, dst: &mut D::Pinned) -> Result<()> {
        self.not_in_graph("download", || self.inner.download_async(&buf.0, dst))
    }

    fn read_pinned(&self, p: &D::Pinned) -> Result<Vec<u8>> {
        self.not_in_graph("read of pinned memory", || self.inner.read_pinned(p))
    }

    type Event = D::Event;

    fn record_event(&self) -> Result<D::Event> {
        self.not_in_graph("event", || self.inner.record_event())
    }

    fn wait_event(&self, event: &D::Event) -> Result<()> {
        self.not_in_graph("wait for an event", || self.inner.wait_event(event))
    }

    fn elapsed_ms(&self, start: &D::Event, end: &D::Event) -> Result<f64> {
        self.not_in_graph("wait for an event", || self.inner.elapsed_ms(start, end))
    }

    type Graph = D::Graph;

    unsafe fn build_graph(
        &self,
        steps: &[GraphStep<'_, Self::Buf>],
        staging: usize,
    ) -> Result<D::Graph> {
        let steps: Vec<GraphStep<'_, D::Buf>> = steps
            .iter()
            .map(|s| match *s {
                GraphStep::Launch { kernel, cfg, args } => GraphStep::Launch { kernel, cfg, args },
                GraphStep::Upload { dst, offset, len } => GraphStep::Upload {
                    dst: &*dst.0,
                    offset,
                    len,
                },
                GraphStep::Fill { dst, byte } => GraphStep::Fill { dst: &*dst.0, byte },
            })
            .collect();
        let _alone = self.capture.write().unwrap_or_else(|p| p.into_inner());
        // SAFETY: the caller's contract, passed on.
        unsafe { self.inner.build_graph(&steps, staging) }
    }

    fn stage(&self, graph: &D::Graph, offset: usize, bytes: &[u8]) -> Result<()> {
        self.inner.stage(graph, offset, bytes)
    }

    fn launch_graph(&self, graph: &D::Graph) -> Result<()> {
        self.not_in_graph("graph launch", || self.inner.launch_graph(graph))
    }

    /// Recorded the first time after [`GraphConfig::eager_runs`] runs, replayed as one graph
    /// launch afterwards (see the module documentation for what `f` may do and how long what
    /// it returns stays valid).
    fn graphed<R>(&self, key: &str, f: &mut dyn FnMut() -> Result<R>) -> Result<R> {
        self.run(key, f)
    }

    fn graph_stats(&self) -> Option<GraphStats> {
        Some(self.stats())
    }

    fn graphs_enabled(&self) -> bool {
        self.config.enabled
    }

    fn has_wgmma(&self) -> bool {
        self.inner.has_wgmma()
    }

    fn multiprocessors(&self) -> Option<usize> {
        self.inner.multiprocessors()
    }

    /// Made on the host, nothing queued: the same in every kind of run.
    fn tensor_map(&self, spec: &TensorMapSpec) -> Result<TensorMap> {
        self.inner.tensor_map(spec)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::backbone::{Backbone, BatchInput};
    use crate::backend::emu::{EmuConfig, EmuDevice};
    use crate::backend::gpu::GpuBackend;
    use crate::backend::{Activation, Backend};
    use crate::models::bert::synthetic::{tiny_config, write_random_bert};
    use crate::models::bert::{Bert, EncoderInput};
    use crate::rng::SplitMix;
    use crate::tensor::DType;

    fn emu() -> Arc<EmuDevice> {
        Arc::new(EmuDevice::new(EmuConfig::default()).unwrap())
    }

    /// A graph device that records a key's first run (no eager warm-up runs).
    fn recording<D: Device>(dev: Arc<D>) -> Arc<GraphDevice<D>> {
        Arc::new(GraphDevice::with_config(
            dev,
            GraphConfig {
                eager_runs: 0,
                ..GraphConfig::default()
            },
        ))
    }

    fn rand(rng: &mut SplitMix, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.uniform() * 2.0 - 1.0).collect()
    }

    /// A small chain of ops on `be`, its input uploaded inside (as a model's token ids are):
    /// linear + GELU, residual + LayerNorm, softmax; `rows` of 32.
    fn chain<B: Backend>(be: &B, w: &[B::Tensor; 4], x: &[f32], rows: usize) -> Result<B::Tensor> {
        let x = be.upload(x, &[rows, 32])?;
        let y = be.linear(&x, &w[0], Some(&w[1]), Activation::GeluErf)?;
        let z = be.add_layernorm(&y, &x, &w[2], &w[3], 1e-5)?;
        be.softmax(&z)
    }

    fn weights<B: Backend>(be: &B, seed: u64) -> [B::Tensor; 4] {
        let mut rng = SplitMix::new(seed);
        [
            be.upload(&rand(&mut rng, 32 * 32), &[32, 32]).unwrap(),
            be.upload(&rand(&mut rng, 32), &[32]).unwrap(),
            be.upload(&rand(&mut rng, 32), &[32]).unwrap(),
            be.upload(&rand(&mut rng, 32), &[32]).unwrap(),
        ]
    }

    #[test]
    fn replays_compute_what_the_eager_runs_compute() {
        check_replays(emu());
    }

    /// Four calls of one key (one recording, three replays) against the plain device, in f32
    /// and f16, each call's output new. Also run on a real GPU (`backend::cuda` tests).
    pub(crate) fn check_replays<D: Device>(dev: Arc<D>) {
        let graphs = recording(dev.clone());
        for dtype in [DType::F32, DType::F16] {
            graphs.clear();
            let before = graphs.stats();
            let plain = GpuBackend::shared(dev.clone(), dtype);
            let be = GpuBackend::shared(graphs.clone(), dtype);
            let (wp, wg) = (weights(&plain, 1), weights(&be, 1));
            let mut rng = SplitMix::new(2);
            let mut last = Vec::new();
            for call in 0..4 {
                let x = rand(&mut rng, 5 * 32);
                let want = plain.download(&chain(&plain, &wp, &x, 5).unwrap()).unwrap();
                let out = graphs
                    .graphed("chain", &mut || chain(&be, &wg, &x, 5))
                    .unwrap();
                let got = be.download(&out).unwrap();
                assert_eq!(got, want, "{dtype} call {call}");
                assert_ne!(
                    got, last,
                    "{dtype} call {call}: the output of the call before"
                );
                last = got;
            }
            let s = graphs.stats();
            assert_eq!(s.recorded - before.recorded, 1, "{dtype}: {s:?}");
            assert_eq!(s.replayed - before.replayed, 3, "{dtype}: {s:?}");
            assert_eq!(s.rerecorded, before.rerecorded, "{dtype}: {s:?}");
        }
    }

    #[test]
    fn a_run_that_changes_is_recorded_again_and_still_right() {
        let dev = emu();
        let graphs = recording(dev.clone());
        let plain = GpuBackend::shared(dev.clone(), DType::F32);
        let be = GpuBackend::shared(graphs.clone(), DType::F32);
        let (wp, wg) = (weights(&plain, 3), weights(&be, 3));
        let mut rng = SplitMix::new(4);
        // 5 rows, then 7 under the same key (other sizes: the replay differs at its first
        // allocation), then 7 again (replayed from the new record).
        for (call, rows) in [5, 7, 7].into_iter().enumerate() {
            let x = rand(&mut rng, rows * 32);
            let want = plain
                .download(&chain(&plain, &wp, &x, rows).unwrap())
                .unwrap();
            let out = graphs
                .graphed("k", &mut || chain(&be, &wg, &x, rows))
                .unwrap();
            assert_eq!(be.download(&out).unwrap(), want, "call {call}");
        }
        let s = graphs.stats();
        assert_eq!((s.recorded, s.replayed, s.rerecorded), (2, 1, 1), "{s:?}");
        let why = s.last_reason.unwrap();
        assert!(
            why.contains("k: replay abandoned") && why.contains("upload"),
            "{why}"
        );
    }

    #[test]
    fn a_run_that_reads_back_stays_eager() {
        let dev = emu();
        let graphs = recording(dev.clone());
        let be = GpuBackend::shared(graphs.clone(), DType::F32);
        let w = weights(&be, 5);
        let mut rng = SplitMix::new(6);
        let mut outs = Vec::new();
        for _ in 0..3 {
            let x = rand(&mut rng, 2 * 32);
            let mut run = || be.download(&chain(&be, &w, &x, 2)?);
            outs.push(graphs.graphed("reads", &mut run).unwrap());
            // The same on the plain path (outside any graph).
            assert_eq!(
                outs.last().unwrap(),
                &be.download(&chain(&be, &w, &x, 2).unwrap()).unwrap()
            );
        }
        let s = graphs.stats();
        assert_eq!((s.recorded, s.replayed, s.eager), (1, 0, 2), "{s:?}");
        // A backend's download waits for the stream first.
        let why = s.last_reason.unwrap();
        assert!(
            why.contains("reads: runs eagerly: the run does a synchronisation"),
            "{why}"
        );
    }

    #[test]
    fn an_error_of_the_run_comes_back_and_records_nothing() {
        let dev = emu();
        let graphs = recording(dev);
        let be = GpuBackend::shared(graphs.clone(), DType::F32);
        let w = weights(&be, 7);
        // A 31-wide input against 32-wide weights: refused by the op checks.
        let e = graphs
            .graphed("bad", &mut || {
                let x = be.upload(&[0.5; 31], &[1, 31])?;
                be.linear(&x, &w[0], None, Activation::None)
            })
            .err()
            .unwrap();
        assert!(e.to_string().contains("linear"), "{e}");
        assert_eq!(graphs.stats().recorded, 0);
        // A nested call runs eagerly inside the outer one's recording.
        let x = [0.25; 32];
        let out = graphs
            .graphed("outer", &mut || {
                graphs.graphed("inner", &mut || chain(&be, &w, &x, 1))
            })
            .unwrap();
        assert_eq!(be.download(&out).unwrap().len(), 32);
        let s = graphs.stats();
        assert_eq!((s.recorded, s.eager), (1, 1), "{s:?}");
    }

    #[test]
    fn warm_up_runs_eviction_and_keys_that_keep_changing() {
        let dev = emu();
        let config = GraphConfig {
            eager_runs: 1,
            max_records: 2,
            max_rerecords: 2,
            ..GraphConfig::default()
        };
        let graphs = Arc::new(GraphDevice::with_config(dev.clone(), config));
        let plain = GpuBackend::shared(dev.clone(), DType::F32);
        let be = GpuBackend::shared(graphs.clone(), DType::F32);
        let (wp, wg) = (weights(&plain, 9), weights(&be, 9));
        let mut rng = SplitMix::new(10);
        let mut run = |key: &str, rows: usize| {
            let x = rand(&mut rng, rows * 32);
            let want = plain
                .download(&chain(&plain, &wp, &x, rows).unwrap())
                .unwrap();
            let out = graphs
                .graphed(key, &mut || chain(&be, &wg, &x, rows))
                .unwrap();
            assert_eq!(be.download(&out).unwrap(), want, "{key}, {rows} rows");
            graphs.stats()
        };
        // A key's first run is eager, its second recorded, its third replayed.
        let s = run("a", 1);
        assert_eq!((s.eager, s.recorded, s.replayed), (1, 0, 0), "{s:?}");
        run("a", 1);
        let s = run("a", 1);
        assert_eq!((s.eager, s.recorded, s.replayed), (1, 1, 1), "{s:?}");
        // Two more keys recorded: at most two records, "a" (least recently used) goes.
        for key in ["b", "c"] {
            run(key, 2);
            run(key, 2);
        }
        assert_eq!(graphs.records(), 2);
        let s = run("a", 1);
        assert_eq!(s.recorded, 3, "a warms up again: {s:?}");
        // A key whose runs keep changing: after two abandoned replays it stays eager.
        for rows in [3, 3, 4, 5] {
            run("d", rows);
        }
        let s = run("d", 6);
        assert_eq!(s.rerecorded, 2, "{s:?}");
        assert!(
            s.last_reason
                .as_deref()
                .unwrap_or("")
                .contains("d: replay abandoned"),
            "{s:?}"
        );
        let eager = s.eager;
        assert_eq!(run("d", 7).eager, eager + 1);
        // A byte budget: room for one record of "e" (4 rows), so "f" replaces it; a run
        // bigger than the whole budget stays eager.
        graphs.clear();
        run("e", 4);
        run("e", 4);
        let one = graphs.held_bytes();
        assert!(one > 4 * 32 * 4, "{one} bytes held");
        let small = GraphConfig {
            eager_runs: 0,
            max_bytes: one + one / 2,
            ..GraphConfig::default()
        };
        let budget = Arc::new(GraphDevice::with_config(dev.clone(), small));
        let be2 = GpuBackend::shared(budget.clone(), DType::F32);
        let w2 = weights(&be2, 9);
        let x = rand(&mut SplitMix::new(11), 40 * 32);
        for (key, rows) in [("e", 4), ("f", 4)] {
            budget
                .graphed(key, &mut || chain(&be2, &w2, &x[..rows * 32], rows))
                .unwrap();
            assert_eq!((budget.records(), budget.held_bytes()), (1, one), "{key}");
        }
        budget
            .graphed("g", &mut || chain(&be2, &w2, &x, 40))
            .unwrap();
        let s = budget.stats();
        assert!(
            s.last_reason
                .as_deref()
                .unwrap_or("")
                .contains("g: runs eagerly: its buffers are"),
            "{s:?}"
        );
        assert_eq!(budget.records(), 1);
        // Switched off: every run eager, nothing recorded.
        let off = GraphDevice::with_config(
            dev,
            GraphConfig {
                enabled: false,
                ..GraphConfig::default()
            },
        );
        for _ in 0..3 {
            off.graphed("x", &mut || Ok(())).unwrap();
        }
        assert_eq!((off.stats().eager, off.stats().recorded), (3, 0));
    }

    #[test]
    fn a_cnns_stages_are_graphed_and_match_the_plain_ones() {
        check_cnn(emu());
    }

    /// The committed MNIST ResNet stage by stage, as the engine runs it, graphed per (stage,
    /// batch) against the plain device: pixels uploaded inside the first stage's graph, every
    /// stage's output read in between.
    pub(crate) fn check_cnn<D: Device>(dev: Arc<D>) {
        // The build's checkout, else the current directory: the GPU check runs this test's
        // binary from the root of a copy of the tree that need not sit where it was built.
        let rel = "weights/mnist-resnet.apparate";
        let built = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
        let path = if built.exists() {
            built
        } else {
            std::path::PathBuf::from(rel)
        };
        let file = crate::format::ModelFile::open(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let graphs = recording(dev.clone());
        for dtype in [DType::F32, DType::F16] {
            let before = graphs.stats();
            let plain = Backbone::load(GpuBackend::shared(dev.clone(), dtype), &file).unwrap();
            let staged = Backbone::load(GpuBackend::shared(graphs.clone(), dtype), &file).unwrap();
            let i = staged.image_input().unwrap();
            let (h, w, c) = (i.height, i.width, i.channels);
            let mut rng = SplitMix::new(12);
            for call in 0..3 {
                let pixels: Vec<f32> = (0..3 * h * w * c).map(|_| rng.uniform()).collect();
                let input = staged.prepare_images(pixels, 3).unwrap();
                let (want, got) = (
                    stage_outputs(&plain, &input),
                    stage_outputs(&staged, &input),
                );
                assert_eq!(got, want, "{dtype} call {call}");
            }
            let s = graphs.stats();
            let stages = staged.num_stages() as u64;
            assert_eq!(s.recorded - before.recorded, stages, "{dtype}: {s:?}");
            assert_eq!(s.replayed - before.replayed, 2 * stages, "{dtype}: {s:?}");
        }
    }

    /// Every stage's output of `input`, run as the engine runs it (`run_stages`, each output
    /// read before the next stage).
    fn stage_outputs<B: Backend>(bb: &Backbone<B>, input: &BatchInput) -> Vec<Vec<f32>> {
        let mut out = Vec::new();
        bb.run_stages(input, |_, o| {
            out.push(bb.backend().download(&o.x)?);
            Ok(())
        })
        .unwrap();
        out
    }

    /// Two sequences of 8 positions (one bucket) with `lens` valid tokens of random words.
    fn bucket_input(rng: &mut SplitMix, lens: [usize; 2]) -> EncoderInput {
        let ids: Vec<Vec<u32>> = lens
            .iter()
            .map(|&n| {
                (0..8)
                    .map(|p| if p < n { 4 + rng.below(10) as u32 } else { 0 })
                    .collect()
            })
            .collect();
        let masks: Vec<Vec<u32>> = lens
            .iter()
            .map(|&n| (0..8).map(|p| u32::from(p < n)).collect())
            .collect();
        EncoderInput::from_ids_and_masks(&ids, &masks, 0).unwrap()
    }

    #[test]
    fn sequence_buckets_are_few_and_pad_little() {
        let want = [
            (1, 8),
            (8, 8),
            (9, 16),
            (64, 64),
            (65, 80),
            (127, 128),
            (129, 160),
        ];
        for (seq, b) in want {
            assert_eq!(seq_bucket(seq), b, "{seq}");
        }
        assert_eq!(
            (seq_bucket(500), seq_bucket(512), seq_bucket(513)),
            (512, 512, 640)
        );
        let mut buckets = std::collections::BTreeSet::new();
        for seq in 1..=4096 {
            let b = seq_bucket(seq);
            assert!(b >= seq && seq_bucket(b) == b, "{seq} -> {b}");
            assert!(
                b - seq < 8 || (b - seq) * 4 < seq,
                "{seq} -> {b}: too much padding"
            );
            assert!(seq_bucket(seq + 1) >= b, "not monotone at {seq}");
            if seq <= 512 {
                buckets.insert(b);
            }
        }
        assert_eq!(buckets.len(), 20);
    }

    /// Where stages are graphed, a text batch is padded to its length bucket (so a few graphs
    /// serve every batch) and answers as the unpadded batch does on the plain device and on
    /// the CPU; with graphs off, or on the CPU, nothing is padded.
    #[test]
    fn graphed_text_batches_are_padded_to_buckets_and_answer_alike() {
        let dir = std::env::temp_dir().join(format!("apparate-bucket-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tiny.apparate");
        write_random_bert(&path, &tiny_config(), Some(3), DType::F32, 12).unwrap();
        let file = crate::format::ModelFile::open(&path).unwrap();
        let off = Arc::new(GraphDevice::with_config(
            emu(),
            GraphConfig {
                enabled: false,
                ..GraphConfig::default()
            },
        ));
        let staged =
            Backbone::load(GpuBackend::shared(recording(emu()), DType::F32), &file).unwrap();
        let eager = Backbone::load(GpuBackend::shared(off, DType::F32), &file).unwrap();
        let plain = Backbone::load(GpuBackend::shared(emu(), DType::F32), &file).unwrap();
        let cpu = Backbone::load(
            crate::backend::CpuBackend::new(crate::backend::CpuConfig::default()).unwrap(),
            &file,
        )
        .unwrap();
        fn text<B: Backend>(bb: &Backbone<B>, t: &[&str]) -> EncoderInput {
            match bb.prepare_texts(t).unwrap() {
                BatchInput::Text(e) => e,
                _ => unreachable!(),
            }
        }
        fn last<B: Backend>(bb: &Backbone<B>, input: &EncoderInput) -> Vec<f32> {
            stage_outputs(bb, &BatchInput::Text(input.clone()))
                .pop()
                .unwrap()
        }
        let batches: [&[&str]; 3] = [
            &["the cat", "a dog ran far"],
            &["the cat sat on the mat . the dog ran far", "cat"],
            &["dogs"],
        ];
        for texts in batches {
            let base = text(&cpu, texts);
            let padded = text(&staged, texts);
            assert_eq!(text(&plain, texts), base, "{texts:?}");
            assert_eq!(text(&eager, texts), base, "{texts:?}: graphs off");
            assert_eq!(padded.shape.lengths, base.shape.lengths);
            assert_eq!(padded.shape.seq, seq_bucket(base.shape.seq), "{texts:?}");
            assert!(padded.shape.seq > base.shape.seq, "{texts:?}: not padded");
            let mut by_hand = base.clone();
            by_hand.pad_to(padded.shape.seq, 0);
            assert_eq!(by_hand, padded);
            let want = last(&cpu, &base);
            for (what, got) in [
                ("graphed, padded", last(&staged, &padded)),
                ("plain device", last(&plain, &base)),
                ("cpu, padded", last(&cpu, &padded)),
            ] {
                assert_eq!(got.len(), want.len());
                let err = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                assert!(err < 1e-5, "{texts:?} {what}: differs by {err}");
            }
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    /// The whole MiniLM-shaped path: a random BERT with a head, inputs of one (batch, seq)
    /// bucket with different tokens and lengths, graphed against the plain backend.
    #[test]
    fn a_graphed_bert_forward_matches_the_plain_one() {
        check_bert(emu());
    }

    pub(crate) fn check_bert<D: Device>(dev: Arc<D>) {
        let dir = std::env::temp_dir().join(format!("apparate-graph-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tiny.apparate");
        write_random_bert(&path, &tiny_config(), Some(3), DType::F32, 11).unwrap();
        let file = crate::format::ModelFile::open(&path).unwrap();
        let graphs = recording(dev.clone());
        let plain = Bert::load(GpuBackend::shared(dev.clone(), DType::F16), &file).unwrap();
        let model = Bert::load(GpuBackend::shared(graphs.clone(), DType::F16), &file).unwrap();
        let mut rng = SplitMix::new(8);
        for call in 0..3 {
            let lens = [8, 1 + rng.below(8)];
            let input = bucket_input(&mut rng, lens);
            let want = plain.forward(&input).unwrap();
            let (pooled, probs) = graphs
                .graphed("bert 2x8", &mut || model.forward_tensors(&input))
                .unwrap();
            let got = model.output(&input, &pooled, probs.as_ref()).unwrap();
            assert_eq!(
                got.embeddings, want.embeddings,
                "call {call}, lengths {lens:?}"
            );
            assert_eq!(got.probs, want.probs, "call {call}, lengths {lens:?}");
        }
        let s = graphs.stats();
        assert_eq!((s.recorded, s.replayed), (1, 2), "{s:?}");
        // The same model as the engine runs it: stage by stage (`Backbone::run_stages`, each
        // stage graphed per batch and sequence size), every stage's output read in between
        // as ramps and features read them.
        let plain = Backbone::load(GpuBackend::shared(dev.clone(), DType::F16), &file).unwrap();
        let staged = Backbone::load(GpuBackend::shared(graphs.clone(), DType::F16), &file).unwrap();
        let stages = staged.num_stages() as u64;
        for call in 0..3 {
            let lens = [1 + rng.below(8), 8];
            let input = BatchInput::Text(bucket_input(&mut rng, lens));
            let (want, got) = (
                stage_outputs(&plain, &input),
                stage_outputs(&staged, &input),
            );
            assert_eq!(got, want, "staged call {call}, lengths {lens:?}");
        }
        let t = graphs.stats();
        assert_eq!(t.recorded - s.recorded, stages, "{t:?}");
        assert_eq!(t.replayed - s.replayed, 2 * stages, "{t:?}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
