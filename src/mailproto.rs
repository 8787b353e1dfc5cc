//! Mailbox connections: TCP or TLS streams (rustls, certificates verified against the system
//! roots plus an optional `ca_file`), IMAP sessions for async-imap, and a small POP3 client
//! (USER/PASS, STLS, UIDL, LIST, TOP, RETR, DELE) over tokio.
//!
//! Nothing a server sends can make a read wait for ever or allocate without bound: every
//! mailbox stream has a read-inactivity limit ([`ReadLimit`], 60 s unless its owner widens it
//! for IDLE), IMAP commands are bounded by [`imap_step`], POP3 lines are capped at
//! [`MAX_LINE`] and a POP3 message is read piece by piece ([`MultiLine`]), so its owner
//! decides where the bytes go and how many it keeps.

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::credentials::{Credential, CredentialError};
use crate::settings::{Mailbox, Secret, TlsMode};

/// How long one step of a mailbox conversation may take, and how long a read may go without
/// a byte arriving.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// The longest line accepted from a POP3 server (status lines, listings, and each line of a
/// message): a longer one is an error, never an unbounded allocation.
pub const MAX_LINE: usize = 1024 * 1024;

/// The largest UIDL or LIST answer accepted (about 20 bytes a message: a million messages).
const MAX_LISTING: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum MailboxError {
    #[error("cannot connect to {endpoint}: {source}")]
    Connect {
        endpoint: String,
        #[source]
        source: io::Error,
    },
    #[error("TLS with {endpoint} failed: {detail}")]
    Tls { endpoint: String, detail: String },
    /// The username is left out on purpose: this text is shown in `/health`.
    #[error("{endpoint} refused the login: {detail}; check the mailbox's username and password")]
    Login { endpoint: String, detail: String },
    #[error("{endpoint}: {detail}")]
    Protocol { endpoint: String, detail: String },
    #[error("{endpoint} did not answer {step} within {timeout:?}; the connection is dropped and opened again")]
    Timeout {
        endpoint: String,
        step: &'static str,
        timeout: Duration,
    },
    #[error("the connection to {endpoint} broke: {source}")]
    Io {
        endpoint: String,
        #[source]
        source: io::Error,
    },
    #[error("mailbox setup: {0}")]
    Config(String),
    /// No OAuth2 access token: permanent ([`CredentialError::Reauthorize`]) or for now.
    #[error(transparent)]
    Credential(#[from] CredentialError),
}

impl MailboxError {
    fn timeout(endpoint: &str, step: &'static str) -> Self {
        MailboxError::Timeout {
            endpoint: endpoint.to_string(),
            step,
            timeout: STEP_TIMEOUT,
        }
    }

    fn io(endpoint: &str, step: &'static str, source: io::Error) -> Self {
        if source.kind() == io::ErrorKind::TimedOut {
            Self::timeout(endpoint, step)
        } else {
            MailboxError::Io {
                endpoint: endpoint.to_string(),
                source,
            }
        }
    }
}

/// A plain or TLS stream, usable by async-imap and the POP3 client alike.
#[derive(Debug)]
pub enum MailStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for MailStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MailStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MailStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for MailStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MailStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MailStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MailStream::Plain(s) => Pin::new(s).poll_flush(cx),
            MailStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MailStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MailStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// How long a mailbox stream's reads may wait without a byte arriving (shared by the stream
/// and its owner, who widens it while the connection idles on purpose, as in IMAP IDLE).
#[derive(Debug, Clone)]
pub struct ReadLimit(Arc<AtomicU64>);

impl ReadLimit {
    fn new(limit: Duration) -> Self {
        ReadLimit(Arc::new(AtomicU64::new(millis(limit))))
    }

    pub fn set(&self, limit: Duration) {
        self.0.store(millis(limit), Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// A mailbox connection: a [`MailStream`] whose reads fail with `TimedOut` once nothing has
/// arrived for its [`ReadLimit`]. A hung server therefore ends in an error (shown in
/// `/health`, followed by a reconnect) instead of a fetcher waiting for ever.
pub struct WatchedStream {
    inner: MailStream,
    limit: ReadLimit,
    timer: Pin<Box<Sleep>>,
    /// The limit the timer was armed with; 0 while no read is waiting.
    armed: u64,
}

impl std::fmt::Debug for WatchedStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchedStream")
            .field("inner", &self.inner)
            .field("limit_ms", &self.limit.get())
            .finish()
    }
}

impl WatchedStream {
    fn new(inner: MailStream, limit: ReadLimit) -> Self {
        Self {
            inner,
            limit,
            timer: Box::pin(tokio::time::sleep_until(Instant::now())),
            armed: 0,
        }
    }

    pub fn read_limit(&self) -> ReadLimit {
        self.limit.clone()
    }
}

impl AsyncRead for WatchedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                this.armed = 0;
                Poll::Ready(r)
            }
            Poll::Pending => {
                let limit = this.limit.get();
                if this.armed != limit {
                    this.timer
                        .as_mut()
                        .reset(Instant::now() + Duration::from_millis(limit));
                    this.armed = limit;
                }
                match this.timer.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        this.armed = 0;
                        Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("nothing received for {}s", limit / 1000),
                        )))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl AsyncWrite for WatchedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

pub fn endpoint(m: &Mailbox) -> String {
    match &m.api {
        Some(api) => api.base_url.clone(),
        None => format!("{}:{}", m.host, m.port),
    }
}

/// The TLS client settings of mail connections (mailboxes and SMTP providers): certificates
/// verified against the system's roots plus those of `ca_file`.
pub fn tls_client_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let extra: Vec<CertificateDer<'static>> = match ca_file {
        Some(path) => CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("ca_file {} is not usable: {e}", path.display()))?,
        None => Vec::new(),
    };
    let verifier = rustls_platform_verifier::Verifier::new_with_extra_roots(extra, provider)
        .map_err(|e| format!("certificate verifier: {e}"))?;
    Ok(Arc::new(
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth(),
    ))
}

/// Wraps an open TCP stream in TLS for `host`.
pub async fn start_tls(tcp: TcpStream, m: &Mailbox) -> Result<MailStream, MailboxError> {
    let config = tls_client_config(m.ca_file.as_deref()).map_err(MailboxError::Config)?;
    let name = ServerName::try_from(m.host.clone()).map_err(|e| {
        MailboxError::Config(format!("`{}` is not a valid TLS server name: {e}", m.host))
    })?;
    let tls = tokio::time::timeout(
        STEP_TIMEOUT,
        tokio_rustls::TlsConnector::from(config).connect(name, tcp),
    )
    .await
    .map_err(|_| MailboxError::timeout(&endpoint(m), "the TLS handshake"))?
    .map_err(|e| MailboxError::Tls {
        endpoint: endpoint(m),
        detail: e.to_string(),
    })?;
    Ok(MailStream::Tls(Box::new(tls)))
}

/// TCP to the mailbox's server; TLS from the start when `tls = "tls"`. Reads wait at most
/// [`STEP_TIMEOUT`] for a byte until the owner says otherwise.
pub async fn connect(m: &Mailbox) -> Result<WatchedStream, MailboxError> {
    let tcp = tokio::time::timeout(STEP_TIMEOUT, TcpStream::connect((m.host.as_str(), m.port)))
        .await
        .map_err(|_| MailboxError::timeout(&endpoint(m), "the connection"))?
        .map_err(|source| MailboxError::Connect {
            endpoint: endpoint(m),
            source,
        })?;
    let _ = tcp.set_nodelay(true);
    let stream = match m.tls {
        TlsMode::Tls => start_tls(tcp, m).await?,
        _ => MailStream::Plain(tcp),
    };
    Ok(WatchedStream::new(stream, ReadLimit::new(STEP_TIMEOUT)))
}

/// STARTTLS/STLS: the same connection, now in TLS, keeping its read limit.
async fn upgrade(stream: WatchedStream, m: &Mailbox) -> Result<WatchedStream, MailboxError> {
    let WatchedStream { inner, limit, .. } = stream;
    let MailStream::Plain(tcp) = inner else {
        return Err(MailboxError::Protocol {
            endpoint: endpoint(m),
            detail: "STARTTLS on a TLS stream".into(),
        });
    };
    Ok(WatchedStream::new(start_tls(tcp, m).await?, limit))
}

pub type ImapSession = async_imap::Session<WatchedStream>;

/// Runs one IMAP step within [`STEP_TIMEOUT`]; failures name the step (`SELECT`, …).
pub async fn imap_step<T>(
    endpoint: &str,
    step: &'static str,
    fut: impl Future<Output = Result<T, async_imap::error::Error>>,
) -> Result<T, MailboxError> {
    imap_step_within(endpoint, step, STEP_TIMEOUT, fut).await
}

async fn imap_step_within<T>(
    endpoint: &str,
    step: &'static str,
    limit: Duration,
    fut: impl Future<Output = Result<T, async_imap::error::Error>>,
) -> Result<T, MailboxError> {
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| MailboxError::Timeout {
            endpoint: endpoint.to_string(),
            step,
            timeout: limit,
        })?
        .map_err(|e| imap_error(endpoint, step, e))
}

/// An async-imap error as a [`MailboxError`]: a read that timed out (the stream's
/// [`ReadLimit`]) is a timeout of `step`, other I/O a broken connection, the rest what the
/// server said.
pub fn imap_error(endpoint: &str, step: &'static str, e: async_imap::error::Error) -> MailboxError {
    match e {
        async_imap::error::Error::Io(source) => MailboxError::io(endpoint, step, source),
        other => MailboxError::Protocol {
            endpoint: endpoint.to_string(),
            detail: format!("{step} failed: {other}"),
        },
    }
}

/// An authenticated IMAP session (STARTTLS first when configured), and the read limit of its
/// connection.
pub async fn imap_login(
    m: &Mailbox,
    oauth2: Option<&Credential>,
) -> Result<(ImapSession, ReadLimit), MailboxError> {
    let ep = endpoint(m);
    let protocol = |detail: String| MailboxError::Protocol {
        endpoint: ep.clone(),
        detail,
    };
    let stream = connect(m).await?;
    let limit = stream.read_limit();
    let mut client = async_imap::Client::new(stream);
    let _greeting = tokio::time::timeout(STEP_TIMEOUT, client.read_response())
        .await
        .map_err(|_| MailboxError::timeout(&ep, "the greeting"))?
        .map_err(|e| protocol(format!("no greeting: {e}")))?;
    if m.tls == TlsMode::Starttls {
        imap_step(
            &ep,
            "STARTTLS",
            client.run_command_and_check_ok("STARTTLS", None),
        )
        .await?;
        client = async_imap::Client::new(upgrade(client.into_inner(), m).await?);
    }
    let login_error = |step: &'static str, e: async_imap::error::Error| match e {
        async_imap::error::Error::Io(source) => MailboxError::io(&ep, step, source),
        other => MailboxError::Login {
            endpoint: ep.clone(),
            detail: other.to_string(),
        },
    };
    let Some(credential) = oauth2 else {
        let password = m.password.as_ref().map(|p| p.expose()).unwrap_or("");
        let session = tokio::time::timeout(STEP_TIMEOUT, client.login(&m.username, password))
            .await
            .map_err(|_| MailboxError::timeout(&ep, "LOGIN"))?
            .map_err(|(e, _)| login_error("LOGIN", e))?;
        return Ok((session, limit));
    };
    // A refused access token is renewed once, on the same connection; only a refusal of the
    // fresh one counts.
    let mut renewed = false;
    loop {
        let token = credential.token().await?;
        let auth = XOAuth2 {
            response: Some(crate::oauth2::xoauth2(&m.username, &token)),
        };
        let step = "AUTHENTICATE XOAUTH2";
        match tokio::time::timeout(STEP_TIMEOUT, client.authenticate("XOAUTH2", auth))
            .await
            .map_err(|_| MailboxError::timeout(&ep, step))?
        {
            Ok(session) => return Ok((session, limit)),
            Err((async_imap::error::Error::No(_), back)) if !renewed && credential.renews() => {
                tracing::info!(endpoint = %ep, "XOAUTH2 refused; renewing the access token once");
                credential.refused(&token);
                renewed = true;
                client = back;
            }
            Err((e, _)) => return Err(login_error(step, e)),
        }
    }
}

/// The SASL XOAUTH2 exchange: the initial response to the server's first (empty) challenge;
/// an empty response to the error challenge a refusal brings (the server then says NO).
struct XOAuth2 {
    response: Option<Secret>,
}

impl async_imap::Authenticator for XOAuth2 {
    type Response = Vec<u8>;

    fn process(&mut self, _challenge: &[u8]) -> Vec<u8> {
        self.response
            .take()
            .map(|r| r.expose().as_bytes().to_vec())
            .unwrap_or_default()
    }
}

/// A POP3 session.
pub struct Pop3 {
    stream: BufReader<WatchedStream>,
    endpoint: String,
}

impl Pop3 {
    pub async fn login(m: &Mailbox) -> Result<Self, MailboxError> {
        let mut pop = Pop3 {
            stream: BufReader::with_capacity(64 * 1024, connect(m).await?),
            endpoint: endpoint(m),
        };
        pop.expect_ok().await?;
        if m.tls == TlsMode::Starttls {
            pop.command("STLS").await?;
            let stream = upgrade(pop.stream.into_inner(), m).await?;
            pop = Pop3 {
                stream: BufReader::with_capacity(64 * 1024, stream),
                endpoint: endpoint(m),
            };
        }
        pop.command(&format!("USER {}", m.username))
            .await
            .map_err(|e| pop.login_error(e))?;
        let password = m.password.as_ref().map(|p| p.expose()).unwrap_or("");
        pop.command(&format!("PASS {password}"))
            .await
            .map_err(|e| pop.login_error(e))?;
        Ok(pop)
    }

    fn login_error(&self, e: MailboxError) -> MailboxError {
        match e {
            MailboxError::Protocol { detail, .. } => MailboxError::Login {
                endpoint: self.endpoint.clone(),
                detail,
            },
            other => other,
        }
    }

    /// The buffered bytes, waiting at most [`STEP_TIMEOUT`]; an empty answer means the
    /// server hung up, which is an error here.
    async fn fill(&mut self, step: &'static str) -> Result<&[u8], MailboxError> {
        let endpoint = &self.endpoint;
        let buf = tokio::time::timeout(STEP_TIMEOUT, self.stream.fill_buf())
            .await
            .map_err(|_| MailboxError::timeout(endpoint, step))?
            .map_err(|source| MailboxError::io(endpoint, step, source))?;
        if buf.is_empty() {
            return Err(MailboxError::Io {
                endpoint: endpoint.clone(),
                source: io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed"),
            });
        }
        Ok(buf)
    }

    /// One status line, without its line ending; at most [`MAX_LINE`] bytes.
    async fn read_line(&mut self) -> Result<String, MailboxError> {
        let mut line = Vec::new();
        loop {
            let buf = self.fill("a reply").await?;
            let (take, done) = match memchr::memchr(b'\n', buf) {
                Some(p) => (p + 1, true),
                None => (buf.len(), false),
            };
            line.extend_from_slice(&buf[..take]);
            self.stream.consume(take);
            if line.len() > MAX_LINE {
                return Err(MailboxError::Protocol {
                    endpoint: self.endpoint.clone(),
                    detail: format!("sent a line longer than {MAX_LINE} bytes"),
                });
            }
            if done {
                break;
            }
        }
        Ok(String::from_utf8_lossy(&line)
            .trim_end_matches(['\r', '\n'])
            .to_string())
    }

    async fn expect_ok(&mut self) -> Result<String, MailboxError> {
        let line = self.read_line().await?;
        match line.strip_prefix("+OK") {
            Some(rest) => Ok(rest.trim().to_string()),
            None => Err(MailboxError::Protocol {
                endpoint: self.endpoint.clone(),
                detail: line,
            }),
        }
    }

    /// Sends a command; the password never appears in an error.
    async fn command(&mut self, cmd: &str) -> Result<String, MailboxError> {
        let verb = cmd.split_whitespace().next().unwrap_or("").to_string();
        let endpoint = self.endpoint.clone();
        tokio::time::timeout(
            STEP_TIMEOUT,
            self.stream
                .get_mut()
                .write_all(format!("{cmd}\r\n").as_bytes()),
        )
        .await
        .map_err(|_| MailboxError::timeout(&endpoint, "a command"))?
        .map_err(|source| MailboxError::io(&endpoint, "a command", source))?;
        self.expect_ok().await.map_err(|e| match e {
            MailboxError::Protocol { endpoint, detail } => MailboxError::Protocol {
                endpoint,
                detail: format!("{verb} answered {detail}"),
            },
            other => other,
        })
    }

    /// A listing (`UIDL`, `LIST`) read whole, up to [`MAX_LISTING`] bytes.
    async fn listing(&mut self, cmd: &str) -> Result<String, MailboxError> {
        self.command(cmd).await?;
        let mut body = MultiLine::new(self);
        let mut out = Vec::new();
        while body.read_into(&mut out, 64 * 1024).await? {
            if out.len() > MAX_LISTING || body.longest_line() > MAX_LINE {
                return Err(MailboxError::Protocol {
                    endpoint: body.pop.endpoint.clone(),
                    detail: format!("the {cmd} listing is larger than {MAX_LISTING} bytes"),
                });
            }
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// `UIDL`: (message number, unique id) of every message.
    pub async fn uidl(&mut self) -> Result<Vec<(u32, String)>, MailboxError> {
        let body = self.listing("UIDL").await?;
        Ok(body
            .lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                let n = it.next()?.parse().ok()?;
                Some((n, it.next()?.to_string()))
            })
            .collect())
    }

    /// `LIST`: (message number, size in bytes) of every message.
    pub async fn list(&mut self) -> Result<Vec<(u32, u64)>, MailboxError> {
        let body = self.listing("LIST").await?;
        Ok(body
            .lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
            })
            .collect())
    }

    /// `TOP n 0`: the message's header, of which the first `keep` bytes are kept (the rest is
    /// read and dropped).
    pub async fn top_header(&mut self, n: u32, keep: usize) -> Result<Vec<u8>, MailboxError> {
        self.command(&format!("TOP {n} 0")).await?;
        let mut body = MultiLine::new(self);
        let mut out = Vec::new();
        body.read_into(&mut out, keep).await?;
        out.truncate(keep);
        body.skip_rest().await?;
        Ok(out)
    }

    /// `RETR n`: the message, to be read piece by piece from the returned reader (which must
    /// be read to its end, or the session dropped).
    pub async fn retr(&mut self, n: u32) -> Result<MultiLine<'_>, MailboxError> {
        self.command(&format!("RETR {n}")).await?;
        Ok(MultiLine::new(self))
    }

    pub async fn dele(&mut self, n: u32) -> Result<(), MailboxError> {
        self.command(&format!("DELE {n}")).await.map(|_| ())
    }

    /// Ends the session; deletions take effect only here.
    pub async fn quit(mut self) -> Result<(), MailboxError> {
        self.command("QUIT").await.map(|_| ())
    }
}

/// Where the reader is in the dot-stuffed answer (RFC 1939 §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dots {
    LineStart,
    /// A line began with "."; the next byte tells the terminator from a stuffed dot.
    Dot,
    /// ".\r" at a line start.
    DotCr,
    Mid,
}

/// A multi-line POP3 answer, read in pieces with dot-stuffing undone, up to the lone ".".
/// No line is ever held whole: a line's length is only counted ([`MultiLine::longest_line`]).
pub struct MultiLine<'a> {
    pop: &'a mut Pop3,
    state: Dots,
    done: bool,
    line: usize,
    longest: usize,
}

impl<'a> MultiLine<'a> {
    fn new(pop: &'a mut Pop3) -> Self {
        Self {
            pop,
            state: Dots::LineStart,
            done: false,
            line: 0,
            longest: 0,
        }
    }

    /// The longest line seen so far, in bytes (with its line ending).
    pub fn longest_line(&self) -> usize {
        self.longest.max(self.line)
    }

    /// Appends about `max` more bytes of the answer to `out` (at least one, unless at the end);
    /// `Ok(false)` once the terminating "." has been read.
    pub async fn read_into(&mut self, out: &mut Vec<u8>, max: usize) -> Result<bool, MailboxError> {
        let max = max.max(1);
        let start = out.len();
        while !self.done && out.len() - start < max {
            let buf = self.pop.fill("a message").await?;
            let mut i = 0;
            while i < buf.len() && !self.done && out.len() - start < max {
                match self.state {
                    Dots::LineStart if buf[i] == b'.' => {
                        i += 1;
                        self.state = Dots::Dot;
                    }
                    Dots::LineStart => self.state = Dots::Mid,
                    Dots::Dot => match buf[i] {
                        b'\r' => {
                            i += 1;
                            self.state = Dots::DotCr;
                        }
                        b'\n' => {
                            i += 1;
                            self.done = true;
                        }
                        b'.' => {
                            i += 1;
                            out.push(b'.');
                            self.line += 1;
                            self.state = Dots::Mid;
                        }
                        // Not stuffed as it should be: keep the dot.
                        _ => {
                            out.push(b'.');
                            self.line += 1;
                            self.state = Dots::Mid;
                        }
                    },
                    Dots::DotCr if buf[i] == b'\n' => {
                        i += 1;
                        self.done = true;
                    }
                    Dots::DotCr => {
                        out.extend_from_slice(b".\r");
                        self.line += 2;
                        self.state = Dots::Mid;
                    }
                    Dots::Mid => {
                        let rest = &buf[i..];
                        let piece = &rest[..rest.len().min(max - (out.len() - start))];
                        match memchr::memchr(b'\n', piece) {
                            Some(p) => {
                                out.extend_from_slice(&piece[..=p]);
                                i += p + 1;
                                self.longest = self.longest.max(self.line + p + 1);
                                self.line = 0;
                                self.state = Dots::LineStart;
                            }
                            None => {
                                out.extend_from_slice(piece);
                                i += piece.len();
                                self.line += piece.len();
                            }
                        }
                    }
                }
            }
            self.pop.stream.consume(i);
        }
        Ok(!self.done)
    }

    /// Reads the rest of the answer and drops it.
    pub async fn skip_rest(&mut self) -> Result<(), MailboxError> {
        let mut sink = Vec::with_capacity(64 * 1024);
        while self.read_into(&mut sink, 64 * 1024).await? {
            sink.clear();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A POP3 client on a socket whose peer writes `server` in pieces of `piece` bytes.
    async fn pop_reading(server: Vec<u8>, piece: usize) -> Pop3 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            for chunk in server.chunks(piece) {
                s.write_all(chunk).await.unwrap();
                s.flush().await.unwrap();
                tokio::task::yield_now().await;
            }
            // Keep the connection open until the client is done.
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        Pop3 {
            stream: BufReader::with_capacity(
                64,
                WatchedStream::new(MailStream::Plain(tcp), ReadLimit::new(STEP_TIMEOUT)),
            ),
            endpoint: "test".into(),
        }
    }

    #[tokio::test]
    async fn multi_line_answers_are_unstuffed_whatever_the_read_boundaries() {
        let long_line = "x".repeat(5000);
        let wire = format!(
            "Subject: a\r\n\r\n..leading dot\r\n...two dots\r\n.x not stuffed\r\n{long_line}\r\n..\r\n.\r\n+OK next\r\n"
        );
        let want = format!(
            "Subject: a\r\n\r\n.leading dot\r\n..two dots\r\n.x not stuffed\r\n{long_line}\r\n.\r\n"
        );
        for piece in [1, 2, 3, 7, 64, 4096] {
            let mut pop = pop_reading(wire.clone().into_bytes(), piece).await;
            let mut body = MultiLine::new(&mut pop);
            let mut out = Vec::new();
            while body.read_into(&mut out, 5).await.unwrap() {}
            assert_eq!(String::from_utf8_lossy(&out), want, "pieces of {piece}");
        }
        // After the terminator the session reads on normally.
        let wire = format!("a\r\n{long_line}\r\n..\r\n.\r\n+OK next\r\n");
        let mut pop = pop_reading(wire.into_bytes(), 3).await;
        let mut body = MultiLine::new(&mut pop);
        let mut out = Vec::new();
        while body.read_into(&mut out, 1 << 20).await.unwrap() {}
        assert_eq!(body.longest_line(), long_line.len() + 2);
        assert_eq!(out, format!("a\r\n{long_line}\r\n.\r\n").into_bytes());
        assert_eq!(pop.expect_ok().await.unwrap(), "next");
    }

    #[tokio::test]
    async fn an_over_long_status_line_is_an_error_not_an_allocation() {
        let wire = vec![b'+'; MAX_LINE + 10];
        let mut pop = pop_reading(wire, 65_536).await;
        let err = pop.read_line().await.unwrap_err();
        assert!(err.to_string().contains("longer than"), "{err}");
    }

    #[tokio::test]
    async fn an_imap_step_that_hangs_is_a_timeout_naming_the_step() {
        let hung = std::future::pending::<Result<(), async_imap::error::Error>>();
        let err = imap_step_within(
            "imap.example.com:993",
            "SELECT",
            Duration::from_millis(50),
            hung,
        )
        .await
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "imap.example.com:993 did not answer SELECT within 50ms; the connection is dropped and opened again"
        );
        // A read that timed out inside async-imap says the same.
        let err = imap_error(
            "h:1",
            "FETCH",
            async_imap::error::Error::Io(io::Error::new(io::ErrorKind::TimedOut, "x")),
        );
        assert!(
            matches!(err, MailboxError::Timeout { step: "FETCH", .. }),
            "{err}"
        );
    }

    #[test]
    fn a_refused_login_does_not_name_the_user() {
        let err = MailboxError::Login {
            endpoint: "imap.example.com:993".into(),
            detail: "[AUTHENTICATIONFAILED] Authentication failed.".into(),
        };
        assert_eq!(
            err.to_string(),
            "imap.example.com:993 refused the login: [AUTHENTICATIONFAILED] Authentication failed.; check the mailbox's username and password"
        );
    }

    #[tokio::test]
    async fn a_silent_server_times_out_by_the_read_limit() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (_s, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let limit = ReadLimit::new(Duration::from_millis(200));
        let mut s = WatchedStream::new(MailStream::Plain(tcp), limit);
        let mut buf = [0u8; 16];
        let started = std::time::Instant::now();
        let err = tokio::io::AsyncReadExt::read(&mut s, &mut buf)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
