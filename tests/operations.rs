//! What an operator's tools read: `/livez` and `/readyz`, the process and queue metrics, JSON
//! logs with the ids as fields, the exit codes, systemd's readiness and watchdog protocol, and
//! the unit file and installer.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{free_port, guide_request, Service, SmtpServer, TestEnv, BIN};

/// Tenant `acme` with provider `smtp-1` (the test SMTP server) and an IMAP mailbox whose
/// server is not there (its fetcher keeps failing, and logs it).
fn smtp_tenant_with_unreachable_mailbox(
    env: &TestEnv,
    smtp_port: u16,
    mailbox_id: &str,
    user_id: &str,
    extra: &str,
) {
    let dead_port = free_port();
    env.smtp_tenant(
        "acme",
        "smtp-1",
        smtp_port,
        &format!(
            r#"
[[mailboxes]]
id = "{mailbox_id}"
user_id = "{user_id}"
provider_id = "smtp-1"
protocol = "imap"
host = "127.0.0.1"
port = {dead_port}
tls = "none"
username = "u"
password = "p"
{extra}
"#
        ),
    );
}

#[tokio::test]
async fn livez_readyz_and_the_operators_metrics() {
    let env = TestEnv::new("ops-probes");
    env.write_config("");
    let svc = Service::start(&env);
    svc.wait_health(200, Duration::from_secs(30)).await;
    let (code, live) = svc.get_json("/livez").await;
    assert_eq!((code, live["status"].as_str()), (200, Some("alive")));
    let (code, ready) = svc.get_json("/readyz").await;
    assert_eq!((code, ready["status"].as_str()), (200, Some("ready")));

    let (code, text) = svc.get("/metrics").await.unwrap();
    assert_eq!(code, 200);
    let value = |line_start: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(line_start))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no `{line_start}` in\n{text}"))
    };
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        value(&format!("mailbridge_build_info{{version=\"{version}\"}} ")),
        1.0
    );
    let rss = value("process_resident_memory_bytes ");
    assert!(rss > 1e6 && rss < 1e9, "{rss}");
    assert!(value("process_open_fds ") >= 3.0);
    assert!(value("process_cpu_seconds_total ") > 0.0);
    for queue in [
        "email.send",
        "email.send.result",
        "email.inbound",
        "email.sync.user",
    ] {
        assert_eq!(
            value(&format!("mailbridge_queue_messages{{queue=\"{queue}\"}} ")),
            0.0
        );
    }
    // The service consumes the send queue: one consumer there.
    assert_eq!(
        value("mailbridge_queue_consumers{queue=\"email.send\"} "),
        1.0
    );

    // A broker that cannot be reached: alive, not ready, and /livez still fast.
    let down = TestEnv::new("ops-nobroker");
    let port = free_port();
    down.write_config_with(
        &format!(
            "host = \"127.0.0.1\"\nport = {port}\nvhost = \"{}\"\n",
            down.vhost
        ),
        &down.db_url(),
        "",
    );
    let svc = Service::start(&down);
    svc.wait_health(503, Duration::from_secs(30)).await;
    let (code, live) = svc.get_json("/livez").await;
    assert_eq!((code, live["status"].as_str()), (200, Some("alive")));
    let (code, ready) = svc.get_json("/readyz").await;
    assert_eq!(code, 503, "{ready}");
    assert_eq!(ready["status"], "not ready");
}

#[tokio::test]
async fn json_logs_carry_the_ids_as_fields() {
    let env = TestEnv::new("ops-json");
    let smtp = SmtpServer::start(&env.dir, &[]);
    // A mailbox whose server is not there: its fetcher logs about it, with its id.
    env.write_config("");
    smtp_tenant_with_unreachable_mailbox(&env, smtp.port, "mb-nowhere", "user-1", "");
    let svc = Service::start_with(&env, &[("MAILBRIDGE_LOG_FORMAT", "json")]);
    svc.wait_health(200, Duration::from_secs(30)).await;
    // One email the server refuses: a failed result, and a line about it.
    smtp.set_reply(Some("550 5.1.1 No such user here"));
    let req = guide_request("acme", "smtp-1", "ops-json-1", None);
    env.publish("email.send", req.to_string().as_bytes()).await;
    let results = env
        .take("email.send.result", 1, Duration::from_secs(20))
        .await;
    assert_eq!(results.len(), 1);
    assert_eq!(results[0]["status"], "failed", "{}", results[0]);

    // Every line is one JSON object with a level, a message and a timestamp.
    let deadline = Instant::now() + Duration::from_secs(10);
    let lines = loop {
        let text = svc.log_text();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        let about_mailbox = lines.iter().any(|l| l["mailbox_id"] == "mb-nowhere");
        let about_email = lines.iter().any(|l| l["message_id"] == "ops-json-1");
        if (about_mailbox && about_email) || Instant::now() > deadline {
            break lines;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for l in &lines {
        assert!(l["level"].is_string() && l["timestamp"].is_string(), "{l}");
        assert!(l["message"].is_string(), "{l}");
    }
    let about_email: Vec<_> = lines
        .iter()
        .filter(|l| l["message_id"] == "ops-json-1")
        .collect();
    assert!(
        !about_email.is_empty(),
        "no line about the email: {lines:?}"
    );
    for l in &about_email {
        assert_eq!(l["tenant_id"], "acme", "{l}");
    }
    let about_mailbox: Vec<_> = lines
        .iter()
        .filter(|l| l["mailbox_id"] == "mb-nowhere")
        .collect();
    assert!(
        !about_mailbox.is_empty(),
        "no line about the mailbox: {lines:?}"
    );
    assert!(
        about_mailbox.iter().all(|l| l["tenant_id"] == "acme"),
        "{about_mailbox:?}"
    );
}

#[test]
fn exit_codes_say_what_went_wrong() {
    let env = TestEnv::new("ops-exit");
    // A configuration error: 78 (EX_CONFIG) for every command but check-config, which keeps
    // the contract's 1.
    env.write_config("bogus_key = 1\n");
    let code = |args: &[&str]| env.command(args).status.code();
    assert_eq!(code(&["migrate"]), Some(78));
    assert_eq!(code(&["run"]), Some(78));
    assert_eq!(code(&["check-config"]), Some(1));
    // A database that cannot be reached: 69 (EX_UNAVAILABLE).
    let port = free_port();
    env.write_config_with(
        &format!("host = \"127.0.0.1\"\nvhost = \"{}\"\n", env.vhost),
        &format!("postgres://root@127.0.0.1:{port}/nothing"),
        "",
    );
    let out = env.command(&["migrate"]);
    assert_eq!(out.status.code(), Some(69), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach PostgreSQL"));
    env.write_config("");
    assert_eq!(code(&["migrate"]), Some(0));
}

/// The service speaks systemd's notify protocol: READY=1 once the broker and the database are
/// reachable, WATCHDOG=1 fed while it runs, STOPPING=1 at SIGTERM.
#[tokio::test]
async fn systemd_hears_ready_the_watchdog_and_the_stop() {
    let env = TestEnv::new("ops-notify");
    env.write_config("");
    let socket_path = env.dir.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let started = Instant::now();
    let mut svc = Service::start_with(
        &env,
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "1000000"),
        ],
    );
    let mut heard: Vec<(Duration, String)> = Vec::new();
    let mut buf = [0u8; 4096];
    let mut listen = |heard: &mut Vec<(Duration, String)>, until: Duration| {
        let end = Instant::now() + until;
        while Instant::now() < end {
            if let Ok(n) = socket.recv(&mut buf) {
                heard.push((
                    started.elapsed(),
                    String::from_utf8_lossy(&buf[..n]).to_string(),
                ));
            }
        }
    };
    listen(&mut heard, Duration::from_secs(5));
    let ready_at = heard
        .iter()
        .position(|(_, m)| m.lines().any(|l| l == "READY=1"))
        .unwrap_or_else(|| panic!("no READY=1 in {heard:?}\n{}", svc.log_text()));
    // Ready means ready: /readyz agrees the moment systemd is told.
    let (code, _) = svc.get_json("/readyz").await;
    assert_eq!(code, 200);
    let pings: Vec<Duration> = heard
        .iter()
        .filter(|(_, m)| m == "WATCHDOG=1")
        .map(|(t, _)| *t)
        .collect();
    // Half the watchdog time apart (500 ms) over about five seconds.
    assert!(pings.len() >= 6, "{heard:?}");
    for pair in pings.windows(2) {
        assert!(pair[1] - pair[0] < Duration::from_millis(900), "{pings:?}");
    }
    assert!(ready_at < heard.len());
    common::signal(svc.pid(), "TERM");
    listen(&mut heard, Duration::from_secs(2));
    assert!(
        heard.iter().any(|(_, m)| m.starts_with("STOPPING=1")),
        "{heard:?}"
    );
    assert!(svc.terminate(Duration::from_secs(10)).success());
}

/// `scripts/install.sh` lays out binary, configuration, data folder and unit; the unit passes
/// `systemd-analyze verify` and the installed configuration is valid.
#[test]
fn the_installer_and_the_unit_file() {
    let env = TestEnv::new("ops-install");
    let root = env.dir.join("root");
    let out = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/install.sh"))
        .args(["--binary", BIN, "--destdir"])
        .arg(&root)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    for path in [
        "usr/local/bin/mailbridge",
        "etc/mailbridge/mailbridge.toml",
        "etc/mailbridge/environment",
        "etc/mailbridge/tenants.d",
        "var/lib/mailbridge/attachments",
        "etc/systemd/system/mailbridge.service",
        "usr/local/share/man/man1/mailbridge.1",
        "usr/local/share/bash-completion/completions/mailbridge",
    ] {
        assert!(root.join(path).exists(), "{path} not installed");
    }
    let config = std::fs::read_to_string(root.join("etc/mailbridge/mailbridge.toml")).unwrap();
    assert!(config.contains("dir = \"/var/lib/mailbridge/attachments\""));
    let check = Command::new(BIN)
        .arg("--config")
        .arg(root.join("etc/mailbridge/mailbridge.toml"))
        .arg("check-config")
        .output()
        .unwrap();
    assert!(check.status.success(), "{check:?}");
    // Installing again keeps the operator's configuration.
    std::fs::write(
        root.join("etc/mailbridge/mailbridge.toml"),
        format!("{config}\n# edited\n"),
    )
    .unwrap();
    let again = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/install.sh"))
        .args(["--binary", BIN, "--destdir"])
        .arg(&root)
        .output()
        .unwrap();
    assert!(again.status.success());
    assert!(
        std::fs::read_to_string(root.join("etc/mailbridge/mailbridge.toml"))
            .unwrap()
            .ends_with("# edited\n")
    );

    // The unit as installed, pointed at the installed binary (systemd-analyze checks that
    // the commands exist).
    let unit = std::fs::read_to_string(root.join("etc/systemd/system/mailbridge.service")).unwrap();
    for line in [
        "Type=notify",
        "WatchdogSec=30s",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "User=mailbridge",
        "RestartPreventExitStatus=78",
    ] {
        assert!(unit.lines().any(|l| l == line), "{line} missing");
    }
    let here = env.dir.join("mailbridge.service");
    let binary = root.join("usr/local/bin/mailbridge");
    std::fs::write(
        &here,
        unit.replace("/usr/local/bin/mailbridge", binary.to_str().unwrap()),
    )
    .unwrap();
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&here)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&verify.stderr);
    assert!(verify.status.success() && said.trim().is_empty(), "{said}");
    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=true"])
        .arg(&here)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&security.stdout);
    let level = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for mailbridge.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("{text}"));
    println!("systemd-analyze security: exposure {level}");
    assert!(level < 4.0, "{text}");
}

/// Accounts connected at run time: `PUT`/`DELETE /api/tenants/{tenant}/{providers|mailboxes}/{id}`
/// edit the tenant's file (made when missing), checked and applied like a reload.
#[tokio::test]
async fn accounts_are_connected_and_removed_at_run_time() {
    const TOKEN: &str = "ops-admin-token-1";
    let env = TestEnv::new("ops-accounts");
    let smtp = SmtpServer::start(&env.dir, &[]);
    env.write_config("");
    let svc = Service::start_with(&env, &[("MAILBRIDGE_ADMIN_TOKEN", TOKEN)]);
    svc.wait_health(200, Duration::from_secs(30)).await;
    let http = reqwest::Client::new();
    let url = |rest: &str| format!("{}/api/tenants/{rest}", svc.base_url);
    let call = |method: reqwest::Method, rest: &str, body: Option<serde_json::Value>| {
        let mut r = http.request(method, url(rest)).bearer_auth(TOKEN);
        if let Some(b) = body {
            r = r.json(&b);
        }
        async move {
            let r = r.send().await.unwrap();
            let code = r.status().as_u16();
            (code, r.json::<serde_json::Value>().await.unwrap())
        }
    };
    let provider = serde_json::json!({
        "name": "relay of beta",
        "kind": "smtp",
        "host": "127.0.0.1",
        "port": smtp.port,
        "tls": "none",
        "max_connections": 2,
    });

    // Without the token: refused, nothing written.
    let r = http
        .put(url("beta/providers/smtp-b"))
        .json(&provider)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let file = env.dir.join("tenants.d").join("beta.toml");
    assert!(!file.exists());

    // A new tenant with its first provider: the file is made and the provider sends.
    let (code, body) = call(
        reqwest::Method::PUT,
        "beta/providers/smtp-b",
        Some(provider.clone()),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        body["outcome"]["diff"]["tenants_added"],
        serde_json::json!(["beta"])
    );
    assert_eq!(
        body["outcome"]["diff"]["providers_added"],
        serde_json::json!(["smtp-b"])
    );
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        text.contains("id = \"beta\"") && text.contains("[[providers]]\nid = \"smtp-b\""),
        "{text}"
    );
    let req = guide_request("beta", "smtp-b", "ops-acct-1", None);
    env.publish("email.send", req.to_string().as_bytes()).await;
    assert_eq!(smtp.wait_for(1, Duration::from_secs(20)).await.len(), 1);

    // A mailbox for it; an invalid one is refused with the problem and nothing is written.
    let port = free_port();
    let mailbox = serde_json::json!({
        "user_id": "user-7",
        "provider_id": "smtp-b",
        "protocol": "imap",
        "host": "127.0.0.1",
        "port": port,
        "tls": "none",
        "username": "u7",
        "password_env": "OPS_NOT_SET_ANYWHERE",
    });
    let (code, body) = call(
        reqwest::Method::PUT,
        "beta/mailboxes/mb-7",
        Some(mailbox.clone()),
    )
    .await;
    assert_eq!(code, 422, "{body}");
    let problems = body["outcome"]["problems"].to_string();
    assert!(problems.contains("OPS_NOT_SET_ANYWHERE"), "{problems}");
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        text,
        "nothing written"
    );
    let mut mailbox = mailbox;
    mailbox["password"] = "pw-7".into();
    mailbox.as_object_mut().unwrap().remove("password_env");
    let (code, body) = call(reqwest::Method::PUT, "beta/mailboxes/mb-7", Some(mailbox)).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        body["outcome"]["diff"]["mailboxes_added"],
        serde_json::json!(["mb-7"])
    );
    assert!(
        !body.to_string().contains("pw-7"),
        "no secret in the answer"
    );
    // Its fetcher starts (once this instance holds its lease) and reports.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, page) = svc.get_json("/api/mailboxes?tenant=beta").await;
        if page["mailboxes"][0]["id"] == "mb-7" {
            break;
        }
        assert!(Instant::now() < deadline, "{page}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Changed, then a typo refused by key; removed; removed again is 404.
    let mut changed = provider.clone();
    changed["max_connections"] = 3.into();
    let (code, body) = call(reqwest::Method::PUT, "beta/providers/smtp-b", Some(changed)).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        body["outcome"]["diff"]["providers_changed"],
        serde_json::json!(["smtp-b"])
    );
    let mut typo = provider.clone();
    typo["hostt"] = "x".into();
    let (code, body) = call(reqwest::Method::PUT, "beta/providers/smtp-b", Some(typo)).await;
    assert_eq!(code, 422, "{body}");
    assert!(
        body["outcome"]["problems"].to_string().contains("hostt"),
        "{body}"
    );
    let (code, body) = call(
        reqwest::Method::PUT,
        "beta/providers/smtp-b",
        Some(serde_json::json!({"id": "other"})),
    )
    .await;
    assert_eq!(code, 400, "{body}");
    let (code, body) = call(reqwest::Method::DELETE, "beta/mailboxes/mb-7", None).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        body["outcome"]["diff"]["mailboxes_removed"],
        serde_json::json!(["mb-7"])
    );
    let (code, _) = call(reqwest::Method::DELETE, "beta/mailboxes/mb-7", None).await;
    assert_eq!(code, 404);
    let (code, _) = call(reqwest::Method::DELETE, "beta/widgets/x", None).await;
    assert_eq!(code, 404);
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        !text.contains("mb-7") && text.contains("max_connections = 3"),
        "{text}"
    );
    // The file is what a hand edit would be: `check-config` accepts it.
    assert!(env.command(&["check-config"]).status.success());
}

/// The operator's commands against a running service: `send --wait` prints the outcome
/// (exit 0 sent, 1 failed), `outbox show` the row and history, `results tail` follows
/// outcomes without taking them from the result queue, `mailbox sync` reaches the fetcher;
/// completions and the man page come from the same definition.
#[tokio::test]
async fn the_command_line_sends_shows_tails_and_syncs() {
    let env = TestEnv::new("ops-cli");
    let smtp = SmtpServer::start(&env.dir, &[]);
    env.write_config("");
    smtp_tenant_with_unreachable_mailbox(
        &env,
        smtp.port,
        "mb-cli",
        "user-cli",
        "poll_interval = \"1h\"",
    );
    let svc = Service::start(&env);
    svc.wait_health(200, Duration::from_secs(30)).await;
    let cli = |args: &[&str]| {
        let out = env.command(args);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };

    // Outcomes as they are recorded, from a tail started before the sends.
    let tail = std::process::Command::new(BIN)
        .arg("--config")
        .arg(env.config_path())
        .args(["results", "tail", "--tenant", "acme", "--limit", "2"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let send = |rest: &[&str]| {
        let mut args = vec!["send", "--tenant", "acme", "--provider", "smtp-1"];
        args.extend(["--from", "ops@company.com"]);
        args.extend(rest);
        cli(&args)
    };
    let (code, out, err) = send(&[
        "--to",
        "user@example.com",
        "--subject",
        "from the CLI",
        "--body",
        "hello there",
        "--message-id",
        "cli-1",
        "--wait",
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    let sent: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(sent["status"], "sent", "{sent}");
    assert_eq!(sent["message_id"], "cli-1");
    let got = smtp.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].parsed().subject(), Some("from the CLI"));
    assert!(got[0].text().contains("hello there"));

    smtp.set_reply(Some("550 5.1.1 No such user here"));
    let (code, out, err) = send(&[
        "--to",
        "nobody@example.com",
        "--message-id",
        "cli-2",
        "--wait",
    ]);
    assert_eq!(code, Some(1), "{out}{err}");
    let failed: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(failed["status"], "failed");
    assert!(
        failed["last_error"]
            .as_str()
            .unwrap()
            .contains("No such user"),
        "{failed}"
    );
    let (code, out, err) = cli(&[
        "send",
        "--tenant",
        "acme",
        "--provider",
        "nope",
        "--from",
        "a@b.c",
        "--to",
        "x@y.z",
    ]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains("no provider `nope`"), "{err}");

    let tail = tail.wait_with_output().unwrap();
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&tail.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let seen: Vec<(&str, &str)> = lines
        .iter()
        .map(|l| {
            (
                l["message_id"].as_str().unwrap(),
                l["status"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(seen, [("cli-1", "sent"), ("cli-2", "failed")], "{tail:?}");
    // The CRM's result queue still holds both results: the tail took nothing from it.
    let results = env
        .take("email.send.result", 2, Duration::from_secs(10))
        .await;
    assert_eq!(results.len(), 2);

    let (code, out, _) = cli(&["outbox", "show", "cli-2", "--tenant", "acme"]);
    assert_eq!(code, Some(0));
    let shown: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["status"], "failed");
    assert_eq!(shown["provider_id"], "smtp-1");
    let history = shown["history"].as_array().unwrap();
    assert!(history.iter().any(|e| e["event"] == "failed"), "{shown}");
    let (code, _, err) = cli(&["outbox", "show", "no-such-id"]);
    assert_eq!((code, err.contains("no request")), (Some(1), true), "{err}");

    // A sync request for the mailbox, in the guide's format, triggers its fetcher.
    let (code, out, err) = cli(&["mailbox", "sync", "mb-cli"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let published: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(published["user_id"], "user-cli");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, metrics) = svc.get("/metrics").await.unwrap();
        if metrics
            .contains("mailbridge_sync_requests_total{outcome=\"triggered\",tenant=\"acme\"} 1")
        {
            break;
        }
        assert!(Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (code, _, err) = cli(&["mailbox", "sync", "mb-unknown"]);
    assert_eq!((code, err.contains("no mailbox")), (Some(1), true));

    let (code, out, _) = cli(&["completions", "bash"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("mailbridge") && out.contains("--message-id"));
    let (code, out, _) = cli(&["man"]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains(".TH mailbridge 1") && out.contains("check\\-config"),
        "{out}"
    );
}

/// `rust-version` in Cargo.toml is at least every locked dependency's own (so the stated
/// version can build the lock file; clippy's `incompatible_msrv` checks our own code
/// against it).
#[test]
fn rust_version_covers_the_locked_dependencies() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // The dependencies of this host's build (the one that ships): other platforms' crates
    // need not be downloaded.
    let rustc = Command::new("rustc").arg("-vV").output().unwrap();
    let rustc = String::from_utf8_lossy(&rustc.stdout);
    let host = rustc
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .expect("rustc -vV names the host");
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked", "--offline"])
        .args(["--filter-platform", host])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // `1.89` is `1.89.0`.
    let version = |v: &str| -> Vec<u64> {
        let mut parts: Vec<u64> = v.split('.').map(|p| p.parse().unwrap()).collect();
        parts.resize(3, 0);
        parts
    };
    let ours = version(env!("CARGO_PKG_RUST_VERSION"));
    let locked: std::collections::HashSet<&str> = meta["resolve"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap())
        .collect();
    let mut newest = (Vec::new(), String::new());
    for p in meta["packages"].as_array().unwrap() {
        let (Some(rv), Some(id)) = (p["rust_version"].as_str(), p["id"].as_str()) else {
            continue;
        };
        if locked.contains(id) && version(rv) > newest.0 {
            newest = (version(rv), format!("{} {}", p["name"], p["version"]));
        }
    }
    assert!(
        ours >= newest.0,
        "rust-version {:?} is older than {} needs ({:?})",
        ours,
        newest.1,
        newest.0
    );
}
