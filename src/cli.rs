//! The operator's commands beside `run`: `send` (a request in the guide's format, published
//! as a CRM would, optionally waiting for its outcome), `outbox show` (one email's row and
//! history), `results tail` (outcomes as they are recorded) and `mailbox sync` (a guide sync
//! request for one mailbox). None of them consumes from the guide's queues: waiting and
//! tailing read the outbox, so the CRM's result consumer misses nothing.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use deadpool_postgres::Pool;

use crate::amqp::{self, Publisher};
use crate::settings::Settings;
use crate::storage;

/// `mailbridge send`.
#[derive(Debug, Clone)]
pub struct SendArgs {
    pub tenant: String,
    pub provider: String,
    pub from: String,
    pub to: Vec<String>,
    pub cc: Vec<String>,
    pub subject: String,
    pub body: Option<String>,
    pub html: Option<PathBuf>,
    pub message_id: Option<String>,
    pub wait: Option<Duration>,
}

/// The outcome columns of an outbox row, as `send --wait`, `outbox show` and `results tail`
/// print them (one JSON object).
const ROW_COLUMNS: &str = "tenant_id, message_id, provider_id, status, attempts, retry_count,
        last_error, error_class, last_reply, provider_message_id, rfc_message_id,
        to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS created_at,
        to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS updated_at,
        to_char(sent_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS sent_at,
        result_published_at IS NOT NULL AS result_published,
        to_char(dead_lettered_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS dead_lettered_at";

fn row_json(row: &tokio_postgres::Row) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for (i, col) in row.columns().iter().enumerate() {
        // `_`-named columns are the query's bookkeeping.
        if col.name().starts_with('_') {
            continue;
        }
        let value = match *col.type_() {
            tokio_postgres::types::Type::INT4 => row
                .try_get::<_, Option<i32>>(i)
                .ok()
                .flatten()
                .map(serde_json::Value::from),
            tokio_postgres::types::Type::BOOL => row
                .try_get::<_, Option<bool>>(i)
                .ok()
                .flatten()
                .map(serde_json::Value::from),
            _ => row
                .try_get::<_, Option<String>>(i)
                .ok()
                .flatten()
                .map(serde_json::Value::from),
        };
        if let Some(v) = value {
            out.insert(col.name().to_string(), v);
        }
    }
    serde_json::Value::Object(out)
}

async fn open_pool(settings: &Settings) -> anyhow::Result<Pool> {
    let pool = storage::pool(&settings.database)?;
    // A first connection now: an unreachable database is said at once (exit 69).
    drop(pool.get().await.map_err(storage::StorageError::from)?);
    Ok(pool)
}

/// Publishes one JSON request to `queue`, confirmed, on a connection of its own (named
/// `what` in the broker).
async fn publish_one(
    settings: &Settings,
    what: &str,
    queue: &str,
    request: &serde_json::Value,
) -> anyhow::Result<()> {
    let conn = Arc::new(amqp::connect(settings, what).await?);
    let publisher = Publisher::new(conn.clone(), 1);
    publisher
        .publish_json(0, queue, &serde_json::to_vec(request)?, None)
        .await
        .with_context(|| format!("the request was not taken by {queue}"))?;
    publisher.close().await;
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}

/// A fresh request id: the time and process, unique enough for a hand-sent email.
fn new_message_id() -> String {
    let nanos = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
    format!("cli-{nanos:x}-{}", std::process::id())
}

/// Publishes one request; with `wait`, polls its outbox row until it is sent or failed
/// (printing it) — `Ok(true)` when sent.
pub async fn send(settings: &Settings, args: SendArgs) -> anyhow::Result<bool> {
    if settings.provider(&args.tenant, &args.provider).is_none() {
        bail!(
            "tenant `{}` has no provider `{}` in this configuration (see `mailbridge check-config`)",
            args.tenant,
            args.provider
        );
    }
    let (format, content) = match (&args.html, &args.body) {
        (Some(file), _) => (
            "HTML",
            std::fs::read_to_string(file)
                .with_context(|| format!("cannot read {}", file.display()))?,
        ),
        (None, Some(text)) => ("TEXT", text.clone()),
        (None, None) => ("TEXT", String::new()),
    };
    let message_id = args.message_id.clone().unwrap_or_else(new_message_id);
    let request = serde_json::json!({
        "tenant_id": args.tenant,
        "provider_id": args.provider,
        "message_id": message_id,
        "from": args.from,
        "to": args.to,
        "cc": args.cc,
        "bcc": [],
        "subject": args.subject,
        "body_format": format,
        "body_content": content,
        "attachments": [],
        "headers": {},
        "timestamp": crate::outbound::rfc3339(time::OffsetDateTime::now_utc()),
    });
    let pool = match args.wait {
        Some(_) => Some(open_pool(settings).await?),
        None => None,
    };
    publish_one(settings, "mailbridge send", &settings.queues.send, &request).await?;
    eprintln!(
        "published {message_id} to {} (tenant {}, provider {})",
        settings.queues.send, args.tenant, args.provider
    );
    let (Some(pool), Some(timeout)) = (pool, args.wait) else {
        println!("{}", serde_json::json!({"message_id": message_id}));
        return Ok(true);
    };
    let start = Instant::now();
    let client = pool.get().await.map_err(storage::StorageError::from)?;
    let sql = format!("SELECT {ROW_COLUMNS} FROM outbox WHERE tenant_id = $1 AND message_id = $2");
    loop {
        let row = client.query_opt(&sql, &[&args.tenant, &message_id]).await?;
        if let Some(row) = row {
            let status: String = row.try_get("status")?;
            if status == "sent" || status == "failed" {
                println!("{}", row_json(&row));
                return Ok(status == "sent");
            }
        }
        if start.elapsed() > timeout {
            bail!(
                "no outcome for {message_id} within {} s: is the service running? `mailbridge outbox show {message_id}` tells later",
                timeout.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Prints the outbox rows with `message_id` (of `tenant`, or every tenant), each with its
/// history; `Ok(false)` when there is none.
pub async fn outbox_show(
    settings: &Settings,
    message_id: &str,
    tenant: Option<&str>,
) -> anyhow::Result<bool> {
    let pool = open_pool(settings).await?;
    let client = pool.get().await.map_err(storage::StorageError::from)?;
    let sql = format!(
        "SELECT {ROW_COLUMNS} FROM outbox
          WHERE message_id = $1 AND ($2::text IS NULL OR tenant_id = $2) ORDER BY tenant_id"
    );
    let rows = client.query(&sql, &[&message_id, &tenant]).await?;
    for row in &rows {
        let mut shown = row_json(row);
        let tenant_id: String = row.try_get("tenant_id")?;
        let events = client
            .query(
                "SELECT event, error, error_class, retry_count, last_reply,
                        to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS at
                   FROM outbox_events WHERE tenant_id = $1 AND message_id = $2 ORDER BY id",
                &[&tenant_id, &message_id],
            )
            .await?;
        shown["history"] = events.iter().map(row_json).collect();
        println!("{}", serde_json::to_string_pretty(&shown)?);
    }
    if rows.is_empty() {
        eprintln!("no request with message_id {message_id} in the outbox");
    }
    Ok(!rows.is_empty())
}

/// Prints every outcome recorded from now on (sent, failed, retrying), one JSON object per
/// line, until interrupted (or, with `limit`, after that many).
pub async fn results_tail(
    settings: &Settings,
    tenant: Option<&str>,
    limit: Option<usize>,
) -> anyhow::Result<()> {
    let pool = open_pool(settings).await?;
    let client = pool.get().await.map_err(storage::StorageError::from)?;
    let mut since: time::OffsetDateTime = client
        .query_one("SELECT clock_timestamp()", &[])
        .await?
        .try_get(0)?;
    let sql = format!(
        "SELECT {ROW_COLUMNS}, updated_at AS _since FROM outbox
          WHERE updated_at > $1 AND status IN ('sent', 'failed', 'retrying')
            AND ($2::text IS NULL OR tenant_id = $2)
          ORDER BY updated_at LIMIT 1000"
    );
    let mut printed = 0usize;
    loop {
        let rows = client.query(&sql, &[&since, &tenant]).await?;
        for row in &rows {
            println!("{}", row_json(row));
            printed += 1;
            if limit.is_some_and(|l| printed >= l) {
                return Ok(());
            }
        }
        if let Some(last) = rows.last() {
            since = last.try_get("_since")?;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Publishes the guide's sync request for mailbox `id` (its tenant, provider and user from
/// the configuration): the instance fetching it syncs now.
pub async fn mailbox_sync(settings: &Settings, id: &str) -> anyhow::Result<()> {
    let Some(mailbox) = settings
        .tenants
        .iter()
        .flat_map(|t| &t.mailboxes)
        .find(|m| m.id == id)
    else {
        bail!("no mailbox `{id}` in this configuration (see `mailbridge check-config`)");
    };
    let request = serde_json::json!({
        "tenant_id": mailbox.tenant_id,
        "provider_id": mailbox.provider_id,
        "user_id": mailbox.user_id,
        "sync_type": "inbound",
        "timestamp": crate::outbound::rfc3339(time::OffsetDateTime::now_utc()),
    });
    publish_one(
        settings,
        "mailbridge mailbox sync",
        &settings.queues.sync_user,
        &request,
    )
    .await?;
    println!("{request}");
    Ok(())
}
