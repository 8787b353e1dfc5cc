//! Connection pacing per mail server host (`connect_rate_per_host`): thousands of fetchers
//! starting at once, or reconnecting after a server restart, log in at a steady rate rather
//! than all at once, so no server is hammered and the actors' thread never has thousands of
//! TLS handshakes in one go.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// The next free login slot of each host, shared by every fetcher of the process.
#[derive(Debug, Default)]
pub struct ConnectPacer {
    next: Mutex<HashMap<String, Instant>>,
}

impl ConnectPacer {
    /// Waits for this host's next slot, `1 / rate` after the one before it (`rate` in
    /// connections per second; no wait when the host had no recent connection).
    pub async fn wait(&self, host: &str, rate: f64) {
        let slot = self.reserve(host, rate, Instant::now());
        tokio::time::sleep_until(slot).await;
    }

    /// Takes this host's next slot at or after `now`.
    fn reserve(&self, host: &str, rate: f64, now: Instant) -> Instant {
        let gap = if rate.is_finite() && rate > 0.0 {
            Duration::from_secs_f64((1.0 / rate).min(3600.0))
        } else {
            Duration::ZERO
        };
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        let slot = next.get(host).copied().filter(|s| *s > now).unwrap_or(now);
        next.insert(host.to_string(), slot + gap);
        // Hosts not used for a while are forgotten (a reload may drop them for good).
        if next.len() > 1024 {
            next.retain(|_, s| *s > now);
        }
        slot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logins_to_one_host_are_spaced_and_other_hosts_are_not_held_up() {
        let pacer = ConnectPacer::default();
        let t0 = Instant::now();
        let slots: Vec<Duration> = (0..5)
            .map(|_| pacer.reserve("imap.example.com", 10.0, t0) - t0)
            .collect();
        assert_eq!(
            slots,
            (0..5)
                .map(|i| Duration::from_millis(100 * i))
                .collect::<Vec<_>>()
        );
        assert_eq!(pacer.reserve("other.example.com", 10.0, t0), t0);
        // Once the slots are past, a login goes at once again.
        let later = t0 + Duration::from_secs(5);
        assert_eq!(pacer.reserve("imap.example.com", 10.0, later), later);
    }
}
