//! The outbox table (contract §5): the operations on it, executed in batches.
//!
//! Every operation of one batch that is of the same kind becomes one statement over arrays
//! (`UNNEST`), so a batch of 500 messages costs a handful of round trips, not 500. The outbox
//! writer actor (`actors/outbox.rs`) collects the batches and holds the claims; this module
//! only runs them.
//!
//! **Claims.** A delivery takes up its request with [`OutboxOp::Claim`]: one conditional write
//! that inserts the row, or takes over an existing one only when it is not terminal (`sent`,
//! `failed`), carries no live claim, and — when a retry is parked — this copy carries that
//! retry's token. The claim (instance, token, expiry) is what makes a second copy of the same
//! request (a CRM re-publish, a redelivery, a replayed duplicate, another instance) wait or
//! stand down instead of sending the email twice. The claim ends when the request is
//! finished — its result published ([`OutboxOp::ResultPublished`]) — or handed back to the
//! broker (a retry parked, [`OutboxOp::Failed`] with `retrying`; or [`OutboxOp::Release`]).

use std::fmt;

use deadpool_postgres::Pool;
use time::OffsetDateTime;

use crate::storage::StorageError;

/// A request's row identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OutboxKey {
    pub tenant_id: String,
    pub message_id: String,
}

/// The `status` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowStatus {
    /// Received, not taken up by a provider (on its way to `failed`, or a replayed dead letter).
    Queued,
    /// A delivery holds it and is sending it.
    Sending,
    /// A retry is parked in a delay queue.
    Retrying,
    Sent,
    Failed,
}

impl RowStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RowStatus::Queued => "queued",
            RowStatus::Sending => "sending",
            RowStatus::Retrying => "retrying",
            RowStatus::Sent => "sent",
            RowStatus::Failed => "failed",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "sending" => RowStatus::Sending,
            "retrying" => RowStatus::Retrying,
            "sent" => RowStatus::Sent,
            "failed" => RowStatus::Failed,
            _ => RowStatus::Queued,
        }
    }

    /// `sent` and `failed`: nothing more happens to the request.
    pub fn is_terminal(self) -> bool {
        matches!(self, RowStatus::Sent | RowStatus::Failed)
    }
}

impl fmt::Display for RowStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a new request records when it is taken up.
#[derive(Debug, Clone)]
pub struct NewRow {
    pub key: OutboxKey,
    pub provider_id: String,
    pub user_id: Option<String>,
    pub template_id: Option<String>,
    pub campaign_id: Option<String>,
    /// The recipients (to, cc, bcc; lower-cased, `", "`-separated) and the subject, as the
    /// dashboard searches and shows them; written by the first claim only.
    pub recipients: Option<String>,
    pub subject: Option<String>,
    /// To be sent right away: the same write marks it `sending` with `attempts + 1`, which
    /// saves the email a statement of its own (issue 7). Requests that fail before reaching a
    /// provider (invalid, unknown provider) are taken up as `queued`.
    pub sending: bool,
}

/// Taking up a request: see the module documentation.
#[derive(Debug, Clone)]
pub struct ClaimRequest {
    pub row: NewRow,
    /// The claim's token (chosen by the writer).
    pub token: i64,
    /// The parked retry this copy continues (its `x-mailbridge-retry-token` header).
    pub retry_token: Option<String>,
    /// Take over this instance's own claim with this token (one the writer knows was
    /// released, though the release did not reach the database).
    pub steal: Option<i64>,
}

/// How a failure is recorded.
#[derive(Debug, Clone)]
pub struct FailureRecord {
    pub key: OutboxKey,
    /// The claim this outcome belongs to: it applies only while that claim (or none) is on
    /// the row, so a delivery that lost its claim does not overwrite its successor's state.
    pub token: i64,
    /// `Retrying` or `Failed`.
    pub status: RowStatus,
    pub error: String,
    pub error_class: String,
    pub retry_count: u32,
    pub last_reply: Option<String>,
    /// The parked retry's token and when it is due (for `Retrying`).
    pub retry_token: Option<String>,
    pub retry_in_secs: Option<f64>,
    /// The attempt's outcome is unknown (connection lost after the final dot).
    pub uncertain: bool,
}

/// One change to the outbox.
#[derive(Debug, Clone)]
pub enum OutboxOp {
    Claim(ClaimRequest),
    /// Extend a live claim (the holder is still working).
    Renew {
        key: OutboxKey,
        token: i64,
    },
    /// Give a claim up without an outcome (the delivery is given back to the broker).
    Release {
        key: OutboxKey,
        token: i64,
    },
    /// The provider accepted the email. The claim stays until the result is published, so
    /// a copy waits for that instead of publishing a second result.
    Sent {
        key: OutboxKey,
        provider_message_id: String,
        rfc_message_id: String,
        sent_at: OffsetDateTime,
    },
    /// `retrying` (releases the claim: the request is back in the broker's hands) or
    /// `failed` (keeps it until the result is published, as `Sent` does).
    Failed(FailureRecord),
    /// The dead letter of a `failed` row is confirmed on the DLQ.
    DeadLettered(OutboxKey),
    /// The result for this row is confirmed on the result queue; the claim with `token` (the
    /// first copy's, when it published it) ends.
    ResultPublished {
        key: OutboxKey,
        token: Option<i64>,
    },
    /// A dead letter is replayed: back to `queued` with no attempts, as if new.
    Reset(OutboxKey),
}

impl OutboxOp {
    pub fn key(&self) -> &OutboxKey {
        match self {
            OutboxOp::Claim(c) => &c.row.key,
            OutboxOp::Failed(f) => &f.key,
            OutboxOp::DeadLettered(k) | OutboxOp::Reset(k) => k,
            OutboxOp::Renew { key, .. }
            | OutboxOp::Release { key, .. }
            | OutboxOp::ResultPublished { key, .. }
            | OutboxOp::Sent { key, .. } => key,
        }
    }
}

/// A row as it stands, for a copy that could not claim it.
#[derive(Debug, Clone, PartialEq)]
pub struct RowState {
    pub status: RowStatus,
    pub provider_id: String,
    pub claim_owner: Option<String>,
    pub claim_token: Option<i64>,
    /// A claim is on the row and has not expired.
    pub claim_live: bool,
    /// Seconds until the claim expires (negative once expired).
    pub claim_expires_in: f64,
    pub retry_token: Option<String>,
    pub provider_message_id: Option<String>,
    pub sent_at: Option<OffsetDateTime>,
    pub result_published: bool,
    pub dead_lettered: bool,
    pub last_error: Option<String>,
    pub error_class: Option<String>,
    pub retry_count: i32,
    pub last_reply: Option<String>,
}

/// What one operation came to.
#[derive(Debug, Clone, PartialEq)]
pub enum OpOutcome {
    /// The claim is held: `attempts` so far (this one included when sending) and deliveries
    /// since the last recorded outcome (this one included).
    Claimed {
        attempts: i32,
        deliveries: i32,
    },
    /// Not claimed; the row as it stands.
    NotClaimed(Box<RowState>),
    /// A conditional change: whether it applied.
    Applied(bool),
    Done,
}

/// Who claims, and for how long (the writer's settings).
#[derive(Debug, Clone)]
pub struct ClaimConfig {
    pub owner: String,
    pub ttl_secs: f64,
}

/// A retrying row whose parked retry is this much overdue may be taken over by any copy (the
/// delay queue was purged, say), so a lost retry cannot strand its request.
const RETRY_OVERDUE_SECS: f64 = 300.0;

/// Runs a batch in one transaction; outcomes are in the order of `ops`. Two operations on the
/// same key in one batch run in separate rounds (one statement may not touch a row twice).
pub async fn apply(
    pool: &Pool,
    claims: &ClaimConfig,
    ops: &[OutboxOp],
) -> Result<Vec<OpOutcome>, StorageError> {
    let mut conn = pool.get().await?;
    // One transaction per batch: one commit (one WAL flush) however many statements.
    let client = conn.transaction().await?;
    let mut outcomes: Vec<Option<OpOutcome>> = vec![None; ops.len()];

    let mut pending: Vec<usize> = (0..ops.len()).collect();
    while !pending.is_empty() {
        let mut seen = std::collections::HashSet::new();
        let (round, rest): (Vec<usize>, Vec<usize>) = pending
            .iter()
            .partition(|i| seen.insert(ops[**i].key().clone()));
        pending = rest;
        run_round(&client, claims, ops, &round, &mut outcomes).await?;
    }

    client.commit().await?;
    Ok(outcomes
        .into_iter()
        .map(|o| o.unwrap_or(OpOutcome::Done))
        .collect())
}

/// The operations of `round` (distinct keys), one statement per kind.
async fn run_round(
    client: &deadpool_postgres::Transaction<'_>,
    claims: &ClaimConfig,
    ops: &[OutboxOp],
    round: &[usize],
    outcomes: &mut [Option<OpOutcome>],
) -> Result<(), StorageError> {
    let of = |pick: fn(&OutboxOp) -> bool| -> Vec<usize> {
        round.iter().copied().filter(|i| pick(&ops[*i])).collect()
    };

    let claim_ix = of(|o| matches!(o, OutboxOp::Claim(_)));
    if !claim_ix.is_empty() {
        claim(client, claims, ops, &claim_ix, outcomes).await?;
    }

    let sent_ix = of(|o| matches!(o, OutboxOp::Sent { .. }));
    if !sent_ix.is_empty() {
        let mut t = Vec::new();
        let mut m = Vec::new();
        let mut p = Vec::new();
        let mut r = Vec::new();
        let mut at = Vec::new();
        for i in &sent_ix {
            if let OutboxOp::Sent {
                key,
                provider_message_id,
                rfc_message_id,
                sent_at,
            } = &ops[*i]
            {
                t.push(key.tenant_id.as_str());
                m.push(key.message_id.as_str());
                p.push(provider_message_id.as_str());
                r.push(rfc_message_id.as_str());
                at.push(*sent_at);
            }
        }
        client
            .execute(
                &client.prepare_cached(SENT_SQL).await?,
                &[&t, &m, &p, &r, &at],
            )
            .await?;
    }

    let failed_ix = of(|o| matches!(o, OutboxOp::Failed(_)));
    if !failed_ix.is_empty() {
        let recs: Vec<&FailureRecord> = failed_ix
            .iter()
            .filter_map(|i| match &ops[*i] {
                OutboxOp::Failed(f) => Some(f),
                _ => None,
            })
            .collect();
        let t: Vec<&str> = recs.iter().map(|f| f.key.tenant_id.as_str()).collect();
        let m: Vec<&str> = recs.iter().map(|f| f.key.message_id.as_str()).collect();
        let tok: Vec<i64> = recs.iter().map(|f| f.token).collect();
        let st: Vec<&str> = recs.iter().map(|f| f.status.as_str()).collect();
        let e: Vec<&str> = recs.iter().map(|f| f.error.as_str()).collect();
        let c: Vec<&str> = recs.iter().map(|f| f.error_class.as_str()).collect();
        let rc: Vec<i32> = recs
            .iter()
            .map(|f| i32::try_from(f.retry_count).unwrap_or(i32::MAX))
            .collect();
        let lr: Vec<Option<&str>> = recs.iter().map(|f| f.last_reply.as_deref()).collect();
        let rt: Vec<Option<&str>> = recs.iter().map(|f| f.retry_token.as_deref()).collect();
        let rin: Vec<Option<f64>> = recs.iter().map(|f| f.retry_in_secs).collect();
        let unc: Vec<bool> = recs.iter().map(|f| f.uncertain).collect();
        let rows = client
            .query(
                &client.prepare_cached(FAILED_SQL).await?,
                &[&t, &m, &tok, &st, &e, &c, &rc, &lr, &rt, &rin, &unc],
            )
            .await?;
        let applied: std::collections::HashSet<(String, String)> =
            rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        for i in &failed_ix {
            let k = ops[*i].key();
            outcomes[*i] = Some(OpOutcome::Applied(
                applied.contains(&(k.tenant_id.clone(), k.message_id.clone())),
            ));
        }
    }

    // Renewals, releases and published results: key and claim token.
    for (kind, sql) in [
        (Tokened::Renew, RENEW_SQL),
        (Tokened::Release, RELEASE_SQL),
        (Tokened::ResultPublished, RESULT_PUBLISHED_SQL),
    ] {
        let ix: Vec<usize> = round
            .iter()
            .copied()
            .filter(|i| Tokened::of(&ops[*i]).is_some_and(|(k, _)| k == kind))
            .collect();
        if ix.is_empty() {
            continue;
        }
        let (t, m) = keys(ops, &ix);
        let tok: Vec<Option<i64>> = ix
            .iter()
            .map(|i| Tokened::of(&ops[*i]).and_then(|(_, t)| t))
            .collect();
        let stmt = client.prepare_cached(sql).await?;
        if kind == Tokened::Renew {
            client
                .execute(&stmt, &[&t, &m, &tok, &claims.ttl_secs])
                .await?;
        } else {
            client.execute(&stmt, &[&t, &m, &tok]).await?;
        }
    }

    for (pick, sql) in [
        (
            (|o: &OutboxOp| matches!(o, OutboxOp::DeadLettered(_))) as fn(&OutboxOp) -> bool,
            DEAD_LETTERED_SQL,
        ),
        (|o| matches!(o, OutboxOp::Reset(_)), RESET_SQL),
    ] {
        let ix = of(pick);
        if ix.is_empty() {
            continue;
        }
        let (t, m) = keys(ops, &ix);
        client
            .execute(&client.prepare_cached(sql).await?, &[&t, &m])
            .await?;
    }
    Ok(())
}

/// The operations that carry a claim token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tokened {
    Renew,
    Release,
    ResultPublished,
}

impl Tokened {
    fn of(op: &OutboxOp) -> Option<(Self, Option<i64>)> {
        match op {
            OutboxOp::Renew { token, .. } => Some((Tokened::Renew, Some(*token))),
            OutboxOp::Release { token, .. } => Some((Tokened::Release, Some(*token))),
            OutboxOp::ResultPublished { token, .. } => Some((Tokened::ResultPublished, *token)),
            _ => None,
        }
    }
}

fn keys<'a>(ops: &'a [OutboxOp], ix: &[usize]) -> (Vec<&'a str>, Vec<&'a str>) {
    ix.iter()
        .map(|i| {
            let k = ops[*i].key();
            (k.tenant_id.as_str(), k.message_id.as_str())
        })
        .unzip()
}

/// Claims: insert what is new; take over what may be taken over; read the state of the rest.
async fn claim(
    client: &deadpool_postgres::Transaction<'_>,
    claims: &ClaimConfig,
    ops: &[OutboxOp],
    ix: &[usize],
    outcomes: &mut [Option<OpOutcome>],
) -> Result<(), StorageError> {
    let reqs: Vec<(usize, &ClaimRequest)> = ix
        .iter()
        .filter_map(|i| match &ops[*i] {
            OutboxOp::Claim(c) => Some((*i, c)),
            _ => None,
        })
        .collect();
    let find = |t: &str, m: &str| {
        reqs.iter()
            .find(|(_, c)| c.row.key.tenant_id == t && c.row.key.message_id == m)
            .map(|(i, _)| *i)
    };
    let column = |f: &dyn Fn(&ClaimRequest) -> Option<String>, of: &[&ClaimRequest]| {
        of.iter().map(|c| f(c)).collect::<Vec<Option<String>>>()
    };

    // 1. New requests: inserted, claimed.
    let all: Vec<&ClaimRequest> = reqs.iter().map(|(_, c)| *c).collect();
    let inserted = client
        .query(
            &client.prepare_cached(CLAIM_INSERT_SQL).await?,
            &[
                &column(&|c| Some(c.row.key.tenant_id.clone()), &all),
                &column(&|c| Some(c.row.key.message_id.clone()), &all),
                &column(&|c| Some(c.row.provider_id.clone()), &all),
                &column(&|c| c.row.user_id.clone(), &all),
                &column(&|c| c.row.template_id.clone(), &all),
                &column(&|c| c.row.campaign_id.clone(), &all),
                &all.iter().map(|c| c.row.sending).collect::<Vec<bool>>(),
                &all.iter().map(|c| c.token).collect::<Vec<i64>>(),
                &claims.owner,
                &claims.ttl_secs,
                &column(&|c| c.row.recipients.clone(), &all),
                &column(&|c| c.row.subject.clone(), &all),
            ],
        )
        .await?;
    for row in &inserted {
        if let Some(i) = find(row.get(0), row.get(1)) {
            outcomes[i] = Some(OpOutcome::Claimed {
                attempts: row.get(2),
                deliveries: row.get(3),
            });
        }
    }

    // 2. Existing rows: taken over when they may be.
    let rest: Vec<&ClaimRequest> = reqs
        .iter()
        .filter(|(i, _)| outcomes[*i].is_none())
        .map(|(_, c)| *c)
        .collect();
    if rest.is_empty() {
        return Ok(());
    }
    let updated = client
        .query(
            &client.prepare_cached(CLAIM_UPDATE_SQL).await?,
            &[
                &column(&|c| Some(c.row.key.tenant_id.clone()), &rest),
                &column(&|c| Some(c.row.key.message_id.clone()), &rest),
                &column(&|c| Some(c.row.provider_id.clone()), &rest),
                &column(&|c| c.row.user_id.clone(), &rest),
                &column(&|c| c.row.template_id.clone(), &rest),
                &column(&|c| c.row.campaign_id.clone(), &rest),
                &rest.iter().map(|c| c.row.sending).collect::<Vec<bool>>(),
                &rest.iter().map(|c| c.token).collect::<Vec<i64>>(),
                &column(&|c| c.retry_token.clone(), &rest),
                &rest.iter().map(|c| c.steal).collect::<Vec<Option<i64>>>(),
                &claims.owner,
                &claims.ttl_secs,
                &RETRY_OVERDUE_SECS,
            ],
        )
        .await?;
    for row in &updated {
        if let Some(i) = find(row.get(0), row.get(1)) {
            outcomes[i] = Some(OpOutcome::Claimed {
                attempts: row.get(2),
                deliveries: row.get(3),
            });
        }
    }

    // 3. The others: their state, for the caller to decide (duplicate, wait, retry).
    let left: Vec<&ClaimRequest> = reqs
        .iter()
        .filter(|(i, _)| outcomes[*i].is_none())
        .map(|(_, c)| *c)
        .collect();
    if left.is_empty() {
        return Ok(());
    }
    let rows = client
        .query(
            &client.prepare_cached(STATE_SQL).await?,
            &[
                &column(&|c| Some(c.row.key.tenant_id.clone()), &left),
                &column(&|c| Some(c.row.key.message_id.clone()), &left),
            ],
        )
        .await?;
    for row in &rows {
        let Some(i) = find(row.get(0), row.get(1)) else {
            continue;
        };
        let status: String = row.get(2);
        outcomes[i] = Some(OpOutcome::NotClaimed(Box::new(RowState {
            status: RowStatus::parse(&status),
            provider_id: row.get(3),
            claim_owner: row.get(4),
            claim_token: row.get(5),
            claim_live: row.get(6),
            claim_expires_in: row.get::<_, Option<f64>>(7).unwrap_or(0.0),
            retry_token: row.get(8),
            provider_message_id: row.get(9),
            sent_at: row.get(10),
            result_published: row.get(11),
            dead_lettered: row.get(12),
            last_error: row.get(13),
            error_class: row.get(14),
            retry_count: row.get(15),
            last_reply: row.get(16),
        })));
    }
    Ok(())
}

/// Releases every claim this instance's previous run left (at start, before any delivery).
///
/// The claim owner is not indexed (so that ending a claim is a HOT update): the claims are
/// looked for through the status index, on the rows that can hold one — not finished, or
/// finished (`sent`, `failed`) within [`RELEASE_WINDOW`] (a claim ends when the result is
/// published, moments after). One held longer than that (its result unpublishable for an
/// hour) is not released here and expires within `claim_ttl`, as any other instance's does.
pub async fn release_claims_of(pool: &Pool, owner: &str) -> Result<u64, StorageError> {
    let client = pool.get().await?;
    let window = RELEASE_WINDOW.as_secs_f64();
    Ok(client
        .execute(
            "UPDATE outbox SET claim_owner = NULL, claim_token = NULL, claim_expires_at = NULL
             WHERE claim_owner = $1 AND claim_token IS NOT NULL
               AND (status IN ('queued', 'sending', 'retrying')
                    OR (status IN ('sent', 'failed')
                        AND updated_at > now() - $2 * interval '1 second'))",
            &[&owner, &window],
        )
        .await?)
}

/// How long after its outcome a claim is looked for at start ([`release_claims_of`]).
pub const RELEASE_WINDOW: std::time::Duration = std::time::Duration::from_secs(3600);

// The statements, prepared once per connection (`prepare_cached`): PostgreSQL parses and
// plans each only once, and a batch costs one round trip per statement.

/// A new request, claimed as it is inserted.
const CLAIM_INSERT_SQL: &str = "INSERT INTO outbox (tenant_id, message_id, provider_id, user_id,
        template_id, campaign_id, status, attempts, deliveries, claim_owner, claim_token,
        claim_expires_at, recipients, subject)
    SELECT t, m, p, u, tp, c, CASE WHEN s THEN 'sending' ELSE 'queued' END,
           CASE WHEN s THEN 1 ELSE 0 END, 1, $9, tok, now() + $10 * interval '1 second',
           rcp, sub
    FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                $7::bool[], $8::bigint[], $11::text[], $12::text[])
         AS x(t, m, p, u, tp, c, s, tok, rcp, sub)
    ON CONFLICT (tenant_id, message_id) DO NOTHING
    RETURNING tenant_id, message_id, attempts, deliveries";

/// An existing row, taken over when it is not terminal, carries no live claim (or one of
/// ours the writer released), and — with a retry parked — this copy continues that retry (or
/// the retry is long overdue).
const CLAIM_UPDATE_SQL: &str = "UPDATE outbox o SET
        status = CASE WHEN x.s THEN 'sending' ELSE 'queued' END,
        attempts = o.attempts + CASE WHEN x.s THEN 1 ELSE 0 END,
        provider_id = x.p,
        user_id = COALESCE(x.u, o.user_id),
        template_id = COALESCE(x.tp, o.template_id),
        campaign_id = COALESCE(x.c, o.campaign_id),
        deliveries = o.deliveries + 1,
        claim_owner = $11, claim_token = x.tok,
        claim_expires_at = now() + $12 * interval '1 second',
        retry_token = NULL, next_retry_at = NULL,
        updated_at = now()
    FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                $7::bool[], $8::bigint[], $9::text[], $10::bigint[])
         AS x(t, m, p, u, tp, c, s, tok, rt, steal)
    WHERE o.tenant_id = x.t AND o.message_id = x.m
      AND o.status NOT IN ('sent', 'failed')
      AND (o.claim_token IS NULL OR o.claim_expires_at < now()
           OR (o.claim_owner = $11 AND o.claim_token = x.steal))
      AND (o.status <> 'retrying' OR o.retry_token IS NULL OR o.retry_token = x.rt
           OR o.next_retry_at < now() - $13 * interval '1 second')
    RETURNING o.tenant_id, o.message_id, o.attempts, o.deliveries";

/// The state of rows that could not be claimed.
const STATE_SQL: &str = "SELECT o.tenant_id, o.message_id, o.status, o.provider_id,
        o.claim_owner, o.claim_token,
        (o.claim_token IS NOT NULL AND o.claim_expires_at >= now()),
        EXTRACT(EPOCH FROM (o.claim_expires_at - now()))::float8,
        o.retry_token, o.provider_message_id, o.sent_at,
        o.result_published_at IS NOT NULL, o.dead_lettered_at IS NOT NULL,
        o.last_error, o.error_class, o.retry_count, o.last_reply
    FROM outbox o JOIN UNNEST($1::text[], $2::text[]) AS x(t, m)
      ON o.tenant_id = x.t AND o.message_id = x.m";

/// The provider accepted the email.
const SENT_SQL: &str = "UPDATE outbox o SET status = 'sent', provider_message_id = u.p,
           rfc_message_id = u.r, sent_at = u.at, last_error = NULL, deliveries = 0,
           retry_token = NULL, next_retry_at = NULL, updated_at = now()
    FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[])
         AS u(t, m, p, r, at)
    WHERE o.tenant_id = u.t AND o.message_id = u.m";

/// `failed` or `retrying`, with the whole failure; only while this claim (or none) holds the
/// row. Each failure applied is also an `outbox_events` row (the email's history).
const FAILED_SQL: &str = "WITH f AS (UPDATE outbox o SET status = u.s, last_error = u.e,
           error_class = u.c, retry_count = u.rc, last_reply = u.lr,
           retry_token = u.rt,
           next_retry_at = CASE WHEN u.rin IS NULL THEN NULL
                                ELSE now() + u.rin * interval '1 second' END,
           uncertain = o.uncertain OR u.unc, deliveries = 0,
           claim_owner = CASE WHEN u.s = 'retrying' THEN NULL ELSE o.claim_owner END,
           claim_token = CASE WHEN u.s = 'retrying' THEN NULL ELSE o.claim_token END,
           claim_expires_at = CASE WHEN u.s = 'retrying' THEN NULL ELSE o.claim_expires_at END,
           updated_at = now()
    FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[],
                $7::int[], $8::text[], $9::text[], $10::float8[], $11::bool[])
         AS u(t, m, tok, s, e, c, rc, lr, rt, rin, unc)
    WHERE o.tenant_id = u.t AND o.message_id = u.m AND o.status <> 'sent'
      AND (o.claim_token IS NULL OR o.claim_token = u.tok)
    RETURNING o.tenant_id, o.message_id, o.status, o.last_error, o.error_class, o.retry_count,
              o.last_reply),
    ev AS (INSERT INTO outbox_events (tenant_id, message_id, event, error, error_class,
                                      retry_count, last_reply)
           SELECT tenant_id, message_id, status, last_error, error_class, retry_count, last_reply
           FROM f)
    SELECT tenant_id, message_id FROM f";

/// A claim's holder is still working.
const RENEW_SQL: &str = "UPDATE outbox o SET claim_expires_at = now() + $4 * interval '1 second'
    FROM UNNEST($1::text[], $2::text[], $3::bigint[]) AS u(t, m, tok)
    WHERE o.tenant_id = u.t AND o.message_id = u.m AND o.claim_token = u.tok";

/// A claim given up without an outcome.
const RELEASE_SQL: &str = "UPDATE outbox o SET claim_owner = NULL, claim_token = NULL,
           claim_expires_at = NULL
    FROM UNNEST($1::text[], $2::text[], $3::bigint[]) AS u(t, m, tok)
    WHERE o.tenant_id = u.t AND o.message_id = u.m AND o.claim_token = u.tok";

/// The result is confirmed on the result queue: the request is finished, and the claim of
/// the copy that published it ends.
const RESULT_PUBLISHED_SQL: &str = "UPDATE outbox o SET result_published_at = now(),
           claim_owner = CASE WHEN o.claim_token = u.tok THEN NULL ELSE o.claim_owner END,
           claim_expires_at = CASE WHEN o.claim_token = u.tok THEN NULL
                                   ELSE o.claim_expires_at END,
           claim_token = CASE WHEN o.claim_token = u.tok THEN NULL ELSE o.claim_token END
    FROM UNNEST($1::text[], $2::text[], $3::bigint[]) AS u(t, m, tok)
    WHERE o.tenant_id = u.t AND o.message_id = u.m";

/// The dead letter is confirmed on the DLQ (an event of the email's history).
const DEAD_LETTERED_SQL: &str = "WITH d AS (UPDATE outbox o SET dead_lettered_at = now()
    FROM UNNEST($1::text[], $2::text[]) AS u(t, m)
    WHERE o.tenant_id = u.t AND o.message_id = u.m
    RETURNING o.tenant_id, o.message_id)
    INSERT INTO outbox_events (tenant_id, message_id, event)
    SELECT tenant_id, message_id, 'dead-lettered' FROM d";

/// A replayed dead letter starts again as new (an event of the email's history).
const RESET_SQL: &str =
    "WITH r AS (UPDATE outbox o SET status = 'queued', attempts = 0, deliveries = 0,
           last_error = NULL, error_class = NULL, retry_count = 0, last_reply = NULL,
           result_published_at = NULL, dead_lettered_at = NULL, retry_token = NULL,
           next_retry_at = NULL, updated_at = now()
    FROM UNNEST($1::text[], $2::text[]) AS u(t, m)
    WHERE o.tenant_id = u.t AND o.message_id = u.m AND o.status <> 'sent'
    RETURNING o.tenant_id, o.message_id)
    INSERT INTO outbox_events (tenant_id, message_id, event)
    SELECT tenant_id, message_id, 'replayed' FROM r";
