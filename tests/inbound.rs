//! Inbound against a real Dovecot (IMAP and POP3), RabbitMQ and PostgreSQL: IDLE latency,
//! replies and threads matched to the outbox, attachments behind signed links, POP3, restarts
//! and UIDVALIDITY changes without duplicates, email.sync.user, a 10,000-message mailbox, and
//! the damage: hostile emails, a broker that refuses, `initial_sync` over polls and resyncs.
//!
//! "Nothing twice" is counted on the queue (message ids or subjects of what was published),
//! never by rows of `inbound_published`, whose primary key would hide a duplicate publish.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{Dovecot, Service, TestEnv};

const PW: &str = "secret-imap-pw";

fn message(id: &str, subject: &str, extra_headers: &str, body: &str) -> Vec<u8> {
    format!(
        "From: John Doe <john@example.com>\r\nTo: crm@acme.example\r\nSubject: {subject}\r\nMessage-ID: <{id}>\r\nDate: Fri, 19 Sep 2025 11:00:00 +0000\r\n{extra_headers}Content-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n"
    )
    .into_bytes()
}

/// Consumes `queue`: waits up to `timeout` for `n` messages, then takes whatever else arrives
/// until `settle` passes without a message (so an extra copy is caught, not left behind).
/// The AMQP `message_id` property is added to each as `_amqp_message_id`.
async fn consume(
    env: &TestEnv,
    queue: &str,
    n: usize,
    timeout: Duration,
    settle: Duration,
) -> Vec<serde_json::Value> {
    use futures_util::StreamExt;
    let conn = env.amqp().await;
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(1000, Default::default()).await.unwrap();
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "test-consumer".into(),
            lapin::options::BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    loop {
        let wait = if out.len() >= n {
            settle
        } else {
            deadline.saturating_duration_since(Instant::now())
        };
        match tokio::time::timeout(wait, consumer.next()).await {
            Ok(Some(Ok(d))) => {
                let mut v: serde_json::Value =
                    serde_json::from_slice(&d.data).unwrap_or_else(|_| {
                        serde_json::Value::String(String::from_utf8_lossy(&d.data).into())
                    });
                if let (Some(obj), Some(id)) = (v.as_object_mut(), d.properties.message_id()) {
                    obj.insert("_amqp_message_id".into(), id.to_string().into());
                }
                out.push(v);
            }
            _ => break,
        }
    }
    let _ = conn.close(200, "OK".into()).await;
    out
}

/// How many of `msgs` have each value of `field`.
fn counts(msgs: &[serde_json::Value], field: &str) -> BTreeMap<String, usize> {
    let mut c = BTreeMap::new();
    for m in msgs {
        let v = m[field].as_str().unwrap_or("(none)").to_string();
        *c.entry(v).or_insert(0) += 1;
    }
    c
}

/// The bytes the service stored under `id` (in PostgreSQL, the default store).
async fn stored(env: &TestEnv, id: &str) -> Vec<u8> {
    env.stored_blob(id)
        .await
        .unwrap_or_else(|| panic!("stored raw email {id}: not in attachment_blobs"))
}

/// Waits until `queue` holds `n` messages.
async fn wait_depth(env: &TestEnv, svc: &Service, queue: &str, n: u32, timeout: Duration) {
    let start = Instant::now();
    loop {
        let d = env.depth(queue).await;
        if d == n {
            return;
        }
        assert!(
            start.elapsed() < timeout,
            "{queue} holds {d}, not {n}\n{}",
            svc.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the mailbox has finished a sync.
async fn wait_synced(svc: &Service, mailbox: &str) {
    let start = Instant::now();
    loop {
        let (_, h) = svc.get_json("/health").await;
        if h["components"]["mailboxes"][mailbox]["last_sync"].is_string() {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{h}\n{}",
            svc.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn db_count(env: &TestEnv, sql: &str) -> i64 {
    env.db().await.query_one(sql, &[]).await.unwrap().get(0)
}

fn sync_request(tenant: &str, provider: &str, user: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "tenant_id": tenant, "provider_id": provider, "user_id": user,
        "sync_type": "inbound", "timestamp": "2025-09-19T10:30:00Z"
    }))
    .unwrap()
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
    assert_eq!(r.headers()["accept-ranges"], "bytes");
    let etag = r.headers()["etag"].to_str().unwrap().to_string();
    assert_eq!(
        r.headers()["content-disposition"],
        "attachment; filename=\"quote.pdf\""
    );
    assert_eq!(r.bytes().await.unwrap().as_ref(), &pdf[..]);

    // Downloads resume: one range, the last bytes, a range past the end; a cached copy is
    // revalidated by its ETag.
    let http = reqwest::Client::new();
    let get_with = |name: &'static str, value: String| {
        let http = http.clone();
        let url = url.to_string();
        async move { http.get(&url).header(name, value).send().await.unwrap() }
    };
    let r = get_with("range", "bytes=1000-1999".into()).await;
    assert_eq!(r.status().as_u16(), 206);
    assert_eq!(r.headers()["content-range"], "bytes 1000-1999/3000");
    assert_eq!(r.bytes().await.unwrap().as_ref(), &pdf[1000..2000]);
    let r = get_with("range", "bytes=-10".into()).await;
    assert_eq!(r.status().as_u16(), 206);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &pdf[2990..]);
    let r = get_with("range", "bytes=3000-".into()).await;
    assert_eq!(r.status().as_u16(), 416);
    assert_eq!(r.headers()["content-range"], "bytes */3000");
    let r = get_with("if-none-match", etag.clone()).await;
    assert_eq!(r.status().as_u16(), 304);
    assert_eq!(r.bytes().await.unwrap().len(), 0);
    let r = get_with("if-none-match", "\"another\"".into()).await;
    assert_eq!(r.status().as_u16(), 200);

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
    // A name that is not ASCII is given exactly as RFC 6266's filename* (and as an ASCII
    // stand-in for old clients).
    let named = store.link(id, "Angebot Größe.pdf", "application/pdf", old + 7200);
    let r = reqwest::get(&named).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        r.headers()["content-disposition"],
        "attachment; filename=\"Angebot Gr__e.pdf\"; filename*=UTF-8''Angebot%20Gr%C3%B6%C3%9Fe.pdf"
    );
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
    // Nothing twice, counted on the queue: N messages, N distinct ids, each bulk-i once.
    let got = consume(
        &env,
        "email.inbound",
        N,
        Duration::from_secs(60),
        Duration::from_secs(1),
    )
    .await;
    assert_eq!(got.len(), N);
    let ids = counts(&got, "message_id");
    assert_eq!(ids.len(), N);
    assert!((0..N).all(|i| ids.get(&format!("bulk-{i}@example.com")) == Some(&1)));
}

/// The pipeline prepares a batch while the one before it is published: a Message-ID that
/// comes again in the next batch (or in the same one) is still published once, the first
/// copy's, and the copies count as handled (the mailbox moves past them).
#[tokio::test]
async fn message_ids_repeated_across_pipelined_batches_are_published_once() {
    const N: usize = 1000;
    let env = TestEnv::new("repeats");
    let dovecot = Dovecot::start(&env.dir.join("dovecot"), &[("rita", PW)]);
    // Batches are 200 messages: i % 200 == 5 repeats the id of i - 100 (the batch before),
    // i % 200 == 7 the id of i - 1 (its own batch).
    let id_of = |i: usize| match i % 200 {
        5 if i >= 200 => i - 100,
        7 => i - 1,
        _ => i,
    };
    dovecot.deliver_files(
        "rita",
        (0..N).map(|i| {
            message(
                &format!("rep-{}@example.com", id_of(i)),
                &format!("copy {i}"),
                "",
                "body",
            )
        }),
    );
    let distinct: std::collections::BTreeSet<usize> = (0..N).map(id_of).collect();
    assert_eq!(distinct.len(), N - 4 - 5);
    env.mailbox_tenant(
        "acme",
        "imap",
        dovecot.imap_port,
        "rita",
        PW,
        "initial_sync = \"all\"",
    );
    let svc = Service::start(&env);
    svc.wait_health(200, Duration::from_secs(30)).await;
    let got = consume(
        &env,
        "email.inbound",
        distinct.len(),
        Duration::from_secs(60),
        Duration::from_secs(2),
    )
    .await;
    let ids = counts(&got, "message_id");
    assert_eq!(got.len(), distinct.len(), "{}", svc.log_text());
    assert!(ids.values().all(|n| *n == 1), "published twice: {ids:?}");
    // The first copy of each id is the one published.
    let subjects = counts(&got, "subject");
    for i in distinct {
        assert_eq!(subjects.get(&format!("copy {i}")), Some(&1), "copy {i}");
    }
    // Every message is handled: the mailbox's position is its last UID.
    let cursor: serde_json::Value = env
        .db()
        .await
        .query_one("SELECT cursor FROM mailbox_state", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(cursor["last_uid"], N as u64, "{cursor}");
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

/// A hostile email named `hostile-<name>` (its subject), with `headers` and `body`.
fn hostile(name: &str, headers: &str, body: &[u8]) -> Vec<u8> {
    let mut m = format!(
        "From: Mallory <m@example.com>\r\nTo: crm@acme.example\r\nSubject: hostile-{name}\r\nDate: Fri, 19 Sep 2025 11:00:00 +0000\r\n{headers}\r\n"
    )
    .into_bytes();
    m.extend_from_slice(body);
    m.extend_from_slice(b"\r\n");
    m
}

/// `n` characters of [0-9a-z] that do not compress (PostgreSQL compresses a long index entry
/// before it refuses it, so a repeated letter would fit).
fn noise(n: usize, seed: u64) -> String {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            char::from_digit(((x >> 33) % 36) as u32, 36).unwrap_or('x')
        })
        .collect()
}

/// Emails a stranger can send, each with whether it is published (else dead-lettered).
fn hostile_corpus() -> Vec<(&'static str, Vec<u8>, bool)> {
    let many_headers: String = (0..10_000)
        .map(|i| format!("X-Filler-{i}: value {i}\r\n"))
        .collect();
    let references: String = (0..5_000)
        .map(|i| format!(" <ref-{i}@example.com>"))
        .collect();
    let mut nested = String::from("Message-ID: <nested@example.com>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b0\"\r\n");
    let mut nested_body = String::new();
    for i in 1..200 {
        nested_body.push_str(&format!(
            "--b{}\r\nContent-Type: multipart/mixed; boundary=\"b{i}\"\r\n\r\n",
            i - 1
        ));
    }
    nested_body.push_str("--b199\r\nContent-Type: text/plain\r\n\r\ndeep inside\r\n");
    for i in (0..200).rev() {
        nested_body.push_str(&format!("--b{i}--\r\n"));
    }
    nested.push_str("X-Depth: 200\r\n");
    let big_body: String = (0..24_000)
        .map(|i| format!("{i:08} the quick brown fox jumps over the lazy dog\r\n"))
        .collect();
    vec![
        (
            "id-300",
            hostile(
                "id-300",
                &format!("Message-ID: <{}@example.com>\r\n", "a".repeat(290)),
                b"an id too long for an AMQP short string",
            ),
            true,
        ),
        (
            "id-5000",
            hostile(
                "id-5000",
                &format!("Message-ID: <{}@example.com>\r\n", noise(5000, 7)),
                b"an id too long for a btree index entry",
            ),
            true,
        ),
        (
            "no-ids",
            hostile("no-ids", "", b"no Message-ID, In-Reply-To or References"),
            true,
        ),
        (
            "long-reply-ids",
            hostile(
                "long-reply-ids",
                &format!(
                    "Message-ID: <lri@example.com>\r\nIn-Reply-To: <{}@x>\r\nReferences: <{}@y>\r\n",
                    noise(5000, 8),
                    noise(3000, 9)
                ),
                b"x",
            ),
            true,
        ),
        (
            "10000-headers",
            hostile(
                "10000-headers",
                &format!("Message-ID: <many@example.com>\r\n{many_headers}"),
                b"x",
            ),
            true,
        ),
        (
            "broken-mime",
            hostile(
                "broken-mime",
                "Message-ID: <mime@example.com>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"OUTER\"\r\n",
                b"--OUTER\r\nContent-Type: multipart/alternative; boundary=\"INNER\"\r\n\r\n--INNER\r\nContent-Type: text/plain\r\n\r\nnever closed\r\n--NOT-A-BOUNDARY\r\nContent-Type: application/pdf; name=\"a.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!not base64!!!",
            ),
            true,
        ),
        (
            "unknown-charset",
            hostile(
                "unknown-charset",
                "Message-ID: <cs@example.com>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=x-no-such-charset\r\nContent-Transfer-Encoding: 8bit\r\n",
                b"caf\xe9 \xff\xfe bytes of no known charset",
            ),
            true,
        ),
        (
            // Dovecot serves NUL as 0x80 over IMAP; the POP3 test sends real NULs.
            "nul-bytes",
            hostile(
                "nul-bytes",
                "Message-ID: <nul\0id@example.com>\r\nX-Nul: a\0b\r\n",
                b"body\0with\0nuls",
            ),
            true,
        ),
        (
            "references-5000",
            hostile(
                "references-5000",
                &format!("Message-ID: <refs@example.com>\r\nIn-Reply-To: <ref-4999@example.com>\r\nReferences:{references}\r\n"),
                b"a very long thread",
            ),
            true,
        ),
        (
            "nested-200",
            hostile("nested-200", &nested, nested_body.as_bytes()),
            true,
        ),
        (
            "oversized",
            hostile(
                "oversized",
                "Message-ID: <oversized@example.com>\r\n",
                big_body.as_bytes(),
            ),
            false,
        ),
        (
            "not-an-email",
            b"this is not an email at all\r\njust two lines\r\n".to_vec(),
            false,
        ),
    ]
}

#[tokio::test]
async fn hostile_emails_each_end_in_one_visible_place() {
    let env = TestEnv::new("hostile");
    // Low limits, so the oversized email (1.3 MB) is over and batches split by bytes.
    env.write_config("[inbound]\nmax_message_bytes = 1000000\nfetch_batch_bytes = 300000\n");
    let dovecot = Dovecot::start(&env.dir.join("dovecot"), &[("ivan", PW)]);
    let corpus = hostile_corpus();
    let mut files = Vec::new();
    for (i, (_, raw, _)) in corpus.iter().enumerate() {
        files.push(message(
            &format!("normal-{i}@example.com"),
            &format!("normal-{i}"),
            "",
            "fine",
        ));
        files.push(raw.clone());
    }
    files.push(message(
        "normal-last@example.com",
        "normal-last",
        "",
        "fine",
    ));
    dovecot.deliver_files("ivan", files.into_iter());
    env.mailbox_tenant(
        "acme",
        "imap",
        dovecot.imap_port,
        "ivan",
        PW,
        "initial_sync = \"all\"\nidle = true",
    );
    let svc = Service::start(&env);
    svc.wait_health(200, Duration::from_secs(30)).await;

    let published: Vec<&str> = corpus.iter().filter(|c| c.2).map(|c| c.0).collect();
    let expected = published.len() + corpus.len() + 1;
    let got = consume(
        &env,
        "email.inbound",
        expected,
        Duration::from_secs(60),
        Duration::from_secs(2),
    )
    .await;
    let subjects = counts(&got, "subject");
    let dead_now = env.depth("email.inbound.dlq").await as usize;
    let wanted: Vec<String> = (0..corpus.len())
        .map(|i| format!("normal-{i}"))
        .chain(std::iter::once("normal-last".to_string()))
        .chain(published.iter().map(|n| format!("hostile-{n}")))
        .collect();
    let refused = corpus.len() - published.len();
    common::ledger::Report {
        fault: "Hostile emails (over-long/missing ids, 10,000 headers, broken boundaries, unknown charsets, NUL bytes, 5,000 References, 200 nested parts, oversized, not an email), each between normal ones",
        messages: wanted.len() + refused,
        once: wanted.iter().filter(|w| subjects.get(*w) == Some(&1)).count() + dead_now.min(refused),
        duplicated: subjects.values().map(|n| n.saturating_sub(1)).sum(),
        lost: wanted.iter().filter(|w| !subjects.contains_key(*w)).count() + refused.saturating_sub(dead_now),
        stuck: 0,
        note: "parsed off the actors' thread; published once each, or dead-lettered with the raw email stored; mail keeps flowing",
    }
    .print();
    for i in 0..corpus.len() {
        assert_eq!(
            subjects.get(&format!("normal-{i}")),
            Some(&1),
            "{subjects:?}\n{}",
            svc.log_text()
        );
    }
    assert_eq!(subjects.get("normal-last"), Some(&1));
    for name in &published {
        assert_eq!(
            subjects.get(&format!("hostile-{name}")),
            Some(&1),
            "{subjects:?}"
        );
    }
    assert_eq!(got.len(), expected, "{subjects:?}");
    assert!(counts(&got, "message_id").values().all(|n| *n == 1));

    let by = |name: &str| {
        got.iter()
            .find(|m| m["subject"] == format!("hostile-{name}"))
            .unwrap()
            .clone()
    };
    // The JSON keeps a long id whole; the AMQP property (a short string) carries its hash.
    let m = by("id-300");
    let id300 = format!("{}@example.com", "a".repeat(290));
    assert_eq!(m["message_id"], id300);
    let amqp_id = m["_amqp_message_id"].as_str().unwrap();
    assert!(
        amqp_id.starts_with("sha256:") && amqp_id.len() == 71,
        "{amqp_id}"
    );
    assert_eq!(
        by("id-5000")["message_id"].as_str().unwrap().len(),
        5000 + 12
    );
    let m = by("no-ids");
    assert!(m["message_id"]
        .as_str()
        .unwrap()
        .ends_with("@mailbridge.invalid"));
    assert!(m["in_reply_to"].is_null() && m["references"].is_null());
    assert!(by("10000-headers")["headers"].as_object().unwrap().len() >= 10_000);
    let m = by("references-5000");
    assert_eq!(m["references"].as_str().unwrap().split(',').count(), 5000);
    assert_eq!(m["thread_id"], "ref-0@example.com");
    assert!(by("nested-200")["body_content"]
        .as_str()
        .unwrap()
        .contains("deep inside"));

    // The two that cannot be published are on the DLQ with their stored bytes, which are
    // the original's.
    let dead = consume(
        &env,
        "email.inbound.dlq",
        2,
        Duration::from_secs(10),
        Duration::from_millis(500),
    )
    .await;
    assert_eq!(dead.len(), 2, "{dead:?}");
    let original = |name: &str| corpus.iter().find(|c| c.0 == name).unwrap().1.clone();
    let big = dead
        .iter()
        .find(|d| d["dedup_key"] == "mid:oversized@example.com")
        .expect("the oversized email is dead-lettered");
    let raw = original("oversized");
    assert_eq!(big["size"], raw.len() as u64);
    assert_eq!(big["headers"]["Subject"], "hostile-oversized");
    assert!(big["error"].as_str().unwrap().contains("max_message_bytes"));
    assert_eq!(stored(&env, big["raw_id"].as_str().unwrap()).await, raw);
    let link = reqwest::get(big["raw_url"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(link.status().as_u16(), 200);
    assert_eq!(link.bytes().await.unwrap().as_ref(), &raw[..]);
    let junk = dead
        .iter()
        .find(|d| d["error"].as_str().unwrap().contains("cannot be parsed"))
        .expect("the non-email is dead-lettered");
    assert_eq!(
        stored(&env, junk["raw_id"].as_str().unwrap()).await,
        original("not-an-email")
    );
    for d in &dead {
        assert_eq!(d["mailbox_id"], "mb-ivan");
        assert_eq!(d["tenant_id"], "acme");
        assert!(d["uid"].is_string() && d["dedup_key"].is_string());
    }
    assert_eq!(
        db_count(
            &env,
            "SELECT count(*) FROM inbound_published WHERE outcome = 'dead-lettered' AND raw_id IS NOT NULL"
        )
        .await,
        2
    );
    assert_eq!(
        db_count(
            &env,
            "SELECT count(*) FROM inbound_published WHERE dedup_key LIKE 'midh:%'"
        )
        .await,
        1,
        "the 5,000-byte id is keyed by its hash"
    );

    // Nothing is wedged: new mail still flows, and a sync publishes nothing again.
    dovecot.append(
        "ivan",
        PW,
        "INBOX",
        &message("after@example.com", "after", "", "x"),
    );
    env.publish(
        "email.sync.user",
        &sync_request("acme", "acme-provider", "user-ivan"),
    )
    .await;
    let more = consume(
        &env,
        "email.inbound",
        1,
        Duration::from_secs(10),
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(
        counts(&more, "message_id").get("after@example.com"),
        Some(&1)
    );
    assert_eq!(more.len(), 1, "{:?}", counts(&more, "subject"));
    assert_eq!(env.depth("email.inbound.dlq").await, 0);
}

#[tokio::test]
async fn a_broker_refusal_goes_to_the_dlq_and_replay_publishes_it_exactly_once() {
    let env = TestEnv::new("refusal");
    let dovecot = Dovecot::start(&env.dir.join("dovecot"), &[("judy", PW)]);
    dovecot.deliver_files(
        "judy",
        (0..5).map(|i| message(&format!("ref-{i}@example.com"), "refused?", "", "x")),
    );
    env.mailbox_tenant(
        "acme",
        "imap",
        dovecot.imap_port,
        "judy",
        PW,
        "initial_sync = \"all\"\nidle = false\npoll_interval = \"1h\"",
    );
    // The broker takes two; the rest of the batch is nacked (reject-publish).
    common::rabbitmqctl(&[
        "set_policy",
        "-p",
        &env.vhost,
        "cap-inbound",
        "^email\\.inbound$",
        r#"{"max-length":2,"overflow":"reject-publish"}"#,
        "--apply-to",
        "queues",
    ]);
    let svc = Service::start_with(&env, &[("MAILBRIDGE_ADMIN_TOKEN", "replay-token")]);
    svc.wait_health(200, Duration::from_secs(30)).await;
    wait_depth(&env, &svc, "email.inbound.dlq", 3, Duration::from_secs(20)).await;
    assert_eq!(env.depth("email.inbound").await, 2);

    common::rabbitmqctl(&["clear_policy", "-p", &env.vhost, "cap-inbound"]);
    let first = consume(
        &env,
        "email.inbound",
        2,
        Duration::from_secs(5),
        Duration::from_millis(500),
    )
    .await;
    assert_eq!(first.len(), 2);
    let client = reqwest::Client::new();
    let listed: serde_json::Value = client
        .get(format!("{}/api/dlq?queue=email.inbound.dlq", svc.base_url))
        .bearer_auth("replay-token")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let entries = listed["entries"].as_array().unwrap().clone();
    assert_eq!(entries.len(), 3, "{listed}");
    for e in &entries {
        assert!(e["error"].as_str().unwrap().contains("refused"), "{e}");
        assert!(e["raw_id"].is_string() && e["raw_url"].is_string());
        assert_eq!(
            e["dedup_key"],
            format!("mid:{}", e["message_id"].as_str().unwrap())
        );
    }
    let refused_ids: Vec<String> = entries
        .iter()
        .map(|e| e["message_id"].as_str().unwrap().to_string())
        .collect();

    // A dead letter of a mailbox no longer configured stays, with the reason.
    let stray = serde_json::json!({
        "message_id": "gone@example.com", "tenant_id": "acme", "mailbox_id": "mb-gone",
        "uid": "7", "dedup_key": "mid:gone@example.com", "raw_id": entries[0]["raw_id"],
        "error": "x", "error_class": "permanent", "retry_count": 0,
        "failed_at": "2025-09-19T11:00:00Z"
    });
    env.publish("email.inbound.dlq", &serde_json::to_vec(&stray).unwrap())
        .await;

    // One by the CLI, the others by HTTP.
    let out = env.command(&[
        "dlq",
        "replay",
        "--queue",
        "email.inbound.dlq",
        "--message-id",
        &refused_ids[0],
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("replayed 1: {}", refused_ids[0])),
        "{stdout}"
    );
    let answer: serde_json::Value = client
        .post(format!("{}/api/dlq/replay", svc.base_url))
        .bearer_auth("replay-token")
        .json(&serde_json::json!({"queue": "email.inbound.dlq", "all": true}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["replayed"].as_array().unwrap().len(), 2, "{answer}");
    assert_eq!(answer["kept"], 1);
    assert_eq!(answer["not_replayed"][0]["message_id"], "gone@example.com");
    assert!(answer["not_replayed"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("no longer configured"));

    // Every email published exactly once; the stray entry is all that is left.
    let replayed = consume(
        &env,
        "email.inbound",
        3,
        Duration::from_secs(10),
        Duration::from_secs(1),
    )
    .await;
    let mut all = first.clone();
    all.extend(replayed.iter().cloned());
    let ids = counts(&all, "message_id");
    common::ledger::Report {
        fault: "The broker refusing 3 of 5 inbound emails (a reject-publish max-length policy), then dlq replay",
        messages: 5,
        once: (0..5)
            .filter(|i| ids.get(&format!("ref-{i}@example.com")) == Some(&1))
            .count(),
        duplicated: ids.values().map(|n| n.saturating_sub(1)).sum(),
        lost: (0..5)
            .filter(|i| !ids.contains_key(&format!("ref-{i}@example.com")))
            .count(),
        stuck: 0,
        note: "refused ones dead-lettered with the raw email stored; replay (CLI and HTTP) published each once after the policy was cleared",
    }
    .print();
    assert_eq!(all.len(), 5, "{ids:?}");
    assert!((0..5).all(|i| ids.get(&format!("ref-{i}@example.com")) == Some(&1)));
    assert!(replayed
        .iter()
        .all(|m| m["mailbox_id"] == "mb-judy" && m["source"] == "imap"));
    assert_eq!(env.depth("email.inbound.dlq").await, 1);
    assert_eq!(
        db_count(
            &env,
            "SELECT count(*) FROM inbound_published WHERE outcome = 'published'"
        )
        .await,
        5
    );
    // Replaying again publishes nothing; neither does a sync.
    let out = env.command(&["dlq", "replay", "--queue", "email.inbound.dlq", "--all"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("replayed 0"));
    env.publish(
        "email.sync.user",
        &sync_request("acme", "acme-provider", "user-judy"),
    )
    .await;
    assert!(consume(
        &env,
        "email.inbound",
        0,
        Duration::ZERO,
        Duration::from_millis(1500)
    )
    .await
    .is_empty());
}

/// An RFC 2822 date `days` ago.
fn days_ago(days: i64) -> String {
    (time::OffsetDateTime::now_utc() - time::Duration::days(days))
        .format(&time::format_description::well_known::Rfc2822)
        .unwrap()
}

fn dated(id: &str, date: &str) -> Vec<u8> {
    format!(
        "From: john@example.com\r\nTo: crm@acme.example\r\nSubject: {id}\r\nMessage-ID: <{id}>\r\nDate: {date}\r\n\r\nx\r\n"
    )
    .into_bytes()
}

#[tokio::test]
async fn pop3_initial_window_holds_on_every_poll() {
    let env = TestEnv::new("pop3window");
    let dovecot = Dovecot::start(&env.dir.join("dovecot"), &[("kate", PW)]);
    dovecot.deliver_files(
        "kate",
        vec![
            dated("old-1@example.com", "Mon, 1 Jan 2018 10:00:00 +0000"),
            dated("recent@example.com", &days_ago(1)),
            dated("old-2@example.com", "Tue, 5 Mar 2019 10:00:00 +0000"),
        ]
        .into_iter(),
    );
    env.mailbox_tenant(
        "acme",
        "pop3",
        dovecot.pop3_port,
        "kate",
        PW,
        "initial_sync = \"30d\"\npoll_interval = \"1s\"",
    );
    let svc = Service::start(&env);
    svc.wait_health(200, Duration::from_secs(30)).await;
    // Several polls (one a second): the old mail is never published.
    let got = consume(
        &env,
        "email.inbound",
        1,
        Duration::from_secs(10),
        Duration::from_secs(4),
    )
    .await;
    assert_eq!(
        counts(&got, "message_id").into_iter().collect::<Vec<_>>(),
        [("recent@example.com".to_string(), 1)],
        "{}",
        svc.log_text()
    );
    assert_eq!(
        db_count(
            &env,
            "SELECT count(*) FROM inbound_published WHERE outcome = 'skipped-initial'"
        )
        .await,
        2
    );
    // Mail that arrives later is new, whatever its Date says.
    dovecot.append(
        "kate",
        PW,
        "INBOX",
        &dated("late-old@example.com", "Wed, 1 Jan 2020 10:00:00 +0000"),
    );
    let got = consume(
        &env,
        "email.inbound",
        1,
        Duration::from_secs(10),
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(
        counts(&got, "message_id").into_iter().collect::<Vec<_>>(),
        [("late-old@example.com".to_string(), 1)]
    );
}

#[tokio::test]
async fn imap_new_holds_across_a_uidvalidity_change() {
    let env = TestEnv::new("newresync");
    // Low, so one message already there is "large": its key is hashed from pieces.
    env.write_config("[inbound]\nmax_message_bytes = 100000\n");
    let dovecot = Dovecot::start(&env.dir.join("dovecot"), &[("lena", PW)]);
    dovecot.imap("lena", PW, "m.create('Work')");
    let large: String = (0..3000)
        .map(|i| format!("{i:06} padding padding padding padding\r\n"))
        .collect();
    let old = vec![
        message("old-a@example.com", "old", "", "x"),
        // No Message-ID: keyed by the hash of its bytes.
        b"From: john@example.com\r\nSubject: no id\r\n\r\nwithout a Message-ID\r\n".to_vec(),
        format!("From: john@example.com\r\nSubject: no id, large\r\n\r\n{large}").into_bytes(),
    ];
    for m in &old {
        dovecot.append("lena", PW, "Work", m);
    }
    env.mailbox_tenant(
        "acme",
        "imap",
        dovecot.imap_port,
        "lena",
        PW,
        "folder = \"Work\"\ninitial_sync = \"new\"\nidle = false\npoll_interval = \"1h\"",
    );
    let svc = Service::start(&env);
    svc.wait_health(200, Duration::from_secs(30)).await;
    wait_synced(&svc, "mb-lena").await;
    assert_eq!(
        db_count(
            &env,
            "SELECT count(*) FROM inbound_published WHERE outcome = 'skipped-initial'"
        )
        .await,
        3,
        "{}",
        svc.log_text()
    );

    // A new UIDVALIDITY: the same three, and one new.
    dovecot.imap("lena", PW, "m.delete('Work')\nm.create('Work')");
    for m in &old {
        dovecot.append("lena", PW, "Work", m);
    }
    dovecot.append(
        "lena",
        PW,
        "Work",
        &message("fresh@example.com", "fresh", "", "x"),
    );
    env.publish(
        "email.sync.user",
        &sync_request("acme", "acme-provider", "user-lena"),
    )
    .await;
    let got = consume(
        &env,
        "email.inbound",
        1,
        Duration::from_secs(10),
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(
        counts(&got, "message_id").into_iter().collect::<Vec<_>>(),
        [("fresh@example.com".to_string(), 1)],
        "{}",
        svc.log_text()
    );
    assert!(svc.log_text().contains("UIDVALIDITY changed"));
    assert_eq!(env.depth("email.inbound.dlq").await, 0);
}

#[tokio::test]
async fn pop3_over_stls_with_delete_after_fetch_publishes_once_and_empties_the_mailbox() {
    let env = TestEnv::new("pop3stls");
    env.write_config("[inbound]\nmax_message_bytes = 100000\n");
    let (ca, cert, key) = common::make_certs(&env.dir.join("certs"));
    let dovecot = Dovecot::start_tls(
        &env.dir.join("dovecot"),
        &[("liam", PW)],
        Some((&cert, &key)),
    );
    let big: String = (0..3000)
        .map(|i| format!("{i:06} padding padding padding padding\r\n"))
        .collect();
    let oversized = format!(
        "From: john@example.com\r\nSubject: big\r\nMessage-ID: <big@example.com>\r\n\r\n{big}"
    )
    .into_bytes();
    // POP3 passes NUL bytes through: they reach the parser and the database for real.
    let nul = b"From: john@example.com\r\nSubject: nul\r\nMessage-ID: <nul\0id@example.com>\r\nX-Nul: a\0b\r\n\r\nbody\0\r\n".to_vec();
    dovecot.deliver_files(
        "liam",
        vec![
            message("pop-a@example.com", "a", "", "x"),
            nul,
            oversized.clone(),
            message("pop-b@example.com", "b", "", "x"),
        ]
        .into_iter(),
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
id = "mb-liam"
user_id = "user-liam"
provider_id = "acme-provider"
protocol = "pop3"
host = "localhost"
port = {port}
tls = "starttls"
ca_file = "{ca}"
username = "liam"
password = "{PW}"
initial_sync = "all"
poll_interval = "1s"
delete_after_fetch = true
"#,
            port = dovecot.pop3_port,
            ca = ca.display(),
        ),
    );
    let svc = Service::start(&env);
    svc.wait_health(200, Duration::from_secs(30)).await;
    let left = || {
        let out = std::process::Command::new("python3")
            .arg("-c")
            .arg(format!(
                "import poplib\np = poplib.POP3('127.0.0.1', {})\np.user('liam'); p.pass_({PW:?})\nprint(len(p.uidl()[1]))\np.quit()",
                dovecot.pop3_port
            ))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let got = consume(
        &env,
        "email.inbound",
        3,
        Duration::from_secs(15),
        Duration::from_secs(3),
    )
    .await;
    let ids = counts(&got, "message_id");
    assert_eq!(got.len(), 3, "{ids:?}\n{}", svc.log_text());
    assert_eq!(ids.get("pop-a@example.com"), Some(&1));
    assert_eq!(ids.get("pop-b@example.com"), Some(&1));
    assert_eq!(ids.get("nul\0id@example.com"), Some(&1), "{ids:?}");
    let dead = consume(
        &env,
        "email.inbound.dlq",
        1,
        Duration::from_secs(5),
        Duration::from_millis(500),
    )
    .await;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        dead[0]["dedup_key"],
        format!("uidl:{}", dead[0]["uid"].as_str().unwrap())
    );
    assert_eq!(dead[0]["headers"]["Subject"], "big");
    assert_eq!(
        stored(&env, dead[0]["raw_id"].as_str().unwrap()).await,
        oversized
    );
    // Published and dead-lettered mail is gone from the server (NULs stripped from what
    // PostgreSQL keeps).
    let start = Instant::now();
    while left() != "0" {
        assert!(start.elapsed() < Duration::from_secs(10), "{}", left());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        db_count(
            &env,
            "SELECT count(*) FROM inbound_published WHERE message_id = 'nulid@example.com'"
        )
        .await,
        1
    );
    dovecot.append(
        "liam",
        PW,
        "INBOX",
        &message("pop-c@example.com", "c", "", "x"),
    );
    let got = consume(
        &env,
        "email.inbound",
        1,
        Duration::from_secs(10),
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(
        counts(&got, "message_id").into_iter().collect::<Vec<_>>(),
        [("pop-c@example.com".to_string(), 1)]
    );
    let start = Instant::now();
    while left() != "0" {
        assert!(start.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_sync_request_reaches_only_its_own_tenants_mailboxes() {
    let env = TestEnv::new("synctenant");
    let dovecot = Dovecot::start(&env.dir.join("dovecot"), &[("mona", PW), ("nick", PW)]);
    for (tenant, user) in [("acme", "mona"), ("beta", "nick")] {
        env.write_tenant(
            &format!("{tenant}.toml"),
            &format!(
                r#"
id = "{tenant}"
[[providers]]
id = "{tenant}-provider"
kind = "file"
dir = "sent-{tenant}"

[[mailboxes]]
id = "mb-{user}"
user_id = "user-shared"
provider_id = "{tenant}-provider"
protocol = "imap"
host = "127.0.0.1"
port = {port}
tls = "none"
username = "{user}"
password = "{PW}"
idle = false
poll_interval = "1h"
"#,
                port = dovecot.imap_port
            ),
        );
    }
    let svc = Service::start(&env);
    svc.wait_health(200, Duration::from_secs(30)).await;
    wait_synced(&svc, "mb-mona").await;
    wait_synced(&svc, "mb-nick").await;
    dovecot.append(
        "mona",
        PW,
        "INBOX",
        &message("for-acme@example.com", "a", "", "x"),
    );
    dovecot.append(
        "nick",
        PW,
        "INBOX",
        &message("for-beta@example.com", "b", "", "x"),
    );

    // Beta's tenant with acme's provider: no mailbox has both.
    env.publish(
        "email.sync.user",
        &sync_request("beta", "acme-provider", "user-shared"),
    )
    .await;
    let none = consume(
        &env,
        "email.inbound",
        0,
        Duration::ZERO,
        Duration::from_millis(1500),
    )
    .await;
    assert!(none.is_empty(), "{none:?}");
    env.publish(
        "email.sync.user",
        &sync_request("acme", "acme-provider", "user-shared"),
    )
    .await;
    let got = consume(
        &env,
        "email.inbound",
        1,
        Duration::from_secs(10),
        Duration::from_millis(1500),
    )
    .await;
    assert_eq!(
        counts(&got, "message_id").into_iter().collect::<Vec<_>>(),
        [("for-acme@example.com".to_string(), 1)]
    );
    assert_eq!(got[0]["tenant_id"], "acme");
    env.publish(
        "email.sync.user",
        &sync_request("beta", "beta-provider", "user-shared"),
    )
    .await;
    let got = consume(
        &env,
        "email.inbound",
        1,
        Duration::from_secs(10),
        Duration::from_millis(1000),
    )
    .await;
    assert_eq!(
        counts(&got, "message_id").into_iter().collect::<Vec<_>>(),
        [("for-beta@example.com".to_string(), 1)]
    );
    assert_eq!(got[0]["tenant_id"], "beta");
}
