//! Fuzzing of the outbound request decoder and of the inbound email → JSON conversion:
//! randomized, structure-aware property tests (proptest), plus a replay of every input that
//! ever found a bug (`tests/fuzz-regressions/`).
//!
//! Requests
//! - P1: decoding (and validating, and peeking at the ids) never panics, whatever the bytes.
//! - P2: a refusal names its field (`Invalid { field, .. }`, field and reason non-empty) when
//!   the body is JSON, and is `NotJson` when it is not; what is accepted is JSON (as
//!   serde_json reads a value), and `decode_with_ids` and `RequestIds::peek` name its ids.
//! - P3: an accepted request (decoded and validated) has no NUL in tenant_id, provider_id,
//!   message_id, user_id, template_id, campaign_id, subject, header values, addresses or
//!   attachment filenames, and no id longer than 255 bytes.
//! - P4: the email built from an accepted request with 0–3 attachments: building never
//!   panics and succeeds; only CRLF line endings; no NUL; lines of at most 998 octets; it
//!   parses with mail_parser; its Subject decodes back to the request's; To/Cc carry the
//!   request's addresses; no Bcc header; the envelope has every to/cc/bcc address.
//!
//! Emails
//! - P5: `inbound::parse` and `dedup_key` never panic.
//! - P6: a parsed email serializes to JSON that parses back; message_id, in_reply_to and each
//!   references entry have no angle brackets; body_format is HTML or TEXT.
//! - P7: `dedup_key` is at most 1024 bytes with no control character, and the same input
//!   always gives the same key.
//!
//! Every property test stops at its first failure, shrinks it and reports the property, the
//! minimal input and the seed; the input is also written to `target/tmp/fuzz-findings/`, to
//! be kept in `tests/fuzz-regressions/` (one file per bug, named after what it exercises):
//! `requests/*.json` (a body that is JSON; the bytes of its fetched attachments, if any, in
//! the ignored field `_fuzz_attachment_bytes`, hex), `requests/*.bin` (any other body) and
//! `emails/*.eml`. `regressions_replay` runs every property on each of them, every run.
//! `scripts/fuzz.sh` (cargo fuzz, the targets in `fuzz/`) saves what it finds there too.
//!
//! The case counts are calibrated for about 40 s of the whole file in the debug build on two
//! cores when nothing fails (a failure adds up to 5 s of shrinking). `MAILBRIDGE_FUZZ_CASES=N` runs N cases per property test instead, when larger;
//! `MAILBRIDGE_FUZZ_SEED=S` replays a run (each failure prints its seed);
//! `MAILBRIDGE_FUZZ_IGNORE=piece|piece` passes over the failures whose message contains a
//! piece, to look past known bugs.

use std::cell::{Cell, RefCell};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Once;

use mailbridge::inbound::{self, InboundEmail, Origin, ParseError, RawAttachment};
use mailbridge::outbound::{
    self, FetchedAttachment, OutgoingEmail, RequestError, RequestIds, SendRequest, ValidRequest,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestError, TestRunner};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// The code under test. Every call goes through these, so a change of its signatures (the
// decoder is to take limits) is made here once.
// ---------------------------------------------------------------------------------------------

/// Decodes a request body, with the ids it names (within the default limits).
fn decode_request(body: &[u8]) -> (Result<SendRequest, RequestError>, RequestIds) {
    outbound::decode_with_ids(body, &outbound::Limits::default())
}

/// Validates a decoded request (within the default limits).
fn validate(request: SendRequest) -> Result<ValidRequest, RequestError> {
    request.validate(&outbound::Limits::default())
}

/// Builds the email of a valid request, with its fetched attachments.
fn build(
    valid: &ValidRequest,
    attachments: Vec<FetchedAttachment>,
) -> Result<OutgoingEmail, RequestError> {
    outbound::build_email(valid, attachments, true)
}

/// The text alternative of an HTML body.
fn html_to_text(html: &str) -> String {
    outbound::html_to_text(html)
}

/// Where fuzzed emails come from: no IMAP INTERNALDATE, so the Date header is used.
const ORIGIN: Origin<'static> = Origin {
    tenant_id: "01996243-2d8c-726d-a5c2-81b7005ce9a2",
    provider_id: "0198a819-e5d3-703a-a39a-1b77e3ece687",
    mailbox_id: "mailbox-1",
    user_id: "user-123",
    source: "imap",
    received_at: None,
};

/// Parses a received email into the inbound message.
fn parse_email(raw: &[u8]) -> Result<(InboundEmail, Vec<RawAttachment>), ParseError> {
    inbound::parse(raw, &ORIGIN)
}

/// The dedup key of a received email.
fn dedup_key(raw: &[u8]) -> String {
    inbound::dedup_key(raw)
}

// ---------------------------------------------------------------------------------------------
// Panics are caught per call, so a panic is reported with its input (and shrunk) instead of
// ending the run; the default hook stays silent for them.
// ---------------------------------------------------------------------------------------------

thread_local! {
    static QUIET: Cell<bool> = const { Cell::new(false) };
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if QUIET.with(Cell::get) {
                LAST_PANIC.with(|l| *l.borrow_mut() = Some(info.to_string()));
            } else {
                default(info);
            }
        }));
    });
}

/// Runs `f`, turning a panic into an error naming `what` (property `prop`) and the panic.
fn guarded<T>(prop: &str, what: &str, f: impl FnOnce() -> T) -> Result<T, String> {
    install_panic_hook();
    QUIET.with(|q| q.set(true));
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    QUIET.with(|q| q.set(false));
    result.map_err(|_| {
        let msg = LAST_PANIC
            .with(|l| l.borrow_mut().take())
            .unwrap_or_default();
        format!("{prop}: {what} panicked: {msg}")
    })
}

// ---------------------------------------------------------------------------------------------
// The properties, as checks shared by the property tests and the regression replay.
// ---------------------------------------------------------------------------------------------

/// Short, printable view of an input for a failure message.
fn preview(bytes: &[u8]) -> String {
    const MAX: usize = 600;
    let s = format!(
        "{:?}",
        String::from_utf8_lossy(&bytes[..bytes.len().min(MAX)])
    );
    if bytes.len() > MAX {
        format!("{s}… ({} bytes in all)", bytes.len())
    } else {
        s
    }
}

/// P1 and P2: decodes and validates `body`; the valid request when it is accepted.
fn check_decode(body: &[u8]) -> Result<Option<ValidRequest>, String> {
    let (decoded, ids) = guarded("P1", "decode", || decode_request(body))?;
    let peeked = guarded("P1", "RequestIds::peek", || RequestIds::peek(body))?;
    // JSON as the decoder reads it: UTF-8 text of JSON syntax (the values of fields it does
    // not know are skipped, not decoded: a lone surrogate escape in one does not matter).
    let is_json = std::str::from_utf8(body).is_ok()
        && serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok();
    let refusal = match decoded {
        Ok(request) => {
            let named = RequestIds {
                tenant_id: Some(request.tenant_id.clone()),
                message_id: Some(request.message_id.clone()),
                provider_id: Some(request.provider_id.clone()),
            };
            if !is_json {
                return Err(format!(
                    "P2: accepted, but the body is not UTF-8 JSON: {}",
                    preview(body)
                ));
            }
            if ids != named {
                return Err(format!(
                    "P2: the ids decode_with_ids names ({ids:?}) are not the accepted request's ({named:?})"
                ));
            }
            if peeked != named {
                return Err(format!(
                    "P2: RequestIds::peek ({peeked:?}) disagrees with the accepted request ({named:?})"
                ));
            }
            match guarded("P1", "validate", || validate(request))? {
                Ok(valid) => return Ok(Some(valid)),
                Err(e) => e,
            }
        }
        Err(e) => e,
    };
    match &refusal {
        // Nesting is refused before anything parses the body, JSON or not.
        RequestError::Invalid { field, reason }
            if field == "(request)" && reason.contains("nested deeper") => {}
        RequestError::Invalid { field, reason } => {
            if !is_json {
                return Err(format!(
                    "P2: the body is not JSON but was refused as Invalid ({refusal})"
                ));
            }
            if field.trim().is_empty() || reason.trim().is_empty() {
                return Err(format!(
                    "P2: a refusal without a field or reason: {refusal:?}"
                ));
            }
        }
        RequestError::NotJson(reason) => {
            if is_json {
                return Err(format!(
                    "P2: the body is JSON but was refused as NotJson ({reason})"
                ));
            }
        }
        // Over `max_request_bytes`: refused before it is parsed, JSON or not.
        RequestError::TooLarge { size, limit } => {
            if (*size as u64) <= *limit {
                return Err(format!(
                    "P2: refused as too large at {size} of {limit} bytes"
                ));
            }
        }
    }
    Ok(None)
}

/// P3: what an accepted request carries can be stored and put in headers.
fn check_accepted(valid: &ValidRequest) -> Result<(), String> {
    let r = &valid.request;
    let mut texts: Vec<(String, &str)> = vec![
        ("tenant_id".into(), &r.tenant_id),
        ("provider_id".into(), &r.provider_id),
        ("message_id".into(), &r.message_id),
        ("subject".into(), &r.subject),
        ("from".into(), &r.from),
    ];
    for (name, v) in [
        ("user_id", &r.user_id),
        ("template_id", &r.template_id),
        ("campaign_id", &r.campaign_id),
    ] {
        if let Some(v) = v {
            texts.push((name.into(), v));
        }
    }
    for (list, items) in [("to", &r.to), ("cc", &r.cc), ("bcc", &r.bcc)] {
        for (i, a) in items.iter().enumerate() {
            texts.push((format!("{list}[{i}]"), a));
        }
    }
    for (name, value) in &r.headers {
        texts.push((format!("headers.{name} (name)"), name));
        texts.push((format!("headers.{name}"), value));
    }
    for (i, a) in r.attachments.iter().enumerate() {
        texts.push((format!("attachments[{i}].filename"), &a.filename));
        texts.push((format!("attachments[{i}].mime_type"), &a.mime_type));
    }
    for (field, text) in &texts {
        if text.contains('\0') {
            return Err(format!(
                "P3: accepted with a NUL byte in `{field}` ({:?})",
                trunc(text)
            ));
        }
    }
    for (field, id) in [
        ("tenant_id", Some(&r.tenant_id)),
        ("provider_id", Some(&r.provider_id)),
        ("message_id", Some(&r.message_id)),
        ("user_id", r.user_id.as_ref()),
        ("template_id", r.template_id.as_ref()),
        ("campaign_id", r.campaign_id.as_ref()),
    ] {
        if let Some(id) = id {
            if id.len() > 255 {
                return Err(format!(
                    "P3: accepted with `{field}` of {} bytes (more than 255)",
                    id.len()
                ));
            }
        }
    }
    Ok(())
}

fn trunc(s: &str) -> String {
    s.chars().take(80).collect()
}

/// Which parts of P4 a check looks at: the line length is apart, since it fails today and
/// must not hide the rest.
#[derive(Clone, Copy, PartialEq, Eq)]
enum P4 {
    Shape,
    LineLength,
}

/// The attachments fetched for a valid request: its refs, with these bytes.
fn fetched(valid: &ValidRequest, bytes: &[Vec<u8>]) -> Vec<FetchedAttachment> {
    valid
        .request
        .attachments
        .iter()
        .enumerate()
        .map(|(i, a)| FetchedAttachment {
            filename: a.filename.clone(),
            mime_type: a.mime_type.clone(),
            bytes: bytes.get(i).cloned().unwrap_or_default(),
        })
        .collect()
}

/// P4: the email built from a valid request.
fn check_built(valid: &ValidRequest, attachment_bytes: &[Vec<u8>], part: P4) -> Result<(), String> {
    let attachments = fetched(valid, attachment_bytes);
    let email = match guarded("P4", "build_email", || build(valid, attachments))? {
        Ok(email) => email,
        Err(e) => return Err(format!("P4: a validated request cannot be built: {e}")),
    };
    let bytes = &email.bytes;
    if part == P4::LineLength {
        for (n, line) in bytes.split(|&b| b == b'\n').enumerate() {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.len() > 998 {
                return Err(format!(
                    "P4: line {} of the built email has {} octets (more than 998): {}",
                    n + 1,
                    line.len(),
                    preview(&line[..line.len().min(120)])
                ));
            }
        }
        return Ok(());
    }
    for (i, &b) in bytes.iter().enumerate() {
        let bare = match b {
            b'\r' => bytes.get(i + 1) != Some(&b'\n'),
            b'\n' => i == 0 || bytes[i - 1] != b'\r',
            _ => false,
        };
        if bare {
            return Err(format!(
                "P4: bare {} at byte {i} of the built email, near {}",
                if b == b'\r' { "CR" } else { "LF" },
                preview(&bytes[i.saturating_sub(60)..(i + 20).min(bytes.len())])
            ));
        }
        if b == 0 {
            return Err(format!(
                "P4: NUL at byte {i} of the built email, near {}",
                preview(&bytes[i.saturating_sub(60)..(i + 20).min(bytes.len())])
            ));
        }
    }
    let parsed = guarded("P4", "mail_parser on the built email", || {
        mail_parser::MessageParser::default().parse(&bytes[..])
    })?
    .ok_or_else(|| "P4: mail_parser cannot parse the built email".to_string())?;
    let r = &valid.request;
    if !r.subject.is_empty() {
        let got = parsed.subject().unwrap_or("");
        if got != r.subject {
            return Err(format!(
                "P4: the Subject decodes to {:?}, not the request's {:?}",
                trunc(got),
                trunc(&r.subject)
            ));
        }
    }
    let addresses = |a: Option<&mail_parser::Address>| -> Vec<String> {
        a.map(|a| {
            a.iter()
                .map(|x| x.address().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default()
    };
    for (header, got, want) in [
        ("To", addresses(parsed.to()), &valid.to),
        ("Cc", addresses(parsed.cc()), &valid.cc),
    ] {
        let want: Vec<String> = want.iter().map(|m| m.email.to_string()).collect();
        let same =
            got.len() == want.len() && got.iter().zip(&want).all(|(g, w)| same_address(g, w));
        if !same {
            return Err(format!(
                "P4: the {header} header carries {got:?}, not the request's {want:?}"
            ));
        }
    }
    let head_end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(bytes.len());
    let has_bcc = bytes[..head_end]
        .split(|&b| b == b'\n')
        .any(|l| l.len() >= 4 && l[..4].eq_ignore_ascii_case(b"bcc:"));
    if has_bcc || parsed.bcc().is_some() {
        return Err("P4: the built email has a Bcc header".into());
    }
    let envelope: Vec<String> = email.envelope.to().iter().map(|a| a.to_string()).collect();
    for m in valid.to.iter().chain(&valid.cc).chain(&valid.bcc) {
        let a = m.email.to_string();
        if !envelope.contains(&a) {
            return Err(format!(
                "P4: the envelope {envelope:?} lacks the recipient {a:?}"
            ));
        }
    }
    Ok(())
}

/// Whether two spellings are the same address: a quoted local part is the same as the
/// unquoted one (`"x"@a.com` is `x@a.com`), and a domain the same as its IDNA form, in any case.
fn same_address(a: &str, b: &str) -> bool {
    let norm = |s: &str| -> (String, String) {
        let (local, domain) = s.rsplit_once('@').unwrap_or((s, ""));
        let local = local.replace(['"', '\\'], "");
        let domain = url::Host::parse(domain)
            .map(|h| h.to_string())
            .unwrap_or_else(|_| domain.to_string())
            .to_lowercase();
        (local, domain)
    };
    norm(a) == norm(b)
}

/// P5 and P6: parses a received email.
fn check_parse(raw: &[u8]) -> Result<(), String> {
    let parsed = guarded("P5", "inbound::parse", || parse_email(raw))?;
    let Ok((email, _attachments)) = parsed else {
        return Ok(());
    };
    let json = serde_json::to_vec(&email)
        .map_err(|e| format!("P6: the parsed email does not serialize to JSON: {e}"))?;
    serde_json::from_slice::<Value>(&json)
        .map_err(|e| format!("P6: the JSON of the parsed email does not parse back: {e}"))?;
    let mut ids = vec![("message_id", email.message_id.as_str())];
    if let Some(id) = &email.in_reply_to {
        ids.push(("in_reply_to", id));
    }
    if let Some(refs) = &email.references {
        ids.extend(refs.split(',').map(|id| ("references", id)));
    }
    for (field, id) in ids {
        if id.contains(['<', '>']) {
            return Err(format!(
                "P6: `{field}` has an angle bracket: {:?}",
                trunc(id)
            ));
        }
    }
    if !["HTML", "TEXT"].contains(&email.body_format) {
        return Err(format!("P6: body_format is {:?}", email.body_format));
    }
    Ok(())
}

/// P5 and P7: the dedup key of a received email. `storable` checks its length and
/// characters (which fail today); determinism and panics are always checked.
fn check_dedup(raw: &[u8], storable: bool) -> Result<(), String> {
    let key = guarded("P5", "dedup_key", || dedup_key(raw))?;
    let again = guarded("P5", "dedup_key", || dedup_key(raw))?;
    if key != again {
        return Err(format!(
            "P7: dedup_key is not deterministic: {:?} then {:?}",
            trunc(&key),
            trunc(&again)
        ));
    }
    if storable {
        if key.len() > 1024 {
            return Err(format!(
                "P7: dedup_key has {} bytes (more than 1024): {:?}…",
                key.len(),
                trunc(&key)
            ));
        }
        if let Some(c) = key.chars().find(|c| c.is_control()) {
            return Err(format!(
                "P7: dedup_key has the control character {c:?}: {:?}",
                trunc(&key)
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Running a property: case counts, seed, shrinking bounds, and where a finding is written.
// ---------------------------------------------------------------------------------------------

fn cases(default: u32) -> u32 {
    std::env::var("MAILBRIDGE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok())
        .map_or(default, |n| n.max(default))
}

fn seed() -> u64 {
    if let Some(s) = std::env::var("MAILBRIDGE_FUZZ_SEED")
        .ok()
        .and_then(|v| v.trim().parse().ok())
    {
        return s;
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (t.as_nanos() as u64) ^ (u64::from(std::process::id()) << 32)
}

/// `MAILBRIDGE_FUZZ_IGNORE`: failures to pass over, as `|`-separated pieces of their
/// messages (e.g. `P7: dedup_key has|P4: line`), to look past known bugs in a long run.
fn ignored_failures() -> Vec<String> {
    std::env::var("MAILBRIDGE_FUZZ_IGNORE")
        .unwrap_or_default()
        .split('|')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

fn findings_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-findings")
}

/// Runs `check` on `default_cases` generated values (see [`cases`]); on a failure, shrinks it,
/// writes the minimal input (`save` gives its bytes and file extension) and panics with it.
fn fuzz<S>(
    name: &str,
    default_cases: u32,
    strategy: S,
    save: impl Fn(&S::Value) -> (Vec<u8>, &'static str),
    check: impl Fn(&S::Value) -> Result<(), String>,
) where
    S: Strategy,
{
    let seed = seed();
    let config = Config {
        cases: cases(default_cases),
        failure_persistence: None,
        max_shrink_iters: 4096,
        max_shrink_time: 5_000,
        max_global_rejects: 100_000,
        rng_seed: RngSeed::Fixed(seed),
        ..Config::default()
    };
    let ignored = ignored_failures();
    let mut runner = TestRunner::new(config);
    let result = runner.run(&strategy, |v| match check(&v) {
        Err(e) if !ignored.iter().any(|i| e.contains(i.as_str())) => Err(TestCaseError::fail(e)),
        _ => Ok(()),
    });
    match result {
        Ok(()) => {}
        Err(TestError::Fail(reason, value)) => {
            let (bytes, ext) = save(&value);
            let dir = findings_dir();
            let path = dir.join(format!("{name}.{ext}"));
            let written = std::fs::create_dir_all(&dir)
                .and_then(|_| std::fs::write(&path, &bytes))
                .map(|_| path.display().to_string())
                .unwrap_or_else(|e| format!("(not written: {e})"));
            panic!(
                "{name}: {reason}\nminimal input ({} bytes), written to {written}:\n{}\nreplay with MAILBRIDGE_FUZZ_SEED={seed}",
                bytes.len(),
                preview(&bytes)
            );
        }
        Err(TestError::Abort(reason)) => panic!("{name}: aborted: {reason} (seed {seed})"),
    }
}

fn save_bytes(v: &[u8]) -> (Vec<u8>, &'static str) {
    let ext = if serde_json::from_slice::<Value>(v).is_ok() {
        "json"
    } else {
        "bin"
    };
    (v.to_vec(), ext)
}

fn save_eml(v: &[u8]) -> (Vec<u8>, &'static str) {
    (v.to_vec(), "eml")
}

/// A request with the attachment bytes of a P4 case, as a regression file keeps it: the
/// bytes go in the (ignored) field `_fuzz_attachment_bytes`, hex-encoded.
fn save_with_attachments(v: &(Vec<u8>, Vec<Vec<u8>>)) -> (Vec<u8>, &'static str) {
    let (body, bytes) = v;
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(mut map)) if !bytes.is_empty() => {
            map.insert(
                ATTACHMENT_BYTES.into(),
                Value::Array(bytes.iter().map(|b| Value::String(hex(b))).collect()),
            );
            (serde_json::to_vec(&Value::Object(map)).unwrap(), "json")
        }
        _ => save_bytes(body),
    }
}

const ATTACHMENT_BYTES: &str = "_fuzz_attachment_bytes";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .filter_map(|i| u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Generators: strings, addresses, headers, attachments, requests.
// ---------------------------------------------------------------------------------------------

/// `select` over byte strings (kept in a const, as `select` needs them `'static`).
macro_rules! bsel {
    ($($b:expr),* $(,)?) => {{
        const V: &[&[u8]] = &[$($b),*];
        select(V)
    }};
}

/// Pieces odd strings are made of: every Unicode class that matters here.
const PIECES: &[&str] = &[
    "a",
    "Z",
    "0",
    "word ",
    " ",
    "  ",
    "\t",
    "\0",
    "\r",
    "\n",
    "\r\n",
    "\u{1}",
    "\u{b}",
    "\u{1b}[31m",
    "\u{7f}",
    "\u{85}",
    "\u{a0}",
    "\u{ad}",
    "\u{2028}",
    "\u{2029}",
    "\u{200b}",
    "\u{200f}",
    "\u{202e}",
    "\u{2066}",
    "\u{feff}",
    "\u{fffd}",
    "\u{fffe}",
    "\u{10ffff}",
    "\u{e000}",
    "é",
    "e\u{301}",
    "ß",
    "İ",
    "日本語",
    "مرحبا",
    "שלום",
    "😀",
    "👨\u{200d}👩\u{200d}👧",
    "🇩🇪",
    "=?utf-8?B?SGk=?=",
    "=?",
    "?=",
    "=",
    "<",
    ">",
    "\"",
    "\\",
    "'",
    ",",
    ";",
    ":",
    "@",
    "(",
    ")",
    "&",
    "&amp;",
    "&#0;",
    "&#x110000;",
    "&#xD800;",
    "&#99999999999;",
    "&nbsp",
    "<p>",
    "</p>",
    "<br>",
    "<li>",
    "<script>",
    "</script>",
    "<!--",
    "%00",
    ".",
    "\r\n.\r\n",
    "From ",
    "--",
];

fn pieces(max: usize) -> impl Strategy<Value = String> {
    vec(select(PIECES), 0..max).prop_map(|v| v.concat())
}

/// A long string: one piece repeated, up to a few MB in a few cases.
fn long_string() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        4 => Just("x".to_string()),
        2 => Just("word ".to_string()),
        1 => select(PIECES).prop_map(str::to_string),
        1 => "[a-zA-Z0-9 ]{1,8}",
        1 => pieces(4),
    ];
    let count = prop_oneof![
        30 => 200..1_500usize,
        10 => 1_500..20_000usize,
        1 => 200_000..1_500_000usize,
    ];
    (piece, count).prop_map(|(p, n)| {
        let n = if p.len() > 1 { n / p.len() + 1 } else { n };
        p.repeat(n)
    })
}

/// Any string: plain, pieces, any chars, or long.
fn odd_string() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-zA-Z0-9 ._-]{0,24}",
        4 => pieces(12),
        2 => vec(any::<char>(), 0..24).prop_map(String::from_iter),
        1 => long_string(),
    ]
}

/// A string with no CR, LF or NUL: what validation lets through, to reach the builder.
fn header_safe_string() -> impl Strategy<Value = String> {
    odd_string().prop_map(|s| s.replace(['\r', '\n', '\0'], ""))
}

fn address() -> impl Strategy<Value = String> {
    let local = prop_oneof![
        6 => "[a-z0-9]{1,12}",
        1 => Just("user+tag".to_string()),
        1 => Just("first.last".to_string()),
        1 => Just("\"quoted local\"".to_string()),
        1 => Just("\"a@b\"".to_string()),
        1 => Just("\"\\\"x\\\"\"".to_string()),
        1 => Just("用户".to_string()),
        1 => Just("jörg".to_string()),
        1 => "[a-z]{60,70}",
        1 => Just("!#$%&'*+-/=?^_`{|}~".to_string()),
        1 => Just("a..b".to_string()),
        1 => Just(".a".to_string()),
        1 => Just("UPPER".to_string()),
    ];
    let domain = prop_oneof![
        6 => "[a-z]{1,10}\\.(com|org|de)",
        1 => Just("bücher.de".to_string()),
        1 => Just("例子.广告".to_string()),
        1 => Just("xn--bcher-kva.de".to_string()),
        1 => Just("[127.0.0.1]".to_string()),
        1 => Just("[IPv6:::1]".to_string()),
        1 => Just("localhost".to_string()),
        1 => "[a-z]{60,66}\\.[a-z]{60,66}\\.com",
        1 => Just("-a.com".to_string()),
        1 => Just("EXAMPLE.COM".to_string()),
        1 => Just("a.b.c.d.e.f.g.h.example".to_string()),
    ];
    let name = prop_oneof![
        3 => "[A-Za-z]{1,10}( [A-Za-z]{1,10})?",
        1 => Just("Doe, John".to_string()),
        1 => Just("José Müller".to_string()),
        1 => Just("محمد".to_string()),
        1 => Just("😀 Team".to_string()),
        1 => Just("=?utf-8?q?J=C3=B6rg?=".to_string()),
        1 => Just("a \"quoted\" b".to_string()),
        1 => header_safe_string(),
    ];
    let form = prop_oneof![
        6 => Just(0u8),
        2 => Just(1u8),
        2 => Just(2u8),
        1 => Just(3u8),
        1 => Just(4u8),
    ];
    (local, domain, name, form).prop_map(|(l, d, n, form)| match form {
        0 => format!("{l}@{d}"),
        1 => format!("\"{n}\" <{l}@{d}>"),
        2 => format!("{n} <{l}@{d}>"),
        3 => format!("  <{l}@{d}>  "),
        _ => format!(" {l}@{d}\t"),
    })
}

/// A recipient list, up to `max` long. (Building an email is quadratic in its recipients:
/// 500 take seconds in the debug build, so the lists that get built stay short.)
fn address_list(max: usize) -> impl Strategy<Value = Vec<String>> {
    prop_oneof![
        20 => vec(address(), 1..4),
        2 => vec(address(), 0..40),
        1 => (address(), 40..max).prop_map(|(a, n)| {
            (0..n).map(|i| format!("r{i}.{}", a.trim())).collect()
        }),
    ]
}

fn header_name() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => "X-[A-Za-z0-9-]{1,20}",
        1 => select(&[
            "Subject", "BCC", "bcc", "Message-Id", "X-Priority", "Reply-To", "List-Unsubscribe",
            "In-Reply-To", "References", "DKIM-Signature", "Return-Path", "MIME-Version",
            "Comments", "Keywords", "X-Ü", "X A", "X:A", "", "\u{1}", "x\u{7f}",
        ][..])
        .prop_map(str::to_string),
        1 => "[!-~]{1,80}",
        1 => "X-[a-z]{70,76}",
    ]
}

fn header_value() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[ -~]{0,40}",
        3 => header_safe_string(),
        1 => odd_string(),
        1 => (select(&["x", "word ", "é", "😀 "][..]), 850..=910usize).prop_map(|(p, n)| {
            let mut s = p.repeat(n);
            s.truncate(s.char_indices().nth(n).map_or(s.len(), |(i, _)| i));
            s
        }),
    ]
}

fn headers() -> impl Strategy<Value = Value> {
    vec((header_name(), header_value()), 0..5)
        .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k, Value::String(v))).collect()))
}

const URLS: &[&str] = &[
    "https://example.com/files/document.pdf",
    "http://127.0.0.1:8080/a?b=c#d",
    "http://[::1]/x",
    "https://bücher.de/ä?q=ü",
    "https://user:pass@example.com:65535/",
    "https://example.com/%00",
    "https://ex ample.com/",
    "https://example.com:99999/",
    "file:///etc/passwd",
    "ftp://example.com/x",
    "javascript:alert(1)",
    "data:text/plain,hi",
    "//example.com/x",
    "",
    "https://",
];

const MIME_TYPES: &[&str] = &[
    "application/pdf",
    "text/plain",
    "text/plain; charset=utf-8",
    "text/plain; charset=\"iso-8859-1\"",
    "text/html",
    "text/csv",
    "image/png",
    "application/octet-stream",
    "message/rfc822",
    "multipart/mixed",
    "application/x-ü",
    "text",
    "a/b/c",
    "",
    "text/plain; name=\"a\0b\"",
    "TEXT/PLAIN",
];

fn mime_type() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => select(MIME_TYPES).prop_map(str::to_string),
        2 => "[a-z]{1,10}/[a-z0-9.+-]{1,12}",
        1 => odd_string(),
    ]
}

fn attachment_ref() -> impl Strategy<Value = Value> {
    let filename = prop_oneof![
        4 => "[a-z]{1,10}\\.(pdf|txt|png)",
        1 => Just("résumé 2025.pdf".to_string()),
        1 => Just("\"quoted\"; name=x.pdf".to_string()),
        1 => Just("../../etc/passwd".to_string()),
        2 => header_safe_string(),
        1 => odd_string(),
    ];
    let url = prop_oneof![
        8 => select(&URLS[..4]).prop_map(str::to_string),
        1 => select(URLS).prop_map(str::to_string),
        1 => odd_string(),
    ];
    (filename, url, mime_type())
        .prop_map(|(f, u, m)| json!({"filename": f, "url": u, "mime_type": m}))
}

/// The guide's example request (tests/common's `guide_request`, with one attachment).
fn guide() -> serde_json::Map<String, Value> {
    match common::guide_request(
        "01996243-2d8c-726d-a5c2-81b7005ce9a2",
        "0198a819-e5d3-703a-a39a-1b77e3ece687",
        "unique-message-id",
        Some("https://example.com/files/document.pdf"),
    ) {
        Value::Object(map) => map,
        _ => unreachable!("the guide request is an object"),
    }
}

mod common;

/// The longest recipient list of a request that is only decoded and validated.
const LONG_LIST: usize = 2_000;
/// The longest recipient list of a request that is built.
const BUILT_LIST: usize = 120;

const FIELDS: &[&str] = &[
    "tenant_id",
    "provider_id",
    "user_id",
    "message_id",
    "from",
    "to",
    "cc",
    "bcc",
    "subject",
    "body_format",
    "body_content",
    "attachments",
    "headers",
    "template_id",
    "campaign_id",
    "timestamp",
];

/// An id: usually fine, sometimes odd or long.
fn id_string() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => "[a-z0-9-]{1,36}",
        2 => odd_string(),
        1 => (Just("i"), 250..=260usize).prop_map(|(p, n)| p.repeat(n)),
        1 => (select(&["é", "😀", "a\0"][..]), 60..=130usize).prop_map(|(p, n)| p.repeat(n)),
    ]
}

fn body_content() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[ -~\n]{0,200}",
        3 => pieces(40),
        1 => vec(any::<char>(), 0..200).prop_map(String::from_iter),
        1 => long_string(),
        1 => (pieces(6), 1..400usize).prop_map(|(p, n)| p.repeat(n)),
    ]
}

/// A value for `field` that a CRM might plausibly send: mostly accepted, but odd.
fn plausible_value(field: &'static str, max_list: usize) -> BoxedStrategy<Value> {
    let opt = |s: BoxedStrategy<String>| -> BoxedStrategy<Value> {
        prop_oneof![8 => s.prop_map(Value::String), 1 => Just(Value::Null)].boxed()
    };
    match field {
        "tenant_id" | "provider_id" | "message_id" => id_string().prop_map(Value::String).boxed(),
        "user_id" | "template_id" | "campaign_id" => opt(id_string().boxed()),
        "timestamp" => opt(odd_string().boxed()),
        "from" => address().prop_map(Value::String).boxed(),
        "to" | "cc" | "bcc" => address_list(max_list).prop_map(|v| json!(v)).boxed(),
        "subject" => prop_oneof![
            3 => header_safe_string(),
            1 => long_string().prop_map(|s| s.replace(['\r', '\n', '\0'], "")),
            1 => Just(String::new()),
        ]
        .prop_map(Value::String)
        .boxed(),
        "body_format" => select(&["HTML", "TEXT", "html", "Text"][..])
            .prop_map(|s| Value::String(s.into()))
            .boxed(),
        "body_content" => body_content().prop_map(Value::String).boxed(),
        "attachments" => vec(attachment_ref(), 0..=3).prop_map(Value::Array).boxed(),
        "headers" => headers().boxed(),
        _ => unreachable!("{field}"),
    }
}

/// The guide's request with some fields replaced by plausible odd values; recipient lists
/// up to `max_list` long.
fn plausible_request(max_list: usize) -> impl Strategy<Value = Value> {
    let edit = select(FIELDS)
        .prop_flat_map(move |f| plausible_value(f, max_list).prop_map(move |v| (f, v)));
    vec(edit, 0..6).prop_map(|edits| {
        let mut map = guide();
        for (field, value) in edits {
            map.insert(field.to_string(), value);
        }
        Value::Object(map)
    })
}

/// Attachment bytes: random, text with bare CR/LF/NUL and long lines, sometimes large.
fn attachment_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => vec(any::<u8>(), 0..300),
        3 => vec(bsel!(b"line", b"\r", b"\n", b"\r\n", b"\0", b" ", b"\xe9", b"=", b"."), 0..60)
            .prop_map(|v| v.concat()),
        1 => (bsel!(b"x", b"ab\r", b"\n"), 900..3_000usize).prop_map(|(p, n)| p.repeat(n)),
        1 => (vec(any::<u8>(), 1..64), 300..1_500usize).prop_map(|(b, n)| b.repeat(n)),
    ]
}

// --- Raw JSON, for what serde_json::Value cannot hold: duplicate keys, lone surrogate
// escapes, invalid UTF-8, odd numbers, nesting thousands deep. ---

#[derive(Debug, Clone)]
enum Seg {
    Text(String),
    /// Every char as a `\uXXXX` escape (surrogate pairs for the astral ones).
    Escaped(String),
    /// Written as is between the quotes.
    Raw(&'static str),
    /// Bytes written as is: invalid UTF-8.
    Bytes(Vec<u8>),
}

#[derive(Debug, Clone)]
enum J {
    Null,
    Bool(bool),
    Num(&'static str),
    Str(Vec<Seg>),
    Arr(Vec<J>),
    /// Keys in order, duplicates kept.
    Obj(Vec<(Vec<Seg>, J)>),
    /// `inner` nested `depth` times in arrays (or objects under key "a").
    Deep {
        depth: usize,
        arrays: bool,
        inner: Box<J>,
    },
}

impl J {
    fn text(s: impl Into<String>) -> Self {
        J::Str(vec![Seg::Text(s.into())])
    }

    fn from_value(v: &Value) -> Self {
        match v {
            Value::Null => J::Null,
            Value::Bool(b) => J::Bool(*b),
            Value::Number(n) if n.is_i64() => J::Num(if n.as_i64() == Some(1) { "1" } else { "0" }),
            Value::Number(_) => J::Num("1.5"),
            Value::String(s) => J::text(s.clone()),
            Value::Array(a) => J::Arr(a.iter().map(J::from_value).collect()),
            Value::Object(m) => J::Obj(
                m.iter()
                    .map(|(k, v)| (vec![Seg::Text(k.clone())], J::from_value(v)))
                    .collect(),
            ),
        }
    }

    fn render(&self, out: &mut Vec<u8>) {
        match self {
            J::Null => out.extend_from_slice(b"null"),
            J::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
            J::Num(n) => out.extend_from_slice(n.as_bytes()),
            J::Str(segs) => render_str(segs, out),
            J::Arr(items) => {
                out.push(b'[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    item.render(out);
                }
                out.push(b']');
            }
            J::Obj(fields) => {
                out.push(b'{');
                for (i, (k, v)) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    render_str(k, out);
                    out.push(b':');
                    v.render(out);
                }
                out.push(b'}');
            }
            J::Deep {
                depth,
                arrays,
                inner,
            } => {
                let (open, close): (&[u8], &[u8]) = if *arrays {
                    (b"[", b"]")
                } else {
                    (b"{\"a\":", b"}")
                };
                for _ in 0..*depth {
                    out.extend_from_slice(open);
                }
                inner.render(out);
                for _ in 0..*depth {
                    out.extend_from_slice(close);
                }
            }
        }
    }
}

fn render_str(segs: &[Seg], out: &mut Vec<u8>) {
    out.push(b'"');
    for seg in segs {
        match seg {
            Seg::Text(t) => {
                let quoted = serde_json::to_string(t).unwrap();
                out.extend_from_slice(&quoted.as_bytes()[1..quoted.len() - 1]);
            }
            Seg::Escaped(t) => {
                let mut units = [0u16; 2];
                for c in t.chars() {
                    for u in c.encode_utf16(&mut units) {
                        out.extend_from_slice(format!("\\u{u:04x}").as_bytes());
                    }
                }
            }
            Seg::Raw(r) => out.extend_from_slice(r.as_bytes()),
            Seg::Bytes(b) => out.extend_from_slice(b),
        }
    }
    out.push(b'"');
}

fn render(j: &J) -> Vec<u8> {
    let mut out = Vec::new();
    j.render(&mut out);
    out
}

/// Escapes, valid and not, written raw inside a JSON string.
const RAW_ESCAPES: &[&str] = &[
    "\\ud800",
    "\\udfff",
    "\\ud800\\u0041",
    "\\udbff\\udfff",
    "\\ud83d\\ude00",
    "\\u0000",
    "\\u001f",
    "\\u2028",
    "\\r\\n",
    "\\/",
    "\\x41",
    "\\u12",
    "\\",
    "\u{7}",
    "\t",
];

fn json_str() -> impl Strategy<Value = Vec<Seg>> {
    let seg = prop_oneof![
        6 => odd_string().prop_map(Seg::Text),
        2 => pieces(6).prop_map(Seg::Escaped),
        2 => select(RAW_ESCAPES).prop_map(Seg::Raw),
        1 => vec(any::<u8>(), 1..6).prop_map(Seg::Bytes),
    ];
    vec(seg, 0..4)
}

fn any_json() -> impl Strategy<Value = J> {
    let leaf = prop_oneof![
        Just(J::Null),
        any::<bool>().prop_map(J::Bool),
        select(
            &[
                "0",
                "-0",
                "1",
                "-1",
                "1.5",
                "1e999",
                "-1e-999",
                "18446744073709551616",
                "123456789012345678901234567890",
                "01",
                "1.",
                ".5",
                "NaN",
                "Infinity",
                "0x10",
            ][..]
        )
        .prop_map(J::Num),
        json_str().prop_map(J::Str),
    ];
    let tree = leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(J::Arr),
            vec((json_str(), inner), 0..6).prop_map(J::Obj),
        ]
    });
    prop_oneof![
        12 => tree,
        1 => (prop_oneof![1..200usize, 200..6_000usize], any::<bool>()).prop_map(|(depth, arrays)| J::Deep {
            depth,
            arrays,
            inner: Box::new(J::text("user@example.com")),
        }),
    ]
}

/// One change to the guide's request, for the hostile generator.
#[derive(Debug, Clone)]
enum Edit {
    Remove(usize),
    Set(usize, J),
    /// The field again, after the others: a duplicate key.
    Duplicate(usize, J),
    Unknown(Vec<Seg>, J),
    /// The whole body replaced.
    Root(J),
}

fn hostile_value(field: &'static str) -> BoxedStrategy<J> {
    prop_oneof![
        4 => any_json(),
        3 => plausible_value(field, LONG_LIST).prop_map(|v| J::from_value(&v)),
        2 => json_str().prop_map(J::Str),
        1 => Just(J::Null),
    ]
    .boxed()
}

fn edit() -> impl Strategy<Value = Edit> {
    let field = 0..FIELDS.len();
    prop_oneof![
        2 => field.clone().prop_map(Edit::Remove),
        8 => field.clone().prop_flat_map(|i| hostile_value(FIELDS[i]).prop_map(move |v| Edit::Set(i, v))),
        2 => field.prop_flat_map(|i| hostile_value(FIELDS[i]).prop_map(move |v| Edit::Duplicate(i, v))),
        1 => (json_str(), any_json()).prop_map(|(k, v)| Edit::Unknown(k, v)),
        1 => any_json().prop_map(Edit::Root),
    ]
}

fn hostile_request() -> impl Strategy<Value = Vec<u8>> {
    vec(edit(), 0..5).prop_map(|edits| {
        let mut fields: Vec<(String, J)> = guide()
            .iter()
            .map(|(k, v)| (k.clone(), J::from_value(v)))
            .collect();
        let mut extra: Vec<(Vec<Seg>, J)> = Vec::new();
        let mut root = None;
        for e in edits {
            match e {
                Edit::Remove(i) => fields.retain(|(k, _)| k != FIELDS[i]),
                Edit::Set(i, v) => match fields.iter_mut().find(|(k, _)| k == FIELDS[i]) {
                    Some(slot) => slot.1 = v,
                    None => fields.push((FIELDS[i].to_string(), v)),
                },
                Edit::Duplicate(i, v) => extra.push((vec![Seg::Text(FIELDS[i].to_string())], v)),
                Edit::Unknown(k, v) => extra.push((k, v)),
                Edit::Root(j) => root = Some(j),
            }
        }
        let doc = root.unwrap_or_else(|| {
            J::Obj(
                fields
                    .into_iter()
                    .map(|(k, v)| (vec![Seg::Text(k)], v))
                    .chain(extra)
                    .collect(),
            )
        });
        render(&doc)
    })
}

// --- Byte mutations, for JSON and emails alike. ---

#[derive(Debug, Clone)]
enum Mutation {
    /// At a position given as a fraction of the length (so it shrinks toward the start).
    Flip(u16, u8),
    Insert(u16, Vec<u8>),
    Delete(u16, u16),
    Truncate(u16),
    /// Duplicates a slice in place.
    Repeat(u16, u16, u8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let at = any::<u16>();
    prop_oneof![
        3 => (at, any::<u8>()).prop_map(|(p, b)| Mutation::Flip(p, b)),
        3 => (at, prop_oneof![
            vec(any::<u8>(), 1..8),
            bsel!(b"\r\n", b"\n", b"\r", b"\0", b"\"", b"{", b"[", b"}", b"\\u", b"\xff", b"--", b": ", b"\r\n\r\n", b"=?", b"<", b">").prop_map(<[u8]>::to_vec),
        ]).prop_map(|(p, b)| Mutation::Insert(p, b)),
        2 => (at, 1..64u16).prop_map(|(p, n)| Mutation::Delete(p, n)),
        1 => at.prop_map(Mutation::Truncate),
        1 => (at, 1..64u16, 1..20u8).prop_map(|(p, n, k)| Mutation::Repeat(p, n, k)),
    ]
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    let pos = |len: usize, f: u16| (len as u64 * u64::from(f) / 65_536) as usize;
    for m in mutations {
        let len = bytes.len();
        match m {
            Mutation::Flip(p, b) if len > 0 => {
                let i = pos(len, *p);
                bytes[i] ^= b | 1;
            }
            Mutation::Insert(p, b) => {
                let i = pos(len + 1, *p);
                bytes.splice(i..i, b.iter().copied());
            }
            Mutation::Delete(p, n) => {
                let i = pos(len, *p);
                let end = (i + usize::from(*n)).min(len);
                bytes.drain(i..end);
            }
            Mutation::Truncate(p) => bytes.truncate(pos(len, *p)),
            Mutation::Repeat(p, n, k) => {
                let i = pos(len, *p);
                let end = (i + usize::from(*n)).min(len);
                let slice = bytes[i..end].to_vec();
                for _ in 0..*k {
                    bytes.splice(end..end, slice.iter().copied());
                }
            }
            Mutation::Flip(..) => {}
        }
    }
    bytes
}

fn mutated_request() -> impl Strategy<Value = Vec<u8>> {
    let base = prop_oneof![
        3 => plausible_request(LONG_LIST).prop_map(|v| serde_json::to_vec(&v).unwrap()),
        1 => plausible_request(LONG_LIST).prop_map(|v| serde_json::to_vec_pretty(&v).unwrap()),
    ];
    (base, vec(mutation(), 1..6)).prop_map(|(b, m)| mutate(b, &m))
}

// ---------------------------------------------------------------------------------------------
// Generators: emails.
// ---------------------------------------------------------------------------------------------

fn msg_id() -> impl Strategy<Value = Vec<u8>> {
    let plain = ("[a-z0-9.$-]{1,20}", "[a-z0-9.-]{1,12}").prop_map(|(l, d)| format!("<{l}@{d}>"));
    prop_oneof![
        10 => plain.prop_map(String::into_bytes),
        1 => "[a-z0-9]{1,10}@[a-z]{1,8}".prop_map(String::into_bytes),
        4 => bsel!(
            b"<a><b>", b"<<a@b>>", b"<a b@c>", b"< a@b >", b"<>", b"", b"<a@b", b"a@b>",
            b"<a,b@c>", b"<a@b>,<c@d>", b"(comment) <a@b>", b"<a@b> (comment)", b"<a\0b@c>",
            b"<a\x01\x1b\x7f@c>", b"<\xe9t\xe9@h\xf4te>", b"<\xc3\xa9@x>", b"=?utf-8?B?PGFAYj4=?=",
            b"<a@b>\r\n <c@d>", b"<\"q\"@x>", b"<a@[1.2.3.4]>", b"\t<a@b>\t", b"<a>b@c>", b"<a<b@c>",
        ).prop_map(<[u8]>::to_vec),
        1 => (bsel!(b"x", b"\0", b"\x01", b"\xe9", b"<", b" "), 300..3_000usize)
            .prop_map(|(p, n)| [&b"<"[..], &p.repeat(n), b"@h>"].concat()),
        1 => vec(any::<u8>(), 0..30),
    ]
}

fn references() -> impl Strategy<Value = Vec<u8>> {
    let sep = bsel!(b" ", b"\r\n ", b",", b"", b"\t");
    prop_oneof![
        4 => (vec(msg_id(), 0..6), sep.clone()).prop_map(|(ids, s)| ids.join(s)),
        1 => (vec(msg_id(), 1..4), 30..150usize, sep)
            .prop_map(|(ids, n, s)| ids.join(s).repeat(n)),
    ]
}

fn odd_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => "[ -~]{0,40}".prop_map(String::into_bytes),
        3 => pieces(10).prop_map(String::into_bytes),
        2 => bsel!(
            b"=?utf-8?B?SGVsbG8gV29ybGQ=?=", b"=?utf-8?Q?Gr=C3=BC=C3=9Fe?=", b"=?iso-8859-1?q?caf=E9?=",
            b"=?x-unknown?Q?abc?=", b"=?utf-8?B?!!!?=", b"=?utf-8?X?abc?=", b"=?utf-8?Q?a", b"=??=",
            b"=?utf-8*de?q?x?=", b"=?UTF-7?B?K1pnQS0=?=", b"=?shift_jis?B?gqCCog==?=", b"=?utf-16?B?2D3eAA==?=",
            b"caf\xe9", b"\xff\xfe\x00a", b"\xc3\x28", b"a\0b", b"\x1b[31mred",
        ).prop_map(<[u8]>::to_vec),
        1 => vec(any::<u8>(), 0..40),
        1 => (bsel!(b"x", b"word ", b"\xe9", b"=?utf-8?B?w6k=?= "), 300..4_000usize)
            .prop_map(|(p, n)| p.repeat(n)),
    ]
}

fn email_address_list() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => vec(address(), 1..4).prop_map(|v| v.join(", ").into_bytes()),
        1 => bsel!(
            b"undisclosed-recipients:;", b"Group: a@b, c@d;", b"=?utf-8?q?J=C3=B6rg?= <j@x>",
            b"\"Doe, John\" <j@x>", b"<>", b"@", b"a@", b"<a@b", b"J\xf6rg <j@x>", b"a@b (c)",
        ).prop_map(<[u8]>::to_vec),
        1 => odd_bytes(),
        1 => (vec(address(), 1..4), 30..100usize)
            .prop_map(|(v, n)| format!("{}, ", v.join(", ")).repeat(n).into_bytes()),
    ]
}

fn date() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => Just(b"Fri, 19 Sep 2025 10:30:00 +0000".to_vec()),
        3 => bsel!(
            b"19 Sep 2025 10:30 GMT", b"Mon, 31 Feb 99999 25:61:61 +9999", b"Thu, 01 Jan 1970 00:00:00 -2400",
            b"Sat, 1 Jan 0000 00:00:00 +0000", b"Fri, 31 Dec 9999 23:59:59 -9959", b"0", b"",
            b"Tue, 19 Jan 2038 03:14:08 +0000", b"Mon, 1 Jan 1 1:1:1 +1", b"-1", b"Sun, 99 Xyz 18446744073709551616 99:99:99 +99999",
        ).prop_map(<[u8]>::to_vec),
        1 => (1u32..4_000_000_000, 0u32..100, -3000i32..3000).prop_map(|(y, d, z)| {
            format!("Fri, {d} Sep {y} 10:30:00 {z:+05}").into_bytes()
        }),
        1 => odd_bytes(),
    ]
}

/// A header (name, value) of a top-level message.
fn top_header() -> impl Strategy<Value = (String, Vec<u8>)> {
    let named = |names: &'static [&'static str], v: BoxedStrategy<Vec<u8>>| {
        (select(names).prop_map(str::to_string), v)
    };
    prop_oneof![
        3 => named(&["From", "from", "FROM", "Sender", "Reply-To"], email_address_list().boxed()),
        3 => named(&["To", "Cc", "Bcc", "Resent-From"], email_address_list().boxed()),
        3 => named(&["Subject"], prop_oneof![
            3 => odd_bytes(),
            1 => select(&["Re: hi", "Fwd: offer", "AW: x", "Out of office", "Automatic reply: x"][..]).prop_map(|s| s.as_bytes().to_vec()),
        ].boxed()),
        3 => named(&["Message-ID", "Message-Id", "message-id"], msg_id().boxed()),
        2 => named(&["In-Reply-To"], references().boxed()),
        2 => named(&["References"], references().boxed()),
        2 => named(&["Date"], date().boxed()),
        1 => named(&["X-Priority", "Importance", "X-MSMail-Priority", "Priority"], prop_oneof![
            bsel!(b"1", b"1 (Highest)", b"5", b"3", b"", b"high", b"urgent", b"\xe9").prop_map(<[u8]>::to_vec),
            odd_bytes(),
        ].boxed()),
        1 => named(&["Auto-Submitted", "X-Autoreply", "Precedence", "X-Auto-Response-Suppress", "X-Forwarded-For"], odd_bytes().boxed()),
        1 => named(&["MIME-Version"], bsel!(b"1.0", b"", b"2.0 (x)").prop_map(<[u8]>::to_vec).boxed()),
        2 => ("[!-9;-~]{1,40}", odd_bytes()),
        1 => (vec(any::<u8>(), 1..20).prop_map(|b| String::from_utf8_lossy(&b).replace([':', '\r', '\n'], "")), odd_bytes()),
    ]
}

const LEAF_TYPES: &[&str] = &[
    "text/plain; charset=utf-8",
    "text/plain; charset=\"iso-8859-1\"",
    "text/plain; charset=x-unknown",
    "text/plain; charset=utf-16",
    "text/html",
    "text/html; charset=windows-1252",
    "TEXT/HTML",
    "text/enriched",
    "application/octet-stream; name=\"a.bin\"",
    "application/pdf; name*=utf-8''%E2%82%AC.pdf",
    "image/png",
    "message/rfc822",
    "message/global",
    "text/plain; charset=\"",
    "text/",
    "/",
    "",
    ";;;",
];

const ENCODINGS: &[&str] = &[
    "base64",
    "quoted-printable",
    "7bit",
    "8bit",
    "binary",
    "x-uuencode",
    "BASE64",
    "bogus",
    "",
];

const DISPOSITIONS: &[&str] = &[
    "attachment; filename=\"r.pdf\"",
    "attachment",
    "inline",
    "inline; filename=\"i.png\"",
    "attachment; filename*=utf-8''%E2%82%AC%20rates.txt",
    "attachment; filename*0=\"a\"; filename*1=\"b.txt\"",
    "attachment; filename=\"\0\"",
    "attachment; filename=\"=?utf-8?B?w6k=?=\"",
    "attachment; filename=\"../../x\"",
    "attachment; filename=",
    "bogus; filename=\"x\"",
];

/// Pieces of part contents: text, base64 and quoted-printable garbage, delimiter look-alikes.
const BODY_PIECES: &[&[u8]] = &[
    b"Hello ",
    b"world",
    b"\r\n",
    b"\n",
    b"\r",
    b"\0",
    b"\xe9",
    b"<p>",
    b"</p>",
    b"<html>",
    b"SGVsbG8=",
    b"!!!",
    b"====",
    b"SGV",
    b"=",
    b"=4",
    b"=ZZ",
    b"=\r\n",
    b"=C3=A9",
    b"--",
    b"--XX",
    b"--XX--",
    b"begin 644 x\n",
    b"\t",
    b".",
    b"\r\n.\r\n",
    b"From x",
    b"\xff\xfe",
];

fn body_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => vec(select(BODY_PIECES), 0..40).prop_map(|v| v.concat()),
        2 => vec(select(BODY_PIECES), 0..3).prop_map(|v| v.concat()),
        2 => vec(any::<u8>(), 0..200),
        1 => (bsel!(b"x", b"QUJD", b"=E9", b"line\r\n", b"\xe9"), 1_000..20_000usize).prop_map(|(p, n)| p.repeat(n)),
    ]
}

/// A MIME part (or a whole body): headers, then either content or sub-parts.
#[derive(Debug, Clone)]
struct Part {
    headers: Vec<(String, Vec<u8>)>,
    body: PartBody,
}

#[derive(Debug, Clone)]
enum PartBody {
    Leaf(Vec<u8>),
    Multi {
        subtype: &'static str,
        /// The boundary named in Content-Type (None: no boundary parameter).
        declared: Option<String>,
        /// The boundary the delimiters use (a broken message uses another).
        used: String,
        parts: Vec<Part>,
        closed: bool,
        preamble: Vec<u8>,
    },
}

fn boundary() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => "[A-Za-z0-9_=.-]{1,30}",
        1 => Just(String::new()),
        1 => Just("a b".to_string()),
        1 => Just("\"".to_string()),
        1 => Just("é".to_string()),
        1 => "[a-z]{71,200}",
        1 => Just("--".to_string()),
    ]
}

fn leaf_headers() -> impl Strategy<Value = Vec<(String, Vec<u8>)>> {
    (
        proptest::option::of(select(LEAF_TYPES)),
        proptest::option::of(select(ENCODINGS)),
        proptest::option::weighted(0.4, select(DISPOSITIONS)),
    )
        .prop_map(|(ct, cte, cd)| {
            let mut h = Vec::new();
            if let Some(ct) = ct {
                h.push(("Content-Type".to_string(), ct.as_bytes().to_vec()));
            }
            if let Some(cte) = cte {
                h.push((
                    "Content-Transfer-Encoding".to_string(),
                    cte.as_bytes().to_vec(),
                ));
            }
            if let Some(cd) = cd {
                h.push(("Content-Disposition".to_string(), cd.as_bytes().to_vec()));
            }
            h
        })
}

/// A leaf's content, sometimes with an odd last byte: what stands right before the next
/// delimiter (a quoted-printable soft break, trailing whitespace) is where decoders slip.
fn leaf_body() -> impl Strategy<Value = Vec<u8>> {
    let tail = prop_oneof![
        6 => Just(&b""[..]),
        1 => bsel!(b"=", b"=4", b" ", b"\t", b"=\r", b"-", b"\r"),
    ];
    (body_bytes(), tail).prop_map(|(b, t)| [&b[..], t].concat())
}

fn part() -> impl Strategy<Value = Part> {
    let leaf = (leaf_headers(), leaf_body()).prop_map(|(headers, b)| Part {
        headers,
        body: PartBody::Leaf(b),
    });
    leaf.prop_recursive(5, 40, 5, |inner| {
        (
            select(&["mixed", "alternative", "related", "digest", "report"][..]),
            boundary(),
            prop_oneof![8 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8)],
            vec(inner, 0..5),
            prop_oneof![6 => Just(true), 1 => Just(false)],
            prop_oneof![4 => Just(Vec::new()), 1 => body_bytes()],
        )
            .prop_map(|(subtype, b, broken, parts, closed, preamble)| Part {
                headers: Vec::new(),
                body: PartBody::Multi {
                    subtype,
                    declared: (broken != 1).then(|| b.clone()),
                    used: if broken == 2 { format!("{b}x") } else { b },
                    parts,
                    closed,
                    preamble,
                },
            })
    })
}

/// Multiparts nested hundreds deep.
fn deep_part() -> impl Strategy<Value = Part> {
    (10..400usize, any::<bool>()).prop_map(|(depth, closed)| {
        let mut p = Part {
            headers: vec![("Content-Type".into(), b"text/plain".to_vec())],
            body: PartBody::Leaf(b"deep".to_vec()),
        };
        for i in 0..depth {
            p = Part {
                headers: Vec::new(),
                body: PartBody::Multi {
                    subtype: "mixed",
                    declared: Some(format!("b{i}")),
                    used: format!("b{i}"),
                    parts: vec![p],
                    closed,
                    preamble: Vec::new(),
                },
            };
        }
        p
    })
}

#[derive(Debug, Clone, Copy)]
enum Eol {
    Crlf,
    Lf,
    Cr,
}

impl Eol {
    fn bytes(self) -> &'static [u8] {
        match self {
            Eol::Crlf => b"\r\n",
            Eol::Lf => b"\n",
            Eol::Cr => b"\r",
        }
    }
}

#[derive(Debug, Clone)]
struct Email {
    headers: Vec<(String, Vec<u8>)>,
    /// Header values folded (a line break and a space before some of their spaces).
    fold: bool,
    body: Option<Part>,
    eol: Eol,
}

fn email() -> impl Strategy<Value = Email> {
    let eol = prop_oneof![8 => Just(Eol::Crlf), 2 => Just(Eol::Lf), 1 => Just(Eol::Cr)];
    let body = prop_oneof![
        2 => Just(None),
        6 => (leaf_headers(), body_bytes()).prop_map(|(headers, b)| Some(Part { headers, body: PartBody::Leaf(b) })),
        4 => part().prop_map(Some),
        1 => deep_part().prop_map(Some),
    ];
    (vec(top_header(), 0..12), any::<bool>(), body, eol).prop_map(|(headers, fold, body, eol)| {
        Email {
            headers,
            fold,
            body,
            eol,
        }
    })
}

fn render_header(name: &str, value: &[u8], fold: bool, eol: Eol, out: &mut Vec<u8>) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    if fold {
        for (i, word) in value.split(|&b| b == b' ').enumerate() {
            if i > 0 {
                if i % 3 == 0 {
                    out.extend_from_slice(eol.bytes());
                }
                out.push(b' ');
            }
            out.extend_from_slice(word);
        }
    } else {
        out.extend_from_slice(value);
    }
    out.extend_from_slice(eol.bytes());
}

fn render_part(p: &Part, fold: bool, eol: Eol, out: &mut Vec<u8>) {
    for (name, value) in &p.headers {
        render_header(name, value, fold, eol, out);
    }
    let e = eol.bytes();
    match &p.body {
        PartBody::Leaf(b) => {
            out.extend_from_slice(e);
            out.extend_from_slice(b);
        }
        PartBody::Multi {
            subtype,
            declared,
            used,
            parts,
            closed,
            preamble,
        } => {
            let ct = match declared {
                Some(b) => format!("multipart/{subtype}; boundary=\"{b}\""),
                None => format!("multipart/{subtype}"),
            };
            render_header("Content-Type", ct.as_bytes(), false, eol, out);
            out.extend_from_slice(e);
            out.extend_from_slice(preamble);
            for sub in parts {
                out.extend_from_slice(e);
                out.extend_from_slice(b"--");
                out.extend_from_slice(used.as_bytes());
                out.extend_from_slice(e);
                render_part(sub, fold, eol, out);
            }
            if *closed {
                out.extend_from_slice(e);
                out.extend_from_slice(b"--");
                out.extend_from_slice(used.as_bytes());
                out.extend_from_slice(b"--");
                out.extend_from_slice(e);
            }
        }
    }
}

fn render_email(m: &Email) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in &m.headers {
        render_header(name, value, m.fold, m.eol, &mut out);
    }
    if let Some(body) = &m.body {
        render_part(body, m.fold, m.eol, &mut out);
    } else {
        out.extend_from_slice(m.eol.bytes());
    }
    out
}

/// Generated emails, some mutated afterwards.
fn raw_email() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        5 => email().prop_map(|m| render_email(&m)),
        2 => (email(), vec(mutation(), 1..6)).prop_map(|(m, muts)| mutate(render_email(&m), &muts)),
    ]
}

/// Pure random bytes, header-shaped random bytes, and mutations of a valid message.
fn random_email_bytes() -> impl Strategy<Value = Vec<u8>> {
    const VALID: &[u8] = b"From: John Doe <john@example.com>\r\nTo: noreply@company.com\r\nSubject: Re: Test Email\r\nMessage-ID: <r2@example.com>\r\nIn-Reply-To: <r1@example.com>\r\nReferences: <root@company.com> <r1@example.com>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=XX\r\n\r\n--XX\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n<p>Gr=C3=BC=C3=9Fe</p>\r\n--XX\r\nContent-Type: application/pdf; name=\"r.pdf\"\r\nContent-Disposition: attachment; filename=\"r.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n--XX--\r\n";
    prop_oneof![
        2 => vec(any::<u8>(), 0..2_000),
        2 => vec(("[!-9;-~]{1,12}", vec(any::<u8>(), 0..40)), 0..10).prop_map(|hs| {
            let mut out = Vec::new();
            for (n, v) in hs {
                out.extend_from_slice(n.as_bytes());
                out.extend_from_slice(b": ");
                out.extend_from_slice(&v);
                out.extend_from_slice(b"\r\n");
            }
            out
        }),
        3 => vec(mutation(), 1..10).prop_map(|m| mutate(VALID.to_vec(), &m)),
    ]
}

// ---------------------------------------------------------------------------------------------
// The property tests.
// ---------------------------------------------------------------------------------------------

#[test]
fn p1_p2_hostile_requests_are_refused_by_field_without_panics() {
    fuzz(
        "p1_p2_hostile_requests",
        3_000,
        hostile_request(),
        |v: &Vec<u8>| save_bytes(v),
        |body| check_decode(body).map(|_| ()),
    );
}

#[test]
fn p1_p2_random_and_mutated_request_bytes() {
    let bytes = prop_oneof![
        1 => vec(any::<u8>(), 0..300),
        4 => mutated_request(),
    ];
    fuzz(
        "p1_p2_random_and_mutated_request_bytes",
        3_000,
        bytes,
        |v: &Vec<u8>| save_bytes(v),
        |body| check_decode(body).map(|_| ()),
    );
}

#[test]
fn p3_accepted_requests_carry_storable_ids() {
    fuzz(
        "p3_accepted_requests",
        1_500,
        plausible_request(LONG_LIST).prop_map(|v| serde_json::to_vec(&v).unwrap()),
        |v: &Vec<u8>| save_bytes(v),
        |body| match check_decode(body)? {
            Some(valid) => check_accepted(&valid),
            None => Ok(()),
        },
    );
}

fn build_case() -> impl Strategy<Value = (Vec<u8>, Vec<Vec<u8>>)> {
    (
        plausible_request(BUILT_LIST).prop_map(|v| serde_json::to_vec(&v).unwrap()),
        vec(attachment_bytes(), 3),
    )
}

#[test]
fn p4_built_emails_are_well_formed() {
    fuzz(
        "p4_built_email_shape",
        1_500,
        build_case(),
        save_with_attachments,
        |(body, bytes)| match check_decode(body)? {
            Some(valid) => check_built(&valid, bytes, P4::Shape),
            None => Ok(()),
        },
    );
}

#[test]
fn p4_built_email_lines_fit_998_octets() {
    fuzz(
        "p4_built_email_line_length",
        2_000,
        build_case(),
        save_with_attachments,
        |(body, bytes)| match check_decode(body)? {
            Some(valid) => check_built(&valid, bytes, P4::LineLength),
            None => Ok(()),
        },
    );
}

#[test]
fn p4_html_to_text_never_panics() {
    let html = prop_oneof![
        3 => pieces(60),
        1 => vec(any::<char>(), 0..200).prop_map(String::from_iter),
        1 => vec(select(&["&#x", "&#", "&", ";", "é", "😀", "<", ">", "/", "script", "li", "br", "1", "f"][..]), 0..40).prop_map(|v| v.concat()),
    ];
    fuzz(
        "p4_html_to_text",
        5_000,
        html,
        |s: &String| (s.clone().into_bytes(), "html"),
        |s| guarded("P4", "html_to_text", || html_to_text(s)).map(|_| ()),
    );
}

#[test]
fn p5_p6_generated_emails_parse_into_valid_json() {
    fuzz(
        "p5_p6_generated_emails",
        2_000,
        raw_email(),
        |v: &Vec<u8>| save_eml(v),
        |raw| {
            check_parse(raw)?;
            check_dedup(raw, false)
        },
    );
}

#[test]
fn p5_p6_random_and_mutated_email_bytes() {
    fuzz(
        "p5_p6_random_email_bytes",
        4_000,
        random_email_bytes(),
        |v: &Vec<u8>| save_eml(v),
        |raw| {
            check_parse(raw)?;
            check_dedup(raw, false)
        },
    );
}

#[test]
fn p7_dedup_keys_are_storable() {
    let raw = prop_oneof![3 => raw_email(), 1 => random_email_bytes()];
    fuzz(
        "p7_dedup_key",
        1_500,
        raw,
        |v: &Vec<u8>| save_eml(v),
        |raw| check_dedup(raw, true),
    );
}

// ---------------------------------------------------------------------------------------------
// Every input that ever found a bug, replayed through every property of its kind.
// ---------------------------------------------------------------------------------------------

fn regression_files(kind: &str, exts: &[&str]) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz-regressions")
        .join(kind);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.retain(|p| {
        p.extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| exts.contains(&e))
    });
    files.sort();
    files
}

/// All properties of requests for one regression body.
fn replay_request(body: &[u8]) -> Vec<String> {
    let attachment_bytes: Vec<Vec<u8>> = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get(ATTACHMENT_BYTES).cloned())
        .and_then(|v| v.as_array().cloned())
        .map(|a| a.iter().map(|h| unhex(h.as_str().unwrap_or(""))).collect())
        .unwrap_or_default();
    let valid = match check_decode(body) {
        Ok(Some(valid)) => valid,
        Ok(None) => return Vec::new(),
        Err(e) => return vec![e],
    };
    let mut failures = Vec::new();
    failures.extend(check_accepted(&valid).err());
    failures.extend(check_built(&valid, &attachment_bytes, P4::Shape).err());
    failures.extend(check_built(&valid, &attachment_bytes, P4::LineLength).err());
    failures
}

fn replay_email(raw: &[u8]) -> Vec<String> {
    [check_parse(raw), check_dedup(raw, true)]
        .into_iter()
        .filter_map(Result::err)
        .collect()
}

#[test]
fn regressions_replay() {
    let requests = regression_files("requests", &["json", "bin"]);
    let emails = regression_files("emails", &["eml"]);
    assert!(
        !requests.is_empty() && !emails.is_empty(),
        "tests/fuzz-regressions/ has no requests or no emails"
    );
    let mut failures = Vec::new();
    for (files, replay) in [
        (&requests, replay_request as fn(&[u8]) -> Vec<String>),
        (&emails, replay_email),
    ] {
        for path in files {
            let bytes = std::fs::read(path).unwrap();
            for f in replay(&bytes) {
                failures.push(format!(
                    "{}: {f}",
                    path.strip_prefix(env!("CARGO_MANIFEST_DIR"))
                        .unwrap_or(path)
                        .display()
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} regression inputs fail:\n{}",
        failures.len(),
        requests.len() + emails.len(),
        failures.join("\n")
    );
}
