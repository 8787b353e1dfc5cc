//! The outbound consumer: takes requests from `email.send`, has them sent by their provider's
//! sender actor, records each step in the outbox and publishes a result.
//!
//! Every delivery runs its own pipeline concurrently (bounded by the channel's prefetch):
//! decode → validate → tenant/provider lookup → outbox `queued` → fetch attachments → build →
//! outbox `sending` → deliver → outbox `sent`/`failed` → result (publisher-confirmed) → ack.
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
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};
use tokio::sync::oneshot;

use crate::actors::metrics::{Count, MetricsActor};
use crate::actors::outbox::{Apply, OutboxWriter};
use crate::actors::sender::{Deliver, SendError, SenderActor};
use crate::actors::supervisor::{ChildContext, Drain, FindChild, Supervisor};
use crate::fetch::AttachmentFetcher;
use crate::outbound::{
    build_email, decode, rfc3339, FailureClass, ProviderResponse, RequestIds, SendRequest,
    SendResult,
};
use crate::outbox::{NewRow, OpOutcome, OutboxKey, OutboxOp, Received};
use crate::settings::Settings;

/// The name the supervisor knows the outbox writer by.
pub const OUTBOX_CHILD: &str = "outbox";

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
    settings: Arc<Settings>,
    publisher: Channel,
    fetcher: AttachmentFetcher,
    supervisor: Addr<Supervisor>,
    metrics: Addr<MetricsActor>,
}

impl Pipeline {
    async fn outbox(&self, op: OutboxOp) -> Option<OpOutcome> {
        let writer = self
            .supervisor
            .send(FindChild::<OutboxWriter>::named(OUTBOX_CHILD))
            .await
            .ok()
            .flatten()?;
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
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into());
        let confirm = self
            .publisher
            .basic_publish(
                "".into(),
                self.settings.queues.result.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                props,
            )
            .await;
        match confirm {
            Ok(pending) => match pending.await {
                Ok(c) if !c.is_nack() => true,
                Ok(_) => {
                    tracing::warn!("the broker refused a result (nack)");
                    false
                }
                Err(e) => {
                    tracing::warn!(error = %e, "result not confirmed");
                    false
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot publish a result");
                false
            }
        }
    }

    async fn find_sender(&self, provider_id: &str) -> Option<Addr<SenderActor>> {
        // A sender that is being restarted comes back within a few hundred milliseconds.
        for _ in 0..25 {
            if let Ok(Some(addr)) = self
                .supervisor
                .send(FindChild::<SenderActor>::named(sender_child(provider_id)))
                .await
            {
                return Some(addr);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        None
    }

    /// The whole life of one request.
    async fn handle(&self, body: &[u8]) -> Disposition {
        let ids = RequestIds::peek(body);
        let request = match decode(body) {
            Ok(r) => r,
            Err(e) => {
                return self
                    .fail(&ids, None, e.to_string(), FailureClass::Invalid, None)
                    .await
            }
        };
        let row = new_row(&request);
        let tenant_id = request.tenant_id.clone();
        let provider_id = request.provider_id.clone();
        let valid = match request.validate() {
            Ok(v) => v,
            Err(e) => {
                return self
                    .fail(&ids, row, e.to_string(), FailureClass::Invalid, None)
                    .await
            }
        };
        let Some(row) = row else {
            unreachable!("a valid request has non-empty ids");
        };
        let Some(provider) = self.settings.provider(&tenant_id, &provider_id).cloned() else {
            let reason = self.unknown_provider_reason(&tenant_id, &provider_id);
            return self
                .fail(&ids, Some(row), reason, FailureClass::Permanent, None)
                .await;
        };
        let key = row.key.clone();

        let received = match self.outbox(OutboxOp::Receive(row)).await {
            Some(OpOutcome::Received(r)) => r,
            _ => return Disposition::Requeue,
        };
        if received.status == "sent" {
            return self.already_sent(&key, &provider.name, &received).await;
        }

        let attachments = match self.fetcher.fetch_all(&valid.request.attachments).await {
            Ok(a) => a,
            Err(e) => {
                let class = e.class();
                return self.fail_row(&ids, &key, e.to_string(), class, None).await;
            }
        };
        let email = match build_email(&valid, attachments) {
            Ok(e) => Arc::new(e),
            Err(e) => {
                return self
                    .fail_row(&ids, &key, e.to_string(), FailureClass::Invalid, None)
                    .await
            }
        };

        if self.outbox(OutboxOp::Sending(key.clone())).await.is_none() {
            return Disposition::Requeue;
        }
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
                let class = e.class();
                let reply = e.last_reply();
                self.metrics.do_send(Count::one(
                    "mailbridge_emails_failed_total",
                    vec![
                        ("class", class.as_str().into()),
                        ("tenant", tenant_id.clone()),
                        ("provider", provider_id.clone()),
                    ],
                ));
                return self.fail_row(&ids, &key, e.to_string(), class, reply).await;
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
        let this_key = key.clone();
        if let Ok(Some(writer)) = self
            .supervisor
            .send(FindChild::<OutboxWriter>::named(OUTBOX_CHILD))
            .await
        {
            writer.do_send(Apply(OutboxOp::ResultPublished(this_key)));
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
        let tenant_known = self.settings.tenants.iter().any(|t| t.id == tenant_id);
        let elsewhere = self
            .settings
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

    /// A failure before the row exists (or without one): record what can be recorded, then
    /// publish a terminal `failed` result.
    async fn fail(
        &self,
        ids: &RequestIds,
        row: Option<NewRow>,
        error: String,
        class: FailureClass,
        last_reply: Option<String>,
    ) -> Disposition {
        match row {
            Some(row) => {
                let key = row.key.clone();
                match self.outbox(OutboxOp::Receive(row)).await {
                    Some(OpOutcome::Received(r)) if r.status == "sent" => {
                        // The same ids were sent before; this delivery is a duplicate.
                        return Disposition::Ack;
                    }
                    Some(_) => {}
                    None => return Disposition::Requeue,
                }
                self.fail_row(ids, &key, error, class, last_reply).await
            }
            None => {
                tracing::warn!(%error, "refused a request that has no usable ids");
                self.count_failure(ids, class);
                let result =
                    SendResult::failed(ids, error, class, 0, self.settings.retry.max_retries);
                if self.publish_result(&result).await {
                    Disposition::Ack
                } else {
                    Disposition::Requeue
                }
            }
        }
    }

    fn count_failure(&self, ids: &RequestIds, class: FailureClass) {
        if class == FailureClass::Invalid {
            self.metrics.do_send(Count::one(
                "mailbridge_emails_failed_total",
                vec![
                    ("class", class.as_str().into()),
                    ("tenant", ids.tenant_id.clone().unwrap_or_default()),
                    ("provider", ids.provider_id.clone().unwrap_or_default()),
                ],
            ));
        }
    }

    /// A failure of a request whose outbox row exists: `failed`, then the result.
    async fn fail_row(
        &self,
        ids: &RequestIds,
        key: &OutboxKey,
        error: String,
        class: FailureClass,
        last_reply: Option<String>,
    ) -> Disposition {
        tracing::warn!(tenant = %key.tenant_id, message_id = %key.message_id, %class,
            reply = last_reply.as_deref().unwrap_or(""), "send failed: {error}");
        self.count_failure(ids, class);
        if self
            .outbox(OutboxOp::Failed {
                key: key.clone(),
                status: "failed",
                error: error.clone(),
            })
            .await
            .is_none()
        {
            return Disposition::Requeue;
        }
        let ids = RequestIds {
            tenant_id: Some(key.tenant_id.clone()),
            message_id: Some(key.message_id.clone()),
            provider_id: ids.provider_id.clone(),
        };
        let result = SendResult::failed(&ids, error, class, 0, self.settings.retry.max_retries);
        self.announce(key, &result).await
    }
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
    })
}

async fn settle(delivery: Delivery, disposition: Disposition) {
    let result = match disposition {
        Disposition::Ack => delivery.acker.ack(BasicAckOptions::default()).await,
        Disposition::Requeue => {
            // A pause, so that an outage of the database or broker is not a hot loop.
            tokio::time::sleep(Duration::from_secs(1)).await;
            delivery
                .acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await
        }
    };
    if let Err(e) = result {
        // The channel is gone: the broker redelivers the message to the next consumer.
        tracing::warn!(error = %e, "could not settle a delivery; the broker will redeliver it");
    }
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
        }
    }

    /// Once stopping and nothing is in flight: close the channels cleanly, then stop.
    fn maybe_stop(&mut self, ctx: &mut Context<Self>) {
        if !self.stopping || self.in_flight > 0 || self.closing {
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
                let publisher = conn.create_channel().await?;
                publisher.confirm_select(ConfirmSelectOptions::default()).await?;
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
                        settings: act.child.settings.clone(),
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
        ctx.spawn(
            async move {
                let disposition = pipeline.handle(&delivery.data).await;
                settle(delivery, disposition).await;
            }
            .into_actor(self)
            .map(|_, act, ctx| {
                act.in_flight -= 1;
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
