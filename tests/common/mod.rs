//! Helpers for the integration tests: each test gets its own RabbitMQ vhost, its own
//! PostgreSQL database and its own HTTP port, so tests run in parallel against the one local
//! broker and database without seeing each other. The service runs as the real binary.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

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

pub fn free_port() -> u16 {
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
    pub db_name: String,
    pub http_port: u16,
}

impl TestEnv {
    pub fn new(tag: &str) -> Self {
        let name = unique(tag);
        let vhost = format!("mbtest-{name}");
        rabbitmqctl(&["add_vhost", &vhost]);
        rabbitmqctl(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"]);
        let dir = std::env::temp_dir().join(format!("mbtest-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("tenants.d")).unwrap();
        let env = TestEnv {
            dir,
            vhost,
            db_name: format!("mb_test_{name}").to_lowercase(),
            http_port: free_port(),
        };
        env.write_config("");
        env
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("mailbridge.toml")
    }

    pub fn db_url(&self) -> String {
        format!("{}/{}", pg_server_url(), self.db_name)
    }

    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:5672/{}", self.vhost)
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// Writes the main config for this env, with `extra` TOML appended.
    pub fn write_config(&self, extra: &str) {
        let text = format!(
            r#"
[rabbitmq]
host = "127.0.0.1"
vhost = "{vhost}"
reconnect_max_delay = "2s"
heartbeat = "5s"

[database]
url = "{db}"
max_connections = 4

[http]
listen = "127.0.0.1:{port}"

[shutdown]
grace = "5s"
{extra}
"#,
            vhost = self.vhost,
            db = self.db_url(),
            port = self.http_port,
        );
        std::fs::write(self.config_path(), text).unwrap();
    }

    pub fn write_tenant(&self, file: &str, text: &str) {
        std::fs::write(self.dir.join("tenants.d").join(file), text).unwrap();
    }

    /// Runs a one-shot command of the binary (`migrate`, `check-config`).
    pub fn command(&self, args: &[&str]) -> Output {
        Command::new(BIN)
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
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_vhost", &self.vhost])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("psql")
            .arg(format!("{}/postgres", pg_server_url()))
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
        let log = env.dir.join(format!("{}.log", unique("service")));
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.arg("--config")
            .arg(env.config_path())
            .arg("run")
            .env_remove("DATABASE_URL")
            .env_remove("RABBITMQ_URL")
            .env_remove("HTTP_LISTEN")
            .env("RUST_LOG", "info")
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
