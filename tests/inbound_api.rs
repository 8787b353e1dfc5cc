//! Inbound through the Gmail API and Microsoft Graph (`protocol = "gmail_api"`, `"ms_graph"`)
//! against a stand-in of both (`common::mail_api_server`), RabbitMQ and PostgreSQL, through
//! the real binary: each message published once with its content and `source`, nothing twice
//! across a restart or an expired history id / delta token, `email.sync.user` at once,
//! `initial_sync = "new"`, 429 with Retry-After, and a revoked OAuth2 account down without
//! polling.
//!
//! "Nothing twice" is counted on the queue, never by rows of `inbound_published`.

mod common;

use std::time::{Duration, Instant};

use common::mail_api_server::{MailApiServer, ACCESS_TOKEN};
use common::token_server::TokenServer;
use common::{Service, TestEnv};

const DAY: i64 = 24 * 3600;

fn message(id: &str, subject: &str) -> Vec<u8> {
    format!(
        "From: John Doe <john@example.com>\r\nTo: crm@acme.example\r\nSubject: {subject}\r\nMessage-ID: <{id}>\r\nDate: Fri, 19 Sep 2025 11:00:00 +0000\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nbody of {subject}\r\n"
    )
    .into_bytes()
}

/// A tenant with a file provider and one API mailbox `mb-<protocol>`; `auth` and `extra` are
/// more mailbox keys (the `oauth2` table last).
fn tenant(env: &TestEnv, protocol: &str, base_url: &str, extra: &str, auth: &str) {
    env.write_tenant(
        "acme.toml",
        &format!(
            r#"
id = "acme"
[[providers]]
id = "acme-provider"
kind = "file"
dir = "sent-acme"

[[mailboxes]]
id = "mb-{protocol}"
user_id = "user-{protocol}"
provider_id = "acme-provider"
protocol = "{protocol}"
base_url = "{base_url}"
{extra}
{auth}
"#
        ),
    );
}

fn static_token() -> String {
    format!("access_token = \"{ACCESS_TOKEN}\"")
}

/// Takes `n` from `email.inbound` (up to `timeout`), then checks that nothing more comes
/// within `settle`.
async fn take_exactly(
    env: &TestEnv,
    svc: &Service,
    n: usize,
    timeout: Duration,
    settle: Duration,
) -> Vec<serde_json::Value> {
    let got = env.take("email.inbound", n, timeout).await;
    assert_eq!(got.len(), n, "published: {got:#?}\n{}", svc.log_text());
    let extra = env.take("email.inbound", 1, settle).await;
    assert!(
        extra.is_empty(),
        "published more than once: {extra:#?}\n{}",
        svc.log_text()
    );
    got
}

fn ids(msgs: &[serde_json::Value]) -> Vec<String> {
    let mut v: Vec<String> = msgs
        .iter()
        .map(|m| m["message_id"].as_str().unwrap_or("").to_string())
        .collect();
    v.sort();
    v
}

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

async fn sync_request(env: &TestEnv, user: &str) {
    let sync = serde_json::json!({
        "tenant_id": "acme", "provider_id": "acme-provider", "user_id": user,
        "sync_type": "inbound", "timestamp": "2025-09-19T10:30:00Z"
    });
    env.publish("email.sync.user", &serde_json::to_vec(&sync).unwrap())
        .await;
}

/// The whole life of one API mailbox, for either API: `add` puts a message in the stand-in
/// (subject, age in seconds), `expire` makes the stored cursor too old.
async fn life_of_an_api_mailbox(
    protocol: &str,
    add: impl Fn(&MailApiServer, &[u8], i64),
    expire: impl Fn(&MailApiServer),
    relisted: impl Fn(&str) -> bool,
    touch: impl Fn(&MailApiServer),
) {
    let downloads = |api: &MailApiServer, from: usize| {
        api.requests()[from..]
            .iter()
            .filter(|r| r.target.contains("format=raw") || r.target.contains("$value"))
            .count()
    };
    let env = TestEnv::new(&format!("api-{protocol}"));
    let api = MailApiServer::start(2).await;
    let mailbox = format!("mb-{protocol}");
    let user = format!("user-{protocol}");
    // Before the mailbox is added: one old (outside the 30-day window), three recent (more
    // than a page of two).
    add(&api, &message(&format!("old@{protocol}"), "old"), 60 * DAY);
    for i in 1..=3 {
        add(
            &api,
            &message(&format!("recent-{i}@{protocol}"), &format!("recent {i}")),
            (10 - i) * DAY,
        );
    }
    tenant(
        &env,
        protocol,
        &api.base_url(),
        "initial_sync = \"30d\"\npoll_interval = \"1h\"",
        &static_token(),
    );
    let mut svc = Service::start(&env);
    svc.wait_health(200, Duration::from_secs(30)).await;
    let got = take_exactly(
        &env,
        &svc,
        3,
        Duration::from_secs(20),
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(
        ids(&got),
        [1, 2, 3].map(|i| format!("recent-{i}@{protocol}")),
        "the 30-day window, through pages of two"
    );
    for m in &got {
        assert_eq!(m["source"], protocol, "{m}");
        assert_eq!(m["mailbox_id"], mailbox.as_str(), "{m}");
        assert_eq!(m["tenant_id"], "acme");
        assert_eq!(m["user_id"], user.as_str());
        let subject = m["subject"].as_str().unwrap_or("");
        assert!(subject.starts_with("recent "), "{m}");
        assert!(
            m["body_content"]
                .as_str()
                .is_some_and(|b| b.contains(&format!("body of {subject}"))),
            "{m}"
        );
    }
    wait_synced(&svc, &mailbox).await;
    let (_, h) = svc.get_json("/health").await;
    let mb = &h["components"]["mailboxes"][&mailbox];
    assert_eq!(mb["status"], "ok", "{h}");
    assert_eq!(mb["protocol"], protocol, "{h}");

    // New mail waits for the hourly poll, or comes at once on email.sync.user.
    add(&api, &message(&format!("new-1@{protocol}"), "new 1"), 0);
    add(&api, &message(&format!("new-2@{protocol}"), "new 2"), 0);
    assert!(
        env.take("email.inbound", 1, Duration::from_secs(2))
            .await
            .is_empty(),
        "not before the request or the poll"
    );
    let asked = Instant::now();
    sync_request(&env, &user).await;
    let got = take_exactly(
        &env,
        &svc,
        2,
        Duration::from_secs(10),
        Duration::from_secs(2),
    )
    .await;
    assert!(asked.elapsed() < Duration::from_secs(8));
    assert_eq!(
        ids(&got),
        [format!("new-1@{protocol}"), format!("new-2@{protocol}")]
    );

    // A restart publishes nothing again; the next new one comes once.
    svc.terminate(Duration::from_secs(20));
    let svc = Service::start(&env);
    svc.wait_health(200, Duration::from_secs(30)).await;
    wait_synced(&svc, &mailbox).await;
    assert!(
        env.take("email.inbound", 1, Duration::from_secs(2))
            .await
            .is_empty(),
        "nothing twice after a restart\n{}",
        svc.log_text()
    );
    add(&api, &message(&format!("new-3@{protocol}"), "new 3"), 0);
    sync_request(&env, &user).await;
    let got = take_exactly(
        &env,
        &svc,
        1,
        Duration::from_secs(10),
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(got[0]["message_id"], format!("new-3@{protocol}"));

    // The stored position expires: the folder is listed again (from the 30-day floor) and
    // only what is new is published.
    expire(&api);
    add(&api, &message(&format!("new-4@{protocol}"), "new 4"), 0);
    let before = api.requests().len();
    sync_request(&env, &user).await;
    let got = take_exactly(
        &env,
        &svc,
        1,
        Duration::from_secs(10),
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(got[0]["message_id"], format!("new-4@{protocol}"));
    let after: Vec<_> = api.requests()[before..].to_vec();
    assert!(
        after.iter().any(|r| relisted(&r.target)),
        "listed again: {after:#?}"
    );
    assert!(
        after.iter().any(|r| r.status == 404 || r.status == 410),
        "{after:#?}"
    );
    assert_eq!(
        downloads(&api, before),
        1,
        "only the new one is downloaded; the handled ones are known by their API ids"
    );
    // And from the new position on, changes again; messages that changed (Graph: read) are
    // not downloaded again.
    touch(&api);
    add(&api, &message(&format!("new-5@{protocol}"), "new 5"), 0);
    let before = api.requests().len();
    sync_request(&env, &user).await;
    let got = take_exactly(
        &env,
        &svc,
        1,
        Duration::from_secs(10),
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(got[0]["message_id"], format!("new-5@{protocol}"));
    assert_eq!(
        downloads(&api, before),
        1,
        "{:#?}",
        &api.requests()[before..]
    );

    // Throttled: 429 with Retry-After is waited out, then the mail comes, once.
    api.fail_next(&[429]);
    add(&api, &message(&format!("new-6@{protocol}"), "new 6"), 0);
    sync_request(&env, &user).await;
    // A sync request during the wait does not cut it short.
    tokio::time::sleep(Duration::from_millis(200)).await;
    sync_request(&env, &user).await;
    let got = take_exactly(
        &env,
        &svc,
        1,
        Duration::from_secs(15),
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(got[0]["message_id"], format!("new-6@{protocol}"));
    let requests = api.requests();
    let throttled = requests
        .iter()
        .position(|r| r.status == 429)
        .expect("a 429 was answered");
    let waited = requests[throttled + 1].at - requests[throttled].at;
    assert!(
        waited >= Duration::from_millis(950),
        "Retry-After: 1 was honoured, the next request came after {waited:?}"
    );

    let log = svc.log_text();
    assert!(!log.contains(ACCESS_TOKEN), "the token is never logged");
}

#[tokio::test]
async fn a_gmail_api_mailbox_publishes_each_message_once() {
    life_of_an_api_mailbox(
        "gmail_api",
        |api, raw, age| {
            api.gmail_add(raw, age);
        },
        MailApiServer::gmail_expire_history,
        |t| t.contains("/messages?labelIds=INBOX"),
        |_| {},
    )
    .await;
}

#[tokio::test]
async fn an_ms_graph_mailbox_publishes_each_message_once() {
    life_of_an_api_mailbox(
        "ms_graph",
        |api, raw, age| {
            api.graph_add(raw, age);
        },
        MailApiServer::graph_expire_tokens,
        |t| t.contains("/messages/delta?$select="),
        MailApiServer::graph_touch_all,
    )
    .await;
}

#[tokio::test]
async fn initial_sync_new_publishes_nothing_that_was_there() {
    let env = TestEnv::new("api-new");
    let api = MailApiServer::start(2).await;
    for i in 1..=3 {
        api.gmail_add(&message(&format!("g-old-{i}@x"), "old"), 3600);
        api.graph_add(&message(&format!("m-old-{i}@x"), "old"), 3600);
    }
    env.write_tenant(
        "acme.toml",
        &format!(
            r#"
id = "acme"
[[providers]]
id = "acme-provider"
kind = "file"
dir = "sent-acme"

[[mailboxes]]
id = "mb-gmail"
user_id = "user-gmail"
provider_id = "acme-provider"
protocol = "gmail_api"
base_url = "{base}"
user = "crm@acme.example"
poll_interval = "1h"
access_token = "{ACCESS_TOKEN}"

[[mailboxes]]
id = "mb-graph"
user_id = "user-graph"
provider_id = "acme-provider"
protocol = "ms_graph"
base_url = "{base}"
user = "crm@acme.example"
poll_interval = "1h"
access_token = "{ACCESS_TOKEN}"
"#,
            base = api.base_url()
        ),
    );
    let svc = Service::start(&env);
    svc.wait_health(200, Duration::from_secs(30)).await;
    wait_synced(&svc, "mb-gmail").await;
    wait_synced(&svc, "mb-graph").await;
    assert!(
        env.take("email.inbound", 1, Duration::from_secs(2))
            .await
            .is_empty(),
        "nothing old\n{}",
        svc.log_text()
    );
    // The mirror table shows them with their protocol and the mailbox they read.
    let db = env.db().await;
    let rows = db
        .query(
            "SELECT id, protocol, host, username, folder, idle FROM mailboxes ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    let mirror: Vec<(String, String, String, String, String, bool)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
        .collect();
    let row = |id: &str, protocol: &str, folder: &str| {
        (
            id.to_string(),
            protocol.to_string(),
            "127.0.0.1".to_string(),
            "crm@acme.example".to_string(),
            folder.to_string(),
            false,
        )
    };
    assert_eq!(
        mirror,
        [
            row("mb-gmail", "gmail_api", "INBOX"),
            row("mb-graph", "ms_graph", "inbox")
        ]
    );
    // Nothing was downloaded either.
    assert!(
        !api.requests()
            .iter()
            .any(|r| r.target.contains("format=raw") || r.target.contains("$value")),
        "{:#?}",
        api.requests()
    );
    api.gmail_add(&message("g-new@x", "new"), 0);
    api.graph_add(&message("m-new@x", "new"), 0);
    sync_request(&env, "user-gmail").await;
    sync_request(&env, "user-graph").await;
    let got = take_exactly(
        &env,
        &svc,
        2,
        Duration::from_secs(10),
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(ids(&got), ["g-new@x", "m-new@x"]);
    // The user address is in the paths.
    assert!(api
        .requests()
        .iter()
        .any(|r| r.target.starts_with("/gmail/v1/users/crm%40acme.example/")));
    assert!(api
        .requests()
        .iter()
        .any(|r| r.target.starts_with("/v1.0/users/crm%40acme.example/")));

    // The API failing (503 with Retry-After): the mailbox shows down with the API's error
    // and the endpoint, never the mailbox's address; then it recovers and the mail comes once.
    api.fail_next(&[503, 503, 503]);
    api.gmail_add(&message("g-late@x", "late"), 0);
    sync_request(&env, "user-gmail").await;
    let start = Instant::now();
    let down = loop {
        let (_, h) = svc.get_json("/health").await;
        let mb = h["components"]["mailboxes"]["mb-gmail"].clone();
        if mb["status"] == "down" {
            break mb;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{h}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let error = down["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("503"), "{down}");
    assert!(
        !error.contains("crm@acme.example") && !error.contains("crm%40"),
        "{down}"
    );
    assert_eq!(down["endpoint"], api.base_url(), "{down}");
    let got = take_exactly(
        &env,
        &svc,
        1,
        Duration::from_secs(20),
        Duration::from_secs(1),
    )
    .await;
    assert_eq!(got[0]["message_id"], "g-late@x");
    let start = Instant::now();
    loop {
        let (_, h) = svc.get_json("/health").await;
        if h["components"]["mailboxes"]["mb-gmail"]["status"] == "ok" {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{h}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A message over `max_message_bytes` (and a large one under it), from either API: the large
/// one published, the oversized one dead-lettered with its exact bytes stored, its key recorded
/// so a re-list does not dead-letter it again.
#[tokio::test]
async fn oversized_api_messages_are_dead_lettered_with_their_bytes() {
    let env = TestEnv::new("api-big");
    env.write_config("[inbound]\nmax_message_bytes = 300000\nfetch_batch_bytes = 200000\n");
    let api = MailApiServer::start(10).await;
    let big = |id: &str, size: usize| {
        let mut m = message(id, &format!("big {id}"));
        let line = "0123456789abcdef".repeat(4) + "\r\n";
        while m.len() < size {
            m.extend_from_slice(line.as_bytes());
        }
        m
    };
    let g_big = big("g-big@x", 250_000);
    let g_huge = big("g-huge@x", 1_200_000);
    let m_big = big("m-big@x", 250_000);
    let m_huge = big("m-huge@x", 1_200_000);
    api.gmail_add(&g_big, 60);
    api.gmail_add(&g_huge, 60);
    api.graph_add(&m_big, 60);
    api.graph_add(&m_huge, 60);
    env.write_tenant(
        "acme.toml",
        &format!(
            r#"
id = "acme"
[[providers]]
id = "acme-provider"
kind = "file"
dir = "sent-acme"

[[mailboxes]]
id = "mb-gmail"
user_id = "user-gmail"
provider_id = "acme-provider"
protocol = "gmail_api"
base_url = "{base}"
initial_sync = "all"
poll_interval = "1h"
access_token = "{ACCESS_TOKEN}"

[[mailboxes]]
id = "mb-graph"
user_id = "user-graph"
provider_id = "acme-provider"
protocol = "ms_graph"
base_url = "{base}"
initial_sync = "all"
poll_interval = "1h"
access_token = "{ACCESS_TOKEN}"
"#,
            base = api.base_url()
        ),
    );
    let svc = Service::start(&env);
    svc.wait_health(200, Duration::from_secs(30)).await;
    let got = take_exactly(
        &env,
        &svc,
        2,
        Duration::from_secs(20),
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(ids(&got), ["g-big@x", "m-big@x"]);
    let dead = env
        .take("email.inbound.dlq", 2, Duration::from_secs(10))
        .await;
    assert_eq!(dead.len(), 2, "{dead:#?}\n{}", svc.log_text());
    for (key, raw) in [("mid:g-huge@x", &g_huge), ("mid:m-huge@x", &m_huge)] {
        let d = dead
            .iter()
            .find(|d| d["dedup_key"] == key)
            .unwrap_or_else(|| panic!("{key} dead-lettered: {dead:#?}"));
        assert_eq!(d["size"], raw.len() as u64, "{d}");
        assert!(d["error"].as_str().unwrap().contains("max_message_bytes"));
        let id = d["raw_id"].as_str().unwrap();
        let stored = env.stored_blob(id).await.expect("the raw bytes are stored");
        assert!(stored == *raw, "the stored bytes are the message's");
    }
    // Expired positions: both folders are listed again; nothing is published or
    // dead-lettered twice.
    api.gmail_expire_history();
    api.graph_expire_tokens();
    sync_request(&env, "user-gmail").await;
    sync_request(&env, "user-graph").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(env
        .take("email.inbound", 1, Duration::from_millis(500))
        .await
        .is_empty());
    assert!(env
        .take("email.inbound.dlq", 1, Duration::from_millis(500))
        .await
        .is_empty());
}

const CLIENT: &str = "client-1";
const CLIENT_SECRET: &str = "client-secret-1";
const REFRESH: &str = "1//configured-refresh-token";

#[tokio::test]
async fn an_oauth2_api_mailbox_renews_after_a_401_and_a_revoked_one_is_down_without_polling() {
    let env = TestEnv::new("api-oauth");
    let server = TokenServer::start(CLIENT, CLIENT_SECRET, REFRESH, "crm@acme.example");
    let api = MailApiServer::start(50).await;
    api.accept_bearer(server.active_check());
    api.graph_add(&message("o-1@x", "first"), 60);
    let oauth2 = format!(
        r#"
[mailboxes.oauth2]
kind = "custom"
client_id = "{CLIENT}"
client_secret = "{CLIENT_SECRET}"
refresh_token_env = "MB_TEST_REFRESH"
token_url = "{}"
"#,
        server.token_url()
    );
    tenant(
        &env,
        "ms_graph",
        &api.base_url(),
        "initial_sync = \"all\"\npoll_interval = \"1s\"",
        &oauth2,
    );
    let svc = Service::start_with(&env, &[("MB_TEST_REFRESH", REFRESH)]);
    svc.wait_health(200, Duration::from_secs(30)).await;
    let got = take_exactly(
        &env,
        &svc,
        1,
        Duration::from_secs(20),
        Duration::from_secs(1),
    )
    .await;
    assert_eq!(got[0]["message_id"], "o-1@x");
    assert_eq!(server.token_requests(), 1);

    // Expired at the server: the API answers 401, the fetcher renews once and goes on.
    server.expire_access_tokens();
    api.graph_add(&message("o-2@x", "second"), 0);
    let got = take_exactly(
        &env,
        &svc,
        1,
        Duration::from_secs(15),
        Duration::from_secs(1),
    )
    .await;
    assert_eq!(got[0]["message_id"], "o-2@x");
    assert_eq!(server.token_requests(), 2, "{}", svc.log_text());
    assert!(api.requests().iter().any(|r| r.status == 401));

    // Revoked: down with "re-authorize", and no more requests to the API or token endpoint.
    server.revoke_all();
    server.expire_access_tokens();
    let start = Instant::now();
    loop {
        let (_, h) = svc.get_json("/health").await;
        let mb = &h["components"]["mailboxes"]["mb-ms_graph"];
        if mb["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("re-authorize"))
        {
            assert_eq!(mb["status"], "down", "{h}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{h}\n{}",
            svc.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let requests = api.requests().len();
    let asked = server.token_requests();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(api.requests().len(), requests, "no polling");
    assert_eq!(server.token_requests(), asked, "no refresh loop");
    let log = svc.log_text();
    assert!(!log.contains(REFRESH) && !log.contains(CLIENT_SECRET));
}

fn load(tag: &str, tenant: &str) -> Result<mailbridge::settings::Settings, Vec<String>> {
    let dir = std::env::temp_dir().join(format!("mbtest-api-config-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("tenants.d")).unwrap();
    std::fs::write(dir.join("mailbridge.toml"), "").unwrap();
    std::fs::write(dir.join("tenants.d/acme.toml"), tenant).unwrap();
    let env = std::collections::BTreeMap::from([("TOKEN".to_string(), "t0k3n".to_string())]);
    mailbridge::settings::Settings::load_with_env(&dir.join("mailbridge.toml"), &env).map_err(|e| {
        e.0.iter()
            .map(|p| format!("{} {}", p.key, p.message))
            .collect()
    })
}

const PROVIDER: &str =
    "id = \"acme\"\n[[providers]]\nid = \"p\"\nkind = \"file\"\ndir = \"sent\"\n";

#[test]
fn api_mailboxes_have_their_defaults_and_their_keys_checked() {
    let ok = load(
        "ok",
        &format!(
            "{PROVIDER}
[[mailboxes]]
id = \"g\"
user_id = \"u\"
provider_id = \"p\"
protocol = \"gmail_api\"
access_token_env = \"TOKEN\"

[[mailboxes]]
id = \"m\"
user_id = \"u\"
provider_id = \"p\"
protocol = \"ms_graph\"
user = \"sales@acme.example\"
access_token = \"x\"
"
        ),
    )
    .unwrap_or_else(|e| panic!("{e:#?}"));
    let m = &ok.tenants[0].mailboxes;
    let gmail = m[0].api.as_ref().unwrap();
    assert_eq!(gmail.base_url, "https://gmail.googleapis.com");
    assert_eq!(gmail.user, "me");
    assert_eq!(gmail.access_token.as_ref().unwrap().expose(), "t0k3n");
    assert_eq!(m[0].folder, "INBOX");
    let graph = m[1].api.as_ref().unwrap();
    assert_eq!(graph.base_url, "https://graph.microsoft.com");
    assert_eq!(graph.user, "sales@acme.example");
    assert_eq!(m[1].folder, "inbox");
    assert_eq!(m[1].host, "graph.microsoft.com");
    assert!(m[0].fingerprint() != m[1].fingerprint());

    let problems = load(
        "bad",
        &format!(
            "{PROVIDER}
[[mailboxes]]
id = \"a\"
user_id = \"u\"
provider_id = \"p\"
protocol = \"gmail_api\"
host = \"imap.gmail.com\"
port = 993
delete_after_fetch = true

[[mailboxes]]
id = \"b\"
user_id = \"u\"
provider_id = \"p\"
protocol = \"ms_graph\"
base_url = \"ftp://x\"
user = \"a b\"
access_token = \"x\"
[mailboxes.oauth2]
kind = \"microsoft\"
client_id = \"c\"
refresh_token = \"r\"

[[mailboxes]]
id = \"c\"
user_id = \"u\"
provider_id = \"p\"
protocol = \"imap\"
host = \"imap.example.com\"
username = \"x\"
password = \"y\"
access_token = \"z\"

[[mailboxes]]
id = \"d\"
user_id = \"u\"
provider_id = \"p\"
protocol = \"pop3\"
host = \"pop.example.com\"
password = \"y\"

[[mailboxes]]
id = \"e\"
user_id = \"u\"
provider_id = \"p\"
protocol = \"gmail_api\"
access_token = \"x\"
access_token_env = \"TOKEN\"
"
        ),
    )
    .expect_err("refused");
    let has = |key: &str, words: &str| {
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with(key) && p.contains(words)),
            "no problem `{key}` … `{words}` in {problems:#?}"
        )
    };
    has("mailboxes[0].host", "no `host`");
    has(
        "mailboxes[0].oauth2",
        "needs an `oauth2` account or `access_token`",
    );
    has("mailboxes[1].base_url", "not an http(s) URL");
    has("mailboxes[1].user", "`me` or an email address");
    has("mailboxes[1].oauth2", "not both");
    has("mailboxes[2].access_token", "gmail_api");
    has("mailboxes[0].port", "IMAP and POP3");
    has(
        "mailboxes[0].delete_after_fetch",
        "leaves the mail where it is",
    );
    has("mailboxes[3].username", "required for a `pop3` mailbox");
    has(
        "mailboxes[4].access_token",
        "give only one of `access_token`, `access_token_env`",
    );
}

/// Migration 0006 turns the IMAP/POP3 positions of the old columns into JSON cursors, and
/// `intake::record` keeps the IMAP rule (forward only within one UIDVALIDITY) in the JSON.
#[tokio::test]
async fn old_positions_become_json_cursors_and_imap_ones_only_move_forward() {
    use mailbridge::intake::{self, MailboxCursor};
    let env = TestEnv::new("cursor-migration");
    let settings = mailbridge::settings::Settings::load(&env.config_path()).expect("config");
    mailbridge::storage::migrate(&settings.database)
        .await
        .expect("migrated");
    let db = env.db().await;
    // Back to the schema before 0006, with rows an IMAP and a POP3 mailbox wrote then.
    db.batch_execute(
        "DELETE FROM schema_migrations WHERE version = 6;
         DROP TABLE mailbox_state;",
    )
    .await
    .unwrap();
    db.batch_execute(mailbridge::storage::MIGRATIONS[1].2)
        .await
        .unwrap();
    db.batch_execute(
        "INSERT INTO mailbox_state (mailbox_id, uidvalidity, last_uid)
         VALUES ('mb-imap', 1700000001, 42), ('mb-pop3', 0, 0)",
    )
    .await
    .unwrap();
    mailbridge::storage::migrate(&settings.database)
        .await
        .expect("0006 applied");
    let rows = db
        .query(
            "SELECT mailbox_id, cursor FROM mailbox_state ORDER BY mailbox_id",
            &[],
        )
        .await
        .unwrap();
    let cursors: Vec<(String, serde_json::Value)> =
        rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        cursors,
        [
            (
                "mb-imap".to_string(),
                serde_json::json!({"kind": "imap", "uidvalidity": 1700000001u32, "last_uid": 42})
            ),
            (
                "mb-pop3".to_string(),
                serde_json::json!({"kind": "imap", "uidvalidity": 0, "last_uid": 0})
            ),
        ]
    );
    let pool = mailbridge::storage::pool(&settings.database).unwrap();
    let imap = |uidvalidity, last_uid| MailboxCursor::Imap {
        uidvalidity,
        last_uid,
    };
    assert_eq!(
        intake::cursor(&pool, "mb-imap").await.unwrap(),
        Some(imap(1700000001, 42))
    );
    // A POP3 mailbox reads any cursor as "first contact done".
    assert!(intake::cursor(&pool, "mb-pop3").await.unwrap().is_some());
    // Forward only within one UIDVALIDITY; a new UIDVALIDITY starts over.
    intake::record(&pool, "mb-imap", &[], Some(&imap(1700000001, 40)), None)
        .await
        .unwrap();
    assert_eq!(
        intake::cursor(&pool, "mb-imap").await.unwrap(),
        Some(imap(1700000001, 42))
    );
    intake::record(&pool, "mb-imap", &[], Some(&imap(1700000001, 50)), None)
        .await
        .unwrap();
    assert_eq!(
        intake::cursor(&pool, "mb-imap").await.unwrap(),
        Some(imap(1700000001, 50))
    );
    intake::record(&pool, "mb-imap", &[], Some(&imap(9, 3)), None)
        .await
        .unwrap();
    assert_eq!(
        intake::cursor(&pool, "mb-imap").await.unwrap(),
        Some(imap(9, 3))
    );
    // Fencing: only the holder of the mailbox's current lease token moves its position; a
    // stale holder's keys are still recorded.
    let leases = ["mb-imap".to_string()];
    let held = mailbridge::leases::acquire(&pool, "node-1", &leases, Duration::from_secs(30))
        .await
        .unwrap();
    let first = mailbridge::leases::Lease {
        owner: "node-1".into(),
        token: held["mb-imap"],
    };
    mailbridge::leases::release(&pool, "node-1", &leases)
        .await
        .unwrap();
    let taken = mailbridge::leases::acquire(&pool, "node-2", &leases, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(taken["mb-imap"], first.token + 1);
    let stale = intake::record(
        &pool,
        "mb-imap",
        &[intake::Record::new(
            "fenced-key".into(),
            intake::Outcome::Published,
        )],
        Some(&imap(9, 99)),
        Some(&first),
    )
    .await;
    assert!(
        matches!(stale, Err(mailbridge::storage::StorageError::Fenced(_))),
        "{stale:?}"
    );
    assert_eq!(
        intake::cursor(&pool, "mb-imap").await.unwrap(),
        Some(imap(9, 3))
    );
    assert_eq!(
        intake::known(&pool, "mb-imap", &["fenced-key".to_string()])
            .await
            .unwrap()
            .len(),
        1
    );
    let current = mailbridge::leases::Lease {
        owner: "node-2".into(),
        token: taken["mb-imap"],
    };
    intake::record(&pool, "mb-imap", &[], Some(&imap(9, 99)), Some(&current))
        .await
        .unwrap();
    assert_eq!(
        intake::cursor(&pool, "mb-imap").await.unwrap(),
        Some(imap(9, 99))
    );
    // API cursors are replaced by the next one.
    let gmail = |h: &str| MailboxCursor::GmailApi {
        history_id: h.into(),
        floor: Some(1),
    };
    intake::record(&pool, "mb-g", &[], Some(&gmail("200")), None)
        .await
        .unwrap();
    intake::record(&pool, "mb-g", &[], Some(&gmail("180")), None)
        .await
        .unwrap();
    assert_eq!(
        intake::cursor(&pool, "mb-g").await.unwrap(),
        Some(gmail("180"))
    );
    // A cursor this version cannot read is an error saying what to do — not "no cursor",
    // which would start over by initial_sync and could skip mail.
    db.execute(
        "UPDATE mailbox_state SET cursor = '{\"kind\": \"future\"}' WHERE mailbox_id = 'mb-g'",
        &[],
    )
    .await
    .unwrap();
    let e = intake::cursor(&pool, "mb-g").await.unwrap_err().to_string();
    assert!(
        e.contains("mb-g") && e.contains("cannot be read") && e.contains("delete its row"),
        "{e}"
    );
}

/// A message the API will not give (every download 400) does not stop its mailbox: the
/// messages around it are published, it is dead-lettered after a few tries with the API's
/// answer, and nothing repeats.
#[tokio::test]
async fn an_api_message_that_cannot_be_downloaded_is_dead_lettered_and_the_rest_published() {
    let env = TestEnv::new("api-poison");
    let api = MailApiServer::start(10).await;
    api.gmail_add(&message("before@x", "before"), 60);
    let poisoned = api.gmail_add(&message("poison@x", "poison"), 60);
    api.gmail_add(&message("after@x", "after"), 60);
    api.poison(&poisoned);
    env.write_tenant(
        "acme.toml",
        &format!(
            r#"
id = "acme"
[[providers]]
id = "acme-provider"
kind = "file"
dir = "sent-acme"

[[mailboxes]]
id = "mb-gmail"
user_id = "user-gmail"
provider_id = "acme-provider"
protocol = "gmail_api"
base_url = "{base}"
initial_sync = "all"
poll_interval = "1s"
access_token = "{ACCESS_TOKEN}"
"#,
            base = api.base_url()
        ),
    );
    let svc = Service::start(&env);
    svc.wait_health(200, Duration::from_secs(30)).await;
    let dead = env
        .take("email.inbound.dlq", 1, Duration::from_secs(60))
        .await;
    assert_eq!(dead.len(), 1, "{}", svc.log_text());
    let error = dead[0]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("cannot be downloaded") && error.contains("400"),
        "{}",
        dead[0]
    );
    let got = take_exactly(
        &env,
        &svc,
        2,
        Duration::from_secs(20),
        Duration::from_secs(4),
    )
    .await;
    let mut got = ids(&got);
    got.sort();
    assert_eq!(got, ["after@x", "before@x"]);
    // Polls go on; the poisoned message is not downloaded again, nothing repeats.
    let asked = api
        .requests()
        .iter()
        .filter(|r| r.target.contains(&poisoned))
        .count();
    assert_eq!(asked, 3, "downloads of the poisoned message");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        api.requests()
            .iter()
            .filter(|r| r.target.contains(&poisoned))
            .count(),
        3
    );
    assert!(env
        .take("email.inbound.dlq", 1, Duration::from_millis(500))
        .await
        .is_empty());
}
