//! The plain model's capacity on this machine, measured before the systems run, so that the
//! offered load is a known share of what the machine serves instead of a fixed rate that
//! overloads a slower machine (a fixed 40/s on a busy 2-core machine exceeded the plain
//! model's capacity and its median latency grew to seconds).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::*;

#[derive(Clone, Debug, Serialize)]
pub(crate) struct Capacity {
    /// Answers per second of the plain model, closed loop.
    pub(crate) per_second: f64,
    /// Requests kept in flight (the batching's largest batch).
    pub(crate) in_flight: usize,
    /// Length of the counted part, seconds (after a warm-up of `warmup_seconds`).
    pub(crate) seconds: f64,
    pub(crate) warmup_seconds: f64,
    pub(crate) answers: usize,
}

/// Closed loop on the plain model: keeps `in_flight` requests (cycling through `pool`) queued
/// from one sending thread, replacing each as soon as the oldest is answered, and counts
/// answers per second over `seconds` after `warmup`. With `in_flight` = the largest batch the
/// engine forms full batches back to back, so this is the throughput the batching allows, as
/// the open-loop runs see it (submission-side tokenizing included).
pub(crate) fn measure_capacity(
    ctx: &Systems,
    pool: &[Input],
    in_flight: usize,
    warmup: Duration,
    seconds: Duration,
) -> apparate::Result<Capacity> {
    if pool.is_empty() {
        return Err(apparate::Error::Input(
            "no inputs to measure the capacity with".into(),
        ));
    }
    let engine = ctx.engine("vanilla")?;
    let in_flight = in_flight.max(1);
    let mut queue = VecDeque::with_capacity(in_flight);
    let mut next = 0usize;
    let begin = Instant::now();
    let mut counted: Option<(Instant, usize)> = None;
    let result = loop {
        while queue.len() < in_flight {
            queue.push_back(engine.infer(pool[next % pool.len()].clone()));
            next += 1;
        }
        let answer = queue.pop_front().expect("queue filled above").wait();
        if let Err(e) = answer {
            break Err(apparate::Error::Input(format!(
                "measuring capacity: the plain model failed a request: {e}"
            )));
        }
        let now = Instant::now();
        match &mut counted {
            None if now >= begin + warmup => counted = Some((now, 0)),
            None => {}
            Some((from, n)) => {
                *n += 1;
                let span = now.duration_since(*from);
                if span >= seconds {
                    break Ok(Capacity {
                        per_second: *n as f64 / span.as_secs_f64(),
                        in_flight,
                        seconds: span.as_secs_f64(),
                        warmup_seconds: warmup.as_secs_f64(),
                        answers: *n,
                    });
                }
            }
        }
    };
    // Dropping the unanswered futures cancels what has not started; shutdown finishes the
    // batch in progress, so the next system starts on an idle machine.
    drop(queue);
    engine.shutdown();
    result
}
