//! The fake Eureka server checked against the Eureka REST operations
//! documentation, operation by operation (see `tests/support/eureka.rs`
//! for the list), so the tests of squire's Eureka backend test against
//! what a real server does.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::eureka::{call, FakeEureka};
use support::{eventually, DEADLINE};

const JSON: &str = "application/json";

fn document(id: &str, port: u16, duration: u64) -> String {
    serde_json::json!({ "instance": {
        "instanceId": id, "hostName": "host-a", "app": "battle", "ipAddr": "10.0.0.5",
        "status": "UP", "port": { "$": port, "@enabled": "true" },
        "dataCenterInfo": { "@class": "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo", "name": "MyOwn" },
        "leaseInfo": { "renewalIntervalInSecs": 1, "durationInSecs": duration },
        "metadata": { "zone": "a" }
    }})
    .to_string()
}

async fn get(fake: &FakeEureka, path: &str) -> (u16, Value) {
    let (status, body) = call(fake.addr(), "GET", path, None, JSON).await;
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

#[tokio::test]
async fn register_query_renew_and_cancel_answer_as_documented() {
    let fake = FakeEureka::start().await;
    let addr = fake.addr();
    let (status, _) = call(
        addr,
        "POST",
        "/eureka/apps/battle",
        Some(&document("b1", 7000, 90)),
        JSON,
    )
    .await;
    assert_eq!(status, 204, "register: 204 on success");
    let (status, _) = call(addr, "POST", "/eureka/apps/battle", Some("{}"), JSON).await;
    assert_eq!(status, 400, "a document without an instance is refused");

    let (status, app) = get(&fake, "/eureka/apps/BATTLE").await;
    assert_eq!(status, 200);
    assert_eq!(
        app["application"]["name"], "BATTLE",
        "app names are upper-cased"
    );
    assert_eq!(app["application"]["instance"][0]["instanceId"], "b1");
    assert_eq!(app["application"]["instance"][0]["port"]["$"], 7000);
    assert_eq!(get(&fake, "/eureka/apps/battle/b1").await.0, 200);
    assert_eq!(
        get(&fake, "/eureka/instances/b1").await.1["instance"]["app"],
        "BATTLE"
    );
    assert_eq!(get(&fake, "/eureka/apps/NOPE").await.0, 404);
    let (status, all) = get(&fake, "/eureka/apps").await;
    assert_eq!(status, 200);
    assert_eq!(all["applications"]["apps__hashcode"], "UP_1_");

    assert_eq!(
        call(addr, "PUT", "/eureka/apps/BATTLE/b1", None, JSON)
            .await
            .0,
        200,
        "renew"
    );
    assert_eq!(
        call(addr, "PUT", "/eureka/apps/BATTLE/nope", None, JSON)
            .await
            .0,
        404,
        "renew unknown"
    );
    assert_eq!(
        call(addr, "DELETE", "/eureka/apps/BATTLE/b1", None, JSON)
            .await
            .0,
        200,
        "cancel"
    );
    assert_eq!(
        call(addr, "DELETE", "/eureka/apps/BATTLE/b1", None, JSON)
            .await
            .0,
        404
    );
    assert_eq!(get(&fake, "/eureka/apps/BATTLE").await.0, 404);
}

#[tokio::test]
async fn a_status_override_holds_across_registration_until_removed() {
    let fake = FakeEureka::start().await;
    let addr = fake.addr();
    call(
        addr,
        "POST",
        "/eureka/apps/BATTLE",
        Some(&document("b1", 7000, 90)),
        JSON,
    )
    .await;
    let path = "/eureka/apps/BATTLE/b1/status?value=OUT_OF_SERVICE";
    assert_eq!(call(addr, "PUT", path, None, JSON).await.0, 200);
    let instance = &fake.instances("BATTLE")[0];
    assert_eq!(instance["status"], "OUT_OF_SERVICE");
    assert_eq!(instance["overriddenstatus"], "OUT_OF_SERVICE");
    // A registration (a status update by the client) keeps the override.
    call(
        addr,
        "POST",
        "/eureka/apps/BATTLE",
        Some(&document("b1", 7000, 90)),
        JSON,
    )
    .await;
    assert_eq!(fake.instances("BATTLE")[0]["status"], "OUT_OF_SERVICE");
    let path = "/eureka/apps/BATTLE/b1/status?value=UP";
    assert_eq!(call(addr, "DELETE", path, None, JSON).await.0, 200);
    assert_eq!(fake.instances("BATTLE")[0]["status"], "UP");
    assert_eq!(
        call(addr, "DELETE", "/eureka/apps/BATTLE/b1/status", None, JSON)
            .await
            .0,
        200
    );
    assert_eq!(
        fake.instances("BATTLE")[0]["status"],
        "UNKNOWN",
        "no value: UNKNOWN"
    );
    let unknown = "/eureka/apps/BATTLE/nope/status?value=OUT_OF_SERVICE";
    assert_eq!(call(addr, "PUT", unknown, None, JSON).await.0, 404);
}

#[tokio::test]
async fn an_instance_not_renewed_within_its_duration_expires() {
    let fake = FakeEureka::start().await;
    let started = tokio::time::Instant::now();
    call(
        fake.addr(),
        "POST",
        "/eureka/apps/BATTLE",
        Some(&document("short", 7000, 1)),
        JSON,
    )
    .await;
    call(
        fake.addr(),
        "POST",
        "/eureka/apps/BATTLE",
        Some(&document("long", 7001, 90)),
        JSON,
    )
    .await;
    assert_eq!(fake.instances("BATTLE").len(), 2);
    eventually("the unrenewed instance to expire", DEADLINE, || async {
        fake.instances("BATTLE").len() == 1
    })
    .await;
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "not before its duration"
    );
    assert_eq!(fake.instances("BATTLE")[0]["instanceId"], "long");
    let (status, _) = call(fake.addr(), "PUT", "/eureka/apps/BATTLE/short", None, JSON).await;
    assert_eq!(status, 404, "an expired instance's renewal is refused");
}

#[tokio::test]
async fn the_delta_lists_changes_with_their_action_and_the_whole_hash_code() {
    let fake = FakeEureka::start().await;
    let addr = fake.addr();
    call(
        addr,
        "POST",
        "/eureka/apps/BATTLE",
        Some(&document("b1", 7000, 90)),
        JSON,
    )
    .await;
    call(
        addr,
        "POST",
        "/eureka/apps/BATTLE",
        Some(&document("b2", 7001, 90)),
        JSON,
    )
    .await;
    call(
        addr,
        "PUT",
        "/eureka/apps/BATTLE/b1/status?value=OUT_OF_SERVICE",
        None,
        JSON,
    )
    .await;
    call(addr, "DELETE", "/eureka/apps/BATTLE/b2", None, JSON).await;
    let (status, delta) = get(&fake, "/eureka/apps/delta").await;
    assert_eq!(status, 200);
    let actions: Vec<(String, String)> = delta["applications"]["application"][0]["instance"]
        .as_array()
        .expect("instances")
        .iter()
        .map(|i| {
            (
                i["instanceId"].as_str().unwrap_or_default().to_owned(),
                i["actionType"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let expected = [
        ("b1", "ADDED"),
        ("b2", "ADDED"),
        ("b1", "MODIFIED"),
        ("b2", "DELETED"),
    ];
    let expected: Vec<(String, String)> = expected
        .iter()
        .map(|(i, a)| (i.to_string(), a.to_string()))
        .collect();
    assert_eq!(actions, expected);
    assert_eq!(delta["applications"]["apps__hashcode"], "OUT_OF_SERVICE_1_");
}

#[tokio::test]
async fn answers_are_xml_unless_json_is_asked_for() {
    let fake = FakeEureka::start().await;
    call(
        fake.addr(),
        "POST",
        "/eureka/apps/BATTLE",
        Some(&document("b1", 7000, 90)),
        JSON,
    )
    .await;
    let (status, xml) = call(fake.addr(), "GET", "/eureka/apps", None, "*/*").await;
    assert_eq!(status, 200);
    assert_eq!(
        call(fake.addr(), "GET", "/eureka/apps", None, "application/xml")
            .await
            .1,
        xml
    );
    for part in [
        "<applications>",
        "<apps__hashcode>UP_1_</apps__hashcode>",
        "<application>",
        "<name>BATTLE</name>",
        "<instanceId>b1</instanceId>",
        "<port enabled=\"true\">7000</port>",
        "<dataCenterInfo class=\"com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo\"><name>MyOwn</name></dataCenterInfo>",
        "<metadata><zone>a</zone></metadata>",
    ] {
        assert!(xml.contains(part), "{part} in {xml}");
    }
}
