//! A sender actor: one per provider, delivering emails through that provider.
//!
//! SMTP providers get a connection pool of their own making (`SmtpPool`): up to
//! `max_connections` sessions, each opened on our own `TcpStream` with TCP_NODELAY (lettre
//! never sets it, which caps a session at ~23 emails/s against an MTA with delayed ACKs), kept
//! open and reused between emails, and dropped after any error. Every transaction is bounded
//! by `[outbound] send_timeout` (lettre's own timeout covers connecting only). Implicit TLS
//! (`tls = "tls"`) uses lettre's connector, which does not set TCP_NODELAY.
//!
//! `file` providers write each email as an `.eml` file (development, the shipped example).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use lettre::address::Envelope;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, Certificate, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use time::OffsetDateTime;
use tokio::sync::{oneshot, Semaphore};

use crate::actors::metrics::{MetricsActor, Observe, ReportHealth};
use crate::actors::supervisor::Drain;
use crate::domain::{ComponentHealth, ComponentId};
use crate::outbound::{queue_id_from_reply, FailureClass, OutgoingEmail};
use crate::settings::{Provider, ProviderTransport, TlsMode};

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
    #[error("{endpoint} replied {code}: {reply}")]
    Rejected {
        endpoint: String,
        code: u16,
        reply: String,
    },
    #[error("SMTP session with {endpoint} broke: {detail}")]
    Protocol { endpoint: String, detail: String },
    #[error("provider is misconfigured: {0}")]
    Config(String),
    #[error("cannot write the email file: {0}")]
    File(String),
    #[error("the sender for this provider is not running")]
    Unavailable,
}

impl SendError {
    /// 5xx replies, a missing STARTTLS and configuration errors fail again the same way;
    /// everything else (4xx, network, timeouts, TLS interrupted) may succeed later.
    pub fn class(&self) -> FailureClass {
        match self {
            SendError::Rejected { code, .. } if *code >= 500 => FailureClass::Permanent,
            SendError::NoStarttls { .. } | SendError::Certificate { .. } | SendError::Config(_) => {
                FailureClass::Permanent
            }
            _ => FailureClass::Transient,
        }
    }

    /// The server's reply, when the failure was one.
    pub fn last_reply(&self) -> Option<String> {
        match self {
            SendError::Rejected { code, reply, .. } => Some(format!("{code} {reply}")),
            _ => None,
        }
    }

    fn from_smtp(endpoint: &str, e: lettre::transport::smtp::Error) -> Self {
        let endpoint = endpoint.to_string();
        if let Some(code) = e.status() {
            let reply = e.to_string();
            // lettre prefixes "permanent error (550): " etc.; keep the server's words.
            let reply = reply
                .split_once("): ")
                .map(|(_, r)| r.to_string())
                .unwrap_or(reply);
            return SendError::Rejected {
                endpoint,
                code: u16::from(code),
                reply,
            };
        }
        if let Some(rustls::Error::InvalidCertificate(c)) = find_source::<rustls::Error>(&e) {
            return SendError::Certificate {
                endpoint,
                detail: format!("{c:?}"),
            };
        }
        if e.is_tls() {
            return SendError::Tls {
                endpoint,
                detail: e.to_string(),
            };
        }
        if e.is_timeout() {
            return SendError::Timeout {
                endpoint,
                timeout: CONNECT_TIMEOUT,
                during: "SMTP exchange",
            };
        }
        SendError::Protocol {
            endpoint,
            detail: error_chain(&e),
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

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let t = inner.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        source = inner.source();
    }
    s
}

/// What the provider said when it took the email.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub provider_message_id: String,
    pub sent_at: OffsetDateTime,
}

struct SmtpTarget {
    host: String,
    port: u16,
    tls: TlsMode,
    tls_parameters: Option<TlsParameters>,
    credentials: Option<(Credentials, Vec<Mechanism>)>,
    hello: ClientId,
}

/// The sessions of one SMTP provider.
pub struct SmtpPool {
    target: SmtpTarget,
    endpoint: String,
    idle: Mutex<Vec<(AsyncSmtpConnection, Instant)>>,
    slots: Semaphore,
    send_timeout: Duration,
}

impl SmtpPool {
    fn new(provider: &Provider, send_timeout: Duration) -> Result<Self, SendError> {
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
        let tls_parameters = match tls {
            TlsMode::None => None,
            _ => {
                let mut b = TlsParameters::builder(host.clone());
                if let Some(path) = ca_file {
                    let pem = std::fs::read(path).map_err(|e| {
                        SendError::Config(format!("cannot read ca_file {}: {e}", path.display()))
                    })?;
                    let cert = Certificate::from_pem(&pem).map_err(|e| {
                        SendError::Config(format!(
                            "ca_file {} is not a PEM certificate: {e}",
                            path.display()
                        ))
                    })?;
                    b = b.add_root_certificate(cert);
                }
                Some(
                    b.build()
                        .map_err(|e| SendError::Config(format!("TLS setup: {e}")))?,
                )
            }
        };
        let credentials = match (username, password, oauth2_token) {
            (Some(u), _, Some(token)) => Some((
                Credentials::new(u.clone(), token.expose().to_string()),
                vec![Mechanism::Xoauth2],
            )),
            (Some(u), Some(p), None) => Some((
                Credentials::new(u.clone(), p.expose().to_string()),
                vec![Mechanism::Plain, Mechanism::Login],
            )),
            _ => None,
        };
        Ok(Self {
            endpoint: format!("{host}:{port}"),
            target: SmtpTarget {
                host: host.clone(),
                port: *port,
                tls: *tls,
                tls_parameters,
                credentials,
                hello: ClientId::default(),
            },
            idle: Mutex::new(Vec::new()),
            slots: Semaphore::new(provider.max_connections as usize),
            send_timeout,
        })
    }

    async fn open(&self) -> Result<AsyncSmtpConnection, SendError> {
        let t = &self.target;
        let endpoint = self.endpoint.as_str();
        let connect = async {
            let mut conn = if t.tls == TlsMode::Tls {
                AsyncSmtpConnection::connect_tokio1(
                    (t.host.as_str(), t.port),
                    Some(CONNECT_TIMEOUT),
                    &t.hello,
                    t.tls_parameters.clone(),
                    None,
                )
                .await
                .map_err(|e| SendError::from_smtp(endpoint, e))?
            } else {
                let tcp = tokio::net::TcpStream::connect((t.host.as_str(), t.port))
                    .await
                    .map_err(|e| SendError::Connect {
                        endpoint: endpoint.to_string(),
                        detail: e.to_string(),
                    })?;
                let _ = tcp.set_nodelay(true);
                let mut conn = AsyncSmtpConnection::connect_with_transport(Box::new(tcp), &t.hello)
                    .await
                    .map_err(|e| SendError::from_smtp(endpoint, e))?;
                if t.tls == TlsMode::Starttls {
                    if !conn.can_starttls() {
                        return Err(SendError::NoStarttls {
                            endpoint: endpoint.to_string(),
                        });
                    }
                    let params = t.tls_parameters.clone().ok_or_else(|| {
                        SendError::Config("STARTTLS without TLS parameters".into())
                    })?;
                    conn.starttls(params, &t.hello)
                        .await
                        .map_err(|e| SendError::from_smtp(endpoint, e))?;
                }
                conn
            };
            if let Some((creds, mechanisms)) = &t.credentials {
                conn.auth(mechanisms, creds)
                    .await
                    .map_err(|e| SendError::from_smtp(endpoint, e))?;
            }
            Ok(conn)
        };
        tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| SendError::Timeout {
                endpoint: endpoint.to_string(),
                timeout: CONNECT_TIMEOUT,
                during: "connecting",
            })?
    }

    fn take_idle(&self) -> Option<AsyncSmtpConnection> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some((conn, since)) = idle.pop() {
            if since.elapsed() < IDLE_MAX && !conn.has_broken() {
                return Some(conn);
            }
        }
        None
    }

    fn put_idle(&self, conn: AsyncSmtpConnection) {
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((conn, Instant::now()));
    }

    /// Sends one email on a pooled session; returns the server's reply lines.
    pub async fn send(&self, envelope: &Envelope, bytes: &[u8]) -> Result<Vec<String>, SendError> {
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| SendError::Unavailable)?;
        // A reused session may have been closed by the server meanwhile: one retry on a fresh
        // one, only when the failure is not the server's answer to this email.
        let mut reused = self.take_idle();
        loop {
            let was_reused = reused.is_some();
            let mut conn = match reused.take() {
                Some(c) => c,
                None => self.open().await?,
            };
            let result = tokio::time::timeout(self.send_timeout, conn.send(envelope, bytes)).await;
            match result {
                Ok(Ok(response)) => {
                    self.put_idle(conn);
                    return Ok(response.message().map(str::to_string).collect());
                }
                Ok(Err(e)) => {
                    let err = SendError::from_smtp(&self.endpoint, e);
                    if was_reused && !matches!(err, SendError::Rejected { .. }) {
                        continue;
                    }
                    return Err(err);
                }
                Err(_) => {
                    return Err(SendError::Timeout {
                        endpoint: self.endpoint.clone(),
                        timeout: self.send_timeout,
                        during: "sending",
                    })
                }
            }
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
    metrics: Addr<MetricsActor>,
    last_ok: Option<bool>,
    in_flight: usize,
    draining: Vec<oneshot::Sender<()>>,
}

impl SenderActor {
    pub fn new(provider: Provider, send_timeout: Duration, metrics: Addr<MetricsActor>) -> Self {
        let transport = match &provider.transport {
            ProviderTransport::File { dir } => Transport::File(dir.clone()),
            ProviderTransport::Smtp { .. } => match SmtpPool::new(&provider, send_timeout) {
                Ok(p) => Transport::Smtp(Box::new(p)),
                Err(e) => Transport::Broken(e),
            },
        };
        Self {
            provider,
            transport: Arc::new(transport),
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
                    Err(SendError::Rejected { .. }) => {}
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
