//! `kind = "gmail_api"`: the Gmail API's `users.messages.send`, given the MIME message (with a
//! Bcc header for the blind recipients; Gmail removes it). Up to `SIMPLE_LIMIT` the message
//! goes as JSON `{"raw": base64url}` to `/gmail/v1/users/{user}/messages/send`; larger ones
//! as the request body (`Content-Type: message/rfc822`) to the media upload endpoint
//! `/upload/gmail/v1/users/{user}/messages/send?uploadType=media`. Gmail answers 200 with
//! the message's `id` (the result's `provider_message_id`) and `threadId` (logged).
//!
//! The bearer token comes from a [`Credential`] ([`Bearer`]): the provider's OAuth2 account
//! (`[providers.oauth2]`: refreshed ahead of expiry, and once more after a 401/403) or a
//! static `access_token`.

use std::path::PathBuf;
use std::sync::Arc;

use base64::Engine;
use serde::Deserialize;
use time::OffsetDateTime;

use super::http_api::{self, ApiRequest, Auth, Bearer, HttpApi, BASE64URL};
use super::{
    Accepted, Fingerprint, Mirror, ParseContext, ProviderConfig, SendError, SendFuture, Transport,
    TransportContext,
};
use crate::credentials::Credential;
use crate::outbound::OutgoingEmail;
use crate::settings::Secret;

const DEFAULT_BASE_URL: &str = "https://gmail.googleapis.com";
/// Larger messages go through the media upload endpoint rather than as JSON.
const SIMPLE_LIMIT: usize = 5 * 1024 * 1024;
/// Gmail's limit on a message sent through the API.
const MAX_MESSAGE: usize = 35 * 1024 * 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Fields {
    access_token: Option<Secret>,
    access_token_env: Option<String>,
    access_token_file: Option<PathBuf>,
    oauth2: Option<toml::Table>,
    base_url: Option<String>,
    user: Option<String>,
}

#[derive(Debug, Clone)]
pub struct GmailProvider {
    pub base_url: String,
    /// The mailbox sent from: `me` (the token's account) or an address.
    pub user: String,
    /// A static `access_token` or an OAuth2 account.
    pub bearer: Bearer,
}

pub fn parse(table: toml::Table, ctx: &mut ParseContext) -> Option<Arc<dyn ProviderConfig>> {
    let f: Fields = ctx.fields(table)?;
    let base_url = http_api::base_url(ctx, f.base_url, DEFAULT_BASE_URL);
    let user = api_user(ctx, f.user)?;
    let bearer = Bearer::parse(
        ctx,
        "gmail_api",
        (f.access_token, f.access_token_env, f.access_token_file),
        f.oauth2,
    )?;
    Some(Arc::new(GmailProvider {
        base_url,
        user,
        bearer,
    }))
}

/// `user`, `me` when not given; only characters a URL path carries as they are.
pub fn api_user(ctx: &mut ParseContext, user: Option<String>) -> Option<String> {
    let user = user.unwrap_or_else(|| "me".to_string());
    if !crate::settings::is_api_user(&user) {
        ctx.problem(
            "user",
            format!("`{user}` is not \"me\" or an email address"),
        );
        return None;
    }
    Some(user)
}

impl ProviderConfig for GmailProvider {
    fn kind(&self) -> &'static str {
        "gmail_api"
    }

    /// Gmail's documented per-user limits: `messages.send` costs 100 of the 250 quota units a
    /// user has per second, and a Google Workspace user sends at most 2,000 messages a day.
    fn default_limits(&self) -> super::RateLimits {
        super::RateLimits {
            per_second: Some(2.5),
            per_day: Some(2000),
            max_in_flight: None,
        }
    }

    fn fingerprint(&self, h: &mut Fingerprint) {
        h.add(&self.base_url).add(&self.user);
        self.bearer.fingerprint(h);
    }

    fn mirror(&self) -> Mirror {
        Mirror {
            host: http_api::host_of(&self.base_url),
            username: Some(self.user.clone()),
            ..Mirror::default()
        }
    }

    fn transport(&self, ctx: &TransportContext) -> Result<Box<dyn Transport>, SendError> {
        Ok(Box::new(GmailTransport {
            api: HttpApi::new(&self.base_url, ctx)?,
            send_url: format!(
                "{}/gmail/v1/users/{}/messages/send",
                self.base_url, self.user
            ),
            upload_url: format!(
                "{}/upload/gmail/v1/users/{}/messages/send?uploadType=media",
                self.base_url, self.user
            ),
            credential: self.bearer.credential(ctx),
        }))
    }
}

struct GmailTransport {
    api: HttpApi,
    send_url: String,
    upload_url: String,
    credential: Credential,
}

impl Transport for GmailTransport {
    fn send<'a>(&'a self, email: &'a Arc<OutgoingEmail>) -> SendFuture<'a> {
        Box::pin(async move {
            if email.bytes.len() > MAX_MESSAGE {
                return Err(SendError::Unsupported {
                    endpoint: self.api.endpoint.clone(),
                    what: "a message over Gmail's 35 MB",
                });
            }
            let (url, content_type, body) = if email.bytes.len() <= SIMPLE_LIMIT {
                let body = http_api::build_off_thread(email, raw_json).await?;
                (self.send_url.clone(), "application/json", body)
            } else {
                let body = http_api::build_off_thread(email, http_api::mime_with_bcc).await?;
                (self.upload_url.clone(), "message/rfc822", body)
            };
            let answer = self
                .api
                .post(ApiRequest {
                    url,
                    content_type: content_type.into(),
                    headers: Vec::new(),
                    body,
                    credential: Some((&self.credential, Auth::Bearer)),
                })
                .await?;
            let id = answer.json_str("id");
            if let Some(thread) = answer.json_str("threadId") {
                tracing::debug!(
                    message_id = %email.parts.message_id,
                    gmail_id = id.as_deref().unwrap_or(""),
                    thread_id = %thread,
                    "sent through the Gmail API"
                );
            }
            Ok(Accepted {
                provider_message_id: id.unwrap_or_else(|| email.rfc_message_id.clone()),
                sent_at: OffsetDateTime::now_utc(),
            })
        })
    }

    fn abort(&self) {
        self.api.abort();
    }
}

/// `{"raw": base64url(MIME)}`.
fn raw_json(email: &OutgoingEmail) -> Vec<u8> {
    let raw = BASE64URL.encode(http_api::mime_with_bcc(email));
    serde_json::to_vec(&serde_json::json!({ "raw": raw })).unwrap_or_default()
}
