//! `kind = "mailgun"`: Mailgun's MIME sending (`POST /v3/{domain}/messages.mime`, basic auth
//! `api:<api key>`), a multipart form with every envelope recipient as a `to` field (Bcc
//! included: the MIME message has no Bcc header) and the finished MIME message as the
//! `message` file. Mailgun answers 200 with the message's `id`. `region = "eu"` picks the EU
//! endpoint; `base_url` overrides either.

use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;
use time::OffsetDateTime;

use super::http_api::{self, ApiRequest, Auth, HttpApi};
use super::{
    Accepted, Fingerprint, Mirror, ParseContext, ProviderConfig, SendError, SendFuture, Transport,
    TransportContext,
};
use crate::credentials::Credential;
use crate::outbound::OutgoingEmail;
use crate::settings::Secret;

const US_BASE_URL: &str = "https://api.mailgun.net";
const EU_BASE_URL: &str = "https://api.eu.mailgun.net";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Fields {
    api_key: Option<Secret>,
    api_key_env: Option<String>,
    api_key_file: Option<PathBuf>,
    base_url: Option<String>,
    domain: Option<String>,
    region: Option<String>,
}

#[derive(Debug, Clone)]
pub struct MailgunProvider {
    pub base_url: String,
    pub domain: String,
    pub api_key: Secret,
}

pub fn parse(table: toml::Table, ctx: &mut ParseContext) -> Option<Arc<dyn ProviderConfig>> {
    let f: Fields = ctx.fields(table)?;
    let default = match f.region.as_deref() {
        None | Some("us") => US_BASE_URL,
        Some("eu") => EU_BASE_URL,
        Some(other) => {
            ctx.problem("region", format!("`{other}` is not \"us\" or \"eu\""));
            US_BASE_URL
        }
    };
    let base_url = http_api::base_url(ctx, f.base_url, default);
    let domain = match f.domain {
        Some(d)
            if !d.is_empty()
                && d.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-') =>
        {
            d
        }
        Some(d) => {
            ctx.problem("domain", format!("`{d}` is not a domain name"));
            return None;
        }
        None => {
            ctx.problem("domain", "a provider of kind \"mailgun\" needs `domain`");
            return None;
        }
    };
    let api_key = http_api::required_secret(
        ctx,
        "mailgun",
        "api_key",
        f.api_key,
        f.api_key_env,
        f.api_key_file,
    )?;
    Some(Arc::new(MailgunProvider {
        base_url,
        domain,
        api_key,
    }))
}

impl ProviderConfig for MailgunProvider {
    fn kind(&self) -> &'static str {
        "mailgun"
    }

    fn fingerprint(&self, h: &mut Fingerprint) {
        h.add(&self.base_url)
            .add(&self.domain)
            .secret(Some(&self.api_key));
    }

    fn mirror(&self) -> Mirror {
        Mirror {
            host: http_api::host_of(&self.base_url),
            username: Some(self.domain.clone()),
            ..Mirror::default()
        }
    }

    fn transport(&self, ctx: &TransportContext) -> Result<Box<dyn Transport>, SendError> {
        Ok(Box::new(MailgunTransport {
            api: HttpApi::new(&self.base_url, ctx)?,
            url: format!("{}/v3/{}/messages.mime", self.base_url, self.domain),
            credential: Credential::Static(self.api_key.clone()),
        }))
    }
}

struct MailgunTransport {
    api: HttpApi,
    url: String,
    credential: Credential,
}

impl Transport for MailgunTransport {
    fn send<'a>(&'a self, email: &'a Arc<OutgoingEmail>) -> SendFuture<'a> {
        Box::pin(async move {
            let (content_type, body) = http_api::build_off_thread(email, form).await?;
            let answer = self
                .api
                .post(ApiRequest {
                    url: self.url.clone(),
                    content_type,
                    headers: Vec::new(),
                    body,
                    credential: Some((&self.credential, Auth::Basic("api"))),
                })
                .await?;
            Ok(Accepted {
                provider_message_id: answer
                    .json_str("id")
                    .map(|id| id.trim_matches(['<', '>']).to_string())
                    .unwrap_or_else(|| email.rfc_message_id.clone()),
                sent_at: OffsetDateTime::now_utc(),
            })
        })
    }

    fn abort(&self) {
        self.api.abort();
    }
}

/// The `multipart/form-data` body (RFC 7578): a `to` field per envelope recipient and the
/// message as the `message` file. The boundary is random, so no message can contain it by
/// chance, and checked anyway.
fn form(email: &OutgoingEmail) -> (String, Vec<u8>) {
    let mut random = [0u8; 16];
    let boundary = loop {
        let _ = aws_lc_rs::rand::fill(&mut random);
        let b: String = random.iter().map(|x| format!("{x:02x}")).collect();
        let b = format!("mailbridge-{b}");
        if memchr::memmem::find(&email.bytes, b.as_bytes()).is_none() {
            break b;
        }
    };
    let mut body = Vec::with_capacity(email.bytes.len() + 512);
    for to in email.envelope.to() {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"to\"\r\n\r\n{to}\r\n")
                .as_bytes(),
        );
    }
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"message\"; filename=\"message.mime\"\r\nContent-Type: message/rfc822\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(&email.bytes);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}
