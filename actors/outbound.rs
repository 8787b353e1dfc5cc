//! The outbound consumer: takes requests from `email.send`, has them sent by their provider's
//! sender actor, records each step in the outbox and publishes a result.
//!
//! Every delivery runs its own pipeline concurrently (bounded by the channel's prefetch):
//! decode (bounded by `[outbound]` limits; off the actors' thread when large) → claim the
//! outbox row (received, `sending`, attempts + 1, in one write) → fetch attachments (within
//! the in-flight byte budget) → build (off the thread when large) → deliver → outbox `sent` →
//! result (publisher-confirmed) → ack (then, not awaited, outbox "result published").
//!
//! Invariants:
//! - A delivery is acked only after its outcome is committed in the outbox and its result is
//!   confirmed by the broker. When either cannot be done, the delivery is requeued (after a
//!   pause) — except after the provider accepted the email: then the `sent` write is retried
//!   until it commits, because a redelivery would send the email again.
//! - At most one transaction per request at a time, none after `sent`: a delivery proceeds
//!   only with the row's claim (see `outbox`). A copy that finds the request claimed waits for
//!   the holder's outcome; one that finds it finished (`sent`, `failed`) or with a retry
//!   parked is a duplicate: it completes what the first copy may have left undone (its result,
//!   its dead letter) and is acked.
//! - Acks go out as soon as a delivery is done — with one `multiple` ack for a run of done
//!   deliveries below every unfinished one; those above it wait for that ack up to 1 s, then
//!   go individually — so one slow delivery does not hold the prefetch window.

use std::collections::{BTreeMap, BTreeSet};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use lapin::Channel;
use tokio::sync::oneshot;

use crate::actors::dlq::{DeadLetter, DeadLetterActor};
use crate::actors::metrics::{metric_provider, metric_tenant, Count, MetricsActor};
use crate::actors::outbox::{Apply, Claim, ClaimOutcome, OutboxError, OutboxWriter};
use crate::actors::retry::{retry_count, retry_token, RetryScheduler, ScheduleRetry};
use crate::actors::sender::{Deliver, SenderActor};
use crate::actors::supervisor::{
    ChildContext, ChildId, Drain, FindChild, SettingsChanged, Supervisor,
};
use crate::amqp::{lane_of, short_string, Publisher};
use crate::domain::DeadLetterEntry;
use crate::fetch::AttachmentFetcher;
use crate::outbound::OFF_THREAD_BYTES;
use crate::outbound::{
    build_email, decode_with_ids, rfc3339, FailureClass, Limits, ProviderResponse, RequestError,
    RequestIds, SendRequest, SendResult, ValidRequest, MAX_ID_BYTES,
};
use crate::outbox::{FailureRecord, NewRow, OpOutcome, OutboxKey, OutboxOp, RowState, RowStatus};
use crate::providers::SendError;
use crate::settings::{Provider, Settings};

/// A request delivered this many times without reaching an outcome is dead-lettered as
/// poison (the service crashed or was killed while processing it each time).
const MAX_DELIVERIES: i32 = 5;
/// How long a copy waits for another instance's claim on its request before giving the
/// delivery back to the broker.
const MAX_CLAIM_WAIT: Duration = Duration::from_secs(600);

/// What happens to a delivery once its pipeline is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Disposition {
    Ack,
    /// The outcome could not be recorded or announced: give it back to the broker.
    Requeue,
}

/// One delivery, as the pipeline needs it.
struct Incoming {
    body: Arc<Vec<u8>>,
    /// The retry number it carries (0 at first).
    retry: u32,
    /// The parked retry it continues, when it is one.
    retry_token: Option<String>,
}

/// What went wrong with a request, and whether trying again can help.
struct Failure {
    error: String,
    class: FailureClass,
    last_reply: Option<String>,
    /// The provider may have accepted it anyway (the outbox records it).
    uncertain: bool,
    /// The provider asked to wait at least this long (`Retry-After`).
    retry_after: Option<Duration>,
    /// Not a failure: the provider's rate limit has no room for it yet. Parked without
    /// counting a retry.
    deferred: bool,
}

impl Failure {
    fn new(error: impl Into<String>, class: FailureClass) -> Self {
        Self {
            error: error.into(),
            class,
            last_reply: None,
            uncertain: false,
            retry_after: None,
            deferred: false,
        }
    }

    fn invalid(e: &RequestError) -> Self {
        Self::new(e.to_string(), FailureClass::Invalid)
    }
}

/// What a decoded request leads to.
enum Plan {
    Send {
        valid: Box<ValidRequest>,
        provider: Provider,
    },
    Fail(Failure),
}

/// A claim held by one pipeline: released when dropped without an outcome (an early return,
/// a panic, the pipeline abandoned), so its request is never stranded in this process.
struct ClaimGuard {
    key: OutboxKey,
    token: i64,
    writer: Addr<OutboxWriter>,
    settled: bool,
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        if !self.settled {
            self.writer.do_send(Apply(OutboxOp::Release {
                key: self.key.clone(),
                token: self.token,
            }));
        }
    }
}

/// Everything a pipeline needs; shared by the concurrent pipelines of one consumer.
struct Pipeline {
    /// Replaced on reload ([`SettingsChanged`]); read once per use.
    settings: std::sync::RwLock<Arc<Settings>>,
    writer: std::sync::Mutex<Option<Addr<OutboxWriter>>>,
    publisher: Arc<Publisher>,
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
        let found = self.find::<OutboxWriter>(ChildId::Outbox).await;
        if let Ok(mut w) = self.writer.lock() {
            w.clone_from(&found);
        }
        found
    }

    async fn outbox(&self, op: OutboxOp) -> Result<OpOutcome, OutboxError> {
        let writer = self
            .outbox_writer()
            .await
            .ok_or_else(|| OutboxError::Unavailable("the outbox writer is not running".into()))?;
        writer
            .send(Apply(op))
            .await
            .unwrap_or_else(|_| Err(OutboxError::Unavailable("the outbox writer stopped".into())))
    }

    /// Fire and forget: a bookkeeping write whose loss costs at most a repeated result.
    async fn outbox_later(&self, op: OutboxOp) {
        if let Some(writer) = self.outbox_writer().await {
            writer.do_send(Apply(op));
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
        let lane = lane_of(result.message_id.as_deref().unwrap_or(""));
        // A stable AMQP message id: a result published again (its confirm was lost with a
        // channel the broker closed, so the redelivered request published it once more) is
        // recognisable as the same result.
        let props = lapin::BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(short_string(&result.dedup_id()));
        match self.publisher.publish(lane, &queue, &body, props).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "result not confirmed");
                false
            }
        }
    }

    /// The whole life of one request.
    async fn handle(&self, d: &Incoming) -> Disposition {
        let settings = self.settings();
        let limits = settings.outbound.limits();
        let (decoded, ids) = decode_off_thread(d.body.clone(), limits).await;
        let row = new_row(&ids, decoded.as_ref().ok());
        let plan = match decoded.and_then(|r| r.validate(&limits)) {
            Err(e) => Plan::Fail(Failure::invalid(&e)),
            Ok(valid) => match settings
                .provider(&valid.request.tenant_id, &valid.request.provider_id)
                .cloned()
            {
                Some(provider) => Plan::Send {
                    valid: Box::new(valid),
                    provider,
                },
                None => Plan::Fail(Failure::new(
                    unknown_provider_reason(&settings, &ids),
                    FailureClass::Permanent,
                )),
            },
        };
        let Some(mut row) = row else {
            // Without usable ids there is no row to claim: the dead letter and the result
            // are all there is.
            let failure = match plan {
                Plan::Fail(f) => f,
                Plan::Send { .. } => {
                    Failure::new("the request has no usable ids", FailureClass::Invalid)
                }
            };
            return self.dead_letter(d, &ids, failure).await;
        };
        row.sending = matches!(plan, Plan::Send { .. });

        let guard = match self.claim(d, row, &ids).await {
            Ok(guard) => guard,
            Err(disposition) => return disposition,
        };
        let (mut guard, deliveries) = guard;
        // Debug builds only: the test suite's way to make processing panic (the panic path
        // below is otherwise unreachable on purpose).
        #[cfg(debug_assertions)]
        if std::env::var("MAILBRIDGE_FAULT_PANIC_ON").is_ok_and(|id| id == guard.key.message_id) {
            panic!("fault injected for message_id {}", guard.key.message_id);
        }
        if deliveries > MAX_DELIVERIES {
            let f = Failure::new(
                format!(
                    "delivered {deliveries} times without reaching an outcome (the service stopped or failed while processing it); dead-lettered so it does not loop"
                ),
                FailureClass::Permanent,
            );
            return self.on_failure(d, &ids, &mut guard, f).await;
        }
        match plan {
            Plan::Fail(f) => self.on_failure(d, &ids, &mut guard, f).await,
            Plan::Send { valid, provider } => {
                self.send(d, &ids, &mut guard, *valid, &provider).await
            }
        }
    }

    /// Claims the request's row. `Err` is what to do with the delivery when this copy does
    /// not get to process it (a duplicate, or the outbox unavailable).
    async fn claim(
        &self,
        d: &Incoming,
        row: NewRow,
        ids: &RequestIds,
    ) -> Result<(ClaimGuard, i32), Disposition> {
        let started = Instant::now();
        loop {
            let Some(writer) = self.outbox_writer().await else {
                return Err(Disposition::Requeue);
            };
            let outcome = writer
                .send(Claim {
                    row: row.clone(),
                    retry_token: d.retry_token.clone(),
                })
                .await
                .unwrap_or_else(|_| {
                    Err(OutboxError::Unavailable("the outbox writer stopped".into()))
                });
            let state = match outcome {
                Ok(ClaimOutcome::Claimed {
                    token, deliveries, ..
                }) => {
                    let guard = ClaimGuard {
                        key: row.key.clone(),
                        token,
                        writer,
                        settled: false,
                    };
                    return Ok((guard, deliveries));
                }
                Ok(ClaimOutcome::NotClaimed(state)) => state,
                Err(OutboxError::Unavailable(e)) => {
                    tracing::warn!(error = %e, "cannot claim a request; requeueing it");
                    return Err(Disposition::Requeue);
                }
                Err(OutboxError::Refused(e)) => {
                    let f = Failure::new(
                        format!("the outbox refused this request: {e}"),
                        FailureClass::Invalid,
                    );
                    return Err(self.dead_letter(d, ids, f).await);
                }
            };
            let key = &row.key;
            match state.status {
                // First: another instance (or an earlier run) works on it — sending it, or
                // publishing the result of a copy already sent or failed: wait for that (or
                // for the claim to expire) rather than repeat it.
                _ if state.claim_live => {
                    if started.elapsed() > MAX_CLAIM_WAIT {
                        tracing::warn!(tenant_id = %key.tenant_id, message_id = %key.message_id,
                            "the request stays claimed elsewhere; giving the delivery back");
                        return Err(Disposition::Requeue);
                    }
                    let wait = state.claim_expires_in.clamp(0.1, 2.0);
                    tracing::info!(tenant_id = %key.tenant_id, message_id = %key.message_id,
                        owner = state.claim_owner.as_deref().unwrap_or(""),
                        "the request is being processed elsewhere; waiting for its outcome");
                    tokio::time::sleep(Duration::from_secs_f64(wait)).await;
                }
                RowStatus::Sent => return Err(self.duplicate_of_sent(key, &state).await),
                RowStatus::Failed => return Err(self.duplicate_of_failed(d, key, &state).await),
                RowStatus::Retrying => {
                    tracing::info!(tenant_id = %key.tenant_id, message_id = %key.message_id,
                        "a duplicate of a request whose retry is parked; acknowledged without sending");
                    return Err(Disposition::Ack);
                }
                // Released between the claim and the look: try again.
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Sends a claimed, valid request through its provider.
    async fn send(
        &self,
        d: &Incoming,
        ids: &RequestIds,
        guard: &mut ClaimGuard,
        valid: ValidRequest,
        provider: &Provider,
    ) -> Disposition {
        let fetched = match self.fetcher.fetch_all(&valid.request.attachments).await {
            Ok(a) => a,
            Err(e) => {
                let f = Failure::new(e.to_string(), e.class());
                return self.on_failure(d, ids, guard, f).await;
            }
        };
        let crate::fetch::Fetched {
            attachments,
            budget,
        } = fetched;
        let large = valid.request.body_content.len() > OFF_THREAD_BYTES || !attachments.is_empty();
        let parts = provider.config.wants_parts();
        let built = if large {
            tokio::task::spawn_blocking(move || build_email(&valid, attachments, parts))
                .await
                .unwrap_or_else(|e| {
                    Err(RequestError::Invalid {
                        field: "(email)".into(),
                        reason: format!("building the email failed: {e}"),
                    })
                })
        } else {
            build_email(&valid, attachments, parts)
        };
        let email = match built {
            Ok(e) => Arc::new(e),
            Err(e) => return self.on_failure(d, ids, guard, Failure::invalid(&e)).await,
        };

        let key = guard.key.clone();
        let sent = match self
            .find::<SenderActor>(ChildId::Sender(provider.id.clone()))
            .await
        {
            Some(sender) => sender
                .send(Deliver {
                    email: email.clone(),
                    tenant_id: key.tenant_id.clone(),
                })
                .await
                .unwrap_or(Err(SendError::Unavailable)),
            None => Err(SendError::Unavailable),
        };
        // The attachment bytes (in the email) are done with once it is sent.
        drop(budget);
        let accepted = match sent {
            Ok(a) => a,
            // Not a failure of the request: it goes back to the broker as it is (its claim
            // released), to be sent after the restart.
            Err(SendError::ShuttingDown) => return Disposition::Requeue,
            Err(e) => {
                let f = Failure {
                    error: e.to_string(),
                    class: e.class(),
                    last_reply: e.last_reply(),
                    uncertain: e.is_uncertain(),
                    retry_after: e.retry_after(),
                    // A provider asking to wait past the longest delay queue (its quota
                    // is spent until tomorrow, say) is waited for in the longest steps
                    // without spending retries: it said when, not that it failed.
                    deferred: matches!(e, SendError::Deferred { .. })
                        || (e.class() == FailureClass::Transient
                            && e.retry_after()
                                .is_some_and(|w| w > crate::settings::LONGEST_RETRY_DELAY)),
                };
                return self.on_failure(d, ids, guard, f).await;
            }
        };

        // The provider has the email: from here on the delivery is never requeued before
        // `sent` is committed, or a redelivery would send it again.
        let op = OutboxOp::Sent {
            key: key.clone(),
            provider_message_id: accepted.provider_message_id.clone(),
            rfc_message_id: email.rfc_message_id.clone(),
            sent_at: accepted.sent_at,
        };
        let mut attempt = 0;
        loop {
            match self.outbox(op.clone()).await {
                Ok(_) => break,
                Err(OutboxError::Refused(e)) => {
                    // Cannot happen with the values the service writes; if it does, the email
                    // is sent all the same and must not be sent again.
                    tracing::error!(tenant_id = %key.tenant_id, message_id = %key.message_id, error = %e,
                        "sent, but the outbox refused to record it");
                    break;
                }
                Err(OutboxError::Unavailable(e)) => {
                    tracing::error!(tenant_id = %key.tenant_id, message_id = %key.message_id, error = %e,
                        "sent, but the outbox cannot record it yet; retrying (the delivery stays unacknowledged)");
                    tokio::time::sleep(crate::actors::supervisor::backoff(
                        attempt,
                        Duration::from_secs(5),
                    ))
                    .await;
                    attempt += 1;
                }
            }
        }
        let settings = self.settings();
        self.metrics.do_send(Count::one(
            "mailbridge_emails_sent_total",
            vec![
                ("tenant", metric_tenant(&settings, Some(&key.tenant_id))),
                (
                    "provider",
                    metric_provider(&settings, Some(&key.tenant_id), Some(&provider.id)),
                ),
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
        self.announce(&key, &result, Some(guard)).await
    }

    /// Publishes a result and, once confirmed, remembers that it was published — which ends
    /// the claim of `guard` (the request is finished). Without the result, the delivery is
    /// requeued and the guard releases the claim, so a redelivery publishes the result.
    async fn announce(
        &self,
        key: &OutboxKey,
        result: &SendResult,
        guard: Option<&mut ClaimGuard>,
    ) -> Disposition {
        if !self.publish_result(result).await {
            return Disposition::Requeue;
        }
        // Not awaited on the ack path: if this is lost, a redelivery could only repeat a
        // result (and the claim expires).
        let token = guard.map(|g| {
            g.settled = true;
            g.token
        });
        self.outbox_later(OutboxOp::ResultPublished {
            key: key.clone(),
            token,
        })
        .await;
        Disposition::Ack
    }

    /// A copy of a request whose email is sent: not sent again. Its result is published only
    /// if the first copy did not get that far.
    async fn duplicate_of_sent(&self, key: &OutboxKey, row: &RowState) -> Disposition {
        tracing::info!(tenant_id = %key.tenant_id, message_id = %key.message_id,
            "already sent; not sending again");
        if row.result_published {
            return Disposition::Ack;
        }
        let settings = self.settings();
        let provider_name = settings
            .provider(&key.tenant_id, &row.provider_id)
            .map(|p| p.name.clone())
            .unwrap_or_else(|| row.provider_id.clone());
        let result = SendResult::sent(
            &key.tenant_id,
            &key.message_id,
            ProviderResponse {
                provider_name,
                provider_message_id: row.provider_message_id.clone().unwrap_or_default(),
                sent_at: row.sent_at.map(rfc3339).unwrap_or_default(),
            },
        );
        self.announce(key, &result, None).await
    }

    /// A copy of a request that failed: not tried again (a dead letter is replayed to try
    /// again). What the first copy may not have finished — its dead letter, its result — is
    /// finished from the row.
    async fn duplicate_of_failed(
        &self,
        d: &Incoming,
        key: &OutboxKey,
        row: &RowState,
    ) -> Disposition {
        tracing::info!(tenant_id = %key.tenant_id, message_id = %key.message_id,
            "already failed (and dead-lettered); not tried again");
        let class = match row.error_class.as_deref() {
            Some("invalid") => FailureClass::Invalid,
            Some("transient") => FailureClass::Transient,
            _ => FailureClass::Permanent,
        };
        let error = row.last_error.clone().unwrap_or_else(|| "failed".into());
        let retry = u32::try_from(row.retry_count).unwrap_or(0);
        let ids = RequestIds {
            tenant_id: Some(key.tenant_id.clone()),
            message_id: Some(key.message_id.clone()),
            provider_id: Some(row.provider_id.clone()),
        };
        if !row.dead_lettered {
            let entry = self.entry(&ids, &error, class, retry, row.last_reply.clone());
            if !self.send_dead_letter(d, entry).await {
                return Disposition::Requeue;
            }
            self.outbox_later(OutboxOp::DeadLettered(key.clone())).await;
        }
        if row.result_published {
            return Disposition::Ack;
        }
        let max_retries = self.settings().retry.max_retries;
        let result = SendResult::failed(&ids, error, class, retry, max_retries);
        self.announce(key, &result, None).await
    }

    /// Every failure of a claimed request ends here: a transient one with retries left is
    /// parked in a delay queue; any other is recorded `failed` and dead-lettered, with a
    /// terminal `failed` result.
    async fn on_failure(
        &self,
        d: &Incoming,
        ids: &RequestIds,
        guard: &mut ClaimGuard,
        failure: Failure,
    ) -> Disposition {
        let settings = self.settings();
        let key = guard.key.clone();
        if !failure.deferred {
            self.count_failure(ids, &failure);
        }
        let max_retries = settings.retry.max_retries;
        let ids = RequestIds {
            tenant_id: Some(key.tenant_id.clone()),
            message_id: Some(key.message_id.clone()),
            provider_id: ids.provider_id.clone(),
        };
        if failure.deferred {
            tracing::info!(tenant_id = %key.tenant_id, message_id = %key.message_id,
                retry = d.retry, "parked: {}", failure.error);
        } else {
            tracing::warn!(tenant_id = %key.tenant_id, message_id = %key.message_id,
                class = %failure.class, retry = d.retry, reply = failure.last_reply.as_deref().unwrap_or(""),
                "send failed: {}", failure.error);
        }

        if failure.class == FailureClass::Transient && (failure.deferred || d.retry < max_retries) {
            // A deferral is not a retry: it comes back as the same attempt.
            let next = if failure.deferred {
                d.retry
            } else {
                d.retry + 1
            };
            let delay = match (failure.deferred, failure.retry_after) {
                // Not a retry: the wait the limit asks for, not the schedule's.
                (true, Some(wait)) => settings.delay_at_least(wait),
                _ => settings.retry_delay_at_least(next, failure.retry_after),
            };
            let token = new_retry_token();
            // Parked first (confirmed), then recorded: a crash in between leaves the row to
            // the redelivered copy, and the parked one then stands down as a duplicate.
            let Some(scheduler) = self.find::<RetryScheduler>(ChildId::Retry).await else {
                return Disposition::Requeue;
            };
            let scheduled = scheduler
                .send(ScheduleRetry {
                    body: d.body.as_ref().clone(),
                    retry: next,
                    delay,
                    token: token.clone(),
                })
                .await;
            if !matches!(scheduled, Ok(Ok(()))) {
                tracing::warn!(?scheduled, "could not schedule a retry; requeueing");
                return Disposition::Requeue;
            }
            let record = FailureRecord {
                key: key.clone(),
                token: guard.token,
                status: RowStatus::Retrying,
                error: failure.error.clone(),
                error_class: failure.class.as_str().into(),
                retry_count: next,
                last_reply: failure.last_reply.clone(),
                retry_token: Some(token),
                retry_in_secs: Some(delay.as_secs_f64()),
                uncertain: failure.uncertain,
            };
            match self.outbox(OutboxOp::Failed(record)).await {
                Ok(_) => guard.settled = true,
                // The parked retry comes back with a token the row does not have: it will
                // stand down, and this copy, requeued, continues the request.
                Err(_) => return Disposition::Requeue,
            }
            if failure.deferred {
                // Nothing failed: no retry counted, no `retrying` result.
                self.metrics.do_send(Count::one(
                    "mailbridge_sends_deferred_total",
                    self.labels(&settings, &ids),
                ));
                return Disposition::Ack;
            }
            self.metrics.do_send(Count::one(
                "mailbridge_retries_total",
                self.labels(&settings, &ids),
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

        let record = FailureRecord {
            key: key.clone(),
            token: guard.token,
            status: RowStatus::Failed,
            error: failure.error.clone(),
            error_class: failure.class.as_str().into(),
            retry_count: d.retry,
            last_reply: failure.last_reply.clone(),
            retry_token: None,
            retry_in_secs: None,
            uncertain: failure.uncertain,
        };
        match self.outbox(OutboxOp::Failed(record)).await {
            Ok(OpOutcome::Applied(false)) => {
                // Another copy took the request over meanwhile: its outcome stands.
                guard.settled = true;
                return Disposition::Ack;
            }
            // The claim stays until the result is out (a copy waits rather than repeat it).
            Ok(_) => {}
            Err(OutboxError::Unavailable(_)) => return Disposition::Requeue,
            Err(OutboxError::Refused(e)) => {
                tracing::error!(error = %e, "the outbox refused a failure record");
            }
        }
        let entry = self.entry(
            &ids,
            &failure.error,
            failure.class,
            d.retry,
            failure.last_reply.clone(),
        );
        if !self.send_dead_letter(d, entry).await {
            // The row is `failed` but not dead-lettered: the redelivery finishes it.
            return Disposition::Requeue;
        }
        self.outbox_later(OutboxOp::DeadLettered(key.clone())).await;
        let result = SendResult::failed(&ids, failure.error, failure.class, d.retry, max_retries);
        self.announce(&key, &result, Some(guard)).await
    }

    /// A request whose processing panicked: it would panic again, so it is failed for good
    /// now — recorded `failed` in its row when it has one (its claim was released as the
    /// panic unwound), dead-lettered, with a terminal result.
    async fn fail_after_panic(&self, d: &Incoming, what: &str) -> Disposition {
        let ids = RequestIds::peek(&d.body);
        let failure = Failure::new(
            format!("the service failed unexpectedly while processing this request ({what}); dead-lettered so that it cannot loop"),
            FailureClass::Permanent,
        );
        let Some(row) = new_row(&ids, None) else {
            return self.dead_letter(d, &ids, failure).await;
        };
        match self.claim(d, row, &ids).await {
            Ok((mut guard, _)) => self.on_failure(d, &ids, &mut guard, failure).await,
            Err(disposition) => disposition,
        }
    }

    /// A request without a row (no usable ids, or refused by the outbox): dead letter and
    /// result.
    async fn dead_letter(&self, d: &Incoming, ids: &RequestIds, failure: Failure) -> Disposition {
        self.count_failure(ids, &failure);
        tracing::warn!(tenant = ids.tenant_id.as_deref().unwrap_or(""),
            message_id = ids.message_id.as_deref().unwrap_or(""),
            class = %failure.class, "request refused: {}", failure.error);
        let max_retries = self.settings().retry.max_retries;
        let entry = self.entry(
            ids,
            &failure.error,
            failure.class,
            d.retry,
            failure.last_reply.clone(),
        );
        if !self.send_dead_letter(d, entry).await {
            return Disposition::Requeue;
        }
        let result = SendResult::failed(ids, failure.error, failure.class, d.retry, max_retries);
        if self.publish_result(&result).await {
            Disposition::Ack
        } else {
            Disposition::Requeue
        }
    }

    fn entry(
        &self,
        ids: &RequestIds,
        error: &str,
        class: FailureClass,
        retry: u32,
        last_reply: Option<String>,
    ) -> DeadLetterEntry {
        DeadLetterEntry {
            tenant_id: ids.tenant_id.clone(),
            message_id: ids.message_id.clone(),
            error: error.to_string(),
            error_class: class.as_str().into(),
            retry_count: retry,
            failed_at: rfc3339(time::OffsetDateTime::now_utc()),
            last_reply,
            ..DeadLetterEntry::default()
        }
    }

    async fn send_dead_letter(&self, d: &Incoming, entry: DeadLetterEntry) -> bool {
        let Some(dlq) = self.find::<DeadLetterActor>(ChildId::Dlq).await else {
            return false;
        };
        let settings = self.settings();
        let queued = dlq
            .send(DeadLetter {
                queue: settings.queues.send_dlq(),
                entry,
                body: Some(d.body.as_ref().clone()),
                keep_whole: usize::try_from(settings.outbound.max_request_bytes)
                    .unwrap_or(usize::MAX),
            })
            .await;
        match queued {
            Ok(Ok(())) => true,
            other => {
                tracing::warn!(?other, "could not dead-letter a request; requeueing");
                false
            }
        }
    }

    fn labels(&self, settings: &Settings, ids: &RequestIds) -> Vec<(&'static str, String)> {
        vec![
            ("tenant", metric_tenant(settings, ids.tenant_id.as_deref())),
            (
                "provider",
                metric_provider(
                    settings,
                    ids.tenant_id.as_deref(),
                    ids.provider_id.as_deref(),
                ),
            ),
        ]
    }

    fn count_failure(&self, ids: &RequestIds, failure: &Failure) {
        let settings = self.settings();
        let mut labels = self.labels(&settings, ids);
        labels.push(("class", failure.class.as_str().into()));
        self.metrics
            .do_send(Count::one("mailbridge_emails_failed_total", labels));
    }

    /// A sibling actor, waiting briefly for one that is being restarted.
    async fn find<A>(&self, id: ChildId) -> Option<Addr<A>>
    where
        A: Actor<Context = Context<A>>,
    {
        for _ in 0..25 {
            if let Ok(Some(addr)) = self.supervisor.send(FindChild::<A>::of(id.clone())).await {
                return Some(addr);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        None
    }
}

/// Decodes a request body; a large one on the blocking pool, so the actors' thread (and with
/// it the broker's heartbeats and every other tenant's mail) is never held up by it.
async fn decode_off_thread(
    body: Arc<Vec<u8>>,
    limits: Limits,
) -> (Result<SendRequest, RequestError>, RequestIds) {
    if body.len() <= OFF_THREAD_BYTES {
        return decode_with_ids(&body, &limits);
    }
    let fallback = RequestIds::default();
    tokio::task::spawn_blocking(move || decode_with_ids(&body, &limits))
        .await
        .unwrap_or_else(|e| {
            (
                Err(RequestError::Invalid {
                    field: "(request)".into(),
                    reason: format!("decoding failed: {e}"),
                }),
                fallback,
            )
        })
}

/// Why a request's provider is not usable.
fn unknown_provider_reason(settings: &Settings, ids: &RequestIds) -> String {
    let tenant_id = ids.tenant_id.as_deref().unwrap_or("");
    let provider_id = ids.provider_id.as_deref().unwrap_or("");
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

/// A fresh token for a parked retry.
fn new_retry_token() -> String {
    let mut b = [0u8; 16];
    let _ = aws_lc_rs::rand::fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

/// How much of a request's recipients and subject its outbox row keeps (for the dashboard).
const MAX_STORED_TEXT: usize = 4096;

/// The row a request is recorded in, when its ids can key one (a PostgreSQL text key: no
/// control characters, at most 255 bytes). Invalid requests with usable ids get a row too, so
/// their duplicates are recognised and their failure is visible in the outbox.
fn new_row(ids: &RequestIds, request: Option<&SendRequest>) -> Option<NewRow> {
    let usable = |s: &str| {
        !s.trim().is_empty() && s.len() <= MAX_ID_BYTES && !s.chars().any(char::is_control)
    };
    let optional = |s: &Option<String>| s.clone().filter(|v| usable(v));
    let tenant_id = ids.tenant_id.clone().filter(|s| usable(s))?;
    let message_id = ids.message_id.clone().filter(|s| usable(s))?;
    Some(NewRow {
        key: OutboxKey {
            tenant_id,
            message_id,
        },
        provider_id: optional(&ids.provider_id).unwrap_or_default(),
        user_id: request.and_then(|r| optional(&r.user_id)),
        template_id: request.and_then(|r| optional(&r.template_id)),
        campaign_id: request.and_then(|r| optional(&r.campaign_id)),
        recipients: request.map(|r| {
            let all: Vec<String> =
                r.to.iter()
                    .chain(&r.cc)
                    .chain(&r.bcc)
                    .map(|a| a.to_lowercase())
                    .collect();
            crate::inbound::storable_text(&all.join(", "), MAX_STORED_TEXT)
        }),
        subject: request.map(|r| crate::inbound::storable_text(&r.subject, MAX_STORED_TEXT)),
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
    /// Delivery tags not settled yet (in processing, or waiting to be requeued), with when
    /// each arrived.
    unsettled: BTreeMap<u64, Instant>,
    /// Tags whose outcome is committed and confirmed, not yet acknowledged to the broker.
    done: BTreeSet<u64>,
    /// Acks are on their way: they go out one batch at a time.
    acking: bool,
    /// A later look at done tags held back for a `multiple` ack is scheduled.
    recheck: bool,
}

/// How long done deliveries above an unfinished one are held back, so that one `multiple`
/// ack covers them once it finishes, before each is acked on its own.
const ACK_HOLD: Duration = Duration::from_secs(1);

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
            recheck: false,
        }
    }

    /// Acknowledges finished deliveries: those below the oldest one still unsettled with one
    /// `multiple` ack; the others, finished before it, are held back for the `multiple` ack
    /// that follows it — until it has taken [`ACK_HOLD`]: then they (and the ones after them
    /// while it lasts) are acked one by one, so a delivery that takes long (a slow attachment
    /// host, a hanging provider) holds the window for a second, then one slot of it.
    /// (An ack frame each cost the broker and the service 30 % of the outbound rate.) Nothing
    /// is acked before its outcome is committed and confirmed.
    fn flush_acks(&mut self, ctx: &mut Context<Self>) {
        if self.acking {
            return;
        }
        if self.done.is_empty() {
            self.maybe_stop(ctx);
            return;
        }
        let (low, waited) = match self.unsettled.first_key_value() {
            Some((tag, at)) => (*tag, at.elapsed()),
            None => (u64::MAX, Duration::ZERO),
        };
        let above = self.done.split_off(&low);
        let upto = self.done.last().copied();
        self.done.clear();
        let singles: Vec<u64> = if self.stopping || waited >= ACK_HOLD {
            above.into_iter().collect()
        } else {
            // Held back: covered by the `multiple` ack once `low` finishes, else looked at
            // again when it has taken ACK_HOLD.
            self.done = above;
            if !self.recheck {
                self.recheck = true;
                ctx.run_later(ACK_HOLD - waited, |act, ctx| {
                    act.recheck = false;
                    act.flush_acks(ctx);
                });
            }
            Vec::new()
        };
        if upto.is_none() && singles.is_empty() {
            return;
        }
        let Some(ch) = self.channel.clone() else {
            return;
        };
        self.acking = true;
        ctx.spawn(
            async move {
                // All handed to the connection at once (written together), not one after
                // the other's write.
                let multiple = upto.map(|u| (u, true));
                let acks = multiple
                    .into_iter()
                    .chain(singles.into_iter().map(|t| (t, false)))
                    .map(|(tag, multiple)| ch.basic_ack(tag, BasicAckOptions { multiple }));
                futures_util::future::try_join_all(acks).await?;
                Ok::<_, lapin::Error>(())
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

    /// Once stopping and nothing is in flight: close the channel cleanly, then stop.
    fn maybe_stop(&mut self, ctx: &mut Context<Self>) {
        let unsettled = !self.unsettled.is_empty() || !self.done.is_empty() || self.acking;
        if !self.stopping || self.in_flight > 0 || unsettled || self.closing {
            return;
        }
        self.closing = true;
        let channel = self.channel.take();
        self.pipeline = None;
        ctx.wait(
            async move {
                if let Some(ch) = channel {
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
        let publisher = self.child.publisher.clone();
        let settings = self.child.settings.clone();
        let tag = self.tag.clone();
        ctx.wait(
            async move {
                let conn = conn.ok_or(SetupError::NoConnection)?;
                let publisher = publisher.ok_or(SetupError::NoConnection)?;
                let fetcher = AttachmentFetcher::new(&settings.outbound).map_err(SetupError::Http)?;
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
        self.unsettled.insert(delivery.delivery_tag, Instant::now());
        let tag = delivery.delivery_tag;
        let incoming = Incoming {
            retry: retry_count(&delivery.properties),
            retry_token: retry_token(&delivery.properties),
            body: Arc::new(delivery.data),
        };
        ctx.spawn(
            async move {
                let disposition = match AssertUnwindSafe(pipeline.handle(&incoming))
                    .catch_unwind()
                    .await
                {
                    Ok(d) => d,
                    Err(panic) => {
                        // A request that makes the handler panic would panic again: dead-letter
                        // it now instead of letting it loop. Its claim (if any) was released by
                        // its guard as the panic unwound.
                        let what = panic_message(panic.as_ref());
                        tracing::error!("processing a request panicked: {what}");
                        AssertUnwindSafe(pipeline.fail_after_panic(&incoming, &what))
                            .catch_unwind()
                            .await
                            .unwrap_or(Disposition::Requeue)
                    }
                };
                (tag, disposition)
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
