//! `squire_http_requests_total`: one atomic per endpoint, method and status
//! class, counted without a lookup (no five labels hashed per request) and
//! rendered from live state at each scrape, so the series of an endpoint
//! that left goes after the grace period instead of staying forever.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use hyper::{Method, StatusCode};

use crate::metrics::{self as m, LiveSamples, LiveSeries};

const METHODS: [&str; 8] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "other",
];
const STATUSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The request counters of one (upstream, service, endpoint), one per
/// method and status class: plain atomics, rendered as
/// `squire_http_requests_total` at each scrape while these live (a cell
/// that never counted is not rendered). Clones share the counts.
#[derive(Clone)]
pub struct RequestCounters(Arc<Cells>);

struct Cells {
    upstream: String,
    service: String,
    endpoint: String,
    counts: [[AtomicU64; STATUSES.len()]; METHODS.len()],
    /// When the endpoint left its upstream, ms on `balance::now_ms`'s clock; 0
    /// while it is there. Past the grace period nothing is rendered.
    departed_at: AtomicU64,
}

impl RequestCounters {
    pub fn new(upstream: &str, service: &str, endpoint: &str) -> Self {
        let cells = Arc::new(Cells {
            upstream: upstream.to_owned(),
            service: service.to_owned(),
            endpoint: endpoint.to_owned(),
            counts: Default::default(),
            departed_at: AtomicU64::new(0),
        });
        let weak = Arc::downgrade(&cells);
        m::register_live(weak);
        RequestCounters(cells)
    }

    /// Counts one request.
    #[inline]
    pub fn count(&self, method: &Method, status: StatusCode) {
        let (method, status) = (method_class(method), status_class(status));
        self.0.counts[method][status].fetch_add(1, Ordering::Relaxed);
    }

    /// Requests counted for `method` and a status in `status`'s class.
    pub fn get(&self, method: &Method, status: StatusCode) -> u64 {
        let (method, status) = (method_class(method), status_class(status));
        self.0.counts[method][status].load(Ordering::Relaxed)
    }

    /// The endpoint left its upstream at `now` (ms): rendered for the grace
    /// period from then on, unless it [`returned`](Self::returned).
    pub fn departed(&self, now: u64) {
        self.0.departed_at.store(now.max(1), Ordering::Relaxed);
    }

    /// The endpoint is back within the grace period: it counts on.
    pub fn returned(&self) {
        self.0.departed_at.store(0, Ordering::Relaxed);
    }

    /// Whether it left longer than the grace period before `now`.
    pub fn expired(&self, now: u64) -> bool {
        match self.0.departed_at.load(Ordering::Relaxed) {
            0 => false,
            at => m::grace_expired(at, now),
        }
    }
}

impl LiveSeries for Cells {
    fn collect(&self, now: u64, out: &mut LiveSamples) {
        let at = self.departed_at.load(Ordering::Relaxed);
        if at != 0 && m::grace_expired(at, now) {
            return;
        }
        for (method, row) in self.counts.iter().enumerate() {
            for (status, cell) in row.iter().enumerate() {
                let value = cell.load(Ordering::Relaxed);
                if value == 0 {
                    continue;
                }
                let labels = [
                    ("upstream", self.upstream.as_str()),
                    ("service", self.service.as_str()),
                    ("endpoint", self.endpoint.as_str()),
                    ("method", METHODS[method]),
                    ("status", STATUSES[status]),
                ];
                out.add(m::HTTP_REQUESTS, &labels, value);
            }
        }
    }
}

fn method_class(method: &Method) -> usize {
    match *method {
        Method::GET => 0,
        Method::HEAD => 1,
        Method::POST => 2,
        Method::PUT => 3,
        Method::DELETE => 4,
        Method::PATCH => 5,
        Method::OPTIONS => 6,
        _ => 7,
    }
}

fn status_class(status: StatusCode) -> usize {
    match status.as_u16() {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    }
}
