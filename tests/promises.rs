//! README promises that had no test: each is done for real against the running binary,
//! RabbitMQ, PostgreSQL and the test SMTP/HTTP servers, and checked by exact counts and
//! content (Message-IDs at the server, results and dead letters on their queues, outbox rows).

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::checks::{self, tally, wait_queue_settled, Answer, TinyHttp};
use common::http_server::HttpServer;
use common::pg_cluster::PgCluster;
use common::{guide_request, wait_count, Service, SmtpServer, TestEnv};
use mail_parser::MimeHeaders;

const TOKEN: &str = "promises-admin-token";

fn body(t: &str, p: &str, id: &str) -> Vec<u8> {
    serde_json::to_vec(&guide_request(t, p, id, None)).unwrap()
}

async fn start(env: &TestEnv, vars: &[(&str, &str)]) -> Service {
    let svc = Service::start_with(env, vars);
    svc.wait_health(200, Duration::from_secs(30)).await;
    svc
}

/// Publishes many requests on one channel, confirmed.
async fn publish_all(env: &TestEnv, bodies: &[Vec<u8>]) {
    let conn = env.amqp().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let mut confirms = Vec::new();
    for b in bodies {
        confirms.push(
            ch.basic_publish(
                "".into(),
                "email.send".into(),
                Default::default(),
                b,
                lapin::BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap(),
        );
    }
    for c in confirms {
        c.await.unwrap();
    }
    let _ = conn.close(200, "OK".into()).await;
}

/// Declares `email.send` as a CRM client does (durable, no arguments), so requests can be
/// queued before the service runs.
async fn declare_send_queue(env: &TestEnv) {
    let conn = env.amqp().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "email.send".into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        Default::default(),
    )
    .await
    .unwrap();
    let _ = conn.close(200, "OK".into()).await;
}

/// Results by message_id: the statuses each one got, in order.
fn statuses(results: &[serde_json::Value]) -> BTreeMap<String, Vec<String>> {
    let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in results {
        m.entry(r["message_id"].as_str().unwrap_or("(none)").to_string())
            .or_default()
            .push(r["status"].as_str().unwrap_or("?").to_string());
    }
    m
}

// ---------------------------------------------------------------------------------------
// The `.eml` of a `file` provider
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_file_provider_writes_the_guide_example_as_an_eml_that_reads_back_whole() {
    let env = TestEnv::new("emlfile");
    env.write_tenant(
        "t.toml",
        "id = \"t\"\n[[providers]]\nid = \"files\"\nname = \"Local files\"\nkind = \"file\"\ndir = \"sent-mail\"\n",
    );
    let svc = start(&env, &[]).await;
    let req = guide_request("t", "files", "unique-message-id", None);
    env.publish("email.send", &serde_json::to_vec(&req).unwrap())
        .await;
    let results = env
        .take("email.send.result", 1, Duration::from_secs(15))
        .await;
    assert_eq!(results.len(), 1, "{}", svc.log_text());
    let r = &results[0];
    assert_eq!(r["status"], "sent", "{r}");
    assert_eq!(r["provider_response"]["provider_name"], "Local files");

    // `dir` is relative to the tenant file.
    let dir = env.dir.join("tenants.d/sent-mail");
    let files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let path = &files[0];
    let raw = std::fs::read(path).unwrap();
    let msg = mail_parser::MessageParser::default()
        .parse(&raw)
        .expect("the .eml parses");
    let message_id = msg.message_id().unwrap().to_string();
    assert!(
        message_id.starts_with("unique-message-id.") && message_id.ends_with("@company.com"),
        "{message_id}"
    );
    assert_eq!(
        path.file_name().unwrap().to_string_lossy(),
        format!("{message_id}.eml")
    );
    assert_eq!(r["provider_response"]["provider_message_id"], message_id);
    let addr = |a: Option<&mail_parser::Address>| -> Vec<String> {
        a.map(|a| {
            a.iter()
                .filter_map(|x| x.address().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
    };
    assert_eq!(addr(msg.from()), ["noreply@company.com"]);
    assert_eq!(addr(msg.to()), ["user@example.com"]);
    assert_eq!(addr(msg.cc()), ["cc@example.com"]);
    assert!(msg.bcc().is_none(), "a Bcc header in the file");
    let text = String::from_utf8_lossy(&raw);
    assert!(!text.contains("bcc@example.com"), "{text}");
    assert_eq!(msg.subject(), Some("Test Email"));
    assert_eq!(
        msg.header_raw("X-Custom-Header").map(str::trim),
        Some("Custom Value")
    );
    assert_eq!(msg.header_raw("X-Priority").map(str::trim), Some("1"));
    assert_eq!(msg.html_body_count(), 1);
    assert_eq!(msg.text_body_count(), 1);
    assert_eq!(msg.body_html(0).unwrap().trim(), "<p>Hello World</p>");
    assert_eq!(msg.body_text(0).unwrap().trim(), "Hello World");
    assert_eq!(msg.attachment_count(), 0);
    assert!(msg.date().is_some(), "a Date header");

    let db = env.db().await;
    let row = db
        .query_one(
            "SELECT status, rfc_message_id, provider_message_id FROM outbox WHERE message_id = 'unique-message-id'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "sent");
    assert_eq!(row.get::<_, String>(1), message_id);
    assert_eq!(row.get::<_, String>(2), message_id);
}

// ---------------------------------------------------------------------------------------
// Admin endpoints and their token
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn admin_endpoints_answer_403_without_a_token_401_to_a_wrong_one_and_200_to_the_right_one() {
    let env = TestEnv::new("admin");
    let endpoints: [(&str, Option<serde_json::Value>); 3] = [
        ("/api/dlq", None),
        (
            "/api/dlq/replay",
            Some(serde_json::json!({"message_ids": ["nothing-here"]})),
        ),
        ("/api/config/reload", Some(serde_json::json!({}))),
    ];
    // The variable unset: an empty value counts as unset too, so the child cannot inherit
    // one from the environment the tests run in.
    let unset = if std::env::var_os("MAILBRIDGE_ADMIN_TOKEN").is_some() {
        vec![("MAILBRIDGE_ADMIN_TOKEN", "")]
    } else {
        vec![]
    };
    let mut svc = start(&env, &unset).await;
    assert!(svc
        .log_text()
        .contains("admin endpoints (DLQ, reload) are disabled"));
    for (path, body) in &endpoints {
        for token in [None, Some(TOKEN), Some("")] {
            let (code, answer) = checks::admin(&svc, path, token, body.clone()).await;
            assert_eq!(code, 403, "{path} with {token:?}: {answer}");
            assert_eq!(answer["success"], false, "{answer}");
            assert!(
                answer["error"]
                    .as_str()
                    .unwrap()
                    .contains("MAILBRIDGE_ADMIN_TOKEN"),
                "{answer}"
            );
        }
    }
    assert!(svc.terminate(Duration::from_secs(10)).success());

    let svc = start(&env, &[("MAILBRIDGE_ADMIN_TOKEN", TOKEN)]).await;
    for (path, body) in &endpoints {
        for wrong in [None, Some("wrong-token"), Some("promises-admin-tokeN")] {
            let (code, answer) = checks::admin(&svc, path, wrong, body.clone()).await;
            assert_eq!(code, 401, "{path} with {wrong:?}: {answer}");
        }
        let (code, answer) = checks::admin(&svc, path, Some(TOKEN), body.clone()).await;
        assert_eq!(code, 200, "{path}: {answer}");
        assert_eq!(answer["success"], true, "{answer}");
    }
    let (_, list) = checks::admin(&svc, "/api/dlq", Some(TOKEN), None).await;
    assert_eq!(list["count"], 0, "{list}");
    assert!(!svc.log_text().contains(TOKEN), "the token is logged");
}

// ---------------------------------------------------------------------------------------
// A request whose processing panics
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_request_whose_processing_panics_is_dead_lettered_at_once_and_never_retried() {
    if !cfg!(debug_assertions) {
        // The fault switch exists in debug builds of the service only (as `cargo test`
        // builds it); a release run has nothing to inject with.
        eprintln!("skipped: MAILBRIDGE_FAULT_PANIC_ON needs a debug build of the service");
        return;
    }
    let env = TestEnv::new("panicreq");
    let smtp = SmtpServer::start(&env.dir.join("smtp"), &[]);
    env.smtp_tenant("t", "p", smtp.port, "");
    let svc = start(&env, &[("MAILBRIDGE_FAULT_PANIC_ON", "panics-1")]).await;

    let mut ids: Vec<String> = (0..20).map(|i| format!("normal-{i}")).collect();
    ids.insert(10, "panics-1".into());
    let bodies: Vec<Vec<u8>> = ids.iter().map(|id| body("t", "p", id)).collect();
    publish_all(&env, &bodies).await;

    // Everything settled: nothing ready, nothing unacked on the send queue.
    wait_queue_settled(&env.vhost, "email.send", Duration::from_secs(30)).await;
    let dead = checks::take_all(&env, "email.send.dlq").await;
    assert_eq!(dead.len(), 1, "{dead:?}\n{}", svc.log_text());
    let d = &dead[0];
    assert_eq!(d["message_id"], "panics-1", "{d}");
    assert_eq!(d["tenant_id"], "t");
    assert_eq!(d["error_class"], "permanent", "{d}");
    assert_eq!(d["retry_count"], 0, "{d}");
    assert_eq!(d["request"]["message_id"], "panics-1", "{d}");
    let err = d["error"].as_str().unwrap();
    assert!(
        err.contains("failed unexpectedly") && err.contains("fault injected"),
        "{err}"
    );

    let results = checks::take_all(&env, "email.send.result").await;
    let by_id = statuses(&results);
    assert_eq!(by_id.len(), 21, "{by_id:?}");
    assert_eq!(
        by_id["panics-1"],
        ["failed"],
        "one terminal result, no retrying"
    );
    let failed = results
        .iter()
        .find(|r| r["message_id"] == "panics-1")
        .unwrap();
    assert_eq!(failed["error_class"], "permanent", "{failed}");
    assert_eq!(failed["success"], false);
    for id in ids.iter().filter(|i| i.starts_with("normal-")) {
        assert_eq!(by_id[id], ["sent"], "{id}");
    }

    let delivered = tally(
        checks::message_ids(&smtp)
            .iter()
            .map(|m| checks::request_id_of(m)),
    );
    assert_eq!(delivered.len(), 20, "{delivered:?}");
    assert!(delivered.values().all(|n| *n == 1), "{delivered:?}");
    assert!(!delivered.contains_key("panics-1"));

    let db = env.db().await;
    let rows = checks::outbox_rows(&db).await;
    assert_eq!(rows.len(), 21);
    assert_eq!(rows["panics-1"].0, "failed");
    assert_eq!(rows["panics-1"].1, 1, "one attempt, none after the panic");
    let (retry_count, dead_lettered): (i32, bool) = db
        .query_one(
            "SELECT retry_count, dead_lettered_at IS NOT NULL FROM outbox WHERE message_id = 'panics-1'",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!((retry_count, dead_lettered), (0, true));
    assert!(rows
        .iter()
        .filter(|(k, _)| k.starts_with("normal-"))
        .all(|(_, (s, a))| s == "sent" && *a == 1));
    // Not parked for a retry either: the delay queues are empty.
    let retry_queues = common::rabbitmqctl(&[
        "list_queues",
        "-p",
        &env.vhost,
        "--no-table-headers",
        "--silent",
        "name",
        "messages",
    ]);
    for line in String::from_utf8_lossy(&retry_queues.stdout).lines() {
        if line.starts_with("mailbridge.retry.") {
            assert!(line.ends_with("\t0") || line.ends_with(" 0"), "{line}");
        }
    }

    // The process is alive and serving, and the panic was logged once.
    let (code, _) = svc.get("/health").await.unwrap();
    assert_eq!(code, 200);
    assert!(
        common::sys::send_signal(svc.pid(), "0"),
        "the process is alive"
    );
    let log = svc.log_text();
    assert_eq!(
        log.matches("processing a request panicked").count(),
        1,
        "{log}"
    );
    env.publish("email.send", &body("t", "p", "after-the-panic"))
        .await;
    assert_eq!(smtp.wait_for(21, Duration::from_secs(10)).await.len(), 21);
}

// ---------------------------------------------------------------------------------------
// attachment_max_bytes
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn attachments_over_attachment_max_bytes_fail_for_good_and_those_under_arrive_intact() {
    let env = TestEnv::new("maxbytes");
    env.write_config(
        "[outbound]\nattachment_allow_private = true\nattachment_max_bytes = 100000\nattachment_timeout = \"10s\"\n",
    );
    let smtp = SmtpServer::start(&env.dir.join("smtp"), &[]);
    env.smtp_tenant("t", "p", smtp.port, "");
    let http = HttpServer::start(&env.dir.join("files"));
    let bytes = |n: usize, seed: u32| -> Vec<u8> {
        (0..n as u32)
            .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 13) as u8)
            .collect()
    };
    let a60 = bytes(60_000, 1);
    let b60 = bytes(60_000, 2);
    let c45 = bytes(45_000, 3);
    let d45 = bytes(45_000, 4);
    http.put_file("a60.bin", &a60);
    http.put_file("b60.bin", &b60);
    http.put_file("c45.bin", &c45);
    http.put_file("d45.bin", &d45);
    let svc = start(&env, &[]).await;

    let att = |name: &str, path: &str| serde_json::json!({"filename": name, "url": http.url(path), "mime_type": "application/octet-stream"});
    let with = |id: &str, atts: Vec<serde_json::Value>| {
        let mut r = guide_request("t", "p", id, None);
        r["attachments"] = serde_json::Value::Array(atts);
        serde_json::to_vec(&r).unwrap()
    };
    let cases = [
        // Each under the cap, together over it.
        with(
            "two-together-over",
            vec![att("a.bin", "/file/a60.bin"), att("b.bin", "/file/b60.bin")],
        ),
        // One over it, announced by Content-Length.
        with("big-with-length", vec![att("big.bin", "/big/300000")]),
        // One over it, chunked without a length: counted as it arrives.
        with(
            "big-without-length",
            vec![att("big.bin", "/nolength/300000")],
        ),
        // Under the cap together (90,000 bytes).
        with(
            "two-under",
            vec![att("c.bin", "/file/c45.bin"), att("d.bin", "/file/d45.bin")],
        ),
    ];
    publish_all(&env, &cases).await;
    wait_queue_settled(&env.vhost, "email.send", Duration::from_secs(30)).await;

    let limit = "attachments are larger than the 100000 bytes allowed per message ([outbound] attachment_max_bytes)";
    let dead = checks::take_all(&env, "email.send.dlq").await;
    let mut dead_ids: Vec<&str> = dead
        .iter()
        .map(|d| d["message_id"].as_str().unwrap())
        .collect();
    dead_ids.sort();
    assert_eq!(
        dead_ids,
        ["big-with-length", "big-without-length", "two-together-over"],
        "{}",
        svc.log_text()
    );
    for d in &dead {
        assert_eq!(d["error_class"], "permanent", "{d}");
        assert_eq!(d["error"], limit, "{d}");
        assert_eq!(d["retry_count"], 0, "{d}");
    }
    let results = checks::take_all(&env, "email.send.result").await;
    let by_id = statuses(&results);
    assert_eq!(by_id.len(), 4, "{by_id:?}");
    for id in dead_ids {
        assert_eq!(by_id[id], ["failed"], "{id}: no retry");
    }
    assert_eq!(by_id["two-under"], ["sent"]);

    let mails = smtp.messages();
    assert_eq!(mails.len(), 1, "only two-under is sent");
    let m = mails[0].parsed();
    assert!(m.message_id().unwrap().starts_with("two-under."));
    assert_eq!(m.attachment_count(), 2);
    let got: Vec<(String, Vec<u8>)> = m
        .attachments()
        .map(|a| {
            (
                a.attachment_name().unwrap_or("").to_string(),
                a.contents().to_vec(),
            )
        })
        .collect();
    assert_eq!(got[0].0, "c.bin");
    assert_eq!(got[1].0, "d.bin");
    assert!(got[0].1 == c45, "c.bin changed on the way");
    assert!(got[1].1 == d45, "d.bin changed on the way");

    let db = env.db().await;
    let rows = checks::outbox_rows(&db).await;
    assert_eq!(rows["two-under"], ("sent".to_string(), 1));
    for id in ["big-with-length", "big-without-length", "two-together-over"] {
        assert_eq!(rows[id], ("failed".to_string(), 1), "{id}");
    }
}

// ---------------------------------------------------------------------------------------
// Internal addresses reached through a redirect or a DNS name
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn attachment_urls_reaching_internal_addresses_by_redirect_or_by_name_are_refused() {
    let env = TestEnv::new("ssrf");
    env.write_config(
        "[outbound]\nattachment_allow_private = false\nattachment_timeout = \"5s\"\n[retry]\nmax_retries = 0\n",
    );
    let smtp = SmtpServer::start(&env.dir.join("smtp"), &[]);
    env.smtp_tenant("t", "p", smtp.port, "");
    // The internal server: 127.0.0.1, where nothing may be fetched from.
    let internal = HttpServer::start(&env.dir.join("files"));
    internal.put_file("secret.pdf", b"internal only");
    let host = checks::internal_host_name();
    let by_name = format!("http://{host}:{}/file/secret.pdf", internal.port);

    let public_ip = checks::public_ipv4();
    let public_file: Vec<u8> = (0..5000u32).map(|i| (i % 253) as u8).collect();
    let public = public_ip.map(|ip| {
        TinyHttp::start(
            ip,
            vec![
                ("/doc.pdf", Answer::Body(public_file.clone())),
                (
                    "/to-loopback",
                    Answer::Redirect(internal.url("/file/secret.pdf")),
                ),
                ("/to-name", Answer::Redirect(by_name.clone())),
                // 127.0.0.1 spelled otherwise.
                (
                    "/to-decimal",
                    Answer::Redirect(format!(
                        "http://2130706433:{}/file/secret.pdf",
                        internal.port
                    )),
                ),
                (
                    "/to-hex",
                    Answer::Redirect(format!(
                        "http://0x7f.0.0.1:{}/file/secret.pdf",
                        internal.port
                    )),
                ),
                (
                    "/to-mapped",
                    Answer::Redirect(format!(
                        "http://[::ffff:127.0.0.1]:{}/file/secret.pdf",
                        internal.port
                    )),
                ),
            ],
        )
    });
    let svc = start(&env, &[]).await;

    let with =
        |id: &str, url: &str| serde_json::to_vec(&guide_request("t", "p", id, Some(url))).unwrap();
    let mut cases = vec![with("by-name", &by_name)];
    match &public {
        Some(p) => {
            println!("public address of this machine: {}", p.addr);
            cases.push(with("public-ok", &p.url("/doc.pdf")));
            cases.push(with("public-to-loopback", &p.url("/to-loopback")));
            cases.push(with("public-to-name", &p.url("/to-name")));
            for spelling in ["decimal", "hex", "mapped"] {
                cases.push(with(
                    &format!("public-to-{spelling}"),
                    &p.url(&format!("/to-{spelling}")),
                ));
            }
        }
        None => println!(
            "this machine has no address the service counts as public: only the DNS-name case runs"
        ),
    }
    publish_all(&env, &cases).await;
    wait_queue_settled(&env.vhost, "email.send", Duration::from_secs(30)).await;

    let dead = checks::take_all(&env, "email.send.dlq").await;
    let results = checks::take_all(&env, "email.send.result").await;
    let by_id = statuses(&results);
    let refused: &[(&str, &str)] = if public.is_some() {
        &[
            ("by-name", "resolves only to internal addresses"),
            ("public-to-loopback", "redirected to an internal address"),
            ("public-to-name", "resolves only to internal addresses"),
            ("public-to-decimal", "redirected to an internal address"),
            ("public-to-hex", "redirected to an internal address"),
            ("public-to-mapped", "redirected to an internal address"),
        ]
    } else {
        &[("by-name", "resolves only to internal addresses")]
    };
    assert_eq!(dead.len(), refused.len(), "{dead:?}\n{}", svc.log_text());
    for (id, why) in refused {
        let d = dead
            .iter()
            .find(|d| d["message_id"] == *id)
            .unwrap_or_else(|| panic!("{id} not dead-lettered: {dead:?}"));
        assert_eq!(d["error_class"], "permanent", "{d}");
        let err = d["error"].as_str().unwrap();
        assert!(err.contains("refused") && err.contains(why), "{id}: {err}");
        assert_eq!(
            by_id[*id],
            ["failed"],
            "{id}: one terminal result, no retry"
        );
    }
    // The internal server was never asked for anything.
    assert_eq!(internal.requests(), Vec::<String>::new());
    if let Some(p) = &public {
        // The public host itself is fetched: the refusals are the redirects' doing.
        assert_eq!(by_id["public-ok"], ["sent"], "{}", svc.log_text());
        let mails = smtp.messages();
        assert_eq!(mails.len(), 1);
        let m = mails[0].parsed();
        assert!(m.message_id().unwrap().starts_with("public-ok."));
        assert!(m.attachment(0).unwrap().contents() == public_file.as_slice());
        let mut asked = p.requests();
        asked.sort();
        assert_eq!(
            asked,
            [
                "GET /doc.pdf HTTP/1.1",
                "GET /to-decimal HTTP/1.1",
                "GET /to-hex HTTP/1.1",
                "GET /to-loopback HTTP/1.1",
                "GET /to-mapped HTTP/1.1",
                "GET /to-name HTTP/1.1",
            ]
        );
    } else {
        assert!(smtp.messages().is_empty());
    }

    // The same two internal routes are fetched by a service that allows private addresses
    // (so what refused them above was the address check, not a broken URL).
    let env2 = TestEnv::new("ssrf_allowed");
    env2.write_config("[outbound]\nattachment_allow_private = true\n");
    env2.smtp_tenant("t", "p", smtp.port, "");
    let svc2 = start(&env2, &[]).await;
    let mut allowed = vec![with("allowed-by-name", &by_name)];
    if let Some(p) = &public {
        allowed.push(with("allowed-to-loopback", &p.url("/to-loopback")));
    }
    publish_all(&env2, &allowed).await;
    wait_queue_settled(&env2.vhost, "email.send", Duration::from_secs(30)).await;
    let results = checks::take_all(&env2, "email.send.result").await;
    assert_eq!(results.len(), allowed.len(), "{}", svc2.log_text());
    assert!(results.iter().all(|r| r["status"] == "sent"), "{results:?}");
    assert_eq!(internal.requests().len(), allowed.len());
}

// ---------------------------------------------------------------------------------------
// send_timeout and a server that never answers
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_transaction_longer_than_send_timeout_is_retried_and_then_delivered_once() {
    let env = TestEnv::new("sendtimeout");
    env.write_config(
        "[outbound]\nsend_timeout = \"2s\"\n[retry]\nmax_retries = 3\ndelays = [\"2s\"]\n",
    );
    let smtp = SmtpServer::start(&env.dir.join("smtp"), &[]);
    // DATA is answered after 4 s: twice the bound.
    std::fs::write(smtp.dir.join("delay"), "4").unwrap();
    env.smtp_tenant("t", "p", smtp.port, "");
    let svc = start(&env, &[]).await;

    let published = Instant::now();
    env.publish("email.send", &body("t", "p", "slow-1")).await;
    let first = env
        .take("email.send.result", 1, Duration::from_secs(15))
        .await;
    let took = published.elapsed();
    assert_eq!(first.len(), 1, "{}", svc.log_text());
    let r = &first[0];
    println!("retrying result {took:?} after the publish: {r}");
    assert_eq!(r["status"], "retrying", "{r}");
    assert_eq!(r["error_class"], "transient", "{r}");
    assert_eq!(r["retry_count"], 1);
    let err = r["error"].as_str().unwrap();
    assert!(
        err.contains("within 2s"),
        "the error names the bound: {err}"
    );
    assert!(
        took < Duration::from_millis(3800),
        "the attempt was not cut at 2 s but waited for the server's answer: {took:?}"
    );
    std::fs::remove_file(smtp.dir.join("delay")).unwrap();

    let results = env
        .take("email.send.result", 1, Duration::from_secs(15))
        .await;
    assert_eq!(results.len(), 1, "{}", svc.log_text());
    assert_eq!(results[0]["status"], "sent", "{}", results[0]);
    wait_queue_settled(&env.vhost, "email.send", Duration::from_secs(10)).await;
    // Past the moment the server would have answered the cut attempt (4 s after it began).
    let server_would_answer = published + Duration::from_secs(5);
    if let Some(wait) = server_would_answer.checked_duration_since(Instant::now()) {
        tokio::time::sleep(wait).await;
    }
    let ids = checks::message_ids(&smtp);
    assert_eq!(ids.len(), 1, "delivered once: {ids:?}");
    assert!(ids[0].starts_with("slow-1."));
    let attempts = smtp.attempts();
    assert_eq!(
        attempts.len(),
        1,
        "the cut attempt stored nothing: {attempts:?}"
    );
    assert!(attempts[0].1.starts_with("250"));
    let db = env.db().await;
    assert_eq!(
        checks::outbox_rows(&db).await["slow-1"],
        ("sent".to_string(), 2)
    );
    assert!(checks::take_all(&env, "email.send.dlq").await.is_empty());
}

#[tokio::test]
async fn a_server_that_never_answers_fails_within_the_connect_bound_while_other_mail_flows() {
    let env = TestEnv::new("blackhole");
    env.write_config("[retry]\nmax_retries = 0\n");
    let hole = SmtpServer::start(&env.dir.join("hole"), &["--blackhole"]);
    let smtp = SmtpServer::start(&env.dir.join("smtp"), &[]);
    env.smtp_tenant("silent", "p-silent", hole.port, "");
    env.smtp_tenant("busy", "p-busy", smtp.port, "");
    let svc = start(&env, &[]).await;

    let published = Instant::now();
    env.publish("email.send", &body("silent", "p-silent", "into-the-hole"))
        .await;
    let db = env.db().await;
    assert_eq!(
        wait_count(
            &db,
            "SELECT count(*) FROM outbox WHERE message_id = 'into-the-hole' AND status = 'sending'",
            1,
            Duration::from_secs(10)
        )
        .await,
        1
    );
    // While that one hangs, the other tenant's mail goes through.
    let bodies: Vec<Vec<u8>> = (0..30)
        .map(|i| body("busy", "p-busy", &format!("busy-{i}")))
        .collect();
    publish_all(&env, &bodies).await;
    let mails = smtp.wait_for(30, Duration::from_secs(20)).await;
    let flowed = published.elapsed();
    assert_eq!(mails.len(), 30, "{}", svc.log_text());
    let results = env
        .take("email.send.result", 30, Duration::from_secs(10))
        .await;
    assert_eq!(results.len(), 30);
    assert!(results
        .iter()
        .all(|r| r["status"] == "sent" && r["tenant_id"] == "busy"));
    assert!(
        flowed < Duration::from_secs(25),
        "the other tenant waited for the silent server: {flowed:?}"
    );
    let hole_row: String = db
        .query_one(
            "SELECT status FROM outbox WHERE message_id = 'into-the-hole'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(hole_row, "sending", "still waiting for the silent server");

    // The silent server's request ends within the connect bound (30 s).
    let end = env
        .take("email.send.result", 1, Duration::from_secs(40))
        .await;
    let failed_after = published.elapsed();
    assert_eq!(end.len(), 1, "{}", svc.log_text());
    let r = &end[0];
    println!("the silent server's request failed {failed_after:?} after its publish: {r}");
    assert_eq!(r["message_id"], "into-the-hole");
    assert_eq!(r["status"], "failed", "{r}");
    assert_eq!(r["error_class"], "transient", "{r}");
    let err = r["error"].as_str().unwrap();
    assert!(
        err.contains("within 30s") && err.contains("connecting"),
        "{err}"
    );
    assert!(
        failed_after >= Duration::from_secs(29) && failed_after <= Duration::from_secs(36),
        "{failed_after:?}"
    );
    let dead = checks::take_all(&env, "email.send.dlq").await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["message_id"], "into-the-hole");
    assert_eq!(dead[0]["error_class"], "transient");
    wait_queue_settled(&env.vhost, "email.send", Duration::from_secs(10)).await;
}

// ---------------------------------------------------------------------------------------
// dlq replay --all / --tenant / --message-id
// ---------------------------------------------------------------------------------------

fn dlq_cli(env: &TestEnv, args: &[&str]) -> String {
    let out = env.command(args);
    assert!(
        out.status.success(),
        "mailbridge {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn dlq_listed(env: &TestEnv) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = dlq_cli(env, &["dlq", "list"])
        .lines()
        .map(|l| {
            let e: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                e["tenant_id"].as_str().unwrap().to_string(),
                e["message_id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn dlq_replay_by_tenant_by_message_id_and_all_sends_each_dead_letter_once() {
    let env = TestEnv::new("replaytenant");
    let smtp = SmtpServer::start(&env.dir.join("smtp"), &[]);
    smtp.set_reply(Some("550 5.7.1 Relaying denied"));
    env.smtp_tenant("tenant-a", "p-a", smtp.port, "");
    env.smtp_tenant("tenant-b", "p-b", smtp.port, "");
    let svc = start(&env, &[("MAILBRIDGE_ADMIN_TOKEN", TOKEN)]).await;
    let mut bodies = Vec::new();
    for id in ["a-1", "a-2"] {
        bodies.push(body("tenant-a", "p-a", id));
    }
    for id in ["b-1", "b-2", "b-3"] {
        bodies.push(body("tenant-b", "p-b", id));
    }
    publish_all(&env, &bodies).await;
    wait_queue_settled(&env.vhost, "email.send", Duration::from_secs(20)).await;
    let pair = |t: &str, m: &str| (t.to_string(), m.to_string());
    assert_eq!(
        dlq_listed(&env),
        [
            pair("tenant-a", "a-1"),
            pair("tenant-a", "a-2"),
            pair("tenant-b", "b-1"),
            pair("tenant-b", "b-2"),
            pair("tenant-b", "b-3"),
        ],
        "{}",
        svc.log_text()
    );
    smtp.set_reply(None);

    // One tenant's only.
    let out = dlq_cli(&env, &["dlq", "replay", "--all", "--tenant", "tenant-a"]);
    assert!(out.contains("replayed 2: "), "{out}");
    assert!(out.contains("; 3 left on email.send.dlq"), "{out}");
    assert_eq!(smtp.wait_for(2, Duration::from_secs(15)).await.len(), 2);
    wait_queue_settled(&env.vhost, "email.send", Duration::from_secs(15)).await;
    assert_eq!(
        dlq_listed(&env),
        [
            pair("tenant-b", "b-1"),
            pair("tenant-b", "b-2"),
            pair("tenant-b", "b-3")
        ]
    );

    // A message id of another tenant with --tenant: nothing is replayed.
    let out = dlq_cli(
        &env,
        &[
            "dlq",
            "replay",
            "--message-id",
            "b-1",
            "--tenant",
            "tenant-a",
        ],
    );
    assert!(out.starts_with("replayed 0: ;"), "{out}");
    // The same over HTTP: a tenant that has none of them, then an id of another tenant.
    for selection in [
        serde_json::json!({"all": true, "tenant_id": "tenant-c"}),
        serde_json::json!({"message_ids": ["b-1", "b-3"], "tenant_id": "tenant-a"}),
    ] {
        let (code, answer) =
            checks::admin(&svc, "/api/dlq/replay", Some(TOKEN), Some(selection)).await;
        assert_eq!(code, 200, "{answer}");
        assert_eq!(answer["replayed"], serde_json::json!([]), "{answer}");
        assert_eq!(answer["kept"], 3, "{answer}");
    }
    assert_eq!(dlq_listed(&env).len(), 3);
    // By message id.
    let out = dlq_cli(&env, &["dlq", "replay", "--message-id", "b-2"]);
    assert!(out.contains("replayed 1: b-2"), "{out}");
    assert_eq!(smtp.wait_for(3, Duration::from_secs(15)).await.len(), 3);
    wait_queue_settled(&env.vhost, "email.send", Duration::from_secs(15)).await;
    assert_eq!(
        dlq_listed(&env),
        [pair("tenant-b", "b-1"), pair("tenant-b", "b-3")]
    );
    // The rest.
    let out = dlq_cli(&env, &["dlq", "replay", "--all"]);
    assert!(out.contains("replayed 2: "), "{out}");
    assert!(out.contains("; 0 left"), "{out}");
    assert_eq!(smtp.wait_for(5, Duration::from_secs(15)).await.len(), 5);
    wait_queue_settled(&env.vhost, "email.send", Duration::from_secs(15)).await;
    assert!(dlq_listed(&env).is_empty());

    let delivered = tally(
        checks::message_ids(&smtp)
            .iter()
            .map(|m| checks::request_id_of(m)),
    );
    let want: BTreeMap<String, usize> = ["a-1", "a-2", "b-1", "b-2", "b-3"]
        .iter()
        .map(|id| (id.to_string(), 1))
        .collect();
    assert_eq!(delivered, want, "each delivered exactly once");
    let db = env.db().await;
    let rows = checks::outbox_rows(&db).await;
    assert!(
        rows.values().all(|(s, a)| s == "sent" && *a == 1),
        "{rows:?}"
    );
    let results = checks::take_all(&env, "email.send.result").await;
    let by_id = statuses(&results);
    for id in want.keys() {
        assert_eq!(by_id[id], ["failed", "sent"], "{id}");
    }
}

// ---------------------------------------------------------------------------------------
// A changed password restarts its sender; the others keep their sessions
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_changed_password_restarts_its_sender_and_the_others_keep_their_sessions() {
    let env = TestEnv::new("chpassword");
    let mut changing = SmtpServer::start(
        &env.dir.join("smtp-changing"),
        &["--auth", "crm:pw-one-111"],
    );
    let steady = SmtpServer::start(
        &env.dir.join("smtp-steady"),
        &["--auth", "crm:pw-steady-222"],
    );
    let (changing_port, steady_port) = (changing.port, steady.port);
    let tenant = |pw: &str| {
        format!(
            "id = \"t\"\n\
             [[providers]]\nid = \"changing\"\nkind = \"smtp\"\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\nusername = \"crm\"\npassword = \"{pw}\"\n\
             [[providers]]\nid = \"steady\"\nkind = \"smtp\"\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\nusername = \"crm\"\npassword = \"pw-steady-222\"\n",
            changing_port, steady_port
        )
    };
    env.write_tenant("t.toml", &tenant("pw-one-111"));
    let svc = start(&env, &[("MAILBRIDGE_ADMIN_TOKEN", TOKEN)]).await;
    publish_all(
        &env,
        &[body("t", "changing", "c-1"), body("t", "steady", "s-1")],
    )
    .await;
    wait_queue_settled(&env.vhost, "email.send", Duration::from_secs(15)).await;
    assert_eq!(changing.messages().len(), 1, "{}", svc.log_text());
    assert_eq!(steady.messages().len(), 1);
    let steady_sessions = checks::client_ports_to(steady.port);
    assert_eq!(steady_sessions.len(), 1, "one session kept open to steady");

    // The server now wants another password; until the reload the service has the old one.
    changing.restart_with(&["--auth", "crm:pw-two-333"]);
    env.publish("email.send", &body("t", "changing", "c-2-before-reload"))
        .await;
    let r = env
        .take("email.send.result", 3, Duration::from_secs(15))
        .await;
    let before = r
        .iter()
        .find(|r| r["message_id"] == "c-2-before-reload")
        .unwrap_or_else(|| panic!("{r:?}\n{}", svc.log_text()));
    assert_eq!(before["status"], "failed", "{before}");
    assert!(
        before["error"].as_str().unwrap().contains("535"),
        "{before}"
    );

    // The tenant file gets the new password (only an explicit reload can see this write).
    checks::replace_unnoticed(&env.dir.join("tenants.d/t.toml"), &tenant("pw-two-333"));
    let (code, answer) = checks::admin(
        &svc,
        "/api/config/reload",
        Some(TOKEN),
        Some(serde_json::json!({})),
    )
    .await;
    assert_eq!(code, 200, "{answer}");
    let diff = &answer["outcome"]["diff"];
    assert_eq!(
        diff["providers_changed"],
        serde_json::json!(["changing"]),
        "{answer}"
    );
    for key in [
        "tenants_added",
        "tenants_removed",
        "providers_added",
        "providers_removed",
        "mailboxes_added",
        "mailboxes_removed",
        "mailboxes_changed",
        "restart_required",
    ] {
        assert_eq!(diff[key], serde_json::json!([]), "{key}: {answer}");
    }

    publish_all(
        &env,
        &[body("t", "changing", "c-3"), body("t", "steady", "s-2")],
    )
    .await;
    wait_queue_settled(&env.vhost, "email.send", Duration::from_secs(15)).await;
    let got: Vec<String> = checks::message_ids(&changing)
        .iter()
        .map(|m| checks::request_id_of(m))
        .collect();
    assert_eq!(got, ["c-1", "c-3"], "{}", svc.log_text());
    assert!(changing.messages().iter().all(|m| m.authenticated));
    let got: Vec<String> = checks::message_ids(&steady)
        .iter()
        .map(|m| checks::request_id_of(m))
        .collect();
    assert_eq!(got, ["s-1", "s-2"]);
    assert_eq!(
        checks::client_ports_to(steady.port),
        steady_sessions,
        "steady's session was closed and reopened by the reload"
    );
    let results = checks::take_all(&env, "email.send.result").await;
    let by_id = statuses(&results);
    assert_eq!(by_id["c-3"], ["sent"]);
    assert_eq!(by_id["s-2"], ["sent"]);
    let log = svc.log_text();
    for pw in ["pw-one-111", "pw-two-333", "pw-steady-222"] {
        assert!(!log.contains(pw), "{pw} in the log");
    }
}

// ---------------------------------------------------------------------------------------
// The configuration mirror holds no secrets
// ---------------------------------------------------------------------------------------

/// Every row of `table` as text (all columns), sorted.
async fn table_text(db: &tokio_postgres::Client, table: &str) -> Vec<String> {
    let mut rows = common::texts(db, &format!("SELECT t::text FROM {table} t")).await;
    rows.sort();
    rows
}

async fn assert_no_secret_in_mirror(db: &tokio_postgres::Client, secrets: &[&str]) {
    for table in ["tenants", "providers", "mailboxes"] {
        for row in table_text(db, table).await {
            for s in secrets {
                assert!(!row.contains(s), "{table} holds {s}: {row}");
            }
        }
    }
}

type ProviderRow = (
    String,
    String,
    String,
    String,
    Option<String>,
    Option<i32>,
    Option<String>,
    Option<String>,
    i32,
);

async fn mirrored_providers(db: &tokio_postgres::Client) -> Vec<ProviderRow> {
    db.query(
        "SELECT id, tenant_id, name, kind, host, port, tls, username, max_connections
         FROM providers ORDER BY id",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| {
        (
            r.get(0),
            r.get(1),
            r.get(2),
            r.get(3),
            r.get(4),
            r.get(5),
            r.get(6),
            r.get(7),
            r.get(8),
        )
    })
    .collect()
}

type MailboxRow = (
    String,
    String,
    String,
    String,
    String,
    String,
    i32,
    String,
    String,
    String,
    bool,
    i64,
);

async fn mirrored_mailboxes(db: &tokio_postgres::Client) -> Vec<MailboxRow> {
    db.query(
        "SELECT id, tenant_id, provider_id, user_id, protocol, host, port, tls, username,
                folder, idle, poll_interval_secs FROM mailboxes ORDER BY id",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| {
        (
            r.get(0),
            r.get(1),
            r.get(2),
            r.get(3),
            r.get(4),
            r.get(5),
            r.get(6),
            r.get(7),
            r.get(8),
            r.get(9),
            r.get(10),
            r.get(11),
        )
    })
    .collect()
}

#[tokio::test]
async fn the_mirror_matches_the_configuration_and_holds_no_secret_after_start_and_reload() {
    let env = TestEnv::new("mirror");
    let dead = common::free_port();
    let secret_file = env.dir.join("smtp-password.txt");
    std::fs::write(&secret_file, "file-secret-CCC3\n").unwrap();
    let tenant_a = |inline: &str, with_pop: bool| {
        let pop = if with_pop {
            format!(
                "[[mailboxes]]\nid = \"mb-pop\"\nuser_id = \"u-2\"\nprovider_id = \"p-env\"\nprotocol = \"pop3\"\nhost = \"127.0.0.1\"\nport = {dead}\ntls = \"none\"\nusername = \"pop-user\"\npassword_env = \"MB_MIRROR_POP\"\npoll_interval = \"60s\"\n"
            )
        } else {
            String::new()
        };
        format!(
            "id = \"t-a\"\nname = \"Tenant A\"\n\
             [[providers]]\nid = \"p-inline\"\nname = \"Inline\"\nkind = \"smtp\"\nhost = \"smtp.a.example\"\nport = 587\ntls = \"starttls\"\nusername = \"a-user\"\npassword = \"{inline}\"\nmax_connections = 3\n\
             [[providers]]\nid = \"p-env\"\nkind = \"smtp\"\nhost = \"127.0.0.1\"\nport = {dead}\ntls = \"none\"\nusername = \"env-user\"\npassword_env = \"MB_MIRROR_PW\"\n\
             [[providers]]\nid = \"p-file\"\nkind = \"smtp\"\nhost = \"smtp.f.example\"\nport = 465\ntls = \"tls\"\nusername = \"file-user\"\npassword_file = \"{}\"\n\
             [[providers]]\nid = \"p-oauth\"\nkind = \"smtp\"\nhost = \"smtp.o.example\"\nport = 587\ntls = \"starttls\"\nusername = \"oauth-user\"\noauth2_token_env = \"MB_MIRROR_TOKEN\"\n\
             [[providers]]\nid = \"p-files\"\nkind = \"file\"\ndir = \"out\"\n\
             [[mailboxes]]\nid = \"mb-imap\"\nuser_id = \"u-1\"\nprovider_id = \"p-inline\"\nprotocol = \"imap\"\nhost = \"127.0.0.1\"\nport = {dead}\ntls = \"none\"\nusername = \"imap-user\"\npassword = \"mailbox-secret-EEE5\"\nfolder = \"CRM\"\nidle = false\npoll_interval = \"45s\"\n{pop}",
            secret_file.display()
        )
    };
    env.write_tenant("a.toml", &tenant_a("inline-secret-AAA1", true));
    let vars = [
        ("MAILBRIDGE_ADMIN_TOKEN", TOKEN),
        ("MB_MIRROR_PW", "env-secret-BBB2"),
        ("MB_MIRROR_TOKEN", "oauth-secret-DDD4"),
        ("MB_MIRROR_POP", "mailbox-env-FFF6"),
    ];
    let svc = start(&env, &vars).await;
    let db = env.db().await;
    // Written at start beside the first health check, in one transaction.
    let start_wait = Instant::now();
    while db
        .query("SELECT 1 FROM tenants", &[])
        .await
        .map(|r| r.is_empty())
        .unwrap_or(true)
    {
        assert!(
            start_wait.elapsed() < Duration::from_secs(10),
            "{}",
            svc.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut secrets = vec![
        "inline-secret-AAA1",
        "env-secret-BBB2",
        "file-secret-CCC3",
        "oauth-secret-DDD4",
        "mailbox-secret-EEE5",
        "mailbox-env-FFF6",
        TOKEN,
    ];
    assert_no_secret_in_mirror(&db, &secrets).await;

    let tenants: Vec<(String, String, String)> = db
        .query("SELECT id, name, file FROM tenants ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(tenants.len(), 1);
    assert_eq!(
        (tenants[0].0.as_str(), tenants[0].1.as_str()),
        ("t-a", "Tenant A")
    );
    assert!(tenants[0].2.ends_with("tenants.d/a.toml"), "{tenants:?}");
    let s = |x: &str| x.to_string();
    let smtp = |id: &str, name: &str, host: &str, port: i32, tls: &str, user: &str, max: i32| {
        (
            s(id),
            s("t-a"),
            s(name),
            s("smtp"),
            Some(s(host)),
            Some(port),
            Some(s(tls)),
            Some(s(user)),
            max,
        )
    };
    let providers = mirrored_providers(&db).await;
    let mut want = vec![
        smtp(
            "p-env",
            "p-env",
            "127.0.0.1",
            dead as i32,
            "none",
            "env-user",
            4,
        ),
        smtp(
            "p-file",
            "p-file",
            "smtp.f.example",
            465,
            "tls",
            "file-user",
            4,
        ),
        (
            s("p-files"),
            s("t-a"),
            s("p-files"),
            s("file"),
            None,
            None,
            None,
            None,
            4,
        ),
        smtp(
            "p-inline",
            "Inline",
            "smtp.a.example",
            587,
            "starttls",
            "a-user",
            3,
        ),
        smtp(
            "p-oauth",
            "p-oauth",
            "smtp.o.example",
            587,
            "starttls",
            "oauth-user",
            4,
        ),
    ];
    assert_eq!(providers, want);
    let imap_row: MailboxRow = (
        s("mb-imap"),
        s("t-a"),
        s("p-inline"),
        s("u-1"),
        s("imap"),
        s("127.0.0.1"),
        dead as i32,
        s("none"),
        s("imap-user"),
        s("CRM"),
        false,
        45,
    );
    let pop_row: MailboxRow = (
        s("mb-pop"),
        s("t-a"),
        s("p-env"),
        s("u-2"),
        s("pop3"),
        s("127.0.0.1"),
        dead as i32,
        s("none"),
        s("pop-user"),
        s("INBOX"),
        true,
        60,
    );
    assert_eq!(mirrored_mailboxes(&db).await, [imap_row.clone(), pop_row]);

    // Reload: new secrets for two providers, a new tenant with its own, a mailbox removed.
    std::fs::write(&secret_file, "file-secret-GGG7\n").unwrap();
    env.write_tenant("a.toml", &tenant_a("inline-secret-HHH8", false));
    env.write_tenant(
        "b.toml",
        "id = \"t-b\"\n[[providers]]\nid = \"p-b\"\nkind = \"smtp\"\nhost = \"smtp.b.example\"\nport = 25\ntls = \"none\"\nusername = \"b-user\"\npassword = \"tenant-b-secret-III9\"\n",
    );
    let (code, answer) = checks::admin(
        &svc,
        "/api/config/reload",
        Some(TOKEN),
        Some(serde_json::json!({})),
    )
    .await;
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["outcome"]["applied"], true, "{answer}");
    // The mirror is rewritten right after the reload.
    let start_wait = Instant::now();
    while table_text(&db, "tenants").await.len() != 2 {
        assert!(
            start_wait.elapsed() < Duration::from_secs(10),
            "{}",
            svc.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // What changed, whichever reload applied it first: this one, or the file watcher's
    // (which may beat it on a slow machine, leaving it an empty diff).
    let diff = checks::merged_diff(&checks::reload_diffs(&svc.log_text()));
    let list = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let want_diff: BTreeMap<String, Vec<String>> = [
        ("tenants_added", list(&["t-b"])),
        ("tenants_removed", list(&[])),
        ("providers_added", list(&["p-b"])),
        ("providers_removed", list(&[])),
        ("providers_changed", list(&["p-file", "p-inline"])),
        ("mailboxes_added", list(&[])),
        ("mailboxes_removed", list(&["mb-pop"])),
        ("mailboxes_changed", list(&[])),
        ("restart_required", list(&[])),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(diff, want_diff);
    secrets.extend([
        "file-secret-GGG7",
        "inline-secret-HHH8",
        "tenant-b-secret-III9",
    ]);
    assert_no_secret_in_mirror(&db, &secrets).await;
    want.insert(
        0,
        (
            s("p-b"),
            s("t-b"),
            s("p-b"),
            s("smtp"),
            Some(s("smtp.b.example")),
            Some(25),
            Some(s("none")),
            Some(s("b-user")),
            4,
        ),
    );
    assert_eq!(mirrored_providers(&db).await, want);
    assert_eq!(mirrored_mailboxes(&db).await, [imap_row]);
    let (_, health) = svc.get("/health").await.unwrap();
    let mut svc = svc;
    let log = svc.log_text();
    for secret in &secrets {
        assert!(!health.contains(secret), "{secret} in /health");
        assert!(!log.contains(secret), "{secret} in the log");
    }

    // Rewritten at start: a tenant removed while the service was stopped leaves the mirror.
    assert!(svc.terminate(Duration::from_secs(10)).success());
    std::fs::remove_file(env.dir.join("tenants.d/b.toml")).unwrap();
    let svc = start(&env, &vars).await;
    let start_wait = Instant::now();
    while table_text(&db, "tenants").await.len() != 1 {
        assert!(
            start_wait.elapsed() < Duration::from_secs(10),
            "{}",
            svc.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    want.remove(0);
    assert_eq!(mirrored_providers(&db).await, want);
    assert_no_secret_in_mirror(&db, &secrets).await;
}

// ---------------------------------------------------------------------------------------
// SIGTERM drains in-flight work under load
// ---------------------------------------------------------------------------------------

/// `n` requests queued, 300 taken up at once (prefetch), spread over one SMTP server per
/// entry of `delays`, each answering DATA after that many seconds, each the server of one
/// provider with `connections` sessions; SIGTERM once 20 are delivered. The
/// service must exit 0 within `grace_secs` (+1.5 s to close), leave no email accepted by the
/// server without its row `sent` and no delivery unacknowledged; started again, it must
/// deliver every request exactly once (by Message-ID at the server).
async fn sigterm_under_load(
    tag: &str,
    n: usize,
    connections: u32,
    delays: &[&str],
    grace_secs: u64,
    drains_within_grace: bool,
) {
    let env = TestEnv::new(tag);
    let config = std::fs::read_to_string(env.config_path()).unwrap();
    assert!(config.contains("grace = \"5s\"") && config.contains("[rabbitmq]\n"));
    std::fs::write(
        env.config_path(),
        config
            .replace("grace = \"5s\"", &format!("grace = \"{grace_secs}s\""))
            .replace("[rabbitmq]\n", "[rabbitmq]\nprefetch = 300\n"),
    )
    .unwrap();
    let servers: Vec<SmtpServer> = delays
        .iter()
        .enumerate()
        .map(|(i, delay)| {
            let smtp = SmtpServer::start(&env.dir.join(format!("smtp-{i}")), &[]);
            std::fs::write(smtp.dir.join("delay"), delay).unwrap();
            smtp
        })
        .collect();
    let providers: String = servers
        .iter()
        .enumerate()
        .map(|(i, smtp)| {
            format!(
                "[[providers]]\nid = \"p{i}\"\nkind = \"smtp\"\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\nmax_connections = {connections}\n",
                smtp.port
            )
        })
        .collect();
    env.write_tenant("t.toml", &format!("id = \"t\"\n{providers}"));
    // Everything the servers hold, by request id.
    let delivered_now = || {
        tally(
            servers
                .iter()
                .flat_map(checks::message_ids)
                .map(|m| checks::request_id_of(&m)),
        )
    };
    declare_send_queue(&env).await;
    let bodies: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            body(
                "t",
                &format!("p{}", i % servers.len()),
                &format!("load-{i}"),
            )
        })
        .collect();
    publish_all(&env, &bodies).await;

    let mut svc = start(&env, &[]).await;
    let stored = || -> usize {
        servers
            .iter()
            .map(|smtp| {
                std::fs::read_dir(&smtp.dir)
                    .unwrap()
                    .filter(|e| {
                        e.as_ref()
                            .unwrap()
                            .path()
                            .extension()
                            .is_some_and(|x| x == "eml")
                    })
                    .count()
            })
            .sum()
    };
    let waiting = Instant::now();
    while stored() < 20 {
        assert!(
            waiting.elapsed() < Duration::from_secs(30),
            "{}",
            svc.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, unacked) = checks::queue_counts(&env.vhost, "email.send").unwrap();
    println!(
        "at SIGTERM: {} delivered, {unacked} deliveries unacked",
        stored()
    );
    assert!(unacked >= 200, "work in flight at SIGTERM: {unacked}");
    let unacked_at_term = unacked;

    let stopping = Instant::now();
    let status = svc.terminate(Duration::from_secs(grace_secs + 15));
    let took = stopping.elapsed();
    println!("exited {status:?} {took:?} after SIGTERM (grace {grace_secs} s)");
    assert!(
        status.success(),
        "exit status {status:?}\n{}",
        svc.log_text()
    );
    assert!(
        took <= Duration::from_millis(grace_secs * 1000 + 1500),
        "grace is {grace_secs} s: {took:?}"
    );
    let log = svc.log_text();
    assert!(
        log.contains("shutting down: draining in-flight work"),
        "{log}"
    );
    assert_eq!(
        !log.contains("in-flight work did not finish within the grace period"),
        drains_within_grace,
        "the drain was expected to {} within the grace",
        if drains_within_grace {
            "finish"
        } else {
            "not finish"
        }
    );

    // What the server accepted before the exit is recorded `sent`; the rest is back on the
    // queue, nothing unacknowledged.
    let db = env.db().await;
    let rows = checks::outbox_rows(&db).await;
    let sent = rows.values().filter(|(s, _)| s == "sent").count();
    let at_exit = delivered_now();
    let unrecorded: Vec<&String> = at_exit
        .keys()
        .filter(|id| rows.get(*id).is_none_or(|(s, _)| s != "sent"))
        .collect();
    println!(
        "after the exit: {} emails at the server, {sent} rows sent, {} rows in all; accepted but not recorded: {unrecorded:?}",
        at_exit.len(),
        rows.len()
    );
    if drains_within_grace {
        assert_eq!(
            sent,
            rows.len(),
            "rows left unfinished by the drain: {:?}",
            rows.iter()
                .filter(|(_, (s, _))| s != "sent")
                .collect::<Vec<_>>()
        );
    }
    let counts = checks::queue_counts(&env.vhost, "email.send").unwrap();
    println!("queue (ready, unacked) after the exit: {counts:?}");
    assert_eq!(counts.1, 0, "no delivery held unacknowledged");
    if drains_within_grace {
        assert_eq!(counts.0, (n - sent) as u64, "the rest is back on the queue");
    } else {
        // Every request without a `sent` row is back (and some with one, whose ack was cut).
        assert!(counts.0 >= (n - sent) as u64, "requests lost: {counts:?}");
    }
    assert!(sent > 20 && sent < n, "{sent}");

    // Started again: the rest, each once.
    let svc = start(&env, &[]).await;
    let all = wait_count(
        &db,
        "SELECT count(*) FROM outbox WHERE status = 'sent'",
        n as i64,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(all, n as i64, "{}", svc.log_text());
    wait_queue_settled(&env.vhost, "email.send", Duration::from_secs(15)).await;
    let delivered = delivered_now();
    let twice: Vec<(&String, &usize)> = delivered.iter().filter(|(_, c)| **c > 1).collect();
    let fault = format!(
        "SIGTERM with {unacked_at_term} deliveries in flight, grace {grace_secs} s ({})",
        if drains_within_grace {
            "enough"
        } else {
            "too short"
        }
    );
    let note = format!(
        "exit 0 after {took:.1?}; {}; the rest sent after the restart",
        if drains_within_grace {
            "in-flight work finished"
        } else {
            "transactions before their final dot abandoned and requeued, those past it recorded"
        }
    );
    common::ledger::Report {
        fault: &fault,
        messages: n,
        once: delivered.values().filter(|c| **c == 1).count(),
        duplicated: delivered.values().map(|c| c.saturating_sub(1)).sum(),
        lost: n.saturating_sub(delivered.len()),
        stuck: checks::outbox_rows(&db)
            .await
            .values()
            .filter(|(s, _)| s != "sent")
            .count(),
        note: &note,
    }
    .print();
    assert_eq!(delivered.len(), n);
    assert!(
        twice.is_empty() && unrecorded.is_empty(),
        "delivered more than once: {twice:?}; accepted by the server but not recorded `sent` when the service exited: {unrecorded:?}"
    );
    let results = checks::take_all(&env, "email.send.result").await;
    let by_id = statuses(&results);
    assert_eq!(by_id.len(), n);
    assert!(
        by_id.values().all(|s| s.iter().all(|x| x == "sent")),
        "{by_id:?}"
    );
    if drains_within_grace {
        assert!(by_id.values().all(|s| s.len() == 1), "{by_id:?}");
        let rows = checks::outbox_rows(&db).await;
        assert!(
            rows.values().all(|(s, a)| s == "sent" && *a == 1),
            "{rows:?}"
        );
    }
}

#[tokio::test]
async fn sigterm_under_load_drains_in_flight_work_and_a_restart_delivers_the_rest_once() {
    // 16 sessions, 0.3 s per email: the 300 in flight take about 6 s, the grace is 20 s;
    // what is still queued behind them waits for the restart.
    sigterm_under_load("drain", 700, 16, &["0.3"], 20, true).await;
}

#[tokio::test]
async fn sigterm_with_more_in_flight_than_the_grace_allows_exits_in_time_and_sends_nothing_twice() {
    // 4 servers answering after 0.23 to 0.29 s, 12 sessions each (about 190 emails a
    // second, their answers spread out in time): the 300 in flight and the refills need
    // more than the 1 s grace, so the service exits with transactions under way.
    sigterm_under_load(
        "drainshort",
        800,
        12,
        &["0.23", "0.25", "0.27", "0.29"],
        1,
        false,
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// The service starts before PostgreSQL
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn the_service_started_before_postgresql_becomes_ready_by_itself_and_sends() {
    let env = TestEnv::new("pglate");
    let pg = PgCluster::start(&env.dir.join("pg"), None);
    pg.stop_fast();
    let smtp = SmtpServer::start(&env.dir.join("smtp"), &[]);
    env.smtp_tenant("t", "p", smtp.port, "");
    let url = pg.url("mailbridge_late");
    let svc = Service::start_with(&env, &[("DATABASE_URL", url.as_str())]);

    let h = checks::wait_health_json(&svc, Duration::from_secs(20), "database down", |h| {
        h["components"]["database"]["status"] == "down"
            && h["components"]["rabbitmq"]["status"] == "ok"
    })
    .await;
    let err = h["components"]["database"]["last_error"].as_str().unwrap();
    assert!(!err.is_empty(), "{h}");
    let (code, _) = svc.get("/health").await.unwrap();
    assert_eq!(code, 503);
    // A request published meanwhile waits on the queue.
    env.publish("email.send", &body("t", "p", "waited-for-the-database"))
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (code, h) = svc.get_json("/health").await;
    assert_eq!(code, 503, "still no database: {h}");
    assert!(smtp.messages().is_empty());

    pg.start_again();
    let took = svc.wait_health(200, Duration::from_secs(30)).await;
    println!("ready {took:?} after PostgreSQL started (database down before: {err})");
    let (_, h) = svc.get_json("/health").await;
    assert_eq!(h["status"], "ok", "{h}");
    assert_eq!(h["components"]["database"]["status"], "ok");
    let mails = smtp.wait_for(1, Duration::from_secs(15)).await;
    assert_eq!(mails.len(), 1, "{}", svc.log_text());
    assert!(mails[0]
        .parsed()
        .message_id()
        .unwrap()
        .starts_with("waited-for-the-database."));
    let (db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("the service created its database in the cluster");
    tokio::spawn(conn);
    assert_eq!(
        wait_count(
            &db,
            "SELECT count(*) FROM outbox WHERE message_id = 'waited-for-the-database' AND status = 'sent'",
            1,
            Duration::from_secs(10)
        )
        .await,
        1
    );
    let results = env
        .take("email.send.result", 1, Duration::from_secs(10))
        .await;
    assert_eq!(results.len(), 1);
    assert_eq!(results[0]["status"], "sent");
    drop(db);
    drop(svc);
}
