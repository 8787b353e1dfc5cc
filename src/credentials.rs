//! Credentials as a runtime service: what a transport or a mailbox authenticates with, behind
//! one interface that hands out a current secret. A static secret (a password, an API key)
//! never changes; an OAuth2 account (`crate::oauth2`) refreshes its access token ahead of
//! expiry and after a refusal, one refresh at a time per account.
//!
//! A user of a credential asks [`Credential::token`] before each use and, when the server
//! refuses it as expired or invalid, tells [`Credential::refused`] and asks once more: the
//! refusal counts only if the fresh token is refused too.

use std::sync::Arc;

use crate::oauth2::OAuth2Account;
use crate::providers::SendError;
use crate::settings::Secret;

/// Why no secret can be handed out.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CredentialError {
    /// The grant is gone (revoked, expired after inactivity): permanent until a user
    /// authorizes the account again and the configuration changes.
    #[error("the OAuth2 account {account} must be re-authorized: {detail}")]
    Reauthorize { account: String, detail: String },
    /// Not for now (the token endpoint is unreachable or failing): try later.
    #[error("cannot get an access token for {account}: {detail}")]
    Unavailable { account: String, detail: String },
}

impl From<CredentialError> for SendError {
    fn from(e: CredentialError) -> Self {
        match e {
            CredentialError::Reauthorize { account, detail } => {
                SendError::Reauthorize { account, detail }
            }
            CredentialError::Unavailable { account, detail } => {
                SendError::Token { account, detail }
            }
        }
    }
}

/// What a provider or a mailbox authenticates with.
#[derive(Debug, Clone)]
pub enum Credential {
    /// A secret given in the configuration (a password, an API key, a static token).
    Static(Secret),
    /// An OAuth2 account (`crate::oauth2`): access tokens from its refresh token.
    OAuth2(Arc<OAuth2Account>),
}

impl Credential {
    /// The secret to use now.
    pub async fn token(&self) -> Result<Secret, CredentialError> {
        match self {
            Credential::Static(s) => Ok(s.clone()),
            Credential::OAuth2(a) => a.token().await,
        }
    }

    /// The server refused `token` as invalid or expired: the next [`Credential::token`]
    /// brings a fresh one where that is possible. Whether it is is [`Credential::renews`].
    pub fn refused(&self, token: &Secret) {
        match self {
            Credential::Static(_) => {}
            Credential::OAuth2(a) => a.refused(token),
        }
    }

    /// Whether asking again after a refusal can give another secret (worth one retry).
    pub fn renews(&self) -> bool {
        match self {
            Credential::Static(_) => false,
            Credential::OAuth2(_) => true,
        }
    }
}
