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
    (
        5,
        "0005_oauth2_tokens.sql",
        include_str!("../migrations/0005_oauth2_tokens.sql"),
    ),
    (
        6,
        "0006_mailbox_cursor.sql",
        include_str!("../migrations/0006_mailbox_cursor.sql"),
    ),
    (
        7,
        "0007_leases.sql",
        include_str!("../migrations/0007_leases.sql"),
    ),
    (
        8,
        "0008_attachment_blobs.sql",
        include_str!("../migrations/0008_attachment_blobs.sql"),
    ),
    (
        9,
        "0009_mailbox_health.sql",
        include_str!("../migrations/0009_mailbox_health.sql"),
    ),
    (
        10,
        "0010_dashboard.sql",
        include_str!("../migrations/0010_dashboard.sql"),
    ),
    (
        11,
        "0011_outbox_hot_updates.sql",
        include_str!("../migrations/0011_outbox_hot_updates.sql"),
    ),
];

/// Key of the advisory lock held while migrating ("mailbrdg" in ASCII).
const MIGRATION_LOCK: i64 = 0x6d61_696c_6272_6467;

/// What can go wrong at the database boundary.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("[database] url is not usable: {0}")]
    Config(String),
    #[error("cannot reach PostgreSQL at {endpoint}: {}; check that PostgreSQL is running and that [database] url (or DATABASE_URL) is right", crate::domain::error_chain(.source))]
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
    /// Stored data this version cannot read (written by a newer one, or edited by hand).
    #[error("{0}")]
    Unreadable(String),
    #[error("database query failed: {}", describe(.0))]
    Query(#[from] tokio_postgres::Error),
    /// The mailbox's lease passed to another instance: its position is not this one's to move.
    #[error(
        "mailbox {0}: its lease is held by another instance now; this instance stopped fetching it"
    )]
    Fenced(String),
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

/// TLS to PostgreSQL, chosen as libpq's `sslmode` chooses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgTls {
    /// `disable`, `allow`, `prefer` or no `sslmode`: plain TCP (or the local socket).
    Off,
    /// `require`: encrypted; the certificate is not checked unless `sslrootcert` is given
    /// (then as `verify-ca`), as libpq does.
    Require,
    /// `verify-ca`: encrypted, the certificate chain checked against the system roots and
    /// `sslrootcert`.
    VerifyCa,
    /// `verify-full`: as `verify-ca`, and the certificate must name the host.
    VerifyFull,
}

/// A database URL, understood: the connection settings, and how to protect them.
#[derive(Debug, Clone)]
pub struct PgTarget {
    pub config: tokio_postgres::Config,
    pub tls: PgTls,
    /// `sslrootcert`: a CA (PEM) to trust beside the system roots.
    pub root_cert: Option<std::path::PathBuf>,
}

/// Takes libpq's TLS parameters (`sslmode`, `sslrootcert`) out of a URL or key=value string:
/// tokio-postgres knows only `disable|prefer|require` and no `sslrootcert`.
fn split_tls_params(url: &str) -> (String, Option<String>, Option<String>) {
    let mut mode = None;
    let mut root = None;
    let mut take = |k: &str, v: String| match k {
        "sslmode" => {
            mode = Some(v);
            true
        }
        "sslrootcert" => {
            root = Some(v);
            true
        }
        _ => false,
    };
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return (url.to_string(), None, None);
        };
        let kept: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
            .filter(|(k, v)| !take(k, v.to_string()))
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        let rest = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(kept)
            .finish();
        let url = if rest.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{rest}")
        };
        return (url, mode, root);
    }
    let kept: Vec<&str> = url
        .split_whitespace()
        .filter(|pair| match pair.split_once('=') {
            Some((k, v)) => !take(k.trim(), v.trim().trim_matches('\'').to_string()),
            None => true,
        })
        .collect();
    (kept.join(" "), mode, root)
}

/// Parses a database URL: connection settings (defaulted as libpq would) and TLS.
pub fn pg_target(url: &str) -> Result<PgTarget, StorageError> {
    let (rest, mode, root) = split_tls_params(url);
    let tls = match mode.as_deref() {
        None | Some("disable" | "allow" | "prefer") => PgTls::Off,
        Some("require") if root.is_some() => PgTls::VerifyCa,
        Some("require") => PgTls::Require,
        Some("verify-ca") => PgTls::VerifyCa,
        Some("verify-full") => PgTls::VerifyFull,
        Some(other) => {
            return Err(StorageError::Config(format!(
                "sslmode `{other}` is not one of disable, allow, prefer, require, verify-ca, verify-full"
            )))
        }
    };
    let mut config = pg_config(&rest)?;
    if tls != PgTls::Off {
        config.ssl_mode(tokio_postgres::config::SslMode::Require);
    }
    Ok(PgTarget {
        config,
        tls,
        root_cert: root.map(std::path::PathBuf::from),
    })
}

impl PgTarget {
    /// The rustls settings of this target's TLS (None: no TLS).
    fn rustls(&self) -> Result<Option<rustls::ClientConfig>, StorageError> {
        let root = self.root_cert.as_deref();
        let verified = || {
            crate::mailproto::tls_client_config(root)
                .map(|c| c.as_ref().clone())
                .map_err(StorageError::Config)
        };
        Ok(match self.tls {
            PgTls::Off => None,
            PgTls::VerifyFull => Some(verified()?),
            PgTls::VerifyCa => {
                let mut c = verified()?;
                c.dangerous()
                    .set_certificate_verifier(std::sync::Arc::new(tls::ChainOnly::new(root)?));
                Some(c)
            }
            PgTls::Require => {
                let mut c = verified()?;
                c.dangerous()
                    .set_certificate_verifier(std::sync::Arc::new(tls::AcceptAny::new()));
                Some(c)
            }
        })
    }
}

/// Certificate checks for `sslmode=require` and `verify-ca` (libpq's meanings), beside the
/// full check of `verify-full`.
mod tls {
    use std::sync::Arc;

    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::crypto::CryptoProvider;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{CertificateError, DigitallySignedStruct, Error, SignatureScheme};

    use super::StorageError;

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::aws_lc_rs::default_provider())
    }

    /// `require` without a root certificate: encrypted, the certificate taken as it is.
    #[derive(Debug)]
    pub struct AcceptAny(Arc<CryptoProvider>);

    impl AcceptAny {
        pub fn new() -> Self {
            Self(provider())
        }
    }

    impl ServerCertVerifier for AcceptAny {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }

    /// `verify-ca`: the chain must lead to a trusted root (the system's or `sslrootcert`);
    /// the name in the certificate is not checked.
    #[derive(Debug)]
    pub struct ChainOnly(rustls_platform_verifier::Verifier);

    impl ChainOnly {
        pub fn new(root: Option<&std::path::Path>) -> Result<Self, StorageError> {
            let extra: Vec<CertificateDer<'static>> = match root {
                Some(path) => CertificateDer::pem_file_iter(path)
                    .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| {
                        StorageError::Config(format!(
                            "sslrootcert {} is not usable: {e}",
                            path.display()
                        ))
                    })?,
                None => Vec::new(),
            };
            rustls_platform_verifier::Verifier::new_with_extra_roots(extra, provider())
                .map(Self)
                .map_err(|e| StorageError::Config(format!("certificate verifier: {e}")))
        }
    }

    impl ServerCertVerifier for ChainOnly {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            intermediates: &[CertificateDer<'_>],
            server_name: &ServerName<'_>,
            ocsp: &[u8],
            now: UnixTime,
        ) -> Result<ServerCertVerified, Error> {
            match self
                .0
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
            {
                Err(Error::InvalidCertificate(
                    CertificateError::NotValidForName
                    | CertificateError::NotValidForNameContext { .. },
                )) => Ok(ServerCertVerified::assertion()),
                other => other,
            }
        }
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            self.0.verify_tls12_signature(message, cert, dss)
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            self.0.verify_tls13_signature(message, cert, dss)
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.supported_verify_schemes()
        }
    }
}

/// Parses the URL the way libpq would default it: the user is the OS user and the host the
/// local socket folder when the URL leaves them out. (TLS parameters: [`pg_target`].)
pub fn pg_config(url: &str) -> Result<tokio_postgres::Config, StorageError> {
    let (url, _, _) = split_tls_params(url);
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

async fn connect(target: &PgTarget) -> Result<tokio_postgres::Client, StorageError> {
    let cfg = &target.config;
    let failed = |source| StorageError::Connect {
        endpoint: endpoint(cfg),
        source,
    };
    let client = match target.rustls()? {
        None => {
            let (client, connection) = cfg.connect(NoTls).await.map_err(failed)?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "database connection ended");
                }
            });
            client
        }
        Some(tls) => {
            let tls = tokio_postgres_rustls::MakeRustlsConnect::new(tls);
            let (client, connection) = cfg.connect(tls).await.map_err(failed)?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "database connection ended");
                }
            });
            client
        }
    };
    Ok(client)
}

/// Creates the configured database when it does not exist yet (two instances may race: the
/// loser's "already exists" is success).
pub async fn create_database_if_missing(db: &DatabaseSection) -> Result<(), StorageError> {
    let target = pg_target(db.url.expose())?;
    let name = target
        .config
        .get_dbname()
        .unwrap_or("mailbridge")
        .to_string();
    match connect(&target).await {
        Ok(_) => return Ok(()),
        Err(StorageError::Connect { source, .. })
            if source.code() == Some(&SqlState::INVALID_CATALOG_NAME) => {}
        Err(e) => return Err(e),
    }
    let mut admin = target.clone();
    admin.config.dbname("postgres");
    let admin = match connect(&admin).await {
        Ok(c) => c,
        Err(_) => {
            admin.config.dbname("template1");
            connect(&admin).await?
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
    let target = pg_target(db.url.expose())?;
    let tls = target.rustls()?;
    let mut cfg = target.config;
    // The outbox statements are prepared once per connection. A generic plan, made while the
    // table is still small, would join the batch's keys by scanning the whole table for good:
    // plan every execution with its actual arrays instead.
    let custom_plans = "-c plan_cache_mode=force_custom_plan";
    let options = match cfg.get_options() {
        Some(o) if !o.is_empty() => format!("{o} {custom_plans}"),
        _ => custom_plans.to_string(),
    };
    cfg.options(options);
    let manager_config = ManagerConfig {
        // Fast hands out dead connections after a database restart.
        recycling_method: RecyclingMethod::Verified,
    };
    let mgr = match tls {
        None => Manager::from_config(cfg, NoTls, manager_config),
        Some(tls) => Manager::from_config(
            cfg,
            tokio_postgres_rustls::MakeRustlsConnect::new(tls),
            manager_config,
        ),
    };
    Pool::builder(mgr)
        .max_size(db.max_connections)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(10)))
        .create_timeout(Some(Duration::from_secs(5)))
        .recycle_timeout(Some(Duration::from_secs(5)))
        .build()
        .map_err(|e| StorageError::Config(e.to_string()))
}

/// Listens on `channel` (PostgreSQL `LISTEN`) on a connection of its own, sending every
/// notification's payload to `tx`; returns when the connection fails or `tx` is closed.
pub async fn listen(
    db: &DatabaseSection,
    channel: &str,
    tx: tokio::sync::mpsc::UnboundedSender<String>,
) -> Result<(), StorageError> {
    let target = pg_target(db.url.expose())?;
    let endpoint = endpoint(&target.config);
    let connect_error = |source| StorageError::Connect {
        endpoint: endpoint.clone(),
        source,
    };
    match target.rustls()? {
        None => {
            let (client, conn) = target.config.connect(NoTls).await.map_err(connect_error)?;
            listen_on(client, conn, channel, tx).await
        }
        Some(tls) => {
            let (client, conn) = target
                .config
                .connect(tokio_postgres_rustls::MakeRustlsConnect::new(tls))
                .await
                .map_err(connect_error)?;
            listen_on(client, conn, channel, tx).await
        }
    }
}

async fn listen_on<S, T>(
    client: tokio_postgres::Client,
    mut conn: tokio_postgres::Connection<S, T>,
    channel: &str,
    tx: tokio::sync::mpsc::UnboundedSender<String>,
) -> Result<(), StorageError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::StreamExt;
    let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
    let statement = format!("LISTEN \"{}\"", channel.replace('"', ""));
    let listen = client.batch_execute(&statement);
    tokio::pin!(listen);
    // The connection is driven by reading its messages, also while LISTEN is on its way.
    let mut listening = false;
    loop {
        tokio::select! {
            r = &mut listen, if !listening => {
                r?;
                listening = true;
            }
            m = messages.next() => match m {
                Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                    if tx.send(n.payload().to_string()).is_err() {
                        return Ok(());
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                None => return Ok(()),
            },
        }
    }
}

/// Applies every migration not applied yet; returns the names applied now.
pub async fn migrate(db: &DatabaseSection) -> Result<Vec<&'static str>, StorageError> {
    create_database_if_missing(db).await?;
    let mut client = connect(&pg_target(db.url.expose())?).await?;
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
        let m = p.config.mirror();
        let kind = p.config.kind();
        let port = m.port.map(i32::from);
        let max_connections = i32::try_from(p.max_connections).unwrap_or(i32::MAX);
        tx.execute(
            "INSERT INTO providers (id, tenant_id, name, kind, host, port, tls, username, max_connections)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT (id) DO UPDATE SET tenant_id = EXCLUDED.tenant_id, name = EXCLUDED.name,
                 kind = EXCLUDED.kind, host = EXCLUDED.host, port = EXCLUDED.port, tls = EXCLUDED.tls,
                 username = EXCLUDED.username, max_connections = EXCLUDED.max_connections,
                 updated_at = now()",
            &[&p.id, &p.tenant_id, &p.name, &kind, &m.host, &port, &m.tls, &m.username, &max_connections],
        )
        .await?;
    }
    let mailboxes: Vec<_> = settings.tenants.iter().flat_map(|t| &t.mailboxes).collect();
    let ids: Vec<&str> = mailboxes.iter().map(|m| m.id.as_str()).collect();
    tx.execute("DELETE FROM mailboxes WHERE NOT (id = ANY($1))", &[&ids])
        .await?;
    for m in mailboxes {
        let protocol = m.protocol.as_str();
        // An API mailbox: the mailbox read (`user`) and no IDLE.
        let username = m
            .api
            .as_ref()
            .map_or(m.username.as_str(), |a| a.user.as_str());
        let idle = m.idle && m.api.is_none();
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
                &m.tls.as_str(),
                &username,
                &m.folder,
                &idle,
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
    fn tls_follows_sslmode_as_libpq() {
        let t = pg_target("postgres://u@db.example/x?sslmode=verify-full&sslrootcert=/etc/ca.pem")
            .unwrap();
        assert_eq!(t.tls, PgTls::VerifyFull);
        assert_eq!(
            t.root_cert.as_deref(),
            Some(std::path::Path::new("/etc/ca.pem"))
        );
        assert_eq!(t.config.get_dbname(), Some("x"));
        assert_eq!(
            t.config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
        let t = pg_target("postgres://u@h/x?sslmode=require&application_name=mb").unwrap();
        assert_eq!(t.tls, PgTls::Require);
        assert_eq!(t.config.get_application_name(), Some("mb"));
        let t = pg_target("postgres://u@h/x?sslmode=require&sslrootcert=ca.pem").unwrap();
        assert_eq!(
            t.tls,
            PgTls::VerifyCa,
            "require with a root certificate checks it"
        );
        assert_eq!(pg_target("postgres://u@h/x").unwrap().tls, PgTls::Off);
        assert_eq!(
            pg_target("host=h dbname=x sslmode=verify-ca").unwrap().tls,
            PgTls::VerifyCa
        );
        assert!(pg_target("postgres://u@h/x?sslmode=sometimes").is_err());
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
