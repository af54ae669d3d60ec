//! Shared by benches/encoder.rs and benches/cnn.rs: where the host has put the cores that run
//! the benchmark, as the round trip of one cache line between two threads.
//!
//! Why it is recorded: on the 2-vCPU development VM the host places the two vCPUs on one core
//! complex (a shared L3; a round trip of about 60 ns) at some times and on two (about 340 ns)
//! at others, for seconds to minutes, and 2-thread times move by 20-65% with it while 1-thread
//! times do not (docs/results.md, issue 17's fifth session). A probe before and after each
//! shape says which placement a median came from. It measures the two cores the OS picked for
//! two busy threads: on a machine with more cores, not necessarily the ones the backend's
//! threads ran on.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Round trips per probe, at most: about 1-7 ms where the two threads have a core each.
const TRIPS: u64 = 20_000;
/// And time per probe, at most: with fewer cores than threads the two only meet when the
/// scheduler switches them, milliseconds per trip.
const BUDGET: Duration = Duration::from_millis(50);
/// Written by the probing thread to send the other one away.
const STOP: u64 = u64::MAX;

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
                // Answers each odd value v with v + 1, until STOP.
                loop {
                    let v = line.load(Ordering::Acquire);
                    if v == STOP {
                        return;
                    }
                    if v % 2 == 1 {
                        line.store(v + 1, Ordering::Release);
                    }
                    std::hint::spin_loop();
                }
            })
            .ok()?
    };
    let start = Instant::now();
    let mut trips = 0;
    while trips < TRIPS && (trips % 256 != 0 || start.elapsed() < BUDGET) {
        line.store(2 * trips + 1, Ordering::Release);
        while line.load(Ordering::Acquire) != 2 * trips + 2 {
            std::hint::spin_loop();
        }
        trips += 1;
    }
    let ns = start.elapsed().as_secs_f64() * 1e9 / trips.max(1) as f64;
    line.store(STOP, Ordering::Release);
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
