//! Mailbox ownership among instances sharing one PostgreSQL: heartbeats, leases and their
//! fencing tokens (the SQL of `migrations/0007_leases.sql`), and who should own what.
//!
//! Every `[cluster] lease_ttl / 3` each instance heartbeats (`instances`), reads which
//! instances are live (a heartbeat within `lease_ttl`, not stopped), and takes the leases of
//! the mailboxes it should own: each mailbox goes to the live instance with the highest
//! weight for it (rendezvous hashing, [`owner_of`]), so mailboxes spread evenly and only
//! those of an instance that joins or leaves move. A lease lives as long as its owner's
//! heartbeat — renewing is one row per instance, whatever its mailbox count — until it is
//! released: once its fetcher has drained, at a rebalance or a graceful stop, so that the
//! next owner takes it at its next round. A lease is taken only when it is released or its
//! owner is not live; its token changes with every change of holder, and `intake::record`
//! commits a mailbox's position only for the current token.

use std::collections::HashMap;
use std::time::Duration;

use deadpool_postgres::Pool;

use crate::storage::StorageError;

/// A held lease: the fencing token a fetcher commits its position with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub owner: String,
    pub token: i64,
}

/// The weight of `instance` for `mailbox` (FNV-1a over both, then a final mix): stable
/// across processes and versions, so every instance computes the same owners.
fn weight(instance: &str, mailbox: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in instance
        .as_bytes()
        .iter()
        .chain(&[0u8])
        .chain(mailbox.as_bytes())
    {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // splitmix64's finaliser: FNV alone spreads similar names poorly.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The live instance that should own `mailbox`; None when no instance is live.
pub fn owner_of<'a>(mailbox: &str, live: &'a [String]) -> Option<&'a str> {
    live.iter()
        .max_by_key(|i| (weight(i, mailbox), i.as_str()))
        .map(String::as_str)
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Heartbeats `instance` (owning `owned` mailboxes) and returns the live instances, sorted
/// (this one among them).
pub async fn heartbeat(
    pool: &Pool,
    instance: &str,
    http_listen: &str,
    owned: usize,
    ttl: Duration,
) -> Result<Vec<String>, StorageError> {
    let client = pool.get().await?;
    let owned = i32::try_from(owned).unwrap_or(i32::MAX);
    client
        .execute(
            "INSERT INTO instances (instance_id, http_listen, mailboxes)
             VALUES ($1, $2, $3)
             ON CONFLICT (instance_id) DO UPDATE
             SET heartbeat_at = now(), http_listen = EXCLUDED.http_listen,
                 mailboxes = EXCLUDED.mailboxes, stopped = false,
                 started_at = CASE WHEN instances.stopped
                                    OR instances.heartbeat_at < now() - $4 * interval '1 second'
                              THEN now() ELSE instances.started_at END",
            &[&instance, &http_listen, &owned, &secs(ttl)],
        )
        .await?;
    let rows = client
        .query(
            "SELECT instance_id FROM instances
             WHERE NOT stopped AND heartbeat_at > now() - $1 * interval '1 second'
             ORDER BY instance_id",
            &[&secs(ttl)],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// The leases `instance` holds (not released), with their tokens: what it still holds after
/// an outage, or what it holds from its previous run.
pub async fn held(pool: &Pool, instance: &str) -> Result<HashMap<String, i64>, StorageError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            "SELECT mailbox_id, token FROM mailbox_leases WHERE owner = $1 AND NOT released",
            &[&instance],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Takes the leases of `mailboxes` for `instance` where they are free: never taken, released,
/// or held by an instance that is not live (no heartbeat within `ttl`, or stopped). Each
/// taken lease gets a new token. Returns the ones taken now.
pub async fn acquire(
    pool: &Pool,
    instance: &str,
    mailboxes: &[String],
    ttl: Duration,
) -> Result<HashMap<String, i64>, StorageError> {
    if mailboxes.is_empty() {
        return Ok(HashMap::new());
    }
    let client = pool.get().await?;
    let rows = client
        .query(
            "INSERT INTO mailbox_leases (mailbox_id, owner, token)
             SELECT m, $1, 1 FROM unnest($2::text[]) AS m
             ON CONFLICT (mailbox_id) DO UPDATE
             SET owner = EXCLUDED.owner, token = mailbox_leases.token + 1, released = false
             WHERE mailbox_leases.released
                OR NOT EXISTS (
                    SELECT 1 FROM instances i
                    WHERE i.instance_id = mailbox_leases.owner AND NOT i.stopped
                      AND i.heartbeat_at > now() - $3 * interval '1 second')
             RETURNING mailbox_id, token",
            &[&instance, &mailboxes, &secs(ttl)],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Gives up `instance`'s leases of `mailboxes` (their fetchers have stopped): the next owner
/// takes them at once. The rows stay, so the next holder's token is a new one.
pub async fn release(
    pool: &Pool,
    instance: &str,
    mailboxes: &[String],
) -> Result<u64, StorageError> {
    if mailboxes.is_empty() {
        return Ok(0);
    }
    let client = pool.get().await?;
    Ok(client
        .execute(
            "UPDATE mailbox_leases SET released = true
             WHERE owner = $1 AND mailbox_id = ANY($2) AND NOT released",
            &[&instance, &mailboxes],
        )
        .await?)
}

/// A graceful stop: `instance` is no longer live and holds nothing.
pub async fn leave(pool: &Pool, instance: &str) -> Result<(), StorageError> {
    let client = pool.get().await?;
    client
        .execute(
            "UPDATE mailbox_leases SET released = true WHERE owner = $1 AND NOT released",
            &[&instance],
        )
        .await?;
    client
        .execute(
            "UPDATE instances SET stopped = true, mailboxes = 0 WHERE instance_id = $1",
            &[&instance],
        )
        .await?;
    Ok(())
}

/// An instance as `/api/cluster` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InstanceRow {
    pub instance_id: String,
    pub http_listen: Option<String>,
    pub started_at: String,
    pub heartbeat_at: String,
    pub live: bool,
    pub mailboxes: i64,
}

/// Every instance that heartbeat within the last hour, with how many leases each holds now.
pub async fn instances(pool: &Pool, ttl: Duration) -> Result<Vec<InstanceRow>, StorageError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            "SELECT i.instance_id, i.http_listen,
                    to_char(i.started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                    to_char(i.heartbeat_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                    NOT i.stopped AND i.heartbeat_at > now() - $1 * interval '1 second',
                    (SELECT count(*) FROM mailbox_leases l
                      WHERE l.owner = i.instance_id AND NOT l.released)
             FROM instances i
             WHERE i.heartbeat_at > now() - interval '1 hour'
             ORDER BY i.instance_id",
            &[&secs(ttl)],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| InstanceRow {
            instance_id: r.get(0),
            http_listen: r.get(1),
            started_at: r.get(2),
            heartbeat_at: r.get(3),
            live: r.get(4),
            mailboxes: r.get(5),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_spread_evenly_and_only_a_leavers_mailboxes_move() {
        let three: Vec<String> = ["a:1", "b:2", "c:3"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mailboxes: Vec<String> = (0..3000).map(|i| format!("mbx-{i}")).collect();
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for m in &mailboxes {
            *counts.entry(owner_of(m, &three).unwrap_or("")).or_default() += 1;
        }
        assert_eq!(counts.len(), 3);
        for (instance, n) in &counts {
            assert!((850..=1150).contains(n), "{instance} owns {n} of 3000");
        }
        let two: Vec<String> = three[..2].to_vec();
        for m in &mailboxes {
            let before = owner_of(m, &three);
            let after = owner_of(m, &two);
            if before != Some("c:3") {
                assert_eq!(before, after, "{m} moved though its owner stayed");
            }
        }
        assert_eq!(owner_of("x", &[]), None);
    }
}
