//! End to end against a real ZooKeeper (Debian's 3.8): the ephemeral node
//! and its data, a deleted node and an expired session answered at once,
//! discovery and proxying between two agents, a server killed and
//! restarted, garbage data, and digest auth with its ACL.

mod support;

use std::time::Duration;

use tokio::time::Instant;

use support::config::{AgentToml, Section};
use support::zookeeper::ZooKeeper;
use support::{eventually, session, Backend, TestAgent, DEADLINE};
use zookeeper_client::{Acls, Client, CreateMode};

/// The data and ephemeral owner of the node at `path`, if it exists.
async fn node(client: &Client, path: &str) -> Option<(String, i64)> {
    let (data, stat) = client.get_data(path).await.ok()?;
    Some((String::from_utf8_lossy(&data).into_owned(), stat.ephemeral_owner))
}

/// Creates a persistent node at `path` with `data`, its parents first.
async fn put(client: &Client, path: &str, data: &str) {
    let options = CreateMode::Persistent.with_acls(Acls::anyone_all());
    let parent = &path[..path.rfind('/').expect("absolute path")];
    client.mkdir(parent, &options).await.expect("mkdir");
    client
        .create(path, data.as_bytes(), &options)
        .await
        .expect("create");
}

#[tokio::test]
async fn registration_is_an_ephemeral_node_with_the_exact_json_and_leaves_at_once() {
    let zk = ZooKeeper::start().await;
    let client = zk.client().await;
    let addr = "127.0.0.1:7000".parse().expect("addr");
    let agent = TestAgent::start(
        &AgentToml::zookeeper(&zk, "/reg").service(Section::game_service("battle", addr)),
    )
    .await;

    let path = "/reg/battle/battle-1";
    eventually("the node in ZooKeeper", DEADLINE, || async {
        node(&client, path).await.is_some()
    })
    .await;
    let (json, owner) = node(&client, path).await.expect("node present");
    assert_eq!(
        json,
        r#"{"name":"battle","id":"battle-1","host":"127.0.0.1","port":7000,"tags":["game"],"metadata":{"zone":"a"},"version":"1.0.0","weight":100,"status":"healthy"}"#
    );
    assert_ne!(owner, 0, "the node is ephemeral");
    let (_, parent) = client.get_data("/reg/battle").await.expect("parent");
    assert_eq!(parent.ephemeral_owner, 0, "parents are persistent");
    eventually("/ready", DEADLINE, || async {
        agent.get("/ready").await.0 == 200
    })
    .await;
    let this = agent.json("/v1/self").await;
    let registration = &this["registrations"][0];
    assert_eq!(registration["name"], "zookeeper", "named after its kind");
    assert_eq!(registration["registry"], "zookeeper");
    assert_eq!(registration["target"], zk.server());
    assert_eq!(registration["lease"], format!("{owner:x}"), "the session is the lease");

    agent.stop().await;
    assert!(
        node(&client, path).await.is_none(),
        "the node is deleted on shutdown"
    );
    let children = client.list_children("/reg/battle").await.expect("list");
    assert!(children.is_empty(), "{children:?}");
}

#[tokio::test]
async fn a_node_deleted_under_a_live_session_is_created_again_at_once() {
    let zk = ZooKeeper::start().await;
    let client = zk.client().await;
    let addr = "127.0.0.1:7002".parse().expect("addr");
    // ttl 30s: the next keep-alive is 10 s away, so only the watch of our
    // node can bring it back within the bound below.
    let registry = Section::zookeeper(&zk, "/deleted").set("ttl", "30s");
    let agent =
        TestAgent::start(&AgentToml::new(registry).service(Section::game_service("logic", addr)))
            .await;
    let path = "/deleted/logic/logic-1";
    eventually("the node in ZooKeeper", DEADLINE, || async {
        node(&client, path).await.is_some()
    })
    .await;
    let (_, old_owner) = node(&client, path).await.expect("node present");

    client.delete(path, None).await.expect("delete behind the agent's back");
    let at = Instant::now();
    eventually("the node to come back", DEADLINE, || async {
        node(&client, path).await.is_some()
    })
    .await;
    let took = at.elapsed();
    println!("measured: node back {took:?} after it was deleted");
    assert!(took < Duration::from_millis(1000), "took {took:?}");
    let (_, owner) = node(&client, path).await.expect("node present");
    assert_ne!(owner, old_owner, "created again in a new session");
    let (_, metrics) = agent.get("/metrics").await;
    assert!(
        metrics.contains(r#"squire_registration_deleted_total{registry="zookeeper",kind="zookeeper"} 1"#),
        "{metrics}"
    );
    agent.stop().await;
}
