//! The broker side of the contract: the topology of contract §3 (the exchange, the six
//! public queues, the service's own delay queues), declared by the supervisor on every
//! connection, and the queue statistics of `GET /api/rabbitmq/status`.

use std::sync::Arc;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ExchangeKind};

use crate::domain::{QueueStats, QueueStatusResponse};
use crate::settings::Settings;

/// Errors at the AMQP boundary.
#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    #[error(transparent)]
    Connect(#[from] crate::amqp::ConnectError),
    #[error("cannot declare {what}: {source}; if it exists with other arguments, delete it or rename it in [queues]")]
    Topology {
        what: String,
        #[source]
        source: lapin::Error,
    },
    #[error("AMQP channel error: {0}")]
    Channel(#[from] lapin::Error),
}

/// Declares the exchange and the six public queues exactly as contract §3 says: durable,
/// without arguments, each bound to the exchange by its own name. A client's own
/// `queue_declare(name, durable=True)` is therefore always equivalent and succeeds.
pub async fn declare_topology(ch: &Channel, settings: &Settings) -> Result<(), AmqpError> {
    let exchange = settings.rabbitmq.exchange.as_str();
    ch.exchange_declare(
        exchange.into(),
        ExchangeKind::Direct,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .map_err(|source| AmqpError::Topology {
        what: format!("exchange `{exchange}`"),
        source,
    })?;
    for queue in settings.queues.public_queues() {
        ch.queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|source| AmqpError::Topology {
            what: format!("queue `{queue}`"),
            source,
        })?;
        ch.queue_bind(
            queue.as_str().into(),
            exchange.into(),
            queue.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|source| AmqpError::Topology {
            what: format!("binding of `{queue}` to `{exchange}`"),
            source,
        })?;
    }
    // The service's own delay queues: a message waits out its TTL, then is dead-lettered back
    // to the exchange with the send queue's routing key.
    for (queue, delay) in settings.retry_queues() {
        let mut args = FieldTable::default();
        args.insert(
            "x-message-ttl".into(),
            lapin::types::AMQPValue::LongLongInt(delay.as_millis() as i64),
        );
        args.insert(
            "x-dead-letter-exchange".into(),
            lapin::types::AMQPValue::LongString(exchange.into()),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            lapin::types::AMQPValue::LongString(settings.queues.send.as_str().into()),
        );
        ch.queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .map_err(|source| AmqpError::Topology {
            what: format!("retry queue `{queue}`"),
            source,
        })?;
    }
    Ok(())
}

/// Message and consumer counts of the public queues, by passive declaration.
pub async fn queue_stats(
    conn: Arc<Connection>,
    queues: Vec<String>,
) -> Result<QueueStatusResponse, AmqpError> {
    let mut out = std::collections::BTreeMap::new();
    let mut channel: Option<Channel> = None;
    for q in queues {
        let ch = match &channel {
            Some(c) => c.clone(),
            None => {
                let c = conn.create_channel().await?;
                channel = Some(c.clone());
                c
            }
        };
        match ch
            .queue_declare(
                q.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
        {
            Ok(info) => {
                out.insert(
                    q,
                    QueueStats::new(info.message_count(), info.consumer_count()),
                );
            }
            // A passive declaration of a missing queue closes the channel (404).
            Err(e) if is_not_found(&e) => {
                out.insert(q, QueueStats::missing());
                channel = None;
            }
            Err(e) => return Err(e.into()),
        }
    }
    if let Some(ch) = channel {
        let _ = ch.close(200, "OK".into()).await;
    }
    Ok(QueueStatusResponse {
        success: true,
        connection_status: "connected",
        queues: out,
        error: None,
    })
}

fn is_not_found(e: &lapin::Error) -> bool {
    e.to_string().contains("NOT_FOUND") || e.to_string().contains("404")
}
