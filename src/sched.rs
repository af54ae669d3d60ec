//! The engine's background threads and the operating system's scheduler: lowering a thread's
//! priority so that the request path wins the cores it wants, and reading a thread's own CPU
//! time so that what the background work costs can be reported, not guessed.
//!
//! Linux only; elsewhere every call reports that it did nothing (`false`, `None`).

use std::time::Duration;

/// Moves the calling thread to Linux's idle scheduling class (`SCHED_IDLE`): it then runs only
/// on a core nothing else wants. `false` where that is refused or not Linux.
pub(crate) fn idle_class() -> bool {
    #[cfg(target_os = "linux")]
    {
        #[repr(C)]
        struct SchedParam {
            sched_priority: i32,
        }
        unsafe extern "C" {
            fn sched_setscheduler(pid: i32, policy: i32, param: *const SchedParam) -> i32;
        }
        const SCHED_IDLE: i32 = 5;
        let param = SchedParam { sched_priority: 0 };
        // SAFETY: a system call on the calling thread (`pid` 0); `param` outlives the call.
        unsafe { sched_setscheduler(0, SCHED_IDLE, &param) == 0 }
    }
    #[cfg(not(target_os = "linux"))]
    false
}

/// Sets the calling thread's nice value (Linux keeps it per thread; `who` 0 is the calling
/// thread). Unprivileged threads may raise their own nice value, not lower it. `false` where
/// refused or not Linux.
pub(crate) fn nice(value: i32) -> bool {
    #[cfg(target_os = "linux")]
    {
        unsafe extern "C" {
            fn setpriority(which: i32, who: u32, prio: i32) -> i32;
        }
        const PRIO_PROCESS: i32 = 0;
        // SAFETY: a plain system call on the calling thread with integer arguments.
        unsafe { setpriority(PRIO_PROCESS, 0, value) == 0 }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = value;
        false
    }
}

/// CPU time the calling thread has used since it started (`CLOCK_THREAD_CPUTIME_ID`): time
/// it ran, not time it waited for a core. `None` where unavailable. A system call that takes the
/// scheduler's run-queue lock: read it now and then, not on every small unit of work.
pub(crate) fn thread_cpu_time() -> Option<Duration> {
    #[cfg(target_os = "linux")]
    {
        #[repr(C)]
        struct Timespec {
            tv_sec: std::ffi::c_long,
            tv_nsec: std::ffi::c_long,
        }
        unsafe extern "C" {
            fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
        }
        const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
        let mut ts = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
        if unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
            return None;
        }
        Some(Duration::new(
            ts.tv_sec.max(0) as u64,
            ts.tv_nsec.clamp(0, 999_999_999) as u32,
        ))
    }
    #[cfg(not(target_os = "linux"))]
    None
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// Busy work shows in the thread's CPU time and sleeping does not.
    #[test]
    fn thread_cpu_time_counts_work_not_waiting() {
        let t0 = thread_cpu_time().expect("Linux has a thread CPU clock");
        std::thread::sleep(Duration::from_millis(60));
        let slept = thread_cpu_time().unwrap() - t0;
        let t1 = thread_cpu_time().unwrap();
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(60) {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        let worked = thread_cpu_time().unwrap() - t1;
        assert!(slept < Duration::from_millis(20), "sleeping used {slept:?}");
        // On a loaded machine the busy loop may be descheduled part of its 60 ms.
        assert!(worked > Duration::from_millis(5), "working used {worked:?}");
        assert!(worked > slept, "{worked:?} against {slept:?}");
    }

    /// A nice value set on one thread stays on that thread.
    #[test]
    fn nice_is_per_thread() {
        unsafe extern "C" {
            fn getpriority(which: i32, who: u32) -> i32;
        }
        // SAFETY: a plain system call on the calling thread with integer arguments.
        let own = || unsafe { getpriority(0, 0) };
        let before = own();
        let (set, after) = std::thread::spawn(move || (nice(before.max(0) + 3), own()))
            .join()
            .unwrap();
        if set {
            assert_eq!(after, before.max(0) + 3);
        } else {
            // A sandbox may refuse it; then nothing changed.
            assert_eq!(after, before);
        }
        assert_eq!(own(), before, "the calling thread's nice value changed");
    }
}
