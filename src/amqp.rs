//! Small AMQP helpers shared by the actors that publish: a channel with publisher confirms,
//! and a persistent JSON publish that resolves only once the broker confirmed it.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};

/// A new channel in confirm mode.
pub async fn confirm_channel(conn: Option<&Connection>) -> Result<Channel, String> {
    let conn = conn.ok_or_else(|| "no AMQP connection".to_string())?;
    let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    Ok(ch)
}

/// Publishes `body` persistently to `queue` (default exchange); Ok once the broker confirmed.
pub async fn publish_confirmed(
    ch: &Channel,
    queue: &str,
    body: &[u8],
    headers: Option<FieldTable>,
) -> Result<(), String> {
    let mut props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into());
    if let Some(h) = headers {
        props = props.with_headers(h);
    }
    let confirm = ch
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            props,
        )
        .await
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    if confirm.is_nack() {
        return Err(format!("the broker refused the message for {queue} (nack)"));
    }
    Ok(())
}
