//! What every HTTP API kind shares: one pooled reqwest client per provider (keep-alive,
//! at most `max_connections` requests at once, connecting bounded by `CONNECT_TIMEOUT` and a
//! whole request by `[outbound] send_timeout`, no redirects), the mapping of an answer to an
//! outcome (2xx is success; any other status is [`SendError::Http`] with the API's own error
//! text and its `Retry-After`), network failures as transient [`SendError::Connect`] /
//! [`SendError::Timeout`], and the credential rule: a 401/403 is told to the credential
//! ([`Credential::refused`]) and the request is made once more when the credential can bring
//! a fresh secret ([`Credential::renews`]).
//!
//! Request bodies of large emails (base64 of the MIME message, JSON with attachments) are
//! built on the blocking pool, not on the actors' thread ([`build_off_thread`]).

use std::time::Duration;

use base64::Engine;
use reqwest::header::{HeaderMap, HeaderValue};
use time::OffsetDateTime;
use tokio::sync::{watch, Semaphore};

use super::{Fingerprint, ParseContext, SendError, TransportContext};
use crate::credentials::Credential;
use crate::outbound::OutgoingEmail;
use crate::settings::Secret;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// An idle pooled connection is closed after this long (APIs drop idle clients too).
const IDLE_MAX: Duration = Duration::from_secs(20);
/// The most of an answer's body that is read (ids and error texts are short).
const MAX_ANSWER: usize = 64 * 1024;
/// The longest error text kept from an answer.
const MAX_REPLY: usize = 500;
/// The longest wait a `Retry-After` or rate-limit reset may ask for.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

pub const BASE64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;
pub const BASE64URL: base64::engine::GeneralPurpose =
    base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// How a request carries the credential's secret.
#[derive(Debug, Clone, Copy)]
pub enum Auth<'a> {
    /// `Authorization: Bearer <secret>`.
    Bearer,
    /// `Authorization: Basic base64(user:secret)`.
    Basic(&'a str),
    /// The secret as the value of a header of the API's own.
    Header(&'static str),
}

/// One request to an API.
pub struct ApiRequest<'a> {
    pub url: String,
    pub content_type: String,
    /// Headers beyond the authorization and the content type (already signed ones, say).
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
    /// Where the secret comes from and how it is sent; `None` for a request that is signed.
    pub credential: Option<(&'a Credential, Auth<'a>)>,
}

/// Signs a request body: the headers that carry the signature.
pub type Signer<'a> = dyn Fn(&[u8]) -> Vec<(&'static str, String)> + 'a;

/// A successful (2xx) answer, its body read up to `MAX_ANSWER`.
#[derive(Debug)]
pub struct ApiAnswer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl ApiAnswer {
    /// A string field of the JSON body's top-level object.
    pub fn json_str(&self, key: &str) -> Option<String> {
        let v: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        v.get(key)?.as_str().map(str::to_string)
    }

    /// A header's value, when it is visible ASCII.
    pub fn header(&self, name: &str) -> Option<String> {
        let v = self.headers.get(name)?.to_str().ok()?.trim();
        (!v.is_empty()).then(|| v.to_string())
    }
}

/// The client of one provider.
pub struct HttpApi {
    client: reqwest::Client,
    /// What errors name (the API's origin; never a secret).
    pub endpoint: String,
    slots: Semaphore,
    send_timeout: Duration,
    aborted: (watch::Sender<bool>, watch::Receiver<bool>),
}

impl HttpApi {
    pub fn new(endpoint: &str, ctx: &TransportContext) -> Result<Self, SendError> {
        let client = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(ctx.send_timeout)
            .pool_idle_timeout(IDLE_MAX)
            .pool_max_idle_per_host(ctx.max_connections as usize)
            .tcp_nodelay(true)
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("mailbridge/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| SendError::Config(format!("HTTP client: {e}")))?;
        Ok(Self {
            client,
            endpoint: endpoint.to_string(),
            slots: Semaphore::new(ctx.max_connections.max(1) as usize),
            send_timeout: ctx.send_timeout,
            aborted: watch::channel(false),
        })
    }

    /// Nothing new starts from now on.
    pub fn abort(&self) {
        let _ = self.aborted.0.send(true);
    }

    /// Makes the request; a 401/403 with a credential that renews is made once more with
    /// its fresh secret.
    pub async fn post(&self, req: ApiRequest<'_>) -> Result<ApiAnswer, SendError> {
        self.post_with(req, None).await
    }

    /// Makes a request that `sign` signs (its headers for the body, SES's SigV4) once it has
    /// its connection slot: a signature does not age while the request waits for one.
    pub async fn post_signed(
        &self,
        req: ApiRequest<'_>,
        sign: &Signer<'_>,
    ) -> Result<ApiAnswer, SendError> {
        self.post_with(req, Some(sign)).await
    }

    async fn post_with(
        &self,
        req: ApiRequest<'_>,
        sign: Option<&Signer<'_>>,
    ) -> Result<ApiAnswer, SendError> {
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| SendError::Unavailable)?;
        let renews = req.credential.is_some_and(|(c, _)| c.renews());
        let mut body = Some(req.body);
        for attempt in 0..2 {
            if *self.aborted.1.borrow() {
                return Err(SendError::ShuttingDown);
            }
            let this_body = if renews && attempt == 0 {
                body.clone().unwrap_or_default()
            } else {
                body.take().unwrap_or_default()
            };
            let mut rb = self
                .client
                .post(&req.url)
                .header(reqwest::header::CONTENT_TYPE, &req.content_type);
            for (name, value) in &req.headers {
                rb = rb.header(*name, value);
            }
            if let Some(sign) = sign {
                for (name, value) in sign(&this_body) {
                    let mut value = HeaderValue::from_str(&value).map_err(|_| {
                        SendError::Config(format!("the signed header {name} cannot be sent"))
                    })?;
                    value.set_sensitive(matches!(name, "authorization" | "x-amz-security-token"));
                    rb = rb.header(name, value);
                }
            }
            let mut token = None;
            if let Some((credential, auth)) = req.credential {
                let secret = credential.token().await?;
                let (name, value) = auth_header(auth, &secret)?;
                rb = rb.header(name, value);
                token = Some(secret);
            }
            let answer = self.exchange(rb.body(this_body)).await?;
            if (200..300).contains(&answer.status) {
                return Ok(answer);
            }
            if matches!(answer.status, 401 | 403)
                && attempt == 0
                && renews
                && !throttling(&answer.body)
            {
                if let (Some((credential, _)), Some(token)) = (req.credential, &token) {
                    credential.refused(token);
                    continue;
                }
            }
            return Err(self.refusal(&answer));
        }
        Err(SendError::Unavailable)
    }

    async fn exchange(&self, rb: reqwest::RequestBuilder) -> Result<ApiAnswer, SendError> {
        let mut resp = rb.send().await.map_err(|e| self.network(&e, "sending"))?;
        let status = resp.status().as_u16();
        let headers = std::mem::take(resp.headers_mut());
        let mut body = Vec::new();
        while body.len() < MAX_ANSWER {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    let room = MAX_ANSWER - body.len();
                    body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                }
                Ok(None) => break,
                // The status is what counts: a 2xx cut short was still accepted (it would be
                // sent twice if it were retried), an error only loses detail.
                Err(e) => {
                    tracing::warn!(endpoint = %self.endpoint, status, "answer cut short: {e}");
                    break;
                }
            }
        }
        Ok(ApiAnswer {
            status,
            headers,
            body,
        })
    }

    /// A request that failed without an answer. Failing to connect is certain (nothing was
    /// sent); anything later — a timeout, the connection lost — may have followed a request
    /// the API received and carried out, so it is uncertain: retried by the schedule and
    /// recorded as possibly sent (Resend's idempotency key makes its retry harmless).
    fn network(&self, e: &reqwest::Error, during: &'static str) -> SendError {
        if e.is_connect() {
            if e.is_timeout() {
                return SendError::Timeout {
                    endpoint: self.endpoint.clone(),
                    timeout: CONNECT_TIMEOUT,
                    during: "connecting",
                };
            }
            return SendError::Connect {
                endpoint: self.endpoint.clone(),
                detail: crate::domain::error_chain(e),
            };
        }
        let detail = if e.is_timeout() {
            format!("no answer within {:?} ({during})", self.send_timeout)
        } else {
            format!("{during}: {}", crate::domain::error_chain(e))
        };
        SendError::Uncertain {
            endpoint: self.endpoint.clone(),
            detail,
        }
    }

    /// A non-success answer as an outcome.
    pub fn refusal(&self, answer: &ApiAnswer) -> SendError {
        SendError::Http {
            endpoint: self.endpoint.clone(),
            status: answer.status,
            reply: error_text(answer.status, &answer.body),
            retry_after: retry_after(&answer.headers, OffsetDateTime::now_utc()),
            throttled: throttling(&answer.body),
        }
    }
}

/// The reasons and codes by which the supported APIs say "slow down" or "busy" in an answer
/// whose status alone would read as a refusal: Google's 403 usage limits, Resend's 409 for
/// the same idempotency key still in progress, SES's throttling codes.
const THROTTLING: &[&str] = &[
    "rateLimitExceeded",
    "userRateLimitExceeded",
    "dailyLimitExceeded",
    "quotaExceeded",
    "RESOURCE_EXHAUSTED",
    "concurrent_idempotent_requests",
    "TooManyRequestsException",
    "Throttling",
    "ThrottlingException",
];

/// Whether an error answer's JSON names a throttling reason (as a `reason`, `status`,
/// `code`, `name` or `__type` anywhere in it, bounded in depth).
pub fn throttling(body: &[u8]) -> bool {
    fn walk(v: &serde_json::Value, depth: usize) -> bool {
        if depth > 6 {
            return false;
        }
        match v {
            serde_json::Value::Object(map) => map.iter().any(|(k, v)| {
                (matches!(k.as_str(), "reason" | "status" | "code" | "name" | "__type")
                    && v.as_str().is_some_and(|s| THROTTLING.contains(&s)))
                    || walk(v, depth + 1)
            }),
            serde_json::Value::Array(items) => items.iter().take(32).any(|v| walk(v, depth + 1)),
            _ => false,
        }
    }
    serde_json::from_slice::<serde_json::Value>(body).is_ok_and(|v| walk(&v, 0))
}

/// The authorization header for `secret`, marked sensitive (never in reqwest's `Debug`).
fn auth_header(auth: Auth, secret: &Secret) -> Result<(&'static str, HeaderValue), SendError> {
    let (name, text) = match auth {
        Auth::Bearer => ("authorization", format!("Bearer {}", secret.expose())),
        Auth::Basic(user) => (
            "authorization",
            format!(
                "Basic {}",
                BASE64.encode(format!("{user}:{}", secret.expose()))
            ),
        ),
        Auth::Header(name) => (name, secret.expose().to_string()),
    };
    let mut value = HeaderValue::from_str(&text).map_err(|_| {
        SendError::Config("the API key or token contains characters a header cannot carry".into())
    })?;
    value.set_sensitive(true);
    Ok((name, value))
}

/// Builds a request body from `email`: on the blocking pool for a large email, so that
/// base64 and JSON of megabytes do not hold up the actors' thread.
pub async fn build_off_thread<T, F>(
    email: &std::sync::Arc<OutgoingEmail>,
    build: F,
) -> Result<T, SendError>
where
    T: Send + 'static,
    F: FnOnce(&OutgoingEmail) -> T + Send + 'static,
{
    if email.bytes.len() < crate::outbound::OFF_THREAD_BYTES {
        return Ok(build(email));
    }
    // Shared, not copied: the blocking task reads the same email.
    let email = std::sync::Arc::clone(email);
    tokio::task::spawn_blocking(move || build(&email))
        .await
        .map_err(|e| SendError::Config(format!("building the request failed: {e}")))
}

/// The MIME message with a `Bcc:` header for the blind recipients, for the APIs that take
/// the recipients from the message's headers (Gmail, Microsoft Graph; both remove the header
/// before delivery). The message as built has no Bcc header: SMTP gives Bcc in the envelope.
pub fn mime_with_bcc(email: &OutgoingEmail) -> Vec<u8> {
    let bcc = &email.parts.bcc;
    if bcc.is_empty() {
        return email.bytes.clone();
    }
    let list: Vec<String> = bcc.iter().map(|m| m.email.to_string()).collect();
    let header = format!("Bcc: {}\r\n", list.join(",\r\n "));
    let mut out = Vec::with_capacity(header.len() + email.bytes.len());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&email.bytes);
    out
}

/// `base_url` as given (without a trailing `/`), else the kind's default; a problem unless
/// it is an `http` or `https` URL.
pub fn base_url(ctx: &mut ParseContext, given: Option<String>, default: &str) -> String {
    let url = given.unwrap_or_else(|| default.to_string());
    match crate::settings::check_base_url(&url) {
        Ok(None) => {}
        Ok(Some(warning)) => ctx.warning("base_url", warning),
        Err(problem) => ctx.problem("base_url", problem),
    }
    url.trim_end_matches('/').to_string()
}

/// The table of a kind that takes only an API key and a base URL (`sendgrid`, `resend`).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyedFields {
    api_key: Option<Secret>,
    api_key_env: Option<String>,
    api_key_file: Option<std::path::PathBuf>,
    base_url: Option<String>,
}

/// An API reached at `base_url` with an API key: the whole configuration of the kinds whose
/// table is only that.
#[derive(Debug, Clone)]
pub struct KeyedApi {
    pub base_url: String,
    pub api_key: Secret,
}

impl KeyedApi {
    /// Reads the table of a provider of `kind` whose API defaults to `default_base_url`.
    pub fn parse(
        table: toml::Table,
        ctx: &mut ParseContext,
        kind: &str,
        default_base_url: &str,
    ) -> Option<Self> {
        let f: KeyedFields = ctx.fields(table)?;
        let base_url = base_url(ctx, f.base_url, default_base_url);
        let api_key = required_secret(
            ctx,
            kind,
            "api_key",
            f.api_key,
            f.api_key_env,
            f.api_key_file,
        )?;
        Some(Self { base_url, api_key })
    }

    pub fn fingerprint(&self, h: &mut Fingerprint) {
        h.add(&self.base_url).secret(Some(&self.api_key));
    }

    pub fn mirror(&self) -> super::Mirror {
        super::Mirror {
            host: host_of(&self.base_url),
            ..super::Mirror::default()
        }
    }

    pub fn credential(&self) -> Credential {
        Credential::Static(self.api_key.clone())
    }
}

/// The host of a base URL, for the mirror table.
pub fn host_of(base_url: &str) -> Option<String> {
    url::Url::parse(base_url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
}

/// The secret a kind needs, or a problem naming its keys.
pub fn required_secret(
    ctx: &mut ParseContext,
    kind: &str,
    name: &str,
    inline: Option<Secret>,
    from_env: Option<String>,
    from_file: Option<std::path::PathBuf>,
) -> Option<Secret> {
    let given = inline.is_some() || from_env.is_some() || from_file.is_some();
    let secret = ctx.secret(name, inline, from_env, from_file);
    if !given {
        ctx.problem(
            name,
            format!("a provider of kind \"{kind}\" needs `{name}`, `{name}_env` or `{name}_file`"),
        );
    }
    match secret {
        Some(s) if s.expose().trim().is_empty() => {
            ctx.problem(name, format!("`{name}` is empty"));
            None
        }
        other => other,
    }
}

/// Where a kind that authenticates with a bearer token (`gmail_api`, `ms_graph`) gets it: a
/// static `access_token` (`_env`, `_file`) or an OAuth2 account (`[providers.oauth2]`),
/// exactly one of them.
#[derive(Debug, Clone)]
pub enum Bearer {
    Static(Secret),
    OAuth2(crate::oauth2::OAuth2Config),
}

impl Bearer {
    /// Reads `access_token*` and the `oauth2` table of a provider of `kind`.
    pub fn parse(
        ctx: &mut ParseContext,
        kind: &str,
        access_token: (Option<Secret>, Option<String>, Option<std::path::PathBuf>),
        oauth2: Option<toml::Table>,
    ) -> Option<Bearer> {
        let (inline, env, file) = access_token;
        let static_given = inline.is_some() || env.is_some() || file.is_some();
        match oauth2 {
            Some(_) if static_given => {
                ctx.problem(
                    "oauth2",
                    "give either an `oauth2` account or `access_token` (`_env`, `_file`), not both",
                );
                None
            }
            Some(table) => crate::oauth2::OAuth2Config::parse(table, &mut ctx.nested("oauth2"))
                .map(Bearer::OAuth2),
            None => {
                required_secret(ctx, kind, "access_token", inline, env, file).map(Bearer::Static)
            }
        }
    }

    pub fn fingerprint(&self, h: &mut Fingerprint) {
        match self {
            Bearer::Static(s) => {
                h.add(&"static").secret(Some(s));
            }
            Bearer::OAuth2(o) => {
                h.add(&"oauth2");
                o.fingerprint(h);
            }
        }
    }

    /// The credential the transport asks for tokens: the provider's OAuth2 account
    /// (`provider:<id>`, shared with its restarts) or the static token.
    pub fn credential(&self, ctx: &TransportContext) -> Credential {
        match self {
            Bearer::Static(s) => Credential::Static(s.clone()),
            Bearer::OAuth2(o) => Credential::OAuth2(ctx.accounts.for_provider(&ctx.provider_id, o)),
        }
    }
}

/// The API's own error text from an error answer's body: the message fields of the JSON
/// error shapes the supported APIs use (`errors[].message`, `error.message`, `ErrorCode` +
/// `Message`, `message`), else the body's text; bounded, one line, never empty.
pub fn error_text(status: u16, body: &[u8]) -> String {
    let from_json = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| json_error(&v));
    let text = match from_json {
        Some(t) => t,
        None => String::from_utf8_lossy(body).into_owned(),
    };
    let text = one_line(&text, MAX_REPLY);
    if text.is_empty() {
        reqwest::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("no error text")
            .to_string()
    } else {
        text
    }
}

fn json_error(v: &serde_json::Value) -> Option<String> {
    let s = |v: Option<&serde_json::Value>| -> Option<String> {
        match v? {
            serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
            serde_json::Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    };
    // SendGrid: {"errors": [{"message", "field"}]}
    if let Some(errors) = v.get("errors").and_then(|e| e.as_array()) {
        let messages: Vec<String> = errors
            .iter()
            .take(5)
            .filter_map(|e| {
                let m = s(e.get("message"))?;
                Some(match s(e.get("field")) {
                    Some(f) => format!("{f}: {m}"),
                    None => m,
                })
            })
            .collect();
        if !messages.is_empty() {
            return Some(messages.join("; "));
        }
    }
    // Google, Microsoft Graph: {"error": {"code", "message", "status"}}; OAuth-style
    // {"error": "…", "error_description": "…"}.
    match v.get("error") {
        Some(serde_json::Value::Object(e)) => {
            if let Some(m) = s(e.get("message")) {
                return Some(match s(e.get("status")).or_else(|| s(e.get("code"))) {
                    Some(code) => format!("{code}: {m}"),
                    None => m,
                });
            }
        }
        Some(serde_json::Value::String(code)) => {
            return Some(match s(v.get("error_description")) {
                Some(d) => format!("{code}: {d}"),
                None => code.clone(),
            });
        }
        _ => {}
    }
    // Postmark: {"ErrorCode": 300, "Message": "…"}
    if let (Some(code), Some(m)) = (s(v.get("ErrorCode")), s(v.get("Message"))) {
        return Some(format!("ErrorCode {code}: {m}"));
    }
    // Mailgun, Resend, SES: {"message": "…"} (Resend adds "name", SES "__type"/"Type").
    let message = s(v.get("message")).or_else(|| s(v.get("Message")))?;
    Some(
        match s(v.get("name"))
            .or_else(|| s(v.get("__type")))
            .or_else(|| s(v.get("Type")))
        {
            Some(name) => format!("{name}: {message}"),
            None => message,
        },
    )
}

/// `text` on one line (control characters as spaces, runs of spaces as one), at most `max`
/// bytes, cut on a character boundary.
fn one_line(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max) + 4);
    for c in text.chars() {
        let c = if c.is_control() { ' ' } else { c };
        if c == ' ' && (out.is_empty() || out.ends_with(' ')) {
            continue;
        }
        if out.len() + c.len_utf8() > max {
            out.push('…');
            return out;
        }
        out.push(c);
    }
    out.trim_end().to_string()
}

/// How long the API asked to wait: `Retry-After` (seconds or an HTTP-date), else a rate-limit
/// reset header (`X-RateLimit-Reset`, `RateLimit-Reset`: seconds from now, or a Unix time
/// when it is that large); at most a day.
pub fn retry_after(headers: &HeaderMap, now: OffsetDateTime) -> Option<Duration> {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(v) = get("retry-after") {
        if let Some(d) = parse_retry_after(v, now) {
            return Some(d);
        }
    }
    let reset = get("x-ratelimit-reset").or_else(|| get("ratelimit-reset"))?;
    let n: u64 = reset.trim().parse().ok()?;
    let d = if n > 1_000_000_000 {
        let now = u64::try_from(now.unix_timestamp()).unwrap_or(0);
        Duration::from_secs(n.saturating_sub(now))
    } else {
        Duration::from_secs(n)
    };
    Some(d.min(MAX_RETRY_AFTER))
}

/// A `Retry-After` value (RFC 9110 §10.2.3): delay-seconds, or an HTTP-date (IMF-fixdate,
/// `Sun, 06 Nov 1994 08:49:37 GMT`) turned into the time left from `now` (zero if past).
pub fn parse_retry_after(value: &str, now: OffsetDateTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        let secs = value.parse::<u64>().unwrap_or(u64::MAX);
        return Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER));
    }
    let at = parse_http_date(value)?;
    let left = at - now;
    Some(if left.is_negative() {
        Duration::ZERO
    } else {
        Duration::try_from(left)
            .unwrap_or(MAX_RETRY_AFTER)
            .min(MAX_RETRY_AFTER)
    })
}

/// An HTTP-date in any of RFC 9110's three forms: IMF-fixdate (`Sun, 06 Nov 1994 08:49:37
/// GMT`), and the obsolete RFC 850 (`Sunday, 06-Nov-94 08:49:37 GMT`) and asctime (`Sun Nov  6
/// 08:49:37 1994`) forms recipients must still accept.
fn parse_http_date(value: &str) -> Option<OffsetDateTime> {
    let words: Vec<&str> = value.split_ascii_whitespace().collect();
    let (day, month, year, hms) = match words.as_slice() {
        [wd, day, month, year, hms, "GMT"] if wd.ends_with(',') => {
            (day.parse().ok()?, *month, year.parse().ok()?, *hms)
        }
        [wd, dmy, hms, "GMT"] if wd.ends_with(',') => {
            let mut parts = dmy.split('-');
            let (day, month, yy) = (parts.next()?, parts.next()?, parts.next()?);
            if parts.next().is_some() || yy.len() != 2 {
                return None;
            }
            // 70–99 are 19xx, the rest 20xx: RFC 9110's 50-year rule for any date sent
            // between 2020 and 2069.
            let yy: i32 = yy.parse().ok()?;
            let year = if yy < 70 { 2000 + yy } else { 1900 + yy };
            (day.parse().ok()?, month, year, *hms)
        }
        [_wd, month, day, hms, year] => (day.parse().ok()?, *month, year.parse().ok()?, *hms),
        _ => return None,
    };
    let month = match month {
        "Jan" => time::Month::January,
        "Feb" => time::Month::February,
        "Mar" => time::Month::March,
        "Apr" => time::Month::April,
        "May" => time::Month::May,
        "Jun" => time::Month::June,
        "Jul" => time::Month::July,
        "Aug" => time::Month::August,
        "Sep" => time::Month::September,
        "Oct" => time::Month::October,
        "Nov" => time::Month::November,
        "Dec" => time::Month::December,
        _ => return None,
    };
    let mut parts = hms.split(':');
    let h: u8 = parts.next()?.parse().ok()?;
    let m: u8 = parts.next()?.parse().ok()?;
    let s: u8 = parts.next()?.parse().ok()?;
    if parts.next().is_some() {
        return None;
    }
    let date = time::Date::from_calendar_date(year, month, day).ok()?;
    let t = time::Time::from_hms(h, m, s).ok()?;
    Some(date.with_time(t).assume_utc())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::FailureClass;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use time::macros::datetime;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server that answers each connection's first request with `answer` (or never, when
    /// `None`), and counts the requests.
    async fn server(answer: Option<&'static str>) -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let count = Arc::new(AtomicUsize::new(0));
        let seen = count.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    let mut got = Vec::new();
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    seen.fetch_add(1, Ordering::SeqCst);
                    match answer {
                        Some(a) => {
                            let _ = s.write_all(a.as_bytes()).await;
                        }
                        None => tokio::time::sleep(Duration::from_secs(30)).await,
                    }
                });
            }
        });
        (url, count)
    }

    fn api(url: &str, timeout: Duration) -> HttpApi {
        HttpApi::new(
            url,
            &TransportContext {
                provider_id: "test".into(),
                accounts: std::sync::Arc::new(crate::oauth2::Accounts::new(
                    None,
                    std::env::temp_dir().join("mb-http-api-test-oauth2-key"),
                )),
                send_timeout: timeout,
                max_connections: 2,
            },
        )
        .unwrap()
    }

    fn request<'a>(url: &str, credential: &'a Credential) -> ApiRequest<'a> {
        ApiRequest {
            url: format!("{url}/send"),
            content_type: "application/json".into(),
            headers: Vec::new(),
            body: b"{}".to_vec(),
            credential: Some((credential, Auth::Bearer)),
        }
    }

    #[tokio::test]
    async fn answers_and_network_failures_become_outcomes() {
        let key = Credential::Static(Secret::new("key-hunter2"));

        let (url, _) = server(Some(
            "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\nContent-Length: 27\r\n\r\n{\"message\":\"down for now\"}",
        ))
        .await;
        let e = api(&url, Duration::from_secs(5))
            .post(request(&url, &key))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, SendError::Http { status: 503, reply, .. } if reply == "down for now"),
            "{e:?}"
        );
        assert_eq!(e.retry_after(), Some(Duration::from_secs(5)));
        assert_eq!(e.class(), FailureClass::Transient);

        // A static key refused: told once, not retried; permanent.
        let (url, count) = server(Some(
            "HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n",
        ))
        .await;
        let e = api(&url, Duration::from_secs(5))
            .post(request(&url, &key))
            .await
            .unwrap_err();
        assert!(matches!(e, SendError::Http { status: 401, .. }), "{e:?}");
        assert_eq!(e.class(), FailureClass::Permanent);
        assert_eq!(count.load(Ordering::SeqCst), 1);
        assert!(!format!("{e:?} {e}").contains("hunter2"));

        // Success with its body.
        let (url, _) = server(Some(
            "HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{\"id\":\"x1\"}",
        ))
        .await;
        let a = api(&url, Duration::from_secs(5))
            .post(request(&url, &key))
            .await
            .unwrap();
        assert_eq!(a.json_str("id").as_deref(), Some("x1"));

        // No answer: a timeout after the request was sent, transient and uncertain.
        let (url, _) = server(None).await;
        let e = api(&url, Duration::from_millis(300))
            .post(request(&url, &key))
            .await
            .unwrap_err();
        assert!(matches!(e, SendError::Uncertain { .. }), "{e:?}");
        assert!(e.is_uncertain());
        assert_eq!(e.class(), FailureClass::Transient);

        // Nobody listening: cannot connect, transient.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let url = format!("http://127.0.0.1:{port}");
        let e = api(&url, Duration::from_secs(5))
            .post(request(&url, &key))
            .await
            .unwrap_err();
        assert!(matches!(e, SendError::Connect { .. }), "{e:?}");
        assert_eq!(e.class(), FailureClass::Transient);

        // Aborted: nothing new starts.
        let a = api(&url, Duration::from_secs(5));
        a.abort();
        let e = a.post(request(&url, &key)).await.unwrap_err();
        assert!(matches!(e, SendError::ShuttingDown), "{e:?}");
    }

    #[test]
    fn throttling_in_the_body_is_transient_whatever_the_status() {
        let gmail = br#"{"error":{"code":403,"message":"User-rate limit exceeded","errors":[{"domain":"usageLimits","reason":"userRateLimitExceeded"}]}}"#;
        let resend = br#"{"statusCode":409,"name":"concurrent_idempotent_requests","message":"in progress"}"#;
        let refused = br#"{"error":{"code":403,"message":"Insufficient Permission","errors":[{"reason":"insufficientPermissions"}]}}"#;
        assert!(throttling(gmail));
        assert!(throttling(resend));
        assert!(!throttling(refused));
        assert!(!throttling(b"not json"));
        let e = |status, body: &[u8]| SendError::Http {
            endpoint: "x".into(),
            status,
            reply: error_text(status, body),
            retry_after: None,
            throttled: throttling(body),
        };
        assert_eq!(e(403, gmail).class(), FailureClass::Transient);
        assert!(!e(403, gmail).is_about_the_email());
        assert_eq!(e(409, resend).class(), FailureClass::Transient);
        assert_eq!(e(403, refused).class(), FailureClass::Permanent);
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now = datetime!(2015-10-21 07:27:00 UTC);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now),
            Some(Duration::from_secs(60))
        );
        // The obsolete forms.
        assert_eq!(
            parse_retry_after("Wednesday, 21-Oct-15 07:28:30 GMT", now),
            Some(Duration::from_secs(90))
        );
        assert_eq!(
            parse_retry_after("Wed Oct 21 07:29:00 2015", now),
            Some(Duration::from_secs(120))
        );
        // A date in the past: retry now.
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        // Huge values are capped, never overflow.
        assert_eq!(
            parse_retry_after("99999999999999999999999", now),
            Some(MAX_RETRY_AFTER)
        );
        for bad in [
            "",
            "-1",
            "1.5",
            "soon",
            "Wed, 21 Oct 2015 07:28:00 PST",
            "Wed, 32 Oct 2015 07:28:00 GMT",
            "Wed, 21 Foo 2015 07:28:00 GMT",
            "Wed 21 Oct 2015 07:28:00 GMT",
            "Wed, 21 Oct 2015 25:28:00 GMT",
            "Wed, 21 Oct 2015 07:28:00:00 GMT",
            "Wednesday, 21-Oct-2015 07:28:30 GMT",
            "Wed Oct 21 07:29:00",
        ] {
            assert_eq!(parse_retry_after(bad, now), None, "{bad:?}");
        }
    }

    #[test]
    fn retry_after_falls_back_to_rate_limit_resets() {
        let now = datetime!(2015-10-21 07:27:00 UTC);
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h, now), None);
        h.insert("x-ratelimit-reset", HeaderValue::from_static("30"));
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(30)));
        let at = now.unix_timestamp() + 45;
        h.insert(
            "x-ratelimit-reset",
            HeaderValue::from_str(&at.to_string()).unwrap(),
        );
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(45)));
        h.insert("retry-after", HeaderValue::from_static("7"));
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(7)));
    }

    #[test]
    fn error_text_reads_each_api_shape() {
        let cases: &[(&str, &str)] = &[
            (
                r#"{"errors":[{"message":"The from address does not match a verified Sender Identity.","field":"from","help":null}]}"#,
                "from: The from address does not match a verified Sender Identity.",
            ),
            (
                r#"{"ErrorCode":300,"Message":"Invalid 'From' address: 'x'."}"#,
                "ErrorCode 300: Invalid 'From' address: 'x'.",
            ),
            (
                r#"{"statusCode":422,"name":"validation_error","message":"Invalid `to` field."}"#,
                "validation_error: Invalid `to` field.",
            ),
            (
                r#"{"message":"Domain not found: example.com"}"#,
                "Domain not found: example.com",
            ),
            (
                r#"{"error":{"code":400,"message":"Invalid To header","status":"INVALID_ARGUMENT"}}"#,
                "INVALID_ARGUMENT: Invalid To header",
            ),
            (
                r#"{"error":{"code":"ErrorInvalidRecipients","message":"At least one recipient is not valid."}}"#,
                "ErrorInvalidRecipients: At least one recipient is not valid.",
            ),
            (
                r#"{"error":"invalid_token","error_description":"expired"}"#,
                "invalid_token: expired",
            ),
            ("Forbidden\r\n\r\n  by   policy", "Forbidden by policy"),
        ];
        for (body, want) in cases {
            assert_eq!(error_text(400, body.as_bytes()), *want, "{body}");
        }
        assert_eq!(error_text(429, b""), "Too Many Requests");
        assert_eq!(error_text(599, b"  \n"), "no error text");
        // JSON without a known field: the body itself.
        assert_eq!(error_text(400, br#"{"x":1}"#), r#"{"x":1}"#);
        // Not UTF-8, huge: bounded, no panic.
        let big = [0xffu8; 100_000];
        let t = error_text(500, &big);
        assert!(t.len() <= MAX_REPLY + '…'.len_utf8(), "{}", t.len());
        let long = "é".repeat(10_000);
        let t = error_text(500, long.as_bytes());
        assert!(t.ends_with('…') && t.len() <= MAX_REPLY + 3);
    }
}
