//! The foundation against the real RabbitMQ and PostgreSQL: topology, queue status, health
//! through a broker-side disconnect, migrations, config checking and graceful shutdown.

mod common;

use std::time::Duration;

use common::checks as check;
use common::{rabbitmqctl, Service, SmtpServer, TestEnv};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties;

const QUEUES: [&str; 6] = [
    "email.send",
    "email.inbound",
    "email.sync.user",
    "email.send.result",
    "email.send.dlq",
    "email.inbound.dlq",
];

#[tokio::test]
async fn topology_is_declared_as_specified_and_clients_can_declare_it_again() {
    let env = TestEnv::new("topology");
    let svc = Service::start(&env);
    svc.wait_health(200, Duration::from_secs(30)).await;

    // What the broker holds: durable queues with no arguments, each bound by its own name.
    let out = rabbitmqctl(&[
        "list_queues",
        "-p",
        &env.vhost,
        "--no-table-headers",
        "--silent",
        "name",
        "durable",
        "arguments",
    ]);
    let listing = String::from_utf8_lossy(&out.stdout).to_string();
    for q in QUEUES {
        let line = listing
            .lines()
            .find(|l| l.split_whitespace().next() == Some(q))
            .unwrap_or_else(|| panic!("queue {q} missing:\n{listing}"));
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields[1], "true", "{q} must be durable: {line}");
        assert_eq!(fields[2], "[]", "{q} must have no arguments: {line}");
    }
    let out = rabbitmqctl(&[
        "list_exchanges",
        "-p",
        &env.vhost,
        "--no-table-headers",
        "--silent",
        "name",
        "type",
        "durable",
    ]);
    let exchanges = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        exchanges
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == ["email.exchange", "direct", "true"]),
        "{exchanges}"
    );
    let out = rabbitmqctl(&[
        "list_bindings",
        "-p",
        &env.vhost,
        "--no-table-headers",
        "--silent",
        "source_name",
        "destination_name",
        "routing_key",
    ]);
    let bindings = String::from_utf8_lossy(&out.stdout).to_string();
    for q in QUEUES {
        assert!(
            bindings
                .lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["email.exchange", q, q]),
            "binding for {q} missing:\n{bindings}"
        );
    }

    // A client declaring the queues as the guide's examples do (durable, no arguments) succeeds.
    let conn = env.amqp().await;
    let ch = conn.create_channel().await.unwrap();
    for q in QUEUES {
        ch.queue_declare(
            q.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("client declaration of {q} failed: {e}"));
    }
}

#[tokio::test]
async fn queue_status_reports_the_true_depth() {
    let env = TestEnv::new("status");
    let svc = Service::start(&env);
    svc.wait_health(200, Duration::from_secs(30)).await;

    // Five persistent messages, confirmed by the broker, to a queue nothing in the service consumes:
    // two through the exchange, three through the default exchange, as CRM clients do.
    let conn = env.amqp().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for i in 0..5 {
        let exchange = if i < 2 { "email.exchange" } else { "" };
        ch.basic_publish(
            exchange.into(),
            "email.inbound".into(),
            BasicPublishOptions::default(),
            format!("{{\"n\":{i}}}").as_bytes(),
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }

    let (code, body) = svc.get_json("/api/rabbitmq/status").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["success"], true);
    assert_eq!(body["connection_status"], "connected");
    for q in QUEUES {
        assert!(body["queues"][q].is_object(), "{q} missing from {body}");
    }
    assert_eq!(
        body["queues"]["email.inbound"]["message_count"], 5,
        "{body}"
    );
    assert_eq!(body["queues"]["email.inbound"]["consumer_count"], 0);
    assert_eq!(body["queues"]["email.inbound"]["status"], "idle");
    assert_eq!(body["queues"]["email.send.dlq"]["message_count"], 0);
}

#[tokio::test]
async fn health_turns_503_when_the_broker_closes_the_connections_and_recovers_alone() {
    let env = TestEnv::new("reconnect");
    let smtp = SmtpServer::start(&env.dir.join("smtp"), &[]);
    env.smtp_tenant("t", "p", smtp.port, "");
    let svc = Service::start(&env);
    svc.wait_health(200, Duration::from_secs(30)).await;
    let (_, before) = svc.get_json("/health").await;
    assert_eq!(before["status"], "ok");
    assert_eq!(before["components"]["rabbitmq"]["status"], "ok");
    assert_eq!(before["components"]["database"]["status"], "ok");

    // The outage is made to last: without permissions on the vhost, every reconnect is
    // refused until they are given back.
    rabbitmqctl(&["clear_permissions", "-p", &env.vhost, "guest"]);
    rabbitmqctl(&[
        "close_all_connections",
        "--vhost",
        &env.vhost,
        "closed by the mailbridge test suite",
    ]);
    let took = svc.wait_health(503, Duration::from_secs(10)).await;
    println!("/health turned 503 {took:?} after the connections were closed");
    // It stays 503 while the broker refuses: several reconnect attempts (200 ms doubling
    // to 2 s) fail in these 3 s, and each answer shows the broker down with its error.
    let outage = std::time::Instant::now();
    let mut seen = 0;
    while outage.elapsed() < Duration::from_secs(3) {
        let (code, during) = svc.get_json("/health").await;
        assert_eq!(code, 503, "{during}");
        assert_eq!(during["status"], "degraded", "{during}");
        assert_eq!(
            during["components"]["rabbitmq"]["status"], "down",
            "{during}"
        );
        let err = during["components"]["rabbitmq"]["last_error"]
            .as_str()
            .unwrap_or_else(|| panic!("no last_error: {during}"));
        assert!(!err.is_empty() && !err.contains("guest:guest"), "{err}");
        assert_eq!(during["components"]["database"]["status"], "ok");
        let (code, status) = svc.get_json("/api/rabbitmq/status").await;
        assert_eq!(code, 503, "{status}");
        assert_eq!(status["success"], false, "{status}");
        assert_eq!(status["connection_status"], "disconnected", "{status}");
        assert!(status["error"].is_string(), "{status}");
        seen += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(seen >= 5, "{seen} answers seen during the outage");
    let (_, during) = svc.get_json("/health").await;
    println!(
        "during the outage: {}",
        during["components"]["rabbitmq"]["last_error"]
    );

    rabbitmqctl(&[
        "set_permissions",
        "-p",
        &env.vhost,
        "guest",
        ".*",
        ".*",
        ".*",
    ]);
    let took = svc.wait_health(200, Duration::from_secs(15)).await;
    println!("health back to 200 {took:?} after the permissions were restored");
    let (code, status) = svc.get_json("/api/rabbitmq/status").await;
    assert_eq!(code, 200, "{status}");
    assert_eq!(status["connection_status"], "connected");
    assert_eq!(
        status["queues"]["email.send"]["status"], "running",
        "{status}"
    );

    // Mail flows again on the new connection: sent, recorded and announced.
    let req = common::guide_request("t", "p", "after-reconnect", None);
    env.publish("email.send", &serde_json::to_vec(&req).unwrap())
        .await;
    let mails = smtp.wait_for(1, Duration::from_secs(15)).await;
    assert_eq!(mails.len(), 1, "{}", svc.log_text());
    assert!(mails[0]
        .parsed()
        .message_id()
        .unwrap()
        .starts_with("after-reconnect."));
    let results = env
        .take("email.send.result", 1, Duration::from_secs(10))
        .await;
    assert_eq!(results.len(), 1, "{}", svc.log_text());
    assert_eq!(results[0]["status"], "sent", "{}", results[0]);
    assert_eq!(results[0]["message_id"], "after-reconnect");

    let (_, metrics) = svc.get("/metrics").await.unwrap();
    assert!(
        metrics.contains("mailbridge_amqp_connection_losses_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("mailbridge_amqp_connections_total 2"),
        "{metrics}"
    );
}

#[tokio::test]
async fn health_is_503_while_postgresql_is_unreachable() {
    let env = TestEnv::new("nodb");
    let dead_port = common::free_port();
    let svc = Service::start_with(
        &env,
        &[(
            "DATABASE_URL",
            &format!("postgres://root@127.0.0.1:{dead_port}/nothing"),
        )],
    );
    // RabbitMQ comes up, PostgreSQL never does: not ready.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (code, body) = svc.get_json("/health").await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["components"]["rabbitmq"]["status"], "ok", "{body}");
    assert_eq!(body["components"]["database"]["status"], "down", "{body}");
    let err = body["components"]["database"]["last_error"]
        .as_str()
        .unwrap();
    assert!(err.contains("cannot reach PostgreSQL"), "{err}");
    assert!(!err.contains("password"), "{err}");
}

#[tokio::test]
async fn migrations_run_twice_and_concurrently() {
    let env = TestEnv::new("migrate");
    // Four instances at once on a database that does not exist yet.
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let config = env.config_path();
            std::thread::spawn(move || {
                std::process::Command::new(common::BIN)
                    .arg("--config")
                    .arg(config)
                    .arg("migrate")
                    .env_remove("DATABASE_URL")
                    .output()
                    .unwrap()
            })
        })
        .collect();
    for h in handles {
        let out = h.join().unwrap();
        assert!(
            out.status.success(),
            "concurrent migrate failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // And again, one after the other.
    for _ in 0..2 {
        let out = env.command(&["migrate"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "migrations applied: 0"
        );
    }
    let db = env.db().await;
    let rows = db
        .query(
            "SELECT version, count(*) FROM schema_migrations GROUP BY version",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), mailbridge::storage::MIGRATIONS.len());
    for r in rows {
        assert_eq!(r.get::<_, i64>(1), 1);
    }
    // The outbox of contract §5 is there with its columns.
    let cols = common::texts(
        &db,
        "SELECT column_name::text FROM information_schema.columns WHERE table_name = 'outbox'",
    )
    .await;
    for c in [
        "tenant_id",
        "message_id",
        "status",
        "attempts",
        "last_error",
        "provider_message_id",
        "created_at",
        "updated_at",
        "sent_at",
    ] {
        assert!(cols.iter().any(|x| x == c), "outbox.{c} missing: {cols:?}");
    }
}

#[test]
fn check_config_names_file_and_key_of_every_problem() {
    let env = TestEnv::new("checkcfg");
    let ok = env.command(&["check-config"]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    env.write_tenant(
        "broken.toml",
        r#"
id = "t-broken"
[[providers]]
id = "p1"
kind = "smtp"
host = "127.0.0.1"
port = 99999
"#,
    );
    env.write_tenant(
        "orphan.toml",
        r#"
id = "t-orphan"
[[mailboxes]]
id = "m1"
user_id = "u1"
provider_id = "nope"
protocol = "imap"
host = "127.0.0.1"
username = "u"
"#,
    );
    let out = env.command(&["check-config"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.lines()
            .any(|l| l.contains("tenants.d/broken.toml") && l.contains("providers[0].port")),
        "{err}"
    );
    assert!(
        err.lines()
            .any(|l| l.contains("tenants.d/orphan.toml") && l.contains("mailboxes[0].provider_id")),
        "{err}"
    );

    // The main file too.
    std::fs::remove_file(env.dir.join("tenants.d/broken.toml")).unwrap();
    std::fs::remove_file(env.dir.join("tenants.d/orphan.toml")).unwrap();
    env.write_config("[retry]\ndelays = [\"1s\", \"later\"]\n");
    let out = env.command(&["check-config"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("mailbridge.toml") && err.contains("retry.delays[1]"),
        "{err}"
    );
}

#[test]
fn the_shipped_config_is_valid() {
    let out = std::process::Command::new(common::BIN)
        .args([
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/mailbridge.toml"),
            "check-config",
        ])
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn sigterm_stops_cleanly_and_closes_the_amqp_connection() {
    let env = TestEnv::new("shutdown");
    let mut svc = Service::start(&env);
    svc.wait_health(200, Duration::from_secs(30)).await;
    let listed = rabbitmqctl(&["list_connections", "-p", &env.vhost, "--silent", "name"]);
    assert!(!String::from_utf8_lossy(&listed.stdout).trim().is_empty());

    let status = svc.terminate(Duration::from_secs(10));
    assert!(
        status.success(),
        "exit status {status:?}\n{}",
        svc.log_text()
    );
    let log = svc.log_text();
    assert!(log.contains("stopped"), "{log}");
    // The connection was closed by the service (close handshake confirmed), not dropped.
    assert!(log.contains("closed the AMQP connection"), "{log}");
    let mut listed = String::from("?");
    for _ in 0..30 {
        let out = rabbitmqctl(&["list_connections", "-p", &env.vhost, "--silent", "name"]);
        listed = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if listed.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(listed, "", "the broker still lists the connection");
}

/// `text` padded with a trailing comment to exactly `len` bytes.
fn padded(text: &str, len: usize) -> String {
    let pad = len
        .checked_sub(text.len() + 3)
        .unwrap_or_else(|| panic!("{} bytes do not fit in {len}", text.len()));
    format!("{text}#{}\n\n", "-".repeat(pad))
}

#[tokio::test]
async fn sighup_applies_a_tenant_file_change_and_a_refused_one_changes_nothing() {
    let env = TestEnv::new("sighup");
    let smtp = SmtpServer::start(&env.dir.join("smtp"), &[]);
    let provider = |id: &str| {
        format!(
            "[[providers]]\nid = \"{id}\"\nkind = \"smtp\"\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\n",
            smtp.port
        )
    };
    let v1 = format!("id = \"t\"\n{}", provider("old"));
    let v2 = format!("id = \"t\"\n{}{}", provider("old"), provider("new"));
    // Refused: a port that is not a number.
    let v3 = format!(
        "id = \"t\"\n{}{}",
        provider("old"),
        provider("new").replace(&format!("port = {}", smtp.port), "port = \"x\"")
    );
    let len = v2.len() + 40;
    let file = env.dir.join("tenants.d/t.toml");
    std::fs::write(&file, padded(&v1, len)).unwrap();
    let svc = Service::start(&env);
    svc.wait_health(200, Duration::from_secs(30)).await;
    let has_sender = |h: &serde_json::Value, id: &str| {
        h["components"]["actors"][format!("sender:{id}")]["status"] == "ok"
    };
    let (_, h) = svc.get_json("/health").await;
    assert!(has_sender(&h, "old") && !has_sender(&h, "new"), "{h}");

    // The file changes behind the watcher's back: nothing happens by itself (the watcher
    // polls every second and applies a change once the files are still for a second).
    check::replace_unnoticed(&file, &padded(&v2, len));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (_, h) = svc.get_json("/health").await;
    assert!(!has_sender(&h, "new"), "applied without SIGHUP: {h}");
    assert!(!svc.log_text().contains("configuration reloaded"));

    // SIGHUP applies it: the new provider runs and sends.
    common::signal(svc.pid(), "HUP");
    check::wait_health_json(&svc, Duration::from_secs(10), "sender:new", |h| {
        has_sender(h, "new")
    })
    .await;
    let log = svc.log_text();
    let reload = log
        .lines()
        .find(|l| l.contains("configuration reloaded"))
        .unwrap();
    assert!(
        reload.contains("source=SIGHUP")
            && reload.contains("providers_added")
            && reload.contains("new"),
        "{reload}"
    );
    for (p, id) in [("new", "via-new"), ("old", "via-old")] {
        let req = common::guide_request("t", p, id, None);
        env.publish("email.send", &serde_json::to_vec(&req).unwrap())
            .await;
    }
    let results = env
        .take("email.send.result", 2, Duration::from_secs(15))
        .await;
    assert_eq!(results.len(), 2, "{}", svc.log_text());
    assert!(results.iter().all(|r| r["status"] == "sent"), "{results:?}");
    assert_eq!(smtp.wait_for(2, Duration::from_secs(5)).await.len(), 2);

    // A refused file: SIGHUP logs the problem, /health shows it, and the configuration in
    // force (both providers) keeps working.
    check::replace_unnoticed(&file, &padded(&v3, len));
    common::signal(svc.pid(), "HUP");
    let h = check::wait_health_json(&svc, Duration::from_secs(10), "config down", |h| {
        h["components"]["config"]["status"] == "down"
    })
    .await;
    assert!(
        h["components"]["config"]["last_error"]
            .as_str()
            .unwrap()
            .contains("providers[1].port"),
        "{h}"
    );
    assert!(
        svc.log_text()
            .lines()
            .any(|l| l.contains("configuration refused") && l.contains("source=SIGHUP")),
        "{}",
        svc.log_text()
    );
    assert!(has_sender(&h, "old") && has_sender(&h, "new"), "{h}");
    for (p, id) in [("new", "new-after-refusal"), ("old", "old-after-refusal")] {
        let req = common::guide_request("t", p, id, None);
        env.publish("email.send", &serde_json::to_vec(&req).unwrap())
            .await;
    }
    let results = env
        .take("email.send.result", 2, Duration::from_secs(15))
        .await;
    assert_eq!(results.len(), 2, "{}", svc.log_text());
    assert!(results.iter().all(|r| r["status"] == "sent"), "{results:?}");
    let ids = check::message_ids(&smtp);
    assert_eq!(ids.len(), 4, "{ids:?}");
    let (code, _) = svc.get("/health").await.unwrap();
    assert_eq!(code, 200, "a refused reload leaves the service ready");
}
