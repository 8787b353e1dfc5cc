//! The DLQ actor: publishes dead letters (publisher-confirmed) and serves the DLQ operations
//! of the HTTP API (`GET /api/dlq`, `POST /api/dlq/replay`).

use actix::prelude::*;
use lapin::Channel;

use crate::actors::metrics::Count;
use crate::actors::supervisor::{ChildContext, Drain};
use crate::amqp::{confirm_channel, publish_confirmed};
use crate::dlq::{self, ReplayReport, Selection};
use crate::domain::DeadLetterEntry;

pub struct DeadLetterActor {
    child: ChildContext,
    channel: Option<Channel>,
}

impl DeadLetterActor {
    pub fn new(child: ChildContext) -> Self {
        Self {
            child,
            channel: None,
        }
    }
}

impl Actor for DeadLetterActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let conn = self.child.connection.clone();
        ctx.wait(
            async move { confirm_channel(conn.as_deref()).await }
                .into_actor(self)
                .map(|res, act, ctx| match res {
                    Ok(ch) => act.channel = Some(ch),
                    Err(e) => {
                        tracing::warn!(error = %e, "the DLQ actor cannot open its channel");
                        ctx.stop();
                    }
                }),
        );
    }
}

/// Put an entry on a dead-letter queue; resolves once the broker confirmed it.
#[derive(Message)]
#[rtype(result = "Result<(), String>")]
pub struct DeadLetter {
    pub queue: String,
    pub entry: DeadLetterEntry,
}

impl Handler<DeadLetter> for DeadLetterActor {
    type Result = ResponseFuture<Result<(), String>>;

    fn handle(&mut self, msg: DeadLetter, _: &mut Context<Self>) -> Self::Result {
        let channel = self.channel.clone();
        let metrics = self.child.metrics.clone();
        Box::pin(async move {
            let ch = channel.ok_or_else(|| "the DLQ channel is not open".to_string())?;
            let body = serde_json::to_vec(&msg.entry).map_err(|e| e.to_string())?;
            publish_confirmed(&ch, &msg.queue, &body, None).await?;
            metrics.do_send(Count::one(
                "mailbridge_dead_letters_total",
                vec![
                    ("queue", msg.queue.clone()),
                    ("tenant", msg.entry.tenant_id.clone().unwrap_or_default()),
                ],
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

impl Handler<Drain> for DeadLetterActor {
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
