//! The operator dashboard (issue 14) against a running service with real data: emails sent
//! and one dead-lettered through the test SMTP server, a mailbox on Dovecot that receives a
//! reply, a reload. The HTTP side (login, cookie flags, redirects, CSRF refusals) is checked
//! here; headless Chromium (tests/support/dashboard.py, selenium) then logs in through the
//! form, checks every page, replays the dead letter from the DLQ page, and saves a screenshot
//! of each page under target/dashboard-screenshots/.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{guide_request, wait_count, Dovecot, Service, SmtpServer, TestEnv};

const TENANT: &str = "acme-dash";
const PROVIDER: &str = "dash-smtp";
const TOKEN: &str = "dash-admin-token-4f1c";
const API_KEY: &str = "sg-secret-key-91be";
const LINK_KEY: &str = "link-key-secret-0123456789abcdef0123456789";
const PW: &str = "imap-secret-pw-77";

fn tenant_file(smtp_port: u16, imap_port: u16) -> String {
    format!(
        r#"
id = "{TENANT}"
name = "Dashboard tenant"

[[providers]]
id = "{PROVIDER}"
name = "SMTP <of> acme"
kind = "smtp"
host = "127.0.0.1"
port = {smtp_port}
tls = "none"
max_connections = 2
rate_per_second = 50

[[providers]]
id = "dash-sendgrid"
name = "Unused SendGrid"
kind = "sendgrid"
api_key = "{API_KEY}"
base_url = "http://127.0.0.1:9"

[[mailboxes]]
id = "mb-dana"
user_id = "user-dana"
provider_id = "{PROVIDER}"
protocol = "imap"
host = "127.0.0.1"
port = {imap_port}
tls = "none"
username = "dana"
password = "{PW}"
idle = true
initial_sync = "new"
"#
    )
}

/// A urlencoded form body.
fn form(fields: &[(&str, &str)]) -> String {
    let mut f = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in fields {
        f.append_pair(k, v);
    }
    f.finish()
}

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

#[tokio::test]
async fn every_page_shows_real_data_and_a_replay_from_the_page_is_sent() {
    let started = Instant::now();
    let env = TestEnv::new("dash");
    env.write_config(&format!("link_key = \"{LINK_KEY}\""));
    let smtp = SmtpServer::start(&env.dir.join("smtp"), &[]);
    let dovecot = Dovecot::start(&env.dir.join("dovecot"), &[("dana", PW)]);
    env.write_tenant(
        &format!("{TENANT}.toml"),
        &tenant_file(smtp.port, dovecot.imap_port),
    );
    smtp.set_reply(Some("550 5.1.1 No such user here"));
    let svc = Service::start_with(&env, &[("MAILBRIDGE_ADMIN_TOKEN", TOKEN)]);
    svc.wait_health(200, Duration::from_secs(30)).await;
    let base = svc.base_url.clone();
    let db = env.db().await;

    // One permanent failure (dead-lettered), then three sent.
    let request =
        |id: &str| serde_json::to_vec(&guide_request(TENANT, PROVIDER, id, None)).unwrap();
    env.publish("email.send", &request("dash-dead")).await;
    for _ in 0..100 {
        if env.depth("email.send.dlq").await == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(env.depth("email.send.dlq").await, 1, "{}", svc.log_text());
    smtp.set_reply(None);
    let sent = ["dash-sent-1", "dash-sent-2", "dash-sent-3"];
    for id in sent {
        env.publish("email.send", &request(id)).await;
    }
    assert_eq!(smtp.wait_for(3, Duration::from_secs(15)).await.len(), 3);
    wait_count(
        &db,
        "SELECT count(*) FROM outbox WHERE status = 'sent' AND result_published_at IS NOT NULL",
        3,
        Duration::from_secs(10),
    )
    .await;

    // A reply to the first, received by the mailbox: recorded against it.
    let rfc_id: String = db
        .query_one(
            "SELECT rfc_message_id FROM outbox WHERE message_id = 'dash-sent-1'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let reply = "dash-reply-1@example.com";
    dovecot.append(
        "dana",
        PW,
        "INBOX",
        format!(
            "From: User <user@example.com>\r\nTo: crm@acme.example\r\nSubject: Re: Test Email\r\n\
             Message-ID: <{reply}>\r\nIn-Reply-To: <{rfc_id}>\r\nReferences: <{rfc_id}>\r\n\
             Date: Fri, 19 Sep 2025 11:00:00 +0000\r\nContent-Type: text/plain\r\n\r\nthanks\r\n"
        )
        .as_bytes(),
    );
    let got = env.take("email.inbound", 1, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 1, "{}", svc.log_text());
    assert_eq!(got[0]["reply_to_message_id"], "dash-sent-1");
    wait_count(
        &db,
        "SELECT count(*) FROM inbound_published WHERE reply_tenant_id = 'acme-dash'
           AND reply_to_message_id = 'dash-sent-1'",
        1,
        Duration::from_secs(10),
    )
    .await;

    // A reload that adds a tenant: the configuration page shows its diff.
    env.write_tenant(
        "beta-dash.toml",
        "id = \"beta-dash\"\n[[providers]]\nid = \"beta-files\"\nname = \"files\"\nkind = \"file\"\ndir = \"sent-beta\"\n",
    );
    let http = no_redirects();
    let r = http
        .post(format!("{base}/api/config/reload"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "{}", r.text().await.unwrap());

    // Without the cookie: pages redirect to the login form, the JSON sample is refused.
    for path in ["/", "/ui/mailboxes", "/ui/outbox", "/ui/dlq", "/ui/config"] {
        let r = http.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 303, "{path}");
        assert_eq!(r.headers()["location"], "/login", "{path}");
    }
    let r = http
        .get(format!("{base}/ui/api/queues"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = http
        .post(format!("{base}/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&[("token", "wrong")]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert!(r.headers().get("set-cookie").is_none());
    // The right token: a cookie HttpOnly and SameSite=Strict, not the token itself.
    let r = http
        .post(format!("{base}/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&[("token", TOKEN)]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 303);
    let set_cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    println!("Set-Cookie: {set_cookie}");
    assert!(set_cookie.starts_with("mb_admin="), "{set_cookie}");
    assert!(set_cookie.contains("; HttpOnly"), "{set_cookie}");
    assert!(set_cookie.contains("; SameSite=Strict"), "{set_cookie}");
    assert!(set_cookie.contains("; Path=/"), "{set_cookie}");
    assert!(!set_cookie.contains(TOKEN), "{set_cookie}");
    let cookie = set_cookie.split(';').next().unwrap().to_string();
    let page = http
        .get(format!("{base}/ui/dlq"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status().as_u16(), 200);
    let page = page.text().await.unwrap();
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap()
        .to_string();
    // A replay without the form token, or from another origin, is refused.
    let replay = |fields: &[(&str, &str)], origin: Option<&'static str>| {
        let mut r = http
            .post(format!("{base}/ui/dlq/replay"))
            .header("cookie", &cookie)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form(fields));
        if let Some(o) = origin {
            r = r.header("origin", o);
        }
        r.send()
    };
    let r = replay(&[("one", "dash-dead")], None).await.unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let r = replay(
        &[("csrf", &csrf), ("one", "dash-dead")],
        Some("http://evil.example"),
    )
    .await
    .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    assert_eq!(env.depth("email.send.dlq").await, 1);

    // The browser.
    let shots = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/dashboard-screenshots");
    let _ = std::fs::remove_dir_all(&shots);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/support/dashboard.py");
    let args = serde_json::json!({
        "base": base,
        "token": TOKEN,
        "screenshots": shots,
        "tenant": TENANT,
        "provider": PROVIDER,
        "mailbox": "mb-dana",
        "queues": ["email.send", "email.inbound", "email.sync.user", "email.send.result",
                   "email.send.dlq", "email.inbound.dlq"],
        "sent": sent,
        "dead": "dash-dead",
        "recipient": "user@example.com",
        "reply": reply,
        "secrets": [TOKEN, API_KEY, LINK_KEY, PW],
        "added": "beta-dash",
    });
    let browser = Instant::now();
    let out = Command::new("python3")
        .arg(&script)
        .arg(args.to_string())
        .output()
        .expect(
            "python3 runs the selenium script (scripts/test.sh installs selenium and chromium)",
        );
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!(
        "the browser run took {:.1} s; screenshots:\n{stdout}",
        browser.elapsed().as_secs_f64()
    );
    assert!(
        out.status.success(),
        "the dashboard script failed:\n{stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        svc.log_text()
    );
    let pngs: Vec<&str> = stdout.lines().filter(|l| l.ends_with(".png")).collect();
    assert_eq!(pngs.len(), 9, "{stdout}");
    for p in &pngs {
        let bytes = std::fs::read(p).unwrap();
        assert!(bytes.starts_with(b"\x89PNG") && bytes.len() > 5_000, "{p}");
    }

    // The replay clicked in the page reached the send queue: sent, its DLQ entry gone.
    let mails = smtp.wait_for(4, Duration::from_secs(15)).await;
    assert!(
        mails
            .iter()
            .any(|m| m.text().contains("Message-ID: <dash-dead.")),
        "{}",
        svc.log_text()
    );
    assert_eq!(env.depth("email.send.dlq").await, 0);
    wait_count(
        &db,
        "SELECT count(*) FROM outbox WHERE message_id = 'dash-dead' AND status = 'sent'",
        1,
        Duration::from_secs(10),
    )
    .await;
    let events = common::texts(
        &db,
        "SELECT event FROM outbox_events WHERE message_id = 'dash-dead' ORDER BY id",
    )
    .await;
    assert_eq!(events, ["failed", "dead-lettered", "replayed"]);
    println!("took {:.1} s", started.elapsed().as_secs_f64());
}
