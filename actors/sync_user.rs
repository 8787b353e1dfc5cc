//! The `email.sync.user` consumer: a request makes every mailbox of that tenant, provider and
//! user sync now, whatever its poll interval. A request naming nothing known, or not decodable,
//! is logged with its reason and counted (`mailbridge_sync_requests_total{outcome}`); every
//! request is acknowledged, since there is nothing to retry.

use actix::prelude::*;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::Channel;
use serde::Deserialize;

use crate::actors::fetcher::{MailboxFetcher, SyncNow};
use crate::actors::metrics::{metric_tenant, Count};
use crate::actors::supervisor::{
    backoff, ChildContext, ChildId, Drain, FindChild, SettingsChanged, Supervisor,
};
use crate::storage::StorageError;

/// The guide's `email.sync.user` message.
#[derive(Debug, Deserialize)]
pub struct SyncUserRequest {
    pub tenant_id: String,
    pub provider_id: String,
    pub user_id: String,
    #[serde(default)]
    pub sync_type: Option<String>,
    #[serde(default)]
    pub timestamp: Option<String>,
}

pub struct SyncUserConsumer {
    child: ChildContext,
    channel: Option<Channel>,
    tag: String,
}

impl SyncUserConsumer {
    pub fn new(child: ChildContext) -> Self {
        Self {
            child,
            channel: None,
            tag: format!("mailbridge-sync-{}", std::process::id()),
        }
    }

    /// Counts a request; its tenant label only when the configuration knows the tenant (a
    /// request's made-up ids must not grow `/metrics`).
    fn count(&self, outcome: &str, tenant: Option<&str>) {
        self.child.metrics.do_send(Count::one(
            "mailbridge_sync_requests_total",
            vec![
                ("outcome", outcome.into()),
                ("tenant", metric_tenant(&self.child.settings, tenant)),
            ],
        ));
    }
}

impl Actor for SyncUserConsumer {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let conn = self.child.connection.clone();
        let queue = self.child.settings.queues.sync_user.clone();
        let tag = self.tag.clone();
        ctx.wait(
            async move {
                let conn = conn.ok_or_else(|| "no AMQP connection".to_string())?;
                let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
                ch.basic_qos(32, BasicQosOptions::default())
                    .await
                    .map_err(|e| e.to_string())?;
                let consumer = ch
                    .basic_consume(
                        queue.as_str().into(),
                        tag.as_str().into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>((ch, consumer))
            }
            .into_actor(self)
            .map(|res, act, ctx| match res {
                Ok((ch, consumer)) => {
                    act.channel = Some(ch);
                    ctx.add_stream(consumer.map(|d| d.map_err(|e| e.to_string())));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot consume sync requests");
                    ctx.stop();
                }
            }),
        );
    }
}

impl StreamHandler<Result<Delivery, String>> for SyncUserConsumer {
    fn handle(&mut self, item: Result<Delivery, String>, ctx: &mut Context<Self>) {
        let Ok(delivery) = item else {
            return;
        };
        let request: Result<SyncUserRequest, _> = serde_json::from_slice(&delivery.data);
        let mut targets = Vec::new();
        match &request {
            Err(e) => {
                tracing::warn!(error = %e, "sync request refused: not the guide's format");
                self.count("invalid", None);
            }
            Ok(r) => {
                targets = self
                    .child
                    .settings
                    .tenants
                    .iter()
                    .filter(|t| t.id == r.tenant_id)
                    .flat_map(|t| &t.mailboxes)
                    .filter(|m| m.provider_id == r.provider_id && m.user_id == r.user_id)
                    .map(|m| m.id.clone())
                    .collect();
                if targets.is_empty() {
                    tracing::warn!(tenant_id = %r.tenant_id, provider_id = %r.provider_id, user = %r.user_id,
                        "sync request matches no configured mailbox (tenant, provider and user must all match)");
                    self.count("unmatched", Some(&r.tenant_id));
                } else {
                    tracing::info!(tenant_id = %r.tenant_id, user = %r.user_id, mailboxes = targets.len(), "sync requested");
                    self.count("triggered", Some(&r.tenant_id));
                }
            }
        }
        let supervisor = self.child.supervisor.clone();
        let pool = self.child.pool.clone();
        ctx.spawn(
            async move {
                let mut elsewhere = Vec::new();
                for id in targets {
                    // Fetched by another instance (or by none right now): the owner hears
                    // of it through PostgreSQL.
                    if !wake(&supervisor, &id).await {
                        elsewhere.push(id);
                    }
                }
                if !elsewhere.is_empty() {
                    if let Err(e) = notify_sync(&pool, &elsewhere).await {
                        tracing::warn!(error = %e, mailboxes = elsewhere.len(),
                            "sync request not passed on to the instances owning its mailboxes");
                    }
                }
                let _ = delivery.acker.ack(BasicAckOptions::default()).await;
            }
            .into_actor(self),
        );
    }

    fn finished(&mut self, ctx: &mut Context<Self>) {
        // Cancelled by a drain: the drain closes the channel and stops the actor (stopping
        // here would drop the drain before the channel is closed). Otherwise the broker
        // cancelled the consumer or closed the channel: stop, and be restarted.
        if !self.draining() {
            tracing::warn!("the sync request consumer ended");
            ctx.stop();
        }
    }
}

/// Tells mailbox `id`'s fetcher to sync now; false when it does not run here.
async fn wake(supervisor: &Addr<Supervisor>, id: &str) -> bool {
    match supervisor
        .send(FindChild::<MailboxFetcher>::of(ChildId::Mailbox(
            id.to_string(),
        )))
        .await
    {
        Ok(Some(fetcher)) => {
            fetcher.do_send(SyncNow);
            true
        }
        _ => false,
    }
}

/// The PostgreSQL channel on which sync requests reach the instance owning the mailbox.
pub const SYNC_CHANNEL: &str = "mailbridge.sync";

/// Tells every instance (through `NOTIFY`) to sync these mailboxes if it owns them.
async fn notify_sync(
    pool: &deadpool_postgres::Pool,
    mailboxes: &[String],
) -> Result<(), StorageError> {
    let client = pool.get().await?;
    client
        .execute(
            "SELECT pg_notify($1, m) FROM unnest($2::text[]) AS m",
            &[&SYNC_CHANNEL, &mailboxes],
        )
        .await?;
    Ok(())
}

/// Listens for sync requests other instances pass on ([`SYNC_CHANNEL`]) and wakes the
/// fetcher of each mailbox this instance owns. Reconnects by itself.
pub struct SyncListener {
    child: ChildContext,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl SyncListener {
    pub fn new(child: ChildContext) -> Self {
        Self { child, stop: None }
    }
}

impl Actor for SyncListener {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel();
        self.stop = Some(stop_tx);
        let db = self.child.settings.database.clone();
        let supervisor = self.child.supervisor.clone();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        ctx.spawn(
            async move {
                let listener = async {
                    let mut attempt = 0;
                    loop {
                        let started = std::time::Instant::now();
                        if let Err(e) = crate::storage::listen(&db, SYNC_CHANNEL, tx.clone()).await {
                            tracing::warn!(error = %e, "not listening for sync requests of other instances; retrying");
                        }
                        if started.elapsed() > std::time::Duration::from_secs(60) {
                            attempt = 0;
                        }
                        tokio::time::sleep(backoff(attempt, std::time::Duration::from_secs(10))).await;
                        attempt += 1;
                    }
                };
                let wake = async {
                    while let Some(id) = rx.recv().await {
                        if wake(&supervisor, &id).await {
                            tracing::info!(mailbox_id = %id, "sync requested through another instance");
                        }
                    }
                };
                tokio::select! {
                    _ = listener => {}
                    _ = wake => {}
                    _ = &mut stop_rx => {}
                }
            }
            .into_actor(self)
            .map(|_, _, ctx| ctx.stop()),
        );
    }
}

impl Handler<Drain> for SyncListener {
    type Result = ();

    fn handle(&mut self, _: Drain, ctx: &mut Context<Self>) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        ctx.stop();
    }
}

impl SyncUserConsumer {
    /// Whether a drain is closing the channel (the consumer stream ending then is expected).
    fn draining(&self) -> bool {
        self.channel.is_none()
    }
}

impl Handler<SettingsChanged> for SyncUserConsumer {
    type Result = ();
    fn handle(&mut self, msg: SettingsChanged, _: &mut Context<Self>) {
        self.child.settings = msg.0;
    }
}

impl Handler<Drain> for SyncUserConsumer {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _: Drain, _: &mut Context<Self>) -> Self::Result {
        let channel = self.channel.take();
        let tag = self.tag.clone();
        Box::pin(
            async move {
                if let Some(ch) = channel {
                    let _ = ch
                        .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                        .await;
                    let _ = ch.close(200, "OK".into()).await;
                }
            }
            .into_actor(self)
            .map(|_, _, ctx| ctx.stop()),
        )
    }
}
