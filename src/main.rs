//! The `mailbridge` binary: the CLI of contract §1.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mailbridge::settings::{default_config_path, Settings};

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
}

#[derive(Subcommand)]
enum DlqAction {
    /// Print the entries at the head of a DLQ, one JSON object per line (they stay queued).
    List {
        /// The DLQ (default: the outbound one, email.send.dlq).
        #[arg(long)]
        queue: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Replay dead letters: outbound requests go back to the send queue with a fresh retry
    /// schedule; inbound emails (--queue email.inbound.dlq) are published from their stored
    /// bytes.
    Replay {
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
    init_logging();
    let path = cli.config.unwrap_or_else(default_config_path);
    let command = cli.command.unwrap_or(Command::Run);

    let settings = match Settings::load(&path) {
        Ok(s) => s,
        Err(e) => {
            for p in &e.0 {
                eprintln!("error: {p}");
            }
            eprintln!("{} problem(s) found; nothing was started", e.0.len());
            return ExitCode::FAILURE;
        }
    };

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
                    ExitCode::FAILURE
                }
            }
        }
        Command::Dlq { action } => {
            let result = actix_rt::System::new().block_on(run_dlq(&settings, action));
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run => {
            install_panic_hook();
            let result = actix_rt::System::new().block_on(mailbridge::app::run(settings));
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::FAILURE
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

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
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
