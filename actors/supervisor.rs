//! The supervisor: owns the AMQP connection, keeps the topology declared (`topology.rs`),
//! holds this instance's mailbox leases (`leases.rs`), and starts and restarts every other
//! actor.
//!
//! Connection life cycle: connect (with a capped exponential backoff) → declare the topology
//! of contract §3 on a fresh channel → start the children that need AMQP, each of which opens
//! its own channels → watch the connection (lapin's error events, plus a status check every
//! tick as a safety net) → on loss, stop those children, mark RabbitMQ down in `/health`, and
//! start over. Heartbeats are negotiated from `[rabbitmq] heartbeat`, so a silent broker is
//! noticed too.
//!
//! Child supervision: every tick the supervisor checks each child's mailbox. A child whose
//! actor has stopped without being asked — including one whose handler panicked, which kills
//! that actor's task but not the process — is counted in `mailbridge_actor_restarts_total`,
//! shown in `/health`, and started again after a backoff that grows with consecutive crashes.
//! A child starts only when its gates are open: the AMQP connection (`needs_amqp`) and, for a
//! mailbox's fetcher, this instance's lease of the mailbox (`ChildId::leased_mailbox`).

use std::any::Any;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use deadpool_postgres::Pool;
use futures_util::StreamExt;
use lapin::Connection;

use crate::actors::metrics::{
    Count, ForgetComponent, MetricsActor, ReportHealth, SetGauge, TakeMailboxChanges,
};
use crate::amqp::Publisher;
use crate::domain::{ComponentHealth, ComponentId, QueueStatusResponse};
use crate::leases::{self, Lease};
use crate::mailbox_health;
use crate::settings::Settings;
use crate::storage;
use crate::topology::{declare_topology, queue_stats, AmqpError};

/// After the shutdown grace: how long the transactions already past their final dot, and the
/// recording of their outcome, may still take.
const OVERDUE: Duration = Duration::from_secs(5);
/// Channels of the shared publisher (each caller keeps to one, so its messages stay in order).
const PUBLISH_LANES: usize = 4;
/// How often the supervisor checks its children and the connection.
const TICK: Duration = Duration::from_millis(250);
/// How often this instance's mailbox health is written for the others to show.
const HEALTH_WRITE: Duration = Duration::from_secs(1);
/// How often rows of mailboxes no longer configured are deleted from `mailbox_health`.
const HEALTH_PRUNE: Duration = Duration::from_secs(60);
/// How often PostgreSQL is pinged for `/health`.
const DB_PROBE: Duration = Duration::from_secs(2);
/// A child that lived this long before dying starts its backoff from the beginning again.
const STABLE_AFTER: Duration = Duration::from_secs(30);
const CHILD_MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Exponential backoff: 200 ms, 400 ms, … capped at `max`.
pub fn backoff(attempt: u32, max: Duration) -> Duration {
    let base = Duration::from_millis(200);
    base.checked_mul(1u32 << attempt.min(16))
        .unwrap_or(max)
        .min(max)
}

/// Which child: the service's fixed actors, one sender per provider, one fetcher per
/// mailbox. Shown (as `outbox`, `sender:<provider id>`, `mailbox:<mailbox id>`, …) in logs,
/// `/health`'s `actors` and the restart metric.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ChildId {
    Outbox,
    Retry,
    Dlq,
    Outbound,
    SyncUser,
    SyncListener,
    Sender(String),
    Mailbox(String),
    /// A child added from outside (`AddChild`): tests, embeddings.
    Other(String),
}

impl ChildId {
    /// The mailbox whose lease gates this child: a mailbox's fetcher runs only while this
    /// instance holds the mailbox's lease, and restarts when the lease's token changes.
    pub fn leased_mailbox(&self) -> Option<&String> {
        match self {
            ChildId::Mailbox(m) => Some(m),
            _ => None,
        }
    }
}

impl std::fmt::Display for ChildId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChildId::Outbox => f.write_str("outbox"),
            ChildId::Retry => f.write_str("retry"),
            ChildId::Dlq => f.write_str("dlq"),
            ChildId::Outbound => f.write_str("outbound"),
            ChildId::SyncUser => f.write_str("sync-user"),
            ChildId::SyncListener => f.write_str("sync-listener"),
            ChildId::Sender(p) => write!(f, "sender:{p}"),
            ChildId::Mailbox(m) => write!(f, "mailbox:{m}"),
            ChildId::Other(name) => f.write_str(name),
        }
    }
}

/// What a child gets when it is started.
#[derive(Clone)]
pub struct ChildContext {
    pub settings: Arc<Settings>,
    pub pool: Pool,
    pub metrics: Addr<MetricsActor>,
    /// The live connection, for children that declared `needs_amqp`.
    pub connection: Option<Arc<Connection>>,
    /// The publisher on that connection (confirm-mode channels shared by every child).
    pub publisher: Option<Arc<Publisher>>,
    /// To find sibling actors ([`FindChild`]).
    pub supervisor: Addr<Supervisor>,
    /// The running OAuth2 accounts, shared by every sender and fetcher.
    pub accounts: Arc<crate::oauth2::Accounts>,
    /// Paces logins per mail server host, shared by every fetcher.
    pub pacer: Arc<crate::pacing::ConnectPacer>,
    /// For a child gated on a mailbox lease ([`ChildId::leased_mailbox`]): the lease it runs
    /// under, whose token fences the mailbox's position.
    pub lease: Option<Lease>,
}

/// Asks a child to stop taking work, finish what it has in flight, and stop.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct Drain;

/// The shutdown grace is over: a child that hands work to the outside (a sender) starts
/// nothing more and abandons what it can abandon without losing track of it (see
/// `SenderActor`).
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct Abort;

/// The supervisor's view of a running child.
pub trait ChildHandle {
    /// False once the actor has stopped, for whatever reason (a panic included).
    fn alive(&self) -> bool;
    /// Resolves when the child has drained and stopped (or is already gone).
    fn drain(&self) -> Pin<Box<dyn Future<Output = ()>>>;
    /// The typed address, for [`FindChild`].
    fn as_any(&self) -> &dyn Any;
}

impl<A> ChildHandle for Addr<A>
where
    A: Actor<Context = Context<A>> + Handler<Drain>,
{
    fn alive(&self) -> bool {
        self.connected()
    }
    fn drain(&self) -> Pin<Box<dyn Future<Output = ()>>> {
        let addr = self.clone();
        Box::pin(async move {
            // A mailbox error means the actor is gone already: drained.
            let _ = addr.send(Drain).await;
        })
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

type StartFn = Box<dyn Fn(ChildContext) -> Box<dyn ChildHandle> + Send>;

/// How to start one child.
pub struct ChildSpec {
    pub id: ChildId,
    /// Started only while the AMQP connection is up, and stopped when it is lost.
    pub needs_amqp: bool,
    /// Takes work from a queue: drained before every other child at shutdown, because its
    /// in-flight work needs the others.
    pub consumer: bool,
    /// Changes when the child's configuration changes: a reload restarts the child then.
    pub fingerprint: u64,
    /// Tells a running child about a new configuration (for children that read the tenants).
    pub on_settings: Option<SettingsHook>,
    /// Tells a running child that the shutdown grace is over ([`Abort`]).
    pub on_abort: Option<AbortHook>,
    pub start: StartFn,
}

type SettingsHook = Box<dyn Fn(&dyn Any, Arc<Settings>) + Send>;
type AbortHook = Box<dyn Fn(&dyn Any) + Send>;

/// A new configuration was loaded (sent to children that asked for it).
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct SettingsChanged(pub Arc<Settings>);

impl ChildSpec {
    pub fn new(
        id: ChildId,
        needs_amqp: bool,
        start: impl Fn(ChildContext) -> Box<dyn ChildHandle> + Send + 'static,
    ) -> Self {
        Self {
            id,
            needs_amqp,
            consumer: false,
            fingerprint: 0,
            on_settings: None,
            on_abort: None,
            start: Box::new(start),
        }
    }

    /// Restart the child on reload when this value changes.
    pub fn fingerprint(mut self, fingerprint: u64) -> Self {
        self.fingerprint = fingerprint;
        self
    }

    /// Send the child [`SettingsChanged`] on every reload.
    pub fn settings_updates<A>(mut self) -> Self
    where
        A: Actor<Context = Context<A>> + Handler<SettingsChanged>,
    {
        self.on_settings = Some(Box::new(|any: &dyn Any, settings: Arc<Settings>| {
            if let Some(addr) = any.downcast_ref::<Addr<A>>() {
                addr.do_send(SettingsChanged(settings));
            }
        }));
        self
    }

    /// Send the child [`Abort`] when the shutdown grace is over.
    pub fn abort_when_overdue<A>(mut self) -> Self
    where
        A: Actor<Context = Context<A>> + Handler<Abort>,
    {
        self.on_abort = Some(Box::new(|any: &dyn Any| {
            if let Some(addr) = any.downcast_ref::<Addr<A>>() {
                addr.do_send(Abort);
            }
        }));
        self
    }

    /// Marks the child as a queue consumer (drained first at shutdown).
    pub fn consumer(mut self) -> Self {
        self.consumer = true;
        self
    }
}

struct Child {
    spec: ChildSpec,
    handle: Option<Box<dyn ChildHandle>>,
    started_at: Instant,
    next_start: Instant,
    /// Restarts after crashes, all time (also in the metric).
    restarts: u64,
    /// Crashes in a row, for the backoff.
    consecutive: u32,
    /// Stopped on purpose (connection loss, shutdown, reload): not a crash.
    stopping: bool,
    /// Removed by a reload: forgotten once it has drained.
    removing: bool,
    /// Made by the factory from the configuration (a reload may add, change or remove it).
    from_config: bool,
    /// The lease token the running child was started with.
    lease_token: Option<i64>,
}

pub struct Supervisor {
    settings: Arc<Settings>,
    metrics: Addr<MetricsActor>,
    pool: Pool,
    accounts: Arc<crate::oauth2::Accounts>,
    connection: Option<Arc<Connection>>,
    publisher: Option<Arc<Publisher>>,
    generation: u64,
    connecting: bool,
    attempt: u32,
    migrated: bool,
    children: Vec<Child>,
    shutting_down: bool,
    factory: Option<ChildFactory>,
    pacer: Arc<crate::pacing::ConnectPacer>,
    /// The mailbox leases this instance holds, with their tokens.
    leases: HashMap<String, i64>,
    /// When the leases were last renewed.
    leases_renewed: Option<Instant>,
    renewing: bool,
    /// A renewal was asked for while one ran.
    renew_again: bool,
    /// The mailbox health of this instance is being written to `mailbox_health`.
    health_writing: bool,
    /// The next write is of every mailbox (at start, after a failed write).
    health_resync: bool,
    /// When rows of mailboxes no longer configured were last deleted.
    health_pruned: Option<Instant>,
    /// When the supervisor last ran its tick: `/livez` says wedged when that is long ago.
    last_tick: Instant,
    /// systemd's watchdog, fed by the tick: a stuck actor thread gets the service restarted.
    watchdog: crate::systemd::Watchdog,
    /// Mailboxes given up whose fetchers are still draining: their leases are released
    /// once the fetchers have stopped, never before.
    handing_over: HashSet<String>,
    /// Live instances at the last renewal.
    live_instances: usize,
    /// The last reload's outcome and when it ran (RFC 3339), for the dashboard.
    last_reload: Option<(String, ReloadOutcome)>,
}

/// Builds the configured children from a configuration (`app::children`).
type ChildFactory = Box<dyn Fn(&Settings) -> Vec<ChildSpec> + Send>;

impl Supervisor {
    pub fn new(settings: Arc<Settings>, pool: Pool, metrics: Addr<MetricsActor>) -> Self {
        // The key file sits beside the attachment link key; both stay where the service
        // started (a reload does not move them).
        let key_path = settings.attachments.dir.join(crate::oauth2::KEY_FILE);
        let mut accounts = crate::oauth2::Accounts::new(Some(pool.clone()), key_path);
        if let Some(link_key) = &settings.attachments.link_key {
            // Configured for every instance alike: the sealing key derives from it.
            accounts = accounts.with_key_from(link_key);
        }
        Self {
            accounts: Arc::new(accounts),
            settings,
            metrics,
            pool,
            connection: None,
            publisher: None,
            generation: 0,
            connecting: false,
            attempt: 0,
            migrated: false,
            children: Vec::new(),
            shutting_down: false,
            factory: None,
            pacer: Arc::default(),
            leases: HashMap::new(),
            leases_renewed: None,
            renewing: false,
            renew_again: false,
            health_writing: false,
            health_resync: true,
            health_pruned: None,
            last_tick: Instant::now(),
            watchdog: crate::systemd::Watchdog::from_env(),
            handing_over: HashSet::new(),
            live_instances: 0,
            last_reload: None,
        }
    }

    fn push_child(&mut self, spec: ChildSpec) {
        let now = Instant::now();
        self.children.push(Child {
            spec,
            handle: None,
            started_at: now,
            next_start: now,
            restarts: 0,
            consecutive: 0,
            stopping: false,
            removing: false,
            from_config: false,
            lease_token: None,
        });
    }

    /// Builds the configured children from `factory` now and again on every reload.
    pub fn with_factory(
        mut self,
        factory: impl Fn(&Settings) -> Vec<ChildSpec> + Send + 'static,
    ) -> Self {
        for spec in factory(&self.settings) {
            self.push_child(spec);
            if let Some(c) = self.children.last_mut() {
                c.from_config = true;
            }
        }
        self.factory = Some(Box::new(factory));
        self
    }

    fn reload(&mut self, source: &str, ctx: &mut Context<Self>) -> ReloadOutcome {
        let now = crate::outbound::rfc3339(time::OffsetDateTime::now_utc());
        let new = match Settings::load(&self.settings.path) {
            Ok(s) => s,
            Err(e) => {
                let problems: Vec<String> = e.0.iter().map(|p| p.to_string()).collect();
                for p in &problems {
                    tracing::warn!(%source, "configuration refused: {p}");
                }
                tracing::warn!(%source, "the running configuration stays in force");
                self.report(
                    ComponentId::Config,
                    ComponentHealth::down(format!(
                        "reload refused ({} problem(s)): {}",
                        problems.len(),
                        problems.join("; ")
                    ))
                    .with("refused_at", now),
                );
                return ReloadOutcome {
                    applied: false,
                    source: source.to_string(),
                    diff: None,
                    problems,
                };
            }
        };
        for w in &new.warnings {
            tracing::warn!("{w}");
        }
        let diff = self.settings.diff(&new);
        for section in &diff.restart_required {
            tracing::warn!(%section, "changed in the configuration; it applies at the next start (the running service keeps its current settings)");
        }
        let new = Arc::new(self.settings.with_tenants_of(new));
        self.settings = new.clone();
        let mut specs: Vec<ChildSpec> = self.factory.as_ref().map(|f| f(&new)).unwrap_or_default();
        // Changed and removed children drain first (their in-flight work finishes), then
        // stop; changed ones start again from their new spec on a later tick.
        for child in self.children.iter_mut().filter(|c| c.from_config) {
            match specs.iter().position(|s| s.id == child.spec.id) {
                Some(i) if specs[i].fingerprint == child.spec.fingerprint => {
                    specs.remove(i);
                }
                Some(i) => {
                    child.spec = specs.remove(i);
                    if let Some(h) = &child.handle {
                        child.stopping = true;
                        actix::spawn(h.drain());
                    }
                }
                None => {
                    child.removing = true;
                    if let Some(h) = &child.handle {
                        child.stopping = true;
                        actix::spawn(h.drain());
                    }
                }
            }
        }
        for spec in specs {
            self.push_child(spec);
            if let Some(c) = self.children.last_mut() {
                c.from_config = true;
            }
        }
        for child in &self.children {
            if let (Some(hook), Some(h)) = (&child.spec.on_settings, &child.handle) {
                hook(h.as_any(), new.clone());
            }
        }
        let pool = self.pool.clone();
        let mirror = new.clone();
        ctx.spawn(
            async move {
                if let Err(e) = storage::mirror_config(&pool, &mirror).await {
                    tracing::warn!(error = %e, "the configuration mirror could not be updated");
                }
            }
            .into_actor(self),
        );
        tracing::info!(%source, diff = %serde_json::to_string(&diff).unwrap_or_default(), "configuration reloaded");
        self.report(
            ComponentId::Config,
            ComponentHealth::ok()
                .with("reloaded_at", now)
                .with("tenants", new.tenants.len()),
        );
        // New mailboxes start as soon as their leases are taken, not at the next round.
        self.renew_leases(ctx);
        self.tick(ctx);
        ReloadOutcome {
            applied: true,
            source: source.to_string(),
            diff: Some(diff),
            problems: Vec::new(),
        }
    }

    fn report(&self, id: ComponentId, health: ComponentHealth) {
        self.metrics.do_send(ReportHealth { id, health });
    }

    fn migrate(&mut self, ctx: &mut Context<Self>, attempt: u32) {
        let db = self.settings.database.clone();
        let pool = self.pool.clone();
        let instance = self.settings.instance_id.clone();
        ctx.spawn(
            async move {
                let applied = storage::migrate(&db).await?;
                // Before any delivery is taken up: what this instance held when it stopped
                // is free again at once (other instances' claims expire on their own).
                let released = crate::outbox::release_claims_of(&pool, &instance).await?;
                Ok::<_, storage::StorageError>((applied, released))
            }
                .into_actor(self)
                .map(move |res, act, ctx| match res {
                    Ok((applied, released)) => {
                        if !applied.is_empty() {
                            tracing::info!(?applied, "database migrated");
                        }
                        if released > 0 {
                            tracing::info!(released, "released the outbox claims of this instance's previous run");
                        }
                        act.migrated = true;
                        act.probe_database(ctx);
                        act.renew_leases(ctx);
                        // The children that waited for the database start now, not a tick later.
                        act.tick(ctx);
                        let pool = act.pool.clone();
                        let settings = act.settings.clone();
                        ctx.spawn(
                            async move {
                                if let Err(e) = storage::mirror_config(&pool, &settings).await {
                                    tracing::warn!(error = %e, "the configuration mirror could not be written");
                                }
                            }
                            .into_actor(act),
                        );
                    }
                    Err(e) => {
                        let delay = backoff(attempt, Duration::from_secs(10));
                        tracing::warn!(error = %e, retry_in = ?delay, "database not ready");
                        act.report(ComponentId::Database, ComponentHealth::down(e.to_string()));
                        if !act.shutting_down {
                            ctx.run_later(delay, move |act, ctx| act.migrate(ctx, attempt + 1));
                        }
                    }
                }),
        );
    }

    fn probe_database(&mut self, ctx: &mut Context<Self>) {
        if !self.migrated {
            return;
        }
        let pool = self.pool.clone();
        ctx.spawn(
            async move {
                match tokio::time::timeout(Duration::from_secs(3), storage::ping(&pool)).await {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(_) => Err("PostgreSQL did not answer within 3 s".to_string()),
                }
            }
            .into_actor(self)
            .map(|res, act, _| {
                let health = match res {
                    Ok(()) => ComponentHealth::ok(),
                    Err(e) => ComponentHealth::down(e),
                };
                act.report(
                    ComponentId::Database,
                    health.with("endpoint", database_endpoint(&act.settings)),
                );
            }),
        );
    }

    fn connect(&mut self, ctx: &mut Context<Self>) {
        if self.connecting || self.connection.is_some() || self.shutting_down {
            return;
        }
        self.connecting = true;
        let settings = self.settings.clone();
        ctx.spawn(
            async move {
                let conn = crate::amqp::connect(&settings, "mailbridge").await?;
                let ch = conn.create_channel().await?;
                declare_topology(&ch, &settings).await?;
                let _ = ch.close(200, "OK".into()).await;
                Ok::<_, AmqpError>(conn)
            }
            .into_actor(self)
            .map(|res, act, ctx| {
                act.connecting = false;
                match res {
                    Ok(conn) => act.on_connected(conn, ctx),
                    Err(e) => act.on_connect_failed(e, ctx),
                }
            }),
        );
    }

    fn on_connected(&mut self, conn: Connection, ctx: &mut Context<Self>) {
        if self.shutting_down {
            let conn = Arc::new(conn);
            actix::spawn(async move {
                let _ = conn.close(200, "shutting down".into()).await;
            });
            return;
        }
        self.generation += 1;
        self.attempt = 0;
        let generation = self.generation;
        tracing::info!(endpoint = %self.settings.amqp_display(), "connected to RabbitMQ; topology declared");
        self.metrics
            .do_send(Count::one("mailbridge_amqp_connections_total", vec![]));
        self.report(
            ComponentId::RabbitMq,
            ComponentHealth::ok().with("endpoint", self.settings.amqp_display()),
        );
        let mut events = Box::pin(conn.events_listener());
        ctx.spawn(
            async move {
                while let Some(event) = events.next().await {
                    match event {
                        // A channel closed by the broker (a soft error): the connection lives
                        // on, and the channel's owner reopens it (a consumer by being
                        // restarted, the publisher on its next publish).
                        lapin::Event::Error(e) if e.is_amqp_soft_error() => {
                            tracing::warn!(error = %e, "the broker closed a channel");
                        }
                        lapin::Event::Error(e) => return e.to_string(),
                        _ => {}
                    }
                }
                "the connection was closed".to_string()
            }
            .into_actor(self)
            .map(move |reason, act, ctx| act.on_lost(generation, reason, ctx)),
        );
        let conn = Arc::new(conn);
        self.publisher = Some(Arc::new(Publisher::new(conn.clone(), PUBLISH_LANES)));
        self.connection = Some(conn);
        self.tick(ctx);
    }

    fn on_connect_failed(&mut self, e: AmqpError, ctx: &mut Context<Self>) {
        let delay = backoff(self.attempt, self.settings.rabbitmq.reconnect_max_delay.0);
        self.attempt += 1;
        tracing::warn!(error = %e, retry_in = ?delay, "RabbitMQ unavailable");
        self.report(
            ComponentId::RabbitMq,
            ComponentHealth::down(e.to_string()).with("endpoint", self.settings.amqp_display()),
        );
        ctx.run_later(delay, |act, ctx| act.connect(ctx));
    }

    fn on_lost(&mut self, generation: u64, reason: String, ctx: &mut Context<Self>) {
        if generation != self.generation || self.connection.is_none() || self.shutting_down {
            return;
        }
        self.connection = None;
        self.publisher = None;
        tracing::warn!(%reason, "lost the RabbitMQ connection; reconnecting");
        self.metrics.do_send(Count::one(
            "mailbridge_amqp_connection_losses_total",
            vec![],
        ));
        self.report(
            ComponentId::RabbitMq,
            ComponentHealth::down(format!("connection lost: {reason}"))
                .with("endpoint", self.settings.amqp_display()),
        );
        for child in self.children.iter_mut().filter(|c| c.spec.needs_amqp) {
            if let Some(h) = &child.handle {
                child.stopping = true;
                actix::spawn(h.drain());
            }
        }
        let delay = backoff(self.attempt, self.settings.rabbitmq.reconnect_max_delay.0);
        self.attempt += 1;
        ctx.run_later(delay, |act, ctx| act.connect(ctx));
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        self.last_tick = Instant::now();
        self.watchdog.feed(self.last_tick);
        if let Some(conn) = &self.connection {
            if !conn.status().connected() {
                let generation = self.generation;
                self.on_lost(generation, "the connection is no longer open".into(), ctx);
            }
        }
        if self.shutting_down {
            return;
        }
        let now = Instant::now();
        let context = ChildContext {
            settings: self.settings.clone(),
            pool: self.pool.clone(),
            metrics: self.metrics.clone(),
            connection: self.connection.clone(),
            publisher: self.publisher.clone(),
            supervisor: ctx.address(),
            accounts: self.accounts.clone(),
            pacer: self.pacer.clone(),
            lease: None,
        };
        let mut reports = Vec::new();
        let mut forget = Vec::new();
        self.children.retain(|c| {
            let gone = c.removing && c.handle.as_ref().is_none_or(|h| !h.alive());
            if gone {
                forget.push(c.spec.id.clone());
            }
            !gone
        });
        for id in forget {
            tracing::info!(actor = %id, "stopped (removed from the configuration)");
            self.metrics
                .do_send(ForgetComponent(ComponentId::Actor(id.to_string())));
            match id {
                ChildId::Sender(p) => self
                    .metrics
                    .do_send(ForgetComponent(ComponentId::Provider(p))),
                ChildId::Mailbox(m) => self
                    .metrics
                    .do_send(ForgetComponent(ComponentId::Mailbox(m))),
                _ => {}
            }
        }
        for child in &mut self.children {
            if child.removing {
                continue;
            }
            if let Some(h) = &child.handle {
                if h.alive() {
                    continue;
                }
                child.handle = None;
                if std::mem::take(&mut child.stopping) {
                    child.next_start = now;
                } else {
                    if now.duration_since(child.started_at) > STABLE_AFTER {
                        child.consecutive = 0;
                    }
                    let delay = backoff(child.consecutive, CHILD_MAX_BACKOFF);
                    child.consecutive += 1;
                    child.restarts += 1;
                    child.next_start = now + delay;
                    tracing::error!(
                        actor = %child.spec.id,
                        restart_in = ?delay,
                        restarts = child.restarts,
                        "actor stopped unexpectedly (see the panic above, if any); restarting"
                    );
                    self.metrics.do_send(Count::one(
                        "mailbridge_actor_restarts_total",
                        vec![("actor", child.spec.id.to_string())],
                    ));
                    reports.push((
                        child.spec.id.to_string(),
                        ComponentHealth::down("stopped unexpectedly; restarting")
                            .with("restarts", child.restarts),
                    ));
                }
            }
            let lease = match child.spec.id.leased_mailbox() {
                None => None,
                Some(m) => match self.leases.get(m) {
                    Some(token) => Some(Lease {
                        owner: self.settings.instance_id.clone(),
                        token: *token,
                    }),
                    // Gated: another instance holds it, or none yet.
                    None => continue,
                },
            };
            let ready = self.migrated && (!child.spec.needs_amqp || context.connection.is_some());
            if child.handle.is_none() && ready && now >= child.next_start {
                child.lease_token = lease.as_ref().map(|l| l.token);
                child.handle = Some((child.spec.start)(ChildContext {
                    lease,
                    ..context.clone()
                }));
                child.started_at = now;
                reports.push((
                    child.spec.id.to_string(),
                    ComponentHealth::ok().with("restarts", child.restarts),
                ));
            }
        }
        for (name, health) in reports {
            self.report(ComponentId::Actor(name), health);
        }
    }
}

impl Supervisor {
    /// Writes the health of this instance's mailboxes that changed since the last write to
    /// `mailbox_health` (every mailbox's after a failure), so that every instance shows the
    /// cluster; once a minute, deletes the rows of mailboxes no longer configured.
    fn write_mailbox_health(&mut self, ctx: &mut Context<Self>) {
        if !self.migrated || self.health_writing {
            return;
        }
        self.health_writing = true;
        let all = std::mem::take(&mut self.health_resync);
        let configured: Option<Vec<String>> = self
            .health_pruned
            .is_none_or(|t| t.elapsed() >= HEALTH_PRUNE)
            .then(|| {
                self.settings
                    .tenants
                    .iter()
                    .flat_map(|t| &t.mailboxes)
                    .map(|m| m.id.clone())
                    .collect()
            });
        let (pool, metrics) = (self.pool.clone(), self.metrics.clone());
        let me = self.settings.instance_id.clone();
        let ttl = self.settings.cluster.lease_ttl.0;
        ctx.spawn(
            async move {
                let changes = metrics
                    .send(TakeMailboxChanges { all })
                    .await
                    .map_err(|e| storage::StorageError::Unreadable(e.to_string()))?;
                if !changes.changed.is_empty() || !changes.forgotten.is_empty() {
                    mailbox_health::write(&pool, &me, &changes.changed, &changes.forgotten)
                        .await?;
                }
                let pruned = match configured {
                    Some(ids) => Some(mailbox_health::prune(&pool, &ids, ttl).await?),
                    None => None,
                };
                Ok::<_, storage::StorageError>(pruned)
            }
            .into_actor(self)
            .map(|res, act, _| {
                act.health_writing = false;
                match res {
                    Ok(Some(_)) => act.health_pruned = Some(Instant::now()),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "mailbox health not written; written whole next time");
                        act.health_resync = true;
                    }
                }
            }),
        );
    }

    /// Heartbeats, and takes or renews the leases of the mailboxes this instance should own
    /// among the live ones ([`leases::owner_of`]); then [`Supervisor::on_leases`].
    fn renew_leases(&mut self, ctx: &mut Context<Self>) {
        if self.renewing {
            // The mailboxes may have changed since that round began: one more after it.
            self.renew_again = true;
            return;
        }
        if !self.migrated || self.shutting_down {
            return;
        }
        self.renew_again = false;
        self.renewing = true;
        let pool = self.pool.clone();
        let me = self.settings.instance_id.clone();
        let listen = self.settings.http_listen.to_string();
        let ttl = self.settings.cluster.lease_ttl.0;
        let owned = self.leases.len();
        let mailboxes: Vec<String> = self
            .settings
            .tenants
            .iter()
            .flat_map(|t| &t.mailboxes)
            .map(|m| m.id.clone())
            .collect();
        let running: HashSet<String> = self
            .leases
            .keys()
            .chain(&self.handing_over)
            .cloned()
            .collect();
        ctx.spawn(
            async move {
                let live = leases::heartbeat(&pool, &me, &listen, owned, ttl).await?;
                let desired: HashSet<String> = mailboxes
                    .into_iter()
                    .filter(|m| leases::owner_of(m, &live) == Some(me.as_str()))
                    .collect();
                // What this instance holds (a lease lives with its heartbeat), and what it
                // should hold too where that is free.
                let mut held = leases::held(&pool, &me).await?;
                let wanted: Vec<String> = desired
                    .iter()
                    .filter(|m| !held.contains_key(*m))
                    .cloned()
                    .collect();
                held.extend(leases::acquire(&pool, &me, &wanted, ttl).await?);
                // Held but for another instance now, with no fetcher here (a previous run's,
                // a removed mailbox's): released at once. Those with a running fetcher are
                // released once it has drained (`on_leases`).
                let idle: Vec<String> = held
                    .keys()
                    .filter(|m| !desired.contains(*m) && !running.contains(*m))
                    .cloned()
                    .collect();
                leases::release(&pool, &me, &idle).await?;
                held.retain(|m, _| desired.contains(m));
                Ok::<_, storage::StorageError>((held, live.len()))
            }
            .into_actor(self)
            .map(|res, act, ctx| {
                act.renewing = false;
                if std::mem::take(&mut act.renew_again) {
                    ctx.run_later(Duration::ZERO, |act, ctx| act.renew_leases(ctx));
                }
                match res {
                    Ok((held, live)) => {
                        act.live_instances = live;
                        act.leases_renewed = Some(Instant::now());
                        act.on_leases(held, ctx);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "mailbox leases not renewed");
                        let ttl = act.settings.cluster.lease_ttl.0;
                        // Past the lease time the leases may be another instance's: their
                        // fetchers stop (they could not record anything meanwhile either).
                        if act.leases_renewed.is_some_and(|t| t.elapsed() >= ttl) {
                            act.on_leases(HashMap::new(), ctx);
                            act.leases_renewed = None;
                        }
                    }
                }
            }),
        );
    }

    /// The leases held now: the fetchers of mailboxes no longer held (or held under a new
    /// token) drain; those no longer held are released once drained, so their next owner
    /// takes them at once; newly held ones start at this tick.
    fn on_leases(&mut self, held: HashMap<String, i64>, ctx: &mut Context<Self>) {
        let gone: Vec<String> = self
            .leases
            .keys()
            .filter(|m| !held.contains_key(*m))
            .cloned()
            .collect();
        let mut drains = Vec::new();
        for child in &mut self.children {
            let Some(m) = child.spec.id.leased_mailbox() else {
                continue;
            };
            let Some(h) = &child.handle else {
                continue;
            };
            if held.get(m).copied() != child.lease_token {
                child.stopping = true;
                drains.push(h.drain());
            }
        }
        if !gone.is_empty() {
            tracing::info!(
                count = gone.len(),
                "handing mailboxes over to other instances"
            );
            let pool = self.pool.clone();
            let me = self.settings.instance_id.clone();
            let metrics = self.metrics.clone();
            self.handing_over.extend(gone.iter().cloned());
            ctx.spawn(
                async move {
                    futures_util::future::join_all(drains).await;
                    // Another instance reports them now.
                    for m in &gone {
                        metrics.do_send(ForgetComponent(ComponentId::Mailbox(m.clone())));
                    }
                    if let Err(e) = leases::release(&pool, &me, &gone).await {
                        tracing::warn!(error = %e, "leases not released; they are released at a later round or when this instance stops");
                    }
                    gone
                }
                .into_actor(self)
                .map(|gone, act, _| {
                    for m in gone {
                        act.handing_over.remove(&m);
                    }
                }),
            );
        } else {
            for d in drains {
                actix::spawn(d);
            }
        }
        self.leases = held;
        let owned = self.leases.len();
        let instance = vec![("instance", self.settings.instance_id.clone())];
        for (name, labels, value) in [
            ("mailbridge_instance_info", instance.clone(), 1.0),
            ("mailbridge_mailboxes_owned", Vec::new(), owned as f64),
            (
                "mailbridge_live_instances",
                Vec::new(),
                self.live_instances as f64,
            ),
        ] {
            self.metrics.do_send(SetGauge {
                name,
                labels,
                value,
            });
        }
        self.report(
            ComponentId::Actor("leases".into()),
            ComponentHealth::ok()
                .with("instance_id", self.settings.instance_id.clone())
                .with("mailboxes_owned", owned)
                .with("live_instances", self.live_instances)
                .with(
                    "lease_ttl_seconds",
                    self.settings.cluster.lease_ttl.0.as_secs(),
                ),
        );
        self.tick(ctx);
    }
}

fn database_endpoint(settings: &Settings) -> String {
    storage::pg_config(settings.database.url.expose())
        .map(|c| storage::endpoint(&c))
        .unwrap_or_else(|_| "<invalid url>".into())
}

impl Actor for Supervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.report(ComponentId::RabbitMq, ComponentHealth::starting());
        self.report(ComponentId::Database, ComponentHealth::starting());
        self.migrate(ctx, 0);
        self.connect(ctx);
        ctx.run_interval(TICK, |act, ctx| act.tick(ctx));
        ctx.run_interval(DB_PROBE, |act, ctx| act.probe_database(ctx));
        let every = self.settings.cluster.lease_ttl.0 / 3;
        ctx.run_interval(every, |act, ctx| act.renew_leases(ctx));
        ctx.run_interval(HEALTH_WRITE, |act, ctx| act.write_mailbox_health(ctx));
    }
}

/// `GET /livez`: how long ago the supervisor last ran its tick (every 250 ms while its thread
/// runs). No answer at all means the actors' thread is stuck.
#[derive(Message, Debug)]
#[rtype(result = "Duration")]
pub struct SinceTick;

impl Handler<SinceTick> for Supervisor {
    type Result = MessageResult<SinceTick>;
    fn handle(&mut self, _: SinceTick, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.last_tick.elapsed())
    }
}

/// `GET /api/rabbitmq/status`.
#[derive(Message, Debug)]
#[rtype(result = "QueueStatusResponse")]
pub struct GetQueueStatus;

impl Handler<GetQueueStatus> for Supervisor {
    type Result = ResponseFuture<QueueStatusResponse>;

    fn handle(&mut self, _: GetQueueStatus, _: &mut Context<Self>) -> Self::Result {
        let queues = self.settings.queues.public_queues();
        let conn = self.connection.clone();
        Box::pin(async move {
            let failed = |error: String| QueueStatusResponse {
                success: false,
                connection_status: "disconnected",
                queues: Default::default(),
                error: Some(error),
            };
            match conn {
                None => failed("not connected to RabbitMQ; the service is reconnecting".into()),
                Some(conn) => {
                    match tokio::time::timeout(Duration::from_secs(5), queue_stats(conn, queues))
                        .await
                    {
                        Ok(Ok(r)) => r,
                        Ok(Err(e)) => failed(e.to_string()),
                        Err(_) => failed("RabbitMQ did not answer within 5 s".into()),
                    }
                }
            }
        })
    }
}

/// Reload the configuration: validate it whole, then start, restart or stop exactly the
/// children whose configuration changed. A refused configuration changes nothing.
#[derive(Message, Debug)]
#[rtype(result = "ReloadOutcome")]
pub struct Reload {
    /// What asked for it: "SIGHUP", "file change", "HTTP".
    pub source: &'static str,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ReloadOutcome {
    pub applied: bool,
    pub source: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diff: Option<crate::settings::ConfigDiff>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

impl Handler<Reload> for Supervisor {
    type Result = MessageResult<Reload>;
    fn handle(&mut self, msg: Reload, ctx: &mut Context<Self>) -> Self::Result {
        if self.shutting_down {
            return MessageResult(ReloadOutcome {
                applied: false,
                source: msg.source.into(),
                diff: None,
                problems: vec!["the service is shutting down".into()],
            });
        }
        let outcome = self.reload(msg.source, ctx);
        // One that changed nothing (a file saved as it was) keeps the last one that did.
        if !outcome.applied || outcome.diff.as_ref().is_some_and(|d| !d.is_empty()) {
            let at = crate::outbound::rfc3339(time::OffsetDateTime::now_utc());
            self.last_reload = Some((at, outcome.clone()));
        }
        MessageResult(outcome)
    }
}

/// `PUT`/`DELETE /api/tenants/{tenant}/{providers|mailboxes}/{id}`: the tenant file edited
/// (`definition` set, or the entry removed when `None`), checked as a reload would check it,
/// written atomically and applied as a reload. Handled one at a time, so edits never race.
#[derive(Message, Debug)]
#[rtype(result = "Result<ReloadOutcome, crate::tenant_files::EditError>")]
pub struct EditTenant {
    pub tenant: String,
    pub section: crate::tenant_files::Section,
    pub id: String,
    pub definition: Option<serde_json::Value>,
}

impl Handler<EditTenant> for Supervisor {
    type Result = Result<ReloadOutcome, crate::tenant_files::EditError>;
    fn handle(&mut self, msg: EditTenant, ctx: &mut Context<Self>) -> Self::Result {
        use crate::tenant_files;
        const SOURCE: &str = "API";
        let refused = |problems: Vec<String>| ReloadOutcome {
            applied: false,
            source: SOURCE.into(),
            diff: None,
            problems,
        };
        if self.shutting_down {
            return Ok(refused(vec!["the service is shutting down".into()]));
        }
        let dir = self.settings.tenants_dir.clone();
        let edit = match &msg.definition {
            Some(definition) => {
                tenant_files::upsert(&dir, &msg.tenant, msg.section, &msg.id, definition)?
            }
            None => tenant_files::remove(&dir, &msg.tenant, msg.section, &msg.id)?,
        };
        // Nothing is written unless the whole configuration with the edit is valid.
        if let Err(e) = Settings::load_edited(&self.settings.path, &edit.file, &edit.new) {
            return Ok(refused(e.0.iter().map(|p| p.to_string()).collect()));
        }
        tenant_files::write(&edit)?;
        tracing::info!(
            tenant_id = %msg.tenant,
            file = %edit.file.display(),
            "{} {} `{}` by the API",
            if msg.definition.is_some() { "set" } else { "removed" },
            msg.section.key(),
            msg.id
        );
        let outcome = self.reload(SOURCE, ctx);
        let at = crate::outbound::rfc3339(time::OffsetDateTime::now_utc());
        self.last_reload = Some((at, outcome.clone()));
        Ok(outcome)
    }
}

/// The configuration in force (as reloaded) and the last reload that changed something or
/// was refused, with when it ran (the dashboard).
#[derive(Message, Debug)]
#[rtype(result = "(Arc<Settings>, Option<(String, ReloadOutcome)>)")]
pub struct LastReload;

impl Handler<LastReload> for Supervisor {
    type Result = MessageResult<LastReload>;
    fn handle(&mut self, _: LastReload, _: &mut Context<Self>) -> Self::Result {
        MessageResult((self.settings.clone(), self.last_reload.clone()))
    }
}

/// Adds a child at run time.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AddChild(pub ChildSpec);

impl Handler<AddChild> for Supervisor {
    type Result = ();
    fn handle(&mut self, msg: AddChild, ctx: &mut Context<Self>) {
        self.push_child(msg.0);
        self.tick(ctx);
    }
}

/// Graceful shutdown: stop taking work, let every child drain (up to `grace`), close the
/// AMQP connection. Resolves when done.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Shutdown {
    pub grace: Duration,
}

impl Handler<Shutdown> for Supervisor {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, msg: Shutdown, _: &mut Context<Self>) -> Self::Result {
        self.shutting_down = true;
        for c in &mut self.children {
            c.stopping = true;
        }
        // Consumers first: they finish their in-flight work, which needs the senders and the
        // outbox writer; then everything else.
        let consumers: Vec<_> = self
            .children
            .iter()
            .filter(|c| c.spec.consumer)
            .filter_map(|c| c.handle.as_ref().map(|h| h.drain()))
            .collect();
        let mut consumers = Box::pin(futures_util::future::join_all(consumers));
        let deadline = tokio::time::Instant::now() + msg.grace;
        let grace = msg.grace;
        Box::pin(
            async move {
                let in_time = tokio::time::timeout_at(deadline, &mut consumers)
                    .await
                    .is_ok();
                (in_time, consumers)
            }
            .into_actor(self)
            .then(move |(in_time, consumers), act, _| {
                if !in_time {
                    tracing::warn!(?grace, "in-flight work did not finish within the grace period; abandoning what has not reached a provider");
                    // The senders start nothing more and abandon the transactions that have
                    // not passed their final dot (their requests go back to the broker);
                    // those that have are answered and recorded `sent` first — else a
                    // restart would send them again.
                    for c in &act.children {
                        if let (Some(hook), Some(h)) = (&c.spec.on_abort, &c.handle) {
                            hook(h.as_any());
                        }
                    }
                }
                async move {
                    if !in_time {
                        // The pipelines now end quickly: give them the time to.
                        let _ = tokio::time::timeout(OVERDUE, consumers).await;
                    }
                }
                .into_actor(act)
            })
            .then(move |(), act, _| {
                let others: Vec<_> = act
                    .children
                    .iter()
                    .filter(|c| !c.spec.consumer)
                    .filter_map(|c| c.handle.as_ref().map(|h| h.drain()))
                    .collect();
                let conn = act.connection.take();
                let publisher = act.publisher.take();
                let pool = act.pool.clone();
                let me = act.settings.instance_id.clone();
                let migrated = act.migrated;
                let left = deadline
                    .saturating_duration_since(tokio::time::Instant::now())
                    .max(OVERDUE);
                async move {
                    if tokio::time::timeout(left, futures_util::future::join_all(others))
                        .await
                        .is_err()
                    {
                        tracing::warn!("some actors did not stop in time");
                    }
                    // The fetchers have stopped: their mailboxes go to the other instances
                    // at once.
                    if migrated {
                        match tokio::time::timeout(Duration::from_secs(5), leases::leave(&pool, &me))
                            .await
                        {
                            Ok(Ok(())) => tracing::info!("mailbox leases released"),
                            Ok(Err(e)) => tracing::warn!(error = %e, "mailbox leases not released; they expire on their own"),
                            Err(_) => tracing::warn!("mailbox leases not released in time; they expire on their own"),
                        }
                    }
                    if let Some(p) = publisher {
                        let _ = tokio::time::timeout(Duration::from_secs(5), p.close()).await;
                    }
                    if let Some(conn) = conn {
                        close_connection(&conn).await;
                    }
                }
                .into_actor(act)
            }),
        )
    }
}

/// Closes the connection with the broker's confirmation; a channel still closing makes the
/// close fail, so it is tried again shortly.
async fn close_connection(conn: &Connection) {
    let mut outcome = Err("not tried".to_string());
    for _ in 0..10 {
        outcome = match tokio::time::timeout(
            Duration::from_secs(5),
            conn.close(200, "shutting down".into()),
        )
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("the broker did not confirm the close within 5 s".into()),
        };
        if outcome.is_ok() || !conn.status().connected() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    match outcome {
        Ok(()) => tracing::info!("closed the AMQP connection"),
        Err(e) => tracing::warn!(error = %e, "closing the AMQP connection failed"),
    }
}

/// The running instance of a child, by name, when it is of type `A` and alive.
pub struct FindChild<A: Actor> {
    pub id: ChildId,
    _actor: std::marker::PhantomData<fn() -> A>,
}

impl<A: Actor> FindChild<A> {
    pub fn of(id: ChildId) -> Self {
        Self {
            id,
            _actor: std::marker::PhantomData,
        }
    }
}

impl<A: Actor> Message for FindChild<A> {
    type Result = Option<Addr<A>>;
}

impl<A> Handler<FindChild<A>> for Supervisor
where
    A: Actor<Context = Context<A>>,
{
    type Result = Option<Addr<A>>;

    fn handle(&mut self, msg: FindChild<A>, _: &mut Context<Self>) -> Option<Addr<A>> {
        self.children
            .iter()
            .find(|c| c.spec.id == msg.id)
            .and_then(|c| c.handle.as_ref())
            .filter(|h| h.alive())
            .and_then(|h| h.as_any().downcast_ref::<Addr<A>>().cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let max = Duration::from_secs(5);
        assert_eq!(backoff(0, max), Duration::from_millis(200));
        assert_eq!(backoff(1, max), Duration::from_millis(400));
        assert_eq!(backoff(4, max), Duration::from_millis(3200));
        assert_eq!(backoff(5, max), max);
        assert_eq!(backoff(40, max), max);
    }
}
