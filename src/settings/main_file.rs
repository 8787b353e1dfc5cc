//! The sections of the main file, as written, with their defaults (contract §2).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{Dur, Secret};

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RabbitMqSection {
    /// A full `amqp://` / `amqps://` URL; when set, host/port/username/password/vhost are unused.
    pub url: Option<Secret>,
    /// Brokers (`"host:port"`) tried in order at every connection: the nodes of a cluster.
    /// When set, `host` and `port` are unused.
    pub hosts: Vec<String>,
    pub host: String,
    pub port: u16,
    pub username: String,
    pub password: Secret,
    pub vhost: String,
    pub exchange: String,
    pub prefetch: u16,
    /// AMQP heartbeat the service asks for; a dead broker is noticed within about twice this.
    pub heartbeat: Dur,
    /// Longest wait between two connection attempts (the backoff doubles up to this).
    pub reconnect_max_delay: Dur,
    /// An extra CA (PEM) to trust for an `amqps://` broker's certificate (relative to the main
    /// file).
    pub ca_file: Option<PathBuf>,
}

impl Default for RabbitMqSection {
    fn default() -> Self {
        Self {
            url: None,
            hosts: Vec::new(),
            host: "localhost".into(),
            port: 5672,
            username: "guest".into(),
            password: Secret::new("guest"),
            vhost: "/".into(),
            exchange: "email.exchange".into(),
            prefetch: 256,
            heartbeat: Dur(Duration::from_secs(10)),
            reconnect_max_delay: Dur(Duration::from_secs(5)),
            ca_file: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueuesSection {
    pub send: String,
    pub inbound: String,
    pub sync_user: String,
    pub result: String,
}

impl Default for QueuesSection {
    fn default() -> Self {
        Self {
            send: "email.send".into(),
            inbound: "email.inbound".into(),
            sync_user: "email.sync.user".into(),
            result: "email.send.result".into(),
        }
    }
}

impl QueuesSection {
    pub fn send_dlq(&self) -> String {
        format!("{}.dlq", self.send)
    }
    pub fn inbound_dlq(&self) -> String {
        format!("{}.dlq", self.inbound)
    }
    /// The six queues of the public topology (contract §3), in a stable order.
    pub fn public_queues(&self) -> Vec<String> {
        vec![
            self.send.clone(),
            self.inbound.clone(),
            self.sync_user.clone(),
            self.result.clone(),
            self.send_dlq(),
            self.inbound_dlq(),
        ]
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseSection {
    pub url: Secret,
    pub max_connections: usize,
}

impl Default for DatabaseSection {
    fn default() -> Self {
        Self {
            url: Secret::new("postgres://localhost/mailbridge"),
            max_connections: 16,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSection {
    pub listen: String,
    pub admin_token_env: String,
}

impl Default for HttpSection {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8000".into(),
            admin_token_env: "MAILBRIDGE_ADMIN_TOKEN".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetrySection {
    pub max_retries: u32,
    pub delays: Vec<Dur>,
}

impl Default for RetrySection {
    fn default() -> Self {
        Self {
            max_retries: 3,
            delays: [1, 5, 15]
                .into_iter()
                .map(|s| Dur(Duration::from_secs(s)))
                .collect(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutboundSection {
    pub attachment_max_bytes: u64,
    pub attachment_timeout: Dur,
    pub attachment_allow_private: bool,
    /// Upper bound on one SMTP transaction.
    pub send_timeout: Dur,
    /// Attachment bytes held in memory by all pipelines together: a request with attachments
    /// reserves `attachment_max_bytes` of this before it downloads them, so at most
    /// `attachments_in_flight_bytes / attachment_max_bytes` requests download at once.
    pub attachments_in_flight_bytes: u64,
    /// Largest request body (the AMQP message) that is decoded; larger ones are refused.
    pub max_request_bytes: u64,
    /// Largest `body_content`.
    pub max_body_bytes: u64,
    /// Most recipients (to + cc + bcc together).
    pub max_recipients: usize,
    pub max_attachments: usize,
    /// Longest subject, in bytes (long ones are folded into lines of at most 998 octets).
    pub max_subject_bytes: usize,
    /// Most custom `headers`, and the longest value of one.
    pub max_headers: usize,
    pub max_header_bytes: usize,
}

impl Default for OutboundSection {
    fn default() -> Self {
        Self {
            attachment_max_bytes: 26_214_400,
            attachment_timeout: Dur(Duration::from_secs(30)),
            attachment_allow_private: false,
            send_timeout: Dur(Duration::from_secs(60)),
            attachments_in_flight_bytes: 268_435_456,
            max_request_bytes: 16_777_216,
            max_body_bytes: 10_485_760,
            max_recipients: 1000,
            max_attachments: 100,
            max_subject_bytes: 4096,
            max_headers: 100,
            max_header_bytes: 4096,
        }
    }
}

impl OutboundSection {
    /// The decoding limits of a request.
    pub fn limits(&self) -> crate::outbound::Limits {
        crate::outbound::Limits {
            max_request_bytes: self.max_request_bytes,
            max_body_bytes: self.max_body_bytes,
            max_recipients: self.max_recipients,
            max_attachments: self.max_attachments,
            max_subject_bytes: self.max_subject_bytes,
            max_headers: self.max_headers,
            max_header_bytes: self.max_header_bytes,
        }
    }
}

/// Inbound mail: how much of it is held at once.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InboundSection {
    /// A received email larger than this is not published: its headers and size go to the
    /// inbound DLQ and its bytes are stored (linked from the entry).
    pub max_message_bytes: u64,
    /// Bytes of mail one fetcher holds in memory per batch (IMAP fetches are grouped by the
    /// messages' sizes to stay under it).
    pub fetch_batch_bytes: u64,
    /// Logins per second to one mail server host (IMAP, POP3), for every mailbox on it: at
    /// start, and when they all reconnect. A mailbox may set its own.
    pub connect_rate_per_host: f64,
}

impl Default for InboundSection {
    fn default() -> Self {
        Self {
            max_message_bytes: 52_428_800,
            fetch_batch_bytes: 33_554_432,
            connect_rate_per_host: 100.0,
        }
    }
}

/// This instance among others sharing the broker and the database.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSection {
    /// Names this instance in outbox claims (default `<host name>:<HTTP port>`). It must be
    /// unique among running instances and stay the same across restarts: at start an
    /// instance releases the claims its previous run left.
    pub instance_id: Option<String>,
    /// How long an outbox claim lives without being renewed (in-flight claims are renewed
    /// every third of it); a claim of a dead instance frees its request after this.
    pub claim_ttl: Dur,
    /// How long a mailbox lease lives without being renewed (leases are renewed, and
    /// instances heartbeat, every third of it): a dead instance's mailboxes are taken over
    /// after this.
    pub lease_ttl: Dur,
}

impl Default for ClusterSection {
    fn default() -> Self {
        Self {
            instance_id: None,
            claim_ttl: Dur(Duration::from_secs(30)),
            lease_ttl: Dur(Duration::from_secs(30)),
        }
    }
}

/// `[attachments] store`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachmentBackend {
    Postgres,
    Dir,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AttachmentsSection {
    /// Where the bytes are kept: PostgreSQL (every instance serves every link) or files
    /// under `dir` (shared storage for several instances).
    pub store: AttachmentBackend,
    /// The local folder: the bytes with `store = "dir"`; otherwise only the spool of large
    /// emails being received and, without `link_key`, the generated keys.
    pub dir: PathBuf,
    pub public_base_url: String,
    pub link_ttl: Dur,
    /// The key that signs attachment links (at least 32 bytes), given as a secret so that
    /// every instance signs and checks alike; without it, a random key in `dir/.link-key`.
    /// The OAuth2 sealing key is derived from it too.
    pub link_key: Option<Secret>,
    pub link_key_env: Option<String>,
    pub link_key_file: Option<PathBuf>,
}

impl Default for AttachmentsSection {
    fn default() -> Self {
        Self {
            store: AttachmentBackend::Postgres,
            dir: PathBuf::from("var/attachments"),
            public_base_url: "http://127.0.0.1:8000".into(),
            link_ttl: Dur(Duration::from_secs(7 * 24 * 3600)),
            link_key: None,
            link_key_env: None,
            link_key_file: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenantsSection {
    /// Relative to the main file's folder.
    pub dir: PathBuf,
}

impl Default for TenantsSection {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("tenants.d"),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownSection {
    /// How long in-flight work may take to finish after SIGTERM before the process exits anyway.
    pub grace: Option<Dur>,
}

/// `[log] format`: how log lines are written to stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One line of text per event (the default).
    #[default]
    Text,
    /// One JSON object per line, with the event's fields (`tenant_id`, `message_id`,
    /// `mailbox_id`, …) as keys.
    Json,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSection {
    pub format: LogFormat,
}

/// The main file as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MainFile {
    pub rabbitmq: RabbitMqSection,
    pub queues: QueuesSection,
    pub database: DatabaseSection,
    pub http: HttpSection,
    pub retry: RetrySection,
    pub outbound: OutboundSection,
    pub attachments: AttachmentsSection,
    pub tenants: TenantsSection,
    pub shutdown: ShutdownSection,
    pub inbound: InboundSection,
    pub cluster: ClusterSection,
    pub log: LogSection,
}
