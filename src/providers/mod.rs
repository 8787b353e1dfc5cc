//! The sending kinds. One module per kind, each owning its configuration (a provider's table
//! in a tenant file, chosen by its `kind`), its validation, its client and how its answers
//! become an outcome. Everything else — the sender actor, the outbound pipeline, the reload
//! diff, the mirror — knows only [`ProviderConfig`] and [`Transport`]: adding a kind is one
//! new module and one line in [`KINDS`].
//!
//! An outcome is [`Accepted`] or a [`SendError`], whose [`SendError::class`] decides retry
//! versus dead letter and whose [`SendError::retry_after`] says how long a retry must wait at
//! least — never a kind's numbering read by the caller.

use std::fmt;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use time::OffsetDateTime;

use crate::outbound::{FailureClass, OutgoingEmail};
use crate::settings::{ConfigProblem, Env, Secret};

pub mod file;
pub mod gmail_api;
pub mod http_api;
pub mod limits;
pub mod mailgun;
pub mod ms_graph;
pub mod postmark;
pub mod resend;
pub mod sendgrid;
pub mod ses;
pub mod sigv4;
pub mod smtp;

pub use limits::RateLimits;

/// What a provider said when it took an email.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub provider_message_id: String,
    pub sent_at: OffsetDateTime,
}

/// Why a provider did not accept an email.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SendError {
    #[error("cannot connect to {endpoint}: {detail}")]
    Connect { endpoint: String, detail: String },
    #[error("no answer from {endpoint} within {timeout:?} ({during})")]
    Timeout {
        endpoint: String,
        timeout: Duration,
        during: &'static str,
    },
    #[error("TLS with {endpoint} failed: {detail}")]
    Tls { endpoint: String, detail: String },
    #[error("the certificate of {endpoint} is not trusted: {detail}; fix the server's certificate or give the provider a ca_file")]
    Certificate { endpoint: String, detail: String },
    #[error("{endpoint} does not offer STARTTLS; set tls = \"none\" or \"tls\" for this provider")]
    NoStarttls { endpoint: String },
    #[error("{endpoint} replied {code} to {during}: {reply}")]
    Rejected {
        endpoint: String,
        /// The command refused (`MAIL FROM`, `RCPT TO`, `DATA`, `end of data`, `AUTH`, …).
        during: &'static str,
        code: u16,
        reply: String,
    },
    #[error("SMTP session with {endpoint} broke: {detail}")]
    Protocol { endpoint: String, detail: String },
    /// The session failed after the whole message (final dot included) was written and
    /// before the server answered: it may have been delivered. Retried only by the retry
    /// schedule (never at once), and recorded in the outbox as uncertain.
    #[error("the outcome at {endpoint} is unknown: {detail} after the whole message was sent, before the server answered; it is retried later and may arrive twice")]
    Uncertain { endpoint: String, detail: String },
    #[error("{endpoint} cannot take this email: {what}")]
    Unsupported {
        endpoint: String,
        what: &'static str,
    },
    /// An HTTP API's answer other than success: 429 and 5xx are transient (after at least
    /// `retry_after`, when the API said), every other status permanent. `reply` is the API's
    /// own error text.
    #[error("{endpoint} answered HTTP {status}: {reply}")]
    Http {
        endpoint: String,
        status: u16,
        reply: String,
        retry_after: Option<Duration>,
        /// The API said it is throttling or busy in its body, whatever the status (Gmail's
        /// 403 `rateLimitExceeded`, Resend's 409 for a request still in progress): transient.
        throttled: bool,
    },
    /// The account's OAuth2 grant is gone (revoked, expired after inactivity): nothing will
    /// work until a user authorizes the account again.
    #[error("the OAuth2 account {account} must be re-authorized: {detail}")]
    Reauthorize { account: String, detail: String },
    /// No access token could be had for now (the token endpoint is unreachable or failing).
    #[error("cannot get an access token for {account}: {detail}")]
    Token { account: String, detail: String },
    /// The provider's rate limit (`rate_per_second`, `rate_per_day`) has no room for this
    /// send within the longest a send is held: it is parked for `wait`, not counted as a retry.
    #[error("waiting for the provider's {limit} limit; sent in {wait:?} at the earliest")]
    Deferred { limit: &'static str, wait: Duration },
    #[error("provider is misconfigured: {0}")]
    Config(String),
    #[error("cannot write the email file: {0}")]
    File(String),
    #[error("the sender for this provider is not running")]
    Unavailable,
    /// The service is shutting down and the email had not been sent (its final dot not
    /// written): the request goes back to the broker untouched.
    #[error("not sent: the service is shutting down")]
    ShuttingDown,
}

impl SendError {
    /// 5xx replies, a missing STARTTLS and configuration errors fail again the same way;
    /// everything else (4xx, network, timeouts, TLS interrupted) may succeed later.
    pub fn class(&self) -> FailureClass {
        match self {
            SendError::Rejected { code, .. } if *code >= 500 => FailureClass::Permanent,
            SendError::Http {
                status, throttled, ..
            } if *throttled || *status == 429 || *status >= 500 => FailureClass::Transient,
            SendError::Http { .. } | SendError::Reauthorize { .. } => FailureClass::Permanent,
            SendError::NoStarttls { .. }
            | SendError::Certificate { .. }
            | SendError::Config(_)
            | SendError::Unsupported { .. } => FailureClass::Permanent,
            _ => FailureClass::Transient,
        }
    }

    /// How long a retry must wait at least (a provider's `Retry-After`), beyond the schedule.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            SendError::Http { retry_after, .. } => *retry_after,
            SendError::Deferred { wait, .. } => Some(*wait),
            _ => None,
        }
    }

    /// Whether the provider may have accepted the email despite the failure.
    pub fn is_uncertain(&self) -> bool {
        matches!(self, SendError::Uncertain { .. })
    }

    /// The server's reply, when the failure was one.
    pub fn last_reply(&self) -> Option<String> {
        match self {
            SendError::Rejected { code, reply, .. } => Some(format!("{code} {reply}")),
            SendError::Http { status, reply, .. } => Some(format!("{status} {reply}")),
            _ => None,
        }
    }

    /// Whether it says nothing about the provider's health (the email's own fault, or the
    /// service stopping).
    pub fn is_about_the_email(&self) -> bool {
        match self {
            SendError::Rejected { .. } | SendError::ShuttingDown | SendError::Deferred { .. } => {
                true
            }
            // A 4xx is about the request, but for refused credentials (401, 403) and throttling
            // (429); 5xx are about the provider.
            SendError::Http {
                status, throttled, ..
            } => !throttled && (400..500).contains(status) && !matches!(status, 401 | 403 | 429),
            _ => false,
        }
    }
}

/// A send in progress (the actors' runtime is single-threaded: no `Send` needed).
pub type SendFuture<'a> = Pin<Box<dyn Future<Output = Result<Accepted, SendError>> + 'a>>;

/// How a provider delivers an email.
pub trait Transport {
    fn send<'a>(&'a self, email: &'a Arc<OutgoingEmail>) -> SendFuture<'a>;

    /// The shutdown grace is over: start nothing more, and abandon what has not been handed
    /// over yet (what has is seen through, so that it is recorded).
    fn abort(&self) {}
}

/// What building a transport may use.
pub struct TransportContext {
    /// The provider's id: its OAuth2 account is `provider:<id>`.
    pub provider_id: String,
    /// The running OAuth2 accounts (`crate::oauth2`), shared by every sender and fetcher.
    pub accounts: Arc<crate::oauth2::Accounts>,
    /// `[outbound] send_timeout`: the bound on one transaction.
    pub send_timeout: Duration,
    /// The provider's `max_connections`: at most this many sends at once.
    pub max_connections: u32,
}

/// A provider's configuration, as its kind reads it.
pub trait ProviderConfig: fmt::Debug + Send + Sync {
    /// The `kind` a tenant file names it with.
    fn kind(&self) -> &'static str;

    /// Feeds every setting into `h`, secrets included (hashed, never printed): the reload
    /// diff and the restarts of changed providers follow it.
    fn fingerprint(&self, h: &mut Fingerprint);

    /// What the `providers` mirror table shows of it (no secrets).
    fn mirror(&self) -> Mirror;

    /// The client that delivers through it.
    fn transport(&self, ctx: &TransportContext) -> Result<Box<dyn Transport>, SendError>;

    /// Whether it sends the email's fields (`OutgoingEmail::parts`, attachment bytes
    /// included) rather than its MIME message.
    fn wants_parts(&self) -> bool {
        false
    }

    /// The limits that apply when the provider's table sets none (an API's documented
    /// per-mailbox limits, say).
    fn default_limits(&self) -> RateLimits {
        RateLimits::default()
    }
}

/// A provider's row in the `providers` mirror table, beyond its ids and name.
#[derive(Debug, Clone, Default)]
pub struct Mirror {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub tls: Option<&'static str>,
    pub username: Option<String>,
}

/// A hash of a whole configuration, secrets included (fed their values, shown nothing).
pub struct Fingerprint(std::collections::hash_map::DefaultHasher);

impl Fingerprint {
    pub fn new() -> Self {
        Self(std::collections::hash_map::DefaultHasher::new())
    }

    /// Adds a setting.
    pub fn add(&mut self, value: &impl Hash) -> &mut Self {
        value.hash(&mut self.0);
        self
    }

    /// The hasher itself, for values that hash themselves.
    pub fn hasher(&mut self) -> &mut impl Hasher {
        &mut self.0
    }

    /// Adds a secret's value.
    pub fn secret(&mut self, secret: Option<&Secret>) -> &mut Self {
        secret.map(Secret::expose).hash(&mut self.0);
        self
    }

    pub fn finish(&self) -> u64 {
        self.0.finish()
    }
}

impl Default for Fingerprint {
    fn default() -> Self {
        Self::new()
    }
}

/// A kind's reader of its table.
pub type Parse = fn(toml::Table, &mut ParseContext) -> Option<Arc<dyn ProviderConfig>>;

/// Every sending kind, by the `kind` a tenant file names it with.
pub const KINDS: &[(&str, Parse)] = &[
    ("smtp", smtp::parse),
    ("file", file::parse),
    ("sendgrid", sendgrid::parse),
    ("mailgun", mailgun::parse),
    ("postmark", postmark::parse),
    ("ses", ses::parse),
    ("resend", resend::parse),
    ("gmail_api", gmail_api::parse),
    ("ms_graph", ms_graph::parse),
];

/// The kinds' names, for the message that names them all.
pub fn kind_names() -> String {
    KINDS
        .iter()
        .map(|(k, _)| format!("\"{k}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What a kind reading its table needs: where the table is (for problems and relative
/// paths), the environment (for secrets), and where problems and warnings go.
pub struct ParseContext<'a> {
    pub env: &'a dyn Env,
    /// The tenant file's folder: relative paths are relative to it.
    pub base: &'a Path,
    pub file: &'a str,
    /// The table's key in its file, such as `providers[2]`.
    pub prefix: String,
    pub problems: &'a mut Vec<ConfigProblem>,
    pub warnings: &'a mut Vec<ConfigProblem>,
}

impl ParseContext<'_> {
    /// The full key of `key` of this table.
    pub fn key(&self, key: &str) -> String {
        format!("{}.{key}", self.prefix)
    }

    pub fn problem(&mut self, key: &str, message: impl Into<String>) {
        let key = self.key(key);
        self.problems.push(ConfigProblem {
            file: self.file.to_string(),
            key,
            message: message.into(),
        });
    }

    pub fn warning(&mut self, key: &str, message: impl Into<String>) {
        let key = self.key(key);
        self.warnings.push(ConfigProblem {
            file: self.file.to_string(),
            key,
            message: message.into(),
        });
    }

    /// The table as the kind's fields (a struct with `deny_unknown_fields`, so a key the kind
    /// does not know is reported, with its path).
    pub fn fields<T: DeserializeOwned>(&mut self, table: toml::Table) -> Option<T> {
        match serde_path_to_error::deserialize::<_, T>(toml::Value::Table(table)) {
            Ok(t) => Some(t),
            Err(e) => {
                let path = e.path().to_string();
                let key = if path == "." { String::new() } else { path };
                let message = crate::settings::one_line(e.inner());
                let full = if key.is_empty() {
                    self.prefix.clone()
                } else {
                    self.key(&key)
                };
                self.problems.push(ConfigProblem {
                    file: self.file.to_string(),
                    key: full,
                    message,
                });
                None
            }
        }
    }

    /// A secret given as `<name>` (inline), `<name>_env` (an environment variable) or
    /// `<name>_file` (a file, relative to the tenant file): at most one of them.
    pub fn secret(
        &mut self,
        name: &str,
        inline: Option<Secret>,
        from_env: Option<String>,
        from_file: Option<PathBuf>,
    ) -> Option<Secret> {
        let (env, base, file, prefix) = (self.env, self.base, self.file, self.prefix.clone());
        let problems = &mut *self.problems;
        crate::settings::resolve_secret(
            env,
            base,
            name,
            inline,
            from_env.as_deref(),
            from_file.as_deref(),
            &|k: &str| format!("{prefix}.{k}"),
            &mut |key: String, message: String| {
                problems.push(ConfigProblem {
                    file: file.to_string(),
                    key,
                    message,
                })
            },
        )
    }

    /// The context of a table nested in this one (such as `oauth2`).
    pub fn nested(&mut self, key: &str) -> ParseContext<'_> {
        ParseContext {
            env: self.env,
            base: self.base,
            file: self.file,
            prefix: self.key(key),
            problems: &mut *self.problems,
            warnings: &mut *self.warnings,
        }
    }

    /// `p` relative to the tenant file's folder.
    pub fn path(&self, p: &Path) -> PathBuf {
        crate::settings::resolve_path(self.base, p)
    }

    /// A file that must exist (a CA, say): its path, or a problem.
    pub fn existing_file(&mut self, key: &str, p: Option<PathBuf>) -> Option<PathBuf> {
        let path = self.path(&p?);
        if !path.is_file() {
            self.problem(key, format!("{} does not exist", path.display()));
        }
        Some(path)
    }
}

/// The first error of type `T` in `e`'s source chain (inside I/O errors too).
pub fn find_source<'a, T: std::error::Error + 'static>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = current {
        if let Some(t) = err.downcast_ref::<T>() {
            return Some(t);
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if let Some(inner) = io.get_ref() {
                if let Some(t) = inner.downcast_ref::<T>() {
                    return Some(t);
                }
            }
        }
        current = err.source();
    }
    None
}
