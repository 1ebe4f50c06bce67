//! `queue-runner`: the command-line front of the Sluice queue runner.
//!
//! Errors reach the user as one line on stderr (`error: ...`) and a
//! non-zero exit code; nothing that comes from outside may panic.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use sluice_queue_runner::db;

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
    }
}

fn one_line(s: &str) -> String {
    s.lines().map(str::trim).collect::<Vec<_>>().join(" ")
}
