//! `kind = "resend"`: Resend's API (`POST /emails`, `Authorization: Bearer <api key>`), given
//! the email's fields (not its MIME): from, to, cc, bcc, subject, html, text, headers (the
//! custom ones and the Message-ID), base64 attachments. Each request carries an
//! `Idempotency-Key` made of the tenant and the request's `message_id`, so a retry after an
//! answer that was lost does not send twice (Resend keeps keys for 24 hours). Resend answers
//! 200 with the email's `id`.

use std::sync::Arc;

use aws_lc_rs::digest;
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

const DEFAULT_BASE_URL: &str = "https://api.resend.com";
/// Resend's limit on an idempotency key.
const MAX_IDEMPOTENCY_KEY: usize = 256;

/// A resend provider: its API and key.
#[derive(Debug, Clone)]
pub struct ResendProvider(pub KeyedApi);

pub fn parse(table: toml::Table, ctx: &mut ParseContext) -> Option<Arc<dyn ProviderConfig>> {
    let api = KeyedApi::parse(table, ctx, "resend", DEFAULT_BASE_URL)?;
    Some(Arc::new(ResendProvider(api)))
}

impl ProviderConfig for ResendProvider {
    fn kind(&self) -> &'static str {
        "resend"
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
        Ok(Box::new(ResendTransport {
            api: HttpApi::new(&self.0.base_url, ctx)?,
            url: format!("{}/emails", self.0.base_url),
            credential: self.0.credential(),
        }))
    }
}

struct ResendTransport {
    api: HttpApi,
    url: String,
    credential: Credential,
}

impl Transport for ResendTransport {
    fn send<'a>(&'a self, email: &'a Arc<OutgoingEmail>) -> SendFuture<'a> {
        Box::pin(async move {
            let body = http_api::build_off_thread(email, request_body).await?;
            let key = idempotency_key(&email.parts.tenant_id, &email.parts.message_id);
            let answer = self
                .api
                .post(ApiRequest {
                    url: self.url.clone(),
                    content_type: "application/json".into(),
                    headers: vec![("idempotency-key", key)],
                    body,
                    credential: Some((&self.credential, Auth::Bearer)),
                })
                .await?;
            Ok(Accepted {
                provider_message_id: answer
                    .json_str("id")
                    .unwrap_or_else(|| email.rfc_message_id.clone()),
                sent_at: OffsetDateTime::now_utc(),
            })
        })
    }

    fn abort(&self) {
        self.api.abort();
    }
}

/// `<tenant>/<message_id>` when that is printable ASCII within Resend's 256 characters, else
/// `sha256:<hex of it>`: the same request always gets the same key, and no key breaks a header.
pub fn idempotency_key(tenant_id: &str, message_id: &str) -> String {
    let key = format!("{tenant_id}/{message_id}");
    if key.len() <= MAX_IDEMPOTENCY_KEY && key.bytes().all(|b| b.is_ascii_graphic()) {
        return key;
    }
    let hash = digest::digest(&digest::SHA256, key.as_bytes());
    let hex: String = hash.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// The `/emails` JSON of `email`.
fn request_body(email: &OutgoingEmail) -> Vec<u8> {
    let p = &email.parts;
    let list = |m: &[lettre::message::Mailbox]| -> Vec<String> {
        m.iter().map(ToString::to_string).collect()
    };
    let mut headers = serde_json::Map::new();
    for (name, value) in &p.headers {
        headers.insert(name.clone(), Value::String(value.clone()));
    }
    headers.insert(
        "Message-ID".into(),
        Value::String(format!("<{}>", email.rfc_message_id)),
    );
    let mut body = json!({
        "from": p.from.to_string(),
        "to": list(&p.to),
        "subject": p.subject,
        "text": p.text,
        "headers": headers,
    });
    if !p.cc.is_empty() {
        body["cc"] = list(&p.cc).into();
    }
    if !p.bcc.is_empty() {
        body["bcc"] = list(&p.bcc).into();
    }
    if let Some(html) = &p.html {
        body["html"] = html.clone().into();
    }
    if !p.attachments.is_empty() {
        body["attachments"] = p
            .attachments
            .iter()
            .map(|a| {
                json!({
                    "content": BASE64.encode(&a.bytes),
                    "filename": a.filename,
                    "content_type": a.mime_type,
                })
            })
            .collect();
    }
    serde_json::to_vec(&body).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_keys_are_stable_bounded_ascii() {
        assert_eq!(idempotency_key("t1", "m-1"), "t1/m-1");
        let long = idempotency_key("t1", &"x".repeat(300));
        assert!(
            long.starts_with("sha256:") && long.len() == 7 + 64,
            "{long}"
        );
        assert_eq!(long, idempotency_key("t1", &"x".repeat(300)));
        let odd = idempotency_key("t1", "ü id");
        assert!(odd.starts_with("sha256:"));
        assert_ne!(odd, idempotency_key("t1", "u id"));
    }
}
