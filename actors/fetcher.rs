//! A mailbox fetcher: one per configured mailbox, fetching new mail over IMAP (IDLE when the
//! server has it and `idle = true`, else polling), POP3, or an HTTP API (`gmail_api`,
//! `ms_graph`: any `sources::MailSource`, polled), and putting every email in exactly
//! one visible place: published once on the inbound queue, or on the inbound DLQ with its raw
//! bytes stored so it can be recovered (`mailbridge dlq replay`).
//!
//! Exactly once: each email has a dedup key (its Message-ID, else a hash of its bytes; for
//! POP3 its UIDL). A batch is published with publisher confirms; only then are its keys, what
//! became of each, and the mailbox position (`intake::MailboxCursor`: UIDVALIDITY and last
//! UID; an API's history id or delta link, stored after its whole walk) committed together in
//! PostgreSQL — retried through a database outage, so a hiccup after the confirms does not
//! publish the batch again. Keys already recorded are skipped, so a restart, a re-sync, or a
//! UIDVALIDITY change publishes nothing twice.
//!
//! One email never fails or repeats its batch: one that does not parse, is larger than
//! `[inbound] max_message_bytes`, or is refused by the broker goes to the DLQ and the batch
//! goes on; a broker that closes the channel over one email has the rest re-published one at
//! a time to find it. Parsing, storing attachments and encoding run on the blocking pool, so a
//! huge or pathological email does not stall the actors' thread.
//!
//! Memory is bounded by bytes: bodies are fetched in groups of at most
//! `[inbound] fetch_batch_bytes` (and 200 messages) by the sizes the server announces, and a
//! larger email is streamed into the attachment store a piece at a time.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures_util::StreamExt;
use lapin::BasicProperties;
use tokio::sync::{oneshot, watch, Notify};

use crate::actors::dlq::{DeadLetter, DeadLetterActor};
use crate::actors::metrics::{Count, ReportHealth};
use crate::actors::outbound::DLQ_CHILD;
use crate::actors::supervisor::{backoff, ChildContext, Drain, FindChild};
use crate::amqp::{lane_of, short_string, PublishError, Publisher};
use crate::attachments::{AttachmentError, AttachmentStore, RawWriter, StoredRaw};
use crate::credentials::{Credential, CredentialError};
use crate::domain::{ComponentHealth, ComponentId, DeadLetterEntry};
use crate::inbound::{header_facts, header_map_of, message_id_key, sha256_hex, uidl_key, Origin};
use crate::intake::{self, guarded, MailboxCursor, Outcome, Prepared, Record};
use crate::mailproto::{
    endpoint, imap_error, imap_login, imap_step, ImapSession, MailboxError, Pop3, ReadLimit,
    MAX_LINE, STEP_TIMEOUT,
};
use crate::outbound::rfc3339;
use crate::settings::{InitialSync, MailProtocol, Mailbox};
use crate::sources::{ApiSource, Download, MailSource, MessageRef, SourceError, Start};
use crate::storage::StorageError;

/// At most this many messages per fetch and per published batch.
const BATCH: usize = 200;
/// UIDs whose sizes are listed per `UID FETCH a:b (UID RFC822.SIZE)`.
const LIST_WINDOW: u32 = 2000;
/// UIDs whose Message-IDs are fetched per round when recording skipped mail.
const KEY_WINDOW: u32 = 500;
/// How much of a header is kept for a dead letter (and read to find a Message-ID).
const HEADER_CAP: usize = 64 * 1024;
/// The piece in which an email too large for memory is read and stored.
const PIECE: usize = 1024 * 1024;
/// Longest IDLE before it is renewed (servers drop IDLE after 30 min).
const IDLE_MAX: Duration = Duration::from_secs(25 * 60);
/// The longest wait between retries of a publish or a database write.
const RETRY_MAX: Duration = Duration::from_secs(30);

pub fn mailbox_child(mailbox_id: &str) -> String {
    format!("mailbox:{mailbox_id}")
}

#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error(transparent)]
    Mailbox(#[from] MailboxError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("the inbound DLQ did not take an email: {0}; it is tried again on the next sync")]
    DeadLetter(String),
    #[error("the attachment store failed: {0}; check [attachments] dir (space, permissions)")]
    Store(#[from] AttachmentError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("a blocking task failed: {0}")]
    Task(String),
}

impl FetchError {
    /// The OAuth2 account must be re-authorized: nothing to retry until the config changes.
    fn is_reauthorize(&self) -> bool {
        matches!(
            self,
            FetchError::Mailbox(MailboxError::Credential(
                CredentialError::Reauthorize { .. }
            )) | FetchError::Source(SourceError::Credential(CredentialError::Reauthorize { .. }))
        )
    }

    /// How long the server asked to wait (an API's `Retry-After`).
    fn retry_after(&self) -> Option<Duration> {
        match self {
            FetchError::Source(e) => e.retry_after(),
            _ => None,
        }
    }
}

/// Runs `f` on the blocking pool: parsing, hashing and file writes stay off the actors'
/// thread.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, FetchError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| FetchError::Task(e.to_string()))
}

/// One fetched email: where it is in the mailbox and its bytes.
struct Item {
    /// The UID (IMAP) or UIDL (POP3), for dead letters and logs.
    uid: String,
    raw: Vec<u8>,
    received_at: Option<i64>,
    /// Known before the bytes (POP3: `uidl:<UIDL>`); else taken from them.
    key: Option<String>,
}

/// An email that goes to the DLQ with its bytes already stored.
struct DeadItem {
    key: String,
    uid: String,
    message_id: Option<String>,
    error: String,
    stored: StoredRaw,
    /// For an email not published whole (too large): its headers.
    headers: Option<BTreeMap<String, String>>,
}

/// How the bytes of one email are fetched: in one group with others, or alone in pieces.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Group<T> {
    Bodies(Vec<(T, u64)>),
    Oversized(T, u64),
}

/// Groups messages (in order) into fetches of at most `batch_bytes` and `batch_count`; a
/// message over `max_message` is a group of its own, fetched in pieces and never held whole.
fn plan_groups<T: Copy>(
    sizes: &[(T, u64)],
    max_message: u64,
    batch_bytes: u64,
    batch_count: usize,
) -> Vec<Group<T>> {
    let mut out = Vec::new();
    let mut current: Vec<(T, u64)> = Vec::new();
    let mut bytes = 0u64;
    for &(id, size) in sizes {
        if size > max_message {
            if !current.is_empty() {
                out.push(Group::Bodies(std::mem::take(&mut current)));
                bytes = 0;
            }
            out.push(Group::Oversized(id, size));
            continue;
        }
        if !current.is_empty()
            && (current.len() >= batch_count || bytes.saturating_add(size) > batch_bytes)
        {
            out.push(Group::Bodies(std::mem::take(&mut current)));
            bytes = 0;
        }
        current.push((id, size));
        bytes = bytes.saturating_add(size);
    }
    if !current.is_empty() {
        out.push(Group::Bodies(current));
    }
    out
}

/// An IMAP sequence set for sorted UIDs, runs written `a:b`.
fn uid_set(uids: &[u32]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < uids.len() {
        let start = uids[i];
        let mut end = start;
        while i + 1 < uids.len() && uids[i + 1] == end.wrapping_add(1) {
            i += 1;
            end = uids[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}:{end}"));
        }
        i += 1;
    }
    out
}

/// What one round of publishing did with each email (by index).
#[derive(Debug, Default, PartialEq)]
struct Round {
    published: Vec<usize>,
    /// The broker refused these and will refuse them again.
    refused: Vec<(usize, PublishError)>,
    /// Not published for a reason that can pass (channel or connection lost).
    failed: Vec<(usize, PublishError)>,
}

/// Publishes `todo` concurrently, each confirmed. A nack or a return refuses one email. A
/// broker that closes the channel over one email (406) fails every publish then in flight with
/// the same error, so those — and any that failed with the channel — are published again one
/// at a time, which tells the culprit from the rest.
async fn publish_round<F, Fut>(todo: &[usize], publish: F) -> Round
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<(), PublishError>>,
{
    let results = futures_util::future::join_all(todo.iter().map(|&i| publish(i))).await;
    let mut round = Round::default();
    let mut suspects = Vec::new();
    let mut channel_closed_by_one = false;
    for (&i, r) in todo.iter().zip(results) {
        match r {
            Ok(()) => round.published.push(i),
            Err(e @ PublishError::Refused { .. }) => {
                channel_closed_by_one = true;
                suspects.push((i, e));
            }
            Err(e) if e.is_refusal() => round.refused.push((i, e)),
            Err(e) => suspects.push((i, e)),
        }
    }
    if !channel_closed_by_one || todo.len() == 1 {
        for (i, e) in suspects {
            if e.is_refusal() {
                round.refused.push((i, e));
            } else {
                round.failed.push((i, e));
            }
        }
        return round;
    }
    suspects.sort_by_key(|(i, _)| *i);
    for (i, _) in suspects {
        match publish(i).await {
            Ok(()) => round.published.push(i),
            Err(e) if e.is_refusal() => round.refused.push((i, e)),
            Err(e) => round.failed.push((i, e)),
        }
    }
    round
}

/// Everything the fetch loop needs; owned by the loop.
struct Fetch {
    mailbox: Arc<Mailbox>,
    child: ChildContext,
    publisher: Arc<Publisher>,
    store: Arc<AttachmentStore>,
    wake: Arc<Notify>,
    stop: watch::Receiver<bool>,
    last_sync: Option<String>,
    /// API messages whose download failed for a reason about the message itself, and how
    /// many times in a row: at `DOWNLOAD_TRIES` the message is dead-lettered.
    download_failures: std::sync::Mutex<HashMap<String, u32>>,
    /// When an API mailbox without a position was first tried (Unix seconds).
    first_contact: std::sync::Mutex<Option<i64>>,
}

/// Downloads of one API message that fail for the message's own reason before it is
/// dead-lettered (it would otherwise stop its mailbox for good).
const DOWNLOAD_TRIES: u32 = 3;

/// Pages one walk of an API mailbox may take (a million messages and more at the APIs' page
/// sizes); past it the API is taken to loop.
const MAX_WALK_PAGES: u32 = 20_000;

impl Fetch {
    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    fn labels(&self) -> Vec<(&'static str, String)> {
        vec![
            ("tenant", self.mailbox.tenant_id.clone()),
            ("mailbox", self.mailbox.id.clone()),
        ]
    }

    fn source(&self) -> &'static str {
        self.mailbox.protocol.as_str()
    }

    fn max_message(&self) -> u64 {
        self.child.settings.inbound.max_message_bytes
    }

    fn report(&self, health: ComponentHealth) {
        self.child.metrics.do_send(ReportHealth {
            id: ComponentId::Mailbox(self.mailbox.id.clone()),
            health: health
                .with("tenant", self.mailbox.tenant_id.clone())
                .with("protocol", self.source())
                .with("endpoint", endpoint(&self.mailbox))
                .with(
                    "last_sync",
                    self.last_sync
                        .clone()
                        .map(serde_json::Value::String)
                        .unwrap_or(serde_json::Value::Null),
                ),
        });
    }

    /// Sleeps for `d`, or less when a sync is requested or the fetcher is stopped.
    async fn pause(&self, d: Duration) {
        let mut stop = self.stop.clone();
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = self.wake.notified() => {}
            _ = stop.changed() => {}
        }
    }

    /// Waits before a retry: `d`, cut short by a stop (after which retries come quicker).
    async fn retry_pause(&self, d: Duration) {
        if self.stopped() {
            tokio::time::sleep(d.min(Duration::from_millis(500))).await;
            return;
        }
        let mut stop = self.stop.clone();
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = stop.changed() => {}
        }
    }

    fn report_ok(&self, idling: bool) {
        self.report(
            ComponentHealth::ok()
                .with("connected", true)
                .with("idling", idling),
        );
    }

    /// Runs until stopped: connect, sync, wait, again; errors back off and reconnect.
    async fn run(mut self) {
        let mut attempt = 0u32;
        while !self.stopped() {
            let started = Instant::now();
            let result = match self.mailbox.protocol {
                MailProtocol::Imap => self.imap().await,
                MailProtocol::Pop3 => self.pop3().await,
                MailProtocol::GmailApi | MailProtocol::MsGraph => self.api().await,
            };
            if let Err(e) = result {
                if self.stopped() {
                    tracing::info!(mailbox = %self.mailbox.id, error = %e, "mailbox fetcher stopped");
                    break;
                }
                if e.is_reauthorize() {
                    // Permanent until a user authorizes the account again, which changes the
                    // configuration and so restarts this fetcher: no polling until then.
                    tracing::warn!(mailbox = %self.mailbox.id, error = %e, "mailbox stopped: its OAuth2 account must be re-authorized");
                    self.report(
                        ComponentHealth::down(e.to_string())
                            .with("connected", false)
                            .with("idling", false),
                    );
                    let mut stop = self.stop.clone();
                    while !*stop.borrow() {
                        if stop.changed().await.is_err() {
                            break;
                        }
                    }
                    break;
                }
                if started.elapsed() > Duration::from_secs(60) {
                    attempt = 0;
                }
                // At least what the API asked for (429, 503 with Retry-After).
                let delay = backoff(attempt, Duration::from_secs(60))
                    .max(e.retry_after().unwrap_or_default());
                attempt += 1;
                if let FetchError::Mailbox(MailboxError::Login { .. }) = e {
                    // The username is for the log only, never for /health.
                    tracing::warn!(mailbox = %self.mailbox.id, user = %self.mailbox.username, error = %e, retry_in = ?delay, "mailbox login failed");
                } else {
                    tracing::warn!(mailbox = %self.mailbox.id, error = %e, retry_in = ?delay, "mailbox sync failed");
                }
                self.child
                    .metrics
                    .do_send(Count::one("mailbridge_inbound_errors_total", self.labels()));
                self.report(
                    ComponentHealth::down(e.to_string())
                        .with("connected", false)
                        .with("idling", false),
                );
                if e.retry_after().is_some() {
                    // The API asked for this wait: a sync request does not cut it short.
                    self.retry_pause(delay).await;
                } else {
                    self.pause(delay).await;
                }
            }
        }
    }

    /// Runs a database step, retrying transient failures (backoff up to 30 s) for as long as
    /// the fetcher runs, and for up to 10 s more once it is asked to stop: what it records
    /// was already published, and losing it would publish it again.
    async fn db<T, F, Fut>(&self, what: &str, f: F) -> Result<T, FetchError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, StorageError>>,
    {
        let mut attempt = 0u32;
        let mut stopped_at: Option<Instant> = None;
        loop {
            match f().await {
                Ok(v) => return Ok(v),
                Err(e) if e.is_transient() => {
                    if self.stopped() {
                        let since = *stopped_at.get_or_insert_with(Instant::now);
                        if since.elapsed() > Duration::from_secs(10) {
                            return Err(e.into());
                        }
                    }
                    let delay = backoff(attempt, RETRY_MAX);
                    attempt += 1;
                    tracing::warn!(mailbox = %self.mailbox.id, error = %e, retry_in = ?delay, "{what}: database unavailable, retrying");
                    self.retry_pause(delay).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn known(&self, keys: &[String]) -> Result<HashMap<String, String>, FetchError> {
        let pool = &self.child.pool;
        let id = &self.mailbox.id;
        self.db("looking up known emails", || intake::known(pool, id, keys))
            .await
    }

    async fn record(
        &self,
        rows: &[Record],
        cursor: Option<&MailboxCursor>,
    ) -> Result<(), FetchError> {
        if rows.is_empty() && cursor.is_none() {
            return Ok(());
        }
        let pool = &self.child.pool;
        let id = &self.mailbox.id;
        self.db("recording the batch", || {
            intake::record(pool, id, rows, cursor)
        })
        .await
    }

    async fn cursor(&self) -> Result<Option<MailboxCursor>, FetchError> {
        let pool = &self.child.pool;
        let id = &self.mailbox.id;
        self.db("reading the mailbox position", || intake::cursor(pool, id))
            .await
    }

    // ----------------------------------------------------------------------------------------
    // IMAP

    async fn imap(&mut self) -> Result<(), FetchError> {
        let ep = endpoint(&self.mailbox);
        let credential = self.mailbox.oauth2.as_ref().map(|o| {
            Credential::OAuth2(
                self.child
                    .accounts
                    .account(&format!("mailbox:{}", self.mailbox.id), o),
            )
        });
        let (mut session, limit) = imap_login(&self.mailbox, credential.as_ref()).await?;
        let can_idle = imap_step(&ep, "CAPABILITY", session.capabilities())
            .await?
            .has_str("IDLE");
        loop {
            let selected = imap_step(&ep, "SELECT", session.select(&self.mailbox.folder)).await?;
            self.imap_sync(&mut session, &selected).await?;
            self.last_sync = Some(rfc3339(time::OffsetDateTime::now_utc()));
            if self.stopped() {
                let _ = imap_step(&ep, "LOGOUT", session.logout()).await;
                return Ok(());
            }
            if self.mailbox.idle && can_idle {
                self.report_ok(true);
                session = self.idle(session, &limit).await?;
            } else {
                self.report_ok(false);
                self.pause(self.mailbox.poll_interval).await;
            }
            if self.stopped() {
                let _ = imap_step(&ep, "LOGOUT", session.logout()).await;
                return Ok(());
            }
        }
    }

    /// IDLE until the server reports something, a sync is requested, or we are stopped.
    async fn idle(
        &mut self,
        session: ImapSession,
        limit: &ReadLimit,
    ) -> Result<ImapSession, FetchError> {
        let ep = endpoint(&self.mailbox);
        let wait = self.mailbox.poll_interval.min(IDLE_MAX);
        let mut handle = session.idle();
        imap_step(&ep, "IDLE", handle.init()).await?;
        // Silence is expected while idling: the stream may wait the whole IDLE, and a little
        // more for the server's answer to DONE.
        limit.set(wait + STEP_TIMEOUT);
        {
            let (fut, stop_source) = handle.wait_with_timeout(wait);
            let mut stop_source = Some(stop_source);
            tokio::pin!(fut);
            let mut stop = self.stop.clone();
            let outcome = tokio::select! {
                r = &mut fut => r,
                _ = self.wake.notified() => { stop_source.take(); (&mut fut).await }
                _ = stop.changed() => { stop_source.take(); (&mut fut).await }
            };
            outcome.map_err(|e| imap_error(&ep, "IDLE", e))?;
        }
        limit.set(STEP_TIMEOUT);
        Ok(imap_step(&ep, "DONE", handle.done()).await?)
    }

    async fn imap_sync(
        &mut self,
        session: &mut ImapSession,
        selected: &async_imap::types::Mailbox,
    ) -> Result<(), FetchError> {
        let ep = endpoint(&self.mailbox);
        let uidvalidity = selected.uid_validity.unwrap_or(0);
        let top = match selected.uid_next {
            Some(n) => n.saturating_sub(1),
            // Servers without UIDNEXT: ask for the highest UID.
            None => imap_step(&ep, "SEARCH", session.uid_search("ALL"))
                .await?
                .into_iter()
                .max()
                .unwrap_or(0),
        };
        let imap_cursor = |last_uid| MailboxCursor::Imap {
            uidvalidity,
            last_uid,
        };
        let start = match self.cursor().await? {
            Some(MailboxCursor::Imap {
                uidvalidity: v,
                last_uid,
            }) if v == uidvalidity => last_uid,
            Some(MailboxCursor::Imap { uidvalidity: v, .. }) => {
                tracing::warn!(mailbox = %self.mailbox.id, old = v, new = uidvalidity,
                    "UIDVALIDITY changed: resyncing the folder (already published mail is skipped)");
                0
            }
            // None, or another protocol's position (the mailbox changed protocol, and what
            // the old one skipped was never recorded): a first contact, by `initial_sync`.
            _ => match self.mailbox.initial_sync {
                InitialSync::All => 0,
                InitialSync::New => {
                    // What is there now is seen, and recorded so: neither a later poll nor a
                    // UIDVALIDITY change publishes it.
                    self.imap_skip(session, top, &BTreeSet::new()).await?;
                    if self.stopped() {
                        return Ok(());
                    }
                    self.record(&[], Some(&imap_cursor(top))).await?;
                    top
                }
                InitialSync::Since(age) => {
                    let since = time::OffsetDateTime::now_utc() - age;
                    let query = format!(
                        "SINCE {}-{}-{}",
                        since.day(),
                        month_abbrev(since.month()),
                        since.year()
                    );
                    let recent: BTreeSet<u32> =
                        imap_step(&ep, "SEARCH", session.uid_search(&query))
                            .await?
                            .into_iter()
                            .filter(|u| *u <= top)
                            .collect();
                    self.imap_skip(session, top, &recent).await?;
                    let uids: Vec<u32> = recent.into_iter().collect();
                    for chunk in uids.chunks(LIST_WINDOW as usize) {
                        if self.stopped() {
                            return Ok(());
                        }
                        let wanted: HashSet<u32> = chunk.iter().copied().collect();
                        let sizes = self
                            .imap_sizes(session, &uid_set(chunk), |u| wanted.contains(&u))
                            .await?;
                        self.imap_groups(session, uidvalidity, &sizes, None).await?;
                    }
                    if self.stopped() {
                        return Ok(());
                    }
                    self.record(&[], Some(&imap_cursor(top))).await?;
                    top
                }
            },
        };
        let mut next = start.saturating_add(1);
        while next <= top && start < top && !self.stopped() {
            let upper = top.min(next.saturating_add(LIST_WINDOW - 1));
            let sizes = self
                .imap_sizes(session, &format!("{next}:{upper}"), |u| {
                    (next..=upper).contains(&u)
                })
                .await?;
            self.imap_groups(session, uidvalidity, &sizes, Some(upper))
                .await?;
            if upper == u32::MAX {
                break;
            }
            next = upper + 1;
        }
        Ok(())
    }

    /// The sizes (RFC822.SIZE) of the messages of `set` (those `wanted`), by UID. A message
    /// the server gives no size for counts as 0: it is fetched with the others, and its
    /// actual size is checked once it is read.
    async fn imap_sizes(
        &self,
        session: &mut ImapSession,
        set: &str,
        wanted: impl Fn(u32) -> bool,
    ) -> Result<Vec<(u32, u64)>, FetchError> {
        let ep = endpoint(&self.mailbox);
        let mut stream =
            imap_step(&ep, "FETCH", session.uid_fetch(set, "(UID RFC822.SIZE)")).await?;
        let mut sizes = BTreeMap::new();
        while let Some(f) = stream.next().await {
            let f = f.map_err(|e| imap_error(&ep, "FETCH", e))?;
            // Unsolicited FETCH responses (flag changes of other messages) are not ours.
            if let Some(uid) = f.uid.filter(|u| wanted(*u)) {
                sizes.insert(uid, f.size.map(u64::from).unwrap_or(0));
            }
        }
        Ok(sizes.into_iter().collect())
    }

    /// Fetches and processes the messages of one size listing, group by group. With
    /// `window_end`, the position advances with each group (to `window_end` after the last).
    async fn imap_groups(
        &self,
        session: &mut ImapSession,
        uidvalidity: u32,
        sizes: &[(u32, u64)],
        window_end: Option<u32>,
    ) -> Result<(), FetchError> {
        let inbound = &self.child.settings.inbound;
        let groups = plan_groups(
            sizes,
            inbound.max_message_bytes,
            inbound.fetch_batch_bytes,
            BATCH,
        );
        if groups.is_empty() {
            if let Some(end) = window_end {
                let cursor = MailboxCursor::Imap {
                    uidvalidity,
                    last_uid: end,
                };
                self.record(&[], Some(&cursor)).await?;
            }
            return Ok(());
        }
        let count = groups.len();
        for (i, group) in groups.into_iter().enumerate() {
            if self.stopped() {
                return Ok(());
            }
            let last_uid = match &group {
                Group::Bodies(list) => list.last().map(|(u, _)| *u).unwrap_or(0),
                Group::Oversized(u, _) => *u,
            };
            let cursor = window_end.map(|end| MailboxCursor::Imap {
                uidvalidity,
                last_uid: if i + 1 == count { end } else { last_uid },
            });
            match group {
                Group::Bodies(list) => {
                    let uids: Vec<u32> = list.iter().map(|(u, _)| *u).collect();
                    let items = self.imap_bodies(session, &uids).await?;
                    self.process(items, Vec::new(), cursor, Vec::new()).await?;
                }
                Group::Oversized(uid, size) => {
                    self.imap_oversized(session, uid, size, cursor).await?;
                }
            }
        }
        Ok(())
    }

    async fn imap_bodies(
        &self,
        session: &mut ImapSession,
        uids: &[u32],
    ) -> Result<Vec<Item>, FetchError> {
        let ep = endpoint(&self.mailbox);
        let wanted: HashSet<u32> = uids.iter().copied().collect();
        let mut stream = imap_step(
            &ep,
            "FETCH",
            session.uid_fetch(uid_set(uids), "(UID INTERNALDATE BODY.PEEK[])"),
        )
        .await?;
        let mut items = Vec::with_capacity(uids.len());
        while let Some(f) = stream.next().await {
            let f = f.map_err(|e| imap_error(&ep, "FETCH", e))?;
            // Unsolicited FETCH responses (flag changes of other messages) are not ours.
            let (Some(uid), Some(body)) = (f.uid, f.body()) else {
                continue;
            };
            if !wanted.contains(&uid) {
                continue;
            }
            items.push(Item {
                uid: uid.to_string(),
                raw: body.to_vec(),
                received_at: f.internal_date().map(|d| d.timestamp()),
                key: None,
            });
        }
        // Messages listed but not returned were expunged meanwhile: nothing to publish.
        items.sort_by_key(|i| i.uid.parse::<u32>().unwrap_or(0));
        Ok(items)
    }

    /// The first [`HEADER_CAP`] bytes of a message's header.
    async fn imap_header(
        &self,
        session: &mut ImapSession,
        uid: u32,
    ) -> Result<Option<Vec<u8>>, FetchError> {
        let ep = endpoint(&self.mailbox);
        let mut stream = imap_step(
            &ep,
            "FETCH",
            session.uid_fetch(
                uid.to_string(),
                format!("(UID BODY.PEEK[HEADER]<0.{HEADER_CAP}>)"),
            ),
        )
        .await?;
        let mut header = None;
        while let Some(f) = stream.next().await {
            let f = f.map_err(|e| imap_error(&ep, "FETCH", e))?;
            if f.uid == Some(uid) {
                if let Some(h) = f.header() {
                    header = Some(h.to_vec());
                }
            }
        }
        Ok(header)
    }

    /// Streams a message in [`PIECE`]s (`BODY.PEEK[]<offset.length>`) to `sink`; false when
    /// the message is gone.
    async fn imap_pieces(
        &self,
        session: &mut ImapSession,
        uid: u32,
        size: u64,
        sink: &mut RawSink,
    ) -> Result<bool, FetchError> {
        let ep = endpoint(&self.mailbox);
        let mut offset = 0u64;
        loop {
            let mut stream = imap_step(
                &ep,
                "FETCH",
                session.uid_fetch(
                    uid.to_string(),
                    format!("(UID BODY.PEEK[]<{offset}.{PIECE}>)"),
                ),
            )
            .await?;
            let mut piece: Option<Vec<u8>> = None;
            while let Some(f) = stream.next().await {
                let f = f.map_err(|e| imap_error(&ep, "FETCH", e))?;
                if f.uid == Some(uid) {
                    if let Some(b) = f.body() {
                        piece = Some(b.to_vec());
                    }
                }
            }
            drop(stream);
            let Some(piece) = piece else {
                return Ok(offset > 0);
            };
            sink.push(&piece).await?;
            offset += piece.len() as u64;
            // A short piece is the end; a server that keeps sending past the size it
            // announced is cut off there.
            if piece.len() < PIECE || offset > size.saturating_add(PIECE as u64) {
                return Ok(true);
            }
        }
    }

    /// A message over `max_message_bytes`: never parsed or published, nor held whole. Its
    /// header and size go to the DLQ, its bytes to the attachment store, its key is recorded.
    async fn imap_oversized(
        &self,
        session: &mut ImapSession,
        uid: u32,
        size: u64,
        cursor: Option<MailboxCursor>,
    ) -> Result<(), FetchError> {
        let header = self.imap_header(session, uid).await?.unwrap_or_default();
        let (facts, headers) =
            blocking(move || guarded(|| (header_facts(&header), header_map_of(&header))))
                .await?
                .unwrap_or_default();
        if let Some(key) = &facts.key {
            if !self.known(std::slice::from_ref(key)).await?.is_empty() {
                return self.record(&[], cursor.as_ref()).await;
            }
        }
        let mut sink = RawSink::store(&self.store)?;
        if !self.imap_pieces(session, uid, size, &mut sink).await? {
            return self.record(&[], cursor.as_ref()).await;
        }
        let stored = sink.finish().await?;
        let key = match facts.key {
            Some(k) => k,
            None => {
                let k = format!("sha256:{}", stored.id);
                if !self.known(std::slice::from_ref(&k)).await?.is_empty() {
                    return self.record(&[], cursor.as_ref()).await;
                }
                k
            }
        };
        let dead = DeadItem {
            key,
            uid: uid.to_string(),
            message_id: facts.message_id,
            error: too_large(stored.size, self.max_message()),
            stored,
            headers: Some(headers),
        };
        self.process(Vec::new(), vec![dead], cursor, Vec::new())
            .await?;
        Ok(())
    }

    /// Records the keys of the messages up to `top` that `initial_sync` leaves out (all but
    /// `keep`) as `skipped-initial`, without moving the position (the caller does that once
    /// all are recorded). Keys come from the Message-ID header; a message without one is read
    /// whole (in pieces when large) to hash it exactly as its dedup key does.
    async fn imap_skip(
        &self,
        session: &mut ImapSession,
        top: u32,
        keep: &BTreeSet<u32>,
    ) -> Result<(), FetchError> {
        let ep = endpoint(&self.mailbox);
        let mut next = 1u32;
        while next <= top && !self.stopped() {
            let upper = top.min(next.saturating_add(KEY_WINDOW - 1));
            let mut stream = imap_step(
                &ep,
                "FETCH",
                session.uid_fetch(
                    format!("{next}:{upper}"),
                    "(UID RFC822.SIZE BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])",
                ),
            )
            .await?;
            let mut found: Vec<(u32, u64, Vec<u8>)> = Vec::new();
            while let Some(f) = stream.next().await {
                let f = f.map_err(|e| imap_error(&ep, "FETCH", e))?;
                let Some(uid) = f
                    .uid
                    .filter(|u| (next..=upper).contains(u) && !keep.contains(u))
                else {
                    continue;
                };
                // HEADER.FIELDS comes back as a header section.
                let fields = f.header().map(<[u8]>::to_vec).unwrap_or_default();
                found.push((uid, f.size.map(u64::from).unwrap_or(0), fields));
            }
            drop(stream);
            let keyed: Vec<(u32, u64, Option<String>)> = blocking(move || {
                found
                    .into_iter()
                    .map(|(uid, size, fields)| {
                        let key = guarded(|| {
                            mail_parser::MessageParser::default()
                                .parse_headers(&fields)
                                .and_then(|m| m.message_id().and_then(message_id_key))
                        })
                        .ok()
                        .flatten();
                        (uid, size, key)
                    })
                    .collect()
            })
            .await?;
            let mut rows = Vec::with_capacity(keyed.len());
            for (uid, size, key) in keyed {
                let key = match key {
                    Some(k) => Some(k),
                    None => self.imap_hash_key(session, uid, size).await?,
                };
                if let Some(k) = key {
                    rows.push(Record::new(k, Outcome::SkippedInitial));
                }
            }
            self.record(&rows, None).await?;
            if upper == u32::MAX {
                break;
            }
            next = upper + 1;
        }
        Ok(())
    }

    /// The `sha256:` dedup key of a message without a Message-ID, from its bytes; None when
    /// it is gone.
    async fn imap_hash_key(
        &self,
        session: &mut ImapSession,
        uid: u32,
        size: u64,
    ) -> Result<Option<String>, FetchError> {
        if size <= self.max_message() {
            let items = self.imap_bodies(session, &[uid]).await?;
            let Some(item) = items.into_iter().next() else {
                return Ok(None);
            };
            let key = blocking(move || format!("sha256:{}", sha256_hex(&item.raw))).await?;
            return Ok(Some(key));
        }
        let mut sink = RawSink::hash();
        if !self.imap_pieces(session, uid, size, &mut sink).await? {
            return Ok(None);
        }
        Ok(Some(format!("sha256:{}", sink.finish().await?.id)))
    }

    // ----------------------------------------------------------------------------------------
    // POP3

    async fn pop3(&mut self) -> Result<(), FetchError> {
        loop {
            self.pop3_sync().await?;
            self.last_sync = Some(rfc3339(time::OffsetDateTime::now_utc()));
            self.report_ok(false);
            self.pause(self.mailbox.poll_interval).await;
            if self.stopped() {
                return Ok(());
            }
        }
    }

    async fn pop3_sync(&mut self) -> Result<(), FetchError> {
        let mut pop = Pop3::login(&self.mailbox).await?;
        let listing = pop.uidl().await?;
        let sizes: HashMap<u32, u64> = pop.list().await?.into_iter().collect();
        let first_contact = self.cursor().await?.is_none();
        let key_of = uidl_key;
        let keys: Vec<String> = listing.iter().map(|(_, u)| key_of(u)).collect();
        let known = self.known(&keys).await?;
        if self.mailbox.delete_after_fetch {
            // Published (or dead-lettered) before, but the session that did it ended before
            // its deletions took effect.
            for (n, uidl) in &listing {
                if known
                    .get(&key_of(uidl))
                    .is_some_and(|o| o != Outcome::SkippedInitial.as_str())
                {
                    pop.dele(*n).await?;
                }
            }
        }
        let mut new: Vec<(u32, String)> = listing
            .into_iter()
            .filter(|(_, u)| !known.contains_key(&key_of(u)))
            .collect();
        if first_contact {
            match self.mailbox.initial_sync {
                InitialSync::All => {}
                InitialSync::New => {
                    // What is there now counts as seen; only later mail is published.
                    let rows: Vec<Record> = new
                        .iter()
                        .map(|(_, u)| Record::new(key_of(u), Outcome::SkippedInitial))
                        .collect();
                    self.record(&rows, Some(&MailboxCursor::Pop3)).await?;
                    pop.quit().await?;
                    return Ok(());
                }
                InitialSync::Since(age) => {
                    let since = (time::OffsetDateTime::now_utc() - age).unix_timestamp();
                    let mut recent = Vec::with_capacity(new.len());
                    let mut skipped = Vec::new();
                    for (n, uidl) in new {
                        if self.stopped() {
                            self.record(&skipped, None).await?;
                            return Ok(());
                        }
                        let header = pop.top_header(n, HEADER_CAP).await?;
                        let date = guarded(|| {
                            mail_parser::MessageParser::default()
                                .parse_headers(&header)
                                .and_then(|m| m.date().map(|d| d.to_timestamp()))
                        })
                        .ok()
                        .flatten();
                        // Without a Date there is nothing to go by: published.
                        if date.is_some_and(|t| t < since) {
                            skipped.push(Record::new(key_of(&uidl), Outcome::SkippedInitial));
                        } else {
                            recent.push((n, uidl));
                        }
                    }
                    self.record(&skipped, None).await?;
                    new = recent;
                }
            }
        }
        // Batches end at 200 messages or `fetch_batch_bytes` — counted by the bytes that
        // arrived, not by the sizes the server announced.
        let batch_bytes = self.child.settings.inbound.fetch_batch_bytes;
        let mut batch = Pop3Batch::default();
        for (n, uidl) in &new {
            if self.stopped() {
                break;
            }
            let size = sizes.get(n).copied().unwrap_or(0);
            if !batch.members.is_empty() && batch.held.saturating_add(size) > batch_bytes {
                self.pop3_flush(&mut pop, std::mem::take(&mut batch))
                    .await?;
            }
            match self.pop3_retrieve(&mut pop, *n, size).await? {
                Retrieved::Whole(raw) => {
                    batch.held += raw.len() as u64;
                    batch.items.push(Item {
                        uid: uidl.clone(),
                        raw,
                        received_at: None,
                        key: Some(key_of(uidl)),
                    });
                }
                Retrieved::Stored {
                    stored,
                    head,
                    error,
                } => {
                    let (facts, headers) =
                        blocking(move || guarded(|| (header_facts(&head), header_map_of(&head))))
                            .await?
                            .unwrap_or_default();
                    batch.dead.push(DeadItem {
                        key: key_of(uidl),
                        uid: uidl.clone(),
                        message_id: facts.message_id,
                        error,
                        stored,
                        headers: Some(headers),
                    });
                }
            }
            batch.members.push((*n, key_of(uidl)));
            if batch.members.len() >= BATCH || batch.held >= batch_bytes {
                self.pop3_flush(&mut pop, std::mem::take(&mut batch))
                    .await?;
            }
        }
        if !batch.members.is_empty() {
            self.pop3_flush(&mut pop, batch).await?;
        }
        if first_contact && !self.stopped() {
            self.record(&[], Some(&MailboxCursor::Pop3)).await?;
        }
        pop.quit().await?;
        Ok(())
    }

    /// Processes one POP3 batch and, with `delete_after_fetch`, deletes what it published or
    /// dead-lettered (the deletions take effect at QUIT).
    async fn pop3_flush(&self, pop: &mut Pop3, batch: Pop3Batch) -> Result<(), FetchError> {
        let handled = self
            .process(batch.items, batch.dead, None, Vec::new())
            .await?;
        if self.mailbox.delete_after_fetch {
            for (n, key) in &batch.members {
                if handled.contains(key) {
                    pop.dele(*n).await?;
                }
            }
        }
        Ok(())
    }

    /// `RETR n`, into memory when it is within `max_message_bytes` (and no line is longer
    /// than [`MAX_LINE`]); otherwise streamed into the attachment store, keeping only the
    /// start of its header.
    async fn pop3_retrieve(
        &self,
        pop: &mut Pop3,
        n: u32,
        size: u64,
    ) -> Result<Retrieved, FetchError> {
        let limit = self.max_message();
        let mut body = pop.retr(n).await?;
        // Grown by what arrives, not sized by what the server announced.
        let mut raw = Vec::with_capacity(usize::try_from(size.min(PIECE as u64)).unwrap_or(0));
        let long_line = if size > limit {
            false
        } else {
            loop {
                let more = body.read_into(&mut raw, PIECE).await?;
                if raw.len() as u64 > limit {
                    break false;
                }
                if body.longest_line() > MAX_LINE {
                    break true;
                }
                if !more {
                    return Ok(Retrieved::Whole(raw));
                }
            }
        };
        // Spill: what was read so far, then the rest piece by piece.
        let mut sink = RawSink::store(&self.store)?;
        let head = raw[..raw.len().min(HEADER_CAP)].to_vec();
        let mut head = if head.is_empty() { None } else { Some(head) };
        sink.push(&raw).await?;
        raw.clear();
        raw.shrink_to(PIECE);
        loop {
            let more = body.read_into(&mut raw, PIECE).await?;
            if head.is_none() {
                head = Some(raw[..raw.len().min(HEADER_CAP)].to_vec());
            }
            sink.push(&raw).await?;
            raw.clear();
            if !more {
                break;
            }
        }
        let stored = sink.finish().await?;
        let error = if long_line {
            format!(
                "the email has a line longer than {MAX_LINE} bytes; it was not published. Its bytes are stored (raw_id); replay it to publish it anyway"
            )
        } else {
            too_large(stored.size, limit)
        };
        Ok(Retrieved::Stored {
            stored,
            head: head.unwrap_or_default(),
            error,
        })
    }

    // ----------------------------------------------------------------------------------------
    // API sources (gmail_api, ms_graph): one loop for every `MailSource`

    async fn api(&mut self) -> Result<(), FetchError> {
        let mut source = ApiSource::of(&self.mailbox, &self.child.accounts)
            .ok_or_else(|| FetchError::Task("not an API mailbox".into()))??;
        loop {
            match &mut source {
                ApiSource::Gmail(s) => self.api_sync(s).await?,
                ApiSource::Graph(s) => self.api_sync(s).await?,
            }
            if self.stopped() {
                return Ok(());
            }
            self.last_sync = Some(rfc3339(time::OffsetDateTime::now_utc()));
            self.report_ok(false);
            self.pause(self.mailbox.poll_interval).await;
            if self.stopped() {
                return Ok(());
            }
        }
    }

    /// One walk from the stored cursor (or the first contact's `initial_sync`) to the cursor
    /// after it, each page's messages through [`Fetch::process`]; the cursor is stored once
    /// the whole walk is handled. An expired cursor lists the folder again from the floor the
    /// first contact set: the dedup keys skip what was published.
    async fn api_sync<S: MailSource>(&self, source: &mut S) -> Result<(), FetchError> {
        // The moment of first contact stays the same through retries of a first walk that
        // failed, so that mail arriving between them is not taken for old mail.
        let now = *self
            .first_contact
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(|| time::OffsetDateTime::now_utc().unix_timestamp());
        let start = match self.cursor().await? {
            Some(c @ (MailboxCursor::GmailApi { .. } | MailboxCursor::MsGraph { .. })) => {
                Start::Changes(c)
            }
            // None, or another protocol's position (the mailbox changed protocol, and what
            // the old one skipped was never recorded): a first contact, by `initial_sync`.
            _ => match self.mailbox.initial_sync {
                InitialSync::New => Start::Position { floor: Some(now) },
                InitialSync::All => Start::List { floor: None },
                InitialSync::Since(age) => Start::List {
                    floor: Some(now.saturating_sub(i64::try_from(age.as_secs()).unwrap_or(0))),
                },
            },
        };
        let floor = match &start {
            Start::Changes(
                MailboxCursor::GmailApi { floor, .. } | MailboxCursor::MsGraph { floor, .. },
            ) => *floor,
            Start::List { floor } | Start::Position { floor } => *floor,
            Start::Changes(_) => None,
        };
        let mut relisted = false;
        let mut pages = 0u32;
        source.begin(start);
        loop {
            if self.stopped() {
                return Ok(());
            }
            pages += 1;
            if pages > MAX_WALK_PAGES {
                return Err(FetchError::Source(SourceError::Answer {
                    endpoint: source.endpoint().to_string(),
                    detail: format!(
                        "the API answered more than {MAX_WALK_PAGES} pages in one walk (a next page that never ends); the walk starts over at the next sync"
                    ),
                }));
            }
            let page = match source.next_page().await {
                Ok(p) => p,
                Err(e @ SourceError::Expired { .. }) if !relisted => {
                    tracing::warn!(mailbox = %self.mailbox.id, error = %e,
                        "mailbox position expired: listing the folder again (already published mail is skipped)");
                    relisted = true;
                    source.begin(Start::List { floor });
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            self.api_fetch(source, page.messages).await?;
            if let Some(cursor) = page.end {
                if !self.stopped() {
                    self.record(&[], Some(&cursor)).await?;
                }
                return Ok(());
            }
        }
    }

    /// Downloads the messages of one page and processes them in batches bounded by count and
    /// `fetch_batch_bytes`; a message over `max_message_bytes` is streamed to the store and
    /// dead-lettered, as IMAP's are.
    async fn api_fetch<S: MailSource>(
        &self,
        source: &S,
        messages: Vec<MessageRef>,
    ) -> Result<(), FetchError> {
        if messages.is_empty() {
            return Ok(());
        }
        // Messages whose email was handled before (listed again) are not downloaded again.
        let id_keys: Vec<String> = messages.iter().map(|m| self.api_id_key(&m.id)).collect();
        let listed = self.known(&id_keys).await?;
        let batch_bytes = self.child.settings.inbound.fetch_batch_bytes;
        let mut items = Vec::new();
        let mut dead = Vec::new();
        let mut ids = Vec::new();
        let mut held = 0u64;
        for (m, id_key) in messages.into_iter().zip(id_keys) {
            if self.stopped() {
                break;
            }
            if listed.contains_key(&id_key) {
                continue;
            }
            let downloaded = match self.api_download(source, &m.id).await {
                Ok(d) => d,
                Err(e) => {
                    // What was downloaded before it is processed, whatever comes next.
                    if !items.is_empty() || !dead.is_empty() {
                        self.api_process(
                            std::mem::take(&mut items),
                            std::mem::take(&mut dead),
                            std::mem::take(&mut ids),
                        )
                        .await?;
                    }
                    match self.undownloadable(&m.id, &id_key, &e).await? {
                        true => continue,
                        false => return Err(e),
                    }
                }
            };
            match downloaded {
                None => {}
                Some(Retrieved::Whole(raw)) => {
                    held = held.saturating_add(raw.len() as u64);
                    ids.push(id_key);
                    items.push(Item {
                        uid: m.id,
                        raw,
                        received_at: m.received_at,
                        key: None,
                    });
                }
                Some(Retrieved::Stored {
                    stored,
                    head,
                    error,
                }) => {
                    let (facts, headers) =
                        blocking(move || guarded(|| (header_facts(&head), header_map_of(&head))))
                            .await?
                            .unwrap_or_default();
                    ids.push(id_key);
                    dead.push(DeadItem {
                        key: facts
                            .key
                            .clone()
                            .unwrap_or_else(|| format!("sha256:{}", stored.id)),
                        uid: m.id,
                        message_id: facts.message_id,
                        error,
                        stored,
                        headers: Some(headers),
                    });
                }
            }
            if items.len() + dead.len() >= BATCH || held >= batch_bytes {
                self.api_process(
                    std::mem::take(&mut items),
                    std::mem::take(&mut dead),
                    std::mem::take(&mut ids),
                )
                .await?;
                held = 0;
            }
        }
        if !items.is_empty() || !dead.is_empty() {
            self.api_process(items, dead, ids).await?;
        }
        Ok(())
    }

    /// A download of API message `id` failed with `e`. A failure about the message itself (the
    /// API refuses or cannot convert it, its bytes do not decode) repeated `DOWNLOAD_TRIES`
    /// times dead-letters it — the DLQ entry holds the error, and no bytes — so the mailbox
    /// moves on; returns whether it did. Throttling, outages and credentials are the
    /// mailbox's failures: they stop the walk, to be tried again.
    async fn undownloadable(
        &self,
        id: &str,
        id_key: &str,
        e: &FetchError,
    ) -> Result<bool, FetchError> {
        let about_the_message = match e {
            FetchError::Source(SourceError::Answer { .. }) => true,
            // A 4xx about the request (not credentials, not throttling), or Graph's answer
            // for an item it cannot give as MIME; other 5xx are outages.
            FetchError::Source(SourceError::Http { status, text, .. }) => {
                ((400..500).contains(status) && !matches!(status, 401 | 403 | 408 | 429))
                    || text.contains("ErrorMimeContentConversionFailed")
            }
            _ => false,
        };
        if !about_the_message {
            return Ok(false);
        }
        let tries = {
            let mut f = self
                .download_failures
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let n = f.entry(id.to_string()).or_insert(0);
            *n += 1;
            *n
        };
        tracing::warn!(mailbox = %self.mailbox.id, try_number = tries, error = %e,
            "an API message could not be downloaded");
        if tries < DOWNLOAD_TRIES {
            return Ok(false);
        }
        let store = self.store.clone();
        let stored = blocking(move || {
            store
                .store(b"")
                .map(|id| crate::attachments::StoredRaw { id, size: 0 })
        })
        .await?
        .map_err(FetchError::from)?;
        let dead = DeadItem {
            key: id_key.to_string(),
            uid: id.to_string(),
            message_id: None,
            error: format!("cannot be downloaded ({DOWNLOAD_TRIES} tries): {e}"),
            stored,
            headers: None,
        };
        self.process(Vec::new(), vec![dead], None, Vec::new())
            .await?;
        self.download_failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        Ok(true)
    }

    /// [`Fetch::process`], then the batch's API ids recorded `listed` — only once every email
    /// of it is recorded (not when the fetcher was stopped halfway).
    async fn api_process(
        &self,
        items: Vec<Item>,
        dead: Vec<DeadItem>,
        id_keys: Vec<String>,
    ) -> Result<(), FetchError> {
        let listed: Vec<Record> = id_keys
            .into_iter()
            .map(|k| Record::new(k, Outcome::Listed))
            .collect();
        self.process(items, dead, None, listed).await?;
        Ok(())
    }

    /// The key of an API message id: readable when the id is plain, else hashed (ids come
    /// from outside and reach PostgreSQL).
    fn api_id_key(&self, id: &str) -> String {
        let plain = id.len() <= 512
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_=+/.".contains(&b));
        if plain {
            format!("{}-id:{id}", self.source())
        } else {
            format!("{}-idh:{}", self.source(), sha256_hex(id.as_bytes()))
        }
    }

    /// One message's bytes: in memory up to `max_message_bytes`, else streamed into the
    /// attachment store keeping the start of its header; None when it is gone.
    async fn api_download<S: MailSource>(
        &self,
        source: &S,
        id: &str,
    ) -> Result<Option<Retrieved>, FetchError> {
        let limit = self.max_message();
        let endpoint = source.endpoint().to_string();
        let mut download = source.download(id).await?;
        if matches!(download, Download::Gone) {
            return Ok(None);
        }
        let mut raw: Vec<u8> = Vec::new();
        loop {
            match download.chunk(&endpoint).await? {
                Some(piece) => {
                    raw.extend_from_slice(&piece);
                    if raw.len() as u64 > limit {
                        break;
                    }
                }
                None => return Ok(Some(Retrieved::Whole(raw))),
            }
        }
        let head = raw[..raw.len().min(HEADER_CAP)].to_vec();
        let mut sink = RawSink::store(&self.store)?;
        let mut kept = raw.len() as u64;
        sink.push(&raw).await?;
        drop(raw);
        // An API does not say the size first: what it sends is kept up to a bound (an endless
        // answer must not fill the disk) — four times the limit, at least 1 GiB.
        let cap = limit.saturating_mul(4).max(1 << 30);
        let mut size = kept;
        while let Some(piece) = download.chunk(&endpoint).await? {
            size = size.saturating_add(piece.len() as u64);
            let take = piece.len().min(cap.saturating_sub(kept) as usize);
            sink.push(&piece[..take]).await?;
            kept += take as u64;
            if size > cap {
                break;
            }
        }
        let stored = sink.finish().await?;
        let mut error = too_large(size, limit);
        if size > kept {
            error.push_str(&format!(
                "; only its first {kept} bytes were kept (the API sent {size} or more)"
            ));
        }
        Ok(Some(Retrieved::Stored {
            error,
            stored,
            head,
        }))
    }

    // ----------------------------------------------------------------------------------------
    // One batch: prepare, publish, dead-letter, record

    /// Processes one batch; returns the keys now recorded for it (published, dead-lettered or
    /// known before). When the fetcher is stopped before every email is published, what was
    /// published is recorded and the position is left where it was.
    ///
    /// `listed` (an API batch's message ids) is recorded with the batch's emails, in the same
    /// transaction, when every email of it is — never one without the other.
    async fn process(
        &self,
        items: Vec<Item>,
        mut dead: Vec<DeadItem>,
        cursor: Option<MailboxCursor>,
        listed: Vec<Record>,
    ) -> Result<HashSet<String>, FetchError> {
        let fetched = (items.len() + dead.len()) as u64;
        let mailbox = self.mailbox.clone();
        let store = self.store.clone();
        let limit = self.max_message();

        // 1. Keys and reply candidates, from the headers (off the actors' thread).
        let keyed: Vec<(Item, crate::inbound::HeaderFacts)> =
            blocking(move || {
                items
                    .into_iter()
                    .map(|mut item| {
                        let facts = guarded(|| header_facts(&item.raw)).unwrap_or_default();
                        if item.key.is_none() {
                            item.key =
                                Some(facts.key.clone().unwrap_or_else(|| {
                                    format!("sha256:{}", sha256_hex(&item.raw))
                                }));
                        }
                        (item, facts)
                    })
                    .collect()
            })
            .await?;
        let mut keys: Vec<String> = keyed.iter().filter_map(|(i, _)| i.key.clone()).collect();
        keys.extend(dead.iter().map(|d| d.key.clone()));
        let known = self.known(&keys).await?;
        let mut handled: HashSet<String> = known.keys().cloned().collect();
        let mut seen = HashSet::new();
        let fresh: Vec<(Item, crate::inbound::HeaderFacts)> = keyed
            .into_iter()
            .filter(|(i, _)| {
                let k = i.key.clone().unwrap_or_default();
                !known.contains_key(&k) && seen.insert(k)
            })
            .collect();
        dead.retain(|d| !known.contains_key(&d.key) && seen.insert(d.key.clone()));
        let candidates: Vec<String> = fresh
            .iter()
            .flat_map(|(_, f)| f.reply_candidates.iter().cloned())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let pool = &self.child.pool;
        let tenant = &self.mailbox.tenant_id;
        let replies = self
            .db("matching replies", || {
                intake::reply_matches(pool, tenant, &candidates)
            })
            .await?;

        // 2. Parse, store attachments, encode; a message that is not an email (or too
        // large after all: the server said less) is stored raw for the DLQ.
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let source = self.source();
        let prepared: Vec<(Item, Result<Prepared, DeadItem>)> = blocking(move || {
            let mut out = Vec::with_capacity(fresh.len());
            for (item, facts) in fresh {
                let key = item.key.clone().unwrap_or_default();
                let dead = |error: String, headers| -> Result<DeadItem, AttachmentError> {
                    Ok(DeadItem {
                        key: key.clone(),
                        uid: item.uid.clone(),
                        message_id: facts.message_id.clone(),
                        error,
                        stored: store.store_durably(&item.raw)?,
                        headers,
                    })
                };
                if item.raw.len() as u64 > limit {
                    let head = &item.raw[..item.raw.len().min(HEADER_CAP)];
                    let headers = guarded(|| header_map_of(head)).unwrap_or_default();
                    let d = dead(too_large(item.raw.len() as u64, limit), Some(headers))?;
                    out.push((item, Err(d)));
                    continue;
                }
                let origin = Origin {
                    tenant_id: &mailbox.tenant_id,
                    provider_id: &mailbox.provider_id,
                    mailbox_id: &mailbox.id,
                    user_id: &mailbox.user_id,
                    source,
                    received_at: item.received_at,
                };
                match intake::prepare(&item.raw, &origin, &store, &replies, now) {
                    Ok(p) => out.push((item, Ok(p))),
                    Err(e) if e.is_the_emails() => {
                        let d = dead(e.to_string(), None)?;
                        out.push((item, Err(d)));
                    }
                    Err(intake::PrepareError::Store(e)) => return Err(e),
                    Err(e) => {
                        return Err(AttachmentError::Io {
                            path: String::new(),
                            source: std::io::Error::other(e.to_string()),
                        })
                    }
                }
            }
            Ok(out)
        })
        .await??;
        let mut ready: Vec<(Item, Prepared)> = Vec::new();
        for (item, p) in prepared {
            match p {
                Ok(p) => ready.push((item, p)),
                Err(d) => dead.push(d),
            }
        }

        // 3. Publish (confirmed); refused emails join the dead ones.
        let mut rows: Vec<Record> = Vec::new();
        let outcome = self.publish_all(&ready).await;
        for &i in &outcome.published {
            if let Some((item, p)) = ready.get(i) {
                rows.push(Record {
                    message_id: Some(p.message_id.clone()),
                    ..Record::new(item.key.clone().unwrap_or_default(), Outcome::Published)
                });
            }
        }
        let published = rows.len() as u64;
        if !outcome.refused.is_empty() {
            let mut refused: Vec<(Item, String, String)> = Vec::new();
            let mut by_index: HashMap<usize, PublishError> = outcome.refused.into_iter().collect();
            for (i, (item, p)) in ready.into_iter().enumerate() {
                if let Some(e) = by_index.remove(&i) {
                    refused.push((
                        item,
                        p.message_id,
                        format!("the broker refused to take the email: {e}"),
                    ));
                }
            }
            let store = self.store.clone();
            let stored = blocking(move || {
                refused
                    .into_iter()
                    .map(|(item, id, error)| {
                        Ok(DeadItem {
                            key: item.key.unwrap_or_default(),
                            stored: store.store_durably(&item.raw)?,
                            uid: item.uid,
                            message_id: Some(id),
                            error,
                            headers: None,
                        })
                    })
                    .collect::<Result<Vec<_>, AttachmentError>>()
            })
            .await?;
            match stored {
                Ok(d) => dead.extend(d),
                Err(e) => {
                    self.record(&rows, None).await?;
                    return Err(e.into());
                }
            }
        }

        // 4. Dead letters (confirmed), then everything recorded together.
        let all_done = outcome.unpublished == 0;
        if let Err(e) = self.dead_letter(&dead).await {
            self.record(&rows, None).await?;
            return Err(e);
        }
        for d in &dead {
            rows.push(Record {
                message_id: d.message_id.clone(),
                raw_id: Some(d.stored.id.clone()),
                error: Some(d.error.clone()),
                ..Record::new(d.key.clone(), Outcome::DeadLettered)
            });
        }
        let handled_now: Vec<String> = rows.iter().map(|r| r.key.clone()).collect();
        if all_done {
            rows.extend(listed);
        }
        self.record(&rows, cursor.as_ref().filter(|_| all_done))
            .await?;
        handled.extend(handled_now);

        let metrics = &self.child.metrics;
        metrics.do_send(Count {
            name: "mailbridge_inbound_fetched_total",
            labels: self.labels(),
            by: fetched,
        });
        if published > 0 {
            metrics.do_send(Count {
                name: "mailbridge_inbound_published_total",
                labels: self.labels(),
                by: published,
            });
            tracing::info!(mailbox = %self.mailbox.id, published, "published inbound email");
        }
        // Not all published means the fetcher was stopped while retrying: the rest stays
        // unrecorded (and the position where it was) for the next run.
        Ok(handled)
    }

    /// Publishes every prepared email, each confirmed, on this mailbox's lane. Refusals are
    /// final for their email; failures of the channel or connection are retried (backoff up
    /// to 30 s) until they pass or the fetcher is stopped.
    async fn publish_all(&self, ready: &[(Item, Prepared)]) -> Published {
        let lane = lane_of(&self.mailbox.id);
        let queue = &self.child.settings.queues.inbound;
        let publish = |i: usize| {
            let publisher = self.publisher.clone();
            let p = ready.get(i).map(|(_, p)| p);
            async move {
                let Some(p) = p else {
                    return Ok(());
                };
                let props = BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type("application/json".into())
                    .with_message_id(short_string(&p.message_id));
                publisher.publish(lane, queue, &p.body, props).await
            }
        };
        let mut out = Published::default();
        let mut todo: Vec<usize> = (0..ready.len()).collect();
        let mut attempt = 0u32;
        while !todo.is_empty() {
            let round = publish_round(&todo, publish).await;
            out.published.extend(round.published);
            out.refused.extend(round.refused);
            todo = round.failed.iter().map(|(i, _)| *i).collect();
            if let Some((_, e)) = round.failed.first() {
                if self.stopped() {
                    break;
                }
                let delay = backoff(attempt, RETRY_MAX);
                attempt += 1;
                tracing::warn!(mailbox = %self.mailbox.id, error = %e, unpublished = todo.len(), retry_in = ?delay,
                    "publishing inbound email failed; retrying");
                self.retry_pause(delay).await;
            }
        }
        out.unpublished = todo.len();
        out
    }

    /// Puts every dead item on the inbound DLQ, each confirmed by the broker.
    async fn dead_letter(&self, dead: &[DeadItem]) -> Result<(), FetchError> {
        if dead.is_empty() {
            return Ok(());
        }
        let dlq = self
            .child
            .supervisor
            .send(FindChild::<DeadLetterActor>::named(DLQ_CHILD))
            .await
            .ok()
            .flatten()
            .ok_or_else(|| FetchError::DeadLetter("the DLQ actor is not running".into()))?;
        let now = time::OffsetDateTime::now_utc();
        let queue = self.child.settings.queues.inbound_dlq();
        let sends = dead.iter().map(|d| {
            tracing::warn!(mailbox = %self.mailbox.id, uid = %d.uid, key = %d.key, error = %d.error, raw_id = %d.stored.id, "inbound email dead-lettered");
            let entry = DeadLetterEntry {
                message_id: d.message_id.clone(),
                tenant_id: Some(self.mailbox.tenant_id.clone()),
                error: d.error.clone(),
                error_class: "permanent".into(),
                failed_at: rfc3339(now),
                mailbox_id: Some(self.mailbox.id.clone()),
                uid: Some(d.uid.clone()),
                dedup_key: Some(d.key.clone()),
                raw_id: Some(d.stored.id.clone()),
                raw_url: Some(self.store.link(
                    &d.stored.id,
                    &format!("{}-{}.eml", self.mailbox.id, d.uid),
                    "message/rfc822",
                    now.unix_timestamp(),
                )),
                size: Some(d.stored.size),
                headers: d.headers.clone(),
                ..DeadLetterEntry::default()
            };
            dlq.send(DeadLetter {
                queue: queue.clone(),
                entry,
                body: None,
                keep_whole: 0,
            })
        });
        for r in futures_util::future::join_all(sends).await {
            r.map_err(|e| FetchError::DeadLetter(e.to_string()))?
                .map_err(|e| FetchError::DeadLetter(e.to_string()))?;
        }
        Ok(())
    }
}

/// What [`Fetch::publish_all`] did, by index into the batch.
#[derive(Debug, Default)]
struct Published {
    published: Vec<usize>,
    refused: Vec<(usize, PublishError)>,
    /// Neither published nor refused: the fetcher was stopped while retrying.
    unpublished: usize,
}

/// POP3 messages read and not yet processed: (message number, key) of each, and the bytes held.
#[derive(Default)]
struct Pop3Batch {
    items: Vec<Item>,
    dead: Vec<DeadItem>,
    members: Vec<(u32, String)>,
    held: u64,
}

/// A POP3 message as read: whole in memory, or stored (too large, or a line too long).
enum Retrieved {
    Whole(Vec<u8>),
    Stored {
        stored: StoredRaw,
        head: Vec<u8>,
        error: String,
    },
}

fn too_large(size: u64, limit: u64) -> String {
    format!(
        "the email is {size} bytes, more than [inbound] max_message_bytes ({limit}); it was not published. Its bytes are stored (raw_id); raise the limit and replay it to publish it"
    )
}

fn month_abbrev(m: time::Month) -> &'static str {
    use time::Month::*;
    match m {
        January => "Jan",
        February => "Feb",
        March => "Mar",
        April => "Apr",
        May => "May",
        June => "Jun",
        July => "Jul",
        August => "Aug",
        September => "Sep",
        October => "Oct",
        November => "Nov",
        December => "Dec",
    }
}

/// Where the pieces of an email too large for memory go: the attachment store (hashed as
/// written), or only a hash. Pieces are gathered to [`PIECE`] and written on the blocking
/// pool.
struct RawSink {
    target: SinkTarget,
    buf: Vec<u8>,
}

enum SinkTarget {
    Store(Option<RawWriter>),
    Hash(aws_lc_rs::digest::Context, u64),
}

impl RawSink {
    fn store(store: &AttachmentStore) -> Result<Self, FetchError> {
        Ok(Self {
            target: SinkTarget::Store(Some(store.writer()?)),
            buf: Vec::new(),
        })
    }

    fn hash() -> Self {
        Self {
            target: SinkTarget::Hash(
                aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256),
                0,
            ),
            buf: Vec::new(),
        }
    }

    async fn push(&mut self, bytes: &[u8]) -> Result<(), FetchError> {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() >= PIECE {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), FetchError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        match &mut self.target {
            SinkTarget::Store(slot) => {
                let Some(mut writer) = slot.take() else {
                    return Err(FetchError::Task("the raw writer is gone".into()));
                };
                let data = std::mem::take(&mut self.buf);
                let (writer, mut data) = blocking(move || {
                    let r = writer.write(&data);
                    r.map(|()| (writer, data))
                })
                .await??;
                data.clear();
                *slot = Some(writer);
                self.buf = data;
            }
            SinkTarget::Hash(ctx, size) => {
                ctx.update(&self.buf);
                *size += self.buf.len() as u64;
                self.buf.clear();
            }
        }
        Ok(())
    }

    async fn finish(mut self) -> Result<StoredRaw, FetchError> {
        self.flush().await?;
        match self.target {
            SinkTarget::Store(slot) => {
                let writer =
                    slot.ok_or_else(|| FetchError::Task("the raw writer is gone".into()))?;
                Ok(blocking(move || writer.finish()).await??)
            }
            SinkTarget::Hash(ctx, size) => Ok(StoredRaw {
                id: ctx
                    .finish()
                    .as_ref()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect(),
                size,
            }),
        }
    }
}

pub struct MailboxFetcher {
    mailbox: Mailbox,
    child: ChildContext,
    wake: Arc<Notify>,
    stop: watch::Sender<bool>,
    done: Vec<oneshot::Sender<()>>,
}

impl MailboxFetcher {
    pub fn new(mailbox: Mailbox, child: ChildContext) -> Self {
        Self {
            mailbox,
            child,
            wake: Arc::new(Notify::new()),
            stop: watch::channel(false).0,
            done: Vec::new(),
        }
    }
}

impl Actor for MailboxFetcher {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let publisher = self.child.publisher.clone();
        let settings = self.child.settings.clone();
        let setup = async move {
            let ch = publisher.ok_or_else(|| "not connected to RabbitMQ".to_string())?;
            let store =
                AttachmentStore::for_settings(&settings.attachments).map_err(|e| e.to_string())?;
            Ok::<_, String>((ch, store))
        };
        ctx.wait(setup.into_actor(self).map(|res, act, ctx| match res {
            Ok((publisher, store)) => {
                let fetch = Fetch {
                    mailbox: Arc::new(act.mailbox.clone()),
                    child: act.child.clone(),
                    publisher: publisher.clone(),
                    store: Arc::new(store),
                    wake: act.wake.clone(),
                    stop: act.stop.subscribe(),
                    last_sync: None,
                    download_failures: std::sync::Mutex::new(HashMap::new()),
                    first_contact: std::sync::Mutex::new(None),
                };
                ctx.spawn(fetch.run().into_actor(act).map(move |_, act, ctx| {
                    for d in act.done.drain(..) {
                        let _ = d.send(());
                    }
                    ctx.stop();
                }));
            }
            Err(e) => {
                tracing::warn!(mailbox = %act.mailbox.id, error = %e, "cannot start the mailbox fetcher");
                ctx.stop();
            }
        }));
    }
}

/// Sync now, whatever the poll interval (an `email.sync.user` request).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct SyncNow;

impl Handler<SyncNow> for MailboxFetcher {
    type Result = ();
    fn handle(&mut self, _: SyncNow, _: &mut Context<Self>) {
        self.wake.notify_one();
    }
}

impl Handler<Drain> for MailboxFetcher {
    type Result = ResponseFuture<()>;

    /// Finishes the batch in hand (published and recorded), then stops.
    fn handle(&mut self, _: Drain, _: &mut Context<Self>) -> Self::Result {
        let _ = self.stop.send(true);
        let (tx, rx) = oneshot::channel();
        self.done.push(tx);
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn groups_are_bounded_by_bytes_and_count_and_large_ones_stand_alone() {
        let sizes: Vec<(u32, u64)> = vec![(1, 10), (2, 10), (3, 500), (4, 10), (5, 10), (6, 10)];
        assert_eq!(
            plan_groups(&sizes, 100, 25, 200),
            vec![
                Group::Bodies(vec![(1, 10), (2, 10)]),
                Group::Oversized(3, 500),
                Group::Bodies(vec![(4, 10), (5, 10)]),
                Group::Bodies(vec![(6, 10)]),
            ]
        );
        // A message larger than a batch but within the limit is a batch of its own.
        assert_eq!(
            plan_groups(&[(1u32, 5), (2, 60), (3, 5)], 100, 25, 200),
            vec![
                Group::Bodies(vec![(1, 5)]),
                Group::Bodies(vec![(2, 60)]),
                Group::Bodies(vec![(3, 5)]),
            ]
        );
        let many: Vec<(u32, u64)> = (1..=450).map(|u| (u, 1)).collect();
        let groups = plan_groups(&many, 100, 1 << 30, 200);
        assert_eq!(groups.len(), 3);
        assert!(plan_groups::<u32>(&[], 1, 1, 1).is_empty());
    }

    #[test]
    fn uid_sets_compress_runs() {
        assert_eq!(uid_set(&[1, 2, 3, 5, 7, 8]), "1:3,5,7:8");
        assert_eq!(uid_set(&[4]), "4");
        assert_eq!(
            uid_set(&[u32::MAX - 1, u32::MAX]),
            format!("{}:{}", u32::MAX - 1, u32::MAX)
        );
    }

    fn refused() -> PublishError {
        PublishError::Refused {
            queue: "q".into(),
            reason: "PRECONDITION_FAILED - message size exceeds the limit".into(),
        }
    }

    /// A broker that closes the channel when `culprit` reaches it: every publish still
    /// unconfirmed on that channel then fails with the same 406, and the next publish opens
    /// a new channel.
    #[tokio::test]
    async fn a_channel_closed_over_one_email_costs_only_that_email() {
        let culprit = 3usize;
        let channel = Cell::new(0u32);
        let closed = Cell::new(None::<u32>);
        let publish = |i: usize| {
            if closed.get() == Some(channel.get()) {
                channel.set(channel.get() + 1);
            }
            let on = channel.get();
            let closed = &closed;
            async move {
                tokio::task::yield_now().await;
                if closed.get() == Some(on) {
                    Err(refused())
                } else if i == culprit {
                    closed.set(Some(on));
                    Err(refused())
                } else {
                    Ok(())
                }
            }
        };
        let todo: Vec<usize> = (0..6).collect();
        let round = publish_round(&todo, publish).await;
        assert_eq!(
            round.refused.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            [culprit]
        );
        let mut published = round.published.clone();
        published.sort_unstable();
        assert_eq!(published, [0, 1, 2, 4, 5]);
        assert!(round.failed.is_empty());
    }

    #[tokio::test]
    async fn nacks_are_final_and_channel_failures_are_for_later() {
        let round = publish_round(&[0, 1, 2], |i| async move {
            match i {
                0 => Ok(()),
                1 => Err(PublishError::Nacked { queue: "q".into() }),
                _ => Err(PublishError::Channel("connection reset".into())),
            }
        })
        .await;
        assert_eq!(round.published, [0]);
        assert_eq!(round.refused.len(), 1);
        assert_eq!(
            round.failed.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            [2]
        );
        // Alone, a 406 is that email's.
        let round = publish_round(&[7], |_| async { Err(refused()) }).await;
        assert_eq!(round.refused.len(), 1);
    }
}
