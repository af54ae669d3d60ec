//! Shared by benches/encoder.rs and benches/cnn.rs: where the host has put the cores that run
//! the benchmark, as the round trip of one cache line between two threads.
//!
//! Why it is recorded: on the 2-vCPU development VM the host places the two vCPUs on one core
//! complex (a shared L3; a round trip of about 60 ns) at some times and on two (about 340 ns)
//! at others, for seconds to minutes, and 2-thread times move by 5-50% with it while 1-thread
//! times do not (docs/results.md, issue 17's fifth session). A probe before and after each
//! shape says which placement a median came from. It measures the two cores the OS picked for
//! two busy threads: on a machine with more cores, not necessarily the ones the backend's
//! threads ran on.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Round trips per probe: about 1-7 ms.
const TRIPS: u64 = 20_000;

/// The mean round trip in ns of a counter bounced between this thread and another, or `None`
/// for one thread (nothing to measure) or when the probe cannot start a thread.
pub fn round_trip_ns(threads: usize) -> Option<f64> {
    if threads < 2 {
        return None;
    }
    // Let the backend's workers, which spin for up to 2 ms after an op, go to sleep first.
    std::thread::sleep(Duration::from_millis(5));
    let line = Arc::new(AtomicU64::new(0));
    let other = {
        let line = line.clone();
        std::thread::Builder::new()
            .name("placement-probe".into())
            .spawn(move || {
                for i in 0..TRIPS {
                    while line.load(Ordering::Acquire) != 2 * i + 1 {
                        std::hint::spin_loop();
                    }
                    line.store(2 * i + 2, Ordering::Release);
                }
            })
            .ok()?
    };
    let start = Instant::now();
    for i in 0..TRIPS {
        line.store(2 * i + 1, Ordering::Release);
        while line.load(Ordering::Acquire) != 2 * i + 2 {
            std::hint::spin_loop();
        }
    }
    let ns = start.elapsed().as_secs_f64() * 1e9 / TRIPS as f64;
    other.join().ok()?;
    Some(ns)
}

/// The table cell for a row's `core_round_trip_ns` (`[before, after]`): "61 / 342", or "-".
pub fn cell(row: &serde_json::Value) -> String {
    match row["core_round_trip_ns"].as_array().map(|v| v.as_slice()) {
        Some([a, b]) => match (a.as_f64(), b.as_f64()) {
            (Some(a), Some(b)) => format!("{a:.0} / {b:.0}"),
            _ => "-".into(),
        },
        _ => "-".into(),
    }
}
