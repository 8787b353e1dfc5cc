//! What the HTTP sources (`gmail.rs`, `graph.rs`) share: the HTTP client (bounded: connect
//! 30 s, 60 s of silence, a listing answer of at most [`MAX_LISTING`]), the bearer credential
//! with its 401 rule (told to the credential, asked once more when it renews), the mapping of
//! answers to [`SourceError`]s (429/5xx transient with their `Retry-After`, an expired
//! history or delta token as [`SourceError::Expired`]), and [`ApiSource`]: either API as a
//! [`MailSource`], downloading a batch's messages a few at a time.

use std::time::Duration;

use futures_util::StreamExt;
use reqwest::StatusCode;

use super::{
    gmail, graph, Fetched, MailSource, MessageRef, Page, RawSink, Retrieved, SourceError, Spill,
    Start,
};
use crate::credentials::Credential;
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

/// Downloads of one API mailbox in flight at once.
const DOWNLOADS: usize = 4;

/// Pages one walk of an API mailbox may take (a million messages and more at the APIs' page
/// sizes); past it the API is taken to loop.
const MAX_WALK_PAGES: u32 = 20_000;

/// What an HTTP API lists and downloads; [`ApiSource`] makes it a [`MailSource`].
#[allow(async_fn_in_trait)]
pub trait Listing {
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
            (Some(o), _) => Credential::OAuth2(accounts.for_mailbox(&mailbox.id, o)),
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

    /// The API's origin, which errors and `/health` name.
    pub fn endpoint(&self) -> &str {
        match self {
            ApiSource::Gmail(s) => s.endpoint(),
            ApiSource::Graph(s) => s.endpoint(),
        }
    }

    /// One message's bytes: in memory up to `max_message`, else streamed into the attachment
    /// store keeping the start of its header; None when it is gone.
    async fn retrieve(
        &self,
        id: &str,
        spill: &Spill<'_>,
    ) -> Result<Option<Retrieved>, SourceError> {
        let limit = spill.max_message;
        let endpoint = self.endpoint().to_string();
        let mut download = match self {
            ApiSource::Gmail(s) => s.download(id).await?,
            ApiSource::Graph(s) => s.download(id).await?,
        };
        if matches!(download, Download::Gone) {
            return Ok(None);
        }
        let mut raw: Vec<u8> = Vec::new();
        loop {
            match download.chunk(&endpoint).await? {
                Some(piece) => {
                    raw.extend_from_slice(&piece);
                    if raw.len() as u64 > limit {
                        break;
                    }
                }
                None => return Ok(Some(Retrieved::Whole(raw))),
            }
        }
        let mut sink = RawSink::store(spill.store)?;
        let mut kept = raw.len() as u64;
        sink.push(&raw).await?;
        drop(raw);
        // An API does not say the size first: what it sends is kept up to a bound (an endless
        // answer must not fill the disk) — four times the limit, at least 1 GiB.
        let cap = limit.saturating_mul(4).max(1 << 30);
        let mut size = kept;
        while let Some(piece) = download.chunk(&endpoint).await? {
            size = size.saturating_add(piece.len() as u64);
            let take = piece.len().min(cap.saturating_sub(kept) as usize);
            sink.push(&piece[..take]).await?;
            kept += take as u64;
            if size > cap {
                break;
            }
        }
        let head = sink.head().to_vec();
        let stored = sink.finish().await?;
        let mut error = super::too_large(size, limit);
        if size > kept {
            error.push_str(&format!(
                "; only its first {kept} bytes were kept (the API sent {size} or more)"
            ));
        }
        Ok(Some(Retrieved::Stored {
            error,
            stored,
            head,
        }))
    }
}

/// The key an API message id is recorded `listed` under: readable when the id is plain,
/// else hashed (ids come from outside and reach PostgreSQL).
pub fn id_key(source: &str, id: &str) -> String {
    let plain = id.len() <= 512
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_=+/.".contains(&b));
    if plain {
        format!("{source}-id:{id}")
    } else {
        format!("{source}-idh:{}", crate::inbound::sha256_hex(id.as_bytes()))
    }
}

impl MailSource for ApiSource {
    fn owns(&self, cursor: &MailboxCursor) -> bool {
        matches!(
            (self, cursor),
            (ApiSource::Gmail(_), MailboxCursor::GmailApi { .. })
                | (ApiSource::Graph(_), MailboxCursor::MsGraph { .. })
        )
    }

    async fn begin(&mut self, start: Start) -> Result<(), SourceError> {
        match self {
            ApiSource::Gmail(s) => s.begin(start),
            ApiSource::Graph(s) => s.begin(start),
        }
        Ok(())
    }

    async fn next_page(&mut self) -> Result<Page, SourceError> {
        let (source, mut page) = match self {
            ApiSource::Gmail(s) => ("gmail_api", s.next_page().await?),
            ApiSource::Graph(s) => ("ms_graph", s.next_page().await?),
        };
        for m in &mut page.messages {
            m.listed = Some(id_key(source, &m.id));
        }
        Ok(page)
    }

    /// Downloads [`DOWNLOADS`] at a time, in order.
    async fn fetch(&mut self, refs: &[&MessageRef], spill: &Spill<'_>) -> Fetched {
        let this = &*self;
        let mut out = Fetched::default();
        let mut downloads = futures_util::stream::iter(refs.iter().enumerate())
            .map(|(i, m)| async move { (i, this.retrieve(&m.id, spill).await) })
            .buffered(DOWNLOADS);
        while let Some((i, outcome)) = downloads.next().await {
            if !out.note(i, outcome, spill.budget) {
                break;
            }
        }
        out
    }

    async fn stream(&mut self, m: &MessageRef, _sink: &mut RawSink) -> Result<bool, SourceError> {
        // The APIs announce no sizes, so no message is streamed by announcement: a large one
        // is stored as it arrives in `fetch`.
        Err(SourceError::Config(format!(
            "{}: message {} has no announced size to stream by",
            self.endpoint(),
            m.id
        )))
    }

    fn max_pages(&self) -> u32 {
        MAX_WALK_PAGES
    }
}
