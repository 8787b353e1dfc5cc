//! A mailbox fetcher: one per configured mailbox, syncing it through its `sources::MailSource`
//! (IMAP — IDLE when the server has it and `idle = true`, else polling —, POP3, or an HTTP
//! API: `gmail_api`, `ms_graph`) with one walk for every source, and putting every email in
//! exactly one visible place: published once on the inbound queue, or on the inbound DLQ with
//! its raw bytes stored so it can be recovered (`mailbridge dlq replay`).
//!
//! Exactly once: each email has a dedup key (its Message-ID, else a hash of its bytes; for
//! POP3 its UIDL). A batch is published with publisher confirms; only then are its keys, what
//! became of each, and the mailbox position (`intake::MailboxCursor`: IMAP's UIDVALIDITY and
//! last UID after each batch; an API's history id or delta link after its whole walk)
//! committed together in PostgreSQL — retried through a database outage, so a hiccup after
//! the confirms does not publish the batch again. Keys already recorded are skipped, so a
//! restart, a re-sync, or a UIDVALIDITY change publishes nothing twice.
//!
//! One email never fails or repeats its batch: one that does not parse, is larger than
//! `[inbound] max_message_bytes`, or is refused by the broker goes to the DLQ and the batch
//! goes on; a broker that closes the channel over one email has the rest re-published one at
//! a time to find it. Parsing, storing attachments and encoding run on the blocking pool, so a
//! huge or pathological email does not stall the actors' thread.
//!
//! Pipelined in three stages: while one batch is fetched, the one before it is keyed and
//! prepared (parsed, attachments stored, encoded) and the one before that is published and
//! recorded; batches are still published and their positions committed in order.
//!
//! Memory is bounded by bytes: a page's messages are fetched in groups of at most
//! `[inbound] fetch_batch_bytes` (and 200 messages) by the sizes the listing announces, a
//! fetch stops once the bytes that arrived reach that budget (so at most three budgets are
//! held: the batch being published, the one being prepared and the one being fetched), and a
//! larger email is streamed into the attachment store a piece at a time.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use lapin::BasicProperties;
use tokio::sync::{oneshot, watch, Notify};

use crate::actors::dlq::{DeadLetter, DeadLetterActor};
use crate::actors::metrics::{Count, ReportHealth};
use crate::actors::supervisor::{backoff, ChildContext, ChildId, Drain, FindChild};
use crate::amqp::{lane_of, short_string, PublishError, Publisher};
use crate::attachments::{AttachmentError, AttachmentStore, Staged, StoredRaw};
use crate::credentials::{Credential, CredentialError};
use crate::domain::{ComponentHealth, ComponentId, DeadLetterEntry};
use crate::inbound::{header_facts, header_map_of, sha256_hex, Origin};
use crate::intake::{self, guarded, MailboxCursor, Outcome, Prepared, Record};
use crate::mailproto::{endpoint, MailboxError};
use crate::outbound::rfc3339;
use crate::settings::{InitialSync, MailProtocol, Mailbox};
use crate::sources::imap::ImapSource;
use crate::sources::pop3::Pop3Source;
use crate::sources::{
    blocking, too_large, ApiSource, Got, MailSource, MessageRef, Page, RawSink, Retrieved,
    SourceError, Spill, Start, HEADER_CAP,
};
use crate::storage::StorageError;

/// At most this many messages per fetch and per published batch.
const BATCH: usize = 200;
/// Longest IDLE before it is renewed (servers drop IDLE after 30 min).
const IDLE_MAX: Duration = Duration::from_secs(25 * 60);
/// The longest wait between retries of a publish or a database write.
const RETRY_MAX: Duration = Duration::from_secs(30);

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
    Source(SourceError),
    #[error("a blocking task failed: {0}")]
    Task(String),
}

impl From<SourceError> for FetchError {
    /// A session's and the store's failures keep their own kinds.
    fn from(e: SourceError) -> Self {
        match e {
            SourceError::Mailbox(m) => FetchError::Mailbox(m),
            SourceError::Store(s) => FetchError::Store(s),
            SourceError::Task(t) => FetchError::Task(t),
            other => FetchError::Source(other),
        }
    }
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

/// What one round of publishing did with each email (by index).
#[derive(Debug, Default, PartialEq)]
struct Round {
    published: Vec<usize>,
    /// The broker refused these and will refuse them again.
    refused: Vec<(usize, PublishError)>,
    /// Not published for a reason that can pass (channel or connection lost).
    failed: Vec<(usize, PublishError)>,
}

/// What one fetch got from its messages (`refs`, in the order it tried them), and the
/// position after them: processed as one batch.
struct Batch<'r> {
    refs: Vec<&'r MessageRef>,
    got: Vec<Got>,
    cursor: Option<MailboxCursor>,
}

/// A batch after its first stage: every email's dedup key read from its headers.
struct Keyed {
    keyed: Vec<(Item, crate::inbound::HeaderFacts)>,
    dead: Vec<DeadItem>,
    cursor: Option<MailboxCursor>,
    listed: Vec<Record>,
    fetched: u64,
}

impl Keyed {
    /// Whether one of its keys is in `busy` (the keys the batch being published will
    /// record): then it is prepared only after that batch is recorded, so that its lookup of
    /// known keys sees them and a key is never published twice.
    fn shares_keys(&self, busy: &HashSet<String>) -> bool {
        !busy.is_empty()
            && self
                .keyed
                .iter()
                .filter_map(|(i, _)| i.key.as_ref())
                .chain(self.dead.iter().map(|d| &d.key))
                .any(|k| busy.contains(k))
    }
}

/// A batch after its second stage: the known emails left out (`handled`), the rest parsed,
/// their attachments stored, encoded — ready to publish.
struct Ready {
    ready: Vec<(Item, Prepared)>,
    dead: Vec<DeadItem>,
    handled: HashSet<String>,
    cursor: Option<MailboxCursor>,
    listed: Vec<Record>,
    fetched: u64,
}

impl Ready {
    /// The keys its last stage records (beside those recorded already).
    fn keys(&self) -> HashSet<String> {
        self.ready
            .iter()
            .filter_map(|(i, _)| i.key.clone())
            .chain(self.dead.iter().map(|d| d.key.clone()))
            .collect()
    }
}

/// A batch between stages, with the messages it came from (told to the source once they are
/// recorded).
struct Staging<'r, T> {
    refs: Vec<&'r MessageRef>,
    batch: T,
}

/// The `listed` keys (an API's message ids) of `refs`, recorded with their batch.
fn listed_of(refs: &[&MessageRef]) -> Vec<Record> {
    refs.iter()
        .filter_map(|m| m.listed.clone())
        .map(|k| Record::new(k, Outcome::Listed))
        .collect()
}

/// Which of `refs` are recorded, by their keys in `handled`.
fn handled_refs<'r>(refs: &[&'r MessageRef], handled: &HashSet<String>) -> Vec<&'r MessageRef> {
    refs.iter()
        .copied()
        .filter(|m| m.key.as_ref().is_some_and(|k| handled.contains(k)))
        .collect()
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

    /// Logins per second to this mailbox's host.
    fn connect_rate(&self) -> f64 {
        self.mailbox
            .connect_rate_per_host
            .unwrap_or(self.child.settings.inbound.connect_rate_per_host)
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

    /// Waits until the fetcher is asked to stop.
    async fn wait_for_stop(&self) {
        let mut stop = self.stop.clone();
        while !*stop.borrow() {
            if stop.changed().await.is_err() {
                break;
            }
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
            let result = self.open_and_serve().await;
            if let Err(e) = result {
                if self.stopped() {
                    tracing::info!(tenant_id = %self.mailbox.tenant_id, mailbox_id = %self.mailbox.id, error = %e, "mailbox fetcher stopped");
                    break;
                }
                if matches!(e, FetchError::Storage(StorageError::Fenced(_))) {
                    // Another instance holds the mailbox now: the supervisor stops this
                    // fetcher when it learns so at its next lease round.
                    tracing::warn!(tenant_id = %self.mailbox.tenant_id, mailbox_id = %self.mailbox.id, error = %e, "mailbox lease lost");
                    self.wait_for_stop().await;
                    break;
                }
                if e.is_reauthorize() {
                    // Permanent until a user authorizes the account again, which changes the
                    // configuration and so restarts this fetcher: no polling until then.
                    tracing::warn!(tenant_id = %self.mailbox.tenant_id, mailbox_id = %self.mailbox.id, error = %e, "mailbox stopped: its OAuth2 account must be re-authorized");
                    self.report(
                        ComponentHealth::down(e.to_string())
                            .with("connected", false)
                            .with("idling", false),
                    );
                    self.wait_for_stop().await;
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
                    tracing::warn!(tenant_id = %self.mailbox.tenant_id, mailbox_id = %self.mailbox.id, user = %self.mailbox.username, error = %e, retry_in = ?delay, "mailbox login failed");
                } else {
                    tracing::warn!(tenant_id = %self.mailbox.tenant_id, mailbox_id = %self.mailbox.id, error = %e, retry_in = ?delay, "mailbox sync failed");
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

    /// Opens the mailbox's source and syncs it until stopped or failed.
    async fn open_and_serve(&mut self) -> Result<(), FetchError> {
        match self.mailbox.protocol {
            MailProtocol::Imap => {
                let credential = self.mailbox.oauth2.as_ref().map(|o| {
                    Credential::OAuth2(self.child.accounts.for_mailbox(&self.mailbox.id, o))
                });
                self.child
                    .pacer
                    .wait(&self.mailbox.host, self.connect_rate())
                    .await;
                let source =
                    ImapSource::open(self.mailbox.clone(), credential, self.max_message()).await?;
                self.serve(source).await
            }
            MailProtocol::Pop3 => {
                let source = Pop3Source::new(
                    self.mailbox.clone(),
                    self.child.pacer.clone(),
                    self.connect_rate(),
                );
                self.serve(source).await
            }
            MailProtocol::GmailApi | MailProtocol::MsGraph => {
                let source = ApiSource::of(&self.mailbox, &self.child.accounts)
                    .ok_or_else(|| FetchError::Task("not an API mailbox".into()))??;
                self.serve(source).await
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
                    tracing::warn!(tenant_id = %self.mailbox.tenant_id, mailbox_id = %self.mailbox.id, error = %e, retry_in = ?delay, "{what}: database unavailable, retrying");
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
            intake::record(pool, id, rows, cursor, self.child.lease.as_ref())
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
    // Every source: one loop, one walk

    /// Syncs `source` until stopped: a walk, then IDLE when it can, else a pause of
    /// `poll_interval`.
    async fn serve<S: MailSource>(&mut self, mut source: S) -> Result<(), FetchError> {
        loop {
            source.connect().await?;
            tracing::debug!(tenant_id = %self.mailbox.tenant_id, mailbox_id = %self.mailbox.id, "connected to the mailbox");
            self.walk(&mut source).await?;
            source.end().await?;
            if self.stopped() {
                source.close().await;
                return Ok(());
            }
            self.last_sync = Some(rfc3339(time::OffsetDateTime::now_utc()));
            if self.mailbox.idle && source.can_idle() {
                self.report_ok(true);
                let wait = self.mailbox.poll_interval.min(IDLE_MAX);
                let wake = self.wake.clone();
                let mut stop = self.stop.clone();
                let interrupt = async move {
                    tokio::select! {
                        _ = wake.notified() => {}
                        _ = stop.changed() => {}
                    }
                };
                source.idle(wait, interrupt).await?;
            } else {
                self.report_ok(false);
                self.pause(self.mailbox.poll_interval).await;
            }
            if self.stopped() {
                source.close().await;
                return Ok(());
            }
        }
    }

    /// One walk from the stored cursor (or the first contact's `initial_sync`) to the cursor
    /// after it, page by page. An expired cursor lists the folder again from the floor the
    /// first contact set: the dedup keys skip what was published.
    async fn walk<S: MailSource>(&self, source: &mut S) -> Result<(), FetchError> {
        // The moment of first contact stays the same through retries of a first walk that
        // failed, so that mail arriving between them is not taken for old mail.
        let now = *self
            .first_contact
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(|| time::OffsetDateTime::now_utc().unix_timestamp());
        let stored = self.cursor().await?;
        let start = match &stored {
            Some(c) if source.owns(c) => Start::Changes(c.clone()),
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
        let floor = start.floor();
        let mut relisted = false;
        let mut pages = 0u32;
        source.begin(start).await?;
        loop {
            if self.stopped() {
                return Ok(());
            }
            pages += 1;
            if pages > source.max_pages() {
                return Err(FetchError::Source(SourceError::Answer {
                    endpoint: endpoint(&self.mailbox),
                    detail: format!(
                        "more than {} pages in one walk (a next page that never ends); the walk starts over at the next sync",
                        source.max_pages()
                    ),
                }));
            }
            let page = match source.next_page().await {
                Ok(p) => p,
                Err(e @ SourceError::Expired { .. }) if !relisted => {
                    tracing::warn!(tenant_id = %self.mailbox.tenant_id, mailbox_id = %self.mailbox.id, error = %e,
                        "mailbox position expired: listing the folder again (already published mail is skipped)");
                    relisted = true;
                    source.begin(Start::List { floor }).await?;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let last = page.last;
            tracing::debug!(tenant_id = %self.mailbox.tenant_id, mailbox_id = %self.mailbox.id, messages = page.messages.len(), last, "listed a page");
            self.page(source, page, stored.as_ref()).await?;
            if last {
                return Ok(());
            }
        }
    }

    /// Handles one page: its skipped keys recorded; what is known told to the source; the
    /// rest fetched in groups bounded by count and `fetch_batch_bytes` (a message announced
    /// as too large alone, streamed) and processed; the page's position recorded with its
    /// last group (or alone).
    async fn page<S: MailSource>(
        &self,
        source: &mut S,
        page: Page,
        stored: Option<&MailboxCursor>,
    ) -> Result<(), FetchError> {
        if !page.skipped.is_empty() {
            let rows: Vec<Record> = page
                .skipped
                .iter()
                .map(|k| Record::new(k.clone(), Outcome::SkippedInitial))
                .collect();
            self.record(&rows, None).await?;
        }
        // What was handled before (listed again) is not fetched again.
        let lookups: Vec<String> = page
            .messages
            .iter()
            .filter_map(|m| m.known_by().cloned())
            .collect();
        let known = self.known(&lookups).await?;
        let mut todo: Vec<&MessageRef> = Vec::with_capacity(page.messages.len());
        let mut done: Vec<&MessageRef> = Vec::new();
        for m in &page.messages {
            match m.known_by().and_then(|k| known.get(k)) {
                Some(outcome) => {
                    if m.key.is_some() && outcome != Outcome::SkippedInitial.as_str() {
                        done.push(m);
                    }
                }
                None => todo.push(m),
            }
        }
        if !done.is_empty() {
            source.handled(&done).await?;
        }
        let inbound = &self.child.settings.inbound;
        let sizes: Vec<(usize, u64)> = todo
            .iter()
            .enumerate()
            .map(|(i, m)| (i, m.size.unwrap_or(0)))
            .collect();
        let groups = plan_groups(
            &sizes,
            inbound.max_message_bytes,
            inbound.fetch_batch_bytes,
            BATCH,
        );
        let page_cursor = page.cursor.as_ref().filter(|c| Some(*c) != stored);
        if groups.is_empty() {
            return self.record(&[], page_cursor).await;
        }
        let count = groups.len();
        // Whether the page's position went with its last batch.
        let mut positioned = false;
        let spill = Spill {
            store: &self.store,
            max_message: inbound.max_message_bytes,
            budget: inbound.fetch_batch_bytes,
        };
        // Pipelined in three stages: while one fetch runs, the batch fetched before it is
        // keyed and prepared (parsed, attachments stored, encoded) and the batch before that
        // one is published and recorded. Batches are still published, and their positions
        // committed, one after the other in order; a batch that shares a key with the one
        // being published is prepared only after it (so a key is never published twice); a
        // batch fetched but not recorded when something fails is simply fetched again.
        let mut pending: Option<Batch<'_>> = None;
        let mut ready: Option<Staging<'_, Ready>> = None;
        'groups: for (g, group) in groups.into_iter().enumerate() {
            if self.stopped() {
                break;
            }
            let final_group = g + 1 == count;
            match group {
                Group::Bodies(list) => {
                    let refs: Vec<&MessageRef> = list.iter().map(|(i, _)| todo[*i]).collect();
                    let mut at = 0;
                    while at < refs.len() {
                        if self.stopped() {
                            break 'groups;
                        }
                        let fetch = source.fetch(&refs[at..], &spill);
                        let fetched = if pending.is_none() && ready.is_none() {
                            fetch.await
                        } else {
                            let busy = ready.as_ref().map(|r| r.batch.keys()).unwrap_or_default();
                            let prepare = async {
                                let Some(batch) = pending.take() else {
                                    return Ok(None);
                                };
                                let keyed = self.keyed_batch(batch).await?;
                                if keyed.batch.shares_keys(&busy) {
                                    return Ok(Some(Err(keyed)));
                                }
                                Ok::<_, FetchError>(Some(Ok(self.prepared_batch(keyed).await?)))
                            };
                            let publish = async {
                                match ready.take() {
                                    Some(r) => self.published_batch(r).await,
                                    None => Ok(Vec::new()),
                                }
                            };
                            let (fetched, prepared, done) =
                                futures_util::future::join3(fetch, prepare, publish).await;
                            let done = done?;
                            if !done.is_empty() {
                                source.handled(&done).await?;
                            }
                            ready = match prepared? {
                                None => None,
                                Some(Ok(r)) => Some(r),
                                Some(Err(keyed)) => Some(self.prepared_batch(keyed).await?),
                            };
                            fetched
                        };
                        let tried = at + fetched.tried.max(1);
                        // The ones this call covers: all tried, but a failed one.
                        let upto = if fetched.failed.is_some() {
                            tried - 1
                        } else {
                            tried
                        };
                        let cursor = if upto == refs.len() && final_group {
                            positioned = true;
                            page_cursor.cloned()
                        } else {
                            upto.checked_sub(1)
                                .filter(|u| *u >= at)
                                .and_then(|u| refs[u].after.clone())
                        };
                        let batch = Batch {
                            refs: refs[at..upto].to_vec(),
                            got: fetched.got,
                            cursor,
                        };
                        let worth = !batch.got.is_empty() || batch.cursor.is_some();
                        if let Some(e) = fetched.failed {
                            // Not pipelined past a failure: what is in the pipeline and this
                            // batch first, then the failure.
                            self.flush_ready(source, &mut ready).await?;
                            if worth {
                                self.settle_batch(source, batch).await?;
                            }
                            self.undownloadable(refs[tried - 1], e.into()).await?;
                        } else if worth {
                            pending = Some(batch);
                        }
                        at = tried;
                    }
                }
                Group::Oversized(i, size) => {
                    self.flush_ready(source, &mut ready).await?;
                    if let Some(batch) = pending.take() {
                        self.settle_batch(source, batch).await?;
                    }
                    let m = todo[i];
                    let cursor = if final_group {
                        positioned = true;
                        page_cursor.cloned()
                    } else {
                        m.after.clone()
                    };
                    self.oversized(source, m, size, cursor).await?;
                }
            }
        }
        // What was fetched is processed, stopping or not (`published` stops publishing when
        // the fetcher is stopped, and records what it published).
        self.flush_ready(source, &mut ready).await?;
        if let Some(batch) = pending.take() {
            self.settle_batch(source, batch).await?;
        }
        if !positioned && !self.stopped() {
            // The last message failed and was dead-lettered on its own.
            self.record(&[], page_cursor).await?;
        }
        Ok(())
    }

    /// [`Fetch::processed`], then the source is told which of the batch are now recorded.
    async fn settle_batch<S: MailSource>(
        &self,
        source: &mut S,
        batch: Batch<'_>,
    ) -> Result<(), FetchError> {
        let done = self.processed(batch).await?;
        if !done.is_empty() {
            source.handled(&done).await?;
        }
        Ok(())
    }

    /// Processes what one fetch got (with the position after it), its stages one after the
    /// other; returns the messages now recorded, for the source to be told.
    async fn processed<'r>(&self, batch: Batch<'r>) -> Result<Vec<&'r MessageRef>, FetchError> {
        let keyed = self.keyed_batch(batch).await?;
        let ready = self.prepared_batch(keyed).await?;
        self.published_batch(ready).await
    }

    /// The first stage of what one fetch got: its emails keyed, its messages stored rather
    /// than held turned into dead letters, the `listed` keys of its messages to record.
    async fn keyed_batch<'r>(&self, batch: Batch<'r>) -> Result<Staging<'r, Keyed>, FetchError> {
        let mut items = Vec::with_capacity(batch.got.len());
        let mut dead = Vec::new();
        let mut fetched = Vec::with_capacity(batch.got.len());
        for g in batch.got {
            let Some(m) = batch.refs.get(g.index).copied() else {
                continue;
            };
            fetched.push(m);
            match g.message {
                Retrieved::Whole(raw) => items.push(Item {
                    uid: m.id.clone(),
                    raw,
                    received_at: g.received_at.or(m.received_at),
                    key: m.key.clone(),
                }),
                Retrieved::Stored {
                    stored,
                    head,
                    error,
                } => dead.push(self.stored_dead(m, stored, head, error).await?),
            }
        }
        let keyed = self
            .keyed(items, dead, batch.cursor, listed_of(&fetched))
            .await?;
        Ok(Staging {
            refs: fetched,
            batch: keyed,
        })
    }

    /// [`Fetch::prepared`] of a staged batch.
    async fn prepared_batch<'r>(
        &self,
        b: Staging<'r, Keyed>,
    ) -> Result<Staging<'r, Ready>, FetchError> {
        Ok(Staging {
            refs: b.refs,
            batch: self.prepared(b.batch).await?,
        })
    }

    /// [`Fetch::published`] of a staged batch; returns which of its messages are now recorded.
    async fn published_batch<'r>(
        &self,
        b: Staging<'r, Ready>,
    ) -> Result<Vec<&'r MessageRef>, FetchError> {
        let handled = self.published(b.batch).await?;
        Ok(handled_refs(&b.refs, &handled))
    }

    /// The batch being published (if any) published, recorded, and its messages told to the
    /// source: what the pipeline does before anything that must come after it.
    async fn flush_ready<S: MailSource>(
        &self,
        source: &mut S,
        ready: &mut Option<Staging<'_, Ready>>,
    ) -> Result<(), FetchError> {
        if let Some(r) = ready.take() {
            let done = self.published_batch(r).await?;
            if !done.is_empty() {
                source.handled(&done).await?;
            }
        }
        Ok(())
    }

    /// [`Fetch::recorded`], then the source is told which of `refs` are now recorded.
    async fn settle<S: MailSource>(
        &self,
        source: &mut S,
        refs: &[&MessageRef],
        items: Vec<Item>,
        dead: Vec<DeadItem>,
        cursor: Option<MailboxCursor>,
    ) -> Result<(), FetchError> {
        let done = self.recorded(refs, items, dead, cursor).await?;
        if !done.is_empty() {
            source.handled(&done).await?;
        }
        Ok(())
    }

    /// [`Fetch::process`] for the emails of `refs`, their `listed` keys recorded with them;
    /// returns which of `refs` are now recorded.
    async fn recorded<'r>(
        &self,
        refs: &[&'r MessageRef],
        items: Vec<Item>,
        dead: Vec<DeadItem>,
        cursor: Option<MailboxCursor>,
    ) -> Result<Vec<&'r MessageRef>, FetchError> {
        let handled = self.process(items, dead, cursor, listed_of(refs)).await?;
        Ok(handled_refs(refs, &handled))
    }

    /// The dead letter of a message stored rather than held (too large, a line too long):
    /// its key (the listing's, else its Message-ID, else the hash of its bytes) and headers
    /// from the start of its header.
    async fn stored_dead(
        &self,
        m: &MessageRef,
        stored: StoredRaw,
        head: Vec<u8>,
        error: String,
    ) -> Result<DeadItem, FetchError> {
        let (facts, headers) =
            blocking(move || guarded(|| (header_facts(&head), header_map_of(&head))))
                .await?
                .unwrap_or_default();
        Ok(DeadItem {
            key: m
                .key
                .clone()
                .or(facts.key)
                .unwrap_or_else(|| format!("sha256:{}", stored.id)),
            uid: m.id.clone(),
            message_id: facts.message_id,
            error,
            stored,
            headers: Some(headers),
        })
    }

    /// A message announced as larger than `max_message_bytes`: never parsed or published,
    /// nor held whole. Its header and size go to the DLQ, its bytes to the attachment store,
    /// its key is recorded.
    async fn oversized<S: MailSource>(
        &self,
        source: &mut S,
        m: &MessageRef,
        size: u64,
        cursor: Option<MailboxCursor>,
    ) -> Result<(), FetchError> {
        // Its Message-ID first, so that a known one is not downloaded.
        let header = source.header(m).await?;
        let facts = match header {
            Some(h) => blocking(move || guarded(|| header_facts(&h)))
                .await?
                .unwrap_or_default(),
            None => Default::default(),
        };
        if let Some(key) = m.key.as_ref().or(facts.key.as_ref()) {
            if !self.known(std::slice::from_ref(key)).await?.is_empty() {
                return self.record(&[], cursor.as_ref()).await;
            }
        }
        let mut sink = RawSink::store(&self.store)?;
        if !source.stream(m, &mut sink).await? {
            return self.record(&[], cursor.as_ref()).await;
        }
        let head = sink.head().to_vec();
        let stored = sink.finish().await?;
        let error = too_large(stored.size.max(size), self.max_message());
        // A key known already (the hash of a message without a Message-ID) is left out by
        // `process`, which records the position all the same.
        let dead = self.stored_dead(m, stored, head, error).await?;
        self.settle(source, &[m], Vec::new(), vec![dead], cursor)
            .await
    }

    /// A fetch of message `m` failed with `e`. A failure about the message itself repeated
    /// `DOWNLOAD_TRIES` times dead-letters it — the DLQ entry holds the error, and no bytes —
    /// so the mailbox moves on; returns whether it did. Any other failure (throttling,
    /// outages, credentials, a broken session) is the mailbox's: returned, to be tried again.
    async fn undownloadable(&self, m: &MessageRef, e: FetchError) -> Result<(), FetchError> {
        let about_the_message = matches!(&e, FetchError::Source(s) if s.is_about_the_message());
        if !about_the_message {
            return Err(e);
        }
        let tries = {
            let mut f = self
                .download_failures
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let n = f.entry(m.id.clone()).or_insert(0);
            *n += 1;
            *n
        };
        tracing::warn!(tenant_id = %self.mailbox.tenant_id, mailbox_id = %self.mailbox.id, try_number = tries, error = %e,
            "a message could not be downloaded");
        if tries < DOWNLOAD_TRIES {
            return Err(e);
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
            key: m
                .key
                .clone()
                .or_else(|| m.listed.clone())
                .unwrap_or_else(|| crate::sources::api::id_key(self.source(), &m.id)),
            uid: m.id.clone(),
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
            .remove(&m.id);
        Ok(())
    }

    // ----------------------------------------------------------------------------------------
    // One batch: prepare, publish, dead-letter, record

    /// Processes one batch, its stages one after the other ([`Fetch::keyed`],
    /// [`Fetch::prepared`], [`Fetch::published`]); returns the keys now recorded for it
    /// (published, dead-lettered or known before). When the fetcher is stopped before every
    /// email is published, what was published is recorded and the position is left where it
    /// was.
    ///
    /// `listed` (an API batch's message ids) is recorded with the batch's emails, in the same
    /// transaction, when every email of it is — never one without the other.
    async fn process(
        &self,
        items: Vec<Item>,
        dead: Vec<DeadItem>,
        cursor: Option<MailboxCursor>,
        listed: Vec<Record>,
    ) -> Result<HashSet<String>, FetchError> {
        let keyed = self.keyed(items, dead, cursor, listed).await?;
        let ready = self.prepared(keyed).await?;
        self.published(ready).await
    }

    /// A batch's first stage: every email's dedup key and reply candidates, from its headers
    /// (off the actors' thread).
    async fn keyed(
        &self,
        items: Vec<Item>,
        dead: Vec<DeadItem>,
        cursor: Option<MailboxCursor>,
        listed: Vec<Record>,
    ) -> Result<Keyed, FetchError> {
        let fetched = (items.len() + dead.len()) as u64;
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
        Ok(Keyed {
            keyed,
            dead,
            cursor,
            listed,
            fetched,
        })
    }

    /// A batch's second stage: what is known already is left out (and counted handled); the
    /// rest parsed, its attachments stored, encoded (off the actors' thread). A message that
    /// is not an email (or too large after all: the server said less) is stored raw for the
    /// DLQ. Publishes nothing and records nothing, so it runs beside the previous batch's
    /// publishing — unless that batch holds one of its keys ([`Keyed::shares_keys`]).
    async fn prepared(&self, batch: Keyed) -> Result<Ready, FetchError> {
        let Keyed {
            keyed,
            mut dead,
            cursor,
            listed,
            fetched,
        } = batch;
        let mailbox = self.mailbox.clone();
        let store = self.store.clone();
        let limit = self.max_message();
        let mut keys: Vec<String> = keyed.iter().filter_map(|(i, _)| i.key.clone()).collect();
        keys.extend(dead.iter().map(|d| d.key.clone()));
        let known = self.known(&keys).await?;
        let handled: HashSet<String> = known.keys().cloned().collect();
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

        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let source = self.source();
        let prepared: Vec<(Item, Result<Prepared, DeadItem>)> = blocking(move || {
            let mut out = Vec::with_capacity(fresh.len());
            // The batch's attachments, stored together before anything links to them is
            // published.
            let mut staged = Staged::default();
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
                match intake::prepare(&item.raw, &origin, &store, &mut staged, &replies, now) {
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
            store.commit(staged)?;
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
        Ok(Ready {
            ready,
            dead,
            handled,
            cursor,
            listed,
            fetched,
        })
    }

    /// A batch's last stage, in the mailbox's order: publish (confirmed), dead letters
    /// (confirmed), then everything recorded together with the position after the batch;
    /// returns the keys now recorded (published, dead-lettered or known before). When the
    /// fetcher is stopped before every email is published, what was published is recorded
    /// and the position is left where it was.
    async fn published(&self, batch: Ready) -> Result<HashSet<String>, FetchError> {
        let Ready {
            ready,
            mut dead,
            mut handled,
            cursor,
            listed,
            fetched,
        } = batch;

        // 3. Publish (confirmed); refused emails join the dead ones.
        let mut rows: Vec<Record> = Vec::new();
        let outcome = self.publish_all(&ready).await;
        for &i in &outcome.published {
            if let Some((item, p)) = ready.get(i) {
                rows.push(Record {
                    message_id: Some(p.message_id.clone()),
                    reply_to: p
                        .reply_to_message_id
                        .clone()
                        .map(|m| (self.mailbox.tenant_id.clone(), m)),
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
            tracing::info!(tenant_id = %self.mailbox.tenant_id, mailbox_id = %self.mailbox.id, published, "published inbound email");
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
                tracing::warn!(tenant_id = %self.mailbox.tenant_id, mailbox_id = %self.mailbox.id, error = %e, unpublished = todo.len(), retry_in = ?delay,
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
            .send(FindChild::<DeadLetterActor>::of(ChildId::Dlq))
            .await
            .ok()
            .flatten()
            .ok_or_else(|| FetchError::DeadLetter("the DLQ actor is not running".into()))?;
        let now = time::OffsetDateTime::now_utc();
        let queue = self.child.settings.queues.inbound_dlq();
        let sends = dead.iter().map(|d| {
            tracing::warn!(tenant_id = %self.mailbox.tenant_id, mailbox_id = %self.mailbox.id, uid = %d.uid, key = %d.key, error = %d.error, raw_id = %d.stored.id, "inbound email dead-lettered");
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
        tracing::debug!(tenant_id = %self.mailbox.tenant_id, mailbox_id = %self.mailbox.id, "fetcher started");
        let publisher = self.child.publisher.clone();
        let settings = self.child.settings.clone();
        let pool = self.child.pool.clone();
        let setup = async move {
            let ch = publisher.ok_or_else(|| "not connected to RabbitMQ".to_string())?;
            let store = AttachmentStore::for_settings(&settings.attachments, &pool)
                .map_err(|e| e.to_string())?;
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
                tracing::warn!(tenant_id = %act.mailbox.tenant_id, mailbox_id = %act.mailbox.id, error = %e, "cannot start the mailbox fetcher");
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
