//! `protocol = "pop3"`: a POP3 maildrop, one session per sync.
//!
//! - Listing: `UIDL` and `LIST`; each message's dedup key is its UIDL (`uidl:<UIDL>`), so
//!   what was handled before is known without reading it. There is no position beyond "not
//!   the first contact" ([`MailboxCursor::Pop3`]).
//! - A first contact with `initial_sync = "new"` lists every message as skipped; `"<age>"`
//!   reads each one's header (`TOP n 0`) and skips those whose Date is older.
//! - Fetching: `RETR` one at a time, into memory up to `max_message_bytes` (and no line
//!   longer than [`MAX_LINE`]), else streamed into the attachment store.
//! - With `delete_after_fetch`, handled messages are deleted (`DELE`), which takes effect at
//!   the `QUIT` that ends the sync.

use std::collections::HashMap;
use std::sync::Arc;

use super::{
    too_large, Fetched, MailSource, MessageRef, Page, RawSink, Retrieved, SourceError, Spill,
    Start, HEADER_CAP, PIECE,
};
use crate::inbound::uidl_key;
use crate::intake::{guarded, MailboxCursor};
use crate::mailproto::{MailboxError, MultiLine, Pop3, MAX_LINE};
use crate::pacing::ConnectPacer;
use crate::settings::Mailbox;

pub struct Pop3Source {
    mailbox: Arc<Mailbox>,
    /// Paces the logins to the host (one per sync).
    pacer: Arc<ConnectPacer>,
    rate: f64,
    /// The session of the sync in progress.
    pop: Option<Pop3>,
    walk: Option<Start>,
}

impl Pop3Source {
    pub fn new(mailbox: Arc<Mailbox>, pacer: Arc<ConnectPacer>, rate: f64) -> Self {
        Self {
            mailbox,
            pacer,
            rate,
            pop: None,
            walk: None,
        }
    }

    fn pop(&mut self) -> Result<&mut Pop3, MailboxError> {
        self.pop.as_mut().ok_or_else(|| MailboxError::Protocol {
            endpoint: crate::mailproto::endpoint(&self.mailbox),
            detail: "no POP3 session".into(),
        })
    }

    /// `RETR n`, into memory when it is within `max_message` (and no line is longer than
    /// [`MAX_LINE`]); otherwise streamed into the attachment store, keeping only the start
    /// of its header.
    async fn retrieve(
        &mut self,
        m: &MessageRef,
        spill: &Spill<'_>,
    ) -> Result<Retrieved, SourceError> {
        let limit = spill.max_message;
        let size = m.size.unwrap_or(0);
        let mut body = self.pop()?.retr(m.number).await?;
        // Grown by what arrives, not sized by what the server announced.
        let mut raw = Vec::with_capacity(usize::try_from(size.min(PIECE as u64)).unwrap_or(0));
        let long_line = loop {
            let more = body.read_into(&mut raw, PIECE).await?;
            if raw.len() as u64 > limit {
                break false;
            }
            if body.longest_line() > MAX_LINE {
                break true;
            }
            if !more {
                return Ok(Retrieved::Whole(raw));
            }
        };
        // Spill: what was read so far, then the rest piece by piece.
        let mut sink = RawSink::store(spill.store)?;
        sink.push(&raw).await?;
        drop(raw);
        rest_into(&mut body, &mut sink).await?;
        let head = sink.head().to_vec();
        let stored = sink.finish().await?;
        let error = if long_line {
            format!(
                "the email has a line longer than {MAX_LINE} bytes; it was not published. Its bytes are stored (raw_id); replay it to publish it anyway"
            )
        } else {
            too_large(stored.size, limit)
        };
        Ok(Retrieved::Stored {
            stored,
            head,
            error,
        })
    }
}

/// The rest of a multi-line answer into `sink`, a [`PIECE`] at a time.
async fn rest_into(body: &mut MultiLine<'_>, sink: &mut RawSink) -> Result<(), SourceError> {
    let mut piece = Vec::with_capacity(PIECE);
    loop {
        let more = body.read_into(&mut piece, PIECE).await?;
        sink.push(&piece).await?;
        piece.clear();
        if !more {
            return Ok(());
        }
    }
}

impl MailSource for Pop3Source {
    async fn connect(&mut self) -> Result<(), SourceError> {
        self.pacer.wait(&self.mailbox.host, self.rate).await;
        self.pop = Some(Pop3::login(&self.mailbox).await?);
        Ok(())
    }

    fn owns(&self, cursor: &MailboxCursor) -> bool {
        matches!(cursor, MailboxCursor::Pop3)
    }

    async fn begin(&mut self, start: Start) -> Result<(), SourceError> {
        self.walk = Some(start);
        Ok(())
    }

    /// The whole maildrop, in one page.
    async fn next_page(&mut self) -> Result<Page, SourceError> {
        let Some(start) = self.walk.take() else {
            return Ok(Page::last(Vec::new(), None));
        };
        let pop = self.pop()?;
        let listing = pop.uidl().await?;
        let sizes: HashMap<u32, u64> = pop.list().await?.into_iter().collect();
        let messages: Vec<MessageRef> = listing
            .into_iter()
            .map(|(n, uidl)| MessageRef {
                key: Some(uidl_key(&uidl)),
                size: sizes.get(&n).copied(),
                id: uidl,
                number: n,
                ..MessageRef::default()
            })
            .collect();
        let end = Some(MailboxCursor::Pop3);
        match start {
            Start::Changes(_) | Start::List { floor: None } => Ok(Page::last(messages, end)),
            // What is there now counts as seen; only later mail is published.
            Start::Position { .. } => Ok(Page {
                skipped: messages.into_iter().filter_map(|m| m.key).collect(),
                ..Page::last(Vec::new(), end)
            }),
            Start::List { floor: Some(since) } => {
                let mut recent = Vec::with_capacity(messages.len());
                let mut skipped = Vec::new();
                for m in messages {
                    let header = pop.top_header(m.number, HEADER_CAP).await?;
                    let date = guarded(|| {
                        mail_parser::MessageParser::default()
                            .parse_headers(&header)
                            .and_then(|h| h.date().map(|d| d.to_timestamp()))
                    })
                    .ok()
                    .flatten();
                    // Without a Date there is nothing to go by: published.
                    match (date, m.key) {
                        (Some(t), Some(key)) if t < since => skipped.push(key),
                        (_, key) => recent.push(MessageRef { key, ..m }),
                    }
                }
                Ok(Page {
                    skipped,
                    ..Page::last(recent, end)
                })
            }
        }
    }

    /// `RETR` one message after another until the bytes that arrived reach the budget.
    async fn fetch(&mut self, refs: &[&MessageRef], spill: &Spill<'_>) -> Fetched {
        let mut out = Fetched::default();
        for (i, m) in refs.iter().enumerate() {
            let outcome = self.retrieve(m, spill).await.map(Some);
            if !out.note(i, outcome, spill.budget) {
                break;
            }
        }
        out
    }

    async fn stream(&mut self, m: &MessageRef, sink: &mut RawSink) -> Result<bool, SourceError> {
        let mut body = self.pop()?.retr(m.number).await?;
        rest_into(&mut body, sink).await?;
        Ok(true)
    }

    async fn handled(&mut self, done: &[&MessageRef]) -> Result<(), SourceError> {
        if self.mailbox.delete_after_fetch {
            for m in done {
                self.pop()?.dele(m.number).await?;
            }
        }
        Ok(())
    }

    /// QUIT: the deletions take effect.
    async fn end(&mut self) -> Result<(), SourceError> {
        if let Some(pop) = self.pop.take() {
            pop.quit().await?;
        }
        Ok(())
    }
}
