//! `kind = "ses"`: Amazon SES v2 `SendEmail` with a raw MIME message (`POST
//! /v2/email/outbound-emails`, `Content.Raw.Data` = base64 of the message, every envelope
//! recipient in `Destination` — Bcc included, the message has no Bcc header), signed with
//! AWS Signature Version 4 (service `ses`, the configured region; [`super::sigv4`]). SES
//! answers 200 with `MessageId`.

use std::path::PathBuf;
use std::sync::Arc;

use base64::Engine;
use serde::Deserialize;
use serde_json::json;
use time::OffsetDateTime;

use super::http_api::{self, ApiRequest, HttpApi, BASE64};
use super::sigv4::{self, SigningCredentials};
use super::{
    Accepted, Fingerprint, Mirror, ParseContext, ProviderConfig, SendError, SendFuture, Transport,
    TransportContext,
};
use crate::outbound::OutgoingEmail;
use crate::settings::Secret;

/// SES v2's limit on a raw message (the request's base64 is a third larger).
const MAX_MESSAGE: usize = 40 * 1024 * 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Fields {
    region: Option<String>,
    access_key_id: Option<String>,
    secret_access_key: Option<Secret>,
    secret_access_key_env: Option<String>,
    secret_access_key_file: Option<PathBuf>,
    session_token: Option<Secret>,
    session_token_env: Option<String>,
    session_token_file: Option<PathBuf>,
    base_url: Option<String>,
}

#[derive(Debug, Clone)]
pub struct SesProvider {
    pub base_url: String,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: Secret,
    /// For temporary credentials (`x-amz-security-token`).
    pub session_token: Option<Secret>,
}

pub fn parse(table: toml::Table, ctx: &mut ParseContext) -> Option<Arc<dyn ProviderConfig>> {
    let f: Fields = ctx.fields(table)?;
    let region = match f.region {
        Some(r)
            if !r.is_empty()
                && r.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-') =>
        {
            r
        }
        Some(r) => {
            ctx.problem("region", format!("`{r}` is not an AWS region"));
            return None;
        }
        None => {
            ctx.problem("region", "a provider of kind \"ses\" needs `region`");
            return None;
        }
    };
    let base_url = http_api::base_url(
        ctx,
        f.base_url,
        &format!("https://email.{region}.amazonaws.com"),
    );
    let access_key_id = match f.access_key_id {
        Some(k) if !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric()) => k,
        _ => {
            ctx.problem(
                "access_key_id",
                "a provider of kind \"ses\" needs `access_key_id` (letters and digits)",
            );
            return None;
        }
    };
    let secret_access_key = http_api::required_secret(
        ctx,
        "ses",
        "secret_access_key",
        f.secret_access_key,
        f.secret_access_key_env,
        f.secret_access_key_file,
    )?;
    let session_token = ctx.secret(
        "session_token",
        f.session_token,
        f.session_token_env,
        f.session_token_file,
    );
    Some(Arc::new(SesProvider {
        base_url,
        region,
        access_key_id,
        secret_access_key,
        session_token,
    }))
}

impl ProviderConfig for SesProvider {
    fn kind(&self) -> &'static str {
        "ses"
    }

    fn fingerprint(&self, h: &mut Fingerprint) {
        h.add(&self.base_url)
            .add(&self.region)
            .add(&self.access_key_id)
            .secret(Some(&self.secret_access_key))
            .secret(self.session_token.as_ref());
    }

    fn mirror(&self) -> Mirror {
        Mirror {
            host: http_api::host_of(&self.base_url),
            username: Some(self.access_key_id.clone()),
            ..Mirror::default()
        }
    }

    fn transport(&self, ctx: &TransportContext) -> Result<Box<dyn Transport>, SendError> {
        let url = format!("{}/v2/email/outbound-emails", self.base_url);
        let parsed = url::Url::parse(&url).map_err(|e| SendError::Config(format!("{url}: {e}")))?;
        Ok(Box::new(SesTransport {
            api: HttpApi::new(&self.base_url, ctx)?,
            url,
            parsed,
            config: self.clone(),
        }))
    }
}

struct SesTransport {
    api: HttpApi,
    url: String,
    parsed: url::Url,
    config: SesProvider,
}

impl Transport for SesTransport {
    fn send<'a>(&'a self, email: &'a Arc<OutgoingEmail>) -> SendFuture<'a> {
        Box::pin(async move {
            if email.bytes.len() > MAX_MESSAGE {
                return Err(SendError::Unsupported {
                    endpoint: self.api.endpoint.clone(),
                    what: "a message over SES's 40 MB",
                });
            }
            let body = http_api::build_off_thread(email, request_body).await?;
            let c = &self.config;
            let sign = |body: &[u8]| {
                let creds = SigningCredentials {
                    access_key_id: &c.access_key_id,
                    secret_access_key: c.secret_access_key.expose(),
                    region: &c.region,
                    service: "ses",
                };
                let mut signed: Vec<(&str, &str)> = vec![("content-type", "application/json")];
                if let Some(token) = &c.session_token {
                    signed.push(("x-amz-security-token", token.expose()));
                }
                let signature = sigv4::sign(
                    &creds,
                    "POST",
                    &self.parsed,
                    &signed,
                    body,
                    OffsetDateTime::now_utc(),
                );
                let mut headers = vec![
                    ("x-amz-date", signature.amz_date),
                    ("authorization", signature.authorization),
                ];
                if let Some(token) = &c.session_token {
                    headers.push(("x-amz-security-token", token.expose().to_string()));
                }
                headers
            };
            let answer = self
                .api
                .post_signed(
                    ApiRequest {
                        url: self.url.clone(),
                        content_type: "application/json".into(),
                        headers: Vec::new(),
                        body,
                        credential: None,
                    },
                    &sign,
                )
                .await?;
            Ok(Accepted {
                provider_message_id: answer
                    .json_str("MessageId")
                    .unwrap_or_else(|| email.rfc_message_id.clone()),
                sent_at: OffsetDateTime::now_utc(),
            })
        })
    }

    fn abort(&self) {
        self.api.abort();
    }
}

/// The `SendEmail` JSON of `email`: the raw message and its envelope recipients.
fn request_body(email: &OutgoingEmail) -> Vec<u8> {
    let p = &email.parts;
    let list = |m: &[lettre::message::Mailbox]| -> Vec<String> {
        m.iter().map(|m| m.email.to_string()).collect()
    };
    let body = json!({
        "Destination": {
            "ToAddresses": list(&p.to),
            "CcAddresses": list(&p.cc),
            "BccAddresses": list(&p.bcc),
        },
        "Content": {"Raw": {"Data": BASE64.encode(&email.bytes)}},
    });
    serde_json::to_vec(&body).unwrap_or_default()
}
