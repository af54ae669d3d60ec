//! The bounded request queue and batch formation.
//!
//! Batch formation in one paragraph: the executor takes the next batch as soon as
//! `max_batch_size` requests are waiting, or the oldest waiting request has waited
//! `max_queue_delay`, whichever comes first (or at once while shutting down with drain); it takes
//! the oldest requests first, up to `max_batch_size`. At that moment requests whose caller has
//! gone (cancelled) or whose deadline has passed are taken out and answered (`Cancelled`,
//! `DeadlineExceeded`) without being computed. A submission to a full queue is rejected at once
//! with `Overloaded`.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::completion::Slot;
use super::{BatchingConfig, Input, ServeError};
use crate::metrics::Metrics;

/// A request waiting for a batch.
pub(crate) struct Pending {
    pub input: Input,
    pub slot: Arc<Slot>,
    pub submitted: Instant,
    pub deadline: Option<Instant>,
}

#[derive(Default)]
struct State {
    items: VecDeque<Pending>,
    closed: bool,
}

pub(crate) struct Queue {
    state: Mutex<State>,
    cv: Condvar,
    cfg: BatchingConfig,
    metrics: Arc<Metrics>,
}

impl Queue {
    pub fn new(cfg: BatchingConfig, metrics: Arc<Metrics>) -> Queue {
        Queue {
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
            cfg,
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Enqueues a request, or says why not.
    pub fn push(&self, p: Pending) -> Result<(), (Pending, ServeError)> {
        let mut s = self.lock();
        if s.closed {
            return Err((
                p,
                ServeError::ShutDown("the engine is shutting down".into()),
            ));
        }
        if s.items.len() >= self.cfg.queue_capacity {
            let n = s.items.len();
            return Err((
                p,
                ServeError::Overloaded(format!("{n} requests are already queued")),
            ));
        }
        s.items.push_back(p);
        drop(s);
        self.cv.notify_one();
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.lock().items.len()
    }

    /// Stops accepting requests. With `drain`, the queued ones are still served; without, they
    /// are answered `ShutDown` now.
    pub fn close(&self, drain: bool) {
        let failed: Vec<Pending> = {
            let mut s = self.lock();
            s.closed = true;
            if drain {
                Vec::new()
            } else {
                s.items.drain(..).collect()
            }
        };
        for p in failed {
            p.slot.complete(Err(ServeError::ShutDown(
                "the engine shut down before this request ran".into(),
            )));
            self.metrics.count_failed();
        }
        self.cv.notify_all();
    }

    /// Answers and removes cancelled and expired requests.
    fn prune(&self, s: &mut State, now: Instant) {
        let mut kept = VecDeque::with_capacity(s.items.len());
        for p in s.items.drain(..) {
            if p.slot.is_cancelled() {
                p.slot.complete(Err(ServeError::Cancelled));
                self.metrics.count_cancelled();
            } else if p.deadline.is_some_and(|d| d <= now) {
                p.slot.complete(Err(ServeError::DeadlineExceeded));
                self.metrics.count_expired();
            } else {
                kept.push_back(p);
            }
        }
        s.items = kept;
    }

    /// The next batch; `None` once closed and empty.
    pub fn next_batch(&self) -> Option<Vec<Pending>> {
        let max = self.cfg.max_batch_size.max(1);
        let mut s = self.lock();
        loop {
            let now = Instant::now();
            self.prune(&mut s, now);
            if s.items.is_empty() {
                if s.closed {
                    return None;
                }
                s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            let due = s.items[0].submitted + self.cfg.max_queue_delay;
            if s.items.len() >= max || now >= due || s.closed {
                let n = s.items.len().min(max);
                return Some(s.items.drain(..n).collect());
            }
            // Wake for the oldest request's delay, or an earlier deadline.
            let mut wake = due;
            if let Some(d) = s.items.iter().filter_map(|p| p.deadline).min() {
                wake = wake.min(d);
            }
            let wait = wake
                .saturating_duration_since(now)
                .max(Duration::from_micros(50));
            s = self
                .cv
                .wait_timeout(s, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}
