//! Graphs of recorded runs: a device wrapper that turns a repeated sequence of launches (a
//! model's forward at one batch and sequence size, say) into one graph launch.
//!
//! [`GraphDevice::graphed`] runs a closure of device work under a key. The first run of a key
//! is **recorded**: it runs as usual, and every allocation, upload, launch and fill it makes is
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
//!   same key overwrites them (download or copy them first, as [`crate::models::bert`] does);
//! - one run at a time is graphed per device; work other threads queue meanwhile runs as
//!   usual, and waits while a graph is being built (a CUDA stream capture must not see it).
//!
//! The recorded buffers of every key stay allocated until [`GraphDevice::clear`] or the drop
//! of the device: at MiniLM's batch 8 x 128 tokens in f16 about 60 MB per key.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use super::device::{Device, GraphStep, KernelArg, LaunchConfig};
use crate::error::{Error, Result};

/// A buffer of a [`GraphDevice`]: shared, so that a record keeps it alive after the op that
/// made it drops its tensor.
pub struct GraphBuf<B>(Arc<B>);

/// What the graphs of a [`GraphDevice`] have done so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
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

/// A device that can record and replay runs of [`GraphDevice::graphed`]; every other use
/// passes through to the wrapped device.
pub struct GraphDevice<D: Device> {
    inner: Arc<D>,
    /// The thread whose run is being recorded or replayed (0: none).
    owner: AtomicU64,
    region: Mutex<Option<Region<D>>>,
    graphs: Mutex<HashMap<String, Entry<D>>>,
    stats: Mutex<GraphStats>,
    /// Other threads' ops hold it shared; building a graph holds it alone.
    capture: RwLock<()>,
}

enum Entry<D: Device> {
    Ready(Record<D>),
    /// Runs of this key cannot be graphs (the reason).
    Eager(String),
}

/// A recorded run: its ops in order, the buffers it made, and the graph built from them.
struct Record<D: Device> {
    ops: Vec<Op>,
    bufs: Vec<Arc<D::Buf>>,
    staging: usize,
    graph: Option<D::Graph>,
}

#[derive(Debug, PartialEq)]
enum Op {
    Alloc { buf: usize, bytes: usize },
    Upload { buf: usize, offset: usize, len: usize },
    Launch {
        kernel: String,
        cfg: LaunchConfig,
        args: Vec<KernelArg>,
    },
    Fill { buf: usize, byte: u8 },
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
    pub fn new(inner: Arc<D>) -> GraphDevice<D> {
        GraphDevice {
            inner,
            owner: AtomicU64::new(0),
            region: Mutex::new(None),
            graphs: Mutex::new(HashMap::new()),
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
        lock(&self.graphs).clear();
    }

    /// Runs `f` (device work through this device) as a graph of key `key`: recorded the first
    /// time, replayed as one graph launch afterwards (see the module documentation for what
    /// `f` may do and how long what it returns stays valid).
    pub fn graphed<R>(&self, key: &str, mut f: impl FnMut() -> Result<R>) -> Result<R> {
        let me = thread_number();
        if self
            .owner
            .compare_exchange(0, me, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            // Another run is being graphed (or this is a nested call): run as usual.
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
        self.graphed_owned(key, &mut f)
    }

    fn graphed_owned<R>(&self, key: &str, f: &mut impl FnMut() -> Result<R>) -> Result<R> {
        let entry = lock(&self.graphs).remove(key);
        let rec = match entry {
            Some(Entry::Eager(reason)) => {
                lock(&self.graphs).insert(key.to_string(), Entry::Eager(reason));
                lock(&self.stats).eager += 1;
                return f();
            }
            Some(Entry::Ready(rec)) => Some(rec),
            None => None,
        };
        if let Some(rec) = rec {
            *lock(&self.region) = Some(Region::Replay {
                rec,
                next: 0,
                differs: None,
            });
            let out = f();
            let Some(Region::Replay {
                rec,
                next,
                differs,
            }) = lock(&self.region).take()
            else {
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
                    let launched = self.inner.launch_graph(graph);
                    lock(&self.graphs).insert(key.to_string(), Entry::Ready(rec));
                    launched?;
                    lock(&self.stats).replayed += 1;
                    return Ok(r);
                }
                // Nothing ran on the device; an error of `f` itself comes back as it is.
                (None, Err(e)) => {
                    lock(&self.graphs).insert(key.to_string(), Entry::Ready(rec));
                    return Err(e);
                }
                (Some(why), _) => {
                    // The old record (and its buffers) goes; the run is recorded again.
                    let mut st = lock(&self.stats);
                    st.rerecorded += 1;
                    st.last_reason = Some(format!("{key}: replay abandoned: {why}"));
                }
            }
        }
        self.record(key, f)
    }

    fn record<R>(&self, key: &str, f: &mut impl FnMut() -> Result<R>) -> Result<R> {
        *lock(&self.region) = Some(Region::Record {
            rec: Record {
                ops: Vec::new(),
                bufs: Vec::new(),
                staging: 0,
                graph: None,
            },
            eager: None,
        });
        let out = f();
        let Some(Region::Record { mut rec, eager }) = lock(&self.region).take() else {
            unreachable!("the region of a recording stays a recording")
        };
        let r = out?;
        lock(&self.stats).recorded += 1;
        let built = match eager {
            Some(why) => Err(why),
            None => self.build(&rec).map_err(|e| format!("building its graph: {e}")),
        };
        let entry = match built {
            Ok(graph) => {
                rec.graph = Some(graph);
                Entry::Ready(rec)
            }
            Err(why) => {
                lock(&self.stats).last_reason = Some(format!("{key}: runs eagerly: {why}"));
                Entry::Eager(why)
            }
        };
        lock(&self.graphs).insert(key.to_string(), entry);
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

    fn describe(&self) -> String {
        format!("{} (graphs)", self.inner.describe())
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
                    format!("call {}: an allocation of {bytes} bytes, recorded {other:?}", *next),
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
}

#[cfg(test)]
mod tests {
    use super::*;
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
        let dev = emu();
        let graphs = Arc::new(GraphDevice::new(dev.clone()));
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
                let out = graphs.graphed("chain", || chain(&be, &wg, &x, 5)).unwrap();
                let got = be.download(&out).unwrap();
                assert_eq!(got, want, "{dtype} call {call}");
                assert_ne!(got, last, "{dtype} call {call}: the output of the call before");
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
        let graphs = Arc::new(GraphDevice::new(dev.clone()));
        let plain = GpuBackend::shared(dev.clone(), DType::F32);
        let be = GpuBackend::shared(graphs.clone(), DType::F32);
        let (wp, wg) = (weights(&plain, 3), weights(&be, 3));
        let mut rng = SplitMix::new(4);
        // 5 rows, then 7 under the same key (other sizes: the replay differs at its first
        // allocation), then 7 again (replayed from the new record).
        for (call, rows) in [5, 7, 7].into_iter().enumerate() {
            let x = rand(&mut rng, rows * 32);
            let want = plain.download(&chain(&plain, &wp, &x, rows).unwrap()).unwrap();
            let out = graphs.graphed("k", || chain(&be, &wg, &x, rows)).unwrap();
            assert_eq!(be.download(&out).unwrap(), want, "call {call}");
        }
        let s = graphs.stats();
        assert_eq!((s.recorded, s.replayed, s.rerecorded), (2, 1, 1), "{s:?}");
        let why = s.last_reason.unwrap();
        assert!(why.contains("k: replay abandoned") && why.contains("upload"), "{why}");
    }

    #[test]
    fn a_run_that_reads_back_stays_eager() {
        let dev = emu();
        let graphs = Arc::new(GraphDevice::new(dev.clone()));
        let be = GpuBackend::shared(graphs.clone(), DType::F32);
        let w = weights(&be, 5);
        let mut rng = SplitMix::new(6);
        let mut outs = Vec::new();
        for _ in 0..3 {
            let x = rand(&mut rng, 2 * 32);
            let run = || be.download(&chain(&be, &w, &x, 2)?);
            outs.push(graphs.graphed("reads", run).unwrap());
            // The same on the plain path (outside any graph).
            assert_eq!(outs.last().unwrap(), &be.download(&chain(&be, &w, &x, 2).unwrap()).unwrap());
        }
        let s = graphs.stats();
        assert_eq!((s.recorded, s.replayed, s.eager), (1, 0, 2), "{s:?}");
        // A backend's download waits for the stream first.
        let why = s.last_reason.unwrap();
        assert!(why.contains("reads: runs eagerly: the run does a synchronisation"), "{why}");
    }

    #[test]
    fn an_error_of_the_run_comes_back_and_records_nothing() {
        let dev = emu();
        let graphs = Arc::new(GraphDevice::new(dev));
        let be = GpuBackend::shared(graphs.clone(), DType::F32);
        let w = weights(&be, 7);
        // A 31-wide input against 32-wide weights: refused by the op checks.
        let e = graphs
            .graphed("bad", || {
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
            .graphed("outer", || graphs.graphed("inner", || chain(&be, &w, &x, 1)))
            .unwrap();
        assert_eq!(be.download(&out).unwrap().len(), 32);
        let s = graphs.stats();
        assert_eq!((s.recorded, s.eager), (1, 1), "{s:?}");
    }

    /// The whole MiniLM-shaped path: a random BERT with a head, inputs of one (batch, seq)
    /// bucket with different tokens and lengths, graphed against the plain backend.
    #[test]
    fn a_graphed_bert_forward_matches_the_plain_one() {
        let dir = std::env::temp_dir().join(format!("apparate-graph-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tiny.apparate");
        write_random_bert(&path, &tiny_config(), Some(3), DType::F32, 11).unwrap();
        let file = crate::format::ModelFile::open(&path).unwrap();
        let dev = emu();
        let graphs = Arc::new(GraphDevice::new(dev.clone()));
        let plain = Bert::load(GpuBackend::shared(dev, DType::F16), &file).unwrap();
        let model = Bert::load(GpuBackend::shared(graphs.clone(), DType::F16), &file).unwrap();
        let mut rng = SplitMix::new(8);
        for call in 0..3 {
            let lens = [8, 1 + rng.below(8)];
            let ids: Vec<Vec<u32>> = lens
                .iter()
                .map(|&n| (0..8).map(|p| if p < n { 4 + rng.below(10) as u32 } else { 0 }).collect())
                .collect();
            let masks: Vec<Vec<u32>> =
                lens.iter().map(|&n| (0..8).map(|p| u32::from(p < n)).collect()).collect();
            let input = EncoderInput::from_ids_and_masks(&ids, &masks, 0).unwrap();
            let want = plain.forward(&input).unwrap();
            let (pooled, probs) = graphs
                .graphed("bert 2x8", || model.forward_tensors(&input))
                .unwrap();
            let got = model.output(&input, &pooled, probs.as_ref()).unwrap();
            assert_eq!(got.embeddings, want.embeddings, "call {call}, lengths {lens:?}");
            assert_eq!(got.probs, want.probs, "call {call}, lengths {lens:?}");
        }
        let s = graphs.stats();
        assert_eq!((s.recorded, s.replayed), (1, 2), "{s:?}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
