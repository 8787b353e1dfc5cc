//! `kind = "postmark"`: Postmark's Email API (`POST /email`, `X-Postmark-Server-Token`), given
//! the email's fields (not its MIME): From, To, Cc, Bcc, Subject, TextBody, HtmlBody, Headers
//! (the custom ones and the Message-ID), base64 Attachments, and the `MessageStream` when one
//! is configured. Postmark answers 200 with `MessageID`; a request it refuses is a 422 with
//! `ErrorCode` and `Message`.

use std::path::PathBuf;
use std::sync::Arc;

use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Value};
use time::OffsetDateTime;

use super::http_api::{self, ApiRequest, Auth, HttpApi, BASE64};
use super::{
    Accepted, Fingerprint, Mirror, ParseContext, ProviderConfig, SendError, SendFuture, Transport,
    TransportContext,
};
use crate::credentials::Credential;
use crate::outbound::OutgoingEmail;
use crate::settings::Secret;

const DEFAULT_BASE_URL: &str = "https://api.postmarkapp.com";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Fields {
    api_key: Option<Secret>,
    api_key_env: Option<String>,
    api_key_file: Option<PathBuf>,
    base_url: Option<String>,
    message_stream: Option<String>,
}

#[derive(Debug, Clone)]
pub struct PostmarkProvider {
    pub base_url: String,
    /// The server token.
    pub api_key: Secret,
    pub message_stream: Option<String>,
}

pub fn parse(table: toml::Table, ctx: &mut ParseContext) -> Option<Arc<dyn ProviderConfig>> {
    let f: Fields = ctx.fields(table)?;
    let base_url = http_api::base_url(ctx, f.base_url, DEFAULT_BASE_URL);
    let api_key = http_api::required_secret(
        ctx,
        "postmark",
        "api_key",
        f.api_key,
        f.api_key_env,
        f.api_key_file,
    )?;
    Some(Arc::new(PostmarkProvider {
        base_url,
        api_key,
        message_stream: f.message_stream,
    }))
}

impl ProviderConfig for PostmarkProvider {
    fn kind(&self) -> &'static str {
        "postmark"
    }

    /// It takes the email's fields, attachments included.
    fn wants_parts(&self) -> bool {
        true
    }

    fn fingerprint(&self, h: &mut Fingerprint) {
        h.add(&self.base_url)
            .add(&self.message_stream)
            .secret(Some(&self.api_key));
    }

    fn mirror(&self) -> Mirror {
        Mirror {
            host: http_api::host_of(&self.base_url),
            ..Mirror::default()
        }
    }

    fn transport(&self, ctx: &TransportContext) -> Result<Box<dyn Transport>, SendError> {
        Ok(Box::new(PostmarkTransport {
            api: HttpApi::new(&self.base_url, ctx)?,
            url: format!("{}/email", self.base_url),
            credential: Credential::Static(self.api_key.clone()),
            message_stream: self.message_stream.clone(),
        }))
    }
}

struct PostmarkTransport {
    api: HttpApi,
    url: String,
    credential: Credential,
    message_stream: Option<String>,
}

impl Transport for PostmarkTransport {
    fn send<'a>(&'a self, email: &'a Arc<OutgoingEmail>) -> SendFuture<'a> {
        Box::pin(async move {
            let stream = self.message_stream.clone();
            let body =
                http_api::build_off_thread(email, move |e| request_body(e, stream.as_deref()))
                    .await?;
            let answer = self
                .api
                .post(ApiRequest {
                    url: self.url.clone(),
                    content_type: "application/json".into(),
                    headers: vec![("accept", "application/json".into())],
                    body,
                    credential: Some((&self.credential, Auth::Header("x-postmark-server-token"))),
                })
                .await?;
            Ok(Accepted {
                provider_message_id: answer
                    .json_str("MessageID")
                    .unwrap_or_else(|| email.rfc_message_id.clone()),
                sent_at: OffsetDateTime::now_utc(),
            })
        })
    }

    fn abort(&self) {
        self.api.abort();
    }
}

fn list(mailboxes: &[lettre::message::Mailbox]) -> String {
    mailboxes
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The Email API JSON of `email`.
fn request_body(email: &OutgoingEmail, message_stream: Option<&str>) -> Vec<u8> {
    let p = &email.parts;
    let mut headers: Vec<Value> = p
        .headers
        .iter()
        .map(|(n, v)| json!({"Name": n, "Value": v}))
        .collect();
    headers.push(json!({"Name": "Message-ID", "Value": format!("<{}>", email.rfc_message_id)}));
    let mut body = json!({
        "From": p.from.to_string(),
        "To": list(&p.to),
        "Subject": p.subject,
        "TextBody": p.text,
        "Headers": headers,
    });
    if !p.cc.is_empty() {
        body["Cc"] = list(&p.cc).into();
    }
    if !p.bcc.is_empty() {
        body["Bcc"] = list(&p.bcc).into();
    }
    if let Some(html) = &p.html {
        body["HtmlBody"] = html.clone().into();
    }
    if !p.attachments.is_empty() {
        body["Attachments"] = p
            .attachments
            .iter()
            .map(|a| {
                json!({
                    "Name": a.filename,
                    "Content": BASE64.encode(&a.bytes),
                    "ContentType": a.mime_type,
                })
            })
            .collect();
    }
    if let Some(stream) = message_stream {
        body["MessageStream"] = stream.into();
    }
    serde_json::to_vec(&body).unwrap_or_default()
}
