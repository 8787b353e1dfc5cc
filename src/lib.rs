//! mailbridge: sends and receives email for CRM systems through RabbitMQ.
//!
//! # Layout
//!
//! - [`settings`]: the TOML configuration, tenant files and environment overrides, validated
//!   into one [`settings::Settings`]; every problem names its file and key.
//! - [`domain`]: the wire formats and health model. No I/O.
//! - [`metrics`]: the metric registry and its Prometheus rendering. No I/O.
//! - [`storage`]: PostgreSQL pool, database creation and the SQL migrations of `migrations/`.
//! - [`actors`]: the supervised actor system (in `actors/`, one file per actor).
//! - [`http`]: the actix-web endpoints.
//! - [`app`]: `mailbridge run`, wiring the above together, and graceful shutdown.
//! - [`systemd`]: readiness and the watchdog for a `Type=notify` unit.
//!
//! See `ARCHITECTURE.md` for the codemap and the invariants.

#[path = "../actors/mod.rs"]
pub mod actors;
pub mod amqp;
pub mod app;
pub mod attachments;
pub mod cli;
pub mod credentials;
pub mod dashboard;
pub mod dlq;
pub mod domain;
pub mod fetch;
pub mod http;
pub mod inbound;
pub mod intake;
pub mod leases;
pub mod mailbox_health;
pub mod mailproto;
pub mod metrics;
pub mod mime;
pub mod oauth2;
pub mod outbound;
pub mod outbox;
pub mod pacing;
pub mod providers;
pub mod settings;
pub mod smtp;
pub mod sources;
pub mod storage;
pub mod systemd;
pub mod tenant_files;
pub mod topology;
