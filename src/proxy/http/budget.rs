//! How many retries an HTTP listener may spend: a share of its requests.

use std::sync::atomic::{AtomicU64, Ordering};

/// Retries allowed as a share of requests, with a small reserve so a
/// quiet listener can still retry: each request deposits `ratio`, each
/// retry withdraws one. Kept in thousandths in one atomic.
pub struct RetryBudget {
    deposit: i64,
    balance: AtomicU64,
}

const UNIT: i64 = 1000;
const RESERVE: i64 = 10 * UNIT;
const CAP: i64 = 100 * UNIT;

impl RetryBudget {
    pub fn new(ratio: f64) -> Self {
        RetryBudget {
            deposit: (ratio * UNIT as f64) as i64,
            balance: AtomicU64::new(RESERVE as u64),
        }
    }

    /// One request came in.
    pub fn deposit(&self) {
        // The closure never returns None, so the update cannot fail.
        let _ = self
            .balance
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some((b as i64 + self.deposit).min(CAP) as u64)
            });
    }

    /// Takes one retry if the budget allows.
    pub fn withdraw(&self) -> bool {
        self.balance
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                (b as i64 >= UNIT).then(|| b - UNIT as u64)
            })
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_retry_budget_is_a_share_of_requests() {
        let budget = RetryBudget::new(0.2);
        let mut granted = 0;
        for _ in 0..1000 {
            budget.deposit();
            if budget.withdraw() {
                granted += 1;
            }
        }
        // 10 in reserve, then one per five requests.
        assert!((200..=215).contains(&granted), "{granted}");
    }
}
