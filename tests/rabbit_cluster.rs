//! A three-node RabbitMQ cluster started on this machine (distinct node names and ports), its
//! vhost's default queue type quorum, the service given all three nodes in `[rabbitmq] hosts`:
//! the node the service is connected to is killed under load, the service reconnects to a
//! surviving node, and every request is delivered exactly once with its result.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::ledger::{deliveries, outbox_statuses, publish_all_to, tracked_request};
use common::rabbit_node::RabbitNode;
use common::{make_certs, Service, SmtpServer, TestEnv};

const TENANT: &str = "01996243-2d8c-726d-a5c2-81b7005ce9a2";
const PROVIDER: &str = "0198a819-e5d3-703a-a39a-1b77e3ece687";
const VHOST: &str = "mbcluster";

/// Takes every message of `queue` through `url` until it stays empty for `quiet`.
async fn drain(url: &str, queue: &str, quiet: Duration) -> Vec<serde_json::Value> {
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .expect("connect to a cluster node");
    let ch = conn.create_channel().await.expect("a channel");
    let mut out = Vec::new();
    let mut last = Instant::now();
    while last.elapsed() < quiet {
        match ch
            .basic_get(
                queue.into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
        {
            Ok(Some(m)) => {
                out.push(serde_json::from_slice(&m.delivery.data).unwrap_or_default());
                last = Instant::now();
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let _ = conn.close(200, "OK".into()).await;
    out
}

#[tokio::test]
async fn a_node_of_a_three_node_quorum_cluster_killed_under_load_loses_nothing() {
    const N: usize = 2000;
    let env = TestEnv::new("rcluster");
    let dir = env.dir.join("rabbit");
    let (ca, cert, key) = make_certs(&dir.join("certs"));
    let booted = Instant::now();
    let mut nodes: Vec<RabbitNode> = (0..3)
        .map(|i| RabbitNode::start_with(&dir.join(format!("n{i}")), (&ca, &cert, &key), ""))
        .collect();
    for n in &nodes[1..] {
        n.ctl(&["stop_app"]);
        n.ctl(&["join_cluster", &nodes[0].name]);
        n.ctl(&["start_app"]);
    }
    let status = nodes[0].ctl(&["cluster_status", "--formatter", "json"]);
    let status: serde_json::Value =
        serde_json::from_slice(&status.stdout).expect("cluster_status as JSON");
    let running = status["running_nodes"].as_array().map(Vec::len);
    assert_eq!(running, Some(3), "{status}");
    println!("three-node cluster up in {:?}", booted.elapsed());
    nodes[0].ctl(&["add_vhost", VHOST, "--default-queue-type", "quorum"]);
    nodes[0].ctl(&["set_permissions", "-p", VHOST, "guest", ".*", ".*", ".*"]);

    let hosts: Vec<String> = nodes
        .iter()
        .map(|n| format!("\"127.0.0.1:{}\"", n.amqp_port()))
        .collect();
    env.write_config_with(
        &format!(
            "hosts = [{}]\nvhost = \"{VHOST}\"\nreconnect_max_delay = \"1s\"\nheartbeat = \"5s\"\n",
            hosts.join(", ")
        ),
        &env.db_url(),
        "",
    );
    let smtp = SmtpServer::start(&env.dir.join("smtp"), &[]);
    env.smtp_tenant(TENANT, PROVIDER, smtp.port, "");
    let svc = Service::start(&env);
    svc.wait_health(200, Duration::from_secs(60)).await;
    // Every queue of the contract is a quorum queue replicated on the three nodes.
    let listed = nodes[1].ctl(&[
        "list_queues",
        "-p",
        VHOST,
        "name",
        "type",
        "--no-table-headers",
    ]);
    let listed = String::from_utf8_lossy(&listed.stdout).to_string();
    for q in [
        "email.send",
        "email.send.result",
        "email.send.dlq",
        "email.inbound",
    ] {
        assert!(
            listed
                .lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>() == [q, "quorum"]),
            "{q} is not a quorum queue: {listed}"
        );
    }

    let ids: Vec<String> = (0..N).map(|i| format!("rc-{i}")).collect();
    let bodies: Vec<Vec<u8>> = ids
        .iter()
        .map(|id| serde_json::to_vec(&tracked_request(TENANT, PROVIDER, id)).expect("json"))
        .collect();
    let survivor = nodes[1].amqp_url(VHOST);
    publish_all_to(&survivor, &bodies).await;
    let start = Instant::now();
    while deliveries(&smtp).len() < N / 4 && start.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The service connects to the first node it can, in order: the first.
    nodes[0].kill();
    let killed_at = deliveries(&smtp).len();
    println!("killed node 1 of 3 after {killed_at} deliveries");
    assert!(killed_at < N, "the load was over before the kill");

    let start = Instant::now();
    while deliveries(&smtp).len() < N && start.elapsed() < Duration::from_secs(180) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let got = deliveries(&smtp);
    let missing: Vec<&String> = ids.iter().filter(|id| !got.contains_key(*id)).collect();
    assert!(
        missing.is_empty(),
        "never delivered ({}): {:?}\n{}",
        missing.len(),
        &missing[..missing.len().min(10)],
        svc.log_text()
    );
    let twice: Vec<(&String, &usize)> = got.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "delivered twice: {twice:?}");
    assert_eq!(got.len(), N);
    svc.wait_health(200, Duration::from_secs(30)).await;
    let log = svc.log_text();
    assert!(
        log.matches("connected to RabbitMQ; topology declared")
            .count()
            >= 2,
        "the service did not reconnect:\n{log}"
    );
    assert_eq!(
        outbox_statuses(&env.db().await).await,
        BTreeMap::from([("sent".to_string(), N as i64)])
    );
    // Every request has its `sent` result on the (replicated) result queue.
    let results = drain(&survivor, "email.send.result", Duration::from_secs(3)).await;
    let mut by_id: BTreeMap<String, usize> = BTreeMap::new();
    for r in &results {
        if r["status"] == "sent" {
            *by_id
                .entry(r["message_id"].as_str().unwrap_or("").to_string())
                .or_default() += 1;
        }
    }
    let without: Vec<&String> = ids.iter().filter(|id| !by_id.contains_key(*id)).collect();
    assert!(without.is_empty(), "no result for {}", without.len());
    println!(
        "{N} requests, a node killed: delivered once each, {} results ({} repeated after the failover)",
        results.len(),
        results.len() - N
    );
    assert!(!log.contains("panicked"));
}
