//! Self-test of the fault-injection test infrastructure in `tests/common` and
//! `tests/support`: each helper is driven by a client of our own (tokio-postgres, psql, lapin,
//! raw TCP, reqwest), and the fault it produces is checked as that client sees it. Start-up
//! times are printed (`cargo test --test infra_selftest -- --nocapture`).

mod common;

use std::time::{Duration, Instant};

use common::broker_faults::{
    close_channels_of_vhost, close_connections_of_vhost, INJECTED_DELIVERY_TAG,
};
use common::http_server::HttpServer;
use common::pg_cluster::PgCluster;
use common::rabbit_node::RabbitNode;
use common::{make_certs, unique, Dovecot, SmtpServer, TestEnv};
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueDeclareOptions};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

fn test_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("mbtest-{}", unique(tag)));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the test folder");
    dir
}

/// Runs a blocking helper (a server start or stop) without stalling the runtime's other
/// tasks (lapin's I/O), and prints how long it took.
fn blocking<T>(what: &str, f: impl FnOnce() -> T) -> (T, Duration) {
    let start = Instant::now();
    let v = tokio::task::block_in_place(f);
    let took = start.elapsed();
    eprintln!("[timing] {what}: {took:.2?}");
    (v, took)
}

async fn pg_connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

// ---------------------------------------------------------------- PostgreSQL

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_cluster_starts_stops_restarts_and_keeps_its_data() {
    let dir = test_dir("pg");
    let (pg, took) = blocking("PgCluster::start", || {
        PgCluster::start(&dir.join("pg"), None)
    });
    assert!(took < Duration::from_secs(10), "start took {took:?}");
    assert!(pg.is_running());
    assert_ne!(pg.port(), 5432);

    let admin = pg_connect(&pg.url("postgres"))
        .await
        .expect("connect to the private cluster as postgres");
    admin
        .batch_execute("CREATE DATABASE selftest")
        .await
        .expect("the role can CREATE DATABASE");
    let db = pg_connect(&pg.url("selftest"))
        .await
        .expect("connect to the new database");
    db.batch_execute("CREATE TABLE t (v int); INSERT INTO t VALUES (42)")
        .await
        .expect("write to the new database");

    let (_, took) = blocking("PgCluster::stop_fast", || pg.stop_fast());
    assert!(took < Duration::from_secs(10));
    assert!(!pg.is_running());
    assert!(
        db.query_one("SELECT 1", &[]).await.is_err(),
        "a session survived stop_fast"
    );
    assert!(pg_connect(&pg.url("selftest")).await.is_err());

    blocking("PgCluster::start_again", || pg.start_again());
    let db = pg_connect(&pg.url("selftest"))
        .await
        .expect("connect after start_again");
    let v: i32 = db
        .query_one("SELECT v FROM t", &[])
        .await
        .expect("the table survived the restart")
        .get(0);
    assert_eq!(v, 42);

    blocking("PgCluster::restart_fast", || pg.restart_fast());
    assert!(db.query_one("SELECT 1", &[]).await.is_err());
    let db = pg_connect(&pg.url("selftest"))
        .await
        .expect("connect after restart_fast");
    db.query_one("SELECT v FROM t", &[])
        .await
        .expect("query after restart_fast");

    // The shared system PostgreSQL was not touched.
    let system = pg_connect(&format!("{}/postgres", common::pg_server_url()))
        .await
        .expect("the system PostgreSQL still answers");
    system
        .query_one("SELECT 1", &[])
        .await
        .expect("system query");

    let data = pg.dir.clone();
    drop(db);
    drop(pg);
    assert!(!data.exists(), "drop removes the cluster's folder");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_clusters_in_parallel_do_not_meet() {
    let dir = test_dir("pgpar");
    let (pair, _) = blocking("2 × PgCluster::start in parallel", || {
        let a = std::thread::spawn({
            let d = dir.join("a");
            move || PgCluster::start(&d, None)
        });
        let b = PgCluster::start(&dir.join("b"), None);
        (a.join().expect("cluster a started"), b)
    });
    let (a, b) = pair;
    assert_ne!(a.port, b.port);
    let ca = pg_connect(&a.url("postgres")).await.expect("connect a");
    let cb = pg_connect(&b.url("postgres")).await.expect("connect b");
    ca.batch_execute("CREATE DATABASE only_in_a")
        .await
        .expect("create in a");
    let n: i64 = cb
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname = 'only_in_a'",
            &[],
        )
        .await
        .expect("count in b")
        .get(0);
    assert_eq!(n, 0, "cluster b sees a's database");
    drop(ca);
    drop(cb);
    blocking("PgCluster::stop_fast (a) and drop", || {
        a.stop_fast();
        assert!(!a.is_running());
        drop(a);
    });
    cb_still_works(&b).await;
    drop(b);
    let _ = std::fs::remove_dir_all(dir);
}

async fn cb_still_works(b: &PgCluster) {
    let c = pg_connect(&b.url("postgres"))
        .await
        .expect("b still runs after a stopped");
    c.query_one("SELECT 1", &[]).await.expect("query b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_cluster_tls_only_refuses_plain_clients() {
    let dir = test_dir("pgtls");
    let (ca, cert, key) = make_certs(&dir.join("certs"));
    let (pg, _) = blocking("PgCluster::start_tls_only", || {
        PgCluster::start_tls_only(&dir.join("pg"), &cert, &key)
    });

    let plain = pg_connect(&pg.url("postgres")).await;
    let Err(err) = plain else {
        panic!("a plain client must be refused")
    };
    let text = format!("{err:?}");
    assert!(
        text.contains("no encryption") || text.contains("pg_hba"),
        "refused for another reason: {text}"
    );

    let verified = format!(
        "host=localhost hostaddr=127.0.0.1 port={} user=postgres dbname=postgres sslmode=verify-full sslrootcert={}",
        pg.port,
        ca.display()
    );
    let ssl = PgCluster::psql(
        &verified,
        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
    )
    .expect("psql with sslmode=verify-full and the test CA connects");
    assert_eq!(ssl, "t", "the session is not TLS");
    let disabled = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=disable",
        pg.port
    );
    let err = PgCluster::psql(&disabled, "SELECT 1").expect_err("sslmode=disable is refused");
    assert!(err.contains("no encryption"), "{err}");

    // TLS offered but not required: both kinds of clients get in.
    let (both, _) = blocking("PgCluster::start with TLS", || {
        PgCluster::start(&dir.join("pg2"), Some((&cert, &key)))
    });
    let c = pg_connect(&both.url("postgres"))
        .await
        .expect("a plain client may connect when TLS is not required");
    let ssl: bool = c
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl")
        .get(0);
    assert!(!ssl);
    let verified2 = verified.replace(&format!("port={}", pg.port), &format!("port={}", both.port));
    assert_eq!(
        PgCluster::psql(
            &verified2,
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        )
        .expect("TLS client on the TLS-optional cluster"),
        "t"
    );
    drop(c);
    drop(pg);
    drop(both);
    let _ = std::fs::remove_dir_all(dir);
}

// ---------------------------------------------------------------- RabbitMQ node

/// The connection events that arrive within `window` (debug text).
async fn collect_events(
    events: &mut (impl futures_util::Stream<Item = lapin::Event> + Unpin),
    window: Duration,
) -> Vec<String> {
    let mut seen = Vec::new();
    let until = tokio::time::Instant::now() + window;
    while let Ok(Some(e)) = tokio::time::timeout_at(until, events.next()).await {
        seen.push(format!("{e:?}"));
    }
    seen
}

async fn amqps_connect(url: &str, ca: Option<String>) -> lapin::Result<lapin::Connection> {
    let runtime = lapin::runtime::default_runtime()?;
    lapin::Connection::connect_with_config(
        url,
        lapin::ConnectionProperties::default(),
        lapin::tcp::OwnedTLSConfig {
            identity: None,
            cert_chain: ca,
        },
        runtime,
    )
    .await
}

/// Publishes one message to a fresh queue on `conn` and consumes it back.
async fn round_trip(conn: &lapin::Connection, body: &[u8]) {
    let ch = conn.create_channel().await.expect("open a channel");
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .expect("declare a queue");
    ch.confirm_select(Default::default())
        .await
        .expect("confirm_select");
    ch.basic_publish(
        "".into(),
        q.name().clone(),
        Default::default(),
        body,
        Default::default(),
    )
    .await
    .expect("publish")
    .await
    .expect("publish confirmed");
    let mut consumer = ch
        .basic_consume(
            q.name().clone(),
            "selftest".into(),
            BasicConsumeOptions::default(),
            Default::default(),
        )
        .await
        .expect("consume");
    let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("a delivery within 10 s")
        .expect("the consumer stream is open")
        .expect("a delivery, not an error");
    assert_eq!(delivery.data, body);
    delivery.ack(BasicAckOptions::default()).await.expect("ack");
    let _ = ch.close(200, "OK".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbit_node_speaks_tls_and_survives_stop_and_kill() {
    let dir = test_dir("rabbit");
    let (mut node, took) = blocking("RabbitNode::start (incl. certificates)", || {
        RabbitNode::start(&dir.join("node"))
    });
    eprintln!(
        "[info] node {} amqp {} amqps {} dist {}",
        node.name, node.amqp_port, node.amqps_port, node.dist_port
    );
    assert!(took < Duration::from_secs(90));

    // rabbitmqctl without -n still reaches the system node, with -n this one.
    let system = common::rabbitmqctl(&["-q", "eval", "node()."]);
    let atom = |out: std::process::Output| {
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .trim_matches('\'')
            .to_string()
    };
    let system = atom(system);
    assert!(
        system.starts_with("rabbit@"),
        "rabbitmqctl without -n reached {system}"
    );
    assert_eq!(atom(node.ctl(&["-q", "eval", "node()."])), node.name);

    // Plain AMQP.
    let plain = lapin::Connection::connect(&node.amqp_url("/"), Default::default())
        .await
        .expect("plain AMQP to the private node");
    round_trip(&plain, b"plain").await;

    // AMQPS with the test CA: a verified TLS session.
    let tls = amqps_connect(&node.amqps_url("/"), Some(node.ca_pem()))
        .await
        .expect("AMQPS with the test CA");
    round_trip(&tls, b"over tls").await;
    let conns = node.ctl(&["-q", "list_connections", "ssl", "peer_port"]);
    let conns = String::from_utf8_lossy(&conns.stdout).to_string();
    assert!(
        conns.lines().any(|l| l.starts_with("true")),
        "the broker lists no TLS connection: {conns}"
    );

    // AMQPS without the CA: the certificate is not trusted, no connection.
    let refused = tokio::time::timeout(
        Duration::from_secs(15),
        amqps_connect(&node.amqps_url("/"), None),
    )
    .await
    .expect("the untrusted attempt ends within 15 s");
    let Err(err) = refused else {
        panic!("a client without the CA must be refused")
    };
    eprintln!("[info] AMQPS without the CA: {err}");

    // Broker faults on a private node: one channel closed, the connection goes on.
    let (ch, mut consumer) = consuming_channel(&tls).await;
    let (closed, _) = blocking("RabbitNode::close_channels_of_vhost", || {
        node.close_channels_of_vhost("/", 1)
    });
    assert_eq!(closed, 1);
    let seen = channel_close_seen(&mut consumer).await;
    assert!(seen.contains("PRECONDITION_FAILED"), "{seen}");
    wait_channel_down(&ch).await;
    round_trip(&tls, b"after a channel close").await;

    // Graceful stop: clients are told (320 CONNECTION_FORCED), the port refuses.
    let mut events = plain.events_listener();
    blocking("RabbitNode::stop", || node.stop());
    assert!(!node.is_running());
    let seen = collect_events(&mut events, Duration::from_secs(3)).await;
    eprintln!("[info] client events on graceful stop: {seen:?}");
    assert!(!seen.is_empty(), "the client heard nothing of the stop");
    assert!(std::net::TcpStream::connect(("127.0.0.1", node.amqp_port)).is_err());
    drop(plain);
    drop(tls);

    blocking("RabbitNode::start_again (after stop)", || {
        node.start_again()
    });
    let conn = amqps_connect(&node.amqps_url("/"), Some(node.ca_pem()))
        .await
        .expect("AMQPS after start_again");
    round_trip(&conn, b"after restart").await;

    // SIGKILL: the client loses the connection without an AMQP close.
    let mut events = conn.events_listener();
    let pid = node.pid().expect("the node runs");
    blocking("RabbitNode::kill", || node.kill());
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the VM process {pid} survived kill()"
    );
    let event = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .expect("the client notices the kill within 10 s");
    eprintln!("[info] client event on kill: {event:?}");
    assert!(!format!("{event:?}").contains("CONNECTION_FORCED"));
    drop(conn);

    blocking("RabbitNode::start_again (after kill)", || {
        node.start_again()
    });
    let conn = lapin::Connection::connect(&node.amqp_url("/"), Default::default())
        .await
        .expect("AMQP after a kill and start_again");
    round_trip(&conn, b"after kill").await;
    drop(conn);

    let node_dir = node.dir.clone();
    blocking("RabbitNode drop", || drop(node));
    assert!(!node_dir.exists(), "drop removes the node's folder");
    let _ = std::fs::remove_dir_all(dir);
}

// ---------------------------------------------------------------- broker faults

/// A channel with a consumer on an exclusive queue of its own.
async fn consuming_channel(conn: &lapin::Connection) -> (lapin::Channel, lapin::Consumer) {
    let ch = conn.create_channel().await.expect("open a channel");
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .expect("declare a queue");
    let consumer = ch
        .basic_consume(
            q.name().clone(),
            "".into(),
            BasicConsumeOptions::default(),
            Default::default(),
        )
        .await
        .expect("consume");
    (ch, consumer)
}

/// What a consumer sees when the broker closes its channel: the error, as text.
async fn channel_close_seen(consumer: &mut lapin::Consumer) -> String {
    match tokio::time::timeout(Duration::from_secs(10), consumer.next()).await {
        Ok(Some(Err(e))) => e.to_string(),
        other => panic!("expected the channel's close error, got {other:?}"),
    }
}

async fn wait_channel_down(ch: &lapin::Channel) {
    let start = Instant::now();
    while ch.status().connected() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "channel {} still open",
            ch.id()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn channel_works(ch: &lapin::Channel) {
    ch.queue_declare(
        "".into(),
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        Default::default(),
    )
    .await
    .expect("the channel still works");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn system_broker_closes_channels_then_connections_of_one_vhost_only() {
    let env = TestEnv::new("faults");
    let other = TestEnv::new("faults_other");
    let conn = env.amqp().await;
    let bystander = other.amqp().await;
    let (by_ch, _by_consumer) = consuming_channel(&bystander).await;

    let mut chans = Vec::new();
    for _ in 0..3 {
        chans.push(consuming_channel(&conn).await);
    }
    let (closed, _) = blocking("close_channels_of_vhost (system broker)", || {
        close_channels_of_vhost(&env.vhost, 2)
    });
    assert_eq!(closed, 2);
    for (ch, consumer) in chans.iter_mut().take(2) {
        let seen = channel_close_seen(consumer).await;
        eprintln!("[info] channel {} closed by the broker: {seen}", ch.id());
        assert!(
            seen.contains("PRECONDITION_FAILED")
                && seen.contains(&INJECTED_DELIVERY_TAG.to_string()),
            "{seen}"
        );
        wait_channel_down(ch).await;
    }
    // The third channel, the connection and the other vhost are untouched.
    channel_works(&chans[2].0).await;
    assert!(conn.status().connected());
    let fresh = conn
        .create_channel()
        .await
        .expect("a new channel on the same connection");
    channel_works(&fresh).await;
    channel_works(&by_ch).await;

    // Nothing left to close beyond what is open: asking for 10 closes the 2 still open.
    let (closed, _) = blocking("close_channels_of_vhost (10 asked)", || {
        close_channels_of_vhost(&env.vhost, 10)
    });
    assert_eq!(closed, 2);
    wait_channel_down(&fresh).await;
    assert!(conn.status().connected());

    let mut events = conn.events_listener();
    blocking("close_connections_of_vhost (system broker)", || {
        close_connections_of_vhost(&env.vhost)
    });
    let event = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .expect("the client hears of the close within 10 s");
    eprintln!("[info] client event on close_connections_of_vhost: {event:?}");
    assert!(
        format!("{event:?}").contains("CONNECTION_FORCED"),
        "{event:?}"
    );
    let start = Instant::now();
    while conn.status().connected() {
        assert!(start.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(bystander.status().connected());
    channel_works(&by_ch).await;
}

// ---------------------------------------------------------------- SMTP faults

#[derive(Debug, PartialEq)]
enum SmtpEnd {
    Reply(String),
    Eof,
    Reset,
}

/// One (possibly multi-line) SMTP reply; None at EOF.
async fn read_reply<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
) -> std::io::Result<Option<String>> {
    let mut all = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await? == 0 {
            return Ok(None);
        }
        all.push_str(&line);
        if line.as_bytes().get(3) != Some(&b'-') {
            return Ok(Some(all.trim_end().to_string()));
        }
    }
}

async fn expect_reply<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R, code: &str) {
    let reply = read_reply(r)
        .await
        .expect("read an SMTP reply")
        .unwrap_or_else(|| panic!("EOF while waiting for {code}"));
    assert!(reply.starts_with(code), "expected {code}, got {reply:?}");
}

/// One transaction the way the service sends it: EHLO; MAIL, RCPT and DATA in one write;
/// then the message and its final dot in a second write. With `pause_after_first_line`
/// the message's first line goes alone and the rest only after a pause (unless the server
/// hung up meanwhile). Returns how the server answered the dot.
async fn smtp_transaction(port: u16, pause_after_first_line: bool) -> SmtpEnd {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the SMTP server");
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    expect_reply(&mut r, "220").await;
    w.write_all(b"EHLO selftest\r\n").await.expect("write EHLO");
    expect_reply(&mut r, "250").await;
    w.write_all(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        .await
        .expect("write MAIL/RCPT/DATA");
    for code in ["250", "250", "354"] {
        expect_reply(&mut r, code).await;
    }
    let first = b"Subject: selftest\r\n".as_slice();
    let rest = b"\r\nline one\r\nline two\r\n.\r\n".as_slice();
    if pause_after_first_line {
        w.write_all(first).await.expect("write the first line");
        // The server hangs up after this line: we see EOF before sending the rest.
        return match tokio::time::timeout(Duration::from_secs(5), read_reply(&mut r)).await {
            Ok(Ok(None)) => SmtpEnd::Eof,
            Ok(Ok(Some(reply))) => SmtpEnd::Reply(reply),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => SmtpEnd::Reset,
            Ok(Err(e)) => panic!("reading after the first line: {e}"),
            Err(_) => {
                let _ = w.write_all(rest).await;
                SmtpEnd::Reply("(no hang-up within 5 s of the first line)".into())
            }
        };
    }
    let whole = [first, rest].concat();
    if let Err(e) = w.write_all(&whole).await {
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
        return SmtpEnd::Reset;
    }
    match tokio::time::timeout(Duration::from_secs(10), read_reply(&mut r))
        .await
        .expect("an answer to the dot (or a hang-up) within 10 s")
    {
        Ok(Some(reply)) => SmtpEnd::Reply(reply),
        Ok(None) => SmtpEnd::Eof,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => SmtpEnd::Reset,
        Err(e) => panic!("reading the answer to the dot: {e}"),
    }
}

fn accepted(end: &SmtpEnd) -> bool {
    matches!(end, SmtpEnd::Reply(r) if r.starts_with("250"))
}

fn drops(smtp: &SmtpServer, what: &str) -> usize {
    smtp.attempts().iter().filter(|(_, r)| r == what).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_server_drops_mid_data_and_after_dot_then_stops_and_restarts() {
    let dir = test_dir("smtpfault");
    let (mut smtp, _) = blocking("SmtpServer::start", || {
        SmtpServer::start(&dir.join("smtp"), &[])
    });
    let fault = smtp.dir.join("fault");

    assert!(accepted(&smtp_transaction(smtp.port, false).await));
    assert_eq!(smtp.messages().len(), 1);

    // drop-after-dot 1: the whole message and the dot are read, then EOF; nothing stored.
    smtp.set_fault(Some("drop-after-dot 1"));
    assert_eq!(smtp_transaction(smtp.port, false).await, SmtpEnd::Eof);
    assert_eq!(smtp.messages().len(), 1, "a dropped message was stored");
    assert_eq!(drops(&smtp, "DROP after-dot"), 1);
    assert!(
        !fault.exists(),
        "the count reached 0: the fault file must be gone"
    );
    assert!(accepted(&smtp_transaction(smtp.port, false).await));
    assert_eq!(smtp.messages().len(), 2);

    // drop-mid-data 2: the first line is read, then the server hangs up; twice.
    smtp.set_fault(Some("drop-mid-data 2"));
    let end = smtp_transaction(smtp.port, true).await;
    assert_eq!(end, SmtpEnd::Eof, "hang-up before the client sent the rest");
    assert_eq!(
        std::fs::read_to_string(&fault).expect("the fault file counts down"),
        "drop-mid-data 1\n"
    );
    let end = smtp_transaction(smtp.port, false).await;
    eprintln!("[info] drop-mid-data, message and dot in one write: {end:?}");
    assert!(matches!(end, SmtpEnd::Eof | SmtpEnd::Reset), "{end:?}");
    assert!(!fault.exists());
    assert_eq!(drops(&smtp, "DROP mid-data"), 2);
    assert_eq!(smtp.messages().len(), 2);
    assert!(accepted(&smtp_transaction(smtp.port, false).await));

    // Without a count: every transaction is dropped while the file exists.
    smtp.set_fault(Some("drop-after-dot"));
    for _ in 0..2 {
        assert_eq!(smtp_transaction(smtp.port, false).await, SmtpEnd::Eof);
    }
    assert!(fault.exists());
    smtp.set_fault(None);
    assert!(accepted(&smtp_transaction(smtp.port, false).await));
    assert_eq!(smtp.messages().len(), 4);
    assert_eq!(drops(&smtp, "DROP after-dot"), 3);

    // stop: refused; restart: same port and folder, numbering goes on after the old messages.
    blocking("SmtpServer::stop", || smtp.stop());
    let refused = tokio::net::TcpStream::connect(("127.0.0.1", smtp.port)).await;
    assert_eq!(
        refused.expect_err("a stopped server refuses").kind(),
        std::io::ErrorKind::ConnectionRefused
    );
    blocking("SmtpServer::restart", || smtp.restart());
    assert!(accepted(&smtp_transaction(smtp.port, false).await));
    let messages = smtp.messages();
    assert_eq!(
        messages.len(),
        5,
        "a message was overwritten after the restart"
    );
    drop(smtp);
    let _ = std::fs::remove_dir_all(dir);
}

// ---------------------------------------------------------------- HTTP server

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_server_serves_slow_redirect_status_big_and_chunked() {
    let dir = test_dir("http");
    let (http, _) = blocking("HttpServer::start", || {
        HttpServer::start(&dir.join("files"))
    });
    http.put_file("a.pdf", b"%PDF-1.4 test");
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("a reqwest client");
    let get = |path: &str| client.get(http.url(path)).send();

    let r = get("/file/a.pdf").await.expect("GET /file/a.pdf");
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.expect("body").as_ref(), b"%PDF-1.4 test");
    assert_eq!(
        get("/file/missing.pdf")
            .await
            .expect("GET missing")
            .status(),
        404
    );

    // A slow answer does not hold up another request; its headers come only after the wait.
    let slow_url = http.url("/slow/2/a.pdf");
    let slow = tokio::spawn(async move {
        let start = Instant::now();
        let r = reqwest::get(slow_url).await.expect("GET /slow/2/a.pdf");
        (
            start.elapsed(),
            r.bytes().await.expect("slow body").to_vec(),
        )
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let start = Instant::now();
    get("/file/a.pdf").await.expect("GET beside the slow one");
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "blocked by the slow request"
    );
    let (took, body) = slow.await.expect("the slow request");
    assert!(
        took >= Duration::from_secs(2),
        "headers came after {took:?}"
    );
    assert_eq!(body, b"%PDF-1.4 test");

    let target = http.url("/file/a.pdf");
    let r = get(&format!("/redirect?to={target}"))
        .await
        .expect("GET /redirect");
    assert_eq!(r.status(), 302);
    assert_eq!(
        r.headers().get("location").and_then(|v| v.to_str().ok()),
        Some(target.as_str())
    );
    let followed = reqwest::get(http.url(&format!("/redirect?to={target}")))
        .await
        .expect("a redirect-following GET");
    assert_eq!(
        followed.bytes().await.expect("body").as_ref(),
        b"%PDF-1.4 test"
    );

    for code in [404u16, 429, 500, 503] {
        let r = get(&format!("/status/{code}")).await.expect("GET /status");
        assert_eq!(r.status().as_u16(), code);
    }

    let r = get("/big/3000000").await.expect("GET /big");
    assert_eq!(r.content_length(), Some(3_000_000));
    assert_eq!(r.bytes().await.expect("big body").len(), 3_000_000);

    let r = get("/nolength/300000").await.expect("GET /nolength");
    assert_eq!(r.content_length(), None);
    assert_eq!(
        r.headers()
            .get("transfer-encoding")
            .and_then(|v| v.to_str().ok()),
        Some("chunked")
    );
    assert_eq!(r.bytes().await.expect("chunked body").len(), 300_000);

    let requests = http.requests();
    assert!(
        requests.contains(&"GET /file/a.pdf HTTP/1.1".to_string()),
        "{requests:?}"
    );
    assert!(requests.contains(&"GET /slow/2/a.pdf HTTP/1.1".to_string()));
    assert!(requests.contains(&"GET /nolength/300000 HTTP/1.1".to_string()));
    assert_eq!(requests.len(), 13, "{requests:?}");
    drop(http);
    let _ = std::fs::remove_dir_all(dir);
}

// ---------------------------------------------------------------- Dovecot

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dovecot_stops_and_restarts_with_the_same_ports_and_mail() {
    let dir = test_dir("dovecot");
    let (mut dovecot, _) = blocking("Dovecot::start", || {
        Dovecot::start(&dir.join("dovecot"), &[("alice", "pw")])
    });
    dovecot.append("alice", "pw", "INBOX", b"Subject: kept\r\n\r\nbody\r\n");
    let (imap, pop3) = (dovecot.imap_port, dovecot.pop3_port);

    blocking("Dovecot::stop", || dovecot.stop());
    assert!(std::net::TcpStream::connect(("127.0.0.1", imap)).is_err());
    assert!(std::net::TcpStream::connect(("127.0.0.1", pop3)).is_err());

    blocking("Dovecot::restart", || dovecot.restart());
    assert_eq!((dovecot.imap_port, dovecot.pop3_port), (imap, pop3));
    dovecot.imap(
        "alice",
        "pw",
        "typ, data = m.select('INBOX')\nassert typ == 'OK' and data[0] == b'1', data",
    );
    drop(dovecot);
    let _ = std::fs::remove_dir_all(dir);
}
