//! The SMTP client of the sender actors: one session on a TCP or TLS stream ([`MailStream`]),
//! reused for many emails.
//!
//! It speaks RFC 5321 with the extensions a relay needs: STARTTLS (RFC 3207), AUTH PLAIN,
//! LOGIN and XOAUTH2, 8BITMIME and SMTPUTF8 — and PIPELINING (RFC 2920): when the server
//! offers it, MAIL, every RCPT and DATA go out in one write and the message with its final
//! dot in a second, two round trips per email instead of four (lettre's client waits for each
//! reply and writes the message byte by byte; issue 7 measured it as the largest part of the
//! service's CPU per email). When another email is waiting for the session, its envelope goes
//! out in the same write as the message's final dot ([`SmtpSession::finish`]), so that a busy
//! session makes one write and one round trip per email. lettre still builds the messages.
//!
//! A session that saw any failure is marked broken and is not reused: the pool opens a new
//! one, so no transaction state can leak from one email into the next.

use std::io;
use std::sync::Arc;

use base64::Engine;
use lettre::Address;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::mailproto::MailStream;
use crate::settings::TlsMode;

/// The name this host gives in EHLO: its host name when that is a usable domain, else the
/// loopback address literal.
pub fn hello_name() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name = name.trim();
    let usable = !name.is_empty()
        && name.len() <= 253
        && name
            .split('.')
            .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    if usable {
        name.to_string()
    } else {
        "[127.0.0.1]".to_string()
    }
}

fn text(a: &Address) -> &str {
    a.as_ref()
}

/// Longest reply line read (RFC 5321 allows 512; servers write longer texts).
const MAX_LINE: u64 = 8192;
/// Most lines of one reply (EHLO lists are the longest).
const MAX_LINES: usize = 100;

/// Where and how to open sessions.
#[derive(Clone)]
pub struct SmtpConfig {
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
    /// Required for `tls` and `starttls`.
    pub tls_config: Option<Arc<rustls::ClientConfig>>,
    pub auth: Option<Credentials>,
    /// The name sent in EHLO.
    pub hello: String,
}

/// What to authenticate with.
#[derive(Clone)]
pub enum Credentials {
    /// AUTH PLAIN, else LOGIN.
    Password { user: String, password: String },
    /// AUTH XOAUTH2.
    OAuth2 { user: String, token: String },
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret never reaches a log.
        match self {
            Credentials::Password { user, .. } => write!(f, "Password({user}, ***)"),
            Credentials::OAuth2 { user, .. } => write!(f, "OAuth2({user}, ***)"),
        }
    }
}

/// One reply: its code and its lines' texts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    /// The lines as one text.
    pub fn text(&self) -> String {
        self.lines.join(" ")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SmtpError {
    #[error("cannot connect: {0}")]
    Connect(#[source] io::Error),
    #[error("TLS handshake: {0}")]
    Tls(#[source] io::Error),
    #[error("the connection broke: {0}")]
    Io(#[from] io::Error),
    /// The server answered, negatively.
    #[error("{during}: {} {}", .reply.code, .reply.text())]
    Rejected { during: &'static str, reply: Reply },
    #[error("the server does not offer STARTTLS")]
    NoStarttls,
    /// The message needs an extension the server does not offer (8BITMIME for a non-ASCII
    /// message, SMTPUTF8 for a non-ASCII address): it cannot be sent there as it is.
    #[error("{0}")]
    Unsupported(&'static str),
    /// Abandoned before the final dot (the service is shutting down): the server cannot have
    /// accepted it.
    #[error("abandoned before the message was sent (the service is shutting down)")]
    Aborted,
    #[error("the server offers none of the AUTH mechanisms {wanted} (it offers: {offered}); check the provider's tls setting, most servers offer AUTH only over TLS")]
    NoAuthMechanism {
        wanted: &'static str,
        offered: String,
    },
    #[error("{0}")]
    Protocol(String),
}

/// An open, greeted (and, as configured, encrypted and authenticated) session.
pub struct SmtpSession {
    stream: BufReader<MailStream>,
    pipelining: bool,
    eight_bit_mime: bool,
    smtputf8: bool,
    broken: bool,
    /// The final dot of a message has been written and its reply not read: if the session
    /// fails now, the server may or may not have accepted the message.
    awaiting_final_reply: bool,
    /// The next email's envelope, which went out after the last final dot ([`Self::finish`]);
    /// its replies are unread.
    joined: Option<Envelope>,
}

/// The commands that start one email's transaction: MAIL (with its parameters), one RCPT per
/// recipient, then DATA.
pub struct Envelope {
    mail: String,
    rcpts: Vec<String>,
}

impl Envelope {
    /// MAIL, every RCPT and DATA as one pipelined group, appended to `out`.
    fn write_group(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.mail.as_bytes());
        for r in &self.rcpts {
            out.extend_from_slice(r.as_bytes());
        }
        out.extend_from_slice(b"DATA\r\n");
    }
}

/// What an EHLO reply offers.
#[derive(Debug, Default, PartialEq)]
struct Extensions {
    pipelining: bool,
    eight_bit_mime: bool,
    smtputf8: bool,
    starttls: bool,
    auth: Vec<String>,
}

impl Extensions {
    fn parse(reply: &Reply) -> Self {
        let mut ext = Extensions::default();
        // The first line is the server's greeting name.
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split([' ', '=']);
            let keyword = words.next().unwrap_or("").to_ascii_uppercase();
            match keyword.as_str() {
                "PIPELINING" => ext.pipelining = true,
                "8BITMIME" => ext.eight_bit_mime = true,
                "SMTPUTF8" => ext.smtputf8 = true,
                "STARTTLS" => ext.starttls = true,
                "AUTH" => ext.auth.extend(
                    words
                        .filter(|w| !w.is_empty())
                        .map(|w| w.to_ascii_uppercase()),
                ),
                _ => {}
            }
        }
        ext
    }
}

impl SmtpSession {
    /// Connects, reads the greeting, says EHLO, upgrades to TLS and authenticates as
    /// configured. Not bounded in time: the caller bounds it.
    pub async fn connect(cfg: &SmtpConfig) -> Result<Self, SmtpError> {
        let tcp = TcpStream::connect((cfg.host.as_str(), cfg.port))
            .await
            .map_err(SmtpError::Connect)?;
        // Without it every reply waits for the peer's delayed ACK (~40 ms).
        let _ = tcp.set_nodelay(true);
        let stream = match cfg.tls {
            TlsMode::Tls => upgrade(tcp, cfg).await?,
            _ => MailStream::Plain(tcp),
        };
        let mut session = SmtpSession {
            stream: BufReader::new(stream),
            pipelining: false,
            eight_bit_mime: false,
            smtputf8: false,
            broken: false,
            awaiting_final_reply: false,
            joined: None,
        };
        let greeting = session.read_reply().await?;
        if greeting.code != 220 {
            return Err(SmtpError::Rejected {
                during: "greeting",
                reply: greeting,
            });
        }
        let mut ext = session.ehlo(&cfg.hello).await?;
        if cfg.tls == TlsMode::Starttls {
            if !ext.starttls {
                return Err(SmtpError::NoStarttls);
            }
            session.expect("STARTTLS\r\n", "STARTTLS", 220).await?;
            if !session.stream.buffer().is_empty() {
                // Anything sent before the handshake could be injected plaintext.
                return Err(SmtpError::Protocol(
                    "the server sent data after its STARTTLS reply".into(),
                ));
            }
            let MailStream::Plain(tcp) = session.stream.into_inner() else {
                return Err(SmtpError::Protocol("STARTTLS on a TLS stream".into()));
            };
            session.stream = BufReader::new(upgrade(tcp, cfg).await?);
            ext = session.ehlo(&cfg.hello).await?;
        }
        if let Some(creds) = &cfg.auth {
            session.authenticate(creds, &ext.auth).await?;
        }
        session.pipelining = ext.pipelining;
        session.eight_bit_mime = ext.eight_bit_mime;
        session.smtputf8 = ext.smtputf8;
        Ok(session)
    }

    /// Whether the session must not be used again.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Whether the last transaction failed (or was abandoned) after its final dot was
    /// written and before the server's reply to it was read: the server may have accepted
    /// the message, so sending it again at once could deliver it twice.
    pub fn outcome_unknown(&self) -> bool {
        self.awaiting_final_reply
    }

    /// Whether the server offers PIPELINING, so that the envelope of the next email can go out
    /// in the same write as a message's final dot ([`Self::finish`]).
    pub fn pipelining(&self) -> bool {
        self.pipelining
    }

    /// Whether the envelope of the next email was written after the last message's final dot
    /// and its replies are not read yet: the session belongs to that email's [`Self::begin`].
    pub fn has_joined(&self) -> bool {
        self.joined.is_some()
    }

    /// The envelope of an email on this session, or why the email cannot be sent here.
    pub fn envelope(
        &self,
        from: Option<&Address>,
        to: &[Address],
        message: &[u8],
    ) -> Result<Envelope, SmtpError> {
        let mut params = String::new();
        if !message.is_ascii() {
            if !self.eight_bit_mime {
                return Err(SmtpError::Unsupported(
                    "the message is not ASCII and the server does not offer 8BITMIME",
                ));
            }
            params.push_str(" BODY=8BITMIME");
        }
        if from.into_iter().chain(to).any(|a| !text(a).is_ascii()) {
            if !self.smtputf8 {
                return Err(SmtpError::Unsupported(
                    "an address is not ASCII and the server does not offer SMTPUTF8",
                ));
            }
            params.push_str(" SMTPUTF8");
        }
        Ok(Envelope {
            mail: format!("MAIL FROM:<{}>{params}\r\n", from.map(text).unwrap_or("")),
            rcpts: to.iter().map(|a| format!("RCPT TO:<{a}>\r\n")).collect(),
        })
    }

    /// Starts a transaction: MAIL, every RCPT and DATA, up to the server's 354 — or, when
    /// this email's envelope was joined to the previous message ([`Self::has_joined`]), only
    /// their replies.
    ///
    /// While `abort` is false; once it turns true the transaction is abandoned (nothing of
    /// the message has been written yet).
    pub async fn begin(
        &mut self,
        from: Option<&Address>,
        to: &[Address],
        message: &[u8],
        abort: &tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), SmtpError> {
        let (envelope, written) = match self.joined.take() {
            Some(joined) => {
                // Its replies are unread: from here on the session is only good after them.
                self.broken = true;
                (joined, true)
            }
            None => (self.envelope(from, to, message)?, false),
        };
        if *abort.borrow() {
            return Err(SmtpError::Aborted);
        }
        // Until the transaction completes, a failure leaves the session in an unknown state.
        self.broken = true;
        let mut abort = abort.clone();
        tokio::select! {
            envelope = self.run_envelope(&envelope, written) => envelope?,
            _ = abort.wait_for(|a| *a) => return Err(SmtpError::Aborted),
        }
        if *abort.borrow() {
            return Err(SmtpError::Aborted);
        }
        Ok(())
    }

    /// Writes the message and its final dot — and, in the same write, the envelope of the
    /// next email when there is one (RFC 2920 §3.1: message content may be the first item of
    /// a pipelined group) — then reads the reply to the dot. From the moment the dot is
    /// written the transaction runs to its reply: it cannot be abandoned.
    ///
    /// `next` is only joined where the server offers PIPELINING; the session keeps it, and
    /// the next [`Self::begin`], which must be that email's, reads its replies.
    pub async fn finish(
        &mut self,
        message: &[u8],
        next: Option<Envelope>,
    ) -> Result<Reply, SmtpError> {
        let next = next.filter(|_| self.pipelining);
        let mut data = dot_stuffed(message);
        let dot_at = data.len().saturating_sub(3);
        if let Some(next) = &next {
            next.write_group(&mut data);
        }
        self.write_data(&data, dot_at).await?;
        self.joined = next;
        let reply = self.read_reply().await?;
        self.awaiting_final_reply = false;
        if !reply.is_positive() {
            return Err(SmtpError::Rejected {
                during: "end of data",
                reply,
            });
        }
        self.broken = false;
        Ok(reply)
    }

    /// MAIL, every RCPT and DATA, up to the server's 354: pipelined in one write when the
    /// server offers PIPELINING (or already written: `written`), else one command at a time.
    async fn run_envelope(&mut self, envelope: &Envelope, written: bool) -> Result<(), SmtpError> {
        if self.pipelining || written {
            if !written {
                let mut group = Vec::with_capacity(256);
                envelope.write_group(&mut group);
                self.write(&group).await?;
            }
            // Every reply is read, in order; the first refusal is the one reported.
            let mut refused: Option<SmtpError> = None;
            let rcpts = envelope.rcpts.iter().map(|_| "RCPT TO");
            for during in std::iter::once("MAIL FROM").chain(rcpts) {
                let reply = self.read_reply().await?;
                if !reply.is_positive() && refused.is_none() {
                    refused = Some(SmtpError::Rejected { during, reply });
                }
            }
            let data = self.read_reply().await?;
            if let Some(e) = refused {
                // If DATA was accepted anyway (some recipients were), dropping the session
                // without the final dot makes the server discard the message.
                return Err(e);
            }
            if data.code != 354 {
                return Err(SmtpError::Rejected {
                    during: "DATA",
                    reply: data,
                });
            }
        } else {
            self.expect(&envelope.mail, "MAIL FROM", 250).await?;
            for r in &envelope.rcpts {
                let reply = self.command(r).await?;
                if !reply.is_positive() {
                    return Err(SmtpError::Rejected {
                        during: "RCPT TO",
                        reply,
                    });
                }
            }
            self.expect("DATA\r\n", "DATA", 354).await?;
        }
        Ok(())
    }

    /// EHLO, or HELO (and no extensions) for a server that does not know EHLO.
    async fn ehlo(&mut self, hello: &str) -> Result<Extensions, SmtpError> {
        let reply = self.command(&format!("EHLO {hello}\r\n")).await?;
        match reply.code {
            250 => Ok(Extensions::parse(&reply)),
            // Not recognised / not implemented (RFC 5321 §3.2).
            500 | 502 => {
                self.expect(&format!("HELO {hello}\r\n"), "HELO", 250)
                    .await?;
                Ok(Extensions::default())
            }
            _ => Err(SmtpError::Rejected {
                during: "EHLO",
                reply,
            }),
        }
    }

    async fn authenticate(
        &mut self,
        creds: &Credentials,
        offered: &[String],
    ) -> Result<(), SmtpError> {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let offers = |m: &str| offered.iter().any(|o| o == m);
        let none = |wanted| SmtpError::NoAuthMechanism {
            wanted,
            offered: if offered.is_empty() {
                "none".into()
            } else {
                offered.join(" ")
            },
        };
        match creds {
            Credentials::Password { user, password } if offers("PLAIN") => {
                let token = b64(&format!("\0{user}\0{password}"));
                self.expect(&format!("AUTH PLAIN {token}\r\n"), "AUTH", 235)
                    .await?;
            }
            Credentials::Password { user, password } if offers("LOGIN") => {
                self.expect("AUTH LOGIN\r\n", "AUTH", 334).await?;
                self.expect(&format!("{}\r\n", b64(user)), "AUTH", 334)
                    .await?;
                self.expect(&format!("{}\r\n", b64(password)), "AUTH", 235)
                    .await?;
            }
            Credentials::Password { .. } => return Err(none("PLAIN, LOGIN")),
            Credentials::OAuth2 { user, token } if offers("XOAUTH2") => {
                let token = b64(&format!("user={user}\x01auth=Bearer {token}\x01\x01"));
                let reply = self.command(&format!("AUTH XOAUTH2 {token}\r\n")).await?;
                let reply = if reply.code == 334 {
                    // The server's error details come as a challenge; an empty line ends it.
                    self.command("\r\n").await?
                } else {
                    reply
                };
                if reply.code != 235 {
                    return Err(SmtpError::Rejected {
                        during: "AUTH",
                        reply,
                    });
                }
            }
            Credentials::OAuth2 { .. } => return Err(none("XOAUTH2")),
        }
        Ok(())
    }

    /// A command whose reply must have `code`.
    async fn expect(
        &mut self,
        line: &str,
        during: &'static str,
        code: u16,
    ) -> Result<Reply, SmtpError> {
        let reply = self.command(line).await?;
        if reply.code != code {
            return Err(SmtpError::Rejected { during, reply });
        }
        Ok(reply)
    }

    async fn command(&mut self, line: &str) -> Result<Reply, SmtpError> {
        self.write(line.as_bytes()).await?;
        self.read_reply().await
    }

    /// Writes the message and its final dot (at `dot_at`), noting when the dot has left: from
    /// then on a failure means the outcome is unknown ([`Self::outcome_unknown`]).
    async fn write_data(&mut self, data: &[u8], dot_at: usize) -> Result<(), SmtpError> {
        let stream = self.stream.get_mut();
        // Once the final dot is written the server may complete the message.
        let mut written = 0;
        while written < data.len() {
            let n = stream.write(&data[written..]).await?;
            if n == 0 {
                return Err(SmtpError::Io(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the connection accepted no more data",
                )));
            }
            written += n;
            if written > dot_at {
                self.awaiting_final_reply = true;
            }
        }
        stream.flush().await?;
        Ok(())
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), SmtpError> {
        let stream = self.stream.get_mut();
        stream.write_all(bytes).await?;
        stream.flush().await?;
        Ok(())
    }

    async fn read_reply(&mut self) -> Result<Reply, SmtpError> {
        let mut lines = Vec::new();
        let mut buf = Vec::with_capacity(128);
        loop {
            buf.clear();
            let n = (&mut self.stream)
                .take(MAX_LINE)
                .read_until(b'\n', &mut buf)
                .await?;
            if n == 0 {
                return Err(SmtpError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection",
                )));
            }
            let line = String::from_utf8_lossy(&buf);
            let line = line.trim_end_matches(['\r', '\n']);
            let (code, more, text) = parse_line(line).ok_or_else(|| {
                SmtpError::Protocol(format!("not an SMTP reply: {:?}", truncate(line)))
            })?;
            lines.push(text.to_string());
            if !more {
                return Ok(Reply { code, lines });
            }
            if lines.len() >= MAX_LINES {
                return Err(SmtpError::Protocol("a reply of too many lines".into()));
            }
        }
    }
}

/// Wraps `tcp` in TLS for the configured host.
async fn upgrade(tcp: TcpStream, cfg: &SmtpConfig) -> Result<MailStream, SmtpError> {
    let config = cfg
        .tls_config
        .clone()
        .ok_or_else(|| SmtpError::Protocol("TLS without a TLS configuration".into()))?;
    let name = rustls::pki_types::ServerName::try_from(cfg.host.clone()).map_err(|e| {
        SmtpError::Protocol(format!(
            "`{}` is not a valid TLS server name: {e}",
            cfg.host
        ))
    })?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(SmtpError::Tls)?;
    Ok(MailStream::Tls(Box::new(tls)))
}

/// `250-text` → (250, more follows, "text").
fn parse_line(line: &str) -> Option<(u16, bool, &str)> {
    let code = line.get(..3)?;
    if !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let code = code.parse().ok()?;
    match line.as_bytes().get(3) {
        None => Some((code, false, "")),
        Some(b'-') => Some((code, true, &line[4..])),
        Some(b' ') => Some((code, false, &line[4..])),
        Some(_) => None,
    }
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(80) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// The message as DATA content: a line that starts with `.` gets another (RFC 5321
/// §4.5.2), then the final `.` line. Copies runs between line starts whole.
fn dot_stuffed(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 64);
    let mut last = 0;
    if message.first() == Some(&b'.') {
        out.push(b'.');
    }
    for at in memchr::memmem::find_iter(message, b"\n.") {
        out.extend_from_slice(&message[last..at + 1]);
        out.push(b'.');
        last = at + 1;
    }
    out.extend_from_slice(&message[last..]);
    if !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_parsed_line_by_line() {
        assert_eq!(
            parse_line("250-PIPELINING"),
            Some((250, true, "PIPELINING"))
        );
        assert_eq!(
            parse_line("550 5.1.1 no such user"),
            Some((550, false, "5.1.1 no such user"))
        );
        assert_eq!(parse_line("354"), Some((354, false, "")));
        assert_eq!(parse_line("hello"), None);
        assert_eq!(parse_line("25"), None);
        assert_eq!(parse_line("250x"), None);
    }

    #[test]
    fn ehlo_extensions_are_recognised() {
        let reply = Reply {
            code: 250,
            lines: vec![
                "mx.example.com".into(),
                "PIPELINING".into(),
                "SIZE 10240000".into(),
                "8BITMIME".into(),
                "auth plain LOGIN".into(),
                "AUTH=XOAUTH2".into(),
                "STARTTLS".into(),
            ],
        };
        let ext = Extensions::parse(&reply);
        assert!(ext.pipelining && ext.eight_bit_mime && ext.starttls && !ext.smtputf8);
        assert_eq!(ext.auth, ["PLAIN", "LOGIN", "XOAUTH2"]);
    }

    #[test]
    fn lines_starting_with_a_dot_are_stuffed_and_data_ends_with_a_dot_line() {
        assert_eq!(
            dot_stuffed(b"a\r\n.b\r\n..c\r\n"),
            b"a\r\n..b\r\n...c\r\n.\r\n"
        );
        assert_eq!(dot_stuffed(b".start"), b"..start\r\n.\r\n");
        assert_eq!(dot_stuffed(b"no dots\r\n"), b"no dots\r\n.\r\n");
        assert_eq!(dot_stuffed(b"x.y\r\n."), b"x.y\r\n..\r\n.\r\n");
    }

    #[test]
    fn credentials_never_print_their_secret() {
        let c = Credentials::Password {
            user: "crm".into(),
            password: "s3cret".into(),
        };
        assert!(!format!("{c:?}").contains("s3cret"));
    }
}
