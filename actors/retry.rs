//! The retry scheduler: parks a request in one of the service's delay queues.
//!
//! The wait is durable: each configured delay has its own queue
//! (`mailbridge.retry.<send queue>.<ms>ms`, declared by the supervisor with `x-message-ttl`
//! and a dead-letter route back to `email.exchange` / the send queue). A message published
//! there comes back to the send queue when its TTL expires, whether or not this process is
//! still running. The retry number travels in the `x-retry-count` header.

use std::time::Duration;

use actix::prelude::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};

use crate::actors::supervisor::{ChildContext, Drain};
use crate::amqp::{confirm_channel, publish_confirmed};

/// The header that carries how many retries a request has had.
pub const RETRY_HEADER: &str = "x-retry-count";

/// The retry count a delivery carries (0 when it has none).
pub fn retry_count(properties: &BasicProperties) -> u32 {
    let Some(headers) = properties.headers() else {
        return 0;
    };
    match headers.inner().get(RETRY_HEADER) {
        Some(AMQPValue::LongUInt(n)) => *n,
        Some(AMQPValue::LongInt(n)) => (*n).max(0) as u32,
        Some(AMQPValue::LongLongInt(n)) => (*n).clamp(0, u32::MAX as i64) as u32,
        Some(AMQPValue::ShortUInt(n)) => u32::from(*n),
        Some(AMQPValue::ShortShortUInt(n)) => u32::from(*n),
        _ => 0,
    }
}

pub struct RetryScheduler {
    child: ChildContext,
    channel: Option<Channel>,
}

impl RetryScheduler {
    pub fn new(child: ChildContext) -> Self {
        Self {
            child,
            channel: None,
        }
    }
}

impl Actor for RetryScheduler {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let conn = self.child.connection.clone();
        ctx.wait(
            async move { confirm_channel(conn.as_deref()).await }
                .into_actor(self)
                .map(|res, act, ctx| match res {
                    Ok(ch) => act.channel = Some(ch),
                    Err(e) => {
                        tracing::warn!(error = %e, "the retry scheduler cannot open its channel");
                        ctx.stop();
                    }
                }),
        );
    }
}

/// Park `body` for `delay`, then redeliver it to the send queue as retry number `retry`.
#[derive(Message)]
#[rtype(result = "Result<(), String>")]
pub struct ScheduleRetry {
    pub body: Vec<u8>,
    pub retry: u32,
    pub delay: Duration,
}

impl Handler<ScheduleRetry> for RetryScheduler {
    type Result = ResponseFuture<Result<(), String>>;

    fn handle(&mut self, msg: ScheduleRetry, _: &mut Context<Self>) -> Self::Result {
        let channel = self.channel.clone();
        let queue = self.child.settings.retry_queue(msg.delay);
        Box::pin(async move {
            let ch = channel.ok_or_else(|| "the retry channel is not open".to_string())?;
            let mut headers = FieldTable::default();
            headers.insert(RETRY_HEADER.into(), AMQPValue::LongUInt(msg.retry));
            publish_confirmed(&ch, &queue, &msg.body, Some(headers)).await
        })
    }
}

impl Handler<Drain> for RetryScheduler {
    type Result = ResponseActFuture<Self, ()>;

    /// Closes the channel cleanly (publishes in flight are confirmed first), then stops.
    fn handle(&mut self, _: Drain, _: &mut Context<Self>) -> Self::Result {
        let channel = self.channel.take();
        Box::pin(
            async move {
                if let Some(ch) = channel {
                    let _ = ch.close(200, "OK".into()).await;
                }
            }
            .into_actor(self)
            .map(|_, _, ctx| ctx.stop()),
        )
    }
}
