//! A private RabbitMQ node for one test, beside the shared system node: a test may stop, kill
//! or restart it, and connect over TLS, without disturbing `rabbit@<host>` or other tests.
//!
//! Each node has a unique name (`mbtest-rabbit_<pid>_<n>@localhost`), its own folder (mnesia,
//! logs, config, TLS files), free ports for AMQP, AMQPS and Erlang distribution, no plugins,
//! and a TLS listener with a certificate for `localhost`/127.0.0.1 signed by a test CA
//! ([`super::make_certs`]). guest/guest may log in (`loopback_users = none`; the listeners
//! only bind 127.0.0.1 anyway).
//!
//! **Cookie and user.** `rabbitmqctl` run as root is Debian's wrapper, which switches to the
//! `rabbitmq` user and so uses `/var/lib/rabbitmq/.erlang.cookie`. As root the node therefore
//! runs as `rabbitmq` (HOME its home): it shares the system node's cookie, so
//! `rabbitmqctl -n <name>` reaches it. Not as root, it runs as the current user with
//! `$HOME/.erlang.cookie`. No cookie file is written, and nothing is exported into this
//! process's environment, so `rabbitmqctl` without `-n` still talks to the system node.
//!
//! **Start time** (measured on the 2-core machine): `start` 4.6–5.8 s when little else runs,
//! 7–16 s beside other tests and builds (load 4–5), including ~0.3 s for the certificates;
//! `start_again` 3.5–8 s; most of it is RabbitMQ's own boot. `stop` ~1.1 s, `kill` ~20 ms.
//! Boot gives up after 90 s.
//!
//! **Clusters.** Nodes are started independently; joining three into a cluster later needs
//! only what is public here: `name`, the ports, `dir` and [`RabbitNode::ctl`]
//! (`stop_app`, `join_cluster <other name>`, `start_app`). All nodes share one cookie (above).

use super::sys::{self, OsUser};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long a node may take to boot before the helper gives up.
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

/// A private RabbitMQ node; see the module docs. Killed and deleted on drop.
pub struct RabbitNode {
    /// Erlang node name, e.g. `mbtest-rabbit_1234_0@localhost`.
    pub name: String,
    /// The node's folder: `mnesia/`, `log/`, `tls/`, `rabbitmq.conf`, `stdout.log`.
    pub dir: PathBuf,
    pub amqp_port: u16,
    pub amqps_port: u16,
    /// Erlang distribution port (what `rabbitmqctl` and cluster peers connect to).
    pub dist_port: u16,
    /// The CA that signed the node's TLS certificate (PEM).
    pub ca: PathBuf,
    /// Extra `rabbitmq.conf` lines given at creation.
    extra_conf: String,
    owner: Option<OsUser>,
    /// The node's `beam.smp` process (the start script `exec`s into it).
    child: Option<Child>,
}

impl RabbitNode {
    /// A new node in `dir` (emptied first), with a fresh test CA and certificate in
    /// `dir/certs`.
    pub fn start(dir: &Path) -> RabbitNode {
        let _ = std::fs::remove_dir_all(dir);
        let (ca, cert, key) = super::make_certs(&dir.join("certs"));
        Self::start_with(dir, (&ca, &cert, &key), "")
    }

    /// A new node in `dir` with the given TLS files (CA, certificate, key; PEM) — e.g. one
    /// CA for several nodes — and `extra_conf` appended to its `rabbitmq.conf`.
    pub fn start_with(dir: &Path, tls: (&Path, &Path, &Path), extra_conf: &str) -> RabbitNode {
        for sub in ["mnesia", "log", "tls"] {
            let _ = std::fs::remove_dir_all(dir.join(sub));
            std::fs::create_dir_all(dir.join(sub))
                .unwrap_or_else(|e| panic!("create {}/{sub}: {e}", dir.display()));
        }
        let (ca, cert, key) = tls;
        for (from, to) in [(ca, "ca.pem"), (cert, "server.pem"), (key, "server.key")] {
            std::fs::copy(from, dir.join("tls").join(to))
                .unwrap_or_else(|e| panic!("copy {} into the node folder: {e}", from.display()));
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            dir.join("tls/server.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .expect("chmod 600 the node's TLS key");
        std::fs::write(dir.join("enabled_plugins"), "[].\n").expect("write enabled_plugins");
        // Replaces /etc/rabbitmq/rabbitmq-env.conf (which names the system node).
        std::fs::write(dir.join("rabbitmq-env.conf"), "").expect("write rabbitmq-env.conf");
        let owner = if sys::is_root() {
            Some(sys::os_user("rabbitmq").expect(
                "running as root, the node runs as the OS user rabbitmq (whose cookie rabbitmqctl uses), which is missing",
            ))
        } else {
            None
        };
        let mut node = RabbitNode {
            name: format!("mbtest-{}@localhost", super::unique("rabbit")),
            dir: dir.to_path_buf(),
            amqp_port: 0,
            amqps_port: 0,
            dist_port: 0,
            ca: dir.join("tls/ca.pem"),
            extra_conf: extra_conf.to_string(),
            owner,
            child: None,
        };
        sys::open_parents(dir);
        // A free port may be taken by another test before the node binds it: try others.
        let mut last = String::new();
        for _ in 0..3 {
            node.amqp_port = sys::free_port_for_erlang();
            node.amqps_port = sys::free_port_for_erlang();
            node.dist_port = sys::free_port_for_erlang();
            node.write_conf();
            sys::chown_to(dir, node.owner.as_ref());
            match node.boot() {
                Ok(()) => return node,
                Err(e) => {
                    node.kill();
                    last = e;
                    if !last.contains("eaddrinuse") && !last.contains("already in use") {
                        break;
                    }
                }
            }
        }
        panic!("the RabbitMQ node {} did not start: {last}", node.name);
    }

    fn write_conf(&self) {
        let d = self.dir.display();
        let conf = format!(
            "listeners.tcp.default = 127.0.0.1:{amqp}\n\
             listeners.ssl.default = 127.0.0.1:{amqps}\n\
             ssl_options.cacertfile = {d}/tls/ca.pem\n\
             ssl_options.certfile = {d}/tls/server.pem\n\
             ssl_options.keyfile = {d}/tls/server.key\n\
             ssl_options.verify = verify_none\n\
             ssl_options.fail_if_no_peer_cert = false\n\
             loopback_users = none\n\
             log.file.level = info\n\
             {extra}\n",
            amqp = self.amqp_port,
            amqps = self.amqps_port,
            extra = self.extra_conf,
        );
        std::fs::write(self.dir.join("rabbitmq.conf"), conf).expect("write rabbitmq.conf");
    }

    /// Spawns the node and waits until it has booted and both listeners accept.
    fn boot(&mut self) -> Result<(), String> {
        let started = Instant::now();
        let booted_before = self.log_text().matches("Server startup complete").count();
        let script = if Path::new("/usr/lib/rabbitmq/bin/rabbitmq-server").exists() {
            // Debian's /usr/sbin/rabbitmq-server would `su` to rabbitmq, hiding the VM's pid.
            PathBuf::from("/usr/lib/rabbitmq/bin/rabbitmq-server")
        } else {
            PathBuf::from("rabbitmq-server")
        };
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("stdout.log"))
            .expect("open the node's stdout.log");
        let err = out.try_clone().expect("clone the stdout.log handle");
        let mut cmd = Command::new(script);
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if k.starts_with("RABBITMQ_") || k.starts_with("ERL_") || k == "NOTIFY_SOCKET" {
                cmd.env_remove(&key);
            }
        }
        let d = &self.dir;
        cmd.current_dir(d)
            .env("RABBITMQ_NODENAME", &self.name)
            .env("RABBITMQ_CONF_ENV_FILE", d.join("rabbitmq-env.conf"))
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", d.join("advanced.config"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_PID_FILE", d.join("node.pid"))
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            // With input allowed the start script `exec`s the VM (else it forks and waits),
            // so our child *is* beam.smp and kill() hits the VM itself; -noinput still keeps
            // the Erlang shell off stdin.
            .env("RABBITMQ_ALLOW_INPUT", "1")
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-noinput -kernel inet_dist_use_interface {127,0,0,1}",
            )
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        sys::run_as(&mut cmd, self.owner.as_ref());
        let child = cmd
            .spawn()
            .map_err(|e| format!("spawn rabbitmq-server: {e}"))?;
        sys::kill_when_we_die(child.id(), "KILL");
        self.child = Some(child);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!(
                    "the node exited ({status}) while booting:\n{}\n{}",
                    tail(&self.stdout_text(), 30),
                    tail(&self.log_text(), 30)
                ));
            }
            let booted = self.log_text().matches("Server startup complete").count() > booted_before;
            if booted
                && std::net::TcpStream::connect(("127.0.0.1", self.amqp_port)).is_ok()
                && std::net::TcpStream::connect(("127.0.0.1", self.amqps_port)).is_ok()
            {
                return Ok(());
            }
            if started.elapsed() > BOOT_TIMEOUT {
                return Err(format!(
                    "not booted within {BOOT_TIMEOUT:?}:\n{}\n{}",
                    tail(&self.stdout_text(), 30),
                    tail(&self.log_text(), 30)
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn amqp_port(&self) -> u16 {
        self.amqp_port
    }

    pub fn amqps_port(&self) -> u16 {
        self.amqps_port
    }

    /// `amqp://guest:guest@127.0.0.1:<amqp_port>/<vhost>` (vhost percent-encoded).
    pub fn amqp_url(&self, vhost: &str) -> String {
        format!(
            "amqp://guest:guest@127.0.0.1:{}/{}",
            self.amqp_port,
            encode_vhost(vhost)
        )
    }

    /// `amqps://guest:guest@localhost:<amqps_port>/<vhost>`: the certificate is for
    /// `localhost` and 127.0.0.1; a client must trust [`RabbitNode::ca_pem`].
    pub fn amqps_url(&self, vhost: &str) -> String {
        format!(
            "amqps://guest:guest@localhost:{}/{}",
            self.amqps_port,
            encode_vhost(vhost)
        )
    }

    /// The test CA's certificate (PEM), for a client's trust store.
    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(&self.ca).expect("read the node's CA certificate")
    }

    /// `rabbitmqctl -n <node> args...`; panics (with its output) when it fails.
    pub fn ctl(&self, args: &[&str]) -> Output {
        let out = self.try_ctl(args);
        assert!(
            out.status.success(),
            "rabbitmqctl -n {} {args:?} failed: {}{}",
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// `rabbitmqctl -n <node> args...`, whatever its outcome.
    pub fn try_ctl(&self, args: &[&str]) -> Output {
        Command::new("rabbitmqctl")
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("rabbitmqctl must be installed (scripts/test.sh installs it)")
    }

    /// The OS pid of the node's VM while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Whether the VM process is alive.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Stops the node gracefully and waits (SIGKILL after 60 s). SIGTERM makes the VM shut
    /// RabbitMQ down in order, which sends clients `connection.close` 320 CONNECTION_FORCED
    /// "broker forced connection closure with reason 'shutdown'" — but closes the sockets
    /// right after, so a client may see only a reset (lapin 4 did in the self-test; pika
    /// read the 320). About 1 s.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        sys::send_signal(child.id(), "TERM");
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "the RabbitMQ node {} did not stop within 60 s of SIGTERM",
            self.name
        );
    }

    /// SIGKILLs the node's VM (a crash: clients see their TCP connections reset or closed
    /// without an AMQP close) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the stopped or killed node again: same name, ports, data and config.
    pub fn start_again(&mut self) {
        assert!(
            self.child.is_none(),
            "start_again: the node {} runs",
            self.name
        );
        if let Err(e) = self.boot() {
            self.kill();
            panic!("the RabbitMQ node {} did not start again: {e}", self.name);
        }
    }

    /// The node's main log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.join("log").join(format!("{}.log", self.name)))
            .unwrap_or_default()
    }

    /// What the VM wrote to stdout/stderr (start-up errors land here).
    pub fn stdout_text(&self) -> String {
        std::fs::read_to_string(self.dir.join("stdout.log")).unwrap_or_default()
    }
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A vhost as it stands in an AMQP URI path (`/` is `%2f`).
pub fn encode_vhost(vhost: &str) -> String {
    let mut s = String::new();
    for b in vhost.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02x}"));
        }
    }
    s
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
