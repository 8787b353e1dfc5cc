//! The benchmark of issue 7: outbound throughput and latency against Postfix's smtp-sink, and
//! inbound throughput from Dovecot, with the service's peak RSS, against the local RabbitMQ
//! and PostgreSQL. Prints a table; it does not pass or fail.
//!
//! Run it with `scripts/bench.sh` (which installs postfix and dovecot first). Sizes:
//! `BENCH_OUTBOUND_N` (20000), `BENCH_LATENCY_RATE` (1000/s), `BENCH_LATENCY_SECS` (30),
//! `BENCH_INBOUND_N` (10000), `BENCH_SMTP_CONNECTIONS` (16); `BENCH_ONLY=outbound|latency|inbound`
//! runs one part (the latency part first runs its offered load alone, with no service).
//! `BENCH_ONLY=mailboxes` (or `BENCH_MAILBOXES=100,1000,10000`) runs the mailbox-scale part:
//! idle IMAP mailboxes on a hibernating Dovecot.
//!
//! Beside mailbridge's outbound and inbound runs it runs issue 15's reference implementations
//! on the same work (`reference/outbound.rs`: Node.js with amqplib, nodemailer and pg;
//! `reference/inbound.rs`: mbsync, and Node.js with imapflow and mailparser; their code is in
//! `bench/reference/`) and prints mailbridge's rate over each reference's.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "reference/inbound.rs"]
mod reference_inbound;
#[path = "reference/outbound.rs"]
mod reference_outbound;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use common::{Dovecot, Service, TestEnv};

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A memory figure of `/proc/<pid>/status` (`VmHWM`: peak RSS, `VmRSS`: RSS now), in MB.
fn status_mb(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn peak_rss_mb(pid: u32) -> f64 {
    status_mb(pid, "VmHWM:")
}

/// Before a run's clock starts: dirty pages written out (`sync`: the writeback of the
/// previous run's or the build's files would otherwise be charged to the run, as the machine's
/// load) and a moment for the broker and the database to settle.
fn settle() {
    let _ = std::process::Command::new("sync").status();
    std::thread::sleep(Duration::from_millis(500));
}

/// The TCP traffic between process `pid` and the broker so far (every connection of it to port
/// 5672), from the kernel's counters (`ss -ti`): what the process sent (segments, bytes) and
/// what the broker sent it. On loopback a segment is about one write, so segments per email
/// are the frames' cost in system calls on both ends.
fn amqp_traffic(pid: u32) -> [u64; 4] {
    let Ok(out) = Command::new("ss")
        .args(["-tinpH", "( dport = :5672 )"])
        .output()
    else {
        return [0; 4];
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let mine = format!("pid={pid},");
    let field = |line: &str, name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    // `ss` prints a socket's addresses and users on one line and its counters on the next.
    let lines: Vec<&str> = text.lines().collect();
    let mut sum = [0u64; 4];
    for pair in lines.chunks(2) {
        if let [head, info] = pair {
            if head.contains(&mine) {
                sum[0] += field(info, "data_segs_out:");
                sum[1] += field(info, "bytes_acked:");
                sum[2] += field(info, "data_segs_in:");
                sum[3] += field(info, "bytes_received:");
            }
        }
    }
    sum
}

/// "AMQP per email: sent N segments / B bytes, received …" for the service's connection(s).
fn amqp_per_email(pid: u32, emails: u64) -> String {
    let [so, bo, si, bi] = amqp_traffic(pid);
    let n = emails.max(1) as f64;
    format!(
        "AMQP per email: service sent {:.2} segments / {:.0} bytes, received {:.2} / {:.0}",
        so as f64 / n,
        bo as f64 / n,
        si as f64 / n,
        bi as f64 / n
    )
}

/// The CPU counters of the machine and of every process at one moment.
struct Meter {
    cpu: HashMap<u32, (String, f64)>,
    load: (f64, f64),
}

impl Meter {
    fn now() -> Self {
        Self {
            cpu: cpu_by_process(),
            load: machine_jiffies(),
        }
    }

    /// At a run's start: [`settle`], then the counters.
    fn start() -> Self {
        settle();
        Self::now()
    }

    /// "machine N % busy; per email: …" from this start to `end`, for `emails`.
    fn report(&self, end: &Meter, emails: u64) -> String {
        format!(
            "machine {:.0} % busy; per email: {}",
            machine_busy(self.load, end.load),
            cpu_per_email(&self.cpu, &end.cpu, emails)
        )
    }
}

/// CPU seconds (user + system) spent so far by every user-space process, by pid, with its
/// command name. Kernel threads (children of kthreadd) are left out: their counters do not say whose
/// work they did (disk writeback, network), and read as noise.
fn cpu_by_process() -> HashMap<u32, (String, f64)> {
    let tick = 100.0; // USER_HZ on Linux
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ... utime(14) stime(15)
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_string();
        let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        let num = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        // kthreadd is pid 2; its children are the kernel's threads.
        if pid == 2 || num(1) == 2.0 {
            continue;
        }
        // Dovecot's master reaps a session's process when the client logs out (the
        // references do before their CPU is read): its children's CPU (cutime, cstime)
        // counts as Dovecot's.
        let reaped = if comm == "dovecot" {
            num(13) + num(14)
        } else {
            0.0
        };
        out.insert(pid, (comm, (num(11) + num(12) + reaped) / tick));
    }
    out
}

/// Jiffies the machine's CPUs were busy and in all, from /proc/stat.
fn machine_jiffies() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: f64 = v.iter().take(8).sum();
    // user nice system idle iowait irq softirq steal
    let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
    (total - idle, total)
}

/// How busy the whole machine was between two [`machine_jiffies`] readings, in percent.
fn machine_busy(before: (f64, f64), after: (f64, f64)) -> f64 {
    let total = after.1 - before.1;
    if total <= 0.0 {
        return 0.0;
    }
    100.0 * (after.0 - before.0) / total
}

/// Where the CPU went between two [`cpu_by_process`] snapshots, per email, biggest first.
fn cpu_per_email(
    before: &HashMap<u32, (String, f64)>,
    after: &HashMap<u32, (String, f64)>,
    n: u64,
) -> String {
    let group = |comm: &str| -> &'static str {
        match comm {
            c if c.starts_with("mailbridge") => "service",
            c if c.starts_with("beam") || c.starts_with("erl") || c.contains("rabbit") => {
                "RabbitMQ"
            }
            c if c.starts_with("postgres") => "PostgreSQL",
            c if c.starts_with("smtp-sink") => "smtp-sink",
            c if c.starts_with("node") => "Node.js reference",
            c if c.starts_with("mbsync") => "mbsync",
            c if c.starts_with("dovecot") || c.starts_with("imap") || c.starts_with("auth") => {
                "Dovecot"
            }
            c if c.starts_with("throughput") || c.starts_with("tokio") => "benchmark client",
            _ => "other",
        }
    };
    let mut sums: HashMap<&str, f64> = HashMap::new();
    for (pid, (comm, t)) in after {
        // A process started during the run counts from zero.
        let d = t - before.get(pid).map(|b| b.1).unwrap_or(0.0);
        if d > 0.0 {
            if std::env::var("BENCH_CPU_DETAIL").is_ok() && d > 0.01 {
                eprintln!("cpu: {comm} {d:.2} s");
            }
            *sums.entry(group(comm)).or_insert(0.0) += d;
        }
    }
    let mut v: Vec<(&str, f64)> = sums.into_iter().collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v.iter()
        .map(|(g, t)| format!("{g} {:.0} µs", t * 1e6 / n.max(1) as f64))
        .collect::<Vec<_>>()
        .join(", ")
}

struct Sink {
    child: Child,
    port: u16,
}

impl Sink {
    fn start() -> Self {
        let port = common::free_port();
        let child = Command::new("/usr/sbin/smtp-sink")
            .args(["-u", "nobody", &format!("127.0.0.1:{port}"), "1024"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("smtp-sink (Debian package postfix; scripts/bench.sh installs it)");
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "smtp-sink did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Sink { child, port }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `BENCH_PREFETCH` overrides `[rabbitmq] prefetch`, `BENCH_ATTACHMENTS_STORE` `[attachments]
/// store` (default: the service's defaults).
fn tune(env: &TestEnv) {
    let path = env.config_path();
    let mut text = std::fs::read_to_string(&path).unwrap();
    if let Ok(p) = std::env::var("BENCH_PREFETCH") {
        text = text.replacen("[rabbitmq]\n", &format!("[rabbitmq]\nprefetch = {p}\n"), 1);
    }
    if let Ok(store) = std::env::var("BENCH_ATTACHMENTS_STORE") {
        text = text.replacen(
            "[attachments]\n",
            &format!("[attachments]\nstore = \"{store}\"\n"),
            1,
        );
    }
    std::fs::write(path, text).unwrap();
}

fn sink_tenant(env: &TestEnv, port: u16) {
    tune(env);
    env.write_tenant(
        "bench.toml",
        &format!(
            "id = \"bench\"\n[[providers]]\nid = \"sink\"\nname = \"smtp-sink\"\nkind = \"smtp\"\nhost = \"127.0.0.1\"\nport = {port}\ntls = \"none\"\nmax_connections = {}\n",
            env_num("BENCH_SMTP_CONNECTIONS", 16)
        ),
    );
}

fn request(id: &str, body: &str) -> Vec<u8> {
    let mut r = common::guide_request("bench", "sink", id, None);
    r["body_content"] = serde_json::Value::String(body.to_string());
    serde_json::to_vec(&r).unwrap()
}

fn html_4k() -> String {
    let para = "<p>Dear customer, thank you for your order. Your parcel is on its way and will arrive within three working days.</p>\n";
    let mut s = String::from("<html><body>\n");
    while s.len() < 4000 {
        s.push_str(para);
    }
    s.push_str("</body></html>");
    s
}

async fn declare_queue(env: &TestEnv, queue: &str) {
    let conn = env.amqp().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        queue.into(),
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

/// Publishes one persistent request to `email.send`; the confirm is for the caller to await.
async fn publish_request(ch: &lapin::Channel, body: &[u8]) -> lapin::PublisherConfirm {
    ch.basic_publish(
        "".into(),
        "email.send".into(),
        Default::default(),
        body,
        lapin::BasicProperties::default().with_delivery_mode(2),
    )
    .await
    .unwrap()
}

async fn publish_many(env: &TestEnv, bodies: impl Iterator<Item = Vec<u8>>) {
    let conn = env.amqp().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let mut pending = Vec::new();
    for body in bodies {
        pending.push(publish_request(&ch, &body).await);
        if pending.len() >= 2000 {
            for p in pending.drain(..) {
                p.await.unwrap();
            }
        }
    }
    for p in pending {
        p.await.unwrap();
    }
    let _ = conn.close(200, "OK".into()).await;
}

/// Watches a queue's depth on one channel (a passive declare per look: cheap for the broker,
/// unlike a connection per look or a `count(*)` over the outbox while the service writes it).
struct DepthWatch {
    conn: lapin::Connection,
    ch: lapin::Channel,
    queue: String,
}

impl DepthWatch {
    async fn new(env: &TestEnv, queue: &str) -> Self {
        let conn = env.amqp().await;
        let ch = conn.create_channel().await.unwrap();
        DepthWatch {
            conn,
            ch,
            queue: queue.to_string(),
        }
    }

    async fn depth(&self) -> u64 {
        common::queue_depth(&self.ch, &self.queue)
            .await
            .map(u64::from)
            .unwrap_or(0)
    }

    /// Polls every 20 ms until the depth reaches `n` (or `limit` passes); returns the depth.
    async fn wait_for(&self, n: u64, started: Instant, limit: Duration) -> u64 {
        let mut depth = 0;
        while started.elapsed() < limit {
            depth = self.depth().await;
            if depth >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        depth
    }

    async fn close(self) {
        let _ = self.conn.close(200, "OK".into()).await;
    }
}

async fn count(db: &tokio_postgres::Client, sql: &str) -> i64 {
    db.query_one(sql, &[]).await.map(|r| r.get(0)).unwrap_or(0)
}

struct Row {
    /// What the ratios line matches rows by: `outbound`, `inbound` (mailbridge's runs) and
    /// the references' (`outbound-node`, `inbound-mbsync`, `inbound-node`).
    key: &'static str,
    /// Emails per second (0 for the latency run).
    rate: f64,
    what: String,
    result: String,
    rss_mb: f64,
    /// CPU time per email by process group during the run.
    cpu: String,
}

/// The build of an earlier commit the outbound run is repeated with (`BENCH_BASELINE_BIN`,
/// set by scripts/bench.sh), and what it is called in the table.
struct Baseline {
    bin: std::path::PathBuf,
    name: String,
}

fn baseline() -> Option<Baseline> {
    let bin = std::env::var_os("BENCH_BASELINE_BIN")?;
    Some(Baseline {
        bin: bin.into(),
        name: std::env::var("BENCH_BASELINE_NAME").unwrap_or_else(|_| "an earlier build".into()),
    })
}

/// Creates and migrates the run's database before the clock starts, as a deployment does
/// before it starts the service (`mailbridge migrate`): the runs time the service's work,
/// not `CREATE DATABASE`.
fn migrate(env: &TestEnv, bin: Option<&std::path::Path>) {
    let out = match bin {
        Some(b) => env.command_of(b, &["migrate"]),
        None => env.command(&["migrate"]),
    };
    assert!(
        out.status.success(),
        "migrate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The outbound run: today's service, or `baseline`'s binary on the same requests and sink.
async fn outbound_throughput(n: u64, baseline: Option<&Baseline>) -> Row {
    let env = TestEnv::new("bench_out");
    let sink = Sink::start();
    sink_tenant(&env, sink.port);
    declare_queue(&env, "email.send").await;
    let body = html_4k();
    publish_many(&env, (0..n).map(|i| request(&format!("t-{i}"), &body))).await;

    // The service declares the result queue; a client may declare it first (contract §3).
    declare_queue(&env, "email.send.result").await;
    let results = DepthWatch::new(&env, "email.send.result").await;
    migrate(&env, baseline.map(|b| b.bin.as_path()));
    let meter = Meter::start();
    let started = Instant::now();
    let svc = match baseline {
        Some(b) => Service::start_bin(&env, &b.bin, &[]),
        None => Service::start(&env),
    };
    // A result is published only after its outbox row is committed `sent`: once there are n
    // results, every row is sent (checked below).
    results.wait_for(n, started, Duration::from_secs(600)).await;
    let took = started.elapsed().as_secs_f64();
    let traffic = amqp_per_email(svc.pid(), n);
    results.close().await;
    let db = env.db().await;
    let sent = count(&db, "SELECT count(*) FROM outbox WHERE status = 'sent'").await;
    let cpu = meter.report(&Meter::now(), n);
    Row {
        key: if baseline.is_some() {
            "outbound-baseline"
        } else {
            "outbound"
        },
        rate: sent as f64 / took,
        what: match baseline {
            Some(b) => format!("outbound throughput of {} (the same run)", b.name),
            None => format!("outbound throughput ({n} × 4 KB HTML, preloaded)"),
        },
        result: format!(
            "{:.0} emails/s ({sent} sent in {took:.1} s, from service start)",
            sent as f64 / took
        ),
        rss_mb: peak_rss_mb(svc.pid()),
        cpu: format!("{cpu}; {traffic}"),
    }
}

/// Publishes `total` requests at `rate` per second, each persistent and confirmed (a CRM's
/// publisher, as the integration guide has it); returns when each was published.
async fn offer(ch: &lapin::Channel, rate: u64, total: u64) -> HashMap<String, SystemTime> {
    let body = html_4k();
    let mut published: HashMap<String, SystemTime> = HashMap::new();
    let mut confirms = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for i in 0..total {
        tick.tick().await;
        let id = format!("l-{i}");
        let payload = request(&id, &body);
        published.insert(id, SystemTime::now());
        confirms.push(publish_request(ch, &payload).await);
        if confirms.len() >= 500 {
            futures_util::future::join_all(confirms.drain(..)).await;
        }
    }
    futures_util::future::join_all(confirms).await;
    published
}

/// The latency run's offered load on its own: the same publishes at the same rate into
/// `email.send`, with no service running. What the machine spends on it (the broker's
/// share above all) is not there for the service in the latency run.
async fn offered_load_alone(rate: u64, secs: u64) -> Row {
    let env = TestEnv::new("bench_load");
    declare_queue(&env, "email.send").await;
    let conn = env.amqp().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let total = rate * secs;
    let meter = Meter::start();
    offer(&ch, rate, total).await;
    let cpu = meter.report(&Meter::now(), total);
    let _ = conn.close(200, "OK".into()).await;
    Row {
        key: "load",
        rate: 0.0,
        what: format!("the latency run's load alone ({rate}/s published for {secs} s, no service)"),
        result: format!("{total} published and confirmed"),
        rss_mb: 0.0,
        cpu,
    }
}

async fn outbound_latency(rate: u64, secs: u64) -> Row {
    let env = TestEnv::new("bench_lat");
    let sink = Sink::start();
    sink_tenant(&env, sink.port);
    let svc = Service::start(&env);
    svc.wait_health(200, Duration::from_secs(60)).await;
    let db = env.db().await;
    let conn = env.amqp().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let total = rate * secs;
    let meter = Meter::start();
    let published = offer(&ch, rate, total).await;
    let start = Instant::now();
    while count(&db, "SELECT count(*) FROM outbox WHERE status = 'sent'").await < total as i64
        && start.elapsed() < Duration::from_secs(120)
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let cpu = meter.report(&Meter::now(), total);
    let rows = db
        .query(
            "SELECT message_id, created_at, sent_at FROM outbox WHERE status = 'sent'",
            &[],
        )
        .await
        .unwrap();
    let at = |r: &tokio_postgres::Row, i: usize| {
        let t: time::OffsetDateTime = r.get(i);
        SystemTime::UNIX_EPOCH + Duration::from_nanos(t.unix_timestamp_nanos() as u64)
    };
    let ms = |from: SystemTime, to: SystemTime| {
        to.duration_since(from).unwrap_or_default().as_secs_f64() * 1000.0
    };
    // publish → accepted, and its two parts: publish → claimed (the outbox row's creation,
    // PostgreSQL's clock at its transaction's start) and claimed → accepted.
    let mut lat = Vec::new();
    let mut to_claim = Vec::new();
    let mut from_claim = Vec::new();
    for r in &rows {
        let id: String = r.get(0);
        let Some(p) = published.get(&id) else {
            continue;
        };
        lat.push(ms(*p, at(r, 2)));
        to_claim.push(ms(*p, at(r, 1)));
        from_claim.push(ms(at(r, 1), at(r, 2)));
    }
    for v in [&mut lat, &mut to_claim, &mut from_claim] {
        v.sort_by(|a, b| a.total_cmp(b));
    }
    let pct_of = |v: &[f64], q: f64| {
        v.get(((v.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or(0.0)
    };
    let pct = |q: f64| pct_of(&lat, q);
    let parts = format!(
        "publish → claimed p50 {:.1} / p99 {:.1} ms, claimed → accepted p50 {:.1} / p99 {:.1} ms",
        pct_of(&to_claim, 0.5),
        pct_of(&to_claim, 0.99),
        pct_of(&from_claim, 0.5),
        pct_of(&from_claim, 0.99)
    );
    Row {
        key: "latency",
        rate: 0.0,
        what: format!("outbound latency ({rate}/s offered for {secs} s, publish → accepted)"),
        result: format!(
            "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} of {total} sent; {parts})",
            pct(0.5),
            pct(0.99),
            lat.last().copied().unwrap_or(0.0),
            lat.len()
        ),
        rss_mb: peak_rss_mb(svc.pid()),
        cpu,
    }
}

fn realistic(i: usize) -> Vec<u8> {
    let id = format!("in-{i}@customer.example");
    let text =
        "Hello, thanks for the quick answer. Could you send the updated offer? Regards, Jo\r\n"
            .repeat(6);
    match i % 3 {
        0 => format!(
            "From: Jo Customer <jo@customer.example>\r\nTo: sales@acme.example\r\nSubject: Re: Offer {i}\r\nMessage-ID: <{id}>\r\nIn-Reply-To: <offer-{i}@acme.example>\r\nReferences: <offer-{i}@acme.example>\r\nDate: Fri, 19 Sep 2025 11:00:00 +0000\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{text}"
        )
        .into_bytes(),
        1 => format!(
            "From: Jo Customer <jo@customer.example>\r\nTo: sales@acme.example\r\nSubject: Fwd: Invoice {i}\r\nMessage-ID: <{id}>\r\nDate: Fri, 19 Sep 2025 11:00:00 +0000\r\nMIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=ALT\r\n\r\n--ALT\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{text}\r\n--ALT\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>{text}</p>\r\n--ALT--\r\n"
        )
        .into_bytes(),
        _ => {
            let line = "JVBERi0xLjQKJcOkw7zDtsOfCjIgMCBvYmoKPDwvTGVuZ3RoIDMgMCBSL0ZpbHRlci9GbGF0ZURlY29kZT4+CnN0cmVhbQp4nA==\r\n";
            format!(
                "From: Jo Customer <jo@customer.example>\r\nTo: sales@acme.example\r\nSubject: Order form {i}\r\nMessage-ID: <{id}>\r\nDate: Fri, 19 Sep 2025 11:00:00 +0000\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=MIX\r\n\r\n--MIX\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{text}\r\n--MIX\r\nContent-Type: application/pdf; name=\"order-{i}.pdf\"\r\nContent-Disposition: attachment; filename=\"order-{i}.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\n{}--MIX--\r\n",
                line.repeat(200)
            )
            .into_bytes()
        }
    }
}

async fn inbound_throughput(n: usize) -> Row {
    let env = TestEnv::new("bench_in");
    let pw = "bench-pw";
    let dovecot = Dovecot::start(&env.dir.join("dovecot"), &[("sales", pw)]);
    dovecot.deliver_files("sales", (0..n).map(realistic));
    // Let Dovecot index the maildir before the clock starts.
    dovecot.imap("sales", pw, "m.select('INBOX')");
    env.mailbox_tenant(
        "bench",
        "imap",
        dovecot.imap_port,
        "sales",
        pw,
        "initial_sync = \"all\"",
    );
    tune(&env);
    declare_queue(&env, "email.inbound").await;
    let inbound = DepthWatch::new(&env, "email.inbound").await;
    migrate(&env, None);
    let meter = Meter::start();
    let started = Instant::now();
    let svc = Service::start(&env);
    let depth = inbound
        .wait_for(n as u64, started, Duration::from_secs(600))
        .await;
    let took = started.elapsed().as_secs_f64();
    inbound.close().await;
    let cpu = meter.report(&Meter::now(), n as u64);
    Row {
        key: "inbound",
        rate: depth as f64 / took,
        what: format!("inbound throughput ({n} messages: replies, forwards, attachments)"),
        result: format!(
            "{:.0} emails/s ({depth} published in {took:.1} s, from service start)",
            depth as f64 / took
        ),
        rss_mb: peak_rss_mb(svc.pid()),
        cpu,
    }
}

/// One size of the mailbox-scale run.
struct ScaleRow {
    mailboxes: usize,
    /// From service start until every mailbox reported ok (logged in, synced, idling).
    connected_s: f64,
    connected: usize,
    rss_mb: f64,
    idle_cpu_pct: f64,
    pg_connections: i64,
    fds: usize,
    latency_ms: (f64, f64),
    /// A reload that adds, removes and changes one mailbox: how long the reload took, and
    /// how many logins followed (only the added and the changed mailbox log in again).
    reload_ms: f64,
    logins_after_reload: usize,
}

/// Successful IMAP logins in Dovecot's log so far.
fn dovecot_logins(dovecot: &Dovecot) -> usize {
    std::fs::read_to_string(dovecot.dir.join("dovecot.log"))
        .map(|t| t.matches(" Login: user=<").count())
        .unwrap_or(0)
}

fn rss_mb(pid: u32) -> f64 {
    status_mb(pid, "VmRSS:")
}

/// CPU seconds (user + system) of one process so far.
fn cpu_seconds(pid: u32) -> f64 {
    let ticks = 100.0;
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let after = s.rsplit_once(')')?.1.to_string();
            let f: Vec<&str> = after.split_whitespace().collect();
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / ticks)
        })
        .unwrap_or(0.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// `n` idle IMAP mailboxes (IDLE, on a Dovecot whose idle sessions hibernate): how long
/// until all are connected (paced by `connect_rate_per_host`), then at rest the service's
/// RSS, CPU, database connections and open files, and how long a new email in one mailbox
/// takes to be published while all idle.
async fn mailbox_scale(n: usize) -> ScaleRow {
    let env = TestEnv::new("bench_mbx");
    let pw = "bench-pw";
    // One user more than configured: the mailbox a reload adds.
    let names: Vec<String> = (0..=n).map(|i| format!("m{i}")).collect();
    let users: Vec<(&str, &str)> = names.iter().map(|u| (u.as_str(), pw)).collect();
    let dovecot = Dovecot::start_scaled(&env.dir.join("dovecot"), &users);
    let tenant = |configured: &[String], changed: Option<&str>| {
        let mut t = String::from(
            "id = \"bench\"\n[[providers]]\nid = \"files\"\nkind = \"file\"\ndir = \"sent\"\n",
        );
        for u in configured {
            let poll = if Some(u.as_str()) == changed {
                "24m"
            } else {
                "25m"
            };
            t.push_str(&format!(
                "[[mailboxes]]\nid = \"mb-{u}\"\nuser_id = \"user-{u}\"\nprovider_id = \"files\"\nprotocol = \"imap\"\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\nusername = \"{u}\"\npassword = \"{pw}\"\nidle = true\npoll_interval = \"{poll}\"\n",
                dovecot.imap_port
            ));
        }
        t
    };
    let names: Vec<String> = names[..n].to_vec();
    env.write_tenant("bench.toml", &tenant(&names, None));
    declare_queue(&env, "email.inbound").await;
    let started = Instant::now();
    let svc = Service::start_with(&env, &[("MAILBRIDGE_ADMIN_TOKEN", "bench-token")]);
    let http = reqwest::Client::new();
    let mut connected = 0;
    while started.elapsed() < Duration::from_secs(600) {
        if let Ok(r) = http
            .get(format!("{}/api/mailboxes?limit=1", svc.base_url))
            .send()
            .await
        {
            if let Ok(v) = r.json::<serde_json::Value>().await {
                connected = v["counts"]["ok"].as_u64().unwrap_or(0) as usize;
            }
        }
        if connected >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let connected_s = started.elapsed().as_secs_f64();
    // At rest: Dovecot hibernates the sessions, the service only waits.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let cpu0 = cpu_seconds(svc.pid());
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(20)).await;
    let idle_cpu_pct = (cpu_seconds(svc.pid()) - cpu0) / t0.elapsed().as_secs_f64() * 100.0;
    let rss = rss_mb(svc.pid());
    let fds = std::fs::read_dir(format!("/proc/{}/fd", svc.pid()))
        .map(|d| d.count())
        .unwrap_or(0);
    let db = env.db().await;
    let pg_connections: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .map(|r| r.get(0))
        .unwrap_or(-1);
    // New mail in one mailbox at a time, while all idle.
    let inbound = DepthWatch::new(&env, "email.inbound").await;
    let mut latencies = Vec::new();
    let samples = 40.min(n);
    for k in 0..samples {
        let user = &names[(k * 7919) % n];
        let before = inbound.depth().await;
        let t = Instant::now();
        dovecot.deliver_files(
            user,
            std::iter::once(
                format!(
                    "From: a@example.com\r\nTo: {user}@example.com\r\nSubject: latency {k}\r\nMessage-ID: <lat-{k}-{user}@example.com>\r\n\r\nhello\r\n"
                )
                .into_bytes(),
            ),
        );
        let depth = inbound
            .wait_for(before + 1, t, Duration::from_secs(30))
            .await;
        latencies.push(t.elapsed().as_secs_f64() * 1000.0);
        if depth <= before {
            println!("  new mail in {user} not published within 30 s");
        }
    }
    inbound.close().await;
    latencies.sort_by(|a, b| a.total_cmp(b));

    // A reload: the first mailbox removed, the second changed, one added.
    let logins_before = dovecot_logins(&dovecot);
    let mut next: Vec<String> = names[1..].to_vec();
    next.push(format!("m{n}"));
    env.write_tenant(
        "bench.toml",
        &tenant(&next, next.first().map(String::as_str)),
    );
    let t = Instant::now();
    let reloaded = http
        .post(format!("{}/api/config/reload", svc.base_url))
        .bearer_auth("bench-token")
        .send()
        .await
        .map(|r| r.status().is_success())
        .unwrap_or(false);
    let reload_ms = t.elapsed().as_secs_f64() * 1000.0;
    assert!(reloaded, "the reload was refused");
    let added = format!("mb-m{n}");
    while t.elapsed() < Duration::from_secs(60) {
        let ok = http
            .get(format!(
                "{}/api/mailboxes?limit=1000&status=ok",
                svc.base_url
            ))
            .send()
            .await
            .ok();
        let page = match ok {
            Some(r) => r.json::<serde_json::Value>().await.unwrap_or_default(),
            None => serde_json::Value::Null,
        };
        let counts_ok = page["counts"]["ok"].as_u64().unwrap_or(0) as usize;
        let listed = |id: &str| {
            page["mailboxes"]
                .as_array()
                .is_some_and(|a| a.iter().any(|m| m["id"] == id))
        };
        if counts_ok == n && (n > 1000 || listed(&added)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Dovecot writes its log a moment later.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let logins_after_reload = dovecot_logins(&dovecot) - logins_before;
    ScaleRow {
        reload_ms,
        logins_after_reload,
        mailboxes: n,
        connected_s,
        connected,
        rss_mb: rss,
        idle_cpu_pct,
        pg_connections,
        fds,
        latency_ms: (percentile(&latencies, 0.5), percentile(&latencies, 0.99)),
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0);
    format!("{cores} cores ({cpu}), {} GiB", mem / 1024 / 1024)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    // `cargo bench` passes --bench; under `cargo test` there is nothing to measure.
    if !std::env::args().any(|a| a == "--bench") {
        println!("the benchmark runs with `cargo bench --bench throughput` (scripts/bench.sh)");
        return;
    }
    let out_n = env_num("BENCH_OUTBOUND_N", 20_000);
    let rate = env_num("BENCH_LATENCY_RATE", 1000);
    let secs = env_num("BENCH_LATENCY_SECS", 30);
    let in_n = env_num("BENCH_INBOUND_N", 10_000) as usize;
    // BENCH_ONLY=outbound|latency|inbound|mailboxes runs one part (for profiling).
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let wanted = |name: &str| only.is_empty() || only == name;
    let mut rows = Vec::new();
    if wanted("outbound") {
        // A short first run, not counted: the first run of a benchmark process was the
        // slowest of its runs (by up to a quarter), whichever build it ran.
        let warm = outbound_throughput(env_num("BENCH_WARMUP_N", 2_000), None).await;
        println!("warm-up (not counted): {}", warm.result);
        // With a baseline: today's code and the baseline twice each, in the order A B B A, so
        // that neither the machine's drift during the run nor the place in the order favours
        // one; the ratio is of their means.
        let b = baseline();
        rows.push(outbound_throughput(out_n, None).await);
        if let Some(b) = &b {
            rows.push(outbound_throughput(out_n, Some(b)).await);
            rows.push(outbound_throughput(out_n, Some(b)).await);
            rows.push(outbound_throughput(out_n, None).await);
        }
        rows.push(reference_outbound::node_outbound(out_n).await);
    }
    if wanted("latency") {
        rows.push(offered_load_alone(rate, secs.min(15)).await);
        rows.push(outbound_latency(rate, secs).await);
    }
    if wanted("inbound") {
        rows.push(inbound_throughput(in_n).await);
        rows.push(reference_inbound::mbsync_inbound(in_n).await);
        rows.push(reference_inbound::node_inbound(in_n).await);
    }
    // BENCH_MAILBOXES: the sizes of the mailbox-scale run (only with BENCH_ONLY=mailboxes or
    // when set, as it takes minutes).
    let mut scale = Vec::new();
    if only == "mailboxes" || std::env::var("BENCH_MAILBOXES").is_ok() {
        let sizes = std::env::var("BENCH_MAILBOXES").unwrap_or_else(|_| "100,1000,10000".into());
        for n in sizes
            .split(',')
            .filter_map(|s| s.trim().parse::<usize>().ok())
        {
            let row = mailbox_scale(n).await;
            println!(
                "{} mailboxes: {} connected in {:.1} s, RSS {:.0} MB",
                row.mailboxes, row.connected, row.connected_s, row.rss_mb
            );
            scale.push(row);
        }
    }
    println!();
    println!("machine: {}", machine());
    println!("RabbitMQ, PostgreSQL, the mail servers and the service share this machine.");
    println!();
    println!("| run | result | peak RSS | CPU (whole machine; per email, by process) |");
    println!("|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} |",
            r.what,
            r.result,
            // No service in the run (the offered load alone): no RSS of it.
            if r.rss_mb > 0.0 {
                format!("{:.0} MB", r.rss_mb)
            } else {
                "–".to_string()
            },
            r.cpu
        );
    }
    // The ratios of issue 15: mailbridge's rate over each reference's, from this run (the
    // mean of a part's runs when it ran more than once).
    let rate = |key: &str| {
        let rates: Vec<f64> = rows
            .iter()
            .filter(|r| r.key == key)
            .map(|r| r.rate)
            .collect();
        (!rates.is_empty()).then(|| rates.iter().sum::<f64>() / rates.len() as f64)
    };
    let mut ratios = Vec::new();
    for (ours, reference, target) in [
        ("outbound", "outbound-node", 4.0),
        ("inbound", "inbound-mbsync", 1.5),
        ("inbound", "inbound-node", 5.0),
        // Issue 15: the guarantees of issue 11 cost at most 5 % of the outbound rate.
        ("outbound", "outbound-baseline", 0.95),
    ] {
        if let (Some(a), Some(b)) = (rate(ours), rate(reference)) {
            if b > 0.0 {
                ratios.push(format!(
                    "{ours} / {reference}: {:.2}× (target ≥ {target}×)",
                    a / b
                ));
            }
        }
    }
    if !ratios.is_empty() {
        println!();
        println!("ratios in this run: {}", ratios.join("; "));
    }
    if !scale.is_empty() {
        println!();
        println!("| idle IMAP mailboxes | all connected after start | RSS | RSS per mailbox | idle CPU | PostgreSQL connections | open files | new mail published p50 / p99 | reload (1 added, 1 removed, 1 changed) |");
        println!("|---|---|---|---|---|---|---|---|---|");
        for r in &scale {
            println!(
                "| {} | {:.1} s ({} ok) | {:.0} MB | {:.1} KB | {:.2} % of a core | {} | {} | {:.0} / {:.0} ms | {:.0} ms, then {} login(s) |",
                r.mailboxes,
                r.connected_s,
                r.connected,
                r.rss_mb,
                r.rss_mb * 1024.0 / r.mailboxes as f64,
                r.idle_cpu_pct,
                r.pg_connections,
                r.fds,
                r.latency_ms.0,
                r.latency_ms.1,
                r.reload_ms,
                r.logins_after_reload
            );
        }
        if let (Some(a), Some(b)) = (scale.first(), scale.last()) {
            if b.mailboxes > a.mailboxes {
                println!(
                    "cost of one more idle mailbox ({} → {}): {:.1} KB of RSS",
                    a.mailboxes,
                    b.mailboxes,
                    (b.rss_mb - a.rss_mb) * 1024.0 / (b.mailboxes - a.mailboxes) as f64
                );
            }
        }
    }
}
