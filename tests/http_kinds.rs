//! The HTTP API kinds end to end through the real binary, against the stand-in APIs of
//! `common::api_server`: the guide's request (with an attachment) through each kind reaches
//! its API as that API documents it — fields or MIME, auth, SES's signature — and yields a
//! `sent` result with the API's id; a refusal (4xx with the API's error body) ends in a
//! permanent failure carrying the API's text; a 429 with `Retry-After` is retried and
//! delivered.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine;
use common::api_server::{
    wait_answered, Api, ApiServer, Fault, Received, ACCESS_TOKEN, API_KEY, AWS_ACCESS_KEY_ID,
    AWS_REGION, AWS_SECRET,
};
use common::{guide_request, FileServer, Service, TestEnv};
use mail_parser::MimeHeaders;

const TENANT: &str = "tenant-http";
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

const KINDS: &[(&str, Api)] = &[
    ("sendgrid", Api::Sendgrid),
    ("mailgun", Api::Mailgun),
    ("postmark", Api::Postmark),
    ("ses", Api::Ses),
    ("resend", Api::Resend),
    ("gmail_api", Api::Gmail),
    ("ms_graph", Api::Graph),
];

/// A tenant with one provider of each kind (id = the kind's name), all pointing at `api`,
/// plus `sendgrid-badkey` with a key the API refuses. The secrets are given each way: by
/// environment (`API_KEY_VAR`), by file, inline.
fn http_tenant(env: &TestEnv, api: &ApiServer) {
    let base = api.base_url();
    std::fs::write(env.dir.join("mailgun.key"), format!("{API_KEY}\n")).unwrap();
    env.write_tenant(
        &format!("{TENANT}.toml"),
        &format!(
            r#"
id = "{TENANT}"
name = "HTTP tenant"

[[providers]]
id = "sendgrid"
name = "SendGrid"
kind = "sendgrid"
api_key_env = "API_KEY_VAR"
base_url = "{base}"

[[providers]]
id = "sendgrid-badkey"
name = "SendGrid with a wrong key"
kind = "sendgrid"
api_key = "wrong-key"
base_url = "{base}"

[[providers]]
id = "mailgun"
name = "Mailgun"
kind = "mailgun"
domain = "mg.example.com"
api_key_file = "../mailgun.key"
base_url = "{base}"

[[providers]]
id = "postmark"
name = "Postmark"
kind = "postmark"
api_key = "{API_KEY}"
message_stream = "outbound"
base_url = "{base}"

[[providers]]
id = "ses"
name = "SES"
kind = "ses"
region = "{AWS_REGION}"
access_key_id = "{AWS_ACCESS_KEY_ID}"
secret_access_key = "{AWS_SECRET}"
base_url = "{base}"

[[providers]]
id = "resend"
name = "Resend"
kind = "resend"
api_key = "{API_KEY}"
base_url = "{base}"

[[providers]]
id = "gmail_api"
name = "Gmail"
kind = "gmail_api"
access_token = "{ACCESS_TOKEN}"
base_url = "{base}"

[[providers]]
id = "ms_graph"
name = "Graph"
kind = "ms_graph"
user = "sender@company.com"
access_token_env = "TOKEN_VAR"
base_url = "{base}"
"#
        ),
    );
}

/// Over Gmail's simple-request size: the message goes through the media upload endpoint.
fn big() -> Vec<u8> {
    (0..6 * 1024 * 1024u32)
        .map(|i| (i * 13 % 253) as u8)
        .collect()
}

fn pdf() -> Vec<u8> {
    (0..20_000u32).map(|i| (i * 7 % 251) as u8).collect()
}

struct World {
    env: TestEnv,
    api: ApiServer,
    svc: Service,
    files: FileServer,
}

async fn start(tag: &str) -> World {
    let env = TestEnv::new(tag);
    env.write_config(
        "[outbound]\nattachment_allow_private = true\nattachment_timeout = \"3s\"\n\
         [retry]\nmax_retries = 2\ndelays = [\"1s\", \"3s\"]\n",
    );
    let api = ApiServer::start().await;
    http_tenant(&env, &api);
    let dir = env.dir.join("files");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("document.pdf"), pdf()).unwrap();
    std::fs::write(dir.join("big.bin"), big()).unwrap();
    let files = FileServer::start(&dir);
    let svc = Service::start_with(
        &env,
        &[("API_KEY_VAR", API_KEY), ("TOKEN_VAR", ACCESS_TOKEN)],
    );
    svc.wait_health(200, Duration::from_secs(30)).await;
    World {
        env,
        api,
        svc,
        files,
    }
}

impl World {
    async fn publish(&self, provider: &str, message_id: &str) {
        let req = guide_request(
            TENANT,
            provider,
            message_id,
            Some(&self.files.url("document.pdf")),
        );
        self.env
            .publish("email.send", &serde_json::to_vec(&req).unwrap())
            .await;
    }

    /// Results until every one of `ids` has a terminal one (`sent` or `failed`); each id's
    /// results in order.
    async fn results(&self, ids: &[&str]) -> HashMap<String, Vec<serde_json::Value>> {
        let mut out: HashMap<String, Vec<serde_json::Value>> = HashMap::new();
        let start = std::time::Instant::now();
        let done = |out: &HashMap<String, Vec<serde_json::Value>>| {
            ids.iter().all(|id| {
                out.get(*id)
                    .is_some_and(|v| v.iter().any(|r| r["status"] != "retrying"))
            })
        };
        while !done(&out) {
            assert!(
                start.elapsed() < Duration::from_secs(40),
                "results missing: {out:?}\n{}",
                self.svc.log_text()
            );
            for r in self
                .env
                .take("email.send.result", 100, Duration::from_millis(300))
                .await
            {
                let id = r["message_id"].as_str().unwrap_or("").to_string();
                out.entry(id).or_default().push(r);
            }
        }
        out
    }

    fn assert_no_secret_in_log(&self) {
        let log = self.svc.log_text();
        for secret in [API_KEY, ACCESS_TOKEN, AWS_SECRET, "wrong-key"] {
            assert!(!log.contains(secret), "a secret reached the log:\n{log}");
        }
    }
}

/// The one request `api` answered with success (Gmail's media uploads aside).
fn the_accepted(api: &ApiServer, which: Api) -> Received {
    let ok: Vec<Received> = api
        .received_by(which)
        .into_iter()
        .filter(|r| (200..300).contains(&r.status) && !r.target.starts_with("/upload/"))
        .collect();
    assert_eq!(ok.len(), 1, "{which:?}: {ok:?}");
    ok.into_iter().next().unwrap()
}

/// Checks a MIME message as the guide's example with its attachment; `bcc_header`: whether
/// it must carry the Bcc header (the APIs that read recipients from the message).
fn check_mime(raw: &[u8], bcc_header: bool) -> String {
    let parsed = mail_parser::MessageParser::default()
        .parse(raw)
        .expect("a MIME message");
    assert_eq!(parsed.subject(), Some("Test Email"));
    assert_eq!(
        parsed.from().unwrap().first().unwrap().address(),
        Some("noreply@company.com")
    );
    assert_eq!(
        parsed.to().unwrap().first().unwrap().address(),
        Some("user@example.com")
    );
    assert_eq!(
        parsed.cc().unwrap().first().unwrap().address(),
        Some("cc@example.com")
    );
    match parsed.bcc() {
        Some(b) => {
            assert!(bcc_header, "a Bcc header where it must not be");
            assert_eq!(b.first().unwrap().address(), Some("bcc@example.com"));
        }
        None => assert!(!bcc_header, "no Bcc header"),
    }
    assert_eq!(
        parsed.header_raw("X-Custom-Header").map(str::trim),
        Some("Custom Value")
    );
    assert_eq!(parsed.body_html(0).unwrap().trim(), "<p>Hello World</p>");
    assert_eq!(parsed.body_text(0).unwrap().trim(), "Hello World");
    let att = parsed.attachment(0).expect("an attachment");
    assert_eq!(att.attachment_name(), Some("document.pdf"));
    assert_eq!(att.contents(), &pdf()[..]);
    let message_id = parsed.message_id().unwrap().to_string();
    assert!(message_id.starts_with("mid-"), "{message_id}");
    message_id
}

fn decode(b64: &serde_json::Value) -> Vec<u8> {
    B64.decode(b64.as_str().expect("base64 text")).unwrap()
}

#[tokio::test]
async fn every_kind_delivers_the_guide_request_through_its_api() {
    let w = start("http_kinds").await;
    for (kind, _) in KINDS {
        w.publish(kind, &format!("mid-{kind}")).await;
    }
    let mut big_one = guide_request(TENANT, "gmail_api", "mid-gmail-big", None);
    big_one["attachments"] = serde_json::json!([{
        "filename": "big.bin",
        "url": w.files.url("big.bin"),
        "mime_type": "application/octet-stream"
    }]);
    w.env
        .publish("email.send", &serde_json::to_vec(&big_one).unwrap())
        .await;
    let mut ids: Vec<String> = KINDS.iter().map(|(k, _)| format!("mid-{k}")).collect();
    ids.push("mid-gmail-big".into());
    let results = w
        .results(&ids.iter().map(String::as_str).collect::<Vec<_>>())
        .await;

    let mut provider_ids = HashMap::new();
    for (kind, api) in KINDS {
        let rs = &results[&format!("mid-{kind}")];
        assert_eq!(rs.len(), 1, "{rs:?}");
        let r = &rs[0];
        assert_eq!(r["status"], "sent", "{kind}: {r}\n{}", w.svc.log_text());
        assert_eq!(r["success"], true);
        assert_eq!(r["tenant_id"], TENANT);
        let got = r["provider_response"]["provider_message_id"]
            .as_str()
            .unwrap()
            .to_string();
        let req = the_accepted(&w.api, *api);
        assert!(req.authorized, "{kind}");
        if let Some(id) = &req.answered_id {
            assert_eq!(&got, id, "{kind}");
        }
        provider_ids.insert(*api, (got, req));
    }

    // SendGrid: fields, Bearer key.
    let (_, req) = &provider_ids[&Api::Sendgrid];
    assert_eq!(
        req.header("authorization"),
        Some(&*format!("Bearer {API_KEY}"))
    );
    let j = req.json();
    let p = &j["personalizations"][0];
    assert_eq!(p["to"][0]["email"], "user@example.com");
    assert_eq!(p["cc"][0]["email"], "cc@example.com");
    assert_eq!(p["bcc"][0]["email"], "bcc@example.com");
    assert_eq!(j["from"]["email"], "noreply@company.com");
    assert_eq!(j["subject"], "Test Email");
    assert_eq!(j["content"][0]["type"], "text/plain");
    assert_eq!(j["content"][0]["value"], "Hello World");
    assert_eq!(j["content"][1]["type"], "text/html");
    assert_eq!(j["content"][1]["value"], "<p>Hello World</p>");
    assert_eq!(j["headers"]["X-Custom-Header"], "Custom Value");
    assert!(j["headers"]["Message-ID"]
        .as_str()
        .unwrap()
        .starts_with("<mid-sendgrid."));
    assert_eq!(j["attachments"][0]["filename"], "document.pdf");
    assert_eq!(j["attachments"][0]["type"], "application/pdf");
    assert_eq!(decode(&j["attachments"][0]["content"]), pdf());

    // Mailgun: the MIME message in a form, every envelope recipient as `to`.
    let (got, req) = &provider_ids[&Api::Mailgun];
    assert_eq!(req.target, "/v3/mg.example.com/messages.mime");
    assert!(!got.contains('<'), "{got}");
    let ct = req.header("content-type").unwrap();
    let boundary = ct
        .strip_prefix("multipart/form-data; boundary=")
        .unwrap_or_else(|| panic!("{ct}"));
    let body = &req.body;
    let delimiter = format!("--{boundary}");
    let mut tos = Vec::new();
    let mut message = None;
    let text = body.clone();
    let mut rest: &[u8] = &text;
    while let Some(start) = find(rest, delimiter.as_bytes()) {
        rest = &rest[start + delimiter.len()..];
        let end = find(rest, format!("\r\n{delimiter}").as_bytes()).unwrap_or(rest.len());
        let part = &rest[..end];
        if let Some(h) = find(part, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&part[..h]);
            let content = &part[h + 4..];
            if head.contains("name=\"to\"") {
                tos.push(String::from_utf8_lossy(content).into_owned());
            } else if head.contains("name=\"message\"") {
                message = Some(content.to_vec());
            }
        }
    }
    tos.sort();
    assert_eq!(
        tos,
        ["bcc@example.com", "cc@example.com", "user@example.com"]
    );
    check_mime(&message.expect("the message part"), false);

    // Postmark: fields, server token.
    let (_, req) = &provider_ids[&Api::Postmark];
    let j = req.json();
    assert_eq!(j["From"], "noreply@company.com");
    assert_eq!(j["To"], "user@example.com");
    assert_eq!(j["Cc"], "cc@example.com");
    assert_eq!(j["Bcc"], "bcc@example.com");
    assert_eq!(j["Subject"], "Test Email");
    assert_eq!(j["TextBody"], "Hello World");
    assert_eq!(j["HtmlBody"], "<p>Hello World</p>");
    assert_eq!(j["MessageStream"], "outbound");
    assert!(j["Headers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|h| h["Name"] == "X-Custom-Header" && h["Value"] == "Custom Value"));
    assert_eq!(j["Attachments"][0]["Name"], "document.pdf");
    assert_eq!(j["Attachments"][0]["ContentType"], "application/pdf");
    assert_eq!(decode(&j["Attachments"][0]["Content"]), pdf());

    // SES: signed (verified by the stand-in), the raw message, the envelope.
    let (_, req) = &provider_ids[&Api::Ses];
    let j = req.json();
    assert_eq!(j["Destination"]["BccAddresses"][0], "bcc@example.com");
    assert_eq!(j["Destination"]["ToAddresses"][0], "user@example.com");
    check_mime(&decode(&j["Content"]["Raw"]["Data"]), false);

    // Resend: fields, idempotency key.
    let (_, req) = &provider_ids[&Api::Resend];
    assert_eq!(
        req.header("idempotency-key"),
        Some(&*format!("{TENANT}/mid-resend"))
    );
    let j = req.json();
    assert_eq!(j["from"], "noreply@company.com");
    assert_eq!(j["to"][0], "user@example.com");
    assert_eq!(j["cc"][0], "cc@example.com");
    assert_eq!(j["bcc"][0], "bcc@example.com");
    assert_eq!(j["subject"], "Test Email");
    assert_eq!(j["text"], "Hello World");
    assert_eq!(j["html"], "<p>Hello World</p>");
    assert_eq!(j["headers"]["X-Custom-Header"], "Custom Value");
    assert_eq!(j["attachments"][0]["filename"], "document.pdf");
    assert_eq!(decode(&j["attachments"][0]["content"]), pdf());

    // Gmail: base64url MIME with the Bcc header, user `me`.
    let (_, req) = &provider_ids[&Api::Gmail];
    assert_eq!(req.target, "/gmail/v1/users/me/messages/send");
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(req.json()["raw"].as_str().unwrap())
        .unwrap();
    check_mime(&raw, true);

    // Gmail, a large message: the MIME message itself to the media upload endpoint.
    let up: Vec<Received> = w
        .api
        .received_by(Api::Gmail)
        .into_iter()
        .filter(|r| r.target.starts_with("/upload/"))
        .collect();
    assert_eq!(up.len(), 1, "{up:?}");
    let up = &up[0];
    assert!(up.authorized);
    assert_eq!(
        up.target,
        "/upload/gmail/v1/users/me/messages/send?uploadType=media"
    );
    assert_eq!(up.header("content-type"), Some("message/rfc822"));
    let parsed = mail_parser::MessageParser::default()
        .parse(&up.body)
        .unwrap();
    assert_eq!(
        parsed.bcc().unwrap().first().unwrap().address(),
        Some("bcc@example.com")
    );
    assert_eq!(parsed.attachment(0).unwrap().contents(), &big()[..]);
    let r = &results["mid-gmail-big"];
    assert_eq!(r.len(), 1);
    assert_eq!(r[0]["status"], "sent", "{r:?}");
    assert_eq!(
        r[0]["provider_response"]["provider_message_id"],
        up.answered_id.clone().unwrap()
    );

    // Graph: base64 MIME as text/plain; the result's id is the Message-ID.
    let (got, req) = &provider_ids[&Api::Graph];
    assert_eq!(req.target, "/v1.0/users/sender@company.com/sendMail");
    assert_eq!(req.header("content-type"), Some("text/plain"));
    let raw = B64.decode(&req.body).unwrap();
    let message_id = check_mime(&raw, true);
    assert_eq!(got, &message_id);

    w.assert_no_secret_in_log();
}

#[tokio::test]
async fn refusals_fail_permanently_with_the_apis_text_and_throttling_is_retried() {
    let w = start("http_faults").await;
    for api in [
        Api::Sendgrid,
        Api::Mailgun,
        Api::Postmark,
        Api::Gmail,
        Api::Graph,
    ] {
        w.api.fail_next(api, &[Fault::Refuse]);
    }
    // Longer than the first delay (1 s): the retry waits for the next declared delay queue
    // that is long enough (3 s).
    w.api.fail_next(Api::Resend, &[Fault::Throttle(2)]);
    w.api.fail_next(Api::Ses, &[Fault::Throttle(2)]);
    for (kind, _) in KINDS {
        w.publish(kind, &format!("mid-{kind}")).await;
    }
    w.publish("sendgrid-badkey", "mid-badkey").await;
    let mut ids: Vec<String> = KINDS.iter().map(|(k, _)| format!("mid-{k}")).collect();
    ids.push("mid-badkey".into());
    let results = w
        .results(&ids.iter().map(String::as_str).collect::<Vec<_>>())
        .await;

    let refused: &[(&str, &str)] = &[
        (
            "mid-sendgrid",
            "HTTP 400: from: The from address does not match a verified Sender Identity.",
        ),
        ("mid-mailgun", "HTTP 400: Domain not found: example.com"),
        (
            "mid-postmark",
            "HTTP 422: ErrorCode 300: Invalid 'To' address: 'user@example.com'.",
        ),
        (
            "mid-gmail_api",
            "HTTP 400: INVALID_ARGUMENT: Invalid To header",
        ),
        (
            "mid-ms_graph",
            "HTTP 400: ErrorInvalidRecipients: At least one recipient is not valid.",
        ),
        ("mid-badkey", "HTTP 401: unauthorized"),
    ];
    for (id, text) in refused {
        let rs = &results[*id];
        assert_eq!(rs.len(), 1, "{id} was retried: {rs:?}");
        let r = &rs[0];
        assert_eq!(r["status"], "failed", "{r}");
        assert_eq!(r["success"], false);
        assert_eq!(r["error_class"], "permanent", "{r}");
        assert!(r["error"].as_str().unwrap().contains(text), "{id}: {r}");
    }
    // Each refused request was made once (a static key is not retried after a 401).
    for api in [
        Api::Sendgrid,
        Api::Mailgun,
        Api::Postmark,
        Api::Gmail,
        Api::Graph,
    ] {
        let (good, bad): (Vec<_>, Vec<_>) = w
            .api
            .received_by(api)
            .into_iter()
            .partition(|r| r.authorized);
        assert_eq!(good.len(), 1, "{api:?}");
        let wrong_key = usize::from(api == Api::Sendgrid);
        assert_eq!(bad.len(), wrong_key, "{api:?}: {bad:?}");
    }
    let dead = w
        .env
        .take("email.send.dlq", refused.len(), Duration::from_secs(10))
        .await;
    assert_eq!(dead.len(), refused.len(), "{dead:?}");

    // Throttled: a `retrying` result, then delivered on the retry.
    for (id, api) in [("mid-resend", Api::Resend), ("mid-ses", Api::Ses)] {
        let rs = &results[id];
        assert_eq!(rs.len(), 2, "{rs:?}");
        assert_eq!(rs[0]["status"], "retrying", "{rs:?}");
        assert!(
            rs[0]["error"].as_str().unwrap().contains("HTTP 429"),
            "{rs:?}"
        );
        assert_eq!(rs[1]["status"], "sent", "{rs:?}");
        wait_answered(&w.api, api, 200, 1, Duration::from_secs(1)).await;
        let reqs = w.api.received_by(api);
        assert_eq!(
            reqs.iter().map(|r| r.status).collect::<Vec<_>>(),
            [429, 200]
        );
        let waited = reqs[1].at.duration_since(reqs[0].at);
        assert!(
            waited >= Duration::from_secs(2),
            "{api:?} retried {waited:?} after a Retry-After of 2 s"
        );
        assert_eq!(
            rs[1]["provider_response"]["provider_message_id"],
            reqs[1].answered_id.clone().unwrap()
        );
        if api == Api::Resend {
            // The retry carries the same idempotency key.
            assert_eq!(
                reqs[0].header("idempotency-key"),
                reqs[1].header("idempotency-key")
            );
        }
    }
    w.assert_no_secret_in_log();
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
