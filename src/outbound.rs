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
/// service's CPU under load). It reads markup as HTML5's tokenizer does wherever text could
/// come out of it: comments (`<!-- a > b -->`), doctypes and `<?…>` are dropped whole; a tag
/// ends at the first `>` outside a quoted attribute value; a `<` not followed by a letter,
/// `/`, `!` or `?` is text; script, style, title (and iframe, noembed, noframes, xmp) are raw
/// text up to their end tag; head, template and noscript are not shown. Character references
/// are decoded with the whole HTML5 table (legacy ones without `;`, such as `&copy`, as
/// browsers do in text) and numeric ones per HTML5 (`&#0;`, surrogates and out-of-range values
/// become U+FFFD, 0x80–0x9F are read as windows-1252). Block ends, `<br>` and `<hr>` break
/// lines, list items start with `- `, table rows are lines with ` | ` between cells, and a
/// link keeps its target: `text (url)`, unless the text already says it or the target is
/// `#…` or `javascript:`.
pub fn html_to_text(html: &str) -> String {
    let b = html.as_bytes();
    let mut out = String::with_capacity(html.len());
    // Inside <head> (until </head> or <body>), and how deep inside <template>/<noscript>.
    let mut in_head = false;
    let mut hidden = 0u32;
    // The open link: its target and where its text starts in `out`.
    let mut link: Option<(String, usize)> = None;
    let mut i = 0;
    while i < b.len() {
        let shown = !in_head && hidden == 0;
        let stop = memchr::memchr2(b'<', b'&', &b[i..]).map_or(b.len(), |p| i + p);
        if shown {
            out.push_str(&html[i..stop]);
        }
        i = stop;
        let Some(&c) = b.get(i) else { break };
        if c == b'&' {
            i = if shown {
                char_ref(html, i + 1, false, &mut out)
            } else {
                i + 1
            };
            continue;
        }
        match b.get(i + 1).copied() {
            Some(n) if n.is_ascii_alphabetic() => {
                let name_end = tag_name_end(b, i + 1);
                let mut buf = [0u8; 10];
                let name = lower_name(&b[i + 1..name_end], &mut buf);
                let (end, href) = scan_attributes(b, name_end, shown && name == b"a");
                let Some(end) = end else { break };
                i = end;
                match name {
                    b"script" | b"style" | b"title" | b"iframe" | b"noembed" | b"noframes"
                    | b"xmp" => i = skip_raw_text(b, i, name),
                    b"head" => in_head = true,
                    b"body" => in_head = false,
                    b"template" | b"noscript" => hidden += 1,
                    _ if !shown => {}
                    b"br" | b"hr" => out.push('\n'),
                    b"li" => out.push_str("\n- "),
                    // A row starts a line; a cell after one with text on it, ` | ` (not after
                    // an empty cell's).
                    b"tr" if line_has_text(&out) => out.push('\n'),
                    b"td" | b"th"
                        if line_has_text(&out)
                            && !out.trim_end_matches([' ', '\t', '\r']).ends_with(" |") =>
                    {
                        out.push_str(" | ")
                    }
                    b"a" => {
                        if let Some(open) = link.take() {
                            end_link(&mut out, open);
                        }
                        link = href
                            .and_then(|r| link_target(&html[r]))
                            .map(|url| (url, out.len()));
                    }
                    _ => {}
                }
            }
            Some(b'/') => match b.get(i + 2).copied() {
                Some(n) if n.is_ascii_alphabetic() => {
                    let name_end = tag_name_end(b, i + 2);
                    let mut buf = [0u8; 10];
                    let name = lower_name(&b[i + 2..name_end], &mut buf);
                    let Some(end) = scan_attributes(b, name_end, false).0 else {
                        break;
                    };
                    i = end;
                    match name {
                        b"head" => in_head = false,
                        b"template" | b"noscript" => hidden = hidden.saturating_sub(1),
                        _ if !shown => {}
                        b"br" => out.push('\n'),
                        b"a" => {
                            if let Some(open) = link.take() {
                                end_link(&mut out, open);
                            }
                        }
                        b"p" | b"div" | b"tr" | b"h1" | b"h2" | b"h3" | b"h4" | b"h5" | b"h6"
                        | b"ul" | b"ol" | b"table" | b"blockquote" => out.push('\n'),
                        _ => {}
                    }
                }
                // `</>` is nothing; `</` at the end is text; `</3 …>` is a bogus comment.
                Some(b'>') => i += 3,
                None => {
                    if shown {
                        out.push_str("</");
                    }
                    i += 2;
                }
                Some(_) => i = after_gt(b, i + 2),
            },
            Some(b'!') if b[i + 2..].starts_with(b"--") => i = comment_end(b, i + 4),
            Some(b'!' | b'?') => i = after_gt(b, i + 2),
            _ => {
                if shown {
                    out.push('<');
                }
                i += 1;
            }
        }
    }
    if let Some(open) = link.take() {
        end_link(&mut out, open);
    }
    collapse_whitespace(&out)
}

/// HTML's whitespace between attributes (CR included: the tokenizer sees it as LF).
fn is_html_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0c)
}

/// The end of the tag name that starts at `from`.
fn tag_name_end(b: &[u8], from: usize) -> usize {
    b[from..]
        .iter()
        .position(|&c| is_html_space(c) || c == b'/' || c == b'>')
        .map_or(b.len(), |p| from + p)
}

/// A tag name in lower case, or empty when longer than any name that matters here.
fn lower_name<'a>(name: &[u8], buf: &'a mut [u8; 10]) -> &'a [u8] {
    if name.len() > buf.len() {
        return &[];
    }
    let buf = &mut buf[..name.len()];
    buf.copy_from_slice(name);
    buf.make_ascii_lowercase();
    buf
}

/// Reads a tag's attributes from `from` (after its name) as HTML5 does: returns the index
/// after the `>` that ends the tag (`None` when the input ends first: the tag is dropped) and,
/// when `want_href`, where the value of the first `href` attribute is.
fn scan_attributes(
    b: &[u8],
    from: usize,
    want_href: bool,
) -> (Option<usize>, Option<std::ops::Range<usize>>) {
    let mut href = None;
    let mut j = from;
    loop {
        while j < b.len() && (is_html_space(b[j]) || b[j] == b'/') {
            j += 1;
        }
        match b.get(j) {
            None => return (None, href),
            Some(b'>') => return (Some(j + 1), href),
            Some(_) => {}
        }
        // An attribute name: its first character may be anything (even `=`).
        let name_start = j;
        j += 1;
        while j < b.len() && !(is_html_space(b[j]) || matches!(b[j], b'/' | b'>' | b'=')) {
            j += 1;
        }
        let name = &b[name_start..j];
        while j < b.len() && is_html_space(b[j]) {
            j += 1;
        }
        if b.get(j) != Some(&b'=') {
            continue;
        }
        j += 1;
        while j < b.len() && is_html_space(b[j]) {
            j += 1;
        }
        let value = match b.get(j).copied() {
            None => return (None, href),
            Some(b'>') => return (Some(j + 1), href),
            Some(q @ (b'"' | b'\'')) => match memchr::memchr(q, &b[j + 1..]) {
                Some(p) => {
                    let value = j + 1..j + 1 + p;
                    j = value.end + 1;
                    value
                }
                None => return (None, href),
            },
            Some(_) => {
                let start = j;
                while j < b.len() && !(is_html_space(b[j]) || b[j] == b'>') {
                    j += 1;
                }
                start..j
            }
        };
        if want_href && href.is_none() && name.eq_ignore_ascii_case(b"href") {
            href = Some(value);
        }
    }
}

/// The index after the next `>` from `from` (a bogus comment, `<!DOCTYPE …>`, `<?…>`).
fn after_gt(b: &[u8], from: usize) -> usize {
    memchr::memchr(b'>', &b[from..]).map_or(b.len(), |p| from + p + 1)
}

/// The index after the comment whose text starts at `from` (after `<!--`): it ends at `-->`
/// (or `--!>`), and `<!-->` and `<!--->` are empty comments; unterminated, it runs to the end.
fn comment_end(b: &[u8], from: usize) -> usize {
    let rest = &b[from..];
    if rest.starts_with(b">") {
        return from + 1;
    }
    if rest.starts_with(b"->") {
        return from + 2;
    }
    memchr::memchr_iter(b'>', rest)
        .find(|&p| rest[..p].ends_with(b"--") || rest[..p].ends_with(b"--!"))
        .map_or(b.len(), |p| from + p + 1)
}

/// The index after the end tag `</name…>` of a raw text element whose content starts at
/// `from`, or the end of the input.
fn skip_raw_text(b: &[u8], from: usize, name: &[u8]) -> usize {
    let mut j = from;
    while let Some(p) = memchr::memchr(b'<', &b[j..]) {
        let k = j + p;
        let name_end = k + 2 + name.len();
        if b.get(k + 1) == Some(&b'/')
            && b.get(k + 2..name_end)
                .is_some_and(|n| n.eq_ignore_ascii_case(name))
            && b.get(name_end)
                .is_none_or(|&c| is_html_space(c) || c == b'/' || c == b'>')
        {
            return scan_attributes(b, name_end, false).0.unwrap_or(b.len());
        }
        j = k + 1;
    }
    b.len()
}

/// Whether the last line of `out` has anything but spaces.
fn line_has_text(out: &str) -> bool {
    let tail = out.trim_end_matches([' ', '\t', '\r']);
    !tail.is_empty() && !tail.ends_with('\n')
}

/// The HTML5 named character references, by name without the `&` (`amp;`, and `amp` for
/// the legacy ones browsers also read without `;`).
fn named_references() -> &'static NamedReferences {
    static TABLE: std::sync::OnceLock<NamedReferences> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        entities::ENTITIES
            .iter()
            .map(|e| (&e.entity[1..], e.characters))
            .collect()
    })
}

type NamedReferences =
    std::collections::HashMap<&'static str, &'static str, std::hash::BuildHasherDefault<FnvHasher>>;

/// FNV-1a as a `Hasher`: for the reference names (short, and not chosen by an attacker
/// against a table that is fixed), SipHash costs more than the rest of the lookup.
struct FnvHasher(u64);

impl Default for FnvHasher {
    fn default() -> Self {
        FnvHasher(0xcbf2_9ce4_8422_2325)
    }
}

impl std::hash::Hasher for FnvHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// Decodes the character reference whose text starts at `i` (after `&`) into `out` and
/// returns the index after it; when there is none, pushes `&` and returns `i`. Per HTML5: a
/// named reference is the longest name of the table there (legacy names also without `;`,
/// except, in an attribute value, before an alphanumeric or `=`); a numeric one is read to
/// its last digit. In text, U+00A0 becomes a space.
fn char_ref(s: &str, i: usize, in_attribute: bool, out: &mut String) -> usize {
    let b = s.as_bytes();
    if b.get(i) == Some(&b'#') {
        let hex = matches!(b.get(i + 1), Some(b'x' | b'X'));
        let digits = if hex { i + 2 } else { i + 1 };
        let radix = if hex { 16 } else { 10 };
        let mut j = digits;
        let mut value: u32 = 0;
        while let Some(d) = b.get(j).and_then(|&c| char::from(c).to_digit(radix)) {
            value = (value * radix + d).min(0x11_0000);
            j += 1;
        }
        if j == digits {
            out.push('&');
            return i;
        }
        if b.get(j) == Some(&b';') {
            j += 1;
        }
        let c = numeric_reference(value);
        out.push(if c == '\u{a0}' && !in_attribute {
            ' '
        } else {
            c
        });
        return j;
    }
    // The longest name is 31 characters (`CounterClockwiseContourIntegral`), before its `;`.
    let run = b[i..]
        .iter()
        .take(32)
        .take_while(|c| c.is_ascii_alphanumeric())
        .count();
    let table = named_references();
    let found = if b.get(i + run) == Some(&b';') {
        table.get(&s[i..=i + run]).map(|t| (*t, run + 1))
    } else {
        None
    };
    // The legacy names are 2 to 6 characters.
    let found = found.or_else(|| {
        (2..=run.min(6))
            .rev()
            .find_map(|n| table.get(&s[i..i + n]).map(|t| (*t, n)))
    });
    match found {
        Some((_, n))
            if in_attribute
                && b[i + n - 1] != b';'
                && b.get(i + n)
                    .is_some_and(|&c| c.is_ascii_alphanumeric() || c == b'=') =>
        {
            out.push('&');
            i
        }
        Some((text, n)) => {
            out.push_str(if text == "\u{a0}" && !in_attribute {
                " "
            } else {
                text
            });
            i + n
        }
        None => {
            out.push('&');
            i
        }
    }
}

/// The character of a numeric reference's value, per HTML5.
fn numeric_reference(value: u32) -> char {
    /// 0x80–0x9F read as windows-1252 (0 where it has no character: kept as is).
    const WINDOWS_1252: [u16; 32] = [
        0x20AC, 0, 0x201A, 0x0192, 0x201E, 0x2026, 0x2020, 0x2021, 0x02C6, 0x2030, 0x0160, 0x2039,
        0x0152, 0, 0x017D, 0, 0, 0x2018, 0x2019, 0x201C, 0x201D, 0x2022, 0x2013, 0x2014, 0x02DC,
        0x2122, 0x0161, 0x203A, 0x0153, 0, 0x017E, 0x0178,
    ];
    let value = match value {
        0x80..=0x9F => match WINDOWS_1252[value as usize - 0x80] {
            0 => value,
            mapped => u32::from(mapped),
        },
        v => v,
    };
    match value {
        0 => '\u{fffd}',
        v => char::from_u32(v).unwrap_or('\u{fffd}'),
    }
}

/// The target of a link's `href` (raw attribute value) worth showing after its text: decoded,
/// without the tabs and newlines a URL parser drops; none for `#…`, `javascript:` or empty.
fn link_target(raw: &str) -> Option<String> {
    let mut url = String::with_capacity(raw.len());
    let mut i = 0;
    while let Some(p) = memchr::memchr(b'&', &raw.as_bytes()[i..]) {
        url.push_str(&raw[i..i + p]);
        i = char_ref(raw, i + p + 1, true, &mut url);
    }
    url.push_str(&raw[i..]);
    url.retain(|c| !matches!(c, '\t' | '\n' | '\r'));
    let url = url.trim_matches(|c: char| c <= ' ');
    let javascript = url
        .get(..11)
        .is_some_and(|p| p.eq_ignore_ascii_case("javascript:"));
    (!url.is_empty() && !url.starts_with('#') && !javascript).then(|| url.to_string())
}

/// Ends a link whose text starts at `start` in `out`: ` (url)` after its text, unless the
/// text is the target already (or its `mailto:` address); the bare target if it has no text.
fn end_link(out: &mut String, (url, start): (String, usize)) {
    let text = out[start..].trim();
    if text.is_empty() {
        out.push(' ');
        out.push_str(&url);
        out.push(' ');
        return;
    }
    let strip = |s: &'_ str, prefix: &str| -> Option<usize> {
        s.get(..prefix.len())
            .filter(|p| p.eq_ignore_ascii_case(prefix))
            .map(|p| p.len())
    };
    let same = if let Some(n) = strip(&url, "mailto:") {
        let address = url[n..].split('?').next().unwrap_or_default();
        let text = strip(text, "mailto:").map_or(text, |n| &text[n..]);
        text.eq_ignore_ascii_case(address)
    } else {
        let bare = |s: &'_ str| -> String {
            let n = strip(s, "https://")
                .or_else(|| strip(s, "http://"))
                .unwrap_or(0);
            s[n..].trim_end_matches('/').to_ascii_lowercase()
        };
        bare(text) == bare(&url)
    };
    if !same {
        let end = out.trim_end().len();
        out.insert_str(end, &format!(" ({url})"));
    }
}

/// Runs of whitespace within a line become one space; runs of blank lines, one blank line;
/// the text is trimmed.
fn collapse_whitespace(s: &str) -> String {
    let b = s.as_bytes();
    let mut text = String::with_capacity(s.len());
    // Whether the line has a word yet, whitespace came after its last one, and how many
    // lines in a row had none.
    let mut words = false;
    let mut space = false;
    let mut blank = 0;
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\n' {
            if words {
                blank = 0;
                text.push('\n');
            } else {
                blank += 1;
                if blank == 1 {
                    text.push('\n');
                }
            }
            words = false;
            space = false;
            i += 1;
            continue;
        }
        let n = whitespace_len(b, i);
        if n > 0 {
            space = true;
            i += n;
            continue;
        }
        // Words, copied whole with the single spaces between them (no byte of a UTF-8
        // sequence's tail is taken for whitespace).
        let start = i;
        i += 1;
        loop {
            while i < b.len() && SPACE_CLASS[usize::from(b[i])] == 0 {
                i += 1;
            }
            match b.get(i) {
                Some(b' ')
                    if b.get(i + 1)
                        .is_some_and(|&c| SPACE_CLASS[usize::from(c)] == 0) =>
                {
                    i += 2
                }
                Some(&c) if SPACE_CLASS[usize::from(c)] == 2 && whitespace_len(b, i) == 0 => i += 1,
                _ => break,
            }
        }
        if words && space {
            text.push(' ');
        }
        text.push_str(&s[start..i]);
        words = true;
        space = false;
    }
    let trimmed = text.trim();
    if trimmed.len() == text.len() {
        text
    } else {
        trimmed.to_string()
    }
}

/// Per byte: 0 for one that is not (the start of) whitespace, 1 for ASCII whitespace, 2
/// for the first byte of a UTF-8 sequence that may be.
const SPACE_CLASS: [u8; 256] = {
    let mut class = [0u8; 256];
    let mut c = 0;
    while c < 256 {
        class[c] = match c as u8 {
            b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r' => 1,
            0xc2 | 0xe1 | 0xe2 | 0xe3 => 2,
            _ => 0,
        };
        c += 1;
    }
    class
};

/// The length in bytes of the whitespace character (`char::is_whitespace`, `\n` aside) that
/// starts at `b[i]`, or 0, without decoding UTF-8.
fn whitespace_len(b: &[u8], i: usize) -> usize {
    match b[i] {
        b' ' | b'\t' | 0x0b | 0x0c | b'\r' => 1,
        c if c < 0xc2 => 0,
        // U+0085, U+00A0
        0xc2 => usize::from(matches!(b.get(i + 1), Some(0x85 | 0xa0))) * 2,
        // U+1680
        0xe1 => usize::from(b.get(i + 1..i + 3) == Some(&[0x9a, 0x80])) * 3,
        // U+2000–U+200A, U+2028, U+2029, U+202F, U+205F
        0xe2 => match (b.get(i + 1), b.get(i + 2)) {
            (Some(0x80), Some(0x80..=0x8a | 0xa8 | 0xa9 | 0xaf)) | (Some(0x81), Some(0x9f)) => 3,
            _ => 0,
        },
        // U+3000
        0xe3 => usize::from(b.get(i + 1..i + 3) == Some(&[0x80, 0x80])) * 3,
        _ => 0,
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
        // `&amp` without `;` is a legacy reference browsers decode in text (issue 14).
        assert_eq!(t, "A &bogus; B & C, then AB\ncaf\u{e9} ok\n\nend");
        assert_eq!(html_to_text("  plain\r\n\r\n\r\ntext  "), "plain\n\ntext");
        assert_eq!(html_to_text("unclosed <b"), "unclosed");
    }

    #[test]
    fn html_named_references_use_the_whole_html5_table() {
        assert_eq!(
            html_to_text(
                "&hellip; &mdash; &euro;&rsquo;&Aacute;&zwnj;|&CounterClockwiseContourIntegral;"
            ),
            "\u{2026} \u{2014} \u{20ac}\u{2019}\u{c1}\u{200c}|\u{2233}"
        );
        // Two code points; names are case-sensitive.
        assert_eq!(html_to_text("&NotNestedGreaterGreater;"), "\u{2aa2}\u{338}");
        assert_eq!(html_to_text("&AMP; &Amp;"), "& &Amp;");
        // Legacy names without `;`, as browsers read them in text: the longest that matches.
        assert_eq!(
            html_to_text("&copy 2024 &amp co &ltx &notit; &notin; &eacutex"),
            "\u{a9} 2024 & co <x \u{ac}it; \u{2209} \u{e9}x"
        );
        // Not references: kept as written.
        assert_eq!(
            html_to_text("&bogus; & x &; &#; &#x; &hellip &x"),
            "&bogus; & x &; &#; &#x; &hellip &x"
        );
        // No-break space is a space in text.
        assert_eq!(html_to_text("a&nbsp;&nbsp;b&#160;c&nbspd"), "a b c d");
    }

    #[test]
    fn html_numeric_references_follow_html5() {
        assert_eq!(html_to_text("&#65;&#x42;&#X43;&#0068;&#x45"), "ABCDE");
        assert_eq!(html_to_text("&#128512;&#x1F600;"), "\u{1f600}\u{1f600}");
        let fffd = "\u{fffd}";
        for bad in [
            "&#0;",
            "&#xD800;",
            "&#xdfff;",
            "&#x110000;",
            "&#99999999999999999999;",
        ] {
            assert_eq!(html_to_text(bad), fffd, "{bad}");
        }
        // 0x80–0x9F are windows-1252; its holes stay as they are.
        assert_eq!(
            html_to_text("&#x80;&#150;&#x93;q&#x94;&#x99;&#x9F;"),
            "\u{20ac}\u{2013}\u{201c}q\u{201d}\u{2122}\u{178}"
        );
        assert_eq!(html_to_text("a&#x81;b"), "a\u{81}b");
    }

    #[test]
    fn html_table_cells_are_separated_and_rows_are_lines() {
        assert_eq!(html_to_text("<td>a</td><td>b</td>"), "a | b");
        assert_eq!(
            html_to_text(
                "<table><tr><th>Item</th><th>Price</th></tr><tr><td>Tea</td><td>&euro;3</td></tr></table>after"
            ),
            "Item | Price\nTea | \u{20ac}3\n\nafter"
        );
        // End tags left out, as HTML allows.
        assert_eq!(
            html_to_text("<table><tr><td>a<td>b<tr><td>c<td>d</table>"),
            "a | b\nc | d"
        );
        // Empty and spacer cells add no separator; cells written on lines of their own stay so.
        assert_eq!(
            html_to_text("<tr><td></td><td>x</td><td>&nbsp;</td><td>y</td><td> </td></tr>"),
            "x | y |"
        );
        assert_eq!(
            html_to_text("<table>\n<tr>\n  <td>a</td>\n  <td>b</td>\n</tr>\n</table>"),
            "a\nb"
        );
        // A layout cell holding a table: no separator after the inner table's last row.
        assert_eq!(
            html_to_text(
                "<table><tr><td><table><tr><td>in</td></tr></table></td><td>out</td></tr></table>"
            ),
            "in\n\nout"
        );
    }

    #[test]
    fn html_links_keep_their_target() {
        assert_eq!(
            html_to_text(
                r#"See <a class="btn" href="https://shop.example/x?a=1&amp;b=2">our shop</a>."#
            ),
            "See our shop (https://shop.example/x?a=1&b=2)."
        );
        assert_eq!(html_to_text("<A HREF='u'>t</A>"), "t (u)");
        assert_eq!(html_to_text("<a href=u/v>t</a>"), "t (u/v)");
        // A legacy name before `=` or an alphanumeric is not a reference in an attribute.
        assert_eq!(
            html_to_text(r#"<a href="/p?x=1&copy=2&lang=en&amp;q">t</a>"#),
            "t (/p?x=1&copy=2&lang=en&q)"
        );
        // The text is the target already.
        assert_eq!(
            html_to_text(r#"<a href="https://example.com/">https://example.com</a>"#),
            "https://example.com"
        );
        assert_eq!(
            html_to_text(r#"<a href="http://Example.com">example.com</a>"#),
            "example.com"
        );
        assert_eq!(
            html_to_text(r#"<a href="mailto:jo@example.com?subject=Hi">jo@example.com</a>"#),
            "jo@example.com"
        );
        assert_eq!(
            html_to_text(r#"Write to <a href="mailto:jo@example.com">Jo</a>"#),
            "Write to Jo (mailto:jo@example.com)"
        );
        // Targets not worth showing, and anchors without one.
        assert_eq!(
            html_to_text(
                r##"<a href="#top">Top</a> <a href=" JavaScript:void(0)">x</a> <a name="n">y</a> <a href="">z</a>"##
            ),
            "Top x y z"
        );
        // A link without text (an image) keeps its target alone; a block inside a link.
        assert_eq!(
            html_to_text(
                r#"<a href="https://x.example/"><img src="logo.png"></a><a href="u"><p>Go</p></a>on"#
            ),
            "https://x.example/ Go (u)\non"
        );
        // Whitespace in the attribute, an unclosed link, a link opening another.
        assert_eq!(
            html_to_text("<a href=\"\n https://a.example/\tb \">A</a> <a href=c.html>C"),
            "A (https://a.example/b) C (c.html)"
        );
        assert_eq!(html_to_text("<a href=/a>A<a href=/b>B</a>"), "A (/a)B (/b)");
    }

    #[test]
    fn html_comments_and_markup_declarations_are_dropped() {
        assert_eq!(html_to_text("a<!-- a > b -->c"), "ac");
        assert_eq!(html_to_text("a<!-- x -- y > -- z --!>c"), "ac");
        assert_eq!(html_to_text("a<!---->b<!-->c<!--->d"), "abcd");
        assert_eq!(html_to_text("a<!-- never closed > b"), "a");
        assert_eq!(
            html_to_text("<!DOCTYPE html><?xml version=\"1.0\"?>a<!--[if mso]><table><tr><td>mso<![endif]-->b<![CDATA[x]]>c"),
            "abc"
        );
        assert_eq!(html_to_text("a</ b>c</>d"), "acd");
    }

    #[test]
    fn html_attributes_never_leak_text() {
        assert_eq!(html_to_text(r#"<a title="x>y" href="u">t</a>"#), "t (u)");
        assert_eq!(html_to_text("<img alt='a > b' src=x>after"), "after");
        assert_eq!(
            html_to_text(r#"<td style="font-family:'A>B'" data-x='say "hi" >'>c</td>"#),
            "c"
        );
        assert_eq!(html_to_text("<p class=\"x\"/>a<br/>b<br />c"), "a\nb\nc");
        // A quote in an attribute name does not start a value.
        assert_eq!(html_to_text("<b x\"y>a</b>"), "a");
        // Unterminated quoted value: the tag runs to the end.
        assert_eq!(html_to_text("a<b title=\"x>y"), "a");
    }

    #[test]
    fn html_lone_less_than_is_text() {
        assert_eq!(
            html_to_text("a < b and 1 <= 2, <3 <> c"),
            "a < b and 1 <= 2, <3 <> c"
        );
        assert_eq!(html_to_text("x <"), "x <");
        assert_eq!(html_to_text("x </"), "x </");
        assert_eq!(html_to_text("&lt;b&gt; 5&lt;6"), "<b> 5<6");
    }

    #[test]
    fn html_hidden_elements_are_skipped() {
        assert_eq!(
            html_to_text(
                "<script>var s = \"</p><b>x</b>\"; if (a<b) {}</script>a<style>p>b{}</style>b<title>T &amp; <i>t</i></title>c"
            ),
            "abc"
        );
        assert_eq!(
            html_to_text("<html><head><title>T</title><meta charset=utf-8><style>x</style></head><body>a</body></html>"),
            "a"
        );
        // <body> ends a <head> that was never closed.
        assert_eq!(
            html_to_text("<head><meta name=x>hidden<body>shown"),
            "shown"
        );
        assert_eq!(
            html_to_text("a<template>t<template>u</template>v</template>b<noscript>n</noscript>c"),
            "abc"
        );
        // End tags of raw text: any case, attributes, and only the element's own name.
        assert_eq!(
            html_to_text("<SCRIPT>x</scripts></SCRIPT >a<style>b</style x=1>c"),
            "ac"
        );
        assert_eq!(html_to_text("a<script>never closed"), "a");
        // Links in hidden parts are not shown.
        assert_eq!(html_to_text("<noscript><a href=u>x</a></noscript>y"), "y");
    }

    #[test]
    fn whitespace_is_collapsed_as_char_is_whitespace_says() {
        // The rule the byte-level pass implements, with `lines` and `split_whitespace`.
        fn reference(s: &str) -> String {
            let mut text = String::new();
            let mut blank = 0;
            for line in s.lines() {
                let words: Vec<&str> = line.split_whitespace().collect();
                if words.is_empty() {
                    blank += 1;
                    if blank > 1 {
                        continue;
                    }
                } else {
                    blank = 0;
                }
                text.push_str(&words.join(" "));
                text.push('\n');
            }
            text.trim().to_string()
        }
        // Every string of up to 4 pieces: words, every kind of whitespace, and characters
        // whose UTF-8 starts as whitespace's does.
        let pieces = [
            "a", "\u{e9}", " ", "\t", "\n", "\r", "\u{b}", "\u{c}", "\u{85}", "\u{a0}", "\u{a9}",
            "\u{1680}", "\u{1681}", "\u{2000}", "\u{200a}", "\u{200b}", "\u{2013}", "\u{2028}",
            "\u{2029}", "\u{202f}", "\u{205f}", "\u{2060}", "\u{20ac}", "\u{3000}", "\u{3001}",
        ];
        let mut strings = vec![String::new()];
        for _ in 0..4 {
            let longer: Vec<String> = strings
                .iter()
                .filter(|s| s.chars().count() < 4)
                .flat_map(|s| pieces.iter().map(move |p| format!("{s}{p}")))
                .collect();
            strings.extend(longer);
        }
        strings.sort();
        strings.dedup();
        for s in &strings {
            assert_eq!(collapse_whitespace(s), reference(s), "{s:?}");
        }
        assert_eq!(
            collapse_whitespace("a b  c\u{3000}d\n\n\n e "),
            "a b c d\n\ne"
        );
    }

    #[test]
    fn html_rules_break_lines() {
        assert_eq!(html_to_text("a<hr>b<HR/>c"), "a\nb\nc");
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
