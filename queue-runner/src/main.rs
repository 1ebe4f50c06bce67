//! `queue-runner`: the command-line front of the Sluice queue runner.
//!
//! Errors reach the user as one line on stderr (`error: ...`) and a
//! non-zero exit code; nothing that comes from outside may panic.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use std::net::SocketAddr;
use std::path::PathBuf;

use sluice_queue_runner::{config, db, embedded, service, submit};

/// mimalloc: the derivation parser allocates many small strings, and
/// glibc's malloc was a quarter of its time (see `cargo bench -p
/// sluice-nix --bench derivations`, which uses the same allocator).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "queue-runner",
    version,
    about = "Sluice: schedules the queued builds of a Hydra database onto builder agents"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the queue runner: load queued builds, schedule their steps onto
    /// the builder agents that connect, and record the results.
    ///
    /// Without a database URL it starts a private PostgreSQL under the data
    /// directory (kept across restarts) and creates the schema there.
    Serve(ServeArgs),
    /// Create or upgrade the database schema, then exit.
    ///
    /// On an empty database, creates Hydra's tables (schema version 87) and
    /// Sluice's own `Sluice*` tables. On a database created by Hydra (it has
    /// a `SchemaVersion` table), leaves Hydra's tables alone and adds only
    /// Sluice's own. Running it again is harmless.
    Migrate {
        /// PostgreSQL URL, e.g. postgres://hydra@db.example/hydra or
        /// postgres://postgres@localhost/hydra?host=/run/postgresql
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
        /// Give up connecting after this many seconds.
        #[arg(long, default_value_t = 15)]
        connect_timeout: u64,
    },
    /// Queue builds the way an evaluator does: Builds and BuildOutputs rows,
    /// then `builds_added`.
    ///
    /// Jobs are given as `--job NAME` followed by one or more targets, each
    /// a `.drv` path or `FILE.nix -A ATTR` (instantiated with
    /// nix-instantiate). Example:
    /// `submit --job hello examples/jobs.nix -A hello --job dep /nix/store/…-dep.drv`
    Submit(SubmitArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// PostgreSQL URL. Without it, a private PostgreSQL is started under
    /// --data-dir.
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// State directory: build logs (the web UI's HYDRA_DATA) and the
    /// embedded database [default: /var/lib/sluice]
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Address the builder agents dial [default: 127.0.0.1:50051]
    #[arg(long)]
    grpc_listen: Option<SocketAddr>,
    /// Address of /status, /status/machines and /metrics [default: 127.0.0.1:9198]
    #[arg(long)]
    http_listen: Option<SocketAddr>,
    /// File with the tokens agents must present, one per line.
    #[arg(long)]
    agent_token_file: Option<PathBuf>,
    /// Nix daemon socket of the queue runner's store. Without it, the local
    /// store is served by `nix-daemon --stdio` children (needs root).
    #[arg(long)]
    store_socket: Option<PathBuf>,
    /// TOML file with the same settings (kebab-case keys); flags win.
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(clap::Args)]
struct SubmitArgs {
    /// PostgreSQL URL. Without it, the embedded database of the queue runner
    /// running with --data-dir is used.
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// Data directory of the queue runner whose embedded database to use.
    #[arg(long, default_value = "/var/lib/sluice")]
    data_dir: PathBuf,
    #[arg(long, default_value = "sluice")]
    project: String,
    #[arg(long, default_value = "default")]
    jobset: String,
    /// Follow the builds until they finish; exit 0 only if all succeeded.
    #[arg(long)]
    wait: bool,
    /// `--job NAME (DRV | FILE.nix -A ATTR)...`, repeated.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        required = true,
        value_name = "JOBS"
    )]
    jobs: Vec<String>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Migrate {
            database_url,
            connect_timeout,
        } => {
            let mut conn = db::connect(&database_url, Duration::from_secs(connect_timeout)).await?;
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
        Command::Submit(args) => submit(args).await,
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let file = match &args.config {
        Some(path) => config::Settings::load(path)?,
        None => config::Settings::default(),
    };
    let config = config::ServeConfig::resolve(
        file,
        config::Settings {
            database_url: args.database_url,
            data_dir: args.data_dir,
            grpc_listen: args.grpc_listen,
            http_listen: args.http_listen,
            agent_token_file: args.agent_token_file,
            store_socket: args.store_socket,
            ..config::Settings::default()
        },
    )?;
    service::run(config, shutdown_signal()).await
}

async fn shutdown_signal() {
    let _ = tokio::signal::ctrl_c().await;
}

async fn submit(args: SubmitArgs) -> anyhow::Result<()> {
    let jobs = submit::resolve_jobs(submit::parse_jobs(&args.jobs)?)?;
    let url = match args.database_url {
        Some(url) => url,
        None => embedded::url_if_running(&args.data_dir).ok_or_else(|| {
            anyhow::anyhow!(
                "no --database-url and no embedded database running under {}; start `queue-runner serve --data-dir {}` first",
                args.data_dir.display(),
                args.data_dir.display()
            )
        })?,
    };
    let pool = db::pool(&url, 2, Duration::from_secs(15)).await?;
    let ids = submit::queue(&pool, &args.project, &args.jobset, &jobs).await?;
    for (job, id) in jobs.iter().zip(&ids) {
        println!("queued build {id}: {} ({})", job.name, job.drv_path);
    }
    if args.wait {
        let ok = submit::wait(&pool, &ids, Duration::from_millis(500)).await?;
        if !ok {
            anyhow::bail!("not every build succeeded");
        }
        println!("all {} builds succeeded", ids.len());
    }
    Ok(())
}

fn one_line(s: &str) -> String {
    s.lines().map(str::trim).collect::<Vec<_>>().join(" ")
}
