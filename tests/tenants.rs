//! Tenants: reload without downtime (file change, SIGHUP, HTTP), draining removed providers,
//! restarting only changed mailboxes, refusing broken files, and the PostgreSQL mirror.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{guide_request, wait_count, Dovecot, Service, SmtpServer, TestEnv};

const TOKEN: &str = "reload-admin-token";

async fn start(env: &TestEnv) -> Service {
    let svc = Service::start_with(env, &[("MAILBRIDGE_ADMIN_TOKEN", TOKEN)]);
    svc.wait_health(200, Duration::from_secs(30)).await;
    svc
}

async fn reload(svc: &Service) -> (u16, serde_json::Value) {
    let r = reqwest::Client::new()
        .post(format!("{}/api/config/reload", svc.base_url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    let code = r.status().as_u16();
    (code, r.json().await.unwrap())
}

/// Publishes a request and returns its (pending) confirm, to keep many in flight.
async fn publish(ch: &lapin::Channel, t: &str, p: &str, id: &str) -> lapin::PublisherConfirm {
    ch.basic_publish(
        "".into(),
        "email.send".into(),
        Default::default(),
        &serde_json::to_vec(&guide_request(t, p, id, None)).unwrap(),
        lapin::BasicProperties::default().with_delivery_mode(2),
    )
    .await
    .unwrap()
}

async fn wait_provider(svc: &Service, id: &str, present: bool) {
    let start = Instant::now();
    loop {
        let (_, h) = svc.get_json("/health").await;
        let there = h["components"]["actors"][format!("sender:{id}")].is_object();
        if there == present {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "{h}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_tenant_file_added_while_a_thousand_messages_flow() {
    let env = TestEnv::new("addtenant");
    let smtp_a = SmtpServer::start(&env.dir.join("smtp-a"), &[]);
    let smtp_b = SmtpServer::start(&env.dir.join("smtp-b"), &[]);
    env.smtp_tenant("tenant-a", "provider-a", smtp_a.port, "");
    let svc = start(&env).await;

    let conn = env.amqp().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let mut confirms = Vec::new();
    for i in 0..1000 {
        confirms.push(publish(&ch, "tenant-a", "provider-a", &format!("a-{i}")).await);
        if i == 200 {
            // The new tenant arrives mid-flow; the watcher picks the file up by itself.
            env.smtp_tenant("tenant-b", "provider-b", smtp_b.port, "");
        }
    }
    wait_provider(&svc, "provider-b", true).await;
    for i in 0..50 {
        confirms.push(publish(&ch, "tenant-b", "provider-b", &format!("b-{i}")).await);
    }
    for c in confirms {
        c.await.unwrap();
    }
    let db = env.db().await;
    let sent = wait_count(
        &db,
        "SELECT count(*) FROM outbox WHERE status = 'sent'",
        1050,
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(sent, 1050, "{}", svc.log_text());
    let ids = |m: &SmtpServer| -> Vec<String> {
        m.messages()
            .iter()
            .map(|x| x.parsed().message_id().unwrap().to_string())
            .collect()
    };
    let a = ids(&smtp_a);
    let b = ids(&smtp_b);
    assert_eq!(a.len(), 1000, "no loss, no duplicate");
    assert_eq!(a.iter().collect::<HashSet<_>>().len(), 1000);
    assert!(a.iter().all(|id| id.starts_with("a-")));
    assert_eq!(b.len(), 50);
    assert!(b.iter().all(|id| id.starts_with("b-")));
    assert!(svc.log_text().contains("configuration reloaded"));

    // The mirror follows the configuration, without secrets.
    let tenants = common::texts(&db, "SELECT id FROM tenants ORDER BY id").await;
    assert_eq!(tenants, ["tenant-a", "tenant-b"]);
    let p: (String, String) = db
        .query_one(
            "SELECT tenant_id, kind FROM providers WHERE id = 'provider-b'",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(p, ("tenant-b".to_string(), "smtp".to_string()));
}

#[tokio::test]
async fn a_removed_provider_finishes_its_in_flight_mail_before_stopping() {
    let env = TestEnv::new("rmprovider");
    let slow = SmtpServer::start(&env.dir.join("slow"), &[]);
    std::fs::write(slow.dir.join("delay"), "2").unwrap();
    let tenant = |with_slow: bool| {
        let slow_provider = format!(
            "[[providers]]\nid = \"slow\"\nkind = \"smtp\"\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\nmax_connections = 4\n",
            slow.port
        );
        format!(
            "id = \"t\"\n[[providers]]\nid = \"files\"\nkind = \"file\"\ndir = \"out\"\n{}",
            if with_slow {
                slow_provider.as_str()
            } else {
                ""
            }
        )
    };
    env.write_tenant("t.toml", &tenant(true));
    let svc = start(&env).await;
    for i in 0..4 {
        let req = guide_request("t", "slow", &format!("slow-{i}"), None);
        env.publish("email.send", &serde_json::to_vec(&req).unwrap())
            .await;
    }
    let db = env.db().await;
    let sending = wait_count(
        &db,
        "SELECT count(*) FROM outbox WHERE status = 'sending'",
        4,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(sending, 4, "{}", svc.log_text());
    env.write_tenant("t.toml", &tenant(false));
    common::signal(svc.pid(), "HUP");

    let sent = wait_count(
        &db,
        "SELECT count(*) FROM outbox WHERE status = 'sent'",
        4,
        Duration::from_secs(15),
    )
    .await;
    assert_eq!(sent, 4, "in-flight mail finished:\n{}", svc.log_text());
    assert_eq!(slow.messages().len(), 4);
    wait_provider(&svc, "slow", false).await;
    let (_, h) = svc.get_json("/health").await;
    assert!(h["components"]["providers"]["slow"].is_null(), "{h}");

    // The provider is gone for new requests.
    let req = guide_request("t", "slow", "after-removal", None);
    env.publish("email.send", &serde_json::to_vec(&req).unwrap())
        .await;
    let results = env
        .take("email.send.result", 5, Duration::from_secs(10))
        .await;
    let last = results
        .iter()
        .find(|r| r["message_id"] == "after-removal")
        .unwrap();
    assert_eq!(last["status"], "failed");
    assert!(
        last["error"].as_str().unwrap().contains("unknown provider"),
        "{last}"
    );
    assert_eq!(slow.messages().len(), 4);
}

fn logins(dovecot: &Dovecot, user: &str) -> usize {
    std::fs::read_to_string(dovecot.dir.join("dovecot.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("imap-login: Info: Login:") && l.contains(&format!("user=<{user}>")))
        .count()
}

#[tokio::test]
async fn a_changed_mailbox_reconnects_while_the_others_keep_their_connections() {
    let env = TestEnv::new("chmailbox");
    let pw = "mailbox-pw-123";
    let dovecot = Dovecot::start(&env.dir.join("dovecot"), &[("u1", pw), ("u2", pw)]);
    let tenant = |poll: &str| {
        let mb = |user: &str, poll: &str| {
            format!(
                "[[mailboxes]]\nid = \"mb-{user}\"\nuser_id = \"{user}\"\nprovider_id = \"files\"\nprotocol = \"imap\"\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\nusername = \"{user}\"\npassword = \"{pw}\"\npoll_interval = \"{poll}\"\n",
                dovecot.imap_port
            )
        };
        format!(
            "id = \"t\"\n[[providers]]\nid = \"files\"\nkind = \"file\"\ndir = \"out\"\n{}{}",
            mb("u1", poll),
            mb("u2", "60s")
        )
    };
    env.write_tenant("t.toml", &tenant("60s"));
    let svc = start(&env).await;
    let start_wait = Instant::now();
    while logins(&dovecot, "u1") < 1 || logins(&dovecot, "u2") < 1 {
        assert!(
            start_wait.elapsed() < Duration::from_secs(15),
            "{}",
            svc.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!((logins(&dovecot, "u1"), logins(&dovecot, "u2")), (1, 1));

    env.write_tenant("t.toml", &tenant("45s"));
    let (code, body) = reload(&svc).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        body["outcome"]["diff"]["mailboxes_changed"],
        serde_json::json!(["mb-u1"]),
        "{body}"
    );
    let start_wait = Instant::now();
    while logins(&dovecot, "u1") < 2 {
        assert!(
            start_wait.elapsed() < Duration::from_secs(15),
            "{}",
            svc.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(logins(&dovecot, "u1"), 2, "u1 reconnected once");
    assert_eq!(logins(&dovecot, "u2"), 1, "u2 kept its connection");

    // The reconnected mailbox works.
    dovecot.append(
        "u1",
        pw,
        "INBOX",
        b"From: a@example.com\r\nSubject: after\r\nMessage-ID: <after@x>\r\n\r\nx\r\n",
    );
    let got = env.take("email.inbound", 1, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1, "{}", svc.log_text());
    assert_eq!(got[0]["mailbox_id"], "mb-u1");
    assert!(!svc.log_text().contains(pw));
}

#[tokio::test]
async fn a_broken_tenant_file_is_refused_and_the_service_goes_on_unchanged() {
    let env = TestEnv::new("broken");
    let smtp = SmtpServer::start(&env.dir.join("smtp"), &[]);
    env.smtp_tenant("tenant-a", "provider-a", smtp.port, "");
    let svc = start(&env).await;

    env.write_tenant(
        "zz-broken.toml",
        "id = \"tenant-z\"\n[[providers]]\nid = \"pz\"\nkind = \"smtp\"\nhost = \"h\"\nport = \"twenty-five\"\n",
    );
    let (code, body) = reload(&svc).await;
    assert_eq!(code, 422, "{body}");
    let problems = body["outcome"]["problems"].as_array().unwrap();
    assert!(
        problems.iter().any(|p| {
            let p = p.as_str().unwrap();
            p.contains("zz-broken.toml") && p.contains("providers[0].port")
        }),
        "{body}"
    );
    let (code, h) = svc.get_json("/health").await;
    assert_eq!(code, 200, "still serving: {h}");
    assert_eq!(h["status"], "degraded");
    assert_eq!(h["components"]["config"]["status"], "down");
    assert!(h["components"]["config"]["last_error"]
        .as_str()
        .unwrap()
        .contains("zz-broken.toml"));
    assert!(svc.log_text().contains("configuration refused"));

    // The running configuration is unchanged: tenant-a sends, tenant-z does not exist.
    for (t, p, id) in [
        ("tenant-a", "provider-a", "still-works"),
        ("tenant-z", "pz", "not-loaded"),
    ] {
        env.publish(
            "email.send",
            &serde_json::to_vec(&guide_request(t, p, id, None)).unwrap(),
        )
        .await;
    }
    let results = env
        .take("email.send.result", 2, Duration::from_secs(10))
        .await;
    let by = |id: &str| {
        results
            .iter()
            .find(|r| r["message_id"] == id)
            .unwrap()
            .clone()
    };
    assert_eq!(by("still-works")["status"], "sent");
    assert!(by("not-loaded")["error"]
        .as_str()
        .unwrap()
        .contains("unknown tenant"));

    // Fixed, it is taken.
    std::fs::remove_file(env.dir.join("tenants.d/zz-broken.toml")).unwrap();
    let (code, body) = reload(&svc).await;
    assert_eq!(code, 200, "{body}");
    let (_, h) = svc.get_json("/health").await;
    assert_eq!(h["components"]["config"]["status"], "ok");

    // The reload endpoint wants the token.
    let r = reqwest::Client::new()
        .post(format!("{}/api/config/reload", svc.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
}
