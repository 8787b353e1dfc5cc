//! `protocol = "imap"`: one folder of an IMAP server, over one session kept between syncs.
//!
//! - Position: UIDVALIDITY and the last UID handled ([`MailboxCursor::Imap`]); a changed
//!   UIDVALIDITY walks the folder again (the dedup keys skip what was published).
//! - Listing: windows of [`LIST_WINDOW`] UIDs with their sizes (`UID FETCH a:b (UID
//!   RFC822.SIZE)`), each window's end the position after it, each message's UID the
//!   position once it is handled.
//! - A first contact with `initial_sync = "new"` lists the Message-IDs of what is there
//!   (windows of [`KEY_WINDOW`]) as skipped, hashing a message without one as its dedup key
//!   does; `"<age>"` does the same for all but `SEARCH SINCE`'s answer, which it lists.
//! - Fetching: one `UID FETCH … (UID INTERNALDATE BODY.PEEK[])` per batch; a message
//!   announced as too large is streamed in [`PIECE`]s (`BODY.PEEK[]<offset.length>`).
//! - Waiting: IDLE when the server has it (renewed before servers drop it).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;

use super::{
    blocking, Fetched, Got, MailSource, MessageRef, Page, RawSink, Retrieved, SourceError, Spill,
    Start, HEADER_CAP, PIECE,
};
use crate::credentials::Credential;
use crate::inbound::{message_id_key, sha256_hex};
use crate::intake::{guarded, MailboxCursor};
use crate::mailproto::{
    endpoint, imap_error, imap_login, imap_step, ImapSession, MailboxError, ReadLimit, STEP_TIMEOUT,
};
use crate::settings::Mailbox;

/// UIDs whose sizes are listed per `UID FETCH a:b (UID RFC822.SIZE)`.
const LIST_WINDOW: u32 = 10_000;
/// UIDs whose Message-IDs are fetched per page when listing skipped mail.
const KEY_WINDOW: u32 = 500;

pub struct ImapSource {
    mailbox: Arc<Mailbox>,
    ep: String,
    /// None only while idling (IDLE takes the session and gives it back).
    session: Option<ImapSession>,
    limit: ReadLimit,
    can_idle: bool,
    /// `[inbound] max_message_bytes`: a message without a Message-ID up to this size is
    /// hashed from memory, a larger one in pieces.
    max_message: u64,
    walk: Walk,
}

/// Where a walk is.
#[derive(Default)]
struct Walk {
    uidvalidity: u32,
    top: u32,
    phase: Phase,
}

#[derive(Default)]
enum Phase {
    /// Listing the keys of UIDs `next..=top` not in `keep` as skipped; then `then`.
    Skip {
        next: u32,
        keep: BTreeSet<u32>,
        then: Box<Phase>,
    },
    /// Listing these UIDs (the ones `SEARCH SINCE` found), then the position `top`.
    Recent(Vec<u32>),
    /// Listing windows of UIDs from `next` to `top`.
    Window { next: u32 },
    /// The position `top`, and the end.
    Top,
    #[default]
    Done,
}

impl ImapSource {
    /// Logs in (with the OAuth2 account's token when the mailbox has one).
    pub async fn open(
        mailbox: Arc<Mailbox>,
        credential: Option<Credential>,
        max_message: u64,
    ) -> Result<Self, SourceError> {
        let ep = endpoint(&mailbox);
        let (mut session, limit) = imap_login(&mailbox, credential.as_ref()).await?;
        let can_idle = imap_step(&ep, "CAPABILITY", session.capabilities())
            .await?
            .has_str("IDLE");
        Ok(Self {
            mailbox,
            ep,
            session: Some(session),
            limit,
            can_idle,
            max_message,
            walk: Walk::default(),
        })
    }

    fn session(&mut self) -> Result<&mut ImapSession, MailboxError> {
        self.session.as_mut().ok_or_else(|| MailboxError::Protocol {
            endpoint: self.ep.clone(),
            detail: "the session was lost while idling".into(),
        })
    }

    fn cursor(&self, last_uid: u32) -> MailboxCursor {
        MailboxCursor::Imap {
            uidvalidity: self.walk.uidvalidity,
            last_uid,
        }
    }

    /// The sizes (RFC822.SIZE) of the messages of `set` (those `wanted`), by UID, in order. A
    /// message the server gives no size for counts as 0: it is fetched with the others, and
    /// its actual size is checked once it is read.
    async fn sizes(
        &mut self,
        set: &str,
        wanted: impl Fn(u32) -> bool,
    ) -> Result<Vec<MessageRef>, SourceError> {
        let ep = self.ep.clone();
        let mut stream = imap_step(
            &ep,
            "FETCH",
            self.session()?.uid_fetch(set, "(UID RFC822.SIZE)"),
        )
        .await?;
        let mut sizes = std::collections::BTreeMap::new();
        while let Some(f) = stream.next().await {
            let f = f.map_err(|e| imap_error(&ep, "FETCH", e))?;
            // Unsolicited FETCH responses (flag changes of other messages) are not ours.
            if let Some(uid) = f.uid.filter(|u| wanted(*u)) {
                sizes.insert(uid, f.size.map(u64::from).unwrap_or(0));
            }
        }
        drop(stream);
        Ok(sizes
            .into_iter()
            .map(|(uid, size)| MessageRef {
                id: uid.to_string(),
                number: uid,
                size: Some(size),
                ..MessageRef::default()
            })
            .collect())
    }

    /// The bodies of `uids`, with their INTERNALDATE, by UID.
    async fn bodies(
        &mut self,
        uids: &[u32],
    ) -> Result<HashMap<u32, (Vec<u8>, Option<i64>)>, SourceError> {
        let ep = self.ep.clone();
        let wanted: HashSet<u32> = uids.iter().copied().collect();
        let mut stream = imap_step(
            &ep,
            "FETCH",
            self.session()?
                .uid_fetch(uid_set(uids), "(UID INTERNALDATE BODY.PEEK[])"),
        )
        .await?;
        let mut out = HashMap::with_capacity(uids.len());
        while let Some(f) = stream.next().await {
            let f = f.map_err(|e| imap_error(&ep, "FETCH", e))?;
            // Unsolicited FETCH responses (flag changes of other messages) are not ours.
            let (Some(uid), Some(body)) = (f.uid, f.body()) else {
                continue;
            };
            if wanted.contains(&uid) {
                out.insert(
                    uid,
                    (body.to_vec(), f.internal_date().map(|d| d.timestamp())),
                );
            }
        }
        Ok(out)
    }

    /// One page of skipped keys: the UIDs `next..` (a [`KEY_WINDOW`]) not in `keep`. Keys
    /// come from the Message-ID header; a message without one is read whole (in pieces when
    /// large) to hash it exactly as its dedup key does.
    async fn skip_page(
        &mut self,
        next: u32,
        keep: &BTreeSet<u32>,
    ) -> Result<(Vec<String>, u32), SourceError> {
        let ep = self.ep.clone();
        let upper = self.walk.top.min(next.saturating_add(KEY_WINDOW - 1));
        let mut stream = imap_step(
            &ep,
            "FETCH",
            self.session()?.uid_fetch(
                format!("{next}:{upper}"),
                "(UID RFC822.SIZE BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])",
            ),
        )
        .await?;
        let mut found: Vec<(u32, u64, Vec<u8>)> = Vec::new();
        while let Some(f) = stream.next().await {
            let f = f.map_err(|e| imap_error(&ep, "FETCH", e))?;
            let Some(uid) = f
                .uid
                .filter(|u| (next..=upper).contains(u) && !keep.contains(u))
            else {
                continue;
            };
            // HEADER.FIELDS comes back as a header section.
            let fields = f.header().map(<[u8]>::to_vec).unwrap_or_default();
            found.push((uid, f.size.map(u64::from).unwrap_or(0), fields));
        }
        drop(stream);
        let keyed: Vec<(u32, u64, Option<String>)> = blocking(move || {
            found
                .into_iter()
                .map(|(uid, size, fields)| {
                    let key = guarded(|| {
                        mail_parser::MessageParser::default()
                            .parse_headers(&fields)
                            .and_then(|m| m.message_id().and_then(message_id_key))
                    })
                    .ok()
                    .flatten();
                    (uid, size, key)
                })
                .collect()
        })
        .await?;
        let mut keys = Vec::with_capacity(keyed.len());
        for (uid, size, key) in keyed {
            let key = match key {
                Some(k) => Some(k),
                None => self.hash_key(uid, size).await?,
            };
            keys.extend(key);
        }
        Ok((keys, upper))
    }

    /// The `sha256:` dedup key of a message without a Message-ID, from its bytes; None when
    /// it is gone.
    async fn hash_key(&mut self, uid: u32, size: u64) -> Result<Option<String>, SourceError> {
        if size <= self.max_message {
            let Some((raw, _)) = self.bodies(&[uid]).await?.remove(&uid) else {
                return Ok(None);
            };
            let key = blocking(move || format!("sha256:{}", sha256_hex(&raw))).await?;
            return Ok(Some(key));
        }
        let mut sink = RawSink::hash();
        if !self.pieces(uid, size, &mut sink).await? {
            return Ok(None);
        }
        Ok(Some(format!("sha256:{}", sink.finish().await?.id)))
    }

    /// Streams a message in [`PIECE`]s (`BODY.PEEK[]<offset.length>`) to `sink`; false when
    /// the message is gone.
    async fn pieces(
        &mut self,
        uid: u32,
        size: u64,
        sink: &mut RawSink,
    ) -> Result<bool, SourceError> {
        let ep = self.ep.clone();
        let mut offset = 0u64;
        loop {
            let mut stream = imap_step(
                &ep,
                "FETCH",
                self.session()?.uid_fetch(
                    uid.to_string(),
                    format!("(UID BODY.PEEK[]<{offset}.{PIECE}>)"),
                ),
            )
            .await?;
            let mut piece: Option<Vec<u8>> = None;
            while let Some(f) = stream.next().await {
                let f = f.map_err(|e| imap_error(&ep, "FETCH", e))?;
                if f.uid == Some(uid) {
                    if let Some(b) = f.body() {
                        piece = Some(b.to_vec());
                    }
                }
            }
            drop(stream);
            let Some(piece) = piece else {
                return Ok(offset > 0);
            };
            sink.push(&piece).await?;
            offset += piece.len() as u64;
            // A short piece is the end; a server that keeps sending past the size it
            // announced is cut off there.
            if piece.len() < PIECE || offset > size.saturating_add(PIECE as u64) {
                return Ok(true);
            }
        }
    }
}

impl MailSource for ImapSource {
    fn owns(&self, cursor: &MailboxCursor) -> bool {
        matches!(cursor, MailboxCursor::Imap { .. })
    }

    /// SELECTs the folder and plans the walk from its UIDVALIDITY and highest UID.
    async fn begin(&mut self, start: Start) -> Result<(), SourceError> {
        let ep = self.ep.clone();
        let folder = self.mailbox.folder.clone();
        let selected = imap_step(&ep, "SELECT", self.session()?.select(&folder)).await?;
        let uidvalidity = selected.uid_validity.unwrap_or(0);
        let top = match selected.uid_next {
            Some(n) => n.saturating_sub(1),
            // Servers without UIDNEXT: ask for the highest UID.
            None => imap_step(&ep, "SEARCH", self.session()?.uid_search("ALL"))
                .await?
                .into_iter()
                .max()
                .unwrap_or(0),
        };
        let phase = match start {
            Start::Changes(MailboxCursor::Imap {
                uidvalidity: v,
                last_uid,
            }) if v == uidvalidity => match last_uid.checked_add(1) {
                Some(next) => Phase::Window { next },
                None => Phase::Done,
            },
            Start::Changes(MailboxCursor::Imap { uidvalidity: v, .. }) => {
                tracing::warn!(tenant_id = %self.mailbox.tenant_id, mailbox_id = %self.mailbox.id, old = v, new = uidvalidity,
                    "UIDVALIDITY changed: resyncing the folder (already published mail is skipped)");
                Phase::Window { next: 1 }
            }
            Start::Changes(_) | Start::List { floor: None } => Phase::Window { next: 1 },
            // What is there now is seen, and recorded so: neither a later poll nor a
            // UIDVALIDITY change publishes it.
            Start::Position { .. } => Phase::Skip {
                next: 1,
                keep: BTreeSet::new(),
                then: Box::new(Phase::Top),
            },
            Start::List { floor: Some(floor) } => {
                let since = time::OffsetDateTime::from_unix_timestamp(floor)
                    .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
                let query = format!(
                    "SINCE {}-{}-{}",
                    since.day(),
                    month_abbrev(since.month()),
                    since.year()
                );
                let recent: BTreeSet<u32> =
                    imap_step(&ep, "SEARCH", self.session()?.uid_search(&query))
                        .await?
                        .into_iter()
                        .filter(|u| *u <= top)
                        .collect();
                Phase::Skip {
                    next: 1,
                    then: Box::new(Phase::Recent(recent.iter().copied().collect())),
                    keep: recent,
                }
            }
        };
        self.walk = Walk {
            uidvalidity,
            top,
            phase,
        };
        Ok(())
    }

    async fn next_page(&mut self) -> Result<Page, SourceError> {
        let top = self.walk.top;
        match std::mem::take(&mut self.walk.phase) {
            Phase::Done => Ok(Page::last(Vec::new(), None)),
            Phase::Top => Ok(Page::last(Vec::new(), Some(self.cursor(top)))),
            Phase::Skip { next, keep, then } => {
                if next > top || next == 0 {
                    self.walk.phase = *then;
                    return Ok(Page::default());
                }
                let (skipped, upper) = self.skip_page(next, &keep).await?;
                self.walk.phase = if upper >= top {
                    *then
                } else {
                    Phase::Skip {
                        next: upper + 1,
                        keep,
                        then,
                    }
                };
                Ok(Page {
                    skipped,
                    ..Page::default()
                })
            }
            Phase::Recent(uids) => {
                if uids.is_empty() {
                    return Ok(Page::last(Vec::new(), Some(self.cursor(top))));
                }
                let take = uids.len().min(LIST_WINDOW as usize);
                let (chunk, rest) = uids.split_at(take);
                let wanted: HashSet<u32> = chunk.iter().copied().collect();
                let messages = self.sizes(&uid_set(chunk), |u| wanted.contains(&u)).await?;
                self.walk.phase = Phase::Recent(rest.to_vec());
                Ok(Page::more(messages))
            }
            Phase::Window { next } => {
                if next > top || next == 0 {
                    return Ok(Page::last(Vec::new(), None));
                }
                let upper = top.min(next.saturating_add(LIST_WINDOW - 1));
                let mut messages = self
                    .sizes(&format!("{next}:{upper}"), |u| (next..=upper).contains(&u))
                    .await?;
                for m in &mut messages {
                    m.after = Some(self.cursor(m.number));
                }
                let last = upper >= top;
                if !last {
                    self.walk.phase = Phase::Window { next: upper + 1 };
                }
                Ok(Page {
                    messages,
                    cursor: Some(self.cursor(upper)),
                    last,
                    ..Page::default()
                })
            }
        }
    }

    /// One `UID FETCH` for all of `refs` (the fetcher groups them by their announced sizes).
    async fn fetch(&mut self, refs: &[&MessageRef], _spill: &Spill<'_>) -> Fetched {
        let uids: Vec<u32> = refs.iter().map(|m| m.number).collect();
        let mut bodies = match self.bodies(&uids).await {
            Ok(b) => b,
            Err(e) => {
                return Fetched {
                    tried: refs.len().min(1),
                    failed: Some(e),
                    ..Fetched::default()
                }
            }
        };
        // Messages listed but not returned were expunged meanwhile: nothing to publish.
        let got = refs
            .iter()
            .enumerate()
            .filter_map(|(i, m)| {
                let (raw, received_at) = bodies.remove(&m.number)?;
                Some(Got {
                    index: i,
                    message: Retrieved::Whole(raw),
                    received_at,
                })
            })
            .collect();
        Fetched {
            got,
            tried: refs.len(),
            failed: None,
        }
    }

    /// The first [`HEADER_CAP`] bytes of a message's header.
    async fn header(&mut self, m: &MessageRef) -> Result<Option<Vec<u8>>, SourceError> {
        let ep = self.ep.clone();
        let uid = m.number;
        let mut stream = imap_step(
            &ep,
            "FETCH",
            self.session()?.uid_fetch(
                uid.to_string(),
                format!("(UID BODY.PEEK[HEADER]<0.{HEADER_CAP}>)"),
            ),
        )
        .await?;
        let mut header = None;
        while let Some(f) = stream.next().await {
            let f = f.map_err(|e| imap_error(&ep, "FETCH", e))?;
            if f.uid == Some(uid) {
                if let Some(h) = f.header() {
                    header = Some(h.to_vec());
                }
            }
        }
        Ok(header)
    }

    async fn stream(&mut self, m: &MessageRef, sink: &mut RawSink) -> Result<bool, SourceError> {
        self.pieces(m.number, m.size.unwrap_or(0), sink).await
    }

    fn can_idle(&self) -> bool {
        self.can_idle
    }

    /// IDLE until the server reports something, `wait` passes, or `interrupt`.
    async fn idle(
        &mut self,
        wait: Duration,
        interrupt: impl Future<Output = ()>,
    ) -> Result<(), SourceError> {
        let ep = self.ep.clone();
        let session = self.session.take().ok_or_else(|| MailboxError::Protocol {
            endpoint: ep.clone(),
            detail: "the session was lost while idling".into(),
        })?;
        let mut handle = session.idle();
        imap_step(&ep, "IDLE", handle.init()).await?;
        // Silence is expected while idling: the stream may wait the whole IDLE, and a little
        // more for the server's answer to DONE.
        self.limit.set(wait + STEP_TIMEOUT);
        {
            let (fut, stop_source) = handle.wait_with_timeout(wait);
            let mut stop_source = Some(stop_source);
            tokio::pin!(fut);
            tokio::pin!(interrupt);
            let outcome = tokio::select! {
                r = &mut fut => r,
                _ = &mut interrupt => { stop_source.take(); (&mut fut).await }
            };
            outcome.map_err(|e| imap_error(&ep, "IDLE", e))?;
        }
        self.limit.set(STEP_TIMEOUT);
        self.session = Some(imap_step(&ep, "DONE", handle.done()).await?);
        Ok(())
    }

    async fn close(&mut self) {
        if let Some(session) = self.session.as_mut() {
            let _ = imap_step(&self.ep, "LOGOUT", session.logout()).await;
        }
    }
}

/// An IMAP sequence set for sorted UIDs, runs written `a:b`.
fn uid_set(uids: &[u32]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < uids.len() {
        let start = uids[i];
        let mut end = start;
        while i + 1 < uids.len() && uids[i + 1] == end.wrapping_add(1) {
            i += 1;
            end = uids[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}:{end}"));
        }
        i += 1;
    }
    out
}

fn month_abbrev(m: time::Month) -> &'static str {
    use time::Month::*;
    match m {
        January => "Jan",
        February => "Feb",
        March => "Mar",
        April => "Apr",
        May => "May",
        June => "Jun",
        July => "Jul",
        August => "Aug",
        September => "Sep",
        October => "Oct",
        November => "Nov",
        December => "Dec",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_sets_compress_runs() {
        assert_eq!(uid_set(&[1, 2, 3, 5, 7, 8]), "1:3,5,7:8");
        assert_eq!(uid_set(&[4]), "4");
        assert_eq!(
            uid_set(&[u32::MAX - 1, u32::MAX]),
            format!("{}:{}", u32::MAX - 1, u32::MAX)
        );
    }
}
