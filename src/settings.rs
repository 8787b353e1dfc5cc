//! Configuration: the main TOML file, the tenant files beside it, and the environment.
//!
//! Loading never stops at the first problem: every problem found is collected as a
//! [`ConfigProblem`] naming the file and the key, so `check-config` (and a refused reload)
//! can print them all at once. Every key has a default, so an empty main file runs against
//! local services. The seed's environment variables override the file after it is parsed.
//!
//! Secrets are resolved here (`password`, `password_env`, `password_file`) into [`Secret`],
//! whose `Debug` and `Display` never show the value.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// The file name the environment overrides are reported under.
pub const ENVIRONMENT: &str = "environment";

/// One thing wrong with the configuration, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    pub file: String,
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(f, "{}: {}: {}", self.file, self.key, self.message)
        }
    }
}

/// Every problem found while loading; a configuration with any of them is refused whole.
#[derive(Debug, thiserror::Error)]
#[error("the configuration has {} problem(s):\n{}", .0.len(), render_problems(.0))]
pub struct ConfigError(pub Vec<ConfigProblem>);

fn render_problems(problems: &[ConfigProblem]) -> String {
    problems
        .iter()
        .map(|p| format!("  {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A secret value: compared and used, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The secret itself, for the one place that must hand it to a server.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

/// A duration written as `"1s"`, `"250ms"`, `"7d"` (or a whole number of seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Secs(s) => Ok(Dur(Duration::from_secs(s))),
            Raw::Text(t) => parse_duration(&t)
                .map(Dur)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// Parses `"1s"`, `"5 min"`, `"7d"`; the error says what is accepted.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| {
        format!(
            "`{text}` is not a duration ({e}); write it like \"500ms\", \"15s\", \"5m\" or \"7d\""
        )
    })
}

// ---------------------------------------------------------------------------------------------
// The main file
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RabbitMqSection {
    /// A full `amqp://` / `amqps://` URL; when set, host/port/username/password/vhost are unused.
    pub url: Option<Secret>,
    pub host: String,
    pub port: u16,
    pub username: String,
    pub password: Secret,
    pub vhost: String,
    pub exchange: String,
    pub prefetch: u16,
    /// AMQP heartbeat the service asks for; a dead broker is noticed within about twice this.
    pub heartbeat: Dur,
    /// Longest wait between two connection attempts (the backoff doubles up to this).
    pub reconnect_max_delay: Dur,
    /// An extra CA (PEM) to trust for an `amqps://` broker's certificate (relative to the main
    /// file).
    pub ca_file: Option<PathBuf>,
}

impl Default for RabbitMqSection {
    fn default() -> Self {
        Self {
            url: None,
            host: "localhost".into(),
            port: 5672,
            username: "guest".into(),
            password: Secret::new("guest"),
            vhost: "/".into(),
            exchange: "email.exchange".into(),
            prefetch: 256,
            heartbeat: Dur(Duration::from_secs(10)),
            reconnect_max_delay: Dur(Duration::from_secs(5)),
            ca_file: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueuesSection {
    pub send: String,
    pub inbound: String,
    pub sync_user: String,
    pub result: String,
}

impl Default for QueuesSection {
    fn default() -> Self {
        Self {
            send: "email.send".into(),
            inbound: "email.inbound".into(),
            sync_user: "email.sync.user".into(),
            result: "email.send.result".into(),
        }
    }
}

impl QueuesSection {
    pub fn send_dlq(&self) -> String {
        format!("{}.dlq", self.send)
    }
    pub fn inbound_dlq(&self) -> String {
        format!("{}.dlq", self.inbound)
    }
    /// The six queues of the public topology (contract §3), in a stable order.
    pub fn public_queues(&self) -> Vec<String> {
        vec![
            self.send.clone(),
            self.inbound.clone(),
            self.sync_user.clone(),
            self.result.clone(),
            self.send_dlq(),
            self.inbound_dlq(),
        ]
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseSection {
    pub url: Secret,
    pub max_connections: usize,
}

impl Default for DatabaseSection {
    fn default() -> Self {
        Self {
            url: Secret::new("postgres://localhost/mailbridge"),
            max_connections: 16,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSection {
    pub listen: String,
    pub admin_token_env: String,
}

impl Default for HttpSection {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8000".into(),
            admin_token_env: "MAILBRIDGE_ADMIN_TOKEN".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetrySection {
    pub max_retries: u32,
    pub delays: Vec<Dur>,
}

impl Default for RetrySection {
    fn default() -> Self {
        Self {
            max_retries: 3,
            delays: [1, 5, 15]
                .into_iter()
                .map(|s| Dur(Duration::from_secs(s)))
                .collect(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutboundSection {
    pub attachment_max_bytes: u64,
    pub attachment_timeout: Dur,
    pub attachment_allow_private: bool,
    /// Upper bound on one SMTP transaction.
    pub send_timeout: Dur,
    /// Attachment bytes held in memory by all pipelines together: a request with attachments
    /// reserves `attachment_max_bytes` of this before it downloads them, so at most
    /// `attachments_in_flight_bytes / attachment_max_bytes` requests download at once.
    pub attachments_in_flight_bytes: u64,
    /// Largest request body (the AMQP message) that is decoded; larger ones are refused.
    pub max_request_bytes: u64,
    /// Largest `body_content`.
    pub max_body_bytes: u64,
    /// Most recipients (to + cc + bcc together).
    pub max_recipients: usize,
    pub max_attachments: usize,
    /// Longest subject, in bytes (long ones are folded into lines of at most 998 octets).
    pub max_subject_bytes: usize,
    /// Most custom `headers`, and the longest value of one.
    pub max_headers: usize,
    pub max_header_bytes: usize,
}

impl Default for OutboundSection {
    fn default() -> Self {
        Self {
            attachment_max_bytes: 26_214_400,
            attachment_timeout: Dur(Duration::from_secs(30)),
            attachment_allow_private: false,
            send_timeout: Dur(Duration::from_secs(60)),
            attachments_in_flight_bytes: 268_435_456,
            max_request_bytes: 16_777_216,
            max_body_bytes: 10_485_760,
            max_recipients: 1000,
            max_attachments: 100,
            max_subject_bytes: 4096,
            max_headers: 100,
            max_header_bytes: 4096,
        }
    }
}

impl OutboundSection {
    /// The decoding limits of a request.
    pub fn limits(&self) -> crate::outbound::Limits {
        crate::outbound::Limits {
            max_request_bytes: self.max_request_bytes,
            max_body_bytes: self.max_body_bytes,
            max_recipients: self.max_recipients,
            max_attachments: self.max_attachments,
            max_subject_bytes: self.max_subject_bytes,
            max_headers: self.max_headers,
            max_header_bytes: self.max_header_bytes,
        }
    }
}

/// Inbound mail: how much of it is held at once.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InboundSection {
    /// A received email larger than this is not published: its headers and size go to the
    /// inbound DLQ and its bytes are stored (linked from the entry).
    pub max_message_bytes: u64,
    /// Bytes of mail one fetcher holds in memory per batch (IMAP fetches are grouped by the
    /// messages' sizes to stay under it).
    pub fetch_batch_bytes: u64,
}

impl Default for InboundSection {
    fn default() -> Self {
        Self {
            max_message_bytes: 52_428_800,
            fetch_batch_bytes: 33_554_432,
        }
    }
}

/// This instance among others sharing the broker and the database.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSection {
    /// Names this instance in outbox claims (default `<host name>:<HTTP port>`). It must be
    /// unique among running instances and stay the same across restarts: at start an
    /// instance releases the claims its previous run left.
    pub instance_id: Option<String>,
    /// How long an outbox claim lives without being renewed (in-flight claims are renewed
    /// every third of it); a claim of a dead instance frees its request after this.
    pub claim_ttl: Dur,
}

impl Default for ClusterSection {
    fn default() -> Self {
        Self {
            instance_id: None,
            claim_ttl: Dur(Duration::from_secs(30)),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AttachmentsSection {
    pub dir: PathBuf,
    pub public_base_url: String,
    pub link_ttl: Dur,
}

impl Default for AttachmentsSection {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("var/attachments"),
            public_base_url: "http://127.0.0.1:8000".into(),
            link_ttl: Dur(Duration::from_secs(7 * 24 * 3600)),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenantsSection {
    /// Relative to the main file's folder.
    pub dir: PathBuf,
}

impl Default for TenantsSection {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("tenants.d"),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownSection {
    /// How long in-flight work may take to finish after SIGTERM before the process exits anyway.
    pub grace: Option<Dur>,
}

/// The main file as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MainFile {
    pub rabbitmq: RabbitMqSection,
    pub queues: QueuesSection,
    pub database: DatabaseSection,
    pub http: HttpSection,
    pub retry: RetrySection,
    pub outbound: OutboundSection,
    pub attachments: AttachmentsSection,
    pub tenants: TenantsSection,
    pub shutdown: ShutdownSection,
    pub inbound: InboundSection,
    pub cluster: ClusterSection,
}

// ---------------------------------------------------------------------------------------------
// Tenant files
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    None,
    Starttls,
    Tls,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    Smtp,
    File,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MailProtocol {
    Imap,
    Pop3,
}

/// What an added mailbox publishes first (contract §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitialSync {
    New,
    All,
    Since(Duration),
}

impl<'de> Deserialize<'de> for InitialSync {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        match text.as_str() {
            "new" => Ok(InitialSync::New),
            "all" => Ok(InitialSync::All),
            other => parse_duration(other).map(InitialSync::Since).map_err(|_| {
                serde::de::Error::custom(format!(
                    "`{other}` is not \"new\", \"all\" or a duration such as \"30d\""
                ))
            }),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProviderFile {
    id: String,
    name: Option<String>,
    kind: ProviderKind,
    host: Option<String>,
    port: Option<u16>,
    tls: Option<TlsMode>,
    username: Option<String>,
    password: Option<Secret>,
    password_env: Option<String>,
    password_file: Option<PathBuf>,
    oauth2_token_env: Option<String>,
    ca_file: Option<PathBuf>,
    #[serde(default = "default_max_connections")]
    max_connections: u32,
    dir: Option<PathBuf>,
}

fn default_max_connections() -> u32 {
    4
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct MailboxFile {
    id: String,
    user_id: String,
    provider_id: String,
    protocol: MailProtocol,
    host: String,
    port: Option<u16>,
    tls: Option<TlsMode>,
    username: String,
    password: Option<Secret>,
    password_env: Option<String>,
    password_file: Option<PathBuf>,
    #[serde(default = "default_folder")]
    folder: String,
    #[serde(default = "default_true")]
    idle: bool,
    #[serde(default = "default_poll")]
    poll_interval: Dur,
    #[serde(default = "default_initial_sync")]
    initial_sync: InitialSync,
    #[serde(default)]
    delete_after_fetch: bool,
    ca_file: Option<PathBuf>,
}

fn default_folder() -> String {
    "INBOX".into()
}
fn default_true() -> bool {
    true
}
fn default_poll() -> Dur {
    Dur(Duration::from_secs(60))
}
fn default_initial_sync() -> InitialSync {
    InitialSync::New
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantFile {
    id: String,
    name: Option<String>,
    #[serde(default)]
    providers: Vec<ProviderFile>,
    #[serde(default)]
    mailboxes: Vec<MailboxFile>,
}

/// How a provider delivers mail.
#[derive(Debug, Clone, PartialEq)]
pub enum ProviderTransport {
    Smtp {
        host: String,
        port: u16,
        tls: TlsMode,
        username: Option<String>,
        password: Option<Secret>,
        oauth2_token: Option<Secret>,
        ca_file: Option<PathBuf>,
    },
    /// Each email written as an `.eml` file into `dir` (development; no mail leaves the machine).
    File { dir: PathBuf },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Provider {
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    pub max_connections: u32,
    pub transport: ProviderTransport,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Mailbox {
    pub id: String,
    pub tenant_id: String,
    pub user_id: String,
    pub provider_id: String,
    pub protocol: MailProtocol,
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
    pub username: String,
    pub password: Option<Secret>,
    pub folder: String,
    pub idle: bool,
    pub poll_interval: Duration,
    pub initial_sync: InitialSync,
    pub delete_after_fetch: bool,
    /// An extra CA to trust for this mailbox's server certificate.
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Tenant {
    pub id: String,
    pub name: String,
    /// The file it was loaded from, for messages.
    pub file: PathBuf,
    pub providers: Vec<Provider>,
    pub mailboxes: Vec<Mailbox>,
}

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub path: PathBuf,
    pub rabbitmq: RabbitMqSection,
    pub queues: QueuesSection,
    pub database: DatabaseSection,
    pub http: HttpSection,
    pub http_listen: SocketAddr,
    pub retry: RetrySection,
    pub outbound: OutboundSection,
    pub attachments: AttachmentsSection,
    pub tenants_dir: PathBuf,
    pub shutdown_grace: Duration,
    pub inbound: InboundSection,
    pub cluster: ClusterSection,
    /// `[cluster] instance_id`, or its default.
    pub instance_id: String,
    pub tenants: Vec<Tenant>,
    /// Things that are allowed but worth saying (for example credentials over `tls = "none"`).
    pub warnings: Vec<ConfigProblem>,
}

/// Where the config is when `--config` is not given.
pub fn default_config_path() -> PathBuf {
    std::env::var_os("MAILBRIDGE_CONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("config/mailbridge.toml"))
}

/// A source of environment variables; tests pass a map instead of the process environment.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Env for BTreeMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

impl Settings {
    /// Loads the main file at `path`, applies the environment and loads every tenant file.
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        Self::load_with_env(path, &ProcessEnv)
    }

    pub fn load_with_env(path: &Path, env: &dyn Env) -> Result<Settings, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError(vec![ConfigProblem {
                file: file.clone(),
                key: String::new(),
                message: format!("cannot read the config file: {e}"),
            }])
        })?;
        let mut problems = Vec::new();
        let main: MainFile = match parse_toml(&text) {
            Ok(m) => m,
            Err((key, message)) => {
                return Err(ConfigError(vec![ConfigProblem { file, key, message }]));
            }
        };
        let MainFile {
            mut rabbitmq,
            mut queues,
            mut database,
            mut http,
            retry,
            outbound,
            attachments,
            tenants,
            shutdown,
            inbound,
            cluster,
        } = main;

        apply_env(
            env,
            &mut rabbitmq,
            &mut queues,
            &mut database,
            &mut http,
            &mut problems,
        );

        let mut warnings = Vec::new();
        let at = |key: &str, message: String| ConfigProblem {
            file: file.clone(),
            key: key.into(),
            message,
        };
        if let Some(url) = &rabbitmq.url {
            if let Err(e) = url.expose().parse::<lapin::uri::AMQPUri>() {
                problems.push(at(
                    "rabbitmq.url",
                    format!(
                        "not an amqp:// or amqps:// URL ({})",
                        redact_credentials(&e, url.expose())
                    ),
                ));
            }
        }
        if let Some(ca) = &rabbitmq.ca_file {
            let ca = resolve_path(path.parent().unwrap_or(Path::new(".")), ca);
            if !ca.is_file() {
                problems.push(at(
                    "rabbitmq.ca_file",
                    format!("{} does not exist", ca.display()),
                ));
            }
            rabbitmq.ca_file = Some(ca);
        }
        if rabbitmq.prefetch == 0 {
            problems.push(at(
                "rabbitmq.prefetch",
                "must be at least 1 (0 would mean unbounded)".into(),
            ));
        }
        if rabbitmq.exchange.is_empty() {
            problems.push(at("rabbitmq.exchange", "must not be empty".into()));
        }
        for (key, name) in [
            ("queues.send", &queues.send),
            ("queues.inbound", &queues.inbound),
            ("queues.sync_user", &queues.sync_user),
            ("queues.result", &queues.result),
        ] {
            if name.is_empty() {
                problems.push(at(key, "must not be empty".into()));
            }
        }
        match crate::storage::pg_target(database.url.expose()) {
            Err(e) => problems.push(at(
                "database.url",
                format!(
                    "not a PostgreSQL connection string ({})",
                    redact_credentials(&e, database.url.expose())
                ),
            )),
            Ok(t) => {
                if let Some(root) = t.root_cert.filter(|r| !r.is_file()) {
                    problems.push(at(
                        "database.url",
                        format!("sslrootcert {} does not exist", root.display()),
                    ));
                }
            }
        }
        if database.max_connections == 0 {
            problems.push(at("database.max_connections", "must be at least 1".into()));
        }
        let http_listen = match http.listen.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                problems.push(at(
                    "http.listen",
                    format!("`{}` is not an address such as 127.0.0.1:8000", http.listen),
                ));
                SocketAddr::from(([127, 0, 0, 1], 8000))
            }
        };
        if retry.delays.is_empty() && retry.max_retries > 0 {
            problems.push(at(
                "retry.delays",
                "needs at least one delay when max_retries > 0".into(),
            ));
        }
        if retry.delays.iter().any(|d| d.0.is_zero()) {
            problems.push(at("retry.delays", "a delay must be longer than 0".into()));
        }
        for (key, value) in [
            ("outbound.max_request_bytes", outbound.max_request_bytes),
            ("outbound.max_body_bytes", outbound.max_body_bytes),
            ("outbound.max_recipients", outbound.max_recipients as u64),
            (
                "outbound.max_subject_bytes",
                outbound.max_subject_bytes as u64,
            ),
            (
                "outbound.max_header_bytes",
                outbound.max_header_bytes as u64,
            ),
            (
                "outbound.attachment_max_bytes",
                outbound.attachment_max_bytes,
            ),
            ("inbound.max_message_bytes", inbound.max_message_bytes),
            ("inbound.fetch_batch_bytes", inbound.fetch_batch_bytes),
        ] {
            if value == 0 {
                problems.push(at(key, "must be at least 1".into()));
            }
        }
        if outbound.attachments_in_flight_bytes < outbound.attachment_max_bytes {
            problems.push(at(
                "outbound.attachments_in_flight_bytes",
                format!(
                    "must be at least outbound.attachment_max_bytes ({}): each request with attachments reserves that much",
                    outbound.attachment_max_bytes
                ),
            ));
        }
        if cluster.claim_ttl.0 < Duration::from_secs(3) {
            problems.push(at(
                "cluster.claim_ttl",
                "must be at least 3s (claims are renewed every third of it)".into(),
            ));
        }
        // AMQP names are short strings (at most 255 bytes); the service adds suffixes.
        for (key, name) in [
            ("rabbitmq.exchange", &rabbitmq.exchange),
            ("queues.send", &queues.send),
            ("queues.inbound", &queues.inbound),
            ("queues.sync_user", &queues.sync_user),
            ("queues.result", &queues.result),
        ] {
            if name.len() > 200 {
                problems.push(at(key, "must be at most 200 bytes long".into()));
            }
        }
        if url::Url::parse(&attachments.public_base_url).is_err() {
            problems.push(at(
                "attachments.public_base_url",
                format!("`{}` is not a URL", attachments.public_base_url),
            ));
        }

        let base = path.parent().unwrap_or(Path::new("."));
        let tenants_dir = base.join(&tenants.dir);
        let tenant_list = load_tenants(&tenants_dir, env, &mut problems, &mut warnings);

        let instance_id = match cluster.instance_id.clone() {
            Some(id) if id.trim().is_empty() || id.len() > 200 => {
                problems.push(at(
                    "cluster.instance_id",
                    "must be a non-empty name of at most 200 bytes".into(),
                ));
                String::new()
            }
            Some(id) => id,
            None => format!("{}:{}", host_name(), http_listen.port()),
        };

        if !problems.is_empty() {
            return Err(ConfigError(problems));
        }
        Ok(Settings {
            path: path.to_path_buf(),
            rabbitmq,
            queues,
            database,
            http,
            http_listen,
            retry,
            outbound,
            attachments,
            tenants_dir,
            shutdown_grace: shutdown
                .grace
                .map(|d| d.0)
                .unwrap_or(Duration::from_secs(30)),
            inbound,
            cluster,
            instance_id,
            tenants: tenant_list,
            warnings,
        })
    }

    /// The AMQP URI to connect with (contains the password: never log it, use [`Self::amqp_display`]).
    pub fn amqp_uri(&self) -> Result<lapin::uri::AMQPUri, String> {
        let mut uri: lapin::uri::AMQPUri = match &self.rabbitmq.url {
            Some(url) => url.expose().parse()?,
            None => {
                let mut uri = lapin::uri::AMQPUri::default();
                uri.authority.host = self.rabbitmq.host.clone();
                uri.authority.port = self.rabbitmq.port;
                uri.authority.userinfo.username = self.rabbitmq.username.clone();
                uri.authority.userinfo.password = self.rabbitmq.password.expose().to_string();
                uri.vhost = self.rabbitmq.vhost.clone();
                uri
            }
        };
        if uri.query.heartbeat.is_none() {
            uri.query.heartbeat = Some(self.rabbitmq.heartbeat.0.as_secs().clamp(1, 600) as u16);
        }
        if uri.query.connection_timeout.is_none() {
            uri.query.connection_timeout = Some(10_000);
        }
        Ok(uri)
    }

    /// Where the service connects, without credentials, for logs and `/health`.
    pub fn amqp_display(&self) -> String {
        match self.amqp_uri() {
            Ok(u) => format!(
                "{}://{}:{}/{}",
                u.scheme,
                u.authority.host,
                u.authority.port,
                u.vhost.replace('%', "%25").replace('/', "%2f")
            ),
            Err(_) => "<invalid url>".into(),
        }
    }

    /// The delay before retry number `retry` (1 for the first retry): the configured delays in
    /// order, the last one repeated when `max_retries` exceeds their number.
    pub fn retry_delay(&self, retry: u32) -> Duration {
        let delays = &self.retry.delays;
        let i = (retry.max(1) as usize - 1).min(delays.len().saturating_sub(1));
        delays.get(i).map(|d| d.0).unwrap_or(Duration::from_secs(1))
    }

    /// The service's own delay queue for `delay`: messages wait there for their TTL, then are
    /// dead-lettered back to the exchange with the send queue's routing key.
    pub fn retry_queue(&self, delay: Duration) -> String {
        format!(
            "mailbridge.retry.{}.{}ms",
            self.queues.send,
            delay.as_millis()
        )
    }

    /// Every delay queue of the configuration, with its delay.
    pub fn retry_queues(&self) -> Vec<(String, Duration)> {
        let mut out: Vec<(String, Duration)> = Vec::new();
        for d in &self.retry.delays {
            let q = self.retry_queue(d.0);
            if !out.iter().any(|(name, _)| *name == q) {
                out.push((q, d.0));
            }
        }
        out
    }

    /// A provider by id, only when it belongs to `tenant_id`.
    pub fn provider(&self, tenant_id: &str, provider_id: &str) -> Option<&Provider> {
        self.tenants
            .iter()
            .find(|t| t.id == tenant_id)?
            .providers
            .iter()
            .find(|p| p.id == provider_id)
    }
}

/// `text` with the credentials of `url` (what stands between `://` and `@`, and its password
/// part) replaced by `***`: a parser's error may quote the input.
pub fn redact_credentials(text: &dyn fmt::Display, url: &str) -> String {
    let mut out = text.to_string();
    let after_scheme = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    if let Some((userinfo, _)) = after_scheme.rsplit_once('@') {
        let mut secrets: Vec<&str> = vec![userinfo];
        if let Some((_, password)) = userinfo.split_once(':') {
            secrets.push(password);
        }
        for secret in secrets.into_iter().filter(|s| !s.is_empty()) {
            out = out.replace(secret, "***");
        }
    }
    // A query parameter may carry a password too (`?password=…`).
    for (i, _) in url.match_indices("password=") {
        let value: String = url[i + 9..]
            .chars()
            .take_while(|c| *c != '&' && *c != ' ')
            .collect();
        if !value.is_empty() {
            out = out.replace(&value, "***");
        }
    }
    out
}

/// `p` relative to `base` unless it is absolute.
pub fn resolve_path(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// This machine's host name (for the default instance id).
pub fn host_name() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name = name.trim();
    if name.is_empty() {
        "localhost".into()
    } else {
        name.to_string()
    }
}

/// Parses TOML into `T`, returning the dotted key path and message on failure.
fn parse_toml<T: for<'de> Deserialize<'de>>(text: &str) -> Result<T, (String, String)> {
    let de = toml::Deserializer::parse(text).map_err(|e| (String::new(), one_line(&e)))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let key = if key == "." { String::new() } else { key };
        (key, one_line(e.inner()))
    })
}

fn one_line(e: &dyn fmt::Display) -> String {
    e.to_string()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('|') && !l.chars().all(|c| c == '^'))
        .collect::<Vec<_>>()
        .join("; ")
}

fn apply_env(
    env: &dyn Env,
    rabbitmq: &mut RabbitMqSection,
    queues: &mut QueuesSection,
    database: &mut DatabaseSection,
    http: &mut HttpSection,
    problems: &mut Vec<ConfigProblem>,
) {
    let nonempty = |name: &str| env.var(name).filter(|v| !v.is_empty());
    if let Some(v) = nonempty("RABBITMQ_URL") {
        rabbitmq.url = Some(Secret::new(v));
    }
    if let Some(v) = nonempty("RABBITMQ_HOST") {
        rabbitmq.host = v;
    }
    if let Some(v) = nonempty("RABBITMQ_PORT") {
        match v.parse() {
            Ok(p) => rabbitmq.port = p,
            Err(_) => problems.push(ConfigProblem {
                file: ENVIRONMENT.into(),
                key: "RABBITMQ_PORT".into(),
                message: format!("`{v}` is not a port number"),
            }),
        }
    }
    if let Some(v) = nonempty("RABBITMQ_USERNAME") {
        rabbitmq.username = v;
    }
    if let Some(v) = env.var("RABBITMQ_PASSWORD") {
        rabbitmq.password = Secret::new(v);
    }
    if let Some(v) = nonempty("RABBITMQ_VHOST") {
        rabbitmq.vhost = v;
    }
    for (name, slot) in [
        ("RABBITMQ_EMAIL_SEND_QUEUE", &mut queues.send),
        ("RABBITMQ_EMAIL_INBOUND_QUEUE", &mut queues.inbound),
        ("RABBITMQ_EMAIL_SYNC_USER_QUEUE", &mut queues.sync_user),
        ("RABBITMQ_EMAIL_RESULT_QUEUE", &mut queues.result),
    ] {
        if let Some(v) = nonempty(name) {
            *slot = v;
        }
    }
    if let Some(v) = nonempty("DATABASE_URL") {
        database.url = Secret::new(v);
    }
    if let Some(v) = nonempty("HTTP_LISTEN") {
        http.listen = v;
    }
}

fn load_tenants(
    dir: &Path,
    env: &dyn Env,
    problems: &mut Vec<ConfigProblem>,
    warnings: &mut Vec<ConfigProblem>,
) -> Vec<Tenant> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        // No tenant folder: a service with no tenants yet is a valid configuration.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            problems.push(ConfigProblem {
                file: dir.display().to_string(),
                key: String::new(),
                message: format!("cannot read the tenants folder: {e}"),
            });
            return Vec::new();
        }
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();

    let mut tenants = Vec::new();
    let mut tenant_ids: HashSet<String> = HashSet::new();
    let mut provider_ids: HashSet<String> = HashSet::new();
    let mut mailbox_ids: HashSet<String> = HashSet::new();
    for path in files {
        let file = path.display().to_string();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                problems.push(ConfigProblem {
                    file,
                    key: String::new(),
                    message: format!("cannot read: {e}"),
                });
                continue;
            }
        };
        let raw: TenantFile = match parse_toml(&text) {
            Ok(t) => t,
            Err((key, message)) => {
                problems.push(ConfigProblem { file, key, message });
                continue;
            }
        };
        let mut p = |key: String, message: String| {
            problems.push(ConfigProblem {
                file: file.clone(),
                key,
                message,
            })
        };
        if raw.id.trim().is_empty() {
            p("id".into(), "must not be empty".into());
        } else if !tenant_ids.insert(raw.id.clone()) {
            p(
                "id".into(),
                format!("tenant id `{}` is already used by another file", raw.id),
            );
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let mut providers = Vec::new();
        for (i, pf) in raw.providers.into_iter().enumerate() {
            let key = |k: &str| format!("providers[{i}].{k}");
            if pf.id.trim().is_empty() {
                p(key("id"), "must not be empty".into());
            } else if !provider_ids.insert(pf.id.clone()) {
                p(
                    key("id"),
                    format!("provider id `{}` is already used", pf.id),
                );
            }
            if pf.max_connections == 0 {
                p(key("max_connections"), "must be at least 1".into());
            }
            let transport = match pf.kind {
                ProviderKind::File => match pf.dir {
                    Some(d) => ProviderTransport::File {
                        dir: if d.is_absolute() { d } else { base.join(d) },
                    },
                    None => {
                        p(key("dir"), "a provider of kind \"file\" needs `dir`".into());
                        continue;
                    }
                },
                ProviderKind::Smtp => {
                    let host = match pf.host {
                        Some(h) if !h.trim().is_empty() => h,
                        _ => {
                            p(
                                key("host"),
                                "a provider of kind \"smtp\" needs `host`".into(),
                            );
                            String::new()
                        }
                    };
                    let tls = pf.tls.unwrap_or(TlsMode::Starttls);
                    let port = pf.port.unwrap_or(match tls {
                        TlsMode::None => 25,
                        TlsMode::Starttls => 587,
                        TlsMode::Tls => 465,
                    });
                    if port == 0 {
                        p(key("port"), "must be between 1 and 65535".into());
                    }
                    let password = resolve_secret(
                        env,
                        base,
                        pf.password,
                        pf.password_env.as_deref(),
                        pf.password_file.as_deref(),
                        &key,
                        &mut p,
                    );
                    let oauth2_token = match pf.oauth2_token_env.as_deref() {
                        Some(name) => match env.var(name) {
                            Some(v) => Some(Secret::new(v)),
                            None => {
                                p(
                                    key("oauth2_token_env"),
                                    format!("environment variable `{name}` is not set"),
                                );
                                None
                            }
                        },
                        None => None,
                    };
                    let ca_file = pf
                        .ca_file
                        .map(|f| if f.is_absolute() { f } else { base.join(f) });
                    if let Some(f) = &ca_file {
                        if !f.is_file() {
                            p(key("ca_file"), format!("{} does not exist", f.display()));
                        }
                    }
                    if tls == TlsMode::None && (password.is_some() || oauth2_token.is_some()) {
                        warnings.push(ConfigProblem {
                            file: file.clone(),
                            key: key("tls"),
                            message: "credentials will be sent without TLS; only do this for a relay on a trusted network".into(),
                        });
                    }
                    ProviderTransport::Smtp {
                        host,
                        port,
                        tls,
                        username: pf.username,
                        password,
                        oauth2_token,
                        ca_file,
                    }
                }
            };
            providers.push(Provider {
                name: pf.name.unwrap_or_else(|| pf.id.clone()),
                id: pf.id,
                tenant_id: raw.id.clone(),
                max_connections: pf.max_connections,
                transport,
            });
        }
        let mut mailboxes = Vec::new();
        for (i, mf) in raw.mailboxes.into_iter().enumerate() {
            let key = |k: &str| format!("mailboxes[{i}].{k}");
            if mf.id.trim().is_empty() {
                p(key("id"), "must not be empty".into());
            } else if !mailbox_ids.insert(mf.id.clone()) {
                p(key("id"), format!("mailbox id `{}` is already used", mf.id));
            }
            if !providers.iter().any(|pr| pr.id == mf.provider_id) {
                p(
                    key("provider_id"),
                    format!(
                        "no provider `{}` in this tenant; a mailbox's provider must be one of its own tenant's [[providers]]",
                        mf.provider_id
                    ),
                );
            }
            if mf.host.trim().is_empty() {
                p(key("host"), "must not be empty".into());
            }
            if mf.poll_interval.0.is_zero() {
                p(key("poll_interval"), "must be longer than 0".into());
            }
            let tls = mf.tls.unwrap_or(TlsMode::Tls);
            let port = mf.port.unwrap_or(match (mf.protocol, tls) {
                (MailProtocol::Imap, TlsMode::Tls) => 993,
                (MailProtocol::Imap, _) => 143,
                (MailProtocol::Pop3, TlsMode::Tls) => 995,
                (MailProtocol::Pop3, _) => 110,
            });
            if port == 0 {
                p(key("port"), "must be between 1 and 65535".into());
            }
            let password = resolve_secret(
                env,
                base,
                mf.password,
                mf.password_env.as_deref(),
                mf.password_file.as_deref(),
                &key,
                &mut p,
            );
            if tls == TlsMode::None && password.is_some() {
                warnings.push(ConfigProblem {
                    file: file.clone(),
                    key: key("tls"),
                    message: "the mailbox password will be sent without TLS; only do this for a server on a trusted network".into(),
                });
            }
            let ca_file = mf
                .ca_file
                .map(|f| if f.is_absolute() { f } else { base.join(f) });
            if let Some(f) = &ca_file {
                if !f.is_file() {
                    p(key("ca_file"), format!("{} does not exist", f.display()));
                }
            }
            mailboxes.push(Mailbox {
                ca_file,
                id: mf.id,
                tenant_id: raw.id.clone(),
                user_id: mf.user_id,
                provider_id: mf.provider_id,
                protocol: mf.protocol,
                host: mf.host,
                port,
                tls,
                username: mf.username,
                password,
                folder: mf.folder,
                idle: mf.idle,
                poll_interval: mf.poll_interval.0,
                initial_sync: mf.initial_sync,
                delete_after_fetch: mf.delete_after_fetch,
            });
        }
        tenants.push(Tenant {
            name: raw.name.unwrap_or_else(|| raw.id.clone()),
            id: raw.id,
            file: path.clone(),
            providers,
            mailboxes,
        });
    }
    tenants
}

fn resolve_secret(
    env: &dyn Env,
    base: &Path,
    inline: Option<Secret>,
    from_env: Option<&str>,
    from_file: Option<&Path>,
    key: &dyn Fn(&str) -> String,
    problem: &mut dyn FnMut(String, String),
) -> Option<Secret> {
    let given = [inline.is_some(), from_env.is_some(), from_file.is_some()]
        .iter()
        .filter(|x| **x)
        .count();
    if given > 1 {
        problem(
            key("password"),
            "give only one of `password`, `password_env` and `password_file`".into(),
        );
        return None;
    }
    if inline.is_some() {
        return inline;
    }
    if let Some(name) = from_env {
        return match env.var(name) {
            Some(v) => Some(Secret::new(v)),
            None => {
                problem(
                    key("password_env"),
                    format!("environment variable `{name}` is not set"),
                );
                None
            }
        };
    }
    if let Some(file) = from_file {
        let path = if file.is_absolute() {
            file.to_path_buf()
        } else {
            base.join(file)
        };
        return match std::fs::read_to_string(&path) {
            Ok(v) => Some(Secret::new(v.trim_end_matches(['\r', '\n']))),
            Err(e) => {
                problem(
                    key("password_file"),
                    format!("cannot read {}: {e}", path.display()),
                );
                None
            }
        };
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        p
    }

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mb-settings-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn empty_file_gives_every_default() {
        let d = tempdir("empty");
        let main = write(&d, "m.toml", "");
        let s = Settings::load_with_env(&main, &BTreeMap::new()).unwrap();
        assert_eq!(s.rabbitmq.host, "localhost");
        assert_eq!(s.rabbitmq.prefetch, 256);
        assert_eq!(s.queues.public_queues().len(), 6);
        assert_eq!(
            s.retry
                .delays
                .iter()
                .map(|d| d.0.as_secs())
                .collect::<Vec<_>>(),
            vec![1, 5, 15]
        );
        assert_eq!(s.http_listen.port(), 8000);
        assert_eq!(s.attachments.link_ttl.0.as_secs(), 7 * 86400);
        assert!(s.tenants.is_empty());
    }

    #[test]
    fn retry_delays_repeat_the_last() {
        let d = tempdir("retry");
        let main = write(
            &d,
            "m.toml",
            "[retry]\nmax_retries = 5\ndelays = [\"1s\", \"5s\"]\n",
        );
        let s = Settings::load_with_env(&main, &BTreeMap::new()).unwrap();
        let secs: Vec<u64> = (1..=5).map(|n| s.retry_delay(n).as_secs()).collect();
        assert_eq!(secs, [1, 5, 5, 5, 5]);
        assert_eq!(s.retry_queues().len(), 2);
        assert_eq!(s.retry_queues()[0].0, "mailbridge.retry.email.send.1000ms");
    }

    #[test]
    fn environment_overrides_the_file() {
        let d = tempdir("env");
        let main = write(&d, "m.toml", "[rabbitmq]\nhost = \"filehost\"\nport = 1\n");
        let env: BTreeMap<String, String> = [
            ("RABBITMQ_HOST", "envhost"),
            ("RABBITMQ_PORT", "5673"),
            ("RABBITMQ_EMAIL_SEND_QUEUE", "x.send"),
            ("HTTP_LISTEN", "127.0.0.1:9999"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let s = Settings::load_with_env(&main, &env).unwrap();
        assert_eq!(s.rabbitmq.host, "envhost");
        assert_eq!(s.rabbitmq.port, 5673);
        assert_eq!(s.queues.send, "x.send");
        assert_eq!(s.queues.send_dlq(), "x.send.dlq");
        assert_eq!(s.http_listen.port(), 9999);
    }

    #[test]
    fn problems_name_file_and_key() {
        let d = tempdir("bad");
        let main = write(&d, "m.toml", "[rabbitmq]\nport = \"five\"\n");
        let err = Settings::load_with_env(&main, &BTreeMap::new()).unwrap_err();
        assert_eq!(err.0.len(), 1);
        assert_eq!(err.0[0].key, "rabbitmq.port");
        assert!(err.0[0].file.ends_with("m.toml"));

        let main = write(&d, "m.toml", "[retry]\ndelays = [\"1s\", \"soon\"]\n");
        let err = Settings::load_with_env(&main, &BTreeMap::new()).unwrap_err();
        assert_eq!(err.0[0].key, "retry.delays[1]");
        assert!(
            err.0[0].message.contains("not a duration"),
            "{}",
            err.0[0].message
        );

        let main = write(&d, "m.toml", "[rabbitmq]\nprefech = 3\n");
        let err = Settings::load_with_env(&main, &BTreeMap::new()).unwrap_err();
        assert!(err.0[0].message.contains("prefech"), "{}", err.0[0].message);
    }

    #[test]
    fn tenant_problems_are_all_reported() {
        let d = tempdir("tenants");
        let main = write(&d, "m.toml", "");
        write(
            &d,
            "tenants.d/a.toml",
            r#"
id = "t1"
[[providers]]
id = "p1"
kind = "smtp"
host = "localhost"
password_env = "MB_TEST_UNSET_VAR"
[[mailboxes]]
id = "m1"
user_id = "u"
provider_id = "p-of-someone-else"
protocol = "imap"
host = "localhost"
username = "u"
"#,
        );
        write(&d, "tenants.d/b.toml", "id = \"t1\"\n");
        let err = Settings::load_with_env(&main, &BTreeMap::new()).unwrap_err();
        let keys: Vec<_> = err.0.iter().map(|p| p.key.as_str()).collect();
        assert!(keys.contains(&"providers[0].password_env"), "{keys:?}");
        assert!(keys.contains(&"mailboxes[0].provider_id"), "{keys:?}");
        assert!(keys.contains(&"id"), "{keys:?}");
        assert!(err.0.iter().any(|p| p.file.ends_with("b.toml")));
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("hunter2");
        assert!(!format!("{s:?} {s}").contains("hunter2"));
        let d = tempdir("secret");
        let main = write(&d, "m.toml", "[rabbitmq]\npassword = \"hunter2\"\n");
        let s = Settings::load_with_env(&main, &BTreeMap::new()).unwrap();
        assert!(!format!("{s:?}").contains("hunter2"));
        assert!(!s.amqp_display().contains("hunter2"));
    }
}

fn fingerprint_of(debug: String, secrets: &[Option<&Secret>]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    debug.hash(&mut h);
    for s in secrets {
        s.map(|s| s.expose()).hash(&mut h);
    }
    h.finish()
}

impl Provider {
    /// Changes whenever anything of the provider changes, secrets included.
    pub fn fingerprint(&self) -> u64 {
        match &self.transport {
            ProviderTransport::Smtp {
                password,
                oauth2_token,
                ..
            } => fingerprint_of(
                format!("{self:?}"),
                &[password.as_ref(), oauth2_token.as_ref()],
            ),
            ProviderTransport::File { .. } => fingerprint_of(format!("{self:?}"), &[]),
        }
    }
}

impl Mailbox {
    /// Changes whenever anything of the mailbox changes, its password included.
    pub fn fingerprint(&self) -> u64 {
        fingerprint_of(format!("{self:?}"), &[self.password.as_ref()])
    }
}

/// What a reload changes, by provider and mailbox id (contract §2: Vector-style diff).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ConfigDiff {
    pub tenants_added: Vec<String>,
    pub tenants_removed: Vec<String>,
    pub providers_added: Vec<String>,
    pub providers_removed: Vec<String>,
    pub providers_changed: Vec<String>,
    pub mailboxes_added: Vec<String>,
    pub mailboxes_removed: Vec<String>,
    pub mailboxes_changed: Vec<String>,
    /// Sections outside the tenant files that differ: they apply at the next restart.
    pub restart_required: Vec<String>,
}

impl ConfigDiff {
    pub fn is_empty(&self) -> bool {
        *self == ConfigDiff::default()
    }
}

fn diff_by_id<'a, T: PartialEq + 'a>(
    old: impl Iterator<Item = (&'a str, &'a T)>,
    new: impl Iterator<Item = (&'a str, &'a T)>,
) -> (Vec<String>, Vec<String>, Vec<String>) {
    let old: BTreeMap<&str, &T> = old.collect();
    let new: BTreeMap<&str, &T> = new.collect();
    let added = new
        .keys()
        .filter(|k| !old.contains_key(*k))
        .map(|k| k.to_string())
        .collect();
    let removed = old
        .keys()
        .filter(|k| !new.contains_key(*k))
        .map(|k| k.to_string())
        .collect();
    let changed = new
        .iter()
        .filter(|(k, v)| old.get(*k).is_some_and(|o| o != *v))
        .map(|(k, _)| k.to_string())
        .collect();
    (added, removed, changed)
}

impl Settings {
    /// What a reload applies: the tenants (and the warnings about them) of `loaded`, every
    /// other section as it is running. Those sections were used to declare the topology and
    /// build the connections, so they change only with a restart (the diff lists them as
    /// `restart_required`) — a retry delay, say, is never used before its queue is declared.
    pub fn with_tenants_of(&self, loaded: Settings) -> Settings {
        Settings {
            tenants: loaded.tenants,
            tenants_dir: loaded.tenants_dir,
            warnings: loaded.warnings,
            ..self.clone()
        }
    }

    /// How `new` differs from `self`. Secrets take part in the comparison (a changed password
    /// restarts the connection) without ever being printed.
    pub fn diff(&self, new: &Settings) -> ConfigDiff {
        let providers = |s: &'_ Settings| -> Vec<(String, Provider)> {
            s.tenants
                .iter()
                .flat_map(|t| t.providers.iter().map(|p| (p.id.clone(), p.clone())))
                .collect()
        };
        let mailboxes = |s: &'_ Settings| -> Vec<(String, Mailbox)> {
            s.tenants
                .iter()
                .flat_map(|t| t.mailboxes.iter().map(|m| (m.id.clone(), m.clone())))
                .collect()
        };
        let (op, np) = (providers(self), providers(new));
        let (pa, pr, pc) = diff_by_id(
            op.iter().map(|(k, v)| (k.as_str(), v)),
            np.iter().map(|(k, v)| (k.as_str(), v)),
        );
        let (om, nm) = (mailboxes(self), mailboxes(new));
        let (ma, mr, mc) = diff_by_id(
            om.iter().map(|(k, v)| (k.as_str(), v)),
            nm.iter().map(|(k, v)| (k.as_str(), v)),
        );
        let ids = |s: &Settings| -> Vec<(String, ())> {
            s.tenants.iter().map(|t| (t.id.clone(), ())).collect()
        };
        let (ot, nt) = (ids(self), ids(new));
        let (ta, tr, _) = diff_by_id(
            ot.iter().map(|(k, v)| (k.as_str(), v)),
            nt.iter().map(|(k, v)| (k.as_str(), v)),
        );
        let mut restart_required = Vec::new();
        let sections: [(&str, String, String); 10] = [
            (
                "rabbitmq",
                format!(
                    "{:?}{:?}",
                    self.rabbitmq,
                    self.amqp_uri().ok().map(|u| u.to_string())
                ),
                format!(
                    "{:?}{:?}",
                    new.rabbitmq,
                    new.amqp_uri().ok().map(|u| u.to_string())
                ),
            ),
            (
                "queues",
                format!("{:?}", self.queues),
                format!("{:?}", new.queues),
            ),
            (
                "database",
                format!("{:?}{}", self.database, self.database.url.expose()),
                format!("{:?}{}", new.database, new.database.url.expose()),
            ),
            (
                "http",
                format!("{:?}{}", self.http, self.http_listen),
                format!("{:?}{}", new.http, new.http_listen),
            ),
            (
                "retry",
                format!("{:?}", self.retry),
                format!("{:?}", new.retry),
            ),
            (
                "outbound",
                format!("{:?}", self.outbound),
                format!("{:?}", new.outbound),
            ),
            (
                "attachments",
                format!("{:?}", self.attachments),
                format!("{:?}", new.attachments),
            ),
            (
                "inbound",
                format!("{:?}", self.inbound),
                format!("{:?}", new.inbound),
            ),
            (
                "cluster",
                format!("{:?}{}", self.cluster, self.instance_id),
                format!("{:?}{}", new.cluster, new.instance_id),
            ),
            (
                "shutdown",
                format!("{:?}", self.shutdown_grace),
                format!("{:?}", new.shutdown_grace),
            ),
        ];
        for (name, a, b) in sections {
            if a != b {
                restart_required.push(format!("[{name}]"));
            }
        }
        ConfigDiff {
            tenants_added: ta,
            tenants_removed: tr,
            providers_added: pa,
            providers_removed: pr,
            providers_changed: pc,
            mailboxes_added: ma,
            mailboxes_removed: mr,
            mailboxes_changed: mc,
            restart_required,
        }
    }
}

#[cfg(test)]
mod diff_tests {
    use super::*;

    #[test]
    fn the_diff_names_what_changed() {
        let d = std::env::temp_dir().join(format!("mb-diff-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("tenants.d")).unwrap();
        let main = d.join("m.toml");
        std::fs::write(&main, "").unwrap();
        let tenant = |pw: &str, extra: &str| {
            format!(
                "id = \"t1\"\n[[providers]]\nid = \"keep\"\nkind = \"file\"\ndir = \"x\"\n[[providers]]\nid = \"pw\"\nkind = \"smtp\"\nhost = \"h\"\nusername = \"u\"\npassword = \"{pw}\"\n{extra}"
            )
        };
        std::fs::write(
            d.join("tenants.d/t1.toml"),
            tenant(
                "one",
                "[[providers]]\nid = \"gone\"\nkind = \"file\"\ndir = \"y\"\n",
            ),
        )
        .unwrap();
        let old = Settings::load_with_env(&main, &BTreeMap::new()).unwrap();
        std::fs::write(d.join("tenants.d/t1.toml"), tenant("two", "")).unwrap();
        std::fs::write(
            d.join("tenants.d/t2.toml"),
            "id = \"t2\"\n[[providers]]\nid = \"new\"\nkind = \"file\"\ndir = \"z\"\n",
        )
        .unwrap();
        std::fs::write(&main, "[retry]\nmax_retries = 1\n").unwrap();
        let new = Settings::load_with_env(&main, &BTreeMap::new()).unwrap();
        let diff = old.diff(&new);
        assert_eq!(diff.tenants_added, ["t2"]);
        assert_eq!(diff.providers_added, ["new"]);
        assert_eq!(diff.providers_removed, ["gone"]);
        assert_eq!(
            diff.providers_changed,
            ["pw"],
            "a changed password is a change"
        );
        assert_eq!(diff.restart_required, ["[retry]"]);
        assert!(!format!("{diff:?}").contains("two"));
        assert!(old.diff(&old).is_empty());
    }
}
