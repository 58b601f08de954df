//! Turning panics inside tasks into task errors with a location and a
//! backtrace, without the default hook's noise on stderr.

use flotilla_proto::{ErrorKind, TaskError};
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Once;
use std::task::{Context, Poll};

thread_local! {
    static IN_TASK: Cell<bool> = const { Cell::new(false) };
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Installs the hook that records where a task panicked (once per process;
/// panics outside tasks still go to the previous hook).
pub(crate) fn install_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if IN_TASK.with(Cell::get) {
                let location = info
                    .location()
                    .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
                    .unwrap_or_default();
                let backtrace = std::backtrace::Backtrace::force_capture();
                let trace = format!("panicked at {location}\n{backtrace}");
                LAST_PANIC.with(|last| *last.borrow_mut() = Some(trace));
            } else {
                previous(info);
            }
        }));
    });
}

fn panic_error(payload: Box<dyn std::any::Any + Send>) -> TaskError {
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic with a non-string payload".to_owned());
    let traceback = LAST_PANIC
        .with(|last| last.borrow_mut().take())
        .unwrap_or_default();
    TaskError::new(ErrorKind::Panic, "panic", message).with_traceback(traceback)
}

fn guarded<R>(f: impl FnOnce() -> R) -> Result<R, TaskError> {
    let was = IN_TASK.with(|flag| flag.replace(true));
    let result = catch_unwind(AssertUnwindSafe(f));
    IN_TASK.with(|flag| flag.set(was));
    result.map_err(panic_error)
}

/// Runs a synchronous task, catching a panic.
pub(crate) fn run_sync<T>(f: impl FnOnce() -> Result<T, TaskError>) -> Result<T, TaskError> {
    guarded(f).and_then(|r| r)
}

/// Wraps an async task so that a panic while polling becomes its error.
pub(crate) struct CatchUnwind<F: ?Sized> {
    inner: Pin<Box<F>>,
}

impl<F: ?Sized> CatchUnwind<F> {
    pub(crate) fn new(inner: Pin<Box<F>>) -> Self {
        CatchUnwind { inner }
    }
}

impl<T, F: Future<Output = Result<T, TaskError>> + ?Sized> Future for CatchUnwind<F> {
    type Output = Result<T, TaskError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.inner.as_mut();
        match guarded(|| inner.poll(cx)) {
            Ok(poll) => poll,
            Err(error) => Poll::Ready(Err(error)),
        }
    }
}
