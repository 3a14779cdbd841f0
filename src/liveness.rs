//! Whether the process is still trustworthy: a panic anywhere (any task,
//! a connection, a library's own spawned task) is a bug that may have left
//! state half updated, so it is logged, counted (`squire_panics_total`) and
//! makes `GET /live` fail, so a supervisor restarts squire, instead of
//! being swallowed by the runtime that caught it.
//!
//! The hook is process-wide and installed by the binary (`squire run`):
//! a program embedding several agents decides for itself.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use crate::metrics as m;

static PANICS: AtomicU64 = AtomicU64::new(0);
static FIRST: OnceLock<String> = OnceLock::new();

/// Installs the panic hook: every panic is recorded, then handled as
/// before (the default hook prints it).
pub fn install_panic_hook() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current();
        let message = match info.location() {
            Some(at) => format!(
                "{} at {}:{} (thread {})",
                payload(info.payload()),
                at.file(),
                at.line(),
                thread.name().unwrap_or("unnamed")
            ),
            None => payload(info.payload()).to_owned(),
        };
        record(message);
        previous(info);
    }));
}

/// Records one panic.
pub fn record(message: String) {
    PANICS.fetch_add(1, Ordering::Relaxed);
    metrics::counter!(m::PANICS).increment(1);
    tracing::error!(panic = %message, "a task panicked; /live fails from now on so a supervisor restarts squire");
    // Only the first is kept: it is the likeliest cause of what follows.
    let _ = FIRST.set(message);
}

/// `None` while no panic happened; else the first panic's message.
pub fn failure() -> Option<&'static str> {
    FIRST.get().map(String::as_str)
}

/// Panics so far.
pub fn panics() -> u64 {
    PANICS.load(Ordering::Relaxed)
}

fn payload(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_in_a_task_is_recorded_and_fails_liveness() {
        install_panic_hook();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let before = panics();
        let joined =
            runtime.block_on(async { tokio::spawn(async { panic!("invariant broken") }).await });
        assert!(joined.is_err_and(|e| e.is_panic()), "the runtime caught it");
        assert_eq!(panics(), before + 1, "the hook saw it anyway");
        assert!(
            failure().is_some_and(|m| m.contains("invariant broken")),
            "{:?}",
            failure()
        );
    }
}
