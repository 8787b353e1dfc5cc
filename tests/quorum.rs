//! A vhost whose default queue type is quorum (RabbitMQ 3.10's `--default-queue-type quorum`,
//! the way a cluster makes the guide's argument-less durable declares replicated): the
//! service's topology comes up there as quorum queues — its own delay queues included, whose
//! TTL and dead-lettering keep working — and a request retried through one is delivered once.
//! And `[rabbitmq] hosts`, the nodes of a cluster tried in order.

mod common;

use std::time::Duration;

use common::{guide_request, wait_count, Service, SmtpServer, TestEnv};

const TENANT: &str = "01996243-2d8c-726d-a5c2-81b7005ce9a2";
const PROVIDER: &str = "0198a819-e5d3-703a-a39a-1b77e3ece687";

#[tokio::test]
async fn on_a_quorum_vhost_every_queue_is_quorum_and_a_retry_is_delivered_once() {
    let env = TestEnv::with_default_queue_type("quorum", "quorum");
    let smtp = SmtpServer::start(&env.dir.join("smtp"), &[]);
    smtp.set_reply(Some("451 4.3.0 Mailbox busy, try later"));
    env.smtp_tenant(TENANT, PROVIDER, smtp.port, "");
    let svc = Service::start(&env);
    svc.wait_health(200, Duration::from_secs(30)).await;

    // What the guide's clients do first: an argument-less durable declare of the queues the
    // service made. It agrees with them (no PRECONDITION_FAILED).
    let conn = env.amqp().await;
    let ch = conn.create_channel().await.unwrap();
    for q in [
        "email.send",
        "email.send.result",
        "email.inbound",
        "email.sync.user",
    ] {
        ch.queue_declare(
            q.into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("declaring {q} as the guide does: {e}"));
    }
    let _ = conn.close(200, "OK".into()).await;

    let listed = common::rabbitmqctl(&[
        "list_queues",
        "-p",
        &env.vhost,
        "--no-table-headers",
        "--silent",
        "name",
        "type",
    ]);
    let listed = String::from_utf8_lossy(&listed.stdout).to_string();
    let queues: Vec<(&str, &str)> = listed.lines().filter_map(|l| l.split_once('\t')).collect();
    for q in [
        "email.send",
        "email.send.result",
        "email.send.dlq",
        "email.inbound",
        "email.inbound.dlq",
        "email.sync.user",
        "mailbridge.retry.email.send.1000ms",
        "mailbridge.retry.email.send.3600000ms",
    ] {
        assert!(
            queues.iter().any(|(n, t)| *n == q && t.trim() == "quorum"),
            "{q} is not a quorum queue: {listed}"
        );
    }

    // Refused once (451), parked in the quorum delay queue, delivered after its TTL.
    env.publish(
        "email.send",
        &serde_json::to_vec(&guide_request(TENANT, PROVIDER, "quorum-1", None)).unwrap(),
    )
    .await;
    let db = env.db().await;
    let retrying = wait_count(
        &db,
        "SELECT count(*) FROM outbox WHERE status = 'retrying'",
        1,
        Duration::from_secs(15),
    )
    .await;
    assert_eq!(retrying, 1, "{}", svc.log_text());
    smtp.set_reply(None);
    let sent = wait_count(
        &db,
        "SELECT count(*) FROM outbox WHERE status = 'sent' AND retry_count = 1",
        1,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(sent, 1, "{}", svc.log_text());
    assert_eq!(smtp.messages().len(), 1);
    let results = env
        .take("email.send.result", 3, Duration::from_secs(5))
        .await;
    let statuses: Vec<&str> = results
        .iter()
        .map(|r| r["status"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(statuses, ["retrying", "sent"], "{results:?}");
}

#[tokio::test]
async fn rabbitmq_hosts_are_tried_in_order_past_a_node_that_is_down() {
    let env = TestEnv::new("hosts");
    let dead = common::free_port();
    env.write_config_with(
        &format!(
            "hosts = [\"127.0.0.1:{dead}\", \"127.0.0.1:5672\"]\nvhost = \"{}\"\nreconnect_max_delay = \"2s\"\nheartbeat = \"5s\"\n",
            env.vhost
        ),
        &env.db_url(),
        "",
    );
    let smtp = SmtpServer::start(&env.dir.join("smtp"), &[]);
    env.smtp_tenant(TENANT, PROVIDER, smtp.port, "");
    let svc = Service::start(&env);
    svc.wait_health(200, Duration::from_secs(30)).await;
    let (_, health) = svc.get_json("/health").await;
    let endpoint = health["components"]["rabbitmq"]["endpoint"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        endpoint.contains(&format!("127.0.0.1:{dead}")) && endpoint.contains("127.0.0.1:5672"),
        "{health}"
    );
    env.publish(
        "email.send",
        &serde_json::to_vec(&guide_request(TENANT, PROVIDER, "hosts-1", None)).unwrap(),
    )
    .await;
    let mails = smtp.wait_for(1, Duration::from_secs(15)).await;
    assert_eq!(mails.len(), 1, "{}", svc.log_text());
}
