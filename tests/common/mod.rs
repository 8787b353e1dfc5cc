//! Helpers for the integration tests: each test gets its own RabbitMQ vhost, its own
//! PostgreSQL database and its own HTTP port, so tests run in parallel against the one local
//! broker and database without seeing each other. The service runs as the real binary.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub mod api_server;
pub mod broker_faults;
pub mod checks;
pub mod http_server;
pub mod ledger;
pub mod mail_api_server;
pub mod pg_cluster;
pub mod rabbit_node;
pub mod sys;
pub mod token_server;

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub const BIN: &str = env!("CARGO_BIN_EXE_mailbridge");

/// A name unique to this test process and call.
pub fn unique(tag: &str) -> String {
    format!(
        "{tag}_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// Where the tests find PostgreSQL (a server URL without a database name).
pub fn pg_server_url() -> String {
    std::env::var("MAILBRIDGE_TEST_PG").unwrap_or_else(|_| "postgres://root@127.0.0.1:5432".into())
}

pub fn rabbitmqctl(args: &[&str]) -> Output {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl must be installed (scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A port free for a test's server, taken below the kernel's ephemeral range (`ip_local_port_range`) when there is room: a
/// port the kernel hands out (port 0) can be taken again, before the server it is meant for
/// binds it, as the local port of any outgoing connection — a service once failed to start
/// on one. Ports below the range are never handed out that way; a counter shared by the
/// process's tests keeps them apart, and each is checked free before it is given.
pub fn free_port() -> u16 {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<usize>().ok())
        .unwrap_or(0);
    const LOW: usize = 10_000;
    if ephemeral_low > LOW + 2_000 {
        let span = ephemeral_low - LOW;
        // Each test process starts elsewhere in the span, so consecutive ones do not race.
        let start = (std::process::id() as usize).wrapping_mul(7_919) % span;
        for _ in 0..span {
            let port = LOW + (start + NEXT.fetch_add(1, Ordering::SeqCst)) % span;
            // RabbitMQ's management, metrics and distribution ports.
            if [15_672, 15_692, 25_672].contains(&port) {
                continue;
            }
            if std::net::TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
                return port as u16;
            }
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One test's world: a vhost, a database name, a folder with the config.
pub struct TestEnv {
    pub dir: PathBuf,
    pub vhost: String,
    /// Created for this test (and deleted after it).
    own_vhost: bool,
    pub db_name: String,
    pub http_port: u16,
    /// The PostgreSQL server (URL without a database) this env's database lives on.
    pub pg_server: String,
}

impl TestEnv {
    pub fn new(tag: &str) -> Self {
        let name = unique(tag);
        let vhost = format!("mbtest-{name}");
        rabbitmqctl(&["add_vhost", &vhost]);
        rabbitmqctl(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"]);
        Self::with_vhost(name, vhost, true)
    }

    /// On a vhost of its own whose default queue type is `queue_type` (`quorum`, say): what
    /// argument-less declares get there.
    pub fn with_default_queue_type(tag: &str, queue_type: &str) -> Self {
        let name = unique(tag);
        let vhost = format!("mbtest-{name}");
        rabbitmqctl(&["add_vhost", &vhost, "--default-queue-type", queue_type]);
        rabbitmqctl(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"]);
        Self::with_vhost(name, vhost, true)
    }

    /// On the broker's default vhost `/`, where the guide's client examples connect. Only one
    /// test at a time may use it.
    pub fn on_default_vhost(tag: &str) -> Self {
        Self::with_vhost(unique(tag), "/".into(), false)
    }

    fn with_vhost(name: String, vhost: String, own_vhost: bool) -> Self {
        let dir = std::env::temp_dir().join(format!("mbtest-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("tenants.d")).unwrap();
        let env = TestEnv {
            dir,
            vhost,
            own_vhost,
            db_name: format!("mb_test_{name}").to_lowercase(),
            http_port: free_port(),
            pg_server: pg_server_url(),
        };
        env.write_config("");
        env
    }

    /// This env's database on another PostgreSQL server (a private `PgCluster` a test may
    /// restart); call `write_config` again afterwards for extra settings.
    pub fn with_pg_server(mut self, server_url: &str) -> Self {
        self.pg_server = server_url.to_string();
        self.write_config("");
        self
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("mailbridge.toml")
    }

    pub fn db_url(&self) -> String {
        format!("{}/{}", self.pg_server, self.db_name)
    }

    pub fn amqp_url(&self) -> String {
        format!(
            "amqp://guest:guest@127.0.0.1:5672/{}",
            self.vhost.replace('/', "%2f")
        )
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// Writes the main config for this env, with `extra` TOML appended.
    pub fn write_config(&self, extra: &str) {
        let rabbitmq = format!(
            "host = \"127.0.0.1\"\nvhost = \"{}\"\nreconnect_max_delay = \"2s\"\nheartbeat = \"5s\"\n",
            self.vhost
        );
        self.write_config_with(&rabbitmq, &self.db_url(), extra);
    }

    /// Writes the main config with `rabbitmq` as the body of its `[rabbitmq]` table and
    /// `database_url` as `[database] url` (for a broker or database other than the shared
    /// ones: a TLS listener, a private cluster).
    pub fn write_config_with(&self, rabbitmq: &str, database_url: &str, extra: &str) {
        let text = format!(
            r#"
[rabbitmq]
{rabbitmq}

[database]
url = "{db}"
max_connections = 4

[http]
listen = "127.0.0.1:{port}"

[shutdown]
grace = "5s"

[attachments]
dir = "{attachments}"
public_base_url = "http://127.0.0.1:{port}"
{extra}
"#,
            attachments = self.dir.join("attachments").display(),
            db = database_url,
            port = self.http_port,
        );
        std::fs::write(self.config_path(), text).unwrap();
    }

    pub fn write_tenant(&self, file: &str, text: &str) {
        std::fs::write(self.dir.join("tenants.d").join(file), text).unwrap();
    }

    /// Runs a one-shot command of the binary (`migrate`, `check-config`).
    pub fn command(&self, args: &[&str]) -> Output {
        self.command_of(Path::new(BIN), args)
    }

    /// [`TestEnv::command`] of another build of the service (the benchmark's baseline).
    pub fn command_of(&self, bin: &Path, args: &[&str]) -> Output {
        Command::new(bin)
            .arg("--config")
            .arg(self.config_path())
            .args(args)
            .env_remove("DATABASE_URL")
            .env_remove("RABBITMQ_URL")
            .env_remove("HTTP_LISTEN")
            .output()
            .unwrap()
    }

    pub async fn amqp(&self) -> lapin::Connection {
        lapin::Connection::connect(&self.amqp_url(), lapin::ConnectionProperties::default())
            .await
            .expect("connect to the test vhost")
    }

    pub async fn db(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.db_url(), tokio_postgres::NoTls)
            .await
            .expect("connect to the test database");
        tokio::spawn(conn);
        client
    }

    /// The bytes the service stored under `id` (an attachment, a dead-lettered email's raw
    /// bytes) in PostgreSQL, read as another instance would: the blob row says they are
    /// complete, its parts in order are the bytes. None when there is no such blob.
    pub async fn stored_blob(&self, id: &str) -> Option<Vec<u8>> {
        let db = self.db().await;
        let blob = db
            .query_opt(
                "SELECT size, parts FROM attachment_blobs WHERE id = $1",
                &[&id],
            )
            .await
            .unwrap()?;
        let (size, parts): (i64, i32) = (blob.get(0), blob.get(1));
        let rows = db
            .query(
                "SELECT part, bytes FROM attachment_parts WHERE id = $1 ORDER BY part",
                &[&id],
            )
            .await
            .unwrap();
        assert_eq!(rows.len(), parts as usize, "blob {id}: every part stored");
        let mut out = Vec::new();
        for (i, r) in rows.iter().enumerate() {
            assert_eq!(r.get::<_, i32>(0), i as i32);
            out.extend_from_slice(r.get::<_, &[u8]>(1));
        }
        assert_eq!(out.len() as i64, size, "blob {id}: its size");
        Some(out)
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if self.own_vhost {
            let _ = Command::new("rabbitmqctl")
                .args(["delete_vhost", &self.vhost])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = Command::new("psql")
            .arg(format!("{}/postgres", self.pg_server))
            .arg("-qc")
            .arg(format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.db_name
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The service, running as its real binary.
pub struct Service {
    child: Option<Child>,
    pub log: PathBuf,
    pub base_url: String,
}

impl Service {
    pub fn start(env: &TestEnv) -> Self {
        Self::start_with(env, &[])
    }

    pub fn start_with(env: &TestEnv, vars: &[(&str, &str)]) -> Self {
        Self::start_bin(env, Path::new(BIN), vars)
    }

    /// Starts another build of the service (the benchmark's baseline of an earlier commit).
    pub fn start_bin(env: &TestEnv, bin: &Path, vars: &[(&str, &str)]) -> Self {
        let log = env.dir.join(format!("{}.log", unique("service")));
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(bin);
        cmd.arg("--config")
            .arg(env.config_path())
            .arg("run")
            .env_remove("DATABASE_URL")
            .env_remove("RABBITMQ_URL")
            .env_remove("HTTP_LISTEN")
            // MAILBRIDGE_TEST_LOG: a different log filter for the service (profiling, debugging).
            .env(
                "RUST_LOG",
                std::env::var("MAILBRIDGE_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(file);
        for (k, v) in vars {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        Service {
            child: Some(child),
            log,
            base_url: env.base_url(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGKILL: no drain, no goodbye.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        let r = reqwest::get(format!("{}{path}", self.base_url))
            .await
            .ok()?;
        let code = r.status().as_u16();
        Some((code, r.text().await.ok()?))
    }

    pub async fn get_json(&self, path: &str) -> (u16, serde_json::Value) {
        let (code, text) = self.get(path).await.expect("the service answers HTTP");
        let json = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{path} is not JSON ({e}): {text}"));
        (code, json)
    }

    /// Polls `/health` until it answers `code`; returns how long that took.
    pub async fn wait_health(&self, code: u16, timeout: Duration) -> Duration {
        let start = Instant::now();
        loop {
            if let Some((c, _)) = self.get("/health").await {
                if c == code {
                    return start.elapsed();
                }
            }
            if start.elapsed() > timeout {
                let last = self.get("/health").await;
                panic!(
                    "/health did not answer {code} within {timeout:?} (last: {last:?})\n--- service log ---\n{}",
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sends SIGTERM and waits for the exit (at most `timeout`).
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        signal(child.id(), "TERM");
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if start.elapsed() > timeout {
                let _ = child.kill();
                panic!("the service did not stop within {timeout:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn write_file(path: &Path, text: &str) {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).unwrap();
    }
    std::fs::write(path, text).unwrap();
}

/// The test SMTP server (`tests/support/smtp_server.py`, aiosmtpd) on a free port.
pub struct SmtpServer {
    child: Child,
    pub port: u16,
    pub dir: PathBuf,
    args: Vec<String>,
}

/// One message as the SMTP server received it.
#[derive(Debug, Clone)]
pub struct ReceivedMail {
    pub mail_from: String,
    pub rcpt_tos: Vec<String>,
    pub authenticated: bool,
    pub raw: Vec<u8>,
}

impl ReceivedMail {
    pub fn parsed(&self) -> mail_parser::Message<'_> {
        mail_parser::MessageParser::default()
            .parse(&self.raw)
            .expect("the received email parses")
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.raw).to_string()
    }
}

impl SmtpServer {
    pub fn start(dir: &Path, args: &[&str]) -> Self {
        let port = free_port();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        SmtpServer {
            child: Self::spawn(port, dir, &args),
            port,
            dir: dir.to_path_buf(),
            args,
        }
    }

    /// Starts the script on `port`; when the port is still held (by a server just stopped),
    /// tries again for up to 10 s.
    fn spawn(port: u16, dir: &Path, args: &[String]) -> Child {
        use std::io::BufRead;
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/smtp_server.py");
        let start = Instant::now();
        loop {
            let mut child = Command::new("python3")
                .arg(script)
                .arg("--port")
                .arg(port.to_string())
                .arg("--dir")
                .arg(dir)
                .args(args)
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("python3 runs the test SMTP server (scripts/test.sh installs aiosmtpd)");
            let stdout = child.stdout.take().expect("the server's stdout");
            let mut line = String::new();
            let _ = std::io::BufReader::new(stdout).read_line(&mut line);
            if line.trim() == "READY" {
                return child;
            }
            let _ = child.kill();
            let _ = child.wait();
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the SMTP server did not start on port {port}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Starts the server again on its port and folder with other options (another password,
    /// say), which later restarts keep.
    pub fn restart_with(&mut self, args: &[&str]) {
        self.args = args.iter().map(|a| a.to_string()).collect();
        self.restart();
    }

    /// Kills the server: connections to its port are refused until `restart`.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again (stopping it first if it runs): same port, folder and options.
    pub fn restart(&mut self) {
        self.stop();
        self.child = Self::spawn(self.port, &self.dir, &self.args);
    }

    /// Makes the server drop connections (None: stop dropping): `drop-mid-data [N]` or
    /// `drop-after-dot [N]`, see `tests/support/smtp_server.py`.
    pub fn set_fault(&self, fault: Option<&str>) {
        let f = self.dir.join("fault");
        match fault {
            Some(l) => std::fs::write(f, format!("{l}\n")).expect("write the SMTP fault file"),
            None => {
                let _ = std::fs::remove_file(f);
            }
        }
    }

    /// How many messages ended in the same read as the next MAIL FROM (the client joined the
    /// next envelope to their final dot).
    pub fn joined(&self) -> usize {
        std::fs::read_to_string(self.dir.join("joined.log"))
            .map(|t| t.lines().count())
            .unwrap_or(0)
    }

    pub fn messages(&self) -> Vec<ReceivedMail> {
        let mut names: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        names.retain(|p| p.extension().is_some_and(|x| x == "eml"));
        names.sort();
        names
            .into_iter()
            .map(|eml| {
                let meta: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(eml.with_extension("json")).unwrap())
                        .unwrap();
                ReceivedMail {
                    mail_from: meta["mail_from"].as_str().unwrap_or("").to_string(),
                    rcpt_tos: meta["rcpt_tos"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_str().unwrap().to_string())
                        .collect(),
                    authenticated: meta["auth"].as_bool().unwrap_or(false),
                    raw: std::fs::read(&eml).unwrap(),
                }
            })
            .collect()
    }

    /// Every DATA answer so far: (unix time, reply).
    pub fn attempts(&self) -> Vec<(f64, String)> {
        std::fs::read_to_string(self.dir.join("attempts.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (t, r) = l.split_once(' ')?;
                Some((t.parse().ok()?, r.to_string()))
            })
            .collect()
    }

    /// Makes the server answer DATA with `line` (None: accept again).
    pub fn set_reply(&self, line: Option<&str>) {
        let f = self.dir.join("reply");
        match line {
            Some(l) => std::fs::write(f, format!("{l}\n")).unwrap(),
            None => {
                let _ = std::fs::remove_file(f);
            }
        }
    }

    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<ReceivedMail> {
        let start = Instant::now();
        loop {
            let m = self.messages();
            if m.len() >= n || start.elapsed() > timeout {
                return m;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A static HTTP server (python's http.server) over a folder, for attachment URLs.
pub struct FileServer {
    child: Child,
    pub port: u16,
}

impl FileServer {
    pub fn start(dir: &Path) -> Self {
        let port = free_port();
        let child = Command::new("python3")
            .args([
                "-m",
                "http.server",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--directory",
            ])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "http.server did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        FileServer { child, port }
    }

    pub fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/{name}", self.port)
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl TestEnv {
    /// A tenant with one SMTP provider (no TLS) pointing at `smtp_port`.
    pub fn smtp_tenant(&self, tenant_id: &str, provider_id: &str, smtp_port: u16, extra: &str) {
        self.write_tenant(
            &format!("{tenant_id}.toml"),
            &format!(
                r#"
id = "{tenant_id}"
name = "tenant {tenant_id}"

[[providers]]
id = "{provider_id}"
name = "SMTP of {tenant_id}"
kind = "smtp"
host = "127.0.0.1"
port = {smtp_port}
tls = "none"
max_connections = 4
{extra}
"#
            ),
        );
    }

    /// Publishes to the default exchange with routing key `queue`, confirmed.
    pub async fn publish(&self, queue: &str, body: &[u8]) {
        let conn = self.amqp().await;
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(Default::default()).await.unwrap();
        ch.basic_publish(
            "".into(),
            queue.into(),
            Default::default(),
            body,
            lapin::BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
        let _ = conn.close(200, "OK".into()).await;
    }

    /// Takes up to `n` messages from `queue`, waiting at most `timeout` for them.
    pub async fn take(&self, queue: &str, n: usize, timeout: Duration) -> Vec<serde_json::Value> {
        let conn = self.amqp().await;
        let ch = conn.create_channel().await.unwrap();
        let mut out = Vec::new();
        let start = Instant::now();
        while out.len() < n && start.elapsed() < timeout {
            match ch
                .basic_get(
                    queue.into(),
                    lapin::options::BasicGetOptions { no_ack: true },
                )
                .await
                .unwrap()
            {
                Some(m) => out.push(serde_json::from_slice(&m.delivery.data).unwrap_or_else(
                    |_| serde_json::Value::String(String::from_utf8_lossy(&m.delivery.data).into()),
                )),
                None => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        let _ = conn.close(200, "OK".into()).await;
        out
    }

    /// Counts the `email.inbound` messages taken by their `message_id` into `seen` until
    /// `done(seen)` or `timeout`, then takes (and counts) what arrives in two more seconds:
    /// a repeat shows as a count above one.
    pub async fn count_inbound(
        &self,
        seen: &mut std::collections::BTreeMap<String, usize>,
        done: impl Fn(&std::collections::BTreeMap<String, usize>) -> bool,
        timeout: Duration,
    ) {
        let start = Instant::now();
        let mut last_round = false;
        loop {
            let wait = if last_round {
                Duration::from_secs(2)
            } else {
                Duration::from_millis(300)
            };
            let limit = if last_round { usize::MAX } else { 1000 };
            for m in self.take("email.inbound", limit, wait).await {
                let id = m["message_id"].as_str().unwrap_or("?").to_string();
                *seen.entry(id).or_default() += 1;
            }
            if last_round {
                return;
            }
            last_round = done(seen) || start.elapsed() >= timeout;
        }
    }

    /// How many messages `queue` holds.
    pub async fn depth(&self, queue: &str) -> u32 {
        let conn = self.amqp().await;
        let ch = conn.create_channel().await.unwrap();
        let depth = queue_depth(&ch, queue).await.unwrap();
        let _ = conn.close(200, "OK".into()).await;
        depth
    }
}

/// The number of ready messages in `queue` (a passive declare on `ch`).
pub async fn queue_depth(ch: &lapin::Channel, queue: &str) -> Result<u32, lapin::Error> {
    ch.queue_declare(
        queue.into(),
        lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        Default::default(),
    )
    .await
    .map(|q| q.message_count())
}

/// The guide's outbound example request, with the given ids and attachment URL.
pub fn guide_request(
    tenant_id: &str,
    provider_id: &str,
    message_id: &str,
    attachment_url: Option<&str>,
) -> serde_json::Value {
    let mut v = serde_json::json!({
        "tenant_id": tenant_id,
        "provider_id": provider_id,
        "user_id": "user-123",
        "message_id": message_id,
        "from": "noreply@company.com",
        "to": ["user@example.com"],
        "cc": ["cc@example.com"],
        "bcc": ["bcc@example.com"],
        "subject": "Test Email",
        "body_format": "HTML",
        "body_content": "<p>Hello World</p>",
        "attachments": [],
        "headers": {"X-Custom-Header": "Custom Value", "X-Priority": "1"},
        "template_id": "template-123",
        "campaign_id": "campaign-456",
        "timestamp": "2025-09-19T10:30:00Z"
    });
    if let Some(url) = attachment_url {
        v["attachments"] = serde_json::json!([
            {"filename": "document.pdf", "url": url, "mime_type": "application/pdf"}
        ]);
    }
    v
}

/// The first column of every row `sql` returns, as text, in the order returned.
pub async fn texts(db: &tokio_postgres::Client, sql: &str) -> Vec<String> {
    db.query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Polls the outbox until `sql` (a COUNT query) returns `n`.
pub async fn wait_count(db: &tokio_postgres::Client, sql: &str, n: i64, timeout: Duration) -> i64 {
    let start = Instant::now();
    loop {
        let c: i64 = db.query_one(sql, &[]).await.map(|r| r.get(0)).unwrap_or(-1);
        if c == n || start.elapsed() > timeout {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A Dovecot (IMAP and POP3, plain text on loopback) of this test's own, on free ports, with
/// maildirs under its folder. Mail processes run as `nobody`.
pub struct Dovecot {
    child: Child,
    pub dir: PathBuf,
    pub imap_port: u16,
    pub pop3_port: u16,
    /// Implicit-TLS ports, when started with a certificate.
    pub imaps_port: u16,
    pub pop3s_port: u16,
}

fn nobody() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f[0] == "nobody" {
            return (f[2].parse().unwrap(), f[3].parse().unwrap());
        }
    }
    panic!("no user nobody");
}

/// Gives `path` and everything under it to `uid`:`gid`. Files Dovecot moves meanwhile (new/
/// to cur/) are skipped: it owns them already.
fn chown_tree(path: &Path, uid: u32, gid: u32) {
    match std::os::unix::fs::chown(path, Some(uid), Some(gid)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => panic!("chown {}: {e}", path.display()),
    }
    if path.is_dir() {
        let Ok(entries) = std::fs::read_dir(path) else {
            return;
        };
        for e in entries.flatten() {
            chown_tree(&e.path(), uid, gid);
        }
    }
}

impl Dovecot {
    pub fn start(dir: &Path, users: &[(&str, &str)]) -> Self {
        Self::start_tls(dir, users, None)
    }

    /// With `cert` (PEM certificate and key paths): STARTTLS on the plain ports and implicit
    /// TLS on `imaps_port` / `pop3s_port`.
    pub fn start_tls(dir: &Path, users: &[(&str, &str)], cert: Option<(&Path, &Path)>) -> Self {
        Self::start_with(dir, users, cert, None, "")
    }

    /// With an oauth2 passdb too: XOAUTH2/OAUTHBEARER tokens are checked by RFC 7662
    /// introspection at `introspection_url` (`{"active": true, "username": …}`).
    pub fn start_oauth2(dir: &Path, users: &[(&str, &str)], introspection_url: &str) -> Self {
        Self::start_with(dir, users, None, Some(introspection_url), "")
    }

    /// For thousands of idle IMAP sessions: idle sessions hibernate (one `imap-hibernate`
    /// process holds them all instead of a process each), and logins share a few processes.
    pub fn start_scaled(dir: &Path, users: &[(&str, &str)]) -> Self {
        Self::start_with(
            dir,
            users,
            None,
            None,
            r#"
imap_hibernate_timeout = 2s
default_client_limit = 30000
default_vsz_limit = 1G
service imap-login {
  service_count = 0
  process_min_avail = 2
  client_limit = 30000
}
service imap-hibernate {
  client_limit = 30000
  unix_listener imap-hibernate {
    mode = 0666
  }
}
service imap {
  unix_listener imap-master {
    mode = 0666
  }
}
"#,
        )
    }

    fn start_with(
        dir: &Path,
        users: &[(&str, &str)],
        cert: Option<(&Path, &Path)>,
        oauth2: Option<&str>,
        extra: &str,
    ) -> Self {
        let _ = std::fs::remove_dir_all(dir);
        for sub in ["run", "state", "mail", "home"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let (uid, gid) = nobody();
        // Dovecot's unprivileged processes must reach the folders.
        let mut p = dir.to_path_buf();
        while let Some(parent) = p.parent() {
            use std::os::unix::fs::PermissionsExt;
            if let Ok(meta) = std::fs::metadata(&p) {
                let mode = meta.permissions().mode();
                if mode & 0o005 != 0o005 && p.starts_with(std::env::temp_dir()) {
                    let _ =
                        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode | 0o005));
                }
            }
            p = parent.to_path_buf();
        }
        chown_tree(&dir.join("mail"), uid, gid);
        chown_tree(&dir.join("home"), uid, gid);
        let users_file: String = users
            .iter()
            .map(|(u, p)| format!("{u}:{{PLAIN}}{p}\n"))
            .collect();
        std::fs::write(dir.join("users"), users_file).unwrap();
        let imap_port = free_port();
        let pop3_port = free_port();
        let (imaps_port, pop3s_port) = match cert {
            Some(_) => (free_port(), free_port()),
            None => (0, 0),
        };
        let ssl = match cert {
            Some((c, k)) => format!(
                "ssl = yes\nssl_cert = <{}\nssl_key = <{}",
                c.display(),
                k.display()
            ),
            None => "ssl = no".into(),
        };
        let d = dir.display();
        let (mechanisms, oauth2_passdb) = match oauth2 {
            Some(url) => {
                std::fs::write(
                    dir.join("oauth2.conf.ext"),
                    format!(
                        "introspection_mode = post\nintrospection_url = {url}\nforce_introspection = yes\nusername_attribute = username\nactive_attribute = active\nactive_value = true\n"
                    ),
                )
                .unwrap();
                (
                    "plain login xoauth2 oauthbearer",
                    format!(
                        "passdb {{\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n  args = {d}/oauth2.conf.ext\n}}\n"
                    ),
                )
            }
            None => ("plain login", String::new()),
        };
        let conf = format!(
            r#"
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
protocols = imap pop3
listen = 127.0.0.1
{ssl}
disable_plaintext_auth = no
auth_mechanisms = {mechanisms}
mail_location = maildir:{d}/mail/%u
first_valid_uid = 1
default_internal_user = dovecot
default_login_user = dovenull
pop3_uidl_format = %08Xu%08Xv
# Hundreds of idle IMAP sessions in the scale and cluster tests: a process each.
default_process_limit = 1000
default_client_limit = 4000
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {d}/users
}}
{oauth2_passdb}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={d}/home/%u
}}
service imap-login {{
  inet_listener imap {{
    port = {imap_port}
  }}
  inet_listener imaps {{
    port = {imaps_port}
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    port = {pop3_port}
  }}
  inet_listener pop3s {{
    port = {pop3s_port}
  }}
}}
service stats {{
  unix_listener stats-reader {{
    mode = 0666
  }}
  unix_listener stats-writer {{
    mode = 0666
  }}
}}
{extra}
"#
        );
        std::fs::write(dir.join("dovecot.conf"), conf).unwrap();
        let child = Self::launch(dir, &[imap_port, pop3_port]);
        Dovecot {
            child,
            dir: dir.to_path_buf(),
            imap_port,
            pop3_port,
            imaps_port,
            pop3s_port,
        }
    }

    /// Runs `dovecot -F` on the folder's config; returns once all `ports` accept.
    fn launch(dir: &Path, ports: &[u16]) -> Child {
        let child = Command::new("dovecot")
            .arg("-c")
            .arg(dir.join("dovecot.conf"))
            .arg("-F")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect(
                "dovecot is installed (scripts/test.sh installs dovecot-imapd and dovecot-pop3d)",
            );
        let start = Instant::now();
        while ports
            .iter()
            .any(|p| std::net::TcpStream::connect(("127.0.0.1", *p)).is_err())
        {
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "dovecot did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        child
    }

    /// Stops Dovecot (SIGTERM, SIGKILL after 5 s): connections are cut, the ports refuse.
    pub fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        signal(self.child.id(), "TERM");
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts Dovecot again (stopping it first if it runs): same config, ports and maildirs;
    /// returns once every port accepts.
    pub fn restart(&mut self) {
        self.stop();
        let ports: Vec<u16> = [
            self.imap_port,
            self.pop3_port,
            self.imaps_port,
            self.pop3s_port,
        ]
        .into_iter()
        .filter(|p| *p != 0)
        .collect();
        self.child = Self::launch(&self.dir, &ports);
    }

    /// Runs IMAP commands as `user` with python's imaplib (a client independent of ours).
    /// `script` is Python with `m` the logged-in IMAP4 connection.
    pub fn imap(&self, user: &str, password: &str, script: &str) {
        let code = format!(
            "import imaplib, sys\nm = imaplib.IMAP4('127.0.0.1', {})\nm.login({user:?}, {password:?})\n{script}\nm.logout()\n",
            self.imap_port
        );
        let out = Command::new("python3")
            .arg("-c")
            .arg(code)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "imap script failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// APPENDs a message to `folder` over IMAP.
    pub fn append(&self, user: &str, password: &str, folder: &str, raw: &[u8]) {
        let file = self.dir.join(format!("{}.eml", unique("append")));
        std::fs::write(&file, raw).unwrap();
        self.imap(
            user,
            password,
            &format!(
                "typ, data = m.append({folder:?}, None, None, open({:?}, 'rb').read())\nassert typ == 'OK', data",
                file.display().to_string()
            ),
        );
    }

    /// Writes messages straight into a maildir folder (fast, for big mailboxes).
    pub fn deliver_files(&self, user: &str, messages: impl Iterator<Item = Vec<u8>>) {
        let (uid, gid) = nobody();
        let base = self.dir.join("mail").join(user);
        for sub in ["new", "cur", "tmp"] {
            std::fs::create_dir_all(base.join(sub)).unwrap();
        }
        // Unique across calls, so a later delivery never replaces an earlier file.
        static DELIVERED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        for (i, raw) in messages.enumerate() {
            let seq = DELIVERED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // Named as Dovecot's own delivery names them: `S=` the size, `W=` the size with
            // CRLF line ends (RFC822.SIZE), so listing sizes does not read every message.
            let bare_lf = raw
                .iter()
                .enumerate()
                .filter(|(j, b)| **b == b'\n' && (*j == 0 || raw[j - 1] != b'\r'))
                .count();
            let path = base.join("new").join(format!(
                "{}.M{seq}P{}.mbtest,S={},W={}",
                1_700_000_000 + i,
                std::process::id(),
                raw.len(),
                raw.len() + bare_lf
            ));
            // Written in tmp/ and moved into new/ whole, as a delivery agent does: Dovecot
            // never sees half a message.
            let tmp = base.join("tmp").join(path.file_name().unwrap());
            std::fs::write(&tmp, raw).unwrap();
            std::os::unix::fs::chown(&tmp, Some(uid), Some(gid)).unwrap();
            std::fs::rename(&tmp, &path).unwrap();
        }
        for dir in [
            self.dir.join("mail"),
            base.clone(),
            base.join("new"),
            base.join("cur"),
            base.join("tmp"),
        ] {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).unwrap();
        }
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        self.stop();
    }
}

impl TestEnv {
    /// A tenant with a file provider and one mailbox (`mb-<user>`, user id `user-<user>`) on
    /// Dovecot; `extra` adds mailbox keys.
    pub fn mailbox_tenant(
        &self,
        tenant: &str,
        protocol: &str,
        port: u16,
        user: &str,
        password: &str,
        extra: &str,
    ) {
        let mailbox_id = format!("mb-{user}");
        self.write_tenant(
            &format!("{tenant}.toml"),
            &format!(
                r#"
id = "{tenant}"
[[providers]]
id = "{tenant}-provider"
name = "Files of {tenant}"
kind = "file"
dir = "sent-{tenant}"

[[mailboxes]]
id = "{mailbox_id}"
user_id = "user-{user}"
provider_id = "{tenant}-provider"
protocol = "{protocol}"
host = "127.0.0.1"
port = {port}
tls = "none"
username = "{user}"
password = "{password}"
{extra}
"#
            ),
        );
    }
}

/// A self-signed CA and a certificate for `localhost` / 127.0.0.1 signed by it, made with
/// openssl in `dir`: (ca.pem, server.pem, server.key).
pub fn make_certs(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    std::fs::create_dir_all(dir).unwrap();
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=Test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-out",
        "server.pem",
        "-extfile",
        "ext.cnf",
    ]);
    (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    )
}
