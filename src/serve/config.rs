//! Batching settings and their validation, and the checked conversion of user-given durations
//! (`Duration::from_secs_f64` panics on huge or negative values, and a huge delay overflowed an
//! `Instant` addition on the executor thread: issue 12, defect 6).

use std::time::Duration;

use crate::adapt::config::check_count;
use crate::error::{Error, Result};

/// Longest accepted `max_queue_delay` (and any other user-given wait of the engine): an hour is
/// far beyond any useful batching delay and far below what `Instant` arithmetic can hold.
pub const MAX_DELAY: Duration = Duration::from_secs(3600);

/// Most requests per batch accepted: the start-up profile measures every power of two up to it,
/// and a batch's activations grow with it.
pub const MAX_BATCH_SIZE: usize = 1024;

/// Most requests waiting accepted (each holds its prepared input in memory).
pub const MAX_QUEUE_CAPACITY: usize = 1 << 20;

/// Batching settings.
#[derive(Clone, Debug)]
pub struct BatchingConfig {
    /// Most requests per batch (1..=[`MAX_BATCH_SIZE`]). Default 16.
    pub max_batch_size: usize,
    /// Longest an under-full batch waits for more requests, from its oldest request's arrival
    /// (at most [`MAX_DELAY`]). Default 5 ms.
    pub max_queue_delay: Duration,
    /// Most requests waiting (1..=[`MAX_QUEUE_CAPACITY`]); more are rejected with
    /// [`super::ServeError::Overloaded`]. Default 1024.
    pub queue_capacity: usize,
    /// The queue's bound in time: while its oldest request has waited longer than this, new
    /// requests are rejected with [`super::ServeError::Overloaded`] at once instead of joining
    /// a queue that is not keeping up (at most [`MAX_DELAY`]). Default `None`: only the count
    /// bounds the queue.
    pub max_queue_wait: Option<Duration>,
}

impl Default for BatchingConfig {
    fn default() -> Self {
        BatchingConfig {
            max_batch_size: 16,
            max_queue_delay: Duration::from_millis(5),
            queue_capacity: 1024,
            max_queue_wait: None,
        }
    }
}

impl BatchingConfig {
    /// Checks every knob against its range; the error names the knob and the range.
    pub fn validate(&self) -> Result<()> {
        check_count("max_batch_size", self.max_batch_size, 1, MAX_BATCH_SIZE)?;
        check_count("queue_capacity", self.queue_capacity, 1, MAX_QUEUE_CAPACITY)?;
        if let Some(w) = self.max_queue_wait
            && (w.is_zero() || w > MAX_DELAY)
        {
            return Err(Error::config(
                "max_queue_wait",
                format!("{w:?}"),
                format!("(0, {MAX_DELAY:?}]"),
            ));
        }
        if self.max_queue_delay > MAX_DELAY {
            return Err(Error::config(
                "max_queue_delay",
                format!("{:?}", self.max_queue_delay),
                format!("0..={MAX_DELAY:?}"),
            ));
        }
        Ok(())
    }
}

/// `ms` milliseconds as a [`Duration`], refused (naming `knob`) unless finite and within
/// `0..=`[`MAX_DELAY`]: what a command-line flag such as `--max-delay-ms` goes through.
pub fn duration_from_millis(knob: &str, ms: f64) -> Result<Duration> {
    let max_ms = MAX_DELAY.as_secs_f64() * 1e3;
    if !(ms.is_finite() && (0.0..=max_ms).contains(&ms)) {
        return Err(Error::config(knob, ms, format!("[0, {max_ms}] ms")));
    }
    Ok(Duration::from_secs_f64(ms / 1e3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_from_users_never_panic() {
        for bad in [1e22, 1e300, -1.0, f64::NAN, f64::INFINITY, 3_600_001.0] {
            let e = duration_from_millis("--max-delay-ms", bad).unwrap_err();
            assert!(e.to_string().contains("--max-delay-ms"), "{e}");
        }
        assert_eq!(
            duration_from_millis("x", 2.5).unwrap(),
            Duration::from_micros(2500)
        );
        assert_eq!(duration_from_millis("x", 0.0).unwrap(), Duration::ZERO);
    }

    #[test]
    fn batching_knobs_have_ranges() {
        BatchingConfig::default().validate().unwrap();
        let with = |f: fn(&mut BatchingConfig)| {
            let mut c = BatchingConfig::default();
            f(&mut c);
            c.validate().unwrap_err().to_string()
        };
        assert!(with(|c| c.max_batch_size = 0).contains("max_batch_size"));
        assert!(with(|c| c.max_batch_size = 100_000_000).contains("max_batch_size"));
        assert!(with(|c| c.queue_capacity = 0).contains("queue_capacity"));
        assert!(with(|c| c.max_queue_delay = Duration::MAX).contains("max_queue_delay"));
        assert!(with(|c| c.max_queue_wait = Some(Duration::ZERO)).contains("max_queue_wait"));
        assert!(with(|c| c.max_queue_wait = Some(Duration::MAX)).contains("max_queue_wait"));
    }
}
