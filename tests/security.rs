//! Security promises, each against the real thing: PostgreSQL over TLS (a private cluster
//! that refuses plain connections) and `amqps` (a private RabbitMQ node with a TLS
//! listener), both with a test CA; no secret in any error text, log or `/health`; credentials
//! over `tls = "none"` warned about; a message a server cannot take without an extension it
//! lacks is refused once, not retried.

mod common;

use std::time::Duration;

use common::ledger::{publish_all, tracked_request};
use common::pg_cluster::PgCluster;
use common::rabbit_node::RabbitNode;
use common::{make_certs, Service, SmtpServer, TestEnv};

const TENANT: &str = "tenant-s";
const PROVIDER: &str = "provider-s";

#[tokio::test]
async fn postgresql_over_tls_is_verified_and_plain_connections_are_not_used() {
    let env = TestEnv::new("pgtls");
    let (ca, cert, key) = make_certs(&env.dir.join("certs"));
    let pg = PgCluster::start_tls_only(&env.dir.join("pg"), &cert, &key);
    let rabbitmq = format!(
        "host = \"127.0.0.1\"\nvhost = \"{}\"\nreconnect_max_delay = \"1s\"\n",
        env.vhost
    );
    let smtp = SmtpServer::start(&env.dir.join("smtp"), &[]);
    env.smtp_tenant(TENANT, PROVIDER, smtp.port, "");

    // verify-full with the test CA: connects, migrates, sends.
    let url = format!(
        "{}/{}?sslmode=verify-full&sslrootcert={}",
        pg.server_url(),
        env.db_name,
        ca.display()
    );
    env.write_config_with(&rabbitmq, &url, "");
    let check = env.command(&["check-config"]);
    assert!(check.status.success(), "{check:?}");
    let svc = Service::start(&env);
    svc.wait_health(200, Duration::from_secs(30)).await;
    publish_all(
        &env,
        &[serde_json::to_vec(&tracked_request(TENANT, PROVIDER, "over-tls")).unwrap()],
    )
    .await;
    assert_eq!(
        smtp.wait_for(1, Duration::from_secs(15)).await.len(),
        1,
        "{}",
        svc.log_text()
    );
    let ssl = PgCluster::psql(
        &format!(
            "{}/postgres?sslmode=require",
            pg.server_url()
        ),
        &format!(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE s.ssl AND a.datname = '{}'",
            env.db_name
        ),
    )
    .expect("psql");
    assert!(
        ssl.trim().parse::<i64>().unwrap_or(0) >= 1,
        "the service's connections use TLS: {ssl}"
    );
    drop(svc);

    // Without the CA the server's certificate is not trusted: never connected, and said so.
    let url = format!("{}/{}?sslmode=verify-full", pg.server_url(), env.db_name);
    env.write_config_with(&rabbitmq, &url, "");
    let svc = Service::start(&env);
    svc.wait_health(503, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (code, health) = svc.get_json("/health").await;
    assert_eq!(code, 503);
    let error = health["components"]["database"]["last_error"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(
        error.contains("certificate") || error.contains("UnknownIssuer"),
        "{health}"
    );
    drop(svc);

    // Plain TCP (no sslmode): refused by the server, which only takes TLS.
    let url = format!("{}/{}", pg.server_url(), env.db_name);
    env.write_config_with(&rabbitmq, &url, "");
    let svc = Service::start(&env);
    svc.wait_health(503, Duration::from_secs(20)).await;
}

#[tokio::test]
async fn amqps_with_a_configured_ca_connects_and_without_it_is_refused() {
    let env = TestEnv::new("amqps");
    let node = RabbitNode::start(&env.dir.join("rabbit"));
    let smtp = SmtpServer::start(&env.dir.join("smtp"), &[]);
    env.smtp_tenant(TENANT, PROVIDER, smtp.port, "");
    let url = node.amqps_url("/").replace("127.0.0.1", "localhost");
    let rabbitmq = format!(
        "url = \"{url}\"\nca_file = \"{}\"\nreconnect_max_delay = \"1s\"\n",
        node.ca.display()
    );
    env.write_config_with(&rabbitmq, &env.db_url(), "");
    let svc = Service::start(&env);
    svc.wait_health(200, Duration::from_secs(40)).await;
    let (_, health) = svc.get_json("/health").await;
    let endpoint = health["components"]["rabbitmq"]["endpoint"]
        .as_str()
        .unwrap_or("");
    assert!(endpoint.starts_with("amqps://"), "{health}");
    assert!(!health.to_string().contains("guest:guest"), "{health}");

    // A request through the TLS connection is sent and its result published.
    let conn = lapin::Connection::connect(&node.amqp_url("/"), Default::default())
        .await
        .expect("plain listener for the test client");
    let ch = conn.create_channel().await.unwrap();
    ch.basic_publish(
        "".into(),
        "email.send".into(),
        Default::default(),
        &serde_json::to_vec(&tracked_request(TENANT, PROVIDER, "via-amqps")).unwrap(),
        lapin::BasicProperties::default().with_delivery_mode(2),
    )
    .await
    .unwrap();
    assert_eq!(
        smtp.wait_for(1, Duration::from_secs(20)).await.len(),
        1,
        "{}",
        svc.log_text()
    );
    let _ = conn.close(200, "OK".into()).await;
    drop(svc);

    // Without the CA: the certificate is refused, /health says why.
    let rabbitmq = format!("url = \"{url}\"\nreconnect_max_delay = \"1s\"\n");
    env.write_config_with(&rabbitmq, &env.db_url(), "");
    let svc = Service::start(&env);
    svc.wait_health(503, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, health) = svc.get_json("/health").await;
    let error = health["components"]["rabbitmq"]["last_error"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(
        error.contains("certificate") || error.contains("UnknownIssuer"),
        "{health}"
    );
}

#[tokio::test]
async fn secrets_in_malformed_urls_reach_no_output_log_or_health() {
    let env = TestEnv::new("secrets");
    let svc = Service::start_with(&env, &[("MAILBRIDGE_ADMIN_TOKEN", "tok")]);
    svc.wait_health(200, Duration::from_secs(30)).await;
    const PW: &str = "s3cret-pass-in-url";
    // A broken broker URL and a broken database URL, both with a password.
    for (section, body) in [
        (
            "rabbitmq",
            format!("url = \"amqp://guest:{PW}@127.0.0.1:notaport/vh\""),
        ),
        (
            "database",
            format!("url = \"postgres://root:{PW}@127.0.0.1:5432/db?sslmode=sometimes\""),
        ),
    ] {
        let text = std::fs::read_to_string(env.config_path()).unwrap();
        let broken = text.replacen(
            &format!("[{section}]\n"),
            &format!("[{section}]\n{body}\n"),
            1,
        );
        let broken = if section == "database" {
            // One url per table.
            broken.replacen(&format!("url = \"{}\"\n", env.db_url()), "", 1)
        } else {
            broken
        };
        std::fs::write(env.config_path(), &broken).unwrap();

        let check = env.command(&["check-config"]);
        assert!(!check.status.success());
        let out = format!(
            "{}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        assert!(out.contains(&format!("{section}.url")), "{out}");
        assert!(
            !out.contains(PW),
            "check-config printed the password: {out}"
        );

        let reload = reqwest::Client::new()
            .post(format!("{}/api/config/reload", svc.base_url))
            .bearer_auth("tok")
            .send()
            .await
            .unwrap();
        assert_eq!(reload.status(), 422);
        let answer = reload.text().await.unwrap();
        assert!(answer.contains(&format!("{section}.url")), "{answer}");
        assert!(!answer.contains(PW), "{answer}");
        let (_, health) = svc.get_json("/health").await;
        assert_eq!(health["components"]["config"]["status"], "down");
        assert!(!health.to_string().contains(PW), "{health}");
        std::fs::write(env.config_path(), &text).unwrap();
    }
    assert!(!svc.log_text().contains(PW), "the log has the password");
}

#[test]
fn credentials_over_plain_connections_are_warned_about() {
    let env = TestEnv::new("plainwarn");
    env.write_tenant(
        "t.toml",
        r#"
id = "t"
[[providers]]
id = "p"
kind = "smtp"
host = "relay.example"
tls = "none"
username = "u"
password = "smtp-pw"
[[mailboxes]]
id = "m"
user_id = "u1"
provider_id = "p"
protocol = "imap"
host = "imap.example"
tls = "none"
username = "u"
password = "imap-pw"
"#,
    );
    let out = env.command(&["check-config"]);
    assert!(out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    let warnings: Vec<&str> = err.lines().filter(|l| l.starts_with("warning:")).collect();
    assert_eq!(warnings.len(), 2, "{err}");
    assert!(
        warnings.iter().any(|w| w.contains("providers[0].tls")),
        "{err}"
    );
    assert!(
        warnings.iter().any(|w| w.contains("mailboxes[0].tls")),
        "{err}"
    );
    assert!(
        !err.contains("smtp-pw") && !err.contains("imap-pw"),
        "{err}"
    );
}

#[tokio::test]
async fn a_server_without_smtputf8_refuses_a_non_ascii_address_once_not_three_times() {
    let env = TestEnv::new("smtputf8");
    // An old server: HELO only, so no 8BITMIME or SMTPUTF8.
    let smtp = SmtpServer::start(&env.dir.join("smtp"), &["--no-ehlo"]);
    env.smtp_tenant(TENANT, PROVIDER, smtp.port, "");
    let svc = Service::start(&env);
    svc.wait_health(200, Duration::from_secs(30)).await;
    let mut r = tracked_request(TENANT, PROVIDER, "utf8-address");
    r["to"] = serde_json::json!(["jürgen@example.com"]);
    r["cc"] = serde_json::json!([]);
    r["bcc"] = serde_json::json!([]);
    let started = std::time::Instant::now();
    publish_all(&env, &[serde_json::to_vec(&r).unwrap()]).await;
    let dead = env.take("email.send.dlq", 1, Duration::from_secs(10)).await;
    assert_eq!(dead.len(), 1, "{}", svc.log_text());
    assert!(started.elapsed() < Duration::from_secs(5), "it was retried");
    assert_eq!(dead[0]["error_class"], "permanent");
    // The address needs SMTPUTF8 and the message (its To header) 8BITMIME: either is named.
    let error = dead[0]["error"].as_str().unwrap();
    assert!(
        error.contains("SMTPUTF8") || error.contains("8BITMIME"),
        "{error}"
    );
    let results = env
        .take("email.send.result", 5, Duration::from_secs(2))
        .await;
    assert_eq!(results.len(), 1, "{results:?}");
    assert_eq!(results[0]["status"], "failed");
    assert!(smtp.messages().is_empty());
}
