//! The tenant files: one tenant each, with its providers and mailboxes, validated whole.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::secrets::resolve_secret;
use super::{parse_duration, parse_toml, ConfigProblem, Dur, Env, Secret};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    None,
    Starttls,
    Tls,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    Smtp,
    File,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MailProtocol {
    Imap,
    Pop3,
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProviderFile {
    id: String,
    name: Option<String>,
    kind: ProviderKind,
    host: Option<String>,
    port: Option<u16>,
    tls: Option<TlsMode>,
    username: Option<String>,
    password: Option<Secret>,
    password_env: Option<String>,
    password_file: Option<PathBuf>,
    oauth2_token_env: Option<String>,
    ca_file: Option<PathBuf>,
    #[serde(default = "default_max_connections")]
    max_connections: u32,
    dir: Option<PathBuf>,
}

fn default_max_connections() -> u32 {
    4
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct MailboxFile {
    id: String,
    user_id: String,
    provider_id: String,
    protocol: MailProtocol,
    host: String,
    port: Option<u16>,
    tls: Option<TlsMode>,
    username: String,
    password: Option<Secret>,
    password_env: Option<String>,
    password_file: Option<PathBuf>,
    #[serde(default = "default_folder")]
    folder: String,
    #[serde(default = "default_true")]
    idle: bool,
    #[serde(default = "default_poll")]
    poll_interval: Dur,
    #[serde(default = "default_initial_sync")]
    initial_sync: InitialSync,
    #[serde(default)]
    delete_after_fetch: bool,
    ca_file: Option<PathBuf>,
}

fn default_folder() -> String {
    "INBOX".into()
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
    providers: Vec<ProviderFile>,
    #[serde(default)]
    mailboxes: Vec<MailboxFile>,
}

/// How a provider delivers mail.
#[derive(Debug, Clone, PartialEq)]
pub enum ProviderTransport {
    Smtp {
        host: String,
        port: u16,
        tls: TlsMode,
        username: Option<String>,
        password: Option<Secret>,
        oauth2_token: Option<Secret>,
        ca_file: Option<PathBuf>,
    },
    /// Each email written as an `.eml` file into `dir` (development; no mail leaves the machine).
    File { dir: PathBuf },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Provider {
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    pub max_connections: u32,
    pub transport: ProviderTransport,
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
    /// An extra CA to trust for this mailbox's server certificate.
    pub ca_file: Option<PathBuf>,
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
    problems: &mut Vec<ConfigProblem>,
    warnings: &mut Vec<ConfigProblem>,
) -> Vec<Tenant> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        // No tenant folder: a service with no tenants yet is a valid configuration.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            problems.push(ConfigProblem {
                file: dir.display().to_string(),
                key: String::new(),
                message: format!("cannot read the tenants folder: {e}"),
            });
            return Vec::new();
        }
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();

    let mut tenants = Vec::new();
    let mut tenant_ids: HashSet<String> = HashSet::new();
    let mut provider_ids: HashSet<String> = HashSet::new();
    let mut mailbox_ids: HashSet<String> = HashSet::new();
    for path in files {
        let file = path.display().to_string();
        let text = match std::fs::read_to_string(&path) {
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
        let mut p = |key: String, message: String| {
            problems.push(ConfigProblem {
                file: file.clone(),
                key,
                message,
            })
        };
        if raw.id.trim().is_empty() {
            p("id".into(), "must not be empty".into());
        } else if !tenant_ids.insert(raw.id.clone()) {
            p(
                "id".into(),
                format!("tenant id `{}` is already used by another file", raw.id),
            );
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let mut providers = Vec::new();
        for (i, pf) in raw.providers.into_iter().enumerate() {
            let key = |k: &str| format!("providers[{i}].{k}");
            if pf.id.trim().is_empty() {
                p(key("id"), "must not be empty".into());
            } else if !provider_ids.insert(pf.id.clone()) {
                p(
                    key("id"),
                    format!("provider id `{}` is already used", pf.id),
                );
            }
            if pf.max_connections == 0 {
                p(key("max_connections"), "must be at least 1".into());
            }
            let transport = match pf.kind {
                ProviderKind::File => match pf.dir {
                    Some(d) => ProviderTransport::File {
                        dir: if d.is_absolute() { d } else { base.join(d) },
                    },
                    None => {
                        p(key("dir"), "a provider of kind \"file\" needs `dir`".into());
                        continue;
                    }
                },
                ProviderKind::Smtp => {
                    let host = match pf.host {
                        Some(h) if !h.trim().is_empty() => h,
                        _ => {
                            p(
                                key("host"),
                                "a provider of kind \"smtp\" needs `host`".into(),
                            );
                            String::new()
                        }
                    };
                    let tls = pf.tls.unwrap_or(TlsMode::Starttls);
                    let port = pf.port.unwrap_or(match tls {
                        TlsMode::None => 25,
                        TlsMode::Starttls => 587,
                        TlsMode::Tls => 465,
                    });
                    if port == 0 {
                        p(key("port"), "must be between 1 and 65535".into());
                    }
                    let password = resolve_secret(
                        env,
                        base,
                        pf.password,
                        pf.password_env.as_deref(),
                        pf.password_file.as_deref(),
                        &key,
                        &mut p,
                    );
                    let oauth2_token = match pf.oauth2_token_env.as_deref() {
                        Some(name) => match env.var(name) {
                            Some(v) => Some(Secret::new(v)),
                            None => {
                                p(
                                    key("oauth2_token_env"),
                                    format!("environment variable `{name}` is not set"),
                                );
                                None
                            }
                        },
                        None => None,
                    };
                    let ca_file = pf
                        .ca_file
                        .map(|f| if f.is_absolute() { f } else { base.join(f) });
                    if let Some(f) = &ca_file {
                        if !f.is_file() {
                            p(key("ca_file"), format!("{} does not exist", f.display()));
                        }
                    }
                    if tls == TlsMode::None && (password.is_some() || oauth2_token.is_some()) {
                        warnings.push(ConfigProblem {
                            file: file.clone(),
                            key: key("tls"),
                            message: "credentials will be sent without TLS; only do this for a relay on a trusted network".into(),
                        });
                    }
                    ProviderTransport::Smtp {
                        host,
                        port,
                        tls,
                        username: pf.username,
                        password,
                        oauth2_token,
                        ca_file,
                    }
                }
            };
            providers.push(Provider {
                name: pf.name.unwrap_or_else(|| pf.id.clone()),
                id: pf.id,
                tenant_id: raw.id.clone(),
                max_connections: pf.max_connections,
                transport,
            });
        }
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
            if mf.host.trim().is_empty() {
                p(key("host"), "must not be empty".into());
            }
            if mf.poll_interval.0.is_zero() {
                p(key("poll_interval"), "must be longer than 0".into());
            }
            let tls = mf.tls.unwrap_or(TlsMode::Tls);
            let port = mf.port.unwrap_or(match (mf.protocol, tls) {
                (MailProtocol::Imap, TlsMode::Tls) => 993,
                (MailProtocol::Imap, _) => 143,
                (MailProtocol::Pop3, TlsMode::Tls) => 995,
                (MailProtocol::Pop3, _) => 110,
            });
            if port == 0 {
                p(key("port"), "must be between 1 and 65535".into());
            }
            let password = resolve_secret(
                env,
                base,
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
            let ca_file = mf
                .ca_file
                .map(|f| if f.is_absolute() { f } else { base.join(f) });
            if let Some(f) = &ca_file {
                if !f.is_file() {
                    p(key("ca_file"), format!("{} does not exist", f.display()));
                }
            }
            mailboxes.push(Mailbox {
                ca_file,
                id: mf.id,
                tenant_id: raw.id.clone(),
                user_id: mf.user_id,
                provider_id: mf.provider_id,
                protocol: mf.protocol,
                host: mf.host,
                port,
                tls,
                username: mf.username,
                password,
                folder: mf.folder,
                idle: mf.idle,
                poll_interval: mf.poll_interval.0,
                initial_sync: mf.initial_sync,
                delete_after_fetch: mf.delete_after_fetch,
            });
        }
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

fn fingerprint_of(debug: String, secrets: &[Option<&Secret>]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    debug.hash(&mut h);
    for s in secrets {
        s.map(|s| s.expose()).hash(&mut h);
    }
    h.finish()
}

impl Provider {
    /// Changes whenever anything of the provider changes, secrets included.
    pub fn fingerprint(&self) -> u64 {
        match &self.transport {
            ProviderTransport::Smtp {
                password,
                oauth2_token,
                ..
            } => fingerprint_of(
                format!("{self:?}"),
                &[password.as_ref(), oauth2_token.as_ref()],
            ),
            ProviderTransport::File { .. } => fingerprint_of(format!("{self:?}"), &[]),
        }
    }
}

impl Mailbox {
    /// Changes whenever anything of the mailbox changes, its password included.
    pub fn fingerprint(&self) -> u64 {
        fingerprint_of(format!("{self:?}"), &[self.password.as_ref()])
    }
}
