//! Outbound domain: the `email.send` request, its validation, the email built from it, the
//! results published for it, and how a failure is classified. No I/O happens here.
//!
//! A request is decoded strictly into [`SendRequest`] (types and required fields checked,
//! unknown fields ignored so CRMs can add their own), then [`SendRequest::validate`] checks
//! what serde cannot: addresses, CR/LF anywhere a header is made from, custom header names,
//! attachment URLs. Every refusal is a [`RequestError`] naming the field and the reason.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use lettre::address::Envelope;
use lettre::message::header::{ContentTransferEncoding, ContentType, HeaderName, HeaderValue};
use lettre::message::{Attachment, Body, Mailbox, MultiPart, SinglePart};
use lettre::{Address, Message};
use serde::{Deserialize, Deserializer, Serialize};

use crate::mime::text_body;

/// A request body, an email or an API request larger than this is decoded or built on the
/// blocking pool, not on the actors' thread.
pub const OFF_THREAD_BYTES: usize = 64 * 1024;

/// `body_format` of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    Html,
    Text,
}

impl<'de> Deserialize<'de> for BodyFormat {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.to_ascii_uppercase().as_str() {
            "HTML" => Ok(BodyFormat::Html),
            "TEXT" => Ok(BodyFormat::Text),
            _ => Err(serde::de::Error::custom(format!(
                "`{s}` is not \"HTML\" or \"TEXT\""
            ))),
        }
    }
}

/// One attachment of a request: fetched from `url` when the email is built.
#[derive(Debug, Clone, Deserialize)]
pub struct AttachmentRef {
    pub filename: String,
    pub url: String,
    pub mime_type: String,
}

fn null_as_empty<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

fn null_as_empty_map<'de, D>(d: D) -> Result<BTreeMap<String, String>, D::Error>
where
    D: Deserializer<'de>,
{
    Ok(Option::<BTreeMap<String, String>>::deserialize(d)?.unwrap_or_default())
}

/// The guide's `email.send` message.
#[derive(Debug, Clone, Deserialize)]
pub struct SendRequest {
    pub tenant_id: String,
    pub provider_id: String,
    #[serde(default)]
    pub user_id: Option<String>,
    pub message_id: String,
    pub from: String,
    pub to: Vec<String>,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub cc: Vec<String>,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub bcc: Vec<String>,
    #[serde(default)]
    pub subject: String,
    pub body_format: BodyFormat,
    pub body_content: String,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub attachments: Vec<AttachmentRef>,
    #[serde(default, deserialize_with = "null_as_empty_map")]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub template_id: Option<String>,
    #[serde(default)]
    pub campaign_id: Option<String>,
    #[serde(default)]
    pub timestamp: Option<String>,
}

/// How large a request may be; every limit is checked while decoding, before any costly
/// work, and a request over one is refused as `invalid` with the field and the limit named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_request_bytes: u64,
    pub max_body_bytes: u64,
    pub max_recipients: usize,
    pub max_attachments: usize,
    pub max_subject_bytes: usize,
    pub max_headers: usize,
    pub max_header_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        crate::settings::OutboundSection::default().limits()
    }
}

/// JSON nested deeper than this is refused before it is parsed.
pub const MAX_JSON_DEPTH: usize = 64;
/// Ids and the short optional fields (`user_id`, `template_id`, `campaign_id`): PostgreSQL
/// keys and AMQP short strings.
pub const MAX_ID_BYTES: usize = 255;
/// An attachment's file name and URL.
const MAX_FILENAME_BYTES: usize = 255;
const MAX_URL_BYTES: usize = 4096;

/// Why a request was refused before anything was sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("the message body is not JSON: {0}")]
    NotJson(String),
    #[error(
        "the request is {size} bytes, more than the {limit} allowed ([outbound] max_request_bytes)"
    )]
    TooLarge { size: usize, limit: u64 },
    #[error("field `{field}`: {reason}")]
    Invalid { field: String, reason: String },
}

impl RequestError {
    fn field(field: impl Into<String>, reason: impl Into<String>) -> Self {
        RequestError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// The identity of a request, as far as it can be read even when the request is invalid, so
/// its result and dead letter can still name it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestIds {
    pub tenant_id: Option<String>,
    pub message_id: Option<String>,
    pub provider_id: Option<String>,
}

/// A string field, or nothing when the field has another type (for [`RequestIds::peek`]).
fn lenient_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = Option<String>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("anything")
        }
        fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut a: A,
        ) -> Result<Self::Value, A::Error> {
            while a.next_element::<serde::de::IgnoredAny>()?.is_some() {}
            Ok(None)
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut a: A,
        ) -> Result<Self::Value, A::Error> {
            while a
                .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                .is_some()
            {}
            Ok(None)
        }
    }
    d.deserialize_any(V)
}

#[derive(Deserialize)]
struct PeekedIds {
    #[serde(default, deserialize_with = "lenient_string")]
    tenant_id: Option<String>,
    #[serde(default, deserialize_with = "lenient_string")]
    message_id: Option<String>,
    #[serde(default, deserialize_with = "lenient_string")]
    provider_id: Option<String>,
}

impl RequestIds {
    /// The ids of a body, without building a value of the rest (a large or deep request costs
    /// one pass and no allocation beyond the ids).
    pub fn peek(body: &[u8]) -> Self {
        if json_depth_exceeds(body, MAX_JSON_DEPTH) {
            return Self::default();
        }
        serde_json::from_slice::<PeekedIds>(body)
            .map(|p| Self {
                tenant_id: p.tenant_id,
                message_id: p.message_id,
                provider_id: p.provider_id,
            })
            .unwrap_or_default()
    }

    /// The ids of an already parsed request.
    pub fn of(value: &serde_json::Value) -> Self {
        let Some(map) = value.as_object() else {
            return Self::default();
        };
        let get = |k: &str| map.get(k).and_then(|v| v.as_str()).map(str::to_string);
        Self {
            tenant_id: get("tenant_id"),
            message_id: get("message_id"),
            provider_id: get("provider_id"),
        }
    }
}

/// Whether JSON `body` nests arrays and objects deeper than `max` (brackets inside strings do
/// not count). One pass, no allocation: it runs before anything parses the body.
pub fn json_depth_exceeds(body: &[u8], max: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in body {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Decodes a request body: JSON, the right types, every required field.
pub fn decode(body: &[u8]) -> Result<SendRequest, RequestError> {
    decode_with_ids(body, &Limits::default()).0
}

/// Decodes a request body, with the ids it names even when it is invalid. A body over the
/// size or depth limits is refused before it is parsed (its ids are still looked for). A
/// well-formed body is parsed once, straight into the request; only a body that fails is
/// parsed again as a JSON value, to name its ids and the path of what is wrong.
pub fn decode_with_ids(
    body: &[u8],
    limits: &Limits,
) -> (Result<SendRequest, RequestError>, RequestIds) {
    if body.len() as u64 > limits.max_request_bytes {
        let err = RequestError::TooLarge {
            size: body.len(),
            limit: limits.max_request_bytes,
        };
        return (Err(err), RequestIds::peek(body));
    }
    // JSON text is UTF-8 (RFC 8259): checked whole, so bytes in fields the decoder skips are
    // not let through either.
    if let Err(e) = std::str::from_utf8(body) {
        let err = RequestError::NotJson(format!(
            "it is not UTF-8 (invalid byte at offset {})",
            e.valid_up_to()
        ));
        return (Err(err), RequestIds::default());
    }
    if json_depth_exceeds(body, MAX_JSON_DEPTH) {
        let err = RequestError::field(
            "(request)",
            format!("is nested deeper than {MAX_JSON_DEPTH} levels"),
        );
        return (Err(err), RequestIds::default());
    }
    let first = match serde_json::from_slice::<SendRequest>(body) {
        Ok(request) => {
            let ids = RequestIds {
                tenant_id: Some(request.tenant_id.clone()),
                message_id: Some(request.message_id.clone()),
                provider_id: Some(request.provider_id.clone()),
            };
            return (Ok(request), ids);
        }
        Err(e) => e,
    };
    // Refused: decoded again, tracking the path, only to name the field that is wrong, and
    // looked at leniently for the ids the failure is reported under. (Never by parsing it
    // into a JSON value and decoding that: a value keeps only the last of duplicate keys,
    // and would accept what was refused.)
    if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(body) {
        // Not JSON at all (wherever the first decoding stopped).
        return (
            Err(RequestError::NotJson(e.to_string())),
            RequestIds::peek(body),
        );
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let error = match serde_path_to_error::deserialize::<_, SendRequest>(&mut de) {
        Err(e) => request_error(e),
        // Only what follows the request (trailing characters) failed the first decoding.
        Ok(_) => RequestError::NotJson(first.to_string()),
    };
    (Err(error), RequestIds::peek(body))
}

/// The refusal for a body serde could not decode: not JSON at all, or the field (its path)
/// and what is wrong with it.
fn request_error(e: serde_path_to_error::Error<serde_json::Error>) -> RequestError {
    let path = e.path().to_string();
    let inner = e.into_inner();
    // The body is JSON (checked before): a syntax error here is in a field's value (a string
    // with a broken escape), and is reported at that field.
    let text = without_position(&inner);
    // "missing field `to`" is reported at the parent; name the field itself.
    let field = match text.strip_prefix("missing field `") {
        Some(rest) => rest.trim_end_matches('`').to_string(),
        None if path == "." => "(request)".into(),
        None => path,
    };
    let reason = if text.starts_with("missing field") {
        "is required".to_string()
    } else {
        text
    };
    RequestError::field(field, reason)
}

/// serde_json's message without its " at line L column C" (the field path says where).
fn without_position(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    text.strip_suffix(&suffix).unwrap_or(&text).to_string()
}

/// Header names the service writes itself; a request may not set or override them.
const STRUCTURAL_HEADERS: &[&str] = &[
    "from",
    "sender",
    "to",
    "cc",
    "bcc",
    "subject",
    "date",
    "message-id",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "content-disposition",
    "content-id",
    "return-path",
    "received",
];

fn has_line_break(s: &str) -> bool {
    s.contains(['\r', '\n', '\0'])
}

/// A control character other than tab (C0, DEL, C1): none of them belongs in an id, an
/// address, a subject or a header, and NUL cannot be stored by PostgreSQL at all.
fn has_control(s: &str) -> bool {
    s.chars().any(|c| c != '\t' && c.is_control())
}

fn mailbox(field: &str, s: &str) -> Result<Mailbox, RequestError> {
    if has_line_break(s) {
        return Err(RequestError::field(field, "contains a line break"));
    }
    if has_control(s) {
        return Err(RequestError::field(field, "contains a control character"));
    }
    // With its header name and folding, one address stays within a 998-octet line.
    if s.len() > 900 {
        return Err(RequestError::field(field, "is longer than 900 bytes"));
    }
    let mailbox = Mailbox::from_str(s.trim()).map_err(|e| {
        RequestError::field(
            field,
            format!("`{}` is not an email address ({e})", preview(s)),
        )
    })?;
    // A quoted local part (`"a b"@example.com`) is legal but reaches servers and clients
    // differently (its escapes undone, its quotes dropped): the email could go to another
    // address than the one asked for.
    if mailbox.email.user().contains(['"', '\\']) {
        return Err(RequestError::field(
            field,
            format!(
                "`{}` has a quoted local part, which is not supported",
                preview(s)
            ),
        ));
    }
    Ok(mailbox)
}

/// The start of a value for an error message (a refused value may be megabytes long), with
/// control characters escaped (`\u{0}`) so they reach no log line or header raw.
fn preview(s: &str) -> String {
    const MAX: usize = 80;
    let mut out = String::with_capacity(s.len().min(MAX) + 8);
    for (i, c) in s.char_indices() {
        if i >= MAX {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

/// A request that passed validation, with its addresses parsed.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    pub request: SendRequest,
    pub from: Mailbox,
    pub to: Vec<Mailbox>,
    pub cc: Vec<Mailbox>,
    pub bcc: Vec<Mailbox>,
    pub headers: Vec<(HeaderName, String)>,
}

impl SendRequest {
    /// Checks what serde cannot, within `limits`. Everything that will be stored in
    /// PostgreSQL or written into a header is free of control characters (NUL included), so
    /// one bad request cannot fail a batch of others.
    pub fn validate(self, limits: &Limits) -> Result<ValidRequest, RequestError> {
        // The ids (required) and the short optional fields: PostgreSQL text, AMQP short
        // strings.
        let ids = [
            ("tenant_id", Some(&self.tenant_id), true),
            ("provider_id", Some(&self.provider_id), true),
            ("message_id", Some(&self.message_id), true),
            ("user_id", self.user_id.as_ref(), false),
            ("template_id", self.template_id.as_ref(), false),
            ("campaign_id", self.campaign_id.as_ref(), false),
        ];
        for (field, value, required) in ids {
            let Some(value) = value else { continue };
            if required && value.trim().is_empty() {
                return Err(RequestError::field(field, "must not be empty"));
            }
            if has_line_break(value) {
                return Err(RequestError::field(field, "contains a line break"));
            }
            if has_control(value) {
                return Err(RequestError::field(field, "contains a control character"));
            }
            if value.len() > MAX_ID_BYTES {
                return Err(RequestError::field(
                    field,
                    format!("is longer than {MAX_ID_BYTES} bytes"),
                ));
            }
        }
        if has_line_break(&self.subject) {
            return Err(RequestError::field(
                "subject",
                "contains a line break (CR or LF), which would inject headers",
            ));
        }
        if has_control(&self.subject) {
            return Err(RequestError::field(
                "subject",
                "contains a control character",
            ));
        }
        let recipients = self.to.len() + self.cc.len() + self.bcc.len();
        for (field, what, n, limit, key) in [
            (
                "subject",
                "bytes",
                self.subject.len(),
                limits.max_subject_bytes,
                "max_subject_bytes",
            ),
            (
                "body_content",
                "bytes",
                self.body_content.len(),
                usize::try_from(limits.max_body_bytes).unwrap_or(usize::MAX),
                "max_body_bytes",
            ),
            (
                "to",
                "recipients (to, cc and bcc together)",
                recipients,
                limits.max_recipients,
                "max_recipients",
            ),
            (
                "attachments",
                "attachments",
                self.attachments.len(),
                limits.max_attachments,
                "max_attachments",
            ),
            (
                "headers",
                "headers",
                self.headers.len(),
                limits.max_headers,
                "max_headers",
            ),
        ] {
            if n > limit {
                return Err(RequestError::field(
                    field,
                    format!("{n} {what}, more than the {limit} allowed ([outbound] {key})"),
                ));
            }
        }
        let from = mailbox("from", &self.from)?;
        if self.to.is_empty() {
            return Err(RequestError::field("to", "needs at least one recipient"));
        }
        let list = |name: &str, items: &[String]| -> Result<Vec<Mailbox>, RequestError> {
            items
                .iter()
                .enumerate()
                .map(|(i, s)| mailbox(&format!("{name}[{i}]"), s))
                .collect()
        };
        let to = list("to", &self.to)?;
        let cc = list("cc", &self.cc)?;
        let bcc = list("bcc", &self.bcc)?;
        let mut headers = Vec::new();
        for (name, value) in &self.headers {
            let field = format!("headers.{}", preview(name));
            if name.is_empty()
                || name.len() > 76
                || !name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
            {
                return Err(RequestError::field(
                    field,
                    "is not a valid header name (1 to 76 printable ASCII characters, no spaces or colons)",
                ));
            }
            if STRUCTURAL_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
                return Err(RequestError::field(
                    field,
                    "is set by the service and cannot be given in `headers`",
                ));
            }
            if has_line_break(value) {
                return Err(RequestError::field(
                    field,
                    "contains a line break (CR or LF), which would inject headers",
                ));
            }
            if has_control(value) {
                return Err(RequestError::field(field, "contains a control character"));
            }
            if value.len() > limits.max_header_bytes {
                return Err(RequestError::field(
                    field,
                    format!(
                        "is {} bytes, more than the {} allowed ([outbound] max_header_bytes)",
                        value.len(),
                        limits.max_header_bytes
                    ),
                ));
            }
            let hn = HeaderName::new_from_ascii(name.clone())
                .map_err(|_| RequestError::field(&field, "is not a valid header name"))?;
            headers.push((hn, value.clone()));
        }
        for (i, a) in self.attachments.iter().enumerate() {
            let field = |k: &str| format!("attachments[{i}].{k}");
            if a.filename.trim().is_empty()
                || has_control(&a.filename)
                || a.filename.len() > MAX_FILENAME_BYTES
            {
                return Err(RequestError::field(
                    field("filename"),
                    format!("must be a non-empty name of at most {MAX_FILENAME_BYTES} bytes without control characters"),
                ));
            }
            if a.url.len() > MAX_URL_BYTES {
                return Err(RequestError::field(
                    field("url"),
                    format!("is longer than {MAX_URL_BYTES} bytes"),
                ));
            }
            match url::Url::parse(&a.url) {
                Ok(u) if u.scheme() == "http" || u.scheme() == "https" => {}
                Ok(u) => {
                    return Err(RequestError::field(
                        field("url"),
                        format!("scheme `{}` is not allowed; use http or https", u.scheme()),
                    ))
                }
                Err(e) => {
                    return Err(RequestError::field(
                        field("url"),
                        format!("`{}` is not a URL ({e})", preview(&a.url)),
                    ))
                }
            }
            if a.mime_type.len() > MAX_FILENAME_BYTES
                || has_control(&a.mime_type)
                || ContentType::parse(&a.mime_type).is_err()
            {
                return Err(RequestError::field(
                    field("mime_type"),
                    format!("`{}` is not a MIME type", preview(&a.mime_type)),
                ));
            }
        }
        Ok(ValidRequest {
            request: self,
            from,
            to,
            cc,
            bcc,
            headers,
        })
    }
}

/// FNV-1a, for short stable tags (not for security).
fn fnv1a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The RFC 5322 Message-ID (without angle brackets) the service gives the email of a request:
/// derived from `message_id` and the tenant, so the same request always gets the same id and
/// a reply's In-Reply-To can be matched back to it (contract §4, §7).
pub fn rfc_message_id(tenant_id: &str, message_id: &str, from: &Address) -> String {
    let atext = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c);
    let left: String = if !message_id.is_empty() && message_id.chars().all(atext) {
        message_id.to_string()
    } else {
        format!("h{:016x}", fnv1a(message_id.as_bytes()))
    };
    format!(
        "{left}.{:08x}@{}",
        fnv1a(tenant_id.as_bytes()) as u32,
        from.domain()
    )
}

/// A plain-text rendering of an HTML body, for the text/plain alternative.
///
/// One pass over the bytes that copies text runs whole (this runs for every HTML email: the
/// first version, char by char with a `String` per tag and per line, was a tenth of the
/// service's CPU under load).
pub fn html_to_text(html: &str) -> String {
    let mut out = String::with_capacity(html.len());
    let mut skip_until: Option<&str> = None;
    let mut rest = html;
    while !rest.is_empty() {
        let stop = rest
            .bytes()
            .position(|b| b == b'<' || b == b'&')
            .unwrap_or(rest.len());
        if skip_until.is_none() {
            out.push_str(&rest[..stop]);
        }
        rest = &rest[stop..];
        if let Some(after) = rest.strip_prefix('<') {
            let (tag, next) = after.split_once('>').unwrap_or((after, ""));
            rest = next;
            let closing = tag.starts_with('/');
            let body = tag.trim_start_matches('/');
            let name = &body[..body
                .find(|c: char| !c.is_ascii_alphanumeric())
                .unwrap_or(body.len())];
            let is = |n: &str| name.eq_ignore_ascii_case(n);
            if let Some(end) = skip_until {
                if closing && is(end) {
                    skip_until = None;
                }
                continue;
            }
            if !closing {
                if let Some(end) = ["script", "style", "head"].into_iter().find(|n| is(n)) {
                    skip_until = Some(end);
                    continue;
                }
            }
            const BLOCKS: [&str; 13] = [
                "p",
                "div",
                "tr",
                "h1",
                "h2",
                "h3",
                "h4",
                "h5",
                "h6",
                "ul",
                "ol",
                "table",
                "blockquote",
            ];
            if is("br") || (closing && BLOCKS.into_iter().any(is)) {
                out.push('\n');
            } else if !closing && is("li") {
                out.push_str("\n- ");
            }
        } else if let Some(after) = rest.strip_prefix('&') {
            if skip_until.is_some() {
                rest = after;
                continue;
            }
            // An entity: the characters that start within its first 9 bytes, then `;`.
            let limit = after
                .char_indices()
                .find(|(i, _)| *i > 8)
                .map(|(i, _)| i)
                .unwrap_or(after.len());
            let ent_len = after[..limit].find(';').unwrap_or(limit);
            let ent = &after[..ent_len];
            let terminated = after[ent_len..].starts_with(';');
            rest = if terminated {
                &after[ent_len + 1..]
            } else {
                &after[ent_len..]
            };
            let decoded = match ent {
                _ if !terminated => None,
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" | "#39" => Some('\''),
                "nbsp" => Some(' '),
                e if e.starts_with("#x") => u32::from_str_radix(&e[2..], 16)
                    .ok()
                    .and_then(char::from_u32),
                e if e.starts_with('#') => e[1..].parse().ok().and_then(char::from_u32),
                _ => None,
            };
            match decoded {
                Some(d) => out.push(d),
                None => {
                    out.push('&');
                    out.push_str(ent);
                    if terminated {
                        out.push(';');
                    }
                }
            }
        }
    }
    collapse_whitespace(&out)
}

/// Runs of whitespace within a line become one space; runs of blank lines, one blank line;
/// the text is trimmed.
fn collapse_whitespace(s: &str) -> String {
    let mut text = String::with_capacity(s.len());
    let ascii = s.is_ascii();
    let mut blank = 0;
    for line in s.lines() {
        let before = text.len();
        if ascii {
            // `char::is_whitespace` on ASCII, without decoding UTF-8.
            let is_space = |b: u8| matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r');
            let bytes = line.as_bytes();
            let mut i = 0;
            while i < bytes.len() {
                while i < bytes.len() && is_space(bytes[i]) {
                    i += 1;
                }
                let start = i;
                while i < bytes.len() && !is_space(bytes[i]) {
                    i += 1;
                }
                if start < i {
                    if text.len() > before {
                        text.push(' ');
                    }
                    text.push_str(&line[start..i]);
                }
            }
        } else {
            for w in line.split_whitespace() {
                if text.len() > before {
                    text.push(' ');
                }
                text.push_str(w);
            }
        }
        if text.len() == before {
            blank += 1;
            if blank > 1 {
                continue;
            }
        } else {
            blank = 0;
        }
        text.push('\n');
    }
    let trimmed = text.trim();
    if trimmed.len() == text.len() {
        text
    } else {
        trimmed.to_string()
    }
}

/// An attachment's bytes, fetched.
#[derive(Debug, Clone)]
pub struct FetchedAttachment {
    pub filename: String,
    pub mime_type: String,
    pub bytes: Vec<u8>,
}

/// The email ready to hand to a provider: the finished MIME message for the kinds that take
/// one, and its parts for the HTTP APIs that take fields instead (SendGrid, Postmark, Resend).
#[derive(Debug, Clone)]
pub struct OutgoingEmail {
    pub envelope: Envelope,
    /// The formatted RFC 5322 message.
    pub bytes: Vec<u8>,
    /// Without angle brackets.
    pub rfc_message_id: String,
    /// What the message was built from.
    pub parts: EmailParts,
}

/// The parts an email was built from, as an API that takes fields wants them. The MIME
/// message and these say the same thing: the same addresses, subject, bodies (the text
/// alternative of an HTML body included), custom headers and attachment bytes.
#[derive(Debug, Clone)]
pub struct EmailParts {
    pub tenant_id: String,
    /// The request's `message_id` (not the RFC 5322 Message-ID).
    pub message_id: String,
    pub from: Mailbox,
    pub to: Vec<Mailbox>,
    pub cc: Vec<Mailbox>,
    pub bcc: Vec<Mailbox>,
    pub subject: String,
    /// The text body: the request's, or the text alternative of its HTML.
    pub text: String,
    pub html: Option<String>,
    /// The request's custom headers, by name as given.
    pub headers: Vec<(String, String)>,
    /// Empty unless the provider's kind takes fields (`ProviderConfig::wants_parts`).
    pub attachments: Vec<FetchedAttachment>,
}

/// A header as it goes on the wire, folded into lines of at most 78 characters where it has
/// spaces to fold at. lettre folds at spaces only, so a value with a word too long for a line
/// (a 5,000-character subject without spaces, say) — or with spacing or `=?` a reader would
/// not keep as it is — is written whole as RFC 2047 encoded words, which fold anywhere and decode to the same
/// text: no line ever exceeds RFC 5322's 998 octets.
fn header_value(name: HeaderName, value: &str) -> HeaderValue {
    const LONGEST_WORD: usize = 60;
    // Whitespace that folding or a reader would not keep as it is (leading, trailing,
    // repeated, tabs), and text a reader would take for an encoded word (`=?…?=`), are kept
    // as written by encoding them too.
    let plain = !value.starts_with(' ')
        && !value.ends_with(' ')
        && !value.contains("  ")
        && !value.contains('\t')
        && !value.contains("=?");
    if plain && value.split(' ').all(|w| w.len() <= LONGEST_WORD) {
        return HeaderValue::new(name, value.to_string());
    }
    let mut encoded = String::with_capacity(value.len() * 3 / 2 + 64);
    {
        let mut w = email_encoding::headers::writer::EmailWriter::new(
            &mut encoded,
            name.len() + 2,
            0,
            false,
        );
        // Writing into a String cannot fail.
        let _ = email_encoding::headers::rfc2047::encode(value, &mut w);
    }
    HeaderValue::dangerous_new_pre_encoded(name, value.to_string(), encoded)
}

/// The address headers a request fills.
#[derive(Debug, Clone, Copy)]
enum AddressHeader {
    To,
    Cc,
}

/// `To:` or `Cc:` with every address, encoded by lettre (display names as quoted strings or
/// encoded words) in one go — adding addresses one by one to lettre's builder re-encodes the
/// whole header each time, quadratic in the recipients — and folded between addresses, which
/// lettre does not do: a thousand recipients make many short lines, not one of 30,000 octets.
fn address_header(which: AddressHeader, list: &[Mailbox]) -> HeaderValue {
    let mailboxes = lettre::message::Mailboxes::from(list.to_vec());
    let mut headers = lettre::message::header::Headers::new();
    let name = match which {
        AddressHeader::To => {
            headers.set(lettre::message::header::To::from(mailboxes.clone()));
            "To"
        }
        AddressHeader::Cc => {
            headers.set(lettre::message::header::Cc::from(mailboxes.clone()));
            "Cc"
        }
    };
    let line = headers.to_string();
    let encoded = line
        .strip_prefix(name)
        .and_then(|l| l.strip_prefix(": "))
        .unwrap_or(&line)
        .trim_end_matches("\r\n");
    HeaderValue::dangerous_new_pre_encoded(
        HeaderName::new_from_ascii_str(name),
        mailboxes.to_string(),
        fold(encoded, name.len() + 2),
    )
}

/// Folds an encoded header value at its spaces (RFC 5322 §2.2.3: a CRLF before a space),
/// keeping lines within 78 characters where the words allow; `first` is the length of what
/// precedes the value on its first line. Existing folds are kept.
fn fold(value: &str, first: usize) -> String {
    const LINE: usize = 78;
    let mut out = String::with_capacity(value.len() + value.len() / 32);
    let mut len = first;
    for (i, line) in value.split("\r\n").enumerate() {
        if i > 0 {
            out.push_str("\r\n");
            len = 0;
        }
        for (j, word) in line.split(' ').enumerate() {
            if j > 0 {
                if len + 1 + word.len() > LINE && len > 1 {
                    out.push_str("\r\n ");
                    len = 1;
                } else {
                    out.push(' ');
                    len += 1;
                }
            }
            out.push_str(word);
            len += word.len();
        }
    }
    out
}

/// Builds the email: From, To, Cc as headers, Bcc in the envelope only, the custom headers,
/// the derived Message-ID, the body (HTML with a text alternative, or text) and attachments.
///
/// `parts.attachments` keeps the attachment bytes only when `with_attachment_parts` (a kind
/// that takes fields rather than MIME): otherwise it stays empty, and the bytes live once, in
/// the MIME message.
pub fn build_email(
    req: &ValidRequest,
    attachments: Vec<FetchedAttachment>,
    with_attachment_parts: bool,
) -> Result<OutgoingEmail, RequestError> {
    let r = &req.request;
    let rfc_id = rfc_message_id(&r.tenant_id, &r.message_id, &req.from.email);
    let mut b = Message::builder()
        .from(req.from.clone())
        .raw_header(header_value(
            HeaderName::new_from_ascii_str("Subject"),
            &r.subject,
        ))
        .message_id(Some(format!("<{rfc_id}>")))
        .date_now()
        .raw_header(address_header(AddressHeader::To, &req.to));
    if !req.cc.is_empty() {
        b = b.raw_header(address_header(AddressHeader::Cc, &req.cc));
    }
    for (name, value) in &req.headers {
        b = b.raw_header(header_value(name.clone(), value));
    }
    let recipients: Vec<Address> = req
        .to
        .iter()
        .chain(&req.cc)
        .chain(&req.bcc)
        .map(|m| m.email.clone())
        .collect();
    let envelope = Envelope::new(Some(req.from.email.clone()), recipients)
        .map_err(|e| RequestError::field("to", format!("no usable envelope: {e}")))?;
    b = b.envelope(envelope.clone());
    let (text, html) = match r.body_format {
        BodyFormat::Html => (html_to_text(&r.body_content), Some(r.body_content.clone())),
        BodyFormat::Text => (r.body_content.clone(), None),
    };
    let parts = EmailParts {
        tenant_id: r.tenant_id.clone(),
        message_id: r.message_id.clone(),
        from: req.from.clone(),
        to: req.to.clone(),
        cc: req.cc.clone(),
        bcc: req.bcc.clone(),
        subject: r.subject.clone(),
        text,
        html,
        headers: req
            .headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.clone()))
            .collect(),
        attachments: if with_attachment_parts {
            attachments.clone()
        } else {
            Vec::new()
        },
    };

    let message = match (r.body_format, attachments.is_empty()) {
        (BodyFormat::Text, true) => {
            b.singlepart(SinglePart::plain(text_body(r.body_content.clone())))
        }
        (format, _) => {
            let body = match format {
                BodyFormat::Html => MultiPart::alternative_plain_html(
                    text_body(parts.text.clone()),
                    text_body(r.body_content.clone()),
                ),
                BodyFormat::Text => MultiPart::mixed()
                    .singlepart(SinglePart::plain(text_body(r.body_content.clone()))),
            };
            if attachments.is_empty() {
                b.multipart(body)
            } else {
                let mut mixed = MultiPart::mixed().multipart(body);
                for (i, a) in attachments.into_iter().enumerate() {
                    let ct = ContentType::parse(&a.mime_type).map_err(|_| {
                        RequestError::field(
                            format!("attachments[{i}].mime_type"),
                            "is not a MIME type",
                        )
                    })?;
                    // Always base64: an attachment's bytes (bare CR, LF or NUL included)
                    // never reach the DATA stream as they are.
                    let body = Body::new_with_encoding(a.bytes, ContentTransferEncoding::Base64)
                        .map_err(|_| {
                            RequestError::field(
                                format!("attachments[{i}]"),
                                "cannot be encoded as base64",
                            )
                        })?;
                    mixed = mixed.singlepart(Attachment::new(a.filename).body(body, ct));
                }
                b.multipart(mixed)
            }
        }
    }
    .map_err(|e| RequestError::field("(email)", format!("cannot build the email: {e}")))?;
    Ok(OutgoingEmail {
        envelope,
        bytes: message.formatted(),
        rfc_message_id: rfc_id,
        parts,
    })
}

/// Whether waiting and trying again can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureClass {
    /// The same request will fail the same way: dead-letter it.
    Permanent,
    /// The provider or a resource is unavailable for now: retry.
    Transient,
    /// The request could not be decoded or is malformed.
    Invalid,
}

impl FailureClass {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureClass::Permanent => "permanent",
            FailureClass::Transient => "transient",
            FailureClass::Invalid => "invalid",
        }
    }
}

impl fmt::Display for FailureClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The guide's "Expected Response" `provider_response`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ProviderResponse {
    pub provider_name: String,
    pub provider_message_id: String,
    pub sent_at: String,
}

/// A result on `email.send.result` (contract §4): the guide's "Expected Response" or its
/// "Error Response Format", always with `tenant_id` and `message_id`.
/// A result's `status`.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ResultStatus {
    Sent,
    Retrying,
    Failed,
}

impl ResultStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ResultStatus::Sent => "sent",
            ResultStatus::Retrying => "retrying",
            ResultStatus::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SendResult {
    pub success: bool,
    pub tenant_id: Option<String>,
    pub message_id: Option<String>,
    pub status: ResultStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider_response: Option<ProviderResponse>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_class: Option<FailureClass>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_count: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_retry_at: Option<String>,
}

impl SendResult {
    pub fn sent(tenant_id: &str, message_id: &str, provider: ProviderResponse) -> Self {
        Self {
            success: true,
            tenant_id: Some(tenant_id.into()),
            message_id: Some(message_id.into()),
            status: ResultStatus::Sent,
            provider_response: Some(provider),
            error: None,
            error_class: None,
            retry_count: None,
            max_retries: None,
            next_retry_at: None,
        }
    }

    pub fn failed(
        ids: &RequestIds,
        error: String,
        class: FailureClass,
        retry_count: u32,
        max_retries: u32,
    ) -> Self {
        Self {
            success: false,
            tenant_id: ids.tenant_id.clone(),
            message_id: ids.message_id.clone(),
            status: ResultStatus::Failed,
            provider_response: None,
            error: Some(error),
            error_class: Some(class),
            retry_count: Some(retry_count),
            max_retries: Some(max_retries),
            next_retry_at: None,
        }
    }
}

impl SendResult {
    /// What identifies this result among all results (the AMQP `message_id` it is published
    /// with): the SHA-256 (hex) of tenant, request, status and retry number — the same for a
    /// result published again.
    pub fn dedup_id(&self) -> String {
        crate::inbound::sha256_hex(
            format!(
                "{}\u{1f}{}\u{1f}{}\u{1f}{}",
                self.tenant_id.as_deref().unwrap_or(""),
                self.message_id.as_deref().unwrap_or(""),
                self.status.as_str(),
                self.retry_count.unwrap_or(0)
            )
            .as_bytes(),
        )
    }

    /// The guide's "Error Response Format" for a failure that will be retried.
    pub fn retrying(
        ids: &RequestIds,
        error: String,
        retry_count: u32,
        max_retries: u32,
        next_retry_at: String,
    ) -> Self {
        Self {
            status: ResultStatus::Retrying,
            error_class: Some(FailureClass::Transient),
            next_retry_at: Some(next_retry_at),
            ..Self::failed(
                ids,
                error,
                FailureClass::Transient,
                retry_count,
                max_retries,
            )
        }
    }
}

/// Takes the queue id out of a server's 250 reply to DATA, when it gives one
/// (Postfix: "Ok: queued as 4F3Z…", Exim: "OK id=1abc…").
pub fn queue_id_from_reply(lines: &[String]) -> Option<String> {
    for line in lines {
        if let Some(i) = line.find("queued as ") {
            let id: String = line[i + 10..]
                .chars()
                .take_while(|c| !c.is_whitespace())
                .collect();
            if !id.is_empty() {
                return Some(id);
            }
        }
        if let Some(i) = line.find("id=") {
            let id: String = line[i + 3..]
                .chars()
                .take_while(|c| !c.is_whitespace())
                .collect();
            if !id.is_empty() {
                return Some(id);
            }
        }
    }
    None
}

/// RFC 3339 UTC timestamp with seconds.
pub fn rfc3339(t: time::OffsetDateTime) -> String {
    t.replace_nanosecond(0)
        .unwrap_or(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    pub const GUIDE_EXAMPLE: &str = r#"{
        "tenant_id": "01996243-2d8c-726d-a5c2-81b7005ce9a2",
        "provider_id": "0198a819-e5d3-703a-a39a-1b77e3ece687",
        "user_id": "user-123",
        "message_id": "unique-message-id",
        "from": "noreply@company.com",
        "to": ["user@example.com"],
        "cc": ["cc@example.com"],
        "bcc": ["bcc@example.com"],
        "subject": "Test Email",
        "body_format": "HTML",
        "body_content": "<p>Hello World</p>",
        "attachments": [{"filename": "document.pdf", "url": "https://example.com/files/document.pdf", "mime_type": "application/pdf"}],
        "headers": {"X-Custom-Header": "Custom Value", "X-Priority": "1"},
        "template_id": "template-123",
        "campaign_id": "campaign-456",
        "timestamp": "2025-09-19T10:30:00Z"
    }"#;

    fn with(field: &str, value: serde_json::Value) -> Vec<u8> {
        let mut v: serde_json::Value = serde_json::from_str(GUIDE_EXAMPLE).unwrap();
        if value.is_null() {
            v.as_object_mut().unwrap().remove(field);
        } else {
            v[field] = value;
        }
        serde_json::to_vec(&v).unwrap()
    }

    fn err_of(body: &[u8]) -> RequestError {
        match decode(body).and_then(|r| r.validate(&Limits::default())) {
            Ok(_) => panic!("accepted"),
            Err(e) => e,
        }
    }

    #[test]
    fn the_guide_example_decodes_and_validates() {
        let v = decode(GUIDE_EXAMPLE.as_bytes())
            .unwrap()
            .validate(&Limits::default())
            .unwrap();
        assert_eq!(v.to.len(), 1);
        assert_eq!(v.bcc[0].email.to_string(), "bcc@example.com");
        assert_eq!(v.headers.len(), 2);
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(
            err_of(&with("to", serde_json::Value::Null)),
            RequestError::field("to", "is required")
        );
        let e = err_of(&with("to", serde_json::json!("user@example.com")));
        assert!(
            matches!(&e, RequestError::Invalid { field, .. } if field == "to"),
            "{e}"
        );
        let e = err_of(&with("to", serde_json::json!(["not an address"])));
        assert!(
            matches!(&e, RequestError::Invalid { field, .. } if field == "to[0]"),
            "{e}"
        );
        let e = err_of(&with(
            "subject",
            serde_json::json!("Hi\r\nBcc: victim@example.com"),
        ));
        assert!(
            matches!(&e, RequestError::Invalid { field, .. } if field == "subject"),
            "{e}"
        );
        let e = err_of(&with(
            "headers",
            serde_json::json!({"X-A": "1\nBcc: x@example.com"}),
        ));
        assert!(
            matches!(&e, RequestError::Invalid { field, .. } if field == "headers.X-A"),
            "{e}"
        );
        let e = err_of(&with(
            "headers",
            serde_json::json!({"Bcc": "x@example.com"}),
        ));
        assert!(
            matches!(&e, RequestError::Invalid { field, .. } if field == "headers.Bcc"),
            "{e}"
        );
        let e = err_of(&with("headers", serde_json::json!({"Bad Name": "v"})));
        assert!(
            matches!(&e, RequestError::Invalid { field, .. } if field == "headers.Bad Name"),
            "{e}"
        );
        let e = err_of(&with("body_format", serde_json::json!("MARKDOWN")));
        assert!(
            matches!(&e, RequestError::Invalid { field, .. } if field == "body_format"),
            "{e}"
        );
        let e = err_of(&with(
            "attachments",
            serde_json::json!([{"filename": "a", "url": "file:///etc/passwd", "mime_type": "text/plain"}]),
        ));
        assert!(
            matches!(&e, RequestError::Invalid { field, .. } if field == "attachments[0].url"),
            "{e}"
        );
        assert!(matches!(decode(b"not json"), Err(RequestError::NotJson(_))));
    }

    #[test]
    fn nulls_are_empty_lists() {
        let v = decode(&with("cc", serde_json::json!(null_value())))
            .unwrap()
            .validate(&Limits::default())
            .unwrap();
        assert!(v.cc.is_empty());
    }

    fn null_value() -> Option<()> {
        None
    }

    #[test]
    fn the_email_has_no_bcc_header_but_the_envelope_has_bcc() {
        let v = decode(&with("attachments", serde_json::json!([])))
            .unwrap()
            .validate(&Limits::default())
            .unwrap();
        let email = build_email(&v, vec![], false).unwrap();
        let text = String::from_utf8(email.bytes.clone()).unwrap();
        assert!(!text.to_ascii_lowercase().contains("\nbcc:"), "{text}");
        assert!(text.contains("To: user@example.com"));
        assert!(text.contains("Cc: cc@example.com"));
        assert!(text.contains("X-Custom-Header: Custom Value"));
        assert!(text.contains(&format!("Message-ID: <{}>", email.rfc_message_id)));
        assert!(text.contains("text/plain"));
        assert!(text.contains("text/html"));
        let rcpts: Vec<String> = email.envelope.to().iter().map(|a| a.to_string()).collect();
        assert_eq!(
            rcpts,
            ["user@example.com", "cc@example.com", "bcc@example.com"]
        );
        assert_eq!(
            email.envelope.from().unwrap().to_string(),
            "noreply@company.com"
        );
    }

    #[test]
    fn message_id_is_stable_and_per_tenant() {
        let from: Address = "a@company.com".parse().unwrap();
        let a = rfc_message_id("t1", "unique-message-id", &from);
        assert_eq!(a, rfc_message_id("t1", "unique-message-id", &from));
        assert_ne!(a, rfc_message_id("t2", "unique-message-id", &from));
        assert!(
            a.starts_with("unique-message-id.") && a.ends_with("@company.com"),
            "{a}"
        );
        let odd = rfc_message_id("t1", "has space<>", &from);
        assert!(odd.starts_with('h') && !odd.contains(' '), "{odd}");
    }

    #[test]
    fn html_becomes_readable_text() {
        let t = html_to_text(
            "<html><head><style>p{}</style></head><body><p>Hello&nbsp;<b>World</b> &amp; you</p><ul><li>one</li><li>two</li></ul>line<br>break</body></html>",
        );
        assert_eq!(t, "Hello World & you\n\n- one\n- two\nline\nbreak");
    }

    #[test]
    fn html_edge_cases_become_text_as_written() {
        // Unknown, unterminated and numeric entities; upper-case tags; script skipped with
        // its entities; non-ASCII whitespace collapsed; at most one blank line in a row.
        let t = html_to_text(
            "<DIV>A &bogus; B &amp C, then &#x41;&#66;</DIV><SCRIPT>x &lt; y</SCRIPT>\u{a0}caf\u{e9}\u{3000} ok<p></p><p></p><p>end",
        );
        assert_eq!(t, "A &bogus; B &amp C, then AB\ncaf\u{e9} ok\n\nend");
        assert_eq!(html_to_text("  plain\r\n\r\n\r\ntext  "), "plain\n\ntext");
        assert_eq!(html_to_text("unclosed <b"), "unclosed");
    }

    #[test]
    fn queue_ids_are_read_from_replies() {
        assert_eq!(
            queue_id_from_reply(&["2.0.0 Ok: queued as 4F3ZQX1abc".into()]),
            Some("4F3ZQX1abc".into())
        );
        assert_eq!(
            queue_id_from_reply(&["OK id=1tXyz-000".into()]),
            Some("1tXyz-000".into())
        );
        assert_eq!(queue_id_from_reply(&["OK".into()]), None);
    }

    #[test]
    fn results_have_the_guide_shape() {
        let r = SendResult::sent(
            "t",
            "m",
            ProviderResponse {
                provider_name: "Gmail".into(),
                provider_message_id: "q1".into(),
                sent_at: "2025-09-19T10:30:05Z".into(),
            },
        );
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["success"], true);
        assert_eq!(v["status"], "sent");
        assert_eq!(v["provider_response"]["provider_name"], "Gmail");
        assert!(v.get("error").is_none());
        let f = SendResult::failed(
            &RequestIds {
                tenant_id: Some("t".into()),
                message_id: Some("m".into()),
                provider_id: None,
            },
            "boom".into(),
            FailureClass::Permanent,
            0,
            3,
        );
        let v = serde_json::to_value(&f).unwrap();
        assert_eq!(v["success"], false);
        assert_eq!(v["status"], "failed");
        assert_eq!(v["retry_count"], 0);
        assert_eq!(v["max_retries"], 3);
        assert_eq!(v["tenant_id"], "t");
    }
}

#[cfg(test)]
mod address_tests {
    use super::tests::GUIDE_EXAMPLE;
    use super::*;

    #[test]
    fn a_thousand_recipients_make_folded_lines_and_every_address_arrives() {
        let mut v: serde_json::Value = serde_json::from_str(GUIDE_EXAMPLE).unwrap();
        let to: Vec<String> = (0..600)
            .map(|i| format!("To {i} <to{i}@example.com>"))
            .collect();
        let cc: Vec<String> = (0..398).map(|i| format!("cc{i}@example.com")).collect();
        v["to"] = serde_json::json!(to);
        v["cc"] = serde_json::json!(cc);
        v["bcc"] = serde_json::json!(["hidden@example.com", "B Ü <b@example.com>"]);
        let valid = decode(&serde_json::to_vec(&v).unwrap())
            .unwrap()
            .validate(&Limits::default())
            .unwrap();
        let started = std::time::Instant::now();
        let email = build_email(&valid, vec![], false).unwrap();
        println!("built in {:?}", started.elapsed());
        let text = String::from_utf8(email.bytes.clone()).unwrap();
        assert!(text.lines().all(|l| l.len() <= 78 + 1), "a long line");
        let parsed = mail_parser::MessageParser::default()
            .parse(&email.bytes)
            .unwrap();
        let addresses = |a: Option<&mail_parser::Address>| -> Vec<String> {
            a.map(|a| {
                a.iter()
                    .filter_map(|m| m.address().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
        };
        let got_to = addresses(parsed.to());
        assert_eq!(got_to.len(), 600);
        assert_eq!(got_to[599], "to599@example.com");
        assert_eq!(parsed.to().unwrap().first().unwrap().name(), Some("To 0"));
        assert_eq!(addresses(parsed.cc()).len(), 398);
        assert!(!text.contains("hidden@example.com"));
        assert_eq!(email.envelope.to().len(), 1000);
    }

    #[test]
    fn quoted_local_parts_are_refused() {
        let mut v: serde_json::Value = serde_json::from_str(GUIDE_EXAMPLE).unwrap();
        v["to"] = serde_json::json!(["\"\\\"x\\\"\"@example.com"]);
        let e = decode(&serde_json::to_vec(&v).unwrap())
            .unwrap()
            .validate(&Limits::default())
            .unwrap_err();
        assert!(e.to_string().contains("quoted local part"), "{e}");
    }
}
