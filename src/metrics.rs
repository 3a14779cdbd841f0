//! Every metric squire exports, named in one place.
//!
//! The recorder is process-global (the `metrics` facade), installed once by
//! [`install`]; several agents in one process (the integration tests) share
//! it, told apart by their labels.
//!
//! Per-endpoint families ([`PICKS`], [`HTTP_REQUESTS`]) do not go through the
//! recorder: it can never forget a series, and instance ids churn. Their
//! figures are atomics in the per-endpoint state squire keeps anyway; each
//! owner of such state registers a [`LiveSeries`] ([`register_live`]) and
//! `/metrics` appends what the live ones report ([`render_live`]). A series
//! goes when its endpoint has been gone for the grace period
//! ([`departed_grace`]), or when its owner is dropped.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, Weak};
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Successful registrations, first ones and re-registrations. Labels: registry (its name), kind.
pub const REGISTRATIONS: &str = "squire_registrations_total";
/// Registrations made again because the lease was lost. Labels: registry (its name), kind.
pub const LEASE_REGRANTS: &str = "squire_lease_regrants_total";
/// Failed registration attempts. Labels: registry (its name), kind.
pub const REGISTRATION_FAILURES: &str = "squire_registration_failures_total";
/// Failed lease refreshes. Labels: registry (its name), kind.
/// Our entry found deleted while its lease was kept alive (then written
/// again under a new lease). Labels: registry (its name), kind.
pub const ENTRY_DELETED: &str = "squire_registration_deleted_total";
pub const KEEPALIVE_FAILURES: &str = "squire_keepalive_failures_total";
/// 1 while our instance is registered. Labels: registry (its name), kind.
pub const REGISTERED: &str = "squire_registered";
/// Watches restarted after an error (each one re-lists). Labels: service.
pub const WATCH_RESTARTS: &str = "squire_watch_restarts_total";
/// 1 while the watch of a service is established. Labels: service.
pub const WATCH_UP: &str = "squire_watch_up";
/// Registry entries skipped because their value did not parse. Labels: service.
pub const ENTRIES_SKIPPED: &str = "squire_registry_entries_skipped_total";
/// 1 while a registry's push subscription is established (Nacos: its gRPC
/// connection, with every watched service subscribed), 0 while discovery
/// from it is polling only. Labels: kind, server.
pub const PUSH_UP: &str = "squire_registry_push_up";
/// Change notifications a registry pushed for a watched service. Labels: kind, server, service.
pub const PUSHES: &str = "squire_registry_pushes_total";
/// Pushed messages that did not parse or were of no known type (ignored). Labels: kind, server.
pub const PUSHES_MALFORMED: &str = "squire_registry_pushes_malformed_total";
/// Pushed notifications acknowledged back to the registry. Labels: kind, server.
pub const PUSH_ACKS: &str = "squire_registry_push_acks_total";
/// Registry entries the endpoint policy refused, once per instance and
/// reason (`unspecified`, `self`, `denied_range`, `not_allowed`,
/// `bad_host`, `unresolvable`). Labels: service, reason.
pub const ENTRIES_REFUSED: &str = "squire_registry_entries_refused_total";
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
/// UDP client sessions open through an upstream listener. Labels: upstream, listen.
pub const UDP_SESSIONS_ACTIVE: &str = "squire_udp_sessions_active";
/// UDP client sessions opened (a datagram from a new client address). Labels: upstream, listen.
pub const UDP_SESSIONS_CREATED: &str = "squire_udp_sessions_created_total";
/// UDP sessions ended after idle_timeout without a datagram either way. Labels: upstream, listen.
pub const UDP_SESSIONS_EXPIRED: &str = "squire_udp_sessions_expired_total";
/// UDP sessions refused at max_sessions (their datagram dropped). Labels: upstream, listen.
pub const UDP_SESSIONS_REJECTED: &str = "squire_udp_sessions_rejected_total";
/// Datagrams from clients forwarded upstream. Labels: upstream, listen.
pub const UDP_DATAGRAMS_IN: &str = "squire_udp_received_datagrams_total";
/// Datagrams from instances sent back to their client. Labels: upstream, listen.
pub const UDP_DATAGRAMS_OUT: &str = "squire_udp_sent_datagrams_total";
/// Bytes of the datagrams from clients forwarded upstream (after `strip`). Labels: upstream, listen.
pub const UDP_BYTES_IN: &str = "squire_udp_received_bytes_total";
/// Bytes of the datagrams sent back to clients. Labels: upstream, listen.
pub const UDP_BYTES_OUT: &str = "squire_udp_sent_bytes_total";
/// Datagrams dropped, by reason (`no_endpoint`, `short`: shorter than the
/// `prefix:N` token, `upstream_send`, `client_send`). Labels: upstream, listen, reason.
pub const UDP_DROPPED: &str = "squire_udp_datagrams_dropped_total";
/// TLS handshakes that failed or timed out: a client's on a listener with
/// listen_tls (side "accept"), or one with an instance dialed with
/// [upstream.tls] (side "dial"). Labels: upstream, listen, side.
pub const TLS_HANDSHAKE_FAILURES: &str = "squire_tls_handshake_failures_total";
/// Connections still open at drain_timeout (shutdown, or a listener a
/// reload removed), closed in staggered batches. No labels.
pub const DRAIN_CUT: &str = "squire_drain_connections_cut_total";
/// Configuration reloads (SIGHUP, POST /v1/reload). Labels: result (ok,
/// invalid: the new file was rejected, failed: valid but could not be applied, e.g. a port taken).
pub const CONFIG_RELOADS: &str = "squire_config_reloads_total";
/// Admin API connections refused at its connection limit.
pub const ADMIN_REJECTED: &str = "squire_admin_connections_rejected_total";
/// Mutating admin requests refused for a missing or wrong admin token. Labels: reason.
pub const ADMIN_DENIED: &str = "squire_admin_denied_total";
/// Panics anywhere in the process (each makes `/live` fail).
pub const PANICS: &str = "squire_panics_total";
/// Errors that are squire's own (out of file descriptors, buffers, local
/// ports): never counted against an endpoint. Labels: kind.
pub const LOCAL_ERRORS: &str = "squire_local_errors_total";
/// Connect attempts that failed (each retry counts). Labels: upstream, listen.
pub const CONNECT_FAILURES: &str = "squire_upstream_connect_failures_total";
/// Connections or requests that found no endpoint to pick and waited for
/// one (`endpoint_wait`). Labels: upstream, listen.
pub const ENDPOINT_WAITS: &str = "squire_upstream_endpoint_waits_total";
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
/// 1 while an upstream's `prefer` does not hold (too few preferred
/// instances routable) and traffic spills over to every instance. Labels:
/// upstream, listen.
pub const SPILLOVER: &str = "squire_upstream_spillover";
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
/// Writes of the load the game process reported (a meaningful change or a
/// refresh; through the same rate limit as status writes). Labels:
/// registry (its name), kind.
pub const LOAD_WRITES: &str = "squire_load_writes_total";
/// Routable endpoints whose fresh load says they are full (players >=
/// capacity): they get no new connections. Labels: upstream, listen.
pub const FULL: &str = "squire_upstream_full_endpoints";
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

/// How long the series and per-endpoint state of an instance that left
/// stay, so a scrape after it left still sees its last counts, and an
/// instance that comes back within it counts on from where it was.
pub const DEPARTED_GRACE: Duration = Duration::from_secs(300);

/// The grace period in use, ms; 0 until set, meaning [`DEPARTED_GRACE`].
static GRACE_MS: AtomicU64 = AtomicU64::new(0);

/// How long departed endpoints stay: [`DEPARTED_GRACE`] unless a test
/// shortened it with [`set_departed_grace`].
pub fn departed_grace() -> Duration {
    match GRACE_MS.load(Ordering::Relaxed) {
        0 => DEPARTED_GRACE,
        ms => Duration::from_millis(ms),
    }
}

/// Changes the grace period for the whole process. Only for tests (an
/// integration test runs in a process of its own); no configuration sets it.
#[doc(hidden)]
pub fn set_departed_grace(grace: Duration) {
    GRACE_MS.store((grace.as_millis() as u64).max(1), Ordering::Relaxed);
}

/// Whether an endpoint that left at `departed_at` (ms on
/// [`crate::balance::now_ms`]'s clock) is past the grace period at `now`.
pub fn grace_expired(departed_at: u64, now: u64) -> bool {
    now.saturating_sub(departed_at) >= departed_grace().as_millis() as u64
}

/// Something holding per-endpoint counters, asked for them at each scrape.
pub trait LiveSeries: Send + Sync {
    /// Adds one sample per series it has now (ms `now`).
    fn collect(&self, now: u64, out: &mut LiveSamples);
}

/// The samples of one scrape, by family and label set. The same label set
/// reported twice (two owners with the same labels, e.g. across a reload)
/// is summed, as the recorder's shared counter summed them.
#[derive(Default)]
pub struct LiveSamples {
    families: BTreeMap<&'static str, BTreeMap<String, u64>>,
}

impl LiveSamples {
    /// Adds `value` to the series of `family` with `labels`.
    pub fn add(&mut self, family: &'static str, labels: &[(&str, &str)], value: u64) {
        let mut key = String::new();
        for (i, (name, value)) in labels.iter().enumerate() {
            if i > 0 {
                key.push(',');
            }
            key.push_str(name);
            key.push_str("=\"");
            escape_label(value, &mut key);
            key.push('"');
        }
        *self
            .families
            .entry(family)
            .or_default()
            .entry(key)
            .or_default() += value;
    }

    /// Prometheus text for every family that has a series.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (family, series) in &self.families {
            let help = LIVE_FAMILIES
                .iter()
                .find(|(name, _)| name == family)
                .map_or("", |(_, help)| *help);
            // Writing to a String cannot fail.
            let _ = writeln!(out, "# HELP {family} {help}");
            let _ = writeln!(out, "# TYPE {family} counter");
            for (labels, value) in series {
                let _ = writeln!(out, "{family}{{{labels}}} {value}");
            }
            out.push('\n');
        }
        out
    }
}

/// The families rendered from live state, with their help text.
const LIVE_FAMILIES: &[(&str, &str)] = &[
    (PICKS, "Times the balancer chose an endpoint"),
    (HTTP_REQUESTS, "HTTP requests handled"),
];

/// A label value in the text format: backslash, double quote and newline
/// escaped.
fn escape_label(value: &str, out: &mut String) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

static LIVE: Mutex<Vec<Weak<dyn LiveSeries>>> = Mutex::new(Vec::new());

/// Reports `source`'s series at every scrape until it is dropped.
pub fn register_live(source: Weak<dyn LiveSeries>) {
    let mut live = LIVE.lock().unwrap_or_else(|p| p.into_inner());
    live.retain(|s| s.strong_count() > 0);
    live.push(source);
}

/// The per-endpoint families of every live source, as Prometheus text.
pub fn render_live(now: u64) -> String {
    let sources: Vec<_> = {
        let mut live = LIVE.lock().unwrap_or_else(|p| p.into_inner());
        live.retain(|s| s.strong_count() > 0);
        live.iter().filter_map(Weak::upgrade).collect()
    };
    let mut samples = LiveSamples::default();
    for source in sources {
        source.collect(now, &mut samples);
    }
    samples.render()
}

/// `squire_build_info` and the process families every Prometheus exporter
/// has (`process_cpu_seconds_total`, memory, descriptors, start time), read
/// from `/proc/self` at each scrape. A family whose source cannot be read
/// is left out.
pub fn render_process() -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, value: String| {
        // Writing to a String cannot fail.
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{value}\n");
    };
    let mut build = String::new();
    escape_label(env!("CARGO_PKG_VERSION"), &mut build);
    build.push_str("\",commit=\"");
    escape_label(crate::COMMIT, &mut build);
    family(
        "squire_build_info",
        "gauge",
        "1, labelled with the version and commit squire was built from",
        format!("squire_build_info{{version=\"{build}\"}} 1"),
    );
    let process = crate::process::Process::read();
    if let Some(cpu) = process.cpu_seconds {
        family(
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds",
            format!("process_cpu_seconds_total {cpu}"),
        );
    }
    if let Some(rss) = process.resident_bytes {
        family(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes",
            format!("process_resident_memory_bytes {rss}"),
        );
    }
    if let Some(vsz) = process.virtual_bytes {
        family(
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes",
            format!("process_virtual_memory_bytes {vsz}"),
        );
    }
    if let Some(fds) = process.open_fds {
        family(
            "process_open_fds",
            "gauge",
            "Number of open file descriptors",
            format!("process_open_fds {fds}"),
        );
    }
    if let Some(max) = process.max_fds {
        family(
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors",
            format!("process_max_fds {max}"),
        );
    }
    if let Some(start) = process.start_time_seconds {
        family(
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds",
            format!("process_start_time_seconds {start}"),
        );
    }
    out
}

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
            zero_process_series();
            Ok(handle)
        })
        .clone()
}

/// The process-wide series whose labels are known in advance, at 0 from
/// the start: `increase()` and `rate()` need a sample before the first
/// event to see it (a series that appears at 1 shows no increase), so an
/// alert on the first panic or the first denied request fires.
fn zero_process_series() {
    metrics::counter!(PANICS).increment(0);
    metrics::counter!(DRAIN_CUT).increment(0);
    for kind in ["file_descriptors", "memory", "local_ports"] {
        metrics::counter!(LOCAL_ERRORS, "kind" => kind).increment(0);
    }
    for reason in ["missing", "wrong"] {
        metrics::counter!(ADMIN_DENIED, "reason" => reason).increment(0);
    }
    for result in ["ok", "invalid", "failed"] {
        metrics::counter!(CONFIG_RELOADS, "result" => result).increment(0);
    }
}

/// The per-registration series at 0 (`labels`: registry, kind), for the
/// reason [`zero_process_series`] gives; `squire_registered` too, so an
/// agent that never registers shows 0 rather than nothing.
pub fn zero_registration_series(labels: &[metrics::Label]) {
    for counter in [
        REGISTRATIONS,
        LEASE_REGRANTS,
        REGISTRATION_FAILURES,
        KEEPALIVE_FAILURES,
        ENTRY_DELETED,
        STATUS_WRITES,
        STATUS_WRITES_DEFERRED,
        LOAD_WRITES,
        CRITICAL_DEREGISTRATIONS,
    ] {
        metrics::counter!(counter, labels.iter()).increment(0);
    }
    // Adding 0 registers the gauge without moving it (a reload's new
    // registration must not reset the old one's 1).
    metrics::gauge!(REGISTERED, labels.iter()).increment(0.0);
}

/// The per-service discovery counters at 0.
pub fn zero_discovery_series(service: &str) {
    metrics::counter!(WATCH_RESTARTS, "service" => service.to_owned()).increment(0);
    metrics::counter!(ENTRIES_SKIPPED, "service" => service.to_owned()).increment(0);
    for op in ["load", "save"] {
        metrics::counter!(SNAPSHOT_FAILURES, "service" => service.to_owned(), "op" => op)
            .increment(0);
    }
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        ENTRIES_REFUSED,
        "Registry entries the endpoint policy refused, once per instance and reason"
    );
    describe_counter!(
        ADMIN_REJECTED,
        "Admin API connections refused at its connection limit"
    );
    describe_histogram!(CHECK_SECONDS, Unit::Seconds, "Time one health probe took");
    describe_counter!(CHECK_RESULTS, "Health probe results by outcome");
    describe_counter!(
        CHECK_TRANSITIONS,
        "Status changes of a health check after its rise/fall thresholds"
    );
    describe_gauge!(
        CHECK_STATUS,
        "1 for the current status of a health check, 0 for the others"
    );
    describe_gauge!(
        ANNOUNCED_STATUS,
        "1 for the status last written to a registry, 0 for the others"
    );
    describe_counter!(STATUS_WRITES, "Status writes to a registry");
    describe_counter!(
        STATUS_WRITES_DEFERRED,
        "Status changes held back by the write rate limit (a later write carries the latest)"
    );
    describe_counter!(
        LOAD_WRITES,
        "Writes of the reported load to a registry (a meaningful change or a refresh)"
    );
    describe_counter!(
        CRITICAL_DEREGISTRATIONS,
        "Times our instance was removed for staying unhealthy past deregister_critical_after"
    );
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
    describe_counter!(
        ENTRY_DELETED,
        "Our registry entry found deleted while its lease was kept alive, then written again"
    );
    describe_gauge!(REGISTERED, "1 while our instance is registered");
    describe_counter!(WATCH_RESTARTS, "Registry watches restarted after an error");
    describe_gauge!(
        WATCH_UP,
        "1 while the registry watch of a service is established"
    );
    describe_gauge!(
        PUSH_UP,
        "1 while a registry's push subscription is established, 0 while polling only"
    );
    describe_counter!(
        PUSHES,
        "Change notifications a registry pushed for a watched service"
    );
    describe_counter!(
        PUSHES_MALFORMED,
        "Pushed messages that did not parse or were of no known type"
    );
    describe_counter!(
        PUSH_ACKS,
        "Pushed notifications acknowledged to the registry"
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
    describe_gauge!(
        UDP_SESSIONS_ACTIVE,
        "UDP client sessions open through an upstream listener"
    );
    describe_counter!(UDP_SESSIONS_CREATED, "UDP client sessions opened");
    describe_counter!(
        UDP_SESSIONS_EXPIRED,
        "UDP sessions ended after idle_timeout without a datagram either way"
    );
    describe_counter!(
        UDP_SESSIONS_REJECTED,
        "UDP sessions refused at max_sessions"
    );
    describe_counter!(
        UDP_DATAGRAMS_IN,
        "Datagrams from clients forwarded to upstream instances"
    );
    describe_counter!(
        UDP_DATAGRAMS_OUT,
        "Datagrams from upstream instances sent back to clients"
    );
    describe_counter!(
        UDP_BYTES_IN,
        Unit::Bytes,
        "Bytes of datagrams from clients forwarded to upstream instances"
    );
    describe_counter!(
        UDP_BYTES_OUT,
        Unit::Bytes,
        "Bytes of datagrams from upstream instances sent back to clients"
    );
    describe_counter!(
        UDP_DROPPED,
        "Datagrams dropped by a UDP listener, by reason"
    );
    describe_counter!(
        TLS_HANDSHAKE_FAILURES,
        "TLS handshakes that failed or timed out, with clients (accept) or instances (dial)"
    );
    describe_counter!(
        DRAIN_CUT,
        "Connections still open at drain_timeout, closed in staggered batches"
    );
    describe_counter!(CONFIG_RELOADS, "Configuration reloads by result");
    describe_counter!(
        ADMIN_DENIED,
        "Mutating admin requests refused for a missing or wrong admin token"
    );
    describe_counter!(
        CONNECT_FAILURES,
        "Failed connect attempts to upstream instances"
    );
    describe_counter!(
        ENDPOINT_WAITS,
        "Connections or requests that found no endpoint to pick and waited up to endpoint_wait for one"
    );
    describe_counter!(
        RETRIES,
        "Connect attempts made again on another endpoint after a failure"
    );
    describe_counter!(EJECTIONS, "Endpoints ejected after consecutive failures");
    describe_gauge!(EJECTED, "Endpoints ejected right now");
    describe_gauge!(
        FULL,
        "Routable endpoints whose fresh reported load is full (players >= capacity): no new connections"
    );
    describe_gauge!(
        PANIC_MODE,
        "1 while the balancer picks among all endpoints because too few are healthy"
    );
    describe_gauge!(
        SPILLOVER,
        "1 while too few of an upstream's preferred instances are routable and traffic spills over to the rest"
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_samples_render_valid_text_with_escaped_labels_summed_per_series() {
        let mut samples = LiveSamples::default();
        samples.add(PICKS, &[("upstream", "a\"b\\c\nd"), ("endpoint", "x")], 2);
        samples.add(PICKS, &[("upstream", "a\"b\\c\nd"), ("endpoint", "x")], 3);
        samples.add(HTTP_REQUESTS, &[("endpoint", "y")], 1);
        let text = samples.render();
        assert_eq!(
            text,
            "# HELP squire_http_requests_total HTTP requests handled\n\
             # TYPE squire_http_requests_total counter\n\
             squire_http_requests_total{endpoint=\"y\"} 1\n\n\
             # HELP squire_upstream_picks_total Times the balancer chose an endpoint\n\
             # TYPE squire_upstream_picks_total counter\n\
             squire_upstream_picks_total{upstream=\"a\\\"b\\\\c\\nd\",endpoint=\"x\"} 5\n\n"
        );
    }

    #[test]
    fn nothing_to_report_renders_nothing() {
        assert_eq!(LiveSamples::default().render(), "");
    }
}
