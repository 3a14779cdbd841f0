//! Giving freed memory back to the system.
//!
//! glibc's allocator keeps what a burst of connections freed: a squire that
//! held 10,000 proxied connections stayed at their peak RSS after they all
//! closed (46 MB against 13 MB idle), because the freed chunks sit below the
//! top of each thread's heap, where glibc never trims on its own.
//! `malloc_trim(0)` walks the heaps and releases every free page; run every
//! few seconds it costs microseconds when there is nothing to release.
//!
//! The `squire` binary allocates with mimalloc, which frees into each
//! thread's own heap and purges a page only when that thread allocates or
//! frees again: an idle thread never would. `mi_collect` purges the calling
//! thread's heap, so every runtime thread trims itself when it goes idle
//! ([`trim_if_due`], from the runtime's park hook), and the agent's trim
//! task trims every [`TRIM_EVERY`] wherever it runs.

use std::cell::Cell;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How often freed memory is released.
pub const TRIM_EVERY: Duration = Duration::from_secs(5);

/// Releases freed memory every [`TRIM_EVERY`] until `stop`.
pub async fn trim_periodically(stop: CancellationToken) {
    let mut ticks = tokio::time::interval(TRIM_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => trim(),
        }
    }
}

/// [`trim`], when this thread last did so [`TRIM_EVERY`] ago or longer:
/// the runtime calls it each time a worker parks, so it costs a clock read
/// when not due.
pub fn trim_if_due() {
    thread_local! {
        static LAST: Cell<Option<Instant>> = const { Cell::new(None) };
    }
    let now = Instant::now();
    let due = LAST.with(|last| match last.get() {
        Some(at) if now.duration_since(at) < TRIM_EVERY => false,
        _ => {
            last.set(Some(now));
            true
        }
    });
    if due {
        trim();
    }
}

/// Releases what both allocators hold free: mimalloc (the `squire`
/// binary's) and glibc's (which the library's users may keep). Either is a
/// no-op for the allocator not in use.
pub fn trim() {
    // SAFETY: mi_collect only frees and purges pages of mimalloc's own
    // heaps (this thread's, and abandoned ones with `force`).
    unsafe {
        libmimalloc_sys::mi_collect(true);
    }
    trim_glibc();
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim_glibc() {
    // SAFETY: malloc_trim only inspects and releases the allocator's own
    // free memory; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_glibc() {}
