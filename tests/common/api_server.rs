//! A stand-in for the HTTP email APIs (SendGrid, Mailgun, Postmark, SES v2, Resend, Gmail,
//! Microsoft Graph): a small HTTP/1.1 server on tokio that answers each API's documented
//! subset by path — its auth header checked (SES: the SigV4 signature verified against the
//! secret), its success answer with an id, and on demand a 429 with `Retry-After` or the API's
//! own error answer — and records every request for the test to inspect.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_lc_rs::{digest, hmac};
use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The credentials the stand-in accepts.
pub const API_KEY: &str = "test-api-key-7f3a";
pub const ACCESS_TOKEN: &str = "test-access-token-91c2";
pub const AWS_ACCESS_KEY_ID: &str = "AKIDEXAMPLE";
pub const AWS_SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
pub const AWS_REGION: &str = "eu-west-1";

/// Which API a request was for, by its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Api {
    Sendgrid,
    Mailgun,
    Postmark,
    Ses,
    Resend,
    Gmail,
    Graph,
}

/// A request as received.
#[derive(Debug, Clone)]
pub struct Received {
    pub api: Option<Api>,
    pub method: String,
    /// Path and query.
    pub target: String,
    /// Names lowercased, in order of arrival.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Whether its credentials (or SES signature) were right.
    pub authorized: bool,
    /// The status answered.
    pub status: u16,
    /// The id a success answer gave (in its body, or SendGrid's `X-Message-Id`).
    pub answered_id: Option<String>,
    /// When its body had arrived.
    pub at: std::time::Instant,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{:?} body is not JSON: {e}", self.api))
    }
}

/// What the next requests to an API get instead of success.
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// 429 with `Retry-After: <seconds>`.
    Throttle(u32),
    /// The API's own error answer for a refused request.
    Refuse,
}

type BearerCheck = Arc<dyn Fn(&str) -> bool + Send + Sync>;

#[derive(Default)]
struct State {
    /// Gmail's and Graph's bearer tokens are also accepted when this says (tokens an OAuth2
    /// stand-in issued).
    bearer_check: Option<BearerCheck>,
    received: Vec<Received>,
    faults: HashMap<Api, Vec<Fault>>,
    /// How long each answer takes (to see how many requests a client makes at once).
    answer_delay: Duration,
    in_progress: usize,
    most_in_progress: usize,
    counter: u32,
}

pub struct ApiServer {
    pub port: u16,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl ApiServer {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let st = st.clone();
                tokio::spawn(async move {
                    let _ = serve(stream, st).await;
                });
            }
        });
        ApiServer { port, state, task }
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The next requests to `api` get `faults`, in order; then success again.
    pub fn fail_next(&self, api: Api, faults: &[Fault]) {
        self.state
            .lock()
            .unwrap()
            .faults
            .insert(api, faults.to_vec());
    }

    /// Every answer takes `delay` from now on.
    pub fn set_answer_delay(&self, delay: Duration) {
        self.state.lock().unwrap().answer_delay = delay;
    }

    /// The most requests that were being answered at once.
    pub fn most_in_progress(&self) -> usize {
        self.state.lock().unwrap().most_in_progress
    }

    /// Gmail and Graph accept the bearer tokens `check` approves (besides `ACCESS_TOKEN`).
    pub fn accept_bearer(&self, check: impl Fn(&str) -> bool + Send + Sync + 'static) {
        self.state.lock().unwrap().bearer_check = Some(Arc::new(check));
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.lock().unwrap().received.clone()
    }

    pub fn received_by(&self, api: Api) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.api == Some(api))
            .collect()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut stream: tokio::net::TcpStream, state: Arc<Mutex<State>>) -> std::io::Result<()> {
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
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let length: usize = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let mut body = buf[head_end + 4..].to_vec();
        while body.len() < length {
            let mut chunk = vec![0u8; 64 * 1024];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            body.extend_from_slice(&chunk[..n]);
        }
        body.truncate(length);
        let delay = {
            let mut st = state.lock().unwrap();
            st.in_progress += 1;
            st.most_in_progress = st.most_in_progress.max(st.in_progress);
            st.answer_delay
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        state.lock().unwrap().in_progress -= 1;
        let mut req = Received {
            api: api_of(&method, &target),
            method,
            target,
            headers,
            body,
            authorized: false,
            status: 0,
            answered_id: None,
            at: std::time::Instant::now(),
        };
        let (status, extra, answer) = answer(&mut req, &state);
        req.status = status;
        state.lock().unwrap().received.push(req);
        let mut out = format!(
            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            answer.len()
        );
        for (n, v) in extra {
            out.push_str(&format!("{n}: {v}\r\n"));
        }
        out.push_str("\r\n");
        stream.write_all(out.as_bytes()).await?;
        stream.write_all(answer.as_bytes()).await?;
        stream.flush().await?;
    }
}

fn api_of(method: &str, target: &str) -> Option<Api> {
    if method != "POST" {
        return None;
    }
    let path = target.split('?').next().unwrap_or("");
    let segs: Vec<&str> = path.split('/').collect();
    Some(match segs.as_slice() {
        ["", "v3", "mail", "send"] => Api::Sendgrid,
        ["", "v3", _domain, "messages.mime"] => Api::Mailgun,
        ["", "email"] => Api::Postmark,
        ["", "v2", "email", "outbound-emails"] => Api::Ses,
        ["", "emails"] => Api::Resend,
        ["", "gmail", "v1", "users", _, "messages", "send"] => Api::Gmail,
        ["", "upload", "gmail", "v1", "users", _, "messages", "send"]
            if target.ends_with("?uploadType=media") =>
        {
            Api::Gmail
        }
        ["", "v1.0", "users", _, "sendMail"] | ["", "v1.0", "me", "sendMail"] => Api::Graph,
        _ => return None,
    })
}

type Answer = (u16, Vec<(&'static str, String)>, String);

fn answer(req: &mut Received, state: &Mutex<State>) -> Answer {
    let Some(api) = req.api else {
        return (404, vec![], r#"{"message":"no such route"}"#.into());
    };
    let bearer = format!("Bearer {ACCESS_TOKEN}");
    let key_bearer = format!("Bearer {API_KEY}");
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("api:{API_KEY}"))
    );
    let auth = req.header("authorization").unwrap_or("");
    req.authorized = match api {
        Api::Sendgrid | Api::Resend => auth == key_bearer,
        Api::Mailgun => auth == basic,
        Api::Postmark => req.header("x-postmark-server-token") == Some(API_KEY),
        Api::Gmail | Api::Graph => {
            let check = state.lock().unwrap().bearer_check.clone();
            auth == bearer
                || check.is_some_and(|c| auth.strip_prefix("Bearer ").is_some_and(|t| c(t)))
        }
        Api::Ses => sigv4_valid(req),
    };
    if !req.authorized {
        return (
            if api == Api::Ses { 403 } else { 401 },
            vec![],
            r#"{"message":"unauthorized"}"#.into(),
        );
    }
    let mut st = state.lock().unwrap();
    let fault = st.faults.get_mut(&api).and_then(|f| {
        if f.is_empty() {
            None
        } else {
            Some(f.remove(0))
        }
    });
    st.counter += 1;
    let n = st.counter;
    drop(st);
    match fault {
        Some(Fault::Throttle(secs)) => (
            429,
            vec![("Retry-After", secs.to_string())],
            r#"{"message":"Too many requests"}"#.into(),
        ),
        Some(Fault::Refuse) => refusal(api),
        None => {
            let (answer, id) = success(api, n);
            req.answered_id = id;
            answer
        }
    }
}

/// Each API's documented error answer for a request it refuses.
fn refusal(api: Api) -> Answer {
    let (status, body) = match api {
        Api::Sendgrid => (
            400,
            r#"{"errors":[{"message":"The from address does not match a verified Sender Identity.","field":"from","help":null}]}"#,
        ),
        Api::Mailgun => (400, r#"{"message":"Domain not found: example.com"}"#),
        Api::Postmark => (
            422,
            r#"{"ErrorCode":300,"Message":"Invalid 'To' address: 'user@example.com'."}"#,
        ),
        Api::Ses => (
            400,
            r#"{"message":"Email address is not verified. The following identities failed the check: noreply@company.com"}"#,
        ),
        Api::Resend => (
            422,
            r#"{"statusCode":422,"name":"validation_error","message":"Invalid `from` field."}"#,
        ),
        Api::Gmail => (
            400,
            r#"{"error":{"code":400,"message":"Invalid To header","status":"INVALID_ARGUMENT"}}"#,
        ),
        Api::Graph => (
            400,
            r#"{"error":{"code":"ErrorInvalidRecipients","message":"At least one recipient is not valid."}}"#,
        ),
    };
    (status, vec![], body.into())
}

/// Each API's success answer, and the id it gives.
fn success(api: Api, n: u32) -> (Answer, Option<String>) {
    let id = match api {
        Api::Sendgrid => format!("sg-{n}"),
        Api::Mailgun => format!("mg-{n}@mg.example.com"),
        Api::Postmark => format!("pm-{n}"),
        Api::Ses => format!("ses-{n}"),
        Api::Resend => format!("rs-{n}"),
        Api::Gmail => format!("gm-{n}"),
        Api::Graph => return ((202, vec![], String::new()), None),
    };
    let answer = match api {
        Api::Sendgrid => (
            202,
            vec![("X-Message-Id", format!("sg-{n}"))],
            String::new(),
        ),
        Api::Mailgun => (
            200,
            vec![],
            format!(r#"{{"id":"<mg-{n}@mg.example.com>","message":"Queued. Thank you."}}"#),
        ),
        Api::Postmark => (
            200,
            vec![],
            format!(
                r#"{{"To":"user@example.com","SubmittedAt":"2026-01-01T00:00:00Z","MessageID":"pm-{n}","ErrorCode":0,"Message":"OK"}}"#
            ),
        ),
        Api::Ses => (200, vec![], format!(r#"{{"MessageId":"ses-{n}"}}"#)),
        Api::Resend => (200, vec![], format!(r#"{{"id":"rs-{n}"}}"#)),
        Api::Gmail => (
            200,
            vec![],
            format!(r#"{{"id":"gm-{n}","threadId":"th-{n}","labelIds":["SENT"]}}"#),
        ),
        Api::Graph => (202, vec![], String::new()),
    };
    (answer, Some(id))
}

/// Verifies the request's SigV4 `Authorization` (service `ses`, `AWS_REGION`) against
/// `AWS_SECRET`, recomputing it from what arrived, as AWS documents the algorithm.
fn sigv4_valid(req: &Received) -> bool {
    let Some(auth) = req.header("authorization") else {
        return false;
    };
    let Some(rest) = auth.strip_prefix("AWS4-HMAC-SHA256 ") else {
        return false;
    };
    let mut credential = "";
    let mut signed_headers = "";
    let mut signature = "";
    for part in rest.split(", ") {
        match part.split_once('=') {
            Some(("Credential", v)) => credential = v,
            Some(("SignedHeaders", v)) => signed_headers = v,
            Some(("Signature", v)) => signature = v,
            _ => return false,
        }
    }
    let Some(amz_date) = req.header("x-amz-date") else {
        return false;
    };
    let date = &amz_date[..8.min(amz_date.len())];
    let scope = format!("{date}/{AWS_REGION}/ses/aws4_request");
    if credential != format!("{AWS_ACCESS_KEY_ID}/{scope}") {
        return false;
    }
    let names: Vec<&str> = signed_headers.split(';').collect();
    if !names.contains(&"host") || !names.contains(&"x-amz-date") {
        return false;
    }
    let mut canonical_headers = String::new();
    for name in &names {
        let Some(v) = req.header(name) else {
            return false;
        };
        canonical_headers.push_str(&format!("{name}:{}\n", v.trim()));
    }
    let (path, query) = req.target.split_once('?').unwrap_or((&req.target, ""));
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let creq = format!(
        "{}\n{path}\n{query}\n{canonical_headers}\n{signed_headers}\n{}",
        req.method,
        hex(digest::digest(&digest::SHA256, &req.body).as_ref())
    );
    let sts = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        hex(digest::digest(&digest::SHA256, creq.as_bytes()).as_ref())
    );
    let mac = |k: &[u8], d: &[u8]| {
        hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, k), d)
            .as_ref()
            .to_vec()
    };
    let mut key = mac(format!("AWS4{AWS_SECRET}").as_bytes(), date.as_bytes());
    for p in [AWS_REGION, "ses", "aws4_request"] {
        key = mac(&key, p.as_bytes());
    }
    hex(&mac(&key, sts.as_bytes())) == signature
}

/// Waits until `n` requests to `api` were answered `status`.
pub async fn wait_answered(server: &ApiServer, api: Api, status: u16, n: usize, timeout: Duration) {
    let start = std::time::Instant::now();
    while server
        .received_by(api)
        .iter()
        .filter(|r| r.status == status)
        .count()
        < n
    {
        assert!(
            start.elapsed() < timeout,
            "{api:?}: fewer than {n} requests answered {status}: {:?}",
            server
                .received_by(api)
                .iter()
                .map(|r| r.status)
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
