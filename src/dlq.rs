//! Operating the dead-letter queues: listing entries and replaying them. Used by the CLI
//! (`mailbridge dlq …`, with a connection of its own) and by the DLQ actor (for HTTP).
//!
//! Listing takes messages with `basic.get` without acknowledging them and then closes the
//! channel, which gives them all back to the queue. Replaying an outbound entry publishes its
//! original request to the send queue (publisher-confirmed, with no retry count, so it gets the
//! whole retry schedule again), resets its outbox row, and only then acknowledges the entry.
//!
//! Replaying an inbound entry reads the email's stored bytes (`raw_id`), parses them for the
//! mailbox as it is configured now, publishes the message to the inbound queue (mandatory,
//! confirmed), marks its key `published`, and only then acknowledges the entry. An entry whose
//! email was published meanwhile is acknowledged without publishing it again; one that still
//! cannot be published stays, and the report says why.

use std::sync::Arc;

use deadpool_postgres::Pool;
use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::{BasicProperties, Channel, Connection};
use serde::Serialize;

use crate::amqp::{PublishError, Publisher};
use crate::attachments::{AttachmentError, AttachmentStore, Staged};
use crate::domain::DeadLetterEntry;
use crate::inbound::{dedup_key, header_facts, Origin};
use crate::intake;
use crate::outbox::{self, OutboxKey, OutboxOp};
use crate::settings::Settings;

#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error("AMQP: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("`{0}` is not a dead-letter queue of this service (use {1})")]
    UnknownQueue(String, String),
    #[error(
        "the attachment store (where inbound dead letters keep their email) is not usable: {0}"
    )]
    Store(#[from] AttachmentError),
    #[error("the replayed request was not published: {0}")]
    Publish(#[from] PublishError),
    #[error("database: {0}")]
    Storage(#[from] crate::storage::StorageError),
}

/// Which entries to replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    All,
    MessageIds(Vec<String>),
    /// Only entries of this tenant (all of them, or those ids).
    Tenant(String, Option<Vec<String>>),
}

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ReplayReport {
    /// message_ids (or "(no id)") of the entries sent back to the send queue, or (inbound)
    /// published to the inbound queue.
    pub replayed: Vec<String>,
    /// Entries looked at and left on the queue (those of `not_replayed` included).
    pub kept: usize,
    /// Inbound entries whose email had been published meanwhile (by an earlier replay):
    /// removed from the DLQ without publishing it again.
    pub already_published: Vec<String>,
    /// Selected entries that stay on the queue, and why.
    pub not_replayed: Vec<NotReplayed>,
}

/// A selected entry that could not be replayed.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct NotReplayed {
    pub message_id: String,
    pub reason: String,
}

fn check_queue(settings: &Settings, queue: &str) -> Result<(), DlqError> {
    let known = [settings.queues.send_dlq(), settings.queues.inbound_dlq()];
    if known.iter().any(|q| q == queue) {
        Ok(())
    } else {
        Err(DlqError::UnknownQueue(
            queue.to_string(),
            known.join(" or "),
        ))
    }
}

/// Up to `limit` entries from the head of `queue`, left on the queue.
pub async fn list(
    conn: &Connection,
    settings: &Settings,
    queue: &str,
    limit: usize,
) -> Result<Vec<serde_json::Value>, DlqError> {
    check_queue(settings, queue)?;
    let ch = conn.create_channel().await?;
    let mut out = Vec::new();
    while out.len() < limit {
        match ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await?
        {
            Some(m) => out.push(
                serde_json::from_slice(&m.delivery.data).unwrap_or_else(|_| {
                    serde_json::Value::String(String::from_utf8_lossy(&m.delivery.data).into())
                }),
            ),
            None => break,
        }
    }
    // Closing the channel returns every unacknowledged message to the queue.
    ch.close(200, "OK".into()).await?;
    Ok(out)
}

/// Whether `entry` is selected. Inbound entries are also found by their dedup key (an email
/// that did not parse may have no Message-ID).
fn is_selected(entry: &DeadLetterEntry, selection: &Selection) -> bool {
    let id_in = |ids: &[String]| {
        entry.message_id.as_ref().is_some_and(|id| ids.contains(id))
            || entry.dedup_key.as_ref().is_some_and(|k| ids.contains(k))
    };
    match selection {
        Selection::All => true,
        Selection::MessageIds(ids) => id_in(ids),
        Selection::Tenant(t, ids) => {
            entry.tenant_id.as_deref() == Some(t.as_str())
                && ids.as_ref().is_none_or(|ids| id_in(ids))
        }
    }
}

/// The number of messages on `queue` now (a passive declare).
async fn depth(ch: &Channel, queue: &str) -> Result<usize, DlqError> {
    Ok(ch
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await?
        .message_count() as usize)
}

/// Replays the selected entries of a DLQ; the rest stay where they are.
pub async fn replay(
    conn: &Arc<Connection>,
    pool: &Pool,
    settings: &Settings,
    queue: &str,
    selection: &Selection,
) -> Result<ReplayReport, DlqError> {
    check_queue(settings, queue)?;
    if queue == settings.queues.inbound_dlq() {
        return replay_inbound(conn, pool, settings, queue, selection).await;
    }
    let ch = conn.create_channel().await?;
    let publisher = Publisher::new(conn.clone(), 1);
    let mut report = ReplayReport::default();
    // Bounded by what is on the queue now: replayed entries never come back to it here.
    for _ in 0..depth(&ch, queue).await? {
        let Some(m) = ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await?
        else {
            break;
        };
        let entry: Option<DeadLetterEntry> = serde_json::from_slice(&m.delivery.data).ok();
        let Some(entry) = entry.filter(|e| is_selected(e, selection)) else {
            report.kept += 1;
            continue;
        };
        let body = match (&entry.request, &entry.raw_body) {
            (Some(r), _) => serde_json::to_vec(r).unwrap_or_default(),
            (None, Some(raw)) => raw.clone().into_bytes(),
            (None, None) => {
                report.kept += 1;
                continue;
            }
        };
        if let (Some(t), Some(id)) = (&entry.tenant_id, &entry.message_id) {
            let claims = outbox::ClaimConfig {
                owner: settings.instance_id.clone(),
                ttl_secs: settings.cluster.claim_ttl.0.as_secs_f64(),
            };
            outbox::apply(
                pool,
                &claims,
                &[OutboxOp::Reset(OutboxKey {
                    tenant_id: t.clone(),
                    message_id: id.clone(),
                })],
            )
            .await?;
        }
        // Mandatory and confirmed: a send queue that is gone fails the replay, and the entry
        // stays (the channel's close gives it back).
        publisher
            .publish_json(0, &settings.queues.send, &body, None)
            .await?;
        m.delivery.acker.ack(BasicAckOptions::default()).await?;
        report
            .replayed
            .push(entry.message_id.unwrap_or_else(|| "(no id)".into()));
    }
    publisher.close().await;
    ch.close(200, "OK".into()).await?;
    Ok(report)
}

/// What became of one inbound entry.
enum Replayed {
    Published,
    AlreadyPublished,
}

/// Replays the selected entries of the inbound DLQ (see the module documentation).
async fn replay_inbound(
    conn: &Arc<Connection>,
    pool: &Pool,
    settings: &Settings,
    queue: &str,
    selection: &Selection,
) -> Result<ReplayReport, DlqError> {
    let store = AttachmentStore::for_settings(&settings.attachments, pool)?;
    let ch = conn.create_channel().await?;
    let publisher = Publisher::new(conn.clone(), 1);
    let mut report = ReplayReport::default();
    // Bounded by what is on the queue now: entries kept are taken again only on a next run.
    for _ in 0..depth(&ch, queue).await? {
        let Some(m) = ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await?
        else {
            break;
        };
        let entry: Option<DeadLetterEntry> = serde_json::from_slice(&m.delivery.data).ok();
        let Some(entry) = entry.filter(|e| is_selected(e, selection)) else {
            report.kept += 1;
            continue;
        };
        let name = entry
            .message_id
            .clone()
            .or_else(|| entry.dedup_key.clone())
            .unwrap_or_else(|| "(no id)".into());
        match replay_one(&publisher, pool, settings, &store, &entry).await? {
            Ok(outcome) => {
                m.delivery.acker.ack(BasicAckOptions::default()).await?;
                match outcome {
                    Replayed::Published => report.replayed.push(name),
                    Replayed::AlreadyPublished => report.already_published.push(name),
                }
            }
            Err(reason) => {
                tracing::warn!(entry = %name, %reason, "inbound dead letter not replayed");
                report.kept += 1;
                report.not_replayed.push(NotReplayed {
                    message_id: name,
                    reason,
                });
            }
        }
    }
    publisher.close().await;
    // Closing the channel returns the entries not acknowledged to the queue.
    ch.close(200, "OK".into()).await?;
    Ok(report)
}

/// Replays one inbound entry. The outer error stops the whole replay (the broker or the
/// database failed); the inner one is this entry's reason to stay.
async fn replay_one(
    publisher: &Publisher,
    pool: &Pool,
    settings: &Settings,
    store: &AttachmentStore,
    entry: &DeadLetterEntry,
) -> Result<Result<Replayed, String>, DlqError> {
    let Some(mailbox_id) = entry.mailbox_id.as_deref() else {
        return Ok(Err("the entry names no mailbox".into()));
    };
    let Some(mailbox) = settings
        .tenants
        .iter()
        .flat_map(|t| &t.mailboxes)
        .find(|m| m.id == mailbox_id)
    else {
        return Ok(Err(format!(
            "mailbox {mailbox_id} is no longer configured; add it back to replay its mail"
        )));
    };
    if let Some(t) = entry
        .tenant_id
        .as_deref()
        .filter(|t| *t != mailbox.tenant_id)
    {
        return Ok(Err(format!(
            "the entry is tenant {t}'s but mailbox {mailbox_id} is now tenant {}'s",
            mailbox.tenant_id
        )));
    }
    let Some(raw_id) = entry.raw_id.clone() else {
        return Ok(Err(
            "the entry has no stored email (raw_id); it predates stored dead letters".into(),
        ));
    };
    let limit = settings.inbound.max_message_bytes;
    if entry.size.is_some_and(|s| s > limit) {
        return Ok(Err(format!(
            "the email is {} bytes, more than [inbound] max_message_bytes ({limit}); raise the limit to replay it",
            entry.size.unwrap_or(0)
        )));
    }
    let reader = store.clone();
    let raw = match tokio::task::spawn_blocking(move || reader.read(&raw_id)).await {
        Ok(Ok(raw)) if raw.len() as u64 > limit => {
            return Ok(Err(format!(
                "the email is {} bytes, more than [inbound] max_message_bytes ({limit}); raise the limit to replay it",
                raw.len()
            )))
        }
        Ok(Ok(raw)) => raw,
        Ok(Err(e)) => return Ok(Err(format!("its stored email cannot be read: {e}"))),
        Err(e) => return Ok(Err(format!("reading its stored email failed: {e}"))),
    };
    let raw = std::sync::Arc::new(raw);
    let key = match &entry.dedup_key {
        Some(k) => k.clone(),
        None => dedup_key(&raw),
    };
    let known = intake::known(pool, mailbox_id, std::slice::from_ref(&key)).await?;
    if known.get(&key).map(String::as_str) == Some(intake::Outcome::Published.as_str()) {
        return Ok(Ok(Replayed::AlreadyPublished));
    }
    let facts = {
        let raw = raw.clone();
        tokio::task::spawn_blocking(move || intake::guarded(|| header_facts(&raw)))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default()
    };
    let replies = intake::reply_matches(pool, &mailbox.tenant_id, &facts.reply_candidates).await?;
    let prepared = {
        let (raw, store, mailbox) = (raw.clone(), store.clone(), mailbox.clone());
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        tokio::task::spawn_blocking(move || {
            let origin = Origin {
                tenant_id: &mailbox.tenant_id,
                provider_id: &mailbox.provider_id,
                mailbox_id: &mailbox.id,
                user_id: &mailbox.user_id,
                source: mailbox.protocol.as_str(),
                received_at: None,
            };
            let mut staged = Staged::default();
            let prepared = intake::prepare(&raw, &origin, &store, &mut staged, &replies, now)?;
            store.commit(staged)?;
            Ok::<_, intake::PrepareError>(prepared)
        })
        .await
    };
    let prepared = match prepared {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return Ok(Err(e.to_string())),
        Err(e) => return Ok(Err(format!("preparing it failed: {e}"))),
    };
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(crate::amqp::short_string(&prepared.message_id));
    match publisher
        .publish(
            crate::amqp::lane_of(mailbox_id),
            &settings.queues.inbound,
            &prepared.body,
            props,
        )
        .await
    {
        Ok(()) => {}
        // Refused again (unroutable, nacked, 406 too large or a policy): the entry stays.
        Err(e) if e.is_refusal() => return Ok(Err(e.to_string())),
        Err(e) => return Err(e.into()),
    }
    // Published: from now on the entry goes, whatever the bookkeeping says. A key left
    // `dead-lettered` still keeps the mailbox from fetching the email again.
    if let Err(e) = intake::mark_published(pool, mailbox_id, &key, &prepared.message_id).await {
        tracing::warn!(mailbox_id = %mailbox_id, key = %key, error = %e,
            "replayed inbound email published, but its key could not be marked published");
    }
    Ok(Ok(Replayed::Published))
}
