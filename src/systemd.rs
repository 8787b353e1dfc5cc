//! The systemd service protocol (`sd_notify(3)`), without libsystemd: readiness
//! (`READY=1`), the watchdog's keep-alive (`WATCHDOG=1`), reloads and the stop, sent as
//! datagrams to `$NOTIFY_SOCKET`. Outside systemd (no `NOTIFY_SOCKET`) every call does nothing.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

/// Sends `state` (`KEY=value` lines) to the service manager, if there is one. A failure is
/// logged, never fatal: the service works the same without its manager hearing.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = UnixDatagram::unbound().and_then(|socket| {
        let bytes = path.as_encoded_bytes();
        match bytes.strip_prefix(b"@") {
            // An abstract socket (Linux): `@name`.
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                socket.send_to_addr(state.as_bytes(), &addr)
            }
            None => socket.send_to(state.as_bytes(), &path),
        }
    });
    if let Err(e) = sent {
        tracing::warn!(error = %e, "cannot notify the service manager (NOTIFY_SOCKET)");
    }
}

/// The keep-alive systemd expects when the unit sets `WatchdogSec`: fed from the
/// supervisor's tick, so a stuck actor thread stops feeding it and systemd restarts the
/// service.
#[derive(Debug)]
pub struct Watchdog {
    /// Half the watchdog timeout (`$WATCHDOG_USEC`), as sd_watchdog_enabled(3) advises.
    every: Option<Duration>,
    fed: Option<Instant>,
}

impl Watchdog {
    /// The watchdog this process was started with (`$WATCHDOG_USEC`, for this process when
    /// `$WATCHDOG_PID` names it), or one that is off.
    pub fn from_env() -> Self {
        let for_us = std::env::var("WATCHDOG_PID")
            .ok()
            .is_none_or(|pid| pid.trim() == std::process::id().to_string());
        let every = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|us| us.trim().parse::<u64>().ok())
            .filter(|us| for_us && *us > 0)
            .map(|us| Duration::from_micros(us / 2));
        Watchdog { every, fed: None }
    }

    /// Sends `WATCHDOG=1` when half the timeout has passed since the last one.
    pub fn feed(&mut self, now: Instant) {
        let Some(every) = self.every else {
            return;
        };
        if self.fed.is_none_or(|at| now.duration_since(at) >= every) {
            notify("WATCHDOG=1");
            self.fed = Some(now);
        }
    }
}
