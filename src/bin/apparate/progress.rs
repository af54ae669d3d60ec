//! A progress bar on standard error: redrawn in place on a terminal (at most 10 times a second),
//! one line per 10% otherwise (CI logs stay short).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

pub struct ProgressBar {
    tty: bool,
    phase: String,
    started: Instant,
    last_draw: Option<Instant>,
    last_decile: usize,
}

impl ProgressBar {
    pub fn new() -> ProgressBar {
        ProgressBar {
            tty: std::io::stderr().is_terminal(),
            phase: String::new(),
            started: Instant::now(),
            last_draw: None,
            last_decile: usize::MAX,
        }
    }

    /// Reports `done` of `total` units of `phase`; a new phase name starts a new bar.
    pub fn update(&mut self, phase: &str, done: usize, total: usize) {
        if phase != self.phase {
            if self.tty && !self.phase.is_empty() {
                eprintln!();
            }
            self.phase = phase.to_string();
            self.started = Instant::now();
            self.last_draw = None;
            self.last_decile = usize::MAX;
        }
        let total = total.max(1);
        let finished = done >= total;
        let elapsed = self.started.elapsed();
        let line = || {
            let frac = done as f64 / total as f64;
            let width = 30;
            let filled = ((frac * width as f64) as usize).min(width);
            let eta = if done > 0 && !finished {
                let left = elapsed.as_secs_f64() / done as f64 * (total - done) as f64;
                format!(", {:.0} s left", left)
            } else {
                String::new()
            };
            format!(
                "{phase:<16} [{}{}] {done}/{total} {:.1} s{eta}",
                "#".repeat(filled),
                ".".repeat(width - filled),
                elapsed.as_secs_f64()
            )
        };
        if self.tty {
            let due = self
                .last_draw
                .is_none_or(|t| t.elapsed() >= Duration::from_millis(100));
            if due || finished {
                let mut e = std::io::stderr().lock();
                let _ = write!(e, "\r{}", line());
                if finished {
                    let _ = writeln!(e);
                    self.phase.clear();
                }
                let _ = e.flush();
                self.last_draw = Some(Instant::now());
            }
        } else {
            let decile = done * 10 / total;
            if decile != self.last_decile && (decile > 0 || done == 0) {
                self.last_decile = decile;
                eprintln!("{}", line());
            }
        }
    }
}
