//! How failures of the driver, NVRTC and cudarc become crate errors, and where failures in
//! drops wait (they have no caller to tell) until the device's next call reports them.

use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Mutex;

use cudarc::driver::CudaContext;
use cudarc::driver::result::DriverError;
use cudarc::driver::sys as dsys;

use super::BACKEND;
use crate::error::{Error, Result};

/// Runs `f`, turning a panic inside it (cudarc panics on missing libraries and symbols) into an
/// error that says what was being done.
pub(super) fn guard<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            Err(Error::device(
                BACKEND,
                what,
                format!("the CUDA library failed: {msg}"),
            ))
        }
    }
}

/// `CUDA_ERROR_OUT_OF_MEMORY (out of memory)`.
pub(super) fn describe(e: DriverError) -> String {
    // Naming the error asks the driver library, which cudarc would panic without.
    // SAFETY: only tries to open the library.
    if !unsafe { dsys::is_culib_present() } {
        return format!("{:?}", e.0);
    }
    let name = e
        .error_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("{:?}", e.0));
    match e.error_string() {
        Ok(s) => format!("{name} ({})", s.to_string_lossy()),
        Err(_) => name,
    }
}

/// A driver failure while doing `what`.
pub(super) fn drv(what: impl fmt::Display) -> impl FnOnce(DriverError) -> Error {
    move |e| Error::device(BACKEND, what.to_string(), describe(e))
}

pub(super) fn check(what: &str, rc: dsys::CUresult) -> Result<()> {
    rc.result().map_err(drv(what))
}

/// `13000` -> `13.0`.
pub(super) fn version_string(v: i32) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

/// Makes `ctx` current on this thread. Unlike cudarc's `bind_to_thread` it leaves the
/// context's recorded error alone, so that error is reported by [`CudaDevice::enter`] as what
/// it is rather than as this call's failure.
pub(super) fn bind(ctx: &CudaContext) -> std::result::Result<(), DriverError> {
    let current = cudarc::driver::result::ctx::get_current()?;
    if current != Some(ctx.cu_ctx()) {
        // SAFETY: the context is alive (the caller holds it).
        unsafe { cudarc::driver::result::ctx::set_current(ctx.cu_ctx()) }?;
    }
    Ok(())
}

/// Failures in drops, which have no caller to tell: kept (the first one, the likely cause)
/// until the device's next call reports it.
#[derive(Default)]
pub(crate) struct Deferred(Mutex<Option<String>>);

impl Deferred {
    pub(super) fn record(&self, what: String, e: DriverError) {
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            let thread = std::thread::current();
            *slot = Some(format!(
                "{what} on thread `{}`: {}",
                thread.name().unwrap_or("unnamed"),
                describe(e)
            ));
        }
    }

    pub(super) fn take(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn deferred_keeps_the_first_failure_and_names_the_thread() {
        let d = Deferred::default();
        let oom = DriverError(dsys::CUresult::CUDA_ERROR_OUT_OF_MEMORY);
        std::thread::Builder::new()
            .name("releaser".into())
            .spawn({
                let d = Arc::new(d);
                let d2 = d.clone();
                move || {
                    d2.record("freeing a 4-byte buffer (on drop)".into(), oom);
                    d2.record("second".into(), oom);
                    let msg = d2.take().unwrap();
                    assert!(msg.starts_with("freeing a 4-byte buffer"), "{msg}");
                    assert!(msg.contains("thread `releaser`"), "{msg}");
                    assert!(d2.take().is_none(), "taken once");
                }
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
