//! A stand-in for the reading side of the Gmail API and Microsoft Graph: a hand-rolled
//! HTTP/1.1 server on tokio holding one Gmail mailbox (label `INBOX`) and one Graph folder
//! (`inbox`) that tests add messages to.
//!
//! Gmail (`/gmail/v1/users/{user}/…`): `profile` (`historyId`), `history` (`startHistoryId`,
//! `historyTypes=messageAdded` and `labelId` required; paged by `pageToken`; 404 for a history
//! id older than the oldest kept), `messages` (`labelIds`, `q=after:<unix>`, paged, newest
//! first), `messages/{id}?format=raw` (base64url `raw`, `=` escaped as `\u003d` as Google's
//! JSON does). Graph (`/v1.0/users/{user}/…` or `/v1.0/me/…`):
//! `mailFolders/inbox/messages/delta` (paged by `@odata.nextLink`, ending in an
//! `@odata.deltaLink`; a token of an older epoch answers 410 `syncStateNotFound`),
//! `messages/{id}/$value` (the MIME message).
//!
//! Every request needs `Authorization: Bearer` with [`ACCESS_TOKEN`] or a token the check
//! given to [`MailApiServer::accept_bearer`] approves (a token server's `active_check`); the
//! others get 401. Every request is recorded.

use std::sync::{Arc, Mutex};

use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const ACCESS_TOKEN: &str = "test-inbound-token-5d1e";

type BearerCheck = Arc<dyn Fn(&str) -> bool + Send + Sync>;

#[derive(Clone)]
struct Msg {
    id: String,
    raw: Vec<u8>,
    /// Unix seconds.
    received: i64,
    /// Gmail: the history id of its arrival. Graph: its change sequence number.
    seq: u64,
}

/// A request as received.
#[derive(Debug, Clone)]
pub struct Request {
    /// Path and query.
    pub target: String,
    pub status: u16,
    pub at: std::time::Instant,
}

struct State {
    bearer_check: Option<BearerCheck>,
    requests: Vec<Request>,
    page_size: usize,
    gmail: Vec<Msg>,
    history_id: u64,
    /// History ids below this answer 404.
    oldest_history: u64,
    graph: Vec<Msg>,
    graph_seq: u64,
    /// Tokens of an older epoch answer 410.
    graph_epoch: u64,
    /// The next requests get these statuses (with `Retry-After: 1`) instead.
    faults: Vec<u16>,
    /// Messages whose download always answers 400 (an item the API cannot give).
    poisoned: Vec<String>,
}

pub struct MailApiServer {
    pub port: u16,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl MailApiServer {
    /// Listings answer `page_size` entries a page (small, so paging is exercised).
    pub async fn start(page_size: usize) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(State {
            bearer_check: None,
            requests: Vec::new(),
            page_size,
            gmail: Vec::new(),
            history_id: 1000,
            oldest_history: 0,
            graph: Vec::new(),
            graph_seq: 0,
            graph_epoch: 1,
            faults: Vec::new(),
            poisoned: Vec::new(),
        }));
        let st = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let st = st.clone();
                tokio::spawn(async move {
                    let _ = serve(stream, st, port).await;
                });
            }
        });
        MailApiServer { port, state, task }
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bearer tokens `check` approves are accepted too.
    pub fn accept_bearer(&self, check: impl Fn(&str) -> bool + Send + Sync + 'static) {
        self.state().bearer_check = Some(Arc::new(check));
    }

    /// Adds a message to the Gmail label, received `age_secs` ago.
    pub fn gmail_add(&self, raw: &[u8], age_secs: i64) -> String {
        let mut st = self.state();
        st.history_id += 7;
        let seq = st.history_id;
        let id = format!("{:016x}", 0x18a0_0000_0000u64 + seq);
        st.gmail.push(Msg {
            id: id.clone(),
            raw: raw.to_vec(),
            received: now() - age_secs,
            seq,
        });
        id
    }

    /// Every history id given out so far is now too old (404).
    pub fn gmail_expire_history(&self) {
        let mut st = self.state();
        st.history_id += 100;
        st.oldest_history = st.history_id;
    }

    /// Adds a message to the Graph folder, received `age_secs` ago.
    pub fn graph_add(&self, raw: &[u8], age_secs: i64) -> String {
        let mut st = self.state();
        st.graph_seq += 1;
        let seq = st.graph_seq;
        let id = format!("AAMkAGI2TG93AAA{seq:06}=");
        st.graph.push(Msg {
            id: id.clone(),
            raw: raw.to_vec(),
            received: now() - age_secs,
            seq,
        });
        id
    }

    /// Every message of the Graph folder changed (read, say): each comes again in the next
    /// delta, as Graph reports updates.
    pub fn graph_touch_all(&self) {
        let mut st = self.state();
        let mut seq = st.graph_seq;
        for m in st.graph.iter_mut() {
            seq += 1;
            m.seq = seq;
        }
        st.graph_seq = seq;
        st.graph.sort_by_key(|m| m.seq);
    }

    /// Every delta token given out so far is now unknown (410).
    pub fn graph_expire_tokens(&self) {
        self.state().graph_epoch += 1;
    }

    /// Every download of message `id` (Gmail or Graph) answers 400 from now on.
    pub fn poison(&self, id: &str) {
        self.state().poisoned.push(id.to_string());
    }

    /// The next requests answer `statuses` (each with `Retry-After: 1`), in order.
    pub fn fail_next(&self, statuses: &[u16]) {
        self.state().faults = statuses.to_vec();
    }

    pub fn requests(&self) -> Vec<Request> {
        self.state().requests.clone()
    }
}

impl Drop for MailApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

async fn serve(
    mut stream: tokio::net::TcpStream,
    state: Arc<Mutex<State>>,
    port: u16,
) -> std::io::Result<()> {
    loop {
        let mut buf = Vec::new();
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            let mut chunk = [0u8; 8192];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
            assert!(buf.len() < 1 << 20, "request head too long");
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let mut request_line = lines.next().unwrap_or("").split(' ');
        let method = request_line.next().unwrap_or("").to_string();
        let target = request_line.next().unwrap_or("").to_string();
        let auth = lines
            .filter_map(|l| l.split_once(':'))
            .find(|(n, _)| n.trim().eq_ignore_ascii_case("authorization"))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default();
        let (status, content_type, extra, body) = {
            let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
            let answer = answer(&mut st, &method, &target, &auth, port);
            st.requests.push(Request {
                target: target.clone(),
                status: answer.0,
                at: std::time::Instant::now(),
            });
            answer
        };
        let mut out = format!(
            "HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (n, v) in extra {
            out.push_str(&format!("{n}: {v}\r\n"));
        }
        out.push_str("\r\n");
        stream.write_all(out.as_bytes()).await?;
        stream.write_all(&body).await?;
        stream.flush().await?;
    }
}

type Answer = (u16, &'static str, Vec<(&'static str, String)>, Vec<u8>);

fn json(status: u16, v: serde_json::Value) -> Answer {
    (
        status,
        "application/json",
        vec![],
        v.to_string().into_bytes(),
    )
}

fn query(target: &str) -> Vec<(String, String)> {
    let q = target.split_once('?').map(|(_, q)| q).unwrap_or("");
    url::form_urlencoded::parse(q.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn param(q: &[(String, String)], name: &str) -> Option<String> {
    q.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
}

fn answer(st: &mut State, method: &str, target: &str, auth: &str, port: u16) -> Answer {
    let token = auth.strip_prefix("Bearer ").unwrap_or("");
    let authorized = !token.is_empty()
        && (token == ACCESS_TOKEN || st.bearer_check.as_ref().is_some_and(|c| c(token)));
    if !authorized {
        return json(
            401,
            serde_json::json!({"error": {"code": 401, "message": "Request had invalid authentication credentials."}}),
        );
    }
    if !st.faults.is_empty() {
        let status = st.faults.remove(0);
        let (s, ct, _, body) = json(
            status,
            serde_json::json!({"error": {"code": status, "message": "Too many requests"}}),
        );
        return (s, ct, vec![("Retry-After", "1".into())], body);
    }
    if method != "GET" {
        return json(405, serde_json::json!({"error": {"message": "GET only"}}));
    }
    let path = target.split('?').next().unwrap_or("");
    let decoded: Vec<String> = path.split('/').map(percent_decode).collect();
    let segs: Vec<&str> = decoded.iter().map(String::as_str).collect();
    let q = query(target);
    let downloading = segs.last().is_some_and(|l| *l == "$value")
        || q.iter().any(|(k, v)| k == "format" && v == "raw");
    if downloading && st.poisoned.iter().any(|p| segs.contains(&p.as_str())) {
        return json(
            400,
            serde_json::json!({"error": {"code": 400, "message": "Invalid id value"}}),
        );
    }
    match segs.as_slice() {
        ["", "gmail", "v1", "users", _user, rest @ ..] => gmail(st, rest, &q),
        ["", "v1.0", "users", _user, rest @ ..] => graph(st, rest, &q, target, port),
        ["", "v1.0", "me", rest @ ..] => graph(st, rest, &q, target, port),
        _ => json(
            404,
            serde_json::json!({"error": {"message": "no such route"}}),
        ),
    }
}

fn percent_decode(seg: &str) -> String {
    let b = seg.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&seg[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn page<T: Clone>(all: &[T], q: &[(String, String)], size: usize) -> (Vec<T>, Option<String>) {
    let from: usize = param(q, "pageToken")
        .and_then(|t| t.strip_prefix("p").and_then(|n| n.parse().ok()))
        .unwrap_or(0);
    let to = (from + size).min(all.len());
    let next = (to < all.len()).then(|| format!("p{to}"));
    (all.get(from..to).unwrap_or(&[]).to_vec(), next)
}

fn gmail(st: &mut State, rest: &[&str], q: &[(String, String)]) -> Answer {
    let bad = |m: &str| {
        json(
            400,
            serde_json::json!({"error": {"code": 400, "message": m}}),
        )
    };
    match rest {
        ["profile"] => json(
            200,
            serde_json::json!({"emailAddress": "crm@acme.example", "messagesTotal": st.gmail.len(), "historyId": st.history_id.to_string()}),
        ),
        ["history"] => {
            let Some(start) = param(q, "startHistoryId").and_then(|s| s.parse::<u64>().ok()) else {
                return bad("startHistoryId is required");
            };
            if param(q, "historyTypes").as_deref() != Some("messageAdded")
                || param(q, "labelId").as_deref() != Some("INBOX")
            {
                return bad("expected historyTypes=messageAdded and labelId=INBOX");
            }
            if start < st.oldest_history {
                return json(
                    404,
                    serde_json::json!({"error": {"code": 404, "message": "Requested entity was not found.", "status": "NOT_FOUND"}}),
                );
            }
            let added: Vec<Msg> = st.gmail.iter().filter(|m| m.seq > start).cloned().collect();
            let (items, next) = page(&added, q, st.page_size);
            let history: Vec<serde_json::Value> = items
                .iter()
                .map(|m| {
                    serde_json::json!({
                        "id": m.seq.to_string(),
                        "messages": [{"id": m.id, "threadId": m.id}],
                        "messagesAdded": [{"message": {"id": m.id, "threadId": m.id, "labelIds": ["INBOX", "UNREAD"]}}]
                    })
                })
                .collect();
            let mut v = serde_json::json!({"historyId": st.history_id.to_string()});
            if !history.is_empty() {
                v["history"] = history.into();
            }
            if let Some(n) = next {
                v["nextPageToken"] = n.into();
            }
            json(200, v)
        }
        ["messages"] => {
            if param(q, "labelIds").as_deref() != Some("INBOX") {
                return bad("expected labelIds=INBOX");
            }
            let after: i64 = param(q, "q")
                .and_then(|s| s.strip_prefix("after:").and_then(|n| n.parse().ok()))
                .unwrap_or(i64::MIN);
            let mut listed: Vec<Msg> = st
                .gmail
                .iter()
                .filter(|m| m.received >= after)
                .cloned()
                .collect();
            listed.reverse(); // newest first, as Gmail lists
            let (items, next) = page(&listed, q, st.page_size);
            let mut v = serde_json::json!({"resultSizeEstimate": listed.len()});
            if !items.is_empty() {
                v["messages"] = items
                    .iter()
                    .map(|m| serde_json::json!({"id": m.id, "threadId": m.id}))
                    .collect::<Vec<_>>()
                    .into();
            }
            if let Some(n) = next {
                v["nextPageToken"] = n.into();
            }
            json(200, v)
        }
        ["messages", id] => {
            if param(q, "format").as_deref() != Some("raw") {
                return bad("expected format=raw");
            }
            let Some(m) = st.gmail.iter().find(|m| m.id == *id) else {
                return json(
                    404,
                    serde_json::json!({"error": {"code": 404, "message": "Requested entity was not found."}}),
                );
            };
            let raw = base64::engine::general_purpose::URL_SAFE
                .encode(&m.raw)
                .replace('=', "\\u003d");
            // Written by hand: `=` escaped as Google's JSON does, `raw` last.
            let body = format!(
                r#"{{"id":"{}","threadId":"{}","labelIds":["INBOX","UNREAD"],"snippet":"a \"raw\" snippet","sizeEstimate":{},"historyId":"{}","internalDate":"{}","raw":"{raw}"}}"#,
                m.id,
                m.id,
                m.raw.len(),
                m.seq,
                m.received * 1000
            );
            (200, "application/json", vec![], body.into_bytes())
        }
        _ => json(
            404,
            serde_json::json!({"error": {"message": "no such route"}}),
        ),
    }
}

fn graph(st: &mut State, rest: &[&str], q: &[(String, String)], target: &str, port: u16) -> Answer {
    match rest {
        ["mailFolders", "inbox", "messages", "delta"] => {
            // skip token: s.<epoch>.<from seq>.<upto seq>.<offset>; delta token: d.<epoch>.<seq>
            let (from, upto, offset) = if let Some(t) = param(q, "$skiptoken") {
                let p: Vec<u64> = t
                    .split('.')
                    .skip(1)
                    .filter_map(|n| n.parse().ok())
                    .collect();
                if p.len() != 4 || p[0] != st.graph_epoch {
                    return expired();
                }
                (p[1], p[2], p[3] as usize)
            } else if let Some(t) = param(q, "$deltatoken") {
                let p: Vec<u64> = t
                    .split('.')
                    .skip(1)
                    .filter_map(|n| n.parse().ok())
                    .collect();
                if p.len() != 2 || p[0] != st.graph_epoch {
                    return expired();
                }
                (p[1], st.graph_seq, 0)
            } else {
                if param(q, "$select").is_none() {
                    return json(
                        400,
                        serde_json::json!({"error": {"code": "BadRequest", "message": "expected $select"}}),
                    );
                }
                (0, st.graph_seq, 0)
            };
            let changed: Vec<Msg> = st
                .graph
                .iter()
                .filter(|m| m.seq > from && m.seq <= upto)
                .cloned()
                .collect();
            let end = (offset + st.page_size).min(changed.len());
            let value: Vec<serde_json::Value> = changed[offset.min(end)..end]
                .iter()
                .map(|m| {
                    let at = time::OffsetDateTime::from_unix_timestamp(m.received)
                        .unwrap()
                        .format(&time::format_description::well_known::Rfc3339)
                        .unwrap();
                    serde_json::json!({"@odata.etag": "W/\"x\"", "id": m.id, "receivedDateTime": at})
                })
                .collect();
            let base = format!(
                "http://127.0.0.1:{port}{}",
                target.split('?').next().unwrap_or("")
            );
            let mut v = serde_json::json!({"@odata.context": "https://graph.microsoft.com/v1.0/$metadata#Collection(message)", "value": value});
            if end < changed.len() {
                v["@odata.nextLink"] =
                    format!("{base}?$skiptoken=s.{}.{from}.{upto}.{end}", st.graph_epoch).into();
            } else {
                v["@odata.deltaLink"] =
                    format!("{base}?$deltatoken=d.{}.{upto}", st.graph_epoch).into();
            }
            json(200, v)
        }
        ["messages", id, "$value"] => match st.graph.iter().find(|m| m.id == *id) {
            Some(m) => (200, "message/rfc822", vec![], m.raw.clone()),
            None => json(
                404,
                serde_json::json!({"error": {"code": "ErrorItemNotFound", "message": "The specified object was not found in the store."}}),
            ),
        },
        _ => json(
            404,
            serde_json::json!({"error": {"code": "BadRequest", "message": "no such route"}}),
        ),
    }
}

fn expired() -> Answer {
    json(
        410,
        serde_json::json!({"error": {"code": "syncStateNotFound", "message": "The sync state is not found or has expired."}}),
    )
}
