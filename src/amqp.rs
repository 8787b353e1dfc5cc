//! Publishing, shared by every actor that publishes: [`Publisher`], a few confirm-mode
//! channels on the supervisor's connection, each reopened by the publisher when the broker
//! closed it.
//!
//! Every publish is persistent, `mandatory` and publisher-confirmed, and resolves only once
//! the broker has taken the message: a message returned as unroutable (no such queue) or
//! nacked is a failed publish, never a confirmed one that vanished.

use std::sync::Arc;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::Confirmation;
use lapin::{BasicProperties, Channel, Connection, ErrorKind};

/// Why a message was not published.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    #[error("not connected to RabbitMQ")]
    NoConnection,
    /// The channel or connection failed; the next publish opens a new channel.
    #[error("the AMQP channel failed: {0}")]
    Channel(String),
    /// No queue took the message: it would have vanished without `mandatory`.
    #[error(
        "the broker could not route the message to `{queue}` ({reply}); the queue does not exist"
    )]
    Unroutable { queue: String, reply: String },
    /// The broker nacked it (a queue's `reject-publish` overflow, an internal error).
    #[error("the broker refused the message for `{queue}` (nack)")]
    Nacked { queue: String },
    /// The broker closed the channel over this message (406: larger than its
    /// `max_message_size`, or refused by a policy).
    #[error("the broker refused the message for `{queue}`: {reason}")]
    Refused { queue: String, reason: String },
}

impl PublishError {
    /// The broker will refuse this same message again (as opposed to a channel or connection
    /// failure, after which publishing it again can succeed).
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            PublishError::Unroutable { .. }
                | PublishError::Nacked { .. }
                | PublishError::Refused { .. }
        )
    }
}

/// A small set of confirm-mode channels ("lanes") on one connection. A caller picks its lane
/// by a key, so what one caller publishes stays in order; a lane whose channel was closed is
/// reopened on its next use.
pub struct Publisher {
    conn: Arc<Connection>,
    lanes: Vec<tokio::sync::Mutex<Option<Channel>>>,
}

impl Publisher {
    pub fn new(conn: Arc<Connection>, lanes: usize) -> Self {
        Self {
            conn,
            lanes: (0..lanes.max(1))
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
        }
    }

    /// The channel of `lane`, opened (in confirm mode) when it is not open.
    async fn channel(&self, lane: u64) -> Result<Channel, PublishError> {
        let i = (lane % self.lanes.len() as u64) as usize;
        let mut slot = self.lanes[i].lock().await;
        if let Some(ch) = slot.as_ref() {
            if ch.status().connected() {
                return Ok(ch.clone());
            }
        }
        if !self.conn.status().connected() {
            return Err(PublishError::NoConnection);
        }
        let ch = self
            .conn
            .create_channel()
            .await
            .map_err(|e| PublishError::Channel(e.to_string()))?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| PublishError::Channel(e.to_string()))?;
        *slot = Some(ch.clone());
        Ok(ch)
    }

    /// Publishes `body` persistently as JSON to `queue` (through the default exchange) on
    /// the lane of `lane`; Ok once the broker confirmed that a queue took it.
    pub async fn publish_json(
        &self,
        lane: u64,
        queue: &str,
        body: &[u8],
        headers: Option<FieldTable>,
    ) -> Result<(), PublishError> {
        let mut props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into());
        if let Some(h) = headers {
            props = props.with_headers(h);
        }
        self.publish(lane, queue, body, props).await
    }

    /// Publishes with the given properties (the delivery mode is the caller's).
    pub async fn publish(
        &self,
        lane: u64,
        queue: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<(), PublishError> {
        let ch = self.channel(lane).await?;
        let failed = |e: lapin::Error| classify(queue, &e);
        let confirm = ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                props,
            )
            .await
            .map_err(failed)?
            .await
            .map_err(failed)?;
        match confirm {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(returned)) => Err(PublishError::Unroutable {
                queue: queue.to_string(),
                reply: returned.reply_text.to_string(),
            }),
            Confirmation::Nack(_) => Err(PublishError::Nacked {
                queue: queue.to_string(),
            }),
            Confirmation::NotRequested => Err(PublishError::Channel(
                "the channel is not in confirm mode".into(),
            )),
        }
    }

    /// Closes every open lane (at shutdown: publishes in flight are confirmed first).
    pub async fn close(&self) {
        for lane in &self.lanes {
            if let Some(ch) = lane.lock().await.take() {
                if ch.status().connected() {
                    let _ = ch.close(200, "OK".into()).await;
                }
            }
        }
    }
}

/// A channel closed by the broker with 406 PRECONDITION_FAILED over this message is a
/// refusal of the message; anything else is a channel failure.
fn classify(queue: &str, e: &lapin::Error) -> PublishError {
    match e.kind() {
        ErrorKind::ProtocolError(amqp) if amqp.get_id() == 406 => PublishError::Refused {
            queue: queue.to_string(),
            reason: amqp.get_message().to_string(),
        },
        _ => PublishError::Channel(e.to_string()),
    }
}

/// Opens a connection to the configured broker: `amqp://`, or `amqps://` with the system's
/// roots plus `[rabbitmq] ca_file`.
pub async fn connect(
    settings: &crate::settings::Settings,
    name: &str,
) -> Result<Connection, ConnectError> {
    let uris = settings.amqp_uris().map_err(ConnectError::Url)?;
    let props = lapin::ConnectionProperties::default().with_connection_name(name.into());
    let cert_chain = match &settings.rabbitmq.ca_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| ConnectError::CaFile(format!("{}: {e}", path.display())))?,
        ),
        None => None,
    };
    let tls = lapin::tcp::OwnedTLSConfig {
        identity: None,
        cert_chain,
    };
    let runtime = lapin::runtime::default_runtime().map_err(|e| ConnectError::Connect {
        endpoint: settings.amqp_display(),
        source: e,
    })?;
    // The brokers in order (the nodes of a cluster): the first that takes the connection.
    let mut failed = None;
    for uri in uris {
        let endpoint = crate::settings::uri_display(&uri);
        match Connection::connect_uri_with_config(uri, props.clone(), tls.clone(), runtime.clone())
            .await
        {
            Ok(c) => {
                tracing::debug!(%endpoint, "connected to RabbitMQ");
                return Ok(c);
            }
            Err(source) => {
                tracing::debug!(%endpoint, error = %source, "RabbitMQ not reachable here; trying the next");
                failed = Some(ConnectError::Connect { endpoint, source });
            }
        }
    }
    Err(failed.unwrap_or_else(|| ConnectError::Url("no broker configured".into())))
}

/// Why the broker could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect to RabbitMQ at {endpoint}: {source}; check that RabbitMQ is running and [rabbitmq] settings (or RABBITMQ_*) are right")]
    Connect {
        endpoint: String,
        #[source]
        source: lapin::Error,
    },
    #[error("[rabbitmq] url is not usable: {0}")]
    Url(String),
    #[error("[rabbitmq] ca_file is not readable: {0}")]
    CaFile(String),
}

/// The publisher lane of a caller (a mailbox, a queue): stable, so its messages stay in order.
pub fn lane_of(key: &str) -> u64 {
    // FNV-1a: cheap and stable; not for security.
    key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// An AMQP short string (at most 255 bytes: message ids, header names) from outside data:
/// the value itself when it fits, else `sha256:` and the hex digest of it — never the panic
/// a plain conversion of a longer value causes.
pub fn short_string(value: &str) -> lapin::types::ShortString {
    if value.len() <= 255 {
        value.into()
    } else {
        format!("sha256:{}", crate::inbound::sha256_hex(value.as_bytes())).into()
    }
}
