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
use lapin::BasicProperties;

use crate::actors::supervisor::{ChildContext, Drain};
use crate::amqp::PublishError;

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

/// The header that carries the token of the parked retry a copy continues (the outbox
/// accepts only that copy while the retry is pending, see `outbox::ClaimRequest`).
pub const RETRY_TOKEN_HEADER: &str = "x-mailbridge-retry-token";

/// The retry token a delivery carries.
pub fn retry_token(properties: &BasicProperties) -> Option<String> {
    match properties
        .headers()
        .as_ref()?
        .inner()
        .get(RETRY_TOKEN_HEADER)?
    {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
    .filter(|t| !t.is_empty() && t.len() <= 64)
}

pub struct RetryScheduler {
    child: ChildContext,
}

impl RetryScheduler {
    pub fn new(child: ChildContext) -> Self {
        Self { child }
    }
}

impl Actor for RetryScheduler {
    type Context = Context<Self>;
}

/// Park `body` for `delay`, then redeliver it to the send queue as retry number `retry`,
/// carrying `token`.
#[derive(Message)]
#[rtype(result = "Result<(), PublishError>")]
pub struct ScheduleRetry {
    pub body: Vec<u8>,
    pub retry: u32,
    pub delay: Duration,
    pub token: String,
}

impl Handler<ScheduleRetry> for RetryScheduler {
    type Result = ResponseFuture<Result<(), PublishError>>;

    fn handle(&mut self, msg: ScheduleRetry, _: &mut Context<Self>) -> Self::Result {
        let publisher = self.child.publisher.clone();
        // Only the delays of the running configuration have queues (a reload does not
        // change them), and the publish is mandatory: an undeclared queue fails it.
        let queue = self.child.settings.retry_queue(msg.delay);
        Box::pin(async move {
            let publisher = publisher.ok_or(PublishError::NoConnection)?;
            let mut headers = FieldTable::default();
            headers.insert(RETRY_HEADER.into(), AMQPValue::LongUInt(msg.retry));
            headers.insert(
                RETRY_TOKEN_HEADER.into(),
                AMQPValue::LongString(msg.token.as_str().into()),
            );
            publisher
                .publish_json(0, &queue, &msg.body, Some(headers))
                .await
        })
    }
}

impl Handler<Drain> for RetryScheduler {
    type Result = ();

    fn handle(&mut self, _: Drain, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}
