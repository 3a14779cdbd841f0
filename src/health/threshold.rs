//! The rise/fall state machine of one check. Pure: time comes in as a value.

use serde::Serialize;
use tokio::time::Instant;

/// The result of one probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Passing,
    /// The service answers but reports degraded service (HTTP 429, exec 1).
    Warning,
    Critical,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Passing => "passing",
            Outcome::Warning => "warning",
            Outcome::Critical => "critical",
        }
    }

    fn is_up(self) -> bool {
        self != Outcome::Critical
    }
}

/// What a check says after its thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckStatus {
    /// Not yet `rise` passes nor `fall` failures since start.
    Unknown,
    Passing,
    Warning,
    Critical,
}

impl CheckStatus {
    pub const ALL: [CheckStatus; 4] = [
        CheckStatus::Unknown,
        CheckStatus::Passing,
        CheckStatus::Warning,
        CheckStatus::Critical,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CheckStatus::Unknown => "unknown",
            CheckStatus::Passing => "passing",
            CheckStatus::Warning => "warning",
            CheckStatus::Critical => "critical",
        }
    }

    pub fn is_up(self) -> bool {
        matches!(self, CheckStatus::Passing | CheckStatus::Warning)
    }
}

/// Consecutive results against `rise` and `fall`.
///
/// A check starts `Unknown` and only `rise` consecutive passes make it
/// `Passing` (or `Warning`, by the latest result); `fall` consecutive
/// failures make it `Critical` from any state. Once up, passing and warning
/// results switch between `Passing` and `Warning` at once: both are up.
#[derive(Debug, Clone)]
pub struct Threshold {
    rise: u32,
    fall: u32,
    status: CheckStatus,
    /// Length of the current run of up (or of down) results.
    streak: u32,
    streak_up: bool,
    since: Instant,
}

impl Threshold {
    pub fn new(rise: u32, fall: u32, now: Instant) -> Self {
        Threshold {
            rise: rise.max(1),
            fall: fall.max(1),
            status: CheckStatus::Unknown,
            streak: 0,
            streak_up: false,
            since: now,
        }
    }

    /// Takes one result; returns the new status if it changed.
    pub fn record(&mut self, outcome: Outcome, now: Instant) -> Option<CheckStatus> {
        if outcome.is_up() == self.streak_up {
            self.streak = self.streak.saturating_add(1);
        } else {
            self.streak = 1;
            self.streak_up = outcome.is_up();
        }
        let next = match outcome {
            Outcome::Critical if self.streak >= self.fall => CheckStatus::Critical,
            Outcome::Critical => self.status,
            up => {
                let up = if up == Outcome::Passing {
                    CheckStatus::Passing
                } else {
                    CheckStatus::Warning
                };
                if self.status.is_up() || self.streak >= self.rise {
                    up
                } else {
                    self.status
                }
            }
        };
        if next == self.status {
            return None;
        }
        self.status = next;
        self.since = now;
        Some(next)
    }

    pub fn status(&self) -> CheckStatus {
        self.status
    }

    /// The current run of consecutive results: its length and whether up.
    pub fn streak(&self) -> (u32, bool) {
        (self.streak, self.streak_up)
    }

    pub fn since(&self) -> Instant {
        self.since
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use CheckStatus::*;

    #[tokio::test(start_paused = true)]
    async fn starts_unknown_and_rises_only_after_rise_passes() {
        let start = Instant::now();
        let mut t = Threshold::new(2, 3, start);
        assert_eq!(t.status(), Unknown);
        assert_eq!(
            t.record(Outcome::Passing, Instant::now()),
            None,
            "never on the first pass alone"
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(t.record(Outcome::Passing, Instant::now()), Some(Passing));
        assert_eq!(t.since() - start, Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn falls_after_fall_failures_and_a_pass_resets_the_count() {
        let now = Instant::now();
        let mut t = Threshold::new(2, 3, now);
        t.record(Outcome::Passing, now);
        t.record(Outcome::Passing, now);
        assert_eq!(t.record(Outcome::Critical, now), None);
        assert_eq!(t.record(Outcome::Critical, now), None);
        assert_eq!(
            t.record(Outcome::Passing, now),
            None,
            "a pass breaks the failure streak"
        );
        assert_eq!(t.record(Outcome::Critical, now), None);
        assert_eq!(t.record(Outcome::Critical, now), None);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(t.record(Outcome::Critical, Instant::now()), Some(Critical));
        assert_eq!(t.streak(), (3, false));
        // Recovery needs `rise` passes again.
        assert_eq!(t.record(Outcome::Passing, Instant::now()), None);
        assert_eq!(t.record(Outcome::Passing, Instant::now()), Some(Passing));
    }

    #[test]
    fn an_unknown_check_that_keeps_failing_becomes_critical() {
        let now = Instant::now();
        let mut t = Threshold::new(2, 2, now);
        assert_eq!(t.record(Outcome::Critical, now), None);
        assert_eq!(t.record(Outcome::Critical, now), Some(Critical));
    }

    #[test]
    fn warning_and_passing_switch_at_once_while_up() {
        let now = Instant::now();
        let mut t = Threshold::new(3, 3, now);
        for _ in 0..2 {
            t.record(Outcome::Warning, now);
        }
        assert_eq!(t.record(Outcome::Warning, now), Some(Warning));
        assert_eq!(t.record(Outcome::Passing, now), Some(Passing));
        assert_eq!(t.record(Outcome::Warning, now), Some(Warning));
    }

    #[test]
    fn rise_and_fall_of_one_react_to_every_result() {
        let now = Instant::now();
        let mut t = Threshold::new(1, 1, now);
        assert_eq!(t.record(Outcome::Passing, now), Some(Passing));
        assert_eq!(t.record(Outcome::Critical, now), Some(Critical));
        assert_eq!(t.record(Outcome::Passing, now), Some(Passing));
    }
}
