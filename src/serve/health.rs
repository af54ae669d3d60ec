//! What happens when a thread of the engine panics (issue 12, defect 6: a panic on the executor
//! left every caller waiting forever). Each thread runs under [`spawn`]: a panic is caught,
//! the engine is marked failed (so [`super::Engine::health`] reports it and new requests are
//! answered at once), and every queued request is answered with [`ServeError::Failed`]. The
//! requests the thread held are answered as they are dropped during unwinding (see
//! [`super::queue::Pending`]); the other threads end as their channels close.

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use super::ServeError;
use super::queue::Queue;
use crate::error::{Error, Result};

/// Whether the engine still works, and if not why.
#[derive(Default)]
pub(crate) struct Health {
    /// Read on every submission: lock-free once set.
    failure: OnceLock<String>,
}

impl Health {
    /// Records the first failure (later ones are consequences of it).
    pub fn fail(&self, why: String) {
        let _ = self.failure.set(why);
    }

    pub fn failure(&self) -> Option<String> {
        self.failure.get().cloned()
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
            if let Err(p) = catch_unwind(AssertUnwindSafe(body)) {
                let why = format!(
                    "the engine's {name} thread panicked ({}); the engine has stopped",
                    panic_message(p.as_ref())
                );
                health.fail(why.clone());
                queue.close_with(ServeError::Failed(why.clone()), ServeError::Failed(why));
            }
        })
        .map_err(|e| Error::Input(format!("cannot start the {name} thread: {e}")))
}
