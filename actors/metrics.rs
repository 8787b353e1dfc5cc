//! The metrics actor: owns the metric [`Registry`] and the last health of every component.
//!
//! Everything that counts or reports health sends it a message; `/metrics` and `/health` ask
//! it for a rendering. Nothing else holds this state, so no lock is needed anywhere.

use std::collections::BTreeMap;

use actix::prelude::*;

use crate::domain::{ComponentHealth, ComponentId, ComponentState, HealthReport, MailboxPage};
use crate::metrics::{Labels, Registry};

#[derive(Default)]
pub struct MetricsActor {
    registry: Registry,
    components: BTreeMap<ComponentId, ComponentHealth>,
    ever_ready: bool,
    /// Mailbox health changed since the supervisor last took it for `mailbox_health`:
    /// the new health, or `None` for a mailbox forgotten.
    mailbox_changes: BTreeMap<String, Option<ComponentHealth>>,
}

impl Actor for MetricsActor {
    type Context = Context<Self>;
}

/// Adds to a counter.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Count {
    pub name: &'static str,
    pub labels: Labels,
    pub by: u64,
}

impl Count {
    pub fn one(name: &'static str, labels: Labels) -> Self {
        Self {
            name,
            labels,
            by: 1,
        }
    }
}

/// Records one observation in a histogram.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Observe {
    pub name: &'static str,
    pub labels: Labels,
    pub value: f64,
}

/// Sets a gauge.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct SetGauge {
    pub name: &'static str,
    pub labels: Labels,
    pub value: f64,
}

/// A component says how it is.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct ReportHealth {
    pub id: ComponentId,
    pub health: ComponentHealth,
}

/// A component is gone (a removed mailbox, a stopped provider).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct ForgetComponent(pub ComponentId);

/// The Prometheus text.
#[derive(Message, Debug)]
#[rtype(result = "String")]
pub struct RenderMetrics;

/// The `/health` document: this instance's components, and `others` (the mailboxes other
/// instances fetch, from `mailbox_health`) where it has none of its own.
#[derive(Message, Debug, Default)]
#[rtype(result = "HealthReport")]
pub struct GetHealth {
    pub instance_id: String,
    pub others: BTreeMap<String, ComponentHealth>,
}

/// The mailbox health changed since the last time (`all`: every mailbox's now, as after a
/// failed write), for the supervisor to write to `mailbox_health`.
#[derive(Message, Debug)]
#[rtype(result = "MailboxChanges")]
pub struct TakeMailboxChanges {
    pub all: bool,
}

#[derive(Debug, Default)]
pub struct MailboxChanges {
    pub changed: Vec<(String, ComponentHealth)>,
    pub forgotten: Vec<String>,
}

/// One counter's value (tests and diagnostics).
#[derive(Message, Debug)]
#[rtype(result = "u64")]
pub struct GetCounter {
    pub name: &'static str,
    pub labels: Vec<(&'static str, String)>,
}

impl Handler<Count> for MetricsActor {
    type Result = ();
    fn handle(&mut self, msg: Count, _: &mut Context<Self>) {
        self.registry.inc(msg.name, msg.labels, msg.by);
    }
}

impl Handler<Observe> for MetricsActor {
    type Result = ();
    fn handle(&mut self, msg: Observe, _: &mut Context<Self>) {
        self.registry.observe(msg.name, msg.labels, msg.value);
    }
}

impl Handler<SetGauge> for MetricsActor {
    type Result = ();
    fn handle(&mut self, msg: SetGauge, _: &mut Context<Self>) {
        self.registry.set(msg.name, msg.labels, msg.value);
    }
}

/// Sets one sample of a gauge that has a sample per label set.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct SetGaugeSample(pub SetGauge);

impl Handler<SetGaugeSample> for MetricsActor {
    type Result = ();
    fn handle(&mut self, msg: SetGaugeSample, _: &mut Context<Self>) {
        let g = msg.0;
        self.registry.set_sample(g.name, g.labels, g.value);
    }
}

impl Handler<ReportHealth> for MetricsActor {
    type Result = ();
    fn handle(&mut self, msg: ReportHealth, _: &mut Context<Self>) {
        if let ComponentId::Mailbox(m) = &msg.id {
            self.mailbox_changes
                .insert(m.clone(), Some(msg.health.clone()));
        }
        self.components.insert(msg.id, msg.health);
        if !self.ever_ready && HealthReport::components_ready(&self.components) {
            self.ever_ready = true;
        }
    }
}

impl Handler<ForgetComponent> for MetricsActor {
    type Result = ();
    fn handle(&mut self, msg: ForgetComponent, _: &mut Context<Self>) {
        if let ComponentId::Mailbox(m) = &msg.0 {
            self.mailbox_changes.insert(m.clone(), None);
        }
        self.components.remove(&msg.0);
    }
}

impl Handler<TakeMailboxChanges> for MetricsActor {
    type Result = MessageResult<TakeMailboxChanges>;
    fn handle(&mut self, msg: TakeMailboxChanges, _: &mut Context<Self>) -> Self::Result {
        let mut out = MailboxChanges::default();
        for (id, change) in std::mem::take(&mut self.mailbox_changes) {
            match change {
                Some(h) if !msg.all => out.changed.push((id, h)),
                Some(_) => {}
                None => out.forgotten.push(id),
            }
        }
        if msg.all {
            out.changed = self
                .components
                .iter()
                .filter_map(|(id, h)| match id {
                    ComponentId::Mailbox(m) => Some((m.clone(), h.clone())),
                    _ => None,
                })
                .collect();
        }
        MessageResult(out)
    }
}

impl Handler<RenderMetrics> for MetricsActor {
    type Result = String;
    fn handle(&mut self, _: RenderMetrics, _: &mut Context<Self>) -> String {
        self.registry.render()
    }
}

impl Handler<GetHealth> for MetricsActor {
    type Result = MessageResult<GetHealth>;
    fn handle(&mut self, msg: GetHealth, _: &mut Context<Self>) -> Self::Result {
        MessageResult(
            HealthReport::build(&self.components, self.ever_ready)
                .with_cluster(&msg.instance_id, msg.others),
        )
    }
}

/// Whether RabbitMQ and PostgreSQL are both reachable (`/readyz`).
#[derive(Message, Debug)]
#[rtype(result = "bool")]
pub struct IsReady;

impl Handler<IsReady> for MetricsActor {
    type Result = bool;
    fn handle(&mut self, _: IsReady, _: &mut Context<Self>) -> bool {
        HealthReport::components_ready(&self.components)
    }
}

/// One page of the mailboxes' health, filtered.
#[derive(Message, Debug)]
#[rtype(result = "MailboxPage")]
pub struct ListMailboxes {
    /// The mailboxes other instances fetch (from `mailbox_health`); this instance's own win.
    pub others: BTreeMap<String, ComponentHealth>,
    pub status: Option<ComponentState>,
    pub tenant: Option<String>,
    pub offset: usize,
    pub limit: usize,
}

impl Handler<ListMailboxes> for MetricsActor {
    type Result = MessageResult<ListMailboxes>;
    fn handle(&mut self, msg: ListMailboxes, _: &mut Context<Self>) -> Self::Result {
        let mut mailboxes: BTreeMap<&String, &ComponentHealth> = msg.others.iter().collect();
        mailboxes.extend(self.components.iter().filter_map(|(id, h)| match id {
            ComponentId::Mailbox(m) => Some((m, h)),
            _ => None,
        }));
        MessageResult(MailboxPage::build(
            mailboxes,
            msg.status,
            msg.tenant.as_deref(),
            msg.offset,
            msg.limit,
        ))
    }
}

/// Counter families summed by one label each (`""`: the family's total), in the order asked
/// (the dashboard's queue rates).
#[derive(Message, Debug)]
#[rtype(result = "Vec<BTreeMap<String, u64>>")]
pub struct CounterSums(pub Vec<(&'static str, &'static str)>);

impl Handler<CounterSums> for MetricsActor {
    type Result = MessageResult<CounterSums>;
    fn handle(&mut self, msg: CounterSums, _: &mut Context<Self>) -> Self::Result {
        MessageResult(
            msg.0
                .iter()
                .map(|(name, by)| self.registry.counter_sums_by(name, by))
                .collect(),
        )
    }
}

/// What this instance counted per provider since it started (the dashboard).
#[derive(Message, Debug)]
#[rtype(result = "BTreeMap<String, ProviderCounts>")]
pub struct GetProviderCounts;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProviderCounts {
    pub sent: u64,
    pub failed: u64,
    pub retries: u64,
    pub deferred: u64,
    /// Sends timed (`mailbridge_send_duration_seconds`) and their total seconds.
    pub timed: u64,
    pub seconds: f64,
}

impl Handler<GetProviderCounts> for MetricsActor {
    type Result = MessageResult<GetProviderCounts>;
    fn handle(&mut self, _: GetProviderCounts, _: &mut Context<Self>) -> Self::Result {
        let mut out: BTreeMap<String, ProviderCounts> = BTreeMap::new();
        let r = &self.registry;
        for (p, n) in r.counter_sums_by("mailbridge_emails_sent_total", "provider") {
            out.entry(p).or_default().sent = n;
        }
        for (p, n) in r.counter_sums_by("mailbridge_emails_failed_total", "provider") {
            out.entry(p).or_default().failed = n;
        }
        for (p, n) in r.counter_sums_by("mailbridge_retries_total", "provider") {
            out.entry(p).or_default().retries = n;
        }
        for (p, n) in r.counter_sums_by("mailbridge_sends_deferred_total", "provider") {
            out.entry(p).or_default().deferred = n;
        }
        for (p, (sum, count)) in r.histogram_sums_by("mailbridge_send_duration_seconds", "provider")
        {
            let e = out.entry(p).or_default();
            e.timed = count;
            e.seconds = sum;
        }
        MessageResult(out)
    }
}

impl Handler<GetCounter> for MetricsActor {
    type Result = u64;
    fn handle(&mut self, msg: GetCounter, _: &mut Context<Self>) -> u64 {
        let labels: Vec<(&'static str, &str)> =
            msg.labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
        self.registry.counter(msg.name, &labels)
    }
}

/// Label value for tenants and providers the configuration does not know: a label value
/// never comes straight from outside data, so a flood of made-up ids cannot grow `/metrics`.
pub const UNKNOWN_LABEL: &str = "unknown";

/// The `tenant` label for `tenant`: its id when a tenant file declares it, else
/// [`UNKNOWN_LABEL`].
pub fn metric_tenant(settings: &crate::settings::Settings, tenant: Option<&str>) -> String {
    match tenant {
        Some(t) if settings.tenants.iter().any(|x| x.id == t) => t.to_string(),
        _ => UNKNOWN_LABEL.to_string(),
    }
}

/// The `provider` label: the provider's id when it is one of `tenant`'s, else
/// [`UNKNOWN_LABEL`].
pub fn metric_provider(
    settings: &crate::settings::Settings,
    tenant: Option<&str>,
    provider: Option<&str>,
) -> String {
    match (tenant, provider) {
        (Some(t), Some(p)) if settings.provider(t, p).is_some() => p.to_string(),
        _ => UNKNOWN_LABEL.to_string(),
    }
}
