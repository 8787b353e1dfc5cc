//! OAuth2 accounts: access tokens got with the `refresh_token` grant (RFC 6749 §6), for
//! SMTP and IMAP XOAUTH2.
//!
//! An account is a provider's or a mailbox's `[*.oauth2]` table ([`OAuth2Config`]). The
//! running service keeps one [`OAuth2Account`] per account in its [`Accounts`] registry, so a
//! sender and its restarts share one cached access token; an account whose configuration
//! changed is replaced (and starts afresh, its remembered refusal forgotten).
//!
//! - An access token is cached until 60 s before its `expires_in` and refreshed then, or once
//!   more after a server refused it ([`OAuth2Account::refused`]).
//! - One refresh at a time per account: in this process the account's lock is held across the
//!   refresh (callers wait and get its token); across instances a PostgreSQL advisory lock
//!   keyed by the account is held across it.
//! - A rotated refresh token (Microsoft answers a new one on every use) is kept in PostgreSQL
//!   (`oauth2_tokens`), encrypted with AES-256-GCM under a key in a private key file (made like
//!   the attachment link key), bound to the account. It is used instead of the configured one
//!   while the configured one is the one it descends from (an HMAC of it is stored beside it):
//!   a refresh token changed in the configuration supersedes it.
//! - `invalid_grant` (and any other refusal of the grant or the client) is permanent:
//!   [`CredentialError::Reauthorize`], remembered by the account until its configuration
//!   changes, so nothing asks the token endpoint again in a loop. An unreachable endpoint, a
//!   5xx or 429, or the database unavailable is [`CredentialError::Unavailable`].
//!
//! No token, client secret or refresh token is ever logged, put in an error, or printed by
//! `Debug`: they are [`Secret`]s, and errors carry the endpoint's error code only.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use aws_lc_rs::hmac;
use deadpool_postgres::Pool;
use serde::Deserialize;

use crate::credentials::CredentialError;
use crate::providers::{Fingerprint, ParseContext};
use crate::settings::Secret;

/// An access token is renewed when it has less than this left (or less than half its
/// lifetime, for tokens that live less than two minutes).
pub const RENEW_AHEAD: Duration = Duration::from_secs(60);
/// The longest lifetime believed (an endpoint's `expires_in` is outside data).
const MAX_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
/// The largest token endpoint answer read.
const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// When the token endpoint does not say how long a token lives.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);
/// The shortest lifetime believed (an `expires_in` of 0 would renew at every use).
const MIN_LIFETIME: Duration = Duration::from_secs(2);
/// After a refresh failed for now, callers get that failure for this long rather than each
/// trying again in turn.
const FAILURE_BACKOFF: Duration = Duration::from_secs(2);
/// Bound on one token request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The key file's name, in `[attachments] dir` (beside the link key).
pub const KEY_FILE: &str = ".oauth2-key";

/// The identity providers with known token endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OAuth2Kind {
    Google,
    Microsoft,
    Custom,
}

impl OAuth2Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            OAuth2Kind::Google => "google",
            OAuth2Kind::Microsoft => "microsoft",
            OAuth2Kind::Custom => "custom",
        }
    }

    fn default_token_url(self) -> Option<&'static str> {
        match self {
            OAuth2Kind::Google => Some("https://oauth2.googleapis.com/token"),
            OAuth2Kind::Microsoft => {
                Some("https://login.microsoftonline.com/common/oauth2/v2.0/token")
            }
            OAuth2Kind::Custom => None,
        }
    }
}

/// An `oauth2` table, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Fields {
    kind: OAuth2Kind,
    client_id: String,
    client_secret: Option<Secret>,
    client_secret_env: Option<String>,
    client_secret_file: Option<PathBuf>,
    refresh_token: Option<Secret>,
    refresh_token_env: Option<String>,
    refresh_token_file: Option<PathBuf>,
    token_url: Option<String>,
    scope: Option<String>,
}

/// An OAuth2 account's configuration (a provider's or a mailbox's `oauth2` table).
#[derive(Debug, Clone, PartialEq)]
pub struct OAuth2Config {
    pub kind: OAuth2Kind,
    pub client_id: String,
    /// Absent for public clients.
    pub client_secret: Option<Secret>,
    pub refresh_token: Secret,
    pub token_url: url::Url,
    pub scope: Option<String>,
}

impl OAuth2Config {
    /// Reads an `oauth2` table; `ctx` is the table's own context (see
    /// [`ParseContext::nested`]). Problems are reported there.
    pub fn parse(table: toml::Table, ctx: &mut ParseContext) -> Option<Self> {
        let f: Fields = ctx.fields(table)?;
        if f.client_id.trim().is_empty() {
            ctx.problem("client_id", "must not be empty");
        }
        let client_secret = ctx.secret(
            "client_secret",
            f.client_secret,
            f.client_secret_env,
            f.client_secret_file,
        );
        let refresh_token = ctx.secret(
            "refresh_token",
            f.refresh_token,
            f.refresh_token_env,
            f.refresh_token_file,
        );
        let refresh_token = match refresh_token {
            Some(t) if !t.expose().is_empty() => Some(t),
            Some(_) => {
                ctx.problem("refresh_token", "must not be empty");
                None
            }
            None => {
                ctx.problem(
                    "refresh_token",
                    "give the account's refresh token as `refresh_token`, `refresh_token_env` or `refresh_token_file`",
                );
                None
            }
        };
        let token_url = match f.token_url.as_deref().or(f.kind.default_token_url()) {
            Some(u) => match url::Url::parse(u) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.has_host() => Some(u),
                Ok(_) => {
                    ctx.problem("token_url", "must be an http or https URL");
                    None
                }
                Err(e) => {
                    ctx.problem("token_url", format!("not a URL: {e}"));
                    None
                }
            },
            None => {
                ctx.problem(
                    "token_url",
                    "an account of kind \"custom\" needs `token_url`",
                );
                None
            }
        };
        if token_url.as_ref().is_some_and(|u| u.scheme() == "http") {
            ctx.warning(
                "token_url",
                "the refresh token will be sent without TLS; only do this for a local endpoint",
            );
        }
        Some(Self {
            kind: f.kind,
            client_id: f.client_id,
            client_secret,
            refresh_token: refresh_token?,
            token_url: token_url?,
            scope: f.scope.filter(|s| !s.trim().is_empty()),
        })
    }

    /// Feeds every setting into `h`, the secrets included (their values hashed).
    pub fn fingerprint(&self, h: &mut Fingerprint) {
        h.add(&self.kind)
            .add(&self.client_id)
            .add(&self.token_url.as_str())
            .add(&self.scope)
            .secret(self.client_secret.as_ref())
            .secret(Some(&self.refresh_token));
    }
}

/// The registry of the running accounts, shared by every sender and fetcher (it reaches
/// transports through `TransportContext` and fetchers through their `ChildContext`).
pub struct Accounts {
    pool: Option<Pool>,
    key_path: PathBuf,
    keys: OnceLock<Arc<Keys>>,
    http: Result<reqwest::Client, String>,
    accounts: Mutex<HashMap<String, Arc<OAuth2Account>>>,
    /// Refreshes at once, each holding a pooled connection (its lock's transaction) while it
    /// asks the token endpoint: a quarter of the pool, so that many accounts refreshing
    /// together (at start) never take the connections the outbox and the fetchers need.
    refreshing: tokio::sync::Semaphore,
}

impl std::fmt::Debug for Accounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accounts")
            .field("key_path", &self.key_path)
            .finish_non_exhaustive()
    }
}

impl Accounts {
    /// `pool` keeps rotated refresh tokens and takes the cross-instance locks (without it,
    /// rotation lasts as long as the process); the key file is made on first need.
    pub fn new(pool: Option<Pool>, key_path: PathBuf) -> Self {
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(REQUEST_TIMEOUT)
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| e.to_string());
        let refreshes = pool
            .as_ref()
            .map_or(4, |p| (p.status().max_size / 4).max(1));
        Self {
            refreshing: tokio::sync::Semaphore::new(refreshes),
            pool,
            key_path,
            keys: OnceLock::new(),
            http,
            accounts: Mutex::new(HashMap::new()),
        }
    }

    /// The running account of provider `provider_id` (id `provider:<id>`) for `config`.
    pub fn for_provider(
        self: &Arc<Self>,
        provider_id: &str,
        config: &OAuth2Config,
    ) -> Arc<OAuth2Account> {
        self.account(&format!("provider:{provider_id}"), config)
    }

    /// The running account of mailbox `mailbox_id` (id `mailbox:<id>`) for `config`.
    pub fn for_mailbox(
        self: &Arc<Self>,
        mailbox_id: &str,
        config: &OAuth2Config,
    ) -> Arc<OAuth2Account> {
        self.account(&format!("mailbox:{mailbox_id}"), config)
    }

    /// The running account `id` (such as `provider:<id>`) for `config`: the same one as long
    /// as its configuration is the same, a fresh one once it changed.
    pub fn account(self: &Arc<Self>, id: &str, config: &OAuth2Config) -> Arc<OAuth2Account> {
        let mut accounts = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(a) = accounts.get(id) {
            if a.config == *config {
                return a.clone();
            }
        }
        let account = Arc::new(OAuth2Account {
            id: id.to_string(),
            config: config.clone(),
            registry: self.clone(),
            state: tokio::sync::Mutex::new(State::default()),
            refused: Mutex::new(None),
            requests: std::sync::atomic::AtomicU64::new(0),
        });
        accounts.insert(id.to_string(), account.clone());
        account
    }

    /// Seals with a key derived from `secret` (`[attachments] link_key`, configured alike on
    /// every instance) instead of the key file.
    pub fn with_key_from(self, secret: &Secret) -> Self {
        let derived = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, secret.expose().as_bytes()),
            b"mailbridge oauth2 refresh token sealing",
        );
        if let Ok(keys) = Keys::new(derived.as_ref()) {
            let _ = self.keys.set(Arc::new(keys));
        }
        self
    }

    fn keys(&self) -> Result<Arc<Keys>, String> {
        if let Some(k) = self.keys.get() {
            return Ok(k.clone());
        }
        let bytes = read_or_make_key(&self.key_path)?;
        let keys = Arc::new(Keys::new(&bytes)?);
        Ok(self.keys.get_or_init(|| keys).clone())
    }
}

/// The encryption key of stored refresh tokens, and the HMAC key naming the configured
/// refresh token a stored one descends from (derived from the same file).
struct Keys {
    aead: LessSafeKey,
    mac: hmac::Key,
}

impl Keys {
    fn new(bytes: &[u8]) -> Result<Self, String> {
        let invalid = || "the OAuth2 key is not a valid AES-256 key".to_string();
        let unbound = UnboundKey::new(&AES_256_GCM, bytes.get(..32).ok_or_else(invalid)?)
            .map_err(|_| invalid())?;
        let mac_key = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, bytes),
            b"configured-token",
        );
        Ok(Self {
            aead: LessSafeKey::new(unbound),
            mac: hmac::Key::new(hmac::HMAC_SHA256, mac_key.as_ref()),
        })
    }

    fn configured_mac(&self, account: &str, token: &Secret) -> Vec<u8> {
        let mut ctx = hmac::Context::with_key(&self.mac);
        ctx.update(account.as_bytes());
        ctx.update(&[0]);
        ctx.update(token.expose().as_bytes());
        ctx.sign().as_ref().to_vec()
    }

    /// nonce ‖ ciphertext ‖ tag, bound to the account.
    fn seal(&self, account: &str, token: &Secret) -> Result<Vec<u8>, String> {
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).map_err(|_| "no randomness".to_string())?;
        let mut data = token.expose().as_bytes().to_vec();
        self.aead
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(account.as_bytes()),
                &mut data,
            )
            .map_err(|_| "cannot encrypt the refresh token".to_string())?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        Ok(out)
    }

    fn open(&self, account: &str, sealed: &[u8]) -> Option<Secret> {
        if sealed.len() < NONCE_LEN {
            return None;
        }
        let (nonce, data) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut data = data.to_vec();
        let plain = self
            .aead
            .open_in_place(nonce, Aad::from(account.as_bytes()), &mut data)
            .ok()?;
        String::from_utf8(plain.to_vec()).ok().map(Secret::new)
    }
}

const MIN_KEY_BYTES: usize = 32;

/// Reads the key file, or makes it (32 random bytes, private, renamed into place so that two
/// instances starting at once read the same key), like the attachment link key.
fn read_or_make_key(path: &Path) -> Result<Vec<u8>, String> {
    let shown = path.display();
    match std::fs::read(path) {
        Ok(k) if k.len() >= MIN_KEY_BYTES => return Ok(k),
        Ok(k) => {
            return Err(format!(
                "the OAuth2 key {shown} is only {} bytes; at least {MIN_KEY_BYTES} are needed (deleting it makes a new one, and stored refresh tokens are then unreadable: the configured ones are used again)",
                k.len()
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot read the OAuth2 key {shown}: {e}")),
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut k = [0u8; MIN_KEY_BYTES];
    aws_lc_rs::rand::fill(&mut k).map_err(|_| "no randomness".to_string())?;
    static MADE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let tmp = dir.join(format!(
        "{KEY_FILE}.{}.{}",
        std::process::id(),
        MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
        f.write_all(&k)
            .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    }
    // A hard link never replaces a file: of two processes making the key at once, one wins
    // and both read the winner's key.
    match std::fs::hard_link(&tmp, path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(format!("cannot write {shown}: {e}"));
        }
    }
    let _ = std::fs::remove_file(&tmp);
    std::fs::read(path).map_err(|e| format!("cannot read the OAuth2 key {shown}: {e}"))
}

#[derive(Default)]
struct State {
    /// The access token, when to renew it.
    access: Option<(Secret, Instant)>,
    /// The refresh token in use when it is not the configured one (rotated).
    rotated: Option<Secret>,
    /// `rotated` is not stored yet (the database failed after the grant).
    unsaved: bool,
    /// The grant is gone: every ask answers this until the configuration changes.
    revoked: Option<CredentialError>,
    /// The last refresh failed for now: callers until then get the same answer instead of
    /// each waiting for a refresh of its own (the endpoint or the database is down).
    failed: Option<(CredentialError, Instant)>,
}

/// One running OAuth2 account.
pub struct OAuth2Account {
    id: String,
    config: OAuth2Config,
    registry: Arc<Accounts>,
    /// Held across a refresh: the in-process single flight.
    state: tokio::sync::Mutex<State>,
    /// An access token a server refused: not handed out again.
    refused: Mutex<Option<Secret>>,
    requests: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for OAuth2Account {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OAuth2Account")
            .field("id", &self.id)
            .field("kind", &self.config.kind)
            .finish_non_exhaustive()
    }
}

/// A token endpoint's answer (RFC 6749 §5.1, §5.2).
#[derive(Deserialize)]
struct TokenAnswer {
    access_token: Option<String>,
    expires_in: Option<serde_json::Value>,
    refresh_token: Option<String>,
    error: Option<String>,
}

impl OAuth2Account {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Token requests this account made (for tests and logs).
    pub fn token_requests(&self) -> u64 {
        self.requests.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The current access token: the cached one while it has more than [`RENEW_AHEAD`] left
    /// and was not refused, else a fresh one (one refresh at a time; concurrent callers wait
    /// for it and share it).
    pub async fn token(&self) -> Result<Secret, CredentialError> {
        let mut state = self.state.lock().await;
        if let Some(e) = &state.revoked {
            return Err(e.clone());
        }
        if let Some((token, renew_at)) = &state.access {
            let refused = self
                .refused
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .is_some_and(|r| r == token);
            if !refused && Instant::now() < *renew_at {
                return Ok(token.clone());
            }
        }
        if let Some((e, until)) = &state.failed {
            if Instant::now() < *until {
                return Err(e.clone());
            }
        }
        match self.refresh(&mut state).await {
            Ok(token) => {
                state.failed = None;
                Ok(token)
            }
            Err(e) => {
                state.failed = Some((e.clone(), Instant::now() + FAILURE_BACKOFF));
                if matches!(e, CredentialError::Reauthorize { .. }) {
                    tracing::warn!(account = %self.id, error = %e, "OAuth2 grant refused; the account must be re-authorized");
                    state.access = None;
                    state.revoked = Some(e.clone());
                }
                Err(e)
            }
        }
    }

    /// A server refused `token`: the next [`OAuth2Account::token`] gets a fresh one.
    pub fn refused(&self, token: &Secret) {
        *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = Some(token.clone());
    }

    fn unavailable(&self, detail: impl Into<String>) -> CredentialError {
        CredentialError::Unavailable {
            account: self.id.clone(),
            detail: detail.into(),
        }
    }

    fn reauthorize(&self, detail: impl Into<String>) -> CredentialError {
        CredentialError::Reauthorize {
            account: self.id.clone(),
            detail: detail.into(),
        }
    }

    /// Refreshes under the account's cross-instance lock (when there is a database): reads
    /// the stored rotated refresh token, asks the token endpoint, stores a rotated one.
    async fn refresh(&self, state: &mut State) -> Result<Secret, CredentialError> {
        let keys = self
            .registry
            .keys()
            .map_err(|e| self.unavailable(format!("the OAuth2 key: {e}")))?;
        let configured_mac = keys.configured_mac(&self.id, &self.config.refresh_token);
        let db = |e: tokio_postgres::Error| {
            self.unavailable(format!("the database: {}", crate::domain::error_chain(&e)))
        };
        // Never closed; without a permit the refresh only goes beyond the bound.
        let _permit = self.registry.refreshing.acquire().await.ok();
        let mut client = match &self.registry.pool {
            Some(pool) => Some(pool.get().await.map_err(|e| {
                self.unavailable(format!("the database: {}", crate::domain::error_chain(&e)))
            })?),
            None => None,
        };
        let tx = match client.as_mut() {
            Some(c) => Some(c.transaction().await.map_err(db)?),
            None => None,
        };
        if let Some(tx) = &tx {
            // Bounded: an instance stuck in its refresh (its session half-open) must not hold
            // this account's every send and login here for as long as its TCP lives.
            tx.batch_execute("SET LOCAL lock_timeout = '40s'")
                .await
                .map_err(db)?;
            tx.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended('mailbridge-oauth2:' || $1, 0))",
                &[&self.id],
            )
            .await
            .map_err(db)?;
            // Another instance (or a previous process) may have rotated the refresh token.
            let row = tx
                .query_opt(
                    "SELECT configured_mac, sealed FROM oauth2_tokens WHERE account = $1",
                    &[&self.id],
                )
                .await
                .map_err(db)?;
            // A rotated token not stored yet (the database failed after the grant) is newer
            // than anything stored.
            if !state.unsaved {
                state.rotated = None;
                if let Some(row) = row {
                    let mac: Vec<u8> = row.try_get(0).map_err(db)?;
                    let sealed: Vec<u8> = row.try_get(1).map_err(db)?;
                    if mac == configured_mac {
                        match keys.open(&self.id, &sealed) {
                            Some(t) => state.rotated = Some(t),
                            None => {
                                tracing::warn!(account = %self.id, "the stored refresh token cannot be decrypted (another key file?); using the configured one")
                            }
                        }
                    }
                }
            }
        }
        let refresh_token = state
            .rotated
            .clone()
            .unwrap_or_else(|| self.config.refresh_token.clone());
        let answer = self.request(&refresh_token).await?;
        if let Some(rotated) = &answer.rotated {
            // In memory first: the endpoint may already refuse the one just used.
            state.rotated = Some(rotated.clone());
            state.unsaved = true;
        }
        if let Some(tx) = tx {
            let saved = match (&state.rotated, state.unsaved) {
                (Some(token), true) => store(&tx, &keys, &self.id, &configured_mac, token).await,
                _ => Ok(()),
            };
            let committed = match saved {
                Ok(()) => tx
                    .commit()
                    .await
                    .map_err(|e| crate::domain::error_chain(&e)),
                Err(e) => Err(e),
            };
            match committed {
                Ok(()) => state.unsaved = false,
                // The access token is good: use it, and store the refresh token next time.
                Err(e) => {
                    tracing::warn!(account = %self.id, error = %e, "the rotated refresh token could not be stored; it is kept in memory and stored at the next refresh")
                }
            }
        }
        let now = Instant::now();
        let renew_at = now.checked_add(renew_after(answer.lifetime)).unwrap_or(now);
        state.access = Some((answer.access.clone(), renew_at));
        tracing::info!(account = %self.id, expires_in = ?answer.lifetime, rotated = answer.rotated.is_some(), "OAuth2 access token refreshed");
        Ok(answer.access)
    }

    /// One `refresh_token` grant request.
    async fn request(&self, refresh_token: &Secret) -> Result<Fresh, CredentialError> {
        let http = self
            .registry
            .http
            .as_ref()
            .map_err(|e| self.unavailable(format!("HTTP client: {e}")))?;
        let mut form = url::form_urlencoded::Serializer::new(String::new());
        form.append_pair("grant_type", "refresh_token")
            .append_pair("refresh_token", refresh_token.expose())
            .append_pair("client_id", &self.config.client_id);
        if let Some(s) = &self.config.client_secret {
            form.append_pair("client_secret", s.expose());
        }
        if let Some(scope) = &self.config.scope {
            form.append_pair("scope", scope);
        }
        let body = form.finish();
        self.requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let endpoint = endpoint_name(&self.config.token_url);
        let response = http
            .post(self.config.token_url.clone())
            .header("content-type", "application/x-www-form-urlencoded")
            .header("accept", "application/json")
            .body(body)
            .send()
            .await
            // The endpoint is named as shown (no user info, no query), not by reqwest's URL.
            .map_err(|e| {
                let e = e.without_url();
                self.unavailable(format!("{endpoint}: {}", crate::domain::error_chain(&e)))
            })?;
        let status = response.status().as_u16();
        let mut response = response;
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| {
            let e = e.without_url();
            self.unavailable(format!("{endpoint}: {}", crate::domain::error_chain(&e)))
        })? {
            if bytes.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(self.unavailable(format!(
                    "{endpoint} answered more than {MAX_ANSWER_BYTES} bytes"
                )));
            }
            bytes.extend_from_slice(&chunk);
        }
        let answer: Option<TokenAnswer> = serde_json::from_slice(&bytes).ok();
        if status == 429 || status >= 500 {
            return Err(self.unavailable(format!("{endpoint} answered HTTP {status}")));
        }
        let Some(answer) = answer else {
            return Err(self.unavailable(format!(
                "{endpoint} answered HTTP {status} without a JSON token answer"
            )));
        };
        if !(200..300).contains(&status) || answer.error.is_some() {
            let code = answer
                .error
                .as_deref()
                .map(error_code)
                .unwrap_or_else(|| "no error code".into());
            return Err(match code.as_str() {
                "invalid_grant" => self.reauthorize(format!(
                    "{endpoint} refused the refresh token (invalid_grant: revoked or expired); re-authorize the account and put its new refresh token in the configuration"
                )),
                // RFC 6749 §5.2's refusals that only a person can fix (and Microsoft's
                // consent ones); anything else — `temporarily_unavailable`, a proxy's 4xx, an
                // answer without a code — may pass and is retried.
                "invalid_client" | "unauthorized_client" | "invalid_scope"
                | "unsupported_grant_type" | "interaction_required" | "consent_required" => {
                    self.reauthorize(format!(
                        "{endpoint} answered HTTP {status} ({code}); check client_id, client_secret and scope, or re-authorize the account"
                    ))
                }
                _ => self.unavailable(format!("{endpoint} answered HTTP {status} ({code})")),
            });
        }
        let access = match answer.access_token {
            Some(t) if !t.is_empty() => Secret::new(t),
            _ => {
                return Err(self.unavailable(format!("{endpoint} answered without an access_token")))
            }
        };
        let lifetime = answer
            .expires_in
            .as_ref()
            .and_then(|v| match v {
                serde_json::Value::Number(n) => n.as_f64(),
                serde_json::Value::String(s) => s.trim().parse::<f64>().ok(),
                _ => None,
            })
            .filter(|secs| secs.is_finite() && *secs >= 0.0)
            // Whole seconds, at least a few (a 0 would renew at every use).
            .map(|secs| Duration::from_secs(secs.min(MAX_LIFETIME.as_secs_f64()) as u64))
            .unwrap_or(DEFAULT_LIFETIME)
            .clamp(MIN_LIFETIME, MAX_LIFETIME);
        let rotated = answer
            .refresh_token
            .filter(|t| !t.is_empty() && t != refresh_token.expose())
            .map(Secret::new);
        Ok(Fresh {
            access,
            lifetime,
            rotated,
        })
    }
}

/// Stores (sealed) the rotated refresh token of `account`, in the transaction holding its lock.
async fn store(
    tx: &deadpool_postgres::Transaction<'_>,
    keys: &Keys,
    account: &str,
    configured_mac: &[u8],
    token: &Secret,
) -> Result<(), String> {
    let sealed = keys.seal(account, token)?;
    tx.execute(
        "INSERT INTO oauth2_tokens (account, configured_mac, sealed, updated_at)
         VALUES ($1, $2, $3, now())
         ON CONFLICT (account) DO UPDATE
            SET configured_mac = EXCLUDED.configured_mac,
                sealed = EXCLUDED.sealed,
                updated_at = now()",
        &[&account, &configured_mac, &sealed],
    )
    .await
    .map_err(|e| crate::domain::error_chain(&e))?;
    Ok(())
}

/// How long after it was issued a token of `lifetime` is renewed: with [`RENEW_AHEAD`] left,
/// or half of it for a short-lived one (so that a token living under a minute is not renewed
/// at every use).
fn renew_after(lifetime: Duration) -> Duration {
    lifetime - RENEW_AHEAD.min(lifetime / 2)
}

struct Fresh {
    access: Secret,
    lifetime: Duration,
    rotated: Option<Secret>,
}

/// The endpoint as shown in errors: scheme, host, port and path only.
fn endpoint_name(u: &url::Url) -> String {
    let mut shown = format!("{}://{}", u.scheme(), u.host_str().unwrap_or("?"));
    if let Some(port) = u.port() {
        shown.push_str(&format!(":{port}"));
    }
    shown.push_str(u.path());
    shown
}

/// An endpoint's `error` code, kept to what an error code may hold (RFC 6749 §5.2).
fn error_code(code: &str) -> String {
    code.chars()
        .filter(|c| c.is_ascii_graphic())
        .take(64)
        .collect()
}

/// The SASL XOAUTH2 initial response (before base64): `user=…^Aauth=Bearer …^A^A`.
pub fn xoauth2(user: &str, token: &Secret) -> Secret {
    Secret::new(format!(
        "user={user}\x01auth=Bearer {}\x01\x01",
        token.expose()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configured_link_key_gives_every_instance_the_same_sealing_key() {
        let dir = std::env::temp_dir().join(format!("mb-oauth-derived-{}", std::process::id()));
        let link_key = Secret::new("l".repeat(40));
        let one = Accounts::new(None, dir.join("one")).with_key_from(&link_key);
        let two = Accounts::new(None, dir.join("two")).with_key_from(&link_key);
        let other =
            Accounts::new(None, dir.join("three")).with_key_from(&Secret::new("m".repeat(40)));
        let token = Secret::new("1//rotated");
        let sealed = one.keys().unwrap().seal("provider:p", &token).unwrap();
        assert_eq!(
            two.keys().unwrap().open("provider:p", &sealed),
            Some(token.clone())
        );
        assert_eq!(other.keys().unwrap().open("provider:p", &sealed), None);
        // No key file was made.
        assert!(!dir.join("one").exists());
    }

    #[test]
    fn sealed_tokens_open_only_for_their_account_and_do_not_hold_the_token() {
        let keys = Keys::new(&[7u8; 32]).unwrap();
        let token = Secret::new("1//rotated-refresh-token");
        let sealed = keys.seal("provider:a", &token).unwrap();
        assert!(!sealed
            .windows(token.expose().len())
            .any(|w| w == token.expose().as_bytes()));
        assert_eq!(keys.open("provider:a", &sealed), Some(token));
        assert_eq!(keys.open("provider:b", &sealed), None);
        assert_eq!(keys.open("provider:a", &sealed[..5]), None);
    }

    #[test]
    fn tokens_are_renewed_with_a_minute_left_or_at_half_life() {
        let s = Duration::from_secs;
        assert_eq!(renew_after(s(3600)), s(3540));
        assert_eq!(renew_after(s(120)), s(60));
        assert_eq!(renew_after(s(62)), s(31));
        assert_eq!(renew_after(s(4)), s(2));
        assert_eq!(renew_after(s(0)), s(0));
    }

    #[test]
    fn the_endpoint_shown_has_no_query() {
        let u = url::Url::parse("https://user:pw@login.example.com:8443/t/token?x=secret").unwrap();
        assert_eq!(endpoint_name(&u), "https://login.example.com:8443/t/token");
    }
}
