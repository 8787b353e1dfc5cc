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
    #[error("database query failed: {0}")]
    Query(#[from] tokio_postgres::Error),
}

impl StorageError {
    /// True when waiting and trying again can help (the server is down or restarting).
    pub fn is_transient(&self) -> bool {
        match self {
            StorageError::Connect { .. } | StorageError::Pool(_) => true,
            StorageError::Query(e) => e.is_closed() || e.as_db_error().is_none(),
            _ => false,
        }
    }
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
    let cfg = pg_config(db.url.expose())?;
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
