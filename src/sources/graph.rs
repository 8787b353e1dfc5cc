//! `protocol = "ms_graph"`: a mail folder read through Microsoft Graph.
//!
//! - Every walk is a delta query: `GET /v1.0/users/{user}/mailFolders/{folder}/messages/delta`
//!   (`/v1.0/me/…` for `me`) with `$select=receivedDateTime` and `Prefer:
//!   odata.maxpagesize=100`, then each `@odata.nextLink` until an `@odata.deltaLink`, which is
//!   the cursor. A stored delta link starts the next walk. Rows marked `@removed` are skipped;
//!   rows of messages changed (read, flagged) come again and are skipped by their dedup keys.
//! - A listing (first contact, or after an expired token) is the same query without a token;
//!   messages received before the floor are left out. `initial_sync = "new"` runs it to its
//!   delta link without fetching anything.
//! - An expired or unknown token (410 Gone, or the error codes `syncStateNotFound`,
//!   `syncStateInvalid`, `resyncRequired`) is [`SourceError::Expired`].
//! - A message: `GET …/messages/{id}/$value`, the MIME message as it is.

use serde::Deserialize;

use super::{encode, ApiClient, Download, Listing, MessageRef, Page, SourceError, Start};
use crate::intake::MailboxCursor;

pub struct GraphSource {
    api: ApiClient,
    /// `…/v1.0/users/{user}` or `…/v1.0/me`.
    user_url: String,
    folder: String,
    walk: Option<Walk>,
}

struct Walk {
    /// The next URL to ask: the first request, a nextLink or a stored deltaLink.
    url: String,
    floor: Option<i64>,
    /// Listed messages are not wanted (`initial_sync = "new"`).
    position_only: bool,
    /// The walk continues a stored delta link (an expired one means: list again).
    from_cursor: bool,
}

#[derive(Deserialize)]
struct DeltaPage {
    #[serde(default)]
    value: Vec<DeltaRow>,
    #[serde(rename = "@odata.nextLink")]
    next_link: Option<String>,
    #[serde(rename = "@odata.deltaLink")]
    delta_link: Option<String>,
}

#[derive(Deserialize)]
struct DeltaRow {
    id: Option<String>,
    #[serde(rename = "receivedDateTime")]
    received: Option<String>,
    #[serde(rename = "@removed")]
    removed: Option<serde_json::Value>,
}

impl GraphSource {
    pub fn new(api: ApiClient, user: &str, folder: &str) -> Self {
        let user_url = if user == "me" {
            format!("{}/v1.0/me", api.base_url)
        } else {
            format!("{}/v1.0/users/{}", api.base_url, encode(user))
        };
        Self {
            api,
            user_url,
            folder: folder.to_string(),
            walk: None,
        }
    }

    fn first_url(&self) -> String {
        format!(
            "{}/mailFolders/{}/messages/delta?$select=receivedDateTime",
            self.user_url,
            encode(&self.folder)
        )
    }

    /// A link from an answer: followed only to the configured origin, so a token is never
    /// sent elsewhere.
    fn checked_link(&self, link: String) -> Result<String, SourceError> {
        let same_origin = |a: &str, b: &str| match (url::Url::parse(a), url::Url::parse(b)) {
            (Ok(a), Ok(b)) => a.origin() == b.origin(),
            _ => false,
        };
        if same_origin(&link, &self.api.base_url) {
            Ok(link)
        } else {
            Err(self
                .api
                .answer_error("a next or delta link to another origin than base_url"))
        }
    }
}

/// Whether an error answer says the delta token is expired or unknown.
fn is_expired(status: reqwest::StatusCode, body: &[u8]) -> bool {
    if status == reqwest::StatusCode::GONE {
        return true;
    }
    if !status.is_client_error() {
        return false;
    }
    let code = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error")?.get("code")?.as_str().map(str::to_lowercase));
    matches!(
        code.as_deref(),
        Some("syncstatenotfound" | "syncstateinvalid" | "resyncrequired")
    )
}

fn unix_of(rfc3339: &str) -> Option<i64> {
    time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(|t| t.unix_timestamp())
}

impl Listing for GraphSource {
    fn begin(&mut self, start: Start) {
        let (url, floor, position_only, from_cursor) = match start {
            // A stored link goes only to the configured origin (the bearer token goes with
            // it); one of another origin (`base_url` changed) starts over.
            Start::Changes(MailboxCursor::MsGraph { delta_link, floor }) => {
                match self.checked_link(delta_link) {
                    Ok(link) => (link, floor, false, true),
                    Err(_) => (self.first_url(), floor, false, false),
                }
            }
            // Another kind's cursor: list again (dedup keys keep what was published).
            Start::Changes(_) => (self.first_url(), None, false, false),
            Start::List { floor } => (self.first_url(), floor, false, false),
            Start::Position { floor } => (self.first_url(), floor, true, false),
        };
        self.walk = Some(Walk {
            url,
            floor,
            position_only,
            from_cursor,
        });
    }

    async fn next_page(&mut self) -> Result<Page, SourceError> {
        let Some(walk) = self.walk.take() else {
            return Ok(Page::default());
        };
        let answer = self
            .api
            .get(&walk.url, &[("Prefer", "odata.maxpagesize=100")])
            .await?;
        if !answer.status.is_success() {
            if is_expired(answer.status, &answer.body) {
                return Err(SourceError::Expired {
                    endpoint: self.api.base_url.clone(),
                    detail: format!(
                        "Graph answered {}: the delta token is no longer valid",
                        answer.status.as_u16()
                    ),
                });
            }
            // A stored link Graph does not know any more (404 on a delta link) is expired too.
            if walk.from_cursor && answer.status == reqwest::StatusCode::NOT_FOUND {
                return Err(SourceError::Expired {
                    endpoint: self.api.base_url.clone(),
                    detail: "Graph answered 404 to the delta link".into(),
                });
            }
            return Err(self.api.error(answer.status, &answer.headers, &answer.body));
        }
        let page: DeltaPage = serde_json::from_slice(&answer.body)
            .map_err(|e| self.api.answer_error(e.to_string()))?;
        let mut messages = Vec::new();
        for row in page.value {
            let (Some(id), None) = (row.id, row.removed) else {
                continue;
            };
            let received_at = row.received.as_deref().and_then(unix_of);
            if walk.position_only {
                // Finding the position publishes nothing that was there at first contact,
                // but what arrives while the (long) walk runs is new mail.
                if !matches!((walk.floor, received_at), (Some(floor), Some(at)) if at >= floor) {
                    continue;
                }
            } else if let (Some(floor), Some(at)) = (walk.floor, received_at) {
                if at < floor {
                    continue;
                }
            }
            messages.push(MessageRef::api(id, received_at));
        }
        match (page.next_link, page.delta_link) {
            (Some(next), _) => {
                let url = self.checked_link(next)?;
                self.walk = Some(Walk { url, ..walk });
                Ok(Page::more(messages))
            }
            (None, Some(delta)) => Ok(Page::last(
                messages,
                Some(MailboxCursor::MsGraph {
                    delta_link: self.checked_link(delta)?,
                    floor: walk.floor,
                }),
            )),
            (None, None) => Err(self
                .api
                .answer_error("a delta page with neither @odata.nextLink nor @odata.deltaLink")),
        }
    }

    async fn download(&self, id: &str) -> Result<Download, SourceError> {
        let url = format!("{}/messages/{}/$value", self.user_url, encode(id));
        self.api.download(&url, Download::Mime).await
    }

    fn endpoint(&self) -> &str {
        &self.api.base_url
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expired_tokens_are_recognised() {
        assert!(is_expired(reqwest::StatusCode::GONE, b""));
        assert!(is_expired(
            reqwest::StatusCode::BAD_REQUEST,
            br#"{"error":{"code":"SyncStateNotFound","message":"x"}}"#
        ));
        assert!(!is_expired(
            reqwest::StatusCode::BAD_REQUEST,
            br#"{"error":{"code":"BadRequest"}}"#
        ));
        assert!(!is_expired(reqwest::StatusCode::SERVICE_UNAVAILABLE, b""));
        assert_eq!(unix_of("1970-01-01T00:01:40Z"), Some(100));
    }
}
