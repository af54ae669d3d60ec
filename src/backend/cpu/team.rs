//! A fork-join team for every op of the CPU backend: the calling thread and `threads - 1`
//! workers share each op's tasks, and the workers wait for the next op by spinning for a short
//! while before they sleep.
//!
//! Why not a rayon pool (which the backend used before): a decode step of SmolLM2-135M is 121 quantized
//! products of 50-500 us each plus a few hundred row ops, and handing each to rayon from a
//! thread outside the pool costs a wake-up of a sleeping worker and of the caller (tens of
//! microseconds on the 2-core development VMs). Measured there: 2 threads gained only 1.25-1.35x
//! over 1 at batch 1 (llama.cpp, whose threads spin between ops, gains 1.6-1.8x). Here the
//! caller works on the op itself, and a worker that finished an op is still spinning when the
//! next one comes microseconds later, so a hand-off is a few atomic operations. The encoder and
//! CNN ops run here too, GEMMs included: one team, so two pools never spin against each other
//! for the same cores.
//!
//! One op runs at a time: a second caller (another thread, or an op started from inside a task)
//! runs its tasks on its own thread instead of waiting.
//!
//! The caller waits at the end of an op only for workers that joined it (see `Shared::gate`), not
//! for every worker: on a machine with more busy threads than cores (two models served side by
//! side, each backend with its team, or the embedding server's own threads) a worker the OS has
//! not run for a time slice would otherwise hold up every op by milliseconds. Measured on the
//! 2-core development VM: the decoder tests run two at a time took 4.1x as long as one after
//! the other when the caller waited for every worker; now the caller takes the absent worker's
//! tasks and goes on.

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker spins before it sleeps: longer than the gaps between the ops of a
/// step and between steps (a step's host work, sampling and streaming, takes microseconds to
/// a few hundred), short enough that an idle engine does not keep cores busy.
const SPIN: Duration = Duration::from_millis(2);

/// One op: `tasks` calls of `f`, claimed through `next`.
struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
    tasks: usize,
}

struct Shared {
    /// Bumped for every op (and at shutdown); a worker runs one op per value it sees.
    epoch: AtomicU64,
    /// The current op, on the caller's stack; valid until every worker that joined it has left.
    job: AtomicPtr<Job<'static>>,
    /// Per participant (the caller is 0), how many of its tasks have been claimed.
    next: Vec<Padded>,
    /// Workers joining the current op: the count of those that joined, and `CLOSED` once the
    /// caller has run out of tasks to claim. A worker joins only while it is open, and only a
    /// joined worker touches the op (its job, claim counters, `left`); so the caller waits for
    /// the joined ones alone, and one the OS has not run since the op began holds nothing up.
    gate: AtomicUsize,
    /// Joined workers that have left the current op.
    left: AtomicUsize,
    panicked: AtomicBool,
    stop: AtomicBool,
    /// Workers asleep (or about to be) on `wake`.
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
    spin: bool,
    /// Tests only: workers that see a new op wait while this is set (as if the OS did not
    /// run them).
    #[cfg(test)]
    hold: AtomicBool,
}

impl Shared {
    /// Runs tasks of the current job until none are left, as participant `who` (the caller is
    /// 0); false when one panicked.
    ///
    /// Participant `o` of `n` owns tasks `o * tasks / n .. (o + 1) * tasks / n`: each runs its
    /// own in order, then takes what is left of the others' (from the participant after it
    /// on). So an op split the same way as the one before (a product's column tiles, a
    /// convolution's bands of rows) gives each thread the same part every time, and
    /// neighbouring parts (a band's halo rows) mostly to the same thread, while a late or slow
    /// thread still delays no one. Why not one shared counter (which the team used first):
    /// which thread got which tile then changed on every call, so weight panels and output
    /// lines kept moving between the cores' caches. On the 2-vCPU EPYC VM, whose two vCPUs the
    /// host puts on one core complex at some times (a cache-line round trip of about 60 ns)
    /// and on two at others (about 340 ns), owning every n-th task made MiniLM-L6 batch 1 x 32
    /// 2-6% faster than the shared counter in the second placement, and owning runs instead
    /// another 4-18% (MiniLM-L6 1x32 and 8x32, ResNet-18/50 and EfficientNet-Lite0 at batch
    /// 1); neither changed anything measurable in the first (docs/results.md).
    fn work(&self, job: &Job<'_>, who: usize) -> bool {
        let n = self.next.len();
        catch_unwind(AssertUnwindSafe(|| {
            for o in (0..n).map(|d| (who + d) % n) {
                // Participant o's tasks: a contiguous run of about tasks / n.
                let (lo, hi) = (o * job.tasks / n, (o + 1) * job.tasks / n);
                loop {
                    let j = self.next[o].0.fetch_add(1, Relaxed);
                    if lo + j >= hi {
                        break;
                    }
                    (job.f)(lo + j);
                }
            }
        }))
        .is_ok()
    }
}

/// A counter alone on its cache line(s), so that participants claiming their own tasks do not
/// take each other's line.
#[repr(align(128))]
struct Padded(AtomicUsize);

pub(crate) struct Team {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Held by the op in flight.
    busy: Mutex<()>,
}

impl Team {
    /// A team of `threads` (the caller and `threads - 1` workers). Workers spin between ops
    /// only when the machine has a core for each; otherwise they sleep at once.
    pub(crate) fn new(threads: usize) -> std::io::Result<Team> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            next: (0..threads.max(1))
                .map(|_| Padded(AtomicUsize::new(0)))
                .collect(),
            gate: AtomicUsize::new(CLOSED),
            left: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            spin: threads <= cores,
            #[cfg(test)]
            hold: AtomicBool::new(false),
        });
        let mut workers = Vec::new();
        for i in 1..threads.max(1) {
            let s = shared.clone();
            let h = std::thread::Builder::new()
                .name(format!("apparate-team-{i}"))
                .spawn(move || worker(&s, i));
            match h {
                Ok(h) => workers.push(h),
                Err(e) => {
                    // Stop the ones already started before reporting.
                    drop(Team {
                        shared,
                        workers,
                        busy: Mutex::new(()),
                    });
                    return Err(e);
                }
            }
        }
        Ok(Team {
            shared,
            workers,
            busy: Mutex::new(()),
        })
    }

    pub(crate) fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// `f(i)` for every `i` in `0..tasks`, spread over the team; returns when all are done.
    /// A panic in a task is raised here after every thread has left the op.
    pub(crate) fn for_each(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        let guard = if tasks > 1 && !self.workers.is_empty() {
            match self.busy.try_lock() {
                Ok(g) => Some(g),
                // An earlier op panicked while holding it: the team itself is sound (every
                // worker left that op), so keep using it rather than run inline from now on.
                Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => None,
            }
        } else {
            None
        };
        let Some(_guard) = guard else {
            (0..tasks).for_each(f);
            return;
        };
        let s = &*self.shared;
        let job = Job { f, tasks };
        // No worker is in an op now (the gate is closed and every one that joined the last op
        // has left), so these are ours to reset.
        for c in &s.next {
            c.0.store(0, Relaxed);
        }
        s.left.store(0, Relaxed);
        s.panicked.store(false, Relaxed);
        // The job outlives its use: the gate opens after the pointer is published and closes
        // before this function waits for the workers that joined, then clears the pointer.
        s.job
            .store(&job as *const Job<'_> as *mut Job<'static>, Release);
        s.gate.store(0, Release);
        s.epoch.fetch_add(1, SeqCst);
        if s.sleepers.load(SeqCst) > 0 {
            let _l = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        let mine = s.work(&job, 0);
        // Every task is claimed: close the gate and wait for the workers inside only.
        let joined = s.gate.fetch_or(CLOSED, AcqRel) & !CLOSED;
        let mut spins = 0u32;
        while s.left.load(Acquire) < joined {
            spins += 1;
            if spins < 1 << 12 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        s.job.store(std::ptr::null_mut(), Relaxed);
        if !mine || s.panicked.load(Relaxed) {
            resume_unwind(Box::new("a task of a team op panicked"));
        }
    }

    /// `[f(0), .., f(n - 1)]`, computed by the team.
    pub(crate) fn map<R: Send>(&self, n: usize, f: impl Fn(usize) -> R + Sync) -> Vec<R> {
        let slots: Vec<Mutex<Option<R>>> = (0..n).map(|_| Mutex::new(None)).collect();
        self.for_each(n, &|i| {
            *slots[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(f(i));
        });
        slots
            .into_iter()
            .map(|m| {
                m.into_inner()
                    .unwrap_or_else(|e| e.into_inner())
                    .expect("every task ran")
            })
            .collect()
    }

    /// `f(index, chunk)` over `out` in chunks of `size` (the last may be shorter): a task per
    /// chunk when there are few (up to 16 per thread), else four tasks per thread of whole
    /// chunks, their sizes within one chunk of each other. (Groups of `ceil(chunks / tasks)`
    /// made 7 tasks of 2 of a 14-row image for 2 threads: one thread did 4 of them.)
    pub(crate) fn for_chunks<T: Send>(
        &self,
        out: &mut [T],
        size: usize,
        f: impl Fn(usize, &mut [T]) + Sync,
    ) {
        let size = size.max(1);
        let chunks = out.len().div_ceil(size);
        let threads = self.threads();
        let tasks = if chunks <= 16 * threads {
            chunks
        } else {
            4 * threads
        };
        let len = out.len();
        let base = SendPtr(out.as_mut_ptr());
        self.for_each(tasks, &|t| {
            let base = &base;
            for c in t * chunks / tasks..(t + 1) * chunks / tasks {
                let (a, b) = (c * size, ((c + 1) * size).min(len));
                // SAFETY: chunks `[a, b)` are disjoint and inside `out`, which the caller
                // borrows mutably for the whole op; each index is handed to one task.
                let chunk = unsafe { std::slice::from_raw_parts_mut(base.0.add(a), b - a) };
                f(c, chunk);
            }
        });
    }
}

/// Lets parallel tasks write disjoint parts of one output buffer (each op says which part is
/// whose where it makes the slice).
#[derive(Copy, Clone)]
pub(crate) struct OutPtr(pub *mut f32);
// SAFETY: the ops that share one hand each task a part no other task touches, and the buffer
// outlives the op.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// A method (not the field) so closures capture the whole `Send` wrapper.
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Where an op's tasks run: inline on the caller or on the team. Handing an op to other threads
/// costs a cross-thread hand-off and wait; a batch-1 CNN runs dozens of ops of a few
/// microseconds each and a ramp is a few of them, so small ops (and every op of a 1-thread
/// backend) run inline (`CpuBackend::exec` decides).
#[derive(Clone, Copy)]
pub(crate) enum Exec<'a> {
    Inline,
    Team(&'a Team),
}

impl Exec<'_> {
    /// Threads that share the op's tasks.
    pub(crate) fn threads(self) -> usize {
        match self {
            Exec::Inline => 1,
            Exec::Team(t) => t.threads(),
        }
    }

    /// `f(i)` for every `i` in `0..tasks`.
    pub(crate) fn for_each(self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        match self {
            Exec::Inline => (0..tasks).for_each(f),
            Exec::Team(t) => t.for_each(tasks, f),
        }
    }

    /// `[f(0), .., f(n - 1)]`.
    pub(crate) fn map<R: Send>(self, n: usize, f: impl Fn(usize) -> R + Sync) -> Vec<R> {
        match self {
            Exec::Inline => (0..n).map(f).collect(),
            Exec::Team(t) => t.map(n, f),
        }
    }

    /// `f(index, chunk)` over `out` in chunks of `size`.
    pub(crate) fn for_chunks<T: Send>(
        self,
        out: &mut [T],
        size: usize,
        f: impl Fn(usize, &mut [T]) + Sync,
    ) {
        match self {
            Exec::Inline => out
                .chunks_mut(size.max(1))
                .enumerate()
                .for_each(|(i, c)| f(i, c)),
            Exec::Team(t) => t.for_chunks(out, size, f),
        }
    }
}

struct SendPtr<T>(*mut T);
// SAFETY: used only to hand disjoint sub-slices of a `&mut [T]` (T: Send) to tasks.
unsafe impl<T: Send> Sync for SendPtr<T> {}

fn worker(s: &Shared, who: usize) {
    let mut seen = 0u64;
    loop {
        // Wait for the next op: spin, then sleep.
        let start = Instant::now();
        let mut spins = 0u32;
        let epoch = loop {
            let e = s.epoch.load(Acquire);
            if e != seen {
                break e;
            }
            spins = spins.wrapping_add(1);
            if s.spin && (spins & 1023 != 0 || start.elapsed() < SPIN) {
                std::hint::spin_loop();
                continue;
            }
            let mut l = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.sleepers.fetch_add(1, SeqCst);
            while s.epoch.load(SeqCst) == seen {
                l = s.wake.wait(l).unwrap_or_else(|e| e.into_inner());
            }
            s.sleepers.fetch_sub(1, SeqCst);
        };
        seen = epoch;
        if s.stop.load(Acquire) {
            return;
        }
        #[cfg(test)]
        while s.hold.load(Acquire) {
            std::thread::sleep(Duration::from_millis(1));
        }
        // Join the op if the caller has not closed it yet (it may be a later op than the one
        // this epoch announced: that is fine, its job was published before its gate opened).
        let mut g = s.gate.load(Acquire);
        loop {
            if g & CLOSED != 0 {
                break;
            }
            match s.gate.compare_exchange_weak(g, g + 1, AcqRel, Acquire) {
                Ok(_) => break,
                Err(now) => g = now,
            }
        }
        if g & CLOSED != 0 {
            continue;
        }
        let job = s.job.load(Acquire);
        // SAFETY: the caller published `job` before opening the gate and keeps it alive until
        // every worker that joined has counted itself out below.
        let ok = match unsafe { job.as_ref() } {
            Some(job) => s.work(job, who),
            None => true,
        };
        if !ok {
            s.panicked.store(true, Relaxed);
        }
        s.left.fetch_add(1, Release);
    }
}

/// The gate's closed flag (its other bits count the workers that joined).
const CLOSED: usize = 1 << (usize::BITS - 1);

impl Drop for Team {
    fn drop(&mut self) {
        let s = &*self.shared;
        s.stop.store(true, Release);
        s.epoch.fetch_add(1, SeqCst);
        {
            let _l = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// One team of two shared by the unit tests that compare inline and parallel runs.
#[cfg(test)]
pub(crate) fn test_team() -> &'static Team {
    static TEAM: std::sync::OnceLock<Team> = std::sync::OnceLock::new();
    TEAM.get_or_init(|| Team::new(2).expect("starting a test team"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_across_many_ops() {
        for threads in [1, 2, 3] {
            let team = Team::new(threads).unwrap();
            for op in 0..2000usize {
                let n = op % 37;
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                team.for_each(n, &|i| {
                    hits[i].fetch_add(1, Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Relaxed) == 1), "op {op}");
            }
            let v = team.map(100, |i| i * i);
            assert_eq!(v, (0..100).map(|i| i * i).collect::<Vec<_>>());
        }
    }

    #[test]
    fn a_slow_owner_leaves_its_other_tasks_to_the_rest() {
        // When the worker is in task 4 (its first; the caller owns 0-3) for 60 ms, its other
        // tasks (5, 6, 7) must not wait for it: the caller finishes its own and takes them. An
        // attempt where the worker started too late to claim task 4 (the caller, 10 ms into
        // its task 0, then ran it) says nothing, so up to ten are made, and one must say
        // something.
        let team = Team::new(2).unwrap();
        let caller = std::thread::current().id();
        let mut conclusive = 0;
        for _ in 0..10 {
            team.for_each(2, &|_| {});
            let ran_by: Vec<Mutex<Option<std::thread::ThreadId>>> =
                (0..8).map(|_| Mutex::new(None)).collect();
            team.for_each(8, &|i| {
                match i {
                    0 => std::thread::sleep(Duration::from_millis(10)),
                    4 => std::thread::sleep(Duration::from_millis(60)),
                    _ => {}
                }
                *ran_by[i].lock().unwrap() = Some(std::thread::current().id());
            });
            let ran: Vec<_> = ran_by.iter().map(|m| m.lock().unwrap().unwrap()).collect();
            if ran[4] != caller {
                conclusive += 1;
                assert!(
                    [5, 6, 7].iter().any(|&i| ran[i] == caller),
                    "the caller took none of the slow worker's tasks: {ran:?}"
                );
            }
            if conclusive >= 2 {
                break;
            }
        }
        assert!(conclusive > 0, "the worker never started in time");
    }

    #[test]
    fn a_worker_that_does_not_run_holds_no_op_up() {
        // A worker the OS does not run (held here) must not be waited for: the caller runs
        // every task itself and returns; once the worker runs again, ops are shared again.
        let team = Team::new(2).unwrap();
        team.shared.hold.store(true, Release);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let me = std::thread::current().id();
                let alone = (0..50).all(|_| {
                    let ran = team.map(8, |_| std::thread::current().id());
                    ran.iter().all(|id| *id == me)
                });
                tx.send(alone).unwrap();
            });
            let finished = rx.recv_timeout(Duration::from_secs(20));
            team.shared.hold.store(false, Release);
            assert_eq!(
                finished,
                Ok(true),
                "ops waited for a worker that did not run"
            );
        });
        assert!(
            shared_by_two_threads(&team),
            "the worker did not join again"
        );
    }

    /// Whether an op of eight 3 ms tasks ran on more than one thread.
    fn shared_by_two_threads(team: &Team) -> bool {
        let ids = team.map(8, |_| {
            std::thread::sleep(Duration::from_millis(3));
            std::thread::current().id()
        });
        ids.iter().any(|id| *id != ids[0])
    }

    #[test]
    fn chunks_cover_the_slice_once() {
        let team = Team::new(2).unwrap();
        let mut v = vec![0u32; 1003];
        team.for_chunks(&mut v, 10, |c, chunk| {
            for x in chunk {
                *x += c as u32 + 1;
            }
        });
        for (i, x) in v.iter().enumerate() {
            assert_eq!(*x, (i / 10) as u32 + 1);
        }
    }

    #[test]
    fn a_panicking_task_is_raised_to_the_caller_and_the_team_goes_on() {
        let team = Team::new(2).unwrap();
        let r = catch_unwind(AssertUnwindSafe(|| {
            team.for_each(16, &|i| assert!(i != 11, "task 11"));
        }));
        assert!(r.is_err());
        let v = team.map(8, |i| i + 1);
        assert_eq!(v.iter().sum::<usize>(), 36);
        // Still two threads after the panic, not the caller alone.
        assert!(shared_by_two_threads(&team), "only one thread ran the op");
    }

    #[test]
    fn workers_that_slept_wake_for_the_next_op() {
        let team = Team::new(2).unwrap();
        team.for_each(4, &|_| {});
        std::thread::sleep(SPIN * 3);
        let hits = AtomicUsize::new(0);
        team.for_each(64, &|_| {
            hits.fetch_add(1, Relaxed);
        });
        assert_eq!(hits.load(Relaxed), 64);
    }

    #[test]
    fn an_op_started_inside_a_task_runs_on_its_thread() {
        let team = Team::new(2).unwrap();
        let total = AtomicUsize::new(0);
        team.for_each(4, &|_| {
            team.for_each(5, &|_| {
                total.fetch_add(1, Relaxed);
            });
        });
        assert_eq!(total.load(Relaxed), 20);
    }
}
