//! Outbound against the real RabbitMQ, PostgreSQL and a real SMTP server (aiosmtpd):
//! the guide's request end to end, redelivery, two tenants at volume, refusals, TLS and AUTH,
//! and the guide's own Python client.

mod common;

use std::time::Duration;

use common::checks::{self, wait_queue_settled};
use common::{guide_request, wait_count, FileServer, Service, SmtpServer, TestEnv};
use mail_parser::MimeHeaders;

const TENANT: &str = "01996243-2d8c-726d-a5c2-81b7005ce9a2";
const PROVIDER: &str = "0198a819-e5d3-703a-a39a-1b77e3ece687";

fn allow_private(env: &TestEnv) {
    env.write_config("[outbound]\nattachment_allow_private = true\nattachment_timeout = \"3s\"\n");
}

#[tokio::test]
async fn the_guide_example_arrives_complete_and_is_recorded() {
    let env = TestEnv::new("guide");
    allow_private(&env);
    let smtp = SmtpServer::start(&env.dir.join("smtp"), &[]);
    env.smtp_tenant(TENANT, PROVIDER, smtp.port, "");
    let files = env.dir.join("files");
    std::fs::create_dir_all(&files).unwrap();
    let pdf: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(files.join("document.pdf"), &pdf).unwrap();
    let http = FileServer::start(&files);

    let svc = Service::start(&env);
    svc.wait_health(200, Duration::from_secs(30)).await;
    let req = guide_request(
        TENANT,
        PROVIDER,
        "unique-message-id",
        Some(&http.url("document.pdf")),
    );
    env.publish("email.send", &serde_json::to_vec(&req).unwrap())
        .await;

    let mails = smtp.wait_for(1, Duration::from_secs(15)).await;
    assert_eq!(mails.len(), 1, "{}", svc.log_text());
    let mail = &mails[0];
    assert_eq!(mail.mail_from, "noreply@company.com");
    let mut rcpts = mail.rcpt_tos.clone();
    rcpts.sort();
    assert_eq!(
        rcpts,
        ["bcc@example.com", "cc@example.com", "user@example.com"]
    );
    let text = mail.text();
    assert!(
        !text.to_ascii_lowercase().contains("\nbcc:"),
        "Bcc header leaked:\n{text}"
    );
    assert!(
        !text.contains("bcc@example.com"),
        "Bcc address leaked:\n{text}"
    );

    let parsed = mail.parsed();
    assert_eq!(parsed.subject(), Some("Test Email"));
    assert_eq!(
        parsed.from().unwrap().first().unwrap().address(),
        Some("noreply@company.com")
    );
    assert_eq!(
        parsed.to().unwrap().first().unwrap().address(),
        Some("user@example.com")
    );
    assert_eq!(
        parsed.cc().unwrap().first().unwrap().address(),
        Some("cc@example.com")
    );
    assert_eq!(
        parsed.header_raw("X-Custom-Header").map(str::trim),
        Some("Custom Value")
    );
    assert_eq!(parsed.header_raw("X-Priority").map(str::trim), Some("1"));
    let message_id = parsed.message_id().unwrap().to_string();
    assert!(message_id.starts_with("unique-message-id."), "{message_id}");
    assert_eq!(parsed.body_html(0).unwrap().trim(), "<p>Hello World</p>");
    assert_eq!(parsed.body_text(0).unwrap().trim(), "Hello World");
    let att = parsed.attachment(0).expect("an attachment");
    assert_eq!(att.attachment_name(), Some("document.pdf"));
    assert_eq!(att.content_type().unwrap().ctype(), "application");
    assert_eq!(att.content_type().unwrap().subtype(), Some("pdf"));
    assert_eq!(att.contents(), &pdf[..]);

    let results = env
        .take("email.send.result", 1, Duration::from_secs(10))
        .await;
    assert_eq!(results.len(), 1);
    let r = &results[0];
    assert_eq!(r["success"], true, "{r}");
    assert_eq!(r["status"], "sent");
    assert_eq!(r["message_id"], "unique-message-id");
    assert_eq!(r["tenant_id"], TENANT);
    assert_eq!(
        r["provider_response"]["provider_name"],
        format!("SMTP of {TENANT}")
    );
    assert_eq!(r["provider_response"]["provider_message_id"], "TEST000001");
    assert!(r["provider_response"]["sent_at"]
        .as_str()
        .unwrap()
        .ends_with('Z'));

    let db = env.db().await;
    let row = db
        .query_one(
            "SELECT status, attempts, provider_message_id, rfc_message_id, user_id, template_id,
                    campaign_id, sent_at IS NOT NULL, last_error
             FROM outbox WHERE tenant_id = $1 AND message_id = $2",
            &[&TENANT, &"unique-message-id"],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "sent");
    assert_eq!(row.get::<_, i32>(1), 1);
    assert_eq!(row.get::<_, String>(2), "TEST000001");
    assert_eq!(row.get::<_, String>(3), message_id);
    assert_eq!(row.get::<_, Option<String>>(4).as_deref(), Some("user-123"));
    assert_eq!(
        row.get::<_, Option<String>>(5).as_deref(),
        Some("template-123")
    );
    assert_eq!(
        row.get::<_, Option<String>>(6).as_deref(),
        Some("campaign-456")
    );
    assert!(row.get::<_, bool>(7));
    assert_eq!(row.get::<_, Option<String>>(8), None);
    assert_eq!(env.depth("email.send").await, 0);

    let (_, metrics) = svc.get("/metrics").await.unwrap();
    assert!(
        metrics.contains(&format!(
            "mailbridge_emails_sent_total{{provider=\"{PROVIDER}\",tenant=\"{TENANT}\"}} 1"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("mailbridge_send_duration_seconds_count{"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_request_whose_row_is_sent_is_not_sent_again() {
    let env = TestEnv::new("redeliver");
    let smtp = SmtpServer::start(&env.dir.join("smtp"), &[]);
    env.smtp_tenant(TENANT, PROVIDER, smtp.port, "");
    let svc = Service::start(&env);
    svc.wait_health(200, Duration::from_secs(30)).await;

    let body = serde_json::to_vec(&guide_request(TENANT, PROVIDER, "once-only", None)).unwrap();
    env.publish("email.send", &body).await;
    // The first copy is finished once the broker has nothing of it left, ready or unacked.
    wait_queue_settled(&env.vhost, "email.send", Duration::from_secs(15)).await;
    let ids = checks::message_ids(&smtp);
    assert_eq!(ids.len(), 1, "{}", svc.log_text());
    assert!(ids[0].starts_with("once-only."), "{ids:?}");

    // The same request again (a redelivery after a crash looks exactly like this). Its
    // publish is confirmed, so it is on the queue (ready or delivered) until the service
    // acks it: once the queue has neither, the service has finished with the copy.
    env.publish("email.send", &body).await;
    let took = wait_queue_settled(&env.vhost, "email.send", Duration::from_secs(15)).await;
    println!("the redelivered copy was acked {took:?} after its publish was confirmed");
    assert!(svc.log_text().contains("already sent; not sending again"));
    assert_eq!(
        checks::message_ids(&smtp),
        ids,
        "sent twice:\n{}",
        svc.log_text()
    );
    assert_eq!(smtp.attempts().len(), 1, "{:?}", smtp.attempts());
    let db = env.db().await;
    let row = db
        .query_one(
            "SELECT status, attempts, rfc_message_id FROM outbox WHERE message_id = 'once-only'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "sent");
    assert_eq!(row.get::<_, i32>(1), 1);
    assert_eq!(row.get::<_, String>(2), ids[0]);
    // Exactly one result for both copies: results are published before the ack, so
    // everything either copy published is on the result queue by now.
    let results = checks::take_all(&env, "email.send.result").await;
    assert_eq!(results.len(), 1, "{results:?}");
    assert_eq!(results[0]["status"], "sent");
    assert_eq!(results[0]["message_id"], "once-only");
}

#[tokio::test]
async fn a_thousand_requests_over_two_tenants_each_through_its_own_server() {
    let env = TestEnv::new("volume");
    let smtp_a = SmtpServer::start(&env.dir.join("smtp-a"), &[]);
    let smtp_b = SmtpServer::start(&env.dir.join("smtp-b"), &[]);
    env.smtp_tenant("tenant-a", "provider-a", smtp_a.port, "");
    env.smtp_tenant("tenant-b", "provider-b", smtp_b.port, "");
    let svc = Service::start(&env);
    svc.wait_health(200, Duration::from_secs(30)).await;

    let conn = env.amqp().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let mut confirms = Vec::new();
    for i in 0..1000 {
        let (t, p) = if i % 2 == 0 {
            ("tenant-a", "provider-a")
        } else {
            ("tenant-b", "provider-b")
        };
        let mut req = guide_request(t, p, &format!("bulk-{i}"), None);
        req["subject"] = serde_json::json!(format!("bulk {i} for {t}"));
        let exchange = if i % 3 == 0 { "email.exchange" } else { "" };
        confirms.push(
            ch.basic_publish(
                exchange.into(),
                "email.send".into(),
                Default::default(),
                &serde_json::to_vec(&req).unwrap(),
                lapin::BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap(),
        );
    }
    for c in confirms {
        c.await.unwrap();
    }

    let db = env.db().await;
    let sent = wait_count(
        &db,
        "SELECT count(*) FROM outbox WHERE status = 'sent'",
        1000,
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(sent, 1000, "{}", svc.log_text());
    let a = smtp_a.messages();
    let b = smtp_b.messages();
    assert_eq!(a.len(), 500);
    assert_eq!(b.len(), 500);
    assert!(a.iter().all(|m| m.text().contains("for tenant-a")));
    assert!(b.iter().all(|m| m.text().contains("for tenant-b")));
    let results = env
        .take("email.send.result", 1000, Duration::from_secs(30))
        .await;
    assert_eq!(results.len(), 1000);
    assert!(results.iter().all(|r| r["status"] == "sent"));
}

#[tokio::test]
async fn refusals_end_in_failed_results_and_inject_nothing() {
    let env = TestEnv::new("refuse");
    // No retries here: the unreachable attachment (transient) must end at once.
    env.write_config(
        "[outbound]\nattachment_allow_private = true\nattachment_timeout = \"3s\"\n[retry]\nmax_retries = 0\n",
    );
    let smtp = SmtpServer::start(&env.dir.join("smtp"), &[]);
    env.smtp_tenant("tenant-a", "provider-a", smtp.port, "");
    env.smtp_tenant("tenant-b", "provider-b", smtp.port, "");
    let svc = Service::start(&env);
    svc.wait_health(200, Duration::from_secs(30)).await;

    let mut cross = guide_request("tenant-a", "provider-b", "cross-tenant", None);
    cross["subject"] = serde_json::json!("cross");
    let mut header = guide_request("tenant-a", "provider-a", "crlf-header", None);
    header["headers"] = serde_json::json!({"X-Note": "hi\r\nBcc: victim@example.com"});
    let mut subject = guide_request("tenant-a", "provider-a", "crlf-subject", None);
    subject["subject"] = serde_json::json!("Hello\nBcc: victim@example.com");
    let dead_port = common::free_port();
    let unreachable = guide_request(
        "tenant-a",
        "provider-a",
        "bad-attachment",
        Some(&format!("http://127.0.0.1:{dead_port}/missing.pdf")),
    );
    for req in [&cross, &header, &subject, &unreachable] {
        env.publish("email.send", &serde_json::to_vec(req).unwrap())
            .await;
    }

    let results = env
        .take("email.send.result", 4, Duration::from_secs(20))
        .await;
    assert_eq!(results.len(), 4, "{}", svc.log_text());
    let by_id = |id: &str| {
        results
            .iter()
            .find(|r| r["message_id"] == id)
            .unwrap_or_else(|| panic!("no result for {id}: {results:?}"))
            .clone()
    };
    let r = by_id("cross-tenant");
    assert_eq!(r["status"], "failed");
    assert_eq!(r["success"], false);
    assert_eq!(r["error_class"], "permanent");
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("does not belong to tenant `tenant-a`"),
        "{r}"
    );
    let r = by_id("crlf-header");
    assert_eq!(r["status"], "failed");
    assert!(
        r["error"].as_str().unwrap().contains("headers.X-Note"),
        "{r}"
    );
    assert!(r["error"].as_str().unwrap().contains("line break"), "{r}");
    let r = by_id("crlf-subject");
    assert!(r["error"].as_str().unwrap().contains("`subject`"), "{r}");
    let r = by_id("bad-attachment");
    assert_eq!(r["status"], "failed");
    assert!(r["error"].as_str().unwrap().contains("missing.pdf"), "{r}");
    assert_eq!(r["error_class"], "transient");
    for r in &results {
        assert_eq!(r["max_retries"], 0);
        assert!(r["tenant_id"].is_string());
    }
    // Each is dead-lettered too, with its reason.
    let dead = env.take("email.send.dlq", 4, Duration::from_secs(5)).await;
    assert_eq!(dead.len(), 4);
    assert!(dead
        .iter()
        .all(|d| d["error"].is_string() && d["request"].is_object()));

    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(smtp.messages().is_empty(), "something was sent");
    let db = env.db().await;
    let failed = wait_count(
        &db,
        "SELECT count(*) FROM outbox WHERE status = 'failed' AND last_error IS NOT NULL",
        4,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(failed, 4);

    // A refused attachment address when private addresses are not allowed.
    let env2 = TestEnv::new("private");
    env2.smtp_tenant("tenant-a", "provider-a", smtp.port, "");
    let svc2 = Service::start(&env2);
    svc2.wait_health(200, Duration::from_secs(30)).await;
    let req = guide_request(
        "tenant-a",
        "provider-a",
        "private-url",
        Some("http://127.0.0.1:1/x.pdf"),
    );
    env2.publish("email.send", &serde_json::to_vec(&req).unwrap())
        .await;
    let r = env2
        .take("email.send.result", 1, Duration::from_secs(10))
        .await;
    assert_eq!(r[0]["status"], "failed");
    assert_eq!(r[0]["error_class"], "permanent");
    assert!(
        r[0]["error"].as_str().unwrap().contains("internal address"),
        "{}",
        r[0]
    );
    assert!(smtp.messages().is_empty());
}

#[tokio::test]
async fn starttls_with_a_configured_ca_and_auth() {
    let env = TestEnv::new("tls");
    let (ca, cert, key) = common::make_certs(&env.dir.join("certs"));
    let smtp = SmtpServer::start(
        &env.dir.join("smtp"),
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--auth",
            "crm:s3cret-pass",
        ],
    );
    let implicit = SmtpServer::start(
        &env.dir.join("smtps"),
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--implicit-tls",
            "--auth",
            "crm:s3cret-pass",
            // One server without PIPELINING: the client's one-command-at-a-time path.
            "--no-pipelining",
        ],
    );
    env.write_tenant(
        "t.toml",
        &format!(
            r#"
id = "t"
[[providers]]
id = "starttls"
kind = "smtp"
host = "localhost"
port = {p1}
tls = "starttls"
username = "crm"
password_env = "MB_TEST_SMTP_PASSWORD"
ca_file = "{ca}"

[[providers]]
id = "implicit"
kind = "smtp"
host = "localhost"
port = {p2}
tls = "tls"
username = "crm"
password = "s3cret-pass"
ca_file = "{ca}"

[[providers]]
id = "untrusted"
kind = "smtp"
host = "localhost"
port = {p1}
tls = "starttls"
username = "crm"
password = "s3cret-pass"

[[providers]]
id = "wrong-password"
kind = "smtp"
host = "localhost"
port = {p1}
tls = "starttls"
username = "crm"
password = "not-it"
ca_file = "{ca}"

[[providers]]
id = "oauth"
kind = "smtp"
host = "localhost"
port = {p1}
tls = "starttls"
username = "crm"
oauth2_token_env = "MB_TEST_SMTP_PASSWORD"
ca_file = "{ca}"

[[providers]]
id = "oauth-expired"
kind = "smtp"
host = "localhost"
port = {p1}
tls = "starttls"
username = "crm"
oauth2_token_env = "MB_TEST_EXPIRED_TOKEN"
ca_file = "{ca}"
"#,
            p1 = smtp.port,
            p2 = implicit.port,
            ca = ca.display()
        ),
    );
    let svc = Service::start_with(
        &env,
        &[
            ("MB_TEST_SMTP_PASSWORD", "s3cret-pass"),
            ("MB_TEST_EXPIRED_TOKEN", "expired-token"),
        ],
    );
    svc.wait_health(200, Duration::from_secs(30)).await;
    for (id, provider) in [
        ("via-starttls", "starttls"),
        ("via-tls", "implicit"),
        ("via-untrusted", "untrusted"),
        ("via-wrong-password", "wrong-password"),
        ("via-oauth", "oauth"),
        ("via-oauth-expired", "oauth-expired"),
    ] {
        let req = guide_request("t", provider, id, None);
        env.publish("email.send", &serde_json::to_vec(&req).unwrap())
            .await;
    }
    let results = env
        .take("email.send.result", 6, Duration::from_secs(30))
        .await;
    assert_eq!(results.len(), 6, "{}", svc.log_text());
    let by_id = |id: &str| {
        results
            .iter()
            .find(|r| r["message_id"] == id)
            .unwrap()
            .clone()
    };
    assert_eq!(
        by_id("via-starttls")["status"],
        "sent",
        "{}",
        by_id("via-starttls")
    );
    assert_eq!(by_id("via-tls")["status"], "sent", "{}", by_id("via-tls"));
    let r = by_id("via-untrusted");
    assert_eq!(
        r["status"], "failed",
        "an untrusted certificate must be refused: {r}"
    );
    assert_eq!(r["error_class"], "permanent", "{r}");
    assert!(r["error"].as_str().unwrap().contains("not trusted"), "{r}");
    let r = by_id("via-wrong-password");
    assert_eq!(r["status"], "failed", "{r}");
    assert_eq!(r["error_class"], "permanent", "{r}");
    assert!(r["error"].as_str().unwrap().contains("535"), "{r}");

    // XOAUTH2: the token is accepted; an expired one gets the server's challenge, answered
    // with an empty line, and fails with the server's 535.
    assert_eq!(
        by_id("via-oauth")["status"],
        "sent",
        "{}",
        by_id("via-oauth")
    );
    let r = by_id("via-oauth-expired");
    assert_eq!(r["status"], "failed", "{r}");
    assert_eq!(r["error_class"], "permanent", "{r}");
    assert!(r["error"].as_str().unwrap().contains("535 to AUTH"), "{r}");

    let m = smtp.messages();
    assert_eq!(m.len(), 2, "via-starttls and via-oauth");
    assert!(m.iter().all(|m| m.authenticated));
    assert_eq!(implicit.messages().len(), 1);
    // The password never reaches the logs or results.
    assert!(!svc.log_text().contains("s3cret-pass"));
    assert!(!results
        .iter()
        .any(|r| r.to_string().contains("s3cret-pass")));
    let (_, health) = svc.get("/health").await.unwrap();
    assert!(!health.contains("s3cret-pass"));
}

#[tokio::test]
async fn a_refused_sender_or_recipient_fails_its_email_alone_on_a_pipelining_server() {
    // The server offers PIPELINING, so MAIL, RCPT and DATA go out together and their replies
    // are read in order; a refused sender or recipient must fail that email (nothing delivered,
    // not even to the recipients that were accepted) and leave the next emails unharmed.
    let env = TestEnv::new("pipelining");
    env.write_config("[retry]\nmax_retries = 0\n");
    let smtp = SmtpServer::start(&env.dir.join("smtp"), &[]);
    env.smtp_tenant("t", "p", smtp.port, "");
    let svc = Service::start(&env);
    svc.wait_health(200, Duration::from_secs(30)).await;
    let mut cases = Vec::new();
    for (id, from, to, cc) in [
        (
            "before",
            "noreply@company.com",
            "user@example.com",
            "cc@example.com",
        ),
        (
            "refused-to",
            "noreply@company.com",
            "refused@example.com",
            "cc@example.com",
        ),
        (
            "refused-cc",
            "noreply@company.com",
            "user@example.com",
            "refused-cc@example.com",
        ),
        (
            "refused-from",
            "refused@company.com",
            "user@example.com",
            "cc@example.com",
        ),
        (
            "after",
            "noreply@company.com",
            "user@example.com",
            "cc@example.com",
        ),
    ] {
        let mut req = guide_request("t", "p", id, None);
        req["from"] = serde_json::json!(from);
        req["to"] = serde_json::json!([to]);
        req["cc"] = serde_json::json!([cc]);
        req["bcc"] = serde_json::json!([]);
        cases.push(req);
    }
    // One at a time, so that the emails after a refusal reuse the provider's sessions.
    let mut results = Vec::new();
    for req in &cases {
        env.publish("email.send", &serde_json::to_vec(req).unwrap())
            .await;
        let r = env
            .take("email.send.result", 1, Duration::from_secs(15))
            .await;
        assert_eq!(
            r.len(),
            1,
            "no result for {}: {}",
            req["message_id"],
            svc.log_text()
        );
        results.push(r[0].clone());
    }
    let status: Vec<(&str, &str)> = results
        .iter()
        .map(|r| {
            (
                r["message_id"].as_str().unwrap(),
                r["status"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        status,
        [
            ("before", "sent"),
            ("refused-to", "failed"),
            ("refused-cc", "failed"),
            ("refused-from", "failed"),
            ("after", "sent")
        ]
    );
    // The sender refused: the replies to the RCPT and DATA that followed it in the same write
    // (503, bad sequence) are read and the first refusal is the one reported.
    let r = &results[3];
    assert_eq!(r["error_class"], "permanent", "{r}");
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("replied 550 to MAIL FROM: 5.7.1 Sender rejected"),
        "{r}"
    );
    for r in &results[1..3] {
        assert_eq!(r["error_class"], "permanent", "{r}");
        assert!(r["error"].as_str().unwrap().contains("550"), "{r}");
        // The error names the refused command and keeps the server's words.
        assert!(
            r["error"]
                .as_str()
                .unwrap()
                .contains("replied 550 to RCPT TO: 5.1.1 No such user"),
            "{r}"
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let delivered: Vec<Vec<String>> = smtp.messages().into_iter().map(|m| m.rcpt_tos).collect();
    assert_eq!(
        delivered,
        [
            vec!["user@example.com".to_string(), "cc@example.com".to_string()],
            vec!["user@example.com".to_string(), "cc@example.com".to_string()],
        ],
        "only `before` and `after` may arrive"
    );
}

/// Tenant `t` with provider `p`: one SMTP session at most, so that sends wait in line.
fn one_session_tenant(env: &TestEnv, port: u16) {
    env.write_tenant(
        "t.toml",
        &format!(
            "id = \"t\"\nname = \"t\"\n\n[[providers]]\nid = \"p\"\nname = \"one session\"\n\
             kind = \"smtp\"\nhost = \"127.0.0.1\"\nport = {port}\ntls = \"none\"\nmax_connections = 1\n"
        ),
    );
}

#[tokio::test]
async fn one_busy_session_joins_each_next_envelope_to_the_final_dot_and_every_email_ends_once() {
    // One connection and 40 emails at once: while others wait, each message's final dot goes
    // out in the same write as the next email's envelope (RFC 2920 §3.1). A refusal in a
    // joined envelope fails that email alone, and the next ones start on a fresh session.
    let env = TestEnv::new("joined");
    env.write_config("[retry]\nmax_retries = 0\n");
    let smtp = SmtpServer::start(&env.dir.join("smtp"), &[]);
    one_session_tenant(&env, smtp.port);
    let svc = Service::start(&env);
    svc.wait_health(200, Duration::from_secs(30)).await;
    let mut bodies = Vec::new();
    let mut expected = std::collections::BTreeMap::new();
    for i in 0..40 {
        let id = format!("joined-{i:02}");
        let mut req = common::ledger::tracked_request("t", "p", &id);
        req["cc"] = serde_json::json!([]);
        req["bcc"] = serde_json::json!([]);
        let status = match i % 8 {
            3 => {
                req["to"] = serde_json::json!(["refused@example.com"]);
                "failed"
            }
            6 => {
                req["from"] = serde_json::json!("refused@company.com");
                "failed"
            }
            _ => "sent",
        };
        expected.insert(id, status.to_string());
        bodies.push(serde_json::to_vec(&req).unwrap());
    }
    common::ledger::publish_all(&env, &bodies).await;
    let results = env
        .take("email.send.result", 40, Duration::from_secs(30))
        .await;
    let extra = env
        .take("email.send.result", 1, Duration::from_secs(2))
        .await;
    assert!(extra.is_empty(), "a second result: {extra:?}");
    let got: std::collections::BTreeMap<String, String> = results
        .iter()
        .map(|r| {
            (
                r["message_id"].as_str().unwrap().to_string(),
                r["status"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(results.len(), 40, "one result each: {}", svc.log_text());
    assert_eq!(got, expected);
    for r in &results {
        if r["status"] == "failed" {
            let error = r["error"].as_str().unwrap();
            assert!(
                error.contains("replied 550 to RCPT TO: 5.1.1 No such user")
                    || error.contains("replied 550 to MAIL FROM: 5.7.1 Sender rejected"),
                "{r}"
            );
        }
    }
    // Every accepted email arrived once, with its own envelope; no refused one arrived.
    let delivered = common::ledger::deliveries(&smtp);
    let sent: std::collections::BTreeMap<String, usize> = expected
        .iter()
        .filter(|(_, s)| *s == "sent")
        .map(|(id, _)| (id.clone(), 1))
        .collect();
    assert_eq!(delivered, sent);
    for m in smtp.messages() {
        assert_eq!(m.mail_from, "noreply@company.com");
        assert_eq!(m.rcpt_tos, ["user@example.com"]);
    }
    // The line was long enough for most envelopes to ride with the dot before them.
    let joined = smtp.joined();
    eprintln!("{joined} of 30 accepted messages ended in the same write as the next envelope");
    assert!(
        joined >= 10,
        "only {joined} envelopes were joined to a final dot"
    );
}

#[tokio::test]
async fn a_connection_dropped_after_a_dot_carrying_the_next_envelope_loses_and_repeats_nothing() {
    // One session and 20 emails waiting, and the server drops the connection right after the
    // final dot of its first two transactions (the message not stored), with the next email's
    // envelope in the same write. The dropped emails go through the retry schedule (the outcome
    // was unknown); the ones taken along start over on a fresh session. Each email arrives once
    // and has one result.
    let env = TestEnv::new("joined_drop");
    let smtp = SmtpServer::start(&env.dir.join("smtp"), &[]);
    smtp.set_fault(Some("drop-after-dot 2"));
    one_session_tenant(&env, smtp.port);
    let svc = Service::start(&env);
    svc.wait_health(200, Duration::from_secs(30)).await;
    let ids: Vec<String> = (0..20).map(|i| format!("drop-{i:02}")).collect();
    let bodies: Vec<Vec<u8>> = ids
        .iter()
        .map(|id| serde_json::to_vec(&common::ledger::tracked_request("t", "p", id)).unwrap())
        .collect();
    common::ledger::publish_all(&env, &bodies).await;
    // One `sent` each, and one `retrying` before it for each dropped email.
    let results = env
        .take("email.send.result", 22, Duration::from_secs(30))
        .await;
    let extra = env
        .take("email.send.result", 1, Duration::from_secs(2))
        .await;
    assert!(extra.is_empty(), "another result: {extra:?}");
    let by_id = common::ledger::results_by_id(&results);
    let retried: Vec<&String> = by_id
        .keys()
        .filter(|(_, status)| status == "retrying")
        .map(|(id, _)| id)
        .collect();
    let mut expected: std::collections::BTreeMap<(String, String), usize> = ids
        .iter()
        .map(|id| ((id.clone(), "sent".to_string()), 1))
        .collect();
    for id in &retried {
        expected.insert(((*id).clone(), "retrying".to_string()), 1);
    }
    assert_eq!(retried.len(), 2, "{by_id:?}\n{}", svc.log_text());
    assert_eq!(by_id, expected);
    let once: std::collections::BTreeMap<String, usize> =
        ids.iter().map(|id| (id.clone(), 1)).collect();
    assert_eq!(common::ledger::deliveries(&smtp), once);
    let drops = smtp
        .attempts()
        .iter()
        .filter(|(_, r)| r.starts_with("DROP"))
        .count();
    assert_eq!(drops, 2, "{:?}", smtp.attempts());
    assert!(smtp.joined() > 0, "no envelope was joined to a final dot");
    // The two dropped transactions are recorded as unknown outcomes, sent on a later attempt.
    let db = env.db().await;
    let uncertain = db
        .query_one(
            "SELECT count(*) FROM outbox WHERE uncertain AND status = 'sent' AND attempts = 2",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(uncertain.get::<_, i64>(0), 2);
}

#[tokio::test]
async fn a_server_that_refuses_ehlo_is_greeted_with_helo() {
    let env = TestEnv::new("helo");
    let smtp = SmtpServer::start(&env.dir.join("smtp"), &["--no-ehlo"]);
    env.smtp_tenant("t", "old", smtp.port, "");
    let svc = Service::start(&env);
    svc.wait_health(200, Duration::from_secs(30)).await;
    let req = guide_request("t", "old", "via-helo", None);
    env.publish("email.send", &serde_json::to_vec(&req).unwrap())
        .await;
    let r = env
        .take("email.send.result", 1, Duration::from_secs(15))
        .await;
    assert_eq!(r.len(), 1, "{}", svc.log_text());
    assert_eq!(r[0]["status"], "sent", "{}", r[0]);
    let m = smtp.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].mail_from, "noreply@company.com");
}

#[tokio::test]
async fn the_guide_python_client_gets_its_email_sent() {
    // The guide's Python example connects to localhost's default vhost, unchanged.
    let env = TestEnv::on_default_vhost("python");
    let smtp = SmtpServer::start(&env.dir.join("smtp"), &[]);
    let tenant = common::unique("py-tenant");
    env.smtp_tenant(&tenant, &format!("{tenant}-smtp"), smtp.port, "");
    let svc = Service::start(&env);
    svc.wait_health(200, Duration::from_secs(30)).await;

    let guide = include_str!("support/guide_python_client.py");
    let request = guide_request(&tenant, &format!("{tenant}-smtp"), "from-python", None);
    let script = format!(
        "{guide}\nimport json\nEmailQueueService().send_email(json.loads('''{}'''))\n",
        serde_json::to_string(&request).unwrap()
    );
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mails = smtp.wait_for(1, Duration::from_secs(15)).await;
    assert_eq!(mails.len(), 1, "{}", svc.log_text());
    assert!(mails[0].text().contains("Subject: Test Email"));
    let db = env.db().await;
    assert_eq!(
        wait_count(
            &db,
            "SELECT count(*) FROM outbox WHERE message_id = 'from-python' AND status = 'sent'",
            1,
            Duration::from_secs(10)
        )
        .await,
        1
    );
}
