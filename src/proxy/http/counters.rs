//! `squire_http_requests_total` handles, resolved once per endpoint and
//! outcome class rather than looked up (five labels hashed) per request.

use std::sync::OnceLock;

use hyper::{Method, StatusCode};
use metrics::Counter;

use crate::metrics as m;

const METHODS: [&str; 8] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "other",
];
const STATUSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The request counters of one (upstream, service, endpoint), one per
/// method and status class, each registered on first use.
pub struct RequestCounters {
    upstream: String,
    service: String,
    endpoint: String,
    cells: [[OnceLock<Counter>; STATUSES.len()]; METHODS.len()],
}

impl RequestCounters {
    pub fn new(upstream: &str, service: &str, endpoint: &str) -> Self {
        RequestCounters {
            upstream: upstream.to_owned(),
            service: service.to_owned(),
            endpoint: endpoint.to_owned(),
            cells: Default::default(),
        }
    }

    /// Counts one request.
    pub fn count(&self, method: &Method, status: StatusCode) {
        let (method, status) = (method_class(method), status_class(status));
        self.cells[method][status]
            .get_or_init(|| {
                metrics::counter!(
                    m::HTTP_REQUESTS,
                    "upstream" => self.upstream.clone(),
                    "service" => self.service.clone(),
                    "endpoint" => self.endpoint.clone(),
                    "method" => METHODS[method],
                    "status" => STATUSES[status],
                )
            })
            .increment(1);
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
