//! One request's answer slot: completed exactly once by the runtime, awaited by the caller as a
//! future (any async runtime, or none) or by blocking. Dropping the future before the answer
//! marks the request cancelled, so a still-queued request is never computed.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};

use super::{Response, ServeError};

pub(crate) type Answer = Result<Response, ServeError>;

#[derive(Default)]
struct State {
    answer: Option<Answer>,
    /// An answer was delivered (it may have been taken since).
    done: bool,
    cancelled: bool,
    waker: Option<Waker>,
}

#[derive(Default)]
pub(crate) struct Slot {
    state: Mutex<State>,
    cv: Condvar,
}

impl Slot {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the state inconsistent (plain fields).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Delivers the answer; `false` if one was delivered before (it is then dropped).
    pub(crate) fn complete(&self, answer: Answer) -> bool {
        let waker = {
            let mut s = self.lock();
            if s.done {
                return false;
            }
            s.done = true;
            s.answer = Some(answer);
            s.waker.take()
        };
        self.cv.notify_all();
        if let Some(w) = waker {
            w.wake();
        }
        true
    }

    /// Whether an answer was delivered.
    pub(crate) fn is_done(&self) -> bool {
        self.lock().done
    }

    /// Whether the caller gave up before an answer.
    pub(crate) fn is_cancelled(&self) -> bool {
        let s = self.lock();
        s.cancelled && !s.done
    }
}

/// The answer to one request: `.await` it, or call [`ResponseFuture::wait`].
/// Dropping it before the answer cancels the request if it has not started computing.
pub struct ResponseFuture {
    slot: Arc<Slot>,
}

impl ResponseFuture {
    pub(crate) fn new(slot: Arc<Slot>) -> ResponseFuture {
        ResponseFuture { slot }
    }

    /// An already answered request (e.g. rejected at submission).
    pub(crate) fn ready(answer: Answer) -> ResponseFuture {
        let slot = Arc::new(Slot::default());
        slot.complete(answer);
        ResponseFuture { slot }
    }

    /// Blocks the calling thread until the answer.
    pub fn wait(self) -> Result<Response, ServeError> {
        let mut s = self.slot.lock();
        loop {
            if let Some(a) = s.answer.take() {
                return a;
            }
            s = self.slot.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl Future for ResponseFuture {
    type Output = Result<Response, ServeError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut s = self.slot.lock();
        match s.answer.take() {
            Some(a) => Poll::Ready(a),
            None if s.done => Poll::Ready(Err(ServeError::ShutDown(
                "the answer was already taken".into(),
            ))),
            None => {
                s.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl Drop for ResponseFuture {
    fn drop(&mut self) {
        let mut s = self.slot.lock();
        if !s.done {
            s.cancelled = true;
        }
    }
}
