//! The fake Consul (`tests/support/consul.rs`) against the acceptance list
//! of `consul-api.md` §3.9, item by item, plus the cross-cutting rules of
//! §3.1. The squire tests in `tests/consul.rs` are only as good as this fake.

mod support;

use std::time::Duration;

use tokio::time::Instant;

use serde_json::{json, Value};
use support::consul::{Acl, AclToken, FakeConsul, FakeOptions, Level};
use support::{eventually, DEADLINE};

const TTL_CHECK: &str = r#"{"Name":"web","ID":"web-1","Address":"10.0.0.5","Port":8080,
    "Check":{"TTL":"10s","Status":"passing","DeregisterCriticalServiceAfter":"1m"}}"#;

async fn put(fake: &FakeConsul, path: &str, body: Option<&str>) -> support::consul::Reply {
    fake.call("PUT", path, body).await
}

async fn put_ok(fake: &FakeConsul, path: &str, body: Option<&str>) {
    let reply = put(fake, path, body).await;
    assert_eq!(reply.status, 200, "PUT {path}: {}", reply.body);
}

async fn health(fake: &FakeConsul, query: &str) -> support::consul::Reply {
    let reply = fake
        .call("GET", &format!("/v1/health/service/{query}"), None)
        .await;
    assert_eq!(reply.status, 200, "GET {query}: {}", reply.body);
    reply
}

fn ids(reply: &support::consul::Reply) -> Vec<String> {
    let mut ids: Vec<String> = reply
        .json()
        .as_array()
        .expect("an array")
        .iter()
        .map(|e| e["Service"]["ID"].as_str().expect("an ID").to_owned())
        .collect();
    ids.sort();
    ids
}

fn status(fake: &FakeConsul, check: &str) -> String {
    fake.check(check)
        .unwrap_or_else(|| panic!("no check {check}"))
        .status
}

/// §3.9.1: a blocking query that times out returns 200 with the same index
/// and body; `wait` is honoured, capped at 10 m, with jitter up to wait/16.
#[tokio::test]
async fn blocking_query_times_out_with_the_same_index_and_body() {
    let fake = FakeConsul::start().await;
    // A TTL longer than the clock moves here, so nothing changes on its own.
    let long_ttl = TTL_CHECK.replace("10s", "24h");
    put_ok(&fake, "/v1/agent/service/register", Some(&long_ttl)).await;
    let first = health(&fake, "web").await;
    let index = first.index();

    let started = Instant::now();
    let again = health(&fake, &format!("web?index={index}&wait=300ms")).await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300),
        "returned after {took:?}"
    );
    assert!(took < Duration::from_secs(3), "returned after {took:?}");
    assert_eq!(again.index(), index);
    assert_eq!(again.body, first.body);

    // Asked for an hour: the deadline is 10 m plus at most 10m/16 of jitter.
    let query = format!("web?index={index}&wait=1h");
    let (reply, ()) = tokio::join!(health(&fake, &query), async {
        eventually("the query to block", DEADLINE, || async {
            fake.blocked().len() == 1
        })
        .await;
        let (start, deadline) = fake.blocked()[0];
        let wait = deadline - start;
        assert!(
            wait >= Duration::from_secs(600) && wait <= Duration::from_millis(637_500),
            "{wait:?}"
        );
        fake.advance(Duration::from_secs(638));
    });
    assert_eq!(reply.index(), index);
    assert_eq!(reply.body, first.body);

    // No wait: the default of 5 m, plus up to 5m/16.
    let query = format!("web?index={index}");
    tokio::join!(health(&fake, &query), async {
        eventually("the query to block", DEADLINE, || async {
            fake.blocked().len() == 1
        })
        .await;
        let (start, deadline) = fake.blocked()[0];
        let wait = deadline - start;
        assert!(
            wait >= Duration::from_secs(300) && wait <= Duration::from_millis(318_750),
            "{wait:?}"
        );
        fake.advance(Duration::from_secs(320));
    });
    assert!(fake.blocked().is_empty());

    // A change wakes a blocked query at once.
    let query = format!("web?index={index}&wait=1h");
    let (reply, ()) = tokio::join!(health(&fake, &query), async {
        eventually("the query to block", DEADLINE, || async {
            fake.blocked().len() == 1
        })
        .await;
        put_ok(&fake, "/v1/agent/check/fail/service:web-1", None).await;
    });
    assert!(reply.index() > index);
}

/// §3.9.2: the index is never 0; an unknown service is `[]` and blocks.
#[tokio::test]
async fn the_index_is_at_least_one_and_unknown_services_block() {
    let fake = FakeConsul::with_options(FakeOptions {
        lists_consul: false,
        ..FakeOptions::default()
    })
    .await;
    let reply = health(&fake, "nothing").await;
    assert_eq!(reply.body, "[]");
    let index = reply.index();
    assert!(index >= 1);
    assert_eq!(reply.header("X-Consul-KnownLeader"), Some("true"));
    assert_eq!(reply.header("X-Consul-LastContact"), Some("0"));
    assert_eq!(reply.header("Content-Type"), Some("application/json"));

    let started = Instant::now();
    let again = health(&fake, &format!("nothing?index={index}&wait=200ms")).await;
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!((again.index(), again.body.as_str()), (index, "[]"));

    let catalog = fake.call("GET", "/v1/catalog/services", None).await;
    assert_eq!((catalog.status, catalog.body.as_str()), (200, "{}"));
    assert!(catalog.index() >= 1);

    fake.rewind_index(0);
    assert!(health(&fake, "nothing").await.index() >= 1);

    // The service appearing wakes its watchers.
    let query = format!("web?index={}&wait=1h", health(&fake, "web").await.index());
    let (reply, ()) = tokio::join!(health(&fake, &query), async {
        eventually("the query to block", DEADLINE, || async {
            fake.blocked().len() == 1
        })
        .await;
        put_ok(&fake, "/v1/agent/service/register", Some(TTL_CHECK)).await;
    });
    assert_eq!(ids(&reply), ["web-1"]);
}

/// §3.9.3: after a rewind the server blocks until the timeout, then answers
/// with the lower index, even if changes happened meanwhile.
#[tokio::test]
async fn a_rewound_index_blocks_until_timeout_then_goes_backwards() {
    let fake = FakeConsul::start().await;
    for i in 0..5 {
        let body = TTL_CHECK.replace("web-1", &format!("web-{i}"));
        put_ok(&fake, "/v1/agent/service/register", Some(&body)).await;
    }
    let high = health(&fake, "web").await.index();
    assert!(high > 3);
    fake.rewind_index(2);
    let started = Instant::now();
    let query = format!("web?index={high}&wait=500ms");
    let (reply, ()) = tokio::join!(health(&fake, &query), async {
        eventually("the query to block", DEADLINE, || async {
            fake.blocked().len() == 1
        })
        .await;
        let body = TTL_CHECK.replace("web-1", "web-new");
        put_ok(&fake, "/v1/agent/service/register", Some(&body)).await;
    });
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "a change below the asked index must not wake the query"
    );
    assert!(reply.index() < high, "{} !< {high}", reply.index());
    assert_eq!(ids(&reply).len(), 6);
}

/// §3.9.4: a TTL check starts critical or with its Status, turns critical
/// TTL after the last update with the documented Output, and any update
/// re-arms the timer.
#[tokio::test]
async fn ttl_checks_expire_and_updates_rearm_them() {
    let fake = FakeConsul::start().await;
    put_ok(
        &fake,
        "/v1/agent/service/register",
        Some(r#"{"Name":"a","Port":1,"Check":{"TTL":"10s"}}"#),
    )
    .await;
    let check = fake.check("service:a").expect("default check id");
    assert_eq!(
        (
            check.status.as_str(),
            check.output.as_str(),
            check.kind.as_str()
        ),
        ("critical", "", "ttl")
    );
    assert_eq!(check.name, "Service 'a' check");
    put_ok(&fake, "/v1/agent/service/register", Some(TTL_CHECK)).await;
    assert_eq!(status(&fake, "service:web-1"), "passing");

    fake.advance(Duration::from_secs(8));
    put_ok(&fake, "/v1/agent/check/pass/service:web-1", None).await;
    fake.advance(Duration::from_secs(8));
    assert_eq!(
        status(&fake, "service:web-1"),
        "passing",
        "pass re-armed it"
    );
    put_ok(
        &fake,
        "/v1/agent/check/update/service:web-1",
        Some(r#"{"Status":"passing"}"#),
    )
    .await;
    fake.advance(Duration::from_secs(8));
    assert_eq!(
        status(&fake, "service:web-1"),
        "passing",
        "update re-armed it"
    );
    fake.advance(Duration::from_secs(3));
    let expired = fake.check("service:web-1").expect("check");
    assert_eq!(
        (expired.status.as_str(), expired.output.as_str()),
        ("critical", "TTL expired")
    );

    put_ok(&fake, "/v1/agent/check/warn/service:web-1?note=slow", None).await;
    assert_eq!(status(&fake, "service:web-1"), "warning");
    fake.advance(Duration::from_secs(11));
    let expired = fake.check("service:web-1").expect("check");
    assert_eq!(
        (expired.status.as_str(), expired.output.as_str()),
        (
            "critical",
            "TTL expired (last output before timeout follows): slow"
        )
    );
    // It fired once and stays put until the next update.
    let index = fake.index();
    fake.advance(Duration::from_secs(60));
    assert_eq!(fake.index(), index);

    // Real time drives it too.
    put_ok(
        &fake,
        "/v1/agent/service/register",
        Some(r#"{"Name":"b","Port":1,"Check":{"TTL":"300ms","Status":"passing"}}"#),
    )
    .await;
    eventually("the 300ms TTL to expire", DEADLINE, || async {
        status(&fake, "service:b") == "critical"
    })
    .await;

    // Long output is truncated.
    let long = "x".repeat(5000);
    put_ok(
        &fake,
        &format!("/v1/agent/check/pass/service:b?note={long}"),
        None,
    )
    .await;
    assert_eq!(
        fake.check("service:b").expect("check").output,
        format!("{} ... (captured 4096 of 5000 bytes)", "x".repeat(4096))
    );
}

/// §3.9.5: DCSA clamped to 1 m, 30 s reaper tick, critical-since from the
/// first critical update, whole service removed, index bumped, catalog
/// dropping the name.
#[tokio::test]
async fn critical_services_are_reaped_after_the_clamped_dcsa() {
    let fake = FakeConsul::start().await;
    put_ok(
        &fake,
        "/v1/agent/service/register",
        Some(
            r#"{"Name":"web","ID":"web-1","Port":1,"Checks":[
                {"CheckID":"ttl","TTL":"10s","Status":"passing","DeregisterCriticalServiceAfter":"30s"},
                {"CheckID":"other","TTL":"1h","Status":"passing"}]}"#,
        ),
    )
    .await;
    put_ok(
        &fake,
        "/v1/agent/service/maintenance/web-1?enable=true",
        None,
    )
    .await;
    put_ok(
        &fake,
        "/v1/agent/service/register",
        Some(r#"{"Name":"keep","Port":2,"Check":{"TTL":"1h","Status":"passing"}}"#),
    )
    .await;
    let catalog = fake.call("GET", "/v1/catalog/services", None).await.json();
    assert_eq!(catalog, json!({"consul": [], "keep": [], "web": []}));

    // TTL expires at 10 s (critical since 10 s); DCSA 30 s is raised to 1 m,
    // so the tick at 60 s keeps it (50 s) and the tick at 90 s reaps it.
    fake.advance(Duration::from_secs(11));
    assert_eq!(status(&fake, "ttl"), "critical");
    let since = fake
        .check("ttl")
        .and_then(|c| c.critical_since)
        .expect("set");
    assert!(since >= Duration::from_secs(10) && since < Duration::from_secs(11));
    fake.advance(Duration::from_secs(77)); // t = 88
    assert_eq!(fake.service_ids(), ["keep", "web-1"]);
    let index = fake.index();
    fake.advance(Duration::from_secs(3)); // t = 91
    assert_eq!(fake.service_ids(), ["keep"]);
    assert!(
        fake.checks_of("web-1").is_empty(),
        "all its checks went with it, the maintenance check too"
    );
    assert!(fake.index() > index);
    assert_eq!(health(&fake, "web").await.body, "[]");
    let catalog = fake.call("GET", "/v1/catalog/services", None).await.json();
    assert_eq!(catalog, json!({"consul": [], "keep": []}));
}

#[tokio::test]
async fn critical_since_starts_at_the_first_critical_update_not_at_registration() {
    let fake = FakeConsul::start().await;
    put_ok(
        &fake,
        "/v1/agent/service/register",
        Some(
            r#"{"Name":"web","Port":1,"Check":{"TTL":"1h","DeregisterCriticalServiceAfter":"1m"}}"#,
        ),
    )
    .await;
    assert_eq!(status(&fake, "service:web"), "critical");
    fake.advance(Duration::from_secs(600));
    assert_eq!(
        fake.service_ids(),
        ["web"],
        "registered critical: not reaped"
    );
    put_ok(&fake, "/v1/agent/check/fail/service:web", None).await;
    fake.advance(Duration::from_secs(59));
    assert_eq!(fake.service_ids(), ["web"]);
    put_ok(&fake, "/v1/agent/check/fail/service:web?note=x", None).await;
    fake.advance(Duration::from_secs(32));
    assert!(
        fake.service_ids().is_empty(),
        "a second fail does not restart critical-since"
    );

    // A passing update in between clears it.
    put_ok(
        &fake,
        "/v1/agent/service/register",
        Some(
            r#"{"Name":"web","Port":1,"Check":{"TTL":"1h","DeregisterCriticalServiceAfter":"1m"}}"#,
        ),
    )
    .await;
    put_ok(&fake, "/v1/agent/check/fail/service:web", None).await;
    fake.advance(Duration::from_secs(50));
    put_ok(&fake, "/v1/agent/check/pass/service:web", None).await;
    put_ok(&fake, "/v1/agent/check/fail/service:web", None).await;
    fake.advance(Duration::from_secs(50));
    assert_eq!(fake.service_ids(), ["web"]);
}

#[tokio::test]
async fn the_clamp_and_the_reap_interval_are_injectable() {
    let fake = FakeConsul::with_options(FakeOptions {
        dcsa_min: Duration::ZERO,
        reap_interval: Duration::from_millis(100),
        ..FakeOptions::default()
    })
    .await;
    put_ok(
        &fake,
        "/v1/agent/service/register",
        Some(r#"{"Name":"web","Port":1,"Check":{"TTL":"200ms","Status":"passing","DeregisterCriticalServiceAfter":"200ms"}}"#),
    )
    .await;
    eventually(
        "the service to be reaped in real time",
        DEADLINE,
        || async { fake.service_ids().is_empty() },
    )
    .await;
}

/// §3.9.6: re-registration keeps check Status and Output and restarts TTL
/// timers; `replace-existing-checks` removes omitted checks.
#[tokio::test]
async fn re_registration_keeps_check_state_and_replace_removes_omitted_checks() {
    let fake = FakeConsul::start().await;
    put_ok(&fake, "/v1/agent/service/register", Some(TTL_CHECK)).await;
    put_ok(&fake, "/v1/agent/check/warn/service:web-1?note=hi", None).await;
    fake.advance(Duration::from_secs(8));
    let critical = TTL_CHECK.replace("passing", "critical");
    put_ok(&fake, "/v1/agent/service/register", Some(&critical)).await;
    let check = fake.check("service:web-1").expect("check");
    assert_eq!(
        (check.status.as_str(), check.output.as_str()),
        ("warning", "hi")
    );
    fake.advance(Duration::from_secs(8));
    assert_eq!(status(&fake, "service:web-1"), "warning", "timer restarted");
    fake.advance(Duration::from_secs(3));
    assert_eq!(status(&fake, "service:web-1"), "critical");

    let two = r#"{"Name":"db","Port":1,"Checks":[{"TTL":"1h"},{"TTL":"1h"}]}"#;
    put_ok(&fake, "/v1/agent/service/register", Some(two)).await;
    let ids: Vec<String> = fake.checks_of("db").into_iter().map(|c| c.id).collect();
    assert_eq!(ids, ["service:db:1", "service:db:2"]);
    let one = r#"{"Name":"db","Port":1,"Checks":[{"CheckID":"service:db:1","TTL":"1h"}]}"#;
    put_ok(&fake, "/v1/agent/service/register", Some(one)).await;
    assert_eq!(fake.checks_of("db").len(), 2, "omitted checks are kept");
    put_ok(
        &fake,
        "/v1/agent/service/register?replace-existing-checks=false",
        Some(one),
    )
    .await;
    assert_eq!(fake.checks_of("db").len(), 2);
    put_ok(
        &fake,
        "/v1/agent/service/register?replace-existing-checks",
        Some(one),
    )
    .await;
    let ids: Vec<String> = fake.checks_of("db").into_iter().map(|c| c.id).collect();
    assert_eq!(ids, ["service:db:1"]);
}

/// §3.9.7: same status and output wakes nobody; same status with a new
/// output is deferred; a status change applies at once.
#[tokio::test]
async fn output_only_updates_are_deferred_and_repeats_wake_nobody() {
    let fake = FakeConsul::with_options(FakeOptions {
        deferred_output: (Duration::from_secs(10), Duration::from_secs(20)),
        ..FakeOptions::default()
    })
    .await;
    let long_ttl = TTL_CHECK.replace("10s", "24h");
    put_ok(&fake, "/v1/agent/service/register", Some(&long_ttl)).await;
    // A status change: synced at once, output included.
    put_ok(&fake, "/v1/agent/check/warn/service:web-1?note=ok", None).await;
    assert_eq!(fake.check("service:web-1").expect("check").output, "ok");
    let index = health(&fake, "web").await.index();

    let query = format!("web?index={index}&wait=300ms");
    let (reply, ()) = tokio::join!(health(&fake, &query), async {
        eventually("the query to block", DEADLINE, || async {
            fake.blocked().len() == 1
        })
        .await;
        put_ok(&fake, "/v1/agent/check/warn/service:web-1?note=ok", None).await;
    });
    assert_eq!(reply.index(), index, "a repeated heartbeat woke a watcher");

    put_ok(&fake, "/v1/agent/check/warn/service:web-1?note=new", None).await;
    assert_eq!(health(&fake, "web").await.index(), index);
    let check = fake.check("service:web-1").expect("check");
    assert_eq!(
        (check.output.as_str(), check.local_output.as_str()),
        ("ok", "new")
    );
    let shown = health(&fake, "web").await.json();
    assert_eq!(shown[0]["Checks"][1]["Output"], "ok");
    fake.advance(Duration::from_secs(9));
    assert_eq!(fake.check("service:web-1").expect("check").output, "ok");
    fake.advance(Duration::from_secs(12));
    assert_eq!(fake.check("service:web-1").expect("check").output, "new");
    let synced = health(&fake, "web").await.index();
    assert!(synced > index);

    put_ok(&fake, "/v1/agent/check/pass/service:web-1?note=new", None).await;
    assert!(health(&fake, "web").await.index() > synced);
}

/// §3.9.8: error codes and messages.
#[tokio::test]
async fn errors_have_consuls_codes_and_messages() {
    let fake = FakeConsul::start().await;
    put_ok(&fake, "/v1/agent/service/register", Some(TTL_CHECK)).await;
    put_ok(
        &fake,
        "/v1/agent/service/register",
        Some(r#"{"Name":"h","Port":1,"Check":{"CheckID":"h","HTTP":"http://127.0.0.1:1/","Interval":"10s"}}"#),
    )
    .await;
    let cases: &[(&str, &str, Option<&str>, u16, &str)] = &[
        ("PUT", "/v1/agent/check/pass/nope", None, 404, "Unknown check ID \"nope\". Ensure that the check ID is passed, not the check name."),
        ("PUT", "/v1/agent/check/update/nope", Some(r#"{"Status":"passing"}"#), 404, "Unknown check ID \"nope\""),
        ("PUT", "/v1/agent/check/pass/h", None, 500, "CheckID \"h\" does not have associated TTL"),
        ("PUT", "/v1/agent/check/update/service:web-1", Some(r#"{"Status":"pass"}"#), 400, "Invalid check status: 'pass'"),
        ("PUT", "/v1/agent/check/update/service:web-1", None, 400, "Request decode failed: EOF"),
        ("PUT", "/v1/agent/check/update/service:web-1", Some(r#"{"Status":"passing","Foo":1}"#), 400, "Request decode failed: json: unknown field \"Foo\""),
        ("PUT", "/v1/agent/service/deregister/nope", None, 404, "Unknown service ID \"nope\". Ensure that the service ID is passed, not the service name."),
        ("PUT", "/v1/agent/service/maintenance/nope?enable=true", None, 404, "Unknown service ID \"nope\""),
        ("PUT", "/v1/agent/service/maintenance/web-1", None, 400, "Missing value for enable"),
        ("PUT", "/v1/agent/service/maintenance/web-1?enable=maybe", None, 400, "Invalid value for enable: \"maybe\""),
        ("PUT", "/v1/agent/service/maintenance/?enable=true", None, 400, "Missing service ID"),
        ("PUT", "/v1/agent/service/register", None, 400, "Request decode failed: EOF"),
        ("PUT", "/v1/agent/service/register", Some(r#"{"Name":"x","Foo":1}"#), 400, "Request decode failed: json: unknown field \"Foo\""),
        ("PUT", "/v1/agent/service/register", Some(r#"{"Name":"x","Check":{"TTL":"10s","Bar":1}}"#), 400, "Request decode failed: json: unknown field \"Bar\""),
        ("PUT", "/v1/agent/service/register", Some(r#"{"Name":"x","Check":{"TTL":"soon"}}"#), 400, "Request decode failed: time: invalid duration \"soon\""),
        ("PUT", "/v1/agent/service/register", Some(r#"{"Port":1}"#), 400, "Missing service name"),
        ("PUT", "/v1/agent/service/register", Some(r#"{"Name":"x","Address":"0.0.0.0"}"#), 400, "Invalid service address"),
        ("PUT", "/v1/agent/service/register", Some(r#"{"Name":"x","Weights":{"Passing":0}}"#), 400, "Invalid Weights: Passing must be greater than 0"),
        ("PUT", "/v1/agent/service/register", Some(r#"{"Name":"x","Weights":{"Passing":1,"Warning":-1}}"#), 400, "Invalid Weights: Warning must be greater or equal than 0"),
        ("PUT", "/v1/agent/service/register", Some(r#"{"Name":"x","Weights":{"Passing":70000}}"#), 400, "Invalid Weights: DNS Weight must be between 0 and 65535"),
        ("PUT", "/v1/agent/service/register", Some(r#"{"Name":"x","Meta":{"a.b":"v"}}"#), 400, "Invalid Service Meta: Couldn't load metadata pair ('a.b', 'v'): Key contains invalid characters"),
        ("PUT", "/v1/agent/service/register", Some(r#"{"Name":"x","Meta":{"consul-x":"v"}}"#), 400, "Invalid Service Meta: Couldn't load metadata pair ('consul-x', 'v'): Key prefix 'consul-' is reserved for internal use"),
        ("PUT", "/v1/agent/service/register", Some(r#"{"Name":"x","Check":{"TTL":"1s","Interval":"1s"}}"#), 400, "Invalid check: Interval and TTL cannot both be specified"),
        ("PUT", "/v1/agent/service/register", Some(r#"{"Name":"x","Check":{"Notes":"n"}}"#), 400, "Invalid check: TTL must be > 0 for TTL checks"),
        ("PUT", "/v1/agent/service/register", Some(r#"{"Name":"x","Check":{"TCP":"127.0.0.1:1"}}"#), 400, "Invalid check: Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP or OSService checks"),
        ("PUT", "/v1/agent/service/register", Some(r#"{"Name":"x","Check":{"TTL":"1s","Status":"ok"}}"#), 400, "Status for checks must 'passing', 'warning', 'critical'"),
        ("GET", "/v1/health/service/web?passing=maybe", None, 400, "Invalid value for ?passing"),
        ("GET", "/v1/health/service/web?index=x", None, 400, "Invalid index"),
        ("GET", "/v1/health/service/web?index=1&wait=soon", None, 400, "Invalid wait time"),
        ("GET", "/v1/health/service/web?stale&consistent", None, 400, "Cannot specify ?stale with ?consistent, conflicting semantics."),
        ("GET", "/v1/agent/service/register", None, 405, "method GET not allowed"),
        ("PUT", "/v1/health/service/web", None, 405, "method PUT not allowed"),
    ];
    for (method, path, body, code, text) in cases {
        let reply = fake.call(method, path, *body).await;
        assert_eq!(reply.status, *code, "{method} {path}: {}", reply.body);
        assert!(
            reply.body.starts_with(text),
            "{method} {path}: {:?} does not start with {text:?}",
            reply.body
        );
        assert!(
            reply
                .header("Content-Type")
                .is_some_and(|t| t.starts_with("text/plain")),
            "{method} {path}: errors are text/plain"
        );
    }
    let reply = fake.call("GET", "/v1/agent/service/register", None).await;
    assert_eq!(reply.header("Allow"), Some("OPTIONS,PUT"));
    let reply = fake
        .call("OPTIONS", "/v1/agent/service/register", None)
        .await;
    assert_eq!(
        (reply.status, reply.header("Allow")),
        (200, Some("OPTIONS,PUT"))
    );
    let reply = fake.call("OPTIONS", "/v1/health/service/web", None).await;
    assert_eq!(reply.header("Allow"), Some("OPTIONS,GET"));

    // Successful writes: 200, empty body, no Content-Type.
    let reply = put(&fake, "/v1/agent/check/pass/service:web-1", None).await;
    assert_eq!((reply.status, reply.body.as_str()), (200, ""));
    assert!(reply.header("Content-Type").is_none());
}

#[tokio::test]
async fn acl_tokens_are_looked_up_in_order_and_enforced() {
    let fake = FakeConsul::with_options(FakeOptions {
        acl: Some(Acl::deny_by_default(vec![
            AclToken::all_services("writer", "acc-w", Level::Write),
            AclToken {
                secret: "web-only".into(),
                accessor: "acc-web".into(),
                service: vec![("web".into(), Level::Write)],
                node: Some(Level::Read),
            },
            AclToken::all_services("reader", "", Level::Read),
        ])),
        ..FakeOptions::default()
    })
    .await;
    let register = |token: &'static str, body: &'static str| {
        let fake = &fake;
        async move {
            fake.call_with(
                "PUT",
                "/v1/agent/service/register",
                &[("X-Consul-Token", token)],
                Some(body),
            )
            .await
        }
    };
    let reply = register("nope", TTL_CHECK).await;
    assert_eq!((reply.status, reply.body.as_str()), (403, "ACL not found"));
    assert_eq!(reply.header("X-Consul-Default-ACL-Policy"), Some("deny"));
    let reply = fake
        .call("PUT", "/v1/agent/service/register", Some(TTL_CHECK))
        .await;
    assert_eq!(reply.status, 403);
    assert_eq!(
        reply.body,
        "Permission denied: token with AccessorID '00000000-0000-0000-0000-000000000002' lacks permission 'service:write' on \"web\""
    );
    let reply = register("reader", TTL_CHECK).await;
    assert_eq!(
        reply.body,
        "Permission denied: token with AccessorID 'provided token' lacks permission 'service:write' on \"web\""
    );
    assert_eq!(register("web-only", TTL_CHECK).await.status, 200);
    let other = r#"{"Name":"db","Port":1,"Check":{"TTL":"10s"}}"#;
    let reply = register("web-only", other).await;
    assert!(
        reply
            .body
            .contains("AccessorID 'acc-web' lacks permission 'service:write' on \"db\""),
        "{}",
        reply.body
    );
    assert_eq!(register("writer", other).await.status, 200);

    // ?token= wins over the header, the header over Authorization.
    let pass = "/v1/agent/check/pass/service:db";
    let reply = fake
        .call_with(
            "PUT",
            &format!("{pass}?token=writer"),
            &[("X-Consul-Token", "web-only")],
            None,
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let reply = fake
        .call_with(
            "PUT",
            pass,
            &[
                ("X-Consul-Token", "web-only"),
                ("Authorization", "Bearer writer"),
            ],
            None,
        )
        .await;
    assert_eq!(reply.status, 403);
    let reply = fake
        .call_with(
            "PUT",
            pass,
            &[("Authorization", "bEaReR writer extra")],
            None,
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    // 404 for an unknown check comes before the token is even looked up.
    let reply = fake
        .call_with(
            "PUT",
            "/v1/agent/check/pass/nope",
            &[("X-Consul-Token", "nope")],
            None,
        )
        .await;
    assert_eq!(reply.status, 404);

    // Reads: entries the token may not read are filtered out silently.
    let anonymous = fake.call("GET", "/v1/health/service/web", None).await;
    assert_eq!((anonymous.status, anonymous.body.as_str()), (200, "[]"));
    assert!(anonymous
        .header("X-Consul-Results-Filtered-By-ACLs")
        .is_none());
    let no_db = fake
        .call_with(
            "GET",
            "/v1/health/service/db",
            &[("X-Consul-Token", "web-only")],
            None,
        )
        .await;
    assert_eq!(no_db.body, "[]");
    assert_eq!(
        no_db.header("X-Consul-Results-Filtered-By-ACLs"),
        Some("true")
    );
    let reply = fake
        .call_with(
            "GET",
            "/v1/catalog/services",
            &[("X-Consul-Token", "web-only")],
            None,
        )
        .await;
    assert_eq!(reply.json(), json!({"web": []}));
    let reply = fake
        .call_with(
            "GET",
            "/v1/health/service/db",
            &[("X-Consul-Token", "reader")],
            None,
        )
        .await;
    assert_eq!(ids(&reply), ["db"]);
}

/// §3.9.9: case-insensitive keys, snake_case aliases, numeric durations,
/// and both `check` and `checks`, as the Python clients send them.
#[tokio::test]
async fn python_client_bodies_decode() {
    let fake = FakeConsul::start().await;
    // py-consul 1.8.0
    put_ok(
        &fake,
        "/v1/agent/service/register?replace-existing-checks=true",
        Some(r#"{"name":"web","id":"web-1","address":"127.0.0.1","port":8080,"tags":["a"],"meta":{"v":"1"},"checks":[{"ttl":"10s","DeregisterCriticalServiceAfter":"1m"}],"weights":{"Passing":10,"Warning":1}}"#),
    )
    .await;
    let check = fake.check("service:web-1").expect("one check in checks");
    assert_eq!(check.ttl, Some(Duration::from_secs(10)));
    assert_eq!(check.dcsa, Some(Duration::from_secs(60)));
    let service = fake.service("web-1").expect("registered");
    assert_eq!(service["Weights"], json!({"Passing": 10, "Warning": 1}));
    assert_eq!(service["Meta"], json!({"v": "1"}));
    assert_eq!(
        service["TaggedAddresses"],
        json!({"lan_ipv4": {"Address": "127.0.0.1", "Port": 8080}, "wan_ipv4": {"Address": "127.0.0.1", "Port": 8080}})
    );
    // python-consul2 0.1.5: "check", no weights (default 1/1).
    put_ok(
        &fake,
        "/v1/agent/service/register",
        Some(r#"{"name":"web","id":"web-2","address":"::1","port":8081,"check":{"ttl":"10s","deregister_critical_service_after":"90s"}}"#),
    )
    .await;
    let check = fake.check("service:web-2").expect("check");
    assert_eq!(check.dcsa, Some(Duration::from_secs(90)));
    let service = fake.service("web-2").expect("registered");
    assert_eq!(service["Weights"], json!({"Passing": 1, "Warning": 1}));
    assert!(service["TaggedAddresses"]["lan_ipv6"].is_object());
    // Numbers are nanoseconds; mixed case; snake_case aliases.
    put_ok(
        &fake,
        "/v1/agent/service/register",
        Some(r#"{"NAME":"web","Id":"web-3","Port":1,"enable_tag_override":true,"tagged_addresses":{"lan":{"address":"10.0.0.1","port":1}},"Check":{"tTl":15000000000,"Interval":0,"script_args":[],"deregister_critical_service_after":"1m30s"}}"#),
    )
    .await;
    let check = fake.check("service:web-3").expect("check");
    assert_eq!(check.ttl, Some(Duration::from_secs(15)));
    assert_eq!(check.dcsa, Some(Duration::from_secs(90)));
    let service = fake.service("web-3").expect("registered");
    assert_eq!(service["EnableTagOverride"], true);
    assert_eq!(service["TaggedAddresses"]["lan"]["Address"], "10.0.0.1");
    // Colon escaped or not.
    put_ok(&fake, "/v1/agent/check/pass/service%3Aweb-3?note=ok", None).await;
    assert_eq!(status(&fake, "service:web-3"), "passing");
    put_ok(
        &fake,
        "/v1/agent/check/update/service:web-3",
        Some(r#"{"status":"warning","output":"w"}"#),
    )
    .await;
    assert_eq!(status(&fake, "service:web-3"), "warning");
}

/// §3.9.10: the maintenance check, exactly; excluded from `?passing`.
#[tokio::test]
async fn maintenance_mode() {
    let fake = FakeConsul::start().await;
    put_ok(&fake, "/v1/agent/service/register", Some(TTL_CHECK)).await;
    assert_eq!(ids(&health(&fake, "web?passing").await), ["web-1"]);
    put_ok(
        &fake,
        "/v1/agent/service/maintenance/web-1?enable=true&reason=upgrade%20now",
        None,
    )
    .await;
    let check = fake
        .check("_service_maintenance:web-1")
        .expect("maintenance check");
    assert_eq!(check.name, "Service Maintenance Mode");
    assert_eq!(check.status, "critical");
    assert_eq!(check.notes, "upgrade now");
    assert_eq!(check.kind, "");
    assert_eq!(check.service_id, "web-1");
    assert!(health(&fake, "web?passing").await.json() == json!([]));
    assert_eq!(ids(&health(&fake, "web").await), ["web-1"]);

    let index = fake.index();
    put_ok(
        &fake,
        "/v1/agent/service/maintenance/web-1?enable=1&reason=other",
        None,
    )
    .await;
    assert_eq!(fake.index(), index, "idempotent");
    assert_eq!(
        fake.check("_service_maintenance:web-1")
            .expect("check")
            .notes,
        "upgrade now"
    );
    put_ok(
        &fake,
        "/v1/agent/service/maintenance/web-1?enable=false",
        None,
    )
    .await;
    assert!(fake.check("_service_maintenance:web-1").is_none());
    put_ok(
        &fake,
        "/v1/agent/service/maintenance/web-1?enable=false",
        None,
    )
    .await;
    put_ok(
        &fake,
        "/v1/agent/service/maintenance/web-1?enable=true",
        None,
    )
    .await;
    assert_eq!(
        fake.check("_service_maintenance:web-1").expect("check").notes,
        "Maintenance mode is enabled for this service, but no reason was provided. This is a default message."
    );
    put_ok(&fake, "/v1/agent/service/deregister/web-1", None).await;
    assert!(fake.check("_service_maintenance:web-1").is_none());
}

/// §3.9.11: node checks in every entry; a node failure fails every instance.
#[tokio::test]
async fn node_checks_count_toward_passing() {
    let fake = FakeConsul::start().await;
    put_ok(&fake, "/v1/agent/service/register", Some(TTL_CHECK)).await;
    let other = TTL_CHECK.replace("web-1", "web-2");
    put_ok(&fake, "/v1/agent/service/register", Some(&other)).await;
    let reply = health(&fake, "web").await;
    let entries = reply.json();
    for entry in entries.as_array().expect("array") {
        assert_eq!(entry["Checks"][0]["CheckID"], "serfHealth");
        assert_eq!(entry["Node"]["Node"], "node1");
        assert_eq!(entry["Node"]["Address"], "127.0.0.1");
        assert!(entry["Service"]["Tags"].is_array());
    }
    assert_eq!(ids(&health(&fake, "web?passing=true").await).len(), 2);
    let index = reply.index();
    fake.set_node_status("critical");
    let failed = health(&fake, "web?passing=1").await;
    assert_eq!(failed.body, "[]");
    assert!(failed.index() > index);
    assert_eq!(ids(&health(&fake, "web").await).len(), 2);
    fake.set_node_status("passing");
    assert_eq!(ids(&health(&fake, "web?passing").await).len(), 2);
}

/// §3.9.12: a write is visible to the very next read; tag filters;
/// the dc parameter; consistency headers.
#[tokio::test]
async fn writes_are_visible_at_once_and_queries_filter() {
    let fake = FakeConsul::start().await;
    let tagged = r#"{"Name":"web","ID":"web-t","Port":1,"Tags":["a","b"],"Check":{"TTL":"10s","Status":"passing"}}"#;
    put_ok(&fake, "/v1/agent/service/register", Some(tagged)).await;
    put_ok(&fake, "/v1/agent/service/register", Some(TTL_CHECK)).await;
    assert_eq!(ids(&health(&fake, "web").await), ["web-1", "web-t"]);
    assert_eq!(ids(&health(&fake, "web?tag=a").await), ["web-t"]);
    assert_eq!(ids(&health(&fake, "web?tag=a&tag=b").await), ["web-t"]);
    assert!(ids(&health(&fake, "web?tag=a&tag=c").await).is_empty());
    put_ok(&fake, "/v1/agent/service/deregister/web-t", None).await;
    assert_eq!(ids(&health(&fake, "web").await), ["web-1"]);
    assert_eq!(ids(&health(&fake, "web?dc=dc1").await), ["web-1"]);
    let elsewhere = fake
        .call("GET", "/v1/health/service/web?dc=dc9", None)
        .await;
    assert_eq!(elsewhere.status, 500);
    let consistent = health(&fake, "web?consistent").await;
    assert_eq!(
        consistent.header("X-Consul-Effective-Consistency"),
        Some("consistent")
    );
    assert!(health(&fake, "web")
        .await
        .header("X-Consul-Effective-Consistency")
        .is_none());
    let entry: Value = health(&fake, "web").await.json()[0].clone();
    assert_eq!(entry["Service"]["Weights"]["Passing"], 1);
    assert_eq!(entry["Checks"][1]["Type"], "ttl");
}

#[tokio::test]
async fn hooks_restart_empty_and_cut_connections() {
    let fake = FakeConsul::start().await;
    put_ok(&fake, "/v1/agent/service/register", Some(TTL_CHECK)).await;
    let index = health(&fake, "web").await.index();
    let query = format!("/v1/health/service/web?index={index}&wait=1h");
    let addr = fake.addr();
    let blocked = tokio::spawn(async move {
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .expect("handshake");
        tokio::spawn(connection);
        let request = hyper::Request::get(query)
            .header("Host", "fake")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .expect("request");
        sender.send_request(request).await.is_err()
    });
    eventually("the query to block", DEADLINE, || async {
        fake.blocked().len() == 1
    })
    .await;
    fake.restart_empty();
    assert!(
        tokio::time::timeout(DEADLINE, blocked)
            .await
            .expect("the connection is cut")
            .expect("task"),
        "the blocked query fails"
    );
    assert!(fake.service_ids().is_empty());
    assert_eq!(health(&fake, "web").await.index(), 1);
    let reply = put(&fake, "/v1/agent/check/pass/service:web-1", None).await;
    assert_eq!(reply.status, 404);
}

/// Third-party clients work unchanged against the fake (consul-api.md,
/// "Third-party clients that must work unchanged"). Opt-in, since it needs
/// Python packages: set `SQUIRE_CONSUL_PYTHONS` to interpreters that have
/// py-consul 1.8.0 and python-consul2 0.1.5 (one venv each), e.g.
///
/// ```sh
/// python3 -m venv /tmp/py-consul && /tmp/py-consul/bin/pip install py-consul==1.8.0
/// python3 -m venv /tmp/py-consul2 && /tmp/py-consul2/bin/pip install python-consul2==0.1.5
/// SQUIRE_CONSUL_PYTHONS="/tmp/py-consul/bin/python /tmp/py-consul2/bin/python" \
///     cargo test --test consul_fake -- --ignored
/// ```
#[tokio::test]
#[ignore = "needs py-consul and python-consul2; see the doc comment"]
async fn python_clients_work_unchanged() {
    let pythons = std::env::var("SQUIRE_CONSUL_PYTHONS")
        .expect("SQUIRE_CONSUL_PYTHONS lists the Python interpreters to use");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/consul/python_clients.py"
    );
    let mut ran = 0;
    for python in pythons.split_whitespace() {
        let fake = FakeConsul::start().await;
        let output = tokio::process::Command::new(python)
            .arg(script)
            .arg(fake.addr().ip().to_string())
            .arg(fake.addr().port().to_string())
            .output();
        let output = tokio::time::timeout(DEADLINE, output)
            .await
            .expect("the script finishes")
            .expect("the interpreter runs");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.starts_with("ok"),
            "{python}: {stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        eprintln!("{python}: {}", stdout.trim());
        ran += 1;
    }
    assert!(ran > 0, "SQUIRE_CONSUL_PYTHONS is empty");
}
