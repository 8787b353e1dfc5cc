//! A mailbox fetcher: one per configured mailbox, fetching new mail over IMAP (IDLE when the
//! server has it and `idle = true`, else polling) or POP3, and publishing each email to the
//! inbound queue exactly once.
//!
//! Exactly once: each email has a dedup key (its Message-ID, else a hash of its bytes; for
//! POP3 its UIDL). A batch is published with publisher confirms; only then are its keys and
//! the mailbox position (UIDVALIDITY, last UID) committed together in PostgreSQL. Keys already
//! recorded are skipped, so a restart, a re-sync, or a UIDVALIDITY change (which resyncs the
//! folder from the start) publishes nothing twice. Memory stays bounded: messages are fetched
//! and published `BATCH` at a time.

use std::collections::{HashMap, HashSet};
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
use crate::amqp::{lane_of, short_string, Publisher};
use crate::attachments::AttachmentStore;
use crate::domain::{ComponentHealth, ComponentId, DeadLetterEntry};
use crate::inbound::{answered_ids, dedup_key, parse, InboundEmail, Origin};
use crate::mailproto::{endpoint, imap_login, ImapSession, MailboxError, Pop3};
use crate::outbound::rfc3339;
use crate::settings::{InitialSync, MailProtocol, Mailbox};
use crate::storage::StorageError;

/// Messages fetched, parsed and published per round.
const BATCH: u32 = 200;
/// Longest IDLE before it is renewed (servers drop IDLE after 30 min).
const IDLE_MAX: Duration = Duration::from_secs(25 * 60);

pub fn mailbox_child(mailbox_id: &str) -> String {
    format!("mailbox:{mailbox_id}")
}

#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error(transparent)]
    Mailbox(#[from] MailboxError),
    #[error("IMAP: {0}")]
    Imap(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("publishing to the inbound queue failed: {0}")]
    Publish(String),
    #[error("attachments: {0}")]
    Attachments(String),
}

impl From<tokio_postgres::Error> for FetchError {
    fn from(e: tokio_postgres::Error) -> Self {
        FetchError::Storage(StorageError::Query(e))
    }
}

impl From<deadpool_postgres::PoolError> for FetchError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        FetchError::Storage(e.into())
    }
}

fn imap_err(e: async_imap::error::Error) -> FetchError {
    FetchError::Imap(e.to_string())
}

/// One message to process: where it is in the mailbox and its bytes.
struct Item {
    key: String,
    /// The UID (IMAP) or UIDL (POP3), for dead letters and logs.
    uid: String,
    raw: Vec<u8>,
    received_at: Option<i64>,
}

/// Everything the fetch loop needs; owned by the loop.
struct Fetch {
    mailbox: Mailbox,
    child: ChildContext,
    publisher: Arc<Publisher>,
    store: AttachmentStore,
    wake: Arc<Notify>,
    stop: watch::Receiver<bool>,
    last_sync: Option<String>,
}

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

    fn report(&self, health: ComponentHealth) {
        self.child.metrics.do_send(ReportHealth {
            id: ComponentId::Mailbox(self.mailbox.id.clone()),
            health: health
                .with("tenant", self.mailbox.tenant_id.clone())
                .with(
                    "protocol",
                    match self.mailbox.protocol {
                        MailProtocol::Imap => "imap",
                        MailProtocol::Pop3 => "pop3",
                    },
                )
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
            };
            match result {
                Ok(()) => {}
                Err(e) => {
                    if started.elapsed() > Duration::from_secs(60) {
                        attempt = 0;
                    }
                    let delay = backoff(attempt, Duration::from_secs(60));
                    attempt += 1;
                    tracing::warn!(mailbox = %self.mailbox.id, error = %e, retry_in = ?delay, "mailbox sync failed");
                    self.child
                        .metrics
                        .do_send(Count::one("mailbridge_inbound_errors_total", self.labels()));
                    self.report(
                        ComponentHealth::down(e.to_string())
                            .with("connected", false)
                            .with("idling", false),
                    );
                    self.pause(delay).await;
                }
            }
        }
    }

    // ----------------------------------------------------------------------------------------
    // IMAP

    async fn imap(&mut self) -> Result<(), FetchError> {
        let mut session = imap_login(&self.mailbox).await?;
        let can_idle = session
            .capabilities()
            .await
            .map_err(imap_err)?
            .has_str("IDLE");
        loop {
            let selected = session
                .select(&self.mailbox.folder)
                .await
                .map_err(imap_err)?;
            self.imap_sync(&mut session, &selected).await?;
            self.last_sync = Some(rfc3339(time::OffsetDateTime::now_utc()));
            if self.stopped() {
                let _ = session.logout().await;
                return Ok(());
            }
            if self.mailbox.idle && can_idle {
                self.report_ok(true);
                session = self.idle(session).await?;
            } else {
                self.report_ok(false);
                self.pause(self.mailbox.poll_interval).await;
            }
            if self.stopped() {
                let _ = session.logout().await;
                return Ok(());
            }
        }
    }

    /// IDLE until the server reports something, a sync is requested, or we are stopped.
    async fn idle(&mut self, session: ImapSession) -> Result<ImapSession, FetchError> {
        let mut handle = session.idle();
        handle.init().await.map_err(imap_err)?;
        {
            let (fut, stop_source) =
                handle.wait_with_timeout(self.mailbox.poll_interval.min(IDLE_MAX));
            let mut stop_source = Some(stop_source);
            tokio::pin!(fut);
            let mut stop = self.stop.clone();
            let outcome = tokio::select! {
                r = &mut fut => r,
                _ = self.wake.notified() => { stop_source.take(); (&mut fut).await }
                _ = stop.changed() => { stop_source.take(); (&mut fut).await }
            };
            outcome.map_err(imap_err)?;
        }
        handle.done().await.map_err(imap_err)
    }

    async fn cursor(&self) -> Result<Option<(u32, u32)>, FetchError> {
        let client = self.child.pool.get().await?;
        let row = client
            .query_opt(
                "SELECT uidvalidity, last_uid FROM mailbox_state WHERE mailbox_id = $1",
                &[&self.mailbox.id],
            )
            .await?;
        Ok(row.map(|r| (r.get::<_, i64>(0) as u32, r.get::<_, i64>(1) as u32)))
    }

    async fn save_cursor(&self, uidvalidity: u32, last_uid: u32) -> Result<(), FetchError> {
        let client = self.child.pool.get().await?;
        client
            .execute(
                "INSERT INTO mailbox_state (mailbox_id, uidvalidity, last_uid) VALUES ($1, $2, $3)
                 ON CONFLICT (mailbox_id) DO UPDATE
                 SET uidvalidity = EXCLUDED.uidvalidity, last_uid = EXCLUDED.last_uid, updated_at = now()",
                &[&self.mailbox.id, &(uidvalidity as i64), &(last_uid as i64)],
            )
            .await?;
        Ok(())
    }

    async fn imap_sync(
        &mut self,
        session: &mut ImapSession,
        selected: &async_imap::types::Mailbox,
    ) -> Result<(), FetchError> {
        let uidvalidity = selected.uid_validity.unwrap_or(0);
        let top = match selected.uid_next {
            Some(n) => n.saturating_sub(1),
            None => {
                // Servers without UIDNEXT: ask for the highest UID.
                session
                    .uid_search("ALL")
                    .await
                    .map_err(imap_err)?
                    .into_iter()
                    .max()
                    .unwrap_or(0)
            }
        };
        let mut last = match self.cursor().await? {
            Some((v, last)) if v == uidvalidity => last,
            Some((v, _)) => {
                tracing::warn!(mailbox = %self.mailbox.id, old = v, new = uidvalidity,
                    "UIDVALIDITY changed: resyncing the folder (already published mail is skipped)");
                0
            }
            None => match self.mailbox.initial_sync {
                InitialSync::All => 0,
                InitialSync::New => {
                    self.save_cursor(uidvalidity, top).await?;
                    top
                }
                InitialSync::Since(age) => {
                    let since = time::OffsetDateTime::now_utc() - age;
                    let query = format!(
                        "SINCE {}-{}-{}",
                        since.day(),
                        &format!("{:?}", since.month())[..3],
                        since.year()
                    );
                    let mut uids: Vec<u32> = session
                        .uid_search(&query)
                        .await
                        .map_err(imap_err)?
                        .into_iter()
                        .filter(|u| *u <= top)
                        .collect();
                    uids.sort_unstable();
                    for chunk in uids.chunks(BATCH as usize) {
                        let set = chunk
                            .iter()
                            .map(u32::to_string)
                            .collect::<Vec<_>>()
                            .join(",");
                        let items = self.imap_fetch(session, &set).await?;
                        self.process(items, Some((uidvalidity, 0))).await?;
                    }
                    self.save_cursor(uidvalidity, top).await?;
                    top
                }
            },
        };
        while last < top && !self.stopped() {
            let upper = top.min(last.saturating_add(BATCH));
            let items = self
                .imap_fetch(session, &format!("{}:{}", last + 1, upper))
                .await?;
            self.process(items, Some((uidvalidity, upper))).await?;
            last = upper;
        }
        Ok(())
    }

    async fn imap_fetch(
        &self,
        session: &mut ImapSession,
        set: &str,
    ) -> Result<Vec<Item>, FetchError> {
        let mut stream = session
            .uid_fetch(set, "(UID INTERNALDATE BODY.PEEK[])")
            .await
            .map_err(imap_err)?;
        let mut items = Vec::new();
        while let Some(f) = stream.next().await {
            let f = f.map_err(imap_err)?;
            let (Some(uid), Some(body)) = (f.uid, f.body()) else {
                continue;
            };
            items.push(Item {
                key: dedup_key(body),
                uid: uid.to_string(),
                raw: body.to_vec(),
                received_at: f.internal_date().map(|d| d.timestamp()),
            });
        }
        items.sort_by_key(|i| i.uid.parse::<u32>().unwrap_or(0));
        Ok(items)
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
        let first_contact = self.cursor().await?.is_none();
        if first_contact && self.mailbox.initial_sync == InitialSync::New {
            // What is there now counts as seen; only later mail is published.
            let keys: Vec<String> = listing.iter().map(|(_, u)| format!("uidl:{u}")).collect();
            self.record(&keys, &[], "skipped-initial", None).await?;
            self.save_cursor(0, 0).await?;
            pop.quit().await?;
            return Ok(());
        }
        let keys: Vec<String> = listing.iter().map(|(_, u)| format!("uidl:{u}")).collect();
        let known = self.known(&keys).await?;
        let new: Vec<&(u32, String)> = listing
            .iter()
            .filter(|(_, u)| !known.contains(&format!("uidl:{u}")))
            .collect();
        let since = match self.mailbox.initial_sync {
            InitialSync::Since(age) if first_contact => {
                Some((time::OffsetDateTime::now_utc() - age).unix_timestamp())
            }
            _ => None,
        };
        for chunk in new.chunks(50) {
            if self.stopped() {
                break;
            }
            let mut items = Vec::new();
            for (n, uidl) in chunk {
                let raw = pop.retr(*n).await?;
                items.push(Item {
                    key: format!("uidl:{uidl}"),
                    uid: uidl.clone(),
                    raw,
                    received_at: None,
                });
            }
            if let Some(since) = since {
                items.retain(|i| {
                    mail_parser::MessageParser::default()
                        .parse_headers(&i.raw)
                        .and_then(|m| m.date().map(|d| d.to_timestamp()))
                        .is_none_or(|t| t >= since)
                });
            }
            self.process(items, None).await?;
            if self.mailbox.delete_after_fetch {
                for (n, _) in chunk {
                    pop.dele(*n).await?;
                }
            }
        }
        if first_contact {
            self.save_cursor(0, 0).await?;
        }
        pop.quit().await?;
        Ok(())
    }

    // ----------------------------------------------------------------------------------------
    // Publishing

    async fn known(&self, keys: &[String]) -> Result<HashSet<String>, FetchError> {
        if keys.is_empty() {
            return Ok(HashSet::new());
        }
        let client = self.child.pool.get().await?;
        let rows = client
            .query(
                "SELECT dedup_key FROM inbound_published WHERE mailbox_id = $1 AND dedup_key = ANY($2)",
                &[&self.mailbox.id, &keys],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Records keys (and, for IMAP, the new position) in one transaction.
    async fn record(
        &self,
        keys: &[String],
        message_ids: &[Option<String>],
        outcome: &str,
        cursor: Option<(u32, u32)>,
    ) -> Result<(), FetchError> {
        let mut client = self.child.pool.get().await?;
        let tx = client.transaction().await?;
        if !keys.is_empty() {
            let ids: Vec<Option<String>> = (0..keys.len())
                .map(|i| message_ids.get(i).cloned().flatten())
                .collect();
            tx.execute(
                "INSERT INTO inbound_published (mailbox_id, dedup_key, message_id, outcome)
                 SELECT $1, k, m, $4 FROM UNNEST($2::text[], $3::text[]) AS x(k, m)
                 ON CONFLICT DO NOTHING",
                &[&self.mailbox.id, &keys, &ids, &outcome],
            )
            .await?;
        }
        if let Some((v, last)) = cursor {
            if last > 0 {
                tx.execute(
                    "INSERT INTO mailbox_state (mailbox_id, uidvalidity, last_uid) VALUES ($1, $2, $3)
                     ON CONFLICT (mailbox_id) DO UPDATE
                     SET uidvalidity = EXCLUDED.uidvalidity,
                         last_uid = GREATEST(CASE WHEN mailbox_state.uidvalidity = EXCLUDED.uidvalidity
                                                  THEN mailbox_state.last_uid ELSE 0 END,
                                             EXCLUDED.last_uid),
                         updated_at = now()",
                    &[&self.mailbox.id, &(v as i64), &(last as i64)],
                )
                .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    async fn dead_letter(
        &self,
        uid: &str,
        message_id: Option<String>,
        reason: String,
    ) -> Result<(), FetchError> {
        tracing::warn!(mailbox = %self.mailbox.id, uid, %reason, "inbound email dead-lettered");
        let entry = DeadLetterEntry {
            message_id,
            tenant_id: Some(self.mailbox.tenant_id.clone()),
            error: reason,
            error_class: "permanent".into(),
            failed_at: rfc3339(time::OffsetDateTime::now_utc()),
            mailbox_id: Some(self.mailbox.id.clone()),
            uid: Some(uid.to_string()),
            ..DeadLetterEntry::default()
        };
        let dlq = self
            .child
            .supervisor
            .send(FindChild::<DeadLetterActor>::named(DLQ_CHILD))
            .await
            .ok()
            .flatten()
            .ok_or_else(|| FetchError::Publish("the DLQ actor is not running".into()))?;
        dlq.send(DeadLetter {
            queue: self.child.settings.queues.inbound_dlq(),
            entry,
            body: None,
            keep_whole: 0,
        })
        .await
        .map_err(|e| FetchError::Publish(e.to_string()))?
        .map_err(|e| FetchError::Publish(e.to_string()))
    }

    /// Parses, stores attachments, publishes (confirmed), then records: one batch.
    async fn process(
        &self,
        items: Vec<Item>,
        cursor: Option<(u32, u32)>,
    ) -> Result<(), FetchError> {
        let fetched = items.len() as u64;
        let keys: Vec<String> = items.iter().map(|i| i.key.clone()).collect();
        let known = self.known(&keys).await?;
        let mut seen = HashSet::new();
        let m = &self.mailbox;
        let source = match m.protocol {
            MailProtocol::Imap => "imap",
            MailProtocol::Pop3 => "pop3",
        };
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let mut emails: Vec<(String, InboundEmail)> = Vec::new();
        let mut dead: Vec<(String, Option<String>)> = Vec::new();
        for item in items {
            if known.contains(&item.key) || !seen.insert(item.key.clone()) {
                continue;
            }
            let origin = Origin {
                tenant_id: &m.tenant_id,
                provider_id: &m.provider_id,
                mailbox_id: &m.id,
                user_id: &m.user_id,
                source,
                received_at: item.received_at,
            };
            match parse(&item.raw, &origin) {
                Ok((mut email, raws)) => {
                    for (slot, raw) in email.attachments.iter_mut().zip(&raws) {
                        let id = self
                            .store
                            .store(&raw.bytes)
                            .map_err(|e| FetchError::Attachments(e.to_string()))?;
                        slot.url = self.store.link(&id, &raw.filename, &raw.mime_type, now);
                    }
                    emails.push((item.key, email));
                }
                Err(e) => {
                    self.dead_letter(&item.uid, None, e.to_string()).await?;
                    dead.push((item.key, None));
                }
            }
        }
        self.match_replies(&mut emails).await?;

        // Published concurrently on this mailbox's lane (in order), each confirmed.
        let lane = lane_of(&m.id);
        let queue = self.child.settings.queues.inbound.clone();
        let mut bodies = Vec::with_capacity(emails.len());
        for (_, email) in &emails {
            let body = serde_json::to_vec(email).map_err(|e| FetchError::Publish(e.to_string()))?;
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_message_id(short_string(&email.message_id));
            bodies.push((body, props));
        }
        let confirms = futures_util::future::join_all(bodies.into_iter().map(|(body, props)| {
            let publisher = self.publisher.clone();
            let queue = queue.clone();
            async move { publisher.publish(lane, &queue, &body, props).await }
        }))
        .await;
        let mut published_keys = Vec::new();
        let mut published_ids = Vec::new();
        for ((key, email), confirm) in emails.into_iter().zip(confirms) {
            match confirm {
                Ok(()) => {
                    published_keys.push(key);
                    published_ids.push(Some(email.message_id));
                }
                Err(e) if e.is_refusal() => {
                    self.dead_letter(
                        "",
                        Some(email.message_id.clone()),
                        format!("the broker refused to take the email: {e}"),
                    )
                    .await?;
                    dead.push((key, Some(email.message_id)));
                }
                Err(e) => return Err(FetchError::Publish(e.to_string())),
            }
        }
        let published = published_keys.len() as u64;
        self.record(&published_keys, &published_ids, "published", cursor)
            .await?;
        if !dead.is_empty() {
            let (k, ids): (Vec<String>, Vec<Option<String>>) = dead.into_iter().unzip();
            self.record(&k, &ids, "dead-lettered", None).await?;
        }
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
            tracing::info!(mailbox = %m.id, published, "published inbound email");
        }
        Ok(())
    }

    /// Fills `reply_to_message_id` from the outbox: the request whose email this one answers.
    async fn match_replies(&self, emails: &mut [(String, InboundEmail)]) -> Result<(), FetchError> {
        let candidates: Vec<String> = emails
            .iter()
            .flat_map(|(_, e)| answered_ids(e))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        if candidates.is_empty() {
            return Ok(());
        }
        let client = self.child.pool.get().await?;
        let rows = client
            .query(
                "SELECT rfc_message_id, message_id FROM outbox
                 WHERE tenant_id = $1 AND rfc_message_id = ANY($2)",
                &[&self.mailbox.tenant_id, &candidates],
            )
            .await?;
        let sent: HashMap<String, String> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        for (_, e) in emails.iter_mut() {
            e.reply_to_message_id = answered_ids(e).iter().find_map(|id| sent.get(id).cloned());
        }
        Ok(())
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
            let store = AttachmentStore::open(
                &settings.attachments.dir,
                &settings.attachments.public_base_url,
                settings.attachments.link_ttl.0,
            )
            .map_err(|e| e.to_string())?;
            Ok::<_, String>((ch, store))
        };
        ctx.wait(setup.into_actor(self).map(|res, act, ctx| match res {
            Ok((publisher, store)) => {
                let fetch = Fetch {
                    mailbox: act.mailbox.clone(),
                    child: act.child.clone(),
                    publisher: publisher.clone(),
                    store,
                    wake: act.wake.clone(),
                    stop: act.stop.subscribe(),
                    last_sync: None,
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
