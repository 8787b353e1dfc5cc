//! The OpenAPI description (`api/openapi.json`, served at `/api/openapi.json`) against the
//! running service: every route of `src/http.rs` is documented, and schemathesis (pinned in
//! `tests/requirements.txt`) generates requests from the document — valid ones and invalid
//! ones — and checks every answer: a documented status, the documented schema and content
//! type, no 5xx at all (RabbitMQ and PostgreSQL are up, so no 503 is due), a 405 with
//! `Allow` for any other method, admin endpoints refusing a missing token.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, Service, TestEnv};
use mailbridge::attachments::AttachmentStore;

const TOKEN: &str = "conformance-admin-token";
const TENANT: &str = "tenant-api";
const DOCUMENT: &str = include_str!("../api/openapi.json");
const HTTP_RS: &str = include_str!("../src/http.rs");

/// `(path, method)` of every `.route("…", web::method()…)` in `src/http.rs`, `{id}`-style
/// parameters as OpenAPI writes them.
fn registered_routes() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for piece in HTTP_RS.split(".route(").skip(1) {
        // `.route("/path", web::get()…)`, possibly over several lines; the 405 fallback
        // (`.route(path, web::route()…)`) names no literal path and is skipped.
        let Some(rest) = piece.trim_start().strip_prefix('"') else {
            continue;
        };
        let Some((path, rest)) = rest.split_once('"') else {
            continue;
        };
        let Some(method) = rest
            .trim_start_matches(|c: char| c == ',' || c.is_whitespace())
            .strip_prefix("web::")
            .and_then(|m| m.split_once("()"))
            .map(|(m, _)| m.to_string())
        else {
            continue;
        };
        out.push((path.to_string(), method));
    }
    out
}

/// Whether the route pattern `route` (actix's `{name}` segments match any segment) serves the
/// documented path `documented` (`/api/tenants/{tenant}/{section}/{id}` serves
/// `/api/tenants/{tenant}/providers/{id}`).
fn serves(route: &str, documented: &str) -> bool {
    let (r, d): (Vec<&str>, Vec<&str>) =
        (route.split('/').collect(), documented.split('/').collect());
    r.len() == d.len()
        && r.iter()
            .zip(&d)
            .all(|(r, d)| r == d || (r.starts_with('{') && r.ends_with('}')))
}

#[test]
fn every_route_is_documented_and_every_documented_path_is_a_route() {
    let doc: serde_json::Value = serde_json::from_str(DOCUMENT).expect("api/openapi.json is JSON");
    assert!(
        doc["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.1")),
        "{}",
        doc["openapi"]
    );
    let paths = doc["paths"].as_object().expect("paths");
    let routes = registered_routes();
    assert!(
        routes.len() >= 12,
        "routes found in src/http.rs: {routes:?}"
    );
    for (path, method) in &routes {
        assert!(
            paths
                .iter()
                .any(|(p, item)| serves(path, p) && item.get(method).is_some()),
            "{} {path} is served by src/http.rs but not in api/openapi.json",
            method.to_uppercase()
        );
    }
    for (path, item) in paths {
        for method in item.as_object().expect("path item").keys() {
            if method == "parameters" {
                continue;
            }
            assert!(
                routes.iter().any(|(p, m)| serves(p, path) && m == method),
                "api/openapi.json documents {} {path}, which src/http.rs does not serve",
                method.to_uppercase()
            );
        }
    }
    // Every route's path answers its other methods with 405 and `Allow` (`ALLOWED_METHODS`).
    for (path, method) in &routes {
        let entry = HTTP_RS
            .split(&format!("(\"{path}\", \""))
            .nth(1)
            .and_then(|rest| rest.split_once('"'))
            .map(|(allow, _)| allow);
        assert!(
            entry.is_some_and(|allow| allow.split(", ").any(|m| m.eq_ignore_ascii_case(method))),
            "{path}: ALLOWED_METHODS in src/http.rs should list {} (it says {entry:?})",
            method.to_uppercase()
        );
    }
    // Every `$ref` resolves.
    fn refs(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(r) = m.get("$ref").and_then(|r| r.as_str()) {
                    out.push(r.to_string());
                }
                m.values().for_each(|v| refs(v, out));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    refs(&doc, &mut all);
    for r in all {
        let pointer = r.strip_prefix('#').expect("local $ref");
        assert!(doc.pointer(pointer).is_some(), "{r} does not resolve");
    }
}

/// Runs `cmd`, killing it after `limit`; its exit code (None when killed) and its output.
fn run_bounded(mut cmd: Command, limit: Duration) -> (Option<i32>, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect(
            "schemathesis is not installed: run scripts/test.sh, or \
             `pip install -r tests/requirements.txt` into the Python on PATH",
        );
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let code = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status.code();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let text = format!(
        "{}{}",
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default()
    );
    (code, text)
}

/// Runs `schemathesis run` against the service with `config` (a schemathesis.toml) and
/// `extra` arguments; asserts it found nothing, printing its report either way.
fn schemathesis(svc: &Service, env: &TestEnv, config: &std::path::Path, extra: &[&str]) {
    let mut cmd = Command::new("schemathesis");
    cmd.current_dir(&env.dir)
        .env("NO_COLOR", "1")
        .arg("--config-file")
        .arg(config)
        .arg("run")
        .arg(format!("{}/api/openapi.json", svc.base_url))
        .args(["--url", &svc.base_url])
        .args(["--checks", "all"])
        .args(["--workers", "1"])
        .args(["--request-timeout", "15"])
        .args(["--generation-database", "none"])
        .args(["--header", &format!("Authorization: Bearer {TOKEN}")])
        .arg("--no-color")
        .args(extra);
    // MAILBRIDGE_SCHEMATHESIS_SEED: replay a run (its report ends with its seed).
    if let Ok(seed) = std::env::var("MAILBRIDGE_SCHEMATHESIS_SEED") {
        cmd.args(["--seed", &seed]);
    }
    let started = Instant::now();
    let (code, output) = run_bounded(cmd, Duration::from_secs(240));
    println!(
        "schemathesis {extra:?} ({:.0} s):\n{output}",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        code,
        Some(0),
        "schemathesis found answers that do not conform to api/openapi.json (above)\n\
         --- service log (tail) ---\n{}",
        tail(&svc.log_text(), 60)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_running_service_conforms_to_its_openapi_description() {
    let env = TestEnv::new("apiconf");
    // A tenant with a file provider and a mailbox whose server is not there: real providers,
    // a mailbox that is down with its reason, in every answer.
    let closed_port = free_port();
    env.write_tenant(
        "api.toml",
        &format!(
            r#"
id = "{TENANT}"
[[providers]]
id = "{TENANT}-files"
name = "Files"
kind = "file"
dir = "sent-api"

[[mailboxes]]
id = "mb-api"
user_id = "user-api"
provider_id = "{TENANT}-files"
protocol = "imap"
host = "127.0.0.1"
port = {closed_port}
tls = "none"
username = "nobody"
password = "nothing"
"#
        ),
    );
    let svc = Service::start_with(&env, &[("MAILBRIDGE_ADMIN_TOKEN", TOKEN)]);
    svc.wait_health(200, Duration::from_secs(60)).await;

    // Dead letters, so `/api/dlq` lists real entries: a request that does not decode, and a
    // body that is not JSON.
    env.publish(
        "email.send",
        br#"{"tenant_id": "tenant-api", "message_id": "not-a-request"}"#,
    )
    .await;
    env.publish("email.send", b"not JSON at all").await;
    let start = Instant::now();
    while env.depth("email.send.dlq").await < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the bad requests were not dead-lettered: {}",
            svc.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The document the service serves is the file.
    let (code, served) = svc.get("/api/openapi.json").await.expect("answers");
    assert_eq!(code, 200);
    let served: serde_json::Value = serde_json::from_str(&served).expect("JSON");
    let file: serde_json::Value = serde_json::from_str(DOCUMENT).expect("JSON");
    assert_eq!(served, file);

    // Every operation, with generated requests, valid and not.
    let config =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/schemathesis.toml");
    let run = Instant::now();
    schemathesis(&svc, &env, &config, &["--max-examples", "30"]);

    // An attachment by a genuine link: its signed parameters fixed, the rest (`Range`,
    // `If-None-Match`, `If-Range`) generated, so 200, 206, 304 and 416 are all seen.
    let settings = mailbridge::settings::Settings::load(&env.config_path()).expect("settings");
    let pool = mailbridge::storage::pool(&settings.database).expect("pool");
    let store = AttachmentStore::for_settings(&settings.attachments, &pool).expect("store");
    let bytes = b"conformance attachment bytes\n".repeat(10);
    let (store, id) = tokio::task::spawn_blocking(move || {
        let id = store.store(&bytes);
        (store, id)
    })
    .await
    .expect("join");
    let id = id.expect("stored");
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let link = store.link(&id, "report.txt", "text/plain", now);
    let param = |name: &str| {
        link.split(['?', '&'])
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("{name} in {link}"))
            .to_string()
    };
    let (expires, sig) = (param("expires"), param("sig"));
    let (code, _) = svc
        .get(&format!(
            "/api/attachments/{id}?expires={expires}&name=report.txt&type=text%2Fplain&sig={sig}"
        ))
        .await
        .expect("answers");
    assert_eq!(code, 200, "the genuine link is served");
    let attachment_config = env.dir.join("schemathesis-attachment.toml");
    std::fs::write(
        &attachment_config,
        format!(
            r#"
[[operations]]
include-path = "/api/attachments/{{id}}"
parameters = {{ "path.id" = "{id}", "query.expires" = {expires}, "query.sig" = "{sig}", "query.name" = "report.txt", "query.type" = "text/plain" }}
# A `Range` is a string to the schema; whether it is satisfiable depends on the size.
checks.positive_data_acceptance.expected-statuses = ["2xx", "3xx", "416"]
"#
        ),
    )
    .expect("write the config");
    schemathesis(
        &svc,
        &env,
        &attachment_config,
        &[
            "--max-examples",
            "60",
            "--include-path",
            "/api/attachments/{id}",
        ],
    );
    println!("both runs: {:.0} s", run.elapsed().as_secs_f64());

    // Whatever it sent, the service is still there, healthy, and nothing panicked.
    let (code, _) = svc.get_json("/health").await;
    assert_eq!(code, 200);
    let log = svc.log_text();
    assert!(!log.contains("panicked"), "{}", tail(&log, 60));
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
