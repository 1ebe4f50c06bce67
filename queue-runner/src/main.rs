//! `queue-runner`: the command-line front of the Sluice queue runner.
//!
//! Errors reach the user as one line on stderr (`error: ...`), each cause
//! once, and a non-zero exit code; nothing that comes from outside may
//! panic. SIGTERM and SIGINT shut `serve` down cleanly (exit 0); a second
//! signal exits at once.
//!
//! Under systemd (`Type=notify`), `serve` reports `READY=1` once the
//! schema is migrated and both the gRPC and the HTTP listener are bound,
//! and `STOPPING=1` when the first signal starts the shutdown.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use sluice_queue_runner::logging::{self, LogFormat};
use sluice_queue_runner::{config, db, embedded, service, submit};

/// mimalloc, counting the bytes held (for `/status`'s `heapBytes`).
#[global_allocator]
static ALLOCATOR: sluice_queue_runner::memory::CountingAllocator =
    sluice_queue_runner::memory::CountingAllocator;

#[derive(Parser)]
#[command(
    name = "queue-runner",
    version,
    about = "Sluice: schedules the queued builds of a Hydra database onto builder agents",
    after_help = "Logging: info and above by default, on stderr. RUST_LOG picks other levels, \
                  e.g. RUST_LOG=debug or RUST_LOG=info,sluice_queue_runner=debug."
)]
struct Cli {
    /// Log line format: text (coloured only on a terminal) or json (one
    /// object per line).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the queue runner: load queued builds, schedule their steps onto
    /// the builder agents that connect, and record the results.
    ///
    /// Without a database URL it starts a private PostgreSQL under the data
    /// directory (kept across restarts) and creates the schema there; it
    /// stops that server when it shuts down. SIGTERM or SIGINT shuts down
    /// cleanly: no new work, pending database writes flushed (up to
    /// --shutdown-timeout-s), agents told, exit 0. A second signal exits at
    /// once.
    #[command(after_help = SERVE_EXAMPLES)]
    Serve(Box<ServeArgs>),
    /// Create or upgrade the database schema, then exit.
    ///
    /// On an empty database, creates Hydra's tables (schema version 87) and
    /// Sluice's own `Sluice*` tables. On a database created by Hydra (it has
    /// a `SchemaVersion` table), leaves Hydra's tables alone and adds only
    /// Sluice's own. Running it again is harmless.
    #[command(after_help = MIGRATE_EXAMPLES)]
    Migrate(MigrateArgs),
    /// Queue builds the way an evaluator does: Builds and BuildOutputs rows,
    /// then `builds_added`.
    ///
    /// Jobs are given as `--job NAME` followed by one or more targets, each
    /// a `.drv` path or `FILE.nix -A ATTR` (instantiated with
    /// nix-instantiate). Options may stand anywhere.
    #[command(after_help = SUBMIT_EXAMPLES)]
    Submit(SubmitArgs),
}

/// Examples in `--help`: a test (`tests/cli_examples.rs`) runs each `$ `
/// line as printed, in a directory laid out as the README's walkthrough
/// leaves it (`examples/`, `./agent-tokens`), in a private network
/// namespace and Nix store.
const SERVE_EXAMPLES: &str = "\
Examples:
  $ queue-runner serve --data-dir ./sluice-data --agent-token-file ./agent-tokens
  $ queue-runner serve --config examples/sluice.toml";
const MIGRATE_EXAMPLES: &str = "\
Examples (a running `serve --data-dir ./sluice-data`, or any database):
  $ queue-runner migrate --data-dir ./sluice-data";
const SUBMIT_EXAMPLES: &str = "\
Examples (with `serve --data-dir ./sluice-data` and an agent running):
  $ queue-runner submit --data-dir ./sluice-data --job base examples/jobs.nix -A base --wait
  $ queue-runner submit --job top examples/jobs.nix -A top --data-dir ./sluice-data --wait";

#[derive(clap::Args)]
struct ServeArgs {
    #[command(flatten)]
    settings: config::Settings,
    /// TOML file with the same settings, keys named like the flags
    /// (see examples/sluice.toml); flags win over the file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

/// Where `migrate` and `submit` find the database.
#[derive(clap::Args)]
struct DatabaseArgs {
    /// PostgreSQL URL. Without it, the embedded database of the queue
    /// runner running with --data-dir is used.
    #[arg(long, env = "DATABASE_URL", value_name = "URL")]
    database_url: Option<String>,
    /// Data directory of the queue runner whose embedded database to use.
    #[arg(long, value_name = "DIR", default_value = config::DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
}

impl DatabaseArgs {
    fn url(&self) -> anyhow::Result<String> {
        if let Some(url) = &self.database_url {
            return Ok(url.clone());
        }
        embedded::url_if_running(&self.data_dir).ok_or_else(|| {
            anyhow::anyhow!(
                "no --database-url and no embedded database running under {}; \
                 start `queue-runner serve --data-dir {}` first",
                self.data_dir.display(),
                self.data_dir.display()
            )
        })
    }
}

#[derive(clap::Args)]
struct MigrateArgs {
    #[command(flatten)]
    database: DatabaseArgs,
    /// Give up connecting after this many seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 15)]
    connect_timeout: u64,
}

#[derive(clap::Args)]
struct SubmitArgs {
    #[command(flatten)]
    database: DatabaseArgs,
    /// Project of the builds, created if missing.
    #[arg(long, default_value = "sluice")]
    project: String,
    /// Jobset of the builds, created if missing.
    #[arg(long, default_value = "default")]
    jobset: String,
    /// Follow the builds until they finish; exit 0 only if all succeeded.
    /// A failed build is shown with its failing step, its log file and the
    /// log's last lines.
    #[arg(long)]
    wait: bool,
    /// Starts a job; the targets after it (up to the next --job) are its
    /// builds.
    #[arg(long = "job", value_name = "NAME", required = true, action = clap::ArgAction::Append)]
    job: Vec<String>,
    /// A target: a .drv path, or a FILE.nix followed by -A ATTR.
    #[arg(value_name = "TARGET")]
    targets: Vec<String>,
    /// The attribute of the FILE.nix target just before it.
    #[arg(short = 'A', long = "attr", value_name = "ATTR", action = clap::ArgAction::Append)]
    attr: Vec<String>,
}

/// The raw job words of `submit` (`--job`, names, targets, `-A`, attributes)
/// in the order they stood on the command line, for [`submit::parse_jobs`].
fn job_words(matches: &ArgMatches) -> Vec<String> {
    let mut words: Vec<(usize, Vec<String>)> = Vec::new();
    let mut take = |id: &str, prefix: Option<&str>| {
        let (Some(indices), Some(values)) =
            (matches.indices_of(id), matches.get_many::<String>(id))
        else {
            return;
        };
        for (index, value) in indices.zip(values) {
            let mut w: Vec<String> = prefix.map(str::to_owned).into_iter().collect();
            w.push(value.clone());
            words.push((index, w));
        }
    };
    take("job", Some("--job"));
    take("targets", None);
    take("attr", Some("-A"));
    words.sort_by_key(|(index, _)| *index);
    words.into_iter().flat_map(|(_, w)| w).collect()
}

fn main() -> ExitCode {
    sluice_queue_runner::memory::configure();
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    logging::init(cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let submit_words = matches
        .subcommand_matches("submit")
        .map(job_words)
        .unwrap_or_default();
    match runtime.block_on(run(cli, submit_words)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", logging::error_line(&e));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli, submit_words: Vec<String>) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve(*args).await,
        Command::Migrate(args) => migrate(args).await,
        Command::Submit(args) => submit(args, &submit_words).await,
    }
}

async fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    let url = args.database.url()?;
    let mut conn = db::connect(&url, Duration::from_secs(args.connect_timeout)).await?;
    let report = db::migrate::migrate(&mut conn).await?;
    match report.hydra_schema {
        db::migrate::HydraSchema::Ours => {}
        db::migrate::HydraSchema::Hydra { version } => println!(
            "database created by Hydra (schema version {version}): Hydra's tables left alone"
        ),
    }
    if report.applied.is_empty() {
        println!("schema up to date");
    } else {
        for id in report.applied {
            println!("applied {id}");
        }
    }
    Ok(())
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // Signals first: from here on SIGTERM means a clean shutdown, even
    // while the embedded database is still starting.
    let shutdown = shutdown_on_signals()?;
    let file = match &args.config {
        Some(path) => config::Settings::load(path)?,
        None => config::Settings::default(),
    };
    let config = config::ServeConfig::resolve(file, args.settings)?;
    let mut shutdown = shutdown;
    let (bound_tx, bound_rx) = tokio::sync::oneshot::channel::<service::Bound>();
    tokio::spawn(async move {
        // Sent only once everything is up; dropped unsent if start-up fails.
        if let Ok(bound) = bound_rx.await {
            notify_systemd(&format!(
                "{}\nSTATUS=agents dial {}; status on http://{}/status",
                sluice_sd_notify::READY,
                bound.grpc,
                bound.http
            ));
        }
    });
    service::run_with(
        config,
        async move {
            // Also resolves when the signal came before this is polled.
            let _ = shutdown.wait_for(|signalled| *signalled).await;
        },
        bound_tx,
    )
    .await
}

/// Tells systemd how `serve` is doing (nothing without `$NOTIFY_SOCKET`).
/// A failure is logged, never fatal: the service runs the same either way.
fn notify_systemd(state: &str) {
    if let Err(e) = sluice_sd_notify::notify(state) {
        tracing::warn!("cannot notify systemd: {e}");
    }
}

/// Watches SIGTERM and SIGINT: the first flips the returned flag, the
/// second exits at once (after asking the embedded PostgreSQL, if any, to
/// stop fast).
fn shutdown_on_signals() -> anyhow::Result<watch::Receiver<bool>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let first = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!("{first} received: shutting down; a second signal exits at once");
        notify_systemd(sluice_sd_notify::STOPPING);
        let _ = tx.send(true);
        let (second, code) = tokio::select! {
            _ = term.recv() => ("SIGTERM", 128 + 15),
            _ = int.recv() => ("SIGINT", 128 + 2),
        };
        tracing::warn!("{second} received again: exiting at once");
        embedded::stop_now();
        std::process::exit(code);
    });
    Ok(rx)
}

async fn submit(args: SubmitArgs, words: &[String]) -> anyhow::Result<()> {
    let jobs = submit::resolve_jobs(submit::parse_jobs(words)?)?;
    let url = args.database.url()?;
    let pool = db::pool(&url, 2, Duration::from_secs(15)).await?;
    let ids = submit::queue(&pool, &args.project, &args.jobset, &jobs).await?;
    for (job, id) in jobs.iter().zip(&ids) {
        println!("queued build {id}: {} ({})", job.name, job.drv_path);
    }
    if args.wait {
        let ok = submit::wait(
            &pool,
            &ids,
            Duration::from_millis(500),
            &args.database.data_dir,
        )
        .await?;
        if !ok {
            anyhow::bail!("not every build succeeded");
        }
        println!("all {} builds succeeded", ids.len());
    }
    Ok(())
}
