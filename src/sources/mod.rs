//! Every inbound protocol behind one seam, [`MailSource`]: IMAP (`imap.rs`), POP3
//! (`pop3.rs`), the Gmail API (`gmail.rs`) and Microsoft Graph (`graph.rs`, both through
//! `api.rs`). A source lists what is new since a cursor, page by page, with the cursor after
//! each page; fetches a batch of the listed messages (bounded by bytes, one that is too large
//! for memory streamed into the attachment store); and says how to wait for more. The
//! fetcher (`actors/fetcher.rs`) drives every source with one walk and one pipeline (parse →
//! store → publish → record), whose exactly-once rules are written once there: a source only
//! lists and downloads.
//!
//! A new inbound protocol is one new file here implementing [`MailSource`], and one line in
//! the fetcher's `run` that opens it.

pub mod api;
pub mod gmail;
pub mod graph;
pub mod imap;
pub mod pop3;
pub mod spill;

use std::future::Future;
use std::time::Duration;

pub use api::{encode, Answer, ApiClient, ApiSource, Download, Listing, MAX_LISTING};
pub use spill::RawSink;

use crate::attachments::{AttachmentError, AttachmentStore, StoredRaw};
use crate::credentials::CredentialError;
use crate::intake::MailboxCursor;
use crate::mailproto::MailboxError;

/// How much of a header is kept for a dead letter (and read to find a Message-ID).
pub const HEADER_CAP: usize = 64 * 1024;
/// The piece in which an email too large for memory is read and stored.
pub const PIECE: usize = 1024 * 1024;

/// Where a walk over the folder starts.
#[derive(Debug, Clone, PartialEq)]
pub enum Start {
    /// What changed since this cursor (the source's own kind).
    Changes(MailboxCursor),
    /// Everything in the folder received at or after `floor` (Unix seconds; all when None).
    List { floor: Option<i64> },
    /// Only the folder's current position: what is there is not published
    /// (`initial_sync = "new"`).
    Position { floor: Option<i64> },
}

impl Start {
    /// The floor of the first contact (Unix seconds) that an API cursor carries along, so
    /// that a re-list after an expired cursor starts from the same moment.
    pub fn floor(&self) -> Option<i64> {
        match self {
            Start::Changes(
                MailboxCursor::GmailApi { floor, .. } | MailboxCursor::MsGraph { floor, .. },
            ) => *floor,
            Start::List { floor } | Start::Position { floor } => *floor,
            Start::Changes(_) => None,
        }
    }
}

/// A message a listing named.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MessageRef {
    /// The message in the source's terms (IMAP UID, POP3 UIDL, API id), for dead letters
    /// and logs.
    pub id: String,
    /// The source's own handle on it (IMAP UID, POP3 message number); 0 for the APIs.
    pub number: u32,
    /// When it was received (Unix seconds), when the listing says.
    pub received_at: Option<i64>,
    /// Its size, when the listing says (IMAP RFC822.SIZE, POP3 LIST).
    pub size: Option<u64>,
    /// Its dedup key, when the listing knows it (POP3: `uidl:<UIDL>`); else it comes from
    /// the bytes (Message-ID, or their hash).
    pub key: Option<String>,
    /// A key recorded `listed` with its email, so that a message listed again is not
    /// downloaded again (the APIs' ids).
    pub listed: Option<String>,
    /// The position once this message and every one before it are handled (IMAP).
    pub after: Option<MailboxCursor>,
}

impl MessageRef {
    /// The key that says the message was handled before: its dedup key when the listing
    /// knows it, else its `listed` key.
    pub fn known_by(&self) -> Option<&String> {
        self.key.as_ref().or(self.listed.as_ref())
    }
}

impl MessageRef {
    /// A message named by an API listing.
    pub fn api(id: String, received_at: Option<i64>) -> Self {
        Self {
            id,
            received_at,
            ..Self::default()
        }
    }
}

/// One page of a walk.
#[derive(Debug, Default)]
pub struct Page {
    /// Messages to fetch, in order of arrival.
    pub messages: Vec<MessageRef>,
    /// Dedup keys of messages `initial_sync` leaves out: recorded, never published.
    pub skipped: Vec<String>,
    /// The position once everything on this page is handled.
    pub cursor: Option<MailboxCursor>,
    /// The walk ends with this page.
    pub last: bool,
}

impl Page {
    /// A page with more to come.
    pub fn more(messages: Vec<MessageRef>) -> Self {
        Self {
            messages,
            ..Self::default()
        }
    }

    /// The last page of a walk, and the position after it.
    pub fn last(messages: Vec<MessageRef>, cursor: Option<MailboxCursor>) -> Self {
        Self {
            messages,
            cursor,
            last: true,
            ..Self::default()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Mailbox(#[from] MailboxError),
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
    #[error("the attachment store failed: {0}; check [attachments] dir (space, permissions)")]
    Store(#[from] AttachmentError),
    #[error("a blocking task failed: {0}")]
    Task(String),
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

    /// A failure about one message itself (the API refuses or cannot convert it, its bytes
    /// do not decode), rather than about the mailbox (throttling, outages, credentials).
    pub fn is_about_the_message(&self) -> bool {
        match self {
            SourceError::Answer { .. } => true,
            // A 4xx about the request (not credentials, not throttling), or Graph's answer
            // for an item it cannot give as MIME; other 5xx are outages.
            SourceError::Http { status, text, .. } => {
                ((400..500).contains(status) && !matches!(status, 401 | 403 | 408 | 429))
                    || text.contains("ErrorMimeContentConversionFailed")
            }
            _ => false,
        }
    }
}

/// A message as fetched: whole in memory, or stored (too large for memory, or a line too
/// long), keeping the start of its header.
pub enum Retrieved {
    Whole(Vec<u8>),
    Stored {
        stored: StoredRaw,
        head: Vec<u8>,
        error: String,
    },
}

impl Retrieved {
    /// The bytes it holds in memory.
    pub fn held(&self) -> u64 {
        match self {
            Retrieved::Whole(raw) => raw.len() as u64,
            Retrieved::Stored { head, .. } => head.len() as u64,
        }
    }
}

/// What one [`MailSource::fetch`] did with the front of the messages it was given.
#[derive(Default)]
pub struct Fetched {
    /// The messages fetched; a message gone since it was listed is absent.
    pub got: Vec<Got>,
    /// How many from the front were tried (fetched, gone, or failed); the rest are for the
    /// next call.
    pub tried: usize,
    /// The last one tried failed with this; those before it are in `got`.
    pub failed: Option<SourceError>,
}

impl Fetched {
    /// Notes the outcome of the message at `index` (fetched, gone, or failed) for a fetch
    /// that takes messages one after another; false when the fetch is to stop there (a
    /// failure, or the bytes held reached `budget`).
    pub fn note(
        &mut self,
        index: usize,
        outcome: Result<Option<Retrieved>, SourceError>,
        budget: u64,
    ) -> bool {
        self.tried = index + 1;
        match outcome {
            Ok(Some(message)) => self.got.push(Got {
                index,
                message,
                received_at: None,
            }),
            Ok(None) => {}
            Err(e) => {
                self.failed = Some(e);
                return false;
            }
        }
        self.got.iter().map(|g| g.message.held()).sum::<u64>() < budget
    }
}

/// One fetched message.
pub struct Got {
    /// Its index in what [`MailSource::fetch`] was given.
    pub index: usize,
    pub message: Retrieved,
    /// When it was received, when the fetch says (IMAP INTERNALDATE).
    pub received_at: Option<i64>,
}

/// Where and how a fetch keeps messages.
pub struct Spill<'a> {
    pub store: &'a AttachmentStore,
    /// A message larger than this (`[inbound] max_message_bytes`) is stored, not held.
    pub max_message: u64,
    /// A fetch stops taking more messages once it holds this many bytes
    /// (`[inbound] fetch_batch_bytes`).
    pub budget: u64,
}

/// An inbound source.
///
/// Per sync: [`MailSource::connect`], a walk ([`MailSource::begin`] then
/// [`MailSource::next_page`] until a page is the last, each page's messages fetched with
/// [`MailSource::fetch`] — or [`MailSource::stream`] for one announced as too large — and
/// told [`MailSource::handled`] once recorded), then [`MailSource::end`]. Between syncs the
/// fetcher polls, or [`MailSource::idle`]s when the source can. Used generically by the
/// fetcher (never as a trait object), on its single-threaded runtime.
#[allow(async_fn_in_trait)]
pub trait MailSource {
    /// Makes ready for a sync (POP3 logs in for each; IMAP keeps its session).
    async fn connect(&mut self) -> Result<(), SourceError> {
        Ok(())
    }
    /// Whether a stored cursor is of this source's kind (else the mailbox is contacted as
    /// for the first time, by `initial_sync`).
    fn owns(&self, cursor: &MailboxCursor) -> bool;
    /// Starts a walk (forgetting any walk in progress).
    async fn begin(&mut self, start: Start) -> Result<(), SourceError>;
    /// The next page of the walk begun last.
    async fn next_page(&mut self) -> Result<Page, SourceError>;
    /// Fetches messages from the front of `refs` until all are tried, one fails, or the
    /// bytes held reach `spill.budget`. A message over `spill.max_message` is stored.
    async fn fetch(&mut self, refs: &[&MessageRef], spill: &Spill<'_>) -> Fetched;
    /// The start of a message's header (at most [`HEADER_CAP`]), read before a message
    /// announced as too large is streamed, so a known one is not downloaded.
    async fn header(&mut self, _m: &MessageRef) -> Result<Option<Vec<u8>>, SourceError> {
        Ok(None)
    }
    /// Streams a message announced as too large into `sink`; false when it is gone.
    async fn stream(&mut self, m: &MessageRef, sink: &mut RawSink) -> Result<bool, SourceError>;
    /// These messages (ones with a listing key) are recorded: published, dead-lettered or
    /// skipped before. POP3 deletes them with `delete_after_fetch`.
    async fn handled(&mut self, _done: &[&MessageRef]) -> Result<(), SourceError> {
        Ok(())
    }
    /// Ends a sync (POP3: QUIT, which makes its deletions take effect).
    async fn end(&mut self) -> Result<(), SourceError> {
        Ok(())
    }
    /// Whether [`MailSource::idle`] waits for the server's news (IMAP IDLE).
    fn can_idle(&self) -> bool {
        false
    }
    /// Waits up to `wait` for the server to report new mail, or until `interrupt`.
    async fn idle(
        &mut self,
        _wait: Duration,
        _interrupt: impl Future<Output = ()>,
    ) -> Result<(), SourceError> {
        Ok(())
    }
    /// Says goodbye (IMAP LOGOUT); failures do not matter.
    async fn close(&mut self) {}
    /// Pages one walk may take before the source is taken to loop.
    fn max_pages(&self) -> u32 {
        u32::MAX
    }
}

/// Runs `f` on the blocking pool: parsing, hashing and file writes stay off the actors'
/// thread.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, SourceError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SourceError::Task(e.to_string()))
}

/// The error of a message over `[inbound] max_message_bytes`.
pub fn too_large(size: u64, limit: u64) -> String {
    format!(
        "the email is {size} bytes, more than [inbound] max_message_bytes ({limit}); it was not published. Its bytes are stored (raw_id); raise the limit and replay it to publish it"
    )
}
