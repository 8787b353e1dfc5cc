//! The actors. One file per actor, its messages and its error type beside it.
//!
//! The supervisor starts and restarts the others and is the only owner of the AMQP
//! connection; actors talk to each other only through the typed messages defined here.

pub mod dlq;
pub mod fetcher;
pub mod metrics;
pub mod outbound;
pub mod outbox;
pub mod retry;
pub mod sender;
pub mod supervisor;
pub mod sync_user;
