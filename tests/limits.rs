//! Per-provider rate limits against the real RabbitMQ, PostgreSQL and SMTP servers: sends
//! beyond `rate_per_second` / `rate_per_day` wait (or are parked without counting a retry),
//! never fail, and a limited provider does not slow the others.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{guide_request, wait_count, Service, SmtpServer, TestEnv};

async fn publish_all(env: &TestEnv, requests: &[serde_json::Value]) {
    let conn = env.amqp().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let mut confirms = Vec::new();
    for req in requests {
        confirms.push(
            ch.basic_publish(
                "".into(),
                "email.send".into(),
                Default::default(),
                &serde_json::to_vec(req).unwrap(),
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

fn requests(tenant: &str, provider: &str, tag: &str, n: usize) -> Vec<serde_json::Value> {
    (0..n)
        .map(|i| {
            let mut r = guide_request(tenant, provider, &format!("{tag}-{i}"), None);
            r["subject"] = serde_json::json!(format!("{tag} number {i}"));
            r
        })
        .collect()
}

#[tokio::test]
async fn a_rate_limited_provider_waits_and_parks_never_fails_and_slows_no_other() {
    let env = TestEnv::new("ratelimit");
    let slow = SmtpServer::start(&env.dir.join("smtp-slow"), &[]);
    let fast = SmtpServer::start(&env.dir.join("smtp-fast"), &[]);
    env.smtp_tenant("tenant-a", "limited", slow.port, "rate_per_second = 2");
    env.smtp_tenant("tenant-b", "unlimited", fast.port, "");
    let svc = Service::start(&env);
    svc.wait_health(200, Duration::from_secs(30)).await;

    // 60 for the limited provider: 2 at once, then one each 500 ms; those that would wait
    // more than 20 s are parked in a delay queue and come back.
    publish_all(&env, &requests("tenant-a", "limited", "limited", 60)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let published_b = Instant::now();
    publish_all(&env, &requests("tenant-b", "unlimited", "unlimited", 100)).await;

    let db = env.db().await;
    let b_sent = wait_count(
        &db,
        "SELECT count(*) FROM outbox WHERE provider_id = 'unlimited' AND status = 'sent'",
        100,
        Duration::from_secs(30),
    )
    .await;
    let b_took = published_b.elapsed();
    assert_eq!(b_sent, 100, "{}", svc.log_text());
    let a_when_b_done: i64 = db
        .query_one(
            "SELECT count(*) FROM outbox WHERE provider_id = 'limited' AND status = 'sent'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        a_when_b_done < 60,
        "the unlimited provider finished only after the limited one ({a_when_b_done} of 60 sent, {b_took:?})"
    );
    assert!(
        b_took < Duration::from_secs(15),
        "the unlimited provider was slowed: {b_took:?}"
    );

    let a_sent = wait_count(
        &db,
        "SELECT count(*) FROM outbox WHERE provider_id = 'limited' AND status = 'sent'",
        60,
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(a_sent, 60, "{}", svc.log_text());

    // Each email once, at no more than the rate (2 at once, then 2 a second).
    let received = slow.messages();
    assert_eq!(received.len(), 60);
    let subjects: HashSet<String> = received
        .iter()
        .map(|m| m.parsed().subject().unwrap_or_default().to_string())
        .collect();
    assert_eq!(subjects.len(), 60);
    let mut times: Vec<f64> = slow.attempts().iter().map(|(t, _)| *t).collect();
    times.sort_by(f64::total_cmp);
    assert_eq!(times.len(), 60);
    for (i, t) in times.iter().enumerate() {
        let in_window = times[i..].iter().take_while(|u| **u < t + 5.0).count();
        assert!(
            in_window <= 12,
            "{in_window} sends within 5 s from {t}: over 2 a second"
        );
    }
    assert!(
        times[59] - times[0] >= 28.0,
        "60 sends at 2 a second took only {} s",
        times[59] - times[0]
    );

    // Some were parked (not held for over 20 s), none counted as a retry or failed.
    let log = svc.log_text();
    let parked = log
        .matches("parked: waiting for the provider's rate_per_second limit")
        .count();
    assert!(parked >= 1, "nothing was parked:\n{log}");
    let retried: i64 = db
        .query_one(
            "SELECT count(*) FROM outbox WHERE retry_count <> 0 OR status <> 'sent'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(retried, 0);
    let results = env
        .take("email.send.result", 200, Duration::from_secs(10))
        .await;
    assert_eq!(results.len(), 160);
    assert!(results.iter().all(|r| r["status"] == "sent"), "{results:?}");
    assert_eq!(env.depth("email.send.dlq").await, 0);
}

#[tokio::test]
async fn sends_beyond_rate_per_day_wait_for_the_next_day_without_failing() {
    let env = TestEnv::new("ratelimit_day");
    let smtp = SmtpServer::start(&env.dir.join("smtp"), &[]);
    env.smtp_tenant("tenant-d", "daily", smtp.port, "rate_per_day = 5");
    let svc = Service::start(&env);
    svc.wait_health(200, Duration::from_secs(30)).await;

    publish_all(&env, &requests("tenant-d", "daily", "daily", 8)).await;
    let db = env.db().await;
    let parked = wait_count(
        &db,
        "SELECT count(*) FROM outbox WHERE status = 'retrying'",
        3,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(parked, 3, "{}", svc.log_text());
    let sent = wait_count(
        &db,
        "SELECT count(*) FROM outbox WHERE status = 'sent'",
        5,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(sent, 5);
    assert_eq!(smtp.messages().len(), 5);
    // Waiting, with what it waits for, and not a retry: no retrying or failed result, no DLQ.
    let rows = db
        .query(
            "SELECT retry_count, last_error, next_retry_at > now() + interval '50 minutes'
             FROM outbox WHERE status = 'retrying'",
            &[],
        )
        .await
        .unwrap();
    for r in &rows {
        let retry_count: i32 = r.get(0);
        let error: String = r.get(1);
        let far: bool = r.get(2);
        assert_eq!(retry_count, 0);
        assert!(error.contains("rate_per_day"), "{error}");
        assert!(far, "parked for less than the longest rung");
    }
    let results = env
        .take("email.send.result", 10, Duration::from_secs(5))
        .await;
    assert_eq!(results.len(), 5, "{results:?}");
    assert!(results.iter().all(|r| r["status"] == "sent"));
    assert_eq!(env.depth("email.send.dlq").await, 0);
    assert_eq!(env.depth("mailbridge.retry.email.send.3600000ms").await, 3);
}

#[tokio::test]
async fn max_in_flight_bounds_the_sends_at_once_below_max_connections() {
    use common::api_server::{ApiServer, API_KEY};
    let env = TestEnv::new("inflight");
    let api = ApiServer::start().await;
    api.set_answer_delay(Duration::from_millis(400));
    let base = api.base_url();
    env.write_tenant(
        "t.toml",
        &format!(
            r#"
id = "tenant-f"

[[providers]]
id = "bounded"
kind = "sendgrid"
api_key = "{API_KEY}"
base_url = "{base}"
max_connections = 4
max_in_flight = 2

[[providers]]
id = "unbounded"
kind = "sendgrid"
api_key = "{API_KEY}"
base_url = "{base}"
max_connections = 4
"#
        ),
    );
    let svc = Service::start(&env);
    svc.wait_health(200, Duration::from_secs(30)).await;
    let db = env.db().await;

    publish_all(&env, &requests("tenant-f", "bounded", "bounded", 8)).await;
    let sent = wait_count(
        &db,
        "SELECT count(*) FROM outbox WHERE status = 'sent'",
        8,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(sent, 8, "{}", svc.log_text());
    assert_eq!(api.most_in_progress(), 2);

    // The same load without max_in_flight uses every connection: the bound above was real.
    publish_all(&env, &requests("tenant-f", "unbounded", "unbounded", 8)).await;
    let sent = wait_count(
        &db,
        "SELECT count(*) FROM outbox WHERE status = 'sent'",
        16,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(sent, 16, "{}", svc.log_text());
    assert_eq!(api.most_in_progress(), 4);
    assert_eq!(api.received().len(), 16);
}

#[tokio::test]
async fn a_retry_after_past_the_longest_delay_queue_waits_without_spending_retries() {
    use common::api_server::{Api, ApiServer, Fault, API_KEY};
    let env = TestEnv::new("retry_after_long");
    let api = ApiServer::start().await;
    api.fail_next(Api::Sendgrid, &[Fault::Throttle(7200)]);
    let base = api.base_url();
    env.write_tenant(
        "t.toml",
        &format!(
            "id = \"tenant-q\"\n[[providers]]\nid = \"quota\"\nkind = \"sendgrid\"\napi_key = \"{API_KEY}\"\nbase_url = \"{base}\"\n"
        ),
    );
    let svc = Service::start(&env);
    svc.wait_health(200, Duration::from_secs(30)).await;
    publish_all(&env, &requests("tenant-q", "quota", "quota", 1)).await;
    let db = env.db().await;
    let parked = wait_count(
        &db,
        "SELECT count(*) FROM outbox WHERE status = 'retrying' AND retry_count = 0
           AND last_error LIKE '%HTTP 429%' AND next_retry_at > now() + interval '50 minutes'",
        1,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(parked, 1, "{}", svc.log_text());
    assert_eq!(env.depth("mailbridge.retry.email.send.3600000ms").await, 1);
    assert_eq!(
        env.take("email.send.result", 1, Duration::from_secs(2))
            .await
            .len(),
        0,
        "no result while it waits"
    );
    assert_eq!(env.depth("email.send.dlq").await, 0);
}
