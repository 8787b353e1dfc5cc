//! Issue 15's inbound references, run by `benches/throughput.rs` beside mailbridge's inbound
//! run, on the same 10,000 messages in a Dovecot maildir of their own:
//!
//! - `mbsync` (isync, Debian) copying the mailbox to a local Maildir: raw messages only, no
//!   parsing, no publishing; timed from process start to exit.
//! - a Node.js worker (`bench/reference/inbound/`: imapflow, mailparser, amqplib) that fetches
//!   every message, parses it and publishes the guide's JSON to `email.inbound` with publisher
//!   confirms; timed from process start until the queue holds every message.
//!
//! This file is a module of the `throughput` bench (`#[path]`), not a bench target of its own.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::common::{Dovecot, TestEnv};
use super::{declare_queue, realistic, status_mb, DepthWatch, Meter, Row};

const PASSWORD: &str = "bench-pw";
/// Set in `cpu_by_process` snapshots for an exited child's CPU (its pid may be gone).
const EXITED_CHILD: u32 = u32::MAX;

/// A Dovecot with `n` realistic messages in `sales`'s INBOX, indexed before any clock starts
/// (as for mailbridge's run).
fn mailbox(env: &TestEnv, n: usize) -> Dovecot {
    let dovecot = Dovecot::start(&env.dir.join("dovecot"), &[("sales", PASSWORD)]);
    dovecot.deliver_files("sales", (0..n).map(realistic));
    dovecot.imap("sales", PASSWORD, "m.select('INBOX')");
    dovecot
}

/// CPU seconds (user + system) of this process's waited-for children so far
/// (`cutime` + `cstime` of /proc/self/stat).
fn children_cpu() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let f: Vec<&str> = s.rsplit_once(')')?.1.split_whitespace().collect();
            Some((f.get(13)?.parse::<f64>().ok()? + f.get(14)?.parse::<f64>().ok()?) / 100.0)
        })
        .unwrap_or(0.0)
}

/// Waits for `child` to exit, sampling its peak RSS (`VmHWM`, MB) meanwhile.
async fn wait_sampling(child: &mut Child, limit: Duration) -> (std::process::ExitStatus, f64) {
    let started = Instant::now();
    let mut peak: f64 = 0.0;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (status, peak);
        }
        peak = peak.max(status_mb(child.id(), "VmHWM:"));
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{:?} ran longer than {limit:?}", child.id());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Messages in a Maildir folder (`new/` and `cur/`).
fn maildir_count(folder: &Path) -> usize {
    ["new", "cur"]
        .iter()
        .map(|sub| {
            std::fs::read_dir(folder.join(sub))
                .map(|d| d.count())
                .unwrap_or(0)
        })
        .sum()
}

/// The `.mbsyncrc`: INBOX of the Dovecot pulled into a fresh Maildir, in cleartext.
/// isync 1.4 (Debian 12) says `SSLType None`; 1.5 renamed it `TLSType` (and still reads the old
/// name). It allows the IMAP LOGIN command without TLS only when `AuthMechs` names it.
fn mbsyncrc(port: u16, maildir: &Path) -> String {
    let d = maildir.display();
    format!(
        "IMAPAccount bench\nHost 127.0.0.1\nPort {port}\nUser sales\nPass {PASSWORD}\nSSLType None\nAuthMechs LOGIN\n\n\
         IMAPStore remote\nAccount bench\n\n\
         MaildirStore local\nPath {d}/\nInbox {d}/INBOX\nSubFolders Verbatim\n\n\
         Channel inbox\nFar :remote:\nNear :local:\nPatterns INBOX\nSync Pull\nCreate Near\nSyncState *\n"
    )
}

pub async fn mbsync_inbound(n: usize) -> Row {
    let env = TestEnv::new("bench_mbsync");
    let dovecot = mailbox(&env, n);
    let maildir = env.dir.join("maildir");
    std::fs::create_dir_all(&maildir).unwrap();
    let rc = env.dir.join("mbsyncrc");
    std::fs::write(&rc, mbsyncrc(dovecot.imap_port, &maildir)).unwrap();
    let log = env.dir.join("mbsync.log");

    let meter = Meter::start();
    let children_before = children_cpu();
    let started = Instant::now();
    let mut child = Command::new("mbsync")
        .arg("-c")
        .arg(&rc)
        .arg("-a")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("mbsync (Debian package isync; scripts/bench.sh installs it)");
    let (status, rss_mb) = wait_sampling(&mut child, Duration::from_secs(600)).await;
    let took = started.elapsed().as_secs_f64();
    let mut end = Meter::now();
    // mbsync has exited: its CPU is now in this process's children's counters.
    end.cpu.insert(
        EXITED_CHILD,
        ("mbsync".into(), children_cpu() - children_before),
    );
    assert!(
        status.success(),
        "mbsync failed ({status}): {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let copied = maildir_count(&maildir.join("INBOX"));
    assert_eq!(copied, n, "mbsync copied {copied} of {n} messages");
    drop(dovecot);
    Row {
        key: "inbound-mbsync",
        rate: copied as f64 / took,
        what: "inbound reference: mbsync (isync) to a Maildir".into(),
        result: format!(
            "{:.0} emails/s ({copied} copied in {took:.1} s, from process start to exit)",
            copied as f64 / took
        ),
        rss_mb,
        cpu: meter.report(&end, n as u64),
    }
}

fn node_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/reference/inbound")
}

pub async fn node_inbound(n: usize) -> Row {
    let dir = node_dir();
    assert!(
        dir.join("node_modules").is_dir(),
        "run `npm ci` in {} first (scripts/bench.sh does)",
        dir.display()
    );
    let env = TestEnv::new("bench_node_in");
    let dovecot = mailbox(&env, n);
    declare_queue(&env, "email.inbound").await;
    let inbound = DepthWatch::new(&env, "email.inbound").await;
    let out = env.dir.join("node.log");

    let meter = Meter::start();
    let children_before = children_cpu();
    let started = Instant::now();
    let mut child = Command::new("node")
        .arg("index.js")
        .current_dir(&dir)
        .env("IMAP_HOST", "127.0.0.1")
        .env("IMAP_PORT", dovecot.imap_port.to_string())
        .env("IMAP_USER", "sales")
        .env("IMAP_PASS", PASSWORD)
        .env("AMQP_URL", env.amqp_url())
        .env("EXPECT_N", n.to_string())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(Stdio::from(
            std::fs::OpenOptions::new().append(true).open(&out).unwrap(),
        ))
        .spawn()
        .expect("node (scripts/bench.sh installs nodejs and npm)");
    // Timed as mailbridge's run: until the queue holds all n, sampling the peak RSS meanwhile.
    let mut depth = 0;
    let mut rss_mb: f64 = 0.0;
    let mut exited = None;
    while started.elapsed() < Duration::from_secs(600) {
        depth = inbound.depth().await;
        if depth >= n as u64 {
            break;
        }
        match child.try_wait().unwrap() {
            // Exited before the queue held all: one more look at the queue, then give up.
            Some(status) => {
                if exited.replace(status).is_some() {
                    break;
                }
            }
            None => rss_mb = rss_mb.max(status_mb(child.id(), "VmHWM:")),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = started.elapsed().as_secs_f64();
    inbound.close().await;
    // The worker exits by itself once all are confirmed; its CPU counts to the end.
    let (status, last_rss) = wait_sampling(&mut child, Duration::from_secs(60)).await;
    let rss_mb = rss_mb.max(last_rss);
    let mut end = Meter::now();
    end.cpu.insert(
        EXITED_CHILD,
        ("node".into(), children_cpu() - children_before),
    );
    let log = std::fs::read_to_string(&out).unwrap_or_default();
    assert!(
        status.success() && depth >= n as u64,
        "the Node.js reference published {depth} of {n} ({status}): {log}"
    );
    drop(dovecot);
    Row {
        key: "inbound-node",
        rate: depth as f64 / took,
        what: "inbound reference: Node.js (imapflow, mailparser, amqplib with confirms)".into(),
        result: format!(
            "{:.0} emails/s ({depth} published in {took:.1} s, from process start)",
            depth as f64 / took
        ),
        rss_mb,
        cpu: meter.report(&end, n as u64),
    }
}
