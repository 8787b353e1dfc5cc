//! Outbound promises under hostile input and faults, each shown by doing the damage for real
//! against the real RabbitMQ, PostgreSQL and SMTP server: every request ends in exactly one
//! visible place (delivered once, or the DLQ with one terminal result), nothing is sent twice,
//! and bad input or a slow peer never stops or stalls the rest.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::ledger::{
    deliveries, drain, outbox_statuses, publish_all, results_by_id, tracked_request,
    wait_delivered, wait_queue_drained,
};
use common::{Service, SmtpServer, TestEnv};

const TENANT: &str = "tenant-x";
const PROVIDER: &str = "provider-x";

fn body(v: &serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap()
}

async fn start(env: &TestEnv, smtp: &SmtpServer, extra: &str) -> Service {
    env.smtp_tenant(TENANT, PROVIDER, smtp.port, extra);
    let svc = Service::start(env);
    svc.wait_health(200, Duration::from_secs(30)).await;
    svc
}

/// Asserts that each of `ids` arrived exactly once and nothing else arrived.
fn assert_delivered_once(smtp: &SmtpServer, ids: &[String], log: &str) {
    let got = deliveries(smtp);
    let twice: Vec<_> = got.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    let missing: Vec<_> = ids.iter().filter(|id| !got.contains_key(*id)).collect();
    assert!(
        missing.is_empty(),
        "never delivered ({}): {:?}\n{log}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    assert_eq!(got.len(), ids.len(), "unexpected deliveries: {got:?}");
}

/// Prints this run's row of `docs/reliability.md`: `expected` were to be delivered once each
/// and `refused` requests to end in the DLQ (`dead` of them did, counted by the caller).
async fn report(
    env: &TestEnv,
    smtp: &SmtpServer,
    fault: &str,
    expected: &[String],
    refused: usize,
    dead: usize,
    note: &str,
) {
    let got = deliveries(smtp);
    let once = expected
        .iter()
        .filter(|id| got.get(*id) == Some(&1))
        .count();
    let duplicated = got.values().map(|n| n.saturating_sub(1)).sum();
    let lost =
        expected.iter().filter(|id| !got.contains_key(*id)).count() + refused.saturating_sub(dead);
    let db = env.db().await;
    let open: i64 = db
        .query_one(
            "SELECT count(*) FROM outbox WHERE status NOT IN ('sent', 'failed')",
            &[],
        )
        .await
        .map(|r| r.get(0))
        .unwrap_or(-1);
    let (ready, unacked) = common::ledger::queue_counts(env, "email.send");
    common::ledger::Report {
        fault,
        messages: expected.len() + refused,
        once: once + dead.min(refused),
        duplicated,
        lost,
        stuck: usize::try_from(open).unwrap_or(0) + (ready + unacked) as usize,
        note,
    }
    .print();
}

#[tokio::test]
async fn nul_bytes_and_control_characters_fail_only_their_own_requests() {
    let env = TestEnv::new("nul");
    let smtp = SmtpServer::start(&env.dir.join("smtp"), &[]);
    let svc = start(&env, &smtp, "").await;

    let normal: Vec<String> = (0..200).map(|i| format!("ok-{i}")).collect();
    // Each bad request has one field PostgreSQL or a header cannot carry.
    let mut bad: Vec<(String, serde_json::Value)> = Vec::new();
    let mut add = |id: &str, edit: &dyn Fn(&mut serde_json::Value)| {
        let mut r = tracked_request(TENANT, PROVIDER, id);
        edit(&mut r);
        bad.push((id.to_string(), r));
    };
    add("bad-user", &|r| r["user_id"] = "u\u{0}x".into());
    add("bad-campaign", &|r| r["campaign_id"] = "c\u{0}".into());
    add("bad-template", &|r| r["template_id"] = "\u{0}t".into());
    add("bad-header-name", &|r| {
        r["headers"]["X-\u{0}A"] = "v".into()
    });
    add("bad-header-value", &|r| {
        r["headers"]["X-B"] = "v\u{0}".into()
    });
    add("bad-subject", &|r| r["subject"] = "hi\u{0}there".into());
    add("bad-subject-esc", &|r| r["subject"] = "bell\u{7}".into());
    add("bad-from", &|r| r["from"] = "a\u{0}@company.com".into());
    add("bad-to", &|r| {
        r["to"] = serde_json::json!(["x\u{0}y@example.com"])
    });
    add("bad-filename", &|r| {
        r["attachments"] = serde_json::json!([{"filename": "a\u{0}.pdf",
            "url": "http://127.0.0.1:1/a.pdf", "mime_type": "application/pdf"}])
    });
    add("bad-provider", &|r| r["provider_id"] = "p\u{0}".into());
    // Ids that cannot key a row at all.
    add("bad-tenant", &|r| r["tenant_id"] = "t\u{0}".into());
    add("ignored", &|r| r["message_id"] = "m\u{0}x".into());
    let bad_count = bad.len();

    let mut bodies = Vec::new();
    for (i, id) in normal.iter().enumerate() {
        bodies.push(body(&tracked_request(TENANT, PROVIDER, id)));
        // Interleaved, so the bad ones share the outbox's batches with good ones.
        if i % 15 == 7 {
            if let Some((_, r)) = bad.get(i / 15) {
                bodies.push(body(r));
            }
        }
    }
    for (_, r) in bad.iter().skip(bodies.len() - normal.len()) {
        bodies.push(body(r));
    }
    assert_eq!(bodies.len(), normal.len() + bad_count);
    publish_all(&env, &bodies).await;

    assert_eq!(
        wait_delivered(&smtp, normal.len(), Duration::from_secs(60)).await,
        normal.len()
    );
    assert!(wait_queue_drained(&env, "email.send", Duration::from_secs(30)).await);
    assert_delivered_once(&smtp, &normal, &svc.log_text());

    let dead = drain(&env, "email.send.dlq", Duration::from_secs(3)).await;
    report(
        &env,
        &smtp,
        "NUL and control characters in every field, among 200 requests",
        &normal,
        bad_count,
        dead.len(),
        "each bad request refused at decoding (invalid, field named), dead-lettered with one failed result; the 200 delivered",
    )
    .await;
    assert_eq!(dead.len(), bad_count, "{dead:#?}");
    for d in &dead {
        assert_eq!(d["error_class"], "invalid", "{d}");
        let error = d["error"].as_str().unwrap();
        assert!(
            error.contains("control character")
                || error.contains("line break")
                || error.contains("not a valid header name"),
            "{error}"
        );
        assert!(
            !error.contains('\u{0}'),
            "no raw NUL in an error: {error:?}"
        );
        assert!(d["request"].is_object(), "the request is kept: {d}");
    }
    let results = drain(&env, "email.send.result", Duration::from_secs(3)).await;
    let by_id = results_by_id(&results);
    for id in &normal {
        assert_eq!(by_id.get(&(id.clone(), "sent".into())), Some(&1), "{id}");
    }
    let failed: usize = by_id
        .iter()
        .filter(|((_, s), _)| s == "failed")
        .map(|(_, n)| n)
        .sum();
    assert_eq!(failed, bad_count, "one terminal result each: {by_id:?}");
    assert_eq!(results.len(), normal.len() + bad_count);

    let db = env.db().await;
    let statuses = outbox_statuses(&db).await;
    assert_eq!(statuses.get("sent"), Some(&200), "{statuses:?}");
    // Rows for the bad requests whose ids can key one; none is left in between.
    assert_eq!(
        statuses.get("failed"),
        Some(&((bad_count - 2) as i64)),
        "{statuses:?}"
    );
    assert_eq!(statuses.len(), 2, "{statuses:?}");
    let log = svc.log_text();
    assert!(!log.contains("outbox batch failed"), "{log}");
}

#[tokio::test]
async fn the_same_request_published_again_is_sent_once_with_one_terminal_result() {
    let env = TestEnv::new("dupes");
    let smtp = SmtpServer::start(&env.dir.join("smtp"), &[]);
    // Slow enough that copies published together overlap in processing.
    std::fs::write(smtp.dir.join("delay"), "0.5").unwrap();
    let svc = start(&env, &smtp, "").await;

    // 1. Five copies of each of 20 requests at once (a CRM's retries, lost confirms).
    let ids: Vec<String> = (0..20).map(|i| format!("twice-{i}")).collect();
    let mut bodies = Vec::new();
    for _ in 0..5 {
        for id in &ids {
            bodies.push(body(&tracked_request(TENANT, PROVIDER, id)));
        }
    }
    publish_all(&env, &bodies).await;
    assert_eq!(
        wait_delivered(&smtp, ids.len(), Duration::from_secs(60)).await,
        ids.len()
    );
    assert!(wait_queue_drained(&env, "email.send", Duration::from_secs(60)).await);
    assert_delivered_once(&smtp, &ids, &svc.log_text());

    // 2. A copy of an email sent long ago: still not sent again.
    publish_all(&env, &[body(&tracked_request(TENANT, PROVIDER, "twice-3"))]).await;
    assert!(wait_queue_drained(&env, "email.send", Duration::from_secs(30)).await);

    // 3. A copy published while the first copy's retry is parked: the parked retry goes on,
    //    the copy stands down.
    std::fs::remove_file(smtp.dir.join("delay")).unwrap();
    smtp.set_reply(Some("451 4.3.0 Try again later"));
    publish_all(&env, &[body(&tracked_request(TENANT, PROVIDER, "parked"))]).await;
    let retrying = env
        .take("email.send.result", 21, Duration::from_secs(20))
        .await;
    assert!(
        retrying
            .iter()
            .any(|r| r["message_id"] == "parked" && r["status"] == "retrying"),
        "{retrying:?}"
    );
    publish_all(&env, &[body(&tracked_request(TENANT, PROVIDER, "parked"))]).await;
    assert!(wait_queue_drained(&env, "email.send", Duration::from_secs(10)).await);
    smtp.set_reply(None);
    // The parked retry (1 s) delivers it.
    let start = Instant::now();
    while !deliveries(&smtp).contains_key("parked") && start.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(wait_queue_drained(&env, "email.send", Duration::from_secs(20)).await);
    let mut all = ids.clone();
    all.push("parked".into());
    report(
        &env,
        &smtp,
        "The same request published 5 times at once, again after it was sent, and while its retry was parked",
        &all,
        0,
        0,
        "copies wait for the first copy's claim, then stand down as duplicates; one sent result each",
    )
    .await;
    assert_delivered_once(&smtp, &all, &svc.log_text());

    let mut results = retrying;
    results.extend(drain(&env, "email.send.result", Duration::from_secs(3)).await);
    let by_id = results_by_id(&results);
    for id in &all {
        assert_eq!(
            by_id.get(&(id.clone(), "sent".into())),
            Some(&1),
            "exactly one sent result for {id}: {by_id:?}"
        );
        assert_eq!(by_id.get(&(id.clone(), "failed".into())), None);
    }
    assert!(drain(&env, "email.send.dlq", Duration::from_millis(500))
        .await
        .is_empty());
    let db = env.db().await;
    let statuses = outbox_statuses(&db).await;
    assert_eq!(statuses, BTreeMap::from([("sent".into(), 21)]));
    let claimed: i64 = db
        .query_one(
            "SELECT count(*) FROM outbox WHERE claim_token IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(claimed, 0, "no claim is left behind");
    assert!(svc.log_text().contains("already sent; not sending again"));
}

/// Publishes raw bodies (not necessarily JSON) to `email.send`.
async fn publish_raw(env: &TestEnv, bodies: &[Vec<u8>]) {
    publish_all(env, bodies).await;
}

#[tokio::test]
async fn hostile_requests_end_in_the_dlq_and_never_stall_the_others() {
    let env = TestEnv::new("hostile");
    let smtp = SmtpServer::start(&env.dir.join("smtp"), &[]);
    let svc = start(&env, &smtp, "").await;

    let mut hostile: Vec<(&str, Vec<u8>)> = Vec::new();
    let with = |id: &str, edit: &dyn Fn(&mut serde_json::Value)| {
        let mut r = tracked_request(TENANT, PROVIDER, id);
        edit(&mut r);
        body(&r)
    };
    hostile.push((
        "huge-subject",
        with("huge-subject", &|r| {
            r["subject"] = "s".repeat(10 << 20).into()
        }),
    ));
    hostile.push((
        "many-recipients",
        with("many-recipients", &|r| {
            r["to"] = (0..10_000)
                .map(|i| format!("user{i}@example.com"))
                .collect::<Vec<_>>()
                .into()
        }),
    ));
    hostile.push((
        "huge-body",
        with("huge-body", &|r| {
            r["body_content"] = "<p>x</p>".repeat(20 << 17).into()
        }),
    ));
    let mut deep = "[".repeat(100_000);
    deep.push_str(&"]".repeat(100_000));
    hostile.push((
        "deep",
        format!(
            r#"{{"tenant_id":"{TENANT}","provider_id":"{PROVIDER}","message_id":"deep","x":{deep}}}"#
        )
        .into_bytes(),
    ));
    hostile.push((
        "wrong-types",
        with("wrong-types", &|r| {
            r["to"] = serde_json::json!("not-a-list@example.com");
            r["attachments"] = serde_json::json!({"a": 1});
        }),
    ));
    hostile.push((
        "duplicate-keys",
        format!(
            r#"{{"tenant_id":"{TENANT}","provider_id":"{PROVIDER}","message_id":"duplicate-keys","from":"a@company.com","to":["b@example.com"],"to":["c@example.com"],"body_format":"TEXT","body_content":"x"}}"#
        )
        .into_bytes(),
    ));
    let mut invalid_utf8 = body(&tracked_request(TENANT, PROVIDER, "bad-utf8"));
    let at = invalid_utf8.windows(4).position(|w| w == b"Test").unwrap();
    invalid_utf8[at] = 0xff;
    hostile.push(("bad-utf8", invalid_utf8));
    hostile.push(("not-json", b"\x00\x01\x02 definitely not json".to_vec()));
    let hostile_count = hostile.len();
    // A long subject that is legitimate: sent, folded into short lines.
    let long_subject = format!("{} and then some words", "w".repeat(3000));
    let folded = with("long-subject", &|r| {
        r["subject"] = long_subject.clone().into()
    });

    let started = Instant::now();
    publish_raw(
        &env,
        &hostile.iter().map(|(_, b)| b.clone()).collect::<Vec<_>>(),
    )
    .await;
    let normal: Vec<String> = (0..50).map(|i| format!("after-{i}")).collect();
    let mut bodies: Vec<Vec<u8>> = normal
        .iter()
        .map(|id| body(&tracked_request(TENANT, PROVIDER, id)))
        .collect();
    bodies.push(folded);
    publish_all(&env, &bodies).await;

    let delivered = wait_delivered(&smtp, 51, Duration::from_secs(30)).await;
    let took = started.elapsed();
    println!("51 normal requests delivered {took:?} after the hostile ones were published");
    assert_eq!(delivered, 51, "{}", svc.log_text());
    assert!(wait_queue_drained(&env, "email.send", Duration::from_secs(60)).await);
    let mut ids = normal.clone();
    ids.push("long-subject".into());
    assert_delivered_once(&smtp, &ids, &svc.log_text());

    // Every line that reached the server is within RFC 5322's 998 octets, and the long
    // subject reads back whole.
    for m in smtp.messages() {
        let raw = m.raw.clone();
        for line in raw.split(|b| *b == b'\n') {
            assert!(line.len() <= 999, "a line of {} octets", line.len());
        }
        let parsed = m.parsed();
        if parsed.header_raw("X-Test-Id").map(str::trim) == Some("long-subject") {
            assert_eq!(parsed.subject(), Some(long_subject.as_str()));
        }
    }

    let dead = drain(&env, "email.send.dlq", Duration::from_secs(5)).await;
    report(
        &env,
        &smtp,
        "Hostile requests (10 MB subject, 10,000 recipients, 20 MB body, JSON 100,000 deep, wrong types, duplicate keys, invalid UTF-8, not JSON), then 51 normal ones",
        &ids,
        hostile_count,
        dead.len(),
        &format!("refused at decoding within limits, off the actors' thread; the 51 delivered {took:.1?} after, no heartbeat lost; a 3,000-character subject folded"),
    )
    .await;
    assert_eq!(
        dead.len(),
        hostile_count,
        "{:?}",
        dead.iter().map(|d| &d["error"]).collect::<Vec<_>>()
    );
    for d in &dead {
        assert_eq!(d["error_class"], "invalid", "{}", d["error"]);
    }
    let errors: Vec<String> = dead
        .iter()
        .map(|d| d["error"].as_str().unwrap_or("").to_string())
        .collect();
    for needle in [
        "max_subject_bytes",
        "max_recipients",
        "max_request_bytes",
        "nested deeper than",
        "duplicate field",
        "not JSON",
    ] {
        assert!(
            errors.iter().any(|e| e.contains(needle)),
            "no error mentions {needle}: {errors:#?}"
        );
    }
    // The oversized request is kept as its start, with its size.
    let big = dead
        .iter()
        .find(|d| d["raw_body_bytes"].is_u64())
        .expect("the oversized request");
    assert!(big["raw_body_bytes"].as_u64().unwrap() > 16 << 20);

    // The broker never dropped the service (its heartbeats were answered throughout).
    let (_, metrics) = svc.get("/metrics").await.unwrap();
    let losses: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("mailbridge_amqp_connection_losses_total "))
        .collect();
    assert!(losses.iter().all(|l| l.ends_with(" 0")), "{losses:?}");
    assert!(!svc.log_text().contains("lost the RabbitMQ connection"));
}

#[tokio::test]
async fn one_slow_attachment_host_does_not_stall_the_others() {
    let env = TestEnv::new("slowatt");
    env.write_config("[outbound]\nattachment_allow_private = true\n");
    let smtp = SmtpServer::start(&env.dir.join("smtp"), &[]);
    let http = common::http_server::HttpServer::start(&env.dir.join("files"));
    http.put_file("report.pdf", b"%PDF-1.4 slow but sure\n");
    let svc = start(&env, &smtp, "").await;

    let mut slow = tracked_request(TENANT, PROVIDER, "slow");
    slow["attachments"] = serde_json::json!([{"filename": "report.pdf",
        "url": http.url("/slow/20/report.pdf"), "mime_type": "application/pdf"}]);
    let normal: Vec<String> = (0..600).map(|i| format!("quick-{i}")).collect();
    let mut bodies = vec![body(&slow)];
    bodies.extend(
        normal
            .iter()
            .map(|id| body(&tracked_request(TENANT, PROVIDER, id))),
    );
    let started = Instant::now();
    publish_all(&env, &bodies).await;

    // All 600 are delivered while the slow one still waits for its attachment: it holds one
    // slot of the prefetch window (256), not the window.
    assert_eq!(
        wait_delivered(&smtp, 600, Duration::from_secs(18)).await,
        600,
        "{}",
        svc.log_text()
    );
    let quick = started.elapsed();
    println!("600 delivered in {quick:?} beside a 20 s attachment download");
    assert!(!deliveries(&smtp).contains_key("slow"));
    assert!(quick < Duration::from_secs(18));

    assert_eq!(
        wait_delivered(&smtp, 601, Duration::from_secs(30)).await,
        601
    );
    println!("the slow one after {:?}", started.elapsed());
    assert!(started.elapsed() >= Duration::from_secs(20));
    assert!(wait_queue_drained(&env, "email.send", Duration::from_secs(10)).await);
    let mut all = normal.clone();
    all.push("slow".into());
    report(
        &env,
        &smtp,
        "One attachment host answering after 20 s, then 600 requests",
        &all,
        0,
        0,
        &format!("the 600 delivered in {quick:.1?} (acks not held by the slow one); the slow one after 20 s"),
    )
    .await;
    assert_delivered_once(&smtp, &all, &svc.log_text());
    let slow_mail = smtp
        .messages()
        .into_iter()
        .find(|m| m.text().contains("X-Test-Id: slow"))
        .unwrap();
    let parsed = slow_mail.parsed();
    let att = parsed.attachments().next().expect("the attachment");
    assert_eq!(att.contents(), b"%PDF-1.4 slow but sure\n");
}

#[tokio::test]
async fn retry_delays_changed_at_run_time_wait_for_a_restart_and_lose_no_retry() {
    let env = TestEnv::new("redelay");
    env.write_config("[retry]\nmax_retries = 3\ndelays = [\"1s\"]\n");
    let smtp = SmtpServer::start(&env.dir.join("smtp"), &[]);
    smtp.set_reply(Some("451 4.3.0 Try again later"));
    let svc = Service::start_with(&env, &[("MAILBRIDGE_ADMIN_TOKEN", "tok")]);
    env.smtp_tenant(TENANT, PROVIDER, smtp.port, "");
    svc.wait_health(200, Duration::from_secs(30)).await;

    // The delays change while the service runs: their queues were never declared.
    env.write_config("[retry]\nmax_retries = 3\ndelays = [\"7s\", \"11s\"]\n");
    let reload = reqwest::Client::new()
        .post(format!("{}/api/config/reload", svc.base_url))
        .bearer_auth("tok")
        .send()
        .await
        .unwrap();
    assert_eq!(reload.status(), 200);
    let outcome: serde_json::Value = reload.json().await.unwrap();
    assert_eq!(
        outcome["outcome"]["diff"]["restart_required"],
        serde_json::json!(["[retry]"]),
        "{outcome}"
    );

    publish_all(&env, &[body(&tracked_request(TENANT, PROVIDER, "retried"))]).await;
    let first = env
        .take("email.send.result", 1, Duration::from_secs(10))
        .await;
    assert_eq!(first.len(), 1);
    assert_eq!(first[0]["status"], "retrying", "{}", first[0]);
    smtp.set_reply(None);
    // Retried after the running schedule's 1 s, not lost in an undeclared queue.
    assert_eq!(wait_delivered(&smtp, 1, Duration::from_secs(5)).await, 1);
    let attempts = smtp.attempts();
    let gap = attempts[1].0 - attempts[0].0;
    assert!(
        (0.9..4.0).contains(&gap),
        "retried after {gap:.1} s: {attempts:?}"
    );
    let results = drain(&env, "email.send.result", Duration::from_secs(2)).await;
    report(
        &env,
        &smtp,
        "[retry] delays changed while running, then a 451",
        &["retried".to_string()],
        0,
        0,
        "the change waits for a restart (restart_required); retried on the declared 1 s queue",
    )
    .await;
    assert_eq!(results.len(), 1, "{results:?}");
    assert_eq!(results[0]["status"], "sent");
    let db = env.db().await;
    assert_eq!(
        outbox_statuses(&db).await,
        BTreeMap::from([("sent".into(), 1)])
    );
    assert!(svc.log_text().contains("applies at the next start"));
}

#[tokio::test]
async fn an_smtp_connection_lost_mid_data_or_after_the_dot_is_retried_by_the_schedule_once() {
    let env = TestEnv::new("smtpdrop");
    let smtp = SmtpServer::start(&env.dir.join("smtp"), &[]);
    let svc = start(&env, &smtp, "").await;

    // After the final dot: the outcome is unknown. Never resent at once on a fresh
    // session; the retry schedule sends it again (1 s later), and the outbox says so.
    smtp.set_fault(Some("drop-after-dot 1"));
    let started = Instant::now();
    publish_all(
        &env,
        &[body(&tracked_request(TENANT, PROVIDER, "after-dot"))],
    )
    .await;
    assert_eq!(wait_delivered(&smtp, 1, Duration::from_secs(15)).await, 1);
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(1), "resent at once: {took:?}");
    // Mid-DATA: the server cannot have taken it; retried all the same, delivered once.
    smtp.set_fault(Some("drop-mid-data 1"));
    publish_all(
        &env,
        &[body(&tracked_request(TENANT, PROVIDER, "mid-data"))],
    )
    .await;
    assert_eq!(wait_delivered(&smtp, 2, Duration::from_secs(15)).await, 2);
    assert!(wait_queue_drained(&env, "email.send", Duration::from_secs(10)).await);
    report(
        &env,
        &smtp,
        "SMTP connection dropped mid-DATA, and right after the final dot",
        &["after-dot".to_string(), "mid-data".to_string()],
        0,
        0,
        "never resent at once; retried by the schedule (1 s); the after-dot attempt recorded uncertain",
    )
    .await;
    assert_delivered_once(
        &smtp,
        &["after-dot".to_string(), "mid-data".to_string()],
        &svc.log_text(),
    );
    let drops = smtp
        .attempts()
        .iter()
        .filter(|(_, r)| r.starts_with("DROP"))
        .count();
    assert_eq!(drops, 2, "{:?}", smtp.attempts());

    let db = env.db().await;
    let row = db
        .query_one(
            "SELECT status, attempts, uncertain FROM outbox WHERE message_id = 'after-dot'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "sent");
    assert_eq!(row.get::<_, i32>(1), 2);
    assert!(row.get::<_, bool>(2), "the unknown outcome is recorded");
    let results = drain(&env, "email.send.result", Duration::from_secs(2)).await;
    let by_id = results_by_id(&results);
    assert_eq!(
        by_id.get(&("after-dot".into(), "retrying".into())),
        Some(&1)
    );
    assert_eq!(by_id.get(&("after-dot".into(), "sent".into())), Some(&1));
    assert_eq!(by_id.get(&("mid-data".into(), "sent".into())), Some(&1));
}

#[tokio::test]
async fn an_smtp_server_down_for_30_seconds_loses_and_repeats_nothing() {
    let env = TestEnv::new("smtpdown");
    // Enough retries to outlast the outage: 1 + 5 + 15 + 15 + 15 s.
    env.write_config("[retry]\nmax_retries = 5\n");
    let mut smtp = SmtpServer::start(&env.dir.join("smtp"), &[]);
    let svc = start(&env, &smtp, "").await;

    let before: Vec<String> = (0..20).map(|i| format!("before-{i}")).collect();
    publish_all(
        &env,
        &before
            .iter()
            .map(|id| body(&tracked_request(TENANT, PROVIDER, id)))
            .collect::<Vec<_>>(),
    )
    .await;
    assert_eq!(wait_delivered(&smtp, 20, Duration::from_secs(20)).await, 20);

    smtp.stop();
    let down_at = Instant::now();
    let during: Vec<String> = (0..40).map(|i| format!("during-{i}")).collect();
    publish_all(
        &env,
        &during
            .iter()
            .map(|id| body(&tracked_request(TENANT, PROVIDER, id)))
            .collect::<Vec<_>>(),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(down_at.elapsed())).await;
    let (_, health) = svc.get_json("/health").await;
    assert_eq!(
        health["components"]["providers"][PROVIDER]["status"], "down",
        "{health}"
    );
    smtp.restart();

    let mut all = before.clone();
    all.extend(during.iter().cloned());
    assert_eq!(
        wait_delivered(&smtp, all.len(), Duration::from_secs(40)).await,
        all.len(),
        "{}",
        svc.log_text()
    );
    assert!(wait_queue_drained(&env, "email.send", Duration::from_secs(20)).await);
    report(
        &env,
        &smtp,
        "SMTP server down for 30 s (20 sent before, 40 published during)",
        &all,
        0,
        0,
        "transient: retried 1/5/15/15/15 s, provider down in /health meanwhile; all delivered once it came back",
    )
    .await;
    assert_delivered_once(&smtp, &all, &svc.log_text());
    let db = env.db().await;
    assert_eq!(
        outbox_statuses(&db).await,
        BTreeMap::from([("sent".into(), all.len() as i64)])
    );
    assert!(drain(&env, "email.send.dlq", Duration::from_millis(500))
        .await
        .is_empty());
}

/// `n` tracked requests' bodies, ids `<prefix>-<i>`.
fn tracked(prefix: &str, n: usize) -> (Vec<String>, Vec<Vec<u8>>) {
    let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    let bodies = ids
        .iter()
        .map(|id| body(&tracked_request(TENANT, PROVIDER, id)))
        .collect();
    (ids, bodies)
}

/// Asserts each of `ids` arrived at least once; returns how many arrived more than once
/// (and how often in all), and fails on anything not asked for.
fn duplicates(smtp: &SmtpServer, ids: &[String]) -> (usize, usize) {
    let got = deliveries(smtp);
    let missing: Vec<_> = ids.iter().filter(|id| !got.contains_key(*id)).collect();
    assert!(missing.is_empty(), "never delivered: {missing:?}");
    assert_eq!(got.len(), ids.len(), "unexpected deliveries");
    let twice = got.values().filter(|n| **n > 1).count();
    let extra = got.values().map(|n| n - 1).sum();
    (twice, extra)
}

#[tokio::test]
async fn sigkill_under_outbound_load_loses_nothing_and_repeats_only_the_crash_window() {
    let env = TestEnv::new("kill9");
    let smtp = SmtpServer::start(&env.dir.join("smtp"), &[]);
    let mut svc = start(&env, &smtp, "").await;
    let (ids, bodies) = tracked("k", 2000);
    publish_all(&env, &bodies).await;
    let at = wait_delivered(&smtp, 500, Duration::from_secs(60)).await;
    svc.kill();
    println!("SIGKILL after {at} deliveries");
    assert!((500..2000).contains(&at), "{at}");
    // The crash window, measured: emails the server had accepted when the process died whose
    // `sent` was not committed.
    let window = common::ledger::crash_window(&env, &smtp).await;
    println!(
        "crash window: {} accepted, not committed as sent",
        window.len()
    );

    let svc = Service::start(&env);
    svc.wait_health(200, Duration::from_secs(30)).await;
    let start = Instant::now();
    while deliveries(&smtp).len() < ids.len() && start.elapsed() < Duration::from_secs(90) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(wait_queue_drained(&env, "email.send", Duration::from_secs(30)).await);
    report(
        &env,
        &smtp,
        "SIGKILL of the service under outbound load (2,000 requests), then a restart",
        &ids,
        0,
        0,
        "duplicates only from the crash window: accepted by the server, `sent` not yet committed",
    )
    .await;
    let (twice, extra) = duplicates(&smtp, &ids);
    println!("after SIGKILL: {twice} email(s) delivered twice ({extra} extra deliveries)");
    // Every repeat is from the crash window — accepted by the server, `sent` not committed
    // when the process died — and each at most once more.
    let repeated: Vec<String> = deliveries(&smtp)
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(id, _)| id)
        .collect();
    let outside: Vec<&String> = repeated.iter().filter(|id| !window.contains(*id)).collect();
    assert!(
        outside.is_empty(),
        "sent twice though committed as sent before the kill: {outside:?}"
    );
    assert_eq!(extra, twice, "an email delivered more than twice");
    // The window itself stays small: the sessions in flight plus the `sent` commits waiting
    // for their batch.
    assert!(
        window.len() <= 200,
        "a crash window of {} emails",
        window.len()
    );
    let db = env.db().await;
    assert_eq!(
        outbox_statuses(&db).await,
        BTreeMap::from([("sent".into(), 2000)])
    );
    let results = drain(&env, "email.send.result", Duration::from_secs(5)).await;
    let by_id = results_by_id(&results);
    for id in &ids {
        assert!(
            by_id.contains_key(&(id.clone(), "sent".into())),
            "no result for {id}"
        );
    }
    assert!(!svc.log_text().contains("panicked"));
}

#[tokio::test]
async fn postgresql_restarted_twice_under_outbound_load_loses_and_repeats_nothing() {
    let base = TestEnv::new("pgrestart");
    let pg = common::pg_cluster::PgCluster::start(&base.dir.join("pg"), None);
    let env = base.with_pg_server(&pg.server_url());
    let smtp = SmtpServer::start(&env.dir.join("smtp"), &[]);
    let svc = start(&env, &smtp, "").await;
    let (ids, bodies) = tracked("pg", 3000);
    publish_all(&env, &bodies).await;

    for n in [600, 1500] {
        let at = wait_delivered(&smtp, n, Duration::from_secs(60)).await;
        pg.restart_fast();
        println!("PostgreSQL restarted (fast) after {at} deliveries");
        assert!(at < ids.len(), "the load was over before the restart");
    }
    let start = Instant::now();
    while deliveries(&smtp).len() < ids.len() && start.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(wait_queue_drained(&env, "email.send", Duration::from_secs(60)).await);
    report(
        &env,
        &smtp,
        "PostgreSQL restarted (fast shutdown) twice under outbound load (3,000 requests)",
        &ids,
        0,
        0,
        "57P01 and lost connections retried; sent writes retried until committed, never requeued",
    )
    .await;
    assert_delivered_once(&smtp, &ids, &svc.log_text());
    let db = env.db().await;
    assert_eq!(
        outbox_statuses(&db).await,
        BTreeMap::from([("sent".into(), 3000)])
    );
    let claimed: i64 = db
        .query_one(
            "SELECT count(*) FROM outbox WHERE claim_token IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(claimed, 0);
    let results = drain(&env, "email.send.result", Duration::from_secs(5)).await;
    let by_id = results_by_id(&results);
    for id in &ids {
        assert_eq!(by_id.get(&(id.clone(), "sent".into())), Some(&1), "{id}");
    }
    assert!(drain(&env, "email.send.dlq", Duration::from_millis(500))
        .await
        .is_empty());
}

#[tokio::test]
async fn the_broker_closing_connections_and_channels_under_load_loses_and_repeats_nothing() {
    let env = TestEnv::new("brokerfaults");
    let smtp = SmtpServer::start(&env.dir.join("smtp"), &[]);
    let svc = start(&env, &smtp, "").await;
    let (ids, bodies) = tracked("b", 3000);
    publish_all(&env, &bodies).await;

    let at = wait_delivered(&smtp, 300, Duration::from_secs(60)).await;
    let closed = common::broker_faults::close_channels_of_vhost(&env.vhost, 2);
    println!("closed {closed} channel(s) after {at} deliveries");
    assert!(closed > 0);
    for n in [900, 1800] {
        let at = wait_delivered(&smtp, n, Duration::from_secs(60)).await;
        common::broker_faults::close_connections_of_vhost(&env.vhost);
        println!("closed the connections after {at} deliveries");
        svc.wait_health(200, Duration::from_secs(30)).await;
    }
    let at = wait_delivered(&smtp, 2400, Duration::from_secs(60)).await;
    let closed = common::broker_faults::close_channels_of_vhost(&env.vhost, 3);
    println!("closed {closed} channel(s) after {at} deliveries");

    let start = Instant::now();
    while deliveries(&smtp).len() < ids.len() && start.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(wait_queue_drained(&env, "email.send", Duration::from_secs(60)).await);
    assert_delivered_once(&smtp, &ids, &svc.log_text());
    let db = env.db().await;
    assert_eq!(
        outbox_statuses(&db).await,
        BTreeMap::from([("sent".into(), 3000)])
    );
    let results = drain(&env, "email.send.result", Duration::from_secs(5)).await;
    let by_id = results_by_id(&results);
    let again = by_id.values().filter(|n| **n > 1).count();
    report(
        &env,
        &smtp,
        "The broker closing the connection twice and 5 single channels under load (3,000 requests)",
        &ids,
        0,
        0,
        &format!("reconnected; closed channels reopened by their owners; redeliveries found sent rows; {again} results whose confirm was lost published again, identical"),
    )
    .await;
    let missing: Vec<_> = ids
        .iter()
        .filter(|id| !by_id.contains_key(&((*id).clone(), "sent".into())))
        .collect();
    assert!(missing.is_empty(), "no result for {missing:?}");
    // A result whose confirm was lost with a closed channel is published again by the
    // redelivered request: the same result (same AMQP message id, same content), never a
    // different outcome.
    let repeated: Vec<_> = by_id.iter().filter(|(_, n)| **n > 1).collect();
    println!("results published twice: {}", repeated.len());
    for ((id, _), _) in &repeated {
        let copies: Vec<&serde_json::Value> =
            results.iter().filter(|r| r["message_id"] == **id).collect();
        assert!(
            copies.windows(2).all(|w| w[0] == w[1]),
            "different results for {id}: {copies:?}"
        );
    }
    assert!(by_id.keys().all(|(_, status)| status == "sent"));
    // Two connection losses; a closed channel costs its owner a new channel, not the
    // connection.
    let (_, metrics) = svc.get("/metrics").await.unwrap();
    assert!(
        metrics.contains("mailbridge_amqp_connection_losses_total 2\n"),
        "{metrics}"
    );
}
