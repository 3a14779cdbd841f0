//! The one attempt loop every listener drives: pick an endpoint, try it,
//! report how it went, and on failure try another one after a jittered
//! pause, up to the upstream's `retries`.
//!
//! A listener supplies only the protocol step (connect for TCP; connect,
//! send and read the response headers for HTTP) and says how it ended as an
//! [`Outcome`] (see [`Attempts`] for the loop). Everything else happens here, the same way for every
//! listener: which endpoints were tried, the pause between attempts, the
//! pick (never an endpoint already tried), the pick and failure counters,
//! the latency sample, success and failure reporting to the balancer (which
//! ejects an endpoint that keeps failing), and the log lines. A failure
//! that is squire's own ([`ProxyError::Local`]: out of file descriptors,
//! buffers, local ports) is counted apart and never held against the
//! endpoint.

use std::sync::Arc;
use std::time::Duration;

use metrics::{Counter, Histogram};
use tokio::time::Instant;

use super::ProxyError;
use crate::backoff::Backoff;
use crate::balance::{self, now_ms, Endpoint, Snapshot, Upstream};
use crate::config::UpstreamConfig;

/// The most attempts one connection or request makes: the first and at
/// most 16 retries (`upstream.retries` is validated to 0-16).
const MAX_ATTEMPTS: usize = 17;

/// How many times, and how far apart, to try.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts after the first, each on another endpoint.
    pub retries: u32,
    /// Pause before the first retry, jittered and doubled per retry (at
    /// most 8 times this); zero retries at once.
    pub backoff: Duration,
    /// How long the first attempt waits for an endpoint when there is none
    /// to pick; zero fails at once.
    pub endpoint_wait: Duration,
}

impl RetryPolicy {
    pub fn of(config: &UpstreamConfig) -> RetryPolicy {
        RetryPolicy {
            retries: config.retries,
            backoff: config.retry_backoff,
            endpoint_wait: config.endpoint_wait,
        }
    }
}

/// Metric handles resolved once per listener, not per attempt.
pub struct AttemptMetrics {
    /// Attempts after the first.
    pub retries: Counter,
    /// First attempts that found no endpoint and waited for one.
    pub endpoint_waits: Counter,
    /// Attempts whose endpoint could not be connected to.
    pub connect_failures: Counter,
    /// Time from the start of an attempt to the endpoint's answer, for
    /// attempts that got one.
    pub latency: Histogram,
}

/// One attempt: which endpoint, and whether another could follow.
pub struct Attempt {
    index: usize,
    /// Whether another endpoint could be tried after this one: the step
    /// needs it to decide whether a failure is worth a retry at all (and
    /// must not spend retry budget when it is not).
    pub more: bool,
    started: Instant,
}

/// How one attempt ended.
pub enum Outcome<T> {
    /// The endpoint served: a success, and the result.
    Served(T),
    /// The endpoint answered, but with a failure (an HTTP 5xx) that is the
    /// result all the same: counts as a failure, no retry.
    Answered(T, ProxyError),
    /// The endpoint failed and another one may be tried.
    Retry(ProxyError),
    /// The endpoint answered with a failure (an HTTP 503) worth trying
    /// elsewhere; if no other endpoint is left, the answer is the result.
    RetryOr(T, ProxyError),
    /// The endpoint failed and nothing more may be tried.
    Fail(ProxyError),
}

/// The attempts of one connection or request on one upstream's endpoints.
///
/// Driven as
///
/// ```text
/// let mut attempts = Attempts::new(&upstream, policy, key, &metrics);
/// while let Some(attempt) = attempts.next().await {
///     let outcome = step(attempts.endpoint(&attempt)).await;
///     if let Some(result) = attempts.report(attempt, outcome) {
///         return result;
///     }
/// }
/// attempts.finish()
/// ```
pub struct Attempts<'a, T> {
    upstream: &'a Upstream,
    policy: RetryPolicy,
    key: Option<u64>,
    /// The instance a pinned connection or request names: exactly that
    /// one, one attempt, or the refusal.
    pinned: Option<&'a str>,
    metrics: &'a AttemptMetrics,
    /// One snapshot for all attempts, so `tried` indices stay meaningful.
    snapshot: Arc<Snapshot>,
    tried: [usize; MAX_ATTEMPTS],
    count: usize,
    backoff: Backoff,
    /// What the last failed attempt leaves if no other one serves.
    last: Option<Result<T, ProxyError>>,
}

impl<'a, T> Attempts<'a, T> {
    /// `key` is the affinity hash for strategies that use one.
    pub fn new(
        upstream: &'a Upstream,
        policy: RetryPolicy,
        key: Option<u64>,
        metrics: &'a AttemptMetrics,
    ) -> Self {
        Attempts {
            upstream,
            policy,
            key,
            pinned: None,
            metrics,
            snapshot: upstream.snapshot(),
            tried: [0; MAX_ATTEMPTS],
            count: 0,
            backoff: Backoff::new(policy.backoff, policy.backoff.saturating_mul(8)),
            last: None,
        }
    }

    /// Pins the attempts to instance `id` (`ROUTE @id`,
    /// `X-Squire-Instance`): one attempt on exactly that instance, no
    /// retry elsewhere, no wait; when it is unknown or cannot take traffic
    /// [`finish`](Attempts::finish) says which.
    pub fn pinned(mut self, id: Option<&'a str>) -> Self {
        self.pinned = id;
        self
    }

    /// The one attempt of a pinned pick, or the refusal left for `finish`.
    fn next_pinned(&mut self, id: &str) -> Option<Attempt> {
        if self.count > 0 {
            return None;
        }
        match balance::pinned::pick(&self.snapshot, id, now_ms()) {
            Ok(index) => {
                self.tried[0] = index;
                self.count = 1;
                self.snapshot.endpoints()[index].stats.picked();
                Some(Attempt {
                    index,
                    more: false,
                    started: Instant::now(),
                })
            }
            Err(refusal) => {
                self.last = Some(Err(ProxyError::pinned(
                    self.upstream.service(),
                    id,
                    refusal,
                )));
                None
            }
        }
    }

    /// The next attempt, after the pause a retry waits; `None` when the
    /// attempts are used up or no untried endpoint is left.
    pub async fn next(&mut self) -> Option<Attempt> {
        if let Some(id) = self.pinned {
            return self.next_pinned(id);
        }
        let attempts = (self.policy.retries as usize + 1).min(MAX_ATTEMPTS);
        if self.count >= attempts {
            return None;
        }
        if self.count > 0 && !self.policy.backoff.is_zero() {
            tokio::time::sleep(self.backoff.next(true)).await;
        }
        let balancer = self.upstream.balancer();
        let context = balance::Context::new(now_ms())
            .with_key(self.key)
            .with_tried(&self.tried[..self.count]);
        let index = match balancer.pick(&self.snapshot, &context) {
            Some(index) => index,
            None if self.count == 0 && !self.policy.endpoint_wait.is_zero() => {
                self.wait_for_endpoint().await?
            }
            None => return None,
        };
        if self.count > 0 {
            self.metrics.retries.increment(1);
        }
        self.tried[self.count] = index;
        self.count += 1;
        self.snapshot.endpoints()[index].stats.picked();
        // Panic mode picks among standby endpoints too.
        let pickable = if balancer.in_panic() {
            self.snapshot.endpoints().len()
        } else {
            self.snapshot.len()
        };
        Some(Attempt {
            index,
            more: self.count < attempts && self.count < pickable,
            started: Instant::now(),
        })
    }

    /// With nothing to pick at the first attempt, waits up to the policy's
    /// `endpoint_wait` for a rebuild of the snapshot that offers an
    /// endpoint, and picks it: an instance that re-registers (its key lost
    /// and written again), or the first instance of a service that is
    /// coming up, costs its clients a short wait instead of a refusal.
    async fn wait_for_endpoint(&mut self) -> Option<usize> {
        self.metrics.endpoint_waits.increment(1);
        let deadline = Instant::now() + self.policy.endpoint_wait;
        // Subscribed before the snapshot is read again, so a rebuild in
        // between is seen.
        let mut changes = self.upstream.changes();
        loop {
            self.snapshot = self.upstream.snapshot();
            let context = balance::Context::new(now_ms()).with_key(self.key);
            if let Some(index) = self.upstream.balancer().pick(&self.snapshot, &context) {
                return Some(index);
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => continue,
                // The deadline, or the upstream is gone (a reload replaced it).
                Ok(Err(_)) | Err(_) => return None,
            }
        }
    }

    /// The endpoint of `attempt`.
    pub fn endpoint(&self, attempt: &Attempt) -> &Endpoint {
        &self.snapshot.endpoints()[attempt.index]
    }

    /// Records how `attempt` ended: the latency sample of an answer, a
    /// success, or a failure (which may eject the endpoint). Returns the
    /// result when the attempts are over, `None` when another may follow.
    pub fn report(
        &mut self,
        attempt: Attempt,
        outcome: Outcome<T>,
    ) -> Option<Result<T, ProxyError>> {
        let endpoint = &self.snapshot.endpoints()[attempt.index];
        // An answer, good or bad, is a latency sample; a failed connect or
        // a timeout is not (it would teach response_time nothing true).
        if matches!(
            outcome,
            Outcome::Served(_) | Outcome::Answered(..) | Outcome::RetryOr(..)
        ) {
            let elapsed = attempt.started.elapsed();
            self.metrics.latency.record(elapsed.as_secs_f64());
            endpoint.stats.record_latency(elapsed, now_ms());
        }
        let (value, error, retry) = match outcome {
            Outcome::Served(value) => {
                endpoint.stats.record_success();
                return Some(Ok(value));
            }
            Outcome::Answered(value, error) => (Some(value), error, false),
            Outcome::Retry(error) => (None, error, true),
            Outcome::RetryOr(value, error) => (Some(value), error, true),
            Outcome::Fail(error) => (None, error, false),
        };
        if let ProxyError::Local { kind, .. } = &error {
            // Not the endpoint's doing, and another would fail alike: no
            // failure recorded, no retry.
            super::error::local_error(kind, "connect failed", &error);
            return Some(value.ok_or(error));
        }
        if error.is_connect() {
            self.metrics.connect_failures.increment(1);
        }
        record_failure(self.upstream, &self.snapshot, attempt.index, &error);
        let result = value.ok_or(error);
        if !retry {
            return Some(result);
        }
        self.last = Some(result);
        None
    }

    /// Where `attempt` went, kept by a protocol whose endpoint can fail
    /// after the attempt served (a UDP session's instance that refuses a
    /// later datagram): see [`Placed::failed`].
    pub fn placed(&self, attempt: &Attempt) -> Placed {
        Placed {
            snapshot: self.snapshot.clone(),
            index: attempt.index,
        }
    }

    /// The result when no attempt served and none is left: what the last
    /// one left (an answer to pass on, or its error), or no endpoint at all.
    pub fn finish(self) -> Result<T, ProxyError> {
        self.last.unwrap_or_else(|| {
            Err(ProxyError::NoHealthyEndpoint {
                service: self.upstream.service().to_owned(),
            })
        })
    }
}

/// The endpoint a served attempt went to.
pub struct Placed {
    snapshot: Arc<Snapshot>,
    index: usize,
}

impl Placed {
    pub fn endpoint(&self) -> &Endpoint {
        &self.snapshot.endpoints()[self.index]
    }

    /// The endpoint failed after it served: recorded like a failed
    /// attempt (it may be ejected), without a retry.
    pub fn failed(&self, upstream: &Upstream, error: &ProxyError) {
        record_failure(upstream, &self.snapshot, self.index, error);
    }
}

/// Records a failure of `snapshot.endpoints()[index]` with the balancer,
/// which may eject it, and logs it.
fn record_failure(upstream: &Upstream, snapshot: &Snapshot, index: usize, error: &ProxyError) {
    let endpoint = &snapshot.endpoints()[index];
    match upstream
        .balancer()
        .record_failure(snapshot, index, now_ms())
    {
        Some(out_for) => tracing::warn!(
            upstream = %upstream.service(),
            endpoint = %endpoint.instance.id,
            ejected_for = ?out_for,
            error = %error,
            "ejecting an endpoint after consecutive failures"
        ),
        None => tracing::debug!(
            upstream = %upstream.service(),
            endpoint = %endpoint.instance.id,
            error = %error,
            "attempt failed"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::{Balancer, EjectionPolicy, Filter, OwnAddrs, Resolved, Strategy};
    use crate::registry::Instance;

    fn upstream() -> Arc<Upstream> {
        let balancer = Balancer::new(Strategy::RoundRobin, EjectionPolicy::default(), 0.0);
        Arc::new(Upstream::new("svc", Filter::default(), balancer))
    }

    fn instance(id: &str) -> Vec<Resolved> {
        Resolved::literal(Instance::for_tests(id))
            .into_iter()
            .collect()
    }

    fn metrics() -> AttemptMetrics {
        AttemptMetrics {
            retries: Counter::noop(),
            endpoint_waits: Counter::noop(),
            connect_failures: Counter::noop(),
            latency: Histogram::noop(),
        }
    }

    fn policy(endpoint_wait: Duration) -> RetryPolicy {
        RetryPolicy {
            retries: 0,
            backoff: Duration::ZERO,
            endpoint_wait,
        }
    }

    /// The id of the endpoint the first attempt picks, if any.
    async fn first_pick(upstream: &Upstream, policy: RetryPolicy) -> Option<String> {
        let metrics = metrics();
        let mut attempts = Attempts::<()>::new(upstream, policy, None, &metrics);
        let attempt = attempts.next().await?;
        Some(attempts.endpoint(&attempt).instance.id.clone())
    }

    #[tokio::test(start_paused = true)]
    async fn a_first_attempt_waits_for_an_endpoint_that_appears() {
        let upstream = upstream();
        let later = upstream.clone();
        let appears = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            later.refresh(&instance("back"), &OwnAddrs::default());
        });
        let started = Instant::now();
        let picked = first_pick(&upstream, policy(Duration::from_secs(1))).await;
        assert_eq!(picked.as_deref(), Some("back"));
        assert_eq!(started.elapsed(), Duration::from_millis(300));
        appears.await.expect("refresh task");
    }

    #[tokio::test(start_paused = true)]
    async fn the_wait_ends_at_endpoint_wait_and_a_rebuild_without_endpoints_does_not_end_it() {
        let upstream = upstream();
        let later = upstream.clone();
        let empty = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            later.refresh(&[], &OwnAddrs::default());
        });
        let started = Instant::now();
        assert_eq!(
            first_pick(&upstream, policy(Duration::from_secs(1))).await,
            None
        );
        assert_eq!(started.elapsed(), Duration::from_secs(1));
        empty.await.expect("refresh task");
    }

    #[tokio::test(start_paused = true)]
    async fn a_pinned_pick_makes_one_attempt_on_its_instance_or_says_why_not() {
        let upstream = upstream();
        let mut both = instance("a");
        both.extend(instance("b"));
        upstream.refresh(&both, &OwnAddrs::default());
        let metrics = metrics();
        let retrying = RetryPolicy {
            retries: 3,
            ..policy(Duration::from_secs(1))
        };
        // Three failures in a row (the default) eject it.
        for _ in 0..3 {
            let mut attempts =
                Attempts::<()>::new(&upstream, retrying, None, &metrics).pinned(Some("b"));
            let attempt = attempts.next().await.expect("b is routable");
            assert_eq!(attempts.endpoint(&attempt).instance.id, "b");
            assert!(!attempt.more, "no retry elsewhere");
            let failed = ProxyError::NoRoute;
            assert!(attempts.report(attempt, Outcome::Retry(failed)).is_none());
            assert!(attempts.next().await.is_none(), "one attempt only");
        }
        let mut attempts =
            Attempts::<()>::new(&upstream, retrying, None, &metrics).pinned(Some("b"));
        assert!(
            attempts.next().await.is_none(),
            "ejected: not rerouted to a"
        );
        let error = attempts.finish().expect_err("refused");
        assert_eq!(error.reason(), "pinned_unavailable");
        let started = Instant::now();
        let mut attempts =
            Attempts::<()>::new(&upstream, retrying, None, &metrics).pinned(Some("zz"));
        assert!(attempts.next().await.is_none());
        assert_eq!(started.elapsed(), Duration::ZERO, "no endpoint_wait");
        let error = attempts.finish().expect_err("refused");
        assert_eq!(error.reason(), "pinned_unknown");
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_endpoint_wait_fails_at_once() {
        let upstream = upstream();
        let started = Instant::now();
        assert_eq!(first_pick(&upstream, policy(Duration::ZERO)).await, None);
        assert_eq!(started.elapsed(), Duration::ZERO);
    }
}
