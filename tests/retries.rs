//! Retries and dead letters against the real RabbitMQ, PostgreSQL and SMTP server: the
//! 1s/5s/15s schedule, permanent failures, a retry surviving SIGKILL, replay, bad input and
//! a request the service keeps crashing on.

mod common;

use std::time::{Duration, Instant};

use common::{guide_request, wait_count, Service, SmtpServer, TestEnv};

const TENANT: &str = "tenant-r";
const PROVIDER: &str = "provider-r";

async fn start(env: &TestEnv, smtp: &SmtpServer) -> Service {
    env.smtp_tenant(TENANT, PROVIDER, smtp.port, "");
    let svc = Service::start_with(env, &[("MAILBRIDGE_ADMIN_TOKEN", "test-admin-token")]);
    svc.wait_health(200, Duration::from_secs(30)).await;
    svc
}

fn request(id: &str) -> Vec<u8> {
    serde_json::to_vec(&guide_request(TENANT, PROVIDER, id, None)).unwrap()
}

#[tokio::test]
async fn a_451_is_retried_after_1_5_and_15_seconds_then_dead_lettered() {
    let env = TestEnv::new("r451");
    let smtp = SmtpServer::start(&env.dir.join("smtp"), &[]);
    smtp.set_reply(Some("451 4.3.0 Mailbox busy, try later"));
    let svc = start(&env, &smtp).await;
    env.publish("email.send", &request("busy-1")).await;

    let dead = env.take("email.send.dlq", 1, Duration::from_secs(40)).await;
    assert_eq!(dead.len(), 1, "{}", svc.log_text());
    let attempts = smtp.attempts();
    assert_eq!(attempts.len(), 4, "{attempts:?}");
    let gaps: Vec<f64> = attempts.windows(2).map(|w| w[1].0 - w[0].0).collect();
    println!("gaps between attempts: {gaps:?}");
    for (gap, want) in gaps.iter().zip([1.0, 5.0, 15.0]) {
        assert!(
            *gap >= want * 0.95 && *gap <= want + 2.5,
            "gap {gap:.2}s, expected about {want}s: {gaps:?}"
        );
    }

    let d = &dead[0];
    assert_eq!(d["message_id"], "busy-1");
    assert_eq!(d["tenant_id"], TENANT);
    assert_eq!(d["error_class"], "transient");
    assert_eq!(d["retry_count"], 3);
    assert_eq!(d["request"]["message_id"], "busy-1", "{d}");
    assert!(d["error"].as_str().unwrap().contains("451"), "{d}");
    assert!(d["last_reply"].as_str().unwrap().starts_with("451"), "{d}");
    assert!(d["failed_at"].as_str().unwrap().ends_with('Z'));

    let results = env
        .take("email.send.result", 4, Duration::from_secs(5))
        .await;
    assert_eq!(results.len(), 4, "{results:?}");
    for (i, r) in results[..3].iter().enumerate() {
        assert_eq!(r["status"], "retrying", "{r}");
        assert_eq!(r["success"], false);
        assert_eq!(r["retry_count"], i as u64 + 1);
        assert_eq!(r["max_retries"], 3);
        assert!(r["next_retry_at"].as_str().unwrap().ends_with('Z'), "{r}");
        assert!(r["error"].as_str().unwrap().contains("451"));
    }
    let last = &results[3];
    assert_eq!(last["status"], "failed", "{last}");
    assert_eq!(last["retry_count"], 3);
    assert!(last.get("next_retry_at").is_none());

    let db = env.db().await;
    let row = db
        .query_one(
            "SELECT status, attempts, last_error FROM outbox WHERE message_id = 'busy-1'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "failed");
    assert_eq!(row.get::<_, i32>(1), 4);
    assert!(row.get::<_, String>(2).contains("451"));
    assert!(smtp.messages().is_empty());

    let (_, metrics) = svc.get("/metrics").await.unwrap();
    assert!(
        metrics.contains(&format!(
            "mailbridge_retries_total{{provider=\"{PROVIDER}\",tenant=\"{TENANT}\"}} 3"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("mailbridge_dead_letters_total{queue=\"email.send.dlq\""),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "mailbridge_emails_failed_total{{class=\"transient\",provider=\"{PROVIDER}\",tenant=\"{TENANT}\"}} 4"
        )),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_550_is_tried_once_and_dead_lettered_within_seconds() {
    let env = TestEnv::new("r550");
    let smtp = SmtpServer::start(&env.dir.join("smtp"), &[]);
    smtp.set_reply(Some("550 5.1.1 No such user here"));
    let svc = start(&env, &smtp).await;
    let started = Instant::now();
    env.publish("email.send", &request("nobody-1")).await;
    let dead = env.take("email.send.dlq", 1, Duration::from_secs(10)).await;
    assert_eq!(dead.len(), 1, "{}", svc.log_text());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(dead[0]["error_class"], "permanent");
    assert_eq!(dead[0]["retry_count"], 0);
    assert!(dead[0]["last_reply"]
        .as_str()
        .unwrap()
        .contains("No such user"));
    assert_eq!(smtp.attempts().len(), 1);
    let results = env
        .take("email.send.result", 2, Duration::from_secs(2))
        .await;
    assert_eq!(results.len(), 1, "{results:?}");
    assert_eq!(results[0]["status"], "failed");
    assert_eq!(results[0]["error_class"], "permanent");
}

#[tokio::test]
async fn a_pending_retry_survives_sigkill() {
    let env = TestEnv::new("rkill");
    env.write_config("[retry]\nmax_retries = 2\ndelays = [\"3s\"]\n");
    let smtp = SmtpServer::start(&env.dir.join("smtp"), &[]);
    smtp.set_reply(Some("421 4.7.0 Too busy"));
    let mut svc = start(&env, &smtp).await;
    env.publish("email.send", &request("survivor")).await;

    let db = env.db().await;
    let retrying = wait_count(
        &db,
        "SELECT count(*) FROM outbox WHERE message_id = 'survivor' AND status = 'retrying'",
        1,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(retrying, 1, "{}", svc.log_text());
    svc.kill();
    smtp.set_reply(None);
    // The retry comes back to email.send while nothing runs.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        env.depth("email.send").await,
        1,
        "the parked retry returned to the send queue"
    );

    let svc = Service::start_with(&env, &[]);
    svc.wait_health(200, Duration::from_secs(30)).await;
    let mails = smtp.wait_for(1, Duration::from_secs(15)).await;
    assert_eq!(mails.len(), 1, "{}", svc.log_text());
    let sent = wait_count(
        &db,
        "SELECT count(*) FROM outbox WHERE message_id = 'survivor' AND status = 'sent' AND attempts = 2",
        1,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(sent, 1);
    let results = env
        .take("email.send.result", 2, Duration::from_secs(5))
        .await;
    let statuses: Vec<&str> = results
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["retrying", "sent"]);
}

#[tokio::test]
async fn dead_letters_are_listed_and_replayed_once_the_server_accepts() {
    let env = TestEnv::new("replay");
    let smtp = SmtpServer::start(&env.dir.join("smtp"), &[]);
    smtp.set_reply(Some("550 5.7.1 Relaying denied"));
    let svc = start(&env, &smtp).await;
    env.publish("email.send", &request("replay-cli")).await;
    env.publish("email.send", &request("replay-http")).await;
    env.publish("email.send", &request("stays")).await;
    for _ in 0..100 {
        if env.depth("email.send.dlq").await == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(env.depth("email.send.dlq").await, 3, "{}", svc.log_text());
    smtp.set_reply(None);

    // CLI: list leaves the entries where they are.
    let out = env.command(&["dlq", "list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(listed.len(), 3);
    assert!(listed.iter().any(|e| e["message_id"] == "replay-cli"));
    assert_eq!(env.depth("email.send.dlq").await, 3);

    // CLI: replay one.
    let out = env.command(&["dlq", "replay", "--message-id", "replay-cli"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("replayed 1: replay-cli"));
    let mails = smtp.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(mails.len(), 1, "{}", svc.log_text());
    assert!(mails[0].text().contains("Message-ID: <replay-cli."));

    // HTTP: the token is required.
    let client = reqwest::Client::new();
    let url = format!("{}/api/dlq", svc.base_url);
    let r = client.get(&url).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = client
        .get(&url)
        .bearer_auth("test-admin-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["count"], 2, "{body}");
    let r = client
        .post(format!("{}/api/dlq/replay", svc.base_url))
        .bearer_auth("wrong")
        .json(&serde_json::json!({"message_ids": ["replay-http"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = client
        .post(format!("{}/api/dlq/replay", svc.base_url))
        .bearer_auth("test-admin-token")
        .json(&serde_json::json!({"message_ids": ["replay-http"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        body["replayed"],
        serde_json::json!(["replay-http"]),
        "{body}"
    );
    assert_eq!(body["kept"], 1);
    assert_eq!(smtp.wait_for(2, Duration::from_secs(10)).await.len(), 2);

    let db = env.db().await;
    let rows = db
        .query(
            "SELECT message_id, status, attempts FROM outbox ORDER BY message_id",
            &[],
        )
        .await
        .unwrap();
    let rows: Vec<(String, String, i32)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        rows,
        [
            ("replay-cli".to_string(), "sent".to_string(), 1),
            ("replay-http".to_string(), "sent".to_string(), 1),
            ("stays".to_string(), "failed".to_string(), 1),
        ]
    );
    assert_eq!(env.depth("email.send.dlq").await, 1);
}

#[tokio::test]
async fn bad_input_lands_in_the_dlq_and_the_service_keeps_serving() {
    let env = TestEnv::new("badinput");
    let smtp = SmtpServer::start(&env.dir.join("smtp"), &[]);
    let svc = start(&env, &smtp).await;
    env.publish("email.send", b"this is {not json").await;
    let mut missing_to = guide_request(TENANT, PROVIDER, "no-to", None);
    missing_to.as_object_mut().unwrap().remove("to");
    env.publish("email.send", &serde_json::to_vec(&missing_to).unwrap())
        .await;
    env.publish("email.send", &request("fine-after")).await;

    let dead = env.take("email.send.dlq", 2, Duration::from_secs(10)).await;
    assert_eq!(dead.len(), 2, "{}", svc.log_text());
    let raw = dead.iter().find(|d| d.get("raw_body").is_some()).unwrap();
    assert_eq!(raw["raw_body"], "this is {not json");
    assert_eq!(raw["error_class"], "invalid");
    assert!(raw["error"].as_str().unwrap().contains("not JSON"), "{raw}");
    let no_to = dead.iter().find(|d| d["message_id"] == "no-to").unwrap();
    assert_eq!(no_to["error_class"], "invalid");
    assert_eq!(no_to["error"], "field `to`: is required", "{no_to}");
    assert_eq!(no_to["request"]["message_id"], "no-to");

    assert_eq!(smtp.wait_for(1, Duration::from_secs(10)).await.len(), 1);
    let (code, _) = svc.get("/health").await.unwrap();
    assert_eq!(code, 200);
}

#[tokio::test]
async fn a_request_the_service_keeps_dying_on_is_dead_lettered() {
    let env = TestEnv::new("poison");
    // An SMTP server that accepts connections and never answers: every delivery hangs
    // until the service is killed.
    let hole = SmtpServer::start(&env.dir.join("hole"), &["--blackhole"]);
    env.smtp_tenant(TENANT, PROVIDER, hole.port, "");
    let mut db = None;
    let mut deliveries = 0;
    for _ in 0..5 {
        let mut svc = Service::start(&env);
        svc.wait_health(200, Duration::from_secs(30)).await;
        if db.is_none() {
            // The queue exists once the service has declared the topology.
            env.publish("email.send", &request("poison-1")).await;
            db = Some(env.db().await);
        }
        let db = db.as_ref().unwrap();
        // Wait until this delivery is counted, then kill the service mid-send.
        let start = Instant::now();
        loop {
            let n: i32 = db
                .query_opt(
                    "SELECT deliveries FROM outbox WHERE message_id = 'poison-1'",
                    &[],
                )
                .await
                .ok()
                .flatten()
                .map(|r| r.get(0))
                .unwrap_or(0);
            if n > deliveries {
                deliveries = n;
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "{}",
                svc.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        svc.kill();
    }
    assert_eq!(deliveries, 5);
    let db = db.unwrap();
    let svc = Service::start(&env);
    svc.wait_health(200, Duration::from_secs(30)).await;
    let dead = env.take("email.send.dlq", 1, Duration::from_secs(10)).await;
    assert_eq!(dead.len(), 1, "{}", svc.log_text());
    assert_eq!(dead[0]["message_id"], "poison-1");
    assert_eq!(dead[0]["error_class"], "permanent");
    assert!(
        dead[0]["error"]
            .as_str()
            .unwrap()
            .contains("delivered 6 times"),
        "{}",
        dead[0]
    );
    let status: String = db
        .query_one(
            "SELECT status FROM outbox WHERE message_id = 'poison-1'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "failed");
}
