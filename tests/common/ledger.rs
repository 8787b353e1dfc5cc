//! Exact accounting for the reliability tests: where every request ended — delivered at the
//! SMTP server (counted by its `X-Test-Id` header, so a duplicate shows), its results on the
//! result queue, its dead letters, its outbox row.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::{guide_request, SmtpServer, TestEnv};

/// The guide's request with an `X-Test-Id` header naming it.
pub fn tracked_request(tenant: &str, provider: &str, id: &str) -> serde_json::Value {
    let mut r = guide_request(tenant, provider, id, None);
    r["headers"]["X-Test-Id"] = serde_json::json!(id);
    r["subject"] = serde_json::json!(format!("request {id}"));
    r
}

/// Publishes every body to `email.send` on one confirmed channel; resolves once the broker
/// confirmed them all.
pub async fn publish_all(env: &TestEnv, bodies: &[Vec<u8>]) {
    publish_all_to(&env.amqp_url(), bodies).await;
}

/// [`publish_all`] through the broker at `url` (a node of a private cluster).
pub async fn publish_all_to(url: &str, bodies: &[Vec<u8>]) {
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .expect("connect to the broker");
    let ch = conn.create_channel().await.expect("a channel");
    ch.confirm_select(Default::default())
        .await
        .expect("confirm mode");
    let mut confirms = Vec::with_capacity(bodies.len());
    for body in bodies {
        confirms.push(
            ch.basic_publish(
                "".into(),
                "email.send".into(),
                Default::default(),
                body,
                lapin::BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish"),
        );
    }
    for c in confirms {
        c.await.expect("confirmed");
    }
    let _ = conn.close(200, "OK".into()).await;
}

/// How many times each `X-Test-Id` arrived at `smtp`.
pub fn deliveries(smtp: &SmtpServer) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for m in smtp.messages() {
        let text = m.text();
        let id = text
            .lines()
            .take_while(|l| !l.is_empty())
            .find_map(|l| l.strip_prefix("X-Test-Id: "))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| "(none)".into());
        *out.entry(id).or_default() += 1;
    }
    out
}

/// Waits until `smtp` holds at least `n` messages (or the time is up); returns the count.
pub async fn wait_delivered(smtp: &SmtpServer, n: usize, timeout: Duration) -> usize {
    let start = Instant::now();
    loop {
        let got = smtp.messages().len();
        if got >= n || start.elapsed() > timeout {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Ready and unacknowledged messages of `queue` in the env's vhost (rabbitmqctl: the broker's
/// own count, unacked deliveries included).
pub fn queue_counts(env: &TestEnv, queue: &str) -> (u64, u64) {
    let out = super::rabbitmqctl(&[
        "list_queues",
        "-p",
        &env.vhost,
        "--silent",
        "--no-table-headers",
        "name",
        "messages_ready",
        "messages_unacknowledged",
    ]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() == 3 && f[0] == queue {
            return (f[1].parse().unwrap_or(0), f[2].parse().unwrap_or(0));
        }
    }
    (0, 0)
}

/// Waits until `queue` has neither ready nor unacknowledged messages: the service is done
/// with every delivery of it.
pub async fn wait_queue_drained(env: &TestEnv, queue: &str, timeout: Duration) -> bool {
    let start = Instant::now();
    loop {
        if queue_counts(env, queue) == (0, 0) {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Takes everything on `queue` now (waiting up to `quiet` for stragglers after the last one).
pub async fn drain(env: &TestEnv, queue: &str, quiet: Duration) -> Vec<serde_json::Value> {
    env.take(queue, usize::MAX, quiet).await
}

/// Outbox rows by status.
pub async fn outbox_statuses(db: &tokio_postgres::Client) -> BTreeMap<String, i64> {
    db.query("SELECT status, count(*) FROM outbox GROUP BY status", &[])
        .await
        .expect("outbox counts")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Results on the result queue, by message_id and status.
pub fn results_by_id(results: &[serde_json::Value]) -> BTreeMap<(String, String), usize> {
    let mut out = BTreeMap::new();
    for r in results {
        let id = r["message_id"].as_str().unwrap_or("(null)").to_string();
        let status = r["status"].as_str().unwrap_or("?").to_string();
        *out.entry((id, status)).or_default() += 1;
    }
    out
}

/// One row of `docs/reliability.md`: what a fault test did and where every message ended.
/// Printed as `RELIABILITY|…` (run the tests with `--nocapture`; `scripts/reliability.sh`
/// collects the rows into the table).
pub struct Report<'a> {
    pub fault: &'a str,
    /// Messages (requests or emails) the test sent through.
    pub messages: usize,
    /// Ended where they should, once (delivered/published once, or dead-lettered once with
    /// one terminal result when the test meant them to fail).
    pub once: usize,
    /// Extra deliveries or publishes (a message delivered twice counts 1).
    pub duplicated: usize,
    /// Ended nowhere.
    pub lost: usize,
    /// Left unfinished (an outbox row not terminal, a delivery not acked).
    pub stuck: usize,
    /// What the service did, in a few words.
    pub note: &'a str,
}

impl Report<'_> {
    pub fn print(&self) {
        println!(
            "RELIABILITY|{}|{}|{}|{}|{}|{}|{}",
            self.fault, self.messages, self.once, self.duplicated, self.lost, self.stuck, self.note
        );
    }
}

/// The crash window of an instance killed just now: the emails `smtp` accepted whose outbox
/// row is not `sent` (read after the server finished writing what it accepted).
pub async fn crash_window(env: &TestEnv, smtp: &SmtpServer) -> std::collections::HashSet<String> {
    tokio::time::sleep(Duration::from_millis(500)).await;
    let delivered = deliveries(smtp);
    let committed: std::collections::HashSet<String> = env
        .db()
        .await
        .query("SELECT message_id FROM outbox WHERE status = 'sent'", &[])
        .await
        .expect("the outbox")
        .iter()
        .map(|r| r.get(0))
        .collect();
    delivered
        .into_keys()
        .filter(|id| !committed.contains(id))
        .collect()
}
