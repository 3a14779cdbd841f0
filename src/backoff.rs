//! Jittered exponential backoff for the loops that retry registry calls.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max,
            current: base,
        }
    }

    /// The delay before the next attempt: a random point in the upper half of
    /// the current step (so many agents restarting together spread out),
    /// doubling each time up to `max`. An error that retrying soon cannot fix
    /// waits the full `max`.
    pub fn next(&mut self, retryable: bool) -> Duration {
        if !retryable {
            return self.max;
        }
        let step = self.current;
        // Saturating: a step near `Duration::MAX` (no config reaches one,
        // but `Backoff` takes any durations) stays at `max` instead of
        // panicking on the doubling.
        self.current = self.current.saturating_mul(2).min(self.max);
        let half = step / 2;
        half + rand::rng().random_range(Duration::ZERO..=half)
    }

    /// Back to the first step after a success.
    pub fn reset(&mut self) {
        self.current = self.base;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_within_bounds_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let mut ceiling = Duration::from_millis(100);
        for _ in 0..10 {
            let delay = backoff.next(true);
            assert!(
                delay >= ceiling / 2 && delay <= ceiling,
                "{delay:?} outside {ceiling:?}"
            );
            ceiling = (ceiling * 2).min(Duration::from_secs(2));
        }
        assert_eq!(backoff.next(false), Duration::from_secs(2));
        backoff.reset();
        assert!(backoff.next(true) <= Duration::from_millis(100));
    }

    /// Found by `backoff_stays_within_the_current_step_and_the_maximum` in
    /// tests/properties.rs: doubling a step above `Duration::MAX / 2`
    /// overflowed and panicked.
    #[test]
    fn a_huge_step_saturates_instead_of_overflowing() {
        let base = Duration::from_nanos(1_073_741_824_000_000_000);
        let mut backoff = Backoff::new(base, Duration::MAX);
        // 34 doublings take it past `u64::MAX` seconds.
        for _ in 0..40 {
            assert!(backoff.next(true) <= Duration::MAX);
        }
        assert_eq!(backoff.current, Duration::MAX);
    }
}
