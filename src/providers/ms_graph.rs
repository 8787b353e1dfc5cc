//! `kind = "ms_graph"`: Microsoft Graph's `sendMail` with a MIME message (`POST
//! /v1.0/users/{user}/sendMail`, or `/v1.0/me/sendMail` for `user = "me"`): the body is the
//! message (with a Bcc header for the blind recipients) in base64, `Content-Type:
//! text/plain`. Graph answers 202 without an id: the result's `provider_message_id` is the
//! email's Message-ID.
//!
//! The bearer token comes from a [`Credential`] ([`Bearer`]): the provider's OAuth2 account
//! (`[providers.oauth2]`: refreshed ahead of expiry, and once more after a 401/403) or a
//! static `access_token`.

use std::path::PathBuf;
use std::sync::Arc;

use base64::Engine;
use serde::Deserialize;
use time::OffsetDateTime;

use super::http_api::{self, ApiRequest, Auth, Bearer, HttpApi, BASE64};
use super::{
    Accepted, Fingerprint, Mirror, ParseContext, ProviderConfig, SendError, SendFuture, Transport,
    TransportContext,
};
use crate::credentials::Credential;
use crate::outbound::OutgoingEmail;
use crate::settings::Secret;

const DEFAULT_BASE_URL: &str = "https://graph.microsoft.com";
/// Graph's limit on a request's size.
const MAX_REQUEST: usize = 4 * 1024 * 1024;

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
pub struct GraphProvider {
    pub base_url: String,
    /// The mailbox sent from: `me` (the token's account), an address or a user id.
    pub user: String,
    /// A static `access_token` or an OAuth2 account.
    pub bearer: Bearer,
}

pub fn parse(table: toml::Table, ctx: &mut ParseContext) -> Option<Arc<dyn ProviderConfig>> {
    let f: Fields = ctx.fields(table)?;
    let base_url = http_api::base_url(ctx, f.base_url, DEFAULT_BASE_URL);
    let user = super::gmail_api::api_user(ctx, f.user)?;
    let bearer = Bearer::parse(
        ctx,
        "ms_graph",
        (f.access_token, f.access_token_env, f.access_token_file),
        f.oauth2,
    )?;
    Some(Arc::new(GraphProvider {
        base_url,
        user,
        bearer,
    }))
}

impl ProviderConfig for GraphProvider {
    fn kind(&self) -> &'static str {
        "ms_graph"
    }

    /// Exchange Online's documented sending limits: 30 messages a minute and 10,000
    /// recipients a day per mailbox (counted here as messages).
    fn default_limits(&self) -> super::RateLimits {
        super::RateLimits {
            per_second: Some(0.5),
            per_day: Some(10_000),
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
        let url = if self.user == "me" {
            format!("{}/v1.0/me/sendMail", self.base_url)
        } else {
            format!("{}/v1.0/users/{}/sendMail", self.base_url, self.user)
        };
        Ok(Box::new(GraphTransport {
            api: HttpApi::new(&self.base_url, ctx)?,
            url,
            credential: self.bearer.credential(ctx),
        }))
    }
}

struct GraphTransport {
    api: HttpApi,
    url: String,
    credential: Credential,
}

impl Transport for GraphTransport {
    fn send<'a>(&'a self, email: &'a Arc<OutgoingEmail>) -> SendFuture<'a> {
        Box::pin(async move {
            // Graph refuses a request over 4 MB (413) after the whole upload; an email that
            // cannot fit fails here at once.
            if email.bytes.len() / 3 * 4 > MAX_REQUEST {
                return Err(SendError::Unsupported {
                    endpoint: self.api.endpoint.clone(),
                    what: "a message over 3 MB (Graph's sendMail takes requests up to 4 MB; send it through SMTP or gmail_api)",
                });
            }
            let body = http_api::build_off_thread(email, |e| {
                BASE64.encode(http_api::mime_with_bcc(e)).into_bytes()
            })
            .await?;
            self.api
                .post(ApiRequest {
                    url: self.url.clone(),
                    content_type: "text/plain".into(),
                    headers: Vec::new(),
                    body,
                    credential: Some((&self.credential, Auth::Bearer)),
                })
                .await?;
            Ok(Accepted {
                provider_message_id: email.rfc_message_id.clone(),
                sent_at: OffsetDateTime::now_utc(),
            })
        })
    }

    fn abort(&self) {
        self.api.abort();
    }
}
