//! Inbound against a real Dovecot (IMAP and POP3), RabbitMQ and PostgreSQL: IDLE latency,
//! replies and threads matched to the outbox, attachments behind signed links, POP3, restarts
//! and UIDVALIDITY changes without duplicates, email.sync.user, and a 10,000-message mailbox.

mod common;

use std::time::{Duration, Instant};

use common::{Dovecot, Service, TestEnv};

const PW: &str = "secret-imap-pw";

fn message(id: &str, subject: &str, extra_headers: &str, body: &str) -> Vec<u8> {
    format!(
        "From: John Doe <john@example.com>\r\nTo: crm@acme.example\r\nSubject: {subject}\r\nMessage-ID: <{id}>\r\nDate: Fri, 19 Sep 2025 11:00:00 +0000\r\n{extra_headers}Content-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n"
    )
    .into_bytes()
}

/// Waits for `n` messages on email.inbound, then a moment more to catch extras.
async fn inbound(env: &TestEnv, n: usize, timeout: Duration) -> Vec<serde_json::Value> {
    let mut got = env.take("email.inbound", n, timeout).await;
    got.extend(
        env.take("email.inbound", 1, Duration::from_millis(700))
            .await,
    );
    got
}

#[tokio::test]
async fn idle_publishes_within_two_seconds_and_restarts_publish_nothing_twice() {
    let env = TestEnv::new("idle");
    let dovecot = Dovecot::start(&env.dir.join("dovecot"), &[("alice", PW)]);
    dovecot.append(
        "alice",
        PW,
        "INBOX",
        &message("old@example.com", "before", "", "old"),
    );
    env.mailbox_tenant(
        "acme",
        "imap",
        dovecot.imap_port,
        "alice",
        PW,
        "idle = true\ninitial_sync = \"new\"",
    );
    let mut svc = Service::start(&env);
    svc.wait_health(200, Duration::from_secs(30)).await;
    wait_idling(&svc, "mb-alice").await;

    let started = Instant::now();
    dovecot.append(
        "alice",
        PW,
        "INBOX",
        &message("new-1@example.com", "hello", "", "first"),
    );
    let got = env.take("email.inbound", 1, Duration::from_secs(5)).await;
    let took = started.elapsed();
    println!("published {took:?} after APPEND");
    assert_eq!(got.len(), 1, "{}", svc.log_text());
    assert!(took < Duration::from_secs(2), "took {took:?}");
    let m = &got[0];
    assert_eq!(m["message_id"], "new-1@example.com");
    assert_eq!(m["tenant_id"], "acme");
    assert_eq!(m["provider_id"], "acme-provider");
    assert_eq!(m["source"], "imap");
    assert_eq!(m["from_email"], "john@example.com");
    assert_eq!(m["from_name"], "John Doe");
    assert_eq!(m["to_emails"], serde_json::json!(["crm@acme.example"]));
    assert_eq!(m["body_format"], "TEXT");
    assert_eq!(m["body_content"].as_str().unwrap().trim(), "first");
    assert_eq!(m["is_reply"], false);
    assert_eq!(m["priority"], "normal");
    assert_eq!(m["thread_id"], "new-1@example.com");
    // "new": the message that was there before the mailbox was added is not published.
    assert!(env
        .take("email.inbound", 1, Duration::from_millis(500))
        .await
        .is_empty());

    // A restart publishes nothing again, and then only what is new.
    assert!(svc.terminate(Duration::from_secs(10)).success());
    let svc = Service::start(&env);
    svc.wait_health(200, Duration::from_secs(30)).await;
    wait_idling(&svc, "mb-alice").await;
    assert!(env
        .take("email.inbound", 1, Duration::from_secs(2))
        .await
        .is_empty());
    dovecot.append(
        "alice",
        PW,
        "INBOX",
        &message("new-2@example.com", "again", "", "second"),
    );
    let got = inbound(&env, 1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["message_id"], "new-2@example.com");

    let (_, health) = svc.get_json("/health").await;
    let mb = &health["components"]["mailboxes"]["mb-alice"];
    assert_eq!(mb["status"], "ok", "{health}");
    assert_eq!(mb["connected"], true);
    assert!(mb["last_sync"].is_string());
    let (_, metrics) = svc.get("/metrics").await.unwrap();
    assert!(
        metrics
            .contains("mailbridge_inbound_published_total{mailbox=\"mb-alice\",tenant=\"acme\"} 1"),
        "{metrics}"
    );
    assert!(!svc.log_text().contains(PW));
}

async fn wait_idling(svc: &Service, mailbox: &str) {
    let start = Instant::now();
    loop {
        let (_, h) = svc.get_json("/health").await;
        if h["components"]["mailboxes"][mailbox]["idling"] == true {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "never idling: {h}\n{}",
            svc.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn replies_threads_flags_and_attachment_links() {
    let env = TestEnv::new("threads");
    let dovecot = Dovecot::start(&env.dir.join("dovecot"), &[("bob", PW)]);
    env.mailbox_tenant("acme", "imap", dovecot.imap_port, "bob", PW, "idle = true");
    let svc = Service::start(&env);
    svc.wait_health(200, Duration::from_secs(30)).await;
    wait_idling(&svc, "mb-bob").await;

    // An email the service sends (through the tenant's file provider).
    let mut req = common::guide_request("acme", "acme-provider", "crm-msg-42", None);
    req["to"] = serde_json::json!(["john@example.com"]);
    env.publish("email.send", &serde_json::to_vec(&req).unwrap())
        .await;
    let sent = env
        .take("email.send.result", 1, Duration::from_secs(10))
        .await;
    assert_eq!(sent[0]["status"], "sent", "{}", svc.log_text());
    let db = env.db().await;
    let rfc_id: String = db
        .query_one(
            "SELECT rfc_message_id FROM outbox WHERE message_id = 'crm-msg-42'",
            &[],
        )
        .await
        .unwrap()
        .get(0);

    // The customer replies, the CRM user answers, the customer replies again.
    let reply = message(
        "reply-1@example.com",
        "Re: Test Email",
        &format!("In-Reply-To: <{rfc_id}>\r\nReferences: <{rfc_id}>\r\n"),
        "thanks",
    );
    dovecot.append("bob", PW, "INBOX", &reply);
    let reply2 = message(
        "reply-2@example.com",
        "Re: Re: Test Email",
        &format!("In-Reply-To: <answer@company.com>\r\nReferences: <{rfc_id}> <reply-1@example.com> <answer@company.com>\r\n"),
        "more",
    );
    dovecot.append("bob", PW, "INBOX", &reply2);
    let auto = message(
        "auto-1@example.com",
        "Automatic reply: Test Email",
        &format!("Auto-Submitted: auto-replied\r\nIn-Reply-To: <{rfc_id}>\r\n"),
        "I am away",
    );
    dovecot.append("bob", PW, "INBOX", &auto);
    dovecot.append(
        "bob",
        PW,
        "INBOX",
        &message("fwd-1@example.com", "Fwd: price list", "", "see below"),
    );
    let pdf: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    let b64 = {
        let mut s = String::new();
        for chunk in pdf.chunks(57) {
            s.push_str(&base64_encode(chunk));
            s.push_str("\r\n");
        }
        s
    };
    let with_file = format!(
        "From: john@example.com\r\nTo: crm@acme.example\r\nSubject: the file\r\nMessage-ID: <file-1@example.com>\r\nX-Priority: 1\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>attached</p>\r\n--B\r\nContent-Type: application/pdf; name=\"quote.pdf\"\r\nContent-Disposition: attachment; filename=\"quote.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\n{b64}--B--\r\n"
    );
    dovecot.append("bob", PW, "INBOX", with_file.as_bytes());
    // Not an email: dead-lettered with the mailbox and UID; the mailbox moves on.
    dovecot.append("bob", PW, "INBOX", b"this is not an email at all\r\n");
    dovecot.append(
        "bob",
        PW,
        "INBOX",
        &message("after-junk@example.com", "still here", "", "x"),
    );

    let got = inbound(&env, 6, Duration::from_secs(15)).await;
    assert!(
        got.iter()
            .any(|m| m["message_id"] == "after-junk@example.com"),
        "{got:?}"
    );
    let dead = env
        .take("email.inbound.dlq", 1, Duration::from_secs(5))
        .await;
    assert_eq!(dead.len(), 1, "{}", svc.log_text());
    assert_eq!(dead[0]["mailbox_id"], "mb-bob");
    assert_eq!(dead[0]["uid"], "6", "{}", dead[0]);
    assert_eq!(dead[0]["tenant_id"], "acme");
    assert!(
        dead[0]["error"]
            .as_str()
            .unwrap()
            .contains("cannot be parsed as an email"),
        "{}",
        dead[0]
    );
    assert_eq!(got.len(), 6, "{got:?}\n{}", svc.log_text());
    let by = |id: &str| got.iter().find(|m| m["message_id"] == id).unwrap().clone();
    let r1 = by("reply-1@example.com");
    assert_eq!(r1["is_reply"], true);
    assert_eq!(r1["in_reply_to"], rfc_id);
    assert_eq!(r1["reply_to_message_id"], "crm-msg-42");
    assert_eq!(r1["thread_id"], rfc_id);
    let r2 = by("reply-2@example.com");
    assert_eq!(
        r2["thread_id"], rfc_id,
        "the reply to the reply is in the same thread"
    );
    assert_eq!(r2["reply_to_message_id"], "crm-msg-42");
    assert_eq!(
        r2["references"],
        format!("{rfc_id},reply-1@example.com,answer@company.com")
    );
    let a = by("auto-1@example.com");
    assert_eq!(a["is_auto_reply"], true);
    let f = by("fwd-1@example.com");
    assert_eq!(f["is_forward"], true);
    assert_eq!(f["is_reply"], false);
    assert!(f.get("reply_to_message_id").is_none());
    let file = by("file-1@example.com");
    assert_eq!(file["body_format"], "HTML");
    assert_eq!(file["priority"], "high");
    let att = &file["attachments"][0];
    assert_eq!(att["filename"], "quote.pdf");
    assert_eq!(att["mime_type"], "application/pdf");
    assert_eq!(att["size"], 3000);
    let url = att["url"].as_str().unwrap();
    let r = reqwest::get(url).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &pdf[..]);

    // Tampered links are refused; so is an expired one.
    let tampered = url.replace("expires=", "expires=9");
    assert_eq!(
        reqwest::get(&tampered).await.unwrap().status().as_u16(),
        403
    );
    let other_type = url.replace("type=application%2Fpdf", "type=text%2Fhtml");
    assert_eq!(
        reqwest::get(&other_type).await.unwrap().status().as_u16(),
        403
    );
    let id = url
        .split("/api/attachments/")
        .nth(1)
        .unwrap()
        .split('?')
        .next()
        .unwrap();
    let store = mailbridge::attachments::AttachmentStore::open(
        &env.dir.join("attachments"),
        &svc.base_url,
        Duration::from_secs(3600),
    )
    .unwrap();
    let old = time::OffsetDateTime::now_utc().unix_timestamp() - 7200;
    let expired = store.link(id, "quote.pdf", "application/pdf", old);
    assert_eq!(reqwest::get(&expired).await.unwrap().status().as_u16(), 410);
    let fresh = store.link(id, "quote.pdf", "application/pdf", old + 7200);
    assert_eq!(reqwest::get(&fresh).await.unwrap().status().as_u16(), 200);
}

fn base64_encode(data: &[u8]) -> String {
    const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[tokio::test]
async fn pop3_messages_are_published_once() {
    let env = TestEnv::new("pop3");
    let dovecot = Dovecot::start(&env.dir.join("dovecot"), &[("carol", PW)]);
    for i in 0..3 {
        dovecot.append(
            "carol",
            PW,
            "INBOX",
            &message(&format!("pop-{i}@example.com"), "pop", "", "x"),
        );
    }
    env.mailbox_tenant(
        "acme",
        "pop3",
        dovecot.pop3_port,
        "carol",
        PW,
        "initial_sync = \"all\"\npoll_interval = \"1s\"",
    );
    let mut svc = Service::start(&env);
    svc.wait_health(200, Duration::from_secs(30)).await;
    let got = env.take("email.inbound", 3, Duration::from_secs(15)).await;
    assert_eq!(got.len(), 3, "{}", svc.log_text());
    assert!(got.iter().all(|m| m["source"] == "pop3"));
    // Polled every second for a while: nothing again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(env
        .take("email.inbound", 1, Duration::from_millis(300))
        .await
        .is_empty());
    assert!(svc.terminate(Duration::from_secs(10)).success());
    let svc = Service::start(&env);
    svc.wait_health(200, Duration::from_secs(30)).await;
    dovecot.append(
        "carol",
        PW,
        "INBOX",
        &message("pop-new@example.com", "pop", "", "x"),
    );
    let got = inbound(&env, 1, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["message_id"], "pop-new@example.com");
    // The messages are still on the server (delete_after_fetch defaults to false).
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(format!(
            "import poplib\np = poplib.POP3('127.0.0.1', {})\np.user('carol'); p.pass_({PW:?})\nprint(len(p.uidl()[1]))\np.quit()",
            dovecot.pop3_port
        ))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "4");
}

#[tokio::test]
async fn a_uidvalidity_change_republishes_nothing() {
    let env = TestEnv::new("uidvalidity");
    let dovecot = Dovecot::start(&env.dir.join("dovecot"), &[("dave", PW)]);
    dovecot.imap("dave", PW, "m.create('Work')");
    let msgs: Vec<Vec<u8>> = (0..3)
        .map(|i| message(&format!("work-{i}@example.com"), "work", "", "x"))
        .collect();
    for m in &msgs {
        dovecot.append("dave", PW, "Work", m);
    }
    env.mailbox_tenant(
        "acme",
        "imap",
        dovecot.imap_port,
        "dave",
        PW,
        "folder = \"Work\"\ninitial_sync = \"all\"\nidle = false\npoll_interval = \"1h\"",
    );
    let svc = Service::start(&env);
    svc.wait_health(200, Duration::from_secs(30)).await;
    assert_eq!(
        env.take("email.inbound", 3, Duration::from_secs(15))
            .await
            .len(),
        3
    );

    // Recreate the folder: a new UIDVALIDITY, the same three messages, and one more.
    dovecot.imap("dave", PW, "m.delete('Work')\nm.create('Work')");
    for m in &msgs {
        dovecot.append("dave", PW, "Work", m);
    }
    dovecot.append(
        "dave",
        PW,
        "Work",
        &message("work-new@example.com", "work", "", "x"),
    );
    let sync = serde_json::json!({
        "tenant_id": "acme", "provider_id": "acme-provider", "user_id": "user-dave",
        "sync_type": "inbound", "timestamp": "2025-09-19T10:30:00Z"
    });
    env.publish("email.sync.user", &serde_json::to_vec(&sync).unwrap())
        .await;
    let got = inbound(&env, 1, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1, "{got:?}\n{}", svc.log_text());
    assert_eq!(got[0]["message_id"], "work-new@example.com");
    assert!(svc.log_text().contains("UIDVALIDITY changed"));
}

#[tokio::test]
async fn a_sync_request_brings_mail_of_an_hourly_polled_mailbox_at_once() {
    let env = TestEnv::new("syncuser");
    let dovecot = Dovecot::start(&env.dir.join("dovecot"), &[("erin", PW)]);
    env.mailbox_tenant(
        "acme",
        "imap",
        dovecot.imap_port,
        "erin",
        PW,
        "idle = false\npoll_interval = \"1h\"",
    );
    let svc = Service::start(&env);
    svc.wait_health(200, Duration::from_secs(30)).await;
    // Let the first sync happen (it sets the "new" starting point).
    let start = Instant::now();
    loop {
        let (_, h) = svc.get_json("/health").await;
        if h["components"]["mailboxes"]["mb-erin"]["last_sync"].is_string() {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "{h}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    dovecot.append(
        "erin",
        PW,
        "INBOX",
        &message("late@example.com", "late", "", "x"),
    );
    assert!(
        env.take("email.inbound", 1, Duration::from_secs(2))
            .await
            .is_empty(),
        "not before the request"
    );

    let sync = serde_json::json!({
        "tenant_id": "acme", "provider_id": "acme-provider", "user_id": "user-erin",
        "sync_type": "inbound", "timestamp": "2025-09-19T10:30:00Z"
    });
    let started = Instant::now();
    env.publish("email.sync.user", &serde_json::to_vec(&sync).unwrap())
        .await;
    let got = env.take("email.inbound", 1, Duration::from_secs(10)).await;
    println!("published {:?} after the sync request", started.elapsed());
    assert_eq!(got.len(), 1, "{}", svc.log_text());
    assert!(started.elapsed() < Duration::from_secs(5));

    // A request for nobody known is counted with its reason, and the service goes on.
    let unknown = serde_json::json!({"tenant_id": "acme", "provider_id": "acme-provider", "user_id": "nobody"});
    env.publish("email.sync.user", &serde_json::to_vec(&unknown).unwrap())
        .await;
    env.publish("email.sync.user", b"not json").await;
    let start = Instant::now();
    loop {
        let (_, metrics) = svc.get("/metrics").await.unwrap();
        if metrics
            .contains("mailbridge_sync_requests_total{outcome=\"unmatched\",tenant=\"acme\"} 1")
            && metrics.contains(
                "mailbridge_sync_requests_total{outcome=\"invalid\",tenant=\"unknown\"} 1",
            )
        {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{metrics}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(svc.log_text().contains("matches no configured mailbox"));
    assert_eq!(env.depth("email.sync.user").await, 0);
}

#[tokio::test]
async fn ten_thousand_messages_with_bounded_memory() {
    const N: usize = 10_000;
    let env = TestEnv::new("bulk");
    let dovecot = Dovecot::start(&env.dir.join("dovecot"), &[("frank", PW)]);
    dovecot.deliver_files(
        "frank",
        (0..N).map(|i| {
            message(
                &format!("bulk-{i}@example.com"),
                &format!("Re: order {i}"),
                &format!("In-Reply-To: <order-{i}@company.com>\r\n"),
                &"Lorem ipsum dolor sit amet, consectetur adipiscing elit. ".repeat(40),
            )
        }),
    );
    env.mailbox_tenant(
        "acme",
        "imap",
        dovecot.imap_port,
        "frank",
        PW,
        "initial_sync = \"all\"",
    );
    let started = Instant::now();
    let svc = Service::start(&env);
    svc.wait_health(200, Duration::from_secs(30)).await;
    let mut depth = 0;
    while started.elapsed() < Duration::from_secs(240) {
        depth = env.depth("email.inbound").await;
        if depth as usize >= N {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let took = started.elapsed();
    let status = std::fs::read_to_string(format!("/proc/{}/status", svc.pid())).unwrap();
    let peak_kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    println!(
        "{N} messages published in {took:?} ({:.0}/s), peak RSS {} MB",
        N as f64 / took.as_secs_f64(),
        peak_kb / 1024
    );
    assert_eq!(
        depth as usize,
        N,
        "{}",
        svc.log_text()
            .lines()
            .rev()
            .take(20)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(peak_kb < 150 * 1024, "peak RSS {peak_kb} kB");
    // Nothing twice: one published key per message.
    let db = env.db().await;
    let n: i64 = db
        .query_one(
            "SELECT count(*) FROM inbound_published WHERE mailbox_id = 'mb-frank'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n as usize, N);
}

#[tokio::test]
async fn imap_starttls_and_pop3_tls_with_a_configured_ca() {
    let env = TestEnv::new("mailtls");
    let (ca, cert, key) = common::make_certs(&env.dir.join("certs"));
    // Dovecot's unprivileged processes read the key as root at start; that is enough.
    let dovecot = Dovecot::start_tls(
        &env.dir.join("dovecot"),
        &[("gina", PW), ("hank", PW)],
        Some((&cert, &key)),
    );
    dovecot.append(
        "gina",
        PW,
        "INBOX",
        &message("tls-imap@example.com", "imap", "", "x"),
    );
    dovecot.append(
        "hank",
        PW,
        "INBOX",
        &message("tls-pop@example.com", "pop", "", "x"),
    );
    env.write_tenant(
        "acme.toml",
        &format!(
            r#"
id = "acme"
[[providers]]
id = "acme-provider"
kind = "file"
dir = "sent"

[[mailboxes]]
id = "mb-gina"
user_id = "user-gina"
provider_id = "acme-provider"
protocol = "imap"
host = "localhost"
port = {imap}
tls = "starttls"
ca_file = "{ca}"
username = "gina"
password = "{PW}"
initial_sync = "all"

[[mailboxes]]
id = "mb-hank"
user_id = "user-hank"
provider_id = "acme-provider"
protocol = "pop3"
host = "localhost"
port = {pop3s}
tls = "tls"
ca_file = "{ca}"
username = "hank"
password = "{PW}"
initial_sync = "all"

[[mailboxes]]
id = "mb-untrusted"
user_id = "user-gina"
provider_id = "acme-provider"
protocol = "imap"
host = "localhost"
port = {imaps}
tls = "tls"
username = "gina"
password = "{PW}"
initial_sync = "all"
"#,
            imap = dovecot.imap_port,
            pop3s = dovecot.pop3s_port,
            imaps = dovecot.imaps_port,
            ca = ca.display(),
        ),
    );
    let svc = Service::start(&env);
    svc.wait_health(200, Duration::from_secs(30)).await;
    let got = inbound(&env, 2, Duration::from_secs(15)).await;
    let mut ids: Vec<String> = got
        .iter()
        .map(|m| {
            format!(
                "{}:{}",
                m["mailbox_id"].as_str().unwrap(),
                m["message_id"].as_str().unwrap()
            )
        })
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        [
            "mb-gina:tls-imap@example.com",
            "mb-hank:tls-pop@example.com"
        ],
        "{}",
        svc.log_text()
    );
    // Without the CA the certificate is not trusted, and the mailbox says so.
    let start = Instant::now();
    loop {
        let (_, h) = svc.get_json("/health").await;
        let mb = &h["components"]["mailboxes"]["mb-untrusted"];
        if mb["status"] == "down" {
            assert!(mb["last_error"].as_str().unwrap().contains("TLS"), "{mb}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "{h}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
