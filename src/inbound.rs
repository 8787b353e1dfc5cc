//! Inbound domain: a received email parsed (mail-parser) into the guide's `email.inbound`
//! message, with the rules of contract §7. No I/O: attachment bytes are handed back for the
//! caller to store, and the caller fills in their links and `reply_to_message_id`.

use std::collections::BTreeMap;

use mail_parser::{HeaderValue, MessageParser, MimeHeaders};
use serde::Serialize;

/// One attachment as published: a signed link to the stored bytes.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct InboundAttachment {
    pub filename: String,
    pub url: String,
    pub mime_type: String,
    pub size: u64,
}

/// The guide's `email.inbound` message (plus the added fields of contract §7 and
/// `mailbox_id`/`user_id`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct InboundEmail {
    pub tenant_id: String,
    pub provider_id: String,
    pub mailbox_id: String,
    pub user_id: String,
    pub message_id: String,
    pub in_reply_to: Option<String>,
    pub references: Option<String>,
    pub subject: String,
    pub from_email: String,
    pub from_name: Option<String>,
    pub to_emails: Vec<String>,
    pub cc_emails: Vec<String>,
    pub bcc_emails: Vec<String>,
    pub body_format: &'static str,
    pub body_content: String,
    pub attachments: Vec<InboundAttachment>,
    pub headers: BTreeMap<String, String>,
    pub is_reply: bool,
    pub is_forward: bool,
    pub is_auto_reply: bool,
    pub thread_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply_to_message_id: Option<String>,
    pub received_at: String,
    pub priority: &'static str,
    pub source: &'static str,
}

/// An attachment's bytes, to be stored before the email is published.
#[derive(Debug, Clone)]
pub struct RawAttachment {
    pub filename: String,
    pub mime_type: String,
    pub bytes: Vec<u8>,
}

/// Where a message came from, for the fields the message itself does not say.
#[derive(Debug, Clone)]
pub struct Origin<'a> {
    pub tenant_id: &'a str,
    pub provider_id: &'a str,
    pub mailbox_id: &'a str,
    pub user_id: &'a str,
    pub source: &'static str,
    /// When the server received it (IMAP INTERNALDATE), as a Unix time.
    pub received_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the message cannot be parsed as an email: {0}")]
pub struct ParseError(pub String);

/// `<a@b>` → `a@b`.
/// An id as published: without its angle brackets — the delimiters, and any stray one a
/// malformed id carries inside (`<a<b@c>`), which no msg-id may contain (RFC 5322 §3.6.4).
pub fn strip_brackets(id: &str) -> String {
    id.trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .trim()
        .replace(['<', '>'], "")
}

fn ids_of(v: &HeaderValue) -> Vec<String> {
    match v {
        HeaderValue::Text(t) => t
            .split_whitespace()
            .map(strip_brackets)
            .filter(|s| !s.is_empty())
            .collect(),
        HeaderValue::TextList(l) => l
            .iter()
            .flat_map(|t| t.split_whitespace())
            .map(strip_brackets)
            .filter(|s| !s.is_empty())
            .collect(),
        _ => Vec::new(),
    }
}

const REPLY_PREFIXES: &[&str] = &["re:", "aw:", "sv:", "antw:", "réf:", "ref:", "odp:", "vs:"];
const FORWARD_PREFIXES: &[&str] = &["fwd:", "fw:", "wg:", "tr:", "rv:", "enc:", "doorst:"];
const AUTO_PREFIXES: &[&str] = &[
    "auto:",
    "automatic reply:",
    "autoreply:",
    "auto-reply:",
    "out of office",
    "out of the office",
    "abwesenheitsnotiz",
];

fn starts_with_any(subject: &str, prefixes: &[&str]) -> bool {
    let s = subject.trim_start().to_lowercase();
    prefixes.iter().any(|p| s.starts_with(p))
}

/// The longest Message-ID (in bytes) kept as itself in a dedup key. A btree index entry holds
/// at most about 2,700 bytes; longer ids are keyed by their hash instead.
pub const MAX_ID_IN_KEY: usize = 900;

/// How many References entries (the newest) are looked up in the outbox for
/// `reply_to_message_id`, besides In-Reply-To: a 5,000-id chain costs no more than a short one.
pub const MAX_REPLY_CANDIDATES: usize = 50;

/// The dedup key a Message-ID gives: `mid:<id>`, or `midh:<sha256 of the id>` when the id is
/// longer than [`MAX_ID_IN_KEY`] or holds control characters (PostgreSQL refuses NUL, and
/// such an id is hostile anyway). `None` for an empty id: the caller hashes the bytes.
pub fn message_id_key(id: &str) -> Option<String> {
    let id = strip_brackets(id);
    if id.is_empty() {
        None
    } else if id.len() > MAX_ID_IN_KEY || id.chars().any(char::is_control) {
        Some(format!("midh:{}", sha256_hex(id.as_bytes())))
    } else {
        Some(format!("mid:{id}"))
    }
}

/// The dedup key of a POP3 message: `uidl:<UIDL>`, or `uidlh:<sha256 of the UIDL>` for one
/// PostgreSQL could not index or hold (RFC 1939 allows 70 printable characters; a server may
/// send anything).
pub fn uidl_key(uidl: &str) -> String {
    if uidl.len() > MAX_ID_IN_KEY || uidl.chars().any(char::is_control) {
        format!("uidlh:{}", sha256_hex(uidl.as_bytes()))
    } else {
        format!("uidl:{uidl}")
    }
}

/// The dedup key of a message in a mailbox: its Message-ID when it has one (see
/// [`message_id_key`]), else `sha256:` and the hash of its bytes. Stable across UIDVALIDITY
/// changes and re-syncs.
pub fn dedup_key(raw: &[u8]) -> String {
    MessageParser::default()
        .parse_headers(raw)
        .as_ref()
        .and_then(|m| m.message_id())
        .and_then(message_id_key)
        .unwrap_or_else(|| format!("sha256:{}", sha256_hex(raw)))
}

/// What the headers alone say, for the steps before the full parse: the dedup key (when the
/// Message-ID gives one), the Message-ID, and the ids to look up for `reply_to_message_id`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderFacts {
    pub key: Option<String>,
    pub message_id: Option<String>,
    pub reply_candidates: Vec<String>,
}

pub fn header_facts(raw: &[u8]) -> HeaderFacts {
    let Some(msg) = MessageParser::default().parse_headers(raw) else {
        return HeaderFacts::default();
    };
    let in_reply_to = ids_of(msg.in_reply_to()).into_iter().next();
    let references = ids_of(msg.references());
    HeaderFacts {
        key: msg.message_id().and_then(message_id_key),
        message_id: msg
            .message_id()
            .map(strip_brackets)
            .filter(|id| !id.is_empty()),
        reply_candidates: reply_candidates(in_reply_to.as_deref(), &references),
    }
}

/// The headers of a message as the published `headers` field has them (every header, repeated
/// ones joined with `, `), from `raw` (which may be only the start of the message).
pub fn header_map_of(raw: &[u8]) -> BTreeMap<String, String> {
    MessageParser::default()
        .parse_headers(raw)
        .map(|m| header_map(&m))
        .unwrap_or_default()
}

fn header_map(msg: &mail_parser::Message) -> BTreeMap<String, String> {
    let mut headers = BTreeMap::new();
    for (name, value) in msg.headers_raw() {
        let v = value.trim().replace("\r\n", "").replace('\n', "");
        headers
            .entry(name.to_string())
            .and_modify(|e: &mut String| {
                e.push_str(", ");
                e.push_str(v.trim());
            })
            .or_insert_with(|| v.trim().to_string());
    }
    headers
}

/// `s` as PostgreSQL can store it: without control characters (NUL above all), and cut to at
/// most `max_bytes` on a character boundary.
pub fn storable_text(s: &str, max_bytes: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max_bytes));
    for c in s.chars().filter(|c| !c.is_control()) {
        if out.len() + c.len_utf8() > max_bytes {
            break;
        }
        out.push(c);
    }
    out
}

pub fn sha256_hex(data: &[u8]) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn priority(msg: &mail_parser::Message) -> &'static str {
    if let Some(p) = msg.header_raw("X-Priority") {
        // "1", "1 (Highest)", "5 (Lowest)"
        match p.trim().chars().next() {
            Some('1') | Some('2') => return "high",
            Some('4') | Some('5') => return "low",
            Some('3') => return "normal",
            _ => {}
        }
    }
    for h in ["Importance", "X-MSMail-Priority", "Priority"] {
        if let Some(v) = msg.header_raw(h) {
            let v = v.trim().to_ascii_lowercase();
            if v.starts_with("high") || v == "urgent" {
                return "high";
            }
            if v.starts_with("low") || v == "non-urgent" {
                return "low";
            }
        }
    }
    "normal"
}

fn is_auto_reply(msg: &mail_parser::Message, subject: &str) -> bool {
    let raw = |h: &str| msg.header_raw(h).map(|v| v.trim().to_ascii_lowercase());
    if raw("Auto-Submitted").is_some_and(|v| v != "no") {
        return true;
    }
    if raw("X-Autoreply").is_some() || raw("X-Autorespond").is_some() {
        return true;
    }
    if raw("Precedence").is_some_and(|v| v == "auto_reply" || v == "auto-reply") {
        return true;
    }
    // Exchange marks its automatic replies with X-Auto-Response-Suppress.
    if raw("X-Auto-Response-Suppress").is_some_and(|v| v.contains("all") || v.contains("oof")) {
        return true;
    }
    starts_with_any(subject, AUTO_PREFIXES)
}

/// Parses `raw` into the inbound message. Attachment `url`s are left empty: the caller stores
/// the returned bytes and fills them in, in the same order.
pub fn parse(
    raw: &[u8],
    origin: &Origin,
) -> Result<(InboundEmail, Vec<RawAttachment>), ParseError> {
    let msg = MessageParser::default()
        .parse(raw)
        .ok_or_else(|| ParseError("no headers found".into()))?;
    if msg.headers().is_empty() {
        return Err(ParseError("no headers found".into()));
    }
    if msg.from().is_none()
        && msg.message_id().is_none()
        && msg.date().is_none()
        && msg.subject().is_none()
    {
        return Err(ParseError(
            "it has no From, Subject, Date or Message-ID header".into(),
        ));
    }
    let subject = msg.subject().unwrap_or("").to_string();
    let message_id = match msg.message_id().map(strip_brackets) {
        Some(id) if !id.is_empty() => id,
        _ => {
            let hash = sha256_hex(raw);
            format!("{}@mailbridge.invalid", hash.get(..32).unwrap_or(&hash))
        }
    };
    let in_reply_to = ids_of(msg.in_reply_to()).into_iter().next();
    let references = ids_of(msg.references());
    let addresses = |a: Option<&mail_parser::Address>| -> Vec<String> {
        a.map(|a| {
            a.iter()
                .filter_map(|x| x.address().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
    };
    let from = msg.from().and_then(|a| a.first());
    let from_email = from.and_then(|a| a.address()).unwrap_or("").to_string();
    let from_name = from
        .and_then(|a| a.name())
        .map(str::to_string)
        .filter(|n| !n.is_empty());

    let (body_format, body_content) = match msg.body_html(0) {
        Some(h)
            if msg.html_body_count() > 0
                && msg.html_part(0).is_some_and(|p| {
                    p.content_type().is_some_and(|c| {
                        c.subtype().is_some_and(|s| s.eq_ignore_ascii_case("html"))
                    })
                }) =>
        {
            ("HTML", h.into_owned())
        }
        _ => (
            "TEXT",
            msg.body_text(0).map(|t| t.into_owned()).unwrap_or_default(),
        ),
    };

    let headers = header_map(&msg);

    let mut attachments = Vec::new();
    for (i, part) in msg.attachments().enumerate() {
        let mime_type = part
            .content_type()
            .map(|c| match c.subtype() {
                Some(s) => format!("{}/{}", c.ctype(), s),
                None => c.ctype().to_string(),
            })
            .unwrap_or_else(|| "application/octet-stream".into());
        let filename = part
            .attachment_name()
            .map(str::to_string)
            .unwrap_or_else(|| format!("attachment-{}", i + 1));
        attachments.push(RawAttachment {
            filename,
            mime_type,
            bytes: part.contents().to_vec(),
        });
    }

    let is_reply = in_reply_to.is_some() || starts_with_any(&subject, REPLY_PREFIXES);
    let is_forward = msg.header_raw("X-Forwarded-Message-Id").is_some()
        || msg.header_raw("X-Forwarded-For").is_some()
        || msg.header_raw("Resent-From").is_some()
        || starts_with_any(&subject, FORWARD_PREFIXES);
    let is_auto_reply = is_auto_reply(&msg, &subject);
    // The conversation's root: the first References entry, else what it replies to, else itself.
    let thread_id = references
        .first()
        .cloned()
        .or_else(|| in_reply_to.clone())
        .unwrap_or_else(|| message_id.clone());

    let received_at = origin
        .received_at
        .or_else(|| msg.date().map(|d| d.to_timestamp()))
        .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
        .unwrap_or_else(time::OffsetDateTime::now_utc);

    let email = InboundEmail {
        tenant_id: origin.tenant_id.to_string(),
        provider_id: origin.provider_id.to_string(),
        mailbox_id: origin.mailbox_id.to_string(),
        user_id: origin.user_id.to_string(),
        message_id,
        in_reply_to,
        references: if references.is_empty() {
            None
        } else {
            Some(references.join(","))
        },
        subject,
        from_email,
        from_name,
        to_emails: addresses(msg.to()),
        cc_emails: addresses(msg.cc()),
        bcc_emails: addresses(msg.bcc()),
        body_format,
        body_content,
        attachments: attachments
            .iter()
            .map(|a| InboundAttachment {
                filename: a.filename.clone(),
                url: String::new(),
                mime_type: a.mime_type.clone(),
                size: a.bytes.len() as u64,
            })
            .collect(),
        headers,
        is_reply,
        is_forward,
        is_auto_reply,
        thread_id,
        reply_to_message_id: None,
        received_at: crate::outbound::rfc3339(received_at),
        priority: priority(&msg),
        source: origin.source,
    };
    Ok((email, attachments))
}

/// The ids an email may answer, most specific first: In-Reply-To, then the newest
/// [`MAX_REPLY_CANDIDATES`] References. Ids that cannot be an outbound Message-ID (control
/// characters, longer than [`MAX_ID_IN_KEY`]) are left out: they match nothing, and
/// PostgreSQL would refuse a NUL in the lookup.
pub fn reply_candidates(in_reply_to: Option<&str>, references: &[String]) -> Vec<String> {
    let usable = |id: &&str| {
        !id.is_empty() && id.len() <= MAX_ID_IN_KEY && !id.chars().any(char::is_control)
    };
    let mut ids: Vec<String> = in_reply_to
        .filter(usable)
        .map(str::to_string)
        .into_iter()
        .collect();
    for id in references
        .iter()
        .rev()
        .take(MAX_REPLY_CANDIDATES)
        .map(String::as_str)
        .filter(usable)
    {
        if !ids.iter().any(|x| x == id) {
            ids.push(id.to_string());
        }
    }
    ids
}

/// [`reply_candidates`] of a parsed email.
pub fn answered_ids(email: &InboundEmail) -> Vec<String> {
    let references: Vec<String> = email
        .references
        .as_deref()
        .map(|r| r.split(',').map(str::to_string).collect())
        .unwrap_or_default();
    reply_candidates(email.in_reply_to.as_deref(), &references)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin() -> Origin<'static> {
        Origin {
            tenant_id: "t",
            provider_id: "p",
            mailbox_id: "m",
            user_id: "u",
            source: "imap",
            received_at: Some(1_758_279_600),
        }
    }

    #[test]
    fn a_reply_has_its_chain_and_thread() {
        let raw = b"From: John Doe <john@example.com>\r\nTo: noreply@company.com, b@x.org\r\nCc: cc@example.com\r\nSubject: Re: Test Email\r\nMessage-ID: <r2@example.com>\r\nIn-Reply-To: <r1@example.com>\r\nReferences: <root@company.com> <r1@example.com>\r\nX-Priority: 1 (Highest)\r\nContent-Type: text/html; charset=iso-8859-1\r\n\r\n<p>Gr\xfc\xdfe</p>\r\n";
        let (e, atts) = parse(raw, &origin()).unwrap();
        assert!(atts.is_empty());
        assert_eq!(e.message_id, "r2@example.com");
        assert_eq!(e.in_reply_to.as_deref(), Some("r1@example.com"));
        assert_eq!(
            e.references.as_deref(),
            Some("root@company.com,r1@example.com")
        );
        assert_eq!(e.thread_id, "root@company.com");
        assert!(e.is_reply && !e.is_forward && !e.is_auto_reply);
        assert_eq!(e.from_email, "john@example.com");
        assert_eq!(e.from_name.as_deref(), Some("John Doe"));
        assert_eq!(e.to_emails, ["noreply@company.com", "b@x.org"]);
        assert_eq!(e.cc_emails, ["cc@example.com"]);
        assert_eq!(e.body_format, "HTML");
        assert_eq!(e.body_content.trim(), "<p>Grüße</p>");
        assert_eq!(e.priority, "high");
        assert_eq!(e.received_at, "2025-09-19T11:00:00Z");
        assert_eq!(e.headers["Message-ID"], "<r2@example.com>");
        assert_eq!(answered_ids(&e), ["r1@example.com", "root@company.com"]);
    }

    #[test]
    fn forwards_auto_replies_and_plain_text_are_recognised() {
        let raw =
            b"From: a@example.com\r\nSubject: Fwd: offer\r\nMessage-ID: <f@x>\r\n\r\nsee below\r\n";
        let (e, _) = parse(raw, &origin()).unwrap();
        assert!(e.is_forward && !e.is_reply && !e.is_auto_reply);
        assert_eq!(e.body_format, "TEXT");
        assert_eq!(e.thread_id, "f@x");
        assert_eq!(e.priority, "normal");

        let raw = b"From: a@example.com\r\nSubject: Out of office\r\nAuto-Submitted: auto-replied\r\nMessage-ID: <o@x>\r\nIn-Reply-To: <q@x>\r\n\r\naway\r\n";
        let (e, _) = parse(raw, &origin()).unwrap();
        assert!(e.is_auto_reply && e.is_reply);
        let raw = b"From: a@example.com\r\nSubject: hello\r\nAuto-Submitted: no\r\nImportance: low\r\n\r\nx\r\n";
        let (e, _) = parse(raw, &origin()).unwrap();
        assert!(!e.is_auto_reply);
        assert_eq!(e.priority, "low");
        assert!(e.message_id.ends_with("@mailbridge.invalid"));
    }

    #[test]
    fn attachments_are_returned_in_order() {
        let raw = b"From: a@example.com\r\nSubject: files\r\nMessage-ID: <a@x>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=XX\r\n\r\n--XX\r\nContent-Type: text/plain\r\n\r\nhi\r\n--XX\r\nContent-Type: application/pdf; name=\"r.pdf\"\r\nContent-Disposition: attachment; filename=\"r.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n--XX--\r\n";
        let (e, atts) = parse(raw, &origin()).unwrap();
        assert_eq!(atts.len(), 1);
        assert_eq!(atts[0].filename, "r.pdf");
        assert_eq!(atts[0].mime_type, "application/pdf");
        assert_eq!(atts[0].bytes, b"%PDF-1.4\n");
        assert_eq!(e.attachments[0].size, 9);
        assert_eq!(e.body_content.trim(), "hi");
    }

    #[test]
    fn what_is_not_an_email_is_refused() {
        for raw in [
            &b"this is not an email at all\r\n"[..],
            b"",
            b"\r\n\r\nbody only",
        ] {
            assert!(
                parse(raw, &origin()).is_err(),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn dedup_keys_prefer_the_message_id() {
        assert_eq!(dedup_key(b"Message-ID: <a@b>\r\n\r\nx"), "mid:a@b");
        assert!(dedup_key(b"Subject: none\r\n\r\nx").starts_with("sha256:"));
        assert!(dedup_key(b"Message-ID: <>\r\nSubject: s\r\n\r\nx").starts_with("sha256:"));
    }

    #[test]
    fn hostile_message_ids_give_keys_postgresql_can_index() {
        let long = format!("Message-ID: <{}@x>\r\n\r\nbody", "a".repeat(5000));
        let k = dedup_key(long.as_bytes());
        assert!(k.starts_with("midh:") && k.len() == 5 + 64, "{k}");
        assert_eq!(
            dedup_key(long.as_bytes()),
            k,
            "the same input gives the same key"
        );
        let nul = b"Message-ID: <a\0b@x>\r\n\r\nbody";
        let k = dedup_key(nul);
        assert!(k.starts_with("midh:") && !k.contains('\0'), "{k}");
        // Just under the bound: the id itself.
        let ok = format!("Message-ID: <{}>\r\n\r\nbody", "b".repeat(MAX_ID_IN_KEY));
        assert_eq!(
            dedup_key(ok.as_bytes()),
            format!("mid:{}", "b".repeat(MAX_ID_IN_KEY))
        );
        assert_eq!(
            header_facts(ok.as_bytes()).key.as_deref(),
            Some(&*dedup_key(ok.as_bytes()))
        );
    }

    #[test]
    fn uidl_keys_are_storable() {
        assert_eq!(uidl_key("000000016b0c05e3"), "uidl:000000016b0c05e3");
        assert!(uidl_key("a\0b").starts_with("uidlh:"));
        assert!(uidl_key(&"u".repeat(1000)).starts_with("uidlh:"));
    }

    #[test]
    fn stored_text_has_no_control_characters_and_is_bounded() {
        assert_eq!(storable_text("a\0b\r\nc", 100), "abc");
        assert_eq!(storable_text("ééé", 5), "éé");
        assert_eq!(storable_text(&"x".repeat(2000), 900).len(), 900);
    }

    #[test]
    fn reply_candidates_are_capped_and_usable() {
        let refs: Vec<String> = (0..5000).map(|i| format!("r{i}@x")).collect();
        let ids = reply_candidates(Some("irt@x"), &refs);
        assert_eq!(ids.len(), 1 + MAX_REPLY_CANDIDATES);
        assert_eq!(ids[0], "irt@x");
        assert_eq!(ids[1], "r4999@x");
        let ids = reply_candidates(Some("bad\0id"), &["ok@x".to_string(), "x".repeat(2000)]);
        assert_eq!(ids, ["ok@x"]);
        let chain =
            format!(
            "From: a@x\r\nSubject: Re: long\r\nMessage-ID: <m@x>\r\nReferences: {}\r\n\r\nbody\r\n",
            refs.iter().map(|r| format!("<{r}>")).collect::<Vec<_>>().join(" ")
        );
        let (e, _) = parse(chain.as_bytes(), &origin()).unwrap();
        assert_eq!(e.thread_id, "r0@x");
        assert_eq!(answered_ids(&e).len(), MAX_REPLY_CANDIDATES);
        assert_eq!(
            header_facts(chain.as_bytes()).reply_candidates,
            answered_ids(&e)
        );
    }
}
