//! Mailbox connections: TCP or TLS streams (rustls, certificates verified against the system
//! roots plus an optional `ca_file`), IMAP sessions for async-imap, and a small POP3 client
//! (USER/PASS, STLS, UIDL, RETR, DELE) over tokio.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf};
use tokio::net::TcpStream;

use crate::settings::{Mailbox, TlsMode};

/// How long one step of a mailbox conversation may take.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(60);

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
    #[error("{endpoint} refused the login for {user}: {detail}; check the mailbox's username and password")]
    Login {
        endpoint: String,
        user: String,
        detail: String,
    },
    #[error("{endpoint}: {detail}")]
    Protocol { endpoint: String, detail: String },
    #[error("{endpoint} did not answer within {timeout:?}")]
    Timeout { endpoint: String, timeout: Duration },
    #[error("the connection to {endpoint} broke: {source}")]
    Io {
        endpoint: String,
        #[source]
        source: io::Error,
    },
    #[error("mailbox setup: {0}")]
    Config(String),
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

pub fn endpoint(m: &Mailbox) -> String {
    format!("{}:{}", m.host, m.port)
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
    .map_err(|_| MailboxError::Timeout {
        endpoint: endpoint(m),
        timeout: STEP_TIMEOUT,
    })?
    .map_err(|e| MailboxError::Tls {
        endpoint: endpoint(m),
        detail: e.to_string(),
    })?;
    Ok(MailStream::Tls(Box::new(tls)))
}

/// TCP to the mailbox's server; TLS from the start when `tls = "tls"`.
pub async fn connect(m: &Mailbox) -> Result<(MailStream, Option<TcpStream>), MailboxError> {
    let tcp = tokio::time::timeout(STEP_TIMEOUT, TcpStream::connect((m.host.as_str(), m.port)))
        .await
        .map_err(|_| MailboxError::Timeout {
            endpoint: endpoint(m),
            timeout: STEP_TIMEOUT,
        })?
        .map_err(|source| MailboxError::Connect {
            endpoint: endpoint(m),
            source,
        })?;
    let _ = tcp.set_nodelay(true);
    match m.tls {
        TlsMode::Tls => Ok((start_tls(tcp, m).await?, None)),
        _ => Ok((MailStream::Plain(tcp), None)),
    }
}

pub type ImapSession = async_imap::Session<MailStream>;

/// An authenticated IMAP session (STARTTLS first when configured).
pub async fn imap_login(m: &Mailbox) -> Result<ImapSession, MailboxError> {
    let ep = endpoint(m);
    let protocol = |detail: String| MailboxError::Protocol {
        endpoint: ep.clone(),
        detail,
    };
    let (stream, _) = connect(m).await?;
    let mut client = async_imap::Client::new(stream);
    let _greeting = tokio::time::timeout(STEP_TIMEOUT, client.read_response())
        .await
        .map_err(|_| MailboxError::Timeout {
            endpoint: ep.clone(),
            timeout: STEP_TIMEOUT,
        })?
        .map_err(|e| protocol(format!("no greeting: {e}")))?;
    if m.tls == TlsMode::Starttls {
        client
            .run_command_and_check_ok("STARTTLS", None)
            .await
            .map_err(|e| protocol(format!("STARTTLS refused: {e}")))?;
        let MailStream::Plain(tcp) = client.into_inner() else {
            return Err(protocol("STARTTLS on a TLS stream".into()));
        };
        client = async_imap::Client::new(start_tls(tcp, m).await?);
    }
    let password = m.password.as_ref().map(|p| p.expose()).unwrap_or("");
    tokio::time::timeout(STEP_TIMEOUT, client.login(&m.username, password))
        .await
        .map_err(|_| MailboxError::Timeout {
            endpoint: ep.clone(),
            timeout: STEP_TIMEOUT,
        })?
        .map_err(|(e, _)| MailboxError::Login {
            endpoint: ep.clone(),
            user: m.username.clone(),
            detail: e.to_string(),
        })
}

/// A POP3 session.
pub struct Pop3 {
    stream: BufReader<MailStream>,
    endpoint: String,
}

impl Pop3 {
    pub async fn login(m: &Mailbox) -> Result<Self, MailboxError> {
        let (stream, _) = connect(m).await?;
        let mut pop = Pop3 {
            stream: BufReader::new(stream),
            endpoint: endpoint(m),
        };
        pop.expect_ok().await?;
        if m.tls == TlsMode::Starttls {
            pop.command("STLS").await?;
            let MailStream::Plain(tcp) = pop.stream.into_inner() else {
                return Err(MailboxError::Protocol {
                    endpoint: endpoint(m),
                    detail: "STLS on a TLS stream".into(),
                });
            };
            pop = Pop3 {
                stream: BufReader::new(start_tls(tcp, m).await?),
                endpoint: endpoint(m),
            };
        }
        pop.command(&format!("USER {}", m.username))
            .await
            .map_err(|e| pop.login_error(m, e))?;
        let password = m.password.as_ref().map(|p| p.expose()).unwrap_or("");
        pop.command(&format!("PASS {password}"))
            .await
            .map_err(|e| pop.login_error(m, e))?;
        Ok(pop)
    }

    fn login_error(&self, m: &Mailbox, e: MailboxError) -> MailboxError {
        match e {
            MailboxError::Protocol { detail, .. } => MailboxError::Login {
                endpoint: self.endpoint.clone(),
                user: m.username.clone(),
                detail,
            },
            other => other,
        }
    }

    /// One raw line, with its line ending; an empty answer means the server hung up.
    async fn read_raw_line(&mut self) -> Result<Vec<u8>, MailboxError> {
        let mut line = Vec::new();
        let n = tokio::time::timeout(STEP_TIMEOUT, self.stream.read_until(b'\n', &mut line))
            .await
            .map_err(|_| MailboxError::Timeout {
                endpoint: self.endpoint.clone(),
                timeout: STEP_TIMEOUT,
            })?
            .map_err(|source| MailboxError::Io {
                endpoint: self.endpoint.clone(),
                source,
            })?;
        if n == 0 {
            return Err(MailboxError::Io {
                endpoint: self.endpoint.clone(),
                source: io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed"),
            });
        }
        Ok(line)
    }

    async fn read_line(&mut self) -> Result<String, MailboxError> {
        let line = self.read_raw_line().await?;
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
        self.stream
            .get_mut()
            .write_all(format!("{cmd}\r\n").as_bytes())
            .await
            .map_err(|source| MailboxError::Io {
                endpoint: self.endpoint.clone(),
                source,
            })?;
        self.expect_ok().await.map_err(|e| match e {
            MailboxError::Protocol { endpoint, detail } => MailboxError::Protocol {
                endpoint,
                detail: format!(
                    "{} answered {detail}",
                    cmd.split_whitespace().next().unwrap_or("")
                ),
            },
            other => other,
        })
    }

    /// Reads a multi-line answer up to the lone ".", undoing dot-stuffing.
    async fn read_multiline(&mut self) -> Result<Vec<u8>, MailboxError> {
        let mut out = Vec::new();
        loop {
            let line = self.read_raw_line().await?;
            if line == b".\r\n" || line == b".\n" {
                return Ok(out);
            }
            if line.starts_with(b"..") {
                out.extend_from_slice(&line[1..]);
            } else {
                out.extend_from_slice(&line);
            }
        }
    }

    /// `UIDL`: (message number, unique id) of every message.
    pub async fn uidl(&mut self) -> Result<Vec<(u32, String)>, MailboxError> {
        self.command("UIDL").await?;
        let body = self.read_multiline().await?;
        Ok(String::from_utf8_lossy(&body)
            .lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                let n = it.next()?.parse().ok()?;
                Some((n, it.next()?.to_string()))
            })
            .collect())
    }

    pub async fn retr(&mut self, n: u32) -> Result<Vec<u8>, MailboxError> {
        self.command(&format!("RETR {n}")).await?;
        self.read_multiline().await
    }

    pub async fn dele(&mut self, n: u32) -> Result<(), MailboxError> {
        self.command(&format!("DELE {n}")).await.map(|_| ())
    }

    /// Ends the session; deletions take effect only here.
    pub async fn quit(mut self) -> Result<(), MailboxError> {
        self.command("QUIT").await.map(|_| ())
    }
}
