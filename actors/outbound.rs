//! The outbound consumer: takes requests from `email.send`, has them sent by their provider's
//! sender actor, records each step in the outbox and publishes a result.
//!
//! Every delivery runs its own pipeline concurrently (bounded by the channel's prefetch):
//! decode → validate → tenant/provider lookup → outbox `sending` (received, attempts + 1) →
//! fetch attachments → build → deliver → outbox `sent`/`failed` → result (publisher-confirmed)
//! → ack (then, not awaited, outbox "result published").
//! The outbox writes of concurrent pipelines are batched by the outbox writer and the result
//! confirms are awaited concurrently, so nothing is serialised message by message.
//!
//! Invariant: a delivery is acked only after its outcome is committed in the outbox and its
//! result is confirmed by the broker. When either cannot be done, the delivery is requeued
//! (after a pause), and the outbox — where a `sent` row is never sent again — makes the
//! redelivery safe.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use std::panic::AssertUnwindSafe;

use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use lapin::Channel;
use tokio::sync::oneshot;

use crate::actors::dlq::{DeadLetter, DeadLetterActor};
use crate::actors::metrics::{Count, MetricsActor};
use crate::actors::outbox::{Apply, OutboxWriter};
use crate::actors::retry::{retry_count, RetryScheduler, ScheduleRetry};
use crate::actors::sender::{Deliver, SendError, SenderActor};
use crate::actors::supervisor::{ChildContext, Drain, FindChild, SettingsChanged, Supervisor};
use crate::amqp::{confirm_channel, publish_confirmed};
use crate::domain::DeadLetterEntry;
use crate::fetch::AttachmentFetcher;
use crate::outbound::{
    build_email, decode_with_ids, rfc3339, FailureClass, ProviderResponse, RequestIds, SendRequest,
    SendResult,
};
use crate::outbox::{NewRow, OpOutcome, OutboxKey, OutboxOp, Received};
use crate::settings::Settings;

/// The names the supervisor knows the outbound pipeline's helpers by.
pub const OUTBOX_CHILD: &str = "outbox";
pub const RETRY_CHILD: &str = "retry";
pub const DLQ_CHILD: &str = "dlq";

/// A request delivered this many times without reaching an outcome is dead-lettered as
/// poison (the service crashed or was killed while processing it each time).
const MAX_DELIVERIES: i32 = 5;

/// The name the supervisor knows a provider's sender by.
pub fn sender_child(provider_id: &str) -> String {
    format!("sender:{provider_id}")
}

/// What happens to a delivery once its pipeline is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Disposition {
    Ack,
    /// The outcome could not be recorded or announced: give it back to the broker.
    Requeue,
}

/// Everything a pipeline needs; shared by the concurrent pipelines of one consumer.
struct Pipeline {
    /// Replaced on reload ([`SettingsChanged`]); read once per use.
    settings: std::sync::RwLock<Arc<Settings>>,
    writer: std::sync::Mutex<Option<Addr<OutboxWriter>>>,
    publisher: Channel,
    fetcher: AttachmentFetcher,
    supervisor: Addr<Supervisor>,
    metrics: Addr<MetricsActor>,
}

impl Pipeline {
    fn settings(&self) -> Arc<Settings> {
        self.settings
            .read()
            .map(|s| s.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// The outbox writer, remembered until it stops (then asked for again).
    async fn outbox_writer(&self) -> Option<Addr<OutboxWriter>> {
        if let Some(a) = self.writer.lock().ok().and_then(|w| w.clone()) {
            if a.connected() {
                return Some(a);
            }
        }
        let found = self.find::<OutboxWriter>(OUTBOX_CHILD).await;
        if let Ok(mut w) = self.writer.lock() {
            w.clone_from(&found);
        }
        found
    }

    async fn outbox(&self, op: OutboxOp) -> Option<OpOutcome> {
        let writer = self.outbox_writer().await?;
        match writer.send(Apply(op)).await {
            Ok(Ok(outcome)) => Some(outcome),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "outbox write failed");
                None
            }
            Err(_) => None,
        }
    }

    async fn publish_result(&self, result: &SendResult) -> bool {
        let body = match serde_json::to_vec(result) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a result");
                return false;
            }
        };
        let queue = self.settings().queues.result.clone();
        match publish_confirmed(&self.publisher, &queue, &body, None).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "result not confirmed");
                false
            }
        }
    }

    async fn find_sender(&self, provider_id: &str) -> Option<Addr<SenderActor>> {
        self.find::<SenderActor>(&sender_child(provider_id)).await
    }

    /// The whole life of one request. `retry` is the retry number it carries (0 at first).
    async fn handle(&self, body: &[u8], retry: u32) -> Disposition {
        let (decoded, ids) = decode_with_ids(body);
        let request = match decoded {
            Ok(r) => r,
            Err(e) => {
                let f = Failure::new(e.to_string(), FailureClass::Invalid);
                return self.on_failure(body, &ids, None, retry, f).await;
            }
        };
        let row = new_row(&request);
        let tenant_id = request.tenant_id.clone();
        let provider_id = request.provider_id.clone();
        let valid = match request.validate() {
            Ok(v) => v,
            Err(e) => {
                let f = Failure::new(e.to_string(), FailureClass::Invalid);
                return self.receive_then_fail(body, &ids, row, retry, f).await;
            }
        };
        let Some(row) = row else {
            unreachable!("a valid request has non-empty ids");
        };
        let Some(provider) = self.settings().provider(&tenant_id, &provider_id).cloned() else {
            let reason = self.unknown_provider_reason(&tenant_id, &provider_id);
            let f = Failure::new(reason, FailureClass::Permanent);
            return self
                .receive_then_fail(body, &ids, Some(row), retry, f)
                .await;
        };
        let key = row.key.clone();

        let received = match self
            .outbox(OutboxOp::Receive(NewRow {
                sending: true,
                ..row
            }))
            .await
        {
            Some(OpOutcome::Received(r)) => r,
            _ => return Disposition::Requeue,
        };
        if received.status == "sent" {
            return self.already_sent(&key, &provider.name, &received).await;
        }
        if received.deliveries > MAX_DELIVERIES {
            let f = Failure::new(
                format!(
                    "delivered {} times without reaching an outcome (the service stopped or failed while processing it); dead-lettered so it does not loop",
                    received.deliveries
                ),
                FailureClass::Permanent,
            );
            return self.on_failure(body, &ids, Some(&key), retry, f).await;
        }

        let attachments = match self.fetcher.fetch_all(&valid.request.attachments).await {
            Ok(a) => a,
            Err(e) => {
                let f = Failure::new(e.to_string(), e.class());
                return self.on_failure(body, &ids, Some(&key), retry, f).await;
            }
        };
        let email = match build_email(&valid, attachments) {
            Ok(e) => Arc::new(e),
            Err(e) => {
                let f = Failure::new(e.to_string(), FailureClass::Invalid);
                return self.on_failure(body, &ids, Some(&key), retry, f).await;
            }
        };

        let sent = match self.find_sender(&provider_id).await {
            Some(sender) => sender
                .send(Deliver {
                    email: email.clone(),
                    tenant_id: tenant_id.clone(),
                })
                .await
                .unwrap_or(Err(SendError::Unavailable)),
            None => Err(SendError::Unavailable),
        };
        let accepted = match sent {
            Ok(a) => a,
            Err(e) => {
                let f = Failure {
                    error: e.to_string(),
                    class: e.class(),
                    last_reply: e.last_reply(),
                };
                return self.on_failure(body, &ids, Some(&key), retry, f).await;
            }
        };

        let committed = self
            .outbox(OutboxOp::Sent {
                key: key.clone(),
                provider_message_id: accepted.provider_message_id.clone(),
                rfc_message_id: email.rfc_message_id.clone(),
                sent_at: accepted.sent_at,
            })
            .await;
        if committed.is_none() {
            tracing::error!(tenant = %key.tenant_id, message_id = %key.message_id,
                "sent, but the outbox could not record it; the request is requeued and may be sent again");
            return Disposition::Requeue;
        }
        self.metrics.do_send(Count::one(
            "mailbridge_emails_sent_total",
            vec![
                ("tenant", tenant_id.clone()),
                ("provider", provider_id.clone()),
            ],
        ));
        let result = SendResult::sent(
            &key.tenant_id,
            &key.message_id,
            ProviderResponse {
                provider_name: provider.name.clone(),
                provider_message_id: accepted.provider_message_id,
                sent_at: rfc3339(accepted.sent_at),
            },
        );
        self.announce(&key, &result).await
    }

    /// Publishes a result and, once confirmed, remembers that it was published.
    async fn announce(&self, key: &OutboxKey, result: &SendResult) -> Disposition {
        if !self.publish_result(result).await {
            return Disposition::Requeue;
        }
        // Not awaited on the ack path: if this is lost, a redelivery could only repeat a result.
        if let Some(writer) = self.outbox_writer().await {
            writer.do_send(Apply(OutboxOp::ResultPublished(key.clone())));
        }
        Disposition::Ack
    }

    /// A redelivered request whose email is already sent: not sent again. Its result is
    /// published only if the first delivery did not get that far.
    async fn already_sent(
        &self,
        key: &OutboxKey,
        provider_name: &str,
        row: &Received,
    ) -> Disposition {
        tracing::info!(tenant = %key.tenant_id, message_id = %key.message_id,
            "already sent; not sending again");
        if row.result_published {
            return Disposition::Ack;
        }
        let result = SendResult::sent(
            &key.tenant_id,
            &key.message_id,
            ProviderResponse {
                provider_name: provider_name.to_string(),
                provider_message_id: row.provider_message_id.clone().unwrap_or_default(),
                sent_at: row.sent_at.map(rfc3339).unwrap_or_default(),
            },
        );
        self.announce(key, &result).await
    }

    fn unknown_provider_reason(&self, tenant_id: &str, provider_id: &str) -> String {
        let settings = self.settings();
        let tenant_known = settings.tenants.iter().any(|t| t.id == tenant_id);
        let elsewhere = settings
            .tenants
            .iter()
            .any(|t| t.id != tenant_id && t.providers.iter().any(|p| p.id == provider_id));
        if elsewhere {
            format!("provider `{provider_id}` does not belong to tenant `{tenant_id}`")
        } else if !tenant_known {
            format!("unknown tenant `{tenant_id}`: no tenant file declares it")
        } else {
            format!("unknown provider `{provider_id}` for tenant `{tenant_id}`")
        }
    }

    /// A failure found before the outbox row was written: write it (so the CRM can see the
    /// request and its error there), unless the same ids were already sent.
    async fn receive_then_fail(
        &self,
        body: &[u8],
        ids: &RequestIds,
        row: Option<NewRow>,
        retry: u32,
        failure: Failure,
    ) -> Disposition {
        let Some(row) = row else {
            return self.on_failure(body, ids, None, retry, failure).await;
        };
        let key = row.key.clone();
        match self.outbox(OutboxOp::Receive(row)).await {
            // The same ids were sent before: this delivery is a duplicate, not a new request.
            Some(OpOutcome::Received(r)) if r.status == "sent" => Disposition::Ack,
            Some(_) => self.on_failure(body, ids, Some(&key), retry, failure).await,
            None => Disposition::Requeue,
        }
    }

    /// Every failure ends here: a transient one with retries left is scheduled again; any
    /// other is dead-lettered with a terminal `failed` result.
    async fn on_failure(
        &self,
        body: &[u8],
        ids: &RequestIds,
        key: Option<&OutboxKey>,
        retry: u32,
        failure: Failure,
    ) -> Disposition {
        let tenant = key
            .map(|k| k.tenant_id.clone())
            .or_else(|| ids.tenant_id.clone())
            .unwrap_or_default();
        let provider = ids.provider_id.clone().unwrap_or_default();
        let message_id = key
            .map(|k| k.message_id.clone())
            .or_else(|| ids.message_id.clone());
        self.metrics.do_send(Count::one(
            "mailbridge_emails_failed_total",
            vec![
                ("class", failure.class.as_str().into()),
                ("tenant", tenant.clone()),
                ("provider", provider.clone()),
            ],
        ));
        let ids = RequestIds {
            tenant_id: key
                .map(|k| k.tenant_id.clone())
                .or_else(|| ids.tenant_id.clone()),
            message_id: message_id.clone(),
            provider_id: ids.provider_id.clone(),
        };
        let max_retries = self.settings().retry.max_retries;
        tracing::warn!(tenant = %tenant, message_id = message_id.as_deref().unwrap_or(""),
            class = %failure.class, retry, reply = failure.last_reply.as_deref().unwrap_or(""),
            "send failed: {}", failure.error);

        if failure.class == FailureClass::Transient && retry < max_retries {
            let next = retry + 1;
            let delay = self.settings().retry_delay(next);
            if let Some(key) = key {
                let op = OutboxOp::Failed {
                    key: key.clone(),
                    status: "retrying",
                    error: failure.error.clone(),
                };
                if self.outbox(op).await.is_none() {
                    return Disposition::Requeue;
                }
            }
            let Some(scheduler) = self.find::<RetryScheduler>(RETRY_CHILD).await else {
                return Disposition::Requeue;
            };
            let scheduled = scheduler
                .send(ScheduleRetry {
                    body: body.to_vec(),
                    retry: next,
                    delay,
                })
                .await;
            if !matches!(scheduled, Ok(Ok(()))) {
                tracing::warn!(?scheduled, "could not schedule a retry; requeueing");
                return Disposition::Requeue;
            }
            self.metrics.do_send(Count::one(
                "mailbridge_retries_total",
                vec![("tenant", tenant), ("provider", provider)],
            ));
            let next_at = time::OffsetDateTime::now_utc() + delay;
            let result =
                SendResult::retrying(&ids, failure.error, next, max_retries, rfc3339(next_at));
            // The retry is parked durably; a lost notice must not make the request run twice.
            if !self.publish_result(&result).await {
                tracing::warn!("the retrying notice was not confirmed");
            }
            return Disposition::Ack;
        }

        if let Some(key) = key {
            let op = OutboxOp::Failed {
                key: key.clone(),
                status: "failed",
                error: failure.error.clone(),
            };
            if self.outbox(op).await.is_none() {
                return Disposition::Requeue;
            }
        }
        let entry = DeadLetterEntry {
            tenant_id: ids.tenant_id.clone(),
            message_id: ids.message_id.clone(),
            retry_count: retry,
            last_reply: failure.last_reply.clone(),
            ..DeadLetterEntry::for_body(
                body,
                failure.error.clone(),
                failure.class.as_str(),
                rfc3339(time::OffsetDateTime::now_utc()),
            )
        };
        let Some(dlq) = self.find::<DeadLetterActor>(DLQ_CHILD).await else {
            return Disposition::Requeue;
        };
        let queued = dlq
            .send(DeadLetter {
                queue: self.settings().queues.send_dlq(),
                entry,
            })
            .await;
        if !matches!(queued, Ok(Ok(()))) {
            tracing::warn!(?queued, "could not dead-letter a request; requeueing");
            return Disposition::Requeue;
        }
        let result = SendResult::failed(&ids, failure.error, failure.class, retry, max_retries);
        match key {
            Some(key) => self.announce(key, &result).await,
            None if self.publish_result(&result).await => Disposition::Ack,
            None => Disposition::Requeue,
        }
    }

    /// A sibling actor by name, waiting briefly for one that is being restarted.
    async fn find<A>(&self, name: &str) -> Option<Addr<A>>
    where
        A: Actor<Context = Context<A>>,
    {
        for _ in 0..25 {
            if let Ok(Some(addr)) = self.supervisor.send(FindChild::<A>::named(name)).await {
                return Some(addr);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        None
    }
}

/// What went wrong with a request, and whether trying again can help.
struct Failure {
    error: String,
    class: FailureClass,
    last_reply: Option<String>,
}

impl Failure {
    fn new(error: String, class: FailureClass) -> Self {
        Self {
            error,
            class,
            last_reply: None,
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

fn new_row(r: &SendRequest) -> Option<NewRow> {
    let usable =
        |s: &str| !s.trim().is_empty() && s.len() <= 255 && !s.contains(['\r', '\n', '\0']);
    if !usable(&r.tenant_id) || !usable(&r.message_id) {
        return None;
    }
    Some(NewRow {
        key: OutboxKey {
            tenant_id: r.tenant_id.clone(),
            message_id: r.message_id.clone(),
        },
        provider_id: r.provider_id.clone(),
        user_id: r.user_id.clone(),
        template_id: r.template_id.clone(),
        campaign_id: r.campaign_id.clone(),
        rfc_message_id: None,
        sending: false,
    })
}

pub struct OutboundConsumer {
    child: ChildContext,
    pipeline: Option<Arc<Pipeline>>,
    channel: Option<Channel>,
    tag: String,
    in_flight: usize,
    stopping: bool,
    closing: bool,
    draining: Vec<oneshot::Sender<()>>,
    /// Delivery tags not settled yet (in processing, or waiting to be requeued).
    unsettled: std::collections::BTreeSet<u64>,
    /// Tags whose outcome is committed and confirmed, not yet acknowledged to the broker.
    done: std::collections::BTreeSet<u64>,
    /// An ack is on its way: acks go out one at a time, in order.
    acking: bool,
}

impl OutboundConsumer {
    pub fn new(child: ChildContext) -> Self {
        Self {
            child,
            pipeline: None,
            channel: None,
            tag: format!("mailbridge-outbound-{}", std::process::id()),
            in_flight: 0,
            stopping: false,
            closing: false,
            draining: Vec::new(),
            unsettled: Default::default(),
            done: Default::default(),
            acking: false,
        }
    }

    /// Acknowledges, with one `multiple` ack, every finished delivery below the oldest one
    /// still unsettled. Same guarantee as one ack each (nothing is acked before its outcome is
    /// committed and confirmed), at a fraction of the frames.
    fn flush_acks(&mut self, ctx: &mut Context<Self>) {
        if self.acking {
            return;
        }
        let low = self.unsettled.first().copied().unwrap_or(u64::MAX);
        let Some(upto) = self.done.range(..low).next_back().copied() else {
            self.maybe_stop(ctx);
            return;
        };
        self.done = self.done.split_off(&(upto + 1));
        let Some(ch) = self.channel.clone() else {
            return;
        };
        self.acking = true;
        ctx.spawn(
            async move {
                ch.basic_ack(
                    upto,
                    BasicAckOptions {
                        multiple: true,
                    },
                )
                .await
            }
            .into_actor(self)
            .map(|res, act, ctx| {
                if let Err(e) = res {
                    // The channel is gone: the broker redelivers what was not acked.
                    tracing::warn!(error = %e, "could not acknowledge deliveries; the broker will redeliver them");
                }
                act.acking = false;
                act.flush_acks(ctx);
            }),
        );
    }

    fn settled(&mut self, tag: u64, disposition: Disposition, ctx: &mut Context<Self>) {
        match disposition {
            Disposition::Ack => {
                self.unsettled.remove(&tag);
                self.done.insert(tag);
                self.flush_acks(ctx);
            }
            Disposition::Requeue => {
                // Stays unsettled (so no multiple-ack covers it) until the nack is out; the
                // pause keeps an outage of the database or broker from being a hot loop.
                let ch = self.channel.clone();
                ctx.spawn(
                    async move {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        if let Some(ch) = ch {
                            let _ = ch
                                .basic_nack(
                                    tag,
                                    BasicNackOptions {
                                        requeue: true,
                                        multiple: false,
                                    },
                                )
                                .await;
                        }
                    }
                    .into_actor(self)
                    .map(move |_, act, ctx| {
                        act.unsettled.remove(&tag);
                        act.flush_acks(ctx);
                    }),
                );
            }
        }
    }

    /// Once stopping and nothing is in flight: close the channels cleanly, then stop.
    fn maybe_stop(&mut self, ctx: &mut Context<Self>) {
        let unsettled = !self.unsettled.is_empty() || !self.done.is_empty() || self.acking;
        if !self.stopping || self.in_flight > 0 || unsettled || self.closing {
            return;
        }
        self.closing = true;
        let channels: Vec<Channel> = self
            .channel
            .take()
            .into_iter()
            .chain(self.pipeline.take().map(|p| p.publisher.clone()))
            .collect();
        ctx.wait(
            async move {
                for ch in channels {
                    if ch.status().connected() {
                        let _ = ch.close(200, "OK".into()).await;
                    }
                }
            }
            .into_actor(self)
            .map(|_, act, ctx| {
                for d in act.draining.drain(..) {
                    let _ = d.send(());
                }
                ctx.stop();
            }),
        );
    }
}

#[derive(Debug, thiserror::Error)]
enum SetupError {
    #[error("no AMQP connection")]
    NoConnection,
    #[error("AMQP: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("attachment client: {0}")]
    Http(String),
    #[error("AMQP channel: {0}")]
    Channel(String),
}

impl Actor for OutboundConsumer {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let conn = self.child.connection.clone();
        let settings = self.child.settings.clone();
        let tag = self.tag.clone();
        ctx.wait(
            async move {
                let conn = conn.ok_or(SetupError::NoConnection)?;
                let fetcher = AttachmentFetcher::new(&settings.outbound).map_err(SetupError::Http)?;
                let publisher = confirm_channel(Some(&conn)).await.map_err(SetupError::Channel)?;
                let channel = conn.create_channel().await?;
                channel
                    .basic_qos(settings.rabbitmq.prefetch, BasicQosOptions::default())
                    .await?;
                let consumer = channel
                    .basic_consume(
                        settings.queues.send.as_str().into(),
                        tag.as_str().into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
                Ok::<_, SetupError>((channel, publisher, fetcher, consumer))
            }
            .into_actor(self)
            .map(|res, act, ctx| match res {
                Ok((channel, publisher, fetcher, consumer)) => {
                    tracing::info!(queue = %act.child.settings.queues.send, "consuming send requests");
                    act.pipeline = Some(Arc::new(Pipeline {
                        settings: std::sync::RwLock::new(act.child.settings.clone()),
                        writer: std::sync::Mutex::new(None),
                        publisher,
                        fetcher,
                        supervisor: act.child.supervisor.clone(),
                        metrics: act.child.metrics.clone(),
                    }));
                    act.channel = Some(channel);
                    ctx.add_stream(consumer.map(|d| d.map_err(|e| e.to_string())));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start consuming send requests");
                    ctx.stop();
                }
            }),
        );
    }
}

impl StreamHandler<Result<Delivery, String>> for OutboundConsumer {
    fn handle(&mut self, item: Result<Delivery, String>, ctx: &mut Context<Self>) {
        let delivery = match item {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "the send queue consumer failed");
                return;
            }
        };
        let Some(pipeline) = self.pipeline.clone() else {
            return;
        };
        self.in_flight += 1;
        self.unsettled.insert(delivery.delivery_tag);
        ctx.spawn(
            async move {
                let retry = retry_count(&delivery.properties);
                let body = &delivery.data;
                let disposition = match AssertUnwindSafe(pipeline.handle(body, retry))
                    .catch_unwind()
                    .await
                {
                    Ok(d) => d,
                    Err(panic) => {
                        // A request that makes the handler panic would panic again: dead-letter
                        // it now instead of letting it loop.
                        let what = panic_message(panic.as_ref());
                        tracing::error!("processing a request panicked: {what}");
                        let ids = RequestIds::peek(body);
                        let key = match (&ids.tenant_id, &ids.message_id) {
                            (Some(t), Some(m)) => Some(OutboxKey {
                                tenant_id: t.clone(),
                                message_id: m.clone(),
                            }),
                            _ => None,
                        };
                        let failure = Failure::new(
                            format!("the service failed unexpectedly while processing this request ({what}); dead-lettered so that it cannot loop"),
                            FailureClass::Permanent,
                        );
                        AssertUnwindSafe(pipeline.on_failure(body, &ids, key.as_ref(), retry, failure))
                            .catch_unwind()
                            .await
                            .unwrap_or(Disposition::Requeue)
                    }
                };
                (delivery.delivery_tag, disposition)
            }
            .into_actor(self)
            .map(|(tag, disposition), act, ctx| {
                act.in_flight -= 1;
                act.settled(tag, disposition, ctx);
                act.maybe_stop(ctx);
            }),
        );
    }

    fn finished(&mut self, ctx: &mut Context<Self>) {
        // The consumer was cancelled or its channel closed: finish what is in flight, then
        // stop (the supervisor starts a new consumer when the connection allows).
        if !self.stopping {
            tracing::warn!("the send queue consumer ended");
        }
        self.stopping = true;
        self.maybe_stop(ctx);
    }
}

impl Handler<SettingsChanged> for OutboundConsumer {
    type Result = ();
    fn handle(&mut self, msg: SettingsChanged, _: &mut Context<Self>) {
        if let Some(p) = &self.pipeline {
            if let Ok(mut s) = p.settings.write() {
                *s = msg.0.clone();
            }
        }
        self.child.settings = msg.0;
    }
}

impl Handler<Drain> for OutboundConsumer {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: Drain, ctx: &mut Context<Self>) -> Self::Result {
        self.stopping = true;
        let (tx, rx) = oneshot::channel();
        self.draining.push(tx);
        if let Some(ch) = self.channel.clone() {
            let tag = self.tag.clone();
            actix::spawn(async move {
                let _ = ch
                    .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                    .await;
            });
        }
        self.maybe_stop(ctx);
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}
