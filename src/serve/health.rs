//! What happens when a thread of the engine panics (issue 12, defect 6: a panic on the executor
//! left every caller waiting forever). Each thread runs under [`spawn`]: a panic is caught,
//! the engine is marked failed (so [`super::Engine::health`] reports it and new requests are
//! answered at once), and every queued request is answered with [`ServeError::Failed`]. The
//! requests the thread held are dropped during unwinding (see [`super::queue::Pending`]); they
//! are kept aside ([`adopt_orphan`]) and answered only after the engine is marked failed, so a
//! caller who gets the failure and then asks [`super::Engine::health`] always sees why. (They
//! used to be answered as they were dropped, which raced the mark: CI saw `health()` say `Ok`
//! after every request of the releaser test had failed.) The other threads end as their
//! channels close.

use std::any::Any;
use std::cell::RefCell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::ServeError;
use super::completion::Slot;
use super::queue::Queue;
use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// How long a thread that saw another die waits for the dead thread's handler to record why
/// (it takes microseconds; the limit only bounds a handler that never runs).
pub(crate) const PEER_FAILURE_WAIT: Duration = Duration::from_secs(1);

/// A request dropped unanswered while its engine thread unwound.
struct Orphan {
    slot: Arc<Slot>,
    metrics: Arc<Metrics>,
}

thread_local! {
    /// `Some` on an engine thread (started by [`spawn`]): the requests it dropped while
    /// unwinding from a panic, waiting for the engine to be marked failed.
    static ORPHANS: RefCell<Option<Vec<Orphan>>> = const { RefCell::new(None) };
}

/// Keeps a request dropped during a panic on an engine thread, to be answered once the engine
/// is marked failed. False (the caller answers it itself) on any other thread.
pub(crate) fn adopt_orphan(slot: &Arc<Slot>, metrics: &Arc<Metrics>) -> bool {
    ORPHANS
        .try_with(|o| match o.borrow_mut().as_mut() {
            Some(list) => {
                list.push(Orphan {
                    slot: slot.clone(),
                    metrics: metrics.clone(),
                });
                true
            }
            None => false,
        })
        .unwrap_or(false)
}

/// Answers the requests this thread kept aside with `why`.
fn answer_orphans(why: &str) {
    let orphans = ORPHANS
        .try_with(|o| o.borrow_mut().as_mut().map(std::mem::take))
        .ok()
        .flatten()
        .unwrap_or_default();
    for o in orphans {
        if o.slot.complete(Err(ServeError::Failed(why.to_string()))) {
            o.metrics.count_failed();
        }
    }
}

/// Whether the engine still works, and if not why.
#[derive(Default)]
pub(crate) struct Health {
    /// Read on every submission: lock-free once set.
    failure: OnceLock<String>,
    /// For [`Health::wait_failure`] only.
    marked: Mutex<()>,
    cv: Condvar,
}

impl Health {
    /// Records the first failure (later ones are consequences of it).
    pub fn fail(&self, why: String) {
        let _ = self.failure.set(why);
        let _guard = self.marked.lock().unwrap_or_else(|p| p.into_inner());
        self.cv.notify_all();
    }

    pub fn failure(&self) -> Option<String> {
        self.failure.get().cloned()
    }

    /// The failure, waiting up to `limit` for it to be recorded: for a thread that saw another
    /// one die (its channel closed mid-batch) before that thread's handler has marked the engine.
    pub fn wait_failure(&self, limit: Duration) -> Option<String> {
        let deadline = Instant::now() + limit;
        let mut guard = self.marked.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(why) = self.failure() {
                return Some(why);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            guard = self
                .cv
                .wait_timeout(guard, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

fn panic_message(p: &(dyn Any + Send)) -> &str {
    p.downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| p.downcast_ref::<&str>().copied())
        .unwrap_or("a panic without a message")
}

/// Starts thread `name` running `body`; a panic in it fails the engine instead of hanging it.
pub(crate) fn spawn(
    name: &'static str,
    health: Arc<Health>,
    queue: Arc<Queue>,
    body: impl FnOnce() + Send + 'static,
) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("apparate-{name}"))
        .spawn(move || {
            ORPHANS.with(|o| *o.borrow_mut() = Some(Vec::new()));
            match catch_unwind(AssertUnwindSafe(body)) {
                Err(p) => {
                    let why = format!(
                        "the engine's {name} thread panicked ({}); the engine has stopped",
                        panic_message(p.as_ref())
                    );
                    // The mark first: whoever is answered below may ask `health()` next.
                    health.fail(why.clone());
                    answer_orphans(&why);
                    queue.close_with(ServeError::Failed(why.clone()), ServeError::Failed(why));
                }
                // Only a panic caught inside the body (none holds a request) leaves orphans
                // behind a normal end; they are not left waiting either.
                Ok(()) => answer_orphans(
                    "a thread of the engine panicked while holding this request (see Engine::health)",
                ),
            }
        })
        .map_err(|e| Error::Input(format!("cannot start the {name} thread: {e}")))
}
