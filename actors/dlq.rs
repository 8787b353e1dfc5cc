//! The DLQ actor: publishes dead letters (publisher-confirmed) and serves the DLQ operations
//! of the HTTP API (`GET /api/dlq`, `POST /api/dlq/replay`). It follows reloads, so an inbound
//! replay sees the mailboxes configured now.

use actix::prelude::*;

use crate::actors::metrics::{metric_tenant, Count};
use crate::actors::supervisor::{ChildContext, Drain, SettingsChanged};
use crate::amqp::{lane_of, PublishError};
use crate::dlq::{self, ReplayReport, Selection};
use crate::domain::DeadLetterEntry;

pub struct DeadLetterActor {
    child: ChildContext,
}

impl DeadLetterActor {
    pub fn new(child: ChildContext) -> Self {
        Self { child }
    }
}

impl Actor for DeadLetterActor {
    type Context = Context<Self>;
}

/// Put an entry on a dead-letter queue; resolves once the broker confirmed it.
#[derive(Message)]
#[rtype(result = "Result<(), PublishError>")]
pub struct DeadLetter {
    pub queue: String,
    pub entry: DeadLetterEntry,
    /// The original request body: the entry's `request` (or `raw_body`) is made from it here,
    /// off the actors' thread (a request may be megabytes). Kept whole up to `keep_whole`.
    pub body: Option<Vec<u8>>,
    pub keep_whole: usize,
}

impl Handler<DeadLetter> for DeadLetterActor {
    type Result = ResponseFuture<Result<(), PublishError>>;

    fn handle(&mut self, msg: DeadLetter, _: &mut Context<Self>) -> Self::Result {
        let publisher = self.child.publisher.clone();
        let metrics = self.child.metrics.clone();
        let tenant = metric_tenant(&self.child.settings, msg.entry.tenant_id.as_deref());
        Box::pin(async move {
            let publisher = publisher.ok_or(PublishError::NoConnection)?;
            let DeadLetter {
                queue,
                mut entry,
                body,
                keep_whole,
            } = msg;
            let json = tokio::task::spawn_blocking(move || {
                if let Some(body) = body {
                    entry.attach_body(&body, keep_whole);
                }
                serde_json::to_vec(&entry)
            })
            .await
            .map_err(|e| PublishError::Channel(format!("encoding the dead letter: {e}")))?
            .map_err(|e| PublishError::Channel(format!("encoding the dead letter: {e}")))?;
            publisher
                .publish_json(lane_of(&queue), &queue, &json, None)
                .await?;
            metrics.do_send(Count::one(
                "mailbridge_dead_letters_total",
                vec![("queue", queue), ("tenant", tenant)],
            ));
            Ok(())
        })
    }
}

/// `GET /api/dlq`.
#[derive(Message)]
#[rtype(result = "Result<Vec<serde_json::Value>, String>")]
pub struct ListDeadLetters {
    pub queue: String,
    pub limit: usize,
}

impl Handler<ListDeadLetters> for DeadLetterActor {
    type Result = ResponseFuture<Result<Vec<serde_json::Value>, String>>;

    fn handle(&mut self, msg: ListDeadLetters, _: &mut Context<Self>) -> Self::Result {
        let child = self.child.clone();
        Box::pin(async move {
            let conn = child.connection.ok_or("not connected to RabbitMQ")?;
            dlq::list(&conn, &child.settings, &msg.queue, msg.limit)
                .await
                .map_err(|e| e.to_string())
        })
    }
}

/// `POST /api/dlq/replay`.
#[derive(Message)]
#[rtype(result = "Result<ReplayReport, String>")]
pub struct ReplayDeadLetters {
    pub queue: String,
    pub selection: Selection,
}

impl Handler<ReplayDeadLetters> for DeadLetterActor {
    type Result = ResponseFuture<Result<ReplayReport, String>>;

    fn handle(&mut self, msg: ReplayDeadLetters, _: &mut Context<Self>) -> Self::Result {
        let child = self.child.clone();
        Box::pin(async move {
            let conn = child.connection.ok_or("not connected to RabbitMQ")?;
            dlq::replay(
                &conn,
                &child.pool,
                &child.settings,
                &msg.queue,
                &msg.selection,
            )
            .await
            .map_err(|e| e.to_string())
        })
    }
}

impl Handler<SettingsChanged> for DeadLetterActor {
    type Result = ();
    fn handle(&mut self, msg: SettingsChanged, _: &mut Context<Self>) {
        self.child.settings = msg.0;
    }
}

impl Handler<Drain> for DeadLetterActor {
    type Result = ();

    fn handle(&mut self, _: Drain, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}
