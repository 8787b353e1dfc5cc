//! A provider's rate limits (`rate_per_second`, `rate_per_day`, `max_in_flight`): sends beyond
//! them wait, never fail. The sender actor asks [`RateLimiter::reserve`] for the moment a send
//! may start; a send whose moment is further away than [`MAX_WAIT`] is not held (its delivery
//! would pin a prefetch slot that other providers need, and the broker cancels consumers whose
//! deliveries stay unacknowledged for half an hour) but parked in a delay queue without
//! counting as a retry, and comes back to reserve again.
//!
//! `rate_per_second` is a GCRA (a token bucket of `ceil(rate)` sends refilled at `rate` per
//! second); `rate_per_day` counts sends in 24-hour windows starting with the first send. Both
//! are per instance and in memory: a restart starts the day's count again.

use std::hash::Hash;
use std::time::{Duration, Instant};

/// The longest a send is held waiting for its rate; beyond this it is parked.
pub const MAX_WAIT: Duration = Duration::from_secs(20);

const DAY: Duration = Duration::from_secs(86_400);

/// A provider's limits, as configured (or its kind's documented defaults).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RateLimits {
    pub per_second: Option<f64>,
    pub per_day: Option<u64>,
    /// At most this many sends at once, beyond `max_connections`' bound on connections.
    pub max_in_flight: Option<u32>,
}

impl RateLimits {
    /// Feeds the limits into a fingerprint (floats by their bits).
    pub fn hash_into(&self, h: &mut impl std::hash::Hasher) {
        self.per_second.map(f64::to_bits).hash(h);
        self.per_day.hash(h);
        self.max_in_flight.hash(h);
    }

    /// `self` where set, else `defaults`.
    pub fn or(self, defaults: RateLimits) -> RateLimits {
        RateLimits {
            per_second: self.per_second.or(defaults.per_second),
            per_day: self.per_day.or(defaults.per_day),
            max_in_flight: self.max_in_flight.or(defaults.max_in_flight),
        }
    }
}

/// When a send may start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// Now, or after this wait (at most [`MAX_WAIT`]); the send is counted.
    After(Duration),
    /// Not within [`MAX_WAIT`]: come back after this long at least (nothing was counted).
    Park { wait: Duration, limit: Limit },
}

/// Which limit holds a send back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    PerSecond,
    PerDay,
}

/// One provider's limiter.
#[derive(Debug)]
pub struct RateLimiter {
    limits: RateLimits,
    /// GCRA: the theoretical arrival time of the next send.
    tat: Option<Instant>,
    /// The current 24-hour window and the sends counted in it (those waiting for the next
    /// windows included: send number `n` of a window belongs to window `n / per_day`).
    day_start: Option<Instant>,
    day_count: u64,
}

impl RateLimiter {
    pub fn new(limits: RateLimits) -> Self {
        Self {
            limits,
            tat: None,
            day_start: None,
            day_count: 0,
        }
    }

    pub fn limits(&self) -> RateLimits {
        self.limits
    }

    /// The moment a send asked for at `now` may start.
    pub fn reserve(&mut self, now: Instant) -> Slot {
        let mut wait = Duration::ZERO;
        let mut limit = Limit::PerSecond;
        // The day's window first: a send that must wait for tomorrow is not charged today's
        // per-second budget.
        if let Some(per_day) = self.limits.per_day.filter(|n| *n > 0) {
            let start = *self.day_start.get_or_insert(now);
            let elapsed = now.saturating_duration_since(start);
            if elapsed >= DAY {
                let windows = (elapsed.as_secs() / DAY.as_secs()).max(1);
                self.day_start = Some(start + DAY * windows as u32);
                self.day_count = self.day_count.saturating_sub(per_day * windows);
            }
            let start = self.day_start.unwrap_or(now);
            let window = self.day_count / per_day;
            if window > 0 {
                let opens = start + DAY * window.min(u32::MAX as u64) as u32;
                wait = opens.saturating_duration_since(now);
                limit = Limit::PerDay;
            }
        }
        let (gcra_wait, new_tat) = match self.limits.per_second.filter(|r| *r > 0.0) {
            Some(rate) => {
                let interval = Duration::from_secs_f64((1.0 / rate).min(DAY.as_secs_f64()));
                let burst = rate.ceil().max(1.0);
                let tolerance = interval.mul_f64(burst - 1.0);
                let at = now + wait;
                let tat = self.tat.unwrap_or(at).max(at);
                let earliest = tat.checked_sub(tolerance).unwrap_or(at).max(at);
                (earliest.saturating_duration_since(at), Some(tat + interval))
            }
            None => (Duration::ZERO, None),
        };
        if gcra_wait > wait {
            limit = Limit::PerSecond;
        }
        let total = wait + gcra_wait;
        if total > MAX_WAIT {
            return Slot::Park { wait: total, limit };
        }
        if new_tat.is_some() {
            self.tat = new_tat;
        }
        if self.limits.per_day.is_some() {
            self.day_count += 1;
        }
        Slot::After(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_second: Option<f64>, per_day: Option<u64>) -> RateLimits {
        RateLimits {
            per_second,
            per_day,
            max_in_flight: None,
        }
    }

    fn waits(l: &mut RateLimiter, now: Instant, n: usize) -> Vec<Slot> {
        (0..n).map(|_| l.reserve(now)).collect()
    }

    #[test]
    fn no_limits_never_wait() {
        let mut l = RateLimiter::new(RateLimits::default());
        let now = Instant::now();
        assert!(waits(&mut l, now, 1000)
            .iter()
            .all(|s| *s == Slot::After(Duration::ZERO)));
    }

    #[test]
    fn per_second_allows_a_burst_of_the_rate_then_spaces_sends() {
        let mut l = RateLimiter::new(limits(Some(2.0), None));
        let now = Instant::now();
        let slots = waits(&mut l, now, 6);
        let ms: Vec<u128> = slots
            .iter()
            .map(|s| match s {
                Slot::After(d) => d.as_millis(),
                Slot::Park { .. } => u128::MAX,
            })
            .collect();
        assert_eq!(ms, [0, 0, 500, 1000, 1500, 2000]);
        // After the bucket refills, the burst is there again.
        let later = now + Duration::from_secs(10);
        assert_eq!(l.reserve(later), Slot::After(Duration::ZERO));
        assert_eq!(l.reserve(later), Slot::After(Duration::ZERO));
        assert_eq!(l.reserve(later), Slot::After(Duration::from_millis(500)));
    }

    #[test]
    fn sends_beyond_the_longest_wait_are_parked_uncounted() {
        // One send a second: the 22nd in the same instant would wait 21 s.
        let mut l = RateLimiter::new(limits(Some(1.0), None));
        let now = Instant::now();
        let slots = waits(&mut l, now, 21);
        assert_eq!(slots[20], Slot::After(Duration::from_secs(20)));
        match l.reserve(now) {
            Slot::Park { wait, limit } => {
                assert_eq!(wait, Duration::from_secs(21));
                assert_eq!(limit, Limit::PerSecond);
            }
            other => panic!("{other:?}"),
        }
        // Parking counted nothing: the same wait again.
        assert!(
            matches!(l.reserve(now), Slot::Park { wait, .. } if wait == Duration::from_secs(21))
        );
        // A second later one slot is free within the bound.
        assert_eq!(
            l.reserve(now + Duration::from_secs(1)),
            Slot::After(Duration::from_secs(20))
        );
    }

    #[test]
    fn per_day_parks_until_the_window_turns() {
        let mut l = RateLimiter::new(limits(None, Some(3)));
        let now = Instant::now();
        assert!(waits(&mut l, now, 3)
            .iter()
            .all(|s| *s == Slot::After(Duration::ZERO)));
        let hour_later = now + Duration::from_secs(3600);
        match l.reserve(hour_later) {
            Slot::Park { wait, limit } => {
                assert_eq!(wait, Duration::from_secs(23 * 3600));
                assert_eq!(limit, Limit::PerDay);
            }
            other => panic!("{other:?}"),
        }
        // The next window has the whole allowance again.
        let next_day = now + DAY + Duration::from_secs(1);
        assert!(waits(&mut l, next_day, 3)
            .iter()
            .all(|s| *s == Slot::After(Duration::ZERO)));
        assert!(matches!(l.reserve(next_day), Slot::Park { .. }));
        // Days later, the count starts over.
        assert_eq!(l.reserve(now + DAY * 5), Slot::After(Duration::ZERO));
    }

    #[test]
    fn tiny_rates_do_not_overflow() {
        let mut l = RateLimiter::new(limits(Some(1e-12), Some(1)));
        let now = Instant::now();
        assert_eq!(l.reserve(now), Slot::After(Duration::ZERO));
        assert!(matches!(l.reserve(now), Slot::Park { .. }));
    }
}
