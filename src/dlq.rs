//! Operating the dead-letter queues: listing entries and replaying them. Used by the CLI
//! (`mailbridge dlq …`, with a connection of its own) and by the DLQ actor (for HTTP).
//!
//! Listing takes messages with `basic.get` without acknowledging them and then closes the
//! channel, which gives them all back to the queue. Replaying publishes an entry's original
//! request to the send queue (publisher-confirmed, with no retry count, so it gets the whole
//! retry schedule again), resets its outbox row, and only then acknowledges the entry.

use deadpool_postgres::Pool;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Connection};
use serde::Serialize;

use crate::domain::DeadLetterEntry;
use crate::outbox::{self, OutboxKey, OutboxOp};
use crate::settings::Settings;

#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error("AMQP: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("`{0}` is not a dead-letter queue of this service (use {1})")]
    UnknownQueue(String, String),
    #[error("entries of {0} cannot be replayed: inbound mail is fetched again by re-syncing its mailbox")]
    NotReplayable(String),
    #[error("the broker did not confirm the replayed request")]
    NotConfirmed,
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
    /// message_ids (or "(no id)") of the entries sent back to the send queue.
    pub replayed: Vec<String>,
    /// Entries looked at and left on the queue.
    pub kept: usize,
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

/// Replays the selected entries of the outbound DLQ; the rest stay where they are.
pub async fn replay(
    conn: &Connection,
    pool: &Pool,
    settings: &Settings,
    queue: &str,
    selection: &Selection,
) -> Result<ReplayReport, DlqError> {
    check_queue(settings, queue)?;
    if queue != settings.queues.send_dlq() {
        return Err(DlqError::NotReplayable(queue.to_string()));
    }
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let mut report = ReplayReport::default();
    // Bounded by what is on the queue now: replayed entries never come back to it here.
    let depth = ch
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await?
        .message_count() as usize;
    for _ in 0..depth {
        let Some(m) = ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await?
        else {
            break;
        };
        let entry: Option<DeadLetterEntry> = serde_json::from_slice(&m.delivery.data).ok();
        let id_in = |e: &DeadLetterEntry, ids: &[String]| {
            e.message_id.as_ref().is_some_and(|id| ids.contains(id))
        };
        let selected = match (&entry, selection) {
            (Some(_), Selection::All) => true,
            (Some(e), Selection::MessageIds(ids)) => id_in(e, ids),
            (Some(e), Selection::Tenant(t, ids)) => {
                e.tenant_id.as_deref() == Some(t.as_str())
                    && ids.as_ref().is_none_or(|ids| id_in(e, ids))
            }
            (None, _) => false,
        };
        let Some(entry) = entry.filter(|_| selected) else {
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
        let confirm = ch
            .basic_publish(
                "".into(),
                settings.queues.send.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type("application/json".into()),
            )
            .await?
            .await?;
        if confirm.is_nack() {
            return Err(DlqError::NotConfirmed);
        }
        m.delivery.acker.ack(BasicAckOptions::default()).await?;
        report
            .replayed
            .push(entry.message_id.unwrap_or_else(|| "(no id)".into()));
    }
    ch.close(200, "OK".into()).await?;
    Ok(report)
}
