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
use super::input::Prepared;
use super::{BatchingConfig, ServeError};
use crate::metrics::Metrics;

/// A request between submission and its answer: validated and prepared (tokenized, normalised)
/// on the submitting thread.
pub(crate) struct Pending {
    pub input: Prepared,
    pub slot: Arc<Slot>,
    pub submitted: Instant,
    pub deadline: Option<Instant>,
    pub metrics: Arc<Metrics>,
}

impl Pending {
    /// Answers with an error, counted as failed if it is the answer (not a late duplicate).
    pub fn fail(&self, e: ServeError) {
        if self.slot.complete(Err(e)) {
            self.metrics.count_failed();
        }
    }
}

impl Drop for Pending {
    /// A request dropped unanswered is failed, never left waiting: this is how the requests held
    /// by a thread that panicked (unwinding drops them) or by a channel whose receiver is gone
    /// get their answer.
    fn drop(&mut self) {
        // Every answered request is dropped too: no error built for those.
        if self.slot.is_done() {
            return;
        }
        let why = if std::thread::panicking() {
            // On an engine thread it is answered once the engine is marked failed.
            if super::health::adopt_orphan(&self.slot, &self.metrics) {
                return;
            }
            "a thread of the engine panicked while holding this request (see Engine::health)"
        } else {
            "the engine dropped this request without an answer"
        };
        self.fail(ServeError::Failed(why.into()));
    }
}

#[derive(Default)]
struct State {
    items: VecDeque<Pending>,
    /// Why submissions are refused, once closed.
    closed: Option<ServeError>,
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
        // Plain fields: a panic while holding the lock cannot leave them inconsistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Enqueues a request, or answers it with why not (and returns that answer).
    pub fn push(&self, p: Pending) -> Result<(), ServeError> {
        let mut s = self.lock();
        let refused = match &s.closed {
            Some(e) => Some(e.clone()),
            None if s.items.len() >= self.cfg.queue_capacity => Some(ServeError::Overloaded(
                format!("{} requests are already queued", s.items.len()),
            )),
            None => match (self.cfg.max_queue_wait, s.items.front()) {
                (Some(bound), Some(oldest)) if oldest.submitted.elapsed() > bound => {
                    Some(ServeError::Overloaded(format!(
                        "the oldest queued request has waited {:.1} ms, over the bound of {:.1} ms",
                        oldest.submitted.elapsed().as_secs_f64() * 1e3,
                        bound.as_secs_f64() * 1e3
                    )))
                }
                _ => None,
            },
        };
        if let Some(e) = refused {
            drop(s);
            // Answered here, so that dropping it is not a failure; the caller counts it.
            p.slot.complete(Err(e.clone()));
            return Err(e);
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
        let shut = ServeError::ShutDown("the engine is shutting down".into());
        if drain {
            let mut s = self.lock();
            s.closed.get_or_insert(shut);
            drop(s);
            self.cv.notify_all();
        } else {
            self.close_with(
                shut,
                ServeError::ShutDown("the engine shut down before this request ran".into()),
            );
        }
    }

    /// Stops accepting requests (`refuse` answers new ones) and answers every queued one with
    /// `queued`.
    pub fn close_with(&self, refuse: ServeError, queued: ServeError) {
        let failed: Vec<Pending> = {
            let mut s = self.lock();
            s.closed = Some(refuse);
            s.items.drain(..).collect()
        };
        for p in failed {
            p.fail(queued.clone());
        }
        self.cv.notify_all();
    }

    /// Answers and removes cancelled and expired requests.
    fn prune(&self, s: &mut State, now: Instant) {
        // In place: this runs at every wake-up of the executor.
        s.items.retain(|p| {
            if p.slot.is_cancelled() {
                p.slot.complete(Err(ServeError::Cancelled));
                self.metrics.count_cancelled();
                false
            } else if p.deadline.is_some_and(|d| d <= now) {
                p.slot.complete(Err(ServeError::DeadlineExceeded));
                self.metrics.count_expired();
                false
            } else {
                true
            }
        });
    }

    /// The next batch; `None` once closed and empty.
    pub fn next_batch(&self) -> Option<Vec<Pending>> {
        let max = self.cfg.max_batch_size.max(1);
        let mut s = self.lock();
        loop {
            let now = Instant::now();
            self.prune(&mut s, now);
            if s.items.is_empty() {
                if s.closed.is_some() {
                    return None;
                }
                s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            // `None`: a delay beyond what an `Instant` can hold never comes due by time (the
            // addition used to panic here and kill the executor).
            let due = s.items[0].submitted.checked_add(self.cfg.max_queue_delay);
            if s.items.len() >= max || due.is_some_and(|d| now >= d) || s.closed.is_some() {
                let n = s.items.len().min(max);
                return Some(s.items.drain(..n).collect());
            }
            // Wake for the oldest request's delay, or an earlier deadline.
            let wake = due
                .into_iter()
                .chain(s.items.iter().filter_map(|p| p.deadline))
                .min();
            s = match wake {
                Some(w) => {
                    let wait = w
                        .saturating_duration_since(now)
                        .max(Duration::from_micros(50));
                    self.cv
                        .wait_timeout(s, wait)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
                None => self.cv.wait(s).unwrap_or_else(|p| p.into_inner()),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(metrics: &Arc<Metrics>) -> (Pending, Arc<Slot>) {
        let slot = Arc::new(Slot::default());
        let p = Pending {
            input: Prepared::Pixels(Vec::new()),
            slot: slot.clone(),
            submitted: Instant::now(),
            deadline: None,
            metrics: metrics.clone(),
        };
        (p, slot)
    }

    #[test]
    fn a_delay_beyond_any_instant_does_not_panic_and_a_full_batch_still_forms() {
        let metrics = Arc::new(Metrics::new());
        let q = Queue::new(
            BatchingConfig {
                max_batch_size: 2,
                max_queue_delay: Duration::MAX,
                queue_capacity: 4,
                max_queue_wait: None,
            },
            metrics.clone(),
        );
        for _ in 0..2 {
            q.push(pending(&metrics).0).map_err(|_| ()).unwrap();
        }
        // Fails before the fix: `submitted + Duration::MAX` panics ("overflow when adding
        // duration to instant").
        assert_eq!(q.next_batch().map(|b| b.len()), Some(2));
    }

    #[test]
    fn a_request_dropped_unanswered_is_failed_once() {
        let metrics = Arc::new(Metrics::new());
        let (p, slot) = pending(&metrics);
        drop(p);
        let r = super::super::ResponseFuture::new(slot).wait();
        assert!(matches!(r, Err(ServeError::Failed(_))), "{r:?}");
        assert_eq!(metrics.failed(), 1);
    }
}
