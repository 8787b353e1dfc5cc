//! The tenant files: one tenant each, with its providers and mailboxes, validated whole.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::secrets::resolve_secret;
use std::sync::Arc;

use super::{parse_duration, parse_toml, ConfigProblem, Dur, Env, Secret};
use crate::oauth2::OAuth2Config;
use crate::providers::{Fingerprint, ParseContext, ProviderConfig, RateLimits};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    None,
    Starttls,
    Tls,
}

impl TlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::None => "none",
            TlsMode::Starttls => "starttls",
            TlsMode::Tls => "tls",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MailProtocol {
    Imap,
    Pop3,
    /// The Gmail API (`users.history.list`, `users.messages.get?format=raw`).
    GmailApi,
    /// Microsoft Graph (a delta query on the folder, each message's MIME by `$value`).
    MsGraph,
}

impl MailProtocol {
    /// Its name in the configuration, `/health` and the `source` of `email.inbound`.
    pub fn as_str(self) -> &'static str {
        match self {
            MailProtocol::Imap => "imap",
            MailProtocol::Pop3 => "pop3",
            MailProtocol::GmailApi => "gmail_api",
            MailProtocol::MsGraph => "ms_graph",
        }
    }

    /// Read over HTTP with a bearer token rather than over a mail protocol.
    pub fn is_api(self) -> bool {
        matches!(self, MailProtocol::GmailApi | MailProtocol::MsGraph)
    }
}

/// What an added mailbox publishes first (contract §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitialSync {
    New,
    All,
    Since(Duration),
}

impl<'de> Deserialize<'de> for InitialSync {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        match text.as_str() {
            "new" => Ok(InitialSync::New),
            "all" => Ok(InitialSync::All),
            other => parse_duration(other).map(InitialSync::Since).map_err(|_| {
                serde::de::Error::custom(format!(
                    "`{other}` is not \"new\", \"all\" or a duration such as \"30d\""
                ))
            }),
        }
    }
}

/// The keys every provider has, whatever its kind (the rest of its table is its kind's).
#[derive(Debug, Clone, Deserialize)]
struct ProviderCommon {
    id: String,
    name: Option<String>,
    kind: String,
    #[serde(default = "default_max_connections")]
    max_connections: u32,
    rate_per_second: Option<f64>,
    rate_per_day: Option<u64>,
    max_in_flight: Option<u32>,
}

fn default_max_connections() -> u32 {
    4
}

/// The keys of [`ProviderCommon`], taken out of the table before its kind reads the rest.
const COMMON_PROVIDER_KEYS: &[&str] = &[
    "id",
    "name",
    "kind",
    "max_connections",
    "rate_per_second",
    "rate_per_day",
    "max_in_flight",
];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct MailboxFile {
    id: String,
    user_id: String,
    provider_id: String,
    protocol: MailProtocol,
    #[serde(default)]
    host: String,
    port: Option<u16>,
    tls: Option<TlsMode>,
    username: Option<String>,
    password: Option<Secret>,
    password_env: Option<String>,
    password_file: Option<PathBuf>,
    /// `INBOX` (IMAP, Gmail label), `inbox` (Graph well-known folder) when not given.
    folder: Option<String>,
    /// `gmail_api`, `ms_graph`: the API's origin.
    base_url: Option<String>,
    /// `gmail_api`, `ms_graph`: the mailbox read, `me` (the token's account) or an address.
    user: Option<String>,
    /// `gmail_api`, `ms_graph`: a static bearer token instead of an `oauth2` account.
    access_token: Option<Secret>,
    access_token_env: Option<String>,
    access_token_file: Option<PathBuf>,
    #[serde(default = "default_true")]
    idle: bool,
    #[serde(default = "default_poll")]
    poll_interval: Dur,
    #[serde(default = "default_initial_sync")]
    initial_sync: InitialSync,
    #[serde(default)]
    delete_after_fetch: bool,
    ca_file: Option<PathBuf>,
    oauth2: Option<toml::Table>,
    connect_rate_per_host: Option<f64>,
}

fn default_true() -> bool {
    true
}
fn default_poll() -> Dur {
    Dur(Duration::from_secs(60))
}
fn default_initial_sync() -> InitialSync {
    InitialSync::New
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantFile {
    id: String,
    name: Option<String>,
    #[serde(default)]
    providers: Vec<toml::Table>,
    #[serde(default)]
    mailboxes: Vec<MailboxFile>,
}

/// A provider: its ids and name, and its kind's configuration (`crate::providers`).
#[derive(Debug, Clone)]
pub struct Provider {
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    /// At most this many sends at once (SMTP sessions, HTTP requests, files being written).
    pub max_connections: u32,
    /// `rate_per_second`, `rate_per_day`, `max_in_flight`, else the kind's defaults.
    pub limits: RateLimits,
    pub config: Arc<dyn ProviderConfig>,
}

impl PartialEq for Provider {
    /// Equal when nothing of them differs, secrets included.
    fn eq(&self, other: &Self) -> bool {
        self.fingerprint() == other.fingerprint()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Mailbox {
    pub id: String,
    pub tenant_id: String,
    pub user_id: String,
    pub provider_id: String,
    pub protocol: MailProtocol,
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
    pub username: String,
    pub password: Option<Secret>,
    pub folder: String,
    pub idle: bool,
    pub poll_interval: Duration,
    pub initial_sync: InitialSync,
    pub delete_after_fetch: bool,
    /// Logins per second to this mailbox's host; `[inbound] connect_rate_per_host` when None.
    pub connect_rate_per_host: Option<f64>,
    /// An extra CA to trust for this mailbox's server certificate.
    pub ca_file: Option<PathBuf>,
    /// An OAuth2 account (`[mailboxes.oauth2]`): IMAP XOAUTH2 with its access tokens, or the
    /// bearer tokens of an API mailbox.
    pub oauth2: Option<OAuth2Config>,
    /// `gmail_api`, `ms_graph`: where and as whom the API is read.
    pub api: Option<MailApi>,
}

/// How an API mailbox (`gmail_api`, `ms_graph`) is read: the API's origin (no trailing `/`),
/// the mailbox (`me` or an address) and a static token when there is no `oauth2` account.
#[derive(Debug, Clone, PartialEq)]
pub struct MailApi {
    pub base_url: String,
    pub user: String,
    pub access_token: Option<Secret>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Tenant {
    pub id: String,
    pub name: String,
    /// The file it was loaded from, for messages.
    pub file: PathBuf,
    pub providers: Vec<Provider>,
    pub mailboxes: Vec<Mailbox>,
}

pub(super) fn load_tenants(
    dir: &Path,
    env: &dyn Env,
    overlay: Option<(&Path, &str)>,
    problems: &mut Vec<ConfigProblem>,
    warnings: &mut Vec<ConfigProblem>,
) -> Vec<Tenant> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect(),
        // No tenant folder: a service with no tenants yet is a valid configuration.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            problems.push(ConfigProblem {
                file: dir.display().to_string(),
                key: String::new(),
                message: format!("cannot read the tenants folder: {e}"),
            });
            return Vec::new();
        }
    };
    if let Some((file, _)) = overlay {
        if !files.iter().any(|f| f == file) {
            files.push(file.to_path_buf());
        }
    }
    files.sort();

    let mut tenants = Vec::new();
    let mut tenant_ids: HashSet<String> = HashSet::new();
    let mut provider_ids: HashSet<String> = HashSet::new();
    let mut mailbox_ids: HashSet<String> = HashSet::new();
    for path in files {
        let file = path.display().to_string();
        let edited = overlay.filter(|(f, _)| *f == path.as_path());
        let text =
            match edited.map_or_else(|| std::fs::read_to_string(&path), |(_, t)| Ok(t.into())) {
                Ok(t) => t,
                Err(e) => {
                    problems.push(ConfigProblem {
                        file,
                        key: String::new(),
                        message: format!("cannot read: {e}"),
                    });
                    continue;
                }
            };
        let raw: TenantFile = match parse_toml(&text) {
            Ok(t) => t,
            Err((key, message)) => {
                problems.push(ConfigProblem { file, key, message });
                continue;
            }
        };
        let problem = |problems: &mut Vec<ConfigProblem>, key: String, message: String| {
            problems.push(ConfigProblem {
                file: file.clone(),
                key,
                message,
            })
        };
        if raw.id.trim().is_empty() {
            problem(problems, "id".into(), "must not be empty".into());
        } else if !tenant_ids.insert(raw.id.clone()) {
            problem(
                problems,
                "id".into(),
                format!("tenant id `{}` is already used by another file", raw.id),
            );
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let mut providers = Vec::new();
        for (i, mut table) in raw.providers.into_iter().enumerate() {
            let key = |k: &str| format!("providers[{i}].{k}");
            let common: ProviderCommon = match toml::Value::Table(table.clone()).try_into() {
                Ok(c) => c,
                Err(e) => {
                    problem(problems, format!("providers[{i}]"), super::one_line(&e));
                    continue;
                }
            };
            if common.id.trim().is_empty() {
                problem(problems, key("id"), "must not be empty".into());
            } else if !provider_ids.insert(common.id.clone()) {
                problem(
                    problems,
                    key("id"),
                    format!("provider id `{}` is already used", common.id),
                );
            }
            if common.max_connections == 0 {
                problem(
                    problems,
                    key("max_connections"),
                    "must be at least 1".into(),
                );
            }
            if common
                .rate_per_second
                .is_some_and(|r| !r.is_finite() || r <= 0.0)
            {
                problem(
                    problems,
                    key("rate_per_second"),
                    "must be a number of sends per second above 0 (0.5 = one every 2 s); leave it out for no limit".into(),
                );
            }
            if common.rate_per_day == Some(0) {
                problem(
                    problems,
                    key("rate_per_day"),
                    "must be at least 1; leave it out for no limit".into(),
                );
            }
            if common.max_in_flight == Some(0) {
                problem(
                    problems,
                    key("max_in_flight"),
                    "must be at least 1; leave it out for no limit beyond max_connections".into(),
                );
            }
            let Some((_, parse)) = crate::providers::KINDS
                .iter()
                .find(|(k, _)| *k == common.kind)
            else {
                problem(
                    problems,
                    key("kind"),
                    format!(
                        "`{}` is not a provider kind; use one of {}",
                        common.kind,
                        crate::providers::kind_names()
                    ),
                );
                continue;
            };
            for k in COMMON_PROVIDER_KEYS {
                table.remove(*k);
            }
            let mut ctx = ParseContext {
                env,
                base,
                file: &file,
                prefix: format!("providers[{i}]"),
                problems: &mut *problems,
                warnings: &mut *warnings,
            };
            let Some(config) = parse(table, &mut ctx) else {
                continue;
            };
            providers.push(Provider {
                name: common.name.unwrap_or_else(|| common.id.clone()),
                id: common.id,
                tenant_id: raw.id.clone(),
                max_connections: common.max_connections,
                limits: RateLimits {
                    per_second: common.rate_per_second,
                    per_day: common.rate_per_day,
                    max_in_flight: common.max_in_flight,
                }
                .or(config.default_limits()),
                config,
            });
        }
        // The mailboxes' `oauth2` tables report here while `p` holds `problems`.
        let mut oauth2_problems = Vec::new();
        let mut oauth2_warnings = Vec::new();
        let mut p = |key: String, message: String| problem(problems, key, message);
        let mut mailboxes = Vec::new();
        for (i, mf) in raw.mailboxes.into_iter().enumerate() {
            let key = |k: &str| format!("mailboxes[{i}].{k}");
            if mf.id.trim().is_empty() {
                p(key("id"), "must not be empty".into());
            } else if !mailbox_ids.insert(mf.id.clone()) {
                p(key("id"), format!("mailbox id `{}` is already used", mf.id));
            }
            if !providers.iter().any(|pr| pr.id == mf.provider_id) {
                p(
                    key("provider_id"),
                    format!(
                        "no provider `{}` in this tenant; a mailbox's provider must be one of its own tenant's [[providers]]",
                        mf.provider_id
                    ),
                );
            }
            if mf.host.trim().is_empty() && !mf.protocol.is_api() {
                p(key("host"), "must not be empty".into());
            }
            if mf.username.is_none() && !mf.protocol.is_api() {
                p(
                    key("username"),
                    format!("is required for a `{}` mailbox", mf.protocol.as_str()),
                );
            }
            if mf.protocol.is_api() {
                for (given, name) in [
                    (mf.username.is_some(), "username"),
                    (mf.port.is_some(), "port"),
                    (mf.tls.is_some(), "tls"),
                    (mf.ca_file.is_some(), "ca_file"),
                    (mf.delete_after_fetch, "delete_after_fetch"),
                ] {
                    if given {
                        p(
                            key(name),
                            format!(
                                "is for IMAP and POP3 mailboxes, not `{}` (it reads `base_url` over HTTPS and leaves the mail where it is)",
                                mf.protocol.as_str()
                            ),
                        );
                    }
                }
            }
            if !mf.protocol.is_api() {
                for (given, name) in [
                    (mf.base_url.is_some(), "base_url"),
                    (mf.user.is_some(), "user"),
                    (
                        mf.access_token.is_some()
                            || mf.access_token_env.is_some()
                            || mf.access_token_file.is_some(),
                        "access_token",
                    ),
                ] {
                    if given {
                        p(
                            key(name),
                            "is for `gmail_api` and `ms_graph` mailboxes".into(),
                        );
                    }
                }
            }
            if mf.poll_interval.0.is_zero() {
                p(key("poll_interval"), "must be longer than 0".into());
            }
            if mf
                .connect_rate_per_host
                .is_some_and(|r| !(r.is_finite() && r > 0.0))
            {
                p(
                    key("connect_rate_per_host"),
                    "must be a number of logins per second above 0".into(),
                );
            }
            let tls = mf.tls.unwrap_or(TlsMode::Tls);
            let api_base = match mf.protocol {
                MailProtocol::GmailApi => Some(
                    mf.base_url
                        .clone()
                        .unwrap_or_else(|| "https://gmail.googleapis.com".into()),
                ),
                MailProtocol::MsGraph => Some(
                    mf.base_url
                        .clone()
                        .unwrap_or_else(|| "https://graph.microsoft.com".into()),
                ),
                _ => None,
            };
            if let Some(base) = &api_base {
                match super::check_base_url(base) {
                    Ok(None) => {}
                    Ok(Some(warning)) => warnings.push(ConfigProblem {
                        file: file.clone(),
                        key: key("base_url"),
                        message: warning,
                    }),
                    Err(problem) => p(key("base_url"), problem),
                }
            }
            let api_url = api_base.as_deref().map(url::Url::parse);
            let port = mf.port.unwrap_or(match (mf.protocol, tls) {
                (MailProtocol::Imap, TlsMode::Tls) => 993,
                (MailProtocol::Imap, _) => 143,
                (MailProtocol::Pop3, TlsMode::Tls) => 995,
                (MailProtocol::Pop3, _) => 110,
                (MailProtocol::GmailApi | MailProtocol::MsGraph, _) => match &api_url {
                    Some(Ok(u)) => u.port_or_known_default().unwrap_or(443),
                    _ => 443,
                },
            });
            let host = match &api_url {
                Some(Ok(u)) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => {
                    u.host_str().unwrap_or_default().to_string()
                }
                // Reported above.
                Some(_) => String::new(),
                None => mf.host.clone(),
            };
            if mf.protocol.is_api() && !mf.host.is_empty() {
                p(
                    key("host"),
                    "an API mailbox has no `host`; give `base_url` to use another origin".into(),
                );
            }
            let api_user = mf.user.clone().unwrap_or_else(|| "me".into());
            if mf.protocol.is_api() && !super::is_api_user(&api_user) {
                p(
                    key("user"),
                    "must be `me` or an email address (letters, digits and @.-_+)".into(),
                );
            }
            let access_token = resolve_secret(
                env,
                base,
                "access_token",
                mf.access_token,
                mf.access_token_env.as_deref(),
                mf.access_token_file.as_deref(),
                &key,
                &mut p,
            );
            if port == 0 {
                p(key("port"), "must be between 1 and 65535".into());
            }
            let password = resolve_secret(
                env,
                base,
                "password",
                mf.password,
                mf.password_env.as_deref(),
                mf.password_file.as_deref(),
                &key,
                &mut p,
            );
            if tls == TlsMode::None && password.is_some() {
                warnings.push(ConfigProblem {
                    file: file.clone(),
                    key: key("tls"),
                    message: "the mailbox password will be sent without TLS; only do this for a server on a trusted network".into(),
                });
            }
            let oauth2 = match mf.oauth2 {
                Some(table) => {
                    if mf.protocol == MailProtocol::Pop3 {
                        p(
                            key("oauth2"),
                            "OAuth2 is for IMAP (XOAUTH2), gmail_api and ms_graph mailboxes".into(),
                        );
                    }
                    if access_token.is_some() {
                        p(
                            key("oauth2"),
                            "give either an `oauth2` account or `access_token` (`_env`, `_file`), not both".into(),
                        );
                    }
                    if password.is_some() {
                        p(
                            key("oauth2"),
                            "give either an `oauth2` account or a password, not both".into(),
                        );
                    }
                    OAuth2Config::parse(
                        table,
                        &mut ParseContext {
                            env,
                            base,
                            file: &file,
                            prefix: format!("mailboxes[{i}].oauth2"),
                            problems: &mut oauth2_problems,
                            warnings: &mut oauth2_warnings,
                        },
                    )
                }
                None => None,
            };
            if mf.protocol.is_api() {
                if password.is_some() {
                    p(
                        key("password"),
                        "an API mailbox authenticates with `oauth2` or `access_token`".into(),
                    );
                }
                if oauth2.is_none() && access_token.is_none() {
                    p(
                        key("oauth2"),
                        format!(
                            "a `{}` mailbox needs an `oauth2` account or `access_token` (`_env`, `_file`)",
                            mf.protocol.as_str()
                        ),
                    );
                }
            }
            if tls == TlsMode::None && oauth2.is_some() && !mf.protocol.is_api() {
                warnings.push(ConfigProblem {
                    file: file.clone(),
                    key: key("tls"),
                    message: "the mailbox's OAuth2 access tokens will be sent without TLS; only do this for a server on a trusted network".into(),
                });
            }
            let ca_file = mf
                .ca_file
                .map(|f| if f.is_absolute() { f } else { base.join(f) });
            if let Some(f) = &ca_file {
                if !f.is_file() {
                    p(key("ca_file"), format!("{} does not exist", f.display()));
                }
            }
            let folder = mf.folder.unwrap_or_else(|| {
                if mf.protocol == MailProtocol::MsGraph {
                    "inbox".into()
                } else {
                    "INBOX".into()
                }
            });
            let api = api_base.map(|b| MailApi {
                base_url: b.trim_end_matches('/').to_string(),
                user: api_user,
                access_token,
            });
            mailboxes.push(Mailbox {
                ca_file,
                oauth2,
                api,
                id: mf.id,
                tenant_id: raw.id.clone(),
                user_id: mf.user_id,
                provider_id: mf.provider_id,
                protocol: mf.protocol,
                host,
                port,
                tls,
                username: mf.username.unwrap_or_default(),
                password,
                folder,
                idle: mf.idle,
                poll_interval: mf.poll_interval.0,
                initial_sync: mf.initial_sync,
                delete_after_fetch: mf.delete_after_fetch,
                connect_rate_per_host: mf.connect_rate_per_host,
            });
        }
        problems.extend(oauth2_problems);
        warnings.extend(oauth2_warnings);
        tenants.push(Tenant {
            name: raw.name.unwrap_or_else(|| raw.id.clone()),
            id: raw.id,
            file: path.clone(),
            providers,
            mailboxes,
        });
    }
    tenants
}

impl Provider {
    /// Changes whenever anything of the provider changes, secrets included.
    pub fn fingerprint(&self) -> u64 {
        let mut h = Fingerprint::new();
        h.add(&self.id)
            .add(&self.tenant_id)
            .add(&self.name)
            .add(&self.max_connections)
            .add(&self.config.kind());
        self.limits.hash_into(h.hasher());
        self.config.fingerprint(&mut h);
        h.finish()
    }
}

impl Mailbox {
    /// Changes whenever anything of the mailbox changes, its password included.
    pub fn fingerprint(&self) -> u64 {
        let mut h = Fingerprint::new();
        h.add(&self.id)
            .add(&self.tenant_id)
            .add(&self.user_id)
            .add(&self.provider_id)
            .add(&(self.protocol as u8))
            .add(&self.host)
            .add(&self.port)
            .add(&self.tls.as_str())
            .add(&self.username)
            .add(&self.folder)
            .add(&self.idle)
            .add(&self.poll_interval)
            .add(&format!("{:?}", self.initial_sync))
            .add(&self.delete_after_fetch)
            .add(&self.connect_rate_per_host.map(f64::to_bits))
            .add(&self.ca_file)
            .secret(self.password.as_ref());
        if let Some(o) = &self.oauth2 {
            o.fingerprint(&mut h);
        }
        if let Some(a) = &self.api {
            h.add(&a.base_url)
                .add(&a.user)
                .secret(a.access_token.as_ref());
        }
        h.finish()
    }
}
