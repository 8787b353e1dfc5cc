//! The outbox table (contract §5): the operations on it, executed in batches.
//!
//! Every operation of one batch that is of the same kind becomes one statement over arrays
//! (`UNNEST`), so a batch of 500 messages costs a handful of round trips, not 500. The outbox
//! writer actor (`actors/outbox.rs`) collects the batches; this module only runs them.

use deadpool_postgres::Pool;
use time::OffsetDateTime;

use crate::storage::StorageError;

/// A request's row identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OutboxKey {
    pub tenant_id: String,
    pub message_id: String,
}

/// What a new request records when it is received.
#[derive(Debug, Clone)]
pub struct NewRow {
    pub key: OutboxKey,
    pub provider_id: String,
    pub user_id: Option<String>,
    pub template_id: Option<String>,
    pub campaign_id: Option<String>,
    pub rfc_message_id: Option<String>,
    /// To be sent right away: the same write marks it `sending` with `attempts + 1`, which
    /// saves the email a statement of its own (issue 7). Requests that fail before reaching a
    /// provider (invalid, unknown provider) are received as `queued`.
    pub sending: bool,
}

/// One change to the outbox.
#[derive(Debug, Clone)]
pub enum OutboxOp {
    /// Insert as `queued` or `sending` ([`NewRow::sending`]), or (for a redelivery) set back
    /// to that — unless already `sent`, which is left as it is and reported, so it is not
    /// sent twice.
    Receive(NewRow),
    Sent {
        key: OutboxKey,
        provider_message_id: String,
        rfc_message_id: String,
        sent_at: OffsetDateTime,
    },
    /// `failed` (terminal) or `retrying`, with the error.
    Failed {
        key: OutboxKey,
        status: &'static str,
        error: String,
    },
    /// The result for this row is confirmed on the result queue.
    ResultPublished(OutboxKey),
    /// A dead letter is replayed: back to `queued` with no attempts, as if new.
    Reset(OutboxKey),
}

impl OutboxOp {
    pub fn key(&self) -> &OutboxKey {
        match self {
            OutboxOp::Receive(r) => &r.key,
            OutboxOp::ResultPublished(k) | OutboxOp::Reset(k) => k,
            OutboxOp::Sent { key, .. } | OutboxOp::Failed { key, .. } => key,
        }
    }
}

/// The row as it stands after a `Receive`.
#[derive(Debug, Clone, PartialEq)]
pub struct Received {
    pub status: String,
    pub attempts: i32,
    pub provider_message_id: Option<String>,
    pub sent_at: Option<OffsetDateTime>,
    pub result_published: bool,
    /// Deliveries since the last recorded outcome, this one included.
    pub deliveries: i32,
}

/// What one operation came to.
#[derive(Debug, Clone, PartialEq)]
pub enum OpOutcome {
    Received(Received),
    Done,
}

/// Runs a batch in one transaction; outcomes are in the order of `ops`. Two `Receive`s of the same key in one
/// batch run in separate statements (one upsert may not touch a row twice).
pub async fn apply(pool: &Pool, ops: &[OutboxOp]) -> Result<Vec<OpOutcome>, StorageError> {
    let mut conn = pool.get().await?;
    // One transaction per batch: one commit (one WAL flush) however many statements.
    let client = conn.transaction().await?;
    let mut outcomes: Vec<Option<OpOutcome>> = vec![None; ops.len()];

    // Receives, in rounds of distinct keys.
    let mut pending: Vec<usize> = ops
        .iter()
        .enumerate()
        .filter(|(_, o)| matches!(o, OutboxOp::Receive(_)))
        .map(|(i, _)| i)
        .collect();
    while !pending.is_empty() {
        let mut seen = std::collections::HashSet::new();
        let (round, rest): (Vec<usize>, Vec<usize>) = pending
            .iter()
            .partition(|i| seen.insert(ops[**i].key().clone()));
        pending = rest;
        let rows: Vec<&NewRow> = round
            .iter()
            .map(|i| match &ops[*i] {
                OutboxOp::Receive(r) => r,
                _ => unreachable!("only receives are in this round"),
            })
            .collect();
        let col = |f: &dyn Fn(&NewRow) -> Option<String>| -> Vec<Option<String>> {
            rows.iter().map(|r| f(r)).collect()
        };
        let tenants = col(&|r| Some(r.key.tenant_id.clone()));
        let messages = col(&|r| Some(r.key.message_id.clone()));
        let providers = col(&|r| Some(r.provider_id.clone()));
        let users = col(&|r| r.user_id.clone());
        let templates = col(&|r| r.template_id.clone());
        let campaigns = col(&|r| r.campaign_id.clone());
        let rfc_ids = col(&|r| r.rfc_message_id.clone());
        let sending: Vec<bool> = rows.iter().map(|r| r.sending).collect();
        let result = client
            .query(
                &client.prepare_cached(RECEIVE_SQL).await?,
                &[
                    &tenants, &messages, &providers, &users, &templates, &campaigns, &rfc_ids,
                    &sending,
                ],
            )
            .await?;
        for row in result {
            let key = OutboxKey {
                tenant_id: row.get(0),
                message_id: row.get(1),
            };
            let received = Received {
                status: row.get(2),
                attempts: row.get(3),
                provider_message_id: row.get(4),
                sent_at: row.get(5),
                result_published: row.get(6),
                deliveries: row.get(7),
            };
            if let Some(i) = round.iter().find(|i| ops[**i].key() == &key) {
                outcomes[*i] = Some(OpOutcome::Received(received));
            }
        }
    }

    // Sent.
    let sent: Vec<_> = ops
        .iter()
        .filter_map(|o| match o {
            OutboxOp::Sent {
                key,
                provider_message_id,
                rfc_message_id,
                sent_at,
            } => Some((key, provider_message_id, rfc_message_id, sent_at)),
            _ => None,
        })
        .collect();
    if !sent.is_empty() {
        let t: Vec<&str> = sent.iter().map(|s| s.0.tenant_id.as_str()).collect();
        let m: Vec<&str> = sent.iter().map(|s| s.0.message_id.as_str()).collect();
        let p: Vec<&str> = sent.iter().map(|s| s.1.as_str()).collect();
        let r: Vec<&str> = sent.iter().map(|s| s.2.as_str()).collect();
        let at: Vec<OffsetDateTime> = sent.iter().map(|s| *s.3).collect();
        client
            .execute(
                &client.prepare_cached(SENT_SQL).await?,
                &[&t, &m, &p, &r, &at],
            )
            .await?;
    }

    // Failed / retrying.
    let failed: Vec<_> = ops
        .iter()
        .filter_map(|o| match o {
            OutboxOp::Failed { key, status, error } => Some((key, *status, error)),
            _ => None,
        })
        .collect();
    if !failed.is_empty() {
        let t: Vec<&str> = failed.iter().map(|s| s.0.tenant_id.as_str()).collect();
        let m: Vec<&str> = failed.iter().map(|s| s.0.message_id.as_str()).collect();
        let st: Vec<&str> = failed.iter().map(|s| s.1).collect();
        let e: Vec<&str> = failed.iter().map(|s| s.2.as_str()).collect();
        client
            .execute(
                &client.prepare_cached(FAILED_SQL).await?,
                &[&t, &m, &st, &e],
            )
            .await?;
    }

    // Result published.
    let (t, m) = keys(ops, |o| matches!(o, OutboxOp::ResultPublished(_)));
    if !t.is_empty() {
        client
            .execute(
                &client.prepare_cached(RESULT_PUBLISHED_SQL).await?,
                &[&t, &m],
            )
            .await?;
    }

    // Reset (replay).
    let (t, m) = keys(ops, |o| matches!(o, OutboxOp::Reset(_)));
    if !t.is_empty() {
        client
            .execute(&client.prepare_cached(RESET_SQL).await?, &[&t, &m])
            .await?;
    }

    client.commit().await?;
    Ok(outcomes
        .into_iter()
        .map(|o| o.unwrap_or(OpOutcome::Done))
        .collect())
}

fn keys(ops: &[OutboxOp], pick: impl Fn(&OutboxOp) -> bool) -> (Vec<&str>, Vec<&str>) {
    ops.iter()
        .filter(|o| pick(o))
        .map(|o| (o.key().tenant_id.as_str(), o.key().message_id.as_str()))
        .unzip()
}

// The statements, prepared once per connection (`prepare_cached`): PostgreSQL parses and
// plans each only once, and a batch costs one round trip per statement.

/// Insert as `queued` or `sending`, or count a redelivery (a `sent` row is left as it is).
const RECEIVE_SQL: &str =
    "INSERT INTO outbox (tenant_id, message_id, provider_id, user_id, template_id,
                        campaign_id, rfc_message_id, status, attempts, deliveries)
    SELECT t, m, p, u, tp, c, r, CASE WHEN s THEN 'sending' ELSE 'queued' END,
           CASE WHEN s THEN 1 ELSE 0 END, 1
    FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                $6::text[], $7::text[], $8::bool[]) AS x(t, m, p, u, tp, c, r, s)
    ON CONFLICT (tenant_id, message_id) DO UPDATE SET
        status = CASE WHEN outbox.status = 'sent' THEN 'sent' ELSE EXCLUDED.status END,
        attempts = CASE WHEN outbox.status = 'sent' THEN outbox.attempts
                        ELSE outbox.attempts + EXCLUDED.attempts END,
        provider_id = CASE WHEN outbox.status = 'sent' THEN outbox.provider_id
                           ELSE EXCLUDED.provider_id END,
        user_id = COALESCE(EXCLUDED.user_id, outbox.user_id),
        template_id = COALESCE(EXCLUDED.template_id, outbox.template_id),
        campaign_id = COALESCE(EXCLUDED.campaign_id, outbox.campaign_id),
        rfc_message_id = COALESCE(outbox.rfc_message_id, EXCLUDED.rfc_message_id),
        deliveries = CASE WHEN outbox.status = 'sent' THEN outbox.deliveries
                          ELSE outbox.deliveries + 1 END,
        updated_at = now()
    RETURNING tenant_id, message_id, status, attempts, provider_message_id, sent_at,
              result_published_at IS NOT NULL, deliveries";

/// The provider accepted the email.
const SENT_SQL: &str = "UPDATE outbox o SET status = 'sent', provider_message_id = u.p,
           rfc_message_id = u.r, sent_at = u.at, last_error = NULL, deliveries = 0,
           updated_at = now()
    FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[])
         AS u(t, m, p, r, at)
    WHERE o.tenant_id = u.t AND o.message_id = u.m";

/// `failed` or `retrying`, with the error.
const FAILED_SQL: &str =
    "UPDATE outbox o SET status = u.s, last_error = u.e, deliveries = 0, updated_at = now()
    FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[]) AS u(t, m, s, e)
    WHERE o.tenant_id = u.t AND o.message_id = u.m AND o.status <> 'sent'";

/// The result is confirmed on the result queue.
const RESULT_PUBLISHED_SQL: &str = "UPDATE outbox o SET result_published_at = now()
    FROM UNNEST($1::text[], $2::text[]) AS u(t, m)
    WHERE o.tenant_id = u.t AND o.message_id = u.m";

/// A replayed dead letter starts again as new.
const RESET_SQL: &str = "UPDATE outbox o SET status = 'queued', attempts = 0, deliveries = 0,
           last_error = NULL, result_published_at = NULL, updated_at = now()
    FROM UNNEST($1::text[], $2::text[]) AS u(t, m)
    WHERE o.tenant_id = u.t AND o.message_id = u.m AND o.status <> 'sent'";
