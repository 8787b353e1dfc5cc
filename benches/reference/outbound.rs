//! The outbound reference of issue 15: the same preloaded requests, the same smtp-sink, the
//! same broker and database server, consumed by what a competent Node.js team would build with
//! the libraries EmailEngine uses (`bench/reference/outbound`: amqplib, a nodemailer pool of 8
//! SMTP connections, a `pg` pool of 8, a confirmed result publish, then the ack).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::common::TestEnv;
use super::{
    count, declare_queue, html_4k, peak_rss_mb, publish_many, request, DepthWatch, Meter, Row, Sink,
};

const KEY: &str = "outbound-node";
const WHAT: &str = "outbound reference: Node.js (amqplib, nodemailer pool 8, pg pool 8)";

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bench/reference/outbound")
}

fn not_run(why: String) -> Row {
    println!("outbound-node: not run: {why}");
    Row {
        key: KEY,
        rate: 0.0,
        what: WHAT.to_string(),
        result: format!("not run: {why}"),
        rss_mb: 0.0,
        cpu: String::new(),
    }
}

/// Creates the env's database (the reference makes its own table in it).
async fn create_database(env: &TestEnv) {
    let (client, conn) = tokio_postgres::connect(
        &format!("{}/postgres", env.pg_server),
        tokio_postgres::NoTls,
    )
    .await
    .expect("connect to PostgreSQL");
    tokio::spawn(conn);
    client
        .batch_execute(&format!("CREATE DATABASE \"{}\"", env.db_name))
        .await
        .expect("create the reference's database");
}

/// The reference's own `maxrss_kb` line, for when it exited before its peak RSS was read.
fn reported_rss_mb(out: &str) -> f64 {
    out.split_whitespace()
        .skip_while(|w| *w != "maxrss_kb")
        .nth(1)
        .and_then(|v| v.trim_end_matches(';').parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

pub async fn node_outbound(n: u64) -> Row {
    let dir = dir();
    if !dir.join("node_modules").is_dir() {
        return not_run(format!(
            "no {}/node_modules (scripts/bench.sh runs `npm ci` there)",
            dir.display()
        ));
    }
    let env = TestEnv::new("bench_ref_out");
    create_database(&env).await;
    let sink = Sink::start();
    declare_queue(&env, "email.send").await;
    let body = html_4k();
    publish_many(&env, (0..n).map(|i| request(&format!("t-{i}"), &body))).await;
    declare_queue(&env, "email.send.result").await;
    let results = DepthWatch::new(&env, "email.send.result").await;

    let out_path = env.dir.join("node-reference.out");
    let err_path = env.dir.join("node-reference.err");
    let meter = Meter::start();
    let started = Instant::now();
    let spawned = Command::new("node")
        .arg("index.js")
        .current_dir(&dir)
        .env("AMQP_URL", env.amqp_url())
        .env("DATABASE_URL", env.db_url())
        .env("SMTP_HOST", "127.0.0.1")
        .env("SMTP_PORT", sink.port.to_string())
        .env("QUEUE", "email.send")
        .env("RESULT_QUEUE", "email.send.result")
        .env("N", n.to_string())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            results.close().await;
            return not_run(format!("node: {e} (scripts/bench.sh installs Node.js)"));
        }
    };
    let pid = child.id();
    // A result is published only after its row is inserted: once there are n results, every
    // row is there (checked below). The process exits by itself after n acks; it is reaped
    // only after the CPU reading, so its counters are still in /proc.
    let mut depth = 0;
    let mut rss_mb = 0.0;
    while started.elapsed() < Duration::from_secs(600) {
        depth = results.depth().await;
        rss_mb = peak_rss_mb(pid).max(rss_mb);
        if depth >= n {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            eprintln!(
                "outbound-node: node exited early ({status}): {}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = started.elapsed().as_secs_f64();
    let end = Meter::now();
    rss_mb = peak_rss_mb(pid).max(rss_mb);
    results.close().await;

    let exit_by = Instant::now() + Duration::from_secs(30);
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            _ if Instant::now() > exit_by => {
                let _ = child.kill();
                break child.wait().ok();
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let out = std::fs::read_to_string(&out_path).unwrap_or_default();
    let errors = std::fs::read_to_string(&err_path).unwrap_or_default();
    if rss_mb == 0.0 {
        rss_mb = reported_rss_mb(&out);
    }
    let db = env.db().await;
    let rows = count(&db, "SELECT count(*) FROM ref_outbox WHERE status = 'sent'").await;
    drop(sink);
    assert!(
        depth >= n && rows == n as i64,
        "outbound-node: {depth} results and {rows} sent rows for {n} requests (node {status:?}: {} {})",
        out.trim(),
        errors.trim()
    );
    if !errors.trim().is_empty() {
        eprintln!("outbound-node stderr: {}", errors.trim());
    }
    println!("outbound-node: {}", out.trim());
    let cpu = meter.report(&end, n);
    Row {
        key: KEY,
        rate: rows as f64 / took,
        what: WHAT.to_string(),
        result: format!(
            "{:.0} emails/s ({rows} sent in {took:.1} s, from process start)",
            rows as f64 / took
        ),
        rss_mb,
        cpu,
    }
}
