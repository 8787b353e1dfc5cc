//! `protocol = "gmail_api"`: a Gmail label read through the Gmail API.
//!
//! - Changes: `users.history.list?startHistoryId=…&historyTypes=messageAdded&labelId=…`,
//!   paged by `pageToken`; the ids of `history[].messagesAdded[].message`; the cursor after it
//!   is the last page's `historyId`. A 404 means the history id is too old
//!   ([`SourceError::Expired`]): the fetcher lists the label again.
//! - Listing: `users.getProfile` first (its `historyId` is the cursor after the walk, so what
//!   arrives during the listing comes with the next changes), then `users.messages.list?
//!   labelIds=…` paged, with `q=after:<floor>` (Unix seconds) when there is a floor.
//! - A message: `users.messages.get?format=raw`, the MIME in base64url under `raw`, decoded
//!   as it arrives ([`RawExtractor`]) so a large one is never held as JSON.

use base64::Engine;
use serde::Deserialize;

use super::{encode, ApiClient, Download, Listing, MessageRef, Page, SourceError, Start};
use crate::intake::MailboxCursor;
use crate::providers::http_api::BASE64URL;

const PAGE_SIZE: u32 = 500;

pub struct GmailSource {
    api: ApiClient,
    /// `…/gmail/v1/users/{user}`.
    user_url: String,
    label: String,
    walk: Option<Walk>,
}

struct Walk {
    start: Start,
    page_token: Option<String>,
    /// For a listing: the profile's history id, taken before the first page.
    history_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct HistoryList {
    #[serde(default)]
    history: Vec<History>,
    next_page_token: Option<String>,
    history_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct History {
    #[serde(default)]
    messages_added: Vec<Added>,
}

#[derive(Deserialize)]
struct Added {
    message: IdOnly,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct IdOnly {
    id: String,
    #[serde(default)]
    label_ids: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MessageList {
    #[serde(default)]
    messages: Vec<IdOnly>,
    next_page_token: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Profile {
    history_id: String,
}

impl GmailSource {
    pub fn new(api: ApiClient, user: &str, label: &str) -> Self {
        let user_url = format!("{}/gmail/v1/users/{}", api.base_url, encode(user));
        Self {
            api,
            user_url,
            label: label.to_string(),
            walk: None,
        }
    }

    async fn json<T: for<'de> Deserialize<'de>>(
        &self,
        url: &str,
        expired_on_404: bool,
    ) -> Result<T, SourceError> {
        let answer = self.api.get(url, &[]).await?;
        if expired_on_404 && answer.status == reqwest::StatusCode::NOT_FOUND {
            return Err(SourceError::Expired {
                endpoint: self.api.base_url.clone(),
                detail: "Gmail answered 404 to the history id".into(),
            });
        }
        if !answer.status.is_success() {
            return Err(self.api.error(answer.status, &answer.headers, &answer.body));
        }
        serde_json::from_slice(&answer.body).map_err(|e| self.api.answer_error(e.to_string()))
    }

    async fn profile_history_id(&self) -> Result<String, SourceError> {
        let p: Profile = self
            .json(&format!("{}/profile", self.user_url), false)
            .await?;
        Ok(p.history_id)
    }
}

/// Base64 characters decoded together (a multiple of 4).
const DECODE_RUN: usize = 4096;

impl Listing for GmailSource {
    fn begin(&mut self, start: Start) {
        self.walk = Some(Walk {
            start,
            page_token: None,
            history_id: None,
        });
    }

    async fn next_page(&mut self) -> Result<Page, SourceError> {
        let Some(walk) = self.walk.take() else {
            return Ok(Page::default());
        };
        let floor = walk.start.floor();
        let cursor = |history_id: String| MailboxCursor::GmailApi { history_id, floor };
        match &walk.start {
            Start::Position { .. } => Ok(Page::last(
                Vec::new(),
                Some(cursor(self.profile_history_id().await?)),
            )),
            Start::Changes(c) => {
                let MailboxCursor::GmailApi { history_id, .. } = c else {
                    return Err(SourceError::Expired {
                        endpoint: self.api.base_url.clone(),
                        detail: "the stored position is not a Gmail history id".into(),
                    });
                };
                let mut url = format!(
                    "{}/history?startHistoryId={}&historyTypes=messageAdded&labelId={}&maxResults={PAGE_SIZE}",
                    self.user_url,
                    encode(history_id),
                    encode(&self.label)
                );
                if let Some(t) = &walk.page_token {
                    url.push_str(&format!("&pageToken={}", encode(t)));
                }
                let list: HistoryList = self.json(&url, true).await?;
                let mut messages = Vec::new();
                let mut seen = std::collections::HashSet::new();
                for h in list.history {
                    for a in h.messages_added {
                        // labelId filters the records; a record's message may say its labels.
                        let in_label = a
                            .message
                            .label_ids
                            .as_ref()
                            .is_none_or(|l| l.iter().any(|x| x == &self.label));
                        if in_label && seen.insert(a.message.id.clone()) {
                            messages.push(MessageRef::api(a.message.id, None));
                        }
                    }
                }
                // The position after the walk is the mailbox's history id when the walk
                // began (its first page): records added while it pages are then read again
                // next time (the dedup keys skip them) rather than skipped.
                let first_seen = walk.history_id.clone().or(list.history_id);
                match list.next_page_token {
                    Some(t) => {
                        self.walk = Some(Walk {
                            page_token: Some(t),
                            history_id: first_seen,
                            ..walk
                        });
                        Ok(Page::more(messages))
                    }
                    None => {
                        let next = first_seen.unwrap_or_else(|| history_id.clone());
                        Ok(Page::last(messages, Some(cursor(next))))
                    }
                }
            }
            Start::List { floor } => {
                let history_id = match walk.history_id.clone() {
                    Some(h) => h,
                    None => self.profile_history_id().await?,
                };
                let mut url = format!(
                    "{}/messages?labelIds={}&maxResults={PAGE_SIZE}",
                    self.user_url,
                    encode(&self.label)
                );
                if let Some(f) = floor {
                    url.push_str(&format!("&q={}", encode(&format!("after:{f}"))));
                }
                if let Some(t) = &walk.page_token {
                    url.push_str(&format!("&pageToken={}", encode(t)));
                }
                let list: MessageList = self.json(&url, false).await?;
                // messages.list answers newest first; oldest first is the order of arrival.
                let messages: Vec<MessageRef> = list
                    .messages
                    .into_iter()
                    .rev()
                    .map(|m| MessageRef::api(m.id, None))
                    .collect();
                match list.next_page_token {
                    Some(t) => {
                        self.walk = Some(Walk {
                            page_token: Some(t),
                            history_id: Some(history_id),
                            ..walk
                        });
                        Ok(Page::more(messages))
                    }
                    None => Ok(Page::last(messages, Some(cursor(history_id)))),
                }
            }
        }
    }

    async fn download(&self, id: &str) -> Result<Download, SourceError> {
        let url = format!("{}/messages/{}?format=raw", self.user_url, encode(id));
        self.api
            .download(&url, |r| Download::GmailRaw(r, RawExtractor::default()))
            .await
    }

    fn endpoint(&self) -> &str {
        &self.api.base_url
    }
}

/// Takes the base64url value of `"raw"` out of a `format=raw` answer as it arrives, decoded:
/// the rest of the JSON (ids, labels, snippet) is skipped, holding at most a few bytes of it.
#[derive(Default)]
pub struct RawExtractor {
    state: State,
    /// Seeking: the last bytes seen (a key may span pieces). In the value: undecoded chars.
    held: Vec<u8>,
    /// In the value: the rest of a `\uXXXX` escape still to skip (Google escapes `=` so).
    escape: u8,
}

#[derive(Default, PartialEq, Eq)]
enum State {
    #[default]
    Seeking,
    InValue,
    Done,
}

const KEY: &[u8] = b"\"raw\"";

impl RawExtractor {
    /// The MIME bytes `piece` completes.
    pub fn feed(&mut self, piece: &[u8]) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        let mut rest: &[u8] = piece;
        if self.state == State::Seeking {
            self.held.extend_from_slice(piece);
            match find_value_start(&self.held) {
                Some(at) => {
                    let tail = self.held.split_off(at);
                    self.held.clear();
                    self.state = State::InValue;
                    return self.decode(&tail);
                }
                None => {
                    // Keep enough to recognise a key and its `: "` split across pieces.
                    let keep = 64.min(self.held.len());
                    let cut = self.held.len() - keep;
                    self.held.drain(..cut);
                    rest = &[];
                }
            }
        }
        if self.state == State::InValue {
            out = self.decode(rest)?;
        }
        Ok(out)
    }

    fn decode(&mut self, bytes: &[u8]) -> Result<Vec<u8>, String> {
        let mut out = Vec::with_capacity(bytes.len() / 4 * 3 + 3);
        for &b in bytes {
            if self.state != State::InValue {
                break;
            }
            if self.escape > 0 {
                self.escape -= 1;
                continue;
            }
            match b {
                b'"' => {
                    self.flush(&mut out, true)?;
                    self.state = State::Done;
                }
                b'\\' => self.escape = 5,
                b'=' | b'\r' | b'\n' => {}
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' => {
                    self.held.push(b);
                    if self.held.len() >= DECODE_RUN {
                        self.flush(&mut out, false)?;
                    }
                }
                // Standard base64 (some clients) is read too.
                b'+' => self.push_char(b'-', &mut out)?,
                b'/' => self.push_char(b'_', &mut out)?,
                other => return Err(format!("byte {other:#04x} in the raw message")),
            }
        }
        // This piece's whole quanta go out with it.
        if self.state == State::InValue {
            self.flush(&mut out, false)?;
        }
        Ok(out)
    }

    fn push_char(&mut self, b: u8, out: &mut Vec<u8>) -> Result<(), String> {
        self.held.push(b);
        if self.held.len() >= DECODE_RUN {
            self.flush(out, false)?;
        }
        Ok(())
    }

    /// Decodes the characters held: all of them at the end, else the longest run of whole
    /// quanta (4 characters), in one call rather than one per quantum.
    fn flush(&mut self, out: &mut Vec<u8>, last: bool) -> Result<(), String> {
        let n = if last {
            self.held.len()
        } else {
            self.held.len() / 4 * 4
        };
        if n == 0 {
            return Ok(());
        }
        let decoded = BASE64URL
            .decode(&self.held[..n])
            .map_err(|e| format!("the raw message is not base64url: {e}"))?;
        out.extend_from_slice(&decoded);
        self.held.drain(..n);
        Ok(())
    }

    /// At the end of the answer: an error when it had no (complete) `raw`.
    pub fn finish(&mut self) -> Result<Vec<u8>, String> {
        match self.state {
            State::Done => Ok(Vec::new()),
            State::Seeking => Err("the answer has no `raw` message".into()),
            State::InValue => Err("the answer ended inside the raw message".into()),
        }
    }
}

/// Where the value of the key `"raw"` starts (after its opening quote), if it does in `buf`.
fn find_value_start(buf: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(pos) = memchr::memmem::find(&buf[from..], KEY) {
        let mut i = from + pos + KEY.len();
        while buf.get(i).is_some_and(u8::is_ascii_whitespace) {
            i += 1;
        }
        if buf.get(i) == Some(&b':') {
            i += 1;
            while buf.get(i).is_some_and(u8::is_ascii_whitespace) {
                i += 1;
            }
            if buf.get(i) == Some(&b'"') {
                return Some(i + 1);
            }
            // `"raw": ` at the end of the piece: wait for more.
            if i >= buf.len() {
                return None;
            }
        } else if i >= buf.len() {
            return None;
        }
        from += pos + 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extract(answer: &[u8], piece: usize) -> Result<Vec<u8>, String> {
        let mut x = RawExtractor::default();
        let mut out = Vec::new();
        for p in answer.chunks(piece) {
            out.extend(x.feed(p)?);
        }
        out.extend(x.finish()?);
        Ok(out)
    }

    #[test]
    fn the_raw_message_is_decoded_in_pieces_of_any_size() {
        let mime = b"From: a@example.com\r\nSubject: hi\r\n\r\nbody \xff\xfe end\r\n".repeat(7);
        let raw = BASE64URL.encode(&mime);
        let answer = format!(
            r#"{{"id":"1","labelIds":["INBOX","raw"],"snippet":"the \"raw\" word","sizeEstimate":9,"raw" : "{raw}","historyId":"5"}}"#
        );
        for piece in [1, 2, 3, 5, 7, 64, 100_000] {
            assert_eq!(
                extract(answer.as_bytes(), piece).unwrap(),
                mime,
                "piece {piece}"
            );
        }
        // Padded, with `=` escaped as Google's JSON does.
        let padded = base64::engine::general_purpose::URL_SAFE.encode(b"ab");
        assert!(padded.ends_with('='));
        let answer = format!(r#"{{"raw":"{}"}}"#, padded.replace('=', "\\u003d"));
        assert_eq!(extract(answer.as_bytes(), 3).unwrap(), b"ab");
    }

    #[test]
    fn an_answer_without_raw_is_an_error() {
        assert!(extract(br#"{"id":"1"}"#, 4).is_err());
        assert!(extract(br#"{"raw":"QUJD"#, 4).is_err());
        assert!(extract(br#"{"raw":"QU*D"}"#, 4).is_err());
    }
}
