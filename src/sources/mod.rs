//! The inbound sources read over HTTP — the Gmail API (`gmail.rs`) and Microsoft Graph
//! (`graph.rs`) — behind one seam, [`MailSource`]: what is new since a cursor, page by page,
//! and the cursor after it; then each message's MIME bytes, streamed. The fetcher
//! (`actors/fetcher.rs`) drives every source with one loop and one pipeline (parse → store →
//! publish → record), whose exactly-once rules are written once there; a source only lists
//! and downloads.
//!
//! What the sources share is here: the HTTP client (bounded: connect 30 s, 60 s of silence, a
//! listing answer of at most [`MAX_LISTING`]), the bearer credential with its 401 rule (told
//! to the credential, asked once more when it renews), and the mapping of answers to
//! [`SourceError`]s (429/5xx transient with their `Retry-After`, an expired history or delta
//! token as [`SourceError::Expired`]).

pub mod gmail;
pub mod graph;

use std::time::Duration;

use reqwest::StatusCode;

use crate::credentials::{Credential, CredentialError};
use crate::intake::MailboxCursor;
use crate::providers::http_api::{error_text, retry_after};
use crate::settings::{MailProtocol, Mailbox, Secret};

/// The most of an error answer that is read (its text is at the start).
const MAX_ERROR_BODY: usize = 64 * 1024;
/// The most of a listing answer (ids, links) that is read.
pub const MAX_LISTING: usize = 8 * 1024 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Silence this long on a connection fails the request.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// A listing request takes at most this long.
const LIST_TIMEOUT: Duration = Duration::from_secs(120);
/// A message download takes at most this long (large messages arrive in pieces).
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(600);

/// Where a walk over the folder starts.
#[derive(Debug, Clone, PartialEq)]
pub enum Start {
    /// What changed since this cursor (the source's own kind).
    Changes(MailboxCursor),
    /// Everything in the folder received at or after `floor` (Unix seconds; all when None).
    List { floor: Option<i64> },
    /// Only the folder's current position: nothing is listed (`initial_sync = "new"`).
    Position { floor: Option<i64> },
}

/// A message a listing named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRef {
    pub id: String,
    /// When it was received (Unix seconds), when the listing says.
    pub received_at: Option<i64>,
}

/// One page of a walk: messages to fetch and, on its last page, the cursor after it.
#[derive(Debug, Default)]
pub struct Page {
    pub messages: Vec<MessageRef>,
    /// Set on the last page: the position to store once everything listed is handled.
    pub end: Option<MailboxCursor>,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Credential(#[from] CredentialError),
    /// The history id or delta token is too old for the API: the folder is listed again.
    #[error("{endpoint}: the mailbox position expired ({detail})")]
    Expired { endpoint: String, detail: String },
    #[error("{endpoint} answered {status}: {text}")]
    Http {
        endpoint: String,
        status: u16,
        text: String,
        retry_after: Option<Duration>,
    },
    #[error("{endpoint}: {detail}")]
    Network { endpoint: String, detail: String },
    #[error("{endpoint}: unexpected answer: {detail}")]
    Answer { endpoint: String, detail: String },
    #[error("{0}")]
    Config(String),
}

impl SourceError {
    /// How long the API asked to wait before the next request.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            SourceError::Http { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// A message's bytes as they arrive, in pieces.
pub enum Download {
    /// The response body is the MIME message.
    Mime(reqwest::Response),
    /// A Gmail `format=raw` answer: JSON with the message in base64url under `raw`.
    GmailRaw(reqwest::Response, gmail::RawExtractor),
    /// The message is gone (deleted since it was listed).
    Gone,
}

impl Download {
    /// The next piece of the MIME message; None at its end.
    pub async fn chunk(&mut self, endpoint: &str) -> Result<Option<Vec<u8>>, SourceError> {
        let net = |e: reqwest::Error| SourceError::Network {
            endpoint: endpoint.to_string(),
            detail: net_detail(e),
        };
        match self {
            Download::Gone => Ok(None),
            Download::Mime(r) => Ok(r.chunk().await.map_err(net)?.map(|b| b.to_vec())),
            Download::GmailRaw(r, x) => loop {
                match r.chunk().await.map_err(net)? {
                    Some(b) => {
                        let out = x.feed(&b).map_err(|detail| SourceError::Answer {
                            endpoint: endpoint.to_string(),
                            detail,
                        })?;
                        if !out.is_empty() {
                            return Ok(Some(out));
                        }
                    }
                    None => {
                        let out = x.finish().map_err(|detail| SourceError::Answer {
                            endpoint: endpoint.to_string(),
                            detail,
                        })?;
                        return Ok((!out.is_empty()).then_some(out));
                    }
                }
            },
        }
    }
}

/// An inbound source read over HTTP.
///
/// A walk is [`MailSource::begin`] then [`MailSource::next_page`] until a page carries the
/// `end` cursor; [`MailSource::download`] fetches one listed message. Used generically by the
/// fetcher (never as a trait object), on its single-threaded runtime.
#[allow(async_fn_in_trait)]
pub trait MailSource {
    /// Starts a walk (forgetting any walk in progress).
    fn begin(&mut self, start: Start);
    /// The next page of the walk begun last.
    async fn next_page(&mut self) -> Result<Page, SourceError>;
    /// One message's MIME bytes.
    async fn download(&self, id: &str) -> Result<Download, SourceError>;
    /// What errors and `/health` name (the API's origin).
    fn endpoint(&self) -> &str;
}

/// The two API sources, as the fetcher holds them.
pub enum ApiSource {
    Gmail(gmail::GmailSource),
    Graph(graph::GraphSource),
}

impl ApiSource {
    /// The source of an API mailbox; None for IMAP and POP3.
    pub fn of(
        mailbox: &Mailbox,
        accounts: &std::sync::Arc<crate::oauth2::Accounts>,
    ) -> Option<Result<Self, SourceError>> {
        let api = mailbox.api.as_ref()?;
        let credential = match (&mailbox.oauth2, &api.access_token) {
            (Some(o), _) => {
                Credential::OAuth2(accounts.account(&format!("mailbox:{}", mailbox.id), o))
            }
            (None, Some(t)) => Credential::Static(t.clone()),
            (None, None) => {
                return Some(Err(SourceError::Config(
                    "no oauth2 account and no access_token".into(),
                )))
            }
        };
        let client = match ApiClient::new(&api.base_url, credential) {
            Ok(c) => c,
            Err(e) => return Some(Err(e)),
        };
        Some(Ok(match mailbox.protocol {
            MailProtocol::GmailApi => {
                ApiSource::Gmail(gmail::GmailSource::new(client, &api.user, &mailbox.folder))
            }
            MailProtocol::MsGraph => {
                ApiSource::Graph(graph::GraphSource::new(client, &api.user, &mailbox.folder))
            }
            MailProtocol::Imap | MailProtocol::Pop3 => return None,
        }))
    }
}

/// The HTTP client of one API mailbox, with its credential.
pub struct ApiClient {
    client: reqwest::Client,
    pub base_url: String,
    credential: Credential,
}

/// An answer to a GET: its status and body (bounded), or the response to read in pieces.
pub struct Answer {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl ApiClient {
    pub fn new(base_url: &str, credential: Credential) -> Result<Self, SourceError> {
        let client = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .pool_idle_timeout(Duration::from_secs(20))
            .pool_max_idle_per_host(2)
            .tcp_nodelay(true)
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("mailbridge/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| SourceError::Config(format!("HTTP client: {e}")))?;
        Ok(Self {
            client,
            base_url: base_url.to_string(),
            credential,
        })
    }

    /// GETs `url` with the bearer token; a 401 is told to the credential and the request is
    /// made once more when the credential renews. Returns the response whatever its status.
    pub async fn send(
        &self,
        url: &str,
        headers: &[(&'static str, &str)],
        timeout: Duration,
    ) -> Result<reqwest::Response, SourceError> {
        let mut retried = false;
        loop {
            let token: Secret = self.credential.token().await?;
            let mut req = self
                .client
                .get(url)
                .timeout(timeout)
                .bearer_auth(token.expose());
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            let resp = req.send().await.map_err(|e| SourceError::Network {
                endpoint: self.base_url.clone(),
                detail: net_detail(e),
            })?;
            if resp.status() == StatusCode::UNAUTHORIZED && !retried && self.credential.renews() {
                self.credential.refused(&token);
                retried = true;
                continue;
            }
            return Ok(resp);
        }
    }

    /// GETs a listing: its answer read whole (up to [`MAX_LISTING`]).
    pub async fn get(
        &self,
        url: &str,
        headers: &[(&'static str, &str)],
    ) -> Result<Answer, SourceError> {
        let mut resp = self.send(url, headers, LIST_TIMEOUT).await?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let mut body = Vec::new();
        while let Some(piece) = resp.chunk().await.map_err(|e| SourceError::Network {
            endpoint: self.base_url.clone(),
            detail: net_detail(e),
        })? {
            if body.len() + piece.len() > MAX_LISTING {
                return Err(SourceError::Answer {
                    endpoint: self.base_url.clone(),
                    detail: format!("a listing answer longer than {MAX_LISTING} bytes"),
                });
            }
            body.extend_from_slice(&piece);
        }
        Ok(Answer {
            status,
            headers,
            body,
        })
    }

    /// A download: the response when it is 2xx, [`Download::Gone`] on 404, else the error.
    pub async fn download(
        &self,
        url: &str,
        wrap: impl FnOnce(reqwest::Response) -> Download,
    ) -> Result<Download, SourceError> {
        let resp = self.send(url, &[], DOWNLOAD_TIMEOUT).await?;
        if resp.status().is_success() {
            return Ok(wrap(resp));
        }
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(Download::Gone);
        }
        let status = resp.status();
        let headers = resp.headers().clone();
        // The error text is at the start; the rest is not read.
        let mut resp = resp;
        let mut body = Vec::new();
        while body.len() < MAX_ERROR_BODY {
            match resp.chunk().await {
                Ok(Some(piece)) => body.extend_from_slice(&piece),
                _ => break,
            }
        }
        body.truncate(MAX_ERROR_BODY);
        Err(self.error(status, &headers, &body))
    }

    /// The error of a non-2xx answer.
    pub fn error(
        &self,
        status: StatusCode,
        headers: &reqwest::header::HeaderMap,
        body: &[u8],
    ) -> SourceError {
        SourceError::Http {
            endpoint: self.base_url.clone(),
            status: status.as_u16(),
            text: error_text(status.as_u16(), body),
            retry_after: retry_after(headers, time::OffsetDateTime::now_utc()),
        }
    }

    /// A malformed answer.
    pub fn answer_error(&self, detail: impl Into<String>) -> SourceError {
        SourceError::Answer {
            endpoint: self.base_url.clone(),
            detail: detail.into(),
        }
    }
}

/// A network failure without its URL: the URL holds the mailbox's address (and a Graph delta
/// token), which errors and `/health` do not show.
fn net_detail(e: reqwest::Error) -> String {
    crate::domain::error_chain(&e.without_url())
}

/// `text` as one URL path segment or query value.
pub fn encode(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}
