//! Domain types shared by the actors and the HTTP layer. No I/O happens here.
//!
//! The wire formats of the public contract live here as serde types: the guide's
//! "Queue Statistics" response and the `/health` document of contract §6.

use std::collections::BTreeMap;

use serde::Serialize;

/// An error with its causes, each said once ("error performing TLS handshake: invalid peer
/// certificate: UnknownIssuer"), so the reason reaches `/health`, results and the log.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = inner.source();
    }
    s
}

/// One queue in the guide's "Queue Statistics" response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QueueStats {
    pub message_count: u32,
    pub consumer_count: u32,
    /// `running` when something consumes the queue, `idle` when nothing does,
    /// `missing` when the broker does not know the queue.
    pub status: &'static str,
}

impl QueueStats {
    pub fn new(message_count: u32, consumer_count: u32) -> Self {
        Self {
            message_count,
            consumer_count,
            status: if consumer_count > 0 {
                "running"
            } else {
                "idle"
            },
        }
    }
    pub fn missing() -> Self {
        Self {
            message_count: 0,
            consumer_count: 0,
            status: "missing",
        }
    }
}

/// The guide's `GET /api/rabbitmq/status` response.
#[derive(Debug, Clone, Serialize)]
pub struct QueueStatusResponse {
    pub success: bool,
    /// `connected` or `disconnected`.
    pub connection_status: &'static str,
    pub queues: BTreeMap<String, QueueStats>,
    /// Why the numbers are missing, when `success` is false (added field).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// An entry on a dead-letter queue (contract §4).
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct DeadLetterEntry {
    /// The original request, when it parsed as JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<serde_json::Value>,
    /// The original body as text, when it was not JSON (or was too large to keep whole).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_body: Option<String>,
    /// Set when `raw_body` is only the start of the body: the body's size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_body_bytes: Option<u64>,
    pub message_id: Option<String>,
    pub tenant_id: Option<String>,
    pub error: String,
    /// `permanent`, `transient` (after the last retry) or `invalid`.
    pub error_class: String,
    pub retry_count: u32,
    pub failed_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reply: Option<String>,
    /// Inbound entries: the mailbox and the message's UID there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mailbox_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// Inbound entries: the exactly-once key of the email in its mailbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedup_key: Option<String>,
    /// Inbound entries: the email's bytes, kept in the attachment store (id, and a signed
    /// link to download them), so it can be recovered (`mailbridge dlq replay`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_url: Option<String>,
    /// Inbound entries: the email's size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Inbound entries not published whole (too large): the email's headers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<BTreeMap<String, String>>,
}

/// How much of a body too large to keep whole a dead letter carries.
const RAW_PREVIEW: usize = 64 * 1024;

impl DeadLetterEntry {
    /// An entry for `body`, keeping the request as JSON when it is JSON; the caller fills in
    /// ids, retry count and last reply. A body over `keep_whole` bytes (a request refused as
    /// too large) is kept as the start of its text, with its size.
    pub fn for_body(
        body: &[u8],
        error: String,
        error_class: &str,
        failed_at: String,
        keep_whole: usize,
    ) -> Self {
        let mut entry = Self {
            error,
            error_class: error_class.to_string(),
            failed_at,
            ..Self::default()
        };
        entry.attach_body(body, keep_whole);
        entry
    }

    /// Sets `request` (or `raw_body`, `raw_body_bytes`) from the original body.
    pub fn attach_body(&mut self, body: &[u8], keep_whole: usize) {
        if body.len() > keep_whole {
            let start = &body[..RAW_PREVIEW.min(body.len())];
            self.request = None;
            self.raw_body = Some(String::from_utf8_lossy(start).into_owned());
            self.raw_body_bytes = Some(body.len() as u64);
            return;
        }
        match serde_json::from_slice::<serde_json::Value>(body) {
            Ok(v) => self.request = Some(v),
            Err(_) => self.raw_body = Some(String::from_utf8_lossy(body).into_owned()),
        }
    }
}

/// The state of one part of the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ComponentState {
    /// Not yet tried or still connecting for the first time.
    Starting,
    Ok,
    /// Tried and failing; the service keeps trying.
    Down,
}

impl ComponentState {
    pub fn as_str(self) -> &'static str {
        match self {
            ComponentState::Starting => "starting",
            ComponentState::Ok => "ok",
            ComponentState::Down => "down",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct ComponentHealth {
    pub status: ComponentState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Component-specific facts (endpoint, restarts, last sync, …).
    #[serde(flatten)]
    pub details: BTreeMap<String, serde_json::Value>,
}

impl ComponentHealth {
    pub fn starting() -> Self {
        Self {
            status: ComponentState::Starting,
            last_error: None,
            details: BTreeMap::new(),
        }
    }
    pub fn ok() -> Self {
        Self {
            status: ComponentState::Ok,
            last_error: None,
            details: BTreeMap::new(),
        }
    }
    pub fn down(error: impl Into<String>) -> Self {
        Self {
            status: ComponentState::Down,
            last_error: Some(error.into()),
            details: BTreeMap::new(),
        }
    }
    pub fn with(mut self, key: &str, value: impl Into<serde_json::Value>) -> Self {
        self.details.insert(key.into(), value.into());
        self
    }
}

/// Which component a health report is about.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ComponentId {
    RabbitMq,
    Database,
    Provider(String),
    Mailbox(String),
    /// A supervised actor (restart counts live here).
    Actor(String),
    /// The configuration: the last reload and, when it was refused, why.
    Config,
}

/// The `/health` document of contract §6.
#[derive(Debug, Clone, Serialize)]
pub struct HealthReport {
    /// `ok`, `degraded` or `starting`.
    pub status: &'static str,
    pub components: HealthComponents,
}

#[derive(Debug, Clone, Serialize)]
pub struct HealthComponents {
    pub rabbitmq: ComponentHealth,
    pub database: ComponentHealth,
    pub config: ComponentHealth,
    pub providers: BTreeMap<String, ComponentHealth>,
    pub mailboxes: BTreeMap<String, ComponentHealth>,
    pub actors: BTreeMap<String, ComponentHealth>,
}

impl HealthComponents {
    /// RabbitMQ and PostgreSQL both reachable.
    fn core_ok(&self) -> bool {
        self.rabbitmq.status == ComponentState::Ok && self.database.status == ComponentState::Ok
    }

    /// The core reachable and nothing down.
    fn all_fine(&self) -> bool {
        self.core_ok()
            && self
                .providers
                .values()
                .chain(self.mailboxes.values())
                .chain(self.actors.values())
                .chain(std::iter::once(&self.config))
                .all(|h| h.status != ComponentState::Down)
    }
}

impl HealthReport {
    /// Builds the report from what the components last said. `ever_ready` tells `starting`
    /// (never yet ready) from `degraded` (was ready, lost something).
    pub fn build(components: &BTreeMap<ComponentId, ComponentHealth>, ever_ready: bool) -> Self {
        let mut out = HealthComponents {
            rabbitmq: ComponentHealth::starting(),
            database: ComponentHealth::starting(),
            config: ComponentHealth::ok(),
            providers: BTreeMap::new(),
            mailboxes: BTreeMap::new(),
            actors: BTreeMap::new(),
        };
        for (id, h) in components {
            match id {
                ComponentId::RabbitMq => out.rabbitmq = h.clone(),
                ComponentId::Database => out.database = h.clone(),
                ComponentId::Provider(p) => {
                    out.providers.insert(p.clone(), h.clone());
                }
                ComponentId::Mailbox(m) => {
                    out.mailboxes.insert(m.clone(), h.clone());
                }
                ComponentId::Actor(a) => {
                    out.actors.insert(a.clone(), h.clone());
                }
                ComponentId::Config => out.config = h.clone(),
            }
        }
        let status = match (out.all_fine(), ever_ready || out.core_ok()) {
            (true, _) => "ok",
            (false, false) => "starting",
            _ => "degraded",
        };
        Self {
            status,
            components: out,
        }
    }

    /// Adds the mailboxes other instances fetch (`others`, from `mailbox_health`) where this
    /// instance reports none, and names `me` as the instance of its own; `status` then counts
    /// the cluster's mailboxes too.
    pub fn with_cluster(mut self, me: &str, others: BTreeMap<String, ComponentHealth>) -> Self {
        for h in self.components.mailboxes.values_mut() {
            h.details
                .entry("instance".into())
                .or_insert_with(|| me.into());
        }
        for (id, h) in others {
            self.components.mailboxes.entry(id).or_insert(h);
        }
        if self.status != "starting" {
            self.status = if self.components.all_fine() {
                "ok"
            } else {
                "degraded"
            };
        }
        self
    }

    /// Whether the components say ready (RabbitMQ and PostgreSQL both reachable), without
    /// building the whole report (thousands of mailboxes report often).
    pub fn components_ready(components: &BTreeMap<ComponentId, ComponentHealth>) -> bool {
        [ComponentId::RabbitMq, ComponentId::Database]
            .iter()
            .all(|id| {
                components
                    .get(id)
                    .is_some_and(|h| h.status == ComponentState::Ok)
            })
    }

    /// Ready means RabbitMQ and PostgreSQL are both reachable: `/health` answers 200.
    pub fn ready(&self) -> bool {
        self.components.rabbitmq.status == ComponentState::Ok
            && self.components.database.status == ComponentState::Ok
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn mailbox_pages_filter_count_and_slice() {
        let mut c = BTreeMap::new();
        for (id, tenant, state) in [
            ("a1", "a", ComponentHealth::ok()),
            ("a2", "a", ComponentHealth::down("refused")),
            ("a3", "a", ComponentHealth::down("refused")),
            ("b1", "b", ComponentHealth::down("refused")),
            ("b2", "b", ComponentHealth::starting()),
        ] {
            c.insert(
                ComponentId::Mailbox(id.into()),
                state.with("tenant", tenant),
            );
        }
        let c: BTreeMap<String, ComponentHealth> = c
            .into_iter()
            .filter_map(|(id, h)| match id {
                ComponentId::Mailbox(m) => Some((m, h)),
                _ => None,
            })
            .collect();
        let ids = |p: &MailboxPage| p.mailboxes.iter().map(|m| m.id.clone()).collect::<Vec<_>>();
        let all = MailboxPage::build(&c, None, None, 0, 100);
        assert_eq!(all.total, 5);
        assert_eq!(all.counts["ok"], 1);
        assert_eq!(all.counts["down"], 3);
        assert_eq!(all.counts["starting"], 1);
        let down = MailboxPage::build(&c, Some(ComponentState::Down), None, 1, 1);
        assert_eq!((down.total, ids(&down)), (3, vec!["a3".to_string()]));
        let a = MailboxPage::build(&c, Some(ComponentState::Down), Some("a"), 0, 10);
        assert_eq!(ids(&a), ["a2", "a3"]);
        assert_eq!(a.counts["ok"], 1);
        let past = MailboxPage::build(&c, None, None, 9, 10);
        assert_eq!((past.total, past.mailboxes.len()), (5, 0));
    }

    use super::*;

    #[test]
    fn health_is_starting_then_ok_then_degraded() {
        let mut c = BTreeMap::new();
        let r = HealthReport::build(&c, false);
        assert_eq!(r.status, "starting");
        assert!(!r.ready());

        c.insert(ComponentId::RabbitMq, ComponentHealth::ok());
        c.insert(ComponentId::Database, ComponentHealth::ok());
        let r = HealthReport::build(&c, true);
        assert_eq!(r.status, "ok");
        assert!(r.ready());

        c.insert(
            ComponentId::RabbitMq,
            ComponentHealth::down("connection reset"),
        );
        let r = HealthReport::build(&c, true);
        assert_eq!(r.status, "degraded");
        assert!(!r.ready());
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["components"]["rabbitmq"]["status"], "down");
        assert_eq!(
            json["components"]["rabbitmq"]["last_error"],
            "connection reset"
        );
    }

    #[test]
    fn a_failing_provider_degrades_but_keeps_ready() {
        let mut c = BTreeMap::new();
        c.insert(ComponentId::RabbitMq, ComponentHealth::ok());
        c.insert(ComponentId::Database, ComponentHealth::ok());
        c.insert(
            ComponentId::Provider("p1".into()),
            ComponentHealth::down("421 try later"),
        );
        let r = HealthReport::build(&c, true);
        assert_eq!(r.status, "degraded");
        assert!(r.ready());
    }

    #[test]
    fn dead_letters_keep_json_requests_as_json() {
        let e = DeadLetterEntry::for_body(
            br#"{"message_id":"m"}"#,
            "x".into(),
            "permanent",
            "2025-01-01T00:00:00Z".into(),
            1024,
        );
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["request"]["message_id"], "m");
        assert!(v.get("raw_body").is_none());
        let e = DeadLetterEntry::for_body(b"not json", "x".into(), "invalid", "t".into(), 1024);
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["raw_body"], "not json");
        assert!(v.get("request").is_none());
        assert!(v["message_id"].is_null());
        // A body over the bound keeps its start and says how large it was.
        let big = vec![b'x'; 100_000];
        let e = DeadLetterEntry::for_body(&big, "x".into(), "invalid", "t".into(), 1024);
        assert_eq!(e.raw_body.as_ref().map(|r| r.len()), Some(64 * 1024));
        assert_eq!(e.raw_body_bytes, Some(100_000));
        assert!(e.request.is_none());
    }

    #[test]
    fn queue_stats_status_follows_consumers() {
        assert_eq!(QueueStats::new(5, 0).status, "idle");
        assert_eq!(QueueStats::new(0, 2).status, "running");
    }
}

/// One page of the mailboxes' health (`GET /api/mailboxes`): how many there are by state,
/// and the page asked for, by id.
#[derive(Debug, Clone, Serialize)]
pub struct MailboxPage {
    /// Mailboxes matching the filters (the page is a slice of them).
    pub total: usize,
    pub offset: usize,
    pub limit: usize,
    /// Every mailbox of the tenant filter (or all), by state, whatever the status filter.
    pub counts: BTreeMap<&'static str, usize>,
    pub mailboxes: Vec<MailboxHealth>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MailboxHealth {
    pub id: String,
    #[serde(flatten)]
    pub health: ComponentHealth,
}

impl MailboxPage {
    /// The page of `mailboxes` (in id order) with `status` (any when `None`) of `tenant` (any
    /// when `None`).
    pub fn build<'a>(
        mailboxes: impl IntoIterator<Item = (&'a String, &'a ComponentHealth)>,
        status: Option<ComponentState>,
        tenant: Option<&str>,
        offset: usize,
        limit: usize,
    ) -> Self {
        let mut counts: BTreeMap<&'static str, usize> =
            [("ok", 0), ("down", 0), ("starting", 0)].into();
        let mut total = 0;
        let mut page = Vec::new();
        for (m, h) in mailboxes {
            if tenant.is_some_and(|t| h.details.get("tenant").and_then(|v| v.as_str()) != Some(t)) {
                continue;
            }
            *counts.entry(h.status.as_str()).or_default() += 1;
            if status.is_some_and(|s| s != h.status) {
                continue;
            }
            if total >= offset && page.len() < limit {
                page.push(MailboxHealth {
                    id: m.clone(),
                    health: h.clone(),
                });
            }
            total += 1;
        }
        Self {
            total,
            offset,
            limit,
            counts,
            mailboxes: page,
        }
    }
}
