//! The mailboxes' health shared by the instances (issue 13). Each instance writes the health
//! of the mailboxes it fetches to `mailbox_health` (the supervisor, about once a second, what
//! changed since), so that `/health` and `/api/mailboxes` of any instance show every mailbox
//! of the cluster, with the instance fetching it.

use std::collections::BTreeMap;
use std::time::Duration;

use deadpool_postgres::Pool;

use crate::domain::{ComponentHealth, ComponentState};
use crate::storage::StorageError;

/// Rows written per statement.
const CHUNK: usize = 1000;

/// Writes the health of mailboxes `me` fetches (`changed`) and deletes the rows of those it
/// stopped fetching (`forgotten`; only while the row is still its own, so a mailbox that moved
/// keeps its new owner's row).
pub async fn write(
    pool: &Pool,
    me: &str,
    changed: &[(String, ComponentHealth)],
    forgotten: &[String],
) -> Result<(), StorageError> {
    let c = pool.get().await?;
    for chunk in changed.chunks(CHUNK) {
        let rows: Vec<serde_json::Value> = chunk
            .iter()
            .map(|(id, h)| {
                serde_json::json!({
                    "mailbox_id": id,
                    "tenant_id": h.details.get("tenant").and_then(|t| t.as_str()).unwrap_or(""),
                    "status": h.status.as_str(),
                    "health": h,
                })
            })
            .collect();
        c.execute(
            "INSERT INTO mailbox_health (mailbox_id, tenant_id, instance_id, status, health, updated_at)
             SELECT e->>'mailbox_id', e->>'tenant_id', $2, e->>'status', e->'health', now()
             FROM jsonb_array_elements($1::jsonb) e
             ON CONFLICT (mailbox_id) DO UPDATE SET tenant_id = EXCLUDED.tenant_id,
               instance_id = EXCLUDED.instance_id, status = EXCLUDED.status,
               health = EXCLUDED.health, updated_at = now()",
            &[&serde_json::Value::Array(rows), &me],
        )
        .await?;
    }
    if !forgotten.is_empty() {
        c.execute(
            "DELETE FROM mailbox_health WHERE instance_id = $1 AND mailbox_id = ANY($2)",
            &[&me, &forgotten],
        )
        .await?;
    }
    Ok(())
}

/// Deletes the rows of mailboxes no longer configured that no live instance keeps (left by
/// an instance that stopped before it could forget them). A live instance forgets its own,
/// so one that has not yet reloaded a configuration adding a mailbox keeps its row.
pub async fn prune(
    pool: &Pool,
    configured: &[String],
    lease_ttl: Duration,
) -> Result<u64, StorageError> {
    Ok(pool
        .get()
        .await?
        .execute(
            "DELETE FROM mailbox_health h WHERE NOT (h.mailbox_id = ANY($1))
               AND NOT EXISTS (SELECT 1 FROM instances i WHERE i.instance_id = h.instance_id
                 AND NOT i.stopped AND i.heartbeat_at > now() - $2 * interval '1 second')",
            &[&configured, &lease_ttl.as_secs_f64()],
        )
        .await?)
}

/// The health of the mailboxes other instances than `me` fetch, as each last wrote it, with
/// `instance` (`me`'s own are in its memory, fresher). A mailbox whose instance is no longer
/// live (no heartbeat within `lease_ttl`, or stopped) is `starting`, with the reason, until
/// its new owner writes.
pub async fn others(
    pool: &Pool,
    me: &str,
    lease_ttl: Duration,
) -> Result<BTreeMap<String, ComponentHealth>, StorageError> {
    let rows = pool
        .get()
        .await?
        .query(
            "SELECT h.mailbox_id, h.instance_id, h.health,
                    coalesce(NOT i.stopped AND i.heartbeat_at > now() - $1 * interval '1 second', false)
             FROM mailbox_health h LEFT JOIN instances i ON i.instance_id = h.instance_id
             WHERE h.instance_id <> $2",
            &[&(lease_ttl.as_secs_f64()), &me],
        )
        .await?;
    let mut out = BTreeMap::new();
    for r in rows {
        let id: String = r.try_get(0)?;
        let instance: String = r.try_get(1)?;
        let live: bool = r.try_get(3)?;
        let Ok(mut h) = serde_json::from_value::<ComponentHealth>(r.try_get(2)?) else {
            continue;
        };
        if !live {
            h.status = ComponentState::Starting;
            h.last_error = Some(format!(
                "instance {instance}, which fetched it, is not live; another instance takes it over within the lease time"
            ));
        }
        out.insert(id, h.with("instance", instance));
    }
    Ok(out)
}
