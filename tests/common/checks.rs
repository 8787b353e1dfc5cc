//! Exact checks for the promise tests: what the broker holds (ready *and* unacknowledged),
//! what the SMTP server received (by Message-ID), the outbox as a map, the sockets a process
//! keeps open, and a tiny HTTP server on a non-loopback address (for redirects from a
//! "public" host to an internal one).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{rabbitmqctl, SmtpServer, TestEnv};

/// `(messages_ready, messages_unacknowledged)` of `queue` on `vhost`, as the broker counts them
/// now (`rabbitmqctl list_queues`, which asks the queue process itself); None when the queue
/// does not exist.
pub fn queue_counts(vhost: &str, queue: &str) -> Option<(u64, u64)> {
    let out = rabbitmqctl(&[
        "list_queues",
        "-p",
        vhost,
        "--no-table-headers",
        "--silent",
        "name",
        "messages_ready",
        "messages_unacknowledged",
    ]);
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() == 3 && f[0] == queue).then(|| (f[1].parse().unwrap(), f[2].parse().unwrap()))
    })
}

/// Waits until `queue` holds no ready and no unacknowledged message — every message published
/// to it (and confirmed) has been acknowledged by its consumer — and returns how long that
/// took. Panics after `timeout` with the last counts.
pub async fn wait_queue_settled(vhost: &str, queue: &str, timeout: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let counts = queue_counts(vhost, queue);
        if counts == Some((0, 0)) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "{queue} did not settle within {timeout:?}: (ready, unacked) = {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every message on `queue` (a queue nothing consumes, e.g. the result queue or a DLQ),
/// taken off it: as many as the broker says are ready, no waiting for absent ones.
pub async fn take_all(env: &TestEnv, queue: &str) -> Vec<serde_json::Value> {
    let n = env.depth(queue).await as usize;
    let got = env.take(queue, n, Duration::from_secs(10)).await;
    assert_eq!(got.len(), n, "{queue} held {n} messages");
    got
}

/// The Message-IDs (without brackets) of every email the server stored, in arrival order.
pub fn message_ids(smtp: &SmtpServer) -> Vec<String> {
    smtp.messages()
        .iter()
        .map(|m| {
            m.parsed()
                .message_id()
                .unwrap_or_else(|| panic!("an email without Message-ID:\n{}", m.text()))
                .to_string()
        })
        .collect()
}

/// How many times each item occurs.
pub fn tally<T: Ord>(items: impl IntoIterator<Item = T>) -> BTreeMap<T, usize> {
    let mut m = BTreeMap::new();
    for i in items {
        *m.entry(i).or_insert(0) += 1;
    }
    m
}

/// The request `message_id` a Message-ID was made from (`<id>.<8 hex>@domain`).
pub fn request_id_of(rfc_message_id: &str) -> String {
    let local = rfc_message_id.split('@').next().unwrap_or("");
    match local.rsplit_once('.') {
        Some((id, hex)) if hex.len() == 8 => id.to_string(),
        _ => local.to_string(),
    }
}

/// Polls `/health` until `check` holds for its JSON (whatever the HTTP code); returns it.
pub async fn wait_health_json(
    svc: &super::Service,
    timeout: Duration,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let start = Instant::now();
    loop {
        if let Some((_, text)) = svc.get("/health").await {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                if check(&v) {
                    return v;
                }
                if start.elapsed() > timeout {
                    panic!(
                        "/health never showed {what} within {timeout:?}; last: {v}\n--- log ---\n{}",
                        svc.log_text()
                    );
                }
            }
        }
        assert!(
            start.elapsed() <= timeout,
            "/health did not answer within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls the service log until it contains `needle`.
pub async fn wait_log(svc: &super::Service, needle: &str, timeout: Duration) {
    let start = Instant::now();
    while !svc.log_text().contains(needle) {
        assert!(
            start.elapsed() < timeout,
            "the log never said {needle:?} within {timeout:?}:\n{}",
            svc.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The local ports of the established TCP connections from this machine to
/// 127.0.0.1:`port` (the client side of each: `/proc/net/tcp`, remote port = `port`).
pub fn client_ports_to(port: u16) -> Vec<u16> {
    let text = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let mut out: Vec<u16> = text
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (local, remote, state) = (f.get(1)?, f.get(2)?, f.get(3)?);
            let rport = u16::from_str_radix(remote.split(':').nth(1)?, 16).ok()?;
            let lport = u16::from_str_radix(local.split(':').nth(1)?, 16).ok()?;
            (rport == port && *state == "01").then_some(lport)
        })
        .collect();
    out.sort();
    out
}

/// An address of this machine that the service does not count as internal (not loopback,
/// private, link-local, …), if it has one: the host for a "public" attachment server.
pub fn public_ipv4() -> Option<IpAddr> {
    let out = Command::new("hostname").arg("-I").output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|a| a.parse::<IpAddr>().ok())
        .filter(|ip| ip.is_ipv4() && !mailbridge::fetch::is_internal(*ip))
        .find(|ip| TcpListener::bind((*ip, 0)).is_ok())
}

/// This machine's host name, checked to resolve to internal addresses only (loopback here).
pub fn internal_host_name() -> String {
    let out = Command::new("hostname").output().expect("run hostname");
    let name = String::from_utf8_lossy(&out.stdout).trim().to_string();
    use std::net::ToSocketAddrs;
    let addrs: Vec<SocketAddr> = (name.as_str(), 80)
        .to_socket_addrs()
        .unwrap_or_else(|e| panic!("the host name {name:?} does not resolve: {e}"))
        .collect();
    assert!(
        !addrs.is_empty() && addrs.iter().all(|a| mailbridge::fetch::is_internal(a.ip())),
        "the test needs a host name that resolves to internal addresses only; {name:?} resolves to {addrs:?}"
    );
    name
}

/// What [`TinyHttp`] answers on one path.
#[derive(Clone, Debug)]
pub enum Answer {
    /// 302 with this Location.
    Redirect(String),
    /// 200 with this body.
    Body(Vec<u8>),
}

/// A minimal HTTP/1.1 server on a given address (one thread, one request per connection):
/// each known path gets its [`Answer`], anything else 404. Logs every request line.
pub struct TinyHttp {
    pub addr: SocketAddr,
    pub requests: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl TinyHttp {
    pub fn start(ip: IpAddr, routes: Vec<(&str, Answer)>) -> TinyHttp {
        let listener = TcpListener::bind((ip, 0)).expect("bind the tiny HTTP server");
        let addr = listener.local_addr().unwrap();
        let routes: Vec<(String, Answer)> = routes
            .into_iter()
            .map(|(p, a)| (p.to_string(), a))
            .collect();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (log, halt) = (requests.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if halt.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut first = String::new();
                let _ = reader.read_line(&mut first);
                loop {
                    let mut h = String::new();
                    match reader.read_line(&mut h) {
                        Ok(n) if n > 2 => continue,
                        _ => break,
                    }
                }
                log.lock().unwrap().push(first.trim().to_string());
                let path = first.split_whitespace().nth(1).unwrap_or("").to_string();
                let answer = routes.iter().find(|(p, _)| *p == path).map(|(_, a)| a);
                let head = |status: &str, extra: &str, len: usize| {
                    format!("HTTP/1.1 {status}\r\n{extra}Content-Length: {len}\r\nConnection: close\r\n\r\n")
                };
                let _ = match answer {
                    Some(Answer::Redirect(to)) => conn
                        .write_all(head("302 Found", &format!("Location: {to}\r\n"), 0).as_bytes()),
                    Some(Answer::Body(b)) => conn
                        .write_all(
                            head(
                                "200 OK",
                                "Content-Type: application/octet-stream\r\n",
                                b.len(),
                            )
                            .as_bytes(),
                        )
                        .and_then(|_| conn.write_all(b)),
                    None => conn.write_all(head("404 Not Found", "", 0).as_bytes()),
                };
                let _ = conn.flush();
            }
        });
        TinyHttp {
            addr,
            requests,
            stop,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for TinyHttp {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}

/// Sends an admin request (`GET` when `body` is None, else `POST` with that JSON) with an
/// optional bearer token; the status code and the JSON answer (Null when not JSON).
pub async fn admin(
    svc: &super::Service,
    path: &str,
    token: Option<&str>,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let client = reqwest::Client::new();
    let url = format!("{}{path}", svc.base_url);
    let mut req = match &body {
        Some(b) => client.post(&url).json(b),
        None => client.get(&url),
    };
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.expect("the service answers HTTP");
    let code = r.status().as_u16();
    let text = r.text().await.unwrap_or_default();
    (
        code,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
    )
}

/// The outbox as `message_id → (status, attempts)`.
pub async fn outbox_rows(db: &tokio_postgres::Client) -> BTreeMap<String, (String, i32)> {
    db.query("SELECT message_id, status, attempts FROM outbox", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect()
}

/// Replaces a config file so that the service's file watcher cannot notice (it compares
/// names, lengths and modification times): same length, same modification time, written
/// beside it and renamed over it. Only an explicit reload (SIGHUP, HTTP) picks it up.
pub fn replace_unnoticed(path: &Path, text: &str) {
    let old = std::fs::metadata(path).unwrap();
    assert_eq!(old.len() as usize, text.len(), "the same length");
    let tmp = path.with_extension("swap");
    std::fs::write(&tmp, text).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&tmp)
        .unwrap()
        .set_modified(old.modified().unwrap())
        .unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The reloads the service logged: `(source, diff)` of each "configuration reloaded" line.
pub fn reload_diffs(log: &str) -> Vec<(String, serde_json::Value)> {
    log.lines()
        .filter(|l| l.contains("configuration reloaded"))
        .filter_map(|l| {
            let source = l.split("source=").nth(1)?.split_whitespace().next()?;
            let diff = serde_json::from_str(l.split(" diff=").nth(1)?).ok()?;
            Some((source.to_string(), diff))
        })
        .collect()
}

/// The union of several reload diffs, key by key (sorted, without repeats).
pub fn merged_diff(diffs: &[(String, serde_json::Value)]) -> BTreeMap<String, Vec<String>> {
    let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (_, d) in diffs {
        for (k, v) in d.as_object().into_iter().flatten() {
            let e = m.entry(k.clone()).or_default();
            e.extend(
                v.as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|x| x.as_str().map(str::to_string)),
            );
            e.sort();
            e.dedup();
        }
    }
    m
}
