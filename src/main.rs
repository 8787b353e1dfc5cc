//! The `mailbridge` binary: the CLI of contract §1.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use mailbridge::settings::{default_config_path, LogFormat, Settings};

/// mimalloc rather than glibc's malloc: the outbound path allocates and frees a few buffers of
/// an email's size per email across the actors' thread, lapin's I/O thread and the blocking
/// pool, and glibc's allocator (its arenas, `malloc_consolidate`) took about a fifth of the
/// service's user-space CPU in the outbound benchmark's profile (issue 15).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code for a configuration that cannot be used (sysexits' `EX_CONFIG`).
const EX_CONFIG: u8 = 78;
/// Exit code for RabbitMQ or PostgreSQL unreachable (sysexits' `EX_UNAVAILABLE`): trying
/// again later may work.
const EX_UNAVAILABLE: u8 = 69;

/// 0 for a command that did what was asked, 1 when it ran but the answer is "no" (the
/// email failed, no such row), else [`failure`]'s code.
fn outcome(result: anyhow::Result<bool>) -> ExitCode {
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            failure(&e)
        }
    }
}

/// The exit code for a command's error: 69 when a dependency could not be reached, else 1.
fn failure(e: &anyhow::Error) -> ExitCode {
    use mailbridge::storage::StorageError;
    let unreachable = e.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<StorageError>(),
            Some(StorageError::Connect { .. } | StorageError::Pool(_))
        ) || matches!(
            cause.downcast_ref::<mailbridge::amqp::ConnectError>(),
            Some(mailbridge::amqp::ConnectError::Connect { .. })
        )
    });
    if unreachable {
        ExitCode::from(EX_UNAVAILABLE)
    } else {
        ExitCode::FAILURE
    }
}

#[derive(Parser)]
#[command(
    name = "mailbridge",
    version,
    about = "Sends and receives email for CRM systems through RabbitMQ"
)]
struct Cli {
    /// The main config file (default: $MAILBRIDGE_CONFIG, else config/mailbridge.toml).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service until SIGTERM/SIGINT (the default).
    Run,
    /// Apply the database migrations and exit.
    Migrate,
    /// Validate the config and every tenant file; exit 1 when anything is wrong.
    CheckConfig,
    /// Inspect and replay dead letters.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Publish one send request in the guide's format to the send queue, as a CRM would.
    Send {
        /// The tenant_id of the request.
        #[arg(long)]
        tenant: String,
        /// The provider_id of the request (one of the tenant's providers).
        #[arg(long)]
        provider: String,
        /// A recipient (repeatable).
        #[arg(long, required = true)]
        to: Vec<String>,
        /// A copy recipient (repeatable).
        #[arg(long)]
        cc: Vec<String>,
        /// The sender address.
        #[arg(long, env = "MAILBRIDGE_FROM")]
        from: String,
        /// The subject.
        #[arg(long, default_value = "")]
        subject: String,
        /// A plain-text body.
        #[arg(long, conflicts_with = "html")]
        body: Option<String>,
        /// A file whose contents are the HTML body.
        #[arg(long, value_name = "FILE")]
        html: Option<PathBuf>,
        /// The request's message_id (default: a new one).
        #[arg(long = "message-id")]
        message_id: Option<String>,
        /// Wait for the email to be sent or to fail and print its outcome; exit 1 when it
        /// failed.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits, in seconds.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// Read the outbox.
    Outbox {
        #[command(subcommand)]
        action: OutboxAction,
    },
    /// Follow the outcomes of send requests.
    Results {
        #[command(subcommand)]
        action: ResultsAction,
    },
    /// Act on a configured mailbox.
    Mailbox {
        #[command(subcommand)]
        action: MailboxAction,
    },
    /// Print a shell completion script for mailbridge.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print mailbridge's man page (roff), made from this command line's definition.
    Man,
}

#[derive(Subcommand)]
enum OutboxAction {
    /// Print a request's outbox row and history (attempts, errors, dead letter, replays) as
    /// JSON; exit 1 when there is none.
    Show {
        /// The request's message_id.
        message_id: String,
        /// Only this tenant's request (message ids are unique per tenant).
        #[arg(long)]
        tenant: Option<String>,
    },
}

#[derive(Subcommand)]
enum ResultsAction {
    /// Print every outcome (sent, failed, retrying) recorded from now on, one JSON object per
    /// line, read from the outbox: the result queue's consumers miss nothing.
    Tail {
        /// Only this tenant's outcomes.
        #[arg(long)]
        tenant: Option<String>,
        /// Stop after this many.
        #[arg(long)]
        limit: Option<usize>,
    },
}

#[derive(Subcommand)]
enum MailboxAction {
    /// Ask for a sync of the mailbox now: publishes the guide's sync request for its user.
    Sync {
        /// The mailbox's id (as in its tenant file).
        id: String,
    },
}

#[derive(Subcommand)]
enum DlqAction {
    /// Print the entries at the head of a DLQ, one JSON object per line (they stay queued).
    List {
        /// The DLQ (default: the outbound one, email.send.dlq).
        #[arg(long)]
        queue: Option<String>,
        /// At most this many entries.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Replay dead letters: outbound requests go back to the send queue with a fresh retry
    /// schedule; inbound emails (--queue email.inbound.dlq) are published from their stored
    /// bytes.
    Replay {
        /// The DLQ (default: the outbound one, email.send.dlq).
        #[arg(long)]
        queue: Option<String>,
        /// Replay every entry.
        #[arg(long, conflicts_with = "message_id")]
        all: bool,
        /// Replay the entries with this message_id (repeatable; for inbound entries the
        /// dedup_key works too).
        #[arg(long = "message-id")]
        message_id: Vec<String>,
        /// Only entries of this tenant.
        #[arg(long)]
        tenant: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // These need no configuration.
    match &cli.command {
        Some(Command::Completions { shell }) => {
            let mut command = Cli::command();
            clap_complete::generate(*shell, &mut command, "mailbridge", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Some(Command::Man) => {
            let man = clap_mangen::Man::new(Cli::command());
            return match man.render(&mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        _ => {}
    }
    let path = cli.config.unwrap_or_else(default_config_path);
    let command = cli.command.unwrap_or(Command::Run);

    let settings = match Settings::load(&path) {
        Ok(s) => s,
        Err(e) => {
            for p in &e.0 {
                eprintln!("error: {p}");
            }
            eprintln!("{} problem(s) found; nothing was started", e.0.len());
            // `check-config` exits 1 as contract §1 says; every other command 78.
            return match command {
                Command::CheckConfig => ExitCode::FAILURE,
                _ => ExitCode::from(EX_CONFIG),
            };
        }
    };
    init_logging(settings.log.format);

    match command {
        Command::CheckConfig => {
            for w in &settings.warnings {
                eprintln!("warning: {w}");
            }
            let providers: usize = settings.tenants.iter().map(|t| t.providers.len()).sum();
            let mailboxes: usize = settings.tenants.iter().map(|t| t.mailboxes.len()).sum();
            println!(
                "{}: OK ({} tenant(s), {} provider(s), {} mailbox(es))",
                path.display(),
                settings.tenants.len(),
                providers,
                mailboxes
            );
            ExitCode::SUCCESS
        }
        Command::Migrate => {
            let result = actix_rt::System::new()
                .block_on(async { mailbridge::storage::migrate(&settings.database).await });
            match result {
                Ok(applied) => {
                    println!("migrations applied: {}", applied.len());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    failure(&e.into())
                }
            }
        }
        Command::Dlq { action } => {
            let result = actix_rt::System::new().block_on(run_dlq(&settings, action));
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    failure(&e)
                }
            }
        }
        Command::Send {
            tenant,
            provider,
            to,
            cc,
            from,
            subject,
            body,
            html,
            message_id,
            wait,
            timeout,
        } => {
            let args = mailbridge::cli::SendArgs {
                tenant,
                provider,
                from,
                to,
                cc,
                subject,
                body,
                html,
                message_id,
                wait: wait.then_some(std::time::Duration::from_secs(timeout)),
            };
            outcome(actix_rt::System::new().block_on(mailbridge::cli::send(&settings, args)))
        }
        Command::Outbox {
            action: OutboxAction::Show { message_id, tenant },
        } => outcome(
            actix_rt::System::new().block_on(mailbridge::cli::outbox_show(
                &settings,
                &message_id,
                tenant.as_deref(),
            )),
        ),
        Command::Results {
            action: ResultsAction::Tail { tenant, limit },
        } => outcome(
            actix_rt::System::new()
                .block_on(mailbridge::cli::results_tail(
                    &settings,
                    tenant.as_deref(),
                    limit,
                ))
                .map(|()| true),
        ),
        Command::Mailbox {
            action: MailboxAction::Sync { id },
        } => outcome(
            actix_rt::System::new()
                .block_on(mailbridge::cli::mailbox_sync(&settings, &id))
                .map(|()| true),
        ),
        Command::Completions { .. } | Command::Man => ExitCode::SUCCESS,
        Command::Run => {
            install_panic_hook();
            let result = actix_rt::System::new().block_on(mailbridge::app::run(settings));
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    failure(&e)
                }
            }
        }
    }
}

async fn run_dlq(settings: &Settings, action: DlqAction) -> anyhow::Result<()> {
    use mailbridge::dlq::{self, Selection};
    let conn = std::sync::Arc::new(mailbridge::amqp::connect(settings, "mailbridge dlq").await?);
    let default_queue = settings.queues.send_dlq();
    match action {
        DlqAction::List { queue, limit } => {
            let queue = queue.unwrap_or(default_queue);
            for entry in dlq::list(&conn, settings, &queue, limit).await? {
                println!("{entry}");
            }
        }
        DlqAction::Replay {
            queue,
            all,
            message_id,
            tenant,
        } => {
            let ids = (!message_id.is_empty()).then_some(message_id);
            let selection = match (all, ids, tenant) {
                (_, ids, Some(t)) if all || ids.is_some() => Selection::Tenant(t, ids),
                (true, None, None) => Selection::All,
                (false, Some(ids), None) => Selection::MessageIds(ids),
                _ => anyhow::bail!("say what to replay: --all or --message-id ID (and --tenant T to keep to one tenant)"),
            };
            mailbridge::storage::create_database_if_missing(&settings.database).await?;
            let pool = mailbridge::storage::pool(&settings.database)?;
            let queue = queue.unwrap_or(default_queue);
            let report = dlq::replay(&conn, &pool, settings, &queue, &selection).await?;
            println!(
                "replayed {}: {}; {} left on {queue}",
                report.replayed.len(),
                report.replayed.join(", "),
                report.kept
            );
            if !report.already_published.is_empty() {
                println!(
                    "already published (removed from {queue}): {}",
                    report.already_published.join(", ")
                );
            }
            for n in &report.not_replayed {
                println!("not replayed: {}: {}", n.message_id, n.reason);
            }
        }
    }
    let _ = conn.close(200, "OK".into()).await;
    Ok(())
}

/// Logs to stderr, as `[log] format` (or `MAILBRIDGE_LOG_FORMAT`) says: text lines, or one
/// JSON object per line with the event's fields (`tenant_id`, `message_id`, `mailbox_id`, …)
/// at the top level. `RUST_LOG` filters (default `info`).
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
}

/// A panic inside an actor ends only that actor's task (the supervisor restarts it); this
/// hook makes sure it is logged through the same channel as everything else.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let payload = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic payload".into());
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        tracing::error!(%location, thread = ?std::thread::current().name(), "panic: {payload}");
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every subcommand and every flag says what it is for (`--help`, the man page and the
    /// completions are made from these).
    #[test]
    fn every_command_and_flag_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                if arg.get_help().is_none() && arg.get_id() != "help" && arg.get_id() != "version" {
                    missing.push(format!("{path} {}", arg.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() {
                    missing.push(format!("{path} {}", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "mailbridge", &mut missing);
        assert!(missing.is_empty(), "no help for: {missing:?}");
        Cli::command().debug_assert();
    }
}
