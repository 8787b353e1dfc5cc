//! A sender actor: one per provider, delivering emails through that provider.
//!
//! SMTP providers get a pool of sessions of the service's own SMTP client (`crate::smtp`): up
//! to `max_connections` sessions, each on a TCP_NODELAY socket, kept open and reused between
//! emails, dropped after any error, and pipelined (MAIL, RCPT, DATA in one write) where the
//! server offers PIPELINING. Every transaction is bounded by `[outbound] send_timeout`,
//! connecting (with TLS and AUTH) by `CONNECT_TIMEOUT`.
//!
//! `file` providers write each email as an `.eml` file (development, the shipped example).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use lettre::address::Envelope;
use time::OffsetDateTime;
use tokio::sync::{oneshot, Semaphore};

use crate::actors::metrics::{MetricsActor, Observe, ReportHealth};
use crate::actors::supervisor::{Abort, Drain};
use crate::domain::{ComponentHealth, ComponentId};
use crate::mailproto::tls_client_config;
use crate::outbound::{queue_id_from_reply, FailureClass, OutgoingEmail};
use crate::settings::{Provider, ProviderTransport, TlsMode};
use crate::smtp::{Credentials, SmtpConfig, SmtpError, SmtpSession};

/// An idle session is not reused after this long (servers drop idle clients).
const IDLE_MAX: Duration = Duration::from_secs(20);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

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
            SendError::NoStarttls { .. }
            | SendError::Certificate { .. }
            | SendError::Config(_)
            | SendError::Unsupported { .. } => FailureClass::Permanent,
            _ => FailureClass::Transient,
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
            _ => None,
        }
    }

    fn from_smtp(endpoint: &str, e: SmtpError) -> Self {
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
}

/// The first error of type `T` in `e`'s source chain.
fn find_source<'a, T: std::error::Error + 'static>(
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

/// What the provider said when it took the email.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub provider_message_id: String,
    pub sent_at: OffsetDateTime,
}

/// The sessions of one SMTP provider.
pub struct SmtpPool {
    config: SmtpConfig,
    endpoint: String,
    idle: Mutex<Vec<(SmtpSession, Instant)>>,
    slots: Semaphore,
    send_timeout: Duration,
    /// True once the shutdown grace is over ([`Abort`]): nothing new starts, and
    /// transactions not past their final dot are abandoned.
    abort: tokio::sync::watch::Receiver<bool>,
}

impl SmtpPool {
    fn new(
        provider: &Provider,
        send_timeout: Duration,
        abort: tokio::sync::watch::Receiver<bool>,
    ) -> Result<Self, SendError> {
        let ProviderTransport::Smtp {
            host,
            port,
            tls,
            username,
            password,
            oauth2_token,
            ca_file,
        } = &provider.transport
        else {
            return Err(SendError::Config("not an SMTP provider".into()));
        };
        let tls_config = match tls {
            TlsMode::None => None,
            _ => Some(
                tls_client_config(ca_file.as_deref())
                    .map_err(|e| SendError::Config(format!("TLS setup: {e}")))?,
            ),
        };
        let auth = match (username, password, oauth2_token) {
            (Some(u), _, Some(token)) => Some(Credentials::OAuth2 {
                user: u.clone(),
                token: token.expose().to_string(),
            }),
            (Some(u), Some(p), None) => Some(Credentials::Password {
                user: u.clone(),
                password: p.expose().to_string(),
            }),
            _ => None,
        };
        Ok(Self {
            endpoint: format!("{host}:{port}"),
            config: SmtpConfig {
                host: host.clone(),
                port: *port,
                tls: *tls,
                tls_config,
                auth,
                hello: crate::smtp::hello_name(),
            },
            idle: Mutex::new(Vec::new()),
            slots: Semaphore::new(provider.max_connections as usize),
            send_timeout,
            abort,
        })
    }

    async fn open(&self) -> Result<SmtpSession, SendError> {
        tokio::time::timeout(CONNECT_TIMEOUT, SmtpSession::connect(&self.config))
            .await
            .map_err(|_| SendError::Timeout {
                endpoint: self.endpoint.clone(),
                timeout: CONNECT_TIMEOUT,
                during: "connecting",
            })?
            .map_err(|e| SendError::from_smtp(&self.endpoint, e))
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
    pub async fn send(&self, envelope: &Envelope, bytes: &[u8]) -> Result<Vec<String>, SendError> {
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| SendError::Unavailable)?;
        // A reused session may have been closed by the server meanwhile: one retry on a fresh
        // one — only when the failure is not the server's answer to this email, and never
        // once the final dot has been written (the server may have accepted the email; that
        // case goes through the retry schedule as `Uncertain`).
        let mut reused = self.take_idle();
        loop {
            if *self.abort.borrow() {
                return Err(SendError::ShuttingDown);
            }
            let was_reused = reused.is_some();
            let mut session = match reused.take() {
                Some(s) => s,
                None => self.open().await?,
            };
            let result = tokio::time::timeout(
                self.send_timeout,
                session.send(envelope.from(), envelope.to(), bytes, &self.abort),
            )
            .await;
            let failure = match result {
                Ok(Ok(reply)) => {
                    self.put_idle(session);
                    return Ok(reply.lines);
                }
                Ok(Err(e)) => SendError::from_smtp(&self.endpoint, e),
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

enum Transport {
    Smtp(Box<SmtpPool>),
    File(PathBuf),
    /// The provider could not be set up; every send fails with this.
    Broken(SendError),
}

pub struct SenderActor {
    provider: Provider,
    transport: Arc<Transport>,
    abort: tokio::sync::watch::Sender<bool>,
    metrics: Addr<MetricsActor>,
    last_ok: Option<bool>,
    in_flight: usize,
    draining: Vec<oneshot::Sender<()>>,
}

impl SenderActor {
    pub fn new(provider: Provider, send_timeout: Duration, metrics: Addr<MetricsActor>) -> Self {
        let (abort, aborted) = tokio::sync::watch::channel(false);
        let transport = match &provider.transport {
            ProviderTransport::File { dir } => Transport::File(dir.clone()),
            ProviderTransport::Smtp { .. } => {
                match SmtpPool::new(&provider, send_timeout, aborted) {
                    Ok(p) => Transport::Smtp(Box::new(p)),
                    Err(e) => Transport::Broken(e),
                }
            }
        };
        Self {
            provider,
            transport: Arc::new(transport),
            abort,
            metrics,
            last_ok: None,
            in_flight: 0,
            draining: Vec::new(),
        }
    }

    fn report(&mut self, ok: bool, error: Option<String>) {
        if self.last_ok == Some(ok) {
            return;
        }
        self.last_ok = Some(ok);
        let health = match error {
            Some(e) if !ok => ComponentHealth::down(e),
            _ => ComponentHealth::ok(),
        };
        self.metrics.do_send(ReportHealth {
            id: ComponentId::Provider(self.provider.id.clone()),
            health: health
                .with("tenant", self.provider.tenant_id.clone())
                .with("name", self.provider.name.clone()),
        });
    }
}

impl Actor for SenderActor {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Context<Self>) {
        if let Transport::Broken(e) = self.transport.as_ref() {
            let e = e.to_string();
            self.report(false, Some(e));
        }
    }
}

/// Deliver one email through this provider.
#[derive(Message)]
#[rtype(result = "Result<Accepted, SendError>")]
pub struct Deliver {
    pub email: Arc<OutgoingEmail>,
    pub tenant_id: String,
}

impl Handler<Deliver> for SenderActor {
    type Result = ResponseActFuture<Self, Result<Accepted, SendError>>;

    fn handle(&mut self, msg: Deliver, _: &mut Context<Self>) -> Self::Result {
        self.in_flight += 1;
        let transport = self.transport.clone();
        let metrics = self.metrics.clone();
        let labels = vec![
            ("tenant", msg.tenant_id.clone()),
            ("provider", self.provider.id.clone()),
        ];
        Box::pin(
            async move {
                let started = Instant::now();
                let email = msg.email;
                let result = match transport.as_ref() {
                    Transport::Smtp(pool) => {
                        pool.send(&email.envelope, &email.bytes)
                            .await
                            .map(|reply| Accepted {
                                provider_message_id: queue_id_from_reply(&reply)
                                    .unwrap_or_else(|| email.rfc_message_id.clone()),
                                sent_at: OffsetDateTime::now_utc(),
                            })
                    }
                    Transport::File(dir) => write_eml(dir, &email).await.map(|_| Accepted {
                        provider_message_id: email.rfc_message_id.clone(),
                        sent_at: OffsetDateTime::now_utc(),
                    }),
                    Transport::Broken(e) => Err(e.clone()),
                };
                metrics.do_send(Observe {
                    name: "mailbridge_send_duration_seconds",
                    labels,
                    value: started.elapsed().as_secs_f64(),
                });
                result
            }
            .into_actor(self)
            .map(|result, act, ctx| {
                act.in_flight -= 1;
                match &result {
                    Ok(_) => act.report(true, None),
                    // A rejected email says nothing about the provider's health.
                    Err(SendError::Rejected { .. } | SendError::ShuttingDown) => {}
                    Err(e) => act.report(false, Some(e.to_string())),
                }
                if act.in_flight == 0 && !act.draining.is_empty() {
                    for d in act.draining.drain(..) {
                        let _ = d.send(());
                    }
                    ctx.stop();
                }
                result
            }),
        )
    }
}

impl Handler<Abort> for SenderActor {
    type Result = ();

    /// The shutdown grace is over: no transaction starts any more; those not past their final
    /// dot are abandoned (their requests go back to the broker), those past it run to their
    /// reply, so what the server accepted is recorded before the process exits.
    fn handle(&mut self, _: Abort, _: &mut Context<Self>) {
        tracing::info!(provider = %self.provider.id, "abandoning the transactions not yet sent");
        let _ = self.abort.send(true);
    }
}

impl Handler<Drain> for SenderActor {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: Drain, ctx: &mut Context<Self>) -> Self::Result {
        if self.in_flight == 0 {
            ctx.stop();
            return Box::pin(async {});
        }
        let (tx, rx) = oneshot::channel();
        self.draining.push(tx);
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}

async fn write_eml(dir: &std::path::Path, email: &OutgoingEmail) -> Result<(), SendError> {
    let name: String = email
        .rfc_message_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.@".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| SendError::File(format!("{}: {e}", dir.display())))?;
    let tmp = dir.join(format!(".{name}.tmp"));
    let path = dir.join(format!("{name}.eml"));
    tokio::fs::write(&tmp, &email.bytes)
        .await
        .map_err(|e| SendError::File(format!("{}: {e}", tmp.display())))?;
    tokio::fs::rename(&tmp, &path)
        .await
        .map_err(|e| SendError::File(format!("{}: {e}", path.display())))
}
