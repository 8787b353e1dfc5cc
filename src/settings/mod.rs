//! Configuration: the main TOML file, the tenant files beside it, and the environment.
//!
//! Loading never stops at the first problem: every problem found is collected as a
//! [`ConfigProblem`] naming the file and the key, so `check-config` (and a refused reload)
//! can print them all at once. Every key has a default, so an empty main file runs against
//! local services. The seed's environment variables override the file after it is parsed.
//!
//! Secrets are resolved here (`password`, `password_env`, `password_file`) into [`Secret`],
//! whose `Debug` and `Display` never show the value.
//!
//! The files: `main_file` (the sections of the main file), `tenants` (the tenant files: tenants,
//! providers, mailboxes), `env` (the environment overrides), `secrets` (how secrets are given
//! and kept), `diff` (what a reload changes). Everything is re-exported here.

mod diff;
mod env;
mod main_file;
mod secrets;
mod tenants;

pub use diff::ConfigDiff;
pub use env::{Env, ProcessEnv};
pub use main_file::*;
pub(crate) use secrets::resolve_secret;
pub use secrets::Secret;
pub use tenants::*;

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
    pub log: LogSection,
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

/// The link key as configured (`link_key`, `link_key_env` or `link_key_file`, at most one;
/// at least 32 bytes), or none.
fn link_key(
    a: &main_file::AttachmentsSection,
    env: &dyn Env,
    base: &Path,
    problem: &mut dyn FnMut(&str, String),
) -> Option<Secret> {
    let key = |k: &str| format!("attachments.{k}");
    let value = resolve_secret(
        env,
        base,
        "link_key",
        a.link_key.clone(),
        a.link_key_env.as_deref(),
        a.link_key_file.as_deref(),
        &key,
        &mut |k: String, m: String| problem(&k, m),
    )?;
    if value.expose().len() < 32 {
        let given = if a.link_key.is_some() {
            "link_key"
        } else if a.link_key_env.is_some() {
            "link_key_env"
        } else {
            "link_key_file"
        };
        problem(
            &key(given),
            format!(
                "the link key has {} bytes; give at least 32 (e.g. `openssl rand -hex 32`)",
                value.expose().len()
            ),
        );
        return None;
    }
    Some(value)
}

/// Whether `user` can name the mailbox of an API (Gmail's `users/{user}`, Graph's
/// `users/{user}`): `me` or an address, in characters a URL path carries as they are.
pub fn is_api_user(user: &str) -> bool {
    !user.is_empty()
        && user
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "@.-_+".contains(c))
}

/// Checks an API's `base_url`: an http(s) URL with a host and nothing a request or a log
/// would carry unseen (credentials, a query, a fragment). `Ok(Some(warning))` for plain http
/// to a host other than loopback (tokens would cross the network in clear).
pub fn check_base_url(url: &str) -> Result<Option<String>, String> {
    let u = url::Url::parse(url).map_err(|_| format!("`{url}` is not an http(s) URL"))?;
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
        return Err(format!("`{url}` is not an http(s) URL"));
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err(
            "must not hold credentials (user:password@); give the key or token by its own keys"
                .into(),
        );
    }
    if u.query().is_some() || u.fragment().is_some() {
        return Err(format!(
            "`{}` must not have a query or a fragment",
            u.origin().ascii_serialization()
        ));
    }
    let loopback = match u.host() {
        Some(url::Host::Domain(d)) => d == "localhost",
        Some(url::Host::Ipv4(a)) => a.is_loopback(),
        Some(url::Host::Ipv6(a)) => a.is_loopback(),
        None => false,
    };
    if u.scheme() == "http" && !loopback {
        return Ok(Some(
            "plain http: the API key or token crosses the network in clear; use https".into(),
        ));
    }
    Ok(None)
}

/// A broker without credentials: `amqp://host:port/vhost`.
pub fn uri_display(u: &lapin::uri::AMQPUri) -> String {
    format!(
        "{}://{}:{}/{}",
        u.scheme,
        u.authority.host,
        u.authority.port,
        u.vhost.replace('%', "%25").replace('/', "%2f")
    )
}

/// `host:port` (`[v6 address]:port`) of a `[rabbitmq] hosts` entry.
fn host_port(entry: &str) -> Result<(String, u16), String> {
    let bad = || format!("`{entry}` is not host:port (a port from 1 to 65535)");
    let (host, port) = entry.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() || port == 0 || host.chars().any(|c| c.is_whitespace() || c == '/') {
        return Err(bad());
    }
    Ok((host.to_string(), port))
}

/// The service's own delay queues beyond the configured delays, for a provider that asks to
/// wait longer than the schedule (`Retry-After`): its wait is rounded up to the next rung.
pub const RETRY_LADDER: [Duration; 5] = [
    Duration::from_secs(30),
    Duration::from_secs(60),
    Duration::from_secs(300),
    Duration::from_secs(900),
    Duration::from_secs(3600),
];

/// The longest delay queue there is: a longer wait is waited in steps of it.
pub const LONGEST_RETRY_DELAY: Duration = RETRY_LADDER[RETRY_LADDER.len() - 1];

impl Settings {
    /// Loads the main file at `path`, applies the environment and loads every tenant file.
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        Self::load_with_env(path, &ProcessEnv)
    }

    pub fn load_with_env(path: &Path, env: &dyn Env) -> Result<Settings, ConfigError> {
        Self::load_inner(path, env, None)
    }

    /// Loads as [`Settings::load`] would with the tenant file `file` holding `text` (written
    /// or not): how a run-time edit is checked before it is written.
    pub fn load_edited(path: &Path, file: &Path, text: &str) -> Result<Settings, ConfigError> {
        Self::load_inner(path, &ProcessEnv, Some((file, text)))
    }

    fn load_inner(
        path: &Path,
        env: &dyn Env,
        overlay: Option<(&Path, &str)>,
    ) -> Result<Settings, ConfigError> {
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
        let mut main = main;
        env::apply_env(env, &mut main, &mut problems);
        let MainFile {
            mut rabbitmq,
            queues,
            database,
            http,
            retry,
            outbound,
            mut attachments,
            tenants,
            shutdown,
            inbound,
            cluster,
            log,
        } = main;

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
        if rabbitmq.url.is_some() && !rabbitmq.hosts.is_empty() {
            problems.push(at(
                "rabbitmq.hosts",
                "give either `url` or `hosts` (with username, password, vhost), not both".into(),
            ));
        }
        for (i, h) in rabbitmq.hosts.iter().enumerate() {
            if let Err(e) = host_port(h) {
                problems.push(at(&format!("rabbitmq.hosts[{i}]"), e));
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
        if !(inbound.connect_rate_per_host.is_finite() && inbound.connect_rate_per_host > 0.0) {
            problems.push(at(
                "inbound.connect_rate_per_host",
                "must be a number of logins per second above 0".into(),
            ));
        }
        if cluster.lease_ttl.0 < Duration::from_secs(3) {
            problems.push(at(
                "cluster.lease_ttl",
                "must be at least 3s (leases are renewed every third of it)".into(),
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
        let base_dir = path.parent().unwrap_or(Path::new("."));
        // Like every path in the files: relative to the file that names it.
        if attachments.dir.is_relative() {
            attachments.dir = base_dir.join(&attachments.dir);
        }
        attachments.link_key = link_key(&attachments, env, base_dir, &mut |key, message| {
            problems.push(at(key, message))
        });
        if url::Url::parse(&attachments.public_base_url).is_err() {
            problems.push(at(
                "attachments.public_base_url",
                format!("`{}` is not a URL", attachments.public_base_url),
            ));
        }

        let base = path.parent().unwrap_or(Path::new("."));
        let tenants_dir = base.join(&tenants.dir);
        let tenant_list = load_tenants(&tenants_dir, env, overlay, &mut problems, &mut warnings);

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
            log,
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

    /// Every broker to try, in order: one for `url` or `host`/`port`, one per `hosts` entry.
    pub fn amqp_uris(&self) -> Result<Vec<lapin::uri::AMQPUri>, String> {
        let uri = self.amqp_uri()?;
        if self.rabbitmq.hosts.is_empty() {
            return Ok(vec![uri]);
        }
        self.rabbitmq
            .hosts
            .iter()
            .map(|h| {
                let (host, port) = host_port(h)?;
                let mut u = uri.clone();
                u.authority.host = host;
                u.authority.port = port;
                Ok(u)
            })
            .collect()
    }

    /// Where the service connects, without credentials, for logs and `/health` (the brokers
    /// of `hosts` separated by commas).
    pub fn amqp_display(&self) -> String {
        match self.amqp_uris() {
            Ok(uris) => uris.iter().map(uri_display).collect::<Vec<_>>().join(","),
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

    /// The delay before retry number `retry` when the provider asked to wait at least
    /// `at_least` (a `Retry-After`): the scheduled delay when it is long enough, else the
    /// shortest delay queue that is — a configured delay or a rung of [`RETRY_LADDER`] — and
    /// the longest rung for a wait longer than all of them (the retry then asks again).
    pub fn retry_delay_at_least(&self, retry: u32, at_least: Option<Duration>) -> Duration {
        let scheduled = self.retry_delay(retry);
        match at_least.filter(|m| *m > scheduled) {
            Some(min) => self.delay_at_least(min),
            None => scheduled,
        }
    }

    /// The shortest declared delay queue at least `min` long (the longest rung past them
    /// all): where a send parked for its provider's rate limit waits.
    pub fn delay_at_least(&self, min: Duration) -> Duration {
        self.retry_queues()
            .into_iter()
            .map(|(_, d)| d)
            .filter(|d| *d >= min)
            .min()
            .unwrap_or(LONGEST_RETRY_DELAY)
    }

    /// Every delay queue: the configured delays', then the rungs of [`RETRY_LADDER`], each
    /// once with its delay. All are declared at connect; nothing is published to any other.
    pub fn retry_queues(&self) -> Vec<(String, Duration)> {
        let mut out: Vec<(String, Duration)> = Vec::new();
        let configured = self.retry.delays.iter().map(|d| d.0);
        for d in configured.chain(RETRY_LADDER) {
            let q = self.retry_queue(d);
            if !out.iter().any(|(name, _)| *name == q) {
                out.push((q, d));
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

pub(crate) fn one_line(e: &dyn fmt::Display) -> String {
    e.to_string()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('|') && !l.chars().all(|c| c == '^'))
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

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
        // The two configured delays, then the five rungs of the ladder.
        assert_eq!(s.retry_queues().len(), 7);
        assert_eq!(s.retry_queues()[0].0, "mailbridge.retry.email.send.1000ms");
        assert_eq!(
            s.retry_queues()[6].0,
            "mailbridge.retry.email.send.3600000ms"
        );
    }

    #[test]
    fn rabbitmq_hosts_are_tried_in_order_with_the_shared_credentials() {
        let d = tempdir("hosts");
        let main = write(
            &d,
            "m.toml",
            "[rabbitmq]\nhosts = [\"rabbit-1:5672\", \"[::1]:5673\"]\nusername = \"u\"\npassword = \"pw\"\nvhost = \"crm\"\n",
        );
        let s = Settings::load_with_env(&main, &BTreeMap::new()).unwrap();
        let uris = s.amqp_uris().unwrap();
        let hosts: Vec<(String, u16, String, String)> = uris
            .iter()
            .map(|u| {
                (
                    u.authority.host.clone(),
                    u.authority.port,
                    u.authority.userinfo.username.clone(),
                    u.vhost.clone(),
                )
            })
            .collect();
        assert_eq!(
            hosts,
            [
                ("rabbit-1".into(), 5672, "u".into(), "crm".into()),
                ("::1".into(), 5673, "u".into(), "crm".into())
            ]
        );
        assert_eq!(
            s.amqp_display(),
            "amqp://rabbit-1:5672/crm,amqp://::1:5673/crm"
        );
        assert!(!s.amqp_display().contains("pw"));
        // From the environment, comma-separated.
        let env: BTreeMap<String, String> =
            [("RABBITMQ_HOSTS".to_string(), "a:1, b:2".to_string())].into();
        let s = Settings::load_with_env(&main, &env).unwrap();
        assert_eq!(s.amqp_uris().unwrap().len(), 2);
        // Refused: no port, and together with url.
        let bad = write(
            &d,
            "bad.toml",
            "[rabbitmq]\nurl = \"amqp://x/\"\nhosts = [\"nohost\"]\n",
        );
        let err = Settings::load_with_env(&bad, &BTreeMap::new()).unwrap_err();
        let keys: Vec<&str> = err.0.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["rabbitmq.hosts", "rabbitmq.hosts[0]"], "{err}");
    }

    #[test]
    fn the_link_key_is_a_secret_of_at_least_32_bytes() {
        let d = tempdir("linkkey");
        let main = write(
            &d,
            "m.toml",
            "[attachments]\nlink_key_env = \"MB_LINK_KEY\"\n",
        );
        let env: BTreeMap<String, String> = [("MB_LINK_KEY".to_string(), "x".repeat(32))].into();
        let s = Settings::load_with_env(&main, &env).unwrap();
        assert_eq!(
            s.attachments.link_key.as_ref().unwrap().expose(),
            "x".repeat(32)
        );
        assert!(!format!("{:?}", s.attachments).contains(&"x".repeat(32)));
        let short: BTreeMap<String, String> = [("MB_LINK_KEY".to_string(), "short".into())].into();
        let err = Settings::load_with_env(&main, &short).unwrap_err();
        assert_eq!(err.0[0].key, "attachments.link_key_env");
        assert!(err.0[0].message.contains("at least 32"), "{err}");
        let both = write(
            &d,
            "both.toml",
            "[attachments]\nlink_key = \"a\"\nlink_key_file = \"k\"\n",
        );
        let err = Settings::load_with_env(&both, &BTreeMap::new()).unwrap_err();
        assert_eq!(err.0[0].key, "attachments.link_key");
    }

    #[test]
    fn api_base_urls_carry_nothing_unseen_and_warn_without_tls() {
        assert_eq!(check_base_url("https://api.sendgrid.com"), Ok(None));
        assert_eq!(check_base_url("http://127.0.0.1:8080"), Ok(None));
        assert_eq!(check_base_url("http://localhost:1/x"), Ok(None));
        assert!(check_base_url("http://api.example.com")
            .unwrap()
            .unwrap()
            .contains("in clear"));
        assert!(check_base_url("https://u:p@api.example.com")
            .unwrap_err()
            .contains("credentials"));
        let e = check_base_url("https://api.example.com/?key=secret").unwrap_err();
        assert!(e.contains("query") && !e.contains("secret"), "{e}");
        assert!(check_base_url("ftp://x").is_err());
        assert!(check_base_url("not a url").is_err());
    }

    #[test]
    fn a_retry_after_rounds_up_to_a_declared_delay_queue() {
        let d = tempdir("retry_after");
        let main = write(
            &d,
            "m.toml",
            "[retry]\nmax_retries = 5\ndelays = [\"1s\", \"45s\"]\n",
        );
        let s = Settings::load_with_env(&main, &BTreeMap::new()).unwrap();
        let at_least = |retry, secs| {
            s.retry_delay_at_least(retry, Some(Duration::from_secs(secs)))
                .as_secs()
        };
        // Shorter than the schedule: the schedule stands.
        assert_eq!(at_least(2, 10), 45);
        assert_eq!(s.retry_delay_at_least(1, None).as_secs(), 1);
        // Longer: the shortest declared queue at least as long, configured or a rung.
        assert_eq!(at_least(1, 2), 30);
        assert_eq!(at_least(1, 31), 45);
        assert_eq!(at_least(1, 46), 60);
        assert_eq!(at_least(1, 61), 300);
        assert_eq!(at_least(1, 3600), 3600);
        // Past the ladder: its longest rung.
        assert_eq!(at_least(1, 86_400), 3600);
        let declared: Vec<Duration> = s.retry_queues().into_iter().map(|(_, d)| d).collect();
        for secs in [0, 1, 7, 29, 30, 59, 299, 900, 901, 5000] {
            for retry in 1..=5 {
                let delay = s.retry_delay_at_least(retry, Some(Duration::from_secs(secs)));
                assert!(declared.contains(&delay), "{delay:?} has no queue");
            }
        }
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
    fn http_kind_problems_are_reported_and_keys_never_print() {
        let d = tempdir("http-kinds");
        let main = write(&d, "m.toml", "");
        write(
            &d,
            "tenants.d/bad.toml",
            r#"
id = "t1"
[[providers]]
id = "p0"
kind = "sendgrid"
[[providers]]
id = "p1"
kind = "mailgun"
api_key = "k"
[[providers]]
id = "p2"
kind = "ses"
region = "EU West"
access_key_id = "AKID"
secret_access_key = "s"
[[providers]]
id = "p3"
kind = "postmark"
apikey = "k"
[[providers]]
id = "p4"
kind = "resend"
api_key = "k"
base_url = "ftp://example.com"
[[providers]]
id = "p5"
kind = "gmail_api"
user = "a b"
access_token = "t"
[[providers]]
id = "p6"
kind = "ms_graph"
access_token = "t"
access_token_env = "MB_TOKEN"
[[providers]]
id = "p7"
kind = "resend"
api_key = " "
"#,
        );
        let err = Settings::load_with_env(&main, &BTreeMap::new()).unwrap_err();
        let keys: Vec<_> = err.0.iter().map(|p| p.key.as_str()).collect();
        for key in [
            "providers[0].api_key",
            "providers[1].domain",
            "providers[2].region",
            "providers[3].apikey",
            "providers[4].base_url",
            "providers[5].user",
            "providers[6].access_token",
            "providers[7].api_key",
        ] {
            assert!(keys.contains(&key), "{key} not in {keys:?}");
        }

        std::fs::remove_file(d.join("tenants.d/bad.toml")).unwrap();
        write(
            &d,
            "tenants.d/good.toml",
            r#"
id = "t1"
[[providers]]
id = "sg"
kind = "sendgrid"
api_key_env = "MB_KEY"
[[providers]]
id = "ses"
kind = "ses"
region = "eu-west-1"
access_key_id = "AKIDEXAMPLE"
secret_access_key = "aws-secret-hunter2"
[[providers]]
id = "graph"
kind = "ms_graph"
access_token = "graph-token-hunter2"
"#,
        );
        let env = BTreeMap::from([("MB_KEY".to_string(), "sg-key-hunter2".to_string())]);
        let s = Settings::load_with_env(&main, &env).unwrap();
        let shown = format!("{s:?}");
        assert!(shown.contains("graph.microsoft.com"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
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
