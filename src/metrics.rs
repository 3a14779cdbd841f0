//! Every metric squire exports, named in one place.
//!
//! The recorder is process-global (the `metrics` facade), installed once by
//! [`install`]; several agents in one process (the integration tests) share
//! it, told apart by their labels.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Successful registrations, first ones and re-registrations. Labels: registry (its name), kind.
pub const REGISTRATIONS: &str = "squire_registrations_total";
/// Registrations made again because the lease was lost. Labels: registry (its name), kind.
pub const LEASE_REGRANTS: &str = "squire_lease_regrants_total";
/// Failed registration attempts. Labels: registry (its name), kind.
pub const REGISTRATION_FAILURES: &str = "squire_registration_failures_total";
/// Failed lease refreshes. Labels: registry (its name), kind.
pub const KEEPALIVE_FAILURES: &str = "squire_keepalive_failures_total";
/// 1 while our instance is registered. Labels: registry (its name), kind.
pub const REGISTERED: &str = "squire_registered";
/// Watches restarted after an error (each one re-lists). Labels: service.
pub const WATCH_RESTARTS: &str = "squire_watch_restarts_total";
/// 1 while the watch of a service is established. Labels: service.
pub const WATCH_UP: &str = "squire_watch_up";
/// Registry entries skipped because their value did not parse. Labels: service.
pub const ENTRIES_SKIPPED: &str = "squire_registry_entries_skipped_total";
/// Instances known per service and status. Labels: service, status.
pub const ENDPOINTS: &str = "squire_endpoints";
/// 1 for each registry a service is served from (failover: the one in use;
/// merge: each whose watch is up), 0 for the others. Labels: service, registry.
pub const DISCOVERY_SOURCE: &str = "squire_discovery_source";
/// Times failover discovery of a service moved to a registry (the first
/// one read counts too). Labels: service, registry.
pub const DISCOVERY_SWITCHES: &str = "squire_discovery_switches_total";
/// 1 while a service is served from its last known instances on disk (no
/// registry has listed it since startup), 0 once one has. Labels: service.
pub const DISCOVERY_STALE: &str = "squire_discovery_stale";
/// Snapshots of a service's instances written to `agent.state_dir`. Labels: service.
pub const SNAPSHOT_WRITES: &str = "squire_discovery_snapshot_writes_total";
/// Snapshot files that could not be read or written. Labels: service, op (load, save).
pub const SNAPSHOT_FAILURES: &str = "squire_discovery_snapshot_failures_total";
/// Connections accepted by an upstream listener. Labels: upstream, listen.
pub const TCP_ACCEPTED: &str = "squire_tcp_connections_accepted_total";
/// Connections open through an upstream listener. Labels: upstream, listen.
pub const TCP_ACTIVE: &str = "squire_tcp_connections_active";
/// Client connections closed without reaching an upstream. Labels: upstream, listen, reason.
pub const TCP_FAILED: &str = "squire_tcp_connections_failed_total";
/// Client connections refused at max_connections. Labels: upstream, listen.
pub const TCP_REJECTED: &str = "squire_tcp_connections_rejected_total";
/// Connections closed after idle_timeout without a byte either way. Labels: upstream, listen.
pub const TCP_IDLE_CLOSED: &str = "squire_tcp_connections_idle_closed_total";
/// Connections still open at drain_timeout (shutdown, or a listener a
/// reload removed), closed in staggered batches. No labels.
pub const DRAIN_CUT: &str = "squire_drain_connections_cut_total";
/// Configuration reloads (SIGHUP, POST /v1/reload). Labels: result (ok,
/// invalid: the new file was rejected, failed: valid but could not be applied, e.g. a port taken).
pub const CONFIG_RELOADS: &str = "squire_config_reloads_total";
/// Panics anywhere in the process (each makes `/live` fail).
pub const PANICS: &str = "squire_panics_total";
/// Errors that are squire's own (out of file descriptors, buffers, local
/// ports): never counted against an endpoint. Labels: kind.
pub const LOCAL_ERRORS: &str = "squire_local_errors_total";
/// Connect attempts that failed (each retry counts). Labels: upstream, listen.
pub const CONNECT_FAILURES: &str = "squire_upstream_connect_failures_total";
/// Connect attempts made again on another endpoint after a failure. Labels: upstream, listen.
pub const RETRIES: &str = "squire_upstream_retries_total";
/// Times the balancer chose an endpoint (each connect attempt). Labels: upstream, listen, endpoint.
pub const PICKS: &str = "squire_upstream_picks_total";
/// Endpoints ejected after consecutive failures. Labels: upstream, listen.
pub const EJECTIONS: &str = "squire_upstream_ejections_total";
/// Endpoints ejected right now. Labels: upstream, listen.
pub const EJECTED: &str = "squire_upstream_ejected_endpoints";
/// 1 while the balancer picks among all endpoints (panic mode). Labels: upstream, listen.
pub const PANIC_MODE: &str = "squire_upstream_panic_mode";
/// Bytes from clients to upstream instances. Labels: upstream, listen.
pub const BYTES_IN: &str = "squire_tcp_received_bytes_total";
/// Bytes from upstream instances to clients. Labels: upstream, listen.
pub const BYTES_OUT: &str = "squire_tcp_sent_bytes_total";
/// Time to connect to an upstream instance. Labels: upstream, listen.
pub const CONNECT_SECONDS: &str = "squire_upstream_connect_duration_seconds";

/// Time one health probe took. Labels: check.
pub const CHECK_SECONDS: &str = "squire_check_duration_seconds";
/// Probe results. Labels: check, outcome (passing, warning, critical).
pub const CHECK_RESULTS: &str = "squire_check_results_total";
/// Status changes of a check after its thresholds. Labels: check, to.
pub const CHECK_TRANSITIONS: &str = "squire_check_transitions_total";
/// 1 for the current status of a check, 0 for the others. Labels: check, status.
pub const CHECK_STATUS: &str = "squire_check_status";
/// 1 for the status last written to a registry, 0 for the others. Labels: registry (its name), kind, status.
pub const ANNOUNCED_STATUS: &str = "squire_announced_status";
/// Status writes to the registry. Labels: registry (its name), kind.
pub const STATUS_WRITES: &str = "squire_status_writes_total";
/// Status changes held back by the write rate limit (a later write carries
/// the latest). Labels: registry (its name), kind.
pub const STATUS_WRITES_DEFERRED: &str = "squire_status_writes_deferred_total";
/// Times our instance was removed for staying unhealthy past
/// `deregister_critical_after`. Labels: registry (its name), kind.
pub const CRITICAL_DEREGISTRATIONS: &str = "squire_critical_deregistrations_total";

const CHECK_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// HTTP requests handled. Labels: upstream, service, endpoint, method, status (class).
pub const HTTP_REQUESTS: &str = "squire_http_requests_total";
/// Time from a request's arrival to its response headers. Labels: upstream, listen.
pub const HTTP_SECONDS: &str = "squire_http_request_duration_seconds";
/// HTTP requests being handled. Labels: upstream, listen.
pub const HTTP_ACTIVE: &str = "squire_http_requests_active";
/// Requests answered with an error of squire's own. Labels: upstream, service, kind.
pub const HTTP_ERRORS: &str = "squire_http_errors_total";
/// Requests sent again to another instance. Labels: upstream, listen.
pub const HTTP_RETRIES: &str = "squire_http_retries_total";
/// Upstream connections opened, and requests that reused one. Labels: upstream, listen, event.
pub const HTTP_POOL: &str = "squire_http_pool_connections_total";
/// Client connections refused at max_connections. Labels: upstream, listen.
pub const HTTP_REJECTED: &str = "squire_http_connections_rejected_total";

const HTTP_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

const CONNECT_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();

/// Installs the Prometheus recorder (once per process) and returns the
/// handle that renders `/metrics`.
pub fn install() -> Result<PrometheusHandle, String> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(CONNECT_SECONDS.to_owned()), CONNECT_BUCKETS)
                .map_err(|e| e.to_string())?
                .set_buckets_for_metric(Matcher::Full(CHECK_SECONDS.to_owned()), CHECK_BUCKETS)
                .map_err(|e| e.to_string())?
                .set_buckets_for_metric(Matcher::Full(HTTP_SECONDS.to_owned()), HTTP_BUCKETS)
                .map_err(|e| e.to_string())?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).map_err(|e| e.to_string())?;
            describe();
            Ok(handle)
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        REGISTRATIONS,
        "Successful registrations, first ones and re-registrations"
    );
    describe_counter!(
        LEASE_REGRANTS,
        "Registrations made again because the lease was lost"
    );
    describe_counter!(REGISTRATION_FAILURES, "Failed registration attempts");
    describe_counter!(KEEPALIVE_FAILURES, "Failed lease refreshes");
    describe_gauge!(REGISTERED, "1 while our instance is registered");
    describe_counter!(WATCH_RESTARTS, "Registry watches restarted after an error");
    describe_gauge!(
        WATCH_UP,
        "1 while the registry watch of a service is established"
    );
    describe_counter!(
        ENTRIES_SKIPPED,
        "Registry entries skipped because their value did not parse"
    );
    describe_gauge!(ENDPOINTS, "Instances known per service and status");
    describe_gauge!(
        DISCOVERY_SOURCE,
        "1 for each registry a service is served from, 0 for the others"
    );
    describe_counter!(
        DISCOVERY_SWITCHES,
        "Times failover discovery of a service moved to a registry"
    );
    describe_gauge!(
        DISCOVERY_STALE,
        "1 while a service is served from its last known instances on disk"
    );
    describe_counter!(
        SNAPSHOT_WRITES,
        "Snapshots of a service's instances written to the state directory"
    );
    describe_counter!(
        SNAPSHOT_FAILURES,
        "Snapshot files that could not be read or written"
    );
    describe_counter!(
        PANICS,
        "Panics anywhere in the process; /live fails after the first"
    );
    describe_counter!(TCP_ACCEPTED, "Connections accepted by an upstream listener");
    describe_counter!(
        LOCAL_ERRORS,
        "Errors that are squire's own (out of file descriptors, buffers, local ports), by kind"
    );
    describe_gauge!(TCP_ACTIVE, "Connections open through an upstream listener");
    describe_counter!(
        TCP_FAILED,
        "Client connections closed without reaching an upstream"
    );
    describe_counter!(
        TCP_REJECTED,
        "Client connections refused at max_connections"
    );
    describe_counter!(
        TCP_IDLE_CLOSED,
        "Connections closed after idle_timeout without a byte either way"
    );
    describe_counter!(
        DRAIN_CUT,
        "Connections still open at drain_timeout, closed in staggered batches"
    );
    describe_counter!(CONFIG_RELOADS, "Configuration reloads by result");
    describe_counter!(
        CONNECT_FAILURES,
        "Failed connect attempts to upstream instances"
    );
    describe_counter!(
        RETRIES,
        "Connect attempts made again on another endpoint after a failure"
    );
    describe_counter!(PICKS, "Times the balancer chose an endpoint");
    describe_counter!(EJECTIONS, "Endpoints ejected after consecutive failures");
    describe_gauge!(EJECTED, "Endpoints ejected right now");
    describe_gauge!(
        PANIC_MODE,
        "1 while the balancer picks among all endpoints because too few are healthy"
    );
    describe_counter!(
        BYTES_IN,
        Unit::Bytes,
        "Bytes from clients to upstream instances"
    );
    describe_counter!(
        BYTES_OUT,
        Unit::Bytes,
        "Bytes from upstream instances to clients"
    );
    describe_counter!(HTTP_REQUESTS, "HTTP requests handled");
    describe_histogram!(
        HTTP_SECONDS,
        Unit::Seconds,
        "Time from a request's arrival to its response headers"
    );
    describe_gauge!(HTTP_ACTIVE, "HTTP requests being handled");
    describe_counter!(
        HTTP_ERRORS,
        "HTTP requests answered with an error of squire's own"
    );
    describe_counter!(HTTP_RETRIES, "HTTP requests sent again to another instance");
    describe_counter!(
        HTTP_POOL,
        "Upstream connections opened, and requests that reused one"
    );
    describe_counter!(
        HTTP_REJECTED,
        "Client connections refused at max_connections"
    );
    describe_histogram!(
        CONNECT_SECONDS,
        Unit::Seconds,
        "Time to connect to an upstream instance"
    );
}
