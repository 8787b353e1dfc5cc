//! `kind = "smtp"`: a pool of sessions of the service's own SMTP client (`crate::smtp`): up
//! to `max_connections` sessions, each on a TCP_NODELAY socket, kept open and reused between
//! emails, dropped after any error, and pipelined (MAIL, RCPT, DATA in one write) where the
//! server offers PIPELINING. Every transaction is bounded by `[outbound] send_timeout`,
//! connecting (with TLS and AUTH) by `CONNECT_TIMEOUT`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use time::OffsetDateTime;
use tokio::sync::{watch, Semaphore};

use super::{
    find_source, Accepted, Fingerprint, Mirror, ParseContext, ProviderConfig, SendError,
    SendFuture, Transport, TransportContext,
};
use crate::credentials::Credential;
use crate::mailproto::tls_client_config;
use crate::oauth2::OAuth2Config;
use crate::outbound::{queue_id_from_reply, OutgoingEmail};
use crate::settings::{Secret, TlsMode};
use crate::smtp::{Credentials, SmtpConfig, SmtpError, SmtpSession};

/// An idle session is not reused after this long (servers drop idle clients).
const IDLE_MAX: Duration = Duration::from_secs(20);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// The table of an SMTP provider, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Fields {
    host: Option<String>,
    port: Option<u16>,
    tls: Option<TlsMode>,
    username: Option<String>,
    password: Option<Secret>,
    password_env: Option<String>,
    password_file: Option<PathBuf>,
    oauth2_token_env: Option<String>,
    oauth2: Option<toml::Table>,
    ca_file: Option<PathBuf>,
}

/// An SMTP provider.
#[derive(Debug, Clone)]
pub struct SmtpProvider {
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// An XOAUTH2 token given by the environment (`oauth2_token_env`).
    pub oauth2_token: Option<Secret>,
    /// An OAuth2 account (`[providers.oauth2]`): XOAUTH2 with its access tokens, as
    /// `username` (the account's address).
    pub oauth2: Option<OAuth2Config>,
    /// An extra CA to trust for the server's certificate.
    pub ca_file: Option<PathBuf>,
}

pub fn parse(table: toml::Table, ctx: &mut ParseContext) -> Option<Arc<dyn ProviderConfig>> {
    let f: Fields = ctx.fields(table)?;
    let host = match f.host {
        Some(h) if !h.trim().is_empty() => h,
        _ => {
            ctx.problem("host", "a provider of kind \"smtp\" needs `host`");
            String::new()
        }
    };
    let tls = f.tls.unwrap_or(TlsMode::Starttls);
    let port = f.port.unwrap_or(match tls {
        TlsMode::None => 25,
        TlsMode::Starttls => 587,
        TlsMode::Tls => 465,
    });
    if port == 0 {
        ctx.problem("port", "must be between 1 and 65535");
    }
    let password = ctx.secret("password", f.password, f.password_env, f.password_file);
    let oauth2_token = match f.oauth2_token_env {
        Some(var) => match ctx.env.var(&var) {
            Some(v) => Some(Secret::new(v)),
            None => {
                ctx.problem(
                    "oauth2_token_env",
                    format!("environment variable `{var}` is not set"),
                );
                None
            }
        },
        None => None,
    };
    let has_oauth2 = f.oauth2.is_some();
    let oauth2 = match f.oauth2 {
        Some(table) => OAuth2Config::parse(table, &mut ctx.nested("oauth2")),
        None => None,
    };
    if has_oauth2 {
        if password.is_some() || oauth2_token.is_some() {
            ctx.problem(
                "oauth2",
                "give either an `oauth2` account or `password`/`oauth2_token_env`, not both",
            );
        }
        if f.username.as_deref().is_none_or(|u| u.trim().is_empty()) {
            ctx.problem(
                "username",
                "an `oauth2` account needs `username` (the account's email address)",
            );
        }
    }
    let ca_file = ctx.existing_file("ca_file", f.ca_file);
    if tls == TlsMode::None && (password.is_some() || oauth2_token.is_some() || oauth2.is_some()) {
        ctx.warning(
            "tls",
            "credentials will be sent without TLS; only do this for a relay on a trusted network",
        );
    }
    Some(Arc::new(SmtpProvider {
        host,
        port,
        tls,
        username: f.username,
        password,
        oauth2_token,
        oauth2,
        ca_file,
    }))
}

impl ProviderConfig for SmtpProvider {
    fn kind(&self) -> &'static str {
        "smtp"
    }

    fn fingerprint(&self, h: &mut Fingerprint) {
        h.add(&self.host)
            .add(&self.port)
            .add(&self.tls.as_str())
            .add(&self.username)
            .add(&self.ca_file)
            .secret(self.password.as_ref())
            .secret(self.oauth2_token.as_ref());
        if let Some(o) = &self.oauth2 {
            o.fingerprint(h);
        }
    }

    fn mirror(&self) -> Mirror {
        Mirror {
            host: Some(self.host.clone()),
            port: Some(self.port),
            tls: Some(self.tls.as_str()),
            username: self.username.clone(),
        }
    }

    fn transport(&self, ctx: &TransportContext) -> Result<Box<dyn Transport>, SendError> {
        Ok(Box::new(SmtpPool::new(self, ctx)?))
    }
}

/// The sessions of one SMTP provider.
pub struct SmtpPool {
    config: SmtpConfig,
    /// An OAuth2 account's user and credential: every session authenticates with XOAUTH2
    /// with its current access token.
    oauth2: Option<(String, Credential)>,
    endpoint: String,
    idle: Mutex<Vec<(SmtpSession, Instant)>>,
    slots: Semaphore,
    send_timeout: Duration,
    /// True once the shutdown grace is over: nothing new starts, and transactions not past
    /// their final dot are abandoned.
    abort: (watch::Sender<bool>, watch::Receiver<bool>),
}

impl SmtpPool {
    fn new(p: &SmtpProvider, ctx: &TransportContext) -> Result<Self, SendError> {
        let tls_config = match p.tls {
            TlsMode::None => None,
            _ => Some(
                tls_client_config(p.ca_file.as_deref())
                    .map_err(|e| SendError::Config(format!("TLS setup: {e}")))?,
            ),
        };
        let auth = match (&p.username, &p.password, &p.oauth2_token) {
            (Some(u), _, Some(token)) => Some(Credentials::OAuth2 {
                user: u.clone(),
                token: token.expose().to_string(),
            }),
            (Some(u), Some(pw), None) => Some(Credentials::Password {
                user: u.clone(),
                password: pw.expose().to_string(),
            }),
            _ => None,
        };
        let oauth2 = match (&p.oauth2, &p.username) {
            (Some(o), Some(user)) => Some((
                user.clone(),
                Credential::OAuth2(ctx.accounts.for_provider(&ctx.provider_id, o)),
            )),
            _ => None,
        };
        Ok(Self {
            oauth2,
            endpoint: format!("{}:{}", p.host, p.port),
            config: SmtpConfig {
                host: p.host.clone(),
                port: p.port,
                tls: p.tls,
                tls_config,
                auth,
                hello: crate::smtp::hello_name(),
            },
            idle: Mutex::new(Vec::new()),
            slots: Semaphore::new(ctx.max_connections as usize),
            send_timeout: ctx.send_timeout,
            abort: watch::channel(false),
        })
    }

    async fn open(&self) -> Result<SmtpSession, SendError> {
        let Some((user, credential)) = &self.oauth2 else {
            return self.connect(&self.config).await;
        };
        // A refused access token (expired early, revoked) is renewed once; only a refusal of
        // the fresh one counts.
        let mut renewed = false;
        loop {
            let token = credential.token().await?;
            let mut config = self.config.clone();
            config.auth = Some(Credentials::OAuth2 {
                user: user.clone(),
                token: token.expose().to_string(),
            });
            match self.connect(&config).await {
                Err(SendError::Rejected { during: "AUTH", .. })
                    if !renewed && credential.renews() =>
                {
                    tracing::info!(endpoint = %self.endpoint, "XOAUTH2 refused; renewing the access token once");
                    credential.refused(&token);
                    renewed = true;
                }
                other => return other,
            }
        }
    }

    async fn connect(&self, config: &SmtpConfig) -> Result<SmtpSession, SendError> {
        tokio::time::timeout(CONNECT_TIMEOUT, SmtpSession::connect(config))
            .await
            .map_err(|_| SendError::Timeout {
                endpoint: self.endpoint.clone(),
                timeout: CONNECT_TIMEOUT,
                during: "connecting",
            })?
            .map_err(|e| from_smtp(&self.endpoint, e))
    }

    fn take_idle(&self) -> Option<SmtpSession> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some((session, since)) = idle.pop() {
            if since.elapsed() < IDLE_MAX && !session.is_broken() {
                return Some(session);
            }
        }
        None
    }

    fn put_idle(&self, session: SmtpSession) {
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((session, Instant::now()));
    }

    /// Sends one email on a pooled session; returns the server's reply lines.
    async fn send_email(&self, email: &OutgoingEmail) -> Result<Vec<String>, SendError> {
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| SendError::Unavailable)?;
        let aborted = &self.abort.1;
        // A reused session may have been closed by the server meanwhile: one retry on a fresh
        // one — only when the failure is not the server's answer to this email, and never
        // once the final dot has been written (the server may have accepted the email; that
        // case goes through the retry schedule as `Uncertain`).
        let mut reused = self.take_idle();
        loop {
            if *aborted.borrow() {
                return Err(SendError::ShuttingDown);
            }
            let was_reused = reused.is_some();
            let mut session = match reused.take() {
                Some(s) => s,
                None => self.open().await?,
            };
            let envelope = &email.envelope;
            let result = tokio::time::timeout(
                self.send_timeout,
                session.send(envelope.from(), envelope.to(), &email.bytes, aborted),
            )
            .await;
            let failure = match result {
                Ok(Ok(reply)) => {
                    self.put_idle(session);
                    return Ok(reply.lines);
                }
                Ok(Err(e)) => from_smtp(&self.endpoint, e),
                Err(_) => SendError::Timeout {
                    endpoint: self.endpoint.clone(),
                    timeout: self.send_timeout,
                    during: "sending",
                },
            };
            if session.outcome_unknown() {
                return Err(SendError::Uncertain {
                    endpoint: self.endpoint.clone(),
                    detail: failure.to_string(),
                });
            }
            let answered = matches!(
                failure,
                SendError::Rejected { .. }
                    | SendError::Unsupported { .. }
                    | SendError::ShuttingDown
            );
            if was_reused && !answered {
                continue;
            }
            if matches!(failure, SendError::Unsupported { .. }) {
                // Nothing was sent: the session is as good as before.
                self.put_idle(session);
            }
            return Err(failure);
        }
    }
}

impl Transport for SmtpPool {
    fn send<'a>(&'a self, email: &'a Arc<OutgoingEmail>) -> SendFuture<'a> {
        Box::pin(async move {
            let reply = self.send_email(email).await?;
            Ok(Accepted {
                provider_message_id: queue_id_from_reply(&reply)
                    .unwrap_or_else(|| email.rfc_message_id.clone()),
                sent_at: OffsetDateTime::now_utc(),
            })
        })
    }

    fn abort(&self) {
        let _ = self.abort.0.send(true);
    }
}

/// An SMTP client error as a send outcome.
fn from_smtp(endpoint: &str, e: SmtpError) -> SendError {
    let endpoint = endpoint.to_string();
    match e {
        SmtpError::Rejected { during, reply } => SendError::Rejected {
            endpoint,
            during,
            code: reply.code,
            reply: reply.text(),
        },
        SmtpError::Connect(e) => SendError::Connect {
            endpoint,
            detail: e.to_string(),
        },
        SmtpError::Tls(e) => match find_source::<rustls::Error>(&e) {
            Some(rustls::Error::InvalidCertificate(c)) => SendError::Certificate {
                endpoint,
                detail: format!("{c:?}"),
            },
            _ => SendError::Tls {
                endpoint,
                detail: crate::domain::error_chain(&e),
            },
        },
        SmtpError::NoStarttls => SendError::NoStarttls { endpoint },
        SmtpError::Unsupported(what) => SendError::Unsupported { endpoint, what },
        SmtpError::Aborted => SendError::ShuttingDown,
        SmtpError::NoAuthMechanism { .. } => SendError::Config(e.to_string()),
        SmtpError::Io(_) | SmtpError::Protocol(_) => SendError::Protocol {
            endpoint,
            detail: crate::domain::error_chain(&e),
        },
    }
}
