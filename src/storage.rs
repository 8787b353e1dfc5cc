//! PostgreSQL: the connection pool, creating the database, and the migrations.
//!
//! Migrations are the plain SQL files in `migrations/`, compiled into the binary and applied
//! in order, each in its own transaction, while this session holds a PostgreSQL advisory lock,
//! so two instances starting at once apply each migration exactly once.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

use crate::settings::DatabaseSection;

/// The migrations, in the order they apply. A new file gets a new, higher version here.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "0001_outbox.sql",
        include_str!("../migrations/0001_outbox.sql"),
    ),
    (
        2,
        "0002_inbound.sql",
        include_str!("../migrations/0002_inbound.sql"),
    ),
    (
        3,
        "0003_config_mirror.sql",
        include_str!("../migrations/0003_config_mirror.sql"),
    ),
    (
        4,
        "0004_claims.sql",
        include_str!("../migrations/0004_claims.sql"),
    ),
];

/// Key of the advisory lock held while migrating ("mailbrdg" in ASCII).
const MIGRATION_LOCK: i64 = 0x6d61_696c_6272_6467;

/// What can go wrong at the database boundary.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("[database] url is not usable: {0}")]
    Config(String),
    #[error("cannot reach PostgreSQL at {endpoint}: {source}; check that PostgreSQL is running and that [database] url (or DATABASE_URL) is right")]
    Connect {
        endpoint: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("cannot create database `{name}`: {source}; create it by hand or grant CREATEDB to the user")]
    CreateDatabase {
        name: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("migration {name} failed: {source}; the database was left at the previous migration")]
    Migration {
        name: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("no database connection available: {0}")]
    Pool(String),
    #[error("database query failed: {}", describe(.0))]
    Query(#[from] tokio_postgres::Error),
}

/// tokio-postgres shows a server error as just "db error": add what the server said.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

impl StorageError {
    /// True when waiting and trying again can help: the server is unreachable, restarting or
    /// shutting down, or the transaction lost a conflict. Decided by SQLSTATE, because a
    /// restart reaches running statements as a *database* error (57P01 `admin_shutdown`,
    /// 57P02 `crash_shutdown`), not as a closed connection.
    pub fn is_transient(&self) -> bool {
        match self {
            StorageError::Connect { .. } | StorageError::Pool(_) => true,
            StorageError::Query(e) => is_transient_pg(e),
            _ => false,
        }
    }

    /// True when the data of the statement was refused (class 22 "data exception", 23
    /// "integrity constraint violation", 54 "program limit exceeded" such as an index row too
    /// large): the same rows fail again, the other rows of a batch need not.
    pub fn is_data_error(&self) -> bool {
        match self {
            StorageError::Query(e) => e
                .code()
                .is_some_and(|c| matches!(&c.code()[..2], "22" | "23" | "54")),
            _ => false,
        }
    }
}

/// SQLSTATEs (and failures without one) after which the same statement can succeed later.
pub fn is_transient_pg(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    let Some(code) = e.code() else {
        // No server answer at all: an I/O error, a timeout.
        return e.as_db_error().is_none();
    };
    let code = code.code();
    code.starts_with("08") // connection exception
        || code.starts_with("53") // insufficient resources (too many connections, disk full)
        || matches!(
            code,
            "57P01" // admin_shutdown
                | "57P02" // crash_shutdown
                | "57P03" // cannot_connect_now (starting up, recovering)
                | "57P05" // idle_session_timeout
                | "40001" // serialization_failure
                | "40P01" // deadlock_detected
                | "55P03" // lock_not_available
        )
}

impl From<deadpool_postgres::PoolError> for StorageError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        StorageError::Pool(e.to_string())
    }
}

/// Parses the URL the way libpq would default it: the user is the OS user and the host the
/// local socket folder when the URL leaves them out.
pub fn pg_config(url: &str) -> Result<tokio_postgres::Config, StorageError> {
    let mut cfg: tokio_postgres::Config = url
        .parse()
        .map_err(|e: tokio_postgres::Error| StorageError::Config(e.to_string()))?;
    if cfg.get_user().is_none() {
        cfg.user(os_user());
    }
    if cfg.get_hosts().is_empty() {
        if std::path::Path::new("/var/run/postgresql").is_dir() {
            cfg.host_path("/var/run/postgresql");
        } else {
            cfg.host("localhost");
        }
    }
    if cfg.get_dbname().is_none() {
        let user = cfg.get_user().unwrap_or("postgres").to_string();
        cfg.dbname(user);
    }
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(Duration::from_secs(5));
    }
    Ok(cfg)
}

/// The name of the user running the process, as libpq would take it.
fn os_user() -> String {
    for var in ["PGUSER", "USER", "LOGNAME"] {
        if let Ok(v) = std::env::var(var) {
            if !v.is_empty() {
                return v;
            }
        }
    }
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata("/proc/self").map(|m| m.uid()).ok();
    if let (Some(uid), Ok(passwd)) = (uid, std::fs::read_to_string("/etc/passwd")) {
        for line in passwd.lines() {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() > 2 && f[2].parse::<u32>().ok() == Some(uid) {
                return f[0].to_string();
            }
        }
    }
    "postgres".into()
}

/// Host, port and database, without credentials, for messages.
pub fn endpoint(cfg: &tokio_postgres::Config) -> String {
    let host = match cfg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}/{}", cfg.get_dbname().unwrap_or(""))
}

async fn connect(cfg: &tokio_postgres::Config) -> Result<tokio_postgres::Client, StorageError> {
    let (client, connection) =
        cfg.connect(NoTls)
            .await
            .map_err(|source| StorageError::Connect {
                endpoint: endpoint(cfg),
                source,
            })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "database connection ended");
        }
    });
    Ok(client)
}

/// Creates the configured database when it does not exist yet (two instances may race: the
/// loser's "already exists" is success).
pub async fn create_database_if_missing(db: &DatabaseSection) -> Result<(), StorageError> {
    let cfg = pg_config(db.url.expose())?;
    let name = cfg.get_dbname().unwrap_or("mailbridge").to_string();
    match connect(&cfg).await {
        Ok(_) => return Ok(()),
        Err(StorageError::Connect { source, .. })
            if source.code() == Some(&SqlState::INVALID_CATALOG_NAME) => {}
        Err(e) => return Err(e),
    }
    let mut admin_cfg = cfg.clone();
    admin_cfg.dbname("postgres");
    let admin = match connect(&admin_cfg).await {
        Ok(c) => c,
        Err(_) => {
            admin_cfg.dbname("template1");
            connect(&admin_cfg).await?
        }
    };
    let sql = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
    match admin.batch_execute(&sql).await {
        Ok(()) => {
            tracing::info!(database = %name, "created the database");
            Ok(())
        }
        Err(e)
            if e.code() == Some(&SqlState::DUPLICATE_DATABASE)
                || e.code() == Some(&SqlState::UNIQUE_VIOLATION) =>
        {
            Ok(())
        }
        Err(source) => Err(StorageError::CreateDatabase { name, source }),
    }
}

/// The pool every database user of the service shares.
pub fn pool(db: &DatabaseSection) -> Result<Pool, StorageError> {
    let mut cfg = pg_config(db.url.expose())?;
    // The outbox statements are prepared once per connection. A generic plan, made while the
    // table is still small, would join the batch's keys by scanning the whole table for good:
    // plan every execution with its actual arrays instead.
    let custom_plans = "-c plan_cache_mode=force_custom_plan";
    let options = match cfg.get_options() {
        Some(o) if !o.is_empty() => format!("{o} {custom_plans}"),
        _ => custom_plans.to_string(),
    };
    cfg.options(options);
    let mgr = Manager::from_config(
        cfg,
        NoTls,
        ManagerConfig {
            // Fast hands out dead connections after a database restart.
            recycling_method: RecyclingMethod::Verified,
        },
    );
    Pool::builder(mgr)
        .max_size(db.max_connections)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(10)))
        .create_timeout(Some(Duration::from_secs(5)))
        .recycle_timeout(Some(Duration::from_secs(5)))
        .build()
        .map_err(|e| StorageError::Config(e.to_string()))
}

/// Applies every migration not applied yet; returns the names applied now.
pub async fn migrate(db: &DatabaseSection) -> Result<Vec<&'static str>, StorageError> {
    create_database_if_missing(db).await?;
    let cfg = pg_config(db.url.expose())?;
    let mut client = connect(&cfg).await?;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let result = apply_migrations(&mut client).await;
    // Closing the session would release the lock too; unlock explicitly to be prompt.
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    result
}

async fn apply_migrations(
    client: &mut tokio_postgres::Client,
) -> Result<Vec<&'static str>, StorageError> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                version    integer PRIMARY KEY,
                name       text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )",
        )
        .await?;
    let applied: Vec<i32> = client
        .query("SELECT version FROM schema_migrations", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut now = Vec::new();
    for (version, name, sql) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        let tx = client.transaction().await?;
        tx.batch_execute(sql)
            .await
            .map_err(|source| StorageError::Migration { name, source })?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(migration = name, "applied migration");
        now.push(*name);
    }
    Ok(now)
}

/// Makes the `tenants`, `providers` and `mailboxes` tables mirror `settings` (no secrets),
/// in one transaction.
pub async fn mirror_config(
    pool: &Pool,
    settings: &crate::settings::Settings,
) -> Result<(), StorageError> {
    use crate::settings::{MailProtocol, ProviderTransport, TlsMode};
    let tls = |t: TlsMode| match t {
        TlsMode::None => "none",
        TlsMode::Starttls => "starttls",
        TlsMode::Tls => "tls",
    };
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let tenant_ids: Vec<&str> = settings.tenants.iter().map(|t| t.id.as_str()).collect();
    tx.execute(
        "DELETE FROM tenants WHERE NOT (id = ANY($1))",
        &[&tenant_ids],
    )
    .await?;
    for t in &settings.tenants {
        tx.execute(
            "INSERT INTO tenants (id, name, file) VALUES ($1, $2, $3)
             ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, file = EXCLUDED.file, updated_at = now()",
            &[&t.id, &t.name, &t.file.display().to_string()],
        )
        .await?;
    }
    let providers: Vec<_> = settings.tenants.iter().flat_map(|t| &t.providers).collect();
    let ids: Vec<&str> = providers.iter().map(|p| p.id.as_str()).collect();
    tx.execute("DELETE FROM providers WHERE NOT (id = ANY($1))", &[&ids])
        .await?;
    for p in providers {
        let (kind, host, port, mode, user) = match &p.transport {
            ProviderTransport::Smtp {
                host,
                port,
                tls: t,
                username,
                ..
            } => (
                "smtp",
                Some(host.clone()),
                Some(i32::from(*port)),
                Some(tls(*t)),
                username.clone(),
            ),
            ProviderTransport::File { .. } => ("file", None, None, None, None),
        };
        tx.execute(
            "INSERT INTO providers (id, tenant_id, name, kind, host, port, tls, username, max_connections)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT (id) DO UPDATE SET tenant_id = EXCLUDED.tenant_id, name = EXCLUDED.name,
                 kind = EXCLUDED.kind, host = EXCLUDED.host, port = EXCLUDED.port, tls = EXCLUDED.tls,
                 username = EXCLUDED.username, max_connections = EXCLUDED.max_connections,
                 updated_at = now()",
            &[&p.id, &p.tenant_id, &p.name, &kind, &host, &port, &mode, &user, &(p.max_connections as i32)],
        )
        .await?;
    }
    let mailboxes: Vec<_> = settings.tenants.iter().flat_map(|t| &t.mailboxes).collect();
    let ids: Vec<&str> = mailboxes.iter().map(|m| m.id.as_str()).collect();
    tx.execute("DELETE FROM mailboxes WHERE NOT (id = ANY($1))", &[&ids])
        .await?;
    for m in mailboxes {
        let protocol = match m.protocol {
            MailProtocol::Imap => "imap",
            MailProtocol::Pop3 => "pop3",
        };
        tx.execute(
            "INSERT INTO mailboxes (id, tenant_id, provider_id, user_id, protocol, host, port, tls,
                                    username, folder, idle, poll_interval_secs)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
             ON CONFLICT (id) DO UPDATE SET tenant_id = EXCLUDED.tenant_id,
                 provider_id = EXCLUDED.provider_id, user_id = EXCLUDED.user_id,
                 protocol = EXCLUDED.protocol, host = EXCLUDED.host, port = EXCLUDED.port,
                 tls = EXCLUDED.tls, username = EXCLUDED.username, folder = EXCLUDED.folder,
                 idle = EXCLUDED.idle, poll_interval_secs = EXCLUDED.poll_interval_secs,
                 updated_at = now()",
            &[
                &m.id,
                &m.tenant_id,
                &m.provider_id,
                &m.user_id,
                &protocol,
                &m.host,
                &i32::from(m.port),
                &tls(m.tls),
                &m.username,
                &m.folder,
                &m.idle,
                &(m.poll_interval.as_secs() as i64),
            ],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// A cheap round trip, for `/health`.
pub async fn ping(pool: &Pool) -> Result<(), StorageError> {
    let client = pool.get().await?;
    client.simple_query("SELECT 1").await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_defaults_follow_libpq() {
        let c = pg_config("postgres://localhost/mailbridge").unwrap();
        assert!(c.get_user().is_some());
        assert_eq!(c.get_dbname(), Some("mailbridge"));
        let c = pg_config("postgresql:///db?host=/var/run/postgresql").unwrap();
        assert_eq!(c.get_dbname(), Some("db"));
        assert!(matches!(
            c.get_hosts().first(),
            Some(tokio_postgres::config::Host::Unix(_))
        ));
        assert!(pg_config("not a url at all = =").is_err());
    }

    #[test]
    fn migrations_are_numbered_in_order() {
        let versions: Vec<i32> = MIGRATIONS.iter().map(|m| m.0).collect();
        let mut sorted = versions.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(versions, sorted);
        for (v, name, _) in MIGRATIONS {
            assert!(name.starts_with(&format!("{v:04}_")), "{name}");
        }
    }
}
