//! `kind = "sendgrid"`: SendGrid's v3 Mail Send API (`POST /v3/mail/send`, `Authorization:
//! Bearer <api key>`), given the email's fields (not its MIME): from, one personalization with
//! to/cc/bcc, subject, text and HTML content, base64 attachments, and the custom headers with
//! the Message-ID. SendGrid answers 202 with the message's id in `X-Message-Id`.

use std::sync::Arc;

use base64::Engine;
use serde_json::{json, Value};
use time::OffsetDateTime;

use super::http_api::{self, ApiRequest, Auth, HttpApi, KeyedApi, BASE64};
use super::{
    Accepted, Fingerprint, Mirror, ParseContext, ProviderConfig, SendError, SendFuture, Transport,
    TransportContext,
};
use crate::credentials::Credential;
use crate::outbound::OutgoingEmail;

const DEFAULT_BASE_URL: &str = "https://api.sendgrid.com";

/// A sendgrid provider: its API and key.
#[derive(Debug, Clone)]
pub struct SendgridProvider(pub KeyedApi);

pub fn parse(table: toml::Table, ctx: &mut ParseContext) -> Option<Arc<dyn ProviderConfig>> {
    let api = KeyedApi::parse(table, ctx, "sendgrid", DEFAULT_BASE_URL)?;
    Some(Arc::new(SendgridProvider(api)))
}

impl ProviderConfig for SendgridProvider {
    fn kind(&self) -> &'static str {
        "sendgrid"
    }

    /// It takes the email's fields, attachments included.
    fn wants_parts(&self) -> bool {
        true
    }

    fn fingerprint(&self, h: &mut Fingerprint) {
        self.0.fingerprint(h);
    }

    fn mirror(&self) -> Mirror {
        self.0.mirror()
    }

    fn transport(&self, ctx: &TransportContext) -> Result<Box<dyn Transport>, SendError> {
        Ok(Box::new(SendgridTransport {
            api: HttpApi::new(&self.0.base_url, ctx)?,
            url: format!("{}/v3/mail/send", self.0.base_url),
            credential: self.0.credential(),
        }))
    }
}

struct SendgridTransport {
    api: HttpApi,
    url: String,
    credential: Credential,
}

impl Transport for SendgridTransport {
    fn send<'a>(&'a self, email: &'a Arc<OutgoingEmail>) -> SendFuture<'a> {
        Box::pin(async move {
            let body = http_api::build_off_thread(email, request_body).await?;
            let answer = self
                .api
                .post(ApiRequest {
                    url: self.url.clone(),
                    content_type: "application/json".into(),
                    headers: Vec::new(),
                    body,
                    credential: Some((&self.credential, Auth::Bearer)),
                })
                .await?;
            Ok(Accepted {
                provider_message_id: answer
                    .header("x-message-id")
                    .unwrap_or_else(|| email.rfc_message_id.clone()),
                sent_at: OffsetDateTime::now_utc(),
            })
        })
    }

    fn abort(&self) {
        self.api.abort();
    }
}

fn address(m: &lettre::message::Mailbox) -> Value {
    match &m.name {
        Some(name) if !name.is_empty() => json!({"email": m.email.to_string(), "name": name}),
        _ => json!({"email": m.email.to_string()}),
    }
}

/// The Mail Send JSON of `email`.
fn request_body(email: &OutgoingEmail) -> Vec<u8> {
    let p = &email.parts;
    let mut personalization = json!({"to": p.to.iter().map(address).collect::<Vec<_>>()});
    if !p.cc.is_empty() {
        personalization["cc"] = p.cc.iter().map(address).collect();
    }
    if !p.bcc.is_empty() {
        personalization["bcc"] = p.bcc.iter().map(address).collect();
    }
    // SendGrid wants text/plain before text/html.
    let mut content = vec![json!({"type": "text/plain", "value": p.text})];
    if let Some(html) = &p.html {
        content.push(json!({"type": "text/html", "value": html}));
    }
    let mut headers = serde_json::Map::new();
    for (name, value) in &p.headers {
        headers.insert(name.clone(), Value::String(value.clone()));
    }
    headers.insert(
        "Message-ID".into(),
        Value::String(format!("<{}>", email.rfc_message_id)),
    );
    let mut body = json!({
        "personalizations": [personalization],
        "from": address(&p.from),
        "subject": p.subject,
        "content": content,
        "headers": headers,
    });
    if !p.attachments.is_empty() {
        body["attachments"] = p
            .attachments
            .iter()
            .map(|a| {
                json!({
                    "content": BASE64.encode(&a.bytes),
                    "filename": a.filename,
                    "type": a.mime_type,
                    "disposition": "attachment",
                })
            })
            .collect();
    }
    serde_json::to_vec(&body).unwrap_or_default()
}
