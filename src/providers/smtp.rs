//! `kind = "smtp"`: a pool of sessions of the service's own SMTP client (`crate::smtp`): up
//! to `max_connections` sessions, each on a TCP_NODELAY socket, kept open and reused between
//! emails, dropped after any error, and pipelined (MAIL, RCPT, DATA in one write) where the
//! server offers PIPELINING. Every transaction is bounded by `[outbound] send_timeout`,
//! connecting (with TLS and AUTH) by `CONNECT_TIMEOUT`.
//!
//! A send holds one of the `max_connections` places (a [`Slot`]) from its turn to its reply;
//! sends beyond them wait in line. A send that finishes passes its place, with its session,
//! straight to the first in line. Where the server offers PIPELINING, a send about to write
//! its message takes the first in line along: that email's envelope goes out in the same
//! write as the message's final dot, and the session goes to it with the envelope's replies
//! still to be read — one write and one round trip per email while a line is waiting.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Deserialize;
use time::OffsetDateTime;
use tokio::sync::{oneshot, watch};

use super::{
    find_source, Accepted, Fingerprint, Mirror, ParseContext, ProviderConfig, SendError,
    SendFuture, Transport, TransportContext,
};
use crate::credentials::Credential;
use crate::mailproto::tls_client_config;
use crate::oauth2::OAuth2Config;
use crate::outbound::{queue_id_from_reply, OutgoingEmail};
use crate::settings::{Secret, TlsMode};
use crate::smtp::{Credentials, Envelope, Reply, SmtpConfig, SmtpError, SmtpSession};

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
    shared: Arc<Shared>,
    send_timeout: Duration,
    /// True once the shutdown grace is over: nothing new starts, and transactions not past
    /// their final dot are abandoned.
    abort: (watch::Sender<bool>, watch::Receiver<bool>),
}

/// The pool's places and the sends waiting for one.
struct Shared {
    max: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Places held (by sends, or on their way from one to the next). Below `max` only when
    /// nobody waits (but sends no longer waiting, skipped when their turn comes).
    busy: usize,
    idle: Vec<(SmtpSession, Instant)>,
    waiting: VecDeque<Waiter>,
}

/// A send waiting for its turn.
struct Waiter {
    email: Arc<OutgoingEmail>,
    turn: oneshot::Sender<Turn>,
}

/// A send's turn: its place, and the session handed to it (if any), on which its envelope may
/// already have been written ([`SmtpSession::has_joined`]).
struct Turn {
    slot: Slot,
    session: Option<SmtpSession>,
}

/// One of the pool's places. Dropped while held (a send abandoned by its caller, a failure),
/// it goes to the next in line, or back to the pool.
struct Slot(Option<Arc<Shared>>);

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(shared) = self.0.take() {
            pass_on(Slot(Some(shared)), None, None);
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Hands a place, with its session, to `joined` (the send whose envelope was written on that
/// session), else to the first in line, else back to the pool (the session to the idle ones).
/// A session that cannot be reused is dropped; a send that is no longer waiting is skipped.
fn pass_on(mut slot: Slot, session: Option<SmtpSession>, joined: Option<Waiter>) {
    let Some(shared) = slot.0.take() else {
        return;
    };
    let mut session = session.filter(|s| !s.is_broken());
    let mut next = joined;
    loop {
        let waiter = match next.take() {
            Some(w) => w,
            None => {
                // A joined envelope belongs to its own send: the session goes to nobody else.
                session = session.filter(|s| !s.has_joined());
                let mut state = shared.lock();
                match state.waiting.pop_front() {
                    Some(w) => w,
                    None => {
                        if let Some(s) = session.take() {
                            state.idle.push((s, Instant::now()));
                        }
                        state.busy = state.busy.saturating_sub(1);
                        return;
                    }
                }
            }
        };
        let turn = Turn {
            slot: Slot(Some(shared.clone())),
            session: session.take(),
        };
        match waiter.turn.send(turn) {
            Ok(()) => return,
            Err(mut turn) => {
                turn.slot.0 = None;
                session = turn.session.take();
            }
        }
    }
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
            shared: Arc::new(Shared {
                max: (ctx.max_connections as usize).max(1),
                state: Mutex::new(State::default()),
            }),
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
        let mut state = self.shared.lock();
        while let Some((session, since)) = state.idle.pop() {
            if since.elapsed() < IDLE_MAX && !session.is_broken() {
                return Some(session);
            }
        }
        None
    }

    /// This send's turn: a free place at once, else its place in line.
    async fn turn(&self, email: &Arc<OutgoingEmail>) -> Turn {
        loop {
            let turn = {
                let mut state = self.shared.lock();
                if state.busy < self.shared.max {
                    state.busy += 1;
                    drop(state);
                    return Turn {
                        slot: Slot(Some(self.shared.clone())),
                        session: None,
                    };
                }
                let (tx, rx) = oneshot::channel();
                state.waiting.push_back(Waiter {
                    email: email.clone(),
                    turn: tx,
                });
                rx
            };
            if let Ok(turn) = turn.await {
                return turn;
            }
            // The send that took this one along ended without handing it the session (it
            // was abandoned by its caller): in line again, at its end.
        }
    }

    /// The first in line, with its envelope for `session`, to be joined to the message about
    /// to be written — where the server offers PIPELINING and that email can go there.
    fn join_next(&self, session: &SmtpSession) -> Option<(Waiter, Envelope)> {
        if !session.pipelining() {
            return None;
        }
        let mut state = self.shared.lock();
        while let Some(first) = state.waiting.front() {
            if first.turn.is_closed() {
                state.waiting.pop_front();
                continue;
            }
            let envelope = &first.email.envelope;
            let envelope = session
                .envelope(envelope.from(), envelope.to(), &first.email.bytes)
                .ok()?;
            return state.waiting.pop_front().map(|w| (w, envelope));
        }
        None
    }

    /// A send taken along whose session failed: on a free place at once, else at the head of
    /// the line (this send holds a place, which it passes on when it ends).
    fn put_back(&self, waiter: Waiter) {
        let mut state = self.shared.lock();
        if state.busy < self.shared.max {
            state.busy += 1;
            drop(state);
            // A send no longer waiting hands the place on (its Slot is dropped, unlocked).
            let _ = waiter.turn.send(Turn {
                slot: Slot(Some(self.shared.clone())),
                session: None,
            });
        } else {
            state.waiting.push_front(waiter);
        }
    }

    /// One transaction on `session`; `joined` receives the send taken along, if any.
    async fn transaction(
        &self,
        session: &mut SmtpSession,
        email: &OutgoingEmail,
        joined: &mut Option<Waiter>,
    ) -> Result<Reply, SmtpError> {
        let envelope = &email.envelope;
        session
            .begin(envelope.from(), envelope.to(), &email.bytes, &self.abort.1)
            .await?;
        let next = self.join_next(session).map(|(waiter, envelope)| {
            *joined = Some(waiter);
            envelope
        });
        session.finish(&email.bytes, next).await
    }

    /// Sends one email on a pooled session; returns the server's reply lines.
    async fn send_email(&self, email: &Arc<OutgoingEmail>) -> Result<Vec<String>, SendError> {
        let Turn { slot, session } = self.turn(email).await;
        let aborted = &self.abort.1;
        // A reused session may have been closed by the server meanwhile: one retry on a fresh
        // one — only when the failure is not the server's answer to this email, and never
        // once the final dot has been written (the server may have accepted the email; that
        // case goes through the retry schedule as `Uncertain`).
        let mut reused = session.or_else(|| self.take_idle());
        loop {
            if *aborted.borrow() {
                return Err(SendError::ShuttingDown);
            }
            let was_reused = reused.is_some();
            let mut session = match reused.take() {
                Some(s) => s,
                None => self.open().await?,
            };
            let mut joined = None;
            let result = tokio::time::timeout(
                self.send_timeout,
                self.transaction(&mut session, email, &mut joined),
            )
            .await;
            let failure = match result {
                Ok(Ok(reply)) => {
                    pass_on(slot, Some(session), joined);
                    return Ok(reply.lines);
                }
                Ok(Err(e)) => from_smtp(&self.endpoint, e),
                Err(_) => SendError::Timeout {
                    endpoint: self.endpoint.clone(),
                    timeout: self.send_timeout,
                    during: "sending",
                },
            };
            // The session is not used again, and what was joined to it with it: the send
            // taken along starts over on another session.
            if let Some(waiter) = joined {
                self.put_back(waiter);
            }
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
                pass_on(slot, Some(session), None);
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
