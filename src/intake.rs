//! The inbound intake, shared by the mailbox fetchers and `dlq replay`: turning a received
//! email into the message to publish (parse, store its attachments, encode — plain blocking
//! code, run on tokio's blocking pool by its callers), and what PostgreSQL remembers about a
//! mailbox (the keys already handled and how, its position, the outbox lookup behind
//! `reply_to_message_id`).

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};

use deadpool_postgres::Pool;

use crate::attachments::{AttachmentError, AttachmentStore, Staged};
use crate::inbound::{answered_ids, parse, storable_text, Origin, ParseError};
use crate::storage::StorageError;

/// How much of a Message-ID is kept in `inbound_published.message_id`.
const STORED_ID_BYTES: usize = 900;
/// How much of an error is kept in `inbound_published.error`.
const STORED_ERROR_BYTES: usize = 2000;

/// An email ready to publish: its Message-ID (for the AMQP property) and the JSON body.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub message_id: String,
    pub body: Vec<u8>,
    /// The request (`message_id`) of the mailbox's tenant that this email answers.
    pub reply_to_message_id: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error(transparent)]
    Parse(#[from] ParseError),
    /// mail-parser panicked on it: a bug there, but the email's doing, so it is dead-lettered.
    #[error("the email parser failed on it ({0})")]
    ParserPanicked(String),
    #[error("storing its attachments failed: {0}")]
    Store(#[from] AttachmentError),
    #[error("encoding the message failed: {0}")]
    Encode(String),
}

impl PrepareError {
    /// The email itself is at fault (it goes to the DLQ); otherwise the service is (a full
    /// disk), and the same email can be prepared later.
    pub fn is_the_emails(&self) -> bool {
        matches!(
            self,
            PrepareError::Parse(_) | PrepareError::ParserPanicked(_) | PrepareError::Encode(_)
        )
    }
}

/// Runs `f`, turning a panic into an error: parsing hostile input must not take down the
/// batch (or the actor) it belongs to.
pub fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|p| {
        p.downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".into())
    })
}

/// Parses `raw`, stages its attachments in `staged` and encodes the `email.inbound` message,
/// with `reply_to_message_id` taken from `replies` (outbound Message-ID → request
/// `message_id`). The message links to the staged attachments: commit them
/// ([`AttachmentStore::commit`]) before publishing it. Blocking: call it from the blocking
/// pool.
pub fn prepare(
    raw: &[u8],
    origin: &Origin,
    store: &AttachmentStore,
    staged: &mut Staged,
    replies: &HashMap<String, String>,
    now: i64,
) -> Result<Prepared, PrepareError> {
    let (mut email, attachments) =
        guarded(|| parse(raw, origin)).map_err(PrepareError::ParserPanicked)??;
    for (slot, a) in email.attachments.iter_mut().zip(attachments) {
        let id = store.stage(staged, a.bytes);
        slot.url = store.link(&id, &a.filename, &a.mime_type, now);
    }
    email.reply_to_message_id = answered_ids(&email)
        .iter()
        .find_map(|id| replies.get(id).cloned());
    let body = serde_json::to_vec(&email).map_err(|e| PrepareError::Encode(e.to_string()))?;
    Ok(Prepared {
        message_id: email.message_id,
        body,
        reply_to_message_id: email.reply_to_message_id,
    })
}

/// What happened to an email of a mailbox, as `inbound_published.outcome` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Published,
    /// Sent to the inbound DLQ (its raw bytes stored; see `raw_id`).
    DeadLettered,
    /// Left out by `initial_sync` (there before the mailbox was added, or older than the
    /// window): seen, never published.
    SkippedInitial,
    /// An API message id (`<protocol>-id:<id>`) whose email was handled — its own key says
    /// how; lets a later listing of the same message (a Graph delta of a message that was read,
    /// a re-list) skip downloading it.
    Listed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Published => "published",
            Outcome::DeadLettered => "dead-lettered",
            Outcome::SkippedInitial => "skipped-initial",
            Outcome::Listed => "listed",
        }
    }
}

/// One row of `inbound_published`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub key: String,
    pub message_id: Option<String>,
    pub outcome: Outcome,
    pub raw_id: Option<String>,
    pub error: Option<String>,
    /// The sent email this one answers: its tenant and request `message_id` (shown in the
    /// dashboard's history of that email).
    pub reply_to: Option<(String, String)>,
}

impl Record {
    pub fn new(key: String, outcome: Outcome) -> Self {
        Self {
            key,
            message_id: None,
            outcome,
            raw_id: None,
            error: None,
            reply_to: None,
        }
    }
}

/// A mailbox position, stored as JSON in `mailbox_state.cursor`; its shape is its source's.
/// Any cursor at all also says that the mailbox's first contact (and its `initial_sync`) is
/// done.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MailboxCursor {
    /// UIDVALIDITY and the last UID handled. Within one UIDVALIDITY it only moves forward.
    Imap { uidvalidity: u32, last_uid: u32 },
    /// POP3 keeps no position (UIDL keys say what was handled): first contact is done.
    Pop3,
    /// The Gmail history id after which changes are asked for; `floor` (Unix seconds) is
    /// the oldest mail a re-list publishes (set by `initial_sync` at first contact).
    GmailApi {
        history_id: String,
        floor: Option<i64>,
    },
    /// The Graph delta link to ask for changes; `floor` as for Gmail.
    MsGraph {
        delta_link: String,
        floor: Option<i64>,
    },
}

/// The mailbox's position. One this version cannot read (written by a newer version, or
/// edited by hand) is an error — the mailbox shows it and waits — rather than no position,
/// which would start over by `initial_sync` and could skip mail.
pub async fn cursor(pool: &Pool, mailbox_id: &str) -> Result<Option<MailboxCursor>, StorageError> {
    let client = pool.get().await?;
    let row = client
        .query_opt(
            "SELECT cursor FROM mailbox_state WHERE mailbox_id = $1",
            &[&mailbox_id],
        )
        .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let v: serde_json::Value = row.try_get(0)?;
    // Not shown: a Graph delta link may carry a token.
    serde_json::from_value(v).map(Some).map_err(|e| {
        StorageError::Unreadable(format!(
            "the stored position of mailbox {mailbox_id} cannot be read ({e}); \
             if it was written by a newer version, run that version; to start the mailbox \
             over by its initial_sync, delete its row from mailbox_state"
        ))
    })
}

/// The keys of `keys` this mailbox already has, with their outcome.
pub async fn known(
    pool: &Pool,
    mailbox_id: &str,
    keys: &[String],
) -> Result<HashMap<String, String>, StorageError> {
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let client = pool.get().await?;
    let rows = client
        .query(
            "SELECT dedup_key, outcome FROM inbound_published
             WHERE mailbox_id = $1 AND dedup_key = ANY($2)",
            &[&mailbox_id, &keys],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Records `rows` (a key already there keeps its first outcome) and, when given, the new
/// position, in one transaction. With a `fence`, the position is written only while that
/// lease is the mailbox's current one: otherwise the rows are still recorded (what was
/// published stays known) and [`StorageError::Fenced`] is returned.
pub async fn record(
    pool: &Pool,
    mailbox_id: &str,
    rows: &[Record],
    cursor: Option<&MailboxCursor>,
    fence: Option<&crate::leases::Lease>,
) -> Result<(), StorageError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    if !rows.is_empty() {
        let keys: Vec<&str> = rows.iter().map(|r| r.key.as_str()).collect();
        let ids: Vec<Option<String>> = rows
            .iter()
            .map(|r| {
                r.message_id
                    .as_deref()
                    .map(|m| storable_text(m, STORED_ID_BYTES))
            })
            .collect();
        let outcomes: Vec<&str> = rows.iter().map(|r| r.outcome.as_str()).collect();
        let raw_ids: Vec<Option<&str>> = rows.iter().map(|r| r.raw_id.as_deref()).collect();
        let errors: Vec<Option<String>> = rows
            .iter()
            .map(|r| {
                r.error
                    .as_deref()
                    .map(|e| storable_text(e, STORED_ERROR_BYTES))
            })
            .collect();
        let reply_tenants: Vec<Option<&str>> = rows
            .iter()
            .map(|r| r.reply_to.as_ref().map(|(t, _)| t.as_str()))
            .collect();
        let reply_ids: Vec<Option<&str>> = rows
            .iter()
            .map(|r| r.reply_to.as_ref().map(|(_, m)| m.as_str()))
            .collect();
        tx.execute(
            "INSERT INTO inbound_published (mailbox_id, dedup_key, message_id, outcome, raw_id, error,
                                            reply_tenant_id, reply_to_message_id)
             SELECT $1, k, m, o, r, e, rt, rm
             FROM UNNEST($2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                         $8::text[]) AS x(k, m, o, r, e, rt, rm)
             ON CONFLICT DO NOTHING",
            &[&mailbox_id, &keys, &ids, &outcomes, &raw_ids, &errors, &reply_tenants, &reply_ids],
        )
        .await?;
    }
    let fenced = match (cursor, fence) {
        (Some(_), Some(lease)) => tx
            .query_opt(
                "SELECT 1 FROM mailbox_leases
                 WHERE mailbox_id = $1 AND owner = $2 AND token = $3 AND NOT released
                 FOR SHARE",
                &[&mailbox_id, &lease.owner, &lease.token],
            )
            .await?
            .is_none(),
        _ => false,
    };
    if let Some(cursor) = cursor.filter(|_| !fenced) {
        // Strings and integers only: encoding cannot fail.
        let value = serde_json::to_value(cursor).unwrap_or(serde_json::Value::Null);
        // An IMAP position only moves forward within one UIDVALIDITY; the others are
        // replaced (each is the answer of the API to the one before it).
        tx.execute(
            "INSERT INTO mailbox_state (mailbox_id, cursor) VALUES ($1, $2)
             ON CONFLICT (mailbox_id) DO UPDATE
             SET cursor = CASE
                     WHEN mailbox_state.cursor->>'kind' = 'imap'
                      AND EXCLUDED.cursor->>'kind' = 'imap'
                      AND mailbox_state.cursor->'uidvalidity' = EXCLUDED.cursor->'uidvalidity'
                      AND (mailbox_state.cursor->>'last_uid')::bigint
                          > (EXCLUDED.cursor->>'last_uid')::bigint
                     THEN mailbox_state.cursor
                     ELSE EXCLUDED.cursor END,
                 updated_at = now()",
            &[&mailbox_id, &value],
        )
        .await?;
    }
    tx.commit().await?;
    if fenced {
        return Err(StorageError::Fenced(mailbox_id.to_string()));
    }
    Ok(())
}

/// Outbound Message-ID → request `message_id`, for the candidates this tenant sent.
pub async fn reply_matches(
    pool: &Pool,
    tenant_id: &str,
    candidates: &[String],
) -> Result<HashMap<String, String>, StorageError> {
    if candidates.is_empty() {
        return Ok(HashMap::new());
    }
    let client = pool.get().await?;
    let rows = client
        .query(
            "SELECT rfc_message_id, message_id FROM outbox
             WHERE tenant_id = $1 AND rfc_message_id = ANY($2)",
            &[&tenant_id, &candidates],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Marks a (replayed) dead-lettered email published.
pub async fn mark_published(
    pool: &Pool,
    mailbox_id: &str,
    key: &str,
    message_id: &str,
) -> Result<(), StorageError> {
    let client = pool.get().await?;
    client
        .execute(
            "INSERT INTO inbound_published (mailbox_id, dedup_key, message_id, outcome)
             VALUES ($1, $2, $3, 'published')
             ON CONFLICT (mailbox_id, dedup_key) DO UPDATE
             SET outcome = 'published', message_id = EXCLUDED.message_id, error = NULL,
                 published_at = now()",
            &[
                &mailbox_id,
                &key,
                &storable_text(message_id, STORED_ID_BYTES),
            ],
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parser_panic_is_an_error_of_that_email() {
        let r: Result<u32, String> = guarded(|| panic!("boom {}", 1));
        assert_eq!(r, Err("boom 1".to_string()));
        assert!(PrepareError::ParserPanicked("x".into()).is_the_emails());
        assert!(!PrepareError::Store(AttachmentError::NotFound).is_the_emails());
    }

    #[test]
    fn cursors_are_tagged_json() {
        let c = MailboxCursor::Imap {
            uidvalidity: 7,
            last_uid: 42,
        };
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"kind": "imap", "uidvalidity": 7, "last_uid": 42})
        );
        // What migration 0006 makes of an old row.
        let migrated: MailboxCursor = serde_json::from_value(
            serde_json::json!({"kind": "imap", "uidvalidity": 0, "last_uid": 0}),
        )
        .unwrap();
        assert!(matches!(migrated, MailboxCursor::Imap { .. }));
        let g = MailboxCursor::GmailApi {
            history_id: "123".into(),
            floor: Some(5),
        };
        let back: MailboxCursor =
            serde_json::from_value(serde_json::to_value(&g).unwrap()).unwrap();
        assert_eq!(back, g);
        assert_eq!(
            serde_json::to_value(MailboxCursor::Pop3).unwrap(),
            serde_json::json!({"kind": "pop3"})
        );
    }
}
