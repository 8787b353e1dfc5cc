//! How the service sits in a deployment: a vhost whose default queue type is quorum
//! (RabbitMQ 3.10's `--default-queue-type quorum`, the way a cluster makes the guide's
//! argument-less durable declares replicated) — the service's topology comes up there as
//! quorum queues, its own delay queues included, whose TTL and dead-lettering keep working;
//! `[rabbitmq] hosts`, the nodes of a cluster tried in order; and `GET /api/mailboxes`, the
//! mailboxes' health a page at a time.

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

/// `GET /api/mailboxes`: the mailboxes' health a page at a time, by tenant and state.
#[tokio::test]
async fn mailboxes_are_listed_a_page_at_a_time_by_tenant_and_state() {
    let env = TestEnv::new("mailbox-pages");
    let closed = common::free_port();
    for (tenant, n) in [("tenant-a", 5), ("tenant-b", 3)] {
        let mut text = format!(
            "id = \"{tenant}\"\n[[providers]]\nid = \"{tenant}-p\"\nkind = \"file\"\ndir = \"sent\"\n"
        );
        for i in 0..n {
            text.push_str(&format!(
                "[[mailboxes]]\nid = \"{tenant}-m{i}\"\nuser_id = \"u{i}\"\nprovider_id = \"{tenant}-p\"\nprotocol = \"imap\"\nhost = \"127.0.0.1\"\nport = {closed}\ntls = \"none\"\nusername = \"u{i}\"\npassword = \"pw\"\nidle = false\npoll_interval = \"60s\"\n"
            ));
        }
        env.write_tenant(&format!("{tenant}.toml"), &text);
    }
    let svc = Service::start(&env);
    svc.wait_health(200, Duration::from_secs(30)).await;
    // Every mailbox fails to connect (nothing listens): all down once they tried.
    let start = std::time::Instant::now();
    let mut page = serde_json::Value::Null;
    while start.elapsed() < Duration::from_secs(20) {
        page = svc.get_json("/api/mailboxes?status=down").await.1;
        if page["total"] == 8 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(page["total"], 8, "{page}");
    assert_eq!(page["counts"]["down"], 8, "{page}");
    assert_eq!(page["counts"]["ok"], 0, "{page}");

    let (code, page) = svc
        .get_json("/api/mailboxes?tenant=tenant-a&offset=2&limit=2")
        .await;
    assert_eq!(code, 200);
    assert_eq!(page["total"], 5, "{page}");
    let ids: Vec<&str> = page["mailboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["tenant-a-m2", "tenant-a-m3"], "{page}");
    assert_eq!(page["mailboxes"][0]["status"], "down");
    assert!(
        page["mailboxes"][0]["last_error"].as_str().is_some(),
        "{page}"
    );

    let (_, page) = svc.get_json("/api/mailboxes?status=ok").await;
    assert_eq!(page["total"], 0, "{page}");
    assert_eq!(page["mailboxes"].as_array().unwrap().len(), 0);
    let (code, page) = svc.get_json("/api/mailboxes?status=sideways").await;
    assert_eq!(code, 400, "{page}");
    assert!(page["error"]
        .as_str()
        .unwrap()
        .contains("status=ok|down|starting"));
}
