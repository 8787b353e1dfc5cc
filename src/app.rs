//! `mailbridge run`: wires the actors and the HTTP server together and waits for a signal.
//!
//! Start order: metrics actor → supervisor (which migrates, connects and starts the other
//! actors) → HTTP. `/health` answers from the first moment, 503 until RabbitMQ and PostgreSQL
//! are both reachable. Shutdown order is the reverse: the supervisor drains every child and
//! closes the AMQP connection, then the HTTP server stops.

use std::sync::Arc;

use actix::Actor;
use actix_web::{web, App, HttpServer};
use anyhow::Context as _;
use tokio::signal::unix::{signal, SignalKind};

use crate::actors::dlq::DeadLetterActor;
use crate::actors::fetcher::MailboxFetcher;
use crate::actors::metrics::{IsReady, MetricsActor};
use crate::actors::outbound::OutboundConsumer;
use crate::actors::outbox::OutboxWriter;
use crate::actors::retry::RetryScheduler;
use crate::actors::sender::SenderActor;
use crate::actors::supervisor::{ChildContext, ChildId, ChildSpec, Reload, Shutdown, Supervisor};
use crate::actors::sync_user::{SyncListener, SyncUserConsumer};
use crate::attachments::AttachmentStore;
use crate::http::{self, AppState};
use crate::settings::{Secret, Settings};
use crate::storage;
use crate::systemd;

pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let settings = Arc::new(settings);
    for w in &settings.warnings {
        tracing::warn!("{w}");
    }
    tracing::info!(
        tenants = settings.tenants.len(),
        amqp = %settings.amqp_display(),
        http = %settings.http_listen,
        "starting mailbridge"
    );
    // Before any actor starts: an HTTP address in use, or a store the service cannot use (a
    // short link key, a folder it cannot write), stops the start with its reason instead of
    // failing every fetcher (and no actor is left running as the process exits).
    let listener = std::net::TcpListener::bind(settings.http_listen).with_context(|| {
        format!(
            "cannot listen on {} (set [http] listen or HTTP_LISTEN to a free address)",
            settings.http_listen
        )
    })?;
    let pool = storage::pool(&settings.database)?;
    let attachments = AttachmentStore::for_settings(&settings.attachments, &pool)?;
    let metrics = MetricsActor::default().start();
    let metrics_for_ready = metrics.clone();
    let supervisor = Supervisor::new(settings.clone(), pool.clone(), metrics.clone())
        .with_factory(children)
        .start();
    actix_rt::spawn(watch_config(settings.clone(), supervisor.clone()));

    let admin_token = std::env::var(&settings.http.admin_token_env)
        .ok()
        .filter(|t| !t.is_empty())
        .map(Secret::new);
    if admin_token.is_none() {
        tracing::info!(
            "admin endpoints (DLQ, reload) are disabled until {} is set",
            settings.http.admin_token_env
        );
    }
    let state = AppState {
        metrics,
        supervisor: supervisor.clone(),
        settings: settings.clone(),
        admin_token,
        attachments: Arc::new(attachments),
        pool,
    };
    let server = HttpServer::new(move || {
        App::new()
            .app_data(web::Data::new(state.clone()))
            .configure(http::routes)
    })
    .workers(2)
    .disable_signals()
    .shutdown_timeout(5)
    .listen(listener)
    .with_context(|| format!("cannot serve HTTP on {}", settings.http_listen))?
    .run();
    let server_handle = server.handle();
    actix_rt::spawn(server);
    actix_rt::spawn(tell_ready(metrics_for_ready));

    wait_for_stop_signal(&supervisor).await?;
    systemd::notify("STOPPING=1\nSTATUS=draining in-flight work");
    tracing::info!(grace = ?settings.shutdown_grace, "shutting down: draining in-flight work");
    if supervisor
        .send(Shutdown {
            grace: settings.shutdown_grace,
        })
        .await
        .is_err()
    {
        tracing::warn!("the supervisor was already gone at shutdown");
    }
    server_handle.stop(true).await;
    tracing::info!("stopped");
    Ok(())
}

/// The supervised actors of the configured service: the outbox writer, one sender per
/// provider, the retry scheduler, the DLQ actor, the outbound consumer, one fetcher per
/// mailbox and the sync-request consumer.
pub fn children(settings: &Settings) -> Vec<ChildSpec> {
    let mut specs = vec![ChildSpec::new(ChildId::Outbox, false, |c: ChildContext| {
        Box::new(
            OutboxWriter::new(
                c.pool,
                c.settings.instance_id.clone(),
                c.settings.cluster.claim_ttl.0,
            )
            .start(),
        )
    })];
    for provider in settings.tenants.iter().flat_map(|t| &t.providers) {
        let provider = provider.clone();
        let provider_fingerprint = provider.fingerprint();
        specs.push(
            ChildSpec::new(
                ChildId::Sender(provider.id.clone()),
                false,
                move |c: ChildContext| {
                    Box::new(
                        SenderActor::new(
                            provider.clone(),
                            c.settings.outbound.send_timeout.0,
                            c.metrics,
                            c.accounts,
                        )
                        .start(),
                    )
                },
            )
            .fingerprint(provider_fingerprint)
            .abort_when_overdue::<SenderActor>(),
        );
    }
    specs.push(ChildSpec::new(ChildId::Retry, true, |c: ChildContext| {
        Box::new(RetryScheduler::new(c).start())
    }));
    // It replays inbound dead letters for the mailboxes configured now: it follows reloads.
    specs.push(
        ChildSpec::new(ChildId::Dlq, true, |c: ChildContext| {
            Box::new(DeadLetterActor::new(c).start())
        })
        .settings_updates::<DeadLetterActor>(),
    );
    specs.push(
        ChildSpec::new(ChildId::Outbound, true, |c: ChildContext| {
            Box::new(OutboundConsumer::new(c).start())
        })
        .consumer()
        .settings_updates::<OutboundConsumer>(),
    );
    for mailbox in settings.tenants.iter().flat_map(|t| &t.mailboxes) {
        let mailbox = mailbox.clone();
        let mailbox_fingerprint = mailbox.fingerprint();
        specs.push(
            ChildSpec::new(
                ChildId::Mailbox(mailbox.id.clone()),
                true,
                move |c: ChildContext| Box::new(MailboxFetcher::new(mailbox.clone(), c).start()),
            )
            .fingerprint(mailbox_fingerprint),
        );
    }
    specs.push(
        ChildSpec::new(ChildId::SyncUser, true, |c: ChildContext| {
            Box::new(SyncUserConsumer::new(c).start())
        })
        .consumer()
        .settings_updates::<SyncUserConsumer>(),
    );
    specs.push(ChildSpec::new(
        ChildId::SyncListener,
        false,
        |c: ChildContext| Box::new(SyncListener::new(c).start()),
    ));
    specs
}

/// The config files' names, sizes and modification times: what the watcher compares.
fn config_fingerprint(
    settings: &Settings,
) -> Vec<(std::path::PathBuf, u64, Option<std::time::SystemTime>)> {
    let stat = |p: std::path::PathBuf| {
        let meta = std::fs::metadata(&p).ok();
        let len = meta.as_ref().map(|m| m.len()).unwrap_or(0);
        let modified = meta.and_then(|m| m.modified().ok());
        (p, len, modified)
    };
    let mut files = vec![stat(settings.path.clone())];
    if let Ok(dir) = std::fs::read_dir(&settings.tenants_dir) {
        let mut tenants: Vec<_> = dir
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        tenants.sort();
        files.extend(tenants.into_iter().map(stat));
    }
    files
}

/// Reloads when a config file changes. Polls (every second: file events do not reach every
/// filesystem) and waits for the files to be still for a second, so an editor's several
/// writes make one reload.
async fn watch_config(settings: Arc<Settings>, supervisor: actix::Addr<Supervisor>) {
    let mut applied = config_fingerprint(&settings);
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let now = config_fingerprint(&settings);
        if now == applied {
            continue;
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        if config_fingerprint(&settings) != now {
            continue;
        }
        applied = now;
        if supervisor
            .send(Reload {
                source: "file change",
            })
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Tells systemd (`Type=notify`) that the service is ready once RabbitMQ and PostgreSQL are
/// first both reachable (what `/readyz` answers): the HTTP server listens and the actors run.
async fn tell_ready(metrics: actix::Addr<MetricsActor>) {
    systemd::notify("STATUS=waiting for RabbitMQ and PostgreSQL");
    loop {
        if let Ok(true) = metrics.send(IsReady).await {
            systemd::notify("READY=1\nSTATUS=serving");
            tracing::info!("ready: RabbitMQ and PostgreSQL reachable");
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Waits for SIGTERM or SIGINT; SIGHUP reloads the configuration.
async fn wait_for_stop_signal(supervisor: &actix::Addr<Supervisor>) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let mut hup = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = hup.recv() => {
                let _ = supervisor.send(Reload { source: "SIGHUP" }).await;
            }
        }
    }
}
