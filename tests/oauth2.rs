//! OAuth2 accounts against a token stand-in (`common::token_server`), the real PostgreSQL,
//! the test SMTP server (XOAUTH2 checked by introspection) and a real Dovecot with an oauth2
//! passdb: the token life cycle (renewal ahead of expiry, single flight, renewal after a
//! refusal, rotation kept encrypted across registries, invalid_grant remembered), then end to
//! end through the binary.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::token_server::TokenServer;
use common::{guide_request, Dovecot, Service, SmtpServer, TestEnv};
use mailbridge::credentials::CredentialError;
use mailbridge::oauth2::{Accounts, OAuth2Config, OAuth2Kind};
use mailbridge::settings::{Secret, Settings};

const CLIENT: &str = "client-1";
const CLIENT_SECRET: &str = "client-secret-1";
const REFRESH: &str = "1//configured-refresh-token";
const USER: &str = "crm@acme.example";

fn config(server: &TokenServer, refresh_token: &str) -> OAuth2Config {
    OAuth2Config {
        kind: OAuth2Kind::Custom,
        client_id: CLIENT.into(),
        client_secret: Some(Secret::new(CLIENT_SECRET)),
        refresh_token: Secret::new(refresh_token),
        token_url: url::Url::parse(&server.token_url()).unwrap(),
        scope: None,
    }
}

/// A registry as a service process has it: this env's database (migrated) and a key file.
async fn registry(env: &TestEnv) -> (Arc<Accounts>, deadpool_postgres::Pool) {
    let settings = Settings::load(&env.config_path()).expect("config");
    mailbridge::storage::create_database_if_missing(&settings.database)
        .await
        .expect("database");
    mailbridge::storage::migrate(&settings.database)
        .await
        .expect("migrated");
    let pool = mailbridge::storage::pool(&settings.database).unwrap();
    let accounts = Arc::new(Accounts::new(
        Some(pool.clone()),
        env.dir.join("var").join(mailbridge::oauth2::KEY_FILE),
    ));
    (accounts, pool)
}

#[tokio::test]
async fn tokens_are_renewed_ahead_of_expiry_once_for_many_callers_and_after_a_refusal() {
    let env = TestEnv::new("oauth-life");
    let server = TokenServer::start(CLIENT, CLIENT_SECRET, REFRESH, USER);
    let (accounts, _pool) = registry(&env).await;
    let account = accounts.account("provider:p1", &config(&server, REFRESH));

    // Single flight: 20 callers at once while the endpoint is slow make one request.
    server.set_delay(Duration::from_millis(300));
    let calls = (0..20).map(|_| {
        let a = account.clone();
        async move { a.token().await }
    });
    let tokens = futures_util::future::join_all(calls).await;
    let first = tokens[0].as_ref().expect("a token").clone();
    assert!(tokens.iter().all(|t| t.as_ref().ok() == Some(&first)));
    assert_eq!(server.token_requests(), 1);
    server.set_delay(Duration::ZERO);

    // Cached while it has more than 60 s left.
    assert_eq!(account.token().await.unwrap(), first);
    assert_eq!(server.token_requests(), 1);

    // A refusal renews it once.
    account.refused(&first);
    let second = account.token().await.unwrap();
    assert_ne!(second, first);
    assert!(server.is_active(second.expose()));
    assert_eq!(server.token_requests(), 2);
    assert_eq!(account.token().await.unwrap(), second);
    assert_eq!(server.token_requests(), 2);

    // Ahead of expiry: a token living 4 s is renewed at half its life (one living longer
    // than two minutes with 60 s left; see the unit test of `renew_after`), before it expires.
    server.set_expires_in(4);
    account.refused(&second);
    let short = account.token().await.unwrap();
    assert_eq!(server.token_requests(), 3);
    assert_eq!(account.token().await.unwrap(), short, "still 4 s left");
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let renewed = account.token().await.unwrap();
    assert_ne!(renewed, short);
    assert!(
        server.is_active(short.expose()),
        "renewed before it expired"
    );
    assert_eq!(server.token_requests(), 4);

    // The same configuration gets the same account (its cache); another configuration a
    // fresh one.
    let again = accounts.account("provider:p1", &config(&server, REFRESH));
    assert!(Arc::ptr_eq(&again, &account));
    server.add_refresh_token("1//other", USER);
    let other = accounts.account("provider:p1", &config(&server, "1//other"));
    assert!(!Arc::ptr_eq(&other, &account));

    // Nothing secret in Debug.
    let shown = format!("{account:?} {:?}", config(&server, REFRESH));
    for secret in [REFRESH, CLIENT_SECRET, renewed.expose()] {
        assert!(!shown.contains(secret), "{shown}");
    }
}

#[tokio::test]
async fn rotated_refresh_tokens_are_stored_encrypted_and_used_by_a_new_process() {
    let env = TestEnv::new("oauth-rotate");
    let server = TokenServer::start(CLIENT, CLIENT_SECRET, REFRESH, USER);
    server.set_rotate(true);
    let (accounts, pool) = registry(&env).await;
    let account = accounts.account("provider:p1", &config(&server, REFRESH));
    account.token().await.expect("a token");
    // The configured refresh token was used, and replaced by the rotated one.
    assert_eq!(server.presented(), [REFRESH]);
    let rotated = server.valid_refresh_tokens();
    assert_eq!(rotated.len(), 1);
    assert_ne!(rotated[0], REFRESH);

    let db = pool.get().await.unwrap();
    let row = db
        .query_one(
            "SELECT sealed, configured_mac FROM oauth2_tokens WHERE account = 'provider:p1'",
            &[],
        )
        .await
        .expect("the rotated token is stored");
    let sealed: Vec<u8> = row.get(0);
    let mac: Vec<u8> = row.get(1);
    for stored in [&sealed, &mac] {
        for clear in [rotated[0].as_bytes(), REFRESH.as_bytes()] {
            assert!(
                !stored.windows(clear.len()).any(|w| w == clear),
                "a refresh token is stored in clear"
            );
        }
    }

    // A new process (another registry, same database and key file) uses the stored token:
    // the configured one no longer works at the endpoint.
    let (accounts2, _) = registry(&env).await;
    let account2 = accounts2.account("provider:p1", &config(&server, REFRESH));
    account2
        .token()
        .await
        .expect("a token from the stored refresh token");
    assert_eq!(server.presented().last(), Some(&rotated[0]));

    // A refresh token changed in the configuration supersedes the stored one.
    server.add_refresh_token("1//reauthorized", USER);
    let (accounts3, _) = registry(&env).await;
    let account3 = accounts3.account("provider:p1", &config(&server, "1//reauthorized"));
    account3
        .token()
        .await
        .expect("a token from the new configured token");
    assert_eq!(
        server.presented().last().map(String::as_str),
        Some("1//reauthorized")
    );
}

#[tokio::test]
async fn two_instances_refresh_one_at_a_time_and_share_the_rotated_token() {
    let env = TestEnv::new("oauth-instances");
    let server = TokenServer::start(CLIENT, CLIENT_SECRET, REFRESH, USER);
    // Strict rotation: a refresh token works once, so two instances refreshing with the same
    // one at once would make the second fail with invalid_grant.
    server.set_rotate(true);
    server.set_delay(Duration::from_millis(300));
    let (a, _) = registry(&env).await;
    let (b, _) = registry(&env).await;
    let in_a = a.account("provider:p1", &config(&server, REFRESH));
    let in_b = b.account("provider:p1", &config(&server, REFRESH));
    let calls = (0..10).map(|i| {
        let acc = if i % 2 == 0 {
            in_a.clone()
        } else {
            in_b.clone()
        };
        async move { acc.token().await }
    });
    let tokens = futures_util::future::join_all(calls).await;
    for t in &tokens {
        assert!(t.is_ok(), "{t:?}");
    }
    // One refresh per instance, the second with the token the first rotated.
    assert_eq!(server.token_requests(), 2);
    let presented = server.presented();
    assert_eq!(presented[0], REFRESH);
    assert_ne!(presented[1], REFRESH);
}

#[tokio::test]
async fn invalid_grant_is_permanent_and_asked_once_while_outages_are_transient() {
    let env = TestEnv::new("oauth-revoked");
    let server = TokenServer::start(CLIENT, CLIENT_SECRET, REFRESH, USER);
    let (accounts, _pool) = registry(&env).await;
    let account = accounts.account("mailbox:m1", &config(&server, REFRESH));

    server.set_failing(true);
    match account.token().await {
        Err(CredentialError::Unavailable { detail, .. }) => {
            assert!(detail.contains("503"), "{detail}")
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    server.set_failing(false);
    // For a moment the failure stands for every caller (no refresh each, in turn)…
    assert!(matches!(
        account.token().await,
        Err(CredentialError::Unavailable { .. })
    ));
    assert_eq!(server.token_requests(), 1);
    // …then the next caller asks again.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    account
        .token()
        .await
        .expect("works once the endpoint is back");

    // Unreachable: transient too, and the error names the endpoint without any secret.
    let mut closed = config(&server, REFRESH);
    let port = common::free_port();
    closed.token_url = url::Url::parse(&format!("http://127.0.0.1:{port}/token?k=v")).unwrap();
    match accounts.account("mailbox:m2", &closed).token().await {
        Err(CredentialError::Unavailable { detail, .. }) => {
            assert!(
                detail.contains(&format!("127.0.0.1:{port}/token")),
                "{detail}"
            );
            for secret in [REFRESH, CLIENT_SECRET, "k=v"] {
                assert!(!detail.contains(secret), "{detail}");
            }
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert_eq!(server.token_requests(), 2);

    server.revoke_all();
    let token = account.token().await.unwrap();
    account.refused(&token);
    let started = Instant::now();
    for _ in 0..5 {
        let e = account.token().await.expect_err("revoked");
        assert!(matches!(e, CredentialError::Reauthorize { .. }), "{e:?}");
        let text = e.to_string();
        assert!(text.contains("re-authorize"), "{text}");
        assert!(!text.contains(REFRESH) && !text.contains(CLIENT_SECRET));
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(server.token_requests(), 3, "invalid_grant is asked once");
}

fn oauth2_table(server: &TokenServer, table: &str, refresh_env: &str) -> String {
    format!(
        r#"
[{table}.oauth2]
kind = "custom"
client_id = "{CLIENT}"
client_secret = "{CLIENT_SECRET}"
refresh_token_env = "{refresh_env}"
token_url = "{}"
"#,
        server.token_url()
    )
}

const TENANT: &str = "01996243-2d8c-726d-a5c2-81b7005ce9a2";
const PROVIDER: &str = "0198a819-e5d3-703a-a39a-1b77e3ece687";

#[tokio::test]
async fn smtp_xoauth2_sends_renews_a_refused_token_and_dead_letters_a_revoked_account() {
    let env = TestEnv::new("oauth-smtp");
    let server = TokenServer::start(CLIENT, CLIENT_SECRET, REFRESH, USER);
    let mut smtp = SmtpServer::start(
        &env.dir.join("smtp"),
        &[
            "--auth",
            &format!("{USER}:not-a-token"),
            "--oauth-introspect",
            &server.introspection_url(),
        ],
    );
    env.smtp_tenant(
        TENANT,
        PROVIDER,
        smtp.port,
        &format!(
            "username = \"{USER}\"\n{}",
            oauth2_table(&server, "providers", "MB_TEST_REFRESH")
        ),
    );
    let svc = Service::start_with(&env, &[("MB_TEST_REFRESH", REFRESH)]);
    svc.wait_health(200, Duration::from_secs(30)).await;

    let send = |id: &str| serde_json::to_vec(&guide_request(TENANT, PROVIDER, id, None)).unwrap();
    env.publish("email.send", &send("oauth-1")).await;
    let mails = smtp.wait_for(1, Duration::from_secs(15)).await;
    assert_eq!(mails.len(), 1, "{}", svc.log_text());
    assert_eq!(server.token_requests(), 1);

    // The server stops accepting the cached token (expired early): renewed once, delivered.
    server.expire_access_tokens();
    // A new session authenticates (the idle one may be reused otherwise).
    tokio::time::sleep(Duration::from_millis(100)).await;
    smtp.restart();
    env.publish("email.send", &send("oauth-2")).await;
    let mails = smtp.wait_for(2, Duration::from_secs(15)).await;
    assert_eq!(mails.len(), 2, "{}", svc.log_text());
    assert_eq!(server.token_requests(), 2);
    let results = env
        .take("email.send.result", 2, Duration::from_secs(10))
        .await;
    assert!(results.iter().all(|r| r["status"] == "sent"), "{results:?}");

    // Revoked: the next refusal finds invalid_grant; the email is dead-lettered, permanent.
    server.revoke_all();
    smtp.restart();
    env.publish("email.send", &send("oauth-3")).await;
    let dead = env.take("email.send.dlq", 1, Duration::from_secs(20)).await;
    assert_eq!(dead.len(), 1, "{}", svc.log_text());
    let error = dead[0]["error"].as_str().unwrap_or_default();
    assert!(error.contains("re-authorize"), "{}", dead[0]);
    let results = env
        .take("email.send.result", 1, Duration::from_secs(10))
        .await;
    assert_eq!(results[0]["error_class"], "permanent", "{results:?}");
    // A second email does not ask the token endpoint again.
    let asked = server.token_requests();
    env.publish("email.send", &send("oauth-4")).await;
    let dead = env.take("email.send.dlq", 1, Duration::from_secs(20)).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(server.token_requests(), asked);
    let (_, health) = svc.get_json("/health").await;
    let provider = &health["components"]["providers"][PROVIDER];
    assert_eq!(provider["status"], "down", "{health}");
    assert!(
        provider["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("re-authorize"),
        "{health}"
    );
    let log = svc.log_text();
    assert!(
        !log.contains(REFRESH) && !log.contains(CLIENT_SECRET) && !log.contains("standin-secret")
    );
    assert!(!health.to_string().contains(REFRESH));
}

#[tokio::test]
async fn a_rotated_refresh_token_outlives_the_service_process() {
    let env = TestEnv::new("oauth-restart");
    let server = TokenServer::start(CLIENT, CLIENT_SECRET, REFRESH, USER);
    server.set_rotate(true);
    let smtp = SmtpServer::start(
        &env.dir.join("smtp"),
        &[
            "--auth",
            &format!("{USER}:not-a-token"),
            "--oauth-introspect",
            &server.introspection_url(),
        ],
    );
    env.smtp_tenant(
        TENANT,
        PROVIDER,
        smtp.port,
        &format!(
            "username = \"{USER}\"\n{}",
            oauth2_table(&server, "providers", "MB_TEST_REFRESH")
        ),
    );
    let send = |id: &str| serde_json::to_vec(&guide_request(TENANT, PROVIDER, id, None)).unwrap();
    let mut svc = Service::start_with(&env, &[("MB_TEST_REFRESH", REFRESH)]);
    svc.wait_health(200, Duration::from_secs(30)).await;
    env.publish("email.send", &send("rotate-1")).await;
    assert_eq!(
        smtp.wait_for(1, Duration::from_secs(15)).await.len(),
        1,
        "{}",
        svc.log_text()
    );
    assert_eq!(server.presented(), [REFRESH]);
    let rotated = server.valid_refresh_tokens();
    assert_eq!(rotated.len(), 1);
    svc.terminate(Duration::from_secs(30));

    // The configured refresh token no longer works at the endpoint: the new process must use
    // the one the first stored (encrypted).
    let db = env.db().await;
    let sealed: Vec<u8> = db
        .query_one("SELECT sealed FROM oauth2_tokens", &[])
        .await
        .expect("a stored token")
        .get(0);
    assert!(!sealed
        .windows(rotated[0].len())
        .any(|w| w == rotated[0].as_bytes()));
    let svc = Service::start_with(&env, &[("MB_TEST_REFRESH", REFRESH)]);
    svc.wait_health(200, Duration::from_secs(30)).await;
    env.publish("email.send", &send("rotate-2")).await;
    assert_eq!(
        smtp.wait_for(2, Duration::from_secs(15)).await.len(),
        2,
        "{}",
        svc.log_text()
    );
    assert_eq!(server.presented().len(), 2);
    assert_eq!(server.presented()[1], rotated[0]);
    assert!(!svc.log_text().contains(&rotated[0]));
}

const PW: &str = "dovecot-password";

/// Cuts `user`'s IMAP sessions (a restarted Dovecot leaves them running): the fetcher logs
/// in again.
fn kick(dovecot: &Dovecot, user: &str) {
    let out = std::process::Command::new("doveadm")
        .arg("-c")
        .arg(dovecot.dir.join("dovecot.conf"))
        .args(["kick", user])
        .output()
        .expect("doveadm runs");
    assert!(
        out.status.success() || String::from_utf8_lossy(&out.stdout).contains("kicked"),
        "doveadm kick: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn an_imap_mailbox_with_xoauth2_syncs_and_a_revoked_one_is_down_without_polling() {
    let env = TestEnv::new("oauth-imap");
    let server = TokenServer::start(CLIENT, CLIENT_SECRET, REFRESH, "alice");
    let dovecot = Dovecot::start_oauth2(
        &env.dir.join("dovecot"),
        &[("alice", PW)],
        &server.introspection_url(),
    );
    // A mailbox tenant without a password: the oauth2 table instead.
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
id = "mb-alice"
user_id = "user-alice"
provider_id = "acme-provider"
protocol = "imap"
host = "127.0.0.1"
port = {}
tls = "none"
username = "alice"
idle = false
poll_interval = "1s"
initial_sync = "all"
{}
"#,
            dovecot.imap_port,
            oauth2_table(&server, "mailboxes", "MB_TEST_REFRESH")
        ),
    );
    dovecot.append(
        "alice",
        PW,
        "INBOX",
        b"From: John <john@example.com>\r\nTo: crm@acme.example\r\nSubject: hi\r\nMessage-ID: <oauth-imap-1@example.com>\r\n\r\nhello\r\n",
    );
    let svc = Service::start_with(&env, &[("MB_TEST_REFRESH", REFRESH)]);
    svc.wait_health(200, Duration::from_secs(30)).await;
    let got = env.take("email.inbound", 1, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 1, "{}", svc.log_text());
    assert_eq!(got[0]["message_id"], "oauth-imap-1@example.com");
    assert_eq!(server.token_requests(), 1);
    assert!(server.introspections() >= 1, "Dovecot checked the token");

    // Expired at the server: Dovecot refuses it, the fetcher renews once and goes on.
    server.expire_access_tokens();
    kick(&dovecot, "alice");
    dovecot.append(
        "alice",
        PW,
        "INBOX",
        b"From: John <john@example.com>\r\nTo: crm@acme.example\r\nSubject: again\r\nMessage-ID: <oauth-imap-2@example.com>\r\n\r\nagain\r\n",
    );
    let got = env.take("email.inbound", 1, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 1, "{}", svc.log_text());
    assert_eq!(got[0]["message_id"], "oauth-imap-2@example.com");
    assert_eq!(
        server.token_requests(),
        2,
        "{}\n{}",
        svc.log_text(),
        std::fs::read_to_string(dovecot.dir.join("dovecot.log")).unwrap_or_default()
    );

    // Revoked: down in /health with "re-authorize", and no more token requests.
    server.revoke_all();
    kick(&dovecot, "alice");
    let start = Instant::now();
    loop {
        let (_, h) = svc.get_json("/health").await;
        let mb = &h["components"]["mailboxes"]["mb-alice"];
        if mb["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("re-authorize"))
        {
            assert_eq!(mb["status"], "down", "{h}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{h}\n{}",
            svc.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let asked = server.token_requests();
    let introspected = server.introspections();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(server.token_requests(), asked, "no refresh loop");
    assert_eq!(server.introspections(), introspected, "no polling");
    let log = svc.log_text();
    assert!(!log.contains(REFRESH) && !log.contains("standin-secret"));
}

/// Loads a config folder with one tenant file and the given environment.
fn load_tenant(
    tag: &str,
    tenant: &str,
    vars: &[(&str, &str)],
) -> Result<Settings, mailbridge::settings::ConfigError> {
    load_tenant_with_files(tag, tenant, vars, &[])
}

/// Like `load_tenant`, with more files (paths relative to the tenant file) written first.
fn load_tenant_with_files(
    tag: &str,
    tenant: &str,
    vars: &[(&str, &str)],
    files: &[String],
) -> Result<Settings, mailbridge::settings::ConfigError> {
    let dir =
        std::env::temp_dir().join(format!("mbtest-oauth-config-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("tenants.d/secrets")).unwrap();
    std::fs::write(dir.join("mailbridge.toml"), "").unwrap();
    std::fs::write(dir.join("tenants.d/acme.toml"), tenant).unwrap();
    std::fs::write(
        dir.join("tenants.d/secrets/m365-client-secret"),
        "m365-secret\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("tenants.d/secrets/m365-refresh-token"),
        "m365-refresh\n",
    )
    .unwrap();
    for f in files {
        let path = dir.join("tenants.d").join(f);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, "a-secret-from-a-file\n").unwrap();
    }
    let env: std::collections::BTreeMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Settings::load_with_env(&dir.join("mailbridge.toml"), &env)
}

#[test]
fn the_readme_example_loads_with_the_defaults_of_each_kind() {
    let readme = include_str!("../README.md");
    let section = readme
        .split("## OAuth2 accounts")
        .nth(1)
        .expect("the README has an OAuth2 accounts section");
    let example = section
        .split("```toml\n")
        .nth(1)
        .and_then(|s| s.split("```").next())
        .expect("a toml example");
    let settings = load_tenant(
        "readme",
        example,
        &[
            ("ACME_GOOGLE_CLIENT_SECRET", "google-secret"),
            ("ACME_GOOGLE_REFRESH_TOKEN", "google-refresh"),
        ],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let tenant = &settings.tenants[0];
    let mailbox = &tenant.mailboxes[0];
    let google = mailbox.oauth2.as_ref().expect("the mailbox's account");
    assert_eq!(google.kind, OAuth2Kind::Google);
    assert_eq!(
        google.token_url.as_str(),
        "https://oauth2.googleapis.com/token"
    );
    assert_eq!(google.refresh_token.expose(), "google-refresh");
    assert!(mailbox.password.is_none());
    let shown = format!("{:?}", tenant.providers);
    assert!(
        shown.contains("Microsoft") || shown.contains("microsoft"),
        "{shown}"
    );
    assert!(shown.contains("login.microsoftonline.com"), "{shown}");
    for secret in [
        "google-secret",
        "google-refresh",
        "m365-secret",
        "m365-refresh",
    ] {
        assert!(!shown.contains(secret), "{shown}");
        assert!(!format!("{mailbox:?}").contains(secret));
    }
    // A changed refresh token changes the fingerprint (the account restarts).
    let other = load_tenant(
        "readme2",
        example,
        &[
            ("ACME_GOOGLE_CLIENT_SECRET", "google-secret"),
            ("ACME_GOOGLE_REFRESH_TOKEN", "google-refresh-2"),
        ],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(
        other.tenants[0].mailboxes[0].fingerprint(),
        mailbox.fingerprint()
    );
    assert_ne!(
        other.tenants[0].providers[0].fingerprint(),
        tenant.providers[0].fingerprint()
    );
    assert_eq!(
        other.tenants[0].providers[1].fingerprint(),
        tenant.providers[1].fingerprint()
    );
}

#[test]
fn oauth2_tables_are_validated_with_their_keys() {
    let tenant = r#"
id = "acme"
[[providers]]
id = "p1"
kind = "smtp"
host = "smtp.example.com"
password = "pw"
[providers.oauth2]
kind = "custom"
client_id = "c"
refresh_token = "r"

[[providers]]
id = "p2"
kind = "smtp"
host = "smtp.example.com"
username = "a@example.com"
[providers.oauth2]
kind = "google"
client_id = "c"
refresh_tokn = "typo"

[[mailboxes]]
id = "m1"
user_id = "u"
provider_id = "p1"
protocol = "pop3"
host = "pop.example.com"
username = "a@example.com"
[mailboxes.oauth2]
kind = "microsoft"
client_id = "c"
refresh_token_env = "UNSET_REFRESH"
"#;
    let problems = load_tenant("bad", tenant, &[]).expect_err("refused").0;
    let keys: Vec<String> = problems
        .iter()
        .map(|p| format!("{} {}", p.key, p.message))
        .collect();
    let has = |key: &str, words: &str| {
        assert!(
            keys.iter().any(|k| k.starts_with(key) && k.contains(words)),
            "no problem `{key}` … `{words}` in {keys:#?}"
        )
    };
    has("providers[0].oauth2.token_url", "custom");
    has("providers[0].oauth2 ", "not both");
    has("providers[0].username", "oauth2");
    has("providers[1].oauth2.refresh_tokn", "unknown field");
    has("mailboxes[0].oauth2 ", "IMAP");
    has("mailboxes[0].oauth2.refresh_token_env", "UNSET_REFRESH");
}

#[tokio::test]
async fn gmail_and_graph_send_with_oauth2_tokens_renewed_after_a_401_and_revocation_dead_letters() {
    use common::api_server::{Api, ApiServer};
    let env = TestEnv::new("oauth-api");
    let server = TokenServer::start(CLIENT, CLIENT_SECRET, REFRESH, USER);
    let api = ApiServer::start().await;
    api.accept_bearer(server.active_check());
    let base = api.base_url();
    env.write_tenant(
        "t.toml",
        &format!(
            r#"
id = "{TENANT}"

[[providers]]
id = "gmail"
kind = "gmail_api"
base_url = "{base}"
{gmail}
[[providers]]
id = "graph"
kind = "ms_graph"
user = "{USER}"
base_url = "{base}"
{graph}"#,
            gmail = oauth2_table(&server, "providers", "MB_TEST_REFRESH"),
            graph = oauth2_table(&server, "providers", "MB_TEST_REFRESH"),
        ),
    );
    let svc = Service::start_with(&env, &[("MB_TEST_REFRESH", REFRESH)]);
    svc.wait_health(200, Duration::from_secs(30)).await;
    let send = |provider: &str, id: &str| {
        serde_json::to_vec(&guide_request(TENANT, provider, id, None)).unwrap()
    };

    env.publish("email.send", &send("gmail", "g-1")).await;
    env.publish("email.send", &send("graph", "m-1")).await;
    let results = env
        .take("email.send.result", 2, Duration::from_secs(20))
        .await;
    assert_eq!(results.len(), 2, "{}", svc.log_text());
    assert!(results.iter().all(|r| r["status"] == "sent"), "{results:?}");
    // One account each (`provider:gmail`, `provider:graph`): one token request each.
    assert_eq!(server.token_requests(), 2);
    let first: Vec<String> = api
        .received()
        .iter()
        .map(|r| r.header("authorization").unwrap_or_default().to_string())
        .collect();
    assert_eq!(first.len(), 2);
    assert!(first
        .iter()
        .all(|a| a.starts_with("Bearer ") && server.is_active(&a[7..])));

    // The tokens stop working before their time: each API answers 401, the account renews
    // once, the request is made again with the new token and succeeds.
    server.expire_access_tokens();
    env.publish("email.send", &send("gmail", "g-2")).await;
    env.publish("email.send", &send("graph", "m-2")).await;
    let results = env
        .take("email.send.result", 2, Duration::from_secs(20))
        .await;
    assert_eq!(results.len(), 2, "{}", svc.log_text());
    assert!(results.iter().all(|r| r["status"] == "sent"), "{results:?}");
    assert_eq!(server.token_requests(), 4);
    for (which, ok) in [(Api::Gmail, 200), (Api::Graph, 202)] {
        let statuses: Vec<u16> = api.received_by(which).iter().map(|r| r.status).collect();
        assert_eq!(statuses, [ok, 401, ok], "{which:?}");
        let reqs = api.received_by(which);
        assert_ne!(
            reqs[1].header("authorization"),
            reqs[2].header("authorization")
        );
    }

    // Revoked: the 401's renewal finds invalid_grant; dead-lettered, permanent, re-authorize.
    server.revoke_all();
    server.expire_access_tokens();
    env.publish("email.send", &send("gmail", "g-3")).await;
    let dead = env.take("email.send.dlq", 1, Duration::from_secs(20)).await;
    assert_eq!(dead.len(), 1, "{}", svc.log_text());
    assert!(
        dead[0]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("re-authorize"),
        "{}",
        dead[0]
    );
    let results = env
        .take("email.send.result", 1, Duration::from_secs(10))
        .await;
    assert_eq!(results[0]["status"], "failed", "{results:?}");
    assert_eq!(results[0]["error_class"], "permanent", "{results:?}");
    let (_, health) = svc.get_json("/health").await;
    let gmail = &health["components"]["providers"]["gmail"];
    assert_eq!(gmail["status"], "down", "{health}");
    assert!(gmail["last_error"]
        .as_str()
        .unwrap_or_default()
        .contains("re-authorize"));
    let log = svc.log_text();
    assert!(!log.contains(REFRESH) && !log.contains(CLIENT_SECRET));
}

/// Every complete tenant file README shows for a provider kind loads as it is (its `_env`
/// variables set, its `_file` secrets present), with the kind it shows.
#[test]
fn every_readme_tenant_example_loads() {
    let readme = include_str!("../README.md");
    let mut loaded = Vec::new();
    let mut mailboxes = Vec::new();
    for (i, block) in readme.split("```toml\n").skip(1).enumerate() {
        let Some(example) = block.split("```").next() else {
            continue;
        };
        // Indented blocks (inside list items) lose their indentation.
        let example: String = example
            .lines()
            .map(|l| l.strip_prefix("  ").unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n");
        if !example.starts_with("id = ") || !example.contains("[[providers]]") {
            continue;
        }
        let mut vars = Vec::new();
        let mut files = Vec::new();
        for line in example.lines() {
            if let Some((key, value)) = line.split_once(" = \"") {
                let value = value.split('"').next().unwrap_or_default().to_string();
                if key.trim().ends_with("_env") {
                    vars.push((value, format!("value-of-{i}")));
                } else if key.trim().ends_with("_file") && !key.contains("ca_file") {
                    files.push(value);
                }
            }
        }
        let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let settings = load_tenant_with_files(&format!("readme-{i}"), &example, &vars, &files)
            .unwrap_or_else(|e| panic!("README example {i} does not load: {e}\n{example}"));
        for p in &settings.tenants[0].providers {
            loaded.push(p.config.kind());
        }
        for m in &settings.tenants[0].mailboxes {
            mailboxes.push(m.protocol.as_str());
        }
    }
    for protocol in ["imap", "gmail_api", "ms_graph"] {
        assert!(
            mailboxes.contains(&protocol),
            "no README example of a {protocol} mailbox: {mailboxes:?}"
        );
    }
    for kind in [
        "smtp",
        "sendgrid",
        "mailgun",
        "postmark",
        "ses",
        "resend",
        "gmail_api",
        "ms_graph",
    ] {
        assert!(
            loaded.contains(&kind),
            "no README example of {kind}: {loaded:?}"
        );
    }
}
