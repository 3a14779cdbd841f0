//! systemd's service notifications (sd_notify(3)), for `Type=notify`
//! units: `READY=1` once `/ready` would answer ready, `RELOADING=1` and
//! `READY=1` around a reload, `STOPPING=1` when shutdown starts, and
//! `WATCHDOG=1` every half `WatchdogSec=` while the runtime is alive.
//!
//! The protocol is one datagram per message to the unix socket named by
//! `$NOTIFY_SOCKET` (a path, or `@name` for an abstract socket). Without
//! it (not under systemd) every call does nothing. A message that cannot
//! be sent is logged at debug and dropped: systemd's own timeouts decide
//! what a missing one means.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

pub struct Notifier {
    socket: Option<(UnixDatagram, std::os::unix::net::SocketAddr)>,
    /// Half of `$WATCHDOG_USEC`, when the watchdog is ours
    /// (`$WATCHDOG_PID` unset or this process).
    watchdog: Option<Duration>,
}

impl Notifier {
    pub fn from_env() -> Notifier {
        let socket = std::env::var_os("NOTIFY_SOCKET").and_then(|path| {
            let path = path.to_string_lossy().into_owned();
            let addr = match path.strip_prefix('@') {
                Some(name) => {
                    use std::os::linux::net::SocketAddrExt;
                    std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
                }
                None => std::os::unix::net::SocketAddr::from_pathname(&path),
            };
            match (UnixDatagram::unbound(), addr) {
                (Ok(socket), Ok(addr)) => Some((socket, addr)),
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!(notify_socket = %path, error = %e, "cannot use NOTIFY_SOCKET; no systemd notifications");
                    None
                }
            }
        });
        let ours = std::env::var("WATCHDOG_PID")
            .ok()
            .is_none_or(|pid| pid.trim() == std::process::id().to_string());
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|usec| usec.trim().parse::<u64>().ok())
            .filter(|usec| *usec > 0 && ours)
            .map(|usec| Duration::from_micros(usec) / 2);
        Notifier { socket, watchdog }
    }

    /// Sends `state` (newline-separated `KEY=value` lines).
    pub fn send(&self, state: &str) {
        let Some((socket, addr)) = &self.socket else {
            return;
        };
        if let Err(e) = socket.send_to_addr(state.as_bytes(), addr) {
            tracing::debug!(error = %e, state, "systemd notification not sent");
        }
    }

    /// `RELOADING=1` with the `MONOTONIC_USEC` systemd 253+ asks for.
    pub fn reloading(&self) {
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes only into `now`.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
        let usec = now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1_000;
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
    }

    /// How often to send `WATCHDOG=1`, when systemd asked for it.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
    }

    pub fn enabled(&self) -> bool {
        self.socket.is_some()
    }
}

/// Sends `READY=1` once `ready()` holds (checked every 100 ms), then
/// `WATCHDOG=1` every watchdog interval until the task is dropped.
pub async fn ready_and_watchdog(notifier: std::sync::Arc<Notifier>, ready: impl Fn() -> bool) {
    if !notifier.enabled() {
        return;
    }
    let mut poll = tokio::time::interval(Duration::from_millis(100));
    loop {
        poll.tick().await;
        if ready() {
            notifier.send("READY=1\nSTATUS=ready");
            break;
        }
    }
    let Some(every) = notifier.watchdog_interval() else {
        return;
    };
    let mut ticks = tokio::time::interval(every);
    loop {
        ticks.tick().await;
        notifier.send("WATCHDOG=1");
    }
}
