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
        self.current = (self.current * 2).min(self.max);
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
}
